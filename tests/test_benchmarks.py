"""common/benchmarks.py: clip_benchmark's own evaluation of our model object on tiny local webdataset sets, checked
against embeddings computed here and the project's own retrieval and zero-shot code; missing sets, no downloads."""

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tyro
import webdataset as wds
from PIL import Image

from common.benchmarks import (BenchmarkArgs, MissingBenchmark, _accuracy, _refuse_downloads, _replaced,
                               benchmark_task, check_benchmarks, dataset_root, evaluate_benchmarks,
                               write_benchmark_results)
from common.clip_train import create_clip
from common.clip_eval import encode_images, encode_texts, retrieval_metrics, zero_shot_accuracy

MICRO = "micro-ViT-16"
CLASSES = ["red", "green", "blue"]
TEMPLATES = ["a photo of a {c} thing.", "a {c} picture."]  # clip_benchmark's templates take the class as {c}
LABELS = [0, 0, 0, 1, 1, 2]  # unbalanced: top-1 accuracy and mean per-class recall differ
# 1 to 3 captions an image (COCO has 5 to 7): 13 in all, so text -> image recall (k/13) is never image -> text's (k/6)
CAPTIONS = [["a red square on grass", "something red", "a red apple on a table"], ["a green field"],
            ["two blue circles", "the blue sea"], ["a yellow car at night", "yellow", "a lemon"],
            ["a black cat on a sofa"], ["white snow on a mountain", "a bright white wall", "a white plate"]]


def webp_images(seed: int, colors) -> list[bytes]:
    """Small noisy images of the given colours, lossless WebP (the format of clip_benchmark's Hub mirrors)."""
    rng = np.random.default_rng(seed)
    out = []
    for color in colors:
        pixels = np.clip(np.array(color) + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="webp", lossless=True)
        out.append(buffer.getvalue())
    return out


def write_wds(folder, samples: list[dict], classes=None, templates=None, dataset_type=None) -> None:
    """clip_benchmark's webdataset layout, as its clip_benchmark_export_wds writes it: <folder>/test/0.tar (keys
    s0000000...), <folder>/test/nshards.txt, classnames.txt and zeroshot_classification_templates.txt (one per
    line) for classification, dataset_type.txt ("retrieval") for retrieval."""
    (folder / "test").mkdir(parents=True)
    with wds.TarWriter(str(folder / "test" / "0.tar")) as sink:
        for index, sample in enumerate(samples):
            sink.write({"__key__": "s%07d" % index, **sample})
    (folder / "test" / "nshards.txt").write_text("1\n")
    if classes:
        (folder / "classnames.txt").write_text("\n".join(classes) + "\n")
        (folder / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    if dataset_type:
        (folder / "dataset_type.txt").write_text(dataset_type + "\n")


def write_stage_sets(folder) -> str:
    """The two sets the paper files' --benchmark tests evaluate: wds/colors (classification, 6 images of 3 classes)
    and wds/flickr30k (retrieval, 12 images, enough for R@10); returns the --benchmark-root pattern."""
    colors = webp_images(0, [(220, 40, 40)] * 3 + [(40, 200, 40)] * 2 + [(40, 40, 220)])
    write_wds(folder / "wds_colors", [{"webp": image, "cls": label} for image, label in zip(colors, LABELS)],
              CLASSES, TEMPLATES)
    pictures = webp_images(1, [(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 220, 30), (20, 20, 20),
                               (240, 240, 240)] * 2)
    write_wds(folder / "wds_flickr30k", [{"webp": image, "txt": "\n".join(captions)}
                                         for image, captions in zip(pictures, CAPTIONS * 2)], dataset_type="retrieval")
    return str(folder / "{name}")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Three sets under root/{name}: colors (classification, `.cls`), flickr30k and my_captions (the same retrieval
    samples, `.txt` with an image's captions one per line); the images' bytes."""
    root = tmp_path_factory.mktemp("benchmarks")
    colors = webp_images(0, [(220, 40, 40)] * 3 + [(40, 200, 40)] * 2 + [(40, 40, 220)])
    write_wds(root / "wds_colors", [{"webp": image, "cls": label} for image, label in zip(colors, LABELS)],
              CLASSES, TEMPLATES)
    pictures = webp_images(1, [(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 220, 30), (20, 20, 20),
                               (240, 240, 240)])
    for name in ("wds_flickr30k", "wds_my_captions"):
        write_wds(root / name, [{"webp": image, "txt": "\n".join(captions)}
                                for image, captions in zip(pictures, CAPTIONS)], dataset_type="retrieval")
    return {"root": str(root / "{name}"), "colors": colors, "pictures": pictures}


@pytest.fixture(scope="module")
def clip():
    return create_clip(MICRO, seed=0)  # random weights, offline


@pytest.fixture(scope="module")
def rows(sets, clip):
    model, preprocess, tokenizer = clip
    model.train()  # evaluation switches to eval mode and back
    out = evaluate_benchmarks(model, preprocess, tokenizer, ["wds/colors", "wds/flickr30k", "wds/my_captions"],
                              sets["root"], batch_size=4, recall_k=(1, 5), model_label=MICRO, pretrained="random")
    assert model.training
    return {row["dataset"]: row for row in out}


def decoded(images: list[bytes], preprocess) -> torch.Tensor:
    return torch.stack([preprocess(Image.open(io.BytesIO(image))) for image in images])


def test_rows_are_clip_benchmarks_result_form_with_its_task_choice(rows):
    assert list(rows) == ["wds/colors", "wds/flickr30k", "wds/my_captions"]  # the order asked for
    for name, row in rows.items():
        assert set(row) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert (row["dataset"], row["model"], row["pretrained"], row["language"]) == (name, MICRO, "random", "en")
    assert rows["wds/colors"]["task"] == "zeroshot_classification"
    assert rows["wds/flickr30k"]["task"] == "zeroshot_retrieval"  # clip_benchmark's rule for the name
    assert rows["wds/my_captions"]["task"] == "zeroshot_retrieval"  # an unknown name: its dataset_type.txt
    assert rows["wds/my_captions"]["metrics"] == rows["wds/flickr30k"]["metrics"]
    assert set(rows["wds/colors"]["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert set(rows["wds/flickr30k"]["metrics"]) == {f"{way}_retrieval_recall@{k}" for way in ("image", "text")
                                                     for k in (1, 5)}


def test_zero_shot_top1_and_per_class_recall_are_the_argmax_over_the_same_embeddings(rows, sets, clip):
    model, preprocess, tokenizer = clip
    metrics = rows["wds/colors"]["metrics"]
    model.eval()
    img_emb = encode_images(model, decoded(sets["colors"], preprocess))
    prompts = encode_texts(model, tokenizer, [t.format(c=c) for c in CLASSES for t in TEMPLATES])
    class_emb = F.normalize(F.normalize(prompts, dim=-1).view(len(CLASSES), len(TEMPLATES), -1).mean(1), dim=-1)
    predictions = (img_emb @ class_emb.t()).argmax(dim=1)
    labels = torch.tensor(LABELS)
    top1 = (predictions == labels).float().mean().item()
    per_class = np.mean([(predictions[labels == c] == c).float().mean().item() for c in range(len(CLASSES))])
    assert 0 < top1 < 1 and top1 != pytest.approx(per_class)  # the tiny model's guesses tell the metrics apart
    assert metrics["acc1"] == pytest.approx(top1)
    assert metrics["mean_per_class_recall"] == pytest.approx(per_class)
    assert math.isnan(metrics["acc5"])  # clip_benchmark reports no top-5 with fewer than 5 classes
    ours = zero_shot_accuracy(model, tokenizer, img_emb, CLASSES, [t.replace("{c}", "{}") for t in TEMPLATES], LABELS)
    assert 100 * metrics["acc1"] == pytest.approx(ours)


def test_retrieval_recall_is_the_projects_retrieval_metrics_on_the_same_embeddings(rows, sets, clip):
    model, preprocess, tokenizer = clip
    metrics = rows["wds/flickr30k"]["metrics"]
    model.eval()
    img_emb = encode_images(model, decoded(sets["pictures"], preprocess))
    txt_emb = encode_texts(model, tokenizer, [c for captions in CAPTIONS for c in captions])
    ours = retrieval_metrics(img_emb, txt_emb, [i for i, captions in enumerate(CAPTIONS) for _ in captions], ks=(1, 5))
    assert 0 < ours["i2t_R@1"] != ours["t2i_R@1"] > 0  # the two directions differ here: a swap would fail
    for k in (1, 5):  # clip_benchmark: image retrieval = text -> image, text retrieval = image -> text
        assert 100 * metrics[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"t2i_R@{k}"])
        assert 100 * metrics[f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"i2t_R@{k}"])


def test_results_are_written_as_json_lines_and_a_markdown_table(rows, tmp_path):
    jsonl, md = write_benchmark_results(list(rows.values()), tmp_path / "out")
    read = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert json.dumps(read) == json.dumps(list(rows.values()))  # NaN-aware equality
    table = md.read_text()
    acc1 = rows["wds/colors"]["metrics"]["acc1"]
    assert f"| {MICRO} | random | wds/colors | {100 * acc1:.2f} | – |" in table
    assert "## zeroshot_retrieval" in table and "| image_retrieval_recall@1 |" in table


def test_a_missing_dataset_is_one_error_naming_each_path_and_how_to_get_it(tmp_path):
    root = str(tmp_path / "{name}")
    with pytest.raises(MissingBenchmark) as error:  # the model is never touched: every set is checked first
        evaluate_benchmarks(None, None, None, ["wds/imagenet1k", "mscoco_captions", "wds/mine"], root)
    message = str(error.value)
    assert message.startswith("3 of the --benchmark datasets are not under --benchmark-root")
    assert str(tmp_path / "wds_imagenet1k" / "test" / "nshards.txt") in message
    assert (f"hf download clip-benchmark/wds_imagenet1k --repo-type dataset --local-dir "
            f"{tmp_path / 'wds_imagenet1k'} --include 'test/*' --include '*.txt'") in message
    assert str(tmp_path / "mscoco_captions" / "val2014") in message
    assert f"clip_benchmark eval --dataset mscoco_captions --dataset_root {tmp_path / 'mscoco_captions'}" in message
    assert "clip_benchmark_export_wds --dataset mine" in message  # no Hub mirror of that name
    assert not any(tmp_path.iterdir())  # nothing created, nothing fetched


def test_a_torchvision_set_without_its_files_is_the_same_error(tmp_path, clip):
    model, preprocess, tokenizer = clip
    (tmp_path / "cifar10").mkdir()
    with pytest.raises(MissingBenchmark, match=r"cifar10: clip_benchmark cannot read it .*Dataset not found.*"
                                               r"clip_benchmark eval --dataset cifar10"):
        evaluate_benchmarks(model, preprocess, tokenizer, ["cifar10"], str(tmp_path / "{name}"))


def test_a_download_by_clip_benchmarks_builder_is_refused(tmp_path):
    from clip_benchmark.datasets import builder

    with _replaced(builder, "call", _refuse_downloads("imagenet1k", str(tmp_path))):  # as evaluate_benchmarks runs it
        with pytest.raises(MissingBenchmark, match=r"would run `wget https://image-net\.org"):
            builder.build_dataset("imagenet1k", root=str(tmp_path / "imagenet"), download=False)
    assert builder.call is not None and builder.call.__module__ == "subprocess"


def test_unusable_requests_are_refused_before_any_work(tmp_path):
    assert evaluate_benchmarks(None, None, None, [], "") == []
    for names, root, words in [(["imagenet1k"], "", "needs --benchmark-root"),
                               (["wds/imagenet1k"], "https://huggingface.co/datasets/x/{name}", "is a URL"),
                               (["vtab/cifar10"], str(tmp_path), "use the webdataset mirror wds/vtab/cifar10"),
                               (["sugar_crepe/add_att"], str(tmp_path), "image_caption_selection")]:
        with pytest.raises(ValueError, match=words):
            check_benchmarks(names, root)


def test_roots_tasks_and_the_copyable_fields():
    assert dataset_root("wds/vtab/cifar10", "b/{name}") == "b/wds_vtab_cifar10"
    assert dataset_root("wds/vtab/cifar10", "b/wds_{dataset_cleaned}") == "b/wds_vtab-cifar10"  # the Hub's names
    assert dataset_root("wds/vtab/cifar10", "b/{dataset}") == "b/vtab/cifar10"
    assert dataset_root("imagenet1k", "b/imagenet") == "b/imagenet"
    assert [benchmark_task(n, "/nowhere") for n in ("imagenet1k", "wds/imagenet1k", "mscoco_captions",
                                                    "wds/flickr30k", "wds/mine")] == \
        ["zeroshot_classification", "zeroshot_classification", "zeroshot_retrieval", "zeroshot_retrieval",
         "zeroshot_classification"]
    argv = ["--benchmark", "imagenet1k", "mscoco_captions", "--benchmark-root", "D/{name}"]
    assert tyro.cli(BenchmarkArgs, args=argv) == BenchmarkArgs(("imagenet1k", "mscoco_captions"), "D/{name}")
    assert tyro.cli(BenchmarkArgs, args=[]) == BenchmarkArgs()


def test_the_top_k_accuracy_in_place_of_clip_benchmarks_is_its_formula():
    """clip_benchmark 1.6.2's `accuracy` calls float() on a 1-element array (NumPy >= 2.4: TypeError); `_accuracy`
    takes its place there and must count as it does: a hit when the target is among the k highest logits."""
    from clip_benchmark.metrics.zeroshot_classification import accuracy

    generator = torch.Generator().manual_seed(0)
    logits, target = torch.randn(50, 7, generator=generator), torch.randint(0, 7, (50,), generator=generator)
    by_hand = [(logits.topk(k, dim=1).indices == target[:, None]).any(1).float().mean().item() for k in (1, 5)]
    assert _accuracy(logits, target, topk=(1, 5)) == pytest.approx(by_hand)
    assert 0 < by_hand[0] < by_hand[1] < 1
    try:
        theirs = accuracy(logits, target, topk=(1, 5))
    except TypeError:  # the NumPy this test runs with refuses it
        return
    assert theirs == pytest.approx(by_hand)
