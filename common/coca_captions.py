"""DataCompDR's synthetic captions: k CoCa samples per image by nucleus sampling, as apple/ml-mobileclip-dr gen.py.

clip_quality.py's `synthesize` stage writes them (`write_synthetic_captions`; docs/clip_quality.md, Deviation 10).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn as nn

from common.data import MissingWeightsError, SkipCounter, init_distributed, is_shards, open_record_image
from common.degenerate import DegenerateCounter
from common.generate import check_resumable, generate_sharded

# apple/ml-mobileclip-dr scripts/gen.py (CaptionModel): coca_ViT-L-14 @ mscoco_finetuned_laion2B-s13B-b90k, 5 samples,
# model.generate(images, generation_type="top_p", top_p=0.9, fixed_output_length=True); the rest are open_clip's
# defaults, pinned here so that an open_clip release cannot change them: at most 30 tokens with <start_of_text> and
# <end_of_text> (ml-mobileclip-dr issue 4's "a 2 2 2 2 ..." came with seq_len=77; some CoCas loop, long-context ones
# most), at least 5, temperature 1, no repetition penalty. fixed_output_length pads every row to seq_len (a batch
# stacks).
COCA_SAMPLING = {"generation_type": "top_p", "top_p": 0.9, "temperature": 1.0, "seq_len": 30, "min_seq_len": 5,
                 "repetition_penalty": 1.0, "fixed_output_length": True}


def enable_coca_sampling() -> None:
    """Let CoCa.generate sample under transformers 5. open_clip 3.3 imports BeamSearchScorer, which transformers 5
    removed (open_clip issue 1129), in the same try as the classes of its top-p path; the import fails as a whole and
    generate refuses to run. Those classes are all still in transformers 5: bind them. Beam search stays unavailable."""
    from open_clip import coca_model

    if coca_model._has_transformers:
        return
    import transformers

    for name in ("LogitsProcessorList", "TopPLogitsWarper", "RepetitionPenaltyLogitsProcessor",
                 "MinLengthLogitsProcessor", "MaxLengthCriteria", "StoppingCriteriaList"):
        setattr(coca_model, name, getattr(transformers, name))
    coca_model.GENERATION_TYPES["top_p"] = transformers.TopPLogitsWarper
    coca_model._has_transformers = True


def load_captioner(spec: str, device: str, load_model_spec: Callable) -> tuple[nn.Module, Callable]:
    """(CoCa, its preprocess) of --captioner; a missing weight (offline, a wrong path) is one error naming the flag.
    `load_model_spec(spec, device)` -> (label, model, preprocess) loads a checkpoint path or an open_clip NAME@TAG."""
    try:
        if not Path(spec).is_file() and "@" not in spec:
            raise RuntimeError("a captioner needs weights: NAME@TAG, NAME@/path/to/weights or a .pt checkpoint")
        _, model, preprocess = load_model_spec(spec, device)
    except RuntimeError as err:
        raise MissingWeightsError(f"--captioner {spec}: {err}") from None
    if not hasattr(model, "generate"):
        raise ValueError(f"--captioner {spec}: a {type(model).__name__} has no text decoder; pass a CoCa")
    enable_coca_sampling()
    return model, preprocess  # eval mode, on the device


def decode_caption(tokens: torch.Tensor) -> str:
    """gen.py's post-processing: the text between <start_of_text> and <end_of_text>, up to its first period."""
    return open_clip.decode(tokens).split("<end_of_text>")[0].split("<start_of_text>")[-1].split(".")[0].strip()


@torch.no_grad()
def synthesize_captions(model: nn.Module, pixels: torch.Tensor, ids: Sequence[str], num_synthetic: int,
                        resample_degenerate: int, counter: DegenerateCounter, counts) -> list[list[str]]:
    """k captions per image: each image repeated k times in one generate batch (k independent draws, as gen.py's k
    calls); a degenerate draw is drawn again, at most --resample-degenerate times, then dropped (counted)."""
    captions: list[list[str]] = [[] for _ in ids]
    todo = [i for i in range(len(ids)) for _ in range(num_synthetic)]  # one entry per caption still wanted
    for _ in range(1 + resample_degenerate):
        if not todo:
            break
        # clip_quality.py step 6: x_syn ~ CoCa(img), top-p 0.9
        tokens = model.generate(pixels[todo], **COCA_SAMPLING)  # (len(todo), 30)
        failed = []
        for i, row in zip(todo, tokens):
            text = decode_caption(row)
            if counter.check(text, ids[i]) is None:  # else a reason: "repeated token: '2' 4 times in a row", ...
                captions[i].append(text)
            else:
                failed.append(i)
        counts["degenerate"] += len(failed)
        todo = failed
    counts["degenerate_dropped"] += len(todo)
    return captions


def caption_batch(model: nn.Module, preprocess: Callable, batch: list[dict], counts, *, field: str, num_synthetic: int,
                  resample_degenerate: int, counter: DegenerateCounter, skipped: SkipCounter,
                  device: str) -> list[tuple[dict, dict]]:
    """common.generate's process_batch: each readable record's captions as {field: [k captions]}; a record whose
    image cannot be read, or whose every draw was degenerate, is left out (counted)."""
    kept = [(record, image) for record in batch if (image := open_record_image(record, skipped)) is not None]
    counts["unreadable_images"] += len(batch) - len(kept)
    if not kept:
        return []
    pixels = torch.stack([preprocess(image) for _, image in kept]).to(device)
    lists = synthesize_captions(model, pixels, [str(r["id"]) for r, _ in kept], num_synthetic, resample_degenerate,
                                counter, counts)
    counts["captions"] += sum(map(len, lists))
    counts["images_without_caption"] += sum(not c for c in lists)  # left out: no line, no shard member
    return [(record, {field: c}) for (record, _), c in zip(kept, lists) if c]


def write_synthetic_captions(data: str, out: str, captioner: str, field: str, num_synthetic: int,
                             resample_degenerate: int, seed: int, batch_size: int, device: str,
                             load_model_spec: Callable) -> dict:
    """`num_synthetic` captions per image of `data` into `field`, every field kept, one process or torchrun:
    common.generate.generate_sharded streams the input, shards it over ranks and resumes a killed run (only a run
    of the same settings). `out`: a .jsonl (a folder gets synthetic.jsonl) or, for shards in, a folder of shards."""
    rank, world_size, device = init_distributed(device)
    out = Path(out)
    out = out / "synthetic.jsonl" if out.suffix != ".jsonl" and not is_shards(data) else out
    # a resume passes over what is written: only over captions of these settings (named as clip_quality's flags)
    settings = {"captioner": captioner, "synthetic_field": field, "num_synthetic": num_synthetic,
                "resample_degenerate": resample_degenerate, "seed": seed}
    check_resumable(data, out, {"data": data, "sampling": COCA_SAMPLING, **settings}, rank, world_size)
    model, preprocess = load_captioner(captioner, device, load_model_spec)
    torch.manual_seed(seed + rank)
    counter, skipped = DegenerateCounter(), SkipCounter()
    process_batch = partial(caption_batch, model, preprocess, field=field, num_synthetic=num_synthetic,
                            resample_degenerate=resample_degenerate, counter=counter, skipped=skipped, device=device)
    counts = generate_sharded(data, out, batch_size, process_batch, rank, world_size, "synthesize")
    if rank == 0:  # the counts of every rank; the degenerate examples of this one
        print(f"synthesize: {counts.get('captions', 0)} captions written, {counts.get('degenerate_dropped', 0)} "
              f"degenerate dropped -> {out}; {counts}\n{counter.line('synthetic draws', 'drawn again')}")
    return {"out": str(out), **counts}
