"""Dense-prediction probes of an image encoder: a 1x1-convolution head on its patch tokens, trained for segmentation
(mIoU, mAcc as mmseg computes them) and depth (RMSE in metres), with the data streaming, the trivial baselines and
the encoders loaded by spec (a checkpoint of ours, open_clip NAME@TAG, or an untrained NAME).

clip_quality.py probes its pretrained encoders with it (docs/clip_quality.md, Deviations 1-3, 7 and 8).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common.clip_score import tag_settings
from common.data import ManifestError, MissingWeightsError, image_source, open_image
from common.training import epoch_permutation


@dataclass(frozen=True)
class ProbeSettings:
    """What a probe reads of a run's flags, built only by `from_args`: each field is the flag of the same name
    (clip_quality.Args documents them and holds their defaults)."""

    num_classes: int  # segmentation classes: mask values 0..num_classes-1 or ignore_index
    ignore_index: int  # mask value that marks unlabelled pixels
    reduce_zero_label: bool  # mmseg's reduce_zero_label: 0 -> ignore, k -> k - 1
    finetune: bool  # train the image encoder with the head (else its tokens are computed once, frozen)
    finetune_lr: float
    probe_steps: int
    probe_batch_size: int
    probe_lr: float
    probe_workers: int
    device: str
    out: str  # the frozen token cache is written (then deleted) under it

    @classmethod
    def from_args(cls, args) -> "ProbeSettings":
        """The settings of any object with attributes of these names (a paper file's Args)."""
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def patch_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last block's patch tokens after the final LayerNorm, as a grid: (B, C, H/p, W/p)."""
    out = visual.forward_intermediates(images, indices=1, normalize_intermediates=True, intermediates_only=True)
    return out["image_intermediates"][-1]


class DenseProbe(nn.Module):
    """A 1x1 convolution per task on the (batch-normalised) patch grid, upsampled bilinearly to pixels."""

    def __init__(self, width: int, num_classes: int, tasks: Sequence[str] = ("seg", "depth")):
        super().__init__()
        self.norm = nn.BatchNorm2d(width)
        self.segment = nn.Conv2d(width, num_classes, kernel_size=1) if "seg" in tasks else None
        self.depth = nn.Conv2d(width, 1, kernel_size=1) if "depth" in tasks else None

    def forward(self, tokens: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        tokens = self.norm(tokens)  # (B, C, h, w)
        up = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        logits = up(self.segment(tokens)) if self.segment is not None else None  # (B, K, H, W)
        depth = up(self.depth(tokens))[:, 0] if self.depth is not None else None  # (B, H, W)
        return logits, depth


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(K, K) counts, rows = true class, columns = predicted class; ignored and out-of-range pixels skipped."""
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    flat = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor) -> dict:
    """mIoU, mAcc and pixel accuracy in percent, as mmseg: classes absent from labels and predictions skipped."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    # IoU_k = TP_k / (TP_k + FP_k + FN_k); mIoU = mean over classes with a non-empty union
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = true_positive / union  # NaN where a class is neither labelled nor predicted
    # Acc_k = TP_k / (TP_k + FN_k); mAcc = mean over labelled classes
    accuracy = true_positive / confusion.sum(1)
    return {"mIoU": 100 * np.nanmean(iou.numpy()).item(), "mAcc": 100 * np.nanmean(accuracy.numpy()).item(),
            "aAcc": 100 * (true_positive.sum() / confusion.sum()).item()}


def depth_rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image RMSE in metres over valid pixels (target > 0): (B,)."""
    valid = (target > 0).float()
    # RMSE_b = sqrt( sum_valid (d_pred - d)^2 / n_valid )
    squared = ((pred - target) ** 2 * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
    return squared.sqrt()


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Nearest-neighbour shortest-side resize + centre crop: open_clip's image transform, for label maps."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.NEAREST)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


TASK_FIELDS = {"seg": "mask", "depth": "depth"}  # probe task -> the manifest field that carries its labels


def reduce_zero_label(labels: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """mmseg's LoadAnnotations(reduce_zero_label=True): 0 (ADE20k's `other`) -> ignore, k -> k - 1, ignore stays."""
    # y' = ignore if y in {0, ignore} else y - 1
    return np.where((labels == 0) | (labels == ignore_index), ignore_index, labels - 1)


def load_mask(record: dict, size: int, num_classes: int, ignore_index: int, reduce_zero: bool) -> torch.Tensor:
    """A record's class-id PNG as (S, S) long, cropped like its image; a label outside the classes is an error."""
    path = image_source(record, "mask")
    labels = np.asarray(Image.open(path), dtype=np.int64)
    if labels.ndim != 2:
        raise ManifestError(f"{path} (sample {record.get('id')!r}): a mask must be one channel of class ids, "
                            f"got shape {labels.shape}")
    if reduce_zero:
        labels = reduce_zero_label(labels, ignore_index)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        values = np.unique(labels[bad])
        hint = ("labels run 1..K with 0 = `other` as in raw ADE20k: pass --reduce-zero-label"
                if not reduce_zero and values.max() == num_classes else "check --num-classes, --ignore-index and "
                "--reduce-zero-label")
        raise ManifestError(f"{path} (sample {record.get('id')!r}): label values {values[:10].tolist()} are outside "
                            f"0..{num_classes - 1} and not --ignore-index {ignore_index}; {hint}")
    cropped = resize_center_crop(Image.fromarray(labels.astype(np.int32)), size)  # mode I: any class id survives
    return torch.from_numpy(np.asarray(cropped, np.int64))


def load_depth(record: dict, size: int) -> torch.Tensor:
    """A record's uint16 millimetre PNG as (S, S) float metres, cropped like its image (0 stays 0 = invalid)."""
    depth = resize_center_crop(Image.open(image_source(record, "depth")), size)
    return torch.from_numpy(np.asarray(depth, np.float32) / 1000.0)


def dense_targets(record: dict, size: int, settings: ProbeSettings, fields: Sequence[str]) -> dict:
    """A record's label maps at (S, S) for `fields`: `mask` long class ids, `depth` float metres."""
    load = {"mask": lambda: load_mask(record, size, settings.num_classes, settings.ignore_index,
                                      settings.reduce_zero_label),
            "depth": lambda: load_depth(record, size)}
    return {field: load[field]() for field in fields}


def label_fields(records: Sequence[dict], tasks: Sequence[str]) -> tuple[str, ...]:
    """The label fields of `tasks` that `records` carry; one that some records carry and others lack is an error."""
    fields = []
    for task, field in TASK_FIELDS.items():
        carriers = sum(bool(r.get(field)) for r in records) if task in tasks else 0
        if 0 < carriers < len(records):
            missing = next(r["id"] for r in records if not r.get(field))
            raise ManifestError(f"sample {missing!r} has no {field!r} while others do; give every record one")
        fields += [field] if carriers else []
    return tuple(fields)


class ProbeDataset(torch.utils.data.Dataset):
    """A probe manifest decoded item by item: {"image": (3, S, S), "mask": (S, S) long, "depth": (S, S) metres}, the
    `fields` asked. It holds the records only: DataLoader workers decode each batch, the set never sits in memory."""

    def __init__(self, records: Sequence[dict], preprocess: Callable, size: int, settings: ProbeSettings,
                 fields: Sequence[str]):
        self.records, self.preprocess, self.size, self.settings = records, preprocess, size, settings
        self.fields = tuple(fields)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        item = dense_targets(record, self.size, self.settings, [f for f in self.fields if f != "image"])
        if "image" in self.fields:
            image = open_image(image_source(record), str(record.get("id")))
            item["image"] = self.preprocess(image)  # as preprocess_images
        return item

    def only(self, fields: Sequence[str]) -> "ProbeDataset":
        """The same records, decoding only those of `fields` that this set carries."""
        kept = [f for f in self.fields if f in fields]
        return ProbeDataset(self.records, self.preprocess, self.size, self.settings, kept)


def probe_plan(train: Sequence[dict], test: Sequence[dict], task: str) -> list[tuple[str, ...]]:
    """The probes to train per encoder: one per task (`task` "each"), one of them ("seg", "depth"), or one probe of
    both tasks with the losses summed ("joint"); the train and test records must carry the same label fields."""
    carried = []
    for kind, field in TASK_FIELDS.items():
        has = [any(r.get(field) for r in subset) for subset in (train, test)]
        if has[0] != has[1]:
            raise ManifestError(f"the probe {'train' if has[0] else 'test'} manifest carries {field!r} and the "
                                f"{'test' if has[0] else 'train'} manifest does not; give both or neither")
        carried += [kind] if has[0] else []
    if not carried:
        raise ManifestError("the probe manifests carry neither `mask` nor `depth` fields: nothing to probe")
    if task == "each":
        return [(kind,) for kind in carried]
    wanted = ("seg", "depth") if task == "joint" else (task,)
    missing = [TASK_FIELDS[t] for t in wanted if t not in carried]
    if missing:
        raise ManifestError(f"--task {task} needs {missing} in the probe manifests, which carry only "
                            f"{[TASK_FIELDS[t] for t in carried]}")
    return [wanted]


def probe_datasets(train: Sequence[dict], test: Sequence[dict], preprocess: Callable, settings: ProbeSettings,
                   tasks: Sequence[str]) -> tuple[ProbeDataset, ProbeDataset]:
    """Datasets over the probe's train and test records that decode image and label maps per item, at the model's
    input size."""
    size = preprocess(Image.new("RGB", (8, 8))).shape[-1]  # the side of the transform's square crop, whatever the input
    train_set, test_set = (ProbeDataset(subset, preprocess, size, settings, ("image", *label_fields(subset, tasks)))
                           for subset in (train, test))
    return train_set, test_set


def probe_loss(logits: torch.Tensor | None, depth: torch.Tensor | None, masks: torch.Tensor | None,
               target_depth: torch.Tensor | None, depth_mean: torch.Tensor, depth_std: torch.Tensor,
               ignore_index: int) -> dict:
    """The probe's training terms for the tasks whose labels are given; `loss` sums them (`--task joint`)."""
    terms = {}
    if masks is not None:
        # clip_quality.py step 2: cross-entropy over labelled pixels (mask != ignore_index)
        # logits (B, K, H, W), masks (B, H, W)
        terms["seg"] = F.cross_entropy(logits, masks, ignore_index=ignore_index)
    if target_depth is not None:
        # MSE on standardised depth over valid pixels: mean_{d > 0} (d_hat - (d - mu) / sigma)^2
        terms["depth"] = ((depth - (target_depth - depth_mean) / depth_std) ** 2)[target_depth > 0].mean()
    terms["loss"] = sum(terms.values())
    return terms


EVAL_BATCH = 256  # images per encoder pass outside training: the frozen token cache and the test set


def probe_loader(dataset: ProbeDataset, settings: ProbeSettings, **batching) -> torch.utils.data.DataLoader:
    """`dataset` in batches (`batch_size` or `batch_sampler`) decoded by --probe-workers processes (0: this one)."""
    return torch.utils.data.DataLoader(dataset, num_workers=settings.probe_workers, **batching)


def epoch_batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless batches of min(batch_size, n) indices: epoch e is common.training.epoch_permutation(e) cut into whole
    batches (the remainder sits that epoch out), each sorted so that a memory-mapped cache reads in order."""
    size = min(batch_size, n)
    for epoch in itertools.count():
        order = epoch_permutation(epoch, n, seed)
        for start in range(0, n - size + 1, size):
            yield np.sort(order[start:start + size])


def depth_moments(depth: torch.Tensor) -> np.ndarray:
    """(count, sum, sum of squares) of the valid pixels (> 0) of a batch of depth maps, in float64."""
    valid = depth[depth > 0].double()
    return np.array([valid.numel(), valid.sum().item(), (valid ** 2).sum().item()])


def depth_statistics(moments: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (Bessel-corrected, as torch.std) of the valid training depth, from its summed moments."""
    count, total, squares = moments
    if count == 0:
        raise ManifestError("the probe training set has no valid depth pixel (every depth PNG is 0 = invalid)")
    mean = total / count
    # sigma^2 = (sum d^2 - n mu^2) / (n - 1): float64 sums over float32 metres, exact to float32 precision
    variance = max(squares - count * mean ** 2, 0.0) / max(count - 1, 1)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(variance ** 0.5, dtype=torch.float32).clamp_min(1e-6)


def cache_frozen(visual: nn.Module, dataset: ProbeDataset, settings: ProbeSettings,
                 folder: Path) -> tuple[dict, np.ndarray]:
    """One pass of the frozen encoder over `dataset`: its patch tokens and label maps written to memory-mapped .npy
    files in `folder` (tokens in the encoder's float32: the numbers a recomputation gives), and the depth moments."""
    cache, moments, start = {}, np.zeros(3), 0
    with torch.no_grad():
        for batch in probe_loader(dataset, settings, batch_size=EVAL_BATCH):
            batch["tokens"] = patch_tokens(visual, batch.pop("image").to(settings.device)).cpu()  # (B, C, h, w)
            moments += depth_moments(batch["depth"]) if "depth" in batch else 0
            for field, values in batch.items():
                if field not in cache:  # (N, ...) of the first batch's dtype: float32 tokens, long masks, float depth
                    cache[field] = np.lib.format.open_memmap(folder / f"{field}.npy", mode="w+", shape=(
                        len(dataset), *values.shape[1:]), dtype=values.numpy().dtype)
                cache[field][start:start + len(values)] = values.numpy()
            start += len(values)
    return cache, moments


def training_batches(visual: nn.Module, train_set: ProbeDataset, settings: ProbeSettings, seed: int,
                     folder: Path) -> tuple[Iterable[dict], np.ndarray]:
    """(--probe-steps batches in epoch order, the moments of the training set's valid depth pixels).

    A frozen encoder's tokens are computed once and read back from a memory-mapped cache in `folder` (batches carry
    "tokens"); a fine-tuned encoder's batches carry "image"s decoded per step by the DataLoader's workers."""
    batches = itertools.islice(epoch_batches(len(train_set), settings.probe_batch_size, seed), settings.probe_steps)
    if settings.finetune:
        moments = np.zeros(3)
        if "depth" in train_set.fields:  # a pass over the depth maps alone: the statistics need no image
            for batch in probe_loader(train_set.only(("depth",)), settings, batch_size=EVAL_BATCH):
                moments += depth_moments(batch["depth"])
        return probe_loader(train_set, settings, batch_sampler=batches), moments
    cache, moments = cache_frozen(visual, train_set, settings, folder)
    return ({field: torch.from_numpy(values[order]) for field, values in cache.items()} for order in batches), moments


def evaluate_probe(visual: nn.Module, head: DenseProbe, test_set: ProbeDataset, tasks: Sequence[str],
                   depth_mean: torch.Tensor, depth_std: torch.Tensor, settings: ProbeSettings,
                   per_item: dict | None = None) -> dict:
    """A trained probe's test metrics, the test set streamed in batches: confusion and per-image RMSEs summed.
    `per_item`, when given, receives each test image's share, what a one-seed verdict resamples: its RMSE, and
    its [true positives, predicted, labelled] pixels per class (whose sums give the mIoU: reproduce.py's
    miou_of_sums)."""
    confusion = torch.zeros(settings.num_classes, settings.num_classes, dtype=torch.long)
    rmse_sum, images, items = 0.0, 0, {} if per_item is None else per_item
    with torch.no_grad():
        for batch in probe_loader(test_set, settings, batch_size=EVAL_BATCH):
            pixels = batch["image"].to(settings.device)
            logits, depth = head(patch_tokens(visual, pixels), pixels.shape[-2:])
            if "seg" in tasks:
                predicted = logits.argmax(1).cpu()  # (B, H, W)
                for image_pred, image_mask in zip(predicted, batch["mask"]):
                    own = confusion_matrix(image_pred, image_mask, settings.num_classes, settings.ignore_index)
                    confusion += own
                    items.setdefault("mIoU", []).append([own.diag().tolist(), own.sum(0).tolist(), own.sum(1).tolist()])
            if "depth" in tasks:  # RMSE per image (Eigen; clip_quality.py Deviation 3), then the mean over images
                rmse = depth_rmse(depth.cpu() * depth_std + depth_mean, batch["depth"]).double()
                rmse_sum, images = rmse_sum + rmse.sum().item(), images + len(pixels)
                items.setdefault("depth_RMSE", []).extend(rmse.tolist())
    metrics = segmentation_metrics(confusion) if "seg" in tasks else {}
    if "depth" in tasks:
        metrics["depth_RMSE"] = rmse_sum / images
    return metrics



def train_and_evaluate_probe(visual: nn.Module, train_set: ProbeDataset, test_set: ProbeDataset,
                             settings: ProbeSettings, seed: int, tasks: Sequence[str] = ("seg", "depth"),
                             per_item: dict | None = None) -> dict:
    """Train one DenseProbe on `tasks` of the probe datasets (losses summed if two); return its test metrics
    (per_item: see evaluate_probe)."""
    torch.manual_seed(seed)
    visual = visual.to(settings.device)
    fields = ("image", *(TASK_FIELDS[task] for task in tasks))
    train_set, test_set = train_set.only(fields), test_set.only(fields)
    first = train_set[0]["image"][None].to(settings.device)  # (1, 3, H, W)
    size = tuple(first.shape[-2:])
    with torch.no_grad():
        width = patch_tokens(visual.eval(), first).shape[1]
    # built before a DataLoader draws from torch's RNG
    head = DenseProbe(width, settings.num_classes, tasks).to(settings.device)
    groups = [{"params": head.parameters(), "lr": settings.probe_lr}]
    if settings.finetune:
        groups.append({"params": visual.parameters(), "lr": settings.finetune_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="probe-cache-", dir=settings.out) as folder:  # frozen tokens, deleted after
        batches, moments = training_batches(visual, train_set, settings, seed, Path(folder))
        depth_mean, depth_std = (depth_statistics(moments) if "depth" in tasks else
                                 (torch.tensor(0.0), torch.tensor(1.0)))
        visual.train(settings.finetune)  # the head is a fresh module, in training mode
        for batch in batches:
            tokens = (batch["tokens"].to(settings.device) if "tokens" in batch else  # (B, C, h, w)
                      patch_tokens(visual, batch["image"].to(settings.device)))
            logits, depth = head(tokens, size)
            masks = batch["mask"].to(settings.device) if "seg" in tasks else None
            target = batch["depth"].to(settings.device) if "depth" in tasks else None
            loss = probe_loss(logits, depth, masks, target, depth_mean, depth_std, settings.ignore_index)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    head.eval()
    visual.eval()
    return evaluate_probe(visual, head, test_set, tasks, depth_mean, depth_std, settings, per_item)


def probe_encoder(visual: nn.Module, train_set: ProbeDataset, test_set: ProbeDataset, settings: ProbeSettings,
                  seed: int, plan: Sequence[tuple[str, ...]]) -> dict:
    """One probe per entry of `plan`, each from the same encoder weights (copied when --finetune trains them)."""
    metrics, items = {}, {}
    for tasks in plan:
        encoder = copy.deepcopy(visual) if settings.finetune and len(plan) > 1 else visual
        metrics.update(train_and_evaluate_probe(encoder, train_set, test_set, settings, seed, tasks, items))
    return {**metrics, "per_item": items}


def majority_class(train_set: ProbeDataset, settings: ProbeSettings) -> int:
    """The most frequent labelled class over the probe's training masks (the miniature world's: background)."""
    counts = torch.zeros(settings.num_classes, dtype=torch.long)
    for batch in probe_loader(train_set.only(("mask",)), settings, batch_size=EVAL_BATCH):
        labels = batch["mask"][batch["mask"] != settings.ignore_index]  # load_mask refused any other out-of-range id
        counts += torch.bincount(labels, minlength=settings.num_classes)
    return int(counts.argmax())


def position_mean_depth(train_set: ProbeDataset, settings: ProbeSettings) -> torch.Tensor:
    """(S, S) each pixel's mean valid training depth: what position alone predicts; a pixel never valid in training
    gets the mean of all valid pixels."""
    total, count = 0, 0  # (S, S) sums after the first batch
    for batch in probe_loader(train_set.only(("depth",)), settings, batch_size=EVAL_BATCH):
        valid = (batch["depth"] > 0).double()
        total, count = total + (batch["depth"].double() * valid).sum(0), count + valid.sum(0)
    overall = total.sum() / count.sum().clamp_min(1)
    # clip_quality.py step 5: d_hat(p) = sum_i d_i(p) [d_i(p) > 0] / sum_i [d_i(p) > 0]
    return torch.where(count > 0, total / count.clamp_min(1), overall).float()


def trivial_baselines(train_set: ProbeDataset, test_set: ProbeDataset, tasks: Sequence[str],
                      settings: ProbeSettings) -> dict:
    """The floors a dense probe has to beat, on the probe's test set: segmentation by predicting the training set's
    majority class at every pixel (mIoU, mAcc), depth by each pixel's mean training depth (RMSE per image).
    `per_item`: each test image's share, as evaluate_probe's (a one-seed verdict pairs the probes with them)."""
    baselines, items = {}, {}
    if "seg" in tasks:
        # clip_quality.py step 5: argmax_k of the training masks' class counts, at every pixel
        k = majority_class(train_set, settings)
        confusion = torch.zeros(settings.num_classes, settings.num_classes, dtype=torch.long)
        for batch in probe_loader(test_set.only(("mask",)), settings, batch_size=EVAL_BATCH):
            for mask in batch["mask"]:
                own = confusion_matrix(torch.full_like(mask, k), mask, settings.num_classes, settings.ignore_index)
                confusion += own
                items.setdefault("majority_class_mIoU", []).append(
                    [own.diag().tolist(), own.sum(0).tolist(), own.sum(1).tolist()])
        metrics = segmentation_metrics(confusion)
        baselines.update(majority_class=k, majority_class_mIoU=metrics["mIoU"], majority_class_mAcc=metrics["mAcc"])
    if "depth" in tasks:
        mean_depth, rmse_sum, images = position_mean_depth(train_set, settings), 0.0, 0
        for batch in probe_loader(test_set.only(("depth",)), settings, batch_size=EVAL_BATCH):
            rmse = depth_rmse(mean_depth.expand_as(batch["depth"]), batch["depth"]).double()
            rmse_sum, images = rmse_sum + rmse.sum().item(), images + len(batch["depth"])
            items.setdefault("position_only_depth_RMSE", []).extend(rmse.tolist())
        baselines["position_only_depth_RMSE"] = rmse_sum / images
    return {**baselines, "per_item": items}


# ---------------------------------------------------------------------------------------------
# The encoders to probe, by spec: a checkpoint of ours, an open_clip NAME@TAG, or NAME (random init)
# ---------------------------------------------------------------------------------------------


def architecture(spec: str) -> tuple[str, bool]:
    """(open_clip model name, QuickGELU forced) that `spec` builds: a checkpoint's saved name, a tag's settings."""
    if Path(spec).is_file():
        return torch.load(spec, map_location="cpu", weights_only=True, mmap=True)["model"], False
    name, _, tag = spec.partition("@")
    return name, tag_settings(name, tag)["force_quick_gelu"]


def create_random(name: str, quick_gelu: bool, seed: int) -> tuple[nn.Module, Callable]:
    """An untrained open_clip model of an architecture: (model, preprocess), as create_clip seeds it."""
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, force_quick_gelu=quick_gelu)
    return model, preprocess


def load_model_spec(spec: str, device: str = "cpu") -> tuple[str, nn.Module, Callable]:
    """(label, model, preprocess) for a checkpoint path, `NAME@PRETRAINED` or `NAME` (random init)."""
    if Path(spec).is_file():
        payload = torch.load(spec, map_location="cpu", weights_only=True)
        model, preprocess = create_random(payload["model"], False, seed=0)  # no tokenizer: it takes a second to build
        model.load_state_dict(payload["state_dict"])
        return payload.get("label", Path(spec).stem), model.to(device).eval(), preprocess
    name, _, tag = spec.partition("@")
    if not tag:
        model, preprocess = create_random(name, False, seed=0)  # = create_clip(name)'s model
        return f"{name} (random init)", model.to(device).eval(), preprocess
    try:  # the tag's own settings: QuickGELU for OpenAI-style weights, its preprocessing
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device=device,
                                                                     **tag_settings(name, tag))
    except Exception as err:  # offline or unknown tag: one clear error, no retries
        raise MissingWeightsError(f"cannot load open_clip {name!r} with pretrained {tag!r} ({err}); offline, pass a "
                                  "local weights file as NAME@/path/to/weights.bin or one of our .pt "
                                  "checkpoints") from err
    return spec, model.eval(), preprocess


def check_specs(specs: Sequence[str], flag: str) -> None:
    """Every spec is `random`, a checkpoint file or an open_clip model (NAME or NAME@TAG): else one error naming
    `flag` and every unknown spec."""
    unknown = [spec for spec in specs if spec != "random" and not Path(spec).is_file()
               and spec.partition("@")[0] not in open_clip.list_models()]
    if unknown:
        raise FileNotFoundError(f"{flag}: {', '.join(unknown)}: neither a checkpoint file nor an open_clip model "
                                "(NAME or NAME@PRETRAINED_TAG)")


def probe_checkpoints(given: Sequence[str], folder: Path) -> list[str]:
    """The encoders a probe stage probes: `given` (--checkpoints), else every *.pt in `folder` (the pretrain stage's
    output); each checked by check_specs before the first probe trains, not after it."""
    checkpoints = list(given) or sorted(str(p) for p in folder.glob("*.pt"))
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoints given and none in {folder}; run the pretrain stage or pass "
                                "--checkpoints (`random` probes an untrained encoder)")
    check_specs(checkpoints, "--checkpoints")
    return checkpoints


def random_architecture(checkpoints: Sequence[str], model: str) -> tuple[str, bool]:
    """The architecture of the `random` baseline: the probed checkpoints' (which must agree), else `model`."""
    found = {spec: architecture(spec) for spec in checkpoints if spec != "random"}
    kinds = set(found.values())
    if len(kinds) > 1:
        listing = ", ".join(f"{spec}: {name}{' (QuickGELU)' if quick else ''}" for spec, (name, quick) in found.items())
        raise ValueError(f"`random` must be the probed checkpoints' architecture, but they differ ({listing}); "
                         "probe each architecture with its own `random` in a separate run")
    return kinds.pop() if kinds else (model, False)


def probe_specs(specs: Sequence[str], train: Sequence[dict], test: Sequence[dict], settings: ProbeSettings, task: str,
                seeds: Sequence[int], model: str) -> list[dict]:
    """One row of test metrics per encoder spec (its probes per `probe_plan`, with seeds[0]); `random` is an untrained
    encoder of the specs' architecture (else `model`'s), probed once per seed."""
    plan = probe_plan(train, test, task)
    tasks = sorted({name for group in plan for name in group})
    if "random" in specs:
        random_name, random_quick_gelu = random_architecture(specs, model)
    rows = []
    for spec in specs:
        for seed in (seeds if spec == "random" else seeds[:1]):
            if spec == "random":
                encoder, preprocess = create_random(random_name, random_quick_gelu, seed)
                label = f"{random_name}{' (QuickGELU)' if random_quick_gelu else ''} (random init)"
                arch = random_name
            else:
                label, encoder, preprocess = load_model_spec(spec, settings.device)
                arch = architecture(spec)[0]
            metrics = probe_encoder(encoder.visual, *probe_datasets(train, test, preprocess, settings, tasks), settings,
                                    seed, plan)
            rows.append({"checkpoint": spec, "label": label, "architecture": arch, "probe_seed": seed,
                         "finetune": settings.finetune, "task": task, **metrics})
            print(f"probe {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "per_item"))
    return rows
