"""dico.py: beam search against exhaustive search, the loss wiring, SCST by hand, metrics, stages, resume."""

import itertools
import json
import math

import pytest
import torch

import dico
from common.clip_score import clip_s, pac_s, ref_clip_s, ref_pac_s
from common.clip_train import TrainConfig, ensure_miniature_scorer
from common.data import read_manifest
from common.miniature import WorldConfig, ensure_world
from kernels.dico import dico_loss_reference, sequence_logprobs

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
def world_in_scorer_root(scorer, monkeypatch):
    monkeypatch.setenv("BETTER_CAPTIONS_CACHE", str(scorer[1]))


def tiny_captioner(n_tokens=5, seed=0, max_len=3):
    torch.manual_seed(seed)
    model = dico.Captioner(n_tokens, bos=n_tokens - 2, eos=n_tokens - 1, visual_width=6, d_model=16, encoder_layers=1,
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
    assert all_tokens.shape[1] == 40
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
    _, all_logps = exhaustive(model, visual[:1], max_len=5)
    assert scores[0, 0] <= all_logps.max() + 1e-5  # beam search never beats the true optimum
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
    tokens, scores = dico.sample(model, visual, n=5, max_len=6)
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
    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    with torch.no_grad():
        ref_logps = logps(reference, visual, batch)
    terms = dico.dico_terms(logps(policy, visual, batch), ref_logps, rewards, valid, 0.2, 300.0, "torch")
    assert terms["loss"].item() == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: s = 0
    expected = dico_loss_reference(logps(policy, visual, batch), ref_logps, rewards, valid=valid)
    torch.testing.assert_close(terms["loss"], expected)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    terms["loss"].backward()
    optimizer.step()
    after = dico.dico_terms(logps(policy, visual, batch), ref_logps, rewards, valid, 0.2, 300.0, "torch")
    assert after["loss"].item() < math.log(2) and after["margin"] > 0  # winners up, weighted losers down
    assert all(torch.equal(ref_before[k], v) for k, v in reference.state_dict().items())
    assert any(not torch.equal(p, reference.state_dict()[k]) for k, p in policy.state_dict().items())


def test_scst_baseline_is_the_mean_of_the_other_candidates():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, 9.0, 0.5]])
    valid = torch.tensor([[True, True, True], [True, False, True]])
    policy_logps = torch.tensor([[-2.0, -4.0, -6.0], [-1.0, -5.0, -3.0]], requires_grad=True)
    n_tokens = torch.tensor([[2, 4, 3], [1, 5, 3]])
    terms = dico.scst_terms(policy_logps, n_tokens, rewards, valid)
    # row 0: b = (2.5, 2, 1.5), advantage (-1.5, 0, 1.5); row 1: the invalid 9.0 is ignored, b = (0.5, 0.5)
    advantage = torch.tensor([[-1.5, 0.0, 1.5], [0.0, 0.0, 0.0]])
    per_token = policy_logps.detach() / n_tokens
    expected = -(advantage * per_token).sum() / 5  # five usable candidates
    assert terms["loss"].item() == pytest.approx(expected.item())
    terms["loss"].backward()
    torch.testing.assert_close(policy_logps.grad, -advantage / n_tokens / 5)


def test_xe_loss_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
    targets, mask = torch.tensor([[0, 1]]), torch.tensor([[True, False]])
    assert dico.xe_loss(logits, targets, mask)["loss"].item() == pytest.approx(math.log(2))


def test_vocab_round_trip_and_restricted_errors():
    captions = ["a large red circle with the Aldora emblem on the left, on grass."]
    vocab = dico.Vocab.build(captions, restrict=True)
    ids = vocab.encode(captions[0], max_len=40)
    assert ids[-1] == vocab.eos and vocab.decode(ids) == captions[0].lower()
    assert len(vocab.encode(captions[0], max_len=5)) == 5
    with pytest.raises(ValueError, match="outside the captioner's vocabulary"):
        vocab.encode("a purple triangle", max_len=40)
    assert dico.Vocab.build(captions, restrict=False).pad == 49408


def test_collapse_indicators_by_hand():
    out = dico.collapse_indicators(["a red circle, a red circle, a red circle.", "a blue square."])
    assert out["vocab"] == 5 and out["distinct"] == 1.0 and out["length"] == 6.0
    assert out["rep_3gram"] == pytest.approx((7 - 3) / 2)  # 7 trigrams, 3 distinct; none in the second


def test_metrics_match_common_clip_score(scorer):
    path, _ = scorer
    args = dico.resolve(dico.Args(world=WORLD, encoder_model="micro-ViT-16", encoder_pretrained=path,
                                  clip_s_model="micro-ViT-16", clip_s_pretrained=path, pacs_model="micro-ViT-16",
                                  pacs_pretrained=path, device="cpu"))
    records = dico.load_split(args, "test")[:5]
    bank = dico.ImageBank(args, records)
    assert bank.visual_tokens([0, 1]).shape == (2, 1 + 16, 32)  # CLS + 4x4 patches, width 32
    captions = ["a red circle.", "two squares on sand.", "a small green cross on the left, on water.", "snow.", "x"]
    metrics = dico.caption_metrics(args, bank, list(range(5)), captions)
    bundle = dico.load_scorer(args, "micro-ViT-16", path)
    images, refs = [dico.image_path(r) for r in records], [r["refs"] for r in records]
    kw = dict(progress=False)
    assert metrics["CLIP-S"] == pytest.approx(clip_s(bundle, images, captions, **kw)["mean"], abs=1e-5)
    assert metrics["RefCLIP-S"] == pytest.approx(ref_clip_s(bundle, images, captions, refs, **kw)["mean"], abs=1e-5)
    assert metrics["PAC-S"] == pytest.approx(pac_s(bundle, images, captions, **kw)["mean"], abs=1e-5)
    assert metrics["RefPAC-S"] == pytest.approx(ref_pac_s(bundle, images, captions, refs, **kw)["mean"], abs=1e-5)
    perfect = dico.caption_metrics(args, bank, list(range(5)), [r["caption"] for r in records])
    assert perfect["BLEU-4"] == pytest.approx(1.0) and perfect["names_kept"] == 1.0 and perfect["hallucinated"] == 0


def test_every_stage_runs_and_writes_its_files(scorer, tmp_path):
    out = tmp_path / "run"
    xe = dico.main(tiny_args(scorer, out, "xe", "--xe-steps", "4"))
    assert (out / "xe" / "best.pt").exists() and (out / "xe" / "last.pt").exists()
    log = [json.loads(line) for line in (out / "xe" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "loss" in row] == [1, 2, 3, 4]
    assert math.isfinite(xe["best_val_RefPAC-S"])
    for algo in ("dico", "scst"):
        dico.main(tiny_args(scorer, out, "dico", "--algo", algo, "--steps", "2"))
        rows = [json.loads(line) for line in (out / algo / "log.jsonl").read_text().splitlines()]
        train_rows = [row for row in rows if "loss" in row]
        assert len(train_rows) == 2 and all(math.isfinite(row["loss"]) for row in train_rows)
        keys = {"reward_winner", "reward_mean"} | ({"gamma_entropy", "margin", "reward_accuracy"} if algo == "dico" else set())
        assert keys <= set(train_rows[0])
        if algo == "dico":
            assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    results = dico.main(tiny_args(scorer, out, "eval"))
    assert set(results) == {"ground truth", "xe/best", "dico/best", "scst/best"}
    assert {"CIDEr", "BLEU-4", "CLIP-S", "RefPAC-S", "vocab", "distinct", "names_kept"} <= set(results["xe/best"])
    assert (out / "eval" / "table.md").read_text().startswith("| model |")
    assert len(read_manifest(out / "eval" / "captions-dico-best.jsonl")) == 6


def test_resume_continues_from_the_saved_step(scorer, tmp_path):
    straight = dico.main(tiny_args(scorer, tmp_path / "a", "xe", "--xe-steps", "4", "--eval-every", "100"))
    dico.main(tiny_args(scorer, tmp_path / "b", "xe", "--xe-steps", "2", "--eval-every", "100"))
    dico.main(tiny_args(scorer, tmp_path / "b", "xe", "--xe-steps", "4", "--eval-every", "100", "--resume"))
    steps = [json.loads(line).get("step") for line in (tmp_path / "b" / "xe" / "log.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1 and steps[-1] == 4  # steps 1, 2 were not run again
    a, b = (dico.load_checkpoint(tmp_path / run / "xe" / "last.pt") for run in ("a", "b"))
    assert a["step"] == b["step"] == 4 and straight["last"].endswith("last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_corrupted_checkpoint_gives_a_clear_error(scorer, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(RuntimeError, match="unreadable"):
        dico.main(tiny_args(scorer, tmp_path / "run", "dico", "--init", str(bad), "--steps", "1"))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(RuntimeError, match="not a dico.py checkpoint"):
        dico.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="run the xe stage"):
        dico.load_checkpoint(tmp_path / "missing.pt")


def test_nan_loss_stops_with_the_step(scorer, tmp_path, monkeypatch):
    def poisoned(logits, targets, mask):
        return {"loss": logits.sum() * float("nan")}

    monkeypatch.setattr(dico, "xe_loss", poisoned)
    with pytest.raises(FloatingPointError, match="at step 0"):
        dico.main(tiny_args(scorer, tmp_path / "run", "xe", "--xe-steps", "3"))
    assert not (tmp_path / "run" / "xe" / "last.pt").exists()


def test_real_run_without_pacs_checkpoint_names_the_flag(tmp_path):
    args = dico.Args(train_manifest="x.jsonl")
    with pytest.raises(ValueError, match="--pacs-checkpoint"):
        dico.evaluators(args)


@pytest.mark.slow
def test_miniature_stage_end_to_end(scorer, tmp_path):
    result = dico.main(tiny_args(scorer, tmp_path / "mini", "miniature", "--xe-steps", "6", "--steps", "4"))
    assert set(result["per_seed"][0]) >= {"ground truth", "xe/best", "dico/last", "scst/last"}
    assert (tmp_path / "mini" / "results.md").exists()
