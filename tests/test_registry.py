"""The model registry is the one home of architecture details (trainer/models/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from trainer.config import ARCHS, model_config
from trainer.models import REGISTRY, build_model, spec_of

REPO = Path(__file__).resolve().parent.parent
GENERIC = ("trainer", "jobs", "benchmarks", "data_prep")


def attribute_names() -> set[str]:
    """Every name a registered spec gives: the model's attributes and its TP plan's modules."""
    names: set[str] = set()
    for spec in REGISTRY.values():
        names |= {spec.layers, spec.embedding, spec.output, *spec.first_stage, *spec.last_stage}
        cfg = model_config(arch=spec.arch, vocab_size=64)
        for key in spec.tp_block_plan(cfg):
            names.add(key.split(".")[-1])
    return names


def names_used(path: Path) -> set[tuple[int, str]]:
    """(line, name) of attribute accesses and of the dotted parts of string constants (not
    docstrings or comments) in one file."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.add((node.lineno, node.attr))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings:
                found |= {(node.lineno, part) for part in node.value.split(".")}
    return found


def test_no_file_outside_the_registry_names_a_models_attributes():
    names = attribute_names()
    assert {"tok_emb", "lm_head", "blocks", "q_proj"} <= names  # the check sees GPT-2's
    offenders = [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for folder in GENERIC
        for path in sorted((REPO / folder).rglob("*.py"))
        if "models" not in path.relative_to(REPO).parts
        for line, name in names_used(path)
        if name in names
    ]
    assert offenders == []


def test_the_config_knows_every_registered_architecture():
    assert set(ARCHS) == set(REGISTRY)
    for arch, spec in REGISTRY.items():
        assert spec.arch == arch


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_name_of_a_spec_is_a_part_of_its_model(arch):
    spec = spec_of(arch)
    cfg = model_config(arch=arch, n_layer=2, vocab_size=64, tie_embeddings=True)
    model = build_model(cfg)
    for name in (spec.layers, spec.embedding, spec.output, *spec.first_stage, *spec.last_stage):
        assert hasattr(model, name), name
    block = getattr(model, spec.layers)["0"]
    for key in spec.tp_block_plan(cfg):
        assert isinstance(block.get_submodule(key), torch.nn.Linear), key
    embedding, output = spec.tied(cfg)[0]
    assert model.get_parameter(embedding) is model.get_parameter(output)
