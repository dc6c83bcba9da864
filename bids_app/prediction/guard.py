"""The travelling leak guard: made from a model's training pool at export, checked at a receiving site.

``make_guard`` turns the training/validation images of a model folder into plain tables
(``portable.TravellingGuard``): ids, dataset ids and checksums, and, unless left out, the anatomical
fingerprints of ``prediction.identity`` with the pool's mask, mean and calibration. ``run_predict_imported``
is the prediction stage for a model imported from an archive: the new site's images are checked against those
tables (participant ids inside one dataset, preprocessed and raw checksums, fingerprints) exactly as
``--predict-from`` checks another output against a local training pool (``check_imported_group``), then
predicted (``run_predict_imported``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bids_app.config import RunConfig
from bids_app.derivatives import atomic_write_json, sidecar_path
from bids_app.errors import ConfigError, DataError
from bids_app.maps import Maps
from bids_app.portable.guard import IMAGE_COLUMNS, Fingerprints, TravellingGuard
from bids_app.prediction.leakage import (
    LeakFinding,
    check_leaks,
    enforce_no_leak,
    find_label_coincidences,
    training_checksums,
    write_leak_report,
)
from bids_app.prediction.stage import TRAINING_GROUPS, Predictor, write_split_summaries
from bids_app.tracking.mlflow import Tracker

if TYPE_CHECKING:
    from bids_app.data.tables import GroupTable
    from bids_app.portable import ImportedModel

log = logging.getLogger(__name__)

NO_FINGERPRINTS = "left out by the exporter (bids_app-model export --no-fingerprints)"
FEW_PARTICIPANTS = "the training pool has fewer than two participants with preprocessed images"


def make_guard(maps: Maps, *, with_fingerprints: bool = True) -> tuple[TravellingGuard, dict[str, Any]]:
    """The leak guard of ``maps``' training pool, from the output it was trained on, and one tensor's sidecar.

    Args:
        maps: the model folder; its record's ``output_dir`` holds the pool's tensors and preprocessed images.
        with_fingerprints: False leaves the fingerprints out (``--no-fingerprints``).

    Returns:
        The guard, and the sidecar of one training tensor (for the model card's input section; empty when none
        is left).
    """
    import pandas as pd

    from bids_app.data.cohorts import list_cohorts
    from bids_app.data.tables import index_tensors
    from bids_app.labels import COHORT, image_keys, subject_ids
    from bids_app.prediction import identity

    output_dir = Path(maps.record.config.output_dir)
    cohorts = list_cohorts(maps.record.config)
    if cohorts:  # a multi-cohort model: every cohort's output holds part of the pool
        indexes = [index_tensors(cohort.output_dir, maps.record.mode, maps.record.kinds) for cohort in cohorts]
        for cohort, index in zip(cohorts, indexes, strict=True):
            index.insert(0, COHORT, cohort.name)
        tensors = pd.concat(indexes, ignore_index=True)
    else:
        tensors = index_tensors(output_dir, maps.record.mode, maps.record.kinds)
    pool = training_checksums(maps, tensors)
    columns = [c for c in (COHORT, *IMAGE_COLUMNS, "dataset_name", "dataset_doi", "dataset_id") if c in pool]
    images = pool[columns].astype(str).reset_index(drop=True)
    keys = [c for c in image_keys(images) if c in tensors.columns]
    located = images[keys].merge(tensors[[*keys, "tensor_path"]].astype(str), on=keys, how="inner")
    sidecar: dict[str, Any] = {}
    if len(located):
        try:
            sidecar = json.loads(sidecar_path(Path(located["tensor_path"].iloc[0])).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            sidecar = {}
    if not with_fingerprints:
        return TravellingGuard(images, None, NO_FINGERPRINTS), sidecar
    paths = [identity.preprocessed_image_path(Path(p)) for p in located["tensor_path"]]
    kept = located[[p is not None for p in paths]].reset_index(drop=True)
    if len(kept) < len(images):
        log.warning("%d training/validation image(s) have no preprocessed image left in %s: not fingerprinted, so "
                    "the receiving site cannot recognise their re-scans.", len(images) - len(kept),
                    output_dir)  # fmt: skip
    people = subject_ids(kept)  # <cohort>/<participant> in a multi-cohort pool: one label may name two people
    if people.nunique() < 2:
        return TravellingGuard(images, None, FEW_PARTICIPANTS), sidecar
    volumes = np.stack([identity.lowres_volume(p) for p in paths if p is not None])
    model = identity.fit_model(volumes)
    calibration = identity.calibrate(identity.features(volumes, model), people.tolist(), kept["session_id"].tolist())
    assert calibration is not None  # two participants or more
    fingerprints = Fingerprints(
        mask=model.mask,
        mean=model.mean,
        prints=identity.fingerprints(volumes, model),
        ids=tuple(zip(people, kept["session_id"], strict=True)),
        calibration=dataclasses.asdict(calibration),
        fingerprint_mm=identity.FINGERPRINT_MM,
        high_pass_mm=identity.HIGH_PASS_MM,
    )
    log.info("Leak guard: %d image(s) by checksum, %d fingerprinted (threshold %.3f).", len(images),
             len(kept), calibration.threshold)  # fmt: skip
    return TravellingGuard(images, fingerprints), sidecar


def check_fingerprints(guard: TravellingGuard, table: GroupTable, group_name: str) -> list[LeakFinding]:
    """Images of ``table`` whose fingerprint is more alike a training image's than the guard's threshold.

    Returns:
        One ``fingerprint`` finding per pair above the threshold, most alike first; none (with a warning that the
        identity check was not possible) when the guard has no fingerprints.

    Raises:
        DataError: the images were preprocessed on another grid than the training pool's.
    """
    from bids_app.prediction import identity

    fp = guard.fingerprints
    if fp is None:
        log.warning("Identity check not possible for group '%s': the model carries no anatomical fingerprints (%s). "
                    "A re-scan of a training participant under a new name cannot be detected; only ids and file "
                    "checksums were checked.", group_name, guard.absent_reason)  # fmt: skip
        return []
    if fp.fingerprint_mm != identity.FINGERPRINT_MM or fp.high_pass_mm != identity.HIGH_PASS_MM:
        raise DataError(
            f"The model's fingerprints were made at {fp.fingerprint_mm} mm (high-pass {fp.high_pass_mm} mm), this "
            f"bids_app makes them at {identity.FINGERPRINT_MM} mm ({identity.HIGH_PASS_MM} mm): they cannot be "
            "compared. Predict with the bids_app version that exported the model."
        )
    paths = [identity.preprocessed_image_path(Path(p)) for p in table["tensor_path"]]
    group = table[[p is not None for p in paths]].reset_index(drop=True)
    if len(group) < len(table):
        log.warning("%d image(s) of group '%s' have no preprocessed image: not fingerprinted.",
                    len(table) - len(group), group_name)  # fmt: skip
    if not len(group):
        return []
    model = identity.FingerprintModel(mask=fp.mask, mean=fp.mean)
    prints = identity.fingerprints(np.stack([identity.lowres_volume(p) for p in paths if p is not None]), model)
    threshold = float(fp.calibration["threshold"])
    findings = []
    for i, j, score in identity.matching_pairs(prints, fp.prints, threshold):
        new, (train_participant, train_session) = group.iloc[i], fp.ids[j]
        findings.append(LeakFinding("fingerprint", str(new["participant_id"]), str(new["session_id"]),
                                    train_participant, train_session, "", score))  # fmt: skip
    log.info("Identity check of group '%s' against the model's fingerprints: %d pair(s) above the threshold %.3f.",
             group_name, len(findings), threshold)  # fmt: skip
    return findings


def check_imported_group_name(cfg: RunConfig) -> str:
    """The name of the group ``--model`` predicts (``--group-name``), checked to be usable as a folder name.

    Raises:
        ConfigError: no name, a reserved name, or other characters than letters, digits and '-'.
    """
    name = cfg.predict.group_name or ""
    if not name or name in (*TRAINING_GROUPS, "test") or not name.replace("-", "").isalnum():
        raise ConfigError(
            f"--model needs a --group-name made of letters, digits and '-', other than train, validation and test, "
            f"naming the images of OUTPUT_DIR it predicts (got {name!r})."
        )
    return name


@dataclasses.dataclass(frozen=True)
class GuardedGroup:
    """A new site's group that passed the travelling guard (or is let through with ``--allow-leak``).

    Attributes:
        name: the group's name (``--group-name``).
        identity_findings: the fingerprint pairs found (recorded again with the predictions when allowed).
    """

    name: str
    identity_findings: tuple[LeakFinding, ...]


def check_imported_group(cfg: RunConfig, imported: ImportedModel, table: GroupTable) -> GuardedGroup:
    """The travelling guard's three checks of OUTPUT_DIR's images, before anything is predicted.

    Participant ids (inside one dataset), preprocessed and raw file checksums (any dataset), and anatomical
    fingerprints when the model carries them. Every check and its result go to each model's
    ``<group>/leak_report.json``, whose ``IdentityCheck`` says whether fingerprints were compared.

    Args:
        cfg: the run configuration (``predict.group_name``, ``predict.allow_leak``, ``train.splits``).
        imported: the model (``portable.open_model``).
        table: OUTPUT_DIR's images of the model's mode (``data.tables.external_table``).

    Raises:
        LeakError: an image is, or is a copy or re-scan of, a training image (unless ``allow_leak``).
        ConfigError: no usable ``--group-name``.
    """
    maps, guard = imported.maps, imported.guard
    name = check_imported_group_name(cfg)
    identity = check_fingerprints(guard, table, name)
    coincidences = find_label_coincidences(table, guard.images)
    findings = [*check_leaks(maps, table, guard.images), *identity]
    identity_check = (
        {"Made": True, "Threshold": guard.fingerprints.calibration["threshold"], "NPool": len(guard.fingerprints.ids)}
        if guard.fingerprints is not None
        else {"Made": False, "Reason": f"not possible: the model carries no fingerprints ({guard.absent_reason})"}
    )
    refused = bool(findings) and not cfg.predict.allow_leak
    out_dirs = [
        maps.layout.group_dir(split, metric, name)
        for split in maps.trained_splits(cfg.train.splits)
        for metric in maps.record.config.train.selection_metrics
    ]
    for out_dir in out_dirs:
        report = write_leak_report(out_dir, name, findings, coincidences, table, guard.images, refused=refused)
        content = json.loads(report.read_text(encoding="utf-8"))
        atomic_write_json(report, {**content, "Guard": "travelling (from the model archive)",
                                   "IdentityCheck": identity_check})  # fmt: skip
    if refused:  # with --allow-leak, each model's prediction records the pairs in its leak_warning.json
        enforce_no_leak(findings, name, False, out_dirs[0])
    return GuardedGroup(name, tuple(identity))


def run_predict_imported(
    cfg: RunConfig, imported: ImportedModel, table: GroupTable, group: GuardedGroup, tracker: Tracker | None = None
) -> None:
    """Predict OUTPUT_DIR's images with an imported model, once ``check_imported_group`` passed them.

    No validation group is predicted (its images stay at the training site): multi-part modes use the voting
    weights the archive carries. The linear baseline's predictions of the group, when the model carries a
    baseline and they were made first, are merged beside the network's metrics.

    Args:
        cfg: the run configuration (prediction options, runtime, ``train.splits``, ``train.linear_baseline``).
        imported: the model (``portable.open_model``).
        table: the images ``check_imported_group`` checked.
        group: its result.
        tracker: where each group's metrics are mirrored.
    """
    from bids_app.data.dataset import TensorDataset
    from bids_app.runtime import resolve_device

    tracker = tracker or Tracker()
    maps, guard = imported.maps, imported.guard
    record = maps.record
    predictor = Predictor(maps, cfg.predict, cfg.runtime, guard.images, linear_baseline=cfg.train.linear_baseline)
    device = resolve_device(cfg.runtime.device)
    for split in maps.trained_splits(cfg.train.splits):
        for metric in record.config.train.selection_metrics:
            model = maps.load_model(split, metric, device)
            dataset = TensorDataset(table, record.mode, record.task, label_encoding=record.label_encoding)
            predictor.predict_group(model, split, metric, group.name, table, dataset, group.identity_findings)
            tracker.log_group(split, metric, group.name)
    write_split_summaries(maps, (group.name,))
    tracker.log_prediction_means()
