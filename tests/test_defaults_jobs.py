"""The jobs-side schemas declare types only: every value comes from the YAML tree.

`ClusterProfile`, `GenerateConfig`, `ExportConfig`, `PrepConfig` and `EvalJobConfig` have no default values
(a default in Python would be a second source next to `cluster_configs/`), and each config
the commands compose sets every field of its schema.
"""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from jobs.cli import compose_config, presets, to_schema
from jobs.eval import EvalJobConfig, EvalSection
from jobs.export import ExportConfig
from jobs.generate import GenerateConfig
from jobs.prep import PrepConfig
from jobs.profile import ClusterProfile

SCHEMAS = [ClusterProfile, GenerateConfig, ExportConfig, PrepConfig, EvalJobConfig, EvalSection]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_the_schema_has_no_default_values(schema):
    with_default = [
        f.name
        for f in dataclasses.fields(schema)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert with_default == [], f"{schema.__name__}: defaults belong in cluster_configs/"


def field_names(schema: type) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)}


@pytest.mark.parametrize("config", ["train", "prep"])
@pytest.mark.parametrize("name", presets("cluster"))
def test_every_cluster_profile_sets_every_key(config, name):
    composed = compose_config(config, [f"cluster={name}"])
    assert set(composed.cluster) == field_names(ClusterProfile)
    profile = to_schema(ClusterProfile, composed.cluster)
    assert profile.name == name and profile.is_local == (name == "local")


@pytest.mark.parametrize(
    "schema, config, overrides",
    [
        (GenerateConfig, "generate", ["checkpoint=runs/x"]),
        (ExportConfig, "export", ["checkpoint=runs/x", "out=exports/x"]),
        (EvalJobConfig, "eval", ["checkpoint=runs/x", "eval.hellaswag=hs.jsonl"]),
    ],
    ids=["generate", "export", "eval"],
)
def test_generate_and_export_configs_set_every_key(schema, config, overrides):
    composed = compose_config(config, overrides)
    assert set(composed) == field_names(schema)
    assert isinstance(to_schema(schema, composed), schema)


def test_the_prep_config_sets_every_key():
    composed = compose_config("prep", [])
    assert set(composed) - {"cluster", "dry_run"} == field_names(PrepConfig)
    from jobs.prep import parse

    cfg, profile, dry_run = parse([])
    assert isinstance(cfg, PrepConfig) and profile.is_local and dry_run is False
    top = OmegaConf.to_container(composed, resolve=True)
    assert (cfg.tokenizer, cfg.workers, cfg.phase, cfg.chunks) == (
        top["tokenizer"], top["workers"], top["phase"], top["chunks"],
    )  # fmt: skip
