"""Shard writer: owns one job's output directory, resumes it, verifies what was committed, commits shards.

The format (names, index schema, manifest and commit journal) is :mod:`pipeline.dataset`'s. Commit of
shard k: write the tar and the part under ``.tmp`` names (fsync), ``os.replace`` both, then append the
shard's commit record (sizes, sha256, counts) to the journal. Tars have a fixed mtime and their
members are in index order, so a resumed run writes byte-identical shards.

On open, committed shards are checked (size always, sha256 with ``verify``): one that is missing or
changed is generated again. Only files this job's plan or a synthgen manifest names are deleted;
anything else in the directory is left alone and reported (:attr:`DatasetWriter.foreign`).

Must not: import Ray, torch or stage code (they are imported only where a run needs them).
"""
from __future__ import annotations

import json
import math
import os
import platform
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .dataset import (INDEX, INDEX_SCHEMA, INDEX_VERSION, JOURNAL, MANIFEST, MEMBERS, TAR_MTIME, TOP_LEVEL, FORMAT,
                      Commits, OutputError, append_commit, category_names, check_shards, commit_record, counts,
                      index_row, index_table, index_tables, index_version, output_state, read_index, read_journal,
                      write_atomic)
from .plan import ShardPlan
from .spec import UNFINGERPRINTED
from .storage import RemotePath, digest, failure, location, parquet_bytes, publish, staging, write_file, write_parquet

#: record columns the writer needs (everything else can be dropped before the driver)
COLUMNS = ("key", "index", "seed", "prompt", "class_names", "scores", "curriculum", "keep", "reject_reason",
           *MEMBERS)
VERSIONS = ("synthgen", "torch", "diffusers", "transformers", "ray", "webdataset", "pycocotools", "pyarrow",
            "numpy", "pillow", "pydantic")


#: on an object store the manifest absorbs the journal every max(this, sqrt(2 x committed)) commits: each commit
#: rewrites the journal object whole (O(commits since the last fold)) and each fold the manifest (O(committed));
#: sqrt(2n) balances the two, about sqrt(2n) records written per commit instead of n / 64 at n = 10^5
JOURNAL_FOLD = 64


def tar_bytes(kept: list[dict]) -> bytes:
    """A shard's tar: one ``{key}.{ext}`` member per produced column of each record, fixed mtime (so
    equal content gives equal bytes)."""
    import io

    import webdataset as wds  # imports torch: only a run that writes pays for it

    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=TAR_MTIME) as sink:
        for r in kept:
            sample = {"__key__": str(r["key"])}
            sample.update({ext: bytes(r[col]) for col, ext in MEMBERS.items() if col in r and len(r[col])})
            sink.write(sample)
    return buf.getvalue()  # the writer leaves a stream it was given open


def batch_records(batch: dict[str, np.ndarray]) -> list[dict]:
    """The rows of a record batch as dicts of the writer's columns."""
    columns = [c for c in COLUMNS if c in batch]
    return [{c: batch[c][row] for c in columns} for row in range(len(batch["index"]))]


def stage_shard(out: str | Path | RemotePath, shards: ShardPlan, k: int, records: list[dict],
                categories: dict[int, str]) -> dict:
    """Write shard k's tar and index part under their staging names (``NAME.tmp``; on an object store the
    final names) and return its commit record (names, counts, sizes, sha256: a few hundred bytes).

    This is the worker side of a commit: it runs where the samples are (a Ray task on the node that holds
    them) and writes straight to the output filesystem; the driver then publishes and journals the record
    (:meth:`DatasetWriter.commit_staged`), the one point of truth. Same bytes as the driver-side writer."""
    out = location(out)
    tar, part = out / shards.tar(k), out / shards.part(k)
    start, stop = shards.bounds(k)
    if [int(r["index"]) for r in records] != list(range(start, stop)):
        raise RuntimeError(f"shard {shards.name(k)}: records are not its indices [{start}, {stop}) in order")
    tar_data = tar_bytes([r for r in records if bool(r["keep"])])
    part_data = parquet_bytes(index_table([index_row(r, tar.name, categories) for r in records]))
    try:
        write_file(staging(tar), tar_data)
        write_file(staging(part), part_data)
    except OSError:
        for path in (staging(tar), staging(part)):
            path.unlink(missing_ok=True)
        raise
    return commit_record(out, shards, k, [bool(r["keep"]) for r in records], [r["reject_reason"] for r in records],
                         {"tar": digest(tar_data), "part": digest(part_data)})


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def failpoint(name: str) -> None:
    """Fault injection for the tests: ``SYNTHGEN_FAILPOINT=<name>:<n>`` kills this process (SIGKILL)
    the n-th time it reaches ``name`` (points: before-rename, between-renames, after-rename, after-commit)."""
    spec = os.environ.get("SYNTHGEN_FAILPOINT")
    if not spec or spec.partition(":")[0] != name:
        return
    failpoint.hits = getattr(failpoint, "hits", 0) + 1  # type: ignore[attr-defined]
    if failpoint.hits >= int(spec.partition(":")[2] or 1):  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGKILL)


def storage_error(out: Path, e: OSError, doing: str) -> OutputError:
    """A one-line OutputError for a write that failed on the output filesystem."""
    return OutputError(f"output.dir: {failure(e)} while {doing} in {out}; committed shards are kept: fix the directory "
                       "(permissions, free space) and rerun the same command to resume")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict) or not node:
        return {prefix.rstrip("."): node}
    return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


_UNSET = object()  # a field one job records and the other leaves out


def spec_changes(old: dict, origin: Origin, limit: int = 3) -> list[str]:
    """What differs between a manifest's job and this one, as 'generation.steps: 20 → 25' (a field one side leaves
    out, as jobs do with options at their defaults: 'model.compile: unset → true'; resources, samples and
    locations left out), then the model's name and content."""
    def shown(value: Any) -> str:
        if value is _UNSET:
            return "unset"
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:39] + "…"

    before, now = _flat(old.get("job") or {}), _flat(origin.job)
    def differs(a: Any, b: Any) -> bool:  # unset vs off (null, false): an older job without the field, the same
        if a is _UNSET or b is _UNSET:
            other = b if a is _UNSET else a
            return other is not _UNSET and other is not None and other is not False
        return a != b

    keys = [*before, *(k for k in now if k not in before)]
    changes = [f"{k}: {shown(before.get(k, _UNSET))} → {shown(now.get(k, _UNSET))}" for k in keys
               if differs(before.get(k, _UNSET), now.get(k, _UNSET)) and not k.startswith(UNFINGERPRINTED)]
    model_before, model_now = old.get("model") or {}, origin.model
    if model_before.get("model") != model_now.get("model"):
        changes.append(f"model: {shown(model_before.get('model'))} → {shown(model_now.get('model'))}")
    elif model_before.get("id") != model_now.get("id"):
        changes.append(f"model: its files' content differs (id {str(model_before.get('id'))[:12]} → "
                       f"{str(model_now.get('id'))[:12]})")
    more = [f"and {len(changes) - limit} more"] if len(changes) > limit else []
    return changes[:limit] + more


@dataclass(frozen=True)
class Origin:
    """What made a dataset, as its manifest records it: the fingerprint a resume must match, the
    ``model`` entry, the ``job`` entry, and (for generated data) the torch threads of every stage that
    runs on the CPU, which a resume must keep (called only when resuming: it may import torch)."""

    fingerprint: str
    model: dict
    job: dict
    cpu_threads: Callable[[], Mapping[str, int]] = field(default=dict)
    #: the fingerprint an older synthgen gave this job with ``samples`` N (it covered the count); None: none
    earlier: Callable[[int], str] | None = None


class DatasetWriter:
    """Owns one output directory: checks it, resumes it, and commits shards as their samples arrive.

    ``out`` is the output dir, ``plan`` the shard plan, ``origin`` what the manifest records about the
    job. Constructing it checks the directory against the job (ownership, fingerprint, committed
    shards) and raises OutputError before anything is written; ``open()`` then cleans it and writes
    the manifest.
    """

    def __init__(self, out: str | Path, plan: ShardPlan, origin: Origin, overwrite: bool = False,
                 verify: bool = False, adopt: bool = False):
        self.origin = origin
        self.adopt = adopt
        self.out = location(out)  # a local Path, or a RemotePath for s3://... (pipeline/storage.py)
        self.plan = plan
        self.fingerprint = origin.fingerprint
        self.overwrite = overwrite
        self.replaced: dict | None = None  # our manifest (another spec's) that --overwrite replaces
        #: {"from": N, "to": M, "beyond": [...], "cut": [...]} when this run changes the dataset's sample count
        self.resized: dict | None = None
        self.manifest = self._check(origin.model)
        committed = {self.plan.shard_of(s["indices"][0]): s for s in self.manifest["shards"]}
        #: committed shards that failed verification: {name: problem}; they are generated again
        self.redo = check_shards(self.out, list(committed.values()), hashes=verify)
        self.committed = Commits(plan, {k: s for k, s in committed.items() if s["name"] not in self.redo})
        self.foreign: list[str] = []  # files in the directory that synthgen did not write (after open)
        self.buffers: dict[int, dict[int, dict]] = {}
        self.written = 0
        self.since_fold = 0  # commits since the manifest last absorbed the journal
        self.made: list[Path] = []
        if self.manifest["shards"] and len(self.committed) < self.plan.num_shards:
            self._check_threads(self.manifest)

    # --- opening ---------------------------------------------------------------------------
    def _check(self, model_identity: dict) -> dict:
        """The manifest to continue from (fresh or existing); raises OutputError on a conflict."""
        fresh = {
            "format": FORMAT, "fingerprint": self.fingerprint,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "job": self.origin.job, "model": model_identity, "versions": package_versions(),
            "layout": self._layout(), "shards": [], "counts": counts([]), "complete": False, "summary": None,
            "runs": [],
        }
        old, orphan = output_state(self.out)
        if orphan and not self.adopt:
            raise OutputError(f"output.dir: {self.out} holds synthgen shards but no {MANIFEST}; `synthgen repair JOB "
                              "--out DIR` rebuilds it from the shards that agree with the job")
        if old is None:
            return fresh
        if self._same_job(old) and not self.overwrite:
            return self._resize(old)
        if not self.overwrite and old["shards"]:
            raise OutputError(f"output.dir: {self.out} holds a dataset of a different job or spec ("
                              f"{'; '.join(spec_changes(old, self.origin)) or 'fingerprint differs'}); use another "
                              "output dir, or --overwrite to replace it")
        self.replaced = old  # --overwrite, or a dir that committed nothing yet: not a dataset, taken over
        return fresh

    def _layout(self) -> dict:
        return {"split": self.plan.split, "shard_size": self.plan.shard_size, "samples": self.plan.total,
                "num_shards": self.plan.num_shards, "members": list(MEMBERS.values())}

    def _same_job(self, old: dict) -> bool:
        """Whether ``old`` is this job's dataset, at any sample count: its fingerprint, or (a dataset an older
        synthgen wrote, whose fingerprint covered the count) the earlier one at its own count."""
        if old.get("fingerprint") == self.fingerprint:
            return True
        if self.origin.earlier is not None and old.get("fingerprint") == self.origin.earlier(old["layout"]["samples"]):
            old["fingerprint"] = self.fingerprint  # recorded as today's from the next manifest write on
            return True
        return False

    def _resize(self, old: dict) -> dict:
        """``old`` fitted to this plan's sample count. Sample i does not depend on the count, so committed shards
        whose indices this plan gives too are kept; a shard the new count cuts or extends (the last one) is
        generated again, and one past the new end leaves the dataset but stays on disk, reported, until
        --overwrite (raising the count again generates it anew, to the same bytes)."""
        before = ShardPlan.from_layout(old["layout"])
        if before.total == self.plan.total:
            return old
        keep, beyond, cut = [], [], []
        for s in old["shards"]:
            k = before.shard_of(s["indices"][0])
            if k >= self.plan.num_shards:
                beyond.append(s)
            elif s["indices"] != list(self.plan.bounds(k)):
                cut.append(s["name"])
            else:
                keep.append(s)
        self.resized = {"from": before.total, "to": self.plan.total, "cut": cut,
                        "beyond": [f for s in beyond for f in (s["tar"], s["part"])]}
        return dict(old, shards=keep, layout=self._layout(), job=dict(old["job"], samples=self.plan.total),
                    counts=counts(keep), complete=False)

    def resize_note(self) -> str:
        """One line on what a changed ``samples`` does to the dataset ('' when it did not change)."""
        r = self.resized
        if r is None:
            return ""
        way = "grows" if r["to"] > r["from"] else "shrinks"
        note = f"{way} from {r['from']} to {r['to']} samples; committed shards kept"
        if r["cut"]:
            note += f"; generated again at the new count: {', '.join(r['cut'])}"
        if r["beyond"]:
            shown = ", ".join(r["beyond"][:4]) + (f" and {len(r['beyond']) - 4} more" if len(r["beyond"]) > 4 else "")
            note += (f"; past the new end, left on disk and out of the dataset: {shown} (--overwrite deletes them "
                     "and generates the dataset anew)")
        return note

    def _check_threads(self, old: dict) -> None:
        """On CPU a stage's torch threads (``int(num_cpus)``) change float results, so a resume
        with other thread counts would mix bytes; resources are otherwise free to change."""
        threads = self.origin.cpu_threads()
        started = (old.get("job") or {}).get("resources") or {}
        for stage, res in started.items():
            if stage not in threads:
                continue
            before = max(1, int(res.get("num_cpus", 1)))
            now = threads[stage]
            if before != now:
                raise OutputError(
                    f"resources.{stage}.num_cpus: {self.out} was started with {before} torch thread(s) for "
                    f"{stage} on CPU (num_cpus {res.get('num_cpus'):g}) and this run would use {now}; results "
                    f"depend on the thread count, so resume with num_cpus {res.get('num_cpus'):g} (actors may "
                    "change) or use --overwrite")

    def open(self) -> list[int]:
        """Clean the directory (only files synthgen named), write the manifest; returns the pending shards."""
        #: what open() made that :meth:`abandon` may take away again: the dir itself, shards/, parts/
        self.made = [] if isinstance(self.out, RemotePath) else \
            [p for p in (self.out, self.out / "shards", self.out / "parts") if not p.exists()]
        try:
            if self.replaced is not None:
                self._remove(self.replaced)
            for sub in ("shards", "parts"):
                (self.out / sub).mkdir(parents=True, exist_ok=True)
            beyond = set((self.resized or {}).get("beyond", ()))  # ours, past a lowered count: reported as such
            self.foreign = [f for f in self._clean() if f not in beyond]
            job, now = self.manifest.get("job") or {}, (self.origin.job or {}).get("output") or {}
            if isinstance(job.get("output"), dict) and "index" in now:  # the last run's choice, which verify reads
                self.manifest["job"] = dict(job, output=dict(job["output"], index=now["index"]))
            self.manifest["running"] = {  # what `synthgen status` reports while the run goes on (None at its end)
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
                "pid": os.getpid(), "samples_at_start": self.counts()["indices"], "recoveries": 0}
            self._save_manifest()
        except OSError as e:
            raise storage_error(self.out, e, "preparing the output dir") from None
        return self.pending_shards()

    def note_recovery(self) -> None:
        """Record a recovery in the manifest (folding the journal in), where `synthgen status` reads it."""
        running = self.manifest.get("running") or {}
        running["recoveries"] = running.get("recoveries", 0) + 1
        self.manifest["running"] = running
        self._save_manifest()

    def abandon(self) -> None:
        """After a run that failed before committing any shard (a model that fails to load, a stage that fails
        on its first batch): leave the directory as open() found it, with no manifest, since no dataset was
        made. A dir with committed shards keeps everything (the rerun resumes)."""
        if self.committed or self.written or read_journal(self.out):  # the journal: a commit whose bookkeeping an
            return                                                      # interrupt cut short is a commit all the same
        (self.out / MANIFEST).unlink(missing_ok=True)
        for folder in reversed(self.made):
            try:
                folder.rmdir()  # only when empty: anything in it is someone's
            except OSError:
                pass

    def _remove(self, old: dict) -> None:
        """Delete what the replaced dataset's manifest and plan name (--overwrite), nothing else."""
        for s in old["shards"]:
            for rel in (s["tar"], s["part"]):
                (self.out / rel).unlink(missing_ok=True)
        self._remove_uncommitted(ShardPlan.from_layout(old["layout"]), set())
        for name in TOP_LEVEL:
            for path in (self.out / name, self.out / (name + ".tmp")):
                path.unlink(missing_ok=True)

    def _remove_uncommitted(self, plan: ShardPlan, keep: set[int]) -> list[str]:
        """Delete ``plan``'s shard files (and temp files) in shards/ and parts/ except shards ``keep``;
        returns the other files found there."""
        others = []
        for sub, ext in (("shards", ".tar"), ("parts", ".parquet")):
            folder = self.out / sub
            for path in sorted(folder.iterdir()) if folder.is_dir() else ():
                k = plan.shard_of_file(path.name)
                if k is None or not path.name.removesuffix(".tmp").endswith(ext) or not path.is_file():
                    others.append(f"{sub}/{path.name}")
                elif k not in keep or path.name.endswith(".tmp"):
                    path.unlink()  # an uncommitted or failed shard of the plan: generated again
        return others

    def _clean(self) -> list[str]:
        """Remove uncommitted files of this plan and our temp files; returns the files we do not own."""
        foreign = self._remove_uncommitted(self.plan, set(self.committed))
        for path in sorted(self.out.iterdir()):
            if path.name in TOP_LEVEL or (path.name in ("shards", "parts") and path.is_dir()):
                continue
            if path.name.removesuffix(".tmp") in TOP_LEVEL:
                path.unlink()  # an atomic write of ours cut short
            else:
                foreign.append(path.name)
        return sorted(foreign)

    def pending_shards(self) -> np.ndarray:
        """Shard numbers not committed, ascending (int64: 8 bytes a shard, whatever the job's size)."""
        pending = np.ones(self.plan.num_shards, dtype=bool)
        pending[np.fromiter(self.committed, dtype=np.int64, count=len(self.committed))] = False
        return np.flatnonzero(pending).astype(np.int64)

    # --- writing ---------------------------------------------------------------------------
    def add(self, batch: dict[str, np.ndarray]) -> list[str]:
        """Buffer a batch of records; commit every shard whose indices have all arrived.

        Returns the names of the shards committed by this call.
        """
        committed = []
        columns = [c for c in COLUMNS if c in batch]
        for row in range(len(batch["index"])):
            rec = {c: batch[c][row] for c in columns}
            index = int(rec["index"])
            k = self.plan.shard_of(index)
            if not 0 <= index < self.plan.total or k in self.committed:
                raise RuntimeError(f"record index {index} is outside the pending shards")
            shard = self.buffers.setdefault(k, {})
            if index in shard:
                raise RuntimeError(f"record index {index} arrived twice")
            shard[index] = rec
            start, stop = self.plan.bounds(k)
            if len(shard) == stop - start:
                self._commit(k, [shard[i] for i in range(start, stop)])
                del self.buffers[k]
                committed.append(self.plan.name(k))
        return committed

    def _commit(self, k: int, records: list[dict]) -> None:
        tar, part = self.out / self.plan.tar(k), self.out / self.plan.part(k)
        tmp_tar, tmp_part = staging(tar), staging(part)  # NAME.tmp; an object store: the name itself
        kept = [r for r in records if bool(r["keep"])]
        try:
            written = {"tar": self._write_tar(tmp_tar, kept), "part": self._write_part(tmp_part, records, tar.name)}
        except OSError as e:
            for path in (tmp_tar, tmp_part):
                path.unlink(missing_ok=True)
            raise storage_error(self.out, e, f"writing {self.plan.tar(k)}") from None
        self._publish(k, lambda: commit_record(self.out, self.plan, k, [bool(r["keep"]) for r in records],
                                               [r["reject_reason"] for r in records],
                                               {n: d for n, d in written.items() if d}))

    @property
    def categories(self) -> dict[int, str]:
        """COCO category id -> class name, as the index parts record them (for :func:`stage_shard`)."""
        return category_names(self.manifest.get("job") or {})

    @property
    def shared_location(self) -> str:
        """The output dir as workers open it: its URI (no secrets: a URI with them is refused) or path."""
        return str(self.out)

    def commit_staged(self, k: int, record: dict) -> None:
        """Commit shard k whose files a worker wrote under their staging names (:func:`stage_shard`)."""
        if k in self.committed or k in self.buffers or record.get("name") != self.plan.name(k):
            raise RuntimeError(f"shard {self.plan.name(k)} is not pending or its record is another shard's")
        self._publish(k, lambda: record)

    def _publish(self, k: int, record_of: Callable[[], dict]) -> None:
        """Rename shard k's staged tar and part into place (nothing to do on an object store) and append its
        commit record to the journal: the commit point."""
        tar, part = self.out / self.plan.tar(k), self.out / self.plan.part(k)
        tmp_tar, tmp_part = staging(tar), staging(part)
        try:
            failpoint("before-rename")
            publish(tmp_tar, tar)
            failpoint("between-renames")
            publish(tmp_part, part)
            failpoint("after-rename")
            record = record_of()
            append_commit(self.out, record)
            self.since_fold += 1
            fold = max(JOURNAL_FOLD, math.isqrt(2 * len(self.committed)))
            if isinstance(self.out, RemotePath) and self.since_fold >= fold:
                self._save_manifest()  # the journal object is rewritten whole on each commit: keep it short
        except OSError as e:
            for path in (tmp_tar, tmp_part):
                if path != tar and path != part:
                    path.unlink(missing_ok=True)
            raise storage_error(self.out, e, f"writing {self.plan.tar(k)}") from None
        self.committed[k] = record
        self.written += 1
        failpoint("after-commit")

    @staticmethod
    def _write_tar(path: Path | RemotePath, kept: list[dict]) -> dict:
        """Write the shard's tar (its kept samples, in index order); returns its size and sha256."""
        data = tar_bytes(kept)
        write_file(path, data)
        return digest(data)

    def _write_part(self, path: Path | RemotePath, records: list[dict], shard: str) -> dict:
        categories = category_names(self.manifest.get("job") or {})
        table = index_table([index_row(r, shard, categories) for r in records])
        data = parquet_bytes(table)
        write_file(path, data)
        return digest(data)

    def counts(self) -> dict[str, Any]:
        return counts(list(self.committed.values()))

    def _save_manifest(self) -> None:
        """Fold the committed shards into manifest.json (atomic), then drop the journal they were in."""
        self.manifest["shards"] = [self.committed[k] for k in sorted(self.committed)]
        self.manifest["counts"] = self.counts()
        self.manifest["complete"] = len(self.committed) == self.plan.num_shards
        write_atomic(self.out / MANIFEST, (json.dumps(self.manifest, indent=1) + "\n").encode())
        (self.out / JOURNAL).unlink(missing_ok=True)
        self.since_fold = 0

    # --- finishing -------------------------------------------------------------------------
    def finish(self, summary: dict[str, Any]) -> None:
        """Write index.parquet from the committed parts (when it changed and ``output.index`` asks for it;
        else ``parts/`` alone is the index) and record the run summary
        (``runs`` lists every run; ``summary`` is the last one that generated samples)."""
        if self.buffers:
            raise RuntimeError(f"shards {sorted(self.plan.name(k) for k in self.buffers)} are incomplete")
        try:
            wanted = ((self.origin.job or {}).get("output") or {}).get("index", True)  # this run's job decides
            if wanted and (self.written or self.redo or self.resized or not (self.out / INDEX).is_file() or
                           index_version(self.out / INDEX) != INDEX_VERSION):  # a version-1 index is rewritten typed
                parts = [self.plan.part(k) for k in sorted(self.committed)]
                try:  # streamed: the index of 10^8 rows is never in memory
                    write_parquet(index_tables(self.out, parts), self.out / INDEX, INDEX_SCHEMA)
                except pa.ArrowException:  # a version-1 part among them: converted one by one
                    write_parquet((read_index(self.out / part) for part in parts), self.out / INDEX, INDEX_SCHEMA)
            if summary.get("processed") or self.manifest.get("summary") is None:
                self.manifest["summary"] = summary  # a no-op rerun keeps the last run that generated
            self.manifest["runs"].append(summary)
            self.manifest["running"] = None
            self._save_manifest()
        except OSError as e:
            raise storage_error(self.out, e, f"writing {INDEX}") from None
