"""The participant report (bids_app.participant.report): before/after, mosaics, the network's inputs, one file."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.extraction.storage import write_tensor
from bids_app.participant.panels import GAP_PX, TILE_PX, Geometry, cut, render_panels
from bids_app.participant.report import MOSAIC_SLICES, ReportEntry, section_id, write_participant_report
from tests.browser import needs_chromium, page_widths

SHAPE = (20, 24, 18)
FIGURE = re.compile(r'<figure class="([a-z-]+)"( data-mode="([a-z]+)")?><img src="data:image/png;base64,([^"]+)"')


def volume_image(seed: int = 0) -> nib.Nifti1Image:
    """A bright ellipsoid 'brain' with a darker core, 4 mm voxels, RAS."""
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij"))
    radius = np.sqrt((grid**2).sum(axis=0))
    data = np.where(radius < 0.8, 100.0, 0.0) + np.where(radius < 0.4, -40.0, 0.0)
    data += np.random.default_rng(seed).normal(0, 2, SHAPE)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = -40
    return nib.Nifti1Image(data.astype(np.float32), affine)


def tensors_for(image: nib.Nifti1Image, folder: Path) -> dict[str, Path]:
    """The four modes' tensors of ``image``, written as the participant level writes them (min-max first)."""
    volume = np.asarray(image.dataobj, dtype=np.float32)
    volume = (volume - volume.min()) / (volume.max() - volume.min())
    patches = np.lib.stride_tricks.sliding_window_view(volume, (6, 6, 6))[::6, ::6, ::6].reshape(-1, 1, 6, 6, 6)
    arrays = {
        "image": (volume[np.newaxis], {}),
        "slice": (volume[2:-2, np.newaxis], {"SliceDirection": "sagittal", "SliceAxis": 0, "DiscardedSlices": 2}),
        "patch": (np.ascontiguousarray(patches), {"PatchSize": 6, "Stride": 6}),
        "roi": (volume[np.newaxis, np.newaxis, 4:12, 6:14, 5:11], {"RoiNames": ["hippocampus"], "RoiCrop": True}),
    }
    paths = {}
    for mode, (array, parameters) in arrays.items():
        path = folder / f"sub-01_ses-M000_space-test_desc-{mode}_T1w.npy"
        sidecar = {"Mode": mode, "ModeParameters": parameters, "Normalization": "minmax"}
        write_tensor(path, np.ascontiguousarray(array, dtype=np.float32), sidecar)
        paths[mode] = path
    return paths


def decode(data: str) -> np.ndarray:
    from PIL import Image

    raw = base64.b64decode(data, validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(raw)) as image:
        return np.asarray(image.convert("RGB"))


def grid_shape(n_rows: int, n_columns: int) -> tuple[int, int, int]:
    step = TILE_PX + GAP_PX
    return n_rows * step - GAP_PX, n_columns * step - GAP_PX, 3


@pytest.fixture
def report(tmp_path: Path):
    """Two images: one with a raw input and four tensors, one failing QC with neither."""
    image = volume_image()
    raw = tmp_path / "raw" / "sub-01_ses-M000_T1w.nii.gz"
    raw.parent.mkdir()
    lps = nib.Nifti1Image(np.asarray(image.dataobj)[::-1, ::-1], np.diag([-4.0, -4.0, 4.0, 1.0]))
    nib.save(lps, raw)
    paths = tensors_for(image, tmp_path)
    shifted = nib.Nifti1Image(np.roll(np.asarray(image.dataobj), 4, axis=1), image.affine)
    entries = [
        ReportEntry("M000", "T1w", image, image, {"smoothed_correlation_to_template": 0.95}, raw_path=raw,
                    tensor_paths=paths),
        ReportEntry("M012", "T1w", shifted, image, {"smoothed_correlation_to_template": 0.4}),
    ]  # fmt: skip
    html_path = tmp_path / "sub-01" / "sub-01_report.html"
    write_participant_report(html_path, "01", entries)
    return html_path, html_path.read_text(encoding="utf-8"), entries


def test_page_is_one_self_contained_file_for_a_phone(report) -> None:
    html_path, page, _ = report
    assert sorted(p.name for p in html_path.parent.iterdir()) == ["sub-01_report.html"]  # no figures folder
    assert page.count("<img ") == len(FIGURE.findall(page))  # every image an embedded PNG inside a figure
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing outside the page
    assert "<script" not in page and "<link" not in page
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert re.search(r'<div class="scroll"><table>', page)  # the wide QC table scrolls in its own box
    assert "div.scroll { overflow-x: auto;" in page and "max-width: 100%" in page
    assert page.count('class="pass">PASS') == 1 and page.count('class="fail">FAIL') == 1
    assert "2 image(s), 1 failing QC." in page


def test_each_image_has_before_after_and_a_mosaic(report) -> None:
    _, page, entries = report
    figures = FIGURE.findall(page)
    kinds = [kind for kind, *_ in figures]
    assert kinds.count("before-after") == 2 and kinds.count("mosaic") == 2
    pixels = {kind: [decode(data) for k, _, _, data in figures if k == kind] for kind in set(kinds)}
    with_raw, without_raw = pixels["before-after"]
    assert with_raw.shape == grid_shape(2, 3)  # input row above registered row, three views each
    assert without_raw.shape == grid_shape(1, 3)
    for mosaic in pixels["mosaic"]:
        assert mosaic.shape == grid_shape(3, MOSAIC_SLICES)  # seven slices per view, three views
        cyan = (mosaic[..., 0] < 40) & (mosaic[..., 1] > 200) & (mosaic[..., 2] > 200)
        assert cyan.sum() > 500  # the template outline is drawn
    for entry in entries:
        assert f'id="{section_id("01", entry)}"' in page


def test_network_inputs_are_shown_per_mode_from_the_tensor_files(report) -> None:
    _, page, _ = report
    strips = {mode: decode(data) for kind, _, mode, data in FIGURE.findall(page) if kind == "network-input"}
    assert sorted(strips) == ["image", "patch", "roi", "slice"]
    assert strips["image"].shape == grid_shape(1, 3)
    assert strips["slice"].shape == grid_shape(1, 8)  # 16 slices, 8 shown
    assert strips["patch"].shape == grid_shape(1, 8)  # 36 patches, the 8 with most contrast
    assert strips["roi"].shape == grid_shape(1, 3)
    assert re.search(
        r"slice</b>: tensor \(16, 1, 24, 18\) float32, minmax normalisation, values 0\.0\d\d to 1\.000", page
    )
    assert "slices 0, 2, 4, 6, 9, 11, 13, 15 of 16" in page
    assert "patch</b>: tensor (36, 1, 6, 6, 6)" in page and "roi</b>: tensor (1, 1, 8, 8, 6)" in page
    assert page.count("No tensor was extracted from this image.") == 1  # the second image has none


def test_a_missing_tensor_is_named_not_fatal(tmp_path: Path) -> None:
    image = volume_image()
    missing = tmp_path / "sub-01_desc-slice_T1w.npy"
    entry = ReportEntry(None, "T1w", image, image, {}, tensor_paths={"slice": missing})
    write_participant_report(tmp_path / "report.html", "01", [entry])
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "network-input-missing" in page and str(missing) in page
    assert "before-after" in page and "mosaic" in page


def test_orientation_letters_follow_the_affine() -> None:
    ras = Geometry.of(np.diag([2.0, 3.0, 4.0, 1.0]))
    assert ras.codes == ("R", "A", "S") and ras.zooms == (2.0, 3.0, 4.0)
    assert ras.letters(0, 2) == ("L", "R", "S", "I")  # coronal: subject's left on the left
    assert ras.letters(1, 2) == ("P", "A", "S", "I")  # sagittal
    lps = Geometry.of(np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert lps.codes == ("L", "P", "S")
    assert lps.letters(0, 1) == ("R", "L", "P", "A")
    permuted = Geometry.of(np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float))
    assert [permuted.normal_axis(v) for v in ("sagittal", "coronal", "axial")] == [2, 0, 1]


def test_tiles_have_one_size_whatever_the_aspect_and_bytes_repeat() -> None:
    volume = np.random.default_rng(1).random((10, 40, 5)).astype(np.float32)
    geometry = Geometry.of(np.diag([1.0, 1.0, 3.0, 1.0]))
    panels = [cut(volume, geometry, axis, 2, (0.0, 1.0), f"axis {axis}") for axis in range(3)]
    png = render_panels([panels])
    assert png == render_panels([panels])  # same arrays, same bytes
    assert decode(base64.b64encode(png).decode()).shape == grid_shape(1, 3)


def test_stamped_labels_match_labels_drawn_one_by_one() -> None:
    """The cached label masks blend exactly like ``ImageDraw.text`` with an outline, also where a label is clipped
    at the canvas's edge and over bright or mid-grey pixels."""
    from PIL import Image, ImageDraw

    from bids_app.participant import panels as panels_module

    rng = np.random.default_rng(3)
    background = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    labels = [((0, 2), "L", 14, "mm", (255, 255, 255)), ((88, 59), "R", 14, "mm", (255, 255, 255)),
              ((45, 30), "S", 10, "mm", (255, 255, 255)), ((3, 57), "z = 12 mm", 11, "ld", (255, 214, 0)),
              ((50, 10), "axial 3", 11, "ld", (255, 214, 0)), ((-4, 40), "x = -7", 9, "ld", (255, 214, 0))]  # fmt: skip
    drawn, stamped = Image.fromarray(background), Image.fromarray(background)
    draw = ImageDraw.Draw(drawn)
    for at, text, size, anchor, colour in labels:
        draw.text(at, text, fill=colour, font=panels_module._font(size), anchor=anchor, stroke_width=2,
                  stroke_fill=(0, 0, 0))  # fmt: skip
        panels_module._stamp(stamped, at, text, size, anchor, colour)
    assert np.array_equal(np.asarray(drawn), np.asarray(stamped))
    assert not np.array_equal(np.asarray(drawn), background)  # the labels were drawn at all


@needs_chromium
@pytest.mark.parametrize("width", [400, 1400])
def test_page_never_scrolls_sideways_in_chromium(report, width: int) -> None:
    html_path, _, _ = report
    scroll_width, client_width = page_widths(html_path, width)
    assert client_width > 0.9 * width - 40 and scroll_width <= client_width


def test_strips_and_input_row_drawn_by_the_job_are_used_without_reading_files(tmp_path: Path) -> None:
    """A job passes the strips it drew from the arrays it wrote and the input row it cut from the input it held:
    the report reads neither file again (here both paths are missing, so a read would show a note)."""
    from bids_app.participant.report import input_panels, network_input_figure

    image = volume_image()
    written = tensors_for(image, tmp_path / "written")
    geometry = Geometry.of(image.affine)
    drawn = {
        mode: network_input_figure(mode, np.load(path), {"ModeParameters": {}, "Normalization": "minmax"},
                                   tmp_path / "gone" / path.name, geometry)
        for mode, path in written.items()
    }  # fmt: skip
    gone = {mode: tmp_path / "gone" / path.name for mode, path in written.items()}
    entry = ReportEntry(None, "T1w", image, image, {}, raw_path=tmp_path / "gone" / "raw.nii.gz", tensor_paths=gone,
                        network_inputs=drawn, input_panels=input_panels(image))  # fmt: skip
    write_participant_report(tmp_path / "report.html", "01", [entry])
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "network-input-missing" not in page and "could not be read" not in page
    figures = FIGURE.findall(page)
    strips = {mode: decode(data) for kind, _, mode, data in figures if kind == "network-input"}
    assert sorted(strips) == ["image", "patch", "roi", "slice"]
    (before_after,) = [decode(data) for kind, _, _, data in figures if kind == "before-after"]
    assert before_after.shape == grid_shape(2, 3)  # the input row is there, cut from the image in memory
    # the same strip as the one read back from the file
    from_file = tmp_path / "from_file.html"
    write_participant_report(from_file, "01", [ReportEntry(None, "T1w", image, image, {}, tensor_paths=written)])
    read_back = {mode: data for kind, _, mode, data in FIGURE.findall(from_file.read_text()) if kind == "network-input"}
    assert {m: d for k, _, m, d in figures if k == "network-input"}["slice"] == read_back["slice"]
