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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

UNKNOWN = "n/a"
DATASET_COLUMNS = ("dataset_name", "dataset_doi", "dataset_id")
IDENTITY_IGNORED_KEYS = ("BIDSVersion", "DatasetVersion", "DatasetLinks", "HEDVersion")
SIDECAR_KEY = "SourceDataset"  # tensor sidecar key holding {"Name", "DOI", "ID"}
CHANNEL_PATHS = "channel_paths"  # index column: a session's tensor of each channel, in channel order
# The participant-level settings two groups of tensors must share for one model to read both. Registration
# flavour, dtype and pipeline version are recorded but not matched: they change precision, not what a voxel means.
MATCHED_SETTINGS = (
    "template_sha256",
    "crop_shape",
    "mode",
    "image_voxel_size",
    "patch_size",
    "stride",
    "slice_direction",
    "discarded_slices",
    "roi_names",
    "roi_crop",
    "roi_mask_sha256",
    "normalization",
    "custom_maps",
)
# The settings every channel of one sample must share (``channel_settings``): what a voxel means, plus the dtype.
CHANNEL_SETTINGS = (*(key for key in MATCHED_SETTINGS if key != "custom_maps"), "dtype")


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
    ``registration``, ``mode``, ``image_voxel_size`` (image mode: mm, None on the template grid), ``patch_size``,
    ``stride``, ``slice_direction``, ``discarded_slices``, ``roi_names``, ``roi_crop``, ``roi_mask_path`` and
    ``roi_mask_sha256`` (name → path, sha256), ``normalization``, ``dtype``, ``pipeline_version``, and for a
    custom map ``custom_map`` (its ``--custom-map`` value, ``NAME=ENTITY:VALUE,...``) and ``custom_map_space``
    (the space its files were in).
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
    if settings.get("mode") == "image":  # absent from ModeParameters on the template grid (and before the option)
        voxel_size = parameters.get("VoxelSize") if isinstance(parameters, Mapping) else None
        settings["image_voxel_size"] = None if voxel_size is None else float(voxel_size)
    masks = sidecar.get("RoiMasks")
    if isinstance(masks, Mapping) and masks:
        settings["roi_mask_path"] = {str(name): str(mask.get("Path")) for name, mask in masks.items()}
        settings["roi_mask_sha256"] = {str(name): str(mask.get("SHA256")) for name, mask in masks.items()}
    for key, name in (("Normalization", "normalization"), ("Dtype", "dtype"), ("BidsAppVersion", "pipeline_version")):
        if key in sidecar:
            settings[name] = sidecar[key]
    custom_map = sidecar.get("CustomMap")
    if isinstance(custom_map, Mapping) and isinstance(custom_map.get("Filters"), list):
        pairs = ",".join(f"{entity}:{value}" for entity, value in custom_map["Filters"])
        settings["custom_map"] = f"{custom_map.get('Name')}={pairs}"
        settings["custom_map_space"] = custom_map.get("SourceSpace")
    return settings


def channel_kind_name(path: Path) -> str:
    """The image kind (``bids_app.kinds`` name) of a tensor file: its suffix, ``pet-<tracer>`` for a PET."""
    stem = Path(path).name.split(".")[0]
    suffix = stem.rsplit("_", 1)[-1]
    if suffix == "pet":
        tracer = next((part[4:] for part in stem.split("_") if part.startswith("trc-")), None)
        return f"pet-{tracer}" if tracer else suffix
    return suffix


def channel_settings(paths: Sequence[Path]) -> dict[str, Any]:
    """The settings of one sample whose channels are the tensors ``paths`` (in channel order).

    Every channel must have been made with the same ``CHANNEL_SETTINGS`` (template, crop, mode parameters,
    normalisation, dtype...): the first channel's are the sample's. The kinds the channels need are added, under
    the participant-level options that make them: ``contrasts`` (T2w, FLAIR), ``pet_tracers`` and
    ``custom_maps`` (each map's ``--custom-map`` value, from its sidecar), each only when there is one.

    Raises:
        DataError: two channels made with different settings (both files and values named).
    """
    from bids_app.errors import DataError
    from bids_app.extraction.storage import read_sidecar
    from bids_app.kinds import ANATOMICAL_SUFFIXES, T1W

    per_channel = [tensor_settings(read_sidecar(Path(str(path)))) for path in paths]
    first = per_channel[0]
    for path, other in zip(paths[1:], per_channel[1:], strict=True):
        for key in CHANNEL_SETTINGS:
            if _comparable(first.get(key)) != _comparable(other.get(key)):
                raise DataError(
                    f"The channels {Path(str(paths[0])).name} and {Path(str(path)).name} of one sample were made with "
                    f"different {key} ({_shown(key, first.get(key), first)} vs {_shown(key, other.get(key), other)})"
                    f": {paths[0]} vs {path}. Stacked as channels they must be prepared alike: re-run the participant "
                    "level for all the kinds with the same options (--overwrite)."
                )
    settings = {key: value for key, value in first.items() if key not in ("custom_map", "custom_map_space")}
    kinds = [channel_kind_name(Path(str(path))) for path in paths]
    needed = {
        "contrasts": [kind for kind in kinds if kind in ANATOMICAL_SUFFIXES and kind != T1W],
        "pet_tracers": [kind.removeprefix("pet-") for kind in kinds if kind.startswith("pet-")],
        "custom_maps": [other["custom_map"] for other in per_channel if "custom_map" in other],
    }
    settings.update({key: values for key, values in needed.items() if values})
    return settings


def settings_by_dataset(rows: Iterable[tuple[DatasetIdentity, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per dataset, the settings its tensors were made with (the model record's ``participant_settings``).

    Args:
        rows: ``(identity, tensor_settings(sidecar))`` of every image.

    Returns:
        One entry per dataset in first-seen order: ``dataset_id``, ``dataset_name``, ``dataset_doi``,
        ``n_images`` and ``settings``; a setting on which the dataset's images disagree is
        ``{"mixed": [distinct values]}``.
    """
    seen: dict[DatasetIdentity, tuple[int, dict[str, list[Any]]]] = {}
    for identity, settings in rows:
        count, values = seen.get(identity, (0, {}))
        for key, value in settings.items():
            distinct = values.setdefault(key, [])
            if value not in distinct:
                distinct.append(value)
        seen[identity] = (count + 1, values)
    return [
        {
            "dataset_id": identity.dataset_id,
            "dataset_name": identity.name,
            "dataset_doi": identity.doi,
            "n_images": count,
            "settings": {
                key: distinct[0] if len(distinct) == 1 else {"mixed": sorted(distinct, key=_comparable)}
                for key, distinct in sorted(values.items())
            },
        }
        for identity, (count, values) in seen.items()
    ]


def read_settings(table: Any) -> list[dict[str, Any]]:
    """``settings_by_dataset`` of the images of an index table (``tensor_path`` or, with several channels,
    ``channel_paths``, and ``DATASET_COLUMNS``): every channel's sidecar is read (``channel_settings``).

    Raises:
        DataError: the channels of one sample were made with different settings.
    """
    columns = [table[c].astype(str) if c in table.columns else [UNKNOWN] * len(table) for c in DATASET_COLUMNS]
    channels = table[CHANNEL_PATHS] if CHANNEL_PATHS in table.columns else [(p,) for p in table["tensor_path"]]
    rows = []
    for paths, name, doi, dataset_id in zip(channels, *columns, strict=True):
        rows.append((DatasetIdentity(name, doi, dataset_id), channel_settings(list(paths))))
    return settings_by_dataset(rows)


def common_settings(per_dataset: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The settings every dataset of ``settings_by_dataset`` shares (a mixed or differing one is left out)."""
    entries = [dict(entry.get("settings", {})) for entry in per_dataset]
    if not entries:
        return {}
    return {
        key: value
        for key, value in entries[0].items()
        if not _is_mixed(value) and all(key in e and _comparable(e[key]) == _comparable(value) for e in entries)
    }


def _is_mixed(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"mixed"}


# setting → (config section, key, command-line flag) of the participant level
CONFIG_KEYS = {
    "template_path": ("preprocess", "template_path", "--template"),
    "template_space": ("preprocess", "template_space", "--template-space"),
    "crop_shape": ("preprocess", "crop_shape", "--crop-shape"),
    "registration": ("preprocess", "registration", "--registration"),
    "mode": ("extraction", "modes", "--modes"),
    "image_voxel_size": ("extraction", "image_voxel_size", "--image-voxel-size"),
    "patch_size": ("extraction", "patch_size", "--patch-size"),
    "stride": ("extraction", "stride", "--stride"),
    "slice_direction": ("extraction", "slice_direction", "--slice-direction"),
    "discarded_slices": ("extraction", "discarded_slices", "--discarded-slices"),
    "roi_mask_path": ("extraction", "roi_masks", "--roi-mask"),
    "roi_crop": ("extraction", "roi_crop", "--roi-crop"),
    "normalization": ("extraction", "normalization", "--normalization"),
    "dtype": ("extraction", "dtype", "--tensor-dtype"),
    # the kinds a model's channels need (``channel_settings``): a participant run adds them to its own
    "contrasts": ("preprocess", "contrasts", "--contrasts"),
    "pet_tracers": ("preprocess", "pet_tracers", "--pet-tracer"),
    "custom_maps": ("preprocess", "custom_maps", "--custom-map"),
}
KIND_KEYS = ("contrasts", "pet_tracers", "custom_maps")


def settings_to_nested(settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The configuration keys (``{"preprocess": {...}, "extraction": {...}}``) that reproduce ``settings``."""
    from bids_app.config_file import NONE_SPELLING

    nested: dict[str, dict[str, Any]] = {"preprocess": {}, "extraction": {}}
    for key, (section, name, _) in CONFIG_KEYS.items():
        if key not in settings or _is_mixed(settings[key]):
            continue
        value = settings[key]
        if key == "mode":
            value = [value]
        elif key == "roi_mask_path":
            names = settings.get("roi_names") or list(value)
            value = [[str(n), str(value[n])] for n in names if n in value]
        elif value is None:
            value = NONE_SPELLING
        nested[section][name] = value
    return nested


def with_participant_settings(cfg: Any, per_dataset: Iterable[Mapping[str, Any]]) -> Any:
    """``cfg`` (a ``RunConfig``) with the participant-level settings its tensors were really made with.

    A group run's configuration otherwise holds the defaults of options it never used (crop, template...):
    the model folder and the run's ``config.toml`` must describe the data instead. Settings that differ between
    datasets keep the run's value (the model record's ``participant_settings`` lists them per dataset).
    """
    from bids_app.config_file import config_to_nested, merge_nested, resolve_config

    update = settings_to_nested(common_settings(per_dataset))
    return resolve_config(merge_nested(config_to_nested(cfg), update))


def settings_differences(model: Mapping[str, Any], data: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, model's value, data's value)`` for every ``MATCHED_SETTINGS`` key both record and differ on."""
    return [
        (key, model[key], data[key])
        for key in MATCHED_SETTINGS
        if key in model and key in data and _comparable(model[key]) != _comparable(data[key])
    ]


def _comparable(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _shown(key: str, value: Any, settings: Mapping[str, Any]) -> str:
    """A setting's value as a message shows it (a template by file name and checksum)."""
    if key == "template_sha256":
        name = settings.get("template", "template")
        return f"{name} (sha256 {str(value)[:12]}…)"
    if key == "image_voxel_size":
        return "none (the template grid)" if value is None else f"{float(value):g} mm"
    return json.dumps(value) if not isinstance(value, str) else value


def check_same_settings(
    model_settings: Iterable[Mapping[str, Any]], data_settings: Iterable[Mapping[str, Any]], where: Path, maps_dir: Path
) -> None:
    """Refuse tensors made with other participant-level settings than the model's (``MATCHED_SETTINGS``).

    Args:
        model_settings: the model's ``participant_settings`` (``settings_by_dataset``); none recorded (a model
            folder from before they were) skips the check.
        data_settings: ``settings_by_dataset`` of the tensors to predict.
        where: the participant-level output the tensors are in.
        maps_dir: the model folder, named in the fix.

    Raises:
        DataError: one line naming the first differing setting, both values and the fix (``--from-model``).
    """
    from bids_app.errors import DataError

    model_entries = list(model_settings)
    reference = common_settings(model_entries)
    if not reference:
        return
    for entry in data_settings:
        settings = entry.get("settings", {})
        for key, model_value, data_value in settings_differences(reference, settings):
            raise DataError(
                f"The tensors of {where} (dataset {entry.get('dataset_name', UNKNOWN)!r}) were made with {key} "
                f"{_shown(key, data_value, settings)}, but model {Path(maps_dir).name} was trained on tensors made "
                f"with {key} {_shown(key, model_value, reference)}. Re-run the participant level on that dataset "
                f"with --from-model {maps_dir} --overwrite to prepare them like the model's tensors."
            )


def model_participant_config(nested: Mapping[str, Any], maps_dir: Path) -> dict[str, Any]:
    """``nested`` (the explicit options of a participant run) completed with a model's participant settings.

    ``--from-model MAPS``: the template file, crop, registration, the model's mode and its parameters,
    normalisation, dtype and ROI masks are copied from the model folder's ``participant_settings``, so a new
    site prepares its data like the model's training data in one command. An option given explicitly (flag or
    ``--config`` file) must agree with the model: ``--modes`` must include the model's mode, ``--template`` and
    ``--roi-mask`` files must have the model's checksums. The kinds of the model's channels are added too
    (``--contrasts``, ``--pet-tracer``, ``--custom-map`` with the model's filters): a given list must hold them.

    Raises:
        UsageError: an explicit option contradicts the model (both values named).
        InputMissingError: the model's template (or an ROI mask) is not where the model recorded it, and no
            copy was given.
        DataError: the model folder records no participant settings.
    """
    from bids_app.config_file import merge_nested
    from bids_app.derivatives import file_sha256
    from bids_app.errors import DataError, InputMissingError, UsageError
    from bids_app.kinds import parse_custom_map
    from bids_app.maps import Maps
    from bids_app.template import default_template_path

    maps = Maps.open(Path(maps_dir))
    settings = common_settings(maps.participant_settings)
    if not settings:
        raise DataError(
            f"Model folder {maps_dir} records no participant-level settings (made before bids_app recorded them). "
            "Give the participant-level options yourself, as in the 'config' of its record."
        )
    wanted = settings_to_nested(settings)
    explicit = {section: dict(nested.get(section, {})) for section in ("preprocess", "extraction")}

    def refuse(flag: str, given: Any, expected: Any) -> None:
        raise UsageError(
            f"{flag} {given} contradicts --from-model {maps_dir}, whose tensors were made with {flag} {expected}. "
            f"Drop {flag} (the model's value is used) or prepare the data for another model."
        )

    template_sha = settings.get("template_sha256")
    given_template = explicit["preprocess"].get("template_path")
    if given_template is not None and template_sha and Path(str(given_template)).is_file():
        sha = file_sha256(Path(str(given_template)))
        if sha != template_sha:
            refuse("--template", f"{given_template} (sha256 {sha[:12]}…)", _shown("template_sha256", template_sha,
                                                                                   settings))  # fmt: skip
    elif given_template is None and "template_path" in settings:
        recorded = Path(str(settings["template_path"]))
        if not recorded.is_file() or (template_sha and file_sha256(recorded) != template_sha):
            default = default_template_path()
            if template_sha and default.is_file() and file_sha256(default) == template_sha:
                wanted["preprocess"]["template_path"] = str(default)
            else:
                raise InputMissingError(
                    f"Model {maps.name} was trained on tensors registered to template {recorded.name} (sha256 "
                    f"{str(template_sha)[:12]}…), which is not at {recorded} (or changed since). Pass a copy of it "
                    "with --template PATH (its sha256 is checked)."
                )
    given_modes = explicit["extraction"].get("modes")
    if given_modes is not None and "mode" in settings and settings["mode"] not in [str(m) for m in given_modes]:
        refuse("--modes", " ".join(str(m) for m in given_modes), settings["mode"])
    masks = settings.get("roi_mask_sha256") or {}
    given_masks = explicit["extraction"].get("roi_masks")
    if given_masks is not None and masks:
        for name, path in given_masks:
            mask_sha = file_sha256(Path(path)) if Path(path).is_file() else None
            if name not in masks or (mask_sha is not None and mask_sha != masks[name]):
                refuse("--roi-mask", f"{name}={path}", ", ".join(f"{n} (sha256 {s[:12]}…)" for n, s in masks.items()))
    elif masks:
        for name, path in wanted["extraction"].get("roi_masks") or []:
            if not Path(path).is_file() or file_sha256(Path(path)) != masks.get(name):
                raise InputMissingError(
                    f"Model {maps.name} was trained with ROI mask {name} (sha256 {str(masks.get(name))[:12]}…), which "
                    f"is not at {path} (or changed since). Pass a copy of it with --roi-mask {name}=PATH (its sha256 "
                    "is checked)."
                )
    for key in KIND_KEYS:  # the model's channels: a given list must hold them (more kinds are harmless)
        section, name, flag = CONFIG_KEYS[key]
        given, needed = explicit[section].get(name), wanted[section].get(name)
        if given is None or not needed:
            continue
        if key == "custom_maps":
            given_maps = {m.name: dict(m.filters) for m in map(parse_custom_map, given)}
            lacking = [spec for spec in needed if given_maps.get(parse_custom_map(spec).name) !=
                       dict(parse_custom_map(spec).filters)]  # fmt: skip
        else:
            lacking = [value for value in needed if value not in [str(g) for g in given]]
        if lacking:
            refuse(flag, _plain_value(given), _plain_value(needed))
    for key, (section, name, flag) in CONFIG_KEYS.items():
        if key in ("template_path", "mode", "roi_mask_path", *KIND_KEYS) or name not in explicit[section]:
            continue
        given, expected = explicit[section][name], wanted[section].get(name)
        if key == "image_voxel_size" and isinstance(given, int) and not isinstance(given, bool):
            given = float(given)  # a TOML file's 2 is the model's 2.0
        if name in wanted[section] and _comparable(given) != _comparable(expected):
            refuse(flag, _plain_value(explicit[section][name]), _plain_value(expected))
    return merge_nested(wanted, nested)


def _plain_value(value: Any) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
