"""The device code and the CuPy surface, checked without a GPU.

- Every ``Normalize`` kernel variant gpuqueue can build (input and output
  dtypes, one value or per-channel values, channels last kept or moved
  first, channels-first input) compiles with
  NVRTC to a cubin for sm_80 and sm_90, with the options CuPy's RawKernel
  adds (``-ftz=true`` last among them), and its PTX parameters are what the
  launcher passes; its float arithmetic carries no ``.ftz`` (defect 10).
- The kernels' CUDA C source runs on the CPU (g++, NVIDIA's host-side
  ``cuda_fp16.h``, a shim that plays the grid): bit for bit what the NumPy
  path gives, within 1 ulp of float64 (1.5 for float32 from exact
  arithmetic: two float32 roundings, ``EXACT_ULPS``),
  nothing written outside the output, and a grid too small for one pass, so
  the grid-stride loop runs. A variant with broken index math fails it.
- The ``cupy.cuda.runtime`` calls the backend makes, with its argument
  shapes, against the real module with no driver: it parses arguments before
  it touches the runtime, so a wrong count or type is a ``TypeError``.

Each part skips, saying why, where its tools are missing (CI's CuPy stage
installs them: ``.ci/run``).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpuqueue import Normalize
from gpuqueue.device.normalize import _C_TYPES, _DTYPES, MAX_CHANNELS, BFloat16, kernel_source

ARCHES = ("80", "90")
IN_DTYPES = tuple(_C_TYPES)
VALUES = (1, 3, MAX_CHANNELS)  # one for every channel, ImageNet's three, the most taken
MODES = ("nhwc", "nchw", "cfirst")  # channels last kept, moved first, channels-first input


def _missing(reason: str) -> None:
    """Skips, or fails where CI installed the tools (``GPUQUEUE_CI_EXPECT_KERNEL_TOOLS=1``):
    a check CI means to run must not pass by skipping."""
    if os.environ.get("GPUQUEUE_CI_EXPECT_KERNEL_TOOLS") == "1":
        pytest.fail(f"CI installed the kernel tools, yet: {reason}")
    pytest.skip(reason)


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # its parent package (``nvidia``) is not installed
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _include_dirs() -> dict[str, Path | None]:
    """Where the headers are: cuda_fp16.h (the runtime wheel), crt/ (nvcc's), nv/target
    (CCCL, which CuPy ships)."""
    runtime = _package_dir("nvidia.cuda_runtime")
    nvcc = _package_dir("nvidia.cuda_nvcc")
    cupy = _package_dir("cupy")
    cccl = cupy / "_core/include/cupy/_cccl/libcudacxx" if cupy else None
    return {
        "runtime": runtime / "include" if runtime else None,
        "crt": nvcc / "include" if nvcc else None,
        "cccl": cccl if cccl and (cccl / "nv/target").exists() else None,
    }


def _normalize_for(values: int, channels: int, out: str, mode: str) -> Normalize:
    rng = np.random.default_rng(values * 7 + channels)
    if values == 1:
        mean, std = 101.25, 47.5
    else:
        mean = rng.uniform(-50, 200, channels).round(3).tolist()
        std = rng.uniform(0.5, 80, channels).round(3).tolist()
    layout = "NCHW" if mode == "nchw" else None
    return Normalize(
        mean, std, dtype=out, layout=layout, input_layout="NCHW" if mode == "cfirst" else "NHWC"
    )


def _shape(mode: str, batch: int, channels: int, height: int, width: int) -> tuple[int, ...]:
    if mode == "cfirst":
        return (batch, channels, height, width)
    return (batch, height, width, channels)


def _launch_of(normalize: Normalize, in_dtype: str, shape: tuple[int, ...]) -> tuple[Any, ...]:
    """(source, name, arguments) of what ``Normalize`` launches for a device array of
    ``shape``: the launcher prepends (x, out, n) to the scalars it is given."""
    launched: list[tuple[Any, ...]] = []

    def launch_elementwise(source: str, name: str, x: Any, out_shape: Any, out_dtype: Any,
                           scalars: list[Any]) -> Any:  # fmt: skip
        launched.append((source, name, ["pointer", "pointer", np.int64(0), *scalars]))
        return np.zeros(out_shape, out_dtype)

    images = types.SimpleNamespace(dtype=np.dtype(in_dtype), shape=shape)
    fake = types.ModuleType("gpuqueue.backends.cupy")
    fake.launch_elementwise = launch_elementwise  # type: ignore[attr-defined]
    saved = sys.modules.get("gpuqueue.backends.cupy")
    sys.modules["gpuqueue.backends.cupy"] = fake
    try:
        normalize.apply(images)
    finally:
        if saved is None:
            del sys.modules["gpuqueue.backends.cupy"]
        else:
            sys.modules["gpuqueue.backends.cupy"] = saved
    (found,) = launched
    return found


def _variants() -> list[tuple[str, str, int, str]]:
    return [
        (in_dtype, out, values, mode)
        for in_dtype in IN_DTYPES
        for out in _DTYPES
        for values in VALUES
        for mode in MODES
    ]


# -- 1. NVRTC: every variant compiles, with the parameters the launcher passes -------------


@functools.cache
def _nvrtc() -> Any:
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as error:  # no CuPy
        _missing(f"NVRTC not reachable through CuPy here ({error})")
    try:
        nvrtc.getVersion()
    except Exception as error:  # CuPy without libnvrtc
        _missing(f"libnvrtc not installed: pip install 'cuda-toolkit[nvrtc]==12.*' ({error})")
    return nvrtc


def _cupy_options(arch: str) -> list[str]:
    """What CuPy's RawKernel compiles with (cupy/cuda/compiler.py): our options (none),
    then -ftz=true, the arch (sm_: a cubin), --device-as-default-execution-space; the
    include path is where CuPy finds cuda_fp16.h in the CUDA wheels."""
    runtime = _include_dirs()["runtime"]
    if runtime is None:
        _missing("nvidia-cuda-runtime's headers not installed")
    return [
        "-ftz=true",
        f"-arch=sm_{arch}",
        "--device-as-default-execution-space",
        f"-I{runtime}",
    ]


def compile_kernel(source: str, arch: str) -> tuple[bytes, str]:
    """(cubin, PTX) of ``source`` for ``sm_{arch}``; fails with NVRTC's log."""
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(source, "gpuqueue_kernel.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(program, _cupy_options(arch))
        except nvrtc.NVRTCError as error:
            raise AssertionError(f"{error}\n{nvrtc.getProgramLog(program)}") from None
        cubin, ptx = nvrtc.getCUBIN(program), nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    return cubin, ptx.decode() if isinstance(ptx, bytes) else ptx


_PTX_TYPE = {"pointer": ".u64", np.int64: ".u64", np.float32: ".f32"}


def _ptx_parameters(ptx: str, name: str) -> list[str]:
    entry = re.search(rf"\.entry {name}\((.*?)\)", ptx, re.DOTALL)
    assert entry is not None, f"no .entry {name} in the PTX"
    return re.findall(r"\.param (\.\w+) ", entry.group(1))


@pytest.mark.parametrize("arch", ARCHES)
def test_every_normalize_variant_compiles_with_the_launchers_parameters(arch: str) -> None:
    compiled = 0
    for variant in _variants():
        in_dtype, out, values, mode = variant
        channels = 5 if values == 1 else values
        shape = _shape(mode, 2, channels, 3, 4)
        source, name, arguments = _launch_of(
            _normalize_for(values, channels, out, mode), in_dtype, shape
        )
        assert name.endswith(mode), (variant, name)
        cubin, ptx = compile_kernel(source, arch)
        assert cubin[:4] == b"\x7fELF", variant
        wanted = [_PTX_TYPE[a if isinstance(a, str) else type(a)] for a in arguments]
        assert _ptx_parameters(ptx, name) == wanted, variant
        # Defect 10: CuPy's -ftz=true must not reach the arithmetic NumPy does.
        flushed = [line.strip() for line in ptx.splitlines() if ".ftz" in line]
        assert flushed == [], (variant, flushed)
        compiled += 1
    assert compiled == len(IN_DTYPES) * len(_DTYPES) * len(VALUES) * len(MODES)


# -- 2. the CUDA C source on the CPU ------------------------------------------------------

GUARD = 16  # output elements each side that the kernel must leave alone
# From exact arithmetic, in ulp of the output: float32 rounds twice (the difference, the
# quotient), so up to 0.5 + 0.5 * 2 = 1.5 ulp (1.46 seen on random data); float16 and
# bfloat16 round once more, coarsely, and stay within 1. Against the float32 difference
# divided in float64, every dtype is within 1 (the division is correctly rounded).
EXACT_ULPS = {"float32": 1.5, "float16": 1.0, "bfloat16": 1.0}
_SIGNATURE = re.compile(r"void (\w+)\(const ([\w ]+)\* x, (\w+)\* y,")

_SHIM = """// Plays the grid on the CPU: blockIdx and the rest as globals, blocks x threads in turn.
#include <cstring>
#include <xmmintrin.h>
#include <cuda_fp16.h>
struct gq_dim3 { unsigned int x, y, z; };
static gq_dim3 blockIdx, threadIdx, blockDim, gridDim;
static inline unsigned int gq_float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
#define __float_as_uint gq_float_as_uint
#ifndef __global__
#define __global__
#endif
static void gq_grid(unsigned int grid, unsigned int block, int ftz, void (*thread)(void*),
                    void* a) {
    unsigned int csr = _mm_getcsr();
    // FTZ and DAZ, as -ftz=true makes the GPU's .ftz arithmetic; off where the PTX has none.
    _mm_setcsr(ftz ? (csr | 0x8040u) : (csr & ~0x8040u));
    gridDim.x = grid; blockDim.x = block; gridDim.y = gridDim.z = blockDim.y = blockDim.z = 1;
    for (unsigned int b = 0; b < grid; ++b)
        for (unsigned int t = 0; t < block; ++t) {
            blockIdx.x = b; threadIdx.x = t;
            thread(a);
        }
    _mm_setcsr(csr);
}
struct gq_args { const void* x; void* y; long long n, hw, channels; const float* stats; };
"""


def _variant_code(index: int, source: str, values: int) -> str:
    """``source`` in a namespace of its own, its kernel renamed, and a C entry point."""
    body = source.replace("#include <cuda_fp16.h>\n", "")
    match = _SIGNATURE.search(body)
    assert match is not None
    name, in_type, out_type = match.groups()
    stats = ", ".join(f"a->stats[{i}]" for i in range(2 * values))
    return f"""
namespace gq_v{index} {{
#define {name} gq_kernel_v{index}
{body}
#undef {name}
#undef K
static void thread(void* p) {{
    gq_args* a = (gq_args*)p;
    gq_kernel_v{index}((const {in_type}*)a->x, ({out_type}*)a->y, a->n, a->hw, a->channels,
                       {stats});
}}
}}
extern "C" void gq_run_v{index}(unsigned int grid, unsigned int block, int ftz, const void* x,
                               void* y, long long n, long long hw, long long channels,
                               const float* stats) {{
    gq_args a = {{x, y, n, hw, channels, stats}};
    gq_grid(grid, block, ftz, gq_v{index}::thread, &a);
}}
"""


def build_on_cpu(sources: list[tuple[str, int]], where: Path) -> ctypes.CDLL:
    """One shared library running each ``(source, values)`` as ``gq_run_v{i}``."""
    compiler = shutil.which("g++")
    if compiler is None:
        _missing("g++ not installed")
    includes = _include_dirs()
    missing = [what for what, path in includes.items() if path is None]
    if missing:
        _missing(
            f"headers missing for the CPU run: {missing} (nvidia-cuda-runtime-cu12, "
            "nvidia-cuda-nvcc-cu12, cupy)"
        )
    code = _SHIM + "".join(
        _variant_code(index, source, values) for index, (source, values) in enumerate(sources)
    )
    cpp, library = where / "kernels.cpp", where / "kernels.so"
    cpp.write_text(code)
    command = [compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-fno-fast-math"]
    command += [f"-I{path}" for path in includes.values()] + [str(cpp), "-o", str(library)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return ctypes.CDLL(str(library))


def _images(in_dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    info = np.iinfo(in_dtype)
    # Wide integers within 2**20, where float32 holds them exactly: the 1-ulp promise is
    # about the arithmetic, not the conversion of integers float32 cannot hold.
    low, high = max(int(info.min), -(1 << 20)), min(int(info.max), 1 << 20)
    return np.random.default_rng(seed).integers(low, high, shape, dtype=in_dtype, endpoint=True)


def _as_float64(values: Any, out: str) -> np.ndarray:
    if out == "bfloat16":
        bits = np.asarray(values).view(np.uint16).astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32).astype(np.float64)
    return np.asarray(values).astype(np.float64)


def _ulp(reference: np.ndarray, out: str) -> np.ndarray:
    magnitude = np.abs(reference)
    if out == "float16":
        return np.spacing(magnitude.astype(np.float16)).astype(np.float64)
    spacing = np.spacing(magnitude.astype(np.float32)).astype(np.float64)
    return spacing * 65536 if out == "bfloat16" else spacing


def run_on_cpu(
    library: ctypes.CDLL,
    index: int,
    normalize: Normalize,
    images: np.ndarray,
    grid: tuple[int, int],
    ftz: bool,
) -> tuple[np.ndarray, list[str]]:
    """The kernel's output for ``images``, and what went wrong around it (guard bands)."""
    shape = images.shape
    _source, _name, arguments = _launch_of(normalize, images.dtype.name, shape)
    hw, channels = int(arguments[3]), int(arguments[4])
    stats = np.array([float(a) for a in arguments[5:]], np.float32)
    itemsize = 4 if normalize.dtype == "float32" else 2
    padded = np.full((images.size + 2 * GUARD) * itemsize, 0xA5, np.uint8)
    x = np.ascontiguousarray(images)
    function = library[f"gq_run_v{index}"]
    function.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong,
                         ctypes.c_longlong, ctypes.c_void_p]  # fmt: skip
    function.restype = None
    function(grid[0], grid[1], int(ftz), x.ctypes.data, padded.ctypes.data + GUARD * itemsize,
             x.size, hw, channels, stats.ctypes.data)  # fmt: skip
    problems = []
    guard = GUARD * itemsize
    if not (np.all(padded[:guard] == 0xA5) and np.all(padded[-guard:] == 0xA5)):
        problems.append("wrote outside the output (a guard band changed)")
    dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}[normalize.dtype]
    out = padded[guard : len(padded) - guard].view(dtype)
    return out, problems


def check_variant(
    library: ctypes.CDLL, index: int, normalize: Normalize, images: np.ndarray, ftz: bool
) -> list[str]:
    """Everything wrong with the kernel's output, against NumPy's and float64's."""
    problems = []
    for grid in ((2, 3), (max(1, -(-images.size // 256)), 256)):  # a tiny grid; one pass
        got, guard_problems = run_on_cpu(library, index, normalize, images, grid, ftz)
        problems += [f"grid {grid}: {p}" for p in guard_problems]
        numpy_path = normalize.apply(images)
        want = numpy_path.bits if isinstance(numpy_path, BFloat16) else numpy_path
        want = np.ascontiguousarray(want).reshape(-1)
        if got.tobytes() != want.tobytes():
            differ = int(np.sum(got.view(np.uint8) != want.view(np.uint8)))
            problems.append(f"grid {grid}: not bit for bit the NumPy path ({differ} bytes differ)")
        first = normalize.input_layout == "NCHW"
        channels = images.shape[-3] if first else images.shape[-1]
        along = (channels, 1, 1) if first else (channels,)
        mean = np.resize(np.float32(normalize.mean), channels).reshape(along)
        std = np.resize(np.float32(normalize.std), channels).astype(np.float64).reshape(along)
        exact = (images.astype(np.float64) - mean.astype(np.float64)) / std
        # The kernel's one rounding past the subtraction: its float32 difference, divided
        # in float64.
        divided = (images.astype(np.float32) - mean).astype(np.float64) / std
        got64 = _as_float64(got, normalize.dtype)
        for reference, ulps, what in ((exact, EXACT_ULPS[normalize.dtype], "exact"),
                                      (divided, 1.0, "its difference divided")):  # fmt: skip
            if normalize.layout == "NCHW" and not first:
                reference = np.moveaxis(reference, -1, -3)
            reference = reference.reshape(-1)
            error = np.abs(got64 - reference) / _ulp(reference, normalize.dtype)
            if np.any(error > ulps):
                problems.append(
                    f"grid {grid}: {error.max():.3g} ulp from float64 ({what}), over {ulps}"
                )
    return problems


def _cpu_variants() -> list[tuple[str, str, int, str]]:
    return [v for v in _variants() if v[2] != MAX_CHANNELS or v[0] == "uint8"]


@pytest.fixture(scope="module")
def cpu_kernels(tmp_path_factory: pytest.TempPathFactory) -> tuple[ctypes.CDLL, list[Any]]:
    """Every CPU-run variant, plus two broken ones at the end, in one library."""
    variants = _cpu_variants()
    sources = []
    for in_dtype, out, values, mode in variants:
        nchw, first = mode == "nchw", mode == "cfirst"
        source, _name = kernel_source(in_dtype, out, values, nchw, channels_first=first)
        sources.append((source, values))
    nchw_source, _name = kernel_source("uint8", "float32", 3, True)
    broken_index = nchw_source.replace("p % hw;", "(p + 1) % hw;")
    broken_bounds = nchw_source.replace("y[o] =", "y[o + 1] =")
    assert broken_index != nchw_source and broken_bounds != nchw_source
    sources += [(broken_index, 3), (broken_bounds, 3)]
    return build_on_cpu(sources, tmp_path_factory.mktemp("kernels")), variants


def test_every_normalize_variant_runs_on_the_cpu_as_numpy_computes(
    cpu_kernels: tuple[ctypes.CDLL, list[Any]],
) -> None:
    library, variants = cpu_kernels
    failures = {}
    for index, (in_dtype, out, values, mode) in enumerate(variants):
        channels = 7 if values == 1 else values
        sizes = (2, channels, 3, 5) if values != MAX_CHANNELS else (1, channels, 2, 3)
        normalize = _normalize_for(values, channels, out, mode)
        images = _images(in_dtype, _shape(mode, *sizes), seed=index)
        problems = check_variant(library, index, normalize, images, ftz=False)
        if problems:
            failures[(in_dtype, out, values, mode)] = problems
    assert failures == {}
    assert len(variants) >= 140


def test_a_variant_with_broken_index_math_or_bounds_fails_the_cpu_run(
    cpu_kernels: tuple[ctypes.CDLL, list[Any]],
) -> None:
    library, variants = cpu_kernels
    normalize = _normalize_for(3, 3, "float32", "nchw")
    images = _images("uint8", (2, 3, 5, 3), seed=1)
    broken_index = check_variant(library, len(variants), normalize, images, ftz=False)
    assert any("not bit for bit" in p for p in broken_index), broken_index
    broken_bounds = check_variant(library, len(variants) + 1, normalize, images, ftz=False)
    assert any("guard band" in p for p in broken_bounds), broken_bounds


def test_subnormal_results_agree_with_numpy_on_the_cpu_run(
    cpu_kernels: tuple[ctypes.CDLL, list[Any]],
) -> None:
    """``Normalize(0, 3e38)`` on uint8: 1/3e38 is subnormal. The PTX has no ``.ftz``
    (checked above), so the CPU runs without FTZ/DAZ too, and agrees with NumPy; with
    them (what CuPy's -ftz=true gives plain float arithmetic) it would not."""
    library, variants = cpu_kernels
    index = variants.index(("uint8", "float32", 1, "nhwc"))
    normalize = Normalize(0.0, 3e38)
    images = np.arange(256, dtype=np.uint8).reshape(2, 2, 64)
    assert check_variant(library, index, normalize, images, ftz=False) == []
    flushed = check_variant(library, index, normalize, images, ftz=True)
    assert any("not bit for bit" in p for p in flushed), flushed


# -- 3. the CuPy runtime surface, by signature --------------------------------------------


def _real_runtime() -> Any:
    try:
        from cupy_backends.cuda.api import runtime
    except ImportError:
        _missing("CuPy not installed")
    try:
        runtime.getDeviceCount()
    except runtime.CUDARuntimeError:
        return runtime  # no driver: every call fails in the runtime, after parsing
    pytest.skip("a CUDA driver is present: replaying calls with made-up pointers is unsafe")


def _recorded_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[Any, ...]]:
    """One example of each runtime call the backend makes in a run with a transform, a
    depth-0 run and a pool-less device, as the strict double saw them."""
    import gc
    import importlib

    import gpuqueue.backends
    from gpuqueue import OrderedEnqueuer
    from tests.cuda_double import StrictCuda, _Runtime, install, uninstall
    from tests.test_transforms import MEAN, STD, Images

    seen: dict[str, tuple[Any, ...]] = {}
    for pools in (True, False):
        cuda = StrictCuda(devices=2, pools=pools)
        with monkeypatch.context() as patch:
            for name, module in install(cuda).items():
                patch.setitem(sys.modules, name, module)
            patch.delitem(sys.modules, "gpuqueue.backends.cupy", raising=False)
            patch.delattr(gpuqueue.backends, "cupy", raising=False)
            backend = importlib.import_module("gpuqueue.backends.cupy")
            patch.setattr(backend, "_CUDART", cuda.native)
            patch.setattr(backend, "_LIBCUDA", cuda.native)
            runtime = sys.modules["cupy"].cuda.runtime
            for attribute in dir(_Runtime):
                method = getattr(runtime, attribute)
                if attribute.startswith("_") or not callable(method) or isinstance(method, type):
                    continue

                def recorder(*args: Any, _name: str = attribute, _method: Any = method) -> Any:
                    seen.setdefault(_name, args)
                    return _method(*args)

                patch.setattr(runtime, attribute, recorder)
            for depth in (2, 0):
                transform = {0: Normalize(MEAN, STD)} if depth else None
                enqueuer = OrderedEnqueuer(
                    Images(length=20), device=1, prefetch_depth=depth, epochs=1, shard=None,
                    transform=transform,
                )  # fmt: skip
                enqueuer.start(workers=2)
                assert len(list(enqueuer.get())) == 20
                enqueuer.stop()
            # The calls no such run makes: registering a worker process's slots, the
            # free-memory reading, and close() with pinned memory left.
            direct = backend.CupyBackend(0)
            buffer = np.zeros(64, np.uint8)
            direct.register_host(buffer)
            direct.unregister_host(buffer)
            assert direct.free_memory() > 0
            direct.alloc_pinned(8)
            direct.close()
            gc.collect()
            uninstall()
            if hasattr(gpuqueue.backends, "cupy"):
                delattr(gpuqueue.backends, "cupy")
    return seen


def test_the_runtime_calls_the_backend_makes_parse_against_the_real_cupy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime = _real_runtime()
    calls = _recorded_calls(monkeypatch)
    made = set(re.findall(r"_runtime\.(\w+)\(", Path("gpuqueue/backends/cupy.py").read_text()))
    made |= set(
        re.findall(r"_runtime\.(\w+),", Path("gpuqueue/backends/cupy.py").read_text())
    )  # passed to _call
    made -= {"CUDARuntimeError", "MemPoolProps"}
    assert made <= set(calls), f"never made in the recorded runs: {made - set(calls)}"
    for name, args in sorted(calls.items()):
        real = [
            runtime.MemPoolProps(a.allocType, a.handleType, a.locationType, a.devId)
            if type(a).__name__ == "MemPoolProps"
            else a
            for a in args
        ]
        try:
            getattr(runtime, name)(*real)
        except runtime.CUDARuntimeError:
            pass  # parsed, then refused by a runtime with no driver: the shapes are right
        except TypeError as error:
            raise AssertionError(f"runtime.{name}{tuple(args)}: {error}") from None


def _arity(doc: str) -> tuple[int, int]:
    """(required, total) parameters from a Cython signature line, e.g. "f(int a, b=0)"."""
    inside = re.match(r"\w+\((.*?)\)", doc.strip())
    assert inside is not None, doc
    params = [p for p in inside.group(1).split(",") if p.strip()]
    return sum("=" not in p for p in params), len(params)


def test_the_double_has_cupys_arity_and_the_backend_cupys_constants() -> None:
    runtime = _real_runtime()
    import inspect

    from tests.cuda_double import _Runtime

    for name, method in vars(_Runtime).items():
        if name.startswith("_") or not callable(method) or isinstance(method, type):
            continue
        real = getattr(runtime, name, None)
        assert real is not None, f"the double has runtime.{name}, CuPy has not"
        params = list(inspect.signature(method).parameters.values())[1:]  # less self
        mine = (sum(p.default is inspect.Parameter.empty for p in params), len(params))
        assert mine == _arity(real.__doc__), name
    import gpuqueue.backends.cupy as backend

    assert runtime.memcpyHostToDevice == backend._HOST_TO_DEVICE
    assert runtime.memcpyDeviceToDevice == backend._DEVICE_TO_DEVICE
    assert runtime.hostAllocPortable == backend._HOST_ALLOC_PORTABLE
    assert runtime.eventBlockingSync == backend._EVENT_BLOCKING_SYNC
    assert runtime.eventDisableTiming == backend._EVENT_DISABLE_TIMING
    assert runtime.streamNonBlocking == backend._STREAM_NON_BLOCKING
    assert runtime.cudaDevAttrMemoryPoolsSupported == backend._MEMORY_POOLS_SUPPORTED
    assert runtime.streamPerThread == backend._PER_THREAD_STREAM
    assert runtime.streamCaptureModeRelaxed == backend._CAPTURE_RELAXED
    assert runtime.cudaMemPoolAttrReleaseThreshold == backend._POOL_RELEASE_THRESHOLD_ATTRIBUTE
    assert runtime.cudaMemAllocationTypePinned == backend._POOL_ALLOCATION_PINNED
    assert runtime.cudaMemLocationTypeDevice == backend._POOL_LOCATION_DEVICE
    assert runtime.cudaMemHandleTypeNone == backend._POOL_HANDLE_NONE
