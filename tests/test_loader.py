"""pipeline/loader.py: curriculum levels and schedules, real/synthetic mixing, rank × worker splitting,
keep=False skipping, weights, decoding, errors; and a smoke run of benchmarks.train_classifier.

Output dirs are made by the project's own EncodeStage + DatasetWriter from rendered shapes-world
scenes (no diffusion), so they are in exactly the format a job writes.
"""
from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from pipeline.loader import AdaptiveSchedule, CurriculumDataset, FixedSchedule, collate, score_weight
from pipeline.shapes.world import render_scene
from pipeline.spec import validate_spec
from pipeline.jobplan import JobPlan
from pipeline.runner import prepare
from pipeline.writer import OutputError
from stages.encode import EncodeStage

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def write_dir(out: Path, name: str, classes: list[str], samples: list[dict], store_rejected: bool = False) -> Path:
    """An output dir of ``samples`` (class or list of classes, curriculum, keep, scores), shards of 4, via
    EncodeStage + DatasetWriter.

    ``store_rejected`` then rewrites each shard with its rejected samples too (in index order), as a
    writer that keeps rejected samples in the shards would.
    """
    spec = validate_spec({"name": name, "model": {"path": "unused/model", "device": "cpu"}, "classes": classes,
                          "samples": len(samples), "generation": {"batch_size": 1, "height": SIZE, "width": SIZE},
                          "output": {"dir": str(out), "shard_size": 4}})
    names = [s["cls"] if isinstance(s["cls"], list) else [s["cls"]] for s in samples]
    scenes = [render_scene(1_000_000 + i, size=SIZE, classes=c) for i, c in enumerate(names)]
    n = len(samples)

    def semantic(scene) -> np.ndarray:  # 1 + the object's position in class_names, later objects on top
        mask = np.zeros((SIZE, SIZE), np.uint8)
        for i, obj in enumerate(scene.objects):
            mask[obj.mask] = 1 + i
        return mask

    def text(values: list) -> np.ndarray:
        return np.array([json.dumps(v) for v in values])

    batch = {
        "key": np.array([f"{name}-{i:09d}" for i in range(n)]), "index": np.arange(n, dtype=np.int64),
        "seed": np.arange(n, dtype=np.int64), "prompt": np.array([sc.caption for sc in scenes]),
        "class_names": text(names), "token_index": np.array([""] * n),
        "gen": np.array([""] * n), "annotations": text([[] for _ in samples]),
        "scores": text([s.get("scores", {}) for s in samples]),
        "curriculum": text([s["curriculum"] for s in samples]),
        "image": np.stack([sc.image for sc in scenes]),
        "semantic_mask": np.stack([semantic(sc) for sc in scenes]),
        "keep": np.array([s.get("keep", True) for s in samples]),
        "reject_reason": np.array(["" if s.get("keep", True) else "low_contrast" for s in samples]),
    }
    batch = EncodeStage(spec)(batch)
    writer = prepare(JobPlan(spec, identity={"source": "hub"}))
    writer.open()
    writer.add(batch)
    writer.finish({})
    if store_rejected:
        for k in range(writer.plan.num_shards):
            start, stop = writer.plan.bounds(k)
            with wds.TarWriter(str(out / "shards" / f"{writer.plan.name(k)}.tar"), encoder=False) as sink:
                for i in range(start, stop):
                    sink.write({"__key__": str(batch["key"][i]), "jpg": batch["jpg"][i],
                                "seg.png": batch["seg_png"][i], "json": batch["json"][i], "cls": batch["cls"][i]})
    return out


def variation(level: int, guidance: float) -> dict:
    return {"level": level, "image_guidance": guidance, "strength": round(1 - guidance, 3), "group_id": "g",
            "source": "synthetic", "difficulty": 0.5}


# real: 10 samples (3 shards), index 5 rejected. synthetic: level 2 (guidance 0.1) in shards 0-1, level 0
# (0.9) in shard 2, level 1 (strength 0.5 only) in shard 3, text-to-image in shard 4; 3 and 17 rejected
REAL = [{"cls": ["circle", "square", "triangle"][i % 3], "curriculum": {"source": "real", "group_id": f"r{i}"},
         "keep": i != 5} for i in range(10)]
SYN = ([{"cls": ["circle", "star"][i % 2], "curriculum": variation(2, 0.1)} for i in range(8)]
       + [{"cls": "star", "curriculum": variation(0, 0.9)} for _ in range(4)]
       + [{"cls": "square", "curriculum": {"level": 1, "strength": 0.5, "source": "synthetic"}} for _ in range(4)]
       + [{"cls": "circle", "curriculum": {}} for _ in range(4)])
for i, s in enumerate(SYN):
    s["scores"] = {"min_contrast": 0.1 * (1 + i % 5), "ignore_fraction": 0.1}
    s["keep"] = i not in (3, 17)


# synthetic only, text-to-image (no curriculum levels): one, two and three classes per image; 2 rejected
T2I = [{"cls": c, "curriculum": {}, "keep": i != 2} for i, c in enumerate(
    ["circle", ["star", "circle"], "square", ["square", "star", "circle"], ["circle", "square"], "star"])]


def keys(name: str, samples: list[dict], where=lambda i, s: True) -> set[str]:
    return {f"{name}-{i:09d}" for i, s in enumerate(samples) if s["keep"] and where(i, s)}


def syn_level(i: int) -> int | None:
    return 2 if i < 8 else 0 if i < 12 else 1 if i < 16 else None


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    real = write_dir(root / "real", "real", ["circle", "square", "triangle"], REAL)
    syn = write_dir(root / "syn", "syn", ["star", "circle", "square"], SYN, store_rejected=True)
    return real, syn


def consume(ds, **loader_kw) -> list[dict]:
    return [s for s in ds] if not loader_kw else [
        {"key": k} for b in DataLoader(ds, collate_fn=collate, **loader_kw) for k in b["key"]]


def test_levels_classes_and_fixed_schedule(dirs):
    ds = CurriculumDataset(dirs, seed=3)
    assert ds.levels == (2, 1, 0)  # ascending image guidance, not level value
    assert ds.image_guidance == pytest.approx({2: 0.1, 1: 0.5, 0: 0.9})
    assert ds.classes == ("circle", "square", "triangle", "star") and ds.t2i_level == 2

    schedule = FixedSchedule(ds.levels, epochs_per_level=2)
    assert [schedule.levels_for_epoch(e) for e in range(8)] == [(2,), (2,), (1,), (1,), (0,), (0,), (), ()]
    for epoch, level in [(0, 2), (3, 1), (5, 0), (6, None)]:
        ds.set_epoch(epoch, schedule.levels_for_epoch(epoch))
        got = consume(ds)
        want_syn = set() if level is None else keys(
            "syn", SYN, lambda i, s: syn_level(i) == level or (level == 2 and syn_level(i) is None))
        assert {s["key"] for s in got} == keys("real", REAL) | want_syn
        assert {s["level"] for s in got if s["source"] == "synthetic"} == (set() if level is None else {level})
        assert {s["level"] for s in got if s["source"] == "real"} == {None}
        assert ds.epoch_size == len(got)


def test_adaptive_schedule_picks_largest_progress():
    sched = AdaptiveSchedule(["a", "b", "c"], curriculum_epochs=3)
    sched.set_epoch(0)
    assert sched.levels_for_epoch(0) == ("a",)  # nothing measured yet: the first (lowest guidance) level
    for level, value in [("a", 0.2), ("b", 0.5), ("c", 0.3)]:
        sched.update(level, value)
    sched.update("b", 0.45)  # the same epoch again: replaces
    sched.set_epoch(1)
    assert sched.levels_for_epoch(1) == ("b",)  # progress from 0: a 0.2, b 0.45, c 0.3
    for level, value in [("a", 0.3), ("b", 0.5), ("c", 0.6)]:
        sched.update(level, value)
    assert [sched.progress(lv) for lv in "abc"] == pytest.approx([0.1, 0.05, 0.3])
    assert sched.levels_for_epoch(2) == ("c",)
    sched.update("a", 5.0)
    assert sched.levels_for_epoch(2) == ("c",)  # an epoch's choice is made once
    assert sched.levels_for_epoch(3) == ()  # real only after curriculum_epochs
    with pytest.raises(ValueError, match="unknown level 'z'"):
        sched.update("z", 1.0)


@pytest.mark.parametrize("levels", [None, ()], ids=["all-levels", "real-only-3-shards-4-consumers"])
def test_each_sample_to_exactly_one_consumer(dirs, levels):
    want = keys("real", REAL) | (keys("syn", SYN) if levels is None else set())
    runs = {}
    for epoch in (0, 1, 0):
        per_rank = []
        for rank in range(2):
            ds = CurriculumDataset(dirs, seed=7, rank=rank, world_size=2, shuffle_buffer=4)
            ds.set_epoch(epoch, levels)
            per_rank.append([s["key"] for s in consume(ds, batch_size=2, num_workers=2)])
        flat = per_rank[0] + per_rank[1]
        assert len(flat) == len(set(flat)) and set(flat) == want, f"epoch {epoch}"
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= 2  # near-equal slices per worker
        if epoch in runs:
            assert runs[epoch] == per_rank  # set_epoch(e) gives the same order again
        runs[epoch] = per_rank
    assert runs[0] != runs[1]  # and another order in another epoch


def test_rejected_samples_are_skipped_even_when_stored(dirs):
    real, syn = dirs
    stored = {s["__key__"] for s in wds.WebDataset(str(syn / "shards" / "train-000000.tar"), shardshuffle=False)}
    assert "syn-000000003" in stored  # the rejected sample is in the shard...
    got = {s["key"] for s in CurriculumDataset(dirs)}
    assert got == keys("real", REAL) | keys("syn", SYN)  # ...but never yielded
    assert not {"syn-000000003", "syn-000000017", "real-000000005"} & got


def test_decode_labels_masks_and_weights(dirs):
    ds = CurriculumDataset(dirs, masks=True, float_images=True)
    samples = {s["key"]: s for s in ds}
    for s in samples.values():
        assert s["image"].shape == (3, SIZE, SIZE) and s["image"].dtype == torch.float32
        assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
        assert s["label"] == ds.classes.index(s["record"]["class_names"][0])
        assert set(s["mask"].unique().tolist()) == {0, 1 + s["label"]}  # sample-local 1 -> global 1 + label
        assert s["weight"] == score_weight(s["record"])
    assert samples["syn-000000001"]["label"] == 3  # star: category id 1 in its own dir, 4th class here
    assert samples["real-000000000"]["weight"] == 1.0
    assert samples["syn-000000000"]["weight"] == pytest.approx(0.1 / 0.5 * 0.9)  # min_contrast 0.1, ignore 0.1
    assert samples["syn-000000004"]["weight"] == pytest.approx(0.9)  # min_contrast 0.5: full contrast
    batch = collate(list(samples.values())[:5])
    assert batch["image"].shape == (5, 3, SIZE, SIZE) and batch["mask"].shape == (5, SIZE, SIZE)
    assert batch["label"].dtype == torch.long and batch["weight"].shape == (5,) and len(batch["record"]) == 5
    uint8 = next(iter(CurriculumDataset(dirs)))["image"]
    assert uint8.dtype == torch.uint8 and uint8.shape == (3, SIZE, SIZE)


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("loader-t2i") / "t2i", "t2i", ["circle", "square", "star"], T2I)


@pytest.mark.parametrize("which", ["text-to-image", "variations"])
def test_a_fixed_schedule_on_synthetic_only_data_never_yields_an_empty_epoch(dirs, t2i, which):
    out, want, levels = ((t2i, keys("t2i", T2I), (None,)) if which == "text-to-image"
                         else (dirs[1], keys("syn", SYN), (2, 1, 0)))
    ds = CurriculumDataset(out, seed=2)
    assert ds.levels == levels  # text-to-image data: one level of its own
    schedule = FixedSchedule(ds.levels, epochs_per_level=2)
    seen = set()
    for epoch in range(schedule.curriculum_epochs):
        ds.set_epoch(epoch, schedule.levels_for_epoch(epoch))
        got = [s["key"] for s in consume(ds)]
        assert got and len(got) == ds.epoch_size, (epoch, got)
        seen |= set(got)
    assert seen == want  # the curriculum trains on every kept sample
    after = schedule.curriculum_epochs
    assert schedule.levels_for_epoch(after) == ()  # the real-only phase: nothing to read here...
    with pytest.raises(ValueError, match=rf"set_epoch\({after}, levels=\(\)\): real only, but the data has no real"):
        ds.set_epoch(after, schedule.levels_for_epoch(after))  # ...so it is refused, not yielded empty
    assert ds.epoch == after - 1 and len(consume(ds)) == ds.epoch_size > 0  # and the refusal changed nothing


def test_labels_are_multi_hot_over_the_loaders_classes(t2i):
    ds = CurriculumDataset(t2i, classes=["star", "square", "circle", "cross"], masks=True)
    samples = sorted(ds, key=lambda s: s["key"])
    assert [s["key"] for s in samples] == sorted(keys("t2i", T2I))
    for s in samples:
        names = s["record"]["class_names"]
        assert s["labels"].dtype == torch.float32
        assert s["labels"].tolist() == [float(c in names) for c in ds.classes], names
        assert s["label"] == ds.classes.index(names[0])
        assert set(s["mask"].unique().tolist()) == {0} | {1 + ds.classes.index(c) for c in names}
    three = samples[2]
    assert three["record"]["class_names"] == ["square", "star", "circle"]
    assert three["labels"].tolist() == [1.0, 1.0, 1.0, 0.0] and three["label"] == 1
    batch = collate(samples)
    assert batch["labels"].shape == (5, 4) and batch["labels"].dtype == torch.float32
    assert batch["labels"].sum(1).tolist() == [1.0, 2.0, 3.0, 2.0, 1.0]


def test_real_fraction_subsamples_the_larger_side(dirs):
    ds = CurriculumDataset(dirs, real_fraction=0.5, seed=1)  # 9 real, 18 synthetic kept
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        got = [s for s in ds]
        sources = [s["source"] for s in got]
        assert sources.count("real") == 9 and sources.count("synthetic") == 9
        epochs.append({s["key"] for s in got})
    assert epochs[0] != epochs[1]
    ds = CurriculumDataset(dirs, real_fraction=0.75)
    assert [s["source"] for s in ds].count("synthetic") == 3 and ds.epoch_size == 12
    ds.set_epoch(0, ())
    assert ds.label_counts() == {"circle": 4, "square": 3, "triangle": 2, "star": 0}  # real only, 5 rejected


def test_level_epochs_do_not_open_other_levels_shards(dirs, tmp_path):
    syn = Path(shutil.copytree(dirs[1], tmp_path / "syn"))
    (syn / "shards" / "train-000002.tar").write_bytes(b"not a tar")  # level 0's only shard
    ds = CurriculumDataset([dirs[0], syn])
    ds.set_epoch(0, [1])
    assert {s["level"] for s in ds if s["source"] == "synthetic"} == {1}
    ds.set_epoch(0, [0])
    with pytest.raises(tarfile.ReadError):
        list(ds)


def test_errors_are_clear(dirs, tmp_path):
    real = Path(shutil.copytree(dirs[0], tmp_path / "real"))
    keys = sorted(s["key"] for s in CurriculumDataset(real, shuffle=False))
    (real / "index.parquet").unlink()  # a finished run without it (output.index: false): parts/ is the index
    assert sorted(s["key"] for s in CurriculumDataset(real, shuffle=False)) == keys
    manifest = json.loads((real / "manifest.json").read_text())
    (real / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
    with pytest.raises(OutputError, match=r"no index\.parquet; the run has not finished"):
        CurriculumDataset(real)
    with pytest.raises(OutputError, match="not a directory"):
        CurriculumDataset(tmp_path / "nothing")
    with pytest.raises(OutputError, match=r"classes \['star'\], not all in the loader's classes"):
        CurriculumDataset(dirs, classes=["circle", "square", "triangle"])
    ds = CurriculumDataset(dirs)
    with pytest.raises(ValueError, match=r"levels \[7\] are not levels of the data"):
        ds.set_epoch(0, [7])
    rejected = write_dir(tmp_path / "rejected", "rej", ["circle"], [{"cls": "circle", "curriculum": {}, "keep": False}])
    with pytest.raises(OutputError, match="no kept samples"):
        CurriculumDataset(rejected)
    with pytest.raises(ValueError, match="real_fraction"):
        CurriculumDataset(dirs, real_fraction=1.0)
    damaged = Path(shutil.copytree(dirs[0], tmp_path / "damaged"))
    shard = str(damaged / "shards" / "train-000000.tar")
    first = next(iter(wds.WebDataset(shard, shardshuffle=False)))
    with wds.TarWriter(shard, encoder=False) as sink:  # the shard loses 3 of its 4 samples
        sink.write({k: v for k, v in first.items() if k == "__key__" or not k.startswith("__")})
    with pytest.raises(OutputError, match="3 samples that index.parquet lists as kept are not in the shard"):
        list(CurriculumDataset(damaged))


def test_train_classifier_smoke(dirs, tmp_path):
    from benchmarks import train_classifier as module

    real, syn = dirs
    out = tmp_path / "result.json"
    # 20 epochs (under a second): seeds 0-5 all reach 0.78-1.0 on these 9 test images; 4 epochs stay at chance
    result = module.train(real, test_dir=real, synthetic_dir=syn, mode="curriculum", epochs=20, epochs_per_level=1,
                          seed=0, batch_size=8, json_path=out)
    assert result["levels_per_epoch"] == [[2], [1], [0]] + [[]] * 17
    assert result["classes"] == ["circle", "square", "triangle", "star"]
    assert set(result["per_class_accuracy"]) == {"circle", "square", "triangle"}  # the test set's classes
    assert result["tail_classes"] == ["star"] and result["tail_accuracy"] is None  # no real star, none in test
    assert 0.0 <= result["accuracy"] <= 1.0 and result["test_samples"] == 9
    test_classes = Counter(s["cls"] for s in REAL if s["keep"])
    chance, majority = 1 / len(test_classes), max(test_classes.values()) / result["test_samples"]
    assert result["accuracy"] > max(chance, majority), result["per_class_accuracy"]  # it learned the shapes
    assert json.loads(out.read_text())["accuracy"] == result["accuracy"]
