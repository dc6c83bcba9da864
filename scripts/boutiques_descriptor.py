"""Regenerate boutiques/bids_app.json from the CLI parser: `make descriptor` (tests/test_containers.py checks it)."""

import enum
import json
from pathlib import Path

from bids_app.cli.arguments import build_parser, config_default
from bids_app.cli.options import CONFIG_KEYS

ROOT = Path(__file__).resolve().parents[1]
VERSION = (ROOT / "version").read_text().strip()
MUST_EXIST = {
    "bids_filter_file",
    "config",
    "template",
    "suvr_reference_mask",
    "split_file",
    "transfer_from",
    "predict_from",
    "derivatives",
}
EXTRA_HELP = {
    "epochs": "maximum number of training epochs",
    "batch_size": "samples per training batch",
    "learning_rate": "optimiser learning rate",
    "optimizer": "optimiser",
    "device": "where to train and predict: 'auto' uses a GPU when one is visible",
    "slice_direction": "axis orthogonal to the slices (default sagittal)",
    "verbose": "more log output (repeat the flag, -vv, for debug output)",
    "weight_decay": "optimiser weight decay (L2 penalty)",
    "dropout": "dropout probability of the network's classifier",
    "early_stopping_tolerance": "smallest improvement of the selection loss that resets early stopping",
    "class_weighted_sampling": "sample training examples inversely to their class frequency",
    "transfer_from": "initialise from another model folder (MAPS)",
    "inverse_mae_voting": "regression: weight parts by the inverse of their validation MAE when voting",
    "accumulation_steps": "gradient accumulation steps per optimiser step",
    "lr_plateau_patience": "epochs without improvement before the learning rate is reduced (0: off)",
    "early_stopping_patience": "epochs without improvement before training stops (0: off)",
    "augmentations": "data augmentations, applied to the training set only",
    "splits": "train only these split indices",
    "n_unfrozen_layers": "with --transfer-from: number of last layers that are trained",
    "voting_threshold": "drop parts whose validation score is below this before voting",
    "n_bootstrap": "bootstrap resamples for metric confidence intervals (default 1000)",
    "parent_label": "column whose split is inherited (transfer-safe nested split)",
    "balance_p_threshold": "split balance: age and sex tests must have p above this",
    "max_attempts": "bounded number of split draws to reach balance",
    "validation_size": "validation fraction when --n-splits is 1",
}
# Ranges of the numeric options, as bids_app.config.check_config_values enforces them (tests/test_containers.py
# checks each bound against it): dest -> (minimum, exclusive, maximum or None, exclusive).
RANGES = {
    "seed": (0, False, 2**32 - 1, False),
    "nprocs": (1, False, None, False),
    "omp_nthreads": (1, False, None, False),
    "epochs": (1, False, None, False),
    "batch_size": (1, False, None, False),
    "accumulation_steps": (1, False, None, False),
    "lr_plateau_patience": (0, False, None, False),
    "early_stopping_patience": (0, False, None, False),
    "n_splits": (1, False, None, False),
    "max_attempts": (1, False, None, False),
    "n_bootstrap": (0, False, None, False),
    "num_workers": (0, False, None, False),
    "inference_batch_size": (1, False, None, False),
    "interpret_n_steps": (1, False, None, False),
    "patch_size": (1, False, None, False),
    "stride": (1, False, None, False),
    "discarded_slices": (0, False, None, False),
    "crop_shape": (1, False, None, False),
    "image_voxel_size": (0, True, None, False),
    "learning_rate": (0, True, None, False),
    "weight_decay": (0, False, None, False),
    "dropout": (0, False, 1, True),
    "early_stopping_tolerance": (0, False, None, False),
    "test_size": (0, False, None, False),
    "validation_size": (0, True, None, False),
    "balance_p_threshold": (0, False, 1, True),
    "voting_threshold": (0, False, 1, False),
}
INFO_ONLY = {"help", "version", "list_architectures"}
BOOL_HELP = {
    "roi_crop": (
        "Crop each region to its bounding box (the default).",
        "Keep the full template frame around each region.",
    ),
    "test_baseline_only": (
        "Keep only baseline sessions in the test set (the default).",
        "Keep every session in the test set.",
    ),
    "channels_last": (
        "Model and batches in channels-last memory format, the faster layout on CPU; results agree with the "
        "contiguous layout to float rounding (the default).",
        "Model and batches in torch's default contiguous layout.",
    ),
    "linear_baseline": (
        "Also fit a linear model (logistic regression or ridge) on the same tensors and splits, its metrics beside "
        "the network's (the default; never for reconstruction).",
        "Fit no linear baseline (--no-baseline): the metric TSVs carry the network's values only.",
    ),
}
ACRONYMS = {
    "bids": "BIDS",
    "omp": "OMP",
    "roi": "ROI",
    "suvr": "SUVR",
    "pet": "PET",
    "amp": "AMP",
    "mae": "MAE",
    "lr": "LR",
    "n": "number of",
    "p": "p",
}


def pretty(dest):
    if dest == "n_bootstrap":
        return "Bootstrap resamples"
    words = [ACRONYMS.get(w, w) for w in dest.split("_")]
    text = " ".join(words)
    return text[0].upper() + text[1:]


p = build_parser()
inputs = []
cmd = ["bids_app", "[BIDS_DIR]", "[OUTPUT_DIR]", "[ANALYSIS_LEVEL]"]
inputs.append(
    {
        "id": "bids_dir",
        "name": "BIDS dataset",
        "type": "File",
        "value-key": "[BIDS_DIR]",
        "description": "The root folder of the input BIDS dataset (read only).",
    }
)
inputs.append(
    {
        "id": "output_dir",
        "name": "Output folder",
        "type": "String",
        "value-key": "[OUTPUT_DIR]",
        "description": "The output folder, a BIDS derivative dataset (created when absent); "
        "for example BIDS_DIR/derivatives/bids_app.",
    }
)
inputs.append(
    {
        "id": "analysis_level",
        "name": "Analysis level",
        "type": "String",
        "value-key": "[ANALYSIS_LEVEL]",
        "value-choices": ["participant", "group"],
        "description": "'participant': preprocess and extract tensors for each participant (one job per "
        "participant may run in parallel); 'group': split, train and predict from the "
        "participant outputs.",
    }
)
groups = []
for a in p._actions:
    if not a.option_strings or a.dest in INFO_ONLY:
        continue
    longs = [o for o in a.option_strings if o.startswith("--")]
    shorts = [o for o in a.option_strings if not o.startswith("--")]
    kebab = "--" + a.dest.replace("_", "-")
    flag = kebab if kebab in longs else longs[0]
    helptext = EXTRA_HELP.get(a.dest) or a.help or a.dest.replace("_", " ")
    desc = helptext[0].upper() + helptext[1:] + "."
    if len(longs) > 1 and "_" in longs[1]:
        desc += f" Also spelled {longs[1]}."
    if shorts:
        desc += f" Short form {shorts[0]}."
    if type(a).__name__ == "BoolFlag":
        pos, neg = BOOL_HELP[a.dest]
        members = []
        for f, did, d in ((kebab, a.dest, pos), ("--no-" + kebab[2:], "no_" + a.dest, neg)):
            assert f in a.option_strings, f
            key = f"[{did.upper()}]"
            inputs.append(
                {
                    "id": did,
                    "name": pretty(did),
                    "type": "Flag",
                    "optional": True,
                    "command-line-flag": f,
                    "value-key": key,
                    "description": d,
                }
            )
            cmd.append(key)
            members.append(did)
        groups.append({"id": a.dest + "_group", "name": pretty(a.dest), "members": members, "mutually-exclusive": True})
        continue
    key = f"[{a.dest.upper()}]"
    entry = {
        "id": a.dest,
        "name": pretty(a.dest),
        "optional": True,
        "command-line-flag": flag,
        "value-key": key,
        "description": desc,
    }
    if a.nargs == 0:
        entry["type"] = "Flag"
    elif a.type is int:
        entry["type"] = "Number"
        entry["integer"] = True
    elif a.type is float:
        entry["type"] = "Number"
    elif a.dest in MUST_EXIST:
        entry["type"] = "File"
    else:
        entry["type"] = "String"
    if a.choices:
        entry["value-choices"] = list(a.choices)
    if a.nargs == "+":
        entry["list"] = True
    elif isinstance(a.nargs, int) and a.nargs > 0:
        entry["list"] = True
        entry["min-list-entries"] = a.nargs
        entry["max-list-entries"] = a.nargs
    if a.dest in RANGES:
        low, low_exclusive, high, high_exclusive = RANGES[a.dest]
        entry["minimum"] = low
        if low_exclusive:
            entry["exclusive-minimum"] = True
        if high is not None:
            entry["maximum"] = high
            if high_exclusive:
                entry["exclusive-maximum"] = True
    default = config_default(a.dest) if a.dest in CONFIG_KEYS else None
    if default is not None and default != () and entry["type"] != "Flag":
        values = list(default) if isinstance(default, tuple) else default
        entry["default-value"] = (
            [v.value if isinstance(v, enum.Enum) else v for v in values]
            if isinstance(values, list)
            else (values.value if isinstance(values, enum.Enum) else values)
        )
    inputs.append(entry)
    cmd.append(key)

desc = {
    "name": "bids_app",
    "tool-version": VERSION,
    "schema-version": "0.5",
    "description": "A BIDS App for reproducible, leak-proof deep learning on neuroimaging data: the participant "
    "level preprocesses T1w (and PET) images to a template and extracts image, patch, slice or ROI "
    "tensors; the group level makes seeded subject-level splits, trains, predicts and reports.",
    "author": "bids_app developers",
    "url": "https://github.com/bids-apps/bids_app",
    "command-line": " ".join(cmd),
    "container-image": {"type": "docker", "image": f"ghcr.io/bids-apps/bids_app:{VERSION}", "entrypoint": True},
    "inputs": inputs,
    "groups": groups,
    "output-files": [
        {
            "id": "dataset_description",
            "name": "Derivative dataset description",
            "optional": False,
            "path-template": "[OUTPUT_DIR]/dataset_description.json",
            "description": "Written at the end of every run; names the app version and container (GeneratedBy).",
        },
        {
            "id": "participant_reports",
            "name": "Participant reports",
            "optional": True,
            "list": True,
            "path-template": "[OUTPUT_DIR]/sub-*/sub-*_report.html",
            "description": "Participant level: one HTML report per participant (registration figures, QC).",
        },
        {
            "id": "participant_status",
            "name": "Participant status table",
            "optional": True,
            "path-template": "[OUTPUT_DIR]/participant_status.tsv",
            "description": "Participant level: what each participant and session reached, and why one failed.",
        },
        {
            "id": "model_folder",
            "name": "Model folder (MAPS)",
            "optional": True,
            "path-template": "[OUTPUT_DIR]/models/[MODEL_NAME]",
            "description": "Group level: the model folder of --model-name (default 'model'): splits, weights, "
            "predictions, metrics.",
        },
        {
            "id": "maps_json",
            "name": "Model record",
            "optional": True,
            "path-template": "[OUTPUT_DIR]/models/[MODEL_NAME]/maps.json",
            "description": "Group level: the model folder's record (resolved configuration, classes, input shape).",
        },
        {
            "id": "model_report",
            "name": "Model report",
            "optional": True,
            "path-template": "[OUTPUT_DIR]/models/[MODEL_NAME]/report.html",
            "description": "Group level: the HTML report of training curves, metrics and their intervals.",
        },
        {
            "id": "metrics_tables",
            "name": "Metric tables",
            "optional": True,
            "list": True,
            "path-template": "[OUTPUT_DIR]/models/[MODEL_NAME]/split-*/best-*/*/*_image_level_metrics.tsv",
            "description": "Group level: image-level metrics with bootstrap intervals, per split, selection "
            "metric and group (validation, test, or --group-name).",
        },
    ],
    "error-codes": [
        {"code": 1, "description": "Unspecified failure"},
        {"code": 16, "description": "The input dataset failed BIDS validation"},
        {"code": 17, "description": "Unknown analysis level"},
        {"code": 18, "description": "The entity filters selected no files"},
        {"code": 64, "description": "Usage error: invalid command-line arguments or configuration"},
        {"code": 65, "description": "Data error: an input file or table has invalid content, or a leak was detected"},
        {"code": 66, "description": "A required input is missing"},
        {"code": 73, "description": "The output cannot be created"},
        {"code": 74, "description": "Input/output error"},
        {"code": 75, "description": "Temporary failure: a retry may succeed"},
    ],
    "suggested-resources": {"cpu-cores": 2, "ram": 8, "disk-space": 10},
    "tags": {"domain": ["neuroinformatics", "deep-learning", "bids-app"], "application-type": "bids"},
}
(ROOT / "boutiques" / "bids_app.json").write_text(json.dumps(desc, indent=2) + "\n")
