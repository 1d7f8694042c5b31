"""ProxySynthesisLoss inside PML's DistributedLossWrapper, in 2 CPU processes (gloo).

Each test spawns the ranks once (torch.multiprocessing.spawn, a free port on 127.0.0.1);
the ranks save what they computed and the parent process checks it against a
single-process computation written out here (not ProxySynthesisLoss), on the
concatenation of the ranks' batches in rank order, with the pairs and lam the ranks
used. The ranks seed torch's global RNG (and their generators) differently on purpose:
the synthesis must agree anyway. The tests always run on CPU, in float32 and float64 from
TEST_DTYPES.

PML's wrapper returns world_size times the loss on the gathered batch and only the
rank's own rows carry gradients, so a rank's embedding gradients are world_size times
the single-process ones of its rows (DDP's averaging then gives the single-process model
gradient), and the proxy gradients are world_size times the single-process ones: the
proxies are no DDP parameters, every rank computes their full gradient itself.
"""

import unittest

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_metric_learning import losses
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
from torch.nn.parallel import DistributedDataParallel as DDP

from pml_proxysynth.losses import ProxySynthesisLoss

from .. import TEST_DTYPES
from ..distributed_utils import WORLD_SIZE, init_process_group, save_result, spawn

NUM_CLASSES, EMBEDDING_SIZE, BATCH_SIZE = 5, 4, 6  # BATCH_SIZE rows per rank
INPUT_SIZE, STEPS, LR = 6, 3, 0.1
DTYPES = [dtype for dtype in TEST_DTYPES if dtype in (torch.float32, torch.float64)]
TEMPERATURE = 0.05  # NormalizedSoftmaxLoss

# loss, pairing, lam_per, mu, whether the ranks pass a generator
CASES = [
    ("ProxyAnchorLoss", "random", "batch", 1.0, False),
    ("NormalizedSoftmaxLoss", "random", "pair", 1.5, True),
    ("ProxyAnchorLoss", "roll", "pair", 1.0, False),
]


def build_inner(name, proxies):
    """A PML loss whose [C, D] class proxies are ``proxies``."""
    if name == "ProxyAnchorLoss":
        inner = losses.ProxyAnchorLoss(NUM_CLASSES, EMBEDDING_SIZE)
        inner.proxies.data = proxies.clone()
    else:
        inner = losses.NormalizedSoftmaxLoss(
            NUM_CLASSES, EMBEDDING_SIZE, temperature=TEMPERATURE
        )
        inner.W.data = proxies.t().clone()
    return inner.to(proxies.dtype)


def class_proxies(inner):
    return inner.proxies if isinstance(inner, losses.ProxyAnchorLoss) else inner.W.t()


def record_syntheses(wrapper):
    """Spies on ``loss_on``: the list gets (real rows, pairs, lam) of each synthesis."""
    seen = []
    loss_on = wrapper.loss_on

    def spy(synthesis, *args):
        num_real = len(synthesis.embeddings) - len(synthesis.pairs)
        real = synthesis.embeddings[:num_real].detach().clone()
        seen.append((real, synthesis.pairs.clone(), synthesis.lam.detach().clone()))
        return loss_on(synthesis, *args)

    wrapper.loss_on = spy
    return seen


def in_rank_order(real, pairs, all_emb):
    """The pairs as rows of ``all_emb`` (the ranks' batches in rank order): each real row
    the wrapper saw (normalised) is matched with its nearest row of ``all_emb``."""
    dist_to = torch.cdist(real.double(), F.normalize(all_emb.double(), dim=1))
    closest = dist_to.min(dim=1)
    assert closest.values.max() < 1e-5, "a row the loss saw is no row of the batch"
    assert sorted(closest.indices.tolist()) == list(range(len(all_emb)))
    return closest.indices[pairs]


def synthesis_by_hand(emb, proxies, labels, pairs, lam):
    """The enlarged set (algorithm of the paper), written out: real and synthetic
    rows and proxies, all normalised, and their labels."""
    x, p = F.normalize(emb, dim=1), F.normalize(proxies, dim=1)
    w = lam.reshape(-1, 1) if lam.ndim else lam
    i, j = pairs[:, 0], pairs[:, 1]
    x_syn = F.normalize(w * x[i] + (1 - w) * x[j], dim=1)
    p_syn = F.normalize(w * p[labels[i]] + (1 - w) * p[labels[j]], dim=1)
    syn_labels = torch.arange(len(proxies), len(proxies) + len(pairs))
    return (
        torch.cat([x, x_syn]),
        torch.cat([p, p_syn]),
        torch.cat([labels, syn_labels]),
    )


def loss_by_hand(name, emb, proxies, labels, pairs, lam):
    """Single-process Proxy Synthesis loss on one batch, with the given pairs and lam."""
    x, p, y = synthesis_by_hand(emb, proxies, labels, pairs, lam)
    if name == "NormalizedSoftmaxLoss":
        return F.cross_entropy(x @ p.t() / TEMPERATURE, y)
    # Proxy-Anchor (Kim et al. 2020), PML's defaults margin 0.1 and alpha 32; the
    # positive term averaged over the proxies with a positive, the negative over all
    margin, alpha = 0.1, 32.0
    cos = x @ p.t()
    pos_mask = F.one_hot(y, len(p)).bool()
    pos_exp = torch.where(pos_mask, torch.exp(-alpha * (cos - margin)), 0).sum(0)
    neg_exp = torch.where(~pos_mask, torch.exp(alpha * (cos + margin)), 0).sum(0)
    with_pos = pos_mask.any(0)
    pos = torch.log1p(pos_exp)[with_pos].sum() / with_pos.sum()
    return pos + torch.log1p(neg_exp).sum() / len(p)


def gradient_data(dtype):
    """Per case: the ranks' embeddings [W, B, D], labels [W, B] and initial proxies."""
    gen = torch.Generator().manual_seed(0)
    data = []
    for _, pairing, *_ in CASES:
        emb = torch.randn(WORLD_SIZE, BATCH_SIZE, EMBEDDING_SIZE, generator=gen)
        if pairing == "roll":  # neighbours differ, also across the rank boundaries
            labels = torch.arange(WORLD_SIZE * BATCH_SIZE) % 3 + 1
        else:
            labels = torch.randint(0, 4, (WORLD_SIZE * BATCH_SIZE,), generator=gen)
        proxies = torch.randn(NUM_CLASSES, EMBEDDING_SIZE, generator=gen)
        data.append(
            (
                emb.to(dtype),
                labels.reshape(WORLD_SIZE, BATCH_SIZE),
                proxies.to(dtype),
            )
        )
    return data


def gradients_worker(rank, port, out_dir, data_per_dtype):
    init_process_group(rank, port)
    results = []
    for data in data_per_dtype:
        for (name, pairing, lam_per, mu, use_gen), case_data in zip(CASES, data):
            emb, labels, proxies = case_data
            torch.manual_seed(100 + rank)  # the ranks' RNGs differ
            gen = torch.Generator().manual_seed(200 + rank) if use_gen else None
            inner = build_inner(name, proxies)
            wrapper = ProxySynthesisLoss(
                inner,
                mu=mu,
                pairing=pairing,
                lam_per=lam_per,
                generator=gen,
            )
            seen = record_syntheses(wrapper)
            local = emb[rank].clone().requires_grad_()
            loss = DistributedLossWrapper(wrapper)(local, labels[rank])
            loss.backward()
            (real, pairs, lam) = seen[-1]
            all_emb = emb.reshape(-1, EMBEDDING_SIZE)
            results.append(
                {
                    "loss": loss.detach(),
                    "emb_grad": local.grad,
                    "proxy_grad": next(inner.parameters()).grad,
                    "pairs": in_rank_order(real, pairs, all_emb),
                    "lam": lam,
                    "calls": len(seen),
                }
            )
    save_result(out_dir, rank, results)


def training_data(dtype):
    """Inputs [STEPS, W, B, INPUT_SIZE], labels [STEPS, W, B], initial weights."""
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(STEPS, WORLD_SIZE, BATCH_SIZE, INPUT_SIZE, generator=gen)
    labels = torch.randint(0, 4, (STEPS, WORLD_SIZE, BATCH_SIZE), generator=gen)
    weight = torch.randn(EMBEDDING_SIZE, INPUT_SIZE, generator=gen)
    proxies = torch.randn(NUM_CLASSES, EMBEDDING_SIZE, generator=gen)
    return inputs.to(dtype), labels, weight.to(dtype), proxies.to(dtype)


def training_worker(rank, port, out_dir, data_per_dtype):
    init_process_group(rank, port)
    results = []
    for inputs, labels, weight, proxies in data_per_dtype:
        torch.manual_seed(300 + rank)  # the ranks' RNGs differ
        model = torch.nn.Linear(INPUT_SIZE, EMBEDDING_SIZE, bias=False)
        model = model.to(weight.dtype)
        model.weight.data = weight.clone()
        model = DDP(model)
        wrapper = ProxySynthesisLoss(build_inner("ProxyAnchorLoss", proxies))
        seen = record_syntheses(wrapper)
        loss_fn = DistributedLossWrapper(wrapper)
        optimizer = torch.optim.SGD(
            list(model.parameters()) + list(loss_fn.parameters()), lr=LR
        )
        pairs, lams = [], []
        for step in range(STEPS):
            optimizer.zero_grad()
            emb = model(inputs[step, rank])
            loss_fn(emb, labels[step, rank]).backward()
            optimizer.step()
            (real, step_pairs, lam) = seen[-1]
            gathered = [torch.empty_like(emb) for _ in range(WORLD_SIZE)]
            dist.all_gather(gathered, emb.detach())  # in rank order
            pairs.append(in_rank_order(real, step_pairs, torch.cat(gathered)))
            lams.append(lam)
        final_proxies = wrapper.loss.proxies.detach()
        every_rank = [torch.empty_like(final_proxies) for _ in range(WORLD_SIZE)]
        dist.all_gather(every_rank, final_proxies)
        results.append(
            {
                "weight": model.module.weight.detach(),
                "proxies": final_proxies,
                "proxies_of_every_rank": every_rank,
                "pairs": pairs,
                "lam": lams,
            }
        )
    save_result(out_dir, rank, results)


def tolerance(dtype):
    return {torch.float32: 1e-4, torch.float64: 1e-10}[dtype]


@unittest.skipUnless(dist.is_available(), "torch.distributed is not available")
class TestDistributedProxySynthesis(unittest.TestCase):
    def assert_close(self, actual, expected, dtype, msg):
        tol = tolerance(dtype)
        self.assertTrue(
            torch.allclose(actual, expected, rtol=tol, atol=tol),
            f"{msg}: max abs diff {(actual - expected).abs().max().item():.3g}",
        )

    def test_equals_single_process_on_the_whole_batch(self):
        data_per_dtype = [gradient_data(dtype) for dtype in DTYPES]
        per_rank = spawn(gradients_worker, data_per_dtype)
        num_cases = len(CASES)
        for d, (dtype, data) in enumerate(zip(DTYPES, data_per_dtype)):
            for c, (case, (emb, labels, proxies)) in enumerate(zip(CASES, data)):
                name = case[0]
                with self.subTest(dtype=dtype, case=case):
                    results = [ranks[d * num_cases + c] for ranks in per_rank]
                    first = results[0]
                    all_labels = labels.reshape(-1)
                    num_pairs = round(case[3] * len(all_labels))
                    self.assertEqual(first["pairs"].shape, (num_pairs, 2))
                    pair_labels = all_labels[first["pairs"]]
                    self.assertTrue((pair_labels[:, 0] != pair_labels[:, 1]).all())
                    for r, result in enumerate(results):
                        self.assertEqual(result["calls"], 1)
                        self.assertTrue(
                            torch.equal(result["pairs"], first["pairs"]),
                            f"rank {r} mixes other rows than rank 0",
                        )
                        self.assertTrue(
                            torch.equal(result["lam"], first["lam"]),
                            f"rank {r} draws another lam than rank 0",
                        )

                    all_emb = emb.reshape(-1, EMBEDDING_SIZE).clone().requires_grad_()
                    ref_proxies = proxies.clone().requires_grad_()
                    expected = loss_by_hand(
                        name, all_emb, ref_proxies, all_labels,
                        first["pairs"], first["lam"],
                    )  # fmt: skip
                    expected.backward()
                    emb_grads = all_emb.grad.reshape(emb.shape)
                    proxy_grad = ref_proxies.grad
                    if name == "NormalizedSoftmaxLoss":  # W is [D, C]
                        proxy_grad = proxy_grad.t()
                    for r, result in enumerate(results):
                        self.assert_close(
                            result["loss"], WORLD_SIZE * expected.detach(), dtype,
                            f"loss of rank {r}",
                        )  # fmt: skip
                        self.assert_close(
                            result["emb_grad"], WORLD_SIZE * emb_grads[r], dtype,
                            f"embedding gradient of rank {r}",
                        )  # fmt: skip
                        self.assert_close(
                            result["proxy_grad"], WORLD_SIZE * proxy_grad, dtype,
                            f"proxy gradient of rank {r}",
                        )  # fmt: skip

    def test_ddp_training_keeps_the_proxies_equal(self):
        data_per_dtype = [training_data(dtype) for dtype in DTYPES]
        per_rank = spawn(training_worker, data_per_dtype)
        for d, (dtype, data) in enumerate(zip(DTYPES, data_per_dtype)):
            inputs, labels, weight, proxies = data
            results = [ranks[d] for ranks in per_rank]
            with self.subTest(dtype=dtype):
                first = results[0]
                for r, result in enumerate(results):
                    for step in range(STEPS):
                        self.assertTrue(
                            torch.equal(result["pairs"][step], first["pairs"][step]),
                            f"step {step}: rank {r} mixes other rows than rank 0",
                        )
                        self.assertTrue(
                            torch.equal(result["lam"][step], first["lam"][step]),
                            f"step {step}: rank {r} draws another lam than rank 0",
                        )
                    for other, gathered in enumerate(result["proxies_of_every_rank"]):
                        self.assert_close(
                            gathered, result["proxies"], dtype,
                            f"proxies of rank {other} seen from rank {r}",
                        )  # fmt: skip
                self.assertFalse(torch.allclose(first["proxies"], proxies))

                # single process on the concatenated batches, plain SGD; the proxies'
                # step is world_size times larger, as their gradient under PML's wrapper
                ref_weight = weight.clone().requires_grad_()
                ref_proxies = proxies.clone().requires_grad_()
                for step in range(STEPS):
                    emb = inputs[step].reshape(-1, INPUT_SIZE) @ ref_weight.t()
                    loss = loss_by_hand(
                        "ProxyAnchorLoss", emb, ref_proxies, labels[step].reshape(-1),
                        first["pairs"][step], first["lam"][step],
                    )  # fmt: skip
                    grad_weight, grad_proxies = torch.autograd.grad(
                        loss, [ref_weight, ref_proxies]
                    )
                    with torch.no_grad():
                        ref_weight -= LR * grad_weight
                        ref_proxies -= LR * WORLD_SIZE * grad_proxies
                for r, result in enumerate(results):
                    self.assert_close(
                        result["weight"], ref_weight.detach(), dtype,
                        f"model weight of rank {r}",
                    )  # fmt: skip
                    self.assert_close(
                        result["proxies"], ref_proxies.detach(), dtype,
                        f"proxies of rank {r}",
                    )  # fmt: skip


if __name__ == "__main__":
    unittest.main()
