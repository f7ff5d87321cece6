"""Reference images for image-guided variations: list them, pick the hard ones, load their pixels.

``references.path`` is either a COCO folder (``annotations.json`` + the image files it names, e.g.
``python -m pipeline.shapes render``) or a synthgen output dir (``index.parquet`` + shards, e.g. from
``synthgen import-coco``). A reference is one image:

  key         COCO: the image file name's stem ('.' and other odd characters -> '_');
              output dir: the record key. It is the ``group_id`` of every variation made from it.
  class_name  COCO: the category of its largest annotation (by ``area``, ties by annotation id);
              output dir: the record's first class (for an import: the largest annotation's).
  attributes  COCO: the values of that annotation's ``attributes`` mapping (e.g. its colour), if any.

With ``references.mode: inpaint`` the unit is an *instance*: one non-crowd annotation of a reference
image (COCO: its annotation ``id``; output dir: its 1-based position in the record's ``annotations``),
listed in (key, id) order with its class, attributes and mask (``Outline``). Every annotation of a
picked image is an instance unless ``references.select.instance_column`` names single ones.

References are listed in key order; errors are :class:`ReferenceDataError` naming the job field.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .identity import cached_sha256_many, digest_of, sha256_file

ANNOTATIONS = "annotations.json"
INDEX = "index.parquet"
RENDER_HINT = "python -m pipeline.shapes render --n 40 --out DIR"


class ReferenceDataError(ValueError):
    """Unusable reference input; ``str(err)`` is '<job field>: <reason>'."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"{field}: {msg}")
        self.field = field


@dataclass(frozen=True)
class Reference:
    key: str
    class_name: str
    attributes: tuple[str, ...]
    image: str  # the image file, or the shard tar that holds ``{key}.jpg`` when ``in_shard``
    in_shard: bool = False


@dataclass(frozen=True)
class CocoImage:
    """One annotated image of a COCO file: its key, file, COCO entry and annotations, largest first."""

    key: str
    path: Path
    info: dict
    annotations: list[dict]


@dataclass(frozen=True)
class Outline:
    """One annotation of a reference image: its id, class, attribute values and COCO RLE (source size)."""

    id: int
    class_name: str
    attributes: tuple[str, ...]
    rle: dict = field(compare=False, repr=False)


@dataclass(frozen=True)
class Instance:
    """An inpainting unit: one annotated instance (``outline``) of one reference image (``ref``)."""

    ref: Reference
    outline: Outline

    @property
    def key(self) -> str:
        return self.ref.key


WHOLE_IMAGE = 0.98  # an outline covering this fraction of its image leaves nothing to keep around it


def _values(attrs: Any) -> tuple[str, ...]:
    return tuple(str(attrs[k]) for k in sorted(attrs)) if isinstance(attrs, dict) else ()


def reference_key(file_name: str) -> str:
    """The key of a COCO image: its file name's stem, characters outside [A-Za-z0-9_-] replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", PurePosixPath(file_name).stem)


def load_coco(folder: Path, field: str = "references.path") -> tuple[COCO, list[CocoImage]]:
    """The COCO index of ``folder/annotations.json`` and its annotated images in key order."""
    path = folder / ANNOTATIONS
    try:
        data = json.loads(path.read_text())
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO()
            coco.dataset = data
            coco.createIndex()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReferenceDataError(field, f"cannot read {path} as a COCO file ({type(e).__name__}: {e})") from None
    images, seen = [], {}
    for image_id, info in coco.imgs.items():
        anns = coco.imgToAnns.get(image_id, [])
        if not anns:
            continue  # no annotation, no class
        stray = next((a for a in anns if a.get("category_id") not in coco.cats), None)
        if stray is not None or not isinstance(info.get("file_name"), str):
            what = (f"annotation {stray.get('id')} has a category_id that is not in its categories" if stray
                    else f"image {image_id} has no file_name")
            raise ReferenceDataError(field, f"{path}: {what}")
        if not (folder / info["file_name"]).resolve().is_relative_to(folder.resolve()):
            raise ReferenceDataError(field, f"{path}: image {image_id} has file_name {info['file_name'][:80]!r}, which "
                                     "leads out of the folder; COCO file names are relative paths inside it")
        key = reference_key(info["file_name"])
        if key in seen:
            raise ReferenceDataError(field, f"images {seen[key]!r} and {info['file_name']!r} in {path} both get the "
                                 f"key {key!r}; give them distinct file names")
        seen[key] = info["file_name"]
        largest_first = sorted(anns, key=lambda a: (-float(a.get("area", 0.0)), a["id"]))
        images.append(CocoImage(key, folder / info["file_name"], info, largest_first))
    return coco, sorted(images, key=lambda im: im.key)


def _from_coco(folder: Path) -> list[Reference]:
    coco, images = load_coco(folder)
    refs = []
    for im in images:
        top = im.annotations[0]
        attrs = top.get("attributes") or {}
        values = tuple(str(attrs[k]) for k in sorted(attrs)) if isinstance(attrs, dict) else ()
        refs.append(Reference(im.key, coco.cats[top["category_id"]]["name"], values, str(im.path)))
    return refs


def _from_output(folder: Path) -> list[Reference]:
    from pipeline.dataset import OutputError, check_index_shards, read_manifest  # the format's one owner

    try:
        table = pq.read_table(folder / INDEX, columns=["key", "shard", "classes", "keep"])
        check_index_shards(folder, read_manifest(folder), table.column("shard").unique().to_pylist())
    except (OSError, pa.ArrowException) as e:
        raise ReferenceDataError("references.path", f"cannot read {folder / INDEX} ({e})") from None
    except OutputError as e:  # not ours, or a name its plan does not give: nothing named is read
        raise ReferenceDataError("references.path", str(e).removeprefix("output.dir: ")) from None
    rows = [r for r in table.to_pylist() if r["keep"] and r["classes"]]
    return sorted((Reference(r["key"], r["classes"][0], (), str(folder / "shards" / r["shard"]), in_shard=True)
                   for r in rows), key=lambda r: r.key)


def _read_table(path: Path, key_column: str) -> pa.Table:
    if path.suffix == ".parquet":
        return pq.read_table(path)
    # keys like "00000012" must stay strings
    return pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(column_types={key_column: pa.string()}))


def select(refs: list[Reference], sel: Any) -> list[Reference]:
    """The references a ``references.select`` section picks (in key order)."""
    field, path = "references.select.path", Path(sel.path)
    if not path.is_file():
        raise ReferenceDataError(field, f"{path} does not exist; give a CSV or Parquet file with a "
                             f"{sel.key_column!r} column")
    try:
        table = _read_table(path, sel.key_column)
    except (OSError, pa.ArrowException) as e:
        raise ReferenceDataError(field, f"cannot read {path} ({e})") from None
    ranked = sel.top_k is not None or sel.top_fraction is not None
    needed = [sel.key_column] + ([sel.loss_column] if ranked else [])
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ReferenceDataError(field, f"{path} has no column {missing[0]!r} (columns: {table.column_names}); "
                             "set references.select.key_column / loss_column")
    keys = [str(k) for k in table[sel.key_column].to_pylist()]
    if getattr(sel, "instance_column", None):  # one row per instance: a key repeats
        keys = list(dict.fromkeys(keys))
    if len(set(keys)) != len(keys):
        raise ReferenceDataError(field, f"{path} lists key {next(k for k in keys if keys.count(k) > 1)!r} twice")
    if ranked:
        losses = table[sel.loss_column].to_pylist()
        bad = next((k for k, v in zip(keys, losses) if not isinstance(v, (int, float)) or math.isnan(v)), None)
        if bad is not None:
            raise ReferenceDataError(field, f"{path}: key {bad!r} has no numeric {sel.loss_column!r}")
        order = sorted(zip(losses, keys), key=lambda lk: (-lk[0], lk[1]))
        n = sel.top_k if sel.top_k is not None else math.ceil(sel.top_fraction * len(order))
        keys = [k for _, k in order[:n]]
    known = {r.key for r in refs}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ReferenceDataError(field, f"{len(unknown)} keys of {path} are not references (e.g. {unknown[0]!r}; "
                             f"references are keyed like {min(known)!r})")
    chosen = set(keys)
    return [r for r in refs if r.key in chosen]


def _selected(cfg: Any) -> list[Reference]:
    """The references of a ``references`` section (listed, selected, files present), in key order."""
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise ReferenceDataError("references.path", f"{folder} is not a directory; render a COCO folder with "
                             f"`{RENDER_HINT}` or give a synthgen output dir")
    if (folder / ANNOTATIONS).is_file():
        refs = _from_coco(folder)
    elif (folder / INDEX).is_file():
        refs = _from_output(folder)
    else:
        raise ReferenceDataError("references.path", f"{folder} has neither {ANNOTATIONS} (a COCO folder) nor {INDEX} "
                             "(a synthgen output dir; one run with output.index: false writes it by rerunning its job "
                             "with output.index: true)")
    if cfg.select is not None:
        refs = select(refs, cfg.select)
    if not refs:
        raise ReferenceDataError("references.path", f"{folder} has no annotated images")
    missing = next((r for r in refs if not Path(r.image).is_file()), None)
    if missing is not None:
        raise ReferenceDataError("references.path", f"reference {missing.key!r}: {missing.image} does not exist")
    return refs


def list_references(spec: Any) -> list[Reference]:
    """The job's references (``spec.references``) in key order, selected and checked against its classes."""
    refs = _selected(spec.references)
    classes = {c.name for c in spec.classes}
    outside = [r for r in refs if r.class_name not in classes]
    if outside:
        raise ReferenceDataError("references.path", f"{len(outside)} references have classes that are not in the "
                             f"job's classes (e.g. {outside[0].key!r}: {outside[0].class_name!r}); add the class "
                             "to classes or leave those images out with references.select")
    return refs


def references_digest(cfg: Any) -> dict[str, str | None]:
    """The reference data by content, never by location: sha256 of the listing (annotations.json or
    index.parquet), of the selection file, and one sha256 over {key: sha256 of its image file} of the
    selected references (for an output dir: of the shard tars that hold them). File digests are
    cached by (path, size, mtime_ns) (``stages.identity``), so a rerun reads no pixels again."""
    folder = Path(cfg.path)
    listing = folder / ANNOTATIONS if (folder / ANNOTATIONS).is_file() else folder / INDEX
    refs = _selected(cfg)
    files = cached_sha256_many(sorted({Path(r.image) for r in refs} | {listing}))
    return {"listing": files[listing], "select": sha256_file(cfg.select.path) if cfg.select else None,
            "images": digest_of({r.key: files[Path(r.image)] for r in refs})}


def _coco_outlines(folder: Path, keys: set[str]) -> dict[str, list[Outline]]:
    coco, images = load_coco(folder)
    out = {}
    for im in images:
        if im.key in keys:
            anns = sorted((a for a in im.annotations if not a.get("iscrowd")), key=lambda a: a["id"])
            try:
                out[im.key] = [Outline(int(a["id"]), coco.cats[a["category_id"]]["name"],
                                       _values(a.get("attributes")), coco.annToRLE(a)) for a in anns]
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise ReferenceDataError("references.path", f"{folder / ANNOTATIONS}: image {im.key!r} has an "
                                         f"annotation without a readable segmentation ({type(e).__name__}: {e})") from None
    return out


def _output_outlines(folder: Path, refs: list[Reference]) -> dict[str, list[Outline]]:
    from pipeline.dataset import category_names, read_manifest

    names = category_names(read_manifest(folder).get("job") or {})
    wanted: dict[str, set[str]] = {}
    for r in refs:
        wanted.setdefault(r.image, set()).add(r.key)
    out = {}
    for tar, keys in sorted(wanted.items()):
        for sample in wds.WebDataset(tar, shardshuffle=False, empty_check=False):
            if sample["__key__"] in keys:
                record = json.loads(sample["json"])
                out[sample["__key__"]] = [
                    Outline(i + 1, names.get(a["category_id"], str(a["category_id"])), (), a["segmentation"])
                    for i, a in enumerate(record.get("annotations") or [])]
    return out


@dataclass(frozen=True)
class InpaintReferences:
    """What ``references.mode: inpaint`` works from: the instances to repaint, in (key, id) order, and every
    non-crowd annotation of their images by key (the labels each sample carries)."""

    instances: list[Instance]
    outlines: dict[str, list[Outline]]


def inpaint_references(spec: Any) -> InpaintReferences:
    """The instances of ``references.mode: inpaint``: every annotation of the picked references, or the
    (key, id) rows of ``references.select.instance_column``. An empty outline, one that covers the image,
    an unknown id or a picked image without annotations: ReferenceDataError."""
    cfg = spec.references
    refs = list_references(spec)
    folder = Path(cfg.path)
    keys = {r.key for r in refs}
    outlines = (_coco_outlines(folder, keys) if (folder / ANNOTATIONS).is_file()
                else _output_outlines(folder, refs))
    picked = _picked_instances(cfg.select) if cfg.select is not None and cfg.select.instance_column else None
    classes = {c.name for c in spec.classes}
    instances = []
    for ref in refs:
        found = outlines.get(ref.key) or []
        if not found:
            raise ReferenceDataError("references.path", f"reference {ref.key!r} has no annotations to inpaint; "
                                     "leave it out with references.select")
        by_id = {o.id: o for o in found}
        ids = sorted(picked.get(ref.key, ())) if picked is not None else sorted(by_id)
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise ReferenceDataError("references.select.path", f"reference {ref.key!r} has no annotation "
                                     f"{unknown[0]} (its ids: {sorted(by_id)[:10]})")
        for i in ids:
            o = by_id[i]
            area, size = float(mask_utils.area(o.rle)), o.rle["size"]
            where = f"reference {ref.key!r} annotation {o.id}"
            if area == 0:
                raise ReferenceDataError("references.path", f"{where} has an empty mask; remove it or leave it out "
                                         "with references.select.instance_column")
            if area >= WHOLE_IMAGE * size[0] * size[1]:
                raise ReferenceDataError("references.path", f"{where} covers the whole image, so nothing around it "
                                         "is kept; leave it out with references.select.instance_column")
            if o.class_name not in classes:
                raise ReferenceDataError("references.path", f"{where} is a {o.class_name!r}, which is not in the "
                                         "job's classes; add it to classes or leave it out with references.select")
            instances.append(Instance(ref, o))
    return InpaintReferences(instances, {k: v for k, v in outlines.items() if k in keys})


def _picked_instances(sel: Any) -> dict[str, set[int]]:
    """{key: annotation ids} of a selection file's (key_column, instance_column) rows."""
    table = _read_table(Path(sel.path), sel.key_column)
    if sel.instance_column not in table.column_names:
        raise ReferenceDataError("references.select.path", f"{sel.path} has no column {sel.instance_column!r} "
                                 f"(columns: {table.column_names}); set references.select.instance_column")
    picked: dict[str, set[int]] = {}
    for key, ann in zip(table[sel.key_column].to_pylist(), table[sel.instance_column].to_pylist()):
        if not isinstance(ann, int) or isinstance(ann, bool):
            raise ReferenceDataError("references.select.path", f"{sel.path}: key {key!r} has instance id {ann!r}, "
                                     "not a whole number")
        picked.setdefault(str(key), set()).add(ann)
    return picked


def fit_mask(rle: dict, height: int, width: int) -> np.ndarray:
    """An RLE's mask as the reference's pixels are fitted to the generation size (``ReferenceImages``: the
    same centre crop, nearest-neighbour resize): bool (height, width)."""
    mask = Image.fromarray(mask_utils.decode(rle).astype(np.uint8) * 255)
    return np.asarray(ImageOps.fit(mask, (width, height), method=Image.Resampling.NEAREST)) > 127


class ReferenceImages:
    """Reference pixels as uint8 (height, width, 3): centre-cropped to the aspect ratio, then resized
    (bicubic). Shard members are read with webdataset, one shard at a time, on first use."""

    def __init__(self, refs: list[Reference], height: int, width: int):
        self.refs = {r.key: r for r in refs}
        self.size = (width, height)
        self.shards: dict[str, dict[str, bytes]] = {}

    def __call__(self, key: str) -> np.ndarray:
        ref = self.refs[key]
        if ref.in_shard:
            image = Image.open(io.BytesIO(self._shard(ref.image)[key]))
        else:
            image = Image.open(ref.image)
        return np.asarray(ImageOps.fit(image.convert("RGB"), self.size, method=Image.Resampling.BICUBIC))

    def _shard(self, tar: str) -> dict[str, bytes]:
        if tar not in self.shards:
            wanted = {k for k, r in self.refs.items() if r.image == tar}
            dataset = wds.WebDataset(tar, shardshuffle=False, empty_check=False)
            self.shards[tar] = {s["__key__"]: s["jpg"] for s in dataset if s["__key__"] in wanted}
        return self.shards[tar]
