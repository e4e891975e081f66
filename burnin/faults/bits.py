"""Bit-level corruption primitives: which bits a dtype has, and flipping one in place.

A flip is an XOR on the tensor's integer view, so it is exact and its own inverse: flipping the
same bit twice restores the tensor bit for bit. Bit classes name parts of the encoding:

    fp32: sign 31, exponent 23..30, mantissa 0..22 (high 12..22, low 0..11)
    bf16: sign 15, exponent 7..14,  mantissa 0..6  (high 4..6,   low 0..3)
    fp16: sign 15, exponent 10..14, mantissa 0..9  (high 5..9,   low 0..4)
    ints: sign = the top bit of a signed type; "mantissa" = the value bits (high half, low half);
          integers have no exponent
"""

from __future__ import annotations

import random
from typing import Literal

import torch

__all__ = ["BIT_CLASSES", "bit_width", "bits_of", "flip_bit_", "set_bit_", "set_value_", "draw_bit"]

BitClass = Literal["sign", "exponent", "mantissa_high", "mantissa_low", "any"]
BIT_CLASSES: tuple[str, ...] = ("sign", "exponent", "mantissa_high", "mantissa_low", "any")

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# (exponent bits, mantissa bits) of the float formats
_FLOAT_LAYOUT = {torch.float32: (8, 23), torch.bfloat16: (8, 7), torch.float16: (5, 10), torch.float64: (11, 52)}


def bit_width(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() * 8


def bits_of(dtype: torch.dtype, cls: str) -> list[int]:
    """Bit positions (0 = least significant) of a bit class in a dtype; empty when it has none."""
    width = bit_width(dtype)
    if dtype.is_floating_point:
        exp, man = _FLOAT_LAYOUT[dtype]
        spans = {"sign": [width - 1], "exponent": list(range(man, man + exp)),
                 "mantissa_high": list(range(man - man // 2, man)), "mantissa_low": list(range(0, man - man // 2))}
    elif dtype == torch.bool:
        spans = {"sign": [], "exponent": [], "mantissa_high": [0], "mantissa_low": [0]}
    else:
        signed = dtype.is_signed
        value_bits = width - 1 if signed else width
        spans = {"sign": [width - 1] if signed else [], "exponent": [],
                 "mantissa_high": list(range(value_bits // 2, value_bits)),
                 "mantissa_low": list(range(0, value_bits // 2))}
    spans["any"] = list(range(width)) if dtype != torch.bool else [0]
    if cls not in spans:
        raise ValueError(f"unknown bit class {cls!r}; one of {', '.join(BIT_CLASSES)}")
    return spans[cls]


def draw_bit(dtype: torch.dtype, cls: str, rng: random.Random) -> int:
    choices = bits_of(dtype, cls)
    if not choices:
        raise ValueError(f"{dtype} has no {cls} bits")
    return rng.choice(choices)


def flip_bit_(t: torch.Tensor, index: int, bit: int) -> tuple[int, int]:
    """Flip bit `bit` of element `index` (flat, row-major) of `t` in place.

    Returns the element's bits before and after, as unsigned integers, for the event log.
    """
    if t.dtype == torch.bool:
        raise ValueError("bool tensors have no bits to flip; use set_value_")
    width = bit_width(t.dtype)
    if not 0 <= bit < width:
        raise ValueError(f"bit {bit} is outside {t.dtype} (0..{width - 1})")
    n = t.numel()
    if not 0 <= index < n:
        raise ValueError(f"element {index} is outside a tensor of {n} elements")
    if not t.is_contiguous():
        raise ValueError("flip_bit_ needs a contiguous tensor")
    ints = t.detach().view(-1).view(_INT_VIEW[width // 8])
    # A signed view: the top bit's mask must be the negative number with that bit alone.
    mask = (1 << bit) - (1 << width if bit == width - 1 and ints.dtype != torch.uint8 else 0)
    before = int(ints[index].item()) & ((1 << width) - 1)
    ints[index] ^= mask
    after = int(ints[index].item()) & ((1 << width) - 1)
    return before, after


def set_bit_(t: torch.Tensor, index: int, bit: int, value: int) -> tuple[int, int]:
    """Force bit `bit` of element `index` to `value` (0 or 1), as a stuck memory cell does; the element's bits
    before and after (equal when the bit already held the value)."""
    before = flip_bit_(t, index, bit)[0]
    if (before >> bit) & 1 == value:
        flip_bit_(t, index, bit)  # it held the value already: put it back
        return before, before
    return before, before ^ (1 << bit)


def set_value_(t: torch.Tensor, index: int, value: float) -> float:
    """Write `value` (NaN, Inf, ...) into element `index`; returns the old value."""
    flat = t.detach().view(-1)
    old = float(flat[index].item())
    flat[index] = value
    return old
