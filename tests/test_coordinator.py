from __future__ import annotations

import logging
import sys
import threading
import time
import traceback

import pytest

from gpuqueue import Coordinator, FIFOQueue, LooperThread, OutOfRangeError
from gpuqueue.errors import CancelledError
from tests.conftest import Worker


class BoomError(Exception):
    pass


def raise_boom(message: str = "boom") -> None:
    raise BoomError(message)


def caught(fn, *args) -> BaseException:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except BaseException as error:
        return error
    raise AssertionError("did not raise")


def frame_names(error: BaseException) -> list[str]:
    return [frame.name for frame in traceback.extract_tb(error.__traceback__)]


# -- request_stop, first error wins ----------------------------------------


def test_first_exception_wins_and_is_reraised_as_the_same_object() -> None:
    coord = Coordinator()
    first = caught(raise_boom, "first")
    second = caught(raise_boom, "second")
    coord.request_stop(first)
    coord.request_stop(second)
    assert coord.should_stop()
    with pytest.raises(BoomError, match=r"^first$") as info:
        coord.join()
    assert info.value is first
    assert "raise_boom" in frame_names(info.value)
    assert coord.suppressed_exceptions == [second]
    with pytest.raises(BoomError, match=r"^first$"):
        coord.raise_requested_exception()


def test_request_stop_accepts_exc_info_tuples() -> None:
    coord = Coordinator()
    try:
        raise_boom("from exc_info")
    except BoomError:
        coord.request_stop(sys.exc_info())  # type: ignore[arg-type]
    with pytest.raises(BoomError, match=r"^from exc_info$") as info:
        coord.raise_requested_exception()
    assert "raise_boom" in frame_names(info.value)


def test_request_stop_rejects_other_values() -> None:
    with pytest.raises(TypeError, match=r"^ex must be an exception instance or a sys.exc_info"):
        Coordinator().request_stop("boom")  # type: ignore[arg-type]


def test_exception_reported_from_another_thread() -> None:
    coord = Coordinator()
    thread = threading.Thread(target=lambda: coord.request_stop(caught(raise_boom)))
    thread.start()
    with pytest.raises(BoomError):
        coord.join([thread])


def test_request_stop_without_error_and_no_threads() -> None:
    coord = Coordinator()
    assert not coord.should_stop()
    assert not coord.wait_for_stop(0)
    coord.request_stop()
    assert coord.wait_for_stop(0)
    coord.join()
    assert coord.joined
    assert coord.exception is None


@pytest.mark.parametrize("error", [OutOfRangeError("end"), KeyError("k")])
def test_clean_stop_exception_types(error: Exception) -> None:
    clean = None if isinstance(error, OutOfRangeError) else (KeyError,)
    coord = Coordinator(clean_stop_exception_types=clean)
    coord.request_stop(error)
    assert coord.should_stop()
    coord.join()  # does not raise


def test_out_of_range_is_an_error_when_not_a_clean_type() -> None:
    coord = Coordinator(clean_stop_exception_types=())
    coord.request_stop(OutOfRangeError("end"))
    with pytest.raises(OutOfRangeError, match=r"^end$"):
        coord.join()


def test_stop_on_exception_reports_and_swallows() -> None:
    coord = Coordinator()
    with coord.stop_on_exception():
        raise_boom("in block")
    assert coord.should_stop()
    with pytest.raises(BoomError, match=r"^in block$"):
        coord.raise_requested_exception()


def test_stop_on_exception_without_error_does_not_stop() -> None:
    coord = Coordinator()
    with coord.stop_on_exception():
        pass
    assert not coord.should_stop()


def test_stop_on_exception_treats_clean_types_as_clean() -> None:
    coord = Coordinator()
    with coord.stop_on_exception():
        raise OutOfRangeError("done")
    assert coord.should_stop()
    coord.raise_requested_exception()


def test_report_after_join_raises_at_once() -> None:
    coord = Coordinator()
    coord.request_stop()
    coord.join()
    error = BoomError("late")
    with pytest.raises(BoomError, match=r"^late$"):
        coord.request_stop(error)
    coord.request_stop()  # no error: nothing to raise


def test_clear_stop_makes_it_reusable() -> None:
    coord = Coordinator()
    coord.request_stop(BoomError("x"))
    with pytest.raises(BoomError):
        coord.join()
    coord.clear_stop()
    assert not coord.should_stop() and not coord.joined
    assert coord.exception is None
    coord.raise_requested_exception()
    coord.request_stop(BoomError("second run"))
    with pytest.raises(BoomError, match=r"^second run$"):
        coord.join()


# -- stop callbacks ---------------------------------------------------------


def test_stop_callbacks_run_once_when_stop_is_requested() -> None:
    coord = Coordinator()
    calls: list[str] = []
    coord.add_stop_callback(lambda: calls.append("a"))
    removed = lambda: calls.append("removed")  # noqa: E731
    coord.add_stop_callback(removed)
    coord.remove_stop_callback(removed)
    assert calls == []
    coord.request_stop()
    coord.request_stop()
    assert calls == ["a"]
    coord.add_stop_callback(lambda: calls.append("late"))
    assert calls == ["a", "late"]


def test_a_failing_stop_callback_is_logged_and_others_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    coord = Coordinator()
    calls: list[str] = []
    coord.add_stop_callback(raise_boom)
    coord.add_stop_callback(lambda: calls.append("ran"))
    with caplog.at_level(logging.ERROR, logger="gpuqueue.sync.coordinator"):
        coord.request_stop()
    assert calls == ["ran"]
    assert "stop callback" in caplog.text and "BoomError" in caplog.text


def test_stop_callback_wakes_a_thread_blocked_on_a_queue() -> None:
    coord = Coordinator()
    q: FIFOQueue[int] = FIFOQueue(1)
    coord.add_stop_callback(q.cancel)
    getter = Worker(q.get)
    getter.start()
    coord.request_stop()
    assert isinstance(getter.finish().error, CancelledError)


# -- join -------------------------------------------------------------------


def test_join_waits_for_the_union_of_registered_and_passed_threads() -> None:
    coord = Coordinator()
    gates = [threading.Event(), threading.Event()]
    done: list[int] = []

    def work(i: int) -> None:
        gates[i].wait(5)
        done.append(i)

    registered = threading.Thread(target=work, args=(0,))
    passed = threading.Thread(target=work, args=(1,))
    coord.register_thread(registered)
    assert coord.registered_threads == [registered]
    registered.start()
    passed.start()
    joiner = Worker(coord.join, [passed])
    joiner.start()
    gates[1].set()
    passed.join(5)
    assert joiner.is_alive()  # still waiting for the registered thread
    gates[0].set()
    assert joiner.finish().error is None
    assert sorted(done) == [0, 1]
    assert coord.registered_threads == []


def test_join_wakes_when_the_last_thread_ends_without_polling() -> None:
    coord = Coordinator()
    gate = threading.Event()
    thread = threading.Thread(target=gate.wait, args=(5,), name="gated")
    thread.start()
    joiner = Worker(coord.join, [thread])
    joiner.start()
    released = time.monotonic()
    gate.set()
    joiner.finish()
    # TensorFlow's join polls every second; this one is woken by the thread's end.
    assert time.monotonic() - released < 0.5
    assert not coord.should_stop()


def test_join_wakes_when_stop_is_requested_and_then_waits_for_threads() -> None:
    coord = Coordinator()

    def work() -> None:
        coord.wait_for_stop()

    threads = [threading.Thread(target=work, name=f"w{i}") for i in range(3)]
    for t in threads:
        t.start()
    joiner = Worker(coord.join, threads)
    joiner.start()
    coord.request_stop()
    assert joiner.finish().error is None
    assert not any(t.is_alive() for t in threads)


def test_join_names_stragglers_after_the_grace_period() -> None:
    coord = Coordinator()
    release = threading.Event()
    straggler = threading.Thread(target=release.wait, args=(10,), name="stuck-worker")
    straggler.start()
    coord.request_stop()
    try:
        with pytest.raises(
            RuntimeError, match=r"^Coordinator stopped with threads still running: stuck-worker$"
        ):
            coord.join([straggler], stop_grace_period_secs=0.01)
    finally:
        release.set()
        straggler.join(5)


def test_join_ignore_live_threads_logs_them(caplog: pytest.LogCaptureFixture) -> None:
    coord = Coordinator()
    release = threading.Event()
    straggler = threading.Thread(target=release.wait, args=(10,), name="stuck-worker")
    straggler.start()
    coord.request_stop()
    try:
        with caplog.at_level(logging.INFO, logger="gpuqueue.sync.coordinator"):
            coord.join([straggler], stop_grace_period_secs=0.01, ignore_live_threads=True)
    finally:
        release.set()
        straggler.join(5)
    assert "threads still running: stuck-worker" in caplog.text


def test_join_raises_the_recorded_error_in_preference_to_stragglers_and_names_them() -> None:
    coord = Coordinator()
    release = threading.Event()
    straggler = threading.Thread(target=release.wait, args=(10,), name="stuck-worker")
    straggler.start()
    coord.request_stop(BoomError("first"))
    try:
        # ... with a note naming the threads still alive (they may be stuck because of it).
        stuck = r"^first\nCoordinator stopped with threads still running: stuck-worker$"
        with pytest.raises(BoomError, match=stuck):
            coord.join([straggler], stop_grace_period_secs=0.01)
    finally:
        release.set()
        straggler.join(5)


def test_join_ignores_threads_never_started() -> None:
    coord = Coordinator()
    coord.register_thread(threading.Thread(target=lambda: None))
    coord.join()


# -- LooperThread -------------------------------------------------------------


def test_looper_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"^'coord' must be a Coordinator, got object$"):
        LooperThread(object(), None)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"^'args' and 'kwargs' require that you also pass 'target'$"
    ):
        LooperThread(Coordinator(), None, args=(1,))
    with pytest.raises(ValueError, match=r"^'args' and 'kwargs' require"):
        LooperThread(Coordinator(), None, kwargs={"a": 1})
    with pytest.raises(ValueError, match=r"^timer_interval_secs must be None or >= 0"):
        LooperThread(Coordinator(), -1)


def test_looper_back_to_back_registers_and_stops() -> None:
    coord = Coordinator()
    calls: list[int] = []

    def step(scale: int, *, offset: int) -> None:
        calls.append(len(calls) * scale + offset)
        if len(calls) == 5:
            coord.request_stop()

    looper = LooperThread.loop(coord, None, step, args=(10,), kwargs={"offset": 1}, name="lp")
    assert looper.name == "lp" and looper.daemon and looper.coord is coord
    assert coord.registered_threads == [looper]
    coord.join()
    assert calls == [1, 11, 21, 31, 41]


def test_looper_timer_calls_first_at_once_and_stops_in_the_middle_of_a_wait() -> None:
    coord = Coordinator()
    first_call = threading.Event()
    calls: list[float] = []

    def step() -> None:
        calls.append(time.monotonic())
        first_call.set()

    looper = LooperThread.loop(coord, 3600, step)
    assert first_call.wait(5)
    coord.request_stop()  # the looper is now waiting for the next boundary, an hour away
    coord.join(stop_grace_period_secs=5)
    assert not looper.is_alive()
    assert len(calls) == 1


def test_looper_timer_keeps_fixed_boundaries() -> None:
    coord = Coordinator()
    calls: list[float] = []

    def step() -> None:
        calls.append(time.monotonic())
        if len(calls) == 4:
            coord.request_stop()

    LooperThread.loop(coord, 0.02, step)
    coord.join()
    assert len(calls) == 4
    # Boundaries are fixed: the 4th call is about 3 intervals after the first.
    assert calls[3] - calls[0] >= 3 * 0.02 * 0.9


class HookedLooper(LooperThread):
    def __init__(self, coord: Coordinator, fail_at: int | None, fail_stop: bool = False) -> None:
        super().__init__(coord, None, name="hooked")
        self.events: list[str] = []
        self.fail_at = fail_at
        self.fail_stop = fail_stop

    def start_loop(self) -> None:
        self.events.append("start")

    def run_loop(self) -> None:
        self.events.append("run")
        if self.events.count("run") == self.fail_at:
            raise BoomError("in run_loop")
        if self.events.count("run") == 3:
            self.coord.request_stop()

    def stop_loop(self) -> None:
        self.events.append("stop")
        if self.fail_stop:
            raise BoomError("in stop_loop")


def test_looper_hooks_run_in_order() -> None:
    coord = Coordinator()
    looper = HookedLooper(coord, fail_at=None)
    looper.start()
    coord.join()
    assert looper.events == ["start", "run", "run", "run", "stop"]


def test_looper_exception_is_reported_and_stop_loop_still_runs() -> None:
    coord = Coordinator()
    looper = HookedLooper(coord, fail_at=2, fail_stop=True)
    looper.start()
    with pytest.raises(BoomError, match=r"^in run_loop$"):
        coord.join()
    assert looper.events == ["start", "run", "run", "stop"]
    assert [str(e) for e in coord.suppressed_exceptions] == ["in stop_loop"]
