import subprocess
import sys

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses

from pml_proxysynth.losses import ProxySynthesisLoss
from pml_proxysynth.utils.figures import (
    metric_label,
    plot_embeddings,
    plot_learning_curves,
    plot_synthesis,
    project_2d,
)

pytest.importorskip("matplotlib")


def test_project_2d_tsne_and_pca_fallback(monkeypatch):
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    points, method = project_2d(x)
    assert points.shape == (40, 2) and method == "t-SNE"
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # scikit-learn missing
    points, method = project_2d(x)
    assert points.shape == (40, 2) and method == "PCA"
    # the centred rows on the two leading eigenvectors of their covariance (up to sign)
    centred = (x - x.mean(0)).double().numpy()
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)
    leading = eigenvectors[:, np.argsort(eigenvalues)[::-1][:2]]
    expected = centred @ leading
    for k in range(2):
        sign = np.sign(points[:, k] @ expected[:, k])
        np.testing.assert_allclose(sign * points[:, k], expected[:, k], atol=1e-4)
    assert project_2d(np.ones((3, 1)))[0].shape == (3, 2)


def test_project_2d_of_one_dimensional_rows():
    # enough rows for t-SNE, whose PCA initialisation cannot take 1 feature
    x = torch.randn(12, 1, generator=torch.Generator().manual_seed(0))
    points, method = project_2d(x)
    assert points.shape == (12, 2) and method == "PCA"
    centred = (x[:, 0] - x[:, 0].mean()).numpy()
    np.testing.assert_allclose(np.abs(points[:, 0]), np.abs(centred), rtol=1e-5)
    np.testing.assert_array_equal(points[:, 1], 0)


def test_project_2d_of_identical_rows_in_a_child_process():
    """All rows the same (a collapsed model): PCA to the origin. t-SNE's PCA
    initialisation would divide by their zero spread, and scikit-learn then crashes
    the process (SIGSEGV), so the call runs in a child process."""
    code = (
        "import numpy as np, torch\n"
        "from pml_proxysynth.utils.figures import project_2d\n"
        "for x in (torch.ones(12, 4), torch.zeros(5, 2)):\n"
        "    points, method = project_2d(x)\n"
        "    assert method == 'PCA' and points.shape == (len(x), 2), method\n"
        "    assert not points.any()\n"
        "print('ok')\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert (child.returncode, child.stdout.strip()) == (0, "ok"), child.stderr


def test_project_2d_bad_input_and_half_precision():
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    expected, _ = project_2d(x, method="pca")
    points, _ = project_2d(x.bfloat16(), method="pca")  # numpy has no bfloat16
    np.testing.assert_allclose(
        points, project_2d(x.bfloat16().float(), method="pca")[0]
    )
    assert np.abs(points - expected).max() < 0.1
    with pytest.raises(ValueError, match=r"shape \[N, D\], got \[12\]"):
        project_2d(x[:, 0])
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        project_2d(x)


def test_plot_embeddings_needs_one_label_per_row(tmp_path):
    with pytest.raises(ValueError, match="got 11 labels for 12 embeddings"):
        plot_embeddings(torch.randn(12, 4), torch.arange(11), str(tmp_path / "e.png"))


def test_figures_are_written(tmp_path):
    torch.manual_seed(0)
    embeddings, labels = torch.randn(24, 8), torch.arange(6).repeat_interleave(4)
    assert plot_embeddings(embeddings, labels, str(tmp_path / "e.png")) == "t-SNE"
    ps = ProxySynthesisLoss(losses.ProxyAnchorLoss(num_classes=6, embedding_size=8))
    synthesis = ps.synthesize(embeddings, labels)
    plot_synthesis(synthesis, str(tmp_path / "s.png"))
    plot_learning_curves(
        {"~iteration~": [0, 5, 10], "total_loss": [3.0, 2.0, 1.5]},
        {"epoch": [1, 2], "recall_at_1_level0": [0.5, 0.6], "best_epoch": [1, 2]},
        str(tmp_path / "c.png"),
        iterations_per_epoch=5,
    )
    for name in ("e.png", "s.png", "c.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_learning_curves_draw_every_loss(tmp_path):
    """Every loss column of PML's loss table, e.g. the two heads' losses of
    CascadedEmbeddings and a decorrelation loss, not only names ending in "loss"."""
    logged = ["metric_loss_0", "metric_loss_1", "decorrelation_loss", "total_loss"]
    history = {"~iteration~": [0, 5], **{name: [2.0, 1.0] for name in logged}}
    drawn = plot_learning_curves(
        history,
        {"epoch": [1], "recall_at_1_level0": [0.5], "best_epoch": [1]},
        str(tmp_path / "c.png"),
        iterations_per_epoch=5,
    )
    assert drawn == logged + ["R@1"]


def test_learning_curves_take_metrics_recorded_as_none(tmp_path, kept_figures):
    """PML records a NaN metric (no test query with a same-class reference) as None:
    a gap in the curve, not a TypeError that loses the run's results."""
    drawn = plot_learning_curves(
        {"~iteration~": [0, 5], "total_loss": [2.0, 1.0]},
        {"epoch": [1, 2], "recall_at_1_level0": [None, 0.5]},
        str(tmp_path / "c.png"),
    )
    assert drawn == ["total_loss", "R@1"]
    (fig,) = kept_figures
    line = fig.axes[1].lines[0]
    np.testing.assert_array_equal(line.get_ydata(), [np.nan, 50.0])


def test_metric_label():
    assert metric_label("recall_at_4") == "R@4"
    assert metric_label("mean_average_precision_at_r") == "MAP@R"
    assert metric_label("NMI") == "NMI"


@pytest.fixture
def kept_figures(monkeypatch):
    """The figures the plot functions draw, kept open for inspection."""
    plt = pytest.importorskip("matplotlib.pyplot")
    close, figures = plt.close, []
    monkeypatch.setattr(plt, "close", figures.append)
    yield figures
    for fig in figures:
        close(fig)


def test_project_2d_pca_on_request():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    assert project_2d(x, method="pca")[1] == "PCA"


def test_plotted_values(tmp_path, kept_figures):
    """Losses against epochs (iterations / iterations per epoch), metrics in %, one
    colour per class, and in the synthesis figure the real rows by class and the
    synthetic rows as one layer."""
    plot_learning_curves(
        {"~iteration~": [0, 5, 10], "total_loss": [3.0, 2.0, 1.5]},
        {"epoch": [1, 2], "recall_at_1_level0": [0.5, 0.625]},
        str(tmp_path / "c.png"),
        iterations_per_epoch=5,
    )
    ax_loss, ax_acc = kept_figures[-1].axes
    assert list(ax_loss.lines[0].get_xdata()) == [0, 1, 2]
    assert list(ax_acc.lines[0].get_ydata()) == [50.0, 62.5]
    torch.manual_seed(0)
    embeddings, labels = torch.randn(24, 8), torch.arange(6).repeat_interleave(4)
    plot_embeddings(embeddings, labels, str(tmp_path / "e.png"))
    colours = {
        tuple(c.get_facecolor()[0]) for c in kept_figures[-1].axes[0].collections
    }
    assert len(colours) == 6
    ps = ProxySynthesisLoss(losses.ProxyAnchorLoss(num_classes=6, embedding_size=8))
    synthesis = ps.synthesize(embeddings, labels)
    plot_synthesis(synthesis, str(tmp_path / "s.png"))
    *real, synthetic = kept_figures[-1].axes[0].collections
    assert len(synthetic.get_offsets()) == len(synthesis.pairs)
    assert sum(len(c.get_offsets()) for c in real) == 24
