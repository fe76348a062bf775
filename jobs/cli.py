"""What every `dlt-*` command shares: composing the Hydra config and one-line errors.

We use Hydra's compose API rather than `@hydra.main`: the commands then run the same way as
`dlt-train`, `python -m jobs.train` or under `torchrun`, leave no `outputs/` folders behind,
and every configuration mistake can be reported as one line naming the key.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import textwrap
from collections.abc import Iterator
from importlib import resources

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_prep.errors import UserError
from trainer.config import CONFIG_MODULE, ConfigError, compose_tree, describe_omegaconf_error


def one_line(err: BaseException) -> str:
    """The most precise one-line description of a config error in an exception chain."""
    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    for e in chain:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            return describe_omegaconf_error(e)
    return " ".join(str(err).split())


def compose_config(
    config_name: str,
    overrides: list[str],
    literal_keys: tuple[str, ...] = (),
    with_hydra: bool = False,
) -> DictConfig:
    """The config `config_name` from `cluster_configs/` with command-line `overrides`
    (`with_hydra`: with Hydra's own node, e.g. `hydra.launcher`).

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
    try:
        cfg = compose_tree(config_name, hydra_overrides, with_hydra)
    except ValueError as err:
        if "integer string conversion" not in str(err):
            raise
        raise ConfigError(too_many_digits(hydra_overrides)) from None
    for key, value in literal.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def given_keys(overrides: list[str]) -> set[str]:
    """The keys a command line sets (`data.path=x`, `+a.b=1`, `~c` -> data.path, a.b, c): the
    config treats what the user said differently from what a preset says (see
    trainer.config._on_defaults)."""
    keys = set()
    for arg in overrides:
        if not arg.startswith("-"):
            keys.add(arg.partition("=")[0].lstrip("+~").partition("@")[0])
    return keys


def too_many_digits(overrides: list[str]) -> str:
    """The one-line error for an override whose number exceeds Python's int digit limit."""
    limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
    for arg in overrides:
        digits = max((len(run) for run in re.findall(r"\d+", arg)), default=0)
        if digits > limit:
            key, _, value = arg.partition("=")
            return (
                f"{key}={value[:12]}...: {digits} digits, more than the {limit} a number may have"
            )
    return f"a number on the command line has more than the {limit} digits a number may have"


def to_schema(schema: type, composed: DictConfig, section: str = ""):
    """The composed config (or its `section`, e.g. `cluster`) as an instance of dataclass
    `schema`; unknown keys, wrong types and missing values become a one-line ConfigError
    naming the key."""
    node = composed[section] if section else composed
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as err:
        line = describe_omegaconf_error(err)
        raise ConfigError(f"{section}.{line}" if section else line) from None


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


# Hydra's and OmegaConf's own mistakes in the configuration (ours are UserErrors).
CONFIG_ERRORS = (HydraException, OmegaConfBaseException)
EXPECTED_ERRORS = (UserError, *CONFIG_ERRORS, OSError)


def same_on_every_rank(err: BaseException) -> bool:
    """An error every rank of a torchrun job raises alike (a config key, a locked run
    directory, a diverged run): rank 0 alone prints it."""
    return isinstance(err, CONFIG_ERRORS) or getattr(err, "same_on_every_rank", False)


@contextlib.contextmanager
def errors_as_one_line(prog: str) -> Iterator[None]:
    """The one CLI edge: a :class:`UserError` (configuration, data, checkpoint, run directory,
    ...), a Hydra/OmegaConf or an OS error becomes one line `prog: error: ...`,
    exit status 2; anything else is a bug and keeps its traceback.

    Under torchrun an error that every rank has alike (configuration, a locked run directory,
    a diverged run) is printed by rank 0 only; every rank still exits with status 2.
    """
    try:
        yield
    except EXPECTED_ERRORS as err:
        if not same_on_every_rank(err) or os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {describe_error(err)}", file=sys.stderr)
        if getattr(err, "exit_at_once", False):  # no waiting for threads stuck elsewhere
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        raise SystemExit(2) from None


def describe_error(err: BaseException) -> str:
    """One line: `file: why` for an OS error that names a file, else the best message."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        names = f"{err.filename} -> {err.filename2}" if err.filename2 else f"{err.filename}"
        return f"{names}: {err.strerror}"
    return one_line(err)


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def print_help(prog: str, config_name: str, usage: str) -> None:
    """Usage, the presets of each config group, and every key with its default and comment."""
    source = config_source(config_name)
    print(f"usage: {prog} {usage}\n")
    print(header_comment(source) + "\n")
    groups = default_choices(source)
    if groups:
        print("Presets (group=name; * marks the default):")
        for line in preset_lines(groups):
            print("  " + line)
        print()
    print("Every key with its default; override any as key=value:\n")
    comments = key_comments(source)
    for group, default in groups.items():
        comments = {**preset_comments(group, default), **comments}
    print(with_comments(OmegaConf.to_yaml(compose_config(config_name, [])), comments))


# `key: value  # comment` in YAML source (a `#` after whitespace starts a comment).
KEY_LINE = re.compile(
    r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<value>.*?)(?:\s+#\s?(?P<comment>.*))?$"
)


def config_source(name: str) -> str:
    """The YAML text of `cluster_configs/<name>.yaml` (a config or `group/preset`)."""
    return (resources.files(CONFIG_MODULE) / f"{name}.yaml").read_text()


def header_comment(source: str) -> str:
    """The comment lines a YAML file starts with, without their `#`."""
    lines = []
    for line in source.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines)


def default_choices(source: str) -> dict[str, str]:
    """`group -> default preset` from a config's defaults list (groups of cluster_configs)."""
    defaults = OmegaConf.create(source).get("defaults") or []
    return {
        group: choice
        for entry in defaults
        if not isinstance(entry, str)
        for group, choice in entry.items()
        if (resources.files(CONFIG_MODULE) / group).is_dir()
    }


def presets(group: str) -> list[str]:
    folder = resources.files(CONFIG_MODULE) / group
    return sorted(
        f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml")
    )


def preset_lines(groups: dict[str, str]) -> list[str]:
    """`group=name  first sentence of its header comment` for each preset of each group."""
    labels = {
        (group, name): f"{group}={name}" + (" *" if name == default else "")
        for group, default in groups.items()
        for name in presets(group)
    }
    width = max(map(len, labels.values())) + 2
    lines = []
    for (group, name), label in labels.items():
        about = " ".join(header_comment(config_source(f"{group}/{name}")).split())
        about = about.split(". ")[0].rstrip(".")
        indent = " " * (width + 2)
        lines += textwrap.wrap(
            about, 98, initial_indent=label.ljust(width), subsequent_indent=indent
        ) or [label]
    return lines


def preset_comments(group: str, name: str) -> dict[str, str]:
    """The key comments of preset `group/name` and of the presets it builds on (its defaults)."""
    source = config_source(f"{group}/{name}")
    comments = key_comments(source, prefix=f"{group}.")
    for base in OmegaConf.create(source).get("defaults") or []:
        if isinstance(base, str) and base != "_self_":
            comments = {**preset_comments(group, base), **comments}
    return comments


def key_comments(source: str, prefix: str = "") -> dict[str, str]:
    """`dotted.key -> comment` for each `key: value  # comment` line of YAML `source`."""
    return {
        key: match["comment"].strip()
        for key, match in keyed_lines(source.splitlines(), prefix)
        if match and match["comment"]
    }


def keyed_lines(lines: list[str], prefix: str = "") -> Iterator[tuple[str, re.Match | None]]:
    """(dotted key, match) for each line: the key path is followed through the indentation
    ("" and None for lines that set no key: comments, list items)."""
    path: list[tuple[int, str]] = []
    for line in lines:
        match = KEY_LINE.match(line)
        if not match:
            yield "", None
            continue
        indent = len(match["indent"])
        while path and path[-1][0] >= indent:
            path.pop()
        path.append((indent, match["key"]))
        yield prefix + ".".join(key for _, key in path), match


def with_comments(yaml_text: str, comments: dict[str, str], column: int = 36) -> str:
    """`yaml_text` with the comment of each key appended to its line."""
    lines = yaml_text.rstrip("\n").splitlines()
    out = []
    for line, (key, _) in zip(lines, keyed_lines(lines), strict=True):
        comment = comments.get(key)
        out.append(f"{line.ljust(column - 2)}  # {comment}" if comment else line)
    return "\n".join(out)
