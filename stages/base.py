"""The stage contract shared by every module in ``stages/``.

A stage is a class constructed once per worker (``Stage(spec)``: heavy state such as models is
loaded in ``__init__``) and called on batches::

    out = stage(batch)   # batch: dict[str, np.ndarray], one row per sample

It is registered by one line in ``stages/registry.py`` and declares the job sections it
``reads``; ``Stage.__init__`` keeps only those (plus the run context, :data:`CONTEXT`) in
``self.spec``, so what a stage depends on is written in one place and nothing else reaches it.
Validation lives in the config models (``pipeline/spec.py``): stages do not re-check it. A
minimal stage (the tests' ``tests/example_stage.py``)::

    class Darkness(Stage):
        name, kind = "darkness", "task"
        inputs, outputs = ("image", "keep", "reject_reason"), ("keep", "reject_reason")

        def __call__(self, batch):
            dark = batch["image"].mean(axis=(1, 2, 3)) < 10
            return passthrough(batch, keep=batch["keep"] & ~dark,
                               reject_reason=np.where(dark & batch["keep"], "dark", batch["reject_reason"]))

Rules:
  * Input arrays are read-only (Ray Data hands zero-copy views): never modify them in place.
  * The output is a dict with the input columns passed through plus the columns the stage adds
    (listed in ``outputs``); one output row per input row, same order. Filters mark
    ``keep=False`` with a ``reject_reason``; they never drop rows.
  * Variable-sized structures (lists, dicts) travel as JSON strings (numpy ``str`` arrays), so
    every column has a fixed dtype that Arrow can hold.
  * What one worker needs comes from the job spec's ``resources.<stage name>``; the pipeline turns
    it into Ray Data ``map_batches`` arguments. ``kind`` is "actor" for stages that keep state
    between batches (a model, a tokenizer, the dedup memory), else "task".

Record columns (docs/design.md "Record flowing between stages"):

  column          dtype / shape             set by
  key             str                       sampling   ``{job}-{index:09d}`` (no '.')
  index           int64                     sampling
  seed            int64                     sampling   stable hash of (job seed, index)
  prompt          str                       sampling
  class_names     str (JSON list[str])      sampling   classes in this image, prompt order
  token_index     str (JSON list[list[int]])sampling   token positions naming each class
  cond            str (JSON object or "")   sampling   embedding / reference conditioning
  curriculum      str (JSON object)         sampling   level, strength, group_id, ...
  image           uint8 (B, H, W, 3)        synthesis
  attn            float16 (B, K, h, w)      synthesis  per-class maps (refined), K = spec max classes
  attn_raw        float16 (B, K, h, w)      synthesis  per-class cross-attention, unrefined
  gen             str (JSON object)         synthesis  model id, scheduler, steps, guidance, ...
  semantic_mask   uint8 (B, H, W)           masks      0 bg, 1+i = class_names[i], 255 ignore
  annotations     str (JSON list)           labels     COCO-style, RLE segmentation
  scores          str (JSON object)         labels/filters
  keep            bool                      filters
  reject_reason   str                       filters    "" when kept
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np

Batch = dict[str, np.ndarray]

#: what every stage may read besides the sections it declares: the job's name and seed, its number
#: of samples, the shard size (a shard's samples reach one worker in order) and the model's name
CONTEXT = ("name", "seed", "samples", "shard_size", "model_name")


def stage_view(spec: Any, sections: tuple[str, ...]) -> SimpleNamespace:
    """The part of a job spec a stage sees: ``sections`` and :data:`CONTEXT` (those ``spec`` has)."""
    return SimpleNamespace(**{name: getattr(spec, name) for name in (*CONTEXT, *sections) if hasattr(spec, name)})


class Stage:
    """Base class: subclasses set ``name``, ``kind``, ``inputs``, ``outputs`` and implement ``__call__``."""

    name: ClassVar[str] = "stage"
    kind: ClassVar[str] = "task"  # "actor" when __init__ loads something or the stage keeps state
    #: False for a stage that needs a worker pool of its own (the model stage); the Ray graph
    #: runs each run of consecutive fusable stages as one operator, in one worker
    fusable: ClassVar[bool] = True
    #: the job sections (``JobSpec`` fields) this stage reads; ``self.spec`` holds only these and CONTEXT
    reads: ClassVar[tuple[str, ...]] = ()
    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: Any):
        self.spec = stage_view(spec, self.reads)

    def __call__(self, batch: Batch) -> Batch:  # pragma: no cover - interface
        raise NotImplementedError


def passthrough(batch: Batch, **new: np.ndarray) -> Batch:
    """A new output dict: the input columns (not copied, never mutated) plus ``new``."""
    out = dict(batch)
    out.update(new)
    return out
