"""A Llama-3-style decoder, read top to bottom.

It computes what Hugging Face `transformers`' `LlamaForCausalLM` computes: pre-RMSNorm blocks,
rotary position embeddings (optionally with Llama 3.1's frequency scaling), grouped-query
attention, a SwiGLU MLP, no biases, and an output layer that is tied to the token embedding
only when `model.tie_embeddings` says so. Compared with GPT-2 (`trainer/models/gpt2/model.py`)
there is no learned position table: positions enter only through the rotation of queries and
keys, so a pipeline stage without the embedding still knows every token's position.
`hf.py` beside this file converts weights to and from Hugging Face's layout (a plain copy
with other names); `__init__.py` tells the generic code where everything is.
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


def ffn_hidden(cfg: ModelConfig) -> int:
    """The SwiGLU hidden size, as Meta's reference computes it: 2/3 of 4*n_embd (SwiGLU has
    three matrices instead of two, so this keeps the MLP's parameter count), times
    `ffn_dim_multiplier`, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * cfg.n_embd / 3)
    if cfg.ffn_dim_multiplier is not None:
        hidden = int(cfg.ffn_dim_multiplier * hidden)
    return cfg.multiple_of * ((hidden + cfg.multiple_of - 1) // cfg.multiple_of)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """The rotation speed of each pair of head dimensions: theta^(-2i/head_dim), i.e. from one
    radian per position down to about 1/theta (float32, as transformers computes it).

    With `rope_scaling.factor` (Llama 3.1), the slow frequencies, whose wavelength exceeds
    `original_max_position_embeddings / low_freq_factor`, are divided by `factor`, the fast
    ones (wavelength below `original / high_freq_factor`) are kept, and those in between are
    interpolated smoothly: transformers' "llama3" rope_type.
    """
    dim = cfg.n_embd // cfg.n_head
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    s = cfg.rope_scaling
    if s.factor is None:
        return inv_freq
    old_context = s.original_max_position_embeddings
    low_freq_wavelen = old_context / s.low_freq_factor
    high_freq_wavelen = old_context / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def init_rule(name: str, cfg: ModelConfig) -> Init:
    """Llama init of parameter `name`: N(0, 0.02) for embeddings and linears, residual
    output projections (o_proj, down_proj) scaled by 1/sqrt(2*n_layer), norms at one."""
    if name.endswith("norm.weight"):
        return Init("ones")
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return Init("normal", 0.02 / math.sqrt(2 * cfg.n_layer))
    return Init("normal", 0.02)


class Rotary(nn.Module):
    """Rotary position embeddings (RoPE): each pair of a query's or key's dimensions is
    rotated by an angle proportional to the token's position, so the dot product of a query
    and a key depends only on how far apart they are.

    The cos/sin tables for positions 0 .. block_size-1 are computed once, in float32, and
    kept as non-persistent buffers (not in checkpoints; rebuilt by `reset_buffers`). One
    instance is shared by every block's attention, so the model holds one copy.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        half = (cfg.n_embd // cfg.n_head) // 2
        self.register_buffer("cos", torch.empty(cfg.block_size, half), persistent=False)
        self.register_buffer("sin", torch.empty(cfg.block_size, half), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        positions = torch.arange(self.cfg.block_size, dtype=torch.float)
        angles = positions[:, None] * rope_inv_freq(self.cfg)[None, :]  # (T, head_dim / 2)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(
        self, x: torch.Tensor, start: int, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`x` (B, T, heads, head_dim) at positions start .. start+T-1 (or at `positions`
        (B, T) when given: each packed document from 0), rotated.

        Hugging Face's convention (`rotate_half`): dimension i pairs with i + head_dim/2 (the
        first half of each head against the second). Meta's original checkpoints pair
        neighbours (2i, 2i+1) instead; transformers' converter permutes the q/k weights into
        this layout, so with the same convention here our conversion is a plain copy.
        """
        if positions is None:  # (context parallel: this rank's tokens' true positions)
            pos = token_positions(start, x.size(1), x.device)
            cos = self.cos[pos, None, :].to(x.dtype)  # (T, 1, head_dim / 2)
            sin = self.sin[pos, None, :].to(x.dtype)
        else:
            cos = self.cos[positions][:, :, None, :].to(x.dtype)  # (B, T, 1, head_dim / 2)
            sin = self.sin[positions][:, :, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean and the bias. Computed in float32,
    as in transformers, so bf16 activations are normalised without losing precision."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention (GQA): n_head query heads share n_kv_head key/value heads
    (each group of n_head / n_kv_head queries reads the same keys and values), which shrinks
    the KV cache and the k/v projections by that factor."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.n_embd // cfg.n_head
        kv_dim = cfg.kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.rotary = rotary  # shared by all blocks
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cache: LayerCache | None = None, docs: Documents | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # view(B, T, -1, head_dim): under tensor parallelism each rank holds only its heads
        # (n_head / tp query heads, n_kv_head / tp key/value heads).
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        start = cache.length if cache is not None else 0  # generating: after the cached tokens
        positions = docs.positions if docs is not None else None
        q, k = self.rotary(q, start, positions), self.rotary(k, start, positions)
        dropout_p = self.cfg.dropout if self.training else 0.0
        y = attend(q, k, v, self.cfg, dropout_p, cache, docs)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), a gated MLP; the gate decides, per hidden unit,
    how much of the up projection passes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden(cfg)
        self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    """Pre-RMSNorm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.layer_norm_eps)
        self.attn = Attention(cfg, rotary)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cache: LayerCache | None = None, docs: Documents | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache, docs)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    # final norm + output layer + loss: one function, which train.compile_loss replaces on
    # the instance by its compiled version (trainer/parallel/compile.py)
    head_loss = staticmethod(head_loss)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        rotary = Rotary(cfg)
        # A dict keyed "0", "1", ...: the same parameter names as a list, but a pipeline stage
        # can drop the blocks it does not run and keep every remaining name unchanged.
        self.blocks = nn.ModuleDict({str(i): Block(cfg, rotary) for i in range(cfg.n_layer)})
        self.final_norm = RMSNorm(cfg.n_embd, cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:  # Llama 3.2 1B/3B tie; 8B and larger do not
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) for embeddings and linears, residual output projections (o_proj,
        down_proj) scaled by 1/sqrt(2*n_layer), norms at one; the rotary tables rebuilt (they
        are buffers: after building on the meta device they must be computed again)."""
        for name, p in self.named_parameters():
            init_rule(name, self.cfg).apply_(p)
        for module in self.modules():
            if isinstance(module, Rotary):
                module.reset_buffers()

    def new_kv_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in range(self.cfg.n_layer)]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once). By default without the token embedding when it
        is a separate table (a lookup, no FLOPs); a tied one is the output layer and counts."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.cfg.tie_embeddings and self.tok_emb is not None:
            n -= self.tok_emb.weight.numel()
        return n

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
        and with `model.doc_positions=reset` each document's rotations start at position 0.
        Under pipeline parallelism a stage holds only some parts (the others are None): a
        stage without `tok_emb` takes hidden states instead of token ids, and a stage without
        `lm_head` returns hidden states.
        """
        start = kv_cache[0].length if kv_cache else 0
        if start + idx.size(1) > self.cfg.block_size:
            raise ValueError(
                f"sequence of {start + idx.size(1)} tokens exceeds "
                f"model.block_size={self.cfg.block_size}"
            )
        x = self.drop(self.tok_emb(idx)) if self.tok_emb is not None else idx
        docs = None  # (doc_mask is refused under pipeline parallel: later stages lack the ids)
        if self.cfg.doc_mask and not kv_cache and self.tok_emb is not None:
            docs = find_documents(idx, self.cfg, compute_dtype(idx.device, x.dtype))
        for name, block in self.blocks.items():
            x = block(x, kv_cache[int(name)] if kv_cache else None, docs)
        if self.lm_head is None:
            return x
        if targets is None:
            return head_logits(self.final_norm, self.lm_head, x, self.cfg.vocab_size)
        m = self.cfg
        return self.head_loss(
            self.final_norm, self.lm_head, x, targets, z_loss, m.vocab_size, m.loss_chunk_size
        )


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token: 6N for the weights plus attention's 12*L*d*T (PaLM, App. B;
    grouped-query attention shares keys/values but still scores n_head * head_dim = d)."""
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
