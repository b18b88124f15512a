"""What a restore takes in: a pair of pictures with their prompts, words and masks, checked and
loaded before any heavy work (`check_pair`), and the face masks drawn from an analyzer's landmarks.

Images: paths, PIL images or (1, 3, S, S) tensors in [-1, 1]; masks: paths or tensors
(masks.load_mask). Every check raises one clear error naming the field, the expected and the found
value.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import PIL.Image
import torch

from minid.imaging import crops, images, masks
from minid.method.editedid import PairText, Tokens
from minid.models.tokenizer import prompt_note, shortened

if TYPE_CHECKING:
    from minid.restore.config import RestoreConfig

# Where a face mask comes from when none is given: the original's face landmarks (a face analyzer),
# or the cross-attention maps of the identity words.
MASK_SOURCES = ("landmarks", "attention")


@dataclass
class RestorePair:
    """One (original, edited) pair of a batched restore, with everything that may differ between
    pairs.

    Images: paths, PIL images or (1, 3, S, S) tensors in [-1, 1]; masks: as `EditedID.restore` takes
    them.
    """

    original: object
    edited: object
    prompt_original: str
    prompt_edited: str
    id_words: list[str]
    element_words: list[str]
    face_mask: object = None
    element_mask: object = None
    # weight of O where M_O and M_E overlap; None: the config's; λ_E = 1 − λ_O
    lambda_o: float | None = None
    seed: int = 0  # seeds this pair's posterior sample (config.sample_posterior)
    # ConsistentID's fine-grained regions instead of one face mask:
    # "eyes=original,mouth=edited:0.7", a dict of the same or a JSON file (regions.parse_regions);
    # needs a face analyzer (the 106 landmarks)
    regions: object = None


@dataclass
class CheckedPair:
    """A checked pair, ready to run: images at working size, masks (or None), prompts and token
    positions."""

    x_o: torch.Tensor  # (1, 3, S, S)
    x_e: torch.Tensor
    sources: list  # the files the inputs were read from (never overwritten)
    mask_o: torch.Tensor | None  # (1, 1, S, S) or None: from the cross-attention maps
    mask_e: torch.Tensor | None
    pair: RestorePair
    text: PairText
    notes: list[str]
    regions: dict | None = None  # the parsed region choices
    keep_e: torch.Tensor | None = None  # (1, 1, S, S) regions kept from E exactly
    lambda_map: torch.Tensor | None = None  # (1, 1, S, S) λ_O per pixel
    # the original's face (faces.Face) when an analyzer ran, for the region report
    face: object = None
    # where each working square came from in its picture (None for a tensor input); the picture
    # itself is kept (8-bit) for the paste-back, so no input is decoded twice
    frames: tuple = (None, None)
    # the face-patch path's registration of the edit onto the original (`Registration.to_dict`)
    registration: dict | None = None


def analyze(analyzer, x: torch.Tensor, name: str) -> list:
    """The analyzer's faces of a (1, 3, H, W) image in [-1, 1] (given to it as (3, H, W) in [0,
    1])."""
    found = analyzer.analyze(((x[0].float() + 1) / 2).clamp(0, 1))
    if not found:
        raise ValueError(
            f"the face analyzer found no face in {name}; check that the face is visible and not "
            f"tiny, "
            "give a face mask, or restore without an analyzer (the face mask then comes from the "
            "cross-attention maps)"
        )
    return found


# --------------------------------------------------------------------------------------------------
# Checks, before any heavy work


def check_text(
    pair: RestorePair, tokenizer, config: RestoreConfig, name: str = ""
) -> tuple[PairText, list[str]]:
    """The checks of a pair's prompts and words (no image read); returns the token positions and the
    notes. `name` prefixes the messages (e.g. "pair 2: ")."""
    method = config.method
    notes: list[str] = []
    for what, p in (
        ("prompt_original", pair.prompt_original),
        ("prompt_edited", pair.prompt_edited),
    ):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{name}{what} must be a non-empty string, got {p!r}")
        note = prompt_note(tokenizer, p, f"{name}{what}")
        if note:
            notes.append(note)
    if isinstance(pair.id_words, str) or isinstance(pair.element_words, str):
        raise TypeError(
            f"{name}id_words and element_words are lists of words, e.g. ['man'], ['glasses']"
        )
    if not pair.id_words:
        raise ValueError(f"{name}give at least one identity word (e.g. 'man', 'face') in id_words")
    prompt_t = pair.prompt_original if method.target == "original" else pair.prompt_edited
    id_positions = word_positions(tokenizer, pair.prompt_original, pair.id_words, "identity")
    word_positions(tokenizer, prompt_t, pair.id_words, "identity")
    element_positions = word_positions(tokenizer, pair.prompt_edited, pair.element_words, "element")
    word_positions(tokenizer, prompt_t, pair.element_words, "element")
    tokens = Tokens(
        identity=token_pairs(tokenizer, prompt_t, pair.prompt_original, pair.id_words, "identity"),
        element=token_pairs(tokenizer, prompt_t, pair.prompt_edited, pair.element_words, "element"),
    )
    return PairText(id_positions, element_positions, tokens), notes


def check_settings(pair: RestorePair, name: str = "") -> None:
    """The checks of what a pair asks for besides its text and pictures: the element region, λ,
    regions."""
    if pair.element_mask is None and not pair.element_words:
        raise ValueError(
            f"{name}with no element_mask, element_words must name the edited elements (their "
            "cross-attention maps give the element region)"
        )
    if pair.lambda_o is not None and not 0 <= pair.lambda_o <= 1:
        raise ValueError(f"{name}lambda_o must be in [0, 1], got {pair.lambda_o}")
    if pair.regions is not None and pair.face_mask is not None:
        raise ValueError(
            f"{name}give either a face mask or regions (which make the face mask), not both"
        )


def check_pair(pair: RestorePair, tokenizer, config: RestoreConfig, name: str = "") -> CheckedPair:
    """Every check of one pair, before any heavy work (`check_text`, then the images and masks,
    decoded here once): the `CheckedPair` the pipeline takes as it is. `name` prefixes the
    messages."""
    text, notes = check_text(pair, tokenizer, config, name)
    x_o, frame_o = _working_image(config.image_size, pair.original, "original")
    x_e, frame_e = _working_image(config.image_size, pair.edited, "edited")
    mask_o = _working_mask(config.image_size, pair.face_mask, "face", frame_o, notes)
    mask_e = _working_mask(config.image_size, pair.element_mask, "element", frame_e, notes)
    check_settings(pair, name)
    sources = [f.source for f in (frame_o, frame_e) if f is not None and f.source is not None]
    # inputs too
    sources += [Path(m) for m in (pair.face_mask, pair.element_mask) if isinstance(m, (str, Path))]
    choices = None
    if pair.regions is not None:
        from minid.faces.regions import parse_regions

        choices = parse_regions(pair.regions)
    return CheckedPair(
        x_o=x_o,
        x_e=x_e,
        sources=sources,
        mask_o=mask_o,
        mask_e=mask_e,
        pair=pair,
        regions=choices,
        text=text,
        notes=notes,
        frames=(frame_o, frame_e),
    )


def _working_image(s: int, image, name: str) -> tuple[torch.Tensor, images.CropFrame | None]:
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image.unsqueeze(0)
        if x.shape[:2] != (1, 3) or x.shape[-2:] != (s, s):
            raise ValueError(
                f"the {name} image tensor must be (1, 3, {s}, {s}) in [-1, 1]; found "
                f"{tuple(image.shape)}. Load files with minid.imaging.images.load_image"
            )
        if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"the {name} image tensor must hold finite floats in [-1, 1]; found dtype "
                f"{x.dtype} with {int((~torch.isfinite(x.float())).sum())} NaN or infinite values"
            )
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.01 or hi > 1.01:  # a little slack for resampling overshoot
            hint = " (0-255 pixels? divide by 127.5 and subtract 1)" if hi > 2 else ""
            raise ValueError(
                f"the {name} image tensor must be in [-1, 1]; found values in [{lo:.3g}, "
                f"{hi:.3g}]{hint}"
            )
        return x.float(), None
    if not isinstance(image, (str, Path, PIL.Image.Image)):
        raise TypeError(
            f"the {name} image must be a file path, a PIL image or a (1, 3, {s}, {s}) tensor in "
            f"[-1, 1]; got {type(image).__name__}"
        )
    return images.load_image(image, size=s)


def _working_mask(s: int, mask, name: str, frame, notes: list[str]) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, (str, Path, torch.Tensor)):
        raise TypeError(
            f"the {name} mask must be a file path or an (H, W) tensor in [0, 1]; got "
            f"{type(mask).__name__}"
        )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = masks.load_mask(
            mask,
            size=s,
            frame=frame if not isinstance(mask, torch.Tensor) else None,
            required=False,
        )
    # a note of the result, and a warning for Python users (the CLI prints notes only)
    for w in caught:
        notes.append(f"{name} mask: {w.message}")
        warnings.warn(str(w.message))
    if float(m.max()) <= 0:
        raise ValueError(
            f"the {name} mask is empty (all zero); give a mask with the region white, or leave it "
            "out to take it from the cross-attention maps"
        )
    return m[None, None]  # (1, 1, S, S)


def word_positions(tokenizer, prompt: str, words: list[str], what: str) -> list[int]:
    out = []
    for w in words:
        try:
            found = tokenizer.token_positions(prompt, w)
        except ValueError as e:
            said = str(e).removeprefix(f"the word {w!r} ")  # "is not in the prompt …"
            raise ValueError(f"{what} word {w!r} {said}") from None
        if not found:  # every occurrence lies past the window the text encoder reads
            raise ValueError(
                f"{what} word {w!r} lies beyond the first {tokenizer.max_content_tokens} tokens of "
                f"the prompt {shortened(prompt)!r}, which are all SD1.4's text encoder reads; move "
                "it earlier or shorten the prompt"
            )
        out += found
    return out


def token_pairs(
    tokenizer, prompt_t: str, prompt_s: str, words: list[str], what: str
) -> list[tuple[int, int]]:
    pairs = []
    for w in words:
        try:
            pos_s, pos_t = tokenizer.align_tokens(prompt_s, prompt_t, w)
        except ValueError as e:
            raise ValueError(f"{what} word {w!r}: {e}") from None
        pairs += list(zip(pos_t, pos_s))
    return pairs


def landmark_face_mask(face, config: RestoreConfig, affine=None) -> tuple[torch.Tensor, str]:
    """M_O from a `faces.Face`: the hull of its 106 landmarks (else the 5-point ellipse), feathered
    by `config.face_mask_feather`, at image size (1, 1, S, S); `affine` maps the face's image to the
    working square (a face patch). Returns the mask and a note saying which landmarks made it."""
    s = config.image_size
    kps, dense = face.kps, face.landmarks_106
    if affine is not None:
        kps = crops.apply_affine(kps, affine)
        dense = None if dense is None else crops.apply_affine(dense, affine)
    m = masks.face_mask(s, kps=kps, landmarks_106=dense)  # (S, S), 0 or 1
    sigma = config.face_mask_feather * s
    m = masks.feather(m, sigma)
    how = "the hull of its 106 landmarks" if dense is not None else "an ellipse on its 5 keypoints"
    return m[None, None], f"{how}, feathered (σ = {sigma:.3g} px)"


def face_masks(job: CheckedPair, analyzer, config: RestoreConfig, tokenizer, name: str) -> None:
    """M_O from the original's largest face when no face mask was given and an analyzer is: its
    landmark mask, or its regions (`RestorePair.regions`: M_O, the kept-from-E mask, λ_O map, region
    words)."""
    if job.regions and analyzer is None and job.face is None:
        raise ValueError(
            "regions need the face landmarks of the original: give a face analyzer "
            "(CLI: the face pack, --face-pack/--face-root or --download-faces)"
        )
    if job.mask_o is not None or (analyzer is None and job.face is None):
        return
    if job.face is None:
        found = analyze(analyzer, job.x_o, name)
        job.face = max(found, key=lambda f: f.area)
        which = f"the original's largest face ({len(found)} found)"
    else:  # the face-patch path found and registered it (`multiface.plan_faces`)
        which = "the original's face"
    if not job.regions:
        job.mask_o, how = landmark_face_mask(job.face, config)
        job.notes.append(f"face mask from {which}: {how}")
        return
    from minid.faces.regions import region_edits, region_masks
    from minid.method.gating import LocalTokens

    s = config.image_size
    region_mask, how = region_masks(
        s, job.face.kps, job.face.landmarks_106, config.face_mask_feather * s
    )
    p = job.pair
    edits = region_edits(
        region_mask,
        job.regions,
        config.method.gating.lambda_o,
        (p.prompt_original, p.prompt_edited),
        tokenizer,
    )
    job.mask_o, job.keep_e, job.lambda_map = edits.face, edits.keep, edits.lambda_o
    prompt_t = p.prompt_original if config.method.target == "original" else p.prompt_edited
    for word, source, mask in edits.local:
        prompt_s = p.prompt_original if source == "original" else p.prompt_edited
        pairs = token_pairs(tokenizer, prompt_t, prompt_s, [word], "region")
        job.text.tokens.local.append(LocalTokens(pairs, 0 if source == "original" else 1, mask))
    chosen = ", ".join(
        f"{r}={c.source}" + ("" if c.lambda_o is None else f":{c.lambda_o}")
        for r, c in job.regions.items()
    )
    words = ", ".join(w for w, _, _ in edits.local) or "none"
    job.notes.append(
        f"regions {chosen} ({how}); region words replaced inside their region: {words}"
    )
