"""common/clip_train.py: the loss against open_clip, retrieval by hand, training, the cached scorer."""

import dataclasses
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from common.clip_train import (TrainConfig, contrastive_loss, cosine_lr, create_clip, ensure_miniature_scorer,
                               evaluate_world, preprocess_images, retrieval_metrics, train_clip, zero_shot_accuracy)
from common.data import read_manifest
from common.miniature import WorldConfig, ensure_world

MICRO = "micro-ViT-16"
TINY_WORLD = WorldConfig(n_train=64, n_val=4, n_test=24)


def test_loss_equals_open_clip():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(7, 16), dim=-1), F.normalize(torch.randn(7, 16), dim=-1)
    scale = torch.tensor(14.3)
    expected = open_clip.loss.ClipLoss()(img, txt, scale)
    assert torch.allclose(contrastive_loss(img, txt, scale), expected, atol=1e-6)


def test_retrieval_by_hand():
    img = torch.eye(4)
    # text 0 matches image 1 best, the others their own image
    txt = torch.tensor([[0.5, 0.9, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    m = retrieval_metrics(img, txt, ks=(1, 2))
    # image 0's text ranks first for image 0 among texts {0: .5, others 0}: hit; image 1: text 0 (0.9) < text 1 (1.0)
    assert m["i2t_R@1"] == 100.0
    # text 0: image 1 (0.9) beats image 0 (0.5): rank 2
    assert m["t2i_R@1"] == 75.0 and m["t2i_R@2"] == 100.0
    # several texts per image: texts 0 and 1 both belong to image 1
    m = retrieval_metrics(img[:3], txt[:3], text_to_image=[1, 1, 2], ks=(1,))
    assert m["t2i_R@1"] == 100.0 and m["i2t_R@1"] == pytest.approx(100 * 2 / 3)


def test_zero_shot_accuracy_by_hand():
    class Stub:  # class prompts embed as the one-hot of the class named in them
        def encode_text(self, tokens):
            return tokens.float()

    tokenizer = lambda prompts: torch.stack([torch.eye(3)[int(p.split()[-1])] for p in prompts])  # noqa: E731
    img = torch.eye(3)[[0, 1, 2, 2]]
    acc = zero_shot_accuracy(Stub(), tokenizer, img, ["0", "1", "2"], ["class {}"], labels=[0, 1, 2, 0])
    assert acc == 75.0


def test_cosine_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0)
    assert cosine_lr(0, cfg) == pytest.approx(0.1) and cosine_lr(9, cfg) == pytest.approx(1.0)
    assert cosine_lr(55, cfg) == pytest.approx(0.5) and cosine_lr(100, cfg) == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def world_records():
    folder = ensure_world(TINY_WORLD)
    return read_manifest(folder / "train.jsonl"), read_manifest(folder / "test.jsonl")


def test_training_lowers_the_loss_and_stops_on_nan(world_records):
    train, _ = world_records
    model, preprocess, tokenizer = create_clip(MICRO)
    images = preprocess_images(train, preprocess)
    captions = [r["caption"] for r in train]
    history = train_clip(model, tokenizer, images, lambda idx, rng: [captions[i] for i in idx],
                         TrainConfig(steps=30, batch_size=32, lr=3e-3, warmup=3), progress=False)
    assert np.mean([h["loss"] for h in history[-5:]]) < history[0]["loss"] - 0.3
    assert all(h["logit_scale"] <= 100 + 1e-4 for h in history)
    nan_loss = lambda *args: torch.tensor(math.nan, requires_grad=True)  # noqa: E731
    with pytest.raises(FloatingPointError, match="at step 0"):
        train_clip(model, tokenizer, images, lambda idx, rng: [captions[i] for i in idx],
                   TrainConfig(steps=2, batch_size=8), loss_fn=nan_loss, progress=False)


def test_miniature_scorer_is_trained_once_and_cached(world_records, tmp_path):
    train_cfg = TrainConfig(steps=4, batch_size=16, warmup=1)
    path = ensure_miniature_scorer(TINY_WORLD, train_cfg, model_name=MICRO, root=tmp_path, progress=False)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["model"] == MICRO and "i2t_R@1" in checkpoint["test_metrics"]
    stamp = path.stat().st_mtime_ns
    assert ensure_miniature_scorer(TINY_WORLD, train_cfg, model_name=MICRO, root=tmp_path) == path
    assert path.stat().st_mtime_ns == stamp
    other = ensure_miniature_scorer(TINY_WORLD, dataclasses.replace(train_cfg, seed=1), model_name=MICRO,
                                    root=tmp_path, progress=False)
    assert other != path


def test_evaluate_world_reports_retrieval_and_zero_shot(world_records):
    _, test = world_records
    model, preprocess, tokenizer = create_clip(MICRO)
    metrics = evaluate_world(model, tokenizer, preprocess, test)
    assert {"i2t_R@1", "t2i_R@10", "zeroshot_background", "zeroshot_entity"} <= set(metrics)
    assert all(0 <= v <= 100 for v in metrics.values())


@pytest.mark.slow
def test_default_miniature_scorer_is_good():
    """The cached default scorer (trains for minutes on first use) retrieves well above chance."""
    from common.clip_score import load_clip

    bundle = load_clip("miniature", device="cpu")
    path = ensure_miniature_scorer()
    metrics = torch.load(path, map_location="cpu", weights_only=True)["test_metrics"]
    assert metrics["i2t_R@1"] > 20 and metrics["t2i_R@1"] > 20
    assert bundle.name == "mini-ViT-8"


def test_several_texts_per_image_sum_their_losses(world_records):
    train, _ = world_records
    model, preprocess, tokenizer = create_clip(MICRO)
    images = preprocess_images(train[:8], preprocess)
    seen = []

    def recording_loss(img_emb, txt_emb, logit_scale):
        seen.append(contrastive_loss(img_emb, txt_emb, logit_scale).item())
        return contrastive_loss(img_emb, txt_emb, logit_scale)

    history = train_clip(model, tokenizer, images,
                         lambda idx, rng: ([train[i]["caption"] for i in idx], [train[i]["alt_text"] for i in idx]),
                         TrainConfig(steps=1, batch_size=8, lr=0.0, warmup=1), loss_fn=recording_loss, progress=False)
    assert len(seen) == 2 and history[0]["loss"] == pytest.approx(sum(seen), rel=1e-5)
