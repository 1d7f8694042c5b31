"""Inter-class triplet miner of Sharing Matters (Milbich, Roth et al., TPAMI 2020).

A "shared characteristics" triplet (a, p, n) has three pairwise different classes: no
class-specific feature can explain why p should be closer to a than n is, so a ranking loss
on such triplets can only be satisfied by features shared across classes. The negative is
drawn by distance-weighted sampling (Wu et al., "Sampling Matters", 2017), as in the
authors' DiVA code; see docs algorithms.md B.4.
"""

import contextlib
import math
from typing import Optional, Tuple

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.miners import BaseMiner

from ..utils.checks import check_generator, check_int, is_finite_real

STRATEGIES = ("standard", "full", "random")

# Distances are clamped to [max(cutoff, _DIST_EPS), 2 - _DIST_EPS] before the logs, so
# duplicates (D = 0 with cutoff 0) and antipodal points (D = 2) get finite weights. The
# distances come from cosine similarities, which in float32 resolve D only down to about
# 5e-4 (1 - s has a rounding error of 6e-8); below 1e-3 every distance is the same.
_DIST_EPS = 1e-3
# rows with a smaller norm are rescaled before normalising (the eps of PML's normalisation)
_NORM_FLOOR = 1e-12
# proposals per triplet of the rejection sampler of the uniform positive ("standard")
_TRIES = 8


class SharedCharacteristicsMiner(BaseMiner):
    """Samples inter-class triplets (y_a, y_p, y_n pairwise different) for the shared head.

    For each anchor, ``triplets_per_anchor`` independent triplets are drawn:

    - negative n: distance-weighted over {j : y_j != y_a}, with probability proportional to
      the inverse density of pairwise distances on the unit sphere,
      log w = (2 - d) log D - ((d - 3) / 2) log(1 - D^2 / 4), D clamped below at ``cutoff``;
    - positive p, from a third class {j : y_j not in {y_a, y_n}}: uniform
      (``strategy="standard"``) or distance-weighted like n (``strategy="full"``).

    ``strategy="random"`` is the label-shuffle variant of the DiVA code: the batch labels
    are randomly permuted over positions (one permutation per call), then p is uniform
    among the other rows with the anchor's pseudo-label and n distance-weighted among rows
    with a different pseudo-label. In true labels this allows y_a == y_p and even
    y_a == y_n. With a separate ``ref_emb``, the labels of the query and reference rows
    are shuffled together. A reference row of the anchor's class at a distance below 1e-3
    counts as the anchor itself (its own row, its copy in ``CrossBatchMemory``'s memory
    or ``DistributedMinerWrapper``'s gathered rows, or an exact duplicate) and is never
    its p or n.

    Anchors that cannot be served (fewer than two other classes for standard/full, or no
    pseudo-label partner for random, or no negative below ``nonzero_loss_cutoff``) produce
    no triplet, so batches with fewer than 3 classes give empty index tensors.

    Embeddings are L2-normalised internally by the distance, which must be
    ``LpDistance(p=2, power=1, normalize_embeddings=True)`` (the default). On unit rows
    D^2 = 2 - 2 cos, so the weights are computed from one matmul of the normalised rows
    (cosine similarities), about 2x cheaper on CPU than the distance's ``cdist``; in
    float32 this resolves distances down to about 1e-3. Distances and weights are
    computed on detached values in at least float32 (half-precision inputs are
    upcast, and autocast is switched off while mining), in one dtype for the query and
    reference rows (their common one). All work is vectorised on the embeddings' device;
    indices are drawn by inverse-CDF sampling (cumsum + searchsorted), which is much
    faster on CPU than ``torch.multinomial``.

    Args:
        strategy: "standard" (default), "full" or "random".
        cutoff: lower distance cutoff in [0, 2) against the high variance of the weights
            of very close pairs (0.5 as in Wu et al. and DiVA).
        nonzero_loss_cutoff: optional upper cutoff for negatives only: rows at distance
            >= it are never drawn as negatives (Wu et al. 1.4; disabled in DiVA).
        triplets_per_anchor: independent triplets drawn per anchor (int >= 1).
        generator: optional ``torch.Generator`` on the embeddings' device; otherwise
            torch's global RNG, so ``torch.manual_seed`` reproduces the draws.
        **kwargs: passed to ``BaseMiner`` (``distance``, ``collect_stats``).
    """

    def __init__(
        self,
        strategy: str = "standard",
        cutoff: float = 0.5,
        nonzero_loss_cutoff: Optional[float] = None,
        triplets_per_anchor: int = 1,
        generator: Optional[torch.Generator] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        distance = self.distance
        # an explicit check, not PML's assert_distance_type: asserts vanish under -O
        if not (
            isinstance(distance, LpDistance)
            and distance.p == 2
            and distance.power == 1
            and distance.normalize_embeddings
        ):
            got = ", ".join(
                f"{k}={getattr(distance, k, None)!r}"
                for k in ("p", "power", "normalize_embeddings")
            )
            raise ValueError(
                "SharedCharacteristicsMiner needs the distance LpDistance(p=2, "
                f"power=1, normalize_embeddings=True), got {type(distance).__name__}"
                f"({got})"
            )
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not is_finite_real(cutoff) or not 0 <= cutoff < 2:
            raise ValueError(f"cutoff must be a number in [0, 2), got {cutoff!r}")
        if nonzero_loss_cutoff is not None and (
            not is_finite_real(nonzero_loss_cutoff) or not nonzero_loss_cutoff > cutoff
        ):
            raise ValueError(
                "nonzero_loss_cutoff must be None or a number > cutoff "
                f"({cutoff}), got {nonzero_loss_cutoff!r}"
            )
        triplets_per_anchor = check_int("triplets_per_anchor", triplets_per_anchor)
        self.strategy = strategy
        self.cutoff = float(cutoff)
        self.nonzero_loss_cutoff = (
            None if nonzero_loss_cutoff is None else float(nonzero_loss_cutoff)
        )
        self.triplets_per_anchor = triplets_per_anchor
        self.generator = check_generator(generator)
        self.add_to_recordable_attributes(
            list_of_names=["cutoff", "triplets_per_anchor"], is_stat=False
        )
        self.add_to_recordable_attributes(
            list_of_names=["avg_anchor_positive_dist", "avg_anchor_negative_dist"],
            is_stat=True,
        )

    def mine(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (a, p, n): a indexes ``embeddings``, p and n index ``ref_emb``."""
        device_type = embeddings.device.type
        # under autocast (a mixed-precision trainer) the similarity matmul would run in
        # half precision, and the weights would no longer follow the distance density
        no_autocast = (
            torch.autocast(device_type, enabled=False)
            if torch.is_autocast_enabled(device_type)
            else contextlib.nullcontext()
        )
        with no_autocast:
            return self._mine(embeddings, labels, ref_emb, ref_labels)

    def _mine(self, embeddings, labels, ref_emb, ref_labels):
        if labels is None or ref_labels is None:
            raise ValueError("SharedCharacteristicsMiner requires labels")
        same_ref = ref_emb is embeddings
        device = embeddings.device
        if embeddings.ndim != 2 or ref_emb.shape[1:] != embeddings.shape[1:]:
            raise ValueError(
                "SharedCharacteristicsMiner needs embeddings and ref_emb of shape "
                f"[N, D] with the same D, got {tuple(embeddings.shape)} and "
                f"{tuple(ref_emb.shape)}"
            )
        if embeddings.shape[1] == 0:
            raise ValueError(
                "SharedCharacteristicsMiner needs embeddings with at least one "
                f"column, got sizes {tuple(embeddings.shape)} and {tuple(ref_emb.shape)}"
            )
        n_query, n_ref = embeddings.shape[0], ref_emb.shape[0]
        if n_query == 0 or n_ref == 0:
            return _empty_triplets(device)

        # at least float32, and one dtype for both (query and reference may differ)
        dtype = torch.promote_types(
            torch.promote_types(embeddings.dtype, ref_emb.dtype), torch.float32
        )
        emb = self._normalized(embeddings, dtype, "embeddings")
        ref = emb if same_ref else self._normalized(ref_emb, dtype, "ref_emb")
        # unit rows: squared distance D^2 = 2 - 2 * cosine similarity (one matmul)
        sim = emb @ ref.T
        far = None
        if self.nonzero_loss_cutoff is not None:
            far = sim <= 1.0 - self.nonzero_loss_cutoff**2 / 2.0
        if self.strategy == "random":
            # the anchor's own rows may get another pseudo-label; at distance ~0 one
            # would be its likeliest negative
            itself = (sim >= 1.0 - _DIST_EPS**2 / 2.0) & (
                labels.unsqueeze(1) == ref_labels.unsqueeze(0)
            )
            if same_ref:
                itself.fill_diagonal_(True)
        log_w = self._log_weights(sim, embeddings.shape[1])  # sim is overwritten

        if self.strategy == "random":
            labels, ref_labels = self._pseudo_labels(labels, ref_labels, same_ref)
        same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
        k = self.triplets_per_anchor
        a_idx = torch.arange(n_query, device=device)
        y_a = labels
        if k > 1:
            a_idx = a_idx.repeat_interleave(k)
            y_a = labels[a_idx]

        # negative: distance-weighted over the other (pseudo-)classes; log_w is only
        # needed again by "full", so the others mask it in place
        banned = same if far is None else same | far
        if self.strategy == "random":
            banned = banned | itself
        neg_w = _masked_weights(log_w, banned, inplace=self.strategy != "full")
        n_idx, has_n = self._sample(neg_w, k, banned)
        n_idx, has_n = n_idx.reshape(-1), has_n.reshape(-1)

        if self.strategy == "random":
            p_idx, has_p = self._sample_uniform(same & ~itself, k)
        elif self.strategy == "standard":
            p_idx, has_p = self._sample_third_class(
                same, a_idx, y_a, ref_labels[n_idx], ref_labels
            )
        else:
            # distance-weighted over the third classes: y_p != y_a and y_p != y_n
            banned = same if k == 1 else same[a_idx]
            banned = banned | (
                ref_labels.unsqueeze(0) == ref_labels[n_idx].unsqueeze(1)
            )
            pos_w = _masked_weights(log_w if k == 1 else log_w[a_idx], banned, True)
            p_idx, has_p = self._sample(pos_w, 1, banned)
        p_idx, has_p = p_idx.reshape(-1), has_p.reshape(-1)

        keep = has_n & has_p
        if not bool(keep.all()):
            a_idx, p_idx, n_idx = a_idx[keep], p_idx[keep], n_idx[keep]
        self._set_stats(emb, ref, a_idx, p_idx, n_idx)
        return a_idx, p_idx, n_idx

    def _normalized(
        self, x: torch.Tensor, dtype: torch.dtype, name: str
    ) -> torch.Tensor:
        """Detached, unit-norm rows in ``dtype``; non-finite rows raise.

        A norm that overflowed (a huge finite row would come out as zeros) or that is
        below the distance's eps (a tiny row would not reach unit norm) sends the rows
        through the distance's normalisation after dividing each by its largest
        absolute entry; zero rows stay zero, as with the distance.
        """
        x = x.detach().to(dtype)
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        if bool(((norms >= _NORM_FLOOR) & (norms < math.inf)).all()):
            return x / norms
        _check_finite(x, name)
        scale = x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        return self.distance.maybe_normalize(x / scale)

    def _log_weights(self, sim: torch.Tensor, dim: int) -> torch.Tensor:
        """Log inverse density of unit-sphere distances, up to a constant per row.

        In terms of the cosine similarity s = 1 - D^2 / 2, with D clamped to
        [max(cutoff, eps), 2 - eps]: log w = ((2 - d) / 2) log(1 - s)
        - ((d - 3) / 2) log(1 + s), which is (2 - d) log D - ((d - 3) / 2) log(1 - D^2 / 4)
        up to a constant that cancels when each row is normalised. Overwrites ``sim``.
        """
        low, high = max(self.cutoff, _DIST_EPS), 2.0 - _DIST_EPS
        sim = sim.clamp_(min=1.0 - high * high / 2.0, max=1.0 - low * low / 2.0)
        log_1_minus_s = torch.rsub(sim, 1.0).log_()  # log, cheaper than log1p on CPU
        log_1_plus_s = sim.add_(1.0).log_()
        log_w = log_1_minus_s.mul_((2.0 - dim) / 2.0)
        return log_w.add_(log_1_plus_s, alpha=-(dim - 3.0) / 2.0)

    def _pseudo_labels(
        self, labels: torch.Tensor, ref_labels: torch.Tensor, same_ref: bool
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Randomly permutes the labels over the rows (query and reference together)."""
        all_labels = labels if same_ref else torch.cat([labels, ref_labels])
        perm = torch.randperm(
            len(all_labels), generator=self.generator, device=all_labels.device
        )
        shuffled = all_labels[perm]
        if same_ref:
            return shuffled, shuffled
        return shuffled[: len(labels)], shuffled[len(labels) :]

    def _sample(
        self, weights: torch.Tensor, num_samples: int, banned: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draws ``num_samples`` column indices per row, proportional to ``weights``.

        Inverse-CDF sampling: a uniform u in [0, total) is located in the row's cumulative
        sums with searchsorted (first cumsum > u), so zero-weight columns are not drawn.
        Returns the [R, num_samples] indices and a mask of the valid draws: from rows with
        positive total (not the NaN rows of ``_masked_weights``), on columns that are not
        ``banned`` (the weights' zeros). The second check costs one gather and keeps the
        class constraint where a parallel scan (CUDA's cumsum) rounds a zero-weight
        column's cumulative sum above its predecessor's. Overwrites ``weights``.
        """
        cdf = weights.cumsum_(dim=1)  # weights are not needed afterwards
        total = cdf[:, -1:]
        u = torch.rand(
            (weights.shape[0], num_samples),
            generator=self.generator,
            device=weights.device,
            dtype=weights.dtype,
        ).mul_(total)
        # rand * total can round up to total; keep u strictly below it
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
        idx = torch.searchsorted(cdf, u, right=True).clamp_(max=weights.shape[1] - 1)
        return idx, (total > 0) & ~banned.gather(1, idx)

    def _sample_uniform(
        self, mask: torch.Tensor, num_samples: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Like ``_sample`` with weights ``mask`` (bool), on integer cumulative counts.

        The r-th allowed column (r uniform in [0, count)) is the first one whose running
        count exceeds r; this avoids a bool-to-float copy of the mask.
        """
        cdf = mask.cumsum(dim=1)
        count = cdf[:, -1:]
        u = torch.rand(
            (mask.shape[0], num_samples), generator=self.generator, device=mask.device
        )
        # floor(u * count); the float product can round up to count, hence the clamp
        r = torch.minimum(u.mul_(count).long(), count - 1)
        idx = torch.searchsorted(cdf, r, right=True).clamp_(max=mask.shape[1] - 1)
        return idx, (count > 0).expand_as(idx)

    def _sample_third_class(
        self,
        same: torch.Tensor,
        a_idx: torch.Tensor,
        y_a: torch.Tensor,
        y_n: torch.Tensor,
        ref_labels: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Uniform positive per triplet over {j : y_j not in {y_a, y_n}}, by rejection.

        ``_TRIES`` uniform proposals per triplet, the first acceptable one kept: cheap
        (no [R, M] work) when most rows belong to a third class, as in class-balanced
        batches. Triplets whose proposals all fail are drawn exactly from their masks
        (which also finds the anchors that have no third class). Both ways p is uniform.
        """
        cand = torch.randint(
            len(ref_labels),
            (len(y_a), _TRIES),
            generator=self.generator,
            device=y_a.device,
        )
        y_c = ref_labels[cand]
        ok = (y_c != y_a.unsqueeze(1)) & (y_c != y_n.unsqueeze(1))
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first True, or 0
        p_idx = cand.gather(1, first).squeeze(1)
        found = ok.gather(1, first).squeeze(1)
        miss = torch.nonzero(~found).squeeze(1)
        if len(miss) > 0:
            banned = same[a_idx[miss]] | (
                ref_labels.unsqueeze(0) == y_n[miss].unsqueeze(1)
            )
            p_miss, found_miss = self._sample_uniform(~banned, 1)
            p_idx[miss] = p_miss.squeeze(1)
            found[miss] = found_miss.squeeze(1)
        return p_idx, found

    def _set_stats(
        self,
        emb: torch.Tensor,
        ref: torch.Tensor,
        a_idx: torch.Tensor,
        p_idx: torch.Tensor,
        n_idx: torch.Tensor,
    ) -> None:
        if self.collect_stats and len(a_idx) > 0:
            ap = torch.linalg.vector_norm(emb[a_idx] - ref[p_idx], dim=1)
            an = torch.linalg.vector_norm(emb[a_idx] - ref[n_idx], dim=1)
            self.avg_anchor_positive_dist = torch.mean(ap).item()
            self.avg_anchor_negative_dist = torch.mean(an).item()


def _masked_weights(
    log_w: torch.Tensor, banned: torch.Tensor, inplace: bool = False
) -> torch.Tensor:
    """Row-wise softmax of ``log_w`` over the allowed entries, 0 where ``banned``
    (one fused pass instead of max, subtract and exp); NaN in rows with nothing
    allowed."""
    if inplace:
        masked = log_w.masked_fill_(banned, -math.inf)
    else:
        masked = log_w.masked_fill(banned, -math.inf)
    return torch.softmax(masked, dim=1)


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"SharedCharacteristicsMiner: {name} contain NaN or Inf values; "
            "distance-weighted sampling needs finite embeddings"
        )


def _empty_triplets(device: torch.device) -> Tuple[torch.Tensor, ...]:
    empty = torch.tensor([], dtype=torch.long, device=device)
    return empty, empty.clone(), empty.clone()
