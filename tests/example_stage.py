"""The smallest real stage (the one stages/base.py shows): rejects images that are nearly black.

Adding it to the pipeline is this file plus one line in stages/registry.py::

    Entry("darkness", "example_stage:Darkness"),   # before Entry("encode", ...)

(tests/test_registry.py does exactly that in a subprocess and runs a job through it).
"""
from __future__ import annotations

import numpy as np

from stages.base import Batch, Stage, passthrough


class Darkness(Stage):
    name, kind = "darkness", "task"
    inputs, outputs = ("image", "keep", "reject_reason"), ("keep", "reject_reason")
    limit = 10.0  # mean pixel value below which an image is "dark"

    def __call__(self, batch: Batch) -> Batch:
        dark = batch["image"].reshape(len(batch["image"]), -1).mean(axis=1) < self.limit
        newly = dark & batch["keep"]
        return passthrough(batch, keep=batch["keep"] & ~dark,
                           reject_reason=np.where(newly, "dark", batch["reject_reason"]))
