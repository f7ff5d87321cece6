"""A run survives what a cluster does to it: a killed actor costs a rebuilt pipeline, not the run; SIGTERM
stops it cleanly. Each case runs ``synthgen run`` as a subprocess with its own local Ray (own temp dir),
and compares the result with the session's uninterrupted dataset, byte for byte.

The synthesis actor is found among the driver's descendant processes by its process title (Ray names it
``ray::MapWorker(MapBatches(SynthesisStage))``) and killed with SIGKILL, as the OOM killer or a lost node
would; nothing outside the driver's own process tree is touched.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_same_dataset
from pipeline.cli import main
from pipeline.dataset import JOURNAL, read_manifest


def descendants(root: int) -> list[int]:
    """PIDs of every process below ``root`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def ray_env():
    temp = tempfile.mkdtemp(prefix="sg-rec-", dir="/tmp")  # this run's own local Ray (short socket paths)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=temp, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    yield env
    shutil.rmtree(temp, ignore_errors=True)


def start(dataset, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(dataset.job), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_commit(proc: subprocess.Popen, out: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ((out / JOURNAL).is_file() and (out / JOURNAL).read_bytes().count(b"\n") >= 1):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.02)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def test_a_killed_synthesis_actor_costs_a_rebuilt_pipeline_not_the_run(dataset, tmp_path, ray_env, capsys):
    """The synthesis actors are killed while they draw (not after a commit: the tiny job's 16 rows are drawn before
    its first shard commits); the run rebuilds its pipeline and ends with the uninterrupted run's bytes."""
    out = tmp_path / "out"
    proc = start(dataset, out, ray_env)
    deadline = time.monotonic() + 300
    while not (actors := [pid for pid in descendants(proc.pid) if "SynthesisStage)).submit" in cmdline(pid)]):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no synthesis actor at work in time"
        time.sleep(0.02)
    for pid in actors:
        os.kill(pid, signal.SIGKILL)
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    assert "tiny: recovery 1 of 3 after " in err and "shards committed" in err, err[-3000:]
    summary = read_manifest(out)["runs"][-1]
    assert len(summary["recoveries"]) == 1 and summary["shards_complete"] == 4
    assert_same_dataset(out, dataset.out)  # the same bytes as the uninterrupted run
    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert "complete" in status and "shards: 4 of 4 committed, 0 pending" in status and "1 recoveries" in status


@pytest.mark.parametrize("when", ["start-up", "mid-run"])
def test_sigterm_stops_a_run_with_one_line_and_the_rerun_gives_the_same_bytes(dataset, tmp_path, ray_env, when,
                                                                                 capsys):
    out = tmp_path / "out"
    proc = start(dataset, out, ray_env)
    if when == "mid-run":
        wait_for_commit(proc, out)
    else:  # while Ray starts: its session folder appears in the run's own Ray temp dir
        deadline = time.monotonic() + 120
        while not any(Path(ray_env["RAY_TMPDIR"]).glob("*/session_*")) and not any(
                Path(ray_env["RAY_TMPDIR"]).glob("session_*")):
            assert proc.poll() is None and time.monotonic() < deadline, "Ray did not start"
            time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    code, err = finish(proc)
    assert code == 143, err[-3000:]
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("tiny")]
    assert lines == ["synthgen: terminated (SIGTERM); committed shards are kept; rerun the same command to resume"], \
        err[-3000:]  # no native stack dump, no traceback
    if when == "mid-run":  # status reads the stopped run from its manifest and journal
        assert main(["status", str(out)]) == 0
        status = capsys.readouterr().out
        assert f"{out}: job 'tiny': running, or stopped" in status and "0 recoveries" in status, status
        assert re.search(r"shards: [1-4] of 4 committed", status) and re.search(r"rate: [\d.]+ samples/s", status), \
            status
    assert main(["run", str(dataset.job), "--no-ray", "--out", str(out)]) == 0
    assert_same_dataset(out, dataset.out)


def test_status_reads_progress_rate_and_eta_from_the_manifest_alone(dataset, tmp_path):
    import json
    from datetime import datetime, timedelta

    from pipeline.dataset import counts
    from pipeline.report import status_text

    out = tmp_path / "out"
    shutil.copytree(dataset.out, out)
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["shards"][:3]  # a run that has committed 3 of 4 shards, 1 of them before it started
    started = datetime.fromisoformat("2026-12-01T10:00:00+00:00")
    manifest.update(shards=shards, counts=counts(shards), complete=False,
                    running={"started": started.isoformat(), "host": "node-1", "pid": 42, "samples_at_start": 4,
                             "recoveries": 2})
    (out / "manifest.json").write_text(json.dumps(manifest))
    for name in ("train-000003.tar",):  # no shard file is read: status works from the manifest alone
        (out / "shards" / name).unlink()
    text = status_text(out, now=started + timedelta(seconds=8))
    assert text.splitlines() == [
        f"{out}: job 'tiny': running, or stopped",
        "shards: 3 of 4 committed, 1 pending",
        f"samples: 12 of 16 done: {manifest['counts']['samples']} kept, {manifest['counts']['rejected']} rejected"
        + (f" {manifest['counts']['rejected_by_reason']}" if manifest["counts"]["rejected_by_reason"] else ""),
        "run: started 2026-12-01T10:00:00+00:00 on node-1 (pid 42), 2 recoveries; if it stopped, rerun its command "
        "to resume",
        "rate: 1.00 samples/s over the run (8 in 0:00:08); ETA 0:00:04 at this rate"]


def test_status_of_a_dir_no_run_committed_to_says_so(tmp_path, capsys):
    assert main(["status", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist: no run has committed a shard there yet" in err, err


def test_reading_commands_end_quietly_when_their_reader_closes_the_pipe(dataset, monkeypatch, capsys):
    """`synthgen inspect OUT | head`: the reader is gone before synthgen writes; exit 0, nothing on stderr."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone away: writing raises BrokenPipeError (Python ignores SIGPIPE)
    closed = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", closed)
    try:
        assert main(["inspect", str(dataset.out), "-n", "16"]) == 0
    finally:
        monkeypatch.undo()
        try:
            closed.close()
        except BrokenPipeError:
            pass
    assert capsys.readouterr().err == ""
