"""The workload model's tensors by name and size, worked out from the preset without torch.

Scenario validation needs them to refuse a corruption fault that names a tensor the model lacks, or
an element past a tensor's end, before anything starts; `burnin validate` and the CLI must stay
cheap, so this module imports neither torch nor `burnin.rank.workload`. It mirrors the layers of
`workload.GPT` (nanoGPT's GPT-2): tests/test_validation.py builds the real model of every preset on
torch's meta device and checks that its `named_parameters()` and leaf modules' outputs agree with
what is computed here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

__all__ = ["PRESETS", "FLOAT_BITS", "TOKEN_BITS", "DDP_FIRST_BUCKET_BYTES", "TP_PLAN", "Layout", "layout",
           "parameter_shapes", "activation_numels", "tp_shape", "tp_problem"]

#: The model sizes, as `workload.PRESETS` has them (a test checks that the two agree).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, vocab_size=256),
    "small": dict(n_layer=4, n_head=8, n_embd=256, vocab_size=512),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304),
}

#: Bits of an element of the model's tensors (parameters, gradients, AdamW moments, activations: float32).
FLOAT_BITS = 32
#: Bits of an input token (the batch is int64).
TOKEN_BITS = 64
#: DDP's default cap on its first gradient bucket (`torch.distributed._DEFAULT_FIRST_BUCKET_BYTES`;
#: a test checks it). A bucket is closed once it holds at least its cap, so bucket 0 holds at least
#: this many bytes of gradients, or all of them when there are fewer; the first step, before DDP
#: rebuilds its buckets, has all of them in bucket 0.
DDP_FIRST_BUCKET_BYTES = 1 << 20


def _dims(preset: str) -> dict[str, int]:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def parameter_shapes(preset: str, seq_len: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each parameter, in `named_parameters()` order.

    The output head shares the token embedding's weight (GPT-2's weight tying), so `lm_head.weight`
    is not listed: `named_parameters()` gives each tensor once, under its first name, `wte.weight`.
    """
    d = _dims(preset)
    c, v = d["n_embd"], d["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (v, c), "wpe.weight": (seq_len, c)}
    for i in range(d["n_layer"]):
        b = f"blocks.{i}"
        shapes.update({
            f"{b}.ln_1.weight": (c,), f"{b}.ln_1.bias": (c,),
            f"{b}.attn.c_attn.weight": (3 * c, c), f"{b}.attn.c_attn.bias": (3 * c,),
            f"{b}.attn.c_proj.weight": (c, c), f"{b}.attn.c_proj.bias": (c,),
            f"{b}.ln_2.weight": (c,), f"{b}.ln_2.bias": (c,),
            f"{b}.mlp.c_fc.weight": (4 * c, c), f"{b}.mlp.c_fc.bias": (4 * c,),
            f"{b}.mlp.c_proj.weight": (c, 4 * c), f"{b}.mlp.c_proj.bias": (c,),
        })
    shapes.update({"ln_f.weight": (c,), "ln_f.bias": (c,)})
    return shapes


#: Tensor parallelism of each block (Megatron's split, as torchtitan plans it): the layers that open a pair
#: are cut by output rows (`colwise`: each rank computes some heads, or some of the MLP's hidden units),
#: the layers that close it by input columns (`rowwise`: each rank adds its part, and an all-reduce sums
#: them). Norms, embeddings and the tied head stay whole on every rank of a tensor-parallel group.
TP_PLAN: dict[str, str] = {"attn.c_attn": "colwise", "attn.c_proj": "rowwise",
                           "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"}


def tp_shape(name: str, shape: tuple[int, ...], tp: int, tp_rank: int = 0) -> tuple[int, ...]:
    """The part of parameter `name` (of `shape`) that tensor-parallel rank `tp_rank` of `tp` holds: a
    colwise layer's rows (weight and bias), a rowwise layer's weight columns (its bias stays whole)."""
    if tp <= 1 or not name.startswith("blocks."):
        return shape
    layer, _, kind = name.split(".", 2)[2].rpartition(".")
    style = TP_PLAN.get(layer)
    if style == "colwise":
        return (shape[0] // tp, *shape[1:])
    if style == "rowwise" and kind == "weight":
        return (shape[0], shape[1] // tp)
    return shape


def tp_problem(preset: str, tp: int) -> str | None:
    """Why the preset's layers cannot be split over `tp` ranks (whole heads each), or None."""
    d = _dims(preset)
    if tp > 1 and d["n_head"] % tp:
        return (f"tp={tp} does not divide the {preset} model's {d['n_head']} attention heads (each rank computes "
                f"whole heads); choose a divisor of {d['n_head']}")
    return None


def activation_numels(preset: str, batch_size: int, seq_len: int) -> dict[str, int]:
    """Leaf module name -> elements of its output in one training forward, in `named_modules()` order.

    Leaf modules are those without children, the ones a `corruption.* target: activation` can name.
    The position embedding sees positions 0..seq_len-1 once for the whole batch, so its output has
    no batch dimension.
    """
    d = _dims(preset)
    c, v = d["n_embd"], d["vocab_size"]
    tokens = batch_size * seq_len
    out: dict[str, int] = {"wte": tokens * c, "wpe": seq_len * c, "drop": tokens * c}
    for i in range(d["n_layer"]):
        b = f"blocks.{i}"
        out.update({
            f"{b}.ln_1": tokens * c,
            f"{b}.attn.c_attn": tokens * 3 * c, f"{b}.attn.c_proj": tokens * c,
            f"{b}.attn.resid_dropout": tokens * c,
            f"{b}.ln_2": tokens * c,
            f"{b}.mlp.c_fc": tokens * 4 * c, f"{b}.mlp.c_proj": tokens * c, f"{b}.mlp.dropout": tokens * c,
        })
    out.update({"ln_f": tokens * c, "lm_head": tokens * v})
    return out


@dataclass(frozen=True)
class Layout:
    """What a corruption fault can hit in one rank of a workload (read-only: it is shared)."""

    params: dict[str, int]       # parameter name -> elements (also its gradient's and AdamW moments')
    activations: dict[str, int]  # leaf module name -> elements of its output
    batch_tokens: int            # elements of a rank's input batch

    @property
    def grad_elements(self) -> int:
        """Elements of all gradients together: what the all-reduce carries per step."""
        return sum(self.params.values())

    @property
    def first_bucket_elements(self) -> int:
        """Fewest elements DDP's gradient bucket 0 ever holds (what `allreduce_payload` can index).

        Where the buckets split is decided by DDP at run time, from the order in which gradients
        become ready; but bucket 0 holds at least DDP_FIRST_BUCKET_BYTES of float32 gradients, or
        every gradient when there are fewer. An index below this is inside bucket 0 in every step;
        one at or above it may be past its end (the exact end depends on the run).
        """
        return min(self.grad_elements, DDP_FIRST_BUCKET_BYTES // (FLOAT_BITS // 8))


@functools.lru_cache(maxsize=64)
def layout(preset: str, batch_size: int, seq_len: int) -> Layout:
    """The tensors of the workload `preset` trained on batches of batch_size x seq_len tokens."""
    params = {n: math.prod(s) for n, s in parameter_shapes(preset, seq_len).items()}
    return Layout(params=params, activations=activation_numels(preset, batch_size, seq_len),
                  batch_tokens=batch_size * seq_len)
