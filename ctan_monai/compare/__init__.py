"""Method comparison (the paper's Table 2): train and evaluate STL, HPS, MTAN and CTAN with everything else equal,
over several seeds, through a bundle's own commands; ``python -m ctan_monai.compare --help``."""

from ctan_monai.compare.runner import (
    RunPlan,
    environment_record,
    execute_run,
    job_environments,
    load_finished_run,
    prepare_data,
    run_plans,
)
from ctan_monai.compare.spec import ComparisonSpec, TaskMetric, load_comparison_spec, read_metric
from ctan_monai.compare.table import format_markdown, summarise, to_csv

__all__ = [
    "ComparisonSpec",
    "RunPlan",
    "TaskMetric",
    "environment_record",
    "execute_run",
    "format_markdown",
    "job_environments",
    "load_comparison_spec",
    "load_finished_run",
    "prepare_data",
    "read_metric",
    "run_plans",
    "summarise",
    "to_csv",
]
