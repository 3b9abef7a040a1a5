import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)


import pytest  # noqa: E402
from chatml import chatml_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def bpe_chat():
    """A BPE tokenizer trained in the tests, with a ChatML template (tests/chatml.py)."""
    return chatml_tokenizer()
