"""Reading an output directory back: summary table, inspect, preview contact sheet (the COCO export is
:mod:`pipeline.export_coco`)."""
from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .dataset import INDEX, OutputError, category_names as _job_categories, read_index, read_manifest, write_atomic

#: overlay colours for mask values 1, 2, ... (class_names order of the sample)
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
#: the preview legend: white names on a dark, slightly see-through box; text height = image height / this,
#: at least LEGEND_MIN_PX (16 px on the 192 px tiles of the bundled model's 64 px images)
LEGEND_BOX, LEGEND_TEXT = (0, 0, 0, 200), (255, 255, 255)
LEGEND_LINES_PER_IMAGE, LEGEND_MIN_PX = 12, 14


def _table(header: list[str], rows: list[list[Any]], text_columns: int = 1) -> str:
    """Plain-text table: the first ``text_columns`` columns left-aligned, the rest right-aligned."""
    cells = [header] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table: per-stage throughput, verdicts, shards, wall time."""
    stages, ray = summary["stages"], summary["runner"] == "ray"
    if ray:  # where each stage ran and what it reserved
        header = ["stage", "ray operator", "kind", "workers", "cpus", "gpus"]
        rows = [[s["name"], s.get("operator") or "-", s["kind"], s["workers"], f"{s['num_cpus']:g}",
                 f"{s['num_gpus']:g}"] for s in stages]
    else:  # one process ran every stage: no operators, workers or reservations
        header, rows = ["stage (in-process)"], [[s["name"]] for s in stages]
    rows = [row + [s["rows"], f"{s['busy_s']:.2f}", s["rows_per_busy_s"]] for row, s in zip(rows, stages)]
    out = [_table(header + ["rows", "busy s", "rows/busy s"], rows, text_columns=3 if ray else 1)] if rows else []
    processed = summary["processed"]
    kept_pct = f" ({100 * summary['kept'] / processed:.1f}%)" if processed else ""
    out.append(f"this run: {processed} samples, {summary['kept']} kept{kept_pct}, {summary['rejected']} rejected"
               + "".join(f"\n  rejected {reason}: {n}" for reason, n in summary["rejected_by_reason"].items())
               + (f"\n  redrawn: {summary['redraws']} extra draws (generation.redraws)" if summary.get("redraws") else ""))
    data = summary["dataset"]
    out.append(f"dataset: {data.get('samples', 0)} samples kept of {data.get('indices', 0)}, "
               f"{summary['shards_complete']}/{summary['shards_total']} shards complete "
               f"({summary['shards_written']} written this run)")
    auto = summary.get("batch_size_auto")
    if auto:
        out.append(f"batch size: {auto['batch_size']} (generation.batch_size auto: "
                   + ("measured at this run's start)" if auto["from"] == "measured" else "as the first run measured)"))
    for name, problem in (summary.get("redone") or {}).items():
        out.append(f"redone: {name} ({problem})")
    if summary.get("left_alone"):
        names = summary["left_alone"]
        out.append(f"left alone: {len(names)} file(s) in the output dir that synthgen did not write: "
                   f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    if summary["runner"] == "none":
        out.append("nothing to do: every shard of the job is committed (--overwrite regenerates the dataset)")
    else:
        rate = f", {summary['images_per_s']:.2f} img/s" if summary.get("images_per_s") else ""
        out.append(f"wall time: {summary['wall_s']:.1f} s ({summary['runner']}){rate}")
    return "\n".join(out)


def iter_samples(out: Path, manifest: dict | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__`` plus member bytes) of every committed shard, in index order;
    ``out`` is a path or a URI (s3://...: shards are streamed through its filesystem)."""
    from .storage import location, tar_samples

    manifest = manifest or read_manifest(out)
    yield from tar_samples([location(out) / s["tar"] for s in manifest["shards"]])


def inspect_text(out: Path, n: int = 3) -> str:
    """Manifest overview, the last run's summary table and ``n`` sample records."""
    from .storage import location

    out = location(out)
    m = read_manifest(out)
    job, counts = m["job"], m["counts"]
    model = job.get("model") or {}  # an import-coco dataset has no model
    lines = [f"{out}: job {job['name']!r}, fingerprint {m['fingerprint'][:12]}, "
             f"{'complete' if m['complete'] else 'INCOMPLETE'}",
             (f"model: {m['model'].get('model')} ({model['dtype']}, {model['device']})" if model
              else f"source: {m['model'].get('source')} {m['model'].get('annotations', '')}"),
             f"shards: {counts.get('shards', 0)}/{m['layout']['num_shards']} x {m['layout']['shard_size']} "
             f"indices; {counts.get('samples', 0)} samples kept, {counts.get('rejected', 0)} rejected "
             f"{counts.get('rejected_by_reason', {})}"]
    if m.get("summary"):
        lines += ["", "last run:", format_summary(m["summary"])]
    if (out / INDEX).is_file() and n > 0:
        rows = read_index(out / INDEX).slice(0, n).to_pylist()
        lines += ["", f"first {len(rows)} of index.parquet:", *map(_index_line, rows)]
    for sample in islice(iter_samples(out, m), n):
        rec = json.loads(sample["json"])
        anns = [(a["category_id"], [round(v, 1) for v in a["bbox"]], a["area"]) for a in rec.get("annotations") or []]
        lines += ["", f"{sample['__key__']}: members {sorted(k for k in sample if not k.startswith('_'))}",
                  f"  prompt {rec.get('prompt')!r}, classes {rec.get('class_names')}, "
                  f"{rec.get('width')}x{rec.get('height')}",
                  f"  annotations (category_id, bbox, area): {anns}"]
        if isinstance(rec.get("gen"), dict):
            lines.append(f"  gen: {_gen_line(rec['gen'])}")
    return "\n".join(lines)


def _gen_line(gen: dict) -> str:
    """A sample's ``gen`` in one line: the settings and options as recorded, the capture's layout and each rejected
    attempt's detail shortened (the full record is the sample's .json)."""
    short = {k: v for k, v in gen.items() if k not in ("capture", "rejected")}
    if gen.get("rejected"):
        short["rejected"] = [r.get("reason") for r in gen["rejected"]]
    return json.dumps(short, separators=(", ", ": "))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def status_text(out: Any, now: datetime | None = None) -> str:
    """A job's progress from its manifest and journal alone (a local path or a URI; no shard is read):
    shards committed and pending, samples kept and rejected by reason, and for a run going on (or one that
    stopped without finishing) its start, host, recoveries, rate over the run so far and ETA."""
    from .storage import location

    out = location(out)
    if not out.exists():
        raise OutputError(f"{out} does not exist: no run has committed a shard there yet (a run stopped before its "
                          "first commit leaves nothing); rerun its command to start")
    m = read_manifest(out, names=False)  # counts only: no file the records name is opened
    counts, layout, running = m["counts"], m["layout"], m.get("running")
    done, total = counts.get("indices", 0), layout["samples"]
    state = "complete" if m["complete"] else ("running, or stopped" if running else "incomplete")
    lines = [f"{out}: job {m['job']['name']!r}: {state}",
             f"shards: {counts.get('shards', 0)} of {layout['num_shards']} committed, "
             f"{layout['num_shards'] - counts.get('shards', 0)} pending",
             f"samples: {done} of {total} done: {counts.get('samples', 0)} kept, {counts.get('rejected', 0)} rejected"
             + (f" {counts['rejected_by_reason']}" if counts.get("rejected_by_reason") else "")]
    if running:
        started = datetime.fromisoformat(running["started"])
        elapsed = max(((now or datetime.now(timezone.utc)) - started).total_seconds(), 1e-9)
        made = done - running.get("samples_at_start", 0)
        rate = made / elapsed
        eta = f"; ETA {_duration((total - done) / rate)} at this rate" if rate > 0 else ""
        lines += [f"run: started {running['started']} on {running.get('host')} (pid {running.get('pid')}), "
                  f"{running.get('recoveries', 0)} recoveries; if it stopped, rerun its command to resume",
                  f"rate: {rate:.2f} samples/s over the run ({made} in {_duration(elapsed)}){eta}"]
    elif m.get("summary"):
        last = m["summary"]
        lines.append(f"last run: {last.get('processed')} samples in {last.get('wall_s')} s "
                     f"({last.get('images_per_s')} samples/s), {len(last.get('recoveries') or [])} recoveries")
    return "\n".join(lines)


def _index_line(row: dict) -> str:
    """One index row: key, verdict, instances found per class (or the classes), scores and curriculum level."""
    found = ", ".join(f"{i['name']} x{i['count']}" for i in row["instances"]) if row["instances"] is not None \
        else ", ".join(row["classes"])
    scores, cur = row["scores"] or {}, row["curriculum"] or {}
    extra = "".join(f"  {name} {value}" for name, value in (("min_contrast", scores.get("min_contrast")),
                                                             ("level", cur.get("level")),
                                                             ("source", cur.get("source"))) if value is not None)
    return f"  {row['key']}  keep={row['keep']} {row['reject_reason']!s:>12}  [{found}]{extra}  {row['prompt']!r}"


def category_names(manifest: dict) -> dict[int, str]:
    """COCO category id -> class name (id = 1 + position in the job's classes)."""
    return _job_categories(manifest["job"])


def legend(tile: Image.Image, names: list[str], height: int) -> None:
    """Draw the legend into the top-left corner of ``tile``: per prompted class (``names``, the sample's
    ``class_names``) a swatch of its mask and box colour and its name, one class a line, on a dark box.
    Text is ``height / LEGEND_LINES_PER_IMAGE`` pixels (readable at 100 % zoom); Pillow >= 10.1."""
    if not names:
        return
    font = ImageFont.load_default(size=max(LEGEND_MIN_PX, height // LEGEND_LINES_PER_IMAGE))
    draw = ImageDraw.Draw(tile, "RGBA")
    ascent, descent = font.getmetrics()
    line, pad, swatch = ascent + descent, 3, ascent - 2
    width = 3 * pad + swatch + max(draw.textlength(name, font=font) for name in names)
    draw.rectangle([0, 0, width, 2 * pad + line * len(names)], fill=LEGEND_BOX)
    for i, name in enumerate(names):
        y = pad + i * line
        draw.rectangle([pad, y + 2, pad + swatch, y + 2 + swatch], fill=PALETTE[i % len(PALETTE)])
        draw.text((2 * pad + swatch, y), name, fill=LEGEND_TEXT, font=font)


def overlay(sample: dict[str, Any], scale: int, categories: dict[int, str]) -> Image.Image:
    """One sample as a pair: the image, with the legend (:func:`legend`), and the image tinted by its
    semantic mask (one colour per prompted class, ignore grey) with its instance boxes."""
    image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
    rec = json.loads(sample["json"])
    names = rec.get("class_names") or []
    rgb = np.asarray(image, np.float32)
    if "seg.png" in sample:
        mask = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))
        for value in np.unique(mask):
            if value == 0:
                continue
            color = (128, 128, 128) if value == 255 else PALETTE[(int(value) - 1) % len(PALETTE)]
            sel = mask == value
            rgb[sel] = 0.4 * rgb[sel] + 0.6 * np.array(color, np.float32)
    w, h = image.size
    size = (w * scale, h * scale)
    tile = Image.new("RGB", (2 * size[0], size[1]))
    tile.paste(image.resize(size, Image.NEAREST), (0, 0))
    tile.paste(Image.fromarray(rgb.round().astype(np.uint8)).resize(size, Image.NEAREST), (size[0], 0))
    draw = ImageDraw.Draw(tile)
    for ann in rec.get("annotations") or []:
        name = categories.get(ann["category_id"])
        color = PALETTE[names.index(name) % len(PALETTE)] if name in names else (255, 255, 255)
        x, y, bw, bh = (v * scale for v in ann["bbox"])
        draw.rectangle([size[0] + x, y, size[0] + x + bw - 1, y + bh - 1], outline=color, width=2)
    legend(tile, names, size[1])
    return tile


def preview(out: Path, path: Path, n: int = 16, columns: int = 4) -> Path:
    """A contact sheet (PNG) of the first ``n`` kept samples, each as image | mask and box overlay."""
    manifest = read_manifest(out)
    samples = list(islice(iter_samples(out, manifest), n))
    if not samples:
        raise OutputError(f"{out}: no samples in committed shards to preview")
    first = Image.open(io.BytesIO(samples[0]["jpg"]))
    scale = max(1, 192 // max(first.size))
    tiles = [overlay(s, scale, category_names(manifest)) for s in samples]
    tw, th = tiles[0].size
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (min(columns, len(tiles)) * tw, rows * th), (0, 0, 0))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * tw, (i // columns) * th))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_atomic(Path(path), buf.getvalue())
    return Path(path)
