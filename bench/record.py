"""What every results file records about its run: the commit, the command, and the full config it
ran with, nested, as JSON, with the configs it claims are minid's shipped defaults named.

A results file ends with

    ## Run record

    ```json
    {"bench": "bench/defaults.py", "commit": "…", "dirty": false, "argv": […], "date": "…",
     "config": {…}, "defaults": {"method": "minid.method.editedid.EditedIDConfig"}}
    ```

`defaults` maps a key of `config` to the class whose no-argument instance that part of the config
claims to be; tests/test_bench_records.py fails when the recorded values differ from the class's
current defaults, so a table that the shipped defaults no longer produce cannot stay in place
unnoticed: the bench must be re-run (or the claim dropped).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Run record"


def jsonable(value):
    """A config as plain JSON: dataclasses as dicts (nested), tuples as lists, non-finite floats as
    the strings "inf", "-inf", "nan"."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def commit() -> tuple[str, bool]:
    """The checkout's commit (short) and whether tracked files outside bench/results differ from it
    (a bench run after another finds that one's results rewritten: not a change to the code)."""

    def git(*args):
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"))
    return head, dirty


def run_record(config: dict, defaults: dict[str, str] | None = None) -> str:
    """The "Run record" section: the commit, the command line, the date and `config` (any nesting
    of dataclasses, dicts and values); `defaults` names the parts of `config` that are shipped
    defaults, key → the dotted class name."""
    head, dirty = commit()
    record = {
        "bench": Path(sys.argv[0]).resolve().relative_to(REPO).as_posix()
        if Path(sys.argv[0]).resolve().is_relative_to(REPO)
        else sys.argv[0],
        "commit": head,
        "dirty": dirty,
        "argv": sys.argv[1:],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": jsonable(config),
        "defaults": dict(defaults or {}),
    }
    for key in record["defaults"]:
        if key not in record["config"]:
            raise KeyError(
                f"the run record claims defaults for {key!r}, which is not in its config"
            )
    return f"{HEADING}\n\n```json\n{json.dumps(record, indent=1, sort_keys=True)}\n```\n"


def write_results(path: Path, text: str, config: dict, defaults: dict[str, str] | None = None):
    """Write a results file: the bench's own text, then its run record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n\n" + run_record(config, defaults))
    print(f"wrote {path}")


def read_record(text: str) -> dict | None:
    """The run record of a results file's text, None when it has none."""
    if HEADING not in text:
        return None
    block = text.rsplit(HEADING, 1)[1]
    start = block.index("```json") + len("```json")
    return json.loads(block[start : block.index("```", start)])
