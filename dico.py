"""DiCO: Revisiting Image Captioning Training Paradigm via Direct CLIP-based Optimization.

Paper: https://arxiv.org/abs/2408.14547 (Moratelli, Caffagni, Cornia, Baraldi, Cucchiara, 2024);
official code: aimagelab/DiCO (trainers/dico_trainer.py; defaults from scripts/train_xe_coco.sh and
scripts/train_dico_coco.sh).

A captioner pre-trained with cross-entropy (XE) becomes the frozen reference pi_ref and the
initial policy pi_theta. For each image, beam search proposes k captions, a CLIP-based evaluator
(PAC-S or CLIP-S) scores them, the best is the winner and the others losers weighted by how much
worse they score; the policy is trained, as a weighted classification problem, to raise its
implied reward log pi_theta - log pi_ref on the winner over the losers (the optimum of a
KL-regularised reward maximisation, as in DPO, with a Bradley-Terry preference). There is no
sampling-based policy gradient, so the captioner does not collapse onto the evaluator's quirks as
self-critical sequence training (SCST) on the same reward does. SCST is implemented beside it as
the baseline the paper compares against.

Implements (the steps of the DiCO training algorithm, numbered here: the paper's own equation
numbers could not be checked offline, so each comment quotes the formula instead):
  1. XE pre-training: L_XE = -sum_t log p(y_t | y_<t, x)                           (`xe_loss`)
  2. k candidates per image by beam search from the policy, without gradients     (`beam_search`)
  3. reward r_i = w cos(E_img(x), E_txt(y_i)), w = 2.0 (PAC-S) or 2.5 (CLIP-S)     (`candidate_rewards`)
  4. winner w = argmax_i r_i, loser weights gamma_j = softmax_{j != w}(tau (r_w - r_j))
  5. s(y) = log pi_theta(y|x) - log pi_ref(y|x), teacher-forced sums over tokens
  6. L_DiCO = mean_x -log sigmoid(beta (s(y_w) - sum_j gamma_j s(y_j)))            (`dico_terms`;
     steps 4-6 are caption_kernels/dico.py's `dico_loss`)
  SCST (Rennie et al. 2017) with the mean-of-others baseline, the paper's comparison (`scst_terms`);
  evaluation: BLEU-4, CIDEr, CLIP-S, RefCLIP-S, PAC-S, RefPAC-S, collapse indicators (`evaluate`).

Deviations from the paper:
  1. The official code runs beam search with autograd enabled and never uses the graph; here beam
     search, greedy decoding (= beam size 1) and sampling run under torch.no_grad with cached keys
     and values (one new position per token, 12x faster on CPU than re-running the prefix), and the
     candidates' log-probs come from one teacher-forced pass (sum over tokens, EOS included).
  2. Evaluation uses the reference metrics (common/clip_score: "A photo depicts " prefix, clamp at
     0); the official DiCO evaluation drops both. The training reward follows the official code:
     no prefix, no clamp, no references (`--reward-prefix`, `--reward-clamp` change that).
  3. BLEU-4 and CIDEr are the COCO caption toolkit's (common/caption_metrics: pycocoevalcap's Java
     PTB tokenizer and scorers, as COCOEvalCap). Only where Java is missing do they deviate: a
     fallback tokenization (lowercase, punctuation stripped), labelled in every result ("tokenizer").
  4. The policy runs without dropout during fine-tuning (eval mode), so that s(y) = 0 at the start
     and the loss is exactly log 2; the paper does not say. Encoder and decoder are torch's pre-norm
     Transformer layers (dropout 0.1, learned positions); the official model (main.py) is a BERT
     encoder (post-norm, learned positions added to the projected CLIP tokens) and a GPT-2 decoder.
  5. As the official scripts: XE warms the learning rate up linearly for 5% of the steps, then keeps
     it constant (constant_with_warmup); steps, not epochs, set the budget (max_steps). Each step
     draws its images afresh (without replacement within the step; the same draw on every rank, each
     taking its share), where the official code streams shuffled webdataset shards.
  6. SCST's baseline is the mean reward of the *other* k-1 candidates (aimagelab/DiCO's trainer), the loss the
     token-averaged log-prob times the advantage; its candidates are the same k beams as DiCO's.
  7. Miniature world only (the `miniature` preset, PRESETS, wherever no data flag is given; a
     flag you give always wins, even at the paper's value): a much smaller
     captioner; the frozen image encoder is the world's CLIP scorer itself (the paper uses ViT-L/14
     for the captioner and ViT-B/32 for PAC-S), so captioner and evaluator share a visual tower;
     the softmax is restricted to the BPE tokens the training captions use (--restrict-vocab, about
     60 of 49408), else the LM head dominates CPU time; PAC-S is the w = 2.0 formula on the
     miniature scorer (PAC-S's fine-tuned checkpoint does not exist there), so PAC-S = 0.8 CLIP-S;
     the references are the world's five per image, of varying specificity as COCO's (see 8); XE
     runs without dropout (150 steps of 32 images see 4,800 of the 25,000 image-reference pairs:
     nothing to overfit, and dropout's sampling was a sixth of an XE step's CPU time); the learning
     rate of both fine-tuning algorithms is raised from 1e-6 to 1e-4 because the budget is 30 steps
     of 16 images instead of epochs of COCO (in an earlier world, at 1e-5 the DiCO loss had moved from 0.6931 to 0.6895
     after 14 steps: nothing to see; at 1e-3 DiCO lost 0.12 PAC-S on validation in 40 steps).
  8. XE draws one of an image's references per step; the paper does not say how its XE stage uses
     COCO's five. The miniature world has five too, each from an annotator with a level of detail of
     its own (common.miniature.reference_captions), so, as on COCO, the XE captioner learns their
     generic mean and the complete caption (`caption`, the "ground truth" row) says more than it:
     the headroom a CLIP reward can fill, the paper's reason for optimising one.
  9. Batch sizes are global (all ranks together, gradient accumulation over --micro-batch-size
     chunks), where the official scripts give them per device. XE: 512 = 64 per device x 8
     accumulation steps with the WORLD_SIZE=1 the script ships (1,024 if it ran on the 2 GPUs its
     comment names: unverified, its eval_steps 200 fits neither). DiCO: 16 = 8 per device on 2 GPUs,
     which its eval_steps 1770, "a quarter of epoch with 2 GPUs", implies (113,287 / 16 / 4 = 1770).
 10. Checkpoint selection as the official scripts: XE keeps the best validation CIDEr
     (metric_for_best_model cider), DiCO and SCST the best validation RefPAC-S (ref-PACScore).
     Validation runs on rank 0 while the other ranks wait (the official trainer shards it).
 11. The captioner reads the frozen ViT's last hidden states before ln_post, as the official code
     (Hugging Face CLIPVisionTransformer's last_hidden_state); the unreadable images of a job are
     logged, counted, skipped and reported at the end (--strict stops at the first); a job none of
     whose training images can be read stops before step 0.

Nothing silently wrong: <out>/<stage> holds one run. Running into it again is refused unless
--resume continues it (only with the settings stored in its last.pt: a flag that changes results
and differs is named) or --overwrite replaces it. A diverged run (a NaN or infinite loss, updated
weights, or every candidate of a batch) stops before it writes a checkpoint, so last.pt and best.pt
stay the last good ones. Flags out of range, bad data and such stops end in one line, exit status 1.

Smoke run first (every stage on a tiny world in under a minute, to check that everything runs):
    python dico.py --preset smoke --out runs/dico_smoke
Miniature run (CPU; XE, then DiCO and SCST from the same XE checkpoint, then eval). Its results and
timings, and why the paper's claims do not show in the miniature world, are in docs/dico.md:
    python dico.py                                  # = python dico.py miniature
    python dico.py miniature --seeds 3            # the table over seeds 0, 1, 2
Real run (COCO Karpathy splits, ViT-L/14 encoder, PAC-S ViT-B/32 evaluator by path, 8 GPUs; the
batch sizes are global, so any number of GPUs trains on the same batches):
    C="--coco-karpathy data/dataset_coco.json --coco-images data/coco --out runs/coco \
       --encoder-model ViT-L-14 --encoder-pretrained openai --pacs-checkpoint ckpt/clip_ViT-B-32.pth"
    torchrun --nproc_per_node 8 dico.py xe $C
    torchrun --nproc_per_node 8 dico.py dico $C --init runs/coco/xe/best.pt
    torchrun --nproc_per_node 8 dico.py dico $C --init runs/coco/xe/best.pt --algo scst
    python dico.py eval $C --checkpoints runs/coco/xe/best.pt runs/coco/dico/best.pt runs/coco/scst/best.pt
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import cli
from common.caption_metrics import coco_scores, plain_words, table_note
from common.clip_score import (CLIP_S_WEIGHT, PAC_S_WEIGHT, PREFIX, encode_images, encode_reference_groups,
                               encode_texts, harmonic_mean, load_clip, load_clip_as, ref_similarity,
                               score_from_features)
from common.clip_train import (MINIATURE_MODEL, SCORER_TRAINING, TrainConfig, assert_finite_state,
                               ensure_miniature_scorer, save_checkpoint)
from common.data import (BadSampleError, ManifestError, NonFiniteError, SkipCounter, atomic_write_text, check_device,
                         image_path, init_distributed, load_coco_karpathy, open_record_image, read_manifest,
                         run_command, shown, text_problem)
from common.miniature import WorldConfig, ensure_world, hallucinated_words, names_kept
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
        help=cli.preset_help(PRESETS) + " (here the miniature preset is the default wherever no data flag is given)")] = None
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


def refuse(message: str) -> SystemExit:
    """A setting the user fixes (a flag, a run already in --out): one line on stderr and exit status 1, no traceback,
    as common.data.run_command ends the expected errors it knows."""
    return SystemExit(f"error: {message}")


def flag(name: str) -> str:
    """The command-line flag of an Args field."""
    return "--" + name.replace("_", "-")


# Each numeric flag's range, checked at start-up: outside it a run went on without a word (a batch of 0 images; one
# beam, so no loser and every DiCO step skipped; a caption of only EOS; a negative tau weighting the best losers most).
AT_LEAST = dict(seed=0, seeds=1, xe_steps=1, xe_batch_size=1, xe_eval_every=1, steps=1, batch_size=1, micro_batch_size=0,
                beams=2, eval_beam=1, eval_every=1, save_every=1, val_images=0, eval_images=0, max_len=2, d_model=1,
                encoder_layers=1, decoder_layers=1, heads=1, ffn=1)
POSITIVE = ("lr", "xe_lr", "beta", "tau")


def check_flags(args: Args) -> None:
    """Every flag in its range, before anything is read or written; else one line naming the flag."""
    for name, low in AT_LEAST.items():
        if getattr(args, name) < low:
            raise refuse(f"{flag(name)} must be at least {low}, got {getattr(args, name)}")
    for name in POSITIVE:
        if not 0 < getattr(args, name) < math.inf:  # NaN fails both
            raise refuse(f"{flag(name)} must be a positive number, got {getattr(args, name)}")
    if not 0 <= args.xe_warmup <= 1:
        raise refuse(f"--xe-warmup must be in [0, 1], got {args.xe_warmup}")
    if not 0 <= args.dropout < 1:
        raise refuse(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.d_model % args.heads:
        raise refuse(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    if args.resume and args.overwrite:
        raise refuse("--resume continues the run in --out, --overwrite replaces it: pass one")


# ============================================================================================
# The captioner: frozen CLIP tokens -> Transformer encoder -> Transformer decoder over CLIP BPE
# ============================================================================================


@functools.cache
def clip_bpe() -> open_clip.tokenizer.SimpleTokenizer:
    """CLIP's BPE tokenizer (open_clip ships its files), built once per process."""
    return open_clip.tokenizer.SimpleTokenizer()


class Vocab:
    """The captioner's tokens: CLIP BPE ids it can emit, its own ids 0..n-1 for them, pad = n."""

    def __init__(self, bpe_ids: list[int]):
        self.tokenizer = clip_bpe()
        self.bpe_ids = list(bpe_ids)
        self.index = {bpe: own for own, bpe in enumerate(self.bpe_ids)}
        self.bos = self.index[self.tokenizer.sot_token_id]
        self.eos = self.index[self.tokenizer.eot_token_id]
        self.pad = len(self.bpe_ids)

    @classmethod
    def build(cls, captions: list[str], restrict: bool) -> "Vocab":
        tokenizer = clip_bpe()
        if not restrict:
            return cls(list(range(len(tokenizer.encoder))))
        used = {bpe for text in captions for bpe in tokenizer.encode(text)}
        return cls(sorted(used | {tokenizer.sot_token_id, tokenizer.eot_token_id}))

    def encode(self, text: str, max_len: int) -> list[int]:
        """Own ids of `text` + EOS, truncated to max_len tokens (EOS kept)."""
        try:
            ids = [self.index[bpe] for bpe in self.tokenizer.encode(text)]
        except KeyError as err:
            raise ValueError(f"caption {text!r} uses a BPE token outside the captioner's vocabulary ({err}); "
                             "build the vocabulary from these captions or drop --restrict-vocab") from err
        return ids[: max_len - 1] + [self.eos]

    def decode(self, ids) -> str:
        """Text of own ids up to the first EOS (padding and BOS never appear in generated captions)."""
        bpe = []
        for own in ids:
            if own == self.eos or own >= self.pad:
                break
            bpe.append(self.bpe_ids[own])
        text = self.tokenizer.decode(bpe).strip()
        return re.sub(r" ([,.])", r"\1", text)  # the BPE decoder spaces punctuation out


ENCODER_TOKENS = "last block, before ln_post"  # what the captioner reads; checkpoints record it


@torch.no_grad()
def clip_hidden_states(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen ViT's last hidden states, CLS and patches, before ln_post: (B, 1 + P, W).

    As the official code, which reads Hugging Face CLIPVisionTransformer's last_hidden_state (the
    last block's output; post_layernorm only touches the pooled CLS).
    """
    out = visual.forward_intermediates(pixels, indices=1, output_fmt="NLC", output_extra_tokens=True,
                                       intermediates_only=True)  # the last block, not normalised
    return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1).float()


class Captioner(nn.Module):
    """Linear(CLIP width -> d) -> Transformer encoder -> causal decoder with cross-attention."""

    def __init__(self, n_tokens: int, bos: int, eos: int, visual_width: int, d_model: int, encoder_layers: int,
                 decoder_layers: int, heads: int, ffn: int, dropout: float, max_len: int):
        super().__init__()
        self.config = dict(n_tokens=n_tokens, bos=bos, eos=eos, visual_width=visual_width, d_model=d_model,
                           encoder_layers=encoder_layers, decoder_layers=decoder_layers, heads=heads, ffn=ffn,
                           dropout=dropout, max_len=max_len)
        self.bos, self.eos, self.pad, self.max_len = bos, eos, n_tokens, max_len
        self.visual_proj = nn.Linear(visual_width, d_model)
        layer = dict(d_model=d_model, nhead=heads, dim_feedforward=ffn, dropout=dropout, batch_first=True,
                     norm_first=True)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), encoder_layers,
                                             enable_nested_tensor=False)
        self.token_emb = nn.Embedding(n_tokens + 1, d_model, padding_idx=self.pad)
        self.pos_emb = nn.Embedding(max_len + 1, d_model)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), decoder_layers)
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, n_tokens + 1)
        never = torch.zeros(n_tokens + 1, dtype=torch.bool)
        never[[self.pad, bos]] = True  # the vocabulary includes pad, but pad and BOS are never a next token
        self.register_buffer("never_emitted", never, persistent=False)

    def encode(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.visual_proj(visual_tokens))  # (B, P, D)

    def decode(self, memory: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Next-token logits (N, t, V + 1) for inputs (N, t) that start with BOS."""
        t = inputs.shape[1]
        x = self.token_emb(inputs) + self.pos_emb(torch.arange(t, device=inputs.device))  # (N, t, D)
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=inputs.device)
        x = self.norm(self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True))
        return self.lm_head(x).masked_fill(self.never_emitted, float("-inf"))  # (N, t, V + 1)

    def forward(self, visual_tokens: torch.Tensor, inputs: torch.Tensor, beams: int = 1) -> torch.Tensor:
        """Teacher-forced logits; `beams` sequences per image (rows ordered image-major)."""
        memory = self.encode(visual_tokens).repeat_interleave(beams, dim=0)  # (B beams, P, D)
        return self.decode(memory, inputs)

    # Incremental decoding for generation: `decode` recomputes every earlier position at each new
    # token (O(T^2) work per caption); `step` computes the new position only, from cached keys and
    # values. Same layers, same weights, same logits (tests compare the two).

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.config["heads"], -1)).transpose(1, 2)  # (N, t, D) -> (N, H, t, D/H)

    def start_cache(self, memory: torch.Tensor) -> list[dict]:
        """Per decoder layer: the cross-attention keys/values of the memory, no self-attention past yet."""
        cache = []
        for layer in self.decoder.layers:
            attn, d = layer.multihead_attn, memory.shape[-1]
            k, v = F.linear(memory, attn.in_proj_weight[d:], attn.in_proj_bias[d:]).chunk(2, dim=-1)
            empty = memory.new_zeros(memory.shape[0], self.config["heads"], 0, d // self.config["heads"])
            cache.append({"memory_k": self._heads(k), "memory_v": self._heads(v), "k": empty, "v": empty})
        return cache

    def step(self, cache: list[dict], token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (N, V + 1) of the token after `token` (N,) at `position`; appends to `cache` in place."""
        x = self.token_emb(token)[:, None] + self.pos_emb.weight[position]  # (N, 1, D)
        for layer, kv in zip(self.decoder.layers, cache):  # each a pre-norm TransformerDecoderLayer
            attn = layer.self_attn
            q, k, v = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            kv["k"], kv["v"] = torch.cat([kv["k"], self._heads(k)], 2), torch.cat([kv["v"], self._heads(v)], 2)
            mixed = F.scaled_dot_product_attention(self._heads(q), kv["k"], kv["v"])  # causal: only the past is cached
            x = x + attn.out_proj(mixed.transpose(1, 2).flatten(2))
            cross, d = layer.multihead_attn, x.shape[-1]
            q = F.linear(layer.norm2(x), cross.in_proj_weight[:d], cross.in_proj_bias[:d])
            mixed = F.scaled_dot_product_attention(self._heads(q), kv["memory_k"], kv["memory_v"])
            x = x + cross.out_proj(mixed.transpose(1, 2).flatten(2))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        return self.lm_head(self.norm(x[:, 0])).masked_fill(self.never_emitted, float("-inf"))

    @staticmethod
    def reorder_cache(cache: list[dict], rows: torch.Tensor) -> None:
        """Keep the self-attention past of `rows` (beam search moved the hypotheses)."""
        for kv in cache:
            kv["k"], kv["v"] = kv["k"][rows], kv["v"][rows]


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


@torch.no_grad()
def sample(model: Captioner, visual_tokens: torch.Tensor, n: int, max_len: int, temperature: float = 1.0):
    """n sampled captions per image: tokens (B, n, T), scores (B, n) = sum of log-probs at temperature 1."""
    memory = model.encode(visual_tokens).repeat_interleave(n, dim=0)  # (B n, P, D)
    cache = model.start_cache(memory)
    N, device = memory.shape[0], memory.device
    tokens = torch.full((N, 1), model.bos, dtype=torch.long, device=device)
    scores = torch.zeros(N, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    for t in range(max_len):
        logits = model.step(cache, tokens[:, -1], t).float()  # (N, V)
        token = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)[:, 0]  # (N,)
        token = torch.where(finished, model.pad, token)
        scores += torch.where(finished, 0.0, F.log_softmax(logits, dim=-1).gather(1, token[:, None])[:, 0])
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        finished |= token == model.eos
        if finished.all():
            break
    B = visual_tokens.shape[0]
    return tokens[:, 1:].view(B, n, -1), scores.view(B, n)


def distinct_and_finite(tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: the candidate has a finite score and repeats no earlier candidate of its image."""
    same = (tokens[:, :, None, :] == tokens[:, None, :, :]).all(dim=-1)  # (B, K, K)
    earlier = torch.ones_like(same[0]).tril(diagonal=-1)  # (K, K): j < i
    return torch.isfinite(scores) & ~(same & earlier).any(dim=-1)


# ============================================================================================
# The losses: XE, DiCO, SCST (each returns a dict of named terms)
# ============================================================================================


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
# Data, models, scoring
# ============================================================================================


def is_miniature(args: Args) -> bool:
    return not (args.coco_karpathy or args.train_manifest or args.val_manifest or args.test_manifest)


def parse(argv: Optional[list[str]] = None) -> Args:
    """The command line's Args: the miniature preset wherever the data is the miniature world (common/cli.py)."""
    return cli.parse(Args, argv, PRESETS, lambda args: "miniature" if is_miniature(args) else "paper")


def data_source(args: Args, split: str) -> str:
    """Where `split`'s records are read from, as messages name it."""
    if args.coco_karpathy:
        if not args.coco_images:
            raise refuse("--coco-karpathy needs --coco-images (the folder holding train2014/ and val2014/)")
        return f"{args.coco_karpathy} (images under {args.coco_images})"
    if is_miniature(args):
        return str(ensure_world(args.world) / f"{split}.jsonl")
    path = {"train": args.train_manifest, "val": args.val_manifest, "test": args.test_manifest}[split]
    if path is None:
        raise refuse(f"no {split} data: pass --{split}-manifest (or --coco-karpathy)")
    return path


def load_split(args: Args, split: str) -> list[dict]:
    """Records with `refs` (a list of references) for train, val or test; a caption or refs of another type is an
    error naming the file and sample (a string `refs` would be read letter by letter as references)."""
    source = data_source(args, split)
    if args.coco_karpathy:
        records = load_coco_karpathy(args.coco_karpathy, args.coco_images, splits=[split])
    else:
        records = read_manifest(source, required=("id", "image", "caption"), texts=("caption",))
    for record in records:
        refs = record.setdefault("refs", [record["caption"]])
        problem = text_problem(refs, "refs", lists=True) or (
            None if isinstance(refs, list) else f"field 'refs' must be a list of strings, got {shown(refs)}") or (
            None if isinstance(record["image"], str) else f"field 'image' must be a path, got {shown(record['image'])}")
        if problem:
            raise ManifestError(f"{source} (id {record['id']!r}): {problem}")
    return records


_BUNDLES: dict = {}


def load_scorer(args: Args, model: str, pretrained: Optional[str], pacs_checkpoint: Optional[str] = None,
                flags: str = "encoder"):
    """An open_clip bundle, loaded once per process; 'miniature' = the scorer of args.world. A load error names the
    flag to change: --{flags}-model or --{flags}-pretrained (flags: encoder, clip-s, pacs)."""
    key = (model, pretrained, pacs_checkpoint, (args.world, args.scorer) if model == "miniature" else None)
    if key not in _BUNDLES:
        if model == "miniature":
            path = ensure_miniature_scorer(args.world, args.scorer)
            _BUNDLES[key] = load_clip(MINIATURE_MODEL, str(path), args.device)
        else:
            names = {"model": f"--{flags}-model", "pretrained": f"--{flags}-pretrained"}
            _BUNDLES[key] = load_clip_as(names, model, pretrained, args.device, pacs_checkpoint=pacs_checkpoint)
    return _BUNDLES[key]


def require_pacs_weights(args: Args) -> None:
    """PAC-S's fine-tuned weights, checked when a run starts rather than at its first validation."""
    own_file = args.pacs_pretrained is not None and Path(args.pacs_pretrained).is_file()
    if args.pacs_model != "miniature" and args.pacs_checkpoint is None and not own_file:
        raise refuse("PAC-S needs its fine-tuned weights: pass --pacs-checkpoint /path/to/clip_ViT-B-32.pth")


def evaluators(args: Args) -> dict:
    """{"clip_s": (bundle, w), "pac_s": (bundle, w)}."""
    require_pacs_weights(args)
    return {"clip_s": (load_scorer(args, args.clip_s_model, args.clip_s_pretrained, flags="clip-s"), CLIP_S_WEIGHT),
            "pac_s": (load_scorer(args, args.pacs_model, args.pacs_pretrained, args.pacs_checkpoint, "pacs"),
                      PAC_S_WEIGHT)}


class ImageBank:
    """Per split: frozen-encoder tokens for the captioner and evaluator image features, by index.

    An image that cannot be read is logged, counted in `skipped` (its index in `bad`) and left out
    wherever it is drawn, so the job goes on; with --strict it stops the run (BadSampleError).
    """

    def __init__(self, args: Args, records: list[dict]):
        self.args, self.records, self.device = args, records, args.device
        self.encoder = load_scorer(args, args.encoder_model, args.encoder_pretrained)
        self.skipped, self.bad = SkipCounter(), set()
        self.scorer_features: dict = {}
        self.reference_cache: dict = {}
        self.tokens = None
        if args.cache_features:
            tokens, kept = self._encode(range(len(records)))
            self.tokens = tokens.new_zeros(len(records), *tokens.shape[1:])  # (N, 1 + P, W), bad rows never read
            self.tokens[kept] = tokens

    def open_images(self, indices) -> tuple[list[int], list]:
        """The readable ones of `indices` and their PIL images (each unreadable image counted once)."""
        kept, images = [], []
        for i in indices:
            image = None if i in self.bad else open_record_image(self.records[i], self.skipped, self.args.strict)
            if image is None:
                self.bad.add(i)
            else:
                kept.append(i)
                images.append(image)
        return kept, images

    def any_readable(self) -> bool:
        """Whether one of the images can be read (tried in order up to the first that can: one file, normally)."""
        return any(self.open_images([i])[0] for i in range(len(self.records)) if i not in self.bad)

    def placeholder(self) -> torch.Tensor:
        """One all-zero row of tokens (1, 1 + P, W): a rank with no readable image still steps alike."""
        return torch.zeros(1, *self.encoder.model.visual.positional_embedding.shape, device=self.device)

    def _encode(self, indices) -> tuple[torch.Tensor, list[int]]:
        indices, kept, chunks = list(indices), [], []
        for start in range(0, len(indices), 256):
            ok, images = self.open_images(indices[start:start + 256])
            if ok:
                pixels = torch.stack([self.encoder.preprocess(image) for image in images])
                chunks.append(clip_hidden_states(self.encoder.model.visual, pixels.to(self.device)))
                kept += ok
        return (torch.cat(chunks) if chunks else self.placeholder()[:0]), kept  # (n, 1 + P, W)

    def visual_tokens(self, indices) -> tuple[torch.Tensor, list[int]]:
        """Frozen-encoder tokens (n, 1 + P, W) of the readable images among `indices`, and their indices."""
        if self.tokens is not None:
            kept = [i for i in indices if i not in self.bad]
            return self.tokens[torch.as_tensor(kept, dtype=torch.long)].to(self.device), kept
        return self._encode(indices)

    def image_features(self, bundle, indices) -> np.ndarray:
        """Normalised evaluator image features (n, E) of readable images, computed once per image and evaluator."""
        cache = self.scorer_features.setdefault(id(bundle), {})
        missing = [i for i in indices if i not in cache]
        if missing:
            kept, images = self.open_images(missing)
            if len(kept) < len(missing):
                lost = [self.records[i]["id"] for i in missing if i not in kept]
                raise BadSampleError(f"samples {lost[:5]}: images unreadable after they were read once")
            for i, feature in zip(kept, encode_images(bundle, images, progress=False)):
                cache[i] = feature
        return np.stack([cache[i] for i in indices])

    def reference_features(self, bundle, indices) -> list[np.ndarray]:
        """Normalised evaluator features (R_i, E) of each record's references, encoded once per record and evaluator
        (every validation and every evaluated model scores against the same five references an image)."""
        cache = self.reference_cache.setdefault(id(bundle), {})
        missing = [i for i in indices if i not in cache]
        if missing:
            cache.update(zip(missing, encode_reference_groups(bundle, [self.records[i]["refs"] for i in missing],
                                                              progress=False)))
        return [cache[i] for i in indices]


_BANKS: dict = {}


def image_bank(args: Args, records: list[dict]) -> ImageBank:
    """The ImageBank of `records`, built once per process and encoder: the stages of a miniature run (and its
    seeds) share the frozen encoder's tokens instead of encoding the 5,500 images again in every stage."""
    encoder = load_scorer(args, args.encoder_model, args.encoder_pretrained)
    key = (id(encoder), args.device, args.strict, args.cache_features,
           tuple((str(r["id"]), str(image_path(r))) for r in records))
    if key not in _BANKS or _BANKS[key].encoder is not encoder:  # an id can be reused once its bundle is gone
        _BANKS[key] = ImageBank(args, records)
    return _BANKS[key]


def candidate_rewards(bundle, w: float, img_feats: np.ndarray, texts: list[str], k: int, prefix: str,
                      clamp: bool) -> torch.Tensor:
    """(B, k) rewards of k captions per image."""
    txt = encode_texts(bundle, texts, prefix=prefix, progress=False).reshape(len(img_feats), k, -1)  # (B, k, E)
    # step 3: r_i = w * cos(E_img(x), E_txt(y_i)); the official training reward has no clamp
    cos = np.einsum("be,bke->bk", img_feats, txt)
    return torch.from_numpy(w * (np.clip(cos, 0, None) if clamp else cos)).float()


# ============================================================================================
# Evaluation
# ============================================================================================


def collapse_indicators(captions: list[str], n: int = 3, per_item: dict | None = None) -> dict:
    """Vocabulary used, fraction of distinct captions, repeated n-grams per caption, mean length; `per_item`
    receives each caption's repeated n-grams."""
    words = [plain_words(c) for c in captions]  # lower-cased, punctuation removed
    repeated = []
    for w in words:
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        repeated.append(len(grams) - len(set(grams)))  # occurrences beyond the first of each n-gram
    if per_item is not None:
        per_item[f"rep_{n}gram"] = [float(r) for r in repeated]
    return {"vocab": len({t for w in words for t in w}), "distinct": len(set(captions)) / max(1, len(captions)),
            f"rep_{n}gram": float(np.mean(repeated)), "length": float(np.mean([len(w) for w in words]))}


def caption_metrics(args: Args, bank: ImageBank, indices: list[int], captions: list[str],
                    per_item: dict | None = None) -> dict:
    """BLEU-4, CIDEr (fractions, as COCOEvalCap; their "tokenizer" label beside them), the CLIP-based scores,
    collapse indicators and (miniature) names/hallucinations. `per_item` receives each caption's CIDEr, CLIP-based
    scores and repeated 3-grams, and the captions themselves (what a one-seed verdict resamples)."""
    records = [bank.records[i] for i in indices]
    items: dict = {} if per_item is None else per_item
    metrics = coco_scores({i: rec["refs"] for i, rec in enumerate(records)}, dict(enumerate(captions)), scale=1.0,
                          metrics=("BLEU-4", "CIDEr"), per_item=items)
    features = {}  # per evaluator model: in the miniature CLIP-S and PAC-S are one model with two weights w
    for name, (bundle, w) in evaluators(args).items():
        if id(bundle) not in features:
            features[id(bundle)] = (bank.image_features(bundle, indices),
                                    encode_texts(bundle, captions, prefix=PREFIX, progress=False),
                                    bank.reference_features(bundle, indices))
        img, cand, refs = features[id(bundle)]
        score = score_from_features(img, cand, w)  # w * max(cos, 0)
        label = {"clip_s": "CLIP-S", "pac_s": "PAC-S"}[name]
        ref_score = harmonic_mean(score, ref_similarity(cand, refs))
        metrics[label], metrics[f"Ref{label}"] = float(score.mean()), float(ref_score.mean())
        items[label], items[f"Ref{label}"] = np.asarray(score, float).tolist(), np.asarray(ref_score, float).tolist()
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
# Checkpoints and distributed training
# ============================================================================================


def load_checkpoint(path) -> dict:
    """A dico.py checkpoint, or a clear error when the file is missing, corrupted, something else or holds NaN
    weights (a diverged run's, which would be captioned and scored as a model)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (run the xe stage first, or pass --init)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as err:
        raise refuse(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); it is corrupted or truncated: "
                     "delete it and rerun (or resume from another)") from err
    if not isinstance(payload, dict) or not {"model", "config", "vocab", "step"} <= set(payload):
        raise refuse(f"{path} is not a dico.py checkpoint (needs model, config, vocab and step)")
    if payload.get("encoder_tokens") != ENCODER_TOKENS:  # older checkpoints read the tokens after ln_post
        raise refuse(f"{path} was trained on the encoder's tokens after ln_post (dico.py now reads them before it, "
                     "as the official code); retrain it with the xe stage")
    bad = [name for name, tensor in payload["model"].items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if bad:
        raise NonFiniteError(f"{path}: {len(bad)} of {len(payload['model'])} weight tensors hold NaN or inf "
                             f"({', '.join(bad[:3])}): a diverged run's weights, not a model")
    return payload


def weights_digest(payload: dict) -> str:
    """A hash of a checkpoint's captioner (weights, configuration, vocabulary): equal hashes caption alike."""
    digest = hashlib.sha256(json.dumps([payload["config"], payload["vocab"]]).encode())
    for name, tensor in sorted(payload["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_from_checkpoint(payload: dict, device: str) -> tuple[Captioner, Vocab]:
    model = Captioner(**payload["config"]).to(device)
    model.load_state_dict(payload["model"])
    return model, Vocab(payload["vocab"])


def write_log(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """The log of a run resumed at `step`: its rows up to that step, so that each step it runs again appears once
    (a last row that the stop cut short goes too)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line)["step"] <= step:
                rows.append(line + "\n")
    atomic_write_text(path, "".join(rows))


RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "metrics.json")  # what a stage writes into <out>/<stage>


def start_afresh(out: Path, args: Args, stage: str, rank: int) -> None:
    """<out>/<stage> cleared for a run from step 0. A run there is replaced only when asked (--overwrite, or
    --resume of a run that stopped before its first last.pt), else refused: a rerun would replace its best.pt."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not (args.overwrite or args.resume):
        raise refuse(f"{out} already holds a run ({', '.join(found)}): pass --resume to continue it, --overwrite to "
                     "replace it, or another --out")
    if found and rank == 0:
        print(f"[{stage}] replacing the run in {out} ({', '.join(found)}): starting at step 0")
        for name in found:
            (out / name).unlink()


# What a stage's results depend on, besides the data and models of every stage: a resumed run must match its
# checkpoint on each of these flags (`recipe`). The others may change on resume: --steps (extending a run is what
# --resume is for), --device, --micro-batch-size (memory only), --save-every, --kernel, --strict.
RECIPE_FLAGS = {
    "all": ("seed", "coco_karpathy", "coco_images", "train_manifest", "val_manifest", "world", "scorer", "encoder_model",
            "encoder_pretrained", "clip_s_model", "clip_s_pretrained", "pacs_model", "pacs_pretrained",
            "pacs_checkpoint", "max_len", "eval_beam", "val_images"),
    "xe": ("d_model", "encoder_layers", "decoder_layers", "heads", "ffn", "dropout", "restrict_vocab", "xe_batch_size",
           "xe_lr", "xe_eval_every"),
    "finetune": ("batch_size", "lr", "beams", "candidates", "beta", "tau", "reward", "reward_prefix", "reward_clamp",
                 "eval_every"),
}


def xe_warmup_steps(args: Args) -> float:
    """How many XE steps the learning rate warms up over (at least one)."""
    return max(1.0, args.xe_warmup * args.xe_steps)


def recipe(args: Args, stage: str, start: Optional[dict]) -> dict:
    """{flag: value} of what `stage`'s results depend on; a fine-tuning's start (policy and reference) by its
    weights' hash, so that an XE run that went on since is another start, even at the same --init path."""
    values = {}
    for name in RECIPE_FLAGS["all"] + RECIPE_FLAGS["xe" if stage == "xe" else "finetune"]:
        value = getattr(args, name)
        if dataclasses.is_dataclass(value):  # --world.n-train, --scorer.steps, ...
            values.update({f"{flag(name)}.{key.replace('_', '-')}": v for key, v in dataclasses.asdict(value).items()})
        else:
            values[flag(name)] = value
    if stage == "xe":  # more --xe-steps continue the same run only while the warm-up keeps its length
        values["--xe-warmup x --xe-steps"] = xe_warmup_steps(args)
    else:
        values["--init"] = f"sha256:{weights_digest(start)[:16]}"
    return json.loads(json.dumps(values))  # as the checkpoint holds it


def check_recipe(path: Path, saved: Optional[dict], wanted: dict) -> None:
    """Refuse to resume the checkpoint at `path` with other settings, naming the flags that differ."""
    if saved is None:
        raise refuse(f"{path} holds no recipe (an older dico.py wrote it), so its settings cannot be checked: start a "
                     "new run with another --out, or with --overwrite instead of --resume")
    differ = sorted(name for name in saved.keys() | wanted.keys() if saved.get(name) != wanted.get(name))
    if differ:
        was, now = (" ".join(f"{name} {values.get(name)}" for name in differ) for values in (saved, wanted))
        raise refuse(f"{path} was trained with {was}, not {now}: resume with its flags, or start a new run with "
                     "another --out (or --overwrite instead of --resume)")


# ============================================================================================
# Training: XE pre-training and DiCO / SCST fine-tuning share one loop
# ============================================================================================


def train(args: Args, stage: str) -> dict:
    """Run `stage` ("xe", "dico" or "scst") into <out>/<stage>; returns the final validation metrics.

    Batch sizes are global: every rank draws the same batch and takes its share, in micro-batches of
    at most --micro-batch-size images whose gradients accumulate; each micro-batch's loss is weighted
    by its share of the batch's denominator (tokens for XE, usable images for DiCO, usable candidates
    for SCST), so any number of ranks and micro-batches takes the step one process would.

    A run in <out>/<stage> is continued only with --resume and the settings it was trained with (`recipe`), and
    replaced only with --overwrite. A diverged run (NaN or inf in the loss, the updated weights or every candidate)
    stops with NonFiniteError before it writes a checkpoint: last.pt and best.pt stay the last good ones.
    """
    require_pacs_weights(args)  # the first validation needs them: say so before any training
    rank, world_size, device = init_distributed(args.device)
    args = dataclasses.replace(args, device=device)
    out = Path(args.out) / stage
    resuming = args.resume and (out / "last.pt").exists()
    if not resuming:
        start_afresh(out, args, stage, rank)
    out.mkdir(parents=True, exist_ok=True)
    train_records, val_records = load_split(args, "train"), load_split(args, "val")
    finetune = stage != "xe"
    select = "RefPAC-S" if finetune else "CIDEr"  # official: metric_for_best_model ref-PACScore (DiCO), cider (XE)
    start = None
    if finetune:  # the policy and the frozen reference both start from the XE checkpoint
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
    steps, batch_size = (args.steps, args.batch_size) if finetune else (args.xe_steps, args.xe_batch_size)
    if batch_size < world_size:
        raise refuse(f"the batch size ({batch_size} images) is global and smaller than the {world_size} ranks")
    peak_lr = args.lr if finetune else args.xe_lr
    optimizer = torch.optim.Adam(model.parameters(), lr=peak_lr)
    settings = recipe(args, stage, start)
    step, best, saved = 0, -math.inf, None  # saved: the step last.pt holds
    if resuming:
        state = load_checkpoint(out / "last.pt")
        check_recipe(out / "last.pt", state.get("recipe"), settings)  # else the optimiser state restores the old lr
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best"]
        saved = step
        if rank == 0:
            truncate_log(out / "log.jsonl", step)
        print(f"[{stage}] resuming from step {step} ({out / 'last.pt'})")
    policy = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    train_bank, val_bank = image_bank(args, train_records), image_bank(args, val_records)
    if not train_bank.any_readable():  # else every step "trains" on no image, and validation writes best.pt
        first = train_bank.skipped.examples[0][1] if train_bank.skipped.examples else "the split is empty"
        raise BadSampleError(f"[{stage}] nothing to train on: none of the {len(train_records)} training images of "
                             f"{data_source(args, 'train')} can be read, all skipped (first: {first})")
    reward_bundle, reward_w = evaluators(args)[args.reward] if finetune else (None, None)
    # every reference of an image is an XE target: one is drawn per image and step (COCO has five)
    targets_all = [[vocab.encode(ref, args.max_len) for ref in r["refs"]] for r in train_records] if not finetune else []

    def checkpoint(path, metrics=None):
        save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                               "best": best, "config": model.config, "vocab": vocab.bpe_ids, "stage": stage,
                               "encoder_tokens": ENCODER_TOKENS, "recipe": settings,
                               "metrics": metrics or {}, "args": json.loads(json.dumps(dataclasses.asdict(args)))})

    def where(n: int, when: str) -> str:  # a diverged run's message: the step, and what last.pt still holds
        kept = f"{out / 'last.pt'} keeps step {saved}" if saved is not None else "no last.pt written by this run"
        return f"[{stage}] step {n} of {steps}, {when} ({kept})"

    labels = {}  # how the validation's BLEU/CIDEr were tokenized ("tokenizer", "backend"), for metrics.json

    def validate():
        nonlocal best
        metrics, captions, kept = evaluate(args, model, vocab, val_bank, args.val_images)
        if finetune:  # the reward the policy maximises, on the captions the judge scores: the two curves of the plot
            img = val_bank.image_features(reward_bundle, kept)
            metrics["reward"] = float(candidate_rewards(reward_bundle, reward_w, img, captions, 1, args.reward_prefix,
                                                        args.reward_clamp).mean())
        if metrics[select] > best:
            best = metrics[select]
            checkpoint(out / "best.pt", metrics)
        write_log(out / "log.jsonl", {"step": step, "val": metrics})
        labels.update({k: v for k, v in metrics.items() if isinstance(v, str)})
        print(f"[{stage}] step {step} val " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in labels))
        return metrics

    def prepare(indices: list[int], picks: list[int]) -> dict:
        """One micro-batch before any gradient: its readable images, what its loss needs, its denominator."""
        visual, kept = train_bank.visual_tokens(indices)  # (b, 1 + P, W)
        if not kept:  # no readable image: one zero row that counts for nothing, so every rank steps alike
            visual = train_bank.placeholder()
        if not finetune:
            pick = dict(zip(indices, picks))
            rows = [targets_all[i][pick[i]] for i in kept] or [[]]
            tokens = torch.full((len(rows), max(1, max(map(len, rows)))), vocab.pad, dtype=torch.long)
            for i, row in enumerate(rows):
                tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            inputs, targets, mask = teacher_forcing(tokens.to(args.device), vocab.bos, vocab.pad)
            return {"visual": visual, "inputs": inputs, "targets": targets, "mask": mask, "images": len(kept),
                    "count": int(mask.sum()), "nonfinite": 0}
        k = args.beams
        if args.candidates == "beam":
            tokens, scores = beam_search(model, visual, k, args.max_len)  # step 2: (b, k, T), no autograd
        else:
            tokens, scores = sample(model, visual, k, args.max_len)
        valid = distinct_and_finite(tokens, scores) & bool(kept)  # (b, k)
        nonfinite = int((~torch.isfinite(scores)).sum()) if kept else 0  # NaN: a diverged policy (-inf: no such beam)
        if kept:
            texts = [vocab.decode(row.tolist()) for row in tokens.flatten(0, 1)]
            img = train_bank.image_features(reward_bundle, kept)
            rewards = candidate_rewards(reward_bundle, reward_w, img, texts, k, args.reward_prefix,
                                        args.reward_clamp).to(args.device)  # (b, k)
        else:
            rewards = torch.zeros(valid.shape, device=args.device)
        inputs, targets, mask = teacher_forcing(tokens.flatten(0, 1), vocab.bos, vocab.pad, valid.flatten())
        usable = valid.sum(dim=1, keepdim=True) >= 2  # (b, 1): a winner and a loser; the losses average over these
        count = int(usable.sum()) if stage == "dico" else int((valid & usable).sum())
        return {"visual": visual, "inputs": inputs, "targets": targets, "mask": mask, "valid": valid,
                "rewards": rewards, "images": len(kept), "count": count, "nonfinite": nonfinite}

    def loss_terms(batch: dict) -> dict:
        if not finetune:
            return xe_loss(policy(batch["visual"], batch["inputs"]), batch["targets"], batch["mask"])
        k, mask = args.beams, batch["mask"]
        # log pi(y|x) = sum_t log p(y_t | y_<t, x), EOS included, padding masked, not length-normalised
        policy_logps = sequence_logprobs(policy(batch["visual"], batch["inputs"], beams=k), batch["targets"], mask,
                                         impl=args.kernel)
        with torch.no_grad():  # step 5: log pi_ref(y|x), teacher-forced sums over tokens
            ref_logps = sequence_logprobs(reference(batch["visual"], batch["inputs"], beams=k), batch["targets"],
                                          mask, impl=args.kernel)
        if stage == "dico":
            # steps 4-6 (caption_kernels/dico.py): w = argmax_i r_i, gamma_j = softmax_{j != w}(tau (r_w - r_j)),
            # s = log pi_theta - log pi_ref, L = mean_x -log sigmoid(beta (s(y_w) - sum_j gamma_j s(y_j)))
            return dico_terms(policy_logps.view(-1, k), ref_logps.view(-1, k), batch["rewards"], batch["valid"],
                              args.beta, args.tau, args.kernel)
        return scst_terms(policy_logps.view(-1, k), mask.sum(1).view(-1, k), batch["rewards"], batch["valid"])

    if rank == 0 and step == 0:
        validate()  # the starting point is a candidate too (and the XE/DiCO baseline)
    started = time.time()
    while step < steps:
        torch.manual_seed(args.seed * 100003 + step * world_size + rank)  # dropout / sampling, resumable
        rng = np.random.default_rng([args.seed, step])  # the same draw on every rank: one global batch
        chosen = rng.choice(len(train_records), size=min(batch_size, len(train_records)), replace=False).tolist()
        picks = [int(rng.integers(len(targets_all[i]))) for i in chosen] if not finetune else [0] * len(chosen)
        share = np.array_split(np.arange(len(chosen)), world_size)[rank].tolist()  # this rank's part
        size = args.micro_batch_size if args.micro_batch_size > 0 else len(share)
        model.train(not finetune)  # fine-tuning runs without dropout: s(y) = 0 at the start (Deviation 4)
        if not finetune:
            for group in optimizer.param_groups:  # linear warm-up over the first xe_warmup of the steps
                group["lr"] = peak_lr * min(1.0, (step + 1) / xe_warmup_steps(args))
        batches = [prepare([chosen[j] for j in share[s:s + size]], [picks[j] for j in share[s:s + size]])
                   for s in range(0, len(share), size)]
        totals = torch.tensor([sum(b[key] for b in batches) for key in ("count", "images", "nonfinite")],
                              dtype=torch.float64)
        if world_size > 1:
            dist.all_reduce(totals)
        denominator, images, nonfinite = max(1.0, totals[0].item()), int(totals[1].item()), int(totals[2].item())
        if finetune and images and nonfinite == images * args.beams:  # on every rank: they stop together
            raise NonFiniteError(f"{where(step + 1, 'before its update')}: all {nonfinite} candidates of the batch's "
                                 f"{images} images have a NaN or infinite log-prob (the policy diverged)")
        optimizer.zero_grad(set_to_none=True)
        sums: dict = {}
        for j, batch in enumerate(batches):
            accumulate = world_size > 1 and j < len(batches) - 1  # DDP all-reduces on the last backward only
            with policy.no_sync() if accumulate else contextlib.nullcontext():
                terms = loss_terms(batch)
                loss = terms["loss"]
                assert_finite_state(None, loss.detach(), where(step + 1, "before its update"))
                # the micro-batch's part of the global mean; DDP averages over the ranks, hence x world_size
                (loss * (batch["count"] * world_size / denominator)).backward()
            for key, value in terms.items():  # logged: means weighted as the loss is, n_skipped summed
                weight = 1 if key == "n_skipped" else batch["count"]
                value = float(value.detach()) if torch.is_tensor(value) else float(value)
                sums[key] = sums.get(key, 0.0) + (value * weight if weight else 0.0)
        optimizer.step()
        step += 1
        logged = torch.tensor(list(sums.values()), dtype=torch.float64)
        if world_size > 1:
            dist.all_reduce(logged)
        means = {key: value if key == "n_skipped" else value / denominator for key, value in zip(sums, logged.tolist())}
        if rank == 0:
            row = {"step": step, **means, "images": images, **({"nonfinite_candidates": nonfinite} if finetune else {}),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - started}
            write_log(out / "log.jsonl", row)
        # a finite loss does not make a finite update: every checkpoint written below holds weights checked here,
        # on every rank, so that they stop together
        assert_finite_state(model, means["loss"], where(step, "after its update"))
        if rank == 0:
            if step % (args.eval_every if finetune else args.xe_eval_every) == 0 or step == steps:
                validate()
            if step % args.save_every == 0 or step == steps:
                checkpoint(out / "last.pt")
                saved = step
        if world_size > 1:
            dist.barrier()
    bad = {str(bank.records[i]["id"]) for bank in (train_bank, val_bank) for i in bank.bad}
    if world_size > 1:  # each rank met its own unreadable images
        gathered = [None] * world_size
        dist.all_gather_object(gathered, bad)
        bad = set().union(*gathered)
    if rank != 0:
        return {}
    if bad:
        print(f"[{stage}] {len(bad)} unreadable images skipped, e.g. {sorted(bad)[:5]} (--strict stops at the first)")
    report = {f"best_val_{select}": best, "unreadable_images": len(bad), "unreadable_ids": sorted(bad)[:20], **labels}
    atomic_write_text(out / "metrics.json", json.dumps({"step": step, **report,
                                                        "seconds": time.time() - started}, indent=1))
    return {**report, "last": str(out / "last.pt"), "best": str(out / "best.pt")}


# ============================================================================================
# Evaluation stage, the miniature experiment, main
# ============================================================================================

COLUMNS = ("CIDEr", "BLEU-4", "CLIP-S", "RefCLIP-S", "PAC-S", "RefPAC-S", "vocab", "distinct", "rep_3gram", "length",
           "names_kept", "hallucinated")


def markdown_table(rows: dict[str, list[dict]]) -> str:
    """Mean (and +- std over seeds when there are several) of each metric, one row per model; below, the
    COCO metrics' tokenizer."""
    columns = [c for c in COLUMNS if any(c in runs[0] for runs in rows.values())]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, runs in rows.items():
        cells = []
        for column in columns:
            values = np.array([run[column] for run in runs])
            cell = f"{values.mean():.3f}" if values.mean() < 10 else f"{values.mean():.1f}"
            cells.append(cell + (f" ± {values.std():.3f}" if len(values) > 1 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    note = table_note(run for runs in rows.values() for run in runs)  # how BLEU-4 and CIDEr were tokenized
    return "\n".join(lines + ([f"\n{note}."] if note else [])) + "\n"


def run_eval(args: Args, checkpoints: list[str], out: Path) -> dict:
    """Caption `args.split` with each checkpoint; metrics JSON, captions manifest, Markdown table."""
    records = load_split(args, args.split)
    bank = image_bank(args, records)
    models, kept, done = {}, [], {}
    for path in checkpoints:
        payload = load_checkpoint(path)
        name = f"{Path(path).parent.name}/{Path(path).stem}"
        digest = weights_digest(payload)  # a fine-tuning's best.pt may be its last.pt, or the XE model (step 0)
        if digest not in done:
            model, vocab = model_from_checkpoint(payload, args.device)
            items: dict = {}
            metrics, captions, kept = evaluate(args, model, vocab, bank, args.eval_images, items)
            done[digest] = {**metrics, "per_item": items}, captions, kept
        metrics, captions, kept = done[digest]
        models[name] = dict(metrics)
        lines = [json.dumps({"id": records[i]["id"], "image": str(image_path(records[i])), "caption": c,
                             "refs": records[i]["refs"]}) for i, c in zip(kept, captions)]  # stages chain through files
        atomic_write_text(out / f"captions-{name.replace('/', '-')}.jsonl", "\n".join(lines) + "\n")
    gt = caption_metrics(args, bank, kept, [records[i]["caption"] for i in kept])  # the same images
    results = {"ground truth": {**gt, "images": len(kept)}, **models}
    for metrics in results.values():
        metrics["unreadable_images"] = bank.skipped.count
    if bank.skipped.count:
        print(f"[eval] {bank.skipped.count} unreadable images skipped, e.g. {bank.skipped.examples[:3]}")
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=1))
    atomic_write_text(out / "table.md", markdown_table({name: [m] for name, m in results.items()}))
    print(markdown_table({name: [m] for name, m in results.items()}))
    return results


CURVES = {"reward": "the reward it optimises", "CLIP-S": "the judge's CLIP-S"}  # validation metrics over fine-tuning


def training_curves(runs: list[Path], algo: str) -> dict:
    """Validation steps of `algo` and, per metric of CURVES, its values (seeds, points) from each run's log."""
    per_run = []
    for run in runs:
        rows = map(json.loads, (run / algo / "log.jsonl").read_text().splitlines())
        per_run.append({row["step"]: row["val"] for row in rows if "val" in row})  # a step logged twice: the last
    steps = sorted(per_run[0])
    return {"steps": steps, **{metric: np.array([[val[step][metric] for step in steps] for val in per_run])
                               for metric in CURVES}}


def plot_training(curves: dict[str, dict], reward: str, path: Path) -> None:
    """Reward and judge on the validation captions over fine-tuning, one line per algorithm (mean over seeds,
    bars: std): a reward that rises while the judge falls is over-optimisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CURVES), figsize=(4.5 * len(CURVES), 3.6), squeeze=False)
    for axis, (metric, title) in zip(axes[0], CURVES.items()):
        for algo, curve in curves.items():
            axis.errorbar(curve["steps"], curve[metric].mean(0), yerr=curve[metric].std(0), marker="o", capsize=3,
                          label=algo)
        axis.set(xlabel="fine-tuning step", title=title + (f" ({reward})" if metric == "reward" else ""))
    axes[0][0].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def clocks() -> tuple[float, float]:
    """Wall and CPU seconds now (CPU: all of the process's threads, the measure that holds on shared cores)."""
    return time.time(), time.process_time()


def run_miniature(args: Args) -> dict:
    """XE, then DiCO and SCST from the same XE checkpoint with the same budget, then eval; per seed."""
    started, per_seed, stage_seconds = time.time(), {}, {}
    for seed in range(args.seed, args.seed + args.seeds):
        # a miniature run is an experiment to repeat: it replaces its own earlier runs (unless asked to --resume)
        seed_args = dataclasses.replace(args, seed=seed, out=str(Path(args.out) / f"seed{seed}"),
                                        overwrite=not args.resume)
        marks = [("start", clocks())]
        train(seed_args, "xe")
        marks.append(("xe", clocks()))
        xe_best = str(Path(seed_args.out) / "xe" / "best.pt")
        for algo in ("dico", "scst"):
            train(dataclasses.replace(seed_args, algo=algo, init=xe_best), algo)
            marks.append((algo, clocks()))
        runs = [Path(seed_args.out) / algo / name for algo in ("dico", "scst") for name in ("last.pt", "best.pt")]
        checkpoints = [xe_best] + [str(path) for path in runs]
        per_seed[seed] = run_eval(seed_args, checkpoints, Path(seed_args.out) / "eval")
        marks.append(("eval", clocks()))
        stage_seconds[seed] = {stage: {"wall": now[0] - before[0], "cpu": now[1] - before[1]}
                               for (_, before), (stage, now) in zip(marks, marks[1:])}
    rows = {name: [per_seed[s][name] for s in per_seed] for name in per_seed[args.seed]}
    table = markdown_table(rows)
    plot = Path(args.out) / "training.png"
    plot_training({algo: training_curves([Path(args.out) / f"seed{s}" for s in per_seed], algo)
                   for algo in ("dico", "scst")}, args.reward, plot)
    minutes = (time.time() - started) / 60
    stages = {stage: {clock: sum(run[stage][clock] for run in stage_seconds.values()) for clock in ("wall", "cpu")}
              for stage in stage_seconds[args.seed]}
    header = (f"Miniature world (a controlled experiment, not evidence about COCO), seeds {list(per_seed)}, "
              f"test images {args.eval_images}, {minutes:.1f} min (" +
              ", ".join(f"{stage} {t['wall']:.0f} s, CPU {t['cpu']:.0f} s" for stage, t in stages.items()) +
              "). PAC-S here = 2.0 x the miniature scorer's cosine (no PAC-S checkpoint exists there). "
              f"Reward and judge over fine-tuning: {plot.name}.\n\n")
    atomic_write_text(Path(args.out) / "results.md", header + table)
    atomic_write_text(Path(args.out) / "results.json", json.dumps({"per_seed": per_seed, "minutes": minutes,
                                                                   "stage_seconds": stage_seconds, "plot": str(plot)},
                                                                  indent=1))
    print(header + table)
    return {"per_seed": per_seed, "table": table, "minutes": minutes, "stage_seconds": stage_seconds, "plot": str(plot)}


def main(argv=None) -> dict:
    args = parse(argv)
    check_flags(args)
    args.device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))  # before any weights
    if args.stage == "miniature":
        return run_miniature(args)
    if args.stage == "xe":
        return train(args, "xe")
    if args.stage == "dico":
        return train(args, args.algo)
    checkpoints = args.checkpoints or [str(p) for a in ("xe", "dico", "scst")
                                       if (p := Path(args.out) / a / "best.pt").exists()]
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoints to evaluate: pass --checkpoints or train into {args.out} first")
    return run_eval(args, checkpoints, Path(args.out) / "eval")


if __name__ == "__main__":
    run_command(main)  # expected errors: one line on stderr, exit status 1
