"""The only place that sequences stages: ``run_participant`` and ``run_group``."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bids_app import read_version
from bids_app.config import AnalysisLevel, ExtractionMode, LabelConfig, RunConfig
from bids_app.derivatives import init_derivative
from bids_app.errors import BidsAppError, DataError
from bids_app.inputs.bids_query import (
    ImageRecord,
    check_dataset,
    list_participants,
    query_preprocessed_images,
    query_raw_images,
    select_participants,
)
from bids_app.participant.status import Outcome, StatusRow, rebuild_status_table, write_participant_status
from bids_app.provenance import RunContext, end_run, start_run

if TYPE_CHECKING:
    from bids_app.data.tables import GroupTable, TensorIndex
    from bids_app.maps import MapsLayout

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
        code = run_participant(cfg, ctx) if cfg.analysis_level is AnalysisLevel.PARTICIPANT else run_group(cfg, ctx)
    except BidsAppError as exc:
        code = exc.exit_code
        raise
    finally:
        try:
            end_run(ctx, code)
        except OSError as exc:  # never mask the run's own error with a failure to record its end
            log.warning("Could not record the end of run %s: %s", ctx.run_id, exc)
    return code


def run_participant(cfg: RunConfig, ctx: RunContext) -> int:
    """Preprocess and extract every requested participant; failures of one never stop the others."""
    from tqdm import tqdm

    from bids_app.inputs.bids_validator import validate_input
    from bids_app.participant.job import check_extraction, process_participant

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
            cfg.nprocs, mp_context=context, initializer=_init_worker, initargs=(cfg.verbose, str(ctx.log_file))
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


def _init_worker(verbose: int, log_file: str | None) -> None:
    """Spawned workers get the same console and per-run file logging as the parent."""
    from bids_app.log_setup import attach_log_file, configure_logging

    configure_logging(verbose)
    if log_file:
        attach_log_file(log_file, worker=True)


def run_group(cfg: RunConfig, ctx: RunContext) -> int:
    """Split, train and predict from the participant-level outputs; never re-reads raw images.

    Under torchrun or srun every rank runs this: all train (DDP); rank 0 alone splits, predicts and interprets.
    """
    from bids_app.training import distributed

    with distributed.process_group(cfg.runtime.device):
        return _run_group(cfg, ctx)


def _run_group(cfg: RunConfig, ctx: RunContext) -> int:
    from bids_app.config import DEFAULT_GROUP_STAGES, GroupStage
    from bids_app.data.tables import index_tensors, sample_shape
    from bids_app.maps import Maps, MapsLayout
    from bids_app.models import check_compatibility
    from bids_app.runtime import check_device_name
    from bids_app.tracking import Tracker, open_tracker
    from bids_app.training import distributed
    from bids_app.training.stage import check_train_config, run_train_stage

    stages = cfg.stages or DEFAULT_GROUP_STAGES
    check_device_name(cfg.runtime.device)
    layout = MapsLayout(cfg.output_dir / "models" / cfg.train.model_name)
    training = GroupStage.TRAIN in stages
    maps: Maps | None = None
    if not training and (GroupStage.PREDICT in stages or GroupStage.INTERPRET in stages):
        maps = Maps.open(layout.root)  # the model folder decides mode, task, labels and class order
        if maps.record.mode is not cfg.train.mode:
            log.info("Model %s was trained on %s tensors: predicting %s tensors (the model folder decides, not "
                     "--mode %s).", maps.name, maps.record.mode.value, maps.record.mode.value,
                     cfg.train.mode.value)  # fmt: skip
    mode = maps.record.mode if maps else cfg.train.mode
    labels_cfg = maps.record.config.labels if maps else cfg.labels
    tensors = index_tensors(cfg.output_dir, mode)
    table = group_table(cfg, tensors, labels_cfg, mode)
    log.info("Group level: %d image(s) of %d participant(s) with labels; stages %s", len(table),
             table["participant_id"].nunique(), ", ".join(s.value for s in stages))  # fmt: skip
    if GroupStage.INTERPRET in stages:  # refuse bad options before the split stage writes anything
        from bids_app.interpret.stage import check_interpret_config

        check_interpret_config(cfg.interpret)
    if training:
        check_train_config(cfg)
        check_compatibility(cfg.train.architecture, cfg.labels.task, mode, sample_shape(table, mode))
    split_done = distributed.broadcast_flag(layout.splits_json.is_file())
    new_split = GroupStage.SPLIT in stages and not (cfg.train.resume and split_done)
    if new_split:
        distributed.on_main(refuse_existing_maps, cfg, layout)
    tracker = distributed.on_main(open_tracker, cfg, layout, ctx.log_dir, new_maps=new_split)
    with (tracker or Tracker()).session() as tracker:
        if new_split:
            with distributed.main_only() as main:
                if main:
                    from bids_app.participant.qc_summary import write_qc_summary

                    write_qc_summary(cfg.output_dir)
                    run_split(cfg, table, tensors, layout)
        if training:
            from bids_app.maps.splits import read_splits

            maps = run_train_stage(cfg, layout, read_splits(layout.groups_dir), table, tracker)
        with distributed.main_only() as main:
            if main and maps is not None and training and GroupStage.PREDICT in stages:
                maps.validate()
            if main and maps is not None and GroupStage.PREDICT in stages:
                from bids_app.prediction.stage import run_predict_stage

                run_predict_stage(cfg, maps, table, tracker)
            if main and maps is not None and GroupStage.INTERPRET in stages:
                from bids_app.interpret.stage import run_interpret_stage

                run_interpret_stage(cfg, maps, table)
            reported = GroupStage.PREDICT in stages or (GroupStage.INTERPRET in stages and layout.has_predictions())
            if main and maps is not None and reported:
                from bids_app.reports.group import write_group_report

                report = write_group_report(cfg.output_dir, maps)
                tracker.log_report(report)
                log.info("Group report: %s", report)
    log.info("Group level done: model folder %s", layout.root)
    return 0


def run_split(cfg: RunConfig, table: GroupTable, tensors: TensorIndex, layout: MapsLayout) -> None:
    """The split stage, given what it needs from elsewhere: a parent task's table, a transfer source's split."""
    import dataclasses

    from bids_app.maps import Maps
    from bids_app.split.stage import run_split_stage

    parent_table = None
    if cfg.split.parent_label and cfg.split.split_file is None:
        parent_labels = dataclasses.replace(cfg.labels, label=cfg.split.parent_label, classes=())
        parent_table = group_table(cfg, tensors, parent_labels, cfg.train.mode)
    source = Maps.open(cfg.train.transfer_from) if cfg.train.transfer_from else None
    run_split_stage(cfg, table, layout.groups_dir, parent_table=parent_table, source=source)


def refuse_existing_maps(cfg: RunConfig, layout: MapsLayout) -> None:
    """A new split would orphan the models of an earlier one: demand --overwrite or --resume."""
    from bids_app.errors import UsageError

    if layout.splits_json.is_file() and not cfg.overwrite:
        raise UsageError(
            f"Model folder {layout.root} already exists. Pass --resume to continue it, --overwrite to redo it, "
            "or choose another --model-name."
        )


def group_table(cfg: RunConfig, tensors: TensorIndex, labels_cfg: LabelConfig, mode: ExtractionMode) -> GroupTable:
    """Labels joined with the tensors the participant level produced for ``mode``."""
    from bids_app.errors import InputMissingError
    from bids_app.labels import load_labels

    if tensors.empty:
        raise InputMissingError(
            f"No complete {mode.value} tensors in {cfg.output_dir}. Run the participant level first "
            f"with --modes {mode.value}."
        )
    labels = load_labels(cfg.bids_dir, labels_cfg, sessions=tensors[["participant_id", "session_id"]])
    table = labels.merge(tensors, on=["participant_id", "session_id"], how="inner", validate="one_to_one")
    if table.empty:
        raise InputMissingError(
            f"No labelled image: the label table of {cfg.bids_dir} and the tensors of {cfg.output_dir} share no "
            "participant/session. Check --label and the participant-level outputs."
        )
    if cfg.split.exclude_failed_qc:
        from bids_app.participant.qc_summary import failed_images

        failed = failed_images(cfg.output_dir)
        keep = [pair not in failed for pair in zip(table["participant_id"], table["session_id"], strict=True)]
        log.info("Leaving out %d image(s) whose QC failed (--exclude-failed-qc)", len(keep) - sum(keep))
        table = table[keep].reset_index(drop=True)
    return table
