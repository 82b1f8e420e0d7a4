"""Method comparison (the paper's Table 2): train and evaluate STL, HPS, MTAN and CTAN with everything else equal,
over several seeds, through a bundle's own commands; ``python -m ctan_monai.compare --help``."""

from ctan_monai.compare.runner import (
    RunPlan,
    environment_record,
    execute_run,
    job_environments,
    load_finished_run,
    prepare_data,
    report_values,
    run_plans,
)
from ctan_monai.compare.spec import ComparisonSpec, TaskMetric, load_comparison_spec, read_floor, read_metric
from ctan_monai.compare.table import (
    below_floor,
    below_floor_messages,
    format_markdown,
    summarise,
    summarise_floor,
    to_csv,
)

__all__ = [
    "ComparisonSpec",
    "RunPlan",
    "TaskMetric",
    "below_floor",
    "below_floor_messages",
    "environment_record",
    "execute_run",
    "format_markdown",
    "job_environments",
    "load_comparison_spec",
    "load_finished_run",
    "prepare_data",
    "read_floor",
    "read_metric",
    "report_values",
    "run_plans",
    "summarise",
    "summarise_floor",
    "to_csv",
]
