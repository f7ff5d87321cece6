"""Export rendered shapes-world scenes as a COCO-format dataset (images + annotations.json)."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from stages.labels import encode_mask, rle_fields

from .world import CLASSES, Scene, count_caption, render_multi_scene, render_scene


def categories() -> list[dict]:
    return [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]


def scene_annotations(scene: Scene, image_id: int, first_ann_id: int) -> list[dict]:
    """One COCO annotation per visible object (RLE segmentation, bbox and area from pycocotools)."""
    anns = []
    for k, obj in enumerate(scene.objects):
        fields = rle_fields(encode_mask(obj.mask))
        anns.append({
            "id": first_ann_id + k,
            "image_id": image_id,
            "category_id": CLASSES.index(obj.cls) + 1,
            "segmentation": fields["segmentation"],
            "area": float(fields["area"]),
            "bbox": fields["bbox"],
            "iscrowd": 0,
            "attributes": {"color": obj.color},
        })
    return anns


def render_coco(out_dir: str | Path, n: int, size: int = 64, first_seed: int = 0,
                classes: Sequence[str] | None = None, description: str = "synthgen shapes world") -> Path:
    """Render scenes ``first_seed .. first_seed+n-1`` to ``out_dir/images`` + ``annotations.json`` (written
    last, atomically: a folder with it is complete). ``classes``: scene i shows one object of ``classes[i]``
    (its image entry records it as ``class``)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        seed = first_seed + i
        scene = render_scene(seed, size, classes=None if classes is None else [classes[i]])
        name = f"images/{seed:08d}.png"
        Image.fromarray(scene.image).save(out_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size,
                       "seed": seed, "caption": scene.caption, "background": scene.background,
                       **({} if classes is None else {"class": classes[i]})})
        anns += scene_annotations(scene, i + 1, len(anns) + 1)
    return write_annotations(out_dir, description, images, anns)


def write_annotations(out_dir: Path, description: str, images: list[dict], anns: list[dict]) -> Path:
    """``out_dir/annotations.json`` (atomic: a temp file, then rename) with the shapes world's categories."""
    coco = {"info": {"description": description, "version": "1"},
            "images": images, "annotations": anns, "categories": categories()}
    path = out_dir / "annotations.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(coco))
    os.replace(tmp, path)
    return path


def render_multi_coco(out_dir: str | Path, n: int, size: int = 64, first_seed: int = 0, extra_class: bool = False,
                      same_color: bool | None = None, touch: float = 0.5, max_count: int = 4,
                      description: str = "synthgen shapes world, several instances of a class") -> Path:
    """Like :func:`render_coco` for :func:`~pipeline.shapes.world.render_multi_scene` scenes: scene i shows
    2-``max_count`` instances of one class (drawn from its seed), plus one other class when ``extra_class``. Each image entry
    records the caption (it says the count: 'three red circles'), ``class`` (the repeated class) and
    ``count``; one annotation per instance, touching ones separate."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        seed = first_seed + i
        rng = np.random.default_rng([seed, 0xC0C0])
        main = str(rng.choice(CLASSES))
        groups = [(main, int(rng.integers(2, max_count + 1)))]
        if extra_class:
            groups.append((str(rng.choice([c for c in CLASSES if c != main])), 1))
        scene = render_multi_scene(seed, size, groups=groups, same_color=same_color, touch=touch)
        name = f"images/{seed:08d}.png"
        Image.fromarray(scene.image).save(out_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size, "seed": seed,
                       "caption": count_caption(scene.objects, scene.background), "background": scene.background,
                       "class": main, "count": groups[0][1]})
        anns += scene_annotations(scene, i + 1, len(anns) + 1)
    return write_annotations(out_dir, description, images, anns)
