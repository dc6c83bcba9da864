"""Slice panels of volumes drawn into one PNG with numpy and Pillow, fast enough to run once per image.

A panel is one 2D cut through a 3D array. It is resampled (nearest neighbour) to fit a square tile of
``tile_px`` pixels with its physical aspect ratio (voxel sizes in mm), so every tile of a figure has the same
size whatever the view, and it carries the subject's orientation letters at its four edges (read from the
image's affine: an axis whose index grows towards R has R on the right), a caption, and the outlines of
binary masks in colour. Tiles are laid out in rows on a black canvas and encoded as PNG.

Why not matplotlib: a figure of 21 axes costs about a second there, and the participant level draws three
or four figures per image; this module draws such a figure in a few tens of milliseconds. The PNG bytes depend
only on the arrays (Pillow writes no time stamp), so the same inputs give the same page.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image, ImageFont

TILE_PX = 160
GAP_PX = 4
OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
# The anatomical axis orthogonal to each view.
VIEW_NORMALS = {"sagittal": "LR", "coronal": "AP", "axial": "SI"}
VIEWS = tuple(VIEW_NORMALS)
LETTER_COLOR = (255, 255, 255)
CAPTION_COLOR = (255, 214, 0)
LABEL_STROKE = 2  # px of black outline around every label, so it reads on bright and dark tissue alike
LABEL_MARGIN = 2  # px of empty border around a cached label mask, in case the font's box is off by rounding


@dataclass(frozen=True)
class Geometry:
    """How the voxel axes of a volume lie in the subject.

    Attributes:
        codes: per voxel axis, the direction its index grows towards (``nibabel.aff2axcodes``, e.g. R, A, S).
        zooms: voxel size along each axis in mm.
    """

    codes: tuple[str, str, str]
    zooms: tuple[float, float, float]

    @classmethod
    def of(cls, affine: np.ndarray) -> Geometry:
        """The geometry of a volume with this voxel-to-world ``affine`` (4x4)."""
        import nibabel as nib

        affine = np.asarray(affine, dtype=float)
        codes = tuple(str(c) if c else "?" for c in nib.aff2axcodes(affine))
        zooms = tuple(float(z) or 1.0 for z in np.linalg.norm(affine[:3, :3], axis=0))
        return cls(codes=(codes[0], codes[1], codes[2]), zooms=(zooms[0], zooms[1], zooms[2]))

    def normal_axis(self, view: str) -> int:
        """The voxel axis orthogonal to ``view`` (``sagittal``, ``coronal``, ``axial``); by position when the
        affine does not say (an oblique or missing axis code)."""
        for axis, code in enumerate(self.codes):
            if code in VIEW_NORMALS[view]:
                return axis
        return VIEWS.index(view)

    def letters(self, horizontal: int, vertical: int) -> tuple[str, str, str, str]:
        """Orientation letters at the left, right, top and bottom edges of a cut shown with ``horizontal``
        growing to the right and ``vertical`` growing upwards."""
        right, top = self.codes[horizontal], self.codes[vertical]
        return OPPOSITE.get(right, "?"), right, top, OPPOSITE.get(top, "?")


@dataclass(frozen=True)
class Panel:
    """One tile: a 2D cut in array order ``plane[h, v]`` (``h`` shown left to right, ``v`` bottom to top).

    Attributes:
        plane: the cut, float.
        spacing: mm per voxel along ``h`` and ``v``.
        window: the values shown black and white.
        letters: orientation letters at the left, right, top and bottom edges.
        caption: text at the tile's top left.
        outlines: binary cuts of the same shape as ``plane`` whose outline is drawn, with their RGB colour.
    """

    plane: np.ndarray
    spacing: tuple[float, float]
    window: tuple[float, float]
    letters: tuple[str, str, str, str]
    caption: str = ""
    outlines: tuple[tuple[np.ndarray, tuple[int, int, int]], ...] = ()


def cut(
    volume: np.ndarray,
    geometry: Geometry,
    normal: int,
    index: int,
    window: tuple[float, float],
    caption: str = "",
    outlines: Sequence[tuple[np.ndarray, tuple[int, int, int]]] = (),
) -> Panel:
    """The panel of ``volume`` (3D) at ``index`` along voxel axis ``normal``; ``outlines`` are 3D masks of the
    same shape cut at the same place.

    The planes are copied out of a view (``np.take`` would first copy the whole volume when it is not C-ordered,
    as NIfTI data is: 30 ms a cut at 1 mm), so a panel holds a few kB, never its volume.
    """
    horizontal, vertical = (axis for axis in range(3) if axis != normal)
    where = tuple(index if axis == normal else slice(None) for axis in range(3))
    return Panel(
        plane=np.array(volume[where]),
        spacing=(geometry.zooms[horizontal], geometry.zooms[vertical]),
        window=window,
        letters=geometry.letters(horizontal, vertical),
        caption=caption,
        outlines=tuple((np.array(mask[where]), colour) for mask, colour in outlines),
    )


def evenly_spaced(start: int, stop: int, count: int) -> list[int]:
    """Up to ``count`` distinct indices spread evenly over ``range(start, stop)``, ends included."""
    if stop <= start:
        return []
    return sorted({round(i) for i in np.linspace(start, stop - 1, min(count, stop - start))})


def _sample_indices(shape: tuple[int, int], spacing: tuple[float, float], tile_px: int) -> tuple[np.ndarray, ...]:
    """Voxel index of every output column (along ``h``) and row (along ``v``, top row first)."""
    extent = (shape[0] * spacing[0], shape[1] * spacing[1])
    scale = tile_px / max(extent)  # pixels per mm
    width, height = (max(1, min(tile_px, round(e * scale))) for e in extent)
    columns = np.minimum((np.arange(width) + 0.5) / width * shape[0], shape[0] - 1).astype(np.intp)
    rows = np.minimum((np.arange(height) + 0.5) / height * shape[1], shape[1] - 1).astype(np.intp)
    return columns, rows[::-1]


def _outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside it (a one-pixel line along its border)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _tile_pixels(panel: Panel, tile_px: int) -> np.ndarray:
    """The panel as a ``(tile_px, tile_px, 3)`` uint8 tile, the cut centred on black."""
    plane = np.asarray(panel.plane, dtype=np.float32)
    columns, rows = _sample_indices(plane.shape, panel.spacing, tile_px)
    shown = plane[np.ix_(columns, rows)].T  # (rows, columns), top row first
    low, high = panel.window
    scaled = np.clip((shown - low) / (high - low if high > low else 1.0), 0.0, 1.0)
    grey = np.nan_to_num(scaled * 255.0).astype(np.uint8)
    rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
    for mask, colour in panel.outlines:
        rgb[_outline(np.asarray(mask, dtype=bool)[np.ix_(columns, rows)].T)] = colour
    tile = np.zeros((tile_px, tile_px, 3), dtype=np.uint8)
    top, left = (tile_px - rgb.shape[0]) // 2, (tile_px - rgb.shape[1]) // 2
    tile[top : top + rgb.shape[0], left : left + rgb.shape[1]] = rgb
    return tile


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


@cache
def _label_masks(text: str, size: int, anchor: str) -> tuple[Image.Image, Image.Image, tuple[int, int]]:
    """The coverage masks of a label's black outline and of its letters, rasterised once per text and size.

    Why: a page carries a few hundred labels (four orientation letters and a caption per tile), mostly the same
    few strings; rasterising each with its outline cost more than drawing the tiles. Each mask is the label drawn
    at full intensity on a black ``L`` image with a margin, so stamping it with :func:`_stamp` blends exactly as
    ``ImageDraw.text(..., stroke_width=LABEL_STROKE)`` does at an integer position.

    Returns:
        The outline mask, the letters mask, and the offset of the anchor point within both.
    """
    from PIL import Image, ImageDraw

    font = _font(size)
    left, top, right, bottom = (round(v) for v in font.getbbox(text, anchor=anchor, stroke_width=LABEL_STROKE))
    origin = (LABEL_MARGIN - left, LABEL_MARGIN - top)
    extent = (right - left + 2 * LABEL_MARGIN, bottom - top + 2 * LABEL_MARGIN)
    outline, letters = Image.new("L", extent, 0), Image.new("L", extent, 0)
    ImageDraw.Draw(outline).text(origin, text, fill=255, font=font, anchor=anchor, stroke_width=LABEL_STROKE)
    ImageDraw.Draw(letters).text(origin, text, fill=255, font=font, anchor=anchor)
    return outline, letters, origin


def _stamp(image: Image.Image, at: tuple[int, int], text: str, size: int, anchor: str, colour: tuple[int, ...]) -> None:
    """Draw ``text`` anchored at the integer point ``at``: a black outline, then the letters in ``colour``."""
    outline, letters, (dx, dy) = _label_masks(text, size, anchor)
    box = (at[0] - dx, at[1] - dy)
    image.paste((0, 0, 0), (*box, box[0] + outline.width, box[1] + outline.height), outline)
    image.paste(colour, (*box, box[0] + letters.width, box[1] + letters.height), letters)


def render_panels(rows: Sequence[Sequence[Panel]], tile_px: int = TILE_PX) -> bytes:
    """Draw ``rows`` of panels (one tile each, equal sizes) as PNG bytes; short rows are left-aligned."""
    from PIL import Image

    n_columns = max((len(row) for row in rows), default=0)
    if n_columns == 0:
        raise ValueError("render_panels needs at least one panel")
    step = tile_px + GAP_PX
    canvas = np.zeros((len(rows) * step - GAP_PX, n_columns * step - GAP_PX, 3), dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            canvas[r * step : r * step + tile_px, c * step : c * step + tile_px] = _tile_pixels(panel, tile_px)
    image = Image.fromarray(canvas, mode="RGB")
    letter_size, caption_size = max(10, tile_px // 11), max(9, tile_px // 14)
    pad = max(7, tile_px // 20)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            x0, y0 = c * step, r * step
            left, right, top, bottom = panel.letters
            middle = tile_px // 2
            for (x, y), letter in (
                ((x0 + pad, y0 + middle), left),
                ((x0 + tile_px - pad, y0 + middle), right),
                ((x0 + middle, y0 + pad), top),
                ((x0 + middle, y0 + tile_px - pad), bottom),
            ):
                _stamp(image, (x, y), letter, letter_size, "mm", LETTER_COLOR)
            if panel.caption:
                _stamp(image, (x0 + 3, y0 + tile_px - 3), panel.caption, caption_size, "ld", CAPTION_COLOR)
    buffer = io.BytesIO()
    # level 1: as small as level 6 for these tiles (flat black background, few grey levels) in half the time
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
