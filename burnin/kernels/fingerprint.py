"""A tensor's fingerprint: position-weighted sums of its raw bits, for comparing replicas bit for bit.

The tensor's bytes are read as words (int32, or int16/int8 when its size is not a multiple of four
bytes), and chunk c of CHUNK words gets

    fp[c] = sum over words i in the chunk of  word[i] * (2*i + 1)   (mod 2**64)

Integer arithmetic wraps but never rounds, so the kernel, the torch reference and every launch
configuration give the same bits. The weights are odd: flipping bit k of word i changes fp[c] by
±2**k * (2*i + 1), which is never 0 mod 2**64, so any single-bit flip changes the fingerprint
(and the chunk says where). Two replicas that all-gather their fingerprints and compare them
find a silent divergence without moving the tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# CPU tensors need the interpreter, chosen before triton is first imported: _runtime.prepare("cpu").
from burnin.kernels import _runtime

__all__ = ["CHUNK", "words", "fingerprint", "fingerprint_reference", "digest"]

#: Words per fingerprint chunk: part of the fingerprint's definition, not a launch parameter.
CHUNK = 4096


@triton.jit
def _fingerprint_kernel(words_ptr, out_ptr, n_words, n_chunks,
                        CHUNK: tl.constexpr, CHUNKS_PER_PROGRAM: tl.constexpr):
    pid = tl.program_id(0)
    chunks = pid * CHUNKS_PER_PROGRAM + tl.arange(0, CHUNKS_PER_PROGRAM)
    idx = chunks.to(tl.int64)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    w = tl.load(words_ptr + idx, mask=idx < n_words, other=0).to(tl.int64)
    fp = tl.sum(w * (2 * idx + 1), axis=1)  # wraps mod 2**64: exact whatever the summation order
    tl.store(out_ptr + chunks, fp, mask=chunks < n_chunks)


def words(t: Tensor) -> Tensor:
    """The raw bits of `t` as a flat integer tensor (no copy when `t` is contiguous)."""
    flat = t.detach().contiguous().view(-1)
    b = flat.view(torch.uint8)
    for dtype, size in ((torch.int32, 4), (torch.int16, 2)):
        if b.numel() % size == 0 and b.data_ptr() % size == 0:
            return b.view(dtype)
    return b.view(torch.int8)


def fingerprint(t: Tensor) -> Tensor:
    """Per-chunk fingerprint of `t`'s bits (int64, one per CHUNK words), by the Triton kernel."""
    _runtime.check_device(t, "tensor")
    w = words(t)
    n = w.numel()
    n_chunks = max(1, triton.cdiv(n, CHUNK))
    out = torch.zeros(n_chunks, dtype=torch.int64, device=t.device)
    if n == 0:
        return out
    per_program = _runtime.grid_rows(n_chunks, CHUNK, compiled_elems=CHUNK)
    _fingerprint_kernel[(triton.cdiv(n_chunks, per_program),)](
        w, out, n, n_chunks, CHUNK=CHUNK, CHUNKS_PER_PROGRAM=per_program)
    return out


def fingerprint_reference(t: Tensor) -> Tensor:
    """The same in torch."""
    w = words(t).to(torch.int64)
    n = w.numel()
    n_chunks = max(1, -(-n // CHUNK))
    idx = torch.arange(n, dtype=torch.int64, device=w.device)
    padded = torch.zeros(n_chunks * CHUNK, dtype=torch.int64, device=w.device)
    padded[:n] = w * (2 * idx + 1)
    return padded.view(n_chunks, CHUNK).sum(dim=1)


def digest(t: Tensor) -> int:
    """One unsigned 64-bit number for the whole tensor: the wrapping sum of its chunk fingerprints."""
    return int(fingerprint(t).sum().item()) & ((1 << 64) - 1)
