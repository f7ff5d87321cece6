"""Output on S3: a real S3 API (moto's server mode on 127.0.0.1, a free port, started and stopped here),
reached through the code a user's S3 would use (pyarrow's S3 filesystem, endpoint and credentials from
the standard environment variables).

A job written to ``s3://...`` holds the same objects, byte for byte, as the same job written to a
local folder; ``synthgen verify`` / ``inspect`` / ``preview`` and the loader read it back; a driver
SIGKILLed between writing a shard's objects and committing them resumes to identical objects; bad
locations (missing bucket, no endpoint, credentials in the URI, a prefix holding other data) stop with
one line before any generation work and write nothing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

from pipeline.cli import main
from pipeline.dataset import read_manifest

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "synthgen-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(home: Path) -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with one bucket; yields the environment that points AWS clients at it
    (also set in os.environ while it runs). Stopped, and the environment restored, on exit."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(home / "aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials")}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"]}
    os.environ.update(env)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        os.environ.pop(k, None)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[dict[str, str]]:
    with moto_s3(tmp_path_factory.mktemp("aws")) as env:
        yield env


def objects(prefix: str) -> dict[str, bytes]:
    """{key relative to the prefix: bytes} of every object under ``s3://BUCKET/prefix/``."""
    client = boto3.client("s3")
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1:]
            if rel and not rel.endswith("/"):  # directory markers pyarrow may leave are no files
                found[rel] = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
    return found


def local_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def assert_same_objects(prefix: str, local: Path) -> None:
    """Every shard, part and index.parquet object equals the local run's file; the manifests list the same
    shard records; nothing else (no temp object, no journal left) is under the prefix."""
    remote, files = objects(prefix), local_files(local)
    assert sorted(remote) == sorted(files)
    assert [n for n in remote if remote[n] != files[n] and n != "manifest.json"] == []
    m_remote, m_local = json.loads(remote["manifest.json"]), json.loads(files["manifest.json"])
    assert m_remote["fingerprint"] == m_local["fingerprint"]
    assert m_remote["shards"] == m_local["shards"] and m_remote["complete"]


def test_a_job_on_s3_writes_the_local_runs_bytes_and_reads_back(dataset, s3, tmp_path, capsys):
    uri = f"s3://{BUCKET}/tiny"
    assert main(["run", str(dataset.job), "--no-ray", "--out", uri]) == 0
    assert f"output: {uri}" in capsys.readouterr().out
    assert not (Path.cwd() / "s3:").exists()  # the old bug: a local folder named s3:/bucket/...
    assert_same_objects("tiny", dataset.out)
    manifest = read_manifest(uri)
    assert manifest["job"]["output"]["dir"] == uri and "testing" not in json.dumps(manifest)

    assert main(["verify", uri]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {uri}: 4 shards")
    assert main(["inspect", uri, "-n", "2"]) == 0
    text = capsys.readouterr().out
    assert "tiny-000000000: members ['cls', 'jpg', 'json', 'seg.png']" in text and "complete" in text
    sheet = tmp_path / "sheet.png"
    assert main(["preview", uri, "-o", str(sheet), "-n", "4"]) == 0
    from PIL import Image

    assert Image.open(sheet).size[0] > 0

    from pipeline.loader import CurriculumDataset

    def read(where):
        return {s["key"]: (s["label"], s["image"].numpy().tobytes()) for s in CurriculumDataset(where, shuffle=False)}

    from_s3, from_disk = read(uri), read(str(dataset.out))
    assert from_s3 == from_disk and len(from_s3) == manifest["counts"]["samples"]

    # a rerun finds everything committed and does no work
    assert main(["run", str(dataset.job), "--no-ray", "--out", uri]) == 0
    assert read_manifest(uri)["runs"][-1]["shards_written"] == 0


def test_a_changed_object_fails_verify_and_run_verify_redoes_it(dataset, s3, capsys):
    uri, prefix = f"s3://{BUCKET}/changed", "changed"
    client = boto3.client("s3")
    for rel, data in local_files(dataset.out).items():  # the finished dataset, uploaded as a user might
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=data)
    key = f"{prefix}/shards/train-000001.tar"
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[700] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    assert main(["verify", uri]) == 1
    assert "train-000001: shards/train-000001.tar sha256 differs" in capsys.readouterr().out
    assert main(["run", str(dataset.job), "--no-ray", "--out", uri, "--verify"]) == 0
    assert read_manifest(uri)["runs"][-1]["shards_written"] == 1
    assert_same_objects(prefix, dataset.out)


@pytest.mark.parametrize("point", ["after-rename:2"])
def test_a_driver_killed_on_s3_resumes_to_identical_objects(dataset, s3, point):
    uri, prefix = f"s3://{BUCKET}/killed", "killed"
    env = dict(os.environ, SYNTHGEN_FAILPOINT=point,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(dataset.job), "--no-ray", "--out", uri],
                          env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    before = read_manifest(uri)
    assert [s["name"] for s in before["shards"]] == ["train-000000"] and not before["complete"]
    # shard 1's objects were written under their final names but never committed: garbage, not data
    assert {"shards/train-000001.tar", "parts/train-000001.parquet", "commits.jsonl"} <= set(objects(prefix))
    assert main(["run", str(dataset.job), "--no-ray", "--out", uri]) == 0
    assert read_manifest(uri)["runs"][-1]["shards_written"] == 3
    assert_same_objects(prefix, dataset.out)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_s3_locations_stop_with_one_line_and_write_nothing(dataset, s3, capsys, monkeypatch):
    job = str(dataset.job)
    before = objects("")
    assert main(["run", job, "--no-ray", "--out", "s3://no-such-bucket/x"]) == 2
    assert "bucket 'no-such-bucket' does not exist" in one_error_line(capsys)

    assert main(["run", job, "--no-ray", "--out", f"s3://AKIAXX:S3CR3T@{BUCKET}/x"]) == 2
    line = one_error_line(capsys)
    assert f"s3://***@{BUCKET}/x: it carries credentials" in line and "S3CR3T" not in line and "AKIAXX" not in line
    assert main(["run", job, "--no-ray", "--out", f"s3://{BUCKET}/x?secret_key=S3CR3T"]) == 2
    line = one_error_line(capsys)
    assert "carries credentials" in line and "S3CR3T" not in line
    assert main(["run", job, "--no-ray", "--out", f"s3://{BUCKET}/x?endpoint_override=http://h:1"]) == 2
    assert "carries options (endpoint_override)" in one_error_line(capsys)

    client = boto3.client("s3")
    client.put_object(Bucket=BUCKET, Key="theirs/data.csv", Body=b"a,b\n")
    for extra in ((), ("--overwrite",)):
        assert main(["run", job, "--no-ray", "--out", f"s3://{BUCKET}/theirs", *extra]) == 2
        assert "is not empty and is not a synthgen output" in one_error_line(capsys)
    assert objects("theirs") == {"data.csv": b"a,b\n"}
    client.delete_object(Bucket=BUCKET, Key="theirs/data.csv")

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens there
    assert main(["run", job, "--no-ray", "--out", f"s3://{BUCKET}/unreachable"]) == 2
    assert "did not answer" in one_error_line(capsys)
    assert main(["verify", f"s3://{BUCKET}/unreachable"]) == 2  # bad input, as for run; 1 means "data differs"
    assert "did not answer" in one_error_line(capsys)
    monkeypatch.undo()
    assert objects("") == before


def test_a_dataset_on_s3_grows_and_keeps_its_committed_objects(dataset, s3, capsys):
    uri = f"s3://{BUCKET}/grow"
    run = ["run", str(dataset.job), "--no-ray", "--out", uri]
    assert main([*run, "--set", "samples=12"]) == 0
    before = objects("grow/shards")
    assert main(run) == 0
    assert "grows from 12 to 16 samples" in capsys.readouterr().err
    after = objects("grow/shards")
    assert {k: after[k] for k in before} == before and len(after) == 4
    assert read_manifest(uri)["runs"][-1]["shards_written"] == 1
    assert main(["verify", uri]) == 0
    assert_same_objects("grow", dataset.out)
