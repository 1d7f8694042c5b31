"""Proxy Synthesis (Gu, Ko, Kim, AAAI 2021) as a wrapper around a PML proxy loss."""

import contextlib
import math
import warnings
from typing import Iterable, Iterator, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import BaseDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import (
    ClassWeightedReducer,
    DivisorReducer,
    DoNothingReducer,
    MultipleReducers,
)
from pytorch_metric_learning.utils import common_functions as c_f

from ..utils.checks import check_bool, check_generator, is_finite_real
from .proxy_specs import PROXY_SPECS, ProxySpec, find_proxy_spec

PAIRINGS = ("random", "roll")
LAMBDA_MODES = ("batch", "pair")
POSITIVE_DIVISORS = ("all", "real", "real_only")


class Synthesis(NamedTuple):
    """The enlarged set the inner loss is computed on.

    embeddings: [B+M, D] normalised real rows, then the M synthetic rows.
    labels: [B+M] real labels, then the synthetic labels C, ..., C+M-1.
    proxies: [C+M, D] (or [C+M, k, D] for multi-centre losses), normalised.
    lam: the mixing weight: a scalar tensor, or [M] with one weight per pair.
    pairs: [M, 2] batch indices (i, j); synthetic row m is lam*x_i + (1-lam)*x_j.
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    proxies: torch.Tensor
    lam: torch.Tensor
    pairs: torch.Tensor


class ProxySynthesisLoss(BaseMetricLossFunction):
    """Adds synthetic classes to a PML proxy loss before it runs (Proxy Synthesis).

    For each batch, M = floor(mu * B + 0.5) pairs (i, j) of embeddings of different
    classes and their class proxies are mixed with the same weight lam ~ Beta(alpha, alpha):
    x = lam*x_i + (1-lam)*x_j, p = lam*p_{y_i} + (1-lam)*p_{y_j}, each synthetic row its own
    new class. The unchanged inner loss then runs on the real and synthetic rows and proxies,
    all L2-normalised. The inner loss is a registered submodule, so its proxies are this
    module's parameters; it is left as it was after every call, except that a loss
    that renormalises its proxies in place on every call (P2SGradLoss) gets that done
    to its Parameter, as its own call would (``ProxySpec.renormalizes_in_place``).

    Args:
        loss: a supported PML proxy loss (see ``proxy_specs.PROXY_SPECS``).
        alpha: Beta(alpha, alpha) shape of the mixing weight; > 0.
        mu: synthetic classes per real sample; >= 0 (0 turns synthesis off).
        pairing: "random" pairs each row with a random row of another class (works for any
            batch, e.g. MPerClassSampler's; with mu > 1 a row's partners are distinct
            while it has enough other-class rows, and repeat after that, with a
            warning under ``lam_per="batch"``, where a repeated pair is a duplicate
            synthetic class); "roll" is the official pairing of row
            i with row i-1 (then i-2, ... when mu > 1) and raises if a pair shares a
            class.
        lam_per: "batch" draws one lam per batch (the paper); "pair" one per synthetic row.
        positive_divisor: for losses that average a positive term over the proxies with a
            positive in the batch (ProxyAnchorLoss): "all" (the official behaviour) divides
            it by the real and the M synthetic such proxies, so the synthetic ones, each
            with a single positive, dilute the real classes' pull; "real" divides the real
            proxies' share by the real classes in the batch only, as without synthesis
            (the synthetic share keeps the official divisor); "real_only" does the same
            and drops the synthetic share: the positive term averages over the real
            proxies only, so synthetic classes act as negatives only.
        exclude_parents: False (official): a synthetic class is a negative of its two
            parent classes like of every other class. True: it is neither positive nor
            negative for them; the pairs (synthetic row, parent proxy) and (parent
            class's row, synthetic proxy) are left out of the inner loss's similarity
            matrix. For losses marked ``excludable_pairs`` in ``PROXY_SPECS``
            (ProxyAnchorLoss, ProxyNCALoss, NormalizedSoftmaxLoss, ArcFaceLoss,
            CosFaceLoss).
        detach_parent_proxies: False (official): the synthetic proxies' gradients reach
            their parents, so the synthetic classes also move the real proxies. True: the
            synthetic proxies are mixes of detached parent proxies; the synthetic classes
            then train the embeddings only (the real proxies get the gradients of the
            real rows and of their role as negatives of the synthetic rows). Forward
            values are unchanged.
        generator: optional ``torch.Generator`` for the pairs and lam; otherwise torch's
            global RNG, so ``torch.manual_seed`` makes runs reproducible. Under
            torch.distributed only rank 0's draw from it matters (see below).

    Synthesis is skipped (the bare inner loss is returned) when mu = 0, when the batch has a
    single class, and in eval mode. ``indices_tuple`` is rejected: PML proxy losses turn it
    into per-sample weights, which would give every synthetic row weight 0.

    torch.distributed: inside PML's ``DistributedLossWrapper`` every rank computes the
    loss on the gathered batch, so every rank must make the same synthesis, or the
    losses and the proxy gradients differ between ranks and the proxies (which DDP does
    not synchronise) drift apart. Seeding the ranks identically is not enough: PML puts
    each rank's own rows first (rank r sees its rows, then those of ranks 0, ..., r-1,
    r+1, ... in order), so equal draws would pick different rows on different ranks.
    Hence, whenever a process group with more than one rank is initialised, each
    training-mode call (and each ``synthesize``) is a collective: every rank draws a
    seed from its ``generator`` (or the global RNG), rank 0's seed is broadcast, and all
    ranks draw the pairs and lam from it on the batch put back in rank order (rank 0's
    rows first), then map them to their own row order. The synthesis then equals a
    single-process one on the concatenation of the ranks' batches, whatever the seeds
    of the ranks; so call the loss on every rank, the same number of times. On
    per-rank batches (the loss used without the wrapper) the draws stay valid, only
    correlated across ranks. PML's wrapper multiplies the loss by the world size (for
    DDP's gradient averaging), so the proxies' gradients are world size times those of
    the single-process loss on the whole batch; nothing synchronises them, and as the
    ranks sum their rows in different orders the proxies agree up to rounding only
    (wrap the loss wrapper in DDP as well to all-reduce their gradients).
    """

    def __init__(
        self,
        loss: BaseMetricLossFunction,
        alpha: float = 0.4,
        mu: float = 1.0,
        pairing: str = "random",
        lam_per: str = "batch",
        positive_divisor: str = "all",
        exclude_parents: bool = False,
        detach_parent_proxies: bool = False,
        generator: Optional[torch.Generator] = None,
        **kwargs,
    ):
        for name in ("distance", "reducer"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"ProxySynthesisLoss takes no {name}: the inner loss computes the "
                    f"loss with its own; pass {name}=... to the inner loss instead"
                )
        super().__init__(**kwargs)
        self.spec: ProxySpec = find_proxy_spec(loss)
        if not (is_finite_real(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if not (is_finite_real(mu) and mu >= 0):
            raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        if lam_per not in LAMBDA_MODES:
            raise ValueError(f"lam_per must be one of {LAMBDA_MODES}, got {lam_per!r}")
        if positive_divisor not in POSITIVE_DIVISORS:
            raise ValueError(
                f"positive_divisor must be one of {POSITIVE_DIVISORS}, "
                f"got {positive_divisor!r}"
            )
        for reducer in loss.reducer.modules():
            if isinstance(reducer, (DoNothingReducer, ClassWeightedReducer)):
                raise ValueError(
                    f"ProxySynthesisLoss cannot wrap a {type(loss).__name__} with a "
                    f"{type(reducer).__name__}: it needs the inner loss reduced to one "
                    "value over labels that include the synthetic classes C, ..., "
                    "C+M-1; DoNothingReducer returns the unreduced loss dict, and "
                    "ClassWeightedReducer has no weight for a synthetic class"
                )
        term = self.spec.positive_term
        term_reducer = _term_reducer(loss.reducer, term)
        if positive_divisor != "all" and not isinstance(term_reducer, DivisorReducer):
            got = (
                f"{type(loss).__name__}, which has no such term"
                if term is None
                else f"{type(loss).__name__} whose {term!r} reducer is "
                f"{type(term_reducer).__name__}"
            )
            raise ValueError(
                f"positive_divisor={positive_divisor!r} needs a loss that averages its "
                "positive term over the proxies with a positive, with PML's "
                f"DivisorReducer (ProxyAnchorLoss with its default reducer); got {got}"
            )
        if exclude_parents and not self.spec.excludable_pairs:
            excludable = [c for c, v in PROXY_SPECS.items() if v.excludable_pairs]
            names = ", ".join(c.__name__ for c in excludable)
            parents = [c.__name__ for c in excludable if isinstance(loss, c)]
            why = ""
            if parents:  # the spec of the nearest listed class decides
                why = f" (a subclass of {parents[0]} with its own PROXY_SPECS entry"
                if self.spec.centers_attr:
                    why += (
                        f": with several proxies per class ({self.spec.centers_attr})"
                        " its similarity matrix has a column per proxy, not per class"
                    )
                why += ")"
            raise ValueError(
                f"exclude_parents=True needs one of {names} (a loss that can leave "
                f"pairs out of its similarity matrix); got {type(loss).__name__}{why}"
            )
        self.loss = loss
        self._num_classes()  # an inner loss inconsistent with its proxies: an error now
        self.alpha = float(alpha)
        self.mu = float(mu)
        self.pairing = pairing
        self.lam_per = lam_per
        self.positive_divisor = positive_divisor
        self.exclude_parents = check_bool("exclude_parents", exclude_parents)
        self.detach_parent_proxies = check_bool(
            "detach_parent_proxies", detach_parent_proxies
        )
        self.generator = check_generator(generator)
        self.add_to_recordable_attributes(list_of_names=["alpha", "mu"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["lam", "num_synthetic_classes"], is_stat=True
        )

    # ------------------------------------------------------------------ public API
    def synthesize(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Synthesis:
        """Draws pairs and lam and builds the enlarged, normalised set (see ``Synthesis``).

        Unlike ``forward``, this ignores eval mode, so synthetic classes can be inspected.
        """
        c_f.labels_required(labels)
        labels = c_f.to_device(labels, embeddings)
        self._check_inputs(embeddings, labels)
        labels = labels.long()  # see compute_loss
        return self._synthesize(
            embeddings,
            labels,
            self.num_synthetic_for(labels),
            self._shared_generator(embeddings),
        )

    def num_synthetic_for(self, labels: torch.Tensor) -> int:
        """M for this batch: round(mu * B), halves up (floor(mu * B + 0.5)), or 0 when
        the batch holds a single class."""
        if len(torch.unique(labels)) < 2:
            return 0
        return int(math.floor(self.mu * len(labels) + 0.5))

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The inner loss's logits over the real classes only."""
        return self.loss.get_logits(embeddings)

    def loss_on(
        self, synthesis: Synthesis, embeddings: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The unchanged inner loss on an enlarged set, with its proxies swapped in.

        The set must be L2-normalised, as ``synthesize`` returns it: an inner distance that
        L2-normalises its inputs is told not to for this call (it would only repeat the
        normalisation, forward and backward). (Its proxies may also be unnormalised for a
        loss that normalises them itself, ``ProxySpec.normalizes_own_proxies``.)

        The inner loss's regularizers get what the bare loss would give them, not the
        normalised enlarged set (on unit rows a norm penalty such as PML's
        ``LpRegularizer`` is a constant, silently doing nothing): its
        ``weight_regularizer`` the inner loss's own proxies, its
        ``embedding_regularizer`` ``embeddings``, the batch as given to ``forward``
        (default: the set's real rows)."""
        if embeddings is None:
            num_real = len(synthesis.embeddings) - len(synthesis.pairs)
            embeddings = synthesis.embeddings[:num_real]
        proxies = synthesis.proxies.reshape(-1, synthesis.proxies.shape[-1])
        param = proxies if self.spec.classes_on_rows else proxies.t()
        with self._patched(synthesis, embeddings, param):
            return self.loss(synthesis.embeddings, synthesis.labels)

    # ------------------------------------------------------------------ PML hooks
    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        if indices_tuple is not None:
            raise ValueError(
                "ProxySynthesisLoss does not accept indices_tuple (miner output): PML proxy "
                "losses turn it into per-sample weights, which would give every synthetic "
                "row weight 0. Use a sampler instead of a tuple miner for this loss."
            )
        self._check_inputs(embeddings, labels)
        if self.spec.renormalizes_in_place:
            self._renormalize_proxies()
        # int64 whatever integer dtype they came in: the gathers need int32 or int64,
        # PML's one_hot int64, and the synthetic labels C, ..., C+M-1 may not fit int8
        labels = labels.long()
        # before the skip test, so that all ranks take part in the broadcast even when
        # their per-rank batches differ (the loss used without PML's wrapper)
        shared = self._shared_generator(embeddings) if self.training else None
        num_pairs = self.num_synthetic_for(labels) if self.training else 0
        if num_pairs == 0:
            self._record(None)
            loss = self._bare_loss(embeddings, labels)
        else:
            synthesis = self._synthesize(
                embeddings,
                labels,
                num_pairs,
                shared,
                normalize_proxies=not self.spec.normalizes_own_proxies,
            )
            self._record(synthesis)
            loss = self.loss_on(synthesis, embeddings)
        return {
            "loss": {
                "losses": loss,
                "indices": None,
                "reduction_type": "already_reduced",
            }
        }

    # ------------------------------------------------------------------ helpers
    def _synthesize(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        num_pairs: int,
        shared: Optional[torch.Generator] = None,
        normalize_proxies: bool = True,
    ) -> Synthesis:
        """The enlarged set. Real rows and proxies are normalised once, before the mixing,
        and not again after the concatenation: the result equals the official
        re-normalisation of the whole set, at O(M) instead of O(B+C) more work. With
        ``normalize_proxies=False`` the real proxies are returned as they are and the
        synthetic ones as unnormalised mixes of normalised parents, for an inner loss
        that normalises its proxies itself."""
        raw_proxies = self._class_proxies(embeddings)
        num_classes = raw_proxies.shape[0]
        x = _l2_normalize(embeddings)
        pairs, lam = self._draw_pairs_and_lam(labels, num_pairs, embeddings, shared)
        x_pairs = _rows(x, pairs)
        x_syn = _l2_normalize(_mix(*x_pairs.unbind(1), lam))
        parents = labels[pairs]
        # normalise the C proxies, or only the 2M parents' ones if fewer (possible when
        # the inner loss normalises its proxies itself: they are returned unnormalised)
        if normalize_proxies or num_classes <= parents.numel():
            normalized = _l2_normalize(raw_proxies)
            p_pairs = _rows(normalized, parents)
            proxies = normalized if normalize_proxies else raw_proxies
        else:
            p_pairs = _l2_normalize(_rows(raw_proxies, parents))
            proxies = raw_proxies
        if self.detach_parent_proxies:
            p_pairs = p_pairs.detach()
        p_syn = _mix(*p_pairs.unbind(1), lam)
        if normalize_proxies:
            p_syn = _l2_normalize(p_syn)
        syn_labels = torch.arange(num_classes, num_classes + len(pairs))
        all_proxies = torch.cat([proxies, p_syn])
        if self._centers_per_class() == 1:
            all_proxies = all_proxies.squeeze(1)
        return Synthesis(
            embeddings=torch.cat([x, x_syn]),
            labels=torch.cat([labels, syn_labels.to(labels)]),
            proxies=all_proxies,
            lam=lam,
            pairs=pairs,
        )

    def _bare_loss(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The inner loss as is, on a view of its proxies (moved to the embeddings'
        device differentiably): what PML's ``cast_types`` (and P2SGradLoss's
        renormalisation) write to ``.data`` then changes the view, not the Parameter.
        Autograd casts the gradient back to the Parameter's dtype."""
        param = getattr(self.loss, self.spec.param)
        view = c_f.to_device(param, embeddings).view_as(param)
        with _for_the_call(self.loss, [(self.loss, self.spec.param, view)]):
            return self.loss(embeddings, labels)

    def _renormalize_proxies(self) -> None:
        """Rescales each proxy of the Parameter to unit norm in place, as the inner loss
        does on every call (``ProxySpec.renormalizes_in_place``). Through ``.data``, as
        the loss does: an in-place write to the Parameter itself would bump its version
        and break the backward of a graph built before this call."""
        data = getattr(self.loss, self.spec.param).data
        data.copy_(F.normalize(data, dim=1 if self.spec.classes_on_rows else 0))

    def _centers_per_class(self) -> int:
        return (
            int(getattr(self.loss, self.spec.centers_attr))
            if self.spec.centers_attr
            else 1
        )

    def _class_proxies(self, like: torch.Tensor) -> torch.Tensor:
        """The inner proxies as [C, k, D] on ``like``'s device, differentiably; in its
        dtype unless autocast is on (as PML's own ``cast_types``)."""
        param = getattr(self.loss, self.spec.param).to(like.device)
        param = c_f.to_dtype(param, dtype=like.dtype)
        rows = param if self.spec.classes_on_rows else param.t()
        k = self._centers_per_class()
        return rows.reshape(rows.shape[0] // k, k, rows.shape[1])

    def _num_classes(self) -> int:
        """C, from the proxy Parameter; a ValueError if the inner loss's class-count
        attributes (or its centres per class) disagree with it, e.g. changed after
        construction: its own call would then index past its proxies."""
        param = getattr(self.loss, self.spec.param)
        num_proxies = param.shape[0] if self.spec.classes_on_rows else param.shape[1]
        k = self._centers_per_class()
        name = type(self.loss).__name__
        if num_proxies % k:
            raise ValueError(
                f"{name} has {num_proxies} proxies, not a multiple of its "
                f"{self.spec.centers_attr} ({k})"
            )
        num_classes = num_proxies // k
        for attr in self.spec.class_count_attrs:
            value = getattr(self.loss, attr)
            count = len(value) if torch.is_tensor(value) else value
            if count != num_classes:
                raise ValueError(
                    f"{name}.{attr} is for {count} classes, but its {num_proxies} "
                    f"proxies ({self.spec.param}) are for {num_classes}"
                )
        return num_classes

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        c_f.check_shapes(embeddings, labels)
        param = getattr(self.loss, self.spec.param)
        dim = param.shape[1] if self.spec.classes_on_rows else param.shape[0]
        if embeddings.ndim != 2 or embeddings.shape[1] != dim:
            raise ValueError(
                f"embeddings must have shape [B, {dim}] to match the proxies of "
                f"{type(self.loss).__name__}, got {list(embeddings.shape)}"
            )
        if not embeddings.dtype.is_floating_point:
            raise ValueError(
                f"embeddings must be floating point, got dtype {embeddings.dtype}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        num_classes = self._num_classes()
        if len(labels):
            # as int64: aminmax has no kernel for uint16/32/64 (uint64 above the int64
            # range wraps to negative, and is reported as out of range)
            low, high = (int(v) for v in torch.aminmax(labels.long()))
            if low < 0 or high >= num_classes:
                raise ValueError(
                    f"labels must lie in [0, {num_classes}) for a loss with "
                    f"{num_classes} classes, got labels from {low} to {high}"
                )
        # the sum is one cheap pass; only if it is not finite (which may also be an
        # overflow of finite values) does the exact element-wise check decide
        if not torch.isfinite(embeddings.detach().sum()) and not (
            torch.isfinite(embeddings).all()
        ):
            raise ValueError("embeddings contain NaN or inf")

    def _shared_generator(self, like: torch.Tensor) -> Optional[torch.Generator]:
        """Under torch.distributed with several ranks and mu > 0: a generator on
        ``like``'s device seeded by rank 0's draw, the same on every rank (a collective);
        otherwise None."""
        if self.mu == 0 or _world_size() == 1:
            return None
        seed = torch.randint(
            2**62,
            (1,),
            generator=self.generator,
            device=self.generator.device if self.generator is not None else like.device,
        ).to(like.device)
        torch.distributed.broadcast(seed, src=0)
        return torch.Generator(device=like.device).manual_seed(seed.item())

    def _draw_pairs_and_lam(
        self,
        labels: torch.Tensor,
        num_pairs: int,
        like: torch.Tensor,
        shared: Optional[torch.Generator],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``num_pairs`` pairs and their lam; with a ``shared`` generator, drawn on the
        rows put in rank order and mapped back, so that all ranks pick the same rows of
        a gathered batch."""
        if shared is None:
            pairs = self._draw_pairs(labels, num_pairs)
            return pairs, self._draw_lam(len(pairs), like)
        order = _rank_order(len(labels), labels.device)
        pairs = self._draw_pairs(labels[order], num_pairs, shared)
        return order[pairs], self._draw_lam(len(pairs), like, shared)

    def _draw_pairs(
        self,
        labels: torch.Tensor,
        num_pairs: int,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """[num_pairs, 2] batch indices of different-class pairs, drawn from
        ``generator`` (default: ``self.generator``)."""
        generator = self.generator if generator is None else generator
        if num_pairs == 0:
            return torch.empty(0, 2, dtype=torch.long, device=labels.device)
        batch_size = len(labels)
        rounds = math.ceil(num_pairs / batch_size)
        if self.pairing == "roll":
            if rounds >= batch_size:  # shift B would pair each row with itself
                raise ValueError(
                    f"mu={self.mu} is too large for pairing='roll' with batch size "
                    f"{batch_size}: it pairs each row with its {batch_size - 1} "
                    f"predecessors at most, {batch_size * (batch_size - 1)} synthetic "
                    f"classes (mu <= {batch_size - 1}), not {num_pairs}; use a smaller "
                    "mu, a larger batch or pairing='random'"
                )
            index = torch.arange(batch_size, device=labels.device)
            first = index.repeat(rounds)
            shift = torch.arange(1, rounds + 1, device=labels.device).repeat_interleave(
                batch_size
            )
            pairs = torch.stack([first, (first - shift) % batch_size], dim=1)[
                :num_pairs
            ]
            same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
            if same.any():
                i, j = pairs[same.nonzero()[0, 0]].tolist()
                raise ValueError(
                    f"pairing='roll' pairs rows {i} and {j}, which share class "
                    f"{labels[i].item()}; reorder the batch so that these rows differ, or "
                    "use pairing='random'"
                )
            return pairs
        device = generator.device if generator is not None else labels.device
        on_device = labels.to(device)
        first = torch.cat(
            [
                torch.randperm(batch_size, generator=generator, device=device)
                for _ in range(rounds)
            ]
        )[:num_pairs]
        # a partner uniform over the other classes' rows: the best of random scores
        # (masked_fill_, not boolean-index assignment, which first finds the True entries).
        # One round (mu <= 1) keeps its own draw of scores, one row per pair: the
        # branch below draws one row per batch row, a different random stream, and
        # would change every committed mu <= 1 result made with this one.
        if rounds == 1:
            scores = torch.rand(
                num_pairs, batch_size, generator=generator, device=device
            )
            scores.masked_fill_(
                on_device[first].unsqueeze(1) == on_device.unsqueeze(0), -1
            )
            partner = scores.argmax(dim=1)
        else:
            # a row's partners in its rounds are distinct (a repeated pair would make
            # two synthetic classes with one row and proxy under two labels) while it
            # has enough other-class rows, and cycle through them after that
            scores = torch.rand(
                batch_size, batch_size, generator=generator, device=device
            )
            other = on_device.unsqueeze(1) != on_device.unsqueeze(0)
            scores.masked_fill_(~other, -1)
            ranked = scores.topk(min(rounds, batch_size), dim=1).indices
            num_other = other.sum(dim=1)[first]
            round_of_pair = torch.arange(num_pairs, device=device) // batch_size
            partner = ranked[first, round_of_pair % num_other]
            if self.lam_per == "batch" and bool((round_of_pair >= num_other).any()):
                warnings.warn(
                    f"ProxySynthesisLoss: {num_pairs} synthetic classes (mu={self.mu}, "
                    f"batch size {batch_size}) pair some rows with more partners than "
                    "they have rows of other classes, so some pairs repeat; with one "
                    "lam per batch each repeat is a duplicate synthetic class (the same "
                    "row and proxy under two labels). Use a smaller mu, larger or more "
                    "class-balanced batches, or lam_per='pair'.",
                    stacklevel=2,
                )
        return torch.stack([first, partner], dim=1).to(labels.device)

    def _draw_lam(
        self,
        num_pairs: int,
        like: torch.Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        shape = (num_pairs,) if self.lam_per == "pair" else ()
        alpha = torch.tensor(self.alpha, dtype=torch.float64)
        # alpha > 0 is checked in __init__; the distribution's own checks cost ~0.1 ms
        beta = torch.distributions.Beta(alpha, alpha, validate_args=False)
        with _rng_from(self.generator if generator is None else generator):
            lam = beta.sample(shape)
        return lam.to(device=like.device, dtype=like.dtype)

    @contextlib.contextmanager
    def _patched(
        self, synthesis: Synthesis, embeddings: torch.Tensor, proxies: torch.Tensor
    ) -> Iterator[None]:
        """Changes the inner loss for the duration of one call: its proxies parameter
        to ``proxies`` (the enlarged set's, in the parameter's layout); its class-count
        attributes for the enlarged set's classes; its regularizers onto the real
        proxies and ``embeddings``; its distance's L2 normalisation off (the set is
        normalised already); for positive_divisor other than "all", its reducer; for
        exclude_parents, its distance. Restored afterwards, also on error."""
        num_classes = synthesis.proxies.shape[0]
        num_real_classes = num_classes - len(synthesis.pairs)
        patches = [(self.loss, self.spec.param, proxies)] + [
            (self.loss, name, value_for(num_classes))
            for name, value_for in self.spec.class_count_attrs.items()
        ]
        weight_regularizer = getattr(self.loss, "weight_regularizer", None)
        if weight_regularizer is not None:  # gets the proxies as rows, [C*k, D]
            real = self._class_proxies(embeddings).flatten(0, 1)
            fixed = _OnFixedInput(weight_regularizer, real)
            patches.append((self.loss, "weight_regularizer", fixed))
        if self.loss.embedding_regularizer is not None:
            fixed = _OnFixedInput(self.loss.embedding_regularizer, embeddings)
            patches.append((self.loss, "embedding_regularizer", fixed))
        distance = getattr(self.loss, "distance", None)
        if (
            isinstance(distance, BaseDistance)
            and distance.normalize_embeddings
            and distance.p == 2  # one that normalises with another p-norm stays on
        ):
            patches.append((distance, "normalize_embeddings", False))
        if self.positive_divisor != "all":
            reducer = _RealPositiveDivisor(
                self.loss.reducer,
                self.spec.positive_term,
                num_real_classes,
                keep_synthetic=self.positive_divisor == "real",
            )
            patches.append((self.loss, "reducer", reducer))
        if self.exclude_parents:
            excluded = _parent_pairs(
                synthesis.labels, synthesis.pairs, num_real_classes
            )
            patches.append((self.loss, "distance", _WithoutPairs(distance, excluded)))
        with _for_the_call(self.loss, patches):
            yield

    def _record(self, synthesis: Optional[Synthesis]) -> None:
        if not self.collect_stats:
            return
        if synthesis is None:
            self.num_synthetic_classes, self.lam = 0, 0
        else:
            self.num_synthetic_classes = len(synthesis.pairs)
            self.lam = synthesis.lam.float().mean().item()


def _set_as_stored(module: torch.nn.Module, name: str, value: object) -> None:
    """Sets ``module.name`` where its current value is stored: a parameter, buffer or
    child-module slot, or the instance dict. ``setattr`` would move a module stored in
    the instance dict (a plain-callable regularizer replaced by ``_OnFixedInput``) into
    the child modules, and then refuse to put the callable back there."""
    for slots in (module._parameters, module._buffers, module._modules):
        if name in slots:
            slots[name] = value
            return
    vars(module)[name] = value


@contextlib.contextmanager
def _for_the_call(
    loss: torch.nn.Module, patches: Iterable[Tuple[torch.nn.Module, str, object]]
) -> Iterator[None]:
    """Sets each ``(module, name, value)`` of ``patches`` where ``module.name`` is
    stored; afterwards, also on error, puts back those and the plain tensor attributes
    of ``loss`` and its submodules. For the proxies this is what
    ``torch.func.functional_call`` does, at a fraction of its fixed cost per call
    (measurable at small B and C)."""
    # an ExitStack runs every restore, also after one that raised
    with contextlib.ExitStack() as restore:
        _restore_tensor_attributes(loss, restore)
        for module, name, value in patches:
            restore.callback(_set_as_stored, module, name, getattr(module, name))
            _set_as_stored(module, name, value)
        yield


def _restore_tensor_attributes(
    module: torch.nn.Module, restore: contextlib.ExitStack
) -> None:
    """Puts back, when ``restore`` closes, the plain tensor attributes (neither
    parameters nor buffers) of ``module`` and its submodules: PML's
    LargeMarginSoftmaxLoss and SphereFaceLoss cast their multiple-angle constants to
    the embeddings' dtype and move them to their device on every call (in float16,
    binom(margin, 2n) rounds for margin >= 14 and is inf for margin >= 19; cast under
    torch.inference_mode, they are inference tensors, which break later backwards)."""
    for sub in module.modules():
        for name, value in list(vars(sub).items()):
            if torch.is_tensor(value):
                restore.callback(_set_as_stored, sub, name, value)


def _term_reducer(
    reducer: torch.nn.Module, term: Optional[str]
) -> Optional[torch.nn.Module]:
    """The reducer that reduces loss-dict ``term`` (unwrapping ``MultipleReducers``)."""
    if term is None:
        return None
    if isinstance(reducer, MultipleReducers):
        subs = reducer.reducers
        return subs[term] if term in subs else reducer.default_reducer
    return reducer


class _RealPositiveDivisor(torch.nn.Module):
    """Wraps a loss's reducer so that the real proxies' share of the positive term is
    divided by the number of real classes in the batch, as without synthesis; the
    synthetic proxies' share keeps the official divisor (all proxies with a positive),
    or with ``keep_synthetic=False`` is dropped.

    The term's per-proxy losses (indexed by proxy; real proxies are those below
    ``num_real_classes``) are rescaled by divisor / real classes before the reduction.
    """

    def __init__(
        self,
        reducer: torch.nn.Module,
        term: str,
        num_real_classes: int,
        keep_synthetic: bool,
    ):
        super().__init__()
        self.reducer, self.term, self.num_real_classes = reducer, term, num_real_classes
        self.keep_synthetic = keep_synthetic

    def forward(self, loss_dict, embeddings, labels):
        term = loss_dict[self.term]
        num_real = int((torch.unique(labels) < self.num_real_classes).sum())
        real_proxy = term["indices"] < self.num_real_classes
        scale = term["divisor"] / max(num_real, 1)
        synthetic = term["losses"] if self.keep_synthetic else 0.0
        term["losses"] = torch.where(real_proxy, term["losses"] * scale, synthetic)
        return self.reducer(loss_dict, embeddings, labels)


class _OnFixedInput(torch.nn.Module):
    """``regularizer`` applied to ``x`` whatever it is called on: stands in for an
    inner loss's regularizer during a synthesis call, so that it regularises the real
    proxies or embeddings the bare loss would pass it (``x``)."""

    def __init__(self, regularizer: torch.nn.Module, x: torch.Tensor):
        super().__init__()
        self.regularizer, self.x = regularizer, x

    def forward(self, _enlarged_set: torch.Tensor) -> torch.Tensor:
        return self.regularizer(self.x)


class _WithoutPairs(BaseDistance):
    """``distance`` with the ``excluded`` [query, reference] entries set to the least
    similar value (-inf similarity, +inf distance): an absent pair for the losses marked
    ``excludable_pairs``."""

    def __init__(self, distance: BaseDistance, excluded: torch.Tensor):
        super().__init__(
            normalize_embeddings=distance.normalize_embeddings,
            p=distance.p,
            power=distance.power,
            is_inverted=distance.is_inverted,
        )
        self.distance, self.excluded = distance, excluded

    def forward(self, query_emb, ref_emb=None):
        mat = self.distance(query_emb, ref_emb)
        return mat.masked_fill(
            self.excluded, -math.inf if self.is_inverted else math.inf
        )


def _parent_pairs(
    labels: torch.Tensor, pairs: torch.Tensor, num_real_classes: int
) -> torch.Tensor:
    """[B+M, C+M] bool for an enlarged set (B real rows, then M synthetic rows of labels
    C, ..., C+M-1): True for synthetic row m and its two parent classes, and for each
    real row and the synthetic classes that have its class as a parent."""
    num_syn = len(pairs)
    num_real_rows = len(labels) - num_syn
    is_parent = torch.zeros(
        num_real_classes, num_syn, dtype=torch.bool, device=labels.device
    )
    syn = torch.arange(num_syn, device=labels.device)
    is_parent[labels[pairs[:, 0]], syn] = True
    is_parent[labels[pairs[:, 1]], syn] = True
    excluded = torch.zeros(
        len(labels), num_real_classes + num_syn, dtype=torch.bool, device=labels.device
    )
    excluded[:num_real_rows, num_real_classes:] = is_parent[labels[:num_real_rows]]
    excluded[num_real_rows:, :num_real_classes] = is_parent.t()
    return excluded


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1)`` as x * (1 / max(||x||, 1e-12)): the same values up to
    rounding, and about 2x faster forward + backward on CPU, since autograd then scales by a [..., 1]
    factor instead of differentiating a division by an expanded denominator.

    float16 rows are divided by their norm computed in float32: in float16, 1 / ||x||
    overflows for a norm below about 1.5e-5, ||x|| itself above 65504, and the floor
    1e-12 rounds to 0, each of which would turn finite rows into NaN or zeros."""
    if x.dtype == torch.float16:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        return (x / norm.clamp_min(1e-12)).to(x.dtype)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * norm.clamp_min(1e-12).reciprocal()


def _rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` (rows of ``table`` along dim 0) through ``F.embedding``, whose
    backward accumulates the gradient much faster on CPU than advanced indexing's
    (``index_put_`` with accumulate): 2-3x for the pairs' gathers with 2 threads."""
    flat = F.embedding(index, table.flatten(1))  # also for a table of 0 rows
    return flat.reshape(index.shape + table.shape[1:])


def _mix(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lam * a + (1 - lam) * b; lam is a scalar or one per row. lam is cast to the
    operands' dtype: under CUDA autocast the proxies stay float32 while lam comes in
    the embeddings' float16, and ``torch.lerp`` takes no mixed dtypes."""
    lam = lam.to(a.dtype)
    lam = lam.reshape((-1,) + (1,) * (a.ndim - 1)) if lam.ndim else lam
    return torch.lerp(b, a, lam)


@contextlib.contextmanager
def _rng_from(generator: Optional[torch.Generator]) -> Iterator[None]:
    """Seeds a forked CPU default generator from ``generator`` (Beta sampling takes no
    generator, and on CPU tensors uses only that one); with None, torch's global RNG is
    used as is. Only the CPU generator is seeded: ``torch.manual_seed`` would also
    re-seed the CUDA ones, which the fork does not restore."""
    if generator is None:
        yield
        return
    seed = torch.randint(2**62, (), generator=generator, device=generator.device).item()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _world_size() -> int:
    """Ranks in the default process group (1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _rank_order(num_rows: int, device: torch.device) -> torch.Tensor:
    """order[k]: this rank's row of the k-th row of a gathered batch in rank order.

    PML's ``all_gather`` puts this rank's block first, then the other ranks' blocks in
    rank order (equal blocks). Rows that do not split into equal blocks keep their order.
    """
    world_size, rank = _world_size(), torch.distributed.get_rank()
    if num_rows % world_size:
        return torch.arange(num_rows, device=device)
    block = torch.arange(world_size, device=device)
    position = torch.where(block < rank, block + 1, block)
    position[rank] = 0
    rows = torch.arange(num_rows // world_size, device=device)
    return (position.unsqueeze(1) * len(rows) + rows).reshape(-1)
