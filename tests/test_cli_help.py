"""`--help` lists the presets of each config group and every key with its YAML comment."""

from __future__ import annotations

import re

import pytest

from jobs import eval as eval_cli
from jobs import export, generate, prep, train


def help_text(main, capsys) -> str:
    main(["--help"])
    return capsys.readouterr().out


def test_train_help_lists_the_presets_of_every_group(capsys):
    text = help_text(train.main, capsys)
    for preset in ("model=gpt2_small", "model=tiny *", "parallel=fsdp", "parallel=single *",
                   "data=dummy", "data=sample *", "cluster=dlt_local", "cluster=local *"):  # fmt: skip
        assert re.search(rf"^  {re.escape(preset)}\s", text, re.M), preset
    assert "GPT-2 124M" in text  # each preset's own description


def test_train_help_shows_the_comments_of_the_yaml_files(capsys):
    text = help_text(train.main, capsys)
    # from cluster_configs/train.yaml
    assert re.search(
        r"^  micro_batch_size: 8 +# sequences per forward/backward on each data-parallel rank$",
        text,
        re.M,
    )
    assert re.search(r"^precision: fp32 +# fp32 \| bf16 \| fp16", text, re.M)
    # from the default presets (and the presets they build on: data/base.yaml)
    assert re.search(
        r"^  pp_schedule: 1f1b +# gpipe \| 1f1b \| interleaved_1f1b \| zero_bubble$", text, re.M
    )
    assert re.search(r"^  doc_separator: eot +# eot \| line \| blank_line$", text, re.M)


@pytest.mark.parametrize(
    "main, line",
    [
        (prep.main, "  data=tinystories"),
        (generate.main, "temperature: 0.8"),
        (export.main, "format: hf"),
        (eval_cli.main, "hellaswag_examples: null"),
    ],
)
def test_every_command_help_prints_its_config(main, line, capsys):
    text = help_text(main, capsys)
    assert text.startswith("usage: dlt-") and line in text
