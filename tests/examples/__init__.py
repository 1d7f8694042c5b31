import importlib.util
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cub_proxyanchor.py"


def load_example():
    """examples/cub_proxyanchor.py as the module ``cub_proxyanchor``."""
    spec = importlib.util.spec_from_file_location("cub_proxyanchor", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cub_proxyanchor"] = module
    spec.loader.exec_module(module)
    return module
