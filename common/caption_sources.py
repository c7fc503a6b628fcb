"""Where a captioning run's data and CLIP models come from: its splits, frozen encoder and evaluators.

A split is read from the Karpathy JSON (--coco-karpathy, --coco-images), from JSONL manifests (--train-manifest,
--val-manifest, --test-manifest) or, when no data flag is given, from the miniature world (`args.world`). Its
records have `refs`, a list of reference captions. CLIP models are open_clip bundles loaded once per process;
'miniature' names the world's trained scorer. Each function takes the run's `args`, whose fields hold these
flags (dico.py's Args), and names the flag to change in its errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from common.clip_score import CLIP_S_WEIGHT, PAC_S_WEIGHT, load_clip, load_clip_as
from common.clip_train import MINIATURE_MODEL, ensure_miniature_scorer
from common.data import ManifestError, load_coco_karpathy, read_manifest, shown, text_problem
from common.image_bank import ImageBank, image_bank
from common.miniature import ensure_world
from common.run_folder import refuse


def is_miniature(args) -> bool:
    """No data flag given: the run's data is the miniature world."""
    return not (args.coco_karpathy or args.train_manifest or args.val_manifest or args.test_manifest)


def data_source(args, split: str) -> str:
    """Where `split`'s records are read from, as messages name it."""
    if args.coco_karpathy:
        if not args.coco_images:
            raise refuse("--coco-karpathy needs --coco-images (the folder holding train2014/ and val2014/)")
        return f"{args.coco_karpathy} (images under {args.coco_images})"
    if is_miniature(args):
        return str(ensure_world(args.world) / f"{split}.jsonl")
    path = {"train": args.train_manifest, "val": args.val_manifest, "test": args.test_manifest}[split]
    if path is None:
        raise refuse(f"no {split} data: pass --{split}-manifest (or --coco-karpathy)")
    return path


def load_split(args, split: str) -> list[dict]:
    """Records with `refs` (a list of references) for train, val or test; a caption or refs of another type is an
    error naming the file and sample (a string `refs` would be read letter by letter as references)."""
    source = data_source(args, split)
    if args.coco_karpathy:
        records = load_coco_karpathy(args.coco_karpathy, args.coco_images, splits=[split])
    else:
        records = read_manifest(source, required=("id", "image", "caption"), texts=("caption",))
    for record in records:
        refs = record.setdefault("refs", [record["caption"]])
        problem = text_problem(refs, "refs", lists=True) or (
            None if isinstance(refs, list) else f"field 'refs' must be a list of strings, got {shown(refs)}") or (
            None if isinstance(record["image"], str) else f"field 'image' must be a path, got {shown(record['image'])}")
        if problem:
            raise ManifestError(f"{source} (id {record['id']!r}): {problem}")
    return records


_BUNDLES: dict = {}


def load_scorer(args, model: str, pretrained: Optional[str], pacs_checkpoint: Optional[str] = None,
                flags: str = "encoder"):
    """An open_clip bundle, loaded once per process; 'miniature' = the scorer of args.world. A load error names the
    flag to change: --{flags}-model or --{flags}-pretrained (flags: encoder, clip-s, pacs)."""
    key = (model, pretrained, pacs_checkpoint, (args.world, args.scorer) if model == "miniature" else None)
    if key not in _BUNDLES:
        if model == "miniature":
            path = ensure_miniature_scorer(args.world, args.scorer)
            _BUNDLES[key] = load_clip(MINIATURE_MODEL, str(path), args.device)
        else:
            names = {"model": f"--{flags}-model", "pretrained": f"--{flags}-pretrained"}
            _BUNDLES[key] = load_clip_as(names, model, pretrained, args.device, pacs_checkpoint=pacs_checkpoint)
    return _BUNDLES[key]


def require_pacs_weights(args) -> None:
    """PAC-S's fine-tuned weights, checked when a run starts rather than at its first validation."""
    own_file = args.pacs_pretrained is not None and Path(args.pacs_pretrained).is_file()
    if args.pacs_model != "miniature" and args.pacs_checkpoint is None and not own_file:
        raise refuse("PAC-S needs its fine-tuned weights: pass --pacs-checkpoint /path/to/clip_ViT-B-32.pth")


def evaluators(args) -> dict:
    """{"clip_s": (bundle, w), "pac_s": (bundle, w)}."""
    require_pacs_weights(args)
    return {"clip_s": (load_scorer(args, args.clip_s_model, args.clip_s_pretrained, flags="clip-s"), CLIP_S_WEIGHT),
            "pac_s": (load_scorer(args, args.pacs_model, args.pacs_pretrained, args.pacs_checkpoint, "pacs"),
                      PAC_S_WEIGHT)}


def image_bank_of(args, records: list[dict]) -> ImageBank:
    """The ImageBank of `records` under args' frozen encoder, built once per process (common/image_bank.py): the
    stages of a miniature run (and its seeds) share the encoder's tokens instead of encoding the images again."""
    encoder = load_scorer(args, args.encoder_model, args.encoder_pretrained)
    return image_bank(records, encoder, args.device, args.strict, args.cache_features)
