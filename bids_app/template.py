"""The registration template: nilearn's MNI152 2009a symmetric (shipped offline) or a user's own."""

from __future__ import annotations

from pathlib import Path

DEFAULT_SPACE = "MNI152NLin2009aSym"


def nilearn_data_dir() -> Path:
    """Folder where nilearn ships its MNI152 2009a templates (no download involved)."""
    import nilearn

    return Path(nilearn.__file__).resolve().parent / "datasets" / "data"


def default_template_path() -> Path:
    """MNI152 2009a symmetric T1, 1 mm, skull-stripped, 197x233x189 voxels."""
    return nilearn_data_dir() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def default_tissue_path(tissue: str) -> Path:
    """Probability map of ``tissue`` ('gm' or 'wm') in the default template space."""
    if tissue not in ("gm", "wm"):
        raise ValueError(f"tissue must be 'gm' or 'wm', got {tissue!r}")
    return nilearn_data_dir() / f"mni_icbm152_{tissue}_tal_nlin_sym_09a_converted.nii.gz"
