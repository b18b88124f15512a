"""`minid validate` on the tiny random model saved as a hub (conftest.py): its table holds the
restore's own numbers, Table 11's metrics (paper A.13) are those of the latent's round trip computed
here another way, a constant ε gives the closed-form round trip, and every bad input is one line,
exit code 2, before any model loads."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_faces import PACK
from tiny_models import IMAGE_SIZE

from minid.app import cli, options
from minid.app.validate import round_trip, trajectory_metrics, validate_pairs
from minid.faces.analyzer import FaceAnalyzer
from minid.imaging.images import load_image
from minid.imaging.metrics import id_similarity, psnr
from minid.loading.checkpoint import load_stable_diffusion
from minid.method.editedid import EditedIDConfig
from minid.restore.inputs import RestorePair
from minid.restore.pipeline import EditedID
from minid.sampling.guided import invert, reconstruct
from minid.sampling.plans import ddim_plan
from minid.sampling.schedule import NoiseSchedule

COMMON = ["--device", "cpu", "--dtype", "fp32", "--seed", "0"]
FAST = ["--steps", "3", "--dpm-start", "2", "--dpm-end", "3", "--image-size", str(IMAGE_SIZE)]
STEMS = ("p0", "p1")


def _face_picture(seed: int, changed: bool) -> np.ndarray:
    """A 64² picture, green and blue blocks without red, and a 2×2 red spot: one face to the tiny
    detector (tiny_faces.py). `changed`: the spot's green differs (the edit drifted the face), and
    so do the blocks."""
    rng = np.random.default_rng(seed + 100 * changed)
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[..., 1:] = np.kron(rng.integers(0, 255, (8, 8, 2)), np.ones((8, 8, 1))).astype(np.uint8)
    image[30:32, 30:32, 0] = 255
    image[30:32, 30:32, 1] = 128 if changed else 40
    return image


@pytest.fixture
def pairs(tmp_path) -> Path:
    folder = tmp_path / "pairs"
    for role in ("original", "edited"):
        (folder / role).mkdir(parents=True)
    for k, stem in enumerate(STEMS):
        Image.fromarray(_face_picture(k, False)).save(folder / "original" / f"{stem}.png")
        Image.fromarray(_face_picture(k, True)).save(folder / "edited" / f"{stem}.png")
    return folder


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _method(argv: list[str], sd) -> EditedID:
    """The EditedID the command builds from the same flags."""
    return EditedID(sd, options.method_config(cli.build_parser().parse_args(argv)))


def _table(out: Path) -> tuple[list[dict], dict]:
    with open(out / "validate.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    payload = json.loads((out / "validate.json").read_text())
    assert [r["pair"] for r in csv_rows] == list(STEMS), f"csv rows {[r['pair'] for r in csv_rows]}"
    assert [r["pair"] for r in payload["rows"]] == list(STEMS), f"json rows {payload['rows']}"
    return csv_rows, payload


def _table11_by_hand(method: EditedID, path: Path, prompt: str) -> dict[str, float]:
    """Inversion (inversion.invert) then reconstruction (inversion.reconstruct) at guidance 1, with
    the metrics written out here."""
    with torch.no_grad():
        z0 = method.sd.vae.encode_latent(load_image(path, IMAGE_SIZE)[0])
        cond = method.encode_text([prompt])
        pivots = invert(method.sd.unet, method.plan, z0, cond)  # z_0 … z_N
        # ẑ_0 … ẑ_N
        rec = reconstruct(method.sd.unet, method.plan, pivots[-1], cond, None, 1.0)[::-1]
    n = len(method.plan.steps)
    d = lambda a, b: (a.double() - b.double()).pow(2).mean()  # noqa: E731
    return {
        "cum_mse": 1e3 * float(sum(d(rec[j], pivots[j]) for j in range(n))),
        "max_jump": max(float(d(rec[j], rec[j + 1]).sqrt()) for j in range(n)),
        "final_l2": float((rec[0].double() - z0.double()).norm()),
        "latent_psnr": psnr(rec[0], z0, 6 * float(z0.double().std())),
    }


def test_validate_with_face_models_reports_the_restores_numbers(
    pairs, tiny_hub, tiny_face_pack, one_thread, tmp_path, capsys
):
    """The tiny pack's landmarks are constant points along a line (an empty hull), so the face masks
    come from attention; the pack measures ID-Sim."""
    out = tmp_path / "report"
    argv = [
        "validate",
        "--pairs",
        str(pairs),
        "--out",
        str(out),
        "--weights",
        str(tiny_hub),
        *FAST,
        "--inversion",
        "direct",
        "--mask-source",
        "attention",
        "--face-pack",
        PACK,
        "--face-root",
        str(tiny_face_pack),
        *COMMON,
    ]
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    csv_rows, payload = _table(out)
    assert (out / "validate.md").read_text().count("\n| p") == 2 and Image.open(
        out / "validate.png"
    ).width > 0
    method = _method(argv, load_stable_diffusion(tiny_hub, dtype=torch.float32, device="cpu"))
    analyzer = FaceAnalyzer.from_pack(PACK, root=tiny_face_pack)

    def largest(image):
        return max(analyzer.analyze(image), key=lambda f: f.area).embedding

    for row, csv_row, stem in zip(payload["rows"], csv_rows, STEMS):
        assert float(csv_row["psnr_original"]) == row["psnr_original"], (csv_row, row)
        o, e = pairs / "original" / f"{stem}.png", pairs / "edited" / f"{stem}.png"
        # no element words: the element region is the whole image with λ_O = 1 (face from O, the
        # rest from E)
        direct = method.restore_batch(
            [
                RestorePair(
                    o,
                    e,
                    "a photo of a person",
                    "a photo of a person",
                    ["person"],
                    [],
                    element_mask=torch.ones(IMAGE_SIZE, IMAGE_SIZE),
                    lambda_o=1.0,
                )
            ],
            progress=False,
        )[0]
        for name in ("original", "edited"):
            assert math.isfinite(row[f"psnr_{name}"]), row
            assert row[f"psnr_{name}"] == pytest.approx(direct.psnr[name], abs=1e-9), (
                row,
                direct.psnr,
            )
        assert row["passes"] == (min(direct.psnr.values()) >= 25.0), row
        assert (
            row["w_schedule"] == pytest.approx(direct.w_schedule, abs=1e-12)
            and len(row["w_schedule"]) == 3
        ), row
        assert row["w_differences"] == pytest.approx(direct.w_differences, abs=1e-12), row
        assert "face mask taken from the cross-attention maps of person" in row["notes"], row
        for name, path in (("original", o), ("edited", e)):
            expected = _table11_by_hand(method, path, "a photo of a person")
            for metric, value in expected.items():
                assert row[f"{metric}_{name}"] == pytest.approx(value, rel=1e-9), (
                    metric,
                    name,
                    row,
                    expected,
                )
        # (the tiny pack finds hundreds of "faces" in a restored image: one pair is enough)
        if stem == "p0":
            emb_o = largest(np.asarray(Image.open(o)))
            assert row["id_sim_before"] == pytest.approx(
                id_similarity(emb_o, largest(np.asarray(Image.open(e)))), abs=1e-9
            ), row
            assert row["id_sim_after"] == pytest.approx(
                id_similarity(emb_o, largest(direct.pil)), abs=1e-9
            ), row
    assert all(r["id_sim_before"] != "" and r["id_sim_after"] != "" for r in csv_rows), csv_rows
    summary = payload["summary"]
    passing = sum(r["passes"] for r in payload["rows"])
    assert summary["pairs"] == 2 and summary["passing"] == passing, summary
    assert f"{passing} of 2 pairs" in stdout and "| p0 |" in stdout, stdout


def test_validate_without_face_models_leaves_id_sim_empty_with_one_note(
    pairs, tiny_hub, one_thread, tmp_path, capsys
):
    out, no_faces = tmp_path / "report", tmp_path / "no-face-models"
    no_faces.mkdir()
    prompt_e = "a photo of a person wearing glasses"
    argv = [
        "validate",
        "--pairs",
        str(pairs),
        "--out",
        str(out),
        "--weights",
        str(tiny_hub),
        *FAST,
        "--null-inner-steps",
        "1",
        "--prompt-edited",
        prompt_e,
        "--element-words",
        "glasses",
        "--face-root",
        str(no_faces),
        *COMMON,
    ]
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    csv_rows, payload = _table(out)
    assert all(r["id_sim_before"] == "" and r["id_sim_after"] == "" for r in csv_rows), csv_rows
    assert all(r["id_sim_before"] is None and r["id_sim_after"] is None for r in payload["rows"]), (
        payload["rows"]
    )
    said = [n for n in payload["summary"]["notes"] if "no face models" in n]
    assert len(said) == 1 and err.count("no face models") == 1, (payload["summary"]["notes"], err)
    method = _method(argv, load_stable_diffusion(tiny_hub, dtype=torch.float32, device="cpu"))
    assert method.config.method.inversion == "null-text", method.config.method
    for row, stem in zip(payload["rows"], STEMS):
        direct = method.restore(
            pairs / "original" / f"{stem}.png",
            pairs / "edited" / f"{stem}.png",
            "a photo of a person",
            prompt_e,
            ["person"],
            ["glasses"],
            progress=False,
        )
        assert row["psnr_original"] == pytest.approx(direct.psnr["original"], abs=1e-9), (
            row,
            direct.psnr,
        )
        assert row["psnr_edited"] == pytest.approx(direct.psnr["edited"], abs=1e-9), (
            row,
            direct.psnr,
        )
        assert len(row["w_schedule"]) == 3 and "cross-attention maps of person" in row["notes"], row


class NoFaces:
    def analyze(self, image) -> list:
        return []


@pytest.mark.parametrize("finds_faces", [True, False])
def test_landmark_face_masks_and_a_picture_without_a_face(finds_faces, pairs, tiny_sd, one_thread):
    """validate_pairs with a face analyzer stand-in: the face mask from the original's landmarks,
    or, where the analyzer finds no face, from attention with a note (and no ID-Sim), the run going
    on."""
    from test_calibrate import CentredFaces

    (pairs / "edited" / "p1.png").unlink()
    argv = ["validate", "--pairs", str(pairs), *FAST, "--inversion", "direct"]
    analyzer = CentredFaces() if finds_faces else NoFaces()
    rows, summary = validate_pairs(_method(argv, tiny_sd), pairs, analyzer=analyzer, progress=False)
    (row,) = rows
    assert summary["notes"][0] == "skipped p1: no edited image", summary["notes"]
    if finds_faces:
        assert "face mask from the original's largest face" in row["notes"], row["notes"]
        assert row["id_sim_before"] is not None and row["id_sim_after"] is not None, row
    else:
        assert (
            "no face found in the original: face mask from the cross-attention maps" in row["notes"]
        ), row
        assert "ID-Sim: no face or no embedding in the original image" in row["notes"], row
        assert row["id_sim_before"] is None and row["id_sim_after"] is None, row
    assert math.isfinite(row["psnr_original"]) and len(row["w_schedule"]) == 3, row


@pytest.mark.parametrize("plan_name", ["hybrid", "ddim"])
def test_trajectory_metrics_of_a_constant_eps_are_the_closed_form(plan_name):
    """With ε ≡ c, x̂_0 = (z − σ c)/α is the same at every level, so every solver step is exact: the
    inversion is z_j = α_j x̂_0 + σ_j c, the reconstruction retraces it (cumulative MSE 0, final L2
    0), and the largest jump is max_j RMS((α_j − α_{j+1}) x̂_0 + (σ_j − σ_{j+1}) c)."""
    schedule = NoiseSchedule.scaled_linear()
    plan = EditedIDConfig().plan(schedule) if plan_name == "hybrid" else ddim_plan(schedule, 6)
    g = torch.Generator().manual_seed(0)
    z0, c = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    inverted, reconstructed = round_trip(lambda z, t, i, land: c, plan, z0)
    m = trajectory_metrics(inverted, reconstructed)
    # level j = 0 … N
    levels = [plan.steps[-1 - j].s for j in range(len(plan.steps))] + [plan.steps[0].t]
    alpha, sigma = [schedule.alpha(t) for t in levels], [schedule.sigma(t) for t in levels]
    x0_hat = (z0 - sigma[0] * c) / alpha[0]
    for j, z in enumerate(inverted):
        err = float((z - (alpha[j] * x0_hat + sigma[j] * c)).abs().max())
        assert err < 1e-12, f"level {j}: inversion off the closed form by {err}"
    jumps = (
        torch.stack(
            [
                ((alpha[j] - alpha[j + 1]) * x0_hat + (sigma[j] - sigma[j + 1]) * c)
                .flatten(1)
                .pow(2)
                .mean(1)
                .sqrt()
                for j in range(len(levels) - 1)
            ]
        )
        .max(0)
        .values
    )
    assert max(m["cum_mse"]) < 1e-20 and max(m["final_l2"]) < 1e-12, m
    assert m["max_jump"] == pytest.approx(jumps.tolist(), rel=1e-12), (m["max_jump"], jumps)
    assert min(m["latent_psnr"]) > 250, m["latent_psnr"]


def _no_pairs(folder: Path) -> None:
    (folder / "original" / "p0.png").rename(folder / "original" / "other.png")
    (folder / "original" / "p1.png").unlink()


BAD = {
    "missing folder": (
        lambda folder: None,
        ["--pairs", "{tmp}/absent"],
        "absent/original does not exist",
    ),
    "no pairs": (_no_pairs, [], "no pairs in"),
    "unreadable image": (
        lambda folder: (folder / "edited" / "p1.png").write_text("not an image"),
        [],
        "p1.png could not be read as an image",
    ),
    "existing output": (
        lambda folder: (folder / "validate.csv").write_text("earlier"),
        [],
        "already exists",
    ),
    "element word not in the prompt": (
        lambda folder: None,
        ["--element-words", "glasses"],
        "glasses",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(
    case, pairs, tiny_hub, tmp_path, capsys, monkeypatch
):
    def no_model(args):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "_load", no_model)
    prepare, flags, expected = BAD[case]
    prepare(pairs)
    before = {p: p.read_bytes() for p in pairs.rglob("*") if p.is_file()}
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    rc, _, err = _run(
        ["validate", "--pairs", str(pairs), "--weights", str(tiny_hub), *flags, *COMMON], capsys
    )
    assert rc == 2 and err.startswith("minid validate: error:") and err.count("\n") == 1, (rc, err)
    assert expected in err, err
    assert {p: p.read_bytes() for p in pairs.rglob("*") if p.is_file()} == before, (
        "an input was written over"
    )
