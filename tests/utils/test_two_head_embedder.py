import unittest

import numpy as np
import torch

from pml_proxysynth.utils import TwoHeadEmbedder, split_heads

from .. import TEST_DEVICE, TEST_DTYPES


def manual_head(h, linear):
    """h W^T + b, divided by its Euclidean norm, written out in float64."""
    out = h.double() @ linear.weight.double().T + linear.bias.double()
    return out / torch.sqrt((out**2).sum(dim=1, keepdim=True))


class TestTwoHeadEmbedder(unittest.TestCase):
    def test_output_is_concatenation_of_normalized_heads(self):
        torch.manual_seed(0)
        for dtype in TEST_DTYPES:
            embedder = TwoHeadEmbedder(12, class_size=5, shared_size=3).to(
                TEST_DEVICE, dtype
            )
            h = torch.randn(7, 12, device=TEST_DEVICE, dtype=dtype)
            out = embedder(h)
            self.assertEqual(out.shape, (7, 8))
            self.assertEqual(out.dtype, dtype)
            self.assertEqual(embedder.embedding_sizes, [5, 3])
            rtol = 1e-2 if dtype == torch.float16 else 1e-5
            atol = 1e-3 if dtype == torch.float16 else 1e-6
            correct = torch.cat(
                [
                    manual_head(h, embedder.class_head),
                    manual_head(h, embedder.shared_head),
                ],
                dim=1,
            ).to(dtype)
            self.assertTrue(torch.allclose(out, correct, rtol=rtol, atol=atol))
            e_cls, e_sh = embedder.split(out)
            self.assertEqual(e_cls.shape, (7, 5))
            self.assertEqual(e_sh.shape, (7, 3))
            for part in (e_cls, e_sh):
                norms = part.double().norm(dim=1)
                self.assertTrue(
                    torch.allclose(norms, torch.ones_like(norms), atol=atol * 10)
                )

    def test_split_matches_cascaded_embeddings_slicing(self):
        embedder = TwoHeadEmbedder(4, class_size=6, shared_size=2)
        out = embedder(torch.randn(3, 4))
        e_cls, e_sh = embedder.split(out)
        # CascadedEmbeddings: e_i = embeddings[:, s : s + size_i]
        s = 0
        for part, size in zip((e_cls, e_sh), embedder.embedding_sizes):
            self.assertTrue(torch.equal(part, out[:, s : s + size]))
            s += size
        self.assertEqual(s, out.shape[1])
        parts = split_heads(torch.arange(12.0).reshape(2, 6), [1, 2, 3])
        self.assertEqual([p.tolist() for p in parts][2], [[3, 4, 5], [9, 10, 11]])

    def test_heads_are_independent(self):
        torch.manual_seed(1)
        embedder = TwoHeadEmbedder(6, class_size=4, shared_size=4)
        e_cls, _ = embedder.split(embedder(torch.randn(5, 6)))
        e_cls.sum().backward()
        self.assertGreater(embedder.class_head.weight.grad.abs().sum().item(), 0)
        self.assertTrue(
            embedder.shared_head.weight.grad is None
            or not embedder.shared_head.weight.grad.any()
        )

    def test_defaults(self):
        embedder = TwoHeadEmbedder(32)
        self.assertEqual(embedder.embedding_sizes, [128, 128])
        self.assertEqual(embedder(torch.randn(2, 32)).shape, (2, 256))

    def test_validation(self):
        for bad in (0, -3):
            with self.assertRaises(ValueError):
                TwoHeadEmbedder(bad)
            with self.assertRaises(ValueError):
                TwoHeadEmbedder(8, class_size=bad)
            with self.assertRaises(ValueError):
                TwoHeadEmbedder(8, shared_size=bad)
        for bad in (2.5, True, "8"):
            with self.assertRaisesRegex(ValueError, "in_features must be an int >= 1"):
                TwoHeadEmbedder(bad)
        with self.assertRaisesRegex(ValueError, "bias must be True or False"):
            TwoHeadEmbedder(8, bias="no")  # bool("no") is True: a bias
        numpy_sized = TwoHeadEmbedder(np.int64(8), np.int32(3), np.int64(2))
        self.assertEqual(numpy_sized.embedding_sizes, [3, 2])
        self.assertIs(type(numpy_sized.in_features), int)
        embedder = TwoHeadEmbedder(8, class_size=3, shared_size=2)
        with self.assertRaises(ValueError):
            embedder(torch.randn(2, 7))
        with self.assertRaises(ValueError):
            embedder.split(torch.randn(2, 6))
        with self.assertRaises(ValueError):
            split_heads(torch.randn(2, 6), [])


if __name__ == "__main__":
    unittest.main()
