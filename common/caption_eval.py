"""Caption evaluation shared by the captioners: CLIP-based scores, COCO metrics and the miniature world's labels.

`caption_metrics` takes per-caption CLIP-based scores (computed by the caller, e.g. with `clip_s_scores`, as
each paper picks its evaluator models), references for the COCO toolkit's BLEU / CIDEr (common.caption_metrics)
and, on the miniature world, the records' labels (common.miniature: names kept, hallucinated words). Every
number is a mean over the captions; `per_item` receives each caption's values, which a one-seed verdict
resamples. `load_scorer` loads the CLIP model behind the scores: by open_clip name, or the world's scorer
(`load_frozen_encoder` and `encoder_weights`: the same for a captioner's frozen image encoder);
`score_fields` scores text fields of a manifest's records against their images (an eval stage).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from common.caption_metrics import coco_scores, plain_words
from common.clip_score import CLIP_S_WEIGHT, PREFIX, encode_texts, load_clip, load_clip_as, score_from_features
from common.clip_train import MINIATURE_MODEL, TrainConfig, ensure_miniature_scorer
from common.data import ManifestError
from common.embedding_cache import embed_records
from common.miniature import WorldConfig, hallucinated_words, names_kept


def load_scorer(model: str, pretrained: str | None, device: str, world: WorldConfig, training: TrainConfig,
                flags: tuple[str, str] = ("--score-model", "--score-pretrained"), pacs_checkpoint: str | None = None):
    """A common.clip_score bundle: open_clip `model` with `pretrained` (a tag or a file), or 'miniature' = the
    scorer of `world` trained with `training` (cached). A load error starts with the flag to change (`flags`:
    the model's and the weights'); random weights (pretrained None, tests only) are seeded, the same each load.
    pacs_checkpoint: PAC-S weights loaded on top (common.clip_score.load_clip)."""
    if model == "miniature":
        return load_clip(MINIATURE_MODEL, str(ensure_miniature_scorer(world, training)), device)
    if pretrained is None:
        torch.manual_seed(0)
    return load_clip_as({"model": flags[0], "pretrained": flags[1]}, model, pretrained, device,
                        pacs_checkpoint=pacs_checkpoint)


def load_frozen_encoder(model: str, pretrained: str | None, device: str, world: WorldConfig, training: TrainConfig,
                        flags: tuple[str, str] = ("--clip-model", "--clip-pretrained")):
    """`load_scorer` for a captioner's frozen image encoder, torch's RNG seeded first unless `model` is
    'miniature': random weights (tests) are the same in every stage, and so is the RNG after them."""
    if model != "miniature":
        torch.manual_seed(0)
    return load_scorer(model, pretrained, device, world, training, flags)


def encoder_weights(model: str, pretrained: str | None, world: WorldConfig, training: TrainConfig) -> str | None:
    """What `load_scorer` loads into `model`: `pretrained` (an open_clip tag or a file), or for 'miniature' the
    file of the world's cached scorer."""
    return str(ensure_miniature_scorer(world, training)) if model == "miniature" else pretrained


def clip_s_scores(scorer, img_feats: np.ndarray, captions: Sequence[str], weight: float = CLIP_S_WEIGHT,
                  prefix: str = PREFIX) -> np.ndarray:
    """Per-caption CLIP-S (C,) against the images' features (C, E) of `scorer`; an empty caption scores 0."""
    txt_feats = encode_texts(scorer, [c or "." for c in captions], prefix=prefix, progress=False)
    # CLIP-S(x, c) = w * max(cos(E_img(x), E_txt("A photo depicts " + c)), 0) (Hessel et al. 2021, w = 2.5)
    return score_from_features(img_feats, txt_feats, weight) * np.array([bool(c) for c in captions])


def caption_metrics(records: Sequence[dict], captions: Sequence[str], refs: Sequence[Sequence[str]],
                    clip_scores: Mapping[str, np.ndarray] | None = None, scale: float = 100.0,
                    coco_metrics: tuple[str, ...] = ("BLEU-4", "CIDEr"),
                    world_names: tuple[str, str] = ("names kept %", "hallucinated/caption"), count_empty: bool = True,
                    per_item: dict | None = None) -> dict:
    """The metrics of `captions` of `records`, each mean x `scale` (100: percentages, 1: fractions) except counts.

    clip_scores: {label: per-caption scores} ("CLIP-S": clip_s_scores(...)); refs: each caption's references
    (the COCO metrics only when every caption has some, with their "tokenizer" label); count_empty: an "empty"
    count of empty captions; world_names: the names of the names-kept ratio (kept names over names to keep,
    summed over the captions) and the hallucinated words per caption, computed when the records carry the
    miniature world's labels ("objects"). per_item: receives each caption's values (names kept as [kept, to
    keep])."""
    items: dict = {} if per_item is None else per_item
    metrics: dict = {}
    for label, scores in (clip_scores or {}).items():
        metrics[label] = scale * float(np.mean(scores))
        items[label] = (scale * np.asarray(scores, float)).tolist()
    if count_empty:
        metrics["empty"] = sum(not c for c in captions)
    if refs and all(refs):
        metrics.update(coco_scores(dict(enumerate(refs)), dict(enumerate(captions)), scale=scale,
                                   metrics=coco_metrics, per_item=items))
    if records and "objects" in records[0]:  # miniature world: its labels say which names are kept or invented
        kept_name, hallucinated_name = world_names
        items[kept_name] = [[int(n) for n in names_kept(c, r)] for c, r in zip(captions, records)]
        kept, total = np.sum(items[kept_name], axis=0)
        metrics[kept_name] = scale * float(kept / max(total, 1))
        items[hallucinated_name] = [float(len(hallucinated_words(c, r))) for c, r in zip(captions, records)]
        metrics[hallucinated_name] = float(np.mean(items[hallucinated_name]))
    return metrics


def references(records: Sequence[dict], refs_field: str = "refs") -> list[list[str]]:
    """Each record's references for the COCO metrics: its `refs_field` list, else its `caption`, else none."""
    return [r.get(refs_field) or ([r["caption"]] if r.get("caption") else []) for r in records]


def score_fields(records: list[dict], fields: Sequence[str], scorer, refs_field: str, strict: bool, source: str,
                 fields_flag: str = "--eval-fields") -> dict:
    """{field: caption_metrics of its texts} for each text field of `records` (read from `source`), on the images
    `scorer` can read (strict: the first unreadable one is an error): CLIP-S x 100 by `scorer`, BLEU-4 and CIDEr
    x 100 against `references(records, refs_field)`, the world's labels where the records carry them."""
    img_emb, readable = embed_records(scorer, records, strict)
    records = [r for r, ok in zip(records, readable.tolist()) if ok]
    img_feats = img_emb[readable].numpy()
    results = {}
    for field in fields:
        texts = [r.get(field) for r in records]
        if not all(isinstance(text, str) for text in texts):
            raise ManifestError(f"{source}: field {field!r} missing or not a string in some records; "
                                f"list fields to score with {fields_flag}")
        results[field] = caption_metrics(records, texts, references(records, refs_field),
                                         {"CLIP-S": clip_s_scores(scorer, img_feats, texts)})
    return results


def collapse_indicators(captions: Sequence[str], n: int = 3, per_item: dict | None = None) -> dict:
    """Signs of a captioner collapsing onto a few phrasings: the vocabulary used, the fraction of distinct
    captions, the repeated n-grams per caption (occurrences beyond each n-gram's first) and the mean length in
    words (common.caption_metrics.plain_words: lower-cased, punctuation removed); `per_item` receives each
    caption's repeated n-grams."""
    words = [plain_words(c) for c in captions]
    repeated = []
    for w in words:
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        repeated.append(len(grams) - len(set(grams)))
    if per_item is not None:
        per_item[f"rep_{n}gram"] = [float(r) for r in repeated]
    return {"vocab": len({t for w in words for t in w}), "distinct": len(set(captions)) / max(1, len(captions)),
            f"rep_{n}gram": float(np.mean(repeated)), "length": float(np.mean([len(w) for w in words]))}
