"""HellaSwag-style multiple choice: which ending of a context does the model find likeliest?

The file is HellaSwag's jsonl: one object per line with `ctx` (the context), `endings` (the
candidate continuations; HellaSwag has 4) and `label` (the index of the right one); other
fields are ignored. Scoring follows llm.c's / nanoGPT's `hellaswag.py`:

    row i   = tokens(ctx) + tokens(" " + endings[i])        (one row per ending)
    loss_i  = cross-entropy of the model's next-token predictions on the ending's tokens only
    acc     = argmin_i mean(loss_i) == label                 ("acc_norm": completion-normalised)
    acc_sum = argmin_i  sum(loss_i) == label                 (favours short endings)

Rows longer than `model.block_size` lose the start of the context (the same for every ending,
so that they are compared on one context); an ending of block_size or more tokens also loses
its end. A context that encodes to nothing starts with the end-of-text token, so the first
ending token has something to be predicted from.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from data_prep.shards import DatasetError
from data_prep.tokenizers import Tokenizer, get_tokenizer
from trainer import distributed
from trainer.config import Config
from trainer.data import tokenizer_folder

Forward = Callable[[torch.Tensor], torch.Tensor]  # token ids (B, T) -> logits (B, T, vocab)


@dataclass(frozen=True)
class Question:
    context: str
    endings: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class Example:
    """A question as token rows: one row per ending, right-padded to the longest."""

    rows: torch.Tensor  # (n_endings, T) token ids
    scored: torch.Tensor  # (n_endings, T - 1) bool: target t+1 is an ending token
    label: int


@dataclass(frozen=True)
class Scores:
    correct: int  # by mean loss per ending token (acc_norm)
    correct_sum: int  # by summed loss (acc)
    total: int

    @property
    def acc(self) -> float:
        return self.correct / self.total

    @property
    def acc_sum(self) -> float:
        return self.correct_sum / self.total

    def metrics(self) -> dict[str, float]:
        """The keys of a metrics.jsonl record."""
        return {"hellaswag_acc": self.acc, "hellaswag_acc_sum": self.acc_sum}


# ------------------------------------------------------------------------------- the file


def parse_line(line: str, where: str) -> Question:
    """One jsonl line as a Question; anything else is a DatasetError naming `where` (file:line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{where}: not a JSON object ({err.msg})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object with ctx, endings and label")
    ctx, endings, label = obj.get("ctx"), obj.get("endings"), obj.get("label")
    if not isinstance(ctx, str):
        raise DatasetError(f"{where}: 'ctx' must be a string (the context)")
    if not (
        isinstance(endings, list)
        and len(endings) >= 2
        and all(isinstance(e, str) and e for e in endings)
    ):
        raise DatasetError(f"{where}: 'endings' must be a list of at least 2 non-empty strings")
    if isinstance(label, str) and label.isdigit():  # some copies of HellaSwag store "3"
        label = int(label)
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(endings)):
        raise DatasetError(
            f"{where}: 'label' must be the index of the right ending (0..{len(endings) - 1}), "
            f"got {label!r}"
        )
    return Question(ctx, tuple(endings), label)


def read_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """The first `limit` questions of the file (None: all); blank lines are skipped."""
    questions: list[Question] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if limit is not None and len(questions) >= limit:
                    break
                if line.strip():
                    questions.append(parse_line(line, f"{path}:{number}"))
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the HellaSwag file: {err.strerror}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text (expected HellaSwag jsonl)") from None
    if not questions:
        raise DatasetError(f"{path}: no questions (expected HellaSwag jsonl)")
    return questions


def check_file(path: str | Path, limit: int | None = None) -> None:
    """Before a run starts (and waits in a queue): every question it will score parses
    (parsing 10,000 lines takes milliseconds; encoding waits for the run)."""
    read_questions(path, limit)


# ------------------------------------------------------------------------------- encoding


def encode(question: Question, tokenizer: Tokenizer, block_size: int) -> Example:
    """The question's token rows (see the module docstring for truncation)."""
    context = list(tokenizer.encode_ordinary(question.context)) or [tokenizer.eot_id]
    # " " + ending: the endings continue the context's last word, as in HellaSwag's scripts.
    endings = [list(tokenizer.encode_ordinary(" " + e)) for e in question.endings]
    keep = max(1, block_size - max(map(len, endings)))
    context = context[-keep:]
    rows = [(context + ending)[:block_size] for ending in endings]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        # position t predicts token t+1: score the predictions of the ending's tokens
        scored[i, len(context) - 1 : len(row) - 1] = True
    return Example(ids, scored, question.label)


def load_examples(
    path: str | Path, tokenizer: Tokenizer, block_size: int, limit: int | None = None
) -> list[Example]:
    return [encode(q, tokenizer, block_size) for q in read_questions(path, limit)]


def examples_for_run(cfg: Config) -> list[Example] | None:
    """A training run's `eval.hellaswag`, encoded with its dataset's tokenizer (None: off)."""
    if not cfg.eval.hellaswag:
        return None
    tokenizer = get_tokenizer(cfg.data.tokenizer, tokenizer_folder(cfg))
    return load_examples(
        cfg.eval.hellaswag, tokenizer, cfg.model.block_size, cfg.eval.hellaswag_examples
    )


# -------------------------------------------------------------------------------- scoring


def ending_losses(logits: torch.Tensor, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed, mean) cross-entropy over each ending's tokens, one value per row (ending)."""
    targets = example.rows[:, 1:].to(logits.device)
    per_token = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none"
    ).view_as(targets)
    scored = example.scored.to(logits.device)
    summed = (per_token * scored).sum(dim=1)
    return summed, summed / scored.sum(dim=1)


def predictions(logits: torch.Tensor, example: Example) -> tuple[int, int]:
    """The ending chosen by mean loss (acc_norm) and by summed loss (acc)."""
    summed, mean = ending_losses(logits, example)
    return int(mean.argmin()), int(summed.argmin())


def stacked(examples: list[Example]) -> Example:
    """Several examples as one batch of rows (right-padded to the widest; label unused)."""
    width = max(e.rows.size(1) for e in examples)
    n_rows = sum(e.rows.size(0) for e in examples)
    rows = torch.zeros(n_rows, width, dtype=torch.long)
    scored = torch.zeros(n_rows, width - 1, dtype=torch.bool)
    at = 0
    for e in examples:
        n, w = e.rows.shape
        rows[at : at + n, :w], scored[at : at + n, : w - 1] = e.rows, e.scored
        at += n
    return Example(rows, scored, label=-1)


def full_logits(forward: Forward, rows: torch.Tensor) -> torch.Tensor:
    """Logits as one plain tensor (a vocabulary-sharded DTensor is gathered)."""
    logits = forward(rows)
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


@torch.no_grad()
def evaluate(
    forward: Forward,
    examples: list[Example],
    device: torch.device,
    dp_rank: int = 0,
    dp_size: int = 1,
    autocast: contextlib.AbstractContextManager | None = None,
    rows_per_forward: int = 1,
) -> Scores:
    """Accuracy over `examples`, shared by the data-parallel ranks (collective).

    Rank r scores examples r, r + dp_size, ...; as many examples (of similar length) go into
    one forward pass as fit in `rows_per_forward` rows (at least one). Every rank runs the same number of forward
    passes (FSDP and TP forwards are collectives): a rank whose share ran out runs one on a
    padding example it does not count. Ranks of one tensor-parallel group have the same
    dp_rank, so they see the same inputs. The counts are summed over every rank."""
    # Similar widths together: less padding in a forward pass (the order does not count).
    share = sorted(examples[dp_rank::dp_size], key=lambda e: e.rows.size(1))
    per_rank = -(-len(examples) // dp_size)  # the longest share (ceil)
    per_forward = max(1, rows_per_forward // max(e.rows.size(0) for e in examples))
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct, correct_sum, total
    for start in range(0, per_rank, per_forward):
        group = share[start : start + per_forward]
        batch = stacked(group or examples[:1])  # nothing left: a padding pass
        with autocast or contextlib.nullcontext():
            logits = full_logits(forward, batch.rows.to(device))
        summed, mean = ending_losses(logits, batch)
        at = 0
        for example in group:  # its rows: at .. at + n
            n = example.rows.size(0)
            chosen = torch.stack([mean[at : at + n].argmin(), summed[at : at + n].argmin()])
            counts[:2] += chosen == example.label
            counts[2] += 1
            at += n
    # Every rank of a tensor-parallel group counted the same examples: divide by its size.
    replicas = (dist.get_world_size() if dist.is_initialized() else 1) // dp_size
    correct, correct_sum, total = (distributed.all_reduce_sum(counts) / replicas).tolist()
    return Scores(round(correct), round(correct_sum), round(total))
