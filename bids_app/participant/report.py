"""The participant's preprocessing report: registration overlays (PNG) and a QC table in one HTML page.

Each preprocessed image gets one figure: three orthogonal slices through the centre of the template's brain
(sagittal, coronal, axial; neurological display, left on the left) in grey, with the template's brain
outline (cyan) and its grey/white-matter boundary (yellow) drawn on top. A good registration puts the
yellow line on the image's grey/white boundary and the cyan line on the brain's edge. The page lists every
image with its QC figures and the pass/fail rule of :mod:`bids_app.preprocess.qc`, failures in red.

Figures go to ``html_path.parent / "figures"``; every file is written atomically. Matplotlib is used through
its object API with the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bids_app.derivatives import atomic_path, atomic_write_text, image_stem
from bids_app.preprocess.qc import QC_KEYS, brain_mask, qc_passes, qc_rule

logger = logging.getLogger(__name__)

FIGURES_DIRNAME = "figures"
OUTLINE_COLOR = "#00e5ff"
BOUNDARY_COLOR = "#ffd400"
FIGURE_DPI = 110


@dataclass(frozen=True)
class ReportEntry:
    """One preprocessed image in the report.

    Attributes:
        session_label: bare session label, None without sessions.
        kind: the image's BIDS suffix, ``"T1w"`` or ``"pet"``.
        image: the preprocessed image (X, Y, Z) on the cropped template grid.
        template: the template cut to the same grid.
        qc: :func:`bids_app.preprocess.qc.compute_qc` figures (any missing figure shows as n/a).
        extra_entities: entities that tell images of one session apart, e.g. ``"trc-FDG"``.
    """

    session_label: str | None
    kind: str
    image: nib.Nifti1Image
    template: nib.Nifti1Image
    qc: Mapping[str, float]
    extra_entities: str = ""


def figure_name(participant_label: str, entry: ReportEntry) -> str:
    """``sub-01_ses-M000[_trc-FDG]_desc-registration_<kind>.png``."""
    stem = image_stem(participant_label, entry.session_label, entry.extra_entities)
    return f"{stem}_desc-registration_{entry.kind}.png"


def _otsu(values: np.ndarray, n_bins: int = 128) -> float:
    """Otsu's threshold of ``values`` (the level separating them into two classes of least variance)."""
    counts, edges = np.histogram(values, bins=n_bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between))])


# Letters at the left and right edge of each view (RAS arrays shown with the origin at the bottom left).
_EDGE_LETTERS = {"sagittal": ("P", "A"), "coronal": ("L", "R"), "axial": ("L", "R")}


def _views(volume: np.ndarray, centre: Sequence[int]) -> list[tuple[str, np.ndarray, int, int]]:
    """(title, 2D slice to show with origin at the bottom, horizontal axis, vertical axis) per view."""
    x, y, z = centre
    return [
        ("sagittal", volume[x, :, :].T, 1, 2),  # anterior to the right, superior up
        ("coronal", volume[:, y, :].T, 0, 2),  # subject's left on the left, superior up
        ("axial", volume[:, :, z].T, 0, 1),  # left on the left, anterior up
    ]


def render_overlay(png_path: Path, entry: ReportEntry, title: str) -> None:
    """Write the three-view registration overlay of ``entry`` to ``png_path`` (PNG, atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = np.asarray(entry.image.dataobj, dtype=np.float32).reshape(entry.image.shape[:3])
    template = np.asarray(entry.template.dataobj, dtype=np.float32)
    mask = brain_mask(entry.template)
    inside = image[mask] if mask.any() else image.ravel()
    low, high = np.percentile(inside, [0.5, 99.5])
    boundary = _otsu(template[mask]) if mask.any() else float(template.mean())
    centre = [round(float(c)) for c in np.argwhere(mask).mean(axis=0)] if mask.any() else [n // 2 for n in image.shape]
    zooms = np.linalg.norm(np.asarray(entry.image.affine)[:3, :3], axis=0)

    figure = Figure(figsize=(12.0, 4.6), dpi=FIGURE_DPI, facecolor="black")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    image_views = _views(image, centre)
    template_views = _views(template, centre)
    mask_views = _views(mask.astype(np.float32), centre)
    for ax, (name, shown, h_axis, v_axis), (_, tpl, _, _), (_, outline, _, _) in zip(
        axes, image_views, template_views, mask_views, strict=True
    ):
        aspect = float(zooms[v_axis] / zooms[h_axis])
        ax.imshow(shown, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect, interpolation="nearest")
        if outline.any():
            ax.contour(outline, levels=[0.5], colors=OUTLINE_COLOR, linewidths=0.9, origin="lower")
        if (tpl > boundary).any() and (tpl < boundary).any():
            ax.contour(tpl, levels=[boundary], colors=BOUNDARY_COLOR, linewidths=0.6, origin="lower")
        ax.set_title(name, color="white", fontsize=11)
        for x, letter in zip((0.01, 0.99), _EDGE_LETTERS[name], strict=True):
            ax.text(x, 0.5, letter, transform=ax.transAxes, color="white", fontsize=12, ha="center", va="center")
        ax.set_axis_off()
    figure.suptitle(title, color="white", fontsize=12)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.03)
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png", facecolor="black", metadata={"Software": None})


def _format(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        return "n/a"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f0f0f0; } td.label { text-align: left; }
td.pass { background: #d9f2d9; color: #145214; font-weight: bold; text-align: center; }
td.fail { background: #f8d0d0; color: #8a1010; font-weight: bold; text-align: center; }
td.rule { font-weight: bold; }
figure { margin: 0.5em 0; } figure img { max-width: 100%; border: 1px solid #444; }
figcaption, p.note { color: #555; font-size: 0.9em; }
"""


def _session_text(entry: ReportEntry) -> str:
    return f"ses-{entry.session_label}" if entry.session_label else "(no session)"


def _table(entries: Sequence[ReportEntry], names: Sequence[str]) -> list[str]:
    extra_keys = sorted({k for e in entries for k in e.qc if k not in QC_KEYS})
    keys = [*QC_KEYS, *extra_keys]
    header = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = [f"<table><tr><th>session</th><th>image</th><th>QC</th>{header}</tr>"]
    for entry, name in zip(entries, names, strict=True):
        rule_key, _ = qc_rule(entry.kind)
        passed = qc_passes(entry.qc, entry.kind)
        cells = "".join(f'<td class="{"rule" if k == rule_key else ""}">{_format(entry.qc.get(k))}</td>' for k in keys)
        image_text = " ".join(t for t in (entry.extra_entities, entry.kind) if t)
        rows.append(
            f'<tr><td class="label">{html.escape(_session_text(entry))}</td>'
            f'<td class="label"><a href="#{html.escape(name)}">{html.escape(image_text)}</a></td>'
            f'<td class="{"pass" if passed else "fail"}">{"PASS" if passed else "FAIL"}</td>{cells}</tr>'
        )
    rows.append("</table>")
    return rows


def write_participant_report(html_path: Path, participant_label: str, entries: Sequence[ReportEntry]) -> None:
    """Write the participant's HTML report and one overlay PNG per entry under ``html_path.parent/figures``.

    Args:
        html_path: the report page (e.g. ``derivatives.report_path(...)``); its folder is created.
        participant_label: bare label (``"01"``).
        entries: the participant's preprocessed images, in the order to show them.
    """
    from bids_app.preprocess import qc as qc_module

    html_path = Path(html_path)
    figures_dir = html_path.parent / FIGURES_DIRNAME
    names = [figure_name(participant_label, e) for e in entries]
    sections = []
    for entry, name in zip(entries, names, strict=True):
        rule_key, threshold = qc_rule(entry.kind)
        passed = qc_passes(entry.qc, entry.kind)
        verdict = "PASS" if passed else "FAIL"
        title = (
            f"sub-{participant_label}  {_session_text(entry)}  {entry.extra_entities} {entry.kind}  —  "
            f"{rule_key} {_format(entry.qc.get(rule_key))} (≥ {threshold:g}): {verdict}"
        )
        render_overlay(figures_dir / name, entry, " ".join(title.split()))
        sections.append(
            f'<h2 id="{html.escape(name)}">{html.escape(_session_text(entry))} — '
            f"{html.escape(' '.join(t for t in (entry.extra_entities, entry.kind) if t))} "
            f'<span style="color:{"#145214" if passed else "#8a1010"}">{verdict}</span></h2>'
            f'<figure><img src="{FIGURES_DIRNAME}/{html.escape(name)}" alt="registration overlay {html.escape(name)}">'
            "<figcaption>Preprocessed image in grey; template brain outline in cyan, template grey/white "
            "boundary in yellow. The lines should follow the image's brain edge and grey/white boundary."
            "</figcaption></figure>"
        )
    rule_text = (
        f"T1w images pass when smoothed_correlation_to_template ≥ {qc_module.MIN_T1W_CORRELATION:g}; "
        f"PET images pass when nmi_to_template ≥ {qc_module.MIN_PET_NMI:g}. Figures are computed inside the "
        "template's brain mask on the cropped template grid (bold: the figure that decides)."
    )
    n_failed = sum(not qc_passes(e.qc, e.kind) for e in entries)
    summary = f"{len(entries)} image(s), {n_failed} failing QC." if entries else "No preprocessed image."
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>sub-{html.escape(participant_label)} preprocessing report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>sub-{html.escape(participant_label)}: preprocessing report</h1>",
        f"<p>{html.escape(summary)}</p>",
        *_table(entries, names),
        f'<p class="note">{html.escape(rule_text)}</p>',
        *sections,
        "</body></html>",
    ]
    atomic_write_text(html_path, "\n".join(page) + "\n")
    logger.info("Wrote report %s (%d figure(s))", html_path, len(entries))
