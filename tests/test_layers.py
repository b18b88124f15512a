"""The house's layers, read from the code's own imports (every `import` and `from … import`, those
inside functions too): each package of minid imports only from the packages below it, never from one
above, and the modules import each other without a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Reading order, lowest first. The SD core is kernels, models, sampling, loading, and the users'
# test kit for sampler math (minid.testing) built on them.
LAYERS = (
    "kernels",
    "models",
    "sampling",
    "loading",
    "testing",
    "imaging",
    "method",
    "faces",
    "restore",
    "dataset",
    "app",
)
SD_CORE = ("kernels", "models", "sampling", "loading", "testing")


def _modules() -> dict[str, Path]:
    """module name -> file, for minid's packages and kernels/ (installed as minid.kernels)."""
    found = {}
    for path in sorted((ROOT / "minid").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "kernels":
            parts = ["minid", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The minid modules that `name` imports, resolved to module names (a name imported from a
    package that is a module of it counts as that module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("minid.") and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer():
    loose = sorted(m for m in MODULES if m != "minid" and _layer(m) is None)
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"
    assert len(MODULES) > 40, f"found only {len(MODULES)} modules: {sorted(MODULES)}"


def test_no_import_reaches_a_higher_layer():
    upward = sorted(
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if _layer(m)
        for t in targets
        if _layer(t) and LAYERS.index(_layer(t)) > LAYERS.index(_layer(m))
    )
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", SD_CORE)
def test_the_sd_core_stands_alone(package):
    """A reader learns Stable Diffusion 1.4 from kernels, models, sampling and loading alone."""
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if _layer(m) == package
        for t in targets
        if _layer(t) not in SD_CORE
    )
    assert not bad, "the SD core imports the method or what is built on it:\n" + "\n".join(bad)


def test_the_library_never_imports_the_command_line():
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if _layer(m) != "app"
        for t in targets
        if _layer(t) == "app"
    )
    assert not bad, "library modules importing minid.app:\n" + "\n".join(bad)


def test_no_import_circle():
    """Depth-first search for a back edge in the module graph (function-local imports included)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t == "minid":
                continue
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_check_finds_a_planted_upward_import(tmp_path):
    """The reader of imports sees what it must: a method module importing the app is an upward
    arrow."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "def f():\n    from minid.app.cli import main\n    from minid.restore import config\n"
    )
    found = _imports("minid.method.planted", planted)
    assert found == {"minid.app.cli", "minid.restore", "minid.restore.config"}, found


def test_every_line_of_code_is_at_most_100_characters():
    """The house's line length (pyproject.toml's [tool.ruff]) in the .py files of minid, kernels,
    tests and bench."""
    long = []
    for folder in ("minid", "kernels", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if len(line) > 100:
                    long.append(f"{path.relative_to(ROOT)}:{number} ({len(line)})")
    assert not long, f"{len(long)} lines over 100 characters: " + ", ".join(long[:20])


# ---- the flow: each input decoded once, and SD without the method --------------------------------


def _count_opens(monkeypatch) -> dict[str, int]:
    """Counts, per file name, the images the run decodes (every picture goes through
    `open_image`)."""
    from minid.imaging import images

    opened: dict[str, int] = {}
    real = images.open_image

    def counting(image):
        img, path = real(image)
        if path is not None:
            opened[path.name] = opened.get(path.name, 0) + 1
        return img, path

    monkeypatch.setattr(images, "open_image", counting)
    return opened


def _pair_files(folder: Path) -> tuple[Path, Path, Path]:
    import numpy as np
    from PIL import Image
    from tiny_models import IMAGE_SIZE, random_image

    from minid.imaging.images import tensor_to_pil

    folder.mkdir(parents=True, exist_ok=True)
    tensor_to_pil(random_image(1)).save(folder / "o.png")
    tensor_to_pil(random_image(2)).save(folder / "e.png")
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(folder / "m.png")
    return folder / "o.png", folder / "e.png", folder / "m.png"


FAST = ["--steps", "2", "--dpm-start", "2", "--dpm-end", "2", "--null-inner-steps", "1"]
COMMON = ["--device", "cpu", "--dtype", "fp32", "--image-size", "64"]


def test_restore_decodes_each_input_once(tiny_hub, tmp_path, monkeypatch, one_thread):
    """`minid restore` checks the pair once and the pipeline takes the checked pair as it is: the
    original, the edited image and the face mask are each read from disk once (the paste-back uses
    the edited picture kept from the check)."""
    from minid.app import cli

    original, edited, mask = _pair_files(tmp_path / "in")
    opened = _count_opens(monkeypatch)
    argv = [
        "restore",
        "--original",
        str(original),
        "--edited",
        str(edited),
        "--face-mask",
        str(mask),
    ]
    argv += [
        "--prompt-original",
        "a photo of a man",
        "--prompt-edited",
        "a photo of a man with glasses",
    ]
    argv += ["--id-words", "man", "--element-words", "glasses", "--out", str(tmp_path / "r.png")]
    assert cli.main(argv + ["--weights", str(tiny_hub), *FAST, *COMMON]) == 0
    assert opened == {"o.png": 1, "e.png": 1, "m.png": 1}, opened


def test_calibrate_decodes_each_row_once(tiny_hub, tmp_path, monkeypatch, one_thread):
    """The scan before any model loads reads headers only; each row's images are decoded once, in
    its batch, and the checked pair goes to the restore as it is."""
    from minid.app import cli

    original, edited, mask = _pair_files(tmp_path / "in")
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(
        "original,edited,prompt_original,prompt_edited,id_words,element_words,face_mask\n"
        f"{original},{edited},a photo of a man,a photo of a man with glasses,man,glasses,{mask}\n"
    )
    opened = _count_opens(monkeypatch)
    argv = [
        "calibrate",
        str(manifest),
        "--out",
        str(tmp_path / "cal"),
        "--mask-source",
        "attention",
    ]
    assert cli.main(argv + ["--weights", str(tiny_hub), *FAST, *COMMON]) == 0
    # once for the run; the report's contact sheet (its first rows only) reads its thumbnails again
    assert opened == {"o.png": 2, "e.png": 2, "m.png": 1, "row-00001.png": 1}, opened


def test_generate_runs_without_the_method(tiny_hub, tmp_path):
    """`minid generate` is Stable Diffusion alone: no module of the method or above it is
    imported."""
    import subprocess
    import sys

    out = tmp_path / "cat.png"
    code = (
        "import sys\n"
        "from minid.app import cli\n"
        f"rc = cli.main(['generate', '--prompt', 'a cat', '--out', {str(out)!r}, '--weights', "
        f"{str(tiny_hub)!r}, '--steps', '2', '--size', '64', '--device', 'cpu', '--dtype', "
        f"'fp32'])\n"
        "layers = ('method', 'faces', 'restore', 'dataset')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[:2][-1] in layers\n"
        "                and m.startswith('minid.'))\n"
        "print(rc, ','.join(loaded))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rc, _, loaded = run.stdout.strip().splitlines()[-1].partition(" ")
    assert rc == "0" and out.is_file(), run.stdout + run.stderr[-2000:]
    assert loaded == "", f"minid generate imported the method or what is built on it: {loaded}"
