"""Benchmark results that cannot go stale: every results file in bench/results ends with the run
record bench/record.py writes (commit, command, the full nested config), and a file that claims some
part of its config is minid's shipped defaults fails here as soon as those defaults change."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = sorted((REPO / "bench" / "results").glob("*.md"))


def _record_module():
    spec = importlib.util.spec_from_file_location("bench_record", REPO / "bench" / "record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


record = _record_module()


def _shipped(dotted: str):
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)()


def _differences(recorded, shipped, path=""):
    """The dotted paths at which two JSON values differ."""
    if isinstance(recorded, dict) and isinstance(shipped, dict):
        out = []
        for key in sorted(set(recorded) | set(shipped)):
            if key not in recorded or key not in shipped:
                out.append(f"{path}{key} (only in the {'record' if key in recorded else 'code'})")
            else:
                out += _differences(recorded[key], shipped[key], f"{path}{key}.")
        return out
    return (
        [] if recorded == shipped else [f"{path[:-1]}: recorded {recorded!r}, shipped {shipped!r}"]
    )


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_every_results_file_records_its_commit_and_config(path):
    rec = record.read_record(path.read_text())
    assert rec is not None, (
        f"{path.name} has no '{record.HEADING}' section: re-run its bench "
        "(bench/record.write_results adds it)"
    )
    assert rec["commit"] and rec["bench"] and isinstance(rec["config"], dict) and rec["config"]
    assert (REPO / rec["bench"]).is_file(), f"{path.name}: {rec['bench']} is not a bench file"


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_a_results_file_claiming_the_shipped_defaults_ran_them(path):
    rec = record.read_record(path.read_text()) or {"defaults": {}}
    for key, dotted in rec["defaults"].items():
        shipped = json.loads(json.dumps(record.jsonable(_shipped(dotted))))
        diff = _differences(rec["config"][key], shipped)
        assert not diff, (
            f"{path.name} claims its {key!r} config is {dotted}() but it ran with other values "
            f"({'; '.join(diff)}): the table is stale, re-run {rec['bench']}"
        )


def test_the_check_catches_a_changed_default(tmp_path):
    from minid.method.editedid import EditedIDConfig
    from minid.method.mixing import MixingConfig

    text = "# a table\n\n" + record.run_record(
        {"method": EditedIDConfig(mixing=MixingConfig(w0=0.1))},
        {"method": "minid.method.editedid.EditedIDConfig"},
    )
    rec = record.read_record(text)
    shipped = json.loads(json.dumps(record.jsonable(EditedIDConfig())))
    assert _differences(rec["config"]["method"], shipped) == [
        "mixing.w0: recorded 0.1, shipped 0.04"
    ]
    assert not _differences(json.loads(json.dumps(record.jsonable(EditedIDConfig()))), shipped), (
        "the shipped config must equal itself through the record"
    )
    assert record.jsonable(float("inf")) == "inf" and dataclasses.is_dataclass(EditedIDConfig())
