"""Train a small CNN classifier on synthgen output dirs with pipeline.loader, three ways:

  real-only    the real dir alone
  mixed        real + every synthetic level each epoch, no order (natural proportions or --real-fraction)
  curriculum   real + one synthetic level per stage: a fixed schedule (ascending image guidance,
               --epochs-per-level each, then real only) or the adaptive one (DisCL: the level whose
               probe metric, the mean correct-class probability on up to --probe samples of each
               level, rose most since its previous measurement)

then evaluates on a (balanced) real test set, itself an output dir, and prints + writes JSON: overall,
per-class and tail-class accuracy. Tail classes are --tail, else those with at most a tenth of the
largest class's real training samples.

Loss: per-sample cross-entropy x weight, averaged over the batch. The weight is the loader's score
weight (1 for real samples; --no-weights: 1 for all) times a class weight from each epoch's own label
counts, ``count ** -p`` scaled to a mean of 1 over the epoch (--balance: none p = 0, sqrt p = 0.5,
inverse p = 1), so every mode balances its classes by the same rule.

    python -m benchmarks.train_classifier --real out/lt-real --synthetic out/lt-variations \\
        --test out/shapes-test --mode curriculum --seed 0 --epochs 20 --json result.json

Importable: ``train(real_dir, test_dir, synthetic_dir=..., mode=..., seed=...) -> dict``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import write_result
from pipeline.loader import AdaptiveSchedule, CurriculumDataset, FixedSchedule, collate

MODES = ("real-only", "mixed", "curriculum")
SCHEDULES = ("fixed", "adaptive")
BALANCES = ("none", "sqrt", "inverse")
_BALANCE_POWER = {"none": 0.0, "sqrt": 0.5, "inverse": 1.0}


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-pool blocks (16, 32, 64, 128 channels), global average pooling, a linear head."""

    def __init__(self, num_classes: int):
        super().__init__()
        blocks, width = [], 3
        for out in (16, 32, 64, 128):
            blocks += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            width = out
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def prepare(images: torch.Tensor, flip: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float in [-1, 1]; with a generator, random horizontal flips."""
    x = images.float().div(127.5).sub(1.0)
    if flip is not None:
        mask = torch.rand(len(x), generator=flip) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


@torch.no_grad()
def predict(model: nn.Module, ds: CurriculumDataset, batch_size: int, limit: int | None = None):
    """(labels, probabilities) over ``ds`` (its first ``limit`` samples)."""
    model.eval()
    labels, probs = [], []
    samples = itertools.islice(iter(ds), limit)
    while batch := list(itertools.islice(samples, batch_size)):
        b = collate(batch)
        labels.append(b["label"])
        probs.append(model(prepare(b["image"])).softmax(-1))
    return torch.cat(labels), torch.cat(probs)


def evaluate(model: nn.Module, test: CurriculumDataset, batch_size: int, tail: list[str]) -> dict:
    labels, probs = predict(model, test, batch_size)
    correct = probs.argmax(-1) == labels
    per_class = {name: round(correct[labels == i].float().mean().item(), 4)
                 for i, name in enumerate(test.classes) if (labels == i).any()}
    tail_scores = [per_class[c] for c in tail if c in per_class]
    return {"accuracy": round(correct.float().mean().item(), 4), "per_class_accuracy": per_class,
            "tail_accuracy": round(sum(tail_scores) / len(tail_scores), 4) if tail_scores else None,
            "test_samples": len(labels)}


def class_weights(counts: dict[str, int], balance: str) -> torch.Tensor:
    """Loss weight per class (in ``counts`` order): proportional to ``count ** -p`` (p = 0 none,
    0.5 sqrt, 1 inverse), scaled so the mean weight over the counted samples is 1."""
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    n = torch.tensor(list(counts.values()), dtype=torch.float32)
    raw = torch.where(n > 0, n.clamp(min=1) ** -_BALANCE_POWER[balance], torch.zeros_like(n))
    return raw * n.sum() / (n * raw).sum()


def make_schedule(kind: str, levels: tuple, epochs_per_level: int):
    if kind == "fixed":
        return FixedSchedule(levels, epochs_per_level)
    if kind == "adaptive":
        return AdaptiveSchedule(levels, curriculum_epochs=len(levels) * epochs_per_level)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")


def train(real_dir: str | Path, test_dir: str | Path, synthetic_dir: str | Path | None = None,
          mode: str = "real-only", seed: int = 0, epochs: int = 20, epochs_per_level: int = 1,
          schedule: str = "fixed", real_fraction: float | None = None, batch_size: int = 32, lr: float = 3e-3,
          weights: bool = True, balance: str = "none", workers: int = 0, tail: list[str] | None = None,
          probe: int = 200, shuffle_buffer: int = 5000, json_path: str | Path | None = None) -> dict:
    """Train one classifier and evaluate it on ``test_dir``; returns (and optionally writes) the result.

    ``shuffle_buffer`` is the loader's (samples); keep it near the epoch size, as data written in class
    order (a COCO folder sorted by file name) otherwise gives class-correlated batches.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "real-only" and synthetic_dir is None:
        raise ValueError(f"mode {mode} needs a synthetic dir")
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    given = [real_dir] + ([synthetic_dir] if synthetic_dir is not None else [])
    classes = CurriculumDataset([*given, test_dir]).classes  # one label space for every mode
    test = CurriculumDataset(test_dir, classes=classes, shuffle=False)
    dirs = [real_dir] if mode == "real-only" else given
    ds = CurriculumDataset(dirs, classes=classes, real_fraction=real_fraction, seed=seed,
                           shuffle_buffer=shuffle_buffer)
    ds.set_epoch(0, ())
    train_counts = ds.label_counts()
    if tail is None:
        tail = [c for c, n in train_counts.items() if n <= max(train_counts.values()) / 10]
    sched = make_schedule(schedule, ds.levels, epochs_per_level) if mode == "curriculum" else None
    if sched is not None and epochs < sched.curriculum_epochs:
        raise ValueError(f"epochs ({epochs}) < the curriculum's {sched.curriculum_epochs} epochs "
                         f"({len(ds.levels)} levels x {epochs_per_level})")
    probe_ds = CurriculumDataset(synthetic_dir, classes=classes, shuffle=False) if schedule == "adaptive" \
        and sched is not None else None

    model = SmallCNN(len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    flip = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    history = []
    for epoch in range(epochs):
        if isinstance(sched, AdaptiveSchedule):
            sched.set_epoch(epoch)
        levels = sched.levels_for_epoch(epoch) if sched is not None else (() if mode == "real-only" else None)
        ds.set_epoch(epoch, levels)
        per_class = class_weights(ds.label_counts(), balance)
        model.train()
        total, seen = 0.0, 0
        for b in DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate):
            losses = loss_fn(model(prepare(b["image"], flip)), b["label"])
            w = (b["weight"] if weights else torch.ones_like(losses)) * per_class[b["label"]]
            loss = (losses * w).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(losses), seen + len(losses)
        cosine.step()
        row = {"epoch": epoch, "levels": list(ds.active), "samples": seen, "loss": round(total / max(seen, 1), 4)}
        if probe_ds is not None and levels:
            for level in ds.levels:
                probe_ds.set_epoch(0, [level])
                labels, probs = predict(model, probe_ds, batch_size, probe)
                sched.update(level, probs[torch.arange(len(labels)), labels].mean().item())
            row["progress"] = {str(lv): round(sched.progress(lv), 4) for lv in ds.levels}
        history.append(row)
        print(json.dumps(row), flush=True)

    result = {"mode": mode, "schedule": schedule if sched is not None else None, "seed": seed, "epochs": epochs,
              "classes": list(classes), "train_real_counts": train_counts, "tail_classes": tail,
              "weights": weights, "balance": balance, "real_fraction": real_fraction,
              "levels_per_epoch": [h["levels"] for h in history], "history": history,
              **evaluate(model, test, batch_size, tail), "wall_s": round(time.perf_counter() - t0, 1)}
    if json_path is not None:
        write_result(json_path, result, indent=1)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", required=True, help="output dir of the real training set")
    p.add_argument("--test", required=True, help="output dir of the balanced real test set")
    p.add_argument("--synthetic", help="output dir of synthetic samples (mixed, curriculum)")
    p.add_argument("--mode", choices=MODES, default="real-only")
    p.add_argument("--schedule", choices=SCHEDULES, default="fixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--epochs-per-level", type=int, default=1)
    p.add_argument("--real-fraction", type=float, help="share of real samples per epoch (default: natural)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--no-weights", action="store_true", help="ignore the loader's per-sample weights")
    p.add_argument("--balance", choices=BALANCES, default="none",
                   help="class weights ~ count^-p from each epoch's label counts (none 0, sqrt 0.5, inverse 1)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--tail", help="comma-separated tail classes (default: <= 1/10 of the largest class)")
    p.add_argument("--probe", type=int, default=200, help="adaptive schedule: samples per level to probe")
    p.add_argument("--shuffle-buffer", type=int, default=5000, help="loader shuffle buffer (samples)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", help="write the result here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = train(a.real, a.test, synthetic_dir=a.synthetic, mode=a.mode, seed=a.seed, epochs=a.epochs,
                   epochs_per_level=a.epochs_per_level, schedule=a.schedule, real_fraction=a.real_fraction,
                   batch_size=a.batch_size, lr=a.lr, weights=not a.no_weights, balance=a.balance, workers=a.workers,
                   tail=a.tail.split(",") if a.tail else None, probe=a.probe,
                   shuffle_buffer=a.shuffle_buffer, json_path=a.json)
    print(json.dumps({k: result[k] for k in ("mode", "seed", "accuracy", "tail_accuracy", "per_class_accuracy")}))


if __name__ == "__main__":
    main()
