"""CLIP with Quality Captions: a strong pretraining for vision tasks (Vasu et al. 2024).

https://arxiv.org/abs/2405.08911

CLIP pretrained on better-aligned captions transfers better to dense prediction. The paper trains
the same ViT-B/16 on DataComp (filtered web alt-text) and on DataCompDR (the same images, each with
its web caption and five synthetic CoCa captions; per sample and step one real and one synthetic
caption are drawn and the loss is L(img, real) + L(img, synthetic)), then fine-tunes the image
encoder with dense heads (segmentation on ADE20k, depth on NYUv2, detection on COCO). It reports
higher mIoU and lower RMSE for DataCompDR, about 10x data efficiency (a 10x smaller DataCompDR
subset transfers as well as the larger DataComp one) and more local attention heads in deep layers.

Implements:
  1. DataCompDR sampling: per sample and step x_syn ~ Uniform(synthetic captions), L = L_CLIP(img,
     x_real) + L_CLIP(img, x_syn) (`datacompdr_texts`), against L = L_CLIP(img, x_real) ("datacomp"),
     same schedule; and the one-loss variant swapping x_real for x_syn with probability p (`swap_texts`).
  2. Dense transfer: a light head on the patch tokens of the frozen (`--finetune`: trained) image
     encoder, segmentation (mIoU, mAcc as mmseg computes them) and depth (RMSE in metres), one probe
     per task as the paper fine-tunes one model per task (`--task`).
  3. Data efficiency: pretraining on nested growing subsets, each probed (curve PNG + JSON).
  4. Mean attention distance (ViT paper App. D.7): per layer and head, the mean over images and
     query patches of sum_j attn(q, j) * distance(q, j) in pixels, CLS row and column dropped; the
     locality claim compares the regimes' last layers over every seed's model.
  5. (Ours) the floors of the dense claims: an untrained encoder's probe, and no encoder at all
     (the majority class at every pixel; each pixel's mean training depth).
  6. DataCompDR's synthetic captions (MobileCLIP, Vasu et al. 2024, arXiv 2311.17049): k = 5 per image,
     x_syn ~ CoCa(img) by nucleus sampling (top-p 0.9), each an independent draw (`synthesize`); a degenerate
     draw (common/degenerate.py) is drawn again up to --resample-degenerate times, then dropped and counted.

Deviations from the paper (no official code exists; the closest is apple/ml-mobileclip training/):
  1. Dense heads are a 1x1 convolution (+ BatchNorm) on the last block's patch tokens, upsampled
     bilinearly, not UperNet / Mask-RCNN / a DPT-like depth head; detection is not implemented.
  2. The probe's encoder is frozen by default (a linear probe); `--finetune` trains it too, as the
     paper does, with `--finetune-lr`. Depth is trained with MSE on standardised depth, not SILog.
     Each task the manifests carry gets its own probe (and, with --finetune, its own copy of the
     encoder); `--task joint` instead trains one head on both with the two losses summed (not the paper).
  3. RMSE: per image over valid pixels (depth > 0), averaged over images (Eigen); no Eigen crop, no cap.
  4. MobileCLIP's DR also distils teacher embeddings (not this paper's contribution): left out. Same
     budget = same steps and images per step; DR encodes two texts per image (~1.1-1.3x compute).
  5. Every efficiency subset trains for the same steps (small ones repeat); the paper's differ.
  6. Attention distance does not renormalise a row after dropping the CLS column (as common App. D.7
     reimplementations); it needs open_clip ViTs with nn.MultiheadAttention (timm towers are refused).
  7. Pretraining uses the project's one CLIP trainer (common/clip_train.py): the manifest or webdataset
     shards indexed once, images decoded in --train.workers workers, epochs as seeded permutations
     with exact resume (<checkpoint>.train-state.pt while training), DDP under torchrun; an efficiency
     subset of n is the first n samples; only the miniature world's images are preprocessed once into
     memory, shared by every pretraining of a run. The probes stream: images and label maps decode per batch in
     `--probe-workers` DataLoader workers, the test set is scored batch by batch, and a frozen
     encoder's training tokens are computed once into a memory-mapped file in the run folder (deleted
     after). Probe epochs are seeded permutations cut into whole batches, not i.i.d. draws. The miniature
     probe trains on the first `--probe-train-images` train images (captions seen in pretraining,
     masks never) and tests on the test split.
  8. Training and evaluation see one square centre crop per image at the model's input size (224 px
     for ViT-B/16): images and label maps are resized (short side) and centre-cropped alike, so the
     pixels outside the crop are never scored. mmseg's ADE20k evaluation scores every pixel of the
     (resized) whole image, by sliding-window or whole-image inference.
  9. Pretraining runs under torchrun (DDP, features all-gathered: pass --kernel auto or torch) and the
     attention stage too (images sharded over ranks, sums all-reduced); rank 0 evaluates and writes.
     The probes have no multi-process path and refuse to start under it.
 10. `synthesize` samples as apple/ml-mobileclip-dr scripts/gen.py does (open_clip CoCa generate, top-p 0.9,
     open_clip's defaults otherwise, its post-processing); the degenerate-caption guard is ours (gen.py
     keeps every draw). It runs CoCa's top-p path under transformers 5, which open_clip 3.3 refuses (see
     `enable_coca_sampling`); beam search stays unavailable. The stage shards over torchrun ranks.

Smoke run first (every stage on a tiny world in under a minute, to check that everything runs):
    python clip_quality.py --preset smoke --out runs/clip_quality_smoke
Miniature world (CPU; a controlled experiment, not evidence about real data):
    python clip_quality.py                       # = python clip_quality.py miniature --seeds 1
    python clip_quality.py miniature --seeds 3   # seeds 0, 1, 2
Results (the tables, what they show and why the dense claims cannot show here, with the command and
device): docs/clip_quality.md.

DataCompDR's captions for your own images (a JSONL manifest: id, image, any other fields, all kept), then pretraining:
    python clip_quality.py synthesize --captioner coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k \
        --data images.jsonl --out synth.jsonl --device cuda   # or torchrun --nproc-per-node 8 clip_quality.py ...

Real run (pretraining on 8 GPUs, the rest on one; webdataset shards or a manifest with alt_text +
synthetic_captions such as DataCompDR-12M; probe
manifests whose records carry `mask` (PNG class ids, 255 = ignore; ADE20k as distributed,
ADEChallengeData2016, is 0 = other and 1..150: `--reduce-zero-label` maps it to 0..149 as mmseg
does, and any other out-of-range label is an error naming the file) and/or `depth` (uint16 PNG in
millimetres, 0 = invalid: NYUv2 as usually distributed); the schedule below is illustrative, not the
paper's; LAION is a noisier-caption stand-in for an ALIGN/DataComp model):
    torchrun --nproc-per-node 8 clip_quality.py pretrain --model ViT-B-16 --device cuda --kernel auto \
        --train-manifest dcdr12m/{00000..01199}.tar --test-manifest coco_test.jsonl --regimes datacomp datacompdr \
        --train.steps 30000 --train.batch-size 8192 --train.workers 8 --train.checkpoint-every 1000 \
        --benchmark wds/imagenet1k wds/mscoco_captions --benchmark-root 'benchmarks/{name}'   # + clip_benchmark rows
    python clip_quality.py probe --checkpoints runs/clip_quality/pretrain/*.pt --finetune --device cuda \
        --probe-train-manifest ade/train.jsonl --probe-test-manifest ade/val.jsonl --num-classes 150 \
        --reduce-zero-label --probe-workers 8
    python clip_quality.py attention --attention-models ViT-B-16@datacomp_xl_s13b_b90k \
        ViT-B-16@laion2b_s34b_b88k runs/clip_quality/pretrain/datacompdr-seed0.pt --images-manifest ade/val.jsonl
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from PIL import Image

from common.benchmarks import check_benchmarks, evaluate_benchmarks, write_benchmark_results
from common.claims import mean_spread, verdict
from common.cli import check_ranges, parse, preset_help
from common.clip_score import tag_settings
from common.clip_train import (MINIATURE_MODEL, ImageRows, TrainConfig, contrastive_loss, create_clip, encode_images,
                               encode_texts, evaluate_world, preprocess_images, retrieval_metrics, save_checkpoint,
                               texts_of, train_clip)
from common.data import (Columns, ManifestError, MissingWeightsError, SkipCounter, atomic_write_text, check_device,
                         image_source, index_data, init_distributed, is_shards, open_image, open_record_image,
                         read_manifest, run_command, shard, text_problem)
from common.degenerate import DegenerateCounter
from common.generate import check_resumable, generate_sharded
from common.miniature import SEGMENTATION_CLASSES, WorldConfig, ensure_world

Regime = Literal["datacomp", "datacompdr", "swap"]
# The miniature budget: 150 steps of 128 (about 4 epochs of the 5,000 training images), sized for the 10-minute
# reproduce.py (docs/clip_quality.md); the paper's ViT-B/16 runs see billions of samples.
MINIATURE_TRAINING = TrainConfig(steps=150, batch_size=128, lr=2e-3, warmup=15, seed=0)


# Presets (common/cli.py): Args holds the defaults of every stage; `smoke` runs every stage of the miniature run in
# seconds to check that it works. A flag you give always wins.
PRESETS = {"smoke": {"model": "micro-ViT-16", "train.steps": 2, "train.batch_size": 16, "train.warmup": 1,
                     "probe_steps": 3, "probe_batch_size": 8, "probe_train_images": 16, "attention_images": 4,
                     "subset_fractions": (0.5, 1.0), "world.n_train": 48, "world.n_val": 4, "world.n_test": 16},
           "miniature": {}}


@dataclass
class Args:
    """CLIP with Quality Captions: pretrain, probe, efficiency, attention, or the whole miniature run."""

    stage: tyro.conf.Positional[Literal["miniature", "synthesize", "pretrain", "probe", "efficiency", "attention"]] = (
        "miniature")
    """what to run; `miniature` runs every stage on the miniature world and writes results.md; `synthesize` writes
    DataCompDR's synthetic captions for --data into --out (a .jsonl; a folder gets synthetic.jsonl)"""
    preset: Annotated[Literal["smoke", "miniature"] | None, tyro.conf.arg(help=preset_help(PRESETS))] = None
    out: str = "runs/clip_quality"
    """output folder (each stage writes its JSON/PNG/checkpoints under it)"""
    world: WorldConfig = WorldConfig()
    """the miniature world used wherever a manifest is not given"""
    model: str = MINIATURE_MODEL
    """open_clip architecture to pretrain (random initialisation); the probe's `random` builds the probed
    checkpoints' architecture instead, and this one only when no other checkpoint is probed"""
    regimes: tuple[Regime, ...] = ("datacomp", "datacompdr")
    """caption regimes: web only, web + synthetic (two losses), or swap-with-probability-p (one loss)"""
    real_field: str = "alt_text"
    """manifest field of the real (web) caption"""
    synthetic_field: str = "synthetic_captions"
    """manifest field of the synthetic captions (a list; a string counts as a list of one)"""
    swap_probability: float = 0.5
    """probability that the `swap` regime replaces the real caption by a synthetic one"""
    train: TrainConfig = MINIATURE_TRAINING
    """pretraining schedule, identical for every regime"""
    seed: int = 0
    """first training seed (init, batch order, caption draws, probe)"""
    seeds: int = 1
    """how many seeds: seed .. seed + seeds - 1; the tables report mean and std over them"""
    kernel: Literal["none", "auto", "triton", "torch"] = "none"
    """contrastive loss: `none` = common.clip_train.contrastive_loss, else caption_kernels.contrastive.clip_loss(impl=...)"""
    train_manifest: str | None = None
    """pretraining manifest (default: the world's train split)"""
    test_manifest: str | None = None
    """retrieval evaluation manifest after pretraining (default: the world's test split)"""
    eval_text_field: str = "caption"
    """text field the retrieval evaluation uses (the world's ground truth is neutral to both regimes)"""
    benchmark: tuple[str, ...] = ()
    """pretrain stage: clip_benchmark dataset names each pretrained model is also evaluated on (e.g. wds/imagenet1k
    wds/mscoco_captions; see docs/benchmarks.md); needs --benchmark-root"""
    benchmark_root: str = ""
    """local folder of the --benchmark datasets as clip_benchmark lays them out ({name} is replaced by the dataset
    name with "/" -> "_": benchmarks/{name} -> benchmarks/wds_imagenet1k); nothing is downloaded"""
    checkpoints: tuple[str, ...] = ()
    """probe stage: checkpoints to probe (default: every *.pt under OUT/pretrain); `random` = an untrained encoder
    of their architecture"""
    probe_train_manifest: str | None = None
    """probe training manifest with `mask` and/or `depth` fields (default: the world's train split)"""
    probe_test_manifest: str | None = None
    """probe test manifest (default: the world's test split)"""
    probe_train_images: int = 1000
    """first N records of the probe training manifest (0 = all)"""
    num_classes: int = len(SEGMENTATION_CLASSES)
    """segmentation classes: mask values 0..num_classes-1 or --ignore-index; any other value is an error"""
    ignore_index: int = 255
    """mask value that marks unlabelled pixels"""
    reduce_zero_label: bool = False
    """mmseg's reduce_zero_label: mask 0 (ADE20k's `other`) -> ignore, k -> k - 1 (raw ADE20k: 1..150 -> 0..149)"""
    task: Literal["each", "seg", "depth", "joint"] = "each"
    """probe task: `each` = one probe per task the manifests carry (mask -> seg, depth -> depth), `seg` or
    `depth` alone, `joint` = one head trained on both with the losses summed"""
    finetune: bool = False
    """train the image encoder with the head (the paper fine-tunes; the default is a frozen probe)"""
    finetune_lr: float = 1e-4
    """learning rate of the encoder when --finetune"""
    probe_steps: int = 300
    """probe optimiser steps"""
    probe_batch_size: int = 64
    """probe images per step"""
    probe_lr: float = 3e-3
    """AdamW learning rate of the head"""
    probe_workers: int = 0
    """DataLoader worker processes that decode probe images and label maps (0 = in the main process)"""
    subset_fractions: tuple[float, ...] = (0.1, 1.0)  # the paper: DataCompDR matches DataComp on 10x less data
    """efficiency: nested fractions of the pretraining set, each pretrained with the same schedule"""
    efficiency_regimes: tuple[Regime, ...] = ("datacompdr",)
    """efficiency: regimes pretrained on every subset; the others only on the largest, the reference the claim
    compares with (DataCompDR's subsets against DataComp's largest); add datacomp for DataComp's whole curve"""
    attention_models: tuple[str, ...] = ()
    """attention: checkpoint paths, `NAME@PRETRAINED_TAG` (open_clip weights) or `NAME` (random init)"""
    images_manifest: str | None = None
    """attention: images to average over (default: the world's test split)"""
    attention_images: int = 128
    """attention: images to average over (128 in the ViT paper)"""
    captioner: str = "coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k"
    """synthesize: the CoCa, open_clip NAME@TAG (NAME@/path/to/weights also works) or one of our .pt checkpoints;
    the default is MobileCLIP's (apple/ml-mobileclip-dr scripts/gen.py)"""
    data: str | None = None
    """synthesize: the images to caption, a JSONL manifest (id, image; every field is kept) or webdataset shards"""
    num_synthetic: int = 5
    """synthesize: captions per image (k = 5 in DataCompDR), written as a list into --synthetic-field"""
    resample_degenerate: int = 3
    """synthesize: draws again a degenerate caption (common/degenerate.py) up to this many times, then drops it"""
    gen_batch_size: int = 32
    """synthesize: images per generate call (each is repeated k times in the batch)"""
    device: str = "cpu"
    """torch device"""


def seed_range(args: Args) -> range:
    """The training seeds of a run: --seed .. --seed + --seeds - 1."""
    return range(args.seed, args.seed + args.seeds)


# ---------------------------------------------------------------------------------------------
# DataCompDR caption sampling (the paper's training change)
# ---------------------------------------------------------------------------------------------


def datacompdr_texts(indices: np.ndarray, real: Sequence[str], synthetic: Sequence[Sequence[str]],
                     rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """One real and one synthetic caption per sample; train_clip sums one loss per list.

    The synthetic caption is drawn anew at every step, uniformly among the sample's captions.
    """
    # step 1: x_syn ~ Uniform{syn_1..syn_K}; L = L_CLIP(img, x_real) + L_CLIP(img, x_syn)
    picks = [synthetic[i][int(rng.integers(len(synthetic[i])))] for i in indices]
    return [real[i] for i in indices], picks


def swap_texts(indices: np.ndarray, real: Sequence[str], synthetic: Sequence[Sequence[str]], p: float,
               rng: np.random.Generator) -> list[str]:
    """The single-loss variant: each sample's real caption is replaced by a synthetic one with probability p."""
    swap = rng.random(len(indices)) < p  # (B,) Bernoulli(p)
    # x = x_syn ~ Uniform{syn_k} if swapped else x_real; L = L_CLIP(img, x)
    return [synthetic[i][int(rng.integers(len(synthetic[i])))] if s else real[i] for i, s in zip(indices, swap)]


def check_captions(columns: Columns, rows: np.ndarray, real_field: str, synthetic_field: str) -> None:
    """Every training row has a real caption (a string) and synthetic ones (a string or a list of them), by
    common.data.text_problem's rule: else an error naming the first bad sample's file and line."""
    def problem(values: dict) -> str | None:
        return text_problem(values[real_field], real_field) or text_problem(values[synthetic_field], synthetic_field,
                                                                           lists=True)

    kept = columns.rows_where(lambda values: problem(values) is None, [real_field, synthetic_field])
    bad = np.setdiff1d(rows, kept)
    if len(bad):
        first = int(bad[0])
        why = problem({name: columns.value(name, first) for name in (real_field, synthetic_field)})
        raise ManifestError(f"{columns.where(first)} (id {columns.value('id', first)!r}): {why} (and {len(bad) - 1} "
                            f"more samples); pretraining needs a caption in {real_field!r} and a list of captions in "
                            f"{synthetic_field!r}")


def make_texts_for(regime: str, real: list[str], synthetic: list[list[str]], swap_probability: float) -> Callable:
    """`texts_for(indices, rng)` of a regime over caption lists: the captions of `indices`."""
    if regime == "datacomp":
        return lambda indices, rng: [real[i] for i in indices]
    if regime == "datacompdr":
        return lambda indices, rng: datacompdr_texts(indices, real, synthetic, rng)
    if regime == "swap":
        return lambda indices, rng: swap_texts(indices, real, synthetic, swap_probability, rng)
    raise ValueError(f"unknown regime {regime!r}; choose datacomp, datacompdr or swap")


class RegimeTexts:
    """The trainer's `texts_for(rows, rng)` of a regime: the batch's captions read from the columns, then drawn."""

    def __init__(self, columns: Columns, regime: str, args: Args):
        make_texts_for(regime, [], [], args.swap_probability)  # an unknown regime fails here, before training
        self.columns, self.regime, self.args = columns, regime, args

    def __call__(self, rows: np.ndarray, rng: np.random.Generator):
        real = self.columns.column(self.args.real_field, rows)
        synthetic = [[v] if isinstance(v, str) else v for v in self.columns.column(self.args.synthetic_field, rows)]
        return make_texts_for(self.regime, real, synthetic, self.args.swap_probability)(np.arange(len(rows)), rng)


def loss_function(kernel: str, distributed: bool = False) -> Callable:
    """The contrastive loss: the plain PyTorch one, or the fused kernel when asked for by --kernel (under torchrun
    the kernel's all-gathered form: each rank's rows against the global batch)."""
    if kernel == "none":
        if distributed:
            raise ValueError("--kernel none is the one-process loss; under torchrun pass --kernel auto (or torch)")
        return contrastive_loss
    try:
        from caption_kernels.contrastive import clip_loss
    except ImportError as err:
        raise ImportError(f"--kernel {kernel} needs caption_kernels/contrastive.py ({err}); use --kernel none") from err
    return partial(clip_loss, impl=kernel, distributed=distributed)


# ---------------------------------------------------------------------------------------------
# Dense probes: segmentation (mIoU, mAcc) and depth (RMSE) from patch tokens
# ---------------------------------------------------------------------------------------------


def patch_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last block's patch tokens after the final LayerNorm, as a grid: (B, C, H/p, W/p)."""
    out = visual.forward_intermediates(images, indices=1, normalize_intermediates=True, intermediates_only=True)
    return out["image_intermediates"][-1]


class DenseProbe(nn.Module):
    """A 1x1 convolution per task on the (batch-normalised) patch grid, upsampled bilinearly to pixels."""

    def __init__(self, width: int, num_classes: int, tasks: Sequence[str] = ("seg", "depth")):
        super().__init__()
        self.norm = nn.BatchNorm2d(width)
        self.segment = nn.Conv2d(width, num_classes, kernel_size=1) if "seg" in tasks else None
        self.depth = nn.Conv2d(width, 1, kernel_size=1) if "depth" in tasks else None

    def forward(self, tokens: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        tokens = self.norm(tokens)  # (B, C, h, w)
        up = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        logits = up(self.segment(tokens)) if self.segment is not None else None  # (B, K, H, W)
        depth = up(self.depth(tokens))[:, 0] if self.depth is not None else None  # (B, H, W)
        return logits, depth


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(K, K) counts, rows = true class, columns = predicted class; ignored and out-of-range pixels skipped."""
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    flat = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor) -> dict:
    """mIoU, mAcc and pixel accuracy in percent, as mmseg: classes absent from labels and predictions skipped."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    # IoU_k = TP_k / (TP_k + FP_k + FN_k); mIoU = mean over classes with a non-empty union
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = true_positive / union  # NaN where a class is neither labelled nor predicted
    # Acc_k = TP_k / (TP_k + FN_k); mAcc = mean over labelled classes
    accuracy = true_positive / confusion.sum(1)
    return {"mIoU": 100 * np.nanmean(iou.numpy()).item(), "mAcc": 100 * np.nanmean(accuracy.numpy()).item(),
            "aAcc": 100 * (true_positive.sum() / confusion.sum()).item()}


def depth_rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image RMSE in metres over valid pixels (target > 0): (B,)."""
    valid = (target > 0).float()
    # RMSE_b = sqrt( sum_valid (d_pred - d)^2 / n_valid )
    squared = ((pred - target) ** 2 * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
    return squared.sqrt()


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Nearest-neighbour shortest-side resize + centre crop: open_clip's image transform, for label maps."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.NEAREST)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


TASK_FIELDS = {"seg": "mask", "depth": "depth"}  # probe task -> the manifest field that carries its labels


def reduce_zero_label(labels: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """mmseg's LoadAnnotations(reduce_zero_label=True): 0 (ADE20k's `other`) -> ignore, k -> k - 1, ignore stays."""
    # y' = ignore if y in {0, ignore} else y - 1
    return np.where((labels == 0) | (labels == ignore_index), ignore_index, labels - 1)


def load_mask(record: dict, size: int, num_classes: int, ignore_index: int, reduce_zero: bool) -> torch.Tensor:
    """A record's class-id PNG as (S, S) long, cropped like its image; a label outside the classes is an error."""
    path = image_source(record, "mask")
    labels = np.asarray(Image.open(path), dtype=np.int64)
    if labels.ndim != 2:
        raise ManifestError(f"{path} (sample {record.get('id')!r}): a mask must be one channel of class ids, "
                            f"got shape {labels.shape}")
    if reduce_zero:
        labels = reduce_zero_label(labels, ignore_index)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        values = np.unique(labels[bad])
        hint = ("labels run 1..K with 0 = `other` as in raw ADE20k: pass --reduce-zero-label"
                if not reduce_zero and values.max() == num_classes else "check --num-classes, --ignore-index and "
                "--reduce-zero-label")
        raise ManifestError(f"{path} (sample {record.get('id')!r}): label values {values[:10].tolist()} are outside "
                            f"0..{num_classes - 1} and not --ignore-index {ignore_index}; {hint}")
    cropped = resize_center_crop(Image.fromarray(labels.astype(np.int32)), size)  # mode I: any class id survives
    return torch.from_numpy(np.asarray(cropped, np.int64))


def load_depth(record: dict, size: int) -> torch.Tensor:
    """A record's uint16 millimetre PNG as (S, S) float metres, cropped like its image (0 stays 0 = invalid)."""
    depth = resize_center_crop(Image.open(image_source(record, "depth")), size)
    return torch.from_numpy(np.asarray(depth, np.float32) / 1000.0)


def dense_targets(record: dict, size: int, args: Args, fields: Sequence[str]) -> dict:
    """A record's label maps at (S, S) for `fields`: `mask` long class ids, `depth` float metres."""
    load = {"mask": lambda: load_mask(record, size, args.num_classes, args.ignore_index, args.reduce_zero_label),
            "depth": lambda: load_depth(record, size)}
    return {field: load[field]() for field in fields}


def label_fields(records: Sequence[dict], tasks: Sequence[str]) -> tuple[str, ...]:
    """The label fields of `tasks` that `records` carry; one that some records carry and others lack is an error."""
    fields = []
    for task, field in TASK_FIELDS.items():
        carriers = sum(bool(r.get(field)) for r in records) if task in tasks else 0
        if 0 < carriers < len(records):
            missing = next(r["id"] for r in records if not r.get(field))
            raise ManifestError(f"sample {missing!r} has no {field!r} while others do; give every record one")
        fields += [field] if carriers else []
    return tuple(fields)


class ProbeDataset(torch.utils.data.Dataset):
    """A probe manifest decoded item by item: {"image": (3, S, S), "mask": (S, S) long, "depth": (S, S) metres}, the
    `fields` asked. It holds the records only: DataLoader workers decode each batch, the set never sits in memory."""

    def __init__(self, records: Sequence[dict], preprocess: Callable, size: int, args: Args, fields: Sequence[str]):
        self.records, self.preprocess, self.size, self.args = records, preprocess, size, args
        self.fields = tuple(fields)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        item = dense_targets(record, self.size, self.args, [f for f in self.fields if f != "image"])
        if "image" in self.fields:
            image = open_image(image_source(record), str(record.get("id")))
            item["image"] = self.preprocess(image)  # as preprocess_images
        return item

    def only(self, fields: Sequence[str]) -> "ProbeDataset":
        """The same records, decoding only those of `fields` that this set carries."""
        kept = [f for f in self.fields if f in fields]
        return ProbeDataset(self.records, self.preprocess, self.size, self.args, kept)


def probe_plan(args: Args, records: dict) -> list[tuple[str, ...]]:
    """The probes to train per encoder: one per task by default, one joint probe only for --task joint."""
    train = records["probe_train"][:args.probe_train_images or None]
    carried = []
    for task, field in TASK_FIELDS.items():
        has = [any(r.get(field) for r in subset) for subset in (train, records["probe_test"])]
        if has[0] != has[1]:
            raise ManifestError(f"the probe {'train' if has[0] else 'test'} manifest carries {field!r} and the "
                                f"{'test' if has[0] else 'train'} manifest does not; give both or neither")
        carried += [task] if has[0] else []
    if not carried:
        raise ManifestError("the probe manifests carry neither `mask` nor `depth` fields: nothing to probe")
    if args.task == "each":
        return [(task,) for task in carried]
    wanted = ("seg", "depth") if args.task == "joint" else (args.task,)
    missing = [TASK_FIELDS[t] for t in wanted if t not in carried]
    if missing:
        raise ManifestError(f"--task {args.task} needs {missing} in the probe manifests, which carry only "
                            f"{[TASK_FIELDS[t] for t in carried]}")
    return [wanted]


def probe_loss(logits: torch.Tensor | None, depth: torch.Tensor | None, masks: torch.Tensor | None,
               target_depth: torch.Tensor | None, depth_mean: torch.Tensor, depth_std: torch.Tensor,
               ignore_index: int) -> dict:
    """The probe's training terms for the tasks whose labels are given; `loss` sums them (`--task joint`)."""
    terms = {}
    if masks is not None:
        # step 2: cross-entropy over labelled pixels (mask != ignore_index); logits (B, K, H, W), masks (B, H, W)
        terms["seg"] = F.cross_entropy(logits, masks, ignore_index=ignore_index)
    if target_depth is not None:
        # MSE on standardised depth over valid pixels: mean_{d > 0} (d_hat - (d - mu) / sigma)^2
        terms["depth"] = ((depth - (target_depth - depth_mean) / depth_std) ** 2)[target_depth > 0].mean()
    terms["loss"] = sum(terms.values())
    return terms


EVAL_BATCH = 256  # images per encoder pass outside training: the frozen token cache and the test set


def probe_loader(dataset: ProbeDataset, args: Args, **batching) -> torch.utils.data.DataLoader:
    """`dataset` in batches (`batch_size` or `batch_sampler`) decoded by --probe-workers processes (0: this one)."""
    return torch.utils.data.DataLoader(dataset, num_workers=args.probe_workers, **batching)


def epoch_batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless batches of min(batch_size, n) indices: epoch e is np.random.default_rng([seed, e]).permutation(n) cut
    into whole batches (the remainder sits that epoch out), each sorted so that a memory-mapped cache reads in order."""
    size = min(batch_size, n)
    for epoch in itertools.count():
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for start in range(0, n - size + 1, size):
            yield np.sort(order[start:start + size])


def depth_moments(depth: torch.Tensor) -> np.ndarray:
    """(count, sum, sum of squares) of the valid pixels (> 0) of a batch of depth maps, in float64."""
    valid = depth[depth > 0].double()
    return np.array([valid.numel(), valid.sum().item(), (valid ** 2).sum().item()])


def depth_statistics(moments: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (Bessel-corrected, as torch.std) of the valid training depth, from its summed moments."""
    count, total, squares = moments
    if count == 0:
        raise ManifestError("the probe training set has no valid depth pixel (every depth PNG is 0 = invalid)")
    mean = total / count
    # sigma^2 = (sum d^2 - n mu^2) / (n - 1): float64 sums over float32 metres, exact to float32 precision
    variance = max(squares - count * mean ** 2, 0.0) / max(count - 1, 1)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(variance ** 0.5, dtype=torch.float32).clamp_min(1e-6)


def cache_frozen(visual: nn.Module, dataset: ProbeDataset, args: Args, folder: Path) -> tuple[dict, np.ndarray]:
    """One pass of the frozen encoder over `dataset`: its patch tokens and label maps written to memory-mapped .npy
    files in `folder` (tokens in the encoder's float32: the numbers a recomputation gives), and the depth moments."""
    cache, moments, start = {}, np.zeros(3), 0
    with torch.no_grad():
        for batch in probe_loader(dataset, args, batch_size=EVAL_BATCH):
            batch["tokens"] = patch_tokens(visual, batch.pop("image").to(args.device)).cpu()  # (B, C, h, w)
            moments += depth_moments(batch["depth"]) if "depth" in batch else 0
            for field, values in batch.items():
                if field not in cache:  # (N, ...) of the first batch's dtype: float32 tokens, long masks, float depth
                    cache[field] = np.lib.format.open_memmap(folder / f"{field}.npy", mode="w+", shape=(
                        len(dataset), *values.shape[1:]), dtype=values.numpy().dtype)
                cache[field][start:start + len(values)] = values.numpy()
            start += len(values)
    return cache, moments


def training_batches(visual: nn.Module, train_set: ProbeDataset, args: Args, seed: int,
                     folder: Path) -> tuple[Iterable[dict], np.ndarray]:
    """(--probe-steps batches in epoch order, the moments of the training set's valid depth pixels).

    A frozen encoder's tokens are computed once and read back from a memory-mapped cache in `folder` (batches carry
    "tokens"); a fine-tuned encoder's batches carry "image"s decoded per step by the DataLoader's workers."""
    batches = itertools.islice(epoch_batches(len(train_set), args.probe_batch_size, seed), args.probe_steps)
    if args.finetune:
        moments = np.zeros(3)
        if "depth" in train_set.fields:  # a pass over the depth maps alone: the statistics need no image
            for batch in probe_loader(train_set.only(("depth",)), args, batch_size=EVAL_BATCH):
                moments += depth_moments(batch["depth"])
        return probe_loader(train_set, args, batch_sampler=batches), moments
    cache, moments = cache_frozen(visual, train_set, args, folder)
    return ({field: torch.from_numpy(values[order]) for field, values in cache.items()} for order in batches), moments


def evaluate_probe(visual: nn.Module, head: DenseProbe, test_set: ProbeDataset, tasks: Sequence[str],
                   depth_mean: torch.Tensor, depth_std: torch.Tensor, args: Args, per_item: dict | None = None) -> dict:
    """A trained probe's test metrics, the test set streamed in batches: confusion and per-image RMSEs summed.
    `per_item`, when given, receives each test image's share, what a one-seed verdict resamples: its RMSE, and
    its [true positives, predicted, labelled] pixels per class (whose sums give the mIoU: reproduce.py's
    miou_of_sums)."""
    confusion = torch.zeros(args.num_classes, args.num_classes, dtype=torch.long)
    rmse_sum, images, items = 0.0, 0, {} if per_item is None else per_item
    with torch.no_grad():
        for batch in probe_loader(test_set, args, batch_size=EVAL_BATCH):
            pixels = batch["image"].to(args.device)
            logits, depth = head(patch_tokens(visual, pixels), pixels.shape[-2:])
            if "seg" in tasks:
                predicted = logits.argmax(1).cpu()  # (B, H, W)
                for image_pred, image_mask in zip(predicted, batch["mask"]):
                    own = confusion_matrix(image_pred, image_mask, args.num_classes, args.ignore_index)
                    confusion += own
                    items.setdefault("mIoU", []).append([own.diag().tolist(), own.sum(0).tolist(), own.sum(1).tolist()])
            if "depth" in tasks:  # Deviation 3: RMSE per image, then the mean over images
                rmse = depth_rmse(depth.cpu() * depth_std + depth_mean, batch["depth"]).double()
                rmse_sum, images = rmse_sum + rmse.sum().item(), images + len(pixels)
                items.setdefault("depth_RMSE", []).extend(rmse.tolist())
    metrics = segmentation_metrics(confusion) if "seg" in tasks else {}
    if "depth" in tasks:
        metrics["depth_RMSE"] = rmse_sum / images
    return metrics



def train_and_evaluate_probe(visual: nn.Module, train_set: ProbeDataset, test_set: ProbeDataset, args: Args, seed: int,
                             tasks: Sequence[str] = ("seg", "depth"), per_item: dict | None = None) -> dict:
    """Train one DenseProbe on `tasks` of the probe datasets (losses summed if two); return its test metrics
    (per_item: see evaluate_probe)."""
    torch.manual_seed(seed)
    visual = visual.to(args.device)
    fields = ("image", *(TASK_FIELDS[task] for task in tasks))
    train_set, test_set = train_set.only(fields), test_set.only(fields)
    first = train_set[0]["image"][None].to(args.device)  # (1, 3, H, W)
    size = tuple(first.shape[-2:])
    with torch.no_grad():
        width = patch_tokens(visual.eval(), first).shape[1]
    head = DenseProbe(width, args.num_classes, tasks).to(args.device)  # before a DataLoader draws from torch's RNG
    groups = [{"params": head.parameters(), "lr": args.probe_lr}]
    if args.finetune:
        groups.append({"params": visual.parameters(), "lr": args.finetune_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="probe-cache-", dir=args.out) as folder:  # frozen tokens, deleted after
        batches, moments = training_batches(visual, train_set, args, seed, Path(folder))
        depth_mean, depth_std = (depth_statistics(moments) if "depth" in tasks else
                                 (torch.tensor(0.0), torch.tensor(1.0)))
        visual.train(args.finetune)  # the head is a fresh module, in training mode
        for batch in batches:
            tokens = (batch["tokens"].to(args.device) if "tokens" in batch else  # (B, C, h, w)
                      patch_tokens(visual, batch["image"].to(args.device)))
            logits, depth = head(tokens, size)
            masks = batch["mask"].to(args.device) if "seg" in tasks else None
            target = batch["depth"].to(args.device) if "depth" in tasks else None
            loss = probe_loss(logits, depth, masks, target, depth_mean, depth_std, args.ignore_index)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    head.eval()
    visual.eval()
    return evaluate_probe(visual, head, test_set, tasks, depth_mean, depth_std, args, per_item)


def probe_encoder(visual: nn.Module, train_set: ProbeDataset, test_set: ProbeDataset, args: Args, seed: int,
                  plan: Sequence[tuple[str, ...]]) -> dict:
    """One probe per entry of `plan`, each from the same encoder weights (copied when --finetune trains them)."""
    metrics, items = {}, {}
    for tasks in plan:
        encoder = copy.deepcopy(visual) if args.finetune and len(plan) > 1 else visual
        metrics.update(train_and_evaluate_probe(encoder, train_set, test_set, args, seed, tasks, items))
    return {**metrics, "per_item": items}


def majority_class(train_set: ProbeDataset, args: Args) -> int:
    """The most frequent labelled class over the probe's training masks (the miniature world's: background)."""
    counts = torch.zeros(args.num_classes, dtype=torch.long)
    for batch in probe_loader(train_set.only(("mask",)), args, batch_size=EVAL_BATCH):
        labels = batch["mask"][batch["mask"] != args.ignore_index]  # load_mask refused any other out-of-range id
        counts += torch.bincount(labels, minlength=args.num_classes)
    return int(counts.argmax())


def position_mean_depth(train_set: ProbeDataset, args: Args) -> torch.Tensor:
    """(S, S) each pixel's mean valid training depth: what position alone predicts; a pixel never valid in training
    gets the mean of all valid pixels."""
    total, count = 0, 0  # (S, S) sums after the first batch
    for batch in probe_loader(train_set.only(("depth",)), args, batch_size=EVAL_BATCH):
        valid = (batch["depth"] > 0).double()
        total, count = total + (batch["depth"].double() * valid).sum(0), count + valid.sum(0)
    overall = total.sum() / count.sum().clamp_min(1)
    # step 5: d_hat(p) = sum_i d_i(p) [d_i(p) > 0] / sum_i [d_i(p) > 0]
    return torch.where(count > 0, total / count.clamp_min(1), overall).float()


def trivial_baselines(train_set: ProbeDataset, test_set: ProbeDataset, tasks: Sequence[str], args: Args) -> dict:
    """The floors a dense probe has to beat, on the probe's test set: segmentation by predicting the training set's
    majority class at every pixel (mIoU, mAcc), depth by each pixel's mean training depth (RMSE, Deviation 3).
    `per_item`: each test image's share, as evaluate_probe's (a one-seed verdict pairs the probes with them)."""
    baselines, items = {}, {}
    if "seg" in tasks:
        k = majority_class(train_set, args)  # step 5: argmax_k of the training masks' class counts, at every pixel
        confusion = torch.zeros(args.num_classes, args.num_classes, dtype=torch.long)
        for batch in probe_loader(test_set.only(("mask",)), args, batch_size=EVAL_BATCH):
            for mask in batch["mask"]:
                own = confusion_matrix(torch.full_like(mask, k), mask, args.num_classes, args.ignore_index)
                confusion += own
                items.setdefault("majority_class_mIoU", []).append(
                    [own.diag().tolist(), own.sum(0).tolist(), own.sum(1).tolist()])
        metrics = segmentation_metrics(confusion)
        baselines.update(majority_class=k, majority_class_mIoU=metrics["mIoU"], majority_class_mAcc=metrics["mAcc"])
    if "depth" in tasks:
        mean_depth, rmse_sum, images = position_mean_depth(train_set, args), 0.0, 0
        for batch in probe_loader(test_set.only(("depth",)), args, batch_size=EVAL_BATCH):
            rmse = depth_rmse(mean_depth.expand_as(batch["depth"]), batch["depth"]).double()
            rmse_sum, images = rmse_sum + rmse.sum().item(), images + len(batch["depth"])
            items.setdefault("position_only_depth_RMSE", []).extend(rmse.tolist())
        baselines["position_only_depth_RMSE"] = rmse_sum / images
    return {**baselines, "per_item": items}


# ---------------------------------------------------------------------------------------------
# Mean attention distance (ViT paper, App. D.7)
# ---------------------------------------------------------------------------------------------


def patch_distances(grid: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """(P, P) pixel distance between patch centres, P = grid_h * grid_w, row-major like the tokens."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    rows, cols = rows.flatten().double(), cols.flatten().double()
    # distance(q, j) = || (patch_h * (row_q - row_j), patch_w * (col_q - col_j)) ||_2
    return torch.sqrt((patch_size[0] * (rows[:, None] - rows[None])) ** 2 +
                      (patch_size[1] * (cols[:, None] - cols[None])) ** 2)


def uniform_attention_distance(grid: tuple[int, int], patch_size: tuple[int, int]) -> float:
    """The mean attention distance of a head that attends to every patch alike: the mean distance between patches."""
    return patch_distances(grid, patch_size).mean().item()


def mean_attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """attn (B, H, 1+P, 1+P), rows = queries, token 0 = CLS -> (H,) mean distance in pixels."""
    patches = attn[:, :, 1:, 1:].double()  # (B, H, P, P): CLS row and column dropped, not renormalised
    # step 4: d_h = mean_b mean_q sum_j attn_bh(q, j) * distance(q, j)
    return (patches * patch_distances(grid, patch_size)).sum(-1).mean(dim=(0, 2))


def attention_blocks(visual: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an open_clip ViT tower, each with an nn.MultiheadAttention; else TypeError."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not all(isinstance(getattr(block, "attn", None), nn.MultiheadAttention) for block in blocks):
        raise TypeError(f"{type(visual).__name__} has no blocks with nn.MultiheadAttention: attention "
                        "distance supports open_clip VisionTransformer towers only")
    return blocks


@torch.no_grad()
def attention_maps(visual: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Per layer (B, H, L, L) attention probabilities, recomputed from each block's captured input."""
    blocks = attention_blocks(visual)
    captured = {}
    hooks = [block.attn.register_forward_pre_hook(lambda module, a, kw, i=i: captured.__setitem__(i, (a, kw)),
                                                  with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        visual(images)
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for i, block in enumerate(blocks):
        inputs, kwargs = captured[i]
        # softmax(Q K^T / sqrt(d_head)) per head, from the block's own projections
        _, weights = block.attn(*inputs[:3], need_weights=True, average_attn_weights=False,
                                attn_mask=kwargs.get("attn_mask"))
        maps.append(weights.float().cpu())  # (B, H, L, L)
    return maps


def architecture(spec: str) -> tuple[str, bool]:
    """(open_clip model name, QuickGELU forced) that `spec` builds: a checkpoint's saved name, a tag's settings."""
    if Path(spec).is_file():
        return torch.load(spec, map_location="cpu", weights_only=True, mmap=True)["model"], False
    name, _, tag = spec.partition("@")
    return name, tag_settings(name, tag)["force_quick_gelu"]


def create_random(name: str, quick_gelu: bool, seed: int) -> tuple[nn.Module, Callable]:
    """An untrained open_clip model of an architecture: (model, preprocess), as create_clip seeds it."""
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, force_quick_gelu=quick_gelu)
    return model, preprocess


def load_model_spec(spec: str, device: str = "cpu") -> tuple[str, nn.Module, Callable]:
    """(label, model, preprocess) for a checkpoint path, `NAME@PRETRAINED` or `NAME` (random init)."""
    if Path(spec).is_file():
        payload = torch.load(spec, map_location="cpu", weights_only=True)
        model, preprocess = create_random(payload["model"], False, seed=0)  # no tokenizer: it takes a second to build
        model.load_state_dict(payload["state_dict"])
        return payload.get("label", Path(spec).stem), model.to(device).eval(), preprocess
    name, _, tag = spec.partition("@")
    if not tag:
        model, preprocess = create_random(name, False, seed=0)  # = create_clip(name)'s model
        return f"{name} (random init)", model.to(device).eval(), preprocess
    try:  # the tag's own settings: QuickGELU for OpenAI-style weights, its preprocessing
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device=device,
                                                                     **tag_settings(name, tag))
    except Exception as err:  # offline or unknown tag: one clear error, no retries
        raise MissingWeightsError(f"cannot load open_clip {name!r} with pretrained {tag!r} ({err}); offline, pass a "
                           "local weights file as NAME@/path/to/weights.bin or one of our .pt checkpoints") from err
    return spec, model.eval(), preprocess


# ---------------------------------------------------------------------------------------------
# DataCompDR's synthetic captions (MobileCLIP's dataset reinforcement)
# ---------------------------------------------------------------------------------------------

# apple/ml-mobileclip-dr scripts/gen.py (CaptionModel): coca_ViT-L-14 @ mscoco_finetuned_laion2B-s13B-b90k, 5 samples,
# model.generate(images, generation_type="top_p", top_p=0.9, fixed_output_length=True); the rest are open_clip's
# defaults, pinned here so that an open_clip release cannot change them: at most 30 tokens with <start_of_text> and
# <end_of_text> (ml-mobileclip-dr issue 4's "a 2 2 2 2 ..." came with seq_len=77; some CoCas loop, long-context ones
# most), at least 5, temperature 1, no repetition penalty. fixed_output_length pads every row to seq_len (a batch
# stacks).
COCA_SAMPLING = {"generation_type": "top_p", "top_p": 0.9, "temperature": 1.0, "seq_len": 30, "min_seq_len": 5,
                 "repetition_penalty": 1.0, "fixed_output_length": True}


def enable_coca_sampling() -> None:
    """Let CoCa.generate sample under transformers 5. open_clip 3.3 imports BeamSearchScorer, which transformers 5
    removed (open_clip issue 1129), in the same try as the classes of its top-p path; the import fails as a whole and
    generate refuses to run. Those classes are all still in transformers 5: bind them. Beam search stays unavailable."""
    from open_clip import coca_model

    if coca_model._has_transformers:
        return
    import transformers

    for name in ("LogitsProcessorList", "TopPLogitsWarper", "RepetitionPenaltyLogitsProcessor",
                 "MinLengthLogitsProcessor", "MaxLengthCriteria", "StoppingCriteriaList"):
        setattr(coca_model, name, getattr(transformers, name))
    coca_model.GENERATION_TYPES["top_p"] = transformers.TopPLogitsWarper
    coca_model._has_transformers = True


def load_captioner(spec: str, device: str) -> tuple[nn.Module, Callable]:
    """(CoCa, its preprocess) of --captioner; a missing weight (offline, a wrong path) is one error naming the flag."""
    try:
        if not Path(spec).is_file() and "@" not in spec:
            raise RuntimeError("a captioner needs weights: NAME@TAG, NAME@/path/to/weights or a .pt checkpoint")
        _, model, preprocess = load_model_spec(spec, device)
    except RuntimeError as err:
        raise MissingWeightsError(f"--captioner {spec}: {err}") from None
    if not hasattr(model, "generate"):
        raise ValueError(f"--captioner {spec}: a {type(model).__name__} has no text decoder; pass a CoCa")
    enable_coca_sampling()
    return model, preprocess  # eval mode, on the device


def decode_caption(tokens: torch.Tensor) -> str:
    """gen.py's post-processing: the text between <start_of_text> and <end_of_text>, up to its first period."""
    return open_clip.decode(tokens).split("<end_of_text>")[0].split("<start_of_text>")[-1].split(".")[0].strip()


@torch.no_grad()
def synthesize_captions(model: nn.Module, pixels: torch.Tensor, ids: Sequence[str], args: Args,
                        counter: DegenerateCounter, counts) -> list[list[str]]:
    """k captions per image: each image repeated k times in one generate batch (k independent draws, as gen.py's k
    calls); a degenerate draw is drawn again, at most --resample-degenerate times, then dropped (counted)."""
    captions: list[list[str]] = [[] for _ in ids]
    todo = [i for i in range(len(ids)) for _ in range(args.num_synthetic)]  # one entry per caption still wanted
    for _ in range(1 + args.resample_degenerate):
        if not todo:
            break
        tokens = model.generate(pixels[todo], **COCA_SAMPLING)  # step 6: x_syn ~ CoCa(img), top-p 0.9; (len(todo), 30)
        failed = []
        for i, row in zip(todo, tokens):
            text = decode_caption(row)
            if counter.check(text, ids[i]) is None:  # else a reason: "repeated token: '2' 4 times in a row", ...
                captions[i].append(text)
            else:
                failed.append(i)
        counts["degenerate"] += len(failed)
        todo = failed
    counts["degenerate_dropped"] += len(todo)
    return captions


def run_synthesize(args: Args) -> dict:
    """The synthesize stage: --num-synthetic captions per --data image into --synthetic-field, every field kept;
    common.generate.generate_sharded streams the input, shards it over ranks and resumes a killed run."""
    if args.data is None:
        raise FileNotFoundError("the synthesize stage needs --data (the image manifest or shards to caption)")
    rank, world_size, device = init_distributed(args.device)
    out = Path(args.out)  # a manifest in: this .jsonl, or synthetic.jsonl in this folder; shards in: shards out here
    out = out / "synthetic.jsonl" if out.suffix != ".jsonl" and not is_shards(args.data) else out
    # a resume passes over what is written: only over captions of these settings
    check_resumable(args.data, out, {"data": args.data, "sampling": COCA_SAMPLING, **{name: getattr(args, name) for name in (
        "captioner", "synthetic_field", "num_synthetic", "resample_degenerate", "seed")}}, rank, world_size)
    model, preprocess = load_captioner(args.captioner, device)
    torch.manual_seed(args.seed + rank)
    counter, skipped = DegenerateCounter(), SkipCounter()

    def process_batch(batch: list[dict], counts) -> list[tuple[dict, dict]]:
        kept = [(record, image) for record in batch if (image := open_record_image(record, skipped)) is not None]
        counts["unreadable_images"] += len(batch) - len(kept)
        if not kept:
            return []
        pixels = torch.stack([preprocess(image) for _, image in kept]).to(device)
        lists = synthesize_captions(model, pixels, [str(r["id"]) for r, _ in kept], args, counter, counts)
        counts["captions"] += sum(map(len, lists))
        counts["images_without_caption"] += sum(not c for c in lists)  # left out: no line, no shard member
        return [(record, {args.synthetic_field: c}) for (record, _), c in zip(kept, lists) if c]

    counts = generate_sharded(args.data, out, args.gen_batch_size, process_batch, rank, world_size, "synthesize")
    if rank == 0:  # the counts of every rank; the degenerate examples of this one
        print(f"synthesize: {counts.get('captions', 0)} captions written, {counts.get('degenerate_dropped', 0)} "
              f"degenerate dropped -> {out}; {counts}\n{counter.line('synthetic draws', 'drawn again')}")
    return {"out": str(out), **counts}


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


MANIFESTS = {"train": ("train_manifest", "train"), "test": ("test_manifest", "test"),
             "probe_train": ("probe_train_manifest", "train"), "probe_test": ("probe_test_manifest", "test"),
             "images": ("images_manifest", "test")}  # role -> (flag, the world's split it falls back to)
STAGE_MANIFESTS = {"pretrain": ("train", "test"), "probe": ("probe_train", "probe_test"), "attention": ("images",),
                   "efficiency": ("train", "test", "probe_train", "probe_test"), "miniature": tuple(MANIFESTS)}


def world_records(args: Args, roles: Sequence[str] = tuple(MANIFESTS)) -> dict:
    """The manifests of `roles` named by the args, falling back to the miniature world's splits (built only then).
    The pretraining set (`train`) is indexed into common.data.Columns (a manifest or webdataset shards, any size);
    the others are lists of records."""
    given = {role: getattr(args, MANIFESTS[role][0]) for role in roles}
    folder = ensure_world(args.world) if not all(given.values()) else None  # cached after the first build (seconds)
    texts = {"test": (args.eval_text_field,)}  # what a role's records are read for as text, checked line by line
    return {role: (index_data(given[role] or str(folder / "train.jsonl")) if role == "train"
                   else read_manifest(given[role] or folder / f"{MANIFESTS[role][1]}.jsonl", texts=texts.get(role, ())))
            for role in roles}


def training_images(args: Args, columns: Columns):
    """What the trainer decodes: the Columns themselves (lazily, in --train.workers workers), or for the miniature
    world (no --train-manifest) its images preprocessed once into one tensor shared by every pretraining."""
    if args.train_manifest is not None:
        return columns
    return preprocess_images(columns, create_clip(args.model)[1])  # (N, 3, H, W)


def pretrain_one(args: Args, records: dict, regime: str, seed: int, n_images: int, path: Path, images=None) -> dict:
    """Pretrain one CLIP on the first n_images of the training set in a regime (torchrun: DDP); save and evaluate it
    (rank 0). `images`: what training_images gives, computed once by the caller (default: computed here)."""
    columns = records["train"]
    model, preprocess, tokenizer = create_clip(args.model, seed=seed)
    schedule = dataclasses.replace(args.train, seed=seed)  # the same schedule for every regime and subset
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    state = path.with_name(f"{path.stem}.train-state.pt")  # resumable while training; removed once the model is saved
    train_log = train_clip(model, tokenizer, training_images(args, columns) if images is None else images,
                           RegimeTexts(columns, regime, args), schedule, preprocess=preprocess,
                           rows=np.arange(n_images),
                           loss_fn=loss_function(args.kernel, distributed), device=args.device, checkpoint=state,
                           recipe={"model": args.model, "regime": regime, "data": columns.source}, progress=False,
                           desc=f"pretrain {regime}-n{n_images}-seed{seed}")
    history, seconds = train_log["history"], train_log["train_seconds"]
    row = {"regime": regime, "seed": seed, "train_images": n_images, "checkpoint": str(path),
           "final_loss": history[-1]["loss"], "train_seconds": seconds}
    if distributed and dist.get_rank() != 0:
        return row
    device = next(model.parameters()).device
    test_images = ImageRows(records["test"], preprocess)  # decoded batch by batch
    label, per_item = f"{regime}-n{n_images}-seed{seed}", {}  # each test item's value of every metric
    if "objects" in records["test"][0]:
        metrics = evaluate_world(model, tokenizer, preprocess, records["test"], args.eval_text_field,
                                 images=test_images, device=device, name=label, per_item=per_item)
    else:
        img_emb = encode_images(model, test_images, device=device, workers=args.train.workers)
        texts = texts_of(records["test"], args.eval_text_field)
        metrics = retrieval_metrics(img_emb, encode_texts(model, tokenizer, texts, device=device), name=label,
                                    per_item=per_item)
    metrics["per_item"] = {"i2t_R@1": per_item["i2t_R@1"]}  # what a one-seed verdict resamples (reproduce.py)
    if args.benchmark:  # clip_benchmark's rows, in pretrain.json and (all models) OUT/benchmarks.jsonl
        metrics["benchmarks"] = evaluate_benchmarks(model, preprocess, tokenizer, args.benchmark, args.benchmark_root,
                                                    num_workers=args.train.workers, model_label=args.model,
                                                    pretrained=str(path))
    save_checkpoint(path, {"state_dict": model.state_dict(), "model": args.model, "label": label, "regime": regime,
                           "seed": seed, "train_images": n_images, "train": dataclasses.asdict(schedule)})
    state.unlink(missing_ok=True)
    print(f"pretrained {label}: loss {history[-1]['loss']:.3f} in {seconds:.0f} s; R@1 i2t "
          f"{metrics.get('i2t_R@1', float('nan')):.1f}")
    return {**row, **metrics}


def run_pretrain(args: Args, records: dict) -> list[dict]:
    # one pass over the captions for every regime and seed (a scan of the whole set at DataCompDR's 12M)
    check_captions(records["train"], np.arange(len(records["train"])), args.real_field, args.synthetic_field)
    if args.benchmark:
        check_benchmarks(args.benchmark, args.benchmark_root)  # before any model trains
    images = training_images(args, records["train"])
    rows = [pretrain_one(args, records, regime, seed, len(records["train"]),
                         Path(args.out) / "pretrain" / f"{regime}-seed{seed}.pt", images)
            for seed in seed_range(args) for regime in args.regimes]
    if int(os.environ.get("RANK", 0)) == 0:
        atomic_write_text(Path(args.out) / "pretrain.json", json.dumps(rows, indent=2))
        if args.benchmark:
            write_benchmark_results([r for row in rows for r in row["benchmarks"]], args.out)
    return rows


def probe_sets(args: Args, records: dict, preprocess: Callable,
               tasks: Sequence[str]) -> tuple[ProbeDataset, ProbeDataset]:
    """Datasets over the probe's train and test manifests that decode image and label maps per item, at the model's
    input size."""
    train = records["probe_train"][:args.probe_train_images or None]
    size = preprocess(Image.new("RGB", (8, 8))).shape[-1]  # the side of the transform's square crop, whatever the input
    train_set, test_set = (ProbeDataset(subset, preprocess, size, args, ("image", *label_fields(subset, tasks)))
                           for subset in (train, records["probe_test"]))
    return train_set, test_set


def random_architecture(args: Args, checkpoints: Sequence[str]) -> tuple[str, bool]:
    """The architecture of the `random` baseline: the probed checkpoints' (which must agree), else --model."""
    found = {spec: architecture(spec) for spec in checkpoints if spec != "random"}
    kinds = set(found.values())
    if len(kinds) > 1:
        listing = ", ".join(f"{spec}: {name}{' (QuickGELU)' if quick else ''}" for spec, (name, quick) in found.items())
        raise ValueError(f"`random` must be the probed checkpoints' architecture, but they differ ({listing}); "
                         "probe each architecture with its own `random` in a separate run")
    return kinds.pop() if kinds else (args.model, False)


def run_probe(args: Args, records: dict, checkpoints: Sequence[str], write: Path | None = None) -> list[dict]:
    """Probe each checkpoint (`random`: an untrained encoder of their architecture, per seed); write the rows."""
    plan = probe_plan(args, records)
    tasks = sorted({task for group in plan for task in group})
    if "random" in checkpoints:
        random_name, random_quick_gelu = random_architecture(args, checkpoints)
    rows = []
    for spec in checkpoints:
        for seed in (seed_range(args) if spec == "random" else [args.seed]):
            if spec == "random":
                model, preprocess = create_random(random_name, random_quick_gelu, seed)
                label = f"{random_name}{' (QuickGELU)' if random_quick_gelu else ''} (random init)"
                arch = random_name
            else:
                label, model, preprocess = load_model_spec(spec, args.device)
                arch = architecture(spec)[0]
            metrics = probe_encoder(model.visual, *probe_sets(args, records, preprocess, tasks), args, seed, plan)
            rows.append({"checkpoint": spec, "label": label, "architecture": arch, "probe_seed": seed,
                         "finetune": args.finetune, "task": args.task, **metrics})
            print(f"probe {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "per_item"))
    if write is not None:
        atomic_write_text(write, json.dumps(rows, indent=2))
    return rows


def run_baselines(args: Args, records: dict) -> dict:
    """The trivial baselines of the probe's tasks (`trivial_baselines`) at --model's input size; baselines.json."""
    tasks = sorted({task for group in probe_plan(args, records) for task in group})
    _, preprocess = create_random(args.model, False, seed=0)  # only its crop size is used: no tokenizer to build
    baselines = trivial_baselines(*probe_sets(args, records, preprocess, tasks), tasks, args)
    atomic_write_text(Path(args.out) / "baselines.json", json.dumps(baselines, indent=2))
    return baselines


def run_efficiency(args: Args, records: dict, done: Sequence[dict] = (), probed: Sequence[dict] = ()) -> list[dict]:
    """Pretrain each regime on nested subsets and probe each; reuse full-set runs already in `done` and their probe
    rows in `probed` (the same checkpoint: the efficiency table shows the numbers of the regime table)."""
    rows, images = [], None
    for seed in seed_range(args):  # step 3: nested subsets, each pretrained with one schedule and probed
        for regime in args.regimes:
            for fraction in args.subset_fractions if regime in args.efficiency_regimes else [max(args.subset_fractions)]:
                n_images = max(1, round(fraction * len(records["train"])))
                run = next((r for r in done if (r["regime"], r["seed"], r["train_images"]) == (regime, seed, n_images)), None)
                if run is None and images is None:  # the first subset to pretrain: check the largest, decode once
                    largest = max(max(1, round(f * len(records["train"]))) for f in args.subset_fractions)
                    check_captions(records["train"], np.arange(largest), args.real_field, args.synthetic_field)
                    images = training_images(args, records["train"])
                if run is None:
                    run = pretrain_one(args, records, regime, seed, n_images,
                                       Path(args.out) / "efficiency" / f"{regime}-n{n_images}-seed{seed}.pt", images)
                probe = next((p for p in probed if p["checkpoint"] == run["checkpoint"]), None)
                if probe is None:
                    probe = run_probe(dataclasses.replace(args, seed=seed, seeds=1), records, [run["checkpoint"]])[0]
                rows.append({**run, **{k: v for k, v in probe.items()
                                       if k in ("mIoU", "mAcc", "aAcc", "depth_RMSE", "per_item")}})
    atomic_write_text(Path(args.out) / "efficiency.json", json.dumps(rows, indent=2))
    plot_efficiency(rows, Path(args.out) / "efficiency.png")
    return rows


def run_attention(args: Args, records: dict, specs: Sequence[str], rank: int = 0, world_size: int = 1) -> dict:
    """Mean attention distance per layer and head of each model over the same images (PNG + JSON).

    Under torchrun each rank measures every world_size-th image; the per-image sums are all-reduced
    and rank 0 writes.
    """
    chosen = records["images"][:args.attention_images]
    mine = shard(chosen, rank, world_size)
    results = {}
    for spec in specs:
        label, model, preprocess = load_model_spec(spec, args.device)
        visual = model.visual
        blocks = attention_blocks(visual)
        images = preprocess_images(mine, preprocess) if mine else torch.zeros(0)  # (n, 3, H, W)
        # sum over images of d_h(image): (layers, heads), divided by the number of images at the end
        total = torch.zeros(len(blocks), blocks[0].attn.num_heads, dtype=torch.float64, device=args.device)
        for i in range(0, len(images), 32):  # one batch of maps at a time: ViT-B/16 maps are 2 GB per 128 images
            batch = images[i:i + 32].to(args.device)
            maps = attention_maps(visual, batch)
            total += len(batch) * torch.stack([mean_attention_distance(m, visual.grid_size, visual.patch_size)
                                               for m in maps]).to(args.device)  # (layers, heads)
        print(f"attention {label}: {len(mine)} of {len(chosen)} images on rank {rank} of {world_size}")
        if world_size > 1:
            dist.all_reduce(total)
        results[label] = {"spec": spec, "per_layer_per_head_px": (total.cpu() / len(chosen)).tolist(),
                          "uniform_px": uniform_attention_distance(visual.grid_size, visual.patch_size),
                          "patch_size": list(visual.patch_size), "grid": list(visual.grid_size), "images": len(chosen)}
    if rank == 0:
        atomic_write_text(Path(args.out) / "attention.json", json.dumps(results, indent=2))
        plot_attention(results, Path(args.out) / "attention.png")
    return results


# ---------------------------------------------------------------------------------------------
# Plots and the report
# ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def attention_group(label: str) -> str:
    """The group a model's attention is judged in: its regime for our checkpoints (`datacompdr-n5000-seed1` ->
    `datacompdr`), else the label itself (an open_clip tag, an untrained model)."""
    match = re.fullmatch(r"(.+)-n\d+-seed\d+", label)
    return match.group(1) if match else label


def attention_by_group(results: dict) -> dict[str, list[str]]:
    """{group: labels of its models}, in the order the models were measured."""
    groups: dict[str, list[str]] = {}
    for label in results:
        groups.setdefault(attention_group(label), []).append(label)
    return groups


def last_layer_distance(result: dict) -> float:
    """A model's last-layer mean attention distance, heads averaged: the number the locality claim compares."""
    return float(np.mean(result["per_layer_per_head_px"][-1]))


def plot_attention(results: dict, path: Path) -> None:
    """One panel per group (regime): x = layer, one dot per head and model, a line per model through its head means,
    and a dashed line at uniform attention (every patch alike)."""
    plt = _pyplot()
    groups = attention_by_group(results)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.4 * len(groups), 3.4), sharey=True, squeeze=False)
    for ax, (group, labels) in zip(axes[0], groups.items()):
        for colour, label in enumerate(labels):
            per_layer = results[label]["per_layer_per_head_px"]
            layers = range(1, len(per_layer) + 1)
            for layer, heads in zip(layers, per_layer):
                ax.scatter([layer] * len(heads), heads, s=10, color=f"C{colour}", alpha=0.6)
            ax.plot(list(layers), [np.mean(heads) for heads in per_layer], color=f"C{colour}", label=label)
        ax.axhline(results[labels[0]]["uniform_px"], color="grey", linestyle="--", label="uniform attention")
        ax.set_title(f"{group} ({len(labels)} model{'s' * (len(labels) > 1)})", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(list(layers))
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("mean attention distance (px)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_efficiency(rows: Sequence[dict], path: Path) -> None:
    """mIoU and depth RMSE against the number of pretraining images, one line per regime (mean +- std over seeds)."""
    plt = _pyplot()
    metrics = [m for m in ("mIoU", "depth_RMSE") if m in rows[0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for regime in dict.fromkeys(r["regime"] for r in rows):
            sizes = sorted({r["train_images"] for r in rows if r["regime"] == regime})
            values = [[r[metric] for r in rows if r["regime"] == regime and r["train_images"] == n] for n in sizes]
            ax.errorbar(sizes, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker="o",
                        capsize=3, label=regime)
        ax.set_xscale("log")
        ax.set_xlabel("pretraining images")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(rows: Sequence[dict], key: str, metrics: Sequence[str]) -> dict:
    """{group: {metric: (mean, std, n)}} over rows grouped by `key`."""
    return {group: {m: (float(np.mean(v)), float(np.std(v)), len(v)) for m in metrics
                    if (v := [r[m] for r in members if m in r])} for (group,), members in _groups(rows, (key,)).items()}


def claim_line(name: str, rows: Sequence[dict], metric: str, better: str) -> str:
    """Whether DataCompDR beats DataComp on `metric` over seeds, by the one verdict rule (common.claims.verdict)."""
    values = {regime: [r[metric] for r in group if metric in r] for (regime,), group in _groups(rows, ("regime",)).items()}
    datacomp, datacompdr = values.get("datacomp"), values.get("datacompdr")
    if not datacomp or not datacompdr:
        return f"- {name}: not measured (needs both regimes)."
    return (f"- {name}: DataComp {mean_spread(datacomp)} vs DataCompDR {mean_spread(datacompdr)} ({metric}, "
            f"{min(len(datacomp), len(datacompdr))} seed(s)): {verdict(datacompdr, datacomp, '>' if better == 'higher' else '<')}.")


def efficiency_line(rows: Sequence[dict]) -> str:
    """Which DataCompDR subset first matches DataComp's largest-subset mIoU (the paper: a 10x smaller one)."""
    mean_miou = {key: np.mean([r["mIoU"] for r in group]) for key, group in _groups(rows, ("regime", "train_images")).items()}
    datacomp = sorted(n for regime, n in mean_miou if regime == "datacomp")
    datacompdr = sorted(n for regime, n in mean_miou if regime == "datacompdr")
    if not datacomp or not datacompdr:
        return "- 10x data efficiency: not measured (needs both regimes)."
    target = mean_miou[("datacomp", datacomp[-1])]
    match = next((n for n in datacompdr if mean_miou[("datacompdr", n)] >= target), None)
    if match is None:
        return f"- 10x data efficiency: no DataCompDR subset reaches DataComp's {target:.2f} mIoU on {datacomp[-1]} images: does not show."
    return (f"- 10x data efficiency: DataCompDR on {match} images reaches DataComp's {target:.2f} mIoU on "
            f"{datacomp[-1]} ({datacomp[-1] / match:.1f}x fewer; subsets tried: {datacompdr}).")


def attention_line(attention: dict) -> str:
    """Whether DataCompDR models attend more locally in the last layer than DataComp models, over the models of each
    regime (one per seed), by the one verdict rule (common.claims.verdict)."""
    last = {group: [last_layer_distance(attention[label]) for label in labels]
            for group, labels in attention_by_group(attention).items()}
    if not {"datacomp", "datacompdr"} <= set(last):
        return "- more local deep heads with DataCompDR: not measured (needs both regimes)."
    uniform = next(iter(attention.values()))["uniform_px"]
    return (f"- more local deep heads with DataCompDR: last layer DataComp {mean_spread(last['datacomp'], 1)} px vs "
            f"DataCompDR {mean_spread(last['datacompdr'], 1)} px ({min(len(last['datacomp']), len(last['datacompdr']))} "
            f"model(s) a regime; uniform attention {uniform:.1f} px): {verdict(last['datacompdr'], last['datacomp'], '<')}.")


def write_report(out: Path, pretrain: list, probe: list, efficiency: list, attention: dict, baselines: dict,
                 seconds: float) -> str:
    """results.md: the tables and, claim by claim, whether the miniature shows it."""
    pre = summarise(pretrain, "regime", ["i2t_R@1", "t2i_R@1", "zeroshot_shape", "zeroshot_color", "zeroshot_entity"])
    by_regime = [{**p, "regime": next((r["regime"] for r in pretrain if r["checkpoint"] == p["checkpoint"]), "random init")}
                 for p in probe]
    dense = summarise(by_regime, "regime", ["mIoU", "mAcc", "depth_RMSE"])
    fmt = lambda s, m: f"{s[m][0]:.2f} ± {s[m][1]:.2f}" if m in s else "-"  # noqa: E731
    lines = ["# CLIP with Quality Captions on the miniature world",
             "", "A controlled experiment on synthetic shapes, not evidence about real data.",
             f"Seeds: {len({r['seed'] for r in pretrain})}; wall time {seconds:.0f} s.", "",
             "| regime | i2t R@1 | t2i R@1 | zero-shot shape | zero-shot entity | probe mIoU | probe mAcc | depth RMSE (m) |",
             "|---|---|---|---|---|---|---|---|"]
    for regime in list(pre) + ["random init"]:  # the untrained encoder is the floor every regime must beat
        p, d = pre.get(regime, {}), dense.get(regime, {})
        lines.append(f"| {regime} | {fmt(p, 'i2t_R@1')} | {fmt(p, 't2i_R@1')} | {fmt(p, 'zeroshot_shape')} | "
                     f"{fmt(p, 'zeroshot_entity')} | {fmt(d, 'mIoU')} | {fmt(d, 'mAcc')} | {fmt(d, 'depth_RMSE')} |")
    if "majority_class_mIoU" in baselines:  # no encoder at all: the floors of the dense columns
        lines.append(f"| (no encoder) class {baselines['majority_class']} at every pixel | - | - | - | - | "
                     f"{baselines['majority_class_mIoU']:.2f} | {baselines['majority_class_mAcc']:.2f} | - |")
    if "position_only_depth_RMSE" in baselines:
        lines.append(f"| (no encoder) each pixel's mean training depth | - | - | - | - | - | - | "
                     f"{baselines['position_only_depth_RMSE']:.2f} |")
    lines += ["", "Data efficiency (probe on encoders pretrained on nested subsets, same steps):", "",
              "| regime | pretraining images | mIoU | depth RMSE (m) |", "|---|---|---|---|"]
    for (regime, n), group in _groups(efficiency, ("regime", "train_images")).items():
        lines.append(f"| {regime} | {n} | {np.mean([r['mIoU'] for r in group]):.2f} | "
                     f"{np.mean([r['depth_RMSE'] for r in group]):.3f} |")
    uniform = next(iter(attention.values()))["uniform_px"] if attention else float("nan")
    lines += ["", f"Mean attention distance (px) per layer, heads averaged [min-max over heads]; uniform attention "
              f"(every patch alike) gives {uniform:.1f} px:", ""]
    for label, result in attention.items():
        layers = ", ".join(f"L{i + 1} {np.mean(h):.1f} [{min(h):.1f}-{max(h):.1f}]"
                           for i, h in enumerate(result["per_layer_per_head_px"]))
        lines.append(f"- {label}: {layers}")
    lines += ["", "The paper's claims, as the miniature shows them:",
              claim_line("better captions -> higher segmentation mIoU", by_regime, "mIoU", "higher"),
              claim_line("better captions -> lower depth RMSE", by_regime, "depth_RMSE", "lower"),
              claim_line("(context) better captions -> zero-shot shape accuracy", pretrain, "zeroshot_shape", "higher"),
              efficiency_line(efficiency), attention_line(attention)]
    for name, metric, key, better in [("segmentation", "mIoU", "majority_class_mIoU", max),
                                      ("depth", "depth_RMSE", "position_only_depth_RMSE", min)]:
        if key in baselines and any(metric in d for d in dense.values()):
            best = better(d[metric][0] for d in dense.values() if metric in d)
            if better(best, baselines[key]) == baselines[key]:
                lines.append(f"- caveat: no encoder's {name} probe beats the no-encoder baseline ({metric} "
                             f"{baselines[key]:.2f}): the {name} rows are no evidence either way.")
    if dense.get("random init", {}).get("mIoU", (-1,))[0] >= max(d.get("mIoU", (0,))[0] for d in dense.values()):
        lines.append("- caveat: the untrained encoder probes as well as the pretrained ones, so this budget does not "
                     "pretrain the encoder enough for dense transfer; the dense rows are no evidence either way.")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "results.md", text)
    return text


def _groups(rows: Sequence[dict], keys: tuple[str, ...]) -> dict:
    groups: dict = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def attention_specs(args: Args) -> list[str]:
    """--attention-models, else every checkpoint under OUT/pretrain, else an untrained --model."""
    saved = sorted(str(p) for p in (Path(args.out) / "pretrain").glob("*.pt"))
    return list(args.attention_models) or saved or [args.model]


def distributed_attention(args: Args) -> dict:
    """The attention stage under torchrun: rank 0 builds the world (if needed) before the others read it."""
    rank, world_size, device = init_distributed(args.device)
    args = dataclasses.replace(args, device=device)
    try:
        if rank == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            records = world_records(args, STAGE_MANIFESTS["attention"])
        dist.barrier()
        if rank != 0:
            records = world_records(args, STAGE_MANIFESTS["attention"])
        return run_attention(args, records, attention_specs(args), rank, world_size)
    finally:
        dist.destroy_process_group()


def distributed_pretrain(args: Args) -> list[dict]:
    """The pretrain stage under torchrun: rank 0 builds the world (if needed) and the index first; every regime and
    seed then trains with DDP over all ranks (common.clip_train), and rank 0 evaluates and saves."""
    rank, _, _ = init_distributed(args.device)
    try:
        if rank == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            ensure_world(args.world) if not all(getattr(args, MANIFESTS[r][0]) for r in STAGE_MANIFESTS["pretrain"]) else None
        dist.barrier()
        return run_pretrain(args, world_records(args, STAGE_MANIFESTS["pretrain"]))
    finally:
        dist.destroy_process_group()


def check_flags(args: Args) -> None:
    """Every numeric flag in its range before anything loads (a batch of 0 crashed late, --seeds 0 ran nothing); a
    learning rate may be inf, which the training guard stops with its step named."""
    check_ranges(args, at_least={name: 1 for name in (
        "seeds", "num_classes", "probe_steps", "probe_batch_size", "attention_images", "num_synthetic", "gen_batch_size",
        "train.steps", "train.batch_size", "train.accum_steps", "train.checkpoint_every")} | {name: 0 for name in (
        "probe_train_images", "probe_workers", "resample_degenerate", "train.warmup", "train.workers",
        "train.weight_decay", "train.lr", "finetune_lr", "probe_lr")}, fractions=("swap_probability",))
    if not all(0 < f <= 1 for f in args.subset_fractions):
        raise SystemExit(f"error: --subset-fractions must each be in (0, 1], got {args.subset_fractions}")


def main(argv=None) -> dict:
    args = parse(Args, argv, PRESETS)
    check_flags(args)
    check_device(args.device)  # before any stage loads weights onto it (a tag's loader would take the blame)
    out = Path(args.out)
    if args.stage == "synthesize":  # one process or torchrun: generate_sharded shards it over the ranks
        return {"synthesize": run_synthesize(args)}
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if args.stage not in ("attention", "pretrain"):
            raise SystemExit(f"the {args.stage} stage has no multi-process path (Deviation 9): run it with python; "
                             "the synthesize, pretrain and attention stages run under torchrun")
        if args.stage == "attention":
            return {"attention": distributed_attention(args)}
        return {"pretrain": distributed_pretrain(args)}
    out.mkdir(parents=True, exist_ok=True)
    records = world_records(args, STAGE_MANIFESTS[args.stage])
    start = time.time()
    if args.stage == "pretrain":
        return {"pretrain": run_pretrain(args, records)}
    if args.stage == "probe":
        checkpoints = list(args.checkpoints) or sorted(str(p) for p in (out / "pretrain").glob("*.pt"))
        if not checkpoints:
            raise FileNotFoundError(f"no checkpoints given and none in {out / 'pretrain'}; run the pretrain stage "
                                    "or pass --checkpoints (`random` probes an untrained encoder)")
        unknown = [spec for spec in checkpoints if spec != "random" and not Path(spec).is_file()
                   and spec.partition("@")[0] not in open_clip.list_models()]
        if unknown:  # before the first probe trains, not after it
            raise FileNotFoundError(f"--checkpoints: {', '.join(unknown)}: neither a checkpoint file nor an open_clip "
                                    "model (NAME or NAME@PRETRAINED_TAG)")
        return {"probe": run_probe(args, records, checkpoints, out / "probe.json")}
    if args.stage == "efficiency":
        return {"efficiency": run_efficiency(args, records)}
    if args.stage == "attention":
        return {"attention": run_attention(args, records, attention_specs(args))}
    pretrain = run_pretrain(args, records)
    probe = run_probe(args, records, [r["checkpoint"] for r in pretrain] + ["random"], out / "probe.json")
    baselines = run_baselines(args, records)
    efficiency = run_efficiency(args, records, done=pretrain, probed=probe)
    # every seed's model of each regime (the claim compares regimes over models), and an untrained one
    attention = run_attention(args, records, [r["checkpoint"] for r in pretrain] + [args.model])
    report = write_report(out, pretrain, probe, efficiency, attention, baselines, time.time() - start)
    results = {"pretrain": pretrain, "probe": probe, "baselines": baselines, "efficiency": efficiency,
               "attention": attention, "seconds": time.time() - start, "args": dataclasses.asdict(args)}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    print(report)
    return results


if __name__ == "__main__":
    run_command(main)
