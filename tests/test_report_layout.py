"""The shape of the report and site packages (issue 23), read from the source: no module over
600 lines and no function over 80, the report's modules import one another downward only (at
module level, no cycle), every report section follows the one :class:`impls.report.section.Section`
protocol, and every name of the former ``impls/report.py`` is still ``impls.report.<name>``."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from impls import families

IMPLS = Path(__file__).resolve().parents[1] / "impls"
PACKAGES = ("report", "site")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules(package: str) -> list[Path]:
    return sorted((IMPLS / package).rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(IMPLS.parent).as_posix()


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_over_600_lines(package):
    long = {_name(p): n for p in _modules(package) if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: split them"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_over_80_lines(package):
    long = {}
    for path in _modules(package):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{_name(path)}:{node.lineno} {node.name}"] = lines
    assert long == {}, f"functions over {MAX_FUNCTION_LINES} lines: split them"


def _report_imports() -> dict[str, set[str]]:
    """Module -> the report modules it imports at module level (``from . import x``, ``from .x
    import ...``); ``__init__`` for names taken from the package itself."""
    modules = {p.stem for p in _modules("report")}
    graph = {}
    for path in _modules("report"):
        edges = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    edges.add(node.module.split(".")[0])
                else:
                    edges |= {a.name if a.name in modules else "__init__" for a in node.names}
        graph[path.stem] = edges
    return graph


def test_report_modules_import_each_other_downward_without_a_cycle():
    graph = _report_imports()
    assert {m for m, edges in graph.items() if "__init__" in edges and m != "__main__"} == set(), \
        "a module takes names from the package __init__ (import them from the module defining them)"
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, f"import cycle: {' -> '.join(visiting + [module])}"
        if module in done:
            return
        visiting.append(module)
        for target in graph.get(module, ()):
            if target != "__init__":
                visit(target)
        visiting.pop()
        done.add(module)

    for module in graph:
        if module not in ("__init__", "__main__"):
            visit(module)


def test_no_report_module_imports_its_package_inside_a_function():
    """Imports between the report's modules are at module level, where the layering is visible
    (imports of heavy modules outside the package, e.g. torch's, may stay lazy)."""
    lazy = []
    for path in _modules("report"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [f"{_name(path)}:{n.lineno}" for n in ast.walk(node)
                         if isinstance(n, ast.ImportFrom) and n.level == 1]
    assert lazy == []


def test_every_section_follows_the_protocol_and_is_a_families_section():
    from impls.report import section

    names = [s.name for s in section.SECTIONS]
    assert names[0] == "runs" and len(set(names)) == len(names)
    assert set(names) <= set(families.SECTIONS)
    for s in section.SECTIONS:
        assert isinstance(s, section.Section), s
    # the families a section covers are the families table's
    from impls.report import compression, model_parallel, tokens

    assert compression.FAMILIES == families.of_section("compression")
    assert tokens.FAMILIES == families.of_section("tokens")
    assert model_parallel.FAMILIES == families.of_section("model_parallel")


def test_the_record_kinds_are_the_families_tables():
    from impls import report
    from impls.report import records

    assert report.INTERLEAVED_KIND == families.INTERLEAVED
    assert report.OVERHEAD_KIND == families.HARNESS_OVERHEAD
    assert report.COMM_KIND == families.COMM
    assert set(records.STORAGE_KINDS) == {families.SPARSE_STORAGE, families.DATA_COMPRESSION}
    # the at-scale artefacts (impls.report.atscale) are routed when given as paths
    assert set(records.ATSCALE_KINDS) == {families.DRYRUN_SWEEP, families.PLAN_CALIBRATION}
    # (single dry runs, impls.dryrun, and recipe plans have no report section yet)
    assert {families.INTERLEAVED, families.HARNESS_OVERHEAD, families.COMM, *records.STORAGE_KINDS,
            *records.ATSCALE_KINDS} == set(families.RECORD_KINDS) - {families.RUN, families.DRYRUN, families.RECIPE_PLAN}


#: Every public name of the former impls/report.py and its three section modules.
FORMER_NAMES = {
    "impls.report": """ConfigError WriteError atomic_path check_writable_dir clean_stale_in exclusive write_text
        SCHEMA_VERSION MIB DPI HASH_PREFIX MEMORY_COMPONENTS RecordError RecordWarning NoRecordsError
        InconsistentRecordError DivergedRecordError BadInputError validate_record record_consistency_errors
        read_record INTERLEAVED_KIND OVERHEAD_KIND Loaded validate_overhead overhead_markdown validate_interleaved
        load_all load_records records_frame curve_frame describe_device summary_table median_ci markdown_text
        markdown_safe markdown_table new_figure plot_loss_vs_flops plot_throughput_memory comparison_key
        technique_comparison plot_technique_comparison interleaved_table interleaved_name interleaved_markdown
        plot_interleaved refused_markdown COMPARE_RESAMPLES COMPARE_MIN_SAMPLES COMPARE_METHOD bootstrap_ratio
        load_compare_side compare_table ratio_agreement ratio_agreement_markdown verdict_counts compare_markdown
        format_value SORTABLE_JS TABLE_CSS html_table compare_html write_compare COMM_KIND DATA_PARALLEL_FILES
        DP_COMPONENTS MEMORY_TABLE_MODELS MEMORY_TABLE_N_DS SCALING_NOTE nested_block interleaved_parallel_runs
        data_parallel_frame model_states_lines scaling_efficiency comm_volume_table validate_comm
        comm_bandwidth_frame data_parallel_memory_table plot_model_states plot_scaling_efficiency plot_comm_volume
        plot_bus_bandwidth data_parallel_markdown write_data_parallel save_figure STAGING_PREFIX StagedOutputs
        staged_outputs write_report peak_log_markdown main compression tokens model_parallel""",
    "impls.report.compression": """write_text FAMILIES KNOBS COMPONENTS STORAGE_KIND DATA_KIND STORAGE_KINDS
        run_techniques main_technique compression_frame plot_memory plot_loss_vs_knob validate_storage data_markdown
        storage_markdown markdown write_compression""",
    "impls.report.tokens": """write_text FAMILIES KNOBS COUNTED_SAVED ANALYTIC_SAVED loss_at_equal_counted_flops
        tokens_frame mask_rate_speedups plot_speedup_vs_mask_rate plot_random_ltd_schedule plot_distill_sweep
        markdown write_tokens""",
    "impls.report.model_parallel": """write_text GIB PLANNER_MODELS PLANNER_DEVICES LAYOUT_GRID layouts_frame
        plot_activations bubble_curve schedule_bubbles plot_bubble planner_memory plot_planner_memory markdown
        write_model_parallel""",
}


@pytest.mark.parametrize("module", sorted(FORMER_NAMES))
def test_every_former_public_name_is_still_importable(module):
    imported = importlib.import_module(module)
    assert [n for n in FORMER_NAMES[module].split() if not hasattr(imported, n)] == []
