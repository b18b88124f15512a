"""Report pictures and files of a restore: the intermediates a user studies after `restore`.

`save_result` writes the restored image, both reconstructions, the masks, the w schedule (JSON and a plot)
and the grid of the words' cross-attention maps.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from minid import images, masks


def plot_w_schedule(ws: list[float], size: tuple[int, int] = (360, 240)):
    """A line plot of the w schedule drawn with PIL: step on x, w in [0, 0.5] on y."""
    from PIL import Image, ImageDraw

    w_px, h_px = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 40, w_px - 15, 15, h_px - 30
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for frac, label in ((0.0, "0"), (0.5, "0.25"), (1.0, "0.5")):
        y = bottom - frac * (bottom - top)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.text((2, y - 6), label, fill=(0, 0, 0))
    n = max(len(ws) - 1, 1)
    pts = [(left + i / n * (right - left), bottom - min(max(w / 0.5, 0), 1) * (bottom - top)) for i, w in enumerate(ws)]
    if len(pts) > 1:
        draw.line(pts, fill=(200, 30, 30), width=2)
    for x, y in pts:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 30, 30))
    draw.text((left, h_px - 20), "inversion step ->   w (mixing weight)", fill=(0, 0, 0))
    return img


def _grey(t: torch.Tensor, size: int):
    from PIL import Image

    t = t.float()
    t = t / t.max().clamp_min(1e-12)
    t = masks.to_resolution(t, size, how="nearest")
    return Image.fromarray((t.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(), mode="L").convert("RGB")


def save_result(result, out_dir: str | Path, inputs=()) -> dict[str, Path]:
    """Write the restored image, reconstructions, masks, w schedule (JSON and PNG), attention grid."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = result.image.shape[-1]
    paths = {
        "restored": images.save_image(result.image, out / "restored.png", inputs),
        "reconstruction_original": images.save_image(result.reconstructions["original"], out / "reconstruction_original.png", inputs),
        "reconstruction_edited": images.save_image(result.reconstructions["edited"], out / "reconstruction_edited.png", inputs),
        "mask_face": images.save_image(_grey(result.masks["face"][0, 0], size), out / "mask_face.png", inputs),
        "mask_element": images.save_image(_grey(result.masks["element"][0, 0], size), out / "mask_element.png", inputs),
        "mask_blend": images.save_image(_grey(result.masks["blend"][0, 0], size), out / "mask_blend.png", inputs),
        "w_schedule_plot": images.save_image(plot_w_schedule(result.w_schedule), out / "w_schedule.png", inputs),
    }
    summary = {"w_schedule": result.w_schedule, "psnr": result.psnr, "timings": result.timings, "notes": result.notes,
               "inversion": result.inversion, "unet_calls": result.unet_calls,
               "null_text": [dataclasses.asdict(s) for s in result.null_text]}
    paths["summary"] = images.write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    if result.attention_maps:
        tiles = [_grey(m, 128) for m in result.attention_maps.values()]
        paths["attention_grid"] = images.save_image(images.side_by_side(tiles, gap=4), out / "attention_maps.png", inputs)
    return paths
