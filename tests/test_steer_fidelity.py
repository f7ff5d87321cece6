"""benchmarks.steer_fidelity at tiny settings (10 two-object prompts, 4 steps, one redraw): it runs end to end and
writes consistent counts (stopped draws only with the early check); the figures themselves are not checked (the full run is not made here)."""
from __future__ import annotations

import json

from benchmarks import steer_fidelity


def test_tiny_run_writes_consistent_counts(tmp_path):
    out = tmp_path / "s.json"
    assert steer_fidelity.main(["--n", "10", "--objects", "2", "--redraws", "1", "--set", "generation.steps=4",
                                "--only", "none", "judge+redraws", "early+judge+redraws", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    err = report["judge_error"]
    assert err["images"] == 10 and 0 <= err["oracle_right_share"] <= 1
    assert set(report["runs"]) == {"none", "judge+redraws", "early+judge+redraws"}
    none, judged = report["runs"]["none"], report["runs"]["judge+redraws"]
    assert none["draws"] == 10 and none["cost_ratio"] == 1.0
    assert 10 <= judged["draws"] <= 20  # one redraw at most per sample
    early = report["runs"]["early+judge+redraws"]
    assert 10 <= early["draws"] <= 20 and 0 <= early["stopped_early"] <= early["draws"]
    assert none["stopped_early"] == judged["stopped_early"] == 0
    for run in (none, judged, early):
        assert run["samples"] == 10 and 0 <= run["kept"] <= 10
        assert run["kept_and_right_share"] <= run["kept_share"] <= 1
        assert run["seconds_per_kept"] > 0


def test_the_early_forecast_writes_shares_for_each_step_and_min_score(tmp_path):
    from benchmarks import early_forecast

    out = tmp_path / "f.json"
    assert early_forecast.main(["--n", "10", "--objects", "2", "--steps", "2", "3", "--set", "generation.steps=4",
                                "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["draws"] == 10 and report["loop_steps"] == 4 and set(report["steps"]) == {"2", "3"}
    for step in report["steps"].values():
        assert set(step) == {f"min_score_{round(m * 100)}" for m in early_forecast.MIN_SCORES}
        shares = [row["goes_on_share"] for row in step.values()]
        assert all(0 <= s <= 1 for s in shares) and shares == sorted(shares, reverse=True)  # stricter: fewer go on
        for row in step.values():
            assert all(v is None or 0 <= v <= 1 for v in row.values())
