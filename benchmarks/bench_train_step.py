"""Benchmark one CPU training step of ``conv5_fc3`` on t1-linear images (169x208x179) against the machine's limit.

A step is one batch of ``training.loop.train_epoch``, the function training runs: the batch put on the device in
the loop's memory format, forward, per-sample cross-entropy, backward, Adam step. The loop is built from a
``TrainConfig`` and a ``RuntimeConfig`` as ``training.stage.train_split`` builds it, so the layout variants are
the runtime option itself: ``runtime.channels_last`` off and on (model and batches in ``torch.channels_last_3d``,
or ``torch.channels_last`` for 2D shapes).

The limit: the float32 matrix-multiply peak of this machine on the same number of threads (best of several
large square ``torch.mm``, in GFLOP/s) divided by the model's floating-point operations per image (forward and
backward, counted by ``torch.utils.flop_counter.FlopCounterMode``). A convolution cannot beat the matrix
multiply of the same library by much, so ``images/s / limit`` says how much of the machine a variant uses.

Variants, each in a fresh process (OpenMP reads its environment once, and a compiled graph or a large
allocation must not carry over to the next variant): the two layouts; channels-last under ``torch.compile``
(inductor; its warm-up, i.e. the compilation, is printed apart); channels-last with the OpenMP threads pinned
to cores (``OMP_PROC_BIND=close OMP_PLACES=cores``; torch's CPU wheel uses GNU OpenMP, so Intel's
``KMP_AFFINITY`` does nothing); the default layout with oneDNN switched off (``torch.backends.mkldnn``), which is
torch's own convolution code. There is no bfloat16 variant: ``runtime.amp`` is refused on a CPU
(``check_cpu_bf16_conv.py`` shows why), and every variant here computes in float32. Each variant gets a fresh
model (same seed), an untimed warm-up of ``--warmup`` batches (the first alone, in an epoch of its own), then a
timed epoch of ``--steps`` batches. It prints the warm-up's seconds (compilation included), images/s (median
step), the fraction of the limit, and two losses: the first step's, computed by every variant from the same
weights, batch and dropout mask, with its relative difference to the first variant's (float rounding only:
~1e-7 for an exact variant), and the mean of the timed epoch, after Adam steps that amplify rounding
differences. Inductor draws dropout masks from its own generator, so a compiled step's losses differ at the
first step whatever its arithmetic; the last column compares arithmetic alone: each variant's logits of the
batch at the initial weights, in training mode (batch-norm on the batch's statistics) with dropout off, against
the same logits computed in float64 (largest difference over the largest float64 logit).

Data are one random batch already in memory, handed out ``--steps`` times: this measures the model, not the
loader (see ``bench_dataloader.py``).

Run: ``python benchmarks/bench_train_step.py [--batch-size 2] [--warmup 2] [--steps 5] [--threads N]
[--architecture conv5_fc3] [--shape 1 169 208 179] [--variants NAME ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bids_app.config import RuntimeConfig, Task, TrainConfig
from bids_app.models import build_model
from bids_app.runtime import autocast_dtype, batch_memory_format, set_memory_format
from bids_app.training.loop import Loop, make_optimizer, per_sample_loss, train_epoch

SHAPE = (1, 169, 208, 179)
DEVICE = torch.device("cpu")
MATMUL_SIDE = 4096  # 137 GFLOP per product: long enough to reach the peak, short enough to repeat
MATMUL_REPEATS = 5


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run the same float32 step: the layout option, compilation, environment, oneDNN."""

    channels_last: bool
    compile: bool = False
    env: tuple[tuple[str, str], ...] = ()
    mkldnn: bool = True


VARIANTS = {
    "contiguous": Variant(channels_last=False),
    "channels_last": Variant(channels_last=True),
    "channels_last+compile": Variant(channels_last=True, compile=True),
    "channels_last+omp_bind": Variant(channels_last=True, env=(("OMP_PROC_BIND", "close"), ("OMP_PLACES", "cores"))),
    "contiguous+no_onednn": Variant(channels_last=False, mkldnn=False),
}


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


def matmul_peak_gflops(side: int = MATMUL_SIDE, repeats: int = MATMUL_REPEATS) -> float:
    """The best float32 ``side`` x ``side`` matrix product rate, in GFLOP/s (2 side^3 operations), after one untimed."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.rand(side, side, generator=generator) for _ in range(2))
    out = torch.empty(side, side)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * side**3 / best / 1e9


def flops_per_image(architecture: str, shape: tuple[int, ...]) -> float:
    """Floating-point operations of one image's forward and backward pass (a multiply-add counts 2).

    Counted on the meta device (shapes only, nothing computed) for a batch of 2, halved: batch-norm and
    dropout in training mode see a real batch, and every counted operation scales with the batch.
    """
    torch.manual_seed(0)
    model = build_model(architecture, task=Task.CLASSIFICATION, input_shape=shape, n_outputs=2).to("meta")
    model.train()
    x = torch.zeros(2, *shape, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def batch(shape: tuple[int, ...], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one batch every variant trains on: uniform random images (seed 1) and alternating labels."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(batch_size, *shape, generator=generator), torch.arange(batch_size) % 2


@contextlib.contextmanager
def without_dropout(model: nn.Module) -> Iterator[None]:
    """``model`` in training mode with its dropout off, its state (batch-norm running statistics) put back after.

    Training mode: batch normalisation uses the statistics of the batch, as in a training step (their float32
    sums over a whole image are where a layout's rounding shows most); no dropout: the mask would hide it.
    """
    state = copy.deepcopy(model.state_dict())
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    rates = [m.p for m in dropouts]
    model.train()
    try:
        for module in dropouts:
            module.p = 0.0
        with torch.no_grad():
            yield
    finally:
        for module, rate in zip(dropouts, rates, strict=True):
            module.p = rate
        model.load_state_dict(state)


def float64_logits(architecture: str, shape: tuple[int, ...], batch_size: int) -> torch.Tensor:
    """The logits of the variants' initial model on their batch (``without_dropout``), computed in float64.

    The reference for the float32 variants: a layout or a compiled graph changes the order of the sums, so each
    variant's logits differ from these by float32 rounding; an exact variant differs by no more than the default.
    """
    torch.manual_seed(0)
    model = build_model(architecture, task=Task.CLASSIFICATION, input_shape=shape, n_outputs=2).double()
    with without_dropout(model):
        return model(batch(shape, batch_size)[0].double())


def run_variant(
    variant: Variant, architecture: str, shape: tuple[int, ...], batch_size: int, warmup: int, steps: int
) -> dict[str, object]:
    """Seconds of the warm-up epoch and of each timed step, and the timed epoch's mean per-sample loss."""
    torch.backends.mkldnn.enabled = variant.mkldnn  # type: ignore[assignment]  # a module property
    tc = TrainConfig(architecture=architecture)
    rt = RuntimeConfig(channels_last=variant.channels_last, device="cpu")
    torch.manual_seed(0)
    model = build_model(tc.architecture, task=Task.CLASSIFICATION, input_shape=shape, n_outputs=2, dropout=tc.dropout)
    memory_format = batch_memory_format(len(shape) + 1, rt.channels_last)
    set_memory_format(model.to(DEVICE), memory_format)
    optimizer = make_optimizer(tc.optimizer, list(model.parameters()), tc.learning_rate, tc.weight_decay)
    loop = Loop(
        model=torch.compile(model) if variant.compile else model,  # type: ignore[arg-type]
        optimizer=optimizer,
        scheduler=None,
        scaler=torch.amp.GradScaler(DEVICE.type, enabled=False),  # loss scaling is for float16 on CUDA
        loss_fn=per_sample_loss(Task.CLASSIFICATION, tc.loss),
        device=DEVICE,
        amp_dtype=autocast_dtype(DEVICE, rt.amp),
        memory_format=memory_format,
    )
    x, y = batch(shape, batch_size)
    with without_dropout(model):  # the initial weights' training-mode logits (see float64_logits)
        logits = loop.model(x.contiguous(memory_format=memory_format)).tolist()
    start = time.perf_counter()
    first_loss = train_epoch(loop, TimedBatches(x, y, 1))  # type: ignore[arg-type]
    if warmup > 1:
        train_epoch(loop, TimedBatches(x, y, warmup - 1))  # type: ignore[arg-type]
    warmup_seconds = time.perf_counter() - start
    timed = TimedBatches(x, y, steps)
    loss = train_epoch(loop, timed)  # type: ignore[arg-type]
    return {
        "warmup_seconds": warmup_seconds,
        "step_seconds": timed.step_seconds(),
        "loss": loss,
        "first": first_loss,
        "logits": logits,
    }


def logit_error(logits: object, exact: torch.Tensor) -> float:
    """The largest difference between ``logits`` and the float64 ones, relative to the largest float64 logit."""
    difference = torch.tensor(logits, dtype=torch.float64) - exact
    return float(difference.abs().max() / exact.abs().max())


def child(args: argparse.Namespace) -> None:
    """Run the one variant ``args.child`` and print its result as one JSON line."""
    torch.set_num_threads(args.threads)
    result = run_variant(
        VARIANTS[args.child], args.architecture, tuple(args.shape), args.batch_size, args.warmup, args.steps
    )
    print(json.dumps(result), flush=True)


def spawn(name: str, args: argparse.Namespace) -> dict[str, object] | str:
    """The result of variant ``name`` run in a fresh interpreter, or the last line of its error."""
    env = {**os.environ, **dict(VARIANTS[name].env)}
    command = [sys.executable, __file__, "--child", name, "--threads", str(args.threads)]
    command += ["--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    command += ["--architecture", args.architecture, "--shape", *map(str, args.shape)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        errors = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return f"failed: {errors[-1]}"
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--architecture", default="conv5_fc3")
    parser.add_argument("--shape", type=int, nargs="+", default=list(SHAPE), help="one sample: C D H W or C H W")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f} (1 min)")
    peak = matmul_peak_gflops()
    flops = flops_per_image(args.architecture, shape)
    exact = float64_logits(args.architecture, shape, args.batch_size)
    limit = peak * 1e9 / flops
    print(f"float32 matmul peak: {peak:.0f} GFLOP/s (best of {MATMUL_REPEATS} {MATMUL_SIDE}^2 products)")
    print(f"{args.architecture} on {shape}: {flops / 1e9:.2f} GFLOP per image (forward + backward)")
    print(f"limit: {limit:.2f} images/s (peak / GFLOP per image)")
    print(f"batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps, each variant in a new process")
    print(f"{'variant':<26} {'warm-up s':>9} {'s/step':>7} {'images/s':>8} {'of limit':>8} {'step 1 loss':>12} "
          f"{'rel. diff':>9} {'timed loss':>10} {'logit error':>11}")  # fmt: skip
    reference: float | None = None
    for name in args.variants:
        result = spawn(name, args)
        if isinstance(result, str):
            print(f"{name:<26} {result}", flush=True)
            continue
        median = statistics.median(result["step_seconds"])  # type: ignore[arg-type]
        first = float(result["first"])  # type: ignore[arg-type]
        reference = first if reference is None else reference
        images = args.batch_size / median
        print(
            f"{name:<26} {result['warmup_seconds']:>9.1f} {median:>7.2f} {images:>8.2f} {images / limit:>8.1%} "
            f"{first:>12.7f} {abs(first - reference) / abs(reference):>9.1e} {result['loss']:>10.4f} "
            f"{logit_error(result['logits'], exact):>11.1e}",
            flush=True,
        )
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) at the end")


if __name__ == "__main__":
    main()
