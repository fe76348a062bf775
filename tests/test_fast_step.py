"""The fast training step's pieces that run on CPU (issue 12, items 3, 4, 5, 7):

- the attention kernel is chosen on the dtype of q, so under autocast a flash kernel (here a
  stand-in: flash-attn needs CUDA) is picked and called by a model forward;
- foreach gradient clipping equals the per-parameter clipping it replaced, in every layout;
- AdamW groups hold one kind of parameter each (plain, or DTensor of one mesh and placement),
  so it runs with foreach in every layout, tensor parallel included;
- DDP buckets hold the gradients (gradient_as_bucket_view); Python's garbage collector stays
  out of the step and collects on log steps only.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ConfigError, model_config
from trainer.models import attention, build_model

SMALL = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64)
ARCHS = {
    "gpt2": dict(SMALL),
    "llama": dict(SMALL, arch="llama", n_kv_head=2, tie_embeddings=False, multiple_of=16),
}


# --- the attention kernel -----------------------------------------------------------------


class StandInFlash:
    """flash_attn_func computed with SDPA ((B, T, heads, D) in and out, GQA, causal), which
    records the dtype of every q it is given."""

    def __init__(self) -> None:
        self.q_dtypes: list[torch.dtype] = []

    def __call__(self, q, k, v, dropout_p: float = 0.0, causal: bool = False) -> torch.Tensor:
        self.q_dtypes.append(q.dtype)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal, enable_gqa=k.size(1) != q.size(1)
        )
        return y.transpose(1, 2)


@pytest.fixture
def flash(monkeypatch) -> StandInFlash:
    """flash-attn "installed" and running on the CPU: the stand-in kernel."""
    kernel = StandInFlash()
    monkeypatch.setattr(attention, "flash_attn_func", kernel)
    monkeypatch.setattr(attention, "FLASH_DEVICES", ("cuda", "cpu"))
    return kernel


def new_model(arch: str, **keys: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_config(**ARCHS[arch], **keys)).eval()


def tokens() -> torch.Tensor:
    return torch.randint(
        0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_decides_on_q_under_autocast(arch: str, flash: StandInFlash) -> None:
    """Under autocast a block's attention gets an fp32 input (LayerNorm/RMSNorm output) while
    q is bf16: the gate looks at q, picks flash, and the model's forward calls it."""
    model = new_model(arch)
    block_inputs: list[torch.dtype] = []
    for block in model.blocks.values():
        block.attn.register_forward_pre_hook(lambda m, args: block_inputs.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(tokens())
        reference = new_model(arch, attention="sdpa")(tokens())
    assert block_inputs == [torch.float32] * SMALL["n_layer"]  # what the old gate looked at
    assert flash.q_dtypes == [torch.bfloat16] * SMALL["n_layer"]  # what the kernel receives
    torch.testing.assert_close(got, reference, atol=2e-2, rtol=0)  # bf16 logits


def test_flash_runs_under_autocast_and_refuses_fp32(flash: StandInFlash) -> None:
    model = new_model("gpt2", attention="flash")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens())  # it used to raise here: the block input is fp32
    assert len(flash.q_dtypes) == SMALL["n_layer"]
    with pytest.raises(ConfigError, match=r"^model\.attention=flash needs [^\n]*$"):
        with torch.no_grad():
            model(tokens())  # fp32 compute: flash-attn has no fp32 kernel


@pytest.mark.parametrize("choice", ["flash", "cudnn"])
def test_unavailable_kernel_is_a_one_line_error(choice: str) -> None:
    """Without flash-attn (or a CUDA GPU), asking for it names the key and what it needs."""
    model = new_model("gpt2", attention=choice)
    with pytest.raises(ConfigError, match=rf"^model\.attention={choice} needs [^\n]*$"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens())


def test_choose_kernel(flash: StandInFlash) -> None:
    """The one table of choices (CPU here; flash runs on it through the stand-in)."""
    cpu, bf16, fp32 = torch.device("cpu"), torch.bfloat16, torch.float32

    def choose(setting: str, dtype: torch.dtype, packed: bool = False, **keys) -> str:
        cfg = model_config(**SMALL, attention=setting, **keys)
        return attention.choose_kernel(cfg, cpu, dtype, packed)

    assert choose("auto", bf16) == "flash"
    assert choose("auto", fp32) == "sdpa"  # flash-attn has no fp32 kernel
    assert choose("sdpa", bf16) == "sdpa"
    assert choose("auto", bf16, packed=True) == "flash"  # varlen: one sequence per document
    assert choose("sdpa", bf16, packed=True) == "sdpa"  # a boolean mask
    assert choose("auto", fp32, packed=True) == "sdpa"  # no flex on CPU


def test_kv_cache_through_flash(flash: StandInFlash, monkeypatch) -> None:
    """Generating with the KV cache through the flash kernel gives the logits of a full
    forward (the stand-in also takes fp32 here, so the comparison is exact to rounding)."""
    monkeypatch.setattr(attention, "HALF_PRECISION", (torch.float32,))
    model, idx = new_model("llama"), tokens()
    with torch.no_grad():
        full = model(idx)
        flash.q_dtypes.clear()
        cache = model.new_kv_cache()
        steps = [model(idx[:, :8], kv_cache=cache)]  # the prompt, then one token at a time
        steps += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(8, idx.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert len(flash.q_dtypes) == SMALL["n_layer"] * (1 + idx.size(1) - 8)
