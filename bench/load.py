"""Load time and peak memory of minid.loading.checkpoint on full-size SD1.4 files (random values,
published layouts).

Each case runs in a fresh subprocess; its peak RSS (`resource.getrusage(...).ru_maxrss`) minus the
RSS after the imports is the memory the load itself needed, compared with the size of the loaded
weights.

    python bench/load.py [--layouts tests/data/sd14/layouts.json] [--workdir /tmp/minid-bench-load]

Writes bench/results/load_cpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import write_results  # noqa: E402

DEFAULT_LAYOUTS = ROOT / "tests" / "data" / "sd14" / "layouts.json"
UNET16 = "unet/diffusion_pytorch_model.fp16.safetensors"
UNET32 = "unet/diffusion_pytorch_model.safetensors"
STACK = (
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors",
)

# Run in the subprocess: baseline after imports, the load, then peak RSS and timing as JSON on
# stdout.
CHILD = r"""
import json, resource, sys, time, torch
from minid.loading import checkpoint as C
import minid.models.unet, minid.models.vae, minid.models.clip, minid.models.tokenizer
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
what, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
t0 = time.perf_counter()
if what == "unet":
    model = C.load_unet(path, dtype=dtype)
    models = [model]
else:
    sd = C.load_stable_diffusion(path, dtype=dtype)
    models = [sd.unet, sd.vae, sd.text_encoder]
seconds = time.perf_counter() - t0
weights = sum(t.numel() * t.element_size() for m in models for t in m.state_dict().values())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "weights": weights, "peak_kib": peak - base}))
"""


def write_random(path: Path, layout: dict) -> None:
    from safetensors.torch import save_file

    dtypes = {"F32": torch.float32, "F16": torch.float16}
    tensors = {
        name: (
            torch.arange(shape[-1]).expand(shape).contiguous()
            if dt == "I64"
            else torch.empty(shape, dtype=dtypes[dt]).uniform_(-1, 1)
        )
        for name, (shape, dt) in layout["tensors"].items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", default=str(DEFAULT_LAYOUTS))
    parser.add_argument("--workdir", default="/tmp/minid-bench-load")
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    parser.add_argument("--write", nargs=2, metavar=("NAME", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_random(
            Path(args.write[1]),
            json.loads(Path(args.layouts).read_text())["hub_files"][args.write[0]],
        )
        return
    hub = Path(args.layouts).parent / "hub"
    work = Path(args.workdir)
    shutil.copytree(hub, work, dirs_exist_ok=True)  # configs and tokenizer
    for name in (UNET32, *STACK):
        if not (work / name).is_file():
            print(f"writing {name} ...", flush=True)
            # In a subprocess: Linux carries a parent's peak RSS into its children's ru_maxrss, so
            # this process must stay small for the measurements below to be the children's own.
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--write",
                    name,
                    str(work / name),
                    "--layouts",
                    args.layouts,
                ],
                check=True,
            )

    cases = [
        ("fp16 UNet file -> fp16", "unet", work / UNET16, "float16"),
        ("fp32 UNet file -> fp16", "unet", work / UNET32, "float16"),
        ("fp16 stack (UNet+VAE+CLIP) -> fp16", "stack", work, "float16"),
    ]
    rows = []
    for title, what, path, dtype in cases:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, what, str(path), dtype],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        ratio = r["peak_kib"] * 1024 / r["weights"]
        rows.append(
            f"| {title} | {r['weights'] / 2**30:.2f} | {r['seconds']:.2f} | "
            f"{r['peak_kib'] / 2**20:.2f} | {ratio:.2f} |"
        )
        print(rows[-1], flush=True)

    import safetensors

    header = [
        "# minid.loading.checkpoint: load time and peak memory (CPU)",
        "",
        f"{datetime.date.today().isoformat()}; {platform.platform()}; "
        f"{platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}, torch "
        f"{torch.__version__}, "
        f"safetensors {safetensors.__version__}. Random values in the published layouts; each case "
        f"in a "
        "fresh process; peak RSS is ru_maxrss minus ru_maxrss after the imports. Files were in the "
        "page cache.",
        "",
        "| case | weights GiB | load s | peak RSS GiB | peak / weights |",
        "|---|---|---|---|---|",
    ]
    text = "\n".join(header + rows) + "\n"
    out = ROOT / "bench" / "results" / "load_cpu.md"
    config = {
        "args": vars(args),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "values": "random: uniform(-1, 1) floats, arange int64, in the published layouts",
        "files": {"unet_fp16": UNET16, "unet_fp32": UNET32, "stack": list(STACK)},
        "cases": [
            {"case": title, "load": what, "path": str(path), "dtype": dtype}
            for title, what, path, dtype in cases
        ],
    }
    print(text)
    write_results(out, text, config)
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
