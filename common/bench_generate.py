"""Benchmark of the generation path (common/generate.py): peak memory that does not grow with the data set.

Not a timed test: run it by hand and put the figures, the command and the machine in docs/generation.md.

    python -m common.bench_generate --records 10000 1000000 --out runs/bench_generate
    python -m common.bench_generate --records 10000 1000000 --forms stream list old --old-tree /tmp/before

For each size N it writes a manifest of N small records (line by line), then runs a generation job over it in
fresh processes, one per rank (world size 1, and 2 under gloo, as torchrun starts them), and reports each rank's
resident memory once its imports are done and its peak from then on (VmHWM, reset after the imports through
/proc/self/clear_refs; where that cannot be written, the process's whole peak, which includes the imports').
The job is the reader, a trivial process_batch (one new field) and, with two ranks, rank 0's merge;
`--fuse-records` sizes also run veclip's fuse stage itself over the same manifest with a tiny random OPT (2 new
tokens; forms `stream` and `old`). Forms of the input: `stream` passes the manifest's path (common.generate
streams it); `list` passes read_manifest's list, as the stages that have not switched do; `old` runs the list
through the code before streaming, from `--old-tree`, a copy of the repository at that commit
(`git archive 7e13913 | tar -x -C /tmp/before`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

ROOT = Path(__file__).resolve().parents[1]

# One rank's job, run in a fresh interpreter whose working directory is the tree being measured (this one, or
# --old-tree): it uses only what both trees have (common.data.read_manifest, generate_sharded, veclip.main).
CHILD = r"""
import json, os, resource, sys, time

def status_mb(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":")) / 1024

def reset_peak():
    # the imports' own transient peak is not the job's: Linux resets the high-water mark (VmHWM) on "5"
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False

cfg = json.loads(sys.argv[1])
rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
import torch
torch.set_num_threads(1)
from common.data import read_manifest
try:
    from common.generate import generate_sharded
except ImportError:  # the tree before streaming
    from common.data import generate_sharded
if cfg["job"] == "fuse":
    import veclip
elif world_size > 1:
    torch.distributed.init_process_group("gloo")
after_imports, peak_reset, start = status_mb("VmRSS"), reset_peak(), time.time()
if cfg["job"] == "fuse":
    # the stage as it is in the tree: streamed here, read_manifest's list in the tree before streaming
    counts = veclip.main(["fuse", "--data", cfg["manifest"], "--out", cfg["out"], "--llm", cfg["llm"],
                          "--max-new-tokens", "2", "--gen-batch-size", str(cfg["batch_size"]), "--device", "cpu"])
else:
    data = cfg["manifest"] if cfg["form"] == "stream" else read_manifest(cfg["manifest"])
    counts = generate_sharded(data, cfg["out"], cfg["batch_size"],
                              lambda batch, counts: [(r, {"upper": r["alt_text"].upper()}) for r in batch],
                              rank, world_size, "bench")
seconds = time.time() - start
print("RESULT " + json.dumps({"rank": rank, "rss_after_imports_mb": after_imports, "peak_rss_mb": status_mb("VmHWM"),
                              "peak_since_imports": peak_reset, "seconds": seconds,
                              "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


def write_manifest_lines(folder: Path, n: int) -> Path:
    """A manifest of n records (id, image path, alt-text, VeC: what fuse reads), written line by line."""
    path = folder / f"manifest-{n}.jsonl"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as handle:
            for i in range(n):
                handle.write(json.dumps({"id": f"s{i:08d}", "image": f"images/{i % 1000:04d}.png",
                                         "alt_text": f"stock photo {i} of a red thing",
                                         "vec": "a red circle on green grass"}) + "\n")
    return path


def tiny_opt(folder: Path) -> Path:
    """A random OPT two layers of width 16, with a word-level tokenizer of the fusion prompt's and the records'
    words."""
    if (folder / "config.json").exists():
        return folder
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    import veclip

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    words = sorted(set(f"{veclip.FUSION_PROMPT} {veclip.VICUNA_SYSTEM} USER: ASSISTANT: stock photo of a red thing "
                       "circle on green grass".split()) - set(special))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>")
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                       num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=2048,
                       pad_token_id=3, bos_token_id=1, eos_token_id=2)
    OPTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(tree: Path, cfg: dict, world_size: int) -> list[dict]:
    """One job: `world_size` fresh rank processes at once (gloo through env://, as torchrun starts them)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", "WORLD_SIZE": str(world_size),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg)], cwd=tree, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(world_size)]
    results = []
    for rank in ranks:
        stdout, stderr = rank.communicate()
        if rank.returncode != 0:
            raise RuntimeError(f"a rank of {cfg} exited {rank.returncode}:\n{stderr[-3000:]}")
        results.append(json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:]))
    return results


def bench(records: list[int], world_sizes: list[int], forms: list[str], fuse_records: list[int], batch_size: int,
          out: Path, old_tree: Path | None) -> list[dict]:
    rows = []
    llm = tiny_opt(out / "tiny-opt") if fuse_records else None
    for n in records:
        manifest = write_manifest_lines(out / "data", n)
        for job in ["trivial"] + (["fuse"] if n in fuse_records else []):
            for form in forms:
                if job == "fuse" and form == "list":  # the fuse stage streams now; its list form is the old tree's
                    continue
                for world_size in world_sizes:
                    target = out / "runs" / f"{job}-{form}-{n}-w{world_size}"
                    shutil.rmtree(target, ignore_errors=True)
                    target.mkdir(parents=True)
                    cfg = {"job": job, "form": form, "manifest": str(manifest.resolve()), "batch_size": batch_size,
                           "out": str((target / "out.jsonl").resolve()), "llm": str(llm.resolve()) if llm else None}
                    ranks = run_job(old_tree if form == "old" else ROOT, cfg, world_size)
                    lines = sum(1 for _ in open(target / "out.jsonl", "rb"))
                    rows.append({"records": n, "job": job, "form": form, "world_size": world_size,
                                 "output_lines": lines, "ranks": ranks,
                                 "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
                                 "rss_after_imports_mb": max(r["rss_after_imports_mb"] for r in ranks),
                                 "added_mb": max(r["peak_rss_mb"] - r["rss_after_imports_mb"] for r in ranks),
                                 "seconds": max(r["seconds"] for r in ranks)})
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "ranks"}), flush=True)
                    shutil.rmtree(target)
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a table; each figure is the largest over the job's ranks (peak - imports: per rank, then the
    largest)."""
    lines = ["| job | input | ranks | records | RSS after imports (MB) | peak RSS (MB) | peak - imports (MB) "
             "| seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['job']} | {r['form']} | {r['world_size']} | {r['records']:,} | "
                     f"{r['rss_after_imports_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['added_mb']:.0f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    @dataclass
    class Args:
        records: tuple[int, ...] = (10_000, 1_000_000)
        """manifest sizes"""
        world_sizes: tuple[int, ...] = (1, 2)
        """ranks of each job (fresh processes; gloo when more than one)"""
        forms: tuple[Literal["stream", "list", "old"], ...] = ("stream", "list")
        """the input: the manifest's path (streamed), read_manifest's list, the list through the code of --old-tree"""
        old_tree: str | None = None
        """the repository before streaming, for the form `old` (git archive 7e13913 | tar -x -C DIR)"""
        fuse_records: tuple[int, ...] = ()
        """sizes (of --records) at which veclip's fuse stage runs too, on a tiny random OPT"""
        batch_size: int = 64
        """samples per process_batch call"""
        out: str = "runs/bench_generate"
        """folder for the manifests, the outputs (removed after each job) and results.json / results.md"""

    args = tyro.cli(Args, args=argv)
    if "old" in args.forms and args.old_tree is None:
        raise SystemExit("error: the form 'old' needs --old-tree (git archive 7e13913 | tar -x -C DIR)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = bench(list(args.records), list(args.world_sizes), list(args.forms), list(args.fuse_records),
                 args.batch_size, out, Path(args.old_tree).resolve() if args.old_tree else None)
    result = {"rows": rows, "cpu_count": os.cpu_count()}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    return result


if __name__ == "__main__":
    main()
