import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as the module ``<name>_benchmark``. The benchmarks folder is
    importable while it loads (cost.py imports accuracy.py from beside it), and
    OMP_WAIT_POLICY, which cost.py sets for its own process, is left as it was."""
    saved = os.environ.get("OMP_WAIT_POLICY")
    spec = importlib.util.spec_from_file_location(
        f"{name}_benchmark", BENCHMARKS / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = saved
    return module
