"""Benchmark caption_kernels/dico.py against the plain PyTorch formula, eager and torch.compile (CUDA only).

    python -m caption_kernels.bench_dico                      # all sizes, Markdown table on stdout
    python -m caption_kernels.bench_dico --json dico.json     # and the figures as JSON

Time is the median of triton.testing.do_bench over forward + backward; memory is the peak
allocated during one forward + backward minus what was allocated before it (inputs included in the
baseline, so the figure is the op's extra memory, gradient included). The "plain" rows are the
formulas as one writes them in PyTorch (`plain_dico_loss`, `plain_sequence_logprobs`): a dozen ops for the DiCO
loss, log_softmax in float32 + gather for the sequence log-probs (after F.linear for the rows
that start from hidden states, D = 512: those include the LM head's matmuls and its gradient).
Each row also reports the largest difference from the plain eager result (value and gradient),
so a broken kernel cannot post a time. Not a test: the GPU figures go into the docs.
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from caption_kernels.dico import dico_loss, sequence_logprobs, sequence_logprobs_from_hidden

DICO_SIZES = [(B, k) for B in (8, 512, 4096) for k in (5, 16)]
SEQUENCE_SIZES = [(40, 30, 49409), (320, 30, 49409), (64, 128, 50272)]


def plain_dico_loss(policy_logps, ref_logps, rewards, beta=0.2, tau=300.0):
    """The DiCO loss as one would write it in PyTorch (the benchmark's eager baseline)."""
    s = policy_logps - ref_logps
    winner = rewards.argmax(1, keepdim=True)
    gap = tau * (rewards.gather(1, winner) - rewards)
    is_loser = torch.ones_like(rewards, dtype=torch.bool).scatter(1, winner, False)
    gamma = torch.softmax(gap.masked_fill(~is_loser, float("-inf")), 1)
    z = beta * (s.gather(1, winner)[:, 0] - (gamma * s.masked_fill(~is_loser, 0)).sum(1))
    return -F.logsigmoid(z).mean()


def plain_sequence_logprobs(logits, targets, mask):
    """log_softmax in float32 + gather (the benchmark's eager baseline)."""
    return (torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0] * mask).sum(1)


def measure(step, warmup, rep):
    """(median ms, peak extra GiB) of step(), which runs one forward + backward."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak_gib = (torch.cuda.max_memory_allocated() - baseline) / 2**30
    return do_bench(step, warmup=warmup, rep=rep, return_mode="median"), peak_gib


def run_case(candidates, make_inputs, forward, warmup, rep):
    """Time every candidate on the same inputs; compare each with the first (plain eager)."""
    inputs = make_inputs()
    leaves = [x for x in inputs if x.requires_grad]  # gradients compared: the first leaf's

    def clear_grads():
        for leaf in leaves:
            leaf.grad = None

    results, expected = [], None
    for name, fn in candidates:
        def step(fn=fn):
            clear_grads()
            forward(fn, *inputs).backward()

        try:
            clear_grads()
            value = forward(fn, *inputs)
            value.backward()
            got = (value.detach().float(), leaves[0].grad.float())
            if expected is None:
                expected = got
            value_err = (got[0] - expected[0]).abs().max().item()
            grad_err = (got[1] - expected[1]).abs().max().item()
            del value, got  # the baseline of the memory figure must not hold a gradient
            clear_grads()
            ms, gib = measure(step, warmup, rep)
            results.append(
                {"impl": name, "ms": ms, "peak_extra_gib": gib, "value_err": value_err, "grad_err": grad_err}
            )
        except torch.OutOfMemoryError:
            results.append(
                {"impl": name, "ms": None, "peak_extra_gib": None, "value_err": None, "grad_err": None}
            )
        clear_grads()
        torch.cuda.empty_cache()
    return results


def bench_dico(warmup, rep, use_compile):
    compiled = torch.compile(plain_dico_loss) if use_compile else None
    candidates = [("plain eager", plain_dico_loss)]
    if compiled is not None:
        candidates.append(("plain torch.compile", compiled))
    candidates += [
        ("dico_loss torch reference", lambda p, q, r: dico_loss(p, q, r, impl="torch")),
        ("dico_loss triton", lambda p, q, r: dico_loss(p, q, r, impl="triton")),
    ]
    rows = []
    for B, k in DICO_SIZES:
        def make_inputs(B=B, k=k):
            policy = torch.randn(B, k, device="cuda", requires_grad=True)
            return policy, torch.randn(B, k, device="cuda"), torch.rand(B, k, device="cuda")

        for result in run_case(candidates, make_inputs, lambda fn, *xs: fn(*xs), warmup, rep):
            rows.append({"op": "dico_loss", "shape": f"B={B}, k={k}", **result})
            print(f"dico_loss B={B} k={k} {result['impl']}: {result['ms']} ms", file=sys.stderr)
    return rows


def bench_sequences(warmup, rep, use_compile):
    compiled = torch.compile(plain_sequence_logprobs) if use_compile else None
    candidates = [("plain eager", plain_sequence_logprobs)]
    if compiled is not None:
        candidates.append(("plain torch.compile", compiled))
    candidates.append(("sequence_logprobs triton", lambda x, y, m: sequence_logprobs(x, y, m, impl="triton")))
    rows = []
    for N, T, V in SEQUENCE_SIZES:
        def make_inputs(N=N, T=T, V=V):
            logits = torch.randn(N, T, V, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
            targets = torch.randint(0, V, (N, T), device="cuda")
            mask = (torch.rand(N, T, device="cuda") > 0.2).float()
            return logits, targets, mask

        for result in run_case(candidates, make_inputs, lambda fn, *xs: fn(*xs).sum(), warmup, rep):
            rows.append({"op": "sequence_logprobs bf16", "shape": f"N={N}, T={T}, V={V}", **result})
            print(f"sequence_logprobs ({N},{T},{V}) {result['impl']}: {result['ms']} ms", file=sys.stderr)
    return rows


def bench_hidden(warmup, rep, use_compile):
    """From decoder hidden states (D = 512, DiCO's decoder width) and a learnable LM head."""

    def plain(hidden, weight, targets, mask):
        return plain_sequence_logprobs(F.linear(hidden, weight), targets, mask)

    compiled = torch.compile(plain) if use_compile else None
    candidates = [("plain eager", plain)]
    if compiled is not None:
        candidates.append(("plain torch.compile", compiled))
    candidates += [
        (
            "linear + sequence_logprobs triton",
            lambda h, w, y, m: sequence_logprobs(F.linear(h, w), y, m, impl="triton"),
        ),
        (
            "sequence_logprobs_from_hidden triton",
            lambda h, w, y, m: sequence_logprobs_from_hidden(h, w, y, m, impl="triton"),
        ),
    ]
    rows = []
    D = 512
    for N, T, V in SEQUENCE_SIZES:
        def make_inputs(N=N, T=T, V=V):
            hidden = torch.randn(N, T, D, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
            weight = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16) / D**0.5).requires_grad_(True)
            targets = torch.randint(0, V, (N, T), device="cuda")
            mask = (torch.rand(N, T, device="cuda") > 0.2).float()
            return hidden, weight, targets, mask

        for result in run_case(candidates, make_inputs, lambda fn, *xs: fn(*xs).sum(), warmup, rep):
            rows.append({"op": "from hidden bf16", "shape": f"N={N}, T={T}, V={V}, D={D}", **result})
            print(f"from hidden ({N},{T},{V},{D}) {result['impl']}: {result['ms']} ms", file=sys.stderr)
    return rows


def markdown(rows):
    lines = [
        "| op | shape | impl | fwd+bwd | peak extra | max abs diff (value / grad) vs plain eager |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["ms"] is None:
            lines.append(f"| {row['op']} | {row['shape']} | {row['impl']} | out of memory | | |")
            continue
        time = f"{row['ms'] * 1000:.1f} us" if row["ms"] < 1 else f"{row['ms']:.2f} ms"
        lines.append(
            f"| {row['op']} | {row['shape']} | {row['impl']} | {time} | {row['peak_extra_gib']:.3f} GiB "
            f"| {row['value_err']:.1e} / {row['grad_err']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--json", default="bench_dico.json", help="where to write the figures (default: %(default)s)"
    )
    parser.add_argument("--only", choices=["dico", "sequence", "hidden"], help="run one section")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default: %(default)s)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench timing, ms (default: %(default)s)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_dico: needs a CUDA GPU (the kernels are timed on the device); none is visible")

    rows = []
    if args.only in (None, "dico"):
        rows += bench_dico(args.warmup, args.rep, not args.no_compile)
    if args.only in (None, "sequence"):
        rows += bench_sequences(args.warmup, args.rep, not args.no_compile)
    if args.only in (None, "hidden"):
        rows += bench_hidden(args.warmup, args.rep, not args.no_compile)
    device = torch.cuda.get_device_name()
    print(f"Device: {device}; torch {torch.__version__}, triton {triton.__version__}\n")
    print(markdown(rows))
    with open(args.json, "w") as handle:
        versions = {"device": device, "torch": torch.__version__, "triton": triton.__version__}
        json.dump({**versions, "rows": rows}, handle, indent=1)
    print(f"\nwrote {args.json}", file=sys.stderr)
    return {**versions, "rows": rows}


if __name__ == "__main__":
    main()
