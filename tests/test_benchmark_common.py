"""benchmarks.common: MethodTimer (the in-place timing the capture benchmarks judge their targets by) and
cached_run (training runs a rerun of a benchmark reuses)."""
import json
import time

import pytest

from benchmarks.common import MethodTimer, cached_run, code_digest


def test_method_timer_counts_only_the_wrapped_methods_and_keeps_their_behaviour():
    class Worker:
        def slow(self, x):
            time.sleep(0.05)
            return 2 * x

        def fails(self):
            time.sleep(0.02)
            raise ValueError("boom")

        def other(self):
            time.sleep(0.05)

    timer = MethodTimer(Worker, ("slow", "fails"))
    w = Worker()
    t0 = time.perf_counter()
    assert w.slow(3) == 6
    try:
        w.fails()
    except ValueError as e:
        assert str(e) == "boom"
    else:
        raise AssertionError("the wrapped method's exception was swallowed")
    w.other()
    total = time.perf_counter() - t0
    assert 0.07 <= timer.seconds < total - 0.04  # slow + fails are counted (also when raising), other is not
    timer.seconds = 0.0
    w.other()
    assert timer.seconds == 0.0


def test_cached_run_reuses_a_finished_result_only_for_an_equal_key(tmp_path):
    calls = []

    def run(value):
        def go():
            calls.append(value)
            return {"accuracy": value, "seeds": [value]}
        return go

    key = {"mode": "curriculum", "seed": 0, "epochs_per_level": 3, "code": code_digest("benchmarks/common.py")}
    first, reused = cached_run(tmp_path, key, run(0.5))
    assert (first, reused, calls) == ({"accuracy": 0.5, "seeds": [0.5]}, False, [0.5])
    again, reused = cached_run(tmp_path, dict(reversed(list(key.items()))), run(0.9))  # same key, other order
    assert (again, reused, calls) == (first, True, [0.5])
    other, reused = cached_run(tmp_path, {**key, "epochs_per_level": 1}, run(0.7))  # one setting changed
    assert (other["accuracy"], reused, calls) == (0.7, False, [0.5, 0.7])
    stored = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert sorted(s["key"]["epochs_per_level"] for s in stored) == [1, 3] and not list(tmp_path.glob("*.tmp"))


def test_cached_run_stores_nothing_when_the_run_fails(tmp_path):
    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_run(tmp_path, {"seed": 1}, boom)
    assert not list(tmp_path.iterdir())
    result, reused = cached_run(tmp_path, {"seed": 1}, lambda: {"accuracy": 1.0})
    assert (result, reused) == ({"accuracy": 1.0}, False)


def test_code_digest_changes_with_the_code():
    assert code_digest("benchmarks/common.py") != code_digest("benchmarks/train_classifier.py")
    assert len(code_digest("benchmarks/common.py", "pipeline/loader.py")) == 12
