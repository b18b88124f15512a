"""ID similarity, PSNR and the folder evaluation."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from minid.app.evaluate import evaluate_folder, find_triples
from minid.faces.analyzer import Face
from minid.imaging.metrics import SAME_PERSON_THRESHOLD, id_similarity, psnr


def test_id_similarity_known_values():
    a = np.array([1.0, 0, 0])
    assert id_similarity(a, a * 5) == pytest.approx(1.0)
    assert id_similarity(a, np.array([0, 1.0, 0])) == pytest.approx(0.0)
    assert id_similarity(a, -a) == pytest.approx(-1.0)
    assert id_similarity(a, np.array([1.0, 1, 0])) == pytest.approx(1 / math.sqrt(2))
    batch = id_similarity(torch.tensor([[1.0, 0], [0, 2]]), torch.tensor([[3.0, 0], [1, 1]]))
    assert np.allclose(batch, [1.0, 1 / math.sqrt(2)])
    assert SAME_PERSON_THRESHOLD == 0.70  # the paper's Table 13
    with pytest.raises(ValueError, match="all zeros"):
        id_similarity(a, np.zeros(3))


def test_psnr_known_values():
    a = np.zeros((4, 4))
    assert psnr(a, a, 1.0) == math.inf
    assert psnr(a, a + 0.1, 1.0) == pytest.approx(20.0)  # MSE 0.01 → 10·log10(1/0.01)
    b = np.zeros((2, 2), np.uint8)
    c = b.copy()
    c[0, 0] = 255  # MSE = 255²/4 → 10·log10(4) dB
    assert psnr(b, c, 255.0) == pytest.approx(10 * math.log10(4))
    with pytest.raises(ValueError, match="shape"):
        psnr(a, np.zeros((3, 3)), 1.0)


class ColourAnalyzer:
    """A stand-in analyzer: one face per image, box fixed, embedding = the image's mean colour."""

    def analyze(self, image):
        image = np.asarray(image, dtype=np.float64)
        if image.max() == 0:
            return []
        emb = image.reshape(-1, 3).mean(0)
        return [
            Face(box=np.array([4.0, 4, 28, 28]), score=0.9, kps=np.zeros((5, 2)), embedding=emb)
        ]


def _save(path, colour, size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(path)


def test_evaluate_folder_writes_csv_json_and_summary(tmp_path):
    _save(tmp_path / "original" / "a.png", (200, 0, 0))
    _save(tmp_path / "edited" / "a.png", (0, 200, 0))  # orthogonal colour: ID-Sim 0
    _save(tmp_path / "result" / "a.png", (200, 0, 0))  # identity restored: ID-Sim 1
    _save(tmp_path / "original" / "b.png", (100, 100, 0))
    _save(tmp_path / "edited" / "b.bmp", (100, 100, 0))  # any image suffix, same stem
    _save(tmp_path / "result" / "b.png", (100, 0, 0))  # ID-Sim 1/√2
    _save(tmp_path / "original" / "c.png", (0, 0, 0))  # no face
    _save(tmp_path / "edited" / "c.png", (0, 0, 0))
    _save(tmp_path / "result" / "c.png", (0, 0, 0))
    _save(tmp_path / "original" / "d.png", (1, 2, 3))  # no edited/result: reported missing

    triples, missing = find_triples(tmp_path)
    assert [t[0] for t in triples] == ["a", "b", "c"] and missing == [
        "d: no edited or result image"
    ]

    out = tmp_path / "report"
    summary = evaluate_folder(tmp_path, ColourAnalyzer(), out_dir=out, progress=False)
    assert summary["images"] == 3 and summary["images_with_faces"] == 2
    assert summary["mean_id_sim_edited"] == pytest.approx((0.0 + 1.0) / 2)
    assert summary["mean_id_sim_result"] == pytest.approx((1.0 + 1 / math.sqrt(2)) / 2)
    assert summary["same_person_rate_result"] == pytest.approx(1.0)
    # a: result vs edited differ by 200 in two channels of every pixel → MSE = 2·200²/3
    psnr_a = 10 * math.log10(255**2 / (2 * 200**2 / 3))
    rows = {r["name"]: r for r in csv.DictReader(open(out / "metrics.csv"))}
    assert float(rows["a"]["psnr_result_edited"]) == pytest.approx(psnr_a)
    assert rows["c"]["id_sim_result"] == "" and "no face in original" in rows["c"]["note"]
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["summary"]["missing"] == missing and len(payload["rows"]) == 3
    # identical black images: inf, as in the CSV
    assert payload["rows"][2]["psnr_result_edited"] == "inf"


def test_evaluate_folder_needs_the_three_subfolders(tmp_path):
    (tmp_path / "original").mkdir()
    with pytest.raises(FileNotFoundError, match="edited"):
        evaluate_folder(tmp_path, ColourAnalyzer(), progress=False)
