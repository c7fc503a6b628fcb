"""CapsFusion's experiments: fusion quality (`eval`), the scaling analysis (`scaling`, Fig. 7) and the miniature run.

`python capsfusion.py eval|scaling|miniature ...` runs them (capsfusion.main imports this module when it needs it);
they take capsfusion.Args. `eval` scores raw, synthetic, teacher and fuser captions side by side; `scaling` trains the
same CLIP on each caption type at growing numbers of samples; `miniature` chains sft -> fuse -> eval -> scaling on the
miniature world, over seeds, and writes results.md, results.json and scaling.png (docs/capsfusion.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import string
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from capsfusion import FUSION_PROMPT, Args, caption_text, clean, stage_fuse, stage_sft
from common.benchmarks import check_benchmarks, evaluate_benchmarks, write_benchmark_results
from common.caption_metrics import coco_scores, plain_words, table_note
from common.claims import mean_spread
from common.clip_eval import ImageRows, preprocess_images, retrieval_and_zero_shot
from common.clip_train import TrainConfig, create_clip, train_clip, usable_rows
from common.columns import Columns, index_data, index_manifest
from common.data import ManifestError, atomic_write_text, read_manifest, write_results
from common.miniature import ensure_world, hallucinated_words, names_kept
from common.training import save_pretrained_atomically

log = logging.getLogger("capsfusion")

# The miniature student's recipe: a tiny LM from scratch needs a far larger step than LLaMA's 2e-5.
MINIATURE_SFT = {"lr": 3e-3, "batch_size": 32, "micro_batch_size": 32, "warmup_ratio": 0.06, "gen_batch_size": 64}


# =============================================================================================
# Evaluation: fusion quality, side by side
# =============================================================================================


def proper_names(text: str) -> set[str]:
    """The raw caption's proper-name proxy: alphabetic words that start with a capital, lower-cased."""
    return {w.strip(string.punctuation).lower() for w in text.split() if w.strip(string.punctuation).isalpha()
            and w.strip(string.punctuation)[0].isupper()}


def fusion_quality(captions: list[str], records: list[dict], args: Args, reference: list[str] | None) -> dict:
    """Names of the raw caption kept, (world) names kept and hallucinations, BLEU-4/CIDEr against `reference` (COCO
    toolkit, x 100, with their "tokenizer" label), length in words (lower-cased, punctuation removed). `per_item`
    (world labels only): each caption's [names kept, names to keep] and hallucinated words, what a one-seed verdict
    resamples."""
    # the raw caption's names kept by each caption
    raw_names = [proper_names(caption_text(r, args.raw_field)) for r in records]
    kept = sum(len(names & set(plain_words(c))) for names, c in zip(raw_names, captions))
    metrics = {"raw_names_kept": 100.0 * kept / max(1, sum(map(len, raw_names))),
               "length": float(np.mean([len(plain_words(c)) for c in captions]))}
    if "objects" in records[0]:  # the miniature world's labels: true names, and words nothing in the image has
        items = {"names_kept": [[int(n) for n in names_kept(c, r)] for c, r in zip(captions, records)],
                 "hallucinated": [float(len(hallucinated_words(c, r))) for c, r in zip(captions, records)]}
        found, total = np.sum(items["names_kept"], axis=0)
        metrics["names_kept"] = float(100.0 * found / max(1, total))  # a ratio of sums
        metrics["hallucinated"] = float(np.mean(items["hallucinated"]))
        metrics["per_item"] = items
    if reference is not None:
        metrics.update(coco_scores({i: [t] for i, t in enumerate(reference)}, dict(enumerate(captions)), scale=100.0,
                                   metrics=("BLEU-4", "CIDEr")))
    return metrics


def stage_eval(args: Args, records: list[dict]) -> dict:
    """Fusion quality of raw, synthetic, teacher-fused and fuser-generated captions, those the manifest has."""
    rows = {"raw": args.raw_field, "synthetic": args.synthetic_field, "teacher": args.fused_field,
            "fuser": args.out_field}
    rows = {name: field for name, field in rows.items()
            if all(field in r for r in records) and (name != "fuser" or field != args.fused_field)}
    if not rows:
        raise ManifestError(f"no records with any of {args.raw_field!r}, {args.synthetic_field!r}, "
                            f"{args.fused_field!r}, {args.out_field!r}")
    reference = [caption_text(r, args.fused_field) for r in records] if "teacher" in rows else None
    results = {name: fusion_quality([caption_text(r, field) for r in records], records, args,
                                    None if name == "teacher" else reference) for name, field in rows.items()}
    out = Path(args.out)
    atomic_write_text(out / "eval.json", json.dumps(results, indent=2))
    return results


# =============================================================================================
# Scaling: the same CLIP on raw, synthetic, fused and mixed captions at growing data sizes
# =============================================================================================

MIX = "raw+synthetic mix"


def caption_fields(args: Args, columns: Columns) -> dict[str, str]:
    """{caption type: field} of the scaling arms: `fused` is the fuser's output (--out-field, what `fuse` writes);
    `teacher`, a reference line, the teacher's --fused-field when that is another field and every sample has it."""
    fields = {"raw": args.raw_field, "synthetic": args.synthetic_field, "fused": args.out_field}
    if (args.fused_field != args.out_field and args.fused_field in columns.fields
            and len(columns.rows_where(lambda v: v[args.fused_field] is not None, [args.fused_field])) == len(columns)):
        fields["teacher"] = args.fused_field
    return fields


class ArmTexts:
    """The trainer's `texts_for` of one scaling arm: each row's caption of the arm's field, whitespace collapsed."""

    def __init__(self, columns: Columns, kind: str, fields: dict[str, str]):
        self.columns, self.kind, self.fields = columns, kind, fields

    def __call__(self, rows: np.ndarray, rng: np.random.Generator) -> list[str]:
        if self.kind == MIX:
            raw, synthetic = (self.columns.column(self.fields[k], rows) for k in ("raw", "synthetic"))
            # the mix arm: each time sample i is drawn, t_i = r_i if u < 0.5 else s_i, u ~ U(0, 1) fresh per draw
            return [clean(r if u < 0.5 else s) for r, s, u in zip(raw, synthetic, rng.random(len(rows)))]
        return [clean(text) for text in self.columns.column(self.fields[self.kind], rows)]


def evaluate_clip(model, tokenizer, preprocess, records: list[dict], images) -> dict:
    """Retrieval against `caption` (and the world's zero-shot tasks when the records have labels), on the model's
    device (common.clip_eval); `images`: the preprocessed test images (a tensor, or ImageRows decoded batch by
    batch)."""
    items = {}
    metrics = retrieval_and_zero_shot(model, tokenizer, preprocess, records, "caption", images=images,
                                      per_item=items, flag=None)
    metrics["retrieval_R@5"] = (metrics["i2t_R@5"] + metrics["t2i_R@5"]) / 2
    # one caption per test image: image i's query both ways, whose mean is retrieval_R@5 (a one-seed verdict's items)
    metrics["per_item"] = {"retrieval_R@5": [(a + b) / 2 for a, b in zip(items["i2t_R@5"], items["t2i_R@5"])]}
    return metrics


def stage_scaling(args: Args, columns: Columns, test_records: list[dict], in_memory: bool = False) -> dict:
    """Fig. 7: {caption type: [metrics at each size]}; CLIP from scratch on the first n samples, one epoch.

    `columns`: the training samples (a manifest or shards, common.columns.Columns); their images are decoded lazily
    by common.clip_train's trainer and the test images at each evaluation, or, `in_memory` (the miniature world),
    both preprocessed once for every run."""
    fields = caption_fields(args, columns)
    usable = usable_rows(columns, list(fields.values()), args.strict)  # rows with every caption type
    sizes = sorted(n for n in args.sizes if n <= len(usable))
    if not sizes:
        raise ManifestError(f"--sizes {args.sizes}: none fits the {len(usable)} usable training samples")
    if args.benchmark:
        check_benchmarks(args.benchmark, args.benchmark_root)  # before any point trains
    _, preprocess, _ = create_clip(args.clip_model)
    images = preprocess_images(columns, preprocess) if in_memory else columns  # (N, 3, H, W) shared, or lazy
    test_images = preprocess_images(test_records, preprocess) if in_memory else ImageRows(test_records, preprocess)
    curves = {kind: [] for kind in [*fields, MIX]}
    for kind in curves:
        for n in sizes:
            steps = max(1, math.ceil(args.scaling_epochs * n / args.clip_batch_size))
            model, preprocess, tokenizer = create_clip(args.clip_model, seed=args.seed)
            config = TrainConfig(steps=steps, batch_size=args.clip_batch_size, lr=args.clip_lr,
                                 warmup=max(1, steps // 10), seed=args.seed)
            train_log = train_clip(model, tokenizer, images, ArmTexts(columns, kind, fields), config,
                                   preprocess=preprocess, rows=usable[:n], device=args.device, strict=args.strict,
                                   progress=False)
            metrics = evaluate_clip(model, tokenizer, preprocess, test_records, test_images)
            if args.benchmark:
                metrics["benchmarks"] = evaluate_benchmarks(
                    model, preprocess, tokenizer, args.benchmark, args.benchmark_root, model_label=args.clip_model,
                    pretrained=f"scaling {kind} n={n} seed={args.seed}")
            final_loss = train_log["history"][-1]["loss"]
            curves[kind].append({"samples": n, "steps": steps, "final_loss": final_loss, **metrics})
            log.info("scaling %s n=%d: R@5 %.1f", kind, n, metrics["retrieval_R@5"])
    return {"sizes": sizes, "curves": curves}


PLOTTED = {"retrieval_R@5": "retrieval R@5 (mean of both ways)", "zeroshot_attributes": "zero-shot attributes",
           "zeroshot_entity": "zero-shot entity names"}


def plot_scaling(runs: list[dict], path: Path) -> None:
    """One panel per metric, one line per caption type (mean over seeds, bars: std), log-scale data size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in PLOTTED if m in runs[0]["curves"]["raw"][0]]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for kind in runs[0]["curves"]:
            values = np.array([[point[metric] for point in run["curves"][kind]] for run in runs])  # (seeds, sizes)
            reference = kind == "teacher"  # the teacher's own fusion: a reference line, not an arm of the comparison
            axis.errorbar(runs[0]["sizes"], values.mean(0), yerr=values.std(0), marker="o", capsize=3,
                          linestyle="--" if reference else "-", label=f"{kind} (reference)" if reference else kind)
        axis.set(xscale="log", xlabel="training samples", ylabel="%", title=PLOTTED[metric])
    axes[0][0].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_scaling(args: Args) -> dict:
    """The `scaling` stage over manifests: stage_scaling on --data, evaluated on --scaling-data; rank 0 writes
    out/scaling.json, out/scaling.png and, with --benchmark, the clip_benchmark rows of every point."""
    result = stage_scaling(args, index_data(args.data), read_manifest(args.scaling_data))
    if int(os.environ.get("RANK", 0)) == 0:  # every rank evaluated the same weights; one writes
        atomic_write_text(Path(args.out) / "scaling.json", json.dumps(result, indent=2))
        plot_scaling([result], Path(args.out) / "scaling.png")
        if args.benchmark:
            write_benchmark_results([row for points in result["curves"].values() for point in points
                                     for row in point["benchmarks"]], args.out)
    return result


# =============================================================================================
# The miniature pipeline (default run)
# =============================================================================================


def miniature_fuser(records: list[dict], folder: Path, seed: int) -> Path:
    """A tiny random Llama and its word-level tokenizer, built from the world's text, saved as a base model."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    counts = Counter(word for r in records for field in ("alt_text", "synthetic_caption", "fused")
                     for word, _ in split.pre_tokenize_str(r[field]))
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    # words seen twice (one-off file names like IMG_1234 become <unk>) and every word of the prompt
    prompt_words = {w for w, _ in split.pre_tokenize_str(FUSION_PROMPT)}
    vocabulary = special + sorted({w for w, c in counts.items() if c >= 2} | prompt_words)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.pre_tokenizer = split
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    instruction = FUSION_PROMPT.split("\n")[0]
    backend.add_tokens([AddedToken(instruction, normalized=False)])  # the fixed instruction reads as one token
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", clean_up_tokenization_spaces=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    save_pretrained_atomically(LlamaForCausalLM(config), tokenizer, folder)
    return folder


def summary_table(fusion: list[dict], scaling: list[dict], args: Args, seconds: float) -> str:
    """Markdown: fusion quality per caption source, then the scaling curves (mean ± std over seeds)."""
    def cell(values):
        return mean_spread(values, digits=1)

    columns = ("names_kept", "raw_names_kept", "hallucinated", "BLEU-4", "CIDEr", "length")
    note = table_note(row for run in fusion for row in run.values())  # how BLEU-4 and CIDEr were tokenized
    lines = [f"# CapsFusion in the miniature world ({args.seeds} seed(s), {seconds / 60:.1f} min)", "",
             "Fusion quality on the test split. teacher = the world's template `fused`, a function of the raw and "
             "synthetic captions (stands in for ChatGPT); fuser = the tiny Llama distilled from it (CapsFus-LLaMA's "
             "part); BLEU-4/CIDEr against the teacher" + (f" ({note})" if note else "") + ".", "",
             "| captions | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in fusion[0]:
        cells = [cell([run[row][c] for run in fusion]) if c in fusion[0][row] else "-" for c in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    sizes = scaling[0]["sizes"]
    for metric, title in PLOTTED.items():
        lines += ["", f"Scaling, {title}, by training samples (one epoch each; fused = the fuser's fusion of the "
                  "training split, teacher = the teacher's, a reference):", "",
                  "| captions | " + " | ".join(map(str, sizes)) + " |", "|---" * (len(sizes) + 1) + "|"]
        for kind in scaling[0]["curves"]:
            lines.append(f"| {kind} | " + " | ".join(cell([run["curves"][kind][i][metric] for run in scaling])
                                                    for i in range(len(sizes))) + " |")
    return "\n".join(lines) + "\n"


def run_miniature(args: Args) -> dict:
    """sft -> fuse (test and train splits) -> eval -> scaling on worlds of seeds seed..; table, plot, JSON in out/."""
    began, out = time.time(), Path(args.out)
    fusion, scaling, timings = [], [], []
    for seed in range(args.seed, args.seed + args.seeds):  # sft -> fuse -> eval -> scaling per seed
        folder, run = ensure_world(dataclasses.replace(args.world, seed=seed)), out / f"seed{seed}"
        train_records, test_records = read_manifest(folder / "train.jsonl"), read_manifest(folder / "test.jsonl")
        clock = {"start": time.time()}
        base = miniature_fuser(train_records, run / "base", seed)
        sft_args = dataclasses.replace(args, **MINIATURE_SFT, base_model=str(base), seed=seed, out=str(run),
                                       resume=False, raw_field="alt_text", synthetic_field="synthetic_caption",
                                       fused_field="fused")
        stage_sft(sft_args, train_records)
        clock["sft"] = time.time()
        fuse_args, fused = dataclasses.replace(sft_args, llm=str(run / "fuser"), out_field="capsfus"), {}
        # the test split for eval; the training samples that scaling uses, as the paper scales the fuser's output
        for split, records in (("test", test_records), ("train", train_records[:max(args.sizes)])):
            path = run / f"{split}.capsfus.jsonl"
            path.unlink(missing_ok=True)
            stage_fuse(dataclasses.replace(fuse_args, out=str(path)), records)
            fused[split] = read_manifest(path)
        clock["fuse"] = time.time()
        fusion.append(stage_eval(dataclasses.replace(fuse_args, out=str(run)), fused["test"]))
        clock["eval"] = time.time()
        scaling.append(stage_scaling(fuse_args, index_manifest(run / "train.capsfus.jsonl"), test_records,
                                     in_memory=True))  # fused: `capsfus`; teacher: `fused`
        clock["scaling"] = time.time()
        timings.append({stage: clock[stage] - clock[previous] for previous, stage in zip(clock, list(clock)[1:])})
        print(f"seed {seed}: fuser names kept {fusion[-1]['fuser']['names_kept']:.1f}%, CIDEr vs teacher "
              f"{fusion[-1]['fuser']['CIDEr']:.1f}; stage seconds {timings[-1]}", flush=True)
    seconds = time.time() - began
    plot_scaling(scaling, out / "scaling.png")
    results = {"seeds": list(range(args.seed, args.seed + args.seeds)), "fusion": fusion, "scaling": scaling,
               "stage_seconds": timings, "seconds": seconds,
               "world": dataclasses.asdict(args.world)}
    return write_results(out, summary_table(fusion, scaling, args, seconds), results)
