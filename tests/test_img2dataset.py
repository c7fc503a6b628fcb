"""URL lists to images with img2dataset, read back by the project's own readers (docs/data.md).

For real: photos written here are served over HTTP on 127.0.0.1 from a thread, and a URL list in
each released set's columns goes through `img2dataset.download` as docs/data.md runs it:
CapsFusion-120M's parquet (`image_url`, `capsfusion`, `laion_2b`, `laion_coco`) and DataComp's
(`url`, `text`, `uid`) to webdataset shards, Altogether-FT's records as JSONL (`url`, `round3`,
`alt`, `source`) to files and then, by docs/data.md's own script, to a manifest. Each list also
holds a URL that answers 404 and one that is no image: img2dataset's own `*_stats.json` must count
5 successes, 1 failed download and 1 failed decode, and every image and caption must come back
under its key through `common.data.iter_webdataset`, `index_data` (Columns) or `read_manifest`.
The last test runs docs/recipe.md's chain on such a list: img2dataset, CoCa captions, a DataCompDR CLIP.

img2dataset is an install of its own (`pip install -r requirements-data.txt`, the `data` section of
.ci/run): without it the test is skipped. It runs in a child process in a session of its own (its
process pool and logger are spawned), killed as a group if it passes DOWNLOAD_TIMEOUT.
"""

import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data import SkipCounter, iter_webdataset, open_record_image, read_manifest
from common.columns import Columns, index_data, open_row_image

pytestmark = pytest.mark.skipif(importlib.util.find_spec("img2dataset") is None,
                                reason="img2dataset is not installed: pip install -r requirements-data.txt "
                                       "(its own venv; .ci/run's data section runs this test)")

DOWNLOAD_TIMEOUT = 240  # seconds for the whole download: two spawned processes import cv2, albumentations, wandb
SERVER_TIMEOUT = 10  # seconds: a request handler's socket timeout, and the wait for the server thread to stop
PER_SHARD = 4  # samples per shard: the 7 rows make two shards, 00000.tar and 00001.tar

# (file name, size, mode, format, caption): small "photos" of several kinds
PHOTOS = [
    ("harbour.jpg", (96, 64), "RGB", "JPEG", "a harbour at dusk with three fishing boats"),
    ("meadow.png", (64, 80), "RGB", "PNG", "a meadow with yellow flowers under a blue sky"),
    ("street.jpg", (72, 72), "L", "JPEG", "a black and white photo of a narrow street"),
    ("fruit.webp", (80, 60), "RGB", "WEBP", "a bowl of oranges and green apples on a table"),
    ("kite.png", (60, 90), "RGB", "PNG", "a red kite flying above a beach"),
]


def photo(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    """A smooth picture with an object and mild noise, so that it compresses as a photograph does."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(size)
    base = rng.uniform(40, 200, size=3)
    pixels = base + 60 * np.stack([x, y, x * y], axis=-1) + rng.normal(0, 4, (height, width, 3))
    cy, cx, r = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width, min(size) / 5
    disc = (np.mgrid[0:height, 0:width][0] - cy) ** 2 + (np.mgrid[0:height, 0:width][1] - cx) ** 2 < r * r
    pixels[disc] = 255 - base
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").convert(mode)


class QuietHandler(SimpleHTTPRequestHandler):
    timeout = SERVER_TIMEOUT  # a stuck connection cannot hold a handler thread for ever

    def log_message(self, *args):  # no access log on stderr
        pass


@contextmanager
def serving(folder):
    """`folder` over HTTP on 127.0.0.1 (a free port) from a thread; stopped, and waited for, on the way out."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        stopper.join(SERVER_TIMEOUT)
        server.server_close()
        thread.join(SERVER_TIMEOUT)
        assert not thread.is_alive(), f"the HTTP server thread did not stop in {SERVER_TIMEOUT} s"


def run_img2dataset(**kwargs) -> str:
    """img2dataset.download(**kwargs) in a child process of its own session, bounded by DOWNLOAD_TIMEOUT; its
    output. Its spawned workers are in the same process group, so a timeout kills them with it."""
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "WANDB_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore"}
    code = "import json, sys, img2dataset; img2dataset.download(**json.loads(sys.argv[1]))"
    child = subprocess.Popen([sys.executable, "-c", code, json.dumps(kwargs)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=DOWNLOAD_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate(timeout=SERVER_TIMEOUT)
        pytest.fail(f"img2dataset did not finish in {DOWNLOAD_TIMEOUT} s; its output ends:\n{output[-3000:]}")
    finally:
        try:  # a worker left behind by a crash: the group is ours
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert child.returncode == 0, f"img2dataset exited {child.returncode}; its output ends:\n{output[-3000:]}"
    return output


# The released sets as docs/data.md downloads them: input format, url column, caption column, the columns kept
# beside them, img2dataset's output format, and a row in the set's own columns (url, caption, row number)
RELEASED = {
    "capsfusion-120m": ("parquet", "image_url", "capsfusion", ["laion_2b", "laion_coco"], "webdataset",
                        lambda url, caption, i: {"image_url": url, "laion_2b": f"IMG_{i}.jpg alt text",
                                                 "laion_coco": f"a photo {i}", "capsfusion": caption}),
    "datacomp": ("parquet", "url", "text", ["uid"], "webdataset",
                 lambda url, caption, i: {"uid": f"{i:032x}", "url": url, "text": caption,
                                          "clip_l14_similarity_score": 0.3}),
    "altogether-ft": ("jsonl", "url", "round3", ["alt", "source"], "files",
                      lambda url, caption, i: {"url": url, "alt": f"photo {i} alt", "round3": caption,
                                               "source": "wit" if i % 2 else "datacomp", "img_path": f"/x/{i}.jpg"}),
}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"


def write_url_list(path, fmt: str, rows: list[dict]) -> None:
    if fmt == "parquet":
        import pyarrow as pa  # img2dataset's dependency: here only where it is installed
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:  # Altogether-FT ships {"data": [records]}; docs/data.md turns it into one record a line, as here
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def manifest_script() -> str:
    """The Python that docs/data.md gives to turn img2dataset's `files` output into a manifest (a heredoc)."""
    match = re.search(r"^python - .*<<'EOF'\n(.*?)^EOF$", DOCS.read_text(), flags=re.M | re.S)
    assert match, f"{DOCS}: no `python - ... <<'EOF'` block that writes the manifest"
    return match[1]


def near(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two images in RGB, 0..255."""
    return float(np.abs(np.asarray(a.convert("RGB"), dtype=float) - np.asarray(b.convert("RGB"), dtype=float)).mean())


@pytest.mark.parametrize("released", sorted(RELEASED))
def test_url_list_to_data_that_the_project_reads(tmp_path, released):
    fmt, url_col, caption_col, extra, output_format, make_row = RELEASED[released]
    site = tmp_path / "site"
    site.mkdir()
    originals = {}
    for i, (name, size, mode, kind, _) in enumerate(PHOTOS):
        image = photo(size, mode, seed=i)
        image.save(site / name, format=kind, **({"quality": 95} if kind in ("JPEG", "WEBP") else {}))
        originals[name] = image
    (site / "notes.txt").write_text("this is not an image\n")

    with serving(site) as base:
        rows = [make_row(f"{base}/{name}", caption, i) for i, (name, *_, caption) in enumerate(PHOTOS)]
        rows.insert(1, make_row(f"{base}/missing.jpg", "a photo that is gone", 98))  # 404, in shard 0
        rows.insert(5, make_row(f"{base}/notes.txt", "a page that is not an image", 99))  # decodes as nothing, shard 1
        url_list = tmp_path / f"urls.{fmt}"
        write_url_list(url_list, fmt, rows)
        out = tmp_path / "out"
        run_img2dataset(url_list=str(url_list), input_format=fmt, url_col=url_col, caption_col=caption_col,
                        save_additional_columns=extra, output_format=output_format, output_folder=str(out),
                        processes_count=1, thread_count=4, distributor="multiprocessing", enable_wandb=False,
                        number_sample_per_shard=PER_SHARD, image_size=256, resize_mode="keep_ratio",
                        resize_only_if_bigger=True, encode_format="jpg", encode_quality=95, timeout=SERVER_TIMEOUT,
                        retries=0)

    # img2dataset's own accounting, shard by shard
    stats = [json.loads((out / f"{shard:05d}_stats.json").read_text()) for shard in (0, 1)]
    assert [s["count"] for s in stats] == [4, 3]
    assert sum(s["successes"] for s in stats) == 5
    assert sum(s["failed_to_download"] for s in stats) == 1 and stats[0]["failed_to_download"] == 1
    assert sum(s["failed_to_resize"] for s in stats) == 1 and stats[1]["failed_to_resize"] == 1
    statuses = sum((Counter(s["status_dict"]) for s in stats), Counter())
    assert statuses["success"] == 5 and any("404" in k for k in statuses), statuses

    # its per-shard parquet keeps every row, the failed ones with their status and error
    import pyarrow.parquet as pq

    table = [row for shard in (0, 1) for row in pq.read_table(out / f"{shard:05d}.parquet").to_pylist()]
    failed = {row["url"].rsplit("/", 1)[1]: row for row in table if row["status"] != "success"}
    assert set(failed) == {"missing.jpg", "notes.txt"}
    assert failed["missing.jpg"]["status"] == "failed_to_download" and "404" in failed["missing.jpg"]["error_message"]
    assert failed["notes.txt"]["status"] == "failed_to_resize"

    by_url = {row[url_col]: row for row in rows}
    name_of = {f"{base}/{name}": name for name, *_ in PHOTOS}

    def check(record: dict) -> None:
        """One sample as a reader of the project gives it: the source row's caption and columns, the picture."""
        source = by_url[record["url"]]
        assert record["id"] == record["key"]  # no `id` column: the sample's key is its id
        assert record["status"] == "success"
        assert record["caption"] == source[caption_col]
        assert all(record[name] == source[name] for name in extra)
        name = name_of[record["url"]]
        assert record["image"].size == originals[name].size == (record["width"], record["height"])
        # the same picture, re-encoded as JPEG 95 (a mean difference of a few levels; another photo is 40+ off)
        assert near(record["image"], originals[name]) < 8, name

    if output_format == "webdataset":
        shards = [str(out / f"{shard:05d}.tar") for shard in (0, 1)]
        assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == ["00000.tar", "00001.tar"]
        # every sample is key.jpg + key.txt (the caption) + key.json (the caption and the columns kept)
        with tarfile.open(shards[0]) as tar:
            members = sorted(m.name for m in tar.getmembers())
            first = members[0].rsplit(".", 1)[0]
            assert {f"{first}.jpg", f"{first}.txt", f"{first}.json"} <= set(members)
            meta = json.loads(tar.extractfile(f"{first}.json").read())
            caption = tar.extractfile(f"{first}.txt").read().decode()
            assert caption == meta["caption"] == by_url[meta["url"]][caption_col]

        # the project's streaming reader: images and captions under their keys
        skipped = SkipCounter()
        records = list(iter_webdataset(shards, skipped=skipped))
        # the index the trainers read (`--data out/{00000..00001}.tar`): the same rows, random access to the bytes
        columns = index_data(str(out / "{00000..00001}.tar"))
    else:
        # docs/data.md's script: the successful samples of the `files` output as a manifest beside them
        manifest = out / "manifest.jsonl"
        with open(manifest, "w") as handle:
            done = subprocess.run([sys.executable, "-", str(out)], input=manifest_script(), stdout=handle,
                                  stderr=subprocess.PIPE, text=True, timeout=SERVER_TIMEOUT * 6)
        assert done.returncode == 0, done.stderr
        skipped = SkipCounter()
        records = [{**r, "image": open_record_image(r, skipped, strict=True)} for r in read_manifest(manifest)]
        columns = index_data(str(manifest))

    assert skipped.count == 0 and len(records) == 5
    assert len({r["id"] for r in records}) == 5
    for record in records:
        check(record)
    assert {name_of[r["url"]] for r in records} == set(originals)

    assert isinstance(columns, Columns) and len(columns) == 5
    assert {"id", "image", "caption", "url", *extra} <= set(columns.fields)
    by_id = {r["id"]: r for r in records}
    for row in range(len(columns)):
        record = by_id[columns.value("id", row)]
        assert columns.value("caption", row) == record["caption"]
        assert near(open_row_image(columns, row), record["image"]) == 0


RECIPE = DOCS.with_name("recipe.md")


def recipe_commands() -> list[list[str]]:
    """The bash block of docs/recipe.md's URL-list section, one argv per command (continued lines joined)."""
    section = RECIPE.read_text().split("## From a URL list", 1)
    assert len(section) == 2, f"{RECIPE}: no '## From a URL list' section"
    block = re.search(r"```bash\n(.*?)```", section[1], flags=re.S)
    assert block, f"{RECIPE}: the URL-list section has no bash block"
    return [shlex.split(line) for line in block[1].replace("\\\n", " ").splitlines() if line.strip()]


def fire_kwargs(argv: list[str]) -> dict:
    """img2dataset's command line (python-fire: `--name value`) as img2dataset.download's keyword arguments."""
    def value(word: str):
        if word in ("True", "False"):
            return word == "True"
        try:
            return json.loads(word)
        except json.JSONDecodeError:
            return word

    assert all(word.startswith("--") for word in argv[::2]) and len(argv) % 2 == 0, argv
    return {name[2:]: value(word) for name, word in zip(argv[::2], argv[1::2])}


def test_the_recipe_from_a_url_list_to_a_trained_clip(tmp_path, monkeypatch):
    """docs/recipe.md's block as written, in a folder holding a DataComp-style parquet pool of the local photos
    (plus a 404 and a page that is no image) and a held-out manifest: img2dataset makes two shards, `synthesize`
    gives each downloaded image k CoCa captions into shards of the same names (every field kept), and DataComp and
    DataCompDR CLIPs train on them. Only sizes and devices are changed, by flags after the block's own."""
    from clip_quality import main as clip_quality_main
    from common.data import write_manifest
    from tests.realarch import serve_open_clip_tag
    from tests.test_clip_quality import serve_tiny_coca

    download, synthesize, pretrain = recipe_commands()
    assert download[0] == "img2dataset" and synthesize[3:5] == ["clip_quality.py", "synthesize"], (download, synthesize)
    assert pretrain[3:5] == ["clip_quality.py", "pretrain"], pretrain
    monkeypatch.chdir(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    names = {}
    for i, (name, size, mode, kind, caption) in enumerate(PHOTOS):
        photo(size, mode, seed=i).save(site / name, format=kind)
        names[name] = caption
    (site / "notes.txt").write_text("this is not an image\n")
    write_manifest(tmp_path / "coco_test.jsonl", [{"id": f"t{i}", "image": str(site / name), "caption": caption}
                                                  for i, (name, caption) in enumerate(names.items())])
    make_row = RELEASED["datacomp"][-1]
    (tmp_path / "datacomp_small").mkdir()
    with serving(site) as base:
        rows = [make_row(f"{base}/{name}", caption, i) for i, (name, caption) in enumerate(names.items())]
        rows[1:1] = [make_row(f"{base}/missing.jpg", "a photo that is gone", 98)]
        rows[5:5] = [make_row(f"{base}/notes.txt", "a page that is not an image", 99)]
        write_url_list(tmp_path / "datacomp_small" / "part-0.parquet", "parquet", rows)
        run_img2dataset(**{**fire_kwargs(download[1:]), "processes_count": 1, "thread_count": 4,
                           "number_sample_per_shard": PER_SHARD, "timeout": SERVER_TIMEOUT, "retries": 0,
                           "distributor": "multiprocessing"})
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == ["00000.tar", "00001.tar"]

    serve_tiny_coca(monkeypatch, tmp_path)
    serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-16")  # the tiny config, random weights
    counts = clip_quality_main([*synthesize[4:], "--device", "cpu", "--num-synthetic", "2", "--gen-batch-size", "2"])
    counts = counts["synthesize"]
    written = list(iter_webdataset([str(tmp_path / "synthetic" / f"{shard:05d}.tar") for shard in (0, 1)]))
    assert counts["written"] == len(written) == 5 - counts["images_without_caption"] and len(written) >= 4, counts
    assert counts["captions"] == sum(len(r["synthetic_captions"]) for r in written)
    by_url = {row["url"]: row for row in rows}
    for record in written:  # img2dataset's fields kept beside the new one, the image under its key
        assert (record["caption"], record["uid"]) == (by_url[record["url"]]["text"], by_url[record["url"]]["uid"])
        assert 1 <= len(record["synthetic_captions"]) <= 2 and record["image"].size[0] > 0

    result = clip_quality_main([*pretrain[4:], "--device", "cpu", "--train.steps", "2", "--train.batch-size", "4",
                                "--train.warmup", "1", "--train.workers", "0", "--out", str(tmp_path / "run")])
    runs = {row["regime"]: row for row in result["pretrain"]}
    assert set(runs) == {"datacomp", "datacompdr"} and all(math.isfinite(r["final_loss"]) for r in runs.values())
    assert runs["datacomp"]["final_loss"] != runs["datacompdr"]["final_loss"]  # two losses, synthetic texts, differ
    assert all(Path(r["checkpoint"]).is_file() for r in runs.values())
