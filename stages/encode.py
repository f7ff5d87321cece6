"""Encode stage: the bytes the shard writer stores, made on CPU workers.

Columns (numpy object arrays of ``bytes``; the same inputs always give the same bytes):

  ``jpg``      the image, JPEG at ``spec.output.jpeg_quality``
  ``seg_png``  the semantic mask, 8-bit greyscale PNG (0 bg, 1 + i = class_names[i], 255 ignore)
  ``json``     the sample record (UTF-8 JSON, sorted keys): identity, prompt, classes, generation
               metadata, COCO annotations, scores, curriculum, verdict, image size
  ``cls``      the first class's COCO category id, ASCII digits
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

from .base import Batch, Stage, passthrough
from .labels import category_ids

JSON_COLUMNS = ("class_names", "token_index", "gen", "annotations", "scores", "curriculum")


def _json_or_none(value: Any) -> Any:
    text = str(value)
    return json.loads(text) if text else None


def encode_image(array: np.ndarray, fmt: str, **params: Any) -> bytes:
    """PIL-encoded bytes of a uint8 HxW or HxWx3 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format=fmt, **params)
    return buf.getvalue()


class EncodeStage(Stage):
    """Adds ``jpg``, ``seg_png``, ``json`` and ``cls`` (bytes) for the writer."""

    name = "encode"
    kind = "task"
    inputs = ("key", "index", "seed", "prompt", "image", "semantic_mask", "keep", "reject_reason") + JSON_COLUMNS
    outputs = ("jpg", "seg_png", "json", "cls")
    reads = ("classes", "output")  # output.jpeg_quality

    def __init__(self, spec: Any):
        super().__init__(spec)
        self.quality = int(self.spec.output.jpeg_quality)
        self.ids = category_ids(self.spec)

    def record(self, batch: Batch, row: int) -> dict:
        """The JSON record of one row."""
        rec = {c: _json_or_none(batch[c][row]) for c in JSON_COLUMNS}
        if "cond" in batch:
            rec["cond"] = _json_or_none(batch["cond"][row])
        height, width = batch["image"].shape[1:3]
        rec.update(key=str(batch["key"][row]), index=int(batch["index"][row]), seed=int(batch["seed"][row]),
                   prompt=str(batch["prompt"][row]), keep=bool(batch["keep"][row]),
                   reject_reason=str(batch["reject_reason"][row]), width=int(width), height=int(height))
        return rec

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["key"])
        jpg, png, js, cls = (np.empty(n, dtype=object) for _ in range(4))
        for row in range(n):
            rec = self.record(batch, row)
            if not rec["class_names"]:
                raise ValueError(f"sample {rec['key']}: class_names is empty")
            jpg[row] = encode_image(batch["image"][row], "JPEG", quality=self.quality)
            png[row] = encode_image(batch["semantic_mask"][row], "PNG")
            js[row] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode("utf-8")
            cls[row] = str(self.ids[rec["class_names"][0]]).encode("ascii")
        return passthrough(batch, jpg=jpg, seg_png=png, json=js, cls=cls)
