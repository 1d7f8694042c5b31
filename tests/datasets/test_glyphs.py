"""Tests of the Glyphs dataset.

Most tests use a small instance (5 fonts, ~70 candidate characters, well under a
second to build); one test class builds the full default dataset once (5-15 s on
2 busy cores). Set GLYPHS_SKIP_FULL=1 to skip that one.
"""

import json
import os
import shutil
import tempfile
import time
import unicodedata
import unittest
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont

from pml_proxysynth.datasets import glyphs
from pml_proxysynth.datasets.glyphs import (
    DEFAULT_FONT_FILES,
    Glyphs,
    GlyphsCacheError,
    matplotlib_font_dir,
)

SMALL_FONTS = [
    "DejaVuSans.ttf",
    "DejaVuSerif-Bold.ttf",
    "STIXGeneral.ttf",
    "cmr10.ttf",
    "cmtt10.ttf",
]
LATIN = "ABCEHKMOPTXabceopxy0123456789"
GREEK = "ΑΒΕΗΚΜΟΡΤΧαοπ"
CYRILLIC = "АВЕНКМОРТХаеорсху"
SMALL_CHARS = LATIN + GREEK + CYRILLIC + "<>£'!?&%@#.·"
SMALL = {"font_files": SMALL_FONTS, "min_fonts": 3, "characters": SMALL_CHARS}
EXCLUDED_FILES = [
    "cmex10.ttf",
    "cmsy10.ttf",
    "cmmi10.ttf",
    "STIXSizOneSymReg.ttf",
    "STIXNonUni.ttf",
    "DejaVuSansDisplay.ttf",
    "DejaVuSerifDisplay.ttf",
    "LastResortHE-Regular.ttf",
]
# Known look-alike groups: only the first (lowest code point) may survive.
HOMOGLYPH_GROUPS = ["AΑА", "BΒВ", "EΕЕ", "OΟО", "oοо", "cс", "pр", "xх", ".·"]
THRESHOLD = 0.01


def small(root, split="train+test", **kwargs):
    return Glyphs(root, split, **{**SMALL, **kwargs})


def count_by(labels, n):
    return np.bincount(np.asarray(labels), minlength=n)


def clean_renders(ds):
    """Clean renders [K, F, H, W] (raw uint8 values) and a presence mask [K, F]."""
    k, f = len(ds.classes), len(ds.fonts)
    size = ds.data.shape[-1]
    out = np.zeros((k, f, size, size), dtype=np.int64)
    present = np.zeros((k, f), dtype=bool)
    for i in np.flatnonzero(ds.augmentation_indices == 0):
        c, j = ds.labels[i], ds.font_indices[i]
        assert not present[c, j], "two clean renders for one (class, font)"
        out[c, j] = ds.data[i]
        present[c, j] = True
    return out, present


def homoglyph_pairs(ds, threshold=THRESHOLD):
    """Pairs whose clean renders are near-identical in at least half of their shared fonts.

    Written independently of the module: per font, the distance
    1 - 2<a,b>/(|a|^2+|b|^2) for all pairs at once, with exact integer sums.
    """
    x, present = clean_renders(ds)
    k, f = present.shape
    near = np.zeros((k, k), dtype=int)
    shared = np.zeros((k, k), dtype=int)
    for j in range(f):
        # Pixel values <= 255 and 1024 pixels: float64 sums of products are exact
        # integers, whatever the summation order (and much faster than int64).
        v = x[:, j].reshape(k, -1).astype(np.float64)
        sq = (v * v).sum(1)
        dot = v @ v.T
        dist = 1 - 2 * dot / np.maximum(sq[:, None] + sq[None, :], 1)
        both = present[:, j, None] & present[None, :, j]
        near += both & (dist < threshold)
        shared += both
    bad = (2 * near >= shared) & (near > 0) & ~np.eye(k, dtype=bool)
    return [(ds.classes[a], ds.classes[b]) for a, b in zip(*np.nonzero(bad)) if a < b]


class SmallGlyphsCase(unittest.TestCase):
    """Shares one small build (in a temp dir) across the tests of a class."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.root = cls._tmp.name
        cls.all = small(cls.root, "train+test")
        cls.train = small(cls.root, "train")
        cls.test = small(cls.root, "test")

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()


class TestSplitsAndLabels(SmallGlyphsCase):
    def test_train_and_test_classes_are_disjoint_and_complete(self):
        train, test = set(self.train.classes), set(self.test.classes)
        self.assertTrue(train and test)
        self.assertEqual(train & test, set())
        self.assertEqual(train | test, set(self.all.classes))
        self.assertLessEqual(abs(len(train) - len(test)), 1)

    def test_labels_are_contiguous_per_split(self):
        for ds in (self.train, self.test, self.all):
            k = len(ds.classes)
            self.assertIsInstance(ds.labels, np.ndarray)
            self.assertEqual(sorted(set(ds.labels.tolist())), list(range(k)))
            self.assertEqual(len(ds), len(ds.labels))
            self.assertEqual(len(ds.data), len(ds.labels))

    def test_train_plus_test_labels_extend_train_labels(self):
        k = len(self.train.classes)
        self.assertEqual(self.all.classes[:k], self.train.classes)
        self.assertEqual(self.all.classes[k:], self.test.classes)
        train_part = self.all.labels < k
        np.testing.assert_array_equal(self.all.labels[train_part], self.train.labels)
        np.testing.assert_array_equal(self.all.data[train_part], self.train.data)
        np.testing.assert_array_equal(
            self.all.labels[~train_part] - k, self.test.labels
        )

    def test_classes_are_in_the_requested_categories(self):
        for ch in self.all.classes:
            cat = unicodedata.category(ch)
            self.assertTrue(cat[0] in "LNS" or cat == "Po", (ch, cat))
            self.assertIn(ch, SMALL_CHARS)

    def test_classes_within_a_split_are_in_code_point_order(self):
        # the split is shuffled, the labels within each split follow the code points
        for ds in (self.train, self.test):
            self.assertEqual(ds.codepoints, sorted(ds.codepoints))

    def test_shuffled_split_is_not_code_point_order(self):
        # With the split taken in code point order, all Latin would be in train.
        latin_in_test = [c for c in self.test.classes if c in LATIN]
        self.assertTrue(latin_in_test)

    def test_train_gets_the_odd_class(self):
        # max_classes=7 keeps 7 of the shuffled classes: 4 for train, 3 for test.
        with tempfile.TemporaryDirectory() as root:
            train = small(root, "train", max_classes=7)
            test = small(root, "test", max_classes=7)
            self.assertEqual((len(train.classes), len(test.classes)), (4, 3))
            self.assertEqual(set(train.classes) & set(test.classes), set())
            self.assertLessEqual(
                set(train.classes) | set(test.classes), set(self.all.classes)
            )
        n = len(self.all.classes)
        self.assertEqual(len(self.train.classes), n - n // 2)

    def test_classes_outside_the_categories_are_left_out(self):
        # Brackets (Ps/Pe), the hyphen (Pd) and the underscore (Pc) are punctuation
        # but not "other punctuation" (Po): drawn by every font, still no class.
        with tempfile.TemporaryDirectory() as root:
            ds = small(root, characters="AB7!?()-_[]{}")
            self.assertEqual(sorted(ds.classes), sorted("AB7!?"))

    def test_get_available_splits(self):
        self.assertEqual(
            sorted(Glyphs.get_available_splits()), ["test", "train", "train+test"]
        )


class TestImages(SmallGlyphsCase):
    def test_item_is_grayscale_pil_image_and_int_label(self):
        img, label = self.train[0]
        self.assertIsInstance(img, Image.Image)
        self.assertEqual(img.mode, "L")
        self.assertEqual(img.size, (32, 32))
        self.assertIsInstance(label, int)
        self.assertEqual(label, self.train.labels[0])
        np.testing.assert_array_equal(np.asarray(img), self.train.data[0])

    def test_every_class_has_fonts_times_one_plus_augmentations_images(self):
        ds = self.all
        counts = count_by(ds.labels, len(ds.classes))
        for c in range(len(ds.classes)):
            idx = np.flatnonzero(ds.labels == c)
            fonts = set(ds.font_indices[idx].tolist())
            self.assertGreaterEqual(len(fonts), 3)
            self.assertEqual(counts[c], 3 * len(fonts), ds.classes[c])
            for j in fonts:
                augs = ds.augmentation_indices[idx[ds.font_indices[idx] == j]]
                self.assertEqual(sorted(augs.tolist()), [0, 1, 2])

    def test_known_font_coverage(self):
        # Independent facts: Latin letters and digits are in all 5 fonts; cmr10
        # (OT1 encoding) draws "¡" at "<" and a Theta at "£", and neither TeX
        # font has a straight apostrophe; cmtt10 has a real "<".
        expected = {"A": 15, "x": 15, "7": 15, "!": 15, "<": 12, "£": 9, "'": 9}
        ds = self.all
        counts = count_by(ds.labels, len(ds.classes))
        for ch, n in expected.items():
            self.assertEqual(counts[ds.classes.index(ch)], n, ch)
        cmr10 = ds.fonts.index("cmr10")
        for ch in "<£'":
            fonts = ds.font_indices[ds.labels == ds.classes.index(ch)]
            self.assertNotIn(cmr10, fonts, ch)

    def test_every_font_used_for_a_class_maps_it_in_its_cmap(self):
        ds = self.all
        charmaps = {
            j: FT2Font(str(matplotlib_font_dir() / f"{name}.ttf")).get_charmap()
            for j, name in enumerate(ds.fonts)
        }
        for c, cp in enumerate(ds.codepoints):
            for j in set(ds.font_indices[ds.labels == c].tolist()):
                self.assertIn(cp, charmaps[j], (chr(cp), ds.fonts[j]))

    def test_clean_renders_are_centred_and_augmented_ones_differ(self):
        ds = self.all
        clean = np.flatnonzero(ds.augmentation_indices == 0)
        for i in clean:
            ys, xs = np.nonzero(ds.data[i] > 0)
            self.assertLessEqual(abs((ys.min() + ys.max()) / 2 - 15.5), 1.0)
            self.assertLessEqual(abs((xs.min() + xs.max()) / 2 - 15.5), 1.0)
        for i in clean[:50]:
            for a in (1, 2):
                self.assertEqual(ds.augmentation_indices[i + a], a)
                self.assertEqual(ds.labels[i + a], ds.labels[i])
                self.assertFalse(np.array_equal(ds.data[i + a], ds.data[i]))
        # Gaussian noise: background pixels of augmented images are not all 0.
        augmented = ds.data[ds.augmentation_indices > 0].astype(float)
        self.assertGreater((augmented[:, :3, :3] > 0).mean(), 0.2)

    def test_augmentation_draws_differ_per_character_and_font(self):
        # Corners hold (almost) no ink: there an augmented image is its own Gaussian
        # noise, drawn from a generator seeded by (seed, character, font), so no two
        # (character, font) pairs share it.
        ds = self.all
        idx = np.flatnonzero(ds.augmentation_indices == 1)
        corners = ds.data[idx, :6, :6].reshape(len(idx), -1)
        self.assertTrue(corners.any(1).all())
        self.assertEqual(len(np.unique(corners, axis=0)), len(idx))

    def test_about_forty_percent_of_augmentations_are_dilated(self):
        # Ink (pixels > 128, above the noise) grows by at most ~1.32x from
        # scaling alone; a 3x3 dilation of thin strokes roughly doubles it.
        ds = self.all
        ratios = []
        for i in np.flatnonzero(ds.augmentation_indices == 0):
            ink = max(1, (ds.data[i] > 128).sum())
            ratios += [(ds.data[i + a] > 128).sum() / ink for a in (1, 2)]
        grown = (np.asarray(ratios) > 1.6).mean()
        self.assertGreater(grown, 0.25)
        self.assertLess(grown, 0.55)

    def test_transform_and_target_transform_are_applied(self):
        ds = small(
            self.root,
            "test",
            transform=lambda im: torch.from_numpy(np.asarray(im, np.float32) / 255),
            target_transform=lambda y: y + 1000,
        )
        img, label = ds[3]
        self.assertIsInstance(img, torch.Tensor)
        self.assertEqual(tuple(img.shape), (32, 32))
        self.assertLessEqual(float(img.max()), 1.0)
        self.assertEqual(label, int(ds.labels[3]) + 1000)


def test_faint_renders_count_as_blank():
    """A render whose brightest pixel is below 64 (a dot at 1-2 px: antialiasing
    spreads it thin) is blank, like an empty one; the same dot at 12 px is not."""
    path = os.path.join(matplotlib_font_dir(), "DejaVuSans.ttf")
    for size, faint in ((1, True), (2, True), (12, False)):
        font = ImageFont.truetype(path, size)
        x0, y0, x1, y1 = font.getbbox(".")
        canvas = Image.new("L", (x1 - x0 + 4, y1 - y0 + 4))
        ImageDraw.Draw(canvas).text((2 - x0, 2 - y0), ".", font=font, fill=255)
        brightest = np.asarray(canvas).max()
        assert (0 < brightest < 64) == faint, (size, brightest)
        assert (glyphs._render_clean(font, ".", 16) is None) == faint, size


class TestHomoglyphs(SmallGlyphsCase):
    def test_known_homoglyph_groups_keep_only_the_lowest_code_point(self):
        classes = set(self.all.classes)
        for group in HOMOGLYPH_GROUPS:
            self.assertIn(group[0], classes, group)
            for other in group[1:]:
                self.assertNotIn(other, classes, group)
        self.assertGreater(self.all.num_homoglyphs_removed, 0)

    def test_distinct_look_alikes_survive(self):
        # Greek alpha and pi are drawn unlike Latin a and n/Cyrillic п.
        for ch in "απ":
            self.assertIn(ch, self.all.classes)

    def test_no_two_classes_are_homoglyphs(self):
        self.assertEqual(homoglyph_pairs(self.all), [])

    def test_homoglyph_rules_on_synthetic_renders(self):
        """``_homoglyph_keep`` on hand-made renders (ink = 255 on a set of pixels):
        the distance of ink sets P, Q is 1 - 2|P & Q| / (|P| + |Q|)."""

        def render(first, count=100):
            img = np.zeros(16 * 16, dtype=np.uint8)
            img[first : first + count] = 255
            return img.reshape(16, 16)

        def keep(renders, present):  # renders [chars][fonts]
            clean = np.array(renders, dtype=np.uint8)
            return glyphs._homoglyph_keep(clean, np.array(present), 0.015).tolist()

        a, b, c, far = render(0), render(1), render(2), render(150)
        # d(a, b) = d(b, c) = 0.01 < 0.015 <= d(a, c) = 0.02: greedy in code point
        # order, b goes with a, and c, whose only look-alike b is gone, stays.
        self.assertEqual(keep([[a], [b], [c]], [[True]] * 3), [True, False, True])
        # close in one font of two: "at least half of the fonts" -> homoglyphs
        self.assertEqual(keep([[a, a], [b, far]], [[True] * 2] * 2), [True, False])
        # close in one of three, far in two: not homoglyphs ...
        both = [[True] * 3] * 2
        self.assertEqual(keep([[a, a, a], [b, far, far]], both), [True, True])
        # ... unless only the one font draws both
        one = [[True] * 3, [True, False, False]]
        self.assertEqual(keep([[a, a, a], [b, far, far]], one), [True, False])

    def test_blank_renders_do_not_count_as_coverage(self):
        # "£" is drawn by 3 of the 5 fonts (min_fonts=3): blank in one of them, it
        # has 2 and is no class; "A" (5 fonts) keeps the 4 non-blank ones.
        real = glyphs._render_clean

        def blank_in_dejavu_sans(font, char, size):
            if char in "£A" and os.path.basename(font.path) == "DejaVuSans.ttf":
                return None
            return real(font, char, size)

        with (
            tempfile.TemporaryDirectory() as root,
            mock.patch.object(glyphs, "_render_clean", blank_in_dejavu_sans),
        ):
            ds = small(root, characters="A£7<B")
        self.assertEqual(sorted(ds.classes), sorted("A7<B"))
        fonts = set(ds.font_indices[ds.labels == ds.classes.index("A")].tolist())
        self.assertEqual(len(fonts), 4)
        self.assertNotIn(ds.fonts.index("DejaVuSans"), fonts)

    def test_threshold_zero_keeps_near_identical_pairs(self):
        with tempfile.TemporaryDirectory() as root:
            ds = small(root, "train+test", homoglyph_threshold=0.0)
            self.assertIn("Α", ds.classes)
            self.assertTrue(homoglyph_pairs(ds))
            self.assertEqual(ds.num_homoglyphs_removed, 0)


class TestDeterminismAndCache(SmallGlyphsCase):
    def test_two_builds_in_different_dirs_are_identical(self):
        with tempfile.TemporaryDirectory() as other:
            again = small(other, "train+test")
            self.assertEqual(again.classes, self.all.classes)
            self.assertEqual(again.fonts, self.all.fonts)
            for name in ("data", "labels", "font_indices", "augmentation_indices"):
                np.testing.assert_array_equal(
                    getattr(again, name), getattr(self.all, name), name
                )
            self.assertEqual(again.cache_dir.name, self.all.cache_dir.name)

    def test_cache_key_covers_the_library_versions(self):
        """Pillow and FreeType draw the glyphs, matplotlib finds the characters, numpy
        draws the augmentations: another version of any must not reuse this cache
        (download=False: it looks for one and finds none)."""
        self.assertEqual(small(self.root, download=False).cache_dir, self.all.cache_dir)
        for library in ("pillow", "freetype", "matplotlib", "numpy"):
            versions = dict(glyphs.library_versions(), **{library: "0.0.1"})
            with mock.patch.object(glyphs, "library_versions", return_value=versions):
                with self.assertRaisesRegex(FileNotFoundError, "download=True"):
                    small(self.root, download=False)

    def test_images_do_not_depend_on_which_other_classes_are_built(self):
        with tempfile.TemporaryDirectory() as other:
            subset = small(other, "train+test", characters="A<£7")
            self.assertEqual(sorted(subset.classes), sorted("A<£7"))
            for ch in "A<£7":
                a = subset.data[subset.labels == subset.classes.index(ch)]
                b = self.all.data[self.all.labels == self.all.classes.index(ch)]
                np.testing.assert_array_equal(a, b, ch)

    def test_another_seed_changes_augmentations_only(self):
        with tempfile.TemporaryDirectory() as other:
            reseeded = small(other, "train+test", seed=1)
            self.assertEqual(reseeded.classes, self.all.classes)
            clean = self.all.augmentation_indices == 0
            np.testing.assert_array_equal(reseeded.data[clean], self.all.data[clean])
            self.assertFalse(
                np.array_equal(reseeded.data[~clean], self.all.data[~clean])
            )

    def test_another_split_seed_changes_the_split(self):
        with tempfile.TemporaryDirectory() as other:
            resplit = small(other, "train", split_seed=1)
            self.assertNotEqual(set(resplit.classes), set(self.train.classes))
            self.assertEqual(
                set(small(other, "train+test", split_seed=1).classes),
                set(self.all.classes),
            )

    def test_second_construction_reads_the_cache_without_rendering(self):
        cache = self.all.cache_dir
        mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
        boom = mock.Mock(side_effect=AssertionError("rendered again"))
        with (
            mock.patch.object(glyphs, "_build", boom),
            mock.patch.object(glyphs, "_render_clean", boom),
        ):
            for split in ("train", "test", "train+test"):
                ds = small(self.root, split)
                self.assertEqual(ds.cache_dir, cache)
            ds = small(self.root, "train", download=False)
        boom.assert_not_called()
        np.testing.assert_array_equal(ds.data, self.train.data)
        self.assertEqual(
            mtimes, {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
        )

    def test_cache_layout(self):
        names = sorted(p.name for p in Path(self.root).iterdir())
        self.assertEqual(names, [self.all.cache_dir.name])  # no temp leftovers
        self.assertTrue(self.all.cache_dir.name.startswith("glyphs-"))
        files = sorted(p.name for p in self.all.cache_dir.iterdir())
        self.assertEqual(files, ["data-test.npz", "data-train.npz", "meta.json"])
        meta = json.loads((self.all.cache_dir / "meta.json").read_text("utf-8"))
        self.assertEqual(meta["config"], self.all.config)
        self.assertEqual(sorted(meta["classes"]), sorted(self.all.classes))
        with np.load(self.all.cache_dir / "data-train.npz") as z:
            self.assertEqual(z["images"].dtype, np.uint8)
            self.assertEqual(z["images"].shape, self.train.data.shape)

    def test_losing_a_build_race_keeps_the_winners_cache(self):
        # Two processes rendering the same config: the second rename fails
        # because the folder exists; its temp folder is removed, no error.
        meta = json.loads((self.all.cache_dir / "meta.json").read_text("utf-8"))
        before = sorted(Path(self.root).iterdir())
        glyphs._write_cache(self.all.cache_dir, meta, {})
        self.assertEqual(sorted(Path(self.root).iterdir()), before)
        np.testing.assert_array_equal(small(self.root, "test").data, self.test.data)

    def test_cache_folder_permissions_follow_the_umask(self):
        # A shared data folder: the cache must be as readable as any folder made
        # there (tempfile.mkdtemp's 0o700 would survive the rename).
        with tempfile.TemporaryDirectory() as root:
            old_umask = os.umask(0o022)
            try:
                ds = small(root, "train")
                (Path(root) / "plain").mkdir()
            finally:
                os.umask(old_umask)
            mode = ds.cache_dir.stat().st_mode & 0o777
            self.assertEqual(mode, (Path(root) / "plain").stat().st_mode & 0o777)
            self.assertEqual(mode, 0o755)

    def test_different_config_uses_a_different_cache_dir(self):
        with tempfile.TemporaryDirectory() as root:
            base = small(root, "train")
            dirs = {base.cache_dir}
            for kwargs in (
                {"seed": 1},
                {"split_seed": 1},
                {"homoglyph_threshold": 0.02},
                {"augmentations_per_font": 1},
                {"image_size": 24},
                {"max_classes": 10},
                {"min_fonts": 4},
                {"characters": SMALL_CHARS[:-1]},
                {"font_files": SMALL_FONTS[:4]},
            ):
                ds = small(root, "train", **kwargs)
                self.assertNotIn(ds.cache_dir, dirs, kwargs)
                dirs.add(ds.cache_dir)
            self.assertEqual(len(list(Path(root).iterdir())), len(dirs))
            self.assertEqual(
                small(root, "train", image_size=24).data.shape[1:], (24, 24)
            )
            one_aug = small(root, "train", augmentations_per_font=1)
            self.assertEqual(set(one_aug.augmentation_indices.tolist()), {0, 1})
            self.assertEqual(len(small(root, "train+test", max_classes=10).classes), 10)
            # The default-config instance was not touched by the others.
            np.testing.assert_array_equal(small(root, "train").data, base.data)


class TempRootCase(unittest.TestCase):
    """Each test gets its own empty root folder."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.root = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()


class TestErrors(TempRootCase):
    def assert_value_error(self, needle, **kwargs):
        with self.assertRaises(ValueError) as ctx:
            small(self.root, **kwargs)
        self.assertIn(needle, str(ctx.exception))

    def test_bad_split(self):
        self.assert_value_error("'val'", split="val")

    def test_bad_arguments(self):
        self.assert_value_error("image_size", image_size=0)
        self.assert_value_error("augmentations_per_font", augmentations_per_font=-1)
        self.assert_value_error("min_fonts", min_fonts=0)
        self.assert_value_error("min_fonts=6 exceeds the 5 fonts", min_fonts=6)
        self.assert_value_error("max_classes must be an int >= 4", max_classes=3)
        self.assert_value_error("seed", seed=-1)
        self.assert_value_error("homoglyph_threshold", homoglyph_threshold=1.5)
        self.assert_value_error("characters", characters=["AB"])
        for bad in (-1, 0x110000, True):
            self.assert_value_error(f"characters: {bad!r}", characters=["A", bad])
        self.assert_value_error("augmentations_per_font", augmentations_per_font=True)
        self.assert_value_error("max_classes", max_classes=2.5)
        self.assert_value_error("nope.ttf", font_files=["nope.ttf"])
        self.assert_value_error("font_files: 1 is not a file name", font_files=[1])
        self.assert_value_error("download must be True or False", download="no")
        self.assert_value_error(
            "characters must be a string or an iterable", characters=5
        )
        self.assert_value_error("extra_font_dirs", extra_font_dirs="/no/such/dir")
        self.assert_value_error("min_fonts", characters="AΑ")  # 1 class left
        # 3 classes: one split would have a single class
        self.assert_value_error("3 character(s) left, 4 needed", characters="ABC")
        # the characters are drawn, but removed as homoglyphs: the message says so
        self.assert_value_error(
            "removed as homoglyphs (homoglyph_threshold=0.99)",
            characters="ABCDEF",
            homoglyph_threshold=0.99,
        )
        self.assertEqual(list(Path(self.root).iterdir()), [])

    def test_no_candidate_character_is_the_documented_error(self):
        # No character drawn by min_fonts fonts: the same message as for one, not a
        # numpy reshape error from the empty homoglyph check.
        for characters in ("\u4e00", "", []):
            self.assert_value_error("lower min_fonts", characters=characters)
        self.assertEqual(list(Path(self.root).iterdir()), [])

    def test_unreadable_font_file_is_named(self):
        with tempfile.TemporaryDirectory() as extra:
            broken = Path(extra) / "Broken.ttf"
            broken.write_text("not a font")
            self.assert_value_error(str(broken), extra_font_dirs=extra)

    def test_numpy_float_threshold_is_accepted(self):
        # numpy integers are accepted for the integer arguments; numpy floats in
        # range must not get the "must be in [0, 1)" error.
        ds = small(self.root, "train", homoglyph_threshold=np.float32(0.25))
        self.assertAlmostEqual(ds.config["homoglyph_threshold"], 0.25)
        self.assert_value_error(
            "homoglyph_threshold", homoglyph_threshold=np.float64(1.0)
        )

    def test_excluded_fonts_are_refused(self):
        for name in EXCLUDED_FILES:
            self.assert_value_error(name, font_files=["DejaVuSans.ttf", name])

    def test_download_false_without_cache(self):
        with self.assertRaises(FileNotFoundError) as ctx:
            small(self.root, "train", download=False)
        message = str(ctx.exception)
        self.assertIn("download=True", message)
        self.assertIn(str(self.root), message)
        self.assertEqual(list(Path(self.root).iterdir()), [])

    def test_corrupt_data_file_raises_naming_it(self):
        ds = small(self.root, "train")
        path = ds.cache_dir / "data-train.npz"
        path.write_bytes(path.read_bytes()[:1000])
        with self.assertRaises(GlyphsCacheError) as ctx:
            small(self.root, "train")
        self.assertIn(str(path), str(ctx.exception))
        self.assertIn("Delete", str(ctx.exception))
        small(self.root, "test")  # the other split's file is intact
        shutil.rmtree(ds.cache_dir)  # the documented fix
        np.testing.assert_array_equal(small(self.root, "train").data, ds.data)

    def test_flipped_bytes_in_data_file_raise_naming_it(self):
        ds = small(self.root, "test")
        path = ds.cache_dir / "data-test.npz"
        original = path.read_bytes()
        for pos in (100, len(original) // 2, len(original) - 200):
            damaged = bytearray(original)
            damaged[pos : pos + 64] = bytes(b ^ 0xFF for b in damaged[pos : pos + 64])
            path.write_bytes(bytes(damaged))
            with self.assertRaises(GlyphsCacheError, msg=pos) as ctx:
                small(self.root, "test")
            self.assertIn(str(path), str(ctx.exception))

    def test_corrupt_or_stale_meta_raises_naming_it(self):
        ds = small(self.root, "train")
        path = ds.cache_dir / "meta.json"
        meta = json.loads(path.read_text("utf-8"))
        meta["config"]["seed"] = 12345
        path.write_text(json.dumps(meta), "utf-8")
        with self.assertRaises(GlyphsCacheError) as ctx:
            small(self.root, "train")
        self.assertIn(str(path), str(ctx.exception))
        path.write_text("{not json", "utf-8")
        with self.assertRaises(GlyphsCacheError) as ctx:
            small(self.root, "train", download=False)
        self.assertIn(str(path), str(ctx.exception))

    def test_inconsistent_arrays_in_cache_raise_naming_the_file(self):
        # Readable arrays that do not fit meta.json: a wrong image size, a class of
        # the other split, a class index past the class list.
        ds = small(self.root, "train")
        path = ds.cache_dir / "data-train.npz"
        meta = json.loads((ds.cache_dir / "meta.json").read_text("utf-8"))
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}

        def with_class(index):
            ids = arrays["class_indices"].copy()
            ids[0] = index
            return dict(arrays, class_indices=ids)

        for bad, reason in (
            (dict(arrays, images=arrays["images"][:, :16, :16]), "shape"),
            (with_class(meta["is_test"].index(True)), "not in the train split"),
            (with_class(len(meta["is_test"])), "out of range"),
        ):
            with self.subTest(reason=reason):
                np.savez(path, **bad)
                with self.assertRaises(GlyphsCacheError) as ctx:
                    small(self.root, "train")
                self.assertIn(str(path), str(ctx.exception))
                self.assertIn(reason, str(ctx.exception))
        np.savez(path, **arrays)
        np.testing.assert_array_equal(small(self.root, "train").data, ds.data)

    def test_missing_file_in_cache_raises(self):
        ds = small(self.root, "train")
        (ds.cache_dir / "data-test.npz").unlink()
        with self.assertRaises(GlyphsCacheError) as ctx:
            small(self.root, "test")
        self.assertIn("data-test.npz", str(ctx.exception))


class TestFonts(unittest.TestCase):
    def test_default_fonts_exist_and_none_is_excluded(self):
        for name in DEFAULT_FONT_FILES:
            self.assertTrue((matplotlib_font_dir() / name).is_file(), name)
            self.assertIsNone(glyphs.font_exclusion_reason(name), name)
        self.assertEqual(len(DEFAULT_FONT_FILES), 21)
        for name in EXCLUDED_FILES:
            self.assertIsNotNone(glyphs.font_exclusion_reason(name), name)

    def test_glyph_names_that_name_another_character(self):
        # (code point, glyph name, code points mapped to that glyph, contradicts?)
        cases = [
            (ord("£"), "Theta", {ord("£")}, True),  # cmr10's OT1 slots
            (ord("<"), "exclamdown", {ord("<")}, True),
            (ord("A"), "A", {ord("A")}, False),
            (0xB5, "mu", {0xB5}, False),  # micro sign: NFKC-equal to Greek mu
            # Cyrillic A drawn by the glyph "A" that Latin A also maps to: trusted
            (0x410, "A", {0x410, ord("A")}, False),
            (0x410, "A", {0x410}, True),
            (0x237, "dotlessj", {0x237}, False),  # a legacy private-use AGL name
            (0xB4, "dotlessj", {0xB4}, True),  # cmr10's acute accent slot
            (ord("A"), "no_such_glyph_name", {ord("A")}, False),
        ]
        for codepoint, name, same_glyph, expected in cases:
            with self.subTest(char=chr(codepoint), name=name):
                self.assertIs(
                    glyphs._name_contradicts(codepoint, name, same_glyph), expected
                )

    def test_missing_default_font_names_the_matplotlib_version(self):
        """An older matplotlib lacks cmti10.ttf: the error says which release is needed."""
        mpl = matplotlib_font_dir()
        with (
            tempfile.TemporaryDirectory() as root,
            tempfile.TemporaryDirectory() as old,
        ):
            for name in DEFAULT_FONT_FILES:
                if name != "cmti10.ttf":
                    shutil.copy(mpl / name, Path(old) / name)
            with mock.patch.object(
                glyphs, "matplotlib_font_dir", return_value=Path(old)
            ):
                with self.assertRaisesRegex(ValueError, r"cmti10.*matplotlib >= 3\.11"):
                    Glyphs(root, "train")

    def test_extra_font_dirs_skip_excluded_and_duplicate_files(self):
        mpl = matplotlib_font_dir()
        with (
            tempfile.TemporaryDirectory() as root,
            tempfile.TemporaryDirectory() as extra,
        ):
            shutil.copy(mpl / "DejaVuSans.ttf", Path(extra) / "MyFont.ttf")
            shutil.copy(mpl / "DejaVuSerif.ttf", Path(extra) / "Dup.ttf")
            for name in ("cmex10.ttf", "cmsy10.ttf", "DejaVuSansDisplay.ttf"):
                shutil.copy(mpl / name, Path(extra) / name)
            (Path(extra) / "notes.txt").write_text("not a font")
            ds = Glyphs(
                root,
                "train+test",
                font_files=["DejaVuSerif.ttf", "STIXGeneral.ttf"],
                extra_font_dirs=[extra],
                min_fonts=3,
                characters="ABCDabcd0123",
            )
            self.assertEqual(ds.fonts, ["DejaVuSerif", "STIXGeneral", "MyFont"])
            counts = count_by(ds.labels, len(ds.classes))
            np.testing.assert_array_equal(counts, 9)


@unittest.skipIf(os.environ.get("GLYPHS_SKIP_FULL") == "1", "GLYPHS_SKIP_FULL=1")
class TestFullDefaultDataset(unittest.TestCase):
    """Builds the default dataset once (the slow test of this file)."""

    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        start = time.perf_counter()
        cls.all = Glyphs(cls._tmp.name, "train+test")
        cls.build_s = time.perf_counter() - start
        start = time.perf_counter()
        cls.train = Glyphs(cls._tmp.name, "train", download=False)
        cls.test = Glyphs(cls._tmp.name, "test", download=False)
        cls.load_s = (time.perf_counter() - start) / 2

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_sizes(self):
        for ds in (self.train, self.test):
            self.assertGreaterEqual(len(ds.classes), 150)
            counts = count_by(ds.labels, len(ds.classes))
            self.assertGreaterEqual(counts.min(), 20)
            self.assertGreaterEqual(counts.min(), 16 * 3)
            self.assertEqual(
                sorted(set(ds.labels.tolist())), list(range(len(ds.classes)))
            )
        self.assertEqual(set(self.train.classes) & set(self.test.classes), set())
        self.assertLess(self.build_s, 120)
        self.assertLess(self.load_s, 5)

    def test_fonts(self):
        self.assertEqual(self.all.fonts, [Path(f).stem for f in DEFAULT_FONT_FILES])
        for name in self.all.fonts:
            self.assertNotIn(name + ".ttf", EXCLUDED_FILES)
        # TeX fonts' mis-mapped Latin-1 code points are not used.
        cm = {self.all.fonts.index(n) for n in ("cmr10", "cmb10", "cmss10", "cmti10")}
        for ch in "£¥§©<>\"'´":
            fonts = set(
                self.all.font_indices[
                    self.all.labels == self.all.classes.index(ch)
                ].tolist()
            )
            self.assertFalse(fonts & cm, ch)
        a = self.all.classes.index("A")
        self.assertEqual(
            len(set(self.all.font_indices[self.all.labels == a].tolist())), 21
        )

    def test_no_homoglyphs(self):
        classes = set(self.all.classes)
        for group in HOMOGLYPH_GROUPS:
            self.assertIn(group[0], classes)
            self.assertFalse(set(group[1:]) & classes, group)
        self.assertEqual(homoglyph_pairs(self.all), [])


if __name__ == "__main__":
    unittest.main()


class TestAugmentationByHand(unittest.TestCase):
    """``_augment`` with noise off (or constant) against numpy and PIL: each parameter
    at the end of its range does what _AUGMENTATION says."""

    SIZE = 64
    IDENTITY = [0.5, 0.5, 0.5, 0.5, 0.99]  # angle 0, scale 1, no shift, no dilation

    def setUp(self):
        self.image = np.zeros((self.SIZE, self.SIZE), np.uint8)
        self.image[20:44, 28:36] = 255  # a vertical bar ...
        self.image[20:26, 36:46] = 180  # ... with a flag, not symmetric

    def augment(self, u, noise=None):
        if noise is None:
            noise = np.zeros((1, self.SIZE, self.SIZE), np.float32)
        return glyphs._augment(self.image[None], np.array([u], float), noise)[0]

    def test_identity_parameters_return_the_image(self):
        np.testing.assert_array_equal(self.augment(self.IDENTITY), self.image)

    def test_shift_is_three_pixels_at_the_ends(self):
        for u_x, dx in ((0.0, -3), (1.0, 3)):  # shift_frac 3 / 64 of 64 pixels
            expected = np.zeros_like(self.image)
            if dx > 0:
                expected[:, dx:] = self.image[:, :-dx]
            else:
                expected[:, :dx] = self.image[:, -dx:]
            np.testing.assert_array_equal(
                self.augment([0.5, 0.5, u_x, 0.5, 0.99]), expected
            )

    def test_rotation_is_ten_degrees_either_way(self):
        """u_angle 0 and 1 are rotations by +-10 degrees (PIL's bilinear rotation, up
        to interpolation: a mean error of 0.01 grey levels against about 4 for a
        shear or a one-sided range)."""
        rotated = {
            a: np.asarray(
                Image.fromarray(self.image).rotate(a, resample=Image.BILINEAR)
            ).astype(int)
            for a in (10, -10)
        }
        out = [self.augment([u, 0.5, 0.5, 0.5, 0.99]).astype(int) for u in (0.0, 1.0)]
        errors = [
            np.abs(out[0] - rotated[a0]).mean() + np.abs(out[1] - rotated[a1]).mean()
            for a0, a1 in ((10, -10), (-10, 10))
        ]
        self.assertLess(min(errors) / 2, 1.0)

    def test_scale_ends_are_0_85_and_1_15(self):
        for u_scale, factor in ((0.0, 0.85), (1.0, 1.15)):
            out = self.augment([0.5, u_scale, 0.5, 0.5, 0.99])
            rows = np.flatnonzero((out > 127).any(axis=1))
            self.assertLessEqual(abs(rows.max() - rows.min() + 1 - 24 * factor), 1.0)

    def test_noise_sigma_and_rounding(self):
        # a standard normal draw of 1 everywhere adds rint(0.05 * 255) = rint(12.75)
        ones = np.ones((1, self.SIZE, self.SIZE), np.float32)
        blank = np.zeros((1, self.SIZE, self.SIZE), np.uint8)
        out = glyphs._augment(blank, np.array([self.IDENTITY]), ones)
        self.assertTrue((out == 13).all())


def ink(first, count=100):
    """A 16 x 16 render whose pixels first, ..., first + count - 1 are lit."""
    x = np.zeros(256, np.uint8)
    x[first : first + count] = 255
    return x.reshape(16, 16)


class TestGlyphDistance(unittest.TestCase):
    def test_by_hand(self):
        """1 - 2 |P & Q| / (|P| + |Q|) over the lit pixels (Dice), 1 for blanks."""
        a, blank = ink(0), np.zeros((16, 16), np.uint8)
        for other, expected in (
            (a, 0.0),
            (ink(1), 1 - 2 * 99 / 200),
            (ink(50), 0.5),
            (ink(150), 1.0),
        ):
            self.assertAlmostEqual(float(glyphs.glyph_distance(a, other)), expected)
        self.assertEqual(float(glyphs.glyph_distance(blank, blank)), 1.0)
        self.assertEqual(glyphs.glyph_distance(np.stack([a, ink(150)]), a).shape, (2,))

    def test_homoglyph_keep_edges(self):
        def keep(clean, present, **kwargs):
            return glyphs._homoglyph_keep(
                np.array(clean, np.uint8), np.array(present), 0.015, **kwargs
            ).tolist()

        # two characters that no font draws both: no evidence, both kept
        blank = np.zeros((16, 16), np.uint8)
        self.assertEqual(
            keep([[ink(0), blank], [blank, ink(0)]], [[True, False], [False, True]]),
            [True, True],
        )
        # copies of earlier characters go, whatever the block size
        rng = np.random.default_rng(0)
        base = [ink(int(s)) for s in rng.integers(0, 150, 9)]
        clean = [[b] for b in base] + [[ink(200)], [base[2]], [base[5]]]
        present = [[True]] * len(clean)
        expected = keep(clean, present)
        self.assertEqual(expected[-2:], [False, False])
        for block in (1, 2, 3, 5):
            self.assertEqual(keep(clean, present, block=block), expected, block)


class TestSelectionAndRendering(TempRootCase):
    def test_oversized_glyphs_keep_the_margin(self):
        size = 32
        margin = max(1, size // 16)
        for name in ("DejaVuSans.ttf", "STIXGeneral.ttf"):
            font = ImageFont.truetype(
                str(matplotlib_font_dir() / name), 24,
                layout_engine=ImageFont.Layout.BASIC,
            )  # fmt: skip
            for char in "‰█⟷":
                render = glyphs._render_clean(font, char, size)
                if render is None:
                    continue
                for edge in (render[:margin], render[-margin:],
                             render[:, :margin], render[:, -margin:]):  # fmt: skip
                    self.assertFalse(edge.any(), (name, char))

    def test_max_classes_cuts_the_shuffled_classes(self):
        train = small(self.root, "train").classes
        everything = small(self.root)
        capped = small(self.root, "train", max_classes=len(everything.classes))
        self.assertEqual(capped.classes, train)
        ten = small(self.root, max_classes=10)
        self.assertNotEqual(sorted(ten.codepoints), sorted(everything.codepoints)[:10])

    def test_a_glyph_shared_with_another_character_counts_as_coverage(self):
        """A font that draws Cyrillic А with Latin A's glyph covers А."""
        from fontTools.ttLib import TTFont

        with tempfile.TemporaryDirectory() as extra:
            font = TTFont(str(matplotlib_font_dir() / "DejaVuSans.ttf"))
            for table in font["cmap"].tables:
                if table.isUnicode() and 0x410 in table.cmap:
                    table.cmap[0x410] = "A"
            font.save(str(Path(extra) / "Shared.ttf"))
            ds = Glyphs(self.root, font_files=["DejaVuSerif.ttf"],
                        extra_font_dirs=[extra], min_fonts=2, characters="AАBC",
                        homoglyph_threshold=0.0)  # fmt: skip
            self.assertIn("А", ds.classes)

    def test_font_names_from_extra_dirs(self):
        """A file with a default font's stem is named by its folder too; a suffix in
        capitals is a font file."""
        mpl = matplotlib_font_dir()
        with tempfile.TemporaryDirectory() as extra:
            shutil.copy(mpl / "DejaVuSerif.ttf", Path(extra) / "DejaVuSans.ttf")
            shutil.copy(mpl / "DejaVuSans-Bold.ttf", Path(extra) / "Upper.TTF")
            ds = Glyphs(self.root, font_files=["DejaVuSans.ttf", "STIXGeneral.ttf"],
                        extra_font_dirs=[extra], min_fonts=3, characters="ABCD")  # fmt: skip
            self.assertEqual(
                sorted(ds.fonts),
                sorted(["DejaVuSans", "STIXGeneral", f"{Path(extra).name}/DejaVuSans",
                        "Upper"]),
            )  # fmt: skip

    def test_cache_key_covers_font_contents_and_augmentation(self):
        with tempfile.TemporaryDirectory() as extra:
            mpl = matplotlib_font_dir()
            options = dict(font_files=["DejaVuSerif.ttf", "STIXGeneral.ttf"],
                           extra_font_dirs=[extra], min_fonts=3, characters="ABCD")  # fmt: skip
            shutil.copy(mpl / "DejaVuSans.ttf", Path(extra) / "MyFont.ttf")
            Glyphs(self.root, **options)
            Glyphs(self.root, download=False, **options)  # the cache is there
            # the same file name with other contents
            shutil.copy(mpl / "DejaVuSans-Bold.ttf", Path(extra) / "MyFont.ttf")
            with self.assertRaises(FileNotFoundError):
                Glyphs(self.root, download=False, **options)
        small(self.root, "train", max_classes=4)
        with mock.patch.dict(glyphs._AUGMENTATION, {"rotation_deg": 20.0}):
            with self.assertRaises(FileNotFoundError):
                small(self.root, "train", max_classes=4, download=False)

    def test_failed_rename_propagates_and_leaves_nothing(self):
        denied = PermissionError(13, "denied")
        with mock.patch.object(glyphs.os, "rename", side_effect=denied):
            with self.assertRaises(PermissionError):
                small(self.root, "train", max_classes=4)
        self.assertEqual(list(Path(self.root).iterdir()), [])

    def test_more_bad_arguments(self):
        mpl = matplotlib_font_dir()
        for kwargs, needle in (
            ({"font_files": [str(mpl / "DejaVuSans.ttf"), "STIXGeneral.ttf"]}, "DejaVuSans"),
            ({"font_files": "DejaVuSans.ttf"}, "sequence"),
            ({"image_size": 7}, "image_size"),
        ):  # fmt: skip
            with self.subTest(kwargs=kwargs):
                with self.assertRaises(ValueError) as ctx:
                    small(self.root, **kwargs)
                self.assertIn(needle, str(ctx.exception))

    def test_more_inconsistent_caches(self):
        """Readable files that do not fit each other: class lists of different
        lengths in meta.json, a negative class index, index arrays of other lengths
        than the images, images of another dtype."""
        ds = small(self.root, "train")
        meta_path = ds.cache_dir / "meta.json"
        data_path = ds.cache_dir / "data-train.npz"
        meta_text = meta_path.read_text("utf-8")
        with np.load(data_path) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(meta_text)
        first_train_class = meta["is_test"].index(False)
        ids = arrays["class_indices"].copy()
        ids[ids == first_train_class] = -1  # also in range from the end
        short_meta = dict(meta, classes=meta["classes"][:-1])
        for meta_edit, bad, reason in (
            (short_meta, arrays, "different lengths"),
            (meta, dict(arrays, class_indices=ids), "out of range"),
            (meta, dict(arrays, font_indices=arrays["font_indices"][:-1]), "lengths"),
            (meta, dict(arrays, images=arrays["images"].astype(np.int16)), "dtype"),
        ):
            with self.subTest(reason=reason):
                meta_path.write_text(json.dumps(meta_edit), "utf-8")
                np.savez(data_path, **bad)
                with self.assertRaises(GlyphsCacheError) as ctx:
                    small(self.root, "train")
                self.assertIn(reason, str(ctx.exception))
        meta_path.write_text(meta_text, "utf-8")
        np.savez(data_path, **arrays)
        np.testing.assert_array_equal(small(self.root, "train").data, ds.data)
