"""Code written for ``tf.compat.v1.train`` runs unchanged against gpuqueue.

Everything below the import is written against TensorFlow's documented API.
The first four tests were also run against TensorFlow 2.21 itself by binding
``train = tf.compat.v1.train`` and ``errors = tf.errors`` (the QueueRunner one
needs TensorFlow's graph queues and sessions, which gpuqueue drops).
"""

from __future__ import annotations

import sys
import threading

import pytest

import gpuqueue as train
from gpuqueue import errors


def stop_on_event(coord, wait_for_stop, set_when_stopped):  # type: ignore[no-untyped-def]
    wait_for_stop.wait()
    coord.request_stop()
    set_when_stopped.set()


def raise_on_event(coord, wait_for_stop, set_when_stopped, ex, report_exception):  # type: ignore[no-untyped-def]
    try:
        wait_for_stop.wait()
        raise ex
    except RuntimeError as e:
        if report_exception:
            coord.request_stop(e)
        else:
            coord.request_stop(sys.exc_info())
    finally:
        if set_when_stopped:
            set_when_stopped.set()


def raise_on_event_using_context_manager(coord, wait_for_stop, ex):  # type: ignore[no-untyped-def]
    with coord.stop_on_exception():
        wait_for_stop.wait()
        raise ex


def sleep_a_bit_then_set_event(coord, n_secs, ev):  # type: ignore[no-untyped-def]
    coord.wait_for_stop(n_secs)
    ev.set()


def test_stop_async() -> None:
    coord = train.Coordinator()
    assert not coord.should_stop()
    assert not coord.wait_for_stop(0.1)
    wait_for_stop_ev = threading.Event()
    has_stopped_ev = threading.Event()
    t = threading.Thread(target=stop_on_event, args=(coord, wait_for_stop_ev, has_stopped_ev))
    t.start()
    assert not coord.should_stop()
    assert not coord.wait_for_stop(0.01)
    wait_for_stop_ev.set()
    has_stopped_ev.wait()
    assert coord.wait_for_stop(0.05)
    assert coord.should_stop()
    coord.join([t])


def test_join_with_threads_and_exception_variants() -> None:
    for report_exception in (True, False):
        coord = train.Coordinator()
        ev_1 = threading.Event()
        ev_2 = threading.Event()
        threads = [
            threading.Thread(
                target=raise_on_event,
                args=(coord, ev_1, ev_2, RuntimeError("First"), report_exception),
            ),
            threading.Thread(
                target=raise_on_event,
                args=(coord, ev_2, None, RuntimeError("Too late"), report_exception),
            ),
        ]
        for t in threads:
            t.start()
        ev_1.set()
        with pytest.raises(RuntimeError, match="First"):
            coord.join(threads)


def test_context_manager_and_clean_stop() -> None:
    coord = train.Coordinator()
    ev_1 = threading.Event()
    threads = [
        threading.Thread(
            target=raise_on_event_using_context_manager,
            args=(coord, ev_1, errors.OutOfRangeError(None, None, "end of input")),
        )
    ]
    for t in threads:
        t.start()
    ev_1.set()
    coord.join(threads)  # OutOfRangeError is a clean stop


def test_looper_and_join_with_timer() -> None:
    coord = train.Coordinator()
    counter = []
    looper = train.LooperThread.loop(coord, 0.01, target=lambda: counter.append(1))
    ev = threading.Event()
    t = threading.Thread(target=sleep_a_bit_then_set_event, args=(coord, 0.05, ev))
    t.start()
    ev.wait()
    coord.request_stop()
    coord.join([t, looper], stop_grace_period_secs=10)
    assert len(counter) >= 1


def test_queue_runner_with_coordinator() -> None:
    queue = train.FIFOQueue(10, name="ten")
    items = iter(range(3))

    def enqueue():  # type: ignore[no-untyped-def]
        try:
            queue.put(next(items))
        except StopIteration:
            raise errors.OutOfRangeError(None, None, "done") from None

    coord = train.Coordinator()
    qr = train.QueueRunner(queue, [enqueue])
    threads = qr.create_threads(coord=coord, start=True)
    got = []
    try:
        while not coord.should_stop():
            got.append(queue.get())
    except errors.OutOfRangeError:
        pass
    finally:
        coord.request_stop()
    coord.join(threads)
    assert got == [0, 1, 2]
