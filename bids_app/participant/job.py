"""One participant's job: each image through preprocessing, QC, tensor extraction, then the HTML report.

``process_participant`` is the participant stage's entry (``levels`` calls it, in a worker process or not).

Every output is skipped when it already exists with the same configuration hash (idempotent re-runs) unless
``--overwrite``; every file is written atomically, the sidecar last, so a killed job leaves nothing that looks
complete. The job holds the template and ROI masks once for all of the participant's images.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
import traceback
import weakref
from pathlib import Path
from typing import Any

from bids_app import read_version
from bids_app.config import CONTRASTS, ExtractionMode, RunConfig
from bids_app.data.origin import SIDECAR_KEY, read_dataset_identity
from bids_app.derivatives import (
    atomic_path,
    atomic_write_json,
    atomic_write_nifti,
    bids_uri,
    config_hash,
    file_sha256,
    preproc_path,
    qc_path,
    read_complete_sidecar,
    remove_stale_temporaries,
    report_path,
    sidecar_path,
    tensor_path,
    transform_path,
)
from bids_app.errors import BidsAppError, IOFailure, OutputError
from bids_app.inputs.bids_query import ImageRecord
from bids_app.participant.status import Outcome, StatusRow
from bids_app.template import MNI152_SPACES

log = logging.getLogger(__name__)

# template crop (cached per process by _load_template_set) → its preprocess.template_space.TemplateGrid
_TEMPLATE_GRIDS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

STANDARD_SPACES = MNI152_SPACES  # BIDS standard template identifiers: no SpatialReference needed
_PLACED = "already preprocessed input in a template space, placed on the template grid by its world coordinates"
# The preprocessed image sidecar's Description, by (is PET, was already preprocessed).
DESCRIPTIONS = {
    (False, False): "t1-linear: N4 bias correction, affine registration to the template, crop",
    (False, True): _PLACED,
    (True, False): "pet-linear: rigid registration to the session's T1w composed with its affine to the template, "
    "crop, SUVR normalisation",
    (True, True): f"{_PLACED}, SUVR normalisation",
}
CUSTOM_MAP_DESCRIPTION = (
    "custom template-space map (--custom-map), placed on the template grid by its world coordinates; values kept"
)


def custom_map_sidecar(cfg: RunConfig, name: str, source_space: str | None) -> dict[str, Any]:
    """The ``CustomMap`` of a custom map's tensor sidecar: its ``Name``, the ``Filters`` ([entity, value] pairs
    of ``--custom-map``) that selected its files and the ``SourceSpace`` they were in. The group level records
    them (``data.origin.tensor_settings``) and refuses to predict maps selected otherwise than the model's."""
    from bids_app.kinds import parse_custom_map

    custom_map = next(m for m in map(parse_custom_map, cfg.preprocess.custom_maps) if m.name == name)
    return {"Name": name, "Filters": [list(pair) for pair in custom_map.filters], "SourceSpace": source_space}


def check_extraction(cfg: RunConfig) -> None:
    """Refuse extraction parameters that cannot fit the cropped template before any participant runs."""
    from bids_app.errors import ConfigError
    from bids_app.extraction import n_parts

    # kept: jobs run in this process re-use it; the QC reference is left to them (with --nprocs, to the workers)
    template, template_crop, _ = _load_template_set(cfg.preprocess, qc=False)
    shape = tuple(int(n) for n in template_crop.shape[:3])
    if ExtractionMode.ROI in cfg.extraction.modes and not cfg.extraction.roi_masks:
        raise ConfigError("roi mode needs at least one --roi-mask NAME=PATH (a binary mask in template space).")
    if cfg.extraction.image_voxel_size is not None:
        from bids_app.extraction import check_image_voxel_size

        if ExtractionMode.IMAGE not in cfg.extraction.modes:
            modes = " ".join(m.value for m in cfg.extraction.modes)
            raise ConfigError(
                f"--image-voxel-size {cfg.extraction.image_voxel_size:g} resamples image-mode tensors only, but "
                f"--modes is '{modes}'. Add image to --modes or drop --image-voxel-size (patch, slice and roi "
                "tensors stay on the template grid)."
            )
        check_image_voxel_size(cfg.extraction.image_voxel_size, template.affine, f"template {template_name(cfg)}")
    for mode in cfg.extraction.modes:
        n_parts(mode, cfg.extraction, shape)


def template_name(cfg: RunConfig) -> str:
    """The file name of the run's template, for messages."""
    from bids_app.template import default_template_path

    return Path(cfg.preprocess.template_path or default_template_path()).name


def participant_settings_sidecar(cfg: RunConfig) -> dict[str, Any]:
    """What a tensor sidecar records of the settings that made it, beyond its mode parameters.

    ``Preprocessing``: the template file (``TemplatePath``, absolute) and its ``TemplateSHA256``, its ``Space``,
    ``CropShape`` (None: the template's full grid) and ``Registration``; ``RoiMasks``: each ROI mask's
    ``Path`` (absolute) and ``SHA256`` by name (kept in roi mode only). The group level reads them back
    (``data.origin.tensor_settings``) to record what a model was trained on and to refuse tensors made otherwise.
    """
    from bids_app.template import default_template_path

    preprocess = cfg.preprocess
    template = Path(preprocess.template_path or default_template_path()).resolve()
    return {
        "Preprocessing": {
            "TemplatePath": template.as_posix(),
            "TemplateSHA256": file_sha256(template),
            "Space": preprocess.template_space,
            "CropShape": list(preprocess.crop_shape) if preprocess.crop_shape is not None else None,
            "Registration": preprocess.registration.value,
        },
        "RoiMasks": {
            name: {"Path": Path(path).resolve().as_posix(), "SHA256": file_sha256(path)}
            for name, path in cfg.extraction.roi_masks
        },
    }


class ParticipantJob:
    """Processes the images of participant ``label`` into ``cfg.output_dir``."""

    def __init__(self, cfg: RunConfig, label: str, work_dir: Path) -> None:
        self.cfg = cfg
        self.label = label
        self.work_dir = work_dir
        self.space = cfg.preprocess.template_space
        self.template, self.template_crop, self.qc_reference = _load_template_set(cfg.preprocess)
        self.dataset = read_dataset_identity(cfg.bids_dir)
        self.settings_sidecar = participant_settings_sidecar(cfg)
        stale = remove_stale_temporaries(cfg.output_dir / f"sub-{label}")
        if stale:
            log.warning("sub-%s: removed %d temporary file(s) left by an interrupted run", label, len(stale))
        self._grid: Any = None  # preprocess.template_space.TemplateGrid, built for the first preprocessed input
        self.report_entries: list[Any] = []
        # by input path: what the report draws from arrays this job held (strips by mode, the input's row)
        self.network_inputs: dict[Path, dict[str, str]] = {}
        self.input_panels: dict[Path, tuple[Any, ...]] = {}
        self._normalized: tuple[Any, Any] | None = None  # (image, its normalised float32 volume) for every mode
        self.t1_transforms: dict[str | None, tuple[Path, Path]] = {}  # session → (raw T1w, transform)
        self._roi_masks: dict[str, Any] | None = None

    # -- preprocessing -------------------------------------------------------------------------------
    def process_image(self, record: ImageRecord) -> list[StatusRow]:
        rows: list[StatusRow] = []
        start = time.perf_counter()
        image, provenance, skipped = self._preprocess(record)
        rows.append(
            StatusRow(
                self.label,
                record.session_label,
                record.path.name,
                "preprocess",
                Outcome.SKIPPED if skipped else Outcome.OK,
                "",
                time.perf_counter() - start,
            )
        )
        for mode in self.cfg.extraction.modes:
            start = time.perf_counter()
            try:
                skipped = self._extract(record, image, mode, provenance)
                outcome, message = (Outcome.SKIPPED if skipped else Outcome.OK), ""
            except Exception as exc:
                if not isinstance(exc, BidsAppError) or isinstance(exc, IOFailure | OutputError):
                    raise  # bugs keep their traceback; a failing output stops the run (exit 73/74)
                log.error("sub-%s %s %s extraction: %s", self.label, record.path.name, mode.value, exc)
                outcome, message = Outcome.FAILED, str(exc)
            rows.append(
                StatusRow(
                    self.label,
                    record.session_label,
                    record.path.name,
                    f"extract-{mode.value}",
                    outcome,
                    message,
                    time.perf_counter() - start,
                )
            )
        return rows

    def _extra_entities(self, record: ImageRecord) -> str:
        tracer = record.entities.get("tracer")
        return f"trc-{tracer}" if record.suffix == "pet" and tracer else ""

    def _preprocess(self, record: ImageRecord) -> tuple[Any, dict[str, Any], bool]:
        """The preprocessed image (computed or re-used), its provenance and whether it was re-used."""
        import nibabel as nib
        import numpy as np

        cfg, out = self.cfg, self.cfg.output_dir
        extra = self._extra_entities(record)
        path = preproc_path(out, self.label, record.session_label, self.space, record.suffix, extra)
        raw_sha = file_sha256(record.path)
        pre_hash = self._preprocess_hash(record, raw_sha)
        existing = read_complete_sidecar(path)
        provenance = {"RawSource": str(record.path), "RawSourceSHA256": raw_sha, "PreprocHash": pre_hash}
        if existing and existing.get("ConfigHash") == pre_hash and not cfg.overwrite:
            log.info("sub-%s %s: preprocessed image up to date, skipped", self.label, record.path.name)
            stored: Any = nib.load(path)  # read once for every mode and the report, not once per use
            image = nib.Nifti1Image(np.asarray(stored.dataobj, dtype=np.float32), stored.affine, stored.header)
            self._remember_transform(record)
            self._warn_failed_qc(record, existing.get("QC", {}))
            self.report_entries.append((record, image, existing.get("QC", {})))
            if existing.get("SourceSpace"):
                provenance["SourceSpace"] = existing["SourceSpace"]
            return image, {**provenance, "Source": path, "SourceSHA256": existing["SHA256"]}, True

        placement = None
        if record.preprocessed:
            image, qc, placement = self._place_preprocessed(record)
            provenance["SourceSpace"] = placement.source_space
        elif record.suffix == "pet":
            image, qc = self._run_pet(record)
        elif record.suffix in CONTRASTS:
            image, qc = self._run_contrast(record)
        else:
            from bids_app.preprocess.t1_linear import run_t1_linear

            result = run_t1_linear(record.path, cfg.preprocess, self.work_dir, omp_nthreads=cfg.omp_nthreads)
            image, qc = result.image, result.qc
            xfm = transform_path(out, self.label, record.session_label, self.space)
            with atomic_path(xfm) as tmp:
                shutil.copyfile(result.transform_path, tmp)
            self._remember_transform(record)

        sha = atomic_write_nifti(path, image)
        qc_record = {
            "Participant": self.label,
            "Session": record.session_label,
            "Image": record.path.name,
            **qc,
        }
        atomic_write_json(qc_path(out, self.label, record.session_label, record.suffix, extra), qc_record)
        atomic_write_json(sidecar_path(path), self._preproc_sidecar(record, pre_hash, sha, qc, placement))
        self._warn_failed_qc(record, qc)
        self.report_entries.append((record, image, qc))
        return image, {**provenance, "Source": path, "SourceSHA256": sha}, False

    def _warn_failed_qc(self, record: ImageRecord, qc: dict[str, Any]) -> None:
        """One WARNING line for an image that fails the QC rule: it is processed, but its registration is suspect."""
        from bids_app.preprocess.qc import qc_passes, qc_rule

        if qc_passes(qc, record.suffix):
            return
        key, threshold = qc_rule(record.suffix)
        log.warning(
            "sub-%s%s %s: QC failed: %s = %s (rule for %s: %s >= %g). The image is processed; check its "
            "registration in %s; the group level leaves it out with --exclude-failed-qc.",
            self.label,
            f" ses-{record.session_label}" if record.session_label else "",
            record.path.name,
            key,
            qc.get(key, "missing"),
            record.suffix,
            key,
            threshold,
            report_path(self.cfg.output_dir, self.label),
        )

    def _preprocess_hash(self, record: ImageRecord, raw_sha: str) -> str:
        """What the preprocessed image depends on: the input's bytes and the settings that act on its kind."""
        settings = dataclasses.asdict(self.cfg.preprocess)
        for unrelated in ("derivatives_dirs", "pet_tracers", "contrasts", "custom_maps"):  # which inputs, not how
            settings.pop(unrelated)
        if record.suffix != "pet":
            settings.pop("suvr_reference_mask")
        inputs = {"preprocess": settings, "input_sha256": raw_sha, "preprocessed": record.preprocessed}
        if record.suffix in CONTRASTS and record.session_label in self.t1_transforms:
            # registered through the session's T1w: another T1w gives another image
            inputs["t1w_sha256"] = file_sha256(self.t1_transforms[record.session_label][0])
        return config_hash(inputs)

    def _preproc_sidecar(
        self, record: ImageRecord, pre_hash: str, sha: str, qc: dict[str, Any], placement: Any = None
    ) -> dict[str, Any]:
        from bids_app.preprocess.anat_linear import DESCRIPTIONS as CONTRAST_DESCRIPTIONS

        cfg = self.cfg
        contrast = record.suffix in CONTRASTS
        sidecar: dict[str, Any] = {
            "SkullStripped": False,  # t1-linear does not remove the skull
            "Description": CONTRAST_DESCRIPTIONS[record.suffix]
            if contrast
            else DESCRIPTIONS[record.suffix == "pet", record.preprocessed],
        }
        source = bids_uri(cfg.bids_dir, record.path)
        if source:
            sidecar["Sources"] = [source]
        else:
            sidecar["InputFile"] = str(record.path)
        if contrast:  # the T1w it was registered through, and that T1w's transform to the template
            t1w, xfm = self.t1_transforms[record.session_label]
            t1w_source = bids_uri(cfg.bids_dir, t1w) or str(t1w)
            sidecar["RegisteredThroughT1w"] = t1w_source
            sidecar["T1wToTemplateTransform"] = xfm.relative_to(cfg.output_dir).as_posix()
            if source:
                sidecar["Sources"].append(t1w_source)
        if self.space not in STANDARD_SPACES:
            template = cfg.preprocess.template_path
            sidecar["SpatialReference"] = template.resolve().as_uri() if template else self.space
        if record.suffix == "pet":
            sidecar["Units"] = "SUVR"
        if record.custom:
            sidecar["Description"] = CUSTOM_MAP_DESCRIPTION
            sidecar.pop("SkullStripped")  # says nothing about a map
        if placement is not None:  # SourceSpace, SourceGrid, Resampling
            sidecar.update(placement.to_sidecar())
        sidecar.update(
            {
                "QC": qc,
                "ConfigHash": pre_hash,
                "SHA256": sha,
                "BidsAppVersion": read_version(),
                "Complete": True,
            }
        )
        return sidecar

    def _remember_transform(self, record: ImageRecord) -> None:
        if record.suffix == "T1w" and not record.preprocessed:
            xfm = transform_path(self.cfg.output_dir, self.label, record.session_label, self.space)
            self.t1_transforms[record.session_label] = (record.path, xfm)

    @property
    def grid(self) -> Any:
        """The cropped template grid preprocessed inputs are placed on (``TemplateGrid``), built on first use and
        kept per process with the template crop it belongs to (0.1 s at 1 mm: once, not once per participant)."""
        if self._grid is None:
            grid = _TEMPLATE_GRIDS.get(self.template_crop)
            if grid is None or grid.space != self.space:
                from bids_app.preprocess.template_space import TemplateGrid

                grid = TemplateGrid.of(self.template_crop, self.space, self.qc_reference.mask)
                _TEMPLATE_GRIDS[self.template_crop] = grid
            self._grid = grid
        return self._grid

    def _place_preprocessed(self, record: ImageRecord) -> tuple[Any, dict[str, float], Any]:
        """An image already in a template space (CAPS, BIDS derivative, ``--custom-map``) on the template grid by
        its world coordinates (``preprocess.template_space``), PET normalised to SUVR; with its QC and placement.

        Raises:
            DataError: its space or affine does not fit the template (the message names the fix).
        """
        from bids_app.participant.report import input_panels
        from bids_app.preprocess.nifti_checks import load_checked_nifti
        from bids_app.preprocess.pet_linear import load_preprocessed_pet
        from bids_app.preprocess.qc import compute_qc
        from bids_app.preprocess.template_space import space_error, to_template_grid

        space = record.entities.get("space")
        if record.suffix == "pet":
            loaded = load_preprocessed_pet(record.path, space, self.grid, self.template, self.cfg.preprocess)
            image, qc, placement = loaded.image, loaded.qc, loaded.placement
            assert placement is not None  # a preprocessed PET is always placed
        else:
            what = f"Custom map {record.suffix!r}" if record.custom else f"Preprocessed {record.suffix}"
            filter_kind = "custom_maps" if record.custom else record.suffix.lower()
            caps = any(
                (root / "subjects").is_dir() and record.path.is_relative_to(root)
                for root in self.cfg.preprocess.derivatives_dirs
            )  # a CAPS ignores --bids-filter-file: the fix offered differs
            error = space_error(record.path, space, self.grid.space, what, filter_kind, caps=caps)  # before reading
            if error is not None:
                raise error
            # messages read "Cannot read preprocessed image …", "custom map 'gm' image … contains NaN …"
            reading = f"custom map {record.suffix!r}" if record.custom else "preprocessed"
            source = load_checked_nifti(record.path, kind=reading)
            image, placement = to_template_grid(source, space, self.grid, record.path, what, filter_kind)
            qc = compute_qc(image, self.template_crop, self.qc_reference)
            self.input_panels[record.path] = input_panels(source)  # the report's input row: no second read
        log.info("sub-%s%s: %s (%s).", self.label, f" ses-{record.session_label}" if record.session_label else "",
                 placement.describe(self.space), record.path.name)  # fmt: skip
        return image, qc, placement

    def _run_pet(self, record: ImageRecord) -> tuple[Any, dict[str, float]]:
        """pet-linear on a raw PET (registered through the session's T1w)."""
        from bids_app.errors import InputMissingError
        from bids_app.preprocess.pet_linear import run_pet_linear

        if record.session_label not in self.t1_transforms:
            raise InputMissingError(
                f"PET {record.path} needs the T1w of sub-{self.label} session {record.session_label} "
                "(pet-linear registers PET to it). Add the T1w or drop --pet-tracer."
            )
        t1w, xfm = self.t1_transforms[record.session_label]
        result = run_pet_linear(
            record.path, t1w, xfm, self.cfg.preprocess, self.work_dir, omp_nthreads=self.cfg.omp_nthreads
        )
        return result.image, result.qc

    def _run_contrast(self, record: ImageRecord) -> tuple[Any, dict[str, float]]:
        """t2-linear / flair-linear on a raw T2w or FLAIR, through the session's T1w."""
        from bids_app.errors import InputMissingError
        from bids_app.preprocess.anat_linear import PIPELINE_NAMES, run_anat_linear

        if record.session_label not in self.t1_transforms:
            raise InputMissingError(
                f"{record.suffix} {record.path} needs the T1w of sub-{self.label} session {record.session_label} "
                f"({PIPELINE_NAMES[record.suffix]} registers it to that T1w). Add the T1w or drop {record.suffix} "
                "from --contrasts."
            )
        t1w, xfm = self.t1_transforms[record.session_label]
        result = run_anat_linear(record.path, record.suffix, t1w, xfm, self.cfg.preprocess, self.work_dir,
                                 omp_nthreads=self.cfg.omp_nthreads)  # fmt: skip
        return result.image, result.qc

    # -- extraction ------------------------------------------------------------------------------------
    def _roi(self, image: Any) -> dict[str, Any]:
        from bids_app.extraction import load_roi_masks

        if self._roi_masks is None:
            self._roi_masks = load_roi_masks(self.cfg.extraction.roi_masks, image)
        return self._roi_masks

    def _extract(self, record: ImageRecord, image: Any, mode: ExtractionMode, provenance: dict[str, Any]) -> bool:
        """Write the tensor of ``mode``; True when an up-to-date one was re-used."""
        import numpy as np

        from bids_app.extraction import extract_tensor, mode_parameters, normalize_volume, write_tensor

        cfg = self.cfg.extraction
        roi_masks = self._roi(image) if mode is ExtractionMode.ROI else None
        params = mode_parameters(mode, cfg, tuple(roi_masks or ()))
        tensor_hash = config_hash(
            {
                "preproc": provenance["PreprocHash"],
                "mode": mode.value,
                "params": params,
                "normalization": cfg.normalization.value,
                "dtype": cfg.dtype.value,
                # a custom map's filters: the same file selected as another map is another tensor
                **({"custom_map": custom_map_sidecar(self.cfg, record.suffix, None)} if record.custom else {}),
            }
        )
        path = tensor_path(
            self.cfg.output_dir,
            self.label,
            record.session_label,
            self.space,
            mode.value,
            record.suffix,
            self._extra_entities(record),
        )
        existing = read_complete_sidecar(path)
        if existing and existing.get("ConfigHash") == tensor_hash and not self.cfg.overwrite:
            return True
        if self._normalized is None or self._normalized[0] is not image:  # once per image, for all its modes
            volume = normalize_volume(
                np.asarray(image.dataobj, dtype=np.float32), cfg.normalization, source=str(provenance["Source"])
            )
            self._normalized = (image, volume)
        volume = self._normalized[1]
        array = extract_tensor(volume, mode, cfg, roi_masks, affine=image.affine)
        sidecar = {
            "Mode": mode.value,
            "ModeParameters": params,
            **self._tensor_grid(mode, image),
            "Normalization": cfg.normalization.value,
            "Space": self.space,
            **({"SourceSpace": provenance["SourceSpace"]} if "SourceSpace" in provenance else {}),
            "Source": Path(provenance["Source"]).relative_to(self.cfg.output_dir).as_posix(),
            "SourceSHA256": provenance["SourceSHA256"],
            "RawSource": provenance["RawSource"],
            "RawSourceSHA256": provenance["RawSourceSHA256"],
            "ConfigHash": tensor_hash,
            "BidsAppVersion": read_version(),
            SIDECAR_KEY: self.dataset.to_sidecar(),
            **self.settings_sidecar,
        }
        if mode is not ExtractionMode.ROI:
            sidecar.pop("RoiMasks", None)
        if record.custom:
            sidecar["CustomMap"] = custom_map_sidecar(self.cfg, record.suffix, provenance.get("SourceSpace"))
        write_tensor(path, array, sidecar)
        self._draw_network_input(record, mode, array, sidecar, path, image)
        return False

    def _draw_network_input(
        self, record: ImageRecord, mode: ExtractionMode, array: Any, sidecar: dict[str, Any], path: Path, image: Any
    ) -> None:
        """The report's strip of a tensor just written, drawn now from the array in memory (the same bytes as the
        file): the report then reads no tensor back, and the job keeps a few kB of PNG, not the array."""
        from bids_app.participant.panels import Geometry
        from bids_app.participant.report import network_input_figure

        strip = network_input_figure(mode.value, array, sidecar, path, Geometry.of(image.affine))
        self.network_inputs.setdefault(record.path, {})[mode.value] = strip

    def _tensor_grid(self, mode: ExtractionMode, image: Any) -> dict[str, Any]:
        """Image mode: ``{"Grid": {"Affine": 4x4 voxel-to-template mm, "VoxelSize": [mm] * 3}}`` of the tensor.

        On a coarse grid (``--image-voxel-size``) it differs from the ``Source`` image's; interpretation puts the
        maps back on the ``Source`` grid through it. Other modes cut parts of the ``Source`` grid itself.
        """
        if mode is not ExtractionMode.IMAGE:
            return {}
        from bids_app.extraction import coarse_grid, voxel_sizes

        affine = image.affine
        voxel_size = self.cfg.extraction.image_voxel_size
        if voxel_size is not None:
            _, affine = coarse_grid(image.shape[:3], affine, voxel_size)
        rows = [[round(float(v), 6) for v in row] for row in affine]
        return {"Grid": {"Affine": rows, "VoxelSize": [round(v, 6) for v in voxel_sizes(affine)]}}

    # -- report ----------------------------------------------------------------------------------------
    def write_report(self) -> list[StatusRow]:
        if not self.report_entries:
            return []
        from bids_app.participant.report import ReportEntry, write_participant_report

        start = time.perf_counter()
        out = self.cfg.output_dir
        entries = [
            ReportEntry(
                r.session_label, r.suffix, img, self.template_crop, qc, self._extra_entities(r), raw_path=r.path,
                tensor_paths={
                    m.value: tensor_path(out, self.label, r.session_label, self.space, m.value, r.suffix,
                                         self._extra_entities(r))
                    for m in self.cfg.extraction.modes
                },
                network_inputs=self.network_inputs.get(r.path, {}), input_panels=self.input_panels.get(r.path, ()),
            )
            for r, img, qc in self.report_entries
        ]  # fmt: skip
        try:
            write_participant_report(report_path(self.cfg.output_dir, self.label), self.label, entries)
        except OSError as exc:
            return [StatusRow(self.label, None, "", "report", Outcome.FAILED, str(exc))]
        return [StatusRow(self.label, None, "", "report", Outcome.OK, "", time.perf_counter() - start)]


_TEMPLATE_SETS: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}  # one entry: the last template this process used


def prepare_worker(preprocess: Any) -> None:
    """Load in this worker process what every participant job needs (the modules, the template, its crop, the QC
    reference), while the parent still validates and indexes the inputs (submitted first to each worker)."""
    import bids_app.extraction
    import bids_app.participant.report
    import bids_app.preprocess.template_space  # noqa: F401

    _load_template_set(preprocess)


def _load_template_set(preprocess: Any, qc: bool = True) -> tuple[Any, Any, Any]:
    """The template, its crop and the QC reference of the crop (None with ``qc=False`` until a caller asks for
    it: the parent of worker processes needs only the crop's shape), loaded once per process.

    A worker process runs many participant jobs with one template: reading and decompressing it, finding its
    brain and smoothing it for QC once per job cost about 0.3 s (0.15 s per image with two sessions). The key is
    the template file's path, size and modification time and the crop shape, so a changed file is read again.
    """
    from bids_app.preprocess.qc import QcReference
    from bids_app.preprocess.t1_linear import crop_box, crop_image, load_template
    from bids_app.template import default_template_path

    template_path = Path(preprocess.template_path or default_template_path()).resolve()
    stat = template_path.stat() if template_path.exists() else None
    key = (template_path, stat and stat.st_size, stat and stat.st_mtime_ns, preprocess.crop_shape)
    if key not in _TEMPLATE_SETS:
        template = load_template(preprocess)
        template_crop = crop_image(template, crop_box(template, preprocess.crop_shape))
        _TEMPLATE_SETS.clear()
        _TEMPLATE_SETS[key] = (template, template_crop, None)
    template, template_crop, reference = _TEMPLATE_SETS[key]
    if reference is None and qc:
        reference = QcReference.of(template_crop)
        _TEMPLATE_SETS[key] = (template, template_crop, reference)
    return template, template_crop, reference


def process_participant(cfg: RunConfig, label: str, records: list[ImageRecord]) -> list[StatusRow]:
    """All images of one participant: preprocess, QC, extract, report. Never raises for bad data."""
    start = time.perf_counter()
    if not records:
        log.error("sub-%s: no T1w image with the active filters in %s; check the dataset or --bids-filter-file.",
                  label, cfg.bids_dir)  # fmt: skip
        return [
            StatusRow(
                label,
                None,
                "",
                "participant",
                Outcome.FAILED,
                f"No T1w image for participant {label} in {cfg.bids_dir} with the active filters.",
            )
        ]
    missing = report_missing_contrasts(cfg, label, records)
    work_root = cfg.work_dir or Path(tempfile.gettempdir())
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"bids_app_sub-{label}_", dir=work_root) as tmp:
        job = ParticipantJob(cfg, label, Path(tmp))
        rows: list[StatusRow] = list(missing)
        # T1w first: PET, T2w and FLAIR need the session's T1w transform.
        for record in sorted(records, key=lambda r: (r.suffix != "T1w", r.session_label or "")):
            try:
                rows += job.process_image(record)
            except (IOFailure, OutputError):
                raise  # the output itself is failing (disk full, unwritable): every participant would fail alike
            except BidsAppError as exc:
                log.error("sub-%s %s: %s", label, record.path.name, exc)
                rows.append(
                    StatusRow(label, record.session_label, record.path.name, "preprocess", Outcome.FAILED, str(exc))
                )
            except Exception as exc:  # a bug must not stop other participants, but keeps its traceback
                log.error("sub-%s %s: unexpected error\n%s", label, record.path.name, traceback.format_exc())
                rows.append(
                    StatusRow(
                        label,
                        record.session_label,
                        record.path.name,
                        "preprocess",
                        Outcome.FAILED,
                        f"unexpected {type(exc).__name__}: {exc}",
                    )
                )
        rows += job.write_report()
    log.info("sub-%s done in %.1f s", label, time.perf_counter() - start)
    return rows


def report_missing_contrasts(cfg: RunConfig, label: str, records: list[ImageRecord]) -> list[StatusRow]:
    """One WARNING and one ``missing`` status row per session that has its T1w but not a ``--contrasts`` image.

    The T1w (and the session's other images) are processed as usual: a missing contrast is not a failure
    (exit code 0), but it is said, so that a group run stacking that contrast knows why the session is absent.
    """
    from bids_app.inputs.bids_query import describe_raw_query

    sessions = sorted({r.session_label or "" for r in records if r.suffix == "T1w"})
    present = {(r.suffix, r.session_label or "") for r in records}
    rows = []
    for session in sessions:
        for contrast in cfg.preprocess.contrasts:
            if (contrast, session) in present:
                continue
            where = describe_raw_query(cfg, contrast.lower())
            log.warning("No %s for sub-%s%s: looked for %s in %s. Its T1w is processed without it; a group run "
                        "with --channels %s leaves the session out.", contrast, label,
                        f" ses-{session}" if session else "", where, cfg.bids_dir, contrast)  # fmt: skip
            message = f"no {contrast}: looked for {where} in {cfg.bids_dir}"
            rows.append(StatusRow(label, session or None, "", f"preprocess-{contrast}", Outcome.MISSING, message))
    return rows
