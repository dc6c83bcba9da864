"""The model card: what a receiving site must know before predicting with a model, as JSON and Markdown.

``make_card`` gathers it from the model folder (its record, split, selections, metric TSVs, environment) and
the output the model was trained on (the participant-level settings and the training command in its run logs);
``format_card`` renders the Markdown. Both are deterministic: no export time, no local path but file names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_app import read_version
from bids_app.config import Task
from bids_app.labels import NA, natural_key, subject_ids

if TYPE_CHECKING:
    import pandas as pd

    from bids_app.maps import Maps
    from bids_app.portable.guard import TravellingGuard

log = logging.getLogger(__name__)

CARD_VERSION = 1
# participant_settings keys that parametrise the mode (no paths: ROI masks travel by name and sha256)
MODE_SETTINGS = ("image_voxel_size", "patch_size", "stride", "slice_direction", "discarded_slices", "roi_names",
                 "roi_crop", "roi_mask_sha256")  # fmt: skip
HYPER_PARAMETERS = ("optimizer", "learning_rate", "weight_decay", "dropout", "epochs", "batch_size", "augmentations",
                    "class_weighted_sampling")  # fmt: skip
UNKNOWN = "not recorded"
INTENDED_USE = (
    "Research only. Predicting the label named above for images prepared exactly as the training images were (same "
    "modality, template, crop and extraction, from the bids_app participant level with the settings listed under "
    "Input), from a population like the training cohorts. Not a medical device; not for diagnosis of individuals."
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _run_logs(output_dir: Path, level: str, created: str) -> list[Path]:
    """Run-log folders of ``level`` that started no later than ``created`` (ISO time), latest first.

    Run ids start with their UTC start time (``20261205T102706Z_group_...``), so the run that made a model is the
    last group run that started before the model's ``environment.json`` was written.
    """
    stamp = created[:19].replace("-", "").replace(":", "")
    folders = [p for p in (output_dir / "logs").glob(f"*_{level}_*") if p.is_dir() and p.name[:15] <= stamp]
    return sorted(folders, key=lambda p: p.name, reverse=True)


def _training_command(output_dir: Path, created: str) -> str:
    for folder in _run_logs(output_dir, "group", created):
        command = folder / "command.txt"
        if command.is_file():
            return command.read_text(encoding="utf-8").strip()
    return UNKNOWN


def _input_settings(maps: Maps, output_dir: Path, created: str, sidecar: dict[str, Any]) -> dict[str, Any]:
    """Mode, shape, template and crop the model's tensors were made with (file names and hashes, no paths).

    The model record's ``participant_settings`` (read from the training tensors' sidecars) decide; a model made
    before they were recorded falls back on the tensors' sidecar and the participant-level run that preceded
    the model (its ``config.toml``), the template hashed when still there.
    """
    from bids_app.data.origin import common_settings

    record = maps.record
    settings: dict[str, Any] = {
        "mode": record.mode.value,
        "sample_shape": list(record.input_shape),
        "channels": int(record.input_shape[0]),
        "kinds": list(record.config.train.channels),  # the image kind of each channel, in order
        "template_space": sidecar.get("Space", UNKNOWN),
        "normalization": sidecar.get("Normalization", UNKNOWN),
        "mode_parameters": sidecar.get("ModeParameters", {}),
        "tensor_dtype": sidecar.get("Dtype", UNKNOWN),
        "template_file": UNKNOWN,
        "template_sha256": UNKNOWN,
        "crop_shape": UNKNOWN,
        "registration": UNKNOWN,
    }
    recorded = common_settings(maps.participant_settings)
    if recorded:
        settings.update(
            template_space=recorded.get("template_space", UNKNOWN),
            normalization=recorded.get("normalization", UNKNOWN),
            tensor_dtype=recorded.get("dtype", UNKNOWN),
            template_file=recorded.get("template", UNKNOWN),
            template_sha256=recorded.get("template_sha256", UNKNOWN),
            crop_shape=recorded.get("crop_shape") or "the template frame",
            registration=recorded.get("registration", UNKNOWN),
            mode_parameters={key: recorded[key] for key in MODE_SETTINGS if key in recorded},
        )
        return settings
    for folder in _run_logs(output_dir, "participant", created):
        try:
            config = tomllib.loads((folder / "config.toml").read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            continue
        preprocess = config.get("preprocess", {})
        template = preprocess.get("template_path")
        if template:
            settings["template_file"] = Path(template).name
            if Path(template).is_file():
                settings["template_sha256"] = hashlib.sha256(Path(template).read_bytes()).hexdigest()
        settings["crop_shape"] = preprocess.get("crop_shape") or "the template frame"
        settings["registration"] = preprocess.get("registration", UNKNOWN)
        break
    return settings


def _demographics(table: pd.DataFrame, group: str) -> list[dict[str, Any]]:
    """Counts, age and sex per label of one side of the split (from participants.tsv via the split files)."""
    import pandas as pd

    rows = []
    for label, part in sorted(table.groupby("label"), key=lambda item: natural_key(str(item[0]))):
        people = subject_ids(part)  # <cohort>/<participant> with cohorts: two cohorts' sub-01 are two people
        baseline = part[~people.duplicated()]
        ages = pd.to_numeric(baseline["age"], errors="coerce").dropna() if "age" in part.columns else pd.Series([])
        sexes = baseline["sex"].astype(str).value_counts() if "sex" in part.columns else pd.Series([], dtype=int)
        rows.append(
            {
                "group": group,
                "label": str(label),
                "n_participants": int(people.nunique()),
                "n_images": len(part),
                "age_mean": round(float(ages.mean()), 1) if len(ages) else None,
                "age_sd": round(float(ages.std()), 1) if len(ages) > 1 else None,
                "sex": {str(k): int(str(v)) for k, v in sorted(sexes.items()) if str(k) not in ("", NA)},
            }
        )
    return rows


def _metrics(maps: Maps, splits: list[int], metrics: list[str]) -> list[dict[str, Any]]:
    """Every metric TSV of the exported models (validation, test), with its interval and n."""
    import pandas as pd

    rows = []
    for split in splits:
        for metric in metrics:
            for group in ("validation", "test"):
                path = maps.layout.metrics_tsv(split, metric, group)
                if not path.is_file():
                    continue
                table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
                for row in table.to_dict("records"):
                    rows.append(
                        {
                            "split": split,
                            "selection": metric,
                            "group": group,
                            "metric": row.get("metric"),
                            "value": row.get("value"),
                            "ci_low": row.get("ci_low", NA),
                            "ci_high": row.get("ci_high", NA),
                            "n_images": row.get("n_images", NA),
                            "n_participants": row.get("n_participants", NA),
                        }
                    )
    return rows


def _limits(maps: Maps, guard: TravellingGuard, n_pool: int, metric_rows: list[dict[str, Any]]) -> list[str]:
    limits = [
        "Trained and evaluated on the cohorts listed under Training data only; performance on other scanners, "
        "protocols or populations is unknown until measured there.",
        "The inputs must be prepared with the participant-level settings listed under Input (bids_app-model import, "
        "then the participant level with --from-model); bids_app refuses tensors of another sample shape or made "
        "with other recorded settings, but cannot see scanner or protocol differences.",
    ]
    if not any(row["group"] == "test" for row in metric_rows):
        limits.append(
            "No held-out test set was predicted: validation metrics are optimistic (models were selected on them)."
        )
    if n_pool < 50:
        limits.append(f"Small training pool ({n_pool} participants): wide confidence intervals, unstable models.")
    unknown = int(guard.images["source_sha256"].isin(["", NA]).sum())
    if unknown:
        limits.append(f"{unknown} training/validation image(s) had no tensor left when the model was exported: the "
                      "leak guard knows them by id only, not by checksum or fingerprint.")  # fmt: skip
    if guard.fingerprints is None:
        limits.append(
            f"No anatomical fingerprints: receiving sites cannot detect re-scans of training participants "
            f"under new names ({guard.absent_reason})."
        )
    if maps.record.task is Task.CLASSIFICATION:
        limits.append("Class probabilities are not calibrated for populations with another class balance.")
    return limits


def make_card(
    maps: Maps, splits: list[int], metrics: list[str], guard: TravellingGuard, input_sidecar: dict[str, Any]
) -> dict[str, Any]:
    """The machine-readable card of the models ``splits`` x ``metrics`` of ``maps`` (``model_card.json``).

    Args:
        maps: the model folder, opened.
        splits, metrics: the exported models.
        guard: the exported leak guard (its counts and whether fingerprints travel).
        input_sidecar: the sidecar of one training tensor (mode, space, normalisation, shape).
    """

    record, layout = maps.record, maps.layout
    config = record.config
    environment = _read_json(layout.environment_json)
    created = str(environment.get("created", ""))
    output_dir = Path(config.output_dir)
    pool = maps.training_pool()
    test = maps.splits.test
    cohort_names = []
    description = _read_json(Path(config.bids_dir) / "dataset_description.json")
    cohorts = sorted(set(pool["cohort"])) if "cohort" in pool.columns else [description.get("Name", UNKNOWN)]
    for name in cohorts:
        rows = pool[pool["cohort"] == name] if "cohort" in pool.columns else pool
        cohort_names.append(
            {"name": str(name), "n_participants": int(subject_ids(rows).nunique()), "n_images": len(rows)}
        )
    selections = []
    for split in splits:
        for metric in metrics:
            chosen = _read_json(layout.selection_json(split, metric))
            selections.append(
                {"split": split, "selection": metric, "epoch": chosen.get("epoch"), "value": chosen.get("value")}
            )
    metric_rows = _metrics(maps, splits, metrics)
    n_pool = int(subject_ids(pool).nunique())
    return {
        "card_version": CARD_VERSION,
        "model_name": maps.name,
        "task": record.task.value,
        "label": config.labels.label,
        "classes": maps.class_names,
        "positive_class": (config.labels.positive_class or (maps.class_names[1] if len(maps.class_names) > 1 else None))
        if record.task is Task.CLASSIFICATION
        else None,
        "architecture": record.architecture,
        "input": _input_settings(maps, output_dir, created, input_sidecar),
        "training_data": {
            "cohorts": cohort_names,
            "n_participants_train_validation": n_pool,
            "n_images_train_validation": len(pool),
            "n_participants_test": int(subject_ids(test).nunique()),
            "demographics": _demographics(pool, "train+validation")
            + (_demographics(test, "test") if len(test) else []),
            "split": {"n_splits": len(maps.splits.folds), "seed": maps.splits.seed},
        },
        "models": selections,
        "metrics": metric_rows,
        "intended_use": INTENDED_USE,
        "limits": _limits(maps, guard, n_pool, metric_rows),
        "leak_guard": {
            "n_images": len(guard.images),
            "n_participants": int(subject_ids(guard.images).nunique()),
            "checksums": ["source_sha256 (preprocessed image file)", "raw_source_sha256 (raw input file)"],
            "fingerprints": guard.fingerprints is not None,
            "fingerprints_absent_reason": guard.absent_reason or None,
            "calibration": guard.fingerprints.calibration if guard.fingerprints is not None else None,
            "what_a_fingerprint_reveals": _disclosure(),
        },
        "provenance": {
            "command": str((environment.get("training_run") or {}).get("command") or "")
            or _training_command(output_dir, created),
            "seed": config.seed,
            "trained": created or UNKNOWN,
            "trained_with_bids_app": record.version,
            "exported_with_bids_app": read_version(),
            "git_commit": environment.get("git_commit"),
            "python": environment.get("python"),
            "key_packages": environment.get("key_packages", {}),
            "hyper_parameters": {
                key: value for key, value in dataclasses.asdict(config.train).items() if key in HYPER_PARAMETERS
            },
        },
    }


def _disclosure() -> str:
    from bids_app.portable.guard import FINGERPRINT_DISCLOSURE

    return FINGERPRINT_DISCLOSURE


def _cell(value: Any) -> str:
    return NA if value in (None, "") else str(value)


def format_card(card: dict[str, Any], *, format_version: int) -> str:
    """``MODEL_CARD.md``: the card's JSON rendered for people."""
    inp, data, guard, prov = card["input"], card["training_data"], card["leak_guard"], card["provenance"]
    lines = [
        f"# Model card: {card['model_name']}",
        "",
        f"A {card['architecture']} {card['task']} model on {inp['mode']} tensors, predicting `{card['label']}`"
        + (
            f" (classes {', '.join(card['classes'])}; positive class {card['positive_class']})."
            if card["classes"]
            else "."
        ),
        f"Portable-model format {format_version}; trained with bids_app {prov['trained_with_bids_app']}, exported "
        f"with bids_app {prov['exported_with_bids_app']}.",
        "",
        "## Input",
        "",
        f"- mode: {inp['mode']}, sample shape {inp['sample_shape']} ({inp['channels']} channel(s): "
        f"{', '.join(inp.get('kinds', ['T1w']))}), "
        f"{inp['tensor_dtype']}, normalisation {inp['normalization']}",
        f"- template: space {inp['template_space']}, file {inp['template_file']}, sha256 {inp['template_sha256']}",
        f"- crop: {inp['crop_shape']}; registration {inp['registration']}; mode parameters "
        f"{json.dumps(inp['mode_parameters'], sort_keys=True)}",
        "",
        "## Training data",
        "",
        *(
            f"- cohort {c['name']}: {c['n_participants']} participant(s), {c['n_images']} image(s) in training/"
            "validation"
            for c in data["cohorts"]
        ),
        f"- held-out test participants: {data['n_participants_test']}; {data['split']['n_splits']} split(s), split "
        f"seed {data['split']['seed']}",
        "",
        "| group | label | participants | images | age mean (sd) | sex |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['group']} | {r['label']} | {r['n_participants']} | {r['n_images']} | {_cell(r['age_mean'])} "
            f"({_cell(r['age_sd'])}) | {', '.join(f'{k}: {v}' for k, v in r['sex'].items()) or NA} |"
            for r in data["demographics"]
        ),
        "",
        "## Models",
        "",
        *(
            f"- split-{m['split']}/best-{m['selection']}: epoch {_cell(m['epoch'])}, {m['selection']} "
            f"{_cell(m['value'])}"
            for m in card["models"]
        ),
        "",
        "## Metrics (image level, 95% bootstrap intervals)",
        "",
    ]
    if card["metrics"]:
        lines += [
            "| split | selection | group | metric | value | 95% CI | n images | n participants |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['split']} | {r['selection']} | {r['group']} | {r['metric']} | {_cell(r['value'])} | "
            f"{_cell(r['ci_low'])} – {_cell(r['ci_high'])} | {_cell(r['n_images'])} | {_cell(r['n_participants'])} |"
            for r in card["metrics"]
        ]
    else:
        lines.append("No metrics: the models were not evaluated (run the predict stage before exporting).")
    lines += [
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        "## Known limits",
        "",
        *(f"- {limit}" for limit in card["limits"]),
        "",
        "## Leak guard",
        "",
        f"The archive lists the {guard['n_images']} training/validation image(s) of {guard['n_participants']} "
        "participant(s) by id and by the SHA-256 of their preprocessed and raw files, so a receiving site's "
        "prediction refuses its own copies of them, renamed or not.",
        (
            "Anatomical fingerprints are included: the receiving site's images are also compared with them, so a "
            "re-scan of a training participant under a new name is refused. "
            + (f"Calibration threshold {guard['calibration']['threshold']}." if guard["calibration"] else "")
            if guard["fingerprints"]
            else f"Anatomical fingerprints are NOT included ({guard['fingerprints_absent_reason']}): prediction "
            "says the identity check was not possible."
        ),
        "",
        f"What a fingerprint reveals: {guard['what_a_fingerprint_reveals']}",
        "",
        "## How it was made",
        "",
        f"- command: `{prov['command']}`",
        f"- seed {prov['seed']}; trained {prov['trained']}; git commit {_cell(prov['git_commit'])}; Python "
        f"{_cell(prov['python'])}",
        f"- hyper-parameters: {json.dumps(prov['hyper_parameters'], sort_keys=True)}",
        f"- packages: {', '.join(f'{k} {v}' for k, v in sorted(prov['key_packages'].items()))}",
        "",
    ]
    return "\n".join(lines)
