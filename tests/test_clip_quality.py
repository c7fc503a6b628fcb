"""clip_quality.py: attention distance by hand, DataCompDR sampling, probe metrics, every stage end to end."""

import json
import math

import numpy as np
import pytest
import torch

import clip_quality as cq
from common.clip_train import create_clip

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


def test_captured_attention_equals_softmax_of_the_block_projections():
    model, preprocess, _ = create_clip(MICRO, seed=3)
    visual = model.visual.eval()
    images = torch.randn(2, 3, 64, 64)
    maps = cq.attention_maps(visual, images)
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
    assert all(len(seen) == 5 for seen in drawn.values())  # uniform among the five, redrawn every step


def test_datacomp_uses_the_web_caption_only():
    assert cq.make_texts_for("datacomp", REAL, SYNTHETIC, 0.5)(np.array([3, 1]), np.random.default_rng(0)) == \
        ["real 3", "real 1"]


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_swap_variant_rate(p):
    texts_for = cq.make_texts_for("swap", REAL, SYNTHETIC, p)
    rng = np.random.default_rng(1)
    texts = [t for _ in range(400) for t in texts_for(np.arange(10), rng)]
    assert isinstance(texts[0], str)
    rate = np.mean([t.startswith("syn") for t in texts])
    assert rate == pytest.approx(p, abs=0.03)


def test_caption_columns_name_the_bad_sample():
    with pytest.raises(cq.ManifestError, match="'b'"):
        cq.caption_columns([{"id": "a", "alt_text": "x", "synthetic_captions": ["y"]},
                            {"id": "b", "alt_text": "x", "synthetic_captions": []}], "alt_text", "synthetic_captions")


# ---- probe metrics ---------------------------------------------------------------------------

def test_miou_perfect_and_constant_prediction():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 2, 255]])  # 4 background, 2 class-1, 1 class-2, 1 ignored
    perfect = segmentation_of(target.clamp(max=2), target)
    assert perfect["mIoU"] == pytest.approx(100.0) and perfect["mAcc"] == pytest.approx(100.0)
    constant = segmentation_of(torch.zeros_like(target), target)
    # IoU: background 4 / 7, classes 1 and 2: 0 -> mIoU = (4/7) / 3; mAcc = (1 + 0 + 0) / 3
    assert constant["mIoU"] == pytest.approx(100 * 4 / 7 / 3)
    assert constant["mAcc"] == pytest.approx(100 / 3) and constant["aAcc"] == pytest.approx(100 * 4 / 7)


def segmentation_of(pred, target, num_classes=3):
    return cq.segmentation_metrics(cq.confusion_matrix(pred, target, num_classes, ignore_index=255))


def test_depth_rmse_skips_invalid_pixels():
    target = torch.tensor([[[2.0, 4.0], [0.0, 0.0]]])
    assert cq.depth_rmse(torch.tensor([[[3.0, 4.0], [9.0, 9.0]]]), target).item() == pytest.approx(math.sqrt(0.5))


def test_label_maps_follow_the_image_crop():
    from PIL import Image

    mask = Image.fromarray(np.repeat(np.arange(8, dtype=np.uint8)[None], 4, axis=0))  # (4, 8): column index
    cropped = np.asarray(cq.resize_center_crop(mask, 4))
    assert cropped.shape == (4, 4) and cropped[0].tolist() == [2, 3, 4, 5]


# ---- stages end to end -----------------------------------------------------------------------

def test_pretrain_probe_attention_stages(tmp_path):
    out = str(tmp_path / "run")
    rows = cq.main(["pretrain", "--out", out, "--regimes", "datacomp", "datacompdr", "swap", *TINY])["pretrain"]
    assert {r["regime"] for r in rows} == {"datacomp", "datacompdr", "swap"}
    assert all(math.isfinite(r["final_loss"]) and (tmp_path / "run" / "pretrain" / f"{r['regime']}-seed0.pt").exists()
               for r in rows)
    probe = cq.main(["probe", "--out", out, *TINY])["probe"]
    assert len(probe) == 3 and all(0 <= r["mIoU"] <= 100 and r["depth_RMSE"] > 0 for r in probe)
    assert json.loads((tmp_path / "run" / "probe.json").read_text())[0]["checkpoint"].endswith(".pt")
    tuned = cq.main(["probe", "--out", out, "--finetune", "--checkpoints", "random", *TINY])["probe"]
    assert tuned[0]["finetune"] and tuned[0]["mIoU"] >= 0
    attention = cq.main(["attention", "--out", out, *TINY])["attention"]
    assert len(attention) == 3 and (tmp_path / "run" / "attention.png").stat().st_size > 0
    heads = next(iter(attention.values()))["per_layer_per_head_px"]
    assert len(heads) == 1 and len(heads[0]) == 2 and all(0 <= d <= 64 * math.sqrt(2) for d in heads[0])


def test_efficiency_stage(tmp_path):
    rows = cq.main(["efficiency", "--out", str(tmp_path), "--subset-fractions", "0.25", "1.0", *TINY,
                    "--regimes", "datacompdr"])["efficiency"]
    assert [r["train_images"] for r in rows] == [12, 48] and all(r["regime"] == "datacompdr" for r in rows)
    assert (tmp_path / "efficiency.png").exists() and (tmp_path / "efficiency.json").exists()


@pytest.mark.slow
def test_miniature_stage_writes_the_report(tmp_path):
    results = cq.main(["miniature", "--out", str(tmp_path), "--subset-fractions", "0.5", "1.0", *TINY])
    text = (tmp_path / "results.md").read_text()
    assert "DataComp" in text and "random init" in text and results["seconds"] > 0
    assert {p.name for p in tmp_path.iterdir()} >= {"results.md", "results.json", "attention.png", "efficiency.png"}


def test_kernel_flag_names_the_missing_module(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "kernels.contrastive", None)
    with pytest.raises(ImportError, match="--kernel none"):
        cq.loss_function("torch")
