"""Columnar records: a manifest or webdataset shards indexed once into columns on disk, so a training run over
millions of samples reads each value with two `os.pread` calls and holds no Python dict per sample.

`index_data` (a manifest or shards) returns a `Columns`; `open_row_image` opens a row's image. The index is
rebuilt when its sources change, and built under a lock so that the ranks of one job build it once.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from common.data import (REQUIRED_FIELDS, BadSampleError, ManifestError, parse_manifest_line, atomic_write_text,
                         image_source, is_shards, open_image, shard_meta, shard_urls, validate_record)

log = logging.getLogger(__name__)

INDEX_VERSION = 2  # 2: a manifest's index keeps each row's line number (`Columns.where`)
LINES_FILE = "lines.i64"  # not a column's name: a field's files end in .bin and .idx
OFFSET_BLOCK = 65536  # offsets the index writer buffers before it appends them to a column's .idx file


class Columns:
    """A manifest (or webdataset shards) as columns on disk, read with `os.pread`: nothing grows with N in RAM.

    Each field is two files in `folder`: `<field>.bin`, the values one after another as UTF-8 JSON,
    and `<field>.idx`, N + 1 little-endian int64 offsets into it (an absent value has length 0).
    A value is read with two preads (its offsets, then its bytes), so a training rank holds no
    list of dicts (about 1.2 KB each: 14 GB at 12M samples) and no memory map, whose touched pages
    would count in its resident memory; the page cache keeps hot files fast. Build one with
    `index_manifest` or `index_shards`; `root` resolves relative image paths as `read_manifest` does.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.n, self.fields, self.root, self.source = meta["n"], meta["fields"], meta["root"], meta["source"]
        self._files: dict[str, tuple[int, int]] = {}

    def __len__(self) -> int:
        return self.n

    def _fds(self, name: str) -> tuple[int, int]:
        # opened lazily, after any fork, so that every DataLoader worker has descriptors of its own
        key = f"{os.getpid()}:{name}"
        if key not in self._files:
            if name not in self.fields:
                raise ManifestError(f"{self.source}: no field {name!r}; fields present: {self.fields}")
            self._files[key] = (os.open(self.folder / f"{name}.idx", os.O_RDONLY),
                                os.open(self.folder / f"{name}.bin", os.O_RDONLY))
        return self._files[key]

    def value(self, name: str, row: int):
        """The field's value of one row (None where the sample has no such field)."""
        if not 0 <= row < self.n:
            raise IndexError(f"row {row} outside the {self.n} rows of {self.source}")
        idx, data = self._fds(name)
        start, end = struct.unpack("<2q", os.pread(idx, 16, 8 * row))
        return json.loads(os.pread(data, end - start, start)) if end > start else None

    def column(self, name: str, rows: Iterable[int]) -> list:
        """The field's values of `rows`, in order."""
        return [self.value(name, int(row)) for row in rows]

    def where(self, row: int) -> str:
        """Where row `row` comes from, for messages: `manifest:line`, or the shards and the row."""
        lines = self.folder / LINES_FILE
        if not lines.exists():
            return f"{self.source} (row {row})"
        with open(lines, "rb") as handle:
            return f"{self.source}:{struct.unpack('<q', os.pread(handle.fileno(), 8, 8 * row))[0]}"

    def record(self, row: int) -> dict:
        """One row as the dict `read_manifest` would give (with `_root`)."""
        record = {name: self.value(name, row) for name in self.fields}
        return {**{k: v for k, v in record.items() if v is not None}, "_root": self.root}

    def scan(self, name: str, chunk: int = 65536) -> Iterator[tuple[int, Any]]:
        """(row, value) of every row in order, read in large sequential chunks (masks over all rows)."""
        idx, data = self._fds(name)
        for first in range(0, self.n, chunk):
            count = min(chunk, self.n - first)
            offsets = np.frombuffer(os.pread(idx, 8 * (count + 1), 8 * first), dtype="<i8")
            blob = os.pread(data, int(offsets[-1] - offsets[0]), int(offsets[0]))
            base = int(offsets[0])
            for i in range(count):
                start, end = int(offsets[i]) - base, int(offsets[i + 1]) - base
                yield first + i, (json.loads(blob[start:end]) if end > start else None)

    def rows_where(self, keep: Callable[[dict], bool], names: Sequence[str]) -> np.ndarray:
        """Rows (int64) whose values of `names` pass `keep({name: value})`, one sequential pass per field."""
        mask = np.zeros(self.n, dtype=bool)  # one byte a row, not a Python list
        for items in zip(*(self.scan(name) for name in names)):
            mask[items[0][0]] = keep({name: value for name, (_, value) in zip(names, items)})
        return np.flatnonzero(mask)

    def __getstate__(self):  # descriptors are per process
        return {**self.__dict__, "_files": {}}


class _ColumnsWriter:
    """Appends rows to the column files of a new index; offsets are buffered, flushed in blocks."""

    def __init__(self, folder: Path):
        self.folder, self.n, self.columns = folder, 0, {}

    def _column(self, name: str) -> dict:
        if name not in self.columns:
            if not name or "/" in name or name.startswith("."):
                raise ManifestError(f"field name {name!r} cannot be a column")
            column = {"bin": open(self.folder / f"{name}.bin", "wb"), "idx": open(self.folder / f"{name}.idx", "wb"),
                      # a field first seen at row n: rows before lack it
                      "size": 0, "written": 0, "offsets": [0] * (self.n + 1)}
            self.columns[name] = column
        return self.columns[name]

    def add(self, record: dict) -> None:
        for name, value in record.items():
            if not name.startswith("_"):
                column = self._column(name)
                self._cover(column, self.n)
                payload = json.dumps(value, ensure_ascii=False).encode("utf-8")
                column["bin"].write(payload)
                column["size"] += len(payload)
                column["offsets"].append(column["size"])  # the end of row n
                if len(column["offsets"]) > OFFSET_BLOCK:  # keep the last offset: the next row starts there
                    column["idx"].write(np.asarray(column["offsets"][:-1], dtype="<i8").tobytes())
                    column["written"] += len(column["offsets"]) - 1
                    column["offsets"] = column["offsets"][-1:]
        self.n += 1

    @staticmethod
    def _cover(column: dict, rows: int) -> None:
        # offsets of rows 0..rows-1 are known once written + buffered = rows + 1; a row without the field
        # repeats the last offset (length 0, read back as None)
        while column["written"] + len(column["offsets"]) < rows + 1:
            column["offsets"].append(column["size"])

    def close(self, meta: dict) -> None:
        for column in self.columns.values():
            self._cover(column, self.n)
            column["idx"].write(np.asarray(column["offsets"], dtype="<i8").tobytes())
            column["bin"].close()
            column["idx"].close()
        atomic_write_text(self.folder / "meta.json", json.dumps({**meta, "n": self.n, "fields": sorted(self.columns),
                                                                 "version": INDEX_VERSION}))


def _source_stamp(paths: Sequence[Path]) -> list:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def _fresh_index(folder: Path, stamp: list) -> bool:
    meta = folder / "meta.json"
    if not meta.exists():
        return False
    found = json.loads(meta.read_text())
    return found.get("stamp") == stamp and found.get("version") == INDEX_VERSION


def _check_unique_ids(columns: Columns, where: Callable[[int], str]) -> None:
    # 8 bytes a row: hashes of the ids, sorted; a collision is confirmed by comparing the ids themselves
    hashes = np.fromiter((hash(str(v)) for _, v in columns.scan("id")), dtype=np.int64, count=len(columns))
    order = np.argsort(hashes, kind="stable")
    for a, b in zip(order[:-1][hashes[order[:-1]] == hashes[order[1:]]],
                    order[1:][hashes[order[:-1]] == hashes[order[1:]]]):
        first, second = sorted((int(a), int(b)))
        if columns.value("id", first) == columns.value("id", second):
            raise ManifestError(f"{where(second)}: id {columns.value('id', second)!r} already used at {where(first)}")


def _remove_index(folder: Path) -> None:
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()


def _build_under_lock(folder: Path, stamp: list, build: Callable[[Path], None]) -> Columns:
    """Build the index into a temporary folder and rename it into place; with several ranks, rank 0 builds."""
    distributed = dist.is_available() and dist.is_initialized()
    if not _fresh_index(folder, stamp) and (not distributed or dist.get_rank() == 0):
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            build(tmp)
        except BaseException:
            _remove_index(tmp)  # a bad line stops the build: nothing half-built is left behind
            raise
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old{os.getpid()}")
            os.replace(folder, old)
            _remove_index(old)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built the same index meanwhile: keep theirs if it is fresh
            _remove_index(tmp)
            if not _fresh_index(folder, stamp):
                raise
    if distributed:
        dist.barrier()
    return Columns(folder)


def index_manifest(path: str | os.PathLike, folder: str | os.PathLike | None = None,
                   required: Sequence[str] = REQUIRED_FIELDS) -> Columns:
    """Columns of a JSONL manifest, built once into `folder` (default `<manifest>.index/`) and reused while
    the manifest is unchanged (size and mtime). Lines are checked as `read_manifest` checks them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    folder = Path(folder) if folder is not None else path.with_name(path.name + ".index")
    stamp = _source_stamp([path])

    def build(tmp: Path) -> None:
        writer, line_of, block = _ColumnsWriter(tmp), [], []  # line numbers for errors, packed in blocks
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if raw.strip():
                    record = parse_manifest_line(raw, path, line_no)
                    validate_record(record, required, where=f"{path}:{line_no}")
                    writer.add(record)
                    block.append(line_no)
                    if len(block) == OFFSET_BLOCK:
                        line_of.append(np.asarray(block, dtype=np.int64))
                        block = []
        np.concatenate(line_of + [np.asarray(block, dtype="<i8")]).astype("<i8").tofile(tmp / LINES_FILE)
        writer.close({"source": str(path), "root": str(path.parent.resolve()), "stamp": stamp})
        columns = Columns(tmp)
        _check_unique_ids(columns, columns.where)

    return _build_under_lock(folder, stamp, build)


def index_shards(urls: Sequence[str | os.PathLike], folder: str | os.PathLike,
                 image_keys: Sequence[str] = ("jpg", "png", "jpeg", "webp")) -> Columns:
    """Columns of webdataset tar shards (key.jpg + key.json per sample): the json fields, and `image` as
    {"shard", "offset", "size"} of the image's bytes inside the (uncompressed) tar, for random access."""
    shards = [Path(url) for url in urls]
    for shard_path in shards:
        if not shard_path.is_file():
            raise FileNotFoundError(f"shard not found: {shard_path}")
    stamp = _source_stamp(shards)

    def build(tmp: Path) -> None:
        writer = _ColumnsWriter(tmp)
        for shard_path in tqdm(shards, desc="index shards", disable=len(shards) < 2):
            samples: dict[str, dict] = {}
            with tarfile.open(shard_path, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, extension = member.name.rpartition(".")
                    sample = samples.setdefault(key, {})
                    if extension == "json":
                        try:
                            sample["meta"] = shard_meta(tar.extractfile(member).read(), key)
                        except BadSampleError as err:
                            raise ManifestError(f"{shard_path}: {member.name}: {err}") from err
                    elif extension.lower() in image_keys:
                        sample["image"] = {"shard": str(shard_path.resolve()), "offset": member.offset_data,
                                           "size": member.size}
                    if "meta" in sample and "image" in sample:  # complete: write it, forget it
                        writer.add({**sample["meta"], "image": sample["image"]})
                        del samples[key]
            for key, sample in samples.items():
                log.warning("%s: sample %r has no %s; skipped", shard_path, key,
                            "image" if "meta" in sample else "json")
        writer.close({"source": ", ".join(str(s) for s in shards), "root": "/", "stamp": stamp})
        columns = Columns(tmp)
        _check_unique_ids(columns, columns.where)

    return _build_under_lock(Path(folder), stamp, build)


def index_data(data: str | Sequence[str], folder: str | os.PathLike | None = None) -> Columns:
    """A manifest (`x.jsonl`) or webdataset shards (`x.tar`, a list, or a `{000..009}` brace pattern) as Columns."""
    if not is_shards(data):
        return index_manifest(str(data) if isinstance(data, str) else data[0], folder)
    expanded = shard_urls(data)
    return index_shards(expanded, folder or Path(expanded[0]).with_name(Path(expanded[0]).stem + ".index"))


def open_row_image(columns: Columns, row: int) -> Image.Image:
    """The image of one row (a path, relative to the manifest's folder, or bytes inside a tar shard) as RGB."""
    image, sample = columns.value("image", row), str(columns.value("id", row))
    if isinstance(image, dict):
        try:
            with open(image["shard"], "rb") as handle:
                handle.seek(image["offset"])
                return open_image(handle.read(image["size"]), sample)
        except OSError as err:
            raise BadSampleError(f"sample {sample!r}: cannot read its bytes in {image['shard']} ({err})") from err
    return open_image(image_source({"id": sample, "image": image, "_root": columns.root}), sample)
