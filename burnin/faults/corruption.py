"""Corruption faults: a flipped bit, or a NaN, somewhere in the training state, silently.

The target names the tensor and so the step point at which it is hit:

    param              a parameter of one rank, after the optimizer step: replicas diverge
    optimizer_state    an AdamW moment of one rank, after the optimizer step
    grad               one rank's local gradient, before the all-reduce (DDP comm hook):
                       averaged into every replica, so replicas stay equal
    allreduce_payload  one element of one rank's outgoing gradient bucket, by position: data
                       corrupted in flight, also averaged into every replica
    grad_reduced       one rank's gradient after the all-reduce: only that replica is hit
    activation         the forward output of a named module, on one rank
    batch              one input token of one rank

and, of a sharded model (FSDP2, HSDP), inside its collectives, one element of one rank's flat buffer of
one FSDP unit (`tensor` names the unit: "root", "blocks.0", ...; drawn when absent):

    all_gather_output          the parameters the rank received from the all-gather: used by that rank's
                               forward or backward only, and the gradients it sends are skewed
    reduce_scatter_input       the unsharded gradients the rank sends into the reduce-scatter: summed
                               into the owning rank's shard (and on HSDP into every replica's)
    reduce_scatter_output      the rank's reduced gradient shard (on HSDP: the all-reduce's input, so
                               every replica takes it in)
    replica_all_reduce_output  HSDP: the rank's gradient shard after the all-reduce across replicas:
                               only that replica is hit

and of a tensor-parallel model, the output of a rowwise layer's all-reduce (`tensor` names the layer:
"blocks.0.attn.c_proj", "blocks.0.mlp.c_proj", ...):

    tp_all_reduce_output       the summed activation one rank received (forward): that rank's forward
                               goes on with it, and the gradients it computes are skewed

Tensor, element and bit are given or drawn from `seed`, so a campaign draws one per trial.
"""

from __future__ import annotations

import math
import random
from difflib import get_close_matches
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from burnin.core.model_shapes import FLOAT_BITS, PRESETS, TOKEN_BITS, TP_PLAN, layout, parameter_shapes, tp_shape
from burnin.faults.base import COLLECTIVE_POINTS, Fault
from burnin.faults.memory import reduction_kernel

__all__ = ["Bitflip", "NaN", "StuckBit", "KernelTile", "TARGET_POINTS", "TARGET_AT", "NOT_HERE", "workload_problem"]

Target = Literal["param", "optimizer_state", "grad", "allreduce_payload", "grad_reduced", "activation", "batch",
                 "all_gather_output", "reduce_scatter_input", "reduce_scatter_output", "replica_all_reduce_output",
                 "tp_all_reduce_output"]
#: Which bits a drawn bit comes from (the same words as `burnin.faults.bits.BIT_CLASSES`, without torch).
BitClass = Literal["sign", "exponent", "mantissa_high", "mantissa_low", "any"]

#: The targets inside a sharded model's collectives, each at the point of its collective.
COLLECTIVE_TARGETS: dict[str, str] = {
    "all_gather_output": "all_gather",
    "reduce_scatter_input": "reduce_scatter",
    "reduce_scatter_output": "reduce_scatter",
    "replica_all_reduce_output": "replica_all_reduce",
    "tp_all_reduce_output": "tp_all_reduce",
}
#: Of those, the ones hit once the collective is done (what it received).
_RECEIVED = ("all_gather_output", "reduce_scatter_output", "replica_all_reduce_output", "tp_all_reduce_output")

TARGET_POINTS: dict[str, str] = {
    "param": "after_optimizer_step",
    "optimizer_state": "after_optimizer_step",
    "grad": "after_backward",
    "allreduce_payload": "after_backward",
    "grad_reduced": "after_allreduce",
    "activation": "before_forward",
    "batch": "before_forward",
    **COLLECTIVE_TARGETS,
}

#: The step points at which a target is at hand (the others fail inside the rank): the batch exists
#: only before the forward; a local gradient and the all-reduce payload only inside DDP's comm hook;
#: the reduced gradient from the all-reduce until the next step's backward zeroes it (and not before
#: the first backward, nor in a resumed step).
TARGET_AT: dict[str, tuple[str, ...]] = {
    "batch": ("before_forward",),
    "grad": ("after_backward",),
    "allreduce_payload": ("after_backward",),
    "grad_reduced": ("after_allreduce", "after_optimizer_step"),
    **{target: (point,) for target, point in COLLECTIVE_TARGETS.items()},
}

#: Returned by `inject` when the target is not at hand at this call (another gradient bucket):
#: the injector then tries again at the next call instead of counting the fault as fired.
NOT_HERE: dict[str, Any] = {"not_here": True}


class _CorruptionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: Target = Field("param", description="which state is hit (and so at which step point)")
    tensor: str | None = Field(None, description="parameter or module name (of a collective target: the FSDP unit, "
                                                 "e.g. root or blocks.0); drawn from seed when absent")
    state: Literal["exp_avg", "exp_avg_sq"] = Field("exp_avg", description="optimizer_state: which AdamW moment")
    index: int | None = Field(None, ge=0, description="flat element index; drawn from seed when absent")
    seed: int = Field(0, ge=0, description="draws what is not given")


class BitflipParams(_CorruptionParams):
    bit: int | None = Field(None, ge=0, le=63, description="exact bit (0 = least significant)")
    bit_class: BitClass = Field(
        "any", description="the class a drawn bit comes from")
    bits: int = Field(1, ge=1, le=8, description="bits flipped in each element hit: `bit` (or a drawn one) and "
                                                 "bits-1 more drawn from the same class")
    burst: int = Field(1, ge=1, le=4096, description="adjacent elements hit, the same bits in each: a run of `burst` "
                                                     "elements aligned to a multiple of it (32: a warp's lanes) that "
                                                     "holds the element")
    every: int = Field(1, ge=1, le=10_000, description="a recurring defect: flip again every `every` steps, "
                                                       "`times` times in all (the same element and bits of what each "
                                                       "step computes anew)")
    times: int = Field(1, ge=1, le=10_000, description="how many times the flip happens (1: once)")


class NaNParams(_CorruptionParams):
    value: Literal["nan", "inf", "-inf"] = Field("nan", description="what is written into the element")


class _TensorCorruption(Fault):
    where = "in_rank"
    effects = ("corruption",)  # seen only when a detector finding pins it (restart mode)
    effect_scope = "detector"
    points = ("after_optimizer_step", "after_backward", "after_allreduce", "before_forward", "between_steps",
              *COLLECTIVE_POINTS)
    Params: ClassVar[type[BaseModel]] = _CorruptionParams

    def default_point(self) -> str:
        return TARGET_POINTS[self.params.target]

    def fire_point(self, point: str) -> str:
        return f"{point}.out" if self.params.target in _RECEIVED else point

    def inject(self, ctx: Any) -> dict[str, Any]:
        p = self.params
        rng = random.Random(p.seed)
        if p.target == "activation":
            return self._arm_activation(ctx, rng)
        if p.target in COLLECTIVE_TARGETS:
            return self._in_collective(ctx, rng)
        located = self._locate(ctx, rng)
        if located is None:
            return NOT_HERE
        name, tensor = located
        index = p.index if p.index is not None else rng.randrange(tensor.numel())
        if index >= tensor.numel():
            raise ValueError(f"{self.name}: element {index} is outside {name} ({tensor.numel()} elements)")
        return {"target": p.target, "tensor": name, "index": index, "dtype": str(tensor.dtype).replace("torch.", ""),
                **self.corrupt(tensor, index, rng)}

    def _in_collective(self, ctx: Any, rng: random.Random) -> dict[str, Any]:
        """One element of the flat buffer of the named (or drawn) unit's collective: NOT_HERE at another
        unit's call. Says which parameter the element belongs to (and whose chunk, in a buffer of every
        rank's chunks)."""
        p = self.params
        call = ctx.tensors["collective"]
        units = call.units
        unit = p.tensor if p.tensor is not None else rng.choice(units)
        if unit not in units:
            raise ValueError(f"{self.name}: no FSDP unit {unit!r}; one of {', '.join(units)}")
        if call.unit != unit:
            return NOT_HERE
        tensor = call.input if p.target == "reduce_scatter_input" else call.output
        index = p.index if p.index is not None else rng.randrange(tensor.numel())
        if index >= tensor.numel():
            raise ValueError(f"{self.name}: element {index} is outside the {p.target} of unit {unit} "
                             f"({tensor.numel()} elements)")
        chunked = p.target in ("all_gather_output", "reduce_scatter_input")
        return {"target": p.target, "tensor": unit, "index": index, "group": call.group,
                "dtype": str(tensor.dtype).replace("torch.", ""),
                **call.locate(index, chunked=chunked),
                **self.corrupt(tensor, index, rng)}

    def corrupt(self, tensor: Any, index: int, rng: random.Random) -> dict[str, Any]:
        raise NotImplementedError

    def _locate(self, ctx: Any, rng: random.Random) -> tuple[str, Any] | None:
        p = self.params
        if p.target == "batch":
            return "batch", ctx.tensors["batch"]
        params = dict(ctx.model.named_parameters())
        name = p.tensor if p.tensor is not None else rng.choice(sorted(params))
        if name not in params:
            raise ValueError(f"{self.name}: no parameter {name!r}; one of {', '.join(sorted(params))}")
        param = params[name]
        # Of a sharded parameter (FSDP2, HSDP: a DTensor), this rank's shard: the index is an element of
        # the shard the target rank holds, and nothing here talks to the other ranks.
        if p.target == "param":
            return _shard(name, param.data)
        if p.target == "grad_reduced":
            return _shard(f"{name}.grad", param.grad)
        if p.target == "optimizer_state":
            return _shard(f"{name}.{p.state}", ctx.optimizer.state[param][p.state])
        bucket = ctx.tensors["bucket"]
        if p.target == "allreduce_payload":
            if bucket.index() != 0:
                return None
            return f"bucket{bucket.index()}", bucket.buffer()
        # grad: the gradient view of that parameter inside the bucket about to be all-reduced
        for bp, grad in zip(bucket.parameters(), bucket.gradients()):
            if bp is param:
                return f"{name}.grad(local)", grad
        return None

    def _arm_activation(self, ctx: Any, rng: random.Random) -> dict[str, Any]:
        p = self.params
        modules = {n: m for n, m in ctx.model.named_modules() if n and not list(m.children())}
        name = p.tensor if p.tensor is not None else rng.choice(sorted(modules))
        if name not in modules:
            raise ValueError(f"{self.name}: no module {name!r}; one of {', '.join(sorted(modules))}")
        record: dict[str, Any] = {"target": "activation", "tensor": name}
        seed = rng.random()

        def hook(module: Any, inputs: Any, output: Any) -> Any:
            handle.remove()  # one forward only
            out = output.clone()
            r = random.Random(seed)
            index = p.index if p.index is not None else r.randrange(out.numel())
            record.update(index=index, dtype=str(out.dtype).replace("torch.", ""), **self.corrupt(out, index, r))
            return out

        handle = modules[name].register_forward_hook(hook)
        return record


class Bitflip(_TensorCorruption):
    """Flip one bit of one element: the silent data corruption of a bad DIMM, SRAM cell or link. With
    `times` > 1 a recurring defect: the same flip of what each step computes anew, every `every` steps."""

    name = "corruption.bitflip"
    summary = ("flip one bit in a parameter, gradient, all-reduce payload, activation, optimizer state or batch, "
               "or in what a sharded collective sends or received; once, or every N steps (a recurring defect)")
    Params = BitflipParams
    disruptive = False

    def span(self) -> int:
        return (self.params.times - 1) * self.params.every + 1

    def fires_at(self, offset: int) -> bool:
        return offset % self.params.every == 0

    def corrupt(self, tensor: Any, index: int, rng: random.Random) -> dict[str, Any]:
        from burnin.faults.bits import draw_bit, flip_bit_  # lazy: torch, in the rank only

        from burnin.faults.bits import bits_of  # lazy: torch, in the rank only

        p = self.params
        bit = p.bit if p.bit is not None else draw_bit(tensor.dtype, p.bit_class, rng)
        cls = p.bit_class if p.bit is None else _class_of(tensor.dtype, bit)
        flipped = [bit]
        pool = [b for b in bits_of(tensor.dtype, cls if cls != "any" else "any") if b != bit]
        if p.bits > 1:
            if len(pool) < p.bits - 1:
                raise ValueError(f"{self.name}: bits={p.bits}, but a {tensor.dtype} element has "
                                 f"{len(pool) + 1} {cls} bits")
            flipped += rng.sample(sorted(pool), p.bits - 1)
        start = index - index % p.burst
        end = min(start + p.burst, tensor.numel())
        before, after = 0, 0
        for i in range(start, end):
            for b in flipped:
                was, now = flip_bit_(tensor, i, b)
                if i == index:
                    before = was if b == flipped[0] else before
                    after = now
        pattern = " ".join(w for w, on in (("burst", p.burst > 1), ("multi-bit", p.bits > 1),
                                           ("recurring", p.times > 1)) if on)
        return {"bit": bit, "bit_class": cls, "before": f"{before:#x}", "after": f"{after:#x}",
                "bits": sorted(flipped), "elements": [start, end], "pattern": pattern or "single"}


class NaN(_TensorCorruption):
    """Write NaN or Inf into one element: what an overflow or an uninitialised read leaves behind."""

    name = "corruption.nan"
    summary = ("write NaN or Inf into one element of a parameter, gradient, activation or optimizer state, or of "
               "a sharded collective's buffer")
    Params = NaNParams
    disruptive = False

    def corrupt(self, tensor: Any, index: int, rng: random.Random) -> dict[str, Any]:
        from burnin.faults.bits import set_value_  # lazy: torch, in the rank only

        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{self.name}: {tensor.dtype} cannot hold {self.params.value}")
        old = set_value_(tensor, index, float(self.params.value))
        return {"value": self.params.value, "old": old}


class StuckBitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: Literal["param", "optimizer_state"] = Field("param", description="the state the stuck cells hold")
    tensor: str | None = Field(None, description="parameter name; drawn from seed when absent")
    state: Literal["exp_avg", "exp_avg_sq"] = Field("exp_avg", description="optimizer_state: which AdamW moment")
    index: int | None = Field(None, ge=0, description="an element of the region (flat index); drawn when absent")
    region: int = Field(32, ge=1, le=4096, description="stuck elements: a run of `region` adjacent elements "
                                                       "aligned to a multiple of it that holds the element")
    bit: int | None = Field(None, ge=0, le=31, description="the stuck bit (0 = least significant)")
    bit_class: BitClass = Field(
        "any", description="the class a drawn bit comes from")
    value: Literal[0, 1] = Field(1, description="what the bit is stuck at")
    steps: int = Field(8, ge=1, le=100_000, description="steps the cells stay stuck: after each of these steps' "
                                                        "optimizer step, the bit is forced again")
    seed: int = Field(0, ge=0, description="draws what is not given")


class StuckBit(_TensorCorruption):
    """A bit stuck at 0 or 1 over a region of a parameter or AdamW moment, for a number of steps: a defective
    memory row. After each optimizer step of its span the bit is forced again in every element of the region
    (an element whose bit already holds the value is not changed: that part of the defect is invisible)."""

    name = "corruption.stuck_bit"
    summary = "a bit stuck at 0 or 1 over a region of a parameter or optimizer state, forced again every step"
    Params = StuckBitParams
    points = ("after_optimizer_step",)
    disruptive = False

    def default_point(self) -> str:
        return "after_optimizer_step"

    def fire_point(self, point: str) -> str:
        return point

    def span(self) -> int:
        return self.params.steps

    def inject(self, ctx: Any) -> dict[str, Any]:
        from burnin.faults.bits import draw_bit, set_bit_  # lazy: torch, in the rank only

        p = self.params
        rng = random.Random(p.seed)
        name, tensor = self._locate(ctx, rng)
        index = p.index if p.index is not None else rng.randrange(tensor.numel())
        if index >= tensor.numel():
            raise ValueError(f"{self.name}: element {index} is outside {name} ({tensor.numel()} elements)")
        bit = p.bit if p.bit is not None else draw_bit(tensor.dtype, p.bit_class, rng)
        start = index - index % p.region
        end = min(start + p.region, tensor.numel())
        changed = 0
        for i in range(start, end):
            before, after = set_bit_(tensor, i, bit, p.value)
            changed += before != after
        return {"target": p.target, "tensor": name, "index": index, "dtype": str(tensor.dtype).replace("torch.", ""),
                "bit": bit, "bit_class": _class_of(tensor.dtype, bit), "value": p.value, "elements": [start, end],
                "changed": changed, "pattern": "stuck-at"}


class KernelTileParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tile: int | None = Field(None, ge=0, le=1_000_000, description="which program (tile of rows) of the launch "
                                                                   "computes wrongly, modulo the launch's programs; "
                                                                   "drawn when absent")
    bit: int | None = Field(None, ge=0, le=31, description="the bit of the tile's log-sum-exp results that comes "
                                                          "out flipped")
    bit_class: BitClass = Field(
        "any", description="the class a drawn bit comes from")
    seed: int = Field(0, ge=0, description="draws what is not given")


class KernelTile(Fault):
    """One tile of the loss's Triton reduction kernel computes wrongly: every row of one program's tile gets
    its log-sum-exp with one bit flipped (a defective streaming multiprocessor or a bad lane of one), and
    with it the row's loss and, through the saved log-sum-exp, its softmax gradient. One launch."""

    name = "corruption.kernel_tile"
    summary = "one output tile of the Triton loss kernel computes wrongly (one bit of each of its rows' results)"
    where = "in_rank"
    points = ("before_forward",)
    Params = KernelTileParams
    effects = ("corruption",)
    effect_scope = "detector"
    disruptive = False

    def inject(self, ctx: Any) -> dict[str, Any]:
        import torch  # lazy: in the rank only

        from burnin.faults.bits import draw_bit  # lazy: torch, in the rank only

        p = self.params
        reduction = reduction_kernel(ctx, self.name)
        rng = random.Random(p.seed)
        tile = p.tile if p.tile is not None else rng.randrange(1 << 20)
        bit = p.bit if p.bit is not None else draw_bit(torch.float32, p.bit_class, rng)
        reduction.arm(bad_tile=tile, tile_xor=1 << bit)
        return {"target": "kernel_tile", "tensor": "reduction", "tile": tile, "bit": bit,
                "bit_class": _class_of(torch.float32, bit), "pattern": "tile"}


def _shard(name: str, tensor: Any) -> tuple[str, Any]:
    """(name, tensor), or of a DTensor (`to_local` is how one is told apart without importing torch
    here) its local shard, named so the report says which part was hit."""
    if hasattr(tensor, "to_local") and hasattr(tensor, "placements"):
        return f"{name}(shard)", tensor.to_local()
    return name, tensor


def _class_of(dtype: Any, bit: int) -> str:
    from burnin.faults.bits import bits_of  # lazy: torch, in the rank only

    for cls in ("sign", "exponent", "mantissa_high", "mantissa_low"):
        if bit in bits_of(dtype, cls):
            return cls
    return "any"


def workload_problem(fault: str, params: BaseModel, *, point: str | None, step: int, model: str,
                     batch_size: int, seq_len: int, shards: int = 1, rank_in_shard: int = 0,
                     tp: int = 1, tp_rank: int = 0) -> tuple[tuple[str, ...], str] | None:
    """Why this corruption would fail inside the rank of this workload, or None when it would not.

    Checked at load time from the model preset alone (`burnin.core.model_shapes`, no torch): the
    target is at hand at the step point, the named tensor exists, the element index is inside it,
    the bit is inside the element. Returns the fields to blame, the one to change first first
    ("point" and "step" are the FaultSpec's own, the others are params), and a message.
    """
    p = params
    target = p.target
    at = point or TARGET_POINTS[target]
    if target in COLLECTIVE_TARGETS or at in COLLECTIVE_POINTS:
        return _collective_problem(p, at, model, batch_size, seq_len, shards, tp)
    if shards > 1 and (target in ("grad", "allreduce_payload") or at == "after_backward"):
        return ("target", "point"), (f"target {target} at {at} acts on a DDP gradient bucket, and a sharded "
                                     f"workload (workload.parallel) has none; use target grad_reduced (this "
                                     f"rank's gradient shard after the reduce-scatter) or param")
    if target in TARGET_AT and at not in TARGET_AT[target]:
        return ("point", "target"), (f"target {target} is at hand only at {' or '.join(TARGET_AT[target])}, "
                                     f"not at {at}; leave `point` out (it follows the target)")
    if target == "optimizer_state" and at != "after_optimizer_step" and step == 0:
        return ("step", "point"), ("the AdamW moments (target optimizer_state) exist only after the first "
                                   f"optimizer step, so not at step 0 {at}; use after_optimizer_step or a later step")
    bits = TOKEN_BITS if target == "batch" else FLOAT_BITS
    dtype = "int64" if target == "batch" else "float32"
    if fault == NaN.name and target == "batch":
        return ("target", "value"), (f"the batch holds int64 tokens, which cannot hold {p.value}; "
                                     "use corruption.bitflip to damage the batch")
    if fault == Bitflip.name:
        cls = p.bit_class if p.bit is None else None
        in_class = {"sign": 1, "exponent": 8, "mantissa_high": 11, "mantissa_low": 12, "any": bits}
        if p.bits > 1 and target != "batch" and cls is not None and p.bits > in_class[cls]:
            return ("bits", "bit_class"), (f"bits {p.bits} in one word, but a float32 element has "
                                           f"{in_class[cls]} {cls} bit(s); use bits <= {in_class[cls]} or another "
                                           "bit_class")
        if p.bit is not None and p.bit >= bits:
            return ("bit", "target"), (f"bit {p.bit} is outside a {dtype} element of target {target} "
                                       f"(bits 0..{bits - 1})")
        if p.times > 1 and target in ("param", "optimizer_state"):
            return ("times", "target"), (f"a recurring flip (times {p.times}) of target {target} flips the same bit "
                                         "of the same element again, which undoes it; recur on what each step "
                                         "computes anew (activation, grad, allreduce_payload, grad_reduced, batch), "
                                         "or use corruption.stuck_bit for a defective memory cell")
        if p.bit is None and target == "batch" and p.bit_class == "exponent":
            return ("bit_class", "target"), ("the batch holds int64 tokens, which have no exponent bits; "
                                             "use sign, mantissa_high, mantissa_low or any")
    lay = layout(model, batch_size, seq_len)
    if target == "batch":
        sizes, what = {"the batch": lay.batch_tokens}, None
    elif target == "activation":
        sizes, what = lay.activations, "leaf module"
    elif shards > 1 or tp > 1:  # the target rank's shard of each parameter: of what tensor parallelism left it,
        # FSDP2 cuts dim 0 in chunks of ceil(n / shards)
        shapes = parameter_shapes(model, seq_len)
        sizes = {n: _shard_numel(tp_shape(n, shape, tp), shards, rank_in_shard) for n, shape in shapes.items()}
        what = "parameter"
    else:
        sizes, what = lay.params, "parameter"
    if target != "batch" and p.tensor is not None:
        if p.tensor not in sizes:
            shown, hint = _unknown(p.tensor, sizes)
            examples = ", ".join(list(sizes)[:4])
            return ("tensor",), (f"the {model} model has no {what} {shown!r} for target {target}; {hint}"
                                 f"({len(sizes)} {what}s: {examples}, ...)")
        sizes = {p.tensor: sizes[p.tensor]}
    burst = getattr(p, "burst", 1)
    if burst > 1 and target not in ("allreduce_payload", "activation"):
        small = {n: k for n, k in sizes.items() if k < burst}
        if small and len(small) == len(sizes):
            name, n = min(small.items(), key=lambda kv: kv[1])
            return ("burst", "tensor"), (f"a burst of {burst} elements does not fit {name} ({n} elements); use a "
                                         f"burst of at most {n}, or a larger tensor")
        if small and p.tensor is None:
            return ("burst", "tensor"), (f"a burst of {burst} elements does not fit {len(small)} of the {what}s a "
                                         f"drawn tensor may be (e.g. {min(small, key=small.get)}, "
                                         f"{min(small.values())} elements); name a `tensor` or use a smaller burst")
    if p.index is None:
        return None
    if target == "allreduce_payload":
        limit = lay.first_bucket_elements
        if p.index >= limit:
            return ("index",), (f"index {_num(p.index)} may be past the end of gradient bucket 0, which DDP sizes "
                                f"at run time: it holds at least {limit} elements (1 MiB, or all "
                                f"{lay.grad_elements} gradient elements of the {model} model if fewer); "
                                f"use an index below {limit}")
        return None
    name, n = min(sizes.items(), key=lambda kv: kv[1])
    if p.index < n:
        return None
    if len(sizes) == 1 and (shards > 1 or tp > 1) and target != "activation":
        whose = f"shard {rank_in_shard} (of {shards})" + (f" of tensor-parallel part {tp_rank} (of {tp})" if tp > 1 else "")
        return ("index", "tensor"), (f"index {_num(p.index)} is past the end of the target rank's {whose} of {name} "
                                     f"({n} elements; indices 0..{n - 1}): a sharded parameter's index counts in the "
                                     f"shard the target rank holds")
    if len(sizes) == 1:
        where = "the batch" if target == "batch" else name
        return ("index", "tensor"), (f"index {_num(p.index)} is past the end of {where} ({n} elements; "
                                     f"indices 0..{n - 1})")
    return ("index", "tensor"), (f"index {_num(p.index)} is past the end of some {what}s a drawn tensor may be "
                                 f"(the smallest, {name}, has {n} elements); name a `tensor`, or use an "
                                 f"index below {n}")


def _collective_problem(p: BaseModel, at: str, model: str, batch_size: int, seq_len: int,
                        shards: int, tp: int) -> tuple[tuple[str, ...], str] | None:
    """What workload_problem says of a target inside a collective, or a target at a collective's point (the
    workload is sharded: the caller checked)."""
    target = p.target
    if target not in COLLECTIVE_TARGETS:
        here = [t for t, pt in COLLECTIVE_TARGETS.items() if pt == at]
        return ("target", "point"), (f"target {target} is not inside a collective; at point {at} use target "
                                     f"{' or '.join(here)}, or another point")
    if at != COLLECTIVE_TARGETS[target]:
        return ("point", "target"), (f"target {target} is at hand only at {COLLECTIVE_TARGETS[target]}, not at "
                                     f"{at}; leave `point` out (it follows the target)")
    if target == "tp_all_reduce_output":
        acts = layout(model, batch_size, seq_len).activations
        sizes, kind = {n: acts[n] for n in tp_layers(model)}, "tensor-parallel layer with an all-reduce"
    else:
        units = unit_buffers(model, seq_len, shards, tp)
        chunked = target in ("all_gather_output", "reduce_scatter_input")
        sizes, kind = {u: n * shards if chunked else n for u, n in units.items()}, "FSDP unit"
    if p.tensor is not None:
        if p.tensor not in sizes:
            shown, hint = _unknown(p.tensor, sizes)
            return ("tensor",), (f"the {model} model has no {kind} {shown!r} for target {target}; {hint}"
                                 f"(its {kind}s: {short_list(list(sizes))})")
        sizes = {p.tensor: sizes[p.tensor]}
    if p.index is None:
        return None
    name, n = min(sizes.items(), key=lambda kv: kv[1])
    if p.index < n:
        return None
    if target == "tp_all_reduce_output":
        what = f"layer {name}" if len(sizes) == 1 else f"some layers a drawn one may be (the smallest, {name})"
        return ("index", "tensor"), (f"index {_num(p.index)} is past the end of the {target} of {what}: {n} "
                                     f"elements (batch_size x seq_len x n_embd; indices 0..{n - 1})")
    what = f"unit {name}" if len(sizes) == 1 else f"some units a drawn one may be (the smallest, {name})"
    return ("index", "tensor"), (f"index {_num(p.index)} is past the end of the {target} buffer of {what}: "
                                 f"{n} elements (indices 0..{n - 1}) on {shards} shards")


def short_list(names: list[str], most: int = 6) -> str:
    """Names for an error line: the first few and how many more."""
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def tp_layers(model: str) -> list[str]:
    """The layers of burnin's GPT whose forward ends in a tensor-parallel all-reduce (`TP_PLAN`'s rowwise)."""
    n_layer = PRESETS[model]["n_layer"]
    return [f"blocks.{i}.{layer}" for i in range(n_layer) for layer, style in TP_PLAN.items() if style == "rowwise"]


def _unknown(text: str, names: dict[str, int]) -> tuple[str, str]:
    """A name that is not among `names`, as an error shows it (cut when long), and a "did you mean" hint."""
    close = get_close_matches(text, list(names), n=1, cutoff=0.6) if len(text) <= 200 else []
    return (text if len(text) <= 60 else text[:57] + "..."), (f"did you mean {close[0]!r}? " if close else "")


def unit_buffers(model: str, seq_len: int, shards: int, tp: int = 1) -> dict[str, int]:
    """FSDP unit -> elements of one rank's chunk of its flat collective buffers (burnin's GPT sharded per
    block, then the root): each parameter's dim 0 (of what tensor parallelism left the rank) cut into
    chunks of ceil(n / shards) rows, padded."""
    out: dict[str, int] = {"root": 0}
    for name, shape in parameter_shapes(model, seq_len).items():
        parts = name.split(".")
        unit = ".".join(parts[:2]) if parts[0] == "blocks" else "root"
        shape = tp_shape(name, shape, tp)
        out[unit] = out.get(unit, 0) + -(-shape[0] // shards) * math.prod(shape[1:])
    return out


def _shard_numel(shape: tuple[int, ...], shards: int, index: int) -> int:
    """Elements of shard `index` of a tensor of `shape` cut along dim 0 into `shards` (FSDP2's Shard(0))."""
    rows = -(-shape[0] // shards)
    mine = max(0, min(rows, shape[0] - index * rows))
    return mine * math.prod(shape[1:])


def _num(value: int) -> str:
    try:
        text = str(value)
    except ValueError:  # more digits than Python converts
        return "(a number too long to show)"
    return text if len(text) <= 24 else text[:10] + "..." + text[-4:]


#: The faults this module adds to the built-in catalogue (`burnin.faults.registry` registers them).
FAULTS = (Bitflip, NaN, StuckBit, KernelTile)
