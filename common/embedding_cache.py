"""A resumable, multi-rank cache of a frozen image encoder's embeddings: one float32 memory-mapped .npy per name.

A training set's embeddings are computed once into `<out>/<name>.image_embeddings.npy` (N, E) with a readable
mask and a JSON sidecar saying what they were computed from (`embedding_signature`); a later run with the same
records and encoder maps the file read-only and embeds nothing, and a step reads only its batch's rows
(`embedding_rows`): at 22M images of 1024-d the file is 90 GB, which no rank should hold in RAM. Under
torch.distributed each rank embeds its chunks into part files, rank 0 merges them; a killed job keeps its finished
chunks. `encoder` is a common.clip_score bundle (`model`, `preprocess`, `device`, `name`). The layout and the
guarantees are in docs/altogether.md (Image embeddings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.data import ManifestError, SkipCounter, atomic_write_text, open_record_image

log = logging.getLogger(__name__)

@torch.no_grad()
def embed_records(encoder, records: list[dict], strict: bool, batch_size: int = 256,
                  progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen, L2-normalised image embeddings (N, E), zero rows for unreadable images, and readable (N,) bool."""
    skipped, readable = SkipCounter(), torch.zeros(len(records), dtype=torch.bool)
    emb = torch.zeros(len(records), encoder.model.visual.output_dim)
    for start in tqdm(range(0, len(records), batch_size), desc="embed images", leave=False, disable=not progress):
        images = [open_record_image(record, skipped, strict) for record in records[start:start + batch_size]]
        rows = [start + i for i, image in enumerate(images) if image is not None]
        if rows:
            pixels = torch.stack([encoder.preprocess(image) for image in images if image is not None])
            emb[rows] = F.normalize(encoder.model.encode_image(pixels.to(encoder.device)).float(), dim=-1).cpu()
            readable[rows] = True
    if skipped.count:
        log.warning("%d unreadable images skipped (first: %s)", skipped.count, skipped.examples[:3])
    return emb, readable



# The training set's embeddings live in one memory-mapped file per stage in --out, computed once and read row by row:
# at the paper's 22M images and E = 1024 they are 90 GB, which no rank should hold in RAM (docs/altogether.md).
EMBED_CHUNK = 4096  # rows per part file; a multiple of embed_records' batch, so the batches (and floats) of one pass
EMBED_WAIT = timedelta(hours=4)  # for the slowest rank and rank 0's merge (minutes at 22M), past NCCL's 10-min timeout
SOURCE_KEYS = ("format", "records_sha256", "n", "dim", "dtype", "encoder", "encoder_source")  # what decides the floats


def embedding_files(out: str | Path, name: str) -> dict[str, Path]:
    """<out>/<name>.image_embeddings.npy (N, E) float32, .image_readable.npy (N,) bool, the .json sidecar, the parts."""
    stem = Path(out) / f"{name}.image_"
    return {"emb": Path(f"{stem}embeddings.npy"), "readable": Path(f"{stem}readable.npy"),
            "sidecar": Path(f"{stem}embeddings.json"), "parts": Path(f"{stem}embeddings.parts")}


def embedding_signature(records: list[dict], encoder, encoder_source: str | None, manifest: str | Path | None) -> dict:
    """What the embedding file is computed from: the records' ids and image paths in order (hashed), the encoder
    and `encoder_source`, its weights (an open_clip tag or a file).

    The manifest's path, size and time are recorded for the reader; the match is on SOURCE_KEYS, so a manifest
    copied or touched elsewhere with the same rows reuses the file, and any other row or encoder recomputes it.
    """
    digest = hashlib.sha256()
    for record in records:  # the image as image_path resolves it (folder + path as written), without 22M Path objects
        image = record["image"] if isinstance(record["image"], str) else "<inline image>"
        digest.update(f"{record['id']}\t{record.get('_root', '')}\t{image}\n".encode())
    stat = Path(manifest).stat() if manifest is not None else None
    return {"format": 1, "records_sha256": digest.hexdigest(), "n": len(records),
            "dim": int(encoder.model.visual.output_dim), "dtype": "float32", "encoder": encoder.name,
            "encoder_source": encoder_source, "manifest": str(Path(manifest).resolve()) if stat else None,
            "manifest_bytes": stat.st_size if stat else None, "manifest_mtime": stat.st_mtime if stat else None}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def same_source(found: dict | None, signature: dict) -> bool:
    return found is not None and all(found.get(key) == signature[key] for key in SOURCE_KEYS)


def embeddings_ready(files: dict[str, Path], signature: dict) -> bool:
    """A finished file of these inputs: the sidecar is written last, so its presence marks both arrays whole."""
    found = read_json(files["sidecar"])
    if found is not None and not same_source(found, signature):
        changed = [key for key in SOURCE_KEYS if found.get(key) != signature[key]]
        log.warning("%s was computed from other inputs (%s differ): computing it again", files["emb"], changed)
    return same_source(found, signature) and files["emb"].is_file() and files["readable"].is_file()


def prepare_parts(files: dict[str, Path], signature: dict, chunk_rows: int) -> None:
    """Rank 0, before any rank embeds: unmark the old file, keep the parts of these inputs (a killed job's) only."""
    files["sidecar"].unlink(missing_ok=True)  # from now on the old arrays never pass for finished ones
    marker, expected = files["parts"] / "source.json", {**signature, "chunk_rows": chunk_rows}
    found = read_json(marker)
    if files["parts"].exists() and not (same_source(found, signature) and found.get("chunk_rows") == chunk_rows):
        shutil.rmtree(files["parts"])
    files["parts"].mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(expected, indent=2))


def part_path(files: dict[str, Path], chunk: int) -> Path:
    return files["parts"] / f"chunk{chunk:07d}.npz"


def save_part(path: Path, emb: np.ndarray, readable: np.ndarray) -> None:
    """One chunk's rows through a temporary file and a rename: a part on disk is a whole part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.savez(handle, emb=emb, readable=readable)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def embed_shard(encoder, records: list[dict], files: dict[str, Path], strict: bool, rank: int = 0,
                world_size: int = 1, chunk_rows: int = EMBED_CHUNK) -> int:
    """Embed this rank's chunks not on disk yet, one part file each; returns how many it embedded.

    Chunk c (rows c * chunk_rows ..) is rank c % world_size's: contiguous rows per part, the chunks dealt round-robin
    so the ranks finish together; only this rank writes its parts, so no check races another rank's write.
    """
    chunks = range(rank, -(-len(records) // chunk_rows), world_size)
    todo = [chunk for chunk in chunks if not part_path(files, chunk).exists()]  # a killed job's parts are kept
    for chunk in tqdm(todo, desc="embed images", disable=rank != 0):
        rows = records[chunk * chunk_rows:(chunk + 1) * chunk_rows]
        emb, readable = embed_records(encoder, rows, strict, progress=False)
        save_part(part_path(files, chunk), emb.numpy(), readable.numpy())
    return len(todo)


def merge_parts(files: dict[str, Path], signature: dict, chunk_rows: int) -> None:
    """Rank 0: the parts, one at a time, into the .npy memmap and the mask; then the sidecar, then the parts go."""
    n, dim = signature["n"], signature["dim"]
    # fixed temporary names: only rank 0 writes them, and a merge killed mid-way leaves no 90 GB orphan for the next one
    tmp_emb, tmp_readable = (files[key].with_name(f".{files[key].name}.tmp") for key in ("emb", "readable"))
    emb = np.lib.format.open_memmap(tmp_emb, mode="w+", dtype=np.float32, shape=(n, dim))
    readable = np.zeros(n, dtype=bool)
    for chunk in range(-(-n // chunk_rows)):
        rows = slice(chunk * chunk_rows, min((chunk + 1) * chunk_rows, n))
        with np.load(part_path(files, chunk)) as part:
            emb[rows], readable[rows] = part["emb"], part["readable"]
    emb.flush()
    del emb
    with open(tmp_readable, "wb") as handle:  # a handle: np.save would append .npy to the temporary name
        np.save(handle, readable)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_emb, files["emb"])
    os.replace(tmp_readable, files["readable"])
    atomic_write_text(files["sidecar"], json.dumps(signature, indent=2))  # written last: the completion marker
    shutil.rmtree(files["parts"])


def image_embeddings(encoder, records: list[dict], out: str | Path, name: str, signature: dict, strict: bool,
                     rank: int = 0, world_size: int = 1,
                     chunk_rows: int = EMBED_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(N, E) float32 read-only memmap of the frozen encoder's embeddings of `records` and readable (N,) bool.

    Computed once into <out>/<name>.image_embeddings.npy, each rank embedding its chunks; found there (same
    records, same encoder) it is only mapped, so a resumed run does not embed again. Only the rows a step indexes
    enter RAM. float32, as embed_records returns them: training reads the floats of the in-memory pass.
    """
    if not records:
        raise ManifestError(f"no records to embed for {name!r}: the manifest is empty")
    files = embedding_files(out, name)
    # a gloo group of its own: its barriers outlast NCCL's 10-minute timeout while rank 0 merges 90 GB
    group = dist.new_group(backend="gloo", timeout=EMBED_WAIT) if world_size > 1 else None
    ready = embeddings_ready(files, signature)  # every rank decides before rank 0 touches a file (next barrier)
    if not ready and rank == 0:
        prepare_parts(files, signature, chunk_rows)
    elif rank == 0 and files["parts"].exists():  # a job killed after its sidecar, before removing its parts
        shutil.rmtree(files["parts"])
    wait_for_ranks(group)
    if not ready:
        embed_shard(encoder, records, files, strict, rank, world_size, chunk_rows)
    wait_for_ranks(group)  # every part written
    if not ready and rank == 0:
        merge_parts(files, signature, chunk_rows)
    wait_for_ranks(group)  # the file is whole before any rank maps it
    if group is not None:
        dist.destroy_process_group(group)
    emb, readable = np.load(files["emb"], mmap_mode="r"), np.load(files["readable"])
    log.info("image embeddings %s: %s, %d unreadable images%s", files["emb"], emb.shape, (~readable).sum(),
             "" if not ready else " (computed by an earlier run)")
    return emb, readable


def wait_for_ranks(group) -> None:
    if group is not None:
        dist.barrier(group=group)


def embedding_rows(img_emb, indices: np.ndarray) -> torch.Tensor:
    """(b, E) rows of the embeddings (a memmap or a tensor): only these rows are read into RAM."""
    rows = img_emb[indices]
    return rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(rows))

