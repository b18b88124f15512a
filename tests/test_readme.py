"""The README's code and tables are what the code does: its text-to-image loop runs as written, and
its table of restore options names every method flag with the parser's default and the config field
it sets."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from minid.app import cli
from minid.restore.config import METHOD_FLAGS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _python_block_after(marker: str) -> str:
    start = README.index(marker)
    match = re.compile(r"```python\n(.*?)```", re.S).search(README, start)
    assert match is not None, f"no python block after {marker!r} in README.md"
    return match.group(1)


def test_the_text_to_image_loop_runs_as_written():
    code = _python_block_after("A text-to-image loop")
    assert len(code.strip().splitlines()) <= 22, (
        "the loop is meant to be short enough to read at once"
    )
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    image = namespace["image"]
    assert image.shape == (1, 3, 64, 64) and bool(torch.isfinite(image).all()), (
        f"image {tuple(image.shape)}"
    )


def test_the_restore_options_table_matches_the_parser():
    rows = {}
    for line in README.splitlines():
        m = re.match(r"\| `(--[a-z0-9-]+)` \| ([^|]+) \| [^|]+ \| `([a-z0-9_.]+)` \|$", line)
        if m:
            rows[m.group(1)] = (m.group(2).strip(), m.group(3))
    args = cli.build_parser().parse_args(
        [
            "restore",
            "--original",
            "o.png",
            "--edited",
            "e.png",
            "--prompt-original",
            "a man",
            "--prompt-edited",
            "a man",
            "--id-words",
            "man",
            "--out",
            "r.png",
        ]
    )
    defaults = {flag: getattr(args, flag.lstrip("-").replace("-", "_")) for flag in METHOD_FLAGS}
    assert set(rows) == set(METHOD_FLAGS), (
        f"README lists {sorted(rows)}, the CLI has {sorted(METHOD_FLAGS)}"
    )
    for flag, (default, field) in rows.items():
        assert field == METHOD_FLAGS[flag][0], (
            f"{flag}: README says field {field}, the CLI sets {METHOD_FLAGS[flag][0]}"
        )
        assert default == str(defaults[flag]), (
            f"{flag}: README says default {default}, the parser {defaults[flag]}"
        )
