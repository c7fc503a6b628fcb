"""common/clip_score.py: the metrics' constants by hand, model loading, the command line."""

import json

import numpy as np
import pytest
import torch

from common.clip_score import (CLIP_S_WEIGHT, PAC_S_WEIGHT, PREFIX, clip_s, encode_texts, harmonic_mean, load_clip,
                               load_pacs_state_dict, main, pac_s, ref_clip_s, ref_pac_s, ref_similarity,
                               score_from_features)
from common.data import write_manifest
from common.miniature import WorldConfig, write_world

MICRO = "micro-ViT-16"


def test_constants_are_the_references():
    assert (CLIP_S_WEIGHT, PAC_S_WEIGHT, PREFIX) == (2.5, 2.0, "A photo depicts ")


def test_scores_by_hand():
    img = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    cand = np.array([[0.6, 0.8], [-0.6, 0.8], [0.0, 1.0]])
    # CLIP-S = 2.5 * max(cos, 0): 2.5 * 0.6, clamped to 0, 2.5 * 1
    np.testing.assert_allclose(score_from_features(img, cand, 2.5), [1.5, 0.0, 2.5])
    np.testing.assert_allclose(score_from_features(img, cand, 2.0), [1.2, 0.0, 2.0])
    refs = [np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0]]), np.array([[0.0, -1.0]])]
    # r = max over references, not clamped: max(0.6, 0.8), -0.6, -1.0
    ref_sim = ref_similarity(cand, refs)
    np.testing.assert_allclose(ref_sim, [0.8, -0.6, -1.0])
    # RefCLIP-S = 2 * s * r / (s + r): 2 * 1.5 * 0.8 / 2.3; 0 where s = 0; 2 * 2.5 * -1 / 1.5
    np.testing.assert_allclose(harmonic_mean(score_from_features(img, cand, 2.5), ref_sim),
                               [2.4 / 2.3, 0.0, -5.0 / 1.5])
    assert harmonic_mean(np.array([0.0]), np.array([0.0]))[0] == 0.0  # the references' 0/0 NaN, defined


@pytest.fixture(scope="module")
def micro_bundle():
    torch.manual_seed(0)
    return load_clip(MICRO, device="cpu")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return write_world(WorldConfig(n_train=8, n_val=2, n_test=6), tmp_path_factory.mktemp("world") / "w")


def test_end_to_end_metrics_use_prefix_clamp_and_harmonic_mean(micro_bundle, tiny_world):
    from common.data import read_manifest

    records = read_manifest(tiny_world / "test.jsonl")
    images = [tiny_world / r["image"] for r in records]
    candidates = [r["synthetic_caption"] for r in records]
    refs = [[r["caption"], r["fused"]] for r in records]
    model, tokenizer = micro_bundle.model, micro_bundle.tokenizer
    with torch.no_grad():
        pixels = torch.stack([micro_bundle.preprocess(__import__("PIL.Image").Image.open(p).convert("RGB")) for p in images])
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
        cand = torch.nn.functional.normalize(model.encode_text(tokenizer([PREFIX + c for c in candidates])), dim=-1).numpy()
        ref = [torch.nn.functional.normalize(model.encode_text(tokenizer([PREFIX + t for t in group])), dim=-1).numpy()
               for group in refs]
    cos = (img * cand).sum(1)
    expected_clip = 2.5 * np.maximum(cos, 0)
    result = clip_s(micro_bundle, images, candidates, progress=False)
    np.testing.assert_allclose(result["per_sample"], expected_clip, rtol=1e-5, atol=1e-6)
    assert result["mean"] == pytest.approx(expected_clip.mean(), rel=1e-5)
    np.testing.assert_allclose(pac_s(micro_bundle, images, candidates, progress=False)["per_sample"],
                               2.0 * np.maximum(cos, 0), rtol=1e-5, atol=1e-6)
    r = np.array([max(float(g @ c) for g in group) for c, group in zip(cand, ref)])
    expected_ref = np.where(expected_clip + r == 0, 0, 2 * expected_clip * r / np.where(expected_clip + r == 0, 1, expected_clip + r))
    np.testing.assert_allclose(ref_clip_s(micro_bundle, images, candidates, refs, progress=False)["per_sample"],
                               expected_ref, rtol=1e-4, atol=1e-6)
    ref_pac = ref_pac_s(micro_bundle, images, candidates, refs, progress=False)
    np.testing.assert_allclose(ref_pac["score"]["per_sample"], 2.0 * np.maximum(cos, 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="candidate 1 is empty"):
        clip_s(micro_bundle, images[:2], ["ok", " "], progress=False)
    with pytest.raises(ValueError, match="one candidate per image"):
        clip_s(micro_bundle, images, candidates[:-1], progress=False)


def test_local_checkpoint_loads(micro_bundle, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": micro_bundle.model.state_dict()}, path)
    loaded = load_clip(MICRO, pretrained=str(path), device="cpu")
    for (name, a), b in zip(micro_bundle.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    texts = ["a red circle on grass."]
    np.testing.assert_allclose(encode_texts(loaded, texts, progress=False), encode_texts(micro_bundle, texts, progress=False))


def test_pacs_state_dict_loader(micro_bundle, tmp_path):
    # PAC-S ships {"state_dict": ...} in OpenAI CLIP names, saved from a DataParallel model
    state = {"module." + k: v.clone() + 1.0 for k, v in micro_bundle.model.state_dict().items()}
    path = tmp_path / "clip_ViT-B-32.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    fresh = load_clip(MICRO, device="cpu").model
    load_pacs_state_dict(fresh, path)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state["module." + key]), key
    torch.save({"state_dict": {"visual.wrong.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not match the model"):
        load_pacs_state_dict(fresh, tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="--pacs-checkpoint"):
        load_pacs_state_dict(fresh, tmp_path / "absent.pth")


def test_missing_weights_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--pretrained"):
        load_clip(MICRO, pretrained=str(tmp_path / "absent.pt"), device="cpu")
    with pytest.raises(RuntimeError, match="--pretrained /path/to/weights"):
        load_clip("ViT-B-32", pretrained="openai", device="cpu")  # HF_HUB_OFFLINE: nothing cached
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_clip("no-such-model", device="cpu")


def test_command_line_scores_a_manifest_and_counts_bad_samples(micro_bundle, tiny_world, tmp_path):
    from common.data import read_manifest

    ckpt = tmp_path / "ckpt.pt"
    torch.save(micro_bundle.model.state_dict(), ckpt)
    records = read_manifest(tiny_world / "test.jsonl")
    for r in records:
        r["refs"] = [r["caption"], r["fused"]]
        r["image"] = str(tiny_world / r["image"])
    records[2]["image"] = str(tmp_path / "missing.png")
    records[4]["synthetic_caption"] = ""
    write_manifest(tmp_path / "m.jsonl", records)
    argv = ["--manifest", str(tmp_path / "m.jsonl"), "--text-field", "synthetic_caption", "--refs-field", "refs",
            "--model", MICRO, "--pretrained", str(ckpt), "--device", "cpu", "--out", str(tmp_path / "s.json")]
    report = main(argv)
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["means"] == report["means"] and set(saved["means"]) == {"CLIP-S", "RefCLIP-S"}
    assert saved["skipped"]["count"] == 2 and len(saved["ids"]) == 4
    assert {sample for sample, _ in saved["skipped"]["examples"]} == {records[2]["id"], records[4]["id"]}
    kept = [r for i, r in enumerate(records) if i not in (2, 4)]
    direct = clip_s(micro_bundle, [r["image"] for r in kept], [r["synthetic_caption"] for r in kept], progress=False)
    np.testing.assert_allclose(saved["per_sample"]["CLIP-S"], direct["per_sample"], rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="image file not found"):
        main(argv + ["--strict"])
