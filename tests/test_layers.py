"""The import rules of the guide, read from the source (as ``tests/test_build.py`` reads the
no-patching rule): nothing under ``impls/`` imports the CLI, no module reaches into another
module's ``_private`` names (imported by name, or as ``module._name`` through an imported module),
and layers import downward only (:data:`LAYERS`: every module is placed in one, and each of its
imports, at the top or inside a function, goes to its own layer or a lower one).
A private *module* of a package (``impls/techniques/_pruning.py``) is shared by its package's
modules and is not a private name of another module.
"""
from __future__ import annotations

import ast
from pathlib import Path

IMPLS = Path(__file__).resolve().parents[1] / "impls"


def _modules():
    for path in sorted(IMPLS.rglob("*.py")):
        parts = list(path.relative_to(IMPLS.parent).with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield path, name, package if parts[-1] != "__init__" else parts[:-1]


def _resolve(node: ast.ImportFrom, package: list[str]) -> str:
    if not node.level:
        return node.module or ""
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _violations():
    cli, private = [], []
    for path, name, package in _modules():
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> impls module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "impls":
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "impls"
                        if a.name == "impls.cli":
                            cli.append((name, a.name))
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(node, package)
                if source.split(".")[0] != "impls":
                    continue
                for a in node.names:
                    target = f"{source}.{a.name}"
                    if source == "impls.cli" or target == "impls.cli":
                        cli.append((name, target))
                    is_module = (IMPLS.parent / Path(*target.split("."))).with_suffix(".py").exists() or \
                        (IMPLS.parent / Path(*target.split("."))).is_dir()
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        own_package = is_module and source == ".".join(package)
                        if not own_package:
                            private.append((name, target))
                    if is_module:
                        aliases[a.asname or a.name] = target
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                target = aliases[node.value.id]
                if target != name:
                    private.append((name, f"{target}.{node.attr}"))
    return cli, private


def test_nothing_imports_the_cli():
    cli, _ = _violations()
    assert [c for c in cli if c[0] != "impls.cli"] == []


def test_no_module_uses_another_modules_private_names():
    _, private = _violations()
    assert private == []


#: The layers, bottom first: a module may import its own layer and those below, never above.
LAYERS = (
    "foundation",  # 0: no notion of a model or a run; anything may import these
    "model, data, measurement",  # 1: the zoo, datasets and token files, the loss, the recipe, measure.*
    "build",  # 2: what a run trains, as the techniques and engines assemble it, and its saved state
    "training",  # 3: the one training loop
    "experiments",  # 4: what runs trainings (or predicts them) to answer a question
    "report",  # 5: tables and plots of records, and what packages records for others
    "site",  # 6: the published pages
    "cli",  # 7: the command line, over everything
)
FOUNDATION, MODEL, BUILD, TRAINING, EXPERIMENTS, REPORT, SITE, CLI = range(len(LAYERS))

#: Modules by exact name.  A module missing here (and under no package of PACKAGES) fails
#: test_every_module_has_a_layer: a new module is placed on purpose, not by default.
MODULES = {
    # foundation: utilities, plus what only launches processes or installs things
    "impls": FOUNDATION,
    "impls.errors": FOUNDATION,  # the exception types the CLI turns into one line
    "impls.files": FOUNDATION,  # atomic writes, locks, output checks
    "impls.kv": FOUNDATION,  # the key=value parser
    "impls.provenance": FOUNDATION,  # the schema version and provenance block of every record
    "impls.families": FOUNDATION,  # every benchmark family and record kind, as data
    "impls.requires": FOUNDATION,  # optional packages, refused by name
    "impls.figures": FOUNDATION,  # a Figure on the Agg canvas, saved atomically
    "impls.dist": FOUNDATION,  # rank, world size, device from the torchrun environment
    "impls.ranks": FOUNDATION,  # starts local ranks (runs impls.cli by name, never imports it)
    "impls.wheelhouse": FOUNDATION,  # setup: the standard library only, runs before anything is installed
    # model, data, measurement
    "impls.data": MODEL,
    "impls.token_shards": MODEL,
    "impls.loss": MODEL,  # the LM loss, beside the model
    "impls.recipe": MODEL,  # what a run's result depends on: read by build, training and experiments
    # build
    "impls.build": BUILD,
    "impls.optimizers": BUILD,
    "impls.parallel": BUILD,  # the mesh a build shards over
    "impls.init_from": BUILD,  # weights of a finished run, loaded into a build
    "impls.training_state": BUILD,  # the state file init_from and training read
    # training
    "impls.train": TRAINING,
    # experiments
    "impls.compare": EXPERIMENTS,
    "impls.isoflop": EXPERIMENTS,
    "impls.planner": EXPERIMENTS,
    "impls.commbench": EXPERIMENTS,
    "impls.predict": EXPERIMENTS,  # a recipe's time and memory, before any run
    "impls.dryrun": EXPERIMENTS,  # one rank of a run on fake tensors under the fake process group
    "impls.recipe_planner": EXPERIMENTS,  # whole recipes ranked by a cost model (etbench plan --search recipes)
    "impls.recipe_runs": EXPERIMENTS,  # their etbench recipes, dry-run verification, table and command line
    "impls.selective_recompute": EXPERIMENTS,  # which activation terms to recompute: an exact knapsack
    "impls.dryrun_sweep": EXPERIMENTS,  # dry runs over models x world sizes x layouts against their formulas
    "impls.gpucheck": EXPERIMENTS,
    "impls.datacomp": EXPERIMENTS,  # token storage formats against a training step's need
    "impls.plan_verify": EXPERIMENTS,  # etbench plan --verify: planner layouts as recipes, dry-run
    "impls.calibration": EXPERIMENTS,  # etbench plan-calibrate: predicted vs measured step times
    "impls.calibration_runs": EXPERIMENTS,  # what plan-calibrate measures: launched compare/run/comm, the peak
    "impls.grid": EXPERIMENTS,  # a grid's points as jobs: the job, its resources, packing, the executor flags
    "impls.sweep": EXPERIMENTS,  # etbench sweep: a recipe grid or a list of comparisons, run as jobs
    # report
    "impls.publish": REPORT,  # packages records (and report outputs) for the site
    "impls.benchtime": REPORT,  # where a make bench's time went
    # cli
    "impls.cli": CLI,
}

#: Packages whose every module is in one layer.
PACKAGES = {
    "impls.zoo": MODEL,
    "impls.measure": MODEL,
    "impls.techniques": BUILD,
    "impls.engines": BUILD,
    "impls.report": REPORT,
    "impls.site": SITE,
    "impls.executors": FOUNDATION,  # where jobs run (submitit, Slurm, Ray): no notion of a model
}


def layer_of(module: str) -> int | None:
    if module in MODULES:
        return MODULES[module]
    for package, layer in PACKAGES.items():
        if module == package or module.startswith(package + "."):
            return layer
    return None


def _imports(path: Path, package: list[str]) -> set[str]:
    """The ``impls`` modules ``path`` imports anywhere (top level or inside functions): a name
    imported from a package is that submodule when it is one, else the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "impls"}
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node, package)
            if source.split(".")[0] != "impls":
                continue
            for a in node.names:
                target = IMPLS.parent / Path(*f"{source}.{a.name}".split("."))
                found.add(f"{source}.{a.name}" if target.with_suffix(".py").exists() or target.is_dir() else source)
    return found


def test_every_module_has_a_layer():
    unplaced = [name for _, name, _ in _modules() if layer_of(name) is None]
    assert unplaced == [], f"modules in no layer (place each in tests/test_layers.py MODULES): {unplaced}"


def test_layers_import_downward_only():
    upward = []
    for path, name, package in _modules():
        for target in sorted(_imports(path, package)):
            if layer_of(name) is not None and layer_of(target) is not None and layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)]}) imports {target} ({LAYERS[layer_of(target)]})")
    assert upward == [], "imports into a higher layer:\n" + "\n".join(upward)
