"""Generation over records: the captioning and fusion stages' loop (streamed, resumable per rank, merged) and models.

Each stage that adds fields to every sample (VeCLIP's vec and fuse, CapsFusion's caption and fuse, Altogether's
caption) calls `generate_sharded(data, out, batch_size, process_batch, rank, world_size)`, where
`process_batch(records, counts) -> [(record, new fields)]` returns one pair per sample it keeps, in the batch's
order (checked), and counts why it left a sample out. Nothing on this path grows with the data set:

- Input. `data` is a manifest path or webdataset shards, read lazily by `common.data.stream_records` (rank r
  takes every W-th record, or every W-th shard), or a list of records (the older form: the list is the caller's).
- A manifest in, a manifest out. Each rank appends its share, in input order, to its own file (`rank_path`), one
  flushed line per sample, fsynced after each batch. A resume reads only the end of that file: the last complete
  line's id is where the rank stopped (a truncated last line, what a kill mid-write leaves, is cut off), and the
  share is passed over up to that id. Ids are unique in an input (read_manifest's rule, which a stream cannot
  check), so that id is met once; an id that is not in the share is an error (the output of other input).
- The merge (several ranks). Rank 0 reads the input once more and, for input i, takes the next line of rank
  (i mod W)'s file when that line's id is i's (a sample left out has no line): W open files, input order, the
  bytes of the old merge (which held every record in a dict). A line left over is an error, not a lost sample.
- Shards in, shards out. Shard i is rank (i mod W)'s unit of work. Its output is the shard of the same name in
  the folder `out`: every member of every sample kept (the image's bytes under their own extension), the new
  fields added to the sample's json. It is written under a temporary name and renamed once complete, so a
  resume skips the finished shards and redoes at most one per rank; there is nothing to merge.
- A sample left out (an unreadable image) has no line, and no members in an output shard (`left_out` counts
  those): a chained stage sees the same samples from either kind of output. One left out after a rank's last
  line is tried again by a resume, having left no trace.

Around the loop, what such a stage does with a model (the last section): the weights' dtype, the recipe a resume
checks, loading an image-text or a causal LM, a batch of images with a prompt, decoding a batch deterministically,
flagging a degenerate caption, and `run_generation`, the loop with its counts and the one degenerate-caption line.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from common.data import (REQUIRED_FIELDS, ManifestError, SkipCounter, atomic_write_text, check_rank, image_path,
                         init_distributed, is_shards, load_model, load_pretrained, open_record_image,
                         parse_manifest_line, public_fields, shard_urls, stream_manifest, stream_records,
                         validate_record)
from common.degenerate import DegenerateCounter
from common.training import recipe_changes

log = logging.getLogger(__name__)

TAIL_BLOCK = 65536  # bytes read at a time, backwards from the end of a rank file, to find its last line

def rank_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Where rank `rank` writes: `out.jsonl` itself for one process, `out.rank3-of-8.jsonl` otherwise."""
    path = Path(path)
    return path if world_size == 1 else path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix}")


# ---------------------------------------------------------------------------------------------
# The recipe of a resumable output: resume only what these settings wrote
# ---------------------------------------------------------------------------------------------


def recipe_path(data, out: str | os.PathLike) -> Path:
    """Where the recipe of `out` lives: `<out>.recipe.json` beside a manifest, `<out>/recipe.json` inside the folder
    of output shards (shards in)."""
    return Path(out) / "recipe.json" if _is_path(data) and is_shards(data) else Path(f"{out}.recipe.json")


def _started(data, out: str | os.PathLike, world_size: int) -> bool:
    """Whether `out` holds any output yet: the merged manifest or a rank file; for shards, anything in the folder
    but the recipe (a finished or a partial shard)."""
    out = Path(out)
    if _is_path(data) and is_shards(data):
        return out.is_dir() and any(p.name != "recipe.json" for p in out.iterdir())
    return any(p.exists() for p in {out, *(rank_path(out, r, world_size) for r in range(world_size))})


def check_resumable(data, out: str | os.PathLike, recipe: dict, rank: int = 0, world_size: int = 1,
                    hint: str = "pass a new --out") -> None:
    """Resume `out` only if it was generated with `recipe` (a JSON-ready dict of the settings that decide the
    output), which is kept with it (`recipe_path`).

    A resumed job passes over the samples already written, so an output of other settings (another field, model,
    decoding) would pass for this run's: it is refused, naming them (`recipe_changes`), as is an output without a
    recipe. `hint` ends both errors. Call it on every rank before the model loads; rank 0 writes the recipe.
    """
    path = recipe_path(data, out)
    # the outputs before the recipe: rank 0 writes the recipe before its first line, so no rank misreads a fresh run
    started = _started(data, out, world_size)
    found = json.loads(path.read_text()) if path.exists() else None
    if started and found is None:
        raise ManifestError(f"{out} exists without {path.name}, so its settings are unknown; {hint}")
    if started and found != recipe:
        raise ManifestError(f"{out} holds output of other settings ({recipe_changes(found, recipe)}); {hint} to "
                            "generate with these")
    if rank == 0 and found != recipe:
        atomic_write_text(path, json.dumps(recipe, indent=2))


# ---------------------------------------------------------------------------------------------
# The rank file: append, flush, resume from its last line
# ---------------------------------------------------------------------------------------------


def _newline_before(handle, end: int) -> int:
    """The offset of the last b"\\n" before byte `end`, or -1: blocks read backwards, never the whole file."""
    while end > 0:
        start = max(0, end - TAIL_BLOCK)
        handle.seek(start)
        found = handle.read(end - start).rfind(b"\n")
        if found >= 0:
            return start + found
        end = start
    return -1


def last_line(path: str | os.PathLike, key: str = "id") -> tuple[dict | None, int | None]:
    """(the record of `path`'s last complete line, or None; the length to cut the file to when it ends in a partial
    line, or None), read from the end. ManifestError if that line is corrupt or has no `key`."""
    path = Path(path)
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = _newline_before(handle, size)
        cut = end + 1 if end + 1 < size else None  # bytes after the last newline: a write cut short
        while end >= 0:
            start = _newline_before(handle, end) + 1
            handle.seek(start)
            raw = handle.read(end - start)
            if raw.strip():
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise ManifestError(f"{path}: its last complete line (byte {start}) is corrupt ({err}); only a "
                                        "truncated last line can be repaired") from err
                if not isinstance(record, dict) or key not in record:
                    raise ManifestError(f"{path}: its last line (byte {start}) has no {key!r}: not this job's output")
                return record, cut
            end = start - 1
    return None, cut


class ResumableJSONLWriter:
    """Append-only JSONL output for generation jobs that may be killed at any time.

    Each finished sample is one line, flushed before `write` returns, so a killed process loses at most the
    sample in flight; `sync()` (after each batch, or `write(sync=True)`) fsyncs it against a machine crash. On open
    only the end of the file is read: `last_id` is the id of its last complete line (None for a new file), where
    a resumed job goes on; a truncated last line, the mark of a crash mid-write, is cut off and counted in
    `dropped_partial`. The lines before are not read again, so opening costs the same at 10 lines and at 10^8; a
    corrupt line inside the file (not a crash's doing) is an error for the next reader, the merge or a manifest
    reader, naming its line.
    """

    def __init__(self, path: str | os.PathLike, key: str = "id", fsync: bool = True):
        self.path = Path(path)
        self.key = key
        self.fsync = fsync
        self.last_id: str | None = None
        self.dropped_partial = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record, cut = last_line(self.path, key) if self.path.exists() else (None, None)
        self.last_id = None if record is None else str(record[key])
        self._handle = open(self.path, "ab")
        if cut is not None:
            log.warning("%s: dropping a truncated last line (%d bytes) left by an interrupted run", self.path,
                        self.path.stat().st_size - cut)
            self._handle.truncate(cut)
            self.dropped_partial = 1

    def write(self, record: dict, sync: bool = True) -> None:
        sample = str(record[self.key])
        if sample == self.last_id:
            raise ValueError(f"{self.path}: id {sample!r} written twice")
        self._handle.write(json.dumps(public_fields(record), ensure_ascii=False).encode("utf-8") + b"\n")
        self._handle.flush()
        if sync:
            self.sync()
        self.last_id = sample

    def sync(self) -> None:
        if self.fsync:
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "ResumableJSONLWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# A rank's share, what it has still to do, and the batches
# ---------------------------------------------------------------------------------------------


def _is_path(data) -> bool:
    return isinstance(data, (str, os.PathLike))


def _share(data, rank: int, world_size: int, required: Sequence[str]) -> Iterator[dict]:
    if _is_path(data):
        return stream_records(data, rank, world_size, required)
    if not isinstance(data, Sequence):  # the merge reads it again: a one-pass iterator would be spent
        raise TypeError(f"generation input must be a manifest path, shards or a list of records, got {type(data)}")
    check_rank(rank, world_size)
    return itertools.islice(data, rank, None, world_size)


def _pass_over_done(share: Iterator[dict], last_id: str | None, part: Path, rank: int, data) -> int:
    """Consume `share` up to the record whose id is `last_id` (a resume's starting point); how many were consumed."""
    if last_id is None:
        return 0
    for count, record in enumerate(share, start=1):
        if str(record["id"]) == last_id:
            return count
    source = data if _is_path(data) else "the records given"
    raise ManifestError(f"{part} ends with sample {last_id!r}, which is not in rank {rank}'s share of {source}: it is "
                        "the output of other input (or another order); pass a new --out")


def _output_shard(folder: Path, url: str) -> Path:
    return folder / Path(url).name


def pending(data, out: str | os.PathLike, rank: int = 0, world_size: int = 1,
            required: Sequence[str] = REQUIRED_FIELDS) -> Iterator[dict]:
    """The samples rank `rank` has still to do, as `generate_rank` will give them to process_batch, read-only
    (nothing is repaired or written). A stage checks its input with it before it loads a model."""
    if _is_path(data) and is_shards(data):
        for url in shard_urls(data)[rank::world_size]:
            if not _output_shard(Path(out), url).exists():
                yield from stream_records(url, 0, 1, required)
        return
    share, part = _share(data, rank, world_size, required), rank_path(out, rank, world_size)
    record = last_line(part)[0] if part.exists() else None
    _pass_over_done(share, None if record is None else str(record["id"]), part, rank, data)
    yield from share


def _in_input_order(batch: list[dict], results: Iterable) -> list[tuple[dict, dict]]:
    """`results` as a list, once checked to be one (record, fields) per kept sample, in the batch's order."""
    results, position = list(results), 0
    for record, _ in results:
        while position < len(batch) and batch[position] is not record and \
                str(batch[position]["id"]) != str(record["id"]):
            position += 1
        if position == len(batch):
            raise ValueError(f"process_batch returned sample {record.get('id')!r} out of its batch's order (or twice, "
                             f"or not from the batch): the batch was {[r['id'] for r in batch]}")
        position += 1
    return results


def _results(records: Iterable[dict], batch_size: int, process_batch: Callable, counts: Counter,
             after_batch: Callable[[int], None]) -> Iterator[tuple[dict, dict]]:
    """(record, new fields) of every kept sample, batch by batch; `after_batch(n)` once a batch's are consumed."""
    records = iter(records)
    while batch := list(itertools.islice(records, batch_size)):
        yield from _in_input_order(batch, process_batch(batch, counts))
        after_batch(len(batch))


# ---------------------------------------------------------------------------------------------
# One rank's work: a manifest, or shards
# ---------------------------------------------------------------------------------------------


def generate_rank(data, out: str | os.PathLike, batch_size: int, process_batch: Callable, rank: int = 0,
                  world_size: int = 1, desc: str = "generate", required: Sequence[str] = REQUIRED_FIELDS) -> Counter:
    """Rank `rank`'s part of `generate_sharded`, with no process group (so one process can play every rank): its
    share of `data` through `process_batch` into its rank file, or its shards into output shards. The counts."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if _is_path(data) and is_shards(data):
        return _generate_shards(data, Path(out), batch_size, process_batch, rank, world_size, desc, required)
    out, counts = Path(out), Counter(already_done=0)
    with ResumableJSONLWriter(rank_path(out, rank, world_size)) as writer:
        share = _share(data, rank, world_size, required)
        counts["already_done"] = _pass_over_done(share, writer.last_id, writer.path, rank, data)
        total = None if _is_path(data) else len(range(rank, len(data), world_size)) - counts["already_done"]
        root = out.resolve().parent
        with tqdm(total=total, desc=desc, unit="sample", disable=rank != 0) as bar:
            for record, fields in _results(share, batch_size, process_batch, counts,
                                           lambda n: (writer.sync(), bar.update(n))):
                # a local image path is relative to the manifest's folder: re-root it at the output's;
                # a URL, or no image at all (text-only jobs such as caption fusion), stays as it is
                image = record.get("image")
                if isinstance(image, str) and "://" not in image:
                    fields = {"image": os.path.relpath(image_path(record).resolve(), root), **fields}
                writer.write({**record, **fields}, sync=False)
                counts["written"] += 1
    return counts


def _add_sample(tar: tarfile.TarFile, record: dict, fields: dict) -> None:
    """Every member of a shard sample, its json with the new fields added."""
    members = dict(record["_members"])
    members["json"] = json.dumps({**(record["_json"] or {}), **fields}, ensure_ascii=False).encode("utf-8")
    for extension, payload in members.items():
        info = tarfile.TarInfo(f"{record['_key']}.{extension}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


def _generate_shards(data, folder: Path, batch_size: int, process_batch: Callable, rank: int, world_size: int,
                     desc: str, required: Sequence[str]) -> Counter:
    if folder.suffix == ".jsonl" or folder.is_file():
        raise ManifestError(f"shards in, shards out: the output {folder} must be a folder for the shards, not a file")
    urls = shard_urls(data)
    twice = next((name for name, n in Counter(Path(url).name for url in urls).items() if n > 1), None)
    if twice is not None:
        raise ManifestError(f"two input shards are named {twice}: their outputs in {folder} would be one file")
    folder.mkdir(parents=True, exist_ok=True)
    counts, skipped = Counter(shards_already_done=0), SkipCounter()
    with tqdm(desc=desc, unit="sample", disable=rank != 0) as bar:
        for url in urls[rank::world_size]:
            target = _output_shard(folder, url)
            if target.exists():
                counts["shards_already_done"] += 1
            else:
                _write_shard(stream_records(url, 0, 1, required, skipped=skipped), target, batch_size, process_batch,
                             counts, bar)
    if skipped.count:
        counts["bad_shard_samples"] += skipped.count
    return counts


def _write_shard(records: Iterator[dict], target: Path, batch_size: int, process_batch: Callable, counts: Counter,
                 bar) -> None:
    """One output shard, written under a temporary name (a killed run's is overwritten) and renamed when complete."""
    partial, read, written = target.with_name(f".{target.name}.partial"), 0, counts["written"]

    def after_batch(n: int) -> None:
        nonlocal read
        read += n
        bar.update(n)

    with open(partial, "wb") as handle:
        with tarfile.open(fileobj=handle, mode="w") as tar:
            for record, fields in _results(records, batch_size, process_batch, counts, after_batch):
                _add_sample(tar, record, fields)
                counts["written"] += 1
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, target)
    counts["shards_written"] += 1
    if read > counts["written"] - written:
        counts["left_out"] += read - (counts["written"] - written)


# ---------------------------------------------------------------------------------------------
# All ranks: counts, the merge
# ---------------------------------------------------------------------------------------------


def _rank_lines(part: Path) -> Iterator[tuple[int, str, bytes]]:
    """(line number, id, the line as the merge writes it) of each line of a rank file, checked."""
    with open(part, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if raw.strip():
                record = parse_manifest_line(raw, part, line_no)
                validate_record(record, ("id",), f"{part}:{line_no}")
                yield line_no, str(record["id"]), json.dumps(public_fields(record), ensure_ascii=False).encode() + b"\n"


def merge_rank_outputs(path: str | os.PathLike, world_size: int, order: Iterable) -> Path:
    """Merge the per-rank files of a finished job into `path`: for the i-th id of `order` (the input's ids, in
    input order, streamed), the next line of rank (i mod world_size)'s file if its id is that one. Written through
    a temporary file and a rename. A line no input matched is an error naming it: the rank files are not this
    input's, or not in its order."""
    path = Path(path)
    if world_size == 1:
        return path
    parts = [rank_path(path, rank, world_size) for rank in range(world_size)]
    for part in parts:
        if not part.exists():
            raise FileNotFoundError(f"rank output not found: {part}")
        with ResumableJSONLWriter(part) as check:
            if check.dropped_partial:
                log.warning("%s had a truncated last line; that sample is missing from the merge", part)
    readers = [_rank_lines(part) for part in parts]
    heads = [next(reader, None) for reader in readers]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for i, sample in enumerate(order):
                head = heads[i % world_size]
                if head is not None and head[1] == str(sample):
                    out.write(head[2])
                    heads[i % world_size] = next(readers[i % world_size], None)
            left = next(((rank, head) for rank, head in enumerate(heads) if head is not None), None)
            if left is not None:
                rank, (line_no, sample, _) = left
                raise ManifestError(f"{parts[rank]}:{line_no}: sample {sample!r} is not next in rank {rank}'s share of "
                                    "the input: these rank files are the output of other input, or another order")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def input_ids(data) -> Iterator[str]:
    """The ids of a generation input in input order, streamed (a manifest is read once more)."""
    records = stream_manifest(data, required=("id",)) if _is_path(data) else data
    return (str(record["id"]) for record in records)


def generate_sharded(data, out: str | os.PathLike, batch_size: int, process_batch: Callable, rank: int = 0,
                     world_size: int = 1, desc: str = "generate", required: Sequence[str] = REQUIRED_FIELDS) -> dict:
    """Run `process_batch(records, counts) -> [(record, new fields)]` over this rank's unfinished samples.

    `data`: a manifest path, shards (`x.tar`, `shards/{000..009}.tar`; `out` is then a folder of output shards) or
    a list of records; `required`: the fields each streamed record must have (read_manifest's rule; a list is
    taken as it is). Each rank runs `generate_rank`; with several ranks (torch.distributed initialised) the
    counts are summed, and for a manifest rank 0 merges the rank files into `out` in input order once all have
    finished. Returns the counts: `already_done` (samples of the share a resume passed over), `written`, and
    what process_batch counted; for shards `shards_already_done`, `shards_written`, `left_out`.
    """
    counts = generate_rank(data, out, batch_size, process_batch, rank, world_size, desc, required)
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, dict(counts))
        counts = sum((Counter(part) for part in parts), Counter())
        if rank == 0 and not (_is_path(data) and is_shards(data)):
            merge_rank_outputs(out, world_size, input_ids(data))
        dist.barrier()
    return dict(counts)


def merge_rank_counters(counter, rank: int, world_size: int):
    """`counter` (a common.degenerate.DegenerateCounter) with every other rank's counts and examples added, so
    that rank 0's one log line covers the whole job; the counter itself with one process."""
    if world_size > 1:
        summaries = [None] * world_size
        dist.all_gather_object(summaries, counter.summary())
        for other, summary in enumerate(summaries):
            if other != rank:
                counter.merge(summary)
    return counter



# ---------------------------------------------------------------------------------------------
# A generation stage's model: dtype, recipe, loading, decoding, the degenerate flag, the run
# ---------------------------------------------------------------------------------------------


def weights_dtype(name: str, device: str) -> torch.dtype:
    """The dtype a generating model's weights run in: `name` ("bfloat16", ...) on CUDA, float32 on the CPU (bf16
    matmuls are slow there, and CPU runs are tests and miniatures)."""
    return getattr(torch, name) if str(device).startswith("cuda") else torch.float32


def generation_recipe(data, settings: dict, dtype: torch.dtype) -> dict:
    """What decides a generation stage's output, for `check_resumable`: the input (its path; None for a list of
    records), the stage's `settings` and the dtype the weights actually run in (`weights_dtype`'s: a CPU run's
    float32, not the flag's bfloat16)."""
    return {"data": data if _is_path(data) else None, **settings, "gen_dtype": str(dtype).removeprefix("torch.")}


def start_generation(data, out: str | os.PathLike, settings: dict, dtype_name: str,
                     device: str) -> tuple[int, int, str, torch.dtype]:
    """(rank, world_size, device, weights dtype) of a generation stage on this rank (`init_distributed`), once
    `out` is known to hold nothing or output of these settings (`check_resumable` of `generation_recipe`)."""
    rank, world_size, device = init_distributed(device)
    dtype = weights_dtype(dtype_name, device)
    check_resumable(data, out, generation_recipe(data, settings, dtype), rank, world_size)
    return rank, world_size, device, dtype


def load_image_text_model(name: str, flag: str, device: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """(processor, model) of an image-text-to-text model (LLaVA, BLIP), in eval mode on `device`, its tokenizer
    padding on the left: a decoder-only model continues each prompt from the right end."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = load_pretrained(AutoProcessor, name, flag, trust_remote_code=trust_remote_code)
    model = load_model(AutoModelForImageTextToText, name, flag, dtype=dtype, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    processor.tokenizer.padding_side = "left"
    return processor, model


def load_causal_lm(name: str, flag: str, device: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """(tokenizer, model) of a causal LM on `device` in eval mode (a trainer calls model.train()), with a pad token
    (Llama ships none; padding is masked)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, name, flag, trust_remote_code=trust_remote_code)
    model = load_model(AutoModelForCausalLM, name, flag, dtype=dtype, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer, model


def chat_image_prompt(processor, text: str) -> str:
    """`text` after an image, in one user turn of the processor's chat template, ready for the answer; `text`
    itself when the processor has no template (BLIP)."""
    if not getattr(processor, "chat_template", None):
        return text
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(turn, add_generation_prompt=True)


def image_batch(processor, prompt: str | None, batch: list[dict], skipped: SkipCounter, strict: bool, counts: Counter,
                device: str, dtype: torch.dtype) -> tuple[list[dict], dict | None]:
    """(records, inputs): the samples of `batch` whose image opens and the processor's batch of their images, each
    with `prompt` (None: BLIP captions an image alone), on `device`, the pixels in the weights' `dtype`. An
    unreadable image is counted in `skipped` and `counts["unreadable_images"]` and left out (strict: an error);
    with none left, ([], None)."""
    opened = [(record, open_record_image(record, skipped, strict)) for record in batch]
    kept = [(record, image) for record, image in opened if image is not None]
    counts["unreadable_images"] += len(batch) - len(kept)
    if not kept:
        return [], None
    text = {"text": [prompt] * len(kept)} if prompt is not None else {}
    inputs = processor(images=[image for _, image in kept], return_tensors="pt", padding=True, **text).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return [record for record, _ in kept], inputs


def new_tokens(model, inputs, max_new_tokens: int, num_beams: int = 1, **options) -> torch.Tensor:
    """Deterministic continuations (B, new) of a left-padded batch: greedy (num_beams=1) or beam search, never
    sampling whatever the checkpoint's generation config says; the prompt that decoder-only models echo is cut
    (BLIP-style captioners return their own sequence)."""
    with torch.no_grad():
        output = model.generate(**inputs, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False,
                                **options)
    prompt = inputs.get("input_ids")
    if prompt is not None and output.shape[1] > prompt.shape[1] and torch.equal(output[:, :prompt.shape[1]], prompt):
        return output[:, prompt.shape[1]:]
    return output


def generate_texts(model, tokenizer, inputs, max_new_tokens: int, num_beams: int = 1, **options) -> list[str]:
    """`new_tokens` decoded without special tokens, stripped: one text per row of the batch."""
    output = new_tokens(model, inputs, max_new_tokens, num_beams, **options)
    return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]


def degenerate_flag(counter: DegenerateCounter, caption: str, sample, field: str, counts: Counter,
                    count_key: str = "degenerate", usable_too: bool = False) -> dict:
    """`{"<field>_degenerate": reason}` when the caption generated into `field` is degenerate (common.degenerate),
    counted in `counts[count_key]`: it is written, not dropped, so the next stage (or a person) decides, and each
    generated field has its own flag. A usable caption: `{"<field>_degenerate": None}` and a count of 0 if
    `usable_too` (VeCLIP: a checked field says so), else nothing (CapsFusion: the flag only where one is raised)."""
    reason = counter.check(caption, sample=sample)
    if reason is None and not usable_too:
        return {}
    counts[count_key] += reason is not None
    return {f"{field}_degenerate": reason}


def run_generation(data, out: str | os.PathLike, batch_size: int, process_batch: Callable, stage: str,
                   device: str, counter: DegenerateCounter, what: str = "generated captions", logger=log,
                   required: Sequence[str] = REQUIRED_FIELDS) -> dict:
    """`generate_sharded` over this rank's unfinished samples of `data`, then, on rank 0, the counts and
    `counter`'s line (every rank's degenerate captions merged) logged to `logger`: a warning when one is
    degenerate. The counts."""
    rank, world_size, _ = init_distributed(device)
    counts = generate_sharded(data, out, batch_size, process_batch, rank, world_size, stage, required=required)
    merge_rank_counters(counter, rank, world_size)
    if rank == 0:
        logger.info("%s: %s -> %s", stage, counts, out)
        if counter.checked:
            line = counter.line(what, 'flagged in "<field>_degenerate"')
            (logger.warning if counter.degenerate else logger.info)("%s: %s", stage, line)
    return counts
