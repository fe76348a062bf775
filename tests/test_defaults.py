"""One source of defaults, one validation on every path (submit, dry run, sweep, here)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from conftest import DUMMY_DATA
from test_cli_errors import one_error_line

import trainer.config as config_module
import trainer.train as train_module
from data_prep.config import TRAINER_KEYS
from jobs.cli import compose_config, training_dict
from jobs.train import main as train_main
from trainer.config import Config, DataConfig, to_dict
from trainer.train import run


def flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_run_and_dlt_train_use_the_same_value_for_every_omitted_key(tmp_path, monkeypatch):
    """trainer.train.run({}) and `dlt-train` (train.yaml composed by Hydra, nothing on the
    command line) train the same run: every key the trainer reads has the same value."""
    monkeypatch.chdir(tmp_path)  # run() locks the default run.dir, relative to here
    seen = {}

    def capture(cfg, world, device, stop, hooks):
        seen["cfg"] = cfg

    monkeypatch.setattr(train_module, "train", capture)
    # The default dataset (data=sample) need not exist for this comparison.
    monkeypatch.setattr(config_module, "with_dataset", lambda cfg: cfg)
    monkeypatch.setattr(config_module, "check_inputs", lambda cfg: None)
    run({})
    used = flat(to_dict(seen["cfg"]))
    composed = flat(training_dict(compose_config("train", [])))
    prep_only = {f"data.{k}" for k in config_module.PREP_ONLY_KEYS}
    expected = {k: v for k, v in composed.items() if k not in prep_only}
    assert used.keys() == expected.keys()
    differ = {k: (used[k], expected[k]) for k in used if used[k] != expected[k]}
    assert differ == {}


def test_a_key_override_gives_the_same_run_on_both_paths():
    """Interpolations follow an override the same way (run.dir follows model.name)."""
    here = config_module.load_config({"model": {"name": "mine"}, "data": DUMMY_DATA})
    there = config_module.load_config(
        training_dict(compose_config("train", ["model.name=mine", "data=dummy"]))
    )
    assert here.run.dir == there.run.dir == "runs/mine"
    assert to_dict(here) == to_dict(there)


def dataclasses_of(cls: type) -> list[type]:
    found = [cls]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found += dataclasses_of(hints[f.name])
    return found


def test_the_schema_holds_types_only():
    """Values live in cluster_configs/ alone: no dataclass of the config has a default."""
    with_default = [
        f"{cls.__name__}.{f.name}"
        for cls in dataclasses_of(Config)
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert with_default == []


def test_the_trainer_and_dlt_prep_split_the_data_section():
    trainer_keys = {f.name for f in dataclasses.fields(DataConfig)}
    assert trainer_keys - {"name", "tokenizer"} == set(TRAINER_KEYS)
    section = compose_config("train", []).data
    assert set(section) == trainer_keys | config_module.PREP_ONLY_KEYS


def test_the_config_is_immutable():
    cfg = config_module.load_config({"data": DUMMY_DATA})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


# ------------------------------------------------------------------- validation on every path


@pytest.mark.parametrize("launcher", ["sbatch", "submitit"])
def test_a_refused_layout_is_refused_before_a_dry_run_prints(launcher, tmp_path, capsys):
    """`check_layout`'s rules hold on the submit path too: nothing is printed or submitted."""
    args = [
        "cluster=dlt_local",
        f"cluster.launcher={launcher}",
        f"cluster.log_dir={tmp_path / 'logs'}",
        "parallel=fsdp",
        "precision=fp16",
        "data=dummy",
        f"run.dir={tmp_path / 'run'}",
        "dry_run=true",
    ]
    with pytest.raises(SystemExit) as exit_info:
        train_main(args)
    assert exit_info.value.code == 2
    line = one_error_line(capsys, "dlt-train")
    assert "precision=fp16 works with single/DDP layouts only; use bf16" in line
    assert "cluster.nodes=2" in line  # the world size it was checked against
    assert "#SBATCH" not in capsys.readouterr().out
    assert not (tmp_path / "logs").exists() and not (tmp_path / "run").exists()


def test_a_missing_dataset_is_refused_before_submitting(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main(
            [
                "cluster=dlt_local",
                "parallel=ddp",
                f"data.path={tmp_path / 'nowhere'}",
                f"run.dir={tmp_path / 'run'}",
                "dry_run=true",
            ]
        )
    assert "nowhere" in one_error_line(capsys, "dlt-train")


def test_the_same_layout_is_accepted_where_it_works(tmp_path, capsys):
    train_main(
        [
            "cluster=dlt_local",
            "cluster.launcher=sbatch",
            "parallel=fsdp",
            "precision=bf16",
            "data=dummy",
            f"run.dir={tmp_path / 'run'}",
            "dry_run=true",
        ]
    )
    assert "#SBATCH --nodes=2" in capsys.readouterr().out


def test_a_sweep_is_checked_whole_before_its_first_job_runs(tmp_path, capsys):
    """The second combination is refused: the first one must not have trained meanwhile."""
    run_dir = Path(tmp_path / "sweep")
    with pytest.raises(SystemExit) as exit_info:
        train_main(
            [
                "--multirun",
                "model.n_head=2,5",
                "model.n_layer=1",
                "model.n_embd=16",
                "model.block_size=8",
                "train.max_steps=1",
                "data=dummy",
                f"run.dir={run_dir}/" + "${model.n_head}",
                f"hydra.sweep.dir={tmp_path / 'hydra'}",
            ]
        )
    assert exit_info.value.code == 2
    line = one_error_line(capsys, "dlt-train")
    assert "model.n_head=5 must divide model.n_embd=16" in line
    assert "sweep job" in line
    assert not run_dir.exists()


def test_a_profile_missing_a_key_names_it_under_cluster(tmp_path, capsys):
    """Profiles get their values from cluster/slurm.yaml: one that lost a key says which."""
    with pytest.raises(SystemExit):
        train_main(["cluster=dlt_local", "~cluster.launcher", "data=dummy", "dry_run=true"])
    line = one_error_line(capsys, "dlt-train")
    assert line.startswith("dlt-train: error: cluster.launcher: ")
    assert "missing mandatory value" in line


def test_data_out_moves_the_dataset_on_both_paths():
    """data.path defaults to ${.out}: an `out` given from Python moves it as on the CLI."""
    here = config_module.load_config({"data": {"out": "data/mine"}})
    there = config_module.load_config(
        training_dict(compose_config("train", ["data.out=data/mine"]))
    )
    assert here.data.path == there.data.path == "data/mine"


def test_the_defaults_compose_inside_someone_elses_hydra_app(tmp_path):
    """A user's own Hydra app (another config tree) can call the trainer, and keeps its own
    Hydra state afterwards."""
    from hydra import compose, initialize_config_dir

    (tmp_path / "mine.yaml").write_text("x: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = config_module.load_config({"data": DUMMY_DATA, "model": {"name": "inside"}})
        assert cfg.run.dir == "runs/inside"
        assert compose(config_name="mine").x == 1


def test_a_sweep_is_split_as_hydra_splits_it():
    from jobs.sweep import job_overrides

    jobs = job_overrides(["-m", "model.init_from=null", "train.lr=1e-3,2e-3", "data=dummy"])
    assert jobs == [
        ["model.init_from=null", "train.lr=0.001", "data=dummy"],
        ["model.init_from=null", "train.lr=0.002", "data=dummy"],
    ]
    assert job_overrides(["--config-dir", "/elsewhere", "train.lr=1,2"]) is None


def test_a_valid_sweep_passes_its_check(tmp_path):
    """Values that only Hydra's job knows (${hydra:job.num}) and Hydra's own keys."""
    from jobs.sweep import check_every_job

    check_every_job(
        [
            "--multirun",
            "train.lr=1e-3,2e-3",
            "run.name=s${hydra:job.num}",
            f"hydra.searchpath=[file://{tmp_path}]",
            "model.init_from=null",
            "data=dummy",
        ]
    )


def test_a_sweep_over_nodes_is_checked_with_each_world_size(capsys):
    from jobs.sweep import sweep

    with pytest.raises(SystemExit):
        sweep(
            [
                "hydra/launcher=submitit_slurm",
                "hydra.launcher.nodes=1,2",
                "cluster=dlt_local",
                "parallel=fsdp",
                "precision=fp16",
                "data=dummy",
            ]
        )
    line = one_error_line(capsys, "dlt-train")
    assert "precision=fp16 works with single/DDP layouts only" in line
    assert "(sweep job 1: hydra/launcher=submitit_slurm hydra.launcher.nodes=2 " in line
