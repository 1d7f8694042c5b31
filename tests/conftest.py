"""A test must leave torch's global modes as it found them: autocast left on (as a
patched ``torch.is_autocast_enabled`` around ``torch.autocast`` once did), grad mode or
the default dtype would silently change every test that runs after it."""

import pytest
import torch


def _global_modes() -> tuple:
    return (
        torch.is_autocast_enabled("cpu"),
        torch.is_autocast_enabled("cuda"),
        torch.is_grad_enabled(),
        torch.get_default_dtype(),
    )


@pytest.fixture(autouse=True)
def global_modes_unchanged():
    before = _global_modes()
    yield
    assert _global_modes() == before, "the test changed torch's global modes"
