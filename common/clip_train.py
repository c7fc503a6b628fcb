"""Plain CLIP training and zero-shot evaluation: what every paper builds on and none changes.

- Tiny open_clip configs for the miniature world and the tests (`mini-ViT-8`, `micro-ViT-16`,
  registered with open_clip by importing this module; JSON files in common/model_configs/).
- `train_clip`: the symmetric InfoNCE loss (CLIP, Radford et al. 2021, eq. in Fig. 3), AdamW,
  linear warm-up then cosine decay, learnable temperature clamped at 100 as open_clip does. Which
  text a sample uses at a step is a callback, so VeCLIP's mixing or DataCompDR's sampling plug in
  from the paper files without changing this loop; the loss is an argument (kernels/ plugs in).
- `retrieval_metrics` (image->text and text->image R@1/5/10), `zero_shot_accuracy`.
- The miniature world's scorer: a small CLIP trained once on the world's ground-truth captions
  and cached, so that every script can score captions there (`load_clip("miniature")`).

`python -m common.clip_train --help` trains and evaluates on any manifest pair.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.data import image_path, open_image, read_manifest
from common.miniature import WorldConfig, cache_root, ensure_world, zero_shot_tasks

log = logging.getLogger(__name__)

open_clip.add_model_config(Path(__file__).parent / "model_configs")
MINIATURE_MODEL = "mini-ViT-8"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of the plain CLIP trainer."""

    steps: int = 500
    """optimiser steps"""
    batch_size: int = 256
    """image-text pairs per step"""
    lr: float = 2e-3
    """peak learning rate of AdamW"""
    weight_decay: float = 0.1
    """AdamW weight decay on weight matrices (none on biases, norms, embeddings' scale)"""
    warmup: int = 50
    """linear warm-up steps before the cosine decay"""
    seed: int = 0
    """seed of the batch order and the initialisation"""


def create_clip(name: str = MINIATURE_MODEL, seed: int = 0, device: str = "cpu"):
    """A randomly initialised open_clip model by name: (model, preprocess, tokenizer)."""
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    return model, preprocess, open_clip.get_tokenizer(name)


def preprocess_images(records: Sequence[dict], preprocess: Callable) -> torch.Tensor:
    """Stack the preprocessed images of `records` into one (N, 3, H, W) tensor (small worlds fit)."""
    tensors = []
    for record in records:
        source = record["image"] if not isinstance(record["image"], str) else image_path(record)
        tensors.append(preprocess(open_image(source, str(record.get("id")))))
    return torch.stack(tensors)


# ---------------------------------------------------------------------------------------------
# The loss and the training loop
# ---------------------------------------------------------------------------------------------


def contrastive_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised features, equal to open_clip's ClipLoss on one device."""
    logits = logit_scale * img_emb @ txt_emb.t()  # (N, N): image i against every text
    labels = torch.arange(len(logits), device=logits.device)
    # L = (CE(rows) + CE(columns)) / 2: each image picks its text among N, each text its image
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


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


TextsFor = Callable[[np.ndarray, np.random.Generator], "list[str] | tuple[list[str], ...]"]


def train_clip(model, tokenizer, images: torch.Tensor, texts_for: TextsFor, cfg: TrainConfig,
               loss_fn: Callable = contrastive_loss, device: str = "cpu", progress: bool = True) -> list[dict]:
    """Train `model` for cfg.steps; return the per-step log [{"step", "loss", "logit_scale", "lr"}].

    `texts_for(indices, rng)` gives the text of each sampled image for this step, which is where
    a paper changes what the model sees. It may also return a tuple of such lists (several texts
    per image, e.g. one real and one synthetic caption): the loss is then the sum of one loss per
    list against the same images. A NaN or infinite loss stops training with the step.
    """
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    history = []
    bar = tqdm(range(cfg.steps), desc="train clip", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, cfg)
        indices = rng.choice(len(images), size=min(cfg.batch_size, len(images)), replace=False)
        texts = texts_for(indices, rng)
        text_lists = texts if isinstance(texts, tuple) else (texts,)
        img_emb = F.normalize(model.encode_image(images[indices].to(device)), dim=-1)  # (B, E)
        loss = 0.0
        for text_list in text_lists:
            txt_emb = F.normalize(model.encode_text(tokenizer(text_list).to(device)), dim=-1)  # (B, E)
            loss = loss + loss_fn(img_emb, txt_emb, model.logit_scale.exp())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping before the weights are poisoned")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # open_clip clamps the temperature so logits stay below 100
            model.logit_scale.clamp_(0, math.log(100))
        history.append({"step": step, "loss": loss.item(), "logit_scale": model.logit_scale.exp().item(),
                        "lr": optimizer.param_groups[0]["lr"]})
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return history


# ---------------------------------------------------------------------------------------------
# Zero-shot evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    """L2-normalised image embeddings (N, E) in float32."""
    out = [model.encode_image(images[i:i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat(out), dim=-1).cpu()


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    """L2-normalised text embeddings (T, E) in float32."""
    out = [model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device)).float()
           for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(out), dim=-1).cpu()


def retrieval_metrics(img_emb: torch.Tensor, txt_emb: torch.Tensor, text_to_image: Sequence[int] | None = None,
                      ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Zero-shot retrieval recall@K in percent, both directions.

    `text_to_image[t]` is the image of text t (default: text t belongs to image t). Image->text
    counts a hit when any of the image's texts is in the top K; text->image when its image is.
    """
    text_to_image = torch.arange(len(txt_emb)) if text_to_image is None else torch.as_tensor(text_to_image)
    sims = img_emb @ txt_emb.t()  # (N_img, N_txt)
    owner = text_to_image[None, :] == torch.arange(len(img_emb))[:, None]  # (N_img, N_txt): text belongs to image
    # rank of the best correct text per image = how many texts score strictly above it
    best_correct = sims.masked_fill(~owner, -torch.inf).max(dim=1).values
    i2t_rank = (sims > best_correct[:, None]).sum(dim=1)
    correct_sim = sims[text_to_image, torch.arange(len(txt_emb))]
    t2i_rank = (sims > correct_sim[None, :]).sum(dim=0)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
        out[f"t2i_R@{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    return out


def zero_shot_accuracy(model, tokenizer, img_emb: torch.Tensor, classes: Sequence[str], templates: Sequence[str],
                       labels: Sequence[int], device: str = "cpu") -> float:
    """Top-1 accuracy in percent: each class is the mean of its prompt embeddings (CLIP's ensembling)."""
    prompts = [template.format(name) for name in classes for template in templates]
    class_emb = encode_texts(model, tokenizer, prompts, device=device).view(len(classes), len(templates), -1)
    class_emb = F.normalize(class_emb.mean(dim=1), dim=-1)  # (C, E)
    predictions = (img_emb @ class_emb.t()).argmax(dim=1)
    return 100.0 * (predictions == torch.as_tensor(labels)).float().mean().item()


def evaluate_world(model, tokenizer, preprocess, records: Sequence[dict], text_field: str = "caption",
                   images: torch.Tensor | None = None, device: str = "cpu") -> dict:
    """Retrieval against `text_field` and the world's zero-shot tasks on miniature-world records."""
    images = preprocess_images(records, preprocess) if images is None else images
    img_emb = encode_images(model, images, device=device)
    txt_emb = encode_texts(model, tokenizer, [r[text_field] for r in records], device=device)
    metrics = retrieval_metrics(img_emb, txt_emb)
    for task, spec in zero_shot_tasks(list(records)).items():
        if spec["indices"]:
            metrics[f"zeroshot_{task}"] = zero_shot_accuracy(model, tokenizer, img_emb[spec["indices"]],
                                                             spec["classes"], spec["templates"], spec["labels"], device)
    return metrics


# ---------------------------------------------------------------------------------------------
# The miniature world's scorer, trained once and cached
# ---------------------------------------------------------------------------------------------

SCORER_TRAINING = TrainConfig(steps=500, batch_size=256, lr=2e-3, warmup=50, seed=0)


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
    captions = [r["caption"] for r in train_records]
    start = time.time()
    history = train_clip(model, tokenizer, images, lambda idx, rng: [captions[i] for i in idx], train, progress=progress)
    metrics = evaluate_world(model, tokenizer, preprocess, test_records)
    metrics["train_seconds"] = time.time() - start
    log.info("miniature scorer trained: %s", metrics)
    save_checkpoint(path, {"state_dict": model.state_dict(), "model": model_name, "recipe": recipe,
                           "test_metrics": metrics, "final_loss": history[-1]["loss"]})
    return path


def main(argv=None) -> dict:
    """Train the plain CLIP on a manifest and evaluate it on another (`--help` lists the flags)."""
    import tyro

    @dataclass
    class Args:
        train_manifest: str | None = None
        """training manifest (default: the miniature world's train split)"""
        test_manifest: str | None = None
        """evaluation manifest (default: the miniature world's test split)"""
        text_field: str = "caption"
        """caption field to train and evaluate on"""
        model: str = MINIATURE_MODEL
        """open_clip architecture name"""
        train: TrainConfig = TrainConfig()
        """optimisation settings"""
        out: str = "runs/clip_train"
        """output folder: metrics.json, history.json, checkpoint.pt"""

    args = tyro.cli(Args, args=argv)
    folder = ensure_world() if args.train_manifest is None or args.test_manifest is None else None
    train_records = read_manifest(args.train_manifest or folder / "train.jsonl")
    test_records = read_manifest(args.test_manifest or folder / "test.jsonl")
    model, preprocess, tokenizer = create_clip(args.model, seed=args.train.seed)
    images = preprocess_images(train_records, preprocess)
    texts = [r[args.text_field] for r in train_records]
    history = train_clip(model, tokenizer, images, lambda idx, rng: [texts[i] for i in idx], args.train)
    if "objects" in test_records[0]:
        metrics = evaluate_world(model, tokenizer, preprocess, test_records, args.text_field)
    else:
        img_emb = encode_images(model, preprocess_images(test_records, preprocess))
        metrics = retrieval_metrics(img_emb, encode_texts(model, tokenizer, [r[args.text_field] for r in test_records]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "history.json").write_text(json.dumps(history))
    save_checkpoint(out / "checkpoint.pt", {"state_dict": model.state_dict(), "model": args.model})
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
