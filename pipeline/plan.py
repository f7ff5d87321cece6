"""Shard and batch arithmetic of a job: the one owner of which indices a shard and a batch hold.

Shard k holds the sample indices [k*S, min((k+1)*S, N)) (S = ``output.shard_size``, N = samples);
batch j of shard k holds [k*S + j*B, min(k*S + (j+1)*B, shard stop)) (B = ``generation.batch_size``,
S a multiple of B). Every runner, the writer and the Ray source ask this class; nothing here
materialises a list of batches or samples, so planning a job costs O(pending shards) memory
(one int64 per shard) whatever the number of samples.

Must not: import Ray, torch or stage code.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: most shards one output dir may hold: planning keeps one int64 per pending shard (8 MB here), and a
#: manifest or journal that claims more is refused as tampered (pipeline/dataset.py)
MAX_SHARDS = 1_000_000


def shard_count_problem(samples: int, shard_size: int) -> str:
    """'' when ``samples`` in shards of ``shard_size`` fit :data:`MAX_SHARDS`, else why and the fix."""
    shards = -(-samples // shard_size)
    if shards <= MAX_SHARDS:
        return ""
    return (f"{samples} samples in shards of {shard_size} make {shards} shards, over the limit of {MAX_SHARDS} "
            f"shards per output dir; raise output.shard_size to at least {-(-samples // MAX_SHARDS)} or split the "
            "job over several output dirs")


@dataclass(frozen=True)
class ShardPlan:
    split: str
    shard_size: int
    total: int
    batch_size: int = 1

    @classmethod
    def from_spec(cls, spec: Any) -> ShardPlan:
        out = spec.output
        generation = getattr(spec, "generation", None)  # import-coco's real datasets have no generation
        return cls(out.split, out.shard_size, spec.samples, generation.batch_size if generation else 1)

    @classmethod
    def from_layout(cls, layout: dict) -> ShardPlan:
        """The plan recorded in a manifest's ``layout`` (for files of an older run)."""
        return cls(layout["split"], layout["shard_size"], layout["samples"])

    @property
    def num_shards(self) -> int:
        return -(-self.total // self.shard_size)

    def name(self, k: int) -> str:
        return f"{self.split}-{k:06d}"

    def tar(self, k: int) -> str:
        """The shard's tar, relative to the output dir."""
        return f"shards/{self.name(k)}.tar"

    def part(self, k: int) -> str:
        """The shard's index part, relative to the output dir."""
        return f"parts/{self.name(k)}.parquet"

    def shard_of_file(self, filename: str) -> int | None:
        """k when ``filename`` is shard k's tar or part (or their ``.tmp``) in this plan, else None."""
        m = re.fullmatch(rf"{re.escape(self.split)}-(\d{{6,}})\.(tar|parquet)(\.tmp)?", filename)
        if m is None:
            return None
        k = int(m.group(1))
        return k if k < self.num_shards and m.group(1) == f"{k:06d}" else None

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.total)

    def shard_of(self, index: int) -> int:
        return index // self.shard_size

    def count(self, pending: Sequence[int]) -> int:
        """Number of samples in the given shards."""
        shards = np.asarray(pending, dtype=np.int64)
        return int((np.minimum((shards + 1) * self.shard_size, self.total) - shards * self.shard_size).sum())

    def batches_in(self, k: int) -> int:
        start, stop = self.bounds(k)
        return -(-(stop - start) // self.batch_size)

    def batch_count(self, pending: Sequence[int]) -> int:
        """Number of batches of the given shards (ascending): all full but possibly the job's last."""
        if len(pending) == 0:
            return 0
        per_shard = self.shard_size // self.batch_size
        return (len(pending) - 1) * per_shard + self.batches_in(int(pending[-1]))

    def batch_bounds(self, pending: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[start, stop) of batches ``ids`` (numbered over the ascending ``pending`` shards)."""
        per_shard = self.shard_size // self.batch_size
        shards = np.asarray(pending, dtype=np.int64)[ids // per_shard]
        starts = shards * self.shard_size + (ids % per_shard) * self.batch_size
        stops = np.minimum(starts + self.batch_size, np.minimum((shards + 1) * self.shard_size, self.total))
        return starts, stops

    def batches(self, pending: Sequence[int]) -> Iterator[tuple[int, int]]:
        """[start, stop) of every batch of the given shards, in order (lazily)."""
        for k in pending:
            start, stop = self.bounds(int(k))
            for s in range(start, stop, self.batch_size):
                yield s, min(s + self.batch_size, stop)
