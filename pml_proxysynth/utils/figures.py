"""Figures of a run: learning curves from PML's records, 2-D maps of embeddings.

matplotlib (and, for t-SNE, scikit-learn) are optional: they come with the ``examples``
extra. Every function writes a PNG and needs no display (Agg backend).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


def metric_label(metric: str) -> str:
    """Short metric names for legends and logs: "recall_at_1" -> "R@1", ..."""
    names = {"mean_average_precision_at_r": "MAP@R", "r_precision": "RP"}
    return names.get(metric, metric.replace("recall_at_", "R@"))


def project_2d(x, seed: int = 0, method: str = "tsne") -> Tuple[np.ndarray, str]:
    """[N, D] -> ([N, 2], method used): t-SNE with scikit-learn, else (or if asked) PCA.

    ``seed`` is t-SNE's ``random_state``; with its PCA initialisation, current
    scikit-learn (1.9) gives the same map for every seed. Rows that are all the same
    (a collapsed model) go to PCA, which maps them to the origin: t-SNE's PCA
    initialisation divides by their zero spread, and scikit-learn 1.9 then crashes
    the process (a segmentation fault)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu()  # numpy has no bfloat16
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must have shape [N, D], got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    centred = x - x.mean(axis=0)
    # t-SNE's PCA initialisation needs 2 features; 1-D rows go to the padded PCA
    if method == "tsne" and len(x) >= 5 and x.shape[1] >= 2 and centred.any():
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            pass
        else:
            perplexity = float(min(30.0, (len(x) - 1) / 3))
            tsne = TSNE(2, init="pca", perplexity=perplexity, random_state=seed)
            return tsne.fit_transform(x), "t-SNE"
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    points = centred @ vt[:2].T
    if points.shape[1] < 2:
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    return points, "PCA"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(
    loss_history: Dict[str, Sequence[float]],
    accuracy_history: Dict[str, Sequence[float]],
    path: str,
    iterations_per_epoch: int = 1,
) -> List[str]:
    """Losses against epochs (left) and metrics per epoch, in % (right); returns the
    names of the curves drawn.

    ``loss_history`` and ``accuracy_history`` are what PML's ``HookContainer`` returns
    from ``get_loss_history()`` and ``get_accuracy_history(tester, split,
    return_all_metrics=True)``: lists keyed by "~iteration~" / "epoch" and by loss
    names (every other column of PML's loss table: "total_loss", "metric_loss_0", ...)
    or "<metric>_level0" names.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    iterations = np.asarray(loss_history.get("~iteration~", []), dtype=float)
    for name, values in loss_history.items():
        if name != "~iteration~" and len(values) == len(iterations) > 0:
            ax_loss.plot(iterations / max(iterations_per_epoch, 1), values, label=name)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training losses")
    epochs = accuracy_history.get("epoch", [])
    for name, values in accuracy_history.items():
        if name.endswith("_level0") and len(values) == len(epochs) > 0:
            label = metric_label(name[: -len("_level0")])
            # PML records a NaN metric (no query with a same-class reference) as None
            percent = 100 * np.asarray(values, dtype=float)
            ax_acc.plot(epochs, percent, marker="o", label=label)
    ax_acc.set(xlabel="epoch", ylabel="%", title="evaluation")
    for ax in (ax_loss, ax_acc):
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [line.get_label() for ax in (ax_loss, ax_acc) for line in ax.lines]


def _scatter_classes(ax, points, labels, size: float) -> None:
    cmap = _pyplot().get_cmap("tab20")
    for i, label in enumerate(np.unique(labels)):
        mask = labels == label
        ax.scatter(*points[mask].T, s=size, color=cmap(i % 20), label=str(label))


def plot_embeddings(
    embeddings, labels, path: str, title: str = "embeddings", seed: int = 0
) -> str:
    """Scatter plot of a 2-D projection of ``embeddings`` coloured by label.

    Returns the projection method ("t-SNE" or "PCA").
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    labels = labels.reshape(-1)
    if len(labels) != len(embeddings):
        raise ValueError(
            f"need one label per embedding, got {len(labels)} labels for "
            f"{len(embeddings)} embeddings"
        )
    points, method = project_2d(embeddings, seed)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    _scatter_classes(ax, points, labels, size=14)
    ax.set_title(f"{title} ({method})", fontsize="medium")
    ax.legend(fontsize="x-small", ncol=2, title="class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return method


def plot_synthesis(
    synthesis, path: str, title: Optional[str] = None, seed: int = 0
) -> str:
    """The Proxy Synthesis figure: a batch's real embeddings (o, by class) and its
    synthetic embeddings (x), from ``ProxySynthesisLoss.synthesize(embeddings, labels)``.

    Returns the projection method ("t-SNE" or "PCA").
    """
    num_synthetic = len(synthesis.pairs)
    num_real = len(synthesis.labels) - num_synthetic
    points, method = project_2d(synthesis.embeddings, seed)
    labels = synthesis.labels[:num_real].cpu().numpy()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    _scatter_classes(ax, points[:num_real], labels, size=22)
    ax.scatter(*points[num_real:].T, s=26, marker="x", color="black", label="synthetic")
    lam = synthesis.lam.float().mean().item()
    if title is None:
        title = (
            f"{len(np.unique(labels))} classes (o) and {num_synthetic} synthetic "
            f"classes (x), lambda={lam:.2f}"
        )
    ax.set_title(f"{title} ({method})", fontsize="small")
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return method
