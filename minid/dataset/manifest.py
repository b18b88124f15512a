"""The manifest of a calibration job (paper: Conclusion; A.17): one row per (original, edited) pair.

Calibrating a face dataset means restoring thousands of edited photos, so the pairs come as a table
rather than as command-line flags. Two formats, told apart by the file's suffix:

- CSV (`.csv`): a header row, then one row per pair. Words are space-separated ("man face"); an
  empty cell is an absent value.
- JSON Lines (`.jsonl`, `.ndjson`): one JSON object per line; words are lists (["man", "face"]); a
  missing key or null is an absent value. Blank lines are skipped.

Columns (fields):

| column | required | meaning |
|---|---|---|
| original, edited | yes | image files, relative to the manifest's folder (or absolute) |
| prompt_original, prompt_edited | yes | the two prompts |
| id_words | yes | identity words, in both prompts |
| element_words | no | edited elements, in the edited prompt (needed without element_mask) |
| face_mask, element_mask | no | PNG masks, white = region, relative like the images |
| lambda_o | no | weight of O where the masks overlap, in [0, 1] (`RestorePair.lambda_o`) |
| seed | no | the pair's seed (`RestorePair.seed`); empty: the job's seed |
| id | no | the row's name, letters, digits, `.`, `_`, `-`; empty: `row-00003` for the third data
row |
| steps, guidance, w0, … | no | per-row method options, named as `minid restore`'s flags (`_` for
`-`) |

A row that cannot be read (a cell that is not a number, a missing required value) becomes a `Row`
with `error` set: it is recorded and the job goes on. What makes the whole manifest unusable (no
such file, a CSV header without a required column or with an unknown one, two rows with one id)
raises `ManifestError`.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from minid.restore.config import METHOD_FLAGS

REQUIRED = ("original", "edited", "prompt_original", "prompt_edited", "id_words")
OPTIONAL = ("id", "element_words", "face_mask", "element_mask", "lambda_o", "seed")
FILES = ("original", "edited", "face_mask", "element_mask")
# Per-row overrides: each method option of the command line, as a column named like its flag
# (--w-lr: w_lr),
# -> (field of RestoreConfig, type). lambda_o is the pair's own field (RestorePair.lambda_o), not an
# override.
OVERRIDES = {
    flag.lstrip("-").replace("-", "_"): (path, kind)
    for flag, (path, kind, _) in METHOD_FLAGS.items()
    if flag != "--lambda-o"
}
COLUMNS = REQUIRED + OPTIONAL + tuple(OVERRIDES)
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
CSV_SUFFIXES, JSONL_SUFFIXES = (".csv",), (".jsonl", ".ndjson")


class ManifestError(ValueError):
    """The manifest as a whole cannot be used; the message names the file, what is wrong and what to
    do."""


@dataclass(frozen=True)
class Row:
    """One pair of the manifest, its paths resolved against the manifest's folder."""

    number: int  # 1-based position among the manifest's data rows
    id: str  # the `id` column, else row-00003: names the result files
    original: Path | None = None
    edited: Path | None = None
    prompt_original: str = ""
    prompt_edited: str = ""
    id_words: tuple[str, ...] = ()
    element_words: tuple[str, ...] = ()
    face_mask: Path | None = None
    element_mask: Path | None = None
    lambda_o: float | None = None
    seed: int | None = None  # None: the job's seed
    # (dotted field of RestoreConfig, value), in column order
    overrides: tuple[tuple[str, object], ...] = ()
    error: str | None = None  # why the row could not be read, and what to do

    def files(self) -> dict[str, Path]:
        """The row's input files by column (original, edited and the masks it names)."""
        return {name: getattr(self, name) for name in FILES if getattr(self, name) is not None}

    def pair(self, default_seed: int = 0):
        """The row as the `RestorePair` a restore checks; `default_seed` where the row names
        none."""
        from minid.restore.inputs import RestorePair

        return RestorePair(
            self.original,
            self.edited,
            self.prompt_original,
            self.prompt_edited,
            list(self.id_words),
            list(self.element_words),
            self.face_mask,
            self.element_mask,
            self.lambda_o,
            default_seed if self.seed is None else self.seed,
        )


@dataclass(frozen=True)
class Manifest:
    path: Path
    rows: list[Row]


def read_manifest(path: str | Path) -> Manifest:
    """Read a CSV or JSON Lines manifest (module docstring); rows in file order, ids checked
    unique."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"manifest {path} not found; give a .csv or .jsonl file with one row per pair"
        )
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES + JSONL_SUFFIXES:
        raise ManifestError(
            f"manifest {path}: expected a .csv or .jsonl (JSON Lines) file, found suffix "
            f"{suffix or '(none)'!r}; rename it after its format"
        )
    try:
        rows = _read_csv(path) if suffix in CSV_SUFFIXES else _read_jsonl(path)
    except UnicodeDecodeError:
        raise ManifestError(_not_utf8(path)) from None
    seen: dict[str, int] = {}
    for row in rows:
        if not ID_PATTERN.fullmatch(row.id):
            raise ManifestError(
                f"manifest {path} row {row.number}: id {row.id!r} must be 1-100 letters, digits, "
                "'.', '_' or '-' starting with a letter or digit (it names the result file)"
            )
        if row.id in seen:
            raise ManifestError(
                f"manifest {path}: rows {seen[row.id]} and {row.number} share the id {row.id!r}; "
                "give each row its own id"
            )
        seen[row.id] = row.number
    return Manifest(path=path, rows=rows)


def _not_utf8(path: Path) -> str:
    """The message for a manifest that is not UTF-8: the file, the line and byte that fail."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        where = "it"
    except UnicodeDecodeError as e:  # the first byte that fails, counted in the whole file
        line = raw[: e.start].count(b"\n") + 1
        where = f"line {line} (byte 0x{raw[e.start]:02x} at offset {e.start})"
    return (
        f"manifest {path}: {where} is not UTF-8 (a Latin-1 or Windows-1252 export?); save the "
        "file as UTF-8"
    )


def _read_csv(path: Path) -> list[Row]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ManifestError(
                f"manifest {path}: the header lacks the column(s) {', '.join(missing)}; it has "
                f"{', '.join(header) or 'none'}. Required: {', '.join(REQUIRED)}"
            )
        unknown = [c for c in header if c not in COLUMNS]
        if unknown:
            raise ManifestError(
                f"manifest {path}: unknown column(s) {', '.join(map(repr, unknown))}; known "
                f"columns: {', '.join(COLUMNS)}"
            )
        rows = []
        for number, record in enumerate(reader, start=1):
            if None in record:  # more cells than header names
                rows.append(
                    _bad(
                        number,
                        record.get("id"),
                        f"{len(record[None])} cell(s) more than the header has",
                    )
                )
                continue
            values = {
                k: (v if v is not None and v.strip() != "" else None) for k, v in record.items()
            }
            rows.append(_row(path, number, values, words=lambda v: v.split()))
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    for number, (line_number, line) in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append(_bad(number, None, f"line {line_number} is not valid JSON ({e})"))
            continue
        if not isinstance(record, dict):
            rows.append(
                _bad(
                    number,
                    None,
                    f"line {line_number} is a JSON {type(record).__name__}, not an object",
                )
            )
            continue
        unknown = [k for k in record if k not in COLUMNS]
        if unknown:
            rows.append(
                _bad(
                    number,
                    record.get("id"),
                    f"unknown field(s) {', '.join(map(repr, unknown))}; known "
                    f"fields: {', '.join(COLUMNS)}",
                )
            )
            continue
        rows.append(_row(path, number, record, words=_word_list))
    return rows


def _word_list(value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
        raise ValueError(
            f'must be a list of words in JSON Lines, e.g. ["man", "face"]; found {value!r}'
        )
    return value


def _default_id(number: int) -> str:
    return f"row-{number:05d}"


def _bad(number: int, given_id, message: str) -> Row:
    row_id = given_id if isinstance(given_id, str) and given_id else _default_id(number)
    return Row(number=number, id=row_id, error=message)


def _row(manifest: Path, number: int, values: dict, words) -> Row:
    """A Row from one record's values (None = absent); a value that cannot be read gives a Row with
    error."""
    given_id = values.get("id")
    row_id = str(given_id) if given_id is not None else _default_id(number)
    fields: dict[str, object] = {}
    try:
        absent = [c for c in REQUIRED if values.get(c) is None]
        if absent:
            raise ValueError(f"no value for {', '.join(absent)} (required: {', '.join(REQUIRED)})")
        for name in FILES:
            if values.get(name) is not None:
                # an absolute path stays as it is
                fields[name] = manifest.parent / Path(str(values[name]))
        for name in ("prompt_original", "prompt_edited"):
            fields[name] = str(values[name])
        for name in ("id_words", "element_words"):
            if values.get(name) is not None:
                try:
                    fields[name] = tuple(words(values[name]))
                except ValueError as e:
                    raise ValueError(f"{name} {e}") from None
        if values.get("lambda_o") is not None:
            fields["lambda_o"] = _number("lambda_o", values["lambda_o"], float)
        if values.get("seed") is not None:
            fields["seed"] = _number("seed", values["seed"], int)
        fields["overrides"] = tuple(
            (OVERRIDES[c][0], _override(c, values[c]))
            for c in OVERRIDES
            if values.get(c) is not None
        )
    except ValueError as e:
        return Row(number=number, id=row_id, error=str(e))
    return Row(number=number, id=row_id, **fields)


def _number(column: str, value, kind):
    """A cell as int or float: numbers from JSON as they are, strings from CSV parsed."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value) if not isinstance(value, str) else kind(value.strip())
    except (TypeError, ValueError):
        raise ValueError(
            f"{column} must be {'an integer' if kind is int else 'a number'}, found {value!r}"
        ) from None


def _override(column: str, value):
    kind = OVERRIDES[column][1]
    if isinstance(kind, tuple):
        if value not in kind:
            raise ValueError(f"{column} must be one of {', '.join(kind)}, found {value!r}")
        return value
    if kind in (int, float):
        return _number(column, value, kind)
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{column}: {e}") from None
