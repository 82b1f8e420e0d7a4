"""The training step of every bundle makes no host-device synchronisation from our code (issue 17).

A synchronisation is any call that needs a tensor's *values* on the host: ``bool(t)``, ``int(t)``, ``float(t)``,
``t.item()``, ``t.tolist()``, ``t.cpu()``, ``t.numpy()``, ``nonzero`` (and ``torch.nonzero`` / ``argwhere`` /
``unique`` / ``masked_select`` / ``bincount`` / ``equal``, whose result size or value depends on the data) and
boolean-mask indexing ``t[mask]`` / ``t[mask] = v``. On a GPU each one stalls the host until the device has caught
up. :class:`SyncRecorder` patches all of them on ``torch.Tensor`` / ``torch`` and records, for every call, the first
frame of the calling stack outside the ``torch`` package: a call that PyTorch makes for our code (e.g. ``item()``
inside a ``torch.nn.functional`` helper we call) is ours, one that MONAI's or Ignite's engine makes is theirs.

The step is MONAI's ``SupervisedTrainer`` iteration as each bundle's ``configs/train.yaml`` builds it (network,
``MultiTaskLoss``, Adam, ``MultiTaskPrepareBatch``, the ``amp`` / ``channels_last`` options), on a 32 x 32 ResNet-18
batch with the bundle's label keys, partially labelled samples and placeholder labels (-1, NaN) included; the
trainer's handlers are left out. Handlers that log the loss every iteration (ProgressBarHandler, Ignite's
TerminateOnNan, MONAI's StatsHandler / TensorBoardStatsHandler) read it once per iteration by design, outside the
step: they are not counted here (one read of the loss per iteration, which a user can thin out by logging less
often). Syncs MONAI, Ignite and PyTorch make themselves are recorded but not ours: in these steps only Adam's
``item()`` of its step counters (CPU tensors, so no device sync either).

The label checks that used to run in every loss call now run where the data enter (the datasets and readers), or
in the loss only outside training steps / behind ``CTAN_MONAI_VALIDATE_INPUTS=1``: the last tests show both give the
same clear errors.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

import ctan_monai
from ctan_monai.data.slices import AxialSliceDataset
from ctan_monai.data.validation import DatasetValidationError
from ctan_monai.engines.precision import AutocastInferer, is_channels_last
from ctan_monai.losses import (
    VALIDATE_INPUTS_ENV,
    ClassificationLoss,
    MaskedMAELoss,
    MultiTaskLoss,
    SegmentationComboLoss,
)
from ctan_monai.tasks import TaskSpec, parse_tasks
from tests.conftest import REPO_ROOT

OUR_ROOT = str(Path(ctan_monai.__file__).resolve().parent)
TORCH_ROOT = str(Path(torch.__file__).resolve().parent)
SIZE = 32
BATCH = 4

# methods of torch.Tensor that always read values on the host
_TENSOR_SYNCS = (
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__complex__",
    "item",
    "tolist",
    "cpu",
    "numpy",
    "nonzero",
    "unique",
    "masked_select",
    "bincount",
)
# torch functions whose result depends on values on the host (size or a Python value)
_TORCH_SYNCS = ("nonzero", "argwhere", "unique", "masked_select", "bincount", "equal", "is_nonzero")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the steps are tiny, and on a shared 2-core machine OpenMP threads waiting for each other
    cost more CPU time than the second thread saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _has_bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncRecorder:
    """Patch the synchronising calls of ``torch`` and record who made them.

    ``calls`` holds ``(what, file, line)`` for every outermost call (one a synchronising call makes internally is
    not counted again), ``file`` being the first frame outside the ``torch`` package.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self._local = threading.local()
        self._saved: list[tuple[Any, str, bool, Any]] = []

    def ours(self) -> list[tuple[str, str, int]]:
        """The calls made from files of the ``ctan_monai`` package."""
        return [c for c in self.calls if c[1].startswith(OUR_ROOT)]

    def _record(self, what: str) -> None:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(TORCH_ROOT):
            frame = frame.f_back
        where = ("?", 0) if frame is None else (frame.f_code.co_filename, frame.f_lineno)
        self.calls.append((what, *where))

    def _wrap(self, name: str, original: Callable[..., Any], condition: Callable[..., bool] | None) -> Callable:
        recorder = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(recorder._local, "depth", 0)
            if depth == 0 and (condition is None or condition(*args, **kwargs)):
                recorder._record(name)
            recorder._local.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                recorder._local.depth = depth

        return wrapper

    def _patch(self, owner: Any, name: str, condition: Callable[..., bool] | None = None) -> None:
        had = name in vars(owner)
        original = getattr(owner, name)
        self._saved.append((owner, name, had, vars(owner).get(name)))
        label = f"{'Tensor.' if owner is torch.Tensor else 'torch.'}{name}"
        setattr(owner, name, self._wrap(label, original, condition))

    def __enter__(self) -> SyncRecorder:
        for name in _TENSOR_SYNCS:
            self._patch(torch.Tensor, name)
        self._patch(torch.Tensor, "__getitem__", lambda self, index: _has_bool_mask(index))
        self._patch(torch.Tensor, "__setitem__", lambda self, index, value: _has_bool_mask(index))
        for name in _TORCH_SYNCS:
            self._patch(torch, name)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, had, original in reversed(self._saved):
            if had:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._saved.clear()


# ---------------------------------------------------------------- the recorder itself


def test_recorder_sees_each_kind_of_sync_and_who_made_it() -> None:
    x = torch.arange(6.0)
    with SyncRecorder() as recorder:
        bool(x[0] > 1)
        float(x.sum())
        x.max().item()
        x.tolist()
        x[x > 2]
        x[x > 4] = 0.0
        torch.nonzero(x)
        torch.equal(x, x)
        x[1:3]  # slicing: no sync
        x[torch.tensor([0, 2])]  # integer indexing: no sync
        # a sync of ours: MultiTaskLoss reads the last losses back when asked
        loss = MultiTaskLoss([{"name": "dx", "level": "image", "kind": "classification", "out_channels": 3}])
        loss({"dx": torch.zeros(2, 3, requires_grad=True)}, {"dx": torch.tensor([0, 2])})
        _ = loss.last_losses
    kinds = [what for what, _, _ in recorder.calls]
    for expected in ("Tensor.__bool__", "Tensor.__float__", "Tensor.item", "Tensor.tolist", "Tensor.__getitem__"):
        assert expected in kinds
    assert {"Tensor.__setitem__", "torch.nonzero", "torch.equal"} <= set(kinds)
    assert sum(k == "Tensor.__getitem__" for k in kinds) == 1
    assert all(file == __file__ for _, file, _ in recorder.calls if not file.startswith(OUR_ROOT))
    ours = recorder.ours()
    assert [what for what, _, _ in ours] == ["Tensor.tolist"] and ours[0][1].endswith("multitask.py")
    # everything is restored
    assert "__bool__" not in vars(torch.Tensor) and torch.nonzero.__module__ != __name__


# ---------------------------------------------------------------- one training step per bundle configuration

# the label keys each bundle's datasets give a batch (see ctan_monai.data.slices, .ham10000, .stoic)
BUNDLES: dict[str, dict[str, Any]] = {
    "openkbp": {"in_channels": 1, "extras": {"seg": ("_present", "_class_present"), "dose": ("_present", "_mask")}},
    "prostate": {"in_channels": 1, "extras": {"seg": ("_present", "_class_present"), "dose": ("_present", "_mask")}},
    "ham10000": {"in_channels": 3, "extras": {"seg": ("_present",), "dx": ("_present",)}},
    "stoic": {"in_channels": 3, "extras": {"covid": ("_present",), "severe": ("_present",)}},
}


def _batch(tasks: list[TaskSpec], in_channels: int, extras: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """A synthetic batch in the bundle's conventions: the last sample lacks every label (placeholders -1 / NaN), a
    dose mask is empty, a class is not annotated in one sample."""
    gen = torch.Generator().manual_seed(0)
    batch: dict[str, Any] = {"image": torch.rand(BATCH, in_channels, SIZE, SIZE, generator=gen)}
    present = torch.ones(BATCH)
    present[-1] = 0.0
    for task in tasks:
        name, keys = task.name, extras[task.name]
        if task.kind == "segmentation":
            label = torch.randint(0, task.out_channels, (BATCH, 1, SIZE, SIZE), generator=gen)
            if "_class_present" in keys:
                flags = torch.ones(BATCH, task.out_channels)
                flags[0, -1] = 0.0
                label[0][label[0] == task.out_channels - 1] = 0
                batch[name + "_class_present"] = flags
            batch[name] = label
        elif task.kind == "regression":
            dose = torch.rand(BATCH, 1, SIZE, SIZE, generator=gen) * 60.0
            dose[-1] = float("nan")
            batch[name] = dose
            mask = (torch.rand(BATCH, 1, SIZE, SIZE, generator=gen) > 0.3).float()
            mask[1] = 0.0
            batch[name + "_mask"] = mask
        elif task.is_binary:
            batch[name] = torch.tensor([0.0, 1.0] * (BATCH // 2))
            batch[name][-1] = -1.0
        else:
            batch[name] = torch.arange(BATCH) % task.out_channels
            batch[name][-1] = -1
        if "_present" in keys:
            batch[name + "_present"] = present.clone()
    batch["case_id"] = [f"case{i}" for i in range(BATCH)]
    return batch


def _bundle_trainer(bundle: str, overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The bundle's ``train#trainer`` from its train.yaml, on the CPU, one epoch of one synthetic batch, no
    handlers; returns it and the batch."""
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / f"ctan_{bundle}" / "configs" / "train.yaml"))
    parser["device"] = "$torch.device('cpu')"
    parser["epochs"] = 1
    parser["backbone"] = "resnet18"
    parser["train#handlers"] = []
    # HAM10000's class-weighted loss reads the training split's diagnoses
    parser["data"] = {"training": [{"dx": k % 7} for k in range(14)]}
    for key, value in overrides.items():
        parser[key] = value
    tasks = parse_tasks(parser.get_parsed_content("tasks"))
    spec = BUNDLES[bundle]
    batch = _batch(tasks, spec["in_channels"], spec["extras"])
    parser["train#dataloader"] = [batch]
    return parser.get_parsed_content("train#trainer"), batch


CASES = [
    *[pytest.param(b, {}, id=f"{b}-fp32") for b in BUNDLES],
    *[pytest.param(b, {"amp": "bf16", "channels_last": True}, id=f"{b}-bf16-channels_last") for b in BUNDLES],
    *[pytest.param("openkbp", {"arch": a}, id=f"openkbp-{a}") for a in ("stl", "hps", "mtan")],
    pytest.param("ham10000", {"class_balance": "loss_weights"}, id="ham10000-loss_weights"),
]


@pytest.mark.parametrize(("bundle", "overrides"), CASES)
def test_training_step_makes_no_sync_from_our_code(bundle: str, overrides: dict[str, Any]) -> None:
    trainer, _ = _bundle_trainer(bundle, overrides)
    if overrides.get("channels_last"):
        assert is_channels_last(trainer.network)
    assert isinstance(trainer.inferer, AutocastInferer) == (overrides.get("amp") == "bf16")
    before = [p.detach().clone() for p in trainer.network.parameters()]
    with SyncRecorder() as recorder:
        trainer.run()
    assert recorder.ours() == [], f"synchronising calls from ctan_monai in a {bundle} training step"
    # the step did happen: a finite loss, and the weights moved
    loss = trainer.state.output["loss"]
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.network.parameters()))
    # the loss's bookkeeping is still right when read (here, outside the step): the placeholders were left out
    labelled = trainer.loss_function.last_labelled
    assert all(0 < n < BATCH for n in labelled.values())


def test_validating_in_the_step_is_what_the_switch_turns_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``CTAN_MONAI_VALIDATE_INPUTS=1`` the same step checks the labels in the loss, and the recorder sees
    those reads: the counting above would catch a check that ran in every step."""
    monkeypatch.setenv(VALIDATE_INPUTS_ENV, "1")
    trainer, _ = _bundle_trainer("openkbp", {})
    with SyncRecorder() as recorder:
        trainer.run()
    files = {Path(file).name for _, file, _ in recorder.ours()}
    assert {"task_losses.py", "multitask.py"} <= files


# ---------------------------------------------------------------- bad labels: clear errors where the data enter


def _write_case(root: Path, label: np.ndarray, dose: np.ndarray) -> dict[str, Any]:
    image = np.random.default_rng(0).random(label.shape, dtype=np.float32)
    entry: dict[str, Any] = {"case_id": "pt_1"}
    for key, array in (("image", image), ("label", label), ("dose", dose)):
        path = root / f"{key}.nii.gz"
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
        entry[key] = str(path)
    return entry


@pytest.mark.parametrize("problem", ["label", "dose"])
def test_bad_labels_fail_clearly_when_the_dataset_reads_them(tmp_path: Path, problem: str) -> None:
    """The slice datasets of the OpenKBP and prostate bundles check label values and doses when they read a case,
    before any training step."""
    label = np.zeros((8, 8, 4), dtype=np.uint8)
    dose = np.ones((8, 8, 4), dtype=np.float32)
    if problem == "label":
        label[2:4, 2:4, 1] = 7  # 3 classes: 7 is not one
        expected = "label values 0..7 outside 0..2"
    else:
        dose[0, 0, 0] = np.nan
        expected = "dose holds NaN or infinite values"
    entry = _write_case(tmp_path, label, dose)
    with pytest.raises(DatasetValidationError, match=expected):
        AxialSliceDataset([entry], num_classes=3, slice_rule="all")


def test_bad_labels_fail_clearly_in_the_loss_behind_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a training step (the prediction records gradients) the loss skips its value checks; the debug switch
    brings back the same errors as outside training."""
    tasks = [
        {"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 3},
        {"name": "dx", "level": "image", "kind": "classification", "out_channels": 4},
    ]
    outputs = {"seg": torch.zeros(2, 3, 4, 4, requires_grad=True), "dx": torch.zeros(2, 4, requires_grad=True)}
    bad = [
        ({"seg": torch.full((2, 1, 4, 4), 3), "dx": torch.tensor([0, 1])}, r"segmentation loss.*\[0, 2\]"),
        ({"seg": torch.zeros(2, 1, 4, 4, dtype=torch.long), "dx": torch.tensor([0, 4])}, r"classification.*\[0, 3\]"),
        (
            {"seg": torch.zeros(2, 1, 4, 4, dtype=torch.long), "dx": torch.tensor([0, 1]), "dx_present": [1.0, 2.0]},
            "only 0",
        ),
    ]
    for batch, message in bad:
        with pytest.raises(ValueError, match=message):  # outside a training step: checked by default
            MultiTaskLoss(tasks)({k: v.detach() for k, v in outputs.items()}, batch)
        with pytest.raises(ValueError, match=message):  # in a training step: with the switch
            MultiTaskLoss(tasks, validate_inputs=True)(outputs, batch)
    monkeypatch.setenv(VALIDATE_INPUTS_ENV, "1")
    with pytest.raises(ValueError, match=bad[0][1]):
        MultiTaskLoss(tasks)(outputs, bad[0][0])


# ---------------------------------------------------------------- the masked loss is the labelled-subset loss


def test_masked_whole_batch_loss_equals_the_loss_of_the_labelled_subset() -> None:
    """Without boolean indexing the multi-task loss still equals, value and gradient, each task loss evaluated on
    the labelled samples alone (what it computed before), the batch Dice and placeholder labels included."""
    gen = torch.Generator().manual_seed(5)
    tasks = [
        {"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 3},
        {"name": "dose", "level": "pixel", "kind": "regression", "out_channels": 1},
        {"name": "dx", "level": "image", "kind": "classification", "out_channels": 4},
    ]
    seg_loss = SegmentationComboLoss(1.0, 1.0, include_background=False, batch=True)
    loss = MultiTaskLoss(tasks, weighting="equal", task_losses={"seg": seg_loss})
    outputs = {
        "seg": torch.randn(5, 3, 6, 6, generator=gen, requires_grad=True),
        "dose": torch.randn(5, 1, 6, 6, generator=gen, requires_grad=True),
        "dx": torch.randn(5, 4, generator=gen, requires_grad=True),
    }
    seg = torch.randint(0, 3, (5, 1, 6, 6), generator=gen)
    seg[3] = -1  # placeholder of an unlabelled sample
    mask = (torch.rand(5, 1, 6, 6, generator=gen) > 0.5).float()
    mask[0] = 0.0  # empty: unlabelled
    dose = torch.rand(5, 1, 6, 6, generator=gen)
    dose[2] = float("nan")
    batch = {
        "seg": seg,
        "seg_present": torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0]),
        "seg_class_present": torch.tensor([[1.0, 1, 1], [1, 0, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1]]),
        "dose": dose,
        "dose_mask": mask,
        "dose_present": torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]),
        "dx": torch.tensor([1, -1, 3, 0, -1]),
        "dx_present": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]),
    }
    total = loss(outputs, batch)
    grads = torch.autograd.grad(total, list(outputs.values()))

    subsets = {"seg": [0, 1, 2, 4], "dose": [1, 3, 4], "dx": [0, 2, 3]}
    by_hand = (
        seg_loss(outputs["seg"][subsets["seg"]], seg[subsets["seg"]], batch["seg_class_present"][subsets["seg"]]).mean()
        + MaskedMAELoss()(outputs["dose"][subsets["dose"]], dose[subsets["dose"]], mask[subsets["dose"]]).mean()
        + ClassificationLoss()(outputs["dx"][subsets["dx"]], batch["dx"][subsets["dx"]]).mean()
    )
    expected = torch.autograd.grad(by_hand, list(outputs.values()))
    torch.testing.assert_close(total, by_hand, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert loss.last_labelled == {"seg": 4, "dose": 3, "dx": 3}
