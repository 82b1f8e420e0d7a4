"""MONAI bundle experiment tracking on our trainers: ``--tracking mlflow`` on a short HAM10000 demo training leaves an
MLflow run (local SQLite store) with the bundle's parameters, the training loss per iteration and the validation
metrics per epoch (issue 15, must-show 3)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient  # the tracking extra, part of dev: never skipped
from monai.handlers import MLFlowHandler, from_engine

from ctan_monai.engines.tracking import adapt_tracking_handlers, collated_loss
from tests.conftest import REPO_ROOT, run_bundle

pytestmark = pytest.mark.slow

QUICK = ["--image_size", "64", "--train_samples_per_epoch", "16", "--progress_bar", "False", "--num_workers", "0"]


def test_adapted_handler_reads_the_collated_loss(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"  # the handler opens its store when it is made
    handler = MLFlowHandler(tracking_uri=store, output_transform=from_engine(["loss"], first=True))
    output = {"loss": torch.tensor(0.25), "pred": {}}
    assert isinstance(handler.output_transform(output), tuple)  # MONAI's default on a collated output: fails later
    [adapted] = adapt_tracking_handlers([handler], params={"arch": "ctan", "lr": 1e-3}, log_engine_params=False)
    assert float(adapted.output_transform(output)) == 0.25
    assert adapted.experiment_param == {"arch": "ctan", "lr": 1e-3} and adapted.default_tracking_params == []
    assert MLFlowHandler.default_tracking_params == ["max_epochs", "epoch_length"]  # the class is left alone
    with pytest.raises(TypeError, match="collated trainer output"):
        collated_loss([{"loss": 1.0}])


def test_tracking_mlflow_logs_params_and_per_epoch_metrics(tmp_path: Path) -> None:
    bundle = tmp_path / "ctan_ham10000"
    shutil.copytree(REPO_ROOT / "bundles" / "ctan_ham10000" / "configs", bundle / "configs")
    args = ["run", "training", "--config_file", "configs/train.yaml", *QUICK, "--epochs", "2", "--tracking", "mlflow"]
    run_bundle(args, bundle)
    store = bundle / "runs" / "ctan" / "mlruns.db"
    assert store.is_file(), f"no MLflow store at {store}"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    params = run.data.params
    assert params["arch"] == "ctan" and params["epochs"] == "2" and params["learning_rate"] == "0.001"
    assert params["max_epochs"] == "2", params  # the trainer's, not the validator's (1)
    train_loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(train_loss) == 4 and all(m.value > 0 for m in train_loss)  # 2 iterations x 2 epochs
    for key in ("val_mean_dice", "val_balanced_accuracy", "val_floor_mean_dice"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [1, 2], (key, steps)  # one value per validated epoch, at that epoch
    assert [a.path for a in client.list_artifacts(run.info.run_id) if a.path.endswith(".json")]  # the run's config
