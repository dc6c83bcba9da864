"""The MAPS folder: maps.json round trip and portability, safetensors models, pickle refusal, validation."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from bids_app import read_version
from bids_app.config import (
    AnalysisLevel,
    ExtractionConfig,
    ExtractionMode,
    RunConfig,
    RuntimeConfig,
    Task,
    TrainConfig,
)
from bids_app.errors import DataError, InputMissingError
from bids_app.maps import folder as maps
from bids_app.maps.folder import MapsLayout
from bids_app.maps.weights import save_model
from bids_app.training.transfer import source_training_pool

INPUT_SHAPE = (1, 6, 6, 6)
ENCODING = {"AD": 0, "CN": 1}


def make_config(root: Path, **train: object) -> RunConfig:
    output_dir = root / "bids" / "derivatives" / "bids_app"
    return RunConfig(
        bids_dir=root / "bids",
        output_dir=output_dir,
        analysis_level=AnalysisLevel.GROUP,
        seed=5,
        extraction=ExtractionConfig(roi_masks=(("hippocampus", root / "bids" / "code" / "mask.nii.gz"),)),
        train=TrainConfig(architecture="small_cnn", mode=ExtractionMode.IMAGE, **train),  # type: ignore[arg-type]
    )


def write_maps(root: Path, **train: object) -> tuple[RunConfig, Path]:
    cfg = make_config(root, **train)
    maps_dir = cfg.output_dir / "models" / cfg.train.model_name
    extra = {"input_shape": list(INPUT_SHAPE), "n_outputs": 2, "label_encoding": ENCODING}
    maps.write_maps_json(maps_dir, cfg, extra)
    maps.write_environment_json(maps_dir, cfg.seed)
    return cfg, maps_dir


def trained_model(maps_dir: Path, split: int = 0, metric: str = "loss") -> torch.nn.Module:
    torch.manual_seed(0)
    model = maps.build_maps_model(maps.read_maps_json(maps_dir))
    save_model(MapsLayout(maps_dir).model_path(split, metric), model)
    maps.MapsLayout(maps_dir).summary_json(split).parent.mkdir(parents=True, exist_ok=True)
    maps.MapsLayout(maps_dir).summary_json(split).write_text("{}")
    return model


def test_layout_paths(tmp_path: Path) -> None:
    layout = MapsLayout(tmp_path)
    assert layout.model_path(2, "loss") == tmp_path / "split-2" / "best-loss" / "model.safetensors"
    assert layout.group_dir(0, "mae", "test") == tmp_path / "split-0" / "best-mae" / "test"
    assert layout.training_tsv(1) == tmp_path / "split-1" / "training_logs" / "training.tsv"
    assert layout.tensorboard_dir(1) == tmp_path / "split-1" / "training_logs" / "tensorboard"
    assert layout.checkpoint_path(0) == tmp_path / "split-0" / "tmp" / "checkpoint.pt"
    assert layout.train_validation_tsv == tmp_path / "groups" / "train+validation.tsv"


def test_maps_json_round_trip_survives_a_move(tmp_path: Path) -> None:
    cfg, maps_dir = write_maps(
        tmp_path / "a",
        transfer_from=tmp_path / "a" / "bids" / "derivatives" / "bids_app" / "models" / "source",
        augmentations=("flip",),
    )
    record = maps.read_maps_json(maps_dir)
    assert record.config == cfg
    assert (record.task, record.mode, record.architecture) == (Task.CLASSIFICATION, ExtractionMode.IMAGE, "small_cnn")
    assert record.input_shape == INPUT_SHAPE and record.n_outputs == 2 and record.label_encoding == ENCODING
    assert record.version == read_version()
    text = maps.MapsLayout(maps_dir).maps_json.read_text()
    assert str(tmp_path) not in text  # every path is relative to a declared root
    content = json.loads(text)
    assert content["roots"] == {"output_dir": "../..", "bids_dir": "../../../.."}
    assert content["config"]["train"]["transfer_from"] == "${output_dir}/models/source"

    shutil.move(tmp_path / "a", tmp_path / "moved")
    moved = maps.read_maps_json(tmp_path / "moved" / "bids" / "derivatives" / "bids_app" / "models" / "model")
    expected = make_config(
        tmp_path / "moved",
        transfer_from=tmp_path / "moved" / "bids" / "derivatives" / "bids_app" / "models" / "source",
        augmentations=("flip",),
    )
    assert moved.config == expected


def test_maps_json_of_bids_app_0_1_0_reads_its_runtime_options(tmp_path: Path) -> None:
    """bids_app 0.1.0 wrote device, amp, ... under [train] and the inference batch size under [predict]."""
    cfg, maps_dir = write_maps(tmp_path)
    layout = MapsLayout(maps_dir)
    content = json.loads(layout.maps_json.read_text())
    runtime = content["config"].pop("runtime")
    assert set(runtime) == {f.name for f in dataclasses.fields(RuntimeConfig)}
    content["config"]["train"].update(device="cpu", amp=False, channels_last=True, num_workers=2,
                                      cache_samples=False, deterministic=True)  # fmt: skip
    content["config"]["predict"]["batch_size"] = 16
    layout.maps_json.write_text(json.dumps(content))
    expected = RuntimeConfig("cpu", channels_last=True, num_workers=2, deterministic=True, inference_batch_size=16)
    record = maps.Maps.open(maps_dir).record
    assert record.config.runtime == expected
    assert record.config.train == cfg.train and record.config.predict == cfg.predict


def test_maps_object_reads_the_folder_once(tmp_path: Path) -> None:
    cfg, maps_dir = write_maps(tmp_path)
    assert maps.Maps.exists(maps_dir) and not maps.Maps.exists(tmp_path / "nothing")
    opened = maps.Maps.open(maps_dir)
    assert (opened.root, opened.name, opened.class_names) == (maps_dir, "model", ["AD", "CN"])
    assert opened.record == maps.read_maps_json(maps_dir) and opened.record.config == cfg
    with pytest.raises(InputMissingError, match="No trained split"):
        opened.trained_splits()
    model = trained_model(maps_dir, split=1)
    trained_model(maps_dir, split=2)
    assert opened.trained_splits() == [1, 2] and opened.trained_splits((2, 3)) == [2]
    with pytest.raises(InputMissingError, match=r"No trained split .* among splits \[0\]"):
        opened.trained_splits((0,))
    assert opened.model_path(1, "loss") == opened.layout.model_path(1, "loss")
    loaded = opened.load_model(1, "loss")
    assert not loaded.training
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())
    assert opened.validate() is opened
    opened.layout.model_path(2, "loss").unlink()
    with pytest.raises(DataError, match=r"split-2/best-loss/model\.safetensors is missing"):
        opened.validate()
    assert not opened.layout.has_predictions()
    prediction = opened.layout.prediction_tsv(1, "loss", "test")
    assert prediction == maps_dir / "split-1/best-loss/test/test_image_level_prediction.tsv"
    prediction.parent.mkdir(parents=True)
    prediction.write_text("participant_id\n")
    assert opened.layout.has_predictions() and not opened.layout.has_predictions("validation")
    assert opened.layout.splits_json == maps_dir / "groups" / "splits.json"
    assert opened.layout.report_html == maps_dir / "report.html"


def test_maps_create_writes_the_record_and_environment(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    maps_dir = tmp_path / "models" / "new"
    extra = {"input_shape": list(INPUT_SHAPE), "n_outputs": 2, "label_encoding": ENCODING, "note": "kept"}
    created = maps.Maps.create(maps_dir, cfg, extra)
    assert created.layout.maps_json.is_file() and created.layout.environment_json.is_file()
    assert created.record == maps.Maps.open(maps_dir).record
    assert created.record.extra == {"note": "kept"}
    assert sum(p.numel() for p in created.build_model().parameters()) > 0


def test_root_outside_the_maps_stays_absolute(tmp_path: Path) -> None:
    base = make_config(tmp_path)  # a regression model: no label encoding
    cfg = dataclasses.replace(base, output_dir=tmp_path / "elsewhere",
                              labels=dataclasses.replace(base.labels, task=Task.REGRESSION))  # fmt: skip
    maps_dir = tmp_path / "models" / "m"
    maps.write_maps_json(maps_dir, cfg, {"input_shape": [1, 4, 4], "n_outputs": 1, "label_encoding": None})
    content = json.loads(MapsLayout(maps_dir).maps_json.read_text())
    assert content["roots"]["output_dir"] == str(tmp_path / "elsewhere")
    record = maps.read_maps_json(maps_dir, roots={"bids_dir": tmp_path / "new_bids"})
    assert record.config.bids_dir == tmp_path / "new_bids" and record.label_encoding is None
    assert record.config.extraction.roi_masks[0][1] == tmp_path / "new_bids" / "code" / "mask.nii.gz"


def test_save_and_load_model_bitwise(tmp_path: Path) -> None:
    _, maps_dir = write_maps(tmp_path)
    model = trained_model(maps_dir, split=1)
    loaded = maps.load_model(maps_dir, 1, "loss", device="cpu")
    assert not loaded.training
    reference = model.state_dict()
    assert set(loaded.state_dict()) == set(reference)
    assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())
    with pytest.raises(InputMissingError, match=r"best-loss"):
        maps.load_model(maps_dir, 1, "balanced_accuracy")


def test_pickle_model_files_are_refused(tmp_path: Path) -> None:
    _, maps_dir = write_maps(tmp_path)
    model = trained_model(maps_dir)
    path = MapsLayout(maps_dir).model_path(0, "loss")
    torch.save(model.state_dict(), path)  # a torch zip pickle under the safetensors name
    with pytest.raises(DataError, match="pickle"):
        maps.load_model(maps_dir, 0, "loss")
    path.write_bytes(b"\x80\x04\x95" + b"\x00" * 32)  # a raw pickle
    with pytest.raises(DataError, match="pickle"):
        maps.load_model(maps_dir, 0, "loss")
    path.write_bytes(b"garbage that is not a model")
    with pytest.raises(DataError, match="not a safetensors file"):
        maps.load_model(maps_dir, 0, "loss")
    path.unlink()
    torch.save(model.state_dict(), path.with_name("model.pth"))
    with pytest.raises(DataError, match=r"model\.pth.*pickle"):
        maps.load_model(maps_dir, 0, "loss")


def test_validate_maps_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(InputMissingError, match="does not exist"):
        maps.validate_maps(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"maps\.json is missing"):
        maps.validate_maps(tmp_path / "empty")
    _, maps_dir = write_maps(tmp_path)
    layout = MapsLayout(maps_dir)
    trained_model(maps_dir)
    assert maps.validate_maps(maps_dir).architecture == "small_cnn"
    layout.model_path(0, "loss").unlink()
    with pytest.raises(DataError, match=r"split-0/best-loss/model\.safetensors is missing"):
        maps.validate_maps(maps_dir)
    trained_model(maps_dir)
    layout.environment_json.unlink()
    with pytest.raises(DataError, match=r"environment\.json is missing"):
        maps.validate_maps(maps_dir)
    maps.write_environment_json(maps_dir, 0)
    content = json.loads(layout.maps_json.read_text())
    major = int(read_version().split(".")[0])
    content["bids_app_version"] = f"{major + 1}.0.0"
    layout.maps_json.write_text(json.dumps(content))
    with pytest.raises(DataError, match="different major version"):
        maps.validate_maps(maps_dir)
    del content["input_shape"]
    layout.maps_json.write_text(json.dumps(content))
    with pytest.raises(DataError, match="incomplete or malformed"):
        maps.read_maps_json(maps_dir)


def test_source_training_pool(tmp_path: Path) -> None:
    _, maps_dir = write_maps(tmp_path)
    rows = pd.DataFrame(
        {"participant_id": ["sub-01", "sub-02"], "session_id": ["n/a", "ses-M000"], "label": ["AD", "CN"]}
    )
    MapsLayout(maps_dir).groups_dir.mkdir()
    rows.to_csv(MapsLayout(maps_dir).train_validation_tsv, sep="\t", index=False)
    pool = source_training_pool(maps_dir)
    assert pool.equals(rows)
    MapsLayout(maps_dir).train_validation_tsv.unlink()
    with pytest.raises(InputMissingError, match=r"train\+validation\.tsv does not exist.*train\.transfer_from"):
        source_training_pool(maps_dir)
    with pytest.raises(InputMissingError, match=r"nowhere does not exist"):
        source_training_pool(tmp_path / "nowhere")
