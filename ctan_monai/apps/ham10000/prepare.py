"""Glue for the HAM10000 bundle: find the data (or write the synthetic demo), validate it and split it by lesion once,
and build the class-imbalance pieces the config switches between (weighted sampler, class-weighted loss, none).

Class imbalance (nv is about two thirds of HAM10000) is handled in one of three ways, chosen by ``class_balance``:

- ``"sampler"`` (the bundle's default): the training loader draws images with replacement, each with the weight of
  its diagnosis (``balance_method``: ``inverse_frequency`` draws the classes about equally often,
  ``inverse_sqrt`` half-way); the losses stay unweighted means.
- ``"loss_weights"``: the images are drawn uniformly and the diagnosis cross-entropy weighs each image by its
  class weight (same ``balance_method``, scaled so that the mean weight over the training images is 1).
- ``"none"``: neither.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ctan_monai.apps.ham10000.sampling import BALANCE_METHODS, class_count_table, class_counts, class_weights
from ctan_monai.apps.ham10000.splits import DEFAULT_FRACTIONS, prepare_splits
from ctan_monai.apps.ham10000.transforms import mask_transforms
from ctan_monai.apps.ham10000.validation import HAM10000_CLASSES, find_dataset_dir
from ctan_monai.data.samplers import RandomSubsetSampler, WeightedSubsetSampler
from ctan_monai.engines.image_floors import ClassificationFloor, ImageFloor, MaskFloor
from ctan_monai.losses.task_losses import ClassificationLoss

__all__ = [
    "CLASS_BALANCE_MODES",
    "diagnosis_task_losses",
    "prepare_ham10000",
    "sample_weights",
    "training_floor",
    "training_sampler",
]

logger = logging.getLogger("ctan_monai.ham10000")

#: Ways of handling the class imbalance of the diagnosis task (see the module docstring).
CLASS_BALANCE_MODES = ("sampler", "loss_weights", "none")


def _check_balance(class_balance: str, method: str) -> None:
    if class_balance not in CLASS_BALANCE_MODES:
        raise ValueError(f"class_balance must be one of {CLASS_BALANCE_MODES}, got {class_balance!r}")
    if method not in BALANCE_METHODS:
        raise ValueError(f"balance_method must be one of {BALANCE_METHODS}, got {method!r}")


def _check_split_dataset(split_file: Path, dataset_dir: Path) -> None:
    """Refuse a split file written for another dataset folder (its relative paths would point into this one)."""
    if not split_file.is_file():
        return
    try:
        recorded = json.loads(split_file.read_text(encoding="utf-8")).get("dataset_dir")
    except ValueError as err:
        raise ValueError(f"{split_file}: split file is not valid JSON ({err}); delete it to split again") from err
    if recorded and Path(recorded).resolve() != dataset_dir.resolve():
        raise ValueError(
            f"{split_file}: split file was made for the dataset at {recorded}, not {dataset_dir}; "
            "delete it or choose another output_dir"
        )


def prepare_ham10000(
    dataset_dir: str | os.PathLike[str],
    split_file: str | os.PathLike[str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    write_demo_if_missing: bool = False,
    demo_images: int = 70,
    skip_bad: bool = False,
    deep: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Make HAM10000 ready for training: validate every case up front, split by lesion (stratified by diagnosis) once
    and write the split to ``split_file`` for auditing; later calls read the same split. The images per class and
    split are logged on every call.

    Args:
        dataset_dir: the HAM10000 folder (holding ``HAM10000_metadata.csv``) or a folder containing it.
        split_file: where the split is written (JSON), or read from when it exists.
        fractions: shares of the lesions of each class for ``training``, ``validation`` and ``test``.
        seed: seed of the split.
        write_demo_if_missing: when no metadata CSV is found under ``dataset_dir``, write the synthetic demo
            dataset there (the bundle's default points at its own ``demo_data`` folder).
        demo_images: images of the demo dataset.
        skip_bad: drop the cases with problems (listed in the log) instead of stopping.
        deep: fully decode every JPEG during validation.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``: entries with ``image``, ``seg``, ``dx``,
        ``image_id`` and ``lesion_id``.

    Raises:
        FileNotFoundError: when ``dataset_dir`` holds no HAM10000 layout (and no demo is to be written).
        DatasetValidationError: listing every problem of every bad case, each naming its file.
        ValueError: when ``split_file`` was made for another dataset folder, seed or fractions.

    Example:
        >>> splits = prepare_ham10000("demo_data/ham10000", "runs/ctan/splits.json", write_demo_if_missing=True)
        ... # doctest: +SKIP
        >>> sorted(splits)  # doctest: +SKIP
        ['test', 'training', 'validation']
    """
    try:
        root = find_dataset_dir(dataset_dir)
    except FileNotFoundError:
        if not write_demo_if_missing:
            raise
        from ctan_monai.apps.ham10000.demo import write_ham10000_demo

        logger.info("no HAM10000 metadata in %s: writing the synthetic demo dataset there", dataset_dir)
        root = write_ham10000_demo(dataset_dir, n_images=demo_images, seed=seed)
    split_path = Path(split_file)
    _check_split_dataset(split_path, root)
    existed = split_path.is_file()
    splits = prepare_splits(root, split_path, fractions=fractions, seed=seed, skip_bad=skip_bad, deep=deep)
    if existed:  # a new split's table is logged by prepare_splits
        logger.info("HAM10000 at %s, split read from %s:\n%s", root, split_path, class_count_table(splits))
    return splits


def sample_weights(datalist: Sequence[Mapping[str, Any]], method: str = "inverse_frequency") -> torch.Tensor:
    """Per-image drawing weights: the class weight (``ham10000.sampling.class_weights``) of its diagnosis.

    Args:
        datalist: entries with an integer ``dx``.
        method: ``"inverse_frequency"``, ``"inverse_sqrt"`` or ``"none"``.

    Returns:
        float64 tensor ``[len(datalist)]``.

    Raises:
        ValueError: for an unknown method or an empty datalist.

    Example:
        >>> sample_weights([{"dx": 5}, {"dx": 5}, {"dx": 4}]).tolist()
        [0.75, 0.75, 1.5]
    """
    if not datalist:
        raise ValueError("no training image to weigh: the training split is empty")
    per_class = class_weights(class_counts(datalist), method)
    return per_class[torch.as_tensor([int(e["dx"]) for e in datalist])].double()


def training_sampler(
    datalist: Sequence[Mapping[str, Any]],
    class_balance: str = "sampler",
    method: str = "inverse_frequency",
    num_samples: int | None = None,
    seed: int = 0,
    distributed: bool = False,
) -> RandomSubsetSampler:
    """The training loader's sampler for a class-balance mode (use it with ``shuffle=False``).

    ``"sampler"``: a ``WeightedSubsetSampler`` drawing each image with the weight of its class (``method``), with
    replacement. ``"loss_weights"`` and ``"none"``: a ``RandomSubsetSampler`` (a fresh random order, or random subset
    of ``num_samples``, each epoch). Both draw from ``seed`` and the epoch, and shard the draw over the DDP ranks
    when ``distributed``.

    Args:
        datalist: the training entries (integer ``dx``).
        class_balance: ``"sampler"``, ``"loss_weights"`` or ``"none"``.
        method: class weighting (``"inverse_frequency"``, ``"inverse_sqrt"``, ``"none"``) for ``"sampler"``.
        num_samples: images per epoch over all ranks; None: as many as there are training images.
        seed: seed of the draws.
        distributed: shard over the ranks of the initialised process group (``multi_gpu_train.yaml``).

    Returns:
        the sampler.

    Raises:
        ValueError: for an unknown mode or method, an empty datalist or a malformed ``num_samples``.

    Example:
        >>> sampler = training_sampler([{"dx": 5}] * 9 + [{"dx": 4}], num_samples=20)
        >>> len(list(sampler))
        20
    """
    _check_balance(class_balance, method)
    if not datalist:
        raise ValueError("the training split is empty: nothing to sample")
    if class_balance == "sampler":
        return WeightedSubsetSampler(sample_weights(datalist, method), num_samples, distributed, seed)
    return RandomSubsetSampler(range(len(datalist)), num_samples, distributed, seed)


def diagnosis_task_losses(
    datalist: Sequence[Mapping[str, Any]],
    class_balance: str = "sampler",
    method: str = "inverse_frequency",
    task: str = "dx",
) -> dict[str, ClassificationLoss] | None:
    """The ``task_losses`` argument of ``MultiTaskLoss`` for a class-balance mode: a class-weighted cross-entropy for
    the diagnosis task with ``"loss_weights"``, else None (the default, unweighted loss).

    Args:
        datalist: the training entries (integer ``dx``), whose class counts set the weights.
        class_balance: ``"sampler"``, ``"loss_weights"`` or ``"none"``.
        method: ``"inverse_frequency"``, ``"inverse_sqrt"`` or ``"none"``.
        task: the diagnosis task's name.

    Returns:
        ``{task: ClassificationLoss(weight=...)}`` or None.

    Raises:
        ValueError: for an unknown mode or method, or an empty datalist.

    Example:
        >>> losses = diagnosis_task_losses([{"dx": 5}] * 3 + [{"dx": 4}], "loss_weights")
        >>> [round(w, 3) for w in losses["dx"].weight.tolist()][4:6]
        [2.0, 0.667]
    """
    _check_balance(class_balance, method)
    if class_balance != "loss_weights":
        return None
    if not datalist:
        raise ValueError("the training split is empty: no class counts to weigh the loss with")
    weights = class_weights(class_counts(datalist), method)
    logger.info("diagnosis loss class weights (%s): %s", method, [round(w, 3) for w in weights.tolist()])
    return {task: ClassificationLoss(weight=weights)}


def training_floor(
    datalist: Sequence[Mapping[str, Any]],
    image_size: int | Sequence[int],
    class_names: Sequence[str] = HAM10000_CLASSES,
    seg_key: str = "seg",
    dx_key: str = "dx",
) -> ImageFloor:
    """The trivial floors of the HAM10000 evaluation, from the training entries only: the diagnosis class counts
    (majority class, class prior) and the mean training lesion mask at the network's input resolution, each mask
    read, thresholded and resized exactly as for evaluation (``mask_transforms(image_size)``: nearest
    interpolation), averaged pixel-wise and thresholded at 0.5.

    Args:
        datalist: the training entries (``@data['training']``), with ``seg`` mask paths and integer ``dx``.
        image_size: the network's input size (``@image_size``), an int or ``(height, width)``.
        class_names: the diagnosis classes in index order.
        seg_key: the mask's key.
        dx_key: the diagnosis' key.

    Returns:
        the ``ImageFloor`` for ``ImageEvaluationHandler(floor=...)``.

    Raises:
        ValueError: when the training split is empty or holds no mask / no diagnosis.

    Example:
        >>> floor = training_floor(splits["training"], 224)  # doctest: +SKIP
        >>> floor.classification.majority_name  # doctest: +SKIP
        'nv'
    """
    if not datalist:
        raise ValueError("the training split is empty: no floor can be built from it")
    start = time.perf_counter()
    classification = ClassificationFloor.from_datalist(datalist, class_names, key=dx_key)
    segmentation = MaskFloor.from_datalist(datalist, mask_transforms(image_size), key=seg_key)
    logger.info(
        "trivial floor from %d training images (%.1f s): majority class %s (%d), mean training mask %s with "
        "%.1f%% foreground after thresholding at 0.5",
        len(datalist),
        time.perf_counter() - start,
        classification.majority_name,
        max(classification.counts),
        "x".join(str(s) for s in segmentation.mean_mask.shape),
        100.0 * segmentation.label_map.mean(),
    )
    return ImageFloor(classification=classification, segmentation=segmentation)
