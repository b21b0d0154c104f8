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


# TensorFlow's own call forms, as tf.compat.v1 / tf.queue code writes them.


def test_fifo_queue_tf_constructor_and_eager_methods() -> None:
    import numpy as np

    q = train.FIFOQueue(4, dtypes=[np.float32, np.int64], shapes=[(2,), ()], name="q")
    assert q.name == "q" and q.dtypes == [np.dtype("float32"), np.dtype("int64")]
    q.enqueue((np.zeros(2, np.float32), 7))  # a Python int converts, as in TensorFlow
    q.enqueue_many(([[1.0, 1.0], [2.0, 2.0]], [8, 9]))
    assert q.size() == 3 and not q.is_closed()
    x, y = q.dequeue()
    assert x.dtype == np.float32 and x.tolist() == [0, 0] and int(y) == 7
    xs, ys = q.dequeue_many(2)
    assert xs.shape == (2, 2) and ys.tolist() == [8, 9]
    with pytest.raises(TypeError, match=r"^component 1 has dtype float64, expected int64$"):
        q.enqueue((np.zeros(2, np.float32), 1.5))
    with pytest.raises(ValueError, match=r"^component 0 has shape \(3,\), expected \(2,\)$"):
        q.enqueue((np.zeros(3, np.float32), 1))
    with pytest.raises(ValueError, match=r"^expected 2 components, got 1$"):
        q.enqueue(np.zeros(2, np.float32))
    q.enqueue((np.ones(2, np.float32), 3))
    q.close(cancel_pending_enqueues=True)
    assert q.is_closed()
    with pytest.raises(errors.OutOfRangeError, match=r"^queue 'q' is closed and holds 1 of the 2"):
        q.dequeue_many(2)
    x, y = q.dequeue_up_to(2)  # once closed: what is left
    assert x.shape == (1, 2) and y.tolist() == [3]
    with pytest.raises(errors.OutOfRangeError, match=r"^queue 'q' is closed and holds 0 of the 2"):
        q.dequeue_up_to(2)


def test_fifo_queue_single_component_names_and_untyped() -> None:
    import numpy as np

    one = train.FIFOQueue(2, np.int32, shapes=None, names=None, shared_name="s", name="one")
    one.enqueue(5)
    assert one.dequeue().tolist() == 5  # one component: the array itself, as TensorFlow
    named = train.FIFOQueue(2, [np.int32, np.float32], names=["label", "weight"])
    named.enqueue({"label": 1, "weight": 0.5})
    assert {k: v.tolist() for k, v in named.dequeue().items()} == {"label": 1, "weight": 0.5}
    with pytest.raises(ValueError, match=r"^expected a dict with keys \['label', 'weight'\]"):
        named.enqueue((1, 0.5))
    untyped: train.FIFOQueue[object] = train.FIFOQueue(3)
    untyped.enqueue({"anything": None})
    untyped.enqueue_many(["a", "b"])
    assert untyped.dequeue() == {"anything": None} and untyped.dequeue_many(2) == ["a", "b"]
    with pytest.raises(ValueError, match=r"^n=4 is more than the queue's capacity 3$"):
        untyped.dequeue_many(4)
    with pytest.raises(ValueError, match=r"^shapes and names need dtypes$"):
        train.FIFOQueue(2, shapes=[(1,)])


def test_dequeue_many_waits_for_enough_items() -> None:
    from tests.conftest import Worker, wait_entered

    q: train.FIFOQueue[int] = train.FIFOQueue(4)
    entered = wait_entered(q._enough)
    waiter = Worker(q.dequeue_many, 3, name="dequeue-many")
    waiter.start()
    for item in range(3):
        entered.wait(5)  # the getter is blocked, wanting more
        entered.clear()
        assert waiter.is_alive()
        q.enqueue(item)
    assert waiter.finish().result == [0, 1, 2]


def test_queue_runner_create_threads_takes_a_session() -> None:
    queue = train.FIFOQueue(10, dtypes=[int], shapes=None, name="sessioned")
    items = iter(range(3))

    def enqueue():  # type: ignore[no-untyped-def]
        try:
            queue.enqueue(next(items))
        except StopIteration:
            raise errors.OutOfRangeError(None, None, "done") from None

    coord = train.Coordinator()
    qr = train.QueueRunner(queue=queue, enqueue_ops=[enqueue])
    sess = object()  # tf.compat.v1.Session() in TensorFlow code; ignored here
    threads = qr.create_threads(sess, coord=coord, daemon=True, start=True)
    got = []
    try:
        while True:
            got.append(int(queue.dequeue()))
    except errors.OutOfRangeError:
        pass
    coord.request_stop()
    coord.join(threads)
    assert got == [0, 1, 2]
    rebuilt = train.QueueRunner(queue_runner_def=qr.to_config(), import_scope="scope")
    assert rebuilt.queue is queue and rebuilt.enqueue_ops == [enqueue]
    with pytest.raises(ValueError, match=r"^queue_runner_def and the other arguments are"):
        train.QueueRunner(queue, queue_runner_def=qr.to_config())


def test_keras_enqueuer_signatures_match_keras() -> None:
    import inspect

    # The parameters tf_keras 2.x (keras.utils.*Enqueuer) spells out, in order.
    keras_forms = {
        train.OrderedEnqueuer: ["sequence", "use_multiprocessing", "shuffle"],
        train.GeneratorEnqueuer: ["generator", "use_multiprocessing", "random_seed"],
        train.SequenceEnqueuer: ["sequence", "use_multiprocessing"],
    }
    for cls, names in keras_forms.items():
        positional = [
            p.name
            for p in inspect.signature(cls).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        assert positional == names, cls
    for method, names in {
        "start": ["workers", "max_queue_size"],
        "stop": ["timeout"],
        "get": [],
        "is_running": [],
    }.items():
        params = list(inspect.signature(getattr(train.SequenceEnqueuer, method)).parameters)
        assert params[1:] == names, method
    try:
        import tf_keras
    except ImportError:
        return
    for cls in keras_forms:  # against the installed tf_keras too
        theirs = list(inspect.signature(getattr(tf_keras.utils, cls.__name__)).parameters)
        ours = list(inspect.signature(cls).parameters)
        assert ours[: len(theirs)] == theirs, cls
