import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)


import pytest  # noqa: E402
from chatml import chatml_tokenizer  # noqa: E402

import posttrain.sandbox as _sandbox  # noqa: E402

if _sandbox.unavailable():
    # Code rewards and agent tools in the tests then run on the weak backend; the tests of the OS-level
    # backend itself skip and say why (test_sandbox*.py).
    os.environ["POSTTRAIN_SANDBOX_BACKEND"] = "process"
    _sandbox.configure("process")


@pytest.fixture(scope="session")
def bpe_chat():
    """A BPE tokenizer trained in the tests, with a ChatML template (tests/chatml.py)."""
    return chatml_tokenizer()


@pytest.fixture(params=["bwrap", "process"])
def backend(request):
    """Each sandbox backend in turn (test_sandbox*.py): the OS-level one skips, saying why, where it cannot run."""
    if request.param == "bwrap" and _sandbox.unavailable():
        pytest.skip(f"no OS-level backend here: {_sandbox.unavailable()}")
    return request.param
