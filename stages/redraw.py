"""Redraws: a sample the checks reject is drawn again from new noise, so a job delivers kept samples, not rejects.

With ``generation.redraws: N`` the synthesis stage checks every drawn sample the way the later stages will
(:class:`SampleChecks`: the judge's verdict, then the masks and labels stages' own functions and the
filters' verdict without dedup, ``stages.filters.row_verdict``) and draws a rejected one again, up to N
times. Attempt k of sample ``index`` starts from the noise seed :func:`noise_seed` (job seed, index, k):
attempt 0 is the sample's own seed, so a job without rejects makes the same bytes with or without
redraws, and the result depends only on the sample, never on its batch neighbours, the worker or a
resume. The prompt, the classes and the conditioning stay those of the sample; only the noise changes, and for
inpainting (``references.inpaint.redraw_strengths``) the strength: redraw k repaints at the k-th strength of that
list, and a row delivered from such a redraw carries it in its ``cond`` and ``curriculum`` as in its ``gen``.

The delivered attempt is the first that passes, or the last one (which the filters then reject with its
reason). Its ``gen`` records ``attempt`` (0 = the first draw), ``noise_seed`` (when not the sample's own)
and ``rejected``: each earlier attempt's noise seed and reason. The filters copy ``attempt`` and
``rejected`` into the sample's ``scores``, so they are in ``parts/`` and ``index.parquet`` too.
Dedup is not a redraw reason: it compares kept samples of a shard, which one worker sees in order.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import numpy as np

from .base import Batch, passthrough
from .inpaint import redraw_strength, restrengthen


def noise_seed(job_seed: int, index: int, attempt: int) -> int:
    """The noise seed of attempt ``attempt`` of sample ``index``: the sample's own seed for attempt 0, else a
    63-bit blake2b hash of (job seed, index, attempt), the same on every machine and Python run."""
    if attempt == 0:
        from .sampling import stable_seed

        return stable_seed(job_seed, index)
    digest = hashlib.blake2b(f"{job_seed}:{index}:redraw:{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class SampleChecks:
    """The reason each drawn row would be rejected ("" when kept), computed as the later stages compute it."""

    def __init__(self, spec: Any):
        from .labels import LabelStage
        from .masks import MaskStage

        self.spec = spec
        self.masks, self.labels = MaskStage(spec), LabelStage(spec)

    def __call__(self, batch: Batch, drawn: Batch) -> list[str]:
        from .filters import row_verdict

        rows = self.labels(self.masks(passthrough(batch, **drawn)))
        return [row_verdict(self.spec, gen, scores, names)
                for gen, scores, names in zip(rows["gen"], rows["scores"], rows["class_names"])]


def redraws_of(scores: Any) -> int:
    """How many times a record's sample was drawn again (its ``scores`` JSON's ``attempt``; 0 without redraws)."""
    text = scores.decode() if isinstance(scores, bytes) else str(scores)
    return int(json.loads(text).get("attempt", 0)) if text else 0


def take(batch: Batch, rows: list[int]) -> Batch:
    """The given rows of every column."""
    return {k: np.asarray(v)[rows] for k, v in batch.items()}


def redraw(spec: Any, batch: Batch, drawn: Batch, draw: Callable[[Batch], Batch], check: SampleChecks) -> Batch:
    """``drawn`` (the synthesis outputs of ``batch``) with each rejected row drawn again from its next noise seed
    until it passes or ``spec.generation.redraws`` attempts are spent; every row's ``gen`` records its attempts."""
    n = len(batch["index"])
    drawn = {k: np.array(v, dtype=object) if k == "gen" else np.array(v) for k, v in drawn.items()}
    reasons = check(batch, drawn)
    attempt = [0] * n
    seeds = [int(s) for s in batch["seed"]]  # each row's current draw's noise seed
    rejected: list[list[dict]] = [[] for _ in range(n)]
    restrengthened: dict[int, tuple[str, str]] = {}  # row -> (cond, curriculum) of its delivered draw's strength
    for k in range(1, spec.generation.redraws + 1):
        pending = [i for i in range(n) if reasons[i]]
        if not pending:
            break
        for i in pending:
            rejected[i].append({"attempt": k - 1, "noise_seed": seeds[i], "reason": reasons[i]})
            seeds[i] = noise_seed(spec.seed, int(batch["index"][i]), k)
        again = take(batch, pending)
        again["seed"] = np.array([seeds[i] for i in pending], np.int64)
        strength = redraw_strength(spec, k)  # inpainting: references.inpaint.redraw_strengths
        if strength is not None:
            moved = [restrengthen(str(c), str(cur), strength) for c, cur in zip(again["cond"], again["curriculum"])]
            again["cond"] = np.array([m[0] for m in moved], dtype=str)
            again["curriculum"] = np.array([m[1] for m in moved], dtype=str)
        out = draw(again)
        for j, reason in enumerate(check(again, out)):
            i = pending[j]
            for col, values in out.items():
                drawn[col][i] = values[j]
            reasons[i], attempt[i] = reason, k
            if strength is not None:
                restrengthened[i] = (str(again["cond"][j]), str(again["curriculum"][j]))
    gens = []
    for i, g in enumerate(drawn["gen"]):
        record = {**json.loads(str(g)), "attempt": attempt[i], "rejected": rejected[i]}
        if attempt[i]:
            record["noise_seed"] = seeds[i]
        gens.append(json.dumps(record))
    drawn["gen"] = np.array(gens, dtype=str)
    if restrengthened:  # the delivered draws' own strength in their cond and curriculum
        for col, part in (("cond", 0), ("curriculum", 1)):
            values = [str(v) for v in batch[col]]
            for i, pair in restrengthened.items():
                values[i] = pair[part]
            drawn[col] = np.array(values, dtype=str)
    return drawn
