"""The registration template: nilearn's MNI152 2009a symmetric (shipped offline) or a user's own."""

from __future__ import annotations

from pathlib import Path

DEFAULT_SPACE = "MNI152NLin2009aSym"
# The MNI152 templates (TemplateFlow labels). They share the MNI world coordinates to a few millimetres, so an image
# in one of them is brought onto another's grid through the two affines, without registration.
MNI152_SPACES = frozenset(
    {
        "MNI152NLin2009aSym",
        "MNI152NLin2009aAsym",
        "MNI152NLin2009bSym",
        "MNI152NLin2009bAsym",
        "MNI152NLin2009cSym",
        "MNI152NLin2009cAsym",
        "MNI152NLin6Sym",
        "MNI152NLin6Asym",
        "MNI152Lin",
    }
)
# Space labels of an individual's own anatomy or scanner (BIDS, fMRIPrep, FreeSurfer): never a template.
NATIVE_SPACES = frozenset({"T1w", "T2w", "FLAIR", "pet", "PET", "bold", "dwi", "fsnative", "orig", "native",
                           "scanner", "individual", "ACPC", "anat", "func"})  # fmt: skip


def fits_template(space: str | None, template_space: str) -> bool:
    """Whether an image declared in ``space`` can be placed on a template of ``template_space`` by its affine:
    the same label, or two members of the MNI152 family."""
    if not space:
        return False
    return space == template_space or (space in MNI152_SPACES and template_space in MNI152_SPACES)


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
