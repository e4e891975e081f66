"""Row-wise log-sum-exp over the vocabulary: the reduction in the workload's cross-entropy, every step.

`cross_entropy(logits, targets)` is the mean negative log-likelihood, like
`F.cross_entropy(logits, targets)`; its forward runs `_logsumexp_nll_kernel`, its backward is plain
torch. The kernel is also where the memory faults of the catalogue act: `arm()` makes its next
launch compute one row's offset wrong (a load far outside the tensor: an illegal memory access on
CUDA, SIGSEGV in the interpreter), store a few elements past the end of its output (a silent
overwrite of the neighbouring tensor), or compute one program's tile wrongly (one bit of each of its
rows' log-sum-exp flipped). Disarmed, those arguments are no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# CPU tensors need the interpreter, chosen before triton is first imported: _runtime.prepare("cpu").
from burnin.kernels import _runtime

__all__ = ["cross_entropy", "logsumexp_nll", "logsumexp_nll_reference", "arm", "disarm", "Armed"]


@triton.jit
def _logsumexp_nll_kernel(
    logits_ptr, targets_ptr, nll_ptr, lse_ptr,
    n_rows, n_cols, stride_row,
    wild_row, wild_offset, overrun, bad_tile, tile_xor,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    # The row's start. `wild_offset` is 0 unless a memory fault armed the kernel: then one row's
    # offset is wrong and the column mask below, which checks columns and not addresses, lets it through.
    base = rows.to(tl.int64) * stride_row + tl.where(rows == wild_row, wild_offset, 0)
    cols = tl.arange(0, BLOCK_N)
    if ONE_TILE:
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(logits_ptr + base[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        m = tl.where(row_ok, m, 0.0)
        s = tl.sum(tl.exp(x - m[:, None]), axis=1)
    else:
        # Online log-sum-exp over column tiles (vocabularies wider than one block).
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < n_cols)[None, :]
            x = tl.load(logits_ptr + base[:, None] + c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.where(row_ok, tl.maximum(m, tl.max(x, axis=1)), 0.0)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
            m = m_new
    lse = m + tl.log(tl.where(row_ok, s, 1.0))  # rows past the end sum to 0: keep log() quiet
    if pid == bad_tile:
        # Armed only: this program's tile comes out wrong, one bit of each row's log-sum-exp flipped (and the
        # loss computed from it), as from a defective unit.
        lse = (lse.to(tl.int32, bitcast=True) ^ tile_xor).to(tl.float32, bitcast=True)
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    x_t = tl.load(logits_ptr + rows.to(tl.int64) * stride_row + tgt, mask=row_ok, other=0.0).to(tl.float32)
    nll = lse - x_t
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(nll_ptr + rows, nll, mask=row_ok)
    if overrun > 0:
        # Armed only: the last `overrun` rows are stored a second time, `overrun` elements further
        # on, past the end of `nll`.
        tl.store(nll_ptr + rows + overrun, nll, mask=row_ok & (rows >= n_rows - overrun))


@dataclass
class Armed:
    """What the next launch does wrong (all zero/-1: nothing)."""

    wild_row: int = -1       # the row whose offset is wrong
    wild_offset: int = 0     # elements added to that row's offset
    overrun: int = 0         # elements stored past the end of the output
    bad_tile: int = -1       # the program whose results come out wrong (modulo the launch's programs)
    tile_xor: int = 0        # the bits flipped in each of its rows' log-sum-exp


_armed = Armed()


def arm(*, wild_row: int = -1, wild_offset: int = 0, overrun: int = 0, bad_tile: int = -1, tile_xor: int = 0) -> None:
    """Make the next launch (only that one) compute a wrong offset, write past its output, or compute one
    tile's results wrongly."""
    global _armed
    _armed = Armed(wild_row, wild_offset, overrun, bad_tile, tile_xor)


def disarm() -> None:
    arm()


def _block_cols(n_cols: int) -> int:
    cap = 1 << 14 if _runtime.interpreting() else 1 << 12
    return min(triton.next_power_of_2(n_cols), cap)


def logsumexp_nll(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(nll, lse) per row of a 2-D `logits` with integer `targets`, both float32, by the Triton kernel."""
    global _armed
    _runtime.check_device(logits, "logits")
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (rows, cols) and targets (rows,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    targets = targets.contiguous()
    n_rows, n_cols = logits.shape
    # One allocation for both outputs, as fused kernels keep their outputs: nll, then lse. An
    # overrun of nll lands in lse, deterministically, whatever the allocator does around it.
    out = torch.empty(2 * n_rows, dtype=torch.float32, device=logits.device)
    nll, lse = out[:n_rows], out[n_rows:]
    if n_rows == 0:
        return nll, lse
    block_n = _block_cols(n_cols)
    block_m = _runtime.grid_rows(n_rows, block_n)
    armed, _armed = _armed, Armed()  # one launch only
    grid = (triton.cdiv(n_rows, block_m),)
    _logsumexp_nll_kernel[grid](
        logits, targets, nll, lse, n_rows, n_cols, logits.stride(0),
        armed.wild_row, armed.wild_offset, armed.overrun,
        armed.bad_tile % grid[0] if armed.bad_tile >= 0 else -1, _signed32(armed.tile_xor),
        BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=n_cols <= block_n,
    )
    return nll, lse


def _signed32(mask: int) -> int:
    """A 32-bit XOR mask as the int32 the kernel takes (bit 31: negative)."""
    return mask - (1 << 32) if mask >= 1 << 31 else mask


def logsumexp_nll_reference(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The same in torch: what the kernel must compute."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=1)
    return lse - x.gather(1, targets.view(-1, 1).long()).squeeze(1), lse


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        nll, lse = logsumexp_nll(logits, targets)
        ctx.save_for_backward(logits, targets, lse)
        return nll.mean()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # d mean(lse - x[t]) / dx = (softmax(x) - onehot(t)) / rows, with softmax from the saved lse.
        logits, targets, lse = ctx.saved_tensors
        g = torch.exp(logits.float() - lse.unsqueeze(1))
        g[torch.arange(g.shape[0], device=g.device), targets] -= 1.0
        g *= grad / max(1, g.shape[0])
        return g.to(logits.dtype), None


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of `logits` (rows, vocab) against `targets` (rows,); forward by Triton."""
    return _CrossEntropy.apply(logits, targets)
