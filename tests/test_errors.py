"""One error path and quiet runs: a failure inside a Ray stage ends in one line naming the original
exception and the stage, with exit 2 when a rerun would repeat it and 1 (and the resume advice) when
it would not; the full traceback is in the log file the line names; a normal run prints no library
noise on stderr."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, write_job
from pipeline import errors
from pipeline.cli import main
from stages.base import Stage

LINE = re.compile(r"^synthgen: error: (?P<type>\w+): (?P<message>.*?)(?: \((?P<where>stage [^)]*)\))?"
                  r"; full traceback: (?P<log>\S+\.log)(?P<advice>; .*)?$")


# --- stages for the failures (pickled by value into the Ray workers: see ray_session) ---------------
class Keys(Stage):
    """A stand-in for sampling: names the samples."""

    name, kind, inputs, outputs = "sampling", "task", ("index",), ("key",)

    def __call__(self, batch):
        return {**batch, "key": np.array([f"tiny-{i:09d}" for i in batch["index"]])}


class RaisesValueError(Stage):
    name, kind, fusable, inputs, outputs = "synthesis", "actor", False, ("key",), ("image",)

    def __call__(self, batch):
        raise ValueError("guidance_scale -1 is below 0")


class Dies(Stage):
    """A worker that dies without raising, as one killed by the OOM killer does."""

    name, kind, fusable, inputs, outputs = "synthesis", "actor", False, ("key",), ("image",)

    def __call__(self, batch):
        os._exit(1)


@pytest.fixture(scope="class")
def ray_session():
    """A local Ray for the tests of one class (the others need none in this process: ``run`` would use it)."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module
    temp = tempfile.mkdtemp(prefix="sg-err-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False, _temp_dir=temp)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def run_failing(monkeypatch, capsys, tmp_path, model: str, stages: list) -> tuple[int, re.Match, str]:
    """``synthgen run`` of a 2-sample job through the shared local Ray with the given stage chain: (exit code,
    the one error line, the log's text); ``run_failing.err`` keeps the whole stderr."""
    monkeypatch.setattr("stages.registry.load_stages", lambda entries=None: stages)
    job = write_job(tmp_path, model, samples=2, output={"dir": str(tmp_path / "out"), "shard_size": 2})
    code = main(["run", str(job)])
    err = run_failing.err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("tiny:")]  # the bar
    assert len(lines) == 1, err
    match = LINE.match(lines[0])
    assert match, lines[0]
    log = Path(match["log"])
    assert log.parent == errors.log_dir() and log.is_file()
    text = log.read_text()
    log.unlink()
    return code, match, text


class TestInLocalRay:
    """Failures inside Ray workers, through ``main``, on one local Ray."""

    def test_a_stage_error_is_its_own_type_and_message_with_the_stage_and_exit_2(self, ray_session, monkeypatch,
                                                                                capsys, tmp_path, tiny_model):
        code, line, log = run_failing(monkeypatch, capsys, tmp_path, tiny_model, [Keys, RaisesValueError])
        assert code == 2
        assert (line["type"], line["message"]) == ("ValueError", "guidance_scale -1 is below 0")
        assert line["where"] == "stage synthesis, samples tiny-000000000..tiny-000000001"
        assert line["advice"] is None  # a rerun repeats it: no "rerun to resume"
        assert "\x1b" not in line.string and "Ray" not in line.string and "ray::" not in line.string
        # the log holds the worker's traceback down to the raising line
        assert "Traceback" in log and 'raise ValueError("guidance_scale -1 is below 0")' in log

    def test_a_model_that_does_not_load_in_the_actor_constructor_is_the_loader_error_and_exit_2(
            self, ray_session, monkeypatch, capsys, tmp_path, tiny_model):
        from stages.sampling import SamplingStage
        from stages.synthesis import SynthesisStage

        broken = tmp_path / "broken-model"
        shutil.copytree(tiny_model, broken, copy_function=os.link)  # hard links: no 16 MB copy
        weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
        weights.unlink()  # never write through the link
        # a whole safetensors file (pre-flight reads its header and passes it) whose tensors do not fit the UNet's
        # config: only loading the model finds that out, in the synthesis actor's constructor
        from safetensors.numpy import load_file, save_file

        names = list(load_file(str(Path(tiny_model) / "unet" / "diffusion_pytorch_model.safetensors")))
        save_file({name: np.zeros(1, np.float32) for name in names}, str(weights))
        code, line, log = run_failing(monkeypatch, capsys, tmp_path, str(broken), [SamplingStage, SynthesisStage])
        assert code == 2
        assert line["type"] == "RuntimeError" and "size mismatch for conv_in.weight" in log, line.string
        assert line["where"] == "stage synthesis" and line["advice"] is None
        assert "ActorDiedError" not in line.string and "\x1b" not in line.string
        assert "Traceback" in log and "from_pretrained" in log  # the creation task's traceback, unwrapped

    def test_a_worker_that_dies_is_exit_1_with_the_resume_advice(self, ray_session, monkeypatch, capsys, tmp_path,
                                                                 tiny_model):
        code, line, log = run_failing(monkeypatch, capsys, tmp_path, tiny_model, [Keys, Dies])
        assert code == 1
        # a lost worker is the cluster's failure: recovered from once; the same loss again before any commit stops
        assert run_failing.err.count("tiny: recovery 1 of 3 after ActorDiedError") == 1
        assert "recovery 2" not in run_failing.err
        assert line["type"] == "ActorDiedError" and line["where"] == "stage synthesis", line.string
        assert "(worker exit SYSTEM_ERROR: " in line["message"]  # how it ended (Ray's likely causes: in the log)
        assert line["advice"] == f"; {errors.RESUME}"
        assert "Traceback" in log


def test_bad_input_is_one_line_with_its_type_and_no_log(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("synthgen: error: SpecError: ") and "missing.yaml" in err
    assert "full traceback" not in err


def test_ray_wrappers_unwrap_to_the_original_and_transient_failures_are_exit_1():
    from ray.exceptions import ActorDiedError, RayTaskError

    original = ValueError("bad")
    with pytest.raises(ValueError) as caught, errors.in_stage("masks", "call", {"key": np.array(["a", "b"])}):
        raise original
    wrapped = RayTaskError("submit", "Traceback ...\nValueError: bad", caught.value).as_instanceof_cause()
    assert errors.unwrap(wrapped) is original and errors.exit_code(wrapped) == 2
    assert errors.summary(wrapped) == ("ValueError", "bad")
    assert errors.where(wrapped) == {"stage": "masks", "phase": "call", "samples": "a..b", "message": "bad"}
    died_in_init = ActorDiedError(RayTaskError("__init__", "Traceback ...", OSError("no weights")))
    assert errors.summary(died_in_init) == ("OSError", "no weights")
    assert errors.exit_code(died_in_init) == 1  # untagged: not known to come from a stage's constructor
    assert errors.exit_code(ActorDiedError()) == 1 and errors.exit_code(RuntimeError("CUDA out of memory")) == 1
    assert errors.exit_code(KeyboardInterrupt()) == 130


def test_run_against_a_cluster_that_wants_a_token_is_one_line_at_once(monkeypatch, capfd, tmp_path, tiny_model):
    """No 20 s of Ray's InvalidAuthToken retries: one call to the GCS (here a stand-in that refuses
    us) and one line with the hint ``submit`` gives."""
    from concurrent import futures

    import grpc
    import ray
    from ray.core.generated import gcs_service_pb2_grpc

    from pipeline.graph import token_refusal

    class Refuses(gcs_service_pb2_grpc.NodeInfoGcsServiceServicer):
        def GetClusterId(self, request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: Authentication token is missing")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    gcs_service_pb2_grpc.add_NodeInfoGcsServiceServicer_to_server(Refuses(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    job = write_job(tmp_path, tiny_model, output={"dir": str(tmp_path / "out")})
    try:
        code = main(["run", str(job), "--address", f"127.0.0.1:{port}"])
        err = capfd.readouterr().err  # the file descriptor: Ray's C++ warnings would be here too
    finally:
        server.stop(None)  # (gRPC logs a GOAWAY on stderr if a connection is still open: read before)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"synthgen: error: UsageError: 127.0.0.1:{port}: InvalidAuthToken: ") and \
        "(no token sent); the cluster uses Ray token authentication: export RAY_AUTH_MODE=token" in err, err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()
    assert token_refusal(f"127.0.0.1:{port}") == ""  # nobody answers: left to ray.init
    assert token_refusal("ray://head:10001") == ""  # Ray Client: not a GCS address


@pytest.mark.parametrize("runner", [["--no-ray"]], ids=["no-ray"])
def test_a_normal_run_prints_no_library_noise(tmp_path, tiny_model, runner):
    """Under a run's own local Ray: tests/test_determinism.py (CliRun.noise, on its resumed Ray run)."""
    job = write_job(tmp_path, tiny_model, samples=2, output={"dir": str(tmp_path / "out"), "shard_size": 2})
    temp = tempfile.mkdtemp(prefix="sg-quiet-", dir="/tmp")  # this run's own local Ray (own ports, own files)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=temp, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job), *runner], env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]", proc.stderr) if line.strip() and not line.startswith("tiny:")]
    assert lines == [], proc.stderr  # only our progress bar: no warnings, token banner, core_worker, notices
    assert "kept" in proc.stdout


def test_a_local_ray_gets_the_quiet_environment_from_this_process_a_cluster_from_its_runtime_env(monkeypatch):
    """A local Ray's workers inherit the driver's environment (no runtime_env: each worker start would wait for
    Ray's runtime-env agent); a cluster's workers get the same variables through the job's runtime_env."""
    from pipeline import quiet

    for key in quiet.ENV:
        monkeypatch.delenv(key, raising=False)
    assert quiet.ray_init_args(True, local=True) == {"logging_level": "INFO", "log_to_driver": True}
    assert not any(key in os.environ for key in quiet.ENV)  # verbose touches nothing
    cluster = quiet.ray_init_args(False, local=False)
    assert cluster["runtime_env"] == {"env_vars": quiet.ENV} and not any(key in os.environ for key in quiet.ENV)
    local = quiet.ray_init_args(False, local=True)
    assert "runtime_env" not in local and local["log_to_driver"] is False
    assert {key: os.environ[key] for key in quiet.ENV} == quiet.ENV


def test_a_keyboard_interrupt_after_sigterm_is_reported_as_the_sigterm(monkeypatch, capsys):
    """A library that catches the Terminated our SIGTERM handler raised and raises a KeyboardInterrupt of its own
    does not turn the SIGTERM into a Ctrl-C: exit 143 and the SIGTERM line; without a SIGTERM, 130."""
    from pipeline import errors

    monkeypatch.setattr(errors, "TERMINATING", [])
    assert errors.report(KeyboardInterrupt(), "run", []) == 130
    assert capsys.readouterr().err.startswith("synthgen: interrupted; ")
    errors.TERMINATING.append(15)
    assert errors.report(KeyboardInterrupt(), "run", []) == 143
    assert capsys.readouterr().err.startswith("synthgen: terminated (SIGTERM); ")
    assert errors.exit_code(errors.Terminated("signal 15")) == 143
