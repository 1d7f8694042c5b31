import math
import unittest

import numpy as np
import torch

from pml_proxysynth.utils.checks import (
    check_bool,
    check_generator,
    check_int,
    is_finite_real,
)


class TestCheckInt(unittest.TestCase):
    def test_integers_at_or_above_the_minimum_come_back_as_ints(self):
        for value, minimum in [
            (1, 1),
            (7, 1),
            (0, 0),
            (np.int64(5), 2),
            (np.uint8(3), 3),
        ]:
            with self.subTest(value=value, minimum=minimum):
                got = check_int("n", value, minimum)
                self.assertEqual(got, int(value))
                self.assertIs(type(got), int)

    def test_an_upper_bound(self):
        self.assertEqual(check_int("word", 2**32 - 1, 0, 2**32 - 1), 2**32 - 1)
        with self.assertRaisesRegex(
            ValueError, r"^word must be an int in \[0, 4294967295\], got 4294967296$"
        ):
            check_int("word", 2**32, 0, 2**32 - 1)

    def test_non_integers_and_small_values_name_the_argument(self):
        for value, minimum, shown in [
            (0, 1, "0"),
            (-2, 0, "-2"),
            (np.int64(1), 2, "np.int64\\(1\\)"),
            (True, 0, "True"),  # a bool is not a count
            (2.0, 1, "2.0"),
            ("3", 1, "'3'"),
            (None, 1, "None"),
        ]:
            with self.subTest(value=value, minimum=minimum):
                with self.assertRaisesRegex(
                    ValueError, rf"^size must be an int >= {minimum}, got {shown}$"
                ):
                    check_int("size", value, minimum)


class TestOtherChecks(unittest.TestCase):
    def test_is_finite_real(self):
        for value in (0, -3, 2.5, np.float32(0.5), np.int64(4)):
            self.assertTrue(is_finite_real(value), value)
        for value in (True, "1", None, math.nan, -math.inf, np.float64("nan"), [1]):
            self.assertFalse(is_finite_real(value), value)

    def test_check_bool(self):
        self.assertIs(check_bool("flag", np.bool_(True)), True)
        self.assertIs(check_bool("flag", False), False)
        for value in ("no", 0, None):
            with self.assertRaisesRegex(ValueError, "^flag must be True or False"):
                check_bool("flag", value)

    def test_check_generator(self):
        generator = torch.Generator()
        self.assertIs(check_generator(generator), generator)
        self.assertIsNone(check_generator(None))
        with self.assertRaisesRegex(ValueError, "torch.Generator or None, got 0"):
            check_generator(0)


if __name__ == "__main__":
    unittest.main()
