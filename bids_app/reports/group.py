"""The group report: one self-contained HTML page per model folder (``models/<name>/report.html``).

The page shows what a reader needs to judge a trained MAPS without opening its TSVs: how it was made (the
training run's id and command line, the seed, the versions of bids_app and of the key packages, and the run
that wrote the report), a red banner for every split whose network did not learn, the data and its split
demographics, the learning curves of every split, the test group's results (confusion matrix, ROC curve or
true-versus-predicted scatter, and the metric table with its 95 % bootstrap intervals beside the linear
baseline's when it ran, its n, the class sensitivity/specificity are for, and a warning banner for a small
group), every participant's prediction on the test and validation groups, a warning when a model was selected
on a small validation group, the metrics' mean ± sd across splits, the mean saliency maps (colour bar and
orientation letters on equal panels) when the interpret stage ran, and the participants with their QC status
and links to their preprocessing reports.

Figures are PNGs embedded as base64 ``data:`` URIs and the CSS is inline, so the file opens offline and can
be mailed or archived alone; wide tables scroll inside their own box so the page never scrolls sideways, on
a phone included. The inputs of the results are required: a missing or unreadable file raises (nothing is
written), so a run never ends with a half report; what only annotates them (baseline columns, the learning
alarm, QC and status tables) is shown when present. Matplotlib is used through its object API with the Agg
canvas (no pyplot state, no display). See ``docs/reports.md``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bids_app import read_version
from bids_app.config import Task
from bids_app.derivatives import atomic_write_text, report_path
from bids_app.errors import DataError, InputMissingError
from bids_app.labels import subject_ids
from bids_app.maps import Maps, MapsLayout, MapsRecord
from bids_app.maps.folder import LearningStatus
from bids_app.maps.splits import TEST_TSV
from bids_app.metrics import SMALL_GROUP_RULE, describe_positive_class, positive_class_index

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

    from bids_app.provenance import RunContext

log = logging.getLogger(__name__)

TEST_GROUP = "test"
VALIDATION_GROUP = "validation"
FIGURE_DPI = 100
MAX_UNDERLAY_IMAGES = 10  # preprocessed images averaged under the saliency maps
OPEN_DETAILS_ROWS = 12  # a prediction table up to this long is shown unfolded
QC_SUMMARY_TSV = "qc_summary.tsv"  # written at OUTPUT_DIR by the split stage (participant.qc_summary)
STATUS_TSV = "participant_status.tsv"  # written at OUTPUT_DIR by the participant level (participant.status)
BASELINE_COLUMNS = ("baseline_value", "baseline_ci_low", "baseline_ci_high")
WRONG_ROW = ' class="wrong"'
OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
SALIENCY_FLOOR = 0.5  # map values below this fraction of the map's largest |value| are not drawn
# Curve plotted next to the losses when every selection metric is the loss.
DEFAULT_CURVE_METRIC = {Task.CLASSIFICATION: "balanced_accuracy", Task.REGRESSION: "mae", Task.RECONSTRUCTION: "mae"}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; overflow-wrap: anywhere; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { font-size: 1.05em; margin-top: 1.5em; }
div.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
td { white-space: nowrap; } td.text { white-space: normal; text-align: left; overflow-wrap: anywhere; }
table.wide { width: 100%; }
tr.wrong td { background: #fbe3e3; } td.fail { color: #8a1010; font-weight: bold; }
code { overflow-wrap: anywhere; font-size: 0.9em; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
p.note { color: #555; font-size: 0.9em; overflow-wrap: anywhere; }
p.warning { background: #fff3cd; border: 1px solid #e0c060; padding: 0.5em 0.8em; }
div.alarm { background: #fbe3e3; border: 2px solid #b00020; color: #5c0010; padding: 0.5em 0.8em; margin: 0.8em 0; }
details { margin: 0.5em 0; } summary { cursor: pointer; }
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
    """``frame`` as an HTML table in its own horizontally scrolling box (escaped cells, floats to 3 decimals)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = ["<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False)]
    return _scroll(f"<table><tr>{head}</tr>{''.join(rows)}</table>")


def _scroll(table: str) -> str:
    """A wide table scrolls inside this box, never the page."""
    return f'<div class="scroll">{table}</div>'


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


def _read_json(path: Path, what: str) -> dict[str, object]:
    """A JSON object; DataError naming the file when it is unreadable."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputMissingError(f"Cannot write the group report: {what} {path} is missing.") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"Cannot write the group report: {what} {path} is not readable JSON ({exc}).") from exc
    if not isinstance(content, dict):
        raise DataError(f"Cannot write the group report: {what} {path} is not a JSON object.")
    return content


# -- sections -------------------------------------------------------------------------------------------


def _provenance_section(maps: Maps, splits: list[int], run: RunContext | None) -> str:
    """How the model was made and by what: training run, command line, seed, versions, device, this report's run."""
    layout, record = maps.layout, maps.record
    environment = _read_json(layout.environment_json, "environment record")
    training_run = environment.get("training_run")
    unknown = "not recorded (the model folder predates this record)"
    rows: list[tuple[str, str]] = []
    if isinstance(training_run, dict):
        rows.append(
            (
                "training run id",
                f"<code>{html.escape(str(training_run.get('run_id')))}</code> (log folder "
                f"<code>logs/{html.escape(str(training_run.get('run_id')))}/</code>)",
            )
        )
        rows.append(("training command", f"<code>{html.escape(str(training_run.get('command')))}</code>"))
    else:
        rows += [("training run id", unknown), ("training command", unknown)]
    rows.append(("seed", html.escape(str(record.config.seed))))
    created = environment.get("created")
    rows.append(("bids_app", f"{html.escape(record.version)} (git commit "
                             f"{html.escape(str(environment.get('git_commit') or 'n/a'))}), trained "
                             f"{html.escape(str(created or 'n/a'))}"))  # fmt: skip
    packages = environment.get("key_packages")
    if isinstance(packages, dict):
        shown = ", ".join(f"{name} {version}" for name, version in packages.items() if version)
        rows.append(("python and packages", html.escape(f"python {environment.get('python', 'n/a')}, {shown}")))
    devices = set()
    for split in splits:
        path = layout.summary_json(split)
        if path.is_file():
            devices.add(str(_read_json(path, "training summary").get("device", "n/a")))
    gpus = environment.get("gpus")
    device = html.escape(", ".join(sorted(devices)) or "n/a")
    if isinstance(gpus, list) and gpus:
        device += f" ({html.escape(', '.join(map(str, gpus)))})"
    machine = f"; {environment.get('platform', 'n/a')}, {environment.get('cpu_count', 'n/a')} CPU(s)"
    rows.append(("training device", device + html.escape(machine)))
    if run is not None:
        this_run = f"run <code>{html.escape(run.run_id)}</code>, bids_app {html.escape(read_version())}"
        rows.append(("this report", f"{this_run}; <code>{html.escape(run.command)}</code>"))
    body = "".join(f'<tr><th>{name}</th><td class="text">{value}</td></tr>' for name, value in rows)
    return (
        f'<h2>Provenance</h2>{_scroll(f"<table class=wide>{body}</table>")}<p class="note">From the model '
        "folder's record, environment.json and split-&lt;k&gt;/training_logs/summary.json; the run's log "
        "folder under OUTPUT_DIR/logs/ holds its full log, configuration and environment.</p>"
    )


def _learning_alarms(maps: Maps, splits: list[int]) -> str:
    """A red banner per split whose network did not learn (``Maps.learning``: its summary.json's verdict)."""
    banners = []
    for split in splits:
        verdict = maps.learning(split)
        if verdict is None or verdict.status is not LearningStatus.DID_NOT_LEARN:
            continue
        advice = f"<br><b>What to do:</b> {html.escape(verdict.advice)}" if verdict.advice else ""
        banners.append(
            f'<div class="alarm"><b>Split {split}: the network did not learn.</b> '
            f"{html.escape(verdict.reason or 'no reason recorded')}{advice}</div>"
        )
    return "".join(banners)


class _Outputs:
    """Where each cohort's participant-level files are: OUTPUT_DIR alone, or one output folder per cohort.

    A participant is known by (cohort, participant_id) in a multi-cohort model (cohort ``""`` otherwise), so the
    QC, the participant-level status and the report link of cohort B's ``sub-01`` are read from cohort B's
    output, never from another cohort's.
    """

    def __init__(self, output_dir: Path, record: MapsRecord) -> None:
        from bids_app.data.cohorts import list_cohorts

        self.output_dir = output_dir
        self.dirs = {cohort.name: Path(cohort.output_dir) for cohort in list_cohorts(record.config)}
        self.qc: dict[tuple[str, str, str], str] = {}
        self.status: dict[tuple[str, str], list[str]] = {}
        for cohort, folder in (self.dirs or {"": output_dir}).items():
            self.qc.update({(cohort, *key): value for key, value in _qc_status(folder).items()})
            self.status.update({(cohort, key): value for key, value in _participant_level_status(folder).items()})

    def folder(self, cohort: str) -> Path:
        return self.dirs.get(cohort, self.output_dir)

    @staticmethod
    def cohort_of(row: Mapping[Hashable, Any]) -> str:
        value = row.get("cohort")
        return "" if value is None or pd.isna(value) else str(value)


def _qc_status(output_dir: Path) -> dict[tuple[str, str], str]:
    """``(participant_id, session_id) → "pass"`` or the failing rule, from ``OUTPUT_DIR/qc_summary.tsv``."""
    path = output_dir / QC_SUMMARY_TSV
    if not path.is_file():
        return {}
    table = _read_tsv(path, "QC summary")
    _required_columns(table, ("participant_id", "session_id", "suffix", "qc_metric", "qc_threshold", "qc_pass"), path)
    status: dict[tuple[str, str], str] = {}
    for row in table.to_dict("records"):
        session = row["session_id"]
        key = (str(row["participant_id"]), str(session) if pd.notna(session) else "n/a")
        if str(row["qc_pass"]).lower() == "true":
            status.setdefault(key, "pass")
            continue
        value = row.get(str(row["qc_metric"]))
        shown = _cell(float(value)) if value is not None and pd.notna(value) else "n/a"
        failure = f"FAIL {row['suffix']}: {row['qc_metric']} {shown} < {float(row['qc_threshold']):g}"
        status[key] = failure if status.get(key, "pass") == "pass" else f"{status[key]}; {failure}"
    return status


def _participant_level_status(output_dir: Path) -> dict[str, list[str]]:
    """``participant_id → ["<stage> failed: message", ...]`` from ``OUTPUT_DIR/participant_status.tsv``."""
    path = output_dir / STATUS_TSV
    if not path.is_file():
        return {}
    table = _read_tsv(path, "participant status table")
    _required_columns(table, ("participant_id", "stage", "status"), path)
    failed: dict[str, list[str]] = {str(p): [] for p in table["participant_id"]}
    for row in table[table["status"].astype(str) == "failed"].itertuples(index=False):
        message = getattr(row, "message", "")
        failed[str(row.participant_id)].append(f"{row.stage} failed" + (f": {message}" if pd.notna(message) else ""))
    return failed


def _report_link(output_dir: Path, layout: MapsLayout, participant_id: str, cohort: str = "") -> str:
    """The participant's id (``<cohort>/<id>`` with cohorts), linked to its preprocessing report relative to the
    model folder when it exists."""
    page = report_path(output_dir, participant_id.removeprefix("sub-"))
    shown = f"{cohort}/{participant_id}" if cohort else participant_id
    if not page.is_file():
        return html.escape(shown)
    href = Path(os.path.relpath(page, layout.home or layout.root)).as_posix()
    return f'<a href="{html.escape(href)}">{html.escape(shown)}</a>'


def _predictions(outputs: _Outputs, layout: MapsLayout, record: MapsRecord, split: int, metric: str) -> str:
    """Every image's prediction by the ``best-<metric>`` model of ``split`` on test and validation, one row each."""
    if record.task is Task.RECONSTRUCTION:
        return ""
    class_names = sorted(record.label_encoding or {}, key=(record.label_encoding or {}).__getitem__)
    positive = (
        class_names[positive_class_index(class_names, record.config.labels.positive_class)]
        if len(class_names) == 2
        else None
    )
    shown_probas = [positive] if positive else class_names
    parts = []
    for group in (TEST_GROUP, VALIDATION_GROUP):
        path = layout.prediction_tsv(split, metric, group)
        if not path.is_file():
            continue
        prediction = _read_tsv(path, f"{group} predictions")
        _required_columns(prediction, ("participant_id", "session_id", "true_label", "predicted_label"), path)
        if record.task is Task.CLASSIFICATION:
            _required_columns(prediction, [f"proba_{name}" for name in shown_probas], path)
            header = ["participant", "session", "true label", "predicted label",
                      *(f"P({name})" for name in shown_probas), "correct", "QC"]  # fmt: skip
        else:
            header = ["participant", "session", "true value", "predicted value", "absolute error", "QC"]
        rows, n_correct, n_labelled = [], 0, 0
        for row in prediction.to_dict("records"):
            participant = str(row["participant_id"])
            session = str(row["session_id"]) if pd.notna(row["session_id"]) else "n/a"
            cohort = outputs.cohort_of(row)
            qc_text = outputs.qc.get((cohort, participant, session), "n/a")
            cells = [_report_link(outputs.folder(cohort), layout, participant, cohort), html.escape(session)]
            wrong = False
            if record.task is Task.CLASSIFICATION:
                labelled = pd.notna(row["true_label"])
                correct = labelled and str(row["true_label"]) == str(row["predicted_label"])
                n_labelled += labelled
                n_correct += correct
                wrong = labelled and not correct
                cells += [_cell(row["true_label"]) if labelled else "n/a", _cell(row["predicted_label"]),
                          *(_cell(float(row[f"proba_{name}"])) for name in shown_probas),
                          ("yes" if correct else "no") if labelled else "n/a"]  # fmt: skip
            else:
                true, predicted = float(row["true_label"]), float(row["predicted_label"])
                cells += [_cell(true), _cell(predicted), _cell(abs(true - predicted))]
            qc_class = ' class="fail"' if qc_text.startswith("FAIL") else ""
            cells_html = "".join(f"<td>{c}</td>" for c in cells) + f"<td{qc_class}>{html.escape(qc_text)}</td>"
            rows.append(f"<tr{WRONG_ROW if wrong else ''}>{cells_html}</tr>")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        count = f", {n_correct} of {n_labelled} correct" if record.task is Task.CLASSIFICATION else ""
        summary = f"Predictions of best-{metric} on the {group} group: {len(prediction)} image(s){count}"
        opened = " open" if len(prediction) <= OPEN_DETAILS_ROWS else ""
        tags = f'data-split="{split}" data-metric="{html.escape(metric)}" data-group="{group}"{opened}'
        parts.append(
            f'<details class="predictions" {tags}><summary>{html.escape(summary)}</summary>'
            f"{_scroll(f'<table><tr>{head}</tr>{chr(10).join(rows)}</table>')}</details>"
        )
    if parts and positive is not None:
        note = (
            f"P({positive}): the network's probability of the positive class; rows in red are wrong; QC: the "
            f"image's preprocessing QC ({QC_SUMMARY_TSV})."
        )
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    return "".join(parts)


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
        rows.append({"group": group, "participants": subject_ids(table).nunique(), "images": len(table),
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


def _interval(low: pd.Series, high: pd.Series) -> list[str]:
    pairs = zip(pd.to_numeric(low, errors="coerce"), pd.to_numeric(high, errors="coerce"), strict=True)
    return [f"{_cell(lo)} – {_cell(hi)}" for lo, hi in pairs]


def _metric_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Metric, value and interval; the linear baseline's value and interval beside them when the TSV has them."""
    columns = {
        "metric": metrics["metric"],
        "value": metrics["value"].astype(float),
        "95 % interval": _interval(metrics["ci_low"], metrics["ci_high"]),
    }
    if set(BASELINE_COLUMNS) <= set(metrics.columns):
        columns["linear baseline"] = pd.to_numeric(metrics["baseline_value"], errors="coerce")
        columns["baseline 95 % interval"] = _interval(metrics["baseline_ci_low"], metrics["baseline_ci_high"])
    return pd.DataFrame(columns)


def _cohort_results(folder: Path, group: str) -> str:
    """Each cohort's metrics on ``group`` (multi-cohort models, docs/cohorts.md), with its n; "" otherwise."""
    parts = []
    prefix, suffix = f"{group}_cohort-", "_image_level_metrics.tsv"
    for path in sorted(folder.glob(f"{prefix}*{suffix}")):
        metrics = _read_tsv(path, f"{group} metrics of a cohort")
        _required_columns(metrics, ("metric", "value", "ci_low", "ci_high", "n_images", "n_participants"), path)
        cohort = path.name.removeprefix(prefix).removesuffix(suffix)
        n = f"{_first(metrics, 'n_participants')} participant(s), {_first(metrics, 'n_images')} image(s)"
        parts.append(f"<h4>Cohort {html.escape(cohort)} ({html.escape(n)})</h4>{_table(_metric_table(metrics))}")
    return "".join(parts)


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
    parts.append(_cohort_results(folder, group))
    if set(BASELINE_COLUMNS) <= set(metrics.columns):
        parts.append(
            '<p class="note">Linear baseline: the same metric of the linear model fitted on the same tensors and '
            "split, on the same images (split-&lt;k&gt;/baseline/). A network no better than it has learnt nothing "
            "a linear model could not.</p>"
        )
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
    if str(_first(metrics, "training_status")) == LearningStatus.DID_NOT_LEARN:
        text += (
            f'<div class="alarm"><b>Did not learn:</b> training_status is {LearningStatus.DID_NOT_LEARN.value}; '
            "these metrics describe a network that did not learn (see the banner at the top).</div>"
        )
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


def _load_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D NIfTI's voxels, float32 ``(X, Y, Z)``, and its affine; DataError naming the file when unreadable."""
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    try:
        image = nib.load(path)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"Cannot write the group report: {path} is not a readable NIfTI ({exc}).") from exc
    if not isinstance(image, SpatialImage) or len(image.shape) != 3:
        raise DataError(f"Cannot write the group report: {path} is not a 3D image.")
    return np.asarray(image.dataobj, dtype=np.float32), np.asarray(image.affine, dtype=float)


def _load_volume(path: Path) -> np.ndarray:
    return _load_image(path)[0]


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


def _orientation(affine: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """Per voxel axis, the direction its index grows towards (R, A, S...), and the voxel sizes in mm."""
    import nibabel as nib

    codes = tuple(str(c) if c else "?" for c in nib.aff2axcodes(affine))
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    return codes, np.where(zooms > 0, zooms, 1.0)


def _view_axes(codes: tuple[str, ...]) -> list[tuple[str, int]]:
    """(view name, normal voxel axis) of the sagittal, coronal and axial views (by position if the affine is odd)."""
    views = []
    for position, (name, letters) in enumerate((("sagittal", "LR"), ("coronal", "AP"), ("axial", "SI"))):
        normal = next((axis for axis, code in enumerate(codes) if code in letters), position)
        views.append((name, normal))
    return views


def _letter(ax: Axes, x: float, y: float, text: str) -> None:
    from matplotlib import patheffects

    ax.text(x, y, text, transform=ax.transAxes, ha="center", va="center", color="white", fontsize=11,
            fontweight="bold", path_effects=[patheffects.withStroke(linewidth=2.5, foreground="black")])  # fmt: skip


def _saliency_figure(maps: list[Path], background: np.ndarray | None, title: str) -> str:
    return _img(_saliency_canvas(maps, background, title), title)


def _saliency_canvas(maps: list[Path], background: np.ndarray | None, title: str) -> Figure:
    """One row per map: three views through its peak on equal square panels (the same mm extent, whatever the
    view), orientation letters at their edges from the map's affine, and a colour bar with the display floor."""
    panel, bar, gap, top_margin = 2.6, 0.16, 0.12, 0.45  # inches
    width = 3 * panel + 2 * gap + 0.25 + bar + 0.75
    height = len(maps) * (panel + 0.35) + top_margin
    figure = _new_figure(width, height)
    for row, path in enumerate(maps):
        volume, affine = _load_image(path)
        codes, zooms = _orientation(affine)
        top = float(np.abs(volume).max())
        # slices through the map's peak; through the centre when the map is zero everywhere
        peak = np.unravel_index(int(np.argmax(np.abs(volume))), volume.shape) if top else [n // 2 for n in volume.shape]
        signed = bool((volume < 0).any())
        cmap, vmin, vmax = ("RdBu_r", -top, top) if signed else ("hot", 0.0, top or 1.0)
        side = float(max(n * z for n, z in zip(volume.shape, zooms, strict=True)))  # mm: every panel this square
        bottom = 1 - (top_margin + (row + 1) * (panel + 0.35) - 0.3) / height
        image: AxesImage | None = None
        for column, (name, normal) in enumerate(_view_axes(codes)):
            h_axis, v_axis = (axis for axis in range(3) if axis != normal)
            ax = figure.add_axes(((column * (panel + gap)) / width, bottom, panel / width, panel / height))
            ax.set_facecolor("black")
            extent = (-volume.shape[h_axis] * zooms[h_axis] / 2, volume.shape[h_axis] * zooms[h_axis] / 2,
                      -volume.shape[v_axis] * zooms[v_axis] / 2, volume.shape[v_axis] * zooms[v_axis] / 2)  # fmt: skip
            if background is not None:
                ax.imshow(np.take(background, peak[normal], axis=normal).T, cmap="gray", origin="lower",
                          interpolation="nearest", extent=extent)  # fmt: skip
            shown = np.take(volume, peak[normal], axis=normal).T
            masked = np.ma.masked_where(np.abs(shown) <= SALIENCY_FLOOR * top, shown)
            image = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", alpha=0.75,
                              interpolation="nearest", extent=extent)  # fmt: skip
            ax.set(xlim=(-side / 2, side / 2), ylim=(-side / 2, side / 2), xticks=[], yticks=[])
            right, up = codes[h_axis], codes[v_axis]
            for x, y, letter in ((0.05, 0.5, OPPOSITE.get(right, "?")), (0.95, 0.5, right),
                                 (0.5, 0.94, up), (0.5, 0.06, OPPOSITE.get(up, "?"))):  # fmt: skip
                _letter(ax, x, y, letter)
            zero = "" if top else " (map is zero)"
            ax.set_title(f"{path.name.split('_desc-')[0]}  {name} {peak[normal]}{zero}", fontsize=9)
        cax = figure.add_axes(((3 * panel + 2 * gap + 0.25) / width, bottom, bar / width, panel / height))
        assert image is not None  # three views were drawn
        colour_bar = figure.colorbar(image, cax=cax)
        colour_bar.ax.tick_params(labelsize=8)
        colour_bar.set_label("mean saliency", fontsize=8)
        if top:
            for level in (SALIENCY_FLOOR * top, -SALIENCY_FLOOR * top) if signed else (SALIENCY_FLOOR * top,):
                cax.axhline(level, color="black", linewidth=1.2)
    figure.suptitle(title, fontsize=10, y=1 - 0.12 / height)
    return figure


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


def _participants_section(outputs: _Outputs, layout: MapsLayout) -> str:
    """Every participant of the model's groups: group, images, QC, participant-level status and report link
    (a participant is ``<cohort>/<participant_id>`` in a multi-cohort model, read from its cohort's output)."""
    tables = {"train+validation": layout.train_validation_tsv, "test": layout.groups_dir / TEST_TSV}
    rows = []
    for group, path in tables.items():
        table = _read_tsv(path, f"{group} table")
        cohorts = table["cohort"].astype(str) if "cohort" in table.columns else pd.Series("", index=table.index)
        for (cohort_key, participant_key), images in table.groupby(
            [cohorts, table["participant_id"].astype(str)], sort=True
        ):
            cohort, participant = str(cohort_key), str(participant_key)
            output_dir = outputs.folder(cohort)
            sessions = [str(s) if pd.notna(s) else "n/a" for s in images["session_id"]]
            verdicts = [
                outputs.qc[(cohort, participant, s)] for s in sessions if (cohort, participant, s) in outputs.qc
            ]
            failed = [v for v in verdicts if v != "pass"]
            if not verdicts:
                qc_text, qc_class = "n/a", ""
            elif failed:
                qc_text, qc_class = "; ".join(failed), ' class="fail"'
            else:
                qc_text, qc_class = f"pass ({len(verdicts)} image(s))", ""
            problems = outputs.status.get((cohort, participant))
            level = "n/a" if problems is None else ("; ".join(problems) or "ok")
            level_class = ' class="fail"' if problems else ""
            page = report_path(output_dir, participant.removeprefix("sub-"))
            link = _report_link(output_dir, layout, participant, cohort)
            report = "report" if page.is_file() else "no report"
            rows.append(
                f"<tr><td>{link}</td><td>{html.escape(group)}</td><td>{len(images)}</td>"
                f"<td{qc_class}>{html.escape(qc_text)}</td><td{level_class}>{html.escape(level)}</td>"
                f"<td>{report}</td></tr>"
            )
    head = (
        "<tr><th>participant</th><th>group</th><th>images</th><th>QC</th><th>participant level</th><th>report</th></tr>"
    )
    note = (
        f"QC: the images' preprocessing QC ({QC_SUMMARY_TSV}, rule in docs/quality.md); participant level: the "
        f"failed stages of {STATUS_TSV}; the participant's id links to its preprocessing report."
    )
    return (
        f"<h2>Participants</h2>{_scroll(f'<table>{head}{chr(10).join(rows)}</table>')}"
        f'<p class="note">{html.escape(note)}</p>'
    )


def _channels_section(maps: Maps) -> str:
    """The image kind of each input channel and, with several, the sessions left out for lacking one."""
    channels = list(maps.record.config.train.channels)
    text = f"<p>Input channel(s), in order: {html.escape(', '.join(channels))}."
    excluded = maps.excluded_sessions()
    if excluded is not None:
        shown = ", ".join(f"{row.participant_id} {row.session_id} (no {row.missing_kinds})"
                          for row in excluded.head(10).itertuples())  # fmt: skip
        more = " …" if len(excluded) > 10 else ""
        text += (
            f" {len(excluded)} session(s) were left out because they lack one of these kinds"
            + (f": {html.escape(shown)}{more}" if len(excluded) else "")
            + f" (<code>{html.escape(maps.layout.excluded_sessions_tsv.name)}</code>)."
        )
    return text + "</p>"


def write_group_report(output_dir: Path, maps: Maps, run: RunContext | None = None) -> Path:
    """Write ``report.html`` in the model folder, the group report of one trained model.

    Args:
        output_dir: the participant-level output (OUTPUT_DIR) holding ``sub-*/sub-*_report.html``,
            ``qc_summary.tsv`` and ``participant_status.tsv``.
        maps: the opened model folder, trained and predicted on the test group.
        run: the run writing the report (its id and command line are shown); None when called on its own.

    Returns:
        The report's path.

    Raises:
        InputMissingError: no trained split, or a required file (a group table, ``demographics.tsv``,
            ``training.tsv``, a test prediction, metric or confusion-matrix TSV) is missing.
        DataError: such a file, ``environment.json``, a ``summary.json``, ``qc_summary.tsv`` or
            ``participant_status.tsv`` is unreadable or lacks a column.
    """
    output_dir = Path(output_dir)
    layout, record = maps.layout, maps.record
    splits = maps.trained_splits()
    name = maps.name
    positive = ""
    if record.task is Task.CLASSIFICATION:
        positive = "; " + describe_positive_class(maps.class_names, record.config.labels.positive_class)
    header = (
        f"<h1>Model {html.escape(name)}: group report</h1><p>{html.escape(record.task.value)} of "
        f"<code>{html.escape(record.config.labels.label)}</code>, {html.escape(record.architecture)} on "
        f"{html.escape(record.mode.value)} tensors of shape {tuple(record.input_shape)}; {len(splits)} trained "
        f"split(s); selection metric(s) {html.escape(', '.join(record.config.train.selection_metrics))}; seed "
        f"{record.config.seed}; bids_app {html.escape(record.version)}{html.escape(positive)}.</p>"
    )
    sections = [header, _channels_section(maps), _learning_alarms(maps, splits), _provenance_section(maps, splits, run),
                _summary_section(layout, record.task)]  # fmt: skip
    group = TEST_GROUP if len(maps.splits.test) else VALIDATION_GROUP
    if group != TEST_GROUP:
        sections.append(
            '<p class="warning">This model has no test set (--test-size 0). The results below are on each split\'s '
            "validation group, on which the model was selected: they are optimistic, not an estimate of "
            "performance on new participants.</p>"
        )
    outputs = _Outputs(output_dir, record)
    for split in splits:
        sections.append(f"<h2>Split {split}</h2><h3>Learning curves</h3>")
        sections.append(_learning_curves(layout, record, split))
        sections.append('<p class="note">Dashed lines: epochs of the selected models.</p>')
        for metric in record.config.train.selection_metrics:
            sections.append(_test_results(layout, record, split, metric, group))
            sections.append(_predictions(outputs, layout, record, split, metric))
        sections.append(_selection_warning(layout, record, split))
    sections.append(_split_summary_section(layout, record, group))
    if record.task is Task.CLASSIFICATION:
        sections.append(_saliency_section(output_dir, layout, record, splits))
    sections.append(_participants_section(outputs, layout))
    page = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(name)} group report</title>", f"<style>{_CSS}</style></head><body>",
            *sections, "</body></html>"]  # fmt: skip
    path = layout.report_html
    atomic_write_text(path, "\n".join(page) + "\n")
    log.info("Wrote group report %s", path)
    return path
