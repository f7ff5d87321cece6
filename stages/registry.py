"""The pipeline's stages, in order: one registration line per stage.

Everything that lists stages derives from :data:`STAGES`: the job file's ``resources`` section
(one entry per stage, ``pipeline/spec.py``), the chain the runners build (``pipeline/jobplan.py``)
and the job-file reference. Adding a stage is one new module in ``stages/`` (a :class:`~stages.base.Stage`
subclass that declares the job sections it ``reads``) plus one line here, e.g.::

    Entry("tint", "stages.tint:TintFilter"),

This module imports no stage code (stages pull in torch / diffusers): :meth:`Entry.load` imports
a stage class when a run needs it.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One stage: its name (the ``resources.<name>`` key and the class's ``name``), where its class
    lives (``module:Class``), whether it may reserve GPUs, and its default resources (fields of
    ``resources.<name>`` that differ from one CPU, no GPU, one worker)."""

    name: str
    target: str
    gpu: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)

    def load(self) -> type:
        module, _, attr = self.target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if getattr(cls, "name", None) != self.name:
            raise TypeError(f"stage {self.target} is named {getattr(cls, 'name', None)!r}, registered as {self.name!r}")
        return cls


STAGES: tuple[Entry, ...] = (
    Entry("sampling", "stages.sampling:SamplingStage"),
    Entry("synthesis", "stages.synthesis:SynthesisStage", gpu=True),
    Entry("masks", "stages.masks:MaskStage"),
    Entry("labels", "stages.labels:LabelStage"),
    Entry("filters", "stages.filters:FilterStage"),
    Entry("encode", "stages.encode:EncodeStage"),
)


def stage_names(entries: Sequence[Entry] | None = None) -> tuple[str, ...]:
    return tuple(e.name for e in (STAGES if entries is None else entries))


def load_stages(entries: Sequence[Entry] | None = None) -> list[type]:
    """The registered stage classes, in order (imports their modules)."""
    return [e.load() for e in (STAGES if entries is None else entries)]
