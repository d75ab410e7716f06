"""Checkpoint and resume of sharded training through the one training loop (``train.run``):
every rank's shard is gathered into the one atomic training-state file, each rank gets its own
back, and the resumed run ends bit-identical to an uninterrupted one at the same world size."""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch

pytestmark = pytest.mark.slow

RECIPE = dict(model="nano", batch_size=2, seq_len=16, steps=4, eval_batches=1, eval_every=1, device="cpu")


class _Stop(Exception):
    """Raised right after the first checkpoint: the run is 'killed' there."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, world: int, folder: str, technique: str, mode: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from impls import dist, train, training_state

    recipe = train.Recipe(**RECIPE, techniques=[technique])
    state = os.path.join(folder, "state.pt")
    record = None
    if mode == "straight":
        record = train.run(recipe)
    elif mode == "killed":
        save = training_state.save

        def save_then_stop(*args, **kwargs):
            save(*args, **kwargs)
            raise _Stop

        training_state.save = save_then_stop
        try:
            train.run(recipe, save_every=2, checkpoint=state)
        except _Stop:
            pass
    else:
        record = train.run(recipe, resume=state)
    if record is not None and rank == 0:
        torch.save(dict(curve=record["curve"], params=record["memory"], global_batch=record["global_batch"],
                        tokens_per_step=record["tokens_per_step"]), os.path.join(folder, f"{mode}.pt"))
    dist.shutdown()


def _launch(world: int, folder, technique: str, mode: str):
    ranks = torch.multiprocessing.start_processes(_rank, args=(_free_port(), world, str(folder), technique, mode),
                                                  nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"{technique} {mode}: ranks did not finish within 240 s")


@pytest.mark.parametrize("technique", ["zero:stage=2", "zero:stage=3", "fsdp", "zero-redundancy", "oss"])
def test_a_sharded_run_resumes_bit_identically(tmp_path, technique):
    _launch(2, tmp_path, technique, "straight")
    _launch(2, tmp_path, technique, "killed")
    from impls import training_state

    saved = torch.load(tmp_path / "state.pt", weights_only=False)
    payload = torch.load(__import__("io").BytesIO(saved["payload"]), weights_only=False)
    assert payload["step"] == 2 and payload["engine_sharded"] is True
    assert len(payload["engine"]) == 2  # one shard per rank, in the one file
    assert training_state.engine_state(payload, 1) is payload["engine"][1]
    _launch(2, tmp_path, technique, "resumed")
    straight, resumed = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert [p["val_loss"] for p in resumed["curve"]] == [p["val_loss"] for p in straight["curve"]], technique
    assert [p["train_loss"] for p in resumed["curve"]] == [p["train_loss"] for p in straight["curve"]], technique
    # the global batch over both replicas, as --lr-scaling sees it
    assert straight["global_batch"] == RECIPE["batch_size"] * 2
    assert straight["tokens_per_step"] == straight["global_batch"] * RECIPE["seq_len"]


def test_resuming_a_sharded_state_at_another_world_size_is_refused(tmp_path):
    _launch(2, tmp_path, "zero:stage=1", "killed")
    from impls import train, training_state
    from impls.errors import ConfigError

    with pytest.raises(ConfigError, match=r"written with world_size 2, this run has 1; resume with --nproc 2"):
        training_state.load(tmp_path / "state.pt", train.Recipe(**RECIPE, techniques=["zero:stage=1"]), 1)
