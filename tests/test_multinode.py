"""A real two-node Ray cluster on this machine: a head (no CPUs: it schedules nothing) and a worker node
(the CPUs), each started by ``ray start`` with its own temp dir and ports on 127.0.0.1, stopped by the
PIDs of the sessions the test started (never ``ray stop``, which stops every Ray on the machine).

``synthgen run JOB --address HEAD --out s3://...`` from a driver process runs every stage on the worker
node (the head offers no CPU); the shards are written there, straight to S3 (moto's server on 127.0.0.1,
tests/test_storage_s3.py), the driver receiving commit records only; the objects are the bytes of the
in-process local run of the same job.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO
from raynodes import free_ports, stop_session
from test_storage_s3 import BUCKET, assert_same_objects, moto_s3

from pipeline.dataset import read_manifest

RAY = Path(sys.executable).parent / "ray"
HEAD_PORTS = ("port", "node-manager-port", "object-manager-port", "ray-client-server-port",
              "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
              "runtime-env-agent-port")
NODE_PORTS = HEAD_PORTS[1:2] + HEAD_PORTS[2:3] + HEAD_PORTS[4:]
WORKER_PORTS = 8  # worker processes per node (--worker-port-list)


def ray_start(args: list[str], env: dict, sessions: list[int], attempts: int = 2) -> None:
    """``ray start ARGS`` in a session of its own (recorded in ``sessions`` for stopping). Ray gives a raylet
    30 s to register (hard-coded); on a loaded machine that can pass, so a failed start is stopped and retried."""
    for attempt in range(attempts):
        proc = subprocess.Popen([str(RAY), "start", *args], env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        sessions.append(proc.pid)
        log, _ = proc.communicate(timeout=120)
        if proc.returncode == 0:
            return
        stop_session(proc.pid)
        assert attempt + 1 < attempts and "timed out during startup" in log, log[-3000:]


@pytest.fixture
def s3(tmp_path):
    with moto_s3(tmp_path) as env:
        yield env


@contextmanager
def cluster(nodes: int):
    """A head with 0 CPUs and ``nodes`` worker nodes with 4 CPUs each, on 127.0.0.1 (own ports, temp dirs and
    HOME); yields (GCS address, env, head temp dir, [node temp dirs], [node `ray start` session ids])."""
    tmp = Path(tempfile.mkdtemp(prefix="sg-mn-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # with s3's AWS_* variables
    (tmp / "home").mkdir()  # Ray keeps state under ~/.ray: its own HOME, and its own token for the 3 processes
    env.update(HOME=str(tmp / "home"), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0",
               # Ray inlines a task's return under 100 KB into its owner (for Ray Data's blocks: the driver);
               # the tiny job's blocks are ~10 KB, real ones (512², batch 8) ~0.5 MB: keep them in the object
               # store of the node that made them, as real blocks are
               RAY_max_direct_call_object_size="1024",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    ports = free_ports(len(HEAD_PORTS) + nodes * len(NODE_PORTS) + (1 + nodes) * WORKER_PORTS)
    head_ports, ports = ports[:len(HEAD_PORTS)], ports[len(HEAD_PORTS):]
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    sessions: list[int] = []
    try:
        ray_start(["--head", "--temp-dir", str(tmp / "head"), "--num-cpus", "0", "--num-gpus", "0",
                   "--include-dashboard", "false", "--resources", '{"head_node": 1}', *common,
                   "--worker-port-list", ",".join(map(str, ports[:WORKER_PORTS])),
                   *[f"--{n}={p}" for n, p in zip(HEAD_PORTS, head_ports)]], env, sessions)
        ports = ports[WORKER_PORTS:]
        address = f"127.0.0.1:{head_ports[0]}"
        node_dirs, node_sessions = [], []
        for i in range(nodes):
            node_ports, workers, ports = ports[:len(NODE_PORTS)], ports[len(NODE_PORTS):][:WORKER_PORTS], \
                ports[len(NODE_PORTS) + WORKER_PORTS:]
            node_dirs.append(tmp / f"node{i}")
            ray_start(["--address", address, "--temp-dir", str(node_dirs[-1]), "--num-cpus", "4",
                       "--num-gpus", "0", "--resources", '{"worker_node": 1}', *common,
                       "--worker-port-list", ",".join(map(str, workers)),
                       *[f"--{n}={p}" for n, p in zip(NODE_PORTS, node_ports)]], env, sessions)
            node_sessions.append(sessions[-1])
        yield address, env, tmp / "head", node_dirs, node_sessions
    finally:
        for sid in reversed(sessions):
            stop_session(sid)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def two_nodes(s3):
    """(GCS address, env, head temp dir, worker temp dir) of a head with 0 CPUs and a worker node with 4."""
    with cluster(1) as (address, env, head, nodes, _):
        yield address, env, head, nodes[0]


def ran_on(temp_dir: Path) -> set[str]:
    """Names of the tasks and actors a node's worker processes ran (Ray marks each in the worker's .out log
    with ``:task_name:NAME`` / ``:actor_name:NAME``)."""
    names = set()
    for log in temp_dir.glob("session_*/logs/worker-*.out"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith((":task_name:", ":actor_name:")):
                names.add(line.split(":", 2)[2].strip())
    return names


def test_a_two_node_cluster_writes_shards_to_s3_on_the_worker_node_with_the_local_bytes(dataset, two_nodes):
    address, env, head_tmp, node_tmp = two_nodes
    uri = f"s3://{BUCKET}/cluster"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(dataset.job), "--address", address,
                           "--out", uri], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_manifest(uri)["runs"][-1]
    assert summary["runner"] == "ray" and summary["writer"] == "workers" and summary["shards_written"] == 4
    assert summary["driver_bytes"] < 2048 * 4  # commit records only: no sample bytes reached the driver
    assert {s["name"]: s["rows"] for s in summary["stages"]} == {s["name"]: 16 for s in dataset.summary["stages"]}
    assert_same_objects("cluster", dataset.out)
    # every stage and every shard writer ran on the worker node (the head ran at most Ray Data's own actors)
    ours = ("_write_shard", "SamplingStage", "SynthesisStage", "MaskStage", "EncodeStage", "_expand")
    on_node, on_head = ran_on(node_tmp), ran_on(head_tmp)
    assert [n for n in on_head if any(o in n for o in ours)] == [], on_head
    assert {o for o in ours if any(o in n for n in on_node)} == set(ours), on_node


@pytest.fixture
def grown(dataset, tmp_path):
    """The tiny job at 64 samples (16 shards), in-process: the session's 16 grown by 48."""
    out = tmp_path / "grown"
    shutil.copytree(dataset.out, out)
    from pipeline.cli import main

    assert main(["run", str(dataset.job), "--no-ray", "--out", str(out), "--set", "samples=64"]) == 0
    return out


def test_lost_worker_nodes_cost_recoveries_not_the_run(dataset, grown, s3):
    """Head + three worker nodes. Once the synthesis actor is at work, the node running it is lost (every process
    of its `ray start` session killed); after the next commit the node it moved to is lost too: the run goes on on
    the last node, exit 0, two recoveries, the objects equal the in-process run's. (The first loss does not wait
    for a commit: the rows this tiny model draws after it would not outlast the next commit.)"""
    from raynodes import session_pids

    uri = f"s3://{BUCKET}/lost-nodes"
    with cluster(3) as (address, env, _, _, node_sessions):
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(dataset.job), "--address", address,
                                 "--out", uri, "--set", "samples=64"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            lost = []
            for wait_for_commit in (False, True):
                target = read_commits(uri) + 1
                deadline = time.monotonic() + 180
                while True:
                    if proc.poll() is not None:
                        pytest.fail(f"the run ended early: {proc.communicate()[1][-3000:]}")
                    assert time.monotonic() < deadline, "no commit in time" if wait_for_commit else "no synthesis"
                    synthesis = [sid for sid in node_sessions if sid not in lost and
                                 any("SynthesisStage" in cmdline(pid) for pid in session_pids(sid))]
                    at_work = any("SynthesisStage)).submit" in cmdline(pid) for sid in synthesis
                                  for pid in session_pids(sid))
                    if read_commits(uri) >= target if wait_for_commit else at_work:
                        break
                    time.sleep(0.05)
                assert len(synthesis) == 1, "the synthesis actor is on one live node"
                stop_session(synthesis[0])  # the node is gone: raylet, object store, workers
                lost.append(synthesis[0])
            _, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.terminate()
                print(proc.communicate(timeout=60)[1][-5000:])
    assert proc.returncode == 0, err[-3000:]
    assert "tiny: recovery 1 of 3 after " in err and "tiny: recovery 2 of 3 after " in err, err[-3000:]
    summary = read_manifest(uri)["runs"][-1]
    assert len(summary["recoveries"]) >= 2 and summary["shards_complete"] == 16
    assert_same_objects("lost-nodes", grown)


def read_commits(uri: str) -> int:
    """Committed shards of a run going on (journal lines and manifest), 0 before its manifest exists."""
    try:
        return read_manifest(uri)["counts"]["shards"]
    except Exception:  # noqa: BLE001 - not there yet
        return 0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
