"""Glyphs: a synthetic metric-learning dataset of characters rendered from fonts.

Each class is one Unicode character; its images are renders of that character in
every font that covers it (one clean render plus augmented copies per font).
Train and test hold disjoint classes, as in PML's CUB/Cars/SOP datasets. The
images are rendered on first use from the fonts that ship with matplotlib (no
network access) and cached under ``root``; see :class:`Glyphs`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import time
import unicodedata
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import matplotlib
import numpy as np
import PIL.features
import torch
from fontTools import agl  # a hard dependency of matplotlib, not a new one
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from ..utils.checks import check_bool, check_int, is_finite_real

__all__ = [
    "DEFAULT_FONT_FILES",
    "EXCLUDED_FONT_PATTERNS",
    "Glyphs",
    "GlyphsCacheError",
    "font_exclusion_reason",
    "glyph_distance",
    "matplotlib_font_dir",
]

logger = logging.getLogger(__name__)

#: Font files (in matplotlib's ``fonts/ttf`` folder) used by default: 21 fonts.
DEFAULT_FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
)

#: The first matplotlib release that ships every default font (cmti10.ttf came in 3.11).
DEFAULT_FONTS_MATPLOTLIB = "3.11"

#: Font files never used (also not from ``extra_font_dirs``), with the reason.
EXCLUDED_FONT_PATTERNS: dict[str, str] = {
    "cmex10.*": "maps ASCII code points to unrelated large delimiters (label noise)",
    "cmsy10.*": "maps ASCII code points to unrelated math symbols (label noise)",
    "cmmi10.*": "maps ASCII punctuation to Greek letters and arrows (label noise)",
    "STIXSiz*": "size variants: a few dozen large delimiters only",
    "STIXNonUni*": "private-use glyphs only, no usable Unicode characters",
    "*Display.*": "about 40 glyphs (dashes and quotes) only",
    "LastResort*": "draws a placeholder box for every code point",
}

#: Unicode general categories kept: letters, numbers, symbols, other punctuation.
CATEGORIES: tuple[str, ...] = ("L", "N", "S", "Po")
SPLITS: tuple[str, ...] = ("train", "test", "train+test")
# classes a dataset needs: two per split (a split of one class has nothing to rank)
MIN_CLASSES = 4

_FORMAT_VERSION = 1
_FONT_SIZE_RATIO = 0.75  # font size in pixels per pixel of image side
_MIN_INK = 64  # a render whose brightest pixel is dimmer than this counts as blank
_AUGMENTATION = {
    "rotation_deg": 10.0,
    "scale": [0.85, 1.15],
    "shift_frac": 3.0 / 64.0,
    "dilate_prob": 0.4,
    "dilate_size": 3,
    "noise_sigma": 0.05,
}
_META_FILE = "meta.json"
_ARRAYS = ("images", "class_indices", "font_indices", "augmentation_indices")


def library_versions() -> dict[str, Optional[str]]:
    """The versions of what makes the images: Pillow and its FreeType draw the glyphs,
    matplotlib's reader finds the characters a font covers, numpy's generators draw the
    augmentations (their streams may change between releases). Part of the cache key,
    so that an upgrade that would make other images renders anew instead of reusing."""
    return {
        "pillow": PIL.__version__,
        "freetype": PIL.features.version("freetype2"),
        "matplotlib": matplotlib.__version__,
        "numpy": np.__version__,
    }


class GlyphsCacheError(RuntimeError):
    """A cached Glyphs file exists but cannot be read or does not match its config."""


@dataclass(frozen=True)
class _Font:
    name: str
    path: str
    sha256: str


# --------------------------------------------------------------------- fonts


def matplotlib_font_dir() -> Path:
    """Return the folder holding the TrueType fonts that ship with matplotlib."""
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_exclusion_reason(filename: str) -> Optional[str]:
    """Return why a font file is never used, or None if it may be used."""
    base = os.path.basename(filename)
    for pattern, reason in EXCLUDED_FONT_PATTERNS.items():
        if fnmatch.fnmatchcase(base, pattern):
            return reason
    return None


def _sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_fonts(
    font_files: Optional[Sequence[str]], extra_font_dirs: Sequence[Union[str, Path]]
) -> list[_Font]:
    mpl_dir = matplotlib_font_dir()
    names = DEFAULT_FONT_FILES if font_files is None else tuple(font_files)
    if isinstance(font_files, (str, bytes)):
        raise ValueError("font_files must be a sequence of file names, not a string")
    paths: list[Path] = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"font_files: {name!r} is not a file name (a str)")
        reason = font_exclusion_reason(name)
        if reason is not None:
            raise ValueError(f"font_files: {name!r} is excluded: {reason}")
        path = mpl_dir / name
        if os.path.basename(name) != name or not path.is_file():
            if font_files is None:
                raise ValueError(
                    f"the default font {name!r} is not in {mpl_dir}: the default fonts "
                    f"need matplotlib >= {DEFAULT_FONTS_MATPLOTLIB} (found "
                    f"{matplotlib.__version__}), or pass font_files"
                )
            raise ValueError(f"font_files: {name!r} is not a font file in {mpl_dir}")
        paths.append(path)
    for folder in extra_font_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"extra_font_dirs: {str(folder)!r} is not a directory")
        found = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in (".ttf", ".otf")
        )
        if not found:
            raise ValueError(f"extra_font_dirs: no *.ttf or *.otf file in {folder}")
        for p in found:
            reason = font_exclusion_reason(p.name)
            if reason is None:
                paths.append(p)
            else:
                logger.debug("Glyphs: skipping %s: %s", p, reason)
    fonts: list[_Font] = []
    seen_hashes: set[str] = set()
    seen_names: set[str] = set()
    for p in paths:
        digest = _sha256(p)
        if digest in seen_hashes:  # the same file twice: use it once
            continue
        name = p.stem if p.stem not in seen_names else f"{p.parent.name}/{p.stem}"
        if name in seen_names:
            raise ValueError(f"two different font files are both named {name!r}")
        seen_hashes.add(digest)
        seen_names.add(name)
        fonts.append(_Font(name=name, path=str(p), sha256=digest))
    if not fonts:
        raise ValueError("no fonts selected")
    return fonts


def _wanted_category(char: str) -> bool:
    cat = unicodedata.category(char)
    return cat[0] in ("L", "N", "S") or cat == "Po"


def _name_contradicts(codepoint: int, glyph_name: str, same_glyph: set[int]) -> bool:
    """True if the glyph's PostScript name says it draws a different character.

    TeX fonts such as cmr10 map e.g. ``<`` to "exclamdown" and ``£`` to "Theta".
    Names that do not resolve (via fontTools' Adobe Glyph List), that resolve to
    a compatibility-equivalent character (NFKC), to another code point the font
    maps to the same glyph (DejaVu's shared "mu" for U+00B5/U+03BC), or to a
    private-use code point while matching the character's Unicode name
    ("dotlessj" for U+0237, but not for cmr10's U+00B4) are trusted.
    """
    try:
        resolved = agl.toUnicode(glyph_name)
    except Exception:  # an odd name is simply no evidence
        return False
    if not resolved:
        return False
    if len(resolved) == 1:
        other = ord(resolved)
        if other == codepoint or other in same_glyph:
            return False
        if 0xE000 <= other <= 0xF8FF:  # legacy AGL names such as "dotlessj"
            uname = unicodedata.name(chr(codepoint), "").lower()
            squashed = uname.replace(" ", "").replace("-", "")
            return glyph_name.split(".")[0].lower() not in squashed
    nfkc = unicodedata.normalize
    return nfkc("NFKC", resolved) != nfkc("NFKC", chr(codepoint))


def _charmap(path: str) -> tuple[FT2Font, dict[int, int]]:
    try:
        font = FT2Font(path)
    except (RuntimeError, OSError) as e:  # FreeType's message does not name the file
        raise ValueError(f"{path} is not a readable font file ({e})") from e
    charmap = {
        cp: gid
        for cp, gid in font.get_charmap().items()
        if gid != 0 and cp <= 0x10FFFF and _wanted_category(chr(cp))
    }
    return font, charmap


def _coverage(
    fonts: list[_Font], characters: Optional[set[int]], min_fonts: int
) -> list[set[int]]:
    """Per font, the code points it really draws among those in >= min_fonts cmaps.

    Glyph names are only checked for code points that can still reach
    ``min_fonts`` (the check can only remove code points).
    """
    loaded = [_charmap(f.path) for f in fonts]
    counts: dict[int, int] = {}
    for _, charmap in loaded:
        for cp in charmap:
            counts[cp] = counts.get(cp, 0) + 1
    wanted = {cp for cp, n in counts.items() if n >= min_fonts}
    if characters is not None:
        wanted &= characters
    coverage = []
    for font, charmap in loaded:
        by_glyph: dict[int, set[int]] = {}
        for cp, gid in font.get_charmap().items():
            by_glyph.setdefault(gid, set()).add(cp)
        coverage.append(
            {
                cp
                for cp in wanted & charmap.keys()
                if not _name_contradicts(
                    cp, font.get_glyph_name(charmap[cp]), by_glyph[charmap[cp]]
                )
            }
        )
    return coverage


# ----------------------------------------------------------------- rendering


def _render_clean(
    font: ImageFont.FreeTypeFont, char: str, image_size: int
) -> Optional[np.ndarray]:
    """Render ``char`` white on black, centred by its ink bbox; None if blank."""
    x0, y0, x1, y1 = font.getbbox(char)
    if x1 <= x0 or y1 <= y0:
        return None
    canvas = Image.new("L", (x1 - x0 + 4, y1 - y0 + 4))
    ImageDraw.Draw(canvas).text((2 - x0, 2 - y0), char, font=font, fill=255)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    w, h = glyph.size
    fit = image_size - 2 * max(1, image_size // 16)
    if w > fit or h > fit:  # rare (box drawing, per mille): shrink to fit
        s = fit / max(w, h)
        glyph = glyph.resize(
            (max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS
        )
        w, h = glyph.size
    out = Image.new("L", (image_size, image_size))
    out.paste(glyph, ((image_size - w) // 2, (image_size - h) // 2))
    arr = np.asarray(out)
    return arr if arr.max() >= _MIN_INK else None


def _draw_augmentations(
    rng: np.random.Generator, count: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random numbers for ``count`` augmentations: uniforms [count, 5], noise."""
    u = rng.random((count, 5))
    noise = rng.standard_normal((count, size, size), dtype=np.float32)
    return u, noise


def _augment(clean: np.ndarray, u: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Dilate (sometimes), warp (bilinear) and add noise to uint8 images [N, S, S].

    ``u`` holds uniforms for angle, scale, x/y shift and the dilation coin;
    ``noise`` standard normals. Each output depends only on its own inputs,
    never on the rest of the batch (only elementwise ops and per-image kernels).
    """
    a = _AUGMENTATION
    size = clean.shape[-1]
    angle = np.deg2rad((2.0 * u[:, 0] - 1.0) * a["rotation_deg"])
    scale = a["scale"][0] + u[:, 1] * (a["scale"][1] - a["scale"][0])
    tx, ty = ((2.0 * u[:, 2:4] - 1.0) * a["shift_frac"] * 2.0).T  # [-1, 1] units
    dilate = torch.from_numpy(u[:, 4] < a["dilate_prob"])

    x = torch.from_numpy(clean.astype(np.float32) / 255.0)[:, None]
    if dilate.any():
        k = a["dilate_size"]
        x[dilate] = torch.nn.functional.max_pool2d(
            x[dilate], k, stride=1, padding=k // 2
        )
    # Inverse map (output -> input) in normalised coordinates centred on the
    # image: in = R(-angle) (out - shift) / scale.
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    coef = [cos, sin, -(cos * tx + sin * ty), -sin, cos, sin * tx - cos * ty]
    c = [v.astype(np.float32)[:, None, None] for v in coef]
    coords = ((2.0 * np.arange(size) + 1.0) / size - 1.0).astype(np.float32)
    gx, gy = coords[None, None, :], coords[None, :, None]
    grid = np.stack(
        [c[0] * gx + c[1] * gy + c[2], c[3] * gx + c[4] * gy + c[5]], axis=-1
    )
    warped = torch.nn.functional.grid_sample(
        x,
        torch.from_numpy(grid),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )[:, 0].numpy()
    out = warped + noise * np.float32(a["noise_sigma"])
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def glyph_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised squared pixel distance between uint8 renders, in [0, 1].

    ``max(0, 1 - 2<a,b> / (|a|^2 + |b|^2))`` over the last two axes: 0 for
    identical images, 1 for images whose ink does not overlap (or blank ones).
    Computed in float64 on the raw pixel values, where the sums are exact.
    Broadcasts like numpy.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    dot = (a * b).sum(axis=(-2, -1))
    norm = (a * a).sum(axis=(-2, -1)) + (b * b).sum(axis=(-2, -1))
    return np.maximum(0.0, 1.0 - 2.0 * dot / np.maximum(norm, 1.0))


def _homoglyph_keep(
    clean: np.ndarray, present: np.ndarray, threshold: float, block: int = 1024
) -> np.ndarray:
    """Greedy homoglyph removal; rows must be sorted by code point.

    Two characters are homoglyphs when :func:`glyph_distance` between their
    clean renders is below ``threshold`` in at least half of the fonts that
    draw both. Of each group the lowest code point is kept (Latin A, not Greek
    Alpha or Cyrillic A). ``threshold=0`` removes nothing.
    """
    n, n_fonts = present.shape
    if n == 0:  # nothing to compare (reshape below cannot infer -1 from 0 rows)
        return np.ones(0, dtype=bool)
    # Font-major and contiguous (strided matmul operands are several times
    # slower); float64 on raw uint8 values keeps every dot product exact.
    x = np.ascontiguousarray(clean.reshape(n, n_fonts, -1).transpose(1, 0, 2))
    close: list[list[int]] = [[] for _ in range(n)]
    for start in range(0, n, block):
        stop = min(n, start + block)
        shared = np.zeros((stop - start, n), dtype=np.int32)
        near = np.zeros((stop - start, n), dtype=np.int32)
        for f in range(n_fonts):
            xf = x[f].astype(np.float64)
            sq = (xf * xf).sum(-1)
            dot = xf[start:stop] @ xf.T
            norm = np.maximum(sq[start:stop, None] + sq[None, :], 1.0)
            dist = np.maximum(0.0, 1.0 - 2.0 * dot / norm)
            both = present[start:stop, f, None] & present[None, :, f]
            near += both & (dist < threshold)
            shared += both
        rows, cols = np.nonzero((2 * near >= shared) & (near > 0))
        for r, col in zip(rows + start, cols):
            if col < r:
                close[r].append(int(col))
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        keep[i] = not any(keep[j] for j in close[i])
    return keep


def _shuffle_key(split_seed: int, codepoint: int) -> bytes:
    return hashlib.sha256(f"{split_seed}:{codepoint}".encode()).digest()


def _rng(seed: int, codepoint: int, font: _Font) -> np.random.Generator:
    """Generator for one (character, font): independent of order and batching."""
    return np.random.default_rng([seed, codepoint, int(font.sha256[:15], 16)])


def _select_classes(
    config: dict[str, Any], fonts: list[_Font], characters: Optional[set[int]]
) -> tuple[list[int], np.ndarray, np.ndarray, list[bool], dict[str, int]]:
    """Pick the classes; return code points, clean renders, presence, is_test."""
    size, min_fonts = config["image_size"], config["min_fonts"]
    coverage = _coverage(fonts, characters, min_fonts)
    counts: dict[int, int] = {}
    for cov in coverage:
        for cp in cov:
            counts[cp] = counts.get(cp, 0) + 1
    candidates = sorted(cp for cp, n in counts.items() if n >= min_fonts)

    pil_fonts = [
        ImageFont.truetype(
            f.path, config["font_size"], layout_engine=ImageFont.Layout.BASIC
        )
        for f in fonts
    ]
    clean = np.zeros((len(candidates), len(fonts), size, size), dtype=np.uint8)
    present = np.zeros((len(candidates), len(fonts)), dtype=bool)
    for i, cp in enumerate(candidates):
        for j, font in enumerate(pil_fonts):
            if cp in coverage[j]:
                img = _render_clean(font, chr(cp), size)
                if img is not None:
                    clean[i, j] = img
                    present[i, j] = True
    ok = present.sum(1) >= min_fonts  # blank glyphs do not count
    candidates = [cp for cp, k in zip(candidates, ok) if k]
    clean, present = clean[ok], present[ok]
    keep = _homoglyph_keep(clean, present, config["homoglyph_threshold"])

    # Shuffle (hash order: no dependence on numpy versions), cap, split in half.
    order = sorted(
        np.flatnonzero(keep).tolist(),
        key=lambda i: _shuffle_key(config["split_seed"], candidates[i]),
    )
    if config["max_classes"] is not None:
        order = order[: config["max_classes"]]
    if len(order) < MIN_CLASSES:
        # each split needs two classes: one class is nothing to tell apart
        removed = int((~keep).sum())
        raise ValueError(
            f"{len(order)} character(s) left, {MIN_CLASSES} needed (2 per split): "
            f"{len(candidates)} drawn by at least min_fonts={min_fonts} of the "
            f"{len(fonts)} fonts, {removed} of them removed as homoglyphs "
            f"(homoglyph_threshold={config['homoglyph_threshold']}); lower min_fonts "
            "or homoglyph_threshold, or widen characters"
        )
    n_train = len(order) - len(order) // 2
    test_rows = set(order[n_train:])
    rows = sorted(order)  # classes are stored in code point order
    stats = {
        "num_candidates": len(candidates),
        "num_homoglyphs_removed": int((~keep).sum()),
    }
    return (
        [candidates[r] for r in rows],
        clean[rows],
        present[rows],
        [r in test_rows for r in rows],
        stats,
    )


def _render_split(
    config: dict[str, Any],
    fonts: list[_Font],
    class_ids: np.ndarray,
    codepoints: list[int],
    clean: np.ndarray,
    present: np.ndarray,
    chunk: int = 4096,
) -> dict[str, np.ndarray]:
    """All images of the given classes, grouped by class, font, augmentation."""
    n_aug, size = config["augmentations_per_font"], config["image_size"]
    cls, fnt = np.nonzero(present[class_ids])
    cls = np.asarray(class_ids)[cls]
    per = 1 + n_aug
    images = np.empty((len(cls), per, size, size), dtype=np.uint8)
    images[:, 0] = clean[cls, fnt]
    if n_aug:
        u = np.empty((len(cls), n_aug, 5))
        noise = np.empty((len(cls), n_aug, size, size), dtype=np.float32)
        for i, (c, j) in enumerate(zip(cls, fnt)):
            rng = _rng(config["seed"], codepoints[c], fonts[j])
            u[i], noise[i] = _draw_augmentations(rng, n_aug, size)
        step = max(1, chunk // n_aug)
        for lo in range(0, len(cls), step):
            hi = min(len(cls), lo + step)
            bases = np.repeat(images[lo:hi, 0], n_aug, axis=0)
            aug = _augment(
                bases, u[lo:hi].reshape(-1, 5), noise[lo:hi].reshape(-1, size, size)
            )
            images[lo:hi, 1:] = aug.reshape(hi - lo, n_aug, size, size)
    return {
        "images": images.reshape(-1, size, size),
        "class_indices": np.repeat(cls, per).astype(np.int32),
        "font_indices": np.repeat(fnt, per).astype(np.int16),
        "augmentation_indices": np.tile(np.arange(per), len(cls)).astype(np.int16),
    }


def _build(
    config: dict[str, Any], fonts: list[_Font], characters: Optional[set[int]]
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Select the characters and render every image: (meta, arrays per split)."""
    codepoints, clean, present, is_test, stats = _select_classes(
        config, fonts, characters
    )
    flags = np.asarray(is_test)
    arrays = {
        split: _render_split(config, fonts, ids, codepoints, clean, present)
        for split, ids in (
            ("train", np.flatnonzero(~flags)),
            ("test", np.flatnonzero(flags)),
        )
    }
    meta = {
        "config": config,
        "classes": [chr(cp) for cp in codepoints],
        "codepoints": codepoints,
        "is_test": is_test,
        "num_images": {k: int(len(v["images"])) for k, v in arrays.items()},
        **stats,
    }
    return meta, arrays


# -------------------------------------------------------------------- cache


def _data_file(split: str) -> str:
    return f"data-{split}.npz"


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, at deflate level 1 (3x faster, ~5% larger)."""
    with zipfile.ZipFile(
        path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1
    ) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr))


def _write_cache(
    cache_dir: Path, meta: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]]
) -> None:
    """Write into a temporary sibling folder, then rename it into place."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its mode 0o700 would survive the rename, so other users
    # could not read a shared cache; mkdir honours the umask like any other folder.
    tmp = cache_dir.parent / f".{cache_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for split, arrs in arrays.items():
            _save_npz(tmp / _data_file(split), arrs)
        with open(tmp / _META_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False, indent=1)
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            if not (cache_dir / _META_FILE).is_file():
                raise
            # Another process finished the same cache first: keep theirs.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_meta(cache_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    path = cache_dir / _META_FILE
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or meta.get("config") != config:
            raise ValueError("its config does not match this dataset's config")
        n = len(meta["codepoints"])
        if len(meta["is_test"]) != n or len(meta["classes"]) != n:
            raise ValueError("its class lists have different lengths")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GlyphsCacheError(_corrupt_message(path, e)) from e
    return meta


def _read_split(
    cache_dir: Path, split: str, meta: dict[str, Any]
) -> dict[str, np.ndarray]:
    path = cache_dir / _data_file(split)
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _ARRAYS}
        n, size = meta["num_images"][split], meta["config"]["image_size"]
        images = arrays["images"]
        if images.shape != (n, size, size) or images.dtype != np.uint8:
            raise ValueError(f"images have shape {images.shape}, dtype {images.dtype}")
        if any(arrays[k].shape != (n,) for k in _ARRAYS[1:]):
            raise ValueError("its arrays have different lengths")
        ids = arrays["class_indices"]
        is_test = np.asarray(meta["is_test"], dtype=bool)
        if n and (ids.min() < 0 or ids.max() >= len(is_test)):
            raise ValueError("a class index is out of range")
        if n and np.any(is_test[ids] != (split == "test")):
            raise ValueError(f"it holds classes that are not in the {split} split")
    except (
        OSError,
        ValueError,
        KeyError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
    ) as e:
        raise GlyphsCacheError(_corrupt_message(path, e)) from e
    return arrays


def _corrupt_message(path: Path, error: BaseException) -> str:
    return (
        f"Glyphs cache file {path} is corrupt or unreadable ({error}). "
        f"Delete the folder {path.parent} and construct Glyphs again with "
        "download=True to re-render it."
    )


# ------------------------------------------------------------------ dataset


def _parse_characters(characters: Union[str, Iterable[Union[str, int]]]) -> set[int]:
    if not isinstance(characters, Iterable):
        raise ValueError(
            f"characters must be a string or an iterable of characters and code "
            f"points, got {characters!r}"
        )
    out = set()
    for ch in characters:
        if isinstance(ch, str) and len(ch) == 1:
            out.add(ord(ch))
        elif (
            isinstance(ch, (int, np.integer))
            and not isinstance(ch, bool)
            and 0 <= ch <= 0x10FFFF
        ):
            out.add(int(ch))
        else:
            raise ValueError(
                f"characters: {ch!r} is not a single character or code point"
            )
    return out


class Glyphs(Dataset):
    """Characters rendered in many fonts: one class per character.

    Mirrors PML's dataset interface (``root``, ``split``, ``transform``,
    ``target_transform``, ``download``, ``labels``, ``(image, label)`` items).
    Items are mode-"L" PIL images (white glyph on black) and int labels,
    contiguous ``0..K-1`` within the split. In "train+test", train classes come
    first with the same labels as in "train". The default split is
    "train+test", as in PML's ``BaseDataset``.

    Construction:

    * fonts: :data:`DEFAULT_FONT_FILES` from matplotlib (or ``font_files``) plus
      every ``*.ttf``/``*.otf`` in ``extra_font_dirs``; never the files matching
      :data:`EXCLUDED_FONT_PATTERNS`. A font covers a character if its cmap maps
      it to a non-blank glyph whose PostScript name does not name another
      character (cmr10's ``£`` is a Theta, its ``<`` an inverted "!").
    * classes: characters of categories L, N, S and Po (optionally only those in
      ``characters``) covered by at least ``min_fonts`` fonts, minus homoglyphs:
      two characters are homoglyphs when :func:`glyph_distance` of their clean
      renders is below ``homoglyph_threshold`` in at least half of the fonts
      drawing both; the lowest code point of a group is kept. The classes are
      shuffled by ``split_seed``, cut to ``max_classes`` and split in half:
      train and test have disjoint classes (train gets the odd one). At least
      :data:`MIN_CLASSES` (4) must be left, two per split, else a ``ValueError``.
    * images: per (character, font), one clean render centred by its ink box
      plus ``augmentations_per_font`` variants (rotation ±10°, scale 0.85-1.15,
      shift ±3/64 of the side, 3x3 dilation 40% of the time, Gaussian noise
      sigma 0.05), all drawn from a generator seeded by (``seed``, code point,
      font), so the result does not depend on order.

    Cache: ``root/glyphs-<config hash>/`` holds ``data-train.npz`` and
    ``data-test.npz`` (uint8 images [N, S, S], class, font and augmentation
    indices) and ``meta.json`` (config, characters, split); the folder is
    written under a temporary name and renamed into place. The hash covers
    every option except ``split`` and the transforms, plus the font files'
    contents and the versions of Pillow, FreeType, matplotlib and numpy, so a
    different config or library never reads a stale cache. ``download``
    keeps PML's name but means "render and cache if absent" (about 10 s for
    the default dataset); with ``download=False`` a missing cache raises
    FileNotFoundError. A corrupt cache raises :class:`GlyphsCacheError` naming
    the file; it is not silently re-rendered (delete the folder to rebuild).

    Attributes: ``labels``, ``data`` (uint8 [N, S, S]), ``classes`` (the
    characters, index = label), ``codepoints``, ``fonts`` (names),
    ``font_indices`` and ``augmentation_indices`` (per image; 0 = clean render),
    ``cache_dir``, ``config``.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        split: str = "train+test",
        transform: Optional[Callable] = None,
        target_transform: Optional[Callable] = None,
        download: bool = True,
        image_size: int = 32,
        augmentations_per_font: int = 2,
        seed: int = 0,
        split_seed: int = 0,
        min_fonts: int = 16,
        max_classes: Optional[int] = None,
        characters: Optional[Union[str, Iterable[Union[str, int]]]] = None,
        homoglyph_threshold: float = 0.01,
        font_files: Optional[Sequence[str]] = None,
        extra_font_dirs: Union[
            str, os.PathLike, Sequence[Union[str, os.PathLike]]
        ] = (),
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
        download = check_bool("download", download)
        image_size = check_int("image_size", image_size, 8)
        augmentations_per_font = check_int(
            "augmentations_per_font", augmentations_per_font, 0
        )
        seed = check_int("seed", seed, 0)
        split_seed = check_int("split_seed", split_seed, 0)
        min_fonts = check_int("min_fonts", min_fonts, 1)
        if max_classes is not None:
            max_classes = check_int("max_classes", max_classes, MIN_CLASSES)
        if not (is_finite_real(homoglyph_threshold) and 0 <= homoglyph_threshold < 1):
            raise ValueError(
                f"homoglyph_threshold must be in [0, 1), got {homoglyph_threshold!r}"
            )
        if isinstance(extra_font_dirs, (str, os.PathLike)):
            extra_font_dirs = [extra_font_dirs]
        chars = None if characters is None else _parse_characters(characters)
        fonts = _resolve_fonts(font_files, list(extra_font_dirs))
        if min_fonts > len(fonts):
            raise ValueError(
                f"min_fonts={min_fonts} exceeds the {len(fonts)} fonts selected"
            )

        self.root = os.fspath(root)
        self.split = split
        self.transform = transform
        self.target_transform = target_transform
        self.config: dict[str, Any] = {
            "format_version": _FORMAT_VERSION,
            "image_size": image_size,
            "font_size": max(1, round(_FONT_SIZE_RATIO * image_size)),
            "augmentations_per_font": augmentations_per_font,
            "augmentation": _AUGMENTATION,
            "seed": seed,
            "split_seed": split_seed,
            "min_fonts": min_fonts,
            "max_classes": max_classes,
            "categories": list(CATEGORIES),
            "characters_sha256": None
            if chars is None
            else hashlib.sha256(",".join(map(str, sorted(chars))).encode()).hexdigest(),
            "homoglyph_threshold": float(homoglyph_threshold),
            "fonts": [{"name": f.name, "sha256": f.sha256} for f in fonts],
            "libraries": library_versions(),
        }
        digest = hashlib.sha256(
            json.dumps(self.config, sort_keys=True).encode()
        ).hexdigest()
        self.cache_dir = Path(self.root) / f"glyphs-{digest[:16]}"

        if not self.cache_dir.exists():
            if not download:
                raise FileNotFoundError(
                    f"No Glyphs cache for this configuration at {self.cache_dir}. "
                    "Construct Glyphs with download=True (the default) to render "
                    "it (about ten seconds for the default dataset)."
                )
            start = time.perf_counter()
            meta, arrays = _build(self.config, fonts, chars)
            _write_cache(self.cache_dir, meta, arrays)
            logger.info(
                "Glyphs: rendered %d images of %d classes from %d fonts "
                "in %.1f s into %s",
                sum(meta["num_images"].values()),
                len(meta["codepoints"]),
                len(fonts),
                time.perf_counter() - start,
                self.cache_dir,
            )
        meta = _read_meta(self.cache_dir, self.config)
        parts = ["train", "test"] if split == "train+test" else [split]
        loaded = [_read_split(self.cache_dir, part, meta) for part in parts]

        # Labels: rank of the class (code point order) within train, then test.
        is_test = np.asarray(meta["is_test"], dtype=bool)
        chosen = np.concatenate(
            [np.flatnonzero(is_test == (part == "test")) for part in parts]
        )
        label_of_class = np.full(len(is_test), -1, dtype=np.int64)
        label_of_class[chosen] = np.arange(len(chosen))
        cat = {
            k: loaded[0][k]
            if len(loaded) == 1
            else np.concatenate([a[k] for a in loaded])
            for k in _ARRAYS
        }
        self.data: np.ndarray = cat["images"]
        self.labels: np.ndarray = label_of_class[cat["class_indices"]]
        self.font_indices: np.ndarray = cat["font_indices"].astype(np.int64)
        self.augmentation_indices: np.ndarray = cat["augmentation_indices"].astype(
            np.int64
        )
        self.codepoints: list[int] = [int(meta["codepoints"][i]) for i in chosen]
        self.classes: list[str] = [chr(cp) for cp in self.codepoints]
        self.fonts: list[str] = [f["name"] for f in self.config["fonts"]]
        self.num_homoglyphs_removed: int = int(meta["num_homoglyphs_removed"])

    @staticmethod
    def get_available_splits() -> list[str]:
        """Return the split names, as PML's datasets do."""
        return list(SPLITS)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[Any, Any]:
        img: Any = Image.fromarray(self.data[idx])
        label: Any = int(self.labels[idx])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return img, label

    def __repr__(self) -> str:
        return (
            f"Glyphs(split={self.split!r}, classes={len(self.classes)}, "
            f"images={len(self)}, fonts={len(self.fonts)}, cache={str(self.cache_dir)!r})"
        )
