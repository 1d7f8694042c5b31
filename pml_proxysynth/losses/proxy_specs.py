"""Where each supported PML loss keeps its class proxies: the one table the wrapper reads.

Supporting a new proxy loss is one entry in ``PROXY_SPECS``. Subclasses of a listed loss are
supported through the entry of their nearest listed ancestor.
"""

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Optional, Tuple, Type

import torch
from pytorch_metric_learning import losses

# An attribute that hard-codes the class count, and how to compute its value for n classes.
ClassCountPatch = Callable[[int], object]


def _count(n: int) -> int:
    return n


def _arange(n: int) -> torch.Tensor:
    return torch.arange(n)


@dataclass(frozen=True)
class ProxySpec:
    """How one loss class stores its proxies.

    param: name of the proxy ``nn.Parameter``.
    classes_on_rows: True for a [C*k, D] parameter, False for [D, C*k]. Multi-centre
        losses are class-major: rows (or columns) c*k ... c*k+k-1 belong to class c.
    centers_attr: attribute holding k, the number of centres per class (None: k = 1).
    class_count_attrs: attributes that hard-code the class count; the wrapper sets them
        for C + M classes for the duration of one call.
    positive_term: key of the loss-dict term that is averaged over the proxies with a
        positive in the batch (its ``divisor``), for ``positive_divisor="real"``.
    excludable_pairs: True if the loss reads its logits from one distance matrix between
        the embeddings and the proxies and takes a least-similar entry (-inf similarity,
        +inf distance) as an absent pair, with finite gradients; needed for
        ``exclude_parents`` (checked by hand for the losses marked).
    normalizes_own_proxies: True if the loss L2-normalises its proxies itself on every
        call, whatever its distance's settings; the wrapper then passes the real proxies
        as they are and the synthetic ones unnormalised, and normalises only the 2M
        parents' proxies when there are fewer than C (the loss normalises all C + M
        again in any case).
    renormalizes_in_place: True if the loss rescales its proxy Parameter to unit norm in
        place on every call (P2SGradLoss; its gradient then takes the normalisation as
        the identity). The wrapper does the same to the Parameter at the start of each
        ``forward``: it runs the loss on a copy, and without this the Parameter's norms
        would drift in training, so training would no longer follow the bare loss's.
    """

    param: str
    classes_on_rows: bool
    centers_attr: Optional[str] = None
    class_count_attrs: Dict[str, ClassCountPatch] = field(default_factory=dict)
    positive_term: Optional[str] = None
    excludable_pairs: bool = False
    normalizes_own_proxies: bool = False
    renormalizes_in_place: bool = False


_NUM_CLASSES = {"num_classes": _count}
_LARGE_MARGIN = ProxySpec("W", classes_on_rows=False, class_count_attrs=_NUM_CLASSES)

PROXY_SPECS: Dict[Type[torch.nn.Module], ProxySpec] = {
    losses.ProxyAnchorLoss: ProxySpec(
        "proxies",
        classes_on_rows=True,
        class_count_attrs=_NUM_CLASSES,
        positive_term="pos_loss",
        excludable_pairs=True,
    ),
    losses.ProxyNCALoss: ProxySpec(
        "proxies",
        classes_on_rows=True,
        class_count_attrs={"proxy_labels": _arange},
        excludable_pairs=True,
    ),
    # get_logits normalises W with distance.normalize, which ignores normalize_embeddings
    losses.NormalizedSoftmaxLoss: ProxySpec(
        "W", classes_on_rows=False, excludable_pairs=True, normalizes_own_proxies=True
    ),
    losses.SoftTripleLoss: ProxySpec(
        "fc",
        classes_on_rows=False,
        centers_attr="centers_per_class",
        class_count_attrs=_NUM_CLASSES,
    ),
    losses.LargeMarginSoftmaxLoss: _LARGE_MARGIN,
    losses.ArcFaceLoss: replace(_LARGE_MARGIN, excludable_pairs=True),
    losses.CosFaceLoss: replace(_LARGE_MARGIN, excludable_pairs=True),
    losses.SphereFaceLoss: _LARGE_MARGIN,
    losses.SubCenterArcFaceLoss: ProxySpec(
        "W",
        classes_on_rows=False,
        centers_attr="sub_centers",
        class_count_attrs=_NUM_CLASSES,
    ),
    losses.P2SGradLoss: ProxySpec(
        "weight",
        classes_on_rows=False,
        class_count_attrs=_NUM_CLASSES,
        renormalizes_in_place=True,
    ),
}


def supported_loss_names() -> Tuple[str, ...]:
    return tuple(cls.__name__ for cls in PROXY_SPECS)


def find_proxy_spec(loss: torch.nn.Module) -> ProxySpec:
    """The spec of the most specific listed class in ``type(loss)``'s MRO."""
    for cls in type(loss).__mro__:
        if cls in PROXY_SPECS:
            return PROXY_SPECS[cls]
    raise TypeError(
        f"ProxySynthesisLoss cannot wrap {type(loss).__name__}: it supports "
        f"{', '.join(supported_loss_names())} and their subclasses."
    )
