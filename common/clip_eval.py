"""CLIP evaluation: images and texts encoded in batches, retrieval R@k both ways, zero-shot accuracy, and the
miniature world's tests (its zero-shot tasks, the swap test of each attribute kind); a CLIP built from a tag or
a checkpoint, and evaluated on a manifest with references (`retrieval_and_zero_shot`).

Images come preprocessed one by one from a manifest's records or a `common.columns.Columns` (`ImageRows`), so
an evaluation set of any size streams through the encoder; embeddings are checked to be finite.
"""

from __future__ import annotations

from typing import Callable, Sequence

from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from common.clip_score import tag_settings
from common.columns import Columns, open_row_image
from common.data import ManifestError, MissingWeightsError, NonFiniteError, image_source, open_image, text_problem
from common.miniature import SWAP_TYPES, swapped_captions, zero_shot_tasks


class ImageRows(torch.utils.data.Dataset):
    """The preprocessed image (3, H, W) of each row, decoded when asked for: over `Columns` (any size) or a
    list of records (small sets). An unreadable image is an error naming the sample."""

    def __init__(self, source: "Columns | Sequence[dict]", preprocess: Callable, rows: Sequence[int] | None = None):
        self.source, self.preprocess = source, preprocess
        self.rows = np.arange(len(source)) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        row = int(self.rows[index])
        if isinstance(self.source, Columns):
            return self.preprocess(open_row_image(self.source, row))
        record = self.source[row]
        return self.preprocess(open_image(image_source(record), str(record.get("id"))))


def preprocess_images(records: "Sequence[dict] | Columns", preprocess: Callable) -> torch.Tensor:
    """All preprocessed images of `records` in one (N, 3, H, W) tensor: only for small sets (the miniature world),
    where decoding once and sharing the tensor between runs is the fast path."""
    rows = ImageRows(records, preprocess)
    return torch.stack([rows[i] for i in range(len(rows))])


@torch.no_grad()
def encode_images(model, images: "torch.Tensor | torch.utils.data.Dataset", batch_size: int = 256, device: str = "cpu",
                  workers: int = 0) -> torch.Tensor:
    """L2-normalised image embeddings (N, E) in float32, batch by batch: from a preprocessed tensor, or from a
    Dataset of preprocessed images (`ImageRows`: decoded in `workers` processes, never all in memory)."""
    if isinstance(images, torch.Tensor):
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    else:
        batches = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=workers)
    out = [F.normalize(model.encode_image(batch.to(device)).float(), dim=-1).cpu() for batch in batches]
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    """L2-normalised text embeddings (T, E) in float32."""
    out = [F.normalize(model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device)).float(), dim=-1).cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out)


def check_embeddings(embeddings: torch.Tensor, what: str) -> None:
    """NonFiniteError when an embedding holds NaN or inf: a NaN similarity is never greater than another, so every
    query of a diverged model would rank its own item first (R@K = 100) and every image would pick class 0."""
    bad = ~torch.isfinite(embeddings).all(dim=-1)
    if bad.any():
        raise NonFiniteError(f"{what} contain NaN or inf ({int(bad.sum())} of {len(embeddings)}): its weights are not "
                             "finite (a diverged training?); no metric is computed from them")


def retrieval_metrics(img_emb: torch.Tensor, txt_emb: torch.Tensor, text_to_image: Sequence[int] | None = None,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 4096, name: str = "the model",
                      per_item: dict | None = None) -> dict:
    """Zero-shot retrieval recall@K in percent, both directions; non-finite embeddings of model `name` are refused.
    `per_item`, when given, receives each query's hit in percent (100 or 0; i2t per image, t2i per text) under the
    same keys, whose means are the metrics: what a paired bootstrap over the test items resamples.

    `text_to_image[t]` is the image of text t (default: text t belongs to image t). Image->text
    counts a hit when any of the image's texts is in the top K; text->image when its image is.
    The similarities are computed `chunk` texts at a time (5k images x 25k captions never as one matrix), in
    two passes: the first finds each image's best correct text and ranks each text's image, the second counts
    the texts above each image's best; both passes compute the same products, so ties are judged alike.
    """
    check_embeddings(img_emb, f"image embeddings of {name}")
    check_embeddings(txt_emb, f"text embeddings of {name}")
    text_to_image = torch.arange(len(txt_emb)) if text_to_image is None else torch.as_tensor(text_to_image)
    images = torch.arange(len(img_emb))
    best_correct = torch.full((len(img_emb),), -torch.inf)
    t2i_rank = torch.empty(len(txt_emb), dtype=torch.long)
    for first in range(0, len(txt_emb), chunk):
        sims = img_emb @ txt_emb[first:first + chunk].t()  # (N_img, chunk)
        owners = text_to_image[first:first + chunk]
        owner = owners[None, :] == images[:, None]  # (N_img, chunk): text belongs to image
        best_correct = torch.maximum(best_correct, sims.masked_fill(~owner, -torch.inf).max(dim=1).values)
        correct_sim = sims[owners, torch.arange(len(owners))]
        t2i_rank[first:first + chunk] = (sims > correct_sim[None, :]).sum(dim=0)  # images scoring above its own
    i2t_rank = torch.zeros(len(img_emb), dtype=torch.long)
    for first in range(0, len(txt_emb), chunk):
        i2t_rank += (img_emb @ txt_emb[first:first + chunk].t() > best_correct[:, None]).sum(dim=1)
    hits = {f"{direction}_R@{k}": 100.0 * (rank < k).float() for k in ks
            for direction, rank in (("i2t", i2t_rank), ("t2i", t2i_rank))}
    if per_item is not None:
        per_item.update({key: value.tolist() for key, value in hits.items()})
    return {key: value.mean().item() for key, value in hits.items()}


def zero_shot_accuracy(model, tokenizer, img_emb: torch.Tensor, classes: Sequence[str], templates: Sequence[str],
                       labels: Sequence[int], device: str = "cpu", name: str = "the model",
                       per_item: list | None = None) -> float:
    """Top-1 accuracy in percent: each class is the mean of its prompt embeddings (CLIP's ensembling); non-finite
    embeddings of model `name` are refused. `per_item`, when given, receives each image's 100 (right) or 0."""
    check_embeddings(img_emb, f"image embeddings of {name}")
    prompts = [template.format(class_name) for class_name in classes for template in templates]
    class_emb = encode_texts(model, tokenizer, prompts, device=device).view(len(classes), len(templates), -1)
    check_embeddings(class_emb.flatten(0, 1), f"class prompt embeddings of {name}")
    class_emb = F.normalize(class_emb.mean(dim=1), dim=-1)  # (C, E)
    correct = 100.0 * ((img_emb @ class_emb.t()).argmax(dim=1) == torch.as_tensor(labels)).float()
    if per_item is not None:
        per_item.extend(correct.tolist())
    return correct.mean().item()


def evaluate_world(model, tokenizer, preprocess, records: Sequence[dict], text_field: str = "caption",
                   images: "torch.Tensor | ImageRows | None" = None, device: str = "cpu",
                   name: str = "the model", per_item: dict | None = None) -> dict:
    """Retrieval against `text_field` and the world's zero-shot tasks on miniature-world records (model `name`);
    `per_item`, when given, receives every metric's per-item values (retrieval_metrics, zero_shot_accuracy)."""
    img_emb = encode_images(model, ImageRows(records, preprocess) if images is None else images, device=device)
    txt_emb = encode_texts(model, tokenizer, texts_of(records, text_field), device=device)
    metrics = retrieval_metrics(img_emb, txt_emb, name=name, per_item=per_item)
    for task, spec in zero_shot_tasks(list(records)).items():
        if spec["indices"]:
            correct = per_item.setdefault(f"zeroshot_{task}", []) if per_item is not None else None
            metrics[f"zeroshot_{task}"] = zero_shot_accuracy(model, tokenizer, img_emb[spec["indices"]],
                                                             spec["classes"], spec["templates"], spec["labels"], device,
                                                             name=name, per_item=correct)
    return metrics


def texts_of(records: Sequence[dict], field: str) -> list[str]:
    """Every record's text in `field` for an evaluation, by `text_problem`'s rule: a record without one is an error
    naming it (a test set that silently shrank would not be the test set)."""
    for record in records:
        problem = text_problem(record.get(field), field)
        if problem is not None:
            raise ManifestError(f"evaluation sample {record.get('id')!r}: {problem}")
    return [record[field] for record in records]


def swap_accuracy(model, tokenizer, img_emb: torch.Tensor, records: Sequence[dict], seed: int = 0,
                  device: str = "cpu") -> dict:
    """SugarCrepe-style: per swap type, % of images whose ground-truth caption outscores the one-swap caption.

    `img_emb[i]` is record i's image; the swaps come from `swapped_captions` with a generator seeded by (seed, i),
    so every model is tested on the same pairs.
    """
    truth = encode_texts(model, tokenizer, texts_of(records, "caption"), device=device)
    check_embeddings(img_emb, "image embeddings of the model")
    check_embeddings(truth, "text embeddings of the model")
    right = (img_emb * truth).sum(dim=1)
    swaps = [swapped_captions(r, np.random.default_rng([seed, i])) for i, r in enumerate(records)]
    out = {}
    for kind in SWAP_TYPES:
        rows = [i for i, s in enumerate(swaps) if kind in s]
        if rows:
            wrong = (img_emb[rows] * encode_texts(model, tokenizer, [swaps[i][kind] for i in rows],
                                                  device=device)).sum(1)
            out[f"swap_{kind}"] = 100.0 * (right[rows] > wrong).float().mean().item()
    return out


def build_clip(name: str, pretrained: str | None = None, seed: int = 0):
    """(model, preprocess, tokenizer) of open_clip architecture `name`: from scratch, seeded by `seed` (as
    common.clip_train.create_clip), or from a pretrained tag or checkpoint path, built as the tag was trained."""
    torch.manual_seed(seed)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                                     **tag_settings(name, pretrained))
    except (RuntimeError, OSError) as err:
        if pretrained is None:
            raise
        raise MissingWeightsError(f"cannot load --pretrained {pretrained!r} for --model {name}: {err}") from err
    return model, preprocess, open_clip.get_tokenizer(name)


def load_checkpoint(path: Path) -> tuple:
    """(model, preprocess, tokenizer, architecture name) of a common.clip_train checkpoint whose recipe names its
    `model` and `pretrained`, built as it was trained: a run started from a QuickGELU tag (OpenAI's) keeps
    QuickGELU and the tag's preprocessing."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    name, pretrained = state["recipe"]["model"], state["recipe"]["pretrained"]
    model, _, preprocess = open_clip.create_model_and_transforms(name, **tag_settings(name, pretrained))
    model.load_state_dict(state["state_dict"])
    return model, preprocess, open_clip.get_tokenizer(name), name


def references(records: Sequence[dict], text_field: str, flag: str | None = "--text-field") -> tuple[list, list]:
    """Every reference caption of every image and the image each belongs to: (texts [T], text_to_image [T]); a list
    field holds several references (COCO and Flickr30k: 5 per image), a string field one. An image without one
    is an error naming it (and `flag`, which chooses the field)."""
    texts, text_to_image = [], []
    for index, record in enumerate(records):
        value = record.get(text_field)
        if value in (None, "", []):
            hint = f"; pass {flag} with a field that holds the caption(s)" if flag else ""
            raise ManifestError(f"evaluation sample {record.get('id')!r}: no reference caption in field "
                                f"{text_field!r}{hint}")
        problem = text_problem(value, text_field, lists=True)  # a number or a list of them is no caption
        if problem is not None:
            raise ManifestError(f"evaluation sample {record.get('id')!r}: {problem}")
        refs = [value] if isinstance(value, str) else value
        texts += refs
        text_to_image += [index] * len(refs)
    return texts, text_to_image


def retrieval_and_zero_shot(model, tokenizer, preprocess, records: Sequence[dict], text_field: str = "refs",
                            class_field: str | None = None, templates: Sequence[str] = ("a photo of a {}.",),
                            images: "torch.Tensor | ImageRows | None" = None, workers: int = 0, name: str = "the model",
                            per_item: dict | None = None, flag: str | None = "--text-field") -> dict:
    """A CLIP on a manifest, on the model's device: retrieval R@1/5/10 both ways over every reference caption in
    `text_field` (the Karpathy COCO/Flickr protocol: an image is hit when any of its captions is in the top K),
    and zero-shot accuracy: the miniature world's tasks (with `zeroshot_attributes`, the mean of background,
    shape and colour), else `class_field`'s classes with the `templates` ensemble. `images`: preprocessed
    (N, 3, H, W), else decoded batch by batch; `per_item` receives each test item's value of every metric
    (zeroshot_attributes: per image [background, shape, color], None where the image is not in a task)."""
    device = next(model.parameters()).device  # cuda:1 under torchrun, never a default cpu
    images = ImageRows(records, preprocess) if images is None else images
    img_emb = encode_images(model, images, device=device, workers=workers)  # (N, E)
    texts, text_to_image = references(records, text_field, flag)
    items: dict = {} if per_item is None else per_item
    metrics = retrieval_metrics(img_emb, encode_texts(model, tokenizer, texts, device=device), text_to_image,
                                name=name, per_item=items)
    if "objects" in records[0]:  # a miniature world: attribute tasks and the named-entity task, own templates
        tasks = zero_shot_tasks(list(records))
        for task, spec in tasks.items():
            if spec["indices"]:
                metrics[f"zeroshot_{task}"] = zero_shot_accuracy(model, tokenizer, img_emb[spec["indices"]],
                                                                 spec["classes"], spec["templates"], spec["labels"],
                                                                 device, name=name,
                                                                 per_item=items.setdefault(f"zeroshot_{task}", []))
        attributes = ("background", "shape", "color")
        metrics["zeroshot_attributes"] = float(np.mean([metrics[f"zeroshot_{t}"] for t in attributes]))
        by_image = [dict(zip(tasks[t]["indices"], items[f"zeroshot_{t}"])) for t in attributes]
        items["zeroshot_attributes"] = [[task.get(i) for task in by_image] for i in range(len(records))]
    elif class_field:
        names = texts_of(records, class_field)  # strings: an id such as 3 would be prompted "a photo of a 3."
        classes = sorted(set(names))
        labels = [classes.index(n) for n in names]
        metrics["zeroshot_top1"] = zero_shot_accuracy(model, tokenizer, img_emb, classes, templates, labels, device,
                                                      name=name)
    return metrics
