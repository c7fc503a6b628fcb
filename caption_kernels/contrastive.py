"""Fused CLIP and SigLIP losses: linear memory, Triton kernels, PyTorch reference.

    clip_loss(img_emb, txt_emb, logit_scale)                 == open_clip.loss.ClipLoss()(...)
    siglip_loss(img_emb, txt_emb, logit_scale, logit_bias)   == open_clip.loss.SigLipLoss()(...)

Both take (N, D) features (already L2-normalised, as open_clip passes them), an exponentiated
`logit_scale` (a tensor that may require grad, or a number) and, for SigLIP, a `logit_bias`; they
return a scalar (float32, float64 for float64 features) and give gradients for the features, the
scale and the bias. Neither ever holds the N x N logits: a batch of 262,144 pairs needs about
3 GiB of working memory where open_clip's logits alone take 256 GiB.

`impl="auto"` runs Triton on CUDA tensors when Triton imports, else the PyTorch reference;
`impl="torch"` forces the reference (chunked as well, so also linear in memory); `impl="triton"`
forces the kernels, and also accepts CPU tensors under TRITON_INTERPRET=1 (that is how the tests
run them without a GPU). `distributed=True` computes the loss of this rank's rows against the
features of all ranks (section "Many GPUs" below).

This file imports only torch and triton: copy it into another codebase as it is.


## The CLIP loss and its gradient

Image features x_i, text features y_j (i, j = 1..N), logit scale s:

    S_ij = s <x_i, y_j>                                  logits, (N, N), never stored
    r_i  = log sum_j exp(S_ij)                           row log-sum-exp (image -> texts)
    c_j  = log sum_i exp(S_ij)                           column log-sum-exp (text -> images)
    L    = 1/(2N) [ sum_i (r_i - S_ii) + sum_j (c_j - S_jj) ]
         = 1/(2N) [ sum_i r_i + sum_j c_j - 2 sum_i S_ii ]

which is the mean of the two cross-entropies open_clip computes. With the row softmax
P^row_ij = exp(S_ij - r_i) and the column softmax P^col_ij = exp(S_ij - c_j):

    dL/dS_ij = 1/(2N) (P^row_ij + P^col_ij - 2 [i = j])  =  1/N (G_ij - [i = j]),
    G_ij     = (P^row_ij + P^col_ij) / 2                 in [0, 1]

and through S_ij = s <x_i, y_j> the chain rule gives

    dL/dx_i = s/N sum_j (G_ij - [i = j]) y_j            d_img = s/N (G - I) @ txt
    dL/dy_j = s/N sum_i (G_ij - [i = j]) x_i            d_txt = s/N (G - I)^T @ img
    dL/ds   = 1/N sum_ij (G_ij - [i = j]) <x_i, y_j>

The kernels produce the (G - I) tile in float32 and subtract the identity before anything is
rounded: for a confident row G_ii is close to 1 and rounding G to bfloat16 first would erase the
whole gradient of that row.

## The SigLIP loss and its gradient

With the bias b, S_ij = s <x_i, y_j> + b and labels z_ij = +1 on the diagonal, -1 elsewhere:

    L = -1/N sum_ij log sigmoid(z_ij S_ij) = 1/N sum_ij softplus(-z_ij S_ij)

    dL/dS_ij = 1/N (sigmoid(S_ij) - [i = j])  =  1/N (G_ij - [i = j]),   G_ij = sigmoid(S_ij)

so the same three products give d_img, d_txt and d_scale, and dL/db = 1/N sum_ij (G_ij - [i = j]).
One backward serves both losses; only the elementwise G differs.

## Online log-sum-exp over tiles (the forward)

A row's log-sum-exp can be accumulated one tile of columns at a time without keeping the tiles:
with a running maximum m and a running sum l of exp(S - m),

    m' = max(m, max_j S_ij),    l' = l exp(m - m') + sum_j exp(S_ij - m')    r_i = m + log l

(the rescaling by exp(m - m') is the flash-attention trick; every exponent is <= 0, so nothing
overflows whatever the scale). A program of the forward kernel owns BLOCK_ROWS rows and sweeps a
range of columns in BLOCK_COLS tiles; each (BLOCK_ROWS, BLOCK_COLS) tile of dot products is
accumulated in float32 over BLOCK_DEPTH-wide slices of D (so any D fits), then folded into the
rows' running (m, l). The same tile also yields the log-sum-exp of each of its columns over the
program's rows, which is written out: one float per (row block, column). A tiny PyTorch
reduction (logsumexp over the row blocks) then gives c_j. So the forward reads the features once
per tile and computes each logit once: rows and columns come out of one pass. When the columns
of one row block do not give enough programs to fill the GPU, the columns are split among
several programs and their row statistics are merged the same way.

## The backward: recompute the logits, then two plain matrix products

The backward needs G - I tile by tile, and two contractions with it: over columns for d_img and
over rows for d_txt. A flash-attention-style backward keeps a (block, D) float32 gradient
accumulator in registers; at CLIP's D = 768 a 128-row block is 384 KiB, more than the 256 KiB
register file, which forces tiny blocks (memeff: 105 useful TFLOP/s) or recomputing the logits
once per slice of D (Inf-CL: 12 TFLOP/s). Instead this file materialises G - I in bounded
strips of R rows x N columns (R chosen so a strip takes 512 MiB, `_WORKSPACE_BYTES`, but at
least 4096 rows so that the float32 accumulation of d_txt stays a small cost):
a Triton kernel recomputes the strip's logits (a GEMM with K = D) and writes G - I in the feature
dtype from the same registers, and the vendor matmul then computes

    d_img[strip] = (G - I)[strip] @ txt            K = N: a long, efficient GEMM
    d_txt       += (G - I)[strip]^T @ img[strip]   accumulated in float32 across strips

Work per step (useful work is 6 N^2 D FLOPs: the logits and the two gradient products):

    forward    2 N^2 D   Triton, one pass, bf16 tensor cores with float32 accumulation
    backward   2 N^2 D   Triton recompute of the logits  + 2 bytes/logit written (bf16 G - I)
               4 N^2 D   vendor GEMMs reading G - I twice
    total      8 N^2 D   the floor for any design that stores no N x N matrix

At N = 32768, D = 768 that is 6.6 TFLOP of matmul plus 6 GB of G - I traffic (about 2 ms at
3 TB/s, overlapping with the products): about 13 ms on an H100 if the matmuls run at 550 TFLOP/s,
against 57 ms for open_clip and 47 ms for memeff (an estimate from the design; the measured
figures come from `python -m caption_kernels.bench`). Memory beyond the inputs and gradients: one strip
of G - I (max(512 MiB, 4096 x N x 2 bytes) in bf16: 0.5 GiB at N = 32768, 2 GiB at N = 262144),
the float32 d_txt accumulator (N x D x 4 bytes), the per-row-block column statistics
(<= 512 MiB) and O(N) floats. float32 features use the "tf32x3" dot product (three TF32
products: float32 accuracy at about a third of TF32 speed) and a float32 G - I.

Tiles are 128 x 128 with 64-wide bf16 slices of D (32-wide in float32), 8 warps, 3 pipeline
stages, fixed rather than autotuned. The kernels take strides, so any layout works; rows that
are contiguous along D and 16-byte aligned (the usual case) get the vectorised, pipelined loads.

## Many GPUs (`distributed=True`)

Each of W ranks holds n = N / W pairs (the same n on every rank). Rank k computes its own rows
of S against all N columns: it all-gathers the text features (`gather_features`, with gradient:
the gather's backward sums every rank's contribution to a text feature onto its owner), computes
its rows' r_i and the log-sum-exp of every column over its rows, and all-gathers those N column
partials so each rank knows the global c_j (N floats per rank, no gradient needed: dL/dc is
folded into G analytically). Its loss is

    L_k = W/(2N) [ sum_{i in k} r_i + sum_{j in k} c_j - 2 sum_{i in k} S_ii ]

which is exactly the per-rank loss of open_clip's
`ClipLoss(local_loss=True, gather_with_grad=True, rank=k, world_size=W)`, and mean_k L_k is the
single-GPU loss of the global batch. The backward of rank k uses G - I for its rows (with the
global c_j), so the feature gradients each rank receives are W times the gradient of the global
loss with respect to its own features, as in open_clip; DDP's averaging then gives the global
gradient for the encoders. The logit scale (and bias) is replicated: rank k returns W times the
part of dL/ds that comes from its rows; these parts differ from open_clip's per-rank split
(which is by its rows and its columns) but their mean over ranks, which is what DDP applies, is
the same dL/ds. All ranks must call backward with the same upstream gradient (the usual 1.0 or
one loss-scaler value). SigLIP has no column statistic: rank k computes its rows against all
texts with its own diagonal as positives, exactly `SigLipLoss(rank=k, world_size=W)`.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch reference still works; impl="triton" says what is missing
    triton = None
    tl = None


_WORKSPACE_BYTES = 512 * 2**20
"""Upper bound for one strip of G - I and for the forward's per-row-block column statistics."""

_MIN_STRIP_ROWS = 4096
"""Fewest rows in a strip of G - I. Each strip adds one float32 pass over d_txt (10 bytes per
element of (N, D)) to the strip's 8 R N D FLOPs of forward and backward: at 3 TB/s against
550 TFLOP/s that is about 230 / R of the step, 6% at 4096 rows."""

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DTYPES = _TRITON_DTYPES + (torch.float64,)


def _jit(fn):
    """`triton.jit` when Triton is installed; the plain function otherwise (then never called)."""
    return triton.jit(fn) if triton is not None else fn


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@_jit
def _tile_dot_products(
    x_ptr, y_ptr, rows, cols, n_rows, n_cols, depth,
    stride_x_row, stride_x_depth, stride_y_row, stride_y_depth,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_DEPTH: tl.constexpr,
    FP32_INPUTS: tl.constexpr, UPCAST_DOT_INPUTS: tl.constexpr,
):
    """<x_i, y_j> for a (BLOCK_ROWS, BLOCK_COLS) tile, float32, accumulated over slices of D."""
    dots = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    row_offsets = rows.to(tl.int64) * stride_x_row  # int64: N * D can pass 2^31
    col_offsets = cols.to(tl.int64) * stride_y_row
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    for depth_start in range(0, depth, BLOCK_DEPTH):
        ks = depth_start + tl.arange(0, BLOCK_DEPTH)
        k_mask = ks < depth
        x = tl.load(  # (BLOCK_ROWS, BLOCK_DEPTH)
            x_ptr + row_offsets[:, None] + ks[None, :] * stride_x_depth,
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        )
        y_t = tl.load(  # (BLOCK_DEPTH, BLOCK_COLS): y transposed by the addressing, not a copy
            y_ptr + col_offsets[None, :] + ks[:, None] * stride_y_depth,
            mask=k_mask[:, None] & col_mask[None, :], other=0.0,
        )
        if UPCAST_DOT_INPUTS:
            # Triton's CPU interpreter multiplies bfloat16 tiles as raw 16-bit integers; in
            # float32 the products of bfloat16 values are exact, as on the tensor cores
            x = x.to(tl.float32)
            y_t = y_t.to(tl.float32)
        if FP32_INPUTS:
            # plain TF32 would put 1e-3 relative error in every logit; three TF32 products don't
            dots = tl.dot(x, y_t, dots, input_precision="tf32x3")
        else:
            dots = tl.dot(x, y_t, dots)  # bf16/fp16 tensor cores, float32 accumulation
    return dots


@_jit
def _softplus(u):
    """log(1 + exp(u)) without overflow and with log1p's accuracy for tiny exp(-|u|)."""
    small = tl.exp(-tl.abs(u))
    one_plus_small = 1.0 + small
    # log1p(e) = log(1 + e) * e / ((1 + e) - 1) recovers the digits lost when 1 + e rounds
    rounded_small = one_plus_small - 1.0
    log1p_small = tl.where(
        rounded_small == 0.0,
        small,
        tl.log(one_plus_small) * small / tl.where(rounded_small == 0.0, 1.0, rounded_small),
    )
    return tl.maximum(u, 0.0) + log1p_small


@_jit
def _forward_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, row_partial_ptr, col_partial_ptr,
    n_rows, n_cols, depth, row_start, columns_per_program, positive_offset,
    stride_x_row, stride_x_depth, stride_y_row, stride_y_depth,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_DEPTH: tl.constexpr,
    FP32_INPUTS: tl.constexpr, UPCAST_DOT_INPUTS: tl.constexpr, SIGLIP: tl.constexpr,
):
    """One program: BLOCK_ROWS rows against one range of columns, one pass over the tiles.

    CLIP:   row_partial[split, i] = log-sum-exp of row i over this program's columns,
            col_partial[row_block, j] = log-sum-exp of column j over this program's rows.
    SigLIP: row_partial[split, i] = sum over this program's columns of softplus(-z_ij S_ij).
    """
    row_block = tl.program_id(0)
    column_split = tl.program_id(1)
    rows = row_start + row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    # -1e30 rather than -inf marks padding: exp(-1e30 - m) is 0 and no lane ever computes inf - inf
    row_max = tl.full((BLOCK_ROWS,), -1.0e30, dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    first_col = column_split * columns_per_program
    last_col = tl.minimum(first_col + columns_per_program, n_cols)
    for col_start in range(first_col, last_col, BLOCK_COLS):
        cols = col_start + tl.arange(0, BLOCK_COLS)
        col_mask = cols < n_cols
        valid = row_mask[:, None] & col_mask[None, :]
        dots = _tile_dot_products(
            x_ptr, y_ptr, rows, cols, n_rows, n_cols, depth,
            stride_x_row, stride_x_depth, stride_y_row, stride_y_depth,
            BLOCK_ROWS, BLOCK_COLS, BLOCK_DEPTH, FP32_INPUTS, UPCAST_DOT_INPUTS,
        )  # (BLOCK_ROWS, BLOCK_COLS)
        if SIGLIP:
            logits = scale * dots + bias
            is_positive = cols[None, :] == (rows + positive_offset)[:, None]
            # -log sigmoid(z S) = softplus(-z S), z = +1 on the positive pair, -1 elsewhere
            pair_losses = _softplus(tl.where(is_positive, -logits, logits))
            row_sum += tl.sum(tl.where(valid, pair_losses, 0.0), axis=1)
        else:
            logits = tl.where(valid, scale * dots, -1.0e30)
            # rows: online log-sum-exp, m' = max(m, tile max), l' = l exp(m - m') + sum exp(S - m')
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(
                tl.exp(logits - new_max[:, None]), axis=1
            )
            row_max = new_max
            # columns: this tile holds all of this program's rows for these columns
            col_max = tl.max(logits, axis=0)
            col_lse = col_max + tl.log(tl.sum(tl.exp(logits - col_max[None, :]), axis=0))
            tl.store(col_partial_ptr + row_block * n_cols + cols, col_lse, mask=col_mask)
    if SIGLIP:
        row_result = row_sum
    else:
        row_result = row_max + tl.log(row_sum)
    tl.store(row_partial_ptr + column_split * n_rows + rows, row_result, mask=row_mask)


@_jit
def _grad_logits_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, row_lse_ptr, col_lse_ptr, grad_ptr, sums_ptr,
    n_rows, n_cols, depth, row_start, positive_offset,
    stride_x_row, stride_x_depth, stride_y_row, stride_y_depth, stride_grad_row,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_DEPTH: tl.constexpr,
    FP32_INPUTS: tl.constexpr, UPCAST_DOT_INPUTS: tl.constexpr, SIGLIP: tl.constexpr,
):
    """One (BLOCK_ROWS, BLOCK_COLS) tile of G - I, recomputed from the features.

    Writes the tile to grad[rows - row_start, cols] in the strip's dtype, and this program's
    float32 sums of (G - I) * <x, y> (for dL/ds) and of G - I (for dL/db) to sums[:, program].
    """
    row_block = tl.program_id(0)
    col_block = tl.program_id(1)
    rows = row_start + row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    valid = row_mask[:, None] & col_mask[None, :]
    dots = _tile_dot_products(
        x_ptr, y_ptr, rows, cols, n_rows, n_cols, depth,
        stride_x_row, stride_x_depth, stride_y_row, stride_y_depth,
        BLOCK_ROWS, BLOCK_COLS, BLOCK_DEPTH, FP32_INPUTS, UPCAST_DOT_INPUTS,
    )  # (BLOCK_ROWS, BLOCK_COLS)
    scale = tl.load(scale_ptr)
    if SIGLIP:
        logits = scale * dots + tl.load(bias_ptr)
        small = tl.exp(-tl.abs(logits))  # sigmoid from exp(-|S|): never overflows
        grad = tl.where(logits >= 0, 1.0 / (1.0 + small), small / (1.0 + small))
    else:
        logits = scale * dots
        row_lse = tl.load(row_lse_ptr + rows, mask=row_mask, other=0.0)
        col_lse = tl.load(col_lse_ptr + cols, mask=col_mask, other=0.0)
        # G = (P_row + P_col) / 2; every exponent is <= 0 up to rounding, so no overflow
        grad = 0.5 * (tl.exp(logits - row_lse[:, None]) + tl.exp(logits - col_lse[None, :]))
    is_positive = cols[None, :] == (rows + positive_offset)[:, None]
    grad = tl.where(is_positive, grad - 1.0, grad)  # subtract I in float32, before rounding
    grad = tl.where(valid, grad, 0.0)
    grad_offsets = (rows - row_start).to(tl.int64)[:, None] * stride_grad_row + cols[None, :]
    tl.store(grad_ptr + grad_offsets, grad.to(grad_ptr.dtype.element_ty), mask=valid)
    program = row_block * tl.num_programs(1) + col_block
    tl.store(sums_ptr + program, tl.sum(grad * dots))
    tl.store(sums_ptr + tl.num_programs(0) * tl.num_programs(1) + program, tl.sum(grad))


# ----------------------------------------------------------------------------------------------
# Launch helpers: tile sizes, grids, strips
# ----------------------------------------------------------------------------------------------


def _tile_config(features: torch.Tensor) -> dict:
    """Tile sizes: 128 x 128 output tiles on a GPU; 32 x 32 on the CPU interpreter.

    On an H100 a 128 x 128 float32 tile is 64 registers per thread at 8 warps, leaving room for
    the epilogue, and 64-wide bf16 depth slices (32-wide in float32) keep each pipeline stage at
    32 KiB of shared memory. The interpreter uses small tiles so tests at N ~ 100 still cover
    several row blocks, column tiles and column splits.
    """
    on_gpu = features.device.type == "cuda"
    depth_slice = 32 if features.dtype == torch.float32 else 64
    depth = features.shape[1]
    return dict(
        BLOCK_ROWS=128 if on_gpu else 32,
        BLOCK_COLS=128 if on_gpu else 32,
        BLOCK_DEPTH=max(16, min(depth_slice, triton.next_power_of_2(depth))),
        FP32_INPUTS=features.dtype == torch.float32,
        UPCAST_DOT_INPUTS=features.dtype == torch.bfloat16 and _interpreter_on(),
        **(dict(num_warps=8, num_stages=3) if on_gpu else {}),
    )


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """Enough programs to give every SM a few (load balance over the last wave)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _grid(row_programs: int, column_programs: int) -> tuple[int, int]:
    """The launch grid (row blocks, column blocks or splits); one place, so tests can break it."""
    return (row_programs, column_programs)


def _rows_per_strip(n_cols: int, bytes_per_row_entry: int, row_multiple: int) -> int:
    """Rows such that a (rows, n_cols) workspace stays within _WORKSPACE_BYTES (>= one block)."""
    rows = _WORKSPACE_BYTES // (n_cols * bytes_per_row_entry)
    return max(row_multiple, rows // row_multiple * row_multiple)


def _strides(x: torch.Tensor, y: torch.Tensor) -> tuple[int, int, int, int]:
    return (x.stride(0), x.stride(1), y.stride(0), y.stride(1))


def _forward_stats_triton(x, y, scale, bias, positive_offset, siglip):
    """Per-row statistic (CLIP: row log-sum-exp; SigLIP: row loss sum) and CLIP's column LSE.

    x: (M, D) this rank's image features, y: (Nc, D) all text features; scale, bias: 0-d float32.
    """
    n_rows, depth = x.shape
    n_cols = y.shape[0]
    config = _tile_config(x)
    block_rows, block_cols = config["BLOCK_ROWS"], config["BLOCK_COLS"]
    # the column statistics are one float per (row block, column): launch as many row blocks
    # at a time as fit the workspace, and merge their columns between launches
    blocks_per_launch = min(triton.cdiv(n_rows, block_rows),
                            _rows_per_strip(n_cols, 4, 1))
    col_tiles = triton.cdiv(n_cols, block_cols)
    splits = min(col_tiles, triton.cdiv(_target_programs(x.device), blocks_per_launch))
    columns_per_program = triton.cdiv(col_tiles, splits) * block_cols
    splits = triton.cdiv(n_cols, columns_per_program)

    # filled with the merge's identity (0 for SigLIP's sum, -inf for a log-sum-exp), not left
    # uninitialised: a program that never ran then gives a deterministic wrong answer, which the
    # tests catch, instead of whatever an earlier call left in the reused memory
    row_partial = torch.full((splits, n_rows), 0.0 if siglip else -math.inf, device=x.device, dtype=torch.float32)
    # SigLIP has no column statistics: its kernel never writes through this pointer
    col_partial = (row_partial if siglip else
                   torch.full((blocks_per_launch, n_cols), -math.inf, device=x.device, dtype=torch.float32))
    col_lse = torch.full((n_cols,), -math.inf, device=x.device, dtype=torch.float32)
    for row_start in range(0, n_rows, blocks_per_launch * block_rows):
        row_blocks = triton.cdiv(min(n_rows - row_start, blocks_per_launch * block_rows), block_rows)
        _forward_kernel[_grid(row_blocks, splits)](
            x, y, scale, bias, row_partial, col_partial,
            n_rows, n_cols, depth, row_start, columns_per_program, positive_offset,
            *_strides(x, y), SIGLIP=siglip, **config,
        )
        if not siglip:
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(col_partial[:row_blocks], dim=0))
    if siglip:
        return row_partial.sum(dim=0), None
    return torch.logsumexp(row_partial, dim=0), col_lse


def _grad_products_triton(x, y, scale, bias, row_lse, col_lse, positive_offset, siglip):
    """(G - I) @ y (M, D), (G - I)^T @ x (Nc, D) float32, sum (G - I) <x, y>, sum (G - I).

    G - I is materialised strip by strip, (R, Nc) in the feature dtype, and contracted with the
    vendor matmul (cuBLAS on a GPU): K = Nc for the image side, K = R for the text side.
    """
    n_rows, depth = x.shape
    n_cols = y.shape[0]
    config = _tile_config(x)
    block_rows, block_cols = config["BLOCK_ROWS"], config["BLOCK_COLS"]
    rows_per_strip = min(max(_rows_per_strip(n_cols, x.element_size(), block_rows),
                             _MIN_STRIP_ROWS), n_rows)
    strip_buffer = torch.empty(rows_per_strip, n_cols, device=x.device, dtype=x.dtype)
    img_side = torch.empty(n_rows, depth, device=x.device, dtype=x.dtype)  # (M, D)
    txt_side = torch.zeros(n_cols, depth, device=x.device, dtype=torch.float32)  # (Nc, D)
    sums = torch.zeros(2, device=x.device, dtype=torch.float32)
    # SigLIP has no log-sum-exps: its kernel never reads these pointers
    row_lse_arg, col_lse_arg = (scale, scale) if siglip else (row_lse, col_lse)
    for strip_start in range(0, n_rows, rows_per_strip):
        strip_rows = min(rows_per_strip, n_rows - strip_start)
        grad_logits = strip_buffer[:strip_rows]  # (R, Nc)
        grid = _grid(triton.cdiv(strip_rows, block_rows), triton.cdiv(n_cols, block_cols))
        program_sums = torch.empty(2, grid[0] * grid[1], device=x.device, dtype=torch.float32)
        _grad_logits_kernel[grid](
            x, y, scale, bias, row_lse_arg, col_lse_arg, grad_logits, program_sums,
            n_rows, n_cols, depth, strip_start, positive_offset,
            *_strides(x, y), grad_logits.stride(0), SIGLIP=siglip, **config,
        )
        x_strip = x[strip_start:strip_start + strip_rows]  # (R, D)
        torch.mm(grad_logits, y, out=img_side[strip_start:strip_start + strip_rows])
        txt_side += grad_logits.T @ x_strip
        sums += program_sums.sum(dim=1)
    return img_side, txt_side, sums[0], sums[1]


# ----------------------------------------------------------------------------------------------
# PyTorch reference: the same strips, written with dense torch ops on (R, Nc) blocks
# ----------------------------------------------------------------------------------------------


def _positive_index(strip_rows: int, first_positive: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) indices of the positive pairs of a strip: row r pairs with column r + offset."""
    rows = torch.arange(strip_rows, device=device)
    return rows, rows + first_positive


def _forward_stats_torch(x, y, scale, bias, positive_offset, siglip):
    """Same contract as `_forward_stats_triton`, in float32 (float64 for float64 features)."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    n_rows = x.shape[0]
    y_compute = y.to(compute_dtype)  # (Nc, D)
    rows_per_strip = _rows_per_strip(y.shape[0], 4 * compute_dtype.itemsize, 1)
    row_stat = torch.empty(n_rows, device=x.device, dtype=compute_dtype)
    col_lse = torch.full((y.shape[0],), -math.inf, device=x.device, dtype=compute_dtype)
    for start in range(0, n_rows, rows_per_strip):
        x_strip = x[start:start + rows_per_strip].to(compute_dtype)  # (R, D)
        logits = scale * (x_strip @ y_compute.T)  # (R, Nc)
        if siglip:
            logits = logits + bias
            labels = -torch.ones_like(logits)  # z: +1 for the positive pair, -1 elsewhere
            labels[_positive_index(x_strip.shape[0], start + positive_offset, x.device)] = 1.0
            row_stat[start:start + rows_per_strip] = -F.logsigmoid(labels * logits).sum(dim=1)
        else:
            row_stat[start:start + rows_per_strip] = torch.logsumexp(logits, dim=1)
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0))
    return row_stat, (None if siglip else col_lse)


def _grad_products_torch(x, y, scale, bias, row_lse, col_lse, positive_offset, siglip):
    """Same contract as `_grad_products_triton`, in float32 (float64 for float64 features)."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    n_rows = x.shape[0]
    y_compute = y.to(compute_dtype)  # (Nc, D)
    rows_per_strip = _rows_per_strip(y.shape[0], 4 * compute_dtype.itemsize, 1)
    img_side = torch.empty(n_rows, x.shape[1], device=x.device, dtype=compute_dtype)
    txt_side = torch.zeros_like(y_compute)
    dot_sum = torch.zeros((), device=x.device, dtype=compute_dtype)
    grad_sum = torch.zeros((), device=x.device, dtype=compute_dtype)
    for start in range(0, n_rows, rows_per_strip):
        x_strip = x[start:start + rows_per_strip].to(compute_dtype)  # (R, D)
        dots = x_strip @ y_compute.T  # (R, Nc)
        if siglip:
            grad = torch.sigmoid(scale * dots + bias)
        else:
            logits = scale * dots
            strip_lse = row_lse[start:start + rows_per_strip, None]
            grad = 0.5 * (torch.exp(logits - strip_lse) + torch.exp(logits - col_lse[None, :]))
        grad[_positive_index(x_strip.shape[0], start + positive_offset, x.device)] -= 1.0
        img_side[start:start + rows_per_strip] = grad @ y_compute
        txt_side += grad.T @ x_strip
        dot_sum += (grad * dots).sum()
        grad_sum += grad.sum()
    return img_side, txt_side, dot_sum, grad_sum


_BACKENDS = {
    "triton": (_forward_stats_triton, _grad_products_triton),
    "torch": (_forward_stats_torch, _grad_products_torch),
}


# ----------------------------------------------------------------------------------------------
# The autograd function (shared by both losses, both backends, one or many ranks)
# ----------------------------------------------------------------------------------------------


class _ContrastiveLoss(torch.autograd.Function):
    """Loss of rows x (M, D) against columns y (Nc, D); row i's positive is column i + offset.

    With one rank M = Nc = N and offset 0. With W ranks, x is this rank's image features, y the
    gathered text features, offset = rank * M, and the loss is this rank's share times W.
    """

    @staticmethod
    def forward(ctx, img_emb, all_txt_emb, logit_scale, logit_bias, siglip, backend,
                positive_offset, world_size, group):
        forward_stats, _ = _BACKENDS[backend]
        n_local, n_global = img_emb.shape[0], all_txt_emb.shape[0]
        loss_dtype = torch.promote_types(img_emb.dtype, torch.float32)
        scale = logit_scale.detach().reshape(()).to(loss_dtype)  # float32 in every kernel
        bias = (logit_bias.detach().reshape(()).to(loss_dtype) if logit_bias is not None
                else torch.zeros_like(scale))
        row_stat, col_lse = forward_stats(img_emb, all_txt_emb, scale, bias, positive_offset, siglip)
        if siglip:
            # L = 1/N sum_ij softplus(-z_ij S_ij)
            loss = row_stat.sum() * (world_size / n_global)
        else:
            if world_size > 1:
                col_lse = _merge_column_lse(col_lse, group)
            own_txt = all_txt_emb[positive_offset:positive_offset + n_local]  # (M, D)
            positive_logits = scale * (img_emb.to(loss_dtype) * own_txt.to(loss_dtype)).sum(dim=1)
            own_col_lse = col_lse[positive_offset:positive_offset + n_local]
            # L = 1/(2N) [sum_i r_i + sum_j c_j - 2 sum_i S_ii]
            loss = (row_stat.sum() + own_col_lse.sum() - 2 * positive_logits.sum()) * (
                world_size / (2 * n_global))
        ctx.save_for_backward(img_emb, all_txt_emb, scale, bias,
                              *((row_stat, col_lse) if not siglip else ()))
        ctx.siglip, ctx.backend, ctx.positive_offset = siglip, backend, positive_offset
        ctx.world_size = world_size
        ctx.scale_like = (logit_scale.shape, logit_scale.dtype)
        ctx.bias_like = (logit_bias.shape, logit_bias.dtype) if logit_bias is not None else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        img_emb, all_txt_emb, scale, bias, *lse = ctx.saved_tensors
        row_lse, col_lse = lse if lse else (None, None)
        _, grad_products = _BACKENDS[ctx.backend]
        img_side, txt_side, dot_sum, grad_sum = grad_products(
            img_emb, all_txt_emb, scale, bias, row_lse, col_lse, ctx.positive_offset, ctx.siglip)
        # dL/dS = coef (G - I): coef = 1/N for one rank, W/N for this rank's share of W
        coef = grad_loss.to(scale.dtype) * (ctx.world_size / all_txt_emb.shape[0])
        grad_img = (coef * scale) * img_side.to(scale.dtype)  # s/N (G - I) @ txt
        grad_txt = (coef * scale) * txt_side.to(scale.dtype)  # s/N (G - I)^T @ img
        grad_scale = (coef * dot_sum).reshape(ctx.scale_like[0]).to(ctx.scale_like[1])
        grad_bias = None
        if ctx.bias_like is not None:
            grad_bias = (coef * grad_sum).reshape(ctx.bias_like[0]).to(ctx.bias_like[1])
        return (grad_img.to(img_emb.dtype), grad_txt.to(all_txt_emb.dtype), grad_scale,
                grad_bias, None, None, None, None, None)


def _merge_column_lse(col_lse_partial: torch.Tensor, group) -> torch.Tensor:
    """Global column log-sum-exp from every rank's log-sum-exp over its own rows: (Nc,)."""
    gathered = [torch.empty_like(col_lse_partial) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(gathered, col_lse_partial.contiguous(), group=group)
    return torch.logsumexp(torch.stack(gathered), dim=0)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, features, group):
        ctx.group = group
        shards = [torch.empty_like(features) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(shards, features.contiguous(), group=group)
        return torch.cat(shards, dim=0)  # (W * n, D)

    @staticmethod
    def backward(ctx, grad_gathered):
        world_size = torch.distributed.get_world_size(ctx.group)
        rank = torch.distributed.get_rank(ctx.group)
        grad_gathered = grad_gathered.contiguous()
        if torch.distributed.get_backend(ctx.group) == "nccl":
            grad = grad_gathered.new_empty(grad_gathered.shape[0] // world_size, *grad_gathered.shape[1:])
            torch.distributed.reduce_scatter_tensor(grad, grad_gathered, group=ctx.group)
            return grad, None
        grad_summed = grad_gathered.clone()  # gloo has no reduce-scatter: all-reduce, then slice
        torch.distributed.all_reduce(grad_summed, group=ctx.group)
        return grad_summed.chunk(world_size, dim=0)[rank], None


def gather_features(features: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather (n, D) features from every rank into (W * n, D), rank order, with gradient.

    The backward sums the gradients that all ranks computed for the gathered tensor and hands
    each rank the rows it contributed (open_clip's `gather_with_grad=True`). Every rank must
    pass the same n.
    """
    return _GatherWithGrad.apply(features, group)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "auto":
        return "triton" if triton is not None and device.type == "cuda" else "torch"
    if impl == "triton":
        if triton is None:
            raise RuntimeError("impl='triton' needs the triton package (pip install triton); "
                               "impl='torch' runs without it")
        if device.type != "cuda" and not _interpreter_on():
            raise ValueError(f"impl='triton' runs on CUDA tensors (or on CPU with "
                             f"TRITON_INTERPRET=1); the features are on {device}: use impl='torch'")
    return impl


def _as_scalar_tensor(value, name: str, features: torch.Tensor) -> torch.Tensor:
    """A logit scale or bias as a one-element tensor on the features' device."""
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), device=features.device,
                            dtype=torch.promote_types(features.dtype, torch.float32))
    if value.numel() != 1:
        raise ValueError(f"{name} must hold one number, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != features.device:
        raise ValueError(f"{name} is on {value.device} but the features are on {features.device}")
    return value


def _check_features(img_emb, txt_emb, backend: str) -> None:
    for name, features in (("img_emb", img_emb), ("txt_emb", txt_emb)):
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(features.shape)}")
        if features.shape[0] < 1 or features.shape[1] < 1:
            raise ValueError(f"{name} must have N >= 1 rows and D >= 1 columns, "
                             f"got shape {tuple(features.shape)}")
    if img_emb.shape != txt_emb.shape:
        raise ValueError(f"img_emb and txt_emb must have the same shape (N, D), got "
                         f"{tuple(img_emb.shape)} and {tuple(txt_emb.shape)}")
    if img_emb.device != txt_emb.device:
        raise ValueError(f"img_emb is on {img_emb.device} but txt_emb is on {txt_emb.device}")
    if img_emb.dtype != txt_emb.dtype:
        raise TypeError(f"img_emb and txt_emb must have the same dtype, got {img_emb.dtype} "
                        f"and {txt_emb.dtype}")
    allowed = _TRITON_DTYPES if backend == "triton" else _TORCH_DTYPES
    if img_emb.dtype not in allowed:
        raise TypeError(f"impl={backend!r} takes features of dtype "
                        f"{', '.join(str(d) for d in allowed)}; got {img_emb.dtype}")


def _contrastive(img_emb, txt_emb, logit_scale, logit_bias, siglip, impl, distributed, group):
    if not isinstance(img_emb, torch.Tensor):
        raise TypeError(f"img_emb must be a torch.Tensor, got {type(img_emb).__name__}")
    backend = _resolve_impl(impl, img_emb.device)
    _check_features(img_emb, txt_emb, backend)
    logit_scale = _as_scalar_tensor(logit_scale, "logit_scale", img_emb)
    if logit_bias is not None:
        logit_bias = _as_scalar_tensor(logit_bias, "logit_bias", img_emb)
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("distributed=True needs torch.distributed initialised "
                               "(torchrun + init_process_group)")
        world_size = torch.distributed.get_world_size(group)
        positive_offset = torch.distributed.get_rank(group) * img_emb.shape[0]
        all_txt_emb = gather_features(txt_emb, group)  # (W * n, D)
    else:
        world_size, positive_offset, all_txt_emb = 1, 0, txt_emb
    return _ContrastiveLoss.apply(img_emb, all_txt_emb, logit_scale, logit_bias, siglip, backend,
                                  positive_offset, world_size, group)


def clip_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale, *, impl: str = "auto",
              distributed: bool = False, group=None) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP, = open_clip `ClipLoss()(img_emb, txt_emb, logit_scale)`.

    img_emb, txt_emb: (N, D) float16/bfloat16/float32 (float64 with impl="torch"), pair i is
    (img_emb[i], txt_emb[i]); any strides. logit_scale: exponentiated scale, a one-element
    tensor (may require grad) or a number. Returns a float32 scalar (float64 for float64).
    distributed=True: the features are this rank's shard; returns this rank's loss as
    `ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)` does (module docstring).
    """
    return _contrastive(img_emb, txt_emb, logit_scale, None, False, impl, distributed, group)


def siglip_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale, logit_bias, *,
                impl: str = "auto", distributed: bool = False, group=None) -> torch.Tensor:
    """Sigmoid loss of SigLIP, = open_clip `SigLipLoss()(img_emb, txt_emb, logit_scale, logit_bias)`.

    Same arguments as `clip_loss` plus logit_bias (one-element tensor or number). distributed=True
    returns this rank's loss as `SigLipLoss(rank=rank, world_size=world_size)` does.
    """
    return _contrastive(img_emb, txt_emb, logit_scale, logit_bias, True, impl, distributed, group)
