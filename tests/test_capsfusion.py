"""capsfusion.py: the tests that pin the paper's choices (docs/capsfusion.md, Implementation details, lists them
by number): the official prompt and its 256-token cap as they reach the model, beam search with 3 beams and 80
new tokens, batched equal to one-at-a-time, the SFT example and its label mask, the loss as a global
response-token mean, Alpaca's optimiser settings, the scaling arms, the mix's draw and the budgets, the metrics,
`Args` defaults; and fuse with a tiny random LLM (one line per input, resume after a kill), empty captions,
caption -> fuse -> eval through manifests, SFT (resume, NaN, LoRA over a half-precision base, one gradient
all-reduce a step), the miniature main(). Real architectures at tiny width, offline: BLIP-large's for `caption`,
LLaMA-2-13B's (fp16, as shipped) for `sft` / `fuse`, including `torchrun --nproc-per-node 2` fuse, open_clip
ViT-B-32 for `scaling`."""

import json
import logging
import os
import re
import socket

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import capsfusion
from experiments import capsfusion_miniature
from common.columns import index_manifest
from common.data import BadSampleError, ManifestError, NonFiniteError, read_manifest, write_manifest
from common.generate import check_resumable, recipe_path
from common.training import step_batch
from common.miniature import WorldConfig, ensure_world
from tests.realarch import run_torchrun, save_hf, serve_open_clip_tag

TINY_WORLD = WorldConfig(n_train=64, n_val=6, n_test=24)
# The prompt of baaivision/CapsFusion capsfusion_inference.py, written out here independently.
OFFICIAL_INSTRUCTION = (
    "Please merge and refine the information from the two given sentences. Sentence 1 provides detailed "
    "real-world knowledge, yet it suffers from flaws in sentence structure and grammar. Sentence 2 exhibits "
    "nice sentence structure, but lacking in-depth real-world details and may contain false information. "
    "Please combine them into a new sentence, ensuring a well-structured sentence while retaining the detailed "
    "real-world information provided in Sentence 1. Avoid simply concatenating the sentences.")


def official(raw: str, synthetic: str) -> str:
    return OFFICIAL_INSTRUCTION + "\n\nSentence 1: " + raw + "\nSentence 2: " + synthetic + "\nNew Sentence:"


OFFICIAL = official("VW T-ROC alloy wheel", "The wheel on the Volkswagen SUV is shown.")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_world(TINY_WORLD, tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def tiny_llm(world, tmp_path_factory):
    """A random 2-layer Llama with the miniature word-level tokenizer, saved as a local folder."""
    return capsfusion_miniature.miniature_fuser(read_manifest(world / "train.jsonl"),
                                                tmp_path_factory.mktemp("llm") / "base", 0)


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    """meta-llama/Llama-2-13b-hf's classes and structural settings at tiny width, saved in fp16 as it ships.

    LlamaForCausalLM (SiLU MLP without biases, RMSNorm eps 1e-5, as many key/value heads as heads, untied
    output embedding, 4096 positions) and a LlamaTokenizer (byte-fallback BPE, BOS added, no pad token),
    its 600-token vocabulary trained on the prompt instead of LLaMA's 32000. Its generation_config.json asks
    for sampling, as the hub's Llama-2 checkpoints' do: a generate() that does not say do_sample=False samples.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    texts = [capsfusion.FUSION_PROMPT, "a red circle with the Aldora emblem on grass, stock photo"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    bpe_model = json.loads(bpe.to_str())["model"]
    tokenizer = LlamaTokenizer(vocab=bpe_model["vocab"], merges=[tuple(m) for m in bpe_model["merges"]],
                               add_bos_token=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, hidden_act="silu", rms_norm_eps=1e-5,
                         max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama2") / "Llama-2-13b-hf"
    save_hf(LlamaForCausalLM(config), folder, torch.float16)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.6, top_p=0.9,
                     max_length=4096).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def text_only(records: list[dict]) -> list[dict]:
    """Triplets as a teacher's file holds them: no image."""
    return [{k: r[k] for k in ("id", "alt_text", "synthetic_caption", "fused")} for r in records]


def word_tokenizer():
    """Word-level tokenizer without the one-token instruction: the prompt costs ~90 tokens, as with a real LLM."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    vocabulary = ["<pad>", "<s>", "</s>", "<unk>"] + sorted({w for w, _ in split.pre_tokenize_str(
        capsfusion.FUSION_PROMPT + " red circle Aldora stock photo on grass a with the emblem w0 w1 w2 w3 w4")})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.pre_tokenizer = split
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


# ---- the paper's numbers, the mix's draw -------------------------------------------------------


# Where each default comes from (the paper; the official repository's config.yaml for fuse).
PAPER_DEFAULTS = {
    "llm": "BAAI/CapsFus-LLaMA",  # the released fuser (official config.yaml)
    "max_prompt_tokens": 256,  # official inference: prompt at most 256 tokens, the raw caption trimmed
    "num_beams": 3,  # official inference: beam search, 3 beams
    "max_new_tokens": 80,  # official inference: at most 80 new tokens
    "gen_batch_size": 4,  # official inference: 4 prompts per GPU and call
    "gen_dtype": "bfloat16",  # official inference: bf16
    "base_model": "meta-llama/Llama-2-13b-hf",  # paper: CapsFus-LLaMA is LLaMA-2-13B fine-tuned
    "epochs": 2,  # paper: 2 epochs
    "lr": 2e-5,  # paper: Alpaca-style; Alpaca's lr
    "batch_size": 128,  # Alpaca's batch
    "warmup_ratio": 0.03,  # Alpaca's warm-up ratio (then cosine)
    "weight_decay": 0.0,  # Alpaca's weight decay
    "raw_field": "alt_text",  # paper: sentence 1 = the raw web caption
    "synthetic_field": "synthetic_caption",  # paper: sentence 2 = the synthetic caption
    "captioner": "Salesforce/blip-image-captioning-large",  # paper: BLIP captions (LAION-COCO)
    "scaling_epochs": 1.0,  # paper, Fig. 7: one epoch at every scale
    "caption_beams": 3,  # ours: one beam-search caption (LAION-COCO kept the best of 40 BLIP samples; Deviation 5)
    "caption_max_new_tokens": 30,  # ours
}


def test_args_defaults_are_the_papers_and_the_official_codes():
    args = capsfusion.Args()
    assert {name: getattr(args, name) for name in PAPER_DEFAULTS} == PAPER_DEFAULTS


def test_mix_draws_raw_or_synthetic_with_probability_one_half_anew_at_each_draw(tmp_path):
    """scaling's raw+synthetic arm: t_i = r_i if u < 0.5 else s_i, u ~ U(0, 1) drawn from the training rng for
    every sample of every batch (so one sample is seen with both captions)."""
    records = [{"id": str(i), "alt_text": f"raw {i}", "synthetic_caption": f"synthetic {i}"} for i in range(50)]
    write_manifest(tmp_path / "texts.jsonl", records)
    columns = index_manifest(tmp_path / "texts.jsonl", required=("id",))
    fields = {"raw": "alt_text", "synthetic": "synthetic_caption"}
    texts_for = capsfusion_miniature.ArmTexts(columns, capsfusion_miniature.MIX, fields)
    indices = np.random.default_rng(1).integers(0, 50, 20_000)
    texts = texts_for(indices, np.random.default_rng(7))
    u = np.random.default_rng(7).random(len(indices))  # the same stream, drawn here
    assert texts == [f"raw {i}" if x < 0.5 else f"synthetic {i}" for i, x in zip(indices, u)]
    assert abs(np.mean([t.startswith("raw") for t in texts]) - 0.5) < 0.015  # binomial std 0.0035
    seen = {i: set() for i in range(50)}
    for i, t in zip(indices, texts):
        seen[i].add(t)
    assert all(len(captions) == 2 for captions in seen.values())
    for kind, field in fields.items():  # the plain arms: each its own field, in the order asked
        texts = capsfusion_miniature.ArmTexts(columns, kind, fields)([3, 1], None)
        assert texts == [records[3][field], records[1][field]]


# ---- the prompt and its cap ------------------------------------------------------------------


def test_prompt_is_byte_identical_to_the_official_one():
    prompt = capsfusion.FUSION_PROMPT.format(raw="VW T-ROC alloy wheel",
                                             synthetic="The wheel on the Volkswagen SUV is shown.")
    assert prompt.encode() == OFFICIAL.encode()
    made, trimmed = capsfusion.fusion_prompt(word_tokenizer(), "VW T-ROC alloy wheel",
                                             "The wheel on the Volkswagen SUV is shown.", 256)
    assert made == OFFICIAL and not trimmed


def test_cap_trims_only_the_raw_caption_from_its_end():
    tokenizer = word_tokenizer()
    synthetic = "a red circle with the Aldora emblem on grass."
    raw = " ".join(f"w{i % 5}" for i in range(400))
    empty_raw = capsfusion.prompt_length(tokenizer, official("", synthetic))
    # BOS + the words and punctuation runs of the prompt (the Whitespace pre-tokenizer's split): the cap leaves
    # the raw caption 256 - empty_raw tokens
    assert empty_raw == 1 + len(re.findall(r"\w+|[^\w\s]+", official("", synthetic)))
    prompt, trimmed = capsfusion.fusion_prompt(tokenizer, raw, synthetic, 256)
    assert trimmed and capsfusion.prompt_length(tokenizer, prompt) == 256
    assert prompt.startswith(OFFICIAL_INSTRUCTION) and prompt.endswith(f"\nSentence 2: {synthetic}\nNew Sentence:")
    kept = prompt.split("Sentence 1: ")[1].split("\nSentence 2:")[0]
    assert kept == " ".join(raw.split()[:256 - empty_raw])  # the raw caption's first tokens
    # one token over: the raw caption's last token goes
    over = " ".join(raw.split()[:257 - empty_raw])
    expected = (official(over.rsplit(" ", 1)[0], synthetic), True)
    assert capsfusion.fusion_prompt(tokenizer, over, synthetic, 256) == expected
    # exactly at the cap: nothing is cut (the official `ids[:-0]` would drop the whole raw caption)
    fits = " ".join(raw.split()[:256 - empty_raw])
    assert capsfusion.fusion_prompt(tokenizer, fits, synthetic, 256) == (official(fits, synthetic), False)
    # a synthetic caption that alone overflows: the raw caption goes, instruction and synthetic stay whole
    prompt, trimmed = capsfusion.fusion_prompt(tokenizer, raw, synthetic, empty_raw - 3)
    assert trimmed and prompt == official("", synthetic)


def test_cap_keeps_the_longest_prefix_of_the_raw_tokens_that_fits(llama2):
    """LLaMA-2's byte-fallback tokenizer: a cut inside a character decodes to U+FFFD, three byte tokens, so the
    first cut can still overflow; the prompt is the longest prefix of the raw caption's tokens that fits, found
    here by trying every prefix from the longest down."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama2)
    synthetic = "a red circle on grass."
    for raw in ("\u00e9" * 300, "Aldora emblem " * 40 + "\u00e9\u00e8" * 40):
        ids = tokenizer(raw, add_special_tokens=False)["input_ids"]
        for cap in (256, 257):
            for k in range(len(ids), -1, -1):
                longest = official(tokenizer.decode(ids[:k], skip_special_tokens=True).strip(), synthetic)
                if len(tokenizer(longest)["input_ids"]) <= cap:
                    break
            assert capsfusion.fusion_prompt(tokenizer, raw, synthetic, cap) == (longest, True)


def test_sft_label_mask_covers_exactly_the_response():
    tokenizer = word_tokenizer()
    args = capsfusion.Args()
    raw, synthetic = "Aldora stock photo red", "a red circle on grass."
    fused = "a red circle with the Aldora emblem on grass."
    input_ids, labels = capsfusion.sft_example(tokenizer, raw, synthetic, fused, args)
    prompt_ids = tokenizer(official(raw, synthetic))["input_ids"]
    response_ids = tokenizer(fused, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert input_ids == prompt_ids + response_ids and len(labels) == len(input_ids)
    assert labels[:len(prompt_ids)] == [capsfusion.IGNORE] * len(prompt_ids)
    assert labels[len(prompt_ids):] == response_ids
    # the loss reads exactly those tokens: position t predicts t + 1
    logits = torch.randn(1, len(input_ids), len(tokenizer))
    nll, count = capsfusion.response_loss(logits, torch.tensor([labels]))
    expected = -torch.log_softmax(logits[0, :-1], -1)[torch.arange(len(input_ids) - 1), torch.tensor(input_ids[1:])]
    assert count == len(response_ids) and torch.isclose(nll, expected[len(prompt_ids) - 1:].sum())


# ---- fuse: tiny random LLM, resume, empty captions -------------------------------------------


FAST_NEW_TOKENS = 8
LONG_RAW = " ".join(["Aldora stock photo, a red circle with the emblem on grass"] * 30)  # ~500 tokens: over the cap


@pytest.fixture(scope="module")
def default_fuse(world, llama2, tmp_path_factory):
    """`fuse` with every default (beams, new tokens, prompts a call, prompt cap) on LLaMA-2's architecture, six
    prompts of different lengths, one with a raw caption over the cap; model.generate's arguments recorded."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    records = text_only(read_manifest(world / "val.jsonl"))
    records[1]["alt_text"] = LONG_RAW
    folder = tmp_path_factory.mktemp("default_fuse")
    write_manifest(folder / "in.jsonl", records)
    calls, real = [], LlamaForCausalLM.generate

    def generate(self, *args, **kwargs):
        calls.append(kwargs)  # what fuse asks for; the search runs with fewer new tokens to keep the test fast
        return real(self, *args, **{**kwargs, "max_new_tokens": FAST_NEW_TOKENS})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LlamaForCausalLM, "generate", generate)
        counts = capsfusion.main(["fuse", "--data", str(folder / "in.jsonl"), "--out",
                                  str(folder / "batched.jsonl"), "--llm", str(llama2), "--device", "cpu"])
    return {"records": records, "calls": calls, "counts": counts, "folder": folder,
            "out": read_manifest(folder / "batched.jsonl", required=("id",)),
            "tokenizer": AutoTokenizer.from_pretrained(llama2)}


def test_fuse_asks_the_official_prompt_left_padded_with_3_beams_and_80_new_tokens(default_fuse):
    """The official config.yaml's generation by default: beam search (no sampling, whatever the checkpoint's
    generation config says) with 3 beams, at most 80 new tokens, 4 prompts a call, left padding; each prompt the
    official text; a prompt over 256 tokens (BOS included) loses the raw caption's tail, never the synthetic's."""
    calls, records, tokenizer = default_fuse["calls"], default_fuse["records"], default_fuse["tokenizer"]
    assert [len(call["input_ids"]) for call in calls] == [4, 2]
    assert [(call["num_beams"], call["max_new_tokens"], call["do_sample"]) for call in calls] == [(3, 80, False)] * 2
    for call in calls:  # left padding: every prompt ends in the last column, the pads come first
        mask = call["attention_mask"]
        assert torch.equal(mask, mask.sort(dim=1).values) and not mask.all()
    ids = [row[mask.bool()].tolist() for call in calls for row, mask in zip(call["input_ids"], call["attention_mask"])]
    prompts = [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    assert all(i[0] == tokenizer.bos_token_id for i in ids)
    expected = [official(" ".join(r["alt_text"].split()), " ".join(r["synthetic_caption"].split())) for r in records]
    assert [p for i, p in enumerate(prompts) if i != 1] == [p for i, p in enumerate(expected) if i != 1]
    # the long raw caption: its first tokens kept, as many as fit in 256
    head = OFFICIAL_INSTRUCTION + "\n\nSentence 1: "
    tail = "\nSentence 2: " + records[1]["synthetic_caption"] + "\nNew Sentence:"
    assert len(tokenizer(expected[1])["input_ids"]) > 400 and len(ids[1]) == 256
    assert prompts[1].startswith(head) and prompts[1].endswith(tail)
    kept = prompts[1][len(head):-len(tail)]
    assert 0 < len(kept) < len(LONG_RAW) and LONG_RAW.startswith(kept)
    assert default_fuse["counts"] == {"already_done": 0, "raw_trimmed": 1, "prompt_over_cap": 0, "empty_answers": 0,
                                      "written": 6}


def test_batched_beam_search_equals_one_prompt_at_a_time(default_fuse, llama2):
    """Prompts of different lengths in one left-padded batch get the answers each gets alone (with right padding
    the shorter ones would continue after their pad tokens)."""
    lengths = [int(mask.sum()) for call in default_fuse["calls"] for mask in call["attention_mask"]]
    assert len(set(lengths)) == len(lengths)
    folder = default_fuse["folder"]
    counts = capsfusion.main(["fuse", "--data", str(folder / "in.jsonl"), "--out", str(folder / "single.jsonl"),
                              "--llm", str(llama2), "--device", "cpu", "--gen-batch-size", "1",
                              "--max-new-tokens", str(FAST_NEW_TOKENS)])
    batched, single = default_fuse["out"], read_manifest(folder / "single.jsonl", required=("id",))
    assert counts["written"] == default_fuse["counts"]["written"] == 6
    assert [(r["fused"], r["fused_source"]) for r in single] == [(r["fused"], r["fused_source"]) for r in batched]
    assert len({r["fused"] for r in batched}) > 1  # the answers depend on the prompts: the comparison can fail
    # and each is the new tokens of transformers' own 3-beam search on that prompt, decoded, first line
    from transformers import AutoModelForCausalLM

    model, tokenizer = AutoModelForCausalLM.from_pretrained(llama2, dtype=torch.float32), default_fuse["tokenizer"]
    for record, fused in [(default_fuse["records"][i], batched[i]) for i in (0, 2)]:  # prompts under the cap
        prompt = tokenizer(official(record["alt_text"], record["synthetic_caption"]), return_tensors="pt")
        output = model.generate(**prompt, num_beams=3, max_new_tokens=FAST_NEW_TOKENS, do_sample=False)
        new = output[0, prompt["input_ids"].shape[1]:]
        assert fused["fused"] == capsfusion.first_line(tokenizer.decode(new, skip_special_tokens=True))


def test_fuse_keeps_the_answers_first_line_without_special_tokens_else_the_synthetic_caption(world, llama2, tmp_path,
                                                                                              monkeypatch):
    """What generate returns (new tokens, finished beams padded) becomes the answer's first non-empty line,
    special tokens dropped; an answer with nothing in it gives the synthetic caption, counted."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama2)
    eos = tokenizer.eos_token_id
    answer = tokenizer("a red circle with the Aldora emblem.\nSentence 3: more", add_special_tokens=False)["input_ids"]
    blank = tokenizer("\n \n", add_special_tokens=False)["input_ids"]
    rows = [answer + [eos], blank + [eos] + [eos] * (len(answer) - len(blank))]  # eos is also the pad id here
    monkeypatch.setattr("common.generate.new_tokens",  # what the fuser's beam search returns, for every batch
                        lambda model, inputs, max_new_tokens, num_beams, **options: torch.tensor(rows))
    records = text_only(read_manifest(world / "val.jsonl")[:2])
    write_manifest(tmp_path / "in.jsonl", records)
    counts = capsfusion.main(["fuse", "--data", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"),
                              "--llm", str(llama2), "--device", "cpu"])
    out = read_manifest(tmp_path / "out.jsonl", required=("id",))
    assert [(r["fused"], r["fused_source"]) for r in out] == [("a red circle with the Aldora emblem.", "llm"),
                                                             (records[1]["synthetic_caption"], "synthetic")]
    assert counts["empty_answers"] == 1


def pretend_cuda(monkeypatch):
    """A machine without CUDA passes --device cuda's check (the test stops before anything runs there)."""
    import common.data

    for module in (capsfusion, common.data):  # main's check, and init_distributed's
        monkeypatch.setattr(module, "check_device", lambda device: device)


@pytest.mark.parametrize("device, dtype", [("cuda", torch.bfloat16), ("cpu", torch.float32)])
def test_fuse_loads_the_fuser_in_bf16_on_cuda(world, device, dtype, monkeypatch, tmp_path):
    """The official inference runs the fuser in bf16 (--gen-dtype); on the CPU float32."""
    loaded = []
    pretend_cuda(monkeypatch)

    def load_causal_lm(name, flag, device, dtype, trust_remote_code=False):
        loaded.append((name, flag, dtype))
        raise InterruptedError  # stop before anything runs on CUDA

    monkeypatch.setattr(capsfusion, "load_causal_lm", load_causal_lm)
    with pytest.raises(InterruptedError):
        capsfusion.main(["fuse", "--data", str(world / "val.jsonl"), "--device", device, "--out",
                         str(tmp_path / "fused.jsonl")])
    assert loaded == [("BAAI/CapsFus-LLaMA", "--llm", dtype)]


def test_fuse_writes_one_line_per_input_and_resumes_after_a_kill(world, tiny_llm, tmp_path, monkeypatch):
    out = tmp_path / "fused.jsonl"
    argv = ["fuse", "--data", str(world / "val.jsonl"), "--out", str(out), "--llm", str(tiny_llm),
            "--out-field", "capsfus", "--gen-batch-size", "2", "--max-new-tokens", "6", "--device", "cpu"]
    real_generate, calls = capsfusion.generate_texts, {"n": 0}

    def killed_in_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(capsfusion, "generate_texts", killed_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        capsfusion.main(argv)
    assert len(out.read_text().splitlines()) == 2  # the first batch survived the kill
    with open(out, "ab") as handle:
        handle.write(b'{"id": "val-00')  # and a line cut mid-write
    monkeypatch.setattr(capsfusion, "generate_texts", real_generate)
    counts = capsfusion.main(argv)
    assert counts["already_done"] == 2 and counts["written"] == 4
    inputs, fused = read_manifest(world / "val.jsonl"), read_manifest(out)
    assert [r["id"] for r in fused] == [r["id"] for r in inputs] and len(out.read_text().splitlines()) == 6
    straight = argv[:argv.index("--out") + 1] + [str(tmp_path / "straight.jsonl")] + argv[argv.index("--out") + 2:]
    assert capsfusion.main(straight)["written"] == 6  # the same run, never killed, writes the same lines
    assert fused == read_manifest(tmp_path / "straight.jsonl")
    assert all(r["capsfus"] == capsfusion.first_line(r["capsfus"]) != "" for r in fused)
    assert all(r["fused"] == i["fused"] for r, i in zip(fused, inputs))  # the teacher's field is untouched
    assert all((out.parent / r["image"]).exists() for r in fused)
    assert capsfusion.main(argv) == {"already_done": 6}


def test_empty_raw_or_synthetic_caption_is_copied_and_both_empty_is_skipped(world, tiny_llm, tmp_path):
    records = read_manifest(world / "val.jsonl")[:4]
    records[0]["alt_text"] = "  "
    records[1]["synthetic_caption"] = ""
    records[2]["alt_text"], records[2]["synthetic_caption"] = "", None
    write_manifest(tmp_path / "in.jsonl", [{**r, "image": str(world / r["image"])} for r in records])
    argv = ["fuse", "--data", str(tmp_path / "in.jsonl"), "--llm", str(tiny_llm), "--max-new-tokens", "4",
            "--device", "cpu"]
    counts = capsfusion.main(argv + ["--out", str(tmp_path / "out.jsonl")])
    assert counts["copied_synthetic"] == 1 and counts["copied_raw"] == 1 and counts["skipped_no_text"] == 1
    out = {r["id"]: r for r in read_manifest(tmp_path / "out.jsonl")}
    assert list(out) == [records[i]["id"] for i in (0, 1, 3)]  # input order, the empty pair left out
    assert out[records[0]["id"]]["fused"] == records[0]["synthetic_caption"]
    assert out[records[0]["id"]]["fused_source"] == "synthetic"
    assert out[records[1]["id"]]["fused"] == records[1]["alt_text"] and out[records[1]["id"]]["fused_source"] == "raw"
    write_manifest(tmp_path / "alone.jsonl", [{**records[3], "image": str(world / records[3]["image"])}])
    capsfusion.main(argv[:1] + ["--data", str(tmp_path / "alone.jsonl")] + argv[3:]
                    + ["--out", str(tmp_path / "alone.out.jsonl")])
    alone = read_manifest(tmp_path / "alone.out.jsonl")[0]
    fused_alone = out[records[3]["id"]]
    assert (fused_alone["fused"], fused_alone["fused_source"]) == (alone["fused"], alone["fused_source"])
    with pytest.raises(capsfusion.BadSampleError, match=records[2]["id"]):
        capsfusion.main(argv + ["--out", str(tmp_path / "strict.jsonl"), "--strict"])
    # SFT learns only from complete triplets
    args = capsfusion.Args()
    assert len(capsfusion.triplets(records, args)) == 1
    assert capsfusion.first_line("\n  a red   circle.\nSentence 3: more") == "a red circle."


def test_missing_weights_name_the_flag(world, tmp_path):
    for flag in ("--llm", "--captioner", "--base-model"):
        stage = {"--llm": "fuse", "--captioner": "caption", "--base-model": "sft"}[flag]
        with pytest.raises(RuntimeError, match=flag):
            capsfusion.main([stage, "--data", str(world / "val.jsonl"), "--out", str(tmp_path / "x"),
                             flag, str(tmp_path / "no-such-model"), "--device", "cpu"])


def test_fusion_quality_by_hand():
    """Names of the raw caption kept, words per caption, and BLEU-4 / CIDEr x 100 against the reference."""
    records = [{"alt_text": "VW T-ROC alloy wheel, Berlin 2019"}, {"alt_text": "Aldora emblem by Kerrow"}]
    captions = ["A wheel of a VW car in berlin.", "an emblem"]
    metrics = capsfusion_miniature.fusion_quality(captions, records, capsfusion.Args(), reference=captions)
    # names {vw, berlin} ("T-ROC" is not alphabetic, "2019" not a word) and {aldora, kerrow}: 2 of 4 kept
    assert metrics["raw_names_kept"] == 50.0 and metrics["length"] == (8 + 2) / 2
    # identical to the reference: BLEU-4 = 1; CIDEr = 10 x mean over n = 1..4 of the tf-idf cosine (1 where the
    # caption has n-grams: 4 of 4 for the first, 2 of 4 for the second), averaged over the two captions
    assert metrics["BLEU-4"] == pytest.approx(100.0, abs=1e-4)
    assert metrics["CIDEr"] == pytest.approx(100 * (10 + 5) / 2, rel=1e-6)
    disjoint = capsfusion_miniature.fusion_quality(["one two three four five", "six seven"], records,
                                                   capsfusion.Args(), captions)
    assert disjoint["BLEU-4"] == pytest.approx(0.0, abs=1e-4) and disjoint["CIDEr"] == 0.0
    assert disjoint["raw_names_kept"] == 0.0
    assert "BLEU-4" not in capsfusion_miniature.fusion_quality(captions, records, capsfusion.Args(), None)


def test_fusion_quality_on_the_world_counts_names_over_all_captions(world):
    """The world's labels: % of all the images' emblem names mentioned, mean hallucinated words per caption."""
    from common.miniature import hallucinated_words, names_kept

    records = read_manifest(world / "val.jsonl")
    captions = [r["fused"] if i % 2 else r["synthetic_caption"] for i, r in enumerate(records)]
    metrics = capsfusion_miniature.fusion_quality(captions, records, capsfusion.Args(), None)
    found, total = map(sum, zip(*(names_kept(c, r) for c, r in zip(captions, records))))
    assert 0 < found < total and metrics["names_kept"] == pytest.approx(100 * found / total)
    hallucinated = [len(hallucinated_words(c, r)) for c, r in zip(captions, records)]
    assert metrics["hallucinated"] == pytest.approx(np.mean(hallucinated))


# ---- caption -> fuse -> eval through manifests -----------------------------------------------


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """Salesforce/blip-image-captioning-large's classes and structural settings at tiny width, fp32 as it ships.

    BlipForConditionalGeneration, BlipProcessor (BlipImageProcessor at 384 pixels with CLIP's mean/std, a
    BERT tokenizer with [DEC] as BOS), vision patch 16 at 384, text cross-attending to the vision width,
    decoding from [DEC] to [SEP]; a 19-word vocabulary instead of BERT's 30524.
    """
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, BlipTextConfig, BlipVisionConfig)

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "blue", "circle", "square", "on",
             "grass", "sand", "photo", "of", "with", "the", "[ENC]"]
    folder = tmp_path_factory.mktemp("blip") / "blip-image-captioning-large"
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]", do_lower_case=True)
    images = BlipImageProcessor(size={"height": 384, "width": 384}, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                image_std=[0.26862954, 0.26130258, 0.27577711])
    BlipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=384, patch_size=16, layer_norm_eps=1e-5)
    text = BlipTextConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, encoder_hidden_size=32, bos_token_id=5, sep_token_id=3,
                          eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    save_hf(BlipForConditionalGeneration(BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict())),
            folder, torch.float32)
    return folder


def test_stages_chain_caption_fuse_eval(world, tiny_blip, tiny_llm, tmp_path):
    records = read_manifest(world / "val.jsonl")
    bare = [{"id": r["id"], "image": str(world / r["image"]), "alt_text": r["alt_text"]} for r in records]
    bare[1]["image"] = str(tmp_path / "missing.png")  # an unreadable image is counted and skipped
    write_manifest(tmp_path / "web.jsonl", bare)
    counts = capsfusion.main(["caption", "--data", str(tmp_path / "web.jsonl"), "--out",
                              str(tmp_path / "a" / "syn.jsonl"), "--captioner", str(tiny_blip), "--gen-batch-size", "3",
                              "--caption-max-new-tokens", "5", "--device", "cpu"])
    assert counts["written"] == 5 and counts["unreadable_images"] == 1
    synthetic = read_manifest(tmp_path / "a" / "syn.jsonl")
    # each caption is BLIP's 3-beam search on that image alone, decoded, first line
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor, blip = BlipProcessor.from_pretrained(tiny_blip), BlipForConditionalGeneration.from_pretrained(tiny_blip)
    expected = []
    for r in bare[:1] + bare[2:]:
        with torch.no_grad():
            ids = blip.generate(**processor(images=Image.open(r["image"]).convert("RGB"), return_tensors="pt"),
                                num_beams=3, max_new_tokens=5, do_sample=False)
        expected.append(" ".join(processor.decode(ids[0], skip_special_tokens=True).split()))
    assert [r["synthetic_caption"] for r in synthetic] == expected
    assert all((tmp_path / "a" / r["image"]).exists() for r in synthetic)
    counts = capsfusion.main(["fuse", "--data", str(tmp_path / "a" / "syn.jsonl"), "--out",
                              str(tmp_path / "b" / "fused.jsonl"), "--llm", str(tiny_llm), "--max-new-tokens", "5",
                              "--device", "cpu"])
    assert counts["written"] == 5
    metrics = capsfusion.main(["eval", "--data", str(tmp_path / "b" / "fused.jsonl"), "--out",
                               str(tmp_path / "eval")])
    assert set(metrics) == {"raw", "synthetic", "teacher"}  # the fuse output is the `fused` field here
    fused = read_manifest(tmp_path / "b" / "fused.jsonl")
    names = [{w.strip(".,").lower() for w in r["alt_text"].split() if w.strip(".,").isalpha() and w[0].isupper()}
             for r in fused]  # the raw caption's capitalised words, found again in the fuser's words
    found = sum(len(n & set(r["fused"].lower().replace(".", " ").replace(",", " ").split()))
                for n, r in zip(names, fused))
    total = sum(map(len, names))
    assert total > 0 and metrics["teacher"]["raw_names_kept"] == pytest.approx(100 * found / total)
    assert set(metrics["teacher"]) == {"raw_names_kept", "length"}  # the reference is not scored against itself
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == metrics


# ---- SFT: training, resume, NaN, LoRA --------------------------------------------------------


SFT_FLAGS = ["sft", "--epochs", "2", "--batch-size", "8", "--micro-batch-size", "4", "--lr", "3e-3",
             "--device", "cpu"]


@pytest.fixture(scope="module")
def triplets16(world, tmp_path_factory):
    """16 training triplets of the tiny world (2 SFT steps an epoch at batch 8)."""
    path = tmp_path_factory.mktemp("triplets") / "train16.jsonl"
    write_manifest(path, [{**r, "image": str(world / r["image"])} for r in read_manifest(world / "train.jsonl")[:16]])
    return path


def test_sft_batches_walk_a_fresh_permutation_of_the_triplets_each_epoch():
    """Step s of epoch e takes the next batch_size triplets of permutation (seed, e); the last batch may be short
    (sft's drop_last=False), or, with drop_last (CLIP training's), the 10 % 4 rows left over sit the epoch out."""
    batches = [step_batch(step, 10, 4, 5, drop_last=False) for step in range(6)]  # 2 epochs of 3 steps
    assert [len(batch) for batch in batches] == [4, 4, 2] * 2
    for epoch in range(2):
        walked = np.concatenate(batches[3 * epoch:3 * epoch + 3])
        assert np.array_equal(walked, np.random.default_rng([5, epoch]).permutation(10))
    assert not np.array_equal(np.concatenate(batches[:3]), np.concatenate(batches[3:]))
    # by hand: default_rng([5, 0]).permutation(10) is 7 6 1 3 2 4 0 9 5 8, default_rng([5, 1])'s 6 7 4 2 5 0 9 8 3 1
    assert [batch.tolist() for batch in batches] == [[7, 6, 1, 3], [2, 4, 0, 9], [5, 8],
                                                     [6, 7, 4, 2], [5, 0, 9, 8], [3, 1]]
    assert [step_batch(step, 10, 4, 5).tolist() for step in range(4)] == [[7, 6, 1, 3], [2, 4, 0, 9],
                                                                         [6, 7, 4, 2], [5, 0, 9, 8]]
    # fewer rows than a batch: one short batch an epoch either way
    assert step_batch(1, 3, 4, 5).tolist() == step_batch(1, 3, 4, 5, drop_last=False).tolist() == [0, 2, 1]


def test_sft_resumes_stops_on_nan_and_saves_a_loadable_fuser(triplets16, tiny_llm, tmp_path, monkeypatch):
    argv = SFT_FLAGS + ["--data", str(triplets16), "--base-model", str(tiny_llm), "--checkpoint-every", "2"]
    straight = capsfusion.main(argv + ["--out", str(tmp_path / "straight")])
    assert straight["steps"] == 4 and straight["triplets"] == 16
    assert straight["history"][-1]["loss"] < straight["history"][0]["loss"]
    real_loss, calls = capsfusion.response_loss, {"n": 0}

    def killed_at_step_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # two micro-batches a step: the job dies in step 2, after the checkpoint of step 2
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(capsfusion, "response_loss", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        capsfusion.main(argv + ["--out", str(tmp_path / "killed")])
    monkeypatch.setattr(capsfusion, "response_loss", real_loss)
    resumed = capsfusion.main(argv + ["--out", str(tmp_path / "killed")])
    assert resumed["resumed_from"] == 2
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]], abs=1e-5)
    with pytest.raises(ValueError, match="no-resume"):
        capsfusion.main(argv + ["--out", str(tmp_path / "killed"), "--lr", "1e-3"])
    monkeypatch.setattr(capsfusion, "response_loss", lambda logits, labels: (logits.sum() * float("nan"),
                                                                             torch.tensor(1)))
    with pytest.raises(FloatingPointError, match="step 0"):
        capsfusion.main(argv + ["--out", str(tmp_path / "nan")])
    assert not (tmp_path / "nan" / "sft_state.pt").exists()


def test_lora_sft_of_the_fp16_llama2_checkpoint_from_a_text_only_triplet_file(world, llama2, tmp_path):
    """The header's sft command (--lora --grad-checkpointing) on LLaMA-2's architecture, from image-less triplets."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    write_manifest(tmp_path / "chatgpt_triplets.jsonl", text_only(read_manifest(world / "train.jsonl")[:8]))
    result = capsfusion.main(["sft", "--data", str(tmp_path / "chatgpt_triplets.jsonl"), "--out",
                              str(tmp_path / "capsfus"), "--base-model", str(llama2), "--lora", "--lora-r", "4",
                              "--micro-batch-size", "2", "--grad-checkpointing", "--epochs", "1", "--batch-size", "4",
                              "--lr", "1e-2", "--device", "cpu"])
    assert result["steps"] == 2 and result["triplets"] == 8 and all(np.isfinite(h["loss"]) for h in result["history"])
    base = load_file(llama2 / "model.safetensors")  # fp16, as LLaMA-2 ships
    trained = torch.load(tmp_path / "capsfus" / "sft_state.pt", weights_only=True)["trainable"]
    lora = {}  # adapted weight -> {"A": (r, in), "B": (out, r)}
    for key, value in trained.items():  # only adapters are saved, float32 on the CPU
        assert "lora_" in key and value.dtype == torch.float32
        module, part = key.removeprefix("base_model.model.").split(".lora_")
        lora.setdefault(module + ".weight", {})[part.split(".")[0]] = value
    assert len(lora) == 2 * 7 and all(lora[k]["B"].abs().max() > 0 for k in lora)  # every linear of 2 blocks; B left 0
    fuser = AutoModelForCausalLM.from_pretrained(result["fuser"], dtype=torch.float32)  # merged: no peft needed to load
    state = fuser.state_dict()
    assert load_file(Path(result["fuser"]) / "model.safetensors")["lm_head.weight"].dtype == torch.float32
    # merged: W + (lora_alpha / r) B A on each adapted weight (alpha 32, r 4), the base weight everywhere else
    expected = {k: w.float() + 32 / 4 * lora[k]["B"] @ lora[k]["A"] if k in lora else w.float()
                for k, w in base.items()}
    assert set(state) == set(expected) and all(torch.allclose(state[k], expected[k], atol=1e-6) for k in state)


def test_sft_example_is_the_inference_prompt_then_the_response_and_eos_with_the_prompt_masked(default_fuse):
    """With LLaMA-2's tokenizer: the SFT input is the official prompt, exactly the ids the fuser is later asked
    with, then the teacher's fusion and EOS; the labels are IGNORE on the prompt and the tokens themselves after."""
    tokenizer, record, call = default_fuse["tokenizer"], default_fuse["records"][0], default_fuse["calls"][0]
    raw, synthetic, fused = (" ".join(record[k].split()) for k in ("alt_text", "synthetic_caption", "fused"))
    input_ids, labels = capsfusion.sft_example(tokenizer, raw, synthetic, fused, capsfusion.Args())
    n = labels.count(capsfusion.IGNORE)
    assert input_ids[:n] == call["input_ids"][0][call["attention_mask"][0].bool()].tolist()
    assert tokenizer.decode(input_ids[:n], skip_special_tokens=True) == official(raw, synthetic)
    assert labels == [capsfusion.IGNORE] * n + input_ids[n:]
    assert input_ids[-1] == tokenizer.eos_token_id and tokenizer.decode(input_ids[n:-1]) == fused


def test_sft_loss_is_the_mean_over_the_global_batchs_response_tokens(triplets16, llama2, tmp_path):
    """Step 0's loss, over uneven micro-batches (3+3+3+3+3+1, right-padded), equals the untrained model's
    -log p of every response token (fusion + EOS) given prompt and the tokens before, averaged over all the
    batch's response tokens, computed here one unpadded triplet at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = capsfusion.main(["sft", "--data", str(triplets16), "--base-model", str(llama2), "--epochs", "1",
                              "--batch-size", "16", "--micro-batch-size", "3", "--device", "cpu",
                              "--out", str(tmp_path)])
    model = AutoModelForCausalLM.from_pretrained(llama2, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llama2)
    nll, count = 0.0, 0
    for r in read_manifest(triplets16):
        prompt = tokenizer(official(*(" ".join(r[k].split()) for k in ("alt_text", "synthetic_caption"))))["input_ids"]
        response = tokenizer(" ".join(r["fused"].split()),
                             add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logp = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)  # (T, V)
        nll -= sum(logp[len(prompt) - 1 + j, token].item() for j, token in enumerate(response))
        count += len(response)
    assert result["steps"] == 1 and result["history"][0]["loss"] == pytest.approx(nll / count, rel=1e-4)


def test_sft_optimiser_warms_up_decays_by_cosine_clips_at_1_without_weight_decay(triplets16, tiny_llm, tmp_path,
                                                                                monkeypatch):
    """Alpaca's recipe as the optimiser sees it: the lr of each step (linear warm-up over warmup_ratio of the
    steps, then transformers' cosine schedule to 0), weight decay 0, gradients clipped to norm 1."""
    from transformers import get_cosine_schedule_with_warmup

    seen, raw_norms, real_clip = [], [], torch.nn.utils.clip_grad_norm_

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            seen.append({"lr": self.param_groups[0]["lr"], "weight_decay": self.param_groups[0]["weight_decay"],
                         "norm": torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()})
            return super().step(closure)

    def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
        raw_norms.append(float(real_clip(parameters, max_norm, *args, **kwargs)))  # the norm before clipping
        return raw_norms[-1]

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)
    result = capsfusion.main(["sft", "--data", str(triplets16), "--base-model", str(tiny_llm), "--epochs", "2",
                              "--batch-size", "4", "--micro-batch-size", "4", "--lr", "3e-3", "--warmup-ratio", "0.25",
                              "--device", "cpu", "--out", str(tmp_path)])
    steps, warmup, peak = 8, 2, 3e-3  # 2 epochs of 16 triplets at 4 a step; 25% of 8 steps
    assert result["steps"] == steps and len(seen) == steps
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    schedule, cosine = get_cosine_schedule_with_warmup(sgd, warmup, steps), []
    for _ in range(steps):
        cosine.append(schedule.get_last_lr()[0])
        sgd.step()
        schedule.step()
    expected = [peak * (s + 1) / warmup for s in range(warmup)] + cosine[warmup:]
    assert [s["lr"] for s in seen] == pytest.approx(expected, rel=1e-6)
    assert [s["weight_decay"] for s in seen] == [0.0] * steps
    assert max(raw_norms) > 1.0 and [s["norm"] for s in seen] == pytest.approx([min(n, 1.0) for n in raw_norms],
                                                                               rel=1e-4)


@pytest.mark.parametrize("device, lora, dtype", [("cuda", True, torch.bfloat16), ("cuda", False, torch.float32),
                                                 ("cpu", True, torch.float32)])
def test_lora_loads_the_frozen_base_in_bf16_on_cuda(triplets16, device, lora, dtype, monkeypatch):
    """A 13B base in float32 is 52 GB a rank; frozen under LoRA it needs only bf16. Trained weights stay float32."""
    loaded = []
    pretend_cuda(monkeypatch)

    def load_causal_lm(name, flag, device, dtype, trust_remote_code=False):
        loaded.append(dtype)
        raise InterruptedError  # the weights' dtype is what this test is about: stop before anything runs on CUDA

    monkeypatch.setattr(capsfusion, "load_causal_lm", load_causal_lm)
    with pytest.raises(InterruptedError):
        capsfusion.main(["sft", "--data", str(triplets16), "--device", device, "--out", "unused"]
                        + ["--lora"] * lora)
    assert loaded == [dtype]


def test_ddp_all_reduces_gradients_once_per_step_not_per_micro_batch(triplets16, tiny_llm, tmp_path, monkeypatch):
    """Two micro-batches a step: the first runs under no_sync, DDP's gradient all-reduce fires in the second only."""
    synced = []

    class CountingDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module, **kwargs):
            super().__init__(module, **kwargs)

            def hook(state, bucket):  # replaces the bucket's all-reduce: count the last bucket of each backward
                synced.append(bucket.is_last())
                future = torch.futures.Future()
                future.set_result(bucket.buffer())
                return future

            self.register_comm_hook(None, hook)

    # a one-process gloo group that stage_sft takes for rank 0 of 2: DDP wraps the model, the data is rank 0's half
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", CountingDDP)
    try:
        result = capsfusion.main(["sft", "--data", str(triplets16), "--base-model", str(tiny_llm), "--epochs", "1",
                                  "--batch-size", "8", "--micro-batch-size", "2", "--device", "cpu",
                                  "--out", str(tmp_path)])
    finally:
        torch.distributed.destroy_process_group()
    assert result["steps"] == 2 and sum(synced) == 2  # per micro-batch (the old loop): 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sft_and_fuse_rank(rank: int, port: int, sft_argv: list, fuse_argv: list, result_path: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        losses = [entry["loss"] for entry in capsfusion.main(sft_argv)["history"]]
        counts = capsfusion.main(fuse_argv)
        if rank == 0:
            with open(result_path, "w") as handle:
                json.dump({"losses": losses, "counts": counts}, handle)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters: 30-80 s on busy cores
def test_two_gloo_processes_match_one_process(world, triplets16, tiny_llm, tmp_path):
    # two micro-batches a rank and step: the first accumulates under no_sync, the second all-reduces
    sft_argv = [("2" if flag == "4" else flag) for flag in SFT_FLAGS] + ["--data", str(triplets16), "--base-model",
                                                                         str(tiny_llm)]
    single = capsfusion.main(sft_argv + ["--out", str(tmp_path / "one")])
    fuse_argv = ["fuse", "--data", str(world / "val.jsonl"), "--out", str(tmp_path / "two" / "fused.jsonl"),
                 "--llm", str(tmp_path / "two" / "fuser"), "--max-new-tokens", "4", "--device", "cpu"]
    result_path = tmp_path / "two.json"
    mp.spawn(_sft_and_fuse_rank, args=(_free_port(), sft_argv + ["--out", str(tmp_path / "two")], fuse_argv,
                                       str(result_path)), nprocs=2, join=True)
    two = json.loads(result_path.read_text())
    # the loss is the mean over the global batch's response tokens, however the batch is split
    assert two["losses"] == pytest.approx([h["loss"] for h in single["history"]], abs=1e-5)
    one_state = torch.load(tmp_path / "one" / "sft_state.pt", weights_only=True)["trainable"]
    two_state = torch.load(tmp_path / "two" / "sft_state.pt", weights_only=True)["trainable"]
    assert all(torch.allclose(one_state[k], two_state[k], atol=1e-4) for k in one_state)
    # sharded fuse: every sample once, merged in input order
    assert two["counts"]["written"] == 6
    fused = read_manifest(tmp_path / "two" / "fused.jsonl")
    assert [r["id"] for r in fused] == [r["id"] for r in read_manifest(world / "val.jsonl")]


def test_torchrun_fuse_in_two_ranks_equals_one_process(world, llama2, tmp_path):
    """The header's `torchrun ... capsfusion.py fuse` in 2 gloo ranks with LLaMA-2's architecture (fp16 on disk,
    fp32 on CPU)."""
    argv = ["fuse", "--data", str(world / "val.jsonl"), "--llm", str(llama2), "--max-new-tokens", "4",
            "--gen-batch-size", "2", "--device", "cpu"]
    one = capsfusion.main(argv + ["--out", str(tmp_path / "one" / "fused.jsonl")])
    run_torchrun("capsfusion.py", argv + ["--out", str(tmp_path / "two" / "fused.jsonl")])
    inputs = read_manifest(world / "val.jsonl")
    single, sharded = read_manifest(tmp_path / "one" / "fused.jsonl"), read_manifest(tmp_path / "two" / "fused.jsonl")
    assert one["written"] == len(inputs) and [r["id"] for r in sharded] == [r["id"] for r in inputs]  # all, in order
    assert [(r["fused"], r["fused_source"]) for r in sharded] == [(r["fused"], r["fused_source"]) for r in single]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["fused.jsonl", "fused.jsonl.recipe.json",
                                                                    "fused.rank0-of-2.jsonl", "fused.rank1-of-2.jsonl"]


def test_fuse_reads_text_only_triplets_and_keeps_image_urls(world, tiny_llm, tmp_path):
    triplets = text_only(read_manifest(world / "val.jsonl")[:3])
    triplets[1]["image"] = "https://example.com/images/000001.jpg"
    write_manifest(tmp_path / "heldout_triplets.jsonl", triplets)
    counts = capsfusion.main(["fuse", "--data", str(tmp_path / "heldout_triplets.jsonl"), "--out",
                              str(tmp_path / "out" / "heldout.jsonl"), "--out-field", "capsfus", "--llm", str(tiny_llm),
                              "--max-new-tokens", "4", "--device", "cpu"])
    out = read_manifest(tmp_path / "out" / "heldout.jsonl", required=("id",))
    assert counts["written"] == 3 and [r["id"] for r in out] == [r["id"] for r in triplets]
    assert "image" not in out[0] and out[1]["image"] == triplets[1]["image"] and all(r["capsfus"] for r in out)


# ---- scaling and the default run, in miniature -----------------------------------------------------------


def recording_train_clip(monkeypatch, train=True) -> list:
    """Patch capsfusion_miniature.train_clip to record, call by call, the texts it would draw for all its images."""
    calls, real = [], capsfusion_miniature.train_clip

    def train_clip(model, tokenizer, images, texts_for, config, **kwargs):
        calls.append(texts_for(kwargs["rows"], np.random.default_rng(0)))
        return real(model, tokenizer, images, texts_for, config, **kwargs) if train else {"history": [{"loss": 0.0}]}

    monkeypatch.setattr(capsfusion_miniature, "train_clip", train_clip)
    return calls


def test_scaling_arms_have_their_own_captions_and_the_same_images_model_and_budget(world, tmp_path, monkeypatch):
    """CLIP creation and training recorded, not run: per arm (raw, synthetic, fused = --out-field, teacher =
    --fused-field, the mix) and size n, a fresh CLIP of --clip-model from --seed trains on the first n samples
    that have every caption, with that arm's captions, for ceil(scaling_epochs * n / clip_batch_size) steps, a
    tenth of them warm-up."""
    records = read_manifest(world / "train.jsonl")[:40]
    for r in records:
        r["image"], r["capsfus"] = str(world / r["image"]), f"fuser: {r['synthetic_caption']}"
    records[2]["alt_text"] = " "  # no raw caption: out of every arm
    _, preprocess, _ = capsfusion_miniature.create_clip("micro-ViT-16")
    created, runs = [], []

    def create_clip(name, seed=None):
        created.append((name, seed))
        return torch.nn.Linear(1, 1), preprocess, None

    def train_clip(model, tokenizer, images, texts_for, config, **kwargs):
        runs.append({"images": images, "rows": kwargs["rows"], "config": config, "model": model,
                     "texts": texts_for(kwargs["rows"], np.random.default_rng(0))})
        return {"history": [{"loss": float(len(runs))}]}

    monkeypatch.setattr(capsfusion_miniature, "create_clip", create_clip)
    monkeypatch.setattr(capsfusion_miniature, "train_clip", train_clip)
    evaluated = []  # the test images each evaluation gets
    monkeypatch.setattr(capsfusion_miniature, "evaluate_clip",
                        lambda *args: evaluated.append(args[-1]) or {"retrieval_R@5": 0.0})
    args = capsfusion.Args(out_field="capsfus", clip_model="micro-ViT-16", sizes=(27, 9, 100), clip_batch_size=2,
                           scaling_epochs=1.5, clip_lr=1e-3, seed=3)
    write_manifest(tmp_path / "train.jsonl", records)
    columns = index_manifest(tmp_path / "train.jsonl")
    test = read_manifest(world / "test.jsonl")[:4]
    result = capsfusion_miniature.stage_scaling(args, columns, test, in_memory=True)
    usable = records[:2] + records[3:]
    arms = {"raw": "alt_text", "synthetic": "synthetic_caption", "fused": "capsfus", "teacher": "fused"}
    assert result["sizes"] == [9, 27] and list(result["curves"]) == [*arms, "raw+synthetic mix"]
    steps = {9: 7, 27: 21}  # ceil(1.5 * 9 / 2), ceil(1.5 * 27 / 2); warm-up 7 // 10 -> 1, 21 // 10 = 2
    images = capsfusion_miniature.preprocess_images(records, preprocess)  # every row, indexed by row
    u = np.random.default_rng(0).random(27)
    expected = {kind: [" ".join(r[field].split()) for r in usable] for kind, field in arms.items()}
    expected["raw+synthetic mix"] = [raw if x < 0.5 else synthetic for raw, synthetic, x
                                     in zip(expected["raw"], expected["synthetic"], u)]
    assert created[1:] == [("micro-ViT-16", 3)] * 10 and len({id(run["model"]) for run in runs}) == len(runs) == 10
    for (kind, n), run in zip([(kind, n) for kind in result["curves"] for n in (9, 27)], runs):
        assert run["texts"] == expected[kind][:n]
        assert torch.equal(run["images"], images) and run["rows"].tolist() == [0, 1, *range(3, n + 1)]
        config = run["config"]
        assert (config.steps, config.batch_size, config.lr, config.seed) == (steps[n], 2, 1e-3, 3)
        assert run["config"].warmup == {9: 1, 27: 2}[n]
    budgets = [[(p["samples"], p["steps"]) for p in curve] for curve in result["curves"].values()]
    assert budgets == [[(9, 7), (27, 21)]] * 5
    assert [p["final_loss"] for curve in result["curves"].values() for p in curve] == list(range(1, 11))
    # in memory, the test images too are preprocessed once, and every arm is evaluated on the same tensor
    assert len({id(images) for images in evaluated}) == 1 and len(evaluated) == 10
    assert torch.equal(evaluated[0], capsfusion_miniature.preprocess_images(test, preprocess))


def test_scaling_plot_draws_the_teacher_as_a_dashed_reference_line(tmp_path, monkeypatch):
    """The teacher's own fusion is a reference, not an arm of the comparison: dashed and labelled so in every panel."""
    import matplotlib.figure

    figures, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda figure, *a, **k: figures.append(figure) or save(figure, *a, **k))
    point = {"retrieval_R@5": 1.0, "zeroshot_attributes": 40.0, "zeroshot_entity": 8.0}
    kinds = ["raw", "synthetic", "fused", "teacher", "raw+synthetic mix"]
    capsfusion_miniature.plot_scaling([{"sizes": [10, 20], "curves": {kind: [point, point] for kind in kinds}}],
                                      tmp_path / "plot.png")
    (figure,) = figures
    assert len(figure.axes) == 3
    for axis in figure.axes:
        styles = {container.get_label(): container.lines[0].get_linestyle() for container in axis.containers}
        assert styles == {"raw": "-", "synthetic": "-", "fused": "-", "teacher (reference)": "--",
                          "raw+synthetic mix": "-"}
    assert [text.get_text() for text in figure.axes[0].get_legend().get_texts()] == [
        "raw", "synthetic", "fused", "teacher (reference)", "raw+synthetic mix"]


def test_scaling_under_torchrun_equals_one_process(world, tmp_path):
    """The docs' real scaling command at tiny size: `torchrun --nproc-per-node 2 capsfusion.py scaling` (gloo, the
    one trainer's DDP) gives every arm's losses and retrieval of one process."""
    plain = [{**r, "image": str(world / r["image"]), "capsfus": f"fuser: {r['synthetic_caption']}"}
             for r in read_manifest(world / "train.jsonl")[:32]]
    write_manifest(tmp_path / "train.jsonl", plain)
    write_manifest(tmp_path / "test.jsonl", [{**r, "image": str(world / r["image"])}
                                             for r in read_manifest(world / "test.jsonl")[:8]])
    argv = ["scaling", "--data", str(tmp_path / "train.jsonl"), "--scaling-data", str(tmp_path / "test.jsonl"),
            "--out-field", "capsfus", "--sizes", "32", "--clip-model", "micro-ViT-16", "--clip-batch-size", "16",
            "--device", "cpu"]
    one = capsfusion.main([*argv, "--out", str(tmp_path / "one")])
    run_torchrun("capsfusion.py", [*argv, "--out", str(tmp_path / "two")])
    two = json.loads((tmp_path / "two" / "scaling.json").read_text())
    assert list(two["curves"]) == list(one["curves"]) == ["raw", "synthetic", "fused", "teacher", "raw+synthetic mix"]
    for kind, curve in one["curves"].items():
        (point,), (other,) = curve, two["curves"][kind]
        assert point["steps"] == other["steps"] == 2
        assert other["final_loss"] == pytest.approx(point["final_loss"], rel=1e-5)
        assert other["retrieval_R@5"] == pytest.approx(point["retrieval_R@5"])


def test_scaling_trains_each_arm_on_its_own_captions_with_vit_b_32(world, tmp_path, monkeypatch):
    """The docs' scaling command (open_clip ViT-B-32 from scratch, tiny width): fused = the fuser's --out-field,
    teacher = --fused-field, a reference arm; every arm on the same images."""
    serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-32")
    plain = [{"id": r["id"], "image": str(world / r["image"]), "caption": r["caption"], "alt_text": r["alt_text"],
              "synthetic_caption": r["synthetic_caption"], "fused": r["fused"],
              "capsfus": f"fuser: {r['synthetic_caption']}"}
             for r in read_manifest(world / "train.jsonl")]
    plain[3]["capsfus"] = ""  # dropped: every caption type must train on the same images
    write_manifest(tmp_path / "train.jsonl", plain[:24])
    write_manifest(tmp_path / "test.jsonl", plain[40:48])
    calls = recording_train_clip(monkeypatch)
    result = capsfusion.main(["scaling", "--data", str(tmp_path / "train.jsonl"), "--scaling-data",
                              str(tmp_path / "test.jsonl"), "--out-field", "capsfus", "--sizes", "8", "16", "100",
                              "--clip-model", "ViT-B-32", "--clip-batch-size", "8", "--out", str(tmp_path / "out")])
    assert result["sizes"] == [8, 16]  # 100 > the 23 usable samples
    assert list(result["curves"]) == ["raw", "synthetic", "fused", "teacher", "raw+synthetic mix"]
    usable = plain[:3] + plain[4:24]
    expected = {kind: [capsfusion.clean(r[field]) for r in usable] for kind, field in
                (("raw", "alt_text"), ("synthetic", "synthetic_caption"), ("fused", "capsfus"), ("teacher", "fused"))}
    u = np.random.default_rng(0).random(16)  # the rng recording_train_clip hands texts_for
    expected["raw+synthetic mix"] = [r if x < 0.5 else s for r, s, x in zip(expected["raw"], expected["synthetic"], u)]
    runs = [(kind, n) for kind in result["curves"] for n in result["sizes"]]
    assert len(calls) == len(runs)
    for (kind, n), texts in zip(runs, calls):
        assert texts == expected[kind][:n]
    for kind, curve in result["curves"].items():
        assert [point["steps"] for point in curve] == [1, 2]
        assert all(np.isfinite(point["final_loss"]) for point in curve)
    assert json.loads((tmp_path / "out" / "scaling.json").read_text()) == result
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 0
    # fuse writes `fused` by default, the field the teacher's triplets also use: then there is no teacher arm
    assert list(capsfusion_miniature.caption_fields(capsfusion.Args(), index_manifest(tmp_path / "train.jsonl"))) == [
        "raw", "synthetic", "fused"]


def test_smoke_preset_runs_every_stage_and_writes_table_plot_and_json(tmp_path, monkeypatch):
    """The header's first command, every stage; the paper scales CapsFus-LLaMA's output: the fused arm trains on
    the fuser's fusion of the training split, the teacher's is a reference line."""
    calls = recording_train_clip(monkeypatch)  # which texts each arm's CLIP trains on (and trains it)
    results = capsfusion.main(["--preset", "smoke", "--out", str(tmp_path)])
    world = ensure_world(WorldConfig(n_train=64, n_val=4, n_test=24))
    train = read_manifest(world / "train.jsonl")[:64]
    fuser = read_manifest(tmp_path / "seed0" / "train.capsfus.jsonl")
    assert [r["id"] for r in fuser] == [r["id"] for r in train]
    by_arm = dict(zip(results["scaling"][0]["curves"], calls[1::2]))  # the 64-sample run of each arm, arm by arm
    assert by_arm["fused"] == [r["capsfus"] for r in fuser] != by_arm["teacher"]
    assert by_arm["teacher"] == [r["fused"] for r in train] and by_arm["raw"] == [r["alt_text"] for r in train]
    fusion = results["fusion"][0]
    assert set(fusion) == {"raw", "synthetic", "teacher", "fuser"}
    assert fusion["teacher"]["names_kept"] > fusion["synthetic"]["names_kept"] == 0.0
    assert "CIDEr" in fusion["fuser"] and "CIDEr" not in fusion["teacher"]
    curves = results["scaling"][0]["curves"]
    assert set(curves) == {"raw", "synthetic", "fused", "teacher", "raw+synthetic mix"}
    assert all(len(c) == 2 for c in curves.values())
    assert all(np.isfinite(point["final_loss"]) and point["steps"] == point["samples"] // 16
               for c in curves.values() for point in c)
    assert (tmp_path / "scaling.png").stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {kind} |" in table for kind in curves) and "| fuser |" in table
    assert json.loads((tmp_path / "results.json").read_text())["fusion"][0] == fusion


# ---- nothing silently wrong: resumed outputs, fields that are not text, a diverged run, errors in one line ---


def fuse_argv(data, out, llm, *more) -> list:
    return ["fuse", "--data", str(data), "--out", str(out), "--llm", str(llm), "--max-new-tokens", "2",
            "--gen-batch-size", "6", "--device", "cpu", *more]


def test_fuse_and_caption_refuse_to_resume_an_output_of_other_settings(world, tiny_llm, tiny_blip, tmp_path):
    """A resumed job skips the ids written; an --out of another --out-field, --llm or --num-beams reported
    already_done and exited 0 without the new field. The recipe beside the output says which settings differ,
    before the model loads; the same settings resume, and an output without its recipe is refused too."""
    out = tmp_path / "fused.jsonl"
    capsfusion.main(fuse_argv(world / "val.jsonl", out, tiny_llm, "--out-field", "capsfus"))
    assert json.loads((tmp_path / "fused.jsonl.recipe.json").read_text())["out_field"] == "capsfus"
    for more, named in ((["--out-field", "other"], "--out-field 'capsfus' there, 'other' now"),
                        (["--out-field", "capsfus", "--num-beams", "1"], "--num-beams 3 there, 1 now"),
                        (["--out-field", "capsfus", "--llm", str(tmp_path / "another-llm")], "--llm")):
        with pytest.raises(ManifestError, match=f"^{out} holds output of other settings \\(.*{named}.*\\); "
                                                           "pass a new --out"):
            capsfusion.main(fuse_argv(world / "val.jsonl", out, tiny_llm, *more))
    counts = capsfusion.main(fuse_argv(world / "val.jsonl", out, tiny_llm, "--out-field", "capsfus"))
    assert counts == {"already_done": 6}
    (tmp_path / "fused.jsonl.recipe.json").unlink()  # an output of an earlier version, settings unknown
    with pytest.raises(ManifestError, match="without fused.jsonl.recipe.json"):
        capsfusion.main(fuse_argv(world / "val.jsonl", out, tiny_llm, "--out-field", "capsfus"))
    caption = ["caption", "--data", str(world / "val.jsonl"), "--out", str(tmp_path / "syn.jsonl"), "--captioner",
               str(tiny_blip), "--caption-max-new-tokens", "2", "--device", "cpu"]
    assert capsfusion.main(caption)["written"] == 6
    with pytest.raises(ManifestError, match="--synthetic-field 'synthetic_caption' there, 'blip' now"):
        capsfusion.main(caption + ["--synthetic-field", "blip"])


def test_sft_refuses_to_resume_a_state_of_other_triplets_or_fields(triplets16, tiny_llm, tmp_path):
    """The recipe held the optimiser settings but not the data: other triplets (or the same file read through
    another --raw-field) resumed the state trained on the first ones. The lr is in it: a different --lr is named,
    never silently replaced by the optimiser state's."""
    argv = ["sft", "--base-model", str(tiny_llm), "--epochs", "1", "--batch-size", "16", "--device", "cpu",
            "--out", str(tmp_path)]
    capsfusion.main(argv + ["--data", str(triplets16)])
    write_manifest(tmp_path / "fewer.jsonl", read_manifest(triplets16)[:15])
    for more, named in ((["--data", str(tmp_path / "fewer.jsonl")], "--data '16 triplets, sha256 "),
                        (["--data", str(triplets16), "--raw-field", "synthetic_caption"],
                         "--raw-field 'alt_text' there"),
                        (["--data", str(triplets16), "--lr", "1e-3"], "--lr 2e-05 there, 0.001 now")):
        with pytest.raises(ManifestError, match=f"sft_state.pt holds a run of other settings \\(.*{named}.*\\);"
                                                           " pass a new --out, or --no-resume"):
            capsfusion.main(argv + more)
    assert capsfusion.main(argv + ["--data", str(triplets16)])["resumed_from"] == 1


def test_a_number_or_a_list_where_a_caption_belongs_is_refused_naming_the_sample(world, tmp_path):
    """`alt_text: 123` reached the LLM as "123" and a list as "['stock photo', ...]" (fuse), trained on (sft) and
    scored (eval). Now an error naming the sample and the field, in fuse before the LLM loads; empty or missing
    captions keep their Deviation 3 treatment."""
    records = text_only(read_manifest(world / "val.jsonl")[:3])
    records[1]["alt_text"] = 123
    write_manifest(tmp_path / "number.jsonl", records)
    records[1]["alt_text"] = ["stock photo", "Aldora"]
    write_manifest(tmp_path / "list.jsonl", records)
    for name, shown in (("number", "123"), ("list", r'\["stock photo", "Aldora"\]')):
        with pytest.raises(BadSampleError,
                           match=f"^sample '{records[1]['id']}': field 'alt_text' must be a string, got {shown}$"):
            capsfusion.main(fuse_argv(tmp_path / f"{name}.jsonl", tmp_path / "out.jsonl", tmp_path / "no-such-llm"))
    with pytest.raises(BadSampleError, match="field 'alt_text' must be a string"):
        capsfusion.triplets(records, capsfusion.Args())
    write_manifest(tmp_path / "scored.jsonl", [{**r, "fused": 5} if i == 2 else r for i, r in enumerate(text_only(
        read_manifest(world / "val.jsonl")[:3]))])
    with pytest.raises(BadSampleError, match="field 'fused' must be a string, got 5"):
        capsfusion.main(["eval", "--data", str(tmp_path / "scored.jsonl"), "--out", str(tmp_path / "eval")])


def test_a_diverged_sft_stops_with_one_line_and_leaves_the_last_good_state(triplets16, tiny_llm, tmp_path, monkeypatch):
    """Only the loss was checked: an update that put NaN in the weights was saved (sft_state.pt, the fuser) with
    exit 0. Now the weights are checked before every write: the state on disk stays the last finite one, no fuser is
    saved, and the command line ends with one line and status 1."""
    import subprocess
    import sys

    real_step = torch.optim.AdamW.step

    def nan_at_the_second_step(self, *args, **kwargs):  # the second update diverges, its loss (before it) was fine
        result = real_step(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", nan_at_the_second_step)
    argv = ["sft", "--data", str(triplets16), "--base-model", str(tiny_llm), "--epochs", "1", "--batch-size", "8",
            "--checkpoint-every", "1", "--device", "cpu"]
    with pytest.raises(NonFiniteError, match=f"^sft at step 1 of 2, after its update \\({tmp_path / 'a'}"
                                                        "/sft_state.pt keeps step 1\\): \\d+ of \\d+ weight tensors"):
        capsfusion.main(argv + ["--out", str(tmp_path / "a")])
    state = torch.load(tmp_path / "a" / "sft_state.pt", weights_only=True)
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["trainable"].values())
    assert not (tmp_path / "a" / "fuser").exists()
    command = [sys.executable, capsfusion.__file__, *argv, "--lr", "inf", "--out", str(tmp_path / "b")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: sft at step 0 of 2, after its update ({tmp_path / 'b' / 'sft_state.pt'} not written by this run): ")
    assert not (tmp_path / "b" / "sft_state.pt").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--num-beams", "0", "--num-beams must be at least 1, got 0"),
    ("--gen-batch-size", "0", "--gen-batch-size must be at least 1, got 0"),
    ("--batch-size", "-2", "--batch-size must be at least 1, got -2"),
    ("--epochs", "0", "--epochs must be at least 1, got 0"),
    ("--max-new-tokens", "0", "--max-new-tokens must be at least 1, got 0"),
    ("--lr", "0", "--lr must be positive, got 0.0"),
    ("--lr", "nan", "--lr must be positive, got nan"),
    ("--warmup-ratio", "1.5", r"--warmup-ratio must be in \[0, 1\], got 1.5"),
    ("--lora-dropout", "1", r"--lora-dropout must be in \[0, 1\), got 1.0"),
    ("--sizes", "0", r"--sizes must be numbers of samples, each at least 1, got \(0,\)")])
def test_flags_out_of_range_are_one_line_naming_the_flag_before_anything_loads(world, flag, value, message):
    with pytest.raises(SystemExit, match=f"^error: {message}$"):
        capsfusion.main(["fuse", "--data", str(world / "val.jsonl"), "--out", "unused", flag, value])


def test_device_cuda_without_cuda_and_a_missing_manifest_are_one_line(tmp_path, monkeypatch):
    import subprocess
    import sys

    from common.data import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="^--device cuda: CUDA is not available on this machine"):
        capsfusion.main(["eval", "--data", str(tmp_path / "any.jsonl"), "--out", str(tmp_path), "--device", "cuda"])
    with pytest.raises(SystemExit, match="^error: the fuse stage needs --data"):
        capsfusion.main(["fuse", "--device", "cpu"])
    done = subprocess.run([sys.executable, capsfusion.__file__, "eval", "--data", str(tmp_path / "none.jsonl"),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.strip() == (f"error: manifest not found: {tmp_path / 'none.jsonl'} "
                                                            "(--debug shows the traceback)")


def test_scaling_writes_clip_benchmark_rows_of_every_point(world, tmp_path, monkeypatch):
    """--benchmark: each point's trained CLIP (the one evaluate_clip scores) goes to clip_benchmark; a missing set
    stops the stage before any point trains."""
    from common.benchmarks import MissingBenchmark, evaluate_benchmarks
    from test_benchmarks import write_stage_sets

    root = write_stage_sets(tmp_path / "sets")
    plain = [{**r, "image": str(world / r["image"]), "capsfus": f"fuser: {r['synthetic_caption']}"}
             for r in read_manifest(world / "train.jsonl")[:16]]
    write_manifest(tmp_path / "train.jsonl", plain)
    write_manifest(tmp_path / "test.jsonl", [{**r, "image": str(world / r["image"])}
                                             for r in read_manifest(world / "test.jsonl")[:8]])
    argv = ["scaling", "--data", str(tmp_path / "train.jsonl"), "--scaling-data", str(tmp_path / "test.jsonl"),
            "--out-field", "capsfus", "--sizes", "16", "--clip-model", "micro-ViT-16", "--clip-batch-size", "16",
            "--device", "cpu", "--benchmark-root", root]
    trained = []
    evaluate_clip = capsfusion_miniature.evaluate_clip
    monkeypatch.setattr(capsfusion_miniature, "evaluate_clip",
                        lambda model, *a: trained.append(model) or evaluate_clip(model, *a))
    with pytest.raises(MissingBenchmark, match="wds_absent"):
        capsfusion.main([*argv, "--benchmark", "wds/absent", "--out", str(tmp_path / "none")])
    assert trained == []
    result = capsfusion.main([*argv, "--benchmark", "wds/flickr30k", "--out", str(tmp_path / "out")])
    points = [point for curve in result["curves"].values() for point in curve]
    assert len(points) == len(trained) == 5
    for point, model in zip(points, trained):
        expected = evaluate_benchmarks(model, *capsfusion_miniature.create_clip("micro-ViT-16")[1:],
                                       ["wds/flickr30k"], root, model_label="micro-ViT-16",
                                       pretrained=point["benchmarks"][0]["pretrained"])
        assert point["benchmarks"] == expected
    written = [json.loads(line) for line in (tmp_path / "out" / "benchmarks.jsonl").read_text().splitlines()]
    assert written == [point["benchmarks"][0] for point in points]
    assert len({row["pretrained"] for row in written}) == 5  # one row per caption type, named by it


def test_degenerate_generated_captions_are_written_flagged_and_counted(world, tiny_llm, tiny_blip, tmp_path,
                                                                       monkeypatch,
                                                                        caplog):
    """A captioner or fuser looping "a 2 2 2 2 2" is written (not dropped) with `degenerate` naming why, counted in
    the stage's counts and its warning line; fuse streams --data and checks it before the LLM loads."""
    monkeypatch.setattr(capsfusion, "first_line", lambda text: "a 2 2 2 2 2")
    caption = ["caption", "--data", str(world / "val.jsonl"), "--out", str(tmp_path / "syn.jsonl"), "--captioner",
               str(tiny_blip), "--caption-max-new-tokens", "2", "--device", "cpu"]
    with caplog.at_level(logging.WARNING, logger="capsfusion"):
        counts = capsfusion.main(caption)
    out = read_manifest(tmp_path / "syn.jsonl")
    assert counts["written"] == counts["degenerate"] == len(out) == 6
    assert all(r["synthetic_caption"] == "a 2 2 2 2 2" for r in out)
    assert all(r["synthetic_caption_degenerate"].startswith("repeated token") for r in out)
    assert "6 of 6 generated captions degenerate, flagged" in caplog.text
    counts = capsfusion.main(fuse_argv(world / "val.jsonl", tmp_path / "fused.jsonl", tiny_llm))
    fused = read_manifest(tmp_path / "fused.jsonl")
    asked = [r for r in fused if r["fused_source"] == "llm"]
    assert asked and counts["degenerate"] == len(asked) and all(r["fused_degenerate"] and r["fused"] == "a 2 2 2 2 2"
                                                                for r in asked)
    assert not any("fused_degenerate" in r for r in fused if r["fused_source"] != "llm")  # the fallback: not asked


def test_recipe_of_shards_out_lives_in_the_output_folder(tmp_path):
    """Shards in, shards out: --out is a folder, so the recipe is <out>/recipe.json, not a file beside it."""
    data, out = str(tmp_path / "in" / "{000..001}.tar"), tmp_path / "out"
    assert recipe_path(data, out) == out / "recipe.json"
    assert recipe_path(str(tmp_path / "in.jsonl"), tmp_path / "o.jsonl") == tmp_path / "o.jsonl.recipe.json"
    check_resumable(data, out, {"llm": "a"})
    assert json.loads((out / "recipe.json").read_text()) == {"llm": "a"}
    check_resumable(data, out, {"llm": "b"})  # nothing generated yet: the new settings replace it
    (out / "000.tar").write_bytes(b"")
    with pytest.raises(ManifestError, match="--llm 'b' there, 'a' now"):
        check_resumable(data, out, {"llm": "a"})
    (out / "recipe.json").unlink()
    with pytest.raises(ManifestError, match="without recipe.json"):
        check_resumable(data, out, {"llm": "b"})
