"""``runtime.channels_last`` (on by default): the model and every input batch in channels-last memory format.

What is checked: the layout of batches, convolution weights and convolution outputs while training, validating,
predicting and explaining (3D models: ``torch.channels_last_3d``, 2D models: ``torch.channels_last``), with one
input channel as the data have and with several; that losses, weights and predictions after 2 epochs equal
those of the contiguous layout within float tolerance; resume across the option, AMP and DDP; the default and
the flags that change it.

Tolerances: the optimiser is SGD where weights are compared. Convolutions in another layout sum in another
order (differences of ~1e-7); SGD carries them forward linearly (measured 6e-8 on the weights after 2 epochs),
whereas Adam divides each step by the root of its second moment, so a gradient near zero that differs in its
last bits moves a weight by up to the learning rate (measured 1.6e-4 with Adam at lr 0.01).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from bids_app.cli.arguments import build_parser, parse_config
from bids_app.config import (
    AnalysisLevel,
    ExtractionMode,
    InterpretConfig,
    PredictConfig,
    RunConfig,
    RuntimeConfig,
    SplitConfig,
    Task,
    TrainConfig,
)
from bids_app.data.dataset import TensorDataset
from bids_app.errors import ConfigError, UsageError
from bids_app.interpret.saliency import SaliencyMethod
from bids_app.interpret.stage import GroupExplainer
from bids_app.maps import Maps
from bids_app.maps import folder as maps
from bids_app.maps.folder import MapsLayout
from bids_app.maps.weights import save_model
from bids_app.models import build_model
from bids_app.prediction import stage as predict
from bids_app.runtime import batch_memory_format, set_memory_format
from bids_app.split.files import write_splits
from bids_app.split.make import make_splits
from bids_app.training import checkpoint, distributed
from bids_app.training.loop import Loop, per_sample_loss, train_epoch, validate
from tests.prediction.test_predict import write_output_dir
from tests.training.test_distributed import WORLD, free_port, torchrun_env
from tests.training.test_train import interrupt_after, make_config, make_data, maps_dir_of, read_tsv, train, weights

MODES = {  # mode → the layout of its batches, parts per image
    ExtractionMode.IMAGE: (torch.channels_last_3d, 1),  # (N, 1, 6, 6, 6)
    ExtractionMode.SLICE: (torch.channels_last, 5),  # (N, 1, 6, 7)
}
ENCODING = {"AD": 0, "CN": 1}
# Batches of 5 leave no batch of one sample: on CPU torch convolves a single small sample with its own kernel,
# whose output is contiguous whatever the layout of weights and input (oneDNN takes every larger batch).
BATCH = 5
SGD = {"optimizer": "sgd", "epochs": 2, "batch_size": BATCH, "selection_metrics": ("loss", "accuracy")}
LOSS_COLUMNS = ["train_loss", "validation_loss", "validation_accuracy"]


def strides_in(tensor: torch.Tensor, memory_format: torch.memory_format) -> bool:
    """True when ``tensor`` has exactly the strides of its shape in ``memory_format``.

    Stricter than ``is_contiguous(memory_format=...)``: a tensor with one channel passes that test in both
    layouts, while its channel stride tells them apart (1 in channels-last, ``D*H*W`` otherwise).
    """
    return tensor.stride() == torch.empty(tensor.shape, memory_format=memory_format, device="meta").stride()


def test_channels_last_is_the_default_and_no_channels_last_turns_it_off(tmp_path: Path) -> None:
    """The faster CPU layout is the default (docs/performance.md); a flag or the config file chooses the other."""
    bare = [str(tmp_path / "bids"), str(tmp_path / "out"), "group"]
    assert RuntimeConfig().channels_last is True
    assert parse_config(bare).runtime.channels_last is True
    assert parse_config([*bare, "--no-channels-last"]).runtime.channels_last is False
    assert parse_config([*bare, "--no-channels-last", "--channels_last"]).runtime.channels_last is True  # last wins
    config = tmp_path / "run.toml"
    config.write_text("[runtime]\nchannels_last = false\n")
    assert parse_config([*bare, "--config", str(config)]).runtime.channels_last is False
    assert parse_config([*bare, "--config", str(config), "--channels-last"]).runtime.channels_last is True
    config.write_text('[runtime]\nchannels_last = "no"\n')
    with pytest.raises(ConfigError, match=r"'runtime\.channels_last' must be true or false, got 'no'"):
        parse_config([*bare, "--config", str(config)])
    with pytest.raises(SystemExit) as exit_info:
        parse_config([*bare, "--channels-last=no"])
    assert exit_info.value.code == UsageError.exit_code
    help_text = " ".join(build_parser().format_help().split())
    assert "--no-channels-last, --channels-last, --channels_last" in help_text
    assert "(--no-channels-last) (default: on)" in help_text


def test_batch_memory_format_follows_the_batch_rank() -> None:
    assert batch_memory_format(5, True) is torch.channels_last_3d
    assert batch_memory_format(4, True) is torch.channels_last
    assert batch_memory_format(5, False) is torch.preserve_format
    assert batch_memory_format(3, False) is torch.preserve_format
    with pytest.raises(ValueError, match="not 3-D"):
        batch_memory_format(3, True)


class TwoChannelNet(nn.Module):
    """Two input channels, so that a channels-last batch differs from a contiguous one by ``is_contiguous``."""

    def __init__(self, n_dims: int) -> None:
        super().__init__()
        self.conv = (nn.Conv3d if n_dims == 3 else nn.Conv2d)(2, 3, 3, padding=1)
        self.fc = nn.LazyLinear(2)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach())
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("spatial", [(4, 5, 6), (5, 6)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_loop_feeds_batches_in_the_models_memory_format(spatial: tuple[int, ...], channels_last: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, *spatial, generator=generator)
    data = torch.utils.data.TensorDataset(x, torch.arange(6) % 2, torch.arange(6))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    fmt = batch_memory_format(x.ndim, channels_last)
    torch.manual_seed(0)
    model = TwoChannelNet(len(spatial))
    model(x[:1])  # materialises the lazy layer
    set_memory_format(model, fmt)
    model.inputs.clear()
    loop = Loop(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        scheduler=None,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loss_fn=per_sample_loss(Task.CLASSIFICATION, None),
        device=torch.device("cpu"),
        amp_dtype=None,
        memory_format=fmt,
    )
    train_epoch(loop, loader)
    validate(loop, loader, Task.CLASSIFICATION)
    assert len(model.inputs) == 4  # 2 training and 2 validation batches
    cl = {5: torch.channels_last_3d, 4: torch.channels_last}[x.ndim]
    for batch in model.inputs:
        assert batch.is_contiguous(memory_format=cl) is channels_last
        assert batch.is_contiguous() is not channels_last
    assert model.conv.weight.is_contiguous(memory_format=cl) is channels_last


@dataclasses.dataclass
class Layouts:
    """What the convolutions of the model ``train`` builds saw at each forward pass."""

    inputs: list[bool] = dataclasses.field(default_factory=list)  # the batch has channels-last strides
    weights: list[bool] = dataclasses.field(default_factory=list)  # every conv weight has channels-last strides
    outputs: list[bool] = dataclasses.field(default_factory=list)  # every conv output channels-last, not contiguous
    training: list[bool] = dataclasses.field(default_factory=list)


def watch_convolutions(monkeypatch: pytest.MonkeyPatch, memory_format: torch.memory_format) -> Layouts:
    """Hook every model ``maps.build_maps_model`` builds from now on (training builds it there)."""
    layouts = Layouts()
    original = maps.build_maps_model

    def build(record: maps.MapsRecord) -> nn.Module:
        model = original(record)
        convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]
        in_format: list[nn.Module] = []  # the convolutions of this forward pass whose output is channels-last

        def before(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            in_format.clear()
            layouts.inputs.append(strides_in(args[0], memory_format))
            layouts.weights.append(all(strides_in(c.weight, memory_format) for c in convolutions))
            layouts.training.append(module.training)

        def after(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if output.is_contiguous(memory_format=memory_format) and not output.is_contiguous():
                in_format.append(module)

        model.register_forward_pre_hook(before)
        model.register_forward_hook(lambda *_: layouts.outputs.append(len(in_format) == len(convolutions) > 0))
        for convolution in convolutions:
            convolution.register_forward_hook(after)
        return model

    monkeypatch.setattr(maps, "build_maps_model", build)
    return layouts


def predictions(maps_dir: Path, table: pd.DataFrame, mode: ExtractionMode, channels_last: bool) -> pd.DataFrame:
    model = maps.load_model(maps_dir, 0, "loss")
    dataset = TensorDataset(table, mode, Task.CLASSIFICATION, label_encoding=ENCODING)
    return predict.run_inference(model, dataset, Task.CLASSIFICATION, batch_size=4, channels_last=channels_last)


@pytest.mark.parametrize("mode", list(MODES))
def test_training_runs_channels_last_by_default_and_matches_the_contiguous_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: ExtractionMode
) -> None:
    table, splits = make_data(tmp_path, mode, Task.CLASSIFICATION)
    fmt, n_parts = MODES[mode]
    n_train, n_validation = (math.ceil(n_images * n_parts / BATCH) for n_images in (7, 5))
    default_layouts = watch_convolutions(monkeypatch, fmt)
    config = make_config(tmp_path, mode=mode, model_name="default", channels_last=False, **SGD)
    default = train(config, table, splits)
    monkeypatch.undo()
    layouts = watch_convolutions(monkeypatch, fmt)
    channels_last = train(make_config(tmp_path, mode=mode, model_name="cl", **SGD), table, splits)  # the default

    assert layouts.training == ([True] * n_train + [False] * n_validation) * 2  # 2 epochs
    assert all(layouts.inputs) and all(layouts.weights) and all(layouts.outputs)
    assert len(default_layouts.inputs) == len(layouts.inputs)
    assert not any(default_layouts.inputs + default_layouts.weights + default_layouts.outputs)
    assert maps.read_maps_json(channels_last).config.runtime.channels_last is True

    logged = [read_tsv(MapsLayout(d).training_tsv(0))[LOSS_COLUMNS].to_numpy() for d in (default, channels_last)]
    np.testing.assert_allclose(logged[1], logged[0], rtol=1e-5, atol=1e-6)
    expected = weights(default)
    for metric, state in weights(channels_last).items():
        for key, value in state.items():
            torch.testing.assert_close(value, expected[metric][key], rtol=1e-5, atol=1e-6, msg=f"{metric} {key}")
            assert value.is_contiguous()  # safetensors holds the same logical order whatever the layout

    reference = predictions(default, table, mode, channels_last=False)
    assert len(reference) == len(table) * n_parts
    for maps_dir in (default, channels_last):
        predicted = predictions(maps_dir, table, mode, channels_last=True)
        pd.testing.assert_frame_equal(predicted, reference, check_exact=False, rtol=1e-5, atol=1e-6)
    model = maps.load_model(channels_last, 0, "loss")
    dataset = TensorDataset(table, mode, Task.CLASSIFICATION, label_encoding=ENCODING)
    predict.run_inference(model, dataset, Task.CLASSIFICATION, 4, channels_last=True)
    assert all(strides_in(m.weight, fmt) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Conv3d))


def test_the_predict_stage_runs_channels_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output_dir = tmp_path / "out"
    table = write_output_dir(output_dir, {f"{i:02d}": ("AD" if i % 2 else "CN") for i in range(1, 11)})
    split_cfg = SplitConfig(test_size=4, n_splits=1, validation_size=0.25, balance_p_threshold=0.0)
    maps_dir = output_dir / "models" / "model"
    layout = MapsLayout(maps_dir)
    splits = make_splits(table, split_cfg, Task.CLASSIFICATION, seed=0)
    write_splits(layout.groups_dir, splits, table, split_cfg)
    train_cfg = TrainConfig(architecture="small_cnn", mode=ExtractionMode.PATCH, selection_metrics=("loss",))
    predict_cfg = PredictConfig(n_bootstrap=10)
    cfg = RunConfig(
        tmp_path / "bids", output_dir, AnalysisLevel.GROUP, train=train_cfg, split=split_cfg, predict=predict_cfg
    )
    maps.write_maps_json(maps_dir, cfg, {"input_shape": [1, 8, 8, 8], "n_outputs": 2, "label_encoding": ENCODING})
    (maps_dir / "environment.json").write_text("{}")
    torch.manual_seed(0)
    model = build_model("small_cnn", task=Task.CLASSIFICATION, input_shape=(1, 8, 8, 8), n_outputs=2)
    save_model(layout.model_path(0, "loss"), model)
    layout.summary_json(0).parent.mkdir(parents=True)
    layout.summary_json(0).write_text("{}")
    original, seen = predict.run_inference, []

    def spy(model: nn.Module, *args: Any, **kwargs: Any) -> pd.DataFrame:
        parts = original(model, *args, **kwargs)
        conv_weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv3d)]
        seen.append((kwargs["channels_last"], all(strides_in(w, torch.channels_last_3d) for w in conv_weights)))
        return parts

    monkeypatch.setattr(predict, "run_inference", spy)
    tables = {}
    for channels_last in (False, True):
        run_cfg = dataclasses.replace(cfg, runtime=RuntimeConfig(channels_last=channels_last))
        predict.run_predict_stage(run_cfg, Maps.open(maps_dir), table)
        tables[channels_last] = read_tsv(layout.group_dir(0, "loss", "test") / "test_patch_level_prediction.tsv")
    assert seen == [(False, False)] * 2 + [(True, True)] * 2  # validation then test, per run
    assert len(tables[True]) == 3 * 4  # 3 patches of 4 test images
    pd.testing.assert_frame_equal(tables[True], tables[False], check_exact=False, atol=2e-6)


def test_resume_may_switch_channels_last_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    whole = train(make_config(tmp_path, model_name="whole", channels_last=False, **SGD), table, splits)
    cfg = make_config(tmp_path, model_name="resumed", channels_last=False, **SGD)
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, table, splits)
    monkeypatch.undo()
    assert len(read_tsv(MapsLayout(maps_dir_of(cfg)).training_tsv(0))) == 1
    layouts = watch_convolutions(monkeypatch, torch.channels_last_3d)
    resumed_cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, resume=True),
        runtime=dataclasses.replace(cfg.runtime, channels_last=True),
    )
    resumed = train(resumed_cfg, table, splits)
    assert layouts.training == [True, True, False]  # epoch 1 only (2 training batches, 1 validation batch)
    assert all(layouts.inputs) and all(layouts.weights) and all(layouts.outputs)
    logged = [read_tsv(MapsLayout(d).training_tsv(0))[LOSS_COLUMNS].to_numpy() for d in (whole, resumed)]
    np.testing.assert_array_equal(logged[1][0], logged[0][0])  # epoch 0 came from the checkpoint
    np.testing.assert_allclose(logged[1], logged[0], rtol=1e-5, atol=1e-6)
    expected = weights(whole)
    for metric, state in weights(resumed).items():
        for key, value in state.items():
            torch.testing.assert_close(value, expected[metric][key], rtol=1e-5, atol=1e-6)


def test_the_checkpoint_config_hash_ignores_resumable_options_only(tmp_path: Path) -> None:
    """channels_last (any runtime option but amp and deterministic) and epochs may change on resume; amp,
    deterministic or the learning rate may not (the resume is refused)."""
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    fold = splits.folds[0]
    rows = [table.merge(side[["participant_id", "session_id"]]) for side in (fold.train, fold.validation)]
    cfg = make_config(tmp_path)

    def config_hash(**option: Any) -> str:
        runtime = {k: v for k, v in option.items() if k in {f.name for f in dataclasses.fields(RuntimeConfig)}}
        train = {k: v for k, v in option.items() if k not in runtime}
        changed = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, **train), runtime=dataclasses.replace(cfg.runtime, **runtime)
        )
        return checkpoint.training_config_hash(changed, 0, *rows)

    stamps = {
        name: config_hash(**option)
        for name, option in (
            ("default", {}),
            ("channels_last", {"channels_last": False}),  # on by default
            ("device", {"device": "cuda:1"}),
            ("num_workers", {"num_workers": 3}),
            ("cache_samples", {"cache_samples": True}),
            ("inference_batch_size", {"inference_batch_size": 64}),
            ("epochs", {"epochs": 99}),
            ("amp", {"amp": True}),
            ("deterministic", {"deterministic": True}),
            ("learning_rate", {"learning_rate": 0.5}),
        )
    }
    resumable = ("channels_last", "device", "num_workers", "cache_samples", "inference_batch_size", "epochs")
    assert {stamps[name] for name in resumable} == {stamps["default"]}  # RESUMABLE_KEYS and the runtime section
    assert stamps["amp"] != stamps["default"]  # checkpoint.HASHED_RUNTIME_KEYS
    assert stamps["deterministic"] not in (stamps["default"], stamps["amp"])
    assert stamps["learning_rate"] not in (stamps["default"], stamps["amp"], stamps["deterministic"])


def test_resume_with_adam_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adam's moments restored into a channels-last model: the run goes on."""
    table, splits = make_data(tmp_path, ExtractionMode.SLICE, Task.CLASSIFICATION)
    options = {"mode": ExtractionMode.SLICE, "epochs": 3, "channels_last": True}  # make_config: runtime.channels_last
    whole = train(make_config(tmp_path, model_name="whole", **options), table, splits)
    cfg = make_config(tmp_path, model_name="resumed", **options)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, table, splits)
    monkeypatch.undo()
    resumed = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True)), table, splits)
    # Same options on both sides: resuming stays bit for bit, as in the default layout.
    assert MapsLayout(resumed).training_tsv(0).read_text() == MapsLayout(whole).training_tsv(0).read_text()
    expected = weights(whole)
    assert all(torch.equal(v, expected[m][k]) for m, state in weights(resumed).items() for k, v in state.items())


def test_explanations_match_the_default_layout(tmp_path: Path) -> None:
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    cfg = make_config(tmp_path, model_name="cnn", **SGD)
    maps_dir = train(cfg, table, splits)
    record = maps.read_maps_json(maps_dir)
    dataset = TensorDataset(table, ExtractionMode.IMAGE, Task.CLASSIFICATION, label_encoding=ENCODING)
    x = np.stack([dataset.read_sample(i) for i in range(5)])  # (5, 1, 6, 6, 6), explained as one image's parts
    results = []
    for channels_last in (False, True):
        runtime = dataclasses.replace(cfg.runtime, channels_last=channels_last)
        run_cfg = dataclasses.replace(cfg, runtime=runtime, interpret=InterpretConfig(n_steps=4))
        model = maps.load_model(maps_dir, 0, "loss")
        explainer = GroupExplainer(run_cfg, record, model, list(SaliencyMethod), "predicted")
        batches = explainer._batches(x)
        assert all(strides_in(b, torch.channels_last_3d) is channels_last for b in batches)
        conv_weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv3d)]
        assert all(strides_in(w, torch.channels_last_3d) is channels_last for w in conv_weights)
        predicted = explainer._predict(x)
        results.append((predicted, {m: explainer._saliency(m, x, predicted) for m in SaliencyMethod}))
    assert results[0][0] == results[1][0]
    for method in SaliencyMethod:
        expected, actual = results[0][1][method], results[1][1][method]
        assert actual.shape == (5, 6, 6, 6) and np.abs(expected).max() > 0
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max(), err_msg=method)


# -- DDP -----------------------------------------------------------------------------------------------------


def _ddp_part(rank: int, port: int, root: str, table: pd.DataFrame, splits: Any) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores
    with distributed.process_group("cpu", environ=torchrun_env(rank, port)):
        assert distributed.world_size() == WORLD
        for name, channels_last in (("default", False), ("cl", True)):
            train(make_config(Path(root), model_name=name, channels_last=channels_last, **SGD), table, splits)
            distributed.barrier()


def test_ddp_trains_channels_last_like_the_default_layout(tmp_path: Path) -> None:
    """Two gloo processes: gradients of channels-last weights are averaged like contiguous ones."""
    table, splits = make_data(tmp_path, ExtractionMode.IMAGE, Task.CLASSIFICATION)
    mp.spawn(_ddp_part, args=(free_port(), str(tmp_path), table, splits), nprocs=WORLD, join=True)
    default, channels_last = (tmp_path / "out" / "models" / name for name in ("default", "cl"))
    summaries = [json.loads(MapsLayout(d).summary_json(0).read_text()) for d in (default, channels_last)]
    assert [s["n_processes"] for s in summaries] == [WORLD, WORLD]
    logged = [read_tsv(MapsLayout(d).training_tsv(0))[LOSS_COLUMNS].to_numpy() for d in (default, channels_last)]
    np.testing.assert_allclose(logged[1], logged[0], rtol=1e-5, atol=1e-6)
    expected = weights(default)
    for metric, state in weights(channels_last).items():
        for key, value in state.items():
            torch.testing.assert_close(value, expected[metric][key], rtol=1e-5, atol=1e-6)
