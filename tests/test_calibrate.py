"""`minid calibrate` (paper: Conclusion; A.17) on the tiny random model: the manifest, bad rows,
resuming, a real kill, and the ray engine against the local one.

The byte-level claims, and what makes them hold: a row's image depends, through rounding, on the
rows restored in its batch, and the batches are fixed by the manifest (K consecutive rows, less the
bad ones); a batch with a missing result runs whole again. So an interrupted job, once finished, a
deleted result, once re-created, and the ray engine all give the bytes of one uninterrupted local
run at the same K with the same torch threads (`CalibrateConfig.threads`: these runs use one each,
the ray test two).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import IMAGE_SIZE, random_image

from minid.app import cli
from minid.dataset.job import CalibrateConfig, calibrate
from minid.dataset.manifest import ManifestError, read_manifest
from minid.dataset.rows import row_config, row_key
from minid.faces import analyzer as faces
from minid.imaging.images import tensor_to_pil
from minid.imaging.metrics import id_similarity
from minid.restore.config import RestoreConfig
from minid.restore.config import with_fields as _with

FAST = {
    "method.solver.num_steps": 2,
    "method.solver.dpm_start": 2,
    "method.solver.dpm_end": 2,
    "method.null_text.inner_steps": 1,
    "image_size": IMAGE_SIZE,
}
FAST_FLAGS = [
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
CONFIG = CalibrateConfig(restore=_with(RestoreConfig(), FAST), batch_size=2)
PROMPTS = "a photo of a man,a photo of a man wearing glasses,man,glasses"
BAD = 3  # the row whose edited image is missing
OK_IDS = [f"row-0000{i}" for i in (1, 2, 4, 5)]


def _png(tensor: torch.Tensor, path: Path) -> Path:
    tensor_to_pil(tensor).save(path)
    return path


def _no_model():
    pytest.fail("the model was loaded, but no row needed a run")


def _results(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "results").glob("*.png"))}


def _table(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Five pairs in a CSV manifest, paths relative to it; row 3's edited image does not exist, row
    5's is wider than tall (its result comes back at that size)."""
    folder = tmp_path_factory.mktemp("dataset")
    (folder / "images").mkdir()
    lines = ["original,edited,prompt_original,prompt_edited,id_words,element_words"]
    for i in range(1, 6):
        _png(random_image(10 * i), folder / "images" / f"o{i}.png")
        edited = random_image(10 * i + 1)
        if i == 5:
            edited = F.interpolate(edited, size=(IMAGE_SIZE, IMAGE_SIZE + 16))
        _png(edited, folder / "images" / f"e{i}.png")
        lines.append(f"images/o{i}.png,images/{'absent' if i == BAD else f'e{i}'}.png,{PROMPTS}")
    manifest = folder / "pairs.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def first_run(dataset, tiny_hub, one_thread, tmp_path_factory):
    """One uninterrupted local run, K = 2: batches {1, 2}, {4} (3 is bad), {5}."""
    out = tmp_path_factory.mktemp("calibrated")
    result = calibrate(
        dataset, out, CONFIG, weights=tiny_hub, dtype=torch.float32, device="cpu", progress=False
    )
    return out, result, _results(out)


def test_five_rows_with_one_bad_give_four_results_and_one_error(first_run, dataset):
    out, result, pngs = first_run
    statuses = [(r["id"], r["status"]) for r in result.records]
    assert statuses == [(f"row-0000{i}", "error" if i == BAD else "ok") for i in range(1, 6)], (
        statuses
    )
    error = result.records[BAD - 1]["error"]
    assert "absent.png" in error and "not found" in error and str(dataset.parent) in error, error
    assert sorted(pngs) == [f"{i}.png" for i in OK_IDS], sorted(pngs)
    from PIL import Image

    assert Image.open(out / "results" / "row-00005.png").size == (IMAGE_SIZE + 16, IMAGE_SIZE), (
        "row 5's size"
    )
    for r in result.records:
        if r["status"] == "ok":
            assert (
                len(r["w_schedule"]) == 2
                and np.isfinite([r["psnr_original"], r["psnr_edited"]]).all()
            ), r
            assert r["batch"] == {1: 0, 2: 0, 4: 1, 5: 2}[r["row"]] and r["timings"] and r["key"], r
            assert (
                json.loads((out / "results" / f"{r['id']}.json").read_text())["key"] == r["key"]
            ), r["id"]
    table = _table(out)
    assert [(r["id"], r["status"]) for r in table] == statuses, table
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["status"]) for r in rows] == statuses and rows[BAD - 1]["error"] == error, (
        rows
    )
    s = result.summary
    assert (s["rows"], s["ok"], s["error"], s["ran"], s["skipped"]) == (5, 4, 1, 4, 0), s
    assert s["psnr_original"]["n"] == 4 and s["id_sim_before"]["n"] == 0, s
    assert (out / "contact_sheet.png").is_file() and not (out / "id_similarity.png").exists()


def test_rerun_skips_done_rows_and_recreates_only_a_deleted_result(
    first_run, dataset, tiny_hub, tmp_path
):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "results").iterdir()}
    # what a killed run leaves: an atomic write's temporary file, a write check's named probe
    leftovers = [".row-00002.png.k1l2.tmp", ".minid-write-check.k1l2.tmp"]
    for name in leftovers:
        (out / "results" / name).write_bytes(b"half")
    again = calibrate(dataset, out, CONFIG, weights=tiny_hub, sd=_no_model, progress=False)
    assert not any((out / "results" / n).exists() for n in leftovers), "a leftover was kept"
    assert (again.summary["ran"], again.summary["skipped"]) == (0, 4), again.summary
    now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "results").iterdir()}
    assert now == stamps, "a skipped row's files were written again"

    (out / "results" / "row-00002.png").unlink()
    again = calibrate(
        dataset, out, CONFIG, weights=tiny_hub, dtype=torch.float32, device="cpu", progress=False
    )
    assert (again.summary["ran"], again.summary["skipped"]) == (1, 3), again.summary
    # row 2 ran again in its batch {1, 2}: the same bytes; row 1 ran along and was not written
    assert _results(out) == first_run[2], "the re-created result differs from the first run's"
    now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "results").iterdir()}
    changed = sorted(name for name in now if now[name] != stamps.get(name))
    assert changed == ["row-00002.json", "row-00002.png"], changed


def test_killed_run_resumes_to_the_same_bytes(first_run, dataset, tiny_hub, tmp_path):
    """The command in a subprocess, killed (SIGKILL) as soon as its first result appears, then run
    again."""
    out, log = tmp_path / "out", tmp_path / "log.txt"
    command = [
        sys.executable,
        "-m",
        "minid.app.cli",
        "calibrate",
        str(dataset),
        "--out",
        str(out),
        "--weights",
        str(tiny_hub),
        "--batch",
        "2",
        "--mask-source",
        "attention",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        *FAST_FLAGS,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as f:
        process = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if list((out / "results").glob("*.png")):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, (
        f"exit code {process.returncode}: {log.read_text()[-2000:]}"
    )
    at_kill = sorted(p.name for p in (out / "results").glob("*.png"))
    assert "row-00005.png" not in at_kill, f"the run had finished before the kill: {at_kill}"

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "4 ok, 1 error" in finished.stdout, finished.stdout
    assert _results(out) == first_run[2], (
        f"killed at {at_kill}: the finished images differ from one run's"
    )
    assert sorted(p.name for p in (out / "results").iterdir()) == sorted(
        p.name for p in (first_run[0] / "results").iterdir()
    ), "the results folders hold different files"
    assert [(r["id"], r["status"], r["psnr_original"]) for r in _table(out)] == [
        (r["id"], r["status"], r["psnr_original"]) for r in _table(first_run[0])
    ]


@pytest.mark.ray
def test_ray_engine_gives_the_local_engines_results(dataset, tiny_hub, tmp_path):
    """Ray Data on a local Ray instance (2 CPUs, 2 one-CPU actors) against a local run at 2 torch
    threads, both at the default `threads` (this process's count, given to every actor): the same
    table and image bytes."""
    ray = pytest.importorskip(
        "ray", reason="the ray engine needs the scale extra: pip install -e '.[scale]'"
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    local_out = tmp_path / "local"
    try:
        local_run = calibrate(
            dataset,
            local_out,
            CONFIG,
            weights=tiny_hub,
            dtype=torch.float32,
            device="cpu",
            progress=False,
        )
        first_run = (local_out, local_run, _results(local_out))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except BaseException:
        torch.set_num_threads(before)
        raise
    try:
        out = tmp_path / "ray"
        result = calibrate(
            dataset,
            out,
            dataclasses.replace(CONFIG, engine="ray", num_workers=2),
            weights=tiny_hub,
            dtype=torch.float32,
            device="cpu",
            progress=False,
        )
    finally:
        ray.shutdown()
        torch.set_num_threads(before)
    local = first_run[1].records
    assert [(r["id"], r["status"], r["error"], r["batch"]) for r in result.records] == [
        (r["id"], r["status"], r["error"], r["batch"]) for r in local
    ], result.records
    for mine, theirs in zip(result.records, local):
        if mine["status"] == "ok":
            for name in ("psnr_original", "psnr_edited"):
                assert mine[name] == pytest.approx(theirs[name], abs=1e-9), (mine["id"], name)
            assert (
                mine["w_schedule"] == pytest.approx(theirs["w_schedule"])
                and mine["key"] == theirs["key"]
            )
    assert _results(out) == first_run[2], "the ray engine's images differ from the local engine's"
    assert [(r["id"], r["status"]) for r in _table(out)] == [(r["id"], r["status"]) for r in local]


def test_bad_rows_are_recorded_with_their_message_before_any_model_loads(tiny_hub, tmp_path):
    _png(random_image(1), tmp_path / "o.png")
    _png(random_image(2), tmp_path / "e.png")
    (tmp_path / "notes.png").write_text("not an image")
    base = {
        "original": "o.png",
        "edited": "e.png",
        "prompt_original": "a photo of a man",
        "prompt_edited": "a photo of a man wearing glasses",
        "id_words": ["man"],
        "element_words": ["glasses"],
    }
    rows = [
        ({"id": "word", "id_words": ["woman"]}, "identity word 'woman' is not in the prompt"),
        ({"id": "unreadable", "original": "notes.png"}, "could not be read as an image"),
        ({"id": "missing", "edited": "gone.png"}, "edited file"),
        (None, "not valid JSON"),
        ({"id": "lambda", "lambda_o": 2.0}, "lambda_o must be in [0, 1]"),
        ({"id": "string-words", "id_words": "man"}, "must be a list of words"),
        ({"id": "typo", "lamda_o": 0.3}, "unknown field(s) 'lamda_o'"),
        ({"id": "steps", "steps": "many"}, "steps must be an integer"),
    ]
    lines = ["{not json" if r is None else json.dumps({**base, **r}) for r, _ in rows]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    for attempt in range(2):
        result = calibrate(
            manifest, tmp_path / "out", CONFIG, weights=tiny_hub, sd=_no_model, progress=False
        )
        for rec, (_, expected) in zip(result.records, rows):
            assert rec["status"] == "error" and expected in rec["error"], (
                attempt,
                rec["id"],
                rec["error"],
            )
        assert result.records[3]["id"] == "row-00004", result.records[3]
        assert (result.summary["ran"], result.summary["error"]) == (0, len(rows)), result.summary
    assert _results(tmp_path / "out") == {}, "a bad row has a result image"


def test_csv_and_jsonl_manifests_read_the_same_rows(tmp_path):
    (tmp_path / "pairs.csv").write_text(
        "id,original,edited,prompt_original,prompt_edited,id_words,element_words,face_mask,"
        "lambda_o,seed,steps,gating_mode\n"
        "p1,a/o.png,a/e.png,a photo of a man,a photo of a man wearing glasses,man "
        "face,glasses,m.png,0.7,5,3,map\n"
        ",/abs/o.png,/abs/e.png,a man,a man,man,,,,,,\n"
    )
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps(
            {
                "id": "p1",
                "original": "a/o.png",
                "edited": "a/e.png",
                "prompt_original": "a photo of a man",
                "prompt_edited": "a photo of a man wearing glasses",
                "id_words": ["man", "face"],
                "element_words": ["glasses"],
                "face_mask": "m.png",
                "lambda_o": 0.7,
                "seed": 5,
                "steps": 3,
                "gating_mode": "map",
            }
        )
        + "\n\n"
        + json.dumps(
            {
                "original": "/abs/o.png",
                "edited": "/abs/e.png",
                "prompt_original": "a man",
                "prompt_edited": "a man",
                "id_words": ["man"],
                "seed": None,
            }
        )
        + "\n"
    )
    from_csv, from_jsonl = (
        read_manifest(tmp_path / "pairs.csv").rows,
        read_manifest(tmp_path / "pairs.jsonl").rows,
    )
    assert from_csv == from_jsonl, (from_csv, from_jsonl)
    first, second = from_csv
    assert (first.id, first.original, first.face_mask) == (
        "p1",
        tmp_path / "a/o.png",
        tmp_path / "m.png",
    ), first
    assert first.id_words == ("man", "face") and (first.lambda_o, first.seed) == (0.7, 5), first
    assert first.overrides == (("method.solver.num_steps", 3), ("method.gating.mode", "map")), (
        first.overrides
    )
    assert (second.id, second.original, second.element_words, second.seed) == (
        "row-00002",
        Path("/abs/o.png"),
        (),
        None,
    ), second
    config = row_config(CONFIG.restore, first)
    assert (config.method.solver.num_steps, config.method.gating.mode) == (3, "map"), config
    # the key follows the settings a row runs with, not how they were written: an override equal to
    # the job's value gives the job's key
    model = {"weights": "w", "dtype": "float32", "face_masks": None}
    same = dataclasses.replace(first, overrides=(("method.solver.num_steps", 2),))
    plain = dataclasses.replace(first, overrides=())
    key = lambda row: row_key(
        row, {"original": "h"}, row_config(CONFIG.restore, row), row.seed, model
    )  # noqa: E731
    assert key(same) == key(plain) != key(first), "override keys"
    assert key(dataclasses.replace(plain, seed=6)) != key(plain) and row_key(
        plain, {"original": "other bytes"}, CONFIG.restore, plain.seed, model
    ) != key(plain), "seed, bytes keyed"


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "id,original,edited,prompt_original,prompt_edited,id_words\na,o.png,e.png,a man,a "
            "man,man\n"
            "a,o.png,e.png,a man,a man,man\n",
            "rows 1 and 2 share the id 'a'",
        ),
        (
            "original,edited,prompt_original,prompt_edited,id_words,lamda_o\n",
            "unknown column(s) 'lamda_o'",
        ),
        ("original,edited,prompt_original,prompt_edited\n", "lacks the column(s) id_words"),
        (
            "id,original,edited,prompt_original,prompt_edited,id_words\na/b,o.png,e.png,a man,a "
            "man,man\n",
            "id 'a/b'",
        ),
    ],
)
def test_a_manifest_that_cannot_be_used_stops_the_command_at_once(tmp_path, capsys, text, expected):
    (tmp_path / "pairs.csv").write_text(text)
    with pytest.raises(ManifestError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(tmp_path / "pairs.csv")
    rc = cli.main(
        [
            "calibrate",
            str(tmp_path / "pairs.csv"),
            "--out",
            str(tmp_path / "out"),
            "--weights",
            str(tmp_path / "absent"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "pairs.csv" in err, f"exit code {rc}, stderr: {err}"
    assert not (tmp_path / "out").exists(), "the output folder was made"


def test_ray_engine_without_ray_says_how_to_install_it(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    rc = cli.main(
        [
            "calibrate",
            str(dataset),
            "--out",
            str(tmp_path / "out"),
            "--engine",
            "ray",
            "--weights",
            str(tmp_path / "absent"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and 'pip install -e ".[scale]"' in err, f"exit code {rc}, stderr: {err}"
    assert "calibrate" in cli.build_parser().format_help()


def test_the_python_api_is_minid_calibrate():
    import minid
    import minid.dataset.job

    assert minid.calibrate is minid.dataset.job.calibrate and minid.calibrate is calibrate, (
        minid.calibrate
    )


def test_an_in_memory_model_gives_the_images_of_its_weights_on_disk(
    first_run, dataset, tiny_sd, tmp_path
):
    """tiny_hub holds tiny_sd's weights: the local engine on the model in memory writes the same
    images (its rows' keys name the model by its tensors instead of its files)."""
    result = calibrate(dataset, tmp_path / "out", CONFIG, sd=tiny_sd, progress=False)
    assert _results(tmp_path / "out") == first_run[2], "the in-memory model's images differ"
    assert [
        r["key"] != theirs["key"]
        for r, theirs in zip(result.records, first_run[1].records)
        if r["status"] == "ok"
    ] == [True] * 4


def test_a_failed_batch_is_recorded_and_run_again_next_time(
    dataset, tiny_sd, tmp_path, monkeypatch
):
    """A batch that fails as a whole (here the first one, by an error raised in its place) is
    recorded for each of its rows; the job goes on, and the next run retries only those rows."""
    from minid.restore.pipeline import EditedID

    restore_batch, calls = EditedID.restore_batch, []

    def fails_once(self, pairs, **kw):
        calls.append(len(pairs))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (stand-in)")
        return restore_batch(self, pairs, **kw)

    monkeypatch.setattr(EditedID, "restore_batch", fails_once)
    out = tmp_path / "out"
    result = calibrate(dataset, out, CONFIG, sd=tiny_sd, progress=False)
    failed = [r for r in result.records if r.get("error_kind") == "run"]
    assert [r["id"] for r in failed] == ["row-00001", "row-00002"], result.records
    assert "the batch failed: RuntimeError: CUDA out of memory" in failed[0]["error"], failed[0]
    assert [r["status"] for r in result.records] == ["error", "error", "error", "ok", "ok"], (
        result.records
    )
    again = calibrate(dataset, out, CONFIG, sd=tiny_sd, progress=False)
    assert (again.summary["ran"], again.summary["ok"], calls[-1]) == (2, 4, 2), (
        again.summary,
        calls,
    )


class CentredFaces:
    """A face analyzer stand-in: one face over the centre of any image, its embedding the centred
    4×4-pooled pixels there, so that ID-Sim follows the pixels."""

    @staticmethod
    def embedding(image) -> np.ndarray:
        pixels = faces.as_pixels(image) / 255  # (3, H, W)
        h, w = pixels.shape[-2:]
        pooled = (
            F.adaptive_avg_pool2d(pixels[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4], 4)
            .flatten()
            .double()
        )
        return (pooled - pooled.mean()).numpy()

    def analyze(self, image) -> list[faces.Face]:
        from test_multiface import make_face

        h, w = faces.as_pixels(image).shape[-2:]
        face = make_face(w / 2, h / 2, side=min(h, w) / 2)
        face.embedding = self.embedding(image)
        return [face]


def test_landmark_masks_and_id_similarity_from_a_face_analyzer(
    dataset, tiny_hub, one_thread, tmp_path
):
    from PIL import Image

    manifest = tmp_path / "pairs.csv"
    manifest.write_text(
        "\n".join(dataset.read_text().splitlines()[:3]).replace(
            "images/", f"{dataset.parent}/images/"
        )
    )
    config = dataclasses.replace(CONFIG, mask_source="landmarks", save_intermediates=True)
    out = tmp_path / "out"
    result = calibrate(
        manifest,
        out,
        config,
        weights=tiny_hub,
        dtype=torch.float32,
        device="cpu",
        analyzer=CentredFaces(),
        progress=False,
    )
    for i, rec in enumerate(result.records, start=1):
        assert rec["status"] == "ok", rec
        assert any("face mask from the original's largest face" in n for n in rec["notes"]), rec[
            "notes"
        ]
        emb = {
            name: CentredFaces.embedding(Image.open(path))
            for name, path in (
                ("o", dataset.parent / f"images/o{i}.png"),
                ("e", dataset.parent / f"images/e{i}.png"),
                ("r", out / "results" / f"row-0000{i}.png"),
            )
        }
        assert rec["id_sim_before"] == pytest.approx(
            id_similarity(emb["o"], emb["e"]), abs=1e-12
        ), rec
        assert rec["id_sim_after"] == pytest.approx(id_similarity(emb["o"], emb["r"]), abs=1e-12), (
            rec
        )
        assert (out / "intermediates" / rec["id"] / "summary.json").is_file(), rec["id"]
    s = result.summary
    assert s["id_sim_before"]["n"] == 2 and s["id_sim_after"]["mean"] == pytest.approx(
        np.mean([r["id_sim_after"] for r in result.records])
    ), s
    assert (out / "id_similarity.png").is_file()
    again = calibrate(
        manifest,
        out,
        config,
        weights=tiny_hub,
        sd=_no_model,
        analyzer=CentredFaces(),
        progress=False,
    )
    assert again.summary["skipped"] == 2, again.summary
