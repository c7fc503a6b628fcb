"""CapsFusion: Rethinking Image-Text Data at Scale (Yu et al., 2023). https://arxiv.org/abs/2310.20550

Raw web captions know the world (names) but are noisy; a captioner's synthetic captions are clean but generic.
An LLM merges the two captions of each image into one, keeping sentence 1's knowledge in sentence 2's structure;
ChatGPT's fusions are distilled into CapsFus-LLaMA (LLaMA-2-13B fine-tuned), which fuses at scale. The official
repository (baaivision/CapsFusion) ships only an inference script; this file is the whole pipeline.

Implements (stages over manifests, each named by the first argument):
  1. `caption` s_i = captioner(image_i) (LAION-COCO's BLIP captions)                      -> `synthetic_caption`
  2. `fuse`    f_i = LLM(PROMPT(r_i, s_i)), |PROMPT| <= 256 tokens by cutting r_i's end; beam search, 3 beams,
               <= 80 new tokens (the official inference)                                 -> `fused`
  3. `sft`     CapsFus-LLaMA: L = -1/|Y| sum_{t in Y} log p(y_t | PROMPT(r, s), y_<t), Y = the teacher's fusion
               + EOS (the prompt carries no loss), 2 epochs; full or LoRA                -> out/fuser
  `eval` (fusion quality), `scaling` (Fig. 7) and `miniature` (the default: sft -> fuse -> eval -> scaling) are
  experiments/capsfusion_miniature.py's, on the same command line.

Deviations from the paper (in full in docs/capsfusion.md):
  1. The 256-token prompt cap cuts the raw caption's tail as the official script means to, without its bugs
     (`ids[:-0]` cutting all of it; right truncation losing "New Sentence:"); an overlong synthetic caption stays.
  2. Prompts padded to the batch's longest, not to 256 (same output); whitespace collapsed; the answer's first line.
  3. One empty caption: the other is copied without the LLM; both empty: skipped; an empty answer: the synthetic
     caption; SFT drops triplets with an empty member.
  4. SFT is Alpaca's recipe (prompt + response + EOS, loss on the response, AdamW lr 2e-5, batch 128, 3% warm-up,
     cosine, no weight decay, clipping at 1), the loss a global token mean; plain DDP, so 13B needs `--lora`.
  5. `caption`: one beam-search caption per image (LAION-COCO kept the best of 40 BLIP captions).
  6. `scaling` trains a small CLIP, one epoch per subset (the paper: an Emu-style multimodal LLM, CIDEr and VQA);
     the mix draws raw or synthetic with probability 0.5 at each draw (the paper's ratio is unstated).
  7. Miniature: the world's template `fused` plays ChatGPT, `synthetic_caption` plays BLIP, the student is a
     2-layer Llama from scratch with a word-level tokenizer (docs/capsfusion.md).

Commands:
    python capsfusion.py --preset smoke --out runs/capsfusion_smoke   # every stage on a tiny world, to check
    python capsfusion.py --seeds 3 --out runs/capsfusion_miniature    # the miniature run, CPU
    torchrun --nproc-per-node 8 capsfusion.py sft --data chatgpt_triplets.jsonl --out runs/capsfus \
        --base-model meta-llama/Llama-2-13b-hf --lora --micro-batch-size 4 --grad-checkpointing
    torchrun --nproc-per-node 8 capsfusion.py fuse --data syn.jsonl --out fused.jsonl --llm runs/capsfus/fuser
  The other real-run commands (caption, eval, scaling, benchmarks) and the results: docs/capsfusion.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.distributed as dist
import tyro
from tqdm.auto import tqdm

from common.cli import check_ranges, parse, preset_help
from common.clip_train import MINIATURE_MODEL, assert_finite_state, save_checkpoint
from common.data import (BadSampleError, ManifestError, SkipCounter, check_device, init_distributed, read_manifest,
                         run_command, text_problem)
from common.degenerate import DegenerateCounter
from common.generate import (chat_image_prompt, degenerate_flag, generate_texts, image_batch, load_causal_lm,
                             load_image_text_model, pending, run_generation, start_generation, weights_dtype)
from common.miniature import WorldConfig
from common.training import (global_token_count, guard_where, resume_state, right_padded_batch,
                             save_pretrained_atomically, step_batch, token_mean_backward, with_lora)

log = logging.getLogger("capsfusion")

# The fusion prompt, byte for byte as in the official capsfusion_inference.py.
FUSION_PROMPT = ("Please merge and refine the information from the two given sentences. "
                 "Sentence 1 provides detailed real-world knowledge, yet it suffers from flaws in sentence structure "
                 "and grammar. Sentence 2 exhibits nice sentence structure, but lacking in-depth real-world details "
                 "and may contain false information. Please combine them into a new sentence, ensuring a "
                 "well-structured sentence while retaining the detailed real-world information provided in Sentence 1. "
                 "Avoid simply concatenating the sentences.\n\n"
                 "Sentence 1: {raw}\nSentence 2: {synthetic}\nNew Sentence:")
IGNORE = -100  # label of tokens that carry no loss (prompt, padding)

# Presets (common/cli.py) over Args' defaults: `smoke` runs every stage in seconds; a flag given always wins.
PRESETS = {"smoke": {"sizes": (16, 64), "clip_model": "micro-ViT-16", "clip_batch_size": 16, "max_new_tokens": 8,
                     "world.n_train": 64, "world.n_val": 4, "world.n_test": 24}, "miniature": {}}


@dataclass
class Args:
    """The stages caption, fuse, sft, eval and scaling over manifests; miniature runs them on the miniature world."""

    stage: tyro.conf.Positional[Literal["miniature", "caption", "fuse", "sft", "eval", "scaling"]] = "miniature"
    """what to run"""
    preset: Annotated[Literal["smoke", "miniature"] | None, tyro.conf.arg(help=preset_help(PRESETS))] = None
    data: str | None = None
    """input manifest (JSONL, see common/data.py)"""
    out: str = "runs/capsfusion"
    """output: the manifest written by caption/fuse, the folder of sft/eval/scaling/miniature"""
    raw_field: str = "alt_text"
    """field of the raw web caption (sentence 1)"""
    synthetic_field: str = "synthetic_caption"
    """field of the synthetic caption (sentence 2), written by caption"""
    fused_field: str = "fused"
    """field of the teacher's fusion: what sft learns, what eval compares against, scaling's `teacher` reference arm"""
    out_field: str = "fused"
    """field that fuse writes and scaling's `fused` arm trains on (another name keeps a teacher's fusion beside it)"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device (under torchrun each rank takes cuda:LOCAL_RANK)"""
    seed: int = 0
    """seed of initialisation and data order (miniature: the first seed)"""
    strict: bool = False
    """stop at the first unreadable image or empty caption pair instead of logging and counting it"""
    trust_remote_code: bool = False
    """let transformers run code shipped with a model (only for models you trust)"""
    # ---- caption
    captioner: str = "Salesforce/blip-image-captioning-large"
    """image-text-to-text model, hub name or local folder (LAION-COCO used BLIP)"""
    caption_prompt: str | None = None
    """text prompt for the captioner (none for BLIP; chat VLMs need one)"""
    caption_beams: int = 3
    """beams of the captioner's beam search"""
    caption_max_new_tokens: int = 30
    """generated tokens per synthetic caption"""
    # ---- fuse. Defaults: the official inference (capsfusion_inference.py and its config.yaml)
    llm: str = "BAAI/CapsFus-LLaMA"
    """fuser, any AutoModelForCausalLM by hub name or local folder (official config.yaml)"""
    max_prompt_tokens: int = 256
    """prompt budget in tokens, special tokens included (official: 256)"""
    num_beams: int = 3
    """beams of the fuser's beam search (official: 3)"""
    max_new_tokens: int = 80
    """generated tokens per fused caption (official: 80)"""
    gen_batch_size: int = 4
    """samples per generate() call (official: 4 per GPU)"""
    gen_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """weights dtype of captioner and fuser on CUDA (official: bf16; CPU always float32)"""
    # ---- sft. Defaults: the paper (Sec. 3: LLaMA-2-13B, 2 epochs) and Alpaca's recipe
    base_model: str = "meta-llama/Llama-2-13b-hf"
    """causal LM to fine-tune into the fuser (paper: LLaMA-2-13B)"""
    epochs: int = 2
    """passes over the triplets (paper: 2)"""
    lr: float = 2e-5
    """peak AdamW learning rate (Alpaca)"""
    batch_size: int = 128
    """triplets per optimiser step over all ranks (Alpaca)"""
    micro_batch_size: int = 4
    """triplets per forward pass per rank; gradients accumulate up to batch_size"""
    warmup_ratio: float = 0.03
    """fraction of the steps with a linear warm-up before the cosine decay (Alpaca)"""
    weight_decay: float = 0.0
    """AdamW weight decay (Alpaca)"""
    max_seq_len: int = 512
    """prompt + response tokens kept per triplet"""
    lora: bool = False
    """train LoRA adapters (peft) instead of all weights; merged into the saved fuser"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scale numerator (scale = alpha / r)"""
    lora_dropout: float = 0.05
    """dropout on the LoRA input"""
    lora_base_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """weights dtype of the frozen base model under --lora on CUDA (CPU: float32; full fine-tuning: float32)"""
    grad_checkpointing: bool = False
    """recompute activations in backward (long prompts, big models)"""
    checkpoint_every: int = 500
    """save out/sft_state.pt every this many steps (and at the end)"""
    resume: bool = True
    """continue from out/sft_state.pt when it exists"""
    # ---- scaling
    clip_model: str = MINIATURE_MODEL
    """open_clip architecture trained from scratch for each point"""
    scaling_data: str | None = None
    """evaluation manifest of the scaling stage (retrieval against `caption`; world tasks if present)"""
    sizes: tuple[int, ...] = (1250, 2500)
    """numbers of training samples, nested subsets (miniature: a doubling, sized for a 10-minute reproduce.py)"""
    scaling_epochs: float = 1.0
    """passes over each subset (paper: 1 epoch at every scale)"""
    clip_batch_size: int = 32
    """CLIP pairs per step (miniature: small, so that one epoch of 2,500 samples is 79 steps)"""
    benchmark: tuple[str, ...] = ()
    """scaling: clip_benchmark datasets each point's CLIP is evaluated on too (docs/benchmarks.md); needs a root"""
    benchmark_root: str = ""
    """local folder of the --benchmark sets, {name} = the name with "/" -> "_"; nothing is downloaded"""
    clip_lr: float = 2e-3
    """peak CLIP learning rate (the project's miniature value)"""
    # ---- miniature
    seeds: int = 1
    """miniature: worlds and runs with seeds seed..seed+seeds-1"""
    world: WorldConfig = WorldConfig()
    """miniature: the world's knobs (its seed is replaced by each run's seed)"""


# ---- ALGO LOGIC: the paper's pieces (prompt, fusion, SFT example and loss)


def clean(text: str | None) -> str:
    """A caption with its whitespace collapsed ('' for None)."""
    return " ".join((text or "").split())


def caption_text(record: dict, field: str) -> str:
    """A record's caption in `field`, cleaned: absent, null or blank is '' (Deviation 3 says what follows), anything
    but a string an error naming the sample (common.data.text_problem's rule): never "123" or "['a', 'b']"."""
    value = record.get(field)
    if value is not None and not isinstance(value, str):
        raise BadSampleError(f"sample {record['id']!r}: {text_problem(value, field)}")
    return clean(value)


def prompt_length(tokenizer, prompt: str) -> int:
    """Tokens the LLM reads for `prompt`, BOS included, as the official script counts them."""
    return len(tokenizer(prompt)["input_ids"])


def fusion_prompt(tokenizer, raw: str, synthetic: str, max_tokens: int) -> tuple[str, bool]:
    """PROMPT(r[:k], s) with the largest k such that it fits in max_tokens; and whether r was cut. Only r is cut
    (from its end); the instruction and s stay whole, even when they alone overflow (the caller counts that)."""
    prompt = FUSION_PROMPT.format(raw=raw, synthetic=synthetic)
    overflow = prompt_length(tokenizer, prompt) - max_tokens
    if overflow <= 0:
        return prompt, False
    raw_ids = tokenizer(raw, add_special_tokens=False)["input_ids"]
    keep = max(0, len(raw_ids) - overflow)
    while True:  # decoding and re-tokenising can merge tokens differently: shrink until it fits
        prompt = FUSION_PROMPT.format(raw=tokenizer.decode(raw_ids[:keep], skip_special_tokens=True).strip(),
                                      synthetic=synthetic)
        if keep == 0 or prompt_length(tokenizer, prompt) <= max_tokens:
            return prompt, True
        keep -= 1


def first_line(answer: str) -> str:
    """The fused caption: the answer's first non-empty line, whitespace collapsed."""
    return next((clean(line) for line in answer.splitlines() if line.strip()), "")


def sft_example(tokenizer, raw: str, synthetic: str, fused: str, args: Args) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one triplet: PROMPT(r, s) + f + EOS, labels IGNORE on the prompt. Prompt and response
    are tokenised apart: the mask boundary is exact, and the fuser continues a prompt tokenised as in training."""
    prompt, _ = fusion_prompt(tokenizer, raw, synthetic, args.max_prompt_tokens)
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(fused, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:args.max_seq_len]
    # L = -1/|Y| sum_{t in Y} log p(y_t | prompt, y_<t): only the response positions are labelled
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:args.max_seq_len]
    return input_ids, labels


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over labelled tokens, their count): position t predicts token t + 1."""
    shifted = logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    # step 3: -sum_{t in Y} log p(y_t | PROMPT(r, s), y_<t); the caller divides by |Y| over the global batch
    nll = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                                            ignore_index=IGNORE, reduction="sum")
    return nll, (targets != IGNORE).sum()


# ---- Generation stages (caption, fuse): rank-sharded, resumable (common.generate)


def stage_caption(args: Args, data=None) -> dict:
    """Step 1: a synthetic caption for every readable image of `data` (default --data, a manifest or shards; or
    a list of records), written as `synthetic_field` (+ `<field>_degenerate` when it is degenerate)."""
    data = args.data if data is None else data
    names = ("captioner", "caption_prompt", "caption_beams", "caption_max_new_tokens", "synthetic_field")
    _, _, device, dtype = start_generation(data, args.out, {n: getattr(args, n) for n in names},
                                           args.gen_dtype, args.device)
    processor, model = load_image_text_model(args.captioner, "--captioner", device, dtype, args.trust_remote_code)
    prompt = None if args.caption_prompt is None else chat_image_prompt(processor, args.caption_prompt)
    skipped, counter = SkipCounter(), DegenerateCounter()

    def process_batch(batch: list[dict], counts: Counter):
        kept, inputs = image_batch(processor, prompt, batch, skipped, args.strict, counts, device, model.dtype)
        if not kept:
            return []
        # step 1: s_i = captioner(image_i); BLIP sets its own pad id
        texts = generate_texts(model, processor.tokenizer, inputs, args.caption_max_new_tokens, args.caption_beams)
        captions = [first_line(text) for text in texts]
        counts["empty_captions"] += sum(not caption for caption in captions)
        return [(record, {args.synthetic_field: caption,
                          **degenerate_flag(counter, caption, record["id"], args.synthetic_field, counts)})
                for record, caption in zip(kept, captions)]

    return run_generation(data, args.out, args.gen_batch_size, process_batch, args.stage, args.device, counter,
                          logger=log, required=("id", "image"))


def stage_fuse(args: Args, data=None) -> dict:
    """Steps 2-3 at inference: the fused caption of each (raw, synthetic) pair of `data` (default --data; the
    miniature gives records), as `out_field` + `<out_field>_source` (+ `<field>_degenerate` for a degenerate one)."""
    data = args.data if data is None else data
    names = ("llm", "raw_field", "synthetic_field", "out_field", "max_prompt_tokens", "num_beams", "max_new_tokens")
    rank, world_size, device, dtype = start_generation(data, args.out, {n: getattr(args, n) for n in names},
                                                       args.gen_dtype, args.device)
    # this rank's inputs still to do, checked (streamed) before the LLM loads, not hours into the run
    for record in pending(data, args.out, rank, world_size, required=("id",)):
        for field in (args.raw_field, args.synthetic_field):
            caption_text(record, field)
    tokenizer, model = load_causal_lm(args.llm, "--llm", device, dtype, args.trust_remote_code)
    tokenizer.padding_side = "left"  # a decoder-only model continues from the right end
    counter = DegenerateCounter()

    def process_batch(batch: list[dict], counts: Counter):
        results, prompts, asked = {}, [], []
        for position, record in enumerate(batch):
            raw, synthetic = caption_text(record, args.raw_field), caption_text(record, args.synthetic_field)
            if not raw and not synthetic:
                if args.strict:
                    raise BadSampleError(f"sample {record['id']!r}: empty {args.raw_field!r} and "
                                         f"{args.synthetic_field!r}")
                counts["skipped_no_text"] += 1
            elif not raw or not synthetic:  # nothing to merge: the caption there is, unchanged
                source = "synthetic" if synthetic else "raw"
                counts[f"copied_{source}"] += 1
                results[position] = (record, {args.out_field: synthetic or raw, f"{args.out_field}_source": source})
            else:
                # step 2: PROMPT(r_i, s_i)
                prompt, trimmed = fusion_prompt(tokenizer, raw, synthetic, args.max_prompt_tokens)
                counts["raw_trimmed"] += trimmed
                counts["prompt_over_cap"] += prompt_length(tokenizer, prompt) > args.max_prompt_tokens
                prompts.append(prompt)
                asked.append((position, record, synthetic))
        if prompts:
            inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            # step 2: f_i = LLM(PROMPT(r_i, s_i)), beam search
            answers = generate_texts(model, tokenizer, inputs, args.max_new_tokens, args.num_beams,
                                     pad_token_id=tokenizer.pad_token_id)
            for (position, record, synthetic), answer in zip(asked, answers):
                fused = first_line(answer)
                counts["empty_answers"] += not fused
                # an empty answer fell back to the synthetic caption (counted above): the LLM's answers are checked
                flag = degenerate_flag(counter, fused, record["id"], args.out_field, counts) if fused else {}
                results[position] = (record, {args.out_field: fused or synthetic,
                                              f"{args.out_field}_source": "llm" if fused else "synthetic", **flag})
        return [results[position] for position in sorted(results)]  # input order

    return run_generation(data, args.out, args.gen_batch_size, process_batch, args.stage, args.device, counter,
                          logger=log, required=("id",))


# ---- SFT: CapsFus-LLaMA from (raw, synthetic, fused) triplets


def triplets(records: list[dict], args: Args) -> list[tuple[str, str, str]]:
    """(raw, synthetic, fused) of the records where all three are non-empty; the others are counted and dropped.
    A member that is not text at all is an error (`caption_text`)."""
    kept, skipped = [], SkipCounter()
    for record in records:
        texts = tuple(caption_text(record, f) for f in (args.raw_field, args.synthetic_field, args.fused_field))
        if all(texts):
            kept.append(texts)
        elif args.strict:
            raise BadSampleError(f"sample {record['id']!r}: an empty member of the triplet {texts}")
        else:
            skipped.add(str(record["id"]), "empty raw, synthetic or fused caption")
    if not kept:
        raise ManifestError(f"no triplet with non-empty {args.raw_field!r}, {args.synthetic_field!r}, "
                            f"{args.fused_field!r}")
    return kept


def sft_recipe(args: Args, data: list[tuple[str, str, str]]) -> dict:
    """What a checkpoint must agree on to be resumed: every setting that changes the trained weights, and the
    triplets (not --micro-batch-size, which only splits a step's sum, nor --grad-checkpointing, which recomputes)."""
    names = ("base_model", "epochs", "lr", "batch_size", "warmup_ratio", "weight_decay", "max_seq_len",
             "max_prompt_tokens", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_base_dtype", "seed",
             "raw_field", "synthetic_field", "fused_field")
    digest = hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]
    return {**{name: getattr(args, name) for name in names}, "data": f"{len(data)} triplets, sha256 {digest}"}


def sft_step(ddp, examples: list[tuple[list[int], list[int]]], micro_batch_size: int, pad_id: int, device: str,
             world_size: int) -> float:
    """One optimiser step's gradients from this rank's `examples`, in micro-batches; returns the step's loss: the
    mean over the global batch's response tokens, exact under any number of ranks and micro-batches."""
    n_tokens = sum(sum(label != IGNORE for label in labels[1:]) for _, labels in examples)
    tokens = global_token_count(n_tokens, device, world_size)  # every rank and micro-batch divides by this count
    total = torch.zeros((), device=device)
    for first in range(0, len(examples), micro_batch_size):
        batch = right_padded_batch(examples[first:first + micro_batch_size], pad_id, IGNORE)
        batch = {key: value.to(device) for key, value in batch.items()}
        # accumulate locally; DDP all-reduces the gradients once, in the step's last backward pass
        last = first + micro_batch_size >= len(examples)
        with contextlib.nullcontext() if world_size == 1 or last else ddp.no_sync():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                logits = ddp(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (b, T, V)
            nll, _ = response_loss(logits, batch["labels"])
            token_mean_backward(nll, tokens, world_size)  # DDP's mean over ranks, made the global token mean
        total += nll.detach()
    if world_size > 1:
        dist.all_reduce(total)
    return (total / tokens).item()


def stage_sft(args: Args, records: list[dict]) -> dict:
    """Step 3: fine-tune --base-model on the triplets; the fuser is saved to out/fuser."""
    rank, world_size, device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    # the weights that train are float32; a frozen LoRA base runs in --lora-base-dtype (on CUDA)
    dtype = weights_dtype(args.lora_base_dtype, device) if args.lora else torch.float32
    tokenizer, model = load_causal_lm(args.base_model, "--base-model", device, dtype, args.trust_remote_code)
    if args.lora:
        model = with_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # LoRA: frozen embeddings would cut the recomputed graph
    texts = triplets(records, args)
    data = [sft_example(tokenizer, *triplet, args) for triplet in texts]
    if world_size > 1 and 0 < len(data) % args.batch_size < world_size:
        raise ManifestError(f"{len(data)} triplets leave a last batch smaller than the {world_size} ranks; change "
                            "--batch-size")
    steps = args.epochs * math.ceil(len(data) / args.batch_size)
    warmup = max(1, round(args.warmup_ratio * steps))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    out, recipe = Path(args.out), sft_recipe(args, texts)
    state_path = out / "sft_state.pt"
    # LoRA: the state holds the adapters only (strict=False)
    start, history = resume_state(state_path, args.resume, recipe, model, optimizer, device, "trainable", strict=False,
                                  log=log)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    model.train()
    began, saved = time.time(), start or None  # saved: the step the state on disk holds, for the guard's message
    bar = tqdm(range(start, steps), desc="sft", disable=rank != 0)
    for step in bar:
        # linear warm-up, then cosine decay to 0 (Alpaca's schedule)
        progress = (step - warmup) / max(1, steps - warmup)
        lr = args.lr * (step + 1) / warmup if step < warmup else 0.5 * args.lr * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = step_batch(step, len(data), args.batch_size, args.seed, drop_last=False)  # the last may be short
        # DDP needs the same number of backward passes on every rank: cut the batch to a multiple of the ranks
        mine = [data[i] for i in indices[:len(indices) // world_size * world_size][rank::world_size]]
        loss = sft_step(ddp, mine, args.micro_batch_size, tokenizer.pad_token_id, device, world_size)
        assert_finite_state(None, loss, guard_where("sft", step, steps, "before its update", state_path, saved))
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step, "loss": loss, "lr": lr})
        bar.set_postfix(loss=f"{loss:.3f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == steps:
            # the weights too (a finite loss can make a non-finite update), on every rank, before anything is saved
            assert_finite_state(model, loss, guard_where("sft", step, steps, "after its update", state_path, saved))
            if rank == 0:
                trained = {k: v for k, v in model.state_dict().items() if not args.lora or "lora_" in k}
                save_checkpoint(state_path, {"trainable": trained, "optimizer": optimizer.state_dict(),
                                             "step": step + 1, "history": history, "recipe": recipe})
            saved = step + 1
    if rank == 0:
        save_pretrained_atomically(model.merge_and_unload() if args.lora else model, tokenizer, out / "fuser")
    if world_size > 1:
        dist.barrier()
    return {"history": history, "resumed_from": start, "steps": steps, "triplets": len(data),
            "train_seconds": time.time() - began, "fuser": str(out / "fuser")}


def check_flags(args: Args) -> None:
    """Every flag in its range and the stage's inputs given, before anything loads: one line naming the flag and
    exit status 1, not a crash (or a silent no-op) later; an inf --lr passes, for the training guard to name."""
    counts = ("caption_beams", "caption_max_new_tokens", "max_prompt_tokens", "num_beams", "max_new_tokens",
              "gen_batch_size", "epochs", "batch_size", "micro_batch_size", "max_seq_len", "lora_r", "lora_alpha",
              "checkpoint_every", "clip_batch_size", "seeds")  # 0 of any would run nothing or crash
    check_ranges(args, at_least=dict.fromkeys(counts, 1) | {"weight_decay": 0}, fractions=("warmup_ratio",))
    for name, ok, what in [("sizes", all(n >= 1 for n in args.sizes), "numbers of samples, each at least 1"),
                           ("lr", args.lr > 0, "positive"), ("clip_lr", args.clip_lr > 0, "positive"),  # NaN fails
                           ("lora_dropout", 0 <= args.lora_dropout < 1, "in [0, 1)"),
                           ("scaling_epochs", args.scaling_epochs > 0, "positive")]:
        if not ok:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
    if args.stage != "miniature" and args.data is None:
        raise SystemExit(f"error: the {args.stage} stage needs --data (an input manifest)")
    if args.stage == "scaling" and args.scaling_data is None:
        raise SystemExit("error: the scaling stage needs --scaling-data (the evaluation manifest)")


def main(argv=None) -> dict:
    """Run the stage named by the first argument; return its metrics (sft/eval/scaling/miniature) or counts."""
    args = parse(Args, argv, PRESETS)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    check_flags(args)
    check_device(args.device)  # before any stage loads weights onto it
    if args.stage in ("caption", "fuse"):  # they stream --data (a manifest or shards)
        return stage_caption(args) if args.stage == "caption" else stage_fuse(args)
    if args.stage == "sft":
        return stage_sft(args, read_manifest(args.data, required=("id",)))  # text only: triplets without images
    # the experiments import this module: imported here, when a stage needs them, not at the top (a cycle)
    from experiments import capsfusion_miniature as experiments

    if args.stage == "eval":
        return experiments.stage_eval(args, read_manifest(args.data, required=("id",)))
    return experiments.run_scaling(args) if args.stage == "scaling" else experiments.run_miniature(args)


if __name__ == "__main__":
    run_command(main)  # an expected error (a bad manifest, a diverged run, no such device) ends as one line
