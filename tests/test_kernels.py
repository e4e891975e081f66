"""The Triton kernels against their torch references, in the interpreter (CPU) and compiled (GPU).

conftest.py sets TRITON_INTERPRET=1 before anything imports triton, so the kernels imported here
run in the interpreter. The GPU tests run their kernels in subprocesses without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from burnin.kernels import _runtime
from burnin.kernels import bitflip, fingerprint, reduction

# The interpreter costs milliseconds per launch: keep the example counts modest.
KERNEL_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
ALL_DTYPES = list(bitflip.INT_VIEW)


def _tensor(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype)


def test_kernels_run_in_the_interpreter_here() -> None:
    assert _runtime.interpreting()
    with pytest.raises(RuntimeError, match="before anything imports triton"):
        _runtime.prepare("cuda")  # triton is loaded in interpreter mode: no switching


# -- reduction ------------------------------------------------------------------------------------

@KERNEL_SETTINGS
@given(rows=st.integers(1, 300), cols=st.integers(1, 3000), dtype=st.sampled_from(FLOATS),
       scale=st.sampled_from([0.01, 1.0, 30.0]), seed=st.integers(0, 2**31))
def test_logsumexp_nll_matches_torch(rows: int, cols: int, dtype: torch.dtype, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    targets = torch.randint(0, cols, (rows,), generator=g)
    nll, lse = reduction.logsumexp_nll(logits, targets)
    ref_nll, ref_lse = reduction.logsumexp_nll_reference(logits, targets)
    # Not bitwise: both sum exp() in float32, but in different orders (the interpreter's numpy
    # pairwise sum vs torch's vectorised loop), so the last bits differ. A few float32 ulps of
    # the log-sum-exp, which is at most log(cols) + max|x| in size.
    tol = 4e-6 * (1.0 + ref_lse.abs().max().item())
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=tol)
    torch.testing.assert_close(nll, ref_nll, rtol=0, atol=2 * tol)


def test_wide_vocabulary_takes_the_tiled_path() -> None:
    # Wider than one interpreter block (2**14 columns): the online log-sum-exp over tiles.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40_000, generator=g) * 5
    targets = torch.randint(0, 40_000, (5,), generator=g)
    nll, lse = reduction.logsumexp_nll(logits, targets)
    ref_nll, ref_lse = reduction.logsumexp_nll_reference(logits, targets)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-4)
    torch.testing.assert_close(nll, ref_nll, rtol=0, atol=1e-4)


def test_cross_entropy_gradient_matches_torch() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 256, generator=g, requires_grad=True)
    t = torch.randint(0, 256, (512,), generator=g)
    loss = reduction.cross_entropy(x, t)
    loss.backward()
    ours = x.grad.clone()
    x.grad = None
    ref = F.cross_entropy(x, t)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, x.grad, rtol=0, atol=1e-8)


def test_overrun_lands_in_the_neighbouring_output_and_is_one_shot() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 100, generator=g)
    targets = torch.randint(0, 100, (64,), generator=g)
    clean_nll, clean_lse = reduction.logsumexp_nll(logits, targets)
    reduction.arm(overrun=4)
    nll, lse = reduction.logsumexp_nll(logits, targets)
    assert torch.equal(nll, clean_nll)                      # the loss the step reports is right
    assert torch.equal(lse[:4], clean_nll[-4:])             # the overrun: 4 rows of lse replaced
    assert torch.equal(lse[4:], clean_lse[4:])
    again_nll, again_lse = reduction.logsumexp_nll(logits, targets)
    assert torch.equal(again_lse, clean_lse) and torch.equal(again_nll, clean_nll)


def test_a_wrong_tile_flips_one_bit_of_its_rows_only_and_is_one_shot() -> None:
    """corruption.kernel_tile: one program's rows come out with one bit of their log-sum-exp flipped (and their
    loss with it); every other row is the clean launch's, bit for bit; the next launch is clean."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(512, 1000, generator=g)
    targets = torch.randint(0, 1000, (512,), generator=g)
    clean_nll, clean_lse = reduction.logsumexp_nll(logits, targets)
    rows = _runtime.grid_rows(512, reduction._block_cols(1000))
    programs = -(-512 // rows)
    assert programs >= 2
    bad = 1 % programs
    reduction.arm(bad_tile=bad + 7 * programs, tile_xor=1 << 20)  # the tile is taken modulo the programs
    nll, lse = reduction.logsumexp_nll(logits, targets)
    tile = slice(bad * rows, (bad + 1) * rows)
    flipped = (clean_lse[tile].view(torch.int32) ^ (1 << 20)).view(torch.float32)
    assert torch.equal(lse[tile], flipped)
    assert not torch.equal(nll[tile], clean_nll[tile])
    others = torch.ones(512, dtype=torch.bool)
    others[tile] = False
    assert torch.equal(lse[others], clean_lse[others]) and torch.equal(nll[others], clean_nll[others])
    again_nll, again_lse = reduction.logsumexp_nll(logits, targets)
    assert torch.equal(again_lse, clean_lse) and torch.equal(again_nll, clean_nll)


def test_wild_offset_is_a_real_sigsegv_in_the_interpreter() -> None:
    code = textwrap.dedent("""
        import torch
        from burnin.kernels import reduction
        x = torch.randn(8, 16)
        t = torch.zeros(8, dtype=torch.long)
        reduction.arm(wild_row=3, wild_offset=1 << 40)
        reduction.logsumexp_nll(x, t)
        print("survived")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -11, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "survived" not in proc.stdout


def test_triton_workload_is_bitwise_deterministic() -> None:
    from burnin.rank.state import state_hash
    from burnin.rank.workload import GPT, MarkovData, gpt_config, make_optimizer

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        hashes, losses = [], []
        for _ in range(2):
            torch.manual_seed(0)
            model = GPT(gpt_config("tiny", 64, 0.1, kernels="triton"))
            opt = make_optimizer(model, 3e-3, 0.1)
            data = MarkovData(0, model.cfg.vocab_size)
            run = []
            for step in range(3):
                x, y = data.batch(step, 0, 8, 64)
                _, loss = model(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                run.append(loss.item())
            hashes.append(state_hash(model, opt))
            losses.append(run)
        assert hashes[0] == hashes[1] and losses[0] == losses[1]
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


# -- fingerprint ----------------------------------------------------------------------------------

@KERNEL_SETTINGS
@given(dtype=st.sampled_from(ALL_DTYPES + [torch.bool]), n=st.integers(0, 3 * fingerprint.CHUNK + 7),
       seed=st.integers(0, 2**31))
def test_fingerprint_matches_torch_bitwise(dtype: torch.dtype, n: int, seed: int) -> None:
    t = _tensor(dtype, n, seed) if dtype != torch.bool else torch.rand(n) > 0.5
    # Integer arithmetic that wraps mod 2**64 does not depend on the order: bit for bit.
    assert torch.equal(fingerprint.fingerprint(t), fingerprint.fingerprint_reference(t))


def test_fingerprint_of_a_model_sized_tensor() -> None:
    t = _tensor(torch.float32, 437_760, 4)
    assert torch.equal(fingerprint.fingerprint(t), fingerprint.fingerprint_reference(t))


@KERNEL_SETTINGS
@given(dtype=st.sampled_from(ALL_DTYPES), n=st.integers(1, 2 * fingerprint.CHUNK), data=st.data())
def test_any_single_bit_flip_changes_the_fingerprint(dtype: torch.dtype, n: int, data: st.DataObject) -> None:
    t = _tensor(dtype, n, n)
    index = data.draw(st.integers(0, n - 1))
    bit = data.draw(st.integers(0, t.element_size() * 8 - 1))
    before = fingerprint.digest(t)
    bitflip.flip_bit(t, index, bit)
    assert fingerprint.digest(t) != before


# -- bit flip -------------------------------------------------------------------------------------

@KERNEL_SETTINGS
@given(dtype=st.sampled_from(ALL_DTYPES), n=st.integers(1, 5000), data=st.data())
def test_bitflip_flips_exactly_one_bit_and_twice_restores(dtype: torch.dtype, n: int,
                                                           data: st.DataObject) -> None:
    t = _tensor(dtype, n, n)
    index = data.draw(st.integers(0, n - 1))
    bit = data.draw(st.integers(0, t.element_size() * 8 - 1))
    original = t.clone()
    ref = t.clone()
    bitflip.flip_bit(t, index, bit)
    bitflip.flip_bit_reference(ref, index, bit)
    view = bitflip.INT_VIEW[dtype]
    assert torch.equal(t.view(view), ref.view(view))        # the kernel equals the reference
    changed = (t.view(view) != original.view(view)).nonzero().flatten().tolist()
    assert changed == [index]                                 # one element ...
    diff = bitflip.bits_of(t, index) ^ bitflip.bits_of(original, index)
    assert diff == 1 << bit                                   # ... and one bit of it
    bitflip.flip_bit(t, index, bit)
    assert torch.equal(t.view(view), original.view(view))    # flipping twice restores


def test_bitflip_refuses_bad_arguments() -> None:
    t = torch.zeros(4)
    with pytest.raises(IndexError):
        bitflip.flip_bit(t, 4, 0)
    with pytest.raises(ValueError, match="out of range"):
        bitflip.flip_bit(t, 0, 32)
    with pytest.raises(TypeError):
        bitflip.flip_bit(torch.zeros(2, dtype=torch.complex64), 0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        bitflip.flip_bit(torch.zeros(4, 4).t(), 0, 0)


# -- the latent bug's trigger ---------------------------------------------------------------------

def test_latent_bug_trigger_is_rare_deterministic_and_differs_on_replay() -> None:
    from burnin.faults.memory import LatentKernelBug, LatentKernelBugParams
    from burnin.rank.workload import MarkovData

    fault = LatentKernelBug(LatentKernelBugParams(probability=0.05, replay_probability=0.5, seed=3))
    data = MarkovData(0, 256)
    batches = [data.batch(s, 0, 2, 8)[0] for s in range(2000)]
    patterns = [s for s, b in enumerate(batches) if fault.triggers(b, s, 0)[0]]
    assert 60 <= len(patterns) <= 140                          # ~5% of 2000 batches
    s = patterns[0]
    assert fault.triggers(batches[s], s, 0) == fault.triggers(batches[s], s, 0)
    # The pattern is in the data (every attempt sees it); the condition is drawn per attempt.
    conditions = [fault.triggers(batches[s], s, a) for a in range(40)]
    assert all(p for p, _ in conditions)
    assert 8 <= sum(c for _, c in conditions) <= 32


# -- GPU: compiled kernels, the real illegal memory access ----------------------------------------

def _run_cuda(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.gpu
def test_compiled_kernels_match_torch_on_cuda() -> None:
    proc = _run_cuda("""
        import torch
        from burnin.kernels import _runtime
        _runtime.prepare("cuda")
        from burnin.kernels import bitflip, fingerprint, reduction
        g = torch.Generator(device="cuda").manual_seed(0)
        for rows, cols in ((1, 1), (512, 256), (100, 50304), (3, 70000)):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = (torch.randn(rows, cols, device="cuda", generator=g) * 3).to(dtype)
                t = torch.randint(0, cols, (rows,), device="cuda", generator=g)
                nll, lse = reduction.logsumexp_nll(x, t)
                rn, rl = reduction.logsumexp_nll_reference(x, t)
                tol = 4e-6 * (1 + rl.abs().max().item())
                torch.testing.assert_close(lse, rl, rtol=0, atol=tol)
                torch.testing.assert_close(nll, rn, rtol=0, atol=2 * tol)
        for dtype in bitflip.INT_VIEW:
            t = (torch.randn(10_000, device="cuda") * 100).to(dtype)
            assert torch.equal(fingerprint.fingerprint(t), fingerprint.fingerprint_reference(t))
            u, r = t.clone(), t.clone()
            bitflip.flip_bit(u, 1234, 5); bitflip.flip_bit_reference(r, 1234, 5)
            v = bitflip.INT_VIEW[dtype]
            assert torch.equal(u.view(v), r.view(v)) and not torch.equal(u.view(v), t.view(v))
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.gpu
def test_wild_offset_is_a_real_illegal_memory_access_on_cuda() -> None:
    proc = _run_cuda("""
        import torch
        from burnin.kernels import _runtime
        _runtime.prepare("cuda")
        from burnin.kernels import reduction
        x = torch.randn(8, 16, device="cuda")
        t = torch.zeros(8, dtype=torch.long, device="cuda")
        reduction.arm(wild_row=3, wild_offset=1 << 40)
        try:
            reduction.logsumexp_nll(x, t)
            torch.cuda.synchronize()
        except RuntimeError as exc:
            print("first:", exc)
        try:  # sticky: the context is poisoned, any later CUDA work fails too
            torch.ones(1, device="cuda").sum().item()
            print("context still usable")
        except RuntimeError as exc:
            print("after:", exc)
    """)
    out = proc.stdout + proc.stderr
    assert "first:" in out and "illegal memory access" in out.lower(), out[-4000:]
    assert "context still usable" not in out, out[-4000:]
