"""The only place that sequences stages: ``run_participant`` and ``run_group``."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bids_app import read_version
from bids_app.bids_query import (
    ImageRecord,
    check_dataset,
    list_participants,
    query_preprocessed_images,
    query_raw_images,
    select_participants,
)
from bids_app.config import AnalysisLevel, RunConfig
from bids_app.derivatives import init_derivative
from bids_app.errors import BidsAppError, DataError, IOFailure, OutputError
from bids_app.provenance import end_run, start_run
from bids_app.status import Outcome, StatusRow, rebuild_status_table, write_participant_status

log = logging.getLogger(__name__)


def run(cfg: RunConfig, argv: Sequence[str]) -> int:
    """Run the requested analysis level; returns the exit code."""
    if cfg.analysis_level is AnalysisLevel.PARTICIPANT:
        check_dataset(cfg.bids_dir)
        select_participants(cfg.bids_dir, cfg.participant_labels)  # exit 66 before any output is created
    init_derivative(cfg.output_dir, cfg.bids_dir, read_version())
    ctx = start_run(cfg, argv)
    code = 1
    try:
        code = run_participant(cfg) if cfg.analysis_level is AnalysisLevel.PARTICIPANT else run_group(cfg)
    except BidsAppError as exc:
        code = exc.exit_code
        raise
    finally:
        try:
            end_run(ctx, code)
        except OSError as exc:  # never mask the run's own error with a failure to record its end
            log.warning("Could not record the end of run %s: %s", ctx.run_id, exc)
    return code


def run_participant(cfg: RunConfig) -> int:
    """Preprocess and extract every requested participant; failures of one never stop the others."""
    from tqdm import tqdm

    from bids_app.participant import check_extraction
    from bids_app.validation import validate_input

    participants = select_participants(cfg.bids_dir, cfg.participant_labels)
    check_extraction(cfg)
    if not cfg.skip_bids_validation:
        validate_input(cfg.bids_dir, participants, list_participants(cfg.bids_dir))
    if cfg.preprocess.derivatives_dirs:
        records = query_preprocessed_images(cfg, participants)
    else:
        records = query_raw_images(cfg, participants, "t1w")
    if cfg.preprocess.pet_tracers and cfg.preprocess.derivatives_dirs:
        # template-space PET only: pet-linear on raw PET needs the raw T1w's transform, which -d skips
        records += query_preprocessed_images(cfg, participants, "pet")
    elif cfg.preprocess.pet_tracers:
        records += [
            r
            for r in query_raw_images(cfg, participants, "pet")
            if r.entities.get("tracer") in cfg.preprocess.pet_tracers
        ]
    by_participant: dict[str, list[ImageRecord]] = {p: [] for p in participants}
    for record in records:
        by_participant[record.participant_label].append(record)
    log.info(
        "Participant level: %d participant(s), %d image(s), %d process(es)",
        len(participants),
        len(records),
        cfg.nprocs,
    )

    failures: list[StatusRow] = []
    bar = tqdm(total=len(participants), desc="participants", unit="participant", disable=None)
    if cfg.nprocs <= 1 or len(participants) == 1:
        for label in participants:
            failures += _finish_participant(cfg, label, process_participant(cfg, label, by_participant[label]))
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(
            cfg.nprocs, mp_context=context, initializer=_init_worker, initargs=(cfg.verbose, _log_file())
        ) as pool:
            futures = {pool.submit(process_participant, cfg, p, by_participant[p]): p for p in participants}
            for future in cf.as_completed(futures):
                failures += _finish_participant(cfg, futures[future], future.result())
                bar.update()
    bar.close()
    table = rebuild_status_table(cfg.output_dir)
    if failures:
        log.error("%d stage(s) failed; see %s", len(failures), table)
        return DataError.exit_code
    log.info("Participant level done; status table %s", table)
    return 0


def _finish_participant(cfg: RunConfig, label: str, rows: list[StatusRow]) -> list[StatusRow]:
    write_participant_status(cfg.output_dir, label, rows)
    return [row for row in rows if row.status == Outcome.FAILED]


def _log_file() -> str | None:
    for handler in logging.getLogger("bids_app").handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def _init_worker(verbose: int, log_file: str | None) -> None:
    """Spawned workers get the same console and per-run file logging as the parent."""
    from bids_app.log_setup import attach_log_file, configure_logging

    configure_logging(verbose)
    if log_file:
        attach_log_file(log_file, worker=True)


def process_participant(cfg: RunConfig, label: str, records: list[ImageRecord]) -> list[StatusRow]:
    """All images of one participant: preprocess, QC, extract, report. Never raises for bad data."""
    from bids_app.participant import ParticipantJob

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
    work_root = cfg.work_dir or Path(tempfile.gettempdir())
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"bids_app_sub-{label}_", dir=work_root) as tmp:
        job = ParticipantJob(cfg, label, Path(tmp))
        rows: list[StatusRow] = []
        # T1w first: PET needs the session's T1w transform.
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


def run_group(cfg: RunConfig) -> int:
    """Split, train and predict from the participant-level outputs; never re-reads raw images.

    Under torchrun or srun every rank runs this: all train (DDP); rank 0 alone splits, predicts and interprets.
    """
    from bids_app import distributed

    with distributed.process_group(cfg.train.device):
        return _run_group(cfg)


def _run_group(cfg: RunConfig) -> int:
    from bids_app import distributed, maps, predict, split_files, tracking, train
    from bids_app.config import DEFAULT_GROUP_STAGES, GroupStage
    from bids_app.models import check_compatibility
    from bids_app.tensor_index import index_tensors, sample_shape

    stages = cfg.stages or DEFAULT_GROUP_STAGES
    maps_dir = cfg.output_dir / "models" / cfg.train.model_name
    tensors = index_tensors(cfg.output_dir, cfg.train.mode)
    table = group_table(cfg, tensors, cfg.labels)
    log.info("Group level: %d image(s) of %d participant(s) with labels; stages %s", len(table),
             table["participant_id"].nunique(), ", ".join(s.value for s in stages))  # fmt: skip
    if GroupStage.INTERPRET in stages:  # refuse bad options before the split stage writes anything
        from bids_app.interpret import check_interpret_config

        check_interpret_config(cfg.interpret)
    if GroupStage.TRAIN in stages:
        train.check_train_config(cfg)
        shape = sample_shape(table, cfg.train.mode)
        check_compatibility(cfg.train.architecture, cfg.labels.task, cfg.train.mode, shape)
    split_done = distributed.broadcast_flag((maps_dir / "groups" / "splits.json").is_file())
    new_split = GroupStage.SPLIT in stages and not (cfg.train.resume and split_done)
    if new_split:
        distributed.on_main(refuse_existing_maps, cfg, maps_dir)
    log_file = _log_file()
    run_dir = Path(log_file).parent if log_file else None
    tracker = distributed.on_main(tracking.open_tracker, cfg, maps_dir, run_dir, new_maps=new_split)
    with (tracker or tracking.Tracker()).session() as tracker:
        if new_split:
            with distributed.main_only() as main:
                if main:
                    from bids_app.quality import write_qc_summary

                    write_qc_summary(cfg.output_dir)
                    run_split_stage(cfg, table, tensors, maps_dir / "groups")
        if GroupStage.TRAIN in stages:
            train.run_train_stage(cfg, maps_dir, split_files.read_splits(maps_dir / "groups"), table, tracker)
        with distributed.main_only() as main:
            if main and GroupStage.PREDICT in stages:
                maps.validate_maps(maps_dir)
                predict.run_predict_stage(cfg, maps_dir, table, tracker)
            if main and GroupStage.INTERPRET in stages:
                from bids_app.interpret import run_interpret_stage

                run_interpret_stage(cfg, maps_dir, table)
            predicted = any(maps_dir.glob("split-*/best-*/test/test_image_level_prediction.tsv"))
            if main and (GroupStage.PREDICT in stages or (GroupStage.INTERPRET in stages and predicted)):
                from bids_app.report import write_group_report

                report = write_group_report(cfg.output_dir, maps_dir)
                tracker.log_report(report)
                log.info("Group report: %s", report)
    log.info("Group level done: model folder %s", maps_dir)
    return 0


def run_split_stage(cfg: RunConfig, table: Any, tensors: Any, groups_dir: Path) -> None:
    """Subject-level splits for this model, guarded against transfer-learning leaks."""
    import dataclasses

    from bids_app import split, split_files
    from bids_app.transfer_source import source_training_pool

    source = cfg.train.transfer_from
    source_pool = source_training_pool(source) if source else None
    if cfg.split.split_file is not None:
        splits = split_files.load_split_file(cfg.split.split_file, table)
    elif cfg.split.parent_label:
        # Figure 2 of the ClinicaDL paper: split this (subset) task first, then the parent task with the same
        # participants on the same sides; the parent split is the --split-file of the pre-training model.
        parent_labels = dataclasses.replace(cfg.labels, label=cfg.split.parent_label, classes=())
        parent_table = group_table(cfg, tensors, parent_labels)
        splits, parent = split.make_nested_splits(table, parent_table, cfg.split, cfg.labels.task, cfg.seed)
        parent_file = groups_dir / f"parent-{cfg.split.parent_label}_split.tsv"
        split_files.write_split_file(parent_file, parent)
        log.info("Parent split written to %s: pre-train with --label %s --split-file %s, then fine-tune here "
                 "with --transfer-from.", parent_file, cfg.split.parent_label, parent_file)  # fmt: skip
    else:
        # A transfer source's participants keep their side, so its test set stays unseen here too.
        constraints = split_files.read_splits(source / "groups") if source else None
        splits = split.make_splits(table, cfg.split, cfg.labels.task, cfg.seed, constraints=constraints)
    if source_pool is not None:
        split.check_disjoint(splits.test, source_pool, "the test set and the transfer source's training pool")
    split_files.write_splits(groups_dir, splits, table, cfg.split, extra_seen=source_pool)


def refuse_existing_maps(cfg: RunConfig, maps_dir: Path) -> None:
    """A new split would orphan the models of an earlier one: demand --overwrite or --resume."""
    from bids_app.errors import UsageError

    if (maps_dir / "groups" / "splits.json").is_file() and not cfg.overwrite:
        raise UsageError(
            f"Model folder {maps_dir} already exists. Pass --resume to continue it, --overwrite to redo it, "
            "or choose another --model-name."
        )


def group_table(cfg: RunConfig, tensors: Any, labels_cfg: Any) -> Any:
    """Labels joined with the tensors the participant level produced for the training mode."""
    from bids_app.errors import InputMissingError
    from bids_app.labels import load_labels

    if tensors.empty:
        raise InputMissingError(
            f"No complete {cfg.train.mode.value} tensors in {cfg.output_dir}. Run the participant level first "
            f"with --modes {cfg.train.mode.value}."
        )
    labels = load_labels(cfg.bids_dir, labels_cfg, sessions=tensors[["participant_id", "session_id"]])
    table = labels.merge(tensors, on=["participant_id", "session_id"], how="inner", validate="one_to_one")
    if table.empty:
        raise InputMissingError(
            f"No labelled image: the label table of {cfg.bids_dir} and the tensors of {cfg.output_dir} share no "
            "participant/session. Check --label and the participant-level outputs."
        )
    if cfg.split.exclude_failed_qc:
        from bids_app.quality import failed_images

        failed = failed_images(cfg.output_dir)
        keep = [pair not in failed for pair in zip(table["participant_id"], table["session_id"], strict=True)]
        log.info("Leaving out %d image(s) whose QC failed (--exclude-failed-qc)", len(keep) - sum(keep))
        table = table[keep].reset_index(drop=True)
    return table
