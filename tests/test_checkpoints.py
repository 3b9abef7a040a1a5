"""Checkpoints that can be trusted: none saved during a non-finite streak and the one holding the weights it
began from set aside, so the error's "last checkpoint" resumes; hashes in the COMPLETE marker, a corrupted
checkpoint named with its file and the previous complete one used; a full disk a clear error."""

import errno
import json

import pytest
import torch
from test_loop import Squares, flat, run_loop

from posttrain.engine.run import read_metrics
from posttrain.errors import TrainingError


def ckpts(run_dir, marker="COMPLETE"):
    return sorted(
        int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob(f"step-*/{marker}")
    )


def test_no_checkpoint_during_a_nonfinite_streak_and_the_named_one_resumes(tmp_path):
    # the 6th step and every one after it are NaN (the toy's counter reads 5 there); 5 updates done
    with pytest.raises(TrainingError) as err:
        run_loop(tmp_path, objective=Squares(nan_at=range(5, 100)), save_every=1, keep_checkpoints=3,
                 max_nonfinite_steps=2)  # fmt: skip
    message = str(err.value)
    # step-5 holds the weights the streak began from; steps 6-8 were never saved
    assert "Last checkpoint saved before the streak: " in message and message.count("step-4") == 1
    assert "step-5 held the weights the streak began from: marked DIVERGED" in message
    assert ckpts(tmp_path) == [3, 4] and ckpts(tmp_path, "DIVERGED") == [5]
    res, net = run_loop(tmp_path, resume=True, save_every=1, lr=0.01)  # continues from step-4
    assert res.step == 12 and torch.isfinite(flat(net)).all()
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 13))


def test_a_corrupted_checkpoint_is_named_and_the_previous_one_used(tmp_path, capsys):
    _, whole = run_loop(tmp_path / "whole", dropout=0.0)
    run_loop(tmp_path / "cut", dropout=0.0, save_every=4)  # keeps step-8 and step-12
    marker = json.loads((tmp_path / "cut" / "checkpoints" / "step-12" / "COMPLETE").read_text())
    assert marker["step"] == 12 and any(name.endswith(".safetensors") for name in marker["sha256"])
    weights = next((tmp_path / "cut" / "checkpoints" / "step-12").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8  # bit rot in the weights
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    res, resumed = run_loop(tmp_path / "cut", dropout=0.0, resume=True, save_every=4)
    out = capsys.readouterr().out
    assert f"checkpoint step-12 is corrupted: {weights} does not match its sha256" in out
    assert "resumed from" in out and "step-8 (step 8)" in out
    again = tmp_path / "cut" / "checkpoints" / "step-12"
    assert res.step == 12 and (again / "COMPLETE").exists() and not (again / "CORRUPT").exists()  # saved anew
    torch.testing.assert_close(flat(whole), flat(resumed), rtol=0, atol=0)


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    run_loop(tmp_path, save_every=6, max_steps=6)
    (next((tmp_path / "checkpoints" / "step-6").glob("*.safetensors"))).unlink()
    with pytest.raises(TrainingError, match=r"(?s)no usable checkpoint.*step-6: .*safetensors is missing"):
        run_loop(tmp_path, resume=True)


def test_a_full_disk_while_checkpointing_is_a_clear_error(tmp_path, monkeypatch):
    from accelerate import Accelerator

    real = Accelerator.save_state

    def full(self, output_dir=None, **kw):
        real(self, output_dir, **kw)
        with open("/dev/full", "wb") as f:  # the kernel's own ENOSPC
            f.write(b"x" * 65536)
            f.flush()

    run_loop(tmp_path, save_every=3, max_steps=3)
    monkeypatch.setattr(Accelerator, "save_state", full)
    with pytest.raises(TrainingError, match=r"step 6: disk full while saving checkpoint .*step-6.*step-3"):
        run_loop(tmp_path, resume=True, save_every=3, max_steps=6)
    assert not (tmp_path / "checkpoints" / "step-6").exists() and ckpts(tmp_path) == [3]
    assert errno.ENOSPC  # what /dev/full raises
