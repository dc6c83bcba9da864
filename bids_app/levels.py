"""The only place that sequences stages: ``run_participant`` and ``run_group``."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bids_app import read_version
from bids_app.config import AnalysisLevel, ExtractionMode, GroupStage, LabelConfig, RunConfig, Task, TrainConfig
from bids_app.derivatives import check_output_dir, explain_environment_error, init_derivative
from bids_app.errors import BidsAppError, DataError
from bids_app.inputs.bids_query import (
    ImageRecord,
    check_dataset,
    list_participants,
    query_custom_maps,
    query_preprocessed_images,
    query_raw_images,
    select_participants,
    unused_filters,
)
from bids_app.participant.status import Outcome, StatusRow, rebuild_status_table, write_participant_status
from bids_app.provenance import RunContext, end_run, start_run

if TYPE_CHECKING:
    import pandas as pd

    from bids_app.data.tables import GroupTable, TensorIndex
    from bids_app.kinds import ImageKind
    from bids_app.maps import Maps, MapsLayout
    from bids_app.maps.splits import Splits
    from bids_app.tracking import Tracker

log = logging.getLogger(__name__)


def run(cfg: RunConfig, argv: Sequence[str]) -> int:
    """Run the requested analysis level; returns the exit code."""
    # Everything that can be refused without running is refused before the first byte is written.
    if cfg.analysis_level is AnalysisLevel.PARTICIPANT:
        from bids_app.participant.job import check_extraction

        check_dataset(cfg.bids_dir)
        select_participants(cfg.bids_dir, cfg.participant_labels)  # exit 66 before any output is created
        check_extraction(cfg)
    else:
        check_group_run(cfg)
    check_output_dir(cfg.output_dir, cfg.bids_dir)
    init_derivative(cfg.output_dir, cfg.bids_dir, read_version())
    ctx = start_run(cfg, argv)
    code = 1
    try:
        code = run_participant(cfg, ctx) if cfg.analysis_level is AnalysisLevel.PARTICIPANT else run_group(cfg, ctx)
    except BidsAppError as exc:
        code = exc.exit_code
        raise
    except OSError as exc:  # a read-only or full disk under a writer that let the OSError through
        explained = explain_environment_error(exc)
        if explained is None:
            raise
        code = explained.exit_code
        raise explained from exc
    finally:
        try:
            end_run(ctx, code)
        except OSError as exc:  # never mask the run's own error with a failure to record its end
            log.warning("Could not record the end of run %s: %s", ctx.run_id, exc)
    return code


def run_participant(cfg: RunConfig, ctx: RunContext) -> int:
    """Preprocess and extract every requested participant; failures of one never stop the others."""
    from bids_app.participant.job import prepare_worker

    participants = select_participants(cfg.bids_dir, cfg.participant_labels)
    for note in unused_filters(cfg):
        log.warning(note)
    parallel = cfg.nprocs > 1 and len(participants) > 1
    with contextlib.ExitStack() as stack:
        # The workers start now: their imports and template loading overlap the validation and the indexing of
        # the inputs below, instead of following them (issue 16: about 1.5 s of wall time per run).
        pool = stack.enter_context(_worker_pool(cfg, ctx)) if parallel else None
        warmed = [pool.submit(prepare_worker, cfg.preprocess) for _ in range(cfg.nprocs)] if pool else []
        records = _validated_records(cfg, participants)
        return _process_records(cfg, participants, records, pool, warmed)


def _worker_pool(cfg: RunConfig, ctx: RunContext) -> cf.ProcessPoolExecutor:
    """The participant level's worker processes (spawned: no state inherited from the parent)."""
    context = multiprocessing.get_context("spawn")
    return cf.ProcessPoolExecutor(
        cfg.nprocs, mp_context=context, initializer=_init_worker, initargs=(cfg.verbose, str(ctx.log_file))
    )


def _validated_records(cfg: RunConfig, participants: list[str]) -> list[ImageRecord]:
    """The images to process; the BIDS validator (a subprocess) runs while the inputs are indexed, and its refusal
    (exit 16) still comes first and before anything is processed."""
    from bids_app.inputs.bids_validator import validate_input

    with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bids-validator") as side:
        validated = None
        if not cfg.skip_bids_validation:
            validated = side.submit(validate_input, cfg.bids_dir, participants, list_participants(cfg.bids_dir))
        try:
            return _query_records(cfg, participants)
        finally:
            if validated is not None:
                validated.result()  # raises the validator's refusal, before any error of the query


def _query_records(cfg: RunConfig, participants: list[str]) -> list[ImageRecord]:
    """Every image the participant level processes for ``participants``, in the order of the kinds."""
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
    for contrast in cfg.preprocess.contrasts:  # raw only (config refuses --contrasts with -d)
        records += query_raw_images(cfg, participants, contrast.lower())
    if cfg.preprocess.custom_maps:  # template-space maps of the -d folders (config refuses them without -d)
        records += query_custom_maps(cfg, participants)
    return records


def _process_records(
    cfg: RunConfig,
    participants: list[str],
    records: list[ImageRecord],
    pool: cf.ProcessPoolExecutor | None,
    warmed: list[cf.Future[None]],
) -> int:
    """Run every participant's job (in ``pool`` when given) and write the status tables; returns the exit code."""
    from tqdm import tqdm

    from bids_app.participant.job import process_participant

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
    if pool is None:
        for label in participants:
            failures += _finish_participant(cfg, label, process_participant(cfg, label, by_participant[label]))
            bar.update()
    else:
        futures = {pool.submit(process_participant, cfg, p, by_participant[p]): p for p in participants}
        for future in cf.as_completed(futures):
            failures += _finish_participant(cfg, futures[future], future.result())
            bar.update()
        for warm in warmed:
            warm.result()  # a worker that could not prepare failed its participants too; this says why
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
    from bids_app.data.origin import check_same_settings, read_settings, with_participant_settings
    from bids_app.data.tables import check_kinds_present, index_channels, index_tensors, sample_shape, verify_tensors
    from bids_app.kinds import parse_kind
    from bids_app.labels import subject_ids
    from bids_app.maps import Maps
    from bids_app.models import check_compatibility
    from bids_app.training import distributed

    if cfg.predict.model is not None:
        return run_imported_model(cfg, ctx)
    stages = cfg.stages or DEFAULT_GROUP_STAGES
    final = model_layout(cfg)
    training = GroupStage.TRAIN in stages
    maps: Maps | None = None
    if not training and {GroupStage.BASELINE, GroupStage.PREDICT, GroupStage.INTERPRET} & set(stages):
        maps = Maps.open(final.root)  # the model folder decides mode, task, labels and class order
        if maps.record.mode is not cfg.train.mode:
            log.info("Model %s was trained on %s tensors: predicting %s tensors (the model folder decides, not "
                     "--mode %s).", maps.name, maps.record.mode.value, maps.record.mode.value,
                     cfg.train.mode.value)  # fmt: skip
    mode = maps.record.mode if maps else cfg.train.mode
    labels_cfg = maps.record.config.labels if maps else cfg.labels
    # the image kinds stacked as channels: the model's when it is not trained here (a record without: T1w)
    kinds = maps.record.kinds if maps else tuple(parse_kind(name) for name in cfg.train.channels)
    if maps is not None and tuple(cfg.train.channels) != tuple(kind.name for kind in kinds):
        given = tuple(cfg.train.channels) != TrainConfig().channels  # the default (T1w) is most likely not typed
        log.log(logging.WARNING if given else logging.INFO, "Model %s reads the channels %s: those are used, not "
                "--channels %s (the model folder decides).", maps.name, ", ".join(k.name for k in kinds),
                " ".join(cfg.train.channels))  # fmt: skip
    split_done = distributed.broadcast_flag(final.splits_json.is_file())
    new_split = GroupStage.SPLIT in stages and not (cfg.train.resume and split_done)
    if cfg.cohorts:
        tensors, table, excluded = cohort_tables(cfg, mode, labels_cfg, kinds)
    else:
        kept_split = final if split_done and not new_split else None
        index = index_channels(cfg.output_dir, mode, kinds)
        tensors, excluded = select_images(cfg, index.tensors, kept_split), select_excluded(cfg, index.excluded)
        table = group_table(cfg, tensors, labels_cfg, mode, kinds, excluded=excluded)
    log.info("Group level: %d image(s) of %d participant(s) with labels; stages %s", len(table),
             subject_ids(table).nunique(), ", ".join(s.value for s in stages))  # fmt: skip
    settings = read_settings(table)  # what the participant level really did, from the tensors' sidecars
    if training:
        cfg = with_participant_settings(cfg, settings)
        distributed.on_main(record_config, ctx, cfg)
        check_compatibility(cfg.train.architecture, cfg.labels.task, mode, sample_shape(table, mode))
        if cfg.labels.positive_class is not None and cfg.labels.task is Task.CLASSIFICATION:
            from bids_app.metrics import positive_class_index

            positive_class_index(sorted(set(table["label"].astype(str))), cfg.labels.positive_class)
    elif maps is not None:
        check_same_settings(maps.participant_settings, settings, cfg.output_dir, maps.root)
        maps.check_input_shape(sample_shape(table, mode), cfg.output_dir)
        maps.check_tensors_unchanged(table, cfg.output_dir)
    if cfg.predict.predict_from is not None and GroupStage.PREDICT in stages:
        # before any stage reads them: tensors made otherwise than the model's are refused by name, not by shape
        reference = settings if training else maps.participant_settings if maps is not None else []
        other_index = index_tensors(cfg.predict.predict_from, mode, kinds)
        if other_index.empty:  # a kind of the model's channels missing there: refused before anything is written
            check_kinds_present(cfg.predict.predict_from, mode, kinds, model=final.name)
        other = read_settings(other_index)
        check_same_settings(reference, other, cfg.predict.predict_from, final.root)
    if training or {GroupStage.BASELINE, GroupStage.PREDICT, GroupStage.INTERPRET} & set(stages):
        # every tensor read from here on is the one its sidecar vouches for (rank 0 reads them once for all)
        distributed.on_main(verify_tensors, table)
    if cfg.train.resume and split_done and cfg.split.split_file is not None:
        check_resumed_split(cfg, table, final)
    # --overwrite builds the new model beside the old one, which stays whole until the new one is complete.
    staged = cfg.overwrite and (new_split or training) and final.root.exists()
    layout = staging_layout(final) if staged else final
    if staged:
        distributed.on_main(prepare_staging, layout, final, copy_split=not new_split)
    try:
        _run_group_stages(cfg, ctx, stages, table, tensors, layout, final, maps, new_split=new_split,
                          excluded=excluded)  # fmt: skip
    except BaseException:
        if staged and distributed.is_main():
            import shutil

            shutil.rmtree(layout.root, ignore_errors=True)  # the old model was never touched
            log.info("--overwrite: the run failed; %s is unchanged", final.root)
        raise
    log.info("Group level done: model folder %s", final.root)
    return 0


def _run_group_stages(
    cfg: RunConfig,
    ctx: RunContext,
    stages: Sequence[GroupStage],
    table: GroupTable,
    tensors: TensorIndex,
    layout: MapsLayout,
    final: MapsLayout,
    maps: Maps | None,
    *,
    new_split: bool,
    excluded: pd.DataFrame | None = None,
) -> None:
    """Split, train, predict, interpret and report into ``layout`` (``final`` unless an --overwrite stages it).

    ``excluded``: the sessions left out for lacking one of the channels (``data.tables.index_channels``), which
    a new model's folder lists.
    """
    from bids_app.config import GroupStage
    from bids_app.maps import Maps
    from bids_app.tracking import Tracker, open_tracker
    from bids_app.training import distributed
    from bids_app.training.stage import run_train_stage

    training = GroupStage.TRAIN in stages
    staged = layout.root != final.root
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

            maps = run_train_stage(cfg, layout, read_splits(layout.groups_dir), table, tracker, run=ctx,
                                   excluded=excluded)  # fmt: skip
        with distributed.main_only() as main:
            if main and maps is not None and training and GroupStage.PREDICT in stages:
                maps.validate()
            if main and maps is not None:
                run_baseline(cfg, stages, maps, table, tracker)
            if main and maps is not None and GroupStage.PREDICT in stages:
                from bids_app.errors import LeakError
                from bids_app.prediction.stage import run_predict_stage

                try:
                    run_predict_stage(cfg, maps, table, tracker)
                except LeakError:  # the baseline predicted the refused group first: its files go with the refusal
                    from bids_app.baseline.stage import remove_baseline_group

                    remove_baseline_group(maps, cfg.predict.group_name or "test")
                    raise
            if main and maps is not None and GroupStage.INTERPRET in stages:
                from bids_app.interpret.stage import run_interpret_stage

                run_interpret_stage(cfg, maps, table)
            if main and staged:
                swap_in(layout, final)
                maps = Maps.open(final.root) if maps is not None else None
            reported = GroupStage.PREDICT in stages or (GroupStage.INTERPRET in stages and final.has_predictions())
            if main and maps is not None and reported:
                from bids_app.reports.group import write_group_report

                report = write_group_report(cfg.output_dir, maps, run=ctx)
                tracker.log_report(report)
                log.info("Group report: %s", report)


def run_baseline(cfg: RunConfig, stages: Sequence[GroupStage], maps: Maps, table: GroupTable, tracker: Tracker) -> None:
    """The linear baseline beside the network, after training and before prediction merges its metrics.

    The baseline stage fits it; a predict-only run with ``--predict-from`` predicts the other output's images
    with the baselines the model folder already holds.
    """
    from bids_app.baseline.stage import predict_with_saved_baselines, run_baseline_stage

    fit = GroupStage.BASELINE in stages
    if not (fit or (GroupStage.PREDICT in stages and cfg.predict.predict_from is not None)):
        return
    if not cfg.train.linear_baseline:
        log.info("Linear baseline off (--no-baseline): the metric TSVs carry the network's values only.")
    elif fit:
        run_baseline_stage(cfg, maps, table, tracker)
    else:  # the group the prediction stage reads next (check_group_run: --predict-from comes with predict)
        from bids_app.data.tables import external_table

        assert cfg.predict.predict_from is not None
        record = maps.record
        rows = external_table(cfg.predict.predict_from, record.mode, record.config.labels, record.kinds)
        predict_with_saved_baselines(cfg, maps, str(cfg.predict.group_name), rows, tracker)


def run_imported_model(cfg: RunConfig, ctx: RunContext) -> int:
    """``--model``: predict OUTPUT_DIR's images with a portable model made elsewhere (docs/portable.md).

    An archive, or an imported folder outside OUTPUT_DIR, is verified and copied into ``OUTPUT_DIR/models/<its
    name>`` (once; a folder inside OUTPUT_DIR is checked against its manifest and used in place), the images of
    the model's mode are indexed and labelled where BIDS_DIR has the model's label,
    checked to have its sample shape and participant-level settings (``data.origin.check_same_settings``), and
    predicted after the travelling leak guard's checks.
    """
    from bids_app.data.origin import check_same_settings, read_settings
    from bids_app.data.tables import external_table, sample_shape, verify_tensors
    from bids_app.portable import open_model
    from bids_app.prediction.guard import check_imported_group, run_predict_imported
    from bids_app.tracking import open_tracker

    assert cfg.predict.model is not None
    imported = open_model(cfg.predict.model, cfg.output_dir / "models")
    maps = imported.maps
    log.info("Predicting with imported model %s (%s, %s on %s tensors).", maps.name, maps.record.architecture,
             maps.record.task.value, maps.record.mode.value)  # fmt: skip
    log.info("Model %s reads channel(s) %s.", maps.name, ", ".join(k.name for k in maps.record.kinds))
    rows = external_table(cfg.output_dir, maps.record.mode, maps.record.config.labels, maps.record.kinds)
    table = select_images(cfg, rows, None)
    maps.check_input_shape(sample_shape(table, maps.record.mode), cfg.output_dir)
    check_same_settings(maps.participant_settings, read_settings(table), cfg.output_dir, maps.root)
    verify_tensors(table)
    group = check_imported_group(cfg, imported, table)  # the travelling guard, before any prediction is written
    with open_tracker(cfg, maps.layout, ctx.log_dir, new_maps=False).session() as tracker:
        if cfg.train.linear_baseline:  # the baseline the archive carries, on the very images the guard checked
            from bids_app.baseline.stage import predict_with_saved_baselines

            predict_with_saved_baselines(cfg, maps, group.name, table, tracker)
        run_predict_imported(cfg, imported, table, group, tracker)
    log.info("Group level done: predictions in %s", maps.root)
    return 0


def check_model_run(cfg: RunConfig, stages: Sequence[GroupStage]) -> None:
    """Refuse ``--model`` options that cannot go together, before anything is written.

    Raises:
        UsageError: stages other than predict, or options of a local model (--predict-from, --transfer-from,
            --split-file, --cohort, --cohort-name, --leave-cohort-out, --resume, --overwrite).
        ConfigError: no usable --group-name.
        InputMissingError: the archive or folder does not exist.
    """
    from bids_app.errors import InputMissingError, UsageError
    from bids_app.prediction.guard import check_imported_group_name

    assert cfg.predict.model is not None
    if cfg.stages and tuple(stages) != (GroupStage.PREDICT,):
        raise UsageError(
            f"--model predicts with a model trained elsewhere: --stages {' '.join(s.value for s in stages)} is not "
            "possible with it. Drop --stages (or pass --stages predict)."
        )
    for given, option in (  # each would be dropped silently: the imported model decides, OUTPUT_DIR is predicted
        (cfg.predict.predict_from is not None, "--predict-from"),
        (cfg.train.transfer_from is not None, "--transfer-from"),
        (cfg.split.split_file is not None, "--split-file"),
        (bool(cfg.cohorts), "--cohort"),
        (cfg.cohort_name is not None, "--cohort-name"),
        (cfg.split.leave_cohort_out is not None, "--leave-cohort-out"),
        (cfg.train.resume, "--resume"),
        (cfg.overwrite, "--overwrite"),
    ):
        if given:
            raise UsageError(f"{option} cannot go with --model, which predicts OUTPUT_DIR's images. Drop {option}.")
    check_imported_group_name(cfg)
    if not cfg.predict.model.exists():
        raise InputMissingError(f"--model {cfg.predict.model} does not exist. Check the path.")


def record_config(ctx: RunContext, cfg: RunConfig) -> None:
    """Rewrite the run's ``config.toml`` with the participant-level settings its tensors were made with.

    ``start_run`` wrote the group run's options, whose participant-level sections are defaults it never used;
    the record must describe the data the model is trained on (``data.origin.with_participant_settings``).
    """
    from bids_app.config_file import dump_config
    from bids_app.derivatives import atomic_write_text

    atomic_write_text(ctx.log_dir / "config.toml", dump_config(cfg))


def model_layout(cfg: RunConfig) -> MapsLayout:
    """The layout of the model folder this run names (``OUTPUT_DIR/models/<model_name>``)."""
    from bids_app.maps import MapsLayout

    return MapsLayout(cfg.output_dir / "models" / cfg.train.model_name)


def staging_layout(final: MapsLayout) -> MapsLayout:
    """Where an ``--overwrite`` run builds its model: a hidden sibling, swapped in once complete."""
    from bids_app.maps import MapsLayout

    return MapsLayout(final.root.parent / f".{final.root.name}.partial", home=final.root)


def prepare_staging(layout: MapsLayout, final: MapsLayout, *, copy_split: bool) -> None:
    """An empty staging folder (a killed run's leftover removed), with the model's split when it is kept."""
    import shutil

    shutil.rmtree(layout.root, ignore_errors=True)
    layout.root.mkdir(parents=True)
    if copy_split:
        shutil.copytree(final.groups_dir, layout.groups_dir)
    log.info("--overwrite: building the new model in %s; %s stays whole until it is complete", layout.root,
             final.root)  # fmt: skip


def swap_in(layout: MapsLayout, final: MapsLayout) -> None:
    """Replace the old model folder by the completed new one (two renames; the old one is then deleted)."""
    import shutil

    old = final.root.parent / f".{final.root.name}.replaced"
    shutil.rmtree(old, ignore_errors=True)
    final.root.rename(old)
    layout.root.rename(final.root)
    shutil.rmtree(old, ignore_errors=True)
    log.info("--overwrite: %s replaced by the new model", final.root)


def check_group_run(cfg: RunConfig) -> None:
    """Refuse the group run's options before anything is written (exit 64/66 naming the option).

    Covers the training, interpretation and prediction options, the device, the paths the run reads, and a
    model folder this run would replace without ``--overwrite``.
    """
    from bids_app.config import DEFAULT_GROUP_STAGES, GroupStage
    from bids_app.errors import InputMissingError, UsageError
    from bids_app.runtime import check_device_name

    stages = cfg.stages or DEFAULT_GROUP_STAGES
    check_device_name(cfg.runtime.device)
    if cfg.predict.model is not None:
        check_model_run(cfg, stages)
        return
    if cfg.cohorts or cfg.cohort_name or cfg.split.leave_cohort_out:
        check_cohorts(cfg, stages)
    check_model_cohorts(cfg)
    if GroupStage.TRAIN in stages:
        from bids_app.models import check_architecture
        from bids_app.training.stage import check_train_config

        check_train_config(cfg)
        check_architecture(cfg.train.architecture, cfg.labels.task, cfg.train.mode)
    if GroupStage.INTERPRET in stages:
        from bids_app.interpret.stage import check_interpret_config

        check_interpret_config(cfg.interpret)
    if cfg.predict.predict_from is not None:
        from bids_app.prediction.stage import check_group_name

        if GroupStage.BASELINE in stages and GroupStage.PREDICT not in stages:  # predict checks the group first
            raise UsageError(
                f"--stages {' '.join(s.value for s in stages)} would have the baseline predict --predict-from's "
                "group without the predict stage, which checks it for leaks and settings first. Add predict to "
                "--stages or drop --predict-from."
            )
        check_group_name(cfg.predict)
    for path, option in (
        (cfg.predict.predict_from, "--predict-from"),
        (cfg.train.transfer_from, "--transfer-from"),
        (cfg.split.split_file, "--split-file"),
    ):
        if path is not None and not path.exists():
            raise InputMissingError(f"{option} {path} does not exist. Check the path.")
    layout = model_layout(cfg)
    trained = layout.trained_splits() if layout.root.is_dir() else []
    if cfg.overwrite or cfg.train.resume:
        return
    if GroupStage.SPLIT in stages and layout.splits_json.is_file():
        raise UsageError(
            f"Model folder {layout.root} already exists. Pass --resume to continue it, --overwrite to redo it (the "
            "old model stays whole until the new one is complete), or choose another --model-name."
        )
    if GroupStage.TRAIN in stages and trained:
        raise UsageError(
            f"Model folder {layout.root} already holds trained split(s) {trained}: --stages train would replace "
            "them. Pass --overwrite to retrain (the old model stays whole until the new one is complete), --resume "
            "to finish an interrupted training, or choose another --model-name."
        )


def check_cohorts(cfg: RunConfig, stages: Sequence[GroupStage]) -> None:
    """Every cohort's options, folders, tensors and labels, checked before anything is written (docs/cohorts.md).

    Raises:
        UsageError: conflicting cohort options, or two cohorts that are one dataset.
        InputMissingError: a cohort's folder, or its tensors of the mode, are missing.
        DataError: a cohort's labels lack the label column, or one scan is in two cohorts.
        LeakError: one person (same scan, or same anatomy when a split is drawn) in two cohorts.
    """
    from bids_app.config import GroupStage
    from bids_app.data.cohorts import check_cohort_options
    from bids_app.maps import Maps

    check_cohort_options(cfg)
    if not cfg.cohorts:
        return
    from bids_app.kinds import parse_kind

    mode, labels_cfg = cfg.train.mode, cfg.labels
    kinds = tuple(parse_kind(name) for name in cfg.train.channels)
    final = model_layout(cfg)
    if GroupStage.TRAIN not in stages and Maps.exists(final.root):
        record = Maps.read_record(final.root)  # the model decides mode, labels and channels when not trained here
        mode, labels_cfg, kinds = record.mode, record.config.labels, record.kinds
    _, table, _ = cohort_tables(cfg, mode, labels_cfg, kinds)
    if GroupStage.SPLIT in stages:
        _refuse_people_in_two_cohorts(table, allow=cfg.predict.allow_leak)


def check_model_cohorts(cfg: RunConfig) -> None:
    """An existing model folder this run continues or reads was made on the cohorts this run names.

    Without it a multi-cohort model's split would be joined to one cohort's images by participant label alone
    (two cohorts' sub-001 mixed up), or a single-cohort model to several cohorts. ``--overwrite`` makes a new
    model: nothing to compare. An unreadable record is left to ``Maps.open``, which names the problem.

    Raises:
        UsageError: the run's cohorts (names, primary first) differ from the model's.
    """
    from bids_app.data.cohorts import list_cohorts
    from bids_app.errors import UsageError
    from bids_app.maps import Maps

    final = model_layout(cfg)
    if cfg.overwrite or not Maps.exists(final.root):
        return
    try:
        record = Maps.read_record(final.root)
    except DataError:
        return
    recorded = [str(entry.get("name")) for entry in record.extra.get("cohorts") or []]
    given = [cohort.name for cohort in list_cohorts(cfg)]
    if recorded != given:
        raise UsageError(
            f"Model {final.root} was trained on cohort(s) {', '.join(recorded) or '(BIDS_DIR/OUTPUT_DIR only)'}, "
            f"but this run names {', '.join(given) or '(BIDS_DIR/OUTPUT_DIR only)'}. Give the same --cohort-name "
            "and --cohort options (or its config.toml with --config), or train a new model (--overwrite)."
        )


def cohort_tables(
    cfg: RunConfig, mode: ExtractionMode, labels_cfg: LabelConfig, kinds: Sequence[ImageKind]
) -> tuple[TensorIndex, GroupTable, pd.DataFrame]:
    """Every cohort's tensors, labelled group table and sessions lacking a channel, with a leading ``cohort`` column.

    Each cohort is read as a single-cohort run would read it (``index_channels`` of its output folder for
    ``kinds``, ``group_table`` with the labels of its BIDS root); a failure names the cohort. A scan found in two
    cohorts (same preprocessed or raw source sha256) is refused: one person would be on both sides of the split.

    Raises:
        InputMissingError, DataError: as ``group_table``, prefixed by the cohort; LeakError: a scan in two cohorts.
    """
    import dataclasses

    import pandas as pd

    from bids_app.data.cohorts import check_cohort_classes, list_cohorts
    from bids_app.data.tables import index_channels
    from bids_app.errors import InputMissingError
    from bids_app.labels import COHORT

    tensors, tables, excluded = [], [], []
    for cohort in list_cohorts(cfg):
        one = dataclasses.replace(cfg, bids_dir=cohort.bids_dir, output_dir=cohort.output_dir, cohorts=())
        try:
            channels = index_channels(cohort.output_dir, mode, kinds)
            index = channels.tensors
            table = group_table(one, index, labels_cfg, mode, kinds, cohort=True, excluded=channels.excluded)
        except (DataError, InputMissingError) as exc:
            raise type(exc)(f"Cohort '{cohort.name}' ({cohort.bids_dir}): {exc}") from None
        index.insert(0, COHORT, cohort.name)
        table.insert(0, COHORT, cohort.name)
        tensors.append(index)
        tables.append(table)
        excluded.append(channels.excluded.assign(**{COHORT: cohort.name})[[COHORT, *channels.excluded.columns]])
        log.info("Cohort '%s': %d labelled image(s) of %d participant(s) from %s", cohort.name, len(table),
                 table["participant_id"].nunique(), cohort.output_dir)  # fmt: skip
    stacked = pd.concat(tables, ignore_index=True)
    check_cohort_classes(stacked, labels_cfg)
    _refuse_scans_in_two_cohorts(stacked)
    return pd.concat(tensors, ignore_index=True), stacked, pd.concat(excluded, ignore_index=True)


def _refuse_people_in_two_cohorts(table: GroupTable, *, allow: bool) -> None:
    """LeakError when an image of one cohort has the anatomy of another cohort's image (``prediction.identity``).

    The same person re-scanned in two datasets under two labels has no common checksum; the fingerprints of the
    preprocessed images find them. Each cohort's own pairs calibrate a threshold (``identity.calibrate``: above
    its different people, below its re-scans) and the highest is used, so a pair of cohorts is compared with a
    threshold none of them finds strangers above. With ``allow`` (``--allow-leak``) the pairs are a warning.
    """
    import numpy as np

    from bids_app.errors import LeakError
    from bids_app.labels import COHORT
    from bids_app.prediction import identity as fingerprint

    paths = [fingerprint.preprocessed_image_path(Path(str(p))) for p in table["tensor_path"]]
    rows = table[[p is not None for p in paths]].reset_index(drop=True)
    if len(rows) < len(table):
        log.warning("%d image(s) have no preprocessed image left: not compared across cohorts by anatomy.",
                    len(table) - len(rows))  # fmt: skip
    names = list(dict.fromkeys(rows[COHORT]))
    if len(names) < 2:
        return
    volumes = np.stack([fingerprint.lowres_volume(p) for p in paths if p is not None])
    model = fingerprint.fit_model(volumes)
    values, prints = fingerprint.features(volumes, model), fingerprint.fingerprints(volumes, model)
    members = {name: np.flatnonzero((rows[COHORT] == name).to_numpy()) for name in names}
    calibrations = [
        fingerprint.calibrate(
            values[index], list(rows["participant_id"].iloc[index]), list(rows["session_id"].iloc[index])
        )
        for index in members.values()
    ]
    thresholds = [c.threshold for c in calibrations if c is not None]
    if not thresholds:
        log.warning("No cohort has two participants with preprocessed images: cohorts not compared by anatomy.")
        return
    threshold = max(thresholds)
    found = []
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = members[first], members[second]
            for x, y, score in fingerprint.matching_pairs(prints[a], prints[b], threshold):
                one, other = rows.iloc[a[x]], rows.iloc[b[y]]
                found.append(f"{first}/{one['participant_id']} {one['session_id']} ~ {second}/"
                             f"{other['participant_id']} {other['session_id']} (similarity {score:.2f})")  # fmt: skip
    log.info("Cohorts compared by anatomy: %d pair(s) above the threshold %.3f.", len(found), threshold)
    if not found:
        return
    message = (
        f"{len(found)} image pair(s) of two cohorts look like one person (anatomical fingerprints, threshold "
        f"{threshold:.2f}): {'; '.join(found[:5])}. One person in two cohorts could be on both sides of the split"
    )
    if allow:
        log.warning("%s; kept because of --allow-leak.", message)
        return
    raise LeakError(
        f"{message}. Remove the re-scans from one cohort, or pass --allow-leak if they are different people."
    )


def _refuse_scans_in_two_cohorts(table: GroupTable) -> None:
    """LeakError when an image of one cohort has the source checksum of another cohort's image."""
    from bids_app.errors import LeakError
    from bids_app.labels import COHORT
    from bids_app.prediction.leakage import find_leaks

    names = list(dict.fromkeys(table[COHORT]))
    found: dict[str, list[str]] = {}  # "a/sub-001 ses-M000 = b/sub-004 ses-M000" -> the checksums that match
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            pairs = find_leaks(table[table[COHORT] == first], table[table[COHORT] == second], f"cohort '{second}'")
            for f in pairs:  # a label names a person only inside its dataset: only the same file is a leak here
                if f.reason != "participant":
                    pair = (f"{first}/{f.participant_id} {f.session_id} = {second}/{f.train_participant_id} "
                            f"{f.train_session_id}")  # fmt: skip
                    found.setdefault(pair, []).append(f"{f.reason} {f.sha256[:12]}…")
    if found:
        shown = "; ".join(f"{pair} ({', '.join(reasons)})" for pair, reasons in list(found.items())[:5])
        raise LeakError(
            f"{len(found)} image(s) are in two cohorts (same file checksum): {shown}. One person would count twice "
            "and could be on both sides of the split. Remove the copy from one cohort's output."
        )


def check_resumed_split(cfg: RunConfig, table: GroupTable, layout: MapsLayout) -> None:
    """``--resume`` continues the model's own split: a ``--split-file`` that says otherwise is refused."""
    from bids_app.errors import UsageError
    from bids_app.maps.splits import read_splits
    from bids_app.split.files import load_split_file

    assert cfg.split.split_file is not None
    given, kept = load_split_file(cfg.split.split_file, table), read_splits(layout.groups_dir)

    def sides(splits: Splits) -> list[frozenset[str]]:
        return [frozenset(splits.test["participant_id"])] + [
            frozenset(f.validation["participant_id"]) for f in sorted(splits.folds, key=lambda f: f.index)
        ]

    if sides(given) != sides(kept):
        raise UsageError(
            f"--resume continues the split of {layout.root}, but --split-file {cfg.split.split_file} puts "
            "participants elsewhere. Drop --split-file to resume, or pass --overwrite to train on the new split."
        )


def select_excluded(cfg: RunConfig, excluded: pd.DataFrame) -> pd.DataFrame:
    """The sessions lacking a channel (``index_channels``) that ``--participant-label`` and ``--session-label``
    select, like ``select_images``: the model folder's ``excluded_sessions.tsv`` lists only the run's own."""
    import pandas as pd

    keep = pd.Series(True, index=excluded.index)
    if cfg.participant_labels:
        keep &= excluded["participant_id"].isin({f"sub-{label}" for label in cfg.participant_labels})
    if cfg.session_labels:
        keep &= excluded["session_id"].isin({f"ses-{label}" for label in cfg.session_labels})
    return excluded if bool(keep.all()) else excluded[keep].reset_index(drop=True)


def select_images(cfg: RunConfig, table: TensorIndex, kept_split: MapsLayout | None) -> TensorIndex:
    """The tensors ``--participant-label``, ``--session-label`` and ``--bids-filter-file`` select.

    With an existing split (``kept_split``), a selection that leaves out images of that split is refused: the
    split was drawn from them.

    Raises:
        InputMissingError: a selected participant has no labelled tensor in OUTPUT_DIR.
        FilterError: the selection keeps no image.
        UsageError: the selection leaves out images the kept split needs.
    """
    from bids_app.errors import FilterError, InputMissingError, UsageError

    selected = table
    if cfg.participant_labels:
        wanted = {f"sub-{label}" for label in cfg.participant_labels}
        absent = sorted(wanted - set(table["participant_id"]))
        if absent:
            raise InputMissingError(
                f"--participant-label: {', '.join(absent)} have no {cfg.train.mode.value} tensor in "
                f"{cfg.output_dir}. Run the participant level for them, or check the labels."
            )
        selected = selected[selected["participant_id"].isin(wanted)]
    if cfg.session_labels:
        selected = selected[selected["session_id"].isin({f"ses-{label}" for label in cfg.session_labels})]
    for entity, value in cfg.bids_filters.get("t1w", {}).items():
        selected = selected[[_entity_matches(Path(str(p)).name, entity, value) for p in selected["tensor_path"]]]
    if selected is table:
        return table
    selected = selected.reset_index(drop=True)
    if selected.empty:
        raise FilterError(
            f"--participant-label/--session-label/--bids-filter-file keep none of the {len(table)} image(s) of "
            f"{cfg.output_dir}. Relax the selection."
        )
    log.info("Selection (--participant-label, --session-label, --bids-filter-file): %d of %d image(s) kept",
             len(selected), len(table))  # fmt: skip
    if kept_split is not None:
        from bids_app.maps.splits import read_splits

        splits = read_splits(kept_split.groups_dir)
        needed = {*splits.test["participant_id"], *(p for f in splits.folds for p in f.train["participant_id"]),
                  *(p for f in splits.folds for p in f.validation["participant_id"])}  # fmt: skip
        left_out = sorted(needed - set(selected["participant_id"]))
        if left_out:
            raise UsageError(
                f"The selection leaves out {len(left_out)} participant(s) of the split of {kept_split.root} (e.g. "
                f"{', '.join(left_out[:3])}). Select them too, or draw a new split with --overwrite."
            )
    return selected


# BIDS entity names as --bids-filter-file spells them (pybids) → their key in file names.
_ENTITY_KEYS = {"subject": "sub", "session": "ses", "acquisition": "acq", "reconstruction": "rec", "run": "run",
                "ceagent": "ce", "tracer": "trc", "space": "space"}  # fmt: skip


def _entity_matches(file_name: str, entity: str, value: object) -> bool:
    """Whether a tensor file's name satisfies one ``--bids-filter-file`` entity (None: absent, "*": present)."""
    from bids_app.errors import ConfigError

    key = _ENTITY_KEYS.get(entity)
    if key is None:
        raise ConfigError(
            f"--bids-filter-file entity '{entity}' cannot select tensors at the group level. Use one of: "
            f"{', '.join(sorted(_ENTITY_KEYS))}."
        )
    found = dict(part.split("-", 1) for part in file_name.split("_") if "-" in part)
    present = found.get(key)
    if value is None:
        return present is None
    if value == "*":
        return present is not None
    values = [str(v) for v in (value if isinstance(value, list) else [value])]
    if present is None:
        return False
    return present in values or (present.isdigit() and any(v.isdigit() and int(v) == int(present) for v in values))


def run_split(cfg: RunConfig, table: GroupTable, tensors: TensorIndex, layout: MapsLayout) -> None:
    """The split stage, given what it needs from elsewhere: a parent task's table, a transfer source's split."""
    import dataclasses

    from bids_app.kinds import parse_kind
    from bids_app.maps import Maps
    from bids_app.split.stage import run_split_stage

    parent_table = None
    if cfg.split.parent_label and cfg.split.split_file is None:
        parent_labels = dataclasses.replace(cfg.labels, label=cfg.split.parent_label, classes=())
        kinds = tuple(parse_kind(name) for name in cfg.train.channels)
        parent_table = group_table(cfg, tensors, parent_labels, cfg.train.mode, kinds)
    source = Maps.open(cfg.train.transfer_from) if cfg.train.transfer_from else None
    run_split_stage(cfg, table, layout.groups_dir, parent_table=parent_table, source=source)


def group_table(
    cfg: RunConfig,
    tensors: TensorIndex,
    labels_cfg: LabelConfig,
    mode: ExtractionMode,
    kinds: Sequence[ImageKind] | None = None,
    *,
    cohort: bool = False,
    excluded: pd.DataFrame | None = None,
) -> GroupTable:
    """Labels joined with the tensors the participant level produced for ``mode`` and the channels ``kinds``
    (None: T1w alone).

    ``cohort``: the table is one cohort of several, whose classes are checked together (``data.cohorts``).
    ``excluded``: sessions already reported as lacking a channel (``data.tables.index_channels``), whose
    participants are not reported again as having no tensor.
    """
    from bids_app.data.tables import check_kinds_present
    from bids_app.errors import InputMissingError
    from bids_app.labels import load_labels

    if tensors.empty:
        if kinds is not None:
            check_kinds_present(cfg.output_dir, mode, kinds)  # a channel no session has: named, with its option
        raise InputMissingError(
            f"No complete {mode.value} tensors in {cfg.output_dir}. Run the participant level first "
            f"with --modes {mode.value}."
        )
    labels = load_labels(cfg.bids_dir, labels_cfg, sessions=tensors[["participant_id", "session_id"]],
                         check_classes=not cohort)  # fmt: skip
    table = labels.merge(tensors, on=["participant_id", "session_id"], how="inner", validate="one_to_one")
    lacking = set() if excluded is None else set(excluded["participant_id"])
    _say_what_the_participant_level_left_out(cfg, tensors, table, lacking)
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


def _say_what_the_participant_level_left_out(
    cfg: RunConfig, tensors: TensorIndex, table: GroupTable, lacking: set[str]
) -> None:
    """Warn about participants of BIDS_DIR with no tensor, and tensors whose image failed its latest run.

    ``lacking``: participants whose sessions lack one of several channels, already reported by
    ``data.tables.index_channels``.
    """
    from bids_app.inputs.bids_query import list_participants
    from bids_app.participant.status import failed_images

    everyone = list(cfg.participant_labels) or list_participants(cfg.bids_dir)
    with_tensors = set(tensors["participant_id"]) | lacking
    missing = [f"sub-{label}" for label in everyone if f"sub-{label}" not in with_tensors]
    if missing:
        log.warning("%d of %d participant(s) of %s have no tensor in %s and are left out: %s%s. The participant "
                    "level failed or was not run for them (see participant_status.tsv).",
                    len(missing), len(everyone), cfg.bids_dir, cfg.output_dir,
                    ", ".join(missing[:10]), " ..." if len(missing) > 10 else "")  # fmt: skip
    failed = failed_images(cfg.output_dir)
    stale = [(p, s) for p, s in zip(table["participant_id"], table["session_id"], strict=True) if (p, s) in failed]
    for participant, session in stale[:10]:
        log.warning("%s %s: its latest participant-level run failed (%s); the tensor used is from an earlier "
                    "run. Fix the input and re-run the participant level for it.", participant, session,
                    failed[(participant, session)])  # fmt: skip
