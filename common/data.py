"""Data plumbing shared by every paper file: manifests, image opening, loaders, streaming readers for generation.

The manifest (README, "Data: manifests") is JSON Lines, one sample per line:

    {"id": "000123", "image": "images/000123.png", "alt_text": "...", "caption": "...", ...}

`image` is relative to the manifest's folder (an absolute path also works). Every other string
field is a caption variant selectable by name; a list of strings (e.g. `refs`) holds references.
Generation stages write manifests too, so stages chain through files.

Bad input: a malformed manifest line is an error that names the file, the
line and the sample id. An unreadable image or an empty caption inside a long job is logged with
its id and counted, and the job goes on (`strict=True` makes it an error instead).
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import random
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "image")


class ManifestError(ValueError):
    """A manifest line that cannot be used: the message says which file, line and sample."""


class BadSampleError(ValueError):
    """One sample that cannot be used (unreadable image, empty caption), raised in strict mode."""


class NonFiniteError(ValueError, FloatingPointError):
    """NaN or inf in a loss, in weights or in embeddings: a diverged run, whose checkpoint or metrics would mean
    nothing. A FloatingPointError, as the trainers raised before, and a ValueError like the other expected errors."""


class MissingWeightsError(FileNotFoundError, RuntimeError):
    """A model's weights are neither a local folder nor in the hub cache (offline): the message names the flag.
    A FileNotFoundError, so the command lines end it with one line; a RuntimeError, as load_pretrained raised."""


class DeviceError(ValueError):
    """A --device that this machine does not have."""


class ScorerLoadError(ValueError):
    """A CLIP scorer that cannot be loaded as asked (common.clip_score.load_clip); `argument` names the load_clip
    argument to change, which a command line maps to its own flag."""

    def __init__(self, message: str, argument: str):
        super().__init__(message)
        self.argument = argument


# The errors a command line ends with as one line (`run_command`); any other exception is a bug and keeps its traceback.
EXPECTED_ERRORS = (FileNotFoundError, ManifestError, BadSampleError, NonFiniteError, DeviceError, ScorerLoadError)
DEBUG_FLAG = "--debug"  # anywhere on a command line: an expected error keeps its traceback (taken out before parsing)


def without_debug(argv: Sequence[str]) -> list[str]:
    """The command line as its parser reads it: --debug (the traceback of an expected error) taken out."""
    return [word for word in argv if word != DEBUG_FLAG]


def run_command(main: Callable, argv: Sequence[str] | None = None, also: tuple[type[Exception], ...] = ()):
    """`main(argv)`, with an expected error (EXPECTED_ERRORS, and the types `also`) printed as one line on stderr and
    exit status 1, no traceback; with --debug among the arguments, main runs without it and errors keep theirs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in argv:
        return main(without_debug(argv))
    try:
        return main(argv)
    except (*EXPECTED_ERRORS, *also) as err:
        message = " ".join(str(err).split())[:2000]
        raise SystemExit(f"error: {message} ({DEBUG_FLAG} shows the traceback)") from None


def check_device(device: str) -> str:
    """`device` if this machine has it; else DeviceError in one line (not a driver traceback from the first tensor
    moved there, nor an error blaming whatever was loading at the time, such as --pretrained weights)."""
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise DeviceError(f"--device {device!r} is not a torch device ({err})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); pass --device cpu")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# ---------------------------------------------------------------------------------------------
# Typed fields: the one rule every reader applies
# ---------------------------------------------------------------------------------------------


def shown(value: Any) -> str:
    """A value as the manifest writes it, cut short, for error messages."""
    return json.dumps(value, default=repr)[:60]


def text_problem(value: Any, name: str, lists: bool = False) -> str | None:
    """Why `value` cannot be field `name`'s text, or None. A text is a str with a non-blank character; `lists` also
    allows a non-empty list of them (references, several captions per image).

    The rule of every reader that pulls a field as text (a caption, an alt-text, a class name): a number, null, a
    dict, or a list where one text is read is refused, never turned into "123" or "['a', 'b']" and trained or scored
    on as if someone had written it. The caller refuses the line (file:line) or counts the sample as skipped.
    """
    if isinstance(value, str):
        return None if value.strip() else f"field {name!r} is empty"
    if lists and isinstance(value, list):
        if not value:
            return f"field {name!r} is an empty list"
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                return f"field {name!r}: item {i} must be a non-empty string, got {shown(item)}"
        return None
    if value is None:
        return f"field {name!r} is missing or null"
    return f"field {name!r} must be a string{' or a list of strings' if lists else ''}, got {shown(value)}"


def sample_id_problem(value: Any) -> str | None:
    """Why `value` cannot be a sample id (a string or an integer), or None: str() of a list or a float is no id."""
    if isinstance(value, str) or isinstance(value, int) and not isinstance(value, bool):
        return None
    return f"field 'id' must be a string or an integer, got {shown(value)}"


# ---------------------------------------------------------------------------------------------
# Manifests: read, validate, write
# ---------------------------------------------------------------------------------------------


def parse_manifest_line(raw: bytes, path: Path, line_no: int) -> dict:
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


def validate_record(record: dict, required: Sequence[str] = REQUIRED_FIELDS, where: str = "record",
                    texts: Sequence[str] = (), text_lists: Sequence[str] = ()) -> None:
    """Raise ManifestError naming `where` and the sample id if a required field is missing or empty, if `id` is no
    id, or if a field of `texts` (a string) or `text_lists` (a string or a list of them) breaks `text_problem`'s
    rule. An image of the wrong type is a bad sample, counted where it is opened (`image_source`), as an unreadable
    one is."""
    sample = record.get("id", "<no id>")
    for name in required:
        if name not in record:
            raise ManifestError(f"{where} (id {sample!r}): missing field {name!r}; fields present: {sorted(record)}")
        value = record[name]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ManifestError(f"{where} (id {sample!r}): field {name!r} is empty")
    problems = [sample_id_problem(sample) if "id" in record else None]
    problems += [text_problem(record.get(name), name) for name in texts]
    problems += [text_problem(record.get(name), name, lists=True) for name in text_lists]
    problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        raise ManifestError(f"{where} (id {sample!r}): {problem}")


def read_manifest(path: str | os.PathLike, required: Sequence[str] = REQUIRED_FIELDS, texts: Sequence[str] = (),
                  text_lists: Sequence[str] = ()) -> list[dict]:
    """Read a JSONL manifest, check each line and that ids are unique; blank lines are allowed.

    `texts` / `text_lists`: the fields the caller reads as text (an evaluation's captions), which every line must
    hold as a string / a string or a list of them; any other value is an error naming the file and line.
    Each record gets `_root`, the manifest's folder, so that relative image paths resolve later.
    """
    records, seen = [], {}
    for line_no, record in _manifest_lines(_existing_manifest(path), required, texts, text_lists):
        sample = str(record["id"])
        if sample in seen:
            raise ManifestError(f"{path}:{line_no}: id {sample!r} already used on line {seen[sample]}")
        seen[sample] = line_no
        records.append(record)
    return records


def stream_manifest(path: str | os.PathLike, required: Sequence[str] = REQUIRED_FIELDS, texts: Sequence[str] = (),
                    text_lists: Sequence[str] = (), rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """`read_manifest`'s records one line at a time, and only rank `rank`'s share: every world_size-th record, as
    `shard` takes them from the list. Each of those lines is checked as read_manifest checks it (file:line errors,
    `texts` / `text_lists` typed by `text_problem`); the other ranks' lines are counted, not parsed.

    Nothing is kept from one line to the next, so ids are not checked for uniqueness (that needs every id in
    memory): a generation input must hold each id once, as read_manifest requires, or resuming and merging, which
    find samples by id, cannot tell its twins apart. A missing file is an error now, not at the first record.
    """
    check_rank(rank, world_size)
    lines = _manifest_lines(_existing_manifest(path), required, texts, text_lists, rank, world_size)
    return (record for _, record in lines)


def _existing_manifest(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    return path


def _manifest_lines(path: Path, required: Sequence[str], texts: Sequence[str], text_lists: Sequence[str],
                    rank: int = 0, world_size: int = 1) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every world_size-th non-blank line from the rank-th, checked, with `_root`."""
    root = str(path.parent)
    with open(path, "rb") as handle:
        position = -1
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            position += 1
            if position % world_size != rank:
                continue
            record = parse_manifest_line(raw, path, line_no)
            validate_record(record, required, f"{path}:{line_no}", texts, text_lists)
            record["_root"] = root
            yield line_no, record


def public_fields(record: dict) -> dict:
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


def write_results(out: str | os.PathLike, table: str, results: dict) -> dict:
    """A run's ending: its readable table as `out`/results.md, everything as `out`/results.json (values JSON cannot
    hold, such as paths, as their text), each written whole; the table printed. Returns `results`."""
    atomic_write_text(Path(out) / "results.md", table)
    atomic_write_text(Path(out) / "results.json", json.dumps(results, indent=2, default=str))
    print(table)
    return results


def write_manifest(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write records as a JSONL manifest atomically; keys starting with '_' are internal and dropped."""
    lines = [json.dumps(public_fields(record), ensure_ascii=False) for record in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return Path(path)


def image_path(record: dict) -> Path:
    """The absolute path of a record's image (relative paths resolve against the manifest folder)."""
    path = Path(record["image"])
    return path if path.is_absolute() else Path(record.get("_root", ".")) / path


# ---------------------------------------------------------------------------------------------
# Images and a Dataset over a manifest
# ---------------------------------------------------------------------------------------------


# 8-bit value = stored value / divisor: 65535 / 257 = 255, so a 16-bit image maps onto 0..255 exactly
SIXTEEN_BIT = 257.0
FLOAT_RANGE = 255.0  # mode F holds floats in 0..1, the convention of float images


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB.

    PIL's convert("RGB") clips 16-bit and float values at 255, so a 16-bit PNG decodes as white, and it drops
    alpha, which shows whatever colour a transparent pixel happens to store (often black). Here 16-bit modes
    (I;16*, and I, Pillow's mode for 16-bit PNGs before 10.x) are divided by 257, F is scaled from 0..1, and
    transparency (RGBA, LA, PA, a palette's or a colour key's) is composited on white, as a page shows it; the
    other modes (L, 1, P, CMYK, YCbCr, LAB, HSV) are PIL's conversions.
    """
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        values = values * FLOAT_RANGE if image.mode == "F" else values / SIXTEEN_BIT
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode.endswith(("A", "a")) or "transparency" in image.info:  # RGBA, LA, PA, RGBa; a tRNS chunk
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def open_image(source: Any, sample: str = "?") -> Image.Image:
    """Open an image as RGB (`to_rgb`) from a path, bytes or a PIL image; BadSampleError says which sample failed."""
    if not isinstance(source, (Image.Image, str, os.PathLike, bytes, bytearray)) and not hasattr(source, "read"):
        raise BadSampleError(f"sample {sample!r}: an image is a path, bytes or a PIL image, got {shown(source)}")
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            image.load()
        return to_rgb(image)
    except FileNotFoundError as err:
        raise BadSampleError(f"sample {sample!r}: image file not found: {source}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:  # ValueError: a mode PIL cannot convert
        raise BadSampleError(f"sample {sample!r}: image cannot be decoded ({err})") from err


def image_source(record: dict, field: str = "image") -> "Image.Image | bytes | Path":
    """What `open_image` reads for a record's `field` (its image; a mask or a depth map): a PIL image or bytes held
    in memory, else the path, relative to the manifest's folder. Any other value (a number, a list, null) is a
    BadSampleError naming the sample, not a TypeError from deep inside pathlib."""
    value = record.get(field)
    if isinstance(value, (Image.Image, bytes, bytearray)):
        return value
    if isinstance(value, (str, os.PathLike)) and str(value).strip():
        return image_path({**record, "image": value})
    raise BadSampleError(f"sample {str(record.get('id', '?'))!r}: field {field!r} must be an image path, image bytes "
                         f"or a PIL image, got {shown(value)}")


def open_record_image(record: dict, skipped: "SkipCounter", strict: bool = False) -> Image.Image | None:
    """A record's image as RGB, or None after counting it in `skipped` (strict: BadSampleError)."""
    sample = str(record.get("id", "?"))
    try:
        return open_image(image_source(record), sample)
    except BadSampleError as err:
        if strict:
            raise
        skipped.add(sample, str(err))
        return None


def pick_text(record: dict, text_field: str, rng: random.Random | None = None) -> str:
    """The record's text for `text_field` (`text_problem`'s rule); a list field yields one element drawn by `rng`."""
    sample = record.get("id", "?")
    if text_field not in record:
        raise ManifestError(f"sample {sample!r}: no text field {text_field!r}; fields present: {sorted(record)}")
    value = record[text_field]
    problem = text_problem(value, text_field, lists=True)
    if problem is not None:
        raise BadSampleError(f"sample {sample!r}: {problem}")
    return (rng or random).choice(value) if isinstance(value, list) else value


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
            image = open_image(image_source(record), sample)
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
        for name, kind in (("filename", str), ("split", str), ("sentences", list)):
            if name not in entry:
                raise ManifestError(f"{where}: missing {name!r}")
            if not isinstance(entry[name], kind):
                raise ManifestError(f"{where}: {name!r} must be a {kind.__name__}, got {shown(entry[name])}")
        split = "train" if (entry["split"] == "restval" and restval_as_train) else entry["split"]
        if splits is not None and split not in splits:
            continue
        raws = [s.get("raw", "") if isinstance(s, dict) else s for s in entry["sentences"]]
        bad = next((j for j, raw in enumerate(raws) if not isinstance(raw, str)), None)
        if bad is not None:  # str() of it would be a reference no one wrote
            raise ManifestError(f"{where}: sentences[{bad}]: 'raw' must be a string, got {shown(raws[bad])}")
        refs = [raw.strip() for raw in raws if raw.strip()]
        if not refs:
            raise ManifestError(f"{where}: no non-empty sentence")
        image = Path(image_root) / entry.get("filepath", "") / entry["filename"]
        sample = entry.get("cocoid", entry.get("imgid", Path(entry["filename"]).stem))
        records.append({"id": str(sample), "image": str(image.resolve()), "split": split,
                        "caption": refs[0], "refs": refs})
    return records


def iter_webdataset(urls: str | Sequence[str], image_keys: Sequence[str] = ("jpg", "png", "jpeg", "webp"),
                    strict: bool = False, skipped: SkipCounter | None = None, raw: bool = False) -> Iterator[dict]:
    """Records from webdataset tar shards (each sample: an image file + a json file).

    Yields {"id": key, "image": PIL image, **json fields}; needs the `webdataset` package.
    A sample without a decodable image is counted in `skipped` (or raises with `strict=True`).

    `raw=True`, for generation over shards (common.generate): every sample whose json is a record, its image
    undecoded: `image` the bytes (absent if the sample has none; the stage that opens it counts it), `_key` the
    sample's key, `_image_key` the extension the bytes were stored under, `_members` every member's bytes by
    extension (as webdataset names them: lowercased), `_json` the json as it was (None if the sample has none),
    `_url` the shard. The `_` fields are internal: a written manifest drops them.
    """
    try:
        import webdataset as wds
    except ImportError as err:
        raise ImportError("reading tar shards needs the webdataset package: pip install webdataset") from err
    skipped = skipped if skipped is not None else SkipCounter()
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        image_key = next((name for name in image_keys if name in sample), None)
        try:
            meta = shard_meta(sample.get("json"), key)
            if raw:
                members = {name: value for name, value in sample.items() if not name.startswith("__")}
                extra = {"image": sample[image_key]} if image_key is not None else {}
                yield {**meta, **extra, "_key": key, "_image_key": image_key, "_members": members,
                       "_json": json.loads(sample["json"]) if "json" in sample else None, "_url": sample["__url__"]}
                continue
            if image_key is None:
                raise BadSampleError(f"sample {key!r}: no image among {list(image_keys)}")
            image = open_image(sample[image_key], key)
        except BadSampleError as err:
            if strict:
                raise
            skipped.add(key, str(err))
            continue
        yield {**meta, "image": image}


def shard_meta(payload: bytes | None, key: str) -> dict:
    """A shard sample's json (none: {}) as a record without its image: its fields, and `id` its own (a string or an
    integer) or else the sample's key. BadSampleError if the json is not an object or its id is no id."""
    try:
        meta = {} if payload is None else json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadSampleError(f"sample {key!r}: its json is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise BadSampleError(f"sample {key!r}: its json must be an object, got {shown(meta)}")
    problem = sample_id_problem(meta.get("id", key))
    if problem is not None:
        raise BadSampleError(f"sample {key!r}: {problem}")
    return {**meta, "id": str(meta.get("id", key))}


def write_webdataset_shard(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write records (with a PIL `image`) as one tar shard: key.png + key.json per sample."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for record in records:
            key = str(record["id"])
            png = io.BytesIO()
            record["image"].save(png, format="PNG")
            meta = json.dumps({k: v for k, v in public_fields(record).items() if k != "image"}).encode()
            for name, payload in ((f"{key}.png", png.getvalue()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def is_shards(data: str | os.PathLike | Sequence[str]) -> bool:
    """Whether `data` names webdataset shards (`x.tar`, a list of them, a `{000..009}` pattern), not a manifest."""
    urls = [str(data)] if isinstance(data, (str, os.PathLike)) else [str(url) for url in data]
    return not (len(urls) == 1 and not urls[0].endswith(".tar"))


def shard_urls(data: str | os.PathLike | Sequence[str]) -> list[str]:
    """The shards `data` names, `{000..009}` brace patterns expanded (zero-padded as written)."""
    urls = [str(data)] if isinstance(data, (str, os.PathLike)) else [str(url) for url in data]
    expanded = []
    for url in urls:
        match = re.fullmatch(r"(.*)\{(\d+)\.\.(\d+)\}(.*)", url)
        expanded += ([f"{match[1]}{i:0{len(match[2])}d}{match[4]}" for i in range(int(match[2]), int(match[3]) + 1)]
                     if match else [url])
    return expanded


def stream_records(data: str | os.PathLike | Sequence[str], rank: int = 0, world_size: int = 1,
                   required: Sequence[str] = REQUIRED_FIELDS, texts: Sequence[str] = (), text_lists: Sequence[str] = (),
                   skipped: SkipCounter | None = None) -> Iterator[dict]:
    """The streaming reader of generation: rank `rank`'s share of a manifest or of webdataset shards, lazily.

    A manifest (`x.jsonl`): every world_size-th record, line by line (`stream_manifest`). Shards (`is_shards`):
    every world_size-th shard, each sample as `iter_webdataset(raw=True)` gives it (every field, the image's bytes
    and the extension they were stored under); `required` (but `image`, whose absence the stage counts),
    `texts` and `text_lists` break a sample as they break a line (ManifestError naming the shard and the key); a
    json that is no record is counted in `skipped`, as iter_webdataset counts it. Nothing grows with the data set.
    """
    if not is_shards(data):
        path = data if isinstance(data, (str, os.PathLike)) else data[0]
        return stream_manifest(path, required, texts, text_lists, rank, world_size)
    check_rank(rank, world_size)
    urls = shard_urls(data)
    missing = next((url for url in urls if "://" not in url and not Path(url).is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"shard not found: {missing}")
    needed = [name for name in required if name != "image"]

    def records() -> Iterator[dict]:
        for url in urls[rank::world_size]:
            for record in iter_webdataset(url, skipped=skipped, raw=True):
                validate_record(record, needed, f"{url}: sample {record['_key']!r}", texts, text_lists)
                yield record

    return records()


# ---------------------------------------------------------------------------------------------
# Ranks, models, sharding (the generation loop itself: common/generate.py)
# ---------------------------------------------------------------------------------------------


def init_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device) under torchrun (gloo on CPU, nccl on CUDA); (0, 1, device) otherwise."""
    check_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        # torch's own advice: destroy the group before exit; left to the interpreter's finalization, gloo's worker
        # threads can free tensors after Python is gone ("terminate called without an active exception")
        atexit.register(destroy_distributed)
    return dist.get_rank(), world_size, device


def destroy_distributed() -> None:
    """Destroy the default process group if it is still alive (a no-op after an explicit destroy)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def load_pretrained(loader, name: str, flag: str, **kwargs):
    """`loader.from_pretrained(name)` (a transformers class) with one clear error naming the flag to pass."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise MissingWeightsError(f"cannot load {name!r} for {flag} ({type(err).__name__}: {err}). Pass {flag} a "
                                  "local folder holding the model, or a hub name with network access.") from err


def load_model(loader, name: str, flag: str, **kwargs):
    """A transformers model by `load_pretrained`, its layers exactly as the checkpoint defines them.

    use_kernels=False on purpose: transformers 5 defaults to True whenever Hugging Face's `kernels`
    package is installed (transformers 5 requires it), and then swaps layers for hub kernels fetched
    at run time on a GPU machine, which changes the numerics and breaks offline runs.
    """
    return load_pretrained(loader, name, flag, use_kernels=False, **kwargs)


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def shard(records: Sequence[dict], rank: int, world_size: int) -> list[dict]:
    """Rank `rank`'s share of `records`: every world_size-th record, so the shares cover all once."""
    check_rank(rank, world_size)
    return list(records[rank::world_size])
