"""Benchmark one CPU training step of ``conv5_fc3`` on t1-linear images (169x208x179), two memory layouts.

A step is one batch of ``training.loop.train_epoch``, the function training runs: the batch put on the device in
the loop's memory format, forward, per-sample cross-entropy, backward, Adam step. The loop is built from a
``TrainConfig`` and a ``RuntimeConfig`` as ``training.stage.train_split`` builds it, so the variants are the
runtime option itself: ``runtime.channels_last`` off and on (model and batches in ``torch.channels_last_3d``).
There is no bfloat16 variant: ``runtime.amp`` is refused on a CPU (``check_cpu_bf16_conv.py`` shows why).
Each variant gets a fresh model (same seed), one untimed epoch of ``--warmup`` batches, then a timed epoch of
``--steps`` batches; it prints images/s (median step) and the mean loss of the timed epoch, so a variant that
trains differently shows.
Data are one random batch already in memory, handed out ``--steps`` times: this measures the model, not the
loader (see ``bench_dataloader.py``).

Run: ``python benchmarks/bench_train_step.py [--batch-size 2] [--warmup 2] [--steps 5] [--threads N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Iterator

import torch

from bids_app.config import RuntimeConfig, Task, TrainConfig
from bids_app.models import build_model
from bids_app.runtime import autocast_dtype, batch_memory_format, set_memory_format
from bids_app.training.loop import Loop, make_optimizer, per_sample_loss, train_epoch

SHAPE = (1, 169, 208, 179)
DEVICE = torch.device("cpu")


class TimedBatches:
    """``n_batches`` times the batch ``(x, y)``, iterated like a DataLoader; notes when each step starts and ends.

    ``train_epoch`` asks for the next batch once it has finished with the previous one (optimizer step
    included), so the time between two hand-outs is one step.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n_batches: int) -> None:
        self.x, self.y, self.n_batches = x, y, n_batches
        self.dataset = range(n_batches * len(x))  # train_epoch divides by the number of samples
        self.times: list[float] = []

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        index = torch.arange(len(self.x))
        for _ in range(self.n_batches):
            self.times.append(time.perf_counter())
            yield self.x, self.y, index
        self.times.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [end - start for start, end in zip(self.times, self.times[1:], strict=False)]


def step_times(
    tc: TrainConfig, rt: RuntimeConfig, batch_size: int, warmup: int, steps: int
) -> tuple[list[float], float]:
    """Seconds of each timed step and the timed epoch's mean per-sample loss, for the options of ``tc`` and ``rt``."""
    torch.manual_seed(0)
    model = build_model(tc.architecture, task=Task.CLASSIFICATION, input_shape=SHAPE, n_outputs=2, dropout=tc.dropout)
    memory_format = batch_memory_format(len(SHAPE) + 1, rt.channels_last)
    set_memory_format(model.to(DEVICE), memory_format)
    loop = Loop(
        model=model,
        optimizer=make_optimizer(tc.optimizer, list(model.parameters()), tc.learning_rate, tc.weight_decay),
        scheduler=None,
        scaler=torch.amp.GradScaler(DEVICE.type, enabled=False),  # loss scaling is for float16 on CUDA
        loss_fn=per_sample_loss(Task.CLASSIFICATION, tc.loss),
        device=DEVICE,
        amp_dtype=autocast_dtype(DEVICE, rt.amp),
        memory_format=memory_format,
    )
    x = torch.rand(batch_size, *SHAPE)
    y = torch.arange(batch_size) % 2
    train_epoch(loop, TimedBatches(x, y, warmup))  # type: ignore[arg-type]
    timed = TimedBatches(x, y, steps)
    loss = train_epoch(loop, timed)  # type: ignore[arg-type]
    return timed.step_seconds(), loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f} (1 min)")
    print(f"conv5_fc3, batch {args.batch_size} x {SHAPE}, {args.warmup} warm-up + {args.steps} timed steps")
    print(f"{'variant':<40} {'s/step':>8} {'images/s':>9} {'loss':>8}")
    for channels_last in (False, True):
        tc = TrainConfig(architecture="conv5_fc3")
        rt = RuntimeConfig(channels_last=channels_last, device="cpu")
        times, loss = step_times(tc, rt, args.batch_size, args.warmup, args.steps)
        median = statistics.median(times)
        name = f"float32, channels_last={channels_last}"
        print(f"{name:<40} {median:>8.2f} {args.batch_size / median:>9.2f} {loss:>8.4f}", flush=True)


if __name__ == "__main__":
    main()
