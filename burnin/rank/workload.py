"""The training workload every rank runs: a small GPT, a synthetic language, and its optimizer.

The model is nanoGPT's decoder-only transformer, so a fault lands in the same kinds of tensors
(embeddings, attention, MLP, LayerNorm, AdamW moments) as in a real LLM run. The data is a seeded
Markov chain whose entropy rate is known exactly: the loss has a floor to converge to, and each
sequence is a pure function of (seed, step, its place in the global batch), so resuming from a checkpoint
needs no loader state, on the same world size or another.

This module imports nothing from the rest of burnin but the Triton loss (`burnin.kernels.reduction`),
and that only when a model is built with kernels="triton".
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GPTConfig", "PRESETS", "gpt_config", "GPT", "MarkovData", "make_optimizer"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    kernels: str = "torch"  # the loss's row reduction: "torch" or "triton"


# Parameter counts (all parameters, tied lm_head counted once): tiny 437,760 (~0.44M) and
# small 3,307,008 (~3.3M) at seq_len 64; gpt2-124m 124,475,904 at seq_len 1024.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, vocab_size=256),
    "small": dict(n_layer=4, n_head=8, n_embd=256, vocab_size=512),
    # 50304 is GPT-2's 50257 padded to a multiple of 64, as nanoGPT does for faster matmuls.
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304),
}


def gpt_config(preset: str, seq_len: int, dropout: float, kernels: str = "torch") -> GPTConfig:
    """Build the config of a named model size for sequences of `seq_len` tokens."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    if kernels not in ("torch", "triton"):
        raise ValueError(f"unknown kernels {kernels!r}; choose 'torch' or 'triton'")
    return GPTConfig(block_size=seq_len, dropout=dropout, kernels=kernels, **PRESETS[preset])


class _CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        qkv = self.c_attn(x)
        # Under tensor parallelism a rank computes only its heads: c_attn's rows are laid out so that each
        # rank's chunk holds its heads' q, k and v (`sharding.parallelize_tp`), and c_proj adds the ranks up.
        width = qkv.shape[-1] // 3
        q, k, v = qkv.split(width, dim=2)
        head = c // self.n_head
        q, k, v = (z.view(b, t, width // head, head).transpose(1, 2) for z in (q, k, v))
        # SDPA's CPU kernels are deterministic; its attention dropout draws from the global RNG,
        # which the checkpoint saves, so a resumed run replays the same masks.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, width)
        return self.resid_dropout(self.c_proj(y))


class _MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = _CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = _MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT-2-style language model, the network whose training the harness disturbs."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kernels == "triton":
            # The caller has chosen how kernels run (burnin.kernels._runtime.prepare) before this import.
            try:
                from burnin.kernels.reduction import cross_entropy  # lazy: torch; `import burnin.rank` stays torch-free
            except ImportError as exc:
                raise RuntimeError(f"workload.kernels is 'triton' but triton cannot be imported ({exc}): "
                                   "install triton (Linux only), or set workload.kernels: torch") from None
            self._loss = cross_entropy
        else:
            self._loss = F.cross_entropy
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as in GPT-2
        # Init from the global RNG, so the caller's torch.manual_seed fixes the initial state.
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections so the residual stream's variance stays
        # independent of depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Return the next-token logits and, given targets, the mean cross-entropy loss."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = self._loss(logits.view(-1, logits.shape[-1]), targets.view(-1))
        return logits, loss

    def num_params(self) -> int:
        """Count parameters once each (the tied embedding is not counted twice)."""
        return sum(p.numel() for p in self.parameters())


# Each token has this many possible successors, with probabilities from a Dirichlet of this
# concentration: few, peaked transitions make the language learnable and its entropy rate far
# below log(vocab). Successors are stored sparsely, so a 50k vocabulary costs 50k x 8 entries.
_SUCCESSORS = 8
_CONCENTRATION = 0.5


class MarkovData:
    """Synthetic language: a seeded first-order Markov chain over the vocabulary whose entropy rate is known."""

    def __init__(self, seed: int, vocab_size: int):
        self.seed = seed
        self.vocab_size = vocab_size
        rng = np.random.default_rng(seed)
        k = min(_SUCCESSORS, vocab_size)
        # The first successor of each token follows one random cycle through the whole
        # vocabulary, so the chain is irreducible and the stationary distribution is unique.
        order = rng.permutation(vocab_size)
        succ = rng.integers(0, vocab_size, size=(vocab_size, k))
        succ[order, 0] = np.roll(order, -1)
        # Redraw rows with a repeated successor, so each row's probabilities are distinct
        # outcomes and the entropy below is exact.
        while True:
            s = np.sort(succ, axis=1)
            dup = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
            if dup.size == 0:
                break
            succ[dup, 1:] = rng.integers(0, vocab_size, size=(dup.size, k - 1))
        probs = rng.dirichlet(np.full(k, _CONCENTRATION), size=vocab_size)

        self.successors = succ
        self.probs = probs
        self.stationary = _stationary(succ, probs)
        plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
        self.entropy_rate = float(-(self.stationary * plogp.sum(axis=1)).sum())

        # Inverse-CDF tables for sampling; the last edge is pinned to 1 so rounding can never
        # leave a uniform draw past the end of a row.
        cum = np.cumsum(probs, axis=1)
        cum[:, -1] = 1.0
        start = np.cumsum(self.stationary)
        start[-1] = 1.0
        self._cum = torch.from_numpy(cum)
        self._succ = torch.from_numpy(succ.astype(np.int64))
        self._start_cum = torch.from_numpy(start)

    def batch(
        self, step: int, rank: int, batch_size: int, seq_len: int, device="cpu"
    ) -> tuple[Tensor, Tensor]:
        """Return the (inputs, next-token targets) of one rank at one step, a pure function of its arguments:
        sequences rank * batch_size ... (rank + 1) * batch_size - 1 of the step's global batch. Each sequence
        is a function of (seed, step, its index in the global batch) alone, so a step trains on the same
        sequences whatever the world size, when ranks x batch_size stays the same (a resume onto another
        world size compares with the run that wrote the checkpoint)."""
        # A private generator per sequence: no state to checkpoint and the global RNGs stay untouched.
        gen = torch.Generator(device="cpu")
        rows = []
        for i in range(rank * batch_size, (rank + 1) * batch_size):
            digest = hashlib.blake2b(struct.pack("<qqq", self.seed, step, i), digest_size=8).digest()
            gen.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
            rows.append(torch.rand(seq_len + 1, generator=gen, dtype=torch.float64))
        u = torch.stack(rows)

        tokens = torch.empty((batch_size, seq_len + 1), dtype=torch.int64)
        tok = torch.searchsorted(self._start_cum, u[:, 0].contiguous(), right=True)
        tok = tok.clamp_(max=self.vocab_size - 1)
        tokens[:, 0] = tok
        last = self._cum.shape[1] - 1
        for t in range(1, seq_len + 1):
            j = torch.searchsorted(self._cum[tok], u[:, t : t + 1].contiguous(), right=True)
            tok = self._succ[tok, j.clamp_(max=last).squeeze(1)]
            tokens[:, t] = tok
        tokens = tokens.to(device)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _stationary(succ: np.ndarray, probs: np.ndarray, tol: float = 1e-15) -> np.ndarray:
    """Stationary distribution of the sparse chain, by power iteration in float64."""
    v = succ.shape[0]
    pi = np.full(v, 1.0 / v)
    for _ in range(100_000):
        # The lazy chain (1/2 stay, 1/2 move) has the same stationary distribution and
        # converges even if the chain itself is periodic.
        moved = np.bincount(succ.ravel(), weights=(pi[:, None] * probs).ravel(), minlength=v)
        new = 0.5 * pi + 0.5 * moved
        new /= new.sum()
        if np.abs(new - pi).sum() < tol:
            return new
        pi = new
    return pi


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Build nanoGPT's AdamW: weight decay on matrices and embeddings, none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The single-tensor loop gives the same bits on every run; fused and foreach kernels
    # may reorder arithmetic between versions and devices.
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), foreach=False, fused=False)
