from .accuracy_calculator import RecallAtKAccuracyCalculator
from .autocast_trainer import AutocastTrainerMixin, with_autocast
from .decorrelated_cascaded_embeddings import DecorrelatedCascadedEmbeddings
from .figures import plot_embeddings, plot_learning_curves, plot_synthesis
from .head_decorrelation import (
    GradientReversal,
    HeadDecorrelationLoss,
    gradient_reversal,
)
from .head_weighting import HeadWeighting, evaluate_heads
from .record_keeping import build_hook_container, build_hooks, build_record_keeper
from .two_head_embedder import TwoHeadEmbedder, split_heads
