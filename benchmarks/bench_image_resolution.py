"""Benchmark image-mode training at 1, 2 and 3 mm: images/s of one training step per architecture and grid.

The input is the t1-linear crop, 169x208x179 at 1 mm, and its coarse grids from ``--image-voxel-size``
(``extraction.coarse_grid``: 85x104x90 at 2 mm, 57x70x60 at 3 mm). Each row trains one architecture on one grid
with the group level's defaults: batch size ``TrainConfig().batch_size``, Adam with the default learning rate, the
default memory layout ``RuntimeConfig().channels_last``; a step is one batch of ``training.loop.train_epoch``
(batch to device, forward, per-sample cross-entropy, backward, optimizer step). Rows: the default image
architecture (``TrainConfig().architecture``) at 1, 2 and 3 mm, and the coarse entries ``conv4_fc3_2mm`` at 2 mm
and ``conv3_fc3_3mm`` at 3 mm. Each gets a fresh model (seed 0), ``--warmup`` untimed steps, then ``--steps``
timed ones; the table gives the median step, images/s, the speed-up over the first row, the extraction cost of
the coarse grid (Gaussian prefilter + trilinear sampling of one 1 mm image, ``extraction.resample_to_voxel_size``)
and the machine's 1-minute load average when the row ended (figures from a loaded machine are provisional).
Data are one random batch in memory: this measures the model, not the loader (``bench_dataloader.py``).

On a CUDA device (``--device cuda``) each row runs with and without AMP (float16 autocast, loss scaling), and
the GPU utilisation is sampled with ``nvidia-smi`` during the timed steps when it is installed.

Run: ``python benchmarks/bench_image_resolution.py [--threads 2] [--warmup 1] [--steps 3] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import torch

from bids_app.config import RuntimeConfig, Task, TrainConfig
from bids_app.extraction import coarse_grid, resample_to_voxel_size
from bids_app.models import build_model
from bids_app.runtime import autocast_dtype, batch_memory_format, set_memory_format
from bids_app.training.loop import Loop, make_optimizer, per_sample_loss, train_epoch

CROP_1MM = (169, 208, 179)
AFFINE_1MM = np.diag([1.0, 1.0, 1.0, 1.0])


class TimedBatches:
    """The batch ``(x, y)`` handed out ``n_batches`` times like a DataLoader; the time between hand-outs is a step."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n_batches: int, device: torch.device) -> None:
        self.x, self.y, self.n_batches, self.device = x, y, n_batches, device
        self.dataset = range(n_batches * len(x))  # train_epoch divides by the number of samples
        self.times: list[float] = []

    def __len__(self) -> int:
        return self.n_batches

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        index = torch.arange(len(self.x))
        for _ in range(self.n_batches):
            self.times.append(self._now())
            yield self.x, self.y, index
        self.times.append(self._now())

    def step_seconds(self) -> list[float]:
        return [end - start for start, end in zip(self.times, self.times[1:], strict=False)]


def grid_shape(voxel_mm: float) -> tuple[int, int, int]:
    """The image shape at ``voxel_mm`` (the 1 mm crop itself at 1)."""
    return coarse_grid(CROP_1MM, AFFINE_1MM, voxel_mm)[0]


def resample_seconds(voxel_mm: float, repeats: int = 3) -> float:
    """Median seconds to resample one 1 mm crop to ``voxel_mm`` (0 at 1 mm: nothing to do)."""
    if voxel_mm == 1:
        return 0.0
    volume = np.random.default_rng(0).standard_normal(CROP_1MM, dtype=np.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        resample_to_voxel_size(volume, AFFINE_1MM, voxel_mm)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gpu_utilisation() -> subprocess.Popen[str] | None:
    """``nvidia-smi`` sampling utilisation every 100 ms, or None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    command = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def mean_utilisation(sampler: subprocess.Popen[str] | None) -> str:
    if sampler is None:
        return "n/a"
    sampler.terminate()
    output, _ = sampler.communicate()
    values = [float(v) for v in output.split() if v.replace(".", "", 1).isdigit()]
    return f"{statistics.mean(values):.0f} %" if values else "n/a"


def time_steps(
    architecture: str, shape: tuple[int, int, int], device: torch.device, amp: bool, warmup: int, steps: int
) -> tuple[list[float], int, str]:
    """Seconds of each timed step, the model's parameter count and the GPU utilisation (``n/a`` on a CPU)."""
    tc, rt = TrainConfig(architecture=architecture), RuntimeConfig(amp=amp)
    input_shape = (1, *shape)
    torch.manual_seed(0)
    model = build_model(architecture, task=Task.CLASSIFICATION, input_shape=input_shape, n_outputs=2,
                        dropout=tc.dropout)  # fmt: skip
    memory_format = batch_memory_format(len(input_shape) + 1, rt.channels_last)
    set_memory_format(model.to(device), memory_format)
    loop = Loop(
        model=model,
        optimizer=make_optimizer(tc.optimizer, list(model.parameters()), tc.learning_rate, tc.weight_decay),
        scheduler=None,
        scaler=torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda"),
        loss_fn=per_sample_loss(Task.CLASSIFICATION, tc.loss),
        device=device,
        amp_dtype=autocast_dtype(device, amp),
        memory_format=memory_format,
    )
    x = torch.randn(tc.batch_size, *input_shape, device=device)
    y = (torch.arange(tc.batch_size) % 2).to(device)
    train_epoch(loop, TimedBatches(x, y, warmup, device))  # type: ignore[arg-type]
    timed = TimedBatches(x, y, steps, device)
    sampler = gpu_utilisation() if device.type == "cuda" else None
    train_epoch(loop, timed)  # type: ignore[arg-type]
    utilisation = mean_utilisation(sampler)
    return timed.step_seconds(), sum(p.numel() for p in model.parameters()), utilisation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row (default 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default cpu)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    default_arch = TrainConfig().architecture
    rows = [(default_arch, 1.0), (default_arch, 2.0), (default_arch, 3.0), ("conv4_fc3_2mm", 2.0),
            ("conv3_fc3_3mm", 3.0)]  # fmt: skip
    amp_settings = (False, True) if device.type == "cuda" else (False,)
    print(f"torch {torch.__version__}, device {device}, {args.threads} CPU threads, "
          f"load average {os.getloadavg()[0]:.2f} (1 min)")  # fmt: skip
    print(f"batch {TrainConfig().batch_size}, channels_last={RuntimeConfig().channels_last} (the defaults), "
          f"{args.warmup} warm-up + {args.steps} timed steps per row; crop {CROP_1MM} at 1 mm")  # fmt: skip
    header = (f"{'architecture':<15} {'mm':>3} {'input':>13} {'params':>7} {'amp':>5} {'s/step':>7} {'images/s':>9} "
              f"{'x 1 mm':>7} {'resample s/img':>15} {'GPU util':>9} {'load':>5}")  # fmt: skip
    print(header)
    reference: float | None = None
    for architecture, voxel_mm in rows:
        shape = grid_shape(voxel_mm)
        resample = resample_seconds(voxel_mm)
        for amp in amp_settings:
            times, n_parameters, utilisation = time_steps(architecture, shape, device, amp, args.warmup, args.steps)
            step = statistics.median(times)
            rate = TrainConfig().batch_size / step
            reference = reference or rate
            size = "x".join(str(n) for n in shape)
            print(f"{architecture:<15} {voxel_mm:>3g} {size:>13} {n_parameters / 1e6:>6.2f}M {amp!s:>5} "
                  f"{step:>7.2f} {rate:>9.2f} {rate / reference:>7.1f} {resample:>15.2f} {utilisation:>9} "
                  f"{os.getloadavg()[0]:>5.1f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
