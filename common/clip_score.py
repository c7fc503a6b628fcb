"""CLIP-based caption metrics with the reference implementations' exact constants.

CLIP-S (Hessel et al. 2021, arXiv 2104.08718; jmhessel/clipscore) and PAC-S (Sarto et al. 2023,
arXiv 2303.12112; aimagelab/pacscore) share one formula and differ in weights and w:

    score(x, c)    = w * max(cos(E_img(x), E_txt("A photo depicts " + c)), 0)    # w = 2.5 CLIP-S, 2.0 PAC-S
    r(c, refs)     = max_j cos(E_txt(prefix + c), E_txt(prefix + ref_j))          # not clamped
    Ref-score      = 2 * score * r / (score + r)                                  # harmonic mean

Images: resize the short side to the model's size (bicubic), centre crop, CLIP mean/std: the
open_clip preprocessing of the OpenAI models, identical to the reference scripts'. Each image reaches
it as decoded (RGBA and palette images are converted to RGB after the crop, as in both references)
and is preprocessed as soon as it is opened, so memory does not grow with the source resolution.
Features are L2-normalised in float32 after encoding; PAC-S runs its model in fp32 as the reference does.

Deviation: where score and r are both 0 the references divide 0 by 0 (NaN); here the Ref-score
is 0 there. DiCO's official evaluation drops the prefix and the clamp; this module implements the
reference metrics and says so (PAPERS.md).

Models: `load_clip(name, pretrained)` takes an open_clip architecture with a pretrained tag or a
local checkpoint file. A tag brings its own settings (open_clip.get_pretrained_cfg: QuickGELU for
OpenAI's weights, mean/std, resize), and its weights come from the Hugging Face cache, else from one
download when the Hub answers (HF_HUB_OFFLINE, or no network: an error at once, not minutes of
retries). `load_clip("ViT-B-32", pacs_checkpoint=path)` loads the PAC-S fine-tuned state dict
(OpenAI layout, key "state_dict", every weight) into OpenAI's ViT-B/32 architecture (QuickGELU);
`load_clip("miniature")` is the miniature world's scorer (trained on first use, then cached). What
cannot be loaded is a ScorerLoadError naming the argument to change.

    python -m common.clip_score --manifest test.jsonl --text-field caption --refs-field refs --out scores.json
    python -m common.clip_score correlate --benchmark flickr8k-expert --data flickr8k/ --out expert.json

The command line skips and counts bad samples (--strict: the first is an error naming file, line and
id); expected errors are one line on stderr and exit status 1. Captions longer than the model's context
(77 tokens for OpenAI's CLIP) are cut by the tokenizer and scored on their beginning: both commands count
them in the JSON and say so in one warning line.

`correlate` measures the scorer against human judgments on the benchmarks of the CLIPScore and PAC-S
papers, read as distributed: Flickr8k-Expert and Composite (Kendall tau_c), Flickr8k-CF (tau_b),
Pascal-50S (pairwise accuracy per category) and FOIL (pairwise accuracy, 1 and 4 references); it prints
ours next to the published numbers. docs/clip_score.md: the data, the protocols, the numbers.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
import pickle
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import huggingface_hub
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

try:  # in this repository: the shared manifest reader and error types (common/data.py)
    from common.data import (BadSampleError, ManifestError, SkipCounter, atomic_write_text, image_path,
                             read_manifest)
except ModuleNotFoundError:  # copied alone into another project: the scoring functions work, the command line not
    class BadSampleError(ValueError):
        """An image that cannot be read or decoded."""

    class ManifestError(ValueError):
        """A manifest that cannot be scored."""

    read_manifest = None

    class SkipCounter:
        """Counts skipped samples and keeps the first few for the report (common.data's, for `correlate`)."""

        def __init__(self):
            self.count, self.examples = 0, []

        def add(self, sample: str, reason: str) -> None:
            self.count += 1
            if len(self.examples) < 20:
                self.examples.append((sample, reason))

    def atomic_write_text(path: str | os.PathLike, text: str) -> None:
        """Write a whole file through a rename, so readers never see half of it (common.data's)."""
        tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)

CLIP_S_WEIGHT = 2.5  # jmhessel/clipscore: w = 2.5
PAC_S_WEIGHT = 2.0  # aimagelab/pacscore: w = 2.0
PREFIX = "A photo depicts "  # both references prepend it to candidates and references
MINIATURE = "miniature"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HUB_PROBE_TIMEOUT_S = 5  # one request, no retries, before a download (see tag_weights)


@dataclass
class ClipBundle:
    """A loaded CLIP: the model in eval mode, its image preprocessing, its tokenizer."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: str
    name: str


class ScorerLoadError(ValueError):
    """A scorer that cannot be loaded as asked; `argument` names the load_clip argument to change."""

    def __init__(self, message: str, argument: str):
        super().__init__(message)
        self.argument = argument


def _one_line(err: BaseException, limit: int = 300) -> str:
    return " ".join(str(err).split())[:limit]


def load_pacs_state_dict(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load a PAC-S checkpoint (OpenAI CLIP layout, {"state_dict": ...}, maybe "module."-prefixed).

    open_clip's CLIP uses OpenAI's parameter names, so the state dict loads strictly; a mismatch
    (names or shapes) is an error listing the first differing keys rather than a half-loaded scorer.
    """
    path = Path(path)
    if not path.is_file():
        raise ScorerLoadError(f"pacs_checkpoint={path} not found", "pacs_checkpoint")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    state = {key.removeprefix("module."): value for key, value in state.items()}
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI JIT extras
        state.pop(key, None)
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    reshaped = sorted(key for key in own.keys() & state.keys() if own[key].shape != state[key].shape)
    if missing or unexpected or reshaped:
        raise ScorerLoadError(f"pacs_checkpoint={path} does not match the model (a checkpoint of another architecture? "
                              f"PAC-S's is ViT-B/32): missing {missing[:3]}, unexpected {unexpected[:3]}, "
                              f"other shapes {reshaped[:3]}", "pacs_checkpoint")
    model.load_state_dict(state)
    return model


def _hub_unreachable(url: str) -> str | None:
    """Why one request to the Hugging Face Hub failed, or None when it answered (any status)."""
    try:
        huggingface_hub.get_session().head(url, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as err:  # whatever stops this request (DNS, refused, timeout, proxy) stops the download too
        return _one_line(err, 120)
    return None


def tag_weights(model: str, tag: str) -> str:
    """The local file of an open_clip tag's weights: from the Hugging Face cache, else downloaded.

    open_clip would go to the Hub directly, and huggingface_hub retries a dead connection for ~25 s per
    file name (~50 s per tag) before failing. Here the cache is read first; then HF_HUB_OFFLINE, or a
    Hub that does not answer one request, is an error at once; else the download open_clip would make.
    """
    repo_id, filename = os.path.split(open_clip.get_pretrained_cfg(model, tag)["hf_hub"])
    filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
    names = [*open_clip.pretrained._get_safe_alternatives(filename), filename]  # open_clip's names, in its order
    for name in names:
        try:
            return open_clip.pretrained.hf_hub_download(repo_id=repo_id, filename=name, local_files_only=True)
        except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError: not cached
            continue
    hint = f"or pass pretrained= a local file of the weights ({repo_id} on the Hub)"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ScorerLoadError(f"the {model} weights of tag {tag!r} are not in the Hugging Face cache and "
                              f"HF_HUB_OFFLINE is set: unset it to download them, {hint}", "pretrained")
    reason = _hub_unreachable(huggingface_hub.hf_hub_url(repo_id, names[0]))
    if reason is not None:
        raise ScorerLoadError(f"the {model} weights of tag {tag!r} are not in the Hugging Face cache and the Hugging "
                              f"Face Hub cannot be reached ({reason}): connect, {hint}", "pretrained")
    try:
        return open_clip.pretrained.download_pretrained_from_hf(repo_id, filename=filename)
    except FileNotFoundError as err:
        raise ScorerLoadError(f"could not download the {model} weights of tag {tag!r} ({_one_line(err)}): "
                              f"{hint}", "pretrained") from err


def _register_miniature_architectures() -> None:
    """Register the miniature world's open_clip configs (mini-ViT-8, micro-ViT-16), when asked for one.

    Done on demand, not at import, so this file works copied alone into another project (without common/)."""
    try:
        import common.clip_train  # noqa: F401  (its import adds the configs to open_clip)
    except ModuleNotFoundError:
        pass


def tag_settings(model: str, pretrained: str | None) -> dict:
    """open_clip keyword arguments that build `model` as its pretrained tag was trained: QuickGELU (open_clip only
    warns when the architecture's activation differs from the weights') and the tag's preprocessing (mean/std,
    interpolation, resize mode). None for no tag or a file."""
    cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
    preprocessing = {f"image_{key}": cfg[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in cfg}
    return {"force_quick_gelu": bool(cfg.get("quick_gelu", False)), **preprocessing}


def load_clip(model: str, pretrained: str | None = None, device: str | None = None, precision: str = "fp32",
              pacs_checkpoint: str | None = None) -> ClipBundle:
    """Load an open_clip model for scoring.

    model: an open_clip architecture ("ViT-B-32", "ViT-L-14", "mini-ViT-8"), or "miniature".
    pretrained: an open_clip tag ("openai") or a local checkpoint file; None = random weights
    (only sensible in tests). A tag brings its own settings (open_clip.get_pretrained_cfg): activation,
    mean/std, interpolation, resize mode; the image size is the architecture's. pacs_checkpoint: a PAC-S
    state dict loaded on top (QuickGELU: PAC-S fine-tuned OpenAI's ViT-B/32). Errors: ScorerLoadError.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if precision not in PRECISIONS:
        raise ScorerLoadError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}", "precision")
    if model == MINIATURE:
        from common.clip_train import MINIATURE_MODEL, ensure_miniature_scorer

        model, pretrained = MINIATURE_MODEL, str(ensure_miniature_scorer())
    elif model not in open_clip.list_models():
        _register_miniature_architectures()
    if model not in open_clip.list_models():
        raise ScorerLoadError(f"unknown open_clip architecture {model!r}; see open_clip.list_models()", "model")
    is_file = pretrained is not None and Path(pretrained).exists()
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained is not None and not is_file else {}
    if pretrained is not None and not is_file and not tag_cfg:
        raise ScorerLoadError(f"pretrained={pretrained!r} is neither a file nor an open_clip tag of {model} (its tags: "
                              f"{', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'})", "pretrained")
    weights = tag_weights(model, pretrained) if tag_cfg else pretrained
    # The tag's settings are passed by hand: open_clip applies them only to a tag it downloads itself, and even
    # then only warns where the architecture's activation differs from the one the weights were trained with
    # (OpenAI's tags: QuickGELU on configs that say GELU).
    settings = tag_settings(model, pretrained) if tag_cfg else {"force_quick_gelu": False}
    settings["force_quick_gelu"] |= pacs_checkpoint is not None and model.startswith("ViT-B-32")
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights, device=device,
                                                                   precision="fp32", **settings)
    except (RuntimeError, AssertionError, ValueError, OSError, pickle.UnpicklingError) as err:
        # open_clip's own words for a checkpoint of another architecture: a size mismatch, missing keys, or
        # an AssertionError ("text pos_embed width changed!")
        raise ScorerLoadError(f"cannot load {weights} (pretrained={pretrained!r}) into {model} (a checkpoint of "
                              f"another architecture?): {_one_line(err)}", "pretrained") from err
    if pacs_checkpoint is not None:
        load_pacs_state_dict(net, pacs_checkpoint)
    net = net.to(device=device, dtype=PRECISIONS[precision]).eval()
    return ClipBundle(net, preprocess, open_clip.get_tokenizer(model), device, model)


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _batches(items: Sequence, size: int, desc: str, progress: bool):
    for start in tqdm(range(0, len(items), size), desc=desc, disable=not progress, leave=False):
        yield items[start:start + size]


def decode_image(source: Any) -> Image.Image:
    """An image as decoded, mode kept (RGBA, palette, ...), from a path, bytes or a PIL image.

    The model's preprocess converts to RGB after resizing and cropping, as open_clip's and clipscore's do;
    common.data.open_image converts first, which gives RGBA and palette images other pixels. Same errors as there.
    """
    if isinstance(source, Image.Image):
        return source
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        image.load()
    except FileNotFoundError as err:
        raise BadSampleError(f"image file not found: {source}") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        where = "image bytes" if isinstance(source, (bytes, bytearray)) else source
        raise BadSampleError(f"image cannot be decoded ({err}): {where}") from err
    return image


def image_pixels(bundle: ClipBundle, source: Any) -> torch.Tensor:
    """One image's model input. Preprocessed as soon as it is decoded, so that only the tensor is held (a decoded
    12-megapixel image is ~47 MB; the tensor of a 224-pixel model 0.6 MB)."""
    return bundle.preprocess(decode_image(source))


@torch.no_grad()
def encode_pixels(bundle: ClipBundle, pixels: Sequence[torch.Tensor], batch_size: int = 64) -> np.ndarray:
    """L2-normalised float32 image features (N, E) of preprocessed images."""
    dtype = next(bundle.model.parameters()).dtype
    features = [bundle.model.encode_image(torch.stack(chunk).to(bundle.device, dtype)).float()
                for chunk in _batches(pixels, batch_size, "encode images", progress=False)]
    return F.normalize(torch.cat(features), dim=-1).cpu().numpy()


def encode_images(bundle: ClipBundle, images: Sequence[Any], batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """L2-normalised float32 image features (N, E); images are paths, bytes or PIL images (given as decoded)."""
    return np.concatenate([encode_pixels(bundle, [image_pixels(bundle, source) for source in chunk], batch_size)
                           for chunk in _batches(list(images), batch_size, "encode images", progress)])


@torch.no_grad()
def encode_texts(bundle: ClipBundle, texts: Sequence[str], prefix: str = PREFIX, batch_size: int = 256,
                 progress: bool = True) -> np.ndarray:
    """L2-normalised float32 text features (T, E) of prefix + text (truncated to the context)."""
    features = []
    for chunk in _batches(list(texts), batch_size, "encode texts", progress):
        tokens = bundle.tokenizer([prefix + text for text in chunk]).to(bundle.device)
        features.append(bundle.model.encode_text(tokens).float())
    return F.normalize(torch.cat(features), dim=-1).cpu().numpy()


def encode_reference_groups(bundle: ClipBundle, refs: Sequence[Sequence[str]], progress: bool = True) -> list[np.ndarray]:
    """Features of each sample's references, (R_i, E) per sample, encoded in one flat pass."""
    flat = encode_texts(bundle, [text for group in refs for text in group], progress=progress)
    bounds = np.cumsum([0] + [len(group) for group in refs])
    return [flat[bounds[i]:bounds[i + 1]] for i in range(len(refs))]


def count_truncated(tokenizer: Callable, texts: Sequence[str], prefix: str = PREFIX) -> int | None:
    """How many of `texts`, prefixed as scored, are longer than the tokenizer's context, or None if it cannot say.

    CLIP's tokenizer cuts every text at the model's context (77 tokens for OpenAI's CLIP, the start and end
    tokens included) without a word: the text past the cut never reaches the encoder, so a long caption is
    scored on its beginning alone. Counted with open_clip's BPE tokenizer (`encode`, `context_length`); None
    for a tokenizer without them (a Hugging Face one).
    """
    encode, context = getattr(tokenizer, "encode", None), getattr(tokenizer, "context_length", None)
    if encode is None or context is None:
        return None
    # open_clip's SimpleTokenizer: [start] + encode(text) + [end], cut to `context` with the end token kept last
    return sum(len(encode(prefix + text)) + 2 > context for text in texts)


def truncation_report(tokenizer: Callable, candidates: Sequence[str], references: Sequence[str]) -> dict:
    """The JSON's count of captions cut at the context, candidates and references apart (None: not countable)."""
    return {"context_length": getattr(tokenizer, "context_length", None),
            "candidates": count_truncated(tokenizer, candidates), "of_candidates": len(candidates),
            "references": count_truncated(tokenizer, references), "of_references": len(references)}


def truncation_warning(counts: dict) -> str | None:
    """The one warning line for stderr when any caption was cut, else None."""
    cut = [f"{counts[kind]} of {counts[f'of_{kind}']} {kind}" for kind in ("candidates", "references") if counts[kind]]
    if not cut:
        return None
    return (f"warning: {' and '.join(cut)} exceed the model's {counts['context_length']}-token context and were "
            "truncated: the text past the cut is ignored in their scores (docs/clip_score.md)")


# ---------------------------------------------------------------------------------------------
# The metrics, on features (pure) and end to end
# ---------------------------------------------------------------------------------------------


def score_from_features(img_feats: np.ndarray, cand_feats: np.ndarray, w: float) -> np.ndarray:
    """Per-sample w * max(cos(image, candidate), 0) on normalised features."""
    # CLIP-S(x, c) = w * max(cos(E_img(x), E_txt(c)), 0)
    return w * np.clip(np.sum(img_feats * cand_feats, axis=1), 0, None)


def ref_similarity(cand_feats: np.ndarray, ref_feats: Sequence[np.ndarray]) -> np.ndarray:
    """Per-sample max over the sample's references of cos(candidate, reference), unclamped."""
    # r(c, R) = max_{ref in R} cos(E_txt(c), E_txt(ref))
    return np.array([np.max(refs @ cand) for cand, refs in zip(cand_feats, ref_feats)])


def harmonic_mean(score: np.ndarray, ref_sim: np.ndarray) -> np.ndarray:
    """Ref-score = 2 * score * r / (score + r), with 0 where both are 0."""
    total = score + ref_sim
    safe = np.where(total == 0, 1.0, total)
    return np.where(total == 0, 0.0, 2 * score * ref_sim / safe)


def _result(per_sample: np.ndarray) -> dict:
    return {"per_sample": per_sample.astype(float).tolist(), "mean": float(np.mean(per_sample)) if len(per_sample) else float("nan")}


def _shown(value: Any) -> str:
    """A value as the manifest writes it, cut short, for error messages."""
    return json.dumps(value, default=repr)[:60]


def _check(images: Sequence, candidates: Sequence[str], refs: Sequence[Sequence[str]] | None = None) -> None:
    if len(images) != len(candidates):
        raise ValueError(f"{len(images)} images but {len(candidates)} candidates: one candidate per image")
    for i, text in enumerate(candidates):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"candidate {i} is empty; every image needs a non-empty caption")
    if refs is not None:
        if len(refs) != len(candidates):
            raise ValueError(f"{len(refs)} reference lists for {len(candidates)} candidates")
        for i, group in enumerate(refs):
            # a bare string would be scored character by character
            if isinstance(group, str) or not group or not all(isinstance(t, str) and t.strip() for t in group):
                raise ValueError(f"sample {i}: references must be a non-empty list of non-empty strings, "
                                 f"got {_shown(group)}")


def clip_s(bundle: ClipBundle, images: Sequence, candidates: Sequence[str], w: float = CLIP_S_WEIGHT,
           progress: bool = True) -> dict:
    """CLIP-S per sample and mean: {"per_sample": [...], "mean": m}."""
    _check(images, candidates)
    img = encode_images(bundle, images, progress=progress)
    return _result(score_from_features(img, encode_texts(bundle, candidates, progress=progress), w))


def ref_clip_s(bundle: ClipBundle, images: Sequence, candidates: Sequence[str], refs: Sequence[Sequence[str]],
               w: float = CLIP_S_WEIGHT, progress: bool = True) -> dict:
    """RefCLIP-S per sample and mean, plus the CLIP-S it is built from."""
    _check(images, candidates, refs)
    img = encode_images(bundle, images, progress=progress)
    cand = encode_texts(bundle, candidates, progress=progress)
    ref_feats = encode_reference_groups(bundle, refs, progress=progress)
    score = score_from_features(img, cand, w)
    out = _result(harmonic_mean(score, ref_similarity(cand, ref_feats)))
    out["score"] = _result(score)
    return out


def pac_s(bundle: ClipBundle, images: Sequence, candidates: Sequence[str], progress: bool = True) -> dict:
    """PAC-S: CLIP-S's formula with w = 2.0 on the PAC-S fine-tuned model (`bundle`)."""
    return clip_s(bundle, images, candidates, w=PAC_S_WEIGHT, progress=progress)


def ref_pac_s(bundle: ClipBundle, images: Sequence, candidates: Sequence[str], refs: Sequence[Sequence[str]],
              progress: bool = True) -> dict:
    """RefPAC-S: the harmonic mean of PAC-S and the reference similarity."""
    return ref_clip_s(bundle, images, candidates, refs, w=PAC_S_WEIGHT, progress=progress)


# ---------------------------------------------------------------------------------------------
# Command line: score a manifest
# ---------------------------------------------------------------------------------------------


@dataclass
class Args:
    """Score one caption field of a manifest with CLIP-S or PAC-S (and the Ref- variants). The other command,
    `python -m common.clip_score correlate --help`, measures the scorer against human judgments (Flickr8k-Expert,
    Flickr8k-CF, Composite, Pascal-50S, FOIL)."""

    manifest: str
    """JSONL manifest to score"""
    text_field: str = "caption"
    """the caption field to score"""
    refs_field: str | None = None
    """a list field of references: adds RefCLIP-S / RefPAC-S"""
    model: str = MINIATURE
    """open_clip architecture, or 'miniature' (the miniature world's scorer, trained on first use)"""
    pretrained: str | None = None
    """open_clip tag (e.g. 'openai') or local checkpoint file"""
    pacs_checkpoint: str | None = None
    """PAC-S state dict (clip_ViT-B-32.pth from aimagelab/pacscore) loaded into --model ViT-B-32 (it holds every weight, so --pretrained is not needed)"""
    metric: Literal["clip_s", "pac_s"] = "clip_s"
    """'clip_s' (w = 2.5) or 'pac_s' (w = 2.0; the default when --pacs-checkpoint is given)"""
    device: str | None = None
    """cuda or cpu (default: cuda when available)"""
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """fp32, fp16 or bf16 (the PAC-S reference runs fp32)"""
    strict: bool = False
    """stop at the first unreadable image instead of skipping and counting it"""
    out: str = "scores.json"
    """where to write the JSON (per-sample scores with ids, means, skipped samples)"""


def _field_problem(record: dict, text_field: str, refs_field: str | None) -> str | None:
    """Why a manifest record cannot be scored as its fields stand (a wrong type, an empty text), or None."""
    text = record.get(text_field)
    if not isinstance(text, str) or not text.strip():
        return f"field {text_field!r} must be a non-empty string, got {_shown(text)}"
    if not isinstance(record["image"], str):
        return f"field 'image' must be a path string, got {_shown(record['image'])}"
    if refs_field is None:
        return None
    refs = record.get(refs_field)
    if not isinstance(refs, list) or not refs:  # a bare string would be scored character by character
        return f"field {refs_field!r} must be a non-empty list of reference strings, got {_shown(refs)}"
    for i, ref in enumerate(refs):
        if not isinstance(ref, str) or not ref.strip():
            return f"field {refs_field!r}: reference {i} must be a non-empty string, got {_shown(ref)}"
    return None


def _line_of(manifest: str | os.PathLike, sample: Any) -> int:
    """The line of `sample` in a manifest that read_manifest accepted (looked up only for an error message)."""
    with open(manifest, "rb") as handle:
        return next(line_no for line_no, raw in enumerate(handle, start=1)
                    if raw.strip() and str(json.loads(raw)["id"]) == str(sample))


def score_manifest(args: Args, chunk_size: int = 512) -> dict:
    """Score a manifest chunk by chunk, skipping and counting bad samples.

    A chunk holds its images as model inputs (0.6 MB each at 224 pixels), whatever their source resolution.
    """
    if read_manifest is None:
        raise ManifestError("the command line reads manifests with common/data.py: copy it too (as common/data.py), "
                            "or call load_clip() and clip_s() / ref_clip_s() / pac_s() / ref_pac_s() directly")
    records = read_manifest(args.manifest)
    metric = "pac_s" if args.pacs_checkpoint and args.metric == "clip_s" else args.metric
    if metric not in ("clip_s", "pac_s"):
        raise ValueError(f"--metric must be clip_s or pac_s, got {args.metric!r}")
    bundle = load_clip(args.model, args.pretrained, args.device, args.precision, args.pacs_checkpoint)
    w = PAC_S_WEIGHT if metric == "pac_s" else CLIP_S_WEIGHT
    skipped, kept, scores, ref_sims = SkipCounter(), [], [], []
    for start in tqdm(range(0, len(records), chunk_size), desc=f"score {Path(args.manifest).name}"):
        chunk, pixels = [], []
        for record in records[start:start + chunk_size]:
            try:
                problem = _field_problem(record, args.text_field, args.refs_field)
                if problem is not None:
                    raise BadSampleError(problem)
                pixels.append(image_pixels(bundle, image_path(record)))
            except BadSampleError as err:
                if args.strict:
                    raise BadSampleError(f"{args.manifest}:{_line_of(args.manifest, record['id'])} (id "
                                         f"{str(record['id'])!r}): {err}; fix it, or drop --strict to skip and "
                                         "count such samples") from err
                skipped.add(str(record["id"]), str(err))
                continue
            chunk.append(record)
        if not chunk:
            continue
        cand = encode_texts(bundle, [r[args.text_field] for r in chunk], progress=False)
        scores.append(score_from_features(encode_pixels(bundle, pixels), cand, w))
        if args.refs_field:
            ref_feats = encode_reference_groups(bundle, [r[args.refs_field] for r in chunk], progress=False)
            ref_sims.append(ref_similarity(cand, ref_feats))
        kept += chunk
    if not kept:
        raise ManifestError(f"{args.manifest}: no sample could be scored ({skipped.count} skipped)")
    name = {"clip_s": "CLIP-S", "pac_s": "PAC-S"}[metric]
    per_sample = {name: np.concatenate(scores)}
    if args.refs_field:
        per_sample[f"Ref{name}"] = harmonic_mean(per_sample[name], np.concatenate(ref_sims))
    references = [ref for r in kept for ref in r[args.refs_field]] if args.refs_field else []
    report = {"manifest": str(args.manifest), "text_field": args.text_field, "model": args.model,
              "pretrained": args.pretrained, "pacs_checkpoint": args.pacs_checkpoint,
              "means": {key: float(np.mean(value)) for key, value in per_sample.items()},
              "ids": [str(r["id"]) for r in kept],
              "per_sample": {key: value.astype(float).tolist() for key, value in per_sample.items()},
              "skipped": {"count": skipped.count, "examples": skipped.examples},
              "truncated": truncation_report(bundle.tokenizer, [r[args.text_field] for r in kept], references)}
    atomic_write_text(args.out, json.dumps(report, indent=1))
    return report


# ---------------------------------------------------------------------------------------------
# Against human judgments: rank statistics
# ---------------------------------------------------------------------------------------------


def _tied_pairs(values: np.ndarray) -> int:
    """Sum over the groups of equal values (rows, for a 2-D array) of t (t - 1) / 2: the pairs tied in `values`."""
    _, counts = np.unique(values, axis=0, return_counts=True)
    return int(np.sum(counts * (counts - 1) // 2))


def _discordant_pairs(x: np.ndarray, y: np.ndarray) -> int:
    """Pairs ordered one way by x and strictly the other way by y, in O(n log n) (CF has 48K judgments).

    Sorted by (x, y), a pair i < j is discordant exactly when y_i > y_j (equal x are sorted by y and never
    count): the inversions of y, counted with a Fenwick tree over y's ranks (Knight 1966).
    """
    order = np.lexsort((y, x))
    ranks = (np.unique(y, return_inverse=True)[1].reshape(-1)[order] + 1).tolist()  # 1-based ranks in (x, y) order
    tree, inversions = [0] * (max(ranks, default=0) + 1), 0
    for seen, rank in enumerate(ranks):
        at, at_most = rank, 0  # at_most: elements seen so far with a rank <= this one
        while at > 0:
            at_most, at = at_most + tree[at], at - (at & -at)
        inversions += seen - at_most
        at = rank
        while at < len(tree):
            tree[at], at = tree[at] + 1, at + (at & -at)
    return inversions


def kendall_tau(x: Sequence[float], y: Sequence[float], variant: Literal["b", "c"]) -> float:
    """Kendall's tau-b or tau-c of two rankings with ties, the statistic scipy.stats.kendalltau computes.

        n0 = n (n - 1) / 2 pairs;  n1, n2 = the pairs tied in x, in y;  n3 = the pairs tied in both;
        C, D = the concordant and discordant pairs, tied in neither, so C + D = n0 - n1 - n2 + n3
        tau_b = (C - D) / sqrt((n0 - n1) (n0 - n2))
        tau_c = 2 (C - D) / (n^2 (m - 1) / m),  m = min(distinct values of x, distinct values of y)

    tau_b corrects for the ties of both rankings (Flickr8k-CF's fractions of yes votes); tau_c (Stuart's)
    for a table with few rating levels (Flickr8k-Expert's 1-4, Composite's 1-5), as the CLIPScore paper
    reports them. NaN where a ranking is constant.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"kendall_tau needs two 1-D sequences of one length, got shapes {x.shape} and {y.shape}")
    n = len(x)
    n0, n1, n2 = n * (n - 1) // 2, _tied_pairs(x), _tied_pairs(y)
    n3 = _tied_pairs(np.stack([x, y], axis=1))
    c_minus_d = n0 - n1 - n2 + n3 - 2 * _discordant_pairs(x, y)
    if variant == "b":
        denominator = math.sqrt((n0 - n1) * (n0 - n2))
    elif variant == "c":
        m = min(len(np.unique(x)), len(np.unique(y)))
        denominator = n * n * (m - 1) / m / 2 if m else 0.0
    else:
        raise ValueError(f"variant must be 'b' or 'c', got {variant!r}")
    return c_minus_d / denominator if denominator else float("nan")


def pairwise_accuracy(preferred: Sequence[float], other: Sequence[float]) -> float:
    """How often a metric scores the human-preferred caption of a pair higher; a tie counts one half, what a
    coin flip would earn on average (the papers do not say how they count ties; with real CLIP they are rare)."""
    preferred, other = np.asarray(preferred, dtype=np.float64), np.asarray(other, dtype=np.float64)
    return float(np.mean((preferred > other) + 0.5 * (preferred == other)))


# ---------------------------------------------------------------------------------------------
# Against human judgments: the benchmarks, read as distributed
# ---------------------------------------------------------------------------------------------


class BenchmarkDataError(ValueError):
    """A benchmark file that is missing or not in its distributed format; the message names the file."""


@dataclass
class Judgments:
    """Likert judgments, one row per human rating (Flickr8k-Expert's three experts make three rows)."""

    images: list = field(default_factory=list)
    candidates: list = field(default_factory=list)
    refs: list = field(default_factory=list)
    ratings: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def add(self, image: Path, candidate: str, refs: Sequence[str], rating: float) -> None:
        """One rating; texts with their whitespace collapsed, as clipscore's flickr8k_example scores them."""
        self.images.append(image)
        self.candidates.append(_clean(candidate))
        self.refs.append([_clean(ref) for ref in refs])
        self.ratings.append(float(rating))


@dataclass
class Pairs:
    """Pairwise judgments: per pair the caption people preferred, the other one, references and a category."""

    images: list = field(default_factory=list)
    preferred: list = field(default_factory=list)
    other: list = field(default_factory=list)
    refs: list = field(default_factory=list)
    categories: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def add(self, image: Path, preferred: str, other: str, refs: Sequence[str], category: str) -> None:
        self.images.append(image)
        self.preferred.append(_clean(preferred))
        self.other.append(_clean(other))
        self.refs.append([_clean(ref) for ref in refs])
        self.categories.append(category)


def _clean(text: Any) -> str:
    """Whitespace collapsed (' '.join(text.split())), as clipscore's flickr8k_example does before scoring."""
    return " ".join(str(text).split())


def _find(data: Path, names: Sequence[str], what: str) -> Path:
    """The first of `names` (paths relative to `data`) that exists: the layouts the data sets ship in vary."""
    for name in names:
        if (data / name).exists():
            return data / name
    raise BenchmarkDataError(f"{what}: none of {', '.join(names)} in {data} (docs/clip_score.md lists the files)")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BenchmarkDataError(f"{path}: not valid JSON ({err})") from err


def _tab_rows(path: Path, columns: int):
    """(line number, fields) of a tab-separated annotation file, every row `columns` fields wide."""
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                fields = line.strip("\r\n").split("\t")
                if len(fields) != columns:
                    raise BenchmarkDataError(f"{path}:{line_no}: {len(fields)} tab-separated fields, "
                                             f"expected {columns}")
                yield line_no, [value.strip() for value in fields]


def read_flickr_tokens(path: Path) -> dict[str, str]:
    """Flickr8k.token.txt (or Flickr30k's results_20130124.token): caption id "<image>#<k>" -> caption."""
    return {caption_id: caption for _, (caption_id, caption) in _tab_rows(path, 2)}


def _refs_by_stem(captions: dict[str, str]) -> dict[str, list[str]]:
    """References per image, keyed as clipscore's download.py keys them: the file name up to its first '.'."""
    refs = defaultdict(list)
    for caption_id, caption in captions.items():
        refs[caption_id.split("#")[0].split(".")[0]].append(caption)
    return refs


def _caption(captions: dict[str, str], caption_id: str, path: Path, line_no: int) -> str:
    if caption_id not in captions:
        raise BenchmarkDataError(f"{path}:{line_no}: caption id {caption_id!r} is not in Flickr8k.token.txt")
    return captions[caption_id]


FLICKR8K_TEXT = ("", "Flickr8k_text")  # Flickr8k_text.zip unpacked here or into its own folder
FLICKR8K_IMAGES = ("Flicker8k_Dataset", "Flickr8k_Dataset", "images")  # the zip's folder is spelt "Flicker"


def _flickr8k_text(data: Path, name: str) -> Path:
    return _find(data, [str(Path(folder) / name) for folder in FLICKR8K_TEXT], f"Flickr8k's {name}")


def read_clipscore_json(path: Path, data: Path) -> Judgments:
    """clipscore's flickr8k.json / crowdflower_flickr8k.json (written by its flickr8k_example/download.py; the
    folder aimagelab/pacscore links holds them): {image: {"image_path", "ground_truth", "human_judgement":
    [{"caption", "rating"}, ...]}}, one judgment per rating, NaN ratings skipped as there."""
    images, out = _find(data, FLICKR8K_IMAGES, "Flickr8k images"), Judgments()
    for entry in _load_json(path).values():
        for judgment in entry["human_judgement"]:
            if not math.isnan(judgment["rating"]):
                out.add(images / Path(entry["image_path"]).name, judgment["caption"], entry["ground_truth"],
                        judgment["rating"])
    out.notes["source"] = path.name
    return out


def read_flickr8k_expert(data: Path) -> Judgments:
    """Flickr8k-Expert as clipscore's flickr8k_example prepares it: each of the three experts' ratings (1-4) is a
    row (5664 pairs, 16992 rows: "method A" of the CLIPScore paper, App. A); a candidate that is one of its image's
    own references is dropped (158 pairs, the SPICE paper's convention); the references are the image's captions."""
    if not any((data / folder / "ExpertAnnotations.txt").exists() for folder in FLICKR8K_TEXT):
        if (data / "flickr8k.json").exists():
            return read_clipscore_json(data / "flickr8k.json", data)
    captions = read_flickr_tokens(_flickr8k_text(data, "Flickr8k.token.txt"))
    refs, path = _refs_by_stem(captions), _flickr8k_text(data, "ExpertAnnotations.txt")
    images, out, dropped = _find(data, FLICKR8K_IMAGES, "Flickr8k images"), Judgments(), 0
    for line_no, (image, caption_id, *experts) in _tab_rows(path, 5):
        caption, stem = _caption(captions, caption_id, path, line_no), image.split(".")[0]
        if caption in refs[stem]:
            dropped += 1
            continue
        for rating in experts:
            out.add(images / image, caption, refs[stem], float(rating))
    out.notes.update(source=path.name, candidates_in_own_references_dropped=dropped)
    return out


def read_flickr8k_cf(data: Path) -> Judgments:
    """Flickr8k-CF as clipscore's flickr8k_example prepares it: the rating is the fraction of CrowdFlower "yes"
    votes; every candidate that is one of its image's references is removed from that image's references."""
    if not any((data / folder / "CrowdFlowerAnnotations.txt").exists() for folder in FLICKR8K_TEXT):
        if (data / "crowdflower_flickr8k.json").exists():
            return read_clipscore_json(data / "crowdflower_flickr8k.json", data)
    captions = read_flickr_tokens(_flickr8k_text(data, "Flickr8k.token.txt"))
    refs, path = _refs_by_stem(captions), _flickr8k_text(data, "CrowdFlowerAnnotations.txt")
    rows, rated_refs = [], defaultdict(set)
    for line_no, (image, caption_id, yes, _, _) in _tab_rows(path, 5):
        caption, stem = _caption(captions, caption_id, path, line_no), image.split(".")[0]
        if caption in refs[stem]:
            rated_refs[stem].add(caption)
        rows.append((image, stem, caption, float(yes)))
    images, out = _find(data, FLICKR8K_IMAGES, "Flickr8k images"), Judgments()
    for image, stem, caption, rating in rows:
        kept = [ref for ref in refs[stem] if ref not in rated_refs[stem]]
        if not kept:
            raise BenchmarkDataError(f"{path}: image {image} has no reference left once its rated captions are removed")
        if not math.isnan(rating):
            out.add(images / image, caption, kept, rating)
    out.notes.update(source=path.name, references_removed=sum(len(v) for v in rated_refs.values()))
    return out


def _words(text: str) -> str:
    """Lower-cased words without punctuation: how two copies of one caption (AMT's, COCO's) are compared."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _without_rated_reference(refs: Sequence[str], candidates: Sequence[str]) -> tuple[list[str], bool]:
    """The references less the one that is also a rated candidate, and whether it matched word for word.

    In Composite one rated caption per image was drawn from the image's references, and FOIL's true caption is
    one of its image's COCO captions: the CLIPScore paper removes it (Sec. 4.1 and App. A: the harder setting;
    4.4). Nothing marks which it is: a reference equal to a candidate word for word, else the most similar one
    (difflib's ratio), is dropped.
    """
    refs = list(refs)
    if not refs:
        return [], False
    wanted = {_words(candidate) for candidate in candidates}
    for i, ref in enumerate(refs):
        if _words(ref) in wanted:
            return refs[:i] + refs[i + 1:], True
    ratio = [max(difflib.SequenceMatcher(None, _words(ref), c).ratio() for c in wanted) for ref in refs]
    best = int(np.argmax(ratio))
    return refs[:best] + refs[best + 1:], False


def _url_name(url: str) -> str:
    return url.strip().split("?")[0].rstrip("/").split("/")[-1]


def _composite_flickr8k(data: Path) -> Callable[[str], tuple[Path, list[str]] | None]:
    """An 8k_correctness.csv image URL (a Flickr photo, <photo id>_<secret>.jpg) -> its Flickr8k file and captions."""
    captions = read_flickr_tokens(_flickr8k_text(data, "Flickr8k.token.txt"))
    refs = _refs_by_stem(captions)
    images = _find(data, ("flickr8k_images",) + FLICKR8K_IMAGES, "Composite's Flickr8k images")
    by_photo = {name.split("_")[0]: name for name in (cid.split("#")[0] for cid in captions) if name.endswith(".jpg")}

    def lookup(url: str) -> tuple[Path, list[str]] | None:
        name = by_photo.get(_url_name(url).split("_")[0])
        return None if name is None else (images / name, refs[name.split(".")[0]])

    return lookup


def _composite_flickr30k(data: Path) -> Callable[[str], tuple[Path, list[str]] | None]:
    """A 30k_correctness.csv image URL (<image id>.jpg) -> its Flickr30k file and captions (results_20130124.token)."""
    tokens = _find(data, ("results_20130124.token", "flickr30k/results_20130124.token"), "Flickr30k's captions")
    refs = _refs_by_stem(read_flickr_tokens(tokens))
    images = _find(data, ("flickr30k_images", "flickr30k-images"), "Composite's Flickr30k images")

    def lookup(url: str) -> tuple[Path, list[str]] | None:
        stem = _url_name(url).split(".")[0]
        return (images / f"{stem}.jpg", refs[stem]) if stem in refs else None

    return lookup


def _coco_refs(data: Path) -> dict[int, list[str]]:
    """COCO's captions_val2014.json: image id -> its captions (5, sometimes 6 or 7)."""
    path = _find(data, ("captions_val2014.json", "annotations/captions_val2014.json"), "COCO's captions")
    refs = defaultdict(list)
    for annotation in _load_json(path)["annotations"]:
        refs[int(annotation["image_id"])].append(annotation["caption"])
    return refs


def _composite_coco(data: Path) -> Callable[[str], tuple[Path, list[str]] | None]:
    """A coco_correctness.csv image URL (COCO_val2014_<id>.jpg) -> its COCO file and captions."""
    refs, images = _coco_refs(data), _find(data, ("mscoco_images", "val2014"), "Composite's COCO images")

    def lookup(url: str) -> tuple[Path, list[str]] | None:
        numbers = re.findall(r"\d+", _url_name(url).split(".")[0])
        image_id = int(numbers[-1]) if numbers else None
        return (images / f"COCO_val2014_{image_id:012d}.jpg", refs[image_id]) if image_id in refs else None

    return lookup


# subset: (AMT file, captions per row, its reference lookup). The files' rows hold 3 (8k) or 4 captions, but the
# first three are the rated set every study uses: 3 x (997 + 991 + 2007) images = 11985, the CLIPScore paper's 12K.
COMPOSITE_SUBSETS = {"flickr8k": ("8k_correctness.csv", 3, _composite_flickr8k),
                     "flickr30k": ("30k_correctness.csv", 4, _composite_flickr30k),
                     "coco": ("coco_correctness.csv", 4, _composite_coco)}
COMPOSITE_RATED = 3


def _composite_rows(path: Path, n_captions: int) -> tuple[list[tuple[str, list[str], list[float]]], int]:
    """(image URL, captions, ratings) per row of an AMT csv, and how many rows were skipped.

    The files are ';'-separated with one header row; each row holds the HIT's fields, the image URL (column 27)
    and then its captions and their ratings (1-5). The URL is found as the first cell that is one; a row without
    one, or without a number where a rating should be (the files end with such rows), is skipped and counted.
    """
    rows, skipped = [], 0
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.reader(handle, delimiter=";")
        next(reader, None)
        for row in reader:
            at = next((i for i, cell in enumerate(row) if re.match(r"\s*https?://", cell, re.IGNORECASE)), None)
            cells = row[at + 1:at + 1 + 2 * n_captions] if at is not None else []
            try:
                ratings = [float(cell) for cell in cells[n_captions:]]
            except ValueError:
                ratings = []
            if len(ratings) != n_captions:
                skipped += 1
                continue
            rows.append((row[at], cells[:n_captions], ratings))
    return rows, skipped


def read_composite(data: Path) -> Judgments:
    """Composite (Aditya et al. 2015) as the CLIPScore paper evaluates it: the three rated captions of each image,
    references from the source data sets less the rated one (Sec. 4.1, App. A)."""
    out = Judgments()
    for subset, (name, n_captions, references) in COMPOSITE_SUBSETS.items():
        path = _find(data, (name, f"AMT_eval/{name}"), f"Composite's {subset} judgments")
        rows, skipped = _composite_rows(path, n_captions)
        lookup, unknown, inexact = references(data), 0, 0
        for url, captions, ratings in rows:
            found = lookup(url)
            if found is None:
                unknown += 1
                continue
            refs, exact = _without_rated_reference(found[1], captions[:COMPOSITE_RATED])
            inexact += not exact
            for caption, rating in zip(captions[:COMPOSITE_RATED], ratings[:COMPOSITE_RATED]):
                out.add(found[0], caption, refs, rating)
        out.notes[subset] = {"rows": len(rows), "rows_skipped": skipped, "images_without_references": unknown,
                             "rated_reference_removed_by_similarity": inexact}
    return out


PASCAL_CATEGORIES = {1: "HC", 2: "HI", 3: "HM", 4: "MM"}
PASCAL_FOLDERS = ("", "pyCIDErConsensus")
PASCAL_IMAGES = ("images", "JPEGImages", "VOCdevkit/VOC2010/JPEGImages", "VOC2010/JPEGImages")


def _loadmat(path: Path) -> dict:
    """A MATLAB file through scipy (imported here: only Pascal-50S needs it)."""
    try:
        from scipy.io import loadmat
    except ModuleNotFoundError as err:
        raise BenchmarkDataError(f"reading {path.name} needs scipy (pip install 'scipy>=1.11')") from err
    try:
        return loadmat(path)
    except (ValueError, OSError, NotImplementedError) as err:
        raise BenchmarkDataError(f"{path}: not a MATLAB file scipy can read ({_one_line(err)})") from err


def _mat_value(value: Any) -> Any:
    """A MATLAB char array or cell as loadmat gives it (arrays of one element, nested) down to its str or number."""
    while isinstance(value, np.ndarray):
        if value.size == 0:
            return ""
        value = value.reshape(-1)[0]
    return str(value).strip() if isinstance(value, str) else value


def _mat_fields(entry: Any) -> list:
    """The fields of one element of a struct array (or the cells of one cell-array row), unwrapped."""
    cells = list(entry) if isinstance(entry, np.void) else np.asarray(entry, dtype=object).reshape(-1)
    return [_mat_value(cell) for cell in cells]


def _mat_array(mat: dict, key: str, path: Path) -> np.ndarray:
    if key not in mat:
        names = ", ".join(name for name in mat if not name.startswith("__"))
        raise BenchmarkDataError(f"{path}: no variable {key!r} (its variables: {names})")
    return np.asarray(mat[key]).reshape(-1)


def _pascal_votes(triplets: np.ndarray) -> tuple[dict[str, int], list[str]]:
    """One pair's consensus judgments: votes per winning caption, and the references the raters were shown.

    consensus_pascal.mat's triplets are (reference, caption B, caption C, winner), winner 1 meaning B; as in the
    code jmhessel/clipscore's issue 4 shares, each pair has 48 consecutive triplets."""
    votes, refs = defaultdict(int), []
    for triplet in triplets:
        ref, b, c, winner = _mat_fields(triplet)[:4]
        votes[_clean(b if int(winner) == 1 else c)] += 1
        refs.append(ref)
    return votes, refs


def read_pascal50s(data: Path, seed: int = 0) -> Pairs:
    """Pascal-50S (Vedantam et al. 2015) as the CLIPScore paper evaluates it (Sec. 4.2): the 4000 pairs of
    pair_pascal.mat, the caption preferred by most of the 48 judgments of consensus_pascal.mat counting as right,
    ties broken at random (`seed`); each pair's 48 references are kept for the draws of 5 made when scoring."""
    pair_path = _find(data, [str(Path(f) / "pair_pascal.mat") for f in PASCAL_FOLDERS], "Pascal-50S's pairs")
    vote_path = _find(data, [str(Path(f) / "consensus_pascal.mat") for f in PASCAL_FOLDERS], "Pascal-50S's judgments")
    pairs = _loadmat(pair_path)
    entries, categories = _mat_array(pairs, "new_input", pair_path), _mat_array(pairs, "category", pair_path)
    triplets = _mat_array(_loadmat(vote_path), "triplets", vote_path)
    if not len(entries) or len(triplets) % len(entries) or len(categories) != len(entries):
        raise BenchmarkDataError(f"{vote_path}: {len(triplets)} judgments for {len(entries)} pairs and "
                                 f"{len(categories)} categories in {pair_path.name}: files of different releases?")
    per_pair, images = len(triplets) // len(entries), _find(data, PASCAL_IMAGES, "Pascal-50S's images (VOC2010)")
    rng, out, unmatched, ties = np.random.default_rng(seed), Pairs(), 0, 0
    for i, (entry, category) in enumerate(zip(entries, categories)):
        image, a, b = _mat_fields(entry)[:3]
        votes, refs = _pascal_votes(triplets[i * per_pair:(i + 1) * per_pair])
        a_votes, b_votes = votes.get(_clean(a), 0), votes.get(_clean(b), 0)
        unmatched += a_votes + b_votes != per_pair
        ties += a_votes == b_votes
        a_wins = a_votes > b_votes or (a_votes == b_votes and rng.random() < 0.5)
        category = int(_mat_value(category))
        if category not in PASCAL_CATEGORIES:
            raise BenchmarkDataError(f"{pair_path}: pair {i} has category {category}, not one of 1-4")
        out.add(images / image, a if a_wins else b, b if a_wins else a, refs, PASCAL_CATEGORIES[category])
    out.notes.update(judgments_per_pair=per_pair, vote_ties_broken_at_random=ties,
                     pairs_with_votes_for_other_captions=unmatched)
    return out


def _foil_groups(path: Path) -> tuple[dict, dict[int, str]]:
    """FOIL's annotations grouped by id, the id a true caption shares with its foils: {id: {"image_id", "true":
    [captions], "foil": [captions]}}, and the images' file names."""
    foil = _load_json(path)
    groups = defaultdict(lambda: {"true": [], "foil": []})
    for annotation in foil["annotations"]:
        group = groups[annotation["id"]]
        group["image_id"] = int(annotation["image_id"])
        group["foil" if annotation["foil"] else "true"].append(annotation["caption"])
    return groups, {int(image["id"]): image["file_name"] for image in foil.get("images", [])}


FOIL_MAX_REFS = 4  # the CLIPScore paper's 4-ref setting (COCO images with 6 or 7 captions keep 4)


def read_foil(data: Path, seed: int = 0) -> Pairs:
    """FOIL-COCO (Shekhar et al. 2017) as the CLIPScore paper evaluates it (Sec. 4.4): per test image one (true,
    foil) pair, drawn at random (`seed`); references: the image's COCO captions less the true one, up to four (the
    first one alone for 1-ref)."""
    groups, file_names = _foil_groups(_find(data, ("foilv1.0_test_2017.json",), "FOIL's test annotations"))
    refs, images = _coco_refs(data), _find(data, ("val2014", "mscoco_images", "images"), "COCO val2014 images")
    by_image = defaultdict(list)
    for group in groups.values():
        if len(group["true"]) == 1 and group["foil"]:
            by_image[group["image_id"]].append(group)
    rng, out, inexact, no_refs = np.random.default_rng(seed), Pairs(), 0, 0
    for image_id in sorted(by_image):
        group = by_image[image_id][rng.integers(len(by_image[image_id]))]
        true, foil = group["true"][0], group["foil"][rng.integers(len(group["foil"]))]
        kept, exact = _without_rated_reference(refs.get(image_id, []), [true])
        if not kept:
            no_refs += 1
            continue
        inexact += not exact
        name = file_names.get(image_id, f"COCO_val2014_{image_id:012d}.jpg")
        out.add(images / name, true, foil, kept[:FOIL_MAX_REFS], "FOIL")
    out.notes.update(annotation_groups=len(groups), images_without_a_pair=len({g["image_id"] for g in groups.values()})
                     - len(by_image), images_without_references=no_refs, true_caption_removed_by_similarity=inexact)
    return out


# ---------------------------------------------------------------------------------------------
# Against human judgments: scoring, the published numbers, the command
# ---------------------------------------------------------------------------------------------


class FeatureScorer:
    """Features of each distinct image and text, encoded once: the benchmarks repeat both (Flickr8k-Expert has
    16992 judgments of 5664 captions on 1000 images; Pascal-50S scores each caption against 5 reference draws).

    Unreadable images are skipped and counted (strict: an error); texts cut at the context are counted.
    """

    def __init__(self, bundle: ClipBundle, w: float, names: tuple[str, str], strict: bool = False,
                 batch_size: int = 64, progress: bool = True):
        self.bundle, self.w, self.names, self.strict = bundle, w, names, strict
        self.batch_size, self.progress = batch_size, progress
        self.image_features, self.text_features, self.bad = {}, {}, set()
        self.skipped = SkipCounter()
        self.truncated = truncation_report(bundle.tokenizer, [], [])
        self.counted = {"candidates": set(), "references": set()}  # the distinct texts counted, per kind

    def add_images(self, paths: Sequence) -> set[str]:
        """Encode the images not seen yet; the readable ones among `paths` (as str)."""
        new = [p for p in dict.fromkeys(map(str, paths)) if p not in self.image_features and p not in self.bad]
        for chunk in _batches(new, self.batch_size, "encode images", self.progress):
            pixels, names = [], []
            for path in chunk:
                try:
                    pixels.append(image_pixels(self.bundle, path))
                    names.append(path)
                except BadSampleError as err:
                    if self.strict:
                        raise BadSampleError(f"{err}; fix it, or drop --strict to skip and count such images") from err
                    self.bad.add(path)
                    self.skipped.add(path, str(err))
            if pixels:
                self.image_features.update(zip(names, encode_pixels(self.bundle, pixels, self.batch_size)))
        return {str(p) for p in paths if str(p) in self.image_features}

    def add_texts(self, texts: Sequence[str], kind: Literal["candidates", "references"]) -> None:
        """Encode the texts not seen yet, and count those cut at the context (each distinct text once per kind)."""
        new = [text for text in dict.fromkeys(texts) if text not in self.counted[kind]]
        self.counted[kind].update(new)
        cut = count_truncated(self.bundle.tokenizer, new)
        self.truncated[kind] = None if cut is None or self.truncated[kind] is None else self.truncated[kind] + cut
        self.truncated[f"of_{kind}"] += len(new)
        unseen = [text for text in new if text not in self.text_features]
        if unseen:
            self.text_features.update(zip(unseen, encode_texts(self.bundle, unseen, progress=self.progress)))

    def images(self, paths: Sequence) -> np.ndarray:
        return np.stack([self.image_features[str(p)] for p in paths])

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        missing = [text for text in texts if text not in self.text_features]
        if missing:
            self.text_features.update(zip(missing, encode_texts(self.bundle, missing, progress=False)))
        return np.stack([self.text_features[text] for text in texts])


def score_triples(scorer: FeatureScorer, images: Sequence, candidates: Sequence[str],
                  refs: Sequence[Sequence[str]] | None = None) -> dict[str, np.ndarray]:
    """{"score": CLIP-S (or PAC-S) per (image, candidate), "ref": the Ref- score when references are given}.

    The one place `correlate` scores, so that a test can put known numbers in its stead.
    """
    cand = scorer.texts(candidates)
    out = {"score": score_from_features(scorer.images(images), cand, scorer.w)}
    if refs is not None:
        out["ref"] = harmonic_mean(out["score"], ref_similarity(cand, [scorer.texts(group) for group in refs]))
    return out


def _published(value: float, source: str, confirmed: bool = True) -> dict:
    return {"value": value, "source": source, "confirmed": confirmed}


CLIPSCORE_PAPER = "CLIPScore, Hessel et al. 2021 (arXiv 2104.08718v3)"
PACS_PAPER = "PAC-S, Sarto et al. 2023 (arXiv 2303.12112)"
PACS_UNREAD = f"{PACS_PAPER}: not read in the paper here, unconfirmed"


# The papers' numbers, all with OpenAI's ViT-B/32 (PAC-S: its fine-tuned ViT-B/32), x 100. "confirmed": read in the
# paper (CLIPScore's tables) or in the official repository's expected output (aimagelab/pacscore's README).
PUBLISHED = {
    "flickr8k-expert": {
        "CLIP-S": {"tau_c": _published(51.2, f"{CLIPSCORE_PAPER}, Table 1")},
        "RefCLIP-S": {"tau_c": _published(53.0, f"{CLIPSCORE_PAPER}, Table 1")},
        "PAC-S": {"tau_c": _published(54.3, f"{PACS_PAPER}, Table 1; aimagelab/pacscore README: 54.292")},
        "RefPAC-S": {"tau_c": _published(55.9, PACS_UNREAD, False)}},
    "flickr8k-cf": {
        "CLIP-S": {"tau_b": _published(34.4, f"{CLIPSCORE_PAPER}, Table 2")},
        "RefCLIP-S": {"tau_b": _published(36.4, f"{CLIPSCORE_PAPER}, Table 2")},
        "PAC-S": {"tau_b": _published(36.0, f"{PACS_PAPER}, Table 1; aimagelab/pacscore README: 36.037")},
        "RefPAC-S": {"tau_b": _published(37.6, PACS_UNREAD, False)}},
    "composite": {
        "CLIP-S": {"tau_c": _published(53.8, f"{CLIPSCORE_PAPER}, Table 3")},
        "RefCLIP-S": {"tau_c": _published(55.4, f"{CLIPSCORE_PAPER}, Table 3")},
        "PAC-S": {"tau_c": _published(55.7, PACS_UNREAD, False)},
        "RefPAC-S": {"tau_c": _published(57.3, PACS_UNREAD, False)}},
    "pascal50s": {
        "CLIP-S": {k: _published(v, f"{CLIPSCORE_PAPER}, Table 4 (48 judgments per pair)")
                   for k, v in zip(("HC", "HI", "HM", "MM", "mean"), (56.5, 99.3, 96.4, 70.4, 80.7))},
        "RefCLIP-S": {k: _published(v, f"{CLIPSCORE_PAPER}, Table 4 (48 judgments per pair, 5 draws of 5 refs)")
                      for k, v in zip(("HC", "HI", "HM", "MM", "mean"), (64.5, 99.6, 95.4, 72.8, 83.1))},
        "PAC-S": {k: _published(v, PACS_UNREAD, False)
                  for k, v in zip(("HC", "HI", "HM", "MM", "mean"), (60.6, 99.3, 96.9, 72.9, 82.4))},
        "RefPAC-S": {k: _published(v, PACS_UNREAD, False)
                     for k, v in zip(("HC", "HI", "HM", "MM", "mean"), (67.7, 99.6, 96.0, 75.6, 84.7))}},
    "foil": {
        "CLIP-S": {k: _published(87.2, f"{CLIPSCORE_PAPER}, Table 5") for k in ("1-ref", "4-ref")},
        "RefCLIP-S": {"1-ref": _published(91.0, f"{CLIPSCORE_PAPER}, Table 5"),
                      "4-ref": _published(92.6, f"{CLIPSCORE_PAPER}, Table 5")},
        # PAC-S evaluates FOIL on the 8K images outside its fine-tuning data, not on all 32K (pacscore issue 4)
        "PAC-S": {k: _published(89.9, f"{PACS_UNREAD}; its 8K-image subset", False) for k in ("1-ref", "4-ref")},
        "RefPAC-S": {"1-ref": _published(93.7, f"{PACS_UNREAD}; its 8K-image subset", False),
                     "4-ref": _published(94.9, f"{PACS_UNREAD}; its 8K-image subset", False)}},
}


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: its name in print, its reader, and the statistics the papers report for it."""

    title: str
    read: Callable
    statistics: tuple[str, ...]


BENCHMARKS = {
    "flickr8k-expert": Benchmark("Flickr8k-Expert", read_flickr8k_expert, ("tau_c",)),
    "flickr8k-cf": Benchmark("Flickr8k-CF", read_flickr8k_cf, ("tau_b",)),
    "composite": Benchmark("Composite", read_composite, ("tau_c",)),
    "pascal50s": Benchmark("Pascal-50S", read_pascal50s, ("HC", "HI", "HM", "MM", "mean")),
    "foil": Benchmark("FOIL", read_foil, ("1-ref", "4-ref")),
}


def _keep(items: Judgments | Pairs, usable: set[str]) -> Judgments | Pairs:
    """The rows whose image could be read."""
    keep = [str(image) in usable for image in items.images]
    columns = {name: [v for v, k in zip(getattr(items, name), keep) if k]
               for name in items.__dataclass_fields__ if name != "notes"}
    return type(items)(**columns, notes=items.notes)


def evaluate_judgments(scorer: FeatureScorer, items: Judgments) -> tuple[dict, int]:
    """Kendall tau_b and tau_c (x 100) of each score against the ratings, and the number of ratings used."""
    items = _keep(items, scorer.add_images(items.images))
    scorer.add_texts(items.candidates, "candidates")
    scorer.add_texts([ref for group in items.refs for ref in group], "references")
    if not items.ratings:
        return {}, 0
    scores = score_triples(scorer, items.images, items.candidates, items.refs)
    return {name: {f"tau_{v}": 100 * kendall_tau(scores[key], items.ratings, v) for v in "bc"}
            for name, key in zip(scorer.names, ("score", "ref"))}, len(items.ratings)


def _by_category(preferred: np.ndarray, other: np.ndarray, categories: Sequence[str]) -> dict[str, float]:
    """Pairwise accuracy (x 100) per category and their mean (the papers' "Mean": 1000 pairs each)."""
    categories = np.asarray(categories)
    out = {name: 100 * pairwise_accuracy(preferred[categories == name], other[categories == name])
           for name in PASCAL_CATEGORIES.values() if np.any(categories == name)}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def evaluate_pascal(scorer: FeatureScorer, items: Pairs, draws: int, n_refs: int, seed: int) -> tuple[dict, int]:
    """Accuracy per category; the Ref- score averaged over `draws` random draws of `n_refs` references per pair."""
    items = _keep(items, scorer.add_images(items.images))
    scorer.add_texts(items.preferred + items.other, "candidates")
    scorer.add_texts([ref for group in items.refs for ref in group], "references")
    if not items.preferred:
        return {}, 0
    score = [score_triples(scorer, items.images, texts)["score"] for texts in (items.preferred, items.other)]
    rng, with_refs = np.random.default_rng([seed, 1]), []
    for _ in range(draws):
        refs = [[group[i] for i in rng.choice(len(group), min(n_refs, len(group)), replace=False)]
                for group in items.refs]
        ref = [score_triples(scorer, items.images, texts, refs)["ref"] for texts in (items.preferred, items.other)]
        with_refs.append(_by_category(*ref, items.categories))
    results = {scorer.names[0]: _by_category(*score, items.categories)}
    results[scorer.names[1]] = {key: float(np.mean([draw[key] for draw in with_refs])) for key in with_refs[0]}
    return results, len(items.preferred)


def evaluate_foil(scorer: FeatureScorer, items: Pairs) -> tuple[dict, int]:
    """Accuracy of the true caption over the foil, with one and with (up to) four references."""
    items = _keep(items, scorer.add_images(items.images))
    scorer.add_texts(items.preferred + items.other, "candidates")
    scorer.add_texts([ref for group in items.refs for ref in group], "references")
    if not items.preferred:
        return {}, 0
    results = {name: {} for name in scorer.names}
    for setting, refs in (("1-ref", [group[:1] for group in items.refs]), ("4-ref", items.refs)):
        true, foil = (score_triples(scorer, items.images, texts, refs) for texts in (items.preferred, items.other))
        results[scorer.names[0]][setting] = 100 * pairwise_accuracy(true["score"], foil["score"])
        results[scorer.names[1]][setting] = 100 * pairwise_accuracy(true["ref"], foil["ref"])
    return results, len(items.preferred)


@dataclass
class CorrelateArgs:
    """Measure the scorer against human judgments on a benchmark read as distributed, and print ours next to the
    published numbers (CLIPScore and PAC-S papers, ViT-B/32). docs/clip_score.md: where to get each benchmark, the
    files and folders --data must hold, the protocol, what to expect."""

    benchmark: Literal["flickr8k-expert", "flickr8k-cf", "composite", "pascal50s", "foil"]
    """flickr8k-expert (Kendall tau_c), flickr8k-cf (tau_b), composite (tau_c), pascal50s (pairwise accuracy per category HC/HI/HM/MM), foil (pairwise accuracy, 1 and 4 references)"""
    data: str
    """the benchmark's folder, holding its files as distributed (docs/clip_score.md lists them)"""
    model: str = "ViT-B-32"
    """open_clip architecture (the papers: ViT-B-32)"""
    pretrained: str | None = "openai"
    """open_clip tag or local checkpoint file; not loaded with --pacs-checkpoint, which holds every weight"""
    pacs_checkpoint: str | None = None
    """PAC-S state dict (clip_ViT-B-32.pth from aimagelab/pacscore) loaded into --model ViT-B-32: scores PAC-S and RefPAC-S"""
    metric: Literal["clip_s", "pac_s"] = "clip_s"
    """'clip_s' (w = 2.5) or 'pac_s' (w = 2.0; the default when --pacs-checkpoint is given)"""
    device: str | None = None
    """cuda or cpu (default: cuda when available)"""
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """fp32, fp16 or bf16 (clipscore's numbers were computed in fp16 on a GPU, PAC-S's in fp32)"""
    seed: int = 0
    """seeds the random choices: Pascal-50S's broken vote ties and reference draws, FOIL's pair per image"""
    pascal_draws: int = 5
    """Pascal-50S: the Ref- score is averaged over this many random draws of references (the papers: 5)"""
    pascal_refs: int = 5
    """Pascal-50S: references per draw, out of each pair's 48 (the papers: 5)"""
    strict: bool = False
    """stop at the first unreadable image instead of skipping and counting it"""
    out: str = "correlation.json"
    """where to write the JSON (ours, the published numbers, counts, skipped images, truncated captions)"""


def correlate(args: CorrelateArgs) -> dict:
    """Read the benchmark (before loading a model, so a data error costs no load), score it, write the JSON."""
    data, benchmark = Path(args.data), BENCHMARKS[args.benchmark]
    if not data.is_dir():
        raise BenchmarkDataError(f"--data {data} is not a folder")
    if args.pascal_draws < 1 or args.pascal_refs < 1:
        raise BenchmarkDataError("--pascal-draws and --pascal-refs must be at least 1")
    items = benchmark.read(data, args.seed) if args.benchmark in ("pascal50s", "foil") else benchmark.read(data)
    metric = "pac_s" if args.pacs_checkpoint and args.metric == "clip_s" else args.metric
    bundle = load_clip(args.model, None if args.pacs_checkpoint else args.pretrained, args.device, args.precision,
                       args.pacs_checkpoint)
    names = ("PAC-S", "RefPAC-S") if metric == "pac_s" else ("CLIP-S", "RefCLIP-S")
    scorer = FeatureScorer(bundle, PAC_S_WEIGHT if metric == "pac_s" else CLIP_S_WEIGHT, names, args.strict)
    if args.benchmark == "pascal50s":
        results, n = evaluate_pascal(scorer, items, args.pascal_draws, args.pascal_refs, args.seed)
    elif args.benchmark == "foil":
        results, n = evaluate_foil(scorer, items)
    else:
        results, n = evaluate_judgments(scorer, items)
    if not n:
        raise BenchmarkDataError(f"{data}: nothing could be scored ({scorer.skipped.count} unreadable images skipped)")
    report = {"benchmark": args.benchmark, "data": str(data), "model": args.model,
              "pretrained": None if args.pacs_checkpoint else args.pretrained, "pacs_checkpoint": args.pacs_checkpoint,
              "metrics": list(names), "statistics": list(benchmark.statistics), "n": n, "results": results,
              "published": {name: PUBLISHED[args.benchmark].get(name, {}) for name in names},
              "notes": items.notes, "settings": {"seed": args.seed, "precision": args.precision},
              "skipped": {"count": scorer.skipped.count, "examples": scorer.skipped.examples},
              "truncated": scorer.truncated}
    if args.benchmark == "pascal50s":
        report["settings"].update(pascal_draws=args.pascal_draws, pascal_refs=args.pascal_refs)
    atomic_write_text(args.out, json.dumps(report, indent=1))
    return report


def correlation_table(report: dict) -> str:
    """Ours next to the published numbers, one line per metric and statistic ("*": not confirmed)."""
    title = BENCHMARKS[report["benchmark"]].title
    lines = [f"{title}: {report['n']} scored, {report['skipped']['count']} unreadable images skipped",
             f"{'metric':<10} {'statistic':<9} {'ours':>7} {'published':>10}  source"]
    for name in report["metrics"]:
        for statistic in report["statistics"]:
            ours, published = report["results"][name][statistic], report["published"][name].get(statistic)
            shown = f"{published['value']:.1f}{'' if published['confirmed'] else '*'}" if published else "-"
            source = published["source"] if published else ""
            lines.append(f"{name:<10} {statistic:<9} {ours:>7.2f} {shown:>10}  {source}")
    if any(not p["confirmed"] for name in report["metrics"] for p in report["published"][name].values()):
        lines.append("* not confirmed in the paper or its official code (docs/clip_score.md)")
    return "\n".join(lines)


def _expected_errors(run: Callable[[], dict]) -> dict:
    """Run a command; expected errors end it with one line on stderr and exit status 1, no traceback."""
    try:
        return run()
    except ScorerLoadError as err:
        raise SystemExit(f"error: {_one_line(err, 2000)} (command line: --{err.argument.replace('_', '-')})") from None
    except (FileNotFoundError, ManifestError, BadSampleError, BenchmarkDataError) as err:
        raise SystemExit(f"error: {_one_line(err, 2000)}") from None


def correlate_main(argv: Sequence[str]) -> dict:
    """`python -m common.clip_score correlate ...`: the table on stdout, the truncation warning on stderr."""
    import tyro

    args = tyro.cli(CorrelateArgs, args=list(argv), prog="python -m common.clip_score correlate")
    report = _expected_errors(lambda: correlate(args))
    print(correlation_table(report))
    warning = truncation_warning(report["truncated"])
    if warning:
        print(warning, file=sys.stderr)
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    """The command line: score a manifest, or `correlate ...` (the scorer against human judgments). Expected errors
    (a missing file, a malformed manifest or benchmark file, a bad sample under --strict, a scorer that cannot be
    loaded) end it with one line on stderr and exit status 1, no traceback."""
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["correlate"]:
        return correlate_main(argv[1:])
    args = tyro.cli(Args, args=argv, prog="python -m common.clip_score")
    report = _expected_errors(lambda: score_manifest(args))
    for metric_name, mean in report["means"].items():
        print(f"{metric_name:>10}: {mean:.4f}  ({len(report['ids'])} samples, {report['skipped']['count']} skipped)")
    warning = truncation_warning(report["truncated"])
    if warning:
        print(warning, file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
