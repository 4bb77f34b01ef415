"""Shared test set-up: Keras runs on the torch backend (no TensorFlow); few threads on 2 cores."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist's workers share the cores: one thread each when there are as many workers as
# cores, so two workers' OpenMP teams do not wait on each other's preempted threads.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, (os.cpu_count() or 1) // _workers))
torch.set_num_threads(_threads)
if _workers > 1:  # the commands the tests run as processes, likewise
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
if torch.cuda.is_available():  # the equivalence tests compare in true fp32: no TF32 on a GPU
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
