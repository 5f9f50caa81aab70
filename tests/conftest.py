import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts with no compiled frames and zeroed counters."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct with real weights (fp32, CPU), loaded once."""
    from mcompile.models import load_smollm2

    return load_smollm2()
