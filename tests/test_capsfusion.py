"""capsfusion.py: the official prompt, the 256-token cap, the SFT label mask, fuse with a tiny random LLM
(one line per input, resume after a kill), empty captions, caption -> fuse -> eval through manifests,
SFT (resume, NaN, LoRA over a half-precision base, one gradient all-reduce a step), the scaling arms,
and the miniature main(). Real architectures at tiny width, offline: BLIP-large's for `caption`,
LLaMA-2-13B's (fp16, as shipped) for `sft` / `fuse`, including `torchrun --nproc-per-node 2` fuse,
open_clip ViT-B-32 for `scaling`."""

import json
import os
import socket

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import capsfusion
from common.data import read_manifest, write_manifest
from common.miniature import WorldConfig, ensure_world
from tests.realarch import run_torchrun, save_hf, serve_open_clip_tag

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


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    """meta-llama/Llama-2-13b-hf's classes and structural settings at tiny width, saved in fp16 as it ships.

    LlamaForCausalLM (SiLU MLP without biases, RMSNorm eps 1e-5, as many key/value heads as heads, untied
    output embedding, 4096 positions) and a LlamaTokenizer (byte-fallback BPE, BOS added, no pad token),
    its 600-token vocabulary trained on the prompt instead of LLaMA's 32000.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    texts = [capsfusion.FUSION_PROMPT, "a red circle with the Aldora emblem on grass, stock photo"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    bpe_model = json.loads(bpe.to_str())["model"]
    tokenizer = LlamaTokenizer(vocab=bpe_model["vocab"], merges=[tuple(m) for m in bpe_model["merges"]], add_bos_token=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, hidden_act="silu", rms_norm_eps=1e-5,
                         max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama2") / "Llama-2-13b-hf"
    save_hf(LlamaForCausalLM(config), folder, torch.float16)
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
    save_hf(BlipForConditionalGeneration(BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict())), folder,
            torch.float32)
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


def test_lora_sft_of_the_fp16_llama2_checkpoint_from_a_text_only_triplet_file(world, llama2, tmp_path):
    """The header's sft command (--lora --grad-checkpointing) on LLaMA-2's architecture, from triplets without images."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    write_manifest(tmp_path / "chatgpt_triplets.jsonl", text_only(read_manifest(world / "train.jsonl")[:8]))
    result = capsfusion.main(["--stage", "sft", "--data", str(tmp_path / "chatgpt_triplets.jsonl"), "--out",
                              str(tmp_path / "capsfus"), "--base-model", str(llama2), "--lora", "--lora-r", "4",
                              "--micro-batch-size", "2", "--grad-checkpointing", "--epochs", "1", "--batch-size", "4",
                              "--lr", "1e-2", "--device", "cpu"])
    assert result["steps"] == 2 and result["triplets"] == 8 and all(np.isfinite(h["loss"]) for h in result["history"])
    base = load_file(llama2 / "model.safetensors")
    assert base["model.norm.weight"].dtype == torch.float16  # the checkpoint is half precision ...
    trained = torch.load(tmp_path / "capsfus" / "sft_state.pt", weights_only=True)["trainable"]
    assert trained and all("lora_" in k and v.dtype == torch.float32 for k, v in trained.items())  # ... the CPU run is not
    fuser = AutoModelForCausalLM.from_pretrained(result["fuser"], dtype=torch.float32)  # merged: no peft needed to load
    state = fuser.state_dict()
    assert set(state) == set(base) and load_file(Path(result["fuser"]) / "model.safetensors")["lm_head.weight"].dtype == torch.float32
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[weight], base[weight].float())
    assert torch.equal(state["model.norm.weight"], base["model.norm.weight"].float())  # frozen


@pytest.mark.parametrize("device, lora, dtype", [("cuda", True, torch.bfloat16), ("cuda", False, torch.float32),
                                                 ("cpu", True, torch.float32)])
def test_lora_loads_the_frozen_base_in_bf16_on_cuda(triplets16, device, lora, dtype, monkeypatch):
    """A 13B base in float32 is 52 GB a rank; frozen under LoRA it needs only bf16. Trained weights stay float32."""
    loaded = []

    def load_fuser(name, flag, args, device, dtype):
        loaded.append(dtype)
        raise InterruptedError  # the weights' dtype is what this test is about: stop before anything runs on CUDA

    monkeypatch.setattr(capsfusion, "load_fuser", load_fuser)
    with pytest.raises(InterruptedError):
        capsfusion.main(["--stage", "sft", "--data", str(triplets16), "--device", device, "--out", "unused"]
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
        result = capsfusion.main(["--stage", "sft", "--data", str(triplets16), "--base-model", str(tiny_llm), "--epochs", "1",
                                  "--batch-size", "8", "--micro-batch-size", "2", "--device", "cpu", "--out", str(tmp_path)])
    finally:
        torch.distributed.destroy_process_group()
    assert result["steps"] == 2 and sum(synced) == 2  # per micro-batch (the old loop): 4


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
    # two micro-batches a rank and step: the first accumulates under no_sync, the second all-reduces
    sft_argv = [("2" if flag == "4" else flag) for flag in SFT_FLAGS] + ["--data", str(triplets16), "--base-model", str(tiny_llm)]
    assert sft_argv[sft_argv.index("--micro-batch-size") + 1] == "2"
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


def test_torchrun_fuse_in_two_ranks_equals_one_process(world, llama2, tmp_path):
    """The header's `torchrun ... --stage fuse` in 2 gloo ranks with LLaMA-2's architecture (fp16 on disk, fp32 on CPU)."""
    argv = ["--stage", "fuse", "--data", str(world / "val.jsonl"), "--llm", str(llama2), "--max-new-tokens", "4",
            "--gen-batch-size", "2", "--device", "cpu"]
    one = capsfusion.main(argv + ["--out", str(tmp_path / "one" / "fused.jsonl")])
    run_torchrun("capsfusion.py", argv + ["--out", str(tmp_path / "two" / "fused.jsonl")])
    inputs = read_manifest(world / "val.jsonl")
    single, sharded = read_manifest(tmp_path / "one" / "fused.jsonl"), read_manifest(tmp_path / "two" / "fused.jsonl")
    assert one["written"] == len(inputs) and [r["id"] for r in sharded] == [r["id"] for r in inputs]  # all, in order
    assert [(r["fused"], r["fused_source"]) for r in sharded] == [(r["fused"], r["fused_source"]) for r in single]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["fused.jsonl", "fused.rank0-of-2.jsonl",
                                                                    "fused.rank1-of-2.jsonl"]


def test_fuse_reads_text_only_triplets_and_keeps_image_urls(world, tiny_llm, tmp_path):
    triplets = text_only(read_manifest(world / "val.jsonl")[:3])
    triplets[1]["image"] = "https://example.com/images/000001.jpg"
    write_manifest(tmp_path / "heldout_triplets.jsonl", triplets)
    counts = capsfusion.main(["--stage", "fuse", "--data", str(tmp_path / "heldout_triplets.jsonl"), "--out",
                              str(tmp_path / "out" / "heldout.jsonl"), "--out-field", "capsfus", "--llm", str(tiny_llm),
                              "--max-new-tokens", "4", "--device", "cpu"])
    out = read_manifest(tmp_path / "out" / "heldout.jsonl", required=("id",))
    assert counts["written"] == 3 and [r["id"] for r in out] == [r["id"] for r in triplets]
    assert "image" not in out[0] and out[1]["image"] == triplets[1]["image"] and all(r["capsfus"] for r in out)


# ---- scaling and the default run, in miniature -----------------------------------------------------------


def recording_train_clip(monkeypatch, train=True) -> list:
    """Patch capsfusion.train_clip to record, call by call, the texts it would draw for all its images."""
    calls, real = [], capsfusion.train_clip

    def train_clip(model, tokenizer, images, texts_for, config, **kwargs):
        calls.append(texts_for(list(range(len(images))), np.random.default_rng(0)))
        return real(model, tokenizer, images, texts_for, config, **kwargs) if train else [{"loss": 0.0}]

    monkeypatch.setattr(capsfusion, "train_clip", train_clip)
    return calls


def test_scaling_trains_each_arm_on_its_own_captions_with_vit_b_32(world, tmp_path, monkeypatch):
    """The docs' scaling command (open_clip ViT-B-32 from scratch, tiny width): fused = the fuser's --out-field,
    teacher = --fused-field, a reference arm; every arm on the same images."""
    serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-32")
    plain = [{"id": r["id"], "image": str(world / r["image"]), "caption": r["caption"], "alt_text": r["alt_text"],
              "synthetic_caption": r["synthetic_caption"], "fused": r["fused"], "capsfus": f"fuser: {r['synthetic_caption']}"}
             for r in read_manifest(world / "train.jsonl")]
    plain[3]["capsfus"] = ""  # dropped: every caption type must train on the same images
    write_manifest(tmp_path / "train.jsonl", plain[:24])
    write_manifest(tmp_path / "test.jsonl", plain[40:48])
    calls = recording_train_clip(monkeypatch)
    result = capsfusion.main(["--stage", "scaling", "--data", str(tmp_path / "train.jsonl"), "--scaling-data",
                              str(tmp_path / "test.jsonl"), "--out-field", "capsfus", "--sizes", "8", "16", "100",
                              "--clip-model", "ViT-B-32", "--clip-batch-size", "8", "--out", str(tmp_path / "out")])
    assert result["sizes"] == [8, 16]  # 100 > the 23 usable samples
    assert list(result["curves"]) == ["raw", "synthetic", "fused", "teacher", "raw+synthetic mix"]
    usable = plain[:3] + plain[4:24]
    expected = {kind: [capsfusion.clean(r[field]) for r in usable] for kind, field in
                (("raw", "alt_text"), ("synthetic", "synthetic_caption"), ("fused", "capsfus"), ("teacher", "fused"))}
    runs = [(kind, n) for kind in result["curves"] for n in result["sizes"]]
    assert len(calls) == len(runs)
    for (kind, n), texts in zip(runs, calls):
        if kind == "raw+synthetic mix":
            assert all(t in (r, s) for t, r, s in zip(texts, expected["raw"], expected["synthetic"]))
            assert set(texts) & set(expected["raw"]) and set(texts) & set(expected["synthetic"])
        else:
            assert texts == expected[kind][:n]
    for kind, curve in result["curves"].items():
        assert [point["steps"] for point in curve] == [1, 2] and all(np.isfinite(point["final_loss"]) for point in curve)
    assert json.loads((tmp_path / "out" / "scaling.json").read_text()) == result
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 0
    # fuse writes `fused` by default, the field the teacher's triplets also use: then there is no teacher arm
    assert list(capsfusion.caption_fields(capsfusion.Args(), plain)) == ["raw", "synthetic", "fused"]


def test_miniature_scales_the_fusers_captions_of_the_training_split(tmp_path, monkeypatch):
    """The paper scales CapsFus-LLaMA's output: the fused arm trains on the fuser's fusion, the teacher's is a reference."""
    calls = recording_train_clip(monkeypatch, train=False)  # which texts each arm gets; CLIP training is tested above
    results = capsfusion.main(["--world.n-train", "40", "--world.n-val", "2", "--world.n-test", "8", "--sizes", "16", "32",
                               "--clip-model", "micro-ViT-16", "--max-new-tokens", "6", "--out", str(tmp_path)])
    world = ensure_world(WorldConfig(n_train=40, n_val=2, n_test=8))
    train = read_manifest(world / "train.jsonl")[:32]
    fuser = read_manifest(tmp_path / "seed0" / "train.capsfus.jsonl")
    assert [r["id"] for r in fuser] == [r["id"] for r in train]
    curves = results["scaling"][0]["curves"]
    assert list(curves) == ["raw", "synthetic", "fused", "teacher", "raw+synthetic mix"]
    by_arm = dict(zip(curves, calls[1::2]))  # the 32-sample run of each arm (runs go arm by arm, size by size)
    assert by_arm["fused"] == [r["capsfus"] for r in fuser] != by_arm["teacher"]
    assert by_arm["teacher"] == [r["fused"] for r in train] and by_arm["raw"] == [r["alt_text"] for r in train]
    table = (tmp_path / "results.md").read_text()
    assert "| teacher |" in table and "| fuser |" in table


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
    assert set(curves) == {"raw", "synthetic", "fused", "teacher", "raw+synthetic mix"} and all(len(c) == 2 for c in curves.values())
    assert all(np.isfinite(point["final_loss"]) and point["steps"] == point["samples"] // 16
               for c in curves.values() for point in c)
    assert (tmp_path / "scaling.png").stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {kind} |" in table for kind in curves) and "| fuser |" in table
    assert json.loads((tmp_path / "results.json").read_text())["fusion"][0] == fusion
