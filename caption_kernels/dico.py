"""DiCO's loss and the sequence log-probabilities it is built from: Triton kernels, PyTorch references.

DiCO (arXiv 2408.14547) fine-tunes a captioner against a frozen copy of itself. For an image x
with k candidate captions y_1 .. y_k (beam search), rewards r_i (CLIP-S or PAC-S of each caption)
and summed token log-probabilities under the policy pi_theta and the frozen reference pi_ref:

    s_i     = log pi_theta(y_i | x) - log pi_ref(y_i | x)           implied reward / beta
    w       = argmax_i r_i                                          first index on ties
    gamma_j = exp(tau (r_w - r_j)) / sum_{l != w} exp(tau (r_w - r_l))    for j != w
    z       = beta * (s_w - sum_{j != w} gamma_j s_j)               the margin
    loss    = mean over images of  -log sigmoid(z)                  beta = 0.2, tau = 300

The ops, each with a PyTorch reference (`*_reference`, same signature) and a Triton path:

    dico_loss(policy_logps, ref_logps, rewards)        (B, k) x 3 -> scalar
    sequence_logprobs(logits, targets, mask)           (N, T, V) logits -> (N,) sum_t log p(y_t)
    sequence_logprobs_from_hidden(hidden, W, ...)      the same from (N, T, D) hidden states and
                                                       the LM head, chunked: no (N, T, V) logits

plus `dico_stats`, the per-row numbers a training log wants. `impl="auto"` runs Triton on CUDA
tensors when Triton imports and the reference otherwise; `impl="triton"` also runs on CPU
tensors under TRITON_INTERPRET=1 (that is how the tests exercise the kernels).

A DiCO step, with the log-probs of the k candidates of B images flattened to N = B k sequences:

    policy_logps = sequence_logprobs(policy_logits, tokens, mask).view(B, k)
    with torch.no_grad():
        ref_logps = sequence_logprobs(ref_logits, tokens, mask).view(B, k)
    loss = dico_loss(policy_logps, ref_logps, rewards, valid=valid)

This file imports only torch and triton: copy it into another codebase as it is.


## The gradient of the DiCO loss

Write L_b = -log sigmoid(z_b) = softplus(-z_b) for one row (one image), so dL_b/dz_b = -sigmoid(-z_b).
The margin is linear in the s's:

    dz/ds_w = beta,      dz/ds_j = -beta * gamma_j   (j a loser),   0 for excluded candidates

so, with n_usable the number of rows that enter the mean (next section),

    dL/ds_w = -beta * sigmoid(-z) / n_usable
    dL/ds_j = +beta * sigmoid(-z) * gamma_j / n_usable

that is dL/ds_{b,i} = beta * sigmoid(-z_b) / n_usable * (gamma_{b,i} - [i == w_b]), one fused
expression per element. sigmoid(-z) is the weight DPO-style losses put on a row: close to 1 while
the policy still prefers the losers, decaying to 0 once the winner leads by a wide margin.
Since s = log pi_theta - log pi_ref, dL/d policy_logps = dL/ds and the reference gets nothing.

## Why gamma (and the winner) are constants

The rewards are scores of discrete, already generated captions by a frozen evaluator: no path
leads from theta to r, so gamma (a function of r only) and the winner index (an argmax, piecewise
constant) carry no gradient. The reference log-probabilities come from the frozen pi_ref. Both
paths therefore treat `ref_logps` and `rewards` as constants: no gradient is returned for them,
even when they require one (the reference implementation detaches them to match).

## A stable gamma for any tau and any reward gap

tau = 300 and a reward gap of 0.5 give exp(150): overflow in float32. The softmax is unchanged
by a common factor, so multiply numerator and denominator by exp(-tau (r_w - r_min)), r_min the
smallest reward among the losers:

    gamma_j = exp(tau (r_min - r_j)) / sum_{l != w} exp(tau (r_min - r_l))

r_w has cancelled: the winner's reward does not matter to the weights at all. Every exponent is
now <= 0, the worst loser contributes exactly exp(0) = 1, so the denominator lies in [1, k - 1]:
no overflow, no 0/0, whatever the gap (even infinite rewards: a loser tied with r_min gets exponent
0 by definition, never inf - inf). Note the weights favour the *worst* losers: the loss pushes
hardest against the captions the evaluator likes least.

## A stable softplus and sigmoid

    -log sigmoid(z) = log(1 + e^{-z}) = max(-z, 0) + log1p(e^{-|z|})

never exponentiates a positive number. Triton has no log1p, so for tiny u = e^{-|z|} (< 1e-4)
the kernel uses log1p(u) = u - u^2/2 + O(u^3) instead of log(1 + u), which would round to 0.
The backward needs sigmoid(-z) = e^{-|z|} / (1 + e^{-|z|}) for z >= 0 and 1 / (1 + e^{-|z|})
for z < 0: again only e^{-|z|} <= 1 is computed.

## Excluded candidates and the mean's denominator

`valid` (B, k) bool excludes candidates (duplicate beams, failed generations); their log-probs
and rewards are never read, so -inf or NaN there is harmless. A row needs a winner and at least
one loser, i.e. at least 2 valid candidates; rows with fewer are *skipped*: they add nothing to
the loss and nothing to the gradient. The loss is the mean over the usable rows,

    loss = sum_{usable b} L_b / n_usable,

and 0 (still connected to the graph, with zero gradient) when no row is usable: never NaN.
`dico_stats` reports how many rows were skipped. Log-probs of valid candidates must be finite
(an infinite one makes its row's loss inf or NaN, which a training loop should stop on). Rewards
may be +-inf (gamma stays well defined, see above) but not NaN: the two paths treat a NaN reward
differently, so mark a candidate whose score failed as invalid.

## Online log-sum-exp over the vocabulary

log p(y_t) = x[y_t] - log sum_v exp(x_v), with x the (V,) logits of one token. Materialising
log_softmax in float32 costs 4 N T V bytes (5.3 GiB at N = 320, T = 30, V = 49409, six times the
bf16 logits). The kernel instead streams the row in blocks of BLOCK_V, keeping a running maximum
m and a running sum d = sum_v exp(x_v - m): for a new block with maximum m_blk,

    m' = max(m, m_blk),     d' = d * exp(m - m') + sum_{v in block} exp(x_v - m')

and lse = m + log d at the end: one read of the logits, one exp per element, two floats of state.
(When every logit seen so far is -inf, the shift is taken as 0 so that no -inf - (-inf) occurs.)
Only (N, T) float32 numbers are written: the masked token log-prob and the lse for the backward.

## Its backward

d log p(y_t) / d x_v = [v == y_t] - softmax(x)_v = [v == y_t] - exp(x_v - lse). With g_n the
upstream gradient of the (N,) output and the mask weight m_{n,t}:

    d logits[n, t, v] = g_n * m_{n,t} * ([v == y_{n,t}] - exp(x_{n,t,v} - lse_{n,t}))

The backward kernel recomputes exp(x - lse) block by block from the saved lse and writes this
directly in the logits' dtype: the gradient tensor itself is the only (N, T, V) allocation. Masked
tokens (m = 0) get an exact zero gradient without reading their logits, so padding may hold
anything, including an out-of-vocabulary target id such as -100.

## Kernel layout

dico_loss: the forward is one program streaming the batch in blocks of BLOCK_B rows x BLOCK_K
columns (k padded to a power of two); it keeps the loss sum and the usable count in registers and
writes the mean itself, so the whole forward is one launch with no atomics and a deterministic
sum. DiCO batches are images per step (8 to a few thousand): tens of microseconds on one SM. The
backward needs no reduction: one launch, BLOCK_B rows per program, each row's winner and gamma
recomputed from the rewards (cheaper than saving them). sequence_logprobs: one program per
(n, t) token in both directions, then a sum over t of the (N, T) token log-probs in PyTorch.
sequence_logprobs_from_hidden: see its section below.
"""

import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

IMPLS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DICO_MAX_K = 4096  # the Triton path holds a (BLOCK_B, next_pow2(k)) tile in registers
DICO_TILE_ELEMENTS = 2048  # BLOCK_B * BLOCK_K per program: a few registers per thread
SEQUENCE_BLOCK_V = 4096  # vocabulary slice per loop step: 8 KiB of bf16 logits


# ------------------------------------------------------------------------------------------------
# Input checks and dispatch
# ------------------------------------------------------------------------------------------------


def _check_dico_inputs(policy_logps, ref_logps, rewards, valid):
    named = {"policy_logps": policy_logps, "ref_logps": ref_logps, "rewards": rewards}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"dico_loss: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"dico_loss: {name} must be (B, k), got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"dico_loss: {name} must be a floating tensor, got {tensor.dtype}")
    shape = policy_logps.shape
    for name, tensor in named.items():
        if tensor.shape != shape:
            raise ValueError(
                f"dico_loss: {name} has shape {tuple(tensor.shape)} but policy_logps has {tuple(shape)}"
            )
        if tensor.device != policy_logps.device:
            raise ValueError(
                f"dico_loss: {name} is on {tensor.device} but policy_logps is on {policy_logps.device}"
            )
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"dico_loss: needs at least one row and one candidate, got shape {tuple(shape)}")
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            raise TypeError("dico_loss: valid must be a bool tensor (True = candidate takes part) or None")
        if valid.shape != shape:
            raise ValueError(
                f"dico_loss: valid has shape {tuple(valid.shape)} but the inputs have {tuple(shape)}"
            )
        if valid.device != policy_logps.device:
            raise ValueError(
                f"dico_loss: valid is on {valid.device} but policy_logps is on {policy_logps.device}"
            )


def _check_targets_and_mask(op, targets, mask, N, T, V, device):
    if not isinstance(targets, torch.Tensor) or targets.shape != (N, T):
        raise ValueError(f"{op}: targets must be (N, T) = {(N, T)}, got {getattr(targets, 'shape', targets)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: targets must be int32 or int64 token ids, got {targets.dtype}")
    if not isinstance(mask, torch.Tensor) or mask.shape != (N, T):
        raise ValueError(f"{op}: mask must be (N, T) = {(N, T)}, got {getattr(mask, 'shape', mask)}")
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise TypeError(f"{op}: mask must be bool or floating, got {mask.dtype}")
    for name, tensor in (("targets", targets), ("mask", mask)):
        if tensor.device != device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but the logits' inputs are on {device}")
    # One reduction and a host sync: an out-of-range id would otherwise be a silent wrong read.
    out_of_vocab = (mask != 0) & ((targets < 0) | (targets >= V))
    if out_of_vocab.any():
        n, t = out_of_vocab.nonzero()[0].tolist()
        raise ValueError(
            f"{op}: targets[{n}, {t}] = {targets[n, t].item()} is outside the vocabulary "
            f"[0, {V}) at an unmasked position; mask padding out (mask = 0) or fix the token ids"
        )


def _check_sequence_inputs(logits, targets, mask):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(
            f"sequence_logprobs: logits must be an (N, T, V) tensor, got {getattr(logits, 'shape', logits)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"sequence_logprobs: logits must be floating (fp32/bf16/fp16), got {logits.dtype}")
    N, T, V = logits.shape
    if N == 0 or T == 0 or V == 0:
        raise ValueError(f"sequence_logprobs: empty logits of shape {tuple(logits.shape)}")
    _check_targets_and_mask("sequence_logprobs", targets, mask, N, T, V, logits.device)


def _check_hidden_inputs(hidden, weight, bias, targets, mask, chunk_tokens):
    op = "sequence_logprobs_from_hidden"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(
            f"{op}: hidden must be a floating (N, T, D) tensor, got {getattr(hidden, 'shape', hidden)}"
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"{op}: lm_head_weight must be (V, D) with D = {hidden.shape[2]}, "
            f"got {getattr(weight, 'shape', weight)}"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"{op}: lm_head_bias must be (V,) = ({weight.shape[0]},) or None")
    for name, tensor in (("lm_head_weight", weight), ("lm_head_bias", bias)):
        if tensor is not None and (tensor.dtype != hidden.dtype or tensor.device != hidden.device):
            raise ValueError(
                f"{op}: {name} is {tensor.dtype} on {tensor.device} "
                f"but hidden is {hidden.dtype} on {hidden.device}"
            )
    if min(hidden.shape) == 0 or weight.shape[0] == 0:
        raise ValueError(
            f"{op}: empty input, hidden {tuple(hidden.shape)}, lm_head_weight {tuple(weight.shape)}"
        )
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"{op}: chunk_tokens must be a positive int, got {chunk_tokens!r}")
    N, T, _ = hidden.shape
    _check_targets_and_mask(op, targets, mask, N, T, weight.shape[0], hidden.device)


def _use_triton(impl: str, op: str, tensors, float_tensors) -> bool:
    """Decide between the Triton path and the PyTorch reference (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    dtypes_ok = all(t.dtype in TRITON_DTYPES for t in float_tensors)
    if impl == "auto":
        return HAS_TRITON and on_cuda and dtypes_ok
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: impl='triton' but triton does not import; use impl='torch'")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU)"
        )
    if not dtypes_ok:
        raise TypeError(f"{op}: the Triton path takes fp32/bf16/fp16 inputs; use impl='torch' for float64")
    return True


# ------------------------------------------------------------------------------------------------
# DiCO loss: PyTorch reference
# ------------------------------------------------------------------------------------------------


def _dico_rows_torch(policy_logps, ref_logps, rewards, valid, beta, tau):
    """The per-row quantities of the DiCO loss, the same way the kernels compute them.

    Returns winner (B,) long (k when the row has no valid candidate), is_winner (B, k) bool,
    gamma (B, k) (0 off the losers), usable (B,) bool, margin z (B,) (0 on skipped rows).
    Math in float32, or float64 when the log-probs are float64 (for gradcheck).
    """
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    B, k = policy_logps.shape
    if valid is None:
        valid = torch.ones(B, k, dtype=torch.bool, device=policy_logps.device)
    columns = torch.arange(k, device=policy_logps.device)  # (k,)

    with torch.no_grad():  # winner and gamma are functions of the rewards: constants
        rewards = torch.where(valid, rewards.to(dtype), 0.0)  # (B, k), excluded entries never read
        best = torch.where(valid, rewards, -math.inf).amax(dim=1, keepdim=True)  # (B, 1)
        is_best = valid & (rewards == best)  # (B, k)
        winner = torch.where(is_best, columns, k).amin(dim=1)  # (B,) first index on ties
        is_winner = columns == winner[:, None]  # (B, k)
        is_loser = valid & ~is_winner  # (B, k)
        usable = is_loser.any(dim=1)  # (B,) at least 2 valid candidates
        # gamma_j = softmax over losers of tau (r_w - r_j) = exp(tau (r_min - r_j)) / sum(...)
        worst = torch.where(is_loser, rewards, math.inf).amin(dim=1, keepdim=True)  # (B, 1)
        exponent = torch.where(rewards == worst, 0.0, tau * (worst - rewards))  # (B, k), <= 0 on losers
        weights = torch.where(is_loser, exponent, -math.inf).exp()  # (B, k), 0 off the losers
        gamma = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, k)

    # s = log pi_theta - log pi_ref; excluded entries (maybe -inf - -inf) are replaced, not masked
    # afterwards, so neither the value nor the gradient ever sees a NaN.
    policy = torch.where(valid, policy_logps.to(dtype), 0.0)  # (B, k)
    ref = torch.where(valid, ref_logps.detach().to(dtype), 0.0)  # (B, k), a constant
    s = policy - ref  # (B, k)
    s_winner = torch.where(is_winner, s, 0.0).sum(dim=1)  # (B,)
    s_losers = (gamma * s).sum(dim=1)  # (B,)
    margin = torch.where(usable, beta * (s_winner - s_losers), 0.0)  # (B,) z
    return winner, is_winner, gamma, usable, margin


def dico_loss_reference(policy_logps, ref_logps, rewards, *, beta=0.2, tau=300.0, valid=None):
    """DiCO loss in plain PyTorch; same contract as `dico_loss` (float64 in, float64 math)."""
    _check_dico_inputs(policy_logps, ref_logps, rewards, valid)
    _, _, _, usable, margin = _dico_rows_torch(policy_logps, ref_logps, rewards, valid, beta, tau)
    row_loss = torch.where(usable, F.softplus(-margin), 0.0)  # (B,) -log sigmoid(z), stable
    return row_loss.sum() / usable.sum().clamp_min(1)


class DicoStats(NamedTuple):
    """Per-row DiCO statistics for a training log (tensors, so that logging costs no sync)."""

    winner: torch.Tensor  # (B,) long: index of the best caption, -1 when no candidate is valid
    gamma: torch.Tensor  # (B, k): loser weights, 0 at the winner and at excluded candidates
    margin: torch.Tensor  # (B,): z = beta (s_w - sum_j gamma_j s_j), 0 on skipped rows
    row_loss: torch.Tensor  # (B,): -log sigmoid(z), 0 on skipped rows
    usable: torch.Tensor  # (B,) bool: the row has >= 2 valid candidates and enters the mean
    correct: torch.Tensor  # (B,) bool: implied reward of the winner beats the weighted losers (z > 0)
    n_skipped: torch.Tensor  # () long: rows with fewer than 2 valid candidates

    def summary(self) -> dict:
        """Python numbers for a logger: mean loss, reward accuracy and margin over usable rows."""
        n_usable = max(int(self.usable.sum()), 1)
        return {
            "loss": float(self.row_loss.sum()) / n_usable,
            "reward_accuracy": float(self.correct.sum()) / n_usable,
            "margin": float(self.margin.sum()) / n_usable,
            "n_skipped": int(self.n_skipped),
        }


@torch.no_grad()
def dico_stats(policy_logps, ref_logps, rewards, *, beta=0.2, tau=300.0, valid=None) -> DicoStats:
    """Per-row statistics of the DiCO loss (PyTorch, no gradient, any device).

    `row_loss[usable].mean()` equals `dico_loss(...)` with the same arguments.
    """
    _check_dico_inputs(policy_logps, ref_logps, rewards, valid)
    winner, _, gamma, usable, margin = _dico_rows_torch(policy_logps, ref_logps, rewards, valid, beta, tau)
    k = policy_logps.shape[1]
    return DicoStats(
        winner=torch.where(winner == k, -1, winner),
        gamma=gamma,
        margin=margin,
        row_loss=torch.where(usable, F.softplus(-margin), 0.0),
        usable=usable,
        correct=usable & (margin > 0),
        n_skipped=(~usable).sum(),
    )


# ------------------------------------------------------------------------------------------------
# DiCO loss: Triton kernels
# ------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _dico_row_block(
        policy_ptr, ref_ptr, rewards_ptr, valid_ptr, rows, columns, B, k,
        stride_pb, stride_pk, stride_qb, stride_qk, stride_rb, stride_rk, stride_vb, stride_vk,
        beta, tau, HAS_VALID: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """is_winner (BLOCK_B, BLOCK_K), gamma (BLOCK_B, BLOCK_K), usable and margin (BLOCK_B,)."""
        rows_2d = rows[:, None].to(tl.int64)  # (BLOCK_B, 1)
        columns_2d = columns[None, :]  # (1, BLOCK_K)
        in_bounds = (rows_2d < B) & (columns_2d < k)  # (BLOCK_B, BLOCK_K)
        if HAS_VALID:
            flags = tl.load(valid_ptr + rows_2d * stride_vb + columns_2d * stride_vk, mask=in_bounds, other=0)
            valid = in_bounds & (flags != 0)
        else:
            valid = in_bounds
        # Excluded candidates are never loaded: their -inf / NaN cannot reach the arithmetic.
        rewards = tl.load(rewards_ptr + rows_2d * stride_rb + columns_2d * stride_rk, mask=valid, other=0.0)
        rewards = rewards.to(tl.float32)
        policy = tl.load(policy_ptr + rows_2d * stride_pb + columns_2d * stride_pk, mask=valid, other=0.0)
        ref = tl.load(ref_ptr + rows_2d * stride_qb + columns_2d * stride_qk, mask=valid, other=0.0)
        s = policy.to(tl.float32) - ref.to(tl.float32)  # (BLOCK_B, BLOCK_K), 0 where excluded

        # w = argmax_i r_i over valid candidates, first index on ties (BLOCK_K: no valid candidate)
        best = tl.max(tl.where(valid, rewards, float("-inf")), axis=1)  # (BLOCK_B,)
        is_best = valid & (rewards == best[:, None])
        winner = tl.min(tl.where(is_best, columns_2d, BLOCK_K), axis=1)  # (BLOCK_B,)
        is_winner = columns_2d == winner[:, None]
        is_loser = valid & (columns_2d != winner[:, None])
        usable = tl.sum(is_loser.to(tl.int32), axis=1) > 0  # (BLOCK_B,) >= 2 valid candidates

        # gamma_j = exp(tau (r_min - r_j)) / sum_l exp(tau (r_min - r_l)): exponents <= 0, the
        # worst loser exactly 1, so the denominator is >= 1 on usable rows (0 on skipped ones).
        worst = tl.min(tl.where(is_loser, rewards, float("inf")), axis=1)  # (BLOCK_B,)
        exponent = tl.where(rewards == worst[:, None], 0.0, tau * (worst[:, None] - rewards))
        weights = tl.exp(tl.where(is_loser, exponent, float("-inf")))  # 0 off the losers
        gamma = weights / tl.maximum(tl.sum(weights, axis=1), 1.0)[:, None]

        # z = beta (s_w - sum_j gamma_j s_j)
        s_winner = tl.sum(tl.where(is_winner, s, 0.0), axis=1)
        s_losers = tl.sum(gamma * s, axis=1)
        margin = tl.where(usable, beta * (s_winner - s_losers), 0.0)
        return is_winner, gamma, usable, margin

    @triton.jit
    def _dico_forward_kernel(
        policy_ptr, ref_ptr, rewards_ptr, valid_ptr, loss_ptr, n_usable_ptr, B, k,
        stride_pb, stride_pk, stride_qb, stride_qk, stride_rb, stride_rk, stride_vb, stride_vk,
        beta, tau, HAS_VALID: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One program: streams all B rows, writes the mean loss and the usable-row count."""
        columns = tl.arange(0, BLOCK_K)
        loss_sums = tl.zeros((BLOCK_B,), dtype=tl.float32)  # per-lane partial sums, summed at the end
        usable_counts = tl.zeros((BLOCK_B,), dtype=tl.int32)
        for row_start in range(0, B, BLOCK_B):
            rows = row_start + tl.arange(0, BLOCK_B)
            _, _, usable, margin = _dico_row_block(
                policy_ptr, ref_ptr, rewards_ptr, valid_ptr, rows, columns, B, k,
                stride_pb, stride_pk, stride_qb, stride_qk, stride_rb, stride_rk, stride_vb, stride_vk,
                beta, tau, HAS_VALID, BLOCK_K,
            )
            # -log sigmoid(z) = max(-z, 0) + log1p(e^{-|z|}); log1p by its series where 1 + u rounds
            u = tl.exp(-tl.abs(margin))
            log1p_u = tl.where(u < 1e-4, u * (1.0 - 0.5 * u), tl.log(1.0 + u))
            row_loss = tl.maximum(-margin, 0.0) + log1p_u
            loss_sums += tl.where(usable, row_loss, 0.0)
            usable_counts += usable.to(tl.int32)
        n_usable = tl.sum(usable_counts, axis=0)
        tl.store(loss_ptr, tl.sum(loss_sums, axis=0) / tl.maximum(n_usable, 1).to(tl.float32))
        tl.store(n_usable_ptr, n_usable)

    @triton.jit
    def _dico_backward_kernel(
        policy_ptr, ref_ptr, rewards_ptr, valid_ptr, grad_loss_ptr, n_usable_ptr, grad_policy_ptr, B, k,
        stride_pb, stride_pk, stride_qb, stride_qk, stride_rb, stride_rk, stride_vb, stride_vk,
        beta, tau, HAS_VALID: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """BLOCK_B rows per program: d policy = c_b (gamma - onehot(w)), c_b = g beta sigmoid(-z) / n."""
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        columns = tl.arange(0, BLOCK_K)
        is_winner, gamma, usable, margin = _dico_row_block(
            policy_ptr, ref_ptr, rewards_ptr, valid_ptr, rows, columns, B, k,
            stride_pb, stride_pk, stride_qb, stride_qk, stride_rb, stride_rk, stride_vb, stride_vk,
            beta, tau, HAS_VALID, BLOCK_K,
        )
        grad_loss = tl.load(grad_loss_ptr).to(tl.float32)  # read on the device: no host sync
        n_usable = tl.maximum(tl.load(n_usable_ptr), 1).to(tl.float32)
        # sigmoid(-z) through u = e^{-|z|} <= 1: u / (1 + u) for z >= 0, 1 / (1 + u) for z < 0
        u = tl.exp(-tl.abs(margin))
        sigmoid_neg_margin = tl.where(margin >= 0, u, 1.0) / (1.0 + u)
        row_scale = tl.where(usable, grad_loss * beta * sigmoid_neg_margin / n_usable, 0.0)  # (BLOCK_B,)
        grad = row_scale[:, None] * (gamma - is_winner.to(tl.float32))  # (BLOCK_B, BLOCK_K)
        rows_2d = rows[:, None].to(tl.int64)
        in_bounds = (rows_2d < B) & (columns[None, :] < k)
        offsets = rows_2d * k + columns[None, :]  # grad_policy is a fresh contiguous (B, k)
        tl.store(grad_policy_ptr + offsets, grad.to(grad_policy_ptr.dtype.element_ty), mask=in_bounds)


def _dico_launch_config(k):
    block_k = max(triton.next_power_of_2(k), 2)
    block_b = max(DICO_TILE_ELEMENTS // block_k, 1)
    return block_b, block_k


def _dico_strides(policy_logps, ref_logps, rewards, valid):
    # When valid is None the kernel never reads it; rewards stands in as a harmless pointer.
    valid_or_dummy = rewards if valid is None else valid
    strides = (*policy_logps.stride(), *ref_logps.stride(), *rewards.stride(), *valid_or_dummy.stride())
    return valid_or_dummy, strides


class DicoLossTriton(torch.autograd.Function):
    """Triton DiCO loss: one forward launch, one backward launch; gradient to policy_logps only."""

    @staticmethod
    def forward(ctx, policy_logps, ref_logps, rewards, valid, beta, tau):
        B, k = policy_logps.shape
        if k > DICO_MAX_K:
            raise ValueError(
                f"dico_loss: the Triton path supports k <= {DICO_MAX_K}, got k = {k}; use impl='torch'"
            )
        block_b, block_k = _dico_launch_config(k)
        valid_or_dummy, strides = _dico_strides(policy_logps, ref_logps, rewards, valid)
        loss = torch.empty((), dtype=torch.float32, device=policy_logps.device)
        n_usable = torch.empty((), dtype=torch.int32, device=policy_logps.device)
        _dico_forward_kernel[(1,)](
            policy_logps, ref_logps, rewards, valid_or_dummy, loss, n_usable, B, k, *strides,
            float(beta), float(tau), HAS_VALID=valid is not None, BLOCK_B=block_b, BLOCK_K=block_k,
        )
        ctx.save_for_backward(policy_logps, ref_logps, rewards, valid_or_dummy, n_usable)
        ctx.has_valid, ctx.beta, ctx.tau = valid is not None, float(beta), float(tau)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        policy_logps, ref_logps, rewards, valid_or_dummy, n_usable = ctx.saved_tensors
        B, k = policy_logps.shape
        block_b, block_k = _dico_launch_config(k)
        _, strides = _dico_strides(policy_logps, ref_logps, rewards, valid_or_dummy)
        grad_policy = torch.empty((B, k), dtype=policy_logps.dtype, device=policy_logps.device)
        _dico_backward_kernel[(triton.cdiv(B, block_b),)](
            policy_logps, ref_logps, rewards, valid_or_dummy, grad_loss, n_usable, grad_policy,
            B, k, *strides,
            ctx.beta, ctx.tau, HAS_VALID=ctx.has_valid, BLOCK_B=block_b, BLOCK_K=block_k,
        )
        return grad_policy, None, None, None, None, None


def dico_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float = 0.2,
    tau: float = 300.0,
    valid: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """DiCO loss: mean over usable rows of -log sigmoid(beta (s_w - sum_j gamma_j s_j)).

    policy_logps, ref_logps: (B, k) summed caption log-probs under the policy and the frozen
        reference (fp32/bf16/fp16; float64 runs the reference). s = policy_logps - ref_logps.
    rewards: (B, k) evaluator scores; the winner is the argmax (first index on ties).
    valid: optional (B, k) bool; False excludes a candidate. Rows with < 2 valid candidates are
        skipped: they do not enter the mean, whose denominator is the number of usable rows.
    Returns a float32 scalar (float64 for float64 inputs on the reference). Gradient flows to
    policy_logps only; ref_logps and rewards are constants. Never NaN for finite valid inputs:
    0 when no row is usable. Per-row numbers: `dico_stats`.
    """
    _check_dico_inputs(policy_logps, ref_logps, rewards, valid)
    tensors = [policy_logps, ref_logps, rewards] + ([] if valid is None else [valid])
    if _use_triton(impl, "dico_loss", tensors, [policy_logps, ref_logps]):  # rewards: any float, read as fp32
        return DicoLossTriton.apply(policy_logps, ref_logps.detach(), rewards.detach(), valid, beta, tau)
    return dico_loss_reference(policy_logps, ref_logps, rewards, beta=beta, tau=tau, valid=valid)


# ------------------------------------------------------------------------------------------------
# Sequence log-probabilities: PyTorch reference
# ------------------------------------------------------------------------------------------------


def sequence_logprobs_reference(logits, targets, mask, *, rows_per_chunk=64):
    """sum_t log_softmax(logits[n, t])[targets[n, t]] * mask[n, t] in plain PyTorch, (N,).

    Works in float32 (float64 for float64 logits), `rows_per_chunk` sequences at a time so that the
    forward's float32 copy is bounded; under autograd the chunks' float32 copies are still kept for
    the backward, which is the memory the Triton path removes. Masked positions contribute exactly
    0 whatever their logits or target ids hold.
    """
    _check_sequence_inputs(logits, targets, mask)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    N = logits.shape[0]
    sums = []
    for start in range(0, N, rows_per_chunk):
        chunk_mask = mask[start : start + rows_per_chunk].to(dtype)  # (n, T)
        keep = chunk_mask != 0
        # Masked rows are replaced by zeros *before* the log-sum-exp: a -inf or NaN there would
        # otherwise turn the backward's 0 * softmax into NaN.
        chunk = logits[start : start + rows_per_chunk].to(dtype)
        chunk = torch.where(keep[..., None], chunk, 0.0)  # (n, T, V)
        chunk_targets = torch.where(keep, targets[start : start + rows_per_chunk], 0).long()  # (n, T)
        # log p(y_t) = x[y_t] - logsumexp(x)
        target_logits = chunk.gather(-1, chunk_targets[..., None])[..., 0]  # (n, T)
        token_logps = target_logits - torch.logsumexp(chunk, dim=-1)  # (n, T)
        sums.append(torch.where(keep, token_logps * chunk_mask, 0.0).sum(dim=1))  # (n,)
    return torch.cat(sums)


# ------------------------------------------------------------------------------------------------
# Sequence log-probabilities: Triton kernels
# ------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _sequence_logprobs_forward_kernel(
        logits_ptr, targets_ptr, mask_ptr, token_logps_ptr, lse_ptr, T, V,
        stride_ln, stride_lt, stride_lv, stride_tn, stride_tt, stride_mn, stride_mt,
        BLOCK_V: tl.constexpr,
    ):
        """One program per token (n, t): online log-sum-exp over V, then mask * (x[y] - lse)."""
        token = tl.program_id(0)
        n = (token // T).to(tl.int64)
        t = (token % T).to(tl.int64)
        weight = tl.load(mask_ptr + n * stride_mn + t * stride_mt).to(tl.float32)
        keep = weight != 0.0
        n_read = tl.where(keep, V, 0)  # vocabulary entries to read: none for a masked token
        row_ptr = logits_ptr + n * stride_ln + t * stride_lt
        vocab = tl.arange(0, BLOCK_V)

        running_max = float("-inf")  # m
        running_sum = 0.0  # d = sum exp(x - m)
        for start in range(0, V, BLOCK_V):
            columns = start + vocab
            x = tl.load(row_ptr + columns * stride_lv, mask=columns < n_read, other=float("-inf"))
            x = x.to(tl.float32)  # (BLOCK_V,)
            # m' = max(m, max x);  d' = d e^{m - m'} + sum e^{x - m'}  (shift 0 while all is -inf)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
            running_max = new_max
        # d >= 1 once a finite logit was seen (the maximum adds e^0 = 1), so the clamp only touches
        # rows without one, whose lse is -inf either way; masked tokens get lse = 0, no inf.
        lse = tl.where(keep, running_max + tl.log(tl.maximum(running_sum, 1.0)), 0.0)

        target = tl.load(targets_ptr + n * stride_tn + t * stride_tt).to(tl.int64)
        target_logit = tl.load(row_ptr + target * stride_lv, mask=keep, other=0.0).to(tl.float32)
        tl.store(token_logps_ptr + token, weight * (target_logit - lse))  # exactly 0 when masked
        tl.store(lse_ptr + token, lse)

    @triton.jit
    def _sequence_logprobs_backward_kernel(
        logits_ptr, targets_ptr, mask_ptr, lse_ptr, grad_out_ptr, grad_logits_ptr, T, V,
        stride_ln, stride_lt, stride_lv, stride_tn, stride_tt, stride_mn, stride_mt, stride_g,
        BLOCK_V: tl.constexpr,
    ):
        """d logits[n, t, v] = g_n m_{n,t} ([v == y] - exp(x_v - lse)), written in the logits' dtype."""
        token = tl.program_id(0)
        n = (token // T).to(tl.int64)
        t = (token % T).to(tl.int64)
        scale = tl.load(grad_out_ptr + n * stride_g).to(tl.float32)
        scale = scale * tl.load(mask_ptr + n * stride_mn + t * stride_mt).to(tl.float32)
        n_read = tl.where(scale != 0.0, V, 0)  # zero rows are written without reading the logits
        lse = tl.load(lse_ptr + token)
        target = tl.load(targets_ptr + n * stride_tn + t * stride_tt).to(tl.int64)
        row_ptr = logits_ptr + n * stride_ln + t * stride_lt
        grad_row_ptr = grad_logits_ptr + token.to(tl.int64) * V  # grad_logits: fresh contiguous (N, T, V)
        vocab = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            columns = start + vocab
            in_vocab = columns < V
            x = tl.load(row_ptr + columns * stride_lv, mask=columns < n_read, other=float("-inf"))
            softmax = tl.exp(x.to(tl.float32) - lse)  # 0 wherever the load was masked
            grad = scale * ((columns == target).to(tl.float32) - softmax)
            tl.store(grad_row_ptr + columns, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_vocab)


def _sequence_forward_launch(logits, targets, mask, block_v):
    """token_logps = mask * log p(target) and lse, both (N, T) float32, for (N, T, V) logits."""
    N, T, V = logits.shape
    token_logps = torch.empty((N, T), dtype=torch.float32, device=logits.device)
    lse = torch.empty((N, T), dtype=torch.float32, device=logits.device)
    _sequence_logprobs_forward_kernel[(N * T,)](
        logits, targets, mask, token_logps, lse, T, V,
        *logits.stride(), *targets.stride(), *mask.stride(), BLOCK_V=block_v, num_warps=8,
    )
    return token_logps, lse


def _sequence_backward_launch(logits, targets, mask, lse, grad_out, grad_logits, block_v):
    """grad_logits (contiguous (N, T, V)) = grad_out[n] * mask * (onehot - softmax).

    Each program reads a block of logits before it writes the same block of gradient, so
    grad_logits may be the (contiguous) logits tensor itself: the chunked LM-head path below
    overwrites its recomputed logits chunk in place.
    """
    N, T, V = logits.shape
    _sequence_logprobs_backward_kernel[(N * T,)](
        logits, targets, mask, lse, grad_out, grad_logits, T, V,
        *logits.stride(), *targets.stride(), *mask.stride(), grad_out.stride(0),
        BLOCK_V=block_v, num_warps=8,
    )
    return grad_logits


def _sequence_block_v(V):
    return min(SEQUENCE_BLOCK_V, triton.next_power_of_2(V))


class SequenceLogprobsTriton(torch.autograd.Function):
    """Triton sequence log-probs: no (N, T, V) float32 tensor; the gradient is the only big write."""

    @staticmethod
    def forward(ctx, logits, targets, mask, block_v):
        token_logps, lse = _sequence_forward_launch(logits, targets, mask, block_v)
        ctx.save_for_backward(logits, targets, mask, lse)
        ctx.block_v = block_v
        return token_logps.sum(dim=1)  # (N,)

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, mask, lse = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _sequence_backward_launch(logits, targets, mask, lse, grad_out, grad_logits, ctx.block_v)
        return grad_logits, None, None, None


def sequence_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *, impl: str = "auto"
) -> torch.Tensor:
    """Summed token log-probabilities per sequence: (N,) float32.

    logits: (N, T, V) fp32/bf16/fp16, any strides (float64 runs the reference).
    targets: (N, T) int32/int64 token ids, in [0, V) wherever mask != 0.
    mask: (N, T) bool or float weights; padding (mask = 0) contributes exactly 0.
    out[n] = sum_t mask[n, t] * log_softmax(logits[n, t])[targets[n, t]]
    The Triton path never creates an (N, T, V) float32 tensor; its backward writes
    d logits = g * mask * (onehot - softmax) directly in the logits' dtype.
    """
    _check_sequence_inputs(logits, targets, mask)
    if _use_triton(impl, "sequence_logprobs", [logits, targets, mask], [logits]):
        return SequenceLogprobsTriton.apply(logits, targets, mask, _sequence_block_v(logits.shape[2]))
    return sequence_logprobs_reference(logits, targets, mask)


# ------------------------------------------------------------------------------------------------
# Sequence log-probabilities from hidden states: the (N, T, V) logits never exist
# ------------------------------------------------------------------------------------------------
#
# At DiCO's batch sizes the logits are the largest tensor of the step: (320, 30, 49409) in bf16 is
# 0.88 GiB, and the model's forward keeps them for the backward. Starting from the decoder's last
# hidden states h (N, T, D) and the LM head W (V, D), b (V,), the same sums can be had from chunks of
# C tokens (the idea of Liger-Kernel's fused linear cross-entropy and of Cut Cross-Entropy):
#
#   forward, per chunk:   logits = h_c W^T + b                       (C, V), then freed
#                         out[n] += sum mask * (logits[y] - lse)      the kernels above, T = 1
#   backward, per chunk:  logits = h_c W^T + b                       recomputed (one more matmul)
#                         G = g_n * mask * (onehot - exp(logits - lse))   written over the logits
#                         dh_c = G W,   dW += G^T h_c,   db += sum_c G
#
# Peak memory: one (C, V) chunk plus dW in float32 instead of (N, T, V). Only unmasked tokens are
# gathered into chunks, so padding costs no matmul. The extra matmul in the backward (about a third
# more LM-head FLOPs) is the price of never storing the logits.


def _chunk_token_logps(logits, targets, weights, use_triton):
    """(C, V) logits -> weights * log p(targets) (C,) and lse (C,), float32 (float64 for float64)."""
    if use_triton:  # the sequence kernel, with the chunk seen as C sequences of one token
        token_logps, lse = _sequence_forward_launch(
            logits[:, None], targets[:, None], weights[:, None], _sequence_block_v(logits.shape[1])
        )
        return token_logps[:, 0], lse[:, 0]
    logits = logits.to(weights.dtype)  # (C, V) float32: bounded by the chunk
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    return weights * (logits.gather(-1, targets[:, None])[:, 0] - lse), lse


def _chunk_grad_logits_(logits, targets, weights, lse, grad_tokens, use_triton):
    """Overwrite the contiguous (C, V) logits with grad_tokens * weights * (onehot - softmax)."""
    if use_triton:
        return _sequence_backward_launch(
            logits[:, None], targets[:, None], weights[:, None], lse[:, None], grad_tokens, logits[:, None],
            _sequence_block_v(logits.shape[1]),
        )[:, 0]
    softmax = torch.exp(logits.to(lse.dtype) - lse[:, None])  # (C, V)
    onehot = torch.zeros_like(softmax).scatter_(1, targets[:, None], 1.0)
    return logits.copy_((grad_tokens * weights)[:, None] * (onehot - softmax))


class SequenceLogprobsFromHidden(torch.autograd.Function):
    """Chunked LM head + sequence log-probs; gradients for hidden, weight and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, chunk_tokens, use_triton):
        N, T, D = hidden.shape
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        flat_weights = mask.reshape(N * T)
        kept = (flat_weights != 0).nonzero()[:, 0]  # (K,) token indices that count
        token_weights = flat_weights[kept].to(dtype)  # (K,)
        token_targets = targets.reshape(N * T)[kept].long()  # (K,)
        flat_hidden = hidden.reshape(N * T, D)
        out = torch.zeros(N, dtype=dtype, device=hidden.device)
        lse = torch.empty(kept.shape[0], dtype=dtype, device=hidden.device)
        for start in range(0, kept.shape[0], chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            logits = F.linear(flat_hidden[kept[chunk]], weight, bias)  # (C, V), in hidden's dtype
            token_logps, chunk_lse = _chunk_token_logps(
                logits, token_targets[chunk], token_weights[chunk], use_triton
            )
            lse[chunk] = chunk_lse
            out.index_add_(0, kept[chunk] // T, token_logps)  # token -> its sequence n = index // T
        ctx.save_for_backward(hidden, weight, bias, kept, token_targets, token_weights, lse)
        ctx.chunk_tokens, ctx.use_triton = chunk_tokens, use_triton
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, kept, token_targets, token_weights, lse = ctx.saved_tensors
        N, T, D = hidden.shape
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        flat_hidden = hidden.reshape(N * T, D)
        grad_hidden = torch.zeros_like(flat_hidden) if needs_hidden else None  # padding rows stay 0
        # float32 accumulators: summing bf16 chunk products in bf16 would lose the small ones
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = grad_bias = None
        if needs_weight:
            grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device)  # (V, D)
        if needs_bias:
            grad_bias = torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device)  # (V,)
        grad_tokens = grad_out[kept // T].to(lse.dtype)  # (K,) g of each token's sequence
        for start in range(0, kept.shape[0], ctx.chunk_tokens):
            chunk = slice(start, start + ctx.chunk_tokens)
            chunk_hidden = flat_hidden[kept[chunk]]  # (C, D)
            logits = F.linear(chunk_hidden, weight, bias)  # (C, V) recomputed, then overwritten
            grad_logits = _chunk_grad_logits_(
                logits, token_targets[chunk], token_weights[chunk], lse[chunk], grad_tokens[chunk],
                ctx.use_triton,
            )
            if needs_hidden:
                grad_hidden[kept[chunk]] = grad_logits @ weight  # (C, D)
            if needs_weight:
                grad_weight += (grad_logits.t() @ chunk_hidden).to(accumulate)  # (V, D)
            if needs_bias:
                grad_bias += grad_logits.sum(dim=0, dtype=accumulate)  # (V,)
        return (
            None if grad_hidden is None else grad_hidden.view(N, T, D),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None,
        )


def sequence_logprobs_from_hidden_reference(hidden, lm_head_weight, targets, mask, *, lm_head_bias=None):
    """The plain composition: full (N, T, V) logits, then `sequence_logprobs_reference`."""
    _check_hidden_inputs(hidden, lm_head_weight, lm_head_bias, targets, mask, 1)
    return sequence_logprobs_reference(F.linear(hidden, lm_head_weight, lm_head_bias), targets, mask)


def sequence_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    lm_head_bias: Optional[torch.Tensor] = None,
    chunk_tokens: int = 1024,
    impl: str = "auto",
) -> torch.Tensor:
    """`sequence_logprobs(hidden @ W^T + b, targets, mask)` without ever holding the (N, T, V) logits.

    hidden: (N, T, D) decoder output; lm_head_weight: (V, D); lm_head_bias: (V,) or None; all one
    dtype. Works through `chunk_tokens` unmasked tokens at a time (peak: one (chunk_tokens, V)
    logits chunk, plus a float32 (V, D) gradient accumulator in the backward). Gradients flow to
    hidden, weight and bias. impl: "triton" runs the vocabulary passes in the kernels above,
    "torch" in PyTorch (still chunked); the matmuls are PyTorch's either way. Returns (N,) float32.
    """
    _check_hidden_inputs(hidden, lm_head_weight, lm_head_bias, targets, mask, chunk_tokens)
    tensors = [hidden, lm_head_weight, targets, mask] + ([] if lm_head_bias is None else [lm_head_bias])
    use_triton = _use_triton(impl, "sequence_logprobs_from_hidden", tensors, [hidden])
    return SequenceLogprobsFromHidden.apply(
        hidden, lm_head_weight, lm_head_bias, targets, mask, chunk_tokens, use_triton
    )
