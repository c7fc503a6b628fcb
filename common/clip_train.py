"""The one CLIP trainer: what every paper builds on and none changes (its evaluation: common/clip_eval.py).

- Tiny open_clip configs for the miniature world and the tests (`mini-ViT-8`, `micro-ViT-16`,
  registered with open_clip by importing this module; JSON files in common/model_configs/).
- `train_clip`: the symmetric InfoNCE loss (CLIP, Radford et al. 2021, eq. in Fig. 3), AdamW,
  linear warm-up then cosine decay, learnable temperature clamped at 100 as open_clip does.
  Data: images decoded lazily in DataLoader workers from `common.columns.Columns` (a manifest or
  webdataset shards, indexed once; nothing grows with the data set in RAM), or a preprocessed
  tensor for small worlds. Epochs are seeded permutations (each sample once per epoch), the
  position is saved with the checkpoint and a resume is exact. Which text a sample uses at a step
  is a callback with a random stream of its own (so arms with one seed see the same image
  batches): VeCLIP's mixing, DataCompDR's real + synthetic sum and CapsFusion's arms plug in from
  the paper files. torchrun: DDP, features all-gathered for the loss (caption_kernels/contrastive.py,
  gloo on CPU, NCCL on GPU); bf16 autocast on CUDA; gradient accumulation that keeps the loss of
  the whole batch; gradient checkpointing.
- The miniature world's scorer: a small CLIP trained once on the world's ground-truth captions
  and cached, so that every script can score captions there (`load_clip("miniature")`).

`python -m common.clip_train --help` trains and evaluates on any manifest or shards, e.g.
    python -m common.clip_train --train.steps 20 --train.batch-size 64 --out runs/clip_train_smoke
    torchrun --nproc-per-node 8 -m common.clip_train --data shards/{00000..00999}.tar --eval-data coco_test.jsonl \
        --model ViT-B-16 --train.batch-size 8192 --train.workers 8 --out runs/clip_b16
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.data import (BadSampleError, ManifestError, NonFiniteError, atomic_write_text, check_device,
                         init_distributed, read_manifest, run_command, text_problem)
from common.clip_eval import (ImageRows, encode_images, encode_texts, evaluate_world, preprocess_images,
                              retrieval_metrics, swap_accuracy, texts_of)
from common.columns import Columns, index_data, open_row_image
from common.training import epoch_permutation
from common.miniature import WorldConfig, cache_root, ensure_world, swapped_captions
from caption_kernels.contrastive import clip_loss, gather_features

log = logging.getLogger(__name__)

open_clip.add_model_config(Path(__file__).parent / "model_configs")
MINIATURE_MODEL = "mini-ViT-8"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of the CLIP trainer (what a checkpoint must agree on to be resumed, and how)."""

    steps: int = 500
    """optimiser steps"""
    batch_size: int = 256
    """image-text pairs per step, over all ranks (the contrastive loss sees all of them)"""
    lr: float = 2e-3
    """peak learning rate of AdamW"""
    weight_decay: float = 0.1
    """AdamW weight decay on weight matrices (none on biases, norms, embeddings' scale)"""
    warmup: int = 50
    """linear warm-up steps before the cosine decay"""
    seed: int = 0
    """seed of the initialisation, the epochs' permutations and (a stream of its own) the caption draws"""
    accum_steps: int = 1
    """micro-batches per step: features of the whole batch from gradient-free passes, then gradients one micro-batch
    at a time (open_clip's --accum-freq), so the loss and the update are those of the whole batch"""
    grad_checkpointing: bool = False
    """recompute the towers' activations in backward (less memory, more compute)"""
    amp: bool = True
    """bf16 autocast on CUDA (CPU runs in float32)"""
    kernel: Literal["auto", "triton", "torch"] = "auto"
    """contrastive loss implementation (caption_kernels/contrastive.py)"""
    workers: int = 0
    """DataLoader worker processes that decode images and tokenise captions ahead of the step"""
    checkpoint_every: int = 1000
    """save the checkpoint every this many steps (and at the end) when a checkpoint path is given"""
    hard_negatives: bool = False
    """`texts_for` gives (texts, one hard negative per text) and the loss is NegCLIP's (`hard_negative_loss`)"""


# fields that change how a run is executed, not what it computes: a resume may change them
RUNTIME_FIELDS = ("workers", "checkpoint_every", "kernel", "grad_checkpointing")
TEXT_STREAM = 1  # the caption draws' generator, apart from the data order: arms with one seed see one image order


def create_clip(name: str = MINIATURE_MODEL, seed: int = 0, device: str = "cpu"):
    """A randomly initialised open_clip model by name: (model, preprocess, tokenizer)."""
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    return model, preprocess, open_clip.get_tokenizer(name)


# ---------------------------------------------------------------------------------------------
# The loss, the schedule, the data order
# ---------------------------------------------------------------------------------------------


def contrastive_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised features, equal to open_clip's ClipLoss on one device."""
    logits = logit_scale * img_emb @ txt_emb.t()  # (N, N): image i against every text
    labels = torch.arange(len(logits), device=logits.device)
    # L = (CE(rows) + CE(columns)) / 2: each image picks its text among N, each text its image
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def hard_negative_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, negative_emb: torch.Tensor,
                       logit_scale: torch.Tensor, distributed: bool = False) -> torch.Tensor:
    """NegCLIP's loss (Yuksekgonul et al., ICLR 2023, Sec. 5): each image picks its text among the batch's texts
    and their hard negatives (one per text, the same caption with one thing changed); each text picks its image
    among the batch's images. Under torchrun the texts, negatives and images of every rank are gathered.
    """
    all_img, all_txt, all_neg, offset = img_emb, txt_emb, negative_emb, 0
    if distributed:
        all_img, all_txt, all_neg = (gather_features(x) for x in (img_emb, txt_emb, negative_emb))
        offset = dist.get_rank() * len(img_emb)
    labels = torch.arange(offset, offset + len(img_emb), device=img_emb.device)
    # image -> text: softmax over the N texts and the N negatives, so a one-word change has to be told apart
    image_to_text = logit_scale * img_emb @ torch.cat([all_txt, all_neg]).t()
    # text -> image: as CLIP's, over the N images (a negative describes no image, so it picks none)
    text_to_image = logit_scale * txt_emb @ all_img.t()
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels)) / 2


def cosine_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only, as open_clip's training script groups parameters."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def epoch_and_position(step: int, n_rows: int, batch_size: int) -> tuple[int, int]:
    """(epoch, batch within it) of global batch `step`: an epoch is n_rows // batch_size batches (last partial
    dropped)."""
    steps_per_epoch = n_rows // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {n_rows} training samples")
    return divmod(step, steps_per_epoch)


def caption_rng(step: int, seed: int) -> np.random.Generator:
    """The generator of step `step`'s caption draws: its own stream, a pure function of (seed, step)."""
    return np.random.default_rng([seed, TEXT_STREAM, step])


TextsFor = Callable[[np.ndarray, np.random.Generator], "list[str] | tuple[list[str], ...]"]


class StepBatches(torch.utils.data.Dataset):
    """Item `step`: this rank's share of global batch `step` as (pixels (b, 3, H, W), tokens (L, b, ctx),
    substitutions).

    Global batch `step` is the slice `position` of epoch `epoch`'s permutation of `rows` (computed once per epoch),
    and its texts come from `texts_for(rows of the batch, caption_rng(step))`: a pure function of (seed, step), so a
    resumed run, any number of ranks and any number of workers see the batches of one uninterrupted process.
    `images` is a preprocessed (N, 3, H, W) tensor (small worlds) or Columns decoded here with `preprocess`. An
    unreadable image is replaced by the next readable sample of the epoch's order (counted; `strict` raises), so
    every rank keeps its batch size for the all-gathered loss.
    """

    def __init__(self, images, rows: np.ndarray, texts_for: TextsFor, tokenizer, cfg: TrainConfig,
                 preprocess: Callable | None, rank: int, world_size: int, strict: bool = False):
        self.images, self.rows, self.texts_for, self.tokenizer = images, rows, texts_for, tokenizer
        self.cfg, self.preprocess, self.strict = cfg, preprocess, strict
        self.local = cfg.batch_size // world_size
        self.mine = slice(rank * self.local, (rank + 1) * self.local)
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return self.cfg.steps

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_permutation(epoch, len(self.rows), self.cfg.seed)
        return self._order

    def pixels(self, order: np.ndarray, position: int) -> tuple[torch.Tensor, int, int]:
        """(pixels, row used, substitutions): the sample at `position` of the order, or the next readable one."""
        for offset in range(len(order)):
            row = int(self.rows[order[(position + offset) % len(order)]])
            if isinstance(self.images, torch.Tensor):
                return self.images[row], row, 0
            try:
                return self.preprocess(open_row_image(self.images, row)), row, offset
            except BadSampleError as err:
                if self.strict:
                    raise
                log.warning("%s; using the next sample of the epoch", err)
        raise BadSampleError("no readable image among the training samples")

    def __getitem__(self, step: int):
        epoch, position = epoch_and_position(step, len(self.rows), self.cfg.batch_size)
        order = self.order(epoch)
        first = position * self.cfg.batch_size
        batch_rows = self.rows[order[first:first + self.cfg.batch_size]].copy()  # (B,) global batch
        loaded = [self.pixels(order, first + i) for i in range(self.mine.start, self.mine.stop)]
        batch_rows[self.mine] = [row for _, row, _ in loaded]  # a substitute brings its own texts
        texts = self.texts_for(batch_rows, caption_rng(step, self.cfg.seed))
        text_lists = texts if isinstance(texts, tuple) else (texts,)
        tokens = torch.stack([self.tokenizer(list(t[self.mine])) for t in text_lists])  # (L, b, ctx)
        return torch.stack([p for p, _, _ in loaded]), tokens, sum(bool(s) for _, _, s in loaded)


# ---------------------------------------------------------------------------------------------
# The training loop: one process or torchrun, whole batch or micro-batches
# ---------------------------------------------------------------------------------------------


def _features(ddp, pixels: torch.Tensor, tokens: torch.Tensor):
    """(img_emb (b, E), txt_emb (L, b, E), logit_scale) through the (DDP-wrapped) model's forward."""
    img_emb, txt_emb, logit_scale = ddp(pixels, tokens.flatten(0, 1))[:3]  # one forward, so DDP syncs once
    return img_emb, txt_emb.view(*tokens.shape[:2], -1), logit_scale


def _sum_over_text_lists(loss_fn: Callable, img_emb, txt_emb, logit_scale) -> torch.Tensor:
    # several texts per image (L > 1, e.g. DataCompDR's real + synthetic): the sum of one loss per text list
    return sum(loss_fn(img_emb, txt_emb[i].to(img_emb.dtype), logit_scale) for i in range(len(txt_emb)))


def _hard_negative_batch_loss(distributed: bool, img_emb, txt_emb, logit_scale) -> torch.Tensor:
    # the two text lists are (texts, hard negatives)
    return hard_negative_loss(img_emb, txt_emb[0].to(img_emb.dtype), txt_emb[1].to(img_emb.dtype), logit_scale,
                              distributed)


def _accumulated_step(ddp, pixels, tokens, batch_loss, accum_steps: int, autocast) -> torch.Tensor:
    """Backward of the whole batch's loss, one micro-batch at a time; returns the loss.

    The loss depends on every micro-batch's features, so they are first computed without gradients; then
    micro-batch j is recomputed with gradients and put in place of its cached features, and the loss is
    backpropagated. Summed over j, the gradients are those of the whole batch. The logit scale enters
    every one of those losses, so each passes it 1/accum_steps of its gradient.
    """
    micro_pixels, micro_tokens = pixels.chunk(accum_steps), tokens.chunk(accum_steps, dim=1)
    with torch.no_grad(), autocast():
        cached = [_features(ddp, p, t) for p, t in zip(micro_pixels, micro_tokens)]
    for j, (p, t) in enumerate(zip(micro_pixels, micro_tokens)):
        sync = j == accum_steps - 1 or not isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast():
            img_j, txt_j, scale_j = _features(ddp, p, t)
            img_emb = torch.cat([img_j if i == j else c[0] for i, c in enumerate(cached)])
            txt_emb = torch.cat([txt_j if i == j else c[1] for i, c in enumerate(cached)], dim=1)
            logit_scale = scale_j.detach() + (scale_j - scale_j.detach()) / accum_steps  # value s, gradient 1/k
            loss = batch_loss(img_emb, txt_emb, logit_scale)
        loss.backward()
    return loss.detach()


def assert_finite_state(model: torch.nn.Module | None, loss, where: str) -> None:
    """The trainers' one guard against a diverged run: NonFiniteError, in one line naming `where`, when `loss` (a
    number or a scalar tensor) or a floating-point tensor of `model`'s state_dict (what a checkpoint holds) is NaN
    or inf; None skips either.

    Call it before every checkpoint write, the last one included, with the step's loss and the weights its update
    left: a finite loss does not make a finite update (too high a learning rate puts NaN in the weights while the
    loss that led there looks fine), and a checkpoint of NaN weights would be evaluated and resumed as if it were a
    model. Raising there leaves the checkpoint on disk the last good one.
    """
    problems = []
    if loss is not None and not math.isfinite(float(loss)):
        problems.append(f"the loss is {float(loss)}")
    if model is not None:
        named = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist() if named else []  # one sync
        bad = [name for (name, _), ok in zip(named, finite) if not ok]
        if bad:
            problems.append(f"{len(bad)} of {len(named)} weight tensors hold NaN or inf "
                            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    if problems:
        raise NonFiniteError(f"{where}: {' and '.join(problems)}; the run diverged and stops before writing a "
                             "checkpoint of it (lower the learning rate, or warm up longer)")


def train_clip(model, tokenizer, images, texts_for: TextsFor, cfg: TrainConfig, *, preprocess: Callable | None = None,
               rows: np.ndarray | None = None, loss_fn: Callable | None = None, device: str = "cpu",
               checkpoint: str | os.PathLike | None = None, resume: bool = True, recipe: dict | None = None,
               strict: bool = False, progress: bool = True, desc: str = "train clip") -> dict:
    """Train `model` for cfg.steps; return {"history": [per-step log], "resumed_from", "substituted_images",
    "train_seconds", "images_per_second"}.

    `images`: a preprocessed (N, 3, H, W) tensor (small worlds) or `Columns` decoded lazily with `preprocess` in
    cfg.workers DataLoader workers. `rows`: the samples to train on (default all N). `texts_for(rows, rng)` gives
    the text of each row of the global batch, which is where a paper changes what the model sees; it may return
    a tuple of such lists (several texts per image): the loss is then the sum of one loss per list. Under
    torchrun each rank takes its share of every global batch, the features are all-gathered for the loss
    (caption_kernels.contrastive) and DDP averages the gradients. `checkpoint`: a path saved every cfg.checkpoint_every
    steps and at the end (rank 0, atomically), from which a run with the same recipe resumes exactly (`resume=False`
    starts afresh and overwrites it). `assert_finite_state` checks the loss before each update and the loss and
    weights before each checkpoint write and after the last step: a diverged run raises NonFiniteError, naming the
    step and what the checkpoint on disk still holds, and never saves NaN weights.
    """
    rank, world_size, device = init_distributed(device)
    if cfg.batch_size % (world_size * cfg.accum_steps):
        raise ValueError(f"batch size {cfg.batch_size} must be a multiple of {world_size} ranks x {cfg.accum_steps} "
                         "micro-batches")
    rows = np.arange(len(images), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    if cfg.hard_negatives:
        batch_loss = functools.partial(_hard_negative_batch_loss, world_size > 1)
    else:
        batch_loss = functools.partial(_sum_over_text_lists, loss_fn or functools.partial(
            clip_loss, impl=cfg.kernel, distributed=world_size > 1))
    model.to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = make_optimizer(model, cfg)
    recipe = {**(recipe or {}), **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS},
              "rows": len(rows)}
    start, history = 0, []
    if checkpoint is not None and resume and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("recipe") != recipe:
            found = state.get("recipe") or {}
            changed = {k: (found.get(k), recipe.get(k)) for k in sorted(set(found) | set(recipe))
                       if found.get(k) != recipe.get(k)}
            listing = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
            raise ManifestError(f"{checkpoint} was trained with another recipe ({listing}); use another output folder, "
                             "or --no-resume to start afresh")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        log.info("resuming from %s at step %d (epoch %d, batch %d)", checkpoint, start, *state["position"])
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    batches = StepBatches(images, rows, texts_for, tokenizer, cfg, preprocess, rank, world_size, strict)
    # an item is a whole rank batch: each worker keeps 2 in flight (the default), pinned for the copy to a GPU
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, cfg.steps),
                                         num_workers=cfg.workers, pin_memory=device.startswith("cuda"))
    use_amp = cfg.amp and device.startswith("cuda")
    autocast = functools.partial(torch.autocast, device.split(":")[0], dtype=torch.bfloat16, enabled=use_amp)
    substituted, began = 0, time.time()
    saved = start or None  # the step the checkpoint on disk holds, for the guard's message

    def where(step: int, when: str) -> str:
        kept = ("no checkpoint asked for" if checkpoint is None else f"{checkpoint} keeps step {saved}" if saved
                else f"{checkpoint} not written by this run")
        return f"{desc} at step {step} of {cfg.steps}, {when} ({kept})"

    model.train()
    bar = tqdm(zip(range(start, cfg.steps), loader), total=cfg.steps - start, desc=desc, disable=not progress or rank)
    for step, (pixels, tokens, n_substituted) in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg)
        substituted += int(n_substituted)
        optimizer.zero_grad(set_to_none=True)
        pixels, tokens = pixels.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
        if cfg.accum_steps == 1:
            with autocast():
                loss = batch_loss(*_features(ddp, pixels, tokens))
        else:
            loss = _accumulated_step(ddp, pixels, tokens, batch_loss, cfg.accum_steps, autocast)
        global_loss = loss.detach().float().clone()
        if world_size > 1:
            dist.all_reduce(global_loss)
            global_loss /= world_size  # mean of the per-rank losses = the loss of the global batch
        assert_finite_state(None, global_loss, where(step, "before its update"))  # a NaN gradient would poison them
        if cfg.accum_steps == 1:
            loss.backward()
        optimizer.step()
        with torch.no_grad():  # open_clip clamps the temperature so logits stay below 100
            model.logit_scale.clamp_(0, math.log(100))
        history.append({"step": step, "epoch": epoch_and_position(step, len(rows), cfg.batch_size)[0],
                        "loss": global_loss.item(), "logit_scale": model.logit_scale.exp().item(),
                        "lr": optimizer.param_groups[0]["lr"]})
        bar.set_postfix(loss=f"{global_loss.item():.3f}")
        last = step + 1 == cfg.steps
        saving = checkpoint is not None and ((step + 1) % cfg.checkpoint_every == 0 or last)
        if saving or last:  # on every rank: DDP keeps the weights equal, so the ranks stop together
            assert_finite_state(model, global_loss, where(step, "after its update"))
        if saving and rank == 0:
            save_checkpoint(checkpoint, {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "step": step + 1,
                                         "position": list(epoch_and_position(step + 1, len(rows), cfg.batch_size)),
                                         "history": history, "recipe": recipe})
            saved = step + 1
    model.eval()
    if substituted:
        log.warning("%d unreadable images were replaced by the next readable sample", substituted)
    seconds = time.time() - began
    return {"history": history, "resumed_from": start, "substituted_images": substituted, "train_seconds": seconds,
            "images_per_second": (cfg.steps - start) * cfg.batch_size / max(seconds, 1e-9)}


# ---------------------------------------------------------------------------------------------
# The miniature world's scorer, trained once and cached
# ---------------------------------------------------------------------------------------------

SCORER_TRAINING = TrainConfig(steps=150, batch_size=128, lr=2e-3, warmup=15, seed=0, hard_negatives=True)


class ScorerTexts:
    """The scorer's `texts_for`: each sample's ground-truth caption, and with hard negatives also that caption with
    one thing changed (`swapped_captions`, a swap type drawn per sample among those its image allows)."""

    def __init__(self, records: Sequence[dict], hard_negatives: bool):
        self.records, self.hard_negatives = records, hard_negatives

    def __call__(self, rows: np.ndarray, rng: np.random.Generator):
        captions = [self.records[i]["caption"] for i in rows]
        if not self.hard_negatives:
            return captions
        negatives = []
        for i in rows:
            swaps = swapped_captions(self.records[i], rng)
            negatives.append(swaps[list(swaps)[int(rng.integers(len(swaps)))]])
        return captions, negatives


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """torch.save through a temporary file and a rename: a killed save never leaves a broken file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def ensure_miniature_scorer(world: WorldConfig = WorldConfig(), train: TrainConfig = SCORER_TRAINING,
                            model_name: str = MINIATURE_MODEL, root: str | os.PathLike | None = None,
                            progress: bool = True) -> Path:
    """Path of the miniature scorer checkpoint, training it on the world's captions on first use.

    The checkpoint holds `state_dict`, the model name, the recipe and the scorer's test metrics.
    """
    recipe = {"world": dataclasses.asdict(world), "world_digest": world.digest(), "train": dataclasses.asdict(train),
              "model": model_name}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(root or cache_root()) / f"scorer-{model_name}-{digest}.pt"
    if path.exists():
        return path
    folder = ensure_world(world, root)
    train_records, test_records = read_manifest(folder / "train.jsonl"), read_manifest(folder / "test.jsonl")
    model, preprocess, tokenizer = create_clip(model_name, seed=train.seed)
    images = preprocess_images(train_records, preprocess)
    start = time.time()
    history = train_clip(model, tokenizer, images, ScorerTexts(train_records, train.hard_negatives), train,
                         progress=progress, desc="train the miniature scorer")["history"]
    metrics = evaluate_world(model, tokenizer, preprocess, test_records)
    metrics.update(swap_accuracy(model, tokenizer, encode_images(model, ImageRows(test_records, preprocess)),
                                 test_records))
    metrics["train_seconds"] = time.time() - start
    log.info("miniature scorer trained: %s", metrics)
    save_checkpoint(path, {"state_dict": model.state_dict(), "model": model_name, "recipe": recipe,
                           "test_metrics": metrics, "final_loss": history[-1]["loss"]})
    return path


class FieldTexts:
    """`texts_for` of one caption field of Columns: a list field (several references) gives one drawn uniformly."""

    def __init__(self, columns: Columns, field: str):
        if field not in columns.fields:
            raise ValueError(f"{columns.source}: no caption field {field!r}; fields present: {columns.fields}")
        self.columns, self.field = columns, field

    def __call__(self, rows: np.ndarray, rng: np.random.Generator) -> list[str]:
        values = self.columns.column(self.field, rows)
        draws = rng.random(len(values))  # one draw per sample, used only by list fields
        return [v[int(u * len(v))] if isinstance(v, list) else v for v, u in zip(values, draws)]


def usable_rows(columns: Columns, fields: Sequence[str], strict: bool = False, lists: bool = False) -> np.ndarray:
    """Rows whose `fields` all hold a text by `text_problem`'s rule (`lists`: or a list of texts, which FieldTexts
    draws from); the others are counted and left out, the first named by file and line (strict: an error)."""
    def problem(values: dict) -> str | None:
        return next((p for name, v in values.items() if (p := text_problem(v, name, lists)) is not None), None)

    rows = columns.rows_where(lambda values: problem(values) is None, fields)
    if len(rows) < len(columns):
        gaps = np.flatnonzero(rows != np.arange(len(rows)))  # rows is sorted: the first gap is the first left out
        first = int(gaps[0]) if len(gaps) else len(rows)
        why = problem({name: columns.value(name, first) for name in fields})
        message = (f"{columns.where(first)} (id {columns.value('id', first)!r}): {why}; {len(columns) - len(rows)} of "
                   f"{len(columns)} samples lack a text in {list(fields)}")
        if strict:
            raise BadSampleError(message)
        log.warning("%s; they are left out", message)
    return rows


def main(argv=None) -> dict:
    """Train the plain CLIP on a manifest or shards and evaluate it on a manifest (`--help` lists the flags)."""
    import tyro

    @dataclass
    class Args:
        data: tuple[str, ...] = ()
        """training data: a manifest (.jsonl) or webdataset shards (.tar files or a {000..099} pattern); default: the
        miniature world's train split"""
        eval_data: str | None = None
        """evaluation manifest (default: the miniature world's test split)"""
        text_field: str = "caption"
        """caption field to train and evaluate on (a list field: one caption drawn per sample and step)"""
        model: str = MINIATURE_MODEL
        """open_clip architecture name"""
        train: TrainConfig = TrainConfig()
        """optimisation settings"""
        out: str = "runs/clip_train"
        """output folder: metrics.json, history.json, checkpoint.pt (resumed when it exists)"""
        device: str = "cuda" if torch.cuda.is_available() else "cpu"
        """torch device (under torchrun each rank takes cuda:LOCAL_RANK)"""
        strict: bool = False
        """stop at the first unreadable image or empty caption instead of counting it"""
        resume: bool = True
        """continue from out/checkpoint.pt when it exists (same recipe); --no-resume starts afresh"""

    args = tyro.cli(Args, args=argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_device(args.device)
    folder = ensure_world() if not args.data or args.eval_data is None else None
    columns = index_data(args.data or str(folder / "train.jsonl"), Path(args.out) / "train.index")
    rows = usable_rows(columns, [args.text_field], args.strict, lists=True)
    model, preprocess, tokenizer = create_clip(args.model, seed=args.train.seed)
    out = Path(args.out)
    log_ = train_clip(model, tokenizer, columns, FieldTexts(columns, args.text_field), args.train,
                      preprocess=preprocess, rows=rows, device=args.device, checkpoint=out / "checkpoint.pt",
                      resume=args.resume, strict=args.strict,
                      recipe={"model": args.model, "text_field": args.text_field, "data": columns.source})
    if dist.is_initialized() and dist.get_rank() != 0:
        return log_
    eval_records = read_manifest(args.eval_data or folder / "test.jsonl", texts=(args.text_field,))
    device, name = next(model.parameters()).device, f"the model of {out / 'checkpoint.pt'}"
    if "objects" in eval_records[0]:
        metrics = evaluate_world(model, tokenizer, preprocess, eval_records, args.text_field, device=str(device),
                                 name=name)
    else:
        img_emb = encode_images(model, ImageRows(eval_records, preprocess), device=device, workers=args.train.workers)
        txt_emb = encode_texts(model, tokenizer, texts_of(eval_records, args.text_field), device=device)
        metrics = retrieval_metrics(img_emb, txt_emb, name=name)
    metrics["images_per_second"] = log_["images_per_second"]
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write_text(out / "history.json", json.dumps(log_["history"]))
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    run_command(main)
