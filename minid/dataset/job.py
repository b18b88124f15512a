"""Calibrating a face dataset at scale (paper: Conclusion; A.17): restore every pair of a manifest.

The method's second use is calibrating face datasets: edit real photos with a multimodal model,
restore each identity with EditedID, and keep the pairs as training data for identity-preserving
models; that is thousands to millions of pairs. `calibrate(manifest, out, config, weights=…)` runs
such a job:

1. read the manifest (manifest.py: CSV or JSON Lines, one row per pair);
2. scan every row before any heavy work: hash its input files into its key (calibration_rows.py),
   skip it when `out/results/<id>.json` holds that key and its files are there, else check it as
   `restore` does; a bad row (missing file, word not in its prompt, unreadable image) is recorded
   with its message and the job goes on;
3. run the rows that need it in fixed batches of K consecutive manifest rows (`restore_batch`), on
   one of two engines that write the same files:
   - `local`: this process, on the model given or loaded from `weights`;
   - `ray`: Ray Data (an optional extra, `pip install -e ".[scale]"`): one dataset row per batch,
     mapped by an actor class that loads the model once per worker (`num_gpus` each, a pool of
     `num_workers`);
4. write the results table (`results.jsonl`, `results.csv`), the summary (`summary.json`) and its
   pictures (calibration_report.py).

Layout of `out`: `results/<id>.png` (the restored image at the edited image's size) and
`results/<id>.json` (the row's record, with its key), `intermediates/<id>/` when asked,
`weights.json` (hashes of the weight files), and the table, summary and pictures. Every file is
written atomically, so an interrupted job leaves whole files, and running it again finishes it with
the same images as one uninterrupted run: batches are fixed by the manifest, and a batch with a
missing row runs whole again (calibration_rows.py). On a Ray cluster, the manifest's files and `out`
must be on storage every node sees.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from minid.dataset.manifest import Manifest, Row, read_manifest
from minid.dataset.report import write_report
from minid.dataset.rows import (
    BatchRunner,
    Work,
    model_identity,
    record,
    result_paths,
    row_config,
    row_key,
    sha256_file,
    weights_identity,
    write_error,
)
from minid.imaging import images
from minid.loading.files import folder_lock
from minid.restore.config import RestoreConfig
from minid.restore.inputs import MASK_SOURCES, check_settings, check_text

RAY_HINT = 'pip install -e ".[scale]"  (or: pip install "ray[data]>=2.9")'


@dataclass(frozen=True)
class CalibrateConfig:
    """How a calibration job runs; the method's own settings are `restore`."""

    # method settings of every row; a row's override columns change some
    restore: RestoreConfig = RestoreConfig()
    batch_size: int = 1  # K: consecutive manifest rows restored in one `restore_batch`
    seed: int = 0  # seed of a row whose `seed` column is empty
    # face mask of a row without face_mask: "attention" (cross-attention maps of its identity words)
    # or "landmarks" (the original's face landmarks; needs a face pack)
    mask_source: str = "attention"
    # insightface pack for landmark masks and ID-Sim before/after; None: no face models
    face_pack: str | None = None
    # folder of face packs (None: ~/.insightface or $MINID_INSIGHTFACE_ROOT)
    face_root: str | None = None
    download_faces: bool = False  # let insightface fetch the pack if missing
    # also write reconstructions, masks, w schedule, attention maps per row
    save_intermediates: bool = False
    engine: str = "local"  # "local" (this process) or "ray" (Ray Data actors)
    # ray: join this cluster ("auto", "ray://host:10001"); None: start Ray here
    ray_address: str | None = None
    num_workers: int = 1  # ray: actors, each holding one copy of the model
    gpus_per_worker: float = 0.0  # ray: GPUs per actor (0: CPU actors)
    # torch's intra-op CPU threads for every row, on either engine (None: this process's
    # torch.get_num_threads()). A reduction split over another number of threads sums in another
    # order, so the same row's image differs by a few levels between thread counts; one count for
    # both engines keeps a row's bytes independent of the engine (Ray would give each actor 1).
    threads: int | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch size (--batch) must be at least 1, got {self.batch_size}")
        if self.engine not in ("local", "ray"):
            raise ValueError(f"engine (--engine) must be 'local' or 'ray', got {self.engine!r}")
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(
                f"mask_source (--mask-source) must be 'attention' or 'landmarks', got "
                f"{self.mask_source!r}"
            )
        if self.num_workers < 1:
            raise ValueError(f"--num-workers must be at least 1, got {self.num_workers}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")


@dataclass
class Calibration:
    """What a job leaves: one record per manifest row (manifest order), the summary, the files
    written."""

    records: list[dict]
    summary: dict
    paths: dict[str, Path] = field(default_factory=dict)


def calibrate(
    manifest: str | Path | Manifest,
    out: str | Path,
    config: CalibrateConfig = CalibrateConfig(),
    *,
    weights: str | Path | None = None,
    sd=None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    analyzer=None,
    progress: bool = True,
) -> Calibration:
    """Restore every row of `manifest` into `out` (module docstring), skipping rows already done.

    The model: `weights` (a hub folder or .safetensors file, loaded as `dtype` on `device`; the ray
    engine needs it, each actor loads it), or `sd`, a StableDiffusion or a function returning one
    (local engine; with `weights` too, `weights` names the model in the rows' keys and `sd` is what
    runs). `analyzer`: a face analyzer object instead of `config.face_pack` (local engine).
    """
    t0 = time.perf_counter()
    # 1. Everything that can be checked before any heavy work: manifest, output folder, engine, face
    #    models.
    manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder for the results")
    ray = require_ray() if config.engine == "ray" else None
    if ray is not None and weights is None:
        raise ValueError(
            "the ray engine loads the model in each worker: give weights (--weights), a hub folder "
            "or .safetensors file every node can read"
        )
    if weights is None and (sd is None or callable(sd)):
        raise ValueError(
            "calibrate needs the model: weights=<hub folder or .safetensors> or "
            "sd=<StableDiffusion>"
        )
    if analyzer is None and config.face_pack is not None and ray is None:
        analyzer = _face_analyzer(config)
    elif ray is not None and config.face_pack is not None:
        from minid.faces.analyzer import find_model_pack

        # fails here, not in a worker
        try:
            find_model_pack(config.face_pack, config.face_root, config.download_faces)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; {WITHOUT_FACE_MODELS}") from None
    measuring = analyzer is not None or (ray is not None and config.face_pack is not None)
    # a row with its face_mask needs no landmarks
    unmasked = any(row.face_mask is None for row in manifest.rows)
    if config.mask_source == "landmarks" and unmasked and not measuring:
        raise ValueError(
            "landmark face masks (--mask-source landmarks) need a face pack (--face-pack); or take "
            "the "
            "face masks from the cross-attention maps (--mask-source attention)"
        )
    face_source = (config.face_pack or type(analyzer).__name__) if measuring else None
    config = dataclasses.replace(config, threads=config.threads or torch.get_num_threads())
    out.mkdir(parents=True, exist_ok=True)
    # one run at a time on a folder: a second would redo the rows and race the first one's writes
    with folder_lock(out, "--out"):
        return _calibrate_locked(
            manifest,
            out,
            config,
            weights,
            sd,
            dtype,
            device,
            analyzer,
            ray,
            face_source,
            progress,
            t0,
        )


def _calibrate_locked(
    manifest, out, config, weights, sd, dtype, device, analyzer, ray, face_source, progress, t0
) -> Calibration:
    """Steps 2-5 of `calibrate`, with the lock on `out` held (`t0`: when the job began)."""
    # left by an atomic write or a write check (loading/files.py) that a killed run never finished
    for stale in out.rglob(".*.tmp"):
        stale.unlink()

    # 2. What the keys name the model by: its files' hashes (or its tensors'), dtype, and the face
    #    masks' source.
    if weights is not None:
        device = device or (
            "cuda" if (config.gpus_per_worker > 0 if ray else torch.cuda.is_available()) else "cpu"
        )
        dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
        identity = weights_identity(weights, out / "weights.json")
    else:
        dtype, identity = next(sd.unet.parameters()).dtype, model_identity(sd)
    model = {
        "weights": identity,
        "dtype": str(dtype).removeprefix("torch."),
        "face_masks": face_source if config.mask_source == "landmarks" else None,
    }
    if sd is not None and not callable(sd):
        tokenizer = sd.tokenizer
    else:
        from minid.loading.checkpoint import load_tokenizer

        tokenizer = load_tokenizer(weights)

    # 3. Every row: skipped, recorded as bad, or to run; then the fixed batches that hold a row to
    #    run.
    done, todo = _scan(manifest, out, config, model, tokenizer, face_source)
    batches = _batches(manifest.rows, done, todo, config.batch_size)

    # 4. The batches, on the engine; each row's record replaces what the scan knew of it.
    bar = _Progress(len(todo), progress)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # the local engine's rows; each ray actor sets its own
    try:
        if batches and ray is None:
            if sd is None:
                from minid.loading.checkpoint import load_stable_diffusion

                # loaded at the first batch
                sd = partial(load_stable_diffusion, weights, dtype=dtype, device=device)
            runner = BatchRunner(out, config, sd, analyzer, face_source)
            for b, works in batches:
                done.update((rec["id"], rec) for rec in runner.run(b, works))
                bar.update(sum(w.write for w in works))
        elif batches:
            done.update(
                (rec["id"], rec)
                for rec in _run_ray(
                    ray, batches, out, config, weights, dtype, device, face_source, bar
                )
            )
    finally:
        torch.set_num_threads(threads_before)
        bar.close()

    # 5. The table, summary and pictures, over every row of the manifest.
    records = [done[row.id] for row in manifest.rows]
    summary, paths = write_report(out, records, ran=set(todo), seconds=time.perf_counter() - t0)
    return Calibration(records=records, summary=summary, paths=paths)


# --------------------------------------------------------------------------------------------------
# Before any heavy work: keys, skips and checks


def _scan(
    manifest: Manifest,
    out: Path,
    config: CalibrateConfig,
    model: dict,
    tokenizer,
    face_source: str | None,
) -> tuple[dict[str, dict], dict[str, Work]]:
    """Each row's record when it needs no run (done before, or bad), else its Work; bad rows are
    recorded now."""
    done, todo = {}, {}
    for row in manifest.rows:
        key = None
        try:
            if row.error is not None:
                raise ValueError(f"manifest row {row.number}: {row.error}")
            hashes = {
                name: _hash_input(name, path, manifest.path) for name, path in row.files().items()
            }
            config_row = row_config(config.restore, row)
            key = row_key(
                row, hashes, config_row, config.seed if row.seed is None else row.seed, model
            )
            old = _stored(out, row.id)
            if (
                old is not None
                and old.get("key") == key
                and _complete(old, out, config, face_source)
            ):
                done[row.id] = old
                continue
            png = result_paths(out, row.id)[0]
            images.check_output_path(png, list(row.files().values()))
            # the checks that read no pixels; the row's images are decoded once, in its batch
            check_text(row.pair(), tokenizer, config_row)
            for path in row.files().values():
                images.check_image_file(path)
            check_settings(row.pair(), "")
        except (ValueError, TypeError, OSError) as e:
            rec = record(row, status="error", error=str(e), error_kind="input", key=key)
            write_error(out, row, rec)
            done[row.id] = rec
            continue
        todo[row.id] = Work(row, key, write=True)
    return done, todo


def _hash_input(name: str, path: Path, manifest: Path) -> str:
    if not path.is_file():
        where = "is a folder" if path.is_dir() else "not found"
        raise FileNotFoundError(
            f"{name} file {path} {where}; paths in the manifest are relative to its folder "
            f"{manifest.parent}"
        )
    return sha256_file(path)


def _stored(out: Path, row_id: str) -> dict | None:
    sidecar = result_paths(out, row_id)[1]
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None


def _complete(old: dict, out: Path, config: CalibrateConfig, face_source: str | None) -> bool:
    """Whether a stored record of the same key is all this job asks: a bad row stays bad (its inputs
    did not change); a result needs its image, its intermediates when asked, its ID-Sim from the
    same faces."""
    if old.get("status") == "error":
        return old.get("error_kind") == "input"
    png, _, inter = result_paths(out, old["id"])
    return (
        png.is_file()
        and (not config.save_intermediates or (inter / "summary.json").is_file())
        and (face_source is None or old.get("face_pack") == face_source)
    )


def _batches(
    rows: list[Row], done: dict[str, dict], todo: dict[str, Work], k: int
) -> list[tuple[int, list[Work]]]:
    """Batch b is rows [bK, (b+1)K) of the manifest, less the bad ones; it runs when one of its rows
    needs a result, with its finished rows along as batchmates (not written again), so its rows
    always share a batch with the same rows."""
    batches = []
    for b, start in enumerate(range(0, len(rows), k)):
        chunk = rows[start : start + k]
        if any(r.id in todo for r in chunk):
            batches.append(
                (
                    b,
                    [
                        todo[r.id] if r.id in todo else Work(r, done[r.id]["key"], write=False)
                        for r in chunk
                        if r.id in todo or done[r.id]["status"] == "ok"
                    ],
                )
            )
    return batches


def _face_analyzer(config: CalibrateConfig):
    from minid.faces.analyzer import FaceAnalyzer

    try:
        return FaceAnalyzer.from_pack(
            config.face_pack, root=config.face_root, download=config.download_faces
        )
    except (ImportError, FileNotFoundError) as e:
        raise type(e)(f"{e}; {WITHOUT_FACE_MODELS}") from None


# what a calibration can do without the face models, in its own words
WITHOUT_FACE_MODELS = (
    "or calibrate without them: a face_mask for every row of the manifest, or --mask-source "
    "attention (and no --id-sim)"
)


class _Progress:
    """A tqdm bar over the rows to run, with rows per minute (and tqdm's ETA)."""

    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            desc="minid calibrate",
            unit="row",
            disable=not enabled or total == 0,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} rows [{elapsed}<{remaining}{postfix}]",
        )
        self.t0 = time.perf_counter()

    def update(self, n: int) -> None:
        self.bar.update(n)
        minutes = (time.perf_counter() - self.t0) / 60
        self.bar.set_postfix_str(f"{self.bar.n / minutes:.1f} rows/min")

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------------
# The ray engine


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError(f"--engine ray needs Ray Data, an optional extra: {RAY_HINT}") from None
    return ray


class RayWorker:
    """A Ray Data actor: loads the model once, then restores each batch Ray hands it (one dataset
    row is one batch of the job, as calibration_rows.py fixes them) and returns the records as
    JSON."""

    def __init__(
        self,
        out: str,
        config: CalibrateConfig,
        weights: str,
        dtype: torch.dtype,
        device: str,
        face_source: str | None,
    ):
        from minid.loading.checkpoint import load_stable_diffusion

        torch.set_num_threads(config.threads)  # the driver's count, not Ray's 1 per actor
        analyzer = _face_analyzer(config) if config.face_pack is not None else None
        sd = load_stable_diffusion(weights, dtype=dtype, device=device)
        self.runner = BatchRunner(out, config, sd, analyzer, face_source)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        records = [
            json.dumps(self.runner.run(int(b), [Work.from_json(w) for w in json.loads(works)]))
            for b, works in zip(batch["batch"], batch["works"])
        ]
        return {"batch": np.asarray(batch["batch"]), "records": np.array(records, dtype=object)}


def _run_ray(
    ray,
    batches,
    out: Path,
    config: CalibrateConfig,
    weights,
    dtype,
    device: str,
    face_source: str | None,
    bar: _Progress,
):
    """Run the batches on Ray Data, yielding records as batches finish. Ray Data forms its own
    batches from blocks of rows, which need not fall on the job's batches; so a dataset row is a
    whole batch of the job (`batch_size=1` row per call), and a batch's rows are the same on either
    engine."""
    started = not ray.is_initialized()
    if started and config.ray_address:
        ray.init(address=config.ray_address)
    elif started:
        ray.init(include_dashboard=False)  # a local instance on this machine's CPUs and GPUs
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the job's own bar counts rows
        items = [
            {"batch": b, "works": json.dumps([w.to_json() for w in works])} for b, works in batches
        ]
        writes = {b: sum(w.write for w in works) for b, works in batches}
        # a fixed pool of num_workers actors (what `concurrency=num_workers` asked for before Ray
        # 2.51)
        dataset = ray.data.from_items(items).map_batches(
            RayWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=config.num_workers),
            num_cpus=1,
            num_gpus=config.gpus_per_worker or None,
            fn_constructor_kwargs=dict(
                out=str(out.resolve()),
                config=config,
                weights=str(Path(weights).resolve()),
                dtype=dtype,
                device=device,
                face_source=face_source,
            ),
        )
        for row in dataset.iter_rows():
            yield from json.loads(row["records"])
            bar.update(writes[int(row["batch"])])
    finally:
        if started:
            ray.shutdown()
