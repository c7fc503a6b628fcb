"""CLIP with Quality Captions' miniature experiment: DataComp against DataCompDR pretraining on the miniature world,
each probed for segmentation and depth, on nested subsets, and their attention distances; tables and plots.

`python clip_quality.py miniature ...` and reproduce.py run it (clip_quality.main imports this module when it needs
it; clip_quality's efficiency and attention stages import their writers, JSON and plot). It runs the stages of
clip_quality.py on its Args and writes results.md with the measured tables only: the paper's claims are judged by
reproduce.py (results/claims.md), by the one verdict rule of common/claims.py (docs/clip_quality.md).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import clip_quality as cq
from common.claims import mean_spread
from common.data import atomic_write_text, write_results


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def attention_group(label: str) -> str:
    """The panel a model's attention is plotted in: its regime for our checkpoints (`datacompdr-n5000-seed1` ->
    `datacompdr`), else the label itself (an open_clip tag, an untrained model)."""
    match = re.fullmatch(r"(.+)-n\d+-seed\d+", label)
    return match.group(1) if match else label


def attention_by_group(results: dict) -> dict[str, list[str]]:
    """{group: labels of its models}, in the order the models were measured."""
    groups: dict[str, list[str]] = {}
    for label in results:
        groups.setdefault(attention_group(label), []).append(label)
    return groups


def plot_attention(results: dict, path: Path) -> None:
    """One panel per group (regime): x = layer, one dot per head and model, a line per model through its head means,
    and a dashed line at uniform attention (every patch alike)."""
    plt = _pyplot()
    groups = attention_by_group(results)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.4 * len(groups), 3.4), sharey=True, squeeze=False)
    for ax, (group, labels) in zip(axes[0], groups.items()):
        for colour, label in enumerate(labels):
            per_layer = results[label]["per_layer_per_head_px"]
            layers = range(1, len(per_layer) + 1)
            for layer, heads in zip(layers, per_layer):
                ax.scatter([layer] * len(heads), heads, s=10, color=f"C{colour}", alpha=0.6)
            ax.plot(list(layers), [np.mean(heads) for heads in per_layer], color=f"C{colour}", label=label)
        ax.axhline(results[labels[0]]["uniform_px"], color="grey", linestyle="--", label="uniform attention")
        ax.set_title(f"{group} ({len(labels)} model{'s' * (len(labels) > 1)})", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(list(layers))
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("mean attention distance (px)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_efficiency(rows: Sequence[dict], path: Path) -> None:
    """mIoU and depth RMSE against the number of pretraining images, one line per regime (mean +- std over seeds)."""
    plt = _pyplot()
    metrics = [m for m in ("mIoU", "depth_RMSE") if m in rows[0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for regime in dict.fromkeys(r["regime"] for r in rows):
            sizes = sorted({r["train_images"] for r in rows if r["regime"] == regime})
            values = [[r[metric] for r in rows if r["regime"] == regime and r["train_images"] == n] for n in sizes]
            ax.errorbar(sizes, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker="o",
                        capsize=3, label=regime)
        ax.set_xscale("log")
        ax.set_xlabel("pretraining images")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_efficiency(rows: Sequence[dict], out: Path) -> None:
    """The efficiency stage's efficiency.json and its plot, efficiency.png, in `out`."""
    atomic_write_text(out / "efficiency.json", json.dumps(rows, indent=2))
    plot_efficiency(rows, out / "efficiency.png")


def write_attention(results: dict, out: Path) -> None:
    """The attention stage's attention.json and its plot, attention.png, in `out`."""
    atomic_write_text(out / "attention.json", json.dumps(results, indent=2))
    plot_attention(results, out / "attention.png")


def summarise(rows: Sequence[dict], keys: tuple[str, ...], metrics: Sequence[str]) -> dict:
    """{values of `keys`: {metric: its values over the rows that have them}}, in the order the rows come."""
    groups: dict = {}
    for row in rows:
        group = groups.setdefault(tuple(row[k] for k in keys), {})
        for metric in (m for m in metrics if m in row):
            group.setdefault(metric, []).append(row[metric])
    return groups


def report_text(pretrain: list, probe: list, efficiency: list, attention: dict, baselines: dict,
                 seconds: float) -> str:
    """The text of results.md: the measured tables; the claims are reproduce.py's to judge (results/claims.md)."""
    pre = summarise(pretrain, ("regime",), ["i2t_R@1", "t2i_R@1", "zeroshot_shape", "zeroshot_entity"])
    by_regime = [{**p, "regime": next((r["regime"] for r in pretrain if r["checkpoint"] == p["checkpoint"]),
                                      "random init")} for p in probe]
    dense = summarise(by_regime, ("regime",), ["mIoU", "mAcc", "depth_RMSE"])
    fmt = lambda s, m: mean_spread(s[m]) if m in s else "-"  # noqa: E731
    lines = ["# CLIP with Quality Captions on the miniature world",
             "", "A controlled experiment on synthetic shapes, not evidence about real data.",
             f"Seeds: {len({r['seed'] for r in pretrain})}; wall time {seconds:.0f} s.", "",
             "| regime | i2t R@1 | t2i R@1 | zero-shot shape | zero-shot entity | probe mIoU | probe mAcc "
             "| depth RMSE (m) |", "|---|---|---|---|---|---|---|---|"]
    for regime in list(pre) + [("random init",)]:  # the untrained encoder is the floor every regime must beat
        p, d = pre.get(regime, {}), dense.get(regime, {})
        lines.append(f"| {regime[0]} | {fmt(p, 'i2t_R@1')} | {fmt(p, 't2i_R@1')} | {fmt(p, 'zeroshot_shape')} | "
                     f"{fmt(p, 'zeroshot_entity')} | {fmt(d, 'mIoU')} | {fmt(d, 'mAcc')} | {fmt(d, 'depth_RMSE')} |")
    if "majority_class_mIoU" in baselines:  # no encoder at all: the floors of the dense columns
        lines.append(f"| (no encoder) class {baselines['majority_class']} at every pixel | - | - | - | - | "
                     f"{baselines['majority_class_mIoU']:.2f} | {baselines['majority_class_mAcc']:.2f} | - |")
    if "position_only_depth_RMSE" in baselines:
        lines.append(f"| (no encoder) each pixel's mean training depth | - | - | - | - | - | - | "
                     f"{baselines['position_only_depth_RMSE']:.2f} |")
    lines += ["", "Data efficiency (probe on encoders pretrained on nested subsets, same steps):", "",
              "| regime | pretraining images | mIoU | depth RMSE (m) |", "|---|---|---|---|"]
    for (regime, n), group in summarise(efficiency, ("regime", "train_images"), ["mIoU", "depth_RMSE"]).items():
        lines.append(f"| {regime} | {n} | {np.mean(group['mIoU']):.2f} | {np.mean(group['depth_RMSE']):.3f} |")
    uniform = next(iter(attention.values()))["uniform_px"] if attention else float("nan")
    lines += ["", f"Mean attention distance (px) per layer, heads averaged [min-max over heads]; uniform attention "
              f"(every patch alike) gives {uniform:.1f} px:", ""]
    for label, result in attention.items():
        layers = ", ".join(f"L{i + 1} {np.mean(h):.1f} [{min(h):.1f}-{max(h):.1f}]"
                           for i, h in enumerate(result["per_layer_per_head_px"]))
        lines.append(f"- {label}: {layers}")
    lines += ["", "The paper's claims (dense transfer, 10x data efficiency, more local deep heads, each against its "
              "control and the no-encoder floors) are judged from these runs by reproduce.py, by the one verdict "
              "rule of common/claims.py: see its results/claims.md."]
    return "\n".join(lines) + "\n"


def run_miniature(args: cq.Args, records: dict) -> dict:
    """Every stage on the miniature world (or the given manifests): pretraining in each regime and seed, the probes
    of each model and of untrained encoders, the no-encoder floors, the efficiency subsets (the full-set runs
    reused), every model's attention distances; results.md and results.json in --out."""
    out, start = Path(args.out), time.time()
    pretrain = cq.run_pretrain(args, records)
    probe = cq.run_probe(args, records, [r["checkpoint"] for r in pretrain] + ["random"], out / "probe.json")
    baselines = cq.run_baselines(args, records)
    efficiency = cq.run_efficiency(args, records, done=pretrain, probed=probe)
    # every seed's model of each regime (the claim compares regimes over models), and an untrained one
    attention = cq.run_attention(args, records, [r["checkpoint"] for r in pretrain] + [args.model])
    report = report_text(pretrain, probe, efficiency, attention, baselines, time.time() - start)
    results = {"pretrain": pretrain, "probe": probe, "baselines": baselines, "efficiency": efficiency,
               "attention": attention, "seconds": time.time() - start, "args": dataclasses.asdict(args)}
    return write_results(out, report, results)
