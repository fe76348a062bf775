"""Generation (KV cache, sampling filters, Hugging Face parity) and the export/generate CLIs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DUMMY_DATA

from data_prep.tokenizers import get_tokenizer
from jobs import export as export_cli
from jobs import generate as generate_cli
from trainer.checkpoint import CheckpointError
from trainer.config import model_config
from trainer.generate import filter_logits, generate
from trainer.hf import save_hf
from trainer.models.gpt2.model import GPT
from trainer.trained import checkpoint_tokenizer, load_model

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(block_size: int = 16, vocab_size: int = 257, seed: int = 0) -> GPT:
    """A small random model with peaked next-token distributions (no near-ties for argmax)."""
    torch.manual_seed(seed)
    cfg = model_config(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.normal_(std=0.3)
    return model.eval()


def prompt_ids(batch: int, length: int, vocab_size: int = 257, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


@torch.no_grad()
def greedy_reference(model: GPT, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding the slow, obvious way: the last block_size tokens, every step."""
    tokens = prompt
    for _ in range(n):
        logits = model(tokens[:, -model.cfg.block_size :])
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


# --- KV cache -------------------------------------------------------------------------------


@torch.no_grad()
def test_kv_cache_logits_equal_full_forward():
    model = random_model(block_size=16)
    x = prompt_ids(2, 12)
    full = model(x)
    cache = model.new_kv_cache()
    steps = [model(x[:, :5], kv_cache=cache)]
    steps += [model(x[:, t : t + 1], kv_cache=cache) for t in range(5, 12)]
    assert cache[0].length == 12
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@torch.no_grad()
def test_kv_cache_rejects_several_new_tokens():
    model = random_model(block_size=16)
    cache = model.new_kv_cache()
    model(prompt_ids(1, 4), kv_cache=cache)
    with pytest.raises(ValueError):
        model(prompt_ids(1, 2), kv_cache=cache)


@pytest.mark.parametrize(
    ("batch", "prompt_len", "new"),
    [
        (1, 5, 8),  # stays inside the block
        (2, 5, 20),  # 25 tokens > block_size 16: the window slides
        (2, 16, 4),  # the prompt fills the block exactly
        (2, 1, 18),
    ],
)
def test_greedy_with_cache_equals_without(batch, prompt_len, new):
    model = random_model(block_size=16)
    prompt = prompt_ids(batch, prompt_len, seed=prompt_len)
    cached = generate(model, prompt, new, temperature=0, use_cache=True)
    uncached = generate(model, prompt, new, temperature=0, use_cache=False)
    assert cached.shape == (batch, prompt_len + new)
    assert torch.equal(cached[:, :prompt_len], prompt)
    assert torch.equal(cached, uncached)
    assert torch.equal(uncached, greedy_reference(model, prompt, new))
    assert cached[:, prompt_len:].unique().numel() > 1  # the comparison is not trivial


def test_stop_id_ends_generation():
    model = random_model(block_size=16)
    prompt = prompt_ids(1, 3)
    full = generate(model, prompt, 10, temperature=0)
    stop = int(full[0, 5])
    first = int((full[0, 3:] == stop).nonzero()[0]) + 3
    out = generate(model, prompt, 10, temperature=0, stop_id=stop)
    assert torch.equal(out, full[:, : first + 1])


# --- sampling -------------------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_generator():
    model = random_model(block_size=16)
    prompt = prompt_ids(2, 4)

    def sample(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompt, 24, temperature=1.5, generator=g)

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))


def test_top_k_one_is_greedy():
    model = random_model(block_size=16)
    prompt = prompt_ids(2, 4)
    g = torch.Generator().manual_seed(0)
    sampled = generate(model, prompt, 20, temperature=2.0, top_k=1, generator=g)
    assert torch.equal(sampled, generate(model, prompt, 20, temperature=0))


def test_top_k_keeps_exactly_k():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    for k in (1, 5, 49):
        out = filter_logits(logits, top_k=k)
        kept = torch.isfinite(out)
        assert kept.sum(dim=-1).tolist() == [k, k, k]
        expected = torch.zeros_like(kept).scatter(-1, logits.topk(k, dim=-1).indices, True)
        assert torch.equal(kept, expected)
        assert torch.equal(out[kept], logits[kept])
    assert torch.equal(filter_logits(logits, top_k=0), logits)
    assert torch.equal(filter_logits(logits, top_k=50), logits)


@pytest.mark.parametrize(
    ("top_p", "kept_probs"),
    [
        (0.3, {0.5}),  # the largest alone already reaches p
        (0.7, {0.5, 0.3}),
        (0.9, {0.5, 0.3, 0.15}),
        (0.99, {0.5, 0.3, 0.15, 0.05}),
        (1.0, {0.5, 0.3, 0.15, 0.05}),
    ],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept_probs):
    # Two rows, the same distribution in different orders (so the un-sorting is tested too).
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.3, 0.05, 0.15, 0.5]])
    logits = probs.log() + 2.0  # any shift: softmax is the same
    out = filter_logits(logits, top_p=top_p)
    for row in range(2):
        kept = {round(p, 2) for p in probs[row][torch.isfinite(out[row])].tolist()}
        assert kept == kept_probs
        finite = torch.isfinite(out[row])
        assert torch.equal(out[row][finite], logits[row][finite])


def test_top_k_and_top_p_combine():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), top_k=2, top_p=0.99)
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]


# --- parity with Hugging Face generate ------------------------------------------------------


def test_greedy_matches_hf_generate(tmp_path):
    model = random_model(block_size=64, seed=1)
    folder = save_hf(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    prompt = prompt_ids(2, 8, seed=5)
    ours = generate(model, prompt, 24, temperature=0)
    with torch.no_grad():
        theirs = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=24,
            min_new_tokens=24,
            pad_token_id=0,
        )
    assert torch.equal(ours, theirs)


# --- the CLIs, end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A very small training run with a checkpoint at its end."""
    from trainer.train import run

    path = tmp_path_factory.mktemp("run") / "tiny"
    result = run(
        {
            "run": {"dir": str(path)},
            "train": {"max_steps": 3, "micro_batch_size": 2, "warmup_steps": 1},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
            "eval": {"interval": 0},
            "log": {"interval": 1, "progress": False},
            "data": DUMMY_DATA,
            "device": "cpu",
        }
    )
    assert result.step == 3 and result.last_checkpoint is not None
    return path


def test_export_hf_matches_checkpoint(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    export_cli.main([f"checkpoint={run_dir}", "format=hf", f"out={out}"])
    assert "exported" in capsys.readouterr().out
    model, _ = load_model(run_dir)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.n_layer == 2 and hf.config.n_embd == 32 and hf.config.n_positions == 32
    x = prompt_ids(2, 32, vocab_size=model.cfg.vocab_size)
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-5


def test_a_trained_model_takes_this_machines_attention_kernel(tmp_path):
    """The attention kernel is not part of the weights: a checkpoint trained with a fixed
    `model.attention` (a GPU run's cudnn or flash) loads for generation, export and
    evaluation with `auto`, the kernel this machine and precision can run."""
    from trainer.train import run

    path = tmp_path / "sdpa"
    run(
        {
            "run": {"dir": str(path)},
            "train": {"max_steps": 1, "micro_batch_size": 1, "warmup_steps": 1},
            "model": {
                "n_layer": 1,
                "n_head": 2,
                "n_embd": 16,
                "block_size": 16,
                "attention": "sdpa",
            },
            "eval": {"interval": 0},
            "log": {"progress": False},
            "data": DUMMY_DATA,
            "device": "cpu",
        }
    )
    model, state = load_model(path)
    assert state["config"]["model"]["attention"] == "sdpa"
    assert model.cfg.attention == "auto"


def test_export_torch_is_a_plain_state_dict(run_dir, tmp_path):
    out = tmp_path / "pt"
    export_cli.main([f"checkpoint={run_dir}", "format=torch", f"out={out}"])
    saved = torch.load(out / "model.pt", weights_only=True)
    model, state = load_model(run_dir)
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert saved["model"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(saved["model"][key], value), key
    assert saved["config"] == state["config"]["model"]
    # The weights are the trained ones, not a fresh init.
    fresh = GPT(model.cfg)
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())


def test_generate_cli_prints_greedy_continuation(run_dir, capsys):
    generate_cli.main(
        [f"checkpoint={run_dir}", "prompt=Hi", "max_new_tokens=5", "temperature=0", "device=cpu"]
    )
    printed = capsys.readouterr().out
    assert printed.startswith("Hi")
    model, _ = load_model(run_dir)
    tok = get_tokenizer("bytes")
    ids = generate(model, torch.tensor([tok.encode("Hi")]), 5, temperature=0)
    assert ids.shape == (1, 2 + 5)
    assert printed == tok.decode(ids[0].tolist()) + "\n"


def test_generate_cli_prompt_is_verbatim(run_dir, capsys):
    prompt = "Once upon a time, [x] = {y}: ${z}"
    generate_cli.main([f"checkpoint={run_dir}", f"prompt={prompt}", "max_new_tokens=2"])
    assert capsys.readouterr().out.startswith(prompt)


def test_generate_cli_model_vocab_larger_than_tokenizer(tmp_path, capsys):
    """A model with a padded vocabulary (allowed: model.vocab_size >= data.vocab_size) must
    still only emit ids the tokenizer can decode."""
    from trainer.train import run

    path = tmp_path / "padded"
    run(
        {
            "run": {"dir": str(path)},
            "train": {"max_steps": 1, "micro_batch_size": 2, "warmup_steps": 0},
            "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "vocab_size": 512},
            "log": {"progress": False},
            "eval": {"interval": 0},
            "data": DUMMY_DATA,
            "device": "cpu",
        }
    )
    capsys.readouterr()
    argv = ["prompt=Hi", "max_new_tokens=12", "temperature=1", "top_k=0", "device=cpu"]
    generate_cli.main([f"checkpoint={path}", *argv])
    assert capsys.readouterr().out.startswith("Hi")


def one_error_line(err: str, prog: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error:"), err
    return lines[0]


def test_export_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    with pytest.raises(SystemExit) as exc:
        export_cli.main([f"checkpoint={missing}", f"out={tmp_path / 'x'}"])
    assert exc.value.code == 2
    assert str(missing) in one_error_line(capsys.readouterr().err, "dlt-export")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["format=onnx"], "format"),
        (["foo=1"], "foo"),
    ],
)
def test_export_bad_arguments(run_dir, tmp_path, capsys, argv, names):
    out = tmp_path / "x"
    with pytest.raises(SystemExit) as exc:
        export_cli.main([f"checkpoint={run_dir}", f"out={out}", *argv])
    assert exc.value.code == 2
    assert names in one_error_line(capsys.readouterr().err, "dlt-export")
    assert not out.exists()


def export_error(argv: list[str], capsys) -> str:
    """dlt-export's one error line for `argv` (exit status 2)."""
    with pytest.raises(SystemExit) as exc:
        export_cli.main(argv)
    assert exc.value.code == 2
    return one_error_line(capsys.readouterr().err, "dlt-export")


def leftovers(folder) -> list[str]:
    """Temporary export folders left in `folder`."""
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(("fmt", "file"), [("hf", "model.safetensors"), ("torch", "model.pt")])
def test_export_refuses_a_non_empty_folder(run_dir, tmp_path, capsys, fmt, file):
    out = tmp_path / "out"
    argv = [f"checkpoint={run_dir}", f"format={fmt}", f"out={out}"]
    export_cli.main(argv)
    before = (out / file).read_bytes()
    (out / file).write_bytes(b"a file the user cares about")
    line = export_error(argv, capsys)
    assert f"out={out}: folder is not empty; use overwrite=true" in line
    assert (out / file).read_bytes() == b"a file the user cares about"
    export_cli.main([*argv, "overwrite=true"])
    assert (out / file).read_bytes() == before
    assert leftovers(tmp_path) == []


def test_export_overwrite_renames_each_file_into_place(run_dir, tmp_path):
    out = tmp_path / "hf"
    argv = [f"checkpoint={run_dir}", "format=hf", f"out={out}"]
    export_cli.main(argv)
    (out / "notes.txt").write_text("mine")
    inodes = {p.name: p.stat().st_ino for p in out.iterdir()}
    export_cli.main([*argv, "overwrite=true"])
    assert (out / "notes.txt").read_text() == "mine"  # other files are kept
    for name in ("model.safetensors", "config.json"):
        assert (out / name).stat().st_ino != inodes[name], name  # a new file renamed over
    assert transformers.GPT2LMHeadModel.from_pretrained(out).config.n_layer == 2
    assert leftovers(tmp_path) == []


def test_export_into_an_existing_empty_folder(run_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    export_cli.main([f"checkpoint={run_dir}", "format=torch", f"out={out}"])
    assert [p.name for p in out.iterdir()] == ["model.pt"]


@pytest.mark.parametrize("existing", [False, True])
def test_a_crash_during_export_leaves_no_half_written_files(
    run_dir, tmp_path, monkeypatch, existing
):
    out = tmp_path / "hf"
    argv = [f"checkpoint={run_dir}", "format=hf", f"out={out}", "overwrite=true"]
    if existing:
        export_cli.main(argv)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else None

    def crash(model, folder, eot_id):
        (folder / "model.safetensors").write_bytes(b"half of the weights")
        raise MemoryError("killed while writing")

    monkeypatch.setattr(export_cli, "save_hf", crash)
    with pytest.raises(MemoryError):
        export_cli.main(argv)
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []


def test_export_out_is_an_existing_file(run_dir, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"something else")
    line = export_error([f"checkpoint={run_dir}", f"out={out}", "overwrite=true"], capsys)
    assert f"out={out}: is an existing file, expected a folder" in line
    assert out.read_bytes() == b"something else"


def test_export_out_with_a_too_long_name(run_dir, tmp_path, capsys):
    out = tmp_path / ("x" * 300)
    line = export_error([f"checkpoint={run_dir}", f"out={out}"], capsys)
    assert str(out) in line
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["top_p=0"], "top_p"),
        (["top_p=1.5"], "top_p"),
        (["temperature=-1"], "temperature"),
        (["foo=1"], "foo"),
        (["max_new_tokens=many"], "max_new_tokens"),
        (["max_new_tokens=0"], "max_new_tokens=0: must be >= 1"),
        (["temperature=nan"], "temperature=nan: must be a finite number >= 0"),
        (["temperature=inf"], "temperature=inf: must be a finite number >= 0"),
        (["temperature=-inf"], "temperature=-inf"),
        (["top_p=nan"], "top_p=nan: must be in (0, 1]"),
        (["top_k=-1"], "top_k=-1: must be >= 0"),
        (["device=tpu"], "device='tpu': expected one of auto, cpu, cuda"),
        (["tokenizer=foo"], "tokenizer='foo': expected one of gpt2, bpe, bytes"),
    ],
)
def test_generate_bad_arguments(run_dir, capsys, argv, names):
    with pytest.raises(SystemExit) as exc:
        generate_cli.main([f"checkpoint={run_dir}", *argv])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert names in one_error_line(captured.err, "dlt-generate")
    assert captured.out == ""


# A tokenizer that lives in a file the checkpoint carries: (name, what it is, its file).
FILE_TOKENIZERS = [
    ("bpe", "trained BPE tokenizer", "tokenizer.tiktoken"),
    ("hf", "Hugging Face tokenizer", "tokenizer.hf.json"),
]


@pytest.mark.parametrize("name, what, file", FILE_TOKENIZERS)
def test_generate_with_a_tokenizer_the_checkpoint_lacks(run_dir, capsys, name, what, file):
    with pytest.raises(SystemExit) as exc:
        generate_cli.main([f"checkpoint={run_dir}", f"tokenizer={name}", "device=cpu"])
    assert exc.value.code == 2
    line = one_error_line(capsys.readouterr().err, "dlt-generate")
    assert f"tokenizer={name}: checkpoint " in line
    assert f"carries no {what} ({file}); use tokenizer=bytes" in line


@pytest.mark.parametrize("name, what, file", FILE_TOKENIZERS)
def test_a_run_whose_checkpoint_lost_its_tokenizer(tmp_path, name, what, file):
    state = {"config": {"data": {"tokenizer": name}}, "checkpoint_dir": str(tmp_path)}
    with pytest.raises(CheckpointError, match=f"copy the dataset's {file} into it"):
        checkpoint_tokenizer(state)
    assert checkpoint_tokenizer(state, "bytes").name == "bytes"


def test_generate_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nothing_here"
    with pytest.raises(SystemExit) as exc:
        generate_cli.main([f"checkpoint={missing}", "max_new_tokens=1"])
    assert exc.value.code == 2
    assert str(missing) in one_error_line(capsys.readouterr().err, "dlt-generate")


def test_sampling_filters_give_a_distribution():
    # Sanity on next-token probabilities after filtering: they sum to one over the kept set.
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = torch.softmax(filter_logits(probs.log(), top_p=0.7), dim=-1)
    assert math.isclose(out.sum().item(), 1.0, rel_tol=1e-6)
    assert torch.allclose(out, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


# --- tokenizers: in checkpoints, for generation, in every export ----------------------------


def prep_with_cli(out, tokenizer: str, *extra: str):
    """dlt-prep on the start of the embedded KJV corpus with `tokenizer` into `out`."""
    from test_tokenizers import sample_text

    from jobs import prep as prep_cli

    out.mkdir(parents=True)
    corpus = out.parent / f"{out.name}.txt"
    corpus.write_text(sample_text(30_000), encoding="utf-8")
    argv = [f"data.input=[{corpus}]", f"data.out={out}", f"tokenizer={tokenizer}", "workers=1"]
    prep_cli.main([*argv, "data.val_fraction=0", "data.bpe_vocab_size=300", *extra])
    return out


def train_briefly(run_dir, dataset, tokenizer: str, **extra):
    from trainer.train import run

    return run(
        {
            "run": {"dir": str(run_dir)},
            "train": {"max_steps": 3, "micro_batch_size": 2, "warmup_steps": 1},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
            "eval": {"interval": 0},
            "log": {"interval": 1, "progress": False},
            "data": {"kind": "shards", "path": str(dataset), "tokenizer": tokenizer},
            "device": "cpu",
            **extra,
        }
    )


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory, run_dir):
    """Factory: a tokenizer name -> a run trained briefly on a dataset dlt-prep made with it
    (bytes: the dummy-data run; hf: a tokenizer.json the tests train, at root/hf-tokenizer)."""
    from test_tokenizers import train_hf_tokenizer

    root = tmp_path_factory.mktemp("tokenizer_runs")
    runs = {"bytes": run_dir}

    def make(name: str):
        if name not in runs:
            extra = []
            if name == "hf":
                folder = train_hf_tokenizer(root / "hf-tokenizer")
                extra = [f"data.tokenizer_path={folder}"]
            dataset = prep_with_cli(root / f"data-{name}", name, *extra)
            result = train_briefly(root / f"run-{name}", dataset, name)
            assert result.step == 3 and result.last_checkpoint is not None
            runs[name] = root / f"run-{name}"
        return runs[name]

    make.root = root
    return make


def test_hf_tokenizer_prep_train_generate(tokenizer_run, capsys):
    """tokenizer=hf data.tokenizer_path=DIR: prep -> train -> the tokenizer travels in the
    checkpoint -> dlt-generate decodes with it."""
    from pathlib import Path

    from data_prep.tokenizers import HF_FILE

    run_path = tokenizer_run("hf")
    model, state = load_model(run_path)
    assert state["config"]["data"]["tokenizer"] == "hf"
    assert (Path(state["checkpoint_dir"]) / HF_FILE).is_file()
    tok = checkpoint_tokenizer(state)
    assert tok.name == "hf" and tok.eot_token == "<|end_of_text|>" and tok.vocab_size == 400
    capsys.readouterr()
    prompt = "In the beginning God"
    argv = ["max_new_tokens=8", "temperature=0", "device=cpu"]
    generate_cli.main([f"checkpoint={run_path}", f"prompt={prompt}", *argv])
    printed = capsys.readouterr().out
    ids = generate(model, torch.tensor([tok.encode(prompt)]), 8, temperature=0)
    assert printed == tok.decode(ids[0].tolist()) + "\n"
    assert printed.startswith(prompt)


@pytest.mark.parametrize("name", ["gpt2", "bpe", "bytes", "hf"])
def test_export_hf_writes_a_tokenizer_auto_tokenizer_reads(tokenizer_run, tmp_path, name):
    """Every dlt-export format=hf carries the run's tokenizer: AutoTokenizer gives our ids
    and decodes them back to the text."""
    from test_tokenizers import check_auto_tokenizer

    run_path = tokenizer_run(name)
    out = tmp_path / "hf"
    export_cli.main([f"checkpoint={run_path}", "format=hf", f"out={out}"])
    files = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert files <= {p.name for p in out.iterdir()}
    _, state = load_model(run_path)
    tok = checkpoint_tokenizer(state)
    check_auto_tokenizer(out, tok)
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.eos_token_id == tok.eot_id
    assert transformers.AutoTokenizer.from_pretrained(out).model_max_length == 32


def test_resume_onto_a_dataset_with_another_hf_tokenizer_is_refused(tokenizer_run, tmp_path):
    """The same tokenizer.json with another end-of-text token: the same vocabulary size, but
    another hash, so a run (or a new run from its checkpoint) cannot continue on it."""
    import shutil

    from trainer.config import ConfigError

    run_path = tokenizer_run("hf")
    folder = tokenizer_run.root / "hf-tokenizer"
    other = prep_with_cli(
        tmp_path / "other",
        "hf",
        f"data.tokenizer_path={folder}",
        "data.eot_token='<|begin_of_text|>'",  # quoted: Hydra's override grammar
    )
    _, state = load_model(run_path)
    copy = shutil.copytree(run_path, tmp_path / "copy")
    for run_dir, extra in [(copy, {}), (tmp_path / "new", {"resume": state["checkpoint_dir"]})]:
        with pytest.raises(ConfigError, match=r"^data.tokenizer_hash=\w+ but checkpoint "):
            train_briefly(run_dir, other, "hf", **extra)
