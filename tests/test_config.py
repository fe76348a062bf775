"""Bad configuration is one clear line naming the key, before any work starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import DUMMY_DATA

from jobs.cli import compose_config, training_dict
from jobs.train import main as train_main
from trainer.config import ConfigError, load_config
from trainer.run_dir import CHECKPOINTS


def compose_train(*overrides: str):
    return load_config(training_dict(compose_config("train", list(overrides))))


def test_presets_compose_to_the_documented_shapes():
    small = compose_train("model=gpt2_small").model
    assert (small.n_layer, small.n_head, small.n_embd, small.block_size, small.vocab_size) == (
        12,
        12,
        768,
        1024,
        50257,
    )
    medium = compose_train("model=gpt2_medium").model
    assert (medium.n_layer, medium.n_embd, medium.n_head) == (24, 1024, 16)
    large = compose_train("model=gpt2_large").model
    assert (large.n_layer, large.n_embd, large.n_head) == (36, 1280, 20)
    xl = compose_train("model=gpt2_xl").model
    assert (xl.n_layer, xl.n_embd, xl.n_head) == (48, 1600, 25)
    tiny = compose_train("data=dummy")
    assert tiny.model.vocab_size == tiny.data.vocab_size == 257
    assert tiny.run.dir == "runs/tiny"
    sample = compose_train()  # the default: the embedded corpus, vocabulary from its manifest
    assert sample.data.kind == "shards" and sample.data.path == "data/sample"
    assert sample.model.vocab_size is None and sample.data.tokenizer == "bpe"


def test_global_batch_size_derives_grad_accum():
    cfg = compose_train("train.micro_batch_size=4", "train.global_batch_size=32")
    assert cfg.train.grad_accum == 8


BAD = [
    # (overrides, key the message must name)
    (["train.lr=fast"], "train.lr"),
    (["train.max_steps=1.5"], "train.max_steps"),
    (["train.foo=1"], "train.foo"),
    (["foo=1"], "foo"),
    (["model=gpt5"], "model/gpt5"),
    (["model.n_head=5"], "model.n_head"),
    (["model.n_layer=0"], "model.n_layer"),
    (["model.dropout=1.5"], "model.dropout"),
    (["model.attention=xformers"], "model.attention"),
    (["model.vocab_size=100"], "model.vocab_size"),
    (["precision=fp8"], "precision"),
    (["device=tpu"], "device"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["train.grad_accum=-1"], "train.grad_accum"),
    (["train.global_batch_size=30", "train.micro_batch_size=8"], "train.global_batch_size"),
    (["train.min_lr=1.0"], "train.min_lr"),
    (["train.warmup_steps=-1"], "train.warmup_steps"),
    (["train.beta2=1.0"], "train.beta1/beta2"),
    (["train.weight_decay=-0.1"], "train.weight_decay"),
    (["train.grad_clip=-1"], "train.grad_clip"),
    (["train.compile=maybe"], "train.compile"),
    (["eval.interval=-5"], "eval.interval"),
    (["eval.steps=0"], "eval.steps"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
    (["checkpoint.interval=-1"], "checkpoint.interval"),
    (["log.interval=0"], "log.interval"),
    (["data.kind=parquet"], "data.kind"),
    (["data.vocab_size=0"], "data.vocab_size"),
    (["parallel.tp=2"], "parallel"),
    (["resume=/no/such/checkpoint"], "/no/such/checkpoint"),
]


@pytest.mark.parametrize("overrides, key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_one_line_naming_the_key(overrides, key, capsys, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_main(["data=dummy", *overrides, f"run.dir={run_dir}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dlt-train: error: ")
    assert key in err
    assert not (run_dir / CHECKPOINTS).exists()  # nothing was started


def test_load_config_rejects_unknown_keys_and_types_directly():
    with pytest.raises(ConfigError, match="model.n_embed"):
        load_config({"model": {"n_embed": 64}})
    with pytest.raises(ConfigError, match="train.seed"):
        load_config({"train": {"seed": "abc"}})
    with pytest.raises(ConfigError, match="world size 2"):
        load_config({}, world_size=2)


def test_cli_error_from_a_real_process_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train", "data=dummy", "model.n_head=5", f"run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dlt-train: error: model.n_head=5 must divide model.n_embd=192"
    ]


@pytest.mark.parametrize("preset", ["ddp", "fsdp", "zero2", "hsdp", "tp", "pp", "fsdp_tp", "3d"])
def test_every_parallel_preset_takes_every_parallel_key(preset):
    """Presets extend `single`, so any key can be overridden on any preset."""
    composed = compose_config(
        "train",
        [
            "data=dummy",
            f"parallel={preset}",
            "parallel.fsdp_cpu_offload=true",
            "parallel.ddp_bucket_mb=50",
            "parallel.pp_schedule=gpipe",
        ],
    )
    assert composed.parallel.name == preset and composed.parallel.ddp_bucket_mb == 50


@pytest.mark.parametrize("preset", ["sample", "tinystories", "openwebtext", "dummy"])
def test_every_data_preset_takes_every_data_key(preset):
    composed = compose_config(
        "train", [f"data={preset}", "data.val_fraction=0.1", "data.chunk_mb=4", "data.hf_split=x"]
    )
    assert composed.data.name == preset and composed.data.chunk_mb == 4


def test_auto_mesh_size_fills_the_world():
    cfg = load_config({"data": DUMMY_DATA, "parallel": {"dp_shard": -1, "tp": 2}}, world_size=8)
    assert (cfg.parallel.dp_shard, cfg.parallel.tp) == (4, 2)
    with pytest.raises(ConfigError, match="only one size may be -1"):
        load_config({"parallel": {"dp_shard": -1, "tp": -1}}, world_size=4)
    with pytest.raises(ConfigError, match="not a multiple"):
        load_config({"parallel": {"dp_shard": -1, "tp": 3}}, world_size=4)
