"""Data-parallel training across processes: the launcher's environment, the process group and its collectives.

``torchrun --nproc-per-node N -m bids_app BIDS OUT group ...`` (or ``srun`` with one task per GPU) starts N copies
of the group level. ``process_group`` reads who this copy is from torchrun's variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) or from SLURM's (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
``SLURM_LOCALID``, the first host of ``SLURM_STEP_NODELIST``) and joins the group: gloo on CPU, nccl on GPU.

Conventions every caller relies on:

- Rank 0 alone writes (the MAPS, logs of training, predictions); the split and prediction stages run on rank 0
  while the others wait (``on_main``), and an expected failure there is raised on every rank.
- Every rank holds the same model after each optimizer step (DDP all-reduces the gradients) and the same
  decisions (best models, early stopping), because those follow from global quantities only: losses are
  all-reduced sums over samples, validation metrics are computed on the gathered outputs of all ranks.
- One process is the degenerate case: every function here is then the identity or a no-op, so single-process
  training does exactly what it did before distributed training existed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bids_app import errors
from bids_app.errors import BidsAppError, ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_PORT = 29500
# SLURM without MASTER_PORT: a port derived from the job id, so two jobs sharing a node do not collide.
SLURM_PORT_BASE, SLURM_PORT_RANGE = 20000, 20000
# Ranks wait in a collective while rank 0 splits or predicts alone: allow for a long prediction stage.
TIMEOUT = dt.timedelta(hours=2)


@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    """Who this process is in a distributed run.

    Attributes:
        rank: global rank, 0 .. world_size - 1; rank 0 writes the outputs.
        world_size: number of processes (1: not distributed).
        local_rank: rank on this node: the GPU index this process uses.
        master_addr, master_port: where rank 0 listens (SLURM launches); torchrun's own store otherwise.
        launcher: ``torchrun``, ``slurm`` or ``none``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "none"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: ``gpu[07-09,12],cpu3`` → ``gpu07`` (as ``scontrol show hostnames``).

    Raises:
        ConfigError: an empty or malformed list.
    """
    match = re.match(r"^\s*([^,\[\s]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ConfigError(f"Cannot read the SLURM node list {nodelist!r}. Set MASTER_ADDR to the first node's name.")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"Environment variable {name}={value!r} is not an integer. Fix the launcher's setup."
        ) from None


def detect_environment(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """Read the launcher's variables; torchrun's win over SLURM's (torchrun started inside ``srun``).

    SLURM counts only inside an ``srun`` step (``SLURM_STEP_NUM_TASKS``): a batch script itself, or a single-task
    step, is one process. Without ``MASTER_ADDR`` the first node of the step is the master; without
    ``MASTER_PORT`` the port is ``20000 + job id mod 20000``.

    Raises:
        ConfigError: inconsistent values (rank outside 0 .. world size - 1, non-integers).
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        world, rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        found = DistributedEnv(
            rank,
            world,
            local,
            env.get("MASTER_ADDR", "127.0.0.1"),
            _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT,
            "torchrun",
        )
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env and _int(env, "SLURM_STEP_NUM_TASKS") > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        master = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1")
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        else:
            job = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
            port = SLURM_PORT_BASE + job % SLURM_PORT_RANGE
        found = DistributedEnv(
            _int(env, "SLURM_PROCID"),
            _int(env, "SLURM_STEP_NUM_TASKS"),
            _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master,
            port,
            "slurm",
        )
    else:
        return DistributedEnv()
    if found.world_size < 1 or not 0 <= found.rank < found.world_size or found.local_rank < 0:
        raise ConfigError(
            f"Inconsistent {found.launcher} environment: rank {found.rank}, local rank {found.local_rank}, world "
            f"size {found.world_size}. Launch with torchrun or srun, or unset these variables for one process."
        )
    return found


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: str | torch.device, environ: Mapping[str, str] | None = None) -> Iterator[DistributedEnv]:
    """Join the process group the environment describes for the ``with`` block, then leave it.

    A no-op for one process and when a group already exists (the outer block owns it). On CUDA each process
    uses GPU ``local_rank`` (``rank_device``).

    Args:
        device: the training device, or its ``train.device`` name (``auto``, ``cpu``, ``cuda``): decides the
            backend.
        environ: the environment to read (default ``os.environ``).
    """
    env = detect_environment(environ)
    if not env.is_distributed or dist.is_initialized():
        yield env
        return
    if isinstance(device, str):
        from bids_app.runtime import resolve_device

        device = resolve_device(device)
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if (os.environ if environ is None else environ).get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT; env:// connects to it.
        dist.init_process_group(backend, init_method="env://", timeout=TIMEOUT)
    else:
        address = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=TIMEOUT,
        )
    log.info("Rank %d of %d joined the %s process group (%s)", env.rank, env.world_size, backend, env.launcher)
    try:
        yield env
    finally:
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the current group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on the process that writes: rank 0, or the only process."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:<local GPU>`` for CUDA in a group, else ``device`` unchanged."""
    if device.type == "cuda" and world_size() > 1:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def per_rank_batch_size(batch_size: int) -> int:
    """Samples per rank and step so that one optimizer step sees ``batch_size`` samples in all.

    ``train.batch_size`` is the global batch whatever the number of processes; when it does not divide, each
    rank takes the ceiling (the effective batch grows a little) and a warning says so.
    """
    n = world_size()
    if n == 1:
        return batch_size
    share = math.ceil(batch_size / n)
    if share * n != batch_size:
        log.warning(
            "Batch size %d does not divide among %d processes: %d per process, %d per step in all. "
            "Use a multiple of %d to keep the batch exact.",
            batch_size,
            n,
            share,
            share * n,
            n,
        )
    return share


def real_sample_count(n_samples: int, rank: int, world_size: int) -> int:
    """How many of rank ``rank``'s ``ceil(n_samples / world_size)`` sampled items are not padding.

    ``sampling.SeededSampler`` gives rank ``r`` the positions ``r, r + W, ...`` of the epoch's sequence padded to a
    multiple of ``W``; positions at or after ``n_samples`` are the padding, always at the end of a rank's slice.
    """
    return len(range(rank, n_samples, world_size))


def all_reduce_sums(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks, in float64 (identity for one process)."""
    if world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.cpu()]


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Concatenate every rank's ``(n_r, k)`` float64 rows in rank order (``n_r`` may differ; ``k`` may not)."""
    if world_size() == 1:
        return rows
    device = _comm_device()
    local = torch.as_tensor(np.ascontiguousarray(rows, dtype=np.float64), device=device)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([local.shape[0]], dtype=torch.int64, device=device))
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=torch.float64, device=device)
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)]).cpu().numpy()


def broadcast_flag(value: bool) -> bool:
    """Rank 0's ``value`` on every rank: decisions read from the file system are taken once, on rank 0."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def _broadcast_text(text: str) -> str:
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=_comm_device())
    size = torch.tensor([data.numel()], dtype=torch.int64, device=data.device)
    dist.broadcast(size, src=0)
    buffer = data if is_main() else torch.zeros(int(size.item()), dtype=torch.uint8, device=data.device)
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().tolist()).decode()


@contextlib.contextmanager
def main_only() -> Iterator[bool]:
    """``with main_only() as main: if main: ...``: the block runs on rank 0 while the other ranks wait.

    A ``BidsAppError`` raised in the block on rank 0 is raised there and, with the same class (so the same exit
    code) and message, on every other rank, so that no rank waits forever. Any other exception makes the others
    raise a ``BidsAppError`` naming it (rank 0 keeps the traceback). One process: yields True, nothing else.
    """
    if world_size() == 1:
        yield True
        return
    if not is_main():
        yield False
        described = _broadcast_text("")
        if described:
            name, _, message = described.partition("\n")
            error_class = getattr(errors, name, BidsAppError)
            if not (isinstance(error_class, type) and issubclass(error_class, BidsAppError)):
                error_class = BidsAppError
            raise error_class(f"{message} (raised on rank 0)")
        return
    try:
        yield True
    except BaseException as exc:
        if isinstance(exc, BidsAppError):
            _broadcast_text(f"{type(exc).__name__}\n{exc}")
        else:
            _broadcast_text(f"BidsAppError\nRank 0 failed with {type(exc).__name__}: {exc}")
        raise
    _broadcast_text("")


def on_main(function: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """``function(*args, **kwargs)`` on rank 0 inside ``main_only``; its result on rank 0, None elsewhere."""
    with main_only() as main:
        if main:
            return function(*args, **kwargs)
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch norms become ``SyncBatchNorm`` on CUDA in a group (statistics over the global batch); else unchanged.

    gloo has no synchronised batch norm, so on CPU each rank normalises with its own share of the batch.
    """
    if world_size() > 1 and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` in a group (gradients averaged over ranks); ``model`` otherwise."""
    if world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank.

    DDP sends them only at the start of a training forward; after the last step each rank's copy has moved
    with its own batch. Called before validation, so that every rank evaluates (and a checkpoint holds) the
    model rank 0 saves.
    """
    if world_size() == 1:
        return
    for buffer in unwrap(model).buffers():
        dist.broadcast(buffer.data, src=0)


def reseed_rank(seed: int) -> None:
    """Seed python, numpy and torch (dropout) from ``seed``: called per epoch and rank in a group, so a resume
    needs no random state of the other ranks."""
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
