"""caption_kernels/dico.py on the CPU: the Triton kernels under TRITON_INTERPRET=1, the PyTorch reference,
and a float64 transcription of DiCO's formula written here, independently of both."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: run the kernels in numpy
os.environ["HF_HUB_OFFLINE"] = "1"

import math

import pytest
import torch
import torch.nn.functional as F

from caption_kernels.dico import (
    SequenceLogprobsTriton,
    dico_loss,
    dico_loss_reference,
    dico_stats,
    sequence_logprobs,
    sequence_logprobs_from_hidden,
    sequence_logprobs_from_hidden_reference,
    sequence_logprobs_reference,
)

IMPLS = ("torch", "triton")


# ------------------------------------------------------------------------------------------------
# The formula, transcribed: one row at a time, float64, torch.softmax on the raw gaps
# ------------------------------------------------------------------------------------------------


def dico_formula_float64(policy_logps, ref_logps, rewards, beta, tau, valid=None):
    """(loss, n_usable) straight from DiCO's equations; differentiable in policy_logps (float64)."""
    B, k = rewards.shape
    valid = torch.ones(B, k, dtype=torch.bool) if valid is None else valid
    policy = policy_logps.double()
    s_all = policy - ref_logps.double()
    row_losses = []
    for b in range(B):
        candidates = [i for i in range(k) if valid[b, i]]
        if len(candidates) < 2:
            continue
        row_rewards = [float(rewards[b, i]) for i in candidates]
        winner = candidates[row_rewards.index(max(row_rewards))]  # list.index: first on ties
        losers = [i for i in candidates if i != winner]
        gaps = torch.tensor([float(rewards[b, winner] - rewards[b, j]) for j in losers], dtype=torch.float64)
        gamma = torch.softmax(tau * gaps, dim=0)
        z = beta * (s_all[b, winner] - (gamma * s_all[b, losers]).sum())
        row_losses.append(-F.logsigmoid(z))
    if not row_losses:
        return policy.sum() * 0.0, 0
    return torch.stack(row_losses).mean(), len(row_losses)


def make_rewards(kind, B, k, generator):
    if kind == "random":
        return torch.rand(B, k, generator=generator)
    if kind == "ties":  # few distinct values: ties for the winner and among losers
        return torch.randint(0, 3, (B, k), generator=generator).float() * 0.25
    if kind == "all_equal":
        return torch.full((B, k), 0.37)
    if kind == "huge_gaps":  # tau * gap up to 3e7: exp overflows unless shifted
        return torch.randn(B, k, generator=generator) * 1e5
    raise ValueError(kind)


def make_dico_batch(B, k, reward_kind, seed, with_invalid):
    """Random log-probs, rewards of one kind, and (optionally) invalid candidates holding -inf."""
    generator = torch.Generator().manual_seed(seed)
    policy = -torch.rand(B, k, generator=generator) * 20  # summed caption log-probs: negative
    ref = policy + 0.5 * torch.randn(B, k, generator=generator)
    rewards = make_rewards(reward_kind, B, k, generator)
    valid = None
    if with_invalid:
        valid = torch.rand(B, k, generator=generator) > 0.3
        valid[0] = False  # no valid candidate
        valid[1] = False
        valid[1, k - 1] = True  # exactly one: skipped
        valid[2] = True  # all valid
        policy = policy.masked_fill(~valid, -math.inf)  # failed generations
        ref = ref.masked_fill(~valid, -math.inf)
        rewards = rewards.masked_fill(~valid, math.nan)
    return policy, ref, rewards, valid


def loss_and_grad(impl, policy, ref, rewards, valid, beta=0.2, tau=300.0):
    policy = policy.detach().clone().requires_grad_(True)
    loss = dico_loss(policy, ref, rewards, beta=beta, tau=tau, valid=valid, impl=impl)
    (grad,) = torch.autograd.grad(loss, policy)
    return loss.detach(), grad


# ------------------------------------------------------------------------------------------------
# dico_loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_dico_hand_computed(impl):
    # Row 0: rewards (0.5, 0.7, 0.6) -> winner 1; tau = 10 ln 3 makes the loser weights
    # exp(tau * 0.2) : exp(tau * 0.1) = 9 : 3, gamma = (0.75, 0.25). s = (1, 3, -1), beta = 0.4:
    # z = 0.4 * (3 - (0.75 * 1 + 0.25 * -1)) = 1, loss = log(1 + e^-1).
    # Row 1: a single valid candidate: skipped, so the mean is over one row.
    policy = torch.tensor([[1.0, 3.0, -1.0], [-2.0, -3.0, -4.0]])
    ref = torch.zeros(2, 3)
    rewards = torch.tensor([[0.5, 0.7, 0.6], [0.1, 0.9, 0.2]])
    valid = torch.tensor([[True, True, True], [False, True, False]])
    loss, grad = loss_and_grad(impl, policy, ref, rewards, valid, beta=0.4, tau=10 * math.log(3))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    sigmoid_neg_z = 1 / (1 + math.e)  # sigmoid(-1)
    c = 0.4 * sigmoid_neg_z  # beta sigmoid(-z): the winner gets -c, loser j gets c gamma_j
    expected = torch.tensor([[c * 0.75, -c, c * 0.25], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [2, 3, 5, 16])
@pytest.mark.parametrize("reward_kind", ["random", "ties", "all_equal", "huge_gaps"])
def test_dico_matches_formula(k, reward_kind):
    with_invalid = k >= 3
    policy, ref, rewards, valid = make_dico_batch(9, k, reward_kind, seed=k, with_invalid=with_invalid)
    policy64 = policy.double().requires_grad_(True)
    expected_loss, n_usable = dico_formula_float64(policy64, ref, rewards, 0.2, 300.0, valid)
    (expected_grad,) = torch.autograd.grad(expected_loss, policy64)
    expected_grad = expected_grad.nan_to_num(0.0)  # masked -inf entries: 0 in the formula's graph
    assert n_usable >= 1
    for impl in IMPLS:
        loss, grad = loss_and_grad(impl, policy, ref, rewards, valid)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), impl
        torch.testing.assert_close(loss.double(), expected_loss.detach(), rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)


def test_dico_triton_matches_reference_on_many_blocks():
    # B = 600 > BLOCK_B = 256 at k = 5: the forward loops over row blocks, the backward has 3 programs.
    policy, ref, rewards, valid = make_dico_batch(600, 5, "random", seed=1, with_invalid=True)
    loss_ref, grad_ref = loss_and_grad("torch", policy, ref, rewards, valid)
    loss_tri, grad_tri = loss_and_grad("triton", policy, ref, rewards, valid)
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_tri, grad_ref, rtol=1e-5, atol=1e-9)


# The interpreter evaluates both branches of tl.where in numpy, which warns about the inf - inf
# lanes that the kernel discards; on a GPU those lanes are computed and discarded silently.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("impl", IMPLS)
def test_dico_extreme_rewards_stay_finite(impl):
    # Infinite and near-overflow rewards: tau * (r_w - r_j) is inf or overflows, the shifted form is not.
    policy, ref, _, _ = make_dico_batch(4, 4, "random", seed=3, with_invalid=False)
    rewards = torch.tensor(
        [
            [math.inf, 0.0, -1.0, 2.0],
            [1.0, -math.inf, -math.inf, 0.5],  # two losers at -inf share all the weight
            [3e38, -3e38, 0.0, 1.0],
            [-math.inf, -math.inf, -math.inf, -math.inf],  # all equal
        ]
    )
    loss, grad = loss_and_grad(impl, policy, ref, rewards, None)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    gamma = dico_stats(policy, ref, rewards).gamma
    torch.testing.assert_close(gamma[1], torch.tensor([0.0, 0.5, 0.5, 0.0]))
    torch.testing.assert_close(gamma[3], torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]))
    reference_loss, reference_grad = loss_and_grad("torch", policy, ref, rewards, None)
    torch.testing.assert_close(loss, reference_loss)
    torch.testing.assert_close(grad, reference_grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_dico_no_usable_row_is_zero_not_nan(impl):
    policy = torch.full((3, 4), -math.inf)
    valid = torch.zeros(3, 4, dtype=torch.bool)
    valid[1, 2] = True
    policy[1, 2] = -5.0
    loss, grad = loss_and_grad(impl, policy, policy.clone(), torch.rand(3, 4), valid)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros(3, 4))
    stats = dico_stats(policy, policy.clone(), torch.rand(3, 4), valid=valid)
    assert stats.n_skipped.item() == 3
    assert stats.winner.tolist() == [-1, 2, -1]


@pytest.mark.parametrize("impl", IMPLS)
def test_dico_k1_every_row_skipped(impl):
    loss, grad = loss_and_grad(impl, torch.randn(5, 1), torch.randn(5, 1), torch.rand(5, 1), None)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros(5, 1))


def test_dico_gradcheck_reference_float64():
    policy, ref, rewards, valid = make_dico_batch(6, 5, "random", seed=4, with_invalid=True)
    policy = torch.where(valid, policy, 0.0).double().requires_grad_(True)  # gradcheck perturbs every entry
    ref = torch.where(valid, ref, 0.0).double()
    assert torch.autograd.gradcheck(
        lambda p: dico_loss_reference(p, ref, rewards, beta=0.7, tau=3.0, valid=valid), (policy,)
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_dico_no_gradient_to_ref_or_rewards(impl):
    policy = torch.randn(4, 3, requires_grad=True)
    ref = torch.randn(4, 3, requires_grad=True)
    rewards = torch.rand(4, 3, requires_grad=True)
    dico_loss(policy, ref, rewards, impl=impl).backward()
    assert policy.grad is not None and ref.grad is None and rewards.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dico_low_precision_and_strided_inputs(dtype):
    policy, ref, rewards, valid = make_dico_batch(16, 6, "random", seed=5, with_invalid=True)
    # (k, B) storage viewed as (B, k): the kernels take strides, nothing is copied
    policy_t = policy.to(dtype).t().contiguous().t()
    ref_t, valid_t = ref.to(dtype).t().contiguous().t(), valid.t().contiguous().t()
    rewards_t = rewards.double().t().contiguous().t()  # rewards in any float dtype, read as fp32
    assert not policy_t.is_contiguous()
    loss_ref, grad_ref = loss_and_grad("torch", policy_t, ref_t, rewards_t, valid_t)
    loss_tri, grad_tri = loss_and_grad("triton", policy_t, ref_t, rewards_t, valid_t)
    assert grad_tri.dtype == dtype and loss_tri.dtype == torch.float32
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_tri, grad_ref, rtol=1e-2, atol=1e-4)


def test_dico_stats_agree_with_loss():
    policy, ref, rewards, valid = make_dico_batch(12, 5, "ties", seed=6, with_invalid=True)
    stats = dico_stats(policy, ref, rewards, valid=valid)
    loss = dico_loss(policy, ref, rewards, valid=valid, impl="triton")
    usable = stats.usable
    assert stats.n_skipped.item() == int((valid.sum(1) < 2).sum())
    torch.testing.assert_close(stats.row_loss[usable].mean(), loss)
    torch.testing.assert_close(stats.gamma[usable].sum(1), torch.ones(int(usable.sum())))
    assert torch.equal(stats.correct, usable & (stats.margin > 0))
    for b in range(12):  # the winner: a valid candidate holding the row's best valid reward, first of ties
        if stats.winner[b] >= 0:
            best = rewards[b][valid[b]].max()
            first_best = next(i for i in range(5) if valid[b, i] and rewards[b, i] == best)
            assert stats.winner[b].item() == first_best
            assert stats.gamma[b, first_best] == 0
    summary = stats.summary()
    assert summary["n_skipped"] == stats.n_skipped.item()
    assert summary["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_dico_bad_inputs(monkeypatch):
    good = torch.randn(3, 4)
    with pytest.raises(ValueError, match="shape"):
        dico_loss(good, torch.randn(3, 5), good)
    with pytest.raises(ValueError, match=r"\(B, k\)"):
        dico_loss(torch.randn(12), torch.randn(12), torch.randn(12))
    with pytest.raises(TypeError, match="floating"):
        dico_loss(good, good, torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="bool"):
        dico_loss(good, good, good, valid=torch.ones(3, 4))
    with pytest.raises(ValueError, match="impl"):
        dico_loss(good, good, good, impl="cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="CUDA"):
        dico_loss(good, good, good, impl="triton")


# ------------------------------------------------------------------------------------------------
# sequence_logprobs
# ------------------------------------------------------------------------------------------------


def make_sequences(N, T, V, dtype, seed, pad_lengths=True):
    """Logits with garbage (NaN, -inf, out-of-vocab ids) behind the mask, and padded lengths."""
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, T, V, generator=generator)).to(dtype)
    targets = torch.randint(0, V, (N, T), generator=generator)
    lengths = torch.randint(1, T + 1, (N,), generator=generator) if pad_lengths else torch.full((N,), T)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (N, T)
    targets = targets.masked_fill(~mask, -100)
    logits = logits.masked_fill(~mask[..., None], math.nan)
    return logits, targets, mask


def sequence_formula_float64(logits, targets, mask):
    logits = logits.double()
    keep = mask != 0
    safe_logits = torch.where(keep[..., None], logits, 0.0)
    token_logps = torch.log_softmax(safe_logits, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return torch.where(keep, token_logps * mask.double(), 0.0).sum(1)


def sequence_value_and_grad(fn, logits, targets, mask, upstream):
    logits = logits.detach().clone().requires_grad_(True)
    out = fn(logits, targets, mask)
    (grad,) = torch.autograd.grad((out * upstream).sum(), logits)
    return out.detach(), grad


def triton_with_block(block_v):
    return lambda logits, targets, mask: SequenceLogprobsTriton.apply(logits, targets, mask, block_v)


@pytest.mark.parametrize("block_v", [64, 512])  # 300 = 4.7 blocks of 64; one partly filled block of 512
def test_sequence_logprobs_fp32_matches_float64(block_v):
    logits, targets, mask = make_sequences(3, 5, 300, torch.float32, seed=0)
    upstream = torch.tensor([1.0, -2.0, 0.5])
    expected, expected_grad = sequence_value_and_grad(
        sequence_formula_float64, logits.double(), targets, mask, upstream.double()
    )
    for fn in (sequence_logprobs_reference, triton_with_block(block_v)):
        out, grad = sequence_value_and_grad(fn, logits, targets, mask, upstream)
        assert out.dtype == torch.float32 and grad.dtype == torch.float32
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))  # padding: exact zeros


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sequence_logprobs_low_precision(dtype):
    logits, targets, mask = make_sequences(2, 6, 200, dtype, seed=1)
    upstream = torch.tensor([0.7, 1.3])
    expected, expected_grad = sequence_value_and_grad(  # of the rounded inputs
        sequence_formula_float64, logits.double(), targets, mask, upstream.double()
    )
    out, grad = sequence_value_and_grad(triton_with_block(64), logits, targets, mask, upstream)
    assert grad.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)  # fp32 math inside
    grad_scale = expected_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-2, atol=1e-2 * grad_scale)
    out_ref, grad_ref = sequence_value_and_grad(sequence_logprobs_reference, logits, targets, mask, upstream)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=1e-2, atol=1e-2)


def test_sequence_logprobs_strided_logits_weights_and_int32():
    # (T, N, 2V) storage read as (N, T, V) with a vocabulary stride of 2; float mask weights; int32 ids.
    N, T, V = 3, 4, 150
    generator = torch.Generator().manual_seed(2)
    storage = torch.randn(T, N, 2 * V, generator=generator)
    logits = storage.transpose(0, 1)[..., ::2]
    assert logits.shape == (N, T, V) and logits.stride(2) == 2
    targets = torch.randint(0, V, (N, T), generator=generator, dtype=torch.int32)
    mask = torch.rand(N, T, generator=generator) * (torch.rand(N, T, generator=generator) > 0.25)
    upstream = torch.randn(N, generator=generator)
    out_ref, grad_ref = sequence_value_and_grad(sequence_logprobs_reference, logits, targets, mask, upstream)
    out_tri, grad_tri = sequence_value_and_grad(triton_with_block(64), logits, targets, mask, upstream)
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_tri, grad_ref, rtol=1e-5, atol=1e-7)


def test_sequence_logprobs_public_api_triton():
    logits, targets, mask = make_sequences(2, 3, 100, torch.bfloat16, seed=3)
    out = sequence_logprobs(logits, targets, mask, impl="triton")
    expected = sequence_logprobs(logits, targets, mask, impl="torch")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    assert sequence_logprobs(logits, targets, mask).shape == (2,)  # auto on the CPU: the reference


def test_sequence_logprobs_gradcheck_reference_float64():
    logits, targets, mask = make_sequences(2, 3, 7, torch.float64, seed=4)
    logits = torch.where(mask[..., None], logits, 0.0).requires_grad_(True)  # gradcheck perturbs padding too
    weights = mask.double() * (0.5 + torch.rand(2, 3, dtype=torch.float64))  # float weights, 0 on padding
    assert torch.autograd.gradcheck(lambda x: sequence_logprobs_reference(x, targets, weights), (logits,))


def test_sequence_logprobs_bad_inputs():
    logits = torch.randn(2, 3, 10)
    targets = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sequence_logprobs(logits, targets.masked_fill(mask.bool(), 10), mask)
    with pytest.raises(ValueError, match=r"\(N, T, V\)"):
        sequence_logprobs(logits[0], targets, mask)
    with pytest.raises(ValueError, match="targets"):
        sequence_logprobs(logits, targets[:, :2], mask)
    with pytest.raises(TypeError, match="int32 or int64"):
        sequence_logprobs(logits, targets.float(), mask)
    with pytest.raises(TypeError, match="float64"):
        sequence_logprobs(logits.double(), targets, mask, impl="triton")


# ------------------------------------------------------------------------------------------------
# sequence_logprobs_from_hidden (chunked LM head)
# ------------------------------------------------------------------------------------------------


def make_hidden_batch(dtype, seed, with_bias, D=16, V=90):
    generator = torch.Generator().manual_seed(seed)
    N, T = 3, 4
    hidden = torch.randn(N, T, D, generator=generator).to(dtype)
    weight = (torch.randn(V, D, generator=generator) / 2).to(dtype)
    bias = torch.randn(V, generator=generator).to(dtype) if with_bias else None
    targets = torch.randint(0, V, (N, T), generator=generator, dtype=torch.int32)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    return hidden, weight, bias, targets.masked_fill(~mask, -100), mask


def hidden_value_and_grads(fn, hidden, weight, bias, targets, mask, upstream):
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves[:2], targets, mask, lm_head_bias=leaves[2] if bias is not None else None)
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    return out.detach(), grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_sequence_logprobs_from_hidden_matches_full_logits(impl, with_bias):
    hidden, weight, bias, targets, mask = make_hidden_batch(torch.float32, seed=7, with_bias=with_bias)
    upstream = torch.tensor([1.0, -0.5, 2.0])

    def chunked(h, w, y, m, lm_head_bias):  # 9 kept tokens in chunks of 4: two full, one partial
        return sequence_logprobs_from_hidden(h, w, y, m, lm_head_bias=lm_head_bias, chunk_tokens=4, impl=impl)

    out, grads = hidden_value_and_grads(chunked, hidden, weight, bias, targets, mask, upstream)
    expected, expected_grads = hidden_value_and_grads(
        sequence_logprobs_from_hidden_reference, hidden, weight, bias, targets, mask, upstream
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))


def test_sequence_logprobs_from_hidden_bf16_triton():
    hidden, weight, bias, targets, mask = make_hidden_batch(torch.bfloat16, seed=8, with_bias=True)
    upstream = torch.tensor([0.5, 1.0, -1.0])

    def chunked(h, w, y, m, lm_head_bias):
        return sequence_logprobs_from_hidden(
            h, w, y, m, lm_head_bias=lm_head_bias, chunk_tokens=5, impl="triton"
        )

    out, grads = hidden_value_and_grads(chunked, hidden, weight, bias, targets, mask, upstream)
    expected, expected_grads = hidden_value_and_grads(
        sequence_logprobs_from_hidden_reference, hidden, weight, bias, targets, mask, upstream
    )
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=5e-2)
    for grad, expected_grad in zip(grads, expected_grads):
        grad_scale = expected_grad.abs().max().item()
        torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=2e-2, atol=2e-2 * grad_scale)


def test_sequence_logprobs_from_hidden_gradcheck_float64():
    hidden, weight, bias, targets, mask = make_hidden_batch(torch.float64, seed=9, with_bias=True, D=3, V=11)
    inputs = tuple(x.requires_grad_(True) for x in (hidden, weight, bias))

    def chunked(h, w, b):
        return sequence_logprobs_from_hidden(
            h, w, targets, mask, lm_head_bias=b, chunk_tokens=4, impl="torch"
        )

    assert torch.autograd.gradcheck(chunked, inputs)


def test_sequence_logprobs_from_hidden_bad_inputs():
    hidden, weight, bias, targets, mask = make_hidden_batch(torch.float32, seed=10, with_bias=True)
    with pytest.raises(ValueError, match=r"\(V, D\)"):
        sequence_logprobs_from_hidden(hidden, weight[:, :5], targets, mask)
    with pytest.raises(ValueError, match="lm_head_weight is torch.float64"):
        sequence_logprobs_from_hidden(hidden, weight.double(), targets, mask)
    with pytest.raises(ValueError, match="chunk_tokens"):
        sequence_logprobs_from_hidden(hidden, weight, targets, mask, chunk_tokens=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sequence_logprobs_from_hidden(hidden, weight, targets.masked_fill(mask, 90), mask)
