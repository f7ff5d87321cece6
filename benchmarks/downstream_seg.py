"""Downstream check: is a segmenter trained on synthgen's synthetic data as good on real images?

Trains the same small U-Net (pure torch) with identical settings — same initialisation,
optimizer, schedule, number of gradient steps, batch order and augmentation (flips, 90° turns) —
(a) on the first K kept samples of a synthgen output dir, (b) on K real shapes-world scenes, then
evaluates both on a real shapes-world test set. Each arm is trained with ``--seeds`` seeds (default 3)
and its median-mIoU run stands for it: at this size one initialisation in a few leaves two classes in
a dead zone (seen: star and triangle at 0.00 on the training set itself). Prints per-class IoU of the
median runs, every run's mIoU, and mIoU(a) / mIoU(b) (target >= 0.90), and writes a JSON.

    python -m benchmarks.downstream_seg                            # generate K with jobs/shapes-demo.yaml
    python -m benchmarks.downstream_seg --synthetic out/shapes-demo --k 294
    python -m benchmarks.downstream_seg --k 40 --steps 10 --test 50 --json /tmp/ds.json   # smoke run

Without ``--synthetic`` the job (default ``jobs/shapes-demo.yaml``, ``--set`` overrides allowed) is run
in-process (``--no-ray``) with ``samples`` = K + 5 % (filters reject a few) into
``out/downstream-seg/<job name>-<fingerprint>``; a rerun of the same job and model reuses it. Each
training run's scores are kept in ``out/downstream-seg/runs/``, keyed by the arm, its data, the training
settings and a digest of this file: a rerun, or a run killed halfway, trains only what is missing.

Seeds: the bundled model trained on scenes < HELD_OUT_SEED; real training scenes are
HELD_OUT_SEED + 3_000_000 + i, test scenes HELD_OUT_SEED + 4_000_000 + i. The synthetic seg.png
holds 0 background, 1 + i = the sample's ``class_names[i]``, 255 ignore; it is mapped to the world's
global ids (0 background, 1 + CLASSES.index(name)); ignore pixels do not count in the loss.
mIoU is the mean over the 6 object classes; background IoU is reported separately.

Defaults (K = 800, 1500 AdamW steps of batch 32, a 320 k-parameter U-Net, width 16): trained on real
scenes the network reaches test mIoU ~0.95; each training takes 10-12 min on 2 CPU cores, ~75 min in all
(3 seeds per arm) with generating the synthetic set. At width 8 (80 k parameters) the network fitted the
real set but, in 2 of 3 seeds, not the synthetic set's stars and triangles (IoU 0 on its own training
images): too small to measure the data with.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from benchmarks.common import (
    REPO,
    cached_run,
    checked,
    code_digest,
    generate_cached,
    write_result,
)
from pipeline.shapes.world import CLASSES, HELD_OUT_SEED, render_scene
from pipeline.spec import UsageError, load_spec

NUM_CLASSES = 1 + len(CLASSES)  # background + the world's classes
IGNORE = 255
REAL_TRAIN_SEED = HELD_OUT_SEED + 3_000_000
TEST_SEED = HELD_OUT_SEED + 4_000_000
TARGET_RATIO = 0.90


# --- data --------------------------------------------------------------------------------------
def to_global(local: np.ndarray, class_names: Sequence[str], where: str = "mask") -> np.ndarray:
    """Map a sample's seg.png (0 bg, 1 + i = class_names[i], 255 ignore) to global ids
    (0 bg, 1 + CLASSES.index(name), 255 ignore). Raises ValueError on unknown names or values."""
    lut = np.full(256, -1, np.int16)
    lut[0], lut[IGNORE] = 0, IGNORE
    for i, name in enumerate(class_names):
        if name not in CLASSES:
            raise ValueError(f"{where}: class {name!r} is not a shapes-world class {CLASSES}")
        lut[1 + i] = 1 + CLASSES.index(name)
    mapped = lut[local]
    if (mapped < 0).any():
        bad = sorted(int(v) for v in np.unique(local[mapped < 0]))
        raise ValueError(f"{where}: seg.png values {bad} name no class (class_names has {len(class_names)})")
    return mapped.astype(np.uint8)


@dataclass
class SyntheticSet:
    images: np.ndarray  # uint8 (N, H, W, 3)
    masks: np.ndarray  # uint8 (N, H, W) global ids, 255 ignore
    keys: list[str]
    not_kept: int  # samples in the shards whose json says keep=False (skipped)
    counts: dict = field(default_factory=dict)  # the manifest's counts (indices, samples, rejected, ...)


def shard_paths(out: Path) -> tuple[list[str], dict]:
    """The committed shard tars of a synthgen output dir (manifest order) and its manifest."""
    from pipeline.dataset import read_manifest

    manifest = read_manifest(out)
    paths = [str(out / s["tar"]) for s in manifest["shards"]]
    if not paths:
        raise UsageError(f"{out}: the manifest lists no complete shard; run the job first")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UsageError(f"{out}: shard {missing[0]} is listed in manifest.json but missing")
    return paths, manifest


def read_kept(out: Path, limit: int | None, labeller: Callable[[dict], Callable[[dict, dict, np.ndarray, str], Any]],
              ) -> tuple[np.ndarray, list, list[str], int, dict]:
    """The first ``limit`` kept samples (index order) of a synthgen output dir, for both downstream benchmarks:
    images (uint8, one shape), each one's label — ``labeller(manifest)(sample, record, image, where)`` — keys,
    the number of samples skipped as not kept, and the manifest."""
    import webdataset as wds

    paths, manifest = shard_paths(Path(out))
    label = labeller(manifest)
    images, labels, keys, not_kept = [], [], [], 0
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        if not meta["keep"]:
            not_kept += 1
            continue
        where = f"{sample['__url__']}:{sample['__key__']}"
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        if images and image.shape != images[0].shape:
            raise UsageError(f"{where}: image is {image.shape}, earlier samples are {images[0].shape}")
        labels.append(label(sample, meta, image, where))
        images.append(image)
        keys.append(sample["__key__"])
        if limit is not None and len(images) == limit:
            break
    if not images:
        raise UsageError(f"{out}: no kept sample in the shards")
    return np.stack(images), labels, keys, not_kept, manifest


def global_mask(sample: dict, meta: dict, image: np.ndarray, where: str) -> np.ndarray:
    """A sample's seg.png in the world's global ids (:func:`to_global`), checked against its image."""
    local = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))
    if local.shape != image.shape[:2]:
        raise UsageError(f"{where}: seg.png is {local.shape}, image is {image.shape[:2]}")
    try:
        return to_global(local, meta["class_names"], where)
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_synthetic(out: Path, limit: int | None = None) -> SyntheticSet:
    """The first ``limit`` kept samples (index order) of a synthgen output dir, masks in global ids."""
    images, masks, keys, not_kept, manifest = read_kept(out, limit, lambda manifest: global_mask)
    return SyntheticSet(images, np.stack(masks), keys, not_kept, manifest.get("counts", {}))


def check_size(height: int, width: int, where: str) -> None:
    """The synthetic images must be square (the world renders squares) with sides divisible by 8 (U-Net)."""
    if height != width or height % 8:
        raise UsageError(f"{where}: images are {height}x{width}; this benchmark needs square images with sides "
                         "divisible by 8 (set generation.height = generation.width, e.g. 64)")


def render_real(first_seed: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """n shapes-world scenes (seeds first_seed + i): images uint8 (n, size, size, 3), masks uint8 (n, size, size)."""
    scenes = [render_scene(first_seed + i, size=size) for i in range(n)]
    return np.stack([s.image for s in scenes]), np.stack([s.semantic_mask() for s in scenes])


def generate(job: str, overrides: Sequence[str], k: int, out_root: Path) -> tuple[Path, float]:
    """Run the job in-process with samples = K + 5 % into out_root/<name>-<fingerprint>; (dir, wall s)."""
    overrides = [*overrides, f"samples={k + max(1, math.ceil(0.05 * k))}"]
    spec = load_spec(job, overrides, check_files=False)
    check_size(spec.generation.height, spec.generation.width, job)
    made = generate_cached(job, overrides, out_root)
    return made.out, made.wall_s


# --- model ---------------------------------------------------------------------------------------
def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyUNet(nn.Module):
    """A three-level U-Net (widths w, 2w, 4w; bottleneck 4w at 1/8 size); input sides must be multiples of 8."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16):
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        self.down = nn.ModuleList()
        cin = 3
        for w in widths:
            self.down.append(conv_block(cin, w))
            cin = w
        self.mid = conv_block(cin, cin)
        self.ups, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for w in reversed(widths):
            self.ups.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.up_blocks.append(conv_block(2 * w, w))
            cin = w
        self.head = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.mid(x)
        for up, block, skip in zip(self.ups, self.up_blocks, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random horizontal flip and 90° turn (square images), the same for image and mask."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    y = torch.where(flip[:, None, None], y.flip(-1), y)
    if x.shape[-1] == x.shape[-2]:
        turns = torch.randint(0, 4, (len(x),), generator=gen)
        x, y = x.clone(), y.clone()
        for k in range(1, 4):
            sel = turns == k
            x[sel] = torch.rot90(x[sel], k, (-2, -1))
            y[sel] = torch.rot90(y[sel], k, (-2, -1))
    return x, y


def masked_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over non-ignore pixels (0 rather than NaN when a batch has none)."""
    total = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp(min=1)


@dataclass
class TrainSettings:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 16
    seed: int = 0


def fit(make_model: Callable[[], nn.Module], n: int, cfg: TrainSettings,
        batch_loss: Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]) -> tuple[nn.Module, dict]:
    """The downstream benchmarks' training loop: a fresh model (made after seeding torch with cfg.seed), cfg.steps
    AdamW + one-cycle steps over shuffled epochs of ``n`` samples; ``batch_loss(model, indices, generator)``
    gives a batch's loss (augmenting with the seeded generator). Returns the model and its training stats."""
    torch.manual_seed(cfg.seed)
    model = make_model()
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    bs = min(cfg.batch_size, n)
    order, pos, losses = torch.randperm(n, generator=gen), 0, []
    model.train()
    t0 = time.perf_counter()
    for _step in range(cfg.steps):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + bs]
        pos += bs
        loss = batch_loss(model, idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    tail = losses[-max(1, len(losses) // 10):]
    return model, {"wall_s": round(time.perf_counter() - t0, 2), "final_loss": round(float(np.mean(tail)), 4),
                   "first_loss": round(losses[0], 4), "epochs": round(cfg.steps * bs / n, 2)}


def train(images: np.ndarray, masks: np.ndarray, cfg: TrainSettings) -> tuple[TinyUNet, dict]:
    """Train a fresh TinyUNet (seeded) on the images and class maps (:func:`fit`)."""
    x_all, y_all = to_input(images), torch.from_numpy(masks.astype(np.int64))

    def batch_loss(model: nn.Module, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x, y = augment(x_all[idx], y_all[idx], gen)
        return masked_ce(model(x), y)

    return fit(lambda: TinyUNet(width=cfg.width), len(x_all), cfg, batch_loss)


def trained(images: np.ndarray, masks: np.ndarray, cfg: TrainSettings, test_x: np.ndarray, test_y: np.ndarray) -> dict:
    """One training run and its test scores: ``{seed, train, test}``."""
    model, stats = train(images, masks, cfg)
    return {"seed": cfg.seed, "train": stats, "test": evaluate(model, test_x, test_y)}


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
    """Argmax class map uint8 (N, H, W)."""
    model.eval()
    out = [model(to_input(images[i:i + batch_size])).argmax(1).to(torch.uint8).numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


# --- metrics --------------------------------------------------------------------------------------
def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(C, C) pixel counts, rows = target class, columns = predicted class; ignore pixels skipped."""
    valid = target != IGNORE
    t, p = target[valid].astype(np.int64), pred[valid].astype(np.int64)
    if t.size and (t.max() >= num_classes or p.max() >= num_classes):
        raise ValueError(f"class ids must be < {num_classes} (or {IGNORE} = ignore in the target)")
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_report(conf: np.ndarray) -> dict:
    """Per-class IoU (None where a class is neither in the target nor predicted), background IoU,
    mIoU over the object classes and mIoU including background."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    objects = iou[1:]
    return {
        "per_class": {name: (None if math.isnan(v) else round(float(v), 4)) for name, v in zip(CLASSES, objects)},
        "background": None if math.isnan(iou[0]) else round(float(iou[0]), 4),
        "miou": round(float(np.nanmean(objects)), 4) if not np.isnan(objects).all() else None,
        "miou_with_background": round(float(np.nanmean(iou)), 4) if not np.isnan(iou).all() else None,
        "pixel_accuracy": round(float(tp.sum() / max(conf.sum(), 1)), 4),
    }


def evaluate(model: nn.Module, images: np.ndarray, masks: np.ndarray) -> dict:
    return iou_report(confusion(predict(model, images), masks))


def label_stats(masks: np.ndarray) -> dict:
    """Pixel fractions: background, ignore, and each object class."""
    counts = np.bincount(masks.ravel(), minlength=256)
    total = max(int(counts.sum()), 1)
    return {"background": round(counts[0] / total, 4), "ignore": round(counts[IGNORE] / total, 4),
            **{name: round(counts[1 + i] / total, 4) for i, name in enumerate(CLASSES)}}


# --- CLI --------------------------------------------------------------------------------------------
def print_table(results: dict) -> None:
    a, b = results["synthetic"]["test"], results["real"]["test"]
    print(f"\n{'class':<12}{'(a) synthetic':>15}{'(b) real':>10}")
    fmt = lambda v: f"{v:>.3f}" if v is not None else "  -  "  # noqa: E731
    for name in CLASSES:
        print(f"{name:<12}{fmt(a['per_class'][name]):>15}{fmt(b['per_class'][name]):>10}")
    for label, key in (("background", "background"), ("mIoU", "miou"), ("mIoU+bg", "miou_with_background")):
        print(f"{label:<12}{fmt(a[key]):>15}{fmt(b[key]):>10}")
    r = results["ratio"]
    verdict = "n/a" if r is None else ("✔" if r >= TARGET_RATIO else "✘")
    for name in ("synthetic", "real"):
        runs = results[name]["miou_runs"]
        print(f"{name} mIoU per seed: {runs} (median: seed {results[name]['median_seed']})")
    print(f"\nratio mIoU(a)/mIoU(b) = {r if r is not None else '-'}  (target >= {TARGET_RATIO}) {verdict}")


def parse_args(argv: Sequence[str] | None, prog: str = "benchmarks.downstream_seg", description: str = __doc__,
               json_default: Path = REPO / "benchmarks" / "results" / "downstream_seg.json") -> argparse.Namespace:
    """The options of the downstream benchmarks (segmentation here, detection in downstream_det)."""
    ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--synthetic", type=Path, help="an existing synthgen output dir (instead of --job)")
    src.add_argument("--job", default=str(REPO / "jobs" / "shapes-demo.yaml"), help="job file to generate from")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="job overrides (with --job)")
    ap.add_argument("--synthetic-root", type=Path, default=REPO / "out" / "downstream-seg",
                    help="where --job writes its output (a subfolder per job fingerprint)")
    ap.add_argument("--k", type=int, default=800, help="training images for each of (a) and (b)")
    ap.add_argument("--test", type=int, default=300, help="real test scenes")
    ap.add_argument("--steps", type=int, default=1500, help="gradient steps for each training")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=16, help="U-Net base width")
    ap.add_argument("--seed", type=int, default=0, help="first training seed")
    ap.add_argument("--seeds", type=int, default=3,
                    help="trainings per arm (seeds seed..seed+N-1); the run with the median score stands for the arm")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training")
    ap.add_argument("--json", type=Path, default=json_default)
    args = ap.parse_args(argv)
    args.command = " ".join([f"python -m {prog}", *(sys.argv[1:] if argv is None else argv)])
    for name in ("k", "test", "steps", "batch_size", "threads", "width"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    if args.synthetic is not None and args.set:
        ap.error("--set applies to --job; it cannot change an existing --synthetic dir")
    return args


def synthetic_dir(args: argparse.Namespace) -> tuple[Path, float | None]:
    """The synthetic set's output dir: ``--synthetic`` as given (checked before any work), or the job
    generated once into ``--synthetic-root``; and the generation's wall seconds (None for ``--synthetic``)."""
    if args.synthetic is not None:
        shard_paths(args.synthetic)
        return args.synthetic, None
    return generate(args.job, args.set, args.k, args.synthetic_root)


def seed_runs(arm: str, n: int, seeds: range, cache: Path, key: Callable[[int], dict], one: Callable[[int], dict],
              score: str, describe: Callable[[dict], str]) -> tuple[list[dict], dict]:
    """One training run of an arm per seed, each cached under ``cache`` by ``key(seed)`` (``one(seed)`` trains
    and scores it: ``{seed, train, test}``); prints each; returns the runs and the one whose ``test[score]`` is
    the median. The median run stands for the arm: one unlucky initialisation (a tiny network can leave two
    classes in a dead zone) does not decide the comparison, and every run is reported."""
    runs = []
    for seed in seeds:
        print(f"training ({'a' if arm == 'synthetic' else 'b'}) on {n} {arm} images, seed {seed} ...", flush=True)
        result, reused = cached_run(cache, key(seed), lambda seed=seed: one(seed))
        runs.append({**result, "reused": reused})
        print(f"  {result['train']['wall_s']} s, loss {result['train']['first_loss']} -> {result['train']['final_loss']}, "
              f"{describe(result['test'])}{' (reused)' if reused else ''}", flush=True)
    return runs, sorted(runs, key=lambda r: r["test"][score] or 0.0)[(len(runs) - 1) // 2]


def ratios(a: float | None, b: float | None, a_runs: Sequence, b_runs: Sequence) -> tuple[float | None, list]:
    """a / b of the median runs, and per seed."""
    div = lambda x, y: round(x / y, 4) if x is not None and y else None  # noqa: E731
    return div(a, b), [div(x, y) for x, y in zip(a_runs, b_runs)]


def machine(threads: int) -> dict:
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(),
            "torch": torch.__version__}


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    out, gen_s = synthetic_dir(args)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    syn = load_synthetic(out, args.k)
    n, (height, width) = len(syn.images), syn.images.shape[1:3]
    if n < args.k:
        print(f"warning: {out} has only {n} kept samples (< K={args.k}); both trainings use {n}")
    check_size(height, width, str(out))
    real_x, real_y = render_real(REAL_TRAIN_SEED, n, height)
    test_x, test_y = render_real(TEST_SEED, args.test, height)
    data_s = time.perf_counter() - t0

    cfg = TrainSettings(args.steps, args.batch_size, args.lr, width=args.width, seed=args.seed)
    code = code_digest("benchmarks/downstream_seg.py", "pipeline/shapes/world.py")
    data = {"synthetic": {"dir": str(Path(out).resolve()), "keys": [syn.keys[0], syn.keys[-1]], "n": n},
            "real": {"first_seed": REAL_TRAIN_SEED, "n": n, "size": height}}
    results = {}
    for name, (x, y) in (("synthetic", (syn.images, syn.masks)), ("real", (real_x, real_y))):
        runs, median = seed_runs(
            name, n, range(args.seed, args.seed + args.seeds), args.synthetic_root / "runs",
            key=lambda seed, name=name: {"arm": name, "data": data[name],
                                         "test": {"first_seed": TEST_SEED, "n": args.test, "size": height},
                                         "training": replace(cfg, seed=seed).__dict__, "threads": args.threads,
                                         "code": code},
            one=lambda seed, x=x, y=y: trained(x, y, replace(cfg, seed=seed), test_x, test_y),
            score="miou", describe=lambda test: f"test mIoU {test['miou']}")
        results[name] = {"labels": label_stats(y), "train": median["train"], "test": median["test"],
                         "median_seed": median["seed"], "miou_runs": [r["test"]["miou"] for r in runs], "runs": runs}
    ratio, per_seed = ratios(results["synthetic"]["test"]["miou"], results["real"]["test"]["miou"],
                             results["synthetic"]["miou_runs"], results["real"]["miou_runs"])
    return {
        "machine": machine(args.threads),
        "command": args.command,
        "k": args.k, "train_images": n, "test_images": args.test,
        "model": {"name": "TinyUNet", "width": args.width,
                  "parameters": sum(p.numel() for p in TinyUNet(width=args.width).parameters())},
        "training": {**cfg.__dict__, "optimizer": "AdamW", "schedule": "one-cycle", "augmentation": "flip, rot90",
                     "loss": f"cross-entropy, ignore {IGNORE}"},
        "seeds": {"real_train": [REAL_TRAIN_SEED, REAL_TRAIN_SEED + n - 1],
                  "test": [TEST_SEED, TEST_SEED + args.test - 1]},
        "synthetic_source": {"dir": str(out), "generated": gen_s is not None, "job": None if gen_s is None else args.job,
                             "overrides": args.set, "manifest_counts": syn.counts, "kept_used": n,
                             "not_kept_skipped": syn.not_kept, "first_key": syn.keys[0], "last_key": syn.keys[-1]},
        "wall_s": {"generation": None if gen_s is None else round(gen_s, 1), "data": round(data_s, 2),
                   "train_synthetic": results["synthetic"]["train"]["wall_s"],
                   "train_real": results["real"]["train"]["wall_s"],
                   "total": round(time.perf_counter() - t_start, 1)},
        "synthetic": results["synthetic"], "real": results["real"],
        "ratio": ratio, "ratio_per_seed": per_seed, "target_ratio": TARGET_RATIO,
    }


def cli(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict], table: Callable[[dict], None]) -> int:
    """Run a downstream benchmark: exit 2 after one line on bad input, else print its table and write its JSON."""
    report = checked(run, args)
    if report is None:
        return 2
    table(report)
    write_result(args.json, report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(parse_args(argv), run, print_table)


if __name__ == "__main__":
    sys.exit(main())
