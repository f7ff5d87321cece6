"""Quiet runs: a normal run prints no library noise on stderr."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

from conftest import REPO, write_job


def test_a_normal_run_prints_no_library_noise(tmp_path, tiny_model):
    job = write_job(tmp_path, tiny_model, samples=2, output={"dir": str(tmp_path / "out"), "shard_size": 2})
    temp = tempfile.mkdtemp(prefix="sg-quiet-", dir="/tmp")  # this run's own local Ray (own ports, own files)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=temp, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)], env=env, capture_output=True,
                              text=True, timeout=600)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]", proc.stderr) if line.strip() and not line.startswith("tiny:")]
    assert lines == [], proc.stderr  # only our progress bar: no warnings, token banner, core_worker, notices
    assert "kept" in proc.stdout
