"""What every training loop here shares: the data order, the resume check, the guard's message, the token mean.

- The data order: epoch e is `np.random.default_rng([seed, e]).permutation(n)`, cut into batches in order, so
  a run's batches are a function of (seed, step) alone and a resumed run sees the batches it would have seen.
- The resume check: a saved run continues only under the settings it was trained with (its recipe); any
  other is refused with the flags that differ, never silently trained with the saved ones (an optimizer's
  state, for one, restores the saved learning rate); `resume_state` loads a saved run under that check.
- The checkpoint write: only of finite weights (`save_finite`); the guard's message says where it stopped.
- The micro-batch token mean: a step's loss is the mean over the response tokens of the whole global batch,
  the same under any number of ranks and micro-batches.
- A causal LM's fine-tuning: LoRA adapters, examples right-padded into a batch, the model saved whole or not at all.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from common.data import ManifestError


def epoch_permutation(epoch: int, n_rows: int, seed: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation of 0..n_rows-1 seeded by (seed, epoch), so each sample once."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def step_batch(step: int, n_rows: int, batch_size: int, seed: int, drop_last: bool = True) -> np.ndarray:
    """The rows of optimiser step `step`: epoch e walks `epoch_permutation(e)` in batches of `batch_size`.

    drop_last: every batch is whole and the n_rows % batch_size rows left over sit that epoch out (an epoch is
    n_rows // batch_size steps, at least one); otherwise the epoch's last batch is short (ceil(n / B) steps)."""
    per_epoch = max(1, n_rows // batch_size) if drop_last else math.ceil(n_rows / batch_size)
    epoch, position = divmod(step, per_epoch)
    return epoch_permutation(epoch, n_rows, seed)[position * batch_size:(position + 1) * batch_size]


def recipe_changes(found: dict, wanted: dict) -> str:
    """The settings where a stored recipe and this run's differ, as flags: "--num-beams 3 there, 1 now"."""
    return ", ".join(f"--{key.replace('_', '-')} {found.get(key)!r} there, {wanted.get(key)!r} now"
                     for key in sorted(set(found) | set(wanted)) if found.get(key) != wanted.get(key))


def check_resume_recipe(path: str | os.PathLike, saved: dict | None, wanted: dict,
                        start_afresh: str = "--no-resume") -> None:
    """Refuse to continue the run saved at `path` under settings other than its own: an error naming each flag
    that differs (saved vs now) and the two ways on (a new --out, or `start_afresh`, the flag that starts over)."""
    if saved is None:
        raise ManifestError(f"{path} holds no recipe (an older version wrote it), so its settings cannot be checked: "
                            f"pass a new --out, or {start_afresh} to start afresh")
    if saved != wanted:
        raise ManifestError(f"{path} holds a run of other settings ({recipe_changes(saved, wanted)}); pass a new "
                            f"--out, or {start_afresh} to start afresh")


def resume_state(path: str | os.PathLike, resume: bool, recipe: dict, model, optimizer, device,
                 weights: str, strict: bool = True, log: logging.Logger | None = None) -> tuple[int, list]:
    """(start step, history) of the run saved at `path` when `resume` and the file exists, else (0, []). Its
    recipe is checked (`check_resume_recipe`), then its `weights` entry is loaded into `model` (`strict` as
    load_state_dict's) and its optimizer state into `optimizer`; a state without one is refused, as its run
    cannot go on where it stopped. `log`: where to say that the run resumes."""
    path = Path(path)
    if not (resume and path.exists()):
        return 0, []
    state = torch.load(path, map_location=device, weights_only=True)
    check_resume_recipe(path, state.get("recipe"), recipe)
    if state.get("optimizer") is None:  # a checkpoint of another writer
        raise ManifestError(f"{path} holds no optimizer state; pass a new --out, or --no-resume to start afresh")
    model.load_state_dict(state[weights], strict=strict)
    optimizer.load_state_dict(state["optimizer"])
    if log is not None:
        log.info("resuming from %s at step %d", path, state["step"])
    return state["step"], state["history"]


def check_batch_split(batch_size: int, flag: str = "--batch-size") -> None:
    """Exit with one line, before anything loads, unless the global batch splits evenly over the ranks (torchrun's
    WORLD_SIZE)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if batch_size % world_size:
        raise SystemExit(f"error: {flag} {batch_size} must be a multiple of the {world_size} ranks")


def save_finite(path: str | os.PathLike, model, loss, where: str, rank: int, payload: Callable[[], dict]) -> None:
    """A training loop's checkpoint write: `model`'s weights and the step's `loss` checked finite on every rank,
    as a finite loss does not make a finite update (DDP keeps the weights equal, so all ranks stop together),
    then rank 0 writes `payload()` to `path` atomically; a diverged run leaves the last good checkpoint."""
    from common.clip_train import assert_finite_state, save_checkpoint  # clip_train imports this module

    assert_finite_state(model, loss, where)
    if rank == 0:
        save_checkpoint(path, payload())


def guard_where(stage: str, step: int, steps: int, when: str, path: Path, saved_step: int | None) -> str:
    """Where a non-finite loss or weight was found, for `assert_finite_state`'s error: the step, before or after
    its update, and which state on disk a rerun would resume from."""
    kept = f"{path} keeps step {saved_step}" if saved_step else f"{path} not written by this run"
    return f"{stage} at step {step} of {steps}, {when} ({kept})"


def global_token_count(n_tokens: int, device: str | torch.device, world_size: int) -> torch.Tensor:
    """The number of loss tokens in the whole global batch (this rank's `n_tokens` summed over the ranks): the
    one denominator every rank and micro-batch divides by, so the step's loss is the global token mean."""
    tokens = torch.tensor(n_tokens, device=device)
    if world_size > 1:
        dist.all_reduce(tokens)
    return tokens


def token_mean_backward(token_sum: torch.Tensor, tokens: torch.Tensor, world_size: int) -> None:
    """Backward of one micro-batch's share of the global token mean. DDP averages gradients over the ranks, so
    the sum is scaled by world_size: the ranks' gradients then add up to the gradient of sum / tokens."""
    (token_sum * world_size / tokens).backward()


def right_padded_batch(examples: list[tuple[list[int], list[int]]], pad_id: int, ignore_index: int = -100) -> dict:
    """(input_ids, labels) examples as one batch (B, T), right-padded to the longest: input_ids with `pad_id`,
    labels with `ignore_index` (no loss), attention_mask 1 on the real tokens."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id)
    labels = torch.full((len(examples), length), ignore_index)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, :len(ids)], labels[row, :len(labs)] = torch.tensor(ids), torch.tensor(labs)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def save_pretrained_atomically(model, tokenizer, folder: str | os.PathLike) -> None:
    """`save_pretrained` of a transformers model and its tokenizer into a temporary folder, then a rename: a
    killed save leaves the old model or none, never half of one."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def with_lora(model, r: int, alpha: int, dropout: float):
    """`model` (a causal LM) with peft LoRA adapters on every linear layer, the rest frozen; the adapters train
    in float32 over a half-precision frozen base (peft's autocast_adapter_dtype)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
