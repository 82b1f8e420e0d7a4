"""The README of an exported bundle: every section of the model zoo's template (``docs/readme_template.md``:
Authors, Tags, Model Overview, Data, Performance, System Configuration, Limitations, Citation Info, References),
the bundle's own documentation in between, and commands that run from the bundle folder."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["compose_zoo_readme", "split_sections"]

CTAN_CITATION = """@inproceedings{kim2023ctan,
  title={Cross-Task Attention Network: Improving Multi-task Learning for Medical Imaging Applications},
  author={Kim, Sangwook and Purdie, Thomas G. and McIntosh, Chris},
  booktitle={Medical Image Learning with Limited and Noisy Data (MILLanD), MICCAI 2023 Workshops},
  series={Lecture Notes in Computer Science},
  volume={14307},
  year={2023}
}"""

# sections of the source README that the export writes itself (commands from the repository's layout)
_REPLACED = ("commands",)


def split_sections(markdown: str) -> tuple[str, list[tuple[str, str]]]:
    """Split markdown at its level-2 headings.

    Args:
        markdown: the text.

    Returns:
        the text before the first ``## `` heading, and ``(heading, body)`` pairs in order.

    Example:
        >>> split_sections("# T\\nintro\\n## A\\na\\n## B\\nb\\n")
        ('# T\\nintro\\n', [('A', 'a\\n'), ('B', 'b\\n')])
    """
    parts = re.split(r"(?m)^## (.+)\n", markdown)
    head, rest = parts[0], parts[1:]
    return head, [(rest[i].strip(), rest[i + 1]) for i in range(0, len(rest), 2)]


def _relative_commands(text: str, bundle_name: str) -> str:
    """Paths written from this repository's root, made relative to the bundle folder."""
    return text.replace(f"bundles/{bundle_name}/", "").replace(f"--bundle_root bundles/{bundle_name}", "")


def _tags(metadata: dict[str, Any]) -> str:
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    modality = next((str(v.get("modality", "")) for v in inputs.values() if v.get("modality")), "")
    tags = ["Multi-task learning", "CTAN", "Cross-task attention", modality.upper() if len(modality) <= 3 else modality]
    task = str(metadata.get("task", "")).lower()
    for word, tag in (
        ("segmentation", "Segmentation"),
        ("dose", "Dose prediction"),
        ("classification", "Classification"),
        ("diagnosis", "Classification"),
        ("severity", "Classification"),
    ):
        if word in task and tag not in tags:
            tags.append(tag)
    return ", ".join(t for t in tags if t)


def _commands(bundle_name: str, metadata: dict[str, Any]) -> str:
    pins = {"monai": metadata.get("monai_version"), "numpy": metadata.get("numpy_version")}
    pins.update(metadata.get("required_packages_version", {}))
    packages = " ".join(f"{name}=={version}" for name, version in pins.items() if version)
    torch_pin = metadata.get("pytorch_version", "")
    return f"""All commands run from this folder (`{bundle_name}/`). From another directory, give the config
files' full paths, add `--bundle_root /path/to/{bundle_name}` and put the folder on the Python path
(`PYTHONPATH=/path/to/{bundle_name}`): MONAI resolves a config's `imports` before it adds the bundle folder to the
path itself. The code is in `scripts/`, so only the packages of `configs/metadata.json` are needed, torch first (the
CPU wheel or your CUDA build):

```bash
pip install torch=={torch_pin}
pip install {packages}
```

#### Training (the built-in synthetic demo, written on first use under `demo_data/`; real data: `--dataset_dir`)
```bash
python -m monai.bundle run training --config_file configs/train.yaml
```

#### Evaluation
```bash
python -m monai.bundle run evaluating --config_file "['configs/train.yaml','configs/evaluate.yaml']"
```

#### Inference
```bash
python -m monai.bundle run --config_file configs/inference.yaml
```

#### Several GPUs
```bash
torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run training \\
  --config_file "['configs/train.yaml','configs/multi_gpu_train.yaml']"
```

#### TorchScript
```bash
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
  --meta_file configs/metadata.json --config_file configs/inference.yaml
```
"""


def compose_zoo_readme(
    source_readme: str,
    metadata: dict[str, Any],
    bundle_name: str,
    large_files: bool = False,
    shape_net_id: str = "seg_network_def",
) -> str:
    """The zoo README of an exported bundle.

    Args:
        source_readme: the source bundle's ``docs/README.md`` (its level-2 sections are kept, but "Commands").
        metadata: the exported ``metadata.json`` content.
        bundle_name: the exported folder's name.
        large_files: whether ``models/model.pt`` is listed in ``large_files.yml`` (hosted outside the repository).
        shape_net_id: the training config's single-output view of the network, for the shape check.

    Returns:
        the markdown text.

    Example:
        >>> text = compose_zoo_readme("# x\\n## Data\\nd\\n", {"name": "CTAN x", "authors": "a"}, "ctan_x")
        >>> "### **Tags**" in text and "## **System Configuration**" in text
        True
    """
    _, sections = split_sections(_relative_commands(source_readme, bundle_name))
    own = {title.lower(): body.strip() for title, body in sections}
    kept = [(title, body.strip()) for title, body in sections if title.lower() not in _REPLACED]
    metrics = metadata.get("eval_metrics", {})
    metric_lines = "\n".join(f"| {name} | {value} |" for name, value in metrics.items())
    weights = (
        "`models/model.pt` is over the 1 MB the zoo's repository takes: `large_files.yml` gives its address and "
        "sha256 (the zoo's CI downloads it from there)."
        if large_files
        else "`models/model.pt` is included."
    )
    out = [
        f"# {metadata.get('name', bundle_name)}",
        "",
        "### **Authors**",
        str(metadata.get("authors", "")),
        "",
        "### **Tags**",
        _tags(metadata),
        "",
        "## **Model Overview**",
        str(metadata.get("description", "")),
        "",
        "The network is the Cross-Task Attention Network (CTAN) of Kim, Purdie and McIntosh (2023): a shared ResNet "
        "encoder, one decoder per task, and cross-task attention bottlenecks that exchange features between the "
        "tasks; the configs switch it to the baselines MTAN, HPS (hard parameter sharing) or STL (one network per "
        f"task) with `--arch`. {weights}",
        "",
        f"Intended use: {metadata.get('intended_use', 'research only')}.",
        "",
    ]
    for title, body in kept:
        heading = "Data" if title.lower() == "data" else title
        out += [f"## **{heading}**" if title.lower() in ("data", "performance", "references") else f"## {heading}"]
        out += [body, ""]
        if title.lower() == "performance" and metric_lines:
            out += ["`eval_metrics` of `configs/metadata.json`:", "", "| metric | value |", "|---|---|"]
            out += [metric_lines, ""]
    if "data" not in own:
        out += ["## **Data**", str(metadata.get("data_source", "")), ""]
    if "performance" not in own:
        out += ["## **Performance**", "| metric | value |", "|---|---|", metric_lines, ""]
    out += ["## **MONAI Bundle Commands**", _commands(bundle_name, metadata), ""]
    out += [
        "## **System Configuration**",
        own.get(
            "system configuration",
            "Training and inference run on a CPU (the demo in minutes on 2 cores) or an NVIDIA GPU (`device` picks "
            "CUDA when available; `amp` and `channels_last` are options of the training config). The measured "
            "runs in Performance name their machine, threads and iterations.",
        ),
        "",
        "### TensorRT",
        "This bundle has not been converted to or tested with TensorRT: it provides no TensorRT engine or "
        "`trt_inference` config; TorchScript export (`ckpt_export`) is supported.",
        "",
        "### Network shape check",
        "`network_def` returns a dictionary of task outputs (like HoVerNet, which the zoo lists in "
        "`exclude_verify_shape_list`), so `verify_net_in_out network_def` does not apply to it; the training config's "
        f"`{shape_net_id}` wraps the network to return one output alone and passes "
        f"`python -m monai.bundle verify_net_in_out {shape_net_id} --meta_file configs/metadata.json "
        "--config_file configs/train.yaml`.",
        "",
        "## **Limitations**",
        own.get(
            "limitations",
            "Research use only: not cleared or approved by any regulatory agency, not for clinical decisions. "
            "The synthetic demo only shows that the pipeline runs and learns; it is no measure of clinical quality.",
        ),
        "",
        "## **Citation Info**",
        "```bibtex",
        CTAN_CITATION,
        "```",
        "",
    ]
    if "references" not in own:
        refs = "\n".join(f"- {r}" for r in metadata.get("references", []))
        out += ["## **References**", refs, ""]
    if "licence" not in own and "license" not in own:
        out += ["## **License**", "See `LICENSE` (code) and `docs/data_license.txt` (data), where present.", ""]
    return "\n".join(out).rstrip() + "\n"
