"""Tests of the training workload: model size, data purity, the entropy floor, bitwise determinism."""

from __future__ import annotations

import math

import pytest
import torch

from burnin.rank.workload import GPT, PRESETS, MarkovData, gpt_config, make_optimizer

BATCH, SEQ = 8, 64


@pytest.fixture
def deterministic():
    """Pin the settings the harness runs ranks under, and restore the process-wide ones after."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was_deterministic)
    torch.set_num_threads(threads)


def _train(seed: int, steps: int, lr: float, dropout: float) -> tuple[list[float], GPT]:
    torch.manual_seed(seed)
    cfg = gpt_config("tiny", seq_len=SEQ, dropout=dropout)
    model = GPT(cfg)
    opt = make_optimizer(model, lr=lr, weight_decay=0.1)
    data = MarkovData(seed=seed, vocab_size=cfg.vocab_size)
    losses = []
    model.train()
    for step in range(steps):
        x, y = data.batch(step, rank=0, batch_size=BATCH, seq_len=SEQ)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


def test_tiny_is_about_half_a_million_parameters():
    model = GPT(gpt_config("tiny", seq_len=SEQ, dropout=0.0))
    assert 400_000 <= model.num_params() <= 600_000


def test_presets_include_gpt2_small_shape():
    assert PRESETS["gpt2-124m"] == dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="huge"):
        gpt_config("huge", seq_len=SEQ, dropout=0.0)


def test_forward_shapes_and_initial_loss_near_uniform():
    torch.manual_seed(0)
    cfg = gpt_config("tiny", seq_len=SEQ, dropout=0.0)
    x, y = MarkovData(0, cfg.vocab_size).batch(0, 0, BATCH, SEQ)
    logits, loss = GPT(cfg)(x, y)
    assert logits.shape == (BATCH, SEQ, cfg.vocab_size)
    # Small init gives near-uniform predictions.
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    assert GPT(cfg)(x)[1] is None


def test_batch_is_a_pure_function_of_its_arguments():
    data = MarkovData(seed=3, vocab_size=256)
    rng_before = torch.get_rng_state()
    x1, y1 = data.batch(5, 1, BATCH, SEQ)
    x2, y2 = MarkovData(seed=3, vocab_size=256).batch(5, 1, BATCH, SEQ)
    assert torch.equal(rng_before, torch.get_rng_state())
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, data.batch(6, 1, BATCH, SEQ)[0])
    assert not torch.equal(x1, data.batch(5, 0, BATCH, SEQ)[0])
    assert not torch.equal(x1, MarkovData(seed=4, vocab_size=256).batch(5, 1, BATCH, SEQ)[0])


def test_batch_targets_are_inputs_shifted_by_one():
    x, y = MarkovData(seed=0, vocab_size=256).batch(0, 0, BATCH, SEQ)
    assert x.shape == y.shape == (BATCH, SEQ)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.min()) >= 0 and int(x.max()) < 256


@pytest.mark.parametrize("vocab_size", [256, 512])
def test_entropy_rate_matches_sampled_transitions(vocab_size):
    data = MarkovData(seed=0, vocab_size=vocab_size)
    assert 0.0 < data.entropy_rate < 0.5 * math.log(vocab_size)
    # 200 sequences x 1000 transitions: the mean surprisal estimates the entropy rate.
    x, y = data.batch(0, 0, batch_size=200, seq_len=1000)
    dense = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)
    dense.scatter_(1, torch.from_numpy(data.successors), torch.from_numpy(data.probs))
    p = dense[x.flatten(), y.flatten()]
    assert bool((p > 0).all()), "sampled a transition the chain does not have"
    empirical = float(-p.log().mean())
    assert empirical == pytest.approx(data.entropy_rate, rel=0.03)


def test_stationary_distribution_is_stationary():
    data = MarkovData(seed=1, vocab_size=256)
    pi = torch.from_numpy(data.stationary)
    dense = torch.zeros(256, 256, dtype=torch.float64)
    dense.scatter_(1, torch.from_numpy(data.successors), torch.from_numpy(data.probs))
    assert torch.allclose(pi @ dense, pi, atol=1e-12)
    assert pi.sum().item() == pytest.approx(1.0)


def _bits(model: GPT) -> list[bytes]:
    return [p.detach().numpy().tobytes() for p in model.parameters()]


def test_training_is_bitwise_reproducible(deterministic):
    losses_a, model_a = _train(seed=0, steps=20, lr=1e-3, dropout=0.1)
    losses_b, model_b = _train(seed=0, steps=20, lr=1e-3, dropout=0.1)
    assert losses_a == losses_b
    assert _bits(model_a) == _bits(model_b)

    losses_c, model_c = _train(seed=1, steps=20, lr=1e-3, dropout=0.1)
    assert losses_c != losses_a
    assert _bits(model_c) != _bits(model_a)


def test_training_learns_the_language(deterministic):
    # Measured: the mean of the first 5 losses is ~5.3 nats (log 256 = 5.55); the mean of the
    # last 10 of 150 steps is ~1.87, against an entropy floor of 1.45 nats for seed 0; ~5 s.
    losses, _ = _train(seed=0, steps=150, lr=3e-3, dropout=0.0)
    start = sum(losses[:5]) / 5
    end = sum(losses[-10:]) / 10
    assert end < start - 1.0
    assert end > MarkovData(0, 256).entropy_rate - 0.1  # cannot beat the floor by much
