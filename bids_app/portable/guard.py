"""The leak guard that travels with a model: plain tables of what the training pool was, not its images.

A receiving site must be able to check that none of its images were in the model's training or validation data
without receiving that data. The guard holds, for every training/validation image:

- its participant and session ids and the SHA-256 of its preprocessed and raw files (``images.tsv``);
- unless the exporter left them out, its anatomical fingerprint (``bids_app.prediction.identity``): the image
  block-averaged to 8 mm, high-passed, z-scored inside the pool's brain mask, minus the pool's mean and scaled to
  unit length, one float32 vector per image, with the pool's mask and mean (needed to fingerprint a new image
  the same way) and the pool's own calibration (the threshold above which two images are one person), in
  ``fingerprints.safetensors`` and ``fingerprints.json``.

The prediction stage builds it from a model folder and the output it was trained on
(``prediction.guard.make_guard``) and checks a new site's images against it; this module only stores and reads
it, so the archive code never needs the images.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import TYPE_CHECKING, Any

from bids_app.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

IMAGE_COLUMNS = ("participant_id", "session_id", "source_sha256", "raw_source_sha256")
IMAGES_TSV = "images.tsv"
FINGERPRINTS_JSON = "fingerprints.json"
FINGERPRINTS_ARRAYS = "fingerprints.safetensors"
FINGERPRINT_DISCLOSURE = (
    "Each fingerprint is derived from one training/validation image: the image block-averaged to about 8 mm, "
    "with its smooth 16 mm component removed, normalised, minus the training pool's mean, as one unit-length "
    "vector over the pool's brain mask (the mask and the mean ship too). It keeps the coarse shape of that "
    "person's head and brain (outline, ventricles, large sulci) at 8 mm: enough to recognise the same person in "
    "another scan, which is its purpose, so whoever holds the model can test whether a scan they have belongs to "
    "a participant of the training data (membership). It holds no voxel finer than 8 mm, no face detail, no "
    "intensities in scanner units, and no name or label; the images themselves are not in the archive. Export "
    "with --no-fingerprints to leave them out: receiving sites then cannot check for re-scans under new names."
)


@dataclasses.dataclass(frozen=True)
class Fingerprints:
    """The training pool's fingerprints and what is needed to fingerprint a new image the same way.

    Attributes:
        mask: (x, y, z) bool brain mask on the low-resolution grid.
        mean: (n_mask,) float64 pool mean of the z-scored images.
        prints: (n_images, n_mask) float32 unit-length fingerprints, in ``ids`` order.
        ids: (participant_id, session_id) of each row of ``prints``.
        calibration: the pool's own similarity figures (``prediction.identity.Calibration`` as a dict).
        fingerprint_mm, high_pass_mm: the settings they were made with.
    """

    mask: np.ndarray
    mean: np.ndarray
    prints: np.ndarray
    ids: tuple[tuple[str, str], ...]
    calibration: dict[str, Any]
    fingerprint_mm: float
    high_pass_mm: float


@dataclasses.dataclass(frozen=True, eq=False)
class TravellingGuard:
    """What a receiving site checks its images against.

    Attributes:
        images: one row per training/validation image, ``IMAGE_COLUMNS`` (``n/a`` where unknown), led by
            ``cohort`` when the model was trained on several cohorts.
        fingerprints: None when absent; ``absent_reason`` then says why.
        absent_reason: why there are no fingerprints ("" when there are).
    """

    images: pd.DataFrame
    fingerprints: Fingerprints | None
    absent_reason: str = ""

    def to_members(self, prefix: str) -> dict[str, bytes]:
        """The guard as archive members under ``prefix/`` (deterministic bytes)."""
        import numpy as np
        from safetensors.numpy import save

        from bids_app.labels import COHORT, format_label_table, sort_table

        columns = [*([COHORT] if COHORT in self.images.columns else []), *IMAGE_COLUMNS]
        images = sort_table(self.images[columns].astype(str))
        members = {f"{prefix}/{IMAGES_TSV}": format_label_table(images).encode("utf-8")}
        record: dict[str, Any] = {"Included": self.fingerprints is not None, "Disclosure": FINGERPRINT_DISCLOSURE}
        if self.fingerprints is None:
            record["Reason"] = self.absent_reason
        else:
            fp = self.fingerprints
            record.update(
                FingerprintMM=fp.fingerprint_mm,
                HighPassMM=fp.high_pass_mm,
                Grid=list(fp.mask.shape),
                Calibration=fp.calibration,
                Images=[list(pair) for pair in fp.ids],
            )
            arrays = {"mask": fp.mask.astype("uint8"), "mean": fp.mean.astype("float64"), "prints": fp.prints}
            # safetensors writes an array's memory as it lies: a Fortran-ordered mask (nibabel's volumes are)
            # would come back transposed, so every array is made C-ordered first.
            members[f"{prefix}/{FINGERPRINTS_ARRAYS}"] = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        members[f"{prefix}/{FINGERPRINTS_JSON}"] = (json.dumps(record, indent=2) + "\n").encode("utf-8")
        return members

    @classmethod
    def from_members(cls, members: dict[str, bytes], prefix: str, where: str) -> TravellingGuard:
        """Read a guard written by ``to_members`` (the archive's members, or an imported folder's files).

        Raises:
            DataError: a guard file is missing or its tables disagree.
        """
        import numpy as np
        import pandas as pd
        from safetensors.numpy import load

        try:
            images = pd.read_csv(
                io.BytesIO(members[f"{prefix}/{IMAGES_TSV}"]), sep="\t", dtype=str, keep_default_na=False
            )
            record = json.loads(members[f"{prefix}/{FINGERPRINTS_JSON}"].decode("utf-8"))
        except KeyError as exc:
            raise DataError(f"The model's leak guard in {where} lacks {exc}. Export the model again.") from None
        missing = [c for c in IMAGE_COLUMNS if c not in images.columns]
        if missing:
            raise DataError(f"{where}/{prefix}/{IMAGES_TSV} lacks column(s) {missing}. Export the model again.")
        if not record.get("Included"):
            return cls(images, None, str(record.get("Reason") or "left out by the exporter"))
        try:
            arrays = load(members[f"{prefix}/{FINGERPRINTS_ARRAYS}"])
            ids = tuple((str(p), str(s)) for p, s in record["Images"])
            fingerprints = Fingerprints(
                mask=arrays["mask"].astype(bool),
                mean=arrays["mean"].astype(np.float64),
                prints=arrays["prints"].astype(np.float32),
                ids=ids,
                calibration=dict(record["Calibration"]),
                fingerprint_mm=float(record["FingerprintMM"]),
                high_pass_mm=float(record["HighPassMM"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"The fingerprints of {where}/{prefix} are unreadable ({exc!r}). Export again.") from exc
        n_mask = int(fingerprints.mask.sum())
        if fingerprints.prints.shape != (len(ids), n_mask) or fingerprints.mean.shape != (n_mask,):
            raise DataError(
                f"The fingerprints of {where}/{prefix} disagree: {fingerprints.prints.shape} prints, "
                f"{len(ids)} images, {n_mask} mask voxels. Export the model again."
            )
        return cls(images, fingerprints)
