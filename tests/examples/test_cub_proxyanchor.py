"""End-to-end and bad-input tests of examples/cub_proxyanchor.py (tiny data, CPU, seconds)."""

import copy
import json
import logging
import math
import os
import random
import re
import sqlite3
import subprocess
import sys
import urllib.error
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_metric_learning import losses, miners, samplers
from pytorch_metric_learning.trainers import BaseTrainer
from pytorch_metric_learning.utils.logging_presets import HookContainer

from ..distributed_utils import free_port
from . import EXAMPLE, load_example

TRAIN_CLASSES = (1, 2, 3, 4)
TEST_CLASSES = (101, 102, 103, 104)
# A small Glyphs configuration: 4 fonts, 36 characters, renders in about a second.
GLYPHS_OPTIONS = [
    "--glyphs-option",
    'font_files=["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "cmr10.ttf"]',
    "--glyphs-option",
    "min_fonts=4",
    "--glyphs-option",
    "characters=ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    "--glyphs-option",
    "augmentations_per_font=1",
]


@pytest.fixture(scope="module")
def ex():
    yield load_example()
    sys.modules.pop("cub_proxyanchor", None)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: fast and steady on a small shared CPU; restored afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_cub(root: Path, per_class: int = 6, size: int = 40) -> Path:
    """A tiny CUB_200_2011 in the real layout (what PML's datasets.CUB reads and more)."""
    base = root / "CUB_200_2011"
    rng = np.random.default_rng(0)
    images, labels, classes, split = [], [], [], []
    image_id = 0
    for class_id in TRAIN_CLASSES + TEST_CLASSES:
        folder = f"{class_id:03d}.Bird_{class_id}"
        classes.append(f"{class_id} {folder}")
        (base / "images" / folder).mkdir(parents=True)
        colour = rng.integers(0, 256, size=3)
        for k in range(per_class):
            image_id += 1
            name = f"{folder}/Bird_{class_id}_{k:04d}_{image_id}.jpg"
            pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(base / "images" / name)
            images.append(f"{image_id} {name}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {int(k % 2 == 0)}")
    for filename, lines in [
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("classes.txt", classes),
        ("train_test_split.txt", split),
    ]:
        (base / filename).write_text("\n".join(lines) + "\n")
    return root


def random_image(rng, colour, path: Path, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def make_cars196(root: Path, per_class: int = 6) -> Path:
    """A tiny Cars196 in the layout PML's datasets.Cars196 reads: names.csv,
    anno_{train,test}.csv and car_data/car_data/<split>/<name>/<file>."""
    base = root / "Cars196"
    rng = np.random.default_rng(0)
    classes = (1, 2, 3, 4, 99, 100, 101, 102)
    names = [f"Car {i}" for i in range(1, 197)]
    annos = {"train": [], "test": []}
    for class_id in classes:
        colour = rng.integers(0, 256, size=3)
        for k in range(per_class):
            split = ("train", "test")[k % 2]
            name = f"{class_id:03d}{k:02d}.jpg"
            folder = base / "car_data" / "car_data" / split / names[class_id - 1]
            random_image(rng, colour, folder / name)
            annos[split].append(f"{name},1,1,30,30,{class_id}")
    base.mkdir(parents=True, exist_ok=True)
    (base / "names.csv").write_text("\n".join(names) + "\n")
    for split, lines in annos.items():
        (base / f"anno_{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def make_sop(root: Path, per_class: int = 6) -> Path:
    """A tiny Stanford_Online_Products in the layout PML's dataset reads:
    Ebay_{train,test}.txt (image_id class_id super_class_id path) and the images."""
    base = root / "Stanford_Online_Products"
    rng = np.random.default_rng(0)
    image_id = 0
    for split, classes in (("train", (1, 2, 3, 4)), ("test", (5, 6, 7, 8))):
        lines = ["image_id class_id super_class_id path"]
        for class_id in classes:
            colour = rng.integers(0, 256, size=3)
            for k in range(per_class):
                image_id += 1
                path = f"bicycle_final/{class_id}_{k}.JPG"
                random_image(rng, colour, base / path)
                lines.append(f"{image_id} {class_id} 1 {path}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def cub_root(tmp_path):
    return make_cub(tmp_path / "data")


def quick(out, *extra):
    """Flags for a run of a few seconds: tiny crops, few iterations, no workers."""
    return [
        "--output-dir", str(out), "--image-size", "32", "--epochs", "1",
        "--warmup-epochs", "0", "--batch-size", "8", "--iterations-per-epoch", "2",
        "--embedding-size", "16", "--num-workers", "0", "--num-threads", "1",
        "--device", "cpu", "--log-freq", "1",
        *extra,
    ]  # fmt: skip


def cub_args(root, out, *extra):
    return ["--data-root", str(root), *quick(out, *extra)]


def small_cub(root, out, *extra):
    """CUB flags for the small conv net from scratch, without figures."""
    return cub_args(root, out, "--trunk", "small_conv", "--no-pretrained", "--no-plots", *extra)  # fmt: skip


def glyphs_args(root, out, *extra):
    return ["--dataset", "glyphs", "--data-root", str(root), *GLYPHS_OPTIONS, *quick(out, *extra)]  # fmt: skip


def without_iterations_per_epoch(flags):
    """``flags`` without --iterations-per-epoch: every epoch is one pass over the data."""
    i = flags.index("--iterations-per-epoch")
    return flags[:i] + flags[i + 2 :]


def accuracy_epochs(out):
    with sqlite3.connect(os.path.join(out, "records", "logs.db")) as db:
        (table,) = [
            name
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type='table'"
            )
            if name.startswith("accuracies")
        ]
        return [e for (e,) in db.execute(f"SELECT epoch FROM {table}")]


# --------------------------------------------------------------------- end to end


def test_cub_layout_end_to_end_and_resume(ex, cub_root, tmp_path, caplog):
    out = tmp_path / "run"
    flags = cub_args(cub_root, out, "--trunk", "resnet18", "--no-pretrained")
    assert ex.main(flags) == 0
    models = set(os.listdir(out / "models"))
    for key in ("trunk", "embedder", "metric_loss", "metric_loss_optimizer"):
        assert f"{key}_1.pth" in models and f"{key}_best1.pth" in models
    assert (out / "records" / "logs.db").is_file()
    assert any(name.endswith(".csv") for name in os.listdir(out / "records"))
    assert any(n.startswith("events.out") for n in os.listdir(out / "tensorboard"))
    for figure in ("learning_curves.png", "test_embeddings.png", "synthetic_batch.png"):
        assert (out / figure).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 1 and results["best_epoch"] == 1
    for metric in ("recall_at_1", "recall_at_8", "mean_average_precision_at_r", "NMI"):
        assert 0 <= results["best"][metric] <= 1
    config = json.loads((out / "config.json").read_text())
    assert config["trunk"] == "resnet18" and config["image_size"] == 32

    caplog.set_level("INFO", logger="cub_proxyanchor")
    assert ex.main(flags + ["--epochs", "2", "--resume", "--no-plots"]) == 0
    assert "resuming from epoch 2" in caplog.text
    models = set(os.listdir(out / "models"))
    assert "trunk_2.pth" in models and "trunk_1.pth" not in models
    assert accuracy_epochs(out) == [1, 2]
    assert json.loads((out / "results.json").read_text())["epochs"] == 2


def test_resume_after_interruption_restores_proxies_and_optimizer(
    ex, cub_root, tmp_path, monkeypatch
):
    """Killed mid-epoch, a run resumes from its last checkpoint: the trainer starts with
    exactly the saved proxies and optimizer state."""
    from pytorch_metric_learning.trainers import BaseTrainer

    out = tmp_path / "run"
    flags = small_cub(cub_root, out)
    assert ex.main(flags) == 0
    saved_loss = torch.load(out / "models" / "metric_loss_1.pth")
    saved_opt = torch.load(out / "models" / "metric_loss_optimizer_1.pth")

    calls = []
    original_step = BaseTrainer.forward_and_backward

    def killed_in_second_iteration(trainer):
        calls.append(trainer.iteration)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original_step(trainer)

    monkeypatch.setattr(BaseTrainer, "forward_and_backward", killed_in_second_iteration)
    assert ex.main(flags + ["--resume", "--epochs", "2"]) == 130
    monkeypatch.undo()
    assert len(calls) == 2 and "metric_loss_1.pth" in os.listdir(out / "models")

    started = {}
    original_train = BaseTrainer.train

    def recording_train(trainer, start_epoch=1, num_epochs=1):
        started["epoch"] = start_epoch
        started["loss"] = {
            k: v.clone()
            for k, v in trainer.loss_funcs["metric_loss"].state_dict().items()
        }
        started["opt"] = copy.deepcopy(
            trainer.optimizers["metric_loss_optimizer"].state_dict()
        )
        return original_train(trainer, start_epoch, num_epochs)

    monkeypatch.setattr(BaseTrainer, "train", recording_train)
    assert ex.main(flags + ["--resume", "--epochs", "2"]) == 0
    assert started["epoch"] == 2
    assert started["loss"].keys() == saved_loss.keys()
    for key, value in saved_loss.items():
        assert torch.equal(started["loss"][key], value), key
    (param_state,) = saved_opt["state"].values()
    (resumed_state,) = started["opt"]["state"].values()
    assert param_state.keys() == resumed_state.keys()
    for key, value in param_state.items():
        assert torch.equal(torch.as_tensor(resumed_state[key]), torch.as_tensor(value))
    assert param_state["step"] > 0


@pytest.mark.parametrize(
    "sampler",
    [[], ["--sampler", "m_per_class", "--m-per-class", "2"]],  # m_per_class: PML's
    ids=["random", "m_per_class"],  # sampler shuffles its class list in place
)
def test_resumed_run_equals_uninterrupted_run(ex, cub_root, tmp_path, sampler):
    """The RNG states are saved with each checkpoint: 1 epoch + --resume to 2 epochs
    draws the batches, flips and Proxy Synthesis pairs of 2 uninterrupted epochs, and
    ends with the same weights."""

    def run(out, *extra):
        flags = cub_args(cub_root, out, "--trunk", "small_conv", "--no-pretrained",
                         "--no-plots", "--batch-size", "4", *sampler, *extra)  # fmt: skip
        return ex.main(without_iterations_per_epoch(flags))

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run(full, "--epochs", "2") == 0
    assert run(resumed, "--epochs", "1") == 0
    assert "rng_state_1.pth" in os.listdir(resumed / "models")
    assert run(resumed, "--epochs", "2", "--resume") == 0
    for key in ("trunk", "embedder", "metric_loss"):
        expected = torch.load(full / "models" / f"{key}_2.pth")
        got = torch.load(resumed / "models" / f"{key}_2.pth")
        assert expected.keys() == got.keys()
        for name, value in expected.items():
            assert torch.equal(got[name], value), (key, name)


def test_resume_with_a_missing_checkpoint_file_is_one_message(ex, cub_root, tmp_path, capsys):  # fmt: skip
    """PML's loader only logs a missing file (and the run would go on with fresh
    proxies): the example names it and stops."""
    out = tmp_path / "run"
    flags = small_cub(cub_root, out)
    assert ex.main(flags) == 0
    (out / "models" / "metric_loss_1.pth").unlink()
    capsys.readouterr()
    assert ex.main(flags + ["--resume", "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert "metric_loss_1.pth missing" in err and "Traceback" not in err
    assert accuracy_epochs(out) == [1]
    # a file cut short (a save interrupted by a kill) is named too, not a traceback
    # from deep inside torch.load
    assert ex.main(flags + ["--overwrite"]) == 0
    trunk = out / "models" / "trunk_1.pth"
    trunk.write_bytes(trunk.read_bytes()[:100])
    capsys.readouterr()
    assert ex.main(flags + ["--resume", "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert "trunk_1.pth damaged" in err and "Traceback" not in err


def test_checkpoint_keeps_the_grad_scaler_state(ex, tmp_path):
    """With --amp on CUDA the GradScaler's loss scale is saved and loaded with the
    checkpoint (here a CPU GradScaler stands in for the CUDA one)."""

    def trainer(scale):
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        return SimpleNamespace(models={"trunk": torch.nn.Linear(2, 2)}, grad_scaler=scaler)  # fmt: skip

    saved, hooks = trainer(8.0), HookContainer(None)
    ex.add_run_state(saved, hooks)
    hooks.save_models(saved, str(tmp_path), 1)
    assert {"grad_scaler_1.pth", "rng_state_1.pth"} <= set(os.listdir(tmp_path))
    resumed, hooks = trainer(2.0**16), HookContainer(None)
    ex.add_run_state(resumed, hooks)
    assert hooks.load_latest_saved_models(resumed, str(tmp_path), "cpu") == 2
    assert resumed.grad_scaler.get_scale() == 8.0


def test_learning_curves_of_a_resumed_run_with_nothing_to_train(ex, cub_root, tmp_path, monkeypatch):  # fmt: skip
    """The figure's epoch axis divides iterations by the dataloader's length, which PML
    knows only after train(); a resume with nothing left to train does not run it."""
    flags = without_iterations_per_epoch(
        cub_args(cub_root, tmp_path / "run", "--trunk", "small_conv", "--no-pretrained",
                 "--batch-size", "4")
    )  # fmt: skip
    assert ex.main(flags) == 0  # 24 training images, batches of 4: 6 iterations
    passed = []

    def spy(*args, iterations_per_epoch=1):
        passed.append(iterations_per_epoch)

    monkeypatch.setattr(ex, "plot_learning_curves", spy)
    assert ex.main(flags + ["--resume"]) == 0
    assert passed == [6]


SAMPLER_EPOCH_LOGGER = Path(__file__).with_name("sampler_epoch_logger.py")


def run_torchrun(script, *args):
    """``script`` with ``args`` under torchrun: 2 CPU processes of one thread each."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", str(script), *map(str, args)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_dataloader_workers_under_spawn_and_forkserver(tmp_path, start_method):
    """The example run as a script with DataLoader workers (CUB's default is 4) under
    the start methods of macOS and Windows (spawn) and of Linux from Python 3.14 on
    (forkserver): the datasets, transforms and collate functions sent to the workers
    must pickle, and the script must be importable by them. Every other test runs
    without workers, where nothing is pickled."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import multiprocessing\n"
        f"multiprocessing.set_start_method({start_method!r}, force=True)\n"
    )
    out = tmp_path / "run"
    flags = small_cub(make_cub(tmp_path / "data"), out, "--num-workers", "2")
    path = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), *flags],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert accuracy_epochs(out) == [1]


def test_torchrun_two_cpu_processes_rank_zero_writes(tmp_path, monkeypatch):
    """torchrun --nproc_per_node=2 on CPU (gloo): trains, only rank 0 evaluates and
    writes, and --resume continues on both ranks, with the shuffle of the epoch it
    resumes at (the DistributedSampler's epoch; it repeated epoch 1's)."""
    out = tmp_path / "run"
    # whole passes over the data: each epoch iterates the sampler anew
    flags = without_iterations_per_epoch(
        glyphs_args(tmp_path / "glyphs", out, "--no-plots")
    )
    log = tmp_path / "sampler.jsonl"
    monkeypatch.setenv("SAMPLER_LOG", str(log))
    for extra in (["--epochs", "2"], ["--resume", "--epochs", "3"]):
        proc = run_torchrun(SAMPLER_EPOCH_LOGGER, *flags, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if "--resume" not in extra:
            # one record writer, one evaluation per epoch, one set of checkpoints
            assert len(os.listdir(out / "tensorboard")) == 1
            assert accuracy_epochs(out) == [1, 2]
            assert (
                proc.stdout.count("epoch 2/2:") + proc.stderr.count("epoch 2/2:") == 1
            )
    assert accuracy_epochs(out) == [1, 2, 3]
    assert "trunk_3.pth" in os.listdir(out / "models")
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    # a new shuffle every epoch, also in the epoch a resumed run starts at
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    for rank in (0, 1):
        assert [x["epoch"] for x in lines if x["rank"] == rank] == [0, 1, 2]


@pytest.mark.parametrize(
    "extra",
    [["--shared-head", "--shared-size", "8", "--decorrelation-rho", "10"],  # PS + ProxyAnchor, shared head
     ["--loss", "margin", "--no-ps"]],  # MarginLoss with PML's distance-weighted miner
)  # fmt: skip
def test_torchrun_shared_head_margin_and_m_per_class(tmp_path, extra):
    """torchrun on CPU with class-balanced batches split across the ranks; one record
    writer. That the losses' parameters stay equal across ranks is tested in
    test_distributed_setup.py."""
    out = tmp_path / "run"
    flags = glyphs_args(
        tmp_path / "glyphs", out, "--no-plots", "--sampler", "m_per_class",
        "--m-per-class", "2", "--batch-size", "16", *extra,
    )  # fmt: skip
    proc = run_torchrun(EXAMPLE, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(os.listdir(out / "tensorboard")) == 1
    assert accuracy_epochs(out) == [1]


# Runs the example's run() under torchrun, then exits 3 if a DistributedDataParallel
# wrapper is still alive: one left for the interpreter's shutdown takes the gloo process
# group with it, which now and then aborted a finished run (exit code -6).
_NO_DDP_LEFT = """
import gc, importlib.util, sys
from torch.nn.parallel import DistributedDataParallel
spec = importlib.util.spec_from_file_location("cub_proxyanchor", sys.argv[1])
ex = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ex
spec.loader.exec_module(ex)
ex.run(ex.parse_args(sys.argv[2:]))
sys.exit(3 if any(isinstance(o, DistributedDataParallel) for o in gc.get_objects()) else 0)
"""


def test_torchrun_leaves_no_ddp_wrapper_to_interpreter_shutdown(tmp_path):
    script = tmp_path / "no_ddp_left.py"
    script.write_text(_NO_DDP_LEFT)
    flags = glyphs_args(
        tmp_path / "glyphs", tmp_path / "run", "--no-plots", "--sampler",
        "m_per_class", "--m-per-class", "2", "--batch-size", "16", "--loss", "margin",
        "--no-ps",
    )  # fmt: skip
    proc = run_torchrun(script, EXAMPLE, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "dataset, make, train_ids, test_ids",
    [("cars196", make_cars196, (1, 2, 3, 4), (99, 100, 101, 102)),
     ("sop", make_sop, (1, 2, 3, 4), (5, 6, 7, 8))],
)  # fmt: skip
def test_cars196_and_sop_layouts_end_to_end(ex, tmp_path, dataset, make, train_ids, test_ids):  # fmt: skip
    root = make(tmp_path / "data")
    args = ex.parse_args(["--dataset", dataset, *cub_args(root, tmp_path / "run")])
    train, test = ex.build_datasets(args)
    assert (train.class_ids, test.class_ids) == (list(train_ids), list(test_ids))
    assert sorted(set(train.labels)) == sorted(set(test.labels)) == [0, 1, 2, 3]
    flags = ["--dataset", dataset, *small_cub(root, tmp_path / "run")]
    assert ex.main(flags) == 0
    assert accuracy_epochs(tmp_path / "run") == [1]


def test_missing_cars196_is_one_message(ex, tmp_path, capsys):
    flags = ["--dataset", "cars196", *cub_args(tmp_path, tmp_path / "run", "--trunk", "small_conv", "--no-pretrained")]  # fmt: skip
    assert ex.main(flags) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "Cars196" / "names.csv") in err and "Download" in err


@pytest.mark.parametrize(
    "dataset, make, victim",
    [("cars196", make_cars196, "Cars196/anno_test.csv"),
     ("sop", make_sop, "Stanford_Online_Products/Ebay_test.txt")],
)  # fmt: skip
def test_incomplete_cars196_and_sop_name_the_missing_file(ex, tmp_path, capsys, dataset, make, victim):  # fmt: skip
    """PML's readers open these files only when the split is built: a traceback."""
    root = make(tmp_path / "data")
    (root / victim).unlink()
    flags = ["--dataset", dataset, *cub_args(root, tmp_path / "run", "--trunk", "small_conv", "--no-pretrained")]  # fmt: skip
    assert ex.main(flags) == 1
    err = capsys.readouterr().err
    assert f"{root / victim} missing" in err and "Traceback" not in err


def test_glyphs_shared_head_end_to_end(ex, tmp_path):
    out = tmp_path / "run"
    flags = glyphs_args(
        tmp_path / "glyphs", out,
        "--shared-head", "--shared-size", "8", "--decorrelation-rho", "10",
        "--sampler", "m_per_class", "--m-per-class", "2", "--batch-size", "16",
        "--loss", "normalized_softmax", "--max-test-images", "60",
    )  # fmt: skip
    assert ex.main(flags) == 0
    models = set(os.listdir(out / "models"))
    for key in (
        "metric_loss_0",
        "metric_loss_1",
        "decorrelation_loss",
        "tuple_miner_1",
    ):
        assert f"{key}_1.pth" in models
    assert (out / "synthetic_batch.png").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "glyphs" and results["epochs"] == 1
    # the class head alone and DiVA's (1, 0.5) and (0.5, 1) are reported beside "last"
    # (the concatenation), with the same metrics; that evaluate_heads' weightings match
    # direct tester runs is tested in tests/utils/test_head_weighting.py
    weighted = {"class", "class_1_shared_0.5", "class_0.5_shared_1"}
    assert set(results["heads"]) == weighted
    for accuracies in results["heads"].values():
        assert set(accuracies) == set(results["last"]) - {"epoch"}
        assert all(0 <= value <= 1 for value in accuracies.values())
    # the weightings score different embeddings (on 60 test images, 1 epoch)
    assert len({json.dumps(a, sort_keys=True) for a in results["heads"].values()}) > 1


def test_baseline_without_ps_has_no_synthetic_figure(ex, cub_root, tmp_path):
    out = tmp_path / "run"
    assert ex.main(cub_args(cub_root, out, "--trunk", "small_conv", "--no-pretrained", "--no-ps")) == 0  # fmt: skip
    assert (out / "test_embeddings.png").is_file()
    assert not (out / "synthetic_batch.png").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["ps"] is False


def test_building_blocks_and_warmup(ex, cub_root, tmp_path):
    """The importable pieces compose into a PML trainer; warm-up freezes the trunk."""
    args = ex.parse_args(
        cub_args(cub_root, tmp_path / "run", "--trunk", "small_conv", "--no-pretrained")
        + ["--epochs", "2", "--warmup-epochs", "1", "--sampler", "m_per_class"]
    )
    train, test = ex.build_datasets(args)
    # the standard split (classes 1-100 train, 101-200 test), each remapped to 0..K-1
    assert (train.class_ids, test.class_ids) == (
        list(TRAIN_CLASSES),
        list(TEST_CLASSES),
    )
    assert sorted(set(train.labels)) == sorted(set(test.labels)) == [0, 1, 2, 3]
    models = ex.build_model(args)
    setup = ex.build_loss(args, num_classes=4)
    optimizers, schedulers = ex.build_optimizers(args, models, setup.loss_funcs)
    lrs = {k: o.param_groups[0]["lr"] for k, o in optimizers.items()}
    assert lrs["metric_loss_optimizer"] == pytest.approx(100 * lrs["trunk_optimizer"])
    trainer = ex.build_trainer(args, models, optimizers, setup, train, schedulers)

    def snapshot(key):
        return [p.detach().clone() for p in models[key].parameters()]

    trunk, embedder = snapshot("trunk"), snapshot("embedder")
    with ex._quiet_pml():
        trainer.train(start_epoch=1, num_epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(trunk, snapshot("trunk")))
    assert not all(torch.equal(a, b) for a, b in zip(embedder, snapshot("embedder")))
    ex.end_warmup(trainer)
    with ex._quiet_pml():
        trainer.train(start_epoch=2, num_epochs=2)
    assert not all(torch.equal(a, b) for a, b in zip(trunk, snapshot("trunk")))

    metrics = ex.evaluate(ex.build_tester(args), models, test)
    assert set(metrics) >= {"recall_at_1", "recall_at_2", "r_precision", "NMI"}


def test_help_shows_dataset_and_loss_dependent_defaults(ex, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ex.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "224 (cub), 32 (glyphs)" in text
    assert "resnet50 (cub), small_conv (glyphs)" in text
    assert "512 (cub), 128 (glyphs)" in text
    assert "(default: 0.25 (proxy_anchor), 1 (others))" in text
    assert text.count("(default: on (proxy_anchor), off (others))") == 2


def test_dataset_and_loss_dependent_defaults_resolved(ex):
    cub = ex.parse_args(["--device", "cpu"])
    glyphs = ex.parse_args(["--dataset", "glyphs", "--device", "cpu"])
    assert (cub.image_size, cub.trunk, cub.pretrained, cub.embedding_size) == (224, "resnet50", True, 512)  # fmt: skip
    assert (glyphs.image_size, glyphs.trunk, glyphs.pretrained) == (
        32,
        "small_conv",
        False,
    )
    assert cub.ps and cub.loss == "proxy_anchor" and cub.ps_alpha == 0.4
    assert cub.ps_mu == 0.25 and cub.ps_positive_divisor == "all"
    # Proxy-Anchor's PS default is the trunk-only variant; the paper's for other losses
    assert cub.ps_exclude_parents and cub.ps_detach_parent_proxies
    arcface = ex.parse_args(["--device", "cpu", "--loss", "arcface"])
    assert arcface.ps_mu == 1.0
    assert not (arcface.ps_exclude_parents or arcface.ps_detach_parent_proxies)
    paper = ex.parse_args(["--device", "cpu", "--no-ps-exclude-parents",
                           "--no-ps-detach-parent-proxies"])  # fmt: skip
    assert not (paper.ps_exclude_parents or paper.ps_detach_parent_proxies)
    # the baseline: no error for the switches Proxy-Anchor's PS would default to
    baseline = ex.parse_args(["--device", "cpu", "--no-ps"])
    assert not (baseline.ps_exclude_parents or baseline.ps_detach_parent_proxies)
    assert ex.parse_args(["--device", "cpu", "--ps-mu", "2"]).ps_mu == 2.0
    # Recall@K in increasing K, each once (the calculator's metrics and the tables)
    assert ex.parse_args(
        ["--device", "cpu", "--recall-ks", "8", "2", "2", "1"]
    ).recall_ks == [1, 2, 8]


# ---------------------------------------------------------------------- bad input


def test_missing_cub_without_network_is_one_message(tmp_path):
    """No data and no download: an actionable message, exit status 1, no traceback."""
    root = tmp_path / "nothing"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--data-root", str(root), "--no-download",
         "--device", "cpu", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert str(root / "CUB_200_2011" / "images.txt") in proc.stderr
    assert "CUB_200_2011.tgz" in proc.stderr and "--dataset glyphs" in proc.stderr


def test_failed_download_names_the_ways_out(ex, tmp_path, monkeypatch, capsys):
    from pytorch_metric_learning.datasets import cub

    def no_network(url, filename, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cub, "_urlretrieve", no_network)
    root = tmp_path / "fresh"
    assert ex.main(cub_args(root, tmp_path / "out", "--trunk", "small_conv", "--no-pretrained")) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "downloading failed (no network)" in err
    assert "tar -xzf CUB_200_2011.tgz" in err
    assert os.listdir(root) == []  # no partial archive left behind

    (root / "other.txt").write_text("not CUB")
    assert ex.main(cub_args(root, tmp_path / "out2", "--trunk", "small_conv", "--no-pretrained")) == 1  # fmt: skip
    assert "downloading failed (no network)" in capsys.readouterr().err
    assert os.listdir(root) == ["other.txt"]


def test_cub_downloaded_into_a_root_that_holds_other_data(ex, tmp_path, monkeypatch):
    """CUB is downloaded when --data-root has no CUB_200_2011/, also when it holds other
    things (the glyphs cache: both default to data/); those are left alone."""
    import tarfile

    from pytorch_metric_learning.datasets import cub

    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(make_cub(tmp_path / "source") / "CUB_200_2011", arcname="CUB_200_2011")
        tar.add(tmp_path / "source" / "CUB_200_2011" / "classes.txt", arcname="attributes.txt")  # fmt: skip
    urls = []

    def fake_download(url, filename, **kwargs):
        urls.append(url)
        Path(filename).write_bytes(archive.read_bytes())

    monkeypatch.setattr(cub, "_urlretrieve", fake_download)
    root = tmp_path / "data"
    (root / "glyphs").mkdir(parents=True)
    ex.ensure_cub(str(root))
    assert urls == [cub.CUB.DOWNLOAD_URL]
    assert sorted(os.listdir(root)) == ["CUB_200_2011", "glyphs"]
    args = ex.parse_args(cub_args(root, tmp_path / "out", "--trunk", "small_conv", "--no-pretrained"))  # fmt: skip
    train, test = ex.build_datasets(args)
    assert (train.class_ids, test.class_ids) == (
        list(TRAIN_CLASSES),
        list(TEST_CLASSES),
    )
    ex.ensure_cub(str(root))  # there now: not downloaded again
    assert len(urls) == 1


@pytest.mark.parametrize("name", ["images.txt", "image_class_labels.txt"])
def test_incomplete_cub_names_the_missing_file(ex, cub_root, tmp_path, capsys, name):
    victim = cub_root / "CUB_200_2011" / name
    victim.unlink()
    assert ex.main(cub_args(cub_root, tmp_path / "out", "--trunk", "small_conv", "--no-pretrained")) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert f"{victim} missing" in err and "Traceback" not in err


@pytest.mark.parametrize("edit", ["swap", "drop"])
def test_misaligned_cub_lists_are_named(ex, cub_root, tmp_path, capsys, edit):
    """PML's reader would silently drop the images whose ids differ line by line."""
    victim = cub_root / "CUB_200_2011" / "image_class_labels.txt"
    lines = victim.read_text().splitlines()
    if edit == "swap":
        lines[2], lines[3] = lines[3], lines[2]
    else:
        del lines[2]
    victim.write_text("\n".join(lines) + "\n")
    assert ex.main(cub_args(cub_root, tmp_path / "out", "--trunk", "small_conv", "--no-pretrained")) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "line 3 of images.txt" in err and "Traceback" not in err


def test_missing_image_file_is_named(ex, cub_root, tmp_path, capsys):
    victim = next((cub_root / "CUB_200_2011" / "images").glob("002.*/*.jpg"))
    victim.unlink()
    assert ex.main(cub_args(cub_root, tmp_path / "out", "--trunk", "small_conv", "--no-pretrained")) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert str(victim) in err and "Traceback" not in err


def test_folders_that_are_files_are_named(ex, tmp_path, capsys):
    """An --output-dir or --data-root that is (or lies under) a file: one message
    before any data is loaded or rendered, not a traceback after it."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    glyphs = ["--dataset", "glyphs", "--device", "cpu", "--no-plots"]
    for flags, flag, path in [
        (["--output-dir", str(a_file), "--data-root", str(tmp_path)], "--output-dir", a_file),
        (["--output-dir", str(a_file / "sub")], "--output-dir", a_file / "sub"),
        (["--data-root", str(a_file), "--output-dir", str(tmp_path / "o")], "--data-root", a_file),
    ]:  # fmt: skip
        assert ex.main(glyphs + flags) == 1
        err = capsys.readouterr().err
        assert f"{flag} {path}: {a_file} is a file, not a folder" in err
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_the_log_counts_the_classes_of_the_subsample(ex, cub_root, tmp_path, caplog):
    """2 of the 24 training images cover at most 2 of the 4 classes, which all keep
    their proxies: the log said "2 training images of 4 classes"."""
    flags = small_cub(cub_root, tmp_path / "out", "--max-train-images", "2",
                      "--batch-size", "2", "--no-ps")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="cub_proxyanchor"):
        assert ex.main(flags) == 0
    assert re.search(
        r"2 training images of [12] classes \(4 proxy classes\)", caplog.text
    )


def test_synthetic_batch_figure_needs_a_class_of_two_images(ex, tmp_path, caplog):
    dataset = SimpleNamespace(labels=[0, 1, 2, 3])  # one image per class
    path = tmp_path / "synthetic_batch.png"
    ex.plot_synthetic_batch(None, {}, dataset, SimpleNamespace(seed=0), str(path))
    assert not path.exists()
    assert "no training class has 2 images" in caplog.text


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_file_is_named(ex, cub_root, tmp_path, capsys, workers):
    victim = next((cub_root / "CUB_200_2011" / "images").glob("103.*/*.jpg"))
    victim.write_bytes(b"this is not a JPEG")
    flags = cub_args(
        cub_root, tmp_path / "out", "--trunk", "small_conv", "--no-pretrained"
    )
    assert ex.main(flags + ["--num-workers", workers]) == 1
    err = capsys.readouterr().err
    assert f"cannot read image file {victim}" in err
    assert "Traceback" not in err


def test_unavailable_imagenet_weights(ex, cub_root, tmp_path, monkeypatch, capsys):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    assert ex.main(cub_args(cub_root, tmp_path / "out", "--trunk", "resnet18")) == 1
    err = capsys.readouterr().err
    assert "ImageNet weights for resnet18" in err
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in err
    assert "--no-pretrained" in err


def test_glyphs_not_rendered_with_no_download(ex, tmp_path, capsys):
    flags = glyphs_args(tmp_path / "empty", tmp_path / "out", "--no-download")
    assert ex.main(flags) == 1
    assert "run the example without --no-download" in capsys.readouterr().err


def test_output_dir_protection(ex, cub_root, tmp_path, capsys):
    out = tmp_path / "run"
    flags = small_cub(cub_root, out)
    assert ex.main(flags + ["--resume"]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert ex.main(flags) == 0
    assert ex.main(flags) == 1
    assert "--resume" in capsys.readouterr().err
    assert ex.main(flags + ["--resume", "--epochs", "2", "--embedding-size", "8"]) == 1
    assert "--embedding-size 16" in capsys.readouterr().err
    assert ex.main(flags + ["--resume", "--epochs", "2", "--no-ps"]) == 1
    assert "other option: --ps" in capsys.readouterr().err
    # --overwrite deletes the run only once the new run's data is there
    missing = small_cub(tmp_path / "no_data", out, "--no-download")
    assert ex.main(missing + ["--overwrite"]) == 1
    assert "CUB-200-2011" in capsys.readouterr().err
    assert accuracy_epochs(out) == [1]
    assert ex.main(flags + ["--overwrite"]) == 0


def test_nan_metrics_from_the_records_stay_nan(ex):
    """With no query that has a same-class reference the metrics are NaN, which the
    SQLite records give back as None: the summary keeps them as NaN (it raised)."""
    history = {
        "epoch": [1, 2],
        "mean_average_precision_at_r_level0": [None, 0.5],
        "recall_at_1_level0": [None, None],
    }
    best, last = ex._best_and_last(history, "mean_average_precision_at_r")
    assert best == {"epoch": 2, "mean_average_precision_at_r": 0.5, "recall_at_1": ANY}
    assert math.isnan(best["recall_at_1"]) and math.isnan(last["recall_at_1"])


def test_resume_refuses_restored_and_glyphs_class_options(ex, tmp_path):
    """The checkpoint's optimizers and schedulers restore their lr, weight decay, step
    size and gamma, so a --resume that changes them would train with the saved ones;
    on glyphs the image size decides the classes (on CUB it may change)."""
    for dataset in ("glyphs", "cub"):
        out = tmp_path / dataset
        out.mkdir()
        base = ["--device", "cpu", "--dataset", dataset, "--output-dir", str(out)]
        if dataset == "cub":
            base += ["--trunk", "small_conv", "--no-pretrained"]
        saved = ex.parse_args(base)
        (out / "config.json").write_text(json.dumps(vars(saved)))
        size = str(saved.image_size + 8)
        changes = [["--lr", "0.01"], ["--lr-decay-step", "1"]]
        changes += [["--proxy-lr-mult", "10"], ["--weight-decay", "0.1"]]
        changes += [["--image-size", size]] if dataset == "glyphs" else []
        for change in changes:
            args = ex.parse_args(base + ["--resume"] + change)
            with pytest.raises(ex.SetupError, match=f"other option: {change[0]} "):
                ex._check_resumable(args)
        if dataset == "cub":
            ex._check_resumable(
                ex.parse_args(base + ["--resume", "--image-size", size])
            )


def test_resume_with_another_seed_of_a_subsampled_run_is_one_message(ex, cub_root, tmp_path, capsys):  # fmt: skip
    """With --max-train-images the seed picks the training images, hence the classes
    and the number of proxies: a --resume with another --seed would train on another
    subset (or fail to load the proxies)."""
    out = tmp_path / "run"
    flags = cub_args(cub_root, out, "--trunk", "small_conv", "--no-pretrained",
                     "--no-plots", "--batch-size", "4", "--max-train-images", "5")  # fmt: skip
    assert ex.main(flags + ["--seed", "1"]) == 0
    capsys.readouterr()
    assert ex.main(flags + ["--seed", "0", "--resume", "--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert "other option: --seed 1" in err and "Traceback" not in err
    assert accuracy_epochs(out) == [1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--batch-size", "10", "--sampler", "m_per_class", "--m-per-class", "4"],
            "multiple of --m-per-class",
        ),  # fmt: skip
        (["--dataset", "glyphs", "--pretrained"], "no pretrained weights"),
        (["--warmup-epochs", "3", "--epochs", "3"], "--warmup-epochs"),
        (["--resume", "--overwrite"], "exclude each other"),
        (["--decorrelation-rho", "5"], "needs --shared-head"),
        (["--ps-mu", "0"], "--no-ps"),
        (["--glyphs-option", "max_classes=4"], "needs --dataset glyphs"),
        (["--dataset", "glyphs", "--glyphs-option", "colour=1"], "unknown key"),
        (["--loss-kwargs", "[1, 2]"], "JSON object"),
        # crashed in the first forward pass (embedding_size), or changed the number of
        # proxies away from the training classes (num_classes)
        (["--loss-kwargs", '{"embedding_size": 8}'], "are set by the example"),
        (["--loss", "arcface", "--loss-kwargs", '{"num_classes": 2}'], "num_classes"),
        (["--loss", "triplet"], "invalid choice"),
        (["--epochs", "0"], "must be > 0"),
        # the example's code paths are for cpu and cuda (autocast, DDP, the loader)
        (["--device", "meta"], "--device meta: the example runs on cpu or cuda"),
        # numpy's global RNG (seeded for PML's samplers) takes 0 to 2**32 - 1
        (["--seed", "-1"], "--seed: must be in [0, 2**32 - 1], got -1"),
        (["--seed", str(2**32)], "--seed: must be in [0, 2**32 - 1]"),
        # NaN would pass a plain "> 0" test and train a NaN model; inf likewise
        (["--lr", "nan"], "--lr: must be finite and > 0, got nan"),
        (["--ps-mu", "inf"], "--ps-mu: must be finite and >= 0, got inf"),
        (["--proxy-anchor-margin", "nan"], "--proxy-anchor-margin: must be finite"),
        # json.loads takes NaN and Infinity; a loss would train with them
        (
            ["--loss-kwargs", '{"margin": NaN}'],
            'argument --loss-kwargs: NaN is not a finite number: {"margin": NaN}',
        ),
        (
            ["--dataset", "glyphs", "--glyphs-option", "max_classes=-Infinity"],
            "argument --glyphs-option: -Infinity is not a finite number",
        ),
        (["--crop-scale=-inf"], "--crop-scale: must be finite and > 0"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--image-size", "15"], "--image-size must be at least 16"),
        (["--crop-scale", "1.5"], "--crop-scale"),
        (["--test-resize-ratio", "0.5"], "--test-resize-ratio must be at least 1"),
        (["--epochs", "3", "--test-interval", "2"], "multiple of --test-interval"),
        (
            ["--epochs", "1", "--warmup-epochs", "0", "--test-interval", "2"],
            "multiple of --test-interval",
        ),  # fmt: skip
        (["--trunk", "small_conv"], "by default: add --no-pretrained"),
        (["--primary-metric", "recall_at_1", "--recall-ks", "2", "4"], "needs its K"),
        (["--loss", "margin"], "not a proxy loss"),
        (
            ["--loss", "arcface", "--ps-positive-divisor", "real"],
            "needs --loss proxy_anchor",
        ),  # fmt: skip
        (
            ["--loss", "soft_triple", "--ps-exclude-parents"],
            "--ps-exclude-parents needs",
        ),
        (["--no-ps", "--ps-exclude-parents"], "--ps-exclude-parents needs"),
        # roll needs neighbours of different classes, which neither sampler gives
        (["--ps-pairing", "roll"], "invalid choice"),
        # options that only matter with another one are refused without it
        (["--no-ps", "--ps-mu", "2"], "--ps-mu needs Proxy Synthesis"),
        (
            ["--no-ps", "--ps-alpha", "1", "--ps-lam-per", "pair"],
            "--ps-alpha, --ps-lam-per need Proxy Synthesis",
        ),
        (["--m-per-class", "8"], "--m-per-class needs --sampler m_per_class"),
        (["--shared-weight", "0.1"], "--shared-weight needs --shared-head"),
        (["--shared-strategy", "full"], "--shared-strategy needs --shared-head"),
        (
            ["--loss", "arcface", "--proxy-anchor-margin", "0.2"],
            "--proxy-anchor-margin needs --loss proxy_anchor",
        ),
        (["--beta-lr", "0.1"], "--beta-lr needs a margin loss"),
        (["--decorrelation-lr", "0.1"], "--decorrelation-lr needs --decorrelation-rho"),
        (
            ["--no-ps", "--ps-positive-divisor", "real"],
            "--ps-positive-divisor needs Proxy Synthesis",
        ),
        (
            ["--loss", "margin", "--no-ps", "--proxy-lr-mult", "10"],
            "--proxy-lr-mult needs a proxy loss",
        ),
        (
            ["--dataset", "glyphs", "--lr-decay-gamma", "0.1"],
            "--lr-decay-gamma needs --lr-decay-step > 0",
        ),
        (["--no-ps", "--ps-detach-parent-proxies"], "--ps-detach-parent-proxies needs"),
        (["--no-ps", "--ps-pairing", "random"], "--ps-pairing needs Proxy Synthesis"),
        (["--no-plots", "--plot-classes", "3"], "--plot-classes needs figures"),
        (["--shared-size", "8"], "--shared-size needs --shared-head"),
        (["--shared-cutoff", "0.2"], "--shared-cutoff needs --shared-head"),
        (
            ["--loss", "arcface", "--proxy-anchor-alpha", "16"],
            "--proxy-anchor-alpha needs --loss proxy_anchor",
        ),
        # given on the command line at their default values: refused all the same
        (["--no-ps", "--ps-alpha", "0.4"], "--ps-alpha needs Proxy Synthesis"),
        (["--m-per-class", "4"], "--m-per-class needs --sampler m_per_class"),
        (["--dataset", "glyphs", "--lr-decay-gamma", "0.5"], "--lr-decay-gamma needs"),
    ],
)
def test_bad_flag_combinations(ex, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        ex.parse_args(["--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_largest_seed_is_one_numpy_takes(ex):
    seed = ex.parse_args(["--seed", str(2**32 - 1)]).seed
    assert seed == 2**32 - 1
    np.random.RandomState(seed)  # what np.random.seed checks; 2**32 raises


def test_bad_loss_kwargs_is_a_clear_error(ex, cub_root, tmp_path, capsys):
    flags = cub_args(
        cub_root, tmp_path / "out", "--trunk", "small_conv", "--no-pretrained"
    )
    assert ex.main(flags + ["--loss-kwargs", '{"no_such_option": 1}']) == 1
    assert "no_such_option" in capsys.readouterr().err


# --------------------------------------------------------------------- unit level


@pytest.mark.parametrize("edit", ["drop_last", "extra_label"])
def test_cub_lines_checked_to_the_end(ex, cub_root, edit):
    """A list one line longer than the other (8 classes x 6 images: 48 lines) is
    named at its first unpaired line, not skipped as zip() would."""
    folder = cub_root / "CUB_200_2011"
    victim = folder / "image_class_labels.txt"
    lines = victim.read_text().splitlines()
    lines = lines[:-1] if edit == "drop_last" else lines + ["49 104"]
    victim.write_text("\n".join(lines) + "\n")
    line = 48 if edit == "drop_last" else 49
    with pytest.raises(ex.SetupError, match=f"line {line} of images.txt"):
        ex.check_cub_lines_match(str(folder))


def test_build_datasets_checks_the_batch_against_the_training_set(
    ex, cub_root, tmp_path
):
    """The tiny CUB has 4 training classes of 6 images (24): class-balanced batches
    of 2 per class hold at most 8 images, plain ones at most 24."""

    def build(*extra):
        args = ex.parse_args(
            cub_args(
                cub_root,
                tmp_path / "run",
                "--trunk",
                "small_conv",
                "--no-pretrained",
                *extra,
            )
        )
        return ex.build_datasets(args)

    m_per_class = ("--sampler", "m_per_class", "--m-per-class", "2")
    assert len(build(*m_per_class, "--batch-size", "8")[0]) == 24
    with pytest.raises(
        ex.SetupError, match="4 training classes x --m-per-class 2 < --batch-size 10"
    ):
        build(*m_per_class, "--batch-size", "10")
    assert len(build("--batch-size", "24")[0]) == 24
    with pytest.raises(ex.SetupError, match="24 images, fewer than --batch-size 25"):
        build("--batch-size", "25")


# option -> another value; each fixes the shape of saved models or the training set
STRUCTURAL = {
    "dataset": "glyphs", "trunk": "resnet18", "pooling": "max", "embedding_size": 8,
    "loss": "arcface", "loss_kwargs": {"scale": 23}, "shared_head": True,
    "shared_size": 8, "decorrelation_rho": 1.0, "max_train_images": 100, "seed": 5,
    "glyphs_option": {"max_classes": 10}, "world_size": 2, "ps": False,
}  # fmt: skip


@pytest.mark.parametrize("option", sorted(STRUCTURAL))
def test_resume_refuses_a_structural_change(ex, tmp_path, option):
    args = ex.parse_args(["--device", "cpu", "--output-dir", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps(vars(args)))
    changed = copy.copy(args)
    setattr(changed, option, STRUCTURAL[option])
    # the saved run's value, as the command line said it (world_size: how it ran)
    flag = "one process" if option == "world_size" else "--" + option.replace("_", "-")
    with pytest.raises(ex.SetupError, match=f"other option: .*{flag}"):
        ex._check_resumable(changed)
    for other, value in [("epochs", 9), ("image_size", 256), ("patience", 3)]:
        setattr(args, other, value)
    ex._check_resumable(
        args
    )  # training length, CUB's input size, early stop may change


def test_resume_names_the_options_that_changed(ex, tmp_path, caplog):
    argv = ["--device", "cpu", "--output-dir", str(tmp_path)]
    saved = ex.parse_args(argv)
    (tmp_path / "config.json").write_text(json.dumps(vars(saved)))
    with caplog.at_level(logging.INFO, logger="cub_proxyanchor"):
        ex._check_resumable(ex.parse_args(argv + ["--resume"]))
        # the same folder, spelled another way
        relative = ["--device", "cpu", "--output-dir", os.path.relpath(tmp_path)]
        ex._check_resumable(ex.parse_args(relative + ["--resume"]))
        assert caplog.text == ""  # nothing but --resume itself changed
        more = ["--resume", "--epochs", "70", "--no-ps-detach-parent-proxies"]
        ex._check_resumable(ex.parse_args(argv + more + ["--no-plots"]))
    message = caplog.text
    assert f"--epochs 70 (saved: --epochs {saved.epochs})" in message
    assert (
        "--no-ps-detach-parent-proxies (saved: --ps-detach-parent-proxies)" in message
    )
    assert "--no-plots (saved: --plots)" in message
    assert message.count("(saved:") == 3


def test_best_and_last_by_hand(ex):
    """The best epoch by the primary metric (the earliest of equals), the last epoch."""
    history = {
        "epoch": [1, 2, 3, 4],
        "recall_at_1_level0": [0.5, 0.7, 0.7, 0.6],
        "mean_average_precision_at_r_level0": [0.2, 0.25, 0.3, 0.28],
    }
    best, last = ex._best_and_last(history, "recall_at_1")
    assert best == {"epoch": 2, "recall_at_1": 0.7, "mean_average_precision_at_r": 0.25}
    assert last == {"epoch": 4, "recall_at_1": 0.6, "mean_average_precision_at_r": 0.28}
    best, _ = ex._best_and_last(history, "mean_average_precision_at_r")
    assert best["epoch"] == 3
    assert ex._best_and_last({}, "recall_at_1") == ({}, {})


def lr_and_decay(optimizers):
    """{key: [lr, weight_decay]} of each optimizer's one parameter group, rounded."""
    result = {}
    for key, optimizer in optimizers.items():
        (group,) = optimizer.param_groups
        result[key] = [round(group["lr"], 12), round(group["weight_decay"], 12)]
    return result


def test_optimizers_and_schedulers_per_parameter_group(ex):
    """Networks at --lr, proxies at --lr x --proxy-lr-mult, margin betas at --beta-lr
    without weight decay, the regressor at --decorrelation-lr; one StepLR per optimizer,
    stepped by epoch (PML steps *_scheduler_by_epoch after each epoch)."""
    common = ["--dataset", "glyphs", "--device", "cpu", "--embedding-size", "8",
              "--lr", "0.001", "--weight-decay", "0.01", "--lr-decay-step", "3",
              "--lr-decay-gamma", "0.2"]  # fmt: skip
    args = ex.parse_args(common + ["--proxy-lr-mult", "10"])
    models = ex.build_model(args)
    optimizers, schedulers = ex.build_optimizers(
        args, models, ex.build_loss(args, 5).loss_funcs
    )
    assert lr_and_decay(optimizers) == ({
        "trunk_optimizer": [0.001, 0.01], "embedder_optimizer": [0.001, 0.01],
        "metric_loss_optimizer": [0.01, 0.01],
    })  # fmt: skip
    assert set(schedulers) == {"trunk_scheduler_by_epoch", "embedder_scheduler_by_epoch",
                               "metric_loss_scheduler_by_epoch"}  # fmt: skip
    for key, scheduler in schedulers.items():
        assert (scheduler.step_size, scheduler.gamma) == (3, 0.2)
        assert (
            scheduler.optimizer
            is optimizers[key.replace("_scheduler_by_epoch", "_optimizer")]
        )

    args = ex.parse_args(common + ["--loss", "margin", "--no-ps", "--shared-head", "--shared-size", "4",
                                   "--decorrelation-rho", "5", "--beta-lr", "0.002",
                                   "--decorrelation-lr", "0.0001"])  # fmt: skip
    models = ex.build_model(args)
    optimizers, _ = ex.build_optimizers(args, models, ex.build_loss(args, 5).loss_funcs)
    assert lr_and_decay(optimizers) == ({
        "trunk_optimizer": [0.001, 0.01], "embedder_optimizer": [0.001, 0.01],
        "metric_loss_0_optimizer": [0.002, 0.0], "metric_loss_1_optimizer": [0.002, 0.0],
        "decorrelation_loss_optimizer": [0.0001, 0.01],
    })  # fmt: skip


def test_build_loss_proxy_anchor_ps_defaults(ex):
    ps = ex.build_loss(ex.parse_args(["--device", "cpu"]), 7).loss_funcs["metric_loss"]
    assert (ps.mu, ps.exclude_parents, ps.detach_parent_proxies) == (0.25, True, True)
    assert (ps.alpha, ps.positive_divisor) == (0.4, "all")


def test_build_loss_passes_the_flags_on(ex):
    args = ex.parse_args([
        "--device", "cpu", "--proxy-anchor-alpha", "16", "--proxy-anchor-margin", "0.2",
        "--ps-alpha", "2", "--ps-mu", "0.5", "--ps-lam-per",
        "pair", "--ps-positive-divisor", "real", "--ps-exclude-parents",
        "--ps-detach-parent-proxies",
    ])  # fmt: skip
    setup = ex.build_loss(args, 7)
    assert setup.loss_weights == {"metric_loss": 1.0} and setup.mining_funcs == {}
    ps = setup.loss_funcs["metric_loss"]
    assert (ps.alpha, ps.mu, ps.pairing, ps.lam_per, ps.positive_divisor, ps.exclude_parents, ps.detach_parent_proxies) == (
        2.0, 0.5, "random", "pair", "real", True, True
    )  # fmt: skip
    inner = ps.loss
    assert isinstance(inner, losses.ProxyAnchorLoss)
    assert (inner.alpha, inner.margin, tuple(inner.proxies.shape)) == (
        16.0,
        0.2,
        (7, 512),
    )

    args = ex.parse_args([
        "--device", "cpu", "--loss", "margin", "--no-ps", "--shared-head",
        "--shared-weight", "0.7", "--shared-strategy", "full", "--shared-cutoff", "0.3",
    ])  # fmt: skip
    setup = ex.build_loss(args, 7)
    assert setup.loss_weights == {"metric_loss_0": 1.0, "metric_loss_1": 0.7}
    assert set(setup.mining_funcs) == {"tuple_miner_0", "tuple_miner_1"}
    assert isinstance(setup.mining_funcs["tuple_miner_0"], miners.DistanceWeightedMiner)
    shared = setup.mining_funcs["tuple_miner_1"]
    assert (shared.strategy, shared.cutoff) == ("full", 0.3)
    assert all(isinstance(f, losses.MarginLoss) for f in setup.loss_funcs.values())


def test_rng_state_round_trip(ex, tmp_path):
    """Saved (and read back with weights_only=True), then loaded: torch, numpy and
    python draw again what they drew after the save, and an MPerClassSampler gets
    back its class order."""
    sampler = samplers.MPerClassSampler(np.repeat(np.arange(6), 2), m=2, batch_size=4)
    saved_classes = [int(c) for c in sampler.labels]
    state = ex.RNGState(sampler).state_dict()
    torch.save(state, tmp_path / "rng.pth")

    def draws():
        return (torch.rand(3).tolist(), np.random.rand(3).tolist(),
                [random.random() for _ in range(3)])  # fmt: skip

    first = draws()
    list(iter(sampler))  # shuffles sampler.labels in place
    sampler.labels = sampler.labels[::-1]
    ex.RNGState(sampler).load_state_dict(
        torch.load(tmp_path / "rng.pth", weights_only=True)
    )
    assert draws() == first
    assert [int(c) for c in sampler.labels] == saved_classes


@pytest.mark.parametrize(
    "victim", ["rng_state_1.pth", "trunk_optimizer_1.pth", "metric_loss_1.pth"]
)
def test_check_checkpoint_names_every_missing_file(ex, tmp_path, victim):
    trunk, loss = torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)
    trainer = SimpleNamespace(
        models={"trunk": trunk}, loss_funcs={"metric_loss": loss},
        optimizers={"trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.1)},
    )  # fmt: skip
    hooks = HookContainer(None)
    ex.add_run_state(trainer, hooks)
    hooks.save_models(trainer, str(tmp_path), 1)
    ex.check_checkpoint(hooks, trainer, str(tmp_path))  # complete
    (tmp_path / victim).unlink()
    with pytest.raises(ex.SetupError, match=f"epoch 1 .* {victim} missing"):
        ex.check_checkpoint(hooks, trainer, str(tmp_path))


# ------------------------------------------- behaviour of the flags, one by one


def same_state(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_subsample_draws_distinct_images(ex):
    base = torch.utils.data.TensorDataset(torch.arange(20))
    base.labels = np.arange(20)
    for seed in range(30):
        sub = ex.subsample(base, 10, seed)
        assert len(set(sub.indices)) == 10
        assert sub.indices == sorted(sub.indices)
        np.testing.assert_array_equal(sub.labels, sub.indices)  # labels follow


def test_max_images_limit_their_own_split(ex, cub_root, tmp_path):
    def sizes(*flags):
        train, test = ex.build_datasets(ex.parse_args(small_cub(cub_root, tmp_path, *flags)))  # fmt: skip
        return len(train), len(test)

    assert sizes("--max-test-images", "5") == (24, 5)
    assert sizes("--max-train-images", "10") == (10, 24)


def test_global_batch_counts_every_process(ex, cub_root, tmp_path):
    """4 classes x m 2 = 8 images per class-balanced draw: enough for one process's
    batch of 6, not for 2 processes x 6."""
    flags = small_cub(cub_root, tmp_path, "--sampler", "m_per_class", "--m-per-class", "2", "--batch-size", "6")  # fmt: skip
    args = ex.parse_args(flags)
    ex.build_datasets(args)
    args.world_size = 2
    with pytest.raises(ex.SetupError, match="x 2 processes"):
        ex.build_datasets(args)


def test_class_count_is_the_largest_label_plus_one(ex):
    """Proxies are indexed by label: a subsample that misses a middle class still
    needs its proxy."""
    assert ex.count_classes(SimpleNamespace(labels=[0, 0, 3, 3])) == 4
    assert ex.count_classes(SimpleNamespace(labels=np.array([2, 0]))) == 3


def test_transforms_follow_the_flags(ex):
    from torchvision import transforms

    def of_type(pipeline, kind):
        return [t for t in pipeline.transforms if isinstance(t, kind)]

    train, test = ex.build_transforms(ex.parse_args(["--device", "cpu"]))
    assert [t.scale for t in of_type(train, transforms.RandomResizedCrop)] == [(0.08, 1.0)]  # fmt: skip
    assert of_type(train, transforms.RandomHorizontalFlip)
    (resize,) = of_type(test, transforms.Resize)
    assert resize.size in (256, [256])  # 224 x the test resize ratio 256 / 224
    flags = ["--device", "cpu", "--no-hflip", "--crop-scale", "0.5"]
    train, _ = ex.build_transforms(ex.parse_args(flags))
    assert not of_type(train, transforms.RandomHorizontalFlip)
    assert [t.scale for t in of_type(train, transforms.RandomResizedCrop)] == [(0.5, 1.0)]  # fmt: skip
    # glyphs on the small conv net: one grey channel; on a ResNet: RGB
    image = Image.new("L", (40, 40), 128)
    glyphs = ex.parse_args(["--dataset", "glyphs", "--device", "cpu"])
    train, test = ex.build_transforms(glyphs)
    assert train(image).shape == test(image).shape == (1, 32, 32)
    assert ex.build_trunk(glyphs)[0].features[0].in_channels == 1
    rgb = ex.parse_args(
        ["--dataset", "glyphs", "--device", "cpu", "--trunk", "resnet18"]
    )
    assert ex.build_transforms(rgb)[1](image).shape == (3, 32, 32)


def test_pooling_modes_by_hand(ex):
    x = torch.randn(2, 3, 4, 5)
    for mode, expected in [("avg", x.mean((2, 3))), ("max", x.amax((2, 3))),
                           ("avg+max", x.mean((2, 3)) + x.amax((2, 3)))]:  # fmt: skip
        torch.testing.assert_close(ex.GlobalPool(mode)(x), expected)
    # the ResNet trunk pools layer4's features as --pooling says
    flags = ["--device", "cpu", "--trunk", "resnet18", "--no-pretrained", "--pooling", "max"]  # fmt: skip
    torch.manual_seed(0)
    net, _ = ex.build_trunk(ex.parse_args(flags))
    net.eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        f = net.maxpool(net.relu(net.bn1(net.conv1(image))))
        f = net.layer4(net.layer3(net.layer2(net.layer1(f))))
        torch.testing.assert_close(net(image), f.amax((2, 3)))


@pytest.fixture
def trunk_states(ex, monkeypatch):
    """The trunk's state_dict at the start of training and after each epoch (epoch
    numbers), for every trainer the example builds."""
    states = []
    build_trainer = ex.build_trainer

    def recording(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        hook, train = trainer.end_of_epoch_hook, trainer.train

        def snapshot(tag):
            state = trainer.models["trunk"].state_dict()
            states.append((tag, {k: v.detach().clone() for k, v in state.items()}))

        def end_of_epoch(t):
            snapshot(t.epoch)
            return hook(t)

        def start(*a, **k):
            snapshot("start")
            return train(*a, **k)

        trainer.end_of_epoch_hook, trainer.train = end_of_epoch, start
        return trainer

    monkeypatch.setattr(ex, "build_trainer", recording)
    return states


def test_freeze_bn_keeps_the_trunks_batchnorm_statistics(ex, cub_root, tmp_path, trunk_states):  # fmt: skip
    for flag, frozen in (("--freeze-bn", True), ("--no-freeze-bn", False)):
        trunk_states.clear()
        assert ex.main(small_cub(cub_root, tmp_path / flag, flag)) == 0
        (_, start), (_, after) = trunk_states
        means = [k for k in start if k.endswith("running_mean")]
        assert means
        assert all(torch.equal(start[k], after[k]) for k in means) == frozen, flag


def test_warmup_freezes_the_trunk_for_its_epochs_also_after_resume(
    ex, cub_root, tmp_path, trunk_states, monkeypatch
):
    """--warmup-epochs 2 of 3: the trunk is frozen in epochs 1 and 2, also when a run
    killed in epoch 2 resumes there, and trains in epoch 3."""
    flags = small_cub(cub_root, tmp_path / "run", "--epochs", "3", "--warmup-epochs", "2")  # fmt: skip
    step = BaseTrainer.forward_and_backward
    calls = []

    def killed_in_epoch_2(trainer):  # 2 iterations per epoch
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        step(trainer)

    monkeypatch.setattr(BaseTrainer, "forward_and_backward", killed_in_epoch_2)
    assert ex.main(flags) == 130
    (_, start), (_, epoch_1) = trunk_states
    assert same_state(start, epoch_1)
    monkeypatch.setattr(BaseTrainer, "forward_and_backward", step)
    trunk_states.clear()
    assert ex.main(flags + ["--resume"]) == 0
    assert [tag for tag, _ in trunk_states] == ["start", 2, 3]
    (_, resumed), (_, epoch_2), (_, epoch_3) = trunk_states
    assert same_state(resumed, epoch_2)
    assert not same_state(epoch_2, epoch_3)


def test_distributed_sampler_gets_each_process_its_share(ex, monkeypatch):
    """40 images, 2 processes: 20 per process and epoch (one pass over the data)."""
    seen = {}

    def spy(labels, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(ex, "DistributedMPerClassSampler", spy)
    flags = ["--device", "cpu", "--sampler", "m_per_class", "--batch-size", "4", "--m-per-class", "2"]  # fmt: skip
    args = ex.parse_args(flags)
    args.world_size = 2
    ex.build_sampler(args, np.repeat(np.arange(10), 4))
    assert (seen["length_before_new_iter"], seen["m"], seen["batch_size"]) == (20, 2, 4)


def test_head_weightings_are_what_their_names_say(ex):
    """ "class" is the class head alone, "class_A_shared_B" the weights (A, B)."""
    for name, weights in ex.HEAD_WEIGHTINGS.items():
        if name == "class":
            assert weights == (1.0, 0.0)
        else:
            _, a, _, b = name.split("_")
            assert weights == (float(a), float(b)), name


def test_test_interval_and_patience(ex, cub_root, tmp_path, caplog):
    out = tmp_path / "interval"
    assert ex.main(small_cub(cub_root, out, "--epochs", "2", "--test-interval", "2")) == 0  # fmt: skip
    assert accuracy_epochs(out) == [2]
    # lr 1e-30: nothing moves, every epoch scores as the first (the best), so
    # --patience 1 stops after epoch 3 (3 - 1 > 1)
    out = tmp_path / "patience"
    flags = small_cub(cub_root, out, "--epochs", "5", "--patience", "1", "--lr", "1e-30")  # fmt: skip
    assert ex.main(flags) == 0
    assert accuracy_epochs(out) == [1, 2, 3]
    results = json.loads((out / "results.json").read_text())
    assert (results["epochs"], results["stopped_early"]) == (3, True)
    # resumed, a run that --patience stopped stays stopped (it trained one more
    # epoch per resume); with more patience it trains on
    with caplog.at_level(logging.INFO, logger="cub_proxyanchor"):
        assert ex.main(flags + ["--resume"]) == 0
    assert "nothing to train: the run stopped early at epoch 3" in caplog.text
    assert accuracy_epochs(out) == [1, 2, 3]
    assert json.loads((out / "results.json").read_text())["epochs"] == 3
    patient = [f if f != "1" or flags[i - 1] != "--patience" else "3"
               for i, f in enumerate(flags)]  # fmt: skip
    assert ex.main(patient + ["--resume"]) == 0
    assert accuracy_epochs(out) == [1, 2, 3, 4, 5]
    assert not json.loads((out / "results.json").read_text())["stopped_early"]


def test_overwrite_leaves_nothing_of_the_earlier_run(ex, cub_root, tmp_path):
    """No checkpoint of a later epoch (a --resume would load it), and no results of
    the earlier run when the new one fails."""
    out = tmp_path / "run"
    assert ex.main(small_cub(cub_root, out, "--epochs", "2")) == 0
    assert ex.main(small_cub(cub_root, out, "--overwrite")) == 0
    assert not [f for f in os.listdir(out / "models") if "_2." in f]
    victim = next((cub_root / "CUB_200_2011" / "images").glob("103.*/*.jpg"))
    victim.write_bytes(b"not a JPEG")  # the new run fails while testing
    assert ex.main(small_cub(cub_root, out, "--overwrite")) == 1
    assert not (out / "results.json").exists()


def test_resume_refuses_the_margin_and_decay_options_restored(ex, tmp_path):
    base = ["--device", "cpu", "--output-dir", str(tmp_path), "--shared-head",
            "--decorrelation-rho", "1", "--lr-decay-step", "5"]  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(vars(ex.parse_args(base))))
    for change in (["--beta-lr", "0.1"], ["--lr-decay-gamma", "0.1"],
                   ["--decorrelation-lr", "0.1"]):  # fmt: skip
        args = ex.parse_args(base + ["--resume"] + change)
        with pytest.raises(ex.SetupError, match=f"other option: {change[0]} "):
            ex._check_resumable(args)


def test_seed_decides_the_initial_weights(ex, cub_root, tmp_path):
    trunks = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert ex.main(small_cub(cub_root, tmp_path / name, "--seed", seed)) == 0
        trunks[name] = torch.load(tmp_path / name / "models" / "trunk_1.pth")
    assert same_state(trunks["a"], trunks["b"])
    assert not same_state(trunks["a"], trunks["c"])


def test_amp_on_cpu_trains_under_bfloat16_autocast(ex, cub_root, tmp_path, monkeypatch):  # fmt: skip
    built, entered = [], []
    build_trainer = ex.build_trainer
    autocast = torch.autocast

    class RecordingAutocast(autocast):
        def __init__(self, device_type, dtype=None, *args, **kwargs):
            entered.append((device_type, dtype))
            super().__init__(device_type, dtype, *args, **kwargs)

    monkeypatch.setattr(ex, "build_trainer", lambda *a, **k: built.append(build_trainer(*a, **k)) or built[-1])  # fmt: skip
    monkeypatch.setattr(torch, "autocast", RecordingAutocast)
    assert ex.main(small_cub(cub_root, tmp_path / "run", "--amp")) == 0
    (trainer,) = built
    assert (trainer.amp_dtype, trainer.grad_scaler) == (torch.bfloat16, None)
    assert ("cpu", torch.bfloat16) in entered


def test_loss_kwargs_and_the_decorrelation_weight(ex):
    args = ex.parse_args(["--device", "cpu", "--loss-kwargs", '{"margin": 0.3}'])
    assert ex.build_loss(args, 5).loss_funcs["metric_loss"].loss.margin == 0.3
    args = ex.parse_args(["--device", "cpu", "--shared-head", "--shared-size", "8",
                          "--decorrelation-rho", "2", "--embedding-size", "16"])  # fmt: skip
    assert ex.build_loss(args, 5).loss_weights == {
        "metric_loss_0": 1.0, "metric_loss_1": 0.3, "decorrelation_loss": 1.0
    }  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [["--shared-head", "--beta-lr", "0.001"], ["--crop-scale", "1"],
     ["--batch-size", "2"], ["--image-size", "16"],
     # a PS switch asked off without PS is off (accuracy.py's PS rows pass these, and
     # the notes' runs of a PS row with -- --no-ps)
     ["--no-ps", "--no-ps-exclude-parents", "--no-ps-detach-parent-proxies"]],
)  # fmt: skip
def test_boundary_values_are_accepted(ex, argv):
    ex.parse_args(["--device", "cpu", *argv])


def test_results_name_the_loss(ex, cub_root, tmp_path):
    for extra, loss in (([], "proxy_anchor + proxy synthesis"), (["--no-ps"], "proxy_anchor")):  # fmt: skip
        out = tmp_path / loss.replace(" ", "_")
        assert ex.main(small_cub(cub_root, out, *extra)) == 0
        assert json.loads((out / "results.json").read_text())["loss"] == loss
