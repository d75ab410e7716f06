"""--init-from (impls/init_from.py): a run starts from a finished run's weights — from its training
state or its record with the state beside it — at exactly the source's loss, with the source's
hash in its record; sources that do not fit are refused before any work."""
import hashlib
import json

import pytest

from impls import cli, train
from impls.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(model="nano", batch_size=4, seq_len=32, eval_batches=2, timing_warmup=0)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished 3-step run: its record and, beside it, its final training state."""
    folder = tmp_path_factory.mktemp("source")
    out = folder / "base.json"
    record = train.run(train.Recipe(**SMALL, steps=3), save_every=10 ** 6, checkpoint=out.with_suffix(".state.pt"))
    train.write_record(record, out)
    return out, json.loads(out.read_text())


def test_run_from_a_record_starts_at_its_loss_and_records_the_hash(source):
    path, base = source
    record = train.run(train.Recipe(**SMALL, steps=1, init_from=str(path)))
    # the same weights, the same validation batches: exactly the source's last loss
    assert record["curve"][0]["val_loss"] == base["final_val_loss"]
    block = record["init_from"]
    state = path.with_suffix(".state.pt")
    assert block["sha256"] == hashlib.sha256(state.read_bytes()).hexdigest()
    assert block["record_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert block["weights_path"] == str(state) and block["path"] == str(path)
    assert block["source_label"] == base["label"] and block["source_git_commit"] == base["git_commit"]
    assert block["step"] == base["steps_done"] == 3
    assert block["source_final_val_loss"] == base["final_val_loss"]
    assert record["recipe"]["init_from"] == str(path)


def test_run_from_a_training_state_starts_at_its_loss(source):
    path, base = source
    record = train.run(train.Recipe(**SMALL, steps=1, init_from=str(path.with_suffix(".state.pt"))))
    assert record["curve"][0]["val_loss"] == base["final_val_loss"]
    assert record["init_from"]["record_sha256"] is None
    assert record["init_from"]["source_final_val_loss"] == base["final_val_loss"]


def test_without_init_from_the_record_says_none():
    record = train.run(train.Recipe(**SMALL, steps=1))
    assert record["init_from"] is None


@pytest.mark.parametrize("change, message", [
    (dict(model_args={"n_layer": 3}), "model_args"),
    (dict(model="micro"), "model 'nano'"),
    (dict(data="synthetic:vocab=128"), "shape"),
])
def test_a_source_of_another_model_is_refused_before_any_work(source, change, message):
    path, _ = source
    with pytest.raises(ConfigError, match=message):
        train.validate(train.Recipe(**{**SMALL, **change}, steps=1, init_from=str(path)))


def test_a_source_of_another_structure_is_refused(tmp_path):
    out = tmp_path / "lowrank.json"
    record = train.run(train.Recipe(**SMALL, steps=1, techniques=["lowrank:rank=4"]), save_every=10 ** 6,
                       checkpoint=out.with_suffix(".state.pt"))
    train.write_record(record, out)
    with pytest.raises(ConfigError, match="another module structure.*lowrank:rank=4"):
        train.validate(train.Recipe(**SMALL, steps=1, init_from=str(out)))


def test_missing_corrupt_and_unmatched_sources_are_one_line_errors(source, tmp_path):
    path, base = source
    cases = {}
    cases["does not exist"] = tmp_path / "nope.state.pt"
    corrupt = tmp_path / "corrupt.state.pt"
    corrupt.write_bytes(path.with_suffix(".state.pt").read_bytes()[:5000])
    cases["corrupt"] = corrupt
    alone = tmp_path / "alone.json"  # a record with no state beside it
    alone.write_text(path.read_text())
    cases["not beside it"] = alone
    later = tmp_path / "later.json"  # a record whose run went on after the state was saved
    later.write_text(json.dumps({**base, "steps_done": 5}))
    (tmp_path / "later.state.pt").write_bytes(path.with_suffix(".state.pt").read_bytes())
    cases["is from step 3, the record ends at step 5"] = later
    for expected, bad in cases.items():
        with pytest.raises(ConfigError) as e:
            train.validate(train.Recipe(**SMALL, steps=1, init_from=str(bad)))
        assert "\n" not in str(e.value)
        assert expected in str(e.value), (expected, str(e.value))


def test_cli_exits_2_before_any_work(source, tmp_path, capsys):
    out = tmp_path / "never.json"
    assert cli.main(["run", "--model", "nano", "--steps", "1", "--init-from", str(tmp_path / "x.json"),
                     "--out", str(out)]) == 2
    assert not out.exists()
    assert "init_from" in capsys.readouterr().err


def test_pruning_after_training_ranks_the_trained_weights(source):
    """Structured pruning of a run started --init-from prunes the *trained* weights: the kept MLP
    rows are exactly the source's rows at the recorded indices, not rows of a fresh init."""
    import torch

    from impls import init_from as init_lib

    path, _ = source
    spec = ["prune_structured:heads=0,neurons=0.5"]
    session = train.prepare(train.Recipe(**SMALL, steps=1, init_from=str(path), techniques=spec))
    fresh = train.prepare(train.Recipe(**SMALL, steps=1, techniques=spec))
    up = init_lib.read(path).weights["blocks.0.mlp.up.weight"]  # (d_ff, d_model) of the trained source
    kept_rows = session.build.notes["prune_structured"]["kept_neurons"]["blocks.0.mlp"]
    kept = session.model.blocks[0].mlp.up.weight.detach()
    assert kept.shape[0] == up.shape[0] // 2 == len(kept_rows)
    assert torch.equal(kept, up[kept_rows])
    assert not torch.equal(fresh.model.blocks[0].mlp.up.weight.detach(), kept)


def test_pipeline_stages_are_refused_before_any_work(source):
    path, _ = source
    with pytest.raises(ConfigError, match="pipeline stages"):
        train.validate(train.Recipe(**SMALL, steps=1, init_from=str(path), mesh={"pp": 2},
                                    techniques=["pp:schedule=gpipe,microbatches=2"]), world_size=2)
