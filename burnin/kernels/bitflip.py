"""Flip one bit of one element in place: the kernel behind bit-flip faults.

The element is read through the integer view of its dtype (fp32 -> int32, fp16/bf16 -> int16,
fp64 -> int64, integers as themselves), XORed with one bit and stored back, so the flip is exact
whatever the value: a sign, exponent or mantissa bit of a float, NaN and Inf included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# CPU tensors need the interpreter, chosen before triton is first imported: _runtime.prepare("cpu").
from burnin.kernels import _runtime

__all__ = ["INT_VIEW", "flip_bit", "flip_bit_reference", "bits_of"]

#: The integer dtype whose bits are a dtype's bits.
INT_VIEW: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
    torch.float64: torch.int64, torch.int8: torch.int8, torch.uint8: torch.int8,
    torch.int16: torch.int16, torch.int32: torch.int32, torch.int64: torch.int64,
}


@triton.jit
def _bitflip_kernel(ptr, index, mask):
    v = tl.load(ptr + index)
    tl.store(ptr + index, (v ^ mask).to(v.dtype))


def _check(t: Tensor, index: int, bit: int) -> tuple[Tensor, int]:
    if t.dtype not in INT_VIEW:
        raise TypeError(f"cannot flip bits of a {t.dtype} tensor; supported: {', '.join(map(str, INT_VIEW))}")
    if not t.is_contiguous():
        raise ValueError("flip_bit needs a contiguous tensor (the index is into its flat view)")
    if not 0 <= index < t.numel():
        raise IndexError(f"element {index} is out of range for a tensor of {t.numel()} elements")
    width = t.element_size() * 8
    if not 0 <= bit < width:
        raise ValueError(f"bit {bit} is out of range for {t.dtype} ({width} bits)")
    # The mask as a signed value of the view's width, so the top bit fits the kernel's scalar type.
    mask = 1 << bit
    if bit == width - 1:
        mask = -mask
    return t.detach().view(INT_VIEW[t.dtype]).view(-1), mask


def flip_bit(t: Tensor, index: int, bit: int) -> None:
    """XOR bit `bit` of element `index` (of the flat view) of `t`, in place, by the Triton kernel."""
    _runtime.check_device(t, "tensor")
    view, mask = _check(t, index, bit)
    _bitflip_kernel[(1,)](view, index, mask)


def flip_bit_reference(t: Tensor, index: int, bit: int) -> None:
    """The same in torch."""
    view, mask = _check(t, index, bit)
    view[index] ^= mask


def bits_of(t: Tensor, index: int) -> int:
    """The raw bits of one element as an unsigned integer."""
    view = t.detach().reshape(-1).view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else None
    if view is None:
        raise TypeError(f"no integer view for {t.dtype}")
    return int(view[index].item()) & ((1 << (t.element_size() * 8)) - 1)
