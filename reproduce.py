"""The main job: all five papers in miniature, and one table of their claims.

It builds the miniature world (common/miniature.py), trains (once, then cached) the small CLIP
that scores captions there, measures what each caption variant of the world is worth, then runs
each paper file's default miniature run in turn (VeCLIP, CapsFusion, Altogether, DiCO, CLIP with
Quality Captions) and checks each paper's claims against what the run measured:

    python reproduce.py                # one seed, about 10 minutes on 2 idle CPU cores (world and scorer included)
    python reproduce.py --jobs 1       # one stage after another in one process, every line on the terminal
    python reproduce.py --seeds 3      # mean and spread over seeds 0, 1, 2 (about 3x as long)
    python reproduce.py --papers dico veclip --seeds 3

Writes results/claims.md (+ .json): one row per claim with the numbers (mean ± std over seeds) and a
verdict; results/world.md (+ .json); and each paper's own tables and plots under results/<paper>/.
Two stages run side by side by default (`--jobs 2`), each in a process of its own whose output goes
to results/logs/<stage>.txt (common/stages.py). Rows of papers not rerun are kept from an earlier
run with the same seeds and world, so `--papers dico` refreshes DiCO's rows alone. A verdict
compares two means against their spread over seeds, by the one rule in common/claims.py (`verdict`):
"held" when the difference has the claimed sign and exceeds the sum of the two standard deviations,
"reversed" when it has the opposite sign by as much, "within seed spread" otherwise. With one seed
there is no spread to judge against: the difference is judged against the test set's own noise
instead, by a paired bootstrap over the test items (common/claims.py `paired_bootstrap`: "held on
this seed", "reversed on this seed", "within test-set noise", with its 95% interval), which says
nothing of seed-to-seed variance (run `--seeds 3` for that); a row without per-item values says "1
seed: no verdict".

The miniature world is a controlled experiment, not the papers' data: a claim that holds here has
been shown possible under controlled conditions; one that does not is a finding to explain (each
paper file's header and docs/<paper>.md say why), never a number to tune.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import tyro

from common.caption_metrics import plain_words
from common.claims import Relation, mean_spread, paired_bootstrap, reason, verdict
from common.clip_score import load_clip, ref_clip_s
from common.clip_train import MINIATURE_MODEL, SCORER_TRAINING, TrainConfig, ensure_miniature_scorer
from common.data import atomic_write_text, image_path, read_manifest
from common.stages import Stage, run_stages
from common.miniature import SWAP_TYPES, WorldConfig, ensure_world, hallucinated_words, names_kept, world_statistics

VARIANTS = ("caption", "alt_text", "synthetic_caption", "fused")
SWAP_TARGET = 90.0  # % of one-swap pairs the scorer should rank right, per swap type
SWAP_BLIND = 80.0  # below this % a swap type is a blind spot of the scorer, named on the claims that rest on it
Paper = Literal["veclip", "capsfusion", "altogether", "dico", "clip_quality"]
PAPERS: tuple[Paper, ...] = ("veclip", "capsfusion", "altogether", "dico", "clip_quality")


@dataclass
class Args:
    """Reproduce in miniature: the world, its scorer, the caption variants, then every paper's claims."""

    seeds: int = 1
    """seeds 0..seeds-1 for the world table and for every paper's run; tables show mean ± std"""
    papers: tuple[Paper, ...] = PAPERS
    """paper files to run (none: `--papers` with no value runs the world table only)"""
    paper_args: tuple[str, ...] = ()
    """extra arguments for one paper's run, as NAME=ARGS, e.g. "dico=--steps 60" (repeatable)"""
    world: WorldConfig = WorldConfig()
    """the miniature world's knobs, passed on to every paper; the world table uses world seed = run seed
    (so does veclip.py), the other papers keep world seed 0 and vary their training seed"""
    scorer: TrainConfig = SCORER_TRAINING
    """how the world's scorer is trained (its seed is replaced by each run's seed)"""
    scorer_model: str = MINIATURE_MODEL
    """open_clip architecture of the scorer"""
    out: str = "results"
    """folder for claims.{md,json}, world.{md,json} and one subfolder per paper"""
    jobs: int = 2
    """stages run side by side, each in a process of its own with cores / jobs threads (common/stages.py), its output
    in OUT/logs/<stage>.txt; on 2 cores two processes get through about a third more work than one; 1 = one stage
    after another in this process, every line on the terminal"""
    reuse: bool = False
    """judge OUT/<paper>/results.json where it exists instead of running that paper (e.g. after running
    the paper files by hand with the same seeds into those folders)"""


# =============================================================================================
# The world table: what each caption variant is worth under the world's scorer
# =============================================================================================


def score_variants(seed: int, args: Args) -> dict:
    """One seed: the scorer's own quality and every caption variant's scores on the test split."""
    world = dataclasses.replace(args.world, seed=seed)
    began = time.time()
    folder = ensure_world(world)
    world_seconds = time.time() - began
    checkpoint = ensure_miniature_scorer(world, dataclasses.replace(args.scorer, seed=seed), args.scorer_model)
    scorer_seconds = time.time() - began - world_seconds
    scorer_metrics = torch.load(checkpoint, map_location="cpu", weights_only=True)["test_metrics"]
    bundle = load_clip(args.scorer_model, pretrained=str(checkpoint), device="cpu")
    records = read_manifest(folder / "test.jsonl")
    images = [image_path(r) for r in records]
    refs = [r["refs"] for r in records]  # the human references, of varying specificity
    variants = {}
    for field in VARIANTS:
        texts = [r[field] for r in records]
        result = ref_clip_s(bundle, images, texts, refs, progress=False)
        kept, total = np.sum([names_kept(t, r) for t, r in zip(texts, records)], axis=0)
        variants[field] = {"CLIP-S": result["score"]["mean"], "RefCLIP-S": result["mean"],
                           "names_kept_%": 100.0 * kept / max(total, 1),
                           "hallucinated_words": float(np.mean([len(hallucinated_words(t, r))
                                                                for t, r in zip(texts, records)]))}
    return {"seed": seed, "scorer": scorer_metrics, "variants": variants, "seconds": {
                "world": world_seconds, "scorer": scorer_seconds,
                "variants": time.time() - began - world_seconds - scorer_seconds},
            "world_statistics": world_statistics(read_manifest(folder / "train.jsonl"))}


def world_markdown(runs: list[dict]) -> str:
    """The world as Markdown tables: the scorer's quality, then one row per caption variant."""
    n = len(runs)
    lines = [f"# The miniature world ({n} seed{'s' * (n > 1)}; mean ± std over seeds)", "",
             "A controlled experiment, not the papers' data.", "",
             "## The scorer (a small CLIP trained on the ground-truth captions with hard negatives), test split", "",
             "| metric | value |", "|---|---|"]
    for key in runs[0]["scorer"]:
        if key != "train_seconds" and not key.startswith("swap_"):
            lines.append(f"| {key} | {mean_spread([r['scorer'][key] for r in runs])} |")
    lines += ["", "## Does the scorer see what captions say? A swap test", "",
              "For each test image, the ground-truth caption against the same caption with one thing changed "
              "(`common.miniature.swapped_captions`, SugarCrepe-style): the % of images where the scorer ranks the "
              f"true caption higher (chance: 50%). Target: {SWAP_TARGET:.0f}% for each type. The scorer is trained "
              "with hard negatives of the same kinds (NegCLIP) on the training images, so this measures them on unseen "
              "images, as NegCLIP's numbers on ARO do.", "",
              "| swap | what changes | scorer accuracy % | target |", "|---|---|---|---|"]
    what = {"color": "one object's colour", "shape": "one object's shape", "size": "one object's size",
            "position": "the objects' places (one object: moved)", "background": "the background",
            "name": "an emblem's name", "binding": "the two objects' colours exchanged (same words)"}
    for kind in SWAP_TYPES:
        values = [r["scorer"][f"swap_{kind}"] for r in runs if f"swap_{kind}" in r["scorer"]]
        if values:
            short = np.mean(values) < SWAP_TARGET
            lines.append(f"| {kind} | {what[kind]} | {mean_spread(values, 1)} | "
                         f"{f'short by {SWAP_TARGET - np.mean(values):.1f} points' if short else 'met'} |")
    lines += ["", "## Caption variants of the test split under that scorer", "",
              "| variant | CLIP-S | RefCLIP-S (refs: the human references) | names kept % "
              "| hallucinated words / caption |",
              "|---|---|---|---|---|"]
    for field in VARIANTS:
        cells = [mean_spread([r["variants"][field][key] for r in runs])
                 for key in ("CLIP-S", "RefCLIP-S", "names_kept_%", "hallucinated_words")]
        lines.append(f"| `{field}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# =============================================================================================
# Verdicts: does a claimed difference show, beyond the spread over seeds?
# =============================================================================================


def claim_row(claim: str, metric: str, a_name: str, a: list[float], b_name: str, b: list[float],
              relation: Relation, digits: int = 2, items: tuple | None = None) -> dict:
    """One row of the claims table: the claim, what was compared, both numbers and the verdict.

    `items`: (a's, b's per-item values on one seed's test items[, statistic]), whose statistic (default: the mean)
    is the metric; with one seed the verdict is then the paired bootstrap's over those items
    (common.claims.paired_bootstrap), its 95% interval in the row."""
    row = {"claim": claim,
           "measured": f"{metric}: {a_name} {mean_spread(a, digits)} vs {b_name} {mean_spread(b, digits)}",
           "metric": metric, "verdict": verdict(a, b, relation), "why": reason(a, b, relation), "a": a, "b": b}
    if min(len(a), len(b)) == 1 and items is not None:
        test = paired_bootstrap(items[0], items[1], relation, statistic=items[2] if len(items) > 2 else None)
        low, high = test["interval"]
        row.update(verdict=test["verdict"], bootstrap=test,
                   why=f"difference {test['difference']:+.3g} in the claimed direction, 95% interval "
                       f"[{low:+.3g}, {high:+.3g}] over {test['items']} test items")
    elif min(len(a), len(b)) == 1:
        row["why"] = "one seed, and no per-item values to judge the difference against the test set's noise"
    return row


def mean_over_tasks(items: list) -> float:
    """The mean over tasks of each task's mean, from per-image rows [task 1's value, task 2's, ...] (None where an
    image is not in a task): veclip's `zeroshot_attributes`, resampled by image."""
    columns = [[value for value in column if value is not None] for column in zip(*items)]
    return float(np.mean([np.mean(column) for column in columns if column]))


# =============================================================================================
# Each paper: how to run its default miniature run, and its claims over that run's results
# =============================================================================================


def paired(per_item: dict, a: str, b: str, metric: str, statistic=None) -> tuple | None:
    """(a's, b's per-item values of `metric`[, statistic]) from a result's `per_item`, or None where it has none."""
    if metric not in per_item.get(a, {}) or metric not in per_item.get(b, {}):
        return None
    return (per_item[a][metric], per_item[b][metric]) + ((statistic,) if statistic else ())


def veclip_claims(result: dict) -> list[dict]:
    c, items = result["conditions"], result.get("per_item", {})
    names = ("AltText", "VeC", "LLM-VeC", "AltText+LLM-VeC mix")
    alt, vec, llm_vec, mix = (c[k] for k in names)
    pair = lambda a, b, metric, statistic=None: paired(items, a, b, metric, statistic)  # noqa: E731
    return [
        claim_row("Rewritten captions (LLM-VeC) train a better CLIP than alt-text", "I->T R@1 %",
                  "LLM-VeC", llm_vec["i2t_R@1"], "AltText", alt["i2t_R@1"], ">", 1,
                  pair("LLM-VeC", "AltText", "i2t_R@1")),
        claim_row("Fusing alt-text into the VeC (LLM-VeC) beats the VeC alone", "I->T R@1 %",
                  "LLM-VeC", llm_vec["i2t_R@1"], "VeC", vec["i2t_R@1"], ">", 1, pair("LLM-VeC", "VeC", "i2t_R@1")),
        claim_row("The AltText/LLM-VeC mix keeps LLM-VeC's retrieval", "I->T R@1 %",
                  "mix", mix["i2t_R@1"], "LLM-VeC", llm_vec["i2t_R@1"], ">=", 1,
                  pair(names[3], "LLM-VeC", "i2t_R@1")),
        claim_row("The mix adds zero-shot accuracy over LLM-VeC", "zero-shot attributes %",
                  "mix", mix["zeroshot_attributes"], "LLM-VeC", llm_vec["zeroshot_attributes"], ">", 1,
                  pair(names[3], "LLM-VeC", "zeroshot_attributes", mean_over_tasks)),
        claim_row("The mix keeps the alt-text's world knowledge (named entities)", "zero-shot emblem names %",
                  "mix", mix["zeroshot_entity"], "LLM-VeC", llm_vec["zeroshot_entity"], ">", 1,
                  pair(names[3], "LLM-VeC", "zeroshot_entity")),
    ]


def distinct_words(captions: list[str]) -> float:
    """dico.py's `vocab`: the distinct words (lower-cased, punctuation removed) over a set of captions."""
    return float(len({word for caption in captions for word in plain_words(caption)}))


def dico_claims(result: dict) -> list[dict]:
    seeds = list(result["per_seed"].values())
    column = lambda model, metric: [run[model][metric] for run in seeds]  # noqa: E731
    items = {model: run["per_item"] for model, run in seeds[-1].items() if "per_item" in run}  # the last seed's
    pair = lambda a, b, metric, statistic=None: paired(items, a, b, metric, statistic)  # noqa: E731
    return [
        claim_row("DiCO raises the CLIP-based score it optimises over the XE captioner", "PAC-S",
                  "DiCO", column("dico/last", "PAC-S"), "XE", column("xe/best", "PAC-S"), ">", 3,
                  pair("dico/last", "xe/best", "PAC-S")),
        claim_row("DiCO keeps the reference-based quality of XE", "CIDEr",
                  "DiCO", column("dico/last", "CIDEr"), "XE", column("xe/best", "CIDEr"), ">=", 3,
                  pair("dico/last", "xe/best", "CIDEr")),
        claim_row("DiCO stays fluent where SCST on the same reward repeats itself", "repeated 3-grams / caption",
                  "DiCO", column("dico/last", "rep_3gram"), "SCST", column("scst/last", "rep_3gram"), "<", 3,
                  pair("dico/last", "scst/last", "rep_3gram")),
        claim_row("DiCO keeps a more diverse vocabulary than SCST", "distinct words used",
                  "DiCO", column("dico/last", "vocab"), "SCST", column("scst/last", "vocab"), ">", 1,
                  pair("dico/last", "scst/last", "captions", distinct_words)),
        claim_row("DiCO beats SCST on the reference-based CLIP score", "RefPAC-S",
                  "DiCO", column("dico/last", "RefPAC-S"), "SCST", column("scst/last", "RefPAC-S"), ">", 3,
                  pair("dico/last", "scst/last", "RefPAC-S")),
    ]


def capsfusion_claims(result: dict) -> list[dict]:
    fusion = lambda captions, metric: [run[captions][metric] for run in result["fusion"]]  # noqa: E731
    at = lambda kind, index: [run["curves"][kind][index]["retrieval_R@5"] for run in result["scaling"]]  # noqa: E731
    largest = result["scaling"][0]["sizes"][-1]
    last_fusion, last_curves = result["fusion"][-1], result["scaling"][-1]["curves"]  # the last seed's items
    fusion_items = {name: row["per_item"] for name, row in last_fusion.items() if "per_item" in row}
    point_items = lambda kind, index: last_curves[kind][index].get("per_item", {}).get("retrieval_R@5")  # noqa: E731

    def fused(a: str, b: str, metric: str, statistic=None):
        return paired(fusion_items, a, b, metric, statistic)

    def trained(a: str, b: str):
        return (point_items(a, -1), point_items(b, -1)) if point_items(a, -1) and point_items(b, -1) else None

    rows = [claim_row("The fusion keeps the raw caption's world knowledge that synthetic captions lose",
                      "names kept %", "fuser", fusion("fuser", "names_kept"), "synthetic",
                      fusion("synthetic", "names_kept"), ">", 1,
                      fused("fuser", "synthetic", "names_kept", percent_of_sums)),
            claim_row("The distilled fuser is as good as its teacher (ChatGPT in the paper)", "names kept %",
                      "fuser", fusion("fuser", "names_kept"), "teacher", fusion("teacher", "names_kept"), ">=", 1,
                      fused("fuser", "teacher", "names_kept", percent_of_sums)),
            claim_row("Fused captions hallucinate less than synthetic captions", "hallucinated words / caption",
                      "fuser", fusion("fuser", "hallucinated"), "synthetic", fusion("synthetic", "hallucinated"),
                      "<", 2, fused("fuser", "synthetic", "hallucinated")),
            claim_row(f"Fused captions train a better model than raw captions ({largest} samples)", "retrieval R@5 %",
                      "fused", at("fused", -1), "raw", at("raw", -1), ">", 1, trained("fused", "raw")),
            claim_row(f"... than synthetic captions ({largest} samples)", "retrieval R@5 %",
                      "fused", at("fused", -1), "synthetic", at("synthetic", -1), ">", 1,
                      trained("fused", "synthetic")),
            claim_row(f"... than the raw+synthetic mix ({largest} samples)", "retrieval R@5 %",
                      "fused", at("fused", -1), "mix", at("raw+synthetic mix", -1), ">", 1,
                      trained("fused", "raw+synthetic mix"))]
    if len(result["scaling"][0]["sizes"]) > 1:
        gain = lambda kind: [a - b for a, b in zip(at(kind, -1), at(kind, -2))]  # noqa: E731
        each = {kind: [a - b for a, b in zip(point_items(kind, -1), point_items(kind, -2))]
                for kind in ("fused", "synthetic") if point_items(kind, -1) and point_items(kind, -2)}
        rows.append(claim_row("Fused captions keep scaling where synthetic ones saturate", "R@5 gain over the last "
                              "doubling of samples", "fused", gain("fused"), "synthetic", gain("synthetic"), ">", 1,
                              (each["fused"], each["synthetic"]) if len(each) == 2 else None))
    return rows


def percent_of_sums(items: list) -> float:
    """100 * sum(kept) / sum(total) over per-item [kept, total] pairs (names kept %, a ratio of sums)."""
    kept, total = np.sum(items, axis=0) if len(items) else (0, 0)
    return 100.0 * float(kept) / max(float(total), 1.0)


def miou_of_sums(items: list) -> float:
    """mIoU in percent from per-image [true positives, predicted, labelled] pixel counts per class (the dense
    probe's `per_item`, common/dense_probe.py): the mIoU of their summed confusion, classes neither labelled nor
    predicted skipped."""
    true_positive, predicted, labelled = np.sum(np.asarray(items, dtype=float), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = true_positive / (predicted + labelled - true_positive)
    return 100 * float(np.nanmean(iou))


def altogether_claims(result: dict) -> list[dict]:
    rows, items = result["rows"], result.get("per_item", {})
    alt, with_alt, without = rows["alt-text (input)"], rows["Altogether w/ alt"], rows["Altogether w/o alt"]
    synthetic = rows["synthetic caption (world)"]
    names = ("Altogether w/ alt", "alt-text (input)", "Altogether w/o alt", "synthetic caption (world)")
    pair = lambda a, b, metric, statistic=None: paired(items, names[a], names[b], metric, statistic)  # noqa: E731
    return [
        claim_row("Re-aligned captions are better aligned with the image than the alt-text (the headline)",
                  "CLIP-S x 100", "Altogether w/ alt", with_alt["CLIP-S"], "alt-text", alt["CLIP-S"], ">", 1,
                  pair(0, 1, "CLIP-S")),
        claim_row("Re-aligning keeps the alt-text's proper names", "names kept %",
                  "Altogether w/ alt", with_alt["names kept %"], "alt-text", alt["names kept %"], ">=", 1,
                  pair(0, 1, "names kept %", percent_of_sums)),
        claim_row("... which a captioner without the alt-text cannot know", "names kept %",
                  "w/ alt", with_alt["names kept %"], "w/o alt", without["names kept %"], ">", 1,
                  pair(0, 2, "names kept %", percent_of_sums)),
        claim_row("... and a synthetic caption lacks", "names kept %",
                  "w/ alt", with_alt["names kept %"], "synthetic caption", synthetic["names kept %"], ">", 1,
                  pair(0, 3, "names kept %", percent_of_sums)),
        claim_row("Re-aligned captions hallucinate less than the alt-text", "hallucinated words / caption",
                  "w/ alt", with_alt["hallucinated/caption"], "alt-text", alt["hallucinated/caption"], "<", 2,
                  pair(0, 1, "hallucinated/caption")),
        claim_row("The alt-text prompt helps the same model (with vs without alt-text)", "CIDEr x 100",
                  "w/ alt", with_alt["CIDEr"], "w/o alt", without["CIDEr"], ">", 1, pair(0, 2, "CIDEr")),
    ]


def clip_quality_claims(result: dict) -> list[dict]:
    pre = result["pretrain"]
    regime_of = {run["checkpoint"]: run["regime"] for run in pre}
    probes = [{**row, "regime": regime_of.get(row["checkpoint"], row["checkpoint"])} for row in result["probe"]]
    by = lambda rows, regime, key: [r[key] for r in rows if r["regime"] == regime]  # noqa: E731
    hits = {r["regime"]: r["per_item"]["i2t_R@1"] for r in pre if "per_item" in r}  # the last seed's per-image hits
    probe_items = {row["regime"]: row["per_item"] for row in probes if "per_item" in row}  # the last seed's

    def probed(a: str, b: str, metric: str, statistic=None):
        return paired(probe_items, a, b, metric, statistic)

    rows = [claim_row("Training on quality (synthetic) captions gives a better CLIP", "I->T R@1 %",
                      "DataCompDR", by(pre, "datacompdr", "i2t_R@1"), "DataComp", by(pre, "datacomp", "i2t_R@1"),
                      ">", 1, (hits["datacompdr"], hits["datacomp"]) if len(hits) == 2 else None),
            claim_row("Its image encoder transfers better to segmentation", "probe mIoU %",
                      "DataCompDR", by(probes, "datacompdr", "mIoU"), "DataComp", by(probes, "datacomp", "mIoU"),
                      ">", 1, probed("datacompdr", "datacomp", "mIoU", miou_of_sums)),
            claim_row("... and to depth estimation", "probe depth RMSE (m)",
                      "DataCompDR", by(probes, "datacompdr", "depth_RMSE"),
                      "DataComp", by(probes, "datacomp", "depth_RMSE"), "<", 3,
                      probed("datacompdr", "datacomp", "depth_RMSE")),
            claim_row("(control) pretraining helps dense probes at all", "probe mIoU %",
                      "DataCompDR", by(probes, "datacompdr", "mIoU"), "random init", by(probes, "random", "mIoU"),
                      ">", 1, probed("datacompdr", "random", "mIoU", miou_of_sums))]
    efficiency = result["efficiency"]
    sizes = sorted({r["train_images"] for r in efficiency})
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        pick = lambda regime, n, key="mIoU": [r[key] for r in efficiency  # noqa: E731
                                               if r["regime"] == regime and r["train_images"] == n and key in r]
        small_items, large_items = pick("datacompdr", small, "per_item"), pick("datacomp", large, "per_item")
        rows.append(claim_row(f"Data efficiency: DataCompDR on {small} images transfers as well as DataComp on {large}",
                              "probe mIoU %", f"DataCompDR n={small}", pick("datacompdr", small),
                              f"DataComp n={large}", pick("datacomp", large), ">=", 1,
                              (small_items[-1]["mIoU"], large_items[-1]["mIoU"], miou_of_sums)
                              if small_items and large_items else None))
    control = rows[3]
    # no transfer at all: which encoder transfers better is moot
    if control["verdict"] in ("reversed", "within seed spread", "reversed on this seed", "within test-set noise"):
        for row in rows[1:3] + rows[4:]:
            row["verdict"], row["why"] = ("untestable (the control fails)",
                                          "pretrained encoders probe no better than an untrained one")
    if len(sizes) <= 1:
        rows.append({"claim": "Data efficiency: DataCompDR on a tenth of the images transfers as well as DataComp on "
                     "all", "metric": "probe mIoU %", "measured": "not run (one subset)",
                     "verdict": "not run in this job", "why": "only the full set was pretrained: the one-seed job "
                     "leaves the small subset out, as this claim is untestable while the control fails "
                     "(`--seeds 3`, or `--paper-args 'clip_quality=--subset-fractions 0.1 1.0'`, runs it)"})
    attention = result["attention"]
    last_layer = {label: float(np.mean(values["per_layer_per_head_px"][-1])) for label, values in attention.items()}
    local = lambda regime: [v for label, v in last_layer.items() if label.startswith(regime + "-")]  # noqa: E731
    by_image = {regime: [values["per_image_last_layer_px"] for label, values in attention.items()  # every seed's
                         if label.startswith(regime + "-") and "per_image_last_layer_px" in values]
                for regime in ("datacompdr", "datacomp")}  # the same images for every model
    paired_images = (by_image["datacompdr"][-1], by_image["datacomp"][-1]) if all(by_image.values()) else None
    if local("datacompdr") and local("datacomp"):
        rows.append(claim_row("More local attention in the last layer (smaller mean attention distance)",
                              "last layer's mean attention distance (px)", "DataCompDR", local("datacompdr"),
                              "DataComp", local("datacomp"), "<", 1, paired_images))
    baselines = result.get("baselines", {})
    dr_probes = by(probes, "datacompdr", "mIoU")
    floor = baselines.get("per_item", {})  # the baselines' per-image shares, on the probes' test images

    def against_floor(metric: str, key: str, statistic=None):
        ours = probe_items.get("datacompdr", {}).get(metric)
        return (ours, floor[key]) + ((statistic,) if statistic else ()) if ours and key in floor else None

    if "majority_class_mIoU" in baselines:  # a deterministic number: the same for every seed
        rows.append(claim_row("(baseline) the segmentation probe beats predicting all background (the majority class)",
                              "probe mIoU %", "DataCompDR", dr_probes, "all background",
                              [baselines["majority_class_mIoU"]] * len(dr_probes), ">", 1,
                              against_floor("mIoU", "majority_class_mIoU", miou_of_sums)))
    if "position_only_depth_RMSE" in baselines:
        rows.append(claim_row("(baseline) the depth probe beats each pixel's mean training depth (position only)",
                              "probe depth RMSE (m)", "DataCompDR", by(probes, "datacompdr", "depth_RMSE"),
                              "position only", [baselines["position_only_depth_RMSE"]] * len(dr_probes), "<", 3,
                              against_floor("depth_RMSE", "position_only_depth_RMSE")))
    return rows


def run_arguments(seeds: int, out: Path) -> list[str]:
    """The command-line arguments of a paper's default miniature run (the same for every paper file)."""
    return ["miniature", "--seeds", str(seeds), "--out", str(out)]


# What the one-seed job leaves out because it buys no verdict there: CLIP with Quality Captions' small-subset
# pretraining (about 1.8 of the job's 18.5 core-minutes) feeds only the data-efficiency claim, which is untestable
# while the control (pretraining helps dense probes at all) fails, and it failed on every seed measured
# (docs/clip_quality.md). With --seeds 2 or more, or a --subset-fractions of your own, it runs.
ONE_SEED_CUTS = {"clip_quality": ["--subset-fractions", "1.0"]}  # paper: [flag, value...]


def paper_argv(paper: str, args: Args, extra: list[str]) -> list[str]:
    """A paper's command line in this job: its default miniature run, the world's knobs, the one-seed cut unless
    the extra arguments set that flag themselves, then the extra arguments (so an explicit flag wins)."""
    cut = ONE_SEED_CUTS.get(paper, []) if args.seeds == 1 else []
    if cut and cut[0] in extra:
        cut = []
    return run_arguments(args.seeds, Path(args.out) / paper) + world_arguments(args.world) + cut + extra


CLAIMS: dict[str, Callable[[dict], list[dict]]] = {
    "veclip": veclip_claims, "capsfusion": capsfusion_claims, "altogether": altogether_claims, "dico": dico_claims,
    "clip_quality": clip_quality_claims}


def world_arguments(world: WorldConfig) -> list[str]:
    """`--world.<knob> value` for every knob that differs from the default world (the seed excepted)."""
    default, argv = WorldConfig(), []
    for knob in dataclasses.fields(WorldConfig):
        value = getattr(world, knob.name)
        if knob.name != "seed" and value != getattr(default, knob.name):
            argv += [f"--world.{knob.name.replace('_', '-')}", str(value)]
    return argv


def extra_arguments(paper_args: tuple[str, ...]) -> dict[str, list[str]]:
    """{paper: [args]} from NAME=ARGS strings, with an error naming a malformed or unknown entry."""
    extra: dict[str, list[str]] = {}
    for entry in paper_args:
        name, sep, text = entry.partition("=")
        if not sep or name not in PAPERS:
            raise ValueError(f"--paper-args {entry!r}: expected NAME=ARGS with NAME one of {', '.join(PAPERS)}")
        extra.setdefault(name, []).extend(shlex.split(text))
    return extra


def judged(paper: str, argv: list[str], result: dict, minutes: float) -> dict:
    """A paper's entry in claims.json: how long its run took, its command line and its claims judged."""
    return {"minutes": minutes, "argv": argv, "claims": CLAIMS[paper](result)}


def reused(paper: str, args: Args, argv: list[str]) -> dict | None:
    """With --reuse, the paper's entry judged from an existing OUT/<paper>/results.json (not run again); else None."""
    path = Path(args.out) / paper / "results.json"
    if not (args.reuse and path.exists()):
        return None
    print(f"===== {paper}: judging {path} (--reuse; not run again)", flush=True)
    result = json.loads(path.read_text())
    return {**judged(paper, argv, result, result.get("minutes", result.get("seconds", 0) / 60)), "reused": True}


def run_paper(paper: str, args: Args, argv: list[str]) -> dict:
    """Import the paper file, run its miniature run into OUT/<paper> in this process, return its entry."""
    print(f"\n===== {paper}: python {paper}.py {shlex.join(argv)}", flush=True)
    began = time.time()
    result = importlib.import_module(paper).main(argv)
    minutes = (time.time() - began) / 60
    print(f"===== {paper}: done in {minutes:.1f} min", flush=True)
    return judged(paper, argv, result, minutes)


# The metrics that are the world's scorer judging a caption (its CLIP-S, or PAC-S / RefPAC-S with the same weights):
# each depends on the scorer telling apart every kind of word a caption holds, so on every swap type
SCORER_METRICS = ("CLIP-S x 100", "PAC-S", "RefPAC-S")


def blind_spots(world_runs: list[dict]) -> dict[str, float]:
    """The swap types the world's scorer gets right on fewer than SWAP_BLIND % of images (mean over seeds)."""
    accuracy = {kind: float(np.mean([r["scorer"][f"swap_{kind}"] for r in world_runs]))
                for kind in SWAP_TYPES if all(f"swap_{kind}" in r["scorer"] for r in world_runs)}
    return {kind: value for kind, value in accuracy.items() if value < SWAP_BLIND}


def blind_spot_note(row: dict, spots: dict[str, float]) -> str:
    """What a row's metric cannot see: the scorer's blind spots, for a metric that is the scorer's judgement."""
    if row.get("metric") not in SCORER_METRICS or not spots:
        return ""
    listed = ", ".join(f"{kind} {value:.1f}%" for kind, value in sorted(spots.items(), key=lambda kv: kv[1]))
    return (f"; scorer blind spots (swap test < {SWAP_BLIND:.0f}%: {listed}): a caption's words of those kinds barely "
            "move this metric, so a difference that rests on them cannot show.")


def claims_markdown(papers: dict[str, dict], world_runs: list[dict], seeds: int, minutes: float,
                    plots: list[str], jobs: int = 1) -> str:
    """The claims table (verdict and one line of why per row), the time of every stage, and links to the plots."""
    lines = [f"# The papers' claims in the miniature world ({seeds} seed{'s' * (seeds > 1)}, {minutes:.1f} min)", "",
             "A controlled experiment, not the papers' data. Verdict over several seeds: `held` when the difference "
             "has the claimed sign and exceeds the sum of the two standard deviations over seeds; `reversed` when "
             "the opposite does; `within seed spread` otherwise. With one seed: a paired bootstrap over the test "
             "items (the same items under both arms, 1,000 seeded resamples; the 95% interval of the difference, "
             "in the claimed direction, is in the row): `held on this seed` when the interval is above 0, "
             "`reversed on this seed` when below, `within test-set noise` when it holds 0 (for `>=`, not worse: "
             "reversed only when the whole interval is below 0). That interval covers which test items were drawn, "
             "not what another seed would train: seed-to-seed variance needs `--seeds 3`. `untestable` when the "
             "claim's own control fails (no transfer to compare); `1 seed: no verdict` where a row has no per-item "
             "values; `not run in this job` where the one-seed job leaves a claim's run out (the row says why and "
             "how to run it). Rows marked (baseline) or (control) bound the claims above them. A row whose metric "
             f"is the world scorer's judgement (CLIP-S, PAC-S, RefPAC-S) names the scorer's blind spots: the swap "
             f"types it ranks right on fewer than {SWAP_BLIND:.0f}% of test images (world.md). Why each row comes out "
             "as it does: docs/<paper>.md.", "",
             f"| paper | claim | measured ({'mean ± std over seeds' if seeds > 1 else 'one seed'}) | verdict | why |",
             "|---|---|---|---|---|"]
    for paper, run in papers.items():
        for row in run["claims"]:
            why = row.get("why", "") + blind_spot_note(row, blind_spots(world_runs))
            lines.append(f"| {paper} | {row['claim']} | {row['measured']} | {row['verdict']} | {why} |")
    lines += ["", "## Time of each stage", ""]
    if jobs > 1:
        lines += [f"{jobs} stages ran side by side (`--jobs {jobs}`), so the minutes add up to more than the "
                  f"{minutes:.1f} min the job took.", ""]
    lines += ["| stage | minutes | command |", "|---|---|---|"]
    for stage, text in (("world", "build the miniature world (cached)"),
                        ("scorer", "train the world's scorer (cached)"), ("variants", "score the caption variants")):
        lines.append(f"| {stage} | {sum(r.get('seconds', {}).get(stage, 0.0) for r in world_runs) / 60:.1f} "
                     f"| {text} |")
    lines += [f"| {paper} | {run['minutes']:.1f} | `python {paper}.py {shlex.join(run['argv'])}` |"
              for paper, run in papers.items()]
    if plots:
        lines += ["", "## Plots", ""] + [f"- [{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def previous_runs(path: Path, args: Args) -> dict[str, dict]:
    """Papers an earlier run with the same seeds and world wrote into claims.json and this run does not redo.

    So `--papers dico` after a full run refreshes DiCO's rows and keeps the others.
    """
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    if earlier.get("seeds") != args.seeds or earlier["world"]["world"] != dataclasses.asdict(args.world):
        return {}
    return {paper: run for paper, run in earlier["papers"].items() if paper not in args.papers}


# Minutes of each stage at the defaults on 2 cores (one seed), only to choose which ready stage starts first
EXPECTED_MINUTES = {"world": 1.5, "veclip": 1.4, "capsfusion": 1.7, "altogether": 3.0, "dico": 0.9, "clip_quality": 3.8}
NEEDS_SCORER = ("altogether", "dico")  # they read the world's scorer, which the seed-0 world stage trains and caches


def world_stage(seed: int, args: Args, path: str) -> None:
    """A stage's process: one seed of the world table, written to `path` as JSON."""
    atomic_write_text(Path(path), json.dumps(score_variants(seed, args)))


def paper_stage(paper: str, argv: list[str]) -> None:
    """A stage's process: one paper's miniature run (it writes OUT/<paper>/results.json)."""
    importlib.import_module(paper).main(argv)


def run_side_by_side(args: Args, extra: dict[str, list[str]], out: Path) -> tuple[list[dict], dict[str, dict]]:
    """The world table's seeds and the papers' runs as stages (common/stages.py), `args.jobs` at a time."""
    built = {}
    for seed in range(args.seeds):  # built here, before any stage reads them, so no two processes build one world
        began = time.time()
        ensure_world(dataclasses.replace(args.world, seed=seed))
        built[seed] = time.time() - began
    stages = [Stage(f"world-seed{seed}", world_stage, (seed, args, str(out / "logs" / f"world-seed{seed}.json")),
                    minutes=EXPECTED_MINUTES["world"]) for seed in range(args.seeds)]
    argvs = {paper: paper_argv(paper, args, extra.get(paper, [])) for paper in args.papers}
    papers = {paper: reused(paper, args, argvs[paper]) for paper in args.papers}
    stages += [Stage(paper, paper_stage, (paper, argvs[paper]), minutes=EXPECTED_MINUTES[paper] * args.seeds,
                     after=("world-seed0",) if paper in NEEDS_SCORER else ()) for paper in args.papers
               if papers[paper] is None]
    minutes = run_stages(stages, args.jobs, out / "logs")
    runs = [json.loads((out / "logs" / f"world-seed{seed}.json").read_text()) for seed in range(args.seeds)]
    for run in runs:  # the stage found its world built: the time of the build is this process's
        run["seconds"]["world"] += built[run["seed"]]
    for paper in args.papers:
        if papers[paper] is None:
            result = json.loads((out / paper / "results.json").read_text())
            papers[paper] = judged(paper, argvs[paper], result, minutes[paper])
    return runs, papers


def write_world(runs: list[dict], args: Args) -> dict:
    """world.json and world.md in OUT (the table printed too); returns what world.json holds."""
    world = {"runs": runs, "world": dataclasses.asdict(args.world),
             "scorer": {"model": args.scorer_model, **dataclasses.asdict(args.scorer)}}
    atomic_write_text(Path(args.out) / "world.json", json.dumps(world, indent=1))
    atomic_write_text(Path(args.out) / "world.md", world_markdown(runs))
    print(world_markdown(runs))
    return world


def main(argv=None) -> dict:
    args = tyro.cli(Args, args=argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: expected 1 or more stages at a time")
    extra = extra_arguments(args.paper_args)
    start, out = time.time(), Path(args.out)
    papers = previous_runs(out / "claims.json", args)
    if args.jobs > 1:
        print(f"world table ({args.seeds} seed(s)) and {len(args.papers)} paper run(s), {args.jobs} at a time; "
              "the world and its scorer are cached after the first run", flush=True)
        runs, ran = run_side_by_side(args, extra, out)
        world = write_world(runs, args)
        papers.update(ran)
    else:
        runs = []
        for seed in range(args.seeds):
            print(f"[world, seed {seed}] building the world and its scorer (cached after the first run) ...",
                  flush=True)
            runs.append(score_variants(seed, args))
        world = write_world(runs, args)
        for index, paper in enumerate(args.papers, start=1):
            print(f"[{index}/{len(args.papers)}] {paper} ({time.time() - start:.0f} s so far)", flush=True)
            argv = paper_argv(paper, args, extra.get(paper, []))
            papers[paper] = reused(paper, args, argv) or run_paper(paper, args, argv)
    minutes = (time.time() - start) / 60
    report = {"world": world, "papers": papers, "minutes": minutes, "seeds": args.seeds,
              "scorer_blind_spots": blind_spots(runs)}
    atomic_write_text(out / "claims.json", json.dumps(report, indent=1))
    plots = []
    for png in sorted(out.glob("*/*.png")):  # the papers' plots side by side, linked from claims.md
        plots.append(f"{png.parent.name}-{png.name}")
        shutil.copyfile(png, out / plots[-1])
    table = claims_markdown(papers, runs, args.seeds, minutes, plots, args.jobs)
    atomic_write_text(out / "claims.md", table)
    print(table)
    print(f"written to {out}/ in {minutes:.1f} min")
    return report


if __name__ == "__main__":
    main()
