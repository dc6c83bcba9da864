"""Where tensors come from: the source dataset of each image, and the participant-level settings that made it.

Dataset identity. A participant label (``sub-001``) names a person only inside one dataset: nearly every
dataset calls its participants ``sub-001...``. Each tensor sidecar therefore records its raw BIDS dataset
(``SourceDataset``: ``Name``, ``DOI``, ``ID``), and ``data.tables.index_tensors`` gives every image the columns
``DATASET_COLUMNS``:

- ``dataset_name``: ``Name`` of the raw dataset's ``dataset_description.json`` (``n/a`` when absent);
- ``dataset_doi``: its ``DatasetDOI`` (``n/a`` when absent);
- ``dataset_id``: ``ds-`` + the first 16 hex digits of the sha256 of the canonical JSON (sorted keys) of the
  description without ``IDENTITY_IGNORED_KEYS``. The description is what a dataset says about itself (Name,
  DOI, Authors, License, GeneratedBy, SourceDatasets...), so the id is the same for the same dataset at another
  path or on another machine, and differs for two datasets that differ in any of those fields. The ignored
  keys change when the same data are re-released or moved (BIDS version, dataset version, local links), not
  when the people do. Two independent datasets with byte-identical descriptions (same Name and nothing else)
  get the same id: they are then treated as one dataset, which is the cautious side (the participant rule
  applies); give them a ``DatasetDOI`` or distinct ``Name`` to tell them apart.

An unknown id (``n/a``: a tensor written before identities were recorded whose raw dataset is gone) is treated
as the same dataset as any other (``same_dataset``), again the cautious side.

Participant-level settings. ``tensor_settings`` reads from a tensor sidecar the settings that decide what the
tensor holds (template and its sha256, crop, mode parameters, ROI mask hashes, normalisation, dtype, pipeline
version); ``settings_by_dataset`` summarises them per dataset for the model folder, and ``settings_differences``
names what differs between a model's tensors and another group's (``MATCHED_SETTINGS``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

UNKNOWN = "n/a"
DATASET_COLUMNS = ("dataset_name", "dataset_doi", "dataset_id")
IDENTITY_IGNORED_KEYS = ("BIDSVersion", "DatasetVersion", "DatasetLinks", "HEDVersion")
SIDECAR_KEY = "SourceDataset"  # tensor sidecar key holding {"Name", "DOI", "ID"}
# The participant-level settings two groups of tensors must share for one model to read both. Registration
# flavour, dtype and pipeline version are recorded but not matched: they change precision, not what a voxel means.
MATCHED_SETTINGS = (
    "template_sha256",
    "crop_shape",
    "mode",
    "patch_size",
    "stride",
    "slice_direction",
    "discarded_slices",
    "roi_names",
    "roi_crop",
    "roi_mask_sha256",
    "normalization",
)


@dataclasses.dataclass(frozen=True)
class DatasetIdentity:
    """One raw BIDS dataset: its ``Name``, ``DatasetDOI`` and stable id (module docstring); ``n/a`` when unknown."""

    name: str = UNKNOWN
    doi: str = UNKNOWN
    dataset_id: str = UNKNOWN

    def to_sidecar(self) -> dict[str, str]:
        """The ``SourceDataset`` value of a tensor sidecar."""
        return {"Name": self.name, "DOI": self.doi, "ID": self.dataset_id}

    @classmethod
    def from_sidecar(cls, value: object) -> DatasetIdentity | None:
        """The identity a sidecar's ``SourceDataset`` holds; None when absent or malformed."""
        if not isinstance(value, Mapping) or not value.get("ID"):
            return None
        return cls(str(value.get("Name") or UNKNOWN), str(value.get("DOI") or UNKNOWN), str(value["ID"]))

    def columns(self) -> dict[str, str]:
        """The ``DATASET_COLUMNS`` values of an image of this dataset."""
        return dict(zip(DATASET_COLUMNS, (self.name, self.doi, self.dataset_id), strict=True))


def identify_dataset(description: Mapping[str, Any]) -> DatasetIdentity:
    """The identity of a dataset from its ``dataset_description.json`` content (module docstring)."""
    kept = {key: value for key, value in description.items() if key not in IDENTITY_IGNORED_KEYS}
    text = json.dumps(kept, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return DatasetIdentity(
        name=str(description.get("Name") or UNKNOWN),
        doi=str(description.get("DatasetDOI") or UNKNOWN),
        dataset_id=f"ds-{digest}",
    )


def read_dataset_identity(bids_dir: Path) -> DatasetIdentity:
    """The identity of the dataset rooted at ``bids_dir``; all ``n/a`` when its description is unreadable."""
    try:
        description = json.loads((Path(bids_dir) / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return DatasetIdentity()
    return identify_dataset(description) if isinstance(description, dict) else DatasetIdentity()


def same_dataset(first_id: str, second_id: str) -> bool:
    """Whether two images' ``dataset_id`` may name one dataset: equal, or either unknown (the cautious side)."""
    unknown = {UNKNOWN, "", "nan"}
    return first_id in unknown or second_id in unknown or first_id == second_id


# -- participant-level settings --------------------------------------------------------------------------


def tensor_settings(sidecar: Mapping[str, Any]) -> dict[str, Any]:
    """The participant-level settings a tensor sidecar records, under flat snake_case keys.

    Keys (present only when the sidecar records them): ``template`` (file name), ``template_path``,
    ``template_sha256``, ``template_space``, ``crop_shape`` (list or None: the template's full grid),
    ``registration``, ``mode``, ``patch_size``, ``stride``, ``slice_direction``, ``discarded_slices``,
    ``roi_names``, ``roi_crop``, ``roi_mask_sha256`` (name → sha256), ``normalization``, ``dtype``,
    ``pipeline_version``.
    """
    settings: dict[str, Any] = {}
    preprocessing = sidecar.get("Preprocessing")
    if isinstance(preprocessing, Mapping):
        for key, name in (("TemplatePath", "template_path"), ("TemplateSHA256", "template_sha256"),
                          ("Space", "template_space"), ("CropShape", "crop_shape"),
                          ("Registration", "registration")):  # fmt: skip
            if key in preprocessing:
                settings[name] = preprocessing[key]
        if "template_path" in settings:
            settings["template"] = Path(str(settings["template_path"])).name
    elif "Space" in sidecar:
        settings["template_space"] = sidecar["Space"]
    if "Mode" in sidecar:
        settings["mode"] = sidecar["Mode"]
    parameters = sidecar.get("ModeParameters")
    if isinstance(parameters, Mapping):
        for key, name in (("PatchSize", "patch_size"), ("Stride", "stride"), ("SliceDirection", "slice_direction"),
                          ("DiscardedSlices", "discarded_slices"), ("RoiNames", "roi_names"),
                          ("RoiCrop", "roi_crop")):  # fmt: skip
            if key in parameters:
                settings[name] = parameters[key]
    if isinstance(sidecar.get("RoiMaskSHA256"), Mapping):
        settings["roi_mask_sha256"] = dict(sidecar["RoiMaskSHA256"])
    for key, name in (("Normalization", "normalization"), ("Dtype", "dtype"), ("BidsAppVersion", "pipeline_version")):
        if key in sidecar:
            settings[name] = sidecar[key]
    return settings


def settings_by_dataset(rows: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per ``dataset_id``, the settings its tensors share; a setting that differs inside one dataset is a list.

    Args:
        rows: ``(dataset_id, tensor_settings(sidecar))`` of every image.

    Returns:
        ``{dataset_id: {setting: value}}`` in first-seen order; where the dataset's images disagree on a
        setting, its value is the sorted list of the distinct values under ``"mixed"``: ``{"mixed": [...]}``.
    """
    seen: dict[str, dict[str, list[Any]]] = {}
    for dataset_id, settings in rows:
        values = seen.setdefault(dataset_id, {})
        for key, value in settings.items():
            distinct = values.setdefault(key, [])
            if value not in distinct:
                distinct.append(value)
    summary: dict[str, dict[str, Any]] = {}
    for dataset_id, values in seen.items():
        summary[dataset_id] = {
            key: distinct[0] if len(distinct) == 1 else {"mixed": sorted(distinct, key=json.dumps)}
            for key, distinct in sorted(values.items())
        }
    return summary


def settings_differences(model: Mapping[str, Any], data: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, model's value, data's value)`` for every ``MATCHED_SETTINGS`` key both record and differ on."""
    return [
        (key, model[key], data[key])
        for key in MATCHED_SETTINGS
        if key in model and key in data and _comparable(model[key]) != _comparable(data[key])
    ]


def _comparable(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
