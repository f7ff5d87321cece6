"""Shard writer: WebDataset tars over fixed index ranges, per-shard Parquet parts, a manifest, resume.

Layout of an output directory::

  OUT/manifest.json                 job spec, fingerprint, model identity, versions, shard list, counts
  OUT/shards/{split}-{k:06d}.tar    samples with index in [k*S, (k+1)*S) that were kept, in index order
  OUT/parts/{split}-{k:06d}.parquet one row per index of shard k, kept or rejected
  OUT/index.parquet                 all parts concatenated (written when a run ends)

Commit protocol of shard k: write the tar and the part under ``*.tmp`` names (fsync), ``os.replace``
both, then rewrite the manifest (tmp + replace) with the shard's sha256 and counts. The manifest entry
is the commit marker: on start, tmp files and shard files the manifest does not list are deleted, and
only shards it does not list are generated again. Tars have a fixed mtime and their members are in
index order, so a resumed run writes byte-identical shards.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from .spec import JobSpec, UsageError

MANIFEST = "manifest.json"
INDEX = "index.parquet"
FORMAT = "synthgen-dataset/1"
TAR_MTIME = 946684800  # 2000-01-01: fixed member mtime, so equal content gives an equal sha256
#: record column -> tar member extension (``{key}.{ext}``); empty bytes mean "not produced"
MEMBERS = {"jpg": "jpg", "seg_png": "seg.png", "json": "json", "cls": "cls"}
#: record columns the writer needs (everything else can be dropped before the driver)
COLUMNS = ("key", "index", "seed", "prompt", "class_names", "scores", "curriculum", "keep", "reject_reason",
           *MEMBERS)
INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("index", pa.int64()), ("shard", pa.string()), ("seed", pa.int64()),
    ("prompt", pa.string()), ("classes", pa.list_(pa.string())), ("keep", pa.bool_()),
    ("reject_reason", pa.string()), ("scores", pa.string()), ("curriculum", pa.string()),
])
VERSIONS = ("synthgen", "torch", "diffusers", "transformers", "ray", "webdataset", "pycocotools", "pyarrow",
            "numpy", "pillow", "pydantic")


class OutputError(UsageError):
    """The output directory cannot be used for this job (one-line message)."""


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via ``path.tmp`` + fsync + os.replace."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(out: Path) -> dict:
    path = Path(out) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OutputError(f"{out}: no {MANIFEST}; not a synthgen output directory") from None
    except json.JSONDecodeError as e:
        raise OutputError(f"{path}: corrupt manifest ({e})") from None


@dataclass(frozen=True)
class ShardPlan:
    """Shard k holds the indices [k*shard_size, min((k+1)*shard_size, total))."""

    split: str
    shard_size: int
    total: int

    @property
    def num_shards(self) -> int:
        return -(-self.total // self.shard_size)

    def name(self, k: int) -> str:
        return f"{self.split}-{k:06d}"

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.total)


class DatasetWriter:
    """Owns one output directory: checks it, resumes it, and commits shards as their samples arrive.

    Constructing it checks the directory against the job (fingerprint) and raises OutputError
    before anything is written; ``open()`` then creates/cleans it.
    """

    def __init__(self, spec: JobSpec, fingerprint: str, model_identity: dict, overwrite: bool = False):
        self.spec = spec
        self.out = Path(spec.output.dir)
        self.plan = ShardPlan(spec.output.split, spec.output.shard_size, spec.samples)
        self.fingerprint = fingerprint
        self.overwrite = overwrite
        self.manifest = self._check(model_identity)
        self.buffers: dict[int, dict[int, dict]] = {}

    # --- opening ---------------------------------------------------------------------------
    def _check(self, model_identity: dict) -> dict:
        """The manifest to continue from (fresh or existing); raises OutputError on a conflict."""
        fresh = {
            "format": FORMAT, "fingerprint": self.fingerprint,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "job": self.spec.model_dump(mode="json"), "model": model_identity, "versions": package_versions(),
            "layout": {"split": self.plan.split, "shard_size": self.plan.shard_size, "samples": self.plan.total,
                       "num_shards": self.plan.num_shards, "members": list(MEMBERS.values())},
            "shards": [], "counts": {}, "complete": False, "summary": None, "runs": [],
        }
        if not self.out.exists() or not any(self.out.iterdir()):
            return fresh
        if not (self.out / MANIFEST).is_file():
            raise OutputError(f"output.dir: {self.out} is not empty and is not a synthgen output "
                              "(no manifest.json); choose a new or empty directory")
        old = read_manifest(self.out)
        if old.get("fingerprint") == self.fingerprint and not self.overwrite:
            self._check_threads(old)
            return old
        if not self.overwrite:
            raise OutputError(f"output.dir: {self.out} holds a dataset of a different job or spec "
                              f"(fingerprint {str(old.get('fingerprint'))[:12]} != {self.fingerprint[:12]}); "
                              "use another output dir or --overwrite to replace it")
        return fresh

    def _check_threads(self, old: dict) -> None:
        """On CPU a stage's torch threads (``int(num_cpus)``) change float results, so a resume
        with other thread counts would mix bytes; resources are otherwise free to change."""
        model = getattr(self.spec, "model", None)  # import-coco's real datasets have no model
        if model is None or not model.device.startswith("cpu"):
            return
        started = (old.get("job") or {}).get("resources") or {}
        for stage, res in started.items():
            before = max(1, int(res.get("num_cpus", 1)))
            now = max(1, int(self.spec.resources.for_stage(stage).num_cpus))
            if before != now:
                raise OutputError(
                    f"resources.{stage}.num_cpus: {self.out} was started with {before} torch thread(s) for "
                    f"{stage} on CPU (num_cpus {res.get('num_cpus'):g}) and this run would use {now}; results "
                    f"depend on the thread count, so resume with num_cpus {res.get('num_cpus'):g} (actors may "
                    "change) or use --overwrite")

    def open(self) -> list[int]:
        """Create or clean the directory and write the manifest; returns the pending shard numbers."""
        if self.overwrite:
            for name in ("shards", "parts"):
                shutil.rmtree(self.out / name, ignore_errors=True)
            for name in (MANIFEST, INDEX, "annotations.json"):
                (self.out / name).unlink(missing_ok=True)
        for sub in ("shards", "parts"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        done = self.complete_names()
        for path in self.out.glob("*.tmp"):
            path.unlink()
        for sub, suffix in (("shards", ".tar"), ("parts", ".parquet")):
            for path in (self.out / sub).iterdir():
                if path.name.endswith(".tmp") or path.name.removesuffix(suffix) not in done:
                    path.unlink()  # stray temp file or an uncommitted shard: regenerated
        self._save_manifest()
        return self.pending_shards()

    def complete_names(self) -> set[str]:
        return {s["name"] for s in self.manifest["shards"]}

    def pending_shards(self) -> list[int]:
        done = self.complete_names()
        return [k for k in range(self.plan.num_shards) if self.plan.name(k) not in done]

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
            k = index // self.plan.shard_size
            if not 0 <= index < self.plan.total or self.plan.name(k) in self.complete_names():
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
        name = self.plan.name(k)
        tar = self.out / "shards" / f"{name}.tar"
        part = self.out / "parts" / f"{name}.parquet"
        kept = [r for r in records if bool(r["keep"])]
        tmp_tar = tar.with_name(tar.name + ".tmp")
        with open(tmp_tar, "wb") as f:
            with wds.TarWriter(f, encoder=False, mtime=TAR_MTIME) as sink:
                for r in kept:
                    sample = {"__key__": str(r["key"])}
                    sample.update({ext: bytes(r[col]) for col, ext in MEMBERS.items() if col in r and len(r[col])})
                    sink.write(sample)
            f.flush()
            os.fsync(f.fileno())
        table = pa.table({
            "key": [str(r["key"]) for r in records], "index": [int(r["index"]) for r in records],
            "shard": [f"{name}.tar"] * len(records), "seed": [int(r["seed"]) for r in records],
            "prompt": [str(r["prompt"]) for r in records],
            "classes": [json.loads(str(r["class_names"])) for r in records],
            "keep": [bool(r["keep"]) for r in records],
            "reject_reason": [str(r["reject_reason"]) for r in records],
            "scores": [str(r["scores"]) for r in records], "curriculum": [str(r["curriculum"]) for r in records],
        }, schema=INDEX_SCHEMA)
        tmp_part = part.with_name(part.name + ".tmp")
        pq.write_table(table, tmp_part)
        os.replace(tmp_tar, tar)
        os.replace(tmp_part, part)
        start, stop = self.plan.bounds(k)
        reasons = Counter(str(r["reject_reason"]) for r in records if not bool(r["keep"]))
        self.manifest["shards"].append({
            "name": name, "tar": f"shards/{name}.tar", "part": f"parts/{name}.parquet",
            "indices": [start, stop], "samples": len(kept), "rejected": len(records) - len(kept),
            "rejected_by_reason": dict(sorted(reasons.items())), "bytes": tar.stat().st_size,
            "sha256": sha256_file(tar),
        })
        self.manifest["shards"].sort(key=lambda s: s["name"])
        self._save_manifest()

    def _save_manifest(self) -> None:
        shards = self.manifest["shards"]
        reasons: Counter = Counter()
        for s in shards:
            reasons.update(s["rejected_by_reason"])
        kept = sum(s["samples"] for s in shards)
        self.manifest["counts"] = {
            "shards": len(shards), "indices": kept + sum(reasons.values()), "samples": kept,
            "rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items())),
        }
        self.manifest["complete"] = len(shards) == self.plan.num_shards
        write_atomic(self.out / MANIFEST, (json.dumps(self.manifest, indent=1) + "\n").encode())

    # --- finishing -------------------------------------------------------------------------
    def finish(self, summary: dict[str, Any]) -> None:
        """Write index.parquet from the committed parts and record the run summary."""
        if self.buffers:
            raise RuntimeError(f"shards {sorted(self.plan.name(k) for k in self.buffers)} are incomplete")
        parts = [pq.read_table(self.out / s["part"], schema=INDEX_SCHEMA) for s in self.manifest["shards"]]
        table = pa.concat_tables(parts) if parts else INDEX_SCHEMA.empty_table()
        tmp = self.out / (INDEX + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.out / INDEX)
        self.manifest["summary"] = summary
        self.manifest["runs"].append(summary)
        self._save_manifest()
