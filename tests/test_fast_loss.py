"""The output head made fast: the compiled head + loss (`train.compile_loss`), the chunked
lm_head + cross-entropy (`model.loss_chunk_size`) and the padded vocabulary
(`model.pad_vocab_to_multiple`), each against the plain eager path it must equal."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from multiproc import run_jobs
from test_distributed import (
    LOSS_ATOL,
    MODEL,
    assert_close_per_step,
    assert_same_final_weights,
    config,
    parallel,
    records,
)

from trainer.config import ConfigError, load_config, model_config
from trainer.generate import generate
from trainer.hf import load_hf, save_hf
from trainer.models import build_model
from trainer.models.loss import IGNORE_INDEX, chunked_lm_loss, lm_loss, real_vocab
from trainer.parallel import parallelize
from trainer.parallel.compile import apply_compile, compile_head, head_compiled
from trainer.parallel.mesh import Layout
from trainer.train import run

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50  # the real vocabulary of the small models here
Z = 1e-2  # a z-loss weight large enough to move the gradients visibly


def small_config(arch: str = "gpt2", **model):
    extra = {"arch": "llama", "tie_embeddings": False, "multiple_of": 16} if arch == "llama" else {}
    keys = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB)
    return model_config({**keys, **extra, **model})


def batch(seed: int = 0, ignored: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and targets (2, 16), the first `ignored` targets of row 0 ignored."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(VOCAB, (2, 16), generator=g), torch.randint(VOCAB, (2, 16), generator=g)
    y[0, :ignored] = IGNORE_INDEX
    return x, y


def loss_and_grads(model, x, y, z_loss: float | None) -> tuple[torch.Tensor, dict]:
    """The reported loss (and z term) and every parameter's gradient of one backward."""
    model.zero_grad()
    out = model(x, y, z_loss=z_loss)
    objective = out if z_loss is None else out.objective(z_loss)
    objective.backward()
    reported = out if z_loss is None else torch.stack([out.ce, out.z])
    return reported.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(got: tuple, want: tuple, atol: float) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=atol)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=0, atol=atol, msg=name)


# --- the compiled head ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 7])
def test_compiled_model_head_and_loss_match_eager(chunk):
    """Blocks and head + loss compiled (what train.compile + compile_loss install): the loss,
    the z term and every gradient within 1e-5 of eager; the chunked loss compiles too."""
    torch.manual_seed(0)
    eager = build_model(small_config(pad_vocab_to_multiple=16, loss_chunk_size=chunk))
    compiled = copy.deepcopy(eager)
    apply_compile(compiled.blocks)
    compile_head(compiled)
    x, y = batch()
    for z_loss in (Z, None):  # training, then the evaluation loss (another graph)
        want = loss_and_grads(eager, x, y, z_loss)
        assert_same(loss_and_grads(compiled, x, y, z_loss), want, atol=1e-5)


def test_parallelize_compiles_the_head_where_it_holds_plain_tensors(tmp_path):
    cfg = load_config(tiny_config(tmp_path, train={"compile": True}))
    pm = parallelize(build_model(cfg.model), cfg, Layout(None), torch.device("cpu"))
    assert pm.module.head_loss is not type(pm.module).head_loss  # the compiled one
    assert head_compiled(cfg)
    off = [
        replace(cfg, train=replace(cfg.train, compile_loss=False)),
        replace(cfg, train=replace(cfg.train, compile=False)),  # compile_loss needs compile
        replace(cfg, parallel=replace(cfg.parallel, pp=2)),  # the schedule's loss: eager
        replace(cfg, parallel=replace(cfg.parallel, tp=2, loss_parallel=True)),
        replace(cfg, parallel=replace(cfg.parallel, tp=2, sequence_parallel=True)),
    ]
    assert [head_compiled(c) for c in off] == [False] * len(off)
    eager_cfg = off[0]
    pm = parallelize(build_model(cfg.model), eager_cfg, Layout(None), torch.device("cpu"))
    assert pm.module.head_loss is type(pm.module).head_loss


# --- the chunked loss -----------------------------------------------------------------------


def plain_terms(hidden, weight, targets, z_loss):
    return lm_loss(real_vocab(hidden @ weight.t(), VOCAB), targets, z_loss)


@pytest.mark.parametrize("z_loss", [0.0, Z])
@pytest.mark.parametrize("chunk", [1, 5, 7, 32, 100])  # 32 tokens: 5 and 7 leave a remainder
@pytest.mark.parametrize("padded", [VOCAB, 64])
def test_chunked_cross_entropy_matches_plain(z_loss, chunk, padded):
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(2, 16, 8, generator=g) * 0.5).requires_grad_()  # logits of std ~1.4
    weight = torch.randn(padded, 8, generator=g, requires_grad=True)
    _, targets = batch(ignored=5)
    results = []
    for fn in (plain_terms, lambda h, w, t, z: chunked_lm_loss(h, w, t, VOCAB, z, chunk)):
        terms = fn(hidden, weight, targets, z_loss)
        hidden.grad = weight.grad = None
        terms.objective(z_loss).backward()
        reported = terms.ce if terms.z is None else torch.stack([terms.ce, terms.z])
        results.append((reported.detach(), {"h": hidden.grad, "w": weight.grad}))
    assert_same(results[1], results[0], atol=1e-5)
    assert (z_loss == 0) == (
        chunked_lm_loss(hidden, weight, targets, VOCAB, z_loss, chunk).z is None
    )
    if padded > VOCAB:  # padded rows are never a class: no gradient
        assert results[1][1]["w"][VOCAB:].abs().max() == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_chunked_model_loss_matches_plain(arch):
    torch.manual_seed(0)
    plain = build_model(small_config(arch))
    chunked = build_model(small_config(arch, loss_chunk_size=5))
    chunked.load_state_dict(plain.state_dict())
    x, y = batch()
    for z_loss in (Z, None):
        assert_same(
            loss_and_grads(chunked, x, y, z_loss), loss_and_grads(plain, x, y, z_loss), 1e-5
        )


def largest_saved_for_backward(model, x, y) -> int:
    """The element count of the largest tensor autograd keeps between forward and backward."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y, z_loss=Z).objective(Z).backward()
    return max(sizes)


def test_chunked_loss_keeps_no_full_vocabulary_tensor_for_backward():
    """Plain: backward holds (N, V) logits; chunked by 5 tokens: nothing larger than the
    output weight (V, d) itself, half of N x V here (the chunks keep only their inputs)."""
    torch.manual_seed(0)
    cfg = small_config(vocab_size=500, n_embd=16)  # N x V = 32 x 500: 2 x the weight's size
    x, y = batch()
    n_v = x.numel() * 500
    assert largest_saved_for_backward(build_model(cfg), x, y) >= n_v
    chunked = build_model(replace(cfg, loss_chunk_size=5))
    assert largest_saved_for_backward(chunked, x, y) == chunked.lm_head.weight.numel() == n_v // 2


# --- the padded vocabulary ------------------------------------------------------------------


def padded_twin(model, multiple: int, **model_keys):
    """A model with a vocabulary padded to `multiple` holding `model`'s weights on the real
    rows and, on the padded rows, weights that would win every prediction if unmasked."""
    cfg = replace(model.cfg, pad_vocab_to_multiple=multiple, **model_keys)
    twin = build_model(cfg)
    state = model.state_dict()
    for name, tensor in twin.state_dict().items():
        with torch.no_grad():
            if tensor.shape == state[name].shape:
                tensor.copy_(state[name])
            else:  # embedding / output: the real rows, then rows aligned with every state
                tensor[:VOCAB] = state[name]
                tensor[VOCAB:] = 50.0
    return twin


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("chunk", [0, 5])
def test_padded_vocab_loss_equals_the_unpadded_model(arch, chunk):
    torch.manual_seed(0)
    plain = build_model(small_config(arch, loss_chunk_size=chunk))
    padded = padded_twin(plain, 64)
    assert padded.lm_head.weight.shape[0] == 64 and padded.tok_emb.weight.shape[0] == 64
    x, y = batch()
    for z_loss in (Z, None):
        want, got = loss_and_grads(plain, x, y, z_loss), loss_and_grads(padded, x, y, z_loss)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
        for name, grad in got[1].items():  # real rows as unpadded, padded rows untouched
            torch.testing.assert_close(
                grad[: want[1][name].shape[0]], want[1][name], rtol=0, atol=1e-6
            )
            assert grad[want[1][name].shape[0] :].abs().sum() == 0, name
    with torch.no_grad():
        logits = padded(x)
    assert logits.shape[-1] == VOCAB
    torch.testing.assert_close(logits, plain(x), rtol=0, atol=1e-6)


def test_generation_never_emits_a_padded_id():
    """The padded rows would win every position if unmasked (checked on the raw output
    layer); generation still emits exactly what the unpadded model does."""
    torch.manual_seed(0)
    plain = build_model(small_config()).eval()
    with torch.no_grad():  # sum(ln_f(x)) = n_embd: padded rows of 50s score 50 * 32
        plain.ln_f.bias.fill_(1.0)
    padded = padded_twin(plain, 64).eval()
    prompt, _ = batch()
    prompt = prompt[:, :4]
    raw = []
    padded.lm_head.register_forward_hook(lambda mod, args, out: raw.append(out))
    with torch.no_grad():
        padded(prompt)
    assert bool((raw[0].argmax(-1) >= VOCAB).all())
    greedy = generate(padded, prompt, 12, temperature=0)
    assert torch.equal(greedy, generate(plain, prompt, 12, temperature=0))
    sampled = generate(
        padded, prompt, 12, temperature=2.0, generator=torch.Generator().manual_seed(0)
    )
    assert int(sampled.max()) < VOCAB


def test_hf_export_has_the_tokenizer_vocabulary_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    plain = build_model(small_config()).eval()
    padded = padded_twin(plain, 64).eval()
    folder = save_hf(padded, tmp_path / "hf")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    assert theirs.config.vocab_size == VOCAB
    assert theirs.transformer.wte.weight.shape[0] == VOCAB
    x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, padded(x), rtol=0, atol=1e-5)
    back = load_hf(folder, padded.cfg)  # padded again on import
    assert back.tok_emb.weight.shape[0] == 64
    with torch.no_grad():
        torch.testing.assert_close(back(x), padded(x), rtol=0, atol=0)


def test_llama_hf_export_drops_the_padding_and_round_trips(tmp_path):
    torch.manual_seed(0)
    padded = build_model(small_config("llama", pad_vocab_to_multiple=64)).eval()
    folder = save_hf(padded, tmp_path / "hf")
    from safetensors.torch import load_file

    rows = {k: v.shape[0] for k, v in load_file(folder / "model.safetensors").items()}
    assert rows["model.embed_tokens.weight"] == rows["lm_head.weight"] == VOCAB
    back = load_hf(folder, padded.cfg)
    x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(back(x), padded(x), rtol=0, atol=0)
    assert load_hf(folder).cfg.padded_vocab_size == VOCAB  # its own config: unpadded


# --- configuration and resume ---------------------------------------------------------------


@pytest.mark.parametrize(
    "sections, world, match",
    [
        ({"model": {"pad_vocab_to_multiple": 0}}, 1, "model.pad_vocab_to_multiple=0"),
        ({"model": {"loss_chunk_size": -1}}, 1, "model.loss_chunk_size=-1"),
        (
            {"model": {"loss_chunk_size": 64}, "parallel": parallel("tp", loss_parallel=True)},
            2,
            "model.loss_chunk_size=64: .*loss_parallel",
        ),
        (
            {"model": {"loss_chunk_size": 64}, "parallel": parallel("tp", sequence_parallel=True)},
            2,
            "model.loss_chunk_size=64: .*sequence_parallel",
        ),
        (
            {"model": {"loss_chunk_size": 64}, "parallel": parallel("pp", pp_microbatches=2)},
            2,
            "model.loss_chunk_size=64: .*pipeline parallel",
        ),
    ],
)
def test_bad_loss_keys_are_one_line_config_errors(tmp_path, sections, world, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(tiny_config(tmp_path, **sections), world_size=world)
    assert "\n" not in str(err.value)


def test_resume_across_a_padding_change_is_refused(tiny):
    cfg = tiny(model={"pad_vocab_to_multiple": 8})
    run(cfg, stop_requested=lambda step: step == 2)
    with pytest.raises(ConfigError, match="model.pad_vocab_to_multiple=1 but checkpoint") as err:
        run(tiny(model={"pad_vocab_to_multiple": 1}))
    assert "\n" not in str(err.value)
    assert "add model.pad_vocab_to_multiple=8 to continue this checkpoint" in str(err.value)
    assert sorted(run(cfg).losses) == [3, 4, 5, 6]  # its own padding continues


# --- layouts (gloo, 2 processes) ------------------------------------------------------------

PADDED = {**MODEL, "pad_vocab_to_multiple": 8}  # 257 ids -> 264 rows (132 per TP rank)
JOBS = {  # name: (parallel, model, train); each against "single" (padded, plain, eager)
    "tp2_loss_parallel": (parallel("tp", loss_parallel=True), PADDED, {}),
    "pp2_padded": (parallel("pp", pp_microbatches=2), PADDED, {}),  # the schedule's loss
    "fsdp2_chunked": (parallel("fsdp"), {**PADDED, "loss_chunk_size": 24}, {"micro_batch_size": 2}),
    "ddp2_chunked": (parallel("ddp"), {**PADDED, "loss_chunk_size": 24}, {"micro_batch_size": 2}),
    "tp2_chunked": (parallel("tp"), {**PADDED, "loss_chunk_size": 24}, {}),  # replicated head
    "cp2_chunked": (parallel("cp"), {**PADDED, "loss_chunk_size": 24}, {}),  # each rank's tokens
    # compiled blocks and head (the chunks' checkpoints inside the graph) in FSDP2's root unit
    "fsdp2_chunked_compiled": (
        parallel("fsdp"),
        {**PADDED, "loss_chunk_size": 24},
        {"micro_batch_size": 2, "compile": True},
    ),
}


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fast_loss")
    run(config(root / "single", model=PADDED, z_loss=Z))
    group = [
        (name, config(root / name, p, model, z_loss=Z, **train), None)
        for name, (p, model, train) in JOBS.items()
    ]
    failures = run_jobs(2, group, root / "status")
    assert not failures, failures
    return root


@pytest.mark.multiproc
@pytest.mark.parametrize("name", list(JOBS))
def test_padded_and_chunked_layouts_train_like_one_process(layout_runs, name):
    """With z-loss and a padded vocabulary, like one process: loss parallel (the padded
    columns masked on their shard), a pipeline's last stage (its logits cut to the vocabulary)
    and the chunked loss under FSDP2 (also compiled), DDP, TP and CP."""
    reference = layout_runs / "single"
    assert_close_per_step(records(layout_runs / name), records(reference), "loss", LOSS_ATOL)
    assert_same_final_weights(layout_runs / name, reference)
