"""clip_quality.py: attention distance by hand, DataCompDR sampling, probe metrics, every stage end to end."""

import json
import math

import numpy as np
import pytest
import torch

import clip_quality as cq
from common.clip_train import create_clip
from tests.realarch import run_torchrun, serve_open_clip_tag

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
    assert cq.reduce_zero_label(raw.astype(np.int64)).tolist() == expected.astype(np.int64).tolist()


PROBE_FAST = ["--probe-steps", "2", "--probe-batch-size", "2", "--probe-train-images", "0"]


def test_labels_outside_the_classes_are_an_error_naming_the_file(tmp_path):
    """Raw ADE20k (0 = other, 1..150) with --num-classes 150 used to score label 150 as ignored and 0 as a class."""
    train = write_probe_manifest(tmp_path, "train", masks=ade_style_masks(2))
    test = write_probe_manifest(tmp_path, "val", masks=ade_style_masks(2))
    argv = ["probe", "--out", str(tmp_path / "run"), "--checkpoints", "random", "--model", MICRO,
            "--probe-train-manifest", train, "--probe-test-manifest", test, "--num-classes", "150", *PROBE_FAST]
    with pytest.raises(cq.ManifestError, match=r"train0-mask\.png.*\[150\].*--reduce-zero-label"):
        cq.main(argv)
    cq.main([*argv, "--reduce-zero-label"])  # 0 -> ignore, 150 -> 149: valid (its mIoU: the ViT-B-16 test below)
    small = write_probe_manifest(tmp_path, "small", masks=np.full((2, 40, 48), 7, np.uint8))
    with pytest.raises(cq.ManifestError, match=r"small0-mask\.png.*\[7\] are outside 0\.\.5"):
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
    with pytest.raises(cq.ManifestError, match=r"--task seg needs \['mask'\]"):
        cq.probe_plan(args, records)
    assert cq.probe_plan(cq.Args(), records) == [("depth",)]
    with pytest.raises(cq.ManifestError, match="probe train manifest carries 'mask'"):
        cq.probe_plan(cq.Args(), {"probe_train": [{"id": "a", "mask": "a.png"}], "probe_test": [{"id": "b"}]})


def test_depth_probe_rmse_on_a_hand_made_case(tmp_path):
    """Train depth 2 m everywhere, test 3 m with a third of the pixels invalid: RMSE = 1 m (mm read, 0 skipped)."""
    test_depth = np.full((2, 40, 48), 3000, np.uint16)
    test_depth[:, :, :16] = 0
    train = write_probe_manifest(tmp_path, "train", depth_mm=np.full((3, 40, 48), 2000, np.uint16))
    test = write_probe_manifest(tmp_path, "val", depth_mm=test_depth)
    row = cq.main(["probe", "--out", str(tmp_path / "run"), "--checkpoints", "random", "--model", MICRO,
                   "--probe-train-manifest", train, "--probe-test-manifest", test, *PROBE_FAST])["probe"][0]
    assert set(row) & {"mIoU", "depth_RMSE"} == {"depth_RMSE"}
    assert row["depth_RMSE"] == pytest.approx(1.0, abs=1e-4)


def test_random_baseline_takes_the_checkpoints_architecture(tmp_path, monkeypatch):
    """`random` next to micro-ViT-16 checkpoints is a micro-ViT-16, whatever --model says; mixed ones are refused."""
    from common.clip_train import save_checkpoint

    micro = str(save_checkpoint(tmp_path / "micro.pt", {"state_dict": create_clip(MICRO)[0].state_dict(),
                                                        "model": MICRO}))
    built = []
    probe = cq.train_and_evaluate_probe
    monkeypatch.setattr(cq, "train_and_evaluate_probe", lambda visual, *a: built.append(
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
    """Two encoders of one input size but different normalisation must not share cached probe images."""
    import torchvision.transforms as T

    def load_model_spec(spec, device="cpu"):
        model, preprocess, _ = create_clip(MICRO)
        if spec == "halved":
            preprocess = T.Compose([*preprocess.transforms, T.Normalize(0.0, 2.0)])
        return spec, model, preprocess

    seen = {}
    monkeypatch.setattr(cq, "load_model_spec", load_model_spec)
    monkeypatch.setattr(cq, "train_and_evaluate_probe",
                        lambda visual, train_set, *a: (seen.setdefault(len(seen), train_set[0]), {})[1])
    monkeypatch.setattr(cq, "probe_plan", lambda *a: [("seg",)], raising=False)
    cq.main([*probe_world_args(tmp_path), "--checkpoints", "plain", "halved"])
    assert torch.allclose(seen[1], seen[0] / 2)


def test_only_the_attention_stage_runs_under_torchrun(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="no multi-process path"):
        cq.main(["pretrain", "--out", str(tmp_path), *TINY])


# ---- real architectures at tiny width (the header's and docs' commands), offline ---------------

def no_world(*_):
    raise AssertionError("the miniature world was built although every manifest was given")


def test_real_pretrain_and_probe_commands_on_vit_b16(tmp_path, monkeypatch):
    """`pretrain --model ViT-B-16 --kernel auto` then `probe --checkpoints *.pt random --finetune --num-classes 150
    --reduce-zero-label`, ViT-B-16's classes and flags at tiny width; the probe's mIoU on a hand-made ADE case."""
    _, reference = serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-16")
    monkeypatch.setattr(cq, "ensure_world", no_world)
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
    label, model, preprocess = cq.load_model_spec(checkpoints[1])
    assert model.visual.patch_size == (16, 16) and model.visual.image_size == (224, 224)
    untrained, _ = cq.create_random("ViT-B-16", False, seed=0)
    assert not torch.equal(model.visual.conv1.weight, untrained.visual.conv1.weight)  # trained, then saved
    # the row's retrieval is that of the saved weights
    test = cq.read_manifest(dcdr)
    img_emb = cq.encode_images(model, cq.preprocess_images(test, preprocess))
    txt_emb = cq.encode_texts(model, cq.open_clip.get_tokenizer("ViT-B-16"), [r["caption"] for r in test])
    assert rows[1]["i2t_R@1"] == cq.retrieval_metrics(img_emb, txt_emb)["i2t_R@1"]

    train = write_probe_manifest(tmp_path / "ade", "train", masks=ade_style_masks(3))
    val = write_probe_manifest(tmp_path / "ade", "val", masks=ade_style_masks(2))
    built = []
    probe_one = cq.train_and_evaluate_probe
    monkeypatch.setattr(cq, "train_and_evaluate_probe", lambda visual, *a: built.append(
        (type(visual), visual.patch_size, visual.image_size, visual.transformer.width,
         type(visual.transformer.resblocks[0].mlp.gelu))) or probe_one(visual, *a))
    argv = ["probe", "--out", out, "--checkpoints", *checkpoints, "random", "--finetune", "--probe-train-manifest",
            train, "--probe-test-manifest", val, "--num-classes", "150", "--probe-steps", "5", "--probe-lr", "0.2",
            "--probe-batch-size", "1"]
    with pytest.raises(cq.ManifestError, match="--reduce-zero-label"):
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
        downloads.append(cq.open_clip.pretrained.hf_hub_download)

    def hf_hub_download(repo_id, filename, *args, **kwargs):
        for download in downloads:
            try:
                return download(repo_id, filename, *args, **kwargs)
            except FileNotFoundError:
                continue
        raise FileNotFoundError(f"test cache holds no repository {repo_id}")

    monkeypatch.setattr(cq.open_clip.pretrained, "hf_hub_download", hf_hub_download)
    return references


def tag_images(folder, count=3):
    path = write_probe_manifest(folder, "img", size=(240, 300), count=count)
    return path, cq.read_manifest(path)


def test_real_attention_command_on_two_tags_and_a_checkpoint(tmp_path, monkeypatch):
    """`attention --attention-models ViT-B-16@datacomp_xl_s13b_b90k ViT-B-16@laion2b_s34b_b88k <ckpt>` equals a
    by-hand computation on each model's own weights and its tag's preprocessing."""
    from common.clip_train import save_checkpoint

    tags = ["datacomp_xl_s13b_b90k", "laion2b_s34b_b88k"]
    references = serve_tags(monkeypatch, tmp_path, "ViT-B-16", tags)
    monkeypatch.setattr(cq, "ensure_world", no_world)
    references["ckpt"] = create_clip("ViT-B-16", seed=7)[0]
    checkpoint = str(save_checkpoint(tmp_path / "datacompdr-seed0.pt", {
        "state_dict": references["ckpt"].state_dict(), "model": "ViT-B-16", "label": "datacompdr-n6-seed0"}))
    images, records = tag_images(tmp_path / "img")
    specs = [f"ViT-B-16@{tag}" for tag in tags] + [checkpoint]
    results = cq.main(["attention", "--attention-models", *specs, "--images-manifest", images,
                       "--out", str(tmp_path / "run")])["attention"]
    assert list(results) == specs[:2] + ["datacompdr-n6-seed0"]
    for (label, result), key in zip(results.items(), tags + ["ckpt"]):
        cfg = cq.open_clip.get_pretrained_cfg("ViT-B-16", key) or {}
        preprocess = cq.open_clip.image_transform(224, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
                                                  interpolation=cfg.get("interpolation", "bicubic"),
                                                  resize_mode=cfg.get("resize_mode", "shortest"))
        pixels = cq.preprocess_images(records, preprocess)
        expected = by_hand_attention_distance(references[key], pixels, 16)
        assert result["grid"] == [14, 14] and result["images"] == 3
        assert np.allclose(result["per_layer_per_head_px"], expected, rtol=1e-5), label
    assert results[specs[0]] != results[specs[1]]


def test_openai_tag_is_built_with_its_quick_gelu(tmp_path, monkeypatch):
    """An OpenAI-weights tag (quick_gelu in its pretrained config) loads into a QuickGELU model, as trained."""
    references = serve_tags(monkeypatch, tmp_path, "ViT-B-32", ["openai"])
    label, model, _ = cq.load_model_spec("ViT-B-32@openai")
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), references["openai"].encode_image(pixels), atol=1e-5)
    assert cq.architecture("ViT-B-32@openai") == ("ViT-B-32", True)


def test_attention_under_torchrun_equals_one_process(tmp_path):
    """torchrun --nproc-per-node 2 (gloo) shards the images (3 + 2), all-reduces, rank 0 writes: = one process."""
    from common.clip_train import save_checkpoint

    checkpoint = str(save_checkpoint(tmp_path / "micro.pt", {"state_dict": create_clip(MICRO, seed=5)[0].state_dict(),
                                                             "model": MICRO, "label": "micro-trained"}))
    images, _ = tag_images(tmp_path / "img", count=5)
    argv = ["attention", "--attention-models", checkpoint, MICRO, "--images-manifest", images]
    single = cq.main([*argv, "--out", str(tmp_path / "one")])["attention"]
    done = run_torchrun("clip_quality.py", [*argv, "--out", str(tmp_path / "two")])
    assert "micro-trained: 3 of 5 images on rank 0 of 2" in done.stdout
    assert "micro-trained: 2 of 5 images on rank 1 of 2" in done.stdout
    ranks = json.loads((tmp_path / "two" / "attention.json").read_text())
    assert list(ranks) == list(single) and all(r["images"] == 5 for r in ranks.values())
    for label in single:
        assert np.allclose(ranks[label]["per_layer_per_head_px"], single[label]["per_layer_per_head_px"], rtol=1e-6)
