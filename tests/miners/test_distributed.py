"""SharedCharacteristicsMiner inside PML's DistributedMinerWrapper, in 2 CPU processes.

The ranks (gloo, torch.multiprocessing.spawn, a free port on 127.0.0.1) mine on their
batches and feed the triplets to DistributedLossWrapper(TripletMarginLoss); they save
what the miner received and returned and the loss, and the parent process checks them
on the gathered reference set rebuilt here from the ranks' batches: PML's gather puts a
rank's own rows first, then the other ranks' rows in rank order. Rank 0's batch holds
classes {0, 1} only, rank 1's {2, 3}: alone, rank 0 could not serve any anchor (the miner
needs three classes), so every triplet it gets comes from the gathered set. The ranks
seed torch's RNG differently; they need not agree on the triplets (each rank's loss
covers its own triplets, only its own rows carry gradients).
"""

import unittest

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.utils.distributed import (
    DistributedLossWrapper,
    DistributedMinerWrapper,
)

from pml_proxysynth.miners import SharedCharacteristicsMiner

from .. import TEST_DTYPES
from ..distributed_utils import WORLD_SIZE, init_process_group, save_result, spawn

BATCH_SIZE, DIM = 8, 4  # BATCH_SIZE rows per rank
TRIPLETS_PER_ANCHOR, MARGIN = 3, 0.2
STRATEGIES = ("standard", "full", "random")
DTYPES = [dtype for dtype in TEST_DTYPES if dtype in (torch.float32, torch.float64)]


def make_batches(dtype):
    """Embeddings [W, B, D] and labels [W, B]: rank 0 classes {0, 1}, rank 1 {2, 3}."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(WORLD_SIZE, BATCH_SIZE, DIM, generator=gen).to(dtype)
    labels = torch.stack(
        [
            (torch.arange(BATCH_SIZE) % 2 + 2 * r)[
                torch.randperm(BATCH_SIZE, generator=gen)
            ]
            for r in range(WORLD_SIZE)
        ]
    )
    return emb, labels


def as_gathered(x, rank):
    """What PML's gather gives rank ``rank``: its own rows, then the others in order."""
    others = [x[k] for k in range(WORLD_SIZE) if k != rank]
    return torch.cat([x[rank], *others])


def record_mine_inputs(miner):
    seen = []
    mine = miner.mine

    def spy(embeddings, labels, ref_emb, ref_labels):
        seen.append(
            {
                "emb": embeddings.detach().clone(),
                "labels": labels.clone(),
                "ref_is_emb": ref_emb is embeddings,
                "ref_emb": ref_emb.detach().clone(),
                "ref_labels": ref_labels.clone(),
            }
        )
        return mine(embeddings, labels, ref_emb, ref_labels)

    miner.mine = spy
    return seen


def worker(rank, port, out_dir, batches_per_dtype):
    init_process_group(rank, port)
    torch.manual_seed(10 + rank)  # the ranks' RNGs differ
    results = []
    for emb, labels in batches_per_dtype:
        for strategy in STRATEGIES:
            for efficient in (False, True):
                miner = SharedCharacteristicsMiner(
                    strategy=strategy, triplets_per_anchor=TRIPLETS_PER_ANCHOR
                )
                seen = record_mine_inputs(miner)
                local = emb[rank].clone().requires_grad_()
                triplets = DistributedMinerWrapper(miner, efficient=efficient)(
                    local, labels[rank]
                )
                loss_fn = DistributedLossWrapper(
                    TripletMarginLoss(margin=MARGIN), efficient=efficient
                )
                loss = loss_fn(local, labels[rank], triplets)
                loss.backward()
                results.append(
                    {
                        "triplets": triplets,
                        "mine_inputs": seen,
                        "loss": loss.detach(),
                        "grad": local.grad,
                    }
                )
    save_result(out_dir, rank, results)


def triplet_loss_by_hand(query, ref, a, p, n):
    """TripletMarginLoss with PML's defaults written out: unit-sphere distances,
    relu(d_ap - d_an + margin), averaged over the triplets with a positive loss."""
    q, r = F.normalize(query, dim=1), F.normalize(ref, dim=1)
    d_ap = (q[a] - r[p]).norm(dim=1)
    d_an = (q[a] - r[n]).norm(dim=1)
    losses = F.relu(d_ap - d_an + MARGIN)
    positive = losses > 0
    if not positive.any():
        return losses.sum()
    return losses[positive].mean()


@unittest.skipUnless(dist.is_available(), "torch.distributed is not available")
class TestDistributedSharedCharacteristicsMiner(unittest.TestCase):
    def test_triplets_on_the_gathered_set(self):
        batches_per_dtype = [make_batches(dtype) for dtype in DTYPES]
        per_rank = spawn(worker, batches_per_dtype)
        configs = [
            (dtype, strategy, efficient)
            for dtype in DTYPES
            for strategy in STRATEGIES
            for efficient in (False, True)
        ]
        num_ref = WORLD_SIZE * BATCH_SIZE
        for c, (dtype, strategy, efficient) in enumerate(configs):
            emb, labels = batches_per_dtype[DTYPES.index(dtype)]
            for rank in range(WORLD_SIZE):
                result = per_rank[rank][c]
                with self.subTest(
                    dtype=dtype, strategy=strategy, efficient=efficient, rank=rank
                ):
                    ref_emb, ref_labels = (
                        as_gathered(emb, rank),
                        as_gathered(labels, rank),
                    )
                    (inputs,) = result["mine_inputs"]
                    self.assertTrue(torch.equal(inputs["ref_emb"], ref_emb))
                    self.assertTrue(torch.equal(inputs["ref_labels"], ref_labels))
                    if efficient:  # the rank's rows against the gathered set
                        query_emb, query_labels = emb[rank], labels[rank]
                        self.assertFalse(inputs["ref_is_emb"])
                    else:  # every rank mines the whole gathered set
                        query_emb, query_labels = ref_emb, ref_labels
                        self.assertTrue(inputs["ref_is_emb"])
                    self.assertTrue(torch.equal(inputs["emb"], query_emb))
                    self.assertTrue(torch.equal(inputs["labels"], query_labels))

                    a, p, n = result["triplets"]
                    for idx in (a, p, n):
                        self.assertEqual(idx.dtype, torch.long)
                    self.assertTrue(((a >= 0) & (a < len(query_labels))).all())
                    for idx in (p, n):
                        self.assertTrue(((idx >= 0) & (idx < num_ref)).all())
                    # the query rows are the first ones of the gathered set, so a row
                    # of the query set and of the reference set are the same if equal
                    self.assertTrue((a != p).all())
                    num_anchors = len(query_labels) * TRIPLETS_PER_ANCHOR
                    if strategy == "random":
                        # pseudo-labels: no class constraint; with efficient=True PML
                        # removes the triplets whose positive is the anchor itself
                        self.assertTrue(0 < len(a) <= num_anchors)
                        if not efficient:
                            self.assertEqual(len(a), num_anchors)
                    else:
                        self.assertEqual(len(a), num_anchors)  # every anchor served
                        y_a, y_p, y_n = query_labels[a], ref_labels[p], ref_labels[n]
                        self.assertTrue((y_a != y_p).all())
                        self.assertTrue((y_a != y_n).all())
                        self.assertTrue((y_p != y_n).all())

                    # the loss on those indices, by hand, single process
                    rows = emb.clone().requires_grad_()
                    gathered = as_gathered(rows, rank)
                    query = rows[rank] if efficient else gathered
                    expected = triplet_loss_by_hand(query, gathered, a, p, n)
                    expected.backward()
                    tol = 1e-4 if dtype == torch.float32 else 1e-10
                    self.assertTrue(
                        torch.allclose(
                            result["loss"], WORLD_SIZE * expected.detach(), rtol=tol
                        ),
                        (result["loss"], WORLD_SIZE * expected),
                    )
                    self.assertTrue(
                        torch.allclose(
                            result["grad"],
                            WORLD_SIZE * rows.grad[rank],
                            rtol=tol,
                            atol=tol,
                        )
                    )


if __name__ == "__main__":
    unittest.main()
