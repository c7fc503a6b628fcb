"""VeCLIP: Improving CLIP Training via Visual-enriched Captions (Lai et al., 2023).

Paper: https://arxiv.org/abs/2310.07699; official repository apple/ml-veclip (checkpoints only: no rewriting
pipeline, no prompts, no training code). Alt-text knows names but often misses what is visible; a VLM describes what
is visible but knows no names. VeCLIP asks a VLM (LLaVA) for a visual-enriched caption (VeC), an LLM (Vicuna-1.1) to
fuse alt-text and VeC into one caption (LLM-VeC), and trains CLIP on a per-draw mix of alt-text and LLM-VeC.

Implements (stages over manifests, named by the first argument):
  1. `vec`   (Sec. 3.2)  x_v = VLM(image, VEC_PROMPT)                                           -> field `vec`
  2. `fuse`  (Sec. 3.3)  x_l = LLM(FUSION_PROMPT(x_alt, x_v)), x_alt cut from its end until the prompt fits, x_v
                         whole; x_l = the answer's caption line, or x_v on a refusal or no caption -> field `llm_vec`
  3. `train` (Sec. 3.4)  each draw of sample i: t_i = x_alt,i if u < p else x_l,i, u ~ U(0, 1) fresh per draw;
                         CLIP loss L = (CE(s X Y^T) + CE(s Y X^T)) / 2 over the global batch
  4. `eval`  retrieval R@1/5/10 both ways over every reference caption of each image (Karpathy COCO/Flickr
             protocol), zero-shot classification with a prompt-template ensemble (CLIP's 80 ImageNet templates)
  `miniature` (the default stage) is experiments/veclip_miniature.py: the same small CLIP trained on AltText, VeC,
  LLM-VeC and the mix on the miniature world. Engineering notes (resume, sharding, degenerate captions): docs/veclip.md.

Deviations from the paper:
  1. The prompts are unpublished: VEC_PROMPT follows the paper's description, FUSION_PROMPT is ours in its spirit.
  2. Answer parsing is ours: the first line after a chat preamble; an answer that starts with a refusal
     (REFUSAL_MARKERS) or holds no caption falls back to the VeC, an empty VeC further to the alt-text.
  3. Greedy decoding, at most 77 new tokens, in LLaVA-1.5's and Vicuna-1.1's conversation formats unless a chat
     template ships; LLaVA-1.5-7B by default (the paper names no size and states no decoding).
  4. The mixing probability p is an argument (default 0.5, "equal probability" in the paper).
  5. open_clip in PyTorch with its own tokenizer (the paper: JAX on TPUs, a T5 tokenizer); no augmentation beyond
     resize + centre crop; the default optimiser settings are this project's miniature ones.
  6. Data order: epoch e is a permutation seeded by (seed, e), last partial batch dropped; the draws of step t
     have their own stream seeded by (seed, 1, t), so the conditions of one seed see the same image batches.
  7. In the miniature world the world's `synthetic_caption` stands in for LLaVA's VeC and its `fused` (a template
     fusion that forgets each alt-text name with probability --world.llm-forget) for Vicuna's LLM-VeC.

Commands (the real run's schedule and more: docs/veclip.md):
    python veclip.py --preset smoke --out runs/veclip_smoke      # every stage on a tiny world, to check it runs
    python veclip.py miniature --seeds 3 --out runs/veclip_miniature   # results.md, results.json, conditions.png
    torchrun --nproc-per-node 8 veclip.py vec  --data cc3m.jsonl --out cc3m.vec.jsonl
    torchrun --nproc-per-node 8 veclip.py fuse --data cc3m.vec.jsonl --out cc3m.llmvec.jsonl
    torchrun --nproc-per-node 8 veclip.py train --data cc3m.llmvec.jsonl --out runs/veclip_b16 --model ViT-B-16
    python veclip.py eval --checkpoint runs/veclip_b16/checkpoint.pt --eval-data coco_test.jsonl
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import tyro
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from common.benchmarks import check_benchmarks, evaluate_benchmarks, write_benchmark_results
from common.cli import check_ranges, parse, preset_help
from common.clip_eval import build_clip, load_checkpoint, retrieval_and_zero_shot
from common.clip_train import MINIATURE_MODEL, TrainConfig, train_clip, usable_rows
from common.columns import Columns, index_data
from common.data import (BadSampleError, SkipCounter, atomic_write_text, check_device, read_manifest,
                         run_command, shown)
from common.degenerate import DegenerateCounter
from common.generate import (chat_image_prompt, degenerate_flag, generate_texts, image_batch, load_causal_lm,
                             load_image_text_model, pending, run_generation, start_generation)
from common.miniature import WorldConfig

log = logging.getLogger("veclip")

# Step 1 prompt, after the paper's description (Sec. 3.2; exact wording unpublished).
VEC_PROMPT = "Describe the image concisely, less than 20 words."
# Step 2 prompt (ours, in the paper's spirit): keep the alt-text's knowledge, the VeC's visual concepts.
FUSION_PROMPT = ("Rephrase the following two descriptions of the same image into one short, fluent sentence. "
                 "Description 1 is web alt-text: it may name people, places, brands or products, but it can be "
                 "noisy and ungrammatical. Description 2 describes what is visible in the image. Keep the names "
                 "and facts of description 1 that fit the image and the visual details of description 2; add "
                 "nothing that is in neither.\nDescription 1: {alt_text}\nDescription 2: {vec}\nNew sentence:")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
# How refusals begin; matched at the start of the answer only: "a sign saying I cannot swim" is a caption.
REFUSAL_MARKERS = ("i'm sorry", "i am sorry", "sorry,", "i apologize", "i cannot", "i can't", "i can not",
                   "i am unable", "i'm unable", "i am not able", "i'm not able", "as an ai", "unfortunately, i",
                   "it is not appropriate", "it's not appropriate")
# Chat preambles before the caption: "Sure! Here is the new sentence:", "Certainly.", "New sentence:".
ACKNOWLEDGEMENT = re.compile(r"^(?:sure|certainly|of course|okay)[!.,]+", re.IGNORECASE)
PREAMBLE = re.compile(r"^[^\n:]*\b(?:here|sentence|caption|description|version)\b[^\n:]*:", re.IGNORECASE)
# CLIP's 80 ImageNet prompt templates (Radford et al. 2021), as open_clip ships them
CLIP_TEMPLATES = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


# Presets (common/cli.py) over Args' defaults: `smoke` runs the miniature run in seconds; a flag given always wins.
PRESETS = {"smoke": {"model": "micro-ViT-16", "steps": 2, "batch_size": 16, "world.n_train": 64, "world.n_val": 4,
                     "world.n_test": 24}, "miniature": {}}


@dataclass
class Args:
    """VeCLIP stages: vec, fuse, train, eval over manifests; miniature runs the comparison on the miniature world."""

    stage: tyro.conf.Positional[Literal["miniature", "vec", "fuse", "train", "eval"]] = "miniature"
    """what to run"""
    preset: Annotated[Literal["smoke", "miniature"] | None, tyro.conf.arg(help=preset_help(PRESETS))] = None
    data: str | None = None
    """input of vec, fuse, train: a JSONL manifest or webdataset shards (a .tar or shards/{000..099}.tar)"""
    out: str = "runs/veclip"
    """output: the manifest written by vec/fuse (shards in: a folder of shards), the folder of train/eval/miniature"""
    # ---- vec and fuse
    vlm: str = "llava-hf/llava-1.5-7b-hf"
    """image-text-to-text model for VeC, hub name or local folder (paper: LLaVA)"""
    llm: str = "lmsys/vicuna-13b-v1.1"
    """instruction LLM for LLM-VeC, hub name or local folder (paper: Vicuna-1.1-13B)"""
    trust_remote_code: bool = False
    """let transformers run code shipped with the model (only for models you trust)"""
    gen_batch_size: int = 8
    """samples per generate() call"""
    max_new_tokens: int = 77
    """generated tokens per caption (ours; CLIP reads 77 tokens)"""
    max_prompt_tokens: int = 1024
    """fusion prompt budget in tokens: the alt-text is cut to fit, the VeC never (Vicuna reads 2048)"""
    gen_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """weights dtype of the VLM/LLM on CUDA (CPU always float32)"""
    alt_field: str = "alt_text"
    """field holding the alt-text"""
    vec_field: str = "vec"
    """field that vec writes and fuse reads"""
    llm_vec_field: str = "llm_vec"
    """field that fuse writes and train mixes with the alt-text"""
    strict: bool = False
    """stop at the first unreadable image or empty caption instead of logging and counting it"""
    # ---- train
    model: str = MINIATURE_MODEL
    """open_clip architecture"""
    pretrained: str | None = None
    """open_clip pretrained tag or checkpoint path to start from (default: from scratch)"""
    p_alt: float = 0.5
    """probability that a draw uses the alt-text instead of LLM-VeC (paper: equal probability)"""
    steps: int = 120
    """optimiser steps (miniature default, sized with the batch to reproduce.py's time budget: docs/veclip.md)"""
    batch_size: int = 64
    """global batch: pairs per step over all ranks (miniature default)"""
    lr: float = 2e-3
    """peak AdamW learning rate (miniature value)"""
    weight_decay: float = 0.1
    """AdamW weight decay on weight matrices"""
    warmup: int = 24
    """linear warm-up steps before the cosine decay (a fifth of the miniature steps)"""
    kernel: Literal["auto", "triton", "torch"] = "auto"
    """contrastive loss implementation in caption_kernels/contrastive.py"""
    amp: bool = True
    """bf16 autocast on CUDA"""
    grad_checkpointing: bool = False
    """recompute activations in backward (large batches)"""
    checkpoint_every: int = 500
    """save checkpoint.pt every this many steps (and at the end)"""
    resume: bool = True
    """continue from out/checkpoint.pt when it exists"""
    workers: int = 0
    """DataLoader worker processes for image decoding"""
    seed: int = 0
    """seed of initialisation, data order and mixing draws"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device (under torchrun each rank takes cuda:LOCAL_RANK)"""
    # ---- eval
    eval_data: str | None = None
    """evaluation manifest (eval stage; after train when given)"""
    checkpoint: str | None = None
    """checkpoint.pt to evaluate (default: out/checkpoint.pt)"""
    text_field: str = "refs"
    """field of each image's reference captions for retrieval: a list (Karpathy COCO/Flickr) or one string"""
    class_field: str | None = None
    """field holding each image's class name, for zero-shot classification on a manifest"""
    templates: Annotated[tuple[str, ...], tyro.conf.arg(
        help_behavior_hint="(default: CLIP's 80 ImageNet templates, CLIP_TEMPLATES)")] = CLIP_TEMPLATES
    """prompt templates of zero-shot classification, ensembled: a class is the mean of its prompt embeddings"""
    benchmark: tuple[str, ...] = ()
    """eval: clip_benchmark datasets too (wds/imagenet1k wds/mscoco_captions, docs/benchmarks.md); needs a root"""
    benchmark_root: str = ""
    """eval: local folder of the --benchmark sets, {name} = the name with "/" -> "_"; nothing is downloaded"""
    # ---- miniature
    seeds: int = 1
    """miniature: worlds and trainings with seeds 0..seeds-1; the table shows mean and spread"""
    world: WorldConfig = WorldConfig()
    """miniature: the world's knobs (its seed is replaced by each run's seed)"""


# ---- ALGO LOGIC: the paper's pieces, as small pure functions ----


def vlm_prompt(processor) -> str:
    """Step 1 prompt in the VLM's conversation format (LLaVA-1.5's when the processor has no template)."""
    if getattr(processor, "chat_template", None):
        return chat_image_prompt(processor, VEC_PROMPT)
    return f"USER: {getattr(processor, 'image_token', '<image>')}\n{VEC_PROMPT} ASSISTANT:"


def llm_prompt(tokenizer, instruction: str) -> str:
    """An instruction in the LLM's conversation format (Vicuna-1.1's when the tokenizer has no template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{VICUNA_SYSTEM} USER: {instruction} ASSISTANT:"


def prompt_length(tokenizer, prompt: str) -> int:
    """Tokens the LLM reads for `prompt` (a chat template already holds the special tokens)."""
    special = not getattr(tokenizer, "chat_template", None)
    return len(tokenizer(prompt, add_special_tokens=special)["input_ids"])


def fusion_prompt(tokenizer, alt_text: str, vec: str, max_prompt_tokens: int) -> tuple[str, bool]:
    """Step 2 prompt and whether the alt-text was cut: |prompt(alt[:k], vec)| <= max with the largest k; the VeC is
    kept whole even when it alone overflows the budget (the paper keeps VeC)."""
    prompt = llm_prompt(tokenizer, FUSION_PROMPT.format(alt_text=alt_text, vec=vec))
    if prompt_length(tokenizer, prompt) <= max_prompt_tokens:
        return prompt, False
    alt_ids = tokenizer(alt_text, add_special_tokens=False)["input_ids"]
    # budget for the alt-text = max - |prompt without it|; shrink further if decoding re-tokenises longer
    without_alt = llm_prompt(tokenizer, FUSION_PROMPT.format(alt_text="", vec=vec))
    keep = max(0, max_prompt_tokens - prompt_length(tokenizer, without_alt))
    while True:
        cut = tokenizer.decode(alt_ids[:keep], skip_special_tokens=True).strip()
        prompt = llm_prompt(tokenizer, FUSION_PROMPT.format(alt_text=cut, vec=vec))
        if keep == 0 or prompt_length(tokenizer, prompt) <= max_prompt_tokens:
            return prompt, True
        keep -= 1


def is_refusal(text: str) -> bool:
    """An LLM answer that begins by declining the task ("I'm sorry, ...", "As an AI ...")."""
    return text.strip().strip('"').lower().startswith(REFUSAL_MARKERS)


def caption_line(answer: str) -> str:
    """The caption in an LLM answer: its first line once a chat preamble is cut off, quotes stripped ('' if none)."""
    text = ACKNOWLEDGEMENT.sub("", answer.strip(), count=1).lstrip()  # "Sure! ..."
    text = PREAMBLE.sub("", text, count=1).lstrip()  # "Here is the new sentence:", the caption on its line or the next
    return text.split("\n")[0].strip().strip('"').strip()


def llm_vec_or_fallback(answer: str, vec: str, alt_text: str) -> tuple[str, bool]:
    """Step 2 output: the answer's caption line, or VeC when the LLM refused or wrote only a preamble
    (the alt-text if VeC is empty too)."""
    sentence = caption_line(answer)
    if not sentence or is_refusal(answer) or is_refusal(sentence):
        return (vec if vec.strip() else alt_text), True
    return sentence, False


def draw_alt_text(rng: np.random.Generator, batch_size: int, p_alt: float) -> np.ndarray:
    """Step 3 mixing (B,) bool: draw b of a step uses the alt-text iff u_b < p, u_b ~ U(0, 1) fresh per draw."""
    return rng.random(batch_size) < p_alt  # step 3: u < p


def mixed_texts(alt_texts: list[str], llm_vecs: list[str], use_alt: np.ndarray) -> list[str]:
    """t_i = x_alt,i where use_alt else x_l,i, for the drawn samples."""
    return [alt if use else llm for alt, llm, use in zip(alt_texts, llm_vecs, use_alt.tolist())]


class MixedTexts:
    """The trainer's `texts_for`: each draw of a sample carries its alt-text or its LLM-VeC (step 3)."""

    def __init__(self, columns, alt_field: str, llm_vec_field: str, p_alt: float):
        self.columns, self.alt_field, self.llm_vec_field, self.p_alt = columns, alt_field, llm_vec_field, p_alt

    def __call__(self, rows: np.ndarray, rng: np.random.Generator) -> list[str]:
        use_alt = draw_alt_text(rng, len(rows), self.p_alt)  # (B,)  step 3
        alt_texts, llm_vecs = self.columns.column(self.alt_field, rows), self.columns.column(self.llm_vec_field, rows)
        return mixed_texts(alt_texts, llm_vecs, use_alt)


# ---- Generation stages (vec, fuse): rank-sharded, resumable (common.generate) ----


def stage_vec(args: Args) -> dict:
    """Step 1: a VeC for every image, written as `vec_field` (+ `<field>_degenerate`, None for a usable VeC)."""
    names = ("vlm", "vec_field", "max_new_tokens")  # with --data and the dtype: what a resume must agree on
    _, _, device, dtype = start_generation(args.data, args.out, {n: getattr(args, n) for n in names},
                                           args.gen_dtype, args.device)
    processor, model = load_image_text_model(args.vlm, "--vlm", device, dtype, args.trust_remote_code)
    prompt, skipped, counter = vlm_prompt(processor), SkipCounter(), DegenerateCounter()

    def process_batch(batch: list[dict], counts: Counter):
        kept, inputs = image_batch(processor, prompt, batch, skipped, args.strict, counts, device, model.dtype)
        if not kept:
            return []
        vecs = generate_texts(model, processor.tokenizer, inputs, args.max_new_tokens,
                              pad_token_id=processor.tokenizer.pad_token_id)  # step 1
        counts["empty_vec"] += sum(not vec for vec in vecs)
        return [(record, {args.vec_field: vec, **degenerate_flag(counter, vec, record["id"], args.vec_field, counts,
                                                                 "degenerate_vec", usable_too=True)})
                for record, vec in zip(kept, vecs)]

    return run_generation(args.data, args.out, args.gen_batch_size, process_batch, args.stage, args.device, counter,
                          "VeCs", log)


def fusion_inputs(record: dict, args: Args) -> tuple[str, str]:
    """(alt-text, VeC) of a record for step 2: either may be empty or the alt-text absent, but a list or a number
    is an error naming the sample, never a prompt holding "['a', 'b']"."""
    if args.vec_field not in record:
        raise BadSampleError(f"sample {record['id']!r}: no {args.vec_field!r} field; run the vec stage first")
    for name in (args.alt_field, args.vec_field):
        if record.get(name) is not None and not isinstance(record[name], str):
            raise BadSampleError(f"sample {record['id']!r}: field {name!r} must be a string, got {shown(record[name])}")
    return record.get(args.alt_field) or "", record[args.vec_field] or ""


def stage_fuse(args: Args) -> dict:
    """Step 2: LLM-VeC from alt-text + VeC, written as `llm_vec_field` (+ `<field>_fallback`, `<field>_degenerate`)."""
    names = ("llm", "alt_field", "vec_field", "llm_vec_field", "max_new_tokens", "max_prompt_tokens")
    rank, world_size, device, dtype = start_generation(args.data, args.out, {n: getattr(args, n) for n in names},
                                                       args.gen_dtype, args.device)
    # this rank's inputs still to do, checked (streamed) before the LLM loads, not hours into the run
    for record in pending(args.data, args.out, rank, world_size):
        fusion_inputs(record, args)
    tokenizer, model = load_causal_lm(args.llm, "--llm", device, dtype, args.trust_remote_code)
    tokenizer.padding_side = "left"
    special = not getattr(tokenizer, "chat_template", None)
    counter = DegenerateCounter()

    def process_batch(batch: list[dict], counts: Counter):
        prompts = []
        for record in batch:
            prompt, truncated = fusion_prompt(tokenizer, *fusion_inputs(record, args), args.max_prompt_tokens)
            prompts.append(prompt)
            counts["alt_text_truncated"] += truncated
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=special).to(device)
        answers = generate_texts(model, tokenizer, inputs, args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        results = []
        for record, answer in zip(batch, answers):
            # step 2: the caption line, or VeC on a refusal
            alt_text, vec = fusion_inputs(record, args)
            llm_vec, fell_back = llm_vec_or_fallback(answer, vec, alt_text)
            counts["refusal_fallbacks"] += fell_back
            # the guard on what is written (a fallback VeC too)
            flag = degenerate_flag(counter, llm_vec, record["id"], args.llm_vec_field, counts, "degenerate_llm_vec",
                                   usable_too=True)
            results.append((record, {args.llm_vec_field: llm_vec, f"{args.llm_vec_field}_fallback": fell_back, **flag}))
        return results

    return run_generation(args.data, args.out, args.gen_batch_size, process_batch, args.stage, args.device, counter,
                          "LLM-VeCs", log)


# ---- Training: mixed captions, global-batch CLIP loss, DDP, resumable checkpoints ----


def recipe_of(args: Args) -> dict:
    """What a checkpoint must agree on to be resumed, besides the schedule: changing any of it would change the run."""
    return {name: getattr(args, name) for name in ("model", "pretrained", "p_alt", "alt_field", "llm_vec_field")}


def train(args: Args, columns: Columns, pixel_cache: torch.Tensor | None = None) -> tuple:
    """Step 3 with common.clip_train's trainer (DDP under torchrun, exact resume): (model, preprocess, tokenizer,
    log). `pixel_cache` (N, 3, H, W): a small world's preprocessed images, shared by the miniature's conditions."""
    model, preprocess, tokenizer = build_clip(args.model, args.pretrained, args.seed)
    schedule = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                           warmup=args.warmup, seed=args.seed, grad_checkpointing=args.grad_checkpointing, amp=args.amp,
                           kernel=args.kernel, workers=args.workers, checkpoint_every=args.checkpoint_every)
    rows = usable_rows(columns, [args.alt_field, args.llm_vec_field], args.strict)
    train_log = train_clip(model, tokenizer, columns if pixel_cache is None else pixel_cache,
                           MixedTexts(columns, args.alt_field, args.llm_vec_field, args.p_alt), schedule,
                           preprocess=preprocess, rows=rows, device=args.device, resume=args.resume,
                           checkpoint=Path(args.out) / "checkpoint.pt", recipe=recipe_of(args), strict=args.strict,
                           desc="train veclip")
    return model, preprocess, tokenizer, train_log


# ---- Evaluation ----


def model_label(args: Args) -> str:
    """The evaluated model as errors name it: its open_clip tag, or the checkpoint it was trained into or read from."""
    if args.pretrained is not None:
        return f"--model {args.model} --pretrained {args.pretrained}"
    return str(args.checkpoint or Path(args.out) / "checkpoint.pt")


def evaluate(model, tokenizer, preprocess, records: list[dict], args: Args, images: torch.Tensor | None = None,
             per_item: dict | None = None) -> dict:
    """Step 4 (common.clip_eval): retrieval R@1/5/10 over every reference in `text_field`, zero-shot accuracy (the
    world's tasks, or `class_field` with the `templates` ensemble); a diverged model's embeddings are an error.
    `per_item` receives each test item's value of every metric."""
    # step 4: retrieval both ways over every reference, zero-shot with the template ensemble
    return retrieval_and_zero_shot(model, tokenizer, preprocess, records, args.text_field, args.class_field,
                                   args.templates, images, args.workers, model_label(args), per_item)


def stage_eval(args: Args) -> dict:
    """Evaluate out/checkpoint.pt (or --checkpoint, or --pretrained) on --eval-data and the --benchmark sets."""
    if args.eval_data is None and not args.benchmark:
        raise ValueError("the eval stage needs --eval-data (a manifest) or --benchmark (clip_benchmark datasets)")
    if args.benchmark:
        check_benchmarks(args.benchmark, args.benchmark_root)  # every set present before a model loads
    path = Path(args.checkpoint or Path(args.out) / "checkpoint.pt")
    if args.pretrained is not None:
        (model, preprocess, tokenizer), name = build_clip(args.model, args.pretrained, args.seed), args.model
    elif path.exists():
        model, preprocess, tokenizer, name = load_checkpoint(path)
    else:
        raise FileNotFoundError(f"no checkpoint at {path}: pass --checkpoint or --pretrained")
    model.to(args.device).eval()
    metrics = evaluate(model, tokenizer, preprocess, read_manifest(args.eval_data), args) if args.eval_data else {}
    if args.benchmark:
        metrics["benchmarks"] = evaluate_benchmarks(
            model, preprocess, tokenizer, args.benchmark, args.benchmark_root, num_workers=args.workers,
            model_label=name, pretrained=args.pretrained if args.pretrained is not None else str(path))
        write_benchmark_results(metrics["benchmarks"], args.out)
    atomic_write_text(Path(args.out) / "eval.json", json.dumps(metrics, indent=2))
    return metrics


def check_flags(args: Args) -> None:
    """Every numeric flag in its range before anything loads or is written, one line naming the flag; an inf
    learning rate passes, for the training guard to stop with its step named (NaN is refused here)."""
    check_ranges(args, at_least={name: 1 for name in (
        "gen_batch_size", "max_new_tokens", "max_prompt_tokens", "steps", "batch_size", "checkpoint_every", "seeds")}
        | {name: 0 for name in ("lr", "weight_decay", "warmup", "workers", "seed")}, fractions=("p_alt",))


def main(argv=None) -> dict:
    """Run the stage named by the first argument; return its metrics (train/eval/miniature) or counts (vec/fuse)."""
    args = parse(Args, argv, PRESETS)
    check_flags(args)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    check_device(args.device)  # before any stage loads weights onto it
    if args.stage == "miniature":
        # imported here: the experiment imports this module, and the method's stages need none of it
        from experiments.veclip_miniature import run_miniature

        return run_miniature(args)
    if args.stage == "eval":
        return stage_eval(args)
    if args.data is None:
        raise ValueError(f"the {args.stage} stage needs --data (an input manifest)")
    if args.stage == "vec":
        return stage_vec(args)
    if args.stage == "fuse":
        return stage_fuse(args)
    model, preprocess, tokenizer, train_log = train(args, index_data(args.data))
    if args.eval_data is not None and int(os.environ.get("RANK", 0)) == 0:
        train_log["eval"] = evaluate(model, tokenizer, preprocess, read_manifest(args.eval_data), args)
        atomic_write_text(Path(args.out) / "eval.json", json.dumps(train_log["eval"], indent=2))
    return train_log


if __name__ == "__main__":
    run_command(main)
