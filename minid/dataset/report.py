"""What a calibration job (paper: Conclusion; A.17) leaves beside its images: the results table, a
summary, and two pictures drawn with PIL: the histogram of ID-Sim before and after restoration, and
a contact sheet of a few rows (original | edited | restored).

The paper reads ID-Sim ≥ 0.70 as the same person (metrics.SAME_PERSON_THRESHOLD); the histogram
marks it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from minid.imaging import images
from minid.imaging.metrics import SAME_PERSON_THRESHOLD, column_stats
from minid.loading.files import json_safe, write_text_atomic

CSV_COLUMNS = (
    "id",
    "row",
    "status",
    "error",
    "original",
    "edited",
    "result",
    "psnr_original",
    "psnr_edited",
    "id_sim_before",
    "id_sim_after",
    "w_schedule",
    "seconds",
    "batch",
    "key",
)
SHEET_ROWS = 6  # rows of the contact sheet
THUMB = 128  # side of the box each contact-sheet image is fitted into, px


def write_report(
    out: Path, records: list[dict], ran: set[str], seconds: float
) -> tuple[dict, dict[str, Path]]:
    """Write results.jsonl, results.csv, summary.json and the pictures into `out`; return the
    summary and paths."""
    paths = {
        "table": write_text_atomic(
            out / "results.jsonl", "".join(json.dumps(json_safe(r)) + "\n" for r in records)
        ),
        "table_csv": write_text_atomic(out / "results.csv", _csv(records)),
    }
    summary = summarize(records, ran, seconds)
    paths["summary"] = write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    before = [r["id_sim_before"] for r in records if r.get("id_sim_before") is not None]
    after = [r["id_sim_after"] for r in records if r.get("id_sim_after") is not None]
    if before or after:
        paths["id_similarity"] = images.save_image(
            id_sim_histogram(before, after), out / "id_similarity.png"
        )
    shown = [r for r in records if r["status"] == "ok"][:SHEET_ROWS]
    if shown:
        paths["contact_sheet"] = images.save_image(
            contact_sheet(out, shown), out / "contact_sheet.png"
        )
    return summary, paths


def _csv(records: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for r in records:
        row = {k: ("" if r.get(k) is None else r[k]) for k in CSV_COLUMNS}
        if r.get("w_schedule") is not None:
            row["w_schedule"] = " ".join(f"{w:.6g}" for w in r["w_schedule"])
        writer.writerow(row)
    return buffer.getvalue()


def summarize(records: list[dict], ran: set[str], seconds: float) -> dict:
    """Counts, mean and median ID-Sim before → after (rows where both were measured) and
    reconstruction PSNR."""
    ok = [r for r in records if r["status"] == "ok"]
    both = [
        r for r in ok if r.get("id_sim_before") is not None and r.get("id_sim_after") is not None
    ]
    ran_ok = sum(1 for r in ok if r["id"] in ran)
    return {
        "rows": len(records),
        "ok": len(ok),
        "error": len(records) - len(ok),
        "ran": len(ran),
        "skipped": len(ok) - ran_ok,
        "seconds": round(seconds, 3),
        "rows_per_minute": round(len(ran) / seconds * 60, 3) if ran and seconds else None,
        "id_sim_before": column_stats([r["id_sim_before"] for r in both]),
        "id_sim_after": column_stats([r["id_sim_after"] for r in both]),
        "same_person_after": (
            sum(r["id_sim_after"] >= SAME_PERSON_THRESHOLD for r in both) / len(both)
            if both
            else None
        ),
        "psnr_original": column_stats([_float(r["psnr_original"]) for r in ok]),
        "psnr_edited": column_stats([_float(r["psnr_edited"]) for r in ok]),
        "errors": [{"id": r["id"], "error": r["error"]} for r in records if r["status"] != "ok"],
    }


def _float(v) -> float | None:
    return None if v is None else float(v)  # "inf" from a stored record is float("inf")


def format_summary(summary: dict) -> str:
    """The summary as the lines `minid calibrate` prints."""
    rate = summary["rows_per_minute"]
    lines = [
        f"{summary['rows']} rows: {summary['ok']} ok, {summary['error']} error; {summary['ran']} "
        f"run, "
        f"{summary['skipped']} skipped (done before), {summary['seconds']:.1f} s"
        + (f", {rate:.1f} rows/min" if rate else "")
    ]
    b, a = summary["id_sim_before"], summary["id_sim_after"]
    if b["n"]:
        lines.append(
            f"ID-Sim over {b['n']} rows: mean {b['mean']:.3f} -> {a['mean']:.3f}, median "
            f"{b['median']:.3f} -> {a['median']:.3f}"
        )
    for name in ("original", "edited"):
        s = summary[f"psnr_{name}"]
        if s["n"]:
            lines.append(
                f"reconstruction PSNR ({name}): mean {s['mean']:.2f} dB, median {s['median']:.2f} "
                f"dB"
            )
    for e in summary["errors"][:10]:
        lines.append(f"error {e['id']}: {e['error']}")
    if len(summary["errors"]) > 10:
        lines.append(f"… and {len(summary['errors']) - 10} more errors (results.csv)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Pictures


def id_sim_histogram(
    before: list[float], after: list[float], size: tuple[int, int] = (480, 300), bins: int = 20
):
    """Histogram of ID-Sim before (grey) and after (red) restoration over [lo, 1] (lo = 0, or lower
    when a value is), with the same-person threshold dashed."""
    from PIL import Image, ImageDraw

    lo = min([0.0] + [math.floor(v * 10) / 10 for v in before + after])
    width = (1.0 - lo) / bins

    def counts(values):
        c = [0] * bins
        for v in values:
            c[min(int((v - lo) / width), bins - 1)] += 1
        return c

    c_before, c_after = counts(before), counts(after)
    top_count = max(c_before + c_after + [1])
    w_px, h_px = size
    left, right, top, bottom = 40, w_px - 15, 30, h_px - 40
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    bin_px = (right - left) / bins
    for i in range(bins):
        for j, (c, colour) in enumerate(
            ((c_before[i], (150, 150, 150)), (c_after[i], (200, 30, 30)))
        ):
            if c:
                x0 = left + i * bin_px + 1 + j * (bin_px - 2) / 2
                draw.rectangle(
                    [
                        x0,
                        bottom - c / top_count * (bottom - top),
                        x0 + (bin_px - 2) / 2 - 1,
                        bottom,
                    ],
                    fill=colour,
                )
    x_same = left + (SAME_PERSON_THRESHOLD - lo) / (1 - lo) * (right - left)
    for y in range(top, bottom, 8):
        draw.line([x_same, y, x_same, y + 4], fill=(0, 0, 0))
    for value in (lo, SAME_PERSON_THRESHOLD, 1.0):
        x = left + (value - lo) / (1 - lo) * (right - left)
        draw.text((x - 8, bottom + 4), f"{value:g}", fill=(0, 0, 0))
    draw.text((2, top - 4), str(top_count), fill=(0, 0, 0))
    draw.text((left, bottom + 20), "ID-Sim to the original (ArcFace cosine)", fill=(0, 0, 0))
    draw.text(
        (left, 8), f"before (grey, n={len(before)})   after (red, n={len(after)})", fill=(0, 0, 0)
    )
    return img


def contact_sheet(out: Path, records: list[dict]):
    """One line per record: its id, then original | edited | restored, each scaled to fit THUMB²
    px."""
    from PIL import Image, ImageDraw, ImageOps

    label, gap = 14, 6
    sheet = Image.new(
        "RGB",
        (3 * THUMB + 4 * gap, label + len(records) * (THUMB + label + gap) + gap),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(sheet)
    for j, title in enumerate(("original", "edited", "restored")):
        draw.text((gap + j * (THUMB + gap), gap // 2), title, fill=(0, 0, 0))
    for i, r in enumerate(records):
        y = label + gap + i * (THUMB + label + gap)
        draw.text((gap, y), r["id"], fill=(90, 90, 90))
        for j, path in enumerate((r["original"], r["edited"], out / r["result"])):
            thumb = ImageOps.contain(images.to_rgb(images.open_image(path)[0]), (THUMB, THUMB))
            sheet.paste(thumb, (gap + j * (THUMB + gap), y + label))
    return sheet
