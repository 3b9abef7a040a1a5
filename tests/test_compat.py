"""posttrain calls transformers by the current names; the old ones live only in posttrain/hf_compat.py.

The test configuration turns deprecation warnings into errors, but a few deprecations come from inside a
dependency (listed in pyproject.toml) and are ignored by message; this test keeps posttrain's own code from
hiding behind those ignores, and checks the shim on both sides of the rename.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from posttrain import hf_compat

PACKAGE = Path(hf_compat.__file__).parent
OLD_NAMES = re.compile(r"past_key_values|gradient_checkpointing_enable|is_gradient_checkpointing")


def test_no_deprecated_transformers_name_outside_the_shim():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "hf_compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if OLD_NAMES.search(line)
    ]
    assert not offenders, "call through posttrain.hf_compat instead:\n" + "\n".join(offenders)


class OldModel(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return {"past_key_values": past_key_values}


class NewModel(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return {"cache": cache}


class Wrapper(torch.nn.Module):  # as DDP: the model is `.module`, forward takes anything
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("model, name", [(OldModel(), "past_key_values"), (NewModel(), "cache")])
def test_the_cache_goes_by_the_name_the_model_takes(model, name):
    marker = object()
    assert hf_compat.cache_inputs(model, marker) == {name: marker}
    assert hf_compat.cache_inputs(Wrapper(model), marker) == {name: marker}
    out = Wrapper(model)(input_ids=None, **hf_compat.cache_inputs(model, marker))
    assert hf_compat.output_cache(out) is marker


def test_checkpointing_by_either_name():
    calls = []

    class Old(torch.nn.Module):
        is_gradient_checkpointing = True

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("old", gradient_checkpointing_kwargs))

    class New(torch.nn.Module):
        is_activation_checkpointing = False

        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            calls.append(("new", activation_checkpointing_kwargs))

    hf_compat.enable_activation_checkpointing(Old())
    hf_compat.enable_activation_checkpointing(New())
    assert calls == [("old", {"use_reentrant": False}), ("new", {"use_reentrant": False})]
    assert hf_compat.is_activation_checkpointing(Wrapper(Old())) is True
    assert hf_compat.is_activation_checkpointing(New()) is False
    assert hf_compat.is_activation_checkpointing(torch.nn.Linear(1, 1)) is False
