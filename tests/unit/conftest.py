"""Shared fixtures for the CPU unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them around each test that builds an Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:
        AcceleratorState._reset_state(True)  # also resets PartialState
        GradientState._reset_state()

    reset()
    yield
    reset()
