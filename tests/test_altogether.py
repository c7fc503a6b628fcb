"""altogether.py: the caption-only loss mask, the prefix layout that training and generate() share
(teacher-forced = generated, batched = one at a time), what a step trains, generation into a manifest
with tiny random OPT and GPT-2 decoders, resuming a killed captioning job, the training set's image
embeddings in one memory-mapped file (the in-memory floats, computed once, resumed by chunk, two gloo
ranks writing one process's file), prompt truncation, empty alt-text, the miniature main() at toy
size, and the documented real commands with tiny random weights of the real architectures (fp16 OPT
files, the open_clip tags), one under torchrun."""

import json
import logging

import numpy as np
import pytest
import torch

import altogether
from common import embedding_cache
from common.caption_eval import load_frozen_encoder
from common.causal_lm import captioner_from_payload, world_tokenizer
from common.clip_score import ScorerLoadError, clip_s, load_clip
from common.data import BadSampleError, ManifestError, NonFiniteError, read_manifest, write_manifest
from common.miniature import WorldConfig, ensure_world
from common.record_texts import training_rows
from experiments import altogether_miniature
from tests.realarch import run_torchrun, save_hf, serve_open_clip_tag

MICRO = "micro-ViT-16"
TINY_WORLD = WorldConfig(n_train=32, n_val=6, n_test=12)
SMALL = ["--clip-model", MICRO, "--clip-pretrained", "None", "--prefix-length", "3", "--mapper-layers", "1",
         "--batch-size", "8", "--lr", "1e-3", "--warmup", "1", "--max-caption-tokens", "24", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_world(TINY_WORLD, tmp_path_factory.mktemp("world"))


def load_encoder(args):
    """The frozen encoder of `args`, as the training stages load it."""
    return load_frozen_encoder(args.clip_model, args.clip_pretrained, args.device, args.world, args.scorer)


def tokenizer():
    return world_tokenizer(["a red circle on grass. Aldora stock photo; blue square"] * 3, min_frequency=1)


# ---- sequence layout and loss mask -----------------------------------------------------------


def test_labels_cover_exactly_the_caption_tokens_with_and_without_padding():
    tok = tokenizer()
    n_visual = 4
    # with padding: prompts of 3 and 0 words, captions of 2 and 4 words (+ EOS)
    prompt_ids, prompt_mask = altogether.encode_prompts(tok, ["Aldora stock photo", ""], 128)
    caption_ids, caption_mask = altogether.encode_captions(tok, ["red circle", "a blue square grass"], 64)
    assert prompt_mask.tolist() == [[1, 1, 1], [0, 0, 0]]  # left-padded
    assert caption_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]  # right-padded, EOS included
    labels = altogether.sequence_labels(n_visual, prompt_mask, caption_ids, caption_mask)
    assert labels.shape == (2, n_visual + 3 + 5)
    caption_positions = [[7, 8, 9], [7, 8, 9, 10, 11]]
    for row, positions in enumerate(caption_positions):
        assert (labels[row] != altogether.IGNORE).nonzero().flatten().tolist() == positions
        assert labels[row, positions].tolist() == caption_ids[row, caption_mask[row]].tolist()
    assert labels[0, 9].item() == tok.eos_token_id
    # no padding anywhere (the case whose official mask is all zero): every caption token counts
    prompt_ids, prompt_mask = altogether.encode_prompts(tok, ["red circle", "blue square"], 128)
    caption_ids, caption_mask = altogether.encode_captions(tok, ["on grass", "a circle"], 64)
    assert prompt_mask.all() and caption_mask.all()
    labels = altogether.sequence_labels(n_visual, prompt_mask, caption_ids, caption_mask)
    assert ((labels != altogether.IGNORE).sum(dim=1) == 3).all()
    assert (labels[:, n_visual + 2:] == caption_ids).all()
    # a pad id equal to EOS (GPT-2) still trains the EOS: the mask decides, not the id
    tok.pad_token = tok.eos_token
    caption_ids, caption_mask = altogether.encode_captions(tok, ["red", "a blue square"], 64)
    labels = altogether.sequence_labels(0, torch.zeros(2, 0, dtype=torch.long), caption_ids, caption_mask)
    assert labels[0].tolist() == [caption_ids[0, 0].item(), tok.eos_token_id, -100, -100]


def test_loss_is_the_mean_cross_entropy_of_caption_tokens_and_positions_skip_pads():
    vocab = 7
    logits = torch.randn(1, 6, vocab)
    labels = torch.tensor([[-100, -100, 3, 4, -100, -100]])  # tokens 3 and 4 at positions 2 and 3; 3 others ignored
    terms = altogether.caption_loss(logits, labels)
    expected = -(logits[0, 1].log_softmax(-1)[3] + logits[0, 2].log_softmax(-1)[4]) / 2
    assert torch.allclose(terms["loss"], expected) and terms["tokens"].item() == 2
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])
    assert altogether.position_ids(mask).tolist() == [[0, 1, 1, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 5]]


def test_long_alt_text_keeps_its_first_128_tokens_and_empty_alt_text_is_no_prompt():
    tok = tokenizer()
    words = ("red circle Aldora blue " * 100).split()  # 400 words
    ids, mask = altogether.encode_prompts(tok, [" ".join(words), ""], 128)
    assert ids.shape == (2, 128) and mask[0].all() and not mask[1].any()
    assert tok.decode(ids[0]) == " ".join(words[:128])
    ids, mask = altogether.encode_prompts(tok, ["", ""], 128)
    assert ids.shape == (2, 0)
    record = {"alt_text": ["Aldora stock photo", " ", "Aldora stock photo", "red circle"]}
    assert altogether.inference_prompt(record, "alt_text") == "Aldora stock photo; red circle"
    assert altogether.inference_prompt({"alt_text": ""}, "alt_text") == ""


def test_prompts_and_captions_get_no_special_tokens_from_a_tokenizer_that_adds_a_bos():
    """OPT's tokenizer puts </s> in front of every text it encodes with special tokens; V starts the sequence
    instead."""
    from tokenizers.processors import TemplateProcessing

    tok = tokenizer()
    words = tok("red circle", add_special_tokens=False)["input_ids"]
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="</s> $A",
                                                              special_tokens=[("</s>", tok.eos_token_id)])
    assert tok("red circle")["input_ids"] == [tok.eos_token_id] + words  # as OPT's
    ids, mask = altogether.encode_prompts(tok, ["red circle"], 128)
    assert ids.tolist() == [words] and mask.tolist() == [[1, 1]]
    ids, mask = altogether.encode_captions(tok, ["red circle"], 64)
    assert ids.tolist() == [words + [tok.eos_token_id]] and mask.tolist() == [[True] * 3]


def test_decoding_is_the_papers_sampling_or_greedy_or_beam():
    options = {mode: altogether.decoding_options(altogether.Args(decoding=mode))
               for mode in ("sample", "greedy", "beam")}
    assert options == {"sample": {"do_sample": True, "temperature": 0.2, "top_p": 0.7},
                       "greedy": {"do_sample": False, "num_beams": 1},
                       "beam": {"do_sample": False, "num_beams": 3}}


def test_training_pairs_follow_the_stages():
    args = altogether.Args(p_drop_alt=0.0, target_field="round3")
    # the longest is neither the first nor the last in order nor the largest string ("zebra alt" is)
    record = {"alt_text": ["zebra alt", "a longest alt-text of all", "mid alt text"], "round3": "re-aligned"}
    rng = np.random.default_rng(0)
    for _ in range(10):
        prompt, target = altogether.training_pair(record, "pretrain", args, rng)
        assert target == "a longest alt-text of all" and prompt in ("zebra alt", "mid alt text")
    assert altogether.training_pair(record, "finetune", args, rng) == (
        "zebra alt; a longest alt-text of all; mid alt text", "re-aligned")
    assert altogether.training_pair({"alt_text": "only one"}, "pretrain", args, rng) == ("", "only one")
    half = altogether.Args(p_drop_alt=0.5, target_field="round3")
    dropped = [altogether.training_pair(record, "finetune", half, rng)[0] == ""
               for _ in range(2000)]
    assert abs(np.mean(dropped) - 0.5) < 0.05


# ---- one layout for training and generation ----------------------------------------------------

PROMPTS = ["Aldora stock photo red circle", "blue square", ""]  # full (the longest: no pads), partial, empty


def tiny_captioner(tok, clip_dim=16, decoder="opt"):
    """OPT derives positions from the attention mask when given none; GPT-2 counts every slot, pads included:
    with GPT-2, a forward or a generate() that drops the position ids gives the real tokens other positions."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
               eos_token_id=tok.eos_token_id)
    if decoder == "opt":
        model = OPTForCausalLM(OPTConfig(hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2, ffn_dim=64,
                                         num_attention_heads=2, max_position_embeddings=64, **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids))
    return altogether.Captioner(model, clip_dim, prefix_length=3, mapper_layers=1).eval()


def generated(captioner, tok, img_emb, prompts, steps=5):
    """Greedy generate(): (new tokens (B, S), raw logits of each step (B, S, V))."""
    ids, mask = altogether.encode_prompts(tok, prompts, 128)
    out = captioner.generate(img_emb, ids, mask, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return out.sequences, torch.stack(out.logits, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("decoder", ["opt", "gpt2"])
def test_teacher_forced_logits_equal_generate_step_logits_for_full_partial_empty_and_mixed_prompts(decoder):
    tok = tokenizer()
    captioner = tiny_captioner(tok, decoder=decoder)
    img_emb = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    for rows in ([0], [1], [2], [0, 1, 2], [2, 1]):  # alone, and batches mixing full, partial and empty prompts
        prompts = [PROMPTS[i] for i in rows]
        tokens, step_logits = generated(captioner, tok, img_emb[rows], prompts)
        ids, mask = altogether.encode_prompts(tok, prompts, 128)
        # the training forward on the generated caption: the slot before each caption token predicts it
        logits = captioner(img_emb[rows], ids, mask, tokens, torch.ones_like(tokens, dtype=torch.bool))
        prefix, steps = 3 + ids.shape[1], tokens.shape[1]
        assert torch.allclose(logits[:, prefix - 1:prefix - 1 + steps], step_logits, atol=1e-5), rows


@torch.no_grad()
@pytest.mark.parametrize("decoder", ["opt", "gpt2"])
def test_batched_generation_equals_one_at_a_time(decoder):
    tok = tokenizer()
    captioner = tiny_captioner(tok, decoder=decoder)
    img_emb = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    tokens, step_logits = generated(captioner, tok, img_emb, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone_tokens, alone_logits = generated(captioner, tok, img_emb[i:i + 1], [prompt])
        assert torch.equal(tokens[i, :alone_tokens.shape[1]], alone_tokens[0]), prompt
        assert torch.allclose(step_logits[i, :alone_logits.shape[1]], alone_logits[0], atol=1e-5), prompt


def test_the_paper_settings_are_the_defaults():
    args = altogether.Args()
    # 40 visual tokens, 8 mapper layers, prompts of 128 tokens dropped half of the time, OPT-1.3B on MetaCLIP ViT-H/14
    assert (args.prefix_length, args.mapper_layers, args.max_prompt_tokens, args.p_drop_alt) == (40, 8, 128, 0.5)
    assert (args.decoder, args.clip_model, args.clip_pretrained) == ("facebook/opt-1.3b", "ViT-H-14-quickgelu",
                                                                     "metaclip_fullcc")
    # AdamW lr 2e-4, warm-up 200, wd 0.2; captions sampled at T = 0.2, top-p 0.7, up to 192 new tokens
    assert (args.lr, args.warmup, args.weight_decay, args.max_new_tokens) == (2e-4, 200, 0.2, 192)
    assert altogether.decoding_options(args) == {"do_sample": True, "temperature": 0.2, "top_p": 0.7}
    optimizer = altogether.make_optimizer(tiny_captioner(tokenizer()), args)
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6
    decay = {(p.ndim >= 2, group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    assert decay == {(True, 0.2), (False, 0.0)}  # none on biases and norms


# ---- a training step -------------------------------------------------------------------------


def test_a_step_trains_mapper_and_decoder_but_not_the_clip_encoder(world, tmp_path):
    args = altogether.parse(altogether.Args, SMALL + ["pretrain", "--decoder", "tiny-opt", "--out", str(tmp_path),
                                                     "--pretrain-steps", "1"], altogether.PRESETS)
    records = read_manifest(world / "train.jsonl")
    encoder = load_encoder(args)
    clip_before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    img_emb, readable = embedding_cache.embed_records(encoder, records, strict=True)
    assert readable.all() and torch.allclose(img_emb.norm(dim=-1), torch.ones(len(records)))
    captioner, tok = altogether.new_captioner(args, img_emb.shape[1], [r["alt_text"] for r in records])
    before = {k: v.clone() for k, v in captioner.state_dict().items()}
    log = altogether.train_stage(args, "pretrain", captioner, tok, encoder, records, img_emb)
    assert len(log["history"]) == 1 and np.isfinite(log["history"][0]["loss"])
    after = captioner.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("mapper.project") for k in changed) and "mapper.prefix" in changed
    assert any(k.startswith("mapper.transformer") for k in changed)
    assert any(k.startswith("decoder.") and "layers" in k for k in changed)
    assert all(torch.equal(clip_before[k], v) for k, v in encoder.model.state_dict().items())
    assert not any(p.requires_grad and p.grad is not None for p in encoder.model.parameters())
    payload = torch.load(tmp_path / "pretrain.pt", weights_only=True)
    rebuilt, _ = captioner_from_payload(payload, altogether.rebuilt_captioner)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in after.items())


def test_nan_loss_stops_with_the_step(world, tmp_path, monkeypatch):
    monkeypatch.setattr(altogether, "caption_loss", lambda logits, labels: {"loss": torch.tensor(float("nan"))})
    with pytest.raises(FloatingPointError, match="at step 0"):
        altogether.main(SMALL + ["pretrain", "--decoder", "tiny-opt", "--data", str(world / "train.jsonl"),
                                 "--out", str(tmp_path), "--pretrain-steps", "2"])
    assert not (tmp_path / "pretrain.pt").exists()


# ---- image embeddings: one memory-mapped file per stage, computed once ---------------------------


def micro_encoder():
    return load_encoder(altogether.parse(altogether.Args, SMALL + ["pretrain"], altogether.PRESETS))


def embedding_inputs(world, tmp_path):
    """The train split with one image missing, the micro encoder, and the signature of the pair."""
    records = [plain(r, world) for r in read_manifest(world / "train.jsonl")]
    records[5]["image"] = str(tmp_path / "missing.png")
    write_manifest(tmp_path / "in.jsonl", records)
    records = read_manifest(tmp_path / "in.jsonl")
    encoder = micro_encoder()
    args = altogether.parse(altogether.Args, SMALL + ["pretrain"], altogether.PRESETS)
    signature = embedding_cache.embedding_signature(records, encoder, altogether.encoder_source(args),
                                                    tmp_path / "in.jsonl")
    return records, encoder, signature


def count_embed_calls(monkeypatch, fail_at: int | None = None) -> dict:
    """Wrap embed_records: count its calls; the `fail_at`-th one dies as a killed job would."""
    real, calls = embedding_cache.embed_records, {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(embedding_cache, "embed_records", counted)
    return calls


def test_embedding_file_holds_the_in_memory_embeddings_and_a_second_run_maps_it(world, tmp_path, monkeypatch, caplog):
    records, encoder, signature = embedding_inputs(world, tmp_path)
    emb, readable = embedding_cache.embed_records(encoder, records, strict=False)  # the former in-memory pass
    mapped, mask = embedding_cache.image_embeddings(encoder, records, tmp_path / "out", "pretrain", signature, False)
    files = embedding_cache.embedding_files(tmp_path / "out", "pretrain")
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float32 and not mapped.flags.writeable
    assert torch.equal(torch.from_numpy(np.array(mapped)), emb)  # bit for bit: the miniature's captions stay the same
    assert mask.dtype == bool and mask.tolist() == readable.tolist() and not mask[5] and mask.sum() == len(records) - 1
    sidecar = json.loads(files["sidecar"].read_text())
    assert (sidecar["n"], sidecar["dim"], sidecar["encoder"]) == (len(records), emb.shape[1], MICRO)
    assert sidecar["manifest"] == str((tmp_path / "in.jsonl").resolve()) and not files["parts"].exists()
    calls = count_embed_calls(monkeypatch)
    files["parts"].mkdir()  # as a job killed after writing its sidecar leaves them
    again, _ = embedding_cache.image_embeddings(encoder, records, tmp_path / "out", "pretrain", signature, False)
    assert calls["n"] == 0 and np.array_equal(again, mapped) and not files["parts"].exists()
    # other records (or encoder): the file is computed again, and the log says what differs
    args = altogether.parse(altogether.Args, SMALL + ["pretrain"], altogether.PRESETS)
    fewer = embedding_cache.embedding_signature(records[1:], encoder, altogether.encoder_source(args),
                                                 tmp_path / "in.jsonl")
    with caplog.at_level("WARNING", logger="common.embedding_cache"):
        other, _ = embedding_cache.image_embeddings(encoder, records[1:], tmp_path / "out", "pretrain", fewer, False)
    assert calls["n"] == 1 and "records_sha256" in caplog.text and np.array_equal(other, mapped[1:])


def test_killed_embedding_job_resumes_from_its_finished_chunks_and_no_half_file_is_read(world, tmp_path, monkeypatch):
    records, encoder, signature = embedding_inputs(world, tmp_path)
    out, files = tmp_path / "out", embedding_cache.embedding_files(tmp_path / "out", "finetune")
    calls = count_embed_calls(monkeypatch, fail_at=3)  # 4 chunks of 8 rows: dies in the third
    with pytest.raises(KeyboardInterrupt):
        embedding_cache.image_embeddings(encoder, records, out, "finetune", signature, False, chunk_rows=8)
    assert not files["sidecar"].exists() and len(list(files["parts"].glob("chunk*.npz"))) == 2
    files["emb"].write_bytes(b"half a file")  # what a kill mid-merge would leave, without the .json
    calls = count_embed_calls(monkeypatch)
    mapped, mask = embedding_cache.image_embeddings(encoder, records, out, "finetune", signature, False, chunk_rows=8)
    assert calls["n"] == 2  # the two missing chunks only
    expected = [embedding_cache.embed_records(encoder, records[i:i + 8], False) for i in range(0, len(records), 8)]
    assert torch.equal(torch.from_numpy(np.array(mapped)), torch.cat([emb for emb, _ in expected]))
    assert mask.tolist() == torch.cat([ok for _, ok in expected]).tolist()


def _embedding_rank(rank, port, encoder, records, out, signature):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (libgomp is not fork-safe)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        embedding_cache.image_embeddings(encoder, records, out, "pretrain", signature, False, rank, 2, chunk_rows=6)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_write_the_embedding_file_of_one_process(world, tmp_path):
    """Ranks embed their chunks of 6 rows (0, 2, 4 / 1, 3, 5), rank 0 merges them after a barrier: one process's
    file."""
    from tests.realarch import free_port, run_forked_ranks

    records, encoder, signature = embedding_inputs(world, tmp_path)
    one, mask = embedding_cache.image_embeddings(encoder, records, tmp_path / "one", "pretrain", signature, False,
                                            chunk_rows=6)
    # the forked ranks inherit the encoder
    run_forked_ranks(_embedding_rank, (free_port(), encoder, records, tmp_path / "two", signature))
    two, two_mask = embedding_cache.image_embeddings(encoder, records, tmp_path / "two", "pretrain", signature, True)
    assert np.allclose(two, one, atol=1e-6) and two_mask.tolist() == mask.tolist()  # one thread vs the parent's
    assert json.loads(embedding_cache.embedding_files(tmp_path / "two", "pretrain")["sidecar"].read_text()) == signature


def test_training_reads_the_kept_records_rows_of_the_memmap_and_a_resume_embeds_nothing(world, tmp_path, monkeypatch):
    records = [plain(r, world) for r in read_manifest(world / "train.jsonl")][:16]
    records[0]["alt_text"], records[5]["alt_text"] = "", ""  # not trained on in stage 1: the rows shift past them
    records[3]["image"] = str(tmp_path / "missing.png")
    write_manifest(tmp_path / "in.jsonl", records)
    argv = SMALL + ["pretrain", "--decoder", "tiny-opt", "--data", str(tmp_path / "in.jsonl"), "--out", str(tmp_path)]
    seen, real_pair, real_rows = [], altogether.training_pair, altogether.embedding_rows

    def pair(record, *args):
        seen.append(record["id"])
        return real_pair(record, *args)

    def rows(img_emb, indices):
        assert isinstance(img_emb, np.memmap)
        batch = real_rows(img_emb, indices)
        seen.append(batch)
        return batch

    monkeypatch.setattr(altogether, "training_pair", pair)
    monkeypatch.setattr(altogether, "embedding_rows", rows)
    altogether.main(argv + ["--pretrain-steps", "1"])
    emb, _ = embedding_cache.embed_records(micro_encoder(), read_manifest(tmp_path / "in.jsonl"), strict=False)
    ids, batch = seen[:-1], seen[-1]
    assert len(ids) == 8 and not {records[i]["id"] for i in (0, 3, 5)} & set(ids)
    assert torch.equal(batch, emb[[[r["id"] for r in records].index(sample) for sample in ids]])
    calls = count_embed_calls(monkeypatch)
    log = altogether.main(argv + ["--pretrain-steps", "1"])
    assert log["resumed_from"] == 1 and calls["n"] == 0


# ---- generation with tiny random OPT and GPT-2 decoders ---------------------------------------


@pytest.fixture(scope="module")
def tiny_decoders(tmp_path_factory, world):
    """Random tiny OPT and GPT-2, saved as local folders with a word-level tokenizer of the world."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    root = tmp_path_factory.mktemp("decoders")
    records = read_manifest(world / "train.jsonl")
    tok = world_tokenizer([r["alt_text"] for r in records] + [r["caption"] for r in records], 1)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
               eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=1, ffn_dim=64,
                             num_attention_heads=2, max_position_embeddings=128, **ids)).save_pretrained(root / "opt")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=128, **ids)).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "opt")
    tok.pad_token = None  # GPT-2 ships no pad token: the script must cope
    tok.save_pretrained(root / "gpt2")
    return root


@pytest.mark.parametrize("name,decoding", [("opt", "sample"), ("gpt2", "beam")])
def test_pretrain_finetune_caption_and_eval_with_tiny_decoders(world, tiny_decoders, tmp_path, name, decoding):
    train = ["--data", str(world / "train.jsonl"), "--out", str(tmp_path)]
    log = altogether.main(SMALL + train + ["pretrain", "--decoder", str(tiny_decoders / name),
                                           "--pretrain-steps", "2"])
    assert [h["step"] for h in log["history"]] == [0, 1]
    log = altogether.main(SMALL + train + ["finetune", "--checkpoint", str(tmp_path / "pretrain.pt"),
                                           "--finetune-steps", "2"])
    assert np.isfinite(log["history"][-1]["loss"])
    out = tmp_path / "captioned" / "val.jsonl"
    counts = altogether.main(["caption", "--data", str(world / "val.jsonl"), "--out", str(out),
                              "--checkpoint", str(tmp_path / "finetune.pt"), "--decoding", decoding,
                              "--max-new-tokens", "6", "--gen-batch-size", "4", "--device", "cpu"])
    assert counts["written"] == 6
    captioned = read_manifest(out)
    assert [r["id"] for r in captioned] == [r["id"] for r in read_manifest(world / "val.jsonl")]
    assert all((out.parent / r["image"]).exists() for r in captioned)  # images re-rooted
    metrics = altogether.main(["eval", "--data", str(out), "--score-model", MICRO, "--score-pretrained",
                               "None", "--out", str(tmp_path / "eval.json"), "--device", "cpu"])
    # the eval stage's CLIP-S is common.clip_score's on the written captions (an empty caption scores 0)
    torch.manual_seed(0)  # the eval stage's random scorer
    bundle = load_clip(MICRO, None, "cpu")
    written = [(out.parent / r["image"], r["altogether"]) for r in captioned if r["altogether"].strip()]
    per_sample = clip_s(bundle, *zip(*written), progress=False)["per_sample"] if written else []
    assert metrics["altogether"]["CLIP-S"] == pytest.approx(100 * sum(per_sample) / len(captioned), abs=1e-4)
    assert metrics["altogether"]["empty"] == len(captioned) - len(written)
    assert metrics["alt_text"]["empty"] == 0


@pytest.fixture(scope="module")
def finetuned(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    altogether.main(SMALL + ["pretrain", "--decoder", "tiny-opt", "--data", str(world / "train.jsonl"),
                             "--out", str(out), "--pretrain-steps", "1"])
    return out / "pretrain.pt"


def test_checkpoint_rebuilds_an_fp32_decoder_whatever_dtype_its_config_records(finetuned):
    payload = torch.load(finetuned, weights_only=True)
    # what the config of a decoder loaded from fp16 files without an explicit dtype records
    payload["decoder_config"] = json.dumps({**json.loads(payload["decoder_config"]), "dtype": "float16"})
    captioner, _ = captioner_from_payload(payload, altogether.rebuilt_captioner)
    assert {p.dtype for p in captioner.parameters()} == {torch.float32}


@torch.no_grad()
def test_visual_tokens_take_the_dtype_of_a_half_precision_decoder():
    tok = tokenizer()
    captioner = tiny_captioner(tok)
    captioner.decoder.to(torch.bfloat16)  # the mapping network stays fp32
    img_emb = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    ids, mask = altogether.encode_prompts(tok, PROMPTS, 128)
    assert captioner.prefix_inputs(img_emb, ids, mask)[0].dtype == torch.bfloat16
    tokens, _ = generated(captioner, tok, img_emb, PROMPTS, steps=2)
    assert tokens.shape == (3, 2)


def test_killed_caption_job_resumes_without_lost_or_duplicated_ids(world, finetuned, tmp_path, monkeypatch):
    argv = ["caption", "--data", str(world / "test.jsonl"), "--out", str(tmp_path / "test.jsonl"),
            "--checkpoint", str(finetuned), "--gen-batch-size", "5", "--max-new-tokens", "4", "--device", "cpu"]
    real = altogether.generate_captions
    calls = {"n": 0}

    def dies_in_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(altogether, "generate_captions", dies_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        altogether.main(argv)
    with open(tmp_path / "test.jsonl", "ab") as handle:  # and a half-written line, as a kill mid-write leaves
        handle.write(b'{"id": "test-0000')
    monkeypatch.setattr(altogether, "generate_captions", real)
    counts = altogether.main(argv)
    assert counts["already_done"] == 5 and counts["written"] == 7
    ids = [r["id"] for r in read_manifest(tmp_path / "test.jsonl")]
    assert sorted(ids) == sorted(r["id"] for r in read_manifest(world / "test.jsonl")) and len(set(ids)) == len(ids)
    assert altogether.main(argv) == {"already_done": 12}


def test_empty_alt_text_unreadable_image_and_no_alt_mode(world, finetuned, tmp_path):
    records = read_manifest(world / "val.jsonl")[:3]
    rows = [{**{k: v for k, v in r.items() if k != "_root"}, "image": str(world / r["image"])} for r in records]
    rows[0]["alt_text"] = ""
    rows[1]["image"] = str(tmp_path / "missing.png")
    write_manifest(tmp_path / "in.jsonl", rows)
    write_manifest(tmp_path / "blanked.jsonl", [{**r, "alt_text": ""} for r in rows])
    captions = {}
    for data, use_alt in (("in", "--use-alt"), ("in", "--no-use-alt"), ("blanked", "--use-alt")):
        out = tmp_path / f"{data}{use_alt}.jsonl"
        counts = altogether.main(["caption", "--data", str(tmp_path / f"{data}.jsonl"), "--out", str(out),
                                  "--checkpoint", str(finetuned), "--decoding", "greedy", "--max-new-tokens", "4",
                                  "--device", "cpu", use_alt])
        assert counts["written"] == 2 and counts["unreadable_images"] == 1
        assert [r["id"] for r in read_manifest(out)] == [records[0]["id"], records[2]["id"]]
        captions[data, use_alt] = [r["altogether"] for r in read_manifest(out)]
    # w/o alt captions as if every alt-text were empty; the row with an alt-text gets another caption with it
    assert captions["in", "--no-use-alt"] == captions["blanked", "--use-alt"]
    assert captions["in", "--use-alt"][0] == captions["in", "--no-use-alt"][0]  # its alt-text is empty
    assert captions["in", "--use-alt"][1] != captions["in", "--no-use-alt"][1]
    with pytest.raises(Exception, match="missing.png"):
        altogether.main(["caption", "--data", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "s.jsonl"),
                         "--checkpoint", str(finetuned), "--device", "cpu", "--strict"])


def test_missing_decoder_and_checkpoint_name_the_flag(world, tmp_path):
    with pytest.raises(RuntimeError, match="--decoder"):
        altogether.main(SMALL + ["pretrain", "--data", str(world / "val.jsonl"), "--out", str(tmp_path),
                                 "--decoder", str(tmp_path / "no-such-model")])
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        altogether.main(["caption", "--data", str(world / "val.jsonl"), "--out", str(tmp_path / "x.jsonl"),
                         "--checkpoint", str(tmp_path / "none.pt")])


# ---- the default run, in miniature -----------------------------------------------------------


def test_smoke_preset_runs_every_stage_of_the_miniature_run(tmp_path):
    """The header's first command: both stages, captioning with and without alt-text, the table; the smoke preset's
    values ran (a flag given beside it wins)."""
    results = altogether.main(["--preset", "smoke", "--max-new-tokens", "5", "--out", str(tmp_path)])
    assert set(results["rows"]) == set(altogether_miniature.ROWS)
    assert results["rows"]["ground truth"]["names kept %"] == [100.0]
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {row} |" in table for row in altogether_miniature.ROWS)
    assert json.loads((tmp_path / "results.json").read_text())["preset"] == {"name": "smoke",
                                                                          "values": altogether.PRESETS["smoke"]}
    history = torch.load(tmp_path / "seed0" / "finetune.pt", weights_only=True)["history"]
    assert [h["step"] for h in history] == [0, 1, 2]
    examples = json.loads((tmp_path / "seed0" / "examples.json").read_text())  # word-level tokens: at most 5 words
    assert examples and all(len(e[row].split()) <= 5 for e in examples
                            for row in ("Altogether w/ alt", "Altogether w/o alt"))


def test_presets_set_defaults_and_a_given_flag_wins_even_at_the_paper_value():
    paper, miniature = altogether.Args(), altogether.parse(altogether.Args, [], altogether.PRESETS)
    assert (miniature.stage, miniature.preset, miniature.lr, miniature.decoder) == ("miniature", "miniature", 1e-3,
                                                                                   "tiny-opt")
    given = altogether.parse(altogether.Args, ["miniature", "--lr", str(paper.lr), "--decoder", paper.decoder],
                             altogether.PRESETS)
    assert (given.lr, given.decoder, given.batch_size) == (paper.lr, paper.decoder, 32)
    assert altogether.parse(altogether.Args, ["caption"], altogether.PRESETS) == altogether.Args(stage="caption",
                                                                                                   preset="paper")
    smoke = altogether.parse(altogether.Args, ["--preset", "smoke"], altogether.PRESETS)
    assert (smoke.world.n_train, smoke.scorer.steps, smoke.finetune_steps) == (48, 5, 3)


# ---- the documented real commands: tiny random weights of the real architectures, offline ----------

# facebook/opt-1.3b's config.json with the sizes shrunk (24 layers of 2048, 32 heads, FFN 8192 -> 2 of 32, 2 heads,
# FFN 128) and every flag kept: pre-norm, no embedding projection, ReLU, 2048 learned positions, pad 1, BOS = EOS = 2
OPT_1_3B_TINY = dict(hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128,
                     do_layer_norm_before=True, activation_function="relu", max_position_embeddings=2048, dropout=0.1,
                     attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)


def opt_tokenizer(texts):
    """OPT's tokenizer class and special tokens (<s> 0, <pad> 1, </s> 2, <unk> 3): byte-level BPE trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return GPT2TokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                             unk_token="<unk>")


@pytest.fixture(scope="module")
def opt_1_3b(tmp_path_factory, world):
    """A local folder standing for facebook/opt-1.3b as the hub ships it: fp16 weights, BPE tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path_factory.mktemp("opt-1.3b")
    records = read_manifest(world / "train.jsonl")
    tok = opt_tokenizer([r["alt_text"] for r in records] + [r["caption"] for r in records])
    torch.manual_seed(0)
    rows = -(-len(tok) // 8) * 8  # the hub's embedding has more rows than the tokenizer has tokens (50272 > 50265)
    save_hf(OPTForCausalLM(OPTConfig(vocab_size=rows, **OPT_1_3B_TINY)), folder, torch.float16)
    tok.save_pretrained(folder)
    return folder


def plain(record: dict, world) -> dict:
    """A world record as a user's manifest row: absolute image path, no loader bookkeeping."""
    return {**{k: v for k, v in record.items() if k != "_root"}, "image": str(world / record["image"])}


def test_header_commands_with_vit_h_metaclip_fp16_opt_1_3b_and_vit_b_32_openai(world, opt_1_3b, tmp_path, monkeypatch):
    """pretrain -> finetune -> caption -> eval as the header writes them (model flags left at their defaults), sizes
    cut."""
    serve_open_clip_tag(monkeypatch, tmp_path, "ViT-H-14-quickgelu", "metaclip_fullcc")
    val = [plain(r, world) for r in read_manifest(world / "val.jsonl")]
    write_manifest(tmp_path / "alt_pairs.jsonl",
                   [{**r, "alt_text": [r["alt_text"], r["synthetic_caption"]]} for r in val])
    write_manifest(tmp_path / "altogether_ft.jsonl", [{**r, "round3": r["caption"]} for r in val])
    write_manifest(tmp_path / "metaclip_shard.jsonl", val)
    out, small = tmp_path / "ag", ["--batch-size", "2", "--device", "cpu"]
    altogether.main(["pretrain", "--data", str(tmp_path / "alt_pairs.jsonl"), "--out", str(out),
                     "--decoder", str(opt_1_3b), "--pretrain-steps", "1", *small])
    log = altogether.main(["finetune", "--data", str(tmp_path / "altogether_ft.jsonl"), "--out", str(out),
                           "--checkpoint", str(out / "pretrain.pt"), "--target-field", "round3",
                           "--finetune-steps", "1", *small])
    assert np.isfinite(log["history"][0]["loss"])
    # the decoder's files are fp16; both stages train fp32 weights (AdamW's updates are not rounded to fp16)
    for stage in ("pretrain", "finetune"):
        weights = torch.load(out / f"{stage}.pt", weights_only=True)["captioner"]
        assert {value.dtype for value in weights.values()} == {torch.float32}, stage
    shard = tmp_path / "metaclip_shard.altogether.jsonl"
    counts = altogether.main(["caption", "--checkpoint", str(out / "finetune.pt"), "--data",
                              str(tmp_path / "metaclip_shard.jsonl"), "--out", str(shard), "--max-new-tokens", "4",
                              "--device", "cpu"])
    assert counts["written"] == len(val) and [r["id"] for r in read_manifest(shard)] == [r["id"] for r in val]
    serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-32", "openai")
    metrics = altogether.main(["eval", "--data", str(shard), "--out", str(tmp_path / "eval.json"),
                               "--device", "cpu"])
    assert metrics["altogether"]["empty"] == counts.get("empty_captions", 0)
    assert json.loads((tmp_path / "eval.json").read_text()) == metrics


def test_caption_under_torchrun_with_two_ranks_equals_one_process(world, finetuned, tmp_path):
    """`torchrun --nproc-per-node 2 altogether.py caption` (gloo): every id once, in input order, and the
    greedy captions of one process, though each rank batches other images together (some alt-texts empty)."""
    rows = [plain(r, world) for r in read_manifest(world / "test.jsonl")]
    for i in (0, 1, 2, 3, 9):  # one process's first batch has no prompt at all; a rank's first batch mixes them
        rows[i]["alt_text"] = ""
    write_manifest(tmp_path / "in.jsonl", rows)
    argv = ["caption", "--data", str(tmp_path / "in.jsonl"), "--checkpoint", str(finetuned), "--decoding",
            "greedy", "--max-new-tokens", "6", "--gen-batch-size", "4", "--device", "cpu"]
    altogether.main(argv + ["--out", str(tmp_path / "one.jsonl")])
    run_torchrun("altogether.py", argv + ["--out", str(tmp_path / "two.jsonl")])
    one, two = read_manifest(tmp_path / "one.jsonl"), read_manifest(tmp_path / "two.jsonl")
    assert [r["id"] for r in two] == [r["id"] for r in rows]
    assert [r["altogether"] for r in two] == [r["altogether"] for r in one]


def test_help_shows_the_values_that_will_run(capsys):
    """`--help` of the miniature stage shows the miniature preset's values; of another stage, the paper's."""
    import re

    for argv, decoder in ((["--help"], "tiny-opt"), (["pretrain", "--help"], "facebook/opt-1.3b")):
        with pytest.raises(SystemExit):
            altogether.main(argv)
        flat = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the help box's text, unwrapped
        assert re.search(r"--decoder STR .*?\(default: ([^)]+)\)", flat).group(1) == decoder, argv
        assert "smoke: --clip-model miniature --decoder tiny-opt --prefix-length 4" in flat


# ---- nothing silently wrong: resumed outputs, fields that are not text, a diverged run, errors in one line ---


def test_caption_refuses_to_resume_an_output_of_other_settings(world, finetuned, tmp_path):
    """An existing --out of another --caption-field or --checkpoint reported already_done and exited 0 without the
    new field. The recipe beside the output (the decoding's own knobs only) says which settings differ."""
    out = tmp_path / "test.jsonl"
    argv = ["caption", "--data", str(world / "test.jsonl"), "--out", str(out), "--checkpoint", str(finetuned),
            "--decoding", "greedy", "--max-new-tokens", "2", "--gen-batch-size", "12", "--device", "cpu"]
    altogether.main(argv)
    other = tmp_path / "other.pt"
    other.write_bytes(finetuned.read_bytes())
    for more, named in ((["--caption-field", "capfield"], "--caption-field 'altogether' there, 'capfield' now"),
                        (["--checkpoint", str(other)], f"--checkpoint '{finetuned}' there, '{other}' now"),
                        (["--decoding", "sample"], "--decoding 'greedy' there, 'sample' now"),
                        (["--no-use-alt"], "--use-alt True there, False now")):
        with pytest.raises(ManifestError, match=f"^{out} holds output of other settings \\(.*{named}.*\\); "
                                                           "pass a new --out"):
            altogether.main(argv + more)
    assert altogether.main(argv + ["--top-p", "0.9"]) == {"already_done": 12}  # no greedy setting


def test_training_refuses_to_resume_a_run_of_other_settings_or_data(world, tmp_path):
    """The recipe missed the steps (the cosine schedule), the encoder's weights, the token budgets, the fields and
    the data: each resumed silently. The lr was in it, now named as a flag: never replaced by the optimiser's."""
    argv = SMALL + ["pretrain", "--decoder", "tiny-opt", "--out", str(tmp_path), "--pretrain-steps", "1"]
    altogether.main(argv + ["--data", str(world / "val.jsonl")])
    write_manifest(tmp_path / "fewer.jsonl", [plain(r, world) for r in read_manifest(world / "val.jsonl")[:5]])
    for more, named in ((["--pretrain-steps", "2"], "--pretrain-steps 1 there, 2 now"),
                        (["--max-caption-tokens", "20"], "--max-caption-tokens 24 there, 20 now"),
                        (["--data", str(tmp_path / "fewer.jsonl")], "--data '6 records, sha256 "),
                        (["--lr", "2e-3"], "--lr 0.001 there, 0.002 now")):
        more = more if "--data" in more else more + ["--data", str(world / "val.jsonl")]
        with pytest.raises(ManifestError, match=f"pretrain.pt holds a run of other settings \\(.*{named}.*\\);"
                                                           " pass a new --out, or --no-resume"):
            altogether.main(argv + more)
    assert altogether.main(argv + ["--data", str(world / "val.jsonl")])["resumed_from"] == 1


def test_texts_of_the_wrong_type_are_skipped_and_counted_and_strict_stops(world, tmp_path, monkeypatch):
    """`alt_text: 123` crashed training mid-run with a TypeError naming no sample; a list target trained on
    "['x']"; a list with a number in it lost the number silently. By common.data.text_problem's rule they are
    skipped and counted like an empty alt-text (--strict: an error naming the sample); the caption stage refuses
    them before the checkpoint loads."""
    records = [plain(r, world) for r in read_manifest(world / "val.jsonl")]
    records[0]["alt_text"], records[1]["alt_text"], records[2]["caption"] = 123, ["stock photo", 5], ["x"]
    records[3]["image"] = 123
    write_manifest(tmp_path / "in.jsonl", records)
    seen, real_pair = [], altogether.training_pair
    monkeypatch.setattr(altogether, "training_pair",
                        lambda record, *a: seen.append(record["id"]) or real_pair(record, *a))
    train = SMALL + ["--decoder", "tiny-opt", "--data", str(tmp_path / "in.jsonl"), "--out", str(tmp_path)]
    altogether.main(train + ["pretrain", "--pretrain-steps", "1"])
    assert set(seen) == {r["id"] for r in records[2:]} - {records[3]["id"]}
    kept = training_rows(records, np.ones(len(records), bool), "alt_text", "caption", strict=False)  # finetune's
    assert kept == [3, 4, 5]  # the image is judged when it is embedded
    with pytest.raises(BadSampleError, match=f"^sample '{records[0]['id']}': field 'alt_text' must be a "
                                                        "string or a list of strings, got 123$"):
        altogether.main(train + ["pretrain", "--pretrain-steps", "1", "--strict", "--no-resume"])
    with pytest.raises(BadSampleError, match=f"^sample '{records[0]['id']}': field 'alt_text' must be a "
                                                        "string or a list of strings, got 123$"):
        altogether.main(["caption", "--data", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "c.jsonl"),
                         "--checkpoint", str(tmp_path / "none.pt"), "--device", "cpu"])


def test_a_diverged_update_stops_with_one_line_and_leaves_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    """`--steps 1 --lr inf` wrote a checkpoint of NaN tensors with exit 0: only the loss, computed before the
    update, was checked. Now the weights are checked before every write: the checkpoint on disk stays the last
    finite one, and the command line ends with one line and status 1."""
    import subprocess
    import sys

    data = ["--data", str(world / "val.jsonl"), "--decoder", "tiny-opt", "pretrain"]
    monkeypatch.setattr(altogether, "cosine_lr", lambda step, schedule: 1e-3 if step == 0 else float("inf"))
    with pytest.raises(NonFiniteError, match=f"^pretrain at step 1 of 2, after its update "
                                                        f"\\({tmp_path / 'a' / 'pretrain.pt'} keeps step 1\\): "):
        altogether.main(SMALL + data + ["--out", str(tmp_path / "a"), "--pretrain-steps", "2",
                                        "--checkpoint-every", "1"])
    payload = torch.load(tmp_path / "a" / "pretrain.pt", weights_only=True)
    assert payload["step"] == 1 and all(torch.isfinite(v).all() for v in payload["captioner"].values()
                                        if v.is_floating_point())
    # --lr inf is refused before anything loads now: a finite lr whose weight decay overflows the weights instead
    command = [sys.executable, altogether.__file__, *SMALL, *data, "--out", str(tmp_path / "b"), "--pretrain-steps",
               "1", "--lr", "3e37", "--weight-decay", "1e12"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: pretrain at step 0 of 1, after its update ({tmp_path / 'b' / 'pretrain.pt'} not written by this "
        "run): ")
    assert not (tmp_path / "b" / "pretrain.pt").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--num-beams", "0", "--num-beams must be at least 1, got 0"),
    ("--pretrain-steps", "0", "--pretrain-steps must be at least 1, got 0"),
    ("--finetune-steps", "-1", "--finetune-steps must be at least 1, got -1"),
    ("--warmup", "-1", "--warmup must be at least 0, got -1"),
    ("--top-p", "1.5", r"--top-p must be in \(0, 1\], got 1.5"),
    ("--temperature", "0", "--temperature must be a positive number, got 0.0"),
    ("--lr", "-0.001", "--lr must be a positive number, got -0.001"),
    ("--lr", "inf", "--lr must be a positive number, got inf"),
    ("--weight-decay", "nan", "--weight-decay must be at least 0, got nan"),
    ("--p-drop-alt", "1.5", r"--p-drop-alt must be in \[0, 1\], got 1.5")])
def test_flags_out_of_range_are_one_line_naming_the_flag_before_anything_loads(world, flag, value, message):
    with pytest.raises(SystemExit, match=f"^error: {message}$"):
        altogether.main(["caption", "--data", str(world / "val.jsonl"), "--out", "unused", flag, value])


def test_a_clip_that_cannot_be_loaded_names_the_flag(world, tmp_path):
    """load_clip's words name its own argument (pretrained=...); the command line has --clip-pretrained and
    --score-pretrained, so the one line says which."""
    missing = str(tmp_path / "w.pt")
    with pytest.raises(SystemExit) as exit_:
        altogether.run_command(altogether.main, [
            "eval", "--data", str(world / "val.jsonl"), "--eval-fields", "caption", "--score-model", MICRO,
            "--score-pretrained", missing, "--device", "cpu", "--out", str(tmp_path / "eval.json")])
    assert str(exit_.value.code).startswith(f"error: --score-pretrained: pretrained={missing!r} is neither a file")
    with pytest.raises(ScorerLoadError, match="^--clip-pretrained: pretrained="):
        load_encoder(altogether.Args(clip_model=MICRO, clip_pretrained=missing, device="cpu"))


def test_device_cuda_without_cuda_says_so_before_any_weights_load(world, tmp_path, monkeypatch):
    """eval blamed the score model's weights ("cannot load None into micro-ViT-16 ... no NVIDIA driver")."""
    from common.data import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="^--device cuda: CUDA is not available on this machine"):
        altogether.main(["eval", "--data", str(world / "val.jsonl"), "--score-model", MICRO, "--score-pretrained",
                         "None", "--out", str(tmp_path / "eval.json"), "--device", "cuda"])
    with pytest.raises(SystemExit, match="^error: the finetune stage starts from stage 1: pass --checkpoint"):
        altogether.main(["finetune", "--data", str(world / "val.jsonl"), "--device", "cpu"])


def test_degenerate_captions_are_written_flagged_and_counted(world, finetuned, tmp_path, monkeypatch, caplog):
    """A captioner looping "a 2 2 2 2 2" is written (not dropped) with `degenerate` naming why, counted in the
    stage's counts and its warning line."""
    monkeypatch.setattr(altogether, "generate_captions", lambda captioner, tokenizer, emb, prompts, args:
                        ["a 2 2 2 2 2"] * len(prompts))
    argv = ["caption", "--data", str(world / "test.jsonl"), "--out", str(tmp_path / "test.jsonl"),
            "--checkpoint", str(finetuned), "--gen-batch-size", "5", "--device", "cpu"]
    with caplog.at_level(logging.WARNING, logger="altogether"):
        counts = altogether.main(argv)
    out = read_manifest(tmp_path / "test.jsonl")
    assert counts["written"] == counts["degenerate"] == len(out) == 12
    assert all(r["altogether"] == "a 2 2 2 2 2" and r["altogether_degenerate"].startswith("repeated token")
               for r in out)
    assert "12 of 12 generated captions degenerate, flagged" in caplog.text
