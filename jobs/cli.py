"""What every `dlt-*` command shares: composing the Hydra config and one-line errors.

We use Hydra's compose API rather than `@hydra.main`: the commands then run the same way as
`dlt-train`, `python -m jobs.train` or under `torchrun`, leave no `outputs/` folders behind,
and every configuration mistake can be reported as one line naming the key.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_prep.shards import DatasetError
from data_prep.sources import DataError
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, describe_omegaconf_error

CONFIG_MODULE = "cluster_configs"


def one_line(err: BaseException) -> str:
    """The most precise one-line description of a config error in an exception chain."""
    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            return describe_omegaconf_error(e)
    return " ".join(str(err).split())


def compose_config(
    config_name: str, overrides: list[str], literal_keys: tuple[str, ...] = ()
) -> DictConfig:
    """The config `config_name` from `cluster_configs/` with command-line `overrides`.

    Values of `literal_keys` (free text such as a prompt) are taken verbatim instead of being
    parsed by Hydra's override grammar, where `prompt="Once upon a time,"` (after the shell
    removed the quotes) would read as a list because of its comma.
    """
    literal = {}
    hydra_overrides = []
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if sep and key in literal_keys:
            literal[key] = value.replace("${", "\\${")  # no interpolation inside free text
        else:
            hydra_overrides.append(arg)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=hydra_overrides)
    for key, value in literal.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def to_schema(schema: type, composed: DictConfig):
    """The composed config as an instance of dataclass `schema` (unknown keys and wrong types
    become a one-line ConfigError naming the key)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), composed))
    except OmegaConfBaseException as err:
        raise ConfigError(describe_omegaconf_error(err)) from None


# Keys of dlt-train's config that say where and how to launch, not what to train.
LAUNCH_KEYS = ("cluster", "dry_run", "hydra")


def training_dict(composed: DictConfig) -> dict:
    """dlt-train's composed config as the plain dict `trainer.config.load_config` takes."""
    return to_plain(composed, drop=LAUNCH_KEYS)


def to_plain(cfg: DictConfig, drop: tuple[str, ...] = ()) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in drop:
        plain.pop(key, None)
    return plain


@contextlib.contextmanager
def errors_as_one_line(prog: str) -> Iterator[None]:
    """Turn configuration, data and checkpoint errors into `prog: error: ...`, exit status 2."""
    expected = (
        ConfigError,
        CheckpointError,
        DataError,
        DatasetError,
        HydraException,
        OmegaConfBaseException,
    )
    try:
        yield
    except expected as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def print_help(prog: str, config_name: str, usage: str) -> None:
    print(f"usage: {prog} {usage}\n")
    print("Any key below can be overridden as key=value; presets as group=name.\n")
    print(OmegaConf.to_yaml(compose_config(config_name, [])))
