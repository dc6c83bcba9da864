"""Measure whether this torch computes bfloat16 convolution weight gradients on the CPU correctly.

``runtime.amp`` on a CPU would mean bfloat16 autocast, and bids_app refuses it: with the pinned torch (2.13.0, CPU
build) the oneDNN kernel for the weight gradient of a padded convolution returns wrong values for small feature
maps. This script shows it. For each convolution kind (2D/3D, kernel, stride, padding, memory layout) and each
small input shape it computes the weight gradient of ``mean(conv(x) ** 2)`` twice: under CPU bfloat16 autocast,
and in float32 from the same inputs rounded to bfloat16 (so only the kernel's own arithmetic differs). bfloat16
keeps about 3 significant digits, so a correct kernel stays within ~1 % of the reference; the script counts the
shapes beyond ``--tolerance`` and prints the worst relative error. Each kind runs in its own process, because
the defect can also corrupt the heap ("double free or corruption"): such a kind is reported as crashed.

Run: ``python benchmarks/check_cpu_bf16_conv.py [--tolerance 0.05] [--channels 8 16]``.
Re-run it after changing torch: when every line says 0 wrong and none crashed, the refusal in
``bids_app.runtime.autocast_dtype`` can be reconsidered.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys

# (dims, kernel, stride, padding): the kinds the architectures use (3x3 padded, 1x1 shortcuts, 7x7 stem, 2x2
# transposed-free downsampling) and a few neighbours.
KINDS = [
    (dims, kernel, stride, padding)
    for dims in (3, 2)
    for kernel, stride, padding in ((3, 1, 1), (3, 2, 1), (3, 1, 0), (1, 1, 0), (5, 1, 2), (7, 2, 3), (2, 2, 0))
]
SIZES = (1, 2, 3, 4, 6)


def check_kind(dims: int, kernel: int, stride: int, padding: int, channels_last: bool, channels: tuple[int, int],
               tolerance: float) -> dict[str, object]:  # fmt: skip
    """Wrong shapes and the worst relative error of one convolution kind (runs in a child process)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    conv = F.conv3d if dims == 3 else F.conv2d
    layout = torch.channels_last_3d if dims == 3 else torch.channels_last
    wrong, worst, tried = [], 0.0, 0
    for shape in itertools.product(SIZES, repeat=dims):
        if any(size + 2 * padding < kernel for size in shape):
            continue
        tried += 1
        x = torch.randn(2, channels[0], *shape)
        w = torch.randn(channels[1], channels[0], *(kernel,) * dims) * 0.1
        if channels_last:
            x, w = x.contiguous(memory_format=layout), w.contiguous(memory_format=layout)
        reference = w.bfloat16().float().requires_grad_(True)
        conv(x.bfloat16().float(), reference, None, stride=stride, padding=padding).square().mean().backward()
        weight = w.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x, weight, None, stride=stride, padding=padding)
        out.float().square().mean().backward()
        assert reference.grad is not None and weight.grad is not None
        scale = reference.grad.abs().max().item() + 1e-12
        error = (weight.grad - reference.grad).abs().max().item() / scale
        error = error if error == error else float("inf")  # NaN counts as wrong
        worst = max(worst, error)
        if error > tolerance:
            wrong.append(list(shape))
    return {"tried": tried, "wrong": wrong, "worst": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative error counted as wrong")
    parser.add_argument("--channels", type=int, nargs=2, default=(8, 16), metavar=("IN", "OUT"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind = json.loads(args.child)
        print(json.dumps(check_kind(*kind, channels=tuple(args.channels), tolerance=args.tolerance)))
        return
    import torch

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"channels {args.channels[0]}->{args.channels[1]}, batch 2, sizes {SIZES} per axis, "
          f"wrong = relative error > {args.tolerance}")  # fmt: skip
    print(f"{'kind':<34} {'layout':<14} {'shapes':>6} {'wrong':>6} {'worst error':>12}  examples")
    total_wrong = crashed = 0
    for (dims, kernel, stride, padding), channels_last in itertools.product(KINDS, (False, True)):
        name = f"{dims}D k{kernel} stride {stride} padding {padding}"
        layout = "channels-last" if channels_last else "contiguous"
        child = json.dumps([dims, kernel, stride, padding, channels_last])
        command = [sys.executable, __file__, "--child", child, "--tolerance", str(args.tolerance),
                   "--channels", *map(str, args.channels)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            crashed += 1
            reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            print(f"{name:<34} {layout:<14} {'':>6} {'':>6} {'':>12}  CRASHED: {reason}", flush=True)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        total_wrong += len(result["wrong"])
        examples = " ".join("x".join(map(str, shape)) for shape in result["wrong"][:4])
        print(f"{name:<34} {layout:<14} {result['tried']:>6} {len(result['wrong']):>6} {result['worst']:>12.3g}  "
              f"{examples}", flush=True)  # fmt: skip
    print(f"total: {total_wrong} wrong weight gradient(s), {crashed} crashed kind(s)")


if __name__ == "__main__":
    main()
