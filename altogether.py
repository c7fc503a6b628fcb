"""Altogether: Image Captioning via Re-aligning Alt-text (Xu et al., 2024).

Paper: https://arxiv.org/abs/2410.17251 (official code: facebookresearch/MetaCLIP, apps/altogether).

A frozen CLIP embeds the image, a mapping network makes visual tokens V of it, and a causal LM continues [V][alt-text]
with a caption that keeps the alt-text's concrete concepts, drops what the image lacks and adds what it shows.

Implements (each a stage, the first argument):
  1. v = normalize(E_img(x)) (frozen); V = Mapper(v): Linear to M x d, M learned prefix tokens appended, a
     Transformer, its last M outputs                                                            (`MappingNetwork`)
  2. [V][alt prompt, <= 128 tokens][caption + EOS]; L = -1/|C| sum_{t in C} log p(y_t | y_<t) over the caption
     tokens C only                                          (`prefix_inputs`, `sequence_labels`, `caption_loss`)
  3. `pretrain`: target = the longest alt-text, prompt = another; `finetune`: target = the re-aligned caption
     (`--target-field`), prompt = the alt-texts; in both the prompt is dropped with p = 0.5       (`training_pair`)
  4. `caption`: prompt = "; ".join(unique alt-texts), sampling T = 0.2, top-p 0.7, rank-sharded, resumable
  5. `eval`: CLIP-S, CIDEr / BLEU-4, names kept and hallucinated words; `miniature` (default): all of it.

Deviations from the paper (docs/altogether.md has each one's reasons and measurements):
  1. The prompt block is padded to the batch's longest prompt (<= 128 tokens), not to 128: the same logits.
  2. Two official-code bugs are not copied (with no padding its masks are all zero; its pads are attended): pads
     are masked and go in front, [pads][V][prompt], so the slot that predicts a row's first caption token is a real
     token whatever the other rows' prompts; positions count attended tokens, generate() gets the same ones.
  3. A prompt keeps its first 128 tokens (as the official code); a long caption is cut with its EOS; no BOS token.
  4. Steps and batch size are ours; the frozen encoder's embeddings are computed once (as ClipCap does); each
     rank's loss is its own token mean; fp32 decoder weights under bf16 autocast on GPU (no precision stated).
  5. The mapper's Transformer: pre-norm, 8 heads, FFN 2 x d, no dropout (ClipCap's); the paper: 8 layers, M = 40.
  6. Miniature world (`--preset miniature`): the encoder is the world's CLIP scorer, also the judge; a 2-layer OPT
     with a word-level tokenizer; stage 1 draws 2 more alt-texts per image; the true caption plays the re-aligned.
  7. Miniature budget: 500 + 2000 steps of batch 32 at lr 1e-3, sized for reproduce.py.

Commands (manifests with `image`, `alt_text` (a string or a list), stage 2 also `round3`; a quick check first):
  python altogether.py --preset smoke --out runs/altogether_smoke
  python altogether.py miniature --seeds 3 --out runs/altogether_miniature
  torchrun --nproc-per-node 8 altogether.py pretrain --data alt_pairs.jsonl --out runs/ag
  torchrun --nproc-per-node 8 altogether.py finetune --data altogether_ft.jsonl --out runs/ag \
      --checkpoint runs/ag/pretrain.pt --target-field round3
  torchrun --nproc-per-node 8 altogether.py caption --checkpoint runs/ag/finetune.pt \
      --data metaclip_shard.jsonl --out metaclip_shard.altogether.jsonl
  python altogether.py eval --data metaclip_shard.altogether.jsonl --out runs/ag/eval.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm.auto import tqdm

from common.caption_eval import encoder_weights, load_frozen_encoder, load_scorer, score_fields
from common.caption_job import caption_manifest, check_caption_job, checkpoint_encoder
from common.causal_lm import captioner_payload, load_captioner, new_decoder
from common.cli import check_ranges, parse, preset_help
from common.clip_train import SCORER_TRAINING, TrainConfig, assert_finite_state, cosine_lr
from common.data import atomic_write_text, check_device, init_distributed, read_manifest, run_command
from common.embedding_cache import embedding_rows, embedding_signature, image_embeddings
from common.miniature import WorldConfig
from common.record_texts import records_digest, training_rows, unique_texts, vocabulary_texts
from common.training import check_batch_split, guard_where, resume_state, save_finite, step_batch

log = logging.getLogger("altogether")

IGNORE = -100  # label of every position that is not a caption token
PROMPT_SEPARATOR = "; "  # official inference joins the unique alt-texts of an image with it
STAGES = {"pretrain": 1, "finetune": 2}
CHECKPOINT = "a pretrain.pt or finetune.pt"  # what --checkpoint names, for the error when it names no file

# Presets (common/cli.py): Args holds the paper's values; `miniature` (the miniature stage's default) sizes the run
# for 2 CPU cores, `smoke` runs every stage in seconds to check that it works. A flag you give always wins.
MINIATURE = dict(clip_model="miniature", decoder="tiny-opt", prefix_length=10, mapper_layers=2, max_caption_tokens=40,
                 pretrain_steps=500, finetune_steps=2000, batch_size=32, lr=1e-3, warmup=50, max_new_tokens=40,
                 gen_batch_size=250, score_model="miniature")
PRESETS = {"smoke": {**MINIATURE, "prefix_length": 4, "mapper_layers": 1, "max_caption_tokens": 24,
                     "pretrain_steps": 3, "finetune_steps": 3, "batch_size": 8, "warmup": 1, "max_new_tokens": 8,
                     "world.n_train": 48, "world.n_val": 4, "world.n_test": 12, "scorer.steps": 5,
                     "scorer.batch_size": 16, "scorer.warmup": 1},
           "miniature": MINIATURE, "paper": {}}


@dataclasses.dataclass
class Args:
    """Altogether's stages over manifests (pretrain, finetune, caption, eval), or all of them in miniature."""

    stage: tyro.conf.Positional[Literal["miniature", "pretrain", "finetune", "caption", "eval"]] = "miniature"
    """what to run"""
    preset: Annotated[Literal["smoke", "miniature", "paper"] | None, tyro.conf.arg(help=preset_help(PRESETS))] = None
    data: str | None = None
    """input manifest (JSONL, see common/data.py)"""
    out: str = "runs/altogether"
    """folder of pretrain/finetune/miniature; the manifest written by caption; the JSON of eval"""
    checkpoint: str | None = None
    """captioner to start finetune from, or to caption with (a pretrain.pt / finetune.pt)"""
    # ---- the captioner
    clip_model: str = "ViT-H-14-quickgelu"
    """frozen image encoder, an open_clip architecture (paper: MetaCLIP 1.0 ViT-H/14)"""
    clip_pretrained: str | None = "metaclip_fullcc"
    """open_clip tag or local checkpoint file of the encoder"""
    decoder: str = "facebook/opt-1.3b"
    """causal LM by hub name or local folder (paper: OPT-1.3B); 'tiny-opt' = a small OPT from a config"""
    trust_remote_code: bool = False
    """let transformers run code shipped with the decoder (only for models you trust)"""
    prefix_length: int = 40
    """M, visual tokens the mapping network makes (paper: 40)"""
    mapper_layers: int = 8
    """Transformer layers of the mapping network (paper: 8)"""
    # ---- data
    alt_field: str = "alt_text"
    """field holding the alt-text (a string or a list of alt-texts of the image)"""
    target_field: str = "caption"
    """stage 2 target, e.g. the last annotation round ('round3' in the paper's data)"""
    max_prompt_tokens: int = 128
    """alt-text prompt budget; longer prompts keep their first tokens (paper: 128)"""
    max_caption_tokens: int = 192
    """caption tokens (EOS included) trained on (ours; the paper generates up to 192)"""
    p_drop_alt: float = 0.5
    """probability that a training draw has no alt-text prompt (paper: 0.5)"""
    strict: bool = False
    """stop at the first unreadable image instead of logging and counting it"""
    # ---- optimisation (paper: AdamW, betas (0.9, 0.98), eps 1e-6, cosine)
    pretrain_steps: int = 20000
    """stage 1 optimiser steps (ours: not in the paper)"""
    finetune_steps: int = 2000
    """stage 2 optimiser steps (ours: not in the paper)"""
    batch_size: int = 512
    """global batch over all ranks (ours: not in the paper)"""
    lr: float = 2e-4
    """peak learning rate (paper)"""
    warmup: int = 200
    """linear warm-up steps before the cosine decay (paper)"""
    weight_decay: float = 0.2
    """on weight matrices only, none on biases and norms (paper)"""
    checkpoint_every: int = 1000
    """save <out>/<stage>.pt every this many steps (and at the end)"""
    resume: bool = True
    """continue from <out>/<stage>.pt when it holds an unfinished run of the same recipe"""
    # ---- caption
    caption_field: str = "altogether"
    """field the caption stage writes"""
    use_alt: bool = True
    """caption with the alt-text prompt (False: the 'w/o alt' model, image only)"""
    decoding: Literal["sample", "greedy", "beam"] = "sample"
    """sampling (paper), greedy, or beam search"""
    temperature: float = 0.2
    """sampling temperature (paper)"""
    top_p: float = 0.7
    """nucleus sampling mass (paper)"""
    num_beams: int = 3
    """beams of --decoding beam (ours)"""
    max_new_tokens: int = 192
    """generated tokens per caption (paper)"""
    gen_batch_size: int = 64
    """images per generate() call"""
    # ---- eval
    score_model: str = "ViT-B-32"
    """CLIP-S model, open_clip architecture or 'miniature' (CLIP-S reference: OpenAI ViT-B/32)"""
    score_pretrained: str | None = "openai"
    """open_clip tag or file of the CLIP-S model"""
    eval_fields: tuple[str, ...] = ("alt_text", "altogether")
    """text fields of --data the eval stage scores"""
    refs_field: str = "refs"
    """list field of references for CIDEr / BLEU (falls back to `caption` when absent)"""
    # ---- run
    seed: int = 0
    """seed of initialisation, data order, prompt drops and sampling"""
    seeds: int = 1
    """miniature: trainings with seeds seed .. seed + seeds - 1; the table shows mean ± std"""
    world: WorldConfig = WorldConfig()
    """miniature: the world's knobs"""
    scorer: TrainConfig = SCORER_TRAINING
    """miniature: training of the world's CLIP scorer (encoder and judge; trained once per world and recipe, cached)"""
    extra_alt_texts: int = 2
    """miniature: alt-texts drawn from the world's generator per training image for stage 1"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device (under torchrun each rank takes cuda:LOCAL_RANK)"""


# ==== ALGO LOGIC: the paper's pieces (mapping network, sequence layout, loss, training pairs) ====


class MappingNetwork(nn.Module):
    """ClipCap's transformer mapper: pooled image embedding (B, E) -> M visual tokens (B, M, d)."""

    def __init__(self, clip_dim: int, lm_dim: int, prefix_length: int, layers: int, heads: int = 8):
        super().__init__()
        self.prefix_length = prefix_length
        self.project = nn.Linear(clip_dim, prefix_length * lm_dim)
        self.prefix = nn.Parameter(torch.randn(prefix_length, lm_dim))
        layer = nn.TransformerEncoderLayer(lm_dim, heads, dim_feedforward=2 * lm_dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, img_emb: torch.Tensor) -> torch.Tensor:
        b = img_emb.shape[0]
        projected = self.project(img_emb).view(b, self.prefix_length, -1)  # (B, M, d)
        # step 1: V = Transformer([Linear(v); P])[M:], P the M learned prefix tokens
        return self.transformer(torch.cat([projected, self.prefix.expand(b, -1, -1)], dim=1))[:, self.prefix_length:]


class Captioner(nn.Module):
    """Mapping network + causal LM decoder; the frozen CLIP stays outside (it only gives embeddings)."""

    def __init__(self, decoder: nn.Module, clip_dim: int, prefix_length: int, mapper_layers: int):
        super().__init__()
        self.decoder = decoder
        self.sizes = {"clip_dim": clip_dim, "prefix_length": prefix_length, "mapper_layers": mapper_layers}  # saved
        lm_dim = decoder.get_input_embeddings().embedding_dim
        self.mapper = MappingNetwork(clip_dim, lm_dim, prefix_length, mapper_layers, heads=8 if lm_dim % 8 == 0 else 4)

    def prefix_inputs(self, img_emb, prompt_ids, prompt_mask):
        """Embeddings (B, M + P, d) and attention mask (B, M + P) of [pad][V][prompt], the prefix left-padded whole:
        each row's last prefix slot, which predicts the first caption token, is a real token (Deviation 2)."""
        prompt = self.decoder.get_input_embeddings()(prompt_ids)  # (B, P, d)
        visual = self.mapper(img_emb.to(self.mapper.project.weight.dtype)).to(prompt.dtype)  # (B, M, d)
        embeds = torch.cat([visual, prompt], dim=1)
        mask = torch.cat([torch.ones(visual.shape[:2], dtype=torch.long, device=visual.device), prompt_mask], dim=1)
        # [V][pads][prompt] -> [pads][V][prompt]: a stable sort on the mask puts the pads first, the rest in order
        order = mask.argsort(dim=1, stable=True)
        return embeds.gather(1, order.unsqueeze(-1).expand_as(embeds)), mask.gather(1, order)

    def forward(self, img_emb, prompt_ids, prompt_mask, caption_ids, caption_mask) -> torch.Tensor:
        """Teacher-forced logits (B, M + P + C, V) of [pad][V][prompt][caption]."""
        embeds, mask = self.prefix_inputs(img_emb, prompt_ids, prompt_mask)
        embeds = torch.cat([embeds, self.decoder.get_input_embeddings()(caption_ids)], dim=1)
        mask = torch.cat([mask, caption_mask.long()], dim=1)  # (B, T)
        return self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask)).logits

    def generate(self, img_emb, prompt_ids, prompt_mask, **options):
        """The decoder's generate() continuing [pad][V][prompt], at the positions that training gives it."""
        embeds, mask = self.prefix_inputs(img_emb, prompt_ids, prompt_mask)
        return self.decoder.generate(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask),
                                     **options)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that count attended tokens only: the left pads shift nothing (they sit at 0, masked)."""
    # pos_t = sum_{s <= t} mask_s - 1; passed to generate() too, which extends it by one per new token
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(tokenizer, prompts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (B, P), each prompt cut to its first `max_tokens` tokens."""
    rows = [tokenizer(prompt, add_special_tokens=False)["input_ids"][:max_tokens] for prompt in prompts]
    width = max(len(row) for row in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    return ids.view(len(rows), width), mask.view(len(rows), width)


def encode_captions(tokenizer, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded caption + EOS ids and a bool mask (B, C) of the real tokens, cut to `max_tokens`."""
    rows = [(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_tokens]
            for text in captions]
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows], dtype=torch.long)
    mask = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in rows])
    return ids, mask


def sequence_labels(n_visual: int, prompt_mask: torch.Tensor, caption_ids: torch.Tensor,
                    caption_mask: torch.Tensor) -> torch.Tensor:
    """Labels (B, M + P + C) aligned with the sequence: the caption token ids, IGNORE elsewhere. The mask decides,
    not the token id: a pad id that equals EOS (GPT-2) still trains the EOS."""
    b, p = prompt_mask.shape
    labels = torch.full((b, n_visual + p), IGNORE, dtype=torch.long, device=caption_ids.device)
    return torch.cat([labels, caption_ids.masked_fill(~caption_mask, IGNORE)], dim=1)


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Cross-entropy on the caption tokens only: {"loss", "tokens"}."""
    # step 2: L = -1/|C| sum_{t in C} log p(y_t | y_<t, prompt, V): the logits at t - 1 predict token t
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
    return {"loss": loss, "tokens": (targets != IGNORE).sum()}


def training_pair(record: dict, stage: str, args: Args, rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, target) of one draw; the prompt is dropped with probability p_drop_alt."""
    alts = unique_texts(record, args.alt_field)
    if stage == "pretrain":
        # step 3, stage 1: target = the longest alt-text, prompt = another alt-text of the same image
        target = max(alts, key=len)
        others = [text for text in alts if text != target]
        prompt = others[int(rng.integers(len(others)))] if others else ""
    else:
        # stage 2: target = the re-aligned caption, prompt = the image's alt-texts
        target, prompt = record[args.target_field], PROMPT_SEPARATOR.join(alts)
    return ("" if rng.random() < args.p_drop_alt else prompt), target


def inference_prompt(record: dict, field: str) -> str:
    """Caption-time prompt: the unique alt-texts of the image joined by '; '."""
    return PROMPT_SEPARATOR.join(unique_texts(record, field))


def make_optimizer(captioner: Captioner, args: Args) -> torch.optim.Optimizer:
    """AdamW, betas (0.9, 0.98), eps 1e-6, weight decay on matrices only (paper)."""
    params = [p for p in captioner.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.98), eps=1e-6)


def decoding_options(args: Args) -> dict:
    """generate()'s options: sampling (paper), greedy or beam search."""
    if args.decoding == "sample":
        return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    return {"do_sample": False, "num_beams": args.num_beams if args.decoding == "beam" else 1}


@torch.no_grad()
def generate_captions(captioner: Captioner, tokenizer, img_emb: torch.Tensor, prompts: list[str],
                      args: Args) -> list[str]:
    """Captions continuing [pad][V][prompt] for a batch of images, decoded without special tokens."""
    device = next(captioner.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, args.max_prompt_tokens)
    new_tokens = captioner.generate(img_emb.to(device), prompt_ids.to(device), prompt_mask.to(device),
                                    max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id,
                                    **decoding_options(args))  # step 4; (B, new): with inputs_embeds only new tokens
    return [" ".join(text.split()) for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# ==== The harness: the captioner built, trained (DDP, resumable) and saved; captioning at scale; evaluation ====


def encoder_source(args: Args) -> str | None:
    """The encoder's weights: an open_clip tag or a file (the miniature's cached scorer)."""
    return encoder_weights(args.clip_model, args.clip_pretrained, args.world, args.scorer)


def new_captioner(args: Args, clip_dim: int, texts: list[str]) -> tuple[Captioner, object]:
    """(captioner, tokenizer): the decoder by name/path, or 'tiny-opt' with a tokenizer from `texts`."""
    torch.manual_seed(args.seed)
    decoder, tokenizer = new_decoder(args.decoder, texts, args.trust_remote_code)
    return Captioner(decoder, clip_dim, args.prefix_length, args.mapper_layers), tokenizer


def rebuilt_captioner(decoder, payload: dict) -> Captioner:
    """The captioner of a checkpoint's sizes around its rebuilt decoder (common.causal_lm.captioner_from_payload)."""
    return Captioner(decoder, **{name: payload[name] for name in ("clip_dim", "prefix_length", "mapper_layers")})


def recipe_of(args: Args, stage: str, records: list[dict]) -> dict:
    """What a checkpoint must agree on to be resumed: every setting that changes the trained weights (the steps set
    the cosine schedule), the captioner it started from, and what a step reads of each record."""
    names = ("decoder", "clip_model", "prefix_length", "mapper_layers", "batch_size", "lr", "warmup", "weight_decay",
             "p_drop_alt", "seed", "alt_field", "target_field", "max_prompt_tokens", "max_caption_tokens",
             f"{stage}_steps", "checkpoint")
    return {**{name: getattr(args, name) for name in names}, "clip_pretrained": encoder_source(args),
            "data": records_digest(records, ("image", args.alt_field, args.target_field))}


def train_stage(args: Args, stage: str, captioner: Captioner, tokenizer, encoder, records: list[dict], img_emb,
                emb_rows: np.ndarray | None = None) -> dict:
    """Stage 1 or 2 on `records`, record i's embedding img_emb[emb_rows[i]] (emb_rows None: row i); <out>/<stage>.pt."""
    rank, world_size, device = init_distributed(args.device)
    steps = args.pretrain_steps if stage == "pretrain" else args.finetune_steps
    captioner.to(device).train()
    optimizer = make_optimizer(captioner, args)
    path, recipe = Path(args.out) / f"{stage}.pt", recipe_of(args, stage, records)
    start, history = resume_state(path, args.resume, recipe, captioner, optimizer, device, "captioner", log=log)
    model = nn.parallel.DistributedDataParallel(captioner) if world_size > 1 else captioner
    schedule = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup)
    local = args.batch_size // world_size
    saved = start or None  # the step the checkpoint on disk holds, for the guard's message
    for step in tqdm(range(start, steps), desc=stage, disable=rank != 0):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, schedule)
        # the global batch and its prompt drops are pure functions of (seed, step): resuming and any number
        # of ranks see the batches of one uninterrupted process
        indices = step_batch(step, len(records), args.batch_size, args.seed, drop_last=True)
        rng = np.random.default_rng([args.seed, STAGES[stage], step])
        pairs = [training_pair(records[i], stage, args, rng) for i in indices][rank * local:(rank + 1) * local]
        indices = indices[rank * local:(rank + 1) * local]
        batch_emb = embedding_rows(img_emb, indices if emb_rows is None else emb_rows[indices])  # (b, E)
        prompts, targets = zip(*pairs)
        prompt_ids, prompt_mask = encode_prompts(tokenizer, list(prompts), args.max_prompt_tokens)
        caption_ids, caption_mask = encode_captions(tokenizer, list(targets), args.max_caption_tokens)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(batch_emb.to(device), prompt_ids.to(device), prompt_mask.to(device),
                           caption_ids.to(device), caption_mask.to(device))  # (b, M + P + C, V)
        labels = sequence_labels(captioner.mapper.prefix_length, prompt_mask, caption_ids, caption_mask)
        loss = caption_loss(logits, labels.to(device))["loss"]
        assert_finite_state(None, loss.detach(), guard_where(stage, step, steps, "before its update", path, saved))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == steps:
            where = guard_where(stage, step, steps, "after its update", path, saved)
            # everything the caption stage needs, as plain types (loadable with weights_only=True)
            save_finite(path, captioner, loss.detach(), where, rank, lambda: captioner_payload(
                captioner, tokenizer, **captioner.sizes, clip_model=encoder.name, recipe=recipe, step=step + 1,
                clip_pretrained=encoder_source(args), history=history, optimizer=optimizer.state_dict()))
            saved = step + 1
    captioner.eval()
    return {"history": history, "resumed_from": start, "checkpoint": str(path)}


def stage_train(args: Args, stage: str) -> dict:
    """pretrain / finetune on --data: images embedded once (common.embedding_cache) in --out; <out>/<stage>.pt."""
    records = read_manifest(args.data)
    rank, world_size, device = init_distributed(args.device)  # each rank's encoder on its own GPU
    encoder = load_frozen_encoder(args.clip_model, args.clip_pretrained, device, args.world, args.scorer)
    signature = embedding_signature(records, encoder, encoder_source(args), args.data)
    img_emb, readable = image_embeddings(encoder, records, args.out, stage, signature, args.strict, rank, world_size)
    targets = args.target_field if stage == "finetune" else None  # stage 1's targets are the alt-texts
    keep = training_rows(records, readable, args.alt_field, targets, args.strict)
    kept = [records[i] for i in keep]
    if args.checkpoint is not None:
        _, captioner, tokenizer = load_captioner(args.checkpoint, rebuilt_captioner, "--checkpoint", CHECKPOINT)
    else:  # a new decoder's vocabulary (tiny-opt) also holds the captions stage 2 will train on
        texts = vocabulary_texts(kept, args.alt_field, args.target_field)
        captioner, tokenizer = new_captioner(args, img_emb.shape[1], texts)
    # the kept records and their rows of the memmap: no (N, E) copy of the kept embeddings
    return train_stage(args, stage, captioner, tokenizer, encoder, kept, img_emb, np.array(keep))


def caption_recipe(args: Args) -> dict:
    """What decides the caption stage's output, with only the chosen decoding's own knobs (no --top-p for greedy)."""
    knobs = {"sample": ("temperature", "top_p", "seed"), "beam": ("num_beams",), "greedy": ()}[args.decoding]
    names = ("data", "checkpoint", "caption_field", "alt_field", "use_alt", "max_prompt_tokens", "max_new_tokens",
             "decoding", *knobs)
    return {name: getattr(args, name) for name in names}


def stage_caption(args: Args) -> dict:
    """Caption --data (a manifest or shards) with --checkpoint into --out, rank-sharded, resumable (caption_job)."""
    rank, world_size, device = init_distributed(args.device)
    check_caption_job(args.data, args.out, caption_recipe(args), args.alt_field if args.use_alt else None, rank,
                      world_size)
    payload, captioner, tokenizer = load_captioner(args.checkpoint, rebuilt_captioner, "--checkpoint", CHECKPOINT)
    captioner.to(device).eval()
    encoder = checkpoint_encoder(payload, args.checkpoint, device, args.world, args.scorer)  # the one training used
    torch.manual_seed(args.seed + rank)

    def caption_batch(records: list[dict], img_emb: torch.Tensor) -> list[str]:
        prompts = [inference_prompt(r, args.alt_field) if args.use_alt else "" for r in records]
        return generate_captions(captioner, tokenizer, img_emb, prompts, args)

    return caption_manifest(args.data, args.out, encoder, caption_batch, args.caption_field, args.gen_batch_size,
                            args.strict, rank, world_size)


def stage_eval(args: Args) -> dict:
    """Score each of --eval-fields of --data (common.caption_eval.score_fields); writes --out as JSON."""
    records = read_manifest(args.data)
    scorer = load_scorer(args.score_model, args.score_pretrained, args.device, args.world, args.scorer)
    # step 5: CLIP-S(x, c) = 2.5 * max(cos(E_img(x), E_txt("A photo depicts " + c)), 0); CIDEr, BLEU-4 on refs
    results = score_fields(records, args.eval_fields, scorer, args.refs_field, args.strict, args.data)
    atomic_write_text(args.out, json.dumps(results, indent=2))
    return results


def check_flags(args: Args) -> None:
    """Every flag in range and the stage's inputs given before anything loads: one line, not a crash or no-op later."""
    counts = ("prefix_length", "mapper_layers", "max_prompt_tokens", "max_caption_tokens", "pretrain_steps",
              "finetune_steps", "batch_size", "checkpoint_every", "num_beams", "max_new_tokens", "gen_batch_size",
              "seeds")  # 0 would run nothing or crash
    check_ranges(args, at_least={**dict.fromkeys(counts, 1), "warmup": 0, "extra_alt_texts": 0, "weight_decay": 0},
                 positive=("lr", "temperature"), fractions=("p_drop_alt",))
    if not 0 < args.top_p <= 1:  # a fraction, but 0 keeps no token
        raise SystemExit(f"error: --top-p must be in (0, 1], got {args.top_p}")
    check_batch_split(args.batch_size)
    if args.stage != "miniature" and args.data is None:
        raise SystemExit(f"error: the {args.stage} stage needs --data (a manifest)")
    if args.stage == "finetune" and args.checkpoint is None:
        raise SystemExit("error: the finetune stage starts from stage 1: pass --checkpoint <out>/pretrain.pt")


def main(argv=None) -> dict:
    """Run the stage named by the first argument; return its log (train), counts (caption) or metrics."""
    args = parse(Args, argv, PRESETS)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    # this run's progress lines, not every library's
    for name in ("altogether", "common.embedding_cache", "common.caption_job"):
        logging.getLogger(name).setLevel(logging.INFO)
    check_flags(args)
    check_device(args.device)  # before any stage loads weights onto it (the encoder's loader would take the blame)
    if args.stage == "miniature":
        # the experiment imports this module: imported here, when it runs, so neither import needs the other first
        from experiments.altogether_miniature import run_miniature

        return run_miniature(args)
    if args.stage in STAGES:
        return stage_train(args, stage=args.stage)
    if args.stage == "caption":
        return stage_caption(args)
    return stage_eval(args)


if __name__ == "__main__":
    run_command(main)  # an expected error (a bad manifest, a diverged run, no such device) ends as one line
