"""The GPT model against Hugging Face's GPT2LMHeadModel, its init, checkpointing and FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import ModelConfig, model_config
from trainer.hf import load_hf, save_hf
from trainer.models.gpt2.hf import from_hf_state_dict, to_hf_state_dict
from trainer.models.gpt2.model import GPT, flops_per_token
from trainer.parallel.activation_checkpointing import apply_activation_checkpointing

transformers = pytest.importorskip("transformers")

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


SHAPES = {
    "tiny": model_config(vocab_size=257),
    "gpt2_small": model_config(
        name="gpt2_small", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257
    ),
}


def hf_gpt2_config(cfg: ModelConfig):
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        layer_norm_epsilon=cfg.layer_norm_eps,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )


def new_hf(cfg: ModelConfig, seed: int):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(hf_gpt2_config(cfg)).eval()


def new_ours(cfg: ModelConfig, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def tokens(cfg: ModelConfig, batch: int = 2, length: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request):
    """(config, our random model, an independent random HF model) for one shape."""
    cfg = SHAPES[request.param]
    return cfg, new_ours(cfg, seed=0), new_hf(cfg, seed=1)


def batch_for(cfg: ModelConfig) -> torch.Tensor:
    # gpt2_small: one short sequence keeps the forward cheap on a CPU.
    return tokens(cfg, batch=1, length=16) if cfg.n_layer > 6 else tokens(cfg, batch=2, length=64)


@torch.no_grad()
def test_ours_to_hf_logits(pair):
    cfg, ours, _ = pair
    hf = new_hf(cfg, seed=2)
    result = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"}  # tied to wte
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    x = batch_for(cfg)
    assert max_diff(ours(x), hf(x).logits) <= TOL


@torch.no_grad()
def test_hf_to_ours_logits(pair):
    cfg, _, hf = pair
    ours = new_ours(cfg, seed=3)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    assert ours.lm_head.weight is ours.tok_emb.weight
    x = batch_for(cfg)
    assert max_diff(ours(x), hf(x).logits) <= TOL


@torch.no_grad()
def test_save_hf_from_pretrained_and_load_hf(pair, tmp_path):
    cfg, ours, _ = pair
    folder = save_hf(ours, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert hf.config.n_positions == cfg.block_size
    assert hf.config.vocab_size == cfg.vocab_size
    x = batch_for(cfg)
    assert max_diff(ours(x), hf(x).logits) <= TOL

    back = load_hf(folder)
    assert back.cfg.n_layer == cfg.n_layer and back.cfg.block_size == cfg.block_size
    assert back.lm_head.weight is back.tok_emb.weight
    mine, theirs = ours.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


def test_loss_matches_hf():
    cfg = SHAPES["tiny"]
    ours = new_ours(cfg, seed=4)
    hf = new_hf(cfg, seed=5)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    x = tokens(cfg, batch=3, length=40, seed=1)
    with torch.no_grad():
        # HF shifts labels inside; ours takes targets already shifted by one.
        assert abs(ours(x[:, :-1], x[:, 1:]).item() - hf(x, labels=x).loss.item()) <= TOL
        # -100 is ignored by both.
        labels = x.clone()
        labels[0, 5:20] = -100
        labels[2, :30] = -100
        ours_loss = ours(x[:, :-1], labels[:, 1:]).item()
        assert abs(ours_loss - hf(x, labels=labels).loss.item()) <= TOL
    # And it is the mean cross-entropy of the logits.
    logits = ours(x[:, :-1])
    manual = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    assert abs(ours(x[:, :-1], x[:, 1:]).item() - manual.item()) <= 1e-6


def test_gpt2_init_statistics():
    cfg = model_config(n_layer=8, n_head=4, n_embd=256, block_size=256, vocab_size=1024)
    model = new_ours(cfg, seed=6)
    assert model.lm_head.weight is model.tok_emb.weight
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    seen = set()
    for name, p in model.named_parameters():
        seen.add(name)
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif ".ln_" in name or name.startswith("ln_"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            expected = (
                resid_std if name.endswith(("attn.o_proj.weight", "mlp.proj.weight")) else 0.02
            )
            std, mean = p.std().item(), p.mean().item()
            assert abs(std - expected) <= 0.05 * expected, (name, std, expected)
            assert abs(mean) <= 0.05 * expected, (name, mean)
    # Every kind of parameter was checked (lm_head is tok_emb, so it is listed once).
    assert "lm_head.weight" not in seen
    assert {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias"} <= seen
    assert {"blocks.7.attn.o_proj.weight", "blocks.7.mlp.proj.weight"} <= seen


def count_calls(module: torch.nn.Module) -> list[int]:
    """A list that grows by one each time `module.forward` runs (recomputation included:
    module hooks do not fire there)."""
    calls: list[int] = []
    forward = module.forward
    module.forward = lambda *args: (calls.append(1), forward(*args))[1]
    return calls


def test_activation_checkpointing_same_loss_and_grads():
    """Applied from outside (trainer.parallel): the blocks really recompute (each MLP runs
    twice per step), and loss and gradients are unchanged."""
    cfg = model_config(n_layer=3, n_head=2, n_embd=32, block_size=32, vocab_size=97)
    x = tokens(cfg, batch=2, length=32, seed=2)
    runs = []
    for checkpointing in (False, True):
        model = new_ours(cfg, seed=7).train()
        if checkpointing:
            apply_activation_checkpointing(model.blocks)
        calls = count_calls(model.blocks["0"].mlp)
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)
        runs.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert abs(loss_a - loss_b) <= 1e-6
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert max_diff(grads_a[name], grads_b[name]) <= 1e-6, name
    assert any(g.abs().sum() > 0 for g in grads_a.values())


def test_sequence_longer_than_block_size_raises():
    cfg = model_config(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50)
    model = new_ours(cfg, seed=8)
    model(tokens(cfg, batch=1, length=8))  # exactly block_size is fine
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(cfg, batch=1, length=9))


def test_param_count_and_flops(pair):
    cfg, ours, hf = pair
    unique = {p.data_ptr(): p.numel() for p in hf.parameters()}
    assert ours.num_params(non_embedding=False) == sum(unique.values())
    assert ours.num_params() == sum(unique.values()) - cfg.block_size * cfg.n_embd
    if cfg.vocab_size == 50257:
        assert ours.num_params(non_embedding=False) == 124_439_808  # GPT-2 small, published
    n = ours.num_params()
    expected = 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert flops_per_token(cfg, n) == expected
