"""The group report (bids_app.reports.group): self-contained HTML built from a tiny MAPS trained through the CLI."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_app.errors import InputMissingError
from bids_app.maps import Maps
from bids_app.maps.folder import REPORT_NAME
from bids_app.provenance import RunContext
from bids_app.reports.group import write_group_report
from tests.browser import needs_chromium, page_widths
from tests.conftest import make_cohort, run_cli

IMG_SRC = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
HREF = re.compile(r'href="([^"]+)"')


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)


def group_args(dataset, out: Path, name: str, *extra: str) -> list[str]:
    return [str(dataset.bids_dir), str(out), "group", "--architecture", "small_cnn", "--mode", "image",
            "--epochs", "2", "--batch-size", "4", "--learning-rate", "0.01", "--n-splits", "2",
            "--test-size", "0.25", "--model-name", name, "--seed", "5", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    """10 participants x 2 sessions at 4 mm, image tensors and participant reports."""
    return make_cohort(tmp_path_factory.mktemp("report"), 10, 2, "--modes", "image")


@pytest.fixture(scope="module")
def trained(cohort):
    """A classifier MAPS with grad_cam maps of the test group; its report written once."""
    dataset, out = cohort
    result = run_cli(*group_args(dataset, out, "cnn", "--label", "diagnosis"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(*group_args(dataset, out, "cnn", "--label", "diagnosis", "--stages", "interpret",
                                 "--interpret-methods", "grad_cam"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    maps = out / "models" / "cnn"
    report = write_group_report(out, Maps.open(maps))
    return out, maps, report, report.read_text(encoding="utf-8")


def copy_maps(out: Path, maps: Path, name: str) -> Path:
    """A copy beside the original (same OUTPUT_DIR, so its relative roots still resolve)."""
    copy = out / "models" / name
    shutil.copytree(maps, copy, ignore=shutil.ignore_patterns(REPORT_NAME))
    return copy


def decoded_pngs(page: str) -> list[np.ndarray]:
    from PIL import Image

    images = []
    for data in IMG_SRC.findall(page):
        raw = base64.b64decode(data, validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            assert image.format == "PNG"
            images.append(np.asarray(image))
    return images


def test_report_is_self_contained_with_valid_figures(trained) -> None:
    _, maps, report, page = trained
    assert report == maps / REPORT_NAME == Maps.open(maps).layout.report_html
    assert page.count("<img ") == len(IMG_SRC.findall(page))  # every image is an embedded PNG
    images = decoded_pngs(page)
    # per split: learning curves + confusion/ROC + one grad_cam figure
    assert len(images) == 3 * 2
    for image in images:
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert np.ptp(image[..., :3]) > 0  # not a blank canvas
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page
    assert not list(maps.glob(f".{REPORT_NAME}.*"))  # no temporary left behind


def test_report_holds_the_test_metrics_and_demographics(trained) -> None:
    _, maps, _, page = trained
    for split in (0, 1):
        metrics = read_tsv(maps / f"split-{split}/best-loss/test/test_image_level_metrics.tsv")
        for row in metrics.itertuples(index=False):
            cells = [f"{v:.3f}" if np.isfinite(v) else "n/a" for v in (row.value, row.ci_low, row.ci_high)]
            assert f"<td>{row.metric}</td><td>{cells[0]}</td><td>{cells[1]} – {cells[2]}</td>" in page, row
    demographics = read_tsv(maps / "groups/demographics.tsv")
    for group in set(demographics["group"]):
        assert f"<td>{group}</td>" in page
    test = read_tsv(maps / "groups/test/data.tsv")
    counts = test["label"].value_counts().sort_index()
    expected = ", ".join(f"{name}: {n}" for name, n in counts.items())
    assert f"<td>test</td><td>{test['participant_id'].nunique()}</td><td>{len(test)}</td><td>{expected}</td>" in page


def test_report_links_to_existing_participant_reports(trained) -> None:
    out, maps, _, page = trained
    links = HREF.findall(page)
    participants = HREF.findall(page[page.index("<h2>Participants</h2>") :])
    assert len(participants) == len(set(participants)) == 10  # one row per participant in the Participants table
    for link in links:
        assert not Path(link).is_absolute() and "://" not in link
        assert (maps / link).resolve().is_file(), link
    assert {Path(link).name for link in participants} == {p.name for p in out.glob("sub-*/sub-*_report.html")}


def test_saliency_section_notes_absent_maps(trained) -> None:
    out, maps, _, page = trained
    assert "grad_cam: mean map per explained class" in page
    copy = copy_maps(out, maps, "no_interpret")
    for folder in copy.glob("split-*/best-*/test/interpret"):
        shutil.rmtree(folder)
    without = write_group_report(out, Maps.open(copy)).read_text(encoding="utf-8")
    assert "No saliency map" in without
    assert len(IMG_SRC.findall(without)) == 2 * 2


@pytest.mark.parametrize(
    "missing",
    [
        "split-1/training_logs/training.tsv",
        "split-0/best-loss/test/test_confusion_matrix.tsv",
        "groups/demographics.tsv",
    ],
)
def test_missing_input_raises_and_writes_nothing(trained, missing: str) -> None:
    out, maps, _, _ = trained
    copy = copy_maps(out, maps, f"missing_{Path(missing).stem}")
    earlier = copy / REPORT_NAME
    earlier.write_text("earlier report", encoding="utf-8")
    (copy / missing).unlink()
    maps_copy = Maps.open(copy)
    with pytest.raises(InputMissingError, match=re.escape(str(copy / missing))):
        write_group_report(out, maps_copy)
    assert earlier.read_text(encoding="utf-8") == "earlier report"
    assert not list(copy.glob(f".{REPORT_NAME}.*"))


def test_regression_report_shows_a_scatter(cohort) -> None:
    dataset, out = cohort
    result = run_cli(*group_args(dataset, out, "age", "--label", "age", "--task", "regression", "--epochs", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    page = write_group_report(out, Maps.open(out / "models" / "age")).read_text(encoding="utf-8")
    assert len(decoded_pngs(page)) == 2 * 2  # learning curves + scatter per split
    assert "confusion" not in page and "Saliency" not in page
    metrics = read_tsv(out / "models/age/split-0/best-loss/test/test_image_level_metrics.tsv")
    assert set(metrics["metric"]) == {"mae", "rmse", "r2"}
    assert f"<td>mae</td><td>{metrics.set_index('metric').loc['mae', 'value']:.3f}</td>" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(trained, tmp_path: Path) -> None:
    from PIL import Image

    _, _, report, _ = trained
    screenshot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             f"--screenshot={screenshot}", "--window-size=1280,2400", report.as_uri()],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape == (2400, 1280)
    assert (pixels < 128).mean() > 0.02  # text and figures drawn, not a blank page
    assert len(np.unique(pixels)) > 50


# -- what happened: predictions, provenance, summaries, QC, baseline, learning alarm --------------------------

DETAILS = re.compile(r'<details class="predictions" data-split="(\d+)" data-metric="([a-z_]+)" data-group="([a-z]+)"'
                     r"( open)?><summary>([^<]*)</summary>(.*?)</details>", re.S)  # fmt: skip
ROW = re.compile(r"<tr( class=\"wrong\")?><td>(?:<a href=\"[^\"]+\">)?(sub-[A-Za-z0-9]+)(?:</a>)?</td>(.*?)</tr>", re.S)
BASELINE = ["baseline_value", "baseline_ci_low", "baseline_ci_high"]
CELL = re.compile(r"<td(?: class=\"fail\")?>([^<]*)</td>")


def fake_output(out: Path, maps: Path, tmp_path: Path) -> tuple[Path, Path]:
    """An OUTPUT_DIR of links to ``out``'s participants holding a copy of the model and of the root TSVs (to edit)."""
    fake = tmp_path / "out"
    fake.mkdir()
    for folder in out.glob("sub-*"):
        (fake / folder.name).symlink_to(folder, target_is_directory=True)
    for name in ("qc_summary.tsv", "participant_status.tsv"):
        shutil.copyfile(out / name, fake / name)
    copy = fake / "models" / maps.name
    shutil.copytree(maps, copy, ignore=shutil.ignore_patterns(REPORT_NAME))
    return fake, copy


def test_predictions_table_has_one_row_per_predicted_image(trained) -> None:
    _, maps, _, page = trained
    tables = DETAILS.findall(page)
    assert {(split, group) for split, _, group, *_ in tables} == {(s, g) for s in "01" for g in ("test", "validation")}
    for split, metric, group, opened, summary, body in tables:
        prediction = read_tsv(maps / f"split-{split}/best-{metric}/{group}/{group}_image_level_prediction.tsv")
        rows = ROW.findall(body)
        assert len(rows) == len(prediction) > 0  # one row per predicted image
        assert "<th>P(CN)</th>" in body  # the positive class: the default, second class of AD, CN
        n_correct = 0
        for (wrong, participant, cells), expected in zip(rows, prediction.itertuples(index=False), strict=True):
            values = CELL.findall(cells)
            assert participant == expected.participant_id
            correct = expected.true_label == expected.predicted_label
            n_correct += correct
            assert values[:5] == [expected.session_id, expected.true_label, expected.predicted_label,
                                  f"{expected.proba_CN:.3f}", "yes" if correct else "no"]  # fmt: skip
            assert bool(wrong) is not correct
            assert values[5].startswith("pass") or values[5].startswith("FAIL")  # the image's QC
        assert summary.endswith(f"{len(prediction)} image(s), {n_correct} of {len(prediction)} correct")
        assert bool(opened) is (len(prediction) <= 12)


def test_provenance_shows_run_command_seed_and_versions(trained) -> None:
    out, maps, _, page = trained
    record = Maps.open(maps).record
    assert "training_run" not in record.extra  # maps.json stays the same bytes for the same seed and config
    training_run = json.loads((maps / "environment.json").read_text(encoding="utf-8"))["training_run"]
    log_dir = out / "logs" / training_run["run_id"]
    assert (log_dir / "command.txt").read_text(encoding="utf-8").strip() == training_run["command"]
    assert "--model-name cnn" in training_run["command"]
    assert f"<code>{training_run['run_id']}</code>" in page
    assert f"<code>{html.escape(training_run['command'])}</code>" in page
    assert '<tr><th>seed</th><td class="text">5</td></tr>' in page
    assert f'<th>bids_app</th><td class="text">{record.version} (git commit' in page
    assert "torch " in page and "numpy " in page  # key package versions from environment.json
    run = RunContext(run_id="20261205T000000Z_group_abc123", log_dir=out / "logs", log_file=out / "logs" / "x.log",
                     command="bids_app /bids /out group --stages predict")  # fmt: skip
    again = write_group_report(out, Maps.open(maps), run=run).read_text(encoding="utf-8")
    assert "<code>20261205T000000Z_group_abc123</code>" in again
    assert "<code>bids_app /bids /out group --stages predict</code>" in again


def test_across_splits_summary_shows_mean_sd_and_each_split(trained) -> None:
    _, maps, _, page = trained
    summary = read_tsv(maps / "summary/test_best-loss_metrics_across_splits.tsv")
    section = page[page.index("<h2>Across splits</h2>") :]

    def shown(value: float) -> str:
        return "n/a" if np.isnan(value) else f"{value:.3f}"

    for row in summary.to_dict("records"):
        cells = [f"{shown(row['mean'])} ± {shown(row['sd'])}", shown(row["split-0"]), shown(row["split-1"])]
        assert f"<td>{row['metric']}</td>" + "".join(f"<td>{c}</td>" for c in cells) in section, row


def test_participants_show_qc_and_participant_level_status(trained, tmp_path: Path) -> None:
    out, maps, _, _ = trained
    fake, copy = fake_output(out, maps, tmp_path)
    qc = pd.read_csv(fake / "qc_summary.tsv", sep="\t", dtype=str, keep_default_na=False)
    first = qc["participant_id"].iloc[0]
    qc.loc[0, ["smoothed_correlation_to_template", "qc_pass"]] = ["0.500000", "false"]
    qc.to_csv(fake / "qc_summary.tsv", sep="\t", index=False)
    with (fake / "participant_status.tsv").open("a", encoding="utf-8") as status:
        status.write(f"{first}\tn/a\tn/a\treport\tfailed\tdisk full\t0.00\n")
    page = write_group_report(fake, Maps.open(copy)).read_text(encoding="utf-8")
    section = page[page.index("<h2>Participants</h2>") :]
    rows = {participant: CELL.findall(cells) for _, participant, cells in ROW.findall(section)}
    assert len(rows) == 10
    failing = "FAIL T1w: smoothed_correlation_to_template 0.500 &lt; 0.7"
    assert f'<td class="fail">{failing}</td><td class="fail">report failed: disk full</td>' in section
    assert rows[first][2:4] == [failing, "report failed: disk full"]
    for participant, cells in rows.items():
        if participant != first:
            assert cells[2:5] == [f"pass ({cells[1]} image(s))", "ok", "report"], participant
    (fake / "qc_summary.tsv").unlink()
    (fake / "participant_status.tsv").unlink()
    without = write_group_report(fake, Maps.open(copy)).read_text(encoding="utf-8")
    section = without[without.index("<h2>Participants</h2>") :]
    assert all(CELL.findall(cells)[2:4] == ["n/a", "n/a"] for _, _, cells in ROW.findall(section))


def test_baseline_and_did_not_learn_are_shown_when_present(trained, tmp_path: Path) -> None:
    """Hand-made metric TSVs with the baseline's columns and training_status, and a learning verdict."""
    out, maps, _, _ = trained
    fake, copy = fake_output(out, maps, tmp_path)
    for split in (0, 1):
        path = copy / f"split-{split}/best-loss/test/test_image_level_metrics.tsv"
        metrics = read_tsv(path).drop(columns=[*BASELINE, "training_status"], errors="ignore")
        position = list(metrics.columns).index("ci_high") + 1
        for offset, (column, value) in enumerate((("baseline_value", 0.123456), ("baseline_ci_low", 0.011),
                                                  ("baseline_ci_high", 0.987))):  # fmt: skip
            metrics.insert(position + offset, column, value)
        metrics["training_status"] = "did-not-learn" if split == 0 else "learned"
        metrics.to_csv(path, sep="\t", index=False, na_rep="n/a")
    verdicts = {0: {"status": "did-not-learn", "reason": "Training loss stayed at chance (0.693).",
                    "advice": "Raise the learning rate."},
                1: {"status": "learned", "reason": "Training loss fell to 0.2.", "advice": ""}}  # fmt: skip
    for split, verdict in verdicts.items():
        summary_path = copy / f"split-{split}/training_logs/summary.json"
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        summary_path.write_text(json.dumps({**summary, "learning": verdict}), encoding="utf-8")
    page = write_group_report(fake, Maps.open(copy)).read_text(encoding="utf-8")
    assert page.count("<th>linear baseline</th><th>baseline 95 % interval</th>") == 2
    metric_row = re.search(
        r"<td>balanced_accuracy</td><td>[^<]*</td><td>[^<]*</td><td>([^<]*)</td><td>([^<]*)</td>", page
    )
    assert metric_row is not None and metric_row.groups() == ("0.123", "0.011 – 0.987")
    alarm = ('<div class="alarm"><b>Split 0: the network did not learn.</b> Training loss stayed at chance (0.693).'
             "<br><b>What to do:</b> Raise the learning rate.</div>")  # fmt: skip
    assert alarm in page and page.index(alarm) < page.index("<h2>Provenance</h2>")  # at the top
    assert "Split 1: the network did not learn" not in page
    assert page.count("training_status is did-not-learn") == 1  # under split 0's metric table only

    for split in (0, 1):  # neither present: neither shown, nothing fails
        path = copy / f"split-{split}/best-loss/test/test_image_level_metrics.tsv"
        stripped = read_tsv(path).drop(columns=[*BASELINE, "training_status"])
        stripped.to_csv(path, sep="\t", index=False, na_rep="n/a")
    for split in (0, 1):
        summary_path = copy / f"split-{split}/training_logs/summary.json"
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        summary_path.write_text(json.dumps({k: v for k, v in summary.items() if k != "learning"}), encoding="utf-8")
    page = write_group_report(fake, Maps.open(copy)).read_text(encoding="utf-8")
    assert "linear baseline</th>" not in page and 'class="alarm"' not in page


def test_page_fits_a_phone_and_tables_scroll_in_their_box(trained) -> None:
    _, _, _, page = trained
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert page.count("<table") == page.count('<div class="scroll"><table') > 10
    assert "div.scroll { overflow-x: auto;" in page and "img { max-width: 100%; height: auto;" in page


def test_saliency_panels_have_one_size_letters_and_a_colour_bar(trained) -> None:
    from bids_app.reports.group import _saliency_canvas

    _, maps, _, _ = trained
    paths = sorted(maps.glob("split-*/best-loss/test/interpret/grad_cam/class-*_mean_saliency.nii.gz"))[:2]
    figure = _saliency_canvas(paths, None, "title")
    bars = [ax for ax in figure.axes if ax.get_ylabel() == "mean saliency"]
    panels = [ax for ax in figure.axes if ax not in bars]
    assert len(bars) == len(paths) and len(panels) == 3 * len(paths)
    sizes = {(round(ax.get_position().width, 6), round(ax.get_position().height, 6)) for ax in panels}
    assert len(sizes) == 1  # every panel the same size
    assert len({ax.get_xlim() for ax in panels} | {ax.get_ylim() for ax in panels}) <= len(paths)  # same mm square
    letters = [{t.get_text() for t in ax.texts} for ax in panels]
    assert letters[:3] == [{"P", "A", "S", "I"}, {"L", "R", "S", "I"}, {"L", "R", "A", "P"}]  # RAS maps


@needs_chromium
@pytest.mark.parametrize("width", [400, 1400])
def test_page_never_scrolls_sideways_in_chromium(trained, width: int) -> None:
    _, _, report, _ = trained
    scroll_width, client_width = page_widths(report, width)
    assert client_width > 0.9 * width - 40 and scroll_width <= client_width
