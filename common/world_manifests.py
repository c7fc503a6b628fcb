"""The records a stage reads (each from its manifest flag, else the miniature world's split) and a stage under torchrun.

A paper's stages read several manifests by role (pretraining set, test set, probe sets, images to measure); a role
whose flag is not given falls back to a split of the miniature world (common/miniature.py), built only then; the text
fields a stage trains on are checked before it starts. Under torchrun, rank 0 builds that world and the output folder
before the other ranks read them. clip_quality.py's stages read their data this way (docs/clip_quality.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch.distributed as dist

import numpy as np

from common.columns import Columns, index_data
from common.data import ManifestError, init_distributed, read_manifest, text_problem
from common.miniature import WorldConfig, ensure_world


def manifests_or_world(given: Mapping[str, str | None], splits: Mapping[str, str], world: WorldConfig,
                       indexed: Sequence[str] = (), texts: Mapping[str, Sequence[str]] = {}) -> dict:
    """{role: its records}: the manifest `given[role]`, else the world's split `splits[role]` (the world is built
    only when some role is not given; cached after the first build, seconds). A role in `indexed` is indexed into
    common.columns.Columns (a manifest or webdataset shards, any size); the others are lists of records, with the
    fields `texts[role]` checked as text line by line."""
    folder = ensure_world(world) if not all(given.values()) else None
    return {role: (index_data(path or str(folder / f"{splits[role]}.jsonl")) if role in indexed
                   else read_manifest(path or folder / f"{splits[role]}.jsonl", texts=texts.get(role, ())))
            for role, path in given.items()}


def check_texts(columns: Columns, rows: np.ndarray, fields: Mapping[str, bool], need: str) -> None:
    """Every row of `rows` has a text in each of `fields` (field -> whether a list of texts counts, a string being a
    list of one), by common.data.text_problem's rule: else an error naming the first bad sample's file and line, how
    many more there are, and what the stage `need`s."""
    def problem(values: dict) -> str | None:
        problems = (text_problem(values[field], field, lists=lists) for field, lists in fields.items())
        return next((why for why in problems if why is not None), None)

    kept = columns.rows_where(lambda values: problem(values) is None, list(fields))
    bad = np.setdiff1d(rows, kept)
    if len(bad):
        first = int(bad[0])
        why = problem({name: columns.value(name, first) for name in fields})
        raise ManifestError(f"{columns.where(first)} (id {columns.value('id', first)!r}): {why} (and {len(bad) - 1} "
                            f"more samples); {need}")


def run_under_torchrun(device: str, out: str, world: WorldConfig | None,
                       stage: Callable[[str, int, int], dict]) -> dict:
    """`stage(device, rank, world_size)` on every rank of a torchrun job, this rank's device; rank 0 first makes the
    output folder and builds the miniature `world` (None: every manifest is given) while the other ranks wait."""
    rank, world_size, device = init_distributed(device)
    try:
        if rank == 0:
            Path(out).mkdir(parents=True, exist_ok=True)
            if world is not None:
                ensure_world(world)
        dist.barrier()
        return stage(device, rank, world_size)
    finally:
        dist.destroy_process_group()
