"""Glue for the STOIC bundle's inference config (``configs/inference.yaml``): list the chest CTs of a folder.
Reading and preprocessing the original files is ``ctan_monai.apps.stoic.stoic_transform`` (``source="original"``);
the weights are loaded by ``ctan_monai.apps.load_weights`` and the per-patient probabilities written by
``ctan_monai.engines.patient_classification.PatientClassificationHandler``.

For one CT under ``image`` (MONAI Label): :class:`StackSamplesd` runs that chain and stacks a patient's 2.5D samples
into one tensor, :class:`SamplesInferer` runs the network on them, :class:`PatientProbabilitiesd` averages the
probabilities over them (as the standalone handler does) into ``pred`` and the result JSON."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from ctan_monai.apps.stoic.labels import case_sort_key
from ctan_monai.data.inputs import InputImageError, check_input_file

__all__ = [
    "VOLUME_SUFFIXES",
    "PatientProbabilitiesd",
    "SamplesInferer",
    "StackSamplesd",
    "find_inference_cases",
]

# volume formats taken from a folder (STOIC ships .mha; SimpleITK reads the others too)
VOLUME_SUFFIXES = (".mha", ".mhd", ".nii.gz", ".nii", ".nrrd")


def _case_id(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_inference_cases(input_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """List the chest CT volumes to predict as inference data items.

    Args:
        input_dir: a folder of volumes (``.mha``, ``.mhd``, ``.nii.gz``, ``.nii``, ``.nrrd``), a STOIC dataset folder
            (its ``data/mha/`` is used) or one volume file.

    Returns:
        ``[{"image": path, "case_id": file name without suffix}, ...]``, in PatientID order.

    Raises:
        FileNotFoundError: naming ``input_dir`` when it does not exist or holds no volume.
        ValueError: when two files give the same case id (e.g. ``1.mha`` and ``1.nii.gz``).

    Example:
        >>> find_inference_cases("stoic-sample/data/mha")[0]["case_id"]  # doctest: +SKIP
        '1'
    """
    path = Path(input_dir)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        folder = path / "data" / "mha" if (path / "data" / "mha").is_dir() else path
        files = [p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)]
    else:
        raise FileNotFoundError(f"input_dir {str(input_dir)!r} does not exist")
    if not files:
        raise FileNotFoundError(
            f"input_dir {str(input_dir)!r} holds no chest CT to predict (looked for {', '.join(VOLUME_SUFFIXES)})"
        )
    by_case: dict[str, Path] = {}
    for file in files:
        case = _case_id(file)
        if case in by_case:
            raise ValueError(f"input_dir {str(input_dir)!r}: {by_case[case].name} and {file.name} are both case {case}")
        by_case[case] = file
    return [{"image": str(by_case[c]), "case_id": c} for c in sorted(by_case, key=case_sort_key)]


def _root_message(err: BaseException) -> str:
    """The innermost message of a chain of exceptions (MONAI wraps a transform's error in a RuntimeError), on one
    line."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip().lstrip("- ").strip() for line in str(err).splitlines()]
    return "; ".join(line for line in lines if line) or type(err).__name__


class StackSamplesd(MapTransform):
    """Run the STOIC preprocessing chain on one CT and stack its samples: ``image`` (the CT file) becomes
    ``[N, C, *spatial]`` float32, the patient's ``N`` 2.5D samples (``N = 1`` for a 3D network).

    Args:
        transform: the chain from ``{"image": path}`` to one sample dict or a list of them (``stoic_transform``).
        keys: the image key.
        allow_missing_keys: skip missing keys instead of raising.

    Raises:
        InputImageError: naming the file when it is missing, empty, or the chain refuses it (not a 3D CT in HU, no
            lungs found, ...).

    Example:
        >>> chain = stoic_transform(2, image_size=96, num_slices=8, source="original", labels=False)  # doctest: +SKIP
        >>> StackSamplesd(chain)({"image": "1.mha"})["image"].shape  # doctest: +SKIP
        torch.Size([8, 3, 96, 96])
    """

    def __init__(
        self, transform: Callable[[dict], Any], keys: KeysCollection = "image", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = transform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = check_input_file(d[key])
            try:
                samples = self.transform({"image": str(path), "case_id": path.name.split(".")[0]})
            except (ValueError, RuntimeError) as err:
                raise InputImageError(
                    f"input {str(path)!r} cannot be used as a chest CT: {_root_message(err)}"
                ) from None
            samples = samples if isinstance(samples, list) else [samples]
            d[key] = torch.stack([torch.as_tensor(s["image"], dtype=torch.float32) for s in samples])
        return d


class SamplesInferer(Inferer):
    """Run a network on patients given as stacks of samples: ``[B, N, C, *spatial]`` in (MONAI Label's one patient,
    ``B = 1``), the network's output per sample out, ``{task: [B, N, ...]}``. A plain batch ``[B, C, *spatial]`` (the
    standalone data loader's, samples already flattened) goes to the network as it is, as ``SimpleInferer`` would.

    Args:
        spatial_dims: the network's spatial dimensions (2 for 2.5D samples, 3 for volumes).

    Example:
        >>> net = lambda x: {"covid": x.mean(dim=(1, 2, 3))[:, None]}
        >>> SamplesInferer(2)(torch.zeros(1, 8, 3, 4, 4), net)["covid"].shape
        torch.Size([1, 8, 1])
        >>> SamplesInferer(2)(torch.zeros(8, 3, 4, 4), net)["covid"].shape
        torch.Size([8, 1])
    """

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        self.spatial_dims = int(spatial_dims)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``network`` on every sample.

        Args:
            inputs: ``[B, N, C, *spatial]`` stacks, or a plain batch ``[B, C, *spatial]``.
            network: the network.
            args: passed to the network.
            kwargs: passed to the network.

        Returns:
            the outputs, reshaped to ``[B, N, ...]`` for stacked inputs.

        Raises:
            ValueError: when ``inputs`` has neither of the two shapes.
        """
        if inputs.ndim == self.spatial_dims + 2:
            return network(inputs, *args, **kwargs)
        if inputs.ndim != self.spatial_dims + 3:
            raise ValueError(
                f"expected [B, N, C, *spatial] or [B, C, *spatial] inputs for {self.spatial_dims}D samples, "
                f"got shape {tuple(inputs.shape)}"
            )
        b, n = inputs.shape[:2]
        outputs = network(inputs.reshape(b * n, *inputs.shape[2:]), *args, **kwargs)
        if isinstance(outputs, Mapping):
            return {k: v.reshape(b, n, *v.shape[1:]) for k, v in outputs.items()}
        return outputs.reshape(b, n, *outputs.shape[1:])


class PatientProbabilitiesd(MapTransform):
    """Turn one patient's per-sample logits ``{task: [N, 1]}`` under ``pred`` into the patient's probabilities: the
    mean over the samples of each task's sigmoid (as the standalone ``PatientClassificationHandler`` computes them).
    ``pred`` becomes the probabilities ``[num_tasks]`` (a MetaTensor, in ``task_names`` order) and
    ``data[result_key]`` gets ``{prediction_name: probability}``.

    Args:
        keys: the network output key (``pred``).
        task_names: the tasks in output order.
        prediction_names: the result's name of each task (``{"covid": "probCOVID", ...}``, as the standalone
            ``PatientClassificationHandler`` takes it); a task it does not name keeps its own name.
        result_key: the result JSON key.
        allow_missing_keys: skip missing keys instead of raising.

    Raises:
        ValueError: when the output lacks a task.

    Example:
        >>> d = PatientProbabilitiesd("pred", ["covid"], {"covid": "probCOVID"})({"pred": {"covid": torch.zeros(8, 1)}})
        >>> d["result"]
        {'probCOVID': 0.5}
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        task_names: Sequence[str] = ("covid", "severe"),
        prediction_names: Mapping[str, str] | None = None,
        result_key: str = "result",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.task_names = list(task_names)
        self.prediction_names = [str((prediction_names or {}).get(t, t)) for t in self.task_names]
        self.result_key = result_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            outputs = d[key]
            missing = [t for t in self.task_names if t not in outputs]
            if missing:
                raise ValueError(f"network output has no {missing}; got {sorted(outputs)}")
            probs = [
                float(torch.sigmoid(torch.as_tensor(outputs[t]).detach().float().cpu()).mean()) for t in self.task_names
            ]
            d[key] = MetaTensor(torch.tensor(probs, dtype=torch.float32))
            result = dict(d.get(self.result_key) or {})
            result.update({name: round(p, 6) for name, p in zip(self.prediction_names, probs)})
            d[self.result_key] = result
        return d
