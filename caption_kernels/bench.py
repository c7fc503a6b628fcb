"""Benchmark: fused CLIP / SigLIP losses against open_clip, Inf-CL and memeff, one GPU, one run.

    python -m caption_kernels.bench                                   # the full table, bf16, D = 512, 768
    python -m caption_kernels.bench --sizes 8192 32768 --dims 768 --losses clip --out bench.json

For each loss, N and D: forward + backward time (median of `triton.testing.do_bench`), peak
memory allocated beyond the inputs, and useful TFLOP/s = 6 N^2 D / time (the logits and the two
gradient products: the work any implementation must do), for

    ours        caption_kernels.contrastive (Triton) with a learnable logit scale (and bias)
    torch_ref   caption_kernels.contrastive impl="torch": the chunked PyTorch reference (--with-reference)
    open_clip   open_clip.loss.ClipLoss / SigLipLoss (materialises the N x N logits)
    inf_cl      inf_cl.cal_flash_loss, both directions, learnable scale        (if installed)
    memeff      memeff.MemoryEfficientCLIPLoss, fixed temperature: no d_scale  (if installed)

Features are random, L2-normalised, in --dtype (bf16 by default; every contender gets the same
tensors); "(4.3x ours)" in a cell is that contender's time over ours. Also printed: the device's bf16 matmul ceiling and
the gradient error of ours against
open_clip in float64 at N = 4096. Prints Markdown; writes everything to --out as JSON.
A contender that is out of memory says so; one whose estimated time (from the last size, scaled
by N^2) passes --max-seconds is skipped. Not a test: it needs a CUDA GPU.
"""

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from caption_kernels.contrastive import clip_loss, siglip_loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature
SIGLIP_BIAS = -10.0  # SigLIP's initial bias


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[8192, 16384, 32768, 65536, 131072, 262144], help="batch sizes N")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 768], help="feature dims D")
    parser.add_argument("--losses", nargs="+", choices=["clip", "siglip"], default=["clip", "siglip"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="feature dtype")
    parser.add_argument("--with-reference", action="store_true",
                        help="also time the chunked PyTorch reference (impl='torch')")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="skip a contender whose estimated fwd+bwd time exceeds this")
    parser.add_argument("--accuracy-n", type=int, default=4096,
                        help="N for the gradient-error check against float64 (0 to skip)")
    parser.add_argument("--out", default="contrastive_bench.json", help="JSON results file")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Contenders: each is fn(img, txt, scale, bias) -> loss, with scale, bias leaf tensors
# ----------------------------------------------------------------------------------------------


def contenders(loss_kind: str, with_reference: bool) -> tuple[dict, list[str]]:
    """The runnable contenders for one loss, and notes on those that are not installed."""
    notes = []
    if loss_kind == "clip":
        runs = {"ours": lambda i, t, s, b: clip_loss(i, t, s, impl="triton")}
        if with_reference:
            runs["torch_ref"] = lambda i, t, s, b: clip_loss(i, t, s, impl="torch")
    else:
        runs = {"ours": lambda i, t, s, b: siglip_loss(i, t, s, b, impl="triton")}
        if with_reference:
            runs["torch_ref"] = lambda i, t, s, b: siglip_loss(i, t, s, b, impl="torch")
    try:
        from open_clip.loss import ClipLoss, SigLipLoss

        if loss_kind == "clip":
            runs["open_clip"] = lambda i, t, s, b: ClipLoss()(i, t, s)
        else:
            runs["open_clip"] = lambda i, t, s, b: SigLipLoss()(i, t, s, b)
    except ImportError:
        notes.append("open_clip not installed: no open_clip column (pip install open_clip_torch)")
    if loss_kind != "clip":
        return runs, notes
    try:
        from inf_cl import cal_flash_loss

        def inf_cl_loss(img, txt, scale, bias):
            labels = torch.arange(img.shape[0], device=img.device)
            return (cal_flash_loss(img, txt, labels, scale).mean()
                    + cal_flash_loss(txt, img, labels, scale).mean()) / 2

        runs["inf_cl"] = inf_cl_loss
    except ImportError:
        notes.append("inf_cl not installed: no Inf-CL column (pip install inf-cl)")
    try:
        from memeff import MemoryEfficientCLIPLoss

        fixed_temperature = MemoryEfficientCLIPLoss(
            temperature=1 / LOGIT_SCALE, normalized_inputs=True, stable=False)
        runs["memeff"] = lambda i, t, s, b: fixed_temperature(i, t)
        notes.append("memeff runs at a fixed temperature: no logit-scale gradient")
    except ImportError:
        notes.append("memeff not installed: no memeff column (pip install memeff)")
    return runs, notes


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def random_features(n, d, dtype, seed=0, device="cuda"):
    generator = torch.Generator(device=device).manual_seed(seed)
    img = F.normalize(torch.randn(n, d, device=device, generator=generator), dim=-1)
    txt = F.normalize(torch.randn(n, d, device=device, generator=generator), dim=-1)
    return img.to(dtype), txt.to(dtype)


def measure(fn, n, d, dtype):
    """(median ms, peak GiB beyond the inputs) of forward + backward, or (None, reason)."""
    from triton.testing import do_bench

    torch.cuda.empty_cache()
    img, txt = random_features(n, d, dtype)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = torch.tensor(LOGIT_SCALE, device="cuda", requires_grad=True)
    bias = torch.tensor(SIGLIP_BIAS, device="cuda", requires_grad=True)

    def step():
        img.grad = txt.grad = scale.grad = bias.grad = None
        fn(img, txt, scale, bias).backward()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        step()
        torch.cuda.synchronize()
        peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = do_bench(step, warmup=3, rep=max(20, int(200 * (8192 / n) ** 2)), return_mode="median")
        return ms, peak_gib
    except torch.OutOfMemoryError:
        return None, "out of memory"
    except Exception as error:  # a peer failing (e.g. out of shared memory) is a result, not a crash
        return None, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
    finally:
        img = txt = scale = bias = None  # frees the inputs (step's closure reads these names) before the next size
        torch.cuda.empty_cache()


def bf16_matmul_ceiling(n=8192):
    from triton.testing import do_bench

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * n**3 / ms / 1e9


def gradient_errors(loss_kind, n, d):
    """Relative error of ours (bf16 and fp32 features) against open_clip in float64."""
    from open_clip.loss import ClipLoss, SigLipLoss

    img64, txt64 = random_features(n, d, torch.float64, seed=1)

    def grads(fn, dtype):
        img = img64.to(dtype, copy=True).requires_grad_(True)
        txt = txt64.to(dtype, copy=True).requires_grad_(True)
        scale = torch.tensor(LOGIT_SCALE, device="cuda", dtype=torch.float64 if dtype == torch.float64
                             else torch.float32, requires_grad=True)
        bias = torch.tensor(SIGLIP_BIAS, device="cuda", dtype=scale.dtype, requires_grad=True)
        loss = fn(img, txt, scale, bias)
        loss.backward()
        outputs = {"loss": loss, "d_img": img.grad, "d_txt": txt.grad, "d_scale": scale.grad}
        if loss_kind == "siglip":
            outputs["d_bias"] = bias.grad
        return {name: value.double() for name, value in outputs.items()}

    if loss_kind == "clip":
        reference = grads(lambda i, t, s, b: ClipLoss()(i, t, s), torch.float64)
        ours = lambda i, t, s, b: clip_loss(i, t, s, impl="triton")  # noqa: E731
    else:
        reference = grads(lambda i, t, s, b: SigLipLoss()(i, t, s, b), torch.float64)
        ours = lambda i, t, s, b: siglip_loss(i, t, s, b, impl="triton")  # noqa: E731
    return {
        dtype_name: {name: float((value - reference[name]).norm() / reference[name].norm())
                     for name, value in grads(ours, DTYPES[dtype_name]).items()}
        for dtype_name in ("bf16", "fp32")
    }


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def cell(ms, peak, n, d, ours_ms):
    if ms is None:
        return peak
    text = f"{ms:.1f} ms, {peak:.2f} GiB, {6 * n * n * d / ms / 1e9:.0f} TFLOP/s"
    if ours_ms is not None and ours_ms != ms:
        text += f" ({ms / ours_ms:.1f}x ours)"
    return text


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("caption_kernels.bench needs a CUDA GPU (torch.cuda.is_available() is False); the "
                 "kernels' correctness is tested on the CPU by tests/test_kernels_contrastive.py")
    import triton

    dtype = DTYPES[args.dtype]
    results = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "command": " ".join(["python -m caption_kernels.bench"] + (argv or sys.argv[1:])),
        "dtype": args.dtype, "bf16_matmul_tflops": bf16_matmul_ceiling(), "tables": {},
        "gradient_errors": {}, "notes": [],
    }
    print(f"# {results['device']}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{args.dtype} features; bf16 matmul ceiling {results['bf16_matmul_tflops']:.0f} TFLOP/s\n")

    for loss_kind in args.losses:
        if args.accuracy_n:
            errors = gradient_errors(loss_kind, args.accuracy_n, max(args.dims))
            results["gradient_errors"][loss_kind] = errors
            for dtype_name, per_output in errors.items():
                print(f"{loss_kind} gradient error vs float64, N = {args.accuracy_n}, {dtype_name}: "
                      + ", ".join(f"{name} {error:.1e}" for name, error in per_output.items()))
        runs, notes = contenders(loss_kind, args.with_reference)
        results["notes"] += [note for note in notes if note not in results["notes"]]
        rows = []
        for d in args.dims:
            last_seconds = {}  # contender -> (n, seconds) of its last measured size
            for n in args.sizes:
                row = {"n": n, "d": d}
                for name, fn in runs.items():
                    if name in last_seconds:
                        last_n, seconds = last_seconds[name]
                        estimate = seconds * (n / last_n) ** 2
                        if estimate > args.max_seconds:
                            row[name] = (None, f"skipped (about {estimate:.1f} s)")
                            continue
                    started = time.time()
                    row[name] = measure(fn, n, d, dtype)
                    if row[name][0] is not None:
                        last_seconds[name] = (n, row[name][0] / 1e3)
                    print(f"  {loss_kind} N={n} D={d} {name}: {row[name]} ({time.time() - started:.0f} s)",
                          flush=True)
                rows.append(row)
        results["tables"][loss_kind] = rows

        names = list(runs)
        print(f"\n## {loss_kind}: forward + backward, {args.dtype} features, learnable scale"
              + (" and bias" if loss_kind == "siglip" else "") + "\n")
        print("| N | D | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for row in rows:
            ours_ms = row["ours"][0]
            print(f"| {row['n']} | {row['d']} | "
                  + " | ".join(cell(*row[name], row["n"], row["d"], ours_ms) for name in names) + " |")
        print()
    for note in results["notes"]:
        print(f"note: {note}")
    with open(args.out, "w") as file:
        json.dump(results, file, indent=1)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
