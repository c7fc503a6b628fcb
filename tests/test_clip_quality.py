"""clip_quality.py (with common/dense_probe.py, common/coca_captions.py, common/vit_attention.py and
experiments/clip_quality_miniature.py): attention distance by hand, DataCompDR sampling, probe metrics, every stage
end to end."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import clip_quality as cq
import common.coca_captions as coca
import common.dense_probe as dp
import common.vit_attention as vit_attention
import common.world_manifests as world_manifests
import experiments.clip_quality_miniature as miniature
from common.clip_eval import encode_images, encode_texts, preprocess_images, retrieval_metrics
from common.clip_train import create_clip
from common.columns import index_data
from common.data import DeviceError, ManifestError, NonFiniteError, image_path, read_manifest
from common.miniature import WorldConfig, ensure_world
import tests.realarch as realarch
from common.degenerate import degenerate_reason
from tests.realarch import assert_same_weights, run_torchrun, serve_open_clip_tag

MICRO = "micro-ViT-16"
TINY = ["--world.n-train", "48", "--world.n-val", "4", "--world.n-test", "16", "--model", MICRO,
        "--train.steps", "2", "--train.batch-size", "16", "--train.warmup", "1",
        "--probe-steps", "3", "--probe-batch-size", "8", "--probe-train-images", "16", "--attention-images", "4"]


# ---- attention distance ----------------------------------------------------------------------

def test_attention_distance_on_a_hand_built_map():
    """2x2 grid of 16-px patches + CLS: head 0 attends to itself, head 1 half to CLS, half to its row neighbour."""
    tokens = 5
    attn = torch.zeros(1, 2, tokens, tokens)
    for q in range(1, tokens):
        attn[0, 0, q, q] = 1.0
        neighbour = {1: 2, 2: 1, 3: 4, 4: 3}[q]  # patches 1..4 sit at (0,0), (0,1), (1,0), (1,1)
        attn[0, 1, q, 0], attn[0, 1, q, neighbour] = 0.5, 0.5
    attn[0, :, 0, 4] = 1.0  # the CLS query attends to the far corner: must not count
    distance = cq.mean_attention_distance(attn, (2, 2), (16, 16))
    # head 0: 0 px; head 1: 0.5 * 16 px (the CLS half counts nothing and is not renormalised)
    assert distance.tolist() == pytest.approx([0.0, 8.0])


def test_attention_distance_diagonal_in_pixels():
    attn = torch.zeros(2, 1, 5, 5)
    attn[:, 0, 1:, 1:] = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float)
    # every query attends to the opposite corner: sqrt(8^2 + 8^2) px with 8-px patches
    assert cq.mean_attention_distance(attn, (2, 2), (8, 8)).item() == pytest.approx(8 * math.sqrt(2))


def test_attention_distance_by_hand_on_a_non_square_grid():
    """Random maps, 3 images x 2 heads, a 2 x 3 grid of 8 x 16-px patches: per head (not head-averaged), the mean
    over images and query patches of sum over key patches of attn * pixel distance between centres, loops in numpy."""
    generator = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(3, 2, 7, 7, generator=generator), dim=-1)
    centres = [(8 * r, 16 * c) for r in range(2) for c in range(3)]  # token 1 + 3 r + c: row-major
    expected = [np.mean([sum(attn[b, h, 1 + q, 1 + j].item() * math.dist(centres[q], centres[j]) for j in range(6))
                         for b in range(3) for q in range(6)]) for h in range(2)]
    assert cq.mean_attention_distance(attn, (2, 3), (8, 16)).tolist() == pytest.approx(expected)


def test_captured_attention_equals_softmax_of_the_block_projections():
    model, preprocess, _ = create_clip(MICRO, seed=3)
    visual = model.visual.eval()
    images = torch.randn(2, 3, 64, 64)
    maps = vit_attention.attention_maps(visual, images)
    assert len(maps) == len(visual.transformer.resblocks)
    # recompute layer 0 by hand from the embedded input
    block = visual.transformer.resblocks[0]
    with torch.no_grad():
        x = block.ln_1(visual._embeds(images))  # (B, L, D)
        q, k, _ = (x @ block.attn.in_proj_weight.t() + block.attn.in_proj_bias).chunk(3, dim=-1)
        heads = block.attn.num_heads
        split = lambda t: t.view(2, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731  (B, H, L, d)
        expected = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(split(q).shape[-1]), dim=-1)
    assert maps[0].shape == (2, heads, 17, 17)
    assert torch.allclose(maps[0], expected, atol=1e-5)


# ---- DataCompDR sampling ---------------------------------------------------------------------

REAL = [f"real {i}" for i in range(10)]
SYNTHETIC = [[f"syn {i}.{k}" for k in range(5)] for i in range(10)]


def test_datacompdr_draws_one_real_and_one_synthetic_per_sample_and_step():
    texts_for = cq.make_texts_for("datacompdr", REAL, SYNTHETIC, 0.5)
    rng = np.random.default_rng(0)
    drawn = {i: set() for i in range(10)}
    for _ in range(200):
        indices = rng.choice(10, size=6, replace=False)
        real, synthetic = texts_for(indices, rng)
        assert real == [REAL[i] for i in indices] and len(synthetic) == len(indices)
        for i, text in zip(indices, synthetic):
            assert text in SYNTHETIC[i]
            drawn[i].add(text)
    assert all(len(seen) == 5 for seen in drawn.values())  # redrawn every step
    # uniform among the five: 1,200 draws, each caption index within 4 points of 20%
    picks = [text.rsplit(".", 1)[1] for _ in range(200) for text in texts_for(np.arange(6), rng)[1]]
    assert [picks.count(str(k)) / len(picks) for k in range(5)] == pytest.approx([0.2] * 5, abs=0.04)


def test_datacomp_uses_the_web_caption_only():
    assert cq.make_texts_for("datacomp", REAL, SYNTHETIC, 0.5)(np.array([3, 1]), np.random.default_rng(0)) == \
        ["real 3", "real 1"]
    with pytest.raises(ValueError, match="unknown regime 'dr'"):
        cq.make_texts_for("dr", REAL, SYNTHETIC, 0.5)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_swap_variant_rate(p):
    """One caption list (one loss); each sample's own web caption, or with probability p one of its own synthetic."""
    texts_for = cq.make_texts_for("swap", REAL, SYNTHETIC, p)
    rng = np.random.default_rng(1)
    indices = np.array([4, 0, 9, 2, 7, 1, 3, 8, 5, 6])
    texts = [(i, t) for _ in range(400) for i, t in zip(indices, texts_for(indices, rng), strict=True)]
    assert all(t == REAL[i] or t in SYNTHETIC[i] for i, t in texts)
    swapped = [t for i, t in texts if t != REAL[i]]
    assert len(swapped) / len(texts) == pytest.approx(p, abs=0.03)
    assert len(set(swapped)) == 50 * (p > 0)  # every synthetic caption of every sample is drawn


def test_check_captions_names_the_bad_sample(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "image": "x.png", "alt_text": "x", "synthetic_captions": ["y"]}\n'
                    '{"id": "b", "image": "x.png", "alt_text": "x", "synthetic_captions": []}\n')
    columns = index_data(str(path))
    cq.check_captions(columns, np.arange(1), "alt_text", "synthetic_captions")  # the first row alone is fine
    with pytest.raises(ManifestError, match=r"m.jsonl:2 \(id 'b'\): field 'synthetic_captions' is an empty list"):
        cq.check_captions(columns, np.arange(2), "alt_text", "synthetic_captions")


def clip_loss_by_hand(img_emb, txt_emb, scale):
    """Eq. 1, in float64 numpy: (CE over each image's row + CE over each text's column) / 2."""
    logits = scale * img_emb.double().numpy() @ txt_emb.double().numpy().T  # (N, N)
    log_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    log_cols = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    return -(np.diag(log_rows).mean() + np.diag(log_cols).mean()) / 2


@pytest.mark.parametrize("kernel", ["none", "torch", "auto"])
def test_loss_function_is_the_symmetric_clip_loss(kernel):
    """Every --kernel on one process is Eq. 1 (no world-size factor on one process, and
    caption_kernels.contrastive's distributed factor is pinned by test_kernels_contrastive.py)."""
    generator = torch.Generator().manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(5, 3, generator=generator), dim=-1) for _ in range(2))
    loss = cq.loss_function(kernel)(img, txt, torch.tensor(2.5))
    assert loss.item() == pytest.approx(clip_loss_by_hand(img, txt, 2.5), rel=1e-5)


def test_kernel_triton_reaches_the_triton_implementation(monkeypatch):
    """--kernel triton is passed on as impl="triton": on CPU tensors without the interpreter it refuses
    rather than falling back to the reference as `auto` does."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    img = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises((ValueError, RuntimeError), match="triton"):
        cq.loss_function("triton")(img, img, torch.tensor(2.0))


@pytest.mark.parametrize("regime, kernel", [("datacomp", "none"), ("datacompdr", "torch"), ("swap", "none")])
def test_pretraining_step_loss_recomputed_from_the_seed(tmp_path, monkeypatch, regime, kernel):
    """One pretraining step: the batch, the captions drawn from the seed, and the loss by hand
    (DataCompDR: L(img, x_real) + L(img, x_syn) on the same images; DataComp and swap: one loss)."""
    from common.clip_train import TrainConfig

    manifest = write_probe_manifest(tmp_path / "data", "d", count=6)
    records = read_manifest(manifest)
    columns = index_data(manifest)
    seen, call = [], cq.RegimeTexts.__call__
    monkeypatch.setattr(cq.RegimeTexts, "__call__", lambda self, rows, rng: seen.append(
        (rows, call(self, rows, rng))) or seen[-1][1])
    args = cq.Args(model=MICRO, kernel=kernel, swap_probability=0.5,
                   train=TrainConfig(steps=1, batch_size=4, warmup=1, seed=99))
    row = cq.pretrain_one(args, {"train": columns, "test": records[:4]}, regime, 3, 5, tmp_path / "m.pt")
    # recomputed from the seed: epoch 0 is the permutation of the first 5 images seeded (3, 0), its first 4 the
    # batch; the captions come from the trainer's caption stream seeded (3, 1, step 0)
    batch = np.random.default_rng([3, 0]).permutation(5)[:4]
    rng = np.random.default_rng([3, 1, 0])
    real = [records[i]["alt_text"] for i in batch]
    synthetic = [records[i]["synthetic_captions"] for i in batch]
    if regime == "datacomp":
        expected = [real]
    elif regime == "datacompdr":
        expected = [real, [s[rng.integers(len(s))] for s in synthetic]]
    else:
        swap = rng.random(4) < 0.5
        expected = [[s[rng.integers(len(s))] if w else r for r, s, w in zip(real, synthetic, swap)]]
    (rows, texts), = seen
    assert rows.tolist() == batch.tolist()
    assert (list(texts) if regime == "datacompdr" else [texts]) == expected
    # the loss of step 0, by hand from the same initialisation: one Eq. 1 per caption list, summed
    model, preprocess, tokenizer = create_clip(MICRO, seed=3)
    with torch.no_grad():
        pixels = preprocess_images(records, preprocess)[batch]
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        scale = model.logit_scale.exp().item()
        loss = sum(clip_loss_by_hand(img, torch.nn.functional.normalize(model.encode_text(tokenizer(t)), dim=-1), scale)
                   for t in expected)
    assert row["final_loss"] == pytest.approx(loss, rel=1e-4)
    label = f"{regime}-n5-seed3"
    assert {k: row[k] for k in ("regime", "seed", "train_images", "checkpoint")} == \
        {"regime": regime, "seed": 3, "train_images": 5, "checkpoint": str(tmp_path / "m.pt")}
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload.pop("state_dict").keys() == model.state_dict().keys()
    assert payload == {"model": MICRO, "label": label, "regime": regime, "seed": 3, "train_images": 5,
                       "train": cq.dataclasses.asdict(cq.dataclasses.replace(args.train, seed=3))}
    if kernel == "torch":  # --kernel reaches the training loss: triton on CPU tensors refuses
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="impl='triton'"):
            cq.pretrain_one(cq.dataclasses.replace(args, kernel="triton"), {"train": columns, "test": records},
                            regime, 3, 5, tmp_path / "t.pt")


# ---- probe metrics ---------------------------------------------------------------------------

def test_miou_perfect_and_constant_prediction():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 2, 255]])  # 4 background, 2 class-1, 1 class-2, 1 ignored
    perfect = segmentation_of(target.clamp(max=2), target)
    assert perfect["mIoU"] == pytest.approx(100.0) and perfect["mAcc"] == pytest.approx(100.0)
    constant = segmentation_of(torch.zeros_like(target), target)
    # IoU: background 4 / 7, classes 1 and 2: 0 -> mIoU = (4/7) / 3; mAcc = (1 + 0 + 0) / 3
    assert constant["mIoU"] == pytest.approx(100 * 4 / 7 / 3)
    assert constant["mAcc"] == pytest.approx(100 / 3) and constant["aAcc"] == pytest.approx(100 * 4 / 7)


def test_classes_absent_from_labels_and_predictions_are_skipped_as_mmseg():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    confusion = dp.confusion_matrix(pred, target, 4, ignore_index=255)
    assert confusion[0].tolist() == [2, 1, 1, 0] and confusion[:, 0].tolist() == [2, 0, 0, 0]  # rows = truth
    # labels outside 0..K-1 (4, -1) are skipped like 255; the one labelled pixel added (truth 0, predicted 1) counts
    wider = dp.confusion_matrix(torch.cat([pred, torch.tensor([[0, 0, 1, 1]])]),
                                torch.cat([target, torch.tensor([[4, -1, 0, 255]])]), 4, ignore_index=255)
    assert (wider - confusion).tolist() == [[0, 1, 0, 0], [0] * 4, [0] * 4, [0] * 4]
    # IoU: 2/4, 2/3, 1/2; Acc: 2/4, 2/2, 1/1; class 3 (never labelled nor predicted) does not count
    assert segmentation_of(pred, target, 4) == pytest.approx(segmentation_of(pred, target, 3))
    assert segmentation_of(pred, target, 4) == pytest.approx(
        {"mIoU": 100 * (1 / 2 + 2 / 3 + 1 / 2) / 3, "mAcc": 100 * (1 / 2 + 1 + 1) / 3, "aAcc": 100 * 5 / 7})


def segmentation_of(pred, target, num_classes=3):
    return dp.segmentation_metrics(dp.confusion_matrix(pred, target, num_classes, ignore_index=255))


def test_depth_rmse_skips_invalid_pixels_per_image():
    target = torch.tensor([[[2.0, 4.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [3.0, 0.0]]])
    pred = torch.tensor([[[3.0, 4.0], [9.0, 9.0]], [[3.0, 1.0], [1.0, 5.0]], [[7.0, 7.0], [4.5, 7.0]]])
    # per image over its valid pixels (2, 3 and 1 of them): sqrt(1/2), sqrt(4/3), 1.5; not pooled over the batch
    assert dp.depth_rmse(pred, target).tolist() == pytest.approx([math.sqrt(1 / 2), math.sqrt(4 / 3), 1.5])


def test_patch_tokens_are_the_last_blocks_normalised_patch_tokens():
    """The probe reads the last block's output, through ln_post, CLS dropped, as a (B, C, h, w) grid (row-major)."""
    visual = create_clip("mini-ViT-8", seed=1)[0].visual.eval()  # 2 blocks, 8 x 8 patches of 8 px
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = visual._embeds(images)  # (B, 1 + 64, D)
        for block in visual.transformer.resblocks:
            x = block(x)
        expected = visual.ln_post(x[:, 1:]).reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
        assert torch.allclose(dp.patch_tokens(visual, images), expected, atol=1e-5)


def test_probe_head_is_batchnorm_and_a_1x1_convolution_upsampled_bilinearly():
    """A linear head: per patch, W (BN(token)) + b; then bilinear (align_corners=False) to the pixels."""
    torch.manual_seed(0)
    head = dp.DenseProbe(4, 3).eval()
    head.norm.running_mean.normal_()
    head.norm.running_var.uniform_(0.5, 2.0)
    head.norm.weight.data.normal_()
    tokens = torch.randn(2, 4, 3, 5)  # (B, C, h, w)
    normed = (tokens - head.norm.running_mean[:, None, None]) / torch.sqrt(head.norm.running_var[:, None, None] + 1e-5)
    normed = normed * head.norm.weight[:, None, None] + head.norm.bias[:, None, None]
    by_hand = lambda conv: torch.einsum("kc,bchw->bkhw", conv.weight[:, :, 0, 0], normed) + conv.bias[:, None, None]  # noqa: E731
    with torch.no_grad():
        logits, depth = head(tokens, (3, 5))
        assert torch.allclose(logits, by_hand(head.segment), atol=1e-5)
        assert torch.allclose(depth, by_hand(head.depth)[:, 0], atol=1e-5)
        logits, depth = head(tokens, (6, 10))  # upsampled 2x: bilinear samples at (i + 0.5) / 2 - 0.5
        assert torch.allclose(logits[:, :, 1, 1], 0.75 * (0.75 * by_hand(head.segment)[:, :, 0, 0] + 0.25 *
                              by_hand(head.segment)[:, :, 0, 1]) + 0.25 * (0.75 * by_hand(head.segment)[:, :, 1, 0] +
                              0.25 * by_hand(head.segment)[:, :, 1, 1]), atol=1e-5)
    assert dp.DenseProbe(4, 3, ("depth",)).segment is None and dp.DenseProbe(4, 3, ("seg",)).depth is None
    # nothing else learns: BN's affine (2 x 4) and a 4 -> 3 + 1 map with biases
    assert sum(p.numel() for p in head.parameters()) == 2 * 4 + (4 * 3 + 3) + (4 * 1 + 1)


def test_probe_loss_by_hand():
    """CE over labelled pixels (255 skipped) + MSE on standardised depth over valid pixels (0 skipped), summed."""
    generator = torch.Generator().manual_seed(0)
    logits, depth = torch.randn(2, 3, 2, 2, generator=generator), torch.randn(2, 2, 2, generator=generator)
    masks = torch.tensor([[[0, 2], [255, 1]], [[1, 1], [255, 255]]])
    target = torch.tensor([[[2.0, 0.0], [3.0, 1.0]], [[0.0, 0.0], [2.5, 4.0]]])
    terms = dp.probe_loss(logits, depth, masks, target, torch.tensor(2.0), torch.tensor(0.5), 255)
    log_p = torch.log_softmax(logits.double(), dim=1).numpy()
    labelled = [(b, i, j) for b in range(2) for i in range(2) for j in range(2) if masks[b, i, j] != 255]
    seg = -np.mean([log_p[b, masks[b, i, j], i, j] for b, i, j in labelled])
    valid = [(b, i, j) for b in range(2) for i in range(2) for j in range(2) if target[b, i, j] > 0]
    mse = np.mean([(depth[b, i, j].item() - (target[b, i, j].item() - 2.0) / 0.5) ** 2 for b, i, j in valid])
    assert (terms["seg"].item(), terms["depth"].item(), terms["loss"].item()) == pytest.approx((seg, mse, seg + mse))
    assert dp.probe_loss(logits, depth, None, target, 2.0, 0.5, 255)["loss"].item() == pytest.approx(mse)
    assert dp.probe_loss(logits, depth, masks, None, 2.0, 0.5, 255)["loss"].item() == pytest.approx(seg)


def test_frozen_probe_keeps_the_encoder_and_finetune_trains_it_at_its_own_rate(tmp_path):
    """Default: only the head learns (frozen tokens); --finetune adds the encoder at --finetune-lr, so with that
    rate at 0 it equals the frozen probe, metric for metric."""
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 3, (4, 64, 64))
    masks[:, :8] = 255
    records = read_manifest(write_probe_manifest(tmp_path, "p", masks=masks, size=(64, 64),
                                                    depth_mm=rng.integers(1, 3000, (4, 64, 64))))
    args = cq.Args(num_classes=3, probe_steps=3, probe_batch_size=2, probe_lr=0.05, out=str(tmp_path / "run"))
    preprocess = dp.create_random(MICRO, False, seed=0)[1]
    data = probe_sets(args, {"probe_train": records, "probe_test": records}, preprocess, ("seg", "depth"))

    def probe(**changes):
        visual = create_clip(MICRO, seed=2)[0].visual
        metrics = dp.train_and_evaluate_probe(visual, *data, settings(cq.dataclasses.replace(args, **changes)), seed=0)
        return metrics, torch.cat([p.flatten() for p in visual.parameters()])

    untouched = torch.cat([p.flatten() for p in create_clip(MICRO, seed=2)[0].visual.parameters()])
    frozen, frozen_weights = probe()
    still, still_weights = probe(finetune=True, finetune_lr=0.0)
    tuned, tuned_weights = probe(finetune=True, finetune_lr=0.05)
    assert torch.equal(frozen_weights, untouched) and torch.equal(still_weights, untouched)
    assert not torch.allclose(tuned_weights, untouched)
    assert still == pytest.approx(frozen, rel=1e-4) and tuned != pytest.approx(frozen, rel=1e-4)


def test_label_maps_follow_the_image_crop():
    from PIL import Image

    mask = Image.fromarray(np.repeat(np.arange(8, dtype=np.uint8)[None], 4, axis=0))  # (4, 8): column index
    cropped = np.asarray(dp.resize_center_crop(mask, 4))
    assert cropped.shape == (4, 4) and cropped[0].tolist() == [2, 3, 4, 5]


# ---- streamed probe data ---------------------------------------------------------------------

def settings(args):
    """The probe settings of a clip_quality.Args, as its probe stage passes them to common.dense_probe."""
    return dp.ProbeSettings.from_args(args)


def probe_sets(args, records, preprocess, tasks):
    """The probe stage's train and test datasets of `records` (probe_train, probe_test) under `args`."""
    return dp.probe_datasets(*cq.probe_records(args, records), preprocess, settings(args), tasks)


def tiny_probe_world(folder, count):
    """`count` records of 40 x 48 noise images with class ids 0..3 (a band of 255) and millimetres (a band of 0)."""
    rng = np.random.default_rng(3)
    masks = rng.integers(0, 4, (count, 40, 48))
    masks[:, :5] = 255
    depth_mm = rng.integers(200, 9000, (count, 40, 48))
    depth_mm[:, :, :7] = 0
    return read_manifest(write_probe_manifest(folder, "w", masks=masks, depth_mm=depth_mm))


def in_memory_probe_set(records, preprocess, args):
    """What probe_sets held before it streamed: every image, mask and depth map of `records` in one tensor each."""
    from PIL import Image

    images = preprocess_images(records, preprocess)
    size = images.shape[-1]
    masks = torch.stack([dp.load_mask(r, size, args.num_classes, args.ignore_index, args.reduce_zero_label)
                         for r in records])
    depth = torch.stack([torch.from_numpy(np.asarray(dp.resize_center_crop(Image.open(image_path(
        {**r, "image": r["depth"]})), size), np.float32) / 1000.0) for r in records])
    return images, masks, depth


def test_streamed_probe_data_equal_the_in_memory_tensors(tmp_path, monkeypatch):
    """The datasets decode, through two DataLoader workers, the images, masks and depth the in-memory sets held; the
    frozen cache holds the encoder's tokens of them in a memory-mapped .npy and the depth statistics are the same."""
    records = tiny_probe_world(tmp_path, count=5)
    model, preprocess = dp.create_random(MICRO, False, seed=1)  # no tokenizer: it takes a second to build
    args = cq.Args(num_classes=4, probe_train_images=0, probe_workers=2, out=str(tmp_path / "run"))
    train_set, test_set = probe_sets(args, {"probe_train": records, "probe_test": records[:2]}, preprocess,
                                        ("depth", "seg"))
    assert (len(train_set), len(test_set), train_set.fields) == (5, 2, ("image", "mask", "depth"))
    images, masks, depth = in_memory_probe_set(records, preprocess, args)
    batches = list(dp.probe_loader(train_set, settings(args), batch_size=2))  # 2, 2, 1 images from two worker processes
    for field, expected in [("image", images), ("mask", masks), ("depth", depth)]:
        assert torch.equal(torch.cat([batch[field] for batch in batches]), expected), field
    depth_only = train_set.only(("depth",))[4]  # the statistics' pass decodes no image
    assert list(depth_only) == ["depth"] and torch.equal(depth_only["depth"], depth[4])

    monkeypatch.setattr(dp, "EVAL_BATCH", 2)
    visual = model.visual.eval()
    in_process = settings(cq.dataclasses.replace(args, probe_workers=0))
    cache, moments = dp.cache_frozen(visual, train_set, in_process, tmp_path)
    assert isinstance(cache["tokens"], np.memmap) and Path(cache["tokens"].filename) == tmp_path / "tokens.npy"
    with torch.no_grad():
        assert np.allclose(cache["tokens"], dp.patch_tokens(visual, images).numpy(), atol=1e-5)
    assert np.array_equal(cache["mask"], masks.numpy()) and np.array_equal(cache["depth"], depth.numpy())
    valid = depth[depth > 0]  # the in-memory statistics: torch's mean and (Bessel-corrected) std
    assert [t.item() for t in dp.depth_statistics(moments)] == pytest.approx([valid.mean().item(), valid.std().item()],
                                                                             rel=1e-6)


def test_depth_statistics_from_streamed_moments():
    """Sums over batches of uneven size give torch's mean and std of all valid pixels; no valid pixel is an error."""
    generator = torch.Generator().manual_seed(0)
    depth = torch.rand(7, 5, 6, generator=generator) * 9 * (torch.rand(7, 5, 6, generator=generator) > 0.3)
    moments = sum(dp.depth_moments(depth[i:j]) for i, j in [(0, 1), (1, 5), (5, 7)])
    valid = depth[depth > 0]
    assert moments[0] == valid.numel()
    assert [t.item() for t in dp.depth_statistics(moments)] == pytest.approx([valid.mean().item(), valid.std().item()],
                                                                             rel=1e-6)
    with pytest.raises(ManifestError, match="no valid depth pixel"):
        dp.depth_statistics(dp.depth_moments(torch.zeros(2, 3, 3)))


def test_probe_epochs_are_seeded_permutations_in_whole_batches():
    """Epoch e: np.random.default_rng([seed, e]).permutation(n) cut into batches (each sorted); the n mod B left over
    sit that epoch out; a batch larger than the set is the whole set."""
    batches = [b.tolist() for b in itertools.islice(dp.epoch_batches(7, 3, seed=5), 5)]
    epochs = [np.random.default_rng([5, epoch]).permutation(7) for epoch in range(3)]
    assert batches == [sorted(epochs[0][:3]), sorted(epochs[0][3:6]), sorted(epochs[1][:3]), sorted(epochs[1][3:6]),
                       sorted(epochs[2][:3])]
    assert [b.tolist() for b in itertools.islice(dp.epoch_batches(2, 8, seed=0), 2)] == [[0, 1], [0, 1]]


@pytest.mark.parametrize("finetune", [False, True])
def test_a_probe_holds_records_and_encodes_one_batch_at_a_time(tmp_path, monkeypatch, finetune):
    """The datasets hold manifest records, no tensor; the encoder sees one image (its width), then batches of at most
    EVAL_BATCH (3 here: the frozen cache, the test set) or --probe-batch-size (fine-tuning); frozen tokens go to a
    memory-mapped file in a folder of the run, removed when the probe ends."""
    records = tiny_probe_world(tmp_path, count=7)
    monkeypatch.setattr(dp, "EVAL_BATCH", 3)
    seen, cached = [], []
    patch_tokens, cache_frozen = dp.patch_tokens, dp.cache_frozen
    monkeypatch.setattr(dp, "patch_tokens", lambda visual, images: seen.append(len(images)) or
                        patch_tokens(visual, images))
    monkeypatch.setattr(dp, "cache_frozen", lambda *a: cached.append(cache_frozen(*a)) or cached[-1])
    out = tmp_path / "run"
    args = cq.Args(num_classes=4, probe_steps=3, probe_batch_size=2, finetune=finetune, out=str(out))
    model, preprocess = dp.create_random(MICRO, False, seed=1)
    train_set, test_set = probe_sets(args, {"probe_train": records, "probe_test": records[2:]}, preprocess,
                                        ("seg", "depth"))
    for dataset, subset in [(train_set, records), (test_set, records[2:])]:
        assert dataset.records == subset
        assert not [v for v in vars(dataset).values() if isinstance(v, (torch.Tensor, np.ndarray))]
    metrics = dp.train_and_evaluate_probe(model.visual, train_set, test_set, settings(args), seed=0)
    assert set(metrics) == {"mIoU", "mAcc", "aAcc", "depth_RMSE"}
    assert seen == [1, *([2, 2, 2] if finetune else [3, 3, 1]), 3, 2]  # then the 5 test images
    if finetune:
        assert cached == []  # the tokens of a trained encoder are recomputed at every step
    else:
        (cache, _), = cached
        assert isinstance(cache["tokens"], np.memmap) and cache["tokens"].shape[0] == 7
        assert Path(cache["tokens"].filename).parent.parent == out
    assert list(out.iterdir()) == []


# ---- stages end to end -----------------------------------------------------------------------

def test_pretrain_probe_attention_stages(tmp_path):
    """The stages chained through OUT: pretrain saves one checkpoint per regime, probe finds them all, attention
    measures each on the world's first test images, equal to a by-hand computation from the saved weights."""
    out = str(tmp_path / "run")
    rows = cq.main(["pretrain", "--out", out, "--regimes", "datacomp", "datacompdr", *TINY])["pretrain"]
    saved = [str(tmp_path / "run" / "pretrain" / f"{regime}-seed0.pt") for regime in ("datacomp", "datacompdr")]
    assert [r["checkpoint"] for r in rows] == saved
    assert json.loads((tmp_path / "run" / "pretrain.json").read_text()) == rows
    probe = cq.main(["probe", "--out", out, *TINY])["probe"]
    assert [(r["checkpoint"], r["label"]) for r in probe] == [(saved[0], "datacomp-n48-seed0"),
                                                              (saved[1], "datacompdr-n48-seed0")]
    assert json.loads((tmp_path / "run" / "probe.json").read_text()) == probe
    argv = ["attention", "--out", out, *TINY]
    attention = cq.main(argv)["attention"]
    assert list(attention) == ["datacomp-n48-seed0", "datacompdr-n48-seed0"]
    images = cq.world_records(cq.tyro.cli(cq.Args, args=argv), ("images",))["images"][:4]
    for label, checkpoint in zip(attention, saved):
        _, model, preprocess = dp.load_model_spec(checkpoint)
        pixels = preprocess_images(images, preprocess)
        expected = by_hand_attention_distance(model, pixels, 16)
        assert np.allclose(attention[label]["per_layer_per_head_px"], expected, rtol=1e-5), label
        each = [by_hand_attention_distance(model, pixels[i:i + 1], 16)[-1].mean() for i in range(len(pixels))]
        assert np.allclose(attention[label]["per_image_last_layer_px"], each, rtol=1e-5), label  # in image order
    assert (tmp_path / "run" / "attention.png").stat().st_size > 0


def test_efficiency_subsets_are_nested_prefixes_with_one_schedule(tmp_path, monkeypatch):
    """Default 10% and 100% (the paper's 10x): the first round(f N) images, the same TrainConfig for each subset
    and seed, each checkpoint probed with its seed; a full-set run already done is reused, not retrained."""
    from common.clip_train import TrainConfig

    manifest = write_probe_manifest(tmp_path / "data", "d", count=20)
    records, columns = read_manifest(manifest), index_data(manifest)
    trained, probed, plotted = [], [], []
    monkeypatch.setattr(cq, "train_clip", lambda model, tok, images, texts_for, cfg, **kw: trained.append(
        (images, kw["rows"], cfg)) or {"history": [{"loss": 0.5}], "train_seconds": 0.0})
    monkeypatch.setattr(cq, "run_probe", lambda args, records, checkpoints: probed.append(
        (list(cq.seed_range(args)), checkpoints)) or [{"mIoU": float(len(probed)), "mAcc": 1.0, "aAcc": 2.0,
                                                      "depth_RMSE": 3.0}])
    # matplotlib takes seconds
    monkeypatch.setattr(miniature, "plot_efficiency", lambda rows, path: plotted.append((rows, path)))
    train = TrainConfig(steps=7, batch_size=4, warmup=1)
    args = cq.Args(out=str(tmp_path / "run"), model=MICRO, regimes=("datacompdr",), seed=5, seeds=2, train=train)
    done = [{"regime": "datacompdr", "seed": 5, "train_images": 20, "checkpoint": "full.pt", "final_loss": 1.0}]
    rows = cq.run_efficiency(args, {"train": columns, "test": records[:4]}, done=done)
    saved = [str(tmp_path / f"run/efficiency/datacompdr-n{n}-seed{seed}.pt") for n, seed in [(2, 5), (2, 6), (20, 6)]]
    assert [(r["seed"], r["train_images"], r["checkpoint"], r["mIoU"]) for r in rows] == \
        [(5, 2, saved[0], 1.0), (5, 20, "full.pt", 2.0), (6, 2, saved[1], 3.0), (6, 20, saved[2], 4.0)]
    assert rows[1] == {**done[0], "mIoU": 2.0, "mAcc": 1.0, "aAcc": 2.0, "depth_RMSE": 3.0}  # the probe's metrics
    assert probed == [([5], [saved[0]]), ([5], ["full.pt"]), ([6], [saved[1]]), ([6], [saved[2]])]
    # pretrained here: 10% of seed 5, 10% and 100% of seed 6; the first images, each seed's schedule
    full = preprocess_images(records, create_clip(MICRO)[1])
    assert [(rows.tolist(), cfg) for _, rows, cfg in trained] == \
        [([0, 1], cq.dataclasses.replace(train, seed=5)), ([0, 1], cq.dataclasses.replace(train, seed=6)),
         (list(range(20)), cq.dataclasses.replace(train, seed=6))]
    assert all(torch.equal(images, full) for images, _, _ in trained)  # decoded once, indexed by row
    rows = cq.run_efficiency(cq.dataclasses.replace(args, seeds=1, subset_fractions=(0.25,)),
                             {"train": columns, "test": records[:4]})
    assert [r["train_images"] for r in rows] == [5] and trained[-1][1].tolist() == list(range(5))
    # a full-set run's probe row from the probe stage is reused too (the same checkpoint), not probed again
    before = len(probed)
    probe_rows = [{"checkpoint": "other.pt", "probe_seed": 5, "mIoU": 41.0, "mAcc": 1.0, "aAcc": 2.0,
                   "depth_RMSE": 3.0},
                  {"checkpoint": "full.pt", "probe_seed": 0, "mIoU": 42.0, "mAcc": 1.0, "aAcc": 2.0, "depth_RMSE": 3.0}]
    rows = cq.run_efficiency(cq.dataclasses.replace(args, seeds=1, subset_fractions=(1.0,)),
                             {"train": columns, "test": records[:4]}, done=done, probed=probe_rows)
    assert [r["mIoU"] for r in rows] == [42.0] and len(probed) == before
    # by default only DataCompDR trains on the smaller subsets; DataComp only on the largest, the claim's reference
    both = cq.dataclasses.replace(args, seeds=1, regimes=("datacomp", "datacompdr"))
    assert both.efficiency_regimes == ("datacompdr",)
    full = [{**done[0], "regime": regime, "checkpoint": f"{regime}.pt"} for regime in both.regimes]
    rows = cq.run_efficiency(both, {"train": columns, "test": records[:4]}, done=full)
    assert [(r["regime"], r["train_images"]) for r in rows] == [("datacomp", 20), ("datacompdr", 2), ("datacompdr", 20)]
    assert trained[-1][1].tolist() == [0, 1] and len(trained) == 5  # one pretraining: DataCompDR on 2 images
    assert json.loads((tmp_path / "run/efficiency.json").read_text()) == rows
    assert plotted[-1] == (rows, tmp_path / "run/efficiency.png")


@pytest.mark.slow
def test_efficiency_stage(tmp_path):
    rows = cq.main(["efficiency", "--out", str(tmp_path), "--subset-fractions", "0.5", "1.0", *TINY,
                    "--regimes", "datacompdr"])["efficiency"]  # half of 48: the smallest subset filling a batch of 16
    assert [r["train_images"] for r in rows] == [24, 48] and all(r["regime"] == "datacompdr" for r in rows)
    assert (tmp_path / "efficiency.png").exists() and (tmp_path / "efficiency.json").exists()


def test_smoke_preset_runs_every_stage_and_writes_the_report(tmp_path):
    results = cq.main(["--preset", "smoke", "--out", str(tmp_path)])  # the header's first command
    text = (tmp_path / "results.md").read_text()
    assert "| datacomp |" in text and "| datacompdr |" in text and "| random init |" in text
    # one verdict rule: reproduce.py judges the claims (results/claims.md); the report only measures
    assert "judged from these runs by reproduce.py" in text
    assert not any(word in text for word in ("held", "reversed", "within seed spread", "no verdict", "caveat"))
    assert json.loads((tmp_path / "results.json").read_text())["probe"] == results["probe"]
    # the full-set efficiency runs are the pretraining runs, reused; attention: the seed-0 models and an untrained one
    assert [r["checkpoint"] for r in results["efficiency"] if r["train_images"] == 48] == \
        [r["checkpoint"] for r in results["pretrain"]]
    assert list(results["attention"]) == ["datacomp-n48-seed0", "datacompdr-n48-seed0", f"{MICRO} (random init)"]
    assert {p.name for p in tmp_path.iterdir()} >= {"results.md", "results.json", "attention.png", "efficiency.png",
                                                    "baselines.json"}
    # the no-encoder floors are rows of the dense table, with the numbers of results.json
    baselines = results["baselines"]
    assert f"| (no encoder) class 0 at every pixel | - | - | - | - | {baselines['majority_class_mIoU']:.2f} |" in text
    assert (f"| (no encoder) each pixel's mean training depth | - | - | - | - | - | - | "
            f"{baselines['position_only_depth_RMSE']:.2f} |") in text


def test_attention_runs_over_every_seeds_models(tmp_path, monkeypatch):
    """The locality claim is judged over models: the miniature run measures every seed's checkpoint of each regime
    (and one untrained model), not only the first seed's."""
    measured = []
    monkeypatch.setattr(cq, "run_attention", lambda args, records, specs: measured.append(specs) or {})
    monkeypatch.setattr(miniature, "report_text", lambda *a: "")
    cq.main(["--preset", "smoke", "--out", str(tmp_path), "--seeds", "2", "--probe-steps", "1"])
    regimes_seeds = [(regime, seed) for seed in (0, 1) for regime in ("datacomp", "datacompdr")]
    saved = [str(tmp_path / "pretrain" / f"{regime}-seed{seed}.pt") for regime, seed in regimes_seeds]
    assert measured == [saved + [MICRO]]


def test_attention_plot_groups_each_regimes_models():
    """The attention plot has one panel per regime, holding every seed's model of it; other models stand alone."""
    def attention(datacomp_lasts, datacompdr_lasts):  # per regime, each seed's model's last-layer head distances
        return {f"{regime}-n5000-seed{seed}": {"per_layer_per_head_px": [[0.0, 0.0], last], "uniform_px": 33.3}
                for regime, lasts in [("datacomp", datacomp_lasts), ("datacompdr", datacompdr_lasts)]
                for seed, last in enumerate(lasts)} | {
                    "mini-ViT-8 (random init)": {"per_layer_per_head_px": [[1.0], [1.0]]}}
    assert miniature.attention_by_group(attention([[1, 1]] * 2, [[1, 1]])) == {
        "datacomp": ["datacomp-n5000-seed0", "datacomp-n5000-seed1"], "datacompdr": ["datacompdr-n5000-seed0"],
        "mini-ViT-8 (random init)": ["mini-ViT-8 (random init)"]}


def test_args_defaults_are_the_papers_choices():
    args = cq.Args()
    assert args.regimes == ("datacomp", "datacompdr")  # the paper's comparison: web only vs web + synthetic
    assert args.subset_fractions == (0.1, 1.0)  # Sec. 3.3: DataCompDR matches DataComp on 10x less data
    assert args.attention_images == 128  # ViT paper (Dosovitskiy et al. 2021), App. D.7: 128 images
    assert args.ignore_index == 255 and not args.reduce_zero_label  # mmseg: 255 ignored; ADE20k raw needs the flag
    assert args.task == "each"  # the paper fine-tunes one model per dense task
    assert not args.finetune  # Deviation 2: a frozen (linear) probe by default; the paper fine-tunes (--finetune)
    assert (args.real_field, args.synthetic_field) == ("alt_text", "synthetic_captions")  # the project's names
    assert (args.swap_probability, args.probe_steps, args.probe_lr, args.finetune_lr) == (0.5, 300, 3e-3, 1e-4)  # ours
    # MobileCLIP's DataCompDR: 5 captions per image from open_clip's COCO-fine-tuned CoCa
    # (apple/ml-mobileclip-dr gen.py)
    assert (args.captioner, args.num_synthetic) == ("coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k", 5)


def test_kernel_flag_names_the_missing_module(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "caption_kernels.contrastive", None)
    message = r"^--kernel torch needs caption_kernels/contrastive\.py \(.*\); use --kernel none$"
    with pytest.raises(ImportError, match=message):
        cq.loss_function("torch")


# ---- probe protocol: labels, tasks, the random baseline ---------------------------------------

def write_probe_manifest(folder, name, masks=None, depth_mm=None, size=(40, 48), count=None):
    """A manifest of noise images with captions and, if given, hand-made class-id and uint16-millimetre PNGs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    count = count or len(masks if masks is not None else depth_mm)
    rng = np.random.default_rng(len(name))
    records = []
    for i in range(count):
        record = {"id": f"{name}{i}", "image": f"{name}{i}.png", "alt_text": f"scene {i}", "caption": f"picture {i}",
                  "synthetic_captions": [f"a photo of scene {i}", f"scene number {i}"]}
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / record["image"])
        if masks is not None:
            record["mask"] = f"{name}{i}-mask.png"
            Image.fromarray(np.asarray(masks[i], np.uint8)).save(folder / record["mask"])
        if depth_mm is not None:
            record["depth"] = f"{name}{i}-depth.png"
            Image.fromarray(np.asarray(depth_mm[i], np.uint16)).save(folder / record["depth"])
        records.append(record)
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def ade_style_masks(count, size=(40, 48)):
    """Raw ADE20k convention: 0 = `other` (top rows), 150 = the last class elsewhere, 255 in one corner."""
    masks = np.full((count, *size), 150, np.uint8)
    masks[:, :10] = 0
    masks[:, -3:, -3:] = 255
    return masks


def test_reduce_zero_label_is_mmsegs():
    raw = np.array([0, 1, 2, 150, 255, 254], dtype=np.uint8)
    # mmseg LoadAnnotations(reduce_zero_label=True), on the uint8 map as mmseg does it
    expected = raw.copy()
    expected[expected == 0] = 255
    expected = expected - 1
    expected[expected == 254] = 255
    assert dp.reduce_zero_label(raw.astype(np.int64)).tolist() == expected.astype(np.int64).tolist()


PROBE_FAST = ["--probe-steps", "2", "--probe-batch-size", "2", "--probe-train-images", "0"]


def test_labels_outside_the_classes_are_an_error_naming_the_file(tmp_path):
    """Raw ADE20k (0 = other, 1..150) with --num-classes 150 used to score label 150 as ignored and 0 as a class."""
    train = write_probe_manifest(tmp_path, "train", masks=ade_style_masks(2))
    test = write_probe_manifest(tmp_path, "val", masks=ade_style_masks(2))
    argv = ["probe", "--out", str(tmp_path / "run"), "--checkpoints", "random", "--model", MICRO,
            "--probe-train-manifest", train, "--probe-test-manifest", test, "--num-classes", "150", *PROBE_FAST]
    with pytest.raises(ManifestError, match=r"train0-mask\.png.*\[150\].*--reduce-zero-label"):
        cq.main(argv)
    row = cq.main([*argv, "--reduce-zero-label", "--probe-lr", "0.5"])["probe"][0]  # 0 -> ignore, 150 -> 149: valid
    # 149 is the only labelled class: the probe learns it (argmax of its logits) and scores 100 on every metric
    assert (row["mIoU"], row["mAcc"], row["aAcc"]) == (100.0, 100.0, 100.0)
    small = write_probe_manifest(tmp_path, "small", masks=np.full((2, 40, 48), 7, np.uint8))
    with pytest.raises(ManifestError, match=r"small0-mask\.png.*\[7\] are outside 0\.\.5"):
        cq.main(["probe", "--out", str(tmp_path / "run"), "--checkpoints", "random", "--model", MICRO,
                 "--probe-train-manifest", small, "--probe-test-manifest", small, *PROBE_FAST])


def probe_world_args(tmp_path):
    return ["probe", "--out", str(tmp_path), "--checkpoints", "random", *TINY, "--probe-steps", "2"]


def test_each_task_gets_its_own_probe_and_joint_sums_the_losses(tmp_path):
    """The default probes segmentation and depth separately (each from the untouched encoder); --task joint shares."""
    run = lambda *extra: cq.main([*probe_world_args(tmp_path), "--finetune", *extra])["probe"][0]  # noqa: E731
    each, seg, depth, joint = run(), run("--task", "seg"), run("--task", "depth"), run("--task", "joint")
    assert "depth_RMSE" not in seg and "mIoU" not in depth
    assert {k: each[k] for k in ("mIoU", "mAcc", "aAcc")} == {k: seg[k] for k in ("mIoU", "mAcc", "aAcc")}
    assert each["depth_RMSE"] == depth["depth_RMSE"]  # the depth probe did not start from the seg-tuned encoder
    assert joint["depth_RMSE"] != each["depth_RMSE"]  # one head, one encoder, the two losses summed


def test_probe_plan_refuses_a_task_the_manifests_lack():
    args = cq.Args(task="seg")
    records = {"probe_train": [{"id": "a", "depth": "a.png"}], "probe_test": [{"id": "b", "depth": "b.png"}]}
    with pytest.raises(ManifestError, match=r"--task seg needs \['mask'\]"):
        dp.probe_plan(records["probe_train"], records["probe_test"], args.task)
    assert dp.probe_plan(records["probe_train"], records["probe_test"], cq.Args().task) == [("depth",)]
    with pytest.raises(ManifestError, match="probe train manifest carries 'mask'"):
        dp.probe_plan([{"id": "a", "mask": "a.png"}], [{"id": "b"}], cq.Args().task)


def test_depth_probe_rmse_on_a_hand_made_case(tmp_path):
    """Train depth 0.5 m wherever valid (a band of 0 = invalid); test 1.5 m, and 2.5 m with half the pixels invalid:
    RMSE = (1 + 2) / 2 m (mm read, 0 skipped in the statistics and the metric, per image then averaged over images;
    pooled over pixels it would be about 1.41 m)."""
    train_depth = np.full((3, 40, 48), 500, np.uint16)
    train_depth[:, :, :12] = 0
    test_depth = np.full((2, 40, 48), 1500, np.uint16)
    test_depth[1] = 2500
    test_depth[1, :, :24] = 0
    train = write_probe_manifest(tmp_path, "train", depth_mm=train_depth)
    test = write_probe_manifest(tmp_path, "val", depth_mm=test_depth)
    row = cq.main(["probe", "--out", str(tmp_path / "run"), "--checkpoints", "random", "--model", MICRO,
                   "--probe-train-manifest", train, "--probe-test-manifest", test, *PROBE_FAST])["probe"][0]
    assert set(row) & {"mIoU", "depth_RMSE"} == {"depth_RMSE"}
    assert row["depth_RMSE"] == pytest.approx(1.5, abs=1e-4)


def test_trivial_baselines_by_hand(tmp_path):
    """The no-encoder floors on 16x16 label maps (no resize): the training masks' majority class (ignored pixels not
    counted) at every test pixel, and each pixel's mean valid training depth (a pixel never valid: the mean of all
    valid pixels), scored as the probes are (mmseg mIoU / mAcc, per-image RMSE then the mean over images)."""
    train_masks = np.zeros((2, 16, 16), np.uint8)
    train_masks[0, :8], train_masks[0, 8:] = 255, 2  # 128 ignored pixels: more than class 2 has in this image
    train_masks[1, :13], train_masks[1, 13:] = 1, 2  # class 1: 208 pixels, class 2: 176, class 0: none
    test_masks = np.zeros((1, 16, 16), np.uint8)
    test_masks[0, :8] = 1
    train_depth = np.full((2, 16, 16), 1000, np.uint16)
    train_depth[0, :, 15] = 0  # column 15 is never valid in training
    train_depth[1, :, :8], train_depth[1, :, 8:] = 3000, 0
    test_depth = np.full((2, 16, 16), 2000, np.uint16)
    test_depth[1, :, :8], test_depth[1, :, 8:] = 4000, 0
    args = settings(cq.Args(num_classes=3, out=str(tmp_path)))
    sets = []
    for name, masks, depth in [("train", train_masks, train_depth), ("test", np.repeat(test_masks, 2, 0), test_depth)]:
        records = read_manifest(write_probe_manifest(tmp_path, name, masks=masks, depth_mm=depth, size=(16, 16)))
        sets.append(dp.ProbeDataset(records, None, 16, args, ("mask", "depth")))
    baselines = dp.trivial_baselines(*sets, ("seg", "depth"), args)
    # class 1 everywhere: IoU_1 = 256 / (256 + 256 false positives), IoU_0 = 0, class 2 absent; Acc_1 = 1, Acc_0 = 0
    assert baselines["majority_class"] == 1
    assert baselines["majority_class_mIoU"] == pytest.approx(25.0)
    assert baselines["majority_class_mAcc"] == pytest.approx(50.0)
    # mean training depth: columns 0-7 (1 + 3) / 2 = 2 m, columns 8-14 1 m, column 15 (240 x 1 + 128 x 3) / 368 m
    column_15 = (240 * 1.0 + 128 * 3.0) / 368
    first = math.sqrt((16 * 7 * 1.0 ** 2 + 16 * (2 - column_15) ** 2) / 256)  # 2 m everywhere
    second = 2.0  # 4 m on columns 0-7, the rest invalid
    assert baselines["position_only_depth_RMSE"] == pytest.approx((first + second) / 2, rel=1e-6)
    assert baselines["per_item"]["position_only_depth_RMSE"] == pytest.approx([first, second], rel=1e-6)
    shares = baselines["per_item"]["majority_class_mIoU"]  # per test image: [TP, predicted, labelled] per class
    assert len(shares) == 2 and np.sum(shares, axis=0).tolist() == [[0, 256, 0], [0, 512, 0], [256, 256, 0]]
    assert dp.trivial_baselines(*sets, ("depth",), args).keys() == {"position_only_depth_RMSE", "per_item"}


def test_random_baseline_takes_the_checkpoints_architecture(tmp_path, monkeypatch):
    """`random` next to micro-ViT-16 checkpoints is a micro-ViT-16, whatever --model says; mixed ones are refused."""
    from common.clip_train import save_checkpoint

    micro = str(save_checkpoint(tmp_path / "micro.pt", {"state_dict": create_clip(MICRO)[0].state_dict(),
                                                        "model": MICRO}))
    built = []
    probe = dp.train_and_evaluate_probe
    monkeypatch.setattr(dp, "train_and_evaluate_probe", lambda visual, *a: built.append(
        (type(visual), visual.patch_size, visual.image_size, visual.transformer.width)) or probe(visual, *a))
    argv = probe_world_args(tmp_path)
    rows = cq.main([*argv, "--checkpoints", micro, "random", "--model", "mini-ViT-8"])["probe"]
    assert built[-1] == built[0] and built[0][1:] == ((16, 16), (64, 64), 32)  # what was probed, not only its name
    assert rows[1]["architecture"] == MICRO and rows[1]["label"] == f"{MICRO} (random init)"
    mini = str(save_checkpoint(tmp_path / "mini.pt", {"state_dict": create_clip("mini-ViT-8")[0].state_dict(),
                                                      "model": "mini-ViT-8"}))
    with pytest.raises(ValueError, match=r"micro\.pt: micro-ViT-16, .*mini\.pt: mini-ViT-8"):
        cq.main([*argv, "--checkpoints", micro, mini, "random"])


def test_probe_sets_follow_each_models_preprocessing(tmp_path, monkeypatch):
    """Two encoders of one input size but different normalisation each decode the probe images their own way."""
    import torchvision.transforms as T

    def load_model_spec(spec, device="cpu"):
        model, preprocess, _ = create_clip(MICRO)
        if spec.endswith("@halved"):  # a second "tag" of the same architecture, with its own normalisation
            preprocess = T.Compose([*preprocess.transforms, T.Normalize(0.0, 2.0)])
        return spec, model, preprocess

    seen = {}
    monkeypatch.setattr(dp, "load_model_spec", load_model_spec)
    monkeypatch.setattr(dp, "train_and_evaluate_probe",
                        lambda visual, train_set, *a: (seen.setdefault(len(seen), train_set[0]["image"]), {})[1])
    monkeypatch.setattr(dp, "probe_plan", lambda *a: [("seg",)], raising=False)
    cq.main([*probe_world_args(tmp_path), "--checkpoints", MICRO, f"{MICRO}@halved"])
    assert torch.allclose(seen[1], seen[0] / 2)


def test_only_the_pretrain_and_attention_stages_run_under_torchrun(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="the probe stage has no multi-process path"):
        cq.main(["probe", "--out", str(tmp_path), *TINY])
    with pytest.raises(ValueError, match="under torchrun pass --kernel auto"):
        cq.loss_function("none", distributed=True)


def test_pretrain_from_webdataset_shards_under_torchrun_equals_one_process(tmp_path):
    """The header's real pretraining command at tiny size: DataCompDR from webdataset shards (a brace pattern),
    torchrun with 2 gloo ranks and a DataLoader worker each: the losses and weights of one process."""
    from common.data import write_webdataset_shard

    world = ensure_world(WorldConfig(n_train=48, n_val=4, n_test=16), tmp_path / "world")
    train = read_manifest(world / "train.jsonl")
    for shard in range(2):
        write_webdataset_shard(tmp_path / f"shards/{shard:03d}.tar",
                               [{**r, "image": Image.open(world / r["image"]).convert("RGB")}
                                for r in train[shard * 24:(shard + 1) * 24]])
    argv = ["pretrain", "--model", MICRO, "--train-manifest", str(tmp_path / "shards/{000..001}.tar"),
            "--test-manifest", str(world / "test.jsonl"), "--kernel", "torch", "--regimes", "datacompdr",
            "--train.steps", "3", "--train.batch-size", "16", "--train.warmup", "1", "--train.workers", "1"]
    one = cq.main([*argv, "--out", str(tmp_path / "one")])["pretrain"]
    run_torchrun("clip_quality.py", [*argv, "--out", str(tmp_path / "two")])
    two = json.loads((tmp_path / "two" / "pretrain.json").read_text())
    assert two[0]["final_loss"] == pytest.approx(one[0]["final_loss"], abs=1e-5)
    assert two[0]["i2t_R@1"] == pytest.approx(one[0]["i2t_R@1"])
    a, b = (torch.load(tmp_path / run / "pretrain" / "datacompdr-seed0.pt", weights_only=True)["state_dict"]
            for run in ("one", "two"))
    assert_same_weights(a, b)


# ---- real architectures at tiny width (the header's and docs' commands), offline ---------------

def no_world(*_):
    raise AssertionError("the miniature world was built although every manifest was given")


def test_real_pretrain_and_probe_commands_on_vit_b16(tmp_path, monkeypatch):
    """`pretrain --model ViT-B-16 --kernel auto` then `probe --checkpoints *.pt random --finetune --num-classes 150
    --reduce-zero-label`, ViT-B-16's classes and flags at tiny width; the probe's mIoU on a hand-made ADE case."""
    _, reference = serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-16")
    monkeypatch.setattr(world_manifests, "ensure_world", no_world)
    dcdr = write_probe_manifest(tmp_path / "dcdr", "dcdr", count=6)
    out = str(tmp_path / "run")
    rows = cq.main(["pretrain", "--model", "ViT-B-16", "--train-manifest", dcdr, "--test-manifest", dcdr, "--kernel",
                    "auto", "--regimes", "datacomp", "datacompdr", "--train.steps", "2", "--train.batch-size", "4",
                    "--train.warmup", "1", "--out", out])["pretrain"]
    checkpoints = [r["checkpoint"] for r in rows]
    assert [c.rsplit("/", 1)[1] for c in checkpoints] == ["datacomp-seed0.pt", "datacompdr-seed0.pt"]
    payload = torch.load(checkpoints[1], weights_only=True)
    assert payload["model"] == "ViT-B-16" and payload["state_dict"].keys() == reference.state_dict().keys()
    assert all(payload["state_dict"][k].shape == v.shape for k, v in reference.state_dict().items())
    label, model, preprocess = dp.load_model_spec(checkpoints[1])
    assert model.visual.patch_size == (16, 16) and model.visual.image_size == (224, 224)
    untrained, _ = dp.create_random("ViT-B-16", False, seed=0)
    assert not torch.equal(model.visual.conv1.weight, untrained.visual.conv1.weight)  # trained, then saved
    # the row's retrieval is that of the saved weights
    test = read_manifest(dcdr)
    img_emb = encode_images(model, preprocess_images(test, preprocess))
    txt_emb = encode_texts(model, open_clip.get_tokenizer("ViT-B-16"), [r["caption"] for r in test])
    assert rows[1]["i2t_R@1"] == retrieval_metrics(img_emb, txt_emb)["i2t_R@1"]

    train = write_probe_manifest(tmp_path / "ade", "train", masks=ade_style_masks(3))
    val = write_probe_manifest(tmp_path / "ade", "val", masks=ade_style_masks(2))
    built = []
    probe_one = dp.train_and_evaluate_probe
    monkeypatch.setattr(dp, "train_and_evaluate_probe", lambda visual, *a: built.append(
        (type(visual), visual.patch_size, visual.image_size, visual.transformer.width,
         type(visual.transformer.resblocks[0].mlp.gelu))) or probe_one(visual, *a))
    argv = ["probe", "--out", out, "--checkpoints", *checkpoints, "random", "--finetune", "--probe-train-manifest",
            train, "--probe-test-manifest", val, "--num-classes", "150", "--probe-steps", "5", "--probe-lr", "0.2",
            "--probe-batch-size", "1"]
    with pytest.raises(ManifestError, match="--reduce-zero-label"):
        cq.main(argv)
    probe = cq.main([*argv, "--reduce-zero-label"])["probe"]
    assert [r["architecture"] for r in probe] == ["ViT-B-16"] * 3 and probe[2]["label"] == "ViT-B-16 (random init)"
    assert built[-1] == built[0]
    # hand-made case: 0 (other) is ignored, 150 is class 149, the only one: a probe predicting it scores 100
    assert [(r["mIoU"], r["mAcc"], r["aAcc"]) for r in probe] == [(100.0, 100.0, 100.0)] * 3


def by_hand_attention_distance(model, images, patch):
    """(layers, heads) mean attention distance, from the block weights (softmax(QK^T/sqrt d)), in numpy."""
    visual = model.visual.eval()
    grid = images.shape[-1] // patch
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    distance = np.hypot(patch * (rows[:, None] - rows[None]), patch * (cols[:, None] - cols[None]))  # (P, P)
    out = []
    with torch.no_grad():
        x = visual._embeds(images)  # (B, 1 + P, D)
        for block in visual.transformer.resblocks:
            y = block.ln_1(x)
            q, k, _ = (y @ block.attn.in_proj_weight.t() + block.attn.in_proj_bias).chunk(3, dim=-1)
            heads = block.attn.num_heads
            split = lambda t: t.reshape(len(images), t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
            attn = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(split(q).shape[-1]), -1).numpy()
            out.append([(attn[:, h, 1:, 1:] * distance).sum(-1).mean() for h in range(heads)])
            x = block(x)
    return np.array(out)


def serve_tags(monkeypatch, tmp_path, name, tags):
    """serve_open_clip_tag for several tags of one architecture at once: {tag: reference model}."""
    downloads, references = [], {}
    for seed, tag in enumerate(tags, start=1):
        _, references[tag] = serve_open_clip_tag(monkeypatch, tmp_path, name, tag, seed=seed)
        downloads.append(open_clip.pretrained.hf_hub_download)

    def hf_hub_download(repo_id, filename, *args, **kwargs):
        for download in downloads:
            try:
                return download(repo_id, filename, *args, **kwargs)
            except FileNotFoundError:
                continue
        raise FileNotFoundError(f"test cache holds no repository {repo_id}")

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hf_hub_download)
    return references


def tag_images(folder, count=3):
    path = write_probe_manifest(folder, "img", size=(240, 300), count=count)
    return path, read_manifest(path)


def test_real_attention_command_on_two_tags_and_a_checkpoint(tmp_path, monkeypatch):
    """`attention --attention-models ViT-B-16@datacomp_xl_s13b_b90k ViT-B-16@laion2b_s34b_b88k <ckpt>` equals a
    by-hand computation on each model's own weights and its tag's preprocessing."""
    from common.clip_train import save_checkpoint

    tags = ["datacomp_xl_s13b_b90k", "laion2b_s34b_b88k"]
    references = serve_tags(monkeypatch, tmp_path, "ViT-B-16", tags)
    monkeypatch.setattr(world_manifests, "ensure_world", no_world)
    references["ckpt"] = create_clip("ViT-B-16", seed=7)[0]
    checkpoint = str(save_checkpoint(tmp_path / "datacompdr-seed0.pt", {
        "state_dict": references["ckpt"].state_dict(), "model": "ViT-B-16", "label": "datacompdr-n6-seed0"}))
    images, records = tag_images(tmp_path / "img")
    specs = [f"ViT-B-16@{tag}" for tag in tags] + [checkpoint]
    results = cq.main(["attention", "--attention-models", *specs, "--images-manifest", images,
                       "--out", str(tmp_path / "run")])["attention"]
    assert list(results) == specs[:2] + ["datacompdr-n6-seed0"]
    for (label, result), key in zip(results.items(), tags + ["ckpt"]):
        cfg = open_clip.get_pretrained_cfg("ViT-B-16", key) or {}
        preprocess = open_clip.image_transform(224, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
                                                  interpolation=cfg.get("interpolation", "bicubic"),
                                                  resize_mode=cfg.get("resize_mode", "shortest"))
        pixels = preprocess_images(records, preprocess)
        expected = by_hand_attention_distance(references[key], pixels, 16)
        assert result["grid"] == [14, 14] and result["images"] == 3
        assert np.allclose(result["per_layer_per_head_px"], expected, rtol=1e-5), label
    assert results[specs[0]] != results[specs[1]]


def test_openai_tag_is_built_with_its_quick_gelu(tmp_path, monkeypatch):
    """An OpenAI-weights tag (quick_gelu in its pretrained config) loads into a QuickGELU model, as trained."""
    references = serve_tags(monkeypatch, tmp_path, "ViT-B-32", ["openai"])
    label, model, _ = dp.load_model_spec("ViT-B-32@openai")
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), references["openai"].encode_image(pixels), atol=1e-5)
    assert dp.architecture("ViT-B-32@openai") == ("ViT-B-32", True)


def test_attention_under_torchrun_equals_one_process(tmp_path):
    """torchrun --nproc-per-node 2 (gloo) shards the images (3 + 2), all-reduces, rank 0 writes: = one process."""
    from common.clip_train import save_checkpoint

    checkpoint = str(save_checkpoint(tmp_path / "micro.pt", {"state_dict": create_clip(MICRO, seed=5)[0].state_dict(),
                                                             "model": MICRO, "label": "micro-trained"}))
    images, _ = tag_images(tmp_path / "img", count=5)
    argv = ["attention", "--attention-models", checkpoint, MICRO, "--images-manifest", images]
    single = cq.main([*argv, "--out", str(tmp_path / "one")])["attention"]
    output = run_torchrun("clip_quality.py", [*argv, "--out", str(tmp_path / "two")])
    assert "micro-trained: 3 of 5 images on rank 0 of 2" in output
    assert "micro-trained: 2 of 5 images on rank 1 of 2" in output
    ranks = json.loads((tmp_path / "two" / "attention.json").read_text())
    assert list(ranks) == list(single) and all(r["images"] == 5 for r in ranks.values())
    for label in single:
        assert np.allclose(ranks[label]["per_layer_per_head_px"], single[label]["per_layer_per_head_px"], rtol=1e-6)


def test_a_missing_checkpoint_is_named_before_any_probe_trains(tmp_path):
    message = r"^--checkpoints: .*missing\.pt: neither a checkpoint file nor an open_clip"
    with pytest.raises(FileNotFoundError, match=message):
        cq.main(["probe", "--out", str(tmp_path), "--checkpoints", "random", str(tmp_path / "missing.pt"), *TINY])
    assert not (tmp_path / "probe.json").exists()


# ---- nothing silently wrong: a diverged pretraining, a missing device, captions that are not text ---------


def test_a_diverged_pretraining_saves_no_checkpoint(tmp_path):
    """--train.lr inf: the first update's weights are NaN while its loss looks fine. The run saved them and reported
    R@1 = 100; now it stops naming the run and the step, and OUT/pretrain holds no checkpoint."""
    flags = dict(zip(TINY[::2], TINY[1::2])) | {"--train.steps": "1", "--train.warmup": "0", "--train.lr": "inf"}
    with pytest.raises(NonFiniteError, match=r"^pretrain datacomp-n48-seed0 at step 0 of 1, after its update"):
        cq.main(["pretrain", "--out", str(tmp_path), "--regimes", "datacomp", *itertools.chain(*flags.items())])
    assert not list((tmp_path / "pretrain").glob("*.pt"))


def test_device_cuda_without_cuda_is_not_blamed_on_the_tag(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="^--device cuda: CUDA is not available on this machine"):
        cq.main(["attention", "--attention-models", f"{MICRO}@laion2b_s34b_b88k", "--device", "cuda", "--out",
                 str(tmp_path), *TINY])


def test_captions_of_the_wrong_type_are_refused_naming_file_and_line(tmp_path):
    """A real caption that is a number passed check_captions (bool(5)) and reached the tokenizer; a test caption that
    is a list was scored as one. Both are errors naming the file and line."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"id": "a", "image": "x.png", "alt_text": "x", "synthetic_captions": ["y"]}\n'
                    '{"id": "b", "image": "x.png", "alt_text": 5, "synthetic_captions": ["y"]}\n')
    with pytest.raises(ManifestError, match=r"train.jsonl:2 \(id 'b'\): field 'alt_text' must be a string, got 5"):
        cq.check_captions(index_data(str(path)), np.arange(2), "alt_text", "synthetic_captions")
    test = tmp_path / "test.jsonl"
    test.write_text('{"id": "t", "image": "x.png", "caption": ["a", "b"]}\n')
    args = cq.Args(train_manifest=str(path), test_manifest=str(test))
    with pytest.raises(ManifestError, match=r"test.jsonl:1 \(id 't'\): field 'caption' must be a string"):
        cq.world_records(args, ("train", "test"))


def test_pretrain_writes_clip_benchmark_rows_of_each_saved_model(tmp_path):
    """--benchmark: every pretrained model goes to clip_benchmark, whose rows equal its rows on the saved weights;
    a missing set stops the stage before anything trains."""
    from common.benchmarks import MissingBenchmark, evaluate_benchmarks
    from test_benchmarks import write_stage_sets

    write_stage_sets(tmp_path / "sets")
    names = ["wds/colors", "wds/flickr30k"]
    flags = ["pretrain", "--regimes", "datacomp", "--benchmark-root", str(tmp_path / "sets" / "{name}"), *TINY]
    with pytest.raises(MissingBenchmark, match="wds_absent"):
        cq.main([*flags, "--benchmark", "wds/absent", "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none" / "pretrain").exists()
    row, = cq.main([*flags, "--benchmark", *names, "--out", str(tmp_path / "run")])["pretrain"]
    model, preprocess, tokenizer = create_clip(MICRO)
    model.load_state_dict(torch.load(row["checkpoint"], weights_only=True)["state_dict"])
    expected = evaluate_benchmarks(model.eval(), preprocess, tokenizer, names, str(tmp_path / "sets" / "{name}"),
                                   model_label=MICRO, pretrained=row["checkpoint"])
    same = lambda rows: json.dumps(rows) == json.dumps(expected)  # noqa: E731  (acc5 of 3 classes is NaN)
    assert same(row["benchmarks"])
    assert same([json.loads(line) for line in (tmp_path / "run" / "benchmarks.jsonl").read_text().splitlines()])


# ---- DataCompDR's synthetic captions (synthesize) ---------------------------------------------

COCA, COCA_TAG = "coca_ViT-L-14", "mscoco_finetuned_laion2b_s13b_b90k"
# apple/ml-mobileclip-dr scripts/gen.py: generate(images, generation_type="top_p", top_p=0.9, fixed_output_length=True),
# open_clip's defaults otherwise (seq_len 30, min_seq_len 5, temperature 1, repetition_penalty 1)
DATACOMPDR_SAMPLING = {"generation_type": "top_p", "top_p": 0.9, "temperature": 1.0, "seq_len": 30, "min_seq_len": 5,
                       "repetition_penalty": 1.0, "fixed_output_length": True}


def serve_tiny_coca(monkeypatch, tmp_path):
    """coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k offline: open_clip's CoCa class with every flag of the config
    at tiny width (realarch shrinks the towers; the text decoder, multimodal_cfg, is shrunk here too)."""
    shrink = realarch.tiny_open_clip_config

    def tiny(name):
        config = shrink(name)
        if "multimodal_cfg" in config:  # a CoCa's (other configs pass through)
            config["multimodal_cfg"].update(width=32, layers=2, heads=2)
        return config

    monkeypatch.setattr(realarch, "tiny_open_clip_config", tiny)
    return serve_open_clip_tag(monkeypatch, tmp_path, COCA, COCA_TAG)[1]


def image_manifest(folder, values=(None, None, None)):
    """Images (noise, or flat at a given value) with fields the stage must keep: (path, records)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, records = np.random.default_rng(0), []
    for i, value in enumerate(values):
        size = (40, 48, 3)
        array = rng.integers(0, 256, size, dtype=np.uint8) if value is None else np.full(size, value, np.uint8)
        Image.fromarray(array).save(folder / f"im{i}.png")
        records.append({"id": f"im{i}", "image": f"im{i}.png", "alt_text": f"web text {i}", "url": f"http://x/{i}.png",
                        "meta": {"width": 48, "tags": [i]}})
    path = folder / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path), records


def synthesize(tmp_path, data, *flags):
    """`clip_quality.py synthesize --captioner coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k`, written beside the
    images (so that their relative paths stay as they are)."""
    return cq.main(["synthesize", "--captioner", f"{COCA}@{COCA_TAG}", "--data", data,
                    "--out", str(Path(data).parent / "synth.jsonl"), *flags])["synthesize"]


def test_synthesize_writes_k_sampled_captions_per_image_keeps_every_field_and_completes_a_killed_run(tmp_path,
                                                                                                     monkeypatch):
    """The header's command on the real CoCa class: k captions per image, each the decoded text of one sampled row
    (gen.py's post-processing), sampled with DataCompDR's settings; a killed run (one line kept, the next cut
    mid-write) is completed without duplicates, in input order."""
    serve_tiny_coca(monkeypatch, tmp_path)
    data, records = image_manifest(tmp_path / "img")
    real_generate, calls = open_clip.CoCa.generate, []

    def generate(model, image, **kwargs):
        assert isinstance(model, open_clip.CoCa) and not model.training
        calls.append((len(image), kwargs, real_generate(model, image, **kwargs)))
        return calls[-1][2]

    monkeypatch.setattr(open_clip.CoCa, "generate", generate)
    counts = synthesize(tmp_path, data, "--num-synthetic", "2", "--gen-batch-size", "2")
    assert (counts["written"], counts["captions"], counts["degenerate"], counts["degenerate_dropped"]) == (3, 6, 0, 0)
    assert [n for n, _, _ in calls] == [4, 2]  # each image repeated k = 2 times in its batch's one call
    assert all(kwargs == DATACOMPDR_SAMPLING for _, kwargs, _ in calls)  # the sampling settings, pinned
    assert all(tokens.shape[1] == 30 for _, _, tokens in calls)  # fixed_output_length: every row seq_len tokens
    out = Path(data).parent / "synth.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    decoded = [coca.decode_caption(row) for _, _, tokens in calls for row in tokens]
    assert [c for row in rows for c in row["synthetic_captions"]] == decoded
    for row, record in zip(rows, records, strict=True):
        assert {key: row[key] for key in record} == record  # every input field kept
        assert len(row["synthetic_captions"]) == 2
        assert all(c and "<" not in c and "." not in c and degenerate_reason(c) is None
                   for c in row["synthetic_captions"])
    read_manifest(out, text_lists=("synthetic_captions",))  # what the pretrain stage reads

    first = out.read_text().splitlines()[0]
    out.write_text(first + "\n" + '{"id": "im1", "synthetic_capt')  # killed while writing the second line
    counts = synthesize(tmp_path, data, "--num-synthetic", "2", "--gen-batch-size", "2")
    assert (counts["already_done"], counts["written"]) == (1, 2) and calls[-1][0] == 4
    lines = out.read_text().splitlines()
    assert lines[0] == first and [json.loads(line)["id"] for line in lines] == ["im0", "im1", "im2"]


def test_synthesize_resumes_only_an_output_of_the_same_settings(tmp_path, monkeypatch):
    """A rerun into the same --out with another k (or captioner, field, seed) would pass over every image already
    captioned as if done: it is refused naming the change, and nothing is written."""
    serve_tiny_coca(monkeypatch, tmp_path)
    data, _ = image_manifest(tmp_path / "img")
    monkeypatch.setattr(open_clip.CoCa, "generate",
                        lambda model, image, **kwargs: open_clip.tokenize(["a red bus on a street"] * len(image)))
    assert synthesize(tmp_path, data, "--num-synthetic", "2")["written"] == 3
    out = Path(data).parent / "synth.jsonl"
    before = out.read_text()
    for flags, change in ((["--num-synthetic", "3"], "--num-synthetic 2 there, 3 now"), (["--seed", "1"], "--seed 0"),
                          (["--synthetic-field", "coca"], "--synthetic-field 'synthetic_captions' there, 'coca' now")):
        with pytest.raises(ManifestError, match=f"holds output of other settings.*{change}"):
            synthesize(tmp_path, data, "--num-synthetic", "2", *flags)
    assert out.read_text() == before
    assert synthesize(tmp_path, data, "--num-synthetic", "2")["already_done"] == 3


def test_synthesize_draws_a_degenerate_caption_again_then_drops_and_counts_it(tmp_path, monkeypatch, capsys):
    """generate answers "a 2 2 2 2" (ml-mobileclip-dr issue 4) for every draw of a black image and once for a white
    one: the white one's is drawn again; the black one's are drawn 1 + 2 times, then dropped and counted, and the
    image, left with no caption, has no line (as an unreadable image): a rerun passes over it."""
    serve_tiny_coca(monkeypatch, tmp_path)
    data, _ = image_manifest(tmp_path / "img", values=(0, 255))  # im0 black, im1 white
    draws = []

    def generate(model, image, **kwargs):
        draws.append(len(image))
        black = (image.flatten(1).mean(1) < 0).tolist()  # CLIP-normalised black is negative, white positive
        return open_clip.tokenize(["a 2 2 2 2" if b or (len(draws) == 1 and i == 2) else "a red bus. on a street"
                                      for i, b in enumerate(black)])

    monkeypatch.setattr(open_clip.CoCa, "generate", generate)
    counts = synthesize(tmp_path, data, "--num-synthetic", "2", "--resample-degenerate", "2")
    assert draws == [4, 3, 2]  # (im0, im0, im1, im1), then the 3 degenerate ones, then im0's 2 again
    assert (counts["degenerate"], counts["degenerate_dropped"], counts["captions"]) == (7, 2, 2)
    assert (counts["written"], counts["images_without_caption"]) == (1, 1)
    rows = [json.loads(line) for line in (Path(data).parent / "synth.jsonl").read_text().splitlines()]
    assert [(r["id"], r["synthetic_captions"]) for r in rows] == [("im1", ["a red bus", "a red bus"])]  # cut at "."
    printed = capsys.readouterr().out
    assert "2 captions written, 2 degenerate dropped" in printed
    assert "7 of 9 synthetic draws degenerate, drawn again (repeated token 7)" in printed

    counts = synthesize(tmp_path, data, "--num-synthetic", "2", "--resample-degenerate", "2")
    assert counts["already_done"] == 2 and "written" not in counts and draws == [4, 3, 2]


def test_synthesize_names_the_flag_when_the_captioner_weights_are_missing(tmp_path, monkeypatch):
    """Offline, the default tag (no cached download), a weights path that does not exist, or a bare architecture
    (random weights): one error naming --captioner, before any image is read; on the command line one line."""
    def offline(*args, **kwargs):
        raise OSError("offline: no cached file")

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", offline)
    data, _ = image_manifest(tmp_path / "img")
    out = str(tmp_path / "synth.jsonl")
    for captioner in (None, f"{COCA}@{tmp_path / 'missing.pt'}", COCA):
        flags = [] if captioner is None else ["--captioner", captioner]
        with pytest.raises(FileNotFoundError, match=f"--captioner {captioner or f'{COCA}@{COCA_TAG}'}: "):
            cq.main(["synthesize", "--data", data, "--out", out, *flags])
    with pytest.raises(SystemExit, match="^error: --captioner coca_ViT-L-14@mscoco_finetuned_laion2b_s13b_b90k: "):
        cq.run_command(cq.main, ["synthesize", "--data", data, "--out", out])
    with pytest.raises(SystemExit, match="^error: --num-synthetic must be at least 1, got 0$"):
        cq.main(["synthesize", "--data", data, "--out", out, "--num-synthetic", "0"])
    assert not Path(out).exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--train.batch-size", "0", "--train.batch-size must be at least 1, got 0"),
    ("--seeds", "0", "--seeds must be at least 1, got 0"),
    ("--train.steps", "-3", "--train.steps must be at least 1, got -3"),
    ("--probe-lr", "nan", "--probe-lr must be at least 0, got nan"),
    ("--swap-probability", "1.5", r"--swap-probability must be in \[0, 1\], got 1.5"),
    ("--subset-fractions", "0", r"--subset-fractions must each be in \(0, 1\], got \(0.0,\)")])
def test_flags_out_of_range_are_one_line_naming_the_flag_before_anything_loads(tmp_path, flag, value, message):
    with pytest.raises(SystemExit, match=f"^error: {message}$"):
        cq.main(["pretrain", "--out", str(tmp_path), *TINY, flag, value])
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing written
