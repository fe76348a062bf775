"""The Llama model against Hugging Face's LlamaForCausalLM: logits both ways, rotary scaling,
the KV cache with grouped-query attention, greedy generation, the SwiGLU width of the
published presets, config.json both ways, parameter counts, init and pipeline stages.

Every transformers model here is built from a LlamaConfig with random weights (no download),
in float32 and eval mode. The Llama 3.2 1B shape is cut to 2 layers and a 1024-token
vocabulary (instead of 128256) to keep it fast on a CPU; every other dimension is the
published one (2048 wide, 32 heads / 8 key-value heads, SwiGLU 8192, RoPE theta 500000 with
Llama-3.1 scaling factor 32, tied embeddings).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from jobs.cli import compose_config
from trainer.config import ModelConfig, model_config
from trainer.models.llama import SPEC
from trainer.models.llama.hf import (
    SHAPE_KEYS,
    from_hf_state_dict,
    hf_config,
    model_keys,
    to_hf_state_dict,
    unsupported,
)
from trainer.models.llama.model import (
    Llama,
    Rotary,
    ffn_hidden,
    flops_per_token,
    rope_inv_freq,
)

transformers = pytest.importorskip("transformers")

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def preset(name: str, **overrides) -> ModelConfig:
    """A model preset as the command line composes it (data=dummy: vocabulary 257)."""
    tree = compose_config("train", [f"model={name}", "data=dummy"])
    return model_config(OmegaConf.to_container(tree.model, resolve=True), **overrides)


# The 1B slice: positions up to 512 (past original_max_position_embeddings / factor = 256,
# where Llama 3.1's scaled frequencies start to matter most).
SLICE_1B = dict(n_layer=2, vocab_size=1024, block_size=512)
SHAPES = {
    "llama_tiny": lambda: preset("llama_tiny"),  # GQA 6/2, untied, vocabulary 257
    "llama3_1b_2layers": lambda: preset("llama3_1b", **SLICE_1B),  # tied, rope scaling
}


def new_hf(cfg: ModelConfig, seed: int):
    """transformers' model from the config.json we write for `cfg`."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**json.loads(json.dumps(hf_config(cfg, None))))
    return transformers.LlamaForCausalLM(config).float().eval()


def new_ours(cfg: ModelConfig, seed: int) -> Llama:
    torch.manual_seed(seed)
    return Llama(cfg).eval()


def tokens(cfg: ModelConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


def batch_for(cfg: ModelConfig) -> torch.Tensor:
    # The 1B slice: one sequence long enough for the scaled rotary frequencies to matter.
    return tokens(cfg, 1, 320) if cfg.n_embd > 1024 else tokens(cfg, 2, cfg.block_size)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.fixture(
    scope="module",
    params=["llama_tiny", pytest.param("llama3_1b_2layers", marks=pytest.mark.slow)],
)
def shape(request) -> ModelConfig:
    return SHAPES[request.param]()


@torch.no_grad()
def test_ours_to_hf_logits(shape):
    """Export: our random weights in transformers' model (strict: every tensor, no extra)."""
    cfg = shape
    ours = new_ours(cfg, seed=0)
    hf = new_hf(cfg, seed=1)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    x = batch_for(cfg)
    logits = ours(x)
    diff = max_diff(logits, hf(x).logits)
    print(f"export {cfg.name}: max |diff| {diff:.2e}")
    assert diff <= TOL
    if cfg.rope_scaling.factor is not None:  # the scaling shows in the logits
        unscaled = Rotary(replace(cfg, rope_scaling=replace(cfg.rope_scaling, factor=None)))
        rotary = ours.blocks["0"].attn.rotary
        rotary.cos, rotary.sin = unscaled.cos, unscaled.sin
        changed = max_diff(ours(x), logits)
        print(f"export {cfg.name}: without rope scaling the logits move by {changed:.2e}")
        assert changed > 1e-3


@torch.no_grad()
def test_hf_to_ours_logits(shape):
    """Import: transformers' random weights in our model, its config read by model_keys."""
    hf = new_hf(shape, seed=2)
    cfg = model_config(model_keys(hf.config.to_dict()))
    assert ffn_hidden(cfg) == hf.config.intermediate_size
    ours = new_ours(cfg, seed=3)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    assert (ours.lm_head.weight is ours.tok_emb.weight) == shape.tie_embeddings
    x = batch_for(shape)
    diff = max_diff(ours(x), hf(x).logits)
    print(f"import {shape.name}: max |diff| {diff:.2e}")
    assert diff <= TOL


# meta-llama/Llama-3.2-1B's config.json, cut to 2 layers and a 1024-token vocabulary.
PUBLISHED_1B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1000,
    "eos_token_id": 1001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 2,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "use_cache": True,
    "vocab_size": 1024,
}


def test_published_config_reads_as_the_preset():
    """The published 1B config.json gives the preset's model (the SwiGLU keys may differ in
    form but not in size), and so does transformers' own 5.x form of it (rope_parameters)."""
    assert unsupported(PUBLISHED_1B) is None
    ours = model_config(model_keys(PUBLISHED_1B))
    want = preset("llama3_1b", **SLICE_1B)
    for key in ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "tie_embeddings"):
        assert getattr(ours, key) == getattr(want, key), key
    assert ours.rope_theta == want.rope_theta and ours.rope_scaling == want.rope_scaling
    assert ffn_hidden(ours) == ffn_hidden(want) == 8192
    assert ours.block_size == 131072 and ours.layer_norm_eps == 1e-5
    assert torch.equal(rope_inv_freq(ours), rope_inv_freq(want))
    v5 = transformers.LlamaConfig(**PUBLISHED_1B).to_dict()
    assert model_keys(v5) == model_keys(PUBLISHED_1B)
    for key, value in SHAPE_KEYS.items():
        assert getattr(ours, key) == PUBLISHED_1B[value], key


def test_unsupported_configs():
    base = dict(PUBLISHED_1B)
    assert "hidden_act" in unsupported({**base, "hidden_act": "gelu"})
    assert "attention_bias" in unsupported({**base, "attention_bias": True})
    assert "mlp_bias" in unsupported({**base, "mlp_bias": True})
    assert "head_dim" in unsupported({**base, "head_dim": 128})
    yarn = {**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    assert "yarn" in unsupported(yarn)
    assert unsupported({**base, "rope_scaling": None}) is None


@pytest.mark.slow
@torch.no_grad()
def test_published_config_import_logits():
    """transformers' model built from the published (cut) config, imported through
    model_keys: logits equal at positions up to 320."""
    torch.manual_seed(4)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**PUBLISHED_1B)).eval()
    cfg = model_config(model_keys(PUBLISHED_1B))
    ours = new_ours(cfg, seed=5)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    x = tokens(cfg, 1, 320)
    diff = max_diff(ours(x), hf(x).logits)
    print(f"import published 1B config: max |diff| {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("name", ["llama3_1b", "llama3_8b", "llama_tiny"])
def test_rope_inv_freq_equals_transformers(name):
    """inv_freq exactly as transformers' rope init ("llama3" with scaling, "default" without),
    and the scaling really changes the slow frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = preset(name)
    config = transformers.LlamaConfig(**hf_config(cfg, None))
    kind = config.rope_parameters["rope_type"]
    if cfg.rope_scaling.factor is None:
        assert kind == "default"
        theirs = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config).inv_freq
        assert torch.equal(rope_inv_freq(cfg), theirs)
        return
    assert kind == "llama3"
    theirs, scale = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert scale == 1.0
    assert torch.equal(rope_inv_freq(cfg), theirs)
    plain = rope_inv_freq(replace(cfg, rope_scaling=replace(cfg.rope_scaling, factor=None)))
    changed = rope_inv_freq(cfg) != plain
    assert changed.any() and not changed.all()  # fast frequencies kept, slow ones scaled


@torch.no_grad()
def test_kv_cache_equals_full_forward_gqa():
    """Prefill then one token at a time (positions from the cache length) gives the logits of
    one full forward, with grouped-query attention and rotary scaling."""
    for cfg in (
        preset("llama_tiny"),
        preset(
            "llama_tiny",
            n_kv_head=3,
            tie_embeddings=True,
            rope_scaling={"factor": 8.0, "original_max_position_embeddings": 64},
        ),
    ):
        assert cfg.kv_heads < cfg.n_head
        model = new_ours(cfg, seed=6)
        x = tokens(cfg, 2, 100, seed=1)
        full = model(x)
        cache = model.new_kv_cache()
        steps = [model(x[:, :37], kv_cache=cache)]
        steps += [model(x[:, t : t + 1], kv_cache=cache) for t in range(37, x.size(1))]
        assert cache[0].length == x.size(1)
        assert cache[0].k.size(2) == cfg.kv_heads  # the cache holds only the kv heads
        diff = max_diff(torch.cat(steps, dim=1), full)
        print(f"kv cache {cfg.n_head}/{cfg.kv_heads} heads: max |diff| {diff:.2e}")
        assert diff <= TOL
        with pytest.raises(ValueError, match="block_size"):
            model(x[:, :1], kv_cache=cache_of(model, cfg.block_size))
        with pytest.raises(ValueError, match="block_size"):
            model(tokens(cfg, 1, cfg.block_size + 1))


def cache_of(model: Llama, length: int):
    """A cache already holding `length` tokens."""
    cache = model.new_kv_cache()
    model(torch.zeros(1, length, dtype=torch.long), kv_cache=cache)
    return cache


@torch.no_grad()
def greedy(model: Llama, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with our KV cache: the prompt once, then one token at a time."""
    cache = model.new_kv_cache()
    logits = model(prompt, kv_cache=cache)
    out = prompt
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        out = torch.cat([out, token], dim=1)
        logits = model(token, kv_cache=cache)
    return out


@pytest.mark.parametrize("scaled", [False, True])
@torch.no_grad()
def test_greedy_generation_equals_transformers(scaled):
    extra = {"rope_scaling": {"factor": 8.0, "original_max_position_embeddings": 64}}
    cfg = preset("llama_tiny", **(extra if scaled else {}))
    hf = new_hf(cfg, seed=7)
    ours = new_ours(cfg, seed=8)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    prompt = tokens(cfg, 2, 20, seed=2)
    theirs = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
    )
    mine = greedy(ours, prompt, 12)
    assert mine.shape == (2, 32)
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize(
    ("name", "hidden"), [("llama3_1b", 8192), ("llama3_3b", 8192), ("llama3_8b", 14336)]
)
def test_ffn_hidden_of_published_presets(name, hidden):
    assert ffn_hidden(preset(name)) == hidden
    assert hf_config(preset(name), None)["intermediate_size"] == hidden


@pytest.mark.parametrize(
    ("n_embd", "intermediate"),
    [
        (2048, 8192),  # Llama 3.2 1B
        (3072, 8192),  # Llama 3.2 3B
        (4096, 14336),  # Llama 3.1 8B
        (8192, 28672),  # Llama 3.1 70B
        (4096, 11008),  # Llama 2 7B
        (192, 512),  # llama_tiny
        (200, 700),  # odd, above 8/3 * n_embd = 533
        (2048, 1000),  # odd, below 8/3 * n_embd = 5461
        (96, 2),
    ],
)
def test_intermediate_size_round_trips(n_embd, intermediate):
    d = {**PUBLISHED_1B, "hidden_size": n_embd, "intermediate_size": intermediate}
    d.update(num_attention_heads=2, num_key_value_heads=1, head_dim=n_embd // 2)
    assert unsupported(d) is None
    cfg = model_config(model_keys(d))
    assert ffn_hidden(cfg) == intermediate
    assert hf_config(cfg, None)["intermediate_size"] == intermediate
    assert model_keys(hf_config(cfg, None)) == model_keys(d) | {"block_size": cfg.block_size}


def test_hf_config_loads_in_transformers():
    """Our config.json (through JSON) is a LlamaConfig with our values, eos/bos from eot_id,
    and the exported state dict loads strictly (tied and untied)."""
    for cfg in (preset("llama_tiny"), preset("llama_tiny", tie_embeddings=True)):
        d = json.loads(json.dumps(hf_config(cfg, 256)))
        assert d["model_type"] == "llama" and d["architectures"] == ["LlamaForCausalLM"]
        config = transformers.LlamaConfig(**d)
        assert config.num_key_value_heads == 2 and config.intermediate_size == 512
        assert config.tie_word_embeddings == cfg.tie_embeddings
        assert config.eos_token_id == config.bos_token_id == 256
        assert config.max_position_embeddings == cfg.block_size
        assert config.rms_norm_eps == cfg.layer_norm_eps
        hf = transformers.LlamaForCausalLM(config)
        state = to_hf_state_dict(new_ours(cfg, seed=9).state_dict(), cfg)
        hf.load_state_dict(state, strict=True)
        # With tied weights, save_pretrained leaves lm_head.weight out: import does without.
        if cfg.tie_embeddings:
            state.pop("lm_head.weight")
        Llama(cfg).load_state_dict(from_hf_state_dict(state, cfg), strict=True)
    assert hf_config(preset("llama_tiny"), 5000)["eos_token_id"] is None  # outside the vocab
    scaled = hf_config(preset("llama3_8b"), None)
    assert scaled["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert scaled["rope_theta"] == 500000.0 and scaled["tie_word_embeddings"] is False
    assert hf_config(preset("llama_tiny"), None)["rope_scaling"] is None


def test_untied_import_needs_lm_head():
    cfg = preset("llama_tiny")
    state = to_hf_state_dict(new_ours(cfg, seed=10).state_dict(), cfg)
    del state["lm_head.weight"]
    with pytest.raises(KeyError, match="lm_head"):
        from_hf_state_dict(state, cfg)


def test_num_params_counts_tied_weights_once():
    for tied in (False, True):
        cfg = preset("llama_tiny", tie_embeddings=tied)
        model = new_ours(cfg, seed=11)
        d, v, hidden, kv = cfg.n_embd, cfg.vocab_size, ffn_hidden(cfg), cfg.kv_heads
        head_dim = d // cfg.n_head
        per_block = 2 * d * d + 2 * d * kv * head_dim + 3 * d * hidden + 2 * d
        total = cfg.n_layer * per_block + d + v * d * (1 if tied else 2)
        assert model.num_params(non_embedding=False) == total
        assert model.num_params() == (total if tied else total - v * d)
        hf = new_hf(cfg, seed=12)
        assert sum(p.numel() for p in hf.parameters()) == total
        assert (model.lm_head.weight is model.tok_emb.weight) == tied


def test_init_statistics_and_rotary_buffers():
    cfg = preset("llama_tiny", n_layer=8, vocab_size=1024)
    model = new_ours(cfg, seed=13)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in model.named_parameters():
        assert not name.endswith("bias"), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        expected = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        assert abs(p.std().item() - expected) <= 0.05 * expected, name
    # The rotary tables: one shared instance, not in the state dict, rebuilt after meta init.
    rotaries = {id(b.attn.rotary) for b in model.blocks.values()}
    assert len(rotaries) == 1
    assert not any("rotary" in k for k in model.state_dict())
    with torch.device("meta"):
        lazy = Llama(cfg)
    lazy.to_empty(device="cpu")
    lazy.reset_parameters()
    ref = model.blocks["0"].attn.rotary
    assert torch.equal(lazy.blocks["3"].attn.rotary.cos, ref.cos)
    assert torch.equal(lazy.blocks["3"].attn.rotary.sin, ref.sin)


@torch.no_grad()
def test_pipeline_stages_keep_positions():
    """Split as a pipeline does (first-stage parts None on the last stage, last-stage parts
    None on the first): stage 1 of stage 0's hidden states gives the full model's logits."""
    cfg = preset("llama_tiny", rope_scaling={"factor": 8.0, "original_max_position_embeddings": 64})
    model = new_ours(cfg, seed=14)
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    for name in ("3", "4", "5"):
        del first.blocks[name]
    for name in ("0", "1", "2"):
        del last.blocks[name]
    for attr in SPEC.last_stage:
        setattr(first, attr, None)
    for attr in SPEC.first_stage:
        setattr(last, attr, None)
    x = tokens(cfg, 2, cfg.block_size, seed=3)
    hidden = first(x)
    assert hidden.shape == (2, cfg.block_size, cfg.n_embd)
    assert max_diff(last(hidden), model(x)) == 0.0


def test_loss_matches_hf_and_ignores_minus_100():
    cfg = preset("llama_tiny")
    ours = new_ours(cfg, seed=15)
    hf = new_hf(cfg, seed=16)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    x = tokens(cfg, 3, 40, seed=4)
    labels = x.clone()
    labels[0, 5:20] = -100
    with torch.no_grad():
        assert abs(ours(x[:, :-1], x[:, 1:]).item() - hf(x, labels=x).loss.item()) <= TOL
        assert abs(ours(x[:, :-1], labels[:, 1:]).item() - hf(x, labels=labels).loss.item()) <= TOL
    loss = ours.train()(x[:, :-1], x[:, 1:])
    loss.backward()
    assert all(p.grad is not None for p in ours.parameters())


def test_spec_plan_layout_and_flops():
    cfg = preset("llama_tiny")
    block = Llama(cfg).blocks["0"]
    plan = SPEC.tp_block_plan(cfg)
    assert set(plan) == {
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
    for name in plan:
        assert isinstance(block.get_submodule(name), torch.nn.Linear), name
    assert {n for n, _ in block.named_parameters()} == {f"{n}.weight" for n in plan} | {
        "attn_norm.weight",
        "mlp_norm.weight",
    }
    layout = OmegaConf.create({"tp": 3})
    assert "512" in SPEC.check_layout(cfg, layout)  # 512 hidden units, 3 ranks
    assert SPEC.check_layout(cfg, OmegaConf.create({"tp": 2})) is None
    model = Llama(cfg)
    for attr in SPEC.first_stage + SPEC.last_stage + (SPEC.layers, SPEC.embedding, SPEC.output):
        assert getattr(model, attr) is not None, attr
    n = model.num_params()
    assert SPEC.flops_per_token(cfg, n) == flops_per_token(cfg, n)
    assert flops_per_token(cfg, n) == 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert SPEC.tied(preset("llama3_1b")) == (("tok_emb.weight", "lm_head.weight"),)
    assert SPEC.tied(cfg) == ()
    for key in SPEC.shape_keys:
        assert key.startswith("model.") and hasattr(cfg, key.removeprefix("model.")), key
