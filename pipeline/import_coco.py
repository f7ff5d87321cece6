"""``synthgen import-coco DIR OUT``: a COCO folder of real images as a synthgen output dir.

The output has the layout and record format of a generated dataset (shards + ``index.parquet`` +
``manifest.json``, written by :class:`pipeline.writer.DatasetWriter` from records encoded by
:class:`stages.encode.EncodeStage`), so training reads real and synthetic data the same way.
Every annotated image (in key order, keys as in ``stages/references.py``) is one record:

  class_names  its categories, ordered by their largest annotation (``cls`` = the largest's category)
  seg.png      the annotations painted largest first (smaller objects on top), 1 + i = class_names[i]
  annotations  COCO RLE, bbox, area, ``score`` 1.0 and the annotation's ``attributes`` if any
  prompt       the image's ``caption`` if it has one, else ""
  curriculum   {"source": "real", "level": null, "strength": 0.0, "image_guidance": 1.0,
                "group_id": key, "difficulty": 1.0}

Images keep their size. Images without annotations are skipped. A rerun resumes (same writer).
"""
from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.base import Batch
from stages.encode import EncodeStage
from stages.identity import sha256_file
from stages.labels import rle_fields
from stages.references import ANNOTATIONS, CocoImage, ReferenceDataError, load_coco

from .plan import ShardPlan
from .spec import ClassSpec, OutputSpec, UsageError
from .writer import DatasetWriter, Origin

REAL_CURRICULUM = {"source": "real", "level": None, "strength": 0.0, "image_guidance": 1.0, "difficulty": 1.0}


class RealDataset(BaseModel):
    """The import's settings: what the manifest's ``job`` records (and the encode stage reads)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    source: str
    classes: list[ClassSpec]
    samples: int
    output: OutputSpec


def _record(coco, im: CocoImage, index: int, class_ids: dict[str, int]) -> Batch:
    """The one-row batch the encode stage turns into the image's shard members."""
    image = np.asarray(Image.open(im.path).convert("RGB"))
    height, width = image.shape[:2]
    if (height, width) != (im.info.get("height", height), im.info.get("width", width)):
        raise UsageError(f"{im.path}: image is {width}x{height} but {ANNOTATIONS} says "
                         f"{im.info['width']}x{im.info['height']}")
    names = list(dict.fromkeys(coco.cats[a["category_id"]]["name"] for a in im.annotations))
    semantic = np.zeros((height, width), dtype=np.uint8)
    annotations = []
    for a in im.annotations:  # largest first: smaller objects are painted over them
        name = coco.cats[a["category_id"]]["name"]
        rle = coco.annToRLE(a)
        semantic[mask_utils.decode(rle) > 0] = 1 + names.index(name)
        fields = rle_fields(rle)
        ann = {"category_id": class_ids[name], "bbox": fields["bbox"], "segmentation": fields["segmentation"],
               "area": fields["area"], "score": 1.0, "iscrowd": int(a.get("iscrowd", 0))}
        if a.get("attributes"):
            ann["attributes"] = a["attributes"]
        annotations.append(ann)
    curriculum = dict(REAL_CURRICULUM, group_id=im.key)
    return {
        "key": np.array([im.key]), "index": np.array([index], dtype=np.int64), "seed": np.array([0], dtype=np.int64),
        "prompt": np.array([str(im.info.get("caption", ""))]), "class_names": np.array([json.dumps(names)]),
        "token_index": np.array(["[]"]), "cond": np.array([""]),
        "gen": np.array([json.dumps({"source": "real", "file_name": im.info["file_name"], "image_id": im.info["id"]})]),
        "curriculum": np.array([json.dumps(curriculum, sort_keys=True)]), "image": image[None],
        "semantic_mask": semantic[None], "annotations": np.array([json.dumps(annotations)]),
        "scores": np.array(["{}"]), "keep": np.array([True]), "reject_reason": np.array([""]),
    }


def import_coco(folder: str | Path, out: str | Path, name: str = "real", shard_size: int = 1000,
                split: str = "train", jpeg_quality: int = 95, overwrite: bool = False) -> dict:
    """Write the COCO folder's annotated images to ``out``; returns the run summary (also in the manifest)."""
    folder, out = Path(folder).resolve(), Path(out).resolve()
    if not (folder / ANNOTATIONS).is_file():
        raise UsageError(f"{folder}: no {ANNOTATIONS}; expected a COCO folder (images + {ANNOTATIONS}), e.g. "
                         "from `python -m pipeline.shapes render --n 40 --out DIR`")
    try:
        coco, images = load_coco(folder, field=str(folder))
    except ReferenceDataError as e:
        raise UsageError(str(e)) from None
    if not images:
        raise UsageError(f"{folder / ANNOTATIONS}: no image has an annotation")
    missing = next((im.path for im in images if not im.path.is_file()), None)
    if missing is not None:
        raise UsageError(f"{missing}: listed in {ANNOTATIONS} but does not exist")
    cats = sorted(coco.cats.values(), key=lambda c: c["id"])
    try:
        spec = RealDataset(name=name, source=str(folder), classes=[ClassSpec(name=c["name"]) for c in cats],
                           samples=len(images), output=OutputSpec(dir=str(out), shard_size=shard_size, split=split,
                                                                  jpeg_quality=jpeg_quality))
    except ValidationError as e:
        err = e.errors()[0]
        raise UsageError(f"import-coco: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    digest = sha256_file(folder / ANNOTATIONS)
    identity = {"source": "real", "model": None, "annotations": str(folder / ANNOTATIONS), "sha256": digest}
    dump = spec.model_dump(mode="json", exclude={"source": True, "output": {"dir"}})
    payload = json.dumps({"import": dump, "annotations": digest}, sort_keys=True)
    fingerprint = hashlib.sha256(payload.encode()).hexdigest()
    plan = ShardPlan(split, shard_size, len(images))
    writer = DatasetWriter(out, plan, Origin(fingerprint, identity, spec.model_dump(mode="json")), overwrite)
    encode = EncodeStage(spec)
    class_ids = {c.name: i + 1 for i, c in enumerate(spec.classes)}
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    pending = writer.open()
    for k in pending:
        for index in range(*writer.plan.bounds(k)):
            writer.add(encode(_record(coco, images[index], index, class_ids)))
    processed = writer.plan.count(pending)
    wall = time.perf_counter() - t0
    summary = {"runner": "import-coco", "started": started.isoformat(timespec="seconds"), "wall_s": round(wall, 2),
               "processed": processed, "kept": processed, "rejected": 0, "rejected_by_reason": {},
               "skipped_unannotated": len(coco.imgs) - len(images),
               "images_per_s": round(processed / wall, 3) if wall > 0 and processed else None,
               "shards_written": writer.written, "shards_complete": len(writer.committed),
               "shards_total": writer.plan.num_shards, "dataset": writer.counts(), "stages": [],
               "redone": writer.redo, "left_alone": writer.foreign}
    writer.finish(summary)
    return summary
