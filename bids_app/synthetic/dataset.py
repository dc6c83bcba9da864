"""The synthetic-data generator shared by tests, the demo and container checks (``bids_app-generate``).

It writes a raw BIDS dataset that passes ``bids-validator-deno``: ``dataset_description.json``, ``README``,
``participants.tsv``/``.json`` (diagnosis AD/CN, age, sex), ``sessions.json`` and per participant
``sub-<p>_sessions.tsv`` (age and diagnosis per session), ``sub-<p>/ses-<s>/anat/*_T1w.nii.gz`` (+ JSON),
optionally ``anat/*_T2w.nii.gz`` and ``anat/*_FLAIR.nii.gz`` (``contrasts``; ``missing_contrast_fraction`` of the
sessions without them) and ``pet/*_trc-FDG_pet.nii.gz``, and under ``code/template/`` the atrophy-region mask
``roi-hippocampus_mask.nii.gz`` (plus, for ``tiny`` and ``medium``, the 4 or 2 mm template
``tpl-MNI152NLin2009aSym_res-<mm>mm_T1w.nii.gz`` and its ``..._label-GM_probseg.nii.gz``: nilearn's MNI152 2009a
symmetric template block-averaged to that grid, named so that its space label reads from the file name).
Template-space images can also be written as a BIDS derivative
(``derivatives/preproc/sub-<p>/ses-<s>/anat/*_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz``, which
validates as its own root) or as a Clinica CAPS (``derivatives/caps/subjects/sub-<p>/ses-<s>/t1_linear/
*_space-MNI152NLin2009cSym_desc-Crop_res-1x1x1_T1w.nii.gz``); the validator skips ``derivatives/`` of a raw
dataset. Participants are ``001``, ``002``... (``first_label`` moves the start); sessions ``M000``, ``M012``...
(months from baseline, one a year: AD atrophy grows by 10 % of its baseline value per year, so later sessions of
an AD participant show more of it). Same arguments give byte-identical files (gzip without timestamps, seeded
streams).

Who is in the cohort (diagnoses, ages, the kinds ``atrophy``/``trivial``/``random`` and re-scans of another
generated dataset) is :mod:`bids_app.synthetic.cohorts`; the images are :mod:`bids_app.synthetic.anatomy` (subject
anatomy in template space) and :mod:`bids_app.synthetic.acquisition` (native pose, noise, NIfTI bytes).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bids_app import read_version
from bids_app.derivatives import BIDS_VERSION, atomic_path, atomic_write_json, atomic_write_text
from bids_app.errors import UsageError
from bids_app.synthetic import cohorts
from bids_app.synthetic.cohorts import PARTICIPANTS_JSON, SESSIONS_JSON, Identity, Participant
from bids_app.template import DEFAULT_SPACE, default_template_path

logger = logging.getLogger(__name__)

PRESET_VOXEL_MM = {"tiny": 4, "medium": 2, "realistic": 1}
PREPROCESSED_KINDS = ("derivative", "caps")
CAPS_SPACE = "MNI152NLin2009cSym"
TEMPLATE_DIR = Path("code") / "template"
TEMPLATE_NAME = "tpl-MNI152NLin2009aSym_res-{mm}mm_T1w.nii.gz"  # the written template of a coarse preset
GM_NAME = "tpl-MNI152NLin2009aSym_res-{mm}mm_label-GM_probseg.nii.gz"
TINY_TEMPLATE_NAME = TEMPLATE_NAME.format(mm=PRESET_VOXEL_MM["tiny"])
TINY_GM_NAME = GM_NAME.format(mm=PRESET_VOXEL_MM["tiny"])
ROI_MASK_NAME = "roi-hippocampus_mask.nii.gz"
MAX_EFFECT_SIZE = 0.9
MAX_SESSIONS = 20
MAX_SUBJECTS = 9999
MNI_XFORM, SCANNER_XFORM = 4, 1
# the contrasts a session may have besides its T1w, with the last number of their random streams (fixed per
# contrast, so a FLAIR is the same whether or not the T2w is written too)
CONTRAST_STREAMS = {"T2w": 2, "FLAIR": 3}


@dataclass(frozen=True)
class GeneratedDataset:
    """What :func:`generate_dataset` wrote.

    Attributes:
        bids_dir: the raw BIDS dataset.
        template_path: template the images were made from (tiny, medium: the written 4 or 2 mm one; realistic:
            nilearn's).
        roi_mask_path: binary atrophy region on ``template_path``'s grid.
        participants: bare participant labels (``"001"``...).
        sessions: bare session labels (``"M000"``...), the same for every participant.
        derivative_dir: ``bids_dir/derivatives/preproc`` or ``bids_dir/derivatives/caps``; None when not asked.
        caps_dir: the CAPS folder when ``preprocessed="caps"``, else None.
        kind: ``atrophy``, ``trivial`` or ``random`` (:mod:`bids_app.synthetic.cohorts`).
        identities: who each participant is, in ``participants`` order; equal identities in two datasets are
            the same person (``rescans_of``).
        rescans: ``(label here, label in rescans_of)`` for each re-scanned participant.
        contrasts: the contrasts written besides T1w (``T2w``, ``FLAIR``).
        sessions_without_contrasts: ``(participant, session)`` labels of the sessions written with their T1w only.
    """

    bids_dir: Path
    template_path: Path
    roi_mask_path: Path
    participants: tuple[str, ...]
    sessions: tuple[str, ...]
    derivative_dir: Path | None
    caps_dir: Path | None
    kind: str = "atrophy"
    identities: tuple[Identity, ...] = ()
    rescans: tuple[tuple[str, str], ...] = ()
    contrasts: tuple[str, ...] = ()
    sessions_without_contrasts: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Settings:
    """The arguments of :func:`generate_dataset`, checked."""

    out_dir: Path
    n_subjects: int
    n_sessions: int
    preset: str
    seed: int
    effect_size: float
    random_labels: bool
    with_pet: bool
    preprocessed: str | None
    kind: str = "atrophy"
    first_label: int = 1
    rescans_of: GeneratedDataset | None = None
    n_rescans: int = 0
    contrasts: tuple[str, ...] = ()
    missing_contrast_fraction: float = 0.0

    def __post_init__(self) -> None:
        cohorts.check_cohort(self.kind, self.first_label, self.n_subjects, self.rescans_of, self.n_rescans)
        unknown = [c for c in self.contrasts if c not in CONTRAST_STREAMS]
        if unknown or len(set(self.contrasts)) != len(self.contrasts):
            raise UsageError(
                f"contrasts {list(self.contrasts)}: each must be one of {', '.join(CONTRAST_STREAMS)}, once."
            )
        if not 0.0 <= self.missing_contrast_fraction <= 1.0 or (self.missing_contrast_fraction and not self.contrasts):
            raise UsageError(
                "missing_contrast_fraction is the fraction of sessions written without their contrasts and must be "
                f"in [0, 1], with contrasts to leave out; got {self.missing_contrast_fraction} with contrasts "
                f"{list(self.contrasts)}."
            )
        if self.preset not in PRESET_VOXEL_MM:
            raise UsageError(f"Unknown preset {self.preset!r}. Choose one of: {', '.join(PRESET_VOXEL_MM)}.")
        if self.preprocessed is not None and self.preprocessed not in PREPROCESSED_KINDS:
            choices = ", ".join(PREPROCESSED_KINDS)
            raise UsageError(f"Unknown preprocessed kind {self.preprocessed!r}. Choose one of: {choices} (or None).")
        if not 2 <= self.n_subjects <= MAX_SUBJECTS:
            raise UsageError(f"n_subjects must be 2 to {MAX_SUBJECTS} (both diagnoses needed), got {self.n_subjects}.")
        if not 1 <= self.n_sessions <= MAX_SESSIONS:
            raise UsageError(f"n_sessions must be between 1 and {MAX_SESSIONS}, got {self.n_sessions}.")
        if self.seed < 0:
            raise UsageError(f"seed must be a non-negative integer, got {self.seed}.")
        if not 0.0 <= self.effect_size <= MAX_EFFECT_SIZE:
            raise UsageError(
                "effect_size is the fraction of grey-matter intensity lost in the atrophy region and must be in "
                f"[0, {MAX_EFFECT_SIZE}], got {self.effect_size}."
            )
        out_dir = self.out_dir
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise UsageError(f"Output folder {out_dir} exists and is not empty. Choose a new folder or remove it.")

    @property
    def sessions(self) -> tuple[str, ...]:
        return tuple(f"M{12 * k:03d}" for k in range(self.n_sessions))

    @property
    def sessions_without_contrasts(self) -> frozenset[tuple[int, int]]:
        """``(participant index, session index)`` of the ``round(missing_contrast_fraction * n_images)`` sessions,
        drawn by a seeded permutation, written without their contrasts."""
        n_images = self.n_subjects * self.n_sessions
        n_missing = round(self.missing_contrast_fraction * n_images)
        drawn = np.random.default_rng([self.seed, 9]).permutation(n_images)[:n_missing]
        return frozenset((int(i) // self.n_sessions, int(i) % self.n_sessions) for i in drawn)

    @property
    def derivative_dir(self) -> Path | None:
        if self.preprocessed is None:
            return None
        return self.out_dir / "derivatives" / ("caps" if self.preprocessed == "caps" else "preproc")


def _write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    lines = ["\t".join(header), *("\t".join(row) for row in rows)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, xform_code: int) -> None:
    from bids_app.synthetic.acquisition import nifti_bytes

    data_bytes = nifti_bytes(data, affine, xform_code)
    with atomic_path(path) as tmp:  # no fsync: a generator needs atomic renames, not durability
        tmp.write_bytes(data_bytes)


def _write_raw_metadata(
    bids_dir: Path, participants: list[Participant], sessions: tuple[str, ...], arguments: dict[str, Any]
) -> None:
    version = read_version()
    settings = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    # Every generated dataset has the same Name: the settings (seed included) tell two of them apart, so that
    # data.origin gives them different dataset ids; the same settings make the same images, hence the same id.
    description = f"settings: {settings or 'defaults'}"
    generated_by = {"Name": "bids_app-generate", "Version": version, "Description": description}
    atomic_write_json(
        bids_dir / "dataset_description.json",
        {
            "Name": "bids_app synthetic dataset",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["bids_app-generate", "nilearn MNI152 2009a template"],
            "GeneratedBy": [generated_by],
        },
    )
    atomic_write_text(
        bids_dir / "README",
        "# bids_app synthetic dataset\n\nT1-weighted images (and optional FDG PET) made by `bids_app-generate` "
        f"{version} from the MNI152 2009a template: each participant is a smooth random deformation of the "
        "template; AD participants lose grey-matter intensity around both hippocampi. Images are moved to a "
        "random native pose with a bias field and Rician noise. The atrophy region is in "
        f"`code/template/{ROI_MASK_NAME}`.\n\n{_contrasts_text(arguments)}Settings: {settings}.\n",
    )
    _write_tsv(
        bids_dir / "participants.tsv",
        list(PARTICIPANTS_JSON),
        [[f"sub-{p.label}", p.diagnosis, f"{p.age:.1f}", p.sex] for p in participants],
    )
    atomic_write_json(bids_dir / "participants.json", PARTICIPANTS_JSON)
    atomic_write_json(bids_dir / "sessions.json", SESSIONS_JSON)
    for p in participants:
        rows = [[f"ses-{s}", f"{p.age + years:.1f}", p.diagnosis] for years, s in enumerate(sessions)]  # yearly
        _write_tsv(bids_dir / f"sub-{p.label}" / f"sub-{p.label}_sessions.tsv", list(SESSIONS_JSON), rows)


def _contrasts_text(arguments: dict[str, Any]) -> str:
    """The README's paragraph on T2w/FLAIR, empty without ``contrasts`` (the default README stays as it was)."""
    if not arguments.get("contrasts"):
        return ""
    looks = {"T2w": "T2w (bright CSF, white matter darker than grey matter)",
             "FLAIR": "FLAIR (dark CSF, 1.5 times thicker slices)"}  # fmt: skip
    return (
        f"Each session also has {' and '.join(looks[c] for c in arguments['contrasts'])} images of the same "
        "anatomy, each at its own pose with the T1w's head size; a fraction of the sessions "
        f"(missing_contrast_fraction={arguments.get('missing_contrast_fraction', 0.0)}) have their T1w only.\n\n"
    )


def _write_templates(bids_dir: Path, preset: str) -> tuple[Path, Path]:
    from bids_app.synthetic.anatomy import load_template_space

    space = load_template_space(PRESET_VOXEL_MM[preset])
    folder = bids_dir / TEMPLATE_DIR
    roi_mask_path = folder / ROI_MASK_NAME
    _write_nifti(roi_mask_path, space.roi_mask(), space.affine, MNI_XFORM)
    if preset == "realistic":
        return default_template_path(), roi_mask_path
    template_path = folder / TEMPLATE_NAME.format(mm=space.voxel_mm)
    _write_nifti(template_path, space.t1, space.affine, MNI_XFORM)
    _write_nifti(folder / GM_NAME.format(mm=space.voxel_mm), space.gm, space.affine, MNI_XFORM)
    return template_path, roi_mask_path


def _write_derivative_metadata(root: Path, preprocessed: str) -> None:
    what = "images before native pose, bias field and noise"
    # BIDS recommends that GeneratedBy names the derivatives/<folder> the dataset sits in
    generated_by = {"Name": root.name, "Version": read_version(), "Description": f"bids_app-generate: {what}"}
    description: dict[str, Any] = {"Name": f"bids_app synthetic {root.name}", "BIDSVersion": BIDS_VERSION}
    description.update(DatasetType="derivative", GeneratedBy=[generated_by])
    if preprocessed == "caps":
        description["CAPSVersion"] = "1.0.0"
    else:
        description["DatasetLinks"] = {"raw": "../.."}
        atomic_write_text(root / "README", f"# Synthetic preprocessed images\n\nTemplate-space T1w {what}.\n")
    atomic_write_json(root / "dataset_description.json", description)


def _write_preprocessed(settings: _Settings, label: str, session: str, image: np.ndarray, affine: np.ndarray) -> None:
    prefix = f"sub-{label}_ses-{session}"
    root = settings.derivative_dir
    assert root is not None
    if settings.preprocessed == "caps":
        folder = root / "subjects" / f"sub-{label}" / f"ses-{session}" / "t1_linear"
        _write_nifti(folder / f"{prefix}_space-{CAPS_SPACE}_desc-Crop_res-1x1x1_T1w.nii.gz", image, affine, MNI_XFORM)
        return
    path = root / f"sub-{label}" / f"ses-{session}" / "anat" / f"{prefix}_space-{DEFAULT_SPACE}_desc-preproc_T1w.nii.gz"
    _write_nifti(path, image, affine, MNI_XFORM)
    sidecar: dict[str, Any] = {
        "Description": "Template-space image before native pose, bias field and noise",
        "SkullStripped": True,
        "Sources": [f"bids:raw:sub-{label}/ses-{session}/anat/{prefix}_T1w.nii.gz"],
    }
    if settings.preset != "realistic":
        name = TEMPLATE_NAME.format(mm=PRESET_VOXEL_MM[settings.preset])
        sidecar["SpatialReference"] = f"bids:raw:{(TEMPLATE_DIR / name).as_posix()}"
    atomic_write_json(path.with_name(path.name.replace(".nii.gz", ".json")), sidecar)


def _write_participant(settings: _Settings, index: int, p: Participant, who: Identity) -> None:
    """Render one participant's anatomy once, then acquire and write each of its sessions."""
    from bids_app.synthetic import acquisition, anatomy

    seed, kind = settings.seed, settings.kind
    space = anatomy.load_template_space(PRESET_VOXEL_MM[settings.preset])
    pet_space = anatomy.load_template_space(max(2, PRESET_VOXEL_MM[settings.preset]))
    subject = cohorts.subject_anatomy(kind, seed, who)
    images = anatomy.render_subject(space, subject)
    pet_images = anatomy.render_subject(pet_space, subject, "pet") if settings.with_pet else None
    contrast_images = {c: anatomy.render_subject(space, subject, c) for c in settings.contrasts}
    without_contrasts = settings.sessions_without_contrasts
    stream = 5 if p.years_later else 2  # a re-scan's acquisitions never repeat its first dataset's ones
    for k, session in enumerate(settings.sessions):  # one session a year: k is also the years since baseline
        prefix = f"sub-{p.label}_ses-{session}"
        session_dir = settings.out_dir / f"sub-{p.label}" / f"ses-{session}"
        template_image = cohorts.apply_kind(kind, p.affected, images.at(p.years_later + k), space, [seed, 7, index, k])
        data, t1w_grid = acquisition.acquire_mr(np.random.default_rng([seed, stream, index, k]), space, template_image)
        _write_nifti(session_dir / "anat" / f"{prefix}_T1w.nii.gz", data, t1w_grid.affine, SCANNER_XFORM)
        atomic_write_json(session_dir / "anat" / f"{prefix}_T1w.json", acquisition.T1W_SIDECAR)
        if settings.preprocessed is not None:
            _write_preprocessed(settings, p.label, session, template_image, space.affine)
        for contrast, contrast_images_ in contrast_images.items():
            if (index, k) in without_contrasts:
                continue
            code = CONTRAST_STREAMS[contrast]
            image = cohorts.apply_kind(kind, p.affected, contrast_images_.at(p.years_later + k), space,
                                       [seed, 7, index, k, code])  # fmt: skip
            sidecar, slice_factor = acquisition.CONTRAST_ACQUISITIONS[contrast]
            rng_mr = np.random.default_rng([seed, stream, index, k, code])
            data, grid = acquisition.acquire_mr(rng_mr, space, image, slice_factor, t1w_grid.scale)  # same head
            _write_nifti(session_dir / "anat" / f"{prefix}_{contrast}.nii.gz", data, grid.affine, SCANNER_XFORM)
            atomic_write_json(session_dir / "anat" / f"{prefix}_{contrast}.json", sidecar)
        if pet_images is not None:
            rng_pet = np.random.default_rng([seed, stream + 1, index, k])
            pet_image = cohorts.apply_kind(kind, p.affected, pet_images.at(p.years_later + k), pet_space,
                                           [seed, 8, index, k])  # fmt: skip
            data, affine = acquisition.acquire_pet(rng_pet, pet_space, pet_image)
            _write_nifti(session_dir / "pet" / f"{prefix}_trc-FDG_pet.nii.gz", data, affine, SCANNER_XFORM)
            atomic_write_json(session_dir / "pet" / f"{prefix}_trc-FDG_pet.json", acquisition.PET_SIDECAR)
    logger.debug("Wrote participant %s (%s, %d sessions)", p.label, p.diagnosis, settings.n_sessions)


def _n_workers(preset: str, n_participants: int) -> int:
    """Threads writing participants: 1 for tiny, else up to 4 of the CPUs we may use.

    Threads suffice: interpolation (scipy.ndimage), numpy arithmetic, random fills and zlib release the GIL.
    """
    if preset == "tiny":
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)), n_participants))


def generate_dataset(
    out_dir: Path,
    *,
    n_subjects: int = 8,
    n_sessions: int = 1,
    preset: str = "tiny",
    seed: int = 0,
    effect_size: float = 0.5,
    random_labels: bool = False,
    with_pet: bool = False,
    preprocessed: str | None = None,
    kind: str = "atrophy",
    first_label: int = 1,
    rescans_of: GeneratedDataset | None = None,
    n_rescans: int = 0,
    contrasts: tuple[str, ...] | list[str] = (),
    missing_contrast_fraction: float = 0.0,
) -> GeneratedDataset:
    """Write a synthetic raw BIDS dataset (T1w, optionally FDG PET and preprocessed images) to ``out_dir``.

    Args:
        out_dir: new or empty folder for the raw dataset.
        n_subjects: participants, at least 2; ``n_subjects // 2`` are AD.
        n_sessions: sessions per participant, 12 months apart (``M000``, ``M012``...).
        preset: ``"tiny"`` (4 mm template grid, native 44x52x44 voxels), ``"medium"`` (2 mm, native
            88x104x88; for benchmarks that must run in seconds per network on a CPU) or ``"realistic"``
            (1 mm, native 176x208x176). Coarse presets write their template under ``code/template/``;
            all but ``tiny`` write participants with up to 4 threads.
        seed: the same seed and arguments give byte-identical files.
        effect_size: fraction of grey-matter intensity (and FDG uptake) lost at the centre of the
            hippocampal region in AD at baseline; grows by 10 % of itself per year; 0 means no effect.
        random_labels: record diagnoses drawn independently of which images carry the effect (the images
            are those of ``random_labels=False``).
        with_pet: also write a static FDG PET per session (2 mm, or 4 mm for ``tiny``).
        preprocessed: ``"derivative"`` writes the template-space images before pose, bias and noise to
            ``derivatives/preproc``; ``"caps"`` writes them as a Clinica CAPS to ``derivatives/caps``.
        kind: ``"atrophy"``, ``"trivial"`` or ``"random"`` (:mod:`bids_app.synthetic.cohorts`);
            ``effect_size`` is the atrophy kind's.
        first_label: number of the first participant label (e.g. 101 for a second cohort: ``101``, ``102``...).
        rescans_of: a dataset made by this function; with ``n_rescans``, the first ``n_rescans`` participants
            here are re-scans of its first ``n_rescans`` participants (same anatomy, diagnosis and sex; new
            noise, pose and bias; ``len(rescans_of.sessions)`` years older). Give ``first_label`` so their
            labels differ from the originals'.
        n_rescans: how many re-scans (0 to both datasets' numbers of participants).
        contrasts: also write these per session (``"T2w"``, ``"FLAIR"``), each at its own native pose (FLAIR
            with 1.5 times thicker slices), from the same anatomy and atrophy as the T1w: T2w with bright CSF
            and white matter darker than grey matter, FLAIR with dark CSF.
        missing_contrast_fraction: the fraction of all sessions (rounded to a count, drawn with ``seed``)
            written with their T1w only, to test sessions that lack a contrast.

    Raises:
        UsageError: a bad argument or a non-empty ``out_dir``.
    """
    from tqdm import tqdm

    from bids_app.synthetic.anatomy import load_template_space

    settings = _Settings(Path(out_dir), n_subjects, n_sessions, preset, seed, effect_size, random_labels, with_pet,
                         preprocessed, kind, first_label, rescans_of, n_rescans, tuple(contrasts),
                         missing_contrast_fraction)  # fmt: skip
    participants, identities = cohorts.draw_cohort(n_subjects, n_sessions, seed, effect_size, random_labels,
                                                   first_label, rescans_of, n_rescans)  # fmt: skip
    # README stays as it was
    defaults = {"kind": "atrophy", "first_label": 1, "rescans_of": None, "n_rescans": 0, "contrasts": (),
                "missing_contrast_fraction": 0.0}  # fmt: skip
    arguments = {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if f.name != "out_dir" and defaults.get(f.name, ...) != getattr(settings, f.name)
    }
    if rescans_of is not None:
        arguments["rescans_of"] = rescans_of.bids_dir.name
    _write_raw_metadata(settings.out_dir, participants, settings.sessions, arguments)
    template_path, roi_mask_path = _write_templates(settings.out_dir, preset)
    if settings.derivative_dir is not None and preprocessed is not None:
        _write_derivative_metadata(settings.derivative_dir, preprocessed)
    if with_pet:
        load_template_space(max(2, PRESET_VOXEL_MM[preset]))  # cached before the threads need it
    write = functools.partial(_write_participant, settings)
    progress = functools.partial(tqdm, total=n_subjects, desc="participants", disable=not sys.stderr.isatty())
    with ThreadPoolExecutor(_n_workers(preset, n_subjects)) as pool:
        for _ in progress(pool.map(write, range(n_subjects), participants, identities)):
            pass
    return GeneratedDataset(
        bids_dir=settings.out_dir,
        template_path=template_path,
        roi_mask_path=roi_mask_path,
        participants=tuple(p.label for p in participants),
        sessions=settings.sessions,
        derivative_dir=settings.derivative_dir,
        caps_dir=settings.derivative_dir if preprocessed == "caps" else None,
        kind=kind,
        identities=tuple(identities),
        rescans=cohorts.rescan_pairs(participants, rescans_of, n_rescans),
        contrasts=settings.contrasts,
        sessions_without_contrasts=tuple(
            sorted((participants[i].label, settings.sessions[k]) for i, k in settings.sessions_without_contrasts)
        ),
    )
