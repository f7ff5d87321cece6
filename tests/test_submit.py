"""`synthgen submit` sends an allowlisted package: the job, the files the stages read from the inputs it
names, the project code git tracks; it checks the job as `validate` does first.

Unit tests build packages from a working dir full of things that must never travel (``.env``, keys and
credentials files, a venv, ``.git/``, a big untracked file, untracked secrets in the code, the model
folder and the reference folder, caches); the last test submits to a local Ray cluster it starts itself
and reads back the folder Ray unpacked on the cluster.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, write_job
from raynodes import free_ports, stop_session
from pipeline import package as package_module
from pipeline.cli import main
from pipeline.package import build_package, human
from pipeline.shapes.coco import render_coco
from pipeline.spec import UsageError

CLASSES = ("circle", "square", "triangle", "star")
TRACKED_CODE = {"pyproject.toml", "pipeline/__init__.py", "pipeline/cli.py", "stages/__init__.py"}
NEVER = {  # in the working dir, and never in a package
    ".env": "AWS_SECRET_ACCESS_KEY=abc\n",
    "credentials.yaml": "token: abc\n",
    "credentials.json": '{"token": "abc"}',
    "id_rsa": "-----BEGIN OPENSSH PRIVATE KEY-----\n",
    "pipeline/id_rsa": "-----BEGIN OPENSSH PRIVATE KEY-----\n",  # untracked, and a key
    ".venv/pyvenv.cfg": "home = /usr/bin\n",
    ".venv/lib/python3.11/site-packages/x.py": "",
    "venv/pyvenv.cfg": "home = /usr/bin\n",
    "secrets/key.pem": "-----BEGIN PRIVATE KEY-----\n",
    "synthgen.egg-info/PKG-INFO": "",
    "notes.tmp": "",
    "jobs/other.yaml": "name: other\n",  # tracked, but not the job submitted
    "pipeline/__pycache__/cli.cpython-311.pyc": "",
    "pipeline/models/bundled/model_index.json": "{}",  # tracked, but the job does not name it
    "pipeline/.secret.py": "KEY = 1\n",  # tracked (forced), but a dotfile
    "stages/.cache/x.py": "",
    "stages/env/pyvenv.cfg": "home = /usr/bin\n",  # a venv, found by its pyvenv.cfg
    "stages/env/lib/y.py": "",
    "models/tiny/venv/bin/python": "",
    "models/tiny/.cache/blob": "x",
    "models/tiny/unet/weights.tmp": "x",
    "models/tiny/.DS_Store": "",
    "models/tiny/id_rsa": "-----BEGIN OPENSSH PRIVATE KEY-----\n",  # untracked, in the model folder
    "models/tiny/unet/credentials.json": '{"token": "abc"}',  # a JSON file in a component: a key all the same
    "models/tiny/notes.txt": "where I got it\n",  # not a file the loader reads
}
BIG = "scratch/big.bin"  # an untracked 50 MiB file (sparse)
REFERENCE_JUNK = {"refs/id_rsa": "key\n", "refs/.DS_Store": "", "refs/notes.txt": "x\n"}


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, timeout=60)


def calibration_file() -> str:
    return json.dumps({"class_thresholds": {name: 0.3 for name in CLASSES}})


@pytest.fixture
def project(tmp_path, tiny_model) -> Path:
    """A git checkout: code and jobs tracked, the job's model folder (the tiny model, hard-linked) untracked
    data, and junk and secrets all over."""
    root = tmp_path / "proj"
    shutil.copytree(tiny_model, root / "models" / "tiny", copy_function=os.link)
    write(root, {"pyproject.toml": "[project]\nname = 'x'\n", "pipeline/__init__.py": "",
                 "pipeline/cli.py": "# cli\n", "stages/__init__.py": "", "pipeline/scratch.py": "# untracked\n",
                 "jobs/calib/thresholds.json": calibration_file(), **NEVER})
    write_job(root / "jobs", "../models/tiny", masks={"threshold": "calibrated", "calibration": "calib/thresholds.json"},
              output={"dir": "/mnt/cluster/out"})
    git(root, "init", "-q")
    git(root, "add", *TRACKED_CODE, "jobs/job.yaml", "jobs/other.yaml", "jobs/calib/thresholds.json",
        "pipeline/models/bundled/model_index.json")
    git(root, "add", "-f", "pipeline/.secret.py", "notes.tmp")
    (root / ".git" / "config.secret").write_text("x")
    (root / BIG).parent.mkdir()
    with open(root / BIG, "wb") as f:
        f.truncate(50 * 2**20)
    return root


@pytest.fixture
def job_files(tiny_model) -> set[str]:
    """What the job sends besides the code: the job, its calibration file, and of its model folder
    model_index.json and the components' files (the tiny model's README.md and training.json stay home)."""
    root = Path(tiny_model)
    model = {"models/tiny/" + p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.is_file() and (p.parent != root or p.name == "model_index.json")}
    assert "models/tiny/unet/diffusion_pytorch_model.safetensors" in model
    return {"jobs/job.yaml", "jobs/calib/thresholds.json"} | model


@pytest.fixture
def references(project) -> set[str]:
    """A COCO folder of 4 rendered scenes with junk beside them (a key, an image it does not list), and a
    job of variations of them: the files the package must hold for it (the listing and its images)."""
    render_coco(project / "refs", 4, classes=CLASSES)
    shutil.copy(project / "refs" / "images" / "00000000.png", project / "refs" / "images" / "unlisted.png")
    write(project, REFERENCE_JUNK)
    write_job(project / "jobs", "../models/tiny", name="refs.yaml", classes=list(CLASSES),
              prompts={"templates": ["a {objects}"], "max_classes_per_image": 1},
              references={"path": "../refs", "strengths": [0.5], "seeds_per_level": 1}, samples=4,
              output={"dir": "/mnt/cluster/out"})
    images = json.loads((project / "refs" / "annotations.json").read_text())["images"]
    return {"refs/annotations.json"} | {f"refs/{image['file_name']}" for image in images}


def dry_run_files(out: str) -> dict[str, str]:
    """The files a ``--dry-run`` prints: path -> size as printed."""
    rows = [line.rsplit(None, 1) for line in out.splitlines() if line.startswith(" ")]
    return {rel: size.strip() for size, rel in rows}


def test_git_checkout_sends_tracked_code_and_the_files_the_job_names_only(project, job_files):
    package = build_package(project, project / "jobs" / "job.yaml")
    assert set(package.files) == TRACKED_CODE | job_files
    assert package.untracked == ["pipeline/scratch.py"]  # reported by submit, not sent
    assert package.size == sum((project / rel).stat().st_size for rel in package.files)
    assert [name for name, _, _ in package.top_level()] == ["jobs/", "models/", "pipeline/", "pyproject.toml",
                                                            "stages/"]


def test_outside_git_the_allowlist_alone_decides(project, job_files):
    shutil.rmtree(project / ".git")
    package = build_package(project, project / "jobs" / "job.yaml")
    assert set(package.files) == TRACKED_CODE | job_files | {"pipeline/scratch.py"}
    assert package.untracked == []


def test_staging_holds_exactly_the_package(project, tmp_path):
    package = build_package(project, project / "jobs" / "job.yaml")
    staged = package.stage(tmp_path / "staged")
    found = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert found == set(package.files)
    assert all((staged / rel).read_bytes() == (project / rel).read_bytes() for rel in found)


def test_a_local_file_outside_the_working_dir_is_refused(project, tmp_path):
    outside = tmp_path / "elsewhere"
    write(outside, {"model/model_index.json": "{}", "thresholds.json": calibration_file()})
    job = write_job(project / "jobs", "../../elsewhere/model", name="out.yaml", output={"dir": "/mnt/out"})
    with pytest.raises(UsageError, match=r"out.yaml: model.path: ../../elsewhere/model is .*elsewhere/model, outside "
                       r"--working-dir .*proj, which the cluster cannot see; move it inside"):
        build_package(project, job)
    # a --set path is resolved against the working dir, as `synthgen run` does in the cluster's package
    with pytest.raises(UsageError, match="masks.calibration: ../elsewhere/thresholds.json is .* outside"):
        build_package(project, project / "jobs" / "job.yaml", ["masks.calibration=../elsewhere/thresholds.json"])
    with pytest.raises(UsageError, match="references.path: .*proj/missing does not exist"):
        build_package(project, project / "jobs" / "job.yaml", ["references={path: missing}"])


def test_a_link_out_of_the_working_dir_is_refused(project, tmp_path):
    (tmp_path / "aws").mkdir()
    (tmp_path / "aws" / "credentials").write_text("secret")
    extra = project / "models" / "tiny" / "unet" / "extra.bin"
    extra.symlink_to(tmp_path / "aws" / "credentials")
    build_package(project, project / "jobs" / "job.yaml")  # not a file the loader reads: not sent, not followed
    extra.rename(extra.with_suffix(".safetensors"))
    with pytest.raises(UsageError, match=r"model.path: .*extra.safetensors is .*aws/credentials, outside "
                       r"--working-dir .*; copy the file in its place"):
        build_package(project, project / "jobs" / "job.yaml")


def test_set_paths_absolute_paths_and_hub_ids(project, job_files):
    job = project / "jobs" / "job.yaml"
    package = build_package(project, job, ["model.path=models/tiny"])  # relative to the working dir
    assert set(package.files) == TRACKED_CODE | job_files
    package = build_package(project, job, ["model.path=/mnt/cluster/models/sd15", "masks.calibration=null"])
    assert set(package.files) == TRACKED_CODE | {"jobs/job.yaml"}
    assert package.cluster_paths == {"model.path": "/mnt/cluster/models/sd15"}  # the cluster's own path
    package = build_package(project, job, ["model.path=org/some-model"])  # a hub id
    assert "models/tiny/model_index.json" not in package.files and package.cluster_paths == {}
    with pytest.raises(UsageError, match="model.path: .* is an absolute path inside --working-dir .*write it relative"):
        build_package(project, job, [f"model.path={project / 'models' / 'tiny'}"])
    (project / ".secrets.json").write_text(calibration_file())
    with pytest.raises(UsageError, match="masks.calibration: .*secrets.json is a dotfile"):
        build_package(project, job, ["masks.calibration=.secrets.json"])
    with pytest.raises(UsageError, match="masks.calibration: credentials.json is .*a key or credentials file"):
        build_package(project, job, ["masks.calibration=credentials.json"])
    with pytest.raises(UsageError, match="masks.calibration: .*jobs/calib is a folder; it names one file"):
        build_package(project, job, ["masks.calibration=jobs/calib"])


def test_dry_run_lists_the_package_and_the_entrypoint_and_sends_nothing(project, job_files, monkeypatch, capsys):
    import ray.job_submission

    def no_client(*args, **kwargs):
        raise AssertionError("--dry-run contacted a cluster")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", no_client)
    monkeypatch.chdir(project)
    assert main(["submit", "jobs/job.yaml", "--out", "/mnt/cluster/run1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[-1] for line in out.splitlines() if line.startswith(" ")]
    assert set(listed) == TRACKED_CODE | job_files
    assert f"{len(listed)} files" in out and "pipeline/scratch.py" in out.split("warning: not sent")[1]
    assert ("entrypoint: python -m pipeline.cli run jobs/job.yaml --out /mnt/cluster/run1 --resource-timeout 900"
            in out)
    assert ".env" not in out and "credentials" not in out and "id_rsa" not in out and BIG not in out


def test_submit_checks_the_references_as_validate_does_and_sends_only_what_they_list(project, references,
                                                                                   monkeypatch, capsys):
    monkeypatch.chdir(project)
    argv = ["submit", "jobs/refs.yaml", "--address", "http://127.0.0.1:1", "--out", "/mnt/x", "--dry-run"]
    # the working dir is no reference dataset: refused, as `validate` refuses it, before anything is packed
    assert main([*argv, "--set", "references.path=."]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert "jobs/refs.yaml: references.path: " in captured.err and "has neither annotations.json" in captured.err
    assert main([*argv, "--set", "samples=8"]) == 2  # checked against the folder, as `validate` does
    assert "samples: 8, but 4 references x 1 strengths x 1 seeds_per_level = 4" in capsys.readouterr().err

    assert main(argv) == 0
    files = set(dry_run_files(capsys.readouterr().out))
    assert {rel for rel in files if rel.startswith("refs/")} == references  # not id_rsa, not unlisted.png
    assert not files & (set(NEVER) | set(REFERENCE_JUNK) | {BIG, "refs/images/unlisted.png"})


def test_a_synthgen_output_dir_as_references_sends_its_index_and_the_shards_it_names(project, references):
    from pipeline.import_coco import import_coco

    import_coco(project / "refs", project / "real", shard_size=2)
    (project / "real" / "id_rsa").write_text("key\n")
    package = build_package(project, project / "jobs" / "refs.yaml", ["references.path=real"])
    sent = {rel for rel in package.files if rel.startswith("real/")}
    assert sent == {"real/index.parquet", "real/manifest.json", "real/shards/train-000000.tar",
                    "real/shards/train-000001.tar"}


def test_the_dry_run_listing_is_exactly_what_is_uploaded(project, references, monkeypatch, capsys):
    import ray.job_submission

    uploaded: dict[str, str] = {}

    class Client:  # records the folder submit hands to Ray, before it is deleted
        def __init__(self, address):
            pass

        def submit_job(self, entrypoint, runtime_env):
            staged = Path(runtime_env["working_dir"])
            uploaded.update({p.relative_to(staged).as_posix(): human(p.stat().st_size)
                             for p in staged.rglob("*") if p.is_file()})
            return "raysubmit_1"

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    monkeypatch.chdir(project)
    argv = ["submit", "jobs/refs.yaml", "--address", "http://127.0.0.1:1", "--out", "/mnt/x"]
    assert main([*argv, "--dry-run"]) == 0
    printed = dry_run_files(capsys.readouterr().out)
    assert main(argv) == 0
    assert "raysubmit_1" in capsys.readouterr().out
    assert uploaded == printed
    assert references <= set(printed) and "models/tiny/model_index.json" in printed


def test_a_package_over_the_cap_is_refused_in_one_line(project, monkeypatch, capsys):
    monkeypatch.setattr(package_module, "MAX_BYTES", 4096)
    monkeypatch.chdir(project)
    assert main(["submit", "jobs/job.yaml", "--out", "/mnt/x", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "jobs/job.yaml: the package is " in err, err
    assert "over submit's limit of 4.0 KiB (Ray uploads it as one zip; largest: models/ (" in err
    assert "give big inputs (model.path, references.path) as absolute paths on the cluster" in err


def test_submit_checks_its_arguments_before_anything_else(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert main(["submit", "jobs/job.yaml", "--out", "/mnt/x"]) == 2
    assert "--address is required" in capsys.readouterr().err
    assert main(["submit", "jobs/job.yaml", "--out", "out", "--address", "http://127.0.0.1:1"]) == 2  # inside
    assert "pass --out with an absolute path" in capsys.readouterr().err
    assert main(["submit", "jobs/job.yaml", "--out", "out", "--dry-run"]) == 0  # the README's line: lists, and warns
    out = capsys.readouterr().out
    assert "warning: the output dir is inside the working dir" in out and "dry run: nothing sent" in out


# --- a real submit to a local Ray cluster ---------------------------------------------------------
@pytest.fixture
def ray_cluster():
    """A local Ray head with its own ports, temp dir, HOME and auth token: (dashboard url, env, temp dir)."""
    tmp = Path(tempfile.mkdtemp(prefix="sg-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    (tmp / "home").mkdir()
    names = ["port", "dashboard-port", "node-manager-port", "object-manager-port", "ray-client-server-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"]
    ports = free_ports(len(names) + 6)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp / "home"), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--temp-dir", str(tmp / "r"), "--num-cpus", "2",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
           "--worker-port-list", ",".join(map(str, ports[len(names):])),
           *[f"--{name}={port}" for name, port in zip(names, ports)]]
    start = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        log, _ = start.communicate(timeout=90)
        assert start.returncode == 0, log[-3000:]
        yield f"http://127.0.0.1:{ports[1]}", env, tmp / "r"
    finally:
        if start.poll() is None:
            start.kill()
        stop_session(start.pid)
        shutil.rmtree(tmp, ignore_errors=True)


def job_info(url: str, env: dict, job_id: str) -> dict:
    request = urllib.request.Request(f"{url}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_real_submit_uploads_exactly_the_package(project, job_files, ray_cluster, tmp_path):
    url, env, ray_temp = ray_cluster
    # the project's real code (as a tracked checkout) and model, so the job really starts on the cluster
    def python_files(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n in ("__pycache__", "models") or n.startswith(".")
                or not (n.endswith(".py") or Path(folder, n).is_dir())]

    for name in ("pipeline", "stages"):
        shutil.rmtree(project / name)
        shutil.copytree(REPO / name, project / name, ignore=python_files)
    shutil.copy(REPO / "pyproject.toml", project / "pyproject.toml")
    write(project, {"pipeline/scratch.py": "# untracked\n", "pipeline/__pycache__/x.pyc": ""})
    git(project, "add", "pyproject.toml", "pipeline", "stages")
    git(project, "rm", "-q", "--cached", "pipeline/scratch.py")
    code = {p.relative_to(project).as_posix() for name in ("pipeline", "stages") for p in (project / name).rglob("*.py")
            if "__pycache__" not in p.parts} - {"pipeline/scratch.py"}
    expected = code | job_files | {"pyproject.toml"}
    not_a_dir = tmp_path / "out-is-a-file"  # the job stops at its first check on the cluster: cheap
    not_a_dir.write_text("")

    denied = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", "jobs/job.yaml", "--out", str(not_a_dir),
                             "--address", url], cwd=project, env={**env, "RAY_AUTH_MODE": "disabled"},
                            capture_output=True, text=True, timeout=60)
    assert denied.returncode == 2 and "export RAY_AUTH_MODE=token" in denied.stderr, denied.stderr[-2000:]

    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", "jobs/job.yaml", "--out", str(not_a_dir),
                           "--address", url], cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    job_id = done.stdout.split()[-1]
    assert f"sending {len(expected)} files" in done.stderr and "pipeline/scratch.py" in done.stderr

    deadline = time.monotonic() + 60
    while (info := job_info(url, env, job_id))["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
    unpacked = [p for p in ray_temp.glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(unpacked) == 1, unpacked
    arrived = {p.relative_to(unpacked[0]).as_posix() for p in unpacked[0].rglob("*") if p.is_file()}
    assert arrived == expected
    assert not [rel for rel in arrived if any(part.startswith(".") for part in rel.split("/"))]
    assert not {"models/tiny/id_rsa", "models/tiny/unet/credentials.json", "models/tiny/notes.txt", BIG} & arrived
    # `synthgen run` started in the package: it found the job, the model folder and the calibration file
    # there, and stopped at the output dir, a file here
    logs = next(ray_temp.glob(f"session_2*/logs/job-driver-{job_id}.log")).read_text()
    assert info["status"] == "FAILED" and f"output.dir: {not_a_dir} is a file" in logs, logs[-2000:]


def test_the_class_token_file_a_job_names_travels(project, job_files):
    """``model.class_tokens`` (``synthgen tune-tokens``' file) is one input file: sent as the others are."""
    (project / "jobs" / "tokens.safetensors").write_bytes(b"\0" * 64)
    package = build_package(project, project / "jobs" / "job.yaml", ["model.class_tokens=jobs/tokens.safetensors"])
    assert set(package.files) == TRACKED_CODE | job_files | {"jobs/tokens.safetensors"}
