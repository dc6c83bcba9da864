"""The placement's shortcuts (issue 16, participant-level speed) change no refusal and no byte.

- The brain coverage is computed once per source grid (``TemplateGrid.coverage_cache``): a second image on a
  refused grid is refused with the same message, an accepted grid keeps its coverage.
- The whole-voxel copy keeps a Fortran-ordered source Fortran-ordered (no transposing copy), and the values,
  the written NIfTI voxels and the image-mode tensor bytes are those of the C-ordered path.
"""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.config import ExtractionConfig, ExtractionMode, Normalization
from bids_app.errors import DataError
from bids_app.extraction import extract_tensor, normalize_volume
from bids_app.preprocess.template_space import TemplateGrid, to_template_grid

SPACE = "MNI152NLin2009aSym"


def _grid() -> TemplateGrid:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-20.0, -24.0, -18.0]
    centres = nib.affines.apply_affine(affine, np.stack(np.indices((20, 24, 18)), axis=-1))
    blob = np.exp(-(centres**2).sum(axis=-1) / 200.0).astype(np.float32)
    return TemplateGrid.of(nib.Nifti1Image(blob, affine), SPACE)


def _source(order: str, offset_mm: float = -30.0) -> nib.Nifti1Image:
    """A 2 mm source on the grid's lattice, larger than the grid, whose voxels are ``order``-ordered."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = offset_mm
    rng = np.random.default_rng(0)
    data = np.asarray(rng.random((30, 32, 28), dtype=np.float32) + 0.5, order=order)  # type: ignore[call-overload]
    return nib.Nifti1Image(data, affine)


def test_a_refused_grid_is_refused_again_from_the_cache_with_the_same_message() -> None:
    grid = _grid()
    far = _source("F", offset_mm=200.0)  # the field of view misses the template's brain
    with pytest.raises(DataError, match=r"holds only 0\.0% of the") as first:
        to_template_grid(far, SPACE, grid, Path("a.nii.gz"), "Preprocessed T1w")
    assert len(grid.coverage_cache) == 1
    with pytest.raises(DataError) as second:
        to_template_grid(far, SPACE, grid, Path("a.nii.gz"), "Preprocessed T1w")
    assert str(second.value) == str(first.value) and len(grid.coverage_cache) == 1
    _, placement = to_template_grid(_source("F"), SPACE, grid, Path("b.nii.gz"), "Preprocessed T1w")
    _, again = to_template_grid(_source("C"), SPACE, grid, Path("c.nii.gz"), "Preprocessed T1w")
    assert placement.brain_coverage == again.brain_coverage == 1.0 and len(grid.coverage_cache) == 2


def test_the_shifted_copy_keeps_fortran_order_and_gives_the_same_bytes() -> None:
    grid = _grid()
    placed = {}
    for order in ("C", "F"):
        image, _ = to_template_grid(_source(order), SPACE, grid, Path("x.nii.gz"), "Preprocessed T1w")
        placed[order] = image
    fortran = np.asarray(placed["F"].dataobj)
    assert fortran.flags.f_contiguous and not fortran.flags.c_contiguous  # no transposing copy
    np.testing.assert_array_equal(fortran, np.asarray(placed["C"].dataobj))
    assert placed["F"].to_bytes() == placed["C"].to_bytes()  # the written NIfTI voxels
    tensors = []
    for order in ("C", "F"):
        volume = normalize_volume(np.asarray(placed[order].dataobj), Normalization.ZSCORE)
        assert volume.flags.c_contiguous
        buffer = io.BytesIO()
        np.save(buffer, extract_tensor(volume, ExtractionMode.IMAGE, ExtractionConfig(), None))
        tensors.append(buffer.getvalue())
    assert tensors[0] == tensors[1]
