"""Image input and output: any picture in, a 512×512 RGB tensor in [-1, 1] out, and the way back.

The aligned crop (what `load_image` does, and what `paste_back` undoes):
1. EXIF orientation is applied, so the pixels are the ones a viewer shows.
2. Any mode becomes RGB: transparency is composited on white, palettes and grey levels are expanded,
   16-bit and float images are brought to 8 bits by their bit depth (65535, or 1.0, is white).
3. The largest square centred on the image is cut out (`CropFrame.box`, in the original's pixels):
   SD1.4 works on squares, and centring keeps a portrait's subject, who is usually in the middle.
4. The square is resized to `size` (512) with a Lanczos filter: SD1.4 was trained at 512², and 512
   is a multiple of 8, the VAE's downsampling factor.
`crops.paste_back(original, restored, frame.affine)` warps the restored square back onto the crop's
square of a copy of the original, so the parts outside the square come back untouched
(`save_restored` does it).

Writes are atomic (a temporary file in the target folder, then `os.replace`), with the mode a plain
`open` would give (0o666 less the umask; an overwritten file keeps its own), and `save_image`
refuses to write over any file that was an input, so a restore can never destroy the photo it
started from. `check_output_path` says before any heavy work whether a path can take an output: not
an input, not a folder, in a folder that can be written, and not an existing file unless `overwrite`
(the commands' `--overwrite`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from minid.loading.files import check_writable, write_atomic
from minid.models.vae import MIN_SIDE

ImageLike = str | Path | Image.Image
# The smallest side of a picture minid takes: below it a face has too few pixels to restore, and the
# 512² working square would be made almost entirely by upscaling.


@dataclass(frozen=True)
class CropFrame:
    """Where the 512² square came from: enough to map a result back onto the original picture."""

    original_size: tuple[int, int]  # (width, height) of the original after EXIF rotation
    # (left, top, right, bottom) of the centred square in the original
    box: tuple[int, int, int, int]
    size: int  # side of the square the models see
    source: Path | None = None  # the file it was read from, protected from overwriting
    # the picture itself (RGB, 8-bit, after EXIF rotation), kept for the paste-back so it is read
    # once
    picture: Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def affine(self) -> np.ndarray:
        """The 2×3 affine original → square (`crops.square_affine`), what `crops.paste_back`
        inverts."""
        from minid.imaging.crops import square_affine

        left, top, right, _ = self.box
        return square_affine(left, top, right - left, self.size)


def open_image(image: ImageLike) -> tuple[Image.Image, Path | None]:
    """A PIL image as it is, or a file read whole; a clear error for a missing or unreadable
    file."""
    if isinstance(image, Image.Image):
        return image, None
    if not isinstance(image, (str, os.PathLike)):
        hint = {
            "ndarray": " (wrap an array with PIL.Image.fromarray)",
            "bytes": " (wrap file contents with PIL.Image.open(io.BytesIO(data)))",
        }.get(type(image).__name__, "")
        raise TypeError(
            f"an image must be a file path or a PIL image, got {type(image).__name__}{hint}"
        )
    path = Path(image)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the path of an image file (PNG or JPEG)")
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found; give the path of a PNG or JPEG")
    try:
        with warnings.catch_warnings():
            # minid says itself what a large picture costs (`memory_note`), not PIL's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except Image.DecompressionBombError as e:
        raise _too_large(path, e) from None
    except (OSError, SyntaxError) as e:  # PIL raises SyntaxError for some malformed files
        raise ValueError(f"{path} could not be read as an image ({e})") from None
    return img, path


def check_image_file(path: str | Path) -> tuple[int, int]:
    """Raise the errors of `open_image` for a file that is not an image, reading only its header
    (cheap: for checking a folder of inputs before any work); returns the (width, height) a viewer
    shows (EXIF quarter turns applied)."""
    path = Path(path)
    if not path.is_file():
        open_image(path)  # the folder / not-found errors
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                # a PNG's getexif() decodes the whole image when its header holds no EXIF
                headerless = img.format == "PNG" and "exif" not in img.info
                turn = 1 if headerless else img.getexif().get(EXIF_ORIENTATION, 1)
    except Image.DecompressionBombError as e:
        raise _too_large(path, e) from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path} could not be read as an image ({e})") from None
    return (h, w) if turn in (5, 6, 7, 8) else (w, h)  # 5-8: a quarter turn


def _too_large(path: Path, e: Exception) -> ValueError:
    """The one line for a picture past PIL's decompression-bomb limit (2 × MAX_IMAGE_PIXELS)."""
    return ValueError(
        f"{path} is too large to read safely ({e}); resize it below "
        f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels first"
    )


EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how the camera was held (1: as stored)
WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # grey levels of more than 8 bits


def wide_grey_levels(img: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit or float grey image's levels in [0, 1] (H, W) float32, by its bit depth, not
    its content (a dark picture stays dark): 16-bit (PIL's "I;16*", and "I", which is how PIL opens
    a 16-bit PNG) over 65535, a 32-bit integer image whose levels pass 65535 over 2³² − 1, float
    ("F") as the [0, 1] it conventionally holds; clipped to [0, 1]."""
    a = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0
    elif img.mode == "I" and a.size and float(a.max()) > 65535:
        top = 2.0**32 - 1
    else:
        top = 65535.0
    return (a / top).clip(0, 1).astype(np.float32)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB (step 2 of the aligned crop), turned as its EXIF orientation says
    (the pixels a viewer shows). An RGB image with no turn to make is returned as it is (no copy:
    a 100 Mpx photo is 300 MB)."""
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in WIDE_GREY_MODES:  # 16-bit or float grey: by the bit depth (`wide_grey_levels`)
        levels = (wide_grey_levels(img) * 255.0).round()
        img = Image.fromarray(levels.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


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
    """(1, 3, H, W) or (3, H, W) in [-1, 1] -> RGB PIL image (values outside [-1, 1] are
    clipped)."""
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"tensor_to_pil takes one image, found a batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected an image tensor (3, H, W), found shape {tuple(x.shape)}")
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(a.permute(1, 2, 0).numpy(), mode="RGB")  # (H, W, 3)


def load_image(image: ImageLike, size: int = 512) -> tuple[torch.Tensor, CropFrame]:
    """Read a picture of any size and mode; return the (1, 3, size, size) tensor in [-1, 1] and its
    frame."""
    img, path = open_image(image)
    img = to_rgb(img)
    least = min(MIN_SIDE, size)  # (tests work on smaller squares)
    if min(img.size) < least:
        name = f"the image {path}" if path is not None else "the image"
        raise ValueError(
            f"{name} is {img.width}×{img.height} px; minid needs at least {least} px on each side "
            f"(it works on a {size}² square)"
        )
    box = centre_square(*img.size)
    square = img.crop(box).resize((size, size), Image.Resampling.LANCZOS)
    return pil_to_tensor(square), CropFrame(
        original_size=img.size, box=box, size=size, source=path, picture=img
    )


def _refuse_inputs(path: Path, inputs) -> None:
    """Raise when `path` is one of the files a run read: no output is ever written over an input."""
    for src in inputs:
        if src is not None and (
            _same_file(path, Path(src)) or path.resolve() == Path(src).resolve()
        ):
            raise FileExistsError(
                f"refusing to write {path}: it is the input image {src}; choose another output path"
            )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def save_image(
    image: torch.Tensor | Image.Image,
    path: str | Path,
    inputs: tuple[str | Path | None, ...] | list[str | Path | None] = (),
    overwrite: bool = True,
) -> Path:
    """Write a PNG/JPEG atomically; refuse to write over any of `inputs` (the files the run read),
    and over an existing file unless `overwrite`."""
    path = Path(path)
    _refuse_inputs(path, inputs)
    if not overwrite and path.exists():
        raise FileExistsError(
            f"{path} already exists; choose another path, or pass --overwrite (overwrite=True) "
            "to replace it"
        )
    img = image if isinstance(image, Image.Image) else tensor_to_pil(image)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    return write_atomic(path, lambda f: img.save(f, format=fmt))


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


SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg")  # what minid writes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # what the folder commands read


def check_output_path(
    path: str | Path,
    inputs=(),
    overwrite: bool = True,
    what: str = "output",
    suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES,
) -> Path:
    """Fail before any heavy work if `path` cannot take an output: a folder, an unknown format, an
    input file, an existing file when not `overwrite`, or a folder that cannot be written. `what`
    names it in the messages (e.g. "--out")."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{what} {path} is a folder; give a file name such as {path / 'out.png'}"
        )
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{what} {path} must end in one of {', '.join(suffixes)}")
    _refuse_inputs(path, inputs)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{what} {path} already exists; choose another path, or pass --overwrite "
            "(overwrite=True) to replace it"
        )
    check_writable(path.parent, f"folder of {what}")
    return path


def save_restored(
    result,
    path: str | Path,
    original: ImageLike | None = None,
    inputs=(),
    overwrite: bool = True,
    frame: CropFrame | None = None,
) -> Path:
    """Write a restore's image: pasted back into the edited photo at its own size through the
    inverse of the crop (`crops.paste_back` with the crop's affine), else the square as it is. The
    photo is `frame.picture` (the edited image's `CropFrame`, read when the pair was checked), or
    `original` (a file or PIL image, read here). Pixels outside the crop's square stay the
    photo's."""
    path = check_output_path(path, inputs, overwrite=overwrite)
    image = result.image
    picture = frame.picture if frame is not None else None
    if picture is None and original is not None and not isinstance(original, torch.Tensor):
        picture = to_rgb(open_image(original)[0])
    if picture is not None:
        size = image.shape[-1]
        frame = CropFrame(original_size=picture.size, box=centre_square(*picture.size), size=size)
        # 8-bit and a band of rows at a time: a large photo costs its copy, not a float image
        image = paste_into_picture(picture, image.float(), frame.affine, torch.ones(size, size))
    return save_image(image, path, inputs, overwrite=overwrite)


# --------------------------------------------------------------------------------------------------
# Pictures kept whole: the face-patch path reads and writes only the regions it needs

Picture = Image.Image | torch.Tensor  # 8-bit RGB PIL image, or (1, 3, H, W) float in [-1, 1]


def read_picture(image: ImageLike | torch.Tensor, name: str) -> tuple[Picture, Path | None]:
    """An input as the face-patch path keeps it, once: a file or PIL image as 8-bit RGB (EXIF
    orientation applied, `to_rgb`), 3 bytes a pixel; a (1, 3, H, W) or (3, H, W) tensor in [-1, 1]
    as it is. Returns the picture and the file it came from (None otherwise)."""
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image.unsqueeze(0)
        if x.dim() != 4 or x.shape[:2] != (1, 3) or not x.is_floating_point():
            raise ValueError(
                f"the {name} image tensor must be (1, 3, H, W) floats in [-1, 1]; found "
                f"{tuple(image.shape)} {image.dtype}"
            )
        return x.float(), None
    img, path = open_image(image)
    return to_rgb(img), path


def picture_size(picture: Picture) -> tuple[int, int]:
    """(width, height) of a picture."""
    if isinstance(picture, torch.Tensor):
        return int(picture.shape[-1]), int(picture.shape[-2])
    return picture.size


def picture_region(picture: Picture, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The pixels of `box` (x0, y0, x1, y1) as (1, 3, h, w) float32 in [-1, 1]."""
    x0, y0, x1, y1 = box
    if isinstance(picture, torch.Tensor):
        return picture[..., y0:y1, x0:x1].float()
    return pil_to_tensor(picture.crop(box))


def warp_picture(picture: Picture, affine: np.ndarray, size: int) -> torch.Tensor:
    """`crops.warp(picture, affine, size, border="replicate")` reading only the patch's footprint
    (the memory of the region, not of the picture). A patch smaller than its footprint (a large
    face) is made from the region first resized to the patch's scale with an antialiasing filter,
    so the bilinear warp does not alias."""
    from minid.imaging import crops

    width, height = picture_size(picture)
    box = crops.footprint(affine, size, (height, width))
    local = crops.shift_affine(affine, box[0], box[1])
    scale = crops.affine_scale(local)
    if scale >= 0.5:
        region = picture_region(picture, box)
    else:  # shrinking by more than 2: prefilter (an 8-bit picture in 8 bits), then warp at ~1:1
        w, h = box[2] - box[0], box[3] - box[1]
        new_h, new_w = max(round(h * scale), 1), max(round(w * scale), 1)
        if isinstance(picture, torch.Tensor):
            region = torch.nn.functional.interpolate(
                picture_region(picture, box),
                size=(new_h, new_w),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        else:  # PIL's bilinear filter widens with the reduction: antialiased
            shrunk = picture.crop(box).resize((new_w, new_h), Image.Resampling.BILINEAR)
            region = pil_to_tensor(shrunk)
        # index coordinates of the resized region: x' = (x + 0.5)·new_w/w − 0.5
        fx, fy = new_w / w, new_h / h
        resize = np.array([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5]])
        local = crops.compose_affine(local, crops.invert_affine(resize))
    return crops.warp(region, local, size, border="replicate")


def paste_into_picture(
    picture: Picture,
    patch: torch.Tensor,
    affine: np.ndarray,
    mask: torch.Tensor,
    rows: int = 256,
) -> Picture:
    """`crops.paste_back(picture, patch, affine, mask)` on the patch's footprint only, `rows` rows
    at a time, into a copy of the picture (of its kind: an 8-bit picture stays 8-bit, so a 100 Mpx
    photo costs its 300 MB once more, not 100 bytes a pixel). Pixels outside the footprint, and
    inside it wherever the mask is 0, keep the picture's values exactly."""
    from minid.imaging import crops

    patch = patch[0] if patch.dim() == 4 else patch
    width, height = picture_size(picture)
    x0, y0, x1, y1 = crops.footprint(affine, patch.shape[-1], (height, width))
    out = picture.clone() if isinstance(picture, torch.Tensor) else picture.copy()
    for top in range(y0, y1, rows):
        bottom = min(top + rows, y1)
        region = picture_region(picture, (x0, top, x1, bottom))[0]
        blended = crops.paste_back(region, patch, crops.shift_affine(affine, x0, top), mask=mask)
        if isinstance(out, torch.Tensor):
            out[..., top:bottom, x0:x1] = blended
        else:
            out.paste(tensor_to_pil(blended), (x0, top))
    return out


def detection_view(picture: Picture, max_side: int) -> tuple[torch.Tensor, float, float]:
    """What a face detector is shown: the picture as (1, 3, h, w) in [-1, 1], shrunk (antialiased)
    so its longer side is at most `max_side`, and the factors (fx, fy) = (w/W, h/H) by which it was
    (1.0 when it was not): a detector letterboxes into 640² anyway, and a 100 Mpx photo in float32
    would cost 1.2 GB."""
    width, height = picture_size(picture)
    factor = min(1.0, max_side / max(width, height))
    if factor == 1.0:
        return picture_region(picture, (0, 0, width, height)), 1.0, 1.0
    new_w, new_h = max(round(width * factor), 1), max(round(height * factor), 1)
    if isinstance(picture, torch.Tensor):
        small = torch.nn.functional.interpolate(
            picture.float(), size=(new_h, new_w), mode="bilinear", antialias=True
        )
    else:
        small = pil_to_tensor(picture.resize((new_w, new_h), Image.Resampling.LANCZOS))
    return small, new_w / width, new_h / height


# bytes a pixel of a restore's pictures: each input kept in 8 bits (3), the edited picture's copy
# that takes the paste (3), and while a file is decoded, its decoder's buffer (4, RGBA at most)
PICTURE_BYTES, OUTPUT_BYTES, DECODE_BYTES = 3, 3, 4


def picture_memory(sizes: list[tuple[int, int]]) -> int:
    """Bytes a restore holds for its pictures at its peak, from their (width, height): the inputs
    (the edited picture last), one output copy of the edited picture, one decode at a time."""
    pixels = [w * h for w, h in sizes]
    return PICTURE_BYTES * sum(pixels) + OUTPUT_BYTES * pixels[-1] + DECODE_BYTES * max(pixels)


def memory_note(sizes: dict[str, tuple[int, int]], threshold: int = Image.MAX_IMAGE_PIXELS) -> str:
    """A note for pictures past PIL's decompression-bomb warning: what the run keeps of them."""
    big = {name: wh for name, wh in sizes.items() if wh[0] * wh[1] > threshold}
    if not big:
        return ""
    listed = ", ".join(f"{name} {w}×{h} ({w * h / 1e6:.0f} Mpx)" for name, (w, h) in big.items())
    return (
        f"large pictures: {listed}; each is kept once in 8 bits (3 bytes a pixel) and only the "
        "patch around each face is restored and pasted back"
    )
