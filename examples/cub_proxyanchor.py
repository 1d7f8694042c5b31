"""Proxy Synthesis + Proxy-Anchor on CUB-200-2011 (or offline glyphs) with PML's parts.

    python examples/cub_proxyanchor.py --dataset glyphs      # offline, CPU, a few minutes
    python examples/cub_proxyanchor.py                       # CUB-200-2011, ResNet-50

The training loop is PML's: a ``MetricLossOnly`` (or, with ``--shared-head``, a
``CascadedEmbeddings``) trainer, a ``GlobalEmbeddingSpaceTester`` run by a
``HookContainer`` after every ``--test-interval`` epochs, which records metrics (CSV,
SQLite, tensorboard) and keeps the latest and the best checkpoint. Everything a run writes
goes to ``--output-dir``. The building blocks (``build_datasets``, ``build_model``,
``build_loss``, ``build_optimizers``, ``build_trainer``, ``build_tester``, ``evaluate``)
take the parsed arguments, so other scripts can reuse them::

    args = parse_args(["--dataset", "glyphs", "--loss", "normalized_softmax"])

Model selection follows the papers' protocol: the best checkpoint is chosen on the test
classes (there is no separate validation split).
"""

import argparse
import copy
import gc
import inspect
import itertools
import json
import logging
import math
import os
import random
import shutil
import sys
import tarfile
import time
import urllib.error
import warnings
import zipfile
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

# Idle OpenMP threads sleep instead of spinning: on a busy CPU, spinning threads make
# multi-threaded training up to 10x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from PIL import Image
from pytorch_metric_learning import (
    datasets,
    losses,
    miners,
    samplers,
    testers,
    trainers,
)
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import distributed as pml_distributed
from pytorch_metric_learning.utils import logging_presets
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pml_proxysynth.datasets.glyphs import Glyphs
from pml_proxysynth.losses import ProxySynthesisLoss
from pml_proxysynth.losses.proxy_specs import PROXY_SPECS
from pml_proxysynth.losses.proxy_synthesis_loss import POSITIVE_DIVISORS
from pml_proxysynth.miners import SharedCharacteristicsMiner
from pml_proxysynth.samplers import DistributedMPerClassSampler
from pml_proxysynth.utils import (
    DecorrelatedCascadedEmbeddings,
    HeadDecorrelationLoss,
    TwoHeadEmbedder,
    evaluate_heads,
    with_autocast,
)
from pml_proxysynth.utils.accuracy_calculator import (
    RecallAtKAccuracyCalculator,
    recall_metric_name,
)
from pml_proxysynth.utils.figures import (
    metric_label,
    plot_embeddings,
    plot_learning_curves,
    plot_synthesis,
)
from pml_proxysynth.utils.record_keeping import build_hooks

logger = logging.getLogger("cub_proxyanchor")

CUB_DIR = "CUB_200_2011"
CUB_URL = datasets.CUB.DOWNLOAD_URL
# the files PML's datasets.CUB reads in CUB_200_2011/ (besides the images)
CUB_FILES = ("images.txt", "image_class_labels.txt")
TEST_SPLIT = "test"
# With --shared-head, weightings (class, shared) of the two heads scored besides the
# tester's plain concatenation: the class head alone, and DiVA's other two weightings
HEAD_WEIGHTINGS = {
    "class": (1.0, 0.0),
    "class_1_shared_0.5": (1.0, 0.5),
    "class_0.5_shared_1": (0.5, 1.0),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

PROXY_LOSSES = {
    "proxy_anchor": losses.ProxyAnchorLoss,
    "proxy_nca": losses.ProxyNCALoss,
    "normalized_softmax": losses.NormalizedSoftmaxLoss,
    "soft_triple": losses.SoftTripleLoss,
    "arcface": losses.ArcFaceLoss,
    "cosface": losses.CosFaceLoss,
    "sphereface": losses.SphereFaceLoss,
    "large_margin_softmax": losses.LargeMarginSoftmaxLoss,
    "subcenter_arcface": losses.SubCenterArcFaceLoss,
}
# the losses that can leave a synthetic class out of its parents' negatives
EXCLUDABLE_LOSSES = tuple(
    name for name, cls in PROXY_LOSSES.items() if PROXY_SPECS[cls].excludable_pairs
)
# Tuple losses: PML's MarginLoss with its distance-weighted miner (Wu et al. 2017), the
# Sharing Matters baseline. Proxy Synthesis does not apply to them.
TUPLE_LOSSES = ("margin",)
TRUNKS = ("resnet50", "resnet18", "small_conv")
# Options that fix the shapes of saved models: --resume refuses to change them.
STRUCTURAL_OPTIONS = (
    "dataset",
    "trunk",
    "pooling",
    "embedding_size",
    "loss",
    "loss_kwargs",
    "shared_head",
    "shared_size",
    "decorrelation_rho",
    "max_train_images",
    "seed",  # picks the --max-train-images subset, hence its classes (and proxies)
    "glyphs_option",
    "world_size",  # a torchrun run's loss checkpoint is DistributedLossWrapper's
    "ps",  # ProxySynthesisLoss saves its inner loss's proxies as loss.proxies
)
# Options that the checkpoint's optimizers and schedulers restore (PML's load_state_dict
# puts back their lr, weight decay, step size and gamma): --resume refuses to change
# them rather than say they changed and train with the saved ones.
RESTORED_OPTIONS = (
    "lr",
    "proxy_lr_mult",
    "weight_decay",
    "lr_decay_step",
    "lr_decay_gamma",
    "beta_lr",
    "decorrelation_lr",
)


class SetupError(Exception):
    """A problem the user can fix (missing data or weights, a used output folder)."""


class ImageLoadError(RuntimeError):
    """An image file is missing or cannot be decoded; the message names the file."""


# ----------------------------------------------------------------------------- CLI


class _PerChoice:
    """A default that depends on another option; ``--help`` shows e.g. "224 (cub), 32
    (glyphs)"."""

    def __init__(self, **values: Any):
        self.values = values

    def __str__(self) -> str:
        def show(v):
            if isinstance(v, bool):
                return "on" if v else "off"
            return f"{v:.4g}" if isinstance(v, float) else str(v)

        return ", ".join(f"{show(v)} ({k})" for k, v in self.values.items())

    __repr__ = __str__


class PerDataset(_PerChoice):
    """A default that depends on ``--dataset``; "cub" also stands for cars196 and sop."""


class PerLoss(_PerChoice):
    """A default that depends on ``--loss``; "others" is every loss not named."""


# Proxy Synthesis defaults that depend on the loss: the paper's algorithm (mu 1, official
# gradients and negatives) for every loss but Proxy-Anchor, which gets the best setting
# of its sweep (benchmarks/results/glyphs-proxy-anchor-sweep-notes.md): mu 0.25, and
# synthetic classes that are not negatives of their parent classes and do not move the
# real proxies.
PS_LOSS_DEFAULTS = {
    "ps_mu": PerLoss(proxy_anchor=0.25, others=1.0),
    "ps_exclude_parents": PerLoss(proxy_anchor=True, others=False),
    "ps_detach_parent_proxies": PerLoss(proxy_anchor=True, others=False),
}


def _finite_json(text: str) -> Any:
    """``json.loads``, refusing NaN and (-)Infinity, which Python's json accepts and
    a loss or dataset would take as a number."""

    def refuse(constant: str):
        raise argparse.ArgumentTypeError(f"{constant} is not a finite number: {text}")

    return json.loads(text, parse_constant=refuse)


def _key_value(text: str) -> Tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, _finite_json(value)
    except json.JSONDecodeError:
        return key, value  # a plain string


def _json_dict(text: str) -> Dict[str, Any]:
    try:
        value = _finite_json(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            "expected a JSON object, e.g. '{\"scale\": 30}'"
        )
    return value


def _number(kind, requirement: str, ok: Callable[[Any], bool]):
    """An argparse type: ``kind(text)``, finite (NaN and inf are refused) and ``ok``."""

    def parse(text: str):
        value = kind(text)
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def positive(kind):
    """An argparse type for a number > 0 (finite, for floats)."""
    return _number(kind, "> 0" if kind is int else "finite and > 0", lambda v: v > 0)


def non_negative(kind):
    """An argparse type for a number >= 0 (finite, for floats)."""
    requirement = ">= 0" if kind is int else "finite and >= 0"
    return _number(kind, requirement, lambda v: v >= 0)


# numpy's global RNG, seeded for PML's samplers, takes 0 to 2**32 - 1 (np.random.seed)
numpy_seed = _number(int, "in [0, 2**32 - 1]", lambda v: 0 <= v < 2**32)
finite_float = _number(float, "finite", lambda v: True)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None: the help says what happens then."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; dataset-dependent defaults are ``PerDataset``."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    pos_int, pos_float = positive(int), positive(float)
    nonneg_int, nonneg_float = non_negative(int), non_negative(float)
    flag = argparse.BooleanOptionalAction
    # fmt: off
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=("cub", "cars196", "sop", "glyphs"), default="cub",
                   help="cub: CUB-200-2011 (classes 1-100 train, 101-200 test); cars196 "
                        "(1-98 / 99-196) and sop (Stanford Online Products, its own "
                        "split), PML's dataset classes, found under --data-root; glyphs: "
                        "characters rendered from matplotlib's fonts (offline). Defaults "
                        "marked (cub) apply to cars196 and sop too")
    g.add_argument("--data-root", default="data",
                   help="folder that holds CUB_200_2011/ (downloaded there when it is "
                        "missing), Cars196/, Stanford_Online_Products/ or the glyphs "
                        "cache")
    g.add_argument("--no-download", action="store_true",
                   help="never download CUB or render glyphs; fail if they are missing")
    g.add_argument("--glyphs-option", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="keyword argument of pml_proxysynth.datasets.Glyphs, value in "
                        "JSON (e.g. max_classes=100); repeatable")
    g.add_argument("--image-size", type=pos_int, default=PerDataset(cub=224, glyphs=32),
                   help="side of the training crop and of the test centre crop")
    g.add_argument("--crop-scale", type=pos_float, default=PerDataset(cub=0.08, glyphs=0.85),
                   help="smallest area fraction kept by RandomResizedCrop")
    g.add_argument("--hflip", action=flag, default=PerDataset(cub=True, glyphs=False),
                   help="random horizontal flips in training (glyphs are not mirror-"
                        "symmetric)")
    g.add_argument("--test-resize-ratio", type=pos_float,
                   default=PerDataset(cub=256 / 224, glyphs=1.0),
                   help="test images are resized to image-size x this (at least 1), "
                        "then centre-cropped")
    g.add_argument("--max-train-images", type=pos_int,
                   help="train on a random subset of this many images (quick runs; "
                        "default: all)")
    g.add_argument("--max-test-images", type=pos_int,
                   help="evaluate on a random subset of this many images (quick runs; "
                        "default: all)")

    g = p.add_argument_group("model")
    g.add_argument("--trunk", choices=TRUNKS,
                   default=PerDataset(cub="resnet50", glyphs="small_conv"),
                   help="torchvision ResNet, or a 4-block conv net (16-32-64-128)")
    g.add_argument("--pretrained", action=flag, default=PerDataset(cub=True, glyphs=False),
                   help="start the ResNet from ImageNet weights (cached in torch hub's "
                        "folder, or downloaded); --no-pretrained trains from scratch")
    g.add_argument("--pooling", choices=("avg", "max", "avg+max"),
                   default=PerDataset(cub="avg+max", glyphs="avg"),
                   help="global pooling of the trunk's feature map (avg+max: their "
                        "sum, as in Proxy-Anchor)")
    g.add_argument("--embedding-size", type=pos_int,
                   default=PerDataset(cub=512, glyphs=128),
                   help="width of the linear embedding layer (the class head)")
    g.add_argument("--freeze-bn", action=flag, default=PerDataset(cub=True, glyphs=False),
                   help="keep the trunk's BatchNorm statistics fixed during training")

    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=tuple(PROXY_LOSSES) + TUPLE_LOSSES,
                   default="proxy_anchor",
                   help="PML proxy loss, or margin: PML's MarginLoss (learned beta) with "
                        "its DistanceWeightedMiner (needs --no-ps)")
    g.add_argument("--proxy-anchor-margin", type=finite_float, default=0.1,
                   help="ProxyAnchorLoss margin")
    g.add_argument("--proxy-anchor-alpha", type=pos_float, default=32.0,
                   help="ProxyAnchorLoss alpha (scale)")
    g.add_argument("--loss-kwargs", type=_json_dict, default={},
                   help="more keyword arguments of the loss, as JSON, e.g. "
                        "'{\"temperature\": 0.05}' for normalized_softmax")
    g.add_argument("--ps", action=flag, default=True,
                   help="wrap the proxy loss in Proxy Synthesis; --no-ps: the baseline, "
                        "the proxy loss alone")
    g.add_argument("--ps-alpha", type=pos_float, default=0.4,
                   help="Proxy Synthesis: lambda ~ Beta(alpha, alpha)")
    g.add_argument("--ps-mu", type=nonneg_float, default=PS_LOSS_DEFAULTS["ps_mu"],
                   help="Proxy Synthesis: synthetic classes per real sample (the "
                        "paper's 1.0 hurt proxy_anchor most in our sweep, see README)")
    g.add_argument("--ps-pairing", choices=("random",), default="random",
                   help="Proxy Synthesis: pair rows of different classes at random (the "
                        "official pairing of row i with row i-1, ProxySynthesisLoss("
                        "pairing='roll'), needs batches whose neighbouring rows differ "
                        "in class, which neither --sampler gives)")
    g.add_argument("--ps-lam-per", choices=("batch", "pair"), default="batch",
                   help="Proxy Synthesis: one lambda per batch (paper) or per pair")
    g.add_argument("--ps-positive-divisor", choices=POSITIVE_DIVISORS, default="all",
                   help="Proxy Synthesis over proxy_anchor: divide the real proxies' "
                        "positive term by all proxies with a positive (official) or by "
                        "the real ones only; real_only also drops the synthetic "
                        "proxies' positive term")
    g.add_argument("--ps-exclude-parents", action=flag,
                   default=PS_LOSS_DEFAULTS["ps_exclude_parents"],
                   help="Proxy Synthesis over " + ", ".join(EXCLUDABLE_LOSSES)
                        + ": a synthetic class is not a negative of its two parent "
                        "classes")
    g.add_argument("--ps-detach-parent-proxies", action=flag,
                   default=PS_LOSS_DEFAULTS["ps_detach_parent_proxies"],
                   help="Proxy Synthesis: the synthetic proxies are mixed from detached "
                        "parent proxies, so the synthetic classes train the embeddings "
                        "but do not move the real proxies")
    g.add_argument("--shared-head", action="store_true",
                   help="add the Sharing Matters shared head, trained by a margin loss on "
                        "inter-class triplets (PML's CascadedEmbeddings trainer)")
    g.add_argument("--shared-size", type=pos_int, default=128,
                   help="width of the shared head")
    g.add_argument("--shared-weight", type=nonneg_float, default=0.3,
                   help="weight of the shared head's loss")
    g.add_argument("--shared-strategy", choices=("standard", "full", "random"),
                   default="standard", help="SharedCharacteristicsMiner strategy")
    g.add_argument("--shared-cutoff", type=nonneg_float, default=0.5,
                   help="SharedCharacteristicsMiner lower distance cutoff")
    g.add_argument("--beta-lr", type=pos_float, default=5e-4,
                   help="learning rate of the margin losses' class-wise beta")
    g.add_argument("--decorrelation-rho", type=nonneg_float, default=0.0,
                   help="with --shared-head: weight of the adversarial decorrelation of "
                        "the two heads (0: off)")
    g.add_argument("--decorrelation-lr", type=pos_float, default=1e-5,
                   help="learning rate of the decorrelation's regressor")

    g = p.add_argument_group("optimisation (the Proxy-Anchor recipe)")
    g.add_argument("--epochs", type=pos_int, default=PerDataset(cub=60, glyphs=6),
                   help="training epochs")
    g.add_argument("--batch-size", type=pos_int, default=PerDataset(cub=180, glyphs=128),
                   help="training batch size")
    g.add_argument("--lr", type=pos_float, default=PerDataset(cub=1e-4, glyphs=1e-3),
                   help="AdamW learning rate of the trunk and the embedding layer")
    g.add_argument("--proxy-lr-mult", type=pos_float, default=100.0,
                   help="the proxies learn at lr x this")
    g.add_argument("--weight-decay", type=nonneg_float, default=1e-4,
                   help="AdamW weight decay (network and proxies)")
    g.add_argument("--lr-decay-step", type=nonneg_int,
                   default=PerDataset(cub=10, glyphs=0),
                   help="multiply the learning rates by --lr-decay-gamma every this many "
                        "epochs (0: constant)")
    g.add_argument("--lr-decay-gamma", type=pos_float, default=0.5,
                   help="learning-rate factor of each step decay")
    g.add_argument("--warmup-epochs", type=nonneg_int, default=PerDataset(cub=1, glyphs=0),
                   help="first epochs train only the embedding layer and the proxies "
                        "(trunk frozen)")
    g.add_argument("--sampler", choices=("random", "m_per_class"), default="random",
                   help="plain shuffling, or PML's MPerClassSampler")
    g.add_argument("--m-per-class", type=pos_int, default=4,
                   help="images per class in a batch, with --sampler m_per_class")
    g.add_argument("--iterations-per-epoch", type=pos_int,
                   help="iterations per epoch (default: one pass over the training set)")
    g.add_argument("--seed", type=numpy_seed, default=0,
                   help="seed of torch, numpy and random")

    g = p.add_argument_group("evaluation and output")
    g.add_argument("--test-interval", type=pos_int, default=1,
                   help="evaluate (and save checkpoints) every this many epochs; "
                        "--epochs must be a multiple of it")
    g.add_argument("--patience", type=nonneg_int,
                   help="stop when the primary metric has not improved for this many "
                        "epochs (default: never)")
    g.add_argument("--primary-metric", default="recall_at_1",
                   choices=("recall_at_1", "mean_average_precision_at_r", "r_precision"),
                   help="metric that picks the best checkpoint")
    g.add_argument("--recall-ks", type=pos_int, nargs="+", default=[1, 2, 4, 8],
                   help="Ks of Recall@K")
    g.add_argument("--eval-batch-size", type=pos_int, default=256,
                   help="batch size when computing test embeddings")
    g.add_argument("--output-dir",
                   help="everything a run writes: models/, records/, tensorboard/, "
                        "config.json, results.json, *.png (default: runs/<dataset>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its latest checkpoint "
                        "(weights, optimizers, schedulers and random number generators)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --output-dir that holds a run (deletes it)")
    g.add_argument("--log-freq", type=pos_int, default=10,
                   help="record the losses every this many iterations")
    g.add_argument("--plots", action=flag, default=True,
                   help="draw the learning-curve and embedding figures")
    g.add_argument("--plot-classes", type=pos_int, default=10,
                   help="test classes shown in the 2-D map of test embeddings")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device: cuda when available, else cpu")
    g.add_argument("--num-workers", type=nonneg_int, default=PerDataset(cub=4, glyphs=0),
                   help="DataLoader worker processes (0: load in the main process)")
    g.add_argument("--num-threads", type=nonneg_int, default=0,
                   help="torch CPU threads (0: torch's default)")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: autocast to bfloat16 on CPU, float16 with a "
                        "GradScaler on CUDA")
    # fmt: on
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses ``argv``, fills in the dataset-dependent defaults and checks combinations."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # the options on the command line (at their default values too): one that only
    # matters with another option is refused without it, not ignored
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(probe.parse_args(argv)))
    pretrained_by_default = isinstance(args.pretrained, PerDataset)
    for name, value in vars(args).items():
        if isinstance(value, PerDataset):
            setattr(args, name, value.values.get(args.dataset, value.values["cub"]))
        elif isinstance(value, PerLoss):
            value = value.values.get(args.loss, value.values["others"])
            if isinstance(value, bool) and not args.ps:
                value = False  # PS's switches stay off without PS (explicit: an error)
            setattr(args, name, value)
    args.glyphs_option = dict(args.glyphs_option)
    args.output_dir = args.output_dir or os.path.join("runs", args.dataset)
    args.world_size = world_size_from_env()
    args.recall_ks = sorted(set(args.recall_ks))

    known_glyphs_options = set(inspect.signature(Glyphs).parameters) - {
        "root", "split", "transform", "target_transform", "download", "image_size"
    }  # fmt: skip
    unknown = sorted(set(args.glyphs_option) - known_glyphs_options)
    recall_k = args.primary_metric.rsplit("_", 1)[1]

    def needs(options: Sequence[str], condition: bool, requirement: str):
        flags = ["--" + k.replace("_", "-") for k in options if k in given]
        verb = "needs" if len(flags) == 1 else "need"
        return bool(flags) and not condition, f"{', '.join(flags)} {verb} {requirement}"

    # fmt: off
    checks = [
        # (the PS switches are refused below only when on: asked off, they are off)
        needs(("ps_alpha", "ps_mu", "ps_pairing", "ps_lam_per", "ps_positive_divisor"),
              args.ps, "Proxy Synthesis (not --no-ps)"),
        needs(("proxy_lr_mult",), args.loss not in TUPLE_LOSSES, "a proxy loss"),
        needs(("lr_decay_gamma",), args.lr_decay_step > 0, "--lr-decay-step > 0"),
        needs(("m_per_class",), args.sampler == "m_per_class", "--sampler m_per_class"),
        needs(("shared_size", "shared_weight", "shared_strategy", "shared_cutoff"),
              args.shared_head, "--shared-head"),
        needs(("proxy_anchor_margin", "proxy_anchor_alpha"),
              args.loss == "proxy_anchor", "--loss proxy_anchor"),
        needs(("beta_lr",), args.loss in TUPLE_LOSSES or args.shared_head,
              "a margin loss (--loss margin or --shared-head)"),
        needs(("decorrelation_lr",), args.decorrelation_rho > 0,
              "--decorrelation-rho > 0"),
        needs(("plot_classes",), args.plots, "figures (not --no-plots)"),
        (args.dataset != "glyphs" and bool(args.glyphs_option),
         "--glyphs-option needs --dataset glyphs"),
        (bool(unknown), f"--glyphs-option: unknown key(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(known_glyphs_options))} (and --image-size)"),
        (args.pretrained and args.trunk == "small_conv",
         f"--trunk small_conv has no pretrained weights, and --dataset {args.dataset} "
         "starts from pretrained ones by default: add --no-pretrained"
         if pretrained_by_default
         else "--pretrained: there are no pretrained weights for --trunk small_conv"),
        (args.crop_scale > 1, "--crop-scale must be in (0, 1]"),
        (args.test_resize_ratio < 1,
         f"--test-resize-ratio must be at least 1, got {args.test_resize_ratio:g} (the "
         "test images are resized to --image-size x this, then centre-cropped)"),
        (args.image_size < 16, "--image-size must be at least 16"),
        (args.batch_size < 2, "--batch-size must be at least 2"),
        (args.sampler == "m_per_class" and args.batch_size % args.m_per_class != 0,
         f"--batch-size ({args.batch_size}) must be a multiple of --m-per-class "
         f"({args.m_per_class}) with --sampler m_per_class"),
        (args.warmup_epochs >= args.epochs,
         f"--warmup-epochs ({args.warmup_epochs}) must be smaller than --epochs "
         f"({args.epochs}): the trunk would never train"),
        # PML's hook evaluates and saves only when epoch % test_interval == 0: later
        # epochs would be trained and thrown away
        (args.epochs % args.test_interval != 0,
         f"--epochs ({args.epochs}) must be a multiple of --test-interval "
         f"({args.test_interval}): the last epochs would be neither evaluated nor saved"),
        (args.resume and args.overwrite, "--resume and --overwrite exclude each other"),
        (args.decorrelation_rho > 0 and not args.shared_head,
         "--decorrelation-rho needs --shared-head"),
        (args.ps and args.ps_mu == 0, "--ps-mu 0 turns Proxy Synthesis off: use --no-ps"),
        (args.ps_positive_divisor != "all" and args.loss != "proxy_anchor",
         "--ps-positive-divisor needs --loss proxy_anchor"),
        (args.ps_exclude_parents and not (args.ps and args.loss in EXCLUDABLE_LOSSES),
         "--ps-exclude-parents needs Proxy Synthesis over --loss "
         + ", ".join(EXCLUDABLE_LOSSES)),
        (args.ps_detach_parent_proxies and not args.ps,
         "--ps-detach-parent-proxies needs Proxy Synthesis (not --no-ps)"),
        (args.ps and args.loss in TUPLE_LOSSES,
         f"--loss {args.loss} is not a proxy loss: Proxy Synthesis needs --no-ps"),
        (bool({"num_classes", "embedding_size"} & set(args.loss_kwargs)),
         "--loss-kwargs: num_classes and embedding_size are set by the example (the "
         "number of training classes, --embedding-size)"),
        (recall_k.isdigit() and int(recall_k) not in args.recall_ks,
         f"--primary-metric {args.primary_metric} needs its K in --recall-ks"),
    ]
    # fmt: on
    for failed, message in checks:
        if failed:
            parser.error(message)
    try:
        args.device = str(torch.device(args.device))
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if torch.device(args.device).type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: the example runs on cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (use --device cpu)")
    return args


# ---------------------------------------------------------------------------- data


class ConvertMode:
    """Transform: converts a PIL image to ``mode`` ("RGB" or "L")."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


def image_mode(args: argparse.Namespace) -> str:
    """The PIL mode of the inputs: "L" for the small conv net on glyphs, else "RGB"."""
    return "L" if args.dataset == "glyphs" and args.trunk == "small_conv" else "RGB"


def build_transforms(args: argparse.Namespace) -> Tuple[Any, Any]:
    """(train, test) transforms: RandomResizedCrop + flip / Resize + CenterCrop."""
    from torchvision import transforms as T

    mode = image_mode(args)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if mode == "RGB" else ((0.5,), (0.5,))
    size = args.image_size
    train = [ConvertMode(mode), T.RandomResizedCrop(size, scale=(args.crop_scale, 1.0))]
    if args.hflip:
        train.append(T.RandomHorizontalFlip())
    train += [T.ToTensor(), T.Normalize(mean, std)]
    test = [
        ConvertMode(mode),
        T.Resize(round(size * args.test_resize_ratio)),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ]
    return T.Compose(train), T.Compose(test)


class CheckedImagesMixin:
    """For PML's image datasets: labels 0..K-1 per split, and errors that name the
    image file (a missing split, missing files, an unreadable image)."""

    def generate_split(self):
        super().generate_split()
        name = type(self).__name__
        if not self.labels:
            raise SetupError(
                f"{name} in {self.root} lists no images of the {self.split} classes"
            )
        classes = sorted(set(self.labels))
        index = {c: i for i, c in enumerate(classes)}
        self.class_ids = classes  # the original class ids, e.g. 101..200 for CUB
        self.labels = [index[c] for c in self.labels]
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise ImageLoadError(
                f"{len(missing)} image file(s) of the {name} {self.split} split are "
                f"missing, e.g. {missing[0]} (re-extract the archive into {self.root})"
            )

    def __getitem__(self, idx):
        path = self.paths[idx]
        try:
            with Image.open(path) as f:
                f.load()
                img = f.copy()
        except OSError as e:  # includes missing files and undecodable images
            raise ImageLoadError(f"cannot read image file {path}: {e}") from e
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[idx]


class CUB(CheckedImagesMixin, datasets.CUB):
    """PML's CUB-200-2011 (classes 1-100 train, 101-200 test), checked."""


class Cars196(CheckedImagesMixin, datasets.Cars196):
    """PML's Cars196 (classes 1-98 train, 99-196 test), checked."""


class StanfordOnlineProducts(CheckedImagesMixin, datasets.StanfordOnlineProducts):
    """PML's Stanford Online Products (Ebay_train.txt / Ebay_test.txt), checked."""


# --dataset -> (class, its root under --data-root, the files the class reads there,
# the first one marking the dataset's presence)
PHOTO_DATASETS = {
    "cars196": (Cars196, "Cars196", ("names.csv", "anno_train.csv", "anno_test.csv")),
    "sop": (
        StanfordOnlineProducts,
        "",
        (
            "Stanford_Online_Products/Ebay_train.txt",
            "Stanford_Online_Products/Ebay_test.txt",
        ),
    ),
}


def _cub_missing_message(root: str, reason: str = "") -> str:
    where = os.path.join(root, CUB_DIR, "images.txt")
    return (
        f"CUB-200-2011 not found: {where} does not exist{reason}.\n"
        "Ways out:\n"
        f"  - download {CUB_URL} (1.1 GB) and unpack it into {root}:\n"
        f"      mkdir -p {root} && tar -xzf CUB_200_2011.tgz -C {root}\n"
        "  - or run where the network is reachable, without --no-download: the archive is "
        f"downloaded and unpacked into --data-root when {CUB_DIR}/ is missing there\n"
        "  - or point --data-root at the folder that holds CUB_200_2011/\n"
        "  - or try the example offline on rendered glyphs: --dataset glyphs"
    )


def ensure_cub(root: str, download: bool = True) -> None:
    """Makes sure ``root/CUB_200_2011`` holds the files PML's CUB reads, downloading the
    archive when that folder is missing (and allowed); else SetupError."""
    folder = os.path.join(root, CUB_DIR)
    if not os.path.isdir(folder):
        if not download:
            raise SetupError(_cub_missing_message(root, " (and --no-download is set)"))
        download_cub(root)
    missing = [f for f in CUB_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise SetupError(
            f"CUB-200-2011 in {folder} is incomplete: "
            f"{', '.join(os.path.join(folder, f) for f in missing)} missing. "
            f"Re-extract CUB_200_2011.tgz into {root} (or delete {folder} to have it "
            "downloaded again)."
        )
    check_cub_lines_match(folder)


def check_cub_lines_match(folder: str) -> None:
    """PML's CUB pairs images.txt and image_class_labels.txt line by line and silently
    skips lines whose image ids differ: SetupError naming the first such line instead
    (the official archive lists the same ids in the same order)."""
    paths = [os.path.join(folder, f) for f in CUB_FILES]
    with open(paths[0]) as images, open(paths[1]) as labels:
        for number, (image, label) in enumerate(
            itertools.zip_longest(images, labels, fillvalue=""), 1
        ):
            if image.split()[:1] != label.split()[:1]:
                raise SetupError(
                    f"CUB-200-2011 in {folder}: line {number} of {CUB_FILES[0]} "
                    f"({image.strip()!r}) and of {CUB_FILES[1]} ({label.strip()!r}) "
                    "name different images; PML's reader would drop such images "
                    "silently. Re-extract CUB_200_2011.tgz into "
                    f"{os.path.dirname(folder)}."
                )


def download_cub(root: str) -> None:
    """Downloads and unpacks CUB-200-2011 into ``root`` with PML's ``datasets.CUB``,
    which downloads only into a missing or empty folder: so into a fresh folder in
    ``root``, from where ``CUB_200_2011/`` is moved into ``root`` (other entries of
    ``root``, e.g. the glyphs cache, are left alone)."""
    logger.info("Downloading CUB-200-2011 into %s", root)
    staging = os.path.join(root, f".{CUB_DIR}.download")
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted download
    os.makedirs(root, exist_ok=True)
    try:
        datasets.CUB(staging, split="train", download=True)
        os.replace(os.path.join(staging, CUB_DIR), os.path.join(root, CUB_DIR))
    except (OSError, tarfile.TarError, ValueError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise SetupError(
            _cub_missing_message(root, f"; downloading failed ({reason})")
        ) from e
    finally:  # the archive of a failed download, the archive's other files
        shutil.rmtree(staging, ignore_errors=True)


class LabelledSubset(torch.utils.data.Subset):
    """``Subset`` that keeps a ``labels`` array (for samplers and plots)."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, list(indices))
        self.labels = np.asarray(dataset.labels)[self.indices]


def subsample(dataset, max_images: Optional[int], seed: int):
    """A random subset of at most ``max_images`` images (the dataset itself if smaller)."""
    if max_images is None or max_images >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    return LabelledSubset(
        dataset, np.sort(rng.choice(len(dataset), max_images, replace=False))
    )


def build_dataset(args: argparse.Namespace, split: str, transform=None):
    """One split ("train" or "test") of ``args.dataset``; labels 0..K-1 in ``.labels``."""
    if args.dataset == "cub":
        ensure_cub(args.data_root, download=not args.no_download)
        return CUB(args.data_root, split=split, transform=transform, download=False)
    if args.dataset in PHOTO_DATASETS:
        dataset_class, folder, files = PHOTO_DATASETS[args.dataset]
        root = os.path.join(args.data_root, folder)
        marker = files[0]
        if not os.path.isfile(os.path.join(root, marker)):
            raise SetupError(
                f"{dataset_class.__name__} not found: {os.path.join(root, marker)} does "
                f"not exist. Download it ({dataset_class.DOWNLOAD_URL}) and unpack it "
                f"so that this file exists, or point --data-root at the folder that "
                f"holds {os.path.join(folder, marker)}."
            )
        missing = [os.path.join(root, f) for f in files[1:]]
        missing = [path for path in missing if not os.path.isfile(path)]
        if missing:
            raise SetupError(
                f"{dataset_class.__name__} in {root} is incomplete: "
                f"{', '.join(missing)} missing. Unpack its archive there again."
            )
        return dataset_class(root, split=split, transform=transform, download=False)
    try:
        return Glyphs(
            args.data_root,
            split=split,
            transform=transform,
            download=not args.no_download,
            image_size=args.image_size,
            **args.glyphs_option,
        )
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        hint = ""
        if args.no_download and isinstance(e, FileNotFoundError):
            hint = " (here: run the example without --no-download)"
        raise SetupError(f"glyphs dataset: {e}{hint}") from e


def build_datasets(args: argparse.Namespace) -> Tuple[Any, Any]:
    """(train, test) datasets with their transforms, subsampled as the flags ask."""
    check_folder(args.data_root, "--data-root")
    train_tf, test_tf = build_transforms(args)
    train = subsample(
        build_dataset(args, "train", train_tf), args.max_train_images, args.seed
    )
    test = subsample(
        build_dataset(args, "test", test_tf), args.max_test_images, args.seed + 1
    )
    num_classes = len(np.unique(np.asarray(train.labels)))
    global_batch = args.batch_size * args.world_size
    if args.sampler == "m_per_class" and args.m_per_class * num_classes < global_batch:
        per_process = f" x {args.world_size} processes" if args.world_size > 1 else ""
        raise SetupError(
            f"--sampler m_per_class: {num_classes} training classes x --m-per-class "
            f"{args.m_per_class} < --batch-size {args.batch_size}{per_process}"
        )
    if len(train) < args.batch_size:
        raise SetupError(
            f"the training set has {len(train)} images, fewer than --batch-size "
            f"{args.batch_size}"
        )
    return train, test


def count_classes(dataset) -> int:
    """Number of proxies needed for ``dataset``: its largest label + 1."""
    return int(np.max(np.asarray(dataset.labels))) + 1


def build_sampler(
    args: argparse.Namespace, labels
) -> Optional[torch.utils.data.Sampler]:
    """PML's MPerClassSampler for ``--sampler m_per_class``; else None (shuffling), or
    under torchrun a DistributedSampler (each rank its share; ``set_epoch`` reshuffles)."""
    if args.sampler != "m_per_class":
        if args.world_size == 1:
            return None
        return torch.utils.data.DistributedSampler(
            range(len(labels)), shuffle=True, seed=args.seed, drop_last=True
        )
    if args.world_size > 1:  # each rank its block of one class-balanced global batch
        return DistributedMPerClassSampler(
            labels,
            m=args.m_per_class,
            batch_size=args.batch_size,
            length_before_new_iter=max(len(labels) // args.world_size, args.batch_size),
            seed=args.seed,
        )
    return samplers.MPerClassSampler(
        np.asarray(labels),
        m=args.m_per_class,
        batch_size=args.batch_size,
        length_before_new_iter=max(len(labels), args.batch_size),
    )


# --------------------------------------------------------------------------- model


class GlobalPool(nn.Module):
    """Global average, max, or their sum ("avg+max") pooling to [B, C]."""

    def __init__(self, mode: str = "avg"):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        if "avg" in self.mode:
            out = out + x.mean(dim=(2, 3))
        if "max" in self.mode:
            out = out + x.amax(dim=(2, 3))
        return out

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class SmallConvNet(nn.Module):
    """4 conv-BN-ReLU blocks (16-32-64-128 channels, 2x2 max-pooling between), pooling."""

    def __init__(self, in_channels: int = 1, widths=(16, 32, 64, 128), pooling="avg"):
        super().__init__()
        layers: List[nn.Module] = []
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.pool = GlobalPool(pooling)
        self.out_features = widths[-1]
        self.to(memory_format=torch.channels_last)  # 1.4-1.6x faster on CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.pool(self.features(x))


def _imagenet_state_dict(arch: str, weights) -> Dict[str, torch.Tensor]:
    cached = os.path.join(
        torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url)
    )
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=True, check_hash=True
        )
    except Exception as e:  # noqa: BLE001 - any download/IO failure ends the same way
        raise SetupError(
            f"ImageNet weights for {arch} are not available: not cached at {cached}, and "
            f"downloading them failed ({getattr(e, 'reason', e)}).\nWays out:\n"
            f"  - put the file there: download {weights.url} where the network is "
            f"reachable and copy it to {cached} (or set TORCH_HOME)\n"
            "  - or train from scratch with --no-pretrained"
        ) from e


def build_trunk(args: argparse.Namespace) -> Tuple[nn.Module, int]:
    """The trunk and the width of its pooled output."""
    if args.trunk == "small_conv":
        net = SmallConvNet(
            in_channels=1 if image_mode(args) == "L" else 3, pooling=args.pooling
        )
        return net, net.out_features
    import torchvision

    builder = getattr(torchvision.models, args.trunk)
    net = builder(weights=None)
    if args.pretrained:
        weights = torchvision.models.get_model_weights(args.trunk).IMAGENET1K_V1
        net.load_state_dict(_imagenet_state_dict(args.trunk, weights))
    width = net.fc.in_features
    net.avgpool = GlobalPool(args.pooling)  # ResNet.forward then flattens [B, C] as is
    net.fc = nn.Identity()
    return net, width


def build_model(args: argparse.Namespace) -> Dict[str, nn.Module]:
    """{"trunk", "embedder"} on ``args.device``: trunk + pooling, then a linear embedding."""
    trunk, width = build_trunk(args)
    if args.shared_head:
        embedder: nn.Module = TwoHeadEmbedder(
            width, args.embedding_size, args.shared_size
        )
    else:
        embedder = nn.Linear(width, args.embedding_size)
        nn.init.kaiming_normal_(embedder.weight, mode="fan_out")
        nn.init.zeros_(embedder.bias)
    device = torch.device(args.device)
    return {"trunk": trunk.to(device), "embedder": embedder.to(device)}


# ---------------------------------------------------------------------------- loss


class LossSetup(NamedTuple):
    """Trainer inputs for the loss: ``loss_funcs``, ``mining_funcs``, ``loss_weights``."""

    loss_funcs: Dict[str, nn.Module]
    mining_funcs: Dict[str, nn.Module]
    loss_weights: Dict[str, float]


def build_class_loss(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The class loss over ``num_classes`` classes: a proxy loss, wrapped in Proxy
    Synthesis unless --no-ps, or (--loss margin) PML's MarginLoss with a learned beta."""
    kwargs: Dict[str, Any] = {"num_classes": num_classes}
    if args.loss != "margin":
        kwargs["embedding_size"] = args.embedding_size
    if args.loss == "proxy_anchor":
        kwargs.update(margin=args.proxy_anchor_margin, alpha=args.proxy_anchor_alpha)
    kwargs.update(args.loss_kwargs)
    loss_class = losses.MarginLoss if args.loss == "margin" else PROXY_LOSSES[args.loss]
    if args.loss == "margin":
        kwargs.setdefault("learn_beta", True)
    try:
        loss = loss_class(**kwargs)
    except TypeError as e:
        raise SetupError(
            f"--loss {args.loss} with --loss-kwargs {args.loss_kwargs}: {e}"
        ) from e
    if args.ps:
        loss = ProxySynthesisLoss(
            loss,
            alpha=args.ps_alpha,
            mu=args.ps_mu,
            pairing=args.ps_pairing,
            lam_per=args.ps_lam_per,
            positive_divisor=args.ps_positive_divisor,
            exclude_parents=args.ps_exclude_parents,
            detach_parent_proxies=args.ps_detach_parent_proxies,
        )
    return loss


def build_loss(args: argparse.Namespace, num_classes: int) -> LossSetup:
    """Losses (and miner) on ``args.device``: one key for MetricLossOnly, or
    ``metric_loss_0/1`` (+ ``tuple_miner_1``) for the shared head's CascadedEmbeddings."""
    device = torch.device(args.device)
    class_loss = build_class_loss(args, num_classes).to(device)
    # MarginLoss learns from the tuples of PML's distance-weighted miner (Wu et al.)
    class_miner = (
        miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
        if args.loss in TUPLE_LOSSES
        else None
    )
    if not args.shared_head:
        mining = {"tuple_miner": class_miner} if class_miner else {}
        return LossSetup({"metric_loss": class_loss}, mining, {"metric_loss": 1.0})
    loss_funcs = {
        "metric_loss_0": class_loss,
        "metric_loss_1": losses.MarginLoss(learn_beta=True, num_classes=num_classes).to(
            device
        ),
    }
    weights = {"metric_loss_0": 1.0, "metric_loss_1": args.shared_weight}
    if args.decorrelation_rho > 0:
        loss_funcs["decorrelation_loss"] = HeadDecorrelationLoss(
            [args.embedding_size, args.shared_size], rho=args.decorrelation_rho
        ).to(device)
        weights["decorrelation_loss"] = 1.0
    miner = SharedCharacteristicsMiner(
        strategy=args.shared_strategy, cutoff=args.shared_cutoff
    )
    mining = {"tuple_miner_1": miner}
    if class_miner:
        mining["tuple_miner_0"] = class_miner
    return LossSetup(loss_funcs, mining, weights)


def distributed(setup: LossSetup) -> LossSetup:
    """The losses and miners for torchrun. Every PML loss and miner works on the
    gathered batch (PML's distributed wrappers); each rank draws its own tuples there, and
    only its own rows carry gradients. Losses with trainable parameters (proxies, margin
    betas, the decorrelation regressor) are also wrapped in DistributedDataParallel, so
    that their gradients are averaged and the parameters stay identical on every rank
    (tuple draws, and the order in which ranks sum their rows, differ)."""

    def wrap_loss(loss: nn.Module) -> nn.Module:
        if isinstance(loss, losses.BaseMetricLossFunction):
            loss = pml_distributed.DistributedLossWrapper(loss)
        if any(p.requires_grad for p in loss.parameters()):
            # unused: e.g. a margin loss's beta when a batch yields no tuple
            loss = DistributedDataParallel(loss, find_unused_parameters=True)
        return loss

    return LossSetup(
        {k: wrap_loss(v) for k, v in setup.loss_funcs.items()},
        {
            k: pml_distributed.DistributedMinerWrapper(v)
            for k, v in setup.mining_funcs.items()
        },
        setup.loss_weights,
    )


def unwrap(module: nn.Module) -> nn.Module:
    """``module`` without its DistributedDataParallel and PML distributed wrappers."""
    while True:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        elif isinstance(module, pml_distributed.DistributedLossWrapper):
            module = module.loss
        elif isinstance(module, pml_distributed.DistributedMinerWrapper):
            module = module.miner
        else:
            return module


def synthesis_loss(loss_funcs: Dict[str, nn.Module]) -> Optional[ProxySynthesisLoss]:
    """The ProxySynthesisLoss among ``loss_funcs`` (also inside distributed wrappers),
    if any."""
    for key in ("metric_loss", "metric_loss_0"):
        loss = unwrap(loss_funcs.get(key, nn.Identity()))
        if isinstance(loss, ProxySynthesisLoss):
            return loss
    return None


# ------------------------------------------------------------------- optimisation


def build_optimizers(
    args: argparse.Namespace,
    models: Dict[str, nn.Module],
    loss_funcs: Dict[str, nn.Module],
) -> Tuple[Dict[str, torch.optim.Optimizer], Dict[str, Any]]:
    """AdamW per model and per loss with parameters (proxies at lr x --proxy-lr-mult),
    and StepLR schedulers (``<key>_scheduler_by_epoch``) when --lr-decay-step > 0."""

    def adamw(params, lr, weight_decay=args.weight_decay):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    optimizers = {
        f"{k}_optimizer": adamw(m.parameters(), args.lr) for k, m in models.items()
    }
    for key, loss in loss_funcs.items():
        params = list(loss.parameters())
        if not params:
            continue
        if isinstance(loss, losses.MarginLoss):  # a margin loss's class-wise beta
            optimizers[f"{key}_optimizer"] = adamw(
                params, args.beta_lr, weight_decay=0.0
            )
        elif key == "decorrelation_loss":
            optimizers[f"{key}_optimizer"] = adamw(params, args.decorrelation_lr)
        else:
            optimizers[f"{key}_optimizer"] = adamw(params, args.lr * args.proxy_lr_mult)
    schedulers = {}
    if args.lr_decay_step > 0:
        for key, opt in optimizers.items():
            name = key.replace("_optimizer", "_scheduler_by_epoch")
            schedulers[name] = torch.optim.lr_scheduler.StepLR(
                opt, step_size=args.lr_decay_step, gamma=args.lr_decay_gamma
            )
    return optimizers, schedulers


def end_warmup(trainer) -> None:
    """Unfreezes the trunk after the warm-up epochs."""
    trainer.freeze_these = tuple(k for k in trainer.freeze_these if k != "trunk")
    c_f.set_requires_grad(trainer.models["trunk"], requires_grad=True)


def build_trainer(
    args: argparse.Namespace,
    models: Dict[str, nn.Module],
    optimizers: Dict[str, torch.optim.Optimizer],
    loss_setup: LossSetup,
    train_dataset,
    lr_schedulers: Optional[Dict[str, Any]] = None,
    end_of_iteration_hook=None,
    end_of_epoch_hook=None,
):
    """PML's MetricLossOnly, or (--shared-head) CascadedEmbeddings; with --warmup-epochs
    the trunk starts frozen (``end_warmup`` unfreezes it)."""
    common = dict(
        models=models,
        optimizers=optimizers,
        batch_size=args.batch_size,
        loss_funcs=loss_setup.loss_funcs,
        mining_funcs=loss_setup.mining_funcs,
        loss_weights=loss_setup.loss_weights,
        dataset=train_dataset,
        sampler=build_sampler(args, train_dataset.labels),
        iterations_per_epoch=args.iterations_per_epoch,
        data_device=torch.device(args.device),
        lr_schedulers=lr_schedulers,
        freeze_these=("trunk",) if args.warmup_epochs > 0 else (),
        freeze_trunk_batchnorm=args.freeze_bn,
        dataloader_num_workers=args.num_workers,
        end_of_iteration_hook=end_of_iteration_hook,
        end_of_epoch_hook=end_of_epoch_hook,
    )
    if not args.shared_head:
        trainer_class, sizes = trainers.MetricLossOnly, ()
    else:
        trainer_class = (
            DecorrelatedCascadedEmbeddings
            if args.decorrelation_rho > 0
            else trainers.CascadedEmbeddings
        )
        sizes = (unwrap(models["embedder"]).embedding_sizes,)
    if args.amp:
        trainer_class = with_autocast(trainer_class)
        on_cuda = torch.device(args.device).type == "cuda"
        common["amp_dtype"] = torch.float16 if on_cuda else torch.bfloat16
        common["grad_scaler"] = torch.amp.GradScaler("cuda") if on_cuda else None
    with _quiet_pml():
        return trainer_class(*sizes, **common)


# ----------------------------------------------------------------------- evaluation


def accuracy_device(args: argparse.Namespace) -> torch.device:
    """Where the AccuracyCalculator works: CUDA only when faiss can use the GPU too."""
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return (
        torch.device(args.device)
        if args.device.startswith("cuda") and gpus
        else torch.device("cpu")
    )


def build_accuracy_calculator(args: argparse.Namespace) -> RecallAtKAccuracyCalculator:
    """Recall@K (--recall-ks), MAP@R, R-precision and NMI."""
    metrics = [recall_metric_name(k) for k in args.recall_ks]
    metrics += ["mean_average_precision_at_r", "r_precision", "NMI"]
    return RecallAtKAccuracyCalculator(
        recall_ks=args.recall_ks,
        include=tuple(metrics),
        k="max_bin_count",
        device=accuracy_device(args),
    )


def build_tester(args: argparse.Namespace, end_of_testing_hook=None):
    """PML's GlobalEmbeddingSpaceTester with the Recall@K calculator."""
    return testers.GlobalEmbeddingSpaceTester(
        batch_size=args.eval_batch_size,
        dataloader_num_workers=args.num_workers,
        data_device=torch.device(args.device),
        accuracy_calculator=build_accuracy_calculator(args),
        end_of_testing_hook=end_of_testing_hook,
    )


def evaluate(
    tester, models: Dict[str, nn.Module], test_dataset, epoch: int = 0
) -> Dict[str, float]:
    """Runs the tester on ``test_dataset``; returns {metric: value} without level suffix."""
    with _quiet_pml():
        accuracies = tester.test(
            {TEST_SPLIT: test_dataset}, epoch, models["trunk"], models["embedder"]
        )
    return _strip_levels(accuracies[TEST_SPLIT])


def _strip_levels(accuracies: Dict[str, Any]) -> Dict[str, float]:
    """``{metric: value}`` from ``{metric_level0: value}``; a NaN that the SQLite records
    return as None (no query had a same-class reference) stays NaN."""
    return {
        k[: -len("_level0")]: math.nan if v is None else float(v)
        for k, v in accuracies.items()
        if k.endswith("_level0")
    }


def format_metrics(metrics: Dict[str, float]) -> str:
    """Metrics in percent, recall first: "R@1 81.20, ..., MAP@R 40.10, ..."."""
    order = sorted(metrics, key=lambda m: (not m.startswith("recall_at_"), m))
    return ", ".join(f"{metric_label(m)} {100 * metrics[m]:.2f}" for m in order)


# -------------------------------------------------------------------------- figures


def plot_test_embeddings(
    tester, models, test_dataset, args, path: str, epoch: int
) -> None:
    """2-D map of the test embeddings of ``--plot-classes`` random test classes."""
    labels = np.asarray(test_dataset.labels)
    rng = np.random.default_rng(args.seed)
    classes = np.unique(labels)
    chosen = rng.choice(
        classes, size=min(args.plot_classes, len(classes)), replace=False
    )
    indices = np.flatnonzero(np.isin(labels, chosen))
    subset = torch.utils.data.Subset(test_dataset, indices)
    with _quiet_pml():
        embeddings, _ = tester.get_all_embeddings(
            subset, models["trunk"], models["embedder"]
        )
    title = f"test embeddings after epoch {epoch}: {len(chosen)} unseen classes"
    plot_embeddings(embeddings, labels[indices], path, title, seed=args.seed)


def plot_synthetic_batch(
    ps_loss: ProxySynthesisLoss,
    models,
    train_dataset,
    args,
    path: str,
    classes: int = 8,
    per_class: int = 8,
) -> None:
    """A training batch (``classes`` x ``per_class`` images) and its synthetic classes."""
    labels = np.asarray(train_dataset.labels)
    rng = np.random.default_rng(args.seed)
    counts = np.bincount(labels)
    candidates = np.flatnonzero(counts >= 2)
    if len(candidates) == 0:  # a pair needs two classes with rows, a class 2 images
        logger.warning("no training class has 2 images: no synthetic-batch figure")
        return
    chosen = rng.choice(candidates, size=min(classes, len(candidates)), replace=False)
    indices = np.concatenate(
        [
            rng.choice(
                np.flatnonzero(labels == c),
                size=min(per_class, counts[c]),
                replace=False,
            )
            for c in chosen
        ]
    )
    images, batch_labels = zip(*(train_dataset[int(i)] for i in indices))
    images = torch.stack(images).to(args.device)
    batch_labels = torch.tensor(batch_labels, device=args.device)
    for model in models.values():
        model.eval()
    with torch.no_grad():
        embeddings = models["embedder"](models["trunk"](images))
        embeddings = embeddings[:, : args.embedding_size]  # the class head
        synthesis = ps_loss.synthesize(embeddings, batch_labels)
    plot_synthesis(synthesis, path, seed=args.seed)


def iterations_per_epoch(trainer) -> int:
    """--iterations-per-epoch, else the length of the trainer's dataloader (PML sets
    ``trainer.iterations_per_epoch`` only in ``train()``, not run by a resumed run that
    has nothing left to train)."""
    if trainer.iterations_per_epoch:
        return trainer.iterations_per_epoch
    loader = c_f.get_train_dataloader(
        trainer.dataset, trainer.batch_size, trainer.sampler, 0, trainer.collate_fn
    )
    return len(loader)


def make_figures(args, hooks, tester, trainer, loss_setup, train_dataset, test_dataset):
    """learning_curves.png, test_embeddings.png and synthetic_batch.png in --output-dir."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning(
            "matplotlib is not installed: no figures (pip install matplotlib)"
        )
        return
    out = args.output_dir
    plot_learning_curves(
        hooks.get_loss_history(),
        hooks.get_accuracy_history(tester, TEST_SPLIT, return_all_metrics=True),
        os.path.join(out, "learning_curves.png"),
        iterations_per_epoch=iterations_per_epoch(trainer),
    )
    plot_test_embeddings(
        tester,
        trainer.models,
        test_dataset,
        args,
        os.path.join(out, "test_embeddings.png"),
        trainer.epoch,
    )
    ps_loss = synthesis_loss(loss_setup.loss_funcs)
    if ps_loss is None:
        logger.info("no Proxy Synthesis (--no-ps): no synthetic-batch figure")
    else:
        plot_synthetic_batch(
            ps_loss,
            trainer.models,
            train_dataset,
            args,
            os.path.join(out, "synthetic_batch.png"),
        )
    logger.info("figures written to %s", out)


# --------------------------------------------------------------------- distributed


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(args: argparse.Namespace) -> int:
    """Under torchrun, joins the process group (gloo on CPU, nccl on CUDA, one GPU per
    process) and returns this process's rank; else returns 0."""
    if args.world_size == 1:
        return 0
    if torch.device(args.device).type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank()


def on_rank_zero_first(args: argparse.Namespace, rank: int, fn, everywhere=True):
    """Runs ``fn`` on rank 0, then (``everywhere``) on the other ranks; a SetupError on
    rank 0 stops every rank with its message."""
    if args.world_size == 1:
        return fn()
    result, message = None, None
    if rank == 0:
        try:
            result = fn()
        except SetupError as e:
            message = str(e)
    box = [message]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise SetupError(box[0])
    if rank != 0 and everywhere:
        result = fn()
    return result


def unwrapped(modules: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
    """The modules without their DistributedDataParallel wrappers (what PML saves)."""
    return {
        k: m.module if isinstance(m, DistributedDataParallel) else m
        for k, m in modules.items()
    }


# ----------------------------------------------------------------------------- run


class _quiet_pml:
    """Silences PML's info logging and its tensor-to-scalar warning in the progress bar."""

    def __enter__(self):
        self.level = c_f.LOGGER.level
        c_f.LOGGER.setLevel(logging.WARNING)
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
        # During warm-up the frozen trunk's optimizer does not step, but its scheduler does.
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*")
        return self

    def __exit__(self, *exc):
        self.warnings.__exit__(*exc)
        c_f.LOGGER.setLevel(self.level)
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # MPerClassSampler draws from numpy's global RNG
    torch.manual_seed(seed)


class RNGState:
    """The random number generators, saved and loaded like a model (``state_dict``):
    torch's (CPU, and the current CUDA device once CUDA is in use), numpy's global one
    (PML's samplers draw from it through ``c_f.NUMPY_RANDOM``) and python's. Restored
    on --resume, they make the resumed epochs draw the batches, augmentations and Proxy
    Synthesis pairs of an uninterrupted run. With ``sampler`` a PML ``MPerClassSampler``,
    also the order of its classes: it shuffles that list in place at every pass, so the
    next pass depends on the order the last one left."""

    def __init__(self, sampler=None):
        self.sampler = (
            sampler if isinstance(sampler, samplers.MPerClassSampler) else None
        )

    def state_dict(self) -> Dict[str, Any]:
        kind, key, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            # numpy's state as a tensor and numbers: torch.load(weights_only=True) reads it
            "numpy": (
                kind,
                torch.from_numpy(key.astype(np.int64)),
                pos,
                has_gauss,
                gauss,
            ),
            "python": random.getstate(),
        }
        if torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        if self.sampler is not None:
            state["sampler_classes"] = torch.tensor(
                [int(c) for c in self.sampler.labels]
            )
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        # PML's loader maps the tensors to the run's device; RNG states live on the CPU
        torch.set_rng_state(state["torch"].cpu())
        kind, key, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state(
            (kind, key.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss)
        )
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"].cpu())
        if self.sampler is not None and "sampler_classes" in state:
            classes = {int(c): c for c in self.sampler.labels}
            self.sampler.labels = [classes[int(c)] for c in state["sampler_classes"]]


def add_run_state(trainer, hooks: logging_presets.HookContainer) -> None:
    """Makes PML's hooks save (with every checkpoint) and load what they do not know of:
    the RNG states (``rng_state_<epoch>.pth``) and, with --amp on CUDA, the GradScaler's
    loss scale (``grad_scaler_<epoch>.pth``)."""
    trainer.run_state = {"rng_state": RNGState(getattr(trainer, "sampler", None))}
    scaler = getattr(trainer, "grad_scaler", None)
    if scaler is not None and scaler.is_enabled():
        trainer.run_state["grad_scaler"] = scaler
    if "run_state" not in hooks.saveable_trainer_objects:
        hooks.saveable_trainer_objects.append("run_state")


def patience_exhausted_at(
    hooks, tester, epoch: int, args: argparse.Namespace
) -> Optional[int]:
    """The best epoch, if a run checkpointed at ``epoch`` had run out of --patience
    (PML's test: more than patience epochs after the best), else None."""
    if epoch % args.test_interval:  # PML tests patience only after an evaluation
        return None
    best_epoch, _ = hooks.get_best_epoch_and_accuracy(tester, TEST_SPLIT)
    if best_epoch is not None and epoch - best_epoch > args.patience:
        return best_epoch
    return None


def check_checkpoint(hooks, trainer, model_folder: str) -> None:
    """SetupError unless the latest checkpoint in ``model_folder`` has a file for every
    object PML's hooks load: their loader only logs a missing file and goes on with the
    freshly initialised object."""
    epoch, suffix = c_f.latest_version(model_folder, "trunk_*.pth")
    if epoch == 0:
        raise SetupError(f"--resume: no trunk_<epoch>.pth in {model_folder}")
    paths = [
        c_f.modelpath_creator(model_folder, key, suffix)
        for name in hooks.saveable_trainer_objects
        for key in getattr(trainer, name, None) or {}
    ]
    missing = [os.path.basename(path) for path in paths if not os.path.isfile(path)]
    if missing:
        raise SetupError(
            f"--resume: the checkpoint of epoch {epoch} in {model_folder} is incomplete: "
            f"{', '.join(missing)} missing. Put the file(s) back, or start over with "
            "--overwrite."
        )
    damaged = [os.path.basename(path) for path in paths if not _intact(path)]
    if damaged:
        raise SetupError(
            f"--resume: the checkpoint of epoch {epoch} in {model_folder} cannot be "
            f"read: {', '.join(damaged)} damaged (cut short by an interrupted save?). "
            "Put back an intact copy, or start over with --overwrite."
        )


def _intact(path: str) -> bool:
    """Whether a ``torch.save`` file (a zip archive) is complete, by its CRCs: cheaper
    than loading it, and a file cut short raises deep inside torch.load."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


def check_folder(path: str, flag: str) -> None:
    """SetupError if the folder ``path`` cannot be made: it, or the nearest of its
    parents that exists, is a file."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SetupError(f"{flag} {path}: {existing} is a file, not a folder")


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuses to mix runs in --output-dir (see --resume / --overwrite), and an
    --output-dir that cannot be made; changes nothing."""
    check_folder(args.output_dir, "--output-dir")
    model_folder = os.path.join(args.output_dir, "models")
    has_run = os.path.isdir(model_folder) and any(
        f.endswith(".pth") for f in os.listdir(model_folder)
    )
    if args.resume:
        if not has_run:
            raise SetupError(f"--resume: no checkpoint in {model_folder}")
        _check_resumable(args)
    elif has_run and not args.overwrite:
        raise SetupError(
            f"{args.output_dir} already holds a run. Continue it with --resume, start "
            "over with --overwrite, or choose another --output-dir."
        )


def prepare_output_dir(args: argparse.Namespace) -> str:
    """Creates --output-dir, after ``check_output_dir``; a fresh start clears an earlier
    run there."""
    out = args.output_dir
    model_folder = os.path.join(out, "models")
    if not args.resume:  # a fresh start: clear what an earlier run left here
        for name in ("models", "records", "tensorboard"):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        for name in (
            "config.json",
            "results.json",
            "learning_curves.png",
            "test_embeddings.png",
            "synthetic_batch.png",
        ):
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    os.makedirs(model_folder, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=1, sort_keys=True)
    return model_folder


def _as_flag(option: str, value: Any) -> str:
    """How the command line said ``option=value``: "--embedding-size 16", "--no-ps"."""
    name = option.replace("_", "-")
    if option == "world_size":  # not an option: how the run was started
        return f"torchrun with {value} processes" if value > 1 else "one process"
    if isinstance(value, bool):
        if value:
            return f"--{name}"
        negatable = any(
            isinstance(action, argparse.BooleanOptionalAction) and action.dest == option
            for action in build_parser()._actions
        )
        return f"--no-{name}" if negatable else f"without --{name}"
    return f"--{name} {value!r}"


def _check_resumable(args: argparse.Namespace) -> None:
    path = os.path.join(args.output_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f)
    current = json.loads(json.dumps(vars(args)))
    structural = (
        STRUCTURAL_OPTIONS
        + (
            # on glyphs the image size decides which characters pass the blank-render and
            # homoglyph filters, hence the classes and their proxies' order
            ("image_size",) if saved.get("dataset") == "glyphs" else ()
        )
        + RESTORED_OPTIONS
    )
    changed = [k for k in structural if k in saved and saved[k] != current.get(k)]
    if changed:
        raise SetupError(
            "--resume: the run in {} was made with other {}: {}".format(
                args.output_dir,
                "options" if len(changed) > 1 else "option",
                ", ".join(_as_flag(k, saved[k]) for k in changed),
            )
        )
    # the others may change (e.g. --epochs to train on), but say so: a default that
    # changed between versions changes the training as silently as a flag would
    other = [
        k
        for k in saved
        if k not in ("resume", "output_dir") and saved[k] != current.get(k, saved[k])
    ]
    if other:
        logger.info(
            "--resume: options that differ from the saved run's, in effect from now "
            "on: %s",
            ", ".join(
                f"{_as_flag(k, current[k])} (saved: {_as_flag(k, saved[k])})"
                for k in other
            ),
        )


def _best_and_last(history: Dict[str, list], primary: str) -> Tuple[Dict, Dict]:
    epochs = history.get("epoch", [])
    if not epochs:
        return {}, {}
    rows = [
        {
            "epoch": e,
            **_strip_levels(
                {k: v[i] for k, v in history.items() if k.endswith("_level0")}
            ),
        }
        for i, e in enumerate(epochs)
    ]

    def score(row: Dict) -> float:  # a NaN score (no evaluable query) ranks last
        value = row.get(primary, -math.inf)
        return -math.inf if math.isnan(value) else value

    best = max(rows, key=lambda r: (score(r), -r["epoch"]))
    return best, rows[-1]


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Trains and evaluates as ``args`` say; returns the results written to results.json
    (under torchrun: rank 0 evaluates and writes; the other ranks return {})."""
    rank = init_distributed(args)
    try:
        return _run(args, rank)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if args.world_size > 1:
            # The trainer's reference cycles keep the losses' DDP wrappers, and through
            # them the gloo process group and its threads, alive past this call. Left to
            # the interpreter's shutdown, destroying them aborted the process now and
            # then ("terminate called without an active exception", exit code -6,
            # after the run had finished); free them while the interpreter is whole.
            gc.collect()


def _run(args: argparse.Namespace, rank: int) -> Dict[str, Any]:
    start_time = time.perf_counter()
    seed_everything(args.seed)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    on_rank_zero_first(args, rank, lambda: check_output_dir(args), everywhere=False)
    # rank 0 renders the glyphs cache (or downloads CUB) before the others read it
    train_dataset, test_dataset = on_rank_zero_first(
        args, rank, lambda: build_datasets(args)
    )
    # only now that the data is there may --overwrite delete the earlier run
    on_rank_zero_first(args, rank, lambda: prepare_output_dir(args), everywhere=False)
    model_folder = os.path.join(args.output_dir, "models")
    num_classes = count_classes(train_dataset)
    train_classes = len(np.unique(np.asarray(train_dataset.labels)))
    logger.info(
        "%s: %d training images of %d classes%s, %d test images of %d classes",
        args.dataset,
        len(train_dataset),
        train_classes,
        # a subsample (--max-train-images) may miss classes, which keep their proxies
        "" if train_classes == num_classes else f" ({num_classes} proxy classes)",
        len(test_dataset),
        len(np.unique(np.asarray(test_dataset.labels))),
    )
    models = build_model(args)
    if args.world_size > 1:
        # Before the trainer freezes anything, so that DDP tracks every parameter.
        # No buffer broadcast: rank 0 evaluates alone, and a broadcast in its forward
        # would wait for the other ranks; each rank keeps its own BatchNorm statistics
        # (rank 0's are evaluated and saved).
        with warnings.catch_warnings():  # newer torch renames broadcast_buffers
            warnings.simplefilter("ignore", FutureWarning)
            models = {
                k: DistributedDataParallel(
                    m,
                    broadcast_buffers=False,
                    find_unused_parameters=args.warmup_epochs > 0,
                )
                for k, m in models.items()
            }
    loss_setup = build_loss(args, num_classes)
    optimizers, schedulers = build_optimizers(args, models, loss_setup.loss_funcs)
    if args.world_size > 1:
        loss_setup = distributed(loss_setup)

    if rank == 0:
        hooks, keeping = build_hooks(
            args.output_dir,
            primary_metric=args.primary_metric,
            validation_split_name=TEST_SPLIT,
            log_freq=args.log_freq,
        )
        tester = build_tester(args, end_of_testing_hook=hooks.end_of_testing_hook)
        # The tester names its record tables after the splits of its last test; a
        # resumed run reads them before (or without) a test in this process.
        tester.reference_split_names[TEST_SPLIT] = [TEST_SPLIT]
        evaluate_and_save = hooks.end_of_epoch_hook(
            tester,
            {TEST_SPLIT: test_dataset},
            model_folder,
            test_interval=args.test_interval,
            patience=args.patience,
        )
    else:  # only rank 0 records, evaluates and saves
        hooks = logging_presets.HookContainer(None)

    def end_of_epoch(trainer) -> bool:
        if trainer.epoch == args.warmup_epochs:
            end_warmup(trainer)
            logger.info("warm-up over: the trunk trains from now on")
        continue_training = True
        if rank == 0:
            continue_training = evaluate_and_save(trainer)
            if trainer.epoch % args.test_interval == 0:
                metrics = _strip_levels(tester.all_accuracies[TEST_SPLIT])
                logger.info(
                    "epoch %d/%d: %s",
                    trainer.epoch,
                    args.epochs,
                    format_metrics(metrics),
                )
        if args.world_size > 1:  # rank 0's early stop stops every rank
            box = [continue_training]
            dist.broadcast_object_list(box, src=0)
            continue_training = box[0]
            trainer.sampler.set_epoch(trainer.epoch)
        return continue_training

    trainer = build_trainer(
        args,
        models,
        optimizers,
        loss_setup,
        train_dataset,
        lr_schedulers=schedulers,
        end_of_iteration_hook=hooks.end_of_iteration_hook if rank == 0 else None,
        end_of_epoch_hook=end_of_epoch,
    )
    add_run_state(trainer, hooks)
    start_epoch = 1
    if args.resume:
        # PML saves a DDP model's module: load into the unwrapped models
        saved_objects = copy.copy(trainer)
        saved_objects.models = unwrapped(trainer.models)
        saved_objects.loss_funcs = unwrapped(trainer.loss_funcs)
        check_checkpoint(hooks, saved_objects, model_folder)
        with _quiet_pml():
            start_epoch = hooks.load_latest_saved_models(
                saved_objects, model_folder, args.device
            )
        logger.info("resuming from epoch %d", start_epoch)
        if start_epoch > args.warmup_epochs:
            end_warmup(trainer)
        if args.world_size > 1:  # the shuffle of the epoch to come, as end_of_epoch
            trainer.sampler.set_epoch(start_epoch - 1)
    # a resumed run that --patience had stopped stays stopped, as it would have
    best_epoch = None
    if args.resume and args.patience is not None and start_epoch <= args.epochs:
        if rank == 0:
            best_epoch = patience_exhausted_at(hooks, tester, start_epoch - 1, args)
        if args.world_size > 1:  # rank 0 decides for every rank
            box = [best_epoch]
            dist.broadcast_object_list(box, src=0)
            best_epoch = box[0]
    if start_epoch <= args.epochs and best_epoch is None:
        with _quiet_pml():
            trainer.train(start_epoch=start_epoch, num_epochs=args.epochs)
    else:
        if best_epoch is not None:
            logger.info(
                "nothing to train: the run stopped early at epoch %d, %d epochs after "
                "its best (%d), more than --patience %d; resume with a larger "
                "--patience to train on",
                start_epoch - 1,
                start_epoch - 1 - best_epoch,
                best_epoch,
                args.patience,
            )
        else:
            logger.info(
                "nothing to train: the run already has %d epochs", start_epoch - 1
            )
        trainer.epoch = start_epoch - 1
    if args.world_size > 1:  # training is over; what follows is rank 0's alone
        dist.destroy_process_group()
        trainer.models = unwrapped(trainer.models)
    if rank != 0:
        return {}
    stopped_early = trainer.epoch < args.epochs  # by --patience
    if stopped_early:
        logger.info(
            "stopped early at epoch %d of %d (--patience %s)",
            trainer.epoch,
            args.epochs,
            args.patience,
        )

    history = hooks.get_accuracy_history(tester, TEST_SPLIT, return_all_metrics=True)
    best, last = _best_and_last(history, args.primary_metric)
    results = {
        "dataset": args.dataset,
        "loss": args.loss + (" + proxy synthesis" if args.ps else ""),
        "shared_head": args.shared_head,
        "epochs": last.get("epoch"),
        "stopped_early": stopped_early,
        "best_epoch": best.get("epoch"),
        "best": best,
        "last": last,
    }
    if args.shared_head:
        # "last" is the tester's score of the concatenation; add the other weightings
        with _quiet_pml():
            heads = evaluate_heads(
                tester,
                {TEST_SPLIT: test_dataset},
                trainer.epoch,
                trainer.models["trunk"],
                trainer.models["embedder"],
                weightings=HEAD_WEIGHTINGS,
            )
        results["heads"] = {
            name: _strip_levels(accuracies[TEST_SPLIT])
            for name, accuracies in heads.items()
        }
        for name, accuracies in results["heads"].items():
            logger.info(
                "heads weighted %s %s, last epoch: %s",
                name,
                HEAD_WEIGHTINGS[name],
                format_metrics(accuracies),
            )
    if args.plots:
        make_figures(
            args, hooks, tester, trainer, loss_setup, train_dataset, test_dataset
        )
    results["wall_time_s"] = round(time.perf_counter() - start_time, 1)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if keeping.tensorboard_writer is not None:
        keeping.tensorboard_writer.close()
    return results


def _short_error(error: BaseException) -> str:
    """The message of an error, without a DataLoader worker's re-raised traceback."""
    text = str(error).strip()
    marker = "ImageLoadError: "
    if "Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        results = run(args)
    except (SetupError, ImageLoadError) as e:
        print(f"error: {_short_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    if not results:  # a torchrun rank other than 0
        return 0
    best = results["best"]
    logger.info(
        "done in %.0f s. best epoch %s: %s. Results, records, checkpoints and figures in %s",
        results["wall_time_s"],
        results["best_epoch"],
        format_metrics({k: v for k, v in best.items() if k != "epoch"}),
        args.output_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
