"""The group report: one self-contained HTML page per model folder (``models/<name>/report.html``).

The page shows what a reader needs to judge a trained MAPS without opening its TSVs: the data and its
split demographics, the learning curves of every split, the test group's results (confusion matrix, ROC
curve or true-versus-predicted scatter, and the metric table with its 95 % bootstrap intervals, its n, the
class sensitivity/specificity are for, and a warning banner for a small group), a warning when a model was
selected on a small validation group, the metrics' mean ± sd across splits (several splits), the mean
saliency maps when the interpret stage ran, and links to the participants' preprocessing reports.

Figures are PNGs embedded as base64 ``data:`` URIs and the CSS is inline, so the file opens offline and can
be mailed or archived alone. Every input is required: a missing or unreadable file raises (nothing is
written), so a run never ends with a half report. Matplotlib is used through its object API with the Agg
canvas (no pyplot state, no display). See ``docs/reports.md``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bids_app.config import Task
from bids_app.derivatives import atomic_write_text, report_path
from bids_app.errors import DataError, InputMissingError
from bids_app.maps import Maps, MapsLayout, MapsRecord
from bids_app.maps.splits import TEST_TSV
from bids_app.metrics import SMALL_GROUP_RULE, describe_positive_class, positive_class_index

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

TEST_GROUP = "test"
VALIDATION_GROUP = "validation"
FIGURE_DPI = 100
MAX_UNDERLAY_IMAGES = 10  # preprocessed images averaged under the saliency maps
SALIENCY_FLOOR = 0.5  # map values below this fraction of the map's largest |value| are not drawn
# Curve plotted next to the losses when every selection metric is the loss.
DEFAULT_CURVE_METRIC = {Task.CLASSIFICATION: "balanced_accuracy", Task.REGRESSION: "mae", Task.RECONSTRUCTION: "mae"}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin-top: 1.5em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
p.note { color: #555; font-size: 0.9em; } ul.links { columns: 4; font-size: 0.9em; }
p.warning { background: #fff3cd; border: 1px solid #e0c060; padding: 0.5em 0.8em; }
"""


# -- inputs ---------------------------------------------------------------------------------------------


def _read_tsv(path: Path, what: str) -> pd.DataFrame:
    """A required TSV (``n/a`` read as missing); InputMissingError/DataError naming the file otherwise."""
    if not path.is_file():
        raise InputMissingError(
            f"Cannot write the group report: {what} {path} is missing. Re-run the group level stages that "
            "write it (split, train, predict) for this model."
        )
    try:
        return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot write the group report: {what} {path} is not a readable TSV ({exc}).") from exc


def _required_columns(table: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"Cannot write the group report: {path} lacks column(s) {', '.join(missing)}.")


# -- HTML pieces ----------------------------------------------------------------------------------------


def _cell(value: object) -> str:
    if isinstance(value, float | np.floating):
        return "n/a" if np.isnan(value) else f"{value:.3f}"
    return html.escape(str(value))


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = ["<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False)]
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    return figure


def _img(figure: Figure, alt: str) -> str:
    """``<img>`` with ``figure`` as an embedded PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


# -- sections -------------------------------------------------------------------------------------------


def _summary_section(layout: MapsLayout, task: Task) -> str:
    rows = []
    for group, path in (
        ("train+validation", layout.train_validation_tsv),
        ("test", layout.groups_dir / TEST_TSV),
    ):
        table = _read_tsv(path, f"{group} table")
        _required_columns(table, ("participant_id", "session_id", "label"), path)
        if task is Task.CLASSIFICATION:
            counts = table["label"].astype(str).value_counts().sort_index()
            labels = ", ".join(f"{name}: {n}" for name, n in counts.items())
        else:
            values = pd.to_numeric(table["label"], errors="coerce")
            labels = f"{values.mean():.2f} ± {values.std():.2f} (n={int(values.notna().sum())})"
        rows.append({"group": group, "participants": table["participant_id"].nunique(), "images": len(table),
                     "labels (images)": labels})  # fmt: skip
    demographics_path = layout.groups_dir / "demographics.tsv"
    demographics = _read_tsv(demographics_path, "split demographics")
    return (
        f"<h2>Data</h2>{_table(pd.DataFrame(rows))}<h3>Split demographics</h3>{_table(demographics)}"
        '<p class="note">Age and sex are counted once per participant (first session in the group).</p>'
    )


def _curve_metrics(record: MapsRecord) -> list[str]:
    chosen = [m for m in record.config.train.selection_metrics if m != "loss"]
    return chosen or [DEFAULT_CURVE_METRIC[record.task]]


def _learning_curves(layout: MapsLayout, record: MapsRecord, split: int) -> str:
    path = layout.training_tsv(split)
    log_table = _read_tsv(path, "training log")
    metrics = _curve_metrics(record)
    _required_columns(
        log_table, ["epoch", "train_loss", "validation_loss", *(f"validation_{m}" for m in metrics)], path
    )
    figure = _new_figure(10.0, 3.2)
    loss_ax, metric_ax = figure.subplots(1, 2)
    epochs = log_table["epoch"].to_numpy()
    loss_ax.plot(epochs, log_table["train_loss"], marker="o", label="training loss")
    loss_ax.plot(epochs, log_table["validation_loss"], marker="o", label="validation loss")
    for metric in metrics:
        metric_ax.plot(epochs, log_table[f"validation_{metric}"], marker="o", label=f"validation {metric}")
    for metric in record.config.train.selection_metrics:
        selection = layout.selection_json(split, metric)
        if selection.is_file():
            epoch = json.loads(selection.read_text(encoding="utf-8"))["epoch"]
            for ax in (loss_ax, metric_ax):
                ax.axvline(epoch, color="grey", linestyle="--", linewidth=0.8)
    from matplotlib.ticker import MaxNLocator

    for ax, title in ((loss_ax, "loss (mean over samples)"), (metric_ax, "validation metric")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return _img(figure, f"learning curves split {split}")


def _confusion_and_roc(
    prediction: pd.DataFrame, matrix: pd.DataFrame, class_names: list[str], title: str, positive: str
) -> str:
    from sklearn.metrics import auc, roc_curve

    figure = _new_figure(9.0, 3.8)
    cm_ax, roc_ax = figure.subplots(1, 2)
    counts = matrix[class_names].to_numpy(dtype=float)
    cm_ax.imshow(counts, cmap="Blues", vmin=0)
    for (i, j), n in np.ndenumerate(counts):
        cm_ax.text(j, i, f"{n:.0f}", ha="center", va="center", color="white" if n > counts.max() / 2 else "black")
    cm_ax.set_xticks(range(len(class_names)), class_names)
    cm_ax.set_yticks(range(len(class_names)), list(matrix["true_label"].astype(str)))
    cm_ax.set_xlabel("predicted")
    cm_ax.set_ylabel("true")
    cm_ax.set_title("confusion matrix", fontsize=10)
    labelled = prediction[prediction["true_label"].notna()]
    positives = [positive] if len(class_names) == 2 else class_names
    for name in positives:
        is_positive = (labelled["true_label"].astype(str) == name).to_numpy()
        if is_positive.all() or not is_positive.any():
            continue  # one-class ground truth: no curve
        fpr, tpr, _ = roc_curve(is_positive, labelled[f"proba_{name}"].to_numpy(dtype=float))
        roc_ax.plot(fpr, tpr, linewidth=2, label=f"{name} vs rest (AUC {auc(fpr, tpr):.2f})")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    roc_ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="false positive rate", ylabel="true positive rate")
    roc_ax.set_title("ROC", fontsize=10)
    if roc_ax.get_legend_handles_labels()[0]:
        roc_ax.legend(fontsize=8, loc="lower right")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _img(figure, title)


def _scatter(prediction: pd.DataFrame, title: str) -> str:
    figure = _new_figure(4.5, 4.2)
    ax = figure.subplots()
    true = prediction["true_label"].to_numpy(dtype=float)
    predicted = prediction["predicted_label"].to_numpy(dtype=float)
    ax.scatter(true, predicted, s=18)
    finite = np.concatenate([true, predicted])
    finite = finite[np.isfinite(finite)]
    if finite.size:
        ax.plot([finite.min(), finite.max()], [finite.min(), finite.max()], color="grey", linestyle=":")
    ax.set(xlabel="true", ylabel="predicted")
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    return _img(figure, title)


def _metric_table(metrics: pd.DataFrame) -> pd.DataFrame:
    intervals = zip(metrics["ci_low"].astype(float), metrics["ci_high"].astype(float), strict=True)
    return pd.DataFrame(
        {
            "metric": metrics["metric"],
            "value": metrics["value"].astype(float),
            "95 % interval": [f"{_cell(low)} – {_cell(high)}" for low, high in intervals],
        }
    )


def _test_results(layout: MapsLayout, record: MapsRecord, split: int, metric: str, group: str = TEST_GROUP) -> str:
    """Predictions and metrics of one model on ``group`` (the test group, or validation without a test set)."""
    folder = layout.group_dir(split, metric, group)
    prediction_path = folder / f"{group}_image_level_prediction.tsv"
    metrics_path = layout.metrics_tsv(split, metric, group)
    prediction = _read_tsv(prediction_path, f"{group} predictions")
    metrics = _read_tsv(metrics_path, f"{group} metrics")
    _required_columns(metrics, ("metric", "value", "ci_low", "ci_high"), metrics_path)
    title = f"split {split}, model best-{metric}, {group} group ({len(prediction)} images)"
    parts = [f"<h3>{group.capitalize()}: model best-{html.escape(metric)}</h3>"]
    if record.task is Task.CLASSIFICATION:
        class_names = sorted(record.label_encoding or {}, key=(record.label_encoding or {}).__getitem__)
        matrix_path = folder / f"{group}_confusion_matrix.tsv"
        matrix = _read_tsv(matrix_path, f"{group} confusion matrix")
        _required_columns(matrix, ["true_label", *class_names], matrix_path)
        probas = [f"proba_{name}" for name in class_names]
        _required_columns(prediction, ["true_label", *probas], prediction_path)
        positive = class_names[positive_class_index(class_names, record.config.labels.positive_class)]
        parts.append(_confusion_and_roc(prediction, matrix, class_names, title, positive))
    elif record.task is Task.REGRESSION:
        _required_columns(prediction, ("true_label", "predicted_label"), prediction_path)
        parts.append(_scatter(prediction, title))
    parts.append(_table(_metric_table(metrics)))
    parts.append(_metric_notes(metrics, record))
    return "".join(parts)


def _first(metrics: pd.DataFrame, column: str) -> object | None:
    """The value of a column that every row of a metric TSV repeats (None when absent or ``n/a``)."""
    if column not in metrics.columns or metrics.empty or pd.isna(metrics[column].iloc[0]):
        return None
    return metrics[column].iloc[0]


def _metric_notes(metrics: pd.DataFrame, record: MapsRecord) -> str:
    """The n behind a metric table, the class its one-vs-rest metrics are for, and its small-group banner."""
    notes = []
    n_images, n_participants = _first(metrics, "n_images"), _first(metrics, "n_participants")
    if n_images is not None and n_participants is not None:
        notes.append(f"n = {int(float(str(n_images)))} images of {int(float(str(n_participants)))} participants")
    if record.task is Task.CLASSIFICATION:
        encoding = record.label_encoding or {}
        notes.append(
            describe_positive_class(sorted(encoding, key=encoding.__getitem__), record.config.labels.positive_class)
        )
    text = f'<p class="note">{html.escape("; ".join(notes))}.</p>' if notes else ""
    warning = _first(metrics, "warning")
    if warning is not None:
        text += f'<p class="warning">{html.escape(str(warning))} (rule: {html.escape(SMALL_GROUP_RULE)}).</p>'
    return text


def _selection_warning(layout: MapsLayout, record: MapsRecord, split: int) -> str:
    """A banner when a model of ``split`` was selected on a small validation group (its metric TSV says so)."""
    banners = []
    for metric in record.config.train.selection_metrics:
        path = layout.metrics_tsv(split, metric, VALIDATION_GROUP)
        if not path.is_file():
            continue
        warning = _first(_read_tsv(path, "validation metrics"), "warning")
        if warning is not None:
            banners.append(
                f'<p class="warning">Split {split}, best-{html.escape(metric)}: the selected epoch was chosen on a '
                f"small validation group ({html.escape(str(warning))}), so the model selection itself is "
                "unreliable.</p>"
            )
    return "".join(banners)


def _split_summary_section(layout: MapsLayout, record: MapsRecord, group: str) -> str:
    """Mean ± sd over splits of each metric (``summary/`` TSVs written by the predict stage), when present."""
    parts = []
    for metric in record.config.train.selection_metrics:
        path = layout.split_summary_tsv(group, metric)
        if not path.is_file():
            continue
        summary = _read_tsv(path, "metrics across splits")
        _required_columns(summary, ("metric", "n_splits", "mean", "sd"), path)
        splits = [c for c in summary.columns if str(c).startswith("split-")]
        shown = pd.DataFrame(
            {
                "metric": summary["metric"],
                "mean ± sd": [f"{_cell(m)} ± {_cell(d)}" for m, d in zip(summary["mean"].astype(float),
                                                                         summary["sd"].astype(float), strict=True)],
                **{c: summary[c].astype(float) for c in splits},
            }
        )  # fmt: skip
        parts.append(f"<h3>{group.capitalize()}: model best-{html.escape(metric)}</h3>{_table(shown)}")
    if not parts:
        return ""
    note = "Mean and sample standard deviation over the splits where a metric is defined; one column per split."
    return f'<h2>Across splits</h2>{"".join(parts)}<p class="note">{note}</p>'


def _load_volume(path: Path) -> np.ndarray:
    """A 3D NIfTI's voxels, float32 ``(X, Y, Z)``; DataError naming the file when it is not readable."""
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    try:
        image = nib.load(path)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"Cannot write the group report: {path} is not a readable NIfTI ({exc}).") from exc
    if not isinstance(image, SpatialImage) or len(image.shape) != 3:
        raise DataError(f"Cannot write the group report: {path} is not a 3D image.")
    return np.asarray(image.dataobj, dtype=np.float32)


def _underlay(output_dir: Path, targets: pd.DataFrame, shape: tuple[int, ...]) -> np.ndarray | None:
    """Mean of the explained images' preprocessed T1w (same grid as the maps), or None if none is found."""
    volumes = []
    for participant, session in zip(targets["participant_id"], targets["session_id"], strict=True):
        folder = output_dir / participant / (session if str(session).startswith("ses-") else "") / "anat"
        for path in sorted(folder.glob("*_desc-preproc_T1w.nii.gz"))[:1]:
            volume = _load_volume(path)
            if volume.shape == shape:
                volumes.append(volume)
        if len(volumes) >= MAX_UNDERLAY_IMAGES:
            break
    return np.mean(volumes, axis=0) if volumes else None


def _saliency_figure(maps: list[Path], background: np.ndarray | None, title: str) -> str:
    figure = _new_figure(9.0, 2.9 * len(maps) + 0.4)
    axes = np.atleast_2d(figure.subplots(len(maps), 3))
    for row, path in zip(axes, maps, strict=True):
        volume = _load_volume(path)
        top = float(np.abs(volume).max())
        # slices through the map's peak; through the centre when the map is zero everywhere
        peak = np.unravel_index(int(np.argmax(np.abs(volume))), volume.shape) if top else [n // 2 for n in volume.shape]
        signed = bool((volume < 0).any())
        views = [
            (volume[peak[0]].T, "sagittal", 0),
            (volume[:, peak[1]].T, "coronal", 1),
            (volume[:, :, peak[2]].T, "axial", 2),
        ]
        for ax, (shown, name, axis) in zip(row, views, strict=True):
            if background is not None:
                bg = np.take(background, peak[axis], axis=axis).T
                ax.imshow(bg, cmap="gray", origin="lower", interpolation="nearest")
            masked = np.ma.masked_where(np.abs(shown) <= SALIENCY_FLOOR * top, shown)
            colours = {"cmap": "RdBu_r" if signed else "hot", "vmin": -top if signed else 0, "vmax": top or 1.0}
            ax.imshow(masked, origin="lower", alpha=0.7, interpolation="nearest", **colours)
            zero = "" if top else " (map is zero)"
            ax.set_title(f"{path.name.split('_desc-')[0]}  {name}{zero}", fontsize=9)
            ax.set_axis_off()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _img(figure, title)


def _saliency_section(output_dir: Path, layout: MapsLayout, record: MapsRecord, splits: list[int]) -> str:
    parts = ["<h2>Saliency maps</h2>"]
    for split in splits:
        for metric in record.config.train.selection_metrics:
            root = layout.group_dir(split, metric, TEST_GROUP) / "interpret"
            for method_dir in sorted(p for p in root.glob("*") if p.is_dir()):
                maps = sorted(method_dir.glob("class-*_mean_saliency.nii.gz"))
                if not maps:
                    continue
                targets = _read_tsv(root / "targets.tsv", "interpretation targets")
                background = _underlay(output_dir, targets, _load_volume(maps[0]).shape)
                title = f"split {split}, best-{metric}, {method_dir.name}: mean map per explained class"
                parts.append(_saliency_figure(maps, background, title))
    if len(parts) == 1:
        return parts[0] + '<p class="note">No saliency map: run the group level with --stages interpret.</p>'
    note = (
        f"Mean saliency per explained class at the slices through its peak, over the mean of up to "
        f"{MAX_UNDERLAY_IMAGES} explained images' preprocessed T1w (template space; axial and coronal views show "
        f"the subject's left on the left). Values up to {SALIENCY_FLOOR:.0%} of the peak are hidden."
    )
    return "".join(parts) + f'<p class="note">{html.escape(note)}</p>'


def _participant_links(output_dir: Path, layout: MapsLayout) -> str:
    tables = {"train+validation": layout.train_validation_tsv, "test": layout.groups_dir / TEST_TSV}
    items = []
    for group, path in tables.items():
        for participant in sorted(set(_read_tsv(path, f"{group} table")["participant_id"].astype(str))):
            label = participant.removeprefix("sub-")
            page = report_path(output_dir, label)
            text = f"{html.escape(participant)} ({group})"
            if page.is_file():
                href = Path(os.path.relpath(page, layout.root)).as_posix()
                items.append(f'<li><a href="{html.escape(href)}">{text}</a></li>')
            else:
                items.append(f"<li>{text}: no report</li>")
    return f'<h2>Participant QC reports</h2><ul class="links">{"".join(items)}</ul>'


def write_group_report(output_dir: Path, maps: Maps) -> Path:
    """Write ``report.html`` in the model folder, the group report of one trained model.

    Args:
        output_dir: the participant-level output (OUTPUT_DIR) holding ``sub-*/sub-*_report.html``.
        maps: the opened model folder, trained and predicted on the test group.

    Returns:
        The report's path.

    Raises:
        InputMissingError: no trained split, or a required file (a group table, ``demographics.tsv``,
            ``training.tsv``, a test prediction, metric or confusion-matrix TSV) is missing.
        DataError: such a file is unreadable or lacks a column.
    """
    output_dir = Path(output_dir)
    layout, record = maps.layout, maps.record
    splits = maps.trained_splits()
    name = maps.name
    header = (
        f"<h1>Model {html.escape(name)}: group report</h1><p>{html.escape(record.task.value)} of "
        f"<code>{html.escape(record.config.labels.label)}</code>, {html.escape(record.architecture)} on "
        f"{html.escape(record.mode.value)} tensors of shape {tuple(record.input_shape)}; {len(splits)} trained "
        f"split(s); selection metric(s) {html.escape(', '.join(record.config.train.selection_metrics))}; "
        f"bids_app {html.escape(record.version)}.</p>"
    )
    sections = [header, _summary_section(layout, record.task)]
    group = TEST_GROUP if len(maps.splits.test) else VALIDATION_GROUP
    if group != TEST_GROUP:
        sections.append(
            '<p class="warning">This model has no test set (--test-size 0). The results below are on each split\'s '
            "validation group, on which the model was selected: they are optimistic, not an estimate of "
            "performance on new participants.</p>"
        )
    for split in splits:
        sections.append(f"<h2>Split {split}</h2><h3>Learning curves</h3>")
        sections.append(_learning_curves(layout, record, split))
        sections.append('<p class="note">Dashed lines: epochs of the selected models.</p>')
        sections += [_test_results(layout, record, split, m, group) for m in record.config.train.selection_metrics]
        sections.append(_selection_warning(layout, record, split))
    sections.append(_split_summary_section(layout, record, group))
    if record.task is Task.CLASSIFICATION:
        sections.append(_saliency_section(output_dir, layout, record, splits))
    sections.append(_participant_links(output_dir, layout))
    page = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(name)} group report</title>", f"<style>{_CSS}</style></head><body>",
            *sections, "</body></html>"]  # fmt: skip
    path = layout.report_html
    atomic_write_text(path, "\n".join(page) + "\n")
    log.info("Wrote group report %s", path)
    return path
