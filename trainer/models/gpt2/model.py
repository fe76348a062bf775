"""GPT-2, read top to bottom.

It computes exactly what Hugging Face `transformers`' `GPT2LMHeadModel` computes (learned
positions, pre-LayerNorm blocks, tanh-GELU MLP, tied token embedding / unembedding) with one
layout change that later parallelism needs: query, key and value are three `nn.Linear`s instead
of one fused `c_attn`, so tensor parallelism can split each of them by heads.
`hf.py` beside this file converts weights to and from Hugging Face's layout; `__init__.py`
tells the generic code (parallelism, checkpoints, export) where everything is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.models.attention import (
    Documents,
    LayerCache,
    attend,
    compute_dtype,
    find_documents,
    token_positions,
)
from trainer.models.head import head_logits, head_loss
from trainer.models.init import Init
from trainer.models.loss import LossTerms


def init_rule(name: str, cfg: ModelConfig) -> Init:
    """GPT-2 init of parameter `name`: N(0, 0.02) for weights, residual projections (o_proj,
    mlp.proj) scaled by 1/sqrt(2*n_layer), LayerNorm weights one, biases zero."""
    if name.endswith("bias"):
        return Init("zeros")
    if ".ln_" in name or name.startswith("ln_"):
        return Init("ones")
    if name.endswith(("o_proj.weight", "mlp.proj.weight")):
        return Init("normal", 0.02 / math.sqrt(2 * cfg.n_layer))
    return Init("normal", 0.02)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cache: LayerCache | None = None, docs: Documents | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # view(B, T, -1, head_dim): under tensor parallelism each rank holds only its heads.
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        dropout_p = self.cfg.dropout if self.training else 0.0
        y = attend(q, k, v, self.cfg, dropout_p, cache, docs)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cache: LayerCache | None = None, docs: Documents | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, docs)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    # final norm + output layer + loss: one function, which train.compile_loss replaces on
    # the instance by its compiled version (trainer/parallel/compile.py)
    head_loss = staticmethod(head_loss)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        # A dict keyed "0", "1", ...: the same parameter names as a list, but a pipeline stage
        # can drop the blocks it does not run and keep every remaining name unchanged.
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying, as in GPT-2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each parameter by :func:`init_rule`, from the global RNG (a model built on the
        meta device is initialised by trainer/models/init.py instead, per parameter)."""
        for name, p in self.named_parameters():
            init_rule(name, self.cfg).apply_(p)

    def new_kv_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in range(self.cfg.n_layer)]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once); without position embeddings by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: list[LayerCache] | None = None,
        z_loss: float | None = None,
    ) -> torch.Tensor | LossTerms:
        """Logits (B, T, vocab), or the mean cross-entropy loss when `targets` are given;
        with `z_loss` too (training), the loss terms (trainer/models/loss.py).

        Targets equal to -100 are ignored. With `kv_cache`, `idx` continues the cached tokens.
        With `model.doc_mask` (and no cache) attention stays inside each document of `idx`,
        and with `model.doc_positions=reset` each document's positions start at 0.
        Under pipeline parallelism a stage holds only some parts (the others are None): a
        stage without `tok_emb` takes hidden states instead of token ids, and a stage without
        `lm_head` returns hidden states.
        """
        if self.tok_emb is not None:
            start = kv_cache[0].length if kv_cache else 0
            T = idx.size(1)
            if start + T > self.cfg.block_size:
                raise ValueError(
                    f"sequence of {start + T} tokens exceeds model.block_size={self.cfg.block_size}"
                )
            docs = None
            if self.cfg.doc_mask and not kv_cache:
                dtype = compute_dtype(idx.device, self.tok_emb.weight.dtype)
                docs = find_documents(idx, self.cfg, dtype)
            if docs is not None and docs.positions is not None:
                pos = docs.positions  # (B, T): each document from position 0
            else:
                pos = token_positions(start, T, idx.device)  # (context parallel: its own)
            x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        else:
            x, docs = idx, None  # (doc_mask is refused under pipeline parallel)
        for name, block in self.blocks.items():
            x = block(x, kv_cache[int(name)] if kv_cache else None, docs)
        if self.lm_head is None:
            return x
        if targets is None:
            return head_logits(self.ln_f, self.lm_head, x, self.cfg.vocab_size)
        m = self.cfg
        return self.head_loss(
            self.ln_f, self.lm_head, x, targets, z_loss, m.vocab_size, m.loss_chunk_size
        )


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token: 6N for the weights plus attention's 12*L*d*T (PaLM, App. B)."""
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
