import os

import pytest

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The suite's models are tiny: one thread is fastest and keeps results bit-identical between the
# test process and the subprocesses it starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _progress_bars_not_quiet():
    """``train(..., quiet=True)`` silences progress bars for the rest of the process; each test starts loud."""
    yield
    from raft_diffusion.core import progress

    progress.set_quiet(False)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide state; a test that builds an Accelerator must not leak it."""
    yield
    try:
        from accelerate.state import AcceleratorState, GradientState
    except ImportError:
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
