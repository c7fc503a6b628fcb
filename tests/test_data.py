"""common/data.py: manifests, bad input, the resumable writer, sharding, COCO and webdataset loaders."""

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

from common.data import (BadSampleError, ManifestDataset, ManifestError, ResumableJSONLWriter, SkipCounter,
                         collate_skip_bad, index_data, index_manifest, iter_webdataset, load_coco_karpathy,
                         merge_rank_outputs, open_row_image, rank_path, read_manifest, shard, write_manifest,
                         write_webdataset_shard)


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
    """A generation job: ids 0..n-1, skipping those a previous run finished."""
    with ResumableJSONLWriter(path) as out:
        for i in range(n):
            if str(i) in out.done:
                continue
            out.write({"id": str(i), "text": "x" * 200})
            time.sleep(delay)


def test_resumable_writer_survives_a_kill(tmp_path):
    """SIGKILL a writing job (a forked process: it shares this one's imports) mid-run, then run it again."""
    import multiprocessing

    path = tmp_path / "out.jsonl"
    job = multiprocessing.get_context("fork").Process(target=write_ids, args=(path, 10_000, 0.002))
    job.start()
    deadline = time.time() + 60
    while (not path.exists() or path.stat().st_size < 3000) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(job.pid, signal.SIGKILL)
    job.join()
    assert job.exitcode == -signal.SIGKILL
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
        assert out.done == {"0", "1", "2"} and out.dropped_partial == 1
        out.write({"id": 3, "caption": "c3"})
        with pytest.raises(ValueError, match="written twice"):
            out.write({"id": 1, "caption": "again"})
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]


def test_resumable_writer_refuses_corruption_inside_the_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": 0}\nnot json\n{"id": 2}\n')
    with pytest.raises(ManifestError, match="out.jsonl:2: corrupt line inside the file"):
        ResumableJSONLWriter(path)


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
    import common.data

    monkeypatch.setattr(common.data, "OFFSET_BLOCK", 16)
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
    for shard in range(2):
        write_webdataset_shard(tmp_path / f"shard-{shard:03d}.tar",
                               [{"id": f"k{shard}{i}", "image": Image.new("RGB", (4, 4), (shard, i, 7)),
                                 "caption": f"c{shard}{i}"} for i in range(3)])
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
            ('{"id": ["b"], "image": "y.png"}\n', (), "m.jsonl:2 (id ['b']): field 'id' must be a string or an integer, got [\"b\"]"),
            ('{"id": "b", "image": "y.png", "caption": 123}\n', ("caption",), "m.jsonl:2 (id 'b'): field 'caption' must be a string, got 123"),
            ('{"id": "b", "image": "y.png", "caption": ["a", "b"]}\n', ("caption",), "must be a string, got [\"a\", \"b\"]"),
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
    assert data.text_problem(["r", "s"], "refs", lists=True) is None and data.text_problem("r", "refs", lists=True) is None


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
    with pytest.raises(BadSampleError, match=re.escape("sample 's1': field 'refs': item 0 must be a non-empty string, got 1")):
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
    with pytest.raises(ManifestError, match=re.escape(f"{shard_path}: k1.json: sample 'k1': its json must be an object")):
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
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
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


def test_an_unavailable_device_is_one_clear_error(monkeypatch):
    from common import data

    monkeypatch.setattr(data.torch.cuda, "is_available", lambda: False)
    with pytest.raises(data.DeviceError, match=r"^--device cuda: CUDA is not available on this machine .*pass --device cpu$"):
        data.check_device("cuda")
    with pytest.raises(data.DeviceError, match="--device 'gpu' is not a torch device"):
        data.init_distributed("gpu")
    assert data.check_device("cpu") == "cpu"
