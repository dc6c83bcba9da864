"""Training: every task, logs and best models, per-sample loss, bitwise resume and reruns, transfer, errors."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from bids_app import runtime
from bids_app.config import AnalysisLevel, ExtractionMode, LabelConfig, RunConfig, RuntimeConfig, Task, TrainConfig
from bids_app.data.dataset import TensorDataset
from bids_app.data.sampling import make_loader, mix_seed
from bids_app.data.tables import index_tensors
from bids_app.errors import ConfigError, DataError, TemporaryFailure
from bids_app.maps import folder as maps
from bids_app.maps.folder import MapsLayout
from bids_app.maps.splits import Fold, Splits
from bids_app.training import checkpoint
from bids_app.training import loop as epoch
from bids_app.training.stage import run_train_stage
from bids_app.training.transfer import source_training_pool
from tests.conftest import run_cli
from tests.data.test_data import write_tensors

N_IMAGES = 12
N_TRAIN = 7  # the other 5 validate: batches of 4 and 1


def make_data(root: Path, mode: ExtractionMode, task: Task, n_folds: int = 1) -> tuple[pd.DataFrame, Splits]:
    """Images of 12 participants (AD brighter than CN); labels are diagnoses or ages."""
    ids = [f"{i:02d}" for i in range(N_IMAGES)]
    diagnosis = {f"sub-{p}": ("AD" if i % 2 else "CN") for i, p in enumerate(ids)}
    age = {f"sub-{p}": str(60 + 2 * i) for i, p in enumerate(ids)}
    offsets = {p: (0.6 if i % 2 else 0.0) if task is Task.CLASSIFICATION else i / 10 for i, p in enumerate(ids)}
    write_tensors(root / "out", mode, [(p, None) for p in ids], offsets=offsets)
    table = index_tensors(root / "out", mode)
    table["label"] = table["participant_id"].map(age if task is Task.REGRESSION else diagnosis)
    rows = table[["participant_id", "session_id", "label"]]
    folds = []
    for k in range(n_folds):
        order = np.roll(np.arange(N_IMAGES), -k * (N_IMAGES - N_TRAIN))
        folds.append(
            Fold(
                k, rows.iloc[order[:N_TRAIN]].reset_index(drop=True), rows.iloc[order[N_TRAIN:]].reset_index(drop=True)
            )
        )
    return table, Splits(test=rows.iloc[:0], folds=tuple(folds), seed=0, attempts=1, p_values={})


RUNTIME_OPTIONS = frozenset(field.name for field in dataclasses.fields(RuntimeConfig))


def make_config(root: Path, task: Task = Task.CLASSIFICATION, seed: int = 1, **options: Any) -> RunConfig:
    """A CPU training run; ``options`` set ``RuntimeConfig`` fields (device, amp, channels_last, ...) or else
    ``TrainConfig`` fields."""
    train: dict[str, Any] = {
        "architecture": "small_cnn",
        "mode": ExtractionMode.IMAGE,
        "epochs": 3,
        "batch_size": 4,
        "learning_rate": 0.01,
        "dropout": 0.2,
    }
    runtime: dict[str, Any] = {"device": "cpu"}
    for name, value in options.items():
        (runtime if name in RUNTIME_OPTIONS else train)[name] = value
    return RunConfig(
        bids_dir=root / "bids",
        output_dir=root / "out",
        analysis_level=AnalysisLevel.GROUP,
        seed=seed,
        labels=LabelConfig(task=task),
        train=TrainConfig(**train),
        runtime=RuntimeConfig(**runtime),
    )


def maps_dir_of(cfg: RunConfig) -> Path:
    return cfg.output_dir / "models" / cfg.train.model_name


def train(cfg: RunConfig, table: pd.DataFrame, splits: Splits) -> Path:
    trained = run_train_stage(cfg, MapsLayout(maps_dir_of(cfg)), splits, table)
    assert trained.root == maps_dir_of(cfg)
    return trained.root


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t")


def weights(maps_dir: Path, split: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    layout = MapsLayout(maps_dir)
    return {p.parent.name: load_file(p) for p in sorted(layout.split_dir(split).glob("best-*/model.safetensors"))}


def assert_same_weights(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][key], b[name][key]) for key in a[name]), name


CASES = [
    (Task.CLASSIFICATION, "small_cnn", ExtractionMode.IMAGE, ("loss", "balanced_accuracy")),
    (Task.REGRESSION, "small_cnn", ExtractionMode.SLICE, ("loss", "mae", "r2")),
    (Task.RECONSTRUCTION, "small_autoencoder", ExtractionMode.PATCH, ("loss", "ssim")),
]


@pytest.mark.parametrize(("task", "architecture", "mode", "metrics"), CASES)
def test_each_task_logs_every_epoch_and_keeps_best_per_metric(
    tmp_path: Path, task: Task, architecture: str, mode: ExtractionMode, metrics: tuple[str, ...]
) -> None:
    table, splits = make_data(tmp_path, mode, task)
    cfg = make_config(
        tmp_path,
        task,
        architecture=architecture,
        mode=mode,
        selection_metrics=metrics,
        loss="huber" if task is Task.REGRESSION else None,
        optimizer="adamw",
    )
    maps_dir = train(cfg, table, splits)
    layout = MapsLayout(maps_dir)
    log = read_tsv(layout.training_tsv(0))
    assert log["epoch"].tolist() == [0, 1, 2]
    assert {"learning_rate", "train_loss", "validation_loss"} <= set(log.columns)
    assert np.isfinite(log[["train_loss", "validation_loss"]].to_numpy()).all()
    for metric in metrics:
        column = log[f"validation_{metric}"]
        best_epoch = int(column.idxmax() if metric in ("balanced_accuracy", "r2", "ssim") else column.idxmin())
        selection = json.loads(layout.selection_json(0, metric).read_text())
        assert selection["epoch"] == best_epoch
        assert selection["value"] == pytest.approx(column[best_epoch], rel=1e-9)
        model = maps.load_model(maps_dir, 0, metric)
        assert sum(p.numel() for p in model.parameters()) > 0
    assert not layout.tmp_dir(0).exists()
    assert_tensorboard_overlays(layout.tensorboard_dir(0), log, metrics)
    summary = json.loads(layout.summary_json(0).read_text())
    assert summary["epochs_completed"] == 3 and summary["n_validation_images"] == N_IMAGES - N_TRAIN
    n_parts = {ExtractionMode.IMAGE: 1, ExtractionMode.SLICE: 5, ExtractionMode.PATCH: 4}[mode]
    assert summary["n_train_samples"] == N_TRAIN * n_parts
    record = maps.validate_maps(maps_dir)
    assert (
        record.input_shape
        == {ExtractionMode.IMAGE: (1, 6, 6, 6), ExtractionMode.SLICE: (1, 6, 7), ExtractionMode.PATCH: (1, 3, 3, 3)}[
            mode
        ]
    )
    assert record.label_encoding == ({"AD": 0, "CN": 1} if task is Task.CLASSIFICATION else None)


def assert_tensorboard_overlays(events_dir: Path, log: pd.DataFrame, metrics: tuple[str, ...]) -> None:
    """The event files hold ``training.tsv``'s values under ``<quantity>/<set>`` tags: one chart per quantity."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(events_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(events_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"loss/train": "train_loss", "learning_rate": "learning_rate"}
    expected |= {f"{metric}/validation": f"validation_{metric}" for metric in metrics}
    assert "loss/validation" in tags and expected.keys() <= tags
    assert not {tag for tag in tags if tag.startswith(("train", "validation"))}, tags
    for tag, column in expected.items():
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == log["epoch"].tolist()
        assert [s.value for s in scalars] == pytest.approx(log[column].tolist(), rel=1e-6)


def test_validation_loss_is_the_mean_over_samples(tmp_path: Path) -> None:
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    cfg = make_config(tmp_path, epochs=1, batch_size=4)
    maps_dir = train(cfg, table, splits)
    logged = read_tsv(MapsLayout(maps_dir).training_tsv(0))["validation_loss"].item()
    model = maps.load_model(maps_dir, 0, "loss")  # the only epoch's weights
    val_rows = table.merge(splits.folds[0].validation[["participant_id", "session_id"]])
    dataset = TensorDataset(val_rows, ExtractionMode.IMAGE, Task.CLASSIFICATION, label_encoding={"AD": 0, "CN": 1})
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.stack([dataset[i][1] for i in range(len(dataset))])
    with torch.inference_mode():
        losses = nn.functional.cross_entropy(model(x), y, reduction="none").double()
    assert len(losses) == 5
    assert logged == pytest.approx(losses.mean().item(), rel=1e-6)
    mean_of_batch_means = (losses[:4].mean() + losses[4:].mean()).item() / 2
    assert abs(mean_of_batch_means - logged) > 1e-4  # the two definitions differ on this data


class Linear(nn.Module):
    """No batch norm, no dropout: a sample's output does not depend on its batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(216, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_train_epoch_loss_is_per_sample_and_accumulates_gradients(tmp_path: Path) -> None:
    table, _ = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    dataset = TensorDataset(
        table.iloc[:7], ExtractionMode.IMAGE, Task.CLASSIFICATION, label_encoding={"AD": 0, "CN": 1}
    )
    torch.manual_seed(0)
    model = Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    steps = []
    original_step = optimizer.step
    optimizer.step = lambda *a, **k: steps.append(1) or original_step(*a, **k)  # type: ignore[method-assign]
    loop = epoch.Loop(
        model=model,
        optimizer=optimizer,
        scheduler=None,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loss_fn=epoch.per_sample_loss(Task.CLASSIFICATION, None),
        device=torch.device("cpu"),
        amp_dtype=None,
        accumulation_steps=3,
    )
    loader = make_loader(dataset, batch_size=2, seed=0, shuffle=True)  # batches of 2, 2, 2, 1
    mean = epoch.train_epoch(loop, loader)
    assert len(steps) == 2  # after batches 3 and 4 (the last)
    x = torch.stack([dataset[i][0] for i in range(7)])
    y = torch.stack([dataset[i][1] for i in range(7)])
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x), y, reduction="none").double().mean().item()
    assert mean == pytest.approx(expected, rel=1e-6)
    scores = epoch.validate(loop, loader, Task.CLASSIFICATION)
    assert scores["loss"] == pytest.approx(expected, rel=1e-6) and 0 <= scores["accuracy"] <= 1


def interrupt_after(monkeypatch: pytest.MonkeyPatch, n_checkpoints: int) -> None:
    """Make training die (like a killed job) right after its n-th checkpoint."""
    original = checkpoint.save_checkpoint
    calls = []

    def save_then_die(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        calls.append(1)
        if len(calls) == n_checkpoints:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)


def test_resume_and_rerun_are_bitwise_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    options = {
        "epochs": 4,
        "dropout": 0.5,
        "augmentations": ("affine", "flip", "intensity_scaling", "gaussian_noise"),
        "lr_plateau_patience": 1,
        "early_stopping_patience": 10,
        "selection_metrics": ("loss", "accuracy"),
        "class_weighted_sampling": True,
        "deterministic": True,
    }
    whole = train(make_config(tmp_path, model_name="whole", **options), table, splits)
    rerun = train(make_config(tmp_path, model_name="rerun", cache_samples=True, **options), table, splits)
    other_seed = train(make_config(tmp_path, model_name="seed2", seed=2, **options), table, splits)

    interrupted_cfg = make_config(tmp_path, model_name="resumed", **options)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted_cfg, table, splits)
    monkeypatch.undo()
    resumed_layout = MapsLayout(maps_dir_of(interrupted_cfg))
    assert resumed_layout.checkpoint_path(0).is_file()
    assert len(read_tsv(resumed_layout.training_tsv(0))) == 2
    resumed = train(
        dataclasses.replace(interrupted_cfg, train=dataclasses.replace(interrupted_cfg.train, resume=True)),
        table,
        splits,
    )

    reference = weights(whole)
    for maps_dir in (rerun, resumed):
        assert_same_weights(weights(maps_dir), reference)
        layout = MapsLayout(maps_dir)
        assert layout.training_tsv(0).read_text() == MapsLayout(whole).training_tsv(0).read_text()
        summary = json.loads(layout.summary_json(0).read_text())
        assert summary == json.loads(MapsLayout(whole).summary_json(0).read_text())
        assert not layout.tmp_dir(0).exists()
    assert (
        json.loads(MapsLayout(other_seed).summary_json(0).read_text())["final_weights_sha256"]
        != summary["final_weights_sha256"]
    )


def scripted_validation(monkeypatch: pytest.MonkeyPatch, losses: list[float]) -> None:
    """Replace the validation pass by a fixed sequence of losses, one per epoch."""
    sequence = iter(losses)

    def fake_validate(*args: Any, **kwargs: Any) -> dict[str, float]:
        return {"loss": next(sequence), "accuracy": 0.5}

    monkeypatch.setattr(epoch, "validate", fake_validate)


def test_resume_never_replaces_a_best_model_by_a_worse_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    cfg = make_config(tmp_path, epochs=4)
    scripted_validation(monkeypatch, [1.0, 0.5, 0.7, 0.9])
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, table, splits)
    layout = MapsLayout(maps_dir_of(cfg))
    best_bytes = layout.model_path(0, "loss").read_bytes()
    monkeypatch.undo()
    scripted_validation(monkeypatch, [0.7, 0.9])  # epochs 2 and 3 are worse than epoch 1
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True)), table, splits)
    assert json.loads(layout.selection_json(0, "loss").read_text())["epoch"] == 1
    assert layout.model_path(0, "loss").read_bytes() == best_bytes
    assert read_tsv(layout.training_tsv(0))["validation_loss"].tolist() == [1.0, 0.5, 0.7, 0.9]


def test_early_stopping_and_learning_rate_plateau(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    cfg = make_config(tmp_path, epochs=20, early_stopping_patience=4, lr_plateau_patience=1, learning_rate=0.01)
    scripted_validation(monkeypatch, [1.0] * 20)
    maps_dir = train(cfg, table, splits)
    log = read_tsv(MapsLayout(maps_dir).training_tsv(0))
    assert log["epoch"].tolist() == [0, 1, 2, 3, 4]  # no improvement after epoch 0 for 4 epochs
    assert log["learning_rate"].tolist() == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001])
    summary = json.loads(MapsLayout(maps_dir).summary_json(0).read_text())
    assert summary["stopped_early"] and summary["best"]["loss"]["epoch"] == 0


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), MemoryError()])
def test_out_of_memory_is_a_temporary_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error) -> None:
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)

    def exhausted(*args: Any, **kwargs: Any) -> float:
        raise error

    monkeypatch.setattr(epoch, "train_epoch", exhausted)
    with pytest.raises(TemporaryFailure, match=r"--batch-size \(e\.g\. to 2"):
        train(make_config(tmp_path), table, splits)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"optimizer": "lbfgs"}, r"Unknown optimizer 'lbfgs'.*adam, adamw, sgd"),
        ({"augmentations": ("wobble",)}, r"'wobble'.*affine, elastic, flip"),
        ({"selection_metrics": ("mae",)}, r"\['mae'\] are not classification metrics"),
        ({"loss": "huber"}, "Loss 'huber' does not apply to classification"),
        ({"architecture": "small_autoencoder"}, "does not support the classification task"),
        ({"splits": (3,)}, "Split 3 does not exist"),
    ],
)
def test_invalid_options_are_refused(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    cfg = make_config(tmp_path, **options)
    with pytest.raises(ConfigError, match=message):
        train(cfg, table, splits)
    assert not (maps_dir_of(cfg) / "split-3").exists() and not (maps_dir_of(cfg) / "split-0").exists()


def test_split_rows_without_tensor_are_refused(tmp_path: Path) -> None:
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    with pytest.raises(DataError, match=r"1 image\(s\) of the training set have no tensor"):
        train(make_config(tmp_path), table[table.participant_id != splits.folds[0].train.participant_id[0]], splits)


def test_amp_is_float16_on_cuda_and_refused_on_cpu(tmp_path: Path) -> None:
    assert runtime.autocast_dtype(torch.device("cuda", 0), True) is torch.float16
    assert runtime.autocast_dtype(torch.device("cpu"), False) is None
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    with pytest.raises(ConfigError, match=r"--amp \(runtime\.amp\) is refused on device cpu"):
        train(make_config(tmp_path, amp=True, epochs=1), table, splits)
    assert not any((tmp_path / "out").rglob("*.safetensors"))


def test_selected_splits_and_resume_skips_finished_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION, n_folds=2)
    cfg = make_config(tmp_path, epochs=1, splits=(1,))
    layout = MapsLayout(train(cfg, table, splits))
    assert layout.summary_json(1).is_file() and not layout.split_dir(0).exists()
    trained = []
    import bids_app.training.stage as train_module

    original = train_module.train_split
    monkeypatch.setattr(train_module, "train_split", lambda *a: trained.append(a[1]) or original(*a))
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, splits=(), resume=True)), table, splits)
    assert trained == [0] and layout.summary_json(0).is_file()


def test_transfer_learning_copies_and_freezes_the_encoder(tmp_path: Path) -> None:
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    source_cfg = make_config(
        tmp_path, Task.RECONSTRUCTION, architecture="small_autoencoder", model_name="source", epochs=1
    )
    source_dir = train(source_cfg, table, splits)
    pool = table[["participant_id", "session_id", "label"]].iloc[:N_TRAIN]
    MapsLayout(source_dir).groups_dir.mkdir()
    pool.to_csv(MapsLayout(source_dir).train_validation_tsv, sep="\t", index=False)

    cfg = make_config(
        tmp_path, model_name="target", transfer_from=source_dir, n_unfrozen_layers=2, epochs=2, learning_rate=0.05
    )
    target_dir = train(cfg, table, splits)
    source = load_file(MapsLayout(source_dir).model_path(0, "loss"))
    target = load_file(MapsLayout(target_dir).model_path(0, "loss"))
    trainable = {"classifier.fc1.weight", "classifier.fc1.bias", "classifier.fc2.weight", "classifier.fc2.bias"}
    frozen = [k for k in target if k.startswith("features.") and "running" not in k and "num_batches" not in k]
    assert frozen and all(torch.equal(target[k], source["encoder." + k.removeprefix("features.")]) for k in frozen)
    torch.manual_seed(mix_seed(cfg.seed, 0, 0))  # what train_split seeds before building the model
    initial = maps.build_maps_model(maps.read_maps_json(target_dir)).state_dict()
    assert not torch.equal(initial["features.0.conv.weight"], target["features.0.conv.weight"])
    assert all(not torch.equal(initial[k], target[k]) for k in trainable)
    record = maps.read_maps_json(target_dir)
    assert record.extra["transfer_source"]["architecture"] == "small_autoencoder"
    assert record.config.train.transfer_from == source_dir
    assert source_training_pool(source_dir).equals(pool.reset_index(drop=True).astype(str))


def test_transfer_from_a_source_of_other_channels_is_refused_before_the_model_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A T1w source into a T1w+FLAIR model: exit 64 naming both channel lists, before the model folder is
    written (the first convolution's shape mismatch used to surface in training, after the record and split);
    a T1w source into a FLAIR model (same count) is transferred with a warning naming both."""
    from bids_app.training.transfer import describe_source

    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    source_dir = train(make_config(tmp_path, model_name="source", epochs=1), table, splits)
    out = tmp_path / "out"
    result = run_cli(str(tmp_path / "bids"), str(out), "group", "--channels", "T1w", "FLAIR", "--transfer-from",
                     str(source_dir), "--model-name", "target")  # fmt: skip
    assert result.returncode == 64, result.stderr[-2000:]
    assert "its models read 1 channel(s) (T1w), but --channels asks for 2 (T1w, FLAIR)" in result.stderr
    assert not (out / "models" / "target").exists()
    with caplog.at_level(logging.WARNING, logger="bids_app.training.transfer"):
        assert describe_source(source_dir, None, ("FLAIR",))["architecture"] == "small_cnn"
    assert any(f"{source_dir} was trained on T1w, this model reads FLAIR" in r.getMessage() for r in caplog.records)


def test_checkpoint_config_hash_covers_the_training_options(tmp_path: Path) -> None:
    """A resume with another learning rate or architecture is refused: the options are part of the config hash
    (they were once shadowed by the images' ``train`` key, so no option counted)."""
    rows = pd.DataFrame({"participant_id": ["sub-1"], "session_id": ["ses-1"], "label": ["AD"],
                         "tensor_path": ["sub-1_ses-1_image.npy"]})  # fmt: skip
    cfg = RunConfig(tmp_path, tmp_path / "out", AnalysisLevel.GROUP)
    stamp = checkpoint.training_config_hash(cfg, 0, rows, rows)
    for change in ({"learning_rate": 0.5}, {"architecture": "resnet3d"}, {"dropout": 0.1}):
        other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **change))
        assert checkpoint.training_config_hash(other, 0, rows, rows) != stamp, change
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=99))
    assert checkpoint.training_config_hash(longer, 0, rows, rows) == stamp


def test_checkpoint_config_hash_is_the_fingerprint_of_bids_app_0_1_0() -> None:
    """Checkpoints of bids_app 0.1.0 stored this hash as ``fingerprint``, with the runtime options in [train]:
    they still resume. The values were computed with 0.1.0's ``checkpoint.fingerprint``, whose default learning
    rate was 1e-4 (now 1e-3: a 0.1.0 checkpoint resumes when its rate is given, and is refused otherwise)."""
    rows = pd.DataFrame({"participant_id": ["sub-1"], "session_id": ["ses-1"], "label": ["AD"],
                         "tensor_path": ["sub-1_ses-1_image.npy"]})  # fmt: skip
    cfg = RunConfig(Path("/data/bids"), Path("/data/out"), AnalysisLevel.GROUP, seed=3)
    assert checkpoint.training_config_hash(cfg, 0, rows, rows) != (
        "12b97154aa829a36358c7352eb2aec8c88c822026bc6a68170a01838b9c8322e"
    )
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rate=1e-4, linear_baseline=False))
    assert checkpoint.training_config_hash(cfg, 0, rows, rows) == (
        "12b97154aa829a36358c7352eb2aec8c88c822026bc6a68170a01838b9c8322e"
    )
    flair = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, channels=("T1w", "FLAIR")))
    assert checkpoint.training_config_hash(flair, 0, rows, rows) != checkpoint.training_config_hash(cfg, 0, rows, rows)
    amp = dataclasses.replace(cfg, runtime=RuntimeConfig(amp=True, device="cpu", num_workers=2))
    assert checkpoint.training_config_hash(amp, 0, rows, rows) == (
        "7afcf29584958f2b62d54ffa9543dee0cd1aff08f5dfce5f5c24d9e50e8e319b"
    )
