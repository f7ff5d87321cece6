"""benchmarks.steer_fidelity at tiny settings (10 two-object prompts, 4 steps, one redraw): it runs end to end and
writes consistent counts; the figures themselves are not checked (the full run is not made here)."""
from __future__ import annotations

import json

from benchmarks import steer_fidelity


def test_tiny_run_writes_consistent_counts(tmp_path):
    out = tmp_path / "s.json"
    assert steer_fidelity.main(["--n", "10", "--objects", "2", "--redraws", "1", "--set", "generation.steps=4",
                                "--only", "none", "judge+redraws", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    err = report["judge_error"]
    assert err["images"] == 10 and 0 <= err["oracle_right_share"] <= 1
    assert set(report["runs"]) == {"none", "judge+redraws"}
    none, judged = report["runs"]["none"], report["runs"]["judge+redraws"]
    assert none["draws"] == 10 and none["cost_ratio"] == 1.0
    assert 10 <= judged["draws"] <= 20  # one redraw at most per sample
    for run in (none, judged):
        assert run["samples"] == 10 and 0 <= run["kept"] <= 10
        assert run["kept_and_right_share"] <= run["kept_share"] <= 1
        assert run["seconds_per_kept"] > 0
