"""Device stage, ``Normalize``: integer images to normalized floats, with one fused kernel.

``Normalize`` turns integer images into normalized floats with one fused
kernel per array (``backends/cupy.py`` launches it; this module only writes
its source, ``kernel_source``, so CuPy is imported by the backend alone), and
computes the same numbers with NumPy on the CPU. A bfloat16 result travels
as its bits (``BFloat16``), since NumPy and CuPy have no bfloat16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BatchError

__all__ = ["MAX_CHANNELS", "BFloat16", "Normalize", "bfloat16_bits", "kernel_source"]


# The most per-channel values the kernel takes: 2 floats each as kernel parameters, and
# as an array of that size per thread. 64 keeps both at 512 bytes; thousands would not
# compile (the parameter space is 32 764 bytes) and would spill to local memory well
# before. A single mean and std serve any number of channels with one kernel.
MAX_CHANNELS = 64


_DTYPES = ("float32", "float16", "bfloat16")


_LAYOUTS = (None, "NHWC", "NCHW")


_INPUT_LAYOUTS = ("NHWC", "NCHW")


# Integer dtypes a kernel reads, as C types.
_C_TYPES = {
    "uint8": "unsigned char",
    "int8": "signed char",
    "uint16": "unsigned short",
    "int16": "short",
    "uint32": "unsigned int",
    "int32": "int",
    "uint64": "unsigned long long",
    "int64": "long long",
}


@dataclass(frozen=True)
class BFloat16:
    """A bfloat16 array carried as its 16-bit patterns (``bits``, int16), as CuPy and
    NumPy have no bfloat16: delivery views it as ``torch.bfloat16`` or JAX's."""

    bits: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    try:
        return name if name == "bfloat16" else np.dtype(dtype).name
    except TypeError:
        return name


class Normalize:
    """uint8 (any integer) images to normalized floats on the device: ``(x - mean) / std``.

    One fused kernel per array on a GPU (it reads the integers, subtracts,
    divides, converts and, with ``layout="NCHW"``, transposes, writing
    straight into the output); the same float32 arithmetic with NumPy on the
    CPU. Use it for one field, ``transform={0: Normalize(...)}``, or as the
    whole ``transform=`` when each batch is one array.

    Args:
        mean: Per channel (the last axis of the input), in the input's units
            (0-255 for uint8: ImageNet's are ``(123.675, 116.28, 103.53)``);
            a single number applies to every channel, however many. At most
            ``MAX_CHANNELS`` (64) per-channel values: they are kernel parameters.
        std: As ``mean``; no zero.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (with
            ``output="torch"`` or ``"jax"`` only: NumPy and CuPy have none).
        layout: ``None`` (or ``"NHWC"``) keeps channels last; ``"NCHW"`` moves
            them before the image axes: (N, H, W, C) to (N, C, H, W), and
            (H, W, C) to (C, H, W).
        input_layout: Where the input's channels are: ``"NHWC"`` (the last
            axis, the default) or ``"NCHW"`` (channels first: (N, C, H, W)
            or (C, H, W), as a PyTorch dataset often gives them), which stays
            NCHW out (``layout`` None or ``"NCHW"``), through the same fused
            kernel.

    Computed in float32, ``(float(x) - mean) / std``, then rounded to
    ``dtype`` (to nearest, ties to even) on every backend, subnormal results
    kept, so the GPU and the CPU agree to the last bit (CI runs the kernel's
    source on the CPU against the NumPy path). Against exact arithmetic,
    float32 is within 1.5 units in the last place (two roundings), float16
    and bfloat16 within 1.

    Raises:
        ValueError: If ``mean`` and ``std`` differ in length, are empty or
            not finite, have more than ``MAX_CHANNELS`` values, ``std`` has a
            zero, ``dtype``, ``layout`` or ``input_layout`` is not one of those
            above, or channels-first input is asked for channels last out.
    """

    def __init__(
        self,
        mean: Any,
        std: Any,
        *,
        dtype: Any = "float32",
        layout: str | None = None,
        input_layout: str = "NHWC",
    ) -> None:
        self.mean = _per_channel("mean", mean)
        self.std = _per_channel("std", std)
        # Single numbers for both: the same for every channel, however many there are.
        self.every_channel = np.ndim(mean) == 0 and np.ndim(std) == 0
        if len(self.mean) != len(self.std) and np.ndim(mean) != 0 and np.ndim(std) != 0:
            raise ValueError(
                f"Normalize: mean has {len(self.mean)} channels and std {len(self.std)}; "
                "give one value per channel to both"
            )
        channels = max(len(self.mean), len(self.std))
        if channels > MAX_CHANNELS:
            raise ValueError(
                f"Normalize: mean and std have {channels} channels; the kernel takes at most "
                f"{MAX_CHANNELS} per-channel values (its parameters): give one number for "
                "every channel, or write a transform of your own"
            )
        self.mean = self.mean * channels if len(self.mean) == 1 else self.mean
        self.std = self.std * channels if len(self.std) == 1 else self.std
        if any(s == 0 for s in self.std):
            raise ValueError(f"Normalize: std has a zero: {self.std}")
        self.dtype = _dtype_name(dtype)
        if self.dtype not in _DTYPES:
            raise ValueError(f"Normalize: dtype must be one of {_DTYPES}, got {dtype!r}")
        if layout not in _LAYOUTS:
            raise ValueError(f"Normalize: layout must be one of {_LAYOUTS}, got {layout!r}")
        if input_layout not in _INPUT_LAYOUTS:
            raise ValueError(
                f"Normalize: input_layout must be one of {_INPUT_LAYOUTS}, got {input_layout!r}"
            )
        if input_layout == "NCHW" and layout == "NHWC":
            raise ValueError(
                "Normalize: input_layout='NCHW' keeps the channels first (layout=None or "
                "'NCHW'); moving them last is not supported, got layout='NHWC'"
            )
        self.layout = "NCHW" if input_layout == "NCHW" else layout
        self.input_layout = input_layout

    def __repr__(self) -> str:
        return (
            f"Normalize(mean={self.mean}, std={self.std}, dtype={self.dtype!r}, "
            f"layout={self.layout!r}, input_layout={self.input_layout!r})"
        )

    def __call__(self, batch: Any) -> Any:
        """As the whole ``transform=``: the batch must be one array."""
        if isinstance(batch, (tuple, list, dict)):
            example = "0" if not isinstance(batch, dict) else repr(next(iter(batch), "image"))
            raise BatchError(
                f"Normalize as transform= takes a batch that is one array; this batch is a "
                f"{type(batch).__name__} of {len(batch)} fields: name the field, as in "
                f"transform={{{example}: Normalize(...)}}"
            )
        return self.apply(batch, "<batch>")

    def apply(self, images: Any, field: str = "<batch>") -> Any:
        """Normalizes one array; ``field`` names it in errors.

        Raises:
            BatchError: If ``images`` is not an integer array with the channels
                where ``input_layout`` says, or has a rank it cannot take.
        """
        shape = self._check(images, field)
        first = self.input_layout == "NCHW"
        channels = shape[-3] if first else shape[-1]
        # One value each for every channel stays one: the kernel indexes it with 0, so
        # one compiled kernel serves every channel count.
        mean, std = self.mean, self.std
        move = self.layout == "NCHW" and not first
        out_shape = (*shape[:-3], shape[-1], *shape[-3:-1]) if move else shape
        if isinstance(images, np.ndarray):
            return self._on_host(images, out_shape, mean, std)
        from ..backends import cupy as cupy_backend

        source, name = kernel_source(
            images.dtype.name, self.dtype, len(mean), move, channels_first=first
        )
        out_dtype = np.int16 if self.dtype == "bfloat16" else np.dtype(self.dtype)
        pixels = math.prod(shape[-2:]) if first else math.prod(shape[-3:-1]) if move else 1
        scalars = [np.int64(pixels), np.int64(channels)]
        scalars += [np.float32(v) for v in (*mean, *std)]
        out = cupy_backend.launch_elementwise(source, name, images, out_shape, out_dtype, scalars)
        return BFloat16(out) if self.dtype == "bfloat16" else out

    def _check(self, images: Any, field: str) -> tuple[int, ...]:
        channels = len(self.mean)
        if not (hasattr(images, "dtype") and hasattr(images, "shape")) or isinstance(
            images, BFloat16
        ):
            raise BatchError(
                f"Normalize: field {field} is a {type(images).__name__}, expected an integer "
                f"image array with {channels} channels last"
            )
        dtype = np.dtype(images.dtype)
        if dtype.name not in _C_TYPES:
            raise BatchError(
                f"Normalize: field {field} has dtype {dtype}, expected integer pixels "
                "(uint8, say): send the images as integers and let Normalize make the floats"
            )
        shape = tuple(int(n) for n in images.shape)
        if self.input_layout == "NCHW":
            if len(shape) not in (3, 4):
                raise BatchError(
                    f"Normalize: field {field} has shape {shape}, expected rank 3 (C, H, W) "
                    "or 4 (N, C, H, W) for input_layout='NCHW'"
                )
            if shape[-3] != channels and not self.every_channel:
                raise BatchError(
                    f"Normalize: field {field} has {shape[-3]} channels (axis -3 of shape "
                    f"{shape}, input_layout='NCHW'), expected {channels} as mean and std have"
                )
            return shape
        ranks = (3, 4) if self.layout == "NCHW" else None
        if (ranks is not None and len(shape) not in ranks) or not shape:
            wanted = "rank 3 (H, W, C) or 4 (N, H, W, C)" if ranks else "at least rank 1"
            raise BatchError(
                f"Normalize: field {field} has shape {shape}, expected {wanted} "
                f"for layout={self.layout!r}"
            )
        if shape[-1] != channels and not self.every_channel:
            raise BatchError(
                f"Normalize: field {field} has {shape[-1]} channels (the last axis of shape "
                f"{shape}), expected {channels} as mean and std have"
            )
        return shape

    def _on_host(
        self, images: np.ndarray, out_shape: tuple[int, ...], mean: list[float], std: list[float]
    ) -> Any:
        # Per channel along the channel axis: the last, or -3 for channels-first input.
        along = (-1, 1, 1) if self.input_layout == "NCHW" else (-1,)
        means = np.asarray(mean, np.float32).reshape(along)
        stds = np.asarray(std, np.float32).reshape(along)
        values = np.subtract(images, means, dtype=np.float32)
        np.divide(values, stds, out=values)
        if self.layout == "NCHW" and self.input_layout == "NHWC":
            values = np.moveaxis(values, -1, -3)
        if self.dtype == "bfloat16":
            return BFloat16(bfloat16_bits(values))
        out = np.empty(out_shape, np.dtype(self.dtype))
        np.copyto(out, values, casting="same_kind")
        return out


def _per_channel(name: str, value: Any) -> list[float]:
    try:
        values = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=np.float64))]
    except (TypeError, ValueError):
        raise ValueError(f"Normalize: {name} must be numbers, got {value!r}") from None
    if not values or np.ndim(value) > 1:
        raise ValueError(f"Normalize: {name} must be a number or a flat list, got {value!r}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"Normalize: {name} must be finite, got {value!r}")
    return values


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (int16), rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet = (bits >> np.uint32(16)) | np.uint32(0x40)
    patterns: np.ndarray = np.where(nan, quiet, rounded).astype(np.uint16).view(np.int16)
    return patterns


def kernel_source(
    in_dtype: str, out_dtype: str, values: int, nchw: bool, *, channels_first: bool = False
) -> tuple[str, str]:
    """The CUDA source of the fused normalize kernel, and its name.

    One thread per input element (grid-stride): read the integer, convert
    to float, subtract the channel's mean, divide by its std (IEEE float32,
    as NumPy), round to ``out_dtype``, and write it at its place in the
    output (channels last, or moved before the image axes; channels-first
    input, ``channels_first``, is read and written in place: its channel is
    ``(i / hw) % C``). The kernel takes
    ``(x, y, n, hw, channels, m0.., s0..)``: ``values`` floats each of mean
    and std, as parameters, one per channel or one for every channel (then
    ``channels`` comes at run time, so one kernel serves every width).

    The subtraction and division are written in PTX without ``.ftz``: CuPy
    compiles every RawKernel with ``-ftz=true`` (after the caller's options,
    so ``-ftz=false`` cannot undo it), which would flush a subnormal result
    to zero where NumPy keeps it; ``Normalize`` promises NumPy's numbers.

    Raises:
        ValueError: If ``values`` is not between 1 and ``MAX_CHANNELS``.
    """
    if not 1 <= values <= MAX_CHANNELS:
        raise ValueError(
            f"kernel_source: {values} per-channel values, expected 1 to {MAX_CHANNELS}"
        )
    if channels_first and nchw:
        raise ValueError("kernel_source: channels-first input is written in place, not moved")
    mode = "cfirst" if channels_first else "nchw" if nchw else "nhwc"
    name = f"gpuqueue_normalize_{mode}"
    params = ", ".join(
        [f"float m{c}" for c in range(values)] + [f"float s{c}" for c in range(values)]
    )
    means = ", ".join(f"m{c}" for c in range(values))
    stds = ", ".join(f"s{c}" for c in range(values))
    out_type = {"float32": "float", "float16": "__half", "bfloat16": "short"}[out_dtype]
    if out_dtype == "float16":
        store = "__float2half_rn(v)"
    elif out_dtype == "bfloat16":
        store = "to_bfloat16(v)"
    else:
        store = "v"
    place = "long long p = i / C; o = ((p / hw) * C + c) * hw + p % hw;" if nchw else "(void)hw;"
    channel = "(i / hw) % C" if channels_first else "i % C"
    source = f"""#include <cuda_fp16.h>
#define K {values}
__device__ short to_bfloat16(float v) {{
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (short)((u >> 16) | 0x40u);
    return (short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}}
__device__ __forceinline__ float exact_sub(float a, float b) {{
#ifdef __CUDA_ARCH__
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return a - b;
#endif
}}
__device__ __forceinline__ float exact_div(float a, float b) {{
#ifdef __CUDA_ARCH__
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return a / b;
#endif
}}
extern "C" __global__ void {name}(const {_C_TYPES[in_dtype]}* x, {out_type}* y,
                                 long long n, long long hw, long long channels, {params}) {{
    const float mean[K] = {{{means}}};
    const float std_[K] = {{{stds}}};
    const long long C = K > 1 ? K : channels;
    long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {{
        long long c = {channel};
        int k = K > 1 ? (int)c : 0;
        float v = exact_div(exact_sub((float)x[i], mean[k]), std_[k]);
        long long o = i;
        {place}
        y[o] = {store};
    }}
}}
"""
    return source, name
