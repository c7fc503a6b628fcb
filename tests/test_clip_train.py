"""common/clip_train.py: the loss against open_clip, retrieval by hand, training, the cached scorer."""

import dataclasses
import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from common.clip_train import (FieldTexts, ScorerTexts, TrainConfig, contrastive_loss, cosine_lr, create_clip,
                               ensure_miniature_scorer, hard_negative_loss, train_clip)
from common.clip_eval import evaluate_world, preprocess_images, retrieval_metrics, swap_accuracy, zero_shot_accuracy
from common.data import BadSampleError, ManifestError, read_manifest
from common.miniature import WorldConfig, ensure_world
from realarch import assert_same_weights, run_torchrun

MICRO = "micro-ViT-16"
TINY_WORLD = WorldConfig(n_train=64, n_val=4, n_test=24)


def test_loss_equals_open_clip():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(7, 16), dim=-1), F.normalize(torch.randn(7, 16), dim=-1)
    scale = torch.tensor(14.3)
    expected = open_clip.loss.ClipLoss()(img, txt, scale)
    assert torch.allclose(contrastive_loss(img, txt, scale), expected, atol=1e-6)


def test_hard_negative_loss_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    neg = torch.tensor([[0.8, 0.6], [0.0, -1.0]])
    scale = torch.tensor(2.0)
    # image 0 against texts (1, 0.6) and negatives (0.8, 0): -log softmax at its own text; image 1: (0, 0.8 | 0.6, -1)
    image_to_text = (-math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.2) + math.exp(1.6) + 1.0))
                     - math.log(math.exp(1.6) / (1.0 + math.exp(1.6) + math.exp(1.2) + math.exp(-2.0)))) / 2
    # text 0 against images (1, 0); text 1 against images (0.6, 0.8): negatives pick no image
    text_to_image = (-math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
                     - math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))) / 2
    assert hard_negative_loss(img, txt, neg, scale).item() == pytest.approx(
        (image_to_text + text_to_image) / 2, rel=1e-6)
    # negatives far from every image leave CLIP's loss
    far = -img
    assert hard_negative_loss(img, txt, far, torch.tensor(30.0)).item() == pytest.approx(
        contrastive_loss(img, txt, torch.tensor(30.0)).item(), abs=1e-6)


def test_the_scorer_trains_with_one_hard_negative_per_caption(world_records):
    train, test = world_records
    texts = ScorerTexts(train, hard_negatives=True)
    captions, negatives = texts(np.arange(16), np.random.default_rng(0))
    assert captions == [r["caption"] for r in train[:16]]
    assert all(n != c and len(n.split()) == len(c.split()) for n, c in zip(negatives, captions))
    model, preprocess, tokenizer = create_clip(MICRO)
    images = preprocess_images(train[:16], preprocess)
    seen = []

    def spy(img_emb, txt_emb, logit_scale):  # the hard-negative recipe must not fall back to a per-list loss
        seen.append(1)
        return contrastive_loss(img_emb, txt_emb, logit_scale)

    history = train_clip(model, tokenizer, images, texts,
                         TrainConfig(steps=1, batch_size=16, lr=0.0, warmup=1, hard_negatives=True),
                         loss_fn=spy, progress=False)["history"]
    assert not seen and np.isfinite(history[0]["loss"])


def test_swap_accuracy_counts_the_true_caption_winning(world_records):
    _, test = world_records

    class Exact:  # an "encoder" that sees exactly what a caption says: its text is the image
        def encode_text(self, tokens):
            return tokens.float()

    def tokenizer(texts):  # a fixed random vector per text
        return torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                            for t in texts])

    truth = torch.nn.functional.normalize(tokenizer([r["caption"] for r in test]).float(), dim=-1)
    scores = swap_accuracy(Exact(), tokenizer, truth, test)
    assert set(scores) >= {"swap_color", "swap_shape", "swap_size", "swap_position", "swap_background"}
    assert all(value == 100.0 for value in scores.values())
    assert all(value == 0.0 for value in swap_accuracy(Exact(), tokenizer, -truth, test).values())


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
                         TrainConfig(steps=30, batch_size=32, lr=3e-3, warmup=3), progress=False)["history"]
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
                         TrainConfig(steps=1, batch_size=8, lr=0.0, warmup=1), loss_fn=recording_loss,
                         progress=False)["history"]
    assert len(seen) == 2 and history[0]["loss"] == pytest.approx(sum(seen), rel=1e-5)


# ---- the one trainer: epochs, caption stream, resume, accumulation, lazy images, torchrun ------------------


def recorded_rows(images, steps: int, batch: int, texts, rows=None, seed: int = 0, **kwargs) -> list[np.ndarray]:
    """The rows of every global batch a run trains on (as texts_for sees them), with lr 0 (nothing learnt)."""
    model, preprocess, tokenizer = create_clip(MICRO, seed=seed)
    seen = []

    def texts_for(batch_rows, rng):
        seen.append(np.array(batch_rows))
        return texts(batch_rows, rng)

    train_clip(model, tokenizer, images, texts_for, TrainConfig(steps=steps, batch_size=batch, lr=0.0, warmup=1,
                                                                seed=seed), rows=rows, progress=False, **kwargs)
    return seen


def test_an_epoch_is_a_permutation_and_arms_with_one_seed_see_the_same_images(world_records):
    """Each sample once an epoch (64 rows, batch 16: 4 steps an epoch, last partial batch dropped); the caption
    draws have a generator of their own, so an arm that draws its captions at random sees the image batches of
    an arm that draws nothing; another seed, another order."""
    train, _ = world_records
    images = torch.zeros(len(train), 3, 64, 64)
    captions = [r["caption"] for r in train]
    fixed = recorded_rows(images, 8, 16, lambda rows, rng: [captions[i] for i in rows])
    drawn = recorded_rows(images, 4, 16,
                          lambda rows, rng: [captions[i] if u < 0.5 else train[i]["alt_text"]
                                             for i, u in zip(rows, rng.random(len(rows)) * rng.random())])
    assert all(np.array_equal(a, b) for a, b in zip(fixed, drawn))
    for epoch in (0, 1):
        assert sorted(np.concatenate(fixed[4 * epoch:4 * epoch + 4]).tolist()) == list(range(64))
    assert not np.array_equal(np.concatenate(fixed[:4]), np.concatenate(fixed[4:]))  # each epoch its own order
    other = recorded_rows(images, 4, 16, lambda rows, rng: [captions[i] for i in rows], seed=1)
    assert not np.array_equal(np.concatenate(fixed[:4]), np.concatenate(other))
    subset = recorded_rows(images, 3, 16, lambda rows, rng: [captions[i] for i in rows], rows=np.arange(10, 58))
    assert sorted(np.concatenate(subset).tolist()) == list(range(10, 58))  # `rows`: only those, each once
    with pytest.raises(ValueError, match="batch size 65 exceeds the 64 training samples"):
        recorded_rows(images, 1, 65, lambda rows, rng: [captions[i] for i in rows])


def test_resume_from_a_killed_run_is_exact_and_a_changed_recipe_is_refused(world_records, tmp_path, monkeypatch):
    train, _ = world_records
    model, preprocess, tokenizer = create_clip(MICRO)
    images = preprocess_images(train, preprocess)
    texts_for = lambda rows, rng: [train[i]["caption"] if u < 0.5 else train[i]["alt_text"]  # noqa: E731
                                   for i, u in zip(rows, rng.random(len(rows)))]
    cfg = TrainConfig(steps=6, batch_size=16, lr=3e-3, warmup=1, checkpoint_every=2)
    straight = train_clip(model, tokenizer, images, texts_for, cfg, progress=False)
    import common.clip_train as clip_train

    calls, real_loss = {"n": 0}, clip_train.clip_loss

    def killed_at_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(clip_train, "clip_loss", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_clip(create_clip(MICRO)[0], tokenizer, images, texts_for, cfg, checkpoint=tmp_path / "c.pt",
                   progress=False)
    monkeypatch.setattr(clip_train, "clip_loss", real_loss)
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["step"] == 2 and state["position"] == [0, 2]  # 64 rows / 16: epoch 0, batch 2 is next
    resumed_model = create_clip(MICRO, seed=5)[0]  # other initial weights: the checkpoint's must win
    resumed = train_clip(resumed_model, tokenizer, images, texts_for, cfg, checkpoint=tmp_path / "c.pt", progress=False)
    assert resumed["resumed_from"] == 2
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]], abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(model.state_dict().values(),
                                                               resumed_model.state_dict().values()))
    with pytest.raises(ManifestError, match="lr: 0.003 there, 0.001 now"):  # an expected error: one line, no traceback
        train_clip(resumed_model, tokenizer, images, texts_for, dataclasses.replace(cfg, lr=1e-3),
                   checkpoint=tmp_path / "c.pt", progress=False)


def test_micro_batches_give_the_whole_batchs_loss_and_update(world_records):
    """accum_steps 4: the same losses and weights as one batch of 16 (the logit scale's gradient counted once)."""
    train, _ = world_records
    _, preprocess, tokenizer = create_clip(MICRO)
    images = preprocess_images(train, preprocess)
    texts_for = lambda rows, rng: ([train[i]["caption"] for i in rows], [train[i]["alt_text"] for i in rows])  # noqa
    runs = []
    for accum in (1, 4):
        model = create_clip(MICRO)[0]
        log_ = train_clip(model, tokenizer, images, texts_for, TrainConfig(steps=3, batch_size=16, lr=3e-3, warmup=1,
                                                                           accum_steps=accum), progress=False)
        runs.append((model, [h["loss"] for h in log_["history"]], [h["logit_scale"] for h in log_["history"]]))
    (whole, losses, scales), (micro, micro_losses, micro_scales) = runs
    assert micro_losses == pytest.approx(losses, abs=1e-5) and micro_scales == pytest.approx(scales, abs=1e-6)
    assert_same_weights(whole.state_dict(), micro.state_dict())
    with pytest.raises(ValueError, match="multiple of 1 ranks x 3 micro-batches"):
        train_clip(whole, tokenizer, images, texts_for, TrainConfig(steps=1, batch_size=16, accum_steps=3),
                   progress=False)


def test_lazy_images_in_workers_train_as_the_in_memory_tensor(world_records, tmp_path):
    """Columns decoded in 2 DataLoader workers: the same losses as the preprocessed tensor; an unreadable image is
    replaced by the next sample of the epoch's order and counted, or stops a strict run naming the sample."""
    from common.data import write_manifest
    from common.columns import index_manifest

    train, _ = world_records
    write_manifest(tmp_path / "train.jsonl", [{**r, "image": str(Path(r["_root"]) / r["image"])} for r in train])
    columns = index_manifest(tmp_path / "train.jsonl")
    _, preprocess, tokenizer = create_clip(MICRO)
    texts_for = FieldTexts(columns, "caption")
    cfg = TrainConfig(steps=3, batch_size=16, lr=3e-3, warmup=1)
    in_memory = train_clip(create_clip(MICRO)[0], tokenizer, preprocess_images(train, preprocess), texts_for, cfg,
                           progress=False)
    lazy = train_clip(create_clip(MICRO)[0], tokenizer, columns, texts_for, dataclasses.replace(cfg, workers=2),
                      preprocess=preprocess, progress=False)
    assert [h["loss"] for h in lazy["history"]] == pytest.approx([h["loss"] for h in in_memory["history"]], abs=1e-6)
    broken = [dict(r) for r in train]
    broken[3]["image"] = str(tmp_path / "missing.png")
    write_manifest(tmp_path / "broken.jsonl", [{**r, "image": str(Path(r["_root"]) / r["image"])} if i != 3 else r
                                               for i, r in enumerate(broken)])
    columns = index_manifest(tmp_path / "broken.jsonl")
    steps = TrainConfig(steps=4, batch_size=16, lr=0.0, warmup=1)  # one epoch: sample 3 is drawn once
    counted = train_clip(create_clip(MICRO)[0], tokenizer, columns, FieldTexts(columns, "caption"), steps,
                         preprocess=preprocess, progress=False)
    assert counted["substituted_images"] == 1
    with pytest.raises(BadSampleError, match=f"sample '{train[3]['id']}'"):
        train_clip(create_clip(MICRO)[0], tokenizer, columns, FieldTexts(columns, "caption"), steps,
                   preprocess=preprocess, strict=True, progress=False)


def test_retrieval_in_chunks_equals_one_matrix():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(9, 8), dim=-1), F.normalize(torch.randn(23, 8), dim=-1)
    owners = torch.randint(0, 9, (23,))
    sims = img @ txt.t()
    owner = owners[None, :] == torch.arange(9)[:, None]
    best = sims.masked_fill(~owner, -torch.inf).max(dim=1).values  # by hand, the whole matrix at once
    i2t = (sims > best[:, None]).sum(dim=1)
    t2i = (sims > sims[owners, torch.arange(23)][None, :]).sum(dim=0)
    has_text = owner.any(dim=1)
    for chunk in (1, 5, 4096):
        metrics = retrieval_metrics(img, txt, owners, ks=(1, 3), chunk=chunk)
        assert metrics["t2i_R@3"] == pytest.approx(100 * (t2i < 3).float().mean().item())
        assert metrics["i2t_R@1"] == pytest.approx(100 * ((i2t < 1) & has_text).float().mean().item())


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_train_as_one_process(tmp_path):
    """`python -m common.clip_train` on a manifest: 2 gloo ranks (each half of every batch, features all-gathered,
    gradients averaged by DDP) give the losses and weights of one process. Slow (20 s): the default run checks the
    same trainer under torchrun through veclip's train stage, capsfusion's scaling and clip_quality's pretraining."""
    folder = ensure_world(TINY_WORLD, tmp_path / "world")
    flags = ["--data", str(folder / "train.jsonl"), "--eval-data", str(folder / "test.jsonl"), "--model", MICRO,
             "--train.steps", "3", "--train.batch-size", "16", "--train.warmup", "1", "--train.kernel", "torch",
             "--train.workers", "1"]
    from common.clip_train import main

    one = main(flags + ["--out", str(tmp_path / "one"), "--device", "cpu"])
    run_torchrun("common/clip_train.py", flags + ["--out", str(tmp_path / "two")])
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], abs=1e-5)
    assert_same_weights(a["state_dict"], b["state_dict"])
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["i2t_R@1"] == pytest.approx(one["i2t_R@1"], abs=1e-6)


# ---- nothing silently wrong: a diverged run, non-finite embeddings, texts of the wrong type --------------


def test_non_finite_embeddings_are_refused_not_scored_100():
    """A NaN similarity is never greater than another: every query of a NaN model ranked its own item first and
    scored R@K = 100. Retrieval and zero-shot refuse such embeddings, naming the model."""
    from common import data

    good = F.normalize(torch.randn(4, 8), dim=-1)
    broken = good.clone()
    broken[2, 3] = math.nan
    with pytest.raises(data.NonFiniteError, match=r"^image embeddings of run/ckpt.pt contain NaN or inf \(1 of 4\)"):
        retrieval_metrics(broken, good, name="run/ckpt.pt")
    with pytest.raises(ValueError, match="^text embeddings of the model contain NaN or inf"):
        retrieval_metrics(good, torch.full((4, 8), math.inf))
    model = type("Fixed", (torch.nn.Module,),
                 {"encode_text": lambda self, tokens: torch.full((len(tokens), 8), math.nan)})()
    with pytest.raises(data.NonFiniteError, match="^image embeddings of m contain"):
        zero_shot_accuracy(model, lambda texts: torch.zeros(len(texts), 1), broken, ["a", "b"], ["{}"], [0, 1, 0, 1],
                           name="m")
    with pytest.raises(data.NonFiniteError, match="^class prompt embeddings of m contain"):
        zero_shot_accuracy(model, lambda texts: torch.zeros(len(texts), 1), good, ["a", "b"], ["{}"], [0, 1, 0, 1],
                           name="m")


def test_the_guard_checks_every_update_before_its_checkpoint_and_keeps_the_last_good_one(world_records, tmp_path,
                                                                                           monkeypatch):
    """The learning rate turns infinite at step 2, the last: its loss is finite, its update is not. The checkpoint
    of step 2 was written before the guard checked the weights; now the run stops naming the step, and the file
    keeps step 2's finite weights."""
    from common import clip_train, data

    train, _ = world_records
    model, preprocess, tokenizer = create_clip(MICRO)
    images = preprocess_images(train[:16], preprocess)
    captions = [r["caption"] for r in train]
    texts_for = lambda idx, rng: [captions[i] for i in idx]  # noqa: E731
    monkeypatch.setattr(clip_train, "cosine_lr", lambda step, cfg: 1e-3 if step < 2 else math.inf)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(data.NonFiniteError, match=re.escape(
            f"train clip at step 2 of 3, after its update ({path} keeps step 2): ")) as caught:
        train_clip(model, tokenizer, images, texts_for, TrainConfig(steps=3, batch_size=8, checkpoint_every=1),
                   checkpoint=path, progress=False)
    assert "weight tensors hold NaN or inf" in str(caught.value) and "\n" not in str(caught.value)
    state = torch.load(path, weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["state_dict"].values())
    # no checkpoint asked for: the last update is still checked, so a NaN model is never handed back
    with pytest.raises(FloatingPointError, match=r"at step 2 of 3, after its update \(no checkpoint asked for\)"):
        train_clip(create_clip(MICRO)[0], tokenizer, images, texts_for, TrainConfig(steps=3, batch_size=8),
                   progress=False)
    clip_train.assert_finite_state(create_clip(MICRO)[0], torch.tensor(1.0), "fine")  # finite: nothing raised
    with pytest.raises(data.NonFiniteError, match=r"^here: the loss is nan; the run diverged"):
        clip_train.assert_finite_state(None, math.nan, "here")


def test_training_rows_need_texts_of_the_right_type(tmp_path):
    """usable_rows applies common.data's text rule: a caption that is a number, null or a list (where one text is
    read) is left out and counted, the first named by file and line; lists=True lets a list of texts through (a
    list of numbers never)."""
    from common.clip_train import usable_rows
    from common.data import write_manifest
    from common.columns import index_manifest

    values = ["fine", 123, None, ["a", "b"], [1, 2], "also fine"]
    write_manifest(tmp_path / "m.jsonl", [{"id": str(i), "image": "x.png", "caption": v} for i, v in enumerate(values)])
    columns = index_manifest(tmp_path / "m.jsonl")
    assert usable_rows(columns, ["caption"]).tolist() == [0, 5]
    assert usable_rows(columns, ["caption"], lists=True).tolist() == [0, 3, 5]
    with pytest.raises(BadSampleError, match=re.escape(f"{tmp_path / 'm.jsonl'}:2 (id '1'): field 'caption' must be a "
                                                       "string, got 123; 4 of 6 samples lack a text")):
        usable_rows(columns, ["caption"], strict=True)
    with pytest.raises(BadSampleError, match=re.escape(":2 (id '1'): field 'caption' must be a string or a list of "
                                                       "strings, got 123; 3 of 6 samples lack a text")):
        usable_rows(columns, ["caption"], strict=True, lists=True)
