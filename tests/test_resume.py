"""Training-state checkpoint/resume: a killed run resumed from its checkpoint ends bit-identical."""
import os
import subprocess
import sys

import pytest
import torch

from impls.engines import TorchEngine
from impls import train
from impls.errors import ConfigError

RECIPE = dict(model="nano", batch_size=4, seq_len=32, eval_batches=2, timing_warmup=1, lr=3e-3, steps=12,
              eval_every=3)


class Killed(Exception):
    pass


def _run_killed_after(step_k, monkeypatch, **kwargs):
    """Run until ``step_k`` optimizer steps are done, then die as a killed process would."""
    original = TorchEngine.train_step

    def train_step(self, x, y, step):
        if step == step_k:
            raise Killed
        return original(self, x, y, step)

    with monkeypatch.context() as m:
        m.setattr(TorchEngine, "train_step", train_step)
        with pytest.raises(Killed):
            train.run(train.Recipe(**RECIPE, **kwargs.pop("recipe", {})), **kwargs)


@pytest.mark.parametrize("techniques", [[], ["fp16"]])
def test_killed_and_resumed_run_is_bit_identical(tmp_path, monkeypatch, techniques):
    straight = train.run(train.Recipe(**RECIPE, techniques=techniques))
    state = tmp_path / "run.state.pt"
    # Killed after step 7: the last checkpoint (every 2 steps) holds step 6.
    _run_killed_after(7, monkeypatch, recipe=dict(techniques=techniques), save_every=2, checkpoint=state)
    resumed = train.run(train.Recipe(**RECIPE, techniques=techniques), resume=state)
    assert resumed["resumed_from_step"] == 6
    assert resumed["curve"] == straight["curve"]  # every loss, bit for bit


def test_checkpoint_holds_model_optimizer_scaler_and_rng(tmp_path):
    state = tmp_path / "s.pt"
    train.run(train.Recipe(**RECIPE, techniques=["fp16"]), save_every=12, checkpoint=state)
    loaded = train.training_state.load(state, train.Recipe(**RECIPE, techniques=["fp16"]), world_size=1)
    assert loaded["step"] == 12
    assert set(loaded["engine"]) == {"model", "optimizer", "scaler"}
    assert loaded["engine"]["scaler"]["scale"] > 0
    assert set(loaded["rng"]) >= {"torch", "numpy", "python"}


def test_a_mismatched_checkpoint_is_refused_naming_the_fields(tmp_path):
    state = tmp_path / "s.pt"
    train.run(train.Recipe(**RECIPE), save_every=6, checkpoint=state)
    other = train.Recipe(**{**RECIPE, "lr": 1e-3, "seed": 5})
    with pytest.raises(ConfigError, match=r"different recipe \(lr: 0.003 vs 0.001, seed: 0 vs 5\)"):
        train.run(other, resume=state)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "tampered"])
def test_a_corrupt_checkpoint_is_refused(tmp_path, damage):
    state = tmp_path / "s.pt"
    train.run(train.Recipe(**RECIPE), save_every=6, checkpoint=state)
    data = state.read_bytes()
    if damage == "garbage":
        state.write_bytes(b"not a checkpoint at all")
    elif damage == "truncated":
        state.write_bytes(data[: len(data) // 2])
    else:  # a valid container whose payload no longer matches its hash
        outer = torch.load(state, weights_only=False)
        payload = bytearray(outer["payload"])
        payload[len(payload) // 2] ^= 0xFF
        torch.save({**outer, "payload": bytes(payload)}, state)
    with pytest.raises(ConfigError, match=r"corrupt|not an etbench"):
        train.run(train.Recipe(**RECIPE), resume=state)


def test_cli_save_and_resume_flags(tmp_path):
    out = tmp_path / "run.json"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    base = [sys.executable, "-m", "impls.cli", "run", "--model", "nano", "--batch-size", "2", "--seq-len", "16",
            "--eval-batches", "1", "--steps", "4"]
    done = subprocess.run([*base, "--save-every", "2", "--out", str(out)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run.state.pt").exists()
    bad = subprocess.run([*base, "--lr", "0.5", "--resume", str(tmp_path / "run.state.pt")], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and "different recipe (lr: 0.001 vs 0.5)" in bad.stderr
    missing = subprocess.run([*base, "--resume", str(tmp_path / "nope.pt")], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
