"""Shared test fixtures and helpers."""
import pytest
import torch

from impls import techniques, zoo


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes run faster on one thread: on a busy 2-core machine two threads' barriers can
    cost ~100×.  The numbers the tests check do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_model(name: str, specs: list[str], seed: int = 0, **model_args):
    """A zoo model (seeded) with ``specs`` applied as a run would: ``(model, plan)``."""
    torch.manual_seed(seed)
    model = zoo.build(name, **model_args)
    parsed = [techniques.parse(s) for s in specs]
    plan = techniques.configure(parsed)
    return techniques.apply_all(model, parsed, plan), plan
