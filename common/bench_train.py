"""Benchmarks of the one CLIP trainer (common/clip_train.py): memory that does not grow with the data, and speed.

Not timed tests: run them by hand and put the figures, the command and the machine in docs/training.md.

    python -m common.bench_train rss --records 10000 1000000 --out runs/bench_rss
    python -m common.bench_train throughput --steps 30 --out runs/bench_throughput

`rss` writes a manifest of N records (N of each size asked; the records point at 1,000 distinct 64 px
PNG files, so that the disk holds little while the manifest has N lines), indexes it once (common.columns.Columns,
in its own process), then trains the micro CLIP for a few steps over it in a fresh process and reports that
process's peak resident memory (ru_maxrss) next to its resident memory once the model is built: flat in N means
nothing on the training path holds the data set. `throughput` trains the miniature world's CLIP (mini-ViT-8,
batch 256) on the world's 5,000 training images from the preprocessed in-memory tensor and from PNGs decoded
lazily with 0, 1 and 2 DataLoader workers, and reports images per second.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tyro
from PIL import Image

DISTINCT_IMAGES = 1000


def rss_mb() -> float:
    """This process's resident memory now, in MB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def write_big_manifest(folder: Path, n: int) -> Path:
    """A manifest of n records over DISTINCT_IMAGES small PNGs, written line by line."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(DISTINCT_IMAGES):
        path = images / f"{i:04d}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path = folder / f"manifest-{n}.jsonl"
    if not path.exists():
        with open(path, "w") as handle:
            for i in range(n):
                handle.write(json.dumps({"id": f"s{i:08d}", "image": f"images/{i % DISTINCT_IMAGES:04d}.png",
                                         "caption": f"a picture number {i} of a thing",
                                         "alt_text": f"thing {i}"}) + "\n")
    return path


def index_child(manifest: str) -> dict:
    from common.columns import index_manifest

    start = time.time()
    columns = index_manifest(manifest)
    return {"rows": len(columns), "index_seconds": time.time() - start, "index_peak_rss_mb": peak_rss_mb()}


def train_child(manifest: str, steps: int, batch_size: int, workers: int) -> dict:
    """Train the micro CLIP over an indexed manifest; memory before and after (this process only)."""
    import torch

    from common.clip_train import FieldTexts, TrainConfig, create_clip, train_clip
    from common.columns import index_manifest

    torch.set_num_threads(2)
    before_model = rss_mb()
    model, preprocess, tokenizer = create_clip("micro-ViT-16")
    with_model = rss_mb()
    columns = index_manifest(manifest)  # already built: opens it
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-3, warmup=1, workers=workers)
    log = train_clip(model, tokenizer, columns, FieldTexts(columns, "caption"), cfg, preprocess=preprocess,
                     progress=False)
    return {"rows": len(columns), "rss_before_model_mb": before_model, "rss_with_model_mb": with_model,
            "peak_rss_mb": peak_rss_mb(), "rss_after_mb": rss_mb(), "images_per_second": log["images_per_second"]}


def run_child(function: str, *args) -> dict:
    """Run `function(*args)` of this module in a fresh interpreter (its own peak memory) and return its dict."""
    code = (f"import json, common.bench_train as b; print('RESULT', json.dumps(b.{function}(*{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def bench_rss(records: list[int], out: Path, steps: int, batch_size: int, workers: int) -> list[dict]:
    rows = []
    for n in records:
        manifest = write_big_manifest(out / "data", n)
        built = run_child("index_child", str(manifest))
        trained = run_child("train_child", str(manifest), steps, batch_size, workers)
        rows.append({"records": n, **built, **trained})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_throughput(steps: int, workers: list[int]) -> list[dict]:
    import torch

    from common.clip_train import MINIATURE_MODEL, FieldTexts, TrainConfig, create_clip, train_clip
    from common.clip_eval import preprocess_images
    from common.columns import index_manifest
    from common.miniature import ensure_world

    torch.set_num_threads(2)
    folder = ensure_world()
    columns = index_manifest(folder / "train.jsonl")
    _, preprocess, tokenizer = create_clip(MINIATURE_MODEL)
    start = time.time()
    pixels = preprocess_images(columns, preprocess)
    decode_seconds = time.time() - start
    rows = []
    for source, worker_count in [("in-memory tensor", 0)] + [("lazy PNG decoding", w) for w in workers]:
        model = create_clip(MINIATURE_MODEL)[0]
        cfg = TrainConfig(steps=steps, batch_size=256, warmup=5, workers=worker_count)
        log = train_clip(model, tokenizer, pixels if source.startswith("in-memory") else columns,
                         FieldTexts(columns, "caption"), cfg, preprocess=preprocess, progress=False)
        rows.append({"source": source, "workers": worker_count, "images_per_second": log["images_per_second"],
                     "steps": steps, "decode_all_seconds": decode_seconds if source.startswith("in-memory") else None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> dict:
    @dataclass
    class Args:
        what: tyro.conf.Positional[Literal["rss", "throughput"]]
        """which benchmark"""
        records: tuple[int, ...] = (10_000, 1_000_000)
        """rss: manifest sizes"""
        steps: int = 30
        """training steps per measurement"""
        batch_size: int = 64
        """rss: global batch"""
        workers: tuple[int, ...] = (0, 1, 2)
        """throughput: DataLoader workers of the lazy runs (rss: the first is used)"""
        out: str = "runs/bench_train"
        """folder for the generated data and results.json"""

    args = tyro.cli(Args, args=argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "rss":
        rows = bench_rss(list(args.records), out, args.steps, args.batch_size, args.workers[0])
    else:
        rows = bench_throughput(args.steps, list(args.workers))
    result = {"benchmark": args.what, "rows": rows, "cpu_count": os.cpu_count()}
    (out / f"{args.what}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
