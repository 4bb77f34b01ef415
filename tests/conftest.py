"""Shared test set-up: Keras runs on the torch backend (no TensorFlow); few threads on 2 cores."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
if torch.cuda.is_available():  # the equivalence tests compare in true fp32: no TF32 on a GPU
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
