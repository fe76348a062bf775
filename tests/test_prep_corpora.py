"""Corpora of any shape: one path or a list as data.input, one big document cut into chunks
(EOT only at its true end, byte-identical across worker counts and a kill -9), the validation
split carved by tokens when documents cannot give it, the summary lines, and hf:NAME streamed
(a real streamed read of a local folder; a hub name offline is one clear line)."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from test_prep import EOT, WORDS, assert_one_line_error, run_cli, tree_bytes, write

from data_prep import prep, sources
from data_prep.config import corpus_config, prep_keys
from data_prep.shards import MANIFEST
from data_prep.tokenizers import get_tokenizer

F_SETPIPE_SZ = 1031  # Linux fcntl: set a pipe's capacity


def one_document(size: int, seed: int, shape: str = "lines") -> str:
    """One document of about `size` bytes, no separator in it: lines of words (`lines`), one
    long line of words (`one_line`), or characters without any whitespace (`no_space`)."""
    rng = random.Random(seed)
    if shape == "no_space":
        return "".join(rng.choice(["a", "é", "日本", "😀", "x"]) for _ in range(size // 3))
    sep = "\n" if shape == "lines" else " "
    parts, n = [], 0
    while n < size:
        part = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
        parts.append(part)
        n += len(part.encode()) + 1
    return sep.join(parts)


def prep_argv(out: Path, corpus: Path | str, *extra: str) -> list[str]:
    """dlt-prep arguments with data.input as ONE path (the form the user's report tried)."""
    return [
        "data=sample",
        f"data.input='{corpus}'",
        f"data.out='{out}'",
        "tokenizer=bytes",
        "data.chunk_mb=0.05",
        "data.val_fraction=0.02",
        *extra,
    ]


def run_prep(out: Path, corpus: Path, *extra: str) -> str:
    """`python -m jobs.prep ...` in a subprocess; its output."""
    done = subprocess.run(
        [sys.executable, "-m", "jobs.prep", *prep_argv(out, corpus, *extra)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def chunk_tokens(out: Path, manifest: dict) -> list[np.ndarray]:
    """Per chunk, its training then its validation tokens (the chunk's text, in order)."""
    per_chunk = []
    for i in range(manifest["num_chunks"]):
        parts = [out / split / f"{i:05d}.npy" for split in ("train", "val")]
        per_chunk.append(np.concatenate([np.load(p) for p in parts if p.is_file()]))
    return per_chunk


def assert_whole_document(out: Path, text: str, tokenizer: str = "bytes") -> None:
    """The chunks' tokens, put back together, are the document and exactly one EOT, at its
    end: a cut never puts an EOT inside the document."""
    manifest = json.loads((out / MANIFEST).read_text())
    tok = get_tokenizer(tokenizer)
    ids = np.concatenate(chunk_tokens(out, manifest))
    assert int((ids == tok.eot_id).sum()) == 1 and ids[-1] == tok.eot_id
    assert tok.decode(ids[:-1].tolist()) == text.strip()


# --- data.input: one path or a list ---------------------------------------------------------


def test_scalar_input_from_the_command_line(tmp_path):
    """`dlt-prep data.input=books.txt` (no brackets) works, as does data.val_input=FILE."""
    docs = [f"document {i}: " + " ".join(WORDS[i % 7 :]) for i in range(50)]
    corpus = write(tmp_path / "books.txt", EOT.join(docs).encode())
    valid = write(tmp_path / "valid.txt", b"a validation document")
    out = tmp_path / "ds"
    run_prep(out, corpus, f"data.val_input='{valid}'", "data.val_fraction=0")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["splits"]["train"]["num_documents"] == 50
    assert manifest["splits"]["val"]["num_documents"] == 1
    assert manifest["val_split"]["by"] == "none" and manifest["val_split"]["val_input_files"] == 1


def test_scalar_input_in_python_and_yaml(tmp_path):
    assert corpus_config(input="books.txt", val_input="v.txt").input == ["books.txt"]
    assert corpus_config(input="books.txt", val_input="v.txt").val_input == ["v.txt"]
    assert corpus_config(input=["a.txt", "b/*.txt"]).input == ["a.txt", "b/*.txt"]
    section = OmegaConf.create("input: books.txt\nval_input: hf:org/name\n")
    assert list(prep_keys(section).input) == ["books.txt"]
    assert list(prep_keys(section).val_input) == ["hf:org/name"]


# --- one big document -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> tuple[Path, str, Path, str]:
    """A ~300 KB one-document text file (no separator, like input.txt) and its prep on 2
    workers with chunk_mb=0.05: (corpus, its text, dataset folder, dlt-prep's output)."""
    tmp = tmp_path_factory.mktemp("book")
    text = "\n" + one_document(300_000, seed=1) + "\n\n"
    corpus = write(tmp / "book.txt", text.encode())
    out = tmp / "two_workers"
    return corpus, text, out, run_prep(out, corpus, "workers=2")


def test_one_document_uses_every_worker_and_carves_validation_by_tokens(book):
    corpus, text, out, stdout = book
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["num_chunks"] >= 5  # ~300 KB / 0.05 MB: one document, several chunks
    assert "to do with 2 workers" in stdout
    val, train = manifest["splits"]["val"], manifest["splits"]["train"]
    assert manifest["val_split"]["by"] == "tokens"
    assert "longer than a chunk" in manifest["val_split"]["reason"]
    # the last 2% of each chunk's tokens: non-empty, the requested share (to a token a chunk)
    total = val["num_tokens"] + train["num_tokens"]
    assert abs(val["num_tokens"] - 0.02 * total) <= manifest["num_chunks"]
    assert len(val["shards"]) == len(train["shards"]) == manifest["num_chunks"]
    assert val["num_documents"] == 1 and train["num_documents"] == 0  # it ends in a val part
    assert_whole_document(out, text)


def test_one_document_prep_prints_a_summary(book):
    *_, stdout = book
    lines = stdout.splitlines()
    summary = next(line for line in lines if line.startswith("dlt-prep: 1 document,"))
    assert "chunks, 0.29 MB of text files -> train " in summary and ", val " in summary
    assert any(line.startswith("dlt-prep: validation split by tokens (") for line in lines)
    rate = next(line for line in lines if "chunks tokenized here" in line)
    assert "on 2 workers in " in rate and " MB/s, " in rate and " tok/s" in rate


def test_one_document_is_the_same_on_one_worker(book, tmp_path):
    corpus, _, out, _ = book
    run_prep(tmp_path / "one", corpus, "workers=1")
    assert tree_bytes(tmp_path / "one") == tree_bytes(out)  # every shard, record, manifest


def test_one_document_killed_mid_way_resumes_to_identical_output(book, tmp_path):
    """kill -9 of the dlt-prep process group while chunks are being written, then a re-run:
    the same bytes as the uninterrupted run. The kill is made certain to land mid-way by
    pausing dlt-prep on its stdout: a pipe of one page that the test fills up after the
    first 'chunk 0 done' line, so dlt-prep blocks on its next progress line."""
    corpus, _, reference, _ = book
    out = tmp_path / "killed"
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
    filler = os.open(f"/proc/self/fd/{write_end}", os.O_WRONLY | os.O_NONBLOCK)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.prep", *prep_argv(out, corpus, "workers=1")],
        stdout=write_end,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, killed as one
    )
    os.close(write_end)
    try:
        seen = b""
        while b"chunk 0 done" not in seen:
            block = os.read(read_end, 4096)
            assert block, seen.decode()
            seen += block
        fill_pipe(filler)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(filler)
        os.close(read_end)
    assert proc.returncode == -signal.SIGKILL
    total = json.loads((reference / MANIFEST).read_text())["num_chunks"]
    done = len(list((out / "chunks").glob("*.json")))
    assert 1 <= done < total and not (out / MANIFEST).exists()
    stdout = run_prep(out, corpus, "workers=2")
    assert f"{total} chunks, {done} already done" in stdout
    assert tree_bytes(out) == tree_bytes(reference)


def fill_pipe(fd: int) -> None:
    """Write into a non-blocking pipe until it is full."""
    for size in (512, 1):
        try:
            while os.write(fd, b"\0" * size):
                pass
        except BlockingIOError:
            continue


@pytest.mark.parametrize("shape", ["lines", "one_line", "no_space"])
@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_a_cut_never_puts_an_end_of_text_inside_a_document(tmp_path, shape, tokenizer):
    """Cut at a line end, else whitespace, else a UTF-8 character boundary: each chunk is
    valid UTF-8, the pieces join up to the document and only its end has an EOT."""
    text = one_document(60_000, seed=2, shape=shape)
    cfg = corpus_config(
        name="t", out=str(tmp_path / "ds"), input=str(write(tmp_path / "c.txt", text.encode())),
        tokenizer=tokenizer, chunk_mb=0.01, val_fraction=0.05,
    )  # fmt: skip
    manifest = prep.run_local(cfg, workers=1)
    chunks = [
        sources.Chunk(**c) for c in json.loads((Path(cfg.out) / prep.PLAN).read_text())["chunks"]
    ]
    assert len(chunks) >= 4 and all(c.ends_inside for c in chunks[:-1])
    assert manifest["val_split"]["by"] == "tokens"
    raw = text.encode()
    for c in chunks[:-1]:
        cut = raw[c.end - 1 : c.end]
        if shape == "lines":
            assert cut == b"\n"
        elif shape == "one_line":
            assert cut == b" "
        raw[c.start : c.end].decode()  # a character boundary: whole UTF-8 characters
    assert_whole_document(Path(cfg.out), text, tokenizer)


# --- the validation split: documents or tokens ----------------------------------------------


@pytest.mark.parametrize(
    ("n_docs", "setting", "by"),
    [(2000, "auto", "documents"), (50, "auto", "tokens"), (50, "documents", "documents"),
     (2000, "tokens", "tokens")],
)  # fmt: skip
def test_the_validation_split_is_made_as_planned(tmp_path, n_docs, setting, by):
    """auto: whole documents when at least MIN_VAL_DOCUMENTS are expected in validation,
    else the last val_fraction of each chunk's tokens; data.val_split forces either."""
    rng = random.Random(n_docs)
    docs = [f"doc {i}: " + " ".join(rng.choices(WORDS, k=20)) for i in range(n_docs)]
    cfg = corpus_config(
        name="t", out=str(tmp_path / "ds"), input=str(write(tmp_path / "c.txt", EOT.join(docs).encode())),
        tokenizer="bytes", chunk_mb=0.02, val_fraction=0.02, val_split=setting,
    )  # fmt: skip
    manifest = prep.run_local(cfg, workers=1)
    assert manifest["val_split"]["by"] == by
    val = manifest["splits"].get("val", {"num_tokens": 0, "num_documents": 0})
    share = val["num_tokens"] / (val["num_tokens"] + manifest["splits"]["train"]["num_tokens"])
    if by == "tokens":
        assert 0.015 < share <= 0.02
    elif n_docs == 2000:
        assert 20 <= val["num_documents"] <= 70  # ~2% of the documents, each one whole
    tok = get_tokenizer("bytes")
    text = tok.decode(np.concatenate(chunk_tokens(Path(cfg.out), manifest)).tolist())
    if by == "tokens":  # chunk by chunk, train then val: the corpus itself
        assert text == "".join(d + EOT for d in docs)


def test_phases_of_an_array_job_print_the_totals(tmp_path, capsys):
    """phase=plan, two phase=chunks parts (as two array tasks), phase=finalize: the finalize
    step prints the summary of all chunks."""
    text = one_document(200_000, seed=3)
    corpus = write(tmp_path / "book.txt", text.encode())
    out = tmp_path / "ds"
    base = prep_argv(out, corpus, "workers=1")
    for phase in ("phase=plan", "phase=chunks chunks=0/2", "phase=chunks chunks=1/2"):
        code, _, err = run_cli(capsys, *base, *phase.split())
        assert code == 0, err
    code, stdout, err = run_cli(capsys, *base, "phase=finalize")
    assert code == 0, err
    assert "dlt-prep: 1 document, " in stdout and "val " in stdout
    assert "dlt-prep: validation split by tokens" in stdout
    assert "tokenized by the array tasks" in stdout
    assert_whole_document(out, text)


# --- hf:NAME, streamed ----------------------------------------------------------------------


@pytest.fixture
def jsonl_folder(tmp_path, monkeypatch) -> tuple[Path, list[str]]:
    """A local folder of two JSONL files that `datasets` streams (the json builder)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rng = random.Random(9)
    docs = [f"row {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(5, 60))) for i in range(400)]
    folder = tmp_path / "jl"
    for part, rows in enumerate((docs[:250], docs[250:])):
        lines = [json.dumps({"text": d}) for d in rows]
        write(folder / f"part-{part}.jsonl", ("\n".join(lines) + "\n").encode())
    return folder, docs


def test_hf_input_is_streamed_in_chunks_of_fixed_rows(tmp_path, jsonl_folder, monkeypatch):
    """hf:FOLDER is read with load_dataset(..., streaming=True) (a real stream), chunk k is
    rows [k*R, (k+1)*R), and 1 or 2 workers, or a chunk lost and redone, give the same bytes."""
    import datasets

    folder, docs = jsonl_folder
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append(kwargs.get("streaming"))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    settings = dict(name="t", input=f"hf:{folder}", tokenizer="bytes", chunk_mb=0.005)
    one = corpus_config(**settings, out=str(tmp_path / "one"))
    manifest = prep.run_local(one, workers=1)
    assert calls and all(calls)  # every read was a streamed one
    stream = json.loads((tmp_path / "one" / prep.PLAN).read_text())["streams"][0]
    rows_per_chunk = stream["rows_per_chunk"]
    assert stream["rows"] == 400 and manifest["num_chunks"] == -(-400 // rows_per_chunk) >= 3
    tok = get_tokenizer("bytes")
    for k, ids in enumerate(chunk_tokens(tmp_path / "one", manifest)):
        rows = docs[k * rows_per_chunk : (k + 1) * rows_per_chunk]
        assert tok.decode(ids.tolist()) == "".join(d + EOT for d in rows)

    two = corpus_config(**settings, out=str(tmp_path / "two"))
    prep.run_local(two, workers=2)
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")
    (tmp_path / "two" / "train" / "00001.npy").unlink()  # a lost shard: its chunk is redone
    prep.run_local(two, workers=2)
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")


def test_hf_hub_name_offline_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "hf:no-such-org/no-such-dataset"
    code, _, err = run_cli(capsys, *prep_argv(tmp_path / "ds", spec))
    line = assert_one_line_error(code, err)
    assert f"data.input: {spec}: cannot stream it from the Hugging Face hub" in line
    assert "save_to_disk" in line and "hf-disk:DIR" in line


def test_a_chunk_ending_exactly_at_a_separator_is_not_a_cut():
    """A separator that ends exactly at start + chunk_bytes, then no separator for a whole
    chunk: the chunk ends at that document end, which is not a cut inside a document."""
    import io

    separator = EOT.encode()
    data = b"a" * (20 - len(separator)) + separator + b"b" * 50
    bounds, size, _ = sources.chunk_bounds(io.BytesIO(data), separator, 20)
    assert size == len(data)
    assert (bounds[0].start, bounds[0].end, bounds[0].ends_inside) == (0, 20, False)
    assert [b.ends_inside for b in bounds[1:-1]] == [True] * (len(bounds) - 2)  # real cuts
    assert bounds[-1].end == len(data) and not bounds[-1].ends_inside
