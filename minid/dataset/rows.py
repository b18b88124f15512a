"""The rows of a calibration job (paper: Conclusion; A.17): each row's key, and the runner that
restores fixed batches of rows and writes each row's files. Both engines of calibration.py run
`BatchRunner`, in the calling process (local) or in Ray actors (ray), so they write the same files.

A row's key is the SHA-256 of everything its result depends on: the bytes of its input files, its
prompts, words, λ_O and seed, the method settings (`RestoreConfig` with the row's overrides, as
`dataclasses.asdict`), the weights (`weights_identity`) and their dtype, and where face masks come
from. A result whose stored key equals the row's key is not computed again.

A row's bytes also depend, through rounding, on the rows restored in the same batch
(`restore_batch`), so a batch is always the same rows: K consecutive rows of the manifest
(`CalibrateConfig.batch_size`), less the bad ones. When some rows of a batch need a result, the
batch runs whole and only those rows are written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from minid.dataset.manifest import Row
from minid.imaging import images, metrics
from minid.loading.files import json_safe, sha256_file, write_text_atomic
from minid.restore.config import RestoreConfig, with_fields
from minid.restore.inputs import CheckedPair, analyze, check_pair, landmark_face_mask
from minid.restore.pipeline import EditedID

RECORD_FIELDS = (
    "id",
    "row",
    "status",
    "error",
    "error_kind",
    "original",
    "edited",
    "result",
    "intermediates",
    "psnr_original",
    "psnr_edited",
    "id_sim_before",
    "id_sim_after",
    "w_schedule",
    "seconds",
    "timings",
    "batch",
    "batch_rows",
    "notes",
    "face_pack",
    "key",
)


@dataclass(frozen=True)
class Work:
    """One row in a batch to run: `write` when its result is wanted, else it is there as a batchmate
    only."""

    row: Row
    key: str
    write: bool

    def to_json(self) -> dict:
        row = {
            f.name: (str(v) if isinstance(v, Path) else v)
            for f in dataclasses.fields(Row)
            for v in [getattr(self.row, f.name)]
        }
        return {"row": row, "key": self.key, "write": self.write}

    @classmethod
    def from_json(cls, data: dict) -> "Work":
        row = dict(data["row"])
        for name in ("original", "edited", "face_mask", "element_mask"):
            row[name] = None if row[name] is None else Path(row[name])
        row["id_words"], row["element_words"] = tuple(row["id_words"]), tuple(row["element_words"])
        row["overrides"] = tuple(tuple(o) for o in row["overrides"])
        return cls(row=Row(**row), key=data["key"], write=data["write"])


def row_config(base: RestoreConfig, row: Row) -> RestoreConfig:
    """The row's method settings: the job's, with the row's override columns set (its checks
    apply)."""
    return with_fields(base, dict(row.overrides)) if row.overrides else base


def result_paths(out: Path, row_id: str) -> tuple[Path, Path, Path]:
    """(restored image, record, intermediates folder) of a row under the output folder."""
    return (
        out / "results" / f"{row_id}.png",
        out / "results" / f"{row_id}.json",
        out / "intermediates" / row_id,
    )


def record(row: Row, **values) -> dict:
    """A results-table record: every field of RECORD_FIELDS, None where not given."""
    rec = dict.fromkeys(RECORD_FIELDS)
    rec.update(id=row.id, row=row.number, original=_text(row.original), edited=_text(row.edited))
    rec.update(values)
    return rec


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


# --------------------------------------------------------------------------------------------------
# Keys


def row_key(
    row: Row, file_hashes: dict[str, str], config: RestoreConfig, seed: int, model: dict
) -> str:
    """SHA-256 of the row's inputs and settings (module docstring); paths themselves are not part of
    it, so a dataset moved elsewhere keeps its results."""
    payload = {
        "inputs": file_hashes,
        "prompt_original": row.prompt_original,
        "prompt_edited": row.prompt_edited,
        "id_words": list(row.id_words),
        "element_words": list(row.element_words),
        "lambda_o": row.lambda_o,
        "seed": seed,
        "config": dataclasses.asdict(config),
        "model": model,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def weights_identity(path: str | Path, cache: Path | None = None) -> str:
    """SHA-256 over the SHA-256 of each weight, config and tokenizer file at `path` (a hub folder or
    one file).

    Hashing SD1.4's files takes seconds, so each file's hash is kept in `cache` (a JSON file) and
    reused while the file's size and modification time are unchanged.
    """
    path = Path(path)
    if path.is_file():
        files = {path.name: path}
    elif path.is_dir():
        files = {
            str(p.relative_to(path)): p
            for p in sorted(path.rglob("*"))
            if p.is_file()
            and p.suffix in (".safetensors", ".json", ".txt")
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        }
    else:
        raise FileNotFoundError(
            f"weights {path} not found; give a hub folder or a .safetensors file (--weights)"
        )
    known = (
        json.loads(cache.read_text()).get("files", {})
        if cache is not None and cache.is_file()
        else {}
    )
    entries = {}
    for name, p in files.items():
        st = p.stat()
        old = known.get(name)
        same = old is not None and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns
        entries[name] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": old["sha256"] if same else sha256_file(p),
        }
    if cache is not None and entries != known:
        write_text_atomic(cache, json.dumps({"weights": str(path), "files": entries}, indent=1))
    return hashlib.sha256(
        json.dumps({n: e["sha256"] for n, e in entries.items()}, sort_keys=True).encode()
    ).hexdigest()


def model_identity(sd) -> str:
    """SHA-256 over the parameters of an in-memory model (name, dtype, shape, bytes), for a job
    given `sd`."""
    h = hashlib.sha256()
    for part in ("text_encoder", "unet", "vae"):
        for name, t in getattr(sd, part).state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{part}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Running batches


class BatchRunner:
    """Restores batches of rows with `EditedID.restore_batch` and writes each wanted row's files.

    `sd`: a StableDiffusion, or a function that loads one (called at the first batch). `analyzer`: a
    face analyzer (`faces.FaceAnalyzer`) for landmark face masks (`config.mask_source ==
    "landmarks"`) and the ID-Sim before and after; None: neither. `face_source` names the analyzer
    in the records (a record's ID-Sim is reused only by a job with the same faces).
    """

    def __init__(self, out: str | Path, config, sd, analyzer=None, face_source: str | None = None):
        self.out = Path(out)
        self.config = config  # calibrate.CalibrateConfig
        self._sd = sd
        self.analyzer = analyzer
        self.face_source = face_source if analyzer is not None else None
        self._methods: dict[RestoreConfig, EditedID] = {}

    @property
    def sd(self):
        if callable(self._sd):
            self._sd = self._sd()
        return self._sd

    def _method(self, config: RestoreConfig) -> EditedID:
        if config not in self._methods:
            self._methods[config] = EditedID(self.sd, config)
        return self._methods[config]

    def run(self, batch: int, works: list[Work]) -> list[dict]:
        """Restore the batch's good rows together (one `restore_batch` per set of method settings,
        in row order) and return the records of the rows to write. A row that fails its checks is
        left out of the batch and recorded; a batch that fails as a whole records its error for each
        of its rows, and the job goes on."""
        records, groups = [], {}
        for work in works:
            config = row_config(self.config.restore, work.row)
            try:
                pair, notes = self._pair(work.row, config)
            # a bad row: missing or unreadable file, word, mask
            except (ValueError, TypeError, OSError) as e:
                if work.write:
                    records.append(self._error(work, f"{e}", "input"))
                continue
            groups.setdefault(config, []).append((work, pair, notes))
        for config, group in groups.items():
            try:
                results = self._method(config).restore_batch(
                    [pair for _, pair, _ in group], progress=False
                )
            # the batch failed (out of memory, …): record it, go on
            except Exception as e:  # noqa: BLE001
                records += [
                    self._error(w, f"the batch failed: {type(e).__name__}: {e}", "run")
                    for w, _, _ in group
                    if w.write
                ]
                continue
            for (work, pair, notes), result in zip(group, results):
                if work.write:
                    records.append(self._write(work, pair, result, notes, batch, len(group)))
        return records

    def _pair(self, row: Row, config: RestoreConfig) -> tuple[CheckedPair, list[str]]:
        """The row checked (its images and masks decoded once), with its landmark face mask when the
        job asks for one."""
        notes = []
        job = check_pair(row.pair(self.config.seed), self.sd.tokenizer, config)
        if job.mask_o is None and self.config.mask_source == "landmarks":
            found = analyze(self.analyzer, job.x_o, f"the original image {row.original}")
            job.mask_o, how = landmark_face_mask(max(found, key=lambda f: f.area), config)
            notes.append(f"face mask from the original's largest face ({len(found)} found): {how}")
        return job, notes

    def _write(
        self, work: Work, pair: CheckedPair, result, notes: list[str], batch: int, batch_rows: int
    ) -> dict:
        """Write the row's image (pasted back at the edited image's size, as `minid restore`), its
        intermediates when asked, then its record: the record last, so a record on disk means its
        files are complete."""
        row = work.row
        png, sidecar, inter = result_paths(self.out, row.id)
        inputs = list(row.files().values())
        images.save_restored(result, png, frame=pair.frames[1], inputs=inputs)
        if self.config.save_intermediates:
            from minid.restore.report import save_result

            save_result(result, inter, inputs=inputs)
        before, after, sim_notes = self._id_sims(pair, png)
        timings = {k: round(v, 4) for k, v in result.timings.items()}
        rec = record(
            row,
            status="ok",
            result=str(png.relative_to(self.out)),
            intermediates=str(inter.relative_to(self.out))
            if self.config.save_intermediates
            else None,
            psnr_original=result.psnr["original"],
            psnr_edited=result.psnr["edited"],
            id_sim_before=before,
            id_sim_after=after,
            w_schedule=[float(w) for w in result.w_schedule],
            seconds=round(sum(timings.values()) / batch_rows, 4),
            timings=timings,
            batch=batch,
            batch_rows=batch_rows,
            notes=result.notes + notes + sim_notes,
            key=work.key,
            face_pack=self.face_source,
        )
        write_text_atomic(sidecar, json.dumps(json_safe(rec), indent=1))
        return rec

    def _error(self, work: Work, message: str, kind: str) -> dict:
        rec = record(work.row, status="error", error=message, error_kind=kind, key=work.key)
        write_error(self.out, work.row, rec)
        return rec

    def _id_sims(
        self, pair: CheckedPair, result: Path
    ) -> tuple[float | None, float | None, list[str]]:
        """ArcFace cosine of the original's largest face with the edited image's and the result's
        (paper's ID-Sim), or None with a note where a face or an embedding is missing. The inputs
        are the pictures the check read; the result is read back from its file."""
        if self.analyzer is None:
            return None, None, []
        (frame_o, frame_e), written = pair.frames, images.to_rgb(images.open_image(result)[0])
        sims, notes = metrics.id_similarities(
            self.analyzer, frame_o.picture, {"edited": frame_e.picture, "result": written}
        )
        return sims["edited"], sims["result"], notes


def write_error(out: Path, row: Row, rec: dict) -> None:
    """Record a bad row (unless the same record is there); a restored image left from an earlier run
    of the row goes, so files and table agree (never a file the row reads)."""
    png, sidecar, _ = result_paths(out, row.id)
    if png.exists() and not any(
        os.path.samefile(png, p) for p in row.files().values() if p.exists()
    ):
        png.unlink()
    text = json.dumps(json_safe(rec), indent=1)
    if not (sidecar.is_file() and sidecar.read_text() == text):
        write_text_atomic(sidecar, text)
