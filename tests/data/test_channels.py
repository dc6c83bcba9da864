"""Several image kinds as the channels of one sample: the index joins them, the dataset stacks them.

``--channels T1w pet-FDG`` (``train.channels``): ``data.tables.index_channels`` keeps the sessions that have a
tensor of every kind and lists the others; ``TensorDataset`` reads one file per channel into ``(C, ...)``
samples in every mode; every registered architecture builds for ``C > 1``; the linear baseline concatenates the
channels' features.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from bids_app.baseline.features import choose_pooling, image_features
from bids_app.config import ExtractionMode, RunConfig, Task, TrainConfig, check_config_values
from bids_app.data.dataset import TensorDataset
from bids_app.data.tables import CHANNEL_PATHS, index_channels, sample_shape, verify_tensors
from bids_app.derivatives import tensor_path
from bids_app.errors import ConfigError, DataError
from bids_app.extraction.storage import write_tensor
from bids_app.kinds import parse_kind
from bids_app.models import MODE_DIMS, build_model, list_architectures
from tests.data.test_data import SHAPES, SPACE  # the stored tensor shape per mode, shared with the loader tests

T1W, FDG = parse_kind("T1w"), parse_kind("pet-FDG")


def write_kind(
    output_dir: Path,
    mode: ExtractionMode,
    kind_suffix: str,
    images: Iterable[tuple[str, str | None]],
    *,
    extra: str = "",
    shape: tuple[int, ...] | None = None,
    dtype: type = np.float32,
    parameters: dict | None = None,
    seed: int = 0,
) -> dict[tuple[str, str | None], np.ndarray]:
    """One random tensor of one kind per (participant label, session label); returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for participant, session in images:
        array = rng.random(shape or SHAPES[mode]).astype(dtype)
        path = tensor_path(output_dir, participant, session, SPACE, mode.value, kind_suffix, extra)
        write_tensor(path, array, {"Mode": mode.value, "ModeParameters": parameters or {"P": 1},
                                   "SourceSHA256": f"src-{kind_suffix}-{participant}"})  # fmt: skip
        arrays[(participant, session)] = array
    return arrays


def test_sessions_lacking_a_kind_are_listed_and_left_out(tmp_path: Path, caplog) -> None:
    out, mode = tmp_path / "out", ExtractionMode.ROI
    sessions = [("01", "M000"), ("01", "M012"), ("02", "M000"), ("03", "M000")]
    write_kind(out, mode, "T1w", sessions)
    write_kind(out, mode, "pet", [("01", "M000"), ("02", "M000"), ("04", "M000")], extra="trc-FDG", seed=1)
    write_kind(out, mode, "pet", sessions, extra="trc-AV45", seed=2)  # another tracer is another kind
    with caplog.at_level(logging.WARNING, logger="bids_app.data.tables"):
        index = index_channels(out, mode, (T1W, FDG))
    tensors, excluded = index.tensors, index.excluded
    kept = list(zip(tensors["participant_id"], tensors["session_id"], strict=True))
    assert kept == [("sub-01", "ses-M000"), ("sub-02", "ses-M000")]
    paths = [tuple(Path(p).name for p in row) for row in tensors[CHANNEL_PATHS]]
    assert paths[0] == (f"sub-01_ses-M000_space-{SPACE}_desc-roi_T1w.npy",
                        f"sub-01_ses-M000_trc-FDG_space-{SPACE}_desc-roi_pet.npy")  # fmt: skip
    assert all("+" in sha for sha in tensors["tensor_sha256"])  # both channels' checksums are recorded
    assert excluded.to_dict("records") == [
        {"participant_id": "sub-01", "session_id": "ses-M012", "missing_kinds": "pet-FDG"},
        {"participant_id": "sub-03", "session_id": "ses-M000", "missing_kinds": "pet-FDG"},
        {"participant_id": "sub-04", "session_id": "ses-M000", "missing_kinds": "T1w"},
    ]
    (warning,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert warning.startswith("3 session(s) of") and "sub-01 ses-M012 lacks pet-FDG" in warning
    assert "never zero-padded" in warning
    assert sample_shape(tensors, mode) == (2, 3, 4, 5)
    verify_tensors(tensors)  # every channel's file is checked against its sidecar
    # one kind alone is the single-channel index of before: every T1w session, nothing excluded
    alone = index_channels(out, mode, T1W)
    assert len(alone.tensors) == 4 and alone.excluded.empty and sample_shape(alone.tensors, mode) == (1, 3, 4, 5)


def test_a_changed_channel_file_is_named_by_the_checksum_check(tmp_path: Path) -> None:
    out, mode = tmp_path / "out", ExtractionMode.IMAGE
    write_kind(out, mode, "T1w", [("01", None)])
    write_kind(out, mode, "pet", [("01", None)], extra="trc-FDG", seed=1)
    tensors = index_channels(out, mode, (T1W, FDG)).tensors
    pet = Path(tensors[CHANNEL_PATHS].iloc[0][1])
    np.save(pet, np.zeros(SHAPES[mode], np.float32))
    with pytest.raises(DataError, match=r"1 tensor\(s\) differ.*trc-FDG"):
        verify_tensors(tensors)


@pytest.mark.parametrize(
    ("change", "what"),
    [({"shape": (1, 6, 6, 5)}, "sample shape"), ({"parameters": {"P": 2}}, "mode parameters")],
)
def test_channels_cut_otherwise_are_refused_naming_both_files(tmp_path: Path, change: dict, what: str) -> None:
    out, mode = tmp_path / "out", ExtractionMode.IMAGE
    write_kind(out, mode, "T1w", [("01", None)])
    write_kind(out, mode, "pet", [("01", None)], extra="trc-FDG", **change)
    with pytest.raises(DataError, match=f"T1w and pet-FDG image tensors of sub-01 n/a differ in {what}") as error:
        index_channels(out, mode, (T1W, FDG))
    assert "desc-image_T1w.npy vs " in str(error.value) and "trc-FDG" in str(error.value)


@pytest.mark.parametrize("mode", list(ExtractionMode))
@pytest.mark.parametrize("cache", [False, True])
def test_samples_stack_the_kinds_in_channel_order(tmp_path: Path, mode: ExtractionMode, cache: bool) -> None:
    out = tmp_path / "out"
    images = [("01", "M000"), ("02", "M000")]
    first = write_kind(out, mode, "T1w", images)
    second = write_kind(out, mode, "pet", images, extra="trc-FDG", dtype=np.float16, seed=1)  # widened on read
    table = index_channels(out, mode, (FDG, T1W)).tensors  # the order of --channels, not of the file names
    table["label"] = ["AD", "CN"]
    dataset = TensorDataset(table, mode, Task.CLASSIFICATION, label_encoding={"AD": 0, "CN": 1}, cache=cache)
    n_parts = 1 if mode is ExtractionMode.IMAGE else SHAPES[mode][0]
    assert len(dataset) == 2 * n_parts and dataset.n_images == 2
    for index in range(len(dataset)):
        image = images[index // n_parts]
        part = index % n_parts
        parts = [a[None] if mode is ExtractionMode.IMAGE else a for a in (second[image], first[image])]
        expected = np.concatenate([p[part].astype(np.float32) for p in parts])
        x, _, _ = dataset[index]
        assert x.shape == expected.shape and x.shape[0] == 2
        assert np.array_equal(x.numpy(), expected)
        assert np.array_equal(dataset.read_sample(index), expected)  # cached or not, the same bytes
    batch = dataset.__getitems__(list(range(len(dataset))))
    assert tuple(batch.x.shape) == (len(dataset), *dataset.sample_shape_of(0))
    assert torch.equal(batch.x[0], dataset[0][0])


def test_every_architecture_builds_for_two_channels() -> None:
    for info in list_architectures():
        dims = min(info.dims)
        if dims not in MODE_DIMS.values():
            continue
        side = max(info.min_spatial_size, 8)
        shape = (2, *(side,) * dims)
        task = info.tasks[0]
        model = build_model(info.name, task=task, input_shape=shape, n_outputs=2)
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d))
        assert first.in_channels == 2, info.name
        model.eval()
        with torch.no_grad():
            output = model(torch.zeros(1, *shape))
        assert tuple(output.shape) == ((1, *shape) if task is Task.RECONSTRUCTION else (1, 2)), info.name


def test_the_baseline_concatenates_the_channels_features(tmp_path: Path) -> None:
    out, mode = tmp_path / "out", ExtractionMode.ROI
    first = write_kind(out, mode, "T1w", [("01", None)])[("01", None)]
    second = write_kind(out, mode, "pet", [("01", None)], extra="trc-FDG", seed=1)[("01", None)]
    paths = [Path(p) for p in index_channels(out, mode, (T1W, FDG)).tensors[CHANNEL_PATHS].iloc[0]]
    pooling = choose_pooling(2, (3, 4, 5), n_channels=2)
    features = image_features(paths, mode, pooling)
    assert pooling.n_features == features.shape[0] == 2 * 2 * 60
    assert np.array_equal(features, np.concatenate([first.ravel(), second.ravel()]))
    with pytest.raises(DataError, match=r"1 channel\(s\), but the baseline's features were made from 2"):
        image_features(paths[0], mode, pooling)


@pytest.mark.parametrize(
    ("channels", "message"),
    [
        ((), "give one image kind or more"),
        (("T1w", "T1w"), "T1w given twice"),
        (("T1w", "flair"), "did you mean 'FLAIR'"),
        (("pet-",), "Unknown image kind 'pet-'"),
        (("T1w", "Gm"), "Unknown image kind 'Gm'"),
    ],
)
def test_bad_channels_are_refused_naming_the_value(
    channels: tuple[str, ...], message: str, tmp_path: Path, capfd
) -> None:
    from bids_app.cli.main import main

    cfg = RunConfig(Path("/b"), Path("/o"), "group", train=TrainConfig(channels=channels))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message) as error:
        check_config_values(cfg)
    assert "--channels" in str(error.value)
    if channels:  # on the command line: exit 64 before OUTPUT_DIR exists
        (tmp_path / "bids").mkdir()
        assert main([str(tmp_path / "bids"), str(tmp_path / "out"), "group", "--channels", *channels]) == 64
        assert not (tmp_path / "out").exists()
        assert message in capfd.readouterr().err
    good = TrainConfig(channels=("T1w", "pet-FDG", "gm"))
    check_config_values(RunConfig(Path("/b"), Path("/o"), "group", train=good))  # type: ignore[arg-type]
