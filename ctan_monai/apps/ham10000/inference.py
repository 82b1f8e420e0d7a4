"""Glue for the HAM10000 bundle's inference config (``configs/inference.yaml``): list the images to predict, put the
multi-task output under the keys MONAI Label and the writers use (``pred``: the lesion segmentation, ``dx``: the
diagnosis), and write per image a lesion mask PNG and the class probabilities (JSON), plus one CSV table of all
images, every file atomically. For MONAI Label: :class:`CheckImageFiled` refuses a bad input with a clear error and
:class:`LabelResultd` hands over the mask as its writer expects, the diagnosis in the result JSON."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from monai.config import KeysCollection
from monai.transforms import MapTransform
from PIL import Image

from ctan_monai.apps.ham10000.validation import HAM10000_CLASSES, IMAGE_DIR_PREFIX, MASK_SUFFIX
from ctan_monai.data.inputs import InputImageError, check_input_file
from ctan_monai.engines.base import RunCollectorHandler, write_csv
from ctan_monai.utils.atomic import atomic_path, atomic_write_json

__all__ = [
    "INFERENCE_IMAGE_EXTENSIONS",
    "CheckImageFiled",
    "LabelResultd",
    "PredictionTableHandler",
    "TaskOutputsToKeysd",
    "WriteHAM10000Predictiond",
    "find_inference_images",
]

logger = logging.getLogger("ctan_monai.ham10000")

#: Image files that inference picks up in a folder.
INFERENCE_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
#: Key the writer stores each image's table row under, for :class:`PredictionTableHandler`.
RECORD_KEY = "prediction_record"


def find_inference_images(input_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """List the dermatoscopic images to predict.

    ``input_dir`` may be one image file, a folder of images, or a HAM10000 dataset folder (its ``HAM10000_images*``
    folders are searched). Lesion masks (``*_segmentation.png``) and hidden files are skipped.

    Args:
        input_dir: the file or folder.

    Returns:
        ``[{"image": path, "image_id": file stem, "source": path}, ...]``, sorted by path.

    Raises:
        FileNotFoundError: naming ``input_dir`` when it does not exist or holds no image.
        ValueError: when two images share a file stem (their outputs would overwrite each other).

    Example:
        >>> find_inference_images("demo_data/ham10000/HAM10000_images_part_1")[0]["image_id"]  # doctest: +SKIP
        'ISIC_9000001'
    """
    root = Path(input_dir)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(IMAGE_DIR_PREFIX)) or [root]
        files = sorted(
            p
            for folder in folders
            for p in folder.iterdir()
            if p.is_file()
            and p.suffix.lower() in INFERENCE_IMAGE_EXTENSIONS
            and not p.name.startswith(".")
            and not p.name.endswith(MASK_SUFFIX)
        )
    else:
        raise FileNotFoundError(f"input_dir {str(input_dir)!r} does not exist")
    if not files:
        raise FileNotFoundError(
            f"input_dir {str(input_dir)!r} holds no image to predict ({', '.join(INFERENCE_IMAGE_EXTENSIONS)})"
        )
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise ValueError(f"two input images share the id {path.stem!r}: {seen[path.stem]} and {path}")
        seen[path.stem] = path
    return [{"image": str(p), "image_id": p.stem, "source": str(p)} for p in files]


class TaskOutputsToKeysd(MapTransform):
    """Put the multi-task network output ``{task: tensor}`` held under ``pred`` under one key per task: the main
    task's output stays under ``pred`` (what MONAI Label reads), every other task's goes under its own name. A
    ``pred`` that is already a tensor is left as it is.

    Args:
        keys: the key of the network output (``pred``).
        main_task: the task whose output stays under the key (the segmentation).
        allow_missing_keys: skip missing keys instead of raising.

    Raises:
        KeyError: when the output lacks ``main_task``.

    Example:
        >>> out = TaskOutputsToKeysd("pred", "seg")({"pred": {"seg": torch.zeros(2, 4, 4), "dx": torch.zeros(7)}})
        >>> tuple(out["pred"].shape), tuple(out["dx"].shape)
        ((2, 4, 4), (7,))
    """

    def __init__(self, keys: KeysCollection = "pred", main_task: str = "seg", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.main_task = main_task

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], Mapping):
                outputs = d[key]
                if self.main_task not in outputs:
                    raise KeyError(f"network output has no {self.main_task!r}; got {sorted(outputs)}")
                for task, value in outputs.items():
                    if task != self.main_task:
                        d[task] = value
                d[key] = outputs[self.main_task]
        return d


class WriteHAM10000Predictiond(MapTransform):
    """Write one image's predictions to ``output_dir``: ``<image_id>_segmentation.png`` (the lesion mask, 0/255 8-bit
    grey, named as HAM10000's masks) and ``<image_id>_dx.json`` (the predicted diagnosis and the probability of every
    class). Both are written atomically. The image's table row is left under ``prediction_record`` for
    :class:`PredictionTableHandler`.

    Args:
        keys: the segmentation key (``pred``): a label map ``[1, H, W]`` or class scores ``[C, H, W]`` (argmax taken).
        output_dir: the output folder (created).
        cls_key: the key of the diagnosis probabilities ``[num_classes]``.
        class_names: the diagnosis classes in index order.
        id_key: the key of the image id.
        source_key: the key of the input file path (recorded in the JSON).
        allow_missing_keys: skip missing keys instead of raising.

    Raises:
        ValueError: when the probabilities do not have one entry per class.

    Example:
        >>> writer = WriteHAM10000Predictiond("pred", output_dir="predictions")  # doctest: +SKIP
        >>> writer({"pred": mask, "dx": probs, "image_id": "ISIC_0024306"})  # doctest: +SKIP
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike[str] = "predictions",
        cls_key: str = "dx",
        class_names: Sequence[str] = HAM10000_CLASSES,
        id_key: str = "image_id",
        source_key: str = "source",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.cls_key = cls_key
        self.class_names = list(class_names)
        self.id_key, self.source_key = id_key, source_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image_id = str(d.get(self.id_key, "image"))
            seg = torch.as_tensor(d[key]).detach().cpu()
            labels = seg.argmax(0) if seg.shape[0] > 1 else seg[0]
            mask = (labels.numpy() > 0).astype(np.uint8) * 255
            mask_file = self.output_dir / f"{image_id}{MASK_SUFFIX}"
            with atomic_path(mask_file) as tmp:
                Image.fromarray(mask, mode="L").save(tmp, format="PNG")
            record: dict[str, Any] = {"image_id": image_id, "mask": mask_file.name}
            if self.cls_key in d:
                probs = torch.as_tensor(d[self.cls_key]).detach().float().cpu().reshape(-1)
                if probs.numel() != len(self.class_names):
                    raise ValueError(
                        f"{image_id}: {probs.numel()} diagnosis probabilities for {len(self.class_names)} classes"
                    )
                record["predicted_class"] = self.class_names[int(probs.argmax())]
                record["probabilities"] = {n: float(p) for n, p in zip(self.class_names, probs.tolist())}
            record["lesion_fraction"] = float((mask > 0).mean())
            record["source"] = str(d.get(self.source_key, ""))
            atomic_write_json(self.output_dir / f"{image_id}_dx.json", record)
            d[RECORD_KEY] = record
            logger.info("%s: wrote %s and %s_dx.json", image_id, mask_file.name, image_id)
        return d


class PredictionTableHandler(RunCollectorHandler):
    """After inference, write ``predictions.csv`` (atomically): one row per image with the predicted class, the
    probability of every class, the lesion's share of the image and the mask file, from the records that
    :class:`WriteHAM10000Predictiond` leaves in the evaluator's (decollated) output.

    Args:
        output_dir: the output folder.
        class_names: the diagnosis classes in index order (the probability columns).
        filename: the table's file name.

    Example:
        >>> handler = PredictionTableHandler("predictions")  # doctest: +SKIP
        >>> handler.attach(evaluator)  # doctest: +SKIP
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        class_names: Sequence[str] = HAM10000_CLASSES,
        filename: str = "predictions.csv",
    ) -> None:
        self.path = Path(output_dir) / filename
        self.class_names = list(class_names)
        self.records: list[dict[str, Any]] = []

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the records of a previous run."""
        self.records = []

    def iteration_completed(self, engine: Engine) -> None:
        """Keep the records of the images of the batch just predicted."""
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        self.records += [item[RECORD_KEY] for item in items if isinstance(item, Mapping) and RECORD_KEY in item]

    def run_completed(self, engine: Engine) -> None:
        """Write the table."""
        columns = ["image_id", "predicted_class", *[f"prob_{n}" for n in self.class_names], "lesion_fraction", "mask"]
        rows = []
        for record in self.records:
            probs = record.get("probabilities", {})
            rows.append(
                [
                    record["image_id"],
                    record.get("predicted_class"),
                    *[probs.get(n) for n in self.class_names],
                    record["lesion_fraction"],
                    record["mask"],
                ]
            )
        write_csv(self.path, columns, rows)
        logger.info("wrote %s (%d images)", self.path, len(self.records))


class CheckImageFiled(MapTransform):
    """Check the image file under the key before it is loaded: it exists, is not empty and is a 2D picture that
    Pillow reads (PNG, JPEG, ...; any colour mode, the loader converts to RGB).

    Args:
        keys: the key of the image path (``image``).
        allow_missing_keys: skip missing keys instead of raising.

    Raises:
        InputImageError: naming the file and the problem.

    Example:
        >>> CheckImageFiled("image")({"image": "ISIC_0024306.jpg"})  # doctest: +SKIP
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if not isinstance(d[key], (str, os.PathLike)):
                continue  # an array handed over directly
            path = check_input_file(d[key])
            if path.is_dir():
                raise InputImageError(f"input {str(path)!r} is a folder: this bundle needs one PNG or JPEG image")
            try:
                with Image.open(path) as image:
                    image.verify()
                    frames = getattr(image, "n_frames", 1)
            except Exception as err:  # Pillow's errors for a file it cannot read
                raise InputImageError(
                    f"input {str(path)!r} is not an image Pillow can read (PNG, JPEG): {err}"
                ) from None
            if frames > 1:
                raise InputImageError(f"input {str(path)!r} holds {frames} frames: this bundle needs one 2D image")
        return d


class LabelResultd(MapTransform):
    """Hand the lesion mask and the diagnosis to MONAI Label: ``pred`` (a label map ``[1, H, W]`` or scores
    ``[C, H, W]`` at the input's size) becomes the uint8 label map ``[W, H]`` (0 background, 1 lesion, no channel
    axis) in the index order of MONAI's image readers, which MONAI Label's writer transposes back into an ``H x W``
    PNG; the result JSON (``data[result_key]``) gets ``{"diagnosis": {"predicted_class", "probabilities":
    {class: p}}}``, and the result is written as PNG (``result_extension``, never a lossy JPEG) of dtype uint8.

    Args:
        keys: the segmentation key (``pred``).
        cls_key: the key of the diagnosis probabilities ``[num_classes]``.
        class_names: the diagnosis classes in index order.
        result_key: the result JSON key.
        allow_missing_keys: skip missing keys instead of raising.

    Raises:
        ValueError: when the probabilities do not have one entry per class.

    Example:
        >>> to_result = LabelResultd("pred", class_names=["a", "b"])
        >>> d = to_result({"pred": torch.ones(1, 3, 5), "dx": torch.tensor([0.2, 0.8])})
        >>> tuple(d["pred"].shape), d["result"]["diagnosis"]["predicted_class"]
        ((5, 3), 'b')
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        cls_key: str = "dx",
        class_names: Sequence[str] = HAM10000_CLASSES,
        result_key: str = "result",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.cls_key, self.result_key = cls_key, result_key
        self.class_names = list(class_names)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            seg = torch.as_tensor(d[key]).detach().cpu()
            labels = (seg.argmax(0) if seg.shape[0] > 1 else seg[0]) > 0
            d[key] = labels.to(torch.uint8).T.contiguous()  # [H, W] -> [W, H]
            result = dict(d.get(self.result_key) or {})
            if self.cls_key in d:
                probs = torch.as_tensor(d[self.cls_key]).detach().float().cpu().reshape(-1)
                if probs.numel() != len(self.class_names):
                    raise ValueError(f"{probs.numel()} diagnosis probabilities for {len(self.class_names)} classes")
                result["diagnosis"] = {
                    "predicted_class": self.class_names[int(probs.argmax())],
                    "probabilities": {n: round(float(p), 6) for n, p in zip(self.class_names, probs.tolist())},
                }
                d.pop(self.cls_key)
            result["lesion_fraction"] = round(float(labels.float().mean()), 6)
            d[self.result_key] = result
            d["result_extension"] = ".png"
            d["result_dtype"] = "uint8"
        return d
