import unittest

import numpy as np

from pml_proxysynth.utils.checks import check_int


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

    def test_non_integers_and_small_values_name_the_argument(self):
        for value, minimum, shown in [
            (0, 1, "0"),
            (-2, 0, "-2"),
            (np.int64(1), 2, "1"),
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


if __name__ == "__main__":
    unittest.main()
