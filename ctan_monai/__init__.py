"""ctan_monai: the Cross-Task Attention Network (CTAN) and its multi-task baselines as MONAI components.

Kim, Purdie and McIntosh, "Cross-Task Attention Network: Improving Multi-task Learning for Medical
Imaging Applications", MICCAI workshops 2023.
"""

from ctan_monai.excepthook import install_excepthook
from ctan_monai.tasks import TaskSpec, parse_tasks

# A bundle run that stops on a dataset problem ends with that problem, not 30-100 lines below it with MONAI's
# "Failed to evaluate ConfigExpression" (see ctan_monai.excepthook).
install_excepthook()

__version__ = "0.1.0"

__all__ = ["TaskSpec", "parse_tasks", "__version__"]
