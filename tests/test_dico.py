"""dico.py: the decisive choices of docs/dico.md's Implementation details, each against an independent
computation (beam search against exhaustive search; DiCO, SCST, XE and teacher forcing by hand; the rewards and
the frozen reference recomputed from what the real training loop used), then metrics, stages, resume, presets
and official defaults, global batches (2 gloo ranks), bad images, the real architectures at tiny size; then nothing
silently wrong: a diverged run, bad fields, nothing readable, resume and rerun into a run, flags out of range."""

import dataclasses
import itertools
import json
import math
import shutil
from pathlib import Path

import open_clip
import pytest
import torch

import dico
from common import caption_sources
from common.caption_eval import collapse_indicators
from common.clip_captioner import Captioner, Vocab, model_from_checkpoint, sample
from common.clip_score import PREFIX, ScorerLoadError, clip_s, load_clip, pac_s, ref_clip_s, ref_pac_s
from common.clip_train import TrainConfig, ensure_miniature_scorer
from common.data import (BadSampleError, DeviceError, ManifestError, NonFiniteError, image_path, open_image,
                         read_manifest)
from common.image_bank import ImageBank
from common.miniature import WorldConfig, ensure_world
from caption_kernels.dico import sequence_logprobs
from experiments.dico_miniature import plot_training, training_curves
from tests.realarch import assert_same_weights, run_torchrun, serve_open_clip_tag

WORLD = WorldConfig(n_train=48, n_val=12, n_test=12, n_synthetic=1)
WORLD_FLAGS = ["--world.n-train", "48", "--world.n-val", "12", "--world.n-test", "12", "--world.n-synthetic", "1"]
SMALL = ["--d-model", "32", "--heads", "2", "--ffn", "64", "--encoder-layers", "1", "--decoder-layers", "1",
         "--max-len", "12", "--eval-beam", "2", "--val-images", "6", "--eval-images", "6", "--eval-every", "2",
         "--save-every", "2", "--xe-batch-size", "8", "--batch-size", "4", "--beams", "3"]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """A micro CLIP 'trained' for two steps on the tiny world: encoder, reward and evaluator."""
    root = tmp_path_factory.mktemp("scorer")
    ensure_world(WORLD, root)
    path = ensure_miniature_scorer(WORLD, TrainConfig(steps=2, batch_size=16, warmup=1), model_name="micro-ViT-16",
                                   root=root, progress=False)
    return str(path), root


def model_flags(path):
    return ["--encoder-model", "micro-ViT-16", "--encoder-pretrained", path, "--clip-s-model", "micro-ViT-16",
            "--clip-s-pretrained", path, "--pacs-model", "micro-ViT-16", "--pacs-pretrained", path]


def tiny_args(scorer, out, *extra):
    path, root = scorer
    return [*extra, *WORLD_FLAGS, *model_flags(path), *SMALL, "--out", str(out)]


@pytest.fixture(autouse=True)
def world_in_scorer_root(request, monkeypatch):
    """Tests that use the scorer find the tiny world in its folder; unit tests do not build either."""
    if "scorer" in request.fixturenames:
        monkeypatch.setenv("BETTER_CAPTIONS_CACHE", str(request.getfixturevalue("scorer")[1]))


def fresh_bank(args, records):
    """A new ImageBank of `records` under the frozen encoder of `args` (not the one cached for the process)."""
    encoder = caption_sources.load_scorer(args, args.encoder_model, args.encoder_pretrained)
    return ImageBank(records, encoder, args.device, args.strict, args.cache_features)


def tiny_captioner(n_tokens=5, seed=0, max_len=3):
    torch.manual_seed(seed)
    model = Captioner(n_tokens, bos=n_tokens - 2, eos=n_tokens - 1, visual_width=6, d_model=16, encoder_layers=1,
                           decoder_layers=1, heads=2, ffn=32, dropout=0.0, max_len=max_len).eval()
    with torch.no_grad():  # sharper distributions than the initialisation's, so that beams really compete
        model.lm_head.weight.mul_(20)
    return model


def teacher_forced(model, visual, tokens, beams):
    """Summed log-probs of (B, K, T) token rows, the way fine-tuning computes them."""
    inputs, targets, mask = dico.teacher_forcing(tokens.flatten(0, 1), model.bos, model.pad)
    with torch.no_grad():
        return sequence_logprobs(model(visual, inputs, beams=beams), targets, mask, impl="torch").view(tokens.shape[:2])


def exhaustive(model, visual, max_len):
    """Every caption of at most max_len tokens (EOS-terminated or truncated) with its log-prob."""
    words = [t for t in range(model.pad) if t not in (model.bos, model.eos)]
    sequences = []
    for length in range(max_len + 1):
        for body in itertools.product(words, repeat=length):
            if length < max_len:
                sequences.append(list(body) + [model.eos])
            elif length == max_len:
                sequences.append(list(body))
    tokens = torch.full((1, len(sequences), max_len), model.pad)
    for i, seq in enumerate(sequences):
        tokens[0, i, :len(seq)] = torch.tensor(seq)
    return tokens, teacher_forced(model, visual, tokens, len(sequences))


def test_incremental_decoding_equals_the_full_decoder():
    model = tiny_captioner(n_tokens=9, max_len=7)
    visual = torch.randn(3, 4, 6)
    inputs = torch.randint(0, 10, (3, 7))  # pad (= 9) included, as finished beams feed it
    inputs[:, 0] = model.bos
    with torch.no_grad():
        memory = model.encode(visual)
        full = model.decode(memory, inputs)  # (3, 7, V + 1), every position recomputed
        cache = model.start_cache(memory)
        stepped = torch.stack([model.step(cache, inputs[:, t], t) for t in range(7)], dim=1)
    assert torch.equal(torch.isinf(full), torch.isinf(stepped))
    finite = torch.isfinite(full)
    torch.testing.assert_close(stepped[finite], full[finite], atol=1e-5, rtol=1e-5)


def test_beam_search_equals_exhaustive_search_when_wide_enough():
    model = tiny_captioner()
    visual = torch.randn(1, 4, 6)
    all_tokens, all_logps = exhaustive(model, visual, max_len=3)  # 1 + 3 + 9 + 27 = 40 sequences
    tokens, scores = dico.beam_search(model, visual, beam_size=40, max_len=3)
    assert torch.isfinite(scores).all() and dico.distinct_and_finite(tokens, scores).all()
    torch.testing.assert_close(scores[0], all_logps[0].sort(descending=True).values, atol=1e-5, rtol=0)
    found = {tuple(row.tolist()) for row in tokens[0]}
    assert found == {tuple(row.tolist()) for row in all_tokens[0]}


def test_beam_search_returns_k_distinct_candidates_scored_as_teacher_forcing():
    model = tiny_captioner(n_tokens=7, seed=1, max_len=5)
    visual = torch.randn(3, 4, 6)
    tokens, scores = dico.beam_search(model, visual, beam_size=4, max_len=5)
    assert tokens.shape[:2] == (3, 4)
    assert dico.distinct_and_finite(tokens, scores).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    torch.testing.assert_close(scores, teacher_forced(model, visual, tokens, 4), atol=1e-5, rtol=0)
    greedy, greedy_scores = dico.beam_search(model, visual, beam_size=1, max_len=5)
    torch.testing.assert_close(greedy_scores, teacher_forced(model, visual, greedy, 1), atol=1e-5, rtol=0)


def test_beam_search_flags_candidates_that_do_not_exist():
    model = tiny_captioner()
    tokens, scores = dico.beam_search(model, torch.randn(2, 4, 6), beam_size=45, max_len=3)  # only 40 exist
    valid = dico.distinct_and_finite(tokens, scores)
    assert (valid.sum(dim=1) == 40).all() and not valid[:, 40:].any()


def test_sampling_scores_are_the_teacher_forced_log_probs():
    model = tiny_captioner(n_tokens=7, seed=2, max_len=6)
    visual = torch.randn(2, 4, 6)
    torch.manual_seed(0)
    tokens, scores = sample(model, visual, n=5, max_len=6)
    torch.testing.assert_close(scores, teacher_forced(model, visual, tokens, 5), atol=1e-5, rtol=0)


def dico_step_inputs(seed=0):
    policy = tiny_captioner(n_tokens=9, seed=seed, max_len=6)
    reference = tiny_captioner(n_tokens=9, seed=seed, max_len=6).requires_grad_(False)
    visual = torch.randn(4, 4, 6)
    tokens, scores = dico.beam_search(policy, visual, beam_size=3, max_len=6)
    valid = dico.distinct_and_finite(tokens, scores)
    rewards = torch.rand(4, 3)
    inputs, targets, mask = dico.teacher_forcing(tokens.flatten(0, 1), policy.bos, policy.pad, valid.flatten())
    return policy, reference, visual, (inputs, targets, mask), valid, rewards


def logps(model, visual, batch):
    inputs, targets, mask = batch
    return sequence_logprobs(model(visual, inputs, beams=3), targets, mask, impl="torch").view(-1, 3)


def test_dico_loss_is_log2_at_init_and_one_step_moves_the_policy_towards_the_winners():
    policy, reference, visual, batch, valid, rewards = dico_step_inputs()
    with torch.no_grad():
        ref_logps = logps(reference, visual, batch)
    terms = dico.dico_terms(logps(policy, visual, batch), ref_logps, rewards, valid, 0.2, 300.0, "torch")
    assert terms["loss"].item() == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: s = 0
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    terms["loss"].backward()
    optimizer.step()
    after = dico.dico_terms(logps(policy, visual, batch), ref_logps, rewards, valid, 0.2, 300.0, "torch")
    assert after["loss"].item() < math.log(2) and after["margin"] > 0  # winners up, weighted losers down


def softplus(x):
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_dico_terms_by_hand():
    """Every term of `dico_terms`, worked out by hand at beta = 0.5, tau = 10 (not the defaults, so that a
    dropped or swapped argument shows): winner = argmax (first on ties), gamma_j proportional to
    exp(tau (r_w - r_j)), z = beta (s_w - sum_j gamma_j s_j), loss = mean -log sigmoid(z)."""
    rewards = torch.tensor([[0.1, 0.5, 0.3], [0.7, 0.2, 0.7], [9.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, True], [True, False, False]])  # row 2: 1 valid, skipped
    policy = torch.tensor([[-3.0, -2.0, -4.0], [-1.6, -0.5, -1.5], [-1.0, -1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-2.5, -2.5, -3.0], [-1.2, -1.5, -1.5], [-5.0, -5.0, -5.0]])
    terms = dico.dico_terms(policy, ref, rewards, valid, 0.5, 10.0, "torch")
    # row 0: s = (-0.5, 0.5, -1.0), winner 1; gamma over losers 0, 2 = softmax(10 * (0.4, 0.2))
    #        = (sigmoid(2), sigmoid(-2))
    g0 = (sigmoid(2.0), sigmoid(-2.0))
    z0 = 0.5 * (0.5 - (g0[0] * -0.5 + g0[1] * -1.0))
    # row 1: s = (-0.4, 1.0, 0.0), a tie at 0.7: winner 0 (the first); losers 1, 2: softmax(10 * (0.5, 0.0))
    g1 = (sigmoid(5.0), sigmoid(-5.0))
    z1 = 0.5 * (-0.4 - (g1[0] * 1.0 + g1[1] * 0.0))
    assert z0 > 0 > z1
    assert terms["loss"].item() == pytest.approx((softplus(-z0) + softplus(-z1)) / 2, abs=1e-6)
    assert terms["margin"] == pytest.approx((z0 + z1) / 2, abs=1e-6)
    assert terms["reward_accuracy"] == 0.5 and terms["n_skipped"] == 1
    assert terms["reward_winner"] == pytest.approx((0.5 + 0.7) / 2)  # the skipped row's 9.0 is no winner
    assert terms["reward_mean"] == pytest.approx((0.1 + 0.5 + 0.3 + 0.7 + 0.2 + 0.7 + 9.0) / 7)

    def entropy(g):
        return -sum(p * math.log(p) for p in g)

    assert terms["gamma_entropy"] == pytest.approx((entropy(g0) + entropy(g1)) / 2, abs=1e-6)
    # dL/d log pi_theta(y_i) = beta sigmoid(-z) (gamma_i - [i = w]) / n_usable; nothing for the skipped row
    terms["loss"].backward()
    expected = torch.tensor([
        [0.5 * sigmoid(-z0) * g0[0] / 2, -0.5 * sigmoid(-z0) / 2, 0.5 * sigmoid(-z0) * g0[1] / 2],
        [-0.5 * sigmoid(-z1) / 2, 0.5 * sigmoid(-z1) * g1[0] / 2, 0.5 * sigmoid(-z1) * g1[1] / 2],
        [0.0, 0.0, 0.0]])
    torch.testing.assert_close(policy.grad, expected, atol=1e-6, rtol=0)
    # no image with 2 valid candidates: nothing to learn from, a zero loss, no winner, all skipped
    none = dico.dico_terms(policy, ref, rewards, valid & torch.tensor([True, False, False]), 0.5, 10.0, "torch")
    assert none["loss"].item() == 0.0 and none["n_skipped"] == 3
    assert math.isnan(none["reward_winner"]) and math.isnan(none["gamma_entropy"])


def test_teacher_forcing_by_hand():
    """Inputs start with BOS and drop the last token; targets are the tokens; EOS counts, padding does not;
    an invalid candidate counts for nothing."""
    bos, eos, pad = 0, 1, 5
    tokens = torch.tensor([[3, 4, eos, pad], [2, eos, pad, pad], [4, 3, 2, 2]])  # the last row: truncated, no EOS
    inputs, targets, mask = dico.teacher_forcing(tokens, bos, pad)
    assert inputs.tolist() == [[bos, 3, 4, eos], [bos, 2, eos, pad], [bos, 4, 3, 2]]
    assert torch.equal(targets, tokens)
    assert mask.tolist() == [[True, True, True, False], [True, True, False, False], [True] * 4]
    _, _, mask = dico.teacher_forcing(tokens, bos, pad, torch.tensor([True, False, True]))
    assert mask.tolist() == [[True, True, True, False], [False] * 4, [True] * 4]


def test_distinct_and_finite_by_hand():
    tokens = torch.tensor([[[1, 2], [1, 2], [3, 4], [1, 2], [5, 6]]])  # (1, 5, 2): candidate 1 and 3 repeat 0
    scores = torch.tensor([[0.0, -1.0, -2.0, -3.0, -math.inf]])
    assert dico.distinct_and_finite(tokens, scores).tolist() == [[True, False, True, False, False]]


def test_scst_baseline_is_the_mean_of_the_other_candidates():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, 9.0, 0.5]])
    valid = torch.tensor([[True, True, True], [True, False, True]])
    policy_logps = torch.tensor([[-2.0, -4.0, -6.0], [-1.0, -5.0, -3.0]], requires_grad=True)
    n_tokens = torch.tensor([[1, 4, 3], [1, 5, 3]])  # a one-token caption with an advantage: no clamp at 2
    terms = dico.scst_terms(policy_logps, n_tokens, rewards, valid)
    # row 0: b = (2.5, 2, 1.5), advantage (-1.5, 0, 1.5); row 1: the invalid 9.0 is ignored, b = (0.5, 0.5)
    advantage = torch.tensor([[-1.5, 0.0, 1.5], [0.0, 0.0, 0.0]])
    per_token = policy_logps.detach() / n_tokens
    expected = -(advantage * per_token).sum() / 5  # five usable candidates
    assert terms["loss"].item() == pytest.approx(expected.item())
    terms["loss"].backward()
    torch.testing.assert_close(policy_logps.grad, -advantage / n_tokens / 5)
    assert terms["reward_mean"] == pytest.approx((1 + 2 + 3 + 0.5 + 0.5) / 5)  # valid candidates only
    assert terms["reward_winner"] == pytest.approx((3 + 0.5) / 2)
    assert terms["advantage_abs"] == pytest.approx(3 / 5)
    alone = dico.scst_terms(policy_logps, n_tokens, rewards, torch.tensor([[True, False, False], [False, True, False]]))
    assert alone["loss"].item() == 0.0 and alone["advantage_abs"] == 0.0  # one candidate: no baseline, no signal


def test_xe_loss_by_hand():
    """The mean token cross-entropy over the batch's unmasked tokens (not a mean of per-caption means)."""
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]], [[0.9, 0.1], [0.2, 0.8]]]))
    targets, mask = torch.tensor([[0, 1], [1, 1]]), torch.tensor([[True, True], [True, False]])
    expected = -(math.log(0.5) + math.log(0.75) + math.log(0.1)) / 3
    assert dico.xe_loss(logits, targets, mask)["loss"].item() == pytest.approx(expected)
    one = torch.tensor([[False, True], [False, False]])  # a batch of a single token
    assert dico.xe_loss(logits, targets, one)["loss"].item() == pytest.approx(-math.log(0.75))


def test_vocab_round_trip_and_restricted_errors():
    captions = ["a large red circle with the Aldora emblem on the left, on grass."]
    vocab = Vocab.build(captions, restrict=True)
    ids = vocab.encode(captions[0], max_len=40)
    assert ids[-1] == vocab.eos and vocab.decode(ids) == captions[0].lower()
    assert len(vocab.encode(captions[0], max_len=5)) == 5
    with pytest.raises(ValueError, match="outside the captioner's vocabulary"):
        vocab.encode("a purple triangle", max_len=40)
    assert Vocab.build(captions, restrict=False).pad == 49408


def test_collapse_indicators_by_hand():
    out = collapse_indicators(["a red circle, a red circle, a red circle.", "a blue square."])
    assert out["vocab"] == 5 and out["distinct"] == 1.0 and out["length"] == 6.0
    assert out["rep_3gram"] == pytest.approx((7 - 3) / 2)  # 7 trigrams, 3 distinct; none in the second


def test_metrics_match_common_clip_score(scorer):
    path, _ = scorer
    args = dico.parse(["eval", *WORLD_FLAGS, *model_flags(path), "--device", "cpu"])  # the miniature preset
    records = caption_sources.load_split(args, "test")[:5]
    bank = fresh_bank(args, records)
    tokens, kept = bank.visual_tokens([0, 1])
    assert tokens.shape == (2, 1 + 16, 32) and kept == [0, 1]  # CLS + 4x4 patches, width 32
    captions = ["a red circle.", "two squares on sand.", "a small green cross on the left, on water.", "snow.", "x"]
    metrics = dico.caption_metrics(args, bank, list(range(5)), captions)
    bundle = caption_sources.load_scorer(args, "micro-ViT-16", path)
    images, refs = [image_path(r) for r in records], [r["refs"] for r in records]
    kw = dict(progress=False)
    assert metrics["CLIP-S"] == pytest.approx(clip_s(bundle, images, captions, **kw)["mean"], abs=1e-5)
    assert metrics["RefCLIP-S"] == pytest.approx(ref_clip_s(bundle, images, captions, refs, **kw)["mean"], abs=1e-5)
    assert metrics["PAC-S"] == pytest.approx(pac_s(bundle, images, captions, **kw)["mean"], abs=1e-5)
    assert metrics["RefPAC-S"] == pytest.approx(ref_pac_s(bundle, images, captions, refs, **kw)["mean"], abs=1e-5)
    one_reference = dico.caption_metrics(args, bank, list(range(5)), [r["refs"][0] for r in records])
    assert one_reference["BLEU-4"] == pytest.approx(1.0) and one_reference["hallucinated"] == 0
    complete = dico.caption_metrics(args, bank, list(range(5)), [r["caption"] for r in records])
    assert complete["names_kept"] == 1.0 and complete["hallucinated"] == 0


def clip_features(bundle, images=(), texts=()):
    """Normalised CLIP image and text features, straight from the open_clip model (no prefix)."""
    with torch.no_grad():
        img = torch.stack([bundle.preprocess(image) for image in images]) if images else None
        img = torch.nn.functional.normalize(bundle.model.encode_image(img), dim=-1) if images else None
        txt = (torch.nn.functional.normalize(bundle.model.encode_text(bundle.tokenizer(list(texts))), dim=-1)
               if texts else None)
    return img, txt


def test_candidate_rewards_are_w_cos_without_clamp_or_prefix():
    """r = w cos(E_img, E_txt(y)) as the official training reward: negative cosines stay negative, no prefix;
    --reward-clamp and --reward-prefix give the metric's max(cos, 0) and prefixed text instead."""
    torch.manual_seed(0)
    bundle = load_clip("micro-ViT-16", None, "cpu")  # random weights: any text encoder will do here
    texts = ["a red circle.", "two squares on sand.", "snow.", "a small green cross on the left, on water."]
    _, txt = clip_features(bundle, texts=texts)
    img = torch.nn.functional.normalize(torch.stack([txt[0] - 3 * txt[1], txt[3] - txt[2]]), dim=-1)  # (2, E)
    cos = torch.einsum("be,bke->bk", img, txt.view(2, 2, -1))  # (2 images, 2 candidates each)
    assert (cos < 0).any() and (cos > 0).any()  # the test needs both signs
    rewards = dico.candidate_rewards(bundle, 2.0, img.numpy(), texts, 2, "", False)
    torch.testing.assert_close(rewards, 2.0 * cos, atol=1e-5, rtol=0)
    clamped = dico.candidate_rewards(bundle, 2.5, img.numpy(), texts, 2, "", True)
    torch.testing.assert_close(clamped, 2.5 * cos.clamp_min(0), atol=1e-5, rtol=0)
    _, prefixed_txt = clip_features(bundle, texts=[PREFIX + t for t in texts])
    prefixed = dico.candidate_rewards(bundle, 2.0, img.numpy(), texts, 2, PREFIX, False)
    expected = 2.0 * torch.einsum("be,bke->bk", img, prefixed_txt.view(2, 2, -1))
    torch.testing.assert_close(prefixed, expected, atol=1e-5, rtol=0)
    assert (prefixed - rewards).abs().max() > 1e-3


def own_logprobs(model, visual, tokens):
    """sum_t log p(y_t | y_<t, x) of (B, k, T) candidates, EOS included, padding skipped, no length
    normalisation: computed here from the model's logits, without dico.teacher_forcing or the kernels."""
    B, k, T = tokens.shape
    flat = tokens.flatten(0, 1)
    inputs = torch.cat([torch.full_like(flat[:, :1], model.bos), flat[:, :-1]], dim=1)
    with torch.no_grad():
        logp = model(visual, inputs, beams=k).double().log_softmax(-1)
    token_logp = logp.gather(2, flat[..., None])[..., 0]
    return torch.where(flat != model.pad, token_logp, 0.0).sum(1).view(B, k)


def dico_loss_by_hand(policy, ref, rewards, valid, beta, tau):
    """DiCO's loss and mean margin with Python floats, one image at a time."""
    losses, margins = [], []
    for b in range(len(rewards)):
        idx = [i for i in range(rewards.shape[1]) if valid[b, i]]
        if len(idx) < 2:
            continue
        r, s = rewards[b].tolist(), (policy[b] - ref[b]).tolist()
        w = max(idx, key=lambda i: (r[i], -i))  # argmax, first on ties
        losers = [j for j in idx if j != w]
        e = [math.exp(tau * (r[w] - r[j]) - tau * (r[w] - min(r[loser] for loser in losers))) for j in losers]
        z = beta * (s[w] - sum(e_j / sum(e) * s[j] for e_j, j in zip(e, losers)))
        losses.append(softplus(-z))
        margins.append(z)
    return sum(losses) / len(losses), sum(margins) / len(margins)


def test_real_loop_uses_the_frozen_xe_reference_and_w_cos_rewards(scorer, tmp_path, monkeypatch):
    """Three DiCO steps of `dico.main` (lr 1e-3, so the policy moves), with what the loop used captured:
    - the candidates: beam search from the policy, k = --beams, at most --max-len tokens (step 1: exactly the
      XE checkpoint's beams);
    - the rewards: 2.0 cos(image, caption) of the decoded candidates, recomputed here with the scorer (PAC-S w);
    - the reference log-probs: the XE checkpoint's at every step, while the policy's leave them;
    - the loss and margin: the DiCO formula at --beta 0.5 --tau 10, by hand; the optimiser: Adam at --lr."""
    out = tmp_path / "run"
    quick = ["--xe-eval-every", "100", "--eval-every", "100", "--val-images", "2"]
    dico.main(tiny_args(scorer, out, "xe", "--xe-steps", "1", *quick))
    events = []
    real_visual_tokens, real_beam_search, real_dico_terms = ImageBank.visual_tokens, dico.beam_search, dico.dico_terms

    def visual_tokens(bank, indices):
        tokens, kept = real_visual_tokens(bank, indices)
        events.append(("images", [bank.records[i] for i in kept]))
        return tokens, kept

    def beam_search(model, visual, beam_size, max_len):
        tokens, scores = real_beam_search(model, visual, beam_size, max_len)
        events.append(("beams", visual.clone(), tokens.clone()))
        return tokens, scores

    def dico_terms(policy_logps, ref_logps, rewards, valid, *rest):
        events.append(("terms", policy_logps.detach().clone(), ref_logps.clone(), rewards.clone(), valid.clone()))
        return real_dico_terms(policy_logps, ref_logps, rewards, valid, *rest)

    monkeypatch.setattr(ImageBank, "visual_tokens", visual_tokens)
    monkeypatch.setattr(dico, "beam_search", beam_search)
    monkeypatch.setattr(dico, "dico_terms", dico_terms)
    # --xe-warmup 0.9 would slow the first steps if fine-tuning warmed up: its learning rate is constant
    dico.main(tiny_args(scorer, out, "dico", "--steps", "3", "--lr", "1e-3", "--beta", "0.5", "--tau", "10",
                        "--xe-warmup", "0.9", *quick))
    steps = []
    for i, event in enumerate(events):
        if event[0] == "terms":
            images = next(e for e in reversed(events[:i]) if e[0] == "images")[1]
            _, visual, tokens = next(e for e in reversed(events[:i]) if e[0] == "beams")
            steps.append((images, visual, tokens, *event[1:]))
    assert len(steps) == 3
    payload = dico.load_checkpoint(out / "xe" / "best.pt")  # the checkpoint the dico stage starts from
    xe, _ = model_from_checkpoint(payload, "cpu")
    xe.eval()
    bundle = load_clip("micro-ViT-16", scorer[0], "cpu")
    bpe, tokenizer = payload["vocab"], open_clip.tokenizer.SimpleTokenizer()
    rows = train_rows(out, "dico")
    for n, (images, visual, tokens, policy, ref, rewards, valid) in enumerate(steps):
        assert tokens.shape[:2] == (4, 3) and tokens.shape[2] <= 12 and valid.all()
        xe_logps = own_logprobs(xe, visual, tokens).float()
        torch.testing.assert_close(ref[valid], xe_logps[valid], atol=1e-4, rtol=0)  # the frozen XE model
        # the rewards: decode the candidates, encode them and the images with the evaluator here
        texts = [tokenizer.decode([bpe[t] for t in itertools.takewhile(lambda t: t not in (xe.eos, xe.pad), row)])
                 for row in tokens.flatten(0, 1).tolist()]
        img, txt = clip_features(bundle, images=[open_image(image_path(r)) for r in images], texts=texts)
        torch.testing.assert_close(rewards, 2.0 * torch.einsum("be,bke->bk", img, txt.view(4, 3, -1)), atol=1e-5,
                                   rtol=0)
        loss, margin = dico_loss_by_hand(policy.double(), ref.double(), rewards.double(), valid, 0.5, 10.0)
        assert rows[n]["loss"] == pytest.approx(loss, abs=1e-5) and rows[n]["margin"] == pytest.approx(margin, abs=1e-5)
        assert rows[n]["lr"] == 1e-3  # constant: no warm-up in fine-tuning
    first, last = steps[0], steps[-1]
    torch.testing.assert_close(first[3], first[4])  # step 1: policy = reference, s = 0, loss ln 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert torch.equal(first[2], real_beam_search(xe, first[1], 3, 12)[0])  # deterministic beams of the XE model
    moved = (last[3] - own_logprobs(xe, last[1], last[2]).float())[last[6]].abs().max()
    assert moved > 1e-2  # the policy has left the reference, which stayed the XE model
    optimizer = dico.load_checkpoint(out / "dico" / "last.pt")["optimizer"]
    assert optimizer["param_groups"][0]["lr"] == 1e-3 and "exp_avg_sq" in optimizer["state"][0]  # Adam


def test_xe_targets_are_drawn_from_every_reference(scorer, tmp_path, monkeypatch):
    """Each XE target is one of its image's five references (as the vocabulary encodes it), and over a few steps
    the draws reach beyond the first reference: no code path keeps only one reference per image."""
    events = []
    real_visual_tokens, real_xe_loss = ImageBank.visual_tokens, dico.xe_loss

    def visual_tokens(bank, indices):
        tokens, kept = real_visual_tokens(bank, indices)
        events.append(("images", [bank.records[i] for i in kept]))
        return tokens, kept

    def xe_loss(logits, targets, mask):
        events.append(("targets", [row[m].tolist() for row, m in zip(targets, mask)]))
        return real_xe_loss(logits, targets, mask)

    monkeypatch.setattr(ImageBank, "visual_tokens", visual_tokens)
    monkeypatch.setattr(dico, "xe_loss", xe_loss)
    out = tmp_path / "run"
    dico.main(tiny_args(scorer, out, "xe", "--xe-steps", "4", "--xe-eval-every", "100", "--val-images", "2"))
    vocab = Vocab(dico.load_checkpoint(out / "xe" / "last.pt")["vocab"])
    used = []
    for i, event in enumerate(events):
        if event[0] == "targets":
            images = next(e for e in reversed(events[:i]) if e[0] == "images")[1]
            assert len(images) == len(event[1]) == 8
            for record, target in zip(images, event[1]):
                encoded = [vocab.encode(ref, 12) for ref in record["refs"]]
                assert len(record["refs"]) == 5 and target in encoded
                used.append(encoded.index(target))
    assert len(used) == 32 and len(set(used)) >= 4


def test_every_stage_runs_and_writes_its_files(scorer, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # --xe-lr at its paper value is explicit: it wins over the miniature preset's 1e-3
    xe = dico.main(tiny_args(scorer, out, "xe", "--xe-steps", "4", "--xe-lr", "2.5e-4", "--xe-warmup", "0.5"))
    assert (out / "xe" / "best.pt").exists() and (out / "xe" / "last.pt").exists()
    log = [json.loads(line) for line in (out / "xe" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "loss" in row] == [1, 2, 3, 4]
    # linear warm-up over the first half of the 4 steps, then constant (constant_with_warmup)
    assert [row["lr"] for row in log if "loss" in row] == [1.25e-4, 2.5e-4, 2.5e-4, 2.5e-4]
    assert xe["best_val_CIDEr"] == max(row["val"]["CIDEr"] for row in log if "val" in row)
    for algo in ("dico", "scst"):
        dico.main(tiny_args(scorer, out, "dico", "--algo", algo, "--steps", "2"))
        rows = [json.loads(line) for line in (out / algo / "log.jsonl").read_text().splitlines()]
        train_rows = [row for row in rows if "loss" in row]
        assert len(train_rows) == 2 and all(math.isfinite(row["loss"]) for row in train_rows)
        keys = {"reward_winner", "reward_mean"} | (
            {"gamma_entropy", "margin", "reward_accuracy"} if algo == "dico" else set())
        assert keys <= set(train_rows[0])
        if algo == "dico":
            assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # each validation of a fine-tuning stage logs the training reward (2.0 cos, no prefix, no clamp) of the captions
    # the judge scores, the plot's curve: at step 0 both validate the XE model, whose captions the eval stage writes
    dico.main(tiny_args(scorer, tmp_path / "val", "eval", "--split", "val", "--checkpoints",
                        str(out / "xe" / "best.pt")))
    written = read_manifest(tmp_path / "val" / "eval" / "captions-xe-best.jsonl")
    img, txt = clip_features(load_clip("micro-ViT-16", scorer[0], "cpu"),
                             images=[open_image(image_path(r)) for r in written],
                             texts=[r["caption"] for r in written])
    for algo in ("dico", "scst"):
        rows = map(json.loads, (out / algo / "log.jsonl").read_text().splitlines())
        first = next(row["val"] for row in rows if "val" in row)
        assert first["reward"] == pytest.approx(float(2.0 * (img * txt).sum(-1).mean()), abs=1e-5)
    results = dico.main(tiny_args(scorer, out, "eval"))
    assert set(results) == {"ground truth", "xe/best", "dico/best", "scst/best"}
    assert {"CIDEr", "BLEU-4", "CLIP-S", "RefPAC-S", "vocab", "distinct", "names_kept"} <= set(results["xe/best"])
    assert (out / "eval" / "table.md").read_text().startswith("| model |")
    assert len(read_manifest(out / "eval" / "captions-dico-best.jsonl")) == 6
    # checkpoints with the same weights are captioned once (a best.pt that is its last.pt, or the XE start)
    (tmp_path / "copy").mkdir()
    shutil.copyfile(out / "xe" / "best.pt", tmp_path / "copy" / "best.pt")
    real_evaluate, evaluated = dico.evaluate, []
    monkeypatch.setattr(dico, "evaluate", lambda *a: evaluated.append(a[1]) or real_evaluate(*a))
    paths = [str(out / "xe" / "best.pt"), str(tmp_path / "copy" / "best.pt"), str(out / "dico" / "last.pt")]
    again = dico.main(tiny_args(scorer, tmp_path / "again", "eval", "--checkpoints", *paths))
    assert len(evaluated) == 2 and again["copy/best"] == again["xe/best"] == results["xe/best"]
    assert (read_manifest(tmp_path / "again" / "eval" / "captions-copy-best.jsonl")
            == read_manifest(tmp_path / "again" / "eval" / "captions-xe-best.jsonl"))


def test_resume_continues_from_the_saved_step(scorer, tmp_path):
    quick = ["--xe-eval-every", "100", "--val-images", "2"]
    dico.main(tiny_args(scorer, tmp_path / "a", "xe", "--xe-steps", "3", *quick))
    dico.main(tiny_args(scorer, tmp_path / "b", "xe", "--xe-steps", "1", *quick))
    dico.main(tiny_args(scorer, tmp_path / "b", "xe", "--xe-steps", "3", "--resume", *quick))
    steps = [row["step"] for row in train_rows(tmp_path / "b", "xe")]
    assert steps == [1, 2, 3]  # step 1 was not run again
    a, b = (dico.load_checkpoint(tmp_path / run / "xe" / "last.pt") for run in ("a", "b"))
    assert a["step"] == b["step"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_corrupted_checkpoint_gives_a_clear_error(scorer, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match="unreadable"):  # one line, exit status 1
        dico.main(tiny_args(scorer, tmp_path / "run", "dico", "--init", str(bad), "--steps", "1"))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="not a dico.py checkpoint"):
        dico.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="run the xe stage"):
        dico.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": {}, "config": {}, "vocab": [], "step": 0}, tmp_path / "old.pt")  # before the fix
    with pytest.raises(SystemExit, match="after ln_post"):
        dico.load_checkpoint(tmp_path / "old.pt")


def test_nan_loss_stops_with_the_step(scorer, tmp_path, monkeypatch):
    def poisoned(logits, targets, mask):
        return {"loss": logits.sum() * float("nan")}

    monkeypatch.setattr(dico, "xe_loss", poisoned)
    with pytest.raises(NonFiniteError, match=r"^xe at step 1 of 3, before its update "
                                             r"\(\S+last.pt not written by this run\): "
                                             "the loss is nan"):
        dico.main(tiny_args(scorer, tmp_path / "run", "xe", "--xe-steps", "3"))
    assert not (tmp_path / "run" / "xe" / "last.pt").exists()


def test_real_run_without_pacs_checkpoint_names_the_flag(tmp_path):
    args = dico.Args(train_manifest="x.jsonl")
    with pytest.raises(SystemExit, match="--pacs-checkpoint"):
        caption_sources.evaluators(args)
    # checked when the run starts: before the data (here missing) is read or anything is trained
    with pytest.raises(SystemExit, match="--pacs-checkpoint"):
        dico.main(["xe", "--train-manifest", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])
    assert not (tmp_path / "xe").exists()


# --------------------------------------------------------------------------------------------
# Presets and the official defaults
# --------------------------------------------------------------------------------------------


def test_defaults_are_the_official_scripts():
    args = dico.Args()
    # scripts/train_xe_coco.sh: max_steps 10000, eval_steps 200, 64 per device x 8 accumulation, lr 2.5e-4
    assert (args.xe_steps, args.xe_eval_every, args.xe_batch_size, args.xe_lr) == (10000, 200, 512, 2.5e-4)
    # scripts/train_xe_coco.sh: lr_scheduler_type constant_with_warmup, warmup_ratio 0.05
    assert args.xe_warmup == 0.05
    # scripts/train_dico_coco.sh: max_steps 250000, eval_steps 1770, 8 per device on 2 GPUs, lr 1e-6 (constant)
    assert (args.steps, args.eval_every, args.batch_size, args.lr) == (250000, 1770, 16, 1e-6)
    # scripts/train_dico_coco.sh: generation_num_beams 5 (candidates and evaluation), generation_max_length 30
    assert (args.beams, args.candidates, args.eval_beam, args.max_len) == (5, "beam", 5, 30)
    # main.py: --dico_beta 0.2, --dico_tau 300
    assert (args.beta, args.tau) == (0.2, 300.0)
    # trainers/trainer_utils.py: the reward is PAC-S with w = 2.0 (clip_ViT-B-32.pth); no prefix, no clamp
    assert (args.reward, args.reward_prefix, args.reward_clamp) == ("pac_s", "", False)
    # main.py: 3 layers (n_layer) of 512 (n_embd) with 8 heads (n_head), BertConfig intermediate_size 2048
    assert (args.d_model, args.encoder_layers, args.decoder_layers, args.heads, args.ffn) == (512, 3, 3, 8, 2048)


def test_explicit_flags_win_over_the_miniature_preset():
    assert {k: getattr(dico.parse([]), k) for k in dico.MINIATURE} == dico.MINIATURE  # the miniature stage's default
    args = dico.parse(["miniature", "--lr", "1e-6", "--steps=10000", "--no-restrict-vocab", "--xe_batch_size", "512",
                       "--world.n-train", "48"])
    assert (args.lr, args.steps, args.restrict_vocab, args.xe_batch_size) == (1e-6, 10000, False, 512)
    assert (args.xe_lr, args.xe_steps, args.d_model, args.world.n_train) == (1e-3, 150, 128, 48)  # the preset
    assert dico.parse(["xe"]).xe_steps == 150  # no data flag: the miniature world and its preset
    real = dico.parse(["xe", "--train-manifest", "train.jsonl"])  # real data: the paper's values
    assert (real.xe_steps, real.d_model, real.encoder_model, real.preset) == (10000, 512, "ViT-L-14", "paper")
    smoke = dico.parse(["--preset", "smoke", "--steps", "5"])
    assert (smoke.xe_steps, smoke.steps, smoke.scorer.steps, smoke.world.n_train) == (6, 5, 5, 48)


def test_xe_keeps_the_best_validation_cider_and_dico_the_best_refpacs(scorer, tmp_path, monkeypatch):
    script = iter([(0.1, 0.1), (0.5, 0.2), (0.2, 0.6)] * 2)  # (CIDEr, RefPAC-S) at steps 0, 2, 4

    def scripted(args, bank, indices, captions, per_item=None):
        cider, ref_pac_s = next(script)
        return {"CIDEr": cider, "RefPAC-S": ref_pac_s}

    monkeypatch.setattr(dico, "caption_metrics", scripted)
    out = tmp_path / "run"
    xe = dico.main(tiny_args(scorer, out, "xe", "--xe-steps", "4", "--xe-eval-every", "2"))
    assert dico.load_checkpoint(out / "xe" / "best.pt")["step"] == 2 and xe["best_val_CIDEr"] == 0.5
    fine = dico.main(tiny_args(scorer, out, "dico", "--steps", "4"))
    assert dico.load_checkpoint(out / "dico" / "best.pt")["step"] == 4 and fine["best_val_RefPAC-S"] == 0.6


# --------------------------------------------------------------------------------------------
# Global batches: micro-batches and ranks take the step one process takes
# --------------------------------------------------------------------------------------------


def train_rows(out, stage):
    return [row for row in map(json.loads, (out / stage / "log.jsonl").read_text().splitlines()) if "loss" in row]


def assert_same_checkpoints(a, b, atol):
    """The captioners saved at paths a and b hold the same weights (tests/realarch.py: but for attention key biases)."""
    assert_same_weights(*(dico.load_checkpoint(path)["model"] for path in (a, b)), atol=atol)


def test_micro_batches_accumulate_to_the_whole_batch(scorer, tmp_path):
    quick = ["--dropout", "0", "--xe-eval-every", "100", "--eval-every", "100", "--val-images", "2"]
    dico.main([*tiny_args(scorer, tmp_path / "xe", "xe", "--xe-steps", "1"), *quick])
    init = ["--init", str(tmp_path / "xe" / "xe" / "last.pt"), "--steps", "1"]
    for stage in ("dico", "scst"):
        for run, micro in (("whole", []), ("micro", ["--micro-batch-size", "3"])):  # 4 images: chunks of 3 and 1
            dico.main([*tiny_args(scorer, tmp_path / run, "dico", "--algo", stage), *init, *quick, *micro])
        whole, micro = train_rows(tmp_path / "whole", stage), train_rows(tmp_path / "micro", stage)
        assert [row["images"] for row in whole] == [row["images"] for row in micro] == [4]
        assert whole[0]["loss"] == pytest.approx(micro[0]["loss"], rel=1e-5, abs=1e-7), stage
        assert_same_checkpoints(tmp_path / "whole" / stage / "last.pt", tmp_path / "micro" / stage / "last.pt", 1e-6)


def test_torchrun_two_ranks_share_one_global_batch(scorer, tmp_path):
    """`torchrun --nproc-per-node 2 dico.py xe ...`: 2 gloo ranks with --xe-batch-size 6 see 6 images a step
    between them (3 each, in micro-batches of 2 and 1) and take the step one process takes."""
    flags = ["--xe-steps", "2", "--xe-batch-size", "6", "--dropout", "0", "--xe-eval-every", "100", "--val-images", "2"]
    run_torchrun("dico.py", [*tiny_args(scorer, tmp_path / "two", "xe"), *flags, "--micro-batch-size", "2"])
    dico.main([*tiny_args(scorer, tmp_path / "one", "xe"), *flags])
    two, one = train_rows(tmp_path / "two", "xe"), train_rows(tmp_path / "one", "xe")
    assert [row["images"] for row in two] == [row["images"] for row in one] == [6, 6]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # 5e-6: 2 ranks in micro-batches sum the gradient in another order than one process (1.5e-6 seen)
    assert_same_checkpoints(tmp_path / "two" / "xe" / "last.pt", tmp_path / "one" / "xe" / "last.pt", 5e-6)


# --------------------------------------------------------------------------------------------
# Bad input: an unreadable image is counted and skipped; --strict stops
# --------------------------------------------------------------------------------------------


def manifests_with_a_broken_image(tmp_path):
    """Train (8 images), val and test manifests of the tiny world, each with an unreadable image first."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    root, paths = ensure_world(WORLD), {}
    for split, n in (("train", 8), ("val", 6), ("test", 6)):
        records = [{"id": f"broken-{split}", "image": str(broken), "caption": "a red circle.",
                    "refs": ["a red circle."]}]
        records += [{"id": r["id"], "image": str(image_path(r)), "caption": r["caption"], "refs": r["refs"]}
                    for r in read_manifest(root / f"{split}.jsonl")[:n - 1]]
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    return ["--train-manifest", str(paths["train"]), "--val-manifest", str(paths["val"]), "--test-manifest",
            str(paths["test"])]


def test_an_unreadable_image_is_skipped_and_counted_and_strict_stops(scorer, tmp_path):
    data = manifests_with_a_broken_image(tmp_path)
    out = tmp_path / "run"
    # a batch of 8 draws every image; micro-batches of 1 make one of them hold no readable image at all
    one_by_one = ["--micro-batch-size", "1"]
    xe = dico.main([*tiny_args(scorer, out, "xe", "--xe-steps", "2"), *data, *one_by_one])
    assert xe["unreadable_images"] == 2 and set(xe["unreadable_ids"]) == {"broken-train", "broken-val"}
    assert [row["images"] for row in train_rows(out, "xe")] == [7, 7]
    dico.main([*tiny_args(scorer, out, "dico", "--steps", "1"), "--batch-size", "8", *data, *one_by_one])
    assert [row["images"] for row in train_rows(out, "dico")] == [7]
    assert json.loads((out / "xe" / "metrics.json").read_text())["unreadable_images"] == 2
    validation = [json.loads(line)["val"] for line in (out / "xe" / "log.jsonl").read_text().splitlines()
                  if "val" in line]
    assert validation[0]["images"] == 5  # the first 6 validation images, one unreadable
    results = dico.main([*tiny_args(scorer, out, "eval", "--checkpoints", str(out / "xe" / "best.pt")), *data])
    assert results["xe/best"]["images"] == results["ground truth"]["images"] == 5
    assert results["xe/best"]["unreadable_images"] == 1
    captions = read_manifest(out / "eval" / "captions-xe-best.jsonl")
    assert len(captions) == 5 and "broken-test" not in {r["id"] for r in captions}
    # the first image read: the training set's first, whose readable images are looked for before step 0
    with pytest.raises(BadSampleError, match="sample 'broken-train': image cannot be decoded"):
        dico.main([*tiny_args(scorer, tmp_path / "strict", "xe", "--xe-steps", "1", "--strict"), *data])


# --------------------------------------------------------------------------------------------
# The real run's models at tiny width: ViT-L/14 (openai) encoder, ViT-B/32 CLIP-S, PAC-S checkpoint
# --------------------------------------------------------------------------------------------


def karpathy_json(tmp_path):
    """A Karpathy-split JSON over the tiny world's images (6 train, 4 val, 4 test); returns (json, image root)."""
    root, images = ensure_world(WORLD), []
    for split, n in (("train", 6), ("val", 4), ("test", 4)):
        for r in read_manifest(root / f"{split}.jsonl")[:n]:
            path = image_path(r).resolve()
            images.append({"filepath": str(path.parent.relative_to(root.resolve())), "filename": path.name,
                           "split": split, "cocoid": len(images), "sentences": [{"raw": ref} for ref in r["refs"]]})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    return str(tmp_path / "dataset_coco.json"), str(root.resolve())


def last_block_tokens(visual, pixels):
    """The ViT's last residual block's output (B, 1 + P, W), taken by a hook: pre-ln_post, independently."""
    captured = []
    hook = visual.transformer.resblocks[-1].register_forward_hook(
        lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        visual(pixels)
    hook.remove()
    return captured[0] if visual.transformer.batch_first else captured[0].transpose(0, 1)


def uses_quick_gelu(model):
    return any(isinstance(module, open_clip.transformer.QuickGELU) for module in model.modules())


@pytest.mark.usefixtures("scorer")  # the tiny world its Karpathy JSON points at
def test_real_run_commands_with_the_real_architectures_at_tiny_width(tmp_path, monkeypatch):
    """The header's real run (xe, dico, scst, eval) with ViT-L-14 / ViT-B-32 `openai` and a PAC-S file, offline."""
    monkeypatch.setattr(caption_sources, "_BUNDLES", {})
    _, encoder_ref = serve_open_clip_tag(monkeypatch, tmp_path, "ViT-L-14", "openai")
    serve_l14 = open_clip.pretrained.hf_hub_download
    serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-32", "openai", seed=1)
    serve_b32 = open_clip.pretrained.hf_hub_download

    def serve_both(repo_id, *args, **kwargs):  # each helper serves one repository
        try:
            return serve_b32(repo_id, *args, **kwargs)
        except FileNotFoundError:
            return serve_l14(repo_id, *args, **kwargs)

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", serve_both)
    torch.manual_seed(2)
    pacs_ref = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    torch.save({"state_dict": pacs_ref.state_dict()}, tmp_path / "clip_ViT-B-32.pth")
    coco, images = karpathy_json(tmp_path)
    out = tmp_path / "coco"
    real = ["--coco-karpathy", coco, "--coco-images", images, "--out", str(out), "--encoder-model", "ViT-L-14",
            "--encoder-pretrained", "openai", "--pacs-checkpoint", str(tmp_path / "clip_ViT-B-32.pth"), *SMALL,
            "--val-images", "2", "--eval-images", "3"]
    dico.main(["xe", *real, "--xe-steps", "2"])
    best = str(out / "xe" / "best.pt")
    dico.main(["dico", *real, "--init", best, "--steps", "1"])
    dico.main(["dico", *real, "--init", best, "--steps", "1", "--algo", "scst"])
    results = dico.main(["eval", *real, "--checkpoints", best, str(out / "dico" / "best.pt"),
                         str(out / "scst" / "best.pt")])
    assert set(results) == {"ground truth", "xe/best", "dico/best", "scst/best"} and results["xe/best"]["images"] == 3
    config = dico.load_checkpoint(best)["config"]
    assert config["visual_width"] == 64 and config["n_tokens"] == 49408  # tiny ViT-L-14 width; full BPE vocabulary
    assert train_rows(out, "dico")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)

    args = dico.parse(["eval", *real])
    bank = fresh_bank(args, caption_sources.load_split(args, "test"))
    tokens, kept = bank.visual_tokens([0, 1])
    pixels = torch.stack([bank.encoder.preprocess(open_image(image_path(bank.records[i]))) for i in kept])
    visual = bank.encoder.model.visual
    expected = last_block_tokens(visual, pixels)  # (2, 1 + 256, 64): CLS + 16 x 16 patches of 14 px
    assert tokens.shape == (2, 257, 64)
    torch.testing.assert_close(tokens, expected)  # before ln_post, as the official code
    assert not torch.allclose(tokens, visual.ln_post(expected), atol=1e-3)
    pac_s_bundle = caption_sources.evaluators(args)["pac_s"][0]  # the PAC-S file's weights, OpenAI's QuickGELU
    torch.testing.assert_close(pac_s_bundle.model.encode_image(pixels), pacs_ref.encode_image(pixels))
    # the `openai` tags get their own activation, QuickGELU: the served OpenAI model's tokens, exactly
    assert uses_quick_gelu(bank.encoder.model) and uses_quick_gelu(caption_sources.evaluators(args)["clip_s"][0].model)
    torch.testing.assert_close(tokens, last_block_tokens(encoder_ref.visual, pixels))


def test_smoke_preset_runs_every_stage_of_the_miniature_run(tmp_path):
    """The header's first command: XE, DiCO, SCST and eval on a tiny world with a scorer trained for 5 steps."""
    result = dico.main(["--preset", "smoke", "--out", str(tmp_path / "mini")])
    assert set(result["per_seed"][0]) >= {"ground truth", "xe/best", "dico/last", "scst/last"}
    assert [row["step"] for row in train_rows(tmp_path / "mini" / "seed0", "dico")][-1] == 4  # the preset's 4 steps
    assert (tmp_path / "mini" / "results.md").exists()
    assert result["plot"] == str(tmp_path / "mini" / "training.png")
    assert Path(result["plot"]).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "mini" / "results.json").read_text())
    assert list(saved["stage_seconds"]["0"]) == ["xe", "dico", "scst", "eval"] and saved["plot"] == result["plot"]
    again = dico.main(["--preset", "smoke", "--out", str(tmp_path / "mini")])  # reproduce.py reruns into its folder
    assert again["per_seed"] == result["per_seed"]


def test_training_curves_read_the_validation_rows_of_every_seed(tmp_path):
    """The plot's numbers: per algorithm the validation steps and (seeds, steps) arrays of reward and CLIP-S; a step
    validated twice (a resumed run) counts once, with its last value."""
    logs = {"seed0": [{"step": 0, "val": {"reward": 1.0, "CLIP-S": 2.0}}, {"step": 1, "loss": 0.7},
                      {"step": 2, "val": {"reward": 1.5, "CLIP-S": 1.0}},
                      {"step": 2, "val": {"reward": 1.2, "CLIP-S": 1.8}}],
            "seed1": [{"step": 0, "val": {"reward": 3.0, "CLIP-S": 4.0}},
                      {"step": 2, "val": {"reward": 0.2, "CLIP-S": 0.8}}]}
    for seed, rows in logs.items():
        (tmp_path / seed / "dico").mkdir(parents=True)
        (tmp_path / seed / "dico" / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    curves = training_curves([tmp_path / "seed0", tmp_path / "seed1"], "dico")
    assert curves["steps"] == [0, 2]
    assert curves["reward"].tolist() == [[1.0, 1.2], [3.0, 0.2]]
    assert curves["CLIP-S"].tolist() == [[2.0, 1.8], [4.0, 0.8]]
    plot_training({"dico": curves, "scst": curves}, "pac_s", tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------
# Nothing silently wrong: a diverged run stops, bad data is refused, a run in --out is never mixed or replaced
# unasked, flags out of range are one line naming the flag
# --------------------------------------------------------------------------------------------

QUICK = ["--xe-eval-every", "100", "--eval-every", "100", "--val-images", "2"]


def run(scorer, out, stage, *flags):
    """`dico.py stage` on the tiny world with the SMALL flags, then `flags` (which win)."""
    return dico.main([*tiny_args(scorer, out, stage), *flags])


def finite_weights(path):
    return all(torch.isfinite(t).all() for t in dico.load_checkpoint(path)["model"].values())


def test_a_diverging_learning_rate_stops_before_a_nan_checkpoint(scorer, tmp_path):
    """`dico --lr 1e6`: after the first update every candidate scored NaN; the run went on with them all filtered
    out, logged loss 0.0 and exited 0 with a NaN last.pt. Now it stops there and writes no checkpoint of it."""
    out = tmp_path / "run"
    run(scorer, out, "xe", "--xe-steps", "1", *QUICK)
    with pytest.raises(NonFiniteError, match=r"^dico at step 2 of 6, before its update \(\S+last.pt not written by "
                                             r"this run\): all 12 candidates of the batch's 4 images have a NaN"):
        run(scorer, out, "dico", "--steps", "6", "--lr", "1e6", *QUICK)
    assert not (out / "dico" / "last.pt").exists()
    assert dico.load_checkpoint(out / "dico" / "best.pt")["step"] == 0 and finite_weights(out / "dico" / "best.pt")


def test_weights_an_update_poisons_never_reach_a_checkpoint(scorer, tmp_path, monkeypatch):
    """The last update's loss is finite and the update puts NaN in a weight: the final last.pt was written with it.
    Now the run stops; last.pt keeps step 2 (its last save) and best.pt finite weights."""
    real_step, updates = torch.optim.Adam.step, []

    def poisoning_step(self, closure=None):
        loss = real_step(self, closure)
        updates.append(1)
        if len(updates) == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return loss

    monkeypatch.setattr(torch.optim.Adam, "step", poisoning_step)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=rf"^xe at step 4 of 4, after its update \({out / 'xe' / 'last.pt'} keeps "
                                             r"step 2\): 1 of \d+ weight tensors hold NaN or inf "
                                             r"\(visual_proj.weight\)"):
        run(scorer, out, "xe", "--xe-steps", "4")
    assert dico.load_checkpoint(out / "xe" / "last.pt")["step"] == 2
    assert finite_weights(out / "xe" / "last.pt") and finite_weights(out / "xe" / "best.pt")
    state = dico.load_checkpoint(out / "xe" / "last.pt")
    state["model"]["lm_head.bias"][0] = float("inf")
    torch.save(state, tmp_path / "inf.pt")
    with pytest.raises(NonFiniteError, match=r"inf.pt: 1 of \d+ weight tensors hold NaN or inf \(lm_head.bias\)"):
        run(scorer, tmp_path / "eval", "eval", "--checkpoints", str(tmp_path / "inf.pt"))


def test_nan_candidates_are_counted_and_a_batch_without_a_finite_one_stops(scorer, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(scorer, out, "xe", "--xe-steps", "1", *QUICK)
    real_beam_search = dico.beam_search

    def nan_beams(last):  # beam search whose beams `last`.. score NaN
        def search(model, visual, beam_size, max_len):
            tokens, scores = real_beam_search(model, visual, beam_size, max_len)
            scores = scores.clone()
            scores[:, last:] = float("nan")
            return tokens, scores
        return search

    monkeypatch.setattr(dico, "beam_search", nan_beams(2))
    run(scorer, out, "dico", "--steps", "2", *QUICK)
    assert [row["nonfinite_candidates"] for row in train_rows(out, "dico")] == [4, 4]  # 1 of 3 beams, 4 images
    monkeypatch.setattr(dico, "beam_search", nan_beams(0))
    with pytest.raises(NonFiniteError, match=r"^scst at step 1 of 2, before its update \(\S+last.pt not written by "
                                             r"this run\): all 12 candidates of the batch's 4 images"):
        run(scorer, out, "dico", "--algo", "scst", "--steps", "2", *QUICK)
    assert not (out / "scst" / "last.pt").exists()


def world_manifests(tmp_path, edit=lambda split, records: records):
    """Train (8), val and test (6) manifests of the tiny world, each split's records passed through `edit` first."""
    root, paths = ensure_world(WORLD), {}
    for split, n in (("train", 8), ("val", 6), ("test", 6)):
        records = [{"id": r["id"], "image": str(image_path(r)), "caption": r["caption"], "refs": r["refs"]}
                   for r in read_manifest(root / f"{split}.jsonl")[:n]]
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in edit(split, records)))
    return [flag for split in paths for flag in (f"--{split}-manifest", str(paths[split]))]


def test_refs_given_as_a_string_are_refused_naming_the_file_and_sample(scorer, tmp_path):
    """A string `refs` was iterated letter by letter: XE trained on one-letter targets, CIDEr scored against them."""
    def one_string(split, records):
        if split == "train":
            records[2]["refs"] = "a red circle."
        return records

    data = world_manifests(tmp_path, one_string)
    sample = read_manifest(tmp_path / "train.jsonl")[2]["id"]
    with pytest.raises(ManifestError, match=rf"train.jsonl \(id '{sample}'\): field 'refs' must be a list of strings, "
                                            r'got "a red circle."'):
        run(scorer, tmp_path / "run", "xe", "--xe-steps", "1", *data)
    assert not (tmp_path / "run" / "xe" / "log.jsonl").exists()


def test_nothing_readable_to_train_on_is_refused_before_any_checkpoint(scorer, tmp_path):
    """Every training image unreadable: 6 XE steps on 0 images and a best.pt. Now one line, before step 0."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")

    def unreadable(split, records):
        return [{**r, "image": str(broken)} for r in records] if split == "train" else records

    data = world_manifests(tmp_path, unreadable)
    for cache in ([], ["--cache-features"]):  # images read as drawn, or all at the start
        out = tmp_path / f"run{len(cache)}"
        with pytest.raises(BadSampleError, match=rf"^\[xe\] nothing to train on: none of the 8 training images of "
                                                 rf"{tmp_path / 'train.jsonl'} can be read, all skipped "
                                                 r"\(first: sample"):
            run(scorer, out, "xe", "--xe-steps", "2", *data, *cache)
        assert not (out / "xe" / "best.pt").exists()


def test_resume_refuses_other_settings_naming_the_flags(scorer, tmp_path):
    """--lr was ignored on resume (the optimiser state restores the saved one), --beta and --xe-lr applied from the
    resumed step on; now the checkpoint's recipe must match, and the flags that do not change results may change."""
    out = tmp_path / "run"
    run(scorer, out, "xe", "--xe-steps", "2", *QUICK)
    with pytest.raises(ManifestError, match=r"\(--xe-lr 0.001 there, 0.01 now\); pass a new --out, or "
                                            r"--overwrite to start afresh"):
        run(scorer, out, "xe", "--xe-steps", "2", "--xe-lr", "0.01", "--resume", *QUICK)
    run(scorer, out, "dico", "--steps", "2", *QUICK)
    with pytest.raises(ManifestError,
                       match=r"other settings \(--beta 0.2 there, 0.5 now, --lr 0.0001 there, 0.001 now\); pass a "):
        run(scorer, out, "dico", "--steps", "3", "--lr", "1e-3", "--beta", "0.5", "--resume", *QUICK)
    run(scorer, tmp_path / "other", "xe", "--xe-steps", "1", "--seed", "1", *QUICK)
    with pytest.raises(ManifestError, match=r"--init 'sha256:\w{16}' there, 'sha256:\w{16}' now"):  # another start
        run(scorer, out, "dico", "--steps", "3", "--init", str(tmp_path / "other" / "xe" / "last.pt"), "--resume",
            *QUICK)
    # more steps, micro-batches, saves every step: the same run, continued
    run(scorer, out, "dico", "--steps", "3", "--micro-batch-size", "2", "--save-every", "1", "--resume", *QUICK)
    assert [row["step"] for row in train_rows(out, "dico")] == [1, 2, 3]


def test_a_resumed_run_with_another_lr_is_refused_and_with_the_same_flags_continues(scorer, tmp_path):
    """`dico --resume` with another --lr would load the optimiser state, whose learning rate is the saved one, and go
    on at the old rate without a word: it is refused, naming --lr with the saved and the wanted values, before any
    step; with the same flags the run continues from its step at its learning rate."""
    out = tmp_path / "run"
    run(scorer, out, "xe", "--xe-steps", "1", *QUICK)
    run(scorer, out, "dico", "--steps", "1", "--lr", "1e-3", *QUICK)
    with pytest.raises(ManifestError, match=r"last.pt holds a run of other settings \(--lr 0.001 there, 0.0005 now\)"):
        run(scorer, out, "dico", "--steps", "2", "--lr", "5e-4", "--resume", *QUICK)
    assert [row["step"] for row in train_rows(out, "dico")] == [1]  # nothing trained at either rate
    run(scorer, out, "dico", "--steps", "2", "--lr", "1e-3", "--resume", *QUICK)
    rows = train_rows(out, "dico")
    assert [row["step"] for row in rows] == [1, 2] and rows[-1]["lr"] == 1e-3
    assert dico.load_checkpoint(out / "dico" / "last.pt")["optimizer"]["param_groups"][0]["lr"] == 1e-3


def test_every_flag_is_in_the_recipe_or_free_to_change_on_resume():
    """Each flag either decides a stage's results (dico.RECIPE_FLAGS: a resume with another value is refused, as
    --lr above) or is listed in dico.FREE_ON_RESUME: a new flag in neither fails here instead of being ignored."""
    fields = {f.name for f in dataclasses.fields(dico.Args)}
    recipe, free = set().union(*dico.RECIPE_FLAGS.values()), set(dico.FREE_ON_RESUME)
    assert not recipe & free, f"in both lists: {sorted(recipe & free)}"
    assert recipe | free == fields, (
        f"in neither: {sorted(fields - recipe - free)}, not flags: {sorted(recipe | free - fields)}")


def test_a_rerun_never_replaces_a_finished_run_unasked(scorer, tmp_path):
    """A rerun without --resume overwrote best.pt (a finished run's CIDEr 1.88 became 0.0068) and appended its rows."""
    out = tmp_path / "run"
    run(scorer, out, "xe", "--xe-steps", "2", *QUICK)
    before = (out / "xe" / "best.pt").read_bytes()
    with pytest.raises(SystemExit, match=rf"^error: {out / 'xe'} already holds a run \(last.pt, best.pt, log.jsonl, "
                                         r"metrics.json\): pass --resume to continue it, --overwrite to replace it"):
        run(scorer, out, "xe", "--xe-steps", "2", "--seed", "1", *QUICK)
    assert (out / "xe" / "best.pt").read_bytes() == before
    run(scorer, out, "xe", "--xe-steps", "2", "--seed", "1", "--overwrite", *QUICK)
    assert [row["step"] for row in map(json.loads, (out / "xe" / "log.jsonl").read_text().splitlines())] == [0, 1, 2, 2]
    assert dico.load_checkpoint(out / "xe" / "best.pt")["recipe"]["seed"] == 1


def test_a_resumed_log_holds_each_step_once(scorer, tmp_path, monkeypatch):
    """Killed after step 3 with last.pt at step 2: the resumed run logged steps 3 (and its validation) twice."""
    real_write_log = dico.write_log

    def killed_before_step_4(path, row):
        if row["step"] == 4 and "loss" in row:
            raise KeyboardInterrupt
        real_write_log(path, row)

    monkeypatch.setattr(dico, "write_log", killed_before_step_4)
    out, flags = tmp_path / "run", ["--xe-steps", "4", "--xe-eval-every", "3", "--val-images", "2"]
    with pytest.raises(KeyboardInterrupt):
        run(scorer, out, "xe", *flags)
    monkeypatch.setattr(dico, "write_log", real_write_log)
    run(scorer, out, "xe", *flags, "--resume")
    rows = [json.loads(line) for line in (out / "xe" / "log.jsonl").read_text().splitlines()]
    assert [(row["step"], "val" in row) for row in rows] == [(0, True), (1, False), (2, False), (3, False), (3, True),
                                                             (4, False), (4, True)]


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--xe-batch-size", "-8"], "--xe-batch-size must be at least 1, got -8"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--xe-steps", "-3"], "--xe-steps must be at least 1, got -3"),
    (["--beams", "1"], "--beams must be at least 2, got 1"),
    (["--eval-beam", "0"], "--eval-beam must be at least 1, got 0"),
    (["--save-every", "0"], "--save-every must be at least 1, got 0"),
    (["--micro-batch-size", "-1"], "--micro-batch-size must be at least 0, got -1"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--tau", "-5"], "--tau must be a positive number, got -5.0"),
    (["--beta", "0"], "--beta must be a positive number, got 0.0"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--xe-lr", "inf"], "--xe-lr must be a positive number, got inf"),
    (["--xe-warmup", "1.5"], "--xe-warmup must be in [0, 1], got 1.5"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--heads", "3"], "--d-model (32) must be a multiple of --heads (3)"),
    (["--resume", "--overwrite"], "--resume continues the run in --out, --overwrite replaces it: pass one"),
])
def test_flags_out_of_range_are_one_line_naming_the_flag(scorer, tmp_path, flags, message):
    """Checked at start-up, before anything is read or written (`--beams 1` skipped every DiCO step: no loser)."""
    with pytest.raises(SystemExit) as exit_:
        run(scorer, tmp_path / "run", "dico", *flags)
    assert exit_.value.code == f"error: {message}"
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_says_so(scorer, tmp_path):
    """Not an error from loading the encoder's weights onto it (which blamed --encoder-pretrained)."""
    with pytest.raises(DeviceError, match="--device cuda: CUDA is not available on this machine"):
        run(scorer, tmp_path / "run", "eval", "--device", "cuda", "--checkpoints", "x.pt")


def test_the_command_line_ends_expected_errors_with_one_line(tmp_path):
    """`python dico.py ...`: exit status 1 and one line on stderr, no traceback, for a flag and for a missing file."""
    import subprocess
    import sys

    for flags, line in ((["dico", "--beams", "1"], "error: --beams must be at least 2, got 1"),
                        (["xe", "--train-manifest", str(tmp_path / "missing.jsonl"), "--pacs-checkpoint", "p.pth"],
                         f"error: manifest not found: {tmp_path / 'missing.jsonl'} (--debug shows the traceback)")):
        done = subprocess.run([sys.executable, dico.__file__, *flags, "--out", str(tmp_path / "run")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and done.stderr.strip().splitlines() == [line], done.stderr[-2000:]


def test_an_encoder_that_cannot_be_loaded_is_one_line_naming_its_flag(scorer, tmp_path):
    """The sweep's d-xe-missing-encoder: a ScorerLoadError traceback naming load_clip's argument, not dico's flag;
    --debug keeps the traceback."""
    missing = str(tmp_path / "enc.pt")
    argv = [*tiny_args(scorer, tmp_path / "run", "xe"), "--xe-steps", "1", "--encoder-pretrained", missing]
    with pytest.raises(SystemExit) as exit_:
        dico.run_command(dico.main, argv)
    assert exit_.value.code == (f"error: --encoder-pretrained: pretrained={missing!r} is neither a file nor an "
                                "open_clip tag of micro-ViT-16 (its tags: none) (--debug shows the traceback)")
    with pytest.raises(ScorerLoadError, match="^--encoder-pretrained: "):
        dico.run_command(dico.main, [*argv, "--debug"])


def test_an_image_field_that_is_not_a_path_is_refused_naming_the_sample(scorer, tmp_path):
    """`image: 123` crashed XE with a TypeError naming no sample."""
    def number(split, records):
        if split == "train":
            records[1]["image"] = 123
        return records

    data = world_manifests(tmp_path, number)
    sample = read_manifest(tmp_path / "train.jsonl")[1]["id"]
    with pytest.raises(ManifestError, match=rf"train.jsonl \(id '{sample}'\): field 'image' must be a path, got 123"):
        run(scorer, tmp_path / "run", "xe", "--xe-steps", "1", *data)
