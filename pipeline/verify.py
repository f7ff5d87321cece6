"""``synthgen verify`` and ``synthgen repair``: check a dataset against its manifest; rebuild a lost manifest.

``verify_dataset`` reads everything a manifest claims (each shard's size and sha256, each index part's
rows, the tar members against the part's kept keys, index.parquet against the parts) and returns the
problems found; it changes nothing.

``repair`` adopts a directory that lost its manifest: every shard file of the job's plan whose
part agrees with the job (the sampling stage's keys, seeds and prompts for its indices) and whose
tar holds exactly the part's kept samples becomes committed; if any shard present disagrees,
nothing is written. Shards not present are left for ``synthgen run`` to generate.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import (
    INDEX,
    Commits,
    MANIFEST,
    OutputError,
    TamperedError,
    check_dirs,
    check_records,
    check_shards,
    commit_record,
    load_manifest,
    read_index,
    read_journal,
    read_manifest,
    tampered,
)
from .plan import ShardPlan
from .storage import RemotePath, check_reachable, location, read_parquet


def tar_keys(path: Path | RemotePath) -> list[str]:
    """Sample keys of a shard, in member order (one per key; members ``key.ext``); read as a stream (one
    pass, also over an object store)."""
    keys: list[str] = []
    with location(path).open("rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for name in (member.name for member in tar):
            key = name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def shard_problems(out: Path, record: dict) -> list[str]:
    """What is wrong with one committed shard beyond its size and hash: part rows vs indices, tar vs part."""
    try:
        part = read_index(out / record["part"])
    except Exception as e:  # noqa: BLE001 - any unreadable part is a finding, not a crash
        return [f"{record['part']}: unreadable ({type(e).__name__})"]
    start, stop = record["indices"]
    problems = []
    if part.column("index").to_pylist() != list(range(start, stop)):
        problems.append(f"{record['part']}: rows are not the indices [{start}, {stop})")
    kept = [k for k, keep in zip(part.column("key").to_pylist(), part.column("keep").to_pylist()) if keep]
    try:
        keys = tar_keys(out / record["tar"])
    except (tarfile.TarError, OSError) as e:
        return problems + [f"{record['tar']}: unreadable ({type(e).__name__})"]
    if keys != kept:
        problems.append(f"{record['tar']}: holds {len(keys)} samples, its part keeps {len(kept)} (or other keys)")
    return problems


def verify_dataset(out: Path) -> dict[str, Any]:
    """{"problems": [...], "shards", "samples", "complete"} for an output dir (a path or a URI); raises
    OutputError if not ours."""
    out = location(out)
    if isinstance(out, RemotePath):
        check_reachable(out)  # an endpoint that does not answer is bad input (exit 2), not a mismatch (exit 1)
    try:
        manifest = read_manifest(out)
    except TamperedError as e:  # a name the plan does not give: a mismatch, and nothing named is read
        return {"problems": [str(e)], "shards": 0, "samples": 0, "complete": False}
    shards = manifest["shards"]
    failed = check_shards(out, shards, hashes=True)
    problems = [f"{name}: {p}" for name, p in failed.items()]
    for record in shards:
        if record["name"] not in failed:
            problems += shard_problems(out, record)
    if not manifest["complete"]:
        problems.append(f"incomplete: {len(shards)} of {manifest['layout']['num_shards']} shards committed; "
                        "rerun `synthgen run` on its job")
    elif not (out / INDEX).is_file():
        if ((manifest.get("job") or {}).get("output") or {}).get("index", True):  # else parts/ is the index
            problems.append(f"{INDEX} is missing; rerun `synthgen run` on its job to rebuild it")
    else:
        index = read_parquet(out / INDEX, columns=["key", "index"])
        if index.num_rows != manifest["counts"]["indices"] or \
                not np.array_equal(index.column("index").to_numpy(), np.arange(index.num_rows)):
            problems.append(f"{INDEX}: {index.num_rows} rows do not match the {manifest['counts']['indices']} "
                            "committed indices; rerun `synthgen run` on its job to rebuild it")
    return {"problems": problems, "shards": len(shards), "samples": manifest["counts"]["samples"],
            "complete": manifest["complete"]}


def _adopt(out: Path, plan: ShardPlan, k: int, sampling) -> tuple[dict | None, str]:
    """(commit record, '') when shard k's files agree with the job, (None, why) when they do not."""
    start, stop = plan.bounds(k)
    try:
        table = read_index(out / plan.part(k))
    except Exception as e:  # noqa: BLE001
        return None, f"{plan.part(k)} is unreadable ({type(e).__name__})"
    expected = sampling({"index": np.arange(start, stop, dtype=np.int64)})
    for column in ("index", "key", "seed", "prompt"):
        if table.column(column).to_pylist() != np.asarray(expected[column]).tolist():
            return None, f"{plan.part(k)}: its {column} column is not this job's"
    problems = shard_problems(out, {"tar": plan.tar(k), "part": plan.part(k), "indices": [start, stop]})
    if problems:
        return None, problems[0]
    return commit_record(out, plan, k, table.column("keep").to_pylist(), table.column("reject_reason").to_pylist()), ""


def repair(spec: Any) -> dict[str, Any]:
    """Rebuild the manifest of ``spec``'s output dir from its shards and parts (see the module doc).

    Returns {"adopted": [names], "samples", "pending", "left_alone"}. Raises OutputError (nothing written).
    """
    from stages.sampling import SamplingStage

    from .runner import prepare

    out = location(spec.output.dir)
    if not out.is_dir():
        raise OutputError(f"output.dir: {out} does not exist; nothing to repair")
    if load_manifest(out) is not None:
        raise OutputError(f"output.dir: {out} has its {MANIFEST}; nothing to repair (`synthgen verify {out}` checks "
                          "it, `synthgen run` redoes shards that fail)")
    plan = ShardPlan.from_spec(spec)
    records = read_journal(out)
    try:
        check_dirs(out)
        check_records(out, plan, records, "commits.jsonl")
    except TamperedError as e:
        raise tampered(out, e) from None
    journal = {r["name"]: r for r in records}
    failed = check_shards(out, list(journal.values()), hashes=True)
    sampling = SamplingStage(spec)
    adopted, disagree = [], []
    for k in range(plan.num_shards):
        name = plan.name(k)
        if name in journal and name not in failed:
            adopted.append(journal[name])
        elif (out / plan.tar(k)).is_file() and (out / plan.part(k)).is_file():
            record, why = _adopt(out, plan, k, sampling)
            (adopted.append(record) if record else disagree.append(f"{name}: {why}"))
    if disagree:
        raise OutputError(f"output.dir: {len(disagree)} shard(s) in {out} do not agree with this job ({disagree[0]}); "
                          "nothing was written: repair with the job that made them, or use another output dir")
    if not adopted:
        raise OutputError(f"output.dir: {out} holds no shard of this job's plan ({plan.tar(0)}, ...) to adopt; "
                          "nothing was written: repair with the job that made the shards, or run the job in a new "
                          "or empty directory")
    writer = prepare(spec, adopt=True)
    writer.committed = Commits(plan, {plan.shard_of(r["indices"][0]): r for r in adopted})
    pending = writer.open()
    return {"adopted": [r["name"] for r in adopted], "samples": sum(r["samples"] for r in adopted),
            "pending": len(pending), "left_alone": writer.foreign}
