"""Filter stage: a verdict per sample (``keep``, ``reject_reason``); rows are never dropped.

Checks, in order; the first that fails names the reason (stable strings, grouped in the summary):

  ``non-finite``       the synthesis output (image or attention maps) held a NaN or an inf: the row's
                       ``gen`` says ``"non_finite": true`` (stages/finite.py); its labels are never kept
  ``judge:<class>``    the job's judge (stages/judges.py) scored a prompted class below ``judge.min_score``
                       (the scores the synthesis stage recorded in ``gen["judge"]``)
  ``missing:<class>``  a prompted class has no pixel in the semantic mask
  ``area:<class>``     a prompted class has pixels but no component within the area bounds
  ``count:<class>``    a class has more than ``n_prompted + spec.filters.max_extra_instances``
                       instances (the object came out in pieces, or drawn more than once; off when
                       ``max_extra_instances`` is null, as for prompts whose objects may repeat)
  ``fewer:<class>``    a class has fewer than ``n_prompted - spec.filters.max_missing_instances`` instances
                       (an object the prompt asked for is missing, or two were labelled as one; off when
                       ``max_missing_instances`` is null)
  ``low_contrast``     a class's inside/outside attention contrast < ``spec.filters.min_contrast``
  ``outline-empty``    inpainting: the repainted instance's outline has no pixel at the generation size
  ``outline:<class>``  inpainting: the class's attention mass inside the dilated outline is below
                       ``references.inpaint.min_mass_inside``, or its attention mask's IoU with the outline
                       below ``min_iou`` (an inpainting sample gets only these checks: its labels are the
                       reference's, stages/inpaint.py)
  ``duplicate``        the image's perceptual hash is within ``spec.filters.dedup_threshold`` bits
                       (Hamming) of a kept image earlier in the same shard (index order)

:func:`row_verdict` is every check but dedup, for one row: the synthesis stage's redraws (stages/redraw.py)
call it too, so a redrawn sample passes exactly what the filters will check. A redrawn sample's ``attempt``
and ``rejected`` (its earlier attempts' noise seeds and reasons) and the judge's scores are copied from
``gen`` into ``scores``, so the index holds them.

Dedup is scoped to a shard (``index // output.shard_size``) so that the verdict is the same in an
uninterrupted and a resumed run (a resumed run starts at a shard boundary). The pipeline feeds a
shard's batches to one filters worker in index order (the spec requires ``resources.filters.actors
== 1`` when dedup is on). Near-duplicates in different shards are not compared; the hash is stored
in ``scores["phash"]`` (16 hex digits) so a global pass can be run offline from the index.
``dedup_threshold`` of ``None`` or below 0 turns dedup off.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
from PIL import Image
from scipy.fft import dctn

from .base import Batch, Stage, passthrough
from .finite import NON_FINITE, is_marked

def phash(image: np.ndarray) -> np.uint64:
    """64-bit DCT perceptual hash: signs of the 8x8 lowest frequencies of a 32x32 grey image."""
    grey = np.asarray(Image.fromarray(image).convert("L").resize((32, 32), Image.BOX), np.float32)
    low = dctn(grey, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])  # median without the DC term
    return np.frombuffer(np.packbits(bits).tobytes(), dtype=">u8")[0].astype(np.uint64)


def hamming(h: np.uint64, others: np.ndarray) -> np.ndarray:
    """Bit distances between one hash and an array of hashes."""
    return np.bitwise_count(np.bitwise_xor(others, h))


def verdict(scores: dict, min_contrast: float, max_extra_instances: int | None = None,
            max_missing_instances: int | None = None) -> str:
    """The reason a sample fails the mask checks, or "" (dedup is checked by the stage)."""
    classes = scores["per_class"]
    for c in classes:
        if c["n_components"] == 0:
            return f"missing:{c['name']}"
    for c in classes:
        if c["n_instances"] == 0:
            return f"area:{c['name']}"
    if max_extra_instances is not None:
        for c in classes:
            if c["n_instances"] > c.get("n_prompted", 1) + max_extra_instances:
                return f"count:{c['name']}"
    if max_missing_instances is not None:
        for c in classes:
            if c["n_instances"] < c.get("n_prompted", 1) - max_missing_instances:
                return f"fewer:{c['name']}"
    if any(c["contrast"] < min_contrast for c in classes):
        return "low_contrast"
    return ""


def outline_verdict(scores: dict, opts: Any) -> str:
    """The reason an inpainting sample fails (``references.inpaint``): its outline vanished at the generation
    size, or the repainted class's attention lies outside it (``outline:<class>``); "" when it passes or
    has no check (empty prompt)."""
    check = scores.get("outline")
    if scores.get("outline_empty"):
        return "outline-empty"
    if check and (check["mass_inside"] < opts.min_mass_inside or check["iou"] < opts.min_iou):
        return f"outline:{check['class']}"
    return ""


def row_verdict(spec: Any, gen: Any, scores: Any, class_names: Any) -> str:
    """The reason one row fails every check but dedup ("" when it passes), from its ``gen`` and ``scores``
    JSON and its class names: non-finite, then a stop part-way, the judge, the inpainting or the mask checks."""
    if is_marked(gen):
        return NON_FINITE
    g = json.loads(str(gen)) if str(gen) else {}
    if "stopped" in g:  # generation.early_check stopped it part-way (stages/early_check.py)
        return g["stopped"]["reason"]
    judge = getattr(spec, "judge", None)
    if judge is not None and "judge" in g:
        from .judges import verdict as judged

        reason = judged(g["judge"], json.loads(str(class_names)), judge.min_score)
        if reason:
            return reason
    sc = json.loads(str(scores))
    if "outline" in sc:  # inpainting: labels by construction, the attention check decides
        return outline_verdict(sc, spec.references.inpaint)
    f = spec.filters
    return verdict(sc, f.min_contrast, f.max_extra_instances, getattr(f, "max_missing_instances", None))


#: ``gen`` keys copied into ``scores`` (so the index holds them): the judge's scores (in ``class_names`` order), a
#: redrawn sample's attempt, its noise seed (when not the sample's own), its rejected attempts, and where
#: generation.early_check stopped it, the step and reason (its scores are then the part-way draw's)
GEN_TO_SCORES = ("judge", "attempt", "noise_seed", "rejected", "stopped")


class FilterStage(Stage):
    """Adds ``keep`` (bool) and ``reject_reason`` (str); adds ``phash`` to ``scores``."""

    name = "filters"
    kind = "actor"  # holds the current shard's kept hashes between batches
    reads = ("filters", "references", "judge")  # references.inpaint: the outline check's thresholds
    inputs = ("index", "image", "scores", "gen", "class_names")
    outputs = ("keep", "reject_reason", "scores")

    def __init__(self, spec: Any):
        super().__init__(spec)
        self.shard = -1
        self.kept_hashes: list[np.uint64] = []  # kept in the current shard

    def __call__(self, batch: Batch) -> Batch:
        f = self.spec.filters
        dedup = f.dedup_threshold is not None and f.dedup_threshold >= 0
        keep, reasons, scores = [], [], []
        n = len(batch["index"])
        gens = batch.get("gen", [""] * n)  # a batch not made by synthesis (tests) has none
        names = batch.get("class_names", ["[]"] * n)
        for index, image, scores_json, gen, classes in zip(batch["index"], batch["image"], batch["scores"], gens,
                                                            names):
            shard = int(index) // self.spec.shard_size
            if shard != self.shard:
                self.shard, self.kept_hashes = shard, []
            reason = row_verdict(self.spec, gen, scores_json, classes)
            sc = json.loads(str(scores_json))
            h = phash(image)
            sc["phash"] = f"{int(h):016x}"
            g = json.loads(str(gen)) if str(gen) else {}
            sc.update({k: g[k] for k in GEN_TO_SCORES if k in g})
            if not reason and dedup:
                if self.kept_hashes and hamming(h, np.array(self.kept_hashes)).min() <= f.dedup_threshold:
                    reason = "duplicate"
                else:
                    self.kept_hashes.append(h)
            keep.append(not reason)
            reasons.append(reason)
            scores.append(json.dumps(sc, separators=(",", ":")))
        return passthrough(batch, keep=np.array(keep, dtype=bool), reject_reason=np.array(reasons, dtype=str),
                           scores=np.array(scores, dtype=str))
