"""Who is in a generated cohort: identities, diagnoses, ages, kinds, re-scans of another cohort.

A cohort has ``n_subjects`` participants, ``n_subjects // 2`` of them affected (they carry the disease effect in
their images), with ages and sexes stratified by disease status so neither predicts it. The recorded diagnosis is
``AD`` for the affected unless ``random_labels`` draws it independently of the images.

Kinds of data (ClinicaDL's generators): ``atrophy`` (default) grades grey-matter loss in the hippocampal region
with ``effect_size``; ``trivial`` divides the intensity inside the region's mask by ``TRIVIAL_FACTOR`` in AD
participants (an effect any model must find); ``random`` gives every participant the same anatomy, so images
differ only by acquisition noise, pose and bias (and template-space images by Gaussian noise), and draws the
diagnoses at random: nothing is learnable.

Re-scans: the first ``n_rescans`` participants of a cohort can be re-scans of an earlier generated cohort's first
participants under this cohort's labels: the same :class:`Identity` (anatomy, diagnosis, sex), new noise, pose and
bias, imaged ``len(earlier.sessions)`` years after that cohort's baseline (a later study of the same people).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from bids_app.errors import UsageError

if TYPE_CHECKING:
    from bids_app.synthetic.anatomy import SubjectAnatomy, TemplateSpace

MIN_AGE, MAX_AGE = 60.0, 85.0
KINDS = ("atrophy", "trivial", "random")
TRIVIAL_FACTOR = 2.0  # kind="trivial": AD intensity inside the region's mask is divided by this
RANDOM_NOISE_FRACTION = 0.05  # kind="random": template-space noise sigma relative to the image maximum

# The recorded variables (participants.tsv / sessions.tsv columns) with the levels draw_cohort gives them
PARTICIPANTS_JSON: dict[str, dict[str, Any]] = {
    "participant_id": {"Description": "Participant identifier"},
    "diagnosis": {
        "Description": "Clinical diagnosis",
        "Levels": {"AD": "Alzheimer's disease", "CN": "cognitively normal"},
    },
    "age": {"Description": "Age at the first session", "Units": "year"},
    "sex": {"Description": "Sex", "Levels": {"M": "male", "F": "female"}},
}
SESSIONS_JSON = {
    "session_id": {"Description": "Session identifier: months since baseline"},
    "age": {"Description": "Age at the session", "Units": "year"},
    "diagnosis": PARTICIPANTS_JSON["diagnosis"],
}


@dataclass(frozen=True)
class Identity:
    """Who a generated participant is: the random stream of its anatomy and what its images depend on.

    Attributes:
        seed, index: the anatomy is drawn from ``default_rng([seed, 1, index])``.
        affected: carries the disease effect; ``diagnosis`` is the recorded one.
        effect_size: the ``effect_size`` of the dataset it was first generated in.
        age: years at its first generated session; ``sex``: ``M`` or ``F``.
    """

    seed: int
    index: int
    affected: bool
    diagnosis: str
    effect_size: float
    age: float
    sex: str


@dataclass(frozen=True)
class Participant:
    """One participant as this cohort records it.

    Attributes:
        label: bare participant label (``"001"``).
        affected: carries the disease effect in its images.
        diagnosis: the recorded label: ``AD`` iff affected, unless ``random_labels``.
        sex: ``M`` or ``F``.
        age: years, at this cohort's first session.
        years_later: a re-scan: years between its identity's first session and this cohort's first one.
    """

    label: str
    affected: bool
    diagnosis: str
    sex: str
    age: float
    years_later: int = 0


class EarlierCohort(Protocol):
    """What re-scans need of an earlier generated cohort (a ``synthetic.GeneratedDataset``)."""

    @property
    def participants(self) -> tuple[str, ...]: ...
    @property
    def sessions(self) -> tuple[str, ...]: ...
    @property
    def kind(self) -> str: ...
    @property
    def identities(self) -> tuple[Identity, ...]: ...


def check_cohort(
    kind: str, first_label: int, n_subjects: int, rescans_of: EarlierCohort | None, n_rescans: int
) -> None:
    """Raise ``UsageError`` for an unknown kind, a bad first label or re-scans the earlier cohort cannot give."""
    if kind not in KINDS:
        raise UsageError(f"Unknown kind {kind!r}. Choose one of: {', '.join(KINDS)}.")
    if first_label < 1:
        raise UsageError(f"first_label must be a positive integer, got {first_label}.")
    n_source = len(rescans_of.identities) if rescans_of is not None else 0
    if not 0 <= n_rescans <= min(n_source, n_subjects):
        raise UsageError(
            f"n_rescans must be 0 to {min(n_source, n_subjects)} (participants of rescans_of and of this "
            f"dataset), got {n_rescans}. Pass rescans_of=<the first GeneratedDataset>."
        )
    if rescans_of is not None and rescans_of.kind != kind:
        raise UsageError(f"rescans_of is a {rescans_of.kind!r} dataset; generate the re-scans with the same kind.")


def _draw_participants(
    n_subjects: int, n_sessions: int, seed: int, random_labels: bool, first_label: int
) -> list[Participant]:
    """Balanced groups; ages and sexes stratified by disease status so they do not predict it."""
    rng = np.random.default_rng([seed, 0])
    n_affected = n_subjects // 2
    affected = rng.permutation(np.arange(n_subjects) < n_affected)
    oldest_baseline = max(MAX_AGE - (n_sessions - 1), MIN_AGE + 1.0)
    ages = np.empty(n_subjects)
    sexes = np.empty(n_subjects, dtype=object)
    for status in (True, False):
        members = np.flatnonzero(affected == status)
        strata = (rng.permutation(len(members)) + rng.uniform(size=len(members))) / len(members)
        ages[members] = MIN_AGE + strata * (oldest_baseline - MIN_AGE)
        sexes[members] = rng.permutation(np.where(np.arange(len(members)) % 2 == 0, "F", "M"))
    diagnosed = affected
    if random_labels:
        diagnosed = np.random.default_rng([seed, 4]).permutation(np.arange(n_subjects) < n_affected)
    width = max(3, len(str(first_label + n_subjects - 1)))
    return [
        Participant(
            label=f"{first_label + i:0{width}d}",
            affected=bool(affected[i]),
            diagnosis="AD" if diagnosed[i] else "CN",
            sex=str(sexes[i]),
            age=round(float(ages[i]), 1),
        )
        for i in range(n_subjects)
    ]


def draw_cohort(
    n_subjects: int,
    n_sessions: int,
    seed: int,
    effect_size: float,
    random_labels: bool,
    first_label: int = 1,
    rescans_of: EarlierCohort | None = None,
    n_rescans: int = 0,
) -> tuple[list[Participant], list[Identity]]:
    """Draw the participants and who each one is; the first ``n_rescans`` are re-scans of ``rescans_of``'s.

    Returns:
        ``(participants, identities)``, both in label order; a re-scan keeps its label here and takes the
        earlier identity, diagnosis and sex, ``len(rescans_of.sessions)`` years older.
    """
    participants = _draw_participants(n_subjects, n_sessions, seed, random_labels, first_label)
    identities = [
        Identity(seed, i, p.affected, p.diagnosis, effect_size, p.age, p.sex) for i, p in enumerate(participants)
    ]
    if rescans_of is not None:
        later = len(rescans_of.sessions)
        for i, who in enumerate(rescans_of.identities[:n_rescans]):
            participants[i] = dataclasses.replace(participants[i], affected=who.affected, diagnosis=who.diagnosis,
                                                  sex=who.sex, age=who.age + later, years_later=later)  # fmt: skip
            identities[i] = who
    return participants, identities


def rescan_pairs(
    participants: list[Participant], rescans_of: EarlierCohort | None, n_rescans: int
) -> tuple[tuple[str, str], ...]:
    """``(label here, label in rescans_of)`` for each of the first ``n_rescans`` participants."""
    pairs = zip(participants, rescans_of.participants if rescans_of else (), strict=False)
    return tuple((p.label, label) for p, label in pairs)[:n_rescans]


def subject_anatomy(kind: str, seed: int, who: Identity) -> SubjectAnatomy:
    """The anatomy of ``who``, or the one shared by every participant of a ``random`` cohort of ``seed``."""
    from bids_app.synthetic import anatomy

    if kind == "random":
        return anatomy.random_subject(np.random.default_rng([seed, 1]), 0.0, MIN_AGE)
    rng = np.random.default_rng([who.seed, 1, who.index])
    severity = who.effect_size * rng.uniform(0.75, 1.25) * who.affected  # drawn for all: aligned streams
    return anatomy.random_subject(rng, 0.0 if kind == "trivial" else severity, who.age)


def apply_kind(kind: str, affected: bool, image: np.ndarray, space: TemplateSpace, noise_key: list[int]) -> np.ndarray:
    """The ``trivial`` mask effect (affected) or the ``random`` template-space noise on a template-space image.

    Args:
        kind: the cohort's kind; ``atrophy`` returns ``image`` unchanged (its effect is in the anatomy).
        affected: whether the participant carries the disease effect.
        image: template-space volume on ``space``'s grid, float32.
        space: the template grid, whose ``roi_mask()`` the ``trivial`` effect uses.
        noise_key: seed sequence of the ``random`` kind's Gaussian noise.
    """
    if kind == "trivial" and affected:
        return image * np.where(space.roi_mask() > 0, np.float32(1.0 / TRIVIAL_FACTOR), np.float32(1.0))
    if kind == "random":
        sigma = np.float32(RANDOM_NOISE_FRACTION * float(image.max()))  # the maximum is near white matter
        noise = np.random.default_rng(noise_key).standard_normal(image.shape, dtype=np.float32)
        return np.where(image > 0, np.clip(image + sigma * noise, 0.0, None), np.float32(0.0))
    return image
