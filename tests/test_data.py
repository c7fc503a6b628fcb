"""common/data.py: manifests, bad input, sharding, COCO and webdataset loaders, the streaming readers of generation;
common/generate.py: the resumable writer, resume and merge without holding the input, shards in and shards out."""

import io
import json
import os
import re
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import (BadSampleError, ManifestDataset, ManifestError, SkipCounter, collate_skip_bad, is_shards,
                         iter_webdataset, load_coco_karpathy, open_record_image, read_manifest, shard, shard_urls,
                         stream_manifest, stream_records, write_manifest, write_webdataset_shard)
from common.columns import index_data, index_manifest, open_row_image
from common.generate import (ResumableJSONLWriter, generate_rank, generate_sharded, input_ids, merge_rank_outputs,
                             pending, rank_path)


def make_images(folder: Path, n: int) -> list[dict]:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 20 % 255, 0, 0)).save(folder / "images" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"images/{i}.png", "caption": f"caption {i}", "refs": [f"r{i}", "x"]})
    return records


def test_manifest_round_trip(tmp_path):
    records = make_images(tmp_path, 3)
    records[0]["caption"] = "ünïcode ✓ caption"
    write_manifest(tmp_path / "m.jsonl", records)
    back = read_manifest(tmp_path / "m.jsonl")
    assert [{k: v for k, v in r.items() if k != "_root"} for r in back] == records
    assert all(Path(r["_root"]) == tmp_path for r in back)
    write_manifest(tmp_path / "again.jsonl", back)  # internal keys are not written
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "m.jsonl").read_bytes()


@pytest.mark.parametrize("line, message", [
    (b'{"id": "a", "image": "x.png"}\n\xff\xfe bad bytes\n', "m.jsonl:2: not valid UTF-8"),
    (b'{"id": "a", "image": "x.png"}\n{"id": "b", "image": \n', "m.jsonl:2: not valid JSON"),
    (b'{"id": "a", "image": "x.png"}\n{"id": "b", "caption": "c"}\n', "m.jsonl:2 (id 'b'): missing field 'image'"),
    (b'{"id": "a", "image": "x.png"}\n{"id": "a", "image": "y.png"}\n', "id 'a' already used on line 1"),
    (b'[1, 2]\n', "expected a JSON object"),
])
def test_bad_manifest_lines_name_file_line_and_id(tmp_path, line, message):
    (tmp_path / "m.jsonl").write_bytes(line)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(tmp_path / "m.jsonl")


def test_required_field_empty_is_an_error(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "image": "x.png", "caption": "  "}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:1 \(id 'a'\): field 'caption' is empty"):
        read_manifest(tmp_path / "m.jsonl", required=("id", "image", "caption"))


def test_dataset_skips_and_counts_bad_samples(tmp_path):
    records = make_images(tmp_path, 4)
    records[1]["image"] = "images/missing.png"
    (tmp_path / "images" / "2.png").write_bytes(b"\x89PNG this is not an image")
    records[3]["caption"] = ""
    write_manifest(tmp_path / "m.jsonl", records)
    dataset = ManifestDataset(read_manifest(tmp_path / "m.jsonl"), "caption",
                              preprocess=lambda im: __import__("torch").zeros(3, 8, 8))
    batch = collate_skip_bad([dataset[i] for i in range(4)])
    assert batch[0].shape == (1, 3, 8, 8) and batch[1] == ["caption 0"]
    assert dataset.skipped.count == 3
    reasons = dict(dataset.skipped.examples)
    assert "image file not found" in reasons["s1"]
    assert "cannot be decoded" in reasons["s2"]
    assert "field 'caption' is empty" in reasons["s3"]
    strict = ManifestDataset(read_manifest(tmp_path / "m.jsonl"), "caption", strict=True)
    with pytest.raises(BadSampleError, match="sample 's1': image file not found"):
        strict[1]
    assert collate_skip_bad([None, None]) is None


def test_dataset_tokenises_and_draws_from_list_fields(tmp_path):
    records = make_images(tmp_path, 2)
    write_manifest(tmp_path / "m.jsonl", records)
    dataset = ManifestDataset(read_manifest(tmp_path / "m.jsonl"), "refs", tokenizer=lambda texts: [texts[0].upper()])
    assert {dataset[0][1] for _ in range(30)} == {"R0", "X"}  # both references of a list field get drawn
    with pytest.raises(ManifestError, match="no text field 'nope'"):
        ManifestDataset(dataset.records, "nope")[0]


def write_ids(path: Path, n: int, delay: float) -> None:
    """A generation job: ids 0..n-1, going on after the last one a previous run finished."""
    with ResumableJSONLWriter(path) as out:
        for i in range(0 if out.last_id is None else int(out.last_id) + 1, n):
            out.write({"id": str(i), "text": "x" * 200})
            time.sleep(delay)


def kill_once_written(target, args: tuple, path: Path, size: int, poll: float) -> None:
    """Run `target(*args)` in a forked process (it shares this one's imports) and SIGKILL it once `path` holds
    `size` bytes (60 s at most)."""
    import multiprocessing

    job = multiprocessing.get_context("fork").Process(target=target, args=args)
    job.start()
    deadline = time.time() + 60
    while (not path.exists() or path.stat().st_size < size) and time.time() < deadline:
        time.sleep(poll)
    os.kill(job.pid, signal.SIGKILL)
    job.join()
    assert job.exitcode == -signal.SIGKILL


def test_resumable_writer_survives_a_kill(tmp_path):
    """SIGKILL a writing job (a forked process: it shares this one's imports) mid-run, then run it again."""
    path = tmp_path / "out.jsonl"
    kill_once_written(write_ids, (path, 10_000, 0.002), path, 3000, 0.01)
    write_ids(path, 200, 0.0)
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert sorted(ids, key=int) == [str(i) for i in range(max(200, len(ids)))][: len(ids)]
    assert len(ids) == len(set(ids)) and set(map(str, range(200))) <= set(ids)


def test_resumable_writer_drops_a_truncated_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    with ResumableJSONLWriter(path) as out:
        for i in range(3):
            out.write({"id": i, "caption": f"c{i}"})
    with open(path, "ab") as handle:  # a crash in the middle of writing sample 3
        handle.write(b'{"id": 3, "capt')
    with ResumableJSONLWriter(path) as out:
        assert out.last_id == "2" and out.dropped_partial == 1
        out.write({"id": 3, "caption": "c3"})
        with pytest.raises(ValueError, match="written twice"):
            out.write({"id": 3, "caption": "again"})
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    path.write_bytes(b'{"id": "only half')  # killed during its first line: nothing to keep
    with ResumableJSONLWriter(path) as out:
        assert out.last_id is None and out.dropped_partial == 1 and path.stat().st_size == 0


def test_resume_reads_the_end_of_the_file_and_the_merge_names_a_corrupt_line_inside(tmp_path, monkeypatch):
    """Opening reads blocks back from the end, whatever the file's length; a corrupt last complete line is refused
    there, a corrupt line inside the file by the merge, which reads every line, naming it."""
    import common.generate

    monkeypatch.setattr(common.generate, "TAIL_BLOCK", 7)  # lines longer than a block: several reads back
    path = tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": "x" * 30}) + "\n" for i in range(50)) + "\n\n")
    with ResumableJSONLWriter(path) as out:
        assert out.last_id == "49" and out.dropped_partial == 0  # blank lines at the end are passed over
    path.write_text('{"id": 0}\n{"id": 1}\nnot json\n')  # not a truncation: the line ends
    with pytest.raises(ManifestError, match=r"out.jsonl: its last complete line \(byte 20\) is corrupt"):
        ResumableJSONLWriter(path)
    out = tmp_path / "m.jsonl"
    rank_path(out, 0, 2).write_text('{"id": "a"}\n{"id": "c"}\n')
    rank_path(out, 1, 2).write_text('{"id": "b"}\nnot json\n{"id": "d"}\n')
    with ResumableJSONLWriter(rank_path(out, 1, 2)) as writer:
        assert writer.last_id == "d"  # only the end is read on open
    with pytest.raises(ManifestError, match=r"m.rank1-of-2.jsonl:2: not valid JSON"):
        merge_rank_outputs(out, 2, ["a", "b", "c", "d"])
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.rank0-of-2.jsonl", "m.rank1-of-2.jsonl", "out.jsonl"]  # no half-merged file


@pytest.mark.parametrize("n, world", [(0, 1), (1, 3), (10, 1), (10, 3), (17, 4), (5, 8)])
def test_sharding_covers_every_sample_once(n, world):
    records = [{"id": str(i)} for i in range(n)]
    shares = [shard(records, rank, world) for rank in range(world)]
    assert sorted((r["id"] for share in shares for r in share), key=int) == [str(i) for i in range(n)]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        shard(records, world, world)


def test_rank_outputs_merge_in_order(tmp_path):
    path = tmp_path / "gen.jsonl"
    assert rank_path(path, 0, 1) == path and rank_path(path, 1, 2).name == "gen.rank1-of-2.jsonl"
    records = [{"id": f"s{i}", "caption": f"c{i}"} for i in range(7)]
    for rank in range(2):
        with ResumableJSONLWriter(rank_path(path, rank, 2)) as out:
            for record in shard(records, rank, 2):
                out.write(record)
    merge_rank_outputs(path, 2, order=[r["id"] for r in records])
    assert [r["id"] for r in read_manifest(path, required=("id",))] == [r["id"] for r in records]


# ---- generation: streamed input, resume from the last line, the merge, shards in and out ----------------------


def generation_manifest(path: Path, n: int) -> list[dict]:
    """n records (non-ASCII captions, a list field) as a manifest, a blank line among them."""
    records = [{"id": f"s{i:03d}", "image": f"images/{i}.png", "caption": f"légende ✓ {i}", "refs": [f"r{i}"]}
               for i in range(n)]
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    path.write_text("".join(lines[:3]) + "\n" + "".join(lines[3:]), encoding="utf-8")
    return records


def unreadable(record: dict) -> bool:
    return int(record["id"][1:]) % 5 == 3


def keep_most(batch: list[dict], counts) -> list:
    """A process_batch that leaves every fifth sample out, as a stage leaves an unreadable image."""
    counts["unreadable_images"] += sum(map(unreadable, batch))
    return [(r, {"upper": r["caption"].upper()}) for r in batch if not unreadable(r)]


def old_merge(path: Path, world_size: int, order: list[str]) -> Path:
    """The merge before streaming, kept here as the reference: every record of every rank file in one dict."""
    if world_size == 1:
        return path
    merged = {}
    for rank in range(world_size):
        for record in read_manifest(rank_path(path, rank, world_size), required=("id",)):
            merged[str(record["id"])] = record
    return write_manifest(path, (merged[sample] for sample in order if sample in merged))


def run_ranks(data, out: Path, world: int, process_batch=keep_most, batch_size: int = 3) -> list:
    """Every rank of a job in this process, one after the other, then the merge: generate_sharded without
    torch.distributed."""
    counts = [generate_rank(data, out, batch_size, process_batch, rank, world) for rank in range(world)]
    merge_rank_outputs(out, world, input_ids(data))
    return counts


def test_stream_manifest_yields_a_ranks_share_lazily_with_read_manifests_checks(tmp_path):
    path = tmp_path / "m.jsonl"
    generation_manifest(path, 10)
    full = read_manifest(path)
    for world in (1, 3, 4):
        for rank in range(world):
            assert list(stream_manifest(path, rank=rank, world_size=world)) == shard(full, rank, world)
            assert list(stream_records(str(path), rank, world)) == shard(full, rank, world)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "image": "x.png", "caption": "c"}) + "\n"
                   + json.dumps({"id": "b", "image": "y.png", "caption": 3}) + "\n")
    stream = stream_manifest(bad, texts=("caption",))
    assert next(stream)["id"] == "a"  # lazily: the bad line is not read yet
    with pytest.raises(ManifestError, match=re.escape("bad.jsonl:2 (id 'b'): field 'caption' must be a string, got 3")):
        next(stream)
    assert [r["id"] for r in stream_manifest(bad, texts=("caption",), rank=0, world_size=2)] == ["a"]  # not its line
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        stream_manifest(tmp_path / "nope.jsonl")  # at the call, not at the first record
    with pytest.raises(ValueError, match="rank < world_size"):
        stream_manifest(path, rank=2, world_size=2)
    assert shard_urls("a/{08..11}.tar") == ["a/08.tar", "a/09.tar", "a/10.tar", "a/11.tar"]
    assert is_shards("a/{08..11}.tar") and is_shards("x.tar") and not is_shards("x.jsonl")


@pytest.mark.parametrize("world", [1, 2])
def test_generation_resumes_after_a_kill_mid_file_losing_and_duplicating_nothing(tmp_path, world):
    """Each rank dies in its third batch, and a line is cut mid-write; the rerun passes over the two finished
    batches by the last line's id and ends with the bytes of a run never killed, every kept id once."""
    records = generation_manifest(tmp_path / "in.jsonl", 40)
    data, out = str(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    run_ranks(data, tmp_path / "straight.jsonl", world, batch_size=4)
    calls = {"n": 0}

    def dies_in_third_batch(batch, counts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return keep_most(batch, counts)

    for rank in range(world):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            generate_rank(data, out, 4, dies_in_third_batch, rank, world)
        with open(rank_path(out, rank, world), "ab") as handle:
            handle.write(b'{"id": "s00')
    counts = run_ranks(data, out, world, batch_size=4)
    assert [c["already_done"] for c in counts] == [8] * world  # two batches of 4 passed over, not redone
    assert sum(c["written"] for c in counts) == sum(not unreadable(r) for rank in range(world)
                                                    for r in shard(records, rank, world)[8:])
    assert out.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    assert [r["id"] for r in read_manifest(out)] == [r["id"] for r in records if not unreadable(r)]  # unique ids
    # a third run writes nothing; samples left out after a rank's last line left no trace, and are tried again
    for rank in range(world):
        share = shard(records, rank, world)
        tail = len(share) - 1 - max(i for i, r in enumerate(share) if not unreadable(r))
        assert dict(generate_rank(data, out, 4, keep_most, rank, world)) == {
            "already_done": len(share) - tail, **({"unreadable_images": tail} if tail else {})}
    assert out.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()


def _generate_until_killed(data: str, out: str) -> None:
    def slow(batch, counts):
        time.sleep(0.01)
        return keep_most(batch, counts)

    generate_rank(data, out, 2, slow)


def test_generation_killed_by_sigkill_resumes_every_id_once_in_input_order(tmp_path):
    records = generation_manifest(tmp_path / "in.jsonl", 3000)
    data, out = str(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    kill_once_written(_generate_until_killed, (data, str(out)), out, 4000, 0.005)
    done = len(out.read_bytes().split(b"\n")) - 1
    assert 0 < done < 2000  # killed mid-file
    generate_rank(data, out, 7, keep_most)
    assert [r["id"] for r in read_manifest(out)] == [r["id"] for r in records if not unreadable(r)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_merge_keeps_input_order_past_left_out_samples_in_the_old_merges_bytes(tmp_path, world):
    records = generation_manifest(tmp_path / "in.jsonl", 23)
    data, out = str(tmp_path / "in.jsonl"), tmp_path / "out" / "gen.jsonl"
    for rank in range(world):
        generate_rank(data, out, 3, keep_most, rank, world)
    reference = tmp_path / "reference" / "gen.jsonl"
    reference.parent.mkdir()
    for rank in range(world):
        rank_path(reference, rank, world).write_bytes(rank_path(out, rank, world).read_bytes())
    old_merge(reference, world, [r["id"] for r in records])
    merge_rank_outputs(out, world, input_ids(data))
    assert [r["id"] for r in read_manifest(out)] == [r["id"] for r in records if not unreadable(r)]
    assert out.read_bytes() == reference.read_bytes()
    # the list form (read_manifest, as the stages passed it) writes the same bytes
    listed = tmp_path / "out" / "listed.jsonl"
    for rank in range(world):
        generate_rank(read_manifest(data), listed, 3, keep_most, rank, world)
    merge_rank_outputs(listed, world, input_ids(read_manifest(data)))
    assert listed.read_bytes() == out.read_bytes()
    if world > 1:  # a line that is not next in its rank's share: an error naming it, not a sample lost
        with open(rank_path(out, world - 1, world), "a") as handle:
            handle.write('{"id": "stray"}\n')
        with pytest.raises(ManifestError,
                           match=rf"gen.rank{world - 1}-of-{world}.jsonl:\d+: sample 'stray' is not next"):
            merge_rank_outputs(out, world, input_ids(data))


def test_process_batch_must_return_its_results_in_input_order(tmp_path):
    generation_manifest(tmp_path / "in.jsonl", 6)
    data, out = str(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    for wrong in (lambda batch: reversed(batch), lambda batch: [batch[0], batch[0]],
                  lambda batch: [{**batch[0], "id": "elsewhere"}]):
        with pytest.raises(ValueError, match="out of its batch's order"):
            generate_rank(data, out, 3, lambda batch, counts, wrong=wrong: [(r, {}) for r in wrong(batch)])
        assert out.read_text() == ""  # checked before any line of the batch is written
    kept = generate_rank(data, out, 3, lambda batch, counts: [(dict(r), {}) for r in batch[1:]])  # copies: by id
    assert kept["written"] == 4


def test_a_rank_file_of_other_input_is_refused(tmp_path):
    generation_manifest(tmp_path / "in.jsonl", 6)
    (tmp_path / "out.jsonl").write_text('{"id": "not-in-this-input"}\n')
    with pytest.raises(ManifestError, match="ends with sample 'not-in-this-input', which is not in rank 0's share"):
        generate_rank(str(tmp_path / "in.jsonl"), tmp_path / "out.jsonl", 2, keep_most)


def test_pending_gives_what_a_resume_will_process_and_repairs_nothing(tmp_path):
    records = generation_manifest(tmp_path / "in.jsonl", 9)
    data, out = str(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    assert [r["id"] for r in pending(data, out)] == [r["id"] for r in records]
    with pytest.raises(ZeroDivisionError):  # dies in its second batch
        generate_rank(data, out, 4,
                      lambda batch, counts: [(r, {}) for r in batch] if batch[0]["id"] == "s000" else 1 / 0)
    with open(out, "ab") as handle:
        handle.write(b'{"id": "s0')
    size = out.stat().st_size
    assert [r["id"] for r in pending(data, out)] == [r["id"] for r in records[4:]]
    assert out.stat().st_size == size


def _generate_on_rank(rank: int, port: int, data: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        counts = generate_sharded(data, out, 3, keep_most, rank, 2)
        Path(f"{out}.counts{rank}").write_text(json.dumps(counts))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_write_the_manifest_of_one_process(tmp_path):
    """generate_sharded's distributed part: the counts summed on every rank, rank 0's merge after both finished."""
    from realarch import free_port, run_forked_ranks

    generation_manifest(tmp_path / "in.jsonl", 17)
    data = str(tmp_path / "in.jsonl")
    one = generate_sharded(data, tmp_path / "one.jsonl", 3, keep_most)
    run_forked_ranks(_generate_on_rank, (free_port(), data, str(tmp_path / "two.jsonl")))
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    for rank in range(2):  # summed (a Counter sum drops the zero already_done)
        assert json.loads((tmp_path / f"two.jsonl.counts{rank}").read_text()) == {k: v for k, v in one.items() if v}


def write_member_shard(path: Path, shard_index: int, n: int, broken: int | None = None) -> dict[str, bytes]:
    """A webdataset shard as img2dataset writes one: key.jpg + key.txt + key.json per sample (sample `broken`'s
    image bytes corrupt). Returns {member name: bytes}."""
    members = {}
    for i in range(n):
        key = f"{shard_index:03d}{i:04d}"
        jpg = io.BytesIO()
        Image.new("RGB", (8 + i, 6), (40 * i % 255, shard_index * 60, 9)).save(jpg, format="JPEG", quality=90)
        members[f"{key}.jpg"] = b"not a jpeg" if i == broken else jpg.getvalue()
        members[f"{key}.txt"] = f"alt {key}".encode()
        members[f"{key}.json"] = json.dumps({"key": key, "caption": f"alt {key}", "width": 8 + i}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return members


def shard_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar}


def describe(batch: list[dict], counts) -> list:
    """A process_batch that opens each image as a stage does: an unreadable one is counted and left out."""
    skipped, results = SkipCounter(), []
    for record in batch:
        image = open_record_image(record, skipped)
        if image is None:
            counts["unreadable_images"] += 1
        else:
            results.append((record, {"vec": f"{image.size[0]} px wide"}))
    return results


def test_shards_in_shards_out_keep_every_member_and_a_resume_redoes_only_the_partial_shard(tmp_path):
    """Shard i is rank i % 2's; each output shard has the input's name, every member of each kept sample (the
    image bytes as they were), the new field in the json; the unreadable sample is counted and left out."""
    pytest.importorskip("webdataset")
    inputs = [write_member_shard(tmp_path / "in" / f"{s:03d}.tar", s, 5, broken=2 if s == 1 else None)
              for s in range(3)]
    data, out = str(tmp_path / "in" / "{000..002}.tar"), tmp_path / "out"
    counts = [dict(generate_rank(data, out, 2, describe, rank, 2)) for rank in range(2)]
    assert counts == [{"shards_already_done": 0, "written": 10, "shards_written": 2},
                      {"shards_already_done": 0, "unreadable_images": 1, "written": 4, "shards_written": 1,
                       "left_out": 1}]
    assert sorted(p.name for p in out.iterdir()) == ["000.tar", "001.tar", "002.tar"]  # no temporary left
    for s, members in enumerate(inputs):
        written = shard_members(out / f"{s:03d}.tar")
        kept = {name: payload for name, payload in members.items() if not (s == 1 and name.startswith("0010002."))}
        assert list(written) == list(kept)  # the members, in their order, the broken sample's left out
        for name, payload in kept.items():
            if name.endswith(".json"):
                image = Image.open(io.BytesIO(kept[name.replace(".json", ".jpg")]))
                assert json.loads(written[name]) == {**json.loads(payload), "vec": f"{image.size[0]} px wide"}
            else:
                assert written[name] == payload  # image bytes intact under their own key
    # a run killed inside shard 2 left its temporary file; shard 0 had finished
    finished = (out / "002.tar").read_bytes()
    (out / "002.tar").unlink()
    (out / ".002.tar.partial").write_bytes(b"half a tar")
    seen = []
    recording = lambda batch, counts: seen.extend(r["_url"] for r in batch) or describe(batch, counts)  # noqa: E731
    assert [r["_url"] for r in pending(data, out, 0, 2)] == [str(tmp_path / "in" / "002.tar")] * 5
    assert dict(generate_rank(data, out, 2, recording, 0, 2)) == {"shards_already_done": 1, "written": 5,
                                                                 "shards_written": 1}
    assert set(seen) == {str(tmp_path / "in" / "002.tar")}  # shard 0 was not read again
    assert (out / "002.tar").read_bytes() == finished and not (out / ".002.tar.partial").exists()
    assert dict(generate_sharded(data, out, 2, describe)) == {"shards_already_done": 3}
    columns = index_data(str(out / "{000..002}.tar"), tmp_path / "index")  # a trainer reads the output shards
    assert (len(columns) == 14 and columns.value("vec", 0) == "8 px wide"
            and columns.value("caption", 0) == "alt 0000000")
    with pytest.raises(ManifestError, match="shards in, shards out"):
        generate_rank(data, tmp_path / "out.jsonl", 2, describe)


def test_the_reader_resume_and_merge_hold_no_record_of_the_input(tmp_path):
    """20,000 tiny records through two ranks, their merge and a resume that passes over a whole share: the peak of
    Python allocations stays a small fraction of what read_manifest's list of the same records takes."""
    import tracemalloc

    path = tmp_path / "in.jsonl"
    with open(path, "w") as handle:
        for i in range(20_000):
            handle.write(json.dumps({"id": f"s{i:05d}", "image": "x.png", "caption": "c"}) + "\n")
    trivial = lambda batch, counts: [(r, {"n": 1}) for r in batch]  # noqa: E731
    tracemalloc.start()
    records = read_manifest(path)
    as_a_list = tracemalloc.get_traced_memory()[1]
    del records
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    run_ranks(str(path), tmp_path / "out.jsonl", 2, trivial, batch_size=64)
    assert generate_rank(str(path), tmp_path / "out.jsonl", 64, trivial, 1, 2) == {"already_done": 10_000}
    streamed = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert len(read_manifest(tmp_path / "out.jsonl")) == 20_000
    assert as_a_list > 5_000_000 and streamed < as_a_list / 20, (streamed, as_a_list)


def test_coco_karpathy_loader(tmp_path):
    data = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 1,
         "sentences": [{"raw": " A dog. "}, {"raw": "A brown dog."}]},
        {"filepath": "train2014", "filename": "b.jpg", "split": "restval", "cocoid": 2, "sentences": [{"raw": "Cat"}]},
    ]}
    (tmp_path / "coco.json").write_text(json.dumps(data))
    records = load_coco_karpathy(tmp_path / "coco.json", tmp_path / "coco")
    assert records[0] == {"id": "1", "image": str((tmp_path / "coco/val2014/a.jpg").resolve()), "split": "test",
                          "caption": "A dog.", "refs": ["A dog.", "A brown dog."]}
    assert records[1]["split"] == "train"
    assert [r["id"] for r in load_coco_karpathy(tmp_path / "coco.json", tmp_path, splits=["test"])] == ["1"]
    del data["images"][1]["sentences"]
    (tmp_path / "coco.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"images\[1\]: missing 'sentences'"):
        load_coco_karpathy(tmp_path / "coco.json", tmp_path)


def test_webdataset_shards(tmp_path):
    pytest.importorskip("webdataset")
    records = [{"id": f"k{i}", "image": Image.new("RGB", (4, 4), (i, 0, 0)), "caption": f"c{i}"} for i in range(3)]
    shard_path = write_webdataset_shard(tmp_path / "shard-000.tar", records)
    with tarfile.open(shard_path, "a") as tar:  # a fourth sample whose image bytes are corrupt
        for name, payload in (("k3.png", b"not a png"), ("k3.json", b'{"caption": "c3"}')):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    skipped = SkipCounter()
    out = list(iter_webdataset(str(shard_path), skipped=skipped))
    assert [(r["id"], r["caption"], r["image"].size) for r in out] == [(f"k{i}", f"c{i}", (4, 4)) for i in range(3)]
    assert skipped.count == 1 and skipped.examples[0][0] == "k3"
    with pytest.raises(BadSampleError, match="'k3': image cannot be decoded"):
        list(iter_webdataset(str(shard_path), strict=True))


# ---- columnar records: a manifest or shards indexed once, read back by row ------------------------------


def test_columns_read_back_what_read_manifest_reads(tmp_path, monkeypatch):
    """Every field of every row, a field some rows lack (None there), lists, non-ASCII text, across the offset
    blocks the writer flushes (16 rows here, 65,536 by default); rebuilt when the manifest changes, reused (same
    files) when it does not."""
    import common.columns

    monkeypatch.setattr(common.columns, "OFFSET_BLOCK", 16)
    records = [{"id": f"s{i}", "image": f"images/{i % 3}.png", "caption": f"légende {i}",
                **({"refs": [f"r{i}", "x"]} if i % 3 == 0 else {}), **({"late": i} if i > 70 else {})}
               for i in range(80)]
    write_manifest(tmp_path / "m.jsonl", records)
    columns = index_manifest(tmp_path / "m.jsonl")
    expected = read_manifest(tmp_path / "m.jsonl")
    assert len(columns) == len(expected) and columns.fields == ["caption", "id", "image", "late", "refs"]
    assert [columns.record(row) for row in range(80)] == expected
    assert columns.column("refs", [3, 4]) == [["r3", "x"], None] and columns.value("late", 75) == 75
    assert [value for _, value in columns.scan("caption")] == [r["caption"] for r in expected]
    assert columns.rows_where(lambda v: v["refs"] is not None, ["refs"]).tolist() == list(range(0, 80, 3))
    stamp = (tmp_path / "m.jsonl.index" / "meta.json").stat().st_mtime_ns
    assert index_manifest(tmp_path / "m.jsonl").n == len(expected)
    assert (tmp_path / "m.jsonl.index" / "meta.json").stat().st_mtime_ns == stamp  # reused
    write_manifest(tmp_path / "m.jsonl", records[:5])
    assert len(index_manifest(tmp_path / "m.jsonl")) == 5  # the manifest changed: rebuilt
    with pytest.raises(ManifestError, match="no field 'nope'"):
        columns.value("nope", 0)


def test_columns_refuse_bad_manifests_naming_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "image": "x.png"}\n\n{"id": "b", "image": "y.png"}\n{"id": "a", "image": "z.png"}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:4: id 'a' already used at .*m.jsonl:1"):
        index_manifest(path)
    path.write_text('{"id": "a", "image": "x.png"}\n{"id": "b"}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:2 \(id 'b'\): missing field 'image'"):
        index_manifest(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # nothing half-built left behind


def test_columns_of_shards_open_the_images_inside_the_tar(tmp_path):
    """index_data on a brace pattern of webdataset shards: the json fields and each image's bytes by offset,
    the same pixels and texts iter_webdataset yields."""
    pytest.importorskip("webdataset")
    for number in range(2):
        write_webdataset_shard(tmp_path / f"shard-{number:03d}.tar",
                               [{"id": f"k{number}{i}", "image": Image.new("RGB", (4, 4), (number, i, 7)),
                                 "caption": f"c{number}{i}"} for i in range(3)])
    columns = index_data(str(tmp_path / "shard-{000..001}.tar"), tmp_path / "index")
    streamed = list(iter_webdataset([str(tmp_path / f"shard-{s:03d}.tar") for s in range(2)]))
    assert len(columns) == 6 and columns.column("caption", range(6)) == [r["caption"] for r in streamed]
    for row, record in enumerate(streamed):
        assert columns.value("id", row) == record["id"]
        assert list(open_row_image(columns, row).getdata()) == list(record["image"].getdata())


def test_columns_survive_a_fork_and_pickling(tmp_path):
    """DataLoader workers: each process opens its own descriptors (pread shares no file position)."""
    import pickle

    write_manifest(tmp_path / "m.jsonl", [{"id": str(i), "image": "x.png", "caption": f"c{i}"} for i in range(50)])
    columns = index_manifest(tmp_path / "m.jsonl")
    assert columns.value("caption", 7) == "c7"
    clone = pickle.loads(pickle.dumps(columns))
    assert clone.column("caption", [49, 0]) == ["c49", "c0"]
    pid = os.fork()
    if pid == 0:
        os._exit(0 if columns.column("caption", range(50)) == [f"c{i}" for i in range(50)] else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


# ---- typed fields: one rule for every reader -----------------------------------------------------


def test_manifest_readers_refuse_a_field_of_the_wrong_type_naming_file_and_line(tmp_path):
    """An id that is no id, or a field read as text holding a number, a list or null: an error at its line, never
    a TypeError mid-run nor a caption "123" or "['a', 'b']". (An image of the wrong type is a bad sample where it
    is opened: the next test.)"""
    from common import data

    good = '{"id": "a", "image": "x.png", "caption": "a cat"}\n'
    for line, texts, message in [
            ('{"id": ["b"], "image": "y.png"}\n', (),
             "m.jsonl:2 (id ['b']): field 'id' must be a string or an integer, got [\"b\"]"),
            ('{"id": "b", "image": "y.png", "caption": 123}\n', ("caption",),
             "m.jsonl:2 (id 'b'): field 'caption' must be a string, got 123"),
            ('{"id": "b", "image": "y.png", "caption": ["a", "b"]}\n', ("caption",),
             "must be a string, got [\"a\", \"b\"]"),
            ('{"id": "b", "image": "y.png", "caption": null}\n', ("caption",), "field 'caption' is missing or null")]:
        (tmp_path / "m.jsonl").write_text(good + line)
        with pytest.raises(ManifestError, match=re.escape(message)):
            read_manifest(tmp_path / "m.jsonl", texts=texts)
        if not texts:  # the index of a training set checks them alike
            with pytest.raises(ManifestError, match=re.escape(message)):
                index_manifest(tmp_path / "m.jsonl", tmp_path / f"index{len(line)}")
    (tmp_path / "m.jsonl").write_text('{"id": "a", "image": "x.png", "refs": "r"}\n'
                                      '{"id": "b", "image": "y.png", "refs": ["r", 3]}\n')
    with pytest.raises(ManifestError, match=re.escape("field 'refs': item 1 must be a non-empty string, got 3")):
        read_manifest(tmp_path / "m.jsonl", text_lists=("refs",))
    assert (data.text_problem(["r", "s"], "refs", lists=True) is None
            and data.text_problem("r", "refs", lists=True) is None)


def test_record_readers_skip_and_count_a_text_or_image_of_the_wrong_type(tmp_path):
    """ManifestDataset and open_record_image count a caption that is a number or a list of numbers, and an image
    that is neither a path nor bytes nor a PIL image, as bad samples (strict: BadSampleError naming the sample)."""
    records = make_images(tmp_path, 4)
    records[0]["caption"], records[1]["refs"], records[2]["image"] = 123, [1, 2], 7
    dataset = ManifestDataset([{**r, "_root": str(tmp_path)} for r in records], "caption")
    assert [dataset[i] is None for i in range(4)] == [True, False, True, False]
    reasons = dict(dataset.skipped.examples)
    assert reasons["s0"] == "sample 's0': field 'caption' must be a string or a list of strings, got 123"
    assert reasons["s2"] == "sample 's2': field 'image' must be an image path, image bytes or a PIL image, got 7"
    refs = ManifestDataset([{**r, "_root": str(tmp_path)} for r in records], "refs", strict=True)
    with pytest.raises(BadSampleError,
                       match=re.escape("sample 's1': field 'refs': item 0 must be a non-empty string, got 1")):
        refs[1]
    from common.data import open_record_image

    skipped = SkipCounter()
    assert open_record_image(records[2], skipped) is None and skipped.count == 1
    with pytest.raises(BadSampleError, match="sample 's2': field 'image' must be an image path"):
        open_record_image(records[2], SkipCounter(), strict=True)
    write_manifest(tmp_path / "m.jsonl", records)  # read as a manifest and indexed: counted where it is opened
    assert read_manifest(tmp_path / "m.jsonl")[2]["image"] == 7
    with pytest.raises(BadSampleError, match=re.escape("sample 's2': field 'image' must be an image path, image bytes "
                                                       "or a PIL image, got 7")):
        open_row_image(index_manifest(tmp_path / "m.jsonl"), 2)


def test_shard_readers_refuse_json_that_is_not_a_record(tmp_path):
    """A shard sample whose json is not an object, or whose id is a list: iter_webdataset skips and counts it (strict:
    an error naming it), index_shards refuses the shard naming the member; neither crashes on `meta.get`."""
    pytest.importorskip("webdataset")
    shard_path = tmp_path / "bad.tar"
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    with tarfile.open(shard_path, "w") as tar:
        for key, meta in (("k0", b'{"caption": "fine"}'), ("k1", b'["not", "a", "record"]'), ("k2", b'{"id": [1]}')):
            for name, payload in ((f"{key}.png", png.getvalue()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    skipped = SkipCounter()
    assert [r["id"] for r in iter_webdataset(str(shard_path), skipped=skipped)] == ["k0"]
    assert [reason for _, reason in skipped.examples] == [
        "sample 'k1': its json must be an object, got [\"not\", \"a\", \"record\"]",
        "sample 'k2': field 'id' must be a string or an integer, got [1]"]
    with pytest.raises(BadSampleError, match="sample 'k1'"):
        list(iter_webdataset(str(shard_path), strict=True))
    with pytest.raises(ManifestError,
                       match=re.escape(f"{shard_path}: k1.json: sample 'k1': its json must be an object")):
        index_data(str(shard_path), tmp_path / "index")


def test_karpathy_json_with_a_sentence_that_is_not_text_names_it(tmp_path):
    entry = {"filename": "a.jpg", "split": "test", "cocoid": 1, "sentences": [{"raw": "a cat"}, {"raw": 42}]}
    (tmp_path / "k.json").write_text(json.dumps({"images": [entry]}))
    with pytest.raises(ManifestError, match=re.escape("images[0]: sentences[1]: 'raw' must be a string, got 42")):
        load_coco_karpathy(tmp_path / "k.json", tmp_path)


def test_columns_name_the_manifest_line_of_a_row(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "image": "x.png"}\n\n{"id": "b", "image": "y.png"}\n')
    columns = index_manifest(tmp_path / "m.jsonl")
    assert [columns.where(row) for row in range(2)] == [f"{tmp_path / 'm.jsonl'}:1", f"{tmp_path / 'm.jsonl'}:3"]


# ---- images: every PIL mode to 8-bit RGB ---------------------------------------------------------


def test_a_16_bit_png_decodes_as_its_8_bit_copy(tmp_path):
    """PIL's convert("RGB") clips a 16-bit value at 255: a 16-bit gradient decoded white. Now within 1 of the 8-bit
    copy (the high byte of each value), from a path, from bytes and as an open image."""
    from common.data import open_image

    gradient = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 65535 // (64 * 64 - 1)).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    eight_bit = (gradient >> 8).astype(np.uint8)
    decoded = [open_image(tmp_path / "g16.png"), open_image((tmp_path / "g16.png").read_bytes()),
               open_image(Image.open(tmp_path / "g16.png"))]
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")  # Pillow 10.0 (the lowest allowed) opens it as I
    for image in decoded:
        pixels = np.asarray(image, dtype=np.int64)  # (H, W, 3)
        assert image.mode == "RGB" and np.abs(pixels - eight_bit[..., None]).max() <= 1
    as_int = Image.fromarray(gradient.astype(np.int32))  # mode I: how older Pillows open a 16-bit PNG
    assert np.abs(np.asarray(open_image(as_int), dtype=np.int64) - eight_bit[..., None]).max() <= 1


def test_other_modes_decode_to_the_colours_they_show():
    """Floats in 0..1 scale to 0..255; transparency (RGBA, LA, a palette's) shows the white a page shows, not the
    colour a transparent pixel stores; CMYK, grey and palette images as PIL converts them."""
    from common.data import open_image

    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(open_image(floats))[0, :, 0].tolist() == [0, 128, 255]
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert np.asarray(open_image(rgba)).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    la = Image.new("LA", (1, 1), (0, 128))  # black at half opacity over white
    assert np.asarray(open_image(la)).tolist() == [[[127, 127, 127]]]
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # index 0 (black) is transparent
    assert np.asarray(open_image(palette)).tolist() == [[[255, 255, 255], [200, 0, 0]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # red
    assert np.asarray(open_image(cmyk)).tolist() == [[[255, 0, 0]]]
    assert np.asarray(open_image(Image.new("L", (1, 1), 77))).tolist() == [[[77, 77, 77]]]


def test_run_command_ends_expected_errors_as_one_line_and_debug_keeps_them(tmp_path):
    """An expected error: one line, exit status 1; with --debug (taken out of what main parses) the error itself;
    any other exception is a bug and keeps its traceback either way."""
    from common import data

    seen = []

    def main(argv):
        seen.append(argv)
        if argv[0] == "bug":
            raise KeyError("a bug")
        return data.read_manifest(tmp_path / "absent.jsonl")

    with pytest.raises(SystemExit) as exit_:
        data.run_command(main, ["read", "--flag"])
    assert exit_.value.code == f"error: manifest not found: {tmp_path / 'absent.jsonl'} (--debug shows the traceback)"
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        data.run_command(main, ["read", "--debug", "--flag"])
    with pytest.raises(KeyError):
        data.run_command(main, ["bug"])
    assert seen == [["read", "--flag"], ["read", "--flag"], ["bug"]]


def test_an_unavailable_device_is_one_clear_error(monkeypatch):
    from common import data

    monkeypatch.setattr(data.torch.cuda, "is_available", lambda: False)
    with pytest.raises(data.DeviceError,
                       match=r"^--device cuda: CUDA is not available on this machine .*pass --device cpu$"):
        data.check_device("cuda")
    with pytest.raises(data.DeviceError, match="--device 'gpu' is not a torch device"):
        data.init_distributed("gpu")
    assert data.check_device("cpu") == "cpu"
