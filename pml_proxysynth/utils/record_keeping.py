"""Record keeper and HookContainer that never silently skip evaluation and saving.

PML's ``logging_presets.get_record_keeper`` returns ``(None, None, None)`` when tensorboard
is not installed, and ``get_hook_container(None)`` then returns an ``EmptyContainer``
whose epoch hook does nothing: training runs without evaluation or checkpoints and
without an error. These helpers always build a real ``record_keeper.RecordKeeper`` (CSV
files and an SQLite ``logs.db``), add tensorboard only when it is importable, and refuse
to build hooks without a record keeper.
"""

import json
import logging
import os
from typing import NamedTuple, Optional, Tuple

import record_keeper
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils.logging_presets import HookContainer
from record_keeper.utils import hash_if_too_long

logger = logging.getLogger(__name__)


class RecordKeeping(NamedTuple):
    """What ``build_record_keeper`` returns (the record writer holds the CSV/SQLite files)."""

    record_keeper: object
    record_writer: object
    tensorboard_writer: Optional[object]


class SafeRecordKeeper(record_keeper.RecordKeeper):
    """``RecordKeeper`` whose record groups are always valid SQLite table names.

    PML's ``HookContainer`` records the losses recursively, so a loss holding an
    ``nn.Sequential`` yields groups named after its numbered children ("0_Linear_...");
    such names start with a digit, which SQLite rejects when the records are saved.
    They are prefixed with "module_", and the renaming goes into ``hash_map``, where
    ``HookContainer`` looks up the table of a group name (as for a hashed long name):
    otherwise a ``record_group_name_prefix`` starting with a digit would hide the
    accuracy table, and the hooks would find no best epoch and no history.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the table names given so far in this folder (saved by save_records), so that
        # a new process, e.g. a resumed run, finds renamed and hashed tables as well
        folder = getattr(self.record_writer, "folder", None)
        saved = os.path.join(folder, "hash_map.json") if folder else None
        if saved and os.path.isfile(saved):
            with open(saved) as f:
                self.hash_map.update(json.load(f))

    def append_primitive(self, group, series, value, global_iteration):
        if not group[:1].isdigit():
            return super().append_primitive(group, series, value, global_iteration)
        safe = "module_" + group
        super().append_primitive(safe, series, value, global_iteration)
        self.hash_map[hash_if_too_long(safe)] = group


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` (and so tensorboard) can be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def build_record_keeper(
    csv_folder: str,
    tensorboard_folder: Optional[str] = None,
    require_tensorboard: bool = False,
    **record_writer_kwargs,
) -> RecordKeeping:
    """Builds a ``RecordKeeper`` writing CSV + SQLite to ``csv_folder``.

    Tensorboard event files go to ``tensorboard_folder`` when it is given and tensorboard
    is installed; without tensorboard a warning is logged and records are still written
    (unless ``require_tensorboard``, which raises ``ImportError`` instead).
    ``record_writer_kwargs`` go to ``record_keeper.RecordWriter`` (``global_db_path``,
    ``experiment_name``, ``is_new_experiment``, ``save_lists``).
    """
    record_writer = record_keeper.RecordWriter(
        folder=csv_folder, **record_writer_kwargs
    )
    tensorboard_writer = None
    if tensorboard_folder is not None:
        if tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            tensorboard_writer = SummaryWriter(log_dir=tensorboard_folder)
        elif require_tensorboard:
            raise ImportError("tensorboard is not installed: pip install tensorboard")
        else:
            logger.warning(
                "tensorboard is not installed: records go to CSV and SQLite in %s only "
                "(pip install tensorboard for tensorboard logs)",
                csv_folder,
            )
    keeper = SafeRecordKeeper(
        tensorboard_writer=tensorboard_writer,
        record_writer=record_writer,
        attributes_to_search_for=c_f.list_of_recordable_attributes_list_names(),
    )
    return RecordKeeping(keeper, record_writer, tensorboard_writer)


def build_hook_container(record_keeper, **kwargs) -> HookContainer:
    """PML's ``HookContainer`` for ``record_keeper``; raises instead of an empty container.

    ``kwargs`` go to ``HookContainer`` (``primary_metric``, ``validation_split_name``,
    ``save_models``, ``log_freq``, ``record_group_name_prefix``).
    """
    if record_keeper is None:
        raise ValueError(
            "record_keeper is None: without it PML's hooks would skip evaluation and "
            "model saving. Build one with build_record_keeper()."
        )
    return HookContainer(record_keeper, **kwargs)


def build_hooks(
    output_dir: str, tensorboard: bool = True, **hook_kwargs
) -> Tuple[HookContainer, RecordKeeping]:
    """Record keeper + hooks for a run in ``output_dir``.

    Records go to ``<output_dir>/records`` (CSV, ``logs.db``), tensorboard logs to
    ``<output_dir>/tensorboard`` when ``tensorboard`` is True and it is installed.
    """
    keeping = build_record_keeper(
        os.path.join(output_dir, "records"),
        os.path.join(output_dir, "tensorboard") if tensorboard else None,
    )
    return build_hook_container(keeping.record_keeper, **hook_kwargs), keeping
