"""Image input and output: any picture in, a 512×512 RGB tensor in [-1, 1] out, and the way back.

The aligned crop (what `load_image` does, and what `paste_back` undoes):
1. EXIF orientation is applied, so the pixels are the ones a viewer shows.
2. Any mode becomes RGB: transparency is composited on white, palettes and grey levels are expanded,
   16-bit and float images are scaled to 8 bits by their own maximum.
3. The largest square centred on the image is cut out (`CropFrame.box`, in the original's pixels): SD1.4
   works on squares, and centring keeps a portrait's subject, who is usually in the middle.
4. The square is resized to `size` (512) with a Lanczos filter: SD1.4 was trained at 512², and 512 is a
   multiple of 8, the VAE's downsampling factor.
`paste_back(restored, frame, original)` resizes the restored square back to the crop's size and pastes it
into a copy of the original, so the parts outside the square come back untouched.

Writes are atomic (a temporary file in the target folder, then `os.replace`), and `save_image` refuses to
write over any file that was an input, so a restore can never destroy the photo it started from.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

ImageLike = str | Path | Image.Image


@dataclass(frozen=True)
class CropFrame:
    """Where the 512² square came from: enough to map a result back onto the original picture."""

    original_size: tuple[int, int]  # (width, height) of the original after EXIF rotation
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of the centred square in the original
    size: int  # side of the square the models see
    source: Path | None = None  # the file it was read from, protected from overwriting


def _open(image: ImageLike) -> tuple[Image.Image, Path | None]:
    if isinstance(image, Image.Image):
        return image, None
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"images.py: image file {path} not found; give the path of a PNG or JPEG")
    try:
        img = Image.open(path)
        img.load()
    except OSError as e:
        raise ValueError(f"images.py: {path} could not be read as an image ({e})") from None
    return img, path


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB (step 2 of the aligned crop)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit or float grey: scale by the image's own maximum so that it is not clipped to white.
        a = np.asarray(img, dtype=np.float32)
        a = a / max(float(a.max()), 1e-8) * 255.0
        img = Image.fromarray(a.clip(0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest square centred in a width×height picture, as (left, top, right, bottom)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, 3, H, W)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) in [-1, 1] -> RGB PIL image (values outside [-1, 1] are clipped)."""
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"images.py: tensor_to_pil takes one image, found a batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"images.py: expected an image tensor (3, H, W), found shape {tuple(x.shape)}")
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(a.permute(1, 2, 0).numpy(), mode="RGB")  # (H, W, 3)


def load_image(image: ImageLike, size: int = 512) -> tuple[torch.Tensor, CropFrame]:
    """Read a picture of any size and mode; return the (1, 3, size, size) tensor in [-1, 1] and its frame."""
    img, path = _open(image)
    img = to_rgb(img)
    box = centre_square(*img.size)
    square = img.crop(box).resize((size, size), Image.Resampling.LANCZOS)
    return pil_to_tensor(square), CropFrame(original_size=img.size, box=box, size=size, source=path)


def load_mask(mask: ImageLike | torch.Tensor, frame: CropFrame | None = None, size: int = 512) -> torch.Tensor:
    """A mask picture (white = inside) through the same crop as its image -> (1, 1, size, size) in [0, 1].

    A mask file of another size than its image is resized to the image first (with a warning).

    A tensor is accepted as it is when it already has the working size, and resized (bilinear) otherwise.
    """
    if isinstance(mask, torch.Tensor):
        m = mask.float()
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if m.shape[:2] != (1, 1):
            raise ValueError(f"images.py: a mask tensor must be (H, W), (1, H, W) or (1, 1, H, W), "
                             f"found {tuple(mask.shape)}")
        if m.shape[-2:] != (size, size):
            m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
        return m.clamp(0, 1)
    img, _ = _open(mask)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA"):
        grey = img.getchannel("A") if img.convert("L").getextrema() == (255, 255) else img.convert("L")
    else:
        grey = img.convert("L")
    if frame is not None:
        if grey.size != frame.original_size:
            # A mask drawn at another resolution of the same picture: stretch it onto the image first.
            warnings.warn(f"images.py: mask {mask} is {grey.size[0]}×{grey.size[1]} but its image is "
                          f"{frame.original_size[0]}×{frame.original_size[1]}; resized to the image")
            grey = grey.resize(frame.original_size, Image.Resampling.BILINEAR)
        grey = grey.crop(frame.box)
    else:
        grey = grey.crop(centre_square(*grey.size))
    grey = grey.resize((size, size), Image.Resampling.BILINEAR)
    a = np.asarray(grey, dtype=np.float32) / 255.0  # (size, size)
    return torch.from_numpy(a)[None, None].contiguous()  # (1, 1, size, size)


def paste_back(restored: torch.Tensor | Image.Image, frame: CropFrame, original: ImageLike) -> Image.Image:
    """The inverse of the aligned crop: the restored square, resized to the crop box, inside the original."""
    square = restored if isinstance(restored, Image.Image) else tensor_to_pil(restored)
    base, _ = _open(original)
    base = to_rgb(base)
    if base.size != frame.original_size:
        raise ValueError(f"images.py: paste_back got an original of size {base.size}, but the frame was "
                         f"made from one of size {frame.original_size}")
    left, top, right, bottom = frame.box
    base = base.copy()
    base.paste(square.resize((right - left, bottom - top), Image.Resampling.LANCZOS), (left, top))
    return base


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def save_image(image: torch.Tensor | Image.Image, path: str | Path,
               inputs: tuple[str | Path | None, ...] | list[str | Path | None] = ()) -> Path:
    """Write a PNG/JPEG atomically; refuse to write over any of `inputs` (the files the run read)."""
    path = Path(path)
    for src in inputs:
        if src is not None and (_same_file(path, Path(src)) or path.resolve() == Path(src).resolve()):
            raise FileExistsError(f"images.py: refusing to write {path}: it is the input image {src}; "
                                  f"choose another output path")
    img = image if isinstance(image, Image.Image) else tensor_to_pil(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format=fmt)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on one filesystem: readers see the old file or the new one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file (JSON, Markdown) the same atomic way as `save_image`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def side_by_side(images: list[Image.Image], gap: int = 8) -> Image.Image:
    """Images of equal height in one row with a white gap between them."""
    h = max(im.height for im in images)
    w = sum(im.width for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return canvas


SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg")


def check_output_path(path: str | Path, inputs=()) -> Path:
    """Fail before any heavy work if `path` cannot take an output: an input file, or an unknown format."""
    path = Path(path)
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(f"images.py: output {path} must end in one of {', '.join(SUPPORTED_SUFFIXES)}")
    for src in inputs:
        if src is not None and (_same_file(path, Path(src)) or path.resolve() == Path(src).resolve()):
            raise FileExistsError(f"images.py: refusing to write {path}: it is the input image {src}; "
                                  f"choose another output path")
    if path.is_dir():
        raise IsADirectoryError(f"images.py: output {path} is a folder; give a file name such as {path / 'out.png'}")
    return path


def save_restored(result, path: str | Path, original: ImageLike | None = None, inputs=()) -> Path:
    """Write a restore's image: pasted back into `original` (the edited photo, at its own size) through the
    inverse of the aligned crop when given as a file or PIL image, else the square as it is."""
    path = check_output_path(path, inputs)
    image = result.image
    if original is not None and not isinstance(original, torch.Tensor):
        base, _ = _open(original)
        base = to_rgb(base)
        box = centre_square(*base.size)
        frame = CropFrame(original_size=base.size, box=box, size=image.shape[-1])
        image = paste_back(image, frame, base)
    return save_image(image, path, inputs)
