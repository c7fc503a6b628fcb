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
reference metrics and says so (jmhessel/clipscore, aimagelab/pacscore).

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
ours next to the published numbers. It lives in common/human_judgments.py (the benchmarks' readers in
common/judgment_readers.py), which imports this module; main() imports it only for `correlate`.
docs/clip_score.md: the data, the protocols, the numbers.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import huggingface_hub
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

try:  # in this repository: the shared manifest reader and error types (common/data.py)
    from common.data import (DEBUG_FLAG, BadSampleError, ManifestError, ScorerLoadError, SkipCounter,
                             atomic_write_text, check_device, image_path, read_manifest, run_command, without_debug)
except ModuleNotFoundError:  # copied alone into another project: the scoring functions work, the command line not
    DEBUG_FLAG = "--debug"

    def without_debug(argv: Sequence[str]) -> list[str]:
        return [word for word in argv if word != DEBUG_FLAG]

    def run_command(main: Callable, argv: Sequence[str], also: tuple = ()):  # common.data's, its errors only
        try:
            return main(without_debug(argv))
        except (FileNotFoundError, ManifestError, BadSampleError, ScorerLoadError, *also) as err:
            if DEBUG_FLAG in argv:
                raise
            raise SystemExit(f"error: {_one_line(err, 2000)}") from None

    class ScorerLoadError(ValueError):
        """A scorer that cannot be loaded as asked; `argument` names the load_clip argument to change."""

        def __init__(self, message: str, argument: str):
            super().__init__(message)
            self.argument = argument

    def check_device(device: str) -> str:
        return device

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


def load_clip_as(flags: Mapping[str, str], *args: Any, **kwargs: Any) -> ClipBundle:
    """load_clip for a command line whose flags are named otherwise: its ScorerLoadError starts with the flag to
    change (`flags` maps load_clip's argument names to them: {"pretrained": "--encoder-pretrained", ...})."""
    try:
        return load_clip(*args, **kwargs)
    except ScorerLoadError as err:
        flag = flags.get(err.argument, f"--{err.argument.replace('_', '-')}")
        raise ScorerLoadError(f"{flag}: {err}", err.argument) from None


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _batches(items: Sequence, size: int, desc: str, progress: bool):
    for start in tqdm(range(0, len(items), size), desc=desc, disable=not progress, leave=False):
        yield items[start:start + size]


def decode_image(source: Any) -> Image.Image:
    """An image as decoded, mode kept (RGBA, palette, ...; 16-bit and float grey as 8-bit L), from a path, bytes or
    a PIL image.

    The model's preprocess converts to RGB after resizing and cropping, as open_clip's and clipscore's do;
    common.data.open_image converts first, which gives RGBA and palette images other pixels. Same errors as there.
    """
    try:
        image = source if isinstance(source, Image.Image) else Image.open(
            io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        image.load()
    except FileNotFoundError as err:
        raise BadSampleError(f"image file not found: {source}") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        where = "image bytes" if isinstance(source, (bytes, bytearray)) else source
        raise BadSampleError(f"image cannot be decoded ({err}): {where}") from err
    if image.mode.startswith("I") or image.mode == "F":  # 16-bit or float grey: PIL's convert("RGB") clips at 255
        values = np.asarray(image, dtype=np.float64)  # (H, W); 16-bit / 257 and 0..1 floats * 255 give 0..255
        values = values * 255.0 if image.mode == "F" else values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
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


def encode_reference_groups(bundle: ClipBundle, refs: Sequence[Sequence[str]],
                            progress: bool = True) -> list[np.ndarray]:
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
    return {"per_sample": per_sample.astype(float).tolist(),
            "mean": float(np.mean(per_sample)) if len(per_sample) else float("nan")}


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
    ("PAC-S state dict (clip_ViT-B-32.pth from aimagelab/pacscore) loaded into --model ViT-B-32 (it holds every "
     "weight, so --pretrained is not needed)")
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
    check_device(args.device or "cpu")  # before the weights load (their loader would take the blame)
    records = read_manifest(args.manifest)
    metric = "pac_s" if args.pacs_checkpoint and args.metric == "clip_s" else args.metric
    if metric not in ("clip_s", "pac_s"):
        raise ValueError(f"--metric must be clip_s or pac_s, got {args.metric!r}")
    bundle = load_clip_as({}, args.model, args.pretrained, args.device, args.precision, args.pacs_checkpoint)
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
# The command line
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    """The command line: score a manifest, or `correlate ...` (the scorer against human judgments: the command of
    common/human_judgments.py, imported only then). Expected errors (a missing file, a malformed manifest or
    benchmark file, a bad sample under --strict, a scorer that cannot be loaded) end it with one line on stderr
    and exit status 1, no traceback."""
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["correlate"]:
        from common.human_judgments import main as correlate_main  # it imports this module, never the reverse

        return correlate_main(argv[1:], prog="python -m common.clip_score correlate")
    args = tyro.cli(Args, args=without_debug(argv), prog="python -m common.clip_score",
                    description=f"{inspect.getdoc(Args)}\n\n{DEBUG_FLAG}: keep the traceback of an expected error.")
    report = run_command(lambda _: score_manifest(args), argv)  # an expected error: one line (unless --debug)
    for metric_name, mean in report["means"].items():
        print(f"{metric_name:>10}: {mean:.4f}  ({len(report['ids'])} samples, {report['skipped']['count']} skipped)")
    warning = truncation_warning(report["truncated"])
    if warning:
        print(warning, file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
