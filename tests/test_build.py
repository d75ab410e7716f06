"""The build: stages in one order, composition through real modules, loss terms, frozen modules,
hooks, DDP as a wrap technique, meta-device initialisation, the mesh."""
import itertools
import os
import re
import socket
import time
import types
from pathlib import Path

import pytest
import torch

from conftest import build_run
from impls import techniques, train, zoo
from impls.build import Frozen
from impls.engines import Engine, TorchEngine
from impls.errors import ConfigError
from impls.loss import lm_loss, target_count
from impls.parallel import ParallelDims
from impls.techniques import mod, moe

IMPLS = Path(__file__).resolve().parents[1] / "impls"


def _run_step(build, x, y):
    """Logits and gradients of one training step's loss (LM loss + loss terms) on ``build``."""
    engine = TorchEngine(build, train.Recipe(), total_steps=1)
    loss = engine.forward_backward(x, y)
    grads = {n: p.grad.clone() for n, p in build.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


STACK = ["moe", "fuse:mode=jit", "attention:kind=local,window=16", "mod:causal=aux_loss", "checkpoint"]


def test_technique_order_never_changes_the_result(one_thread):
    """Every permutation of five techniques (four of them in the same stage) gives bit-identical
    weights, losses and gradients."""
    torch.manual_seed(1)
    x = torch.randint(0, 256, (2, 32))
    y = torch.randint(0, 256, (2, 32))
    reference = None
    for perm in itertools.permutations(STACK):
        build = build_run("nano", list(perm), seed=0, n_layer=4)
        state = build.model.state_dict()
        loss, grads = _run_step(build, x, y)
        got = (state, loss, grads, [t.name for t in build.loss_terms])
        if reference is None:
            reference = got
            continue
        assert got[3] == reference[3], perm
        assert torch.equal(got[1], reference[1]), perm
        assert state.keys() == reference[0].keys()
        assert all(torch.equal(state[k], reference[0][k]) for k in state), perm
        assert all(torch.equal(grads[k], reference[2][k]) for k in grads), perm


def test_the_stack_composes_through_real_modules():
    build = build_run("nano", STACK, n_layer=4)
    model = build.model
    routed = model.blocks[1]  # checkpointed (hooks) mod ∘ (block with a fused-expert MoE MLP, local attention)
    assert isinstance(routed, mod.RoutedBlock) and routed._forward_pre_hooks
    assert isinstance(routed.block.mlp, moe.MoEMLP)
    assert all(type(e).__name__ == "FusedGeluMLP" for e in routed.block.mlp.experts)
    assert type(model.blocks[0].mlp).__name__ == "FusedGeluMLP"
    assert [t.name for t in build.loss_terms] == ["moe", "mod"]


def test_mod_and_moe_compose_into_staged_mode():
    """``mod`` + ``moe`` is staged MoDE: MoD routing around blocks whose MLP is a MoE.  With the
    same options it is exactly ``mode:kind=staged`` (same weights, same loss)."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 64))
    staged = build_run("nano", ["mode:kind=staged"], n_layer=4)
    for order in (["mod", "moe"], ["moe", "mod"]):
        both = build_run("nano", order, n_layer=4)
        a, b = both.model.state_dict(), staged.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(both.model(x), staged.model(x))
        assert [t.name for t in both.loss_terms] == ["moe", "mod"]


def test_no_class_swap_or_instance_forward_replacement_in_impls():
    offenders = []
    pattern = re.compile(r"\.__class__\s*=[^=]|\.forward\s*=[^=]|types\.MethodType")
    for path in IMPLS.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(IMPLS)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_loss_terms_train_but_never_evaluate():
    """The aux loss is in the training loss (token-weighted) and absent from evaluation."""
    torch.manual_seed(0)
    build = build_run("nano", ["mod:causal=aux_loss,aux_weight=0.5"], n_layer=4)
    engine = TorchEngine(build, train.Recipe(), total_steps=1)
    x = torch.randint(0, 256, (4, 64))
    y = torch.randint(0, 256, (4, 64))
    y[0, :10] = zoo.IGNORE_INDEX
    trained = engine.forward_backward(x, y)
    aux = sum(mod.aux_losses(build.model).values())
    with torch.no_grad():
        plain = lm_loss(build.model(x), y)
    torch.testing.assert_close(trained, plain + 0.5 * aux.detach())
    assert engine.eval_loss(x, y) == pytest.approx(plain.item(), rel=1e-6)


# --------------------------------------------------------------------------- frozen modules


def _teacher_technique(calls: list | None = None):
    """A test technique: a frozen teacher (a nano model) and a distillation-style loss term
    KL(teacher ‖ student) per target token."""

    def apply(build, options):
        torch.manual_seed(123)
        teacher = build.freeze("teacher", zoo.build("nano", vocab_size=build.model.cfg.vocab_size))

        def kl(out):
            with torch.no_grad():
                t = teacher(out.inputs).float().log_softmax(-1)
            s = out.logits.float().log_softmax(-1)
            per_token = torch.nn.functional.kl_div(s, t, log_target=True, reduction="none").sum(-1)
            mask = out.targets != zoo.IGNORE_INDEX
            return (per_token * mask).sum() / target_count(out.targets).clamp(min=1)

        build.add_loss_term("distill", options["weight"], kl)

    return types.SimpleNamespace(NAME="teacher_probe", STAGE="surgery", OPTIONS={"weight": 0.5}, apply=apply,
                                 __name__="teacher_probe")


def test_a_frozen_module_is_outside_the_optimizer_and_mfu_but_in_hfu_and_its_own_memory(monkeypatch, one_thread):
    monkeypatch.setitem(techniques.REGISTRY, "teacher_probe", techniques.Technique.of(_teacher_technique()))
    common = dict(model="nano", steps=3, batch_size=4, seq_len=32, eval_batches=1, device="cpu")
    plain = train.run(train.Recipe(**common))
    record = train.run(train.Recipe(**common, techniques=["teacher_probe"]))
    teacher = zoo.build("nano", device="meta", vocab_size=record["dataset"]["vocab_size"])
    teacher_bytes = sum(p.numel() * 4 for p in teacher.parameters())  # tied: parameters() dedups
    assert record["memory"]["frozen_bytes"] == teacher_bytes
    assert record["memory"]["params_bytes"] == plain["memory"]["params_bytes"]
    assert record["memory"]["optimizer_bytes"] == plain["memory"]["optimizer_bytes"]  # not in the optimizer
    # HFU counts the teacher's forward; MFU's model FLOPs do not.
    assert record["frozen_flops_per_step"] > 0
    assert record["flops_per_step"] == plain["flops_per_step"] + record["frozen_flops_per_step"]
    assert record["model_flops_per_step"] == plain["model_flops_per_step"]
    # teacher forward ≈ 2N per token (+ attention): a third of its 6N training step
    per_token = record["frozen_flops_per_step"] / record["tokens_per_step"]
    assert 2 * teacher.num_params(matmul_only=True) <= per_token < 2.2 * teacher.num_params(matmul_only=True)
    assert record["hfu"] / record["mfu"] == pytest.approx(record["flops_per_step"] / record["model_flops_per_step"])


def test_frozen_wrapper_never_trains():
    frozen = Frozen(torch.nn.Linear(3, 3))
    frozen.train()
    assert not frozen.training and not frozen.module.training
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen(torch.randn(2, 3, requires_grad=True)).requires_grad


# --------------------------------------------------------------------------- hooks, deferred init


def test_hooks_run_around_the_update_in_order():
    calls = []

    def apply(build, options):
        def on_batch(x, y, step):
            calls.append(("on_batch", step))
            return x, y

        build.add_hook("on_batch", on_batch)
        build.add_hook("before_step", lambda step: calls.append(("before_step", step, build.model.tok_emb.weight.grad is not None)))
        build.add_hook("after_step", lambda step: calls.append(("after_step", step)))

    probe = types.SimpleNamespace(NAME="hook_probe", STAGE="engine", OPTIONS={}, apply=apply, __name__="hook_probe")
    with pytest.MonkeyPatch.context() as m:
        m.setitem(techniques.REGISTRY, "hook_probe", techniques.Technique.of(probe))
        session = train.prepare(train.Recipe(steps=2, techniques=["hook_probe"], device="cpu"))
        for step in range(2):
            session.engine.train_step(*session.batches.get("train", step), step)
    assert calls == [("on_batch", 0), ("before_step", 0, True), ("after_step", 0),
                     ("on_batch", 1), ("before_step", 1, True), ("after_step", 1)]


def test_a_technique_can_defer_initialisation_until_after_its_stage():
    """A sharding technique must see the model before any storage exists: with ``DEFERS_INIT``
    the build stays on meta through its stage, then materialises, the model first and then the
    modules the surgery techniques created, in order; the result is deterministic and complete."""
    seen = []
    probe = types.SimpleNamespace(
        NAME="defer_probe", STAGE="wrap", OPTIONS={}, DEFERS_INIT=True, __name__="defer_probe",
        apply=lambda build, options: seen.append(all(p.is_meta for p in build.model.parameters())))
    with pytest.MonkeyPatch.context() as m:
        m.setitem(techniques.REGISTRY, "defer_probe", techniques.Technique.of(probe))
        builds = [build_run("nano", ["defer_probe", "mod:causal=predictor", "moe"], n_layer=4) for _ in range(2)]
    assert seen == [True, True]
    a, b = (bd.model.state_dict() for bd in builds)
    assert all(not t.is_meta and torch.isfinite(t).all() and torch.equal(t, b[k]) for k, t in a.items())
    router = builds[0].model.blocks[1].router.weight
    assert 0.01 < router.std() < 0.03  # N(0, 0.02), not left empty
    assert builds[0].model(torch.randint(0, 256, (2, 16))).shape == (2, 16, 256)


# --------------------------------------------------------------------------- mesh and engines


def test_mesh_dimensions_are_validated_in_one_line():
    assert ParallelDims.from_recipe({}, 4).dp == 4
    assert ParallelDims.from_recipe({}, 1).names == ("dp",)
    with pytest.raises(ConfigError, match="needs a technique that shards over 'tp'"):
        ParallelDims.from_recipe({"tp": 2}, 2)
    with pytest.raises(ConfigError, match="unknown mesh dimension 'xp'"):
        ParallelDims.from_recipe({"xp": 2}, 2)
    with pytest.raises(ConfigError, match="does not divide"):
        ParallelDims.from_recipe({"tp": 3}, 4, usable={"tp"})
    assert ParallelDims.from_recipe({"tp": 2}, 4, usable={"tp"}).dp == 2
    with pytest.raises(ConfigError, match="needs a data-parallel size > 1"):
        train.validate(train.Recipe(steps=1, techniques=["ddp"]))


def test_engines_satisfy_the_protocol_and_ddp_is_the_default_wrap():
    session = train.prepare(train.Recipe(steps=1, device="cpu"))
    assert isinstance(session.engine, Engine)
    assert "ddp" not in [s.name for s in train.check_recipe_fields(train.Recipe(steps=1))[0]]
    assert [s.name for s in train.check_recipe_fields(train.Recipe(steps=1), world_size=2)[0]] == ["ddp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, port: int, out: str, recipe_fields: dict):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from impls import dist

    session = train.prepare(train.Recipe(**recipe_fields))
    ddp = session.build.train_parts[0]
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    x, y = session.batches.get("train", 0)
    loss = session.engine.forward_backward(x, y)
    grads = {n: p.grad.clone() for n, p in session.model.named_parameters()}
    if rank == 0:
        torch.save(dict(loss=session.ctx.all_mean(loss.item()), grads=grads, bucket=ddp.bucket_bytes_cap), out)
    else:
        session.ctx.all_mean(loss.item())
    dist.shutdown()


@pytest.mark.parametrize("model,specs", [("nano", []), ("encoder-nano", ["grad_accum:steps=2"])])
def test_ddp_gradients_equal_one_process_on_the_concatenated_batch(tmp_path, model, specs, one_thread):
    """Two gloo ranks under DDP (the wrap technique) against one process on both ranks' batches.
    The encoder's masked-LM batches carry different target counts per rank, and accumulation
    runs ``no_sync``: the global token normalisation must make the gradients equal anyway."""
    fields = dict(model=model, steps=1, batch_size=4, seq_len=32, device="cpu",
                  techniques=[*specs, "ddp:bucket_mb=1"])
    out = tmp_path / "ddp.pt"
    ranks = torch.multiprocessing.start_processes(_ddp_rank, args=(_free_port(), str(out), fields), nprocs=2,
                                                  join=False, start_method="spawn")
    deadline = time.monotonic() + 240  # a hung collective fails the test instead of blocking CI
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("DDP ranks did not finish within 240 s")
    got = torch.load(out)
    assert got["bucket"] == 1024 * 1024

    single = train.prepare(train.Recipe(**{**fields, "techniques": specs}))
    shards = [train.Batches(single.dataset, single.recipe, single.model.cfg, torch.device("cpu"), rank,
                            single.plan.accum_steps).get("train", 0) for rank in range(2)]
    accum = single.plan.accum_steps
    # One process sees, per micro-batch, both ranks' micro-batches side by side.
    x = torch.cat([torch.cat([s[0].chunk(accum)[i] for s in shards]) for i in range(accum)])
    y = torch.cat([torch.cat([s[1].chunk(accum)[i] for s in shards]) for i in range(accum)])
    loss = single.engine.forward_backward(x, y)
    assert got["loss"] == pytest.approx(loss.item() / 1, rel=1e-5) or accum > 1
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_the_readme_worked_example_is_a_working_technique():
    """impls/techniques/README.md's z-loss example, executed as written: it registers, trains
    with the term and leaves evaluation untouched."""
    text = (IMPLS / "techniques" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    module = types.ModuleType("zloss_example")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    with pytest.MonkeyPatch.context() as m:
        m.setitem(techniques.REGISTRY, "zloss", techniques.Technique.of(module))
        run = build_run("nano", ["zloss:weight=0.5"])
    engine = TorchEngine(run, train.Recipe(), total_steps=1)
    x = torch.randint(0, 256, (2, 16))
    y = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        logits = run.model(x)
        plain = lm_loss(logits, y)
        z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(engine.forward_backward(x, y), plain + 0.5 * z)
    assert engine.eval_loss(x, y) == pytest.approx(plain.item(), rel=1e-6)
