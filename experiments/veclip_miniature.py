"""VeCLIP's miniature experiment: the same small CLIP trained on AltText only, VeC only, LLM-VeC only and the
AltText/LLM-VeC mix, same steps and image batches, on the miniature world; a table and a bar chart.

`python veclip.py miniature ...` and reproduce.py run it (veclip.main imports this module when it needs it); it takes
veclip.Args and trains and evaluates through veclip.train and veclip.evaluate (docs/veclip.md).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

import veclip
from common.clip_eval import preprocess_images
from common.clip_train import create_clip
from common.columns import index_manifest
from common.claims import mean_spread
from common.data import read_manifest, write_results
from common.miniature import ensure_world, zero_shot_tasks

# condition: (alt_field, llm_vec_field, p_alt); the world's fields stand in for LLaVA and Vicuna
CONDITIONS = {"AltText": ("alt_text", "fused", 1.0), "VeC": ("alt_text", "synthetic_caption", 0.0),
              "LLM-VeC": ("alt_text", "fused", 0.0), "AltText+LLM-VeC mix": ("alt_text", "fused", 0.5)}
COLUMNS = {"i2t_R@1": "I->T R@1", "i2t_R@5": "I->T R@5", "t2i_R@1": "T->I R@1", "t2i_R@5": "T->I R@5",
           "zeroshot_attributes": "zero-shot attributes", "zeroshot_entity": "zero-shot entity"}
PLOTTED = ("i2t_R@1", "zeroshot_attributes", "zeroshot_entity")  # the metrics of the paper's claims


def markdown_table(summary: dict, args: veclip.Args, seconds: float) -> str:
    """The comparison as Markdown: mean (± std over seeds) per condition and metric, in percent."""
    lines = [f"# VeCLIP in the miniature world ({args.seeds} seed(s), {args.steps} steps of batch {args.batch_size}, "
             f"{args.model}, {seconds / 60:.1f} min)", "",
             f"Retrieval against the `{args.text_field}` of {args.world.n_test} test images (the world's `refs`: "
             f"{args.world.n_refs} human references per image of varying detail, which no condition trains on); "
             "zero-shot attributes = mean of background, shape and colour; entity = the 12 emblem names; short "
             "class-name prompts. VeC = the world's `synthetic_caption` (stands in for LLaVA), LLM-VeC = the world's "
             f"`fused` (stands in for Vicuna; forgets each alt-text name with probability {args.world.llm_forget}). "
             "A controlled toy world: these numbers show a mechanism, not the paper's effect sizes.", "",
             "| training captions | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for condition, metrics in summary.items():
        cells = [mean_spread(metrics[k], digits=1) for k in COLUMNS]
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chance_levels(records: list[dict]) -> dict:
    """A random guess's zero-shot accuracy in percent, per plotted task (attributes: the mean of its three tasks)."""
    guess = {task: 100 / len(spec["classes"]) for task, spec in zero_shot_tasks(records).items()}
    return {"zeroshot_attributes": float(np.mean([guess[t] for t in ("background", "shape", "color")])),
            "zeroshot_entity": guess["entity"]}


def conditions_figure(summary: dict, chance: dict):
    """The claims' metrics as bars, one panel per metric and one bar per condition: mean over seeds, error bar = std
    over seeds (0 with one seed), a dashed line at chance on the zero-shot panels. Rendered by Agg without pyplot:
    no display, no global figure state in a process that runs all five papers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(PLOTTED), 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    seeds = len(next(iter(summary.values()))[PLOTTED[0]])
    figure.suptitle(f"VeCLIP in the miniature world ({seeds} seed{'s' * (seeds > 1)}; mean ± std over seeds)")
    for axis, metric in zip(figure.subplots(1, len(PLOTTED)), PLOTTED):
        values = [summary[condition][metric] for condition in summary]
        axis.bar(range(len(summary)), [np.mean(v) for v in values], yerr=[np.std(v) for v in values], capsize=4,
                 color=[f"C{i}" for i in range(len(summary))])
        if metric in chance:
            axis.axhline(chance[metric], color="grey", linestyle="--", label="chance")
            axis.legend(fontsize=8)
        axis.set_xticks(range(len(summary)), [c.replace(" mix", "\nmix") for c in summary], fontsize=8)
        axis.set(title=COLUMNS[metric], ylabel="%")
    return figure


def run_miniature(args: veclip.Args) -> dict:
    """Train the same CLIP on each caption condition of the world, seeds 0..seeds-1; write the table and the plot."""
    began, out = time.time(), Path(args.out)
    runs, per_item = {condition: [] for condition in CONDITIONS}, {}
    for seed in range(args.seeds):
        folder = ensure_world(dataclasses.replace(args.world, seed=seed))
        train_records, test_records = read_manifest(folder / "train.jsonl"), read_manifest(folder / "test.jsonl")
        _, preprocess, _ = create_clip(args.model)
        pixel_cache = preprocess_images(train_records, preprocess)  # (N, 3, H, W), shared by the conditions
        columns = index_manifest(folder / "train.jsonl")
        test_pixels = preprocess_images(test_records, preprocess)
        for condition, (alt_field, llm_vec_field, p_alt) in CONDITIONS.items():
            slug = condition.split()[0].replace("+", "_").lower()
            run_args = dataclasses.replace(args, alt_field=alt_field, llm_vec_field=llm_vec_field, p_alt=p_alt,
                                           seed=seed, resume=False, out=str(out / f"seed{seed}" / slug))
            model, preprocess, tokenizer, train_log = veclip.train(run_args, columns, pixel_cache)
            per_item[condition] = {}  # the last seed's, for a one-seed verdict (reproduce.py's paired bootstrap)
            metrics = veclip.evaluate(model, tokenizer, preprocess, test_records, run_args, images=test_pixels,
                               per_item=per_item[condition])
            metrics.update(final_loss=train_log["history"][-1]["loss"], train_seconds=train_log["train_seconds"])
            runs[condition].append(metrics)
            print(f"seed {seed} {condition}: " + ", ".join(f"{k} {metrics[k]:.1f}" for k in COLUMNS), flush=True)
    summary = {c: {k: [m[k] for m in ms] for k in ms[0]} for c, ms in runs.items()}
    seconds = time.time() - began
    plot = out / "conditions.png"
    conditions_figure(summary, chance_levels(test_records)).savefig(plot, dpi=120)
    results = {"conditions": summary, "per_item": per_item, "seeds": args.seeds, "steps": args.steps,
               "batch_size": args.batch_size, "model": args.model, "world": dataclasses.asdict(args.world),
               "seconds": seconds, "plot": str(plot)}
    return write_results(out, markdown_table(summary, args, seconds), results)
