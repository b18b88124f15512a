"""Report pictures and files of a restore: the intermediates a user studies after `restore`.

`save_result` writes the restored image, both reconstructions, the masks, the w schedule (JSON and a
plot) and the grid of the words' cross-attention maps.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from minid.imaging import images, masks
from minid.loading.files import check_writable, write_text_atomic


def _font(size: int = 12):
    """PIL's built-in font at `size` px (scalable with FreeType, Pillow ≥ 10.1; else its fixed
    bitmap font)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: one bitmap size
        return ImageFont.load_default()


def plot_w_schedule(ws: list[float], size: tuple[int, int] = (480, 300)):
    """A line plot of the w schedule drawn with PIL: inversion step on x (1 … N), w on y from 0 to
    0.5 (the range Stage 1 keeps it in), with ticks, grid lines and axis titles."""
    return plot_series(
        ws,
        "Stage 1: mixing weight w per inversion step",
        "w",
        0.5,
        "inversion step (1 = from the image, N = towards noise)",
        size,
    )


def plot_identity_schedule(values: list[float], size: tuple[int, int] = (480, 300)):
    """The identity schedule s_i of Stage 3 (IdGlow): O's share at each reconstruction step, 0 to
    1."""
    return plot_series(
        values,
        "Stage 3: identity share s per step",
        "s",
        1.0,
        "reconstruction step (1 = from noise, N = the image)",
        size,
    )


def plot_series(
    values: list[float],
    title: str,
    y_name: str,
    y_max: float,
    x_title: str,
    size: tuple[int, int] = (480, 300),
    bar: float | None = None,
):
    """A line plot drawn with PIL: step on x (1 … N), the value on y from 0 to `y_max`, with five y
    ticks, grid lines and axis titles; `bar`: a horizontal green line at that value (a threshold to
    clear)."""
    from PIL import Image, ImageDraw

    w_px, h_px = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    left, right, top, bottom = 52, w_px - 18, 34, h_px - 46
    ink, grid, line = (0, 0, 0), (225, 225, 225), (200, 30, 30)
    draw.text((left, 8), title, fill=ink, font=font)
    for k in range(6):  # y ticks 0, y_max/5, …, y_max
        w = k * y_max / 5
        y = bottom - w / y_max * (bottom - top)
        draw.line([left, y, right, y], fill=grid)
        draw.line([left - 5, y, left, y], fill=ink)
        draw.text((left - 8, y), f"{w:.1f}", fill=ink, font=small, anchor="rm")
    n = len(values)
    x_of = (
        (lambda i: left + (i - 1) / (n - 1) * (right - left))
        if n > 1
        else (lambda i: (left + right) / 2)
    )
    every = max(1, -(-n // 12))  # at most about 12 labelled ticks
    for i in range(1, n + 1):
        x = x_of(i)
        draw.line([x, bottom, x, bottom + (5 if (i - 1) % every == 0 or i == n else 3)], fill=ink)
        if (i - 1) % every == 0 or i == n:
            draw.text((x, bottom + 7), str(i), fill=ink, font=small, anchor="mt")
    if bar is not None:
        y = bottom - min(max(bar / y_max, 0), 1) * (bottom - top)
        draw.line([left, y, right, y], fill=(30, 140, 30), width=2)
    draw.rectangle([left, top, right, bottom], outline=ink)
    draw.text(((left + right) / 2, h_px - 6), x_title, fill=ink, font=small, anchor="mb")
    draw.text((6, top - 14), y_name, fill=ink, font=font)
    pts = [
        (x_of(i + 1), bottom - min(max(w / y_max, 0), 1) * (bottom - top))
        for i, w in enumerate(values)
    ]
    if len(pts) > 1:
        draw.line(pts, fill=line, width=2)
    for x, y in pts:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=line)
    return img


def labelled_row(tiles: list, caption: str | None = None, gap: int = 8):
    """PIL images in one row, each with its label above it (`tiles`: [(label, image)]), and an
    optional caption below the row: what the demo's comparison and the attention grid are drawn
    with."""
    from PIL import Image, ImageDraw

    font = _font(13)
    strip = 20
    row = images.side_by_side([im for _, im in tiles], gap=gap)
    foot = 20 if caption else 0
    width = max(
        row.width,
        int(ImageDraw.Draw(row).textlength(caption, font=_font(11))) + 8 if caption else 0,
    )
    canvas = Image.new("RGB", (width, row.height + strip + foot), (255, 255, 255))
    canvas.paste(row, (0, strip))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for label, im in tiles:
        draw.text((x + im.width / 2, strip / 2), label, fill=(0, 0, 0), font=font, anchor="mm")
        x += im.width + gap
    if caption:
        draw.text((4, strip + row.height + 3), caption, fill=(60, 60, 60), font=_font(11))
    return canvas


def _grey(t: torch.Tensor, size: int, normalise: bool = False):
    """A map as a grey picture of `size`²: values in [0, 1] as they are (masks), or divided by the
    map's own maximum when `normalise` (attention maps)."""
    from PIL import Image

    t = t.float()
    if normalise:
        t = t / t.max().clamp_min(1e-12)
    t = masks.to_resolution(t, size, how="nearest")
    return Image.fromarray(
        (t.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy(), mode="L"
    ).convert("RGB")


# Every file `save_result` may write, so a command can check them all before any compute (keep it in
# step).
RESULT_FILES = (
    "restored.png",
    "reconstruction_original.png",
    "reconstruction_edited.png",
    "mask_face.png",
    "mask_element.png",
    "mask_blend.png",
    "w_schedule.png",
    "identity_schedule.png",
    "summary.json",
    "w_schedule.json",
    "plan.json",
    "attention_maps.png",
)


def check_result_folder(
    out_dir: str | Path,
    inputs=(),
    overwrite: bool = False,
    what: str = "--save-intermediates",
    names: tuple[str, ...] = RESULT_FILES,
) -> None:
    """Raise before any compute if `save_result` (and whoever writes `names` there) could not write
    into `out_dir`: a file in its place, a file there that is an input, an existing file when not
    `overwrite`, or a folder that cannot be written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{what} {out} is a file; give a folder")
    for name in names:
        images.check_output_path(
            out / name, inputs, overwrite=overwrite, what=f"{what} file", suffixes=()
        )
    check_writable(out, f"{what} folder")


def save_result(result, out_dir: str | Path, inputs=()) -> dict[str, Path]:
    """Write the restored image, reconstructions, masks, w schedule (JSON and PNG), attention
    grid."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = result.image.shape[-1]
    paths = {
        "restored": images.save_image(result.image, out / "restored.png", inputs),
        "reconstruction_original": images.save_image(
            result.reconstructions["original"], out / "reconstruction_original.png", inputs
        ),
        "reconstruction_edited": images.save_image(
            result.reconstructions["edited"], out / "reconstruction_edited.png", inputs
        ),
        "mask_face": images.save_image(
            _grey(result.masks["face"][0, 0], size), out / "mask_face.png", inputs
        ),
        "mask_element": images.save_image(
            _grey(result.masks["element"][0, 0], size), out / "mask_element.png", inputs
        ),
        "mask_blend": images.save_image(
            _grey(result.masks["blend"][0, 0], size), out / "mask_blend.png", inputs
        ),
        "w_schedule_plot": images.save_image(
            plot_w_schedule(result.w_schedule), out / "w_schedule.png", inputs
        ),
    }
    if result.identity_schedule and any(v != 1.0 for v in result.identity_schedule):
        paths["identity_schedule_plot"] = images.save_image(
            plot_identity_schedule(result.identity_schedule), out / "identity_schedule.png", inputs
        )
    summary = {
        "w_schedule": result.w_schedule,
        "psnr": result.psnr,
        "timings": result.timings,
        "notes": result.notes,
        "inversion": result.inversion,
        "unet_calls": result.unet_calls,
        "identity_schedule": result.identity_schedule,
        "regions": result.regions,
        "registration": result.registration,
        "null_text": [dataclasses.asdict(s) for s in result.null_text],
    }
    paths["summary"] = write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    paths["w_schedule"] = write_text_atomic(
        out / "w_schedule.json",
        json.dumps({"w": result.w_schedule, "D": result.w_differences}, indent=2),
    )
    paths["plan"] = write_text_atomic(out / "plan.json", json.dumps(result.plan, indent=2))
    if result.attention_maps:
        tiles = [(word, _grey(m, 128, normalise=True)) for word, m in result.attention_maps.items()]
        grid = labelled_row(
            tiles, "cross-attention per word; each tile scaled to its own max (white)", gap=4
        )
        paths["attention_grid"] = images.save_image(grid, out / "attention_maps.png", inputs)
    return paths
