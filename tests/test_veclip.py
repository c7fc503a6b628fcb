"""veclip.py: mixing per draw, fusion prompt truncation, answer parsing and refusal fallback, vec/fuse
with tiny random LLaVA-1.5 / Vicuna-1.1 stand-ins, retrieval over every reference and the template
ensemble against hand computations, evaluation on the model's device, the ViT-B/16 train and eval
commands, 2 torchrun gloo ranks against one process, resume, and the miniature main()."""

import dataclasses
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import veclip
from experiments.veclip_miniature import COLUMNS, chance_levels, conditions_figure
from common import clip_eval, clip_train
from common.clip_eval import (ImageRows, build_clip, encode_images, encode_texts, load_checkpoint, references,
                              retrieval_metrics, texts_of)
from common.clip_train import StepBatches, TrainConfig, create_clip
from common.columns import index_manifest
from common.data import BadSampleError, ManifestError, read_manifest, write_manifest, write_webdataset_shard
from common.degenerate import degenerate_reason
from common.generate import ResumableJSONLWriter, recipe_path
from common.miniature import WorldConfig, ensure_world, zero_shot_tasks
from realarch import run_torchrun, save_hf, serve_open_clip_tag

MICRO = "micro-ViT-16"
TINY_WORLD = WorldConfig(n_train=64, n_val=4, n_test=24)
TRAIN_FLAGS = ["train", "--model", MICRO, "--batch-size", "8", "--kernel", "torch", "--no-amp",
               "--alt-field", "alt_text", "--llm-vec-field", "fused", "--lr", "1e-3", "--warmup", "2"]
RETRIEVAL = [f"{way}_R@{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)]

# The prompts as they must reach the models, written out here rather than imported from veclip, so that a
# changed prompt fails a test. Step 1 (Sec. 3.2: "describe the image concisely, less than 20 words"), in
# llava-hf/llava-1.5-7b-hf's conversation format:
VEC_PROMPT_LLAVA = "USER: <image>\nDescribe the image concisely, less than 20 words. ASSISTANT:"
# Step 2 (Sec. 3.3: merge the alt-text's knowledge and the VeC's visual concepts; the wording is ours), in
# Vicuna-1.1's format (FastChat's `vicuna_v1.1` template: this system line, " USER: ", " ASSISTANT:")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
FUSION_INSTRUCTION = ("Rephrase the following two descriptions of the same image into one short, fluent sentence. "
                      "Description 1 is web alt-text: it may name people, places, brands or products, but it can be "
                      "noisy and ungrammatical. Description 2 describes what is visible in the image. Keep the names "
                      "and facts of description 1 that fit the image and the visual details of description 2; add "
                      "nothing that is in neither.\nDescription 1: {alt_text}\nDescription 2: {vec}\nNew sentence:")


def vicuna_fusion_prompt(alt_text: str, vec: str) -> str:
    return f"{VICUNA_SYSTEM} USER: {FUSION_INSTRUCTION.format(alt_text=alt_text, vec=vec)} ASSISTANT:"


def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, eos: int, **extra) -> list[int]:
    """Greedy decoding by hand: one unpadded sequence, no cache, argmax of the last position, stop at eos."""
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=input_ids, **extra).logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
            input_ids = torch.cat([input_ids, torch.tensor([[token]])], dim=1)
    return new


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_world(TINY_WORLD, tmp_path_factory.mktemp("world"))


# ---- mixing ----------------------------------------------------------------------------------


def global_batch(step: int, n: int, batch: int, seed: int = 0) -> np.ndarray:
    """Rows of global batch `step` (Deviation 6): epoch e = step // (n // batch) walks the permutation seeded
    (seed, e)."""
    epoch, position = divmod(step, n // batch)
    return np.random.default_rng([seed, epoch]).permutation(n)[position * batch:(position + 1) * batch]


def mix_rng(step: int, seed: int = 0) -> np.random.Generator:
    """The caption draws of step t: common.clip_train's stream of its own, seeded (seed, 1, t)."""
    return np.random.default_rng([seed, 1, step])


def test_mixing_draws_alt_text_with_probability_p_per_draw():
    p, steps, batch = 0.3, 400, 64
    draws = np.stack([veclip.draw_alt_text(mix_rng(step), batch, p) for step in range(steps)])  # (T, B)
    sigma = np.sqrt(p * (1 - p) / draws.size)
    assert abs(draws.mean() - p) < 4 * sigma
    # the same sample drawn at many steps gets both texts, at rate p: a draw, not a per-sample choice
    indices = np.stack([global_batch(step, 128, batch) for step in range(steps)])
    alt_for_sample_5 = draws[indices == 5]
    assert len(alt_for_sample_5) == steps * batch // 128  # drawn once an epoch
    assert abs(alt_for_sample_5.mean() - p) < 4 * np.sqrt(p * (1 - p) / len(alt_for_sample_5))
    assert veclip.draw_alt_text(mix_rng(3), batch, 1.0).all() and not veclip.draw_alt_text(mix_rng(3), batch, 0.0).any()
    texts = veclip.mixed_texts(["a1", "a0", "a1"], ["l1", "l0", "l1"], np.array([True, False, False]))
    assert texts == ["a1", "l0", "l1"]


# ---- fusion prompt and LLM answers -----------------------------------------------------------


def tiny_tokenizer(pad: bool = True):
    """A word-level stand-in for the Llama tokenizer of LLaVA-1.5 and Vicuna: <unk> 0, <s> 1, </s> 2 and a
    prepended <s> as Llama's; Vicuna's ships no pad token (pad=False), llava-hf's adds <pad>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
    words = sorted((set(" ".join([FUSION_INSTRUCTION, VICUNA_SYSTEM, VEC_PROMPT_LLAVA]).split())
                    | {"USER:", "ASSISTANT:", "red", "blue", "circle", "square", "grass", "Aldora", "stock", "photo"})
                   - set(special))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens(special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>" if pad else None, extra_special_tokens={"image_token": "<image>"})


def test_truncation_cuts_alt_text_from_its_end_and_keeps_vec_whole():
    """Sec. 3.3: a prompt over the budget loses the end of its alt-text, token by token; the VeC stays whole."""
    tokenizer = tiny_tokenizer(pad=False)  # Vicuna-1.1's: no chat template, a prepended <s>, one token a word
    vec = "a red circle on grass"
    words = ["Aldora", "stock", "photo"] * 50
    alt = " ".join(words)
    full = vicuna_fusion_prompt(alt, vec)
    length = lambda prompt: len(tokenizer(prompt)["input_ids"])  # noqa: E731 (<s> + one token a word)
    assert veclip.fusion_prompt(tokenizer, alt, vec, max_prompt_tokens=10_000) == (full, False)
    assert veclip.fusion_prompt(tokenizer, alt, vec, max_prompt_tokens=length(full)) == (full, False)  # fits exactly
    base = length(vicuna_fusion_prompt("", vec))
    for room in (149, 7, 1, 0):  # room for the first `room` words of the alt-text, no more
        assert veclip.fusion_prompt(tokenizer, alt, vec, max_prompt_tokens=base + room) == (
            vicuna_fusion_prompt(" ".join(words[:room]), vec), True), room
    # a budget below the VeC alone: the alt-text goes entirely, the VeC stays
    assert veclip.fusion_prompt(tokenizer, alt, vec, max_prompt_tokens=5) == (vicuna_fusion_prompt("", vec), True)


class RetokenisesLonger:
    """A tokenizer (one token a word, <s> first) whose decoding is not its inverse: the word 'AB' decodes as 'A B',
    two tokens when read again, as SentencePiece pieces can. Counts its calls."""

    chat_template = None

    def __init__(self):
        self.vocabulary, self.calls = ["<s>"], 0

    def __call__(self, text, add_special_tokens=True):
        self.calls += 1
        for word in text.split():
            if word not in self.vocabulary:
                self.vocabulary.append(word)
        return {"input_ids": [0] * add_special_tokens + [self.vocabulary.index(word) for word in text.split()]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.vocabulary[i].replace("AB", "A B") for i in ids if i or not skip_special_tokens)


def test_truncation_shrinks_until_the_decoded_cut_fits():
    """The cut alt-text is read again: when it re-tokenises longer than its tokens, the cut shrinks one token at a
    time to the longest that fits; the first try is the budget left by the prompt without the alt-text."""
    tokenizer, vec = RetokenisesLonger(), "red circle"
    base = len(tokenizer(vicuna_fusion_prompt("", vec))["input_ids"])
    for room, kept in ((6, 3), (7, 3), (8, 4), (1, 0)):  # k words of 'AB' take 2k tokens once decoded
        tokenizer.calls = 0
        prompt, cut = veclip.fusion_prompt(tokenizer, " ".join(["AB"] * 20), vec, max_prompt_tokens=base + room)
        assert (prompt, cut) == (vicuna_fusion_prompt(" ".join(["A B"] * kept), vec), True), room
        # the whole prompt, the alt-text, the prompt without it, then a try per length from `room` down to `kept`
        # (an empty cut is not measured)
        assert tokenizer.calls == 3 + (room - kept) + (kept > 0), room
    # no room even for the VeC: the alt-text goes without a try
    tokenizer.calls = 0
    assert veclip.fusion_prompt(tokenizer, "AB AB", vec, max_prompt_tokens=base - 1) == (vicuna_fusion_prompt("", vec),
                                                                                         True)
    assert tokenizer.calls == 3


def test_prompts_reach_the_vlm_and_the_llm_in_their_conversation_formats():
    from transformers import CLIPImageProcessor, LlavaProcessor

    # LLaVA-1.5: llava-hf's chat template, and the same format written out when a processor has none
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(), tokenizer=tiny_tokenizer(), patch_size=14,
                               image_token="<image>", chat_template=LLAVA_CHAT_TEMPLATE)
    assert veclip.vlm_prompt(processor) == VEC_PROMPT_LLAVA
    assert veclip.vlm_prompt(SimpleNamespace(image_token="<image>")) == VEC_PROMPT_LLAVA
    assert veclip.vlm_prompt(SimpleNamespace()) == VEC_PROMPT_LLAVA
    assert veclip.vlm_prompt(SimpleNamespace(image_token="<img>")) == VEC_PROMPT_LLAVA.replace("<image>", "<img>")

    class ShowsItsInput:  # a processor whose template prints what it was given
        chat_template = "shown"

        def apply_chat_template(self, conversation, add_generation_prompt=False):
            return repr((conversation, add_generation_prompt))

    image_then_text = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe the image concisely, less than 20 words."}]}]
    assert veclip.vlm_prompt(ShowsItsInput()) == repr((image_then_text, True))
    # Vicuna-1.1 ships no template: its format, and the tokenizer's <s> counted once
    tokenizer = tiny_tokenizer(pad=False)
    assert veclip.llm_prompt(tokenizer, "Say hi.") == f"{VICUNA_SYSTEM} USER: Say hi. ASSISTANT:"
    assert veclip.prompt_length(tokenizer, "red blue") == 3  # <s> red blue
    # a tokenizer with a template: the template's text (its own <s>), no second <s> when counting
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} [assistant]{% endif %}")
    assert veclip.llm_prompt(tokenizer, "Say hi.") == "<s>[user] Say hi. [assistant]"
    assert veclip.prompt_length(tokenizer, "<s> red blue") == 3


def test_llm_answer_gives_its_caption_line_and_refusals_are_matched_at_the_start():
    vec, alt = "a red circle on grass", "Aldora stock photo"
    caption = "The Aldora red circle on grass."
    # chat preambles, hand-written in Vicuna's manner: the caption is what follows them
    for answer in ["Sure! Here is the new sentence:\n\nThe Aldora red circle on grass.",
                   'Sure, here\'s the rephrased sentence: "The Aldora red circle on grass."',
                   "Certainly.\nThe Aldora red circle on grass.",
                   "New sentence: The Aldora red circle on grass.\nIt keeps the name of description 1.",
                   '"The Aldora red circle on grass."\nmore']:
        assert veclip.llm_vec_or_fallback(answer, vec, alt) == (caption, False), answer
    # a preamble cut off by the token cap holds no caption: VeC
    assert veclip.llm_vec_or_fallback("Sure! Here is the new sentence:", vec, alt) == (vec, True)
    # refusals begin the answer; the same words inside a caption are the caption's
    for answer in ["I'm sorry, but I cannot help with that.", "As an AI language model, I ...", '"Sorry, I cannot."',
                   "I cannot write a new sentence: the descriptions disagree.", "   \n"]:
        assert veclip.llm_vec_or_fallback(answer, vec, alt) == (vec, True), answer
    for answer in ["A sign that reads I cannot swim, by the Aldora lake.", "Okay hand sign by the Aldora lake.",
                   "X-ray of an Aldora red circle, by MAX"]:
        assert veclip.llm_vec_or_fallback(answer, vec, alt) == (answer, False), answer
    assert veclip.llm_vec_or_fallback("", "", alt) == (alt, True)


# ---- vec and fuse with tiny LLaVA-1.5 and Vicuna-1.1 stand-ins --------------------------------

# llava-hf/llava-1.5-7b-hf's template: "USER: <image>\n{text} ASSISTANT:"
LLAVA_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}"
                       "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
                       "{{ '<image>\n' }}"
                       "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
                       "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
                       "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
TEMPLATE_WITH_BOS = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
                     "{% if add_generation_prompt %} [assistant]{% endif %}")
TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The `vec` and `fuse` commands' default models at tiny width, random weights: LLaVA-1.5-7B's and
    Vicuna-1.1-13B's classes and structural settings (from their config.json), saved in fp16 as they ship."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    root = tmp_path_factory.mktemp("models")
    tokenizer, llm_tokenizer = tiny_tokenizer(), tiny_tokenizer(pad=False)
    torch.manual_seed(0)
    # LLaVA-1.5: CLIP ViT-L/14-336 (patch 14, 336 px, quick_gelu) -> gelu MLP projector -> Llama (rms eps 1e-5)
    vision = CLIPVisionConfig(**TINY, image_size=336, patch_size=14, projection_dim=16, hidden_act="quick_gelu")
    text = LlamaConfig(**TINY, vocab_size=len(tokenizer), num_key_value_heads=2, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=4)
    llava = LlavaConfig(vision_config=vision, text_config=text, image_token_index=3, pad_token_id=4,
                        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
                        image_seq_length=576, tie_word_embeddings=False)
    save_hf(LlavaForConditionalGeneration(llava), root / "vlm")
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                                      crop_size={"height": 336, "width": 336}),
                   tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE).save_pretrained(root / "vlm")
    # Vicuna-1.1: Llama, rms eps 1e-6, 2048 positions, untied head, no chat template, no pad token
    vicuna = LlamaConfig(**TINY, vocab_size=len(llm_tokenizer), num_key_value_heads=2, max_position_embeddings=2048,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llm = LlamaForCausalLM(vicuna)
    save_hf(llm, root / "llm")
    llm_tokenizer.save_pretrained(root / "llm")
    # the same weights with a generation config that samples, as some chat checkpoints ship one (Llama-2-chat:
    # do_sample, temperature 0.6, top_p 0.9): the stages decode greedily all the same
    plain = llm.generation_config
    llm.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True,
                                             temperature=0.6, top_p=0.9)
    save_hf(llm, root / "sampling_llm")
    llm_tokenizer.save_pretrained(root / "sampling_llm")
    llm.generation_config = plain
    # the same weights behind a tokenizer with a chat template that writes its own <s>
    save_hf(llm, root / "templated_llm")
    templated = tiny_tokenizer(pad=False)
    templated.chat_template = TEMPLATE_WITH_BOS
    templated.save_pretrained(root / "templated_llm")
    with torch.no_grad():  # all logits equal: greedy picks <unk>, which decodes to an empty answer
        llm.lm_head.weight.zero_()
    save_hf(llm, root / "mute_llm")
    llm_tokenizer.save_pretrained(root / "mute_llm")
    return root


def test_vec_and_fuse_write_resumable_manifests(world, tiny_models, tmp_path, monkeypatch):
    loaded_dtypes, real_generate = [], veclip.generate_texts
    monkeypatch.setattr(veclip, "generate_texts",
                        lambda model, *a, **k: loaded_dtypes.append(model.dtype) or real_generate(model, *a, **k))
    records = read_manifest(world / "val.jsonl")  # 4 samples
    vec_out = tmp_path / "out" / "vec.jsonl"
    # a killed run left one finished sample and half a line
    with ResumableJSONLWriter(vec_out) as writer:
        moved = os.path.relpath(world / records[0]["image"], vec_out.parent)
        writer.write({**{k: v for k, v in records[0].items() if k != "_root"}, "image": moved, "vec": "a red circle"})
    with open(vec_out, "ab") as handle:
        handle.write(b'{"id": "val-0000')
    vec_argv = ["vec", "--data", str(world / "val.jsonl"), "--out", str(vec_out), "--vlm", str(tiny_models / "vlm"),
                "--gen-batch-size", "2", "--max-new-tokens", "4", "--device", "cpu"]
    recipe = {"data": str(world / "val.jsonl"), "vlm": str(tiny_models / "vlm"), "vec_field": "vec",
              "max_new_tokens": 4, "gen_dtype": "float32"}  # what the killed run wrote beside its output (the
    # dtype its weights ran in: float32 on the CPU, whatever --gen-dtype says)
    with pytest.raises(ManifestError, match="without vec.jsonl.recipe.json"):  # settings unknown: not resumed
        veclip.main(vec_argv)
    recipe_path(world / "val.jsonl", vec_out).write_text(json.dumps(recipe))
    # another field would pass the old samples off as its own
    with pytest.raises(ManifestError, match="--vec-field .vec. there, .vec2. now"):
        veclip.main([*vec_argv, "--vec-field", "vec2"])
    counts = veclip.main(vec_argv)
    assert counts["already_done"] == 1 and counts["written"] == 3
    vec_records = read_manifest(vec_out)
    assert [r["id"] for r in vec_records] == [r["id"] for r in records]
    assert vec_records[0]["vec"] == "a red circle"  # the finished sample is kept, not generated again
    assert all((vec_out.parent / r["image"]).exists() for r in vec_records)  # images re-rooted
    # fuse, long alt-texts truncated to a small budget; a second call has nothing left to do
    fused_out = tmp_path / "fused.jsonl"
    tokenizer = tiny_tokenizer(pad=False)
    length = lambda prompt: len(tokenizer(prompt)["input_ids"])  # noqa: E731
    budget = 1 + max(length(vicuna_fusion_prompt("", r["vec"])) for r in vec_records)
    too_long = sum(length(vicuna_fusion_prompt(r["alt_text"], r["vec"])) > budget for r in vec_records)
    argv = ["fuse", "--data", str(vec_out), "--out", str(fused_out), "--llm", str(tiny_models / "llm"),
            "--max-new-tokens", "3", "--max-prompt-tokens", str(budget), "--device", "cpu"]
    counts = veclip.main(argv)
    assert counts["written"] == 4 and counts["alt_text_truncated"] == too_long >= 1
    assert counts["refusal_fallbacks"] == 0  # this LLM answers (the mute one below does not)
    assert [r["id"] for r in read_manifest(fused_out)] == [r["id"] for r in records]
    assert veclip.main(argv) == {"already_done": 4}
    with pytest.raises(ManifestError, match="--llm-vec-field .llm_vec. there, .llm_vec2. now"):
        veclip.main([*argv, "--llm-vec-field", "llm_vec2"])
    # an LLM that answers nothing: every LLM-VeC falls back to the VeC, counted; with no VeC either, the alt-text
    mute_in, mute_out = tmp_path / "mute_in.jsonl", tmp_path / "mute.jsonl"
    vec_records[1] = {**vec_records[1], "image": str(vec_out.parent / vec_records[1]["image"]), "vec": ""}
    write_manifest(mute_in, [{**r, "image": str(vec_out.parent / r["image"])} if i != 1 else r
                             for i, r in enumerate(vec_records)])
    counts = veclip.main(argv[:2] + [str(mute_in), "--out", str(mute_out), "--llm", str(tiny_models / "mute_llm"),
                                     "--max-new-tokens", "3", "--device", "cpu"])
    assert counts["refusal_fallbacks"] == 4
    assert [(r["llm_vec"], r["llm_vec_fallback"]) for r in read_manifest(mute_out)] == [
        (r["vec"] or r["alt_text"], True) for r in vec_records]
    # the fp16 checkpoints ran in the dtype asked for (float32 on the CPU), not the one they ship in
    assert set(loaded_dtypes) == {torch.float32}


def capture_generate(monkeypatch) -> list:
    """Record the inputs (ids, mask, pixels) of every generate() call of a stage."""
    calls, real_generate = [], veclip.generate_texts

    def recording(model, tokenizer, inputs, max_new_tokens, **options):
        calls.append({key: value.clone() for key, value in inputs.items()})
        return real_generate(model, tokenizer, inputs, max_new_tokens, **options)

    monkeypatch.setattr(veclip, "generate_texts", recording)
    return calls


def test_vec_stage_asks_llava_the_vec_prompt_and_decodes_greedily(world, tiny_models, tmp_path, monkeypatch):
    """Step 1 against an independent run: each image with the written-out prompt, decoded greedily one at a time."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    calls = capture_generate(monkeypatch)
    records, out = read_manifest(world / "val.jsonl"), tmp_path / "vec.jsonl"
    broken = {"id": "broken", "image": str(tmp_path / "missing.png"), "alt_text": "gone"}  # counted and left out
    write_manifest(tmp_path / "in.jsonl", [{**r, "image": str(world / r["image"])} for r in records[:2]] + [broken]
                   + [{**r, "image": str(world / r["image"])} for r in records[2:]])
    counts = veclip.main(["vec", "--data", str(tmp_path / "in.jsonl"), "--out", str(out), "--vlm",
                          str(tiny_models / "vlm"), "--gen-batch-size", "5", "--max-new-tokens", "4",
                          "--device", "cpu"])
    assert len(calls) == 1  # the 4 readable images in one batch
    processor = AutoProcessor.from_pretrained(tiny_models / "vlm")
    model = LlavaForConditionalGeneration.from_pretrained(tiny_models / "vlm", dtype=torch.float32).eval()
    expected = []
    for row, record in enumerate(records):
        one = processor(images=[Image.open(world / record["image"]).convert("RGB")], text=[VEC_PROMPT_LLAVA],
                        return_tensors="pt")
        assert torch.equal(calls[0]["input_ids"][row], one["input_ids"][0])  # same length: no padding
        assert torch.equal(calls[0]["pixel_values"][row], one["pixel_values"][0])
        new = greedy(model, one["input_ids"], 4, model.config.text_config.eos_token_id,
                     pixel_values=one["pixel_values"])
        expected.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    assert [r["vec"] for r in read_manifest(out)] == expected
    assert any(expected)  # the comparison is between captions, not empty strings
    degenerate = [degenerate_reason(vec) for vec in expected]  # a random tiny VLM's VeCs: flagged, still written
    assert [r["vec_degenerate"] for r in read_manifest(out)] == degenerate
    assert counts == {"already_done": 0, "unreadable_images": 1, "empty_vec": sum(not vec for vec in expected),
                      "degenerate_vec": sum(reason is not None for reason in degenerate), "written": 4}


def test_fuse_stage_asks_vicuna_the_left_padded_fusion_prompt_and_decodes_greedily(world, tiny_models, tmp_path,
                                                                                   monkeypatch):
    """Step 2 against an independent run: the written-out Vicuna-1.1 prompt per sample (the alt-text cut from its
    end to the budget, the VeC whole), left-padded in the batch, decoded greedily one at a time, then parsed.
    The checkpoint's generation config samples: the stage must ask for greedy decoding itself."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "llm")
    alts = ["Aldora stock photo", "", " ".join(["Aldora", "stock", "photo"] * 10), "red square"]
    vecs = ["blue circle on grass", "red square", "blue", "grass"]
    records = [{**record, "image": str(world / record["image"]), "alt_text": alt, "vec": vec}
               for record, alt, vec in zip(read_manifest(world / "val.jsonl"), alts, vecs)]
    write_manifest(tmp_path / "vec.jsonl", records)
    length = lambda prompt: len(tokenizer(prompt)["input_ids"])  # noqa: E731 (<s> + one token a word)
    budget = length(vicuna_fusion_prompt("", "")) + 10  # every prompt fits but the third's (30 + 1 words)
    prompts = [vicuna_fusion_prompt(alt, vec) for alt, vec in zip(alts, vecs)]
    prompts[2] = vicuna_fusion_prompt(" ".join(alts[2].split()[:9]), vecs[2])  # 10 words of room, 1 for the VeC
    calls = capture_generate(monkeypatch)
    counts = veclip.main(["fuse", "--data", str(tmp_path / "vec.jsonl"), "--out", str(tmp_path / "fused.jsonl"),
                          "--llm", str(tiny_models / "sampling_llm"), "--gen-batch-size", "4", "--max-new-tokens", "5",
                          "--max-prompt-tokens", str(budget), "--device", "cpu"])
    assert len(calls) == 1 and counts["alt_text_truncated"] == 1
    ids, mask = calls[0]["input_ids"], calls[0]["attention_mask"]
    model = LlamaForCausalLM.from_pretrained(tiny_models / "llm", dtype=torch.float32).eval()
    expected = []
    for row, (prompt, alt, vec) in enumerate(zip(prompts, alts, vecs)):
        one = tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, n): <s> first
        pad = ids.shape[1] - one.shape[1]
        # left padding, with Vicuna's missing pad token set to </s>: [</s>]*pad + prompt, masked
        assert mask[row].tolist() == [0] * pad + [1] * one.shape[1]
        assert ids[row].tolist() == [tokenizer.eos_token_id] * pad + one[0].tolist()
        answer = tokenizer.decode(greedy(model, one, 5, tokenizer.eos_token_id), skip_special_tokens=True).strip()
        expected.append(veclip.llm_vec_or_fallback(answer, vec, alt))  # parsing: pinned by hand-written answers
    assert len(set(mask.sum(1).tolist())) == 4  # four prompt lengths: the padding side matters
    fused = read_manifest(tmp_path / "fused.jsonl")
    assert [(r["llm_vec"], r["llm_vec_fallback"]) for r in fused] == expected
    assert counts["refusal_fallbacks"] == sum(fell_back for _, fell_back in expected)
    # a tokenizer with a chat template: the template's text, whose own <s> is the only one
    write_manifest(tmp_path / "one.jsonl", records[:1])
    veclip.main(["fuse", "--data", str(tmp_path / "one.jsonl"), "--out", str(tmp_path / "templated.jsonl"),
                 "--llm", str(tiny_models / "templated_llm"), "--max-new-tokens", "1", "--device", "cpu"])
    text = "<s>[user] " + FUSION_INSTRUCTION.format(alt_text=alts[0], vec=vecs[0]) + " [assistant]"
    assert calls[-1]["input_ids"][0].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert calls[-1]["input_ids"][0].tolist().count(tokenizer.bos_token_id) == 1


def fake_generate(monkeypatch, answers: dict) -> None:
    """The stage's model call replaced: row i of a batch answers answers[i] (else a usable caption); the models
    still load, the prompts are still built and tokenised."""
    def answer(model, tokenizer, inputs, max_new_tokens, **options):
        rows = range(len(inputs["input_ids"]))
        return [answers.get(row, f"a blue circle on green grass number {row}") for row in rows]

    monkeypatch.setattr(veclip, "generate_texts", answer)


@pytest.mark.parametrize("stage", ["vec", "fuse"])
def test_a_degenerate_caption_is_written_flagged_and_counted(stage, world, tiny_models, tmp_path, monkeypatch, caplog):
    """CoCa's "a 2 2 2 2 2" failure from the VLM (vec) or the LLM (fuse): the sample is still written, with
    `"<field>_degenerate": reason`; the others carry None; the count is in the stage's counts and in one warning
    line. fuse keeps the VeC's own flag beside its LLM-VeC's."""
    records = [{**r, "image": str(world / r["image"]), "vec": "a red circle", "vec_degenerate": None}
               for r in read_manifest(world / "val.jsonl")]
    write_manifest(tmp_path / "in.jsonl", records)
    fake_generate(monkeypatch, {1: "a 2 2 2 2 2"})
    model = ["--vlm", str(tiny_models / "vlm")] if stage == "vec" else ["--llm", str(tiny_models / "llm")]
    out = tmp_path / "out.jsonl"
    with caplog.at_level("WARNING", logger="veclip"):
        counts = veclip.main([stage, "--data", str(tmp_path / "in.jsonl"), "--out", str(out), *model,
                              "--gen-batch-size", "4", "--max-new-tokens", "4", "--device", "cpu"])
    field, key = ("vec", "degenerate_vec") if stage == "vec" else ("llm_vec", "degenerate_llm_vec")
    written = read_manifest(out)
    assert [r["id"] for r in written] == [r["id"] for r in records]  # flagged, not dropped
    flag = f"{field}_degenerate"
    assert written[1][field] == "a 2 2 2 2 2" and written[1][flag] == degenerate_reason("a 2 2 2 2 2")
    assert written[1][flag].startswith("repeated token: '2'")
    assert [r[flag] for i, r in enumerate(written) if i != 1] == [None] * 3
    vec_flags = [r["vec_degenerate"] for i, r in enumerate(written) if i != 1 or stage == "fuse"]
    assert vec_flags == [None] * (3 + (stage == "fuse"))
    assert counts[key] == 1 and counts["written"] == 4
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "degenerate" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"{stage}: 1 of 4 ") and "'val-000001'" in lines[0], lines


def test_vec_and_fuse_stream_shards_into_shards_with_the_manifests_captions(world, tiny_models, tmp_path):
    """--data shards/{000..001}.tar: vec writes one output shard per input shard, named as it (the PNG bytes as they
    were, the VeC added to each json); fuse reads those and writes its own. The captions are the manifest runs'."""
    pytest.importorskip("webdataset")
    import tarfile

    records = read_manifest(world / "val.jsonl")
    samples = [{**{k: v for k, v in r.items() if k not in ("_root", "image")},
                "image": Image.open(world / r["image"]).convert("RGB")} for r in records]
    for s in range(2):
        write_webdataset_shard(tmp_path / "in" / f"{s:03d}.tar", samples[2 * s:2 * s + 2])
    flags = ["--gen-batch-size", "2", "--max-new-tokens", "4", "--device", "cpu"]
    vec, fuse = ["vec", "--vlm", str(tiny_models / "vlm"), *flags], ["fuse", "--llm", str(tiny_models / "llm"), *flags]
    veclip.main(vec + ["--data", str(world / "val.jsonl"), "--out", str(tmp_path / "vec.jsonl")])
    veclip.main(fuse + ["--data", str(tmp_path / "vec.jsonl"), "--out", str(tmp_path / "fused.jsonl")])
    shards = str(tmp_path / "in" / "{000..001}.tar")
    counts = veclip.main(vec + ["--data", shards, "--out", str(tmp_path / "vec_shards")])
    assert (counts["shards_written"], counts["written"], counts.get("left_out")) == (2, 4, None)
    fuse_shards = fuse + ["--data", str(tmp_path / "vec_shards" / "{000..001}.tar"), "--out", str(tmp_path / "fused")]
    assert veclip.main(fuse_shards)["shards_written"] == 2
    expected = {r["id"]: r for r in read_manifest(tmp_path / "fused.jsonl")}
    assert any(r["vec"] for r in expected.values())  # captions are compared, not empty strings
    for s in range(2):
        with tarfile.open(tmp_path / "in" / f"{s:03d}.tar") as before, \
                tarfile.open(tmp_path / "fused" / f"{s:03d}.tar") as after:
            assert before.getnames() == after.getnames()
            for name in before.getnames():
                old, new = before.extractfile(name).read(), after.extractfile(name).read()
                if name.endswith(".png"):
                    assert new == old
                else:
                    meta, manifest = json.loads(new), expected[json.loads(old)["id"]]
                    kept = ("vec", "vec_degenerate", "llm_vec", "llm_vec_fallback", "llm_vec_degenerate")
                    assert meta == {**json.loads(old), **{k: manifest[k] for k in kept}}
    assert veclip.main(fuse_shards) == {"shards_already_done": 2}


def test_missing_weights_name_the_flag(world, tiny_models, tmp_path):
    with_vec = write_manifest(tmp_path / "vec.jsonl",
                              [{**r, "vec": "a cat"} for r in read_manifest(world / "val.jsonl")])
    with pytest.raises(RuntimeError, match="--llm"):
        veclip.main(["fuse", "--data", str(with_vec), "--out", str(tmp_path / "x.jsonl"),
                     "--llm", str(tmp_path / "no-such-model"), "--device", "cpu"])
    with pytest.raises(RuntimeError, match="--vlm"):
        veclip.main(["vec", "--data", str(world / "val.jsonl"), "--out", str(tmp_path / "x.jsonl"),
                     "--vlm", str(tmp_path / "no-such-model"), "--device", "cpu"])
    # fuse before vec: the sample and the missing field are named, before the LLM loads
    with pytest.raises(BadSampleError, match="^sample 'val-000000': no 'vec' field; run the vec stage first$"):
        veclip.main(["fuse", "--data", str(world / "val.jsonl"), "--out", str(tmp_path / "y.jsonl"),
                     "--llm", str(tiny_models / "llm"), "--device", "cpu"])


# ---- evaluation: every reference, the template ensemble, the model's device -------------------


class TableCLIP(torch.nn.Module):
    """A CLIP whose embeddings are rows of fixed tables: an image's pixels hold its row, a text's token its row."""

    def __init__(self, img_rows, txt_rows):
        super().__init__()
        self.img = torch.nn.Parameter(torch.tensor(img_rows))
        self.txt = torch.nn.Parameter(torch.tensor(txt_rows))

    def encode_image(self, pixels):
        return self.img[pixels[:, 0, 0, 0].long()]

    def encode_text(self, tokens):
        return self.txt[tokens[:, 0]]


def test_retrieval_scores_every_reference_and_zero_shot_ensembles_templates():
    # image 0 = (1, 0) has references a, b; image 1 = (0, 1) has c, d. cos(image, text) = the text's row:
    #   a (.6, .8)  b (1, 0)  c (.8, .6)  d (-1, 0)
    # I->T R@1: image 0's top text is b, its own -> hit; image 1's top is a (.8), not its own -> miss: 50.
    # T->I R@1: a -> image 1 (miss), b -> image 0 (hit), c -> image 0 (miss), d -> image 1 (0 > -1, hit): 50.
    # (With the first reference only, a and c: every query misses, 0 and 0.)
    # Zero-shot, templates "a {}" and "the {}": cat = mean(a cat (.6, .8), the cat (1, 0)) ~ (.89, .45), dog =
    # mean(a dog (.8, .6), the dog (0, 1)) ~ (.45, .89): image 0 -> cat, image 1 -> dog, 100. One template
    # ("a {}") would give 0.
    vocabulary = ["a", "b", "c", "d", "a cat", "the cat", "a dog", "the dog"]
    model = TableCLIP([[1.0, 0.0], [0.0, 1.0]],
                      [[.6, .8], [1, 0], [.8, .6], [-1, 0], [.6, .8], [1, 0], [.8, .6], [0, 1]])
    tokenizer = lambda texts: torch.tensor([[vocabulary.index(text)] for text in texts])  # noqa: E731
    records = [{"id": "0", "refs": ["a", "b"], "label": "cat"}, {"id": "1", "refs": ["c", "d"], "label": "dog"}]
    images = torch.arange(2.0).view(2, 1, 1, 1)
    args = veclip.Args(class_field="label", templates=("a {}", "the {}"))
    metrics = veclip.evaluate(model, tokenizer, None, records, args, images=images)
    assert (metrics["i2t_R@1"], metrics["t2i_R@1"], metrics["zeroshot_top1"]) == (50.0, 50.0, 100.0)
    # a string field is one reference per image
    metrics = veclip.evaluate(model, tokenizer, None, [{"id": "0", "refs": "b"}, {"id": "1", "refs": "d"}],
                              veclip.Args(), images=images)
    assert (metrics["i2t_R@1"], metrics["t2i_R@1"]) == (100.0, 100.0)
    no_reference = "^evaluation sample '0': no reference caption in field 'refs'; pass --text-field"
    with pytest.raises(ValueError, match=no_reference):
        veclip.evaluate(model, tokenizer, None, [{"id": "0", "caption": "a"}], args, images=images[:1])


def test_evaluation_encodes_on_the_models_device(world, tmp_path, monkeypatch):
    """On CUDA, `python veclip.py` failed at its first evaluation: it encoded on 'cpu' while the model sat on
    cuda. With no GPU here the model sits on 'meta', and every encoding must be asked for the model's device."""
    model, preprocess, tokenizer = create_clip(MICRO)
    model.to("meta")
    asked = []

    def encode(model, inputs, *rest, device="cpu", **_):
        asked.append(torch.device(device))
        return F.normalize(torch.randn(len(rest[0]) if rest else len(inputs), 32), dim=-1)

    def zero_shot(*args, **_):
        asked.append(torch.device(args[-1]))
        return 0.0

    monkeypatch.setattr(clip_eval, "encode_images", encode)
    monkeypatch.setattr(clip_eval, "encode_texts", encode)
    monkeypatch.setattr(clip_eval, "zero_shot_accuracy", zero_shot)
    plain = [{"id": r["id"], "image": str(world / r["image"]), "caption": r["caption"], "refs": r["refs"],
              "label": r["background"]} for r in read_manifest(world / "test.jsonl")]
    veclip.evaluate(model, tokenizer, preprocess, plain, veclip.Args(class_field="label"))  # eval, train --eval-data
    assert len(asked) == 3 and set(asked) == {torch.device("meta")}
    # the default run, each condition's model where train() leaves it
    monkeypatch.setattr(veclip, "train", lambda *_: (model, preprocess, tokenizer, {"history": [{"loss": 1.0}],
                                                                                    "train_seconds": 0.0}))
    veclip.main(["miniature", "--world.n-train", "64", "--world.n-val", "4", "--world.n-test", "24",
                 "--model", MICRO, "--batch-size", "16", "--out", str(tmp_path)])
    # per condition: the images, the references, and each of the world's zero-shot tasks that has images
    tasks = sum(bool(spec["indices"]) for spec in zero_shot_tasks(read_manifest(world / "test.jsonl")).values())
    assert len(asked) == 3 + 4 * (2 + tasks) and set(asked) == {torch.device("meta")}


# ---- train and eval: ViT-B/16 and a pretrained tag at tiny width -------------------------------


def test_train_and_eval_commands_run_vit_b_16(world, tmp_path, monkeypatch):
    """The header's `train --model ViT-B-16 ... --eval-data` and `eval --checkpoint` commands."""
    serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-16")  # widths shrunk; 224 px, patch 16, context 77 kept
    out, test = tmp_path / "veclip_b16", str(world / "test.jsonl")
    train_log = veclip.main(["train", "--data", str(world / "train.jsonl"), "--out", str(out),
                             "--model", "ViT-B-16", "--batch-size", "4", "--steps", "2", "--lr", "5e-4",
                             "--weight-decay", "0.2", "--warmup", "1", "--checkpoint-every", "1", "--workers", "1",
                             "--eval-data", test, "--llm-vec-field", "fused", "--kernel", "torch", "--device", "cpu"])
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["state_dict"]["visual.positional_embedding"].shape == (14 * 14 + 1, 64)
    metrics = veclip.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--eval-data", test,
                           "--out", str(tmp_path / "eval")])
    assert metrics == train_log["eval"]  # the checkpoint rebuilds the model that was evaluated after training
    # the world has 5 references per image: retrieval against every reference, an image hit by any of its own
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16")
    model.load_state_dict(state["state_dict"])
    records, tokenizer = read_manifest(test), open_clip.get_tokenizer("ViT-B-16")
    owners = [i for i, r in enumerate(records) for _ in r["refs"]]
    every_reference = retrieval_metrics(encode_images(model.eval(), ImageRows(records, preprocess)),
                                        encode_texts(model, tokenizer, [ref for r in records for ref in r["refs"]]),
                                        owners)
    assert {k: metrics[k] for k in RETRIEVAL} == pytest.approx({k: every_reference[k] for k in RETRIEVAL}, abs=1e-4)


def test_pretrained_tag_runs_with_the_tags_settings(world, tmp_path, monkeypatch):
    """`eval --model ViT-B-16 --pretrained openai` and a run started from that tag: OpenAI's QuickGELU."""
    _, reference = serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-16", "openai")
    model, preprocess, tokenizer = build_clip("ViT-B-16", "openai")
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(pixels), reference.encode_image(pixels), atol=1e-5)
    records, test = read_manifest(world / "test.jsonl"), str(world / "test.jsonl")
    expected = veclip.evaluate(reference, tokenizer, preprocess, records, veclip.Args())
    tag = ["--model", "ViT-B-16", "--pretrained", "openai", "--eval-data", test, "--device", "cpu"]
    assert veclip.main(["eval", *tag, "--out", str(tmp_path / "eval")]) == expected
    # one step from the tag: its checkpoint is evaluated as the QuickGELU model it was trained as
    veclip.main(["train", *tag, "--data", str(world / "train.jsonl"), "--out", str(tmp_path / "ft"),
                 "--batch-size", "4", "--steps", "1", "--warmup", "1", "--llm-vec-field", "fused", "--kernel", "torch"])
    model, _, _, _ = load_checkpoint(tmp_path / "ft" / "checkpoint.pt")
    reference.load_state_dict(torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(pixels), reference.encode_image(pixels), atol=1e-5)


# ---- training: torchrun equals one process; resume ---------------------------------------------


def marked_records(world) -> list[dict]:
    """The world's training samples with texts that name their sample: alt-text 'alt i', LLM-VeC 'llm i'."""
    return [{**record, "image": str(world / record["image"]), "alt_text": f"alt {i}", "fused": f"llm {i}"}
            for i, record in enumerate(read_manifest(world / "train.jsonl"))]


def expected_batch(step: int, n: int, batch: int, p_alt: float, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Global batch `step` recomputed by hand (Deviation 6 and step 3): epoch e = step // (n // batch) walks the
    permutation seeded (seed, e); draw b uses the alt-text iff u_b < p_alt, u ~ U(0, 1) from the stream
    seeded (seed, 1, step), fresh at every draw."""
    indices = global_batch(step, n, batch, seed)
    use_alt = mix_rng(step, seed).random(batch) < p_alt
    return indices, [f"alt {i}" if alt else f"llm {i}" for i, alt in zip(indices, use_alt)]


def test_training_tokenises_the_per_draw_mix_and_steps_on_the_clip_loss(world, tmp_path, monkeypatch):
    """Step 3 as run: the texts the trainer tokenises are the AltText/LLM-VeC draws recomputed by hand with the
    default p_alt (0.5); the first loss is (CE(s X Y^T) + CE(s Y X^T)) / 2 by hand; the logit scale is clamped
    at 100 after each step; the learning rate warms up linearly and decays by a cosine."""
    records = marked_records(world)
    write_manifest(tmp_path / "train.jsonl", records)
    tokenised, real_build = [], veclip.build_clip

    def build_clip(name, pretrained=None, seed=0):
        model, preprocess, tokenizer = real_build(name, pretrained, seed)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1000.0))  # above the clamp
        return model, preprocess, lambda texts: tokenised.append(list(texts)) or tokenizer(texts)

    monkeypatch.setattr(veclip, "build_clip", build_clip)
    steps, batch, lr, warmup = 10, 8, 1e-3, 2  # 8 steps an epoch: the last two start epoch 1
    result = veclip.main(TRAIN_FLAGS + ["--data", str(tmp_path / "train.jsonl"), "--steps", str(steps),
                                        "--weight-decay", "0.2", "--out", str(tmp_path / "run"), "--device", "cpu"])
    expected = [expected_batch(step, len(records), batch, p_alt=0.5) for step in range(steps)]
    assert tokenised == [texts for _, texts in expected]
    # the first step's loss by hand, at the initial weights and logit scale 1000
    model, preprocess, tokenizer = create_clip(MICRO, seed=0)
    indices, texts = expected[0]
    pixels = torch.stack([preprocess(Image.open(records[i]["image"]).convert("RGB")) for i in indices])
    with torch.no_grad():
        image_emb = model.encode_image(pixels, normalize=True)
        logits = 1000.0 * image_emb @ model.encode_text(tokenizer(texts), normalize=True).T
    labels = torch.arange(batch)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    history = result["history"]
    assert history[0]["loss"] == pytest.approx(loss.item(), rel=1e-4)
    # open_clip's clamp after each step: 1000 comes down to 100 at once (an unclamped step would leave ~999.5)
    assert history[0]["logit_scale"] == pytest.approx(100.0) and max(h["logit_scale"] for h in history) < 100.001
    cosine = [lr * (t + 1) / warmup if t < warmup
              else 0.5 * lr * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup))) for t in range(steps)]
    assert [h["lr"] for h in history] == pytest.approx(cosine)
    groups = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]  # --weight-decay on matrices, none elsewhere


def test_each_rank_serves_its_slice_and_an_unreadable_image_brings_its_neighbours_text(world, tmp_path):
    records = marked_records(world)
    write_manifest(tmp_path / "train.jsonl", records)
    columns = index_manifest(tmp_path / "train.jsonl")
    texts_for = veclip.MixedTexts(columns, "alt_text", "fused", 0.5)
    schedule = TrainConfig(batch_size=8, steps=12)
    cache = torch.arange(64.0).view(64, 1, 1, 1)  # the pixels of sample i are the number i
    tokenizer = lambda texts: torch.tensor([[int(t.split()[1]), t.startswith("alt")] for t in texts])  # noqa: E731
    rows, step = np.arange(64), 9  # epoch 1
    indices, texts = expected_batch(step, len(records), 8, p_alt=0.5)
    pixels, tokens, substituted = StepBatches(cache, rows, texts_for, tokenizer, schedule, None, 0, 1)[step]
    assert pixels.flatten().long().tolist() == indices.tolist() and torch.equal(tokens[0], tokenizer(texts))
    halves = [StepBatches(cache, rows, texts_for, tokenizer, schedule, None, rank, 2)[step] for rank in (0, 1)]
    assert torch.equal(torch.cat([halves[0][0], halves[1][0]]), pixels)
    assert torch.equal(torch.cat([halves[0][1], halves[1][1]], dim=1), tokens)
    # lazy decoding: an unreadable image is replaced by the next sample of the epoch's order, text and all
    order = np.random.default_rng([0, 1]).permutation(64)
    broken = indices[5]
    records[broken] = {**records[broken], "image": str(tmp_path / "missing.png")}
    write_manifest(tmp_path / "train.jsonl", records)
    columns = index_manifest(tmp_path / "train.jsonl")
    alt_only = veclip.MixedTexts(columns, "alt_text", "fused", 1.0)
    opened = lambda image: torch.tensor(image.size, dtype=torch.float32)  # noqa: E731 (any image works)
    _, tokens, substituted = StepBatches(columns, rows, alt_only, tokenizer, schedule, opened, 0, 1)[step]
    neighbour = order[(step - 8) * 8 + 6]  # the sample after the broken one in epoch 1's order
    assert tokens[0, :, 0].tolist() == [*indices[:5], neighbour, *indices[6:]] and tokens[0, :, 1].all()
    assert substituted == 1


def test_torchrun_two_gloo_ranks_match_one_process(world, tmp_path):
    flags = TRAIN_FLAGS + ["--data", str(world / "train.jsonl"), "--steps", "3"]
    single = veclip.main(flags + ["--out", str(tmp_path / "one"), "--device", "cpu"])
    run_torchrun("veclip.py", flags + ["--out", str(tmp_path / "two"), "--eval-data", str(world / "test.jsonl")])
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert np.allclose([h["loss"] for h in single["history"]], [h["loss"] for h in two["history"]], atol=1e-5)
    one_state = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["state_dict"]
    # 1e-4, not 1e-5: the attention key biases get a zero gradient in exact arithmetic, and Adam turns
    # rounding noise of ~1e-10 there into steps of up to lr (1e-3); a wrong gradient differs by ~lr everywhere
    assert all(torch.allclose(one_state[k], two["state_dict"][k], atol=1e-4) for k in one_state)
    # rank 0 evaluated after training: the same as evaluating the checkpoint it wrote
    evaluated = veclip.main(["eval", "--checkpoint", str(tmp_path / "two" / "checkpoint.pt"),
                             "--eval-data", str(world / "test.jsonl"), "--out", str(tmp_path / "e")])
    assert json.loads((tmp_path / "two" / "eval.json").read_text()) == evaluated


def test_resume_continues_from_checkpoint_step(world, tmp_path, monkeypatch):
    argv = TRAIN_FLAGS + ["--data", str(world / "train.jsonl"), "--steps", "6", "--checkpoint-every", "2",
                          "--device", "cpu"]
    straight = veclip.main(argv + ["--out", str(tmp_path / "straight")])
    calls = {"n": 0}
    real_loss = clip_train.clip_loss

    def killed_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the job dies after the checkpoint of step 2
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(clip_train, "clip_loss", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        veclip.main(argv + ["--out", str(tmp_path / "killed")])
    monkeypatch.setattr(clip_train, "clip_loss", real_loss)
    resumed = veclip.main(argv + ["--out", str(tmp_path / "killed")])
    assert resumed["resumed_from"] == 2 and len(resumed["history"]) == 6
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]], abs=1e-6)
    with pytest.raises(ValueError, match="no-resume"):  # a different recipe does not resume silently
        veclip.main(argv + ["--out", str(tmp_path / "killed"), "--p-alt", "0.9"])
    # eval of the world's manifest (a list of references; the world's tasks) and of a plain one (the same
    # references in a field of another name; the background as a class name, with the world's background
    # templates): the same numbers
    on_world = veclip.main(["eval", "--eval-data", str(world / "test.jsonl"), "--out", str(tmp_path / "killed")])
    test_records = read_manifest(world / "test.jsonl")
    plain = [{"id": r["id"], "image": str(world / r["image"]), "caption": r["refs"], "label": r["background"]}
             for r in test_records]
    write_manifest(tmp_path / "plain.jsonl", plain)
    background = zero_shot_tasks(test_records)["background"]
    assert {r["background"] for r in test_records} == set(background["classes"])  # every class present
    metrics = veclip.main(["eval", "--eval-data", str(tmp_path / "plain.jsonl"), "--class-field", "label",
                           "--text-field", "caption", "--checkpoint", str(tmp_path / "killed" / "checkpoint.pt"),
                           "--templates", *background["templates"], "--out", str(tmp_path / "e")])
    assert {k: metrics[k] for k in RETRIEVAL} == {k: on_world[k] for k in RETRIEVAL}
    assert metrics["zeroshot_top1"] == pytest.approx(on_world["zeroshot_background"])
    attributes = [on_world[f"zeroshot_{task}"] for task in ("background", "shape", "color")]
    assert on_world["zeroshot_attributes"] == pytest.approx(np.mean(attributes))  # the mean, as the table says
    assert json.loads((tmp_path / "e" / "eval.json").read_text()) == metrics


# ---- the default run, in miniature -----------------------------------------------------------


def test_smoke_preset_runs_the_miniature_run_and_writes_the_table(tmp_path):
    """The header's first command (the smoke preset: tiny world, micro CLIP, 2 steps per condition)."""
    flags = ["--model", MICRO, "--steps", "2", "--batch-size", "16"]  # the smoke preset's, for the train stage below
    results = veclip.main(["--preset", "smoke", "--out", str(tmp_path)])
    conditions = results["conditions"]
    assert list(conditions) == ["AltText", "VeC", "LLM-VeC", "AltText+LLM-VeC mix"]
    table = (tmp_path / "results.md").read_text()
    for condition, metrics in conditions.items():  # the table's row is the JSON's numbers
        assert f"| {condition} | " + " | ".join(f"{metrics[k][0]:.1f}" for k in COLUMNS) + " |" in table
    assert json.loads((tmp_path / "results.json").read_text())["conditions"] == conditions
    assert results["plot"] == str(tmp_path / "conditions.png")  # written next to the table, as a PNG
    assert (tmp_path / "conditions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the mix arm is the train stage's default run (p_alt 0.5) on the world's fused captions
    world = ensure_world(dataclasses.replace(TINY_WORLD, seed=0))
    mix = veclip.main(["train", "--data", str(world / "train.jsonl"), "--llm-vec-field", "fused", *flags,
                       "--out", str(tmp_path / "mix"), "--eval-data", str(world / "test.jsonl"), "--device", "cpu"])
    assert conditions["AltText+LLM-VeC mix"]["final_loss"][0] == pytest.approx(mix["history"][-1]["loss"], rel=1e-5)
    assert conditions["AltText+LLM-VeC mix"]["i2t_R@1"][0] == pytest.approx(mix["eval"]["i2t_R@1"])


def test_miniature_arms_differ_only_in_their_captions(tmp_path, monkeypatch):
    """Step 5: AltText (p_alt 1), VeC (the world's synthetic caption, p_alt 0), LLM-VeC (the world's fusion, p_alt 0)
    and the mix (p_alt 0.5), each with the same steps, batch and model, on each seed's own world, from scratch."""
    trained = []

    def train(run_args, records, pixel_cache):
        trained.append((run_args, len(records), pixel_cache))
        return None, None, None, {"history": [{"loss": 1.0}], "train_seconds": 0.0}

    monkeypatch.setattr(veclip, "train", train)
    monkeypatch.setattr(veclip, "evaluate", lambda *_, **__: {key: 0.0 for key in COLUMNS})
    veclip.main(["miniature", "--world.n-train", "64", "--world.n-val", "4", "--world.n-test", "24",
                 "--model", MICRO, "--steps", "7", "--batch-size", "16", "--seeds", "2", "--out", str(tmp_path)])
    arms = [(a.alt_field, a.llm_vec_field, a.p_alt) for a, _, _ in trained]
    assert arms == [("alt_text", "fused", 1.0), ("alt_text", "synthetic_caption", 0.0), ("alt_text", "fused", 0.0),
                    ("alt_text", "fused", 0.5)] * 2
    schedules = {(a.steps, a.batch_size, a.model, a.lr, a.warmup, n) for a, n, _ in trained}
    assert schedules == {(7, 16, MICRO, 2e-3, 24, 64)}
    assert [a.seed for a, _, _ in trained] == [0] * 4 + [1] * 4
    assert len({a.out for a, _, _ in trained}) == 8 and not any(a.resume for a, _, _ in trained)
    # each seed's world is its own: the conditions of a seed share its images, the seeds do not
    assert all(trained[i][2] is trained[0][2] for i in range(4))
    assert all(trained[i][2] is trained[4][2] for i in range(4, 8))
    assert not torch.equal(trained[0][2], trained[4][2])


def test_plot_shows_each_conditions_mean_and_spread_over_seeds_against_chance(world):
    """The bar chart of the miniature run: per claim metric, one bar per condition at the mean over seeds with an
    error bar of the (population) std, and the zero-shot panels' chance lines: 100/12 for the 12 emblem names,
    the mean of 100/5 (backgrounds), 100/5 (shapes) and 100/8 (colours) for the attributes."""
    summary = {"AltText": {"i2t_R@1": [1.0, 3.0], "zeroshot_attributes": [40.0, 40.0], "zeroshot_entity": [8.0, 10.0]},
               "AltText+LLM-VeC mix": {"i2t_R@1": [6.0, 10.0], "zeroshot_attributes": [50.0, 56.0],
                                       "zeroshot_entity": [9.0, 9.0]}}
    chance = chance_levels(read_manifest(world / "test.jsonl"))
    attributes_chance, entity_chance = (20 + 20 + 12.5) / 3, 100 / 12
    assert chance == pytest.approx({"zeroshot_attributes": attributes_chance, "zeroshot_entity": entity_chance})
    figure = conditions_figure(summary, chance)
    expected = [("I->T R@1", [2.0, 8.0], [1.0, 2.0], []),  # (panel title, means, stds, chance line)
                ("zero-shot attributes", [40.0, 53.0], [0.0, 3.0], [pytest.approx([attributes_chance] * 2)]),
                ("zero-shot entity", [9.0, 9.0], [1.0, 0.0], [pytest.approx([entity_chance] * 2)])]
    assert [axis.get_title() for axis in figure.axes] == [title for title, *_ in expected]
    for axis, (title, means, stds, chance_line) in zip(figure.axes, expected):
        assert [bar.get_height() for bar in axis.patches] == means
        error_bars = next(c for c in axis.containers if hasattr(c, "errorbar")).errorbar.lines[2][0].get_segments()
        assert [(low, high) for (_, low), (_, high) in error_bars] == [(m - s, m + s) for m, s in zip(means, stds)]
        assert [label.get_text() for label in axis.get_xticklabels()] == ["AltText", "AltText+LLM-VeC\nmix"]
        assert [list(line.get_ydata()) for line in axis.get_lines() if line.get_linestyle() == "--"] == chance_line


def test_args_defaults_are_the_papers():
    """Args defaults against the paper, as the VeCLIP paper states them (the official apple/ml-veclip has no
    configs: checkpoints only)."""
    args = veclip.Args()
    # Sec. 3.4: "each sample, each time it is drawn, uses AltText or LLM-VeC with equal probability"
    assert args.p_alt == 0.5
    # Sec. 3.2: LLaVA for the VeC (no size stated; LLaVA-1.5-7B); Sec. 3.3: Vicuna-1.1-13B for the LLM-VeC
    assert (args.vlm, args.llm) == ("llava-hf/llava-1.5-7b-hf", "lmsys/vicuna-13b-v1.1")
    # ours (Deviation 3): CLIP reads 77 tokens; half of Vicuna-1.1's 2048-token context for the fusion prompt
    assert (args.max_new_tokens, args.max_prompt_tokens) == (77, 1024)
    # zero-shot: CLIP's 80 ImageNet templates (Radford et al. 2021), written out at both ends
    assert len(args.templates) == 80 and (args.templates[0], args.templates[-1]) == ("a bad photo of a {}.",
                                                                                      "a tattoo of the {}.")
    assert args.text_field == "refs"  # every reference caption (Karpathy COCO/Flickr protocol)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "^error: --batch-size must be at least 1, got 0$"),
    (["--seeds", "0"], "^error: --seeds must be at least 1, got 0$"),
    (["--steps", "-1"], "^error: --steps must be at least 1, got -1$"),
    (["--p-alt", "1.5"], r"^error: --p-alt must be in \[0, 1\], got 1.5$"),
    (["--lr", "nan"], "^error: --lr must be at least 0, got nan$"),
    (["--gen-batch-size", "0"], "^error: --gen-batch-size must be at least 1, got 0$"),
    (["--max-new-tokens", "0"], "^error: --max-new-tokens must be at least 1, got 0$"),
    (["--checkpoint-every", "0"], "^error: --checkpoint-every must be at least 1, got 0$"),
    (["--warmup", "-1"], "^error: --warmup must be at least 0, got -1$"),
    (["--workers", "-1"], "^error: --workers must be at least 0, got -1$"),
])
@pytest.mark.parametrize("stage", ["miniature", "train"])
def test_flags_out_of_range_stop_at_start_up_naming_the_flag(stage, flags, message, tmp_path):
    """Checked before anything loads or is written: one line naming the flag, nothing in --out."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        veclip.main([stage, "--data", str(tmp_path / "absent.jsonl"), "--out", str(out), *flags, "--device", "cpu"])
    assert not out.exists()


# ---- nothing silently wrong: a diverged run, a missing device, fields that are not text ----------------


def test_a_diverged_run_stops_with_one_line_and_no_nan_checkpoint(world, tmp_path):
    """`train --lr inf`: the first update puts NaN in the weights while its loss looks fine. It exited 0 with a NaN
    checkpoint.pt and every R@K = 100; now the command line ends with one line and status 1, and writes neither the
    checkpoint nor eval.json."""
    import subprocess
    import sys

    out = tmp_path / "diverged"
    command = [sys.executable, veclip.__file__, *TRAIN_FLAGS, "--data", str(world / "train.jsonl"), "--out", str(out),
               "--steps", "1", "--lr", "inf", "--warmup", "0", "--eval-data", str(world / "test.jsonl"),
               "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert last.startswith(f"error: train veclip at step 0 of 1, after its update ({out / 'checkpoint.pt'} not written "
                           "by this run): ") and "weight tensors hold NaN or inf" in last
    assert not (out / "checkpoint.pt").exists() and not (out / "eval.json").exists()


def test_checkpoint_every_step_never_writes_the_nan_one(world, tmp_path):
    """With --checkpoint-every 1 the NaN weights of step 0's update were saved before the next step's loss check
    said "stopping before the weights are poisoned"."""
    with pytest.raises(FloatingPointError, match="at step 0 of 3, after its update"):
        veclip.main([*TRAIN_FLAGS, "--data", str(world / "train.jsonl"), "--out", str(tmp_path), "--steps", "3",
                     "--lr", "inf", "--warmup", "0", "--checkpoint-every", "1", "--device", "cpu"])
    assert not (tmp_path / "checkpoint.pt").exists()


def test_eval_of_a_nan_checkpoint_names_it_instead_of_scoring_100(world, tmp_path):
    model = create_clip(MICRO)[0]
    state = model.state_dict()
    state["visual.proj"] = torch.full_like(state["visual.proj"], math.nan)
    path = tmp_path / "nan.pt"
    torch.save({"state_dict": state, "recipe": {"model": MICRO, "pretrained": None}}, path)
    from common.data import NonFiniteError

    with pytest.raises(NonFiniteError, match=f"^image embeddings of {path} contain NaN or inf \\(24 of 24\\)"):
        veclip.main(["eval", "--checkpoint", str(path), "--eval-data", str(world / "test.jsonl"),
                     "--out", str(tmp_path), "--device", "cpu"])
    assert not (tmp_path / "eval.json").exists()


def test_device_cuda_without_cuda_says_so_before_any_weights_load(world, tmp_path, monkeypatch):
    """Not a driver traceback from the first tensor moved, nor `cannot load --pretrained`."""
    from common.data import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in ([*TRAIN_FLAGS, "--data", str(world / "train.jsonl")],
                 ["eval", "--model", MICRO, "--pretrained", str(tmp_path / "weights.pt"),
                  "--eval-data", str(world / "test.jsonl")]):
        with pytest.raises(DeviceError, match="^--device cuda: CUDA is not available on this machine"):
            veclip.main([*argv, "--out", str(tmp_path), "--device", "cuda"])


def test_references_class_names_and_fusion_inputs_must_be_text(tmp_path):
    """A number or a list of numbers in a reference field was scored as the caption "1"; a class id prompted as
    "a photo of a 3."; an alt-text list fused as "['a', 'b']". Each is an error naming the sample (fuse: before the
    LLM loads)."""
    not_text = r"^evaluation sample '0': field 'refs': item 0 must be a non-empty string, got 1$"
    with pytest.raises(ManifestError, match=not_text):
        references([{"id": "0", "refs": [1, 2]}], "refs")
    with pytest.raises(ManifestError, match=r"^evaluation sample '1': field 'label' must be a string, got 3$"):
        texts_of([{"id": "0", "label": "cat"}, {"id": "1", "label": 3}], "label")
    write_manifest(tmp_path / "vec.jsonl", [{"id": "a", "image": "a.png", "alt_text": ["x", "y"], "vec": "a cat"}])
    with pytest.raises(BadSampleError, match=r"""^sample 'a': field 'alt_text' must be a string, got \["x", "y"\]$"""):
        veclip.main(["fuse", "--data", str(tmp_path / "vec.jsonl"), "--out", str(tmp_path / "out.jsonl"),
                     "--llm", str(tmp_path / "no-such-model"), "--device", "cpu"])


def test_eval_writes_clip_benchmark_rows_of_the_checkpoint(tmp_path):
    """--benchmark hands the checkpoint's model to clip_benchmark: the rows equal clip_benchmark's on that model."""
    from common.benchmarks import MissingBenchmark, evaluate_benchmarks
    from test_benchmarks import write_stage_sets

    root = write_stage_sets(tmp_path / "sets")
    model, preprocess, tokenizer = create_clip(MICRO, seed=3)
    path = tmp_path / "micro.pt"
    torch.save({"state_dict": model.state_dict(), "recipe": {"model": MICRO, "pretrained": None}}, path)
    flags = ["eval", "--checkpoint", str(path), "--benchmark-root", root, "--device", "cpu"]
    with pytest.raises(MissingBenchmark, match="wds_absent"):  # checked before any weights load
        veclip.main([*flags, "--benchmark", "wds/absent", "--checkpoint", str(tmp_path / "no.pt"),
                     "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--eval-data .* or --benchmark"):
        veclip.main(["eval", "--checkpoint", str(path), "--out", str(tmp_path), "--device", "cpu"])
    metrics = veclip.main([*flags, "--benchmark", "wds/colors", "wds/flickr30k", "--out", str(tmp_path / "out")])
    expected = evaluate_benchmarks(model.eval(), preprocess, tokenizer, ["wds/colors", "wds/flickr30k"], root,
                                   model_label=MICRO,
                                   pretrained=str(path))
    # acc5 of 3 classes is NaN, as clip_benchmark has it
    same = lambda rows: json.dumps(rows) == json.dumps(expected)  # noqa: E731
    assert same(metrics["benchmarks"]) and expected[0]["model"] == MICRO
    assert same(json.loads((tmp_path / "out" / "eval.json").read_text())["benchmarks"])
    assert same([json.loads(line) for line in (tmp_path / "out" / "benchmarks.jsonl").read_text().splitlines()])
