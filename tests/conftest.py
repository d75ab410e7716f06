"""Shared test fixtures and helpers."""
import pytest
import torch

from impls import techniques, zoo
from impls.build import Build
from impls.loss import lm_loss
from impls.parallel import ParallelDims


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes run faster on one thread: on a busy 2-core machine two threads' barriers can
    cost ~100×.  The numbers the tests check do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_run(name: str, specs: list[str], seed: int = 0, device="cpu", **model_args) -> Build:
    """A zoo model (seeded, built on meta) with ``specs`` assembled as a one-process run would."""
    torch.manual_seed(seed)
    parsed = [techniques.parse(s) for s in specs]
    plan = techniques.configure(parsed)
    build = Build(dims=ParallelDims(1, {"dp": 1}), plan=plan, device=torch.device(device),
                  model_parts=[zoo.build(name, device="meta", **model_args)])
    return techniques.assemble(build, parsed)


def build_model(name: str, specs: list[str], seed: int = 0, **model_args):
    """A zoo model (seeded) with ``specs`` applied as a run would: ``(model, plan)``."""
    build = build_run(name, specs, seed, **model_args)
    return build.model, build.plan


def loss_of(model, x, y):
    """The mean LM loss of ``model`` on (x, y) (the loss lives outside the model)."""
    return lm_loss(model(x), y)


def apply_to(model, specs: list[str]) -> Build:
    """``specs`` assembled over an existing (materialised) ``model``: the build it makes."""
    parsed = [techniques.parse(s) for s in specs]
    build = Build(dims=ParallelDims(1, {"dp": 1}), plan=techniques.configure(parsed),
                  device=next(model.parameters()).device, model_parts=[model], materialized=True)
    return techniques.assemble(build, parsed)


def engine_over(model, plan=None, recipe=None, total_steps: int = 10, engine_class=None):
    """The torch engine over an existing model (one process, the given plan)."""
    from impls.engines import TorchEngine
    from impls.recipe import Recipe

    build = Build(dims=ParallelDims(1, {"dp": 1}), plan=plan or techniques.StepPlan(),
                  device=next(model.parameters()).device, model_parts=[model], materialized=True)
    return (engine_class or TorchEngine)(build, recipe or Recipe(), total_steps)
