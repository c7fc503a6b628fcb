"""Caption every image of a manifest (or shards) with an image captioner: rank-sharded, resumable, degenerate
captions written and flagged.

The captioner is a function of (records, their image embeddings); this module reads the images, embeds them
with the frozen encoder, counts the unreadable ones and writes each caption through common.generate (a restart
goes on after the last sample written; each rank its share). A caller checks the output's recipe first
(common.generate.check_resumable)."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import torch

from common.degenerate import DegenerateCounter
from common.embedding_cache import embed_records
from common.generate import generate_sharded, merge_rank_counters

log = logging.getLogger(__name__)


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
