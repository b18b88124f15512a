"""The CLIP byte-pair tokenizer, and where a word of a prompt sits among its 77 token positions.

Text becomes ids in five stages, each a component of the `tokenizers` library:

    1. normalise      NFC, every run of whitespace → one space, lower case
    2. split          CLIP's pattern: contractions ('s 't 're 've 'm 'll 'd), runs of letters,
       single
                      digits, runs of anything else; whitespace is dropped. Each piece is a "word"
                      below.
    3. bytes          each word's UTF-8 bytes are spelled with GPT-2's 256-character byte alphabet,
       so any
                      text (accents, emoji) is covered by the vocabulary without an unknown token
    4. BPE            merges.txt, applied within a word; the last token of a word carries the `</w>`
       suffix,
                      so "a" at the end of a word (`a</w>`, 320) and inside one (`a`, 64) are
                      different ids
    5. frame          <|startoftext|> + at most 75 content tokens + <|endoftext|>, padded to 77

The files are OpenAI's CLIP vocabulary as SD1.4 publishes it (`tokenizer/vocab.json`,
`tokenizer/merges.txt`). Every SD1.x checkpoint uses it unchanged, so minid ships a copy
(`minid/assets/clip/`, MIT licence, see its README): `CLIPTokenizer.default()` needs no download.
The prompt-editing code needs to know which of the 77 positions a word occupies and which positions
of two prompts correspond: `token_positions`, `align_tokens`, and the functions `word_spans` and
`prompt_alignment` answer that.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

CONTEXT_LENGTH = 77  # positions the text encoder has (its position-embedding table has 77 rows)
BOS_TOKEN = "<|startoftext|>"  # id 49406 in the CLIP vocabulary
EOS_TOKEN = "<|endoftext|>"  # id 49407
# Stable Diffusion pads with <|endoftext|> (pad = eos = 49407), not with a separate pad token: CLIP
# was trained that way, and SD's UNet cross-attends to all 77 hidden states, pads included, so the
# pad id is part of what the model was trained on. Padding with anything else changes the images.

# The pre-tokenisation pattern of OpenAI's CLIP: the special tokens, English contractions, runs of
# letters, single digits (so numbers are spelled digit by digit), and runs of other non-space
# characters.
SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

# vocab.json and merges.txt of SD1.4's `tokenizer/` folder (CompVis/stable-diffusion-v1-4), byte
# for byte.
DEFAULT_FOLDER = Path(__file__).resolve().parents[1] / "assets" / "clip"


class CLIPTokenizer:
    """CLIP BPE tokenizer with SD's framing: 77 ids, bos 49406, eos = pad 49407, 75 content tokens
    at most.

    >>> tok = CLIPTokenizer.default()  # the copy shipped in minid/assets/clip
    >>> tok = CLIPTokenizer.from_folder("tokenizer")  # or any folder with vocab.json + merges.txt
    >>> tok.encode("a photo of a man")[:7]
    [49406, 320, 1125, 539, 320, 786, 49407]
    >>> tok.token_positions("a man wearing eyeglasses", "eyeglasses")  # bos = 0; eye + glasses</w>
    [4, 5]
    """

    def __init__(
        self, vocab_path: str | Path, merges_path: str | Path, context_length: int = CONTEXT_LENGTH
    ):
        vocab_path, merges_path = Path(vocab_path), Path(merges_path)
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: CLIP tokenizer file not found (a tokenizer folder holds "
                    "vocab.json and merges.txt, e.g. the `tokenizer/` folder of SD1.4)"
                )
        try:
            vocab: dict[str, int] = json.loads(vocab_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{vocab_path}: not valid JSON ({e})") from None
        for token in (BOS_TOKEN, EOS_TOKEN):
            if token not in vocab:
                raise ValueError(
                    f"{vocab_path}: the CLIP special token {token!r} is missing from the "
                    f"vocabulary "
                    "(expected the OpenAI CLIP vocabulary with <|startoftext|> and <|endoftext|>)"
                )
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (bos + eos), got {context_length}")
        # merges.txt starts with a "#version" line; every other line is one merge "left right", in
        # priority order.
        merges = [
            tuple(line.split(" "))
            for line in merges_path.read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#version")
        ]

        self.context_length = context_length
        self.max_content_tokens = context_length - 2  # 75: room for bos and eos
        self.bos_id = vocab[BOS_TOKEN]
        self.eos_id = vocab[EOS_TOKEN]
        self.pad_id = self.eos_id  # see the comment at EOS_TOKEN
        self.vocab_size = len(vocab)

        # Stage 4: BPE. Word ends are marked with a suffix (`</w>`) rather than word starts with a
        # prefix; every byte has a token of its own, so no text ever needs the unknown token.
        tok = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                end_of_word_suffix="</w>",
                continuing_subword_prefix="",
                unk_token=EOS_TOKEN,
                fuse_unk=False,
            )
        )
        # Stage 1. (OpenAI's original also runs `ftfy.fix_text` and HTML unescaping; SD pipelines do
        # not.)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        # Stages 2 and 3. `invert=True, behavior="removed"` keeps the pattern's matches and drops
        # the rest (the whitespace between them); ByteLevel then respells each piece in the byte
        # alphabet.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        # The special tokens written literally in a prompt map to their ids. Which spellings count
        # follows transformers' CLIPTokenizer, which SD pipelines use: <|startoftext|> is matched
        # after normalisation (any case), <|endoftext|> only as written in lower case. (OpenAI's
        # CLIP matches both in any case.)
        tok.add_special_tokens(
            [AddedToken(BOS_TOKEN, normalized=True), AddedToken(EOS_TOKEN, normalized=False)]
        )
        self._tokenizer = tok

    @classmethod
    def from_folder(cls, path: str | Path, context_length: int = CONTEXT_LENGTH) -> "CLIPTokenizer":
        """Load from a folder holding vocab.json and merges.txt (SD1.4's `tokenizer/` folder)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path}: tokenizer folder not found (expected a folder with vocab.json "
                "and merges.txt)"
            )
        return cls(path / "vocab.json", path / "merges.txt", context_length)

    @classmethod
    def default(cls, context_length: int = CONTEXT_LENGTH) -> "CLIPTokenizer":
        """SD1.4's tokenizer from the files that ship with minid (`DEFAULT_FOLDER`)."""
        return cls.from_folder(DEFAULT_FOLDER, context_length)

    # ----------------------------------------------------------------------------------------------
    # ids

    @staticmethod
    def check_text(prompt: str, what: str = "the prompt") -> None:
        """Raise unless `prompt` is a str of real text: a command line's bytes that are not UTF-8
        arrive as lone surrogates ('\udcff'), which no tokenizer can read."""
        if not isinstance(prompt, str):
            raise TypeError(f"{what} must be a str, got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raw = prompt[e.start : e.end].encode("utf-8", "surrogateescape")
            raise ValueError(
                f"{what} is not valid UTF-8 text (bytes {raw!r} at character {e.start}); write it "
                "in UTF-8 (check the terminal's or the file's encoding)"
            ) from None

    def _content(self, prompt: str):
        """The untruncated content tokens of a prompt (no bos/eos), as a `tokenizers.Encoding`."""
        self.check_text(prompt, "a prompt")
        return self._tokenizer.encode(prompt, add_special_tokens=False)

    def dropped_text(self, prompt: str) -> str:
        """The end of `prompt` that falls beyond the 75 content tokens the text encoder reads ("" if
        none)."""
        enc = self._content(prompt)
        if len(enc.ids) <= self.max_content_tokens:
            return ""
        return prompt[enc.offsets[self.max_content_tokens][0] :]

    def _frame(self, content_ids: list[int]) -> list[int]:
        """bos + the first 75 content ids + eos, padded with eos (= pad) to 77."""
        ids = [self.bos_id] + content_ids[: self.max_content_tokens] + [self.eos_id]
        return ids + [self.pad_id] * (self.context_length - len(ids))

    def encode(self, prompt: str) -> list[int]:
        """The 77 ids SD feeds to the text encoder. Content beyond 75 tokens is cut off."""
        return self._frame(self._content(prompt).ids)

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """Ids of one prompt or a batch, as a LongTensor (B, 77)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(
                    f"prompts must be str or a list of str, got an element of type "
                    f"{type(p).__name__}"
                )
            self.check_text(p, "a prompt")
        encodings = self._tokenizer.encode_batch(list(prompts), add_special_tokens=False)
        return torch.tensor([self._frame(e.ids) for e in encodings], dtype=torch.long)  # (B, 77)

    def tokens(self, prompt: str) -> list[str]:
        """The vocabulary strings at the 77 positions (byte-alphabet spelling, `</w>` at word
        ends)."""
        return [self._tokenizer.id_to_token(i) for i in self.encode(prompt)]

    # ----------------------------------------------------------------------------------------------
    # words → positions

    def _words(self, text: str) -> tuple[list[str], list[tuple[int, ...]], list[list[int]]]:
        """Split `text` into CLIP words (the pieces of stage 2).

        Returns, per word: its text as written in `text`, its token ids, and its token indices in
        the untruncated content (so position = index + 1, after bos).
        """
        enc = self._content(text)
        indices: list[list[int]] = []
        for i, word_id in enumerate(enc.word_ids):
            if i == 0 or word_id != enc.word_ids[i - 1]:  # the tokens of one word are consecutive
                indices.append([])
            indices[-1].append(i)
        ids = [tuple(enc.ids[i] for i in group) for group in indices]
        texts = [text[enc.offsets[group[0]][0] : enc.offsets[group[-1]][1]] for group in indices]
        return texts, ids, indices

    def words(self, prompt: str) -> list[str]:
        """The prompt's words as `token_positions` sees them ("don't" is "don", "'t"; "12" is "1",
        "2")."""
        return self._words(prompt)[0]

    def token_positions(self, prompt: str, word: str) -> list[int]:
        """Positions (bos = 0) of every token of every occurrence of `word` in `prompt`, ascending.

        `word` may be one word or a phrase ("black glasses"); it matches whole words of the prompt,
        after the same normalisation as the ids (so case-insensitively): "glass" does not match
        "glasses". A word that BPE splits ("eyeglasses" → `eye`, `glasses</w>`) gives all its
        positions. Positions cut off by the 75-token limit are dropped, so the list may be empty for
        a word late in a long prompt.
        """
        return [p for occurrence in self._occurrences(prompt, word) for p in occurrence]

    def _occurrences(self, prompt: str, word: str) -> list[list[int]]:
        """Per occurrence of `word` in `prompt`: its positions within the 77 (truncated ones
        dropped)."""
        query = self._words(word)[1]
        if not query:
            raise ValueError(f"the word {word!r} has no tokens (empty or only whitespace)")
        texts, ids, indices = self._words(prompt)
        n = len(query)
        found = []
        start = 0
        while start + n <= len(ids):
            if ids[start : start + n] == query:
                positions = [
                    i + 1 for word_indices in indices[start : start + n] for i in word_indices
                ]
                found.append([p for p in positions if p <= self.max_content_tokens])
                start += n  # occurrences do not overlap ("a a" in "a a a" is found once)
            else:
                start += 1
        if not found:
            listed = shortened(", ".join(repr(t) for t in texts), 120)
            raise ValueError(
                f"the word {word!r} is not in the prompt {shortened(prompt)!r}; its words are "
                f"{listed}"
            )
        return found

    def align_tokens(self, prompt_a: str, prompt_b: str, word: str) -> tuple[list[int], list[int]]:
        """Positions of `word` in two prompts, paired: `positions_a[i]` and `positions_b[i]` hold
        the same token.

        This is what a controller that copies attention columns between prompts needs (EditedID's
        token-selective replacement: T's column for "man" comes from O's column for "man", wherever
        "man" sits in each prompt). The k-th occurrence in one prompt is paired with the k-th in the
        other; the two prompts must have the word equally often. A token cut off by truncation in
        either prompt drops out of both lists.
        """
        occ_a, occ_b = self._occurrences(prompt_a, word), self._occurrences(prompt_b, word)
        if len(occ_a) != len(occ_b):
            raise ValueError(
                f"the word {word!r} occurs {len(occ_a)} time(s) in {shortened(prompt_a)!r} but "
                f"{len(occ_b)} time(s) in {shortened(prompt_b)!r}: its k-th occurrence in one "
                "prompt is paired with the k-th in the other, so write it equally often in both "
                "prompts, or choose a word that is"
            )
        # One word is the same tokens wherever it appears (BPE works within a word), so occurrence k
        # has the same token count in both prompts before truncation; untruncated positions zip up
        # to the shorter.
        positions_a, positions_b = [], []
        for pa, pb in zip(occ_a, occ_b):
            k = min(len(pa), len(pb))
            positions_a += pa[:k]
            positions_b += pb[:k]
        return positions_a, positions_b


def prompt_note(tokenizer, prompt: str, what: str) -> str | None:
    """Check that a prompt is text the tokenizer can read (ValueError otherwise) and return a note
    when it is longer than the text encoder's window (SD's convention: the rest is cut off), else
    None."""
    tokenizer.check_text(prompt, what)
    dropped = tokenizer.dropped_text(prompt)
    if not dropped:
        return None
    return (
        f"{what} is longer than the {tokenizer.max_content_tokens} tokens SD1.4's text encoder "
        f"reads; the end is ignored: {shortened(dropped)!r}"
    )


def shortened(text: str, limit: int = 60) -> str:
    """`text` as an error message quotes it: whole up to `limit` characters, else its start and
    '…' (a prompt can be thousands of characters; one line names it by its start)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
