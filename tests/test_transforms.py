"""``transform=`` and ``Normalize``: values, fields, errors, ownership, ordering.

The values are checked against a NumPy reference computed here in float64;
the ordering and ownership on the strict CUDA double (``tests/cuda_double.py``),
which runs the real CuPy backend and fails a test on any access a GPU would
not order.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

import numpy as np
import pytest

import gpuqueue
import gpuqueue.backends
from gpuqueue import BatchError, Normalize, OrderedEnqueuer
from tests.conftest import start, wait_entered
from tests.cuda_double import StrictCuda
from tests.seqs import Gated

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


class Images(gpuqueue.Sequence):
    """Batch i: (uint8 NHWC images from seed i, a list of labels, None weights)."""

    def __init__(self, length: int = 6, shape: tuple[int, ...] = (2, 5, 4, 3)) -> None:
        self.length, self.shape = length, shape

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        images = np.random.default_rng(index).integers(0, 256, self.shape, dtype=np.uint8)
        return images, [index, index + 1], None


def reference(images: np.ndarray, dtype: str, layout: str | None = None) -> np.ndarray:
    values = (images.astype(np.float64) - np.array(MEAN)) / np.array(STD)
    if layout == "NCHW":
        values = np.moveaxis(values, -1, -3)
    return values


TOLERANCE = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}  # one ulp, relative


def close(got: np.ndarray, want: np.ndarray, dtype: str) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=TOLERANCE[dtype], atol=1e-6)


def host(batch_leaf: Any) -> np.ndarray:
    """A delivered leaf as NumPy (a tensor too)."""
    return batch_leaf.numpy() if hasattr(batch_leaf, "numpy") else np.asarray(batch_leaf)


# -- 1. what a transform gets and gives ---------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "simulated"])
def test_a_callable_gets_the_batch_as_arrays_and_may_change_its_structure(device: str) -> None:
    seen: list[type] = []

    def to_dict(batch: Any) -> Any:
        images, labels, weights = batch
        seen.append(type(images))
        return {"x": images.astype(np.float32) / 255, "y": labels, "w": weights}

    with gpuqueue.prefetch(Images(), device=device, epochs=1, transform=to_dict) as batches:
        got = list(batches)
    assert seen == [np.ndarray] * 6
    for index, batch in enumerate(got):
        assert set(batch) == {"x", "y", "w"} and batch["w"] is None
        np.testing.assert_array_equal(batch["x"], Images()[index][0] / np.float32(255))
        assert batch["y"].tolist() == [index, index + 1]  # list labels arrive as an array


@pytest.mark.parametrize("device", ["cpu", "simulated"])
def test_a_mapping_transforms_its_fields_and_leaves_the_rest(device: str) -> None:
    with gpuqueue.prefetch(
        Images(), device=device, epochs=1, transform={0: Normalize(MEAN, STD)}
    ) as batches:
        got = list(batches)
    for index, (images, labels, weights) in enumerate(got):
        close(images, reference(Images()[index][0], "float32"), "float32")
        assert images.dtype == np.float32 and weights is None
        assert labels.tolist() == [index, index + 1]


class Records(gpuqueue.Sequence):
    """Dict batches, with a text field that passes through on the host."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> Any:
        return {"image": Images()[index][0], "label": np.int64(index), "name": f"b{index}"}


def test_a_mapping_by_dict_key_and_by_named_tuple_field() -> None:
    transform = {"image": Normalize(MEAN, STD, layout="NCHW"), "label": lambda y: y + 100}
    with gpuqueue.prefetch(Records(), device="cpu", epochs=1, transform=transform) as batches:
        got = list(batches)
    for index, batch in enumerate(got):
        close(batch["image"], reference(Images()[index][0], "float32", "NCHW"), "float32")
        assert int(batch["label"]) == index + 100 and batch["name"] == f"b{index}"

    from collections import namedtuple

    Pair = namedtuple("Pair", ["image", "label"])
    source = [Pair(Images()[i][0], np.int64(i)) for i in range(3)]
    with gpuqueue.prefetch(
        source, device="cpu", epochs=1, transform={"image": Normalize(MEAN, STD)}
    ) as batches:
        pairs = list(batches)
    assert [type(p) for p in pairs] == [Pair] * 3
    close(pairs[2].image, reference(source[2].image, "float32"), "float32")


def test_torch_sources_and_outputs_with_a_transform() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    images = torch.randint(0, 256, (8, 4, 4, 3), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.arange(8)), batch_size=4)
    with gpuqueue.prefetch(
        loader,
        device="cpu",
        output="torch",
        transform={0: Normalize(MEAN, STD, dtype="bfloat16", layout="NCHW")},
    ) as batches:
        got = list(batches)
    assert [tuple(x.shape) for x, _ in got] == [(4, 3, 4, 4)] * 2
    for position, (x, y) in enumerate(got):
        assert x.dtype == torch.bfloat16 and y.tolist() == list(
            range(4 * position, 4 * position + 4)
        )
        want = reference(images[4 * position : 4 * position + 4].numpy(), "bfloat16", "NCHW")
        close(x.float().numpy(), want, "bfloat16")

    def as_tensors(batch: Any) -> Any:  # a transform may hand back tensors of its own
        return torch.from_numpy(batch[0]).float().mean(), batch[1]

    with gpuqueue.prefetch(loader, device="cpu", output="torch", transform=as_tensors) as batches:
        means = [float(m) for m, _ in batches]
    assert means == pytest.approx(
        [float(images[:4].float().mean()), float(images[4:].float().mean())]
    )


# -- 2. Normalize's values -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("layout", [None, "NCHW"])
@pytest.mark.parametrize("shape", [(5, 4, 3), (2, 5, 4, 3)], ids=["HWC", "NHWC"])
def test_normalize_matches_the_reference(
    dtype: str, layout: str | None, shape: tuple[int, ...]
) -> None:
    images = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    got = Normalize(MEAN, STD, dtype=dtype, layout=layout)(images)
    assert got.dtype == np.dtype(dtype) and got.flags.c_contiguous
    close(got, reference(images, dtype, layout), dtype)


def test_normalize_takes_any_integer_dtype_and_one_number_for_every_channel() -> None:
    images = np.arange(-8, 16, dtype=np.int16).reshape(2, 3, 4)
    got = Normalize(2.0, 4.0)(images)
    np.testing.assert_allclose(got, (images - 2.0) / 4.0, rtol=1e-6)
    wide = np.arange(24, dtype=np.uint32).reshape(2, 3, 4)
    np.testing.assert_allclose(Normalize([1, 2, 3, 4], 2.0)(wide), (wide - [1, 2, 3, 4]) / 2.0)


def test_bfloat16_on_torch_and_jax_outputs() -> None:
    for output in ("torch", "jax"):
        module = pytest.importorskip(output)
        transform = {0: Normalize(MEAN, STD, dtype="bfloat16")}
        with gpuqueue.prefetch(
            Images(length=2), device="cpu", epochs=1, output=output, transform=transform
        ) as batches:
            got = list(batches)
        for index, (images, labels, _) in enumerate(got):
            assert "bfloat16" in str(images.dtype), (module, images.dtype)
            values = np.asarray(images.astype("float32") if output == "jax" else images.float())
            close(values, reference(Images()[index][0], "bfloat16"), "bfloat16")
            assert host(labels).tolist() == [index, index + 1]


def test_bfloat16_rounds_to_nearest_even_and_keeps_nan() -> None:
    from gpuqueue.device.normalize import bfloat16_bits

    # 1 + 2^-8 is halfway between two bfloat16 values: ties go to the even one (1.0);
    # 1 + 3 * 2^-8 goes up to 1 + 2^-6.
    values = np.array([1 + 2**-8, 1 + 3 * 2**-8, np.nan, -2.5], np.float32)
    bits = bfloat16_bits(values).view(np.uint16).astype(np.uint32) << 16
    back = bits.view(np.float32)
    assert back[0] == 1.0 and back[1] == 1 + 2**-6 and np.isnan(back[2]) and back[3] == -2.5


# -- 3. clear errors --------------------------------------------------------------------------


def test_normalize_arguments_are_checked_where_it_is_made() -> None:
    with pytest.raises(ValueError, match=r"^Normalize: mean has 3 channels and std 2"):
        Normalize(MEAN, (1, 2))
    with pytest.raises(ValueError, match=r"^Normalize: std has a zero"):
        Normalize(MEAN, (1, 0, 1))
    with pytest.raises(ValueError, match=r"^Normalize: dtype must be one of"):
        Normalize(MEAN, STD, dtype="float64")
    with pytest.raises(ValueError, match=r"^Normalize: layout must be one of"):
        Normalize(MEAN, STD, layout="CHWN")
    with pytest.raises(ValueError, match=r"^Normalize: mean must be finite"):
        Normalize((0, float("nan"), 0), STD)


def test_bad_input_to_normalize_names_the_field_and_what_was_expected() -> None:
    norm = Normalize(MEAN, STD, layout="NCHW")
    with pytest.raises(
        BatchError, match=r"^Normalize: field \[0\] has dtype float32, expected int"
    ):
        norm.apply(np.zeros((2, 2, 3), np.float32), "[0]")
    with pytest.raises(BatchError, match=r"field \['image'\] has 4 channels .*expected 3"):
        norm.apply(np.zeros((2, 2, 4), np.uint8), "['image']")
    with pytest.raises(BatchError, match=r"field <batch> has shape \(2, 3\), expected rank 3"):
        norm(np.zeros((2, 3), np.uint8))
    with pytest.raises(BatchError, match=r"field \[1\] is a NoneType, expected an integer image"):
        norm.apply(None, "[1]")
    with pytest.raises(BatchError, match=r"takes a batch that is one array; .* tuple of 2 fields"):
        norm((np.zeros((2, 2, 3), np.uint8), None))


def test_transform_arguments_are_checked_when_the_enqueuer_is_built() -> None:
    with pytest.raises(ValueError, match=r"^transform= runs on the device after the copy"):
        OrderedEnqueuer(Images(), device=None, transform=lambda b: b)
    with pytest.raises(TypeError, match=r"^transform must be None, a callable or a mapping"):
        OrderedEnqueuer(Images(), device="cpu", transform=3)
    with pytest.raises(TypeError, match=r"^transform= maps field \[0\] to 'x', which is not"):
        OrderedEnqueuer(Images(), device="cpu", transform={0: "x"})
    with pytest.raises(ValueError, match=r"bfloat16 needs output='torch' or output='jax'"):
        OrderedEnqueuer(
            Images(), device="cpu", transform={0: Normalize(MEAN, STD, dtype="bfloat16")}
        )


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        ({5: Normalize(MEAN, STD)}, r"transform= maps field \[5\], but the batch is a tuple of 3"),
        ({0: Normalize(MEAN, (*STD[:2], 1.0), dtype="float16")}, None),
        ({2: Normalize(MEAN, STD)}, r"Normalize: field \[2\] is a NoneType"),
        (Normalize(MEAN, STD), r"Normalize as transform= takes a batch that is one array"),
    ],
)
def test_a_transform_that_cannot_apply_is_an_error_naming_the_batch(
    transform: Any, message: str | None
) -> None:
    enqueuer = OrderedEnqueuer(Images(), device="cpu", shard=None, transform=transform)
    enqueuer.start(workers=1)
    try:
        if message is None:  # this one applies: a control for the others
            assert next(enqueuer.get())[0].dtype == np.float16
            return
        with pytest.raises(BatchError, match=message) as raised:
            next(enqueuer.get())
    finally:
        enqueuer.stop()
    assert any(
        "transforming batch index 0 (epoch 0, position 0)" in n for n in raised.value.__notes__
    )


# -- 4. an error in a transform --------------------------------------------------------------


class Boom(RuntimeError):
    pass


def fails_at(bad: int) -> Any:
    def transform(batch: Any) -> Any:
        images, labels, weights = batch
        if int(labels[0]) == bad:
            raise Boom(f"cannot transform {bad}")
        return images.astype(np.float32), labels, weights

    return transform


@pytest.mark.parametrize(
    ("device", "depth", "processes"),
    [("cpu", 2, False), ("simulated", 2, False), ("simulated", 0, False), ("cpu", 2, True)],
)
def test_an_error_in_a_transform_reaches_the_consumer_in_the_batch_s_place(
    device: str, depth: int, processes: bool
) -> None:
    enqueuer = OrderedEnqueuer(
        Images(),
        use_multiprocessing=processes,
        device=device,
        prefetch_depth=depth,
        shard=None,
        transform=fails_at(3),
    )
    enqueuer.start(workers=2, max_queue_size=2)
    got = []
    try:
        with pytest.raises(Boom, match=r"^cannot transform 3\n") as raised:
            for batch in enqueuer.get():
                got.append(int(batch[1][0]))
        with pytest.raises(Boom):  # sticky
            next(enqueuer.get())
    finally:
        enqueuer.stop()
    assert got == [0, 1, 2]
    thread = "OrderedEnqueuer-copy" if depth else "MainThread"
    assert f"raised in {thread} transforming batch index 3 (epoch 0, position 3)" in (
        raised.value.__notes__
    )
    del batch
    gc.collect()
    run = enqueuer._run
    assert run is not None and run.arenas is not None and run.arenas.device_bytes == 0
    assert not enqueuer.is_running()


# -- 5. batches the consumer holds stay true ----------------------------------------------


def keeps_views(batch: Any) -> Any:
    """Hands back a view of the input: the input's arena must live as long as it."""
    images, labels, weights = batch
    return images[::-1], labels, weights


@pytest.mark.parametrize("device", ["cpu", "simulated"])
@pytest.mark.parametrize(
    "transform", [keeps_views, {0: Normalize(MEAN, STD)}], ids=["views", "new"]
)
def test_many_held_transformed_batches_keep_their_values(device: str, transform: Any) -> None:
    with gpuqueue.prefetch(
        Images(length=5), device=device, epochs=4, prefetch_depth=2, transform=transform
    ) as batches:
        held = list(batches)
    assert len(held) == 20
    for position, (images, labels, _) in enumerate(held):
        source = Images()[position % 5][0]
        if transform is keeps_views:
            np.testing.assert_array_equal(images, source[::-1])
        else:
            close(images, reference(source, "float32"), "float32")
        assert labels.tolist() == [position % 5, position % 5 + 1]


def test_worker_processes_with_a_transform() -> None:
    transform = {0: Normalize(MEAN, STD, dtype="float16", layout="NCHW")}
    with gpuqueue.prefetch(
        Images(), device="cpu", workers=2, use_multiprocessing=True, epochs=2, transform=transform
    ) as batches:
        held = list(batches)
    assert len(held) == 12
    for position, (images, _, _) in enumerate(held):
        close(images, reference(Images()[position % 6][0], "float16", "NCHW"), "float16")


# -- 6. ordering and ownership on the strict CUDA double --------------------------------------


def read_all(cuda: StrictCuda, batch: Any, stream: int) -> list[np.ndarray]:
    return [cuda.read(leaf, stream) for leaf in batch if leaf is not None]


@pytest.mark.parametrize("depth", [2, 0])
@pytest.mark.parametrize("layout", [None, "NCHW"])
def test_normalize_on_the_copy_stream_before_ready_and_held_batches_stay_true(
    strict_cuda: StrictCuda, depth: int, layout: str | None
) -> None:
    """The double fails this run if the kernel runs off the copy stream, after "ready",
    or before the copy; if the consumer reads before "ready"; or if an output or an
    arena is freed or rewritten before the consumer's reads."""
    transform = {0: Normalize(MEAN, STD, dtype="float16", layout=layout)}
    enqueuer = OrderedEnqueuer(
        Images(), device=0, prefetch_depth=depth, epochs=3, shard=None, transform=transform
    )
    enqueuer.start(workers=2)
    stream = strict_cuda.default_stream(0)
    held = []
    for batch in enqueuer.get():
        read_all(strict_cuda, batch, stream)  # the consumer's kernel, right away
        held.append(batch)
    assert len(held) == 18
    for position, batch in enumerate(held):  # and again once many were copied after it
        images, labels = read_all(strict_cuda, batch, stream)
        close(images, reference(Images()[position % 6][0], "float16", layout), "float16")
        assert labels.tolist() == [position % 6, position % 6 + 1] and batch[2] is None
    kernels = [c for c in strict_cuda.calls if c[1].startswith("kernel gpuqueue_normalize")]
    assert {name for name, _ in kernels} == {"OrderedEnqueuer-copy" if depth else "MainThread"}
    del held, batch
    gc.collect()
    assert strict_cuda.violations == []


def test_worker_processes_and_a_transform_on_the_double(strict_cuda: StrictCuda) -> None:
    enqueuer = OrderedEnqueuer(
        Images(length=4),
        use_multiprocessing=True,
        device=0,
        epochs=2,
        shard=None,
        transform={0: Normalize(MEAN, STD, layout="NCHW")},
    )
    enqueuer.start(workers=2)
    stream = strict_cuda.default_stream(0)
    held = list(enqueuer.get())
    for position, batch in enumerate(held):
        images, _ = read_all(strict_cuda, batch, stream)
        close(images, reference(Images()[position % 4][0], "float32", "NCHW"), "float32")
    assert strict_cuda.pinned == {}


def test_an_error_in_a_transform_on_the_double_frees_everything(strict_cuda: StrictCuda) -> None:
    def normalize_then_fail(batch: Any) -> Any:
        Normalize(MEAN, STD)(batch[0])  # a temporary on the copy stream, dropped by the error
        raise Boom("after a kernel")

    enqueuer = OrderedEnqueuer(Images(), device=0, shard=None, transform=normalize_then_fail)
    enqueuer.start(workers=2)
    try:
        with pytest.raises(Boom, match=r"^after a kernel\n"):
            next(enqueuer.get())
    finally:
        enqueuer.stop()
    # the fixture checks that nothing was left allocated and nothing ran out of order


def test_the_double_catches_a_kernel_off_the_copy_stream_and_a_read_before_it(
    strict_cuda: StrictCuda,
) -> None:
    """The checks the runs above pass, broken on purpose here: each must fire."""
    from gpuqueue.backends.cupy import CupyBackend

    cupy = sys.modules["cupy"]
    backend = CupyBackend(0)
    backend.enter_device()
    copies, consumer = backend.create_stream(), backend.current_stream()
    host_images = backend.alloc_pinned(12)
    host_images[:] = np.arange(12, dtype=np.uint8)
    arena = backend.alloc_device(12, copies)
    backend.copy_to_device(arena, host_images, 12, copies)
    images = backend.device_view(arena, 12, object()).reshape((2, 2, 3))
    memory = []

    def allocate(nbytes: int) -> tuple[Any, object]:
        memory.append(backend.alloc_device(nbytes, copies))
        return memory[-1], object()

    with cupy.cuda.using_allocator(
        lambda n: cupy.cuda.MemoryPointer(
            cupy.cuda.UnownedMemory(allocate(n)[0].ptr, n, None, 0), 0
        )
    ):
        out = Normalize(MEAN, STD)(images)  # on the legacy default stream: not the copy's
    assert any("reads memory before the copy" in v for v in strict_cuda.violations)
    strict_cuda.violations.clear()
    with backend.transform_scope(copies, allocate):
        out = Normalize(MEAN, STD)(images)  # on the copy stream: ordered after the copy
    assert strict_cuda.violations == []
    strict_cuda.read(out, consumer.handle)  # no wait on an event after the kernel
    assert any("reads a batch before the kernel that wrote it" in v for v in strict_cuda.violations)
    strict_cuda.violations.clear()
    done = backend.create_event()
    backend.record(done, copies)
    backend.synchronize(done)
    for piece in [arena, *memory]:
        backend.free_device(piece, None)
    backend.free_pinned(host_images)
    backend.close()


def test_bfloat16_from_a_transform_reaching_a_numpy_output_is_a_clear_error() -> None:
    """The check at build time sees only Normalize itself; a wrapping callable is caught here."""
    to_bfloat16 = Normalize(MEAN, STD, dtype="bfloat16")

    def wrapped(batch: Any) -> Any:
        return to_bfloat16(batch[0]), batch[1]

    with (
        gpuqueue.prefetch(Images(), device="cpu", epochs=1, transform=wrapped) as batches,
        pytest.raises(BatchError, match=r"^field \[0\] is bfloat16, which NumPy and CuPy have no"),
    ):
        next(batches)


def test_auto_depth_counts_what_the_transform_allocates_within_the_budget(
    strict_cuda: StrictCuda, running: list[Any]
) -> None:
    # uint8 in, float32 out: each batch the consumer holds or is prefetched holds four
    # times its arena in outputs. The budget fits depth 3 with them; deepening on the
    # arenas alone went on to the cap, far past it.
    from gpuqueue.batch.layout import layout
    from gpuqueue.batch.tree import describe
    from gpuqueue.device.autodepth import START, WINDOW

    arena = int(layout(describe((np.zeros((250, 4), np.uint8), 0))[1])[1] * 1.25)
    outputs = 250 * 4 * 4
    budget = 6 * arena + 5 * outputs + outputs // 2  # depth 3: 3 ahead, 2 held, 1 free
    seq = Gated(shape=(250, 4), dtype=np.uint8)
    enqueuer = OrderedEnqueuer(
        seq,
        device=0,
        prefetch_depth="auto",
        max_device_bytes=budget,
        shard=None,
        transform={0: Normalize(0.0, 1.0)},
    )
    running.append(seq)
    start(running, enqueuer, workers=1, max_queue_size=2)
    seq.go()
    stream = strict_cuda.default_stream(0)
    batches = enqueuer.get()
    depths = []
    tuner = enqueuer._run.tuner
    for position in range(WINDOW * 7):  # a slow producer: the consumer waits for each
        batch = next(batches)
        assert int(strict_cuda.read(batch[1], stream)) == position % 64
        # Waits with batches staged, as behind a slow copy stage (a slow producer alone
        # is "the workers are behind", which does not deepen): what is tested here is the
        # budget, with the transform's outputs counted.
        tuner.observe(starved=True, staged=True)
        tuner.observe(starved=True, staged=True)
        depths.append(enqueuer.stats()["prefetch_depth"])
        seq.go()
    assert depths[0] == START and depths == sorted(depths), depths
    # Then a burst: the producer is let go and the copy stage fills the depth it reached.
    full = wait_entered(enqueuer._run.arenas._cond)  # the looper waits: depth batches ahead
    seq.stop(0)
    assert full.wait(timeout=20)
    stats = enqueuer.stats()
    assert stats["device_bytes"] <= budget, (stats["prefetch_depth"], stats["device_bytes"])
    assert stats["prefetch_depth"] == 3, stats["prefetch_depth_reason"]
    del batch, batches


# -- 7. channels-first input (issue 23, item 6) ----------------------------------------------


class ImagesFirst(Images):
    """Batch i: Images' batch i with the channels moved first (N, C, H, W)."""

    def __getitem__(self, index: int) -> Any:
        images, labels, weights = super().__getitem__(index)
        return np.ascontiguousarray(np.moveaxis(images, -1, -3)), labels, weights


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", [(5, 4, 3), (2, 5, 4, 3)], ids=["CHW", "NCHW"])
def test_channels_first_input_stays_nchw_and_equals_the_moved_channels_last_result(
    dtype: str, shape: tuple[int, ...]
) -> None:
    images = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    first = np.ascontiguousarray(np.moveaxis(images, -1, -3))
    got = Normalize(MEAN, STD, dtype=dtype, input_layout="NCHW")(first)
    assert got.shape == first.shape and got.dtype == np.dtype(dtype)
    moved = Normalize(MEAN, STD, dtype=dtype, layout="NCHW")(images)
    assert got.tobytes() == moved.tobytes()  # the same arithmetic, bit for bit
    close(got, reference(images, dtype, "NCHW"), dtype)


def test_channels_first_arguments_and_input_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^Normalize: input_layout must be one of"):
        Normalize(MEAN, STD, input_layout="CHW")
    with pytest.raises(ValueError, match=r"keeps the channels first .* got layout='NHWC'"):
        Normalize(MEAN, STD, input_layout="NCHW", layout="NHWC")
    norm = Normalize(MEAN, STD, input_layout="NCHW")
    with pytest.raises(BatchError, match=r"field \[0\] has 5 channels \(axis -3 .*expected 3"):
        norm.apply(np.zeros((2, 5, 4, 3), np.uint8), "[0]")
    with pytest.raises(BatchError, match=r"field \[0\] has shape \(4, 3\), expected rank 3"):
        norm.apply(np.zeros((4, 3), np.uint8), "[0]")
    # One number for every channel: any channel count.
    wide = np.arange(2 * 7 * 2 * 2, dtype=np.uint8).reshape(2, 7, 2, 2)
    got = Normalize(2.0, 4.0, input_layout="NCHW")(wide)
    np.testing.assert_array_equal(got, (wide.astype(np.float32) - 2) / 4)


@pytest.mark.parametrize("depth", [2, 0])
def test_channels_first_normalize_on_the_double(strict_cuda: StrictCuda, depth: int) -> None:
    transform = {0: Normalize(MEAN, STD, dtype="float16", input_layout="NCHW")}
    enqueuer = OrderedEnqueuer(
        ImagesFirst(), device=0, prefetch_depth=depth, epochs=1, shard=None, transform=transform
    )
    enqueuer.start(workers=2)
    stream = strict_cuda.default_stream(0)
    held = list(enqueuer.get())
    for position, batch in enumerate(held):
        images, _labels = read_all(strict_cuda, batch, stream)
        close(images, reference(Images()[position][0], "float16", "NCHW"), "float16")
    kernels = {c[1] for c in strict_cuda.calls if c[1].startswith("kernel gpuqueue_normalize")}
    assert kernels == {"kernel gpuqueue_normalize_cfirst"}
    del held, batch
    gc.collect()
