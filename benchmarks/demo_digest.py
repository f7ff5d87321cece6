"""The demo job's shard digests against the recorded ones: a refactor that must not change bytes checks here.

    python -m benchmarks.demo_digest --out /tmp/demo            # run the demo (if DIR is not complete) and compare
    python -m benchmarks.demo_digest --out /tmp/demo --record   # make the current digests the reference

Runs ``synthgen run jobs/shapes-demo.yaml --out DIR`` (the README's main command; a finished DIR is
reused, an interrupted one resumed) and compares every shard's sha256 with
``benchmarks/results/demo_shards.json``. On a difference it names the shards and the first
differing tar members. Prints the comparison as JSON and exits 1 when the bytes differ.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
from datetime import date
from pathlib import Path

from benchmarks.common import REPO, finished, write_result
from pipeline.dataset import read_manifest

DEMO = REPO / "jobs" / "shapes-demo.yaml"
REFERENCE = REPO / "benchmarks" / "results" / "demo_shards.json"


def member_digests(out: Path, shards: list[dict]) -> dict[str, str]:
    digests = {}
    for shard in shards:
        with tarfile.open(out / shard["tar"]) as tar:
            for member in tar.getmembers():
                digests[member.name] = hashlib.sha256(tar.extractfile(member).read()).hexdigest()
    return digests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output dir of the demo run (made or reused)")
    parser.add_argument("--record", action="store_true", help="write the digests as the new reference")
    args = parser.parse_args()
    out = Path(args.out)
    if not finished(out):
        subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(DEMO), "--out", str(out)], check=True)
    shards = read_manifest(out)["shards"]
    current = {s["name"]: s["sha256"] for s in shards}
    if args.record:
        write_result(REFERENCE, {"job": "jobs/shapes-demo.yaml", "recorded": date.today().isoformat(),
                                 "shards": current, "members": member_digests(out, shards)}, indent=1)
        return 0
    reference = json.loads(REFERENCE.read_text())
    differing = sorted(n for n in set(current) | set(reference["shards"]) if current.get(n) != reference["shards"].get(n))
    members = member_digests(out, shards) if differing else {}  # read only when a shard differs
    changed = sorted(m for m in set(members) | set(reference["members"])
                     if members.get(m) != reference["members"].get(m)) if differing else []
    by_kind: dict[str, int] = {}
    for name in changed:
        kind = name.split(".", 1)[1]  # keys hold no '.' (stages/sampling.py)
        by_kind[kind] = by_kind.get(kind, 0) + 1
    result = {"reference_recorded": reference["recorded"], "shards": len(current), "identical": not differing,
              "differing_shards": differing, "members": len(reference["members"]),
              "differing_members_by_kind": by_kind, "differing_members": changed[:10]}
    print(json.dumps(result, indent=1))
    return 0 if not differing else 1


if __name__ == "__main__":
    sys.exit(main())
