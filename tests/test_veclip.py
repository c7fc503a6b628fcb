"""veclip.py: mixing per draw, fusion prompt truncation, answer parsing and refusal fallback, vec/fuse
with tiny random LLaVA-1.5 / Vicuna-1.1 stand-ins, retrieval over every reference and the template
ensemble against hand computations, evaluation on the model's device, the ViT-B/16 train and eval
commands, 2 torchrun gloo ranks against one process, resume, and the miniature main()."""

import json
import os

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import veclip
from common.clip_train import evaluate_world
from common.data import ResumableJSONLWriter, read_manifest, write_manifest
from common.miniature import WorldConfig, ensure_world
from realarch import run_torchrun, save_hf, serve_open_clip_tag

MICRO = "micro-ViT-16"
TINY_WORLD = WorldConfig(n_train=64, n_val=4, n_test=24)
TRAIN_FLAGS = ["--stage", "train", "--model", MICRO, "--batch-size", "8", "--kernel", "torch", "--no-amp",
               "--alt-field", "alt_text", "--llm-vec-field", "fused", "--lr", "1e-3", "--warmup", "2"]
RETRIEVAL = [f"{way}_R@{k}" for way in ("i2t", "t2i") for k in (1, 5, 10)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_world(TINY_WORLD, tmp_path_factory.mktemp("world"))


# ---- mixing ----------------------------------------------------------------------------------


def test_mixing_draws_alt_text_with_probability_p_per_draw():
    p, steps, batch = 0.3, 400, 64
    draws = np.stack([veclip.draw_alt_text(step, batch, p, seed=0) for step in range(steps)])  # (T, B)
    sigma = np.sqrt(p * (1 - p) / draws.size)
    assert abs(draws.mean() - p) < 4 * sigma
    # the same sample drawn at many steps gets both texts, at rate p: a draw, not a per-sample choice
    indices = np.stack([veclip.global_batch_indices(step, 128, batch, seed=0) for step in range(steps)])
    alt_for_sample_5 = draws[indices == 5]
    assert 0 < alt_for_sample_5.mean() < 1 and len(alt_for_sample_5) == steps * batch // 128
    assert abs(alt_for_sample_5.mean() - p) < 4 * np.sqrt(p * (1 - p) / len(alt_for_sample_5))
    assert veclip.draw_alt_text(3, batch, 1.0, 0).all() and not veclip.draw_alt_text(3, batch, 0.0, 0).any()
    texts = veclip.mixed_texts(["a0", "a1"], ["l0", "l1"], np.array([1, 0, 1]), np.array([True, False, False]))
    assert texts == ["a1", "l0", "l1"]


def test_batches_cover_each_epoch_once():
    epoch = np.concatenate([veclip.global_batch_indices(step, 40, 8, seed=3) for step in range(5)])
    assert sorted(epoch.tolist()) == list(range(40))
    assert not np.array_equal(veclip.global_batch_indices(5, 40, 8, 3), veclip.global_batch_indices(0, 40, 8, 3))


# ---- fusion prompt and LLM answers -----------------------------------------------------------


def tiny_tokenizer(pad: bool = True):
    """A word-level stand-in for the Llama tokenizer of LLaVA-1.5 and Vicuna: <unk> 0, <s> 1, </s> 2 and a
    prepended <s> as Llama's; Vicuna's ships no pad token (pad=False), llava-hf's adds <pad>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(" ".join([veclip.FUSION_PROMPT, veclip.VICUNA_SYSTEM, veclip.VEC_PROMPT]).split())
                   | {"USER:", "ASSISTANT:", "red", "blue", "circle", "square", "grass", "Aldora", "stock", "photo"})
    special = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>" if pad else None, extra_special_tokens={"image_token": "<image>"})


def test_truncation_cuts_alt_text_and_keeps_vec_whole():
    tokenizer = tiny_tokenizer()
    vec = "a red circle on grass"
    alt = " ".join(["Aldora stock photo"] * 50)
    full, cut = veclip.fusion_prompt(tokenizer, alt, vec, max_prompt_tokens=10_000)
    assert not cut and alt in full
    short_length = veclip.prompt_length(tokenizer, veclip.llm_prompt(tokenizer, veclip.FUSION_PROMPT.format(alt_text="", vec=vec)))
    prompt, cut = veclip.fusion_prompt(tokenizer, alt, vec, max_prompt_tokens=short_length + 7)
    assert cut and f"Description 2: {vec}\n" in prompt
    assert veclip.prompt_length(tokenizer, prompt) <= short_length + 7
    assert "Description 1: Aldora stock photo Aldora stock photo Aldora\n" in prompt  # the first 7 words
    # a budget below the VeC alone: the alt-text goes entirely, the VeC stays
    prompt, cut = veclip.fusion_prompt(tokenizer, alt, vec, max_prompt_tokens=5)
    assert cut and "Description 1: \n" in prompt and vec in prompt


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
    for answer in ["I'm sorry, but I cannot help with that.", "As an AI language model, I ...",
                   "I cannot write a new sentence: the descriptions disagree.", "   \n"]:
        assert veclip.llm_vec_or_fallback(answer, vec, alt) == (vec, True), answer
    for answer in ["A sign that reads I cannot swim, by the Aldora lake.", "Okay hand sign by the Aldora lake."]:
        assert veclip.llm_vec_or_fallback(answer, vec, alt) == (answer, False), answer
    assert veclip.llm_vec_or_fallback("", "", alt) == (alt, True)


# ---- vec and fuse with tiny LLaVA-1.5 and Vicuna-1.1 stand-ins --------------------------------

# llava-hf/llava-1.5-7b-hf's template: "USER: <image>\n{text} ASSISTANT:"
LLAVA_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}"
                       "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
                       "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
                       "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
                       "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The `vec` and `fuse` commands' default models at tiny width, random weights: LLaVA-1.5-7B's and
    Vicuna-1.1-13B's classes and structural settings (from their config.json), saved in fp16 as they ship."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

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
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                   tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE).save_pretrained(root / "vlm")
    # Vicuna-1.1: Llama, rms eps 1e-6, 2048 positions, untied head, no chat template, no pad token
    vicuna = LlamaConfig(**TINY, vocab_size=len(llm_tokenizer), num_key_value_heads=2, max_position_embeddings=2048,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llm = LlamaForCausalLM(vicuna)
    save_hf(llm, root / "llm")
    llm_tokenizer.save_pretrained(root / "llm")
    with torch.no_grad():  # all logits equal: greedy picks <unk>, which decodes to an empty answer
        llm.lm_head.weight.zero_()
    save_hf(llm, root / "mute_llm")
    llm_tokenizer.save_pretrained(root / "mute_llm")
    return root


def test_vec_and_fuse_write_resumable_manifests(world, tiny_models, tmp_path, monkeypatch):
    loaded_dtypes, real_generate = [], veclip.generate
    monkeypatch.setattr(veclip, "generate",
                        lambda model, *a, **k: loaded_dtypes.append(model.dtype) or real_generate(model, *a, **k))
    records = read_manifest(world / "val.jsonl")  # 4 samples
    vec_out = tmp_path / "out" / "vec.jsonl"
    # a killed run left one finished sample and half a line
    with ResumableJSONLWriter(vec_out) as writer:
        moved = os.path.relpath(world / records[0]["image"], vec_out.parent)
        writer.write({**{k: v for k, v in records[0].items() if k != "_root"}, "image": moved, "vec": "a red circle"})
    with open(vec_out, "ab") as handle:
        handle.write(b'{"id": "val-0000')
    counts = veclip.main(["--stage", "vec", "--data", str(world / "val.jsonl"), "--out", str(vec_out),
                          "--vlm", str(tiny_models / "vlm"), "--gen-batch-size", "2", "--max-new-tokens", "4",
                          "--device", "cpu"])
    assert counts["already_done"] == 1 and counts["written"] == 3
    vec_records = read_manifest(vec_out)
    assert [r["id"] for r in vec_records] == [r["id"] for r in records] and all("vec" in r for r in vec_records)
    assert all((vec_out.parent / r["image"]).exists() for r in vec_records)  # images re-rooted
    # fuse, long alt-texts truncated to a small budget; a second call has nothing left to do
    fused_out = tmp_path / "fused.jsonl"
    tokenizer = tiny_tokenizer(pad=False)
    budget = 1 + max(veclip.prompt_length(tokenizer, veclip.llm_prompt(
        tokenizer, veclip.FUSION_PROMPT.format(alt_text="", vec=r["vec"]))) for r in vec_records)
    argv = ["--stage", "fuse", "--data", str(vec_out), "--out", str(fused_out), "--llm", str(tiny_models / "llm"),
            "--max-new-tokens", "3", "--max-prompt-tokens", str(budget), "--device", "cpu"]
    counts = veclip.main(argv)
    assert counts["written"] == 4 and counts["alt_text_truncated"] >= 1
    fused = read_manifest(fused_out)
    assert all(isinstance(r["llm_vec"], str) and r["llm_vec"] for r in fused)
    assert veclip.main(argv) == {"already_done": 4}
    # an LLM that answers nothing: every LLM-VeC falls back to the VeC, counted
    mute_out = tmp_path / "mute.jsonl"
    counts = veclip.main(argv[:3] + [str(vec_out), "--out", str(mute_out), "--llm", str(tiny_models / "mute_llm"),
                                     "--max-new-tokens", "3", "--device", "cpu"])
    assert counts["refusal_fallbacks"] == 4
    assert all(r["llm_vec"] == r["vec"] and r["llm_vec_fallback"] for r in read_manifest(mute_out))
    # the fp16 checkpoints ran in the dtype asked for (float32 on the CPU), not the one they ship in
    assert set(loaded_dtypes) == {torch.float32}


def test_missing_weights_name_the_flag(world, tmp_path):
    with pytest.raises(RuntimeError, match="--llm"):
        veclip.main(["--stage", "fuse", "--data", str(world / "val.jsonl"), "--out", str(tmp_path / "x.jsonl"),
                     "--llm", str(tmp_path / "no-such-model"), "--device", "cpu"])


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
    model = TableCLIP([[1.0, 0.0], [0.0, 1.0]], [[.6, .8], [1, 0], [.8, .6], [-1, 0], [.6, .8], [1, 0], [.8, .6], [0, 1]])
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
    with pytest.raises(ValueError, match="--text-field"):
        veclip.evaluate(model, tokenizer, None, [{"id": "0", "caption": "a"}], args, images=images[:1])
    # the default ensemble is CLIP's 80 ImageNet templates
    assert veclip.Args().templates == tuple(t("{}") for t in open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)


def test_evaluation_encodes_on_the_models_device(world, tmp_path, monkeypatch):
    """On CUDA, `python veclip.py` failed at its first evaluation: it encoded on 'cpu' while the model sat on
    cuda. With no GPU here the model sits on 'meta', and every encoding must be asked for the model's device."""
    model, preprocess, tokenizer = veclip.create_clip(MICRO)
    model.to("meta")
    asked = []

    def encode(model, inputs, *rest, device="cpu", **_):
        asked.append(torch.device(device))
        return F.normalize(torch.randn(len(rest[0]) if rest else len(inputs), 32), dim=-1)

    def zero_shot(*args):
        asked.append(torch.device(args[-1]))
        return 0.0

    monkeypatch.setattr(veclip, "encode_images", encode)
    monkeypatch.setattr(veclip, "encode_texts", encode)
    monkeypatch.setattr(veclip, "zero_shot_accuracy", zero_shot)
    plain = [{"id": r["id"], "image": str(world / r["image"]), "caption": r["caption"], "refs": r["refs"],
              "label": r["background"]} for r in read_manifest(world / "test.jsonl")]
    veclip.evaluate(model, tokenizer, preprocess, plain, veclip.Args(class_field="label"))  # eval, train --eval-data
    assert len(asked) == 3 and set(asked) == {torch.device("meta")}
    # the default run, each condition's model where train() leaves it
    monkeypatch.setattr(veclip, "train", lambda *_: (model, preprocess, tokenizer, {"history": [{"loss": 1.0}],
                                                                                    "train_seconds": 0.0}))
    veclip.main(["--stage", "miniature", "--world.n-train", "64", "--world.n-val", "4", "--world.n-test", "24",
                 "--model", MICRO, "--batch-size", "16", "--out", str(tmp_path)])
    assert len(asked) >= 3 + 4 * 2 and set(asked) == {torch.device("meta")}


# ---- train and eval: ViT-B/16 and a pretrained tag at tiny width -------------------------------


def test_train_and_eval_commands_run_vit_b_16(world, tmp_path, monkeypatch):
    """The header's `--stage train --model ViT-B-16 ... --eval-data` and `--stage eval --checkpoint` commands."""
    serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-16")  # widths shrunk; 224 px, patch 16, context 77 kept
    out, test = tmp_path / "veclip_b16", str(world / "test.jsonl")
    train_log = veclip.main(["--stage", "train", "--data", str(world / "train.jsonl"), "--out", str(out),
                             "--model", "ViT-B-16", "--batch-size", "4", "--steps", "2", "--lr", "5e-4",
                             "--weight-decay", "0.2", "--warmup", "1", "--checkpoint-every", "1", "--workers", "1",
                             "--eval-data", test, "--llm-vec-field", "fused", "--kernel", "torch", "--device", "cpu"])
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["state_dict"]["visual.positional_embedding"].shape == (14 * 14 + 1, 64)
    metrics = veclip.main(["--stage", "eval", "--checkpoint", str(out / "checkpoint.pt"), "--eval-data", test,
                           "--out", str(tmp_path / "eval")])
    assert metrics == train_log["eval"]  # the checkpoint rebuilds the model that was evaluated after training
    # the world has one reference per image: every-reference retrieval scores as the one-caption protocol did
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16")
    model.load_state_dict(state["state_dict"])
    one_caption = evaluate_world(model.eval(), open_clip.get_tokenizer("ViT-B-16"), preprocess, read_manifest(test))
    assert {k: metrics[k] for k in RETRIEVAL} == {k: one_caption[k] for k in RETRIEVAL}


def test_pretrained_tag_runs_with_the_tags_settings(world, tmp_path, monkeypatch):
    """`--stage eval --model ViT-B-16 --pretrained openai` and a run started from that tag: OpenAI's QuickGELU."""
    _, reference = serve_open_clip_tag(monkeypatch, tmp_path, "ViT-B-16", "openai")
    model, preprocess, tokenizer = veclip.build_clip(veclip.Args(model="ViT-B-16", pretrained="openai"))
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(pixels), reference.encode_image(pixels), atol=1e-5)
    records, test = read_manifest(world / "test.jsonl"), str(world / "test.jsonl")
    expected = veclip.evaluate(reference, tokenizer, preprocess, records, veclip.Args())
    tag = ["--model", "ViT-B-16", "--pretrained", "openai", "--eval-data", test, "--device", "cpu"]
    assert veclip.main(["--stage", "eval", *tag, "--out", str(tmp_path / "eval")]) == expected
    # one step from the tag: its checkpoint is evaluated as the QuickGELU model it was trained as
    veclip.main(["--stage", "train", *tag, "--data", str(world / "train.jsonl"), "--out", str(tmp_path / "ft"),
                 "--batch-size", "4", "--steps", "1", "--warmup", "1", "--llm-vec-field", "fused", "--kernel", "torch"])
    model, _, _ = veclip.load_checkpoint(tmp_path / "ft" / "checkpoint.pt")
    reference.load_state_dict(torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        assert torch.allclose(model.eval().encode_image(pixels), reference.encode_image(pixels), atol=1e-5)


# ---- training: torchrun equals one process; resume ---------------------------------------------


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
    evaluated = veclip.main(["--stage", "eval", "--checkpoint", str(tmp_path / "two" / "checkpoint.pt"),
                             "--eval-data", str(world / "test.jsonl"), "--out", str(tmp_path / "e")])
    assert json.loads((tmp_path / "two" / "eval.json").read_text()) == evaluated


def test_resume_continues_from_checkpoint_step(world, tmp_path, monkeypatch):
    argv = TRAIN_FLAGS + ["--data", str(world / "train.jsonl"), "--steps", "6", "--checkpoint-every", "2",
                          "--device", "cpu"]
    straight = veclip.main(argv + ["--out", str(tmp_path / "straight")])
    calls = {"n": 0}
    real_loss = veclip.clip_loss

    def killed_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the job dies after the checkpoint of step 2
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(veclip, "clip_loss", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        veclip.main(argv + ["--out", str(tmp_path / "killed")])
    monkeypatch.setattr(veclip, "clip_loss", real_loss)
    resumed = veclip.main(argv + ["--out", str(tmp_path / "killed")])
    assert resumed["resumed_from"] == 2 and len(resumed["history"]) == 6
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]], abs=1e-6)
    with pytest.raises(ValueError, match="no-resume"):  # a different recipe does not resume silently
        veclip.main(argv + ["--out", str(tmp_path / "killed"), "--p-alt", "0.9"])
    # eval: the world's tasks, and a plain manifest with one caption per image and a class-name field
    metrics = veclip.main(["--stage", "eval", "--eval-data", str(world / "test.jsonl"), "--out", str(tmp_path / "killed")])
    assert {"i2t_R@10", "t2i_R@1", "zeroshot_attributes", "zeroshot_entity"} <= set(metrics)
    plain = [{"id": r["id"], "image": str(world / r["image"]), "caption": r["caption"], "label": r["background"]}
             for r in read_manifest(world / "test.jsonl")]
    write_manifest(tmp_path / "plain.jsonl", plain)
    metrics = veclip.main(["--stage", "eval", "--eval-data", str(tmp_path / "plain.jsonl"), "--class-field", "label",
                           "--text-field", "caption", "--checkpoint", str(tmp_path / "killed" / "checkpoint.pt"),
                           "--out", str(tmp_path / "e")])
    assert "zeroshot_top1" in metrics and json.loads((tmp_path / "e" / "eval.json").read_text()) == metrics


# ---- the default run, in miniature -----------------------------------------------------------


def test_miniature_main_writes_the_table(tmp_path):
    results = veclip.main(["--stage", "miniature", "--world.n-train", "64", "--world.n-val", "4", "--world.n-test", "24",
                           "--model", MICRO, "--steps", "2", "--batch-size", "16", "--kernel", "torch",
                           "--out", str(tmp_path)])
    assert set(results["conditions"]) == set(veclip.CONDITIONS)
    table = (tmp_path / "results.md").read_text()
    for condition, metrics in results["conditions"].items():
        assert np.isfinite(metrics["final_loss"][0])
        # the table's row is the JSON's numbers
        assert f"| {condition} | " + " | ".join(f"{metrics[k][0]:.1f}" for k in veclip.COLUMNS) + " |" in table
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 2
