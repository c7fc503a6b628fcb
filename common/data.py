"""Data plumbing shared by every paper file: manifests, image opening, loaders, resumable output.

The manifest (DESIGN.md section 5) is JSON Lines, one sample per line:

    {"id": "000123", "image": "images/000123.png", "alt_text": "...", "caption": "...", ...}

`image` is relative to the manifest's folder (an absolute path also works). Every other string
field is a caption variant selectable by name; a list of strings (e.g. `refs`) holds references.
Generation stages write manifests too, so stages chain through files.

Bad input (DESIGN.md section 10): a malformed manifest line is an error that names the file, the
line and the sample id. An unreadable image or an empty caption inside a long job is logged with
its id and counted, and the job goes on (`strict=True` makes it an error instead).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "image")


class ManifestError(ValueError):
    """A manifest line that cannot be used: the message says which file, line and sample."""


class BadSampleError(ValueError):
    """One sample that cannot be used (unreadable image, empty caption), raised in strict mode."""


# ---------------------------------------------------------------------------------------------
# Manifests: read, validate, write
# ---------------------------------------------------------------------------------------------


def _parse_line(raw: bytes, path: Path, line_no: int) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}:{line_no}: not valid UTF-8 ({err}); re-encode the file as UTF-8") from err
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(record, dict):
        raise ManifestError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
    return record


def validate_record(record: dict, required: Sequence[str] = REQUIRED_FIELDS, where: str = "record") -> None:
    """Raise ManifestError naming `where` and the sample id if a required field is missing or empty."""
    sample = record.get("id", "<no id>")
    for name in required:
        if name not in record:
            raise ManifestError(f"{where} (id {sample!r}): missing field {name!r}; fields present: {sorted(record)}")
        value = record[name]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ManifestError(f"{where} (id {sample!r}): field {name!r} is empty")


def read_manifest(path: str | os.PathLike, required: Sequence[str] = REQUIRED_FIELDS) -> list[dict]:
    """Read a JSONL manifest, check each line and that ids are unique; blank lines are allowed.

    Each record gets `_root`, the manifest's folder, so that relative image paths resolve later.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    records, seen = [], {}
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            record = _parse_line(raw, path, line_no)
            validate_record(record, required, where=f"{path}:{line_no}")
            sample = str(record["id"])
            if sample in seen:
                raise ManifestError(f"{path}:{line_no}: id {sample!r} already used on line {seen[sample]}")
            seen[sample] = line_no
            record["_root"] = str(path.parent)
            records.append(record)
    return records


def _public(record: dict) -> dict:
    return {key: value for key, value in record.items() if not key.startswith("_")}


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole file through a temporary file and a rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_manifest(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write records as a JSONL manifest atomically; keys starting with '_' are internal and dropped."""
    lines = [json.dumps(_public(record), ensure_ascii=False) for record in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return Path(path)


def image_path(record: dict) -> Path:
    """The absolute path of a record's image (relative paths resolve against the manifest folder)."""
    path = Path(record["image"])
    return path if path.is_absolute() else Path(record.get("_root", ".")) / path


# ---------------------------------------------------------------------------------------------
# Images and a Dataset over a manifest
# ---------------------------------------------------------------------------------------------


def open_image(source: Any, sample: str = "?") -> Image.Image:
    """Open an image as RGB from a path, bytes or a PIL image; BadSampleError says which sample failed."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        if isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        else:
            image = Image.open(source)
        image.load()
    except FileNotFoundError as err:
        raise BadSampleError(f"sample {sample!r}: image file not found: {source}") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise BadSampleError(f"sample {sample!r}: image cannot be decoded ({err})") from err
    return image.convert("RGB")


def open_record_image(record: dict, skipped: "SkipCounter", strict: bool = False) -> Image.Image | None:
    """A record's image as RGB, or None after counting it in `skipped` (strict: BadSampleError)."""
    sample = str(record.get("id", "?"))
    source = record["image"] if isinstance(record["image"], Image.Image) else image_path(record)
    try:
        return open_image(source, sample)
    except BadSampleError as err:
        if strict:
            raise
        skipped.add(sample, str(err))
        return None


def pick_text(record: dict, text_field: str, rng: random.Random | None = None) -> str:
    """The record's text for `text_field`; a list field yields one element drawn uniformly by `rng`."""
    sample = record.get("id", "?")
    if text_field not in record:
        raise ManifestError(f"sample {sample!r}: no text field {text_field!r}; fields present: {sorted(record)}")
    value = record[text_field]
    if isinstance(value, list):
        if not value:
            raise BadSampleError(f"sample {sample!r}: field {text_field!r} is an empty list")
        value = (rng or random).choice(value)
    if not isinstance(value, str) or not value.strip():
        raise BadSampleError(f"sample {sample!r}: field {text_field!r} is empty")
    return value


@dataclass
class SkipCounter:
    """Counts bad samples skipped by a non-strict job and remembers the first few ids for the report."""

    count: int = 0
    examples: list = field(default_factory=list)

    def add(self, sample: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < 20:
            self.examples.append((sample, reason))
        log.warning("skipping sample %s: %s", sample, reason)


class ManifestDataset(torch.utils.data.Dataset):
    """(image tensor, text) pairs from manifest records for one text field.

    `preprocess` is the open_clip image transform; `tokenizer`, if given, turns the text into token
    ids (a (context,) LongTensor). `image` may also hold a PIL image (in-memory worlds).
    A bad sample yields None and is counted in `self.skipped` (only in the main process when a
    DataLoader uses workers); `strict=True` raises BadSampleError instead. Use `collate_skip_bad`.
    """

    def __init__(self, records: Sequence[dict], text_field: str = "caption", preprocess: Callable | None = None,
                 tokenizer: Callable | None = None, strict: bool = False, seed: int = 0):
        self.records = list(records)
        self.text_field = text_field
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.strict = strict
        self.rng = random.Random(seed)
        self.skipped = SkipCounter()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        sample = str(record.get("id", index))
        try:
            text = pick_text(record, self.text_field, self.rng)
            source = record["image"] if isinstance(record["image"], Image.Image) else image_path(record)
            image = open_image(source, sample)
        except BadSampleError as err:
            if self.strict:
                raise
            self.skipped.add(sample, str(err))
            return None
        pixels = self.preprocess(image) if self.preprocess is not None else image
        tokens = self.tokenizer([text])[0] if self.tokenizer is not None else text
        return pixels, tokens


def collate_skip_bad(batch: list):
    """Collate (image, text) pairs, dropping the None of skipped samples; None if nothing is left."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    images, texts = zip(*kept)
    images = torch.stack(images) if isinstance(images[0], torch.Tensor) else list(images)
    texts = torch.stack(texts) if isinstance(texts[0], torch.Tensor) else list(texts)
    return images, texts


# ---------------------------------------------------------------------------------------------
# Other sources: COCO Karpathy JSON, webdataset shards
# ---------------------------------------------------------------------------------------------


def load_coco_karpathy(json_path: str | os.PathLike, image_root: str | os.PathLike,
                       splits: Sequence[str] | None = None, restval_as_train: bool = True) -> list[dict]:
    """Records from a Karpathy-split caption JSON (`dataset_coco.json` and friends).

    Each image becomes {"id", "image" (absolute), "split", "caption" (first sentence), "refs" (all)}.
    `restval` counts as `train` by default, as in most captioning code (DiCO's included).
    """
    json_path = Path(json_path)
    with open(json_path, encoding="utf-8") as handle:
        data = json.load(handle)
    if "images" not in data:
        raise ManifestError(f"{json_path}: no 'images' list; expected the Karpathy split format")
    records = []
    for position, entry in enumerate(data["images"]):
        where = f"{json_path}: images[{position}]"
        for name in ("filename", "split", "sentences"):
            if name not in entry:
                raise ManifestError(f"{where}: missing {name!r}")
        split = "train" if (entry["split"] == "restval" and restval_as_train) else entry["split"]
        if splits is not None and split not in splits:
            continue
        refs = [s["raw"].strip() for s in entry["sentences"] if s.get("raw", "").strip()]
        if not refs:
            raise ManifestError(f"{where}: no non-empty sentence")
        image = Path(image_root) / entry.get("filepath", "") / entry["filename"]
        sample = entry.get("cocoid", entry.get("imgid", Path(entry["filename"]).stem))
        records.append({"id": str(sample), "image": str(image.resolve()), "split": split,
                        "caption": refs[0], "refs": refs})
    return records


def iter_webdataset(urls: str | Sequence[str], image_keys: Sequence[str] = ("jpg", "png", "jpeg", "webp"),
                    strict: bool = False, skipped: SkipCounter | None = None) -> Iterator[dict]:
    """Records from webdataset tar shards (each sample: an image file + a json file).

    Yields {"id": key, "image": PIL image, **json fields}; needs the `webdataset` package.
    A sample without a decodable image is counted in `skipped` (or raises with `strict=True`).
    """
    try:
        import webdataset as wds
    except ImportError as err:
        raise ImportError("reading tar shards needs the webdataset package: pip install webdataset") from err
    skipped = skipped if skipped is not None else SkipCounter()
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        meta = json.loads(sample["json"]) if "json" in sample else {}
        raw = next((sample[name] for name in image_keys if name in sample), None)
        try:
            if raw is None:
                raise BadSampleError(f"sample {key!r}: no image among {list(image_keys)}")
            image = open_image(raw, key)
        except BadSampleError as err:
            if strict:
                raise
            skipped.add(key, str(err))
            continue
        yield {**meta, "id": str(meta.get("id", key)), "image": image}


def write_webdataset_shard(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write records (with a PIL `image`) as one tar shard: key.png + key.json per sample."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for record in records:
            key = str(record["id"])
            png = io.BytesIO()
            record["image"].save(png, format="PNG")
            meta = json.dumps({k: v for k, v in _public(record).items() if k != "image"}).encode()
            for name, payload in ((f"{key}.png", png.getvalue()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


# ---------------------------------------------------------------------------------------------
# Sharding and the resumable writer for long generation jobs
# ---------------------------------------------------------------------------------------------


def init_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device) under torchrun (gloo on CPU, nccl on CUDA); (0, 1, device) otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world_size, device


def load_pretrained(loader, name: str, flag: str, **kwargs):
    """`loader.from_pretrained(name)` (a transformers class) with one clear error naming the flag to pass."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise RuntimeError(f"cannot load {name!r} for {flag} ({type(err).__name__}: {err}). Pass {flag} a local "
                           "folder holding the model, or a hub name with network access.") from err


def shard(records: Sequence[dict], rank: int, world_size: int) -> list[dict]:
    """Rank `rank`'s share of `records`: every world_size-th record, so the shares cover all once."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(records[rank::world_size])


def rank_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Where rank `rank` writes: `out.jsonl` itself for one process, `out.rank3-of-8.jsonl` otherwise."""
    path = Path(path)
    return path if world_size == 1 else path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix}")


class ResumableJSONLWriter:
    """Append-only JSONL output for generation jobs that may be killed at any time.

    Each finished sample is one line, flushed (and fsynced) before `write` returns, so a kill
    loses at most the sample in flight. On open, the lines already there are read: their ids go
    into `done` (skip them), and a truncated last line, the mark of a crash mid-write, is cut off
    and counted in `dropped_partial`. A bad line anywhere else is not a crash but corruption, and
    is an error naming the line.
    """

    def __init__(self, path: str | os.PathLike, key: str = "id", fsync: bool = True):
        self.path = Path(path)
        self.key = key
        self.fsync = fsync
        self.done: set[str] = set()
        self.dropped_partial = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        good_bytes = self._scan()
        self._handle = open(self.path, "ab")
        if good_bytes is not None:
            self._handle.truncate(good_bytes)

    def _scan(self) -> int | None:
        """Read existing lines; return the length to truncate to if the last line is partial."""
        if not self.path.exists():
            return None
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # bytes after the last newline: empty unless the last write was cut
        offset = 0
        for line_no, raw in enumerate(lines, start=1):
            if raw.strip():
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise ManifestError(f"{self.path}:{line_no}: corrupt line inside the file ({err}); "
                                        "only a truncated last line can be repaired") from err
                self.done.add(str(record[self.key]))
            offset += len(raw) + 1
        if tail:
            self.dropped_partial = 1
            log.warning("%s: dropping a truncated last line (%d bytes) left by an interrupted run", self.path, len(tail))
            return offset
        return None

    def write(self, record: dict) -> None:
        sample = str(record[self.key])
        if sample in self.done:
            raise ValueError(f"{self.path}: id {sample!r} written twice")
        line = json.dumps(_public(record), ensure_ascii=False).encode("utf-8") + b"\n"
        self._handle.write(line)
        self._handle.flush()
        if self.fsync:
            os.fsync(self._handle.fileno())
        self.done.add(sample)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "ResumableJSONLWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_rank_outputs(path: str | os.PathLike, world_size: int, order: Sequence[str] | None = None) -> Path:
    """Merge the per-rank files of a finished sharded job into `path` (in `order` of ids if given)."""
    path = Path(path)
    if world_size == 1:
        return path
    merged: dict[str, dict] = {}
    for rank in range(world_size):
        part = rank_path(path, rank, world_size)
        with ResumableJSONLWriter(part) as check:
            missing_partial = check.dropped_partial
        if missing_partial:
            log.warning("%s had a truncated last line; that sample is missing from the merge", part)
        for record in read_manifest(part, required=("id",)):
            merged[str(record["id"])] = record
    ids = [sample for sample in order if sample in merged] if order is not None else sorted(merged)
    return write_manifest(path, (merged[sample] for sample in ids))


def generate_sharded(records: Sequence[dict], out: str | os.PathLike, batch_size: int, process_batch: Callable,
                     rank: int = 0, world_size: int = 1, desc: str = "generate") -> dict:
    """Run `process_batch(records, counts) -> [(record, new fields)]` over this rank's unfinished samples.

    The generation loop every paper's captioning/fusion stage shares: each rank takes its
    `shard` of `records` and appends to its own `rank_path(out)`, one flushed line per sample, so a
    killed job resumes where it stopped (finished ids are skipped); local image paths are
    re-rooted at the output's folder (URLs and records without an image are left as they are). With several ranks (torch.distributed initialised), the counts are summed
    and rank 0 merges the parts into `out` in input order once all have finished. Returns the counts.
    """
    out = Path(out)
    mine = shard(records, rank, world_size)
    counts: Counter = Counter()
    with ResumableJSONLWriter(rank_path(out, rank, world_size)) as writer:
        todo = [r for r in mine if str(r["id"]) not in writer.done]
        counts["already_done"] = len(mine) - len(todo)
        for start in tqdm(range(0, len(todo), batch_size), desc=desc, disable=rank != 0):
            for record, fields in process_batch(todo[start:start + batch_size], counts):
                # a local image path is relative to the manifest's folder: re-root it at the output's;
                # a URL, or no image at all (text-only jobs such as caption fusion), stays as it is
                image = record.get("image")
                if isinstance(image, str) and "://" not in image:
                    fields = {"image": os.path.relpath(image_path(record).resolve(), out.resolve().parent), **fields}
                writer.write({**record, **fields})
                counts["written"] += 1
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, dict(counts))
        counts = sum((Counter(part) for part in parts), Counter())
        if rank == 0:
            merge_rank_outputs(out, world_size, order=[str(r["id"]) for r in records])
        dist.barrier()
    return dict(counts)
