"""Sampling text from a trained model: temperature, top-k, top-p, with a KV cache.

With the cache, the prompt is run once ("prefill") and then each step feeds only the newest
token, reusing every earlier token's keys and values instead of recomputing them.
"""

from __future__ import annotations

import torch
from torch import nn


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p probability mass."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the mass *before* it already reaches top_p (keeps at least one).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, vocab) logits -> (B, 1) token ids; temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop_id: int | None = None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Continue `prompt` (B, T) by up to `max_new_tokens` tokens; returns prompt + new tokens.

    Past `model.cfg.block_size` tokens only the most recent window is seen (learned positions
    cannot go further); there the cache is rebuilt from the window each step.
    `vocab_limit` restricts sampling to ids below it (a model vocabulary padded past the
    tokenizer's must never emit the padding ids).
    """
    model.eval()
    block = model.cfg.block_size
    tokens = prompt
    cache = None
    for _ in range(max_new_tokens):
        if use_cache and tokens.size(1) <= block:
            if cache is None:  # prefill: the whole prompt at once
                cache = model.new_kv_cache()
                logits = model(tokens, kv_cache=cache)
            else:  # decode: only the newest token
                logits = model(tokens[:, -1:], kv_cache=cache)
        else:
            cache = None
            logits = model(tokens[:, -block:])
        token = next_token(logits[:, -1, :vocab_limit], temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, token], dim=1)
        if stop_id is not None and bool((token == stop_id).all()):
            break
    return tokens
