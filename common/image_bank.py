"""Images of a split -> a frozen CLIP's hidden states and evaluator features, each computed once per process.

`image_bank(records, encoder, ...)` gives the ImageBank of a list of manifest records (fields id, image, refs):
the frozen open_clip encoder's last hidden states that a captioner reads (`visual_tokens`), and per evaluator
bundle the normalised image features (`image_features`) and reference-caption features (`reference_features`),
all cached, so that the stages of one process (and their seeds) share them. An image that cannot be read is
logged, counted in `skipped` (its index in `bad`) and left out wherever it is drawn; with `strict` it stops the
run (BadSampleError).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common.clip_score import (PREFIX, encode_images, encode_reference_groups, encode_texts, harmonic_mean,
                               ref_similarity, score_from_features)
from common.data import BadSampleError, SkipCounter, image_path, open_record_image
from common.run_folder import refuse

ENCODER_TOKENS = "last block, before ln_post"  # what `clip_hidden_states` returns; checkpoints record it


def same_encoder_tokens(path: Path, payload: dict) -> None:
    """Refuse a checkpoint whose captioner read other tokens than `clip_hidden_states` gives (its "encoder_tokens")."""
    if payload.get("encoder_tokens") != ENCODER_TOKENS:  # older checkpoints read the tokens after ln_post
        raise refuse(f"{path} was trained on the encoder's tokens after ln_post (the captioner now reads them before "
                     "it, as the official DiCO code); retrain it with the xe stage")


@torch.no_grad()
def clip_hidden_states(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen ViT's last hidden states, CLS and patches, before ln_post: (B, 1 + P, W).

    As Hugging Face CLIPVisionTransformer's last_hidden_state (the last block's output; post_layernorm only
    touches the pooled CLS).
    """
    out = visual.forward_intermediates(pixels, indices=1, output_fmt="NLC", output_extra_tokens=True,
                                       intermediates_only=True)  # the last block, not normalised
    return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1).float()


class ImageBank:
    """Per split: frozen-encoder tokens for a captioner and evaluator image features, by record index."""

    def __init__(self, records: list[dict], encoder, device: str, strict: bool = False, cache_tokens: bool = False):
        """`encoder`: an open_clip bundle (model, preprocess); `cache_tokens`: keep every image's tokens in memory
        (small data sets) instead of encoding them per batch."""
        self.records, self.encoder, self.device, self.strict = records, encoder, device, strict
        self.skipped, self.bad = SkipCounter(), set()
        self.scorer_features: dict = {}
        self.reference_cache: dict = {}
        self.tokens = None
        if cache_tokens:
            tokens, kept = self._encode(range(len(records)))
            self.tokens = tokens.new_zeros(len(records), *tokens.shape[1:])  # (N, 1 + P, W), bad rows never read
            self.tokens[kept] = tokens

    def open_images(self, indices) -> tuple[list[int], list]:
        """The readable ones of `indices` and their PIL images (each unreadable image counted once)."""
        kept, images = [], []
        for i in indices:
            image = None if i in self.bad else open_record_image(self.records[i], self.skipped, self.strict)
            if image is None:
                self.bad.add(i)
            else:
                kept.append(i)
                images.append(image)
        return kept, images

    def any_readable(self) -> bool:
        """Whether one of the images can be read (tried in order up to the first that can: one file, normally)."""
        return any(self.open_images([i])[0] for i in range(len(self.records)) if i not in self.bad)

    def require_readable(self, what: str) -> None:
        """BadSampleError "<what> can be read, all skipped (first: ...)" when none of the images can be read."""
        if not self.any_readable():
            first = self.skipped.examples[0][1] if self.skipped.examples else "the split is empty"
            raise BadSampleError(f"{what} can be read, all skipped (first: {first})")

    def placeholder(self) -> torch.Tensor:
        """One all-zero row of tokens (1, 1 + P, W): a rank with no readable image still steps alike."""
        return torch.zeros(1, *self.encoder.model.visual.positional_embedding.shape, device=self.device)

    def _encode(self, indices) -> tuple[torch.Tensor, list[int]]:
        indices, kept, chunks = list(indices), [], []
        for start in range(0, len(indices), 256):
            ok, images = self.open_images(indices[start:start + 256])
            if ok:
                pixels = torch.stack([self.encoder.preprocess(image) for image in images])
                chunks.append(clip_hidden_states(self.encoder.model.visual, pixels.to(self.device)))
                kept += ok
        return (torch.cat(chunks) if chunks else self.placeholder()[:0]), kept  # (n, 1 + P, W)

    def visual_tokens(self, indices) -> tuple[torch.Tensor, list[int]]:
        """Frozen-encoder tokens (n, 1 + P, W) of the readable images among `indices`, and their indices."""
        if self.tokens is not None:
            kept = [i for i in indices if i not in self.bad]
            return self.tokens[torch.as_tensor(kept, dtype=torch.long)].to(self.device), kept
        return self._encode(indices)

    def image_features(self, bundle, indices) -> np.ndarray:
        """Normalised evaluator image features (n, E) of readable images, computed once per image and evaluator."""
        cache = self.scorer_features.setdefault(id(bundle), {})
        missing = [i for i in indices if i not in cache]
        if missing:
            kept, images = self.open_images(missing)
            if len(kept) < len(missing):
                lost = [self.records[i]["id"] for i in missing if i not in kept]
                raise BadSampleError(f"samples {lost[:5]}: images unreadable after they were read once")
            for i, feature in zip(kept, encode_images(bundle, images, progress=False)):
                cache[i] = feature
        return np.stack([cache[i] for i in indices])

    def reference_features(self, bundle, indices) -> list[np.ndarray]:
        """Normalised evaluator features (R_i, E) of each record's references, encoded once per record and evaluator
        (every validation and every evaluated model scores against the same references of an image)."""
        cache = self.reference_cache.setdefault(id(bundle), {})
        missing = [i for i in indices if i not in cache]
        if missing:
            cache.update(zip(missing, encode_reference_groups(bundle, [self.records[i]["refs"] for i in missing],
                                                              progress=False)))
        return [cache[i] for i in indices]

    def caption_scores(self, evaluators: dict, indices: list[int], captions: list[str]) -> dict:
        """{label: per-caption score, "Ref" + label: with the references} of `captions` of the images `indices`, per
        evaluator {label: (bundle, w)}: w max(cos, 0) with the metric's prefix (CLIP-S, PAC-S), and its harmonic
        mean with each caption's best similarity to its image's references (RefCLIP-S, RefPAC-S)."""
        scores, features = {}, {}  # features per bundle: in the miniature CLIP-S and PAC-S are one model, two w
        for label, (bundle, w) in evaluators.items():
            if id(bundle) not in features:
                features[id(bundle)] = (self.image_features(bundle, indices),
                                        encode_texts(bundle, captions, prefix=PREFIX, progress=False),
                                        self.reference_features(bundle, indices))
            img, cand, refs = features[id(bundle)]
            scores[label] = score_from_features(img, cand, w)  # w * max(cos, 0)
            scores[f"Ref{label}"] = harmonic_mean(scores[label], ref_similarity(cand, refs))
        return scores


_BANKS: dict = {}


def image_bank(records: list[dict], encoder, device: str, strict: bool = False,
               cache_tokens: bool = False) -> ImageBank:
    """The ImageBank of `records`, built once per process and encoder: the stages of one process (and its seeds)
    share the frozen encoder's tokens instead of encoding the images again in every stage."""
    key = (id(encoder), device, strict, cache_tokens, tuple((str(r["id"]), str(image_path(r))) for r in records))
    if key not in _BANKS or _BANKS[key].encoder is not encoder:  # an id can be reused once its bundle is gone
        _BANKS[key] = ImageBank(records, encoder, device, strict, cache_tokens)
    return _BANKS[key]
