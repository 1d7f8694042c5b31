import glob
import logging
import os
import sys

import pytest
import torch
from pytorch_metric_learning import losses, testers, trainers
from pytorch_metric_learning.utils.logging_presets import EmptyContainer, HookContainer

from pml_proxysynth.utils.accuracy_calculator import RecallAtKAccuracyCalculator
from pml_proxysynth.utils.record_keeping import (
    build_hook_container,
    build_hooks,
    build_record_keeper,
    tensorboard_available,
)


@pytest.fixture
def no_tensorboard(monkeypatch):
    """Makes ``torch.utils.tensorboard`` unimportable, as when tensorboard is missing."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert not tensorboard_available()


def write_one_record(keeping):
    keeping.record_keeper.update_records({"loss": 1.5}, 1, parent_name="losses")
    keeping.record_keeper.save_records()


def test_records_and_tensorboard(tmp_path):
    keeping = build_record_keeper(str(tmp_path / "csv"), str(tmp_path / "tb"))
    assert keeping.tensorboard_writer is not None
    write_one_record(keeping)
    keeping.tensorboard_writer.flush()
    assert (tmp_path / "csv" / "losses.csv").is_file()
    assert (tmp_path / "csv" / "logs.db").is_file()
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    rows = keeping.record_keeper.query("SELECT loss FROM losses")
    assert [r["loss"] for r in rows] == [1.5]


def test_records_without_tensorboard(tmp_path, no_tensorboard, caplog):
    with caplog.at_level(logging.WARNING):
        keeping = build_record_keeper(str(tmp_path / "csv"), str(tmp_path / "tb"))
    assert keeping.record_keeper is not None
    assert keeping.tensorboard_writer is None
    assert "tensorboard is not installed" in caplog.text
    write_one_record(keeping)
    assert (tmp_path / "csv" / "losses.csv").is_file()
    assert not (tmp_path / "tb").exists()
    with pytest.raises(ImportError, match="tensorboard"):
        build_record_keeper(str(tmp_path / "csv2"), "tb", require_tensorboard=True)


def test_hook_container_never_empty(tmp_path):
    with pytest.raises(ValueError, match="record_keeper is None"):
        build_hook_container(None)
    hooks, _ = build_hooks(str(tmp_path), primary_metric="recall_at_1")
    assert isinstance(hooks, HookContainer)
    assert not isinstance(hooks, EmptyContainer)
    assert hooks.primary_metric == "recall_at_1"


def test_build_hooks_without_tensorboard_flag(tmp_path):
    """tensorboard=False: no tensorboard writer even when tensorboard is installed."""
    assert tensorboard_available()
    hooks, keeping = build_hooks(str(tmp_path), tensorboard=False)
    assert isinstance(hooks, HookContainer)
    assert keeping.tensorboard_writer is None
    assert hooks.record_keeper is keeping.record_keeper
    write_one_record(keeping)
    assert (tmp_path / "records" / "losses.csv").is_file()
    assert not (tmp_path / "tensorboard").exists()
    _, with_tb = build_hooks(str(tmp_path / "tb_run"))
    assert with_tb.tensorboard_writer is not None
    with_tb.tensorboard_writer.close()


class Blobs(torch.utils.data.Dataset):
    """Gaussian blobs: (vector, label) pairs, 4 classes."""

    def __init__(self, seed, n=48):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(4).repeat(n // 4)
        centres = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)) * 3
        self.data = centres[self.labels] + torch.randn(n, 6, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.data[i], self.labels[i]


@pytest.mark.parametrize(
    "with_tensorboard, prefix", [(True, None), (False, None), (False, "2heads")]
)
def test_training_evaluates_and_saves(tmp_path, monkeypatch, with_tensorboard, prefix):
    """With or without tensorboard, the epoch hook evaluates, records and saves models;
    also with a record group prefix that starts with a digit (its table is renamed for
    SQLite, and the hooks must still find it)."""
    if not with_tensorboard:
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    torch.manual_seed(0)
    hooks, keeping = build_hooks(
        str(tmp_path),
        primary_metric="recall_at_1",
        validation_split_name="test",
        log_freq=1,
        record_group_name_prefix=prefix,
    )
    assert (keeping.tensorboard_writer is not None) == with_tensorboard
    device = torch.device("cpu")
    models = {"trunk": torch.nn.Linear(6, 8), "embedder": torch.nn.Linear(8, 4)}
    loss = losses.ProxyAnchorLoss(num_classes=4, embedding_size=4)
    optimizers = {
        f"{k}_optimizer": torch.optim.Adam(m.parameters(), lr=1e-2)
        for k, m in [*models.items(), ("metric_loss", loss)]
    }
    tester = testers.GlobalEmbeddingSpaceTester(
        end_of_testing_hook=hooks.end_of_testing_hook,
        accuracy_calculator=RecallAtKAccuracyCalculator(
            include=("recall_at_1", "recall_at_2"), device=device
        ),
        dataloader_num_workers=0,
        data_device=device,
    )
    model_folder = str(tmp_path / "models")
    trainer = trainers.MetricLossOnly(
        models=models,
        optimizers=optimizers,
        batch_size=16,
        loss_funcs={"metric_loss": loss},
        dataset=Blobs(1),
        data_device=device,
        dataloader_num_workers=0,
        end_of_iteration_hook=hooks.end_of_iteration_hook,
        end_of_epoch_hook=hooks.end_of_epoch_hook(
            tester, {"test": Blobs(2)}, model_folder
        ),
    )
    trainer.train(num_epochs=2)
    saved = sorted(os.listdir(model_folder))
    assert "trunk_2.pth" in saved and "metric_loss_2.pth" in saved
    assert any(name.startswith("trunk_best") for name in saved)
    history = hooks.get_accuracy_history(tester, "test", return_all_metrics=True)
    assert history["epoch"] == [1, 2]
    best_epoch, _ = hooks.get_best_epoch_and_accuracy(tester, "test")
    assert best_epoch in (1, 2)
    # a new process (a resumed run) reading the same folder finds the same tables
    fresh, _ = build_hooks(
        str(tmp_path),
        tensorboard=False,
        primary_metric="recall_at_1",
        validation_split_name="test",
        record_group_name_prefix=prefix,
    )
    assert fresh.get_accuracy_history(tester, "test")["epoch"] == [1, 2]
    assert fresh.get_best_epoch_and_accuracy(tester, "test")[0] == best_epoch
    assert "recall_at_2_level0" in history
    assert os.path.isfile(os.path.join(str(tmp_path), "records", "logs.db"))
    assert hooks.get_loss_history()["total_loss"]


def test_loss_with_numbered_submodules_is_recorded(tmp_path):
    """HookContainer records losses recursively: nn.Sequential children are named 0, 1."""
    from pytorch_metric_learning.utils.module_with_records import ModuleWithRecords

    class LossWithRegressor(ModuleWithRecords):
        def __init__(self):
            super().__init__()
            self.rho = 2.0
            self.regressor = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
            self.add_to_recordable_attributes(list_of_names=["rho"], is_stat=False)

    keeping = build_record_keeper(str(tmp_path / "csv"))
    keeping.record_keeper.update_records(
        {"decorrelation_loss": LossWithRegressor()},
        1,
        recursive_types=[torch.nn.Module, dict],
    )
    keeping.record_keeper.save_records()  # sqlite rejects table names like "0_Linear"
    rows = keeping.record_keeper.query(
        "SELECT rho FROM decorrelation_loss_LossWithRegressor"
    )
    assert [r["rho"] for r in rows] == [2.0]
