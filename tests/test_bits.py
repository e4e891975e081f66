"""The bit-flip primitive against a numpy reference, for every dtype and bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from burnin.faults.bits import BIT_CLASSES, bit_width, bits_of, flip_bit_

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8]
_NP_UINT = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def _raw(t: torch.Tensor) -> np.ndarray:
    """The tensor's bits as unsigned integers, through numpy (bfloat16 has no numpy type: go via int16)."""
    width = bit_width(t.dtype)
    view = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    return t.contiguous().view(view).numpy().view(_NP_UINT[width]).copy()


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(DTYPES), n=st.integers(1, 64), data=st.data())
def test_flip_changes_exactly_one_bit_and_is_its_own_inverse(dtype: torch.dtype, n: int, data: st.DataObject) -> None:
    width = bit_width(dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    raw = rng.integers(0, 256, size=n * width // 8, dtype=np.uint8)  # any bit pattern, NaNs included
    t = torch.from_numpy(raw).view(dtype).clone()
    index = data.draw(st.integers(0, n - 1))
    bit = data.draw(st.integers(0, width - 1))
    before = _raw(t)
    expected = before.copy()
    expected[index] ^= _NP_UINT[width](1) << _NP_UINT[width](bit)  # numpy reference
    flip_bit_(t, index, bit)
    after = _raw(t)
    assert np.array_equal(after, expected)
    diff = np.bitwise_xor(before, after)
    assert sum(bin(int(x)).count("1") for x in diff) == 1
    flip_bit_(t, index, bit)
    assert np.array_equal(_raw(t), before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_classes_partition_the_bits(dtype: torch.dtype) -> None:
    width = bit_width(dtype)
    parts = [set(bits_of(dtype, c)) for c in BIT_CLASSES if c != "any"]
    union = set().union(*parts)
    assert sum(len(p) for p in parts) == len(union)  # disjoint
    if dtype.is_floating_point or dtype.is_signed:
        assert union == set(range(width))
    assert set(bits_of(dtype, "any")) == set(range(width))


def test_float32_layout() -> None:
    assert bits_of(torch.float32, "sign") == [31]
    assert bits_of(torch.float32, "exponent") == list(range(23, 31))
    t = torch.tensor([1.0])
    flip_bit_(t, 0, 31)
    assert t.item() == -1.0
    flip_bit_(t, 0, 30)  # top exponent bit: 1.0 -> 2**128 overflows to inf
    assert torch.isinf(t).all()


def test_out_of_range_is_refused() -> None:
    t = torch.zeros(4)
    with pytest.raises(ValueError, match="bit 32"):
        flip_bit_(t, 0, 32)
    with pytest.raises(ValueError, match="element 4"):
        flip_bit_(t, 4, 0)
