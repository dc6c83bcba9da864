"""Distributed training: launcher environments, sharded sampling, and 2-process gloo runs against one process.

The multi-process tests start 2 CPU processes with ``torch.multiprocessing.spawn`` (one torch thread each) on a
free port. What one process and DDP share exactly, and why the rest differs:

- the sampler gives rank r the positions r, r + 2, ... of the one seeded epoch order, and the per-process batch
  is half the global one, so every optimizer step sees the same samples as the single-process step; gradients
  are averaged over ranks. Without batch norm and with a sample count the global batch divides, the weights
  equal the single-process weights up to float rounding (tolerance 1e-6).
- the logged losses are computed before each step from the same weights, so the per-sample mean equals the
  single-process value (1e-6) even when the sampler pads the last batch (the padding is left out).
- validation gathers every rank's outputs: its metrics equal one process's on the same weights (1e-6).
- the group level with ``small_cnn`` differs more: on CPU (gloo, no synchronised batch norm) each rank
  normalises over its half-batch, so even the first step's losses and gradients differ a little, and the
  trajectories drift apart. Epoch 0's losses stay within 0.01 of the single-process run (measured 5e-4 for
  training, 2e-3 for validation), both epochs within 0.15 (measured 0.07 after 2 epochs).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from bids_app.config import ExtractionMode, Task
from bids_app.data.dataset import TensorDataset
from bids_app.data.sampling import SeededSampler, make_loader
from bids_app.data.tables import index_tensors
from bids_app.errors import ConfigError, UsageError
from bids_app.training import distributed
from bids_app.training.distributed import DistributedEnv, detect_environment, first_host
from bids_app.training.loop import Loop, per_sample_loss, train_epoch, validate
from tests.data.test_data import write_tensors

WORLD = 2
N_PARTICIPANTS = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_env(rank: int, port: int, world: int = WORLD) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


# --- launcher environments -------------------------------------------------------------------------------------


def test_environment_from_torchrun_variables() -> None:
    env = detect_environment({**torchrun_env(3, 29511, world=8), "LOCAL_RANK": "1"})
    assert env == DistributedEnv(3, 8, 1, "127.0.0.1", 29511, "torchrun")
    assert env.is_distributed


def test_environment_from_an_srun_step() -> None:
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "gpu[07-08,11]",
        "SLURM_JOB_ID": "123456",
    }
    env = detect_environment(slurm)
    assert env == DistributedEnv(5, 8, 1, "gpu07", 20000 + 123456 % 20000, "slurm")
    explicit = detect_environment({**slurm, "MASTER_ADDR": "login1", "MASTER_PORT": "29400"})
    assert (explicit.master_addr, explicit.master_port) == ("login1", 29400)
    # torchrun inside srun: torchrun's variables describe the workers, SLURM's the launcher tasks.
    assert detect_environment({**slurm, **torchrun_env(0, 29500)}).launcher == "torchrun"


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"},  # the batch script itself
        {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_ARRAY_TASK_ID": "3"},  # a participant task
    ],
)
def test_single_process_environments(environ: dict[str, str]) -> None:
    env = detect_environment(environ)
    assert env == DistributedEnv() and not env.is_distributed


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2, local rank 2, world size 2"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "[01]"}, "SLURM node list"),
    ],
)
def test_inconsistent_environments_are_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        detect_environment(environ)


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node01", "node01"), ("gpu[07-09,12],cpu3", "gpu07"), ("a-b[3,5]", "a-b3"), ("x1,x2", "x1"), ("n[001]", "n001")],
)
def test_first_host_of_a_slurm_node_list(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_one_process_is_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_reduce_sums([1.5, 2]) == [1.5, 2.0]
    assert distributed.per_rank_batch_size(5) == 5
    with distributed.process_group("cpu", environ={}) as env:
        assert not env.is_distributed
        assert distributed.on_main(lambda a: a + 1, 1) == 2
    model = nn.Linear(2, 2)
    assert distributed.wrap_model(model, torch.device("cpu")) is model
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    assert distributed.per_rank_batch_size(8) == 2 and distributed.per_rank_batch_size(6) == 2


# --- sharded sampling ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_samples", [5, 7, 8])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_sampler_shards_are_disjoint_equal_slices_of_one_epoch(n_samples: int, world: int, weighted: bool) -> None:
    weights = np.linspace(1, 2, n_samples) if weighted else None
    whole = SeededSampler(n_samples, seed=11, shuffle=True, weights=weights)
    assert list(SeededSampler(n_samples, seed=11, shuffle=True, weights=weights, rank=0, world_size=1)) == list(whole)
    for epoch in (0, 4):
        whole.set_epoch(epoch)
        sequence = list(whole)
        shards = []
        for rank in range(world):
            shard = SeededSampler(n_samples, seed=11, shuffle=True, weights=weights, rank=rank, world_size=world)
            shard.set_epoch(epoch)
            shards.append(list(shard))
            assert len(shards[-1]) == len(shard) == -(-n_samples // world)
        real = [distributed.real_sample_count(n_samples, rank, world) for rank in range(world)]
        assert sum(real) == n_samples
        assert all(position // world < real[position % world] for position in range(n_samples))
        interleaved = [shards[position % world][position // world] for position in range(len(shards[0]) * world)]
        # Positions are disjoint and in order; the padding repeats the start of the epoch, like DistributedSampler.
        assert interleaved == (sequence * 2)[: len(interleaved)]
        assert interleaved[:n_samples] == sequence
    epochs = []
    for epoch in (0, 1):
        shard = SeededSampler(n_samples, seed=11, shuffle=True, rank=1, world_size=world)
        shard.set_epoch(epoch)
        epochs.append(list(shard))
    assert epochs[0] != epochs[1]


def test_make_loader_passes_the_shard(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path, 7)[0]
    loader = make_loader(dataset, batch_size=2, seed=3, shuffle=True, rank=1, world_size=2)
    assert len(loader.sampler) == 4 and len(loader) == 2  # type: ignore[arg-type]
    indices = [int(i) for _, _, batch in loader for i in batch]
    full = [int(i) for _, _, batch in make_loader(dataset, batch_size=2, seed=3, shuffle=True) for i in batch]
    assert indices == (full + full)[1:8:2]


# --- 2 gloo processes: one spawn runs every scenario, the tests below read what it left --------------------------


def _dataset(root: Path, n_train: int, n_val: int = 5) -> tuple[TensorDataset, TensorDataset]:
    ids = [f"{i:02d}" for i in range(n_train + n_val)]
    out = root / f"out{n_train}"
    if not out.exists():
        offsets = {p: 0.5 * (i % 2) for i, p in enumerate(ids)}
        write_tensors(out, ExtractionMode.IMAGE, [(p, None) for p in ids], offsets=offsets)
    table = index_tensors(out, ExtractionMode.IMAGE)
    table["label"] = ["AD" if i % 2 else "CN" for i in range(len(table))]
    datasets = [
        TensorDataset(rows, ExtractionMode.IMAGE, Task.CLASSIFICATION, label_encoding={"AD": 0, "CN": 1})
        for rows in (table.iloc[:n_train], table.iloc[n_train:])
    ]
    return datasets[0], datasets[1]


def _loop(model: nn.Module) -> Loop:
    return Loop(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        scheduler=None,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loss_fn=per_sample_loss(Task.CLASSIFICATION, None),
        device=torch.device("cpu"),
        amp_dtype=None,
    )


def _one_epoch(root: Path, n_train: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """One epoch of SGD on a linear classifier (global batch 4), then validation; weights and scores."""
    train_ds, val_ds = _dataset(root, n_train)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(216, 2))
    loop = _loop(distributed.wrap_model(model, torch.device("cpu")))
    shard = {"rank": rank, "world_size": world, "batch_size": 4 // world}
    train_loss = train_epoch(loop, make_loader(train_ds, seed=9, shuffle=True, **shard))
    scores = validate(loop, make_loader(val_ds, seed=9, **shard), Task.CLASSIFICATION)
    weights = {k: v.tolist() for k, v in model.state_dict().items()}
    return {"train_loss": train_loss, "scores": scores, "weights": weights}


def _epoch_part(rank: int, port: int, root: Path) -> None:
    with distributed.process_group("cpu", environ=torchrun_env(rank, port)) as env:
        assert env.launcher == "torchrun" and distributed.world_size() == WORLD
        results = {str(n): _one_epoch(root, n, rank, WORLD) for n in (7, 8)}
    (root / f"epoch-rank{rank}.json").write_text(json.dumps(results))


def _error_part(rank: int, port: int, root: Path) -> None:
    def fail() -> None:
        raise UsageError("Model folder exists. Pass --resume.")

    with distributed.process_group("cpu", environ=torchrun_env(rank, port)):
        assert distributed.on_main(lambda: distributed.rank() + 41) == (41 if rank == 0 else None)
        try:
            distributed.on_main(fail)
        except UsageError as exc:
            (root / f"error-rank{rank}.txt").write_text(f"{type(exc).__name__}|{exc.exit_code}|{exc}")
        distributed.barrier()


RESUME_OPTIONS: dict[str, Any] = {
    "epochs": 4,
    "dropout": 0.5,
    "augmentations": ("flip", "gaussian_noise"),
    "class_weighted_sampling": True,
    "lr_plateau_patience": 1,
    "selection_metrics": ("loss", "balanced_accuracy"),
}


def _resume_part(rank: int, port: int, root: Path, table: pd.DataFrame, splits: Any) -> None:
    """Through SLURM's variables: an uninterrupted run, and one killed after 2 epochs then resumed."""
    import dataclasses

    from bids_app.maps.folder import MapsLayout
    from bids_app.training import loop as epoch
    from tests.training.test_train import make_config, maps_dir_of, train

    slurm = {"SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": str(WORLD), "SLURM_LOCALID": str(rank),
             "SLURM_STEP_NODELIST": "localhost", "MASTER_PORT": str(port)}  # fmt: skip
    with distributed.process_group("cpu", environ=slurm) as env:
        assert env.launcher == "slurm" and env.master_addr == "localhost"
        train(make_config(root, model_name="whole", **RESUME_OPTIONS), table, splits)
        cfg = make_config(root, model_name="resumed", **RESUME_OPTIONS)
        original, calls = epoch.train_epoch, []

        def die_at_third_epoch(*args: Any, **kwargs: Any) -> float:  # every rank, like a cancelled job
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        epoch.train_epoch = die_at_third_epoch  # type: ignore[assignment]
        with contextlib.suppress(KeyboardInterrupt):
            train(cfg, table, splits)
        epoch.train_epoch = original  # type: ignore[assignment]
        distributed.barrier()  # rank 0 may still be writing the second epoch's checkpoint
        layout = MapsLayout(maps_dir_of(cfg))
        assert layout.checkpoint_path(0).is_file() and len(pd.read_csv(layout.training_tsv(0), sep="\t")) == 2
        train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True)), table, splits)


WRITE_EVENTS = {"open", "os.rename", "os.remove", "os.mkdir", "shutil.rmtree", "os.rmdir"}


def _cli_part(rank: int, port: int, root: Path, argv: list[str]) -> None:
    """``bids_app ... group`` as torchrun starts it, recording every write of this process under the MAPS."""
    from bids_app.cli import main as cli

    os.environ.update(torchrun_env(rank, port))
    models = str(Path(argv[1]) / "models")
    writes: list[list[str]] = []

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if event not in WRITE_EVENTS:
            return
        if event == "open":
            mode, flags = args[1], args[2]
            writing = (
                any(c in mode for c in "wax+")
                if isinstance(mode, str)
                else bool(isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            )
            if not writing:
                return
        path = str(args[1] if event == "os.rename" else args[0])
        if path.startswith(models):
            writes.append([event, path])

    sys.addaudithook(audit)
    code = cli.main(argv)
    (root / f"cli-rank{rank}.json").write_text(json.dumps({"exit_code": code, "writes": writes}))


def _scenario_worker(rank: int, ports: list[int], root: str, table: pd.DataFrame, splits: Any, argv: list[str]) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores
    base = Path(root)
    _epoch_part(rank, ports[0], base / "epoch")
    _error_part(rank, ports[1], base / "error")
    _resume_part(rank, ports[2], base / "resume", table, splits)
    _cli_part(rank, ports[3], base / "cli", argv)


def group_argv(bids: Path, out: Path) -> list[str]:
    return [str(bids), str(out), "group", "--label", "diagnosis", "--architecture", "small_cnn", "--mode", "image",
            "--epochs", "2", "--batch-size", "4", "--learning-rate", "0.01", "--dropout", "0", "--n-splits", "1",
            "--validation-size", "0.25", "--test-size", "0.25", "--model-name", "cnn", "--seed", "5",
            "--device", "cpu", "--selection-metrics", "loss", "balanced_accuracy"]  # fmt: skip


def write_cohort(root: Path) -> tuple[Path, Path]:
    """A BIDS folder with labels only, and image tensors of 16 participants (no participant level needed)."""
    bids = root / "bids"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "ddp", "BIDSVersion": "1.10.0"}))
    ids = [f"{i:02d}" for i in range(N_PARTICIPANTS)]
    pd.DataFrame(
        {
            "participant_id": [f"sub-{p}" for p in ids],
            "diagnosis": ["AD" if i % 2 else "CN" for i in range(N_PARTICIPANTS)],
            "age": [70 + (i * 7) % 11 for i in range(N_PARTICIPANTS)],
            "sex": ["F" if (i // 2) % 2 else "M" for i in range(N_PARTICIPANTS)],
        }
    ).to_csv(bids / "participants.tsv", sep="\t", index=False)
    offsets = {p: 0.6 * (i % 2) for i, p in enumerate(ids)}
    write_tensors(root / "tensors", ExtractionMode.IMAGE, [(p, None) for p in ids], offsets=offsets)
    return bids, root / "tensors"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every input written first (the ranks only read it), then one spawn of 2 processes runs the scenarios."""
    import shutil

    from tests.training.test_train import make_data

    root = tmp_path_factory.mktemp("ddp")
    for n_train in (7, 8):
        _dataset(root / "epoch", n_train)
    (root / "error").mkdir()
    table, splits = make_data(root / "resume", ExtractionMode.IMAGE, Task.CLASSIFICATION)
    bids, tensors = write_cohort(root / "cli")
    for name in ("single", "ddp"):
        shutil.copytree(tensors, root / "cli" / name)
    ports = [free_port() for _ in range(4)]
    mp.spawn(_scenario_worker, args=(ports, str(root), table, splits, group_argv(bids, root / "cli" / "ddp")),
             nprocs=WORLD, join=True)  # fmt: skip
    return root


def test_ddp_epoch_matches_one_process(ddp_run: Path) -> None:
    root = ddp_run / "epoch"
    ranks = [json.loads((root / f"epoch-rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0] == ranks[1]  # every rank holds the same weights and scores
    for n_train in (7, 8):
        single, shared = _one_epoch(root, n_train), ranks[0][str(n_train)]
        # The losses of each step come from the same weights in both runs; the padding sample is left out.
        assert shared["train_loss"] == pytest.approx(single["train_loss"], rel=1e-6)
        if n_train == 8:  # no padding: the same steps as one process
            for key, value in single["weights"].items():
                np.testing.assert_allclose(shared["weights"][key], value, atol=1e-6)
            assert shared["scores"] == pytest.approx(single["scores"], rel=1e-6, nan_ok=True)
        else:  # the padded duplicate moves the last step a little
            assert not np.allclose(shared["weights"]["1.weight"], single["weights"]["1.weight"], atol=1e-6)
    # Validation gathers the shards: the metrics of the whole set for the weights the ranks hold.
    model = nn.Sequential(nn.Flatten(), nn.Linear(216, 2))
    model.load_state_dict({k: torch.tensor(v) for k, v in ranks[0]["7"]["weights"].items()})
    scores = validate(_loop(model), make_loader(_dataset(root, 7)[1], batch_size=3, seed=0), Task.CLASSIFICATION)
    assert scores == pytest.approx(ranks[0]["7"]["scores"], rel=1e-6, nan_ok=True)
    assert 0 < scores["accuracy"] < 1 or scores["loss"] > 0


def test_an_error_on_rank_0_is_raised_on_every_rank(ddp_run: Path) -> None:
    messages = [(ddp_run / "error" / f"error-rank{r}.txt").read_text().split("|") for r in range(WORLD)]
    assert messages[0] == ["UsageError", "64", "Model folder exists. Pass --resume."]
    assert messages[1] == ["UsageError", "64", "Model folder exists. Pass --resume. (raised on rank 0)"]


def test_ddp_resume_is_bitwise_exact(ddp_run: Path) -> None:
    from bids_app.maps.folder import MapsLayout

    whole, resumed = (MapsLayout(ddp_run / "resume" / "out" / "models" / n) for n in ("whole", "resumed"))
    history = pd.read_csv(whole.training_tsv(0), sep="\t")
    assert history["epoch"].tolist() == [0, 1, 2, 3]
    assert resumed.training_tsv(0).read_bytes() == whole.training_tsv(0).read_bytes()
    for metric in RESUME_OPTIONS["selection_metrics"]:
        a, b = (load_file(layout.model_path(0, metric)) for layout in (whole, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), metric
    summaries = [json.loads(layout.summary_json(0).read_text()) for layout in (whole, resumed)]
    assert summaries[0] == summaries[1] and summaries[0]["n_processes"] == WORLD
    assert not resumed.tmp_dir(0).exists()


def _maps_files(maps_dir: Path) -> list[str]:
    names = (str(p.relative_to(maps_dir)) for p in maps_dir.rglob("*") if p.is_file())
    return sorted(n for n in names if "events.out.tfevents" not in n)  # the event file name holds host and pid


def test_ddp_group_level_writes_one_complete_maps_on_rank_0(ddp_run: Path) -> None:
    from bids_app.cli import main as cli
    from bids_app.maps import folder as maps
    from bids_app.maps.folder import MapsLayout

    root = ddp_run / "cli"
    assert cli.main(group_argv(root / "bids", root / "single")) == 0
    reports = [json.loads((root / f"cli-rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["exit_code"] for r in reports] == [0, 0]
    assert reports[1]["writes"] == []  # rank 1 never wrote, renamed or removed anything in the model folder
    written = [path for event, path in reports[0]["writes"] if event == "os.rename"]
    assert any(p.endswith("maps.json") for p in written) and any(p.endswith("model.safetensors") for p in written)
    ddp, single = (root / n / "models" / "cnn" for n in ("ddp", "single"))
    assert _maps_files(ddp) == _maps_files(single)
    assert len(list((ddp / "split-0/training_logs/tensorboard").glob("events.out.tfevents.*"))) == 1
    assert not MapsLayout(ddp).tmp_dir(0).exists()
    maps.validate_maps(ddp)
    for name in ("splits.json", "train+validation.tsv", "split-0/train.tsv", "test/data.tsv"):
        assert (ddp / "groups" / name).read_bytes() == (single / "groups" / name).read_bytes(), name

    layout = MapsLayout(ddp)
    logs = {n: pd.read_csv(MapsLayout(m).training_tsv(0), sep="\t") for n, m in (("ddp", ddp), ("single", single))}
    assert logs["ddp"]["epoch"].tolist() == [0, 1] == logs["single"]["epoch"].tolist()
    for column in ("train_loss", "validation_loss"):  # per-rank batch norm on CPU: close, not equal
        # Epoch 0 starts from the same weights and steps over the same samples: only the batch-norm statistics
        # differ (measured 5e-4 and 2e-3). Then the weights drift apart (measured 0.07 after 2 epochs).
        assert abs(logs["ddp"][column][0] - logs["single"][column][0]) < 0.01
        np.testing.assert_allclose(logs["ddp"][column], logs["single"][column], atol=0.15)
    summary = json.loads(layout.summary_json(0).read_text())
    assert summary["n_processes"] == WORLD and summary["batch_size_per_process"] == 2
    single_summary = json.loads(MapsLayout(single).summary_json(0).read_text())
    assert summary["n_validation_samples"] == single_summary["n_validation_samples"]

    # The logged validation loss is that of the whole validation set: re-evaluate the saved model in one process.
    selection = json.loads(layout.selection_json(0, "loss").read_text())
    validation = pd.read_csv(ddp / "groups/split-0/validation.tsv", sep="\t", dtype=str, keep_default_na=False)
    keys = ["participant_id", "session_id"]
    table = index_tensors(root / "ddp", ExtractionMode.IMAGE).merge(validation[[*keys, "label"]], on=keys)
    dataset = TensorDataset(table, ExtractionMode.IMAGE, Task.CLASSIFICATION, label_encoding={"AD": 0, "CN": 1})
    scores = validate(
        _loop(maps.load_model(ddp, 0, "loss")), make_loader(dataset, batch_size=8, seed=0), Task.CLASSIFICATION
    )
    assert scores["loss"] == pytest.approx(selection["value"], rel=1e-5)
    assert len(dataset) == summary["n_validation_samples"]

    for name in ("ddp", "single"):
        predictions = pd.read_csv(
            root / name / "models/cnn/split-0/best-loss/test/test_image_level_prediction.tsv", sep="\t"
        )
        assert len(predictions) == N_PARTICIPANTS // 4
