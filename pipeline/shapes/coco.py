"""Export rendered shapes-world scenes as a COCO-format dataset (images + annotations.json)."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from stages.labels import encode_mask, rle_fields

from .world import CLASSES, Scene, render_scene


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


def render_coco(out_dir: str | Path, n: int, size: int = 64, first_seed: int = 0) -> Path:
    """Render scenes ``first_seed .. first_seed+n-1`` to ``out_dir/images`` + ``annotations.json``."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        seed = first_seed + i
        scene = render_scene(seed, size)
        name = f"images/{seed:08d}.png"
        Image.fromarray(scene.image).save(out_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size,
                       "seed": seed, "caption": scene.caption, "background": scene.background})
        anns += scene_annotations(scene, i + 1, len(anns) + 1)
    coco = {"info": {"description": "synthgen shapes world", "version": "1"},
            "images": images, "annotations": anns, "categories": categories()}
    path = out_dir / "annotations.json"
    path.write_text(json.dumps(coco))
    return path
