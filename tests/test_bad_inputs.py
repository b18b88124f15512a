"""Bad inputs, through the command line and the Python API (issue 10: a new user's first hour).

Every bad command line must end in exit code 2 (Ctrl-C: 130) with ONE line on stderr, no traceback,
the flag or file named, before any model loads, with no file created, changed or removed (the case
folder is hashed before and after: inputs, masks included, keep their bytes). Every bad API call
raises the named exception type with the same words. The cases are the issue's, and one or more of
each class they stand for; the last tests check the install, the help, the output modes and the
pictures.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import IMAGE_SIZE, random_image

from minid.app import cli
from minid.imaging import images
from minid.imaging.images import tensor_to_pil
from minid.loading import checkpoint
from minid.loading.files import write_text_atomic
from minid.restore.config import METHOD_FLAGS

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--device", "cpu", "--dtype", "fp32", "--seed", "0"]
FAST = [
    "--steps",
    "2",
    "--dpm-start",
    "2",
    "--dpm-end",
    "2",
    "--null-inner-steps",
    "1",
    "--image-size",
    str(IMAGE_SIZE),
]
PROMPT_O, PROMPT_E = "a photo of a man", "a photo of a man wearing glasses"
# 20 × 5 words: past the 75 tokens the text encoder reads, with no "man" and no "glasses" in it
FILLER = " ".join(["in a very detailed painting"] * 20)


def _png(path: Path, seed: int = 1, size: int = IMAGE_SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensor_to_pil(random_image(seed, size)).save(path)
    return path


def _mask(path: Path, size: int = IMAGE_SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((size, size), np.uint8)
    a[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    Image.fromarray(a).save(path)
    return path


def _bomb(path: Path, side: int = 40000) -> Path:
    """A PNG whose header says it is side² pixels with almost no data (40000²: PIL refuses to open
    it as a decompression bomb)."""

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def _unwritable(t: Path) -> Path:
    """A folder no file can be created in: a read-only folder, or for root (who may write anywhere)
    /sys."""
    if os.geteuid() == 0:
        if not Path("/sys").is_dir():
            pytest.skip("running as root without /sys: no unwritable folder to test with")
        return Path("/sys/minid-test-unwritable")
    folder = t / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


def _restore(t: Path, hub: Path, out=None, extra=(), original=None, edited=None, **flags) -> list:
    """A restore command line that would run on the tiny hub: `flags` replace its values (None drops
    one)."""
    values = {
        "--original": original or _png(t / "o.png", 1),
        "--edited": edited or _png(t / "e.png", 2),
        "--prompt-original": PROMPT_O,
        "--prompt-edited": PROMPT_E,
        "--id-words": "man",
        "--element-words": "glasses",
        "--out": out or t / "r.png",
        "--weights": hub,
        "--mask-source": "attention",
    }
    for flag, value in flags.items():
        values["--" + flag.replace("_", "-")] = value
    argv = ["restore"]
    for flag, value in values.items():
        if value is not None:
            argv += [flag, value]
    return argv + FAST + COMMON + list(extra)


def _generate(t: Path, hub: Path, *extra, out=None) -> list:
    return [
        "generate",
        "--prompt",
        "a man",
        "--out",
        out or t / "g.png",
        "--weights",
        hub,
        "--steps",
        "1",
        "--size",
        str(IMAGE_SIZE),
        *COMMON,
        *extra,
    ]


def _with(argv: list, flag: str, value) -> list:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


# --------------------------------------------------------------------------------------------------
# The command line: (build(t, hub, monkeypatch) -> argv, names the one line must contain, may load
# the models (a bad weight file is found by loading it), exit code)

CLI = {}


def case(cid: str, *names: str, loads: bool = False, rc: int = 2):
    def register(build):
        CLI[cid] = (build, names, loads, rc)
        return build

    return register


# -- data loss: never over an input (masks too), never over an existing file without --overwrite
@case("restore --out is the --face-mask", "m.png", "input")
def _(t, hub, mp):
    return _restore(t, hub, out=_mask(t / "m.png"), extra=["--face-mask", t / "m.png"])


@case("restore --out is the --element-mask", "m.png", "input")
def _(t, hub, mp):
    return _restore(t, hub, out=_mask(t / "m.png"), extra=["--element-mask", t / "m.png"])


@case("restore --out is the --original", "o.png", "input")
def _(t, hub, mp):
    return _restore(t, hub, out=_png(t / "o.png"), original=t / "o.png")


@case("restore --out exists", "--out", "--overwrite")
def _(t, hub, mp):
    return _restore(t, hub, out=_png(t / "mine.png", 5))


@case("--save-intermediates holds the user's mask_face.png", "mask_face.png", "--overwrite")
def _(t, hub, mp):
    _mask(t / "inter" / "mask_face.png")
    return _restore(t, hub, extra=["--save-intermediates", t / "inter"])


@case("--save-intermediates would write over the --element-mask", "mask_element.png", "input")
def _(t, hub, mp):
    m = _mask(t / "inter" / "mask_element.png")
    return _restore(
        t, hub, extra=["--save-intermediates", t / "inter", "--element-mask", m, "--overwrite"]
    )


@case("--out is a file --save-intermediates writes", "--out", "--save-intermediates")
def _(t, hub, mp):
    return _restore(
        t, hub, out=t / "inter" / "restored.png", extra=["--save-intermediates", t / "inter"]
    )


@case("generate --out exists", "--out", "--overwrite")
def _(t, hub, mp):
    return _generate(t, hub, out=_png(t / "mine.png", 5))


@case("demo --out holds the user's original.png", "original.png", "--overwrite")
def _(t, hub, mp):
    _png(t / "demo" / "original.png", 5)
    return ["demo", "--out", t / "demo", "--weights", hub, *FAST, *COMMON]


@case("eval --out holds the user's metrics.csv", "metrics.csv", "--overwrite")
def _(t, hub, mp):
    for role in ("original", "edited", "result"):
        _png(t / "f" / role / "a.png")
    (t / "table").mkdir()
    (t / "table" / "metrics.csv").write_text("my numbers\n")
    return ["eval", t / "f", "--out", t / "table", "--face-root", t / "no-packs"]


@case("convert onto its own input", "x.pt", "input")
def _(t, hub, mp):
    torch.save({"w": torch.ones(2)}, t / "x.pt")
    return ["convert", t / "x.pt", t / "x.pt", "--overwrite"]


@case("convert onto an existing file", "x.safetensors", "--overwrite")
def _(t, hub, mp):
    torch.save({"w": torch.ones(2)}, t / "x.pt")
    (t / "x.safetensors").write_text("mine")
    return ["convert", t / "x.pt", t / "x.safetensors"]


@case("restore: a repeated word, long prompts", "'man'", "equally often")
def _(t, hub, mp):
    # the word twice in the original's prompt, once in the edit's; both prompts thousands of
    # characters long (the message names them by their start)
    long = " ".join(["in a very detailed painting of a quiet street"] * 120)
    return _restore(
        t,
        hub,
        prompt_original=f"a man and a man {long}",
        prompt_edited=f"a man wearing glasses {long}",
    )


# -- numbers: finite, in range, named by their flag, before anything loads
NUMBERS = [("restore", "--w0", v) for v in ("nan", "-0.1", "0.7")]
NUMBERS += [("restore", "--lambda-o", v) for v in ("nan", "1.5", "-0.5")]
NUMBERS += [("restore", "--guidance", v) for v in ("nan", "0", "-1", "inf")]
NUMBERS += [("restore", "--w-lr", v) for v in ("nan", "-1")]
NUMBERS += [("restore", "--steps", v) for v in ("0", "2000", "1.5")]
NUMBERS += [
    ("restore", "--null-inner-steps", "-1"),
    ("restore", "--dpm-start", "0"),
    ("restore", "--dpm-end", "0"),
    ("restore", "--seed", "-1"),
]
NUMBERS += [("restore", "--image-size", v) for v in ("0", "12", "8", "-64")]
NUMBERS += [
    ("generate", "--guidance", "nan"),
    ("generate", "--steps", "0"),
    ("generate", "--steps", "2000"),
]
# the schedule's range (issue 23): restore 998 steps (the most diffusers' "leading" DPM-Solver++
# times allow, so every --dpm-spacing); generate 999 (DDIM, and λ-uniform DPM-Solver++ times)
NUMBERS += [("restore", "--steps", v) for v in ("999", "1000")] + [("generate", "--steps", "1000")]
# a guidance far past SD's 1-20 overflows to a black picture (issue 23)
NUMBERS += [("restore", "--guidance", "1e30"), ("generate", "--guidance", "1e30")]
NUMBERS += [("generate", "--size", v) for v in ("0", "12", "8")]
NUMBERS += [("demo", "--image-size", "12"), ("demo", "--w0", "nan")]
for command, flag, value in NUMBERS:

    def build(t, hub, mp, command=command, flag=flag, value=value):
        argv = {
            "restore": lambda: _restore(t, hub),
            "generate": lambda: _generate(t, hub),
            "demo": lambda: ["demo", "--out", t / "demo", "--weights", hub, *FAST, *COMMON],
        }[command]()
        return _with(argv, flag, value) if flag in argv else argv + [flag, value]

    case(f"{command} {flag} {value}", flag)(build)


@case(
    "--dpm-start after --dpm-end (steps in the flags' words)", "--dpm-start", "--dpm-end", "--steps"
)
def _(t, hub, mp):
    return _with(_restore(t, hub), "--dpm-start", "7")


@case("calibrate --batch 0", "--batch")
def _(t, hub, mp):
    return ["calibrate", t / "pairs.csv", "--out", t / "cal", "--batch", "0"]


@case("calibrate: a Latin-1 manifest", "pairs.csv", "line 2", "UTF-8")
def _(t, hub, mp):
    _png(t / "o.png", 1), _png(t / "e.png", 2)
    header = "id,original,edited,prompt_original,prompt_edited,id_words,element_words\n"
    row = "a,o.png,e.png,a photo of a man,a photo of a man wearing a béret,man,béret\n"
    (t / "pairs.csv").write_bytes((header + row).encode("latin-1"))
    return ["calibrate", t / "pairs.csv", "--out", t / "cal", "--weights", hub, *COMMON]


@case("restore onto a full disk", "--out", "MiB free")
def _(t, hub, mp):
    usage = shutil.disk_usage(t)
    mp.setattr(shutil, "disk_usage", lambda p: usage._replace(free=2**20))  # 1 MiB left
    return _restore(t, hub)


# -- prompts and words: real text, within the 75 tokens the text encoder reads
@case("identity word beyond token 75", "man", "75")
def _(t, hub, mp):
    return _restore(
        t,
        hub,
        prompt_original=f"a photo of a person {FILLER} man",
        prompt_edited=f"a photo of a man wearing glasses {FILLER}",
    )


@case("element word beyond token 75", "glasses", "75")
def _(t, hub, mp):
    return _restore(t, hub, prompt_edited=f"a photo of a man {FILLER} wearing glasses")


@case("identity word not in the prompt", "woman")
def _(t, hub, mp):
    return _restore(t, hub, id_words="woman")


@case("restore --prompt-original with bytes that are not UTF-8", "--prompt-original", "UTF-8")
def _(t, hub, mp):
    return _restore(t, hub, prompt_original=os.fsdecode(b"a photo of a man \xff\xfe"))


@case("generate --prompt with bytes that are not UTF-8", "--prompt", "UTF-8")
def _(t, hub, mp):
    return _with(_generate(t, hub), "--prompt", os.fsdecode(b"a man \xff"))


@case("demo --subject-word not in --prompt", "--subject-word")
def _(t, hub, mp):
    return [
        "demo",
        "--out",
        t / "demo",
        "--weights",
        hub,
        "--subject-word",
        "woman",
        *FAST,
        *COMMON,
    ]


# -- images and masks
@case("a 1×1 edited image against a 256² original", "tiny.png", "64 px")
def _(t, hub, mp):
    Image.new("RGB", (1, 1), (90, 60, 30)).save(t / "tiny.png")
    return _restore(t, hub, original=_png(t / "big.png", 1, 256), edited=t / "tiny.png")


@case("a folder as --original", "pics", "folder")
def _(t, hub, mp):
    (t / "pics").mkdir()
    return _restore(t, hub, original=t / "pics")


@case("a folder as --face-mask", "--face-mask", "folder")
def _(t, hub, mp):
    (t / "masks").mkdir()
    return _restore(t, hub, extra=["--face-mask", t / "masks"])


@case("a missing --original", "absent.png", "not found")
def _(t, hub, mp):
    return _restore(t, hub, original=t / "absent.png")


@case("a missing --element-mask", "--element-mask", "not found")
def _(t, hub, mp):
    return _restore(t, hub, extra=["--element-mask", t / "absent.png"])


@case("a text file as --edited", "notes.png", "image")
def _(t, hub, mp):
    (t / "notes.png").write_text("not an image")
    return _restore(t, hub, edited=t / "notes.png")


@case("a decompression-bomb PNG as --original", "bomb.png", "too large")
def _(t, hub, mp):
    return _restore(t, hub, original=_bomb(t / "bomb.png"))


# -- output paths: checked before the compute, not after it
@case("restore --out an existing folder", "--out", "folder")
def _(t, hub, mp):
    (t / "out.png").mkdir()
    return _restore(t, hub, out=t / "out.png")


@case("generate --out an existing folder", "--out", "folder")
def _(t, hub, mp):
    (t / "folder").mkdir()
    return _generate(t, hub, out=t / "folder")


@case("restore --out with an unknown format", "--out", ".png")
def _(t, hub, mp):
    return _restore(t, hub, out=t / "r.tiff")


@case("restore --out in an unwritable folder", "--out", "write")
def _(t, hub, mp):
    return _restore(t, hub, out=_unwritable(t) / "r.png")


@case("generate --out in an unwritable folder", "--out", "write")
def _(t, hub, mp):
    return _generate(t, hub, out=_unwritable(t) / "g.png")


@case("restore --out under a file", "file", "not a folder")
def _(t, hub, mp):
    (t / "file").write_text("x")
    return _restore(t, hub, out=t / "file" / "r.png")


@case("--save-intermediates is a file", "--save-intermediates", "notes.txt")
def _(t, hub, mp):
    (t / "notes.txt").write_text("mine")
    return _restore(t, hub, extra=["--save-intermediates", t / "notes.txt"])


@case("--save-intermediates in an unwritable folder", "--save-intermediates", "write")
def _(t, hub, mp):
    return _restore(t, hub, extra=["--save-intermediates", _unwritable(t) / "inter"])


# -- the machine
@case("--device tpu", "--device", "tpu")
def _(t, hub, mp):
    return _with(_restore(t, hub), "--device", "tpu")


@case("--device cuda without a GPU", "--device", "cpu")
def _(t, hub, mp):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return _with(_restore(t, hub), "--device", "cuda")


# -- weight files: found bad when they are opened, named, one line
@case("a pickle as --weights", "model.ckpt", "minid convert", loads=True)
def _(t, hub, mp):
    torch.save({"w": torch.ones(2)}, t / "model.ckpt")
    return _with(_generate(t, hub), "--weights", t / "model.ckpt")


@case("a pickle named .safetensors as --weights", "model.safetensors", "pickle", loads=True)
def _(t, hub, mp):
    torch.save({"w": torch.ones(2)}, t / "model.safetensors")
    return _with(_generate(t, hub), "--weights", t / "model.safetensors")


@case("an empty file as --weights", "model.safetensors", loads=True)
def _(t, hub, mp):
    (t / "model.safetensors").write_bytes(b"")
    return _with(_generate(t, hub), "--weights", t / "model.safetensors")


@case("a missing --weights folder", "absent", "download", loads=True)
def _(t, hub, mp):
    return _with(_generate(t, hub), "--weights", t / "absent")


def _copy_vae(t: Path, hub: Path, edit) -> Path:
    copy = t / "hub"
    shutil.copytree(hub, copy)
    edit(copy / "vae" / "diffusion_pytorch_model.safetensors")
    return copy


def _half_byte_range(f: Path) -> None:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    start, stop = header[key]["data_offsets"]
    # the same shape in half the bytes
    header[key]["data_offsets"] = [start, start + (stop - start) // 2]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _integer_tensor(f: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(f))
    key = next(iter(state))
    state[key] = (state[key] * 1000).to(torch.int32)
    save_file(state, str(f))


@case(
    "a safetensors header whose byte ranges do not match the shapes",
    "diffusion_pytorch_model.safetensors",
    "damaged header",
    loads=True,
)
def _(t, hub, mp):
    return _with(_generate(t, hub), "--weights", _copy_vae(t, hub, _half_byte_range))


def _nan_tensor(f: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(f))
    key = next(k for k in sorted(state) if k.startswith("decoder."))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(f))


@case(
    "a config.json value of the wrong type",
    "config.json",
    "block_out_channels",
    "a list of integers",
    "a string",
    loads=True,
)
def _(t, hub, mp):
    copy = t / "hub"
    shutil.copytree(hub, copy)
    config = json.loads((copy / "unet" / "config.json").read_text())
    config["block_out_channels"] = "wide"
    (copy / "unet" / "config.json").write_text(json.dumps(config))
    return _with(_generate(t, hub), "--weights", copy)


@case("weights stored as integers", "diffusion_pytorch_model.safetensors", "I32", loads=True)
def _(t, hub, mp):
    return _with(_generate(t, hub), "--weights", _copy_vae(t, hub, _integer_tensor))


# -- convert and download
@case("convert a file that is not a pickle", "x.ckpt", "not a PyTorch checkpoint")
def _(t, hub, mp):
    (t / "x.ckpt").write_text("hello, not a checkpoint")
    return ["convert", t / "x.ckpt", t / "x.safetensors"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@case("convert a pickle that would run code", "evil.pt", "refused")
def _(t, hub, mp):
    torch.save({"a": _Evil()}, t / "evil.pt")
    return ["convert", t / "evil.pt", t / "evil.safetensors"]


@case("convert into an unwritable folder", "write")
def _(t, hub, mp):
    torch.save({"w": torch.ones(2)}, t / "x.pt")
    return ["convert", t / "x.pt", _unwritable(t) / "x.safetensors"]


@case("convert a missing file", "absent.pt", "not found")
def _(t, hub, mp):
    return ["convert", t / "absent.pt"]


@case("download into an unwritable folder", "weights folder", "write")
def _(t, hub, mp):
    mp.delenv("HF_HUB_OFFLINE", raising=False)
    return ["download", "--dest", _unwritable(t) / "w"]


# -- eval
@case("eval with a non-image in result/", "a.png", "image")
def _(t, hub, mp):
    for role in ("original", "edited"):
        _png(t / "f" / role / "a.png")
    (t / "f" / "result").mkdir()
    (t / "f" / "result" / "a.png").write_text("not an image")
    return ["eval", t / "f", "--out", t / "table", "--face-root", t / "no-packs"]


@case("eval of a folder without original/", "original", "does not exist")
def _(t, hub, mp):
    (t / "f").mkdir()
    return ["eval", t / "f", "--face-root", t / "no-packs"]


# -- the face models
@case(
    "no face pack: what to do, in the CLI's words",
    "--download-faces",
    "--face-mask",
    "--mask-source attention",
)
def _(t, hub, mp):
    return _restore(t, hub, mask_source="landmarks", extra=["--face-root", t / "no-packs"])


@case("no onnxruntime installed", "faces", "--mask-source attention")
def _(t, hub, mp):
    mp.setitem(sys.modules, "onnxruntime", None)
    return _restore(t, hub, mask_source="landmarks")


@case("--download-faces without a network", "buffalo_l", "network")
def _(t, hub, mp):
    storage = pytest.importorskip("insightface.utils.storage")

    def offline(*args, **kwargs):
        raise ConnectionError("Max retries exceeded\n" + "  stack line\n" * 80)

    mp.setattr(storage, "ensure_available", offline)
    return _restore(
        t, hub, mask_source="landmarks", extra=["--face-root", t / "packs", "--download-faces"]
    )


# -- the command line itself
@case("Ctrl-C during the run", "interrupted", rc=130)
def _(t, hub, mp):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    mp.setattr(checkpoint, "load_stable_diffusion", interrupted)
    return _restore(t, hub)


@case("SIGTERM during the run", "terminated", rc=143)
def _(t, hub, mp):
    import signal

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    mp.setattr(checkpoint, "load_stable_diffusion", terminated)
    return _restore(t, hub)


@case("a mistyped flag of a sub-command", "--w00", "minid restore --help")
def _(t, hub, mp):
    return _restore(t, hub, extra=["--w00", "0.1"])


@case("a required option missing", "--out")
def _(t, hub, mp):
    return _restore(t, hub, out=None)[:3] + ["--prompt-original", "a man"]


@case("an unknown --inversion", "--inversion")
def _(t, hub, mp):
    return _restore(t, hub, inversion="ddim")


@case("--pairs that do not parse", "--pairs")
def _(t, hub, mp):
    return _restore(t, hub, extra=["--multi-face", "--pairs", "0-1"])


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("cid", list(CLI))
def test_a_bad_command_line_is_one_line_exit_2_before_any_compute(
    cid, tiny_hub, tmp_path, monkeypatch, capsys
):
    build, names, loads, expected_rc = CLI[cid]
    loaded = []
    real_load = checkpoint.load_stable_diffusion
    monkeypatch.setattr(
        checkpoint,
        "load_stable_diffusion",
        lambda *a, **k: (loaded.append(1), real_load(*a, **k))[1],
    )
    argv = [str(a) for a in build(tmp_path, tiny_hub, monkeypatch)]
    before = _snapshot(tmp_path)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    # "minid: loading …" says which weights load (the cases that are about a weight file); the rest
    # is the error
    lines = [
        line for line in err.splitlines() if line.strip() and not line.startswith("minid: loading")
    ]
    assert rc == expected_rc, f"exit code {rc}, expected {expected_rc}; stderr: {err}"
    assert len(lines) == 1 and "Traceback" not in err, (
        f"expected one line on stderr, got {len(lines)}: {err}"
    )
    assert len(lines[0]) <= 600, f"a {len(lines[0])}-character line: {lines[0][:300]}…"
    for name in names:
        assert name in lines[0], f"{name!r} is not named in: {lines[0]}"
    for prefix in (
        "images.py:",
        "editedid.py:",
        "control.py:",
        "masks.load_mask:",
        "schedule.py:",
        "faces:",
    ):
        assert prefix not in lines[0], f"an internal prefix {prefix!r} in: {lines[0]}"
    assert loads or not loaded, f"the models loaded before the error: {lines[0]}"
    assert _snapshot(tmp_path) == before, f"files were created, changed or removed: {lines[0]}"


@pytest.mark.parametrize("command", ["generate", "restore"])
def test_a_run_that_becomes_nan_stops_with_one_line_and_writes_nothing(
    command, tiny_hub, tmp_path, capsys
):
    """A weights file holding a NaN loads (its header is sound) and ran to a black picture with exit
    0 (issue 23): the run stops after the stage where the values went NaN, names it and the weight,
    and writes nothing."""
    hub = _copy_vae(tmp_path, tiny_hub, _nan_tensor)
    if command == "generate":
        argv = _with(_generate(tmp_path, tiny_hub), "--weights", hub)
    else:
        argv = _restore(tmp_path, hub, extra=["--save-intermediates", tmp_path / "inter"])
    before = _snapshot(tmp_path)
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    stage = "the VAE decoder" if command == "generate" else "decoding (the VAE decoder)"
    for words in ("NaN", stage, "vae.decoder.", "nothing was written"):
        assert words in errors[0], f"{words!r} not in: {errors[0]}"
    assert _snapshot(tmp_path) == before, f"files were written: {errors[0]}"


def test_the_stage_that_goes_nan_is_named(tmp_path):
    from tiny_models import build_tiny_sd

    from minid.method.editedid import EditedIDConfig
    from minid.restore.config import RestoreConfig
    from minid.restore.pipeline import EditedID
    from minid.sampling.hybrid import HybridSchedule

    sd = build_tiny_sd()
    with torch.no_grad():
        sd.unet.conv_out.bias.fill_(float("inf"))
    method = EditedIDConfig(solver=HybridSchedule(num_steps=2, dpm_start=2, dpm_end=2))
    pipe = EditedID(sd, RestoreConfig(method, image_size=IMAGE_SIZE))
    with pytest.raises(ValueError) as e:
        pipe.restore(
            random_image(1),
            random_image(2),
            PROMPT_O,
            PROMPT_E,
            ["man"],
            ["glasses"],
            progress=False,
        )
    assert "Stage 1 (align)" in str(e.value) and "unet.conv_out.bias" in str(e.value), e.value


@pytest.mark.parametrize("inversion", ["null-text", "direct", "negative-prompt"])
def test_guidance_1_restores_with_one_unet_row_per_branch(
    inversion, tiny_hub, tmp_path, monkeypatch, capsys
):
    """--guidance 1 (no classifier-free guidance) passed the check, loaded the model and died on
    the controllers' layout (issue 23): every Stage runs one UNet row per branch (O, E; O, E, T) and
    null-text has nothing to optimise."""
    batches, real_load = [], checkpoint.load_stable_diffusion

    def load(*args, **kwargs):
        sd = real_load(*args, **kwargs)
        sd.unet.register_forward_hook(
            lambda m, a, out: batches.append((a[0].shape[0], out.requires_grad))
        )
        return sd

    monkeypatch.setattr(checkpoint, "load_stable_diffusion", load)
    argv = _restore(tmp_path, tiny_hub, guidance="1", inversion=inversion)
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 0 and (tmp_path / "r.png").is_file(), err
    assert max(b for b, _ in batches) == 3, f"UNet batches {batches}: a guidance half ran"
    assert not any(grad for _, grad in batches), "null-text optimised a ∅ that plays no part"


def test_the_step_limit_is_the_schedules():
    from minid.method.editedid import MAX_STEPS, EditedIDConfig
    from minid.sampling.hybrid import HybridSchedule
    from minid.sampling.schedule import NoiseSchedule
    from minid.sampling.text_to_image import max_steps, solver_plan

    schedule = NoiseSchedule.scaled_linear()
    EditedIDConfig(solver=HybridSchedule(num_steps=MAX_STEPS)).plan(schedule)
    with pytest.raises(ValueError):
        EditedIDConfig(solver=HybridSchedule(num_steps=MAX_STEPS + 1))
    for solver in ("ddim", "dpm", "hybrid"):
        solver_plan(solver, max_steps(solver), schedule)
        with pytest.raises(ValueError):
            solver_plan(solver, max_steps(solver) + 1, schedule)


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("layers_per_block", 1.5, "an integer"),
        ("layers_per_block", True, "an integer"),
        ("norm_eps", "small", "a number"),
        ("flip_sin_to_cos", 1, "true or false"),
        ("block_out_channels", [32, "64"], "a list of integers"),
        ("down_block_types", "CrossAttnDownBlock2D", "a list of strings"),
    ],
)
def test_a_config_value_of_the_wrong_type_names_the_file_and_the_key(key, value, expected):
    from minid.models.config import UNetConfig

    with pytest.raises(ValueError) as e:
        UNetConfig.from_dict({key: value}, "unet/config.json")
    message = str(e.value)
    assert message.startswith("unet/config.json: ") and repr(key) in message, message
    assert f"must be {expected}, found" in message and "\n" not in message, message
    assert UNetConfig.from_dict({"norm_eps": 1}).norm_eps == 1, "an integer is a number"


def test_16_bit_grey_is_converted_by_its_bit_depth_not_its_content(tmp_path):
    """A dark 16-bit grey picture (levels up to half of 65535) was divided by its own maximum and
    came out white (issue 23); it stays mid-grey, as a mask of it does."""
    from minid.imaging.masks import load_mask

    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((64, 64), 32768, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    x, _ = images.load_image(path, size=IMAGE_SIZE)
    assert abs(float(x.mean())) < 0.01, f"mid-grey became {float(x.mean()):.3f} in [-1, 1]"
    assert abs(float(load_mask(path, required=False).mean()) - 0.5) < 0.01


def test_the_exif_orientation_turns_images_and_masks(tmp_path):
    """A photo whose EXIF says "rotate 90°" (orientation 6) is read as a viewer shows it, and its
    mask the same way, so the two still match."""
    from minid.imaging.masks import load_mask

    a = np.zeros((64, 128), np.uint8)
    a[:, :40] = 255  # the left part white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).convert("RGB").save(tmp_path / "photo.png", exif=exif)
    Image.fromarray(a).save(tmp_path / "mask.png", exif=exif)
    x, frame = images.load_image(tmp_path / "photo.png", size=IMAGE_SIZE)
    assert frame.original_size == (64, 128), f"not turned: {frame.original_size}"
    shown = np.asarray(frame.picture.convert("L"))
    assert shown[:40].mean() > 250 and shown[40:].mean() < 5, "the white part is not on top"
    mask = load_mask(tmp_path / "mask.png", frame=frame)
    row = x[0, 0].mean(1)  # the square's rows, top to bottom
    assert (float(mask[:4].mean()) > 0.9) and (float(mask[-4:].mean()) < 0.1), "mask not turned"
    assert float(row[:4].mean()) > 0.9 and float(row[-4:].mean()) < -0.9, "image not turned"


def test_the_api_refuses_to_replace_intermediates_without_overwrite(tiny_sd, tmp_path):
    """`restore(..., save_intermediates=DIR)` silently replaced the files there, where the command
    line refuses without --overwrite (issue 23): the same rule, before any work, and
    `overwrite=True`."""
    from minid.method.editedid import EditedIDConfig
    from minid.restore.config import RestoreConfig
    from minid.restore.inputs import RestorePair
    from minid.restore.pipeline import EditedID
    from minid.sampling.hybrid import HybridSchedule

    (tmp_path / "summary.json").write_text("my notes")
    method = EditedIDConfig(
        solver=HybridSchedule(num_steps=1, dpm_start=1, dpm_end=1), inversion="direct"
    )
    pipe = EditedID(tiny_sd, RestoreConfig(method, image_size=IMAGE_SIZE))
    calls = []
    hook = tiny_sd.unet.register_forward_hook(lambda *a: calls.append(1))
    args = (random_image(1), random_image(2), PROMPT_O, PROMPT_E, ["man"], ["glasses"])
    try:
        with pytest.raises(FileExistsError) as e:
            pipe.restore(*args, progress=False, save_intermediates=tmp_path)
        assert not calls and (tmp_path / "summary.json").read_text() == "my notes"
        assert "summary.json" in str(e.value) and "overwrite=True" in str(e.value), e.value
        _mask(tmp_path / "batch" / "pair_0" / "mask_face.png")
        with pytest.raises(FileExistsError, match="mask_face.png"):
            pipe.restore_batch(
                [RestorePair(*args)], progress=False, save_intermediates=tmp_path / "batch"
            )
        assert not calls, "the batch ran before its folder was checked"
        result = pipe.restore(*args, progress=False, save_intermediates=tmp_path, overwrite=True)
    finally:
        hook.remove()
    assert result.paths["summary"].read_text() != "my notes"


def _manifest(t: Path, face_mask: bool) -> Path:
    columns = "original,edited,prompt_original,prompt_edited,id_words,element_words"
    row = f"o.png,e.png,{PROMPT_O},{PROMPT_E},man,glasses"
    _png(t / "o.png", 1), _png(t / "e.png", 2)
    if face_mask:
        _mask(t / "m.png")
    (t / "pairs.csv").write_text(
        f"{columns}{',face_mask' if face_mask else ''}\n{row}{',m.png' if face_mask else ''}\n"
    )
    return t / "pairs.csv"


def test_calibrate_needs_no_face_pack_when_every_row_has_its_face_mask(tiny_hub, tmp_path, capsys):
    argv = ["calibrate", _manifest(tmp_path, face_mask=True), "--out", tmp_path / "cal"]
    argv += ["--weights", tiny_hub, "--face-root", tmp_path / "no-packs", *FAST, *COMMON]
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 0 and list((tmp_path / "cal" / "results").glob("*.png")), err


@pytest.mark.parametrize(
    "command,names",
    [
        ("calibrate", ("face_mask for every row", "--mask-source attention")),
        ("restore --multi-face --face-mask", ("--multi-face find the faces",)),
        ("eval", ("--download-faces",)),
    ],
)
def test_a_missing_face_pack_names_flags_the_command_has(
    command, names, tiny_hub, tmp_path, capsys
):
    """The missing-pack hint suggested --face-mask to calibrate and eval (which have no such flag)
    and to a restore that had given it (issue 23): each command is told what it can do."""
    no_packs = ["--face-root", tmp_path / "no-packs"]
    if command == "calibrate":
        argv = ["calibrate", _manifest(tmp_path, face_mask=False), "--out", tmp_path / "cal"]
        argv += ["--weights", tiny_hub, *no_packs, *FAST, *COMMON]
    elif command == "eval":
        for role in ("original", "edited", "result"):
            _png(tmp_path / "f" / role / "a.png")
        argv = ["eval", tmp_path / "f", "--out", tmp_path / "table", *no_packs]
    else:
        extra = ["--multi-face", "--face-mask", _mask(tmp_path / "m.png"), *no_packs]
        argv = _restore(tmp_path, tiny_hub, mask_source="landmarks", extra=extra)
    rc = cli.main([str(a) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, lines
    for name in names:
        assert name in lines[0], f"{name!r} not in: {lines[0]}"
    assert "--face-mask" not in lines[0], f"a flag {command} has no use for: {lines[0]}"


def test_minid_version(capsys):
    from minid import __version__

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"minid {__version__}"


@pytest.mark.parametrize("fill,words", [(1.0, "nearly all"), (0.0, "nearly none")])
def test_an_attention_mask_of_all_or_nothing_comes_with_a_note(tiny_sd, monkeypatch, fill, words):
    from minid.method import editedid
    from minid.restore.config import RestoreConfig
    from minid.restore.pipeline import EditedID
    from minid.sampling.hybrid import HybridSchedule

    def attention_mask(store, row, positions, size, *args):
        return torch.full((1, 1, size, size), fill)

    monkeypatch.setattr(editedid, "attention_mask", attention_mask)
    method = editedid.EditedIDConfig(
        solver=HybridSchedule(num_steps=1, dpm_start=1, dpm_end=1), inversion="direct"
    )
    result = EditedID(tiny_sd, RestoreConfig(method, image_size=IMAGE_SIZE)).restore(
        random_image(1), random_image(2), PROMPT_O, PROMPT_E, ["man"], ["glasses"], progress=False
    )
    notes = [n for n in result.notes if words in n]
    assert len(notes) == 2 and "--face-mask" in notes[0] and "--element-mask" in notes[1], notes


def test_the_case_count():
    assert len(CLI) >= 80, f"{len(CLI)} command-line cases"


# --------------------------------------------------------------------------------------------------
# The Python API: the same checks, as ValueError / TypeError / FileNotFoundError / IsADirectoryError


def _check(**over):
    from minid.models.tokenizer import CLIPTokenizer
    from minid.restore.config import RestoreConfig
    from minid.restore.inputs import RestorePair, check_pair

    config = over.pop("config", None) or RestoreConfig(image_size=IMAGE_SIZE)
    pair = dict(
        original=random_image(1),
        edited=random_image(2),
        prompt_original=PROMPT_O,
        prompt_edited=PROMPT_E,
        id_words=["man"],
        element_words=["glasses"],
    )
    pair.update(over)
    return check_pair(RestorePair(**pair), CLIPTokenizer.default(), config)


def _configs():
    from minid.method.editedid import EditedIDConfig
    from minid.method.gating import GatingConfig
    from minid.method.mixing import MixingConfig
    from minid.method.null_text import NullTextConfig
    from minid.restore.config import RestoreConfig
    from minid.sampling.hybrid import HybridSchedule

    nan = float("nan")
    return {
        "EditedIDConfig w0 0.7": (
            lambda: EditedIDConfig(mixing=MixingConfig(w0=0.7)),
            ValueError,
            "mixing.w0",
        ),
        "EditedIDConfig w0 -0.1": (
            lambda: EditedIDConfig(mixing=MixingConfig(w0=-0.1)),
            ValueError,
            "mixing.w0",
        ),
        "EditedIDConfig w0 nan": (
            lambda: EditedIDConfig(mixing=MixingConfig(w0=nan)),
            ValueError,
            "mixing.w0",
        ),
        "EditedIDConfig lr nan": (
            lambda: EditedIDConfig(mixing=MixingConfig(lr=nan)),
            ValueError,
            "mixing.lr",
        ),
        "EditedIDConfig guidance nan": (
            lambda: EditedIDConfig(guidance=nan),
            ValueError,
            "guidance",
        ),
        "EditedIDConfig guidance -1": (
            lambda: EditedIDConfig(guidance=-1.0),
            ValueError,
            "guidance",
        ),
        "EditedIDConfig guidance inf": (
            lambda: EditedIDConfig(guidance=float("inf")),
            ValueError,
            "guidance",
        ),
        "EditedIDConfig inner_steps -1": (
            lambda: EditedIDConfig(null_text=NullTextConfig(inner_steps=-1)),
            ValueError,
            "null_text.inner_steps",
        ),
        "EditedIDConfig num_steps 0": (
            lambda: EditedIDConfig(solver=HybridSchedule(num_steps=0)),
            ValueError,
            "solver.num_steps",
        ),
        "EditedIDConfig num_steps 2000": (
            lambda: EditedIDConfig(solver=HybridSchedule(num_steps=2000, dpm_start=1, dpm_end=2)),
            ValueError,
            "solver.num_steps",
        ),
        "EditedIDConfig dpm_start > dpm_end": (
            lambda: EditedIDConfig(solver=HybridSchedule(dpm_start=6, dpm_end=5)),
            ValueError,
            "dpm_start",
        ),
        "GatingConfig lambda_o nan": (lambda: GatingConfig(lambda_o=nan), ValueError, "lambda_o"),
        "GatingConfig lambda_o 1.5": (lambda: GatingConfig(lambda_o=1.5), ValueError, "lambda_o"),
        "GatingConfig mode xx": (lambda: GatingConfig(mode="xx"), ValueError, "mode"),
        "RestoreConfig image_size 0": (
            lambda: RestoreConfig(image_size=0),
            ValueError,
            "image_size",
        ),
        "RestoreConfig image_size 12": (
            lambda: RestoreConfig(image_size=12),
            ValueError,
            "image_size",
        ),
        "RestoreConfig image_size 8": (
            lambda: RestoreConfig(image_size=8),
            ValueError,
            "image_size",
        ),
        "RestoreConfig image_size '512'": (
            lambda: RestoreConfig(image_size="512"),
            ValueError,
            "image_size",
        ),
    }


def _pairs():
    nan = float("nan")
    folder = Path(__file__).resolve().parent
    return {
        "image tensor in 0-255": (
            lambda: _check(original=(random_image(1) + 1) * 127.5),
            ValueError,
            "0-255",
        ),
        "NaN image tensor": (
            lambda: _check(edited=torch.full((1, 3, IMAGE_SIZE, IMAGE_SIZE), nan)),
            ValueError,
            "finite",
        ),
        "infinite image tensor": (
            lambda: _check(edited=random_image(2).index_fill(-1, torch.tensor([0]), float("inf"))),
            ValueError,
            "finite",
        ),
        "uint8 image tensor": (
            lambda: _check(original=torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)),
            ValueError,
            "float",
        ),
        "image None": (lambda: _check(original=None), TypeError, "file path, a PIL image"),
        "numpy image": (
            lambda: _check(original=np.zeros((64, 64, 3), np.uint8)),
            TypeError,
            "ndarray",
        ),
        "bytes image": (lambda: _check(original=b"\x89PNG"), TypeError, "bytes"),
        "1×1 PIL image": (lambda: _check(edited=Image.new("RGB", (1, 1))), ValueError, "1×1"),
        "folder as image": (lambda: _check(original=folder), IsADirectoryError, "folder"),
        "missing image file": (
            lambda: _check(original=folder / "absent.png"),
            FileNotFoundError,
            "absent.png",
        ),
        "identity word beyond token 75": (
            lambda: _check(
                prompt_original=f"a photo of a person {FILLER} man",
                prompt_edited=f"a photo of a man {FILLER}",
            ),
            ValueError,
            "beyond",
        ),
        "element word beyond token 75": (
            lambda: _check(prompt_edited=f"a photo of a man {FILLER} wearing glasses"),
            ValueError,
            "beyond",
        ),
        "prompt with bytes that are not UTF-8": (
            lambda: _check(prompt_original="a man \udcff"),
            ValueError,
            "UTF-8",
        ),
        "empty prompt": (lambda: _check(prompt_edited="  "), ValueError, "prompt_edited"),
        "lambda_o nan": (lambda: _check(lambda_o=nan), ValueError, "lambda_o"),
        "numpy mask": (lambda: _check(face_mask=np.ones((64, 64))), TypeError, "mask"),
        "NaN mask tensor": (
            lambda: _check(face_mask=torch.full((64, 64), nan)),
            ValueError,
            "finite",
        ),
    }


def _loading(tiny_hub):
    return {
        "dtype 'fp17'": (
            lambda: checkpoint.load_stable_diffusion(tiny_hub, dtype="fp17"),
            ValueError,
            "fp17",
        ),
        "dtype torch.int8": (
            lambda: checkpoint.load_stable_diffusion(tiny_hub, dtype=torch.int8),
            TypeError,
            "dtype",
        ),
        "device 'tpu'": (
            lambda: checkpoint.load_stable_diffusion(tiny_hub, dtype=torch.float32, device="tpu"),
            ValueError,
            "tpu",
        ),
    }


def _generating(tiny_sd):
    from minid.method.editedid import EditedIDConfig
    from minid.restore.pipeline import EditedID
    from minid.sampling.text_to_image import generate

    return {
        "generate size 0": (
            lambda: generate(tiny_sd, "a man", num_steps=1, size=0),
            ValueError,
            "size",
        ),
        "generate size 12": (
            lambda: generate(tiny_sd, "a man", num_steps=1, size=12),
            ValueError,
            "size",
        ),
        "generate guidance nan": (
            lambda: generate(tiny_sd, "a man", num_steps=1, size=64, guidance=float("nan")),
            ValueError,
            "guidance",
        ),
        "generate steps 0": (
            lambda: generate(tiny_sd, "a man", num_steps=0, size=64),
            ValueError,
            "num_steps",
        ),
        "generate solver xx": (
            lambda: generate(tiny_sd, "a man", num_steps=1, size=64, solver="xx"),
            ValueError,
            "solver",
        ),
        "tokenizer: bytes that are not UTF-8": (
            lambda: tiny_sd.tokenizer(["a man \udcff"]),
            ValueError,
            "UTF-8",
        ),
        "EditedID given a path": (
            lambda: EditedID("weights/sd-v1-4"),
            TypeError,
            "EditedID(load_stable_diffusion('weights/sd-v1-4'))",
        ),
        "EditedID given a module": (
            lambda: EditedID(tiny_sd.unet),
            TypeError,
            "has no tokenizer, text_encoder, unet, vae",
        ),
        "EditedID given an EditedIDConfig": (
            lambda: EditedID(tiny_sd, EditedIDConfig()),
            TypeError,
            "RestoreConfig(method=EditedIDConfig(…))",
        ),
    }


API_IDS = (
    list(_configs())
    + list(_pairs())
    + ["dtype 'fp17'", "dtype torch.int8", "device 'tpu'"]
    + [
        "generate size 0",
        "generate size 12",
        "generate guidance nan",
        "generate steps 0",
        "generate solver xx",
        "tokenizer: bytes that are not UTF-8",
        "EditedID given a path",
        "EditedID given a module",
        "EditedID given an EditedIDConfig",
    ]
)


@pytest.mark.parametrize("cid", API_IDS)
def test_a_bad_api_call_raises_a_clear_error(cid, tiny_hub, tiny_sd):
    table = {**_configs(), **_pairs(), **_loading(tiny_hub), **_generating(tiny_sd)}
    call, kind, words = table[cid]
    with pytest.raises(kind) as e:
        call()
    message = str(e.value)
    assert type(e.value) is kind or kind is ValueError, f"{type(e.value).__name__}: {message}"
    assert words in message and "\n" not in message, (
        f"{words!r} not in the one-line message: {message}"
    )
    for prefix in ("images.py:", "masks.load_mask:", "control.py:"):
        assert prefix not in message, message


def test_cuda_without_a_gpu_is_a_clear_error(tiny_hub):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        checkpoint.load_stable_diffusion(tiny_hub, dtype="fp32", device="cuda")


def test_a_long_prompt_is_cut_off_with_a_note():
    job = _check(prompt_original=f"{PROMPT_O} {FILLER}", prompt_edited=f"{PROMPT_E} {FILLER}")
    notes = [n for n in job.notes if "75 tokens" in n]
    assert len(notes) == 2 and "painting" in notes[0], f"notes: {job.notes}"


def test_masks_are_inputs_of_the_run(tmp_path):
    from minid.models.tokenizer import CLIPTokenizer
    from minid.restore.config import RestoreConfig
    from minid.restore.inputs import RestorePair, check_pair

    mask = _mask(tmp_path / "face.png")
    job = check_pair(
        RestorePair(
            random_image(1),
            random_image(2),
            PROMPT_O,
            PROMPT_E,
            ["man"],
            ["glasses"],
            face_mask=mask,
        ),
        CLIPTokenizer.default(),
        RestoreConfig(image_size=IMAGE_SIZE),
    )
    assert mask in job.sources, f"sources {job.sources}"
    with pytest.raises(FileExistsError, match="input"):
        images.save_image(random_image(3), mask, job.sources)


def test_cli_and_config_share_the_limits():
    """Each method flag's limits are the config's: a value just outside the flag's range is refused
    by both."""
    from minid.method.editedid import NUMBER_LIMITS

    for path, (kind, low, high, low_open) in NUMBER_LIMITS.items():
        flag = next((f for f, (p, _, _) in METHOD_FLAGS.items() if p == "method." + path), None)
        if flag is None:
            continue
        parse = next(
            a.type
            for a in cli.build_parser()._subparsers._group_actions[0].choices["restore"]._actions
            if flag in a.option_strings
        )
        outside = [low - 1] + ([high + 1] if high is not None else []) + ([low] if low_open else [])
        for value in outside:
            with pytest.raises(Exception):
                parse(str(value))


# --------------------------------------------------------------------------------------------------
# Outputs: the modes a plain write gives


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_output_has_the_mode_of_a_plain_write(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = images.save_image(random_image(1), tmp_path / "out.png")
        text = write_text_atomic(tmp_path / "out.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode, oct(path.stat().st_mode & 0o777)
    assert text.stat().st_mode & 0o777 == mode, oct(text.stat().st_mode & 0o777)


def test_an_overwritten_output_keeps_its_mode(tmp_path):
    path = _png(tmp_path / "out.png")
    path.chmod(0o640)
    images.save_image(random_image(2), path)
    assert path.stat().st_mode & 0o777 == 0o640, oct(path.stat().st_mode & 0o777)


def test_convert_keeps_the_mode_of_what_it_overwrites(tmp_path):
    from minid.loading.download import convert

    torch.save({"w": torch.ones(2)}, tmp_path / "x.pt")
    convert(tmp_path / "x.pt", tmp_path / "x.safetensors", log=lambda s: None)
    (tmp_path / "x.safetensors").chmod(0o640)
    convert(tmp_path / "x.pt", tmp_path / "x.safetensors", overwrite=True, log=lambda s: None)
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o640


def test_generate_shows_progress_and_overwrite_replaces(tiny_hub, tmp_path, capsys):
    out = _png(tmp_path / "g.png", 5)
    before = out.read_bytes()
    rc = cli.main(
        [str(a) for a in _generate(tmp_path, tiny_hub, "--steps", "2", "--overwrite", out=out)]
    )
    err = capsys.readouterr().err
    assert rc == 0 and out.read_bytes() != before, err
    assert "minid generate" in err and "step" in err, f"no progress bar: {err}"


# --------------------------------------------------------------------------------------------------
# The install, the help, the first run


def test_every_option_has_help_that_shows_its_default():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        if name in ("download", "convert", "keymap"):
            continue
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = formatter._get_help_string(action)
            assert action.help, f"minid {name} {action.option_strings[0]} has no help"
            assert action.required or action.default is False or "default" in text.lower(), (
                f"minid {name} {action.option_strings[0]}: the help does not show the default: "
                f"{text}"
            )


def test_an_unset_default_does_not_read_as_the_none_keyword(capsys):
    """`--face-mask none` is IdGlow's mask-free mode: its unset default must not read "none"."""
    with pytest.raises(SystemExit):
        cli.main(["restore", "--help"])
    help_text = " ".join(capsys.readouterr().out.split("options:")[-1].split())
    entry = help_text[
        help_text.index("--face-mask FACE_MASK") : help_text.index("--regions REGIONS")
    ]
    assert "default: none" not in entry and "the mask comes from --mask-source" in entry, entry
    assert "JSON file (default: not given)" in help_text  # --regions: unset, no keyword


@pytest.mark.parametrize("command", ["download", "convert", "keymap"])
def test_the_weights_commands_say_minid_in_their_usage(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert capsys.readouterr().out.startswith(f"usage: minid {command}")


def test_download_fetches_what_this_machine_runs():
    from minid.loading.download import default_precision

    assert default_precision() == ("fp16" if torch.cuda.is_available() else "fp32")


def test_the_readme_keeps_two_setup_commands_and_says_how_to_get_cpu_torch():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme[readme.index("## Set up and run") : readme.index("## Restoring your own images")]
    commands = [line.strip() for line in setup.splitlines() if line.startswith("    ")]
    assert commands == ["pip install -e . && minid demo", 'pip install -e ".[test]" && pytest'], (
        commands
    )
    assert "download.pytorch.org/whl/cpu" in setup and "4.3 GB" in setup


def test_the_faces_extra_installs_one_onnxruntime():
    text = (ROOT / "pyproject.toml").read_text()
    faces = re.search(r"^faces = \[(.*)\]$", text, re.M).group(1)
    runtimes = re.findall(r'"(onnxruntime[-\w]*)', faces)
    assert runtimes == ["onnxruntime"], f"faces extra runtimes: {runtimes}"


def test_onnxruntime_is_not_offered_cuda_where_torch_sees_no_gpu(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from minid.faces import analyzer as faces

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert faces.choose_providers() == ["CPUExecutionProvider"]


# --------------------------------------------------------------------------------------------------
# Pictures


def _dark(img: Image.Image, box) -> int:
    return int((np.asarray(img.convert("L").crop(box)) < 128).sum())


def test_the_w_schedule_plot_has_ticks_and_axis_titles():
    from minid.restore.report import plot_w_schedule

    img = plot_w_schedule([0.04, 0.2, 0.33, 0.41, 0.46, 0.48])
    w, h = img.size
    assert _dark(img, (0, 30, 45, h - 40)) > 50, "no y tick labels left of the axis"
    assert _dark(img, (50, h - 40, w, h)) > 100, "no x tick labels and title under the axis"
    assert _dark(img, (0, 0, w, 25)) > 50, "no title"


def test_tiles_are_labelled_and_the_attention_grid_says_its_scale():
    from minid.restore.report import labelled_row

    tile = Image.new("RGB", (64, 64), (255, 255, 255))
    grid = labelled_row([("man", tile), ("glasses", tile)], "each tile scaled to its own max")
    assert grid.height == 64 + 20 + 20 and _dark(grid, (0, 0, grid.width, 20)) > 20, (
        "no labels above the tiles"
    )
    assert _dark(grid, (0, 84, grid.width, grid.height)) > 20, "no caption"


def test_a_write_that_fills_the_disk_names_the_file_and_leaves_nothing(tmp_path):
    import errno

    from minid.loading.files import write_atomic

    def full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "out" / "summary.json"
    with pytest.raises(OSError) as e:
        write_atomic(target, full)
    assert e.value.errno == errno.ENOSPC and str(target) in str(e.value), str(e.value)
    assert list((tmp_path / "out").iterdir()) == [], "a temporary file was left behind"


def test_a_process_killed_in_the_write_check_leaves_no_file_it_can_keep(tmp_path):
    """SIGKILL while the probe file is open: where the OS has unnamed files (O_TMPFILE) the folder
    stays empty; elsewhere the probe's name ends in ".tmp", which a resumed `calibrate` sweeps."""
    import signal
    import subprocess

    folder = tmp_path / "out"
    folder.mkdir()
    code = (
        "import os, signal, tempfile\n"
        "from minid.loading import files\n"
        "real = tempfile.TemporaryFile\n"
        "def killed(*a, **k):\n"
        "    f = real(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "files.tempfile.TemporaryFile = killed\n"
        f"files.check_writable({str(folder)!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = [p.name for p in folder.iterdir()]
    if sys.platform.startswith("linux"):
        assert left == [], f"the killed write check left {left}"
    assert all(n.startswith(".") and n.endswith(".tmp") for n in left), left


def test_a_second_calibrate_on_the_same_out_is_refused_while_the_first_runs(
    tiny_hub, tmp_path, capsys
):
    import subprocess

    out = tmp_path / "cal"
    out.mkdir()
    # the first run: another process holding the folder's lock
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pathlib; from minid.loading.files import folder_lock\n"
            f"with folder_lock(pathlib.Path({str(out)!r}), '--out'):\n"
            "    print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["calibrate", _manifest(tmp_path, face_mask=True), "--out", out]
        argv += ["--weights", tiny_hub, *FAST, *COMMON]
        before = _snapshot(tmp_path)
        rc = cli.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert f"--out {out} is in use by minid (pid {holder.pid})" in err, err
        assert _snapshot(tmp_path) == before, "the refused run changed files"
    finally:
        holder.communicate("")
    # the lock ends with its process: the same command now runs
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
