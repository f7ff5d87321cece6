"""End to end: generate a tiny dataset, reopen it with real readers (webdataset + DataLoader,
pycocotools, pyarrow, Ray Data), and run the same job through local Ray."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage
from torch.utils.data import DataLoader

from conftest import assert_same_dataset, write_job
from pipeline.cli import main
from pipeline.runner import run_job
from pipeline.spec import load_spec


def decode_mask(data: bytes) -> np.ndarray:
    """seg.png as uint8 class indices (registered before "rgb8", which would make it RGB)."""
    return np.asarray(Image.open(io.BytesIO(data)))


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def shard_urls(out: Path) -> list[str]:
    return [str(out / s["tar"]) for s in manifest(out)["shards"]]


def read_samples(out: Path, workers: int = 2) -> list[tuple]:
    ds = (wds.WebDataset(shard_urls(out), shardshuffle=False, empty_check=False)
          .decode(wds.handle_extension("seg.png", decode_mask), "rgb8")
          .to_tuple("__key__", "jpg", "seg.png", "json", "cls"))
    return list(DataLoader(ds, batch_size=None, num_workers=workers))


def test_dataloader_decodes_every_sample(dataset):
    samples = read_samples(dataset.out)
    m = manifest(dataset.out)
    assert len(samples) == m["counts"]["samples"] > 0
    keys = [s[0] for s in samples]
    assert len(set(keys)) == len(keys)
    names = [c.name for c in dataset.spec.classes]
    for key, image, seg, rec, cls in samples:
        assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and tuple(image.shape) == (64, 64, 3)
        assert isinstance(seg, torch.Tensor) and seg.dtype == torch.uint8 and tuple(seg.shape) == (64, 64)
        assert rec["key"] == key and rec["keep"] is True and rec["reject_reason"] == ""
        assert set(np.unique(seg.numpy())) <= {0, 255, *range(1, len(rec["class_names"]) + 1)}
        assert int(cls) == names.index(rec["class_names"][0]) + 1
        assert rec["gen"]["steps"] == 4 and rec["gen"]["height"] == 64 and rec["prompt"]
        assert {"seed", "index", "annotations", "scores", "curriculum", "token_index"} <= set(rec)


def test_every_rle_decodes_to_a_whole_component_of_its_class_in_the_semantic_mask(dataset):
    f = dataset.spec.filters
    ids = {c.name: i + 1 for i, c in enumerate(dataset.spec.classes)}
    checked = 0
    for _key, _image, seg, rec, _cls in read_samples(dataset.out):
        seg = seg.numpy()
        pixels = seg.size
        value_of = {ids[name]: i + 1 for i, name in enumerate(rec["class_names"])}  # category id -> mask value
        covered = np.zeros_like(seg, dtype=bool)
        for ann in rec["annotations"]:
            inst = mask_utils.decode(ann["segmentation"]).astype(bool)
            region = seg == value_of[ann["category_id"]]
            labels, _ = ndimage.label(region)
            assert inst.sum() == ann["area"] > 0
            assert np.array_equal(inst, labels == labels[inst][0]), "an instance is one whole component"
            assert not (inst & covered).any()
            assert list(mask_utils.toBbox(ann["segmentation"])) == ann["bbox"]
            covered |= inst
            checked += 1
        for value in value_of.values():  # what is not annotated lies outside the area bounds
            leftover, n = ndimage.label((seg == value) & ~covered)
            for k in range(1, n + 1):
                area = (leftover == k).sum()
                assert not f.min_area_fraction * pixels <= area <= f.max_area_fraction * pixels
    assert checked > 0


def test_index_shards_and_manifest_agree(dataset):
    m = manifest(dataset.out)
    index = pq.read_table(dataset.out / "index.parquet").to_pylist()
    in_shards = [s[0] for s in read_samples(dataset.out)]
    kept = [r for r in index if r["keep"]]
    rejected = [r for r in index if not r["keep"]]
    assert len(index) == m["counts"]["indices"] == dataset.spec.samples
    assert [r["index"] for r in index] == list(range(dataset.spec.samples))
    assert [r["key"] for r in kept] == sorted(in_shards)  # DataLoader workers interleave shards
    assert len(kept) == m["counts"]["samples"] == sum(s["samples"] for s in m["shards"])
    assert len(rejected) == m["counts"]["rejected"]
    assert all(r["reject_reason"] for r in rejected)
    reasons = {}
    for r in rejected:
        reasons[r["reject_reason"]] = reasons.get(r["reject_reason"], 0) + 1
    assert reasons == m["counts"]["rejected_by_reason"]
    assert m["complete"] and len(m["shards"]) == 4
    assert m["model"]["source"] == "local" and m["model"]["weights"]
    assert m["versions"]["ray"] and m["versions"]["diffusers"]
    assert m["summary"]["processed"] == dataset.spec.samples
    assert [s["name"] for s in m["summary"]["stages"]] == ["sampling", "synthesis", "masks", "labels",
                                                            "filters", "encode"]


def test_export_coco_loads_in_pycocotools(dataset, tmp_path):
    assert main(["export-coco", str(dataset.out), "-o", str(tmp_path / "coco.json")]) == 0
    coco = COCO(str(tmp_path / "coco.json"))
    samples = read_samples(dataset.out)
    assert len(coco.getImgIds()) == len(samples)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [c.name for c in dataset.spec.classes]
    for key, _image, _seg, rec, _cls in samples:
        img_id = rec["index"] + 1
        assert coco.loadImgs(img_id)[0]["file_name"] == f"{key}.jpg"
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert len(anns) == len(rec["annotations"])
        for ann, original in zip(anns, rec["annotations"]):
            assert np.array_equal(coco.annToMask(ann), mask_utils.decode(original["segmentation"]))


def test_inspect_and_preview(dataset, tmp_path, capsys):
    assert main(["inspect", str(dataset.out), "-n", "2"]) == 0
    text = capsys.readouterr().out
    assert "job 'tiny'" in text and "complete" in text and "synthesis" in text and "rows/busy s" in text
    gens = [line for line in text.splitlines() if line.startswith("  gen: ")]
    assert len(gens) == 2 and all(json.loads(g[len("  gen: "):])["steps"] == 4 for g in gens)  # each sample's settings
    assert main(["preview", str(dataset.out), "-o", str(tmp_path / "p.png"), "-n", "6"]) == 0
    sheet = Image.open(tmp_path / "p.png")
    assert sheet.size == (4 * 2 * 192, 2 * 192) and np.asarray(sheet).std() > 0  # 6 tiles of image | overlay

    from pipeline.report import LEGEND_MIN_PX, PALETTE, category_names, iter_samples, overlay

    sample = next(s for s in iter_samples(dataset.out) if len(json.loads(s["json"])["class_names"]) > 1)
    names = json.loads(sample["json"])["class_names"]
    tile = np.asarray(overlay(sample, 3, category_names(json.loads((dataset.out / "manifest.json").read_text()))))
    image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB").resize((192, 192), Image.NEAREST))
    left = tile[:, :192].astype(int)
    rows, cols = np.nonzero(np.abs(left - image.astype(int)).sum(-1) > 0)
    assert rows.min() == cols.min() == 0  # the legend: a box in the image's top-left corner...
    box = left[:rows.max() + 1, :cols.max() + 1]
    assert rows.max() + 1 >= len(names) * LEGEND_MIN_PX and cols.max() < 150  # ...a line per class, large text
    assert np.median(box.sum(-1)) < 3 * 60  # dark behind the text
    assert (box == 255).all(-1).sum() > 20 * len(names)  # white names
    centres = []  # per prompted class, in class_names order: a swatch of its mask and box colour
    for i in range(len(names)):
        swatch = (box == np.array(PALETTE[i])).all(-1)
        assert swatch.sum() >= 64, (names, i)
        centres.append(np.nonzero(swatch)[0].mean())
    assert centres == sorted(centres)  # one line each, top to bottom


# --- local Ray ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    import ray

    # the Ray run below holds 2 synthesis actors + the fused CPU actor (1.5 CPUs); tasks and Ray's read tasks need 1 more
    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_local_ray_run_writes_the_in_process_bytes_and_ray_data_reads_them(ray_session, dataset, tmp_path):
    out = tmp_path / "ray"
    # two synthesis actors take batches in whatever order they finish: the bytes must not depend on it
    spec = load_spec(dataset.job, ["resources.synthesis.actors=2"], out=str(out))
    summary = run_job(spec, use_ray=True, progress=False)
    assert [s["workers"] for s in summary["stages"] if s["name"] == "synthesis"] == [2]
    assert summary["runner"] == "ray" and summary["processed"] == dataset.spec.samples
    assert_same_dataset(out, dataset.out)
    rows = ray_session.data.read_webdataset(shard_urls(out)).take_all()
    # no DataLoader worker processes here: forking while Ray's threads run in this process can deadlock the child
    assert sorted(r["__key__"] for r in rows) == sorted(s[0] for s in read_samples(dataset.out, workers=0))


def test_a_gpu_stage_on_a_gpu_less_cluster_fails_fast(ray_session, tmp_path, tiny_model, capsys):
    job = write_job(tmp_path, tiny_model, model={"path": tiny_model, "device": "cuda"},
                    resources={"synthesis": {"num_gpus": 1, "num_cpus": 0.5}})
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 GPU" in err and "0 GPU" in err, err
    assert not (tmp_path / "out").exists()


def test_batch_size_auto_is_measured_by_a_ray_task_holding_a_synthesis_worker_s_resources(ray_session, tmp_path,
                                                                                          tiny_model):
    from pipeline.batch_size import settle

    spec = load_spec(write_job(tmp_path, tiny_model, generation={"batch_size": "auto"}))
    settled, note = settle(spec, use_ray=True)
    assert note["from"] == "measured" and note["device"] == "cpu" and note["per_image_bytes"] > 0
    assert settled.generation.batch_size == note["batch_size"] and 4 % note["batch_size"] == 0
    assert spec.generation.batch_size == "auto"  # the job as loaded is left as it is


def test_summary_table_shows_ray_reservations_only_for_ray_runs():
    """The end-of-run table names operators, workers and cpus/gpus for a Ray run; an in-process run reserved
    nothing, so its table has the stage and its throughput only."""
    from pipeline.report import format_summary

    base = {"processed": 4, "kept": 3, "rejected": 1, "rejected_by_reason": {"dedup": 1}, "wall_s": 3.0,
            "dataset": {"samples": 3, "indices": 4}, "shards_complete": 1, "shards_total": 1, "shards_written": 1}
    stage = {"name": "synthesis", "rows": 4, "busy_s": 1.2, "rows_per_busy_s": 3.33}
    ray = format_summary(dict(base, runner="ray", stages=[dict(stage, operator="MapBatches(Synthesis)",
                                                                 kind="actor", workers=2, num_cpus=1, num_gpus=0.5)]))
    header, row = ray.splitlines()[0].split(), ray.splitlines()[2].split()
    assert header[:3] == ["stage", "ray", "operator"] and "cpus" in header and "gpus" in header
    assert row == ["synthesis", "MapBatches(Synthesis)", "actor", "2", "1", "0.5", "4", "1.20", "3.33"]
    local = format_summary(dict(base, runner="in-process", stages=[dict(stage, operator=None, kind="in-process",
                                                                        workers=1, num_cpus=None, num_gpus=None)]))
    assert local.splitlines()[0].split() == ["stage", "(in-process)", "rows", "busy", "s", "rows/busy", "s"]
    assert local.splitlines()[2].split() == ["synthesis", "4", "1.20", "3.33"]
