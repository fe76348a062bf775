"""Document-masked attention (`model.doc_mask`): a window that packs several documents computes,
token for token, what each document computes alone; the mask reaches every kernel's form, the
layouts, generation and a training run on a prepared dataset; bad settings fail in one line."""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from multiproc import run_jobs
from test_loader import make_dataset

from trainer import generate
from trainer.config import ConfigError, load_config, model_config, resolve_config
from trainer.models import attention, build_model
from trainer.models.attention import Documents, attend_documents, find_documents
from trainer.run_dir import CONFIG, METRICS, read_jsonl
from trainer.train import run

pytestmark = pytest.mark.usefixtures("one_thread")

EOT = 7  # the end-of-text id of the hand-made windows below
VOCAB = 32
SMALL = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=VOCAB, eot_id=EOT)
ARCHS = {
    "gpt2": dict(SMALL),
    "llama": dict(SMALL, arch="llama", n_kv_head=2, tie_embeddings=False, multiple_of=16),
}
# fp32 on CPU: a packed document and the same document alone differ only by rounding
# (measured: at most 1.2e-7 on these logits; without the mask the later documents move by
# 0.13 (llama) to 0.33 (gpt2)).
TOL = 1e-6


def document(length: int, seed: int, ended: bool = True) -> torch.Tensor:
    """A random document of `length` tokens, its last one EOT when `ended` (no EOT inside)."""
    body = torch.randint(0, VOCAB - 1, (length,), generator=torch.Generator().manual_seed(seed))
    body[body >= EOT] += 1  # every id but EOT
    if ended:
        body[-1] = EOT
    return body


# Two windows of 20 tokens, as packing cuts them: the last document of each is cut off by
# the window's end (no EOT); the second holds a one-token document (just an EOT).
WINDOWS = [
    [document(6, 1), document(14, 2, ended=False)],
    [document(3, 3), document(1, 4), document(9, 5), document(7, 6, ended=False)],
]


def packed() -> torch.Tensor:
    return torch.stack([torch.cat(w) for w in WINDOWS])


def new_model(arch: str, seed: int = 0, **keys: Any):
    torch.manual_seed(seed)
    return build_model(model_config(**ARCHS[arch], **keys)).eval()


@torch.no_grad()
def logits_alone(model) -> list[torch.Tensor]:
    """Each window's logits with every document run through the model on its own."""
    return [torch.cat([model(doc[None])[0] for doc in window]) for window in WINDOWS]


# --- the mask's bookkeeping ---------------------------------------------------------------


def test_document_ids_and_positions_follow_the_eot_convention():
    """The EOT ends its own document; the next token starts the next one, at position 0."""
    idx = torch.tensor([[5, EOT, 4, 4, EOT, EOT, 2], [EOT, 1, 2, 3, 4, 5, 6]])
    assert attention.document_ids(idx, EOT).tolist() == [
        [0, 0, 1, 1, 1, 2, 3],
        [0, 1, 1, 1, 1, 1, 1],
    ]
    assert attention.document_positions(idx, EOT).tolist() == [
        [0, 1, 0, 1, 2, 0, 0],
        [0, 0, 1, 2, 3, 4, 5],
    ]


def test_sdpa_mask_is_causal_inside_each_document():
    cfg = model_config(**SMALL)
    idx = torch.tensor([[1, EOT, 2, 3]])
    docs = find_documents(idx, cfg, torch.float32)
    assert docs.block_mask is None and docs.cu_seqlens is None
    want = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert docs.mask[0, 0].int().tolist() == want
    assert docs.positions is None  # doc_positions=continue
    reset = find_documents(idx, model_config(**SMALL, doc_positions="reset"), torch.float32)
    assert reset.positions.tolist() == [[0, 1, 0, 1]]


# --- a packed window computes what its documents compute alone ---------------------------


@pytest.mark.parametrize(
    "arch, doc_positions",
    [("gpt2", "reset"), ("llama", "reset"), ("llama", "continue")],
)
def test_packed_window_matches_its_documents_run_alone(arch, doc_positions):
    """Per-token logits and losses of two packed windows equal those of each document run
    alone. GPT-2's learned positions need the reset; Llama's RoPE depends only on distances,
    so it matches with positions running on too."""
    model = new_model(arch, doc_mask=True, doc_positions=doc_positions)
    x = packed()
    with torch.no_grad():
        got = model(x)
    want = torch.stack(logits_alone(model))
    assert (got - want).abs().max().item() <= TOL
    targets = torch.roll(x, -1, dims=1)  # any targets: the per-token losses agree too
    loss_got = F.cross_entropy(got.flatten(0, 1), targets.flatten(), reduction="none")
    loss_want = F.cross_entropy(want.flatten(0, 1), targets.flatten(), reduction="none")
    assert (loss_got - loss_want).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_without_doc_mask_later_documents_see_the_earlier_ones(arch):
    """The same weights without the mask: the first document is unchanged (causal attention),
    every later document's logits move (it attends to its unrelated predecessor)."""
    model = new_model(arch, doc_mask=False)
    with torch.no_grad():
        got = model(packed())
    alone = logits_alone(model)
    first = len(WINDOWS[0][0])
    assert (got[0, :first] - alone[0][:first]).abs().max().item() <= TOL
    assert (got[0, first:] - alone[0][first:]).abs().max().item() > 1e-3


def test_gpt2_with_positions_running_on_does_not_match_alone():
    """Learned absolute positions: without the reset, a packed document is seen at other
    positions than alone, so it computes something else (why doc_positions=reset exists)."""
    model = new_model("gpt2", doc_mask=True, doc_positions="continue")
    with torch.no_grad():
        got = model(packed())
    first = len(WINDOWS[0][0])
    assert (got[0, first:] - logits_alone(model)[0][first:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("arch", list(ARCHS))
def test_doc_mask_false_builds_no_mask(arch, monkeypatch):
    """The default path does no extra work: no documents are looked for."""

    def refuse(*args):
        raise AssertionError("find_documents called with doc_mask=false")

    for module in ("trainer.models.gpt2.model", "trainer.models.llama.model"):
        monkeypatch.setattr(f"{module}.find_documents", refuse)
    model = new_model(arch, doc_mask=False)
    model(packed())


# --- the other kernels' forms of the same mask -------------------------------------------


def qkv(seed: int = 0, B: int = 2, T: int = 20, H: int = 4, H_kv: int = 2, D: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, h, D, generator=g) for h in (H, H_kv, H_kv))


def test_flex_block_mask_matches_the_sdpa_mask(monkeypatch):
    """FlexAttention's block mask (the CUDA path) allows exactly what the SDPA mask allows.
    Run here with eager flex_attention (the CUDA path compiles it)."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(attention, "compiled_flex_attention", lambda: flex_attention)
    cfg = model_config(**SMALL)
    x = packed()
    sdpa = find_documents(x, cfg, torch.float32)
    flex = Documents(None, block_mask=attention.flex_block_mask(attention.document_ids(x, EOT)))
    q, k, v = qkv()
    with pytest.warns(UserWarning, match="without torch.compile"):
        got = attend_documents(q, k, v, flex, 0.0)
    want = attend_documents(q, k, v, sdpa, 0.0)
    assert (got - want).abs().max().item() <= TOL


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal):
    """flash_attn_varlen_func computed with SDPA, one sequence at a time (test stand-in)."""
    assert causal and dropout_p == 0.0 and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    out = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        assert b - a <= max_q
        y = F.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True, enable_gqa=True
        )
        out.append(y.transpose(0, 1))
    return torch.cat(out)


def test_varlen_sequences_cut_at_window_starts_and_after_every_eot(monkeypatch):
    """flash-attn's varlen form (the CUDA path): the batch flattened and cut into documents,
    a document crossing a window boundary being one sequence per window; with a stand-in
    kernel it computes what the SDPA mask computes."""
    idx = torch.tensor([[1, EOT, 2, 3], [4, 5, EOT, EOT]])
    docs = attention.varlen_documents(idx, EOT, None)
    assert docs.cu_seqlens.tolist() == [0, 2, 4, 7, 8]
    assert docs.max_seqlen == 3
    monkeypatch.setattr(attention, "flash_attn_varlen_func", reference_varlen)
    x = packed()
    q, k, v = qkv()
    got = attend_documents(q, k, v, attention.varlen_documents(x, EOT, None), 0.0)
    want = attend_documents(q, k, v, find_documents(x, model_config(**SMALL), torch.float32), 0.0)
    assert (got - want).abs().max().item() <= TOL


# --- generation: one document at a time, the cache agrees with the masked forward --------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_kv_cache_generation_agrees_with_the_masked_forward(arch):
    """Generation runs one document through the KV cache (the mask does not apply there):
    for a prompt without EOT, cached decoding yields the tokens and logits of the masked,
    position-reset full forward."""
    model = new_model(arch, doc_mask=True, doc_positions="reset")
    prompt = WINDOWS[0][1][:5][None]
    assert EOT not in prompt.tolist()[0]
    cached = generate.generate(model, prompt, 8, temperature=0, use_cache=True)
    full = generate.generate(model, prompt, 8, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    cache = model.new_kv_cache()
    with torch.no_grad():
        step_logits = [model(cached[:, :1], kv_cache=cache)[0, -1]]
        for t in range(1, cached.size(1)):
            step_logits.append(model(cached[:, t : t + 1], kv_cache=cache)[0, -1])
        want = model(cached)[0]
    assert (torch.stack(step_logits) - want).abs().max().item() <= 1e-5


# --- configuration -------------------------------------------------------------------------


def dummy(tmp_path: Path, **model: Any) -> dict[str, Any]:
    return tiny_config(tmp_path / "run", model=model)


@pytest.mark.parametrize(
    "model, parallel, world, match",
    [
        ({"doc_mask": True}, {}, 1, r"^model\.doc_mask=true needs an end-of-text id"),
        ({"doc_positions": "reset"}, {}, 1, r"^model\.doc_positions=reset: needs model\.doc_mask"),
        ({"doc_positions": "sometimes"}, {}, 1, r"^model\.doc_positions='sometimes': expected"),
        ({"doc_mask": True, "eot_id": 300}, {}, 1, r"^model\.eot_id=300: must be below model\."),
        ({"eot_id": -1}, {}, 1, r"^model\.eot_id=-1: must be a token id"),
        (
            {"doc_mask": True, "eot_id": 3},
            {"pp": 2, "pp_microbatches": 2},
            2,
            r"^model\.doc_mask=true is not supported with pipeline parallel \(parallel\.pp=2\)",
        ),
    ],
    ids=[
        "dummy-without-eot",
        "reset-without-mask",
        "bad-positions",
        "eot-out-of-vocab",
        "negative-eot",
        "pipeline",
    ],
)
def test_bad_doc_mask_settings_are_one_line_config_errors(tmp_path, model, parallel, world, match):
    cfg = dummy(tmp_path, **model)
    cfg["parallel"] = parallel
    with pytest.raises(ConfigError, match=match) as err:
        load_config(cfg, world_size=world)
    assert "\n" not in str(err.value)


def test_dummy_data_takes_an_explicit_eot_id(tmp_path):
    cfg = load_config(dummy(tmp_path, doc_mask=True, eot_id=3))
    assert (cfg.model.doc_mask, cfg.model.eot_id) == (True, 3)


# --- on a prepared dataset: the manifest's EOT id, training, layouts --------------------------


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory) -> Path:
    """A bytes-tokenized dataset (EOT id 256) of short documents: several per 32-token window."""
    rng = random.Random(5)
    docs = [
        "".join(rng.choices(string.ascii_lowercase + " ", k=rng.randint(3, 20))) for _ in range(300)
    ]
    return make_dataset(tmp_path_factory.mktemp("docs"), docs, chunk_mb=0.002)


def on_dataset(run_dir: Path, ds: Path, model: dict[str, Any], **sections: Any) -> dict:
    data = {"kind": "shards", "path": str(ds), "tokenizer": None, "vocab_size": None}
    return tiny_config(run_dir, data=data, model={"vocab_size": None, **model}, **sections)


def test_eot_id_comes_from_the_manifest_and_must_agree(tmp_path, short_docs):
    cfg = resolve_config(on_dataset(tmp_path / "a", short_docs, {"doc_mask": True}))
    assert cfg.model.eot_id == 256
    wrong = on_dataset(tmp_path / "b", short_docs, {"doc_mask": True, "eot_id": 5})
    with pytest.raises(ConfigError, match=r"^model\.eot_id=5 but dataset .* with 256$"):
        resolve_config(wrong)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_with_doc_mask_on_a_prepared_dataset(tmp_path, short_docs, arch):
    """End to end: trains (loss falls), with activation checkpointing exactly as without, and
    records the EOT id it split at in the run's config."""
    model = {k: v for k, v in ARCHS[arch].items() if k not in ("vocab_size", "eot_id")}
    model |= {"doc_mask": True, "doc_positions": "reset"}
    train = {"max_steps": 8, "lr": 3e-3}
    plain = run(on_dataset(tmp_path / "plain", short_docs, model, train=train))
    losses = [plain.losses[s] for s in sorted(plain.losses)]
    assert losses[-1] < losses[0] - 0.3
    recompute = on_dataset(
        tmp_path / "ckpt", short_docs, model, train={**train, "activation_checkpointing": True}
    )
    assert run(recompute).losses == pytest.approx(plain.losses, abs=1e-6)
    saved = (tmp_path / "plain" / CONFIG).read_text()
    assert "eot_id: 256" in saved and "doc_mask: true" in saved


@pytest.mark.slow
def test_compiled_blocks_with_doc_mask_train_like_eager(tmp_path, short_docs):
    """The documents reach compiled blocks as an argument (Llama: mask and reset positions
    through the rotary tables); ~15 s of compiling on this CPU."""
    model = {k: v for k, v in ARCHS["llama"].items() if k not in ("vocab_size", "eot_id")}
    model |= {"doc_mask": True, "doc_positions": "reset"}
    eager = run(on_dataset(tmp_path / "eager", short_docs, model, train={"max_steps": 3}))
    compiled = on_dataset(tmp_path / "compiled", short_docs, model, train={"max_steps": 3})
    compiled["train"]["compile"] = True
    assert run(compiled).losses == pytest.approx(eager.losses, abs=1e-4)


MP_MODEL = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 32}


def mp_config(run_dir: Path, ds: Path, parallel: dict, micro_batch_size: int) -> dict:
    model = {**MP_MODEL, "doc_mask": True, "doc_positions": "reset"}
    train = {"max_steps": 3, "micro_batch_size": micro_batch_size}
    return on_dataset(run_dir, ds, model, train=train, parallel=parallel)


@pytest.mark.multiproc
def test_tensor_parallel_and_fsdp_with_doc_mask_match_one_process(tmp_path, short_docs):
    """Attention is local to heads, so the mask passes through tensor parallelism; FSDP
    shards only weights. Both (2 gloo ranks, the same global batch of 4) train like one
    process with the mask on."""
    single = run(mp_config(tmp_path / "single", short_docs, {}, 4)).losses
    unmasked = mp_config(tmp_path / "unmasked", short_docs, {}, 4)
    unmasked["model"] |= {"doc_mask": False, "doc_positions": "continue"}
    assert abs(run(unmasked).losses[3] - single[3]) > 1e-3  # the mask is at work in this data
    jobs = [
        ("tp2", mp_config(tmp_path / "tp2", short_docs, {"tp": 2}, 4), None),
        ("fsdp2", mp_config(tmp_path / "fsdp2", short_docs, {"dp_shard": 2}, 2), None),
    ]
    assert run_jobs(2, jobs, tmp_path / "status") == {}
    for name, _, _ in jobs:
        got = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / name / METRICS)}
        assert got == pytest.approx(single, abs=1e-5), name
