"""The library stands alone: diffusers and transformers are references for tests and benchmarks
only."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import minid

FORBIDDEN = ("diffusers", "transformers")


def _library_modules() -> list[str]:
    names = ["minid"]
    for info in pkgutil.walk_packages(minid.__path__, prefix="minid."):
        names.append(info.name)
    return names


def test_every_module_is_found():
    names = _library_modules()
    assert "minid.models.attention" in names and "minid.models.config" in names, (
        f"module walk found only {names}"
    )


def test_library_never_imports_the_reference_libraries():
    names = _library_modules()
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, f"importing the minid modules failed:\n{out.stderr}"
    loaded = out.stdout.strip()
    assert loaded == "", (
        f"importing {len(names)} minid modules loaded reference libraries: {loaded}"
    )


def test_kernels_are_not_a_top_level_package(tmp_path):
    """kernels/ is installed as minid.kernels; the generic top-level name `kernels` is left
    alone."""
    code = (
        "import importlib.util\n"
        "print(importlib.util.find_spec('minid.kernels') is not None, "
        "importlib.util.find_spec('kernels'))\n"
    )
    # Run from an empty folder so the repository root is not on sys.path: what is seen is the
    # installation.
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "None"], (
        f"expected minid.kernels importable and no 'kernels': {out.stdout}"
    )


def test_the_exported_functions_stay_functions_after_their_modules_are_imported():
    import importlib

    for name, module in minid._EXPORTS.items():
        importlib.import_module(module)
        assert getattr(minid, name) is getattr(importlib.import_module(module), name), (
            f"minid.{name} is shadowed by a module of the same name"
        )
