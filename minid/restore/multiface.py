"""The face-patch path: one or several faces (paper A.16), each registered and restored in a square
patch around it, pasted back into the edited image.

For every face pair (the most confident face of each image, or every face of both paired by
position with `faces="all"`):
1. registration (`minid.restore.registration`): the similarity R, edited-image px → original px,
   from the five keypoints, its residual checked against a bound before any diffusion model loads;
2. one shared frame: the square around the original's face (and the edit's face mapped into the
   original by R), `FacePatchConfig.scale` × its longer side, resized to the working size. The
   original is warped into it by A_O (original → patch), the edit by A_E = A_O ∘ R, so the two
   faces coincide position by position, as Stage 1's mixing and Eq. 7's copies need, even when the
   edit re-framed, rescaled or rotated the photo;
3. all patches are restored in one batch (`EditedID.restore_checked` / `restore_batch`);
4. each restored patch goes back into the edited image through A_E⁻¹ and a feathered mask (the
   blended region of Stage 3, M_O ∪ M_E, softened and ramped to 0 at the patch border). Every pixel
   outside it stays the edited image's, bit for bit, and the picture keeps its resolution.

`plan_faces` does 1-2 and every check (faces, registration, prompts, words, masks) before any
diffusion model is needed; `restore_planned` does 3-4; `restore_faces` is both. Pictures are read
once and kept in 8 bits (`images.read_picture`); detection sees a copy at most
`FacePatchConfig.detect_max_side` px long, and the warps and the paste touch only each patch's
footprint, so a 100 Mpx photo costs its 8-bit copies, not a float image of it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from minid.imaging import crops, images, masks, metrics
from minid.restore import registration as reg
from minid.restore.inputs import CheckedPair, RestorePair, analyze, check_pair
from minid.restore.pipeline import EditedID, RestoreResult


@dataclass(frozen=True)
class FacePatchConfig:
    """Where each face's square patch lies, how it goes back, and how faces are found and
    registered. Lengths of the paste are fractions of the working size, so a setting means the same
    on the tests' 64² squares as on SD's 512²."""

    scale: float = 2.0  # side of a face's square patch / longer side of the pair's box union
    min_iou: float = 0.3  # an original's and an edit's face pair when their boxes overlap this much
    # σ of the paste-back mask's soft edge and width of its ramp to the patch border
    paste_feather: float = 1 / 64
    # the largest registration residual accepted (fraction of the eye distance); None: unchecked
    max_residual: float | None = reg.MAX_RESIDUAL
    detect_max_side: int = 2048  # the detector sees the picture shrunk to this longer side


# --------------------------------------------------------------------------------------------------
# Plan and results


@dataclass
class FacePlan:
    """Every face pair checked and framed, ready to restore (`plan_faces`)."""

    jobs: list[CheckedPair]  # one per pair: the two patches, masks, prompts, words
    pairing: crops.FacePairing  # pairs used, and faces left unpaired (analyzer order)
    faces_original: list  # the original's faces, in its pixels
    faces_edited: list  # the edited image's faces, in its pixels
    squares: list[tuple[float, float, float, float]]  # each patch's square in the original
    affines_original: list[np.ndarray]  # 2×3, original → patch
    affines_edited: list[np.ndarray]  # 2×3, edited → patch (A_O ∘ R)
    registrations: list[reg.Registration]
    edited: images.Picture  # the edited picture, kept once for the paste
    names: tuple[str, str]  # the two images as the messages name them
    notes: list[str] = field(default_factory=list)


@dataclass
class FaceRestoration:
    """One restored face of `restore_faces`."""

    # (index in the original's faces, index in the edited image's), analyzer order
    pair: tuple[int, int]
    # the square patch in the original's coordinates (left, top, right, bottom)
    box: tuple[float, float, float, float]
    affine: np.ndarray  # 2×3, edited image → patch: where the patch goes back
    # the patch's restoration: patch-sized image, reconstructions, masks, w schedule
    result: RestoreResult
    # (S, S) in patch coordinates: where the restored patch replaced the edit
    paste_mask: torch.Tensor
    registration: reg.Registration | None = None
    # the box around the square in the edited image's coordinates (the most the paste can touch)
    box_edited: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    id_sim_before: float | None = None  # ArcFace cosine, original face vs edited face
    id_sim_after: float | None = None  # original face vs the face at the same place in the result

    @property
    def psnr(self) -> dict[str, float]:
        """Reconstruction PSNRs of the patch (Stage 2), dB."""
        return self.result.psnr


@dataclass
class FacesResult:
    # the edited picture with every restored face pasted back: an 8-bit PIL image for file and PIL
    # inputs, a (1, 3, H, W) tensor in [-1, 1] for tensor inputs
    image: images.Picture
    faces: list[FaceRestoration]
    pairing: crops.FacePairing  # pairs used, and faces left unpaired
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of the one batch

    @property
    def pil(self):
        if isinstance(self.image, torch.Tensor):
            return images.tensor_to_pil(self.image)
        return self.image


# --------------------------------------------------------------------------------------------------
# Geometry of faces


def map_face(face, affine: np.ndarray):
    """A copy of a face with its box, keypoints, landmarks (and dlib's points) mapped by an affine
    (index coordinates; the box through its corners, as pixel edges, to the box around them)."""
    out = copy.copy(face)
    for name in ("kps", "landmarks_106", "parts"):
        points = getattr(face, name, None)
        if points is not None:
            setattr(out, name, crops.apply_affine(points, affine))
    x0, y0, x1, y1 = np.asarray(face.box, dtype=np.float64)
    corners = crops.apply_affine(np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) - 0.5, affine)
    out.box = np.concatenate([corners.min(0), corners.max(0)]) + 0.5
    return out


def _find_faces(analyzer, picture: images.Picture, name: str, max_side: int) -> list:
    """The analyzer's faces of a picture in its own pixels, detected on `images.detection_view`."""
    view, fx, fy = images.detection_view(picture, max_side)
    found = analyze(analyzer, view, name)
    if (fx, fy) == (1.0, 1.0):
        return list(found)
    back = np.array([[1 / fx, 0.0, 0.5 / fx - 0.5], [0.0, 1 / fy, 0.5 / fy - 0.5]])
    return [map_face(f, back) for f in found]


def pair_registered(
    faces_o: list,
    faces_e: list,
    min_iou: float,
    pairs: list[tuple[int, int]] | None = None,
    size_o: tuple[int, int] | None = None,
    size_e: tuple[int, int] | None = None,
) -> crops.FacePairing:
    """Pair the faces of an original and an edit that may have re-framed it (shifted, rescaled,
    rotated, re-cropped to another aspect ratio): every pair (i, j) proposes the similarity from
    j's keypoints onto i's; the edit's boxes are mapped into the original by each proposal (and,
    as one more, by the image-relative coordinates of `crops.pair_faces`), paired by IoU ≥
    `min_iou`, and the proposal that pairs the most faces (then the highest total IoU) wins — a
    RANSAC over the N·M proposals that finds the one framing most faces share. `pairs`: the user's
    choice, taken as it is."""
    boxes_o = np.stack([f.box for f in faces_o])
    boxes_e = np.stack([f.box for f in faces_e])
    if pairs is not None:
        return crops.pair_faces(boxes_o, boxes_e, min_iou=min_iou, pairs=pairs)
    best, best_key = None, None

    def consider(pairing: crops.FacePairing, iou: np.ndarray) -> None:
        nonlocal best, best_key
        key = (len(pairing.pairs), float(sum(iou[i, j] for i, j in pairing.pairs)))
        if best_key is None or key > best_key:
            best, best_key = pairing, key

    relative = crops.pair_faces(boxes_o, boxes_e, min_iou, size_a=size_o, size_b=size_e)
    if size_o is not None and size_e is not None:
        scale = np.array([size_o[0] / size_e[0], size_o[1] / size_e[1]] * 2)
        consider(relative, crops.box_iou(boxes_o, boxes_e * scale))
    else:
        consider(relative, crops.box_iou(boxes_o, boxes_e))
    for i, face_o in enumerate(faces_o):
        for j, face_e in enumerate(faces_e):
            try:
                affine = crops.estimate_similarity(np.asarray(face_e.kps), np.asarray(face_o.kps))
            except (ValueError, np.linalg.LinAlgError):  # coinciding keypoints: no proposal
                continue
            mapped = np.stack([map_face(f, affine).box for f in faces_e])
            consider(crops.pair_faces(boxes_o, mapped, min_iou), crops.box_iou(boxes_o, mapped))
    return best


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


def _element_mask(mask, size: tuple[int, int], name: str) -> torch.Tensor | images.Picture:
    """An element mask in the edited image's pixels: a tensor (H, W) in [0, 1] as it is, a file
    read as 8-bit grey (EXIF applied) and checked to be the edited image's size."""
    if isinstance(mask, torch.Tensor):
        m = mask.float().reshape(1, 1, *mask.shape[-2:])
    else:
        from PIL import ImageOps

        img, path = images.open_image(mask)
        grey = ImageOps.exif_transpose(img).convert("L")
        m = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None, None]
    if tuple(m.shape[-2:]) != (size[1], size[0]):
        raise ValueError(
            f"the element mask {name} is {m.shape[-1]}×{m.shape[-2]} px but the edited image is "
            f"{size[0]}×{size[1]}; give the mask at the edited image's size"
        )
    return m


# --------------------------------------------------------------------------------------------------
# The path


def plan_faces(
    original,
    edited,
    analyzer,
    config,
    tokenizer,
    prompt_original: str | list[str],
    prompt_edited: str | list[str],
    id_words: list[str] | list[list[str]],
    element_words: list[str] | list[list[str]],
    pairs: list[tuple[int, int]] | None = None,
    faces: Literal["main", "all"] = "all",
    patches: FacePatchConfig = FacePatchConfig(),
    element_masks=None,
    lambda_o: float | list[float | None] | None = None,
    regions=None,
    seed: int = 0,
) -> FacePlan:
    """Steps 1-2 of the module docstring, and every check of the pairs, before any diffusion model
    runs: the faces of both images, their pairing (`faces="main"`: the most confident face of each;
    `"all"`: every face, paired by position in image-relative coordinates, or the user's `pairs`
    [(index in the original, index in the edited image), …]), each pair registered (one ValueError
    naming both images when the residual passes `patches.max_residual`) and framed, its patches,
    face (in patch coordinates, for the landmark mask or the regions) and element mask made, and
    its prompts and words checked (`check_pair`). `config`: the `RestoreConfig` of the method
    that will run it; `tokenizer`: its tokenizer. Images: paths, PIL images or (1, 3, H, W) tensors
    in [-1, 1], of any sizes. element_masks: one per pair, in the edited image's pixels (None: the
    cross-attention maps). Prompts, words, λ_O: one for all pairs or one per pair.
    """
    s = config.image_size
    pic_o, path_o = images.read_picture(original, "original")
    pic_e, path_e = images.read_picture(edited, "edited")
    name_o = f"the original image {path_o if path_o is not None else '(tensor)'}"
    name_e = f"the edited image {path_e if path_e is not None else '(tensor)'}"
    size_o, size_e = images.picture_size(pic_o), images.picture_size(pic_e)
    notes = [n for n in [images.memory_note({name_o: size_o, name_e: size_e})] if n]
    faces_o = _find_faces(analyzer, pic_o, name_o, patches.detect_max_side)
    faces_e = _find_faces(analyzer, pic_e, name_e, patches.detect_max_side)
    if faces == "main" and pairs is None:
        best_o = max(range(len(faces_o)), key=lambda i: faces_o[i].score)
        best_e = max(range(len(faces_e)), key=lambda j: faces_e[j].score)
        pairs = [(best_o, best_e)]
    pairing = pair_registered(faces_o, faces_e, patches.min_iou, pairs, size_o, size_e)
    if not pairing.pairs:
        raise ValueError(
            f"no face of {name_o} overlaps one of {name_e} by IoU ≥ {patches.min_iou} "
            f"({len(faces_o)} and {len(faces_e)} faces, in image-relative coordinates); pick "
            "the pairs with --pairs I:J (Python: pairs=[(i, j), …])"
        )
    if faces == "all":
        notes.append(pairing.describe())
    n = len(pairing.pairs)
    prompts_o = _each(prompt_original, n, "prompt_original")
    prompts_e = _each(prompt_edited, n, "prompt_edited")
    ids = _each(id_words, n, "id_words", words=True)
    elements = _each(element_words, n, "element_words", words=True)
    lambdas = _each(lambda_o, n, "lambda_o")
    element_masks = [None] * n if element_masks is None else _each(element_masks, n, "masks")
    backend = reg.backend_name(analyzer)
    sources = [p for p in (path_o, path_e) if p is not None]
    sources += [Path(m) for m in element_masks if isinstance(m, (str, Path))]

    jobs, squares, affines_o, affines_e, registrations = [], [], [], [], []
    for k, (i, j) in enumerate(pairing.pairs):
        registration = reg.register(faces_o[i], faces_e[j], backend)
        if patches.max_residual is not None:
            reg.check_registration(registration, (name_o, name_e), patches.max_residual)
        # the square around the original's face and the edit's face mapped into the original
        mapped_e = map_face(faces_e[j], registration.affine)
        box = np.concatenate(
            [
                np.minimum(faces_o[i].box[:2], mapped_e.box[:2]),
                np.maximum(faces_o[i].box[2:], mapped_e.box[2:]),
            ]
        )
        left, top, side = crops.square_around(box, patches.scale)
        affine_o = crops.square_affine(left, top, side, s)
        affine_e = crops.compose_affine(affine_o, registration.affine)
        patch_o = images.warp_picture(pic_o, affine_o, s)
        patch_e = images.warp_picture(pic_e, affine_e, s)
        element_mask = element_masks[k]
        if element_mask is not None:
            full = _element_mask(element_mask, size_e, f"of pair {k}" if n > 1 else "")
            element_mask = crops.warp(full[0], affine_e, s, border="zeros").clamp(0, 1)[0]
        job = check_pair(
            RestorePair(
                patch_o,
                patch_e,
                prompts_o[k],
                prompts_e[k],
                ids[k],
                elements[k],
                element_mask=element_mask,
                lambda_o=lambdas[k],
                seed=seed,
                regions=regions,
            ),
            tokenizer,
            config,
            f"pair {k}: " if n > 1 else "",
        )
        job.face = map_face(faces_o[i], affine_o)
        job.sources = list(sources)
        job.registration = registration.to_dict()
        job.notes.append(
            f"face {i} of the original and face {j} of the edit registered ({registration.points}, "
            f"{backend}): scale {registration.scale:.3f}, rotation "
            f"{registration.rotation_deg:.1f}°, residual {registration.residual_px:.2f} px; "
            f"patch: a {side:.0f}-px square of the original at ({left:.0f}, {top:.0f})"
        )
        jobs.append(job)
        squares.append((left, top, left + side, top + side))
        affines_o.append(affine_o)
        affines_e.append(affine_e)
        registrations.append(registration)
    return FacePlan(
        jobs=jobs,
        pairing=pairing,
        faces_original=faces_o,
        faces_edited=faces_e,
        squares=squares,
        affines_original=affines_o,
        affines_edited=affines_e,
        registrations=registrations,
        edited=pic_e,
        names=(name_o, name_e),
        notes=notes,
    )


def restore_planned(
    restorer: EditedID,
    plan: FacePlan,
    analyzer=None,
    progress: bool = True,
    save_intermediates: str | Path | None = None,
    overwrite: bool = False,
    patches: FacePatchConfig = FacePatchConfig(),
) -> FacesResult:
    """Steps 3-4 of the module docstring for a `plan_faces` plan: the patches restored in one batch
    (one pair: `restore_checked`, intermediates straight into `save_intermediates`; K pairs:
    `restore_batch`, one sub-folder each), pasted back into the edited picture. With an `analyzer`
    whose faces carry embeddings, ID-Sim before and after is measured per face."""
    s = restorer.config.image_size
    if len(plan.jobs) == 1:
        results = [
            restorer.restore_checked(
                plan.jobs[0], progress, save_intermediates, None, plan.names[0], overwrite
            )
        ]
    else:
        results = restorer.restore_batch(plan.jobs, progress, save_intermediates, None, overwrite)

    out = plan.edited
    width = patches.paste_feather * s
    ramp = crops.border_ramp(s, width)
    paste_masks = []
    for result, affine in zip(results, plan.affines_edited):
        region = masks.to_resolution(result.masks["blend"], s, how="nearest")[0, 0]  # (S, S)
        m = masks.feather(region, width) * ramp
        paste_masks.append(m)
        out = images.paste_into_picture(out, result.image, affine, m)

    notes = list(plan.notes)
    faces_o, faces_e = plan.faces_original, plan.faces_edited
    after_of, after_faces = {}, None
    measure = analyzer is not None and all(
        faces_o[i].embedding is not None and faces_e[j].embedding is not None
        for i, j in plan.pairing.pairs
    )
    if measure:
        after_faces = _find_faces(analyzer, out, "the result", patches.detect_max_side)
        after_of = dict(
            crops.pair_faces(
                np.stack([f.box for f in faces_e]),
                np.stack([f.box for f in after_faces]),
                min_iou=patches.min_iou,
            ).pairs
        )
    elif analyzer is not None:
        notes.append("no ArcFace embeddings from the analyzer: ID-Sim not measured")
    per_face = []
    for k, (i, j) in enumerate(plan.pairing.pairs):
        before = after = None
        if measure:
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
                box=plan.squares[k],
                affine=plan.affines_edited[k],
                box_edited=crops.patch_box(plan.affines_edited[k], s),
                result=results[k],
                paste_mask=paste_masks[k],
                registration=plan.registrations[k],
                id_sim_before=before,
                id_sim_after=after,
            )
        )
    return FacesResult(
        image=out, faces=per_face, pairing=plan.pairing, notes=notes, timings=results[0].timings
    )


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
    faces: Literal["main", "all"] = "all",
    regions=None,
    save_intermediates: str | Path | None = None,
    overwrite: bool = False,
) -> FacesResult:
    """Restore the faces of a photo, one or many, in one batch: `plan_faces` then `restore_planned`
    (see the module docstring). `analyzer`: anything with `analyze(image) -> list[faces.Face]`
    (e.g. `faces.FaceAnalyzer`, `faces.dlib_backend.DlibFaceAnalyzer`). Returns the pasted image,
    per-face results (square, pair, registration, PSNRs, ID-Sim before and after when the analyzer
    gives embeddings) and notes."""
    plan = plan_faces(
        original,
        edited,
        analyzer,
        restorer.config,
        restorer.sd.tokenizer,
        prompt_original,
        prompt_edited,
        id_words,
        element_words,
        pairs=pairs,
        faces=faces,
        patches=patches,
        element_masks=element_masks,
        lambda_o=lambda_o,
        regions=regions,
        seed=seed,
    )
    return restore_planned(
        restorer, plan, analyzer, progress, save_intermediates, overwrite, patches
    )
