"""Peak memory of `minid restore` against the size of its pictures: bytes a pixel.

    python bench/memory.py                 # 512², 4000², 8000² pictures, both paths

Each run is a fresh process running `minid restore` on the tiny random SD stack (the models cost the
same at every size, so what grows is the pictures' cost) at 64² working size, on a pair of
scikit-image's astronaut scaled to side² (the edit: its blue channel raised): the face-patch path
(`--face-backend dlib`: detection, registration, a patch around the face) and the centre-crop path
(`--mask-source attention`: no face models). Peak resident memory is the process's ru_maxrss;
bytes a pixel = (peak − peak at 512²) / (side² − 512²). Writes bench/results/memory_cpu.md with
the configuration and the commit it ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import write_results  # noqa: E402

FAST = ["--steps", "2", "--dpm-start", "2", "--dpm-end", "2", "--null-inner-steps", "1"]
PATHS = {
    "face patch (--face-backend dlib)": ["--face-backend", "dlib"],
    "centre crop (--mask-source attention)": ["--mask-source", "attention"],
}

CHILD = """
import resource, sys
from minid.app import cli
rc = cli.main(sys.argv[1:])
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rc)
"""


def write_tiny_hub(root: Path) -> None:
    """The tiny random stack as a hub folder (configs, safetensors, the shipped tokenizer)."""
    from safetensors.torch import save_file

    from minid.loading.tiny import build_tiny_sd

    sd = build_tiny_sd()
    for name, module, file in (
        ("unet", sd.unet, "diffusion_pytorch_model.safetensors"),
        ("vae", sd.vae, "diffusion_pytorch_model.safetensors"),
        ("text_encoder", sd.text_encoder, "model.safetensors"),
    ):
        folder = root / name
        folder.mkdir(parents=True)
        config = dataclasses.asdict(module.cfg)
        if name == "unet":
            config["attention_head_dim"] = config.pop("num_heads")
        (folder / "config.json").write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / file))
    shutil.copytree(REPO / "minid" / "assets" / "clip", root / "tokenizer")


def pair(side: int, folder: Path) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image
    from skimage import data

    a = Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BILINEAR)
    original, edited = folder / f"o{side}.png", folder / f"e{side}.png"
    a.save(original)
    b = np.asarray(a).astype(np.int16)
    b[..., 2] = np.clip(b[..., 2] + 40, 0, 255)
    Image.fromarray(b.astype(np.uint8)).save(edited)
    return original, edited


def restore_argv(hub, original, edited, out, flags: list[str]) -> list[str]:
    """The `minid restore` command line of one run."""
    return [
        "restore", "--original", str(original), "--edited", str(edited),
        "--prompt-original", "a photo of a woman",
        "--prompt-edited", "a photo of a woman wearing glasses",
        "--id-words", "woman", "--element-words", "glasses", "--out", str(out),
        "--weights", str(hub), "--image-size", "64", "--device", "cpu", "--dtype", "fp32",
        "--overwrite", *FAST, *flags,
    ]  # fmt: skip


def peak_kib(hub: Path, original: Path, edited: Path, out: Path, flags: list[str]) -> int:
    argv = restore_argv(hub, original, edited, out, flags)
    run = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True
    )
    line = next(x for x in run.stdout.splitlines() if x.startswith("MAXRSS"))
    _, kib, rc = line.split()
    if rc != "0":
        raise RuntimeError(f"minid restore failed: {run.stderr[-2000:]}")
    return int(kib)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sides", type=int, nargs="+", default=[512, 4000, 8000])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory_cpu.md")
    args = ap.parse_args(argv)
    import torch

    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tiny_hub(tmp / "hub")
        for side in args.sides:
            original, edited = pair(side, tmp)
            for name, flags in PATHS.items():
                kib = peak_kib(tmp / "hub", original, edited, tmp / "r.png", flags)
                rows.append((name, side, kib))
                print(f"{name:40s} {side:6d}² {kib / 1024:8.0f} MiB", flush=True)
    base = {name: kib for name, side, kib in rows if side == args.sides[0]}
    lines = [
        "# minid restore: peak memory against picture size (cpu)",
        "",
        f"{datetime.date.today()}, commit {commit}, torch {torch.__version__}, "
        f"{platform.machine()}; `python bench/memory.py --sides {' '.join(map(str, args.sides))}`",
        "",
        "Config: the tiny random SD stack at 64² working size, `" + " ".join(FAST) + "`, fp32 on "
        "CPU; the pair: scikit-image's astronaut scaled to side², the edit its blue channel + 40. "
        "Peak = the process's ru_maxrss.",
        "",
        "| path | picture | peak | bytes a pixel beyond the 512² run |",
        "|---|---:|---:|---:|",
    ]
    for name, side, kib in rows:
        extra = side * side - args.sides[0] ** 2
        per = f"{(kib - base[name]) * 1024 / extra:.1f}" if extra > 0 else ""
        lines.append(f"| {name} | {side}² | {kib / 1024:.0f} MiB | {per} |")
    from minid.loading.tiny import tiny_configs

    clip_cfg, unet_cfg, vae_cfg = tiny_configs()
    config = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": "cpu",
        "model": {
            "weights": "minid.loading.tiny.build_tiny_sd() (seed 0)",
            "text_encoder": clip_cfg,
            "unet": unet_cfg,
            "vae": vae_cfg,
        },
        "fast_flags": FAST,
        "paths": PATHS,
        "restore_argv": {
            name: restore_argv("HUB", "ORIGINAL", "EDITED", "OUT", flags)
            for name, flags in PATHS.items()
        },
        "pair": "skimage.data.astronaut() resized bilinearly to side², edited: blue channel + 40",
    }
    print("\n".join(lines[8:]))
    write_results(args.out, "\n".join(lines) + "\n", config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
