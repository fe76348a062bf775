"""HellaSwag-style evaluation: scoring as llm.c / nanoGPT score it, in training and dlt-eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DUMMY_DATA, tiny_config
from multiproc import spawn, train_worker
from test_tokenizers import sample_text

from data_prep import prep
from data_prep.config import corpus_config
from data_prep.shards import DatasetError
from data_prep.tokenizers import get_tokenizer
from jobs import eval as eval_cli
from trainer.config import ConfigError, load_config, model_config, resolve_config
from trainer.evals import hellaswag
from trainer.models import build_model
from trainer.run_dir import CHECKPOINTS, METRICS, read_jsonl
from trainer.train import run

pytestmark = pytest.mark.usefixtures("one_thread")

N_QUESTIONS = 7  # odd: with dp=2 the second rank's share is padded


def kjv_questions(n: int) -> list[dict]:
    """Questions from KJV verses: the first half of a verse, its own second half (the label)
    among the second halves of three other verses."""
    verses = [line for line in sample_text(20_000).splitlines() if len(line.split()) > 10]
    halves = [(" ".join(v.split()[:6]), " ".join(v.split()[6:])) for v in verses]
    questions = []
    for i in range(n):
        label = i % 4
        wrong = [halves[(i + k) % len(halves)][1] for k in (5, 9, 13)]
        endings = wrong[:label] + [halves[i][1]] + wrong[label:]
        questions.append({"ind": i, "ctx": halves[i][0], "endings": endings, "label": label})
    return questions


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hs") / "hs.jsonl", kjv_questions(N_QUESTIONS))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The start of the KJV corpus with a 300-token BPE and a validation split."""
    root = tmp_path_factory.mktemp("kjv")
    corpus = root / "kjv.txt"
    corpus.write_text(sample_text(30_000), encoding="utf-8")
    settings = dict(name="kjv", out=str(root / "ds"), input=[str(corpus)], tokenizer="bpe")
    settings |= dict(bpe_vocab_size=300, val_fraction=0.2, chunk_mb=1.0)
    prep.run_local(corpus_config(**settings), workers=1)
    return root / "ds"


def kjv_config(run_dir: Path, dataset: Path, questions: Path, **sections) -> dict:
    data = {"name": "kjv", "kind": "shards", "path": str(dataset), "tokenizer": None}
    data |= {"vocab_size": None}
    cfg = tiny_config(run_dir, data=data, checkpoint={"interval": 2, "keep": 3})
    cfg["eval"] = {"interval": 2, "steps": 1, "hellaswag": str(questions)}
    cfg["train"] |= {"max_steps": 4, "micro_batch_size": 4}
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, dataset, hellaswag_file) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    run(kjv_config(run_dir, dataset, hellaswag_file, log={"tensorboard": True}))
    return run_dir


# --- scoring -------------------------------------------------------------------------------


def reference_losses(model, tokenizer, question: dict) -> list[tuple[float, float]]:
    """(summed, mean) loss of each ending, each (context, ending) run alone, summed by hand."""
    context = tokenizer.encode_ordinary(question["ctx"])
    out = []
    for ending in question["endings"]:
        tail = list(tokenizer.encode_ordinary(" " + ending))
        ids = torch.tensor([list(context) + tail])
        logprobs = F.log_softmax(model(ids)[0].float(), dim=-1)
        start = len(context)
        losses = [-logprobs[t - 1, ids[0, t]].item() for t in range(start, ids.size(1))]
        out.append((sum(losses), sum(losses) / len(losses)))
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scores_match_each_ending_scored_alone(arch):
    torch.manual_seed(0)
    tokenizer = get_tokenizer("bytes")
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=256, vocab_size=257)
    model = build_model(model_config(arch=arch, **shape))
    model.eval()
    questions = kjv_questions(5)
    correct = correct_sum = 0
    for q in questions:
        example = hellaswag.encode(hellaswag.Question(q["ctx"], tuple(q["endings"]), q["label"]),
                                   tokenizer, block_size=256)  # fmt: skip
        with torch.no_grad():
            summed, mean = hellaswag.ending_losses(model(example.rows), example)
            expected = reference_losses(model, tokenizer, q)
        assert torch.allclose(summed, torch.tensor([s for s, _ in expected]), atol=1e-4)
        assert torch.allclose(mean, torch.tensor([m for _, m in expected]), atol=1e-5)
        correct += min(range(4), key=lambda i: expected[i][1]) == q["label"]
        correct_sum += min(range(4), key=lambda i: expected[i][0]) == q["label"]
    examples = [
        hellaswag.encode(
            hellaswag.Question(q["ctx"], tuple(q["endings"]), q["label"]), tokenizer, 256
        )
        for q in questions
    ]
    for rows in (1, 8, 100):  # one question per forward pass, two, all
        scores = hellaswag.evaluate(model, examples, torch.device("cpu"), rows_per_forward=rows)
        assert (scores.correct, scores.correct_sum, scores.total) == (correct, correct_sum, 5)


class FixedLogits(torch.nn.Module):
    """A 'model' that predicts the same distribution at every position: p(token) given."""

    def __init__(self, probs: dict[int, float], vocab: int = 257):
        super().__init__()
        rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
        p = torch.full((vocab,), rest)
        for token, value in probs.items():
            p[token] = value
        self.logprobs = p.log()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logprobs.expand(*ids.shape, -1)


def test_completion_normalised_choice_differs_from_summed_loss():
    # " aaaaaaaaa": 10 likely tokens (low mean, high sum); " b": 2 tokens, one unlikely (high
    # mean, low sum); "zz" and "qq": unlikely throughout.
    model = FixedLogits({ord(" "): 0.45, ord("a"): 0.45, ord("b"): 0.05})
    question = hellaswag.Question("x", ("zz", "aaaaaaaaa", "b", "qq"), label=1)
    example = hellaswag.encode(question, get_tokenizer("bytes"), block_size=64)
    summed, mean = hellaswag.ending_losses(model(example.rows), example)
    assert torch.allclose(mean[1], -torch.tensor(0.45).log())  # every token of " aaaaaaaaa"
    assert hellaswag.predictions(model(example.rows), example) == (1, 2)
    scores = hellaswag.evaluate(model, [example, example], torch.device("cpu"))
    assert (scores.acc, scores.acc_sum) == (1.0, 0.0)


def test_long_rows_lose_the_start_of_the_context_and_keep_the_ending():
    tokenizer = get_tokenizer("bytes")
    question = hellaswag.Question("0123456789" * 3, ("abc", "defgh"), label=0)
    example = hellaswag.encode(question, tokenizer, block_size=16)
    # the longest ending " defgh" (6 tokens) leaves 10 context tokens: its last 10
    rows = [bytes(r[: 10 + n]).decode() for r, n in zip(example.rows.tolist(), (4, 6), strict=True)]
    assert rows == ["0123456789 abc", "0123456789 defgh"]
    assert example.scored.sum(dim=1).tolist() == [4, 6]  # exactly the ending's tokens


# --- the file ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, why",
    [
        ("not json", "not a JSON object"),
        ('{"ctx": "a", "endings": ["x", "y"]}', "'label' must be the index"),
        ('{"ctx": "a", "endings": ["x", "y"], "label": 2}', "'label' must be the index"),
        ('{"ctx": "a", "endings": "xy", "label": 0}', "'endings' must be a list"),
        ('{"endings": ["x", "y"], "label": 0}', "'ctx' must be a string"),
    ],
)
def test_a_bad_line_is_named_by_file_and_line(tmp_path, bad, why):
    path = write_jsonl(tmp_path / "hs.jsonl", [kjv_questions(1)[0], bad])
    with pytest.raises(DatasetError, match=rf"^{path}:2: {why}"):
        hellaswag.read_questions(path)


def test_dlt_eval_reports_a_bad_file_in_one_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "hs.jsonl", ["{oops"])
    with pytest.raises(SystemExit) as exit_:
        eval_cli.main([f"checkpoint={tmp_path}", f"eval.hellaswag={path}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(f"dlt-eval: error: {path}:1: not a JSON object") and err.count("\n") == 1


# --- the config ----------------------------------------------------------------------------


def test_hellaswag_needs_a_tokenizer_evaluations_and_no_pipeline(tmp_path, hellaswag_file):
    shards = {"kind": "shards", "path": str(tmp_path), "vocab_size": None}
    on = {"interval": 2, "hellaswag": str(hellaswag_file)}
    cases = [
        (dict(data=dict(DUMMY_DATA), eval=on), 1, "needs data.kind=shards"),
        (dict(data=shards, eval={**on, "interval": 0}), 1, "eval.interval=0"),
        (dict(data=shards, eval=on, parallel={"pp": 2}), 2, "pipeline parallel"),
        (dict(data=shards, eval={**on, "hellaswag_examples": 0}), 1, "eval.hellaswag_examples=0"),
    ]
    for sections, world, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(tiny_config(tmp_path / "run", **sections), world_size=world)


def test_a_missing_file_fails_before_training(tmp_path, dataset):
    cfg = kjv_config(tmp_path / "run", dataset, tmp_path / "typo.jsonl")
    with pytest.raises(ConfigError, match=r"^eval.hellaswag: .*typo.jsonl: cannot read"):
        resolve_config(cfg)
    assert not (tmp_path / "run").exists()


# --- in training and dlt-eval --------------------------------------------------------------


def hellaswag_records(run_dir: Path) -> dict[int, tuple[float, float]]:
    return {
        r["step"]: (r["hellaswag_acc"], r["hellaswag_acc_sum"])
        for r in read_jsonl(run_dir / METRICS)
        if "hellaswag_acc" in r
    }


def test_training_logs_the_same_accuracy_as_dlt_eval_on_its_checkpoints(single_run, hellaswag_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = hellaswag_records(single_run)
    assert sorted(logged) == [2, 4]  # at each evaluation only
    # dlt-eval as a command on the step-2 checkpoint, in-process on the run's newest (step 4)
    out = subprocess.run(
        [sys.executable, "-m", "jobs.eval", f"checkpoint={single_run / CHECKPOINTS / 'step_2'}",
         f"eval.hellaswag={hellaswag_file}", "device=cpu"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    acc, acc_sum = logged[2]
    assert out.startswith(f"hellaswag acc {acc:.4f} ({round(acc * N_QUESTIONS)}/{N_QUESTIONS})")
    cfg = eval_cli.parse([f"checkpoint={single_run}", f"eval.hellaswag={hellaswag_file}"])
    scores, state = eval_cli.score(cfg)
    assert state["step"] == 4 and (scores.acc, scores.acc_sum) == logged[4]
    assert (scores.total, f"{acc_sum:.4f}") == (N_QUESTIONS, out.split("acc_sum ")[1][:6])

    events = EventAccumulator(str(single_run / "tensorboard"))
    events.Reload()
    series = {e.step: e.value for e in events.Scalars("hellaswag_acc")}
    assert series == pytest.approx({step: a for step, (a, _) in logged.items()})


def test_hellaswag_examples_takes_the_first_n(single_run, hellaswag_file):
    argv = [f"checkpoint={single_run}", f"eval.hellaswag={hellaswag_file}"]
    scores, _ = eval_cli.score(eval_cli.parse([*argv, "eval.hellaswag_examples=3"]))
    first_three = write_jsonl(single_run.parent / "three.jsonl", kjv_questions(3))
    alone, _ = eval_cli.score(eval_cli.parse([argv[0], f"eval.hellaswag={first_three}"]))
    assert scores.total == 3 and scores == alone


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "sizes", [{"dp_shard": 2}, {"dp_replicate": 2}, {"tp": 2}], ids=["fsdp", "ddp", "tp"]
)
def test_two_ranks_score_like_one_process(tmp_path, dataset, hellaswag_file, single_run, sizes):
    # 7 questions on 2 data-parallel ranks: 4 and 3, the second rank runs a padding pass.
    run_dir = tmp_path / "run"
    sizes = {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "pp": 1} | sizes
    cfg = kjv_config(run_dir, dataset, hellaswag_file, parallel=sizes)
    dp = sizes["dp_replicate"] * sizes["dp_shard"]
    cfg["train"]["micro_batch_size"] = 4 // dp  # the single process's global batch of 4
    spawn(2, train_worker, cfg)
    logged = hellaswag_records(run_dir)
    assert sorted(logged) == [2, 4] and logged == hellaswag_records(single_run)
