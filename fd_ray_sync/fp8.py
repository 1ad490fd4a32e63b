"""FP8 values from and to their bits, and per-output-channel quantization. Pure numpy.

numpy has no FP8, so FP8 tensors are uint8 bits everywhere in fd-ray-sync (see
`fd_ray_sync.tensors`); this module is only for what needs their *values*: the trainer that
quantizes float32 weights, tests, and the reference engine's checks.

    float8_e4m3fn  S EEEE MMM  bias 7,  max 448,   no Inf, NaN = S.1111.111
    float8_e5m2    S EEEEE MM  bias 15, max 57344, Inf/NaN with exponent 11111

Encoding rounds to nearest, ties to even, and saturates at the largest finite value (as
torch's CPU cast does in range; out of range torch also clamps e4m3fn, paddle gives NaN).

Scale convention (one float32 per output channel, `<weight>_scale`, shape
`weight.shape[:-2] + (out,)` for a weight laid out [..., in, out]):

    weight ~= decode(bits) * scale[..., None, :]

The scale *multiplies* on dequantization: what compressed-tensors / vLLM call `weight_scale`
and what DeepSeek-V3 checkpoints call `weight_scale_inv` (there block-wise, 128x128), i.e.
the inverse of the factor the weights were multiplied by to quantize them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

from fd_ray_sync.errors import WeightMismatchError
from fd_ray_sync.tensors import as_storage, tagged

FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
# Exponent bits, mantissa bits, bias.
_FORMAT = {"float8_e4m3fn": (4, 3, 7), "float8_e5m2": (5, 2, 15)}


def _check(dtype: str) -> None:
    if dtype not in _FORMAT:
        raise WeightMismatchError(f"{dtype!r} is not an FP8 dtype; known: {', '.join(FP8_DTYPES)}")


@functools.cache
def value_table(dtype: str) -> np.ndarray:
    """float32 value of each of the 256 bit patterns of `dtype` (NaN where it is NaN)."""
    _check(dtype)
    e_bits, m_bits, bias = _FORMAT[dtype]
    codes = np.arange(256)
    exp = (codes >> m_bits) & ((1 << e_bits) - 1)
    man = codes & ((1 << m_bits) - 1)
    normal = (1 + man / (1 << m_bits)) * np.exp2(exp - bias)
    subnormal = (man / (1 << m_bits)) * np.exp2(1 - bias)
    values = np.where(exp == 0, subnormal, normal)
    top = exp == (1 << e_bits) - 1
    if dtype == "float8_e4m3fn":
        values[top & (man == (1 << m_bits) - 1)] = np.nan
    else:
        values[top] = np.where(man[top] == 0, np.inf, np.nan)
    values[codes >= 128] *= -1
    table = values.astype(np.float32)
    table.flags.writeable = False  # cached and shared: nobody may change it
    return table


def max_value(dtype: str) -> float:
    """The largest finite value of `dtype` (448 for e4m3fn, 57344 for e5m2)."""
    return float(np.nanmax(value_table(dtype)[np.isfinite(value_table(dtype))]))


def decode(bits: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of FP8 `bits` (uint8 or tagged), exactly."""
    return value_table(dtype)[as_storage(np.asarray(bits), dtype)]


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """uint8 bits of `values` rounded to `dtype`: nearest, ties to even, saturating."""
    table = value_table(dtype)
    count = int(np.argmax(table[:128] == max_value(dtype))) + 1  # codes 0.. increase in value
    positive = table[:count]
    x = np.asarray(values, dtype=np.float32)
    mag = np.minimum(np.abs(x), positive[-1])
    hi = np.clip(np.searchsorted(positive, mag), 1, count - 1)
    lo = hi - 1
    below, above = mag - positive[lo], positive[hi] - mag
    # The mantissa's last bit is the code's last bit: "even" is an even code.
    pick_hi = (above < below) | ((above == below) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    code |= np.where(np.signbit(x), np.uint8(0x80), np.uint8(0))
    return np.where(np.isnan(x), np.uint8(0x7F), code).astype(np.uint8)


def quantize(weight: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 bits, float32 scale) of a float weight laid out [..., in, out]: one scale per
    output channel, so that the channel's largest magnitude lands on `dtype`'s largest value."""
    _check(dtype)
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim < 2:
        raise WeightMismatchError(f"quantize needs a [..., in, out] weight, got shape {w.shape}")
    amax = np.abs(w).max(axis=-2)
    scale = np.where(amax > 0, amax / np.float32(max_value(dtype)), 1).astype(np.float32)
    return encode(w / scale[..., None, :], dtype), scale


def dequantize(bits: np.ndarray, scale: np.ndarray, dtype: str) -> np.ndarray:
    """float32 weight from FP8 `bits` and its per-output-channel `scale` (the convention the
    reference engine uses in its matmuls)."""
    return decode(bits, dtype) * np.asarray(scale, np.float32)[..., None, :]


def quantize_state_dict(
    state: Mapping[str, np.ndarray], names: set[str] | frozenset[str], dtype: str
) -> dict[str, np.ndarray]:
    """`state` with each weight in `names` replaced by its FP8 bits (tagged with `dtype`, so
    they push as FP8) followed by `<name>_scale`; every other tensor as it is."""
    unknown = sorted(set(names) - set(state))
    if unknown:
        raise WeightMismatchError(f"cannot quantize {unknown[:5]}: not in the state dict")
    out: dict[str, np.ndarray] = {}
    for name, array in state.items():
        if name in names:
            bits, scale = quantize(array, dtype)
            out[name], out[f"{name}_scale"] = tagged(bits, dtype), scale
        else:
            out[name] = array
    return out
