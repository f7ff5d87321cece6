"""benchmarks.common.MethodTimer: the in-place timing the capture benchmarks judge their targets by."""
import time

from benchmarks.common import MethodTimer


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
