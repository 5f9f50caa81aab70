import os

import pytest
import torch

# The Triton kernels run under Triton's interpreter only if TRITON_INTERPRET=1 is set before
# Triton is first imported, and importing mcompile imports Triton (through torch). So the
# interpreter tests run in a process of their own (test_triton_interpreter.py starts it with the
# variable set), never in the process that collects the rest of the suite.
INTERPRETER_PROCESS = "MCOMPILE_TRITON_INTERPRETER_PROCESS"
collect_ignore = [] if os.environ.get(INTERPRETER_PROCESS) == "1" else ["test_triton_kernels.py"]
SHARD = "MCOMPILE_TEST_SHARD"  # "i/n": this process runs every n-th collected test from the i-th


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
    from mcompile.tools.models import load_smollm2

    return load_smollm2()


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker gets one intra-op thread: two workers with two threads each on CI's two
    # cores oversubscribe them.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``long`` (minutes each on two CPU cores) run first: with ``-n 2`` each
    worker starts on one while the other tests fill the rest, instead of one of them starting
    last and running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: the rest keep their order
    shard = os.environ.get(SHARD)
    if shard:
        i, n = (int(x) for x in shard.split("/"))
        config.hook.pytest_deselected(items=[t for j, t in enumerate(items) if j % n != i])
        items[:] = [t for j, t in enumerate(items) if j % n == i]
