"""DiCO's miniature experiment and evaluation tables: XE, then DiCO and SCST from the same XE checkpoint, then eval.

`run_miniature` (what `python dico.py miniature` and reproduce.py run) repeats the experiment per seed and writes
results.md, results.json and training.png; `run_eval` (the `eval` stage of dico.py: `run_eval_stage`) captions a
split with each checkpoint and writes its metrics, captions and Markdown table. It imports dico.py and calls its
functions as `dico.<name>` (what a test patches there is what runs here); dico.py imports it only inside `main`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from common.caption_metrics import table_note
from common.caption_sources import image_bank_of, load_split
from common.clip_captioner import model_from_checkpoint
from common.data import atomic_write_text, image_path, write_results
from common.run_folder import weights_digest
import dico
from dico import Args

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
    bank = image_bank_of(args, records)
    models, kept, done = {}, [], {}
    for path in checkpoints:
        payload = dico.load_checkpoint(path)
        name = f"{Path(path).parent.name}/{Path(path).stem}"
        digest = weights_digest(payload)  # a fine-tuning's best.pt may be its last.pt, or the XE model (step 0)
        if digest not in done:
            model, vocab = model_from_checkpoint(payload, args.device)
            items: dict = {}
            metrics, captions, kept = dico.evaluate(args, model, vocab, bank, args.eval_images, items)
            done[digest] = {**metrics, "per_item": items}, captions, kept
        metrics, captions, kept = done[digest]
        models[name] = dict(metrics)
        lines = [json.dumps({"id": records[i]["id"], "image": str(image_path(records[i])), "caption": c,
                             "refs": records[i]["refs"]}) for i, c in zip(kept, captions)]  # stages chain through files
        atomic_write_text(out / f"captions-{name.replace('/', '-')}.jsonl", "\n".join(lines) + "\n")
    gt = dico.caption_metrics(args, bank, kept, [records[i]["caption"] for i in kept])  # the same images
    results = {"ground truth": {**gt, "images": len(kept)}, **models}
    for metrics in results.values():
        metrics["unreadable_images"] = bank.skipped.count
    if bank.skipped.count:
        print(f"[eval] {bank.skipped.count} unreadable images skipped, e.g. {bank.skipped.examples[:3]}")
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=1))
    atomic_write_text(out / "table.md", markdown_table({name: [m] for name, m in results.items()}))
    print(markdown_table({name: [m] for name, m in results.items()}))
    return results


def run_eval_stage(args: Args) -> dict:
    """The eval stage: `run_eval` of --checkpoints (default: the <out>/{xe,dico,scst}/best.pt that exist)."""
    checkpoints = args.checkpoints or [str(p) for a in ("xe", "dico", "scst")
                                       if (p := Path(args.out) / a / "best.pt").exists()]
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoints to evaluate: pass --checkpoints or train into {args.out} first")
    return run_eval(args, checkpoints, Path(args.out) / "eval")


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
        dico.train(seed_args, "xe")
        marks.append(("xe", clocks()))
        xe_best = str(Path(seed_args.out) / "xe" / "best.pt")
        for algo in ("dico", "scst"):
            dico.train(dataclasses.replace(seed_args, algo=algo, init=xe_best), algo)
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
    results = {"per_seed": per_seed, "minutes": minutes, "stage_seconds": stage_seconds, "plot": str(plot)}
    write_results(args.out, header + table, results)
    return {**results, "table": table}
