"""Prompt-to-prompt (Hertz et al. 2022): the token aligner of two prompts, the controller that edits
cross-attention with it, and local blend.

- `prompt_alignment`: for each target token, the source token whose cross-attention column it takes
  (word replace, or refine as the authors' `seq_aligner` does it).
- `PromptToPrompt`: word replace / refine (token columns from the source prompt), reweight, and
  self-attention injection in a step window.
- `local_blend`: the source latent outside a region, the target's inside.
"""

from __future__ import annotations

from typing import Literal

import torch

from minid.kernels.dispatch import token_replace
from minid.method.control import BatchLayout
from minid.models.attention import Site, default_attention
from minid.models.tokenizer import CLIPTokenizer


def word_spans(tokenizer: CLIPTokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """The prompt's words in order with their token positions (bos = 0); positions cut off by the
    75-token limit are dropped."""
    texts, _, indices = tokenizer._words(prompt)
    limit = tokenizer.max_content_tokens
    return [(text, [i + 1 for i in idx if i + 1 <= limit]) for text, idx in zip(texts, indices)]


def prompt_alignment(
    tokenizer: CLIPTokenizer,
    prompt_source: str,
    prompt_target: str,
    mode: Literal["replace", "refine"] = "refine",
) -> torch.Tensor:
    """For each of the 77 target positions, the source position whose cross-attention column it
    takes (prompt-to-prompt's word swap and refinement, Hertz et al. 2022). -1 means "keep the
    target's own column".

    `refine` (words added or changed), as the authors' aligner (`seq_aligner.get_mapper`) does it:
    the framed ids of both prompts (bos, the tokens, eos; no padding) are globally aligned
    (`_global_alignment`); a target token aligned with an equal source token takes that token's
    column, one left unaligned (a new word) keeps its own; every position after the target's eos
    (the padding) takes the source's column at the same position. `replace` (word swap): the prompts
    have the same number of words, word i of the target takes the columns of word i of the source
    (spread when the token counts differ), bos takes bos, and the eos and padding after the last
    word take the source's, in order.
    """
    length = tokenizer.context_length
    mapping = torch.full((length,), -1, dtype=torch.long)
    if mode == "refine":
        source, target = (_framed_ids(tokenizer, p) for p in (prompt_source, prompt_target))
        aligned = _global_alignment(source, target)
        mapping[: len(target)] = torch.tensor(aligned, dtype=torch.long)
        mapping[len(target) :] = torch.arange(len(target), length)  # padding to itself
        return mapping
    if mode != "replace":
        raise ValueError(f"alignment mode must be 'replace' or 'refine', got {mode!r}")
    src, tgt = word_spans(tokenizer, prompt_source), word_spans(tokenizer, prompt_target)
    if len(src) != len(tgt):
        raise ValueError(
            f"word replace needs prompts with as many words; {prompt_source!r} has "
            f"{len(src)}, {prompt_target!r} has {len(tgt)}. Use mode='refine'"
        )
    mapping[0] = 0
    for (_, ps), (_, pt) in zip(src, tgt):
        for t, s in _spread(pt, ps):
            mapping[t] = s
    # eos and padding: the target's first eos takes the source's first eos, and so on.
    end_s = 1 + sum(len(p) for _, p in src)
    end_t = 1 + sum(len(p) for _, p in tgt)
    for j in range(end_t, length):
        s = end_s + (j - end_t)
        if s < length:
            mapping[j] = s
    return mapping


def _framed_ids(tokenizer: CLIPTokenizer, prompt: str) -> list[int]:
    """bos, the prompt's tokens (at most 75) and eos: the 77 ids without their padding."""
    ids = tokenizer.encode(prompt)
    return ids[: ids.index(tokenizer.eos_id, 1) + 1]


def _global_alignment(source: list[int], target: list[int]) -> list[int]:
    """For each target token, the index of the source token it is aligned with, or -1
    (Needleman-Wunsch with gap 0, match +1, mismatch −1, so only equal tokens pair: a longest common
    subsequence).

    Among equally good alignments the one chosen is the reference aligner's: walking back from the
    ends, a target token left alone is preferred to a source token left alone, and both to a pair.
    That decides which of two equal tokens ("a photo of a cat in a forest" has two "a") takes the
    source's column.
    """
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [["new"] * (m + 1) for _ in range(n + 1)]  # row 0: only target tokens remain
    for i in range(1, n + 1):
        move[i][0] = "drop"  # column 0: only source tokens remain
        for j in range(1, m + 1):
            new, drop = score[i][j - 1], score[i - 1][j]  # gap 0
            pair = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            score[i][j] = max(new, drop, pair)
            move[i][j] = (
                "new" if score[i][j] == new else ("drop" if score[i][j] == drop else "pair")
            )
    aligned = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i][j] == "pair":
            i, j = i - 1, j - 1
            aligned[j] = i
        elif move[i][j] == "new":
            j -= 1
        else:
            i -= 1
    return aligned


def _spread(target: list[int], source: list[int]) -> list[tuple[int, int]]:
    """Pair the tokens of a target word with those of a source word of maybe another length, in
    order."""
    if not target or not source:
        return []
    return [
        (t, source[min(len(source) - 1, i * len(source) // len(target))])
        for i, t in enumerate(target)
    ]


class PromptToPrompt:
    """Prompt-to-prompt editing for a batch [source, target_1, …] (Hertz et al. 2022), conditional
    half only.

    - cross-attention, while the step is in the cross window: each target's columns come from the
      source's map through `alignment[i]` (see `tokenizer.prompt_alignment`; -1 keeps the target's
      column);
    - `reweight[i]` {position: factor}: the target's column is multiplied by the factor (done on V's
      row, which is the same thing: `(P ⊙ c) V = P (c ⊙ V)`), while the cross window is open, as in
      the authors' code, where the factor lives inside the replacement; `reweight_every_step=True`
      applies it at every step;
    - self-attention, while the step is in the self window and the map side is at most
      `self_max_side`: the target's map is the source's (`P_src V_tgt`, the map reading of
      injection). The two public conventions: the diffusers community pipeline injects up to 16²
      query positions (`self_max_side=16`, the default), PnPInversion's port up to 32²
      (`self_max_side=32`).
    The unconditional half runs unedited, as in the authors' code: guidance then amplifies the edit.
    Windows are fractions (start, end) of the pass, counted as the authors' code counts them
    (`ptp_utils.get_time_words_attention_alpha` and `AttentionControlEdit`): the cross window covers
    steps int(start·(N+1)) ≤ i < int(end·(N+1)), the self window int(start·N) ≤ i < int(end·N), N =
    `num_steps`. The step index comes with each call (`at_step`).
    """

    def __init__(
        self,
        layout: BatchLayout,
        alignment: list[torch.Tensor],
        reweight: list[dict[int, float]] | None = None,
        cross_window: tuple[float, float] = (0.0, 0.8),
        self_window: tuple[float, float] = (0.0, 0.4),
        self_max_side: int = 16,
        num_steps: int = 50,
        reweight_every_step: bool = False,
    ):
        if len(alignment) != layout.branches - 1:
            raise ValueError(
                f"{layout.branches - 1} target branch(es) need as many alignments, "
                f"got {len(alignment)}"
            )
        self.layout = layout
        self.alignment = alignment
        self.reweight = reweight or [{} for _ in alignment]
        self.cross_window = cross_window
        self.self_window = self_window
        self.self_max_side = self_max_side
        self.num_steps = num_steps
        self.reweight_every_step = reweight_every_step

    def cross_active(self, step: int) -> bool:
        """Whether the cross-attention replacement acts at this step: int(start·(N+1)) ≤ step <
        int(end·(N+1))."""
        start, end = (int(f * (self.num_steps + 1)) for f in self.cross_window)
        return start <= step < end

    def self_active(self, step: int) -> bool:
        """Whether self-attention is injected at this step: int(start·N) ≤ step < int(end·N)."""
        start, end = (int(f * self.num_steps) for f in self.self_window)
        return start <= step < end

    def __call__(self, q, k, v, site: Site, step: int = 0):
        self.layout.check(q, site)
        lay = self.layout
        src = lay.row(0)
        if site.is_cross:
            edit_cross = self.cross_active(step)
            reweight = edit_cross or self.reweight_every_step
            if not edit_cross and not (reweight and any(self.reweight)):
                return None
            out = default_attention(q, k, v)
            for b in range(1, lay.branches):
                r = lay.row(b)
                v_t = v[r : r + 1]
                if reweight and self.reweight[b - 1]:
                    scale = torch.ones(v.shape[2], dtype=v.dtype, device=v.device)
                    for pos, factor in self.reweight[b - 1].items():
                        scale[pos] = factor
                    # (1, h, 77, d): column j of P scaled = row j of V scaled
                    v_t = v_t * scale[:, None]
                mapping = self.alignment[b - 1].to(q.device)
                if not edit_cross:
                    mapping = torch.full_like(mapping, -1)
                src_branch = torch.where(mapping >= 0, 0, -1)
                src_token = mapping.clamp_min(0)
                out[r : r + 1] = token_replace(
                    q[r : r + 1],
                    k[r : r + 1],
                    v_t,
                    sources=[(q[src : src + 1], k[src : src + 1])],
                    src_branch=src_branch,
                    src_token=src_token,
                )
            return out
        if not self.self_active(step) or site.height > self.self_max_side:
            return None
        out = default_attention(q, k, v)
        for b in range(1, lay.branches):
            r = lay.row(b)
            # P_src V_tgt
            out[r : r + 1] = default_attention(q[src : src + 1], k[src : src + 1], v[r : r + 1])
        return out


def local_blend(z_source: torch.Tensor, z_target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the source latent outside `mask` (1 inside): z_src + m ⊙ (z_tgt − z_src), P2P's local
    blend."""
    return z_source + mask * (z_target - z_source)
