"""``bids_app-generate OUT_DIR [options]``: the synthetic-data generator's command line (``synthetic``).

Tests, the demo and the container checks all make their datasets through this one generator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from bids_app.errors import BidsAppError, UsageError
from bids_app.synthetic.cohorts import KINDS
from bids_app.synthetic.dataset import CONTRAST_STREAMS, PREPROCESSED_KINDS, PRESET_VOXEL_MM, generate_dataset


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}. See bids_app-generate --help.")


def main(argv: list[str] | None = None) -> int:
    """``bids_app-generate OUT_DIR [options]``: write a synthetic BIDS dataset; returns the exit code."""
    parser = _ArgumentParser(prog="bids_app-generate", description="Write a synthetic BIDS dataset.")
    parser.add_argument("out_dir", type=Path, help="new or empty folder for the raw BIDS dataset")
    parser.add_argument("--n-subjects", type=int, default=8, help="participants, half AD (default 8)")
    parser.add_argument("--n-sessions", type=int, default=1, help="sessions 12 months apart (default 1)")
    parser.add_argument("--preset", choices=tuple(PRESET_VOXEL_MM), default="tiny", help="image grid (default tiny)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--effect-size", type=float, default=0.5, help="AD grey-matter loss in the ROI (0-0.9)")
    parser.add_argument("--random-labels", action="store_true", help="diagnoses independent of the images")
    parser.add_argument("--with-pet", action="store_true", help="also write FDG PET")
    parser.add_argument("--preprocessed", choices=PREPROCESSED_KINDS, help="also write template-space images")
    parser.add_argument("--kind", choices=KINDS, default="atrophy", help="atrophy (default), trivial or random")
    parser.add_argument("--first-label", type=int, default=1, help="number of the first participant label")
    parser.add_argument("--contrasts", nargs="+", choices=tuple(CONTRAST_STREAMS), default=[],
                        help="also write these contrasts per session (default: T1w only)")  # fmt: skip
    parser.add_argument("--missing-contrast-fraction", type=float, default=0.0,
                        help="fraction of sessions written without the --contrasts images (default 0)")  # fmt: skip
    try:
        options = vars(parser.parse_args(argv))  # dest names are generate_dataset's keywords
        dataset = generate_dataset(options.pop("out_dir"), **options)
    except BidsAppError as exc:
        print(f"bids_app-generate: error: {exc}", file=sys.stderr)
        return exc.exit_code
    n_images = len(dataset.participants) * len(dataset.sessions)
    print(f"Wrote {len(dataset.participants)} participants x {len(dataset.sessions)} sessions to {dataset.bids_dir}")
    print(f"Template: {dataset.template_path} ({n_images} T1w images; atrophy region {dataset.roi_mask_path})")
    if dataset.contrasts:
        n_without = len(dataset.sessions_without_contrasts)
        print(f"Contrasts: {', '.join(dataset.contrasts)} ({n_images - n_without} sessions; {n_without} without)")
    if dataset.derivative_dir is not None:
        print(f"Template-space images: {dataset.derivative_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
