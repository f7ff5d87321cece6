"""``synthgen export-coco OUT [-o FILE] [--images DIR]``: the kept samples of a dataset as one COCO file,
and with ``--images`` the images too, in the folder layout COCO tools read directly (supervision's
``DetectionDataset.from_coco``, FiftyOne, Detectron2's ``register_coco_instances``, pycocotools,
``synthgen import-coco``)::

  DIR/annotations.json       images (id = index + 1, file_name = {key}.jpg, width, height, shard, index,
                             prompt), annotations (the records' RLE, bbox, area, score, ...), categories
  DIR/{key}.jpg              each kept sample's JPEG exactly as the shard holds it (no re-encoding)
  DIR/synthgen-export.json   what the export wrote: format, dataset fingerprint, file names

DIR must be new, empty, or a folder an earlier export made (its ``synthgen-export.json``); otherwise
nothing is written (one line, exit 2). In a folder of ours only the files our record lists are
replaced or removed (those of an earlier export that this one does not write); any other file is
left alone, and one whose name an image would take stops the export before anything is written.
The record is written first, listing what the export may write, so a killed export is ours to redo.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .dataset import OutputError, category_names, read_index, read_manifest, write_atomic
from .storage import location

MARKER = "synthgen-export.json"
EXPORT_FORMAT = "synthgen-coco-export/1"
ANNOTATIONS = "annotations.json"
#: the names an export writes into DIR: {key}.jpg (keys: [A-Za-z0-9_-]) and the annotations file (+ .tmp)
EXPORTED = re.compile(r"[A-Za-z0-9_-]+\.jpg|[A-Za-z0-9_-][A-Za-z0-9_.-]*\.json(\.tmp)?")


def _owned(folder: Path) -> set[str] | None:
    """Files an earlier export listed in ``folder`` (None: a new or empty folder); OutputError when the
    folder is not ours."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"export-coco --images: {folder} is a file, not a directory; choose a new or empty directory")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not entries:
        return None
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise OutputError(f"export-coco --images: {folder} is not empty and no synthgen export wrote it (it holds "
                          f"{shown}); choose a new or empty directory, nothing was written")
    files = record.get("files")
    if not isinstance(files, list) or any(not isinstance(n, str) or not EXPORTED.fullmatch(n) or n == MARKER
                                          for n in files):
        raise OutputError(f"export-coco --images: {folder / MARKER} lists files that an export does not write "
                          "(only {key}.jpg images and the annotations .json); it was edited: choose a new or empty "
                          "directory, nothing was written")
    return set(files)


def _image_names(out, manifest: dict) -> list[str]:
    """``{key}.jpg`` of every kept sample, from the committed shards' index parts (small, committed with
    their shards: also for a run that has not finished)."""
    names = []
    for shard in manifest["shards"]:
        part = read_index(out / shard["part"], ["key", "keep"])
        names += [f"{key}.jpg" for key, keep in zip(*(part.column(c).to_pylist() for c in ("key", "keep"))) if keep]
    return names


def _present(path: Path) -> bool:
    """A file, folder or link (dangling too) at ``path``."""
    return path.is_symlink() or path.exists()


def _put(path: Path, data: bytes) -> None:
    """Write one of our files; a link under its name is replaced, never written through."""
    if path.is_symlink():
        path.unlink()
    path.write_bytes(data)


def _write_record(folder: Path, fingerprint: str, files: set[str], complete: bool) -> None:
    record = {"format": EXPORT_FORMAT, "dataset": fingerprint, "complete": complete, "files": sorted(files)}
    write_atomic(folder / MARKER, (json.dumps(record, indent=1) + "\n").encode())


def export_coco(out: str | Path, path: Path | None = None, images: Path | None = None) -> Path:
    """Write the COCO file of every kept sample (image id = sample index + 1); with ``images``, the
    images into that folder too (see the module docstring). ``out`` is a path or a URI; ``path`` and
    ``images`` are local. Returns the annotations file's path."""
    from .report import iter_samples

    out = location(out)
    m = read_manifest(out)
    folder = Path(images) if images is not None else None
    if folder is not None:
        previous = _owned(folder)
        target = Path(path) if path else folder / ANNOTATIONS
        names = _image_names(out, m)
        if target.parent.resolve() == folder.resolve() and (target.name == MARKER or target.name in names):
            raise OutputError(f"export-coco: -o {target} would replace the export's own {target.name}; choose "
                              "another annotations file name")
        ours = {target.name, f"{target.name}.tmp", *names} if target.parent.resolve() == folder.resolve() \
            else set(names)
        taken = sorted(n for n in ours if _present(folder / n) and n not in (previous or set()))
        if taken:
            raise OutputError(f"export-coco --images: {folder / taken[0]} exists and no synthgen export wrote it "
                              f"({len(taken)} such file(s)); move it or choose another directory, nothing was written")
        folder.mkdir(parents=True, exist_ok=True)
        _write_record(folder, m["fingerprint"], ours | (previous or set()), complete=False)
    else:
        target = Path(path) if path else out / ANNOTATIONS
    coco_images, annotations = [], []
    for sample in iter_samples(out, m):
        rec = json.loads(sample["json"])
        image_id = rec["index"] + 1  # COCO ids start at 1 (0 reads as "missing" in some tools)
        file_name = f"{sample['__key__']}.jpg"
        coco_images.append({"id": image_id, "file_name": file_name, "width": rec["width"],
                            "height": rec["height"], "shard": Path(sample["__url__"]).name, "index": rec["index"],
                            "prompt": rec["prompt"]})
        for ann in rec.get("annotations") or []:
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": image_id})
        if folder is not None:
            if file_name not in ours:
                raise OutputError(f"{sample['__url__']}: holds {sample['__key__']}, which its index part does not "
                                  f"keep; the dataset is damaged (`synthgen verify {out}`)")
            _put(folder / file_name, sample["jpg"])
    categories = [{"id": i, "name": name, "supercategory": "object"} for i, name in category_names(m["job"]).items()]
    coco = {"info": {"description": f"synthgen job {m['job']['name']}", "version": m["fingerprint"][:12]},
            "images": coco_images, "annotations": annotations, "categories": categories}
    write_atomic(target, json.dumps(coco, separators=(",", ":")).encode())
    if folder is not None:
        written = ours - {f"{target.name}.tmp"}
        for stale in sorted((previous or set()) - written):  # an earlier export's files this one did not write
            (folder / stale).unlink(missing_ok=True)
        _write_record(folder, m["fingerprint"], written, complete=True)
    return target
