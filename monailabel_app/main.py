"""MONAI Label app serving the CTAN bundles (``bundles/ctan_*``), on the pattern of MONAI Label's ``monaibundle``
sample app: one inference task per bundle (MONAI Label's ``BundleInferTask`` on the bundle's
``configs/inference.yaml``: its ``pre_transforms``, ``inferer``, ``post_transforms``) and one training task per bundle
with a ``configs/monailabel_train.yaml`` (``BundleTrainTask`` on ``configs/train.yaml`` plus those overrides).

Start it with ``python monailabel_app/start_server.py --studies <folder>`` (see that file and the README section
"Use in MONAI Label"). Options (``--conf NAME VALUE``):

- ``bundles_dir``: the folder holding the bundles (default: this repository's ``bundles/``).
- ``models``: the bundles to serve, comma-separated folder names, or ``all`` (default).
- ``<bundle>_images``: the datastore images a bundle trains on, a file-name pattern (default ``*``): one datastore
  may hold the images of several bundles (e.g. ``--conf ctan_openkbp_images 'okbp_*'``).

What differs from the stock ``monaibundle`` app, and why:

- the model type, dimension and labels come from each bundle's ``metadata.json`` (a classification bundle need not
  have "classification" in its folder name; a 2D-slice network on 3D CTs is a 3D model for the client);
- the other outputs (dose, diagnosis, probCOVID / probSevere) are listed in ``/info`` and returned in the response
  JSON (the bundles' post transforms put them under ``data["result"]``);
- a bad input (empty file, RGB image sent to a CT bundle, 2D image sent to a 3D one, unreadable file) is answered
  with HTTP 422 and a message naming the problem, not a 500;
- nothing is fetched from the model zoo: the bundles are local folders.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_APP_DIR = os.path.dirname(os.path.abspath(__file__))
if _APP_DIR not in sys.path:
    sys.path.insert(0, _APP_DIR)

import compat  # noqa: E402  (before any monailabel import: see compat.py)

compat.install()

from ctan_tasks import bundle_profile, filter_datalist, train_overrides  # noqa: E402
from fastapi import HTTPException  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: E402

import ctan_monai  # noqa: E402
from ctan_monai.data.inputs import InputImageError  # noqa: E402

logger = logging.getLogger(__name__)

#: HTTP status of a request whose image the bundle cannot take (the file arrived, its content is unusable).
BAD_INPUT_STATUS = 422


class CTANBundleInferTask(BundleInferTask):
    """MONAI Label's bundle inference with the type, dimension, labels and extra outputs of a CTAN bundle.

    Args:
        path: the bundle folder.
        conf: the app's configuration (``--conf`` pairs).
        profile: :func:`ctan_tasks.bundle_profile` of the bundle.

    Example:
        >>> path = "bundles/ctan_openkbp"
        >>> task = CTANBundleInferTask(path, {}, bundle_profile(path))  # doctest: +SKIP
    """

    def __init__(self, path: str, conf: dict[str, str], profile: Mapping[str, Any]) -> None:
        classification = profile["type"] == InferType.CLASSIFICATION
        super().__init__(
            path,
            conf,
            type=profile["type"],
            add_post_restore=not classification,  # Restored resizes and sets an affine: images only
            load_strict=True,  # weights that do not fit the network are an error, not a random model
        )
        if not self.valid:
            return
        self.dimension = int(profile["dimension"])
        self.labels = dict(profile["labels"])
        self.extra_info = dict(profile["info"])

    def info(self) -> dict[str, Any]:
        """The task's ``/info`` entry plus the bundle's other outputs (``outputs``) and input (``input``)."""
        i = super().info()
        i.update(self.extra_info)
        return i

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
        """Write the label (images) or list the scores (classification), keeping ``data["result"]`` in the reply.

        Args:
            data: the post-processed data.
            extension: the label file's extension (default: the data's ``result_extension`` or the input's).
            dtype: the label file's dtype.

        Returns:
            ``(label file or None, result JSON)``.
        """
        if self.type != InferType.CLASSIFICATION:
            source = str(data.get("image_path") or "")
            if extension is None and not data.get("result_extension") and (os.path.isdir(source) or not source):
                extension = ".nii.gz"  # a DICOM series folder: the label goes back as NIfTI
            return super().writer(data, extension, dtype)
        names = {v: k for k, v in self.labels.items()}
        scores = [float(s) for s in data[self.output_label_key].reshape(-1).tolist()]
        prediction = [{"idx": i, "label": names.get(i, f"label_{i}"), "score": s} for i, s in enumerate(scores)]
        return None, {**dict(data.get(self.output_json_key) or {}), "prediction": prediction}


class CTANBundleTrainTask(BundleTrainTask):
    """MONAI Label's bundle training with the bundle's ``configs/monailabel_train.yaml`` overrides.

    MONAI Label's own overrides (data, epochs, device, the loader of ``models/model.pt``) are kept; the bundle's
    file adds what its ``train.yaml`` needs to train from datastore images (orientation, intensity scale, no
    resume, a lean handler list that writes ``models/model.pt`` at the end). Every labelled image that matches
    ``image_pattern`` trains (there is no validation: ``val_split`` is not used).

    Args:
        path: the bundle folder.
        conf: the app's configuration.
        overrides: the bundle's ``monailabel_train.yaml``.
        image_pattern: the datastore images this bundle trains on (file-name pattern; ``*``: all).

    Example:
        >>> CTANBundleTrainTask("bundles/ctan_openkbp", {}, train_overrides("bundles/ctan_openkbp"))  # doctest: +SKIP
    """

    def __init__(self, path: str, conf: dict[str, str], overrides: dict[str, Any], image_pattern: str = "*") -> None:
        super().__init__(path, conf, load_strict=True)
        self.bundle_overrides = dict(overrides)
        self.image_pattern = image_pattern

    def _fetch_datalist(self, request: dict[str, Any], datastore: Any) -> list[dict[str, Any]]:
        """The datastore's labelled images that match ``image_pattern``."""
        return filter_datalist(super()._fetch_datalist(request, datastore), self.image_pattern)

    def _partition_datalist(
        self, datalist: list[dict[str, Any]], request: dict[str, Any], shuffle: bool = False
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every item trains; no validation split."""
        if not datalist:
            raise ValueError(f"no labelled image in the datastore matches {self.image_pattern!r}")
        return list(datalist), []

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Add the bundle's overrides; MONAI Label's first handler (the weights loader) stays first."""
        loaders = [
            h
            for h in overrides.get(self.const.key_train_handlers(), [])
            if isinstance(h, Mapping) and h.get("_target_") == "CheckpointLoader"
        ]
        for key, value in self.bundle_overrides.items():
            overrides[key] = value
        key = self.const.key_train_handlers()
        overrides[key] = [*loaders, *self.bundle_overrides.get(key, [])]
        overrides["epochs"] = overrides[self.const.key_train_trainer_max_epochs()]
        overrides.pop(self.const.key_validate_dataset_data(), None)
        return overrides


def _input_error(err: BaseException) -> InputImageError | None:
    """The :class:`InputImageError` in an exception's chain, if any."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, InputImageError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class CTANApp(MONAILabelApp):
    """The MONAI Label app of the CTAN bundles (see the module docstring).

    Args:
        app_dir: this folder.
        studies: the datastore (a folder of images, with ``labels/final/`` for training).
        conf: the ``--conf`` pairs (``bundles_dir``, ``models``).

    Raises:
        FileNotFoundError: when ``bundles_dir`` or a named bundle does not exist.

    Example:
        >>> app = CTANApp("monailabel_app", "studies", {"models": "ctan_openkbp"})  # doctest: +SKIP
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        default_dir = Path(app_dir).resolve().parent / "bundles"
        self.bundles_dir = Path(conf.get("bundles_dir") or default_dir).resolve()
        if not self.bundles_dir.is_dir():
            raise FileNotFoundError(f"bundles_dir {str(self.bundles_dir)!r} is not a folder (--conf bundles_dir DIR)")
        wanted = [m.strip() for m in conf.get("models", "all").split(",") if m.strip()]
        available = sorted(p.name for p in self.bundles_dir.iterdir() if (p / "configs" / "metadata.json").is_file())
        names = available if wanted in ([], ["all"]) else wanted
        missing = [n for n in names if n not in available]
        if missing:
            raise FileNotFoundError(
                f"bundle(s) {missing} not found in {str(self.bundles_dir)!r} (available: {available})"
            )
        self.bundle_paths = {n: str(self.bundles_dir / n) for n in names}
        self.profiles = {n: bundle_profile(p) for n, p in self.bundle_paths.items()}
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="CTAN bundles (ctan_monai)",
            description="Cross-Task Attention Network multi-task bundles: " + ", ".join(names),
            version=getattr(ctan_monai, "__version__", "0"),
        )

    def init_infers(self) -> dict[str, InferTask]:
        """One inference task per bundle that has a model (``models/model.pt``)."""
        infers: dict[str, InferTask] = {}
        for name, path in self.bundle_paths.items():
            task = CTANBundleInferTask(path, self.conf, self.profiles[name])
            if task.is_valid():
                infers[name] = task
                logger.info("+++ inference: %s (%s, %dD)", name, task.type, task.dimension)
            else:
                logger.warning("--- %s: no inference (no models/model.pt?)", name)
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        """A training task for every bundle with a ``configs/monailabel_train.yaml``; it trains on the datastore's
        labelled images whose file name matches ``--conf <bundle>_images PATTERN`` (default ``*``)."""
        trainers: dict[str, TrainTask] = {}
        for name, path in self.bundle_paths.items():
            overrides = train_overrides(path)
            if overrides is None:
                continue
            task = CTANBundleTrainTask(path, self.conf, overrides, self.conf.get(f"{name}_images", "*"))
            if task.is_valid():
                trainers[name] = task
                logger.info("+++ training: %s (images %s)", name, task.image_pattern)
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        """Active-learning strategies: a random or the first unlabelled image."""
        return {"random": Random(), "first": First()}

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """Run inference; an input the bundle cannot take becomes HTTP 422 with the reason.

        Args:
            request: MONAI Label's request (``model``, ``image``, ...).
            datastore: the datastore (default: the app's).

        Returns:
            MONAI Label's result (``label``, ``params``, ...).

        Raises:
            HTTPException: 422 naming the model and the problem of the input.
        """
        try:
            return super().infer(request, datastore)
        except Exception as err:
            bad_input = _input_error(err)
            if bad_input is None:
                raise
            logger.warning("infer %s: refused input: %s", request.get("model"), bad_input)
            raise HTTPException(
                status_code=BAD_INPUT_STATUS,
                detail=f"model {request.get('model')!r}: {bad_input}",
            ) from None
