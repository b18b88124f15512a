"""Several people in one photo (paper A.16): detect and pair the faces of both images, restore a
square patch around each pair in one batch, paste the patches back.

`restore_faces(EditedID(sd), original, edited, analyzer, prompts, words)` runs it; the patch
geometry is its own config, `FacePatchConfig`. Every pixel outside the pasted regions stays the
edited image's, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minid.imaging import crops, images, masks, metrics
from minid.restore.inputs import RestorePair, analyze, landmark_face_mask
from minid.restore.pipeline import EditedID, RestoreResult


@dataclass(frozen=True)
class FacePatchConfig:
    """Where each face's square patch lies and how it goes back. Lengths are fractions of the
    working size, so a setting means the same on the tests' 64² squares as on SD's 512²."""

    scale: float = 2.0  # side of a face's square patch / longer side of the pair's box union
    min_iou: float = 0.3  # an original's and an edit's face pair when their boxes overlap this much
    # σ of the paste-back mask's soft edge and width of its ramp to the patch border
    paste_feather: float = 1 / 64


# --------------------------------------------------------------------------------------------------
# Several faces: inputs and results


@dataclass
class FaceRestoration:
    """One restored face of `restore_faces`."""

    # (index in the original's faces, index in the edited image's), analyzer order
    pair: tuple[int, int]
    # the square patch in image coordinates (left, top, right, bottom)
    box: tuple[float, float, float, float]
    affine: np.ndarray  # 2×3, image → patch (`crops.crop_square`)
    # the patch's restoration: patch-sized image, reconstructions, masks, w schedule
    result: RestoreResult
    # (S, S) in patch coordinates: where the restored patch replaced the edit
    paste_mask: torch.Tensor
    id_sim_before: float | None = None  # ArcFace cosine, original face vs edited face
    id_sim_after: float | None = None  # original face vs the face at the same place in the result

    @property
    def psnr(self) -> dict[str, float]:
        """Reconstruction PSNRs of the patch (Stage 2), dB."""
        return self.result.psnr


@dataclass
class FacesResult:
    # (1, 3, H, W) in [-1, 1]: the edited image with every restored face pasted back
    image: torch.Tensor
    faces: list[FaceRestoration]
    pairing: crops.FacePairing  # pairs used, and faces left unpaired
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of the one batch

    @property
    def pil(self):
        return images.tensor_to_pil(self.image)


def _full_image(image, name: str) -> tuple[torch.Tensor, str]:
    """A whole picture (no square crop) as (1, 3, H, W) float32 in [-1, 1], and a name for
    messages."""
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image.unsqueeze(0)
        if x.dim() != 4 or x.shape[:2] != (1, 3):
            raise ValueError(
                f"the {name} image tensor must be (1, 3, H, W) in [-1, 1]; found "
                f"{tuple(image.shape)}"
            )
        return x.float(), "(tensor)"
    from PIL import Image

    if isinstance(image, Image.Image):
        return images.pil_to_tensor(images.to_rgb(image)), "(PIL image)"
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(
            f"the {name} image {path} was not found; give the path of a PNG or JPEG"
        )
    with Image.open(path) as img:
        return images.pil_to_tensor(images.to_rgb(img)), str(path)


def _each(value, n: int, name: str, words: bool = False) -> list:
    """One value for every face pair, or a list of one per pair. Words: a list of words for every
    pair, or a list of such lists."""
    if words:
        if value and all(isinstance(v, (list, tuple)) for v in value):
            if len(value) != n:
                raise ValueError(
                    f"{name} has {len(value)} word lists for {n} face pairs; give one "
                    "list for all faces or one per pair"
                )
            return [list(v) for v in value]
        return [list(value)] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"{name} has {len(value)} entries for {n} face pairs; give one value "
                "for all faces or one per pair"
            )
        return list(value)
    return [value] * n


def restore_faces(
    restorer: EditedID,
    original,
    edited,
    analyzer,
    prompt_original: str | list[str],
    prompt_edited: str | list[str],
    id_words: list[str] | list[list[str]],
    element_words: list[str] | list[list[str]],
    pairs: list[tuple[int, int]] | None = None,
    patches: FacePatchConfig = FacePatchConfig(),
    element_masks=None,
    lambda_o: float | list[float | None] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> FacesResult:
    """Restore every face of a multi-person photo in one batch.

    1. the analyzer (anything with `analyze(image) -> list[faces.Face]`) finds the faces of both
       images; they are paired by position (`crops.pair_faces`, box IoU ≥ `min_iou`), or by the
       user's `pairs` [(index in the original, index in the edited image), …] in the analyzer's
       order;
    2. each pair gets one square patch (the same square in both images: `patch_scale` × the longer
       side of the union of the two boxes), resized to `image_size`; its face mask is the original
       face's landmark mask (`landmark_face_mask`), its element mask the cross-attention mask of the
       element words, or `element_masks[k]` ((H, W) in the edited image's coordinates, None for
       attention);
    3. all patches are restored in one batch (`restore_batch`);
    4. each restored patch goes back into the edited image through a feathered mask: the blended
       region of Stage 3 (M_O ∪ M_E, dilated) softened by `paste_feather` and ramped to 0 at the
       patch border. Every pixel outside it stays the edited image's, bit for bit.

    Images: paths, PIL images or (1, 3, H, W) tensors in [-1, 1] of one size. Prompts: one string
    for all faces or one per pair (in pair order); words: one list for all or one list per pair;
    lambda_o: one value or one per pair. Returns the image, per-face results (square, pair, PSNRs,
    ID-Sim before and after when the analyzer gives embeddings) and notes.
    """
    s = restorer.config.image_size
    min_iou, patch_scale = patches.min_iou, patches.scale
    notes: list[str] = []
    x_o, name_o = _full_image(original, "original")
    x_e, name_e = _full_image(edited, "edited")
    if x_o.shape != x_e.shape:
        raise ValueError(
            f"the original {name_o} is {x_o.shape[-1]}×{x_o.shape[-2]} (w×h) but the "
            f"edited {name_e} is {x_e.shape[-1]}×{x_e.shape[-2]}; give both at one size (resize "
            f"the "
            "edited image to the original's)"
        )
    faces_o = analyze(analyzer, x_o, f"the original image {name_o}")
    faces_e = analyze(analyzer, x_e, f"the edited image {name_e}")
    pairing = crops.pair_faces(
        np.stack([f.box for f in faces_o]),
        np.stack([f.box for f in faces_e]),
        min_iou=min_iou,
        pairs=pairs,
    )
    if not pairing.pairs:
        raise ValueError(
            f"no face of the original {name_o} overlaps one of the edited {name_e} by "
            f"IoU ≥ {min_iou} ({len(faces_o)} and {len(faces_e)} faces); pick the pairs with "
            "pairs=[(i, j), …] or lower min_iou"
        )
    notes.append(pairing.describe())
    n = len(pairing.pairs)
    prompts_o = _each(prompt_original, n, "prompt_original")
    prompts_e = _each(prompt_edited, n, "prompt_edited")
    ids = _each(id_words, n, "id_words", words=True)
    elements = _each(element_words, n, "element_words", words=True)
    lambdas = _each(lambda_o, n, "lambda_o")
    element_masks = [None] * n if element_masks is None else list(element_masks)
    if len(element_masks) != n:
        raise ValueError(f"element_masks has {len(element_masks)} entries for {n} face pairs")

    jobs_in, squares, affines = [], [], []
    for k, (i, j) in enumerate(pairing.pairs):
        box = np.concatenate(
            [
                np.minimum(faces_o[i].box[:2], faces_e[j].box[:2]),
                # union of the two boxes
                np.maximum(faces_o[i].box[2:], faces_e[j].box[2:]),
            ]
        )
        patch_o, affine = crops.crop_square(x_o[0], box, scale=patch_scale, size=s)  # (3, S, S)
        patch_e = crops.warp(x_e[0], affine, s, border="replicate")  # the same square of the edit
        face_mask, how = landmark_face_mask(faces_o[i], restorer.config, affine)
        element_mask = element_masks[k]
        if element_mask is not None:
            em = element_mask.float().reshape(1, *element_mask.shape[-2:])
            element_mask = crops.warp(em, affine, s, border="zeros").clamp(0, 1)  # (1, S, S)
        left, top, side = crops.square_around(box, patch_scale)
        squares.append((left, top, left + side, top + side))
        affines.append(affine)
        jobs_in.append(
            RestorePair(
                patch_o[None],
                patch_e[None],
                prompts_o[k],
                prompts_e[k],
                ids[k],
                elements[k],
                face_mask=face_mask,
                element_mask=element_mask,
                lambda_o=lambdas[k],
                seed=seed,
            )
        )
        notes.append(
            f"face pair {k} {(i, j)}: square ({left:.1f}, {top:.1f}) side {side:.1f}; face mask "
            f"from {how}"
        )
    results = restorer.restore_batch(jobs_in, progress=progress)

    out = x_e.clone()
    width = patches.paste_feather * s
    ramp = crops.border_ramp(s, width)
    paste_masks = []
    for result, affine in zip(results, affines):
        region = masks.to_resolution(result.masks["blend"], s, how="nearest")[0, 0]  # (S, S)
        m = masks.feather(region, width) * ramp
        paste_masks.append(m)
        out = crops.paste_back(out, result.image, affine, mask=m)

    per_face = []
    after_faces = None
    if all(
        faces_o[i].embedding is not None and faces_e[j].embedding is not None
        for i, j in pairing.pairs
    ):
        after_faces = analyzer.analyze(((out[0] + 1) / 2).clamp(0, 1))
        boxes_after = np.stack([f.box for f in after_faces]) if after_faces else np.zeros((0, 4))
        after_of = dict(
            crops.pair_faces(np.stack([f.box for f in faces_e]), boxes_after, min_iou=min_iou).pairs
        )
    else:
        notes.append("no ArcFace embeddings from the analyzer: ID-Sim not measured")
    for k, (i, j) in enumerate(pairing.pairs):
        before = after = None
        if after_faces is not None:
            before = float(metrics.id_similarity(faces_o[i].embedding, faces_e[j].embedding))
            if j in after_of and after_faces[after_of[j]].embedding is not None:
                after = float(
                    metrics.id_similarity(faces_o[i].embedding, after_faces[after_of[j]].embedding)
                )
            else:
                notes.append(
                    f"face pair {k}: no face found at its place in the result; ID-Sim after not "
                    f"measured"
                )
        per_face.append(
            FaceRestoration(
                pair=(i, j),
                box=squares[k],
                affine=affines[k],
                result=results[k],
                paste_mask=paste_masks[k],
                id_sim_before=before,
                id_sim_after=after,
            )
        )
    return FacesResult(
        image=out, faces=per_face, pairing=pairing, notes=notes, timings=results[0].timings
    )
