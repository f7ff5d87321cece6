"""Training loader: a PyTorch ``IterableDataset`` over synthgen output directories, real and synthetic.

    from torch.utils.data import DataLoader
    from pipeline.loader import CurriculumDataset, FixedSchedule, collate

    ds = CurriculumDataset(["out/shapes-real", "out/shapes-variations"], real_fraction=None)
    schedule = FixedSchedule(ds.levels, epochs_per_level=2)      # ascending image guidance, then real only
    loader = DataLoader(ds, batch_size=64, num_workers=4, collate_fn=collate)
    for epoch in range(epochs):
        ds.set_epoch(epoch, schedule.levels_for_epoch(epoch))   # before iter(loader)
        for batch in loader: ...   # image (B,3,H,W) uint8, label (B,), labels (B,C), weight (B,), key, ...

What is read: each directory's ``index.parquet`` (which key lives in which shard, keep, classes,
curriculum) plans the epoch; the shards are then streamed by webdataset (``SimpleShardList`` →
``tarfile_to_samples`` → select → shuffle buffer → decode). Only shards holding a sample of the
epoch are opened, so an epoch of one curriculum level skips the shards of the others.

* **Sources.** A sample is *real* when its ``curriculum.source`` is ``"real"`` (``synthgen import-coco``),
  else synthetic. A synthetic sample's *level* is ``curriculum.level``, ordered by
  ``curriculum.image_guidance`` (or ``1 - strength``). Text-to-image samples (no level) join
  ``t2i_level``, by default the lowest-guidance level; with no levelled samples they form level ``None``.
* **Epoch.** Every kept real sample plus every kept synthetic sample of the active levels
  (``set_epoch(e, levels)``; ``None`` = all levels, ``()`` = real only). ``keep=False`` samples are
  never yielded. With ``real_fraction=r`` the larger side is subsampled (seeded per epoch, without
  replacement) so a fraction r of the epoch is real; ``None`` keeps natural proportions. An epoch
  is never empty: ``set_epoch`` refuses levels that select no sample (``()`` on data without real
  samples, e.g. a schedule's real-only phase on synthetic-only data), and a dataset needs a kept sample.
* **Splitting.** The epoch's samples, in a seeded per-epoch shard order, are cut into
  ``world_size × num_workers`` contiguous, near-equal slices; consumer ``rank × num_workers + worker``
  reads its slice. Each sample goes to exactly one consumer per epoch, slice sizes differ by at most
  one, and fewer shards than consumers still works (neighbouring consumers read the same shard and
  keep different samples of it). Every rank must use the same ``num_workers``; rank and world size
  come from the arguments or an initialised ``torch.distributed``. Workers get the dataset as it was
  at ``iter(loader)``, so call ``set_epoch`` before it and keep ``persistent_workers=False``.
* **Labels.** ``label`` = position of the sample's first class name in ``classes`` (argument, or the
  manifests' class lists merged in directory order), so directories with different class lists or
  category ids agree; a sample of several classes (``record["class_names"]``: the classes its prompt
  names and its mask labels) has them all in ``labels``, a float32 multi-hot vector over ``classes``
  (for ``BCEWithLogitsLoss``). ``mask`` (``masks=True``) uses the same numbering: 0 background,
  1 + class index, 255 ignore.
* **Weights.** ``weight`` = ``weight_fn(record)``; the default :func:`score_weight` is documented there.
"""
from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .dataset import INDEX, OutputError, check_index_shards, read_dataset_index, read_manifest
from .storage import RemotePath, location, url_stage

Level = int | float | str | None
#: index.parquet columns the loader plans with
INDEX_COLUMNS = ["key", "shard", "keep", "classes", "curriculum"]
#: score_weight: attention contrast at which a synthetic sample gets full weight, and the weight floor
FULL_CONTRAST = 0.5
MIN_WEIGHT = 0.1


def score_weight(record: dict) -> float:
    """Default per-sample weight from the record's quality scores.

    Real samples and samples without scores weigh 1. A synthetic sample weighs
    ``min(1, min_contrast / FULL_CONTRAST) * (1 - ignore_fraction)``, clipped to ``[MIN_WEIGHT, 1]``:
    faint attention (its label is a guess) and large ignore bands (an uncertain mask) count less.
    """
    scores = record.get("scores") or {}
    if sample_source(record.get("curriculum") or {}) == "real" or not scores:
        return 1.0
    contrast = min(1.0, float(scores.get("min_contrast", FULL_CONTRAST)) / FULL_CONTRAST)
    weight = contrast * (1.0 - float(scores.get("ignore_fraction", 0.0)))
    return float(min(1.0, max(MIN_WEIGHT, weight)))


def sample_source(curriculum: dict) -> str:
    """``"real"`` or ``"synthetic"`` (the default: text-to-image records carry ``curriculum = {}``)."""
    return "real" if curriculum.get("source") == "real" else "synthetic"


def image_guidance(curriculum: dict) -> float | None:
    """A variation's image guidance: ``image_guidance``, else ``1 - strength``, else None."""
    if curriculum.get("image_guidance") is not None:
        return float(curriculum["image_guidance"])
    if curriculum.get("strength") is not None:
        return 1.0 - float(curriculum["strength"])
    return None


def collate(samples: list[dict]) -> dict:
    """Batch samples: tensors stacked (``image``, ``labels`` (B, C), ``mask``), ``label``/``weight`` as
    tensors, everything else as lists."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif name == "label":
            batch[name] = torch.tensor(values, dtype=torch.long)
        elif name == "weight":
            batch[name] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[name] = values
    return batch


# --- schedules ----------------------------------------------------------------------------------
class FixedSchedule:
    """DisCL's non-adaptive curriculum: ``levels`` in the given order (pass ``dataset.levels``:
    ascending image guidance, diverse → real-like), ``epochs_per_level`` epochs each, then real only
    (``()``) from epoch ``curriculum_epochs`` on.

    Data without curriculum levels (text-to-image samples: ``dataset.levels == (None,)``) is one level.
    Data without real samples has no real-only phase: train ``curriculum_epochs`` epochs on it
    (``CurriculumDataset.set_epoch`` refuses the empty epoch that would come next).
    """

    def __init__(self, levels: Sequence[Level], epochs_per_level: int = 1):
        if not levels:
            raise ValueError("FixedSchedule: no levels (the synthetic data has no curriculum levels)")
        if epochs_per_level < 1:
            raise ValueError(f"FixedSchedule: epochs_per_level must be >= 1, got {epochs_per_level}")
        self.levels = tuple(levels)
        self.epochs_per_level = epochs_per_level

    @property
    def curriculum_epochs(self) -> int:
        """Epochs before the real-only phase."""
        return len(self.levels) * self.epochs_per_level

    def levels_for_epoch(self, epoch: int) -> tuple[Level, ...]:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        stage = epoch // self.epochs_per_level
        return (self.levels[stage],) if stage < len(self.levels) else ()


class AdaptiveSchedule:
    """DisCL's adaptive curriculum: each epoch trains on the level whose validation metric made the
    largest progress.

    The training loop calls ``set_epoch(e)``, trains on ``levels_for_epoch(e)``, then reports one
    validation metric per level with ``update(level, value)`` (higher is better; DisCL uses the mean
    correct-class probability on that level's variations of the hard samples). A level's progress
    is its latest value minus its previous one (``baseline`` before the first, as DisCL starts from
    zero). Epoch 0, or any epoch before a level was measured, trains on ``levels[0]``; ties go to the
    earlier level. Each epoch's choice is made once, at its first ``levels_for_epoch`` call. From
    ``curriculum_epochs`` on (if given) the schedule is real only.
    """

    def __init__(self, levels: Sequence[Level], curriculum_epochs: int | None = None, baseline: float = 0.0):
        if not levels:
            raise ValueError("AdaptiveSchedule: no levels (the synthetic data has no curriculum levels)")
        self.levels = tuple(levels)
        self.curriculum_epochs = curriculum_epochs
        self.baseline = baseline
        self.epoch = 0
        self.history: dict[Level, dict[int, float]] = {level: {} for level in self.levels}
        self.chosen: dict[int, Level] = {}

    def set_epoch(self, epoch: int) -> None:
        """The epoch that following ``update`` calls measure (one value per level and epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def update(self, level: Level, val_metric: float) -> None:
        if level not in self.history:
            raise ValueError(f"AdaptiveSchedule.update: unknown level {level!r}; levels are {list(self.levels)}")
        self.history[level][self.epoch] = float(val_metric)

    def progress(self, level: Level) -> float | None:
        """Latest value minus the one before (or ``baseline``); None before the first measurement."""
        values = [v for _, v in sorted(self.history[level].items())]
        if not values:
            return None
        return values[-1] - (values[-2] if len(values) > 1 else self.baseline)

    def levels_for_epoch(self, epoch: int) -> tuple[Level, ...]:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self.curriculum_epochs is not None and epoch >= self.curriculum_epochs:
            return ()
        if epoch not in self.chosen:
            measured = [(p, -i) for i, level in enumerate(self.levels) if (p := self.progress(level)) is not None]
            self.chosen[epoch] = self.levels[-max(measured)[1]] if measured else self.levels[0]
        return (self.chosen[epoch],)


# --- the index -----------------------------------------------------------------------------------
@dataclass
class _Rows:
    """The kept rows of all directories' index.parquet files, as parallel arrays."""

    keys: np.ndarray    # object: sample key
    shard: np.ndarray   # int: position in urls
    real: np.ndarray    # bool
    level: np.ndarray   # int: position in levels, -1 for real samples
    label: np.ndarray   # int: position of the first class in classes


def _read_index(out: Path) -> pa.Table:
    if not out.is_dir():
        raise OutputError(f"{out}: not a directory; pass a synthgen output directory (a job's output.dir)")
    manifest = read_manifest(out)  # raises OutputError when it is not a synthgen output
    if not (out / INDEX).is_file() and not manifest["complete"]:
        raise OutputError(f"{out}: no {INDEX}; the run has not finished (rerun `synthgen run` on its job "
                          "to complete it) or the directory is not a finished synthgen output")
    table = read_dataset_index(out, manifest, INDEX_COLUMNS)  # index.parquet, or the parts (output.index: false)
    check_index_shards(out, manifest, table.column("shard").unique().to_pylist())
    return table


def _manifest_classes(out: Path) -> list[str]:
    """The class names a directory's manifest lists (``job.classes``, else COCO ``categories``)."""
    manifest = read_manifest(out)
    job_classes = (manifest.get("job") or {}).get("classes")
    if job_classes:
        return [c["name"] if isinstance(c, dict) else str(c) for c in job_classes]
    categories = manifest.get("categories")
    if categories:
        return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    raise OutputError(f"{out}/manifest.json: lists no classes (job.classes or categories); "
                      "pass classes=[...] to the loader")


def _merge_classes(dirs: list[Path]) -> list[str]:
    names: list[str] = []
    for out in dirs:
        names += [n for n in _manifest_classes(out) if n not in names]
    return names


class CurriculumDataset(IterableDataset):
    """Real and synthetic samples of synthgen output dirs, by curriculum level; see the module docstring.

    Each sample is a dict: ``image`` (uint8 tensor 3×H×W, or float32 in [0, 1] with
    ``float_images=True``), ``label`` (int: the first class), ``labels`` (float32 multi-hot over
    ``classes``: every class of the sample), ``mask`` (uint8 H×W, with ``masks=True``), ``weight``
    (float), ``key``, ``source`` ("real"/"synthetic"), ``level`` (None for real samples) and
    ``record`` (the sample's JSON record). Batch them with :func:`collate`.
    """

    def __init__(self, dirs: str | Path | Sequence[str | Path], *, classes: Sequence[str] | None = None,
                 real_fraction: float | None = None, masks: bool = False, float_images: bool = False,
                 t2i_level: Level = None, weight_fn: Callable[[dict], float] = score_weight,
                 transform: Callable[[dict], dict] | None = None, shuffle: bool = True,
                 shuffle_buffer: int = 1000, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None):
        super().__init__()
        # local paths or URIs (s3://bucket/prefix: index and shards are read through its filesystem)
        paths = [location(dirs)] if isinstance(dirs, (str, Path, RemotePath)) else [location(d) for d in dirs]
        if not paths:
            raise ValueError("CurriculumDataset: no output directories given")
        if real_fraction is not None and not 0.0 < real_fraction < 1.0:
            raise ValueError(f"real_fraction must be in (0, 1) or None (natural proportions), got {real_fraction}")
        tables = [_read_index(p) for p in paths]
        self.classes = tuple(classes) if classes is not None else tuple(_merge_classes(paths))
        if masks and len(self.classes) > 254:
            raise ValueError(f"masks=True needs at most 254 classes (uint8, 255 = ignore), got {len(self.classes)}")
        self.real_fraction = real_fraction
        self.masks, self.float_images = masks, float_images
        self.weight_fn, self.transform = weight_fn, transform
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.rank, self.world_size = self._resolve_rank(rank, world_size)
        self._label = {name: i for i, name in enumerate(self.classes)}
        self.urls: list[str] = []
        self._build(paths, tables, t2i_level)
        self.set_epoch(0)

    @staticmethod
    def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed or 0/1)")
        if rank is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank, world_size = dist.get_rank(), dist.get_world_size()
            else:
                rank, world_size = 0, 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        return rank, world_size

    def _build(self, paths: list[Path], tables: list[pa.Table], t2i_level: Level) -> None:
        """Fill ``levels``, ``image_guidance``, ``urls`` and the row arrays from the indexes."""
        guidance: dict[Level, float] = {}
        rows: list[tuple[str, int, bool, Level, int]] = []
        for out, table in zip(paths, tables):
            shard_ids: dict[str, int] = {}
            for key, shard, keep, names, cur in zip(*(table.column(c).to_pylist() for c in INDEX_COLUMNS)):
                if not keep:
                    continue
                unknown = [n for n in names if n not in self._label]
                if unknown or not names:
                    raise OutputError(f"{out}: sample {key} has classes {names}, not all in the loader's classes "
                                      f"{list(self.classes)}; pass classes=[...] listing them")
                cur = cur or {}  # text-to-image samples have none
                real = sample_source(cur) == "real"
                level = None if real else cur.get("level")
                if level is not None:
                    g = image_guidance(cur)
                    if g is None:
                        raise OutputError(f"{out}: sample {key} has curriculum level {level!r} but neither "
                                          "image_guidance nor strength; levels cannot be ordered")
                    if guidance.setdefault(level, g) != g:
                        raise OutputError(f"{out}: curriculum level {level!r} has image_guidance {g} in sample "
                                          f"{key} but {guidance[level]} elsewhere")
                if shard not in shard_ids:
                    path = out / "shards" / shard
                    if not isinstance(path, RemotePath) and not path.is_file():  # objects: one HEAD each
                        raise OutputError(f"{out}/{INDEX}: shard {shard} of sample {key} is missing ({path})")
                    shard_ids[shard] = len(self.urls)
                    self.urls.append(str(path))
                rows.append((key, shard_ids[shard], real, level, self._label[names[0]]))
        if not rows:
            raise OutputError(f"{', '.join(map(str, paths))}: no kept samples (every row of {INDEX} has "
                              "keep=false); nothing to load: pass an output dir with kept samples")
        self.levels: tuple[Level, ...] = tuple(sorted(guidance, key=lambda lv: (guidance[lv], str(lv))))
        self.image_guidance = {lv: guidance[lv] for lv in self.levels}
        if t2i_level is None:
            t2i_level = self.levels[0] if self.levels else None
        elif t2i_level not in guidance:
            raise ValueError(f"t2i_level {t2i_level!r} is not a level of the data; levels are {list(self.levels)}")
        if any(not real and level is None for _, _, real, level, _ in rows) and not self.levels:
            self.levels = (None,)  # only text-to-image synthetic data: one level of its own
        position = {lv: i for i, lv in enumerate(self.levels)}
        self._rows = _Rows(
            keys=np.array([r[0] for r in rows], dtype=object),
            shard=np.array([r[1] for r in rows], dtype=np.int64),
            real=np.array([r[2] for r in rows], dtype=bool),
            level=np.array([-1 if r[2] else position[t2i_level if r[3] is None else r[3]] for r in rows],
                           dtype=np.int64),
            label=np.array([r[4] for r in rows], dtype=np.int64),
        )
        self.t2i_level = t2i_level

    # --- epochs ----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int, levels: Sequence[Level] | None = None) -> None:
        """Make ``epoch`` (seeds the shuffles) with synthetic ``levels`` active (None: all, (): real only).
        Levels that select no sample raise ValueError (the epoch stays as it was): no epoch is empty."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        levels = self.levels if levels is None else tuple(levels)
        unknown = [lv for lv in levels if lv not in self.levels]
        if unknown:
            raise ValueError(f"levels {unknown} are not levels of the data; levels are {list(self.levels)}")
        if not len(self._selected(levels)):  # every level has a kept sample: only () on data without real ones
            raise ValueError(f"set_epoch({epoch}, levels={levels}): real only, but the data has no real samples, "
                             "so the epoch would be empty; on synthetic-only data stop after the schedule's "
                             f"curriculum_epochs, or pass levels=None (all) or some of {list(self.levels)}")
        self.epoch = epoch
        self.active = levels

    def _selected(self, levels: tuple[Level, ...]) -> np.ndarray:
        """Row numbers an epoch of ``levels`` reads: every real sample, the synthetic ones of ``levels``."""
        codes = [self.levels.index(lv) for lv in levels]
        return np.flatnonzero(self._rows.real | np.isin(self._rows.level, codes))

    def _epoch_rows(self) -> np.ndarray:
        """Row numbers of the current epoch in reading order (shards in seeded order, index order inside)."""
        r = self._rows
        rows = self._selected(self.active)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.real_fraction is not None:
            real, syn = rows[r.real[rows]], rows[~r.real[rows]]
            frac = self.real_fraction
            if len(real) and len(syn):
                if len(real) / (len(real) + len(syn)) > frac:
                    real = rng.choice(real, round(len(syn) * frac / (1 - frac)), replace=False)
                else:
                    syn = rng.choice(syn, round(len(real) * (1 - frac) / frac), replace=False)
                rows = np.sort(np.concatenate([real, syn]))
        shard_rank = rng.permutation(len(self.urls)) if self.shuffle else np.arange(len(self.urls))
        return rows[np.lexsort((rows, shard_rank[r.shard[rows]]))]

    @property
    def epoch_size(self) -> int:
        """Samples the current epoch yields over all ranks and workers."""
        return len(self._epoch_rows())

    def label_counts(self) -> dict[str, int]:
        """Samples per class in the current epoch (over all ranks and workers)."""
        counts = np.bincount(self._rows.label[self._epoch_rows()], minlength=len(self.classes))
        return dict(zip(self.classes, counts.tolist()))

    def _plan(self, consumer: int, consumers: int) -> dict[str, set[str]]:
        """{shard url: keys} of one consumer's slice of the current epoch, in reading order."""
        rows = self._epoch_rows()
        mine = rows[consumer * len(rows) // consumers:(consumer + 1) * len(rows) // consumers]
        plan: dict[str, set[str]] = {}
        for shard, key in zip(self._rows.shard[mine], self._rows.keys[mine]):
            plan.setdefault(self.urls[shard], set()).add(key)
        return plan

    # --- iteration -------------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        consumer = self.rank * workers + worker
        plan = self._plan(consumer, self.world_size * workers)
        if not plan:
            return iter(())
        stages: list[Any] = [
            wds.SimpleShardList(list(plan)),
            url_stage(select_files=self._wanted_member),  # opens each shard through its filesystem
            lambda src: self._select(src, plan),
        ]
        if self.shuffle:
            state = np.random.SeedSequence([self.seed, self.epoch, consumer]).generate_state(1)[0]
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                      rng=random.Random(int(state))))
        stages.append(wds.map(self._decode))
        return iter(wds.DataPipeline(*stages))

    def _wanted_member(self, name: str) -> bool:
        return name.endswith((".jpg", ".json")) or (self.masks and name.endswith(".seg.png"))

    @staticmethod
    def _select(src, plan: dict[str, set[str]]):
        """The planned samples of the stream; raises if a shard lacks one that index.parquet lists."""
        remaining = {url: set(keys) for url, keys in plan.items()}
        for sample in src:
            keys = remaining.get(sample["__url__"])
            if keys is not None and sample["__key__"] in keys:
                keys.discard(sample["__key__"])
                yield sample
        for url, keys in remaining.items():
            if keys:
                raise OutputError(f"{url}: {len(keys)} samples that index.parquet lists as kept are not in "
                                  f"the shard (e.g. {sorted(keys)[0]}); the output directory is damaged")

    def _decode(self, sample: dict) -> dict:
        record = json.loads(sample["json"])
        cur = record.get("curriculum") or {}
        source = sample_source(cur)
        level = None if source == "real" else (self.t2i_level if cur.get("level") is None else cur["level"])
        image = torch.from_numpy(np.array(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))).permute(2, 0, 1)
        labels = torch.zeros(len(self.classes), dtype=torch.float32)
        labels[[self._label[name] for name in record["class_names"]]] = 1.0
        out = {"image": image.float().div_(255.0) if self.float_images else image.contiguous(),
               "label": self._label[record["class_names"][0]], "labels": labels,
               "weight": float(self.weight_fn(record)),
               "key": sample["__key__"], "source": source, "level": level, "record": record}
        if self.masks:
            if "seg.png" not in sample:
                raise OutputError(f"{sample['__url__']}: sample {sample['__key__']} has no seg.png; "
                                  "use masks=False for this data")
            lut = np.full(256, 255, dtype=np.uint8)
            lut[0] = 0
            for i, name in enumerate(record["class_names"]):
                lut[1 + i] = 1 + self._label[name]
            out["mask"] = torch.from_numpy(lut[np.asarray(Image.open(io.BytesIO(sample["seg.png"])))])
        return self.transform(out) if self.transform is not None else out
