"""Causal LM decoders for captioners: a hub model (or local folder) in fp32 with its fast tokenizer, or a tiny OPT
over a word-level vocabulary (`tiny-opt`, the miniature's); stored in a checkpoint as plain types and rebuilt
from it alone, with no hub access, alone or inside a captioner (a module whose `decoder` is the causal LM)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from common.data import load_model, load_pretrained

TINY_OPT = dict(hidden_size=128, word_embed_proj_dim=128, num_hidden_layers=2, ffn_dim=512, num_attention_heads=4,
                max_position_embeddings=512, dropout=0.1)  # --decoder tiny-opt, the miniature's decoder


def world_tokenizer(texts: list[str], min_frequency: int = 3):
    """A word-level tokenizer over the words of `texts` (the vocabulary of --decoder tiny-opt)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, re-attaches "," and "."
    trainer = trainers.WordLevelTrainer(min_frequency=min_frequency, special_tokens=["<pad>", "</s>", "<unk>"])
    backend.train_from_iterator(texts, trainer)
    return tokenizer_from_json(backend.to_str(), pad_token="<pad>", eos_token="</s>")


def tokenizer_from_json(text: str, pad_token: str, eos_token: str):
    """A fast tokenizer from its serialised backend (how checkpoints carry the decoder's tokenizer)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), pad_token=pad_token, eos_token=eos_token)


def new_decoder(name: str, texts: list[str], trust_remote_code: bool = False, flag: str = "--decoder"):
    """(decoder, tokenizer): `name` by hub name or folder (fp32, a fast tokenizer with a pad token), or 'tiny-opt'
    with a word-level tokenizer over `texts`. Initialised from torch's global RNG: seed it first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig, OPTForCausalLM

    if name == "tiny-opt":
        tokenizer = world_tokenizer(texts)
        config = OPTConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **TINY_OPT)
        return OPTForCausalLM(config), tokenizer
    remote = {"trust_remote_code": trust_remote_code}
    tokenizer = load_pretrained(AutoTokenizer, name, flag, **remote)
    # fp32 weights whatever the checkpoint ships (OPT: fp16), so AdamW updates them in full precision
    decoder = load_model(AutoModelForCausalLM, name, flag, dtype=torch.float32, **remote)
    if not tokenizer.is_fast:
        raise ValueError(f"{flag} {name!r} has no fast tokenizer; the checkpoint stores a fast one")
    if tokenizer.pad_token is None:  # GPT-2 ships none; pads are masked, whatever their id
        tokenizer.pad_token = tokenizer.eos_token
    return decoder, tokenizer


def decoder_payload(decoder, tokenizer) -> dict:
    """The decoder's config and tokenizer as plain types (loadable with weights_only=True); weights apart."""
    return {"decoder_config": decoder.config.to_json_string(), "tokenizer": tokenizer.backend_tokenizer.to_str(),
            "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token}


def decoder_from_payload(payload: dict):
    """(decoder, tokenizer) rebuilt from `decoder_payload`'s fields: fp32 random weights, to load a state into."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads(payload["decoder_config"])
    # from_config would take the dtype the config records (a decoder loaded from fp16 files says float16)
    decoder = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config),
                                               dtype=torch.float32)
    return decoder, tokenizer_from_json(payload["tokenizer"], payload["pad_token"], payload["eos_token"])


def load_checkpoint(path: str | None, flag: str, what: str) -> dict:
    """The checkpoint at `path` on the CPU (plain types only: weights_only), or an error naming `flag` and `what`
    it should be."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"no captioner checkpoint at {path}: pass {flag} ({what})")
    return torch.load(path, map_location="cpu", weights_only=True)


def captioner_payload(captioner, tokenizer, **fields) -> dict:
    """A captioner as plain types (loadable with weights_only=True): its state, its decoder's config and tokenizer
    (`decoder_payload`), and `fields`, the caller's (what rebuilding the module takes besides, for one)."""
    return {"captioner": captioner.state_dict(), **decoder_payload(captioner.decoder, tokenizer), **fields}


def captioner_from_payload(payload: dict, build: Callable) -> tuple[torch.nn.Module, object]:
    """(captioner, tokenizer) rebuilt from `captioner_payload`'s fields alone: `build(decoder, payload)` makes the
    module around the rebuilt decoder, then the saved state is loaded into it."""
    decoder, tokenizer = decoder_from_payload(payload)
    captioner = build(decoder, payload)
    captioner.load_state_dict(payload["captioner"])
    return captioner, tokenizer


def load_captioner(path: str | None, build: Callable, flag: str, what: str) -> tuple[dict, torch.nn.Module, object]:
    """(payload, captioner, tokenizer) of the checkpoint at `path`: `load_checkpoint`, then
    `captioner_from_payload`."""
    payload = load_checkpoint(path, flag, what)
    return (payload, *captioner_from_payload(payload, build))
