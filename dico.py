"""DiCO: Revisiting Image Captioning Training Paradigm via Direct CLIP-based Optimization.

Paper: https://arxiv.org/abs/2408.14547 (Moratelli, Caffagni, Cornia, Baraldi, Cucchiara, 2024); official code:
aimagelab/DiCO (trainers/dico_trainer.py; defaults from scripts/train_xe_coco.sh and scripts/train_dico_coco.sh).
An XE-trained captioner is the frozen reference pi_ref and the initial policy pi_theta. Per image, beam search
proposes k captions that a CLIP-based evaluator (PAC-S or CLIP-S) scores; the policy learns, as weighted
classification, to raise its implied reward log pi_theta - log pi_ref on the best one over the others (as DPO):
no policy gradient, so no collapse onto the evaluator's quirks as SCST (the paper's baseline, beside it) shows.

Implements (numbered here; the comments quote each formula, the paper's equation numbers unchecked offline):
  1. XE pre-training: L_XE = -sum_t log p(y_t | y_<t, x)                           (`xe_loss`)
  2. k candidates per image by beam search from the policy, without gradients     (`beam_search`, `candidates`)
  3. reward r_i = w cos(E_img(x), E_txt(y_i)), w = 2.0 (PAC-S) or 2.5 (CLIP-S)     (`candidate_rewards`)
  4. winner w = argmax_i r_i, loser weights gamma_j = softmax_{j != w}(tau (r_w - r_j))
  5. s(y) = log pi_theta(y|x) - log pi_ref(y|x), teacher-forced sums over tokens   (`finetune_terms`)
  6. L_DiCO = mean_x -log sigmoid(beta (s(y_w) - sum_j gamma_j s(y_j)))            (`dico_terms`;
     steps 4-6 are caption_kernels/dico.py's `dico_loss`)
  SCST (Rennie et al. 2017), mean-of-others baseline (`scst_terms`); BLEU-4, CIDEr, CLIP/PAC-S (`evaluate`).

Deviations from the paper (docs/dico.md has each in full, and the engineering notes: resume, divergence, batches):
  1. Candidates are decoded without autograd, their log-probs from one teacher-forced pass; no dropout in
     fine-tuning (s(y) = 0, loss log 2 at the start); torch pre-norm layers, not the official BERT + GPT-2.
  2. Evaluation uses the reference metrics ("A photo depicts " prefix, clamp at 0); the training reward follows the
     official code: no prefix, no clamp, no references (`--reward-prefix`, `--reward-clamp` change that).
  3. BLEU-4 and CIDEr are COCOEvalCap's; without Java, a fallback tokenization labelled in every result.
  4. XE warms up linearly over 5% of the steps, then constant, as the official scripts; steps set the budget.
  5. SCST's baseline is the mean reward of the other k - 1 candidates (as aimagelab/DiCO), the loss token-averaged.
  6. Miniature world (PRESETS; wherever no data flag is given): a smaller captioner, the world's scorer as frozen
     encoder and evaluator, softmax over the training captions' tokens, PAC-S = w 2.0 on that scorer, lr 1e-4.
  7. XE draws one of an image's references per step; batch sizes are global (all ranks); the best checkpoint is
     the best validation CIDEr (XE) or RefPAC-S (DiCO, SCST); the captioner reads the ViT's tokens before ln_post.

    python dico.py --preset smoke --out runs/dico_smoke   # every stage on a tiny world, to check that all runs
    python dico.py miniature --seeds 3                    # XE, then DiCO and SCST from it, then eval; seeds 0-2
    C="--coco-karpathy data/dataset_coco.json --coco-images data/coco --out runs/coco \
       --encoder-model ViT-L-14 --encoder-pretrained openai --pacs-checkpoint ckpt/clip_ViT-B-32.pth"
    torchrun --nproc_per_node 8 dico.py xe $C
    torchrun --nproc_per_node 8 dico.py dico $C --init runs/coco/xe/best.pt   # --algo scst: the baseline
    python dico.py eval $C --checkpoints runs/coco/xe/best.pt runs/coco/dico/best.pt runs/coco/scst/best.pt
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import cli, run_folder
from common.caption_eval import collapse_indicators
from common.caption_metrics import coco_scores
from common.caption_sources import (data_source, evaluators, image_bank_of, is_miniature, load_scorer, load_split,
                                    require_pacs_weights)
from common.clip_captioner import Captioner, Vocab, model_from_checkpoint, sample
from common.clip_score import encode_texts
from common.clip_train import SCORER_TRAINING, TrainConfig, assert_finite_state
from common.data import BadSampleError, NonFiniteError, check_device, init_distributed, run_command
from common.image_bank import ENCODER_TOKENS, ImageBank, same_encoder_tokens
from common.miniature import WorldConfig, hallucinated_words, names_kept
from common.run_folder import Run, refuse, weights_digest, write_log
from caption_kernels.dico import dico_loss, dico_stats, sequence_logprobs


# Presets (common/cli.py): Args holds the official scripts' values; `miniature` (the default wherever the data is the
# miniature world) sizes the run for minutes on 2 CPU cores, `smoke` runs every stage in seconds to check that it
# works. A flag you give always wins, even at the paper's value.
MINIATURE = dict(
    encoder_model="miniature", clip_s_model="miniature", pacs_model="miniature", d_model=128,
    encoder_layers=1, decoder_layers=2, heads=4, ffn=512, restrict_vocab=True, cache_features=True,
    dropout=0.0, xe_steps=150, xe_batch_size=32, xe_lr=1e-3, xe_eval_every=50, steps=30, batch_size=16, lr=1e-4,
    eval_beam=3, eval_every=10, save_every=10, val_images=100, eval_images=300,
)
PRESETS = {"smoke": {**MINIATURE, "d_model": 32, "heads": 2, "ffn": 64, "decoder_layers": 1, "max_len": 12,
                     "xe_steps": 6, "xe_batch_size": 8, "xe_eval_every": 3, "steps": 4, "batch_size": 4, "eval_beam": 2,
                     "eval_every": 2, "save_every": 2, "val_images": 6, "eval_images": 6, "world.n_train": 48,
                     "world.n_val": 12, "world.n_test": 12, "world.n_synthetic": 1, "scorer.steps": 5,
                     "scorer.batch_size": 16, "scorer.warmup": 1},
           "miniature": MINIATURE, "paper": {}}


@dataclass
class Args:
    """DiCO / SCST captioner fine-tuning. Stages: miniature (default), xe, dico (--algo scst), eval.

    Batch sizes are global: all torchrun ranks together (each rank takes its share), not per GPU."""

    stage: tyro.conf.Positional[Literal["miniature", "xe", "dico", "eval"]] = "miniature"
    """miniature: xe + dico + scst + eval in the miniature world; or one stage"""
    preset: Annotated[Optional[Literal["smoke", "miniature", "paper"]], tyro.conf.arg(
        help=cli.preset_help(PRESETS) + " (here the miniature preset is the default wherever no data flag is given)"
    )] = None
    out: str = "runs/dico"
    """output folder: <out>/xe, <out>/dico, <out>/scst, <out>/eval"""
    seed: int = 0
    """seed of initialisation, batch order and dropout"""
    seeds: int = 1
    """miniature stage: repeat the whole experiment for seeds seed .. seed + seeds - 1"""
    # --- data -------------------------------------------------------------------------------
    coco_karpathy: Optional[str] = None
    """Karpathy split JSON (dataset_coco.json); with --coco-images, the real run's data"""
    coco_images: Optional[str] = None
    """COCO image root (holds train2014/, val2014/)"""
    train_manifest: Optional[str] = None
    """JSONL manifest of training images (fields id, image, caption, optional refs)"""
    val_manifest: Optional[str] = None
    """validation manifest (checkpoint selection)"""
    test_manifest: Optional[str] = None
    """test manifest (the eval stage)"""
    world: WorldConfig = field(default_factory=WorldConfig)
    """the miniature world, used when no data is given"""
    scorer: TrainConfig = SCORER_TRAINING
    """miniature: training of the world's CLIP scorer (encoder, reward and judge; trained once per world and recipe)"""
    # --- models -----------------------------------------------------------------------------
    encoder_model: str = "ViT-L-14"  # official: frozen CLIP ViT-L/14
    """frozen open_clip image encoder whose last hidden states the captioner reads ('miniature' ok)"""
    encoder_pretrained: Optional[str] = "openai"
    """its open_clip tag or checkpoint file"""
    clip_s_model: str = "ViT-B-32"  # jmhessel/clipscore: OpenAI ViT-B/32
    """CLIP-S evaluator architecture ('miniature' = the world's scorer)"""
    clip_s_pretrained: Optional[str] = "openai"
    """CLIP-S evaluator tag or checkpoint file"""
    pacs_model: str = "ViT-B-32"  # aimagelab/pacscore: ViT-B/32 + fine-tuned state dict
    """PAC-S evaluator architecture ('miniature' = the world's scorer with w = 2.0)"""
    pacs_pretrained: Optional[str] = "openai"
    """PAC-S base weights (a local file is taken as the whole PAC-S model)"""
    pacs_checkpoint: Optional[str] = None
    """PAC-S fine-tuned state dict (clip_ViT-B-32.pth); required for PAC-S outside the miniature"""
    reward: Literal["pac_s", "clip_s"] = "pac_s"  # paper: PAC-S is the main evaluator
    """which evaluator gives the fine-tuning reward"""
    reward_prefix: str = ""  # official training reward: no prefix
    """text prefix for the reward's caption encoding"""
    reward_clamp: bool = False  # official training reward: no clamp at 0
    """clamp the reward's cosine at 0 as the metric does"""
    # --- captioner (official: 512-d, 3 + 3 layers, 8 heads, FFN 2048) ----------------------
    d_model: int = 512
    """captioner width"""
    encoder_layers: int = 3
    """Transformer encoder layers over the CLIP tokens"""
    decoder_layers: int = 3
    """Transformer decoder layers"""
    heads: int = 8
    """attention heads"""
    ffn: int = 2048
    """feed-forward width"""
    dropout: float = 0.1  # unverified
    """dropout in XE training (fine-tuning runs without)"""
    max_len: int = 30  # official: candidates of at most 30 tokens
    """longest caption in tokens, EOS included"""
    restrict_vocab: bool = False  # official: the full CLIP BPE vocabulary + pad
    """emit only the BPE tokens of the training captions (miniature speed-up)"""
    cache_features: bool = False
    """keep every image's frozen CLIP tokens in memory (small data sets) instead of per batch"""
    # --- XE pre-training (official: scripts/train_xe_coco.sh) ----------------------------------
    xe_steps: int = 10000  # official: max_steps 10000
    """XE optimiser steps"""
    xe_batch_size: int = 512  # official: 64 per device x 8 accumulation steps, WORLD_SIZE=1 as the script ships
    """images per XE optimiser step, GLOBAL: all ranks together, each rank takes 1/world-size of it"""
    xe_lr: float = 2.5e-4  # official: learning_rate 2.5e-4
    """XE peak learning rate (Adam)"""
    xe_warmup: float = 0.05  # official: constant_with_warmup, warmup_ratio 0.05
    """fraction of XE steps of linear warm-up"""
    # --- DiCO / SCST fine-tuning (official: scripts/train_dico_coco.sh) ------------------------
    algo: Literal["dico", "scst"] = "dico"
    """fine-tuning algorithm of the dico stage"""
    init: Optional[str] = None
    """XE checkpoint to start from (default <out>/xe/best.pt)"""
    steps: int = 250000  # official: max_steps 250000
    """fine-tuning optimiser steps"""
    batch_size: int = 16  # official: 8 per device on 2 GPUs (eval_steps 1770 = a quarter of 113,287 images / 16)
    """images per fine-tuning step (--beams candidates each), GLOBAL: all ranks together, each takes its share"""
    micro_batch_size: int = 0  # memory only: the result is the same
    """most images a rank puts through the model at once (0 = its whole share); chunks accumulate gradients"""
    lr: float = 1e-6  # official: learning_rate 1e-6, constant, Adam
    """fine-tuning learning rate"""
    beams: int = 5  # official: k = 5
    """candidates per image (beam width)"""
    candidates: Literal["beam", "sample"] = "beam"  # official: beam search
    """how candidates are drawn"""
    beta: float = 0.2  # official
    """DiCO beta"""
    tau: float = 300.0  # official
    """DiCO tau (loser-weight temperature)"""
    kernel: Literal["auto", "triton", "torch"] = "auto"
    """caption_kernels/dico.py implementation"""
    # --- evaluation, checkpoints ------------------------------------------------------------
    eval_beam: int = 5
    """beam width of evaluation captions (top beam kept)"""
    eval_every: int = 1770  # official: eval_steps 1770, best by ref-PACScore
    """fine-tuning steps between validations (best.pt = best validation RefPAC-S)"""
    xe_eval_every: int = 200  # official: eval_steps 200, best by cider
    """XE steps between validations (best.pt = best validation CIDEr)"""
    save_every: int = 1000
    """steps between last.pt saves"""
    val_images: int = 0
    """validation images used for selection (0 = all)"""
    eval_images: int = 0
    """test images evaluated (0 = all)"""
    checkpoints: list[str] = field(default_factory=list)
    """eval stage: checkpoints to evaluate (default: <out>/{xe,dico,scst}/best.pt that exist)"""
    split: Literal["val", "test"] = "test"
    """eval stage: split to caption"""
    resume: bool = False
    """continue from <out>/<stage>/last.pt when it exists, with the flags it was trained with (checked)"""
    overwrite: bool = False
    """start afresh in <out>/<stage> even when it holds a run (whose checkpoints and log are then replaced)"""
    strict: bool = False
    """stop at the first unreadable image instead of skipping it (skipped images are counted and reported)"""
    device: Optional[str] = None
    """cuda or cpu (default: cuda when available)"""


def parse(argv: Optional[list[str]] = None) -> Args:
    """The command line's Args: the miniature preset wherever the data is the miniature world (common/cli.py)."""
    return cli.parse(Args, argv, PRESETS, lambda args: "miniature" if is_miniature(args) else "paper")


# Each numeric flag's range, checked at start-up: outside it a run went on without a word (a batch of 0 images; one
# beam, so no loser and every DiCO step skipped; a caption of only EOS; a negative tau weighting the best losers most).
AT_LEAST = dict(seed=0, seeds=1, xe_steps=1, xe_batch_size=1, xe_eval_every=1, steps=1, batch_size=1,
                micro_batch_size=0, beams=2, eval_beam=1, eval_every=1, save_every=1, val_images=0, eval_images=0,
                max_len=2, d_model=1, encoder_layers=1, decoder_layers=1, heads=1, ffn=1)
POSITIVE = ("lr", "xe_lr", "beta", "tau")


def check_flags(args: Args) -> None:
    """Every flag in its range, before anything is read or written; else one line naming the flag."""
    cli.check_ranges(args, at_least=AT_LEAST, positive=POSITIVE, fractions=("xe_warmup",))
    if not 0 <= args.dropout < 1:
        raise refuse(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.d_model % args.heads:
        raise refuse(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    if args.resume and args.overwrite:
        raise refuse("--resume continues the run in --out, --overwrite replaces it: pass one")


# ============================================================================================
# Decoding over the captioner (common/clip_captioner.py: frozen CLIP tokens -> Transformer encoder -> decoder)
# ============================================================================================


def teacher_forcing(tokens: torch.Tensor, bos: int, pad: int, valid: Optional[torch.Tensor] = None):
    """Decoder inputs, targets and mask for token rows (N, T) that hold y_1 .. EOS, then pad."""
    inputs = torch.cat([torch.full_like(tokens[:, :1], bos), tokens[:, :-1]], dim=1)  # (N, T)
    mask = tokens != pad  # (N, T): EOS included, padding excluded
    if valid is not None:
        mask &= valid[:, None]  # excluded candidates contribute nothing, whatever they hold
    return inputs, tokens, mask


@torch.no_grad()
def beam_search(model: Captioner, visual_tokens: torch.Tensor, beam_size: int, max_len: int):
    """Batched beam search: tokens (B, K, T) (EOS then pad), scores (B, K) = sum of token log-probs.

    No length normalisation; a finished beam continues with pad at log-prob 0, so it competes
    with the live ones on its final score. Beams start from one live hypothesis, so all K returned
    sequences are distinct; when fewer than K sequences exist, the extra ones score -inf.
    Greedy decoding is beam_size = 1.
    """
    cache = model.start_cache(model.encode(visual_tokens).repeat_interleave(beam_size, dim=0))  # memory (B K, P, D)
    B, K, device = visual_tokens.shape[0], beam_size, visual_tokens.device
    tokens = torch.empty(B, K, 0, dtype=torch.long, device=device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    last = torch.full((B * K,), model.bos, dtype=torch.long, device=device)
    for t in range(max_len):
        logits = model.step(cache, last, t)  # (B K, V)
        logp = F.log_softmax(logits.float(), dim=-1).view(B, K, -1)  # (B, K, V)
        V = logp.shape[-1]
        pad_only = torch.full((V,), float("-inf"), device=device)
        pad_only[model.pad] = 0.0
        logp = torch.where(finished[..., None], pad_only, logp)
        # score(y_<=t) = score(y_<t) + log p(y_t | y_<t, x), best K over all K * V extensions
        scores, flat = (scores[..., None] + logp).view(B, K * V).topk(K, dim=1)  # (B, K)
        parent, token = flat // V, flat % V
        tokens = torch.cat([tokens.gather(1, parent[..., None].expand(-1, -1, t)), token[..., None]], dim=2)
        finished = finished.gather(1, parent) | (token == model.eos)
        if finished.all():
            break
        model.reorder_cache(cache, (torch.arange(B, device=device)[:, None] * K + parent).flatten())
        last = token.flatten()
    return tokens, scores


def distinct_and_finite(tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: the candidate has a finite score and repeats no earlier candidate of its image."""
    same = (tokens[:, :, None, :] == tokens[:, None, :, :]).all(dim=-1)  # (B, K, K)
    earlier = torch.ones_like(same[0]).tril(diagonal=-1)  # (K, K): j < i
    return torch.isfinite(scores) & ~(same & earlier).any(dim=-1)


# ============================================================================================
# The reward and the losses: XE, DiCO, SCST (each returns a dict of named terms)
# ============================================================================================


def candidate_rewards(bundle, w: float, img_feats: np.ndarray, texts: list[str], k: int, prefix: str,
                      clamp: bool) -> torch.Tensor:
    """(B, k) rewards of k captions per image."""
    txt = encode_texts(bundle, texts, prefix=prefix, progress=False).reshape(len(img_feats), k, -1)  # (B, k, E)
    # step 3: r_i = w * cos(E_img(x), E_txt(y_i)); the official training reward has no clamp
    cos = np.einsum("be,bke->bk", img_feats, txt)
    return torch.from_numpy(w * (np.clip(cos, 0, None) if clamp else cos)).float()


def xe_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> dict:
    # step 1: L_XE = -sum_t log p(y_t | y_<t, x), averaged over the batch's tokens
    token_nll = F.cross_entropy(logits.transpose(1, 2).float(), targets.masked_fill(~mask, 0), reduction="none")
    return {"loss": (token_nll * mask).sum() / mask.sum().clamp_min(1)}


def dico_terms(policy_logps, ref_logps, rewards, valid, beta: float, tau: float, impl: str) -> dict:
    """DiCO loss (steps 4-6, in caption_kernels/dico.py) and the numbers a training log wants."""
    # L = mean_x -log sigmoid(beta (s(y_w) - sum_{j != w} gamma_j s(y_j))),  s = log pi_theta - log pi_ref
    loss = dico_loss(policy_logps, ref_logps, rewards, beta=beta, tau=tau, valid=valid, impl=impl)
    stats = dico_stats(policy_logps.detach(), ref_logps, rewards, beta=beta, tau=tau, valid=valid)
    usable = stats.usable
    winner_reward = rewards.gather(1, stats.winner.clamp_min(0)[:, None])[:, 0]  # (B,)
    # H(gamma) = -sum_j gamma_j log gamma_j: 0 when one loser takes all the weight
    gamma_entropy = -(stats.gamma * stats.gamma.clamp_min(1e-30).log()).sum(dim=1)  # (B,)
    return {**stats.summary(), "loss": loss,
            "reward_winner": float(winner_reward[usable].mean()) if usable.any() else float("nan"),
            "reward_mean": float(rewards[valid].mean()),
            "gamma_entropy": float(gamma_entropy[usable].mean()) if usable.any() else float("nan")}


def scst_terms(policy_logps: torch.Tensor, n_tokens: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor) -> dict:
    """Self-critical loss with the mean of the other candidates as baseline (rows need 2 valid)."""
    weights = valid.float()  # (B, k)
    n_valid = weights.sum(dim=1, keepdim=True)  # (B, 1)
    total = (rewards * weights).sum(dim=1, keepdim=True)  # (B, 1)
    # b_i = mean_{j != i} r_j
    baseline = (total - rewards * weights) / (n_valid - 1).clamp_min(1)  # (B, k)
    use = valid & (n_valid >= 2)  # (B, k)
    advantage = torch.where(use, rewards - baseline, 0.0)  # (B, k), a constant for the gradient
    # L = -mean_i (r_i - b_i) * (1 / |y_i|) sum_t log p(y_{i,t})
    per_token_logp = torch.where(use, policy_logps / n_tokens.clamp_min(1), 0.0)  # (B, k)
    loss = -(advantage.detach() * per_token_logp).sum() / use.sum().clamp_min(1)
    return {"loss": loss, "reward_mean": float(rewards[valid].mean()),
            "reward_winner": float(torch.where(valid, rewards, -math.inf).amax(dim=1).mean()),
            "advantage_abs": float(advantage.abs()[use].mean()) if use.any() else 0.0}


# ============================================================================================
# Evaluation
# ============================================================================================


def caption_metrics(args: Args, bank: ImageBank, indices: list[int], captions: list[str],
                    per_item: dict | None = None) -> dict:
    """BLEU-4, CIDEr (fractions, as COCOEvalCap; their "tokenizer" label beside them), the CLIP-based scores,
    collapse indicators and (miniature) names/hallucinations. `per_item` receives each caption's CIDEr, CLIP-based
    scores and repeated 3-grams, and the captions themselves (what a one-seed verdict resamples)."""
    records = [bank.records[i] for i in indices]
    items: dict = {} if per_item is None else per_item
    metrics = coco_scores({i: rec["refs"] for i, rec in enumerate(records)}, dict(enumerate(captions)), scale=1.0,
                          metrics=("BLEU-4", "CIDEr"), per_item=items)
    judges = {{"clip_s": "CLIP-S", "pac_s": "PAC-S"}[name]: judge for name, judge in evaluators(args).items()}
    for label, scores in bank.caption_scores(judges, indices, captions).items():  # CLIP-S, RefCLIP-S, PAC-S, ...
        metrics[label], items[label] = float(scores.mean()), np.asarray(scores, float).tolist()
    metrics.update(collapse_indicators(captions, per_item=items))
    items["captions"] = list(captions)
    if "objects" in records[0]:  # miniature world: its labels say which names are kept or invented
        kept = np.sum([names_kept(c, r) for c, r in zip(captions, records)], axis=0)
        metrics["names_kept"] = float(kept[0] / max(1, kept[1]))
        metrics["hallucinated"] = float(np.mean([len(hallucinated_words(c, r)) for c, r in zip(captions, records)]))
    return metrics


@torch.no_grad()
def generate_captions(model: Captioner, vocab: Vocab, bank: ImageBank, indices: list[int], beam: int,
                      batch: int = 100) -> tuple[list[str], list[int]]:
    """Top-beam captions of the readable images among `indices`, and their indices."""
    model.eval()
    captions, kept = [], []
    for start in range(0, len(indices), batch):
        visual, ok = bank.visual_tokens(indices[start:start + batch])
        if ok:
            tokens, _ = beam_search(model, visual, beam, model.max_len)
            captions += [vocab.decode(row[0].tolist()) for row in tokens]
            kept += ok
    return captions, kept


def evaluate(args: Args, model: Captioner, vocab: Vocab, bank: ImageBank, limit: int,
             per_item: dict | None = None) -> tuple[dict, list[str], list[int]]:
    """Metrics, captions and indices of the first `limit` images (0 = all) that can be read (per_item: see
    caption_metrics)."""
    indices = list(range(len(bank.records) if limit <= 0 else min(limit, len(bank.records))))
    captions, kept = generate_captions(model, vocab, bank, indices, args.eval_beam)
    if not kept:
        raise BadSampleError(f"none of the {len(indices)} images to evaluate can be read ({bank.skipped.examples[:3]})")
    return {**caption_metrics(args, bank, kept, captions, per_item=per_item), "images": len(kept)}, captions, kept


# ============================================================================================
# Checkpoints and the recipe a resumed run must match
# ============================================================================================


def load_checkpoint(path) -> dict:
    """A dico.py checkpoint, or a clear error when the file is missing, corrupted, something else, read the encoder's
    tokens after ln_post or holds NaN weights (a diverged run's, which would be captioned and scored as a model)."""
    return run_folder.load_checkpoint(path, ("model", "config", "vocab", "step"), "dico.py",
                                      "run the xe stage first, or pass --init", same_encoder_tokens)


# What a stage's results depend on, besides the data and models of every stage: a resumed run must match its
# checkpoint on each of these flags (`recipe`; a fine-tuning's --init by its weights' hash, XE's --xe-steps and
# --xe-warmup by the warm-up's length). Every other flag is in FREE_ON_RESUME (may change: --steps extends a run,
# --micro-batch-size is memory only, ...) or in the other stage's list (the fine-tuning reads its captioner's
# settings from --init); tests check that each flag is in one of them.
RECIPE_FLAGS = {
    "all": ("seed", "coco_karpathy", "coco_images", "train_manifest", "val_manifest", "world", "scorer",
            "encoder_model", "encoder_pretrained", "clip_s_model", "clip_s_pretrained", "pacs_model",
            "pacs_pretrained", "pacs_checkpoint", "max_len", "eval_beam", "val_images"),
    "xe": ("d_model", "encoder_layers", "decoder_layers", "heads", "ffn", "dropout", "restrict_vocab",
           "xe_batch_size", "xe_lr", "xe_eval_every"),
    "finetune": ("batch_size", "lr", "beams", "candidates", "beta", "tau", "reward", "reward_prefix",
                 "reward_clamp", "eval_every"),
}
FREE_ON_RESUME = ("stage", "preset", "out", "seeds", "test_manifest", "cache_features", "algo", "init", "steps",
                  "xe_steps", "xe_warmup", "micro_batch_size", "kernel", "save_every", "eval_images", "checkpoints",
                  "split", "resume", "overwrite", "strict", "device")


def xe_warmup_steps(args: Args) -> float:
    """How many XE steps the learning rate warms up over (at least one)."""
    return max(1.0, args.xe_warmup * args.xe_steps)


def recipe(args: Args, stage: str, start: Optional[dict]) -> dict:
    """{flag: value} of what `stage`'s results depend on; a fine-tuning's start (policy and reference) by its
    weights' hash, so that an XE run that went on since is another start, even at the same --init path."""
    values = run_folder.recipe(args, RECIPE_FLAGS["all"] + RECIPE_FLAGS["xe" if stage == "xe" else "finetune"])
    if stage == "xe":  # more --xe-steps continue the same run only while the warm-up keeps its length
        values["xe_warmup*xe_steps"] = xe_warmup_steps(args)
    else:
        values["init"] = f"sha256:{weights_digest(start)[:16]}"
    return values


# ============================================================================================
# Training: the step's pieces (candidates, rewards, loss, update), then one loop for XE and DiCO / SCST
# ============================================================================================


def validate(run: Run, vocab: Vocab, args: Args, bank: ImageBank, reward: Optional[tuple]) -> dict:
    """Validation metrics of the current policy; best.pt when the selected one (CIDEr for XE, RefPAC-S for
    fine-tuning: official metric_for_best_model cider, ref-PACScore) improves."""
    select = "CIDEr" if run.stage == "xe" else "RefPAC-S"
    metrics, captions, kept = evaluate(args, run.model, vocab, bank, args.val_images)
    if reward is not None:  # the reward the policy maximises, on the captions the judge scores: the plot's curves
        img = bank.image_features(reward[0], kept)
        metrics["reward"] = float(candidate_rewards(*reward, img, captions, 1, args.reward_prefix,
                                                    args.reward_clamp).mean())
    if metrics[select] > run.best:
        run.best = metrics[select]
        run_folder.save(run, run.out / "best.pt", args, metrics)
    write_log(run.out / "log.jsonl", {"step": run.step, "val": metrics})
    run.labels.update({k: v for k, v in metrics.items() if isinstance(v, str)})
    print(f"[{run.stage}] step {run.step} val " +
          " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in run.labels))
    return metrics


def xe_batch(bank: ImageBank, vocab: Vocab, references: list, indices: list[int], picks: list[int],
             device: str) -> dict:
    """One XE micro-batch: the drawn one of each readable image's encoded `references`, teacher-forced; its
    denominator: the tokens."""
    visual, kept = bank.visual_tokens(indices)  # (b, 1 + P, W)
    if not kept:  # no readable image: one zero row that counts for nothing, so every rank steps alike
        visual = bank.placeholder()
    pick = dict(zip(indices, picks))
    rows = [references[i][pick[i]] for i in kept] or [[]]
    tokens = torch.full((len(rows), max(1, max(map(len, rows)))), vocab.pad, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    inputs, targets, mask = teacher_forcing(tokens.to(device), vocab.bos, vocab.pad)
    return {"visual": visual, "inputs": inputs, "targets": targets, "mask": mask, "images": len(kept),
            "count": int(mask.sum()), "nonfinite": 0}


def xe_terms(policy: nn.Module, batch: dict) -> dict:
    return xe_loss(policy(batch["visual"], batch["inputs"]), batch["targets"], batch["mask"])


# ALGO LOGIC: how the k candidates of an image are drawn (step 2)
def candidates(model: Captioner, visual: torch.Tensor, k: int, max_len: int, how: str):
    """k captions per image from the policy, without gradients: tokens (b, k, T), scores (b, k)."""
    if how == "beam":
        return beam_search(model, visual, k, max_len)  # step 2: the official candidates
    return sample(model, visual, k, max_len)


# ALGO LOGIC: what the candidates are rewarded with (step 3)
def reward_candidates(reward: tuple, bank: ImageBank, vocab: Vocab, tokens: torch.Tensor, kept: list[int],
                      args: Args) -> torch.Tensor:
    """(b, k) rewards of the decoded candidates of the readable images `kept` (zeros when there are none)."""
    if not kept:
        return torch.zeros(tokens.shape[:2], device=args.device)
    texts = [vocab.decode(row.tolist()) for row in tokens.flatten(0, 1)]
    img = bank.image_features(reward[0], kept)
    return candidate_rewards(*reward, img, texts, tokens.shape[1], args.reward_prefix,
                             args.reward_clamp).to(args.device)


def finetune_batch(model: Captioner, bank: ImageBank, vocab: Vocab, reward: tuple, indices: list[int],
                   args: Args, algo: str) -> dict:
    """One fine-tuning micro-batch before any gradient: candidates, rewards, validity, teacher-forcing inputs and
    its denominator (images with a winner and a loser for DiCO, their valid candidates for SCST)."""
    visual, kept = bank.visual_tokens(indices)  # (b, 1 + P, W)
    if not kept:  # no readable image: one zero row that counts for nothing, so every rank steps alike
        visual = bank.placeholder()
    tokens, scores = candidates(model, visual, args.beams, args.max_len, args.candidates)  # (b, k, T), (b, k)
    valid = distinct_and_finite(tokens, scores) & bool(kept)  # (b, k)
    nonfinite = int((~torch.isfinite(scores)).sum()) if kept else 0  # NaN: a diverged policy (-inf: no such beam)
    rewards = reward_candidates(reward, bank, vocab, tokens, kept, args)  # (b, k)
    inputs, targets, mask = teacher_forcing(tokens.flatten(0, 1), vocab.bos, vocab.pad, valid.flatten())
    usable = valid.sum(dim=1, keepdim=True) >= 2  # (b, 1): a winner and a loser; the losses average over these
    count = int(usable.sum()) if algo == "dico" else int((valid & usable).sum())
    return {"visual": visual, "inputs": inputs, "targets": targets, "mask": mask, "valid": valid,
            "rewards": rewards, "images": len(kept), "count": count, "nonfinite": nonfinite}


# ALGO LOGIC: the fine-tuning loss of a micro-batch (steps 4-6 for DiCO, or SCST's)
def finetune_terms(policy: nn.Module, reference: Captioner, batch: dict, algo: str, args: Args) -> dict:
    """The loss and logged terms from the candidates' log-probs under the policy and the frozen reference."""
    k, mask = args.beams, batch["mask"]
    # log pi(y|x) = sum_t log p(y_t | y_<t, x), EOS included, padding masked, not length-normalised
    policy_logps = sequence_logprobs(policy(batch["visual"], batch["inputs"], beams=k), batch["targets"], mask,
                                     impl=args.kernel)
    with torch.no_grad():  # step 5: log pi_ref(y|x), teacher-forced sums over tokens
        ref_logps = sequence_logprobs(reference(batch["visual"], batch["inputs"], beams=k), batch["targets"],
                                      mask, impl=args.kernel)
    if algo == "dico":
        # steps 4-6 (caption_kernels/dico.py): w = argmax_i r_i, gamma_j = softmax_{j != w}(tau (r_w - r_j)),
        # s = log pi_theta - log pi_ref, L = mean_x -log sigmoid(beta (s(y_w) - sum_j gamma_j s(y_j)))
        return dico_terms(policy_logps.view(-1, k), ref_logps.view(-1, k), batch["rewards"], batch["valid"],
                          args.beta, args.tau, args.kernel)
    return scst_terms(policy_logps.view(-1, k), mask.sum(1).view(-1, k), batch["rewards"], batch["valid"])


def update(run: Run, policy: nn.Module, batches: list[dict], terms_of, world_size: int, beams: int):
    """One optimiser step over this rank's micro-batches, whose gradients accumulate: each loss is weighted by its
    share of the global batch's denominator (`count`), so that any number of ranks and micro-batches takes the step
    one process would. Returns the logged means (weighted as the loss), the batch's images and NaN candidates."""
    totals = torch.tensor([sum(b[key] for b in batches) for key in ("count", "images", "nonfinite")],
                          dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(totals)
    denominator, images, nonfinite = max(1.0, totals[0].item()), int(totals[1].item()), int(totals[2].item())
    if run.stage != "xe" and images and nonfinite == images * beams:  # on every rank: they stop together
        raise NonFiniteError(f"{run.where(run.step + 1, 'before its update')}: all {nonfinite} candidates of the "
                             f"batch's {images} images have a NaN or infinite log-prob (the policy diverged)")
    run.optimizer.zero_grad(set_to_none=True)
    sums: dict = {}
    for j, batch in enumerate(batches):
        accumulate = world_size > 1 and j < len(batches) - 1  # DDP all-reduces on the last backward only
        with policy.no_sync() if accumulate else contextlib.nullcontext():
            terms = terms_of(batch)
            loss = terms["loss"]
            assert_finite_state(None, loss.detach(), run.where(run.step + 1, "before its update"))
            # the micro-batch's part of the global mean; DDP averages over the ranks, hence x world_size
            (loss * (batch["count"] * world_size / denominator)).backward()
        for key, value in terms.items():  # logged: means weighted as the loss is, n_skipped summed
            weight = 1 if key == "n_skipped" else batch["count"]
            value = float(value.detach()) if torch.is_tensor(value) else float(value)
            sums[key] = sums.get(key, 0.0) + (value * weight if weight else 0.0)
    run.optimizer.step()
    run.step += 1
    logged = torch.tensor(list(sums.values()), dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(logged)
    means = {key: value if key == "n_skipped" else value / denominator for key, value in zip(sums, logged.tolist())}
    return means, images, nonfinite


def start_run(args: Args, stage: str, rank: int, world_size: int):
    """The Run of `stage` in <out>/<stage>, from step 0 or resumed from last.pt (only with the recipe it was trained
    with: else the optimiser state would restore, say, the old --lr), its vocabulary, frozen reference, records."""
    out = Path(args.out) / stage
    resuming = run_folder.opens_resumed(out, stage, rank, args.resume, args.overwrite)
    train_records, val_records = load_split(args, "train"), load_split(args, "val")
    start = reference = None
    if stage != "xe":  # the policy and the frozen reference both start from the XE checkpoint
        start = load_checkpoint(args.init or Path(args.out) / "xe" / "best.pt")
        model, vocab = model_from_checkpoint(start, args.device)
        reference, _ = model_from_checkpoint(start, args.device)
        reference.eval().requires_grad_(False)
    else:
        vocab = Vocab.build([ref for r in train_records for ref in r["refs"]], args.restrict_vocab)
        width = load_scorer(args, args.encoder_model, args.encoder_pretrained).model.visual.transformer.width
        torch.manual_seed(args.seed)  # after loading the encoder, whose own initialisation draws numbers (not cached)
        model = Captioner(len(vocab.bpe_ids), vocab.bos, vocab.eos, width, args.d_model, args.encoder_layers,
                          args.decoder_layers, args.heads, args.ffn, args.dropout, args.max_len).to(args.device)
    steps, batch_size = (args.xe_steps, args.xe_batch_size) if stage == "xe" else (args.steps, args.batch_size)
    if batch_size < world_size:
        raise refuse(f"the batch size ({batch_size} images) is global and smaller than the {world_size} ranks")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.xe_lr if stage == "xe" else args.lr)
    saved_with = {"config": model.config, "vocab": vocab.bpe_ids, "encoder_tokens": ENCODER_TOKENS}
    run = Run(stage, out, steps, model, optimizer, recipe(args, stage, start), saved_with)
    if resuming:
        run_folder.resume(run, rank, load_checkpoint)  # the recipe checked, else refused naming the flags
    return run, vocab, reference, train_records, val_records


def train(args: Args, stage: str) -> dict:
    """Run `stage` ("xe", "dico" or "scst") into <out>/<stage>; returns the final validation metrics.

    Batch sizes are global: every rank draws the same batch and takes its share, in micro-batches of at most
    --micro-batch-size images (`update`). A run in <out>/<stage> is continued only with --resume and its recipe,
    replaced only with --overwrite; a diverged run (NaN or inf in the loss, the updated weights or every candidate)
    stops with NonFiniteError before it writes a checkpoint: last.pt and best.pt stay the last good ones.
    """
    require_pacs_weights(args)  # the first validation needs them: say so before any training
    rank, world_size, device = init_distributed(args.device)
    args = dataclasses.replace(args, device=device)
    run, vocab, reference, train_records, val_records = start_run(args, stage, rank, world_size)
    finetune, model = stage != "xe", run.model
    policy = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    train_bank, val_bank = image_bank_of(args, train_records), image_bank_of(args, val_records)
    # else every step "trains" on no image, and validation writes best.pt
    train_bank.require_readable(f"[{stage}] nothing to train on: none of the {len(train_records)} training images of "
                                f"{data_source(args, 'train')}")
    reward = evaluators(args)[args.reward] if finetune else None  # (bundle, w)
    # every reference of an image is an XE target: one is drawn per image and step (COCO has five)
    targets = [] if finetune else [[vocab.encode(ref, args.max_len) for ref in r["refs"]] for r in train_records]
    batch_size = args.batch_size if finetune else args.xe_batch_size
    if rank == 0 and run.step == 0:
        validate(run, vocab, args, val_bank, reward)  # the starting point is a candidate too (and the XE/DiCO baseline)
    started = time.time()
    while run.step < run.steps:
        torch.manual_seed(args.seed * 100003 + run.step * world_size + rank)  # dropout / sampling, resumable
        rng = np.random.default_rng([args.seed, run.step])  # the same draw on every rank: one global batch
        chosen = rng.choice(len(train_records), size=min(batch_size, len(train_records)), replace=False).tolist()
        picks = [int(rng.integers(len(targets[i]))) for i in chosen] if not finetune else [0] * len(chosen)
        share = np.array_split(np.arange(len(chosen)), world_size)[rank].tolist()  # this rank's part
        size = args.micro_batch_size if args.micro_batch_size > 0 else len(share)
        micro = [([chosen[j] for j in share[s:s + size]], [picks[j] for j in share[s:s + size]])
                 for s in range(0, len(share), size)]
        model.train(not finetune)  # fine-tuning runs without dropout: s(y) = 0 at the start (Deviation 1)
        # ALGO LOGIC: one step: each micro-batch's candidates and rewards (or XE targets), then the loss and update
        if finetune:
            batches = [finetune_batch(model, train_bank, vocab, reward, part[0], args, stage) for part in micro]
            terms_of = functools.partial(finetune_terms, policy, reference, algo=stage, args=args)
        else:
            for group in run.optimizer.param_groups:  # linear warm-up over the first xe_warmup of the steps
                group["lr"] = args.xe_lr * min(1.0, (run.step + 1) / xe_warmup_steps(args))
            batches = [xe_batch(train_bank, vocab, targets, *part, args.device) for part in micro]
            terms_of = functools.partial(xe_terms, policy)
        means, images, nonfinite = update(run, policy, batches, terms_of, world_size, args.beams)
        if rank == 0:
            write_log(run.out / "log.jsonl", {"step": run.step, **means, "images": images,
                                              **({"nonfinite_candidates": nonfinite} if finetune else {}),
                                              "lr": run.optimizer.param_groups[0]["lr"],
                                              "seconds": time.time() - started})
        # a finite loss does not make a finite update: every checkpoint written below holds weights checked here,
        # on every rank, so that they stop together
        assert_finite_state(model, means["loss"], run.where(run.step, "after its update"))
        if rank == 0:
            if run.step % (args.eval_every if finetune else args.xe_eval_every) == 0 or run.step == run.steps:
                validate(run, vocab, args, val_bank, reward)
            if run.step % args.save_every == 0 or run.step == run.steps:
                run_folder.save(run, run.out / "last.pt", args)
                run.saved = run.step
        if world_size > 1:
            dist.barrier()
    bad = {str(bank.records[i]["id"]) for bank in (train_bank, val_bank) for i in bank.bad}
    return run_folder.finish(run, "CIDEr" if stage == "xe" else "RefPAC-S", bad, rank, world_size, started)


def main(argv=None) -> dict:
    args = parse(argv)
    check_flags(args)
    args.device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))  # before any weights
    if args.stage == "xe":
        return train(args, "xe")
    if args.stage == "dico":
        return train(args, args.algo)
    # imported here: the miniature experiment and the evaluation stage's tables import this file, not the reverse
    from experiments.dico_miniature import run_eval_stage, run_miniature

    return run_miniature(args) if args.stage == "miniature" else run_eval_stage(args)


if __name__ == "__main__":
    run_command(main)  # expected errors: one line on stderr, exit status 1
