"""Benchmark one CPU training step of ``conv5_fc3`` on t1-linear images (169x208x179), four variants.

A step is what ``epoch.train_epoch`` does per batch: forward, per-sample cross-entropy, backward, Adam step.
Variants: float32 or bf16 autocast (``TrainConfig.amp`` on CPU), contiguous or ``torch.channels_last_3d``
memory format (model and inputs). Each variant gets a fresh model (same seed), ``--warmup`` untimed steps,
then ``--steps`` timed steps; it prints images/s (median step) and the loss after the timed steps, so a
variant that trains differently shows. Data are random tensors already in memory: this measures the model,
not the loader (see ``bench_dataloader.py``).

Run: ``python benchmarks/bench_train_step.py [--batch-size 2] [--warmup 2] [--steps 5] [--threads N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.nn.functional as F

from bids_app.config import Task
from bids_app.models import build_model

SHAPE = (1, 169, 208, 179)


def step_times(batch_size: int, channels_last: bool, bf16: bool, warmup: int, steps: int) -> tuple[list[float], float]:
    """Seconds of each timed step and the last loss."""
    torch.manual_seed(0)
    model = build_model("conv5_fc3", task=Task.CLASSIFICATION, input_shape=SHAPE, n_outputs=2)
    x = torch.rand(batch_size, *SHAPE)
    y = torch.arange(batch_size) % 2
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    times = []
    loss = torch.tensor(float("nan"))
    for step in range(warmup + steps):
        start = time.perf_counter()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times, float(loss.detach())


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
    print(f"{'variant':<32} {'s/step':>8} {'images/s':>9} {'loss':>8}")
    for bf16 in (False, True):
        for channels_last in (False, True):
            name = f"{'bf16 autocast' if bf16 else 'float32'}, {'channels_last_3d' if channels_last else 'contiguous'}"
            times, loss = step_times(args.batch_size, channels_last, bf16, args.warmup, args.steps)
            median = statistics.median(times)
            print(f"{name:<32} {median:>8.2f} {args.batch_size / median:>9.2f} {loss:>8.4f}")


if __name__ == "__main__":
    main()
