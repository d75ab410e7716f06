"""Build DeepSpeed's JIT-compiled ops once, at ``make setup``: ``python -m impls.engines.deepspeed_ops``.

DeepSpeed compiles its C++ ops on first use (``torch.utils.cpp_extension``, cached per
environment under ``$TORCH_EXTENSIONS_DIR``, which the Makefile keeps inside the project: two
environments sharing one cache directory rebuild it in turn): ``CPUAdamBuilder``
(``DeepSpeedCPUAdam``, what ZeRO-Offload's optimizer step runs, ~45 s on 2 cores) and, on a CPU
accelerator, ``ShareMemCommBuilder`` (the shared-memory collectives ``deepspeed.comm`` builds when
it starts, ``deepspeed/comm/torch.py: build_shm_op``, ~30 s).  Done at setup, no benchmark or
test times it.  An op that cannot build here (no compiler, an incompatible system) is reported and
skipped: the ``zero`` technique then says so when offload is asked for.
"""
from __future__ import annotations

import sys
import time

OPS = ("CPUAdamBuilder", "ShareMemCommBuilder")


def main() -> int:
    try:
        from deepspeed.accelerator import get_accelerator
    except Exception as e:  # deepspeed missing or broken: nothing to build
        print(f"deepspeed ops: not built ({type(e).__name__}: {e})", file=sys.stderr)
        return 0
    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible():
            print(f"deepspeed ops: {name} is not available on this accelerator; skipped")
            continue
        t0 = time.perf_counter()
        try:
            builder.load()
        except Exception as e:  # a failed build must not fail setup
            print(f"deepspeed ops: {name} could not be built here ({type(e).__name__}); skipped", file=sys.stderr)
            continue
        print(f"deepspeed ops: {name} ready ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
