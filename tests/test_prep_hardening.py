"""dlt-prep refuses what it cannot do safely, and says so in one line: outputs without a plan,
inputs where it writes, broken gzip or JSONL, unknown packages, a split left empty; a full disk
or a read-only folder loses nothing already complete."""

from __future__ import annotations

import errno
import gzip
import json
import os
import random
import string
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_prep import (
    EOT,
    assert_one_line_error,
    cli_args,
    corrupt,
    run_cli,
    text_corpus,
    tree_bytes,
    write,
)

from data_prep import prep, shards
from data_prep.shards import MANIFEST
from data_prep.tokenizers import BPE_FILE, MAX_PIECE_BYTES, load_bpe, read_ranks


def prepared(tmp_path: Path, capsys, tokenizer: str = "bytes") -> tuple[Path, Path]:
    """(corpus, dataset folder): a small corpus prepared through dlt-prep."""
    text, _ = text_corpus("eot", seed=7)
    corpus = write(tmp_path / "corpus.txt", text.encode())
    out = tmp_path / "ds"
    code, _, err = run_cli(capsys, *cli_args(out, [corpus], f"tokenizer={tokenizer}"))
    assert code == 0, err
    return corpus, out


# --- outputs without plan.json --------------------------------------------------------------


@pytest.mark.parametrize("left", ["all but plan.json", "chunks only"])
@pytest.mark.parametrize("corpus_kind", ["same", "other"])
def test_outputs_without_a_plan_are_refused_and_kept(tmp_path, capsys, left, corpus_kind):
    """Shards and records without plan.json cannot be checked against the inputs: reusing
    them could mix in another corpus (and the old run deleted the trained tokenizer)."""
    corpus, out = prepared(tmp_path, capsys, "bpe")
    (out / prep.PLAN).unlink()
    if left == "chunks only":
        for name in (MANIFEST, BPE_FILE):
            (out / name).unlink()
        for shard in (out / "train").iterdir():
            shard.unlink()
        (out / "train").rmdir()
    if corpus_kind == "other":
        corpus = write(tmp_path / "other.txt", b"another corpus" + EOT.encode() + b"entirely")
    before = tree_bytes(out, exclude=())
    code, _, err = run_cli(capsys, *cli_args(out, [corpus], "tokenizer=bpe"))
    line = assert_one_line_error(code, err)
    assert f"data.out={out} holds " in line and "chunks" in line and "no plan.json" in line
    assert "remove the folder or use another data.out" in line
    assert tree_bytes(out, exclude=()) == before  # nothing deleted, nothing changed


def test_an_unreadable_plan_is_one_line(tmp_path, capsys):
    corpus, out = prepared(tmp_path, capsys)
    (out / prep.PLAN).write_text("{not json")
    before = tree_bytes(out, exclude=())
    code, _, err = run_cli(capsys, *cli_args(out, [corpus], "tokenizer=bytes"))
    line = assert_one_line_error(code, err)
    assert str(out / prep.PLAN) in line and "unreadable" in line
    assert tree_bytes(out, exclude=()) == before


# --- inputs inside data.out -----------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    ["train/00000.npy", "val/x.txt", "chunks/00001.json", MANIFEST, BPE_FILE, "plan.json.tmp"],
)
@pytest.mark.parametrize("key", ["data.input", "data.val_input"])
def test_an_input_where_prep_writes_is_refused(tmp_path, capsys, where, key):
    text, _ = text_corpus("eot", seed=8)
    out = tmp_path / "ds"
    corpus = write(out / where, text.encode())
    args = cli_args(out, [corpus], "tokenizer=bytes")
    if key == "data.val_input":
        train = write(tmp_path / "train.txt", text.encode())
        args = cli_args(out, [train], "tokenizer=bytes", f"data.val_input=['{corpus}']")
    before = tree_bytes(out, exclude=())
    code, _, err = run_cli(capsys, *args)
    line = assert_one_line_error(code, err)
    assert f"{key}: {corpus} lies inside data.out={out}" in line
    assert tree_bytes(out, exclude=()) == before  # the input is untouched, nothing written


def test_an_input_reached_through_a_symlinked_data_out_is_refused(tmp_path, capsys):
    real = tmp_path / "real"
    corpus = write(real / "train" / "00000.npy", b"text that must survive")
    link = tmp_path / "link"
    link.symlink_to(real)
    code, _, err = run_cli(capsys, *cli_args(link, [corpus], "tokenizer=bytes"))
    assert f"data.input: {corpus} lies inside data.out={link}" in assert_one_line_error(code, err)
    assert corpus.read_bytes() == b"text that must survive"


def test_data_out_inside_an_input_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "jsonl"
    write(folder / "part.jsonl", json.dumps({"text": "a document"}).encode() + b"\n")
    code, _, err = run_cli(capsys, *cli_args(folder / "ds", [f"hf:{folder}"], "tokenizer=bytes"))
    line = assert_one_line_error(code, err)
    assert f"data.out={folder / 'ds'} lies inside the input folder hf:{folder}" in line
    assert not (folder / "ds").exists()


def test_data_out_that_is_a_file_is_refused(tmp_path, capsys):
    corpus = write(tmp_path / "c.txt", b"hello")
    code, _, err = run_cli(capsys, *cli_args(corpus, [corpus], "tokenizer=bytes"))
    assert f"data.out={corpus}: is a file" in assert_one_line_error(code, err)
    assert corpus.read_bytes() == b"hello"


def test_an_input_elsewhere_inside_data_out_is_fine(tmp_path, capsys):
    """Only the paths prep writes are off limits (docs/data.md): data.out=data with the raw
    corpus in data/raw/ works, and the input stays as it was."""
    text, docs = text_corpus("eot", seed=9)
    out = tmp_path / "data"
    corpus = write(out / "raw" / "corpus.txt", text.encode())
    code, _, err = run_cli(capsys, *cli_args(out, [corpus], "tokenizer=bytes"))
    assert code == 0, err
    assert corpus.read_bytes() == text.encode()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["splits"]["train"]["num_documents"] == len(docs)


# --- a full disk, a read-only folder --------------------------------------------------------


def chunk_files(tree: dict[str, bytes], below: int) -> dict[str, bytes]:
    """The files of chunks 0 .. below-1 (records and shards) in a tree_bytes() listing."""
    return {k: v for k, v in tree.items() if "/" in k and int(Path(k).name[:5]) < below}


def test_disk_full_while_writing_a_shard_loses_nothing(tmp_path, capsys, monkeypatch):
    corpus, ref = prepared(tmp_path, capsys)
    reference = tree_bytes(ref)
    out = tmp_path / "full"
    real_save = np.save
    failed: list[Path] = []

    def save(file, array, **kw):
        if len(failed) == 0 and file.name.endswith("00003.npy.tmp"):
            failed.append(Path(file.name.removesuffix(".tmp")))
            file.write(b"\x93NUMPY half a shard")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(file, array, **kw)

    monkeypatch.setattr(np, "save", save)
    code, _, err = run_cli(capsys, *cli_args(out, [corpus], "tokenizer=bytes"))
    line = assert_one_line_error(code, err)
    assert failed == [out / "train" / "00003.npy"]
    assert f"{failed[0]}: cannot write it (No space left on device)" in line
    # chunks 0-2 complete and kept; nothing of chunk 3, no temporary file, no manifest
    assert tree_bytes(out) == chunk_files(reference, below=3)

    monkeypatch.setattr(np, "save", real_save)
    code, stdout, err = run_cli(capsys, *cli_args(out, [corpus], "tokenizer=bytes"))
    assert code == 0, err
    assert "3 already done" in stdout
    assert tree_bytes(out) == reference


@pytest.mark.parametrize("existing", [False, True], ids=["first", "rewritten"])
def test_disk_full_while_writing_the_manifest(tmp_path, capsys, monkeypatch, existing):
    """A manifest is written whole or not at all: an old one stays as it was."""
    corpus, out = prepared(tmp_path, capsys)
    reference = tree_bytes(out)
    if not existing:
        (out / MANIFEST).unlink()
    real_dump = json.dump

    def dump(payload, f, **kw):
        if "splits" in payload:
            f.write('{"format_version": 1, "spl')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_dump(payload, f, **kw)

    monkeypatch.setattr(shards.json, "dump", dump)
    code, _, err = run_cli(capsys, *cli_args(out, [corpus], "tokenizer=bytes"))
    line = assert_one_line_error(code, err)
    assert f"{out / MANIFEST}: cannot write it (No space left on device)" in line
    kept = tree_bytes(out)
    if existing:
        assert kept == reference
    else:
        assert kept == {k: v for k, v in reference.items() if k != MANIFEST}

    monkeypatch.setattr(shards.json, "dump", real_dump)
    assert run_cli(capsys, *cli_args(out, [corpus], "tokenizer=bytes"))[0] == 0
    assert tree_bytes(out) == reference


def test_read_only_output_while_repairing(tmp_path, capsys, monkeypatch):
    """Writes fail as in a read-only folder (simulated: chmod does not stop root)."""
    corpus, out = prepared(tmp_path, capsys)
    corrupt(out, 2, "delete_shard")
    before = tree_bytes(out)

    def read_only_open(file, mode="r", *args, **kw):
        if any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return open(file, mode, *args, **kw)

    monkeypatch.setattr(shards, "open", read_only_open, raising=False)
    code, _, err = run_cli(capsys, *cli_args(out, [corpus], "tokenizer=bytes"))
    line = assert_one_line_error(code, err)
    assert f"{out / 'train' / '00002.npy'}: cannot write it (Read-only file system)" in line
    # the manifest was removed first (a dataset under repair must not look complete)
    assert tree_bytes(out) == {k: v for k, v in before.items() if k != MANIFEST}


def test_read_only_output_folder(tmp_path, capsys):
    """A really read-only file system (a tmpfs remounted read-only: root writes through chmod)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        corpus, out = prepared(disk, capsys)
        corrupt(out, 2, "delete_shard")
        before = tree_bytes(out)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        code, _, err = run_cli(capsys, *cli_args(out, [corpus], "tokenizer=bytes"))
        line = assert_one_line_error(code, err)
        assert "Read-only file system" in line and str(out) in line
        assert tree_bytes(out) == before
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


# --- broken inputs --------------------------------------------------------------------------


def gz_blob(data: bytes, damage: str) -> bytes:
    blob = gzip.compress(data, mtime=0)
    if damage == "plain":
        return data  # not compressed at all
    if damage == "truncated":
        return blob[: len(blob) // 2]
    assert damage == "crc"
    return blob[:-8] + bytes(4) + blob[-4:]  # a wrong checksum in the gzip trailer


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("plain", "not a gzip file"),
        ("truncated", "truncated gzip stream"),
        ("crc", "corrupt gzip stream (CRC check failed"),
    ],
)
@pytest.mark.parametrize("name", ["corpus.txt.gz", "corpus.jsonl.gz"])
def test_broken_gzip_input_is_one_line(tmp_path, capsys, name, damage, expected):
    if name.endswith(".jsonl.gz"):
        data = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(300))
    else:
        data = text_corpus("eot", seed=10)[0]
    corpus = tmp_path / name
    corpus.write_bytes(gz_blob(data.encode(), damage))
    out = tmp_path / "ds"
    code, _, err = run_cli(capsys, *cli_args(out, [corpus], "tokenizer=bytes"))
    assert f"{corpus}: {expected}" in assert_one_line_error(code, err)
    assert not out.exists()  # refused while planning, before anything is written


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz"])
def test_malformed_jsonl_names_file_and_line(tmp_path, capsys, name):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(300)]
    lines[203] = '{"text": "unterminated'
    corpus = write(tmp_path / name, ("\n".join(lines) + "\n").encode())
    code, _, err = run_cli(capsys, *cli_args(tmp_path / "ds", [corpus], "tokenizer=bytes"))
    line = assert_one_line_error(code, err)
    assert f"{corpus}:204: invalid JSON" in line and "column" in line
    assert not (tmp_path / "ds" / MANIFEST).exists()


@pytest.mark.parametrize("spec", ["pkg://nosuch.module/x.txt", "pkg://data_prep.nosuch/x.txt"])
def test_a_missing_package_is_one_line(tmp_path, capsys, spec):
    code, _, err = run_cli(capsys, *cli_args(tmp_path / "ds", [spec], "tokenizer=bytes"))
    line = assert_one_line_error(code, err)
    assert f"data.input: {spec}: no installed Python package" in line
    assert not (tmp_path / "ds").exists()


# --- a split left empty ---------------------------------------------------------------------


def test_all_documents_in_validation_says_so(tmp_path, capsys):
    docs = [f"document number {i}" for i in range(3)]
    fraction = 0.99999
    assert all(prep.is_validation(doc, fraction) for doc in docs)
    corpus = write(tmp_path / "c.txt", EOT.join(docs).encode())
    args = cli_args(tmp_path / "ds", [corpus], "tokenizer=bytes")
    args = [a for a in args if not a.startswith("data.val_fraction=")]
    # (data.val_split=auto would carve 3 documents by tokens: a document split is forced here)
    code, _, err = run_cli(
        capsys, *args, f"data.val_fraction={fraction}", "data.val_split=documents"
    )
    line = assert_one_line_error(code, err)
    assert f"data.val_fraction={fraction}: all 3 documents of data.input went to the " in line
    assert "empty corpus" not in line
    assert not (tmp_path / "ds" / MANIFEST).exists()


# --- BPE on a long line without whitespace --------------------------------------------------


def test_bpe_on_a_long_line_without_whitespace_trains_and_shows_progress(tmp_path, capsys):
    """1 MB of letters is one GPT-2 pre-token; uncapped, the BPE trainer ran for minutes."""
    rng = random.Random(11)
    text = "".join(rng.choices(string.ascii_letters, k=1 << 20))
    corpus = write(tmp_path / "long.txt", text.encode())
    out = tmp_path / "ds"
    code, stdout, err = run_cli(capsys, *cli_args(out, [corpus], "tokenizer=bpe"))
    assert code == 0, err
    assert "dlt-prep: training a BPE tokenizer (data.bpe_vocab_size=300)" in stdout
    assert "dlt-prep: BPE: read 1.0 MB in all; learning the merges" in stdout
    assert "dlt-prep: trained the BPE tokenizer in " in stdout
    tok = load_bpe(out / BPE_FILE)
    assert max(len(token) for token in read_ranks(out / BPE_FILE)) <= MAX_PIECE_BYTES
    # the line is cut into chunks (at character boundaries): they join up to it, one EOT
    tokens = np.concatenate([np.load(p) for p in sorted((out / "train").glob("*.npy"))])
    assert tok.decode(tokens.tolist()) == text + EOT  # encoding still round-trips exactly
