"""The group report (bids_app.reports.group): self-contained HTML built from a tiny MAPS trained through the CLI."""

from __future__ import annotations

import base64
import io
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
from bids_app.reports.group import write_group_report
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
    assert len(links) == 10
    for link in links:
        assert not Path(link).is_absolute() and "://" not in link
        assert (maps / link).resolve().is_file(), link
    assert {Path(link).name for link in links} == {p.name for p in out.glob("sub-*/sub-*_report.html")}


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
