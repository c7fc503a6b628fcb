"""Caption every image of a manifest (or shards) with an image captioner: rank-sharded, resumable, degenerate
captions written and flagged.

The captioner is a function of (records, their image embeddings); this module reads the images, embeds them
with the frozen encoder, counts the unreadable ones and writes each caption through common.generate (a restart
goes on after the last sample written; each rank its share). A caller checks the prompts and the output's recipe
first (`check_caption_job`); `checkpoint_encoder` loads the encoder a captioner's checkpoint names."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import torch

from common.caption_eval import load_scorer
from common.degenerate import DegenerateCounter
from common.embedding_cache import embed_records
from common.generate import check_resumable, generate_sharded, merge_rank_counters, pending
from common.record_texts import unique_texts

log = logging.getLogger(__name__)


def check_caption_job(data, out: str, recipe: dict, prompt_field: str | None, rank: int = 0,
                      world_size: int = 1) -> None:
    """What a caption job checks before its captioner loads: the prompt texts in `prompt_field` (None: no prompt)
    of this rank's records still to do (streamed), then that `out` holds nothing or output of `recipe`."""
    if prompt_field is not None:
        for record in pending(data, out, rank, world_size, required=("id", "image")):
            unique_texts(record, prompt_field)
    check_resumable(data, out, recipe, rank, world_size)


def checkpoint_encoder(payload: dict, checkpoint: str, device: str, world, training):
    """The frozen image encoder a captioner's checkpoint was trained with (its `clip_model` and `clip_pretrained`;
    common.caption_eval.load_scorer: random weights, in tests, seeded alike) on `device`, this rank's; a load
    error names the checkpoint's field."""
    flags = tuple(f"--checkpoint {checkpoint} (its {name})" for name in ("clip_model", "clip_pretrained"))
    return load_scorer(payload["clip_model"], payload["clip_pretrained"], device, world, training, flags)


def caption_manifest(data, out: str, encoder, caption_batch: Callable[[list[dict], torch.Tensor], list[str]],
                     caption_field: str, batch_size: int, strict: bool, rank: int = 0, world_size: int = 1) -> dict:
    """Write every record of `data` (a manifest or shards, streamed; or a list) into `out` with `caption_field`
    added: `caption_batch(records, img_emb (B, E))` captions each batch's readable images. A degenerate caption
    (common.degenerate) is written, its reason in `<caption_field>_degenerate`. Returns common.generate's counts
    with `unreadable_images`, `empty_captions` and `degenerate`."""
    counter = DegenerateCounter()

    def process_batch(batch: list[dict], counts: Counter) -> list[tuple[dict, dict]]:
        img_emb, readable = embed_records(encoder, batch, strict, batch_size=len(batch), progress=False)
        kept = [record for record, ok in zip(batch, readable.tolist()) if ok]
        counts["unreadable_images"] += len(batch) - len(kept)
        if not kept:
            return []
        captions = caption_batch(kept, img_emb[readable])
        counts["empty_captions"] += sum(not caption for caption in captions)
        results = []
        for record, caption in zip(kept, captions):
            fields, reason = {caption_field: caption}, counter.check(caption, sample=record["id"])
            if reason is not None:  # written, not dropped: the next stage (or a person) decides
                counts["degenerate"] += 1
                fields[f"{caption_field}_degenerate"] = reason
            results.append((record, fields))
        return results

    counts = generate_sharded(data, out, batch_size, process_batch, rank, world_size, "caption",
                              required=("id", "image"))
    merge_rank_counters(counter, rank, world_size)  # every rank's degenerate captions in rank 0's line
    if rank == 0:
        log.info("caption: %s -> %s", counts, out)
        if counter.checked:
            (log.warning if counter.degenerate else log.info)(counter.line("generated captions", "flagged"))
    return counts
