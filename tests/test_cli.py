"""The `minid` command end to end on a tiny random model saved in the published hub layout."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_faces import PACK, red_squares
from tiny_models import IMAGE_SIZE, random_image

from minid.app import cli
from minid.faces.analyzer import FaceAnalyzer
from minid.imaging.images import tensor_to_pil
from minid.imaging.metrics import id_similarity
from minid.restore.config import METHOD_FLAGS, RestoreConfig


def _png(tensor: torch.Tensor, path: Path) -> Path:
    tensor_to_pil(tensor).save(path)
    return path


COMMON = ["--device", "cpu", "--dtype", "fp32", "--seed", "0"]


def test_generate_writes_an_image_of_the_asked_size(tiny_hub, tmp_path):
    out = tmp_path / "gen.png"
    rc = cli.main(
        [
            "generate",
            "--prompt",
            "a photo of a man",
            "--out",
            str(out),
            "--weights",
            str(tiny_hub),
            "--steps",
            "2",
            "--size",
            str(IMAGE_SIZE),
            *COMMON,
        ]
    )
    assert rc == 0 and out.is_file(), f"exit code {rc}, file written: {out.is_file()}"
    assert Image.open(out).size == (IMAGE_SIZE, IMAGE_SIZE), f"size {Image.open(out).size}"


def test_restore_writes_the_result_at_the_edited_image_size(tiny_hub, tmp_path, capsys):
    original = _png(random_image(1), tmp_path / "original.png")
    # The edited image is not square: the result comes back at its own size.
    edited_t = torch.nn.functional.interpolate(random_image(2), size=(IMAGE_SIZE, IMAGE_SIZE + 16))
    edited = _png(edited_t, tmp_path / "edited.png")
    out = tmp_path / "restored.png"
    rc = cli.main(
        [
            "restore",
            "--original",
            str(original),
            "--edited",
            str(edited),
            "--prompt-original",
            "a photo of a man",
            "--prompt-edited",
            "a photo of a man wearing glasses",
            "--id-words",
            "man",
            "--element-words",
            "glasses",
            "--out",
            str(out),
            "--weights",
            str(tiny_hub),
            "--steps",
            "2",
            "--dpm-start",
            "2",
            "--dpm-end",
            "2",
            "--null-inner-steps",
            "1",
            "--image-size",
            str(IMAGE_SIZE),
            "--mask-source",
            "attention",
            "--save-intermediates",
            str(tmp_path / "inter"),
            *COMMON,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out).size == (IMAGE_SIZE + 16, IMAGE_SIZE), f"size {Image.open(out).size}"
    written = {p.name for p in (tmp_path / "inter").iterdir()}
    for name in ("summary.json", "w_schedule.png", "mask_face.png", "reconstruction_original.png"):
        assert name in written, f"{name} missing from the intermediates: {sorted(written)}"
    assert "PSNR" in capsys.readouterr().out


def test_restore_refuses_to_write_over_an_input_before_loading_anything(tmp_path, capsys):
    original = _png(random_image(1), tmp_path / "original.png")
    edited = _png(random_image(2), tmp_path / "edited.png")
    before = edited.read_bytes()
    rc = cli.main(
        [
            "restore",
            "--original",
            str(original),
            "--edited",
            str(edited),
            "--prompt-original",
            "a man",
            "--prompt-edited",
            "a man",
            "--id-words",
            "man",
            "--out",
            str(edited),
            "--weights",
            str(tmp_path / "no-such-weights"),
            *COMMON,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "input" in err, f"exit code {rc}, stderr: {err}"
    assert edited.read_bytes() == before, "the input image was modified"


def test_restore_names_a_file_that_is_not_an_image(tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    good = _png(random_image(2), tmp_path / "edited.png")
    rc = cli.main(
        [
            "restore",
            "--original",
            str(bad),
            "--edited",
            str(good),
            "--prompt-original",
            "a man",
            "--prompt-edited",
            "a man",
            "--id-words",
            "man",
            "--out",
            str(tmp_path / "o.png"),
            "--weights",
            str(tmp_path),
            *COMMON,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "notes.png" in err, f"exit code {rc}, stderr: {err}"


def test_missing_weights_folder_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(
        [
            "generate",
            "--prompt",
            "a man",
            "--out",
            str(tmp_path / "x.png"),
            "--weights",
            str(tmp_path / "absent"),
            *COMMON,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "absent" in err and "download" in err, f"exit code {rc}, stderr: {err}"


def test_eval_writes_the_table(tiny_face_pack, tmp_path, capsys):
    """`minid eval` with the tiny face pack (tiny_faces.py, at the default det_size 640), whose
    detector sees a face in each red square. Triples: "same" (three identical images), "restored"
    (the edit changed the face's green channel; the result is the original again), "noface" (black
    images), and an original alone."""
    # image side; the face is the k×k red square at (x, y), one stride-8 cell
    side, x, y, k = 640, 320, 320, 8
    original = red_squares(side, side, [(x, y, k)])
    edited = original.copy()
    edited[y : y + k, x : x + k, 1] = 128
    blank = np.zeros_like(original)
    folder, out = tmp_path / "eval", tmp_path / "table"
    triples = {
        "same": (original, original, original),
        "restored": (original, edited, original),
        "noface": (blank, blank, blank),
    }
    for role in ("original", "edited", "result"):
        (folder / role).mkdir(parents=True)
    for name, images in triples.items():
        for role, image in zip(("original", "edited", "result"), images):
            Image.fromarray(image).save(folder / role / f"{name}.png")
    Image.fromarray(original).save(folder / "original" / "lonely.png")

    rc = cli.main(
        [
            "eval",
            str(folder),
            "--out",
            str(out),
            "--face-pack",
            PACK,
            "--face-root",
            str(tiny_face_pack),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    # a table and the files it wrote, not a Python dict (issue 23)
    assert "| mean ID-Sim, result vs original |" in printed.out and "{" not in printed.out
    assert f"wrote {out / 'metrics.csv'}, {out / 'metrics.json'}" in printed.out, printed.out
    assert "lonely" in printed.err, "the original without a triple is not said"

    with open(out / "metrics.csv", newline="") as f:
        csv_rows = {r["name"]: r for r in csv.DictReader(f)}
    assert sorted(csv_rows) == ["noface", "restored", "same"], f"csv rows {sorted(csv_rows)}"
    table = json.loads((out / "metrics.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    # identical images: ID-Sim 1 and PSNR inf (written "inf" in the csv, null in the json)
    same = rows["same"]
    assert same["faces_original"] == 1 and same["note"] == "", same
    assert abs(same["id_sim_edited"] - 1) < 1e-9 and abs(same["id_sim_result"] - 1) < 1e-9, same
    assert (
        csv_rows["same"]["psnr_result_edited"] == "inf" and same["psnr_result_edited"] == "inf"
    ), same
    # the edit: ID-Sim of the two faces as the analyzer sees them; the result is the original:
    # ID-Sim 1, and its PSNR to the edited image counts the k² face pixels whose green channel
    # differs by 128
    analyzer = FaceAnalyzer.from_pack(PACK, root=tiny_face_pack)
    drift = id_similarity(
        analyzer.largest_face(original).embedding, analyzer.largest_face(edited).embedding
    )
    mse = k * k * 128**2 / (side * side * 3)
    restored = rows["restored"]
    assert drift < 0.999 and abs(restored["id_sim_edited"] - drift) < 1e-9, (
        f"{restored}, expected ID-Sim {drift}"
    )
    assert abs(restored["id_sim_result"] - 1) < 1e-9, restored
    assert abs(restored["psnr_result_edited"] - 10 * math.log10(255**2 / mse)) < 1e-9, restored
    assert float(csv_rows["restored"]["psnr_result_edited"]) == restored["psnr_result_edited"], (
        csv_rows["restored"]
    )
    # no face: counted, with a note and no ID-Sim
    noface = rows["noface"]
    assert noface["faces_original"] == 0 and noface["note"] == "no face in original", noface
    assert noface["id_sim_edited"] is None and noface["id_sim_result"] is None, noface
    assert csv_rows["noface"]["id_sim_result"] == "", csv_rows["noface"]

    summary = table["summary"]
    assert summary["images"] == 3 and summary["images_with_faces"] == 2, summary
    assert summary["missing"] == ["lonely: no edited or result image"], summary
    assert (
        abs(summary["mean_id_sim_result"] - 1) < 1e-9 and summary["same_person_rate_result"] == 1.0
    ), summary
    # inf (the identical images) is left out of the mean PSNR
    assert summary["mean_psnr_result_edited"] == restored["psnr_result_edited"], summary


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in (
        "demo",
        "restore",
        "calibrate",
        "validate",
        "generate",
        "eval",
        "download",
        "convert",
        "keymap",
    ):
        assert command in text, f"{command} missing from --help"


@pytest.mark.parametrize(
    "command", ["demo", "restore", "calibrate", "validate", "generate", "eval"]
)
def test_every_commands_help_prints_each_default_once(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0, capsys.readouterr().err
    options = capsys.readouterr().out.split("options:")[-1]
    # one per option, its wrapped help joined
    entries = {
        " ".join(e.split()).split(" ")[0]: " ".join(e.split())
        for e in re.split(r"\n(?=  -)", options)
        if e.strip().startswith("-")
    }
    for flag in METHOD_FLAGS if command in ("demo", "restore", "calibrate", "validate") else ():
        shown = entries[flag]
        assert shown.count("default") == 1, f"minid {command} --help, {flag}: {shown!r}"


def test_checkpoint_commands_are_forwarded(capsys):
    assert cli.main(["keymap"]) == 0
    assert "input_blocks" in capsys.readouterr().out


FAST = [
    "--steps",
    "2",
    "--dpm-start",
    "2",
    "--dpm-end",
    "2",
    "--null-inner-steps",
    "1",
    "--image-size",
    str(IMAGE_SIZE),
]


def test_restore_uses_landmark_masks_by_default(tiny_hub, tmp_path, monkeypatch, capsys):
    """No --face-mask: the face models are asked for, and the original's landmark mask is the face
    mask."""
    from test_multiface import StubAnalyzer, make_face

    from minid.faces import analyzer as faces

    x_o, x_e = random_image(1), random_image(2)
    c = IMAGE_SIZE / 2
    stub = StubAnalyzer(
        [
            (x_o, [make_face(c, c, side=IMAGE_SIZE / 2)]),
            (x_e, [make_face(c, c, side=IMAGE_SIZE / 2)]),
        ]
    )
    asked = {}

    def from_pack(cls, pack=None, root=None, download=False, **_):
        asked.update(pack=pack, root=root)
        return stub

    monkeypatch.setattr(faces.FaceAnalyzer, "from_pack", classmethod(from_pack))
    original, edited = _png(x_o, tmp_path / "o.png"), _png(x_e, tmp_path / "e.png")
    out = tmp_path / "r.png"
    rc = cli.main(
        [
            "restore",
            "--original",
            str(original),
            "--edited",
            str(edited),
            "--prompt-original",
            "a photo of a man",
            "--prompt-edited",
            "a photo of a man wearing glasses",
            "--id-words",
            "man",
            "--element-words",
            "glasses",
            "--out",
            str(out),
            "--weights",
            str(tiny_hub),
            "--face-pack",
            "my_pack",
            *FAST,
            *COMMON,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert asked == {"pack": "my_pack", "root": None}, asked
    assert stub.calls >= 1 and "landmark" in err, f"analyzer calls {stub.calls}; notes: {err}"


def test_missing_face_models_are_reported_before_the_diffusion_models_load(tmp_path, capsys):
    original, edited = (
        _png(random_image(1), tmp_path / "o.png"),
        _png(random_image(2), tmp_path / "e.png"),
    )
    rc = cli.main(
        [
            "restore",
            "--original",
            str(original),
            "--edited",
            str(edited),
            "--prompt-original",
            "a man",
            "--prompt-edited",
            "a man in glasses",
            "--id-words",
            "man",
            "--element-words",
            "glasses",
            "--out",
            str(tmp_path / "r.png"),
            "--weights",
            str(tmp_path / "absent"),
            "--face-root",
            str(tmp_path / "no-packs"),
            *COMMON,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "no-packs" in err, f"exit code {rc}, stderr: {err}"


def test_pairs_are_parsed_and_checked():
    assert cli._pairs("0:1,2:0") == [(0, 1), (2, 0)]
    assert cli._pairs(None) is None
    with pytest.raises(ValueError, match="0:1,2:0"):
        cli._pairs("0-1")


def test_restore_multi_face_restores_each_paired_face(tiny_hub, tmp_path, monkeypatch, capsys):
    from test_multiface import CENTRES, StubAnalyzer, make_face, smooth_image

    from minid.faces import analyzer as faces

    x_o, x_e = smooth_image(1), smooth_image(2)
    people = [make_face(cx, cy) for cx, cy in CENTRES[:2]]
    # the edit lists its faces the other way round
    stub = StubAnalyzer([(x_o, people), (x_e, people[::-1])])
    monkeypatch.setattr(faces.FaceAnalyzer, "from_pack", classmethod(lambda cls, *a, **k: stub))
    original, edited = _png(x_o, tmp_path / "o.png"), _png(x_e, tmp_path / "e.png")
    out = tmp_path / "r.png"
    rc = cli.main(
        [
            "restore",
            "--multi-face",
            "--original",
            str(original),
            "--edited",
            str(edited),
            "--prompt-original",
            "a photo of a man",
            "--prompt-edited",
            "a photo of a man wearing glasses",
            "--id-words",
            "man",
            "--element-words",
            "glasses",
            "--out",
            str(out),
            "--weights",
            str(tiny_hub),
            *FAST,
            *COMMON,
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert (
        "face 0 (original) : 1 (edited)" in captured.out
        and "face 1 (original) : 0 (edited)" in captured.out
    ), captured.out
    assert Image.open(out).size == (x_e.shape[-1], x_e.shape[-2])


def test_demo_tiny_runs_every_stage_and_says_the_pictures_are_noise(tmp_path, capsys):
    from PIL import Image

    from minid.app.demo import DEMO_FILES
    from minid.loading.tiny import IMAGE_SIZE

    out = tmp_path / "demo"
    assert cli.main(["demo", "--tiny", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "noise because the weights are random" in err, err
    for stage in ("demo 1/2 generate", "demo 2/2 edit", "EditedID 1/3", "EditedID 3/3"):
        assert stage in err, f"no progress for {stage!r}: {err[-400:]}"
    wrote = {p.name for p in out.iterdir()}
    for name in ("original.png", "edited.png", "restored.png", "comparison.png", "summary.json"):
        assert name in wrote, f"{name} not written: {sorted(wrote)}"
    assert wrote <= set(DEMO_FILES), sorted(wrote - set(DEMO_FILES))
    with Image.open(out / "restored.png") as restored:
        assert restored.size == (IMAGE_SIZE, IMAGE_SIZE), restored.size
    summary = json.loads((out / "summary.json").read_text())
    # the method's shipped settings: the tiny run exercises the defaults, not a cheaper path
    assert summary["inversion"] == RestoreConfig().method.inversion, summary["inversion"]


@pytest.mark.parametrize(
    "flags, says",
    [(["--weights", "w"], "drop one of the two"), (["--image-size", "128"], "drop --image-size")],
)
def test_demo_tiny_refuses_the_flags_it_replaces(tmp_path, capsys, flags, says):
    assert cli.main(["demo", "--tiny", "--out", str(tmp_path / "d"), *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists()
