"""The on-disk dataset format: names, index schema, manifest + commit journal, atomic writes, hashes.

Layout of an output directory::

  OUT/manifest.json                 format, job spec, fingerprint, model identity, versions, shard list, counts
  OUT/commits.jsonl                 commit records appended during a run (folded into the manifest at its end)
  OUT/shards/{split}-{k:06d}.tar    samples with index in [k*S, (k+1)*S) that were kept, in index order
  OUT/parts/{split}-{k:06d}.parquet one row per index of shard k, kept or rejected
  OUT/index.parquet                 all parts concatenated (written when a run ends)
  OUT/annotations.json              COCO export (``synthgen export-coco``)

A shard is committed when its record (name, bytes and sha256 of tar and part, counts) is a whole
line of ``commits.jsonl`` or an entry of the manifest's ``shards``: appending one line per shard
keeps a commit O(1) whatever the number of shards; the manifest is rewritten (atomically) only when
a run opens and when it finishes. Readers see both through :func:`read_manifest`.

A directory is ours only if its ``manifest.json`` carries our ``format`` value; only the files
that a manifest or a job's shard plan names are ever deleted (never by pattern).

Names come from the plan; a manifest or journal only confirms them (:func:`check_records`). A manifest is
user-editable input and a downloaded dataset is someone else's, so every shard record read is checked
against the plan its ``layout`` gives (name, tar, part, indices, counts, sizes) and, on a local disk,
``shards/`` and ``parts/`` and every named file must resolve (links followed) inside the output dir. A
record that fails makes the directory :class:`TamperedError`: nothing in it is deleted or read.

Must not: import Ray, torch or stage code.
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa

from stages.identity import sha256_file  # noqa: F401 - re-exported (tests, verify)

from . import storage
from .plan import MAX_SHARDS, ShardPlan
from .storage import OutputError, RemotePath, location

FORMAT = "synthgen-dataset/1"
MANIFEST = "manifest.json"
JOURNAL = "commits.jsonl"
INDEX = "index.parquet"
ANNOTATIONS = "annotations.json"
#: files directly in OUT that belong to the format (besides shards/ and parts/)
TOP_LEVEL = (MANIFEST, JOURNAL, INDEX, ANNOTATIONS)
TAR_MTIME = 946684800  # 2000-01-01: fixed member mtime, so equal content gives an equal sha256
#: record column -> tar member extension (``{key}.{ext}``); empty bytes mean "not produced"
MEMBERS = {"jpg": "jpg", "seg_png": "seg.png", "json": "json", "cls": "cls"}
#: index.parquet / parts schema version (schema metadata ``synthgen.index``). Version 1 (outputs of the
#: same FORMAT written before it) held ``scores`` and ``curriculum`` as JSON strings and had no
#: ``instances``: :func:`read_index` converts such a file on read, so every reader sees INDEX_SCHEMA, and
#: rerunning the job rewrites index.parquet typed (committed parts stay as they are; instances null).
INDEX_VERSION = "2"
#: Structs have a fixed field set. ``other`` holds the record's keys a struct does not list (a JSON
#: object, null when there are none): a stage that adds a key loses nothing until it is typed here.
PER_CLASS = pa.struct([
    ("name", pa.string()), ("category_id", pa.int64()), ("peak", pa.float64()), ("contrast", pa.float64()),
    ("area_fraction", pa.float64()), ("n_components", pa.int64()), ("n_instances", pa.int64()),
    ("n_prompted", pa.int64()), ("other", pa.string())])
#: the record's ``scores`` (labels and filters stages); null when it has none (import-coco's real images)
SCORES = pa.struct([
    ("min_contrast", pa.float64()), ("ignore_fraction", pa.float64()), ("n_instances", pa.int64()),
    ("n_prompted", pa.int64()), ("phash", pa.string()), ("per_class", pa.list_(PER_CLASS)), ("other", pa.string())])
#: the record's ``curriculum`` (sampling's variations, import-coco's real images); null when empty (text-to-image)
CURRICULUM = pa.struct([
    ("source", pa.string()), ("level", pa.int64()), ("strength", pa.float64()), ("image_guidance", pa.float64()),
    ("difficulty", pa.float64()), ("group_id", pa.string()), ("other", pa.string())])
#: annotated instances per class, by category id: every class the prompt names (count 0 when none was
#: found) and every class with an annotation; null when the record holds no annotations
INSTANCES = pa.list_(pa.struct([("name", pa.string()), ("category_id", pa.int64()), ("count", pa.int64())]))
INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("index", pa.int64()), ("shard", pa.string()), ("seed", pa.int64()),
    ("prompt", pa.string()), ("classes", pa.list_(pa.string())), ("keep", pa.bool_()),
    ("reject_reason", pa.string()), ("scores", SCORES), ("curriculum", CURRICULUM), ("instances", INSTANCES),
], metadata={"synthgen.index": INDEX_VERSION})


# --- index rows -------------------------------------------------------------------------------
def category_names(job: dict) -> dict[int, str]:
    """COCO category id -> class name of a manifest's ``job`` (id = 1 + position in its classes)."""
    return {i + 1: c["name"] if isinstance(c, dict) else str(c) for i, c in enumerate(job.get("classes") or [])}


def _parsed(value: Any) -> Any:
    """A record column's JSON text (str or bytes) parsed; None for an empty string."""
    text = value.decode() if isinstance(value, bytes) else str(value)
    return json.loads(text) if text else None


@functools.lru_cache(maxsize=None)
def _struct_fields(type_: pa.DataType) -> dict[str, pa.DataType]:
    return {type_.field(i).name: type_.field(i).type for i in range(type_.num_fields)}


def typed(value: Any, type_: pa.DataType, where: str = "value") -> Any:
    """Parsed JSON shaped for ``type_`` (None stays None): a struct takes the keys it lists, the rest go
    to its ``other`` field as a JSON object; pyarrow then checks the scalar types."""
    if value is None:
        return None
    if pa.types.is_struct(type_):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a JSON object, got {value!r}")
        fields = _struct_fields(type_)
        out = {n: typed(value.get(n), t, f"{where}.{n}") for n, t in fields.items() if n != "other"}
        if "other" in fields:
            rest = {k: v for k, v in value.items() if k not in out}
            out["other"] = json.dumps(rest, sort_keys=True, separators=(",", ":")) if rest else None
        return out
    if pa.types.is_list(type_):
        return [typed(v, type_.value_type, f"{where}[]") for v in value]
    return value


def instance_counts(class_names: list[str], annotations: list[dict] | None,
                    categories: dict[int, str]) -> list[dict] | None:
    """INSTANCES of a record: annotations per category id, prompted classes included with count 0."""
    if annotations is None:
        return None
    ids = {name: cid for cid, name in categories.items()}
    found = Counter(int(a["category_id"]) for a in annotations)
    cids = sorted(set(found) | {ids[n] for n in class_names if n in ids})
    return [{"name": categories.get(c), "category_id": c, "count": found.get(c, 0)} for c in cids]


def index_row(rec: dict, shard: str, categories: dict[int, str]) -> dict:
    """One INDEX_SCHEMA row of a record as the writer holds it (JSON text columns, numpy scalars, the
    ``json`` member's bytes: instance counts come from its annotations, or an ``annotations`` column)."""
    classes = _parsed(rec["class_names"]) or []
    if "annotations" in rec:
        annotations = _parsed(rec["annotations"])
    else:
        member = _parsed(rec["json"]) if "json" in rec and len(rec["json"]) else None
        annotations = member.get("annotations") if isinstance(member, dict) else None
    return {"key": str(rec["key"]), "index": int(rec["index"]), "shard": shard, "seed": int(rec["seed"]),
            "prompt": str(rec["prompt"]), "classes": classes, "keep": bool(rec["keep"]),
            "reject_reason": str(rec["reject_reason"]),
            "scores": typed(_parsed(rec["scores"]) or None, SCORES, "scores"),
            "curriculum": typed(_parsed(rec["curriculum"]) or None, CURRICULUM, "curriculum"),
            "instances": instance_counts(classes, annotations, categories)}


def index_table(rows: list[dict]) -> pa.Table:
    """INDEX_SCHEMA table of :func:`index_row` rows."""
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)


def index_version(source: Any) -> str:
    """The INDEX_VERSION an index.parquet or part was written with ("1": before the typed columns)."""
    import pyarrow.parquet as pq

    if isinstance(source, RemotePath):
        with source.open("rb") as f:
            return index_version(f)
    return (pq.read_schema(source).metadata or {}).get(b"synthgen.index", b"1").decode()


def read_index(source: Any, columns: list[str] | None = None) -> pa.Table:
    """An index.parquet or part (path or file) as INDEX_SCHEMA, only ``columns`` if given. A version-1
    file (``scores`` / ``curriculum`` as JSON strings) is converted; its ``instances`` are null (version 1
    did not record them; the shards' records hold the annotations)."""
    import pyarrow.parquet as pq

    if isinstance(source, RemotePath):  # an object: ranged reads through its filesystem
        with source.open("rb") as f:
            return read_index(f, columns)
    names = list(columns or INDEX_SCHEMA.names)
    found = pq.read_schema(source).names
    missing = [c for c in names if c not in found and c != "instances"]
    if missing:
        raise OutputError(f"{source}: not a synthgen index, columns {missing} are missing")
    table = pq.read_table(source, columns=[c for c in names if c in found])
    arrays = []
    for name in names:
        target = INDEX_SCHEMA.field(name).type
        if name not in found:
            arrays.append(pa.nulls(table.num_rows, target))
            continue
        column = table.column(name)
        if pa.types.is_struct(target) and pa.types.is_string(column.type):  # version 1: JSON text
            column = pa.array([typed(_parsed(v) or None, target, name) if v else None for v in column.to_pylist()],
                              target)
        arrays.append(column.cast(target))
    return pa.Table.from_arrays(arrays, schema=pa.schema([INDEX_SCHEMA.field(n) for n in names],
                                                         metadata=INDEX_SCHEMA.metadata))


#: rows per row group of index.parquet when it is written from the parts
INDEX_ROW_GROUP = 65536


def _parts_dataset(out: Path | RemotePath, parts: list[str]):
    """The index parts ``parts`` (paths relative to ``out``) as one pyarrow dataset of INDEX_SCHEMA, in order."""
    import pyarrow.dataset as pds

    out = location(out)
    if isinstance(out, RemotePath):
        return pds.dataset([(out / p).path for p in parts], schema=INDEX_SCHEMA, format="parquet", filesystem=out.fs)
    return pds.dataset([str(out / p) for p in parts], schema=INDEX_SCHEMA, format="parquet")


def index_tables(out: Path | RemotePath, parts: list[str]) -> Iterator[pa.Table]:
    """The rows of the index parts ``parts``, in order, as tables of about INDEX_ROW_GROUP rows: read by pyarrow's
    threaded scanner, never all at once (an index of 10^8 rows is written from 10^5 parts this way). Raises
    pyarrow's error on a version-1 part (JSON text columns): :func:`read_index` converts those one by one."""
    batches: list = []
    rows = 0
    for batch in _parts_dataset(out, parts).to_batches(batch_size=INDEX_ROW_GROUP):
        batches.append(batch)
        rows += batch.num_rows
        if rows >= INDEX_ROW_GROUP:
            yield pa.Table.from_batches(batches, INDEX_SCHEMA)
            batches, rows = [], 0
    if batches:
        yield pa.Table.from_batches(batches, INDEX_SCHEMA)


def read_dataset_index(out: Path | RemotePath, manifest: dict, columns: list[str] | None = None) -> pa.Table:
    """The index of a dataset as one table (only ``columns``): its index.parquet where the run wrote one, else
    its committed parts read as one Parquet dataset (``output.index: false``: parts/ is the index)."""
    out = location(out)
    if (out / INDEX).is_file():
        return read_index(out / INDEX, columns)
    parts = [s["part"] for s in manifest["shards"]]
    if not parts:
        return INDEX_SCHEMA.empty_table().select(columns or INDEX_SCHEMA.names)
    return _parts_dataset(out, parts).to_table(columns=columns)


def write_atomic(path: Path | RemotePath, data: bytes) -> None:
    """Write ``data`` to ``path`` all at once: ``path.tmp`` + fsync + os.replace; on an object store one PUT."""
    storage.write_atomic(location(path), data)


# --- commit journal ---------------------------------------------------------------------------
def append_commit(out: Path, record: dict) -> None:
    """Append one shard's commit record as a line of the journal (fsync'd: the commit point)."""
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    storage.append_durable(location(out) / JOURNAL, line)


def read_journal(out: Path) -> list[dict]:
    """The whole commit records of the journal; a line cut short by a kill is not a commit."""
    try:
        data = (location(out) / JOURNAL).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in data.split(b"\n")[:-1]:  # the text after the last newline was never committed
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def commit_record(out: Path | RemotePath, plan: Any, k: int, keep: list[bool], reasons: list[str],
                  written: dict[str, dict] | None = None) -> dict[str, Any]:
    """Shard k's commit record: where its files are, its indices, kept / rejected counts (``reasons[i]``
    of each index not kept), and the sizes and sha256 of its tar and part as they are on disk now."""
    tar, part = location(out) / plan.tar(k), location(out) / plan.part(k)
    written = written or {}  # {"tar": storage.digest(bytes), "part": ...} of files just written: not read back
    tar_d = written.get("tar") or {"bytes": tar.stat().st_size, "sha256": storage.sha256(tar)}
    part_d = written.get("part") or {"bytes": part.stat().st_size, "sha256": storage.sha256(part)}
    rejected = [str(r) for r, kept in zip(reasons, keep) if not kept]
    return {"name": plan.name(k), "tar": plan.tar(k), "part": plan.part(k), "indices": list(plan.bounds(k)),
            "samples": sum(map(bool, keep)), "rejected": len(rejected),
            "rejected_by_reason": {r: rejected.count(r) for r in sorted(set(rejected))},
            "bytes": tar_d["bytes"], "sha256": tar_d["sha256"],
            "part_bytes": part_d["bytes"], "part_sha256": part_d["sha256"]}


class Commits(MutableMapping):
    """Committed shard records by shard number, held compactly: the plan gives name, tar, part and indices
    (records are checked to match it), so only the rest is kept, as JSON bytes (~0.3 KB a shard instead of
    ~2 KB as a dict: a driver committing 10^5 shards stays flat). Reading a record rebuilds it whole."""

    DERIVED = ("name", "tar", "part", "indices")

    def __init__(self, plan: ShardPlan, records: Any = ()):
        self.plan = plan
        self._data: dict[int, bytes] = {}
        self.update(records)

    def __setitem__(self, k: int, record: dict) -> None:
        rest = {f: v for f, v in record.items() if f not in self.DERIVED}
        self._data[k] = json.dumps(rest, separators=(",", ":")).encode()

    def __getitem__(self, k: int) -> dict:
        start, stop = self.plan.bounds(k)
        return {"name": self.plan.name(k), "tar": self.plan.tar(k), "part": self.plan.part(k),
                "indices": [start, stop], **json.loads(self._data[k])}

    def __delitem__(self, k: int) -> None:
        del self._data[k]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, k: object) -> bool:
        return k in self._data


def counts(shards: list[dict]) -> dict[str, Any]:
    """The manifest's ``counts`` of a list of committed shard records."""
    reasons: Counter = Counter()
    for s in shards:
        reasons.update(s["rejected_by_reason"])
    kept = sum(s["samples"] for s in shards)
    return {"shards": len(shards), "indices": kept + sum(reasons.values()), "samples": kept,
            "rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items()))}


def merge_commits(manifest: dict, records: list[dict]) -> dict:
    """``manifest`` with the journal's records added to its shards (by name), counts and completeness updated."""
    if not records:
        return manifest
    shards = {s["name"]: s for s in manifest["shards"]}
    shards.update((r["name"], r) for r in records)
    merged = dict(manifest, shards=[shards[n] for n in sorted(shards)])
    merged["counts"] = counts(merged["shards"])
    merged["complete"] = len(merged["shards"]) == merged["layout"]["num_shards"]
    return merged


# --- names read from disk ---------------------------------------------------------------------
class TamperedError(OutputError):
    """A manifest or journal entry that the plan does not give: the directory was edited or damaged."""


_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_BYTES = 2 ** 62  # a size past this is no file of ours (and would overflow int64 columns)


def _count(value: Any, limit: int) -> bool:
    return type(value) is int and 0 <= value <= limit


def layout_plan(layout: Any) -> ShardPlan:
    """The ShardPlan a manifest's ``layout`` records; TamperedError when it is not one synthgen writes."""
    ok = isinstance(layout, dict) and isinstance(layout.get("split"), str) \
        and re.fullmatch(r"[a-z0-9]+", layout["split"]) is not None \
        and _count(layout.get("shard_size"), _MAX_BYTES) and layout["shard_size"] >= 1 \
        and _count(layout.get("samples"), MAX_SHARDS * layout["shard_size"]) and layout["samples"] >= 1
    plan = ShardPlan.from_layout(layout) if ok else None
    if plan is None or layout.get("num_shards") != plan.num_shards:
        raise TamperedError(f"{MANIFEST}: layout {json.dumps(layout)[:120]} is not a shard plan synthgen writes "
                            f"(a split name, shard_size and samples within {MAX_SHARDS} shards, num_shards = "
                            "ceil(samples / shard_size))")
    return plan


def _record_problem(plan: ShardPlan, r: Any) -> str:
    """'' when ``r`` is the commit record of a shard of ``plan`` as synthgen writes it, else what is not
    (a few microseconds a record: a manifest of 10^5 shards is checked in well under a second)."""
    name = r.get("name") if isinstance(r, dict) else None
    if not isinstance(name, str):
        return "is not a shard record"
    prefix, _, digits = name.rpartition("-")
    k = int(digits) if prefix == plan.split and digits.isascii() and digits.isdigit() else -1
    if not 0 <= k < plan.num_shards or name != plan.name(k):
        return f"names shard {name!r}, which is not one of the plan's {plan.num_shards} {plan.split!r} shards"
    start, stop = plan.bounds(k)
    size = stop - start
    for field, want in (("tar", f"shards/{name}.tar"), ("part", f"parts/{name}.parquet"), ("indices", [start, stop])):
        if r.get(field) != want:
            return f"has {field} {json.dumps(r.get(field))[:80]}, not {json.dumps(want)} (the plan's for {name})"
    reasons, samples, rejected = r.get("rejected_by_reason"), r.get("samples"), r.get("rejected")
    if not (_count(samples, size) and _count(rejected, size) and samples + rejected == size
            and isinstance(reasons, dict) and sum(v for v in reasons.values() if _count(v, size)) == rejected
            and all(isinstance(k, str) and _count(v, size) for k, v in reasons.items())):
        return f"has counts that do not add up to its {size} indices"
    for field in ("bytes", "part_bytes"):
        value = r.get(field)
        if value is not None and not _count(value, _MAX_BYTES):
            return f"has {field} {json.dumps(value)[:40]}, not a file size"
    for field in ("sha256", "part_sha256"):
        value = r.get(field)
        if value is not None and not (isinstance(value, str) and _SHA256.fullmatch(value)):
            return f"has {field} {json.dumps(value)[:80]}, not a sha256"
    return ""


def _outside(out: Path | RemotePath, rel: str) -> bool:
    """Whether ``out/rel`` leads out of the local output dir, links followed (object stores have no links)."""
    if isinstance(out, RemotePath):
        return False
    return not (out / rel).resolve().is_relative_to(out.resolve())


def check_dirs(out: Path | RemotePath) -> None:
    """``shards/`` and ``parts/`` are folders inside the output dir, not links to somewhere else (files are
    deleted from them by the plan's names); TamperedError otherwise."""
    for sub in ("shards", "parts"):
        if _outside(out, sub):
            raise TamperedError(f"{sub}/ is a link to {(out / sub).resolve()}, outside the output dir; synthgen "
                                "only writes and deletes inside it")


def _links(out: Path | RemotePath) -> set[str]:
    """``shards/NAME`` and ``parts/NAME`` entries that are symbolic links (one listing of each folder: a
    record's file can only lead out of the dir through a link, its name being the plan's)."""
    if isinstance(out, RemotePath):
        return set()
    found = set()
    for sub in ("shards", "parts"):
        try:
            with os.scandir(out / sub) as entries:
                found |= {f"{sub}/{e.name}" for e in entries if e.is_symlink()}
        except (FileNotFoundError, NotADirectoryError):
            pass
    return found


def check_records(out: Path | RemotePath, plan: ShardPlan, records: list, where: str) -> None:
    """Every record is one the plan gives (:func:`_record_problem`), no shard twice, and each file it names
    resolves inside the output dir; TamperedError naming the first that is not."""
    if not isinstance(records, list):
        raise TamperedError(f"{where} is not a list of shard records")
    links = _links(out)
    seen: set[str] = set()
    for i, r in enumerate(records):
        problem = _record_problem(plan, r)
        if not problem and r["name"] in seen:
            problem = f"repeats shard {r['name']}"
        if not problem:
            problem = next((f"has {f} {r[f]} leading out of the output dir" for f in ("tar", "part")
                            if r[f] in links and _outside(out, r[f])), "")
        if problem:
            raise TamperedError(f"{where}[{i}] {problem}")
        seen.add(r["name"])


def _confirmed(out: Path | RemotePath, manifest: dict, journal: list[dict]) -> dict:
    """The manifest with the journal merged in, after every name both hold is checked against the plan."""
    where = location(out)
    try:
        plan = layout_plan(manifest.get("layout"))
        check_dirs(where)
        check_records(where, plan, manifest.get("shards"), f"{MANIFEST}: shards")
        check_records(where, plan, journal, JOURNAL)
        if len(manifest["shards"]) > plan.num_shards:
            raise TamperedError(f"{MANIFEST}: lists {len(manifest['shards'])} shards, its layout has {plan.num_shards}")
    except TamperedError as e:
        raise tampered(where, e) from None
    return merge_commits(manifest, journal)


def check_index_shards(out: Path | RemotePath, manifest: dict, shards: Any) -> None:
    """Every ``shard`` an index names (a file name in ``shards/``) is one the manifest commits."""
    committed = {PurePosixPath(s["tar"]).name for s in manifest["shards"]}
    stray = sorted(set(shards) - committed)
    if stray:
        raise tampered(out, TamperedError(f"{INDEX} names shard {stray[0][:80]!r}, which {MANIFEST} does not commit"))


def tampered(out: Path | RemotePath, e: TamperedError) -> TamperedError:
    """The one line for a directory whose names the plan does not give."""
    return TamperedError(f"output.dir: {out}: {e}: the directory was edited or damaged; nothing was deleted or "
                         "read: restore it from a copy, or use another output dir")


# --- manifest ---------------------------------------------------------------------------------
def load_manifest(out: Path) -> dict | None:
    """The manifest of a directory that is ours, None when there is none; OutputError when the
    directory holds a ``manifest.json`` that synthgen did not write."""
    path = location(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise OutputError(f"{path}: not a readable synthgen manifest ({type(e).__name__}); if this directory was a "
                          "synthgen output, `synthgen repair JOB --out DIR` rebuilds its manifest from the shards")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise OutputError(f"{path}: not a synthgen manifest (format {found!r}, expected {FORMAT!r}); synthgen "
                          "only writes into a new, empty or synthgen-made directory: choose another output dir")
    return manifest


def _listing(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def output_state(out: Path | RemotePath | str) -> tuple[dict | None, bool]:
    """Whether an output dir may be written: (its manifest with the journal merged in, or None; whether
    it is an orphan: a synthgen output that lost its manifest, for ``synthgen repair``).

    (None, False) for an absent or empty dir. Raises OutputError (naming what the dir holds) for a
    file, a ``manifest.json`` synthgen did not write, a non-empty dir with no synthgen files, names the plan
    does not give (:class:`TamperedError`), or a local dir that cannot be written; on an object store also
    for an endpoint that does not answer, refused credentials or a missing bucket.
    """
    out = location(out)
    if isinstance(out, RemotePath):
        storage.check_reachable(out)
        try:
            return _output_state(out)
        except OSError as e:
            raise OutputError(f"output.dir: {out}: cannot read it ({storage.describe(e)}); check the credentials "
                              "and the prefix's permissions") from None
    state = _output_state(out)
    storage.check_writable(out)
    return state


def _output_state(out: Path | RemotePath) -> tuple[dict | None, bool]:
    if out.exists() and not out.is_dir():
        raise OutputError(f"output.dir: {out} is a file, not a directory; choose another output dir")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if not entries:
        return None, False
    try:
        manifest = load_manifest(out)
    except OutputError as e:
        raise OutputError(f"output.dir: {e} (it holds {_listing(entries)}; nothing was changed)") from None
    if manifest is not None:
        return _confirmed(out, manifest, read_journal(out)), False
    if JOURNAL in entries or {"shards", "parts"} <= set(entries):
        try:
            check_dirs(out)
        except TamperedError as e:
            raise tampered(out, e) from None
        return None, True
    raise OutputError(f"output.dir: {out} is not empty and is not a synthgen output (no {MANIFEST}; it holds "
                      f"{_listing(entries)}); choose a new or empty directory")


def read_manifest(out: Path, names: bool = True) -> dict:
    """The manifest of a synthgen output dir, with the commits of a running or killed run merged in; its names
    checked against the plan (:func:`check_records`) unless ``names`` is False, for a reader that opens no file
    they name (``synthgen status``: counts only)."""
    manifest = load_manifest(out)
    if manifest is None:
        raise OutputError(f"{out}: no {MANIFEST}; not a synthgen output directory")
    journal = read_journal(out)
    return _confirmed(out, manifest, journal) if names else merge_commits(manifest, journal)


def check_shard(out: Path, record: dict, hashes: bool) -> str:
    """'' when the committed shard's tar and part are on disk as recorded, else what is wrong.

    Sizes are always compared (a stat); sha256 only with ``hashes``. Records of older runs without
    part sizes / hashes are checked on what they have.
    """
    for kind in ("tar", "part"):
        path = location(out) / record[kind]
        size = record.get("bytes" if kind == "tar" else "part_bytes")
        digest = record.get("sha256" if kind == "tar" else "part_sha256")
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            return f"{record[kind]} is missing"
        if size is not None and actual != size:
            return f"{record[kind]} has {actual} bytes, {size} committed"
        if hashes and digest is not None and storage.sha256(path) != digest:
            return f"{record[kind]} sha256 differs from the committed one"
    return ""


def check_shards(out: Path, records: list[dict], hashes: bool = False) -> dict[str, str]:
    """{shard name: problem} for the committed shards that fail :func:`check_shard` (hashed in parallel)."""
    workers = min(8, os.cpu_count() or 1) if hashes else 1
    with ThreadPoolExecutor(workers) as pool:
        problems = pool.map(lambda r: check_shard(out, r, hashes), records)
        return {r["name"]: p for r, p in zip(records, problems) if p}
