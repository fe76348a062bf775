"""dlt-prep: corpus -> shards round trips, chunk boundaries, validation split, restartability
(real signals), corruption repair, one-line errors, the process pool and the trained BPE."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from data_prep import prep, sources
from data_prep.config import TRAINER_KEYS, CorpusConfig, CorpusConfigError, corpus_config
from data_prep.shards import MANIFEST
from data_prep.sources import DataError, chunk_bounds, open_binary, plan_file
from data_prep.tokenizers import BPE_FILE, get_tokenizer, load_bpe, save_bpe, train_bpe
from jobs import prep as prep_cli

EOT = "<|endoftext|>"
# Words with accents, CJK, emoji (incl. multi-code-point ones), apostrophes, digits, tabs.
WORDS = [
    "the", "cat", "sat", "on", "a", "mat", "café", "naïve", "façade", "Ünïcödé", "Ελληνικά",
    "日本語", "中文", "한국어", "😀", "👍🏽", "🇫🇷", "don't", "they'll", "42", "3.14", "—",
    "«quoted»", "x\ty", "Once", "upon", "time,", "story.",
]  # fmt: skip


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_docs(seed: int, n: int = 80, newlines: bool = True) -> list[str]:
    """Documents (no surrounding whitespace), a few of them longer than a 0.002 MB chunk."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if i % 25 == 7:
            doc = words(rng, 1200, 1500)  # ~8 KB: longer than a chunk
        elif newlines and rng.random() < 0.5:
            doc = "\n".join(words(rng, 1, 12) for _ in range(rng.randint(2, 4)))
        else:
            doc = words(rng, 1, 40)
        docs.append(doc)
    return docs


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def text_corpus(separator: str, seed: int) -> tuple[str, list[str]]:
    """(file text, expected documents): the documents come with surrounding whitespace and
    empty / whitespace-only pieces between separators, which prep must trim and drop."""
    rng = random.Random(seed)
    docs = make_docs(seed, newlines=separator != "line")
    pieces = []
    for doc in docs:
        pieces.append(rng.choice(["", " ", "\t", "  \n"] if separator != "line" else ["", " "]))
        pieces[-1] += doc + rng.choice(["", " ", "\t ", "\r"])
        if rng.random() < 0.1:
            pieces.append(rng.choice(["", "   ", "\t"]))  # an empty document
    if separator == "eot":
        text = "\n" + "".join(p + rng.choice(["\n" + EOT + "\n", EOT, EOT + EOT]) for p in pieces)
    elif separator == "line":
        text = "\n".join(pieces) + "\n"
    else:
        text = "".join(p + rng.choice(["\n\n", "\n\n\n", "\n \t\n", "\r\n\r\n"]) for p in pieces)
    expected = [p.strip() for p in pieces if p.strip()]
    assert expected == docs
    return text, expected


def jsonl_corpus(seed: int) -> tuple[str, list[str]]:
    rng = random.Random(seed)
    docs = make_docs(seed)
    lines = []
    for i, doc in enumerate(docs):
        lines.append(json.dumps({"id": i, "text": doc}, ensure_ascii=rng.random() < 0.3))
        if rng.random() < 0.1:
            lines.append("")  # blank lines are not documents
    lines.append(json.dumps({"text": "   "}))  # whitespace only: not a document
    return "\n".join(lines) + "\n", docs


def data_config(tmp: Path, inputs: list[str], tokenizer: str = "bytes", **kw) -> CorpusConfig:
    settings = dict(
        name="t",
        out=str(tmp / "ds"),
        input=inputs,
        tokenizer=tokenizer,
        doc_separator="eot",
        format="auto",
        chunk_mb=0.002,
        val_fraction=0.0,
        bpe_vocab_size=300,
    )
    settings.update(kw)
    return corpus_config(**settings)


def tokenizer_of(out: Path, manifest: dict):
    if manifest["tokenizer"]["name"] == "bpe":
        return load_bpe(out / manifest["tokenizer"]["file"])
    return get_tokenizer(manifest["tokenizer"]["name"])


def split_tokens(out: Path, manifest: dict, split: str) -> np.ndarray:
    shards = manifest["splits"][split]["shards"]
    return np.concatenate([np.load(out / e["file"]) for e in shards])


def expected_ids(docs: list[str], tok) -> np.ndarray:
    ids: list[int] = []
    for doc in docs:
        ids += list(doc.encode()) if tok.name == "bytes" else tok.encode(doc)
        ids.append(tok.eot_id)
    return np.array(ids)


def tree_bytes(out: Path, exclude: tuple[str, ...] = ("plan.json",)) -> dict[str, bytes]:
    """Every file of a dataset folder, by relative path (plan.json holds input paths)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in exclude
    }


# --- 1. round trips -------------------------------------------------------------------------


def build_source(kind: str, tmp: Path) -> tuple[list[str], list[str], dict]:
    """(inputs, expected documents, extra CorpusConfig settings) of one source kind."""
    if kind.startswith("txt"):
        separator = {"txt-line": "line", "txt-blank_line": "blank_line"}.get(kind, "eot")
        text, docs = text_corpus(separator, seed=len(kind))
        name = "corpus.txt.gz" if kind == "txt-gz" else "corpus.txt"
        return [str(write(tmp / name, text.encode()))], docs, {"doc_separator": separator}
    if kind.startswith("jsonl"):
        text, docs = jsonl_corpus(seed=3)
        name = "corpus.jsonl.gz" if kind == "jsonl-gz" else "corpus.jsonl"
        return [str(write(tmp / name, text.encode()))], docs, {}
    assert kind == "hf-disk"
    datasets = pytest.importorskip("datasets")
    docs = make_docs(seed=4)
    datasets.Dataset.from_dict({"text": docs + ["  ", ""]}).save_to_disk(str(tmp / "hfds"))
    return [f"hf-disk:{tmp / 'hfds'}"], docs, {}


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe", "bytes"])
@pytest.mark.parametrize(
    "kind", ["txt-eot", "txt-line", "txt-blank_line", "txt-gz", "jsonl", "jsonl-gz", "hf-disk"]
)
def test_round_trip(tmp_path, kind, tokenizer):
    inputs, docs, extra = build_source(kind, tmp_path)
    cfg = data_config(tmp_path, inputs, tokenizer, **extra)
    manifest = prep.run_local(cfg, workers=1)
    out = Path(cfg.out)
    tok = tokenizer_of(out, manifest)

    assert manifest["num_chunks"] >= 3  # chunk boundaries are exercised
    assert list(manifest["splits"]) == ["train"]
    train = manifest["splits"]["train"]
    tokens = split_tokens(out, manifest, "train")
    assert tok.decode(tokens.tolist()) == "".join(doc + EOT for doc in docs)
    chunks = [sources.Chunk(**c) for c in json.loads((out / prep.PLAN).read_text())["chunks"]]
    cuts = sum(c.ends_inside for c in chunks)
    assert (cuts > 0) == kind.startswith("txt")  # the ~8 KB documents: JSONL lines are not cut
    if tok.name == "bytes" or not cuts:
        assert np.array_equal(tokens, expected_ids(docs, tok))
    else:  # BPE merges across a cut differ from the whole document's: a few tokens per cut
        assert abs(tokens.size - expected_ids(docs, tok).size) <= 4 * cuts
    assert train["num_documents"] == len(docs)
    assert train["num_tokens"] == tokens.size
    assert (tokens == tok.eot_id).sum() == len(docs)
    assert manifest["skipped_documents"].get("missing_field", 0) == 0
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["eot_id"] == tok.eot_id
    assert (
        manifest["tokenizer"]["vocab_size"] == {"gpt2": 50257, "bpe": 300, "bytes": 257}[tokenizer]
    )
    files = [e["file"] for e in train["shards"]]
    # shards in chunk order (a chunk of only empty documents has none)
    assert files == sorted(set(files)) and 3 <= len(files) <= manifest["num_chunks"]
    for entry in train["shards"]:
        path = out / entry["file"]
        shard = np.load(path)
        assert shard.dtype == np.uint16 and shard.ndim == 1
        assert shard.size == entry["num_tokens"]
        index = int(Path(entry["file"]).stem)
        assert (shard[-1] == tok.eot_id) != chunks[index].ends_inside  # EOT only at true ends
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["bytes"] == path.stat().st_size
    assert sum(e["num_documents"] for e in train["shards"]) == len(docs)


def test_hf_local_json_folder(tmp_path, monkeypatch):
    """hf:<folder of .jsonl files> goes through datasets.load_dataset (the json builder)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    text, docs = jsonl_corpus(seed=5)
    write(tmp_path / "jl" / "part.jsonl", text.encode())
    cfg = data_config(tmp_path, [f"hf:{tmp_path / 'jl'}"])
    manifest = prep.run_local(cfg, workers=1)
    assert manifest["num_chunks"] >= 3
    tokens = split_tokens(Path(cfg.out), manifest, "train")
    assert get_tokenizer("bytes").decode(tokens.tolist()) == "".join(d + EOT for d in docs)


def test_several_inputs_keep_their_order(tmp_path):
    a, docs_a = text_corpus("eot", seed=11)
    b, docs_b = jsonl_corpus(seed=12)
    inputs = [
        str(write(tmp_path / "b.txt", a.encode())),
        str(write(tmp_path / "a.jsonl", b.encode())),
    ]
    cfg = data_config(tmp_path, inputs)
    manifest = prep.run_local(cfg, workers=1)
    tokens = split_tokens(Path(cfg.out), manifest, "train")
    assert get_tokenizer("bytes").decode(tokens.tolist()) == "".join(
        d + EOT for d in docs_a + docs_b
    )


# --- 2. chunk boundaries --------------------------------------------------------------------


def random_stream(rng: random.Random, separator: bytes, size: int) -> bytes:
    """Bytes with separators, newlines, spaces and multi-byte UTF-8 characters; some streams
    have long runs without a separator (or without any whitespace) that must be cut."""
    sep_p = rng.choice([0.3, 0.02, 0.0])
    pieces = [b"a", b"bc", b"\n", b"<|", b"|>", b" ", "é".encode(), "😀".encode()]
    if rng.random() < 0.3:
        pieces = [b"a", "日".encode(), "😀".encode()]  # no whitespace: cut at a character
    parts: list[bytes] = []
    while sum(map(len, parts)) < size:
        parts.append(separator if rng.random() < sep_p else rng.choice(pieces))
    return b"".join(parts)


def expected_cut(data: bytes, target: int, limit: int) -> int:
    """Where a document longer than a chunk is cut (the rule, restated for the test)."""
    if (i := data.find(b"\n", target, limit)) >= 0:
        return i + 1
    if match := re.compile(rb"\s").search(data, target, limit):
        return match.end()
    i = target
    while i < len(data) and data[i] & 0xC0 == 0x80:
        i += 1
    return i


@pytest.mark.parametrize("block", [7, 64, sources.BLOCK])
@pytest.mark.parametrize("separator", [b"<|endoftext|>", b"\n", b"\n\n"])
@pytest.mark.parametrize("cut", [True, False])
def test_chunk_bounds_property(monkeypatch, block, separator, cut):
    """Each chunk ends just past the first separator that ends after start + chunk_bytes;
    with `cut`, when none begins within another chunk_bytes, the document is cut at the first
    line end, else whitespace, else UTF-8 character boundary after start + chunk_bytes (and
    the chunk says it ends inside a document). Chunks cover the data exactly."""
    monkeypatch.setattr(sources, "BLOCK", block)
    rng = random.Random(f"{block}-{separator!r}-{cut}")
    n = len(separator)
    cases = cuts = 0
    for trial in range(60):
        data = random_stream(rng, separator, rng.choice([0, 1, 20, 300, 2000]))
        if trial % 10 == 0:
            data += separator  # ending exactly on a separator
        chunk_bytes = rng.choice([1, 3, 13, 50, 400])
        bounds, total, separators = chunk_bounds(io.BytesIO(data), separator, chunk_bytes, cut)
        assert total == len(data)
        if separator != b"\n\n":  # (counted per chunk: a run of newlines may straddle two)
            assert separators == data.count(separator)
        assert [b.start for b in bounds[1:]] == [b.end for b in bounds[:-1]]
        assert not bounds or (bounds[0].start == 0 and bounds[-1].end == len(data))
        for b in bounds:
            target, limit = b.start + chunk_bytes, b.start + 2 * chunk_bytes
            first = data.find(separator, max(0, target - n + 1))
            if b.ends_inside:
                cuts += 1
                assert cut and (first < 0 or first >= limit) and len(data) > limit
                assert b.end == expected_cut(data, target, limit)
            elif b is not bounds[-1] and first == b.end - n:  # the first document end
                assert not cut or first < limit
            elif b is not bounds[-1]:  # a cut that fell just past a separator ending at target
                assert cut and (first < 0 or first >= limit)
                assert b.end == target == expected_cut(data, target, limit)
                assert data[b.end - n : b.end] == separator
            else:  # the last chunk: the rest, whole
                assert first < 0 or first + n == len(data)
                if cut and first < 0 and len(data) > limit:  # a cut at the very end: no cut
                    assert expected_cut(data, target, limit) == len(data)
                elif cut and first >= 0:
                    assert first < limit
        assert not bounds[-1].ends_inside if bounds else data == b""
        cases += len(bounds) > 2
    assert cases > 10  # most streams really were cut into several chunks
    assert (cuts > 5) == cut  # and documents longer than a chunk were cut (only with `cut`)


@pytest.mark.parametrize("name", ["c.txt", "c.txt.gz"])
def test_planned_chunks_cover_the_file(tmp_path, monkeypatch, name):
    monkeypatch.setattr(sources, "BLOCK", 5)
    text, _ = text_corpus("eot", seed=21)
    data = text.encode()
    path = write(tmp_path / name, data)
    cfg = data_config(tmp_path, [str(path)], chunk_mb=0.001)
    chunks, _ = plan_file(str(path), "text", "train", cfg)
    assert len(chunks) > 10
    assert chunks[0].start == 0 and chunks[-1].end == len(data)
    read = b""
    for c, d in zip(chunks, chunks[1:], strict=False):
        assert c.end == d.start
    for c in chunks:
        with open_binary(str(path)) as f:
            f.seek(c.start)
            read += f.read(c.end - c.start)
        # a chunk starts after a separator, or (only) where the previous one cut a document
        assert c.start == 0 or data[: c.start].endswith(EOT.encode()) != c.starts_inside
    assert [c.starts_inside for c in chunks[1:]] == [c.ends_inside for c in chunks[:-1]]
    assert any(c.ends_inside for c in chunks) and not chunks[-1].ends_inside
    assert read == data


# --- 3. validation split --------------------------------------------------------------------


def distinct_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + words(rng, 1, 8) for i in range(n)]


def decoded_docs(out: Path, manifest: dict, split: str) -> list[str]:
    if split not in manifest["splits"]:
        return []
    text = get_tokenizer("bytes").decode(split_tokens(out, manifest, split).tolist())
    assert text.endswith(EOT)
    return text.split(EOT)[:-1]


def test_val_fraction_is_a_stable_content_based_subset(tmp_path):
    docs = distinct_docs(1000, seed=31)
    corpus = write(tmp_path / "c.txt", (EOT.join(docs)).encode())
    held_out = []
    for i, chunk_mb in enumerate([0.002, 0.002, 0.01]):
        cfg = data_config(tmp_path, [str(corpus)], val_fraction=0.1, chunk_mb=chunk_mb)
        cfg.out = str(tmp_path / f"ds{i}")
        manifest = prep.run_local(cfg, workers=1)
        train = decoded_docs(Path(cfg.out), manifest, "train")
        val = decoded_docs(Path(cfg.out), manifest, "val")
        assert not set(train) & set(val)
        assert sorted(train + val) == sorted(docs)
        # each split keeps the corpus order
        assert train == [d for d in docs if d in set(train)]
        assert val == [d for d in docs if d in set(val)]
        assert manifest["splits"]["val"]["num_documents"] == len(val)
        assert manifest["splits"]["train"]["num_documents"] == len(train)
        assert 60 <= len(val) <= 140  # ~10% of 1000
        held_out.append(val)
    # the same documents every run, whatever the chunking
    assert held_out[0] == held_out[1] == held_out[2]


@pytest.mark.parametrize("val_fraction", [0.0, 0.2])
def test_val_input_goes_only_to_validation(tmp_path, val_fraction):
    train_docs, val_docs = distinct_docs(300, seed=41), distinct_docs(50, seed=42)
    val_docs = [f"valid {d}" for d in val_docs]
    train_file = write(tmp_path / "train.txt", EOT.join(train_docs).encode())
    val_file = write(tmp_path / "valid.txt.gz", EOT.join(val_docs).encode())
    cfg = data_config(
        tmp_path, [str(train_file)], val_input=[str(val_file)], val_fraction=val_fraction
    )
    manifest = prep.run_local(cfg, workers=1)
    train = decoded_docs(Path(cfg.out), manifest, "train")
    val = decoded_docs(Path(cfg.out), manifest, "val")
    assert set(val_docs) <= set(val)  # every validation document, none in train
    assert not set(val_docs) & set(train)
    held = [d for d in val if d not in set(val_docs)]
    assert sorted(train + held) == sorted(train_docs)
    if val_fraction == 0:
        assert train == train_docs and val == val_docs
    else:
        assert 20 <= len(held) <= 100


# --- 4. restartability with real signals ----------------------------------------------------


def prep_args(out: Path, corpus: Path) -> list[str]:
    return [
        "data=sample",
        f"data.out='{out}'",
        f"data.input=['{corpus}']",
        "data.chunk_mb=0.05",
        "tokenizer=gpt2",
        "workers=1",
    ]


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """~10 MB of text (~200 chunks) and its uninterrupted prep (in-process)."""
    tmp = tmp_path_factory.mktemp("big")
    rng = random.Random(51)
    tokens = rng.choices(WORDS, k=1_600_000)
    docs, i = [], 0
    while i < len(tokens):
        n = rng.randint(20, 600)
        docs.append(" ".join(tokens[i : i + n]))
        i += n
    corpus = write(tmp / "big.txt", ("\n" + EOT + "\n").join(docs).encode())
    ref = tmp / "reference"
    prep_cli.main(prep_args(ref, corpus))
    assert (ref / MANIFEST).is_file()
    return corpus, ref


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["KILL", "TERM"])
def test_killed_prep_resumes_to_identical_output(tmp_path, big_corpus, capsys, sig):
    corpus, ref = big_corpus
    out = tmp_path / "ds"
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.prep", *prep_args(out, corpus)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        try:
            deadline = time.monotonic() + 120
            while not (out / "chunks").is_dir() or not any((out / "chunks").glob("*.json")):
                assert proc.poll() is None, (tmp_path / "log").read_text()
                assert time.monotonic() < deadline
                time.sleep(0.002)
            proc.send_signal(sig)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -sig  # really killed, not finished
    done = len(list((out / "chunks").glob("*.json")))
    total = json.loads((ref / MANIFEST).read_text())["num_chunks"]
    assert 1 <= done < total
    assert not (out / MANIFEST).exists()

    capsys.readouterr()
    prep_cli.main(prep_args(out, corpus))
    assert f"{total} chunks, {done} already done" in capsys.readouterr().out
    assert tree_bytes(out) == tree_bytes(ref)  # shards, chunk records, manifest: byte for byte


# --- 5. corruption --------------------------------------------------------------------------


def corrupt(out: Path, index: int, how: str) -> None:
    shard = out / "train" / f"{index:05d}.npy"
    record = prep.chunk_record_path(out, index)
    if how == "flip_byte":
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0x01  # a token id, same file size
        shard.write_bytes(bytes(data))
    elif how == "truncate":
        shard.write_bytes(shard.read_bytes()[:-2])
    elif how == "delete_shard":
        shard.unlink()
    elif how == "delete_record":
        record.unlink()
    elif how == "garbage_record":
        record.write_text("{not json")


@pytest.mark.parametrize(
    "how", ["flip_byte", "truncate", "delete_shard", "delete_record", "garbage_record"]
)
def test_corruption_is_detected_and_repaired(tmp_path, monkeypatch, how):
    text, _ = text_corpus("eot", seed=61)
    cfg = data_config(tmp_path, [str(write(tmp_path / "c.txt", text.encode()))])
    first = prep.run_local(cfg, workers=1)
    out = Path(cfg.out)
    original = tree_bytes(out)
    index = first["num_chunks"] // 2

    corrupt(out, index, how)
    assert not prep.chunk_is_done(out, index)
    assert all(prep.chunk_is_done(out, i) for i in range(first["num_chunks"]) if i != index)

    calls = []
    real_run_chunks = prep.run_chunks

    def spy(cfg, indices, workers):
        calls.append(list(indices))
        assert not (out / MANIFEST).exists()  # never looks complete while being repaired
        return real_run_chunks(cfg, indices, workers)

    monkeypatch.setattr(prep, "run_chunks", spy)
    again = prep.run_local(cfg, workers=1)
    assert calls == [[index]]  # only the broken chunk was redone
    assert again == first
    assert tree_bytes(out) == original


def test_finalize_refuses_a_corrupt_chunk(tmp_path):
    text, _ = text_corpus("eot", seed=62)
    cfg = data_config(tmp_path, [str(write(tmp_path / "c.txt", text.encode()))])
    prep.run_local(cfg, workers=1)
    out = Path(cfg.out)
    corrupt(out, 1, "flip_byte")
    chunks = prep.plan(cfg)
    with pytest.raises(prep.DatasetError, match="chunk 1"):
        prep.finalize(cfg, chunks, get_tokenizer("bytes"))


def test_intact_rerun_does_no_work(tmp_path, monkeypatch):
    text, _ = text_corpus("eot", seed=63)
    cfg = data_config(tmp_path, [str(write(tmp_path / "c.txt", text.encode()))])
    first = prep.run_local(cfg, workers=1)
    original = tree_bytes(Path(cfg.out))
    monkeypatch.setattr(prep, "process_chunk", lambda *a: pytest.fail("chunk redone"))
    assert prep.run_local(cfg, workers=1) == first
    assert tree_bytes(Path(cfg.out)) == original


# --- 6. bad input: one-line errors, never a dataset that looks complete ---------------------


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        prep_cli.main(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def cli_args(out: Path, inputs: list[Path | str], *extra: str) -> list[str]:
    listed = ",".join(f"'{p}'" for p in inputs)
    return [
        "data=sample",
        f"data.out='{out}'",
        f"data.input=[{listed}]",
        "data.val_fraction=0",
        "data.chunk_mb=0.001",
        "data.bpe_vocab_size=300",
        "workers=1",
        *extra,
    ]


def assert_one_line_error(code: int, err: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dlt-prep: error: ")
    return lines[0]


def test_missing_input(tmp_path, capsys):
    pattern = tmp_path / "nothing-*.txt"
    code, _, err = run_cli(capsys, *cli_args(tmp_path / "ds", [pattern], "tokenizer=bytes"))
    line = assert_one_line_error(code, err)
    assert "data.input" in line and str(pattern) in line
    assert not (tmp_path / "ds" / MANIFEST).exists()


@pytest.mark.parametrize("content", [b"", b"  \n\t\n", b"\n<|endoftext|>\n \n<|endoftext|>"])
@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_empty_corpus(tmp_path, capsys, content, tokenizer):
    corpus = write(tmp_path / "empty.txt", content)
    code, _, err = run_cli(capsys, *cli_args(tmp_path / "ds", [corpus], f"tokenizer={tokenizer}"))
    line = assert_one_line_error(code, err)
    assert "data.input" in line and "empty" in line
    assert not (tmp_path / "ds" / MANIFEST).exists()


@pytest.mark.parametrize(
    ("name", "tokenizer"),
    [("bad.txt", "bytes"), ("bad.txt.gz", "gpt2"), ("bad.jsonl", "bytes"), ("bad.txt", "bpe")],
)
def test_invalid_utf8_names_file_and_offset(tmp_path, capsys, name, tokenizer):
    if name.endswith(".jsonl"):
        good = "".join(json.dumps({"text": f"line {i} é"}) + "\n" for i in range(200)).encode()
        data = good + b'{"text": "bad \xff here"}\n' + good
    else:
        good = "".join(f"doc {i} é 日本\n{EOT}\n" for i in range(200)).encode()
        data = good + b"bad \xc3\x28 here\n" + EOT.encode() + good
    offset = data.index(b"\xff" if b"\xff" in data else b"\xc3\x28")
    assert offset > 2 * 1024  # not in the first chunk: the offset is from the file's start
    corpus = write(tmp_path / name, data)
    code, _, err = run_cli(capsys, *cli_args(tmp_path / "ds", [corpus], f"tokenizer={tokenizer}"))
    line = assert_one_line_error(code, err)
    assert str(corpus) in line and "UTF-8" in line
    assert f"byte {offset}" in line
    assert not (tmp_path / "ds" / MANIFEST).exists()


def test_missing_hf_disk_folder(tmp_path, capsys):
    """A dataset folder that does not exist is a missing input like a file: one line."""
    missing = tmp_path / "no-such-dataset"
    code, _, err = run_cli(
        capsys, *cli_args(tmp_path / "ds", [f"hf-disk:{missing}"], "tokenizer=bytes")
    )
    line = assert_one_line_error(code, err)
    assert str(missing) in line
    assert not (tmp_path / "ds" / MANIFEST).exists()


def test_hf_dataset_without_the_text_column(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["a", "b"]}).save_to_disk(str(tmp_path / "hf"))
    code, _, err = run_cli(
        capsys, *cli_args(tmp_path / "ds", [f"hf-disk:{tmp_path / 'hf'}"], "tokenizer=bytes")
    )
    line = assert_one_line_error(code, err)
    assert "data.text_field" in line and "'text'" in line and "body" in line
    assert not (tmp_path / "ds" / MANIFEST).exists()


def test_jsonl_lines_without_the_field_are_counted(tmp_path, capsys):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(30)]
    bad = [json.dumps({"body": "x"}), json.dumps({"text": None}), json.dumps({"text": 7}), "[1, 2]"]
    for i, b in enumerate(bad):
        lines.insert(5 * i + 3, b)
    corpus = write(tmp_path / "c.jsonl", ("\n".join(lines) + "\n").encode())
    code, out, err = run_cli(capsys, *cli_args(tmp_path / "ds", [corpus], "tokenizer=bytes"))
    assert code == 0, err
    manifest = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    assert manifest["skipped_documents"]["missing_field"] == len(bad)
    assert manifest["splits"]["train"]["num_documents"] == 30


def test_invalid_json_names_the_file(tmp_path, capsys):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(100)]
    lines[70] = '{"text": "unterminated'
    data = ("\n".join(lines) + "\n").encode()
    corpus = write(tmp_path / "c.jsonl", data)
    code, _, err = run_cli(capsys, *cli_args(tmp_path / "ds", [corpus], "tokenizer=bytes"))
    line = assert_one_line_error(code, err)
    assert str(corpus) in line and "JSON" in line
    assert f"byte {data.index(lines[70].encode())}" in line
    assert not (tmp_path / "ds" / MANIFEST).exists()


def test_unknown_tokenizer(tmp_path, capsys):
    corpus = write(tmp_path / "c.txt", b"hello")
    code, _, err = run_cli(capsys, *cli_args(tmp_path / "ds", [corpus], "tokenizer=sentencepiece"))
    line = assert_one_line_error(code, err)
    assert "tokenizer" in line and "sentencepiece" in line
    assert not (tmp_path / "ds" / MANIFEST).exists()


@pytest.mark.parametrize(
    "changed", ["tokenizer=gpt2", "data.doc_separator=line", "data.chunk_mb=0.002", "input"]
)
def test_rerun_with_other_settings_is_refused(tmp_path, capsys, changed):
    text, _ = text_corpus("eot", seed=71)
    corpus = write(tmp_path / "c.txt", text.encode())
    other = write(tmp_path / "d.txt", text.encode() + b"one more")
    out = tmp_path / "ds"
    code, _, err = run_cli(capsys, *cli_args(out, [corpus], "tokenizer=bytes"))
    assert code == 0, err
    before = tree_bytes(out, exclude=())
    if changed == "input":
        args = cli_args(out, [other], "tokenizer=bytes")
    else:
        args = cli_args(out, [corpus], "tokenizer=bytes", changed)
    code, _, err = run_cli(capsys, *args)
    line = assert_one_line_error(code, err)
    assert f"data.out={out}" in line
    assert tree_bytes(out, exclude=()) == before  # nothing mixed in, the dataset untouched


def test_failed_chunk_leaves_no_manifest_after_a_repair_attempt(tmp_path, monkeypatch):
    """A complete dataset whose chunk must be redone and then fails to read: the old manifest
    is gone (the folder no longer looks complete)."""
    text, _ = text_corpus("eot", seed=72)
    corpus = write(tmp_path / "c.txt", text.encode())
    cfg = data_config(tmp_path, [str(corpus)])
    prep.run_local(cfg, workers=1)
    out = Path(cfg.out)
    corrupt(out, 2, "delete_record")
    real_read_chunk = prep.read_chunk

    def failing_read_chunk(chunk, data_cfg):
        if chunk == prep.plan(cfg)[2]:
            raise DataError(f"{chunk.source}: invalid UTF-8 at byte {chunk.start + 5}")
        return real_read_chunk(chunk, data_cfg)

    monkeypatch.setattr(prep, "read_chunk", failing_read_chunk)
    with pytest.raises(DataError, match="invalid UTF-8"):
        prep.run_local(cfg, workers=1)
    assert not (out / MANIFEST).exists()


def test_bad_settings_are_one_line(tmp_path, capsys):
    corpus = write(tmp_path / "c.txt", b"hello")
    for extra, key in [
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("data.chunk_mb=0", "data.chunk_mb"),
        ("data.doc_separator=comma", "data.doc_separator"),
        ("data.format=xml", "data.format"),
    ]:
        code, _, err = run_cli(capsys, *cli_args(tmp_path / "ds", [corpus], extra))
        assert key in assert_one_line_error(code, err)
    assert not (tmp_path / "ds" / MANIFEST).exists()


# --- stale trained tokenizer -----------------------------------------------------------------


@pytest.mark.parametrize("change", ["bpe_vocab_size", "input"])
def test_a_new_plan_does_not_reuse_a_stale_trained_tokenizer(tmp_path, change):
    """`dlt-prep phase=plan` (or a run killed after training the BPE, before any chunk) leaves
    tokenizer.tiktoken without chunk records; a later run with other settings or inputs makes
    a new plan, and must then train a new tokenizer (or refuse), never reuse the old one."""
    text_a, _ = text_corpus("eot", seed=81)
    text_b, _ = text_corpus("eot", seed=82)
    a = write(tmp_path / "a.txt", text_a.encode())
    b = write(tmp_path / "b.txt", ("zzz qqq " + text_b).encode())
    first = data_config(tmp_path, [str(a)], "bpe")
    prep.prepare_tokenizer(first, prep.plan(first))  # what phase=plan does
    assert (Path(first.out) / BPE_FILE).is_file()

    if change == "input":
        second = dataclasses.replace(first, input=[str(b)])
    else:
        second = dataclasses.replace(first, bpe_vocab_size=400)
    fresh = dataclasses.replace(second, out=str(tmp_path / "fresh"))
    expected = prep.run_local(fresh, workers=1)["tokenizer"]
    try:
        manifest = prep.run_local(second, workers=1)
    except DataError as err:
        assert "data.out" in str(err)  # refusing is acceptable, mixing is not
        return
    assert manifest["tokenizer"] == expected


# --- 7. the process pool --------------------------------------------------------------------


@pytest.mark.slow
def test_pool_output_is_identical_to_one_worker(tmp_path):
    text, _ = text_corpus("eot", seed=91)
    jl, _ = jsonl_corpus(seed=92)
    inputs = [
        str(write(tmp_path / "c.txt", text.encode())),
        str(write(tmp_path / "c.jsonl", jl.encode())),
    ]
    one = data_config(tmp_path, inputs, "bpe", val_fraction=0.1)
    one.out = str(tmp_path / "one")
    pool = dataclasses.replace(one, out=str(tmp_path / "pool"))
    m1 = prep.run_local(one, workers=1)
    m2 = prep.run_local(pool, workers=2)
    assert m1["num_chunks"] >= 4
    assert m1 == m2
    assert tree_bytes(Path(one.out)) == tree_bytes(Path(pool.out))


# --- 8. the trained BPE ---------------------------------------------------------------------


def test_trained_bpe_encodes_like_hugging_face(tmp_path):
    """Our tiktoken ranks from train_bpe encode exactly as the Hugging Face model they came from
    (trained again here the same way), on held-out text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(101)
    syllables = ["ka", "ri", "to", "mo", "ne", "é", "ß", "日", "本", "a", "b", "aa", "ab", "bc"]
    syllables += ["ll", "'s", "'ll", " ", "  ", "\n", "\n\n", "\t", "😀", "1", "23", ",", "."]

    def text(n: int) -> str:
        return "".join(rng.choice(syllables) for _ in range(n))

    corpus = [text(rng.randint(20, 200)) for _ in range(1500)]
    held = [text(rng.randint(20, 200)) for _ in range(300)]
    held += ["", " ", "unseen wörds ✓ ∑ 🐍", "aaaaaaaaaaaaa bbbbbbbbb", "\t\r\n  x  \n"]
    vocab_size = 700

    save_bpe(train_bpe(iter(corpus), vocab_size), tmp_path / BPE_FILE)
    ours = load_bpe(tmp_path / BPE_FILE)
    assert ours.vocab_size == vocab_size and ours.eot_id == vocab_size - 1

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(corpus, trainer)
    assert hf.get_vocab_size() == vocab_size - 1
    for text in held:
        ids = ours.encode(text)
        assert ids == hf.encode(text).ids, text
        assert ours.decode(ids) == text
    assert ours.encode("a" + EOT + "b")[1] == ours.eot_id


# --- 9. the prep config ---------------------------------------------------------------------

BASE_YAML = Path(__file__).parents[1] / "cluster_configs" / "data" / "base.yaml"


def test_corpus_config_is_data_base_yaml_key_by_key():
    """data/base.yaml is the one source of the values: the dataclass declares types only."""
    base = OmegaConf.to_container(OmegaConf.load(BASE_YAML), resolve=True)
    keys = [f.name for f in dataclasses.fields(CorpusConfig)]
    assert sorted(keys + list(TRAINER_KEYS)) == sorted(base)  # every key of base.yaml, once
    cfg = corpus_config()
    for key in keys:
        assert getattr(cfg, key) == base[key], key
    assert cfg.out == f"data/{cfg.name}"  # `out: data/${.name}` resolved
    assert corpus_config(name="x").out == "data/x"  # ... after the overrides
    for f in dataclasses.fields(CorpusConfig):
        assert f.default is dataclasses.MISSING, f.name
        assert f.default_factory is dataclasses.MISSING, f.name


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"chunk_mbb": 1}, "data.chunk_mbb"), ({"chunk_mb": "big"}, "data.chunk_mb"),
     ({"path": "x"}, "data.path"), ({"input": 3}, "data.input")],
)  # fmt: skip
def test_corpus_config_errors_name_the_key(overrides, key):
    with pytest.raises(CorpusConfigError) as err:
        corpus_config(**overrides)
    assert str(err.value).startswith(f"{key}: ") and "\n" not in str(err.value)


def test_trainer_keys_pass_dlt_prep_but_a_misspelt_prep_key_does_not(tmp_path, capsys):
    corpus = write(tmp_path / "c.txt", b"hello")
    trainer_keys = ("data.kind=shards", "data.vocab_size=300", "data.dummy_branching=2")
    code, _, err = run_cli(capsys, *cli_args(tmp_path / "ds", [corpus], *trainer_keys))
    assert code == 0, err
    code, _, err = run_cli(capsys, *cli_args(tmp_path / "ds2", [corpus], "+data.chunk_mbb=1"))
    assert "data.chunk_mbb" in assert_one_line_error(code, err)
    assert not (tmp_path / "ds2").exists()
