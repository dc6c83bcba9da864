"""The participant's preprocessing report: one self-contained HTML page per participant.

For every preprocessed image the page shows, in order:

- **before / after**: the input image as acquired (reoriented to RAS for display only) above the registered
  image, three orthogonal views each; on the registered image the template's brain outline (cyan) and its
  grey/white-matter boundary (yellow). A good registration puts the yellow line on the image's grey/white
  boundary and the cyan line on the brain's edge.
- **mosaic**: seven slices per view (sagittal, coronal, axial) across the template's brain, with the same lines.
- **what the network will see**: for each extracted mode, a strip cut from the tensor itself after
  normalisation (a few slices, patches or regions, or the three views of the whole image), drawn on the
  tensor's own value range, with its shape, dtype and normalisation: from the array the job has just written
  (the bytes its sidecar's checksum vouches for), or read back from the file when the tensor was re-used.

Every tile carries the orientation letters at its edges (neurological display: left on the left). Above the
images, the QC table with the pass/fail rule of :mod:`bids_app.preprocess.qc`, failures in red.

Figures are PNGs embedded as ``data:`` URIs (:mod:`bids_app.participant.panels` draws them with numpy and
Pillow in milliseconds), the CSS is inline, and the page has no script and no link outside itself, so it can
be mailed or archived alone. Written atomically.
"""

from __future__ import annotations

import base64
import html
import logging
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np

from bids_app.derivatives import atomic_write_text, image_stem
from bids_app.errors import BidsAppError
from bids_app.participant.panels import VIEWS, Geometry, Panel, cut, evenly_spaced, render_panels
from bids_app.preprocess.qc import QC_KEYS, brain_mask, qc_passes, qc_rule

logger = logging.getLogger(__name__)

OUTLINE_COLOR = (0, 229, 255)
BOUNDARY_COLOR = (255, 212, 0)
MOSAIC_SLICES = 7  # slices per view in the mosaic
MAX_PARTS = 8  # slices or patches shown per tensor
MAX_REGIONS = 3  # regions shown per roi tensor, three views each
RAW_SUBSAMPLE = 2  # every n-th voxel along each axis is enough for a display window


@dataclass(frozen=True)
class ReportEntry:
    """One preprocessed image in the report.

    Attributes:
        session_label: bare session label, None without sessions.
        kind: the image's BIDS suffix, ``"T1w"``, ``"T2w"``, ``"FLAIR"`` or ``"pet"``.
        image: the preprocessed image (X, Y, Z) on the cropped template grid.
        template: the template cut to the same grid.
        qc: :func:`bids_app.preprocess.qc.compute_qc` figures (any missing figure shows as n/a).
        extra_entities: entities that tell images of one session apart, e.g. ``"trc-FDG"``.
        raw_path: the input image before preprocessing (None: the before/after figure shows only the after).
        tensor_paths: extraction mode (``image``, ``patch``, ``slice``, ``roi``) → the tensor ``.npy`` written
            for this image; a missing or incomplete file is named in the page instead of its strip.
        network_inputs: mode → its strip already drawn (:func:`network_input_figure`) from the array the job
            wrote; those modes' files are not read again.
        input_panels: the before/after figure's input row already cut (:func:`input_panels`) from the input the
            job held in memory; when empty, ``raw_path`` is read.
    """

    session_label: str | None
    kind: str
    image: nib.Nifti1Image
    template: nib.Nifti1Image
    qc: Mapping[str, float]
    extra_entities: str = ""
    raw_path: Path | None = None
    tensor_paths: Mapping[str, Path] = field(default_factory=dict)
    network_inputs: Mapping[str, str] = field(default_factory=dict)
    input_panels: tuple[Panel, ...] = ()


def section_id(participant_label: str, entry: ReportEntry) -> str:
    """The anchor of an image's section: ``sub-01_ses-M000[_trc-FDG]_<kind>``."""
    return f"{image_stem(participant_label, entry.session_label, entry.extra_entities)}_{entry.kind}"


# -- figures --------------------------------------------------------------------------------------------


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


def _window(volume: np.ndarray) -> tuple[float, float]:
    """Display range: the 0.5 and 99.5 percentiles of the non-zero voxels (of every other voxel)."""
    sample = volume[::RAW_SUBSAMPLE, ::RAW_SUBSAMPLE, ::RAW_SUBSAMPLE]
    values = sample[np.isfinite(sample) & (sample != 0)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high) if high > low else float(low) + 1.0


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(png: bytes, kind: str, alt: str, caption: str, data: str = "") -> str:
    """A ``<figure class="kind">`` holding one embedded PNG and its caption."""
    return (
        f'<figure class="{kind}"{data}><img src="{_data_uri(png)}" alt="{html.escape(alt)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


class _Overlay:
    """What the template draws over every image on its grid: brain outline, tissue boundary, centre, and which
    voxels set the display window. Computed once per template in a report (every image of a participant shares
    it)."""

    def __init__(self, template_image: nib.Nifti1Image) -> None:
        self.mask = brain_mask(template_image)
        template = np.asarray(template_image.dataobj, dtype=np.float32)
        # the display window's sample: every k-th brain voxel (C order), about 200 000 of them
        inside = np.flatnonzero(self.mask) if self.mask.any() else np.arange(template.size)
        self.sample = inside[:: max(1, inside.size // 200_000)]
        threshold = _otsu(template[self.mask]) if self.mask.any() else float(template.mean())
        # the brain outline last: where the tissue boundary meets the brain's edge, the edge is what is shown
        self.outlines = [(self.mask & (template > threshold), BOUNDARY_COLOR), (self.mask, OUTLINE_COLOR)]
        self.centre = [n // 2 for n in template.shape[:3]]
        if self.mask.any():  # the brain's centre of mass, from its three profiles (cheaper than its coordinates)
            for axis, n in enumerate(template.shape[:3]):
                profile = self.mask.sum(axis=tuple(a for a in range(3) if a != axis))
                self.centre[axis] = round(float(np.average(np.arange(n), weights=profile)))


# template image → its overlay, while the image lives (a job keeps its template crop for the whole process)
_OVERLAYS: weakref.WeakKeyDictionary[nib.Nifti1Image, _Overlay] = weakref.WeakKeyDictionary()


class _Registered:
    """The preprocessed image with what is drawn over it: the template's brain outline and tissue boundary."""

    def __init__(self, entry: ReportEntry, overlay: _Overlay | None = None) -> None:
        overlay = overlay or _Overlay(entry.template)
        self.volume = np.asarray(entry.image.dataobj, dtype=np.float32).reshape(entry.image.shape[:3])
        self.geometry = Geometry.of(entry.image.affine)
        self.mask = overlay.mask
        low, high = np.percentile(self.volume.reshape(-1)[overlay.sample], [0.5, 99.5])  # a sample is enough
        self.window = (float(low), float(high) if high > low else float(low) + 1.0)
        self.outlines = overlay.outlines
        self.centre = overlay.centre

    def panel(self, view: str, index: int | None = None, caption: str = "") -> Panel:
        normal = self.geometry.normal_axis(view)
        index = self.centre[normal] if index is None else index
        return cut(self.volume, self.geometry, normal, index, self.window, caption or view, self.outlines)

    def mosaic_row(self, view: str) -> list[Panel]:
        """``MOSAIC_SLICES`` cuts of ``view`` from 10 % to 90 % of the brain's extent along its normal."""
        normal = self.geometry.normal_axis(view)
        profile = np.flatnonzero(self.mask.any(axis=tuple(a for a in range(3) if a != normal)))
        first, last = (int(profile[0]), int(profile[-1])) if profile.size else (0, self.volume.shape[normal] - 1)
        margin = (last - first) * 0.1
        positions = np.linspace(first + margin, last - margin, MOSAIC_SLICES)
        indices = sorted({round(p) for p in positions})
        return [self.panel(view, i, f"{view[:3]} {i}") for i in indices]


def input_panels(image: nib.spatialimages.SpatialImage) -> tuple[Panel, ...]:
    """The before/after figure's top row: three views of the input image through its head's centre, in RAS for
    display (4D: mean of the frames).

    A job that holds the input in memory cuts them at once (:attr:`ReportEntry.input_panels`): three planes are
    kept, not the volume, and the report does not read and decompress the input a second time.
    """
    image = nib.as_closest_canonical(image)
    data = np.asarray(image.dataobj, dtype=np.float32)
    volume = data.reshape((*data.shape[:3], -1)).mean(axis=3) if data.ndim > 3 else data
    geometry = Geometry.of(image.affine)
    window = _window(volume)
    sample = volume[::RAW_SUBSAMPLE, ::RAW_SUBSAMPLE, ::RAW_SUBSAMPLE]
    positive = sample[sample > 0]
    head = sample > _otsu(positive) if positive.size else sample > 0
    centre = (
        [round(float(c)) * RAW_SUBSAMPLE for c in np.argwhere(head).mean(axis=0)]
        if head.any()
        else [n // 2 for n in volume.shape]
    )
    rows = []
    for view in VIEWS:
        normal = geometry.normal_axis(view)
        index = min(centre[normal], volume.shape[normal] - 1)
        rows.append(cut(volume, geometry, normal, index, window, f"input {view}"))
    return tuple(rows)


def _before_after(entry: ReportEntry, registered: _Registered) -> str:
    after = [registered.panel(view, caption=f"registered {view}") for view in VIEWS]
    rows, note = [after], ""
    if entry.input_panels:
        rows.insert(0, list(entry.input_panels))
    elif entry.raw_path is not None:
        try:
            rows.insert(0, list(input_panels(cast(nib.spatialimages.SpatialImage, nib.load(entry.raw_path)))))
        except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
            note = f" The input image {html.escape(str(entry.raw_path))} could not be read ({html.escape(str(exc))})."
    source = "input image (top) and " if len(rows) == 2 else ""
    caption = (
        f"Before and after: the {source}preprocessed image on the template grid; template brain outline in cyan, "
        "template grey/white boundary in yellow. The lines should follow the image's brain edge and grey/white "
        f"boundary. The input is shown in its own voxel grid, reoriented to RAS.{note}"
    )
    return _figure(render_panels(rows), "before-after", "input and registered image", caption)


def _mosaic(registered: _Registered) -> str:
    rows = [registered.mosaic_row(view) for view in VIEWS]
    caption = (
        f"Mosaic: {MOSAIC_SLICES} sagittal, coronal and axial slices (voxel index at the bottom left) across the "
        "template's brain, with the template's brain outline (cyan) and grey/white boundary (yellow)."
    )
    return _figure(render_panels(rows), "mosaic", "mosaic of the registered image", caption)


def _tensor_panels(tensor: np.ndarray, mode: str, parameters: Mapping[str, Any], geometry: Geometry,
                   window: tuple[float, float]) -> tuple[list[list[Panel]], str]:  # fmt: skip
    """The tiles of one tensor (see the module docstring) and a phrase saying which parts they show."""
    n_parts = tensor.shape[0]
    if mode == "slice":
        normal = int(parameters.get("SliceAxis", 0))
        chosen = evenly_spaced(0, n_parts, MAX_PARTS)
        axes = [a for a in range(3) if a != normal]
        panels = [
            Panel(np.asarray(tensor[i, 0], dtype=np.float32), (geometry.zooms[axes[0]], geometry.zooms[axes[1]]),
                  window, geometry.letters(axes[0], axes[1]), f"slice {i}")
            for i in chosen
        ]  # fmt: skip
        return [panels], f"slices {', '.join(map(str, chosen))} of {n_parts}"
    if mode == "patch":
        # the patches with the most contrast: evenly spaced ones would often be background
        spread = np.asarray(tensor, dtype=np.float32).reshape(n_parts, -1).std(axis=1)
        chosen = sorted(int(i) for i in np.argsort(-spread, kind="stable")[:MAX_PARTS])
        normal = geometry.normal_axis("axial")
        panels = [
            cut(np.asarray(tensor[i, 0], dtype=np.float32), geometry, normal, tensor.shape[2 + normal] // 2, window,
                f"patch {i}")
            for i in chosen
        ]  # fmt: skip
        return [
            panels
        ], f"the central axial slice of patches {', '.join(map(str, chosen))} of {n_parts} (most contrast)"
    names = list(parameters.get("RoiNames") or []) if mode == "roi" else []
    rows = []
    for i in range(min(n_parts, MAX_REGIONS if mode == "roi" else 1)):
        part = np.asarray(tensor[i] if mode == "image" else tensor[i, 0], dtype=np.float32)  # image: (1, D, H, W)
        name = names[i] if i < len(names) else (f"region {i}" if mode == "roi" else "image")
        rows.append(
            [cut(part, geometry, geometry.normal_axis(v), part.shape[geometry.normal_axis(v)] // 2, window,
                 f"{name} {v[:3]}") for v in VIEWS]
        )  # fmt: skip
    if mode == "roi":
        return rows, f"three central views of region(s) {', '.join(names[: len(rows)]) or len(rows)} of {n_parts}"
    return rows, "three central views of the whole image"


def _network_input(mode: str, path: Path, geometry: Geometry) -> str:
    """The strip of one tensor file, or a note naming the file when it cannot be read."""
    from bids_app.extraction.storage import load_tensor, read_sidecar

    try:
        tensor = load_tensor(path)
        sidecar = read_sidecar(path)
    except BidsAppError as exc:
        reason = html.escape(f"{mode}: no tensor to show ({exc})")
        return f'<p class="note network-input-missing">{reason}</p>'
    return network_input_figure(mode, tensor, sidecar, path, geometry)


def network_input_figure(
    mode: str, tensor: np.ndarray, sidecar: Mapping[str, Any], path: Path, geometry: Geometry
) -> str:
    """The strip of one tensor (see the module docstring) as an HTML figure.

    A job calls it right after writing the tensor, with the very array it wrote (the bytes its sidecar's
    checksum vouches for) and puts the result in :attr:`ReportEntry.network_inputs`: the page then needs no
    second read of the file. A re-used tensor is read back from ``path`` instead (:func:`_network_input`).

    Args:
        mode: ``image``, ``slice``, ``patch`` or ``roi``.
        tensor: the tensor, ``(n_parts, 1, ...)``.
        sidecar: its sidecar (``ModeParameters``, ``Normalization``).
        path: the ``.npy`` file, named in the caption.
        geometry: the source image's :class:`Geometry` (orientation letters, voxel sizes).
    """
    low, high = float(np.min(tensor)), float(np.max(tensor))
    window = (low, high if high > low else low + 1.0)
    rows, shown = _tensor_panels(tensor, mode, sidecar.get("ModeParameters") or {}, geometry, window)
    caption = (
        f"<b>{html.escape(mode)}</b>: tensor {html.escape(str(tuple(tensor.shape)))} {html.escape(tensor.dtype.name)}, "
        f"{html.escape(str(sidecar.get('Normalization', 'n/a')))} normalisation, values {low:.3f} to {high:.3f} "
        f"(black to white); showing {html.escape(shown)}. <code>{html.escape(path.name)}</code>"
    )
    return _figure(render_panels(rows), "network-input", f"{mode} tensor", caption, f' data-mode="{html.escape(mode)}"')


# -- page -----------------------------------------------------------------------------------------------


def _format(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        return "n/a"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; color: #222; padding: 0 1em;
       box-sizing: border-box; }
h1 { font-size: 1.5em; overflow-wrap: anywhere; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin-top: 1.2em; }
div.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
td { white-space: nowrap; }
th { background: #f0f0f0; } td.label { text-align: left; }
td.pass { background: #d9f2d9; color: #145214; font-weight: bold; text-align: center; }
td.fail { background: #f8d0d0; color: #8a1010; font-weight: bold; text-align: center; }
td.rule { font-weight: bold; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; height: auto; display: block; border: 1px solid #444; }
figcaption, p.note { color: #555; font-size: 0.9em; overflow-wrap: anywhere; }
"""


def _session_text(entry: ReportEntry) -> str:
    return f"ses-{entry.session_label}" if entry.session_label else "(no session)"


def _table(entries: Sequence[ReportEntry], anchors: Sequence[str]) -> list[str]:
    extra_keys = sorted({k for e in entries for k in e.qc if k not in QC_KEYS})
    keys = [*QC_KEYS, *extra_keys]
    header = "".join(f"<th>{html.escape(k).replace('_', '_<wbr>')}</th>" for k in keys)  # long names may wrap
    rows = [f'<div class="scroll"><table><tr><th>session</th><th>image</th><th>QC</th>{header}</tr>']
    for entry, anchor in zip(entries, anchors, strict=True):
        rule_key, _ = qc_rule(entry.kind)
        passed = qc_passes(entry.qc, entry.kind)
        cells = "".join(f'<td class="{"rule" if k == rule_key else ""}">{_format(entry.qc.get(k))}</td>' for k in keys)
        image_text = " ".join(t for t in (entry.extra_entities, entry.kind) if t)
        rows.append(
            f'<tr><td class="label">{html.escape(_session_text(entry))}</td>'
            f'<td class="label"><a href="#{html.escape(anchor)}">{html.escape(image_text)}</a></td>'
            f'<td class="{"pass" if passed else "fail"}">{"PASS" if passed else "FAIL"}</td>{cells}</tr>'
        )
    rows.append("</table></div>")
    return rows


def _section(participant_label: str, entry: ReportEntry, anchor: str, overlay: _Overlay | None = None) -> str:
    rule_key, threshold = qc_rule(entry.kind)
    passed = qc_passes(entry.qc, entry.kind)
    verdict = "PASS" if passed else "FAIL"
    image_text = " ".join(t for t in (entry.extra_entities, entry.kind) if t)
    registered = _Registered(entry, overlay)
    parts = [
        f'<section><h2 id="{html.escape(anchor)}">{html.escape(_session_text(entry))} — {html.escape(image_text)} '
        f'<span style="color:{"#145214" if passed else "#8a1010"}">{verdict}</span></h2>',
        f'<p class="note">{html.escape(rule_key)} {_format(entry.qc.get(rule_key))} (pass: ≥ {threshold:g}).</p>',
        _before_after(entry, registered),
        _mosaic(registered),
        "<h3>What the network will see</h3>",
    ]
    if entry.tensor_paths:
        parts += [
            entry.network_inputs.get(mode) or _network_input(mode, Path(path), registered.geometry)
            for mode, path in entry.tensor_paths.items()
        ]
    else:
        parts.append('<p class="note">No tensor was extracted from this image.</p>')
    parts.append("</section>")
    return "".join(parts)


def write_participant_report(html_path: Path, participant_label: str, entries: Sequence[ReportEntry]) -> None:
    """Write the participant's self-contained HTML report.

    Args:
        html_path: the report page (e.g. ``derivatives.report_path(...)``); its folder is created.
        participant_label: bare label (``"01"``).
        entries: the participant's preprocessed images, in the order to show them.
    """
    from bids_app.preprocess import qc as qc_module

    html_path = Path(html_path)
    anchors = [section_id(participant_label, e) for e in entries]
    for entry in entries:  # a participant's images share one template, and a process's jobs share theirs
        if entry.template not in _OVERLAYS:
            _OVERLAYS[entry.template] = _Overlay(entry.template)
    sections = [_section(participant_label, e, a, _OVERLAYS[e.template]) for e, a in zip(entries, anchors, strict=True)]
    rule_text = (
        f"T1w images pass when smoothed_correlation_to_template ≥ {qc_module.MIN_T1W_CORRELATION:g}; "
        f"T2w and FLAIR images when nmi_to_template ≥ {qc_module.MIN_CONTRAST_NMI:g}; "
        f"PET images pass when nmi_to_template ≥ {qc_module.MIN_PET_NMI:g}; custom maps (--custom-map) when "
        f"nmi_to_template ≥ {qc_module.MIN_MAP_NMI:g}. Figures are computed inside the "
        "template's brain mask on the cropped template grid (bold: the figure that decides)."
    )
    n_failed = sum(not qc_passes(e.qc, e.kind) for e in entries)
    summary = f"{len(entries)} image(s), {n_failed} failing QC." if entries else "No preprocessed image."
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>sub-{html.escape(participant_label)} preprocessing report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>sub-{html.escape(participant_label)}: preprocessing report</h1>",
        f"<p>{html.escape(summary)}</p>",
        *_table(entries, anchors),
        f'<p class="note">{html.escape(rule_text)}</p>',
        *sections,
        "</body></html>",
    ]
    atomic_write_text(html_path, "\n".join(page) + "\n")
    logger.info("Wrote report %s (%d image(s))", html_path, len(entries))
