"""CLIP on the standard benchmarks through LAION's clip_benchmark, as the papers' tables report them.

The real path's zero-shot numbers (ImageNet-1k top-1, COCO and Flickr30k recall@K, any set of the CLIP
benchmark) come from clip_benchmark itself: its dataset builders (`build_dataset`, `get_dataset_collate_fn`), its
class names and prompt templates, its choice of task for a dataset (`get_dataset_default_task`: retrieval for the
caption sets) and its metric code (`zeroshot_classification.evaluate`, `zeroshot_retrieval.evaluate`). Nothing
here recomputes a metric; this module hands clip_benchmark our open_clip model object (built from a tag or loaded
from one of our checkpoints) instead of letting it build one from a name, and never downloads.

- `evaluate_benchmarks(model, preprocess, tokenizer, names, root)`: one result row per dataset, in
  clip_benchmark's own JSON result form `{"dataset", "model", "pretrained", "task", "metrics", "language"}`
  (metrics as clip_benchmark writes them: fractions in [0, 1], e.g. `acc1`, `image_retrieval_recall@5`).
- `write_benchmark_results(rows, out_dir)`: `benchmarks.jsonl` (the rows) and `benchmarks.md` (tables in percent).
- `check_benchmarks(names, root)`: every dataset present, else one `MissingBenchmark` error naming each missing path
  and how to get it; `evaluate_benchmarks` calls it first, a training stage may call it before it trains.
- `BenchmarkArgs`: the two command-line fields (`--benchmark NAME ...`, `--benchmark-root DIR`) to copy into a
  script's Args.

Datasets are read where `root` says, with `{name}` replaced by the dataset name with "/" -> "_" ("wds/imagenet1k" ->
"wds_imagenet1k"), and clip_benchmark's own `{dataset}` (the name without "wds/") and `{dataset_cleaned}` (that
with "/" -> "-") as its `--dataset_root` has them. The simplest source is clip_benchmark's webdataset mirrors on
the Hugging Face Hub (`wds/<name>`, one repository `clip-benchmark/wds_<name>` per set), downloaded once:

    hf download clip-benchmark/wds_imagenet1k --repo-type dataset --local-dir benchmarks/wds_imagenet1k \
        --include 'test/*' --include '*.txt'
    hf download clip-benchmark/wds_mscoco_captions --repo-type dataset --local-dir benchmarks/wds_mscoco_captions \
        --include 'test/*' --include '*.txt'

then `--benchmark wds/imagenet1k wds/mscoco_captions --benchmark-root 'benchmarks/{name}'`. The other names
("imagenet1k", "cifar10", "mscoco_captions", "flickr30k", ...) read clip_benchmark's torchvision-style layouts,
which its own `clip_benchmark eval --dataset NAME --dataset_root DIR` downloads. docs/benchmarks.md: the layouts,
the commands, what the miniature world uses instead (its own zero-shot tasks, common.miniature).

Where clip_benchmark 1.6.2 cannot run as released, the smallest change, in place only while evaluating:
its top-k `accuracy` calls float() on a 1-element array, an error from NumPy 2.4 on (LAION-AI/CLIP_benchmark#147);
`_accuracy` is the same count with `.item()` and takes its place only where the original fails. Its builder's
`subprocess.call` (wget, kaggle, unzip where files are missing) is an error here, and its tqdm bars are off
unless `progress=True`. clip_benchmark imports `requests` without declaring it (requirements.txt has it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from common.data import atomic_write_text

SUPPORTED_TASKS = ("zeroshot_classification", "zeroshot_retrieval")
RESULTS_JSONL, RESULTS_MD = "benchmarks.jsonl", "benchmarks.md"
HUB_MIRROR = "https://huggingface.co/datasets/clip-benchmark/wds_{dataset_cleaned}"
# clip_benchmark's benchmark/webdatasets.txt: the sets it has mirrored on the Hub as clip-benchmark/wds_<cleaned name>
WDS_MIRRORS = frozenset(
    "mscoco_captions flickr8k flickr30k imagenet1k imagenetv2 imagenet_sketch imagenet-a imagenet-r imagenet-o "
    "objectnet fer2013 voc2007 voc2007_multilabel sun397 cars fgvc_aircraft mnist stl10 gtsrb country211 renderedsst2 "
    "vtab/caltech101 vtab/cifar10 vtab/cifar100 vtab/clevr_count_all vtab/clevr_closest_object_distance "
    "vtab/diabetic_retinopathy vtab/dmlab vtab/dsprites_label_orientation vtab/dsprites_label_x_position "
    "vtab/dsprites_label_y_position vtab/dtd vtab/eurosat vtab/kitti_closest_vehicle_distance vtab/flowers vtab/pets "
    "vtab/pcam vtab/resisc45 vtab/smallnorb_label_azimuth vtab/smallnorb_label_elevation vtab/svhn".split())
# multilingual sets: clip_benchmark downloads their annotation file where it is missing (set -> its module)
LANGUAGE_ANNOTATIONS = {"multilingual_mscoco_captions": "multilingual_mscoco", "crossmodal3600": "crossmodal3600",
                        "xtd10": "xtd10", "xtd200": "xtd200", "flickr30k-200": "flickr30k_200"}


@dataclass
class BenchmarkArgs:
    """The two fields a script's Args copies (tyro: `--benchmark imagenet1k mscoco_captions --benchmark-root DIR`)."""

    benchmark: tuple[str, ...] = ()
    """clip_benchmark dataset names to evaluate on (e.g. imagenet1k mscoco_captions, or wds/imagenet1k for its
    webdataset mirror; see docs/benchmarks.md); needs --benchmark-root"""
    benchmark_root: str = ""
    """local folder with the datasets as clip_benchmark lays them out ({name} is replaced by the dataset name with
    "/" -> "_", e.g. benchmarks/{name} -> benchmarks/wds_imagenet1k); nothing is downloaded"""


class MissingBenchmark(FileNotFoundError):
    """A benchmark dataset is not where --benchmark-root says: the message names each path and how to get it."""


def short_name(name: str) -> str:
    """The name clip_benchmark's CLI chooses the task and fills `{dataset}` by: without a leading "wds/"."""
    return name[len("wds/"):] if name.startswith("wds/") else name


def dataset_root(name: str, root: str) -> str:
    """`root` with the placeholders of dataset `name` filled: `{name}` (the name, "/" -> "_"), and clip_benchmark's
    `{dataset}` (the name without "wds/") and `{dataset_cleaned}` (that, "/" -> "-")."""
    short = short_name(name)
    return (root.replace("{name}", name.replace("/", "_")).replace("{dataset_cleaned}", short.replace("/", "-"))
            .replace("{dataset}", short))


def benchmark_task(name: str, root: str) -> str:
    """The task clip_benchmark's CLI runs for `name` (`--task auto`: get_dataset_default_task of the name without
    "wds/"). A `wds/` set whose dataset_type.txt says "retrieval" is retrieval under any name, as its reader reads
    it (where clip_benchmark's CLI would need `--task zeroshot_retrieval`)."""
    from clip_benchmark.datasets.builder import get_dataset_default_task

    task = get_dataset_default_task(short_name(name))
    if name.startswith("wds/") and task == "zeroshot_classification" and _wds_type(root) == "retrieval":
        return "zeroshot_retrieval"
    return task


def _wds_type(root: str) -> str:
    path = Path(root) / "dataset_type.txt"  # what clip_benchmark's build_wds_dataset reads, "classification" without it
    return path.read_text().strip().lower() if path.is_file() else "classification"


def how_to_get(name: str, path: str, split: str = "test", mirror_path: str | None = None) -> str:
    """The command that puts dataset `name` at `path`: the Hub mirror for wds/ names, clip_benchmark's own download
    (and the mirror, into `mirror_path`, where there is one) for the others."""
    short = short_name(name)
    mirror = HUB_MIRROR.format(dataset_cleaned=short.replace("/", "-"))
    hub = (f"hf download clip-benchmark/wds_{short.replace('/', '-')} --repo-type dataset --local-dir "
           f"{path if name.startswith('wds/') or mirror_path is None else mirror_path} "
           f"--include '{split}/*' --include '*.txt'")
    if name.startswith("wds/"):
        if short in WDS_MIRRORS:
            return f"`{hub}` (clip_benchmark's webdataset mirror, {mirror})"
        flag = " --retrieval" if benchmark_task(name, path) == "zeroshot_retrieval" else ""
        return (f"no mirror of {short!r} on the Hub: write it with `clip_benchmark_export_wds --dataset {short} "
                f"--split {split} --dataset_root SOURCE --output {path}{flag}` (layout: <root>/{split}/nshards.txt, "
                f"<root>/{split}/0.tar ..., classnames.txt, zeroshot_classification_templates.txt or "
                "dataset_type.txt)")
    own = (f"`clip_benchmark eval --dataset {name} --dataset_root {path}` (it downloads the set there, then "
           "evaluates its default model)")
    if short in WDS_MIRRORS:
        return f"{own}, or its webdataset mirror: `{hub}` and --benchmark wds/{name}"
    return own


def _required(name: str, root: str, split: str, language: str) -> list[tuple[str, ...]]:
    """What must exist before clip_benchmark's builder reads `name` from `root` without a download: each entry is a
    group of paths of which one must exist (the builder downloads, with wget or kaggle, where they are missing)."""
    r = Path(root)
    if name.startswith("wds/"):
        need = [(str(r / split / "nshards.txt"),)]
        nshards = r / split / "nshards.txt"
        if nshards.is_file():
            need += [(str(r / split / f"{i}.tar"),) for i in range(int(nshards.read_text().strip() or 0))]
        if benchmark_task(name, root) == "zeroshot_classification":
            need += [(str(r / "classnames.txt"),), (str(r / "zeroshot_classification_templates.txt"),)]
        elif _wds_type(root) != "retrieval":  # e.g. wds/mscoco_captions without the file: read as .cls samples
            need += [(str(r / "dataset_type.txt"),)]
        return need
    if name == "imagenet1k":  # torchvision ImageNet: the devkit (or its parsed meta.bin) and the val images
        return [(str(r / "meta.bin"), str(r / "ILSVRC2012_devkit_t12.tar.gz")),
                (str(r / ("train" if split == "train" else "val")),
                 str(r / ("ILSVRC2012_img_train.tar" if split == "train" else "ILSVRC2012_img_val.tar")))]
    if name == "imagenetv2":
        folder = r / "ImageNetV2-matched-frequency"
        complete = folder.is_dir() and sum(1 for _ in folder.glob("**/*.jpeg")) == 10_000  # else it downloads
        return [(str(r / "ImageNetV2-matched-frequency.tar.gz"),) + ((str(folder),) if complete else ())]
    if name == "mscoco_captions":
        images = "train2014" if split == "train" else "val2014"
        return [(str(r / images),), (str(r / f"coco_{split}_karpathy.json"),)]
    if name in ("flickr30k", "flickr8k"):
        suffix = "karpathy" if language == "en" else language
        return [(str(r),), (str(r / f"{name}_{split}_{suffix}.txt"),)]
    if name in LANGUAGE_ANNOTATIONS:
        module = importlib.import_module(f"clip_benchmark.datasets.{LANGUAGE_ANNOTATIONS[name]}")
        return [(str(r / module.OUTPUT_FILENAME_TEMPLATE.format(language)),)]
    return [(str(r),)]  # torchvision sets (download=False: their own error if incomplete), ImageFolder sets


def check_benchmarks(names: Sequence[str], root: str, split: str = "test", language: str = "en") -> dict[str, str]:
    """{name: its folder} when every dataset of `names` is under `root` and can be evaluated here; else one error:
    ValueError for an unusable request (no root, a URL, a task this module does not run), MissingBenchmark naming
    every missing path and the command that gets it. Nothing is downloaded."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        return {}
    if not root:
        raise ValueError(f"--benchmark {' '.join(names)} needs --benchmark-root: the local folder of the datasets "
                         "(docs/benchmarks.md)")
    if "://" in root:
        raise ValueError(f"--benchmark-root {root!r} is a URL: nothing is downloaded here; download the sets first "
                         f"(e.g. {how_to_get('wds/imagenet1k', 'benchmarks/wds_imagenet1k')}) and pass the folder")
    folders, missing = {}, []
    for name in names:
        if name.startswith(("vtab/", "tfds/")):
            raise ValueError(f"--benchmark {name}: clip_benchmark reads vtab/ and tfds/ sets through "
                             f"tensorflow_datasets, which downloads on its own; use the webdataset mirror "
                             f"wds/{name} ({how_to_get('wds/' + name, dataset_root('wds/' + name, root))})")
        path = dataset_root(name, root)
        task = benchmark_task(name, path)
        if task not in SUPPORTED_TASKS:
            raise ValueError(f"--benchmark {name}: clip_benchmark's task for it is {task}; this evaluation runs "
                             f"{' and '.join(SUPPORTED_TASKS)} only")
        absent = [group for group in _required(name, path, split, language)
                  if not any(os.path.exists(p) for p in group)]
        if absent:
            missing.append(f"{name}: missing {', '.join(' or '.join(group) for group in absent)}; get it with "
                           f"{how_to_get(name, path, split, dataset_root('wds/' + name, root))}")
        folders[name] = path
    if missing:
        raise MissingBenchmark(f"{len(missing)} of the --benchmark datasets are not under --benchmark-root {root!r} "
                               "(nothing is downloaded here):\n  " + "\n  ".join(missing))
    return folders


@contextlib.contextmanager
def _replaced(module, name: str, value):
    """`module.name` is `value` inside the block and what it was after it."""
    real = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, real)


def _refuse_downloads(name: str, path: str):
    """What clip_benchmark's builder gets for `subprocess.call`, by which it runs wget/kaggle/unzip where files are
    missing: a MissingBenchmark error instead (check_benchmarks should have caught it first)."""
    def refuse(command, *args, **kwargs):
        raise MissingBenchmark(f"{name}: clip_benchmark would run `{command}` to fetch files missing under {path}; "
                               f"nothing is downloaded here: get it with {how_to_get(name, path)}")
    return refuse


def _accuracy(output, target, topk=(1,)):
    """clip_benchmark's zeroshot_classification.accuracy (top-k accuracy as a fraction) with `.item()` where it
    calls float() on a 1-element array, which NumPy >= 2.4 refuses (LAION-AI/CLIP_benchmark#147, open)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def working_accuracy():
    """clip_benchmark's own top-k `accuracy` where it runs with the installed NumPy, else `_accuracy`."""
    from clip_benchmark.metrics.zeroshot_classification import accuracy

    try:
        accuracy(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    except TypeError:
        return _accuracy
    return accuracy


def evaluate_benchmarks(model, preprocess, tokenizer, names: Sequence[str], root: str, device: str | None = None,
                        batch_size: int = 64, num_workers: int = 0, model_label: str = "open_clip",
                        pretrained: str = "", recall_k: Sequence[int] = (1, 5, 10), amp: bool | None = None,
                        split: str = "test", language: str = "en", progress: bool = False) -> list[dict]:
    """Evaluate an open_clip `model` (with its `preprocess` and `tokenizer`) on clip_benchmark's datasets `names`
    read from `root` (placeholders: `dataset_root`): one row per name, in clip_benchmark's JSON result form,
    `model_label` and `pretrained` filling its "model" and "pretrained" fields (e.g. the architecture and the
    checkpoint path or tag). The task is clip_benchmark's for the name (`benchmark_task`).

    Runs as clip_benchmark's `run` does for one dataset: build_dataset(download=False) with the model's
    `preprocess`; a DataLoader of `batch_size` (webdataset sets: `.batched(batch_size)`, batch_size=None),
    `num_workers` workers; zeroshot_classification.evaluate with the dataset's class names and templates, or
    zeroshot_retrieval.evaluate at `recall_k` (the papers' R@1/5/10; clip_benchmark's CLI default is 5 only).
    `device`: the model's own device by default; `amp`: bf16/fp16 autocast as clip_benchmark's default, on CUDA
    only unless given (on a CPU autocast is bf16, slow and off from fp32). The model is put in eval mode and
    given back in the mode it came in. Every dataset is checked first (`check_benchmarks`): a missing one is one
    MissingBenchmark error before any evaluation runs."""
    from clip_benchmark.datasets import builder
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    folders = check_benchmarks(names, root, split, language)
    if not folders:
        return []
    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp = device.type == "cuda" if amp is None else amp
    # clip_benchmark passes `device` to both .to() and torch.autocast(), which takes a device type only: "cuda"
    # with the model's CUDA device made current, so cuda:1 stays cuda:1
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    rows = []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(on_device)
            stack.enter_context(warnings.catch_warnings())  # its WebDataset(shardshuffle=None): no shuffle, a warning
            warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=\.\.\.\) is None")
            stack.enter_context(_replaced(zeroshot_classification, "accuracy", working_accuracy()))
            if not progress:  # clip_benchmark's bars: one per class while it builds the classifier, one per set
                quiet = functools.partial(tqdm, disable=True)
                stack.enter_context(_replaced(zeroshot_classification, "tqdm", quiet))
                stack.enter_context(_replaced(zeroshot_retrieval, "tqdm", quiet))
            for name, path in folders.items():
                task = benchmark_task(name, path)
                try:
                    with _replaced(builder, "call", _refuse_downloads(name, path)):
                        dataset = builder.build_dataset(dataset_name=name, root=path, transform=preprocess,
                                                        split=split, download=False, language=language, task=task)
                except MissingBenchmark:
                    raise
                except (FileNotFoundError, RuntimeError) as err:  # torchvision: "Dataset not found or corrupted"
                    raise MissingBenchmark(f"{name}: clip_benchmark cannot read it from {path} ({err}); get it with "
                                           f"{how_to_get(name, path)}") from err
                if name.startswith("wds/"):
                    loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False,
                                                         num_workers=num_workers)
                else:
                    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                         num_workers=num_workers,
                                                         collate_fn=builder.get_dataset_collate_fn(name))
                if task == "zeroshot_classification":
                    metrics = zeroshot_classification.evaluate(model, loader, tokenizer, dataset.classes,
                                                               dataset.templates, device=device.type, amp=amp)
                else:
                    metrics = zeroshot_retrieval.evaluate(model, loader, tokenizer, device=device.type, amp=amp,
                                                          recall_k_list=list(recall_k))
                rows.append({"dataset": name, "model": model_label, "pretrained": pretrained, "task": task,
                             "metrics": metrics, "language": language})
    finally:
        model.train(was_training)
    return rows


def _percent(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def results_markdown(rows: Sequence[dict]) -> str:
    """The rows as Markdown: one table per task, one line per model and dataset, metrics in percent."""
    lines = ["# CLIP benchmarks (clip_benchmark)", "",
             "Metrics in percent, computed by clip_benchmark's own code. Retrieval: image_retrieval_recall@K = "
             "text -> image (each caption finds its image in the top K), text_retrieval_recall@K = image -> text "
             "(one of the image's captions in the top K). acc5 is – with fewer than 5 classes.", ""]
    for task in dict.fromkeys(row["task"] for row in rows):
        mine = [row for row in rows if row["task"] == task]
        keys = list(dict.fromkeys(k for row in mine for k in row["metrics"]))
        lines += [f"## {task}", "", "| model | pretrained | dataset | " + " | ".join(keys) + " |",
                  "|---" * (len(keys) + 3) + "|"]
        lines += [f"| {row['model']} | {row['pretrained'] or '–'} | {row['dataset']} | "
                  + " | ".join(_percent(row["metrics"].get(k)) for k in keys) + " |" for row in mine]
        lines.append("")
    return "\n".join(lines)


def write_benchmark_results(rows: Sequence[dict], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `out_dir`/benchmarks.jsonl (one row per line, clip_benchmark's form; NaN as clip_benchmark's json.dump
    writes it) and `out_dir`/benchmarks.md (`results_markdown`); returns both paths."""
    out = Path(out_dir)
    jsonl, md = out / RESULTS_JSONL, out / RESULTS_MD
    atomic_write_text(jsonl, "".join(json.dumps(row) + "\n" for row in rows))
    atomic_write_text(md, results_markdown(rows))
    return jsonl, md
