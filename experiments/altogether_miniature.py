"""Altogether's miniature experiment: both stages on the miniature world, its test split captioned with and without
the alt-text, against the alt-text, the world's synthetic caption and the ground truth (`python altogether.py`).

The method is altogether.py's; this module holds what the run compares: the extra stage 1 alt-texts, the rows and
columns of the table, results.md / results.json (docs/altogether.md, Results).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

import altogether
from common.caption_eval import caption_metrics, clip_s_scores, load_frozen_encoder, load_scorer, references
from common.caption_metrics import table_note
from common.data import atomic_write_text, read_manifest
from common.embedding_cache import embed_records, embedding_signature, image_embeddings
from common.miniature import alt_text, ensure_world

log = logging.getLogger("altogether.miniature")  # a child of the paper's logger, which main() sets to INFO


def with_extra_alt_texts(records: list[dict], args: altogether.Args, seed: int) -> list[dict]:
    """Stage 1 data of the miniature: each image's alt-text plus `extra_alt_texts` fresh draws of the world's
    generator."""
    out = []
    for index, record in enumerate(records):
        rng = np.random.default_rng([seed, 99, index])  # a stream of its own, apart from the world's
        scene = {"background": record["background"], "objects": record["objects"]}
        extra = [alt_text(scene, rng, args.world)[0] for _ in range(args.extra_alt_texts)]
        out.append({**record, "alt_texts": [record["alt_text"]] + extra})
    return out


ROWS = ("alt-text (input)", "Altogether w/ alt", "Altogether w/o alt", "synthetic caption (world)", "ground truth")
COLUMNS = ("CLIP-S", "CIDEr", "BLEU-4", "names kept %", "hallucinated/caption")


def markdown_table(summary: dict, args: altogether.Args, seconds: float, n_test: int) -> str:
    """results.md: one row per caption source, mean (± std over seeds) of each column."""
    lines = [f"# Altogether in the miniature world ({args.seeds} seed(s), {args.pretrain_steps} + "
             f"{args.finetune_steps} steps of batch {args.batch_size}, {n_test} test images, "
             f"{seconds / 60:.1f} min)", "",
             "CLIP-S x 100 by the world's scorer (also the captioner's frozen encoder); CIDEr / BLEU-4 x 100 against "
             "the world's five human references an image (`refs`; the ground truth is the complete description, "
             "which no reference need be); `synthetic caption (world)` is the world's stand-in for a plain "
             "captioner. A controlled toy world: these numbers show a mechanism, not the paper's effect sizes.", "",
             "| captions | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in ROWS:
        cells = [f"{np.mean(summary[row][k]):.1f}"
                 + (f" ± {np.std(summary[row][k]):.1f}" if args.seeds > 1 else "") for k in COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    runs = [dict(zip(summary[row], values)) for row in ROWS for values in zip(*summary[row].values())]  # a seed each
    note = table_note(runs)  # how CIDEr and BLEU-4 were tokenized
    return "\n".join(lines + ([f"\n{note}."] if note else [])) + "\n"


def run_miniature(args: altogether.Args) -> dict:
    """Per seed: stage 1 and 2 on the world's train split, caption its test split with and without alt-text."""
    began, out = time.time(), Path(args.out)
    folder = ensure_world(args.world)
    train_records, test_records = read_manifest(folder / "train.jsonl"), read_manifest(folder / "test.jsonl")
    encoder = load_frozen_encoder(args.clip_model, args.clip_pretrained, args.device, args.world, args.scorer)
    scorer = load_scorer(args.score_model, args.score_pretrained, args.device, args.world, args.scorer)
    signature = embedding_signature(train_records, encoder, altogether.encoder_source(args), folder / "train.jsonl")
    train_emb, _ = image_embeddings(encoder, train_records, out, "train", signature, strict=True)  # both stages, seeds
    test_emb, _ = embed_records(encoder, test_records, strict=True)
    same_model = args.score_model == args.clip_model
    score_feats = (test_emb if same_model else embed_records(scorer, test_records, True)[0]).numpy()
    runs, per_item = {row: [] for row in ROWS}, {}
    for seed in range(args.seed, args.seed + args.seeds):
        run = dataclasses.replace(args, seed=seed, out=str(out / f"seed{seed}"), resume=False)
        stage1 = with_extra_alt_texts(train_records, run, seed)
        texts = [t for r in stage1 for t in r["alt_texts"]] + [r["caption"] for r in train_records]
        captioner, tokenizer = altogether.new_captioner(run, train_emb.shape[1], texts)
        altogether.train_stage(dataclasses.replace(run, alt_field="alt_texts"), "pretrain", captioner, tokenizer,
                               encoder, stage1, train_emb)
        log.info("seed %d: stage 1 done at %.0f s", seed, time.time() - began)
        altogether.train_stage(run, "finetune", captioner, tokenizer, encoder, train_records, train_emb)
        log.info("seed %d: stage 2 done at %.0f s", seed, time.time() - began)
        captions = {}
        for row, use_alt in (("Altogether w/ alt", True), ("Altogether w/o alt", False)):
            torch.manual_seed(seed)
            captions[row] = []
            for start in range(0, len(test_records), run.gen_batch_size):
                batch = test_records[start:start + run.gen_batch_size]
                prompts = [r["alt_text"] if use_alt else "" for r in batch]
                captions[row] += altogether.generate_captions(captioner, tokenizer,
                                                              test_emb[start:start + run.gen_batch_size], prompts, run)
        captions.update({"alt-text (input)": [r["alt_text"] for r in test_records], "ground truth":
                         [r["caption"] for r in test_records],
                         "synthetic caption (world)": [r["synthetic_caption"] for r in test_records]})
        examples = [{"id": r["id"], **{row: captions[row][i] for row in ROWS}}
                    for i, r in enumerate(test_records[:8])]
        atomic_write_text(Path(run.out) / "examples.json", json.dumps(examples, indent=2))
        for row in ROWS:
            per_item[row] = {}  # the last seed's, for a one-seed verdict (reproduce.py's paired bootstrap)
            metrics = caption_metrics(test_records, captions[row], references(test_records, "refs"),
                                      {"CLIP-S": clip_s_scores(scorer, score_feats, captions[row])},
                                      per_item=per_item[row])
            runs[row].append(metrics)
            print(f"seed {seed} {row}: " + ", ".join(f"{k} {metrics[k]:.2f}" for k in COLUMNS), flush=True)
    summary = {row: {k: [m[k] for m in ms] for k in ms[0]} for row, ms in runs.items()}
    seconds = time.time() - began
    table = markdown_table(summary, args, seconds, len(test_records))
    atomic_write_text(out / "results.md", table)
    results = {"rows": summary, "per_item": per_item, "seeds": args.seeds, "seconds": seconds,
               "world": dataclasses.asdict(args.world),
               "preset": {"name": args.preset, "values": altogether.PRESETS[args.preset]}}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    print(table)
    return results
