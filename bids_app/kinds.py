"""Image kinds: what one tensor file holds (T1w, T2w, FLAIR, a PET tracer, a user's template-space map).

A kind has one name, the one users type (``--channels T1w FLAIR``) and that outputs show; in file names it is
a BIDS suffix plus, for PET, the tracer entity:

=============  ========================  ==============================================================
kind name      file names                from
=============  ========================  ==============================================================
``T1w``        ``..._T1w``               raw BIDS ``anat/*_T1w`` (t1-linear) or a CAPS / derivative
``T2w``        ``..._T2w``               raw BIDS ``anat/*_T2w`` (registered to the session's T1w)
``FLAIR``      ``..._FLAIR``             raw BIDS ``anat/*_FLAIR`` (registered to the session's T1w)
``pet-<trc>``  ``..._trc-<trc>_..._pet`` raw BIDS ``pet/*_trc-<trc>_pet`` (pet-linear) or preprocessed
``<name>``     ``..._<name>``            a template-space map of a derivative dataset (``--custom-map``)
=============  ========================  ==============================================================

A custom map's name is the user's (letters and digits, starting with a lower-case letter; never a BIDS suffix
such as ``T1w``, ``FLAIR`` or ``pet`` in any case, so it never collides with a kind's files).
"""

from __future__ import annotations

import dataclasses
import re

from bids_app.errors import ConfigError

T1W = "T1w"
ANATOMICAL_SUFFIXES = ("T1w", "T2w", "FLAIR")  # raw anatomical kinds, registered through the session's T1w
PET_SUFFIX = "pet"
_PET_NAME = re.compile(r"^pet-(?P<tracer>[A-Za-z0-9]+)$")
CUSTOM_NAME = re.compile(r"^[a-z][A-Za-z0-9]*$")
# BIDS suffixes a custom map may not take in any case: ``flair`` would pass CUSTOM_NAME, but ``--channels flair``
# is refused as a case slip of FLAIR, and ``..._flair`` / ``..._FLAIR`` files collide on case-insensitive disks.
RESERVED_SUFFIXES = (*ANATOMICAL_SUFFIXES, PET_SUFFIX, "PDw", "T2starw", "PDT2", "angio", "T1map", "T2map",
                     "T2starmap", "R1map", "R2map", "R2starmap", "PDmap", "UNIT1", "MTsat", "bold", "dwi", "asl",
                     "m0scan", "mask")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ImageKind:
    """One kind of image.

    Attributes:
        name: what users type and outputs show (``T1w``, ``FLAIR``, ``pet-FDG``, ``gm``).
        suffix: the last part of its file names (``T1w``, ``FLAIR``, ``pet``, ``gm``).
        extra_entities: entities between session and space in its file names (``trc-FDG``), or ``""``.
        custom: a user's template-space map (``--custom-map``), not a BIDS modality.
    """

    name: str
    suffix: str
    extra_entities: str = ""
    custom: bool = False

    @property
    def tracer(self) -> str | None:
        return self.extra_entities.removeprefix("trc-") if self.suffix == PET_SUFFIX else None


def parse_kind(name: str, custom_names: tuple[str, ...] | None = None) -> ImageKind:
    """The kind called ``name``.

    Args:
        name: ``T1w``, ``T2w``, ``FLAIR``, ``pet-<tracer>`` or a custom map's name.
        custom_names: the custom maps that exist (None: any well-formed custom name is accepted).

    Raises:
        ConfigError: a name that is none of these.
    """
    if name in ANATOMICAL_SUFFIXES:
        return ImageKind(name, name)
    match = _PET_NAME.match(name)
    if match:
        return ImageKind(name, PET_SUFFIX, f"trc-{match.group('tracer')}")
    if CUSTOM_NAME.match(name) and name != PET_SUFFIX and (custom_names is None or name in custom_names):
        return ImageKind(name, name, custom=True)
    known = [*ANATOMICAL_SUFFIXES, "pet-<tracer>", *(custom_names or ())]
    raise ConfigError(
        f"Unknown image kind {name!r}. Use one of {', '.join(known)}"
        + ("" if custom_names is not None else ", or a custom map's name (lower-case letter, then letters/digits)")
        + "."
    )


def pet_kind(tracer: str) -> ImageKind:
    """The kind of a PET of ``tracer``."""
    return parse_kind(f"pet-{tracer}")


@dataclasses.dataclass(frozen=True)
class CustomMap:
    """A user's template-space map (``--custom-map NAME=ENTITY:VALUE[,ENTITY:VALUE...]``).

    Attributes:
        name: the kind's name (``CUSTOM_NAME``), the suffix of its output files.
        filters: (entity, value) pairs selecting its files in the ``--derivatives`` folders, with pybids entity
            names (``suffix``, ``desc``, ``label``, ``space``...).
    """

    name: str
    filters: tuple[tuple[str, str], ...]

    @property
    def kind(self) -> ImageKind:
        return ImageKind(self.name, self.name, custom=True)


def parse_custom_map(spec: str) -> CustomMap:
    """``gm=suffix:probseg,label:GM,space:MNI152NLin2009cAsym`` as a :class:`CustomMap`.

    Raises:
        ConfigError: no ``=``, a name that is not ``CUSTOM_NAME`` or is a BIDS suffix in any case
            (``RESERVED_SUFFIXES``: ``flair``, ``t1w``, ``pet``...), an empty filter list, a pair without ``:``,
            or an entity given twice.
    """
    example = "e.g. --custom-map gm=suffix:probseg,label:GM,space:MNI152NLin2009cAsym"
    name, sep, rest = spec.partition("=")
    if not sep or not rest.strip():
        raise ConfigError(f"Invalid --custom-map {spec!r}: expected NAME=ENTITY:VALUE[,ENTITY:VALUE...], {example}.")
    if not CUSTOM_NAME.match(name):
        raise ConfigError(
            f"Invalid --custom-map name {name!r}: a lower-case letter, then letters and digits (it becomes the "
            f"suffix of the map's files and its kind name), {example}."
        )
    reserved = {suffix.lower(): suffix for suffix in RESERVED_SUFFIXES}.get(name.lower())
    if reserved is not None:
        raise ConfigError(
            f"Invalid --custom-map name {name!r}: it is the BIDS suffix {reserved!r} in another case, which "
            f"--channels reads as that kind and case-insensitive disks mix up with its files. Name the map "
            f"otherwise, e.g. {name.lower()}map={rest}."
        )
    filters: list[tuple[str, str]] = []
    for pair in rest.split(","):
        entity, colon, value = (part.strip() for part in pair.partition(":"))
        if not colon or not entity or not value:
            raise ConfigError(f"Invalid --custom-map {spec!r}: {pair!r} is not ENTITY:VALUE, {example}.")
        if entity in dict(filters):
            raise ConfigError(f"Invalid --custom-map {spec!r}: entity {entity!r} is given twice.")
        filters.append((entity, value))
    return CustomMap(name, tuple(filters))
