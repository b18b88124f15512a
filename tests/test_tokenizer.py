"""minid's CLIP tokenizer against transformers' on the real SD1.4 vocabulary, and the word →
position lookup."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minid.models.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def folder(sd14_reference):
    return sd14_reference / "hub" / "tokenizer"


@pytest.fixture(scope="module")
def tok(folder) -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def reference(folder):
    """transformers' CLIPTokenizer (and the fast one, checked to agree) from the same folder."""
    slow = transformers.CLIPTokenizer.from_pretrained(str(folder))
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(folder))

    def encode(prompt: str) -> list[int]:
        ids = slow(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        ids_fast = fast(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == ids_fast, (
            f"transformers' CLIPTokenizer and CLIPTokenizerFast disagree on {prompt!r}"
        )
        return ids

    return encode


def _prompts() -> list[str]:
    subjects = [
        "a man",
        "a woman",
        "an old man",
        "a girl",
        "a person",
        "a dog",
        "Barack Obama",
        "a cat",
    ]
    edits = [
        "wearing black glasses",
        "wearing sunglasses",
        "with a red hat",
        "smiling",
        "with a beard",
        "in a blue suit",
        "with earrings",
        "holding an umbrella",
    ]
    styles = ["a photo of", "a portrait of", "a painting of", "a close-up photo of", ""]
    # 320
    plain = [f"{s} {sub} {e}".strip() for s, sub, e in itertools.product(styles, subjects, edits)]
    special = [
        "",
        " ",
        "   leading and trailing   ",
        "tabs\tand\nnewlines\r\n\u00a0and a no-break space",
        "A PHOTO OF A MAN WEARING BLACK GLASSES",
        "MiXeD CaSe WoRdS",
        "Hello, world! How's it going? (fine) [ok] {yes} <no> ...",
        "don't won't can't I'm you're we've they'll she'd it's",
        "''quoted'' \"double\" `back` ‘curly’ “quotes”",
        "numbers 1234567890 3.14159 1e-5 -42 100% $5 #1 @user",
        "café naïve résumé façade jalapeño Straße ÆØÅ",
        "e\u0301 composed by NFC (e + combining acute)",
        "Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ",
        "emoji 😀😀 🔥 👍🏽 ❤️ 🇯🇵",
        "日本語のテキスト 中文 한국어 русский текст ελληνικά עברית العربية",
        "a-b_c/d\\e|f~g^h*i+j=k",
        "!!!???...,,,;;;:::",
        "<|startoftext|> literal special tokens <|endoftext|> inside",
        "<|STARTOFTEXT|> upper-case special <|ENDOFTEXT|>",
        "sunglasses " * 10,
        "a very long prompt " * 30,  # > 75 content tokens: truncated
        " ".join(str(i) for i in range(100)),  # digits are split one by one: far over 75
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "x" * 300,
    ]
    return plain + special


PROMPTS = _prompts()


def test_known_sd14_ids(tok):
    ids = tok.encode("a photo of a man wearing black glasses")
    expected = [49406, 320, 1125, 539, 320, 786, 3309, 1449, 6116, 49407] + [49407] * 67
    assert ids == expected, f"ids {ids}"


def test_matches_transformers(tok, reference):
    assert len(PROMPTS) > 300
    mismatches = [
        (p, tok.encode(p), reference(p)) for p in PROMPTS if tok.encode(p) != reference(p)
    ]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]}"


def test_frame(tok):
    """77 ids: bos, the first 75 content tokens, eos, pads = eos."""
    for p in PROMPTS:
        content = tok._content(p).ids  # untruncated
        ids = tok.encode(p)
        n = min(len(content), 75)
        assert len(ids) == 77 and ids[0] == BOS and ids[1 : 1 + n] == content[:n], f"{p!r}: {ids}"
        assert ids[1 + n :] == [EOS] * (76 - n), (
            f"{p!r}: after {n} content tokens expected eos only, got {ids}"
        )
    long_content = tok._content("a very long prompt " * 30).ids
    assert len(long_content) > 75, f"the long prompt has {len(long_content)} tokens, expected > 75"


def test_batch_call(tok):
    batch = tok(PROMPTS[:5])
    assert batch.dtype == torch.long and batch.shape == (5, 77), (
        f"{batch.dtype}, {tuple(batch.shape)}"
    )
    assert batch.tolist() == [tok.encode(p) for p in PROMPTS[:5]]
    assert tok("a man").shape == (1, 77)


def test_tokens_for_display(tok):
    tokens = tok.tokens("a photo of sunglasses")
    assert tokens[:3] == ["<|startoftext|>", "a</w>", "photo</w>"] and len(tokens) == 77, tokens[:6]


printable_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)),  # any unicode except lone surrogates
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(printable_text)
def test_matches_transformers_generated(tok, reference, text):
    assert tok.encode(text) == reference(text), f"text {text!r}"


# --- word positions -------------------------------------------------------------------------------


def test_positions_single_and_multi_token(tok):
    prompt = "a photo of a man wearing black glasses"
    assert tok.token_positions(prompt, "man") == [5]
    assert tok.token_positions(prompt, "glasses") == [8]
    assert tok.token_positions(prompt, "black glasses") == [7, 8], (
        "a phrase spans its words' tokens"
    )
    assert tok.token_positions("a man wearing eyeglasses", "eyeglasses") == [4, 5], (
        "eye + glasses</w>"
    )
    assert tok.token_positions("a a a", "a a") == [1, 2], "occurrences do not overlap"
    # a word BPE splits: every token of it, and exactly those
    prompt = "a man wearing supercalifragilistic sunglasses"
    word = "supercalifragilistic"
    n = len(tok._words(word)[1][0])
    assert n > 1, f"{word!r} should be several tokens, is {n}"
    assert tok.token_positions(prompt, word) == list(range(4, 4 + n))
    assert tok.token_positions(prompt, "sunglasses") == [4 + n]


def test_positions_repeats_and_case(tok):
    prompt = "A man and a MAN and a Man."
    assert tok.token_positions(prompt, "man") == [2, 5, 8], "every occurrence, any case"
    assert tok.token_positions(prompt, "MAN") == [2, 5, 8]
    ids = tok.encode(prompt)
    assert {ids[p] for p in tok.token_positions(prompt, "man")} == {tok.encode("man")[1]}


def test_words(tok):
    words = tok.words("Don't  wear 12 SUNGLASSES!")
    assert words == ["Don", "'t", "wear", "1", "2", "SUNGLASSES", "!"], f"words {words}"


def test_positions_whole_words_only(tok):
    with pytest.raises(ValueError) as e:
        tok.token_positions("a man wearing sunglasses", "glasses")
    message = str(e.value)
    assert (
        "'glasses'" in message
        and "a man wearing sunglasses" in message
        and "'sunglasses'" in message
    ), message
    with pytest.raises(ValueError, match="woman"):
        tok.token_positions("a woman", "man")


def test_positions_missing_and_empty(tok):
    with pytest.raises(ValueError, match="'cat'.*'a photo of a dog'"):
        tok.token_positions("a photo of a dog", "cat")
    with pytest.raises(ValueError, match="no tokens"):
        tok.token_positions("a photo of a dog", "  ")


def test_positions_truncated(tok):
    prompt = "a man " + "very " * 80 + "glasses"  # "glasses" is token 83: cut off
    assert tok.token_positions(prompt, "glasses") == []
    assert tok.token_positions(prompt, "man") == [2]
    assert max(tok.token_positions(prompt, "very")) == 75


def test_align_tokens(tok):
    a, b = "a photo of a man", "a close-up photo of a man wearing black sunglasses"
    pa, pb = tok.align_tokens(a, b, "man")
    assert (pa, pb) == ([5], [8]), (pa, pb)
    assert tok.encode(a)[pa[0]] == tok.encode(b)[pb[0]]
    with pytest.raises(ValueError, match="1 time.*2 time"):
        tok.align_tokens("a man", "a man and a man", "man")


words = st.sampled_from(
    [
        "a",
        "man",
        "woman",
        "photo",
        "of",
        "sunglasses",
        "black",
        "glasses",
        "smiling",
        "supercalifragilistic",
        "don't",
        ",",
        "42",
        "café",
        "😀",
    ]
)


@settings(max_examples=60, deadline=None)
@given(st.lists(words, min_size=1, max_size=40), st.data())
def test_positions_property(tok, prompt_words, data):
    """For a prompt built from known words, the positions of a word are exactly the tokens that
    word's occurrences produce, and the ids at those positions spell the word."""
    prompt = " ".join(prompt_words)
    word = data.draw(st.sampled_from(prompt_words))
    positions = tok.token_positions(prompt, word)
    ids = tok.encode(prompt)
    word_ids = tok.encode(word)[1 : tok.encode(word).index(EOS, 1)]
    # Walk the prompt word by word to find where each word's tokens start.
    expected, cursor = [], 1
    for w in prompt_words:
        n = len(tok.encode(w)[1 : tok.encode(w).index(EOS, 1)])
        if w == word:
            expected += [p for p in range(cursor, cursor + n) if p <= 75]
        cursor += n
    assert positions == expected, f"{prompt!r}, {word!r}: {positions} != {expected}"
    for start in range(0, len(positions), len(word_ids)):
        chunk = positions[start : start + len(word_ids)]
        assert [ids[p] for p in chunk] == word_ids[: len(chunk)], (
            f"ids at {chunk} do not spell {word!r}"
        )


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
