"""The interpret stage: saliency maps of a trained model, written as NIfTI on the preprocessed images' grid.

For every trained split, the model ``split-<k>/best-<metric>`` explains each image of a group (default
``test``, i.e. ``groups/test/data.tsv``) with each method of ``bids_app.interpret.saliency``. Maps of patches, slices
and regions are put back where the part came from (overlaps averaged, uncovered voxels 0), so every map has
the shape and affine of the preprocessed image the tensor was cut from (the tensor sidecar's ``Source``).
Outputs, under ``split-<k>/best-<metric>/<group>/interpret/``::

    targets.tsv                                     per image: true, predicted and explained class
    <method>/interpretation.json                    method, target, model file and its SHA-256, ...
    <method>/sub-<p>[_ses-<s>]_desc-<label>_saliency.nii.gz          one per image
    <method>/class-<name>_desc-<label>_mean_saliency.nii.gz          mean over the images explained for <name>

``<label>`` is the method name without underscores (``gradcam``), a valid BIDS label. The grids, NIfTI
writing and mean maps are in ``bids_app.interpret.volumes``. See docs/interpretation.md.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bids_app import read_version
from bids_app.config import ExtractionMode, InterpretConfig, RunConfig, Task
from bids_app.derivatives import atomic_write_json, atomic_write_text, file_sha256
from bids_app.errors import ConfigError
from bids_app.interpret.saliency import SaliencyMethod, stitch_parts
from bids_app.interpret.volumes import (
    ClassMeans,
    ImageGrid,
    map_name,
    read_tensor_grid,
    remove_stale_maps,
    to_source_grid,
    write_map,
)
from bids_app.labels import COHORT
from bids_app.labels import NA as MISSING
from bids_app.maps import Maps, MapsRecord

if TYPE_CHECKING:
    import torch

    from bids_app.data.dataset import TensorDataset
    from bids_app.data.tables import GroupTable

log = logging.getLogger(__name__)

TARGETS = ("predicted", "true")
TARGETS_TSV = "targets.tsv"
METADATA_JSON = "interpretation.json"


# -- options --------------------------------------------------------------------------------------------


def check_interpret_config(cfg: InterpretConfig) -> tuple[tuple[SaliencyMethod, ...], str]:
    """The methods and the target of ``cfg``, checked.

    Raises:
        ConfigError: an unknown method (with a did-you-mean), no method, an unknown target, ``n_steps < 1``.
    """
    names = [m.value for m in SaliencyMethod]
    methods: list[SaliencyMethod] = []
    for name in cfg.methods:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown saliency method '{name}'.{hint} Available: {', '.join(names)}.")
        if SaliencyMethod(name) not in methods:
            methods.append(SaliencyMethod(name))
    if not methods:
        raise ConfigError(f"No saliency method given. Pass --interpret-methods with some of: {', '.join(names)}.")
    if cfg.target not in TARGETS:
        raise ConfigError(f"Unknown interpret target '{cfg.target}'. Use --interpret-target predicted or true.")
    if cfg.n_steps < 1:
        raise ConfigError(f"interpret.n_steps is {cfg.n_steps}; integrated gradients need n_steps >= 1.")
    return tuple(methods), cfg.target


# -- the stage ------------------------------------------------------------------------------------------


def group_rows(cfg: RunConfig, maps: Maps, table: GroupTable, split: int) -> GroupTable:
    """Labels and tensors of the images of ``cfg.interpret.group_name`` for ``split``.

    ``test`` is ``groups/test/data.tsv``; ``train`` and ``validation`` the split's own; another name is the
    group predicted from ``--predict-from`` under ``--group-name`` (the same flags as the predict stage).

    Raises:
        ConfigError: an unknown group name.
    """
    from bids_app.data.tables import external_table, rows_for

    name = cfg.interpret.group_name
    if name == "test":
        return rows_for(maps.splits.test, table, "test group")
    if name in ("train", "validation"):
        fold = {f.index: f for f in maps.splits.folds}[split]
        return rows_for(fold.train if name == "train" else fold.validation, table, f"{name} group of split {split}")
    if cfg.predict.predict_from is not None and name == cfg.predict.group_name:
        record = maps.record
        return external_table(cfg.predict.predict_from, record.mode, record.config.labels, record.kinds)
    raise ConfigError(
        f"Unknown interpret group '{name}'. Use test, train or validation, or the --group-name given with "
        "--predict-from (pass both flags again with --stages interpret)."
    )


def run_interpret_stage(cfg: RunConfig, maps: Maps, table: GroupTable) -> None:
    """Write saliency maps for every trained split (module docstring).

    Args:
        cfg: the run configuration (``cfg.interpret``, ``cfg.runtime``, ``cfg.train.splits``; ``cfg.predict``'s
            external group; ``cfg.extraction.roi_masks`` for roi models).
        maps: the opened model folder; its record decides mode, task and class order.
        table: labels joined with ``data.tables.index_tensors`` of OUTPUT_DIR for the model's mode.

    Raises:
        ConfigError: bad interpret options, a model that is not a classifier.
        InputMissingError: no trained split, model or preprocessed image.
        DataError: a tensor that does not fit its preprocessed image.
    """
    from bids_app.runtime import resolve_device

    methods, target = check_interpret_config(cfg.interpret)
    record = maps.record
    if record.task is not Task.CLASSIFICATION:
        raise ConfigError(
            f"--stages interpret explains classifiers; the model in {maps.root} does {record.task.value}. "
            "Drop interpret from --stages for this model."
        )
    metric = cfg.interpret.selection_metric or record.config.train.selection_metrics[0]
    device = resolve_device(cfg.runtime.device)
    for split in maps.trained_splits(cfg.train.splits):
        model_path = maps.model_path(split, metric)
        rows = group_rows(cfg, maps, table, split)
        out_dir = maps.layout.group_dir(split, metric, cfg.interpret.group_name) / "interpret"
        explainer = GroupExplainer(cfg, record, maps.load_model(split, metric, device), methods, target)
        explainer.explain(rows, out_dir)
        model_info = {
            "Split": split,
            "SelectionMetric": metric,
            "ModelFile": model_path.relative_to(maps.root).as_posix(),
            "ModelSHA256": file_sha256(model_path),
        }
        for method in methods:
            atomic_write_json(out_dir / method.value / METADATA_JSON, explainer.metadata(method, model_info))
        log.info("Split %d: %s maps of %d image(s) in %s", split, ", ".join(methods), len(rows), out_dir)


class GroupExplainer:
    """Saliency maps of one model for the images of one group (used by :func:`run_interpret_stage`)."""

    def __init__(
        self, cfg: RunConfig, record: MapsRecord, model: torch.nn.Module, methods: Sequence[SaliencyMethod], target: str
    ) -> None:
        from bids_app.interpret.saliency import saliency_function
        from bids_app.runtime import batch_memory_format, set_memory_format

        self.cfg, self.record, self.model, self.target = cfg, record, model, target
        self.memory_format = batch_memory_format(len(record.input_shape) + 1, cfg.runtime.channels_last)
        set_memory_format(model, self.memory_format)  # --channels-last: the model and every batch (_batches)
        self.methods = tuple(methods)
        self.functions = {m: saliency_function(m, model, n_steps=cfg.interpret.n_steps) for m in self.methods}
        encoding = record.label_encoding or {}
        self.class_names = sorted(encoding, key=encoding.__getitem__)
        self.class_counts: dict[str, int] = {}
        self._masks: dict[tuple[bytes, tuple[int, ...]], list[np.ndarray]] = {}

    def explain(self, rows: GroupTable, out_dir: Path) -> None:
        """Write each image's maps, the per-class means and ``targets.tsv`` under ``out_dir``."""
        from bids_app.data.dataset import TensorDataset

        dataset = TensorDataset(rows, self.record.mode, self.record.task, label_encoding=self.record.label_encoding)
        try:
            self._explain(dataset, rows, out_dir)
        finally:
            dataset.close()

    def _explain(self, dataset: TensorDataset, rows: pd.DataFrame, out_dir: Path) -> None:
        from tqdm import tqdm

        labels = dataset.sample_targets
        if self.target == "true" and labels is not None and (labels < 0).any():
            raise ConfigError(
                f"--interpret-target true needs labels, but {int((labels < 0).sum())} sample(s) of group "
                f"'{self.cfg.interpret.group_name}' have none. Use --interpret-target predicted."
            )
        ends = np.cumsum(np.asarray(rows["n_parts"], dtype=np.int64))
        means = ClassMeans()
        target_rows = []
        written: set[Path] = set()
        for i in tqdm(range(len(rows)), desc="interpret", unit="image", disable=None):
            row = rows.iloc[i]
            grid, parameters, tensor_grid = read_tensor_grid(Path(row["tensor_path"]), self.record.mode)
            samples = range(int(ends[i] - row["n_parts"]), int(ends[i]))
            x = np.stack([dataset.read_sample(j) for j in samples])
            true_index = -1 if labels is None else int(labels[samples.start])
            predicted = self._predict(x)
            explained = true_index if self.target == "true" else predicted
            masks = self._roi_masks(grid, parameters) if self.record.mode is ExtractionMode.ROI else []
            for method in self.methods:
                part_maps = self._saliency(method, x, explained)
                if tensor_grid is not None:  # image mode on a coarser grid: explained there, mapped back
                    coarse = stitch_parts(part_maps, self.record.mode, parameters, tensor_grid.shape, masks)
                    volume = to_source_grid(coarse, tensor_grid, grid)
                else:
                    volume = stitch_parts(part_maps, self.record.mode, parameters, grid.shape, masks)
                # two cohorts' sub-001 are two people: a multi-cohort group's maps go to one folder per cohort
                cohort_dir = f"cohort-{row[COHORT]}" if COHORT in rows.columns else ""
                file_name = map_name(str(row["participant_id"]), str(row["session_id"]), method)
                path = out_dir / method.value / cohort_dir / file_name
                write_map(path, volume, grid)
                written.add(path)
                means.add(method, explained, volume)
            means.count(grid, explained)
            name = self.class_names
            target_rows.append({**({COHORT: row[COHORT]} if COHORT in rows.columns else {}),
                                "participant_id": row["participant_id"], "session_id": row["session_id"],
                                "true_label": name[true_index] if true_index >= 0 else MISSING,
                                "predicted_label": name[predicted], "target_label": name[explained]})  # fmt: skip
        self.class_counts = {self.class_names[k]: n for k, n in sorted(means.counts.items())}
        written |= means.write(out_dir, self.class_names)
        remove_stale_maps(out_dir, self.methods, written)
        text = pd.DataFrame(target_rows).to_csv(sep="\t", index=False, lineterminator="\n")
        atomic_write_text(out_dir / TARGETS_TSV, text)

    def metadata(self, method: SaliencyMethod, model_info: Mapping[str, Any]) -> dict[str, Any]:
        """The content of ``<method>/interpretation.json``."""
        from bids_app.models import grad_cam_layer

        content: dict[str, Any] = {
            "Method": method.value,
            "Description": method.description,
            "Target": self.target,
            "Group": self.cfg.interpret.group_name,
            "Architecture": self.record.architecture,
            "Mode": self.record.mode.value,
            "Channels": list(self.record.config.train.channels),
            "ChannelCombination": method.channel_combination,
            **model_info,
            "Classes": self.class_names,
            "ImagesPerTargetClass": self.class_counts,
            "BidsAppVersion": read_version(),
        }
        if method is SaliencyMethod.GRAD_CAM:
            layer = grad_cam_layer(self.model)
            content["Layer"] = next(n for n, m in self.model.named_modules() if m is layer)
        if method is SaliencyMethod.INTEGRATED_GRADIENTS:
            content.update({"Baseline": "zeros", "NSteps": self.cfg.interpret.n_steps})
        return content

    # -- helpers --------------------------------------------------------------------------------------

    def _batches(self, x: np.ndarray) -> list[torch.Tensor]:
        import torch

        device = next(self.model.parameters()).device
        size = max(1, self.cfg.runtime.inference_batch_size)
        batches = (torch.from_numpy(x[i : i + size]) for i in range(0, len(x), size))
        return [batch.to(device, memory_format=self.memory_format) for batch in batches]

    def _predict(self, x: np.ndarray) -> int:
        """The image's predicted class: arg max of its parts' mean softmax (one part in image mode)."""
        import torch

        with torch.inference_mode():
            probabilities = torch.cat([torch.softmax(self.model(b).float(), dim=1).cpu() for b in self._batches(x)])
        return int(probabilities.mean(dim=0).argmax())

    def _saliency(self, method: SaliencyMethod, x: np.ndarray, target: int) -> np.ndarray:
        import torch

        maps = []
        for batch in self._batches(x):
            targets = torch.full((len(batch),), target, dtype=torch.int64, device=batch.device)
            maps.append(self.functions[method](batch, targets).detach().cpu().numpy())
        return np.concatenate(maps)

    def _roi_masks(self, grid: ImageGrid, parameters: Mapping[str, Any]) -> list[np.ndarray]:
        """The ROI masks of the extraction, aligned to ``grid`` (cached per grid)."""
        import nibabel as nib

        from bids_app.extraction.roi import load_roi_masks

        key = (grid.affine.tobytes(), grid.shape)
        if key not in self._masks:
            names = [str(n) for n in parameters.get("RoiNames", [])]
            given = dict(self.cfg.extraction.roi_masks) or dict(self.record.config.extraction.roi_masks)
            missing = [n for n in names if n not in given]
            if missing:
                raise ConfigError(
                    f"The model's regions {names} were cut with masks this run does not know ({missing}). Pass "
                    "the masks of the extraction again: --roi-mask NAME=PATH for each."
                )
            image = nib.load(grid.source_path)
            assert isinstance(image, nib.Nifti1Image)  # read_grid checked it
            aligned = load_roi_masks([(n, Path(given[n])) for n in names], image)
            self._masks[key] = [aligned[n] for n in names]
        return self._masks[key]
