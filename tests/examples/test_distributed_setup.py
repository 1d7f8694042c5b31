"""The example's ``distributed`` loss setup in 2 CPU processes (gloo).

Each rank trains a margin loss with a learned per-class beta, fed by the shared-
characteristics miner, and a Proxy-Anchor loss, on its own batches for a few SGD
steps. The miners draw different triplets on the two ranks, so the beta gradients
differ between ranks; the DistributedDataParallel wrapper averages them, and both the
betas and the proxies must stay bit-identical across ranks. The triplets must come from
the gathered batch (indices beyond the rank's own rows).
"""

import unittest

import torch
from pytorch_metric_learning import losses

from pml_proxysynth.miners import SharedCharacteristicsMiner

from ..distributed_utils import WORLD_SIZE, init_process_group, save_result, spawn
from . import load_example

BATCH_SIZE, DIM, NUM_CLASSES, STEPS = 8, 4, 6, 3


def worker(rank, port, out_dir):
    init_process_group(rank, port)
    ex = load_example()
    torch.manual_seed(rank)  # different triplets and initial parameters per rank
    setup = ex.LossSetup(
        {
            "metric_loss_0": losses.ProxyAnchorLoss(NUM_CLASSES, DIM),
            "metric_loss_1": losses.MarginLoss(
                learn_beta=True, num_classes=NUM_CLASSES
            ),
        },
        {"tuple_miner_1": SharedCharacteristicsMiner()},
        {"metric_loss_0": 1.0, "metric_loss_1": 1.0},
    )
    params = [p for loss in setup.loss_funcs.values() for p in loss.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.5)
    setup = ex.distributed(setup)
    gen = torch.Generator().manual_seed(100 + rank)
    max_index = []
    for _ in range(STEPS):
        emb = torch.randn(BATCH_SIZE, DIM, generator=gen, requires_grad=True)
        labels = torch.randint(0, NUM_CLASSES, (BATCH_SIZE,), generator=gen)
        triplets = setup.mining_funcs["tuple_miner_1"](emb, labels)
        max_index.append(max(int(t.max()) for t in triplets))
        loss = setup.loss_funcs["metric_loss_0"](emb, labels) + setup.loss_funcs[
            "metric_loss_1"
        ](emb, labels, triplets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_result(
        out_dir,
        rank,
        {
            "beta": ex.unwrap(setup.loss_funcs["metric_loss_1"]).beta.detach(),
            "proxies": ex.unwrap(setup.loss_funcs["metric_loss_0"]).proxies.detach(),
            "max_index": max(max_index),
        },
    )


class TestDistributedLossSetup(unittest.TestCase):
    def test_loss_parameters_stay_identical_across_ranks(self):
        results = spawn(worker)
        first = results[0]
        self.assertFalse(
            torch.equal(first["beta"], torch.full_like(first["beta"], 1.2))
        )
        for result in results[1:]:
            self.assertTrue(torch.equal(result["beta"], first["beta"]))
            self.assertTrue(torch.equal(result["proxies"], first["proxies"]))
        for result in results:
            self.assertGreaterEqual(result["max_index"], BATCH_SIZE)
        self.assertEqual(len(results), WORLD_SIZE)


if __name__ == "__main__":
    unittest.main()
