"""What an attention op computes, told to a profiler: the range each of minid's attention ops opens
in a torch.profiler trace, and the op's analytic FLOP and bytes.

The seam's SDPA (`minid.models.attention.default_attention`) and the three ops of dispatch.py open a
`torch.profiler.record_function` range named after the op and its shapes, e.g.

    minid.attention op=masked_multi_source B=1 h=8 Nq=4096 Nk=4096 d=40 dv=40 e=2 S=3 mode=output

so a Chrome trace says what each range computed, and `OpCall.parse` reads the name back (`minid
profile` does, to count each attention site's FLOP and bytes). A range is opened only while a
profiler records (`torch.autograd._profiler_enabled()`); otherwise the ops run as before, with one
flag read more.

The counts are those of the op's statement, whatever runs it (the Triton kernel, the chunked PyTorch
path or SDPA):

- FLOP: the two matmuls of each attention, 2·B·h·Nq·Nk·d for q kᵀ and 2·B·h·Nq·Nk·dv for P v (the
  softmax, the weighting and the head average are not counted, as FlashAttention's papers count).
  `sdpa` and `attention_with_map`: one attention. `masked_multi_source`: S attentions, one per
  source (each source's normalised rows P_s v are weighted; kernels/multi_source.py). A zero weight
  over a whole query block lets the Triton kernel skip that source there; the count does not
  subtract it. `token_replace` with U sources: q kᵀ of the target and of each source, and one
  P' v_T: (2 + 2U)·B·h·Nq·Nk·d + 2·B·h·Nq·Nk·dv. `mutual_attention` over S sources: one attention
  of the queries over the S·Nk keys, S × one attention's count.
- Bytes: every input read once and every output written once, at the inputs' element size (`e`);
  the map and the log-sum-exp in fp32, the weights in fp32, the token tables as int64. That is the
  traffic of a fused kernel that keeps its scores on chip, a lower bound for any implementation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch

PREFIX = "minid.attention "
OPS = ("sdpa", "attention_with_map", "masked_multi_source", "token_replace", "mutual_attention")
# the names the ops' fields take in a range name, in order
_KEYS = {
    "b": "B",
    "h": "h",
    "nq": "Nq",
    "nk": "Nk",
    "d": "d",
    "dv": "dv",
    "itemsize": "e",
    "sources": "S",
    "want_map": "map",
    "want_lse": "lse",
    "mode": "mode",
}


@dataclass(frozen=True)
class OpCall:
    """One call of an attention op: its name, shapes and element size (see the module docstring)."""

    op: str  # one of OPS
    b: int  # batch rows of each of its attentions (a source's rows, for the multi-source ops)
    h: int  # heads
    nq: int  # query positions
    nk: int  # key positions
    d: int  # head size of q and k
    dv: int  # head size of v
    itemsize: int  # bytes per element of q, k and v
    # masked_multi_source, mutual_attention: S, the number of sources (key sets); token_replace:
    # U, the sources besides the target
    sources: int = 1
    want_map: bool = False  # attention_with_map: the head-averaged map (B, Nq, Nk) fp32 written
    want_lse: bool = False  # attention_with_map: the row log-sum-exp (B, h, Nq) fp32 written
    mode: str = ""  # masked_multi_source: "map" (every source multiplies v_T) or "output"

    @property
    def attentions(self) -> int:
        """How many (q kᵀ, P v) pairs of B·h·Nq·Nk the op's statement has."""
        return self.sources if self.op in ("masked_multi_source", "mutual_attention") else 1

    @property
    def flops(self) -> int:
        unit = 2 * self.b * self.h * self.nq * self.nk
        if self.op == "token_replace":
            return unit * ((1 + self.sources) * self.d + self.dv)
        return self.attentions * unit * (self.d + self.dv)

    @property
    def bytes(self) -> int:
        rows_q, rows_k = self.b * self.h * self.nq, self.b * self.h * self.nk
        q, k, v, out = rows_q * self.d, rows_k * self.d, rows_k * self.dv, rows_q * self.dv
        if self.op == "masked_multi_source":
            values = v * (self.sources if self.mode == "output" else 1)
            moved = (self.sources * (q + k) + values + out) * self.itemsize
            return moved + 4 * self.b * self.sources * self.nq
        if self.op == "token_replace":
            return ((1 + self.sources) * (q + k) + v + out) * self.itemsize + 16 * self.nk
        if self.op == "mutual_attention":
            moved = (q + self.sources * (k + v) + out) * self.itemsize
            return moved + 4 * self.b * self.sources * self.nq
        extra = 4 * self.b * self.nq * self.nk * self.want_map + 4 * rows_q * self.want_lse
        return (q + k + v + out) * self.itemsize + extra

    @property
    def range_name(self) -> str:
        parts = [f"op={self.op}"]
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{_KEYS[f.name]}={int(value) if isinstance(value, bool) else value}")
        return PREFIX + " ".join(parts)

    @classmethod
    def parse(cls, name: str) -> "OpCall | None":
        """The call a range name describes, or None for a range that is not an op's."""
        if not name.startswith(PREFIX):
            return None
        values = dict(part.split("=", 1) for part in name[len(PREFIX) :].split())
        names = {v: k for k, v in _KEYS.items()}
        kwargs = {}
        for key, text in values.items():
            if key == "op":
                continue
            field = names[key]
            kwargs[field] = text if field == "mode" else int(text)
        for flag in ("want_map", "want_lse"):
            if flag in kwargs:
                kwargs[flag] = bool(kwargs[flag])
        return cls(values["op"], **kwargs)


def op_call(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **extra) -> OpCall:
    """The OpCall of an op on q (B, h, Nq, d), k (B, h, Nk, d), v (B, h, Nk, dv)."""
    b, h, nq, d = q.shape
    return OpCall(op, b, h, nq, k.shape[2], d, v.shape[-1], q.element_size(), **extra)


def op_range(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **extra):
    """The profiler range of one op call (a no-op context when no profiler records)."""
    if not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    return torch.profiler.record_function(op_call(op, q, k, v, **extra).range_name)
