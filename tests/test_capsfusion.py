"""capsfusion.py: the official prompt, the 256-token cap, the SFT label mask, fuse with a tiny random LLM
(one line per input, resume after a kill), empty captions, caption -> fuse -> eval through manifests,
SFT (resume, NaN, LoRA), and the miniature main()."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import capsfusion
from common.data import read_manifest, write_manifest
from common.miniature import WorldConfig, ensure_world

TINY_WORLD = WorldConfig(n_train=64, n_val=6, n_test=24)
# The prompt of baaivision/CapsFusion capsfusion_inference.py, written out here independently.
OFFICIAL = ("Please merge and refine the information from the two given sentences. Sentence 1 provides detailed "
            "real-world knowledge, yet it suffers from flaws in sentence structure and grammar. Sentence 2 exhibits "
            "nice sentence structure, but lacking in-depth real-world details and may contain false information. "
            "Please combine them into a new sentence, ensuring a well-structured sentence while retaining the detailed "
            "real-world information provided in Sentence 1. Avoid simply concatenating the sentences.\n\n"
            "Sentence 1: VW T-ROC alloy wheel\nSentence 2: The wheel on the Volkswagen SUV is shown.\nNew Sentence:")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_world(TINY_WORLD, tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def tiny_llm(world, tmp_path_factory):
    """A random 2-layer Llama with the miniature word-level tokenizer, saved as a local folder."""
    return capsfusion.miniature_fuser(read_manifest(world / "train.jsonl"), tmp_path_factory.mktemp("llm") / "base", 0)


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


# ---- the prompt and its cap ------------------------------------------------------------------


def test_prompt_is_byte_identical_to_the_official_one():
    prompt = capsfusion.FUSION_PROMPT.format(raw="VW T-ROC alloy wheel", synthetic="The wheel on the Volkswagen SUV is shown.")
    assert prompt.encode() == OFFICIAL.encode()
    made, trimmed = capsfusion.fusion_prompt(word_tokenizer(), "VW T-ROC alloy wheel",
                                             "The wheel on the Volkswagen SUV is shown.", 256)
    assert made == OFFICIAL and not trimmed


def test_cap_trims_only_the_raw_caption_from_its_end():
    tokenizer = word_tokenizer()
    synthetic = "a red circle with the Aldora emblem on grass."
    raw = " ".join(f"w{i % 5}" for i in range(400))
    empty_raw = capsfusion.prompt_length(tokenizer, capsfusion.FUSION_PROMPT.format(raw="", synthetic=synthetic))
    assert 90 < empty_raw < 256  # the instruction is long: the cap leaves the raw caption 256 - empty_raw tokens
    prompt, trimmed = capsfusion.fusion_prompt(tokenizer, raw, synthetic, 256)
    assert trimmed and capsfusion.prompt_length(tokenizer, prompt) == 256
    assert prompt.startswith(capsfusion.INSTRUCTION) and prompt.endswith(f"\nSentence 2: {synthetic}\nNew Sentence:")
    kept = prompt.split("Sentence 1: ")[1].split("\nSentence 2:")[0]
    assert kept == " ".join(raw.split()[:256 - empty_raw])  # the raw caption's first tokens
    # exactly at the cap: nothing is cut (the official `ids[:-0]` would drop the whole raw caption)
    fits = " ".join(raw.split()[:256 - empty_raw])
    assert capsfusion.fusion_prompt(tokenizer, fits, synthetic, 256) == (capsfusion.FUSION_PROMPT.format(raw=fits, synthetic=synthetic), False)
    # a synthetic caption that alone overflows: the raw caption goes, instruction and synthetic stay whole
    prompt, trimmed = capsfusion.fusion_prompt(tokenizer, raw, synthetic, empty_raw - 3)
    assert trimmed and prompt == capsfusion.FUSION_PROMPT.format(raw="", synthetic=synthetic)


def test_sft_label_mask_covers_exactly_the_response():
    tokenizer = word_tokenizer()
    args = capsfusion.Args()
    raw, synthetic, fused = "Aldora stock photo red", "a red circle on grass.", "a red circle with the Aldora emblem on grass."
    input_ids, labels = capsfusion.sft_example(tokenizer, raw, synthetic, fused, args)
    prompt_ids = tokenizer(capsfusion.FUSION_PROMPT.format(raw=raw, synthetic=synthetic))["input_ids"]
    response_ids = tokenizer(fused, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert input_ids == prompt_ids + response_ids and len(labels) == len(input_ids)
    assert labels[:len(prompt_ids)] == [capsfusion.IGNORE] * len(prompt_ids)
    assert labels[len(prompt_ids):] == response_ids
    assert tokenizer.decode(labels[len(prompt_ids):-1]) == tokenizer.decode(tokenizer(fused, add_special_tokens=False)["input_ids"])
    # the loss reads exactly those tokens: position t predicts t + 1
    logits = torch.randn(1, len(input_ids), len(tokenizer))
    nll, count = capsfusion.response_loss(logits, torch.tensor([labels]))
    expected = -torch.log_softmax(logits[0, :-1], -1)[torch.arange(len(input_ids) - 1), torch.tensor(input_ids[1:])]
    assert count == len(response_ids) and torch.isclose(nll, expected[len(prompt_ids) - 1:].sum())


# ---- fuse: tiny random LLM, resume, empty captions -------------------------------------------


def test_fuse_writes_one_line_per_input_and_resumes_after_a_kill(world, tiny_llm, tmp_path, monkeypatch):
    out = tmp_path / "fused.jsonl"
    argv = ["--stage", "fuse", "--data", str(world / "val.jsonl"), "--out", str(out), "--llm", str(tiny_llm),
            "--out-field", "capsfus", "--gen-batch-size", "2", "--max-new-tokens", "6", "--device", "cpu"]
    real_generate, calls = capsfusion.generate, {"n": 0}

    def killed_in_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(capsfusion, "generate", killed_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        capsfusion.main(argv)
    assert len(out.read_text().splitlines()) == 2  # the first batch survived the kill
    with open(out, "ab") as handle:
        handle.write(b'{"id": "val-00')  # and a line cut mid-write
    monkeypatch.setattr(capsfusion, "generate", real_generate)
    counts = capsfusion.main(argv)
    assert counts["already_done"] == 2 and counts["written"] == 4
    inputs, fused = read_manifest(world / "val.jsonl"), read_manifest(out)
    assert [r["id"] for r in fused] == [r["id"] for r in inputs] and len(out.read_text().splitlines()) == 6
    assert all(r["capsfus"] and r["capsfus_source"] in ("llm", "synthetic") and "\n" not in r["capsfus"] for r in fused)
    assert all(r["fused"] == i["fused"] for r, i in zip(fused, inputs))  # the teacher's field is untouched
    assert all((out.parent / r["image"]).exists() for r in fused)
    assert capsfusion.main(argv) == {"already_done": 6}


def test_empty_raw_or_synthetic_caption_is_copied_and_both_empty_is_skipped(world, tiny_llm, tmp_path):
    records = read_manifest(world / "val.jsonl")[:4]
    records[0]["alt_text"] = "  "
    records[1]["synthetic_caption"] = ""
    records[2]["alt_text"], records[2]["synthetic_caption"] = "", None
    write_manifest(tmp_path / "in.jsonl", [{**r, "image": str(world / r["image"])} for r in records])
    argv = ["--stage", "fuse", "--data", str(tmp_path / "in.jsonl"), "--llm", str(tiny_llm), "--max-new-tokens", "4",
            "--device", "cpu"]
    counts = capsfusion.main(argv + ["--out", str(tmp_path / "out.jsonl")])
    assert counts["copied_synthetic"] == 1 and counts["copied_raw"] == 1 and counts["skipped_no_text"] == 1
    out = {r["id"]: r for r in read_manifest(tmp_path / "out.jsonl")}
    assert list(out) == [records[i]["id"] for i in (0, 1, 3)]  # input order, the empty pair left out
    assert out[records[0]["id"]]["fused"] == records[0]["synthetic_caption"]
    assert out[records[0]["id"]]["fused_source"] == "synthetic"
    assert out[records[1]["id"]]["fused"] == records[1]["alt_text"] and out[records[1]["id"]]["fused_source"] == "raw"
    assert out[records[3]["id"]]["fused_source"] in ("llm", "synthetic")
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
            capsfusion.main(["--stage", stage, "--data", str(world / "val.jsonl"), "--out", str(tmp_path / "x"),
                             flag, str(tmp_path / "no-such-model"), "--device", "cpu"])


# ---- caption -> fuse -> eval through manifests -----------------------------------------------


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A random BLIP captioner (the paper's family) with a small BERT vocabulary, saved as a local folder."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, BlipTextConfig, BlipVisionConfig)

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "blue", "circle", "square", "on",
             "grass", "sand", "photo", "of", "with", "the"]
    folder = tmp_path_factory.mktemp("blip")
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer).save_pretrained(folder)
    vision = BlipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    text = BlipTextConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, encoder_hidden_size=16, bos_token_id=5, sep_token_id=3,
                          eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict())).save_pretrained(folder)
    return folder


def test_stages_chain_caption_fuse_eval(world, tiny_blip, tiny_llm, tmp_path):
    records = read_manifest(world / "val.jsonl")
    bare = [{"id": r["id"], "image": str(world / r["image"]), "alt_text": r["alt_text"]} for r in records]
    bare[1]["image"] = str(tmp_path / "missing.png")  # an unreadable image is counted and skipped
    write_manifest(tmp_path / "web.jsonl", bare)
    counts = capsfusion.main(["--stage", "caption", "--data", str(tmp_path / "web.jsonl"), "--out",
                              str(tmp_path / "a" / "syn.jsonl"), "--captioner", str(tiny_blip), "--gen-batch-size", "3",
                              "--caption-max-new-tokens", "5", "--device", "cpu"])
    assert counts["written"] == 5 and counts["unreadable_images"] == 1
    synthetic = read_manifest(tmp_path / "a" / "syn.jsonl")
    assert all(isinstance(r["synthetic_caption"], str) for r in synthetic)
    assert all((tmp_path / "a" / r["image"]).exists() for r in synthetic)
    counts = capsfusion.main(["--stage", "fuse", "--data", str(tmp_path / "a" / "syn.jsonl"), "--out",
                              str(tmp_path / "b" / "fused.jsonl"), "--llm", str(tiny_llm), "--max-new-tokens", "5",
                              "--device", "cpu"])
    assert counts["written"] == 5
    metrics = capsfusion.main(["--stage", "eval", "--data", str(tmp_path / "b" / "fused.jsonl"), "--out",
                               str(tmp_path / "eval")])
    assert set(metrics) == {"raw", "synthetic", "teacher"}  # the fuse output is the `fused` field here
    assert metrics["raw"]["raw_names_kept"] == 100.0 and "BLEU-4" in metrics["synthetic"]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == metrics


# ---- SFT: training, resume, NaN, LoRA --------------------------------------------------------


SFT_FLAGS = ["--stage", "sft", "--epochs", "2", "--batch-size", "8", "--micro-batch-size", "4", "--lr", "3e-3",
             "--device", "cpu"]


@pytest.fixture(scope="module")
def triplets16(world, tmp_path_factory):
    """16 training triplets of the tiny world (2 SFT steps an epoch at batch 8)."""
    path = tmp_path_factory.mktemp("triplets") / "train16.jsonl"
    write_manifest(path, [{**r, "image": str(world / r["image"])} for r in read_manifest(world / "train.jsonl")[:16]])
    return path


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
    monkeypatch.setattr(capsfusion, "response_loss", lambda logits, labels: (logits.sum() * float("nan"), torch.tensor(1)))
    with pytest.raises(FloatingPointError, match="step 0"):
        capsfusion.main(argv + ["--out", str(tmp_path / "nan")])
    assert not (tmp_path / "nan" / "sft_state.pt").exists()


def test_lora_sft_merges_adapters_into_the_saved_fuser(triplets16, tiny_llm, tmp_path):
    from transformers import AutoModelForCausalLM

    result = capsfusion.main(SFT_FLAGS + ["--data", str(triplets16), "--base-model", str(tiny_llm), "--lora",
                                          "--lora-r", "4", "--out", str(tmp_path)])
    base = AutoModelForCausalLM.from_pretrained(tiny_llm)
    fuser = AutoModelForCausalLM.from_pretrained(result["fuser"])  # a plain causal LM, no peft needed to load it
    assert set(fuser.state_dict()) == set(base.state_dict())
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(fuser.state_dict()[weight], base.state_dict()[weight])
    assert torch.equal(fuser.state_dict()["model.norm.weight"], base.state_dict()["model.norm.weight"])  # frozen


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sft_and_fuse_rank(rank: int, port: int, sft_argv: list, fuse_argv: list, result_path: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
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
    sft_argv = SFT_FLAGS + ["--data", str(triplets16), "--base-model", str(tiny_llm)]
    single = capsfusion.main(sft_argv + ["--out", str(tmp_path / "one")])
    fuse_argv = ["--stage", "fuse", "--data", str(world / "val.jsonl"), "--out", str(tmp_path / "two" / "fused.jsonl"),
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


# ---- scaling and the default run, in miniature -----------------------------------------------------------


def test_scaling_on_a_plain_manifest_writes_curves_and_plot(world, tmp_path):
    plain = [{"id": r["id"], "image": str(world / r["image"]), "caption": r["caption"], "alt_text": r["alt_text"],
              "synthetic_caption": r["synthetic_caption"], "fused": r["fused"]} for r in read_manifest(world / "train.jsonl")]
    plain[3]["fused"] = ""  # dropped: every caption type must train on the same images
    write_manifest(tmp_path / "train.jsonl", plain[:40])
    write_manifest(tmp_path / "test.jsonl", plain[40:56])
    result = capsfusion.main(["--stage", "scaling", "--data", str(tmp_path / "train.jsonl"), "--scaling-data",
                              str(tmp_path / "test.jsonl"), "--sizes", "8", "16", "100", "--clip-model", "micro-ViT-16",
                              "--clip-batch-size", "8", "--out", str(tmp_path / "out")])
    assert result["sizes"] == [8, 16]  # 100 > the 39 usable samples
    for kind in capsfusion.CAPTION_TYPES:
        assert [point["steps"] for point in result["curves"][kind]] == [1, 2]
        assert all(0 <= point["retrieval_R@5"] <= 100 for point in result["curves"][kind])
    assert json.loads((tmp_path / "out" / "scaling.json").read_text()) == result
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 0


@pytest.mark.slow  # sft, fuse, eval and 8 CLIP trainings: 20-60 s on 2 busy cores
def test_miniature_main_writes_table_plot_and_json(tmp_path):
    results = capsfusion.main(["--world.n-train", "64", "--world.n-val", "4", "--world.n-test", "24", "--sizes", "16", "64",
                               "--clip-model", "micro-ViT-16", "--clip-batch-size", "16", "--max-new-tokens", "8",
                               "--out", str(tmp_path)])
    fusion = results["fusion"][0]
    assert set(fusion) == {"raw", "synthetic", "teacher", "fuser"}
    assert fusion["teacher"]["names_kept"] > fusion["synthetic"]["names_kept"] == 0.0
    assert "CIDEr" in fusion["fuser"] and "CIDEr" not in fusion["teacher"]
    curves = results["scaling"][0]["curves"]
    assert set(curves) == set(capsfusion.CAPTION_TYPES) and all(len(c) == 2 for c in curves.values())
    assert all(np.isfinite(point["final_loss"]) and point["steps"] == point["samples"] // 16
               for c in curves.values() for point in c)
    assert (tmp_path / "scaling.png").stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {kind} |" in table for kind in capsfusion.CAPTION_TYPES) and "| fuser |" in table
    assert json.loads((tmp_path / "results.json").read_text())["fusion"][0] == fusion
