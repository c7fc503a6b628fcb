"""CLIP with Quality Captions: a strong pretraining for vision tasks (Vasu et al. 2024).

https://arxiv.org/abs/2405.08911

A ViT-B/16 pretrained on DataCompDR (each image's web caption + five synthetic CoCa captions) transfers better to
dense prediction than on DataComp (web alt-text): higher mIoU, lower RMSE, 10x data efficiency, more local heads.

Implements:
  1. DataCompDR: per sample and step x_syn ~ Uniform(synthetic), L = L_CLIP(img, x_real) + L_CLIP(img, x_syn)
     (`datacompdr_texts`), vs L_CLIP(img, x_real) ("datacomp"); one loss, x_real -> x_syn with prob. p (`swap_texts`).
  2. Dense transfer: a light head on the image encoder's patch tokens, segmentation (mIoU, mAcc as mmseg) and depth
     (RMSE in metres), one probe per task (`run_probe`; common/dense_probe.py).
  3. Data efficiency: pretraining on nested growing subsets, each probed (`run_efficiency`).
  4. Mean attention distance (ViT paper App. D.7): per layer and head, mean over images and query patches of
     sum_j attn(q, j) * distance(q, j) in pixels, CLS row and column dropped (`mean_attention_distance`).
  5. (Ours) the dense claims' floors: an untrained encoder's probe; no encoder (majority class, per-pixel mean depth).
  6. DataCompDR's captions (MobileCLIP, arXiv 2311.17049): k = 5 per image, x_syn ~ CoCa(img), top-p 0.9 (`synthesize`).

Deviations from the paper (no official code; the closest is apple/ml-mobileclip training/; details in docs):
  1. Dense heads are BatchNorm + a 1x1 convolution on the last block's tokens, upsampled bilinearly (not
     UperNet / DPT); detection is not implemented.
  2. The encoder is frozen by default (`--finetune` trains it, as the paper); depth is MSE on standardised depth.
  3. RMSE per image over valid pixels (depth > 0), averaged over images (Eigen); no Eigen crop, no cap.
  4. No distillation of teacher embeddings (MobileCLIP's DR, not this paper's). DR encodes two texts per image.
  5. Every efficiency subset trains for the same steps (small ones repeat); an n-subset is the first n samples.
  6. Attention distance does not renormalise a row after dropping the CLS column; open_clip ViTs only.
  7. Pretraining is the project's CLIP trainer (common/clip_train.py); probe epochs are seeded permutations.
  8. Probes train and score one square centre crop per image; mmseg scores every pixel of the whole image.
  9. Pretraining, attention and synthesize run under torchrun; the probes do not.
 10. A degenerate CoCa draw is drawn again, then dropped (ours; gen.py keeps every draw).

    python clip_quality.py --preset smoke --out runs/clip_quality_smoke   # every stage on a tiny world
    python clip_quality.py miniature --seeds 3                            # the miniature experiment, seeds 0-2
    python clip_quality.py synthesize --data images.jsonl --out synth.jsonl --device cuda
    torchrun --nproc-per-node 8 clip_quality.py pretrain --model ViT-B-16 --device cuda --kernel auto \
        --train-manifest dcdr12m/{00000..01199}.tar --train.steps 30000 --train.batch-size 8192
    python clip_quality.py probe --checkpoints runs/clip_quality/pretrain/*.pt --finetune --device cuda \
        --probe-train-manifest ade/train.jsonl --probe-test-manifest ade/val.jsonl --num-classes 150 --reduce-zero-label
Real-data commands, the miniature's results and the engineering notes: docs/clip_quality.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Callable, Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
import tyro

from common.benchmarks import check_benchmarks, evaluate_benchmarks, write_benchmark_results
from common.cli import check_ranges, parse, preset_help
from common.clip_eval import (ImageRows, encode_images, encode_texts, evaluate_world, preprocess_images,
                              retrieval_metrics, texts_of)
from common.clip_train import MINIATURE_MODEL, TrainConfig, contrastive_loss, create_clip, save_checkpoint, train_clip
from common.coca_captions import write_synthetic_captions
from common.columns import Columns
from common.data import atomic_write_text, check_device, run_command, shard
from common.dense_probe import (ProbeSettings, create_random, load_model_spec, probe_checkpoints, probe_datasets,
                                probe_plan, probe_specs, trivial_baselines)
from common.miniature import SEGMENTATION_CLASSES, WorldConfig
from common.vit_attention import over_images
from common.world_manifests import check_texts, manifests_or_world, run_under_torchrun

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
    """what to run: `miniature` runs every stage on the miniature world; `synthesize` captions --data into --out"""
    preset: Annotated[Literal["smoke", "miniature"] | None, tyro.conf.arg(help=preset_help(PRESETS))] = None
    out: str = "runs/clip_quality"
    """output folder of each stage's JSON/PNG/checkpoints; synthesize: a .jsonl, or a folder for synthetic.jsonl"""
    world: WorldConfig = WorldConfig()
    """the miniature world used wherever a manifest is not given"""
    model: str = MINIATURE_MODEL
    """open_clip architecture to pretrain (random init); the probe's `random` takes the probed checkpoints' instead"""
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
    """contrastive loss: `none` = common.clip_train's, else caption_kernels.contrastive.clip_loss(impl=...)"""
    train_manifest: str | None = None
    """pretraining manifest or webdataset shards (default: the world's train split)"""
    test_manifest: str | None = None
    """retrieval evaluation manifest after pretraining (default: the world's test split)"""
    eval_text_field: str = "caption"
    """text field the retrieval evaluation uses (the world's ground truth is neutral to both regimes)"""
    benchmark: tuple[str, ...] = ()
    """pretrain: clip_benchmark datasets each model is also evaluated on (docs/benchmarks.md); needs --benchmark-root"""
    benchmark_root: str = ""
    """local folder of the --benchmark datasets, clip_benchmark's layout ({name}: the name with "/" -> "_")"""
    checkpoints: tuple[str, ...] = ()
    """probe: checkpoints to probe (default: every *.pt under OUT/pretrain); `random` = an untrained encoder"""
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
    """probe task: `each` task the manifests carry, `seg` or `depth` alone, `joint` = one head, the losses summed"""
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
    """efficiency: regimes pretrained on every subset; the others only on the largest (the claim's reference)"""
    attention_models: tuple[str, ...] = ()
    """attention: checkpoint paths, `NAME@PRETRAINED_TAG` (open_clip weights) or `NAME` (random init)"""
    images_manifest: str | None = None
    """attention: images to average over (default: the world's test split)"""
    attention_images: int = 128
    """attention: images to average over (128 in the ViT paper)"""
    captioner: str = "coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k"
    """synthesize: the CoCa, open_clip NAME@TAG (or NAME@/path/to/weights) or a .pt checkpoint; MobileCLIP's default"""
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


# ---- ALGO LOGIC: DataCompDR caption sampling (the paper's training change) ----------------------------------------

def datacompdr_texts(indices: np.ndarray, real: Sequence[str], synthetic: Sequence[Sequence[str]],
                     rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """One real and one synthetic caption per sample, the synthetic one drawn anew at every step, uniformly among the
    sample's captions; train_clip sums one loss per list."""
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
    """Every training row has a real caption (a string) and synthetic ones (a list, or a string): else one error."""
    check_texts(columns, rows, {real_field: False, synthetic_field: True}, f"pretraining needs a caption in "
                f"{real_field!r} and a list of captions in {synthetic_field!r}")


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


# ---- Mean attention distance (ViT paper, App. D.7) -----------------------------------------------------------------

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


# ---- DataCompDR's synthetic captions (MobileCLIP's dataset reinforcement) ------------------------------------------
def run_synthesize(args: Args) -> dict:
    """The synthesize stage: --num-synthetic captions per --data image into --synthetic-field, every field kept;
    streamed, sharded over ranks and resumable (common.coca_captions.write_synthetic_captions)."""
    if args.data is None:
        raise FileNotFoundError("the synthesize stage needs --data (the image manifest or shards to caption)")
    # step 6: k CoCa draws per image (top-p 0.9), a degenerate one drawn again, then dropped
    return write_synthetic_captions(args.data, args.out, args.captioner, args.synthetic_field, args.num_synthetic,
                                    args.resample_degenerate, args.seed, args.gen_batch_size, args.device,
                                    load_model_spec)


# ---- Stages --------------------------------------------------------------------------------------------------------

MANIFESTS = {"train": ("train_manifest", "train"), "test": ("test_manifest", "test"),
             "probe_train": ("probe_train_manifest", "train"), "probe_test": ("probe_test_manifest", "test"),
             "images": ("images_manifest", "test")}  # role -> (flag, the world's split it falls back to)
STAGE_MANIFESTS = {"pretrain": ("train", "test"), "probe": ("probe_train", "probe_test"), "attention": ("images",),
                   "efficiency": ("train", "test", "probe_train", "probe_test"), "miniature": tuple(MANIFESTS)}


def world_records(args: Args, roles: Sequence[str] = tuple(MANIFESTS)) -> dict:
    """The records of `roles`: their manifest flags, else the miniature world's splits (common.world_manifests); the
    pretraining set (`train`) indexed into common.columns.Columns, the others lists of records."""
    return manifests_or_world({role: getattr(args, MANIFESTS[role][0]) for role in roles},
                              {role: MANIFESTS[role][1] for role in roles}, args.world, indexed=("train",),
                              texts={"test": (args.eval_text_field,)})


def training_images(args: Args, columns: Columns):
    """The trainer's images: the Columns (decoded lazily), or without --train-manifest the world's, preprocessed."""
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


def probe_records(args: Args, records: dict) -> tuple[list[dict], list[dict]]:
    """The probe's training records (the first --probe-train-images) and test records."""
    return records["probe_train"][:args.probe_train_images or None], records["probe_test"]


def run_probe(args: Args, records: dict, checkpoints: Sequence[str], write: Path | None = None) -> list[dict]:
    """Probe each checkpoint (`random`: an untrained encoder of their architecture, per seed); write the rows."""
    # step 2: a dense head on each encoder's patch tokens per task (common.dense_probe)
    rows = probe_specs(checkpoints, *probe_records(args, records), ProbeSettings.from_args(args), args.task,
                       seed_range(args), args.model)
    if write is not None:
        atomic_write_text(write, json.dumps(rows, indent=2))
    return rows


def run_baselines(args: Args, records: dict) -> dict:
    """The trivial baselines of the probe's tasks (`trivial_baselines`) at --model's input size; baselines.json."""
    train, test = probe_records(args, records)
    tasks, settings = sorted({task for group in probe_plan(train, test, args.task) for task in group}), \
        ProbeSettings.from_args(args)
    _, preprocess = create_random(args.model, False, seed=0)  # only its crop size is used: no tokenizer to build
    # step 5: the majority class at every pixel, each pixel's mean training depth
    baselines = trivial_baselines(*probe_datasets(train, test, preprocess, settings, tasks), tasks, settings)
    atomic_write_text(Path(args.out) / "baselines.json", json.dumps(baselines, indent=2))
    return baselines


def run_efficiency(args: Args, records: dict, done: Sequence[dict] = (), probed: Sequence[dict] = ()) -> list[dict]:
    """Pretrain each regime on nested subsets and probe each; reuse full-set runs already in `done` and their probe
    rows in `probed` (the same checkpoint: the efficiency table shows the numbers of the regime table)."""
    n_train, rows, images = len(records["train"]), [], None
    size = lambda fraction: max(1, round(fraction * n_train))  # noqa: E731  (the first round(f N) images)
    for seed in seed_range(args):  # step 3: nested subsets, each pretrained with one schedule and probed
        for regime in args.regimes:
            fractions = args.subset_fractions if regime in args.efficiency_regimes else [max(args.subset_fractions)]
            for n_images in map(size, fractions):
                key = (regime, seed, n_images)
                run = next((r for r in done if (r["regime"], r["seed"], r["train_images"]) == key), None)
                if run is None:
                    if images is None:  # the first subset to pretrain: check the largest, decode once
                        check_captions(records["train"], np.arange(size(max(args.subset_fractions))),
                                       args.real_field, args.synthetic_field)
                        images = training_images(args, records["train"])
                    run = pretrain_one(args, records, regime, seed, n_images,
                                       Path(args.out) / "efficiency" / f"{regime}-n{n_images}-seed{seed}.pt", images)
                probe = next((p for p in probed if p["checkpoint"] == run["checkpoint"]), None)
                if probe is None:
                    probe = run_probe(dataclasses.replace(args, seed=seed, seeds=1), records, [run["checkpoint"]])[0]
                rows.append({**run, **{k: v for k, v in probe.items()
                                       if k in ("mIoU", "mAcc", "aAcc", "depth_RMSE", "per_item")}})
    from experiments.clip_quality_miniature import write_efficiency  # here: the experiment module imports this one
    write_efficiency(rows, Path(args.out))
    return rows


def run_attention(args: Args, records: dict, specs: Sequence[str], rank: int = 0, world_size: int = 1) -> dict:
    """Mean attention distance per layer and head of each model over the same images (PNG + JSON). Under torchrun
    each rank measures every world_size-th image, the sums are all-reduced, rank 0 writes (per image: one process)."""
    chosen = records["images"][:args.attention_images]
    mine = shard(chosen, rank, world_size)
    results = {}
    for spec in specs:
        label, model, preprocess = load_model_spec(spec, args.device)
        visual = model.visual
        images = preprocess_images(mine, preprocess) if mine else torch.zeros(0)  # (n, 3, H, W)
        # sum over images (and ranks) of d_h(image): (layers, heads), divided by the number of images below
        total, rows = over_images(visual, images, partial(mean_attention_distance, grid=visual.grid_size,
                                                          patch_size=visual.patch_size), args.device, world_size)
        print(f"attention {label}: {len(mine)} of {len(chosen)} images on rank {rank} of {world_size}")
        results[label] = {"spec": spec, "per_layer_per_head_px": (total.cpu() / len(chosen)).tolist(),
                          "uniform_px": uniform_attention_distance(visual.grid_size, visual.patch_size),
                          "patch_size": list(visual.patch_size), "grid": list(visual.grid_size), "images": len(chosen)}
        if world_size == 1:  # the last layer's distance image by image, heads averaged: paired across the models
            results[label]["per_image_last_layer_px"] = rows[:, -1].mean(1).tolist()
    if rank == 0:
        from experiments.clip_quality_miniature import write_attention  # here: the experiment module imports this one
        write_attention(results, Path(args.out))
    return results


def attention_specs(args: Args) -> list[str]:
    """--attention-models, else every checkpoint under OUT/pretrain, else an untrained --model."""
    saved = sorted(str(p) for p in (Path(args.out) / "pretrain").glob("*.pt"))
    return list(args.attention_models) or saved or [args.model]


def check_flags(args: Args) -> None:
    """Every numeric flag in its range before anything loads (a batch of 0 crashed late, --seeds 0 ran nothing); a
    learning rate may be inf, which the training guard stops with its step named."""
    positive = ("seeds", "num_classes", "probe_steps", "probe_batch_size", "attention_images", "num_synthetic",
                "gen_batch_size", "train.steps", "train.batch_size", "train.accum_steps", "train.checkpoint_every")
    non_negative = ("probe_train_images", "probe_workers", "resample_degenerate", "train.warmup", "train.workers",
                    "train.weight_decay", "train.lr", "finetune_lr", "probe_lr")
    check_ranges(args, at_least={name: 1 for name in positive} | {name: 0 for name in non_negative},
                 fractions=("swap_probability",))
    if not all(0 < f <= 1 for f in args.subset_fractions):
        raise SystemExit(f"error: --subset-fractions must each be in (0, 1], got {args.subset_fractions}")


def run_stage(args: Args, device: str | None = None, rank: int = 0, world_size: int = 1) -> dict:
    """Every stage but synthesize, on the records it reads; under torchrun (pretrain, attention) on this rank, the
    attention stage on this rank's `device` (pretraining places its ranks itself, common.clip_train)."""
    out, records = Path(args.out), world_records(args, STAGE_MANIFESTS[args.stage])
    if args.stage == "pretrain":
        return {"pretrain": run_pretrain(args, records)}
    if args.stage == "probe":
        return {"probe": run_probe(args, records, probe_checkpoints(args.checkpoints, out / "pretrain"),
                                   out / "probe.json")}
    if args.stage == "efficiency":
        return {"efficiency": run_efficiency(args, records)}
    if args.stage == "attention":
        return {"attention": run_attention(dataclasses.replace(args, device=device or args.device), records,
                                           attention_specs(args), rank, world_size)}
    # the experiment module imports this one: imported here, once the stages it runs are defined
    from experiments.clip_quality_miniature import run_miniature

    return run_miniature(args, records)


def main(argv=None) -> dict:
    args = parse(Args, argv, PRESETS)
    check_flags(args)
    check_device(args.device)  # before any stage loads weights onto it (a tag's loader would take the blame)
    if args.stage == "synthesize":  # one process or torchrun: generate_sharded shards it over the ranks
        return {"synthesize": run_synthesize(args)}
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if args.stage not in ("attention", "pretrain"):
            raise SystemExit(f"the {args.stage} stage has no multi-process path (Deviation 9): run it with python; "
                             "the synthesize, pretrain and attention stages run under torchrun")
        # pretraining trains with DDP over all ranks (common.clip_train); attention shards the images on its rank's
        # device and all-reduces the sums; rank 0 evaluates and writes. Rank 0 builds the world if one is needed.
        given = all(getattr(args, MANIFESTS[role][0]) for role in STAGE_MANIFESTS[args.stage])
        return run_under_torchrun(args.device, args.out, None if given else args.world, partial(run_stage, args))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return run_stage(args)


if __name__ == "__main__":
    run_command(main)
