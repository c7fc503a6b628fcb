"""The main job: the miniature world, its scorer, and what each caption variant is worth there.

Today it builds the miniature world (common/miniature.py), trains (once, then cached) the small
CLIP that scores captions there, and measures every caption variant of the test split: CLIP-S
and RefCLIP-S under that scorer, how many proper names a variant keeps, how many attribute
words it hallucinates. The paper files join this table as they land.

    python reproduce.py                # one seed, a few minutes on 2 CPU cores
    python reproduce.py --seeds 3      # mean and spread over three worlds and scorers

Writes results/world.json and results/world.md. The miniature world is a controlled experiment,
not the papers' data: its numbers show mechanisms, not real-world effect sizes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

from common.clip_score import load_clip, ref_clip_s
from common.clip_train import MINIATURE_MODEL, SCORER_TRAINING, TrainConfig, ensure_miniature_scorer
from common.data import atomic_write_text, image_path, read_manifest
from common.miniature import WorldConfig, ensure_world, hallucinated_words, names_kept, world_statistics

VARIANTS = ("caption", "alt_text", "synthetic_caption", "fused")


@dataclass
class Args:
    """Reproduce in miniature: build the world, train its scorer, score the caption variants."""

    seeds: int = 1
    """worlds (and scorers) to run, seeds 0..seeds-1; the table shows mean and spread"""
    world: WorldConfig = WorldConfig()
    """the miniature world's knobs (its seed is replaced by each run's seed)"""
    scorer: TrainConfig = SCORER_TRAINING
    """how the world's scorer is trained (its seed is replaced by each run's seed)"""
    scorer_model: str = MINIATURE_MODEL
    """open_clip architecture of the scorer"""
    out: str = "results"
    """folder for world.json and world.md"""


def score_variants(seed: int, args: Args) -> dict:
    """One seed: the scorer's own quality and every caption variant's scores on the test split."""
    world = dataclasses.replace(args.world, seed=seed)
    folder = ensure_world(world)
    checkpoint = ensure_miniature_scorer(world, dataclasses.replace(args.scorer, seed=seed), args.scorer_model)
    scorer_metrics = torch.load(checkpoint, map_location="cpu", weights_only=True)["test_metrics"]
    bundle = load_clip(args.scorer_model, pretrained=str(checkpoint), device="cpu")
    records = read_manifest(folder / "test.jsonl")
    images = [image_path(r) for r in records]
    refs = [r["refs"] for r in records]  # the ground-truth caption
    variants = {}
    for field in VARIANTS:
        texts = [r[field] for r in records]
        result = ref_clip_s(bundle, images, texts, refs, progress=False)
        kept, total = np.sum([names_kept(t, r) for t, r in zip(texts, records)], axis=0)
        variants[field] = {"CLIP-S": result["score"]["mean"], "RefCLIP-S": result["mean"],
                           "names_kept_%": 100.0 * kept / max(total, 1),
                           "hallucinated_words": float(np.mean([len(hallucinated_words(t, r)) for t, r in zip(texts, records)]))}
    return {"seed": seed, "scorer": scorer_metrics, "variants": variants,
            "world_statistics": world_statistics(read_manifest(folder / "train.jsonl"))}


def mean_spread(values: list[float]) -> str:
    return f"{np.mean(values):.2f}" if len(values) == 1 else f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def markdown(runs: list[dict]) -> str:
    """The results as Markdown tables: the scorer's quality, then one row per caption variant."""
    n = len(runs)
    lines = [f"# The miniature world ({n} seed{'s' * (n > 1)}; mean ± std over seeds)", "",
             "A controlled experiment, not the papers' data.", "",
             "## The scorer (a small CLIP trained on the ground-truth captions), test split", "",
             "| metric | value |", "|---|---|"]
    for key in runs[0]["scorer"]:
        if key != "train_seconds":
            lines.append(f"| {key} | {mean_spread([r['scorer'][key] for r in runs])} |")
    lines += ["", "## Caption variants of the test split under that scorer", "",
              "| variant | CLIP-S | RefCLIP-S (ref: ground truth) | names kept % | hallucinated words / caption |",
              "|---|---|---|---|---|"]
    for field in VARIANTS:
        cells = [mean_spread([r["variants"][field][key] for r in runs])
                 for key in ("CLIP-S", "RefCLIP-S", "names_kept_%", "hallucinated_words")]
        lines.append(f"| `{field}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = tyro.cli(Args, args=argv)
    start = time.time()
    runs = []
    for seed in range(args.seeds):
        print(f"[seed {seed}] building the world and its scorer (cached after the first run) ...", flush=True)
        runs.append(score_variants(seed, args))
    report = {"runs": runs, "seconds": time.time() - start, "world": dataclasses.asdict(args.world),
              "scorer": {"model": args.scorer_model, **dataclasses.asdict(args.scorer)}}
    out = Path(args.out)
    atomic_write_text(out / "world.json", json.dumps(report, indent=1))
    table = markdown(runs)
    atomic_write_text(out / "world.md", table)
    print(table)
    print(f"written to {out}/world.json and {out}/world.md in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
