"""A small image captioner over a frozen CLIP's tokens, and its vocabulary of CLIP BPE tokens (dico.py's model).

`Vocab` maps the CLIP BPE ids a captioner may emit to its own ids 0..n-1 (pad = n); `Captioner` is
Linear(CLIP width -> d) -> Transformer encoder -> causal Transformer decoder with cross-attention (torch pre-norm
layers), with incremental decoding from cached keys and values (`start_cache`, `step`, `reorder_cache`) for the
beam search (dico.py) and the sampling (`sample`) that run over it. `model_from_checkpoint` rebuilds it from a
checkpoint (its `config`, vocabulary and weights).
"""

from __future__ import annotations

import functools
import re

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.cache
def clip_bpe() -> open_clip.tokenizer.SimpleTokenizer:
    """CLIP's BPE tokenizer (open_clip ships its files), built once per process."""
    return open_clip.tokenizer.SimpleTokenizer()


class Vocab:
    """The captioner's tokens: CLIP BPE ids it can emit, its own ids 0..n-1 for them, pad = n."""

    def __init__(self, bpe_ids: list[int]):
        self.tokenizer = clip_bpe()
        self.bpe_ids = list(bpe_ids)
        self.index = {bpe: own for own, bpe in enumerate(self.bpe_ids)}
        self.bos = self.index[self.tokenizer.sot_token_id]
        self.eos = self.index[self.tokenizer.eot_token_id]
        self.pad = len(self.bpe_ids)

    @classmethod
    def build(cls, captions: list[str], restrict: bool) -> "Vocab":
        tokenizer = clip_bpe()
        if not restrict:
            return cls(list(range(len(tokenizer.encoder))))
        used = {bpe for text in captions for bpe in tokenizer.encode(text)}
        return cls(sorted(used | {tokenizer.sot_token_id, tokenizer.eot_token_id}))

    def encode(self, text: str, max_len: int) -> list[int]:
        """Own ids of `text` + EOS, truncated to max_len tokens (EOS kept)."""
        try:
            ids = [self.index[bpe] for bpe in self.tokenizer.encode(text)]
        except KeyError as err:
            raise ValueError(f"caption {text!r} uses a BPE token outside the captioner's vocabulary ({err}); "
                             "build the vocabulary from these captions or drop --restrict-vocab") from err
        return ids[: max_len - 1] + [self.eos]

    def decode(self, ids) -> str:
        """Text of own ids up to the first EOS (padding and BOS never appear in generated captions)."""
        bpe = []
        for own in ids:
            if own == self.eos or own >= self.pad:
                break
            bpe.append(self.bpe_ids[own])
        text = self.tokenizer.decode(bpe).strip()
        return re.sub(r" ([,.])", r"\1", text)  # the BPE decoder spaces punctuation out


class Captioner(nn.Module):
    """Linear(CLIP width -> d) -> Transformer encoder -> causal decoder with cross-attention."""

    def __init__(self, n_tokens: int, bos: int, eos: int, visual_width: int, d_model: int, encoder_layers: int,
                 decoder_layers: int, heads: int, ffn: int, dropout: float, max_len: int):
        super().__init__()
        self.config = dict(n_tokens=n_tokens, bos=bos, eos=eos, visual_width=visual_width, d_model=d_model,
                           encoder_layers=encoder_layers, decoder_layers=decoder_layers, heads=heads, ffn=ffn,
                           dropout=dropout, max_len=max_len)
        self.bos, self.eos, self.pad, self.max_len = bos, eos, n_tokens, max_len
        self.visual_proj = nn.Linear(visual_width, d_model)
        layer = dict(d_model=d_model, nhead=heads, dim_feedforward=ffn, dropout=dropout, batch_first=True,
                     norm_first=True)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), encoder_layers,
                                             enable_nested_tensor=False)
        self.token_emb = nn.Embedding(n_tokens + 1, d_model, padding_idx=self.pad)
        self.pos_emb = nn.Embedding(max_len + 1, d_model)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), decoder_layers)
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, n_tokens + 1)
        never = torch.zeros(n_tokens + 1, dtype=torch.bool)
        never[[self.pad, bos]] = True  # the vocabulary includes pad, but pad and BOS are never a next token
        self.register_buffer("never_emitted", never, persistent=False)

    def encode(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.visual_proj(visual_tokens))  # (B, P, D)

    def decode(self, memory: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Next-token logits (N, t, V + 1) for inputs (N, t) that start with BOS."""
        t = inputs.shape[1]
        x = self.token_emb(inputs) + self.pos_emb(torch.arange(t, device=inputs.device))  # (N, t, D)
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=inputs.device)
        x = self.norm(self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True))
        return self.lm_head(x).masked_fill(self.never_emitted, float("-inf"))  # (N, t, V + 1)

    def forward(self, visual_tokens: torch.Tensor, inputs: torch.Tensor, beams: int = 1) -> torch.Tensor:
        """Teacher-forced logits; `beams` sequences per image (rows ordered image-major)."""
        memory = self.encode(visual_tokens).repeat_interleave(beams, dim=0)  # (B beams, P, D)
        return self.decode(memory, inputs)

    # Incremental decoding for generation: `decode` recomputes every earlier position at each new
    # token (O(T^2) work per caption); `step` computes the new position only, from cached keys and
    # values. Same layers, same weights, same logits (tests compare the two).

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.config["heads"], -1)).transpose(1, 2)  # (N, t, D) -> (N, H, t, D/H)

    def start_cache(self, memory: torch.Tensor) -> list[dict]:
        """Per decoder layer: the cross-attention keys/values of the memory, no self-attention past yet."""
        cache = []
        for layer in self.decoder.layers:
            attn, d = layer.multihead_attn, memory.shape[-1]
            k, v = F.linear(memory, attn.in_proj_weight[d:], attn.in_proj_bias[d:]).chunk(2, dim=-1)
            empty = memory.new_zeros(memory.shape[0], self.config["heads"], 0, d // self.config["heads"])
            cache.append({"memory_k": self._heads(k), "memory_v": self._heads(v), "k": empty, "v": empty})
        return cache

    def step(self, cache: list[dict], token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (N, V + 1) of the token after `token` (N,) at `position`; appends to `cache` in place."""
        x = self.token_emb(token)[:, None] + self.pos_emb.weight[position]  # (N, 1, D)
        for layer, kv in zip(self.decoder.layers, cache):  # each a pre-norm TransformerDecoderLayer
            attn = layer.self_attn
            q, k, v = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            kv["k"], kv["v"] = torch.cat([kv["k"], self._heads(k)], 2), torch.cat([kv["v"], self._heads(v)], 2)
            mixed = F.scaled_dot_product_attention(self._heads(q), kv["k"], kv["v"])  # causal: only the past is cached
            x = x + attn.out_proj(mixed.transpose(1, 2).flatten(2))
            cross, d = layer.multihead_attn, x.shape[-1]
            q = F.linear(layer.norm2(x), cross.in_proj_weight[:d], cross.in_proj_bias[:d])
            mixed = F.scaled_dot_product_attention(self._heads(q), kv["memory_k"], kv["memory_v"])
            x = x + cross.out_proj(mixed.transpose(1, 2).flatten(2))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        return self.lm_head(self.norm(x[:, 0])).masked_fill(self.never_emitted, float("-inf"))

    @staticmethod
    def reorder_cache(cache: list[dict], rows: torch.Tensor) -> None:
        """Keep the self-attention past of `rows` (beam search moved the hypotheses)."""
        for kv in cache:
            kv["k"], kv["v"] = kv["k"][rows], kv["v"][rows]


@torch.no_grad()
def sample(model: Captioner, visual_tokens: torch.Tensor, n: int, max_len: int, temperature: float = 1.0):
    """n sampled captions per image: tokens (B, n, T), scores (B, n) = sum of log-probs at temperature 1."""
    memory = model.encode(visual_tokens).repeat_interleave(n, dim=0)  # (B n, P, D)
    cache = model.start_cache(memory)
    N, device = memory.shape[0], memory.device
    tokens = torch.full((N, 1), model.bos, dtype=torch.long, device=device)
    scores = torch.zeros(N, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    for t in range(max_len):
        logits = model.step(cache, tokens[:, -1], t).float()  # (N, V)
        token = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)[:, 0]  # (N,)
        token = torch.where(finished, model.pad, token)
        scores += torch.where(finished, 0.0, F.log_softmax(logits, dim=-1).gather(1, token[:, None])[:, 0])
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        finished |= token == model.eos
        if finished.all():
            break
    B = visual_tokens.shape[0]
    return tokens[:, 1:].view(B, n, -1), scores.view(B, n)


def model_from_checkpoint(payload: dict, device: str) -> tuple[Captioner, Vocab]:
    """The captioner and vocabulary of a checkpoint's "config", "vocab" and "model" (its weights), on `device`."""
    model = Captioner(**payload["config"]).to(device)
    model.load_state_dict(payload["model"])
    return model, Vocab(payload["vocab"])
