"""What `minid demo` costs on this machine at full size, before and after the CPU path.

    python bench/demo_cost.py            # CPU: the SD1.4 UNet with random weights at 512² (64²
                                         latents)

Measures the time one image takes through the full-size SD1.4 UNet (a batch of two, the median of a
few calls after a warm-up; random weights, the architecture of the published files), then multiplies
it by the number of UNet images each demo path runs (`minid.app.demo.demo_unet_images`, which a test
checks against the calls the demo really makes): the paper's settings (20 generation steps,
null-text inversion at its most: 10 updates per step) and the CPU path the demo takes without a GPU
(10 generation steps, direct inversion). Writes bench/results/demo_cost_<device>.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import write_results  # noqa: E402


@torch.no_grad()
def seconds_per_image(unet, latent: int, repeats: int, device: str) -> list[float]:
    z = torch.zeros(2, unet.cfg.in_channels, latent, latent, device=device)
    context = torch.zeros(2, 77, unet.cfg.cross_attention_dim, device=device)
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        unet(z, 500, context)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / 2)
    return times[1:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=512, help="image side (latents are size/8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from minid.app.demo import demo_settings, demo_unet_images
    from minid.method.editedid import EditedIDConfig
    from minid.models.config import UNetConfig
    from minid.models.unet import UNet

    torch.manual_seed(0)
    unet_config, base_method = UNetConfig(), EditedIDConfig()
    unet = UNet(unet_config).eval().requires_grad_(False).to(args.device)
    times = seconds_per_image(unet, args.size // 8, args.repeats, args.device)
    per_image = statistics.median(times)
    rows = []
    for name, paper in (("paper's settings", True), ("CPU path", False)):
        steps, method = demo_settings("cpu", base_method, paper_settings=paper)
        images = demo_unet_images(steps, method)
        rows.append((name, steps, method, images, sum(images.values()) * per_image))
    where = (
        f"GPU {torch.cuda.get_device_name()}"
        if args.device == "cuda"
        else f"{platform.machine()}, {torch.get_num_threads()} CPU threads"
    )
    lines = [
        f"# minid demo at full size: estimated time ({args.device})",
        "",
        f"{datetime.date.today()}, torch {torch.__version__}, {where}; SD1.4 UNet (random "
        f"weights), fp32, "
        f"{args.size}² images ({args.size // 8}² latents).",
        "",
        f"One image through the UNet: **{per_image:.2f} s** (median of {len(times)}: "
        + ", ".join(f"{t:.2f}" for t in times)
        + " s per image, measured on batches of two).",
        "",
        "| path | generation steps | Stage 2 | UNet images: generate / edit / align / disentangle "
        "/ entangle | "
        "estimated time |",
        "|---|---:|---|---|---:|",
    ]
    for name, steps, method, images, seconds in rows:
        lines.append(
            f"| {name} | {steps} | {method.inversion} | "
            + " / ".join(str(v) for v in images.values())
            + f" | {seconds / 60:.0f} min |"
        )
    lines += [
        "",
        f"The CPU path takes {rows[0][4] / rows[1][4]:.1f}× less time. Null-text is counted at its "
        f"most "
        "(10 updates at every step, each a forward and a backward ≈ 3 forwards); its early stop "
        "can only make "
        "it cheaper. The text encoder and the VAE are not counted (under a second each).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or REPO / "bench" / "results" / f"demo_cost_{args.device}.md"
    config = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": args.device,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "seed": 0,
        "latent": args.size // 8,
        "unet_batch": 2,
        "timestep": 500,
        "text_tokens": 77,
        "unet": unet_config,
        "method": base_method,
        "paths": [
            {"name": name, "generate_steps": steps, "method": method, "unet_images": images}
            for name, steps, method, images, _ in rows
        ],
    }
    defaults = {
        "unet": "minid.models.config.UNetConfig",
        "method": "minid.method.editedid.EditedIDConfig",
    }
    write_results(out, text, config, defaults)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
