"""Fault injection shared by the engine tests."""

from __future__ import annotations

import pytest

from engine.engine import BatchError, Engine


def step_with_a_failing_forward(engine: Engine) -> BatchError:
    """Run one engine step whose forward raises, and return the BatchError the step ends with."""
    run = engine.runner.run

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected")

    engine.runner.run = boom
    try:
        with pytest.raises(BatchError) as info:
            engine.step()
    finally:
        engine.runner.run = run
    return info.value
