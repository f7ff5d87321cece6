"""``synthgen export-coco OUT --images DIR``: a COCO folder that supervision loads as it is (images,
annotations per image, masks equal to the shards'), rerun into its own folder, and never written into a
folder of the user's."""
from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.cli import main
from pipeline.dataset import read_manifest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # supervision warns that OpenCV is absent and uses its NumPy backend
    import supervision as sv


def shard_samples(out: Path) -> dict[str, dict]:
    """{key.jpg: {"jpg": bytes, "seg": HxW uint8, "rec": JSON record}} of every committed shard."""
    members: dict[str, dict] = {}
    for shard in read_manifest(out)["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return {f"{k}.jpg": {"jpg": v["jpg"], "seg": np.asarray(Image.open(io.BytesIO(v["seg.png"]))),
                         "rec": json.loads(v["json"])} for k, v in members.items()}


def test_export_with_images_loads_in_supervision(dataset, tmp_path, capsys):
    folder = tmp_path / "coco"
    assert main(["export-coco", str(dataset.out), "--images", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == str(folder / "annotations.json")
    samples = shard_samples(dataset.out)
    assert len(samples) == read_manifest(dataset.out)["counts"]["samples"] >= 4
    assert sorted(p.name for p in folder.iterdir()) == sorted([*samples, "annotations.json", "synthgen-export.json"])

    data = sv.DetectionDataset.from_coco(images_directory_path=str(folder),
                                         annotations_path=str(folder / "annotations.json"), force_masks=True)
    assert len(data) == len(samples)
    assert list(data.classes) == [c.name for c in dataset.spec.classes]
    seen = 0
    for path, image, det in data:  # reads every image file, as training would
        sample = samples[Path(path).name]
        rec, anns = sample["rec"], sample["rec"]["annotations"]
        assert Path(path).read_bytes() == sample["jpg"]  # the shard's JPEG, not re-encoded
        assert image.shape == (rec["height"], rec["width"], 3)
        assert len(det) == len(anns)
        truth = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
        assert det.mask.shape == (len(anns), rec["height"], rec["width"])
        for got, want, ann, class_id in zip(det.mask, truth, anns, det.class_id):
            assert np.array_equal(got, want) and got.any()
            name = dataset.spec.classes[ann["category_id"] - 1].name
            assert data.classes[class_id] == name
            assert np.all(sample["seg"][got] == 1 + rec["class_names"].index(name))  # inside the shard's seg.png
        seen += len(anns)
    assert seen > 0

    # a rerun replaces its own files (same bytes); a file the user added is left alone
    (folder / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["export-coco", str(dataset.out), "--images", str(folder)]) == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_export_never_writes_into_a_users_folder(dataset, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not ours")
    assert main(["export-coco", str(dataset.out), "--images", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty and no synthgen export wrote it" in err[0] and "holiday.jpg" in err[0]
    assert [p.name for p in folder.iterdir()] == ["holiday.jpg"] and (folder / "holiday.jpg").read_bytes() == b"not ours"

    # in a folder of ours, a file the user put under an image's name stops the export before any write
    ours = tmp_path / "ours"
    assert main(["export-coco", str(dataset.out), "--images", str(ours)]) == 0
    record = json.loads((ours / "synthgen-export.json").read_text())
    victim = record["files"][0] if record["files"][0] != "annotations.json" else record["files"][1]
    record["files"].remove(victim)  # as if an earlier export had not written it: now it is the user's
    (ours / "synthgen-export.json").write_text(json.dumps(record))
    (ours / victim).write_bytes(b"user data")
    (ours / "annotations.json").unlink()
    assert main(["export-coco", str(dataset.out), "--images", str(ours)]) == 2
    assert "exists and no synthgen export wrote it" in capsys.readouterr().err
    assert (ours / victim).read_bytes() == b"user data" and not (ours / "annotations.json").exists()
    (ours / victim).unlink()
    (ours / victim).symlink_to(tmp_path / "elsewhere.jpg")  # a dangling link of the user's: never written through
    assert main(["export-coco", str(dataset.out), "--images", str(ours)]) == 2
    assert "exists and no synthgen export wrote it" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere.jpg").exists() and (ours / victim).is_symlink()


@pytest.mark.parametrize("bad", ["../escape.jpg", "/etc/passwd", "thesis.docx", "sub/x.jpg"])
def test_a_tampered_export_record_deletes_nothing_outside(dataset, tmp_path, capsys, bad):
    ours = tmp_path / "ours"
    assert main(["export-coco", str(dataset.out), "--images", str(ours)]) == 0
    outside = tmp_path / "escape.jpg"
    outside.write_bytes(b"keep me")
    record = json.loads((ours / "synthgen-export.json").read_text())
    (ours / "synthgen-export.json").write_text(json.dumps(dict(record, files=[*record["files"], bad])))
    assert main(["export-coco", str(dataset.out), "--images", str(ours)]) == 2
    assert "lists files that an export does not write" in capsys.readouterr().err
    assert outside.read_bytes() == b"keep me"


def test_export_reads_a_dataset_on_s3(dataset, tmp_path):
    """OUT as a URI (moto's S3 server on 127.0.0.1, started and stopped by tests/test_storage_s3.moto_s3):
    the export folder equals the one exported from the local copy, byte for byte."""
    pytest.importorskip("moto.server")
    import boto3

    from test_storage_s3 import BUCKET, moto_s3

    local = tmp_path / "local"
    assert main(["export-coco", str(dataset.out), "--images", str(local)]) == 0
    with moto_s3(tmp_path / "aws"):
        client = boto3.client("s3")
        for p in sorted(dataset.out.rglob("*")):
            if p.is_file():
                client.put_object(Bucket=BUCKET, Key=f"ds/{p.relative_to(dataset.out).as_posix()}", Body=p.read_bytes())
        assert main(["export-coco", f"s3://{BUCKET}/ds", "--images", str(tmp_path / "remote")]) == 0
    files = lambda d: {p.name: p.read_bytes() for p in d.iterdir()}  # noqa: E731
    assert files(tmp_path / "remote") == files(local) and len(files(local)) > 2
