"""The training mechanisms of the bundles, on synthetic engines and tiny networks (no bundle training): the scaled
dose head (TaskSpec output_scale / output_bias), the warm-up + cosine learning-rate schedule, the key metric, the
best-validated model file (kept across resumes, with a fallback to the last weights), validation at the last epoch,
the training summary table, and the optional fine pixel decoder."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedEvaluator, SupervisedTrainer

from ctan_monai.engines import (
    BestModelFallback,
    BestModelSaver,
    KeyMetricHandler,
    MetricsHistoryHandler,
    TrainingSummaryHandler,
    ValidateHandler,
    WarmupCosineSchedule,
    build_lr_schedule,
    summary_table,
)
from ctan_monai.engines.checkpoints import SKIP_MODEL_SELECTION
from ctan_monai.engines.summary import UNTRAINED_FILE
from ctan_monai.networks import build_network
from ctan_monai.networks.decoders import PixelDecoder
from ctan_monai.tasks import TaskSpec, parse_tasks
from tests.conftest import REPO_ROOT

SEG = {"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 3}
DOSE = {"name": "dose", "level": "pixel", "kind": "regression", "out_channels": 1}
SCALED_DOSE = {**DOSE, "output_scale": 70.0, "output_bias": 25.0}
DX = {"name": "dx", "level": "image", "kind": "classification", "out_channels": 4}
# small decoders: fast on a CPU
SMALL = {"pixel_decoder_channels": (32, 16, 8), "image_decoder_channels": (16, 16, 16, 16)}


# --- TaskSpec output_scale / output_bias -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["stl", "hps", "mtan", "ctan"])
def test_scaled_dose_head_starts_at_the_initial_dose(arch: str) -> None:
    torch.manual_seed(0)
    net = build_network(arch, [SEG, SCALED_DOSE], backbone="resnet18", **SMALL).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 48, 40))
    # a constant map in Gy, whatever the input: the head's random weights would be tens of Gy of noise x 70
    torch.testing.assert_close(out["dose"], torch.full((2, 1, 48, 40), 25.0))
    assert out["seg"].std() > 0  # the segmentation logits are untouched


def test_scaled_network_is_70x_the_unscaled_head_and_the_scale_travels_with_the_weights() -> None:
    torch.manual_seed(1)
    plain = build_network("ctan", [SEG, DOSE], backbone="resnet18", **SMALL).eval()
    scaled = build_network("ctan", [SEG, SCALED_DOSE], backbone="resnet18", **SMALL).eval()
    assert set(plain.state_dict()) == set(scaled.state_dict())
    # the same parameters with the scale 70: the dose is 70x the unscaled head's
    state = plain.state_dict()
    state["decoders.dose.output_scale"] = torch.tensor(70.0)
    scaled.load_state_dict(state)
    x = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        a, b = plain(x), scaled(x)
    torch.testing.assert_close(b["dose"], 70.0 * a["dose"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b["seg"], a["seg"])
    assert float(scaled.decoders["dose"].output_scale) == 70.0
    # a network configured without the scale that loads the scaled weights writes the same Gy (the scale is state)
    unaware = build_network("ctan", [SEG, DOSE], backbone="resnet18", **SMALL).eval()
    unaware.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(unaware(x)["dose"], b["dose"])
    # weights saved before the scale was stored keep the configured scale
    legacy = {k: v for k, v in scaled.state_dict().items() if not k.endswith("output_scale")}
    again = build_network("ctan", [SEG, SCALED_DOSE], backbone="resnet18", **SMALL).eval()
    again.load_state_dict(legacy)
    with torch.no_grad():
        torch.testing.assert_close(again(x)["dose"], b["dose"])


def _bundle_network(bundle: str, config: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / bundle / "configs" / config))
    parser["backbone"] = "resnet18"
    return parser.get_parsed_content("network_def")


@pytest.mark.parametrize("bundle", ["ctan_prostate", "ctan_openkbp"])
def test_bundle_inference_writes_gy_from_scaled_training_weights(bundle: str, tmp_path: Path) -> None:
    """Round trip through the configs: the weights trained with train.yaml (dose head scaled by dose_scale), loaded
    by inference.yaml, predict the same dose in Gy (not Gy / dose_scale)."""
    torch.manual_seed(2)
    trained = _bundle_network(bundle, "train.yaml").eval()
    with torch.no_grad():
        for p in trained.decoders["dose"].head.parameters():  # a trained head, not the constant initial one
            p.normal_(0.0, 0.05)
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    inference = _bundle_network(bundle, "inference.yaml").eval()
    inference.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        expected, written = trained(x)["dose"], inference(x)["dose"]
    assert expected.abs().max() > 1.0  # Gy, not a fraction of the prescription
    torch.testing.assert_close(written, expected)


def test_prostate_training_network_starts_at_dose_initial() -> None:
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / "ctan_prostate" / "configs" / "train.yaml"))
    parser["backbone"] = "resnet18"
    net = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        dose = net(torch.rand(1, 1, 64, 64))["dose"]
    torch.testing.assert_close(dose, torch.full_like(dose, float(parser.get_parsed_content("dose_initial"))))


def test_output_scale_and_bias_are_validated() -> None:
    for scale in (0.0, -70.0, float("nan")):
        with pytest.raises(ValueError, match="output_scale must be > 0"):
            TaskSpec("dose", "pixel", "regression", 1, output_scale=scale)
    with pytest.raises(ValueError, match="regression tasks"):
        TaskSpec("seg", "pixel", "segmentation", 3, output_scale=2.0)
    with pytest.raises(ValueError, match="regression tasks"):
        TaskSpec("dx", "image", "classification", 4, output_bias=1.0)
    with pytest.raises(ValueError, match="regression tasks"):
        parse_tasks([{**DX, "output_scale": 70.0}])
    with pytest.raises(ValueError, match="unknown keys"):
        parse_tasks([{**DOSE, "output_offset": 1.0}])
    assert parse_tasks([SCALED_DOSE])[0] == TaskSpec("dose", "pixel", "regression", 1, 70.0, 25.0)
    with pytest.raises(ValueError, match="output_scale must be > 0"):
        PixelDecoder(2, (64, 128, 256), 512, out_channels=1, output_scale=0.0)


def test_image_level_tasks_reject_output_scale_and_bias() -> None:
    age = {"name": "age", "level": "image", "kind": "regression", "out_channels": 1}
    build_network("hps", [SEG, age], backbone="resnet18", **SMALL)  # unscaled: fine
    for extra in ({"output_scale": 70.0}, {"output_bias": 50.0}):
        with pytest.raises(ValueError, match="pixel-level tasks only"):
            build_network("hps", [SEG, {**age, **extra}], backbone="resnet18", **SMALL)


# --- learning-rate schedule --------------------------------------------------------------------------------------


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(optimizer: torch.optim.Optimizer, scheduler: Any, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_cosine_decay_shape() -> None:
    opt = _optimizer(2.0)
    lrs = _lrs(opt, WarmupCosineSchedule(opt, total_steps=100, warmup_steps=10, final_fraction=0.01), 110)
    warmup = lrs[:11]
    assert warmup[0] == pytest.approx(0.2)  # warmup_start 0.1 x lr
    steps = [b - a for a, b in zip(warmup, warmup[1:])]
    assert all(s == pytest.approx(steps[0]) for s in steps) and steps[0] > 0  # linear
    assert lrs[10] == pytest.approx(2.0)  # the peak, at the end of the warm-up
    decay = lrs[10:101]
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:]))  # then never rises
    assert lrs[55] == pytest.approx(2.0 * (0.01 + 0.99 * 0.5))  # the cosine's midpoint
    assert lrs[100] == pytest.approx(0.02) and lrs[109] == pytest.approx(0.02)  # the floor, and after the run
    # the bundles' option: 5 % warm-up
    opt = _optimizer(1.0)
    lrs = _lrs(opt, build_lr_schedule(opt, "cosine", 200), 200)
    assert max(range(200), key=lambda i: lrs[i]) == 10 and lrs[-1] < 0.02


def test_constant_schedule_and_invalid_arguments() -> None:
    opt = _optimizer(1e-3)
    lrs = _lrs(opt, build_lr_schedule(opt, "constant", 20), 40)  # past total_steps too
    assert lrs == pytest.approx([1e-3] * 40)
    with pytest.raises(ValueError, match="'cosine' or 'constant'"):
        build_lr_schedule(_optimizer(), "onecycle", 10)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineSchedule(_optimizer(), total_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosineSchedule(_optimizer(), total_steps=10, warmup_steps=-1)
    with pytest.raises(ValueError, match="final_fraction"):
        WarmupCosineSchedule(_optimizer(), total_steps=10, final_fraction=0.0)


def _resumed(total_steps: int, state: dict) -> tuple[torch.optim.Optimizer, Any]:
    opt = _optimizer(1.0)
    scheduler = build_lr_schedule(opt, "cosine", total_steps)
    opt.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    return opt, scheduler


def test_schedule_state_round_trips_and_resumes_on_a_longer_run(tmp_path: Path) -> None:
    opt = _optimizer(1.0)
    scheduler = build_lr_schedule(opt, "cosine", 100)
    _lrs(opt, scheduler, 40)
    torch.save({"optimizer": opt.state_dict(), "lr_scheduler": scheduler.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert "total_steps" not in state["lr_scheduler"]  # the run length is configuration

    # the same run: the rest of the schedule is what an uninterrupted run takes
    opt_full = _optimizer(1.0)
    uninterrupted = _lrs(opt_full, build_lr_schedule(opt_full, "cosine", 100), 100)
    opt, scheduler = _resumed(100, state)
    assert _lrs(opt, scheduler, 60) == pytest.approx(uninterrupted[40:])

    # resumed with more epochs: it continues on the longer schedule instead of ending (or failing) at step 100
    opt_long = _optimizer(1.0)
    longer = _lrs(opt_long, build_lr_schedule(opt_long, "cosine", 200), 200)
    opt, scheduler = _resumed(200, state)
    continued = _lrs(opt, scheduler, 160)
    assert continued[1:] == pytest.approx(longer[41:])  # from the first step taken after the resume
    assert continued[60] > 0.3  # step 100: far from the 1 % floor of the short run
    assert scheduler.last_epoch == 200


# --- key metric --------------------------------------------------------------------------------------------------


def _engine_with_metrics(handler: KeyMetricHandler, metrics: dict[str, Any]) -> Engine:
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _set(e: Engine) -> None:
        e.state.metrics.update(metrics)

    handler.attach(engine)
    engine.run([0], max_epochs=1)
    return engine


def test_key_metric_is_the_weighted_sum() -> None:
    handler = KeyMetricHandler({"val_mean_dice": 0.01, "val_dose_mae": -1.0 / 70})
    engine = _engine_with_metrics(handler, {"val_mean_dice": 80.0, "val_dose_mae": 7.0, "other": 1e9})
    assert engine.state.metrics["val_key_metric"] == pytest.approx(0.8 - 0.1)
    named = KeyMetricHandler({"a": 0.5, "b": 0.5}, name="score")
    assert _engine_with_metrics(named, {"a": 60.0, "b": 20.0}).state.metrics["score"] == pytest.approx(40.0)
    with pytest.raises(ValueError, match="at least one"):
        KeyMetricHandler({})


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, "80"])
def test_key_metric_is_unset_when_a_metric_is_missing_or_not_finite(bad: Any, caplog) -> None:
    handler = KeyMetricHandler({"val_mean_dice": 0.01, "val_dose_mae": -1.0 / 70})
    # a stale value from an earlier evaluation is removed, not kept
    metrics = {"val_mean_dice": 80.0, "val_key_metric": 0.9}
    if bad is not None:
        metrics["val_dose_mae"] = bad
    with caplog.at_level(logging.WARNING, logger="ctan_monai.key_metric"):
        engine = _engine_with_metrics(handler, metrics)
    assert "val_key_metric" not in engine.state.metrics
    assert "val_dose_mae" in caplog.text


# --- best validated model ----------------------------------------------------------------------------------------


class _Scripted:
    """Sets the metric ``name`` on each evaluator run from a list (None: not set)."""

    def __init__(self, scores: list[float | None], name: str = "val_key_metric") -> None:
        self.scores = list(scores)
        self.name = name
        self.runs = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        score = self.scores[self.runs]
        self.runs += 1
        engine.state.metrics.pop(self.name, None)
        if score is not None:
            engine.state.metrics[self.name] = score


def _evaluator(saver: BestModelSaver, scores: list[float | None]) -> Engine:
    evaluator = Engine(lambda e, b: None)
    _Scripted(scores).attach(evaluator)
    saver.attach(evaluator)
    return evaluator


def _validate(net: torch.nn.Linear, evaluator: Engine, value: float) -> None:
    """One epoch's weights (every parameter = ``value``, so the file tells the epoch), then its validation."""
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
    evaluator.run([0], max_epochs=1)


def _saved_value(path: Path) -> float:
    state = torch.load(path, weights_only=True)
    assert set(state) == {"weight", "bias"}  # the bare state_dict, as the bundles' load_weights expects
    return float(state["weight"].flatten()[0])


def test_best_model_holds_the_best_epoch_and_survives_a_resume(tmp_path: Path) -> None:
    net = torch.nn.Linear(2, 1)
    saver = BestModelSaver(str(tmp_path), {"model": net})
    evaluator = _evaluator(saver, [0.2, 0.5, 0.3])
    for epoch in (1, 2, 3):
        _validate(net, evaluator, float(epoch))
    assert _saved_value(tmp_path / "model.pt") == 2.0  # the epoch that scored 0.5
    assert saver.has_best() and saver.best_score() == pytest.approx(0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # one file, no temp file left

    # resume: a fresh saver gets the record through the trainer's checkpoint (torch.save / torch.load)
    torch.save({"best_model": saver.state_dict()}, tmp_path / "checkpoint.pt")
    net = torch.nn.Linear(2, 1)
    resumed = BestModelSaver(str(tmp_path), {"model": net})
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["best_model"])
    evaluator = _evaluator(resumed, [0.4, 0.5, 0.6])
    _validate(net, evaluator, 4.0)  # worse than 0.5: kept
    _validate(net, evaluator, 5.0)  # equal: kept (strictly better only)
    assert _saved_value(tmp_path / "model.pt") == 2.0
    _validate(net, evaluator, 6.0)
    assert _saved_value(tmp_path / "model.pt") == 6.0 and resumed.best_score() == pytest.approx(0.6)


def test_best_model_lower_is_better(tmp_path: Path) -> None:
    net = torch.nn.Linear(2, 1)
    evaluator = _evaluator(BestModelSaver(str(tmp_path), {"model": net}, lower_is_better=True), [3.0, 1.0, 2.0])
    for epoch in (1, 2, 3):
        _validate(net, evaluator, float(epoch))
    assert _saved_value(tmp_path / "model.pt") == 2.0


def test_runs_without_a_finite_key_metric_or_marked_are_no_candidates(tmp_path: Path) -> None:
    net = torch.nn.Linear(2, 1)
    saver = BestModelSaver(str(tmp_path), {"model": net})
    evaluator = _evaluator(saver, [None, math.nan, 0.9, 0.1])
    _validate(net, evaluator, 1.0)  # missing
    _validate(net, evaluator, 2.0)  # NaN (set by hand: KeyMetricHandler would leave it unset)
    assert not (tmp_path / "model.pt").exists() and not saver.has_best()
    setattr(evaluator.state, SKIP_MODEL_SELECTION, True)  # e.g. the summary's untrained evaluation
    _validate(net, evaluator, 3.0)
    assert not (tmp_path / "model.pt").exists()
    setattr(evaluator.state, SKIP_MODEL_SELECTION, False)
    _validate(net, evaluator, 4.0)
    assert _saved_value(tmp_path / "model.pt") == 4.0


def test_fallback_writes_the_last_weights_when_no_epoch_was_selected(tmp_path: Path, caplog) -> None:
    net = torch.nn.Linear(2, 1)
    saver = BestModelSaver(str(tmp_path), {"model": net})
    evaluator = _evaluator(saver, [None, None, 0.7])
    trainer = Engine(lambda e, b: _validate(net, evaluator, float(e.state.epoch)))
    BestModelFallback(saver).attach(trainer)
    with caplog.at_level(logging.WARNING, logger="ctan_monai.best_model"):
        trainer.run([0], max_epochs=2)
    assert _saved_value(tmp_path / "model.pt") == 2.0  # the last weights
    assert "LAST weights" in caplog.text and "val_key_metric" in caplog.text
    assert not saver.has_best()  # not recorded as a selection: a later epoch with a key metric replaces it
    _validate(net, evaluator, 3.0)
    assert _saved_value(tmp_path / "model.pt") == 3.0 and saver.has_best()
    caplog.clear()
    with torch.no_grad():
        net.weight.fill_(9.0)
    assert not saver.save_fallback(trainer)  # a best exists: untouched, no warning
    assert _saved_value(tmp_path / "model.pt") == 3.0 and "LAST" not in caplog.text


def test_fallback_does_not_write_diverged_weights(tmp_path: Path, caplog) -> None:
    net = torch.nn.Linear(2, 1)
    saver = BestModelSaver(str(tmp_path), {"model": net})
    with torch.no_grad():
        net.weight.fill_(math.nan)
    with caplog.at_level(logging.WARNING, logger="ctan_monai.best_model"):
        assert not saver.save_fallback()
    assert not (tmp_path / "model.pt").exists() and "not finite" in caplog.text


class _EpochWeights:
    def __init__(self, net: torch.nn.Linear) -> None:
        self.net = net

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        with torch.no_grad():
            self.net.weight.fill_(float(engine.state.epoch))


def _bundle_wiring(tmp_path: Path, scores: list[float | None], epochs: int = 3) -> _Scripted:
    """The bundles' wiring on MONAI engines and a Linear network: ValidateHandler, MetricsHistoryHandler,
    TrainingSummaryHandler (evaluates the untrained network first), KeyMetricHandler + BestModelSaver on the
    evaluator, BestModelFallback. The weights are set to the epoch number at each epoch's end (lr 0 otherwise);
    ``scores[0]`` is the untrained network's, then one per validated epoch."""
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(-1.0)  # the untrained weights
    data = [{"image": torch.zeros(2), "label": torch.zeros(1)} for _ in range(2)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    saver = BestModelSaver(str(tmp_path / "models"), {"model": net})
    scripted = _Scripted(scores, name="val_score")  # as the evaluation handler, before the key metric handler
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=net,
        val_handlers=[scripted, KeyMetricHandler({"val_score": 1.0}), saver],
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
        loss_function=torch.nn.MSELoss(),
        train_handlers=[
            _EpochWeights(net),
            ValidateHandler(evaluator, interval=1),
            MetricsHistoryHandler(tmp_path, evaluator),
            TrainingSummaryHandler(evaluator, tmp_path, {"val_score": ["score", True]}),
            BestModelFallback(saver),
        ],
    )
    trainer.run()
    return scripted


def test_bundle_wiring_selects_among_trained_epochs_only(tmp_path: Path, capsys) -> None:
    """The untrained network scores best (0.9) but is no candidate: model.pt is epoch 2's (0.5)."""
    scripted = _bundle_wiring(tmp_path, [0.9, 0.2, 0.5, 0.3])
    assert scripted.runs == 4  # untrained + 3 epochs
    assert _saved_value(tmp_path / "models" / "model.pt") == 2.0
    assert json.loads((tmp_path / UNTRAINED_FILE).read_text())["val_score"] == 0.9
    table = capsys.readouterr().out
    assert "| untrained | best (epoch 2) | last (epoch 3) |" in table.replace("metric | ", "")
    assert "| score | 0.90 | 0.50 | 0.30 |" in table


def test_bundle_wiring_falls_back_to_the_last_weights(tmp_path: Path, capsys) -> None:
    _bundle_wiring(tmp_path, [math.nan, math.nan, math.nan, math.nan])
    assert _saved_value(tmp_path / "models" / "model.pt") == 3.0
    assert "last (epoch 3)" in capsys.readouterr().out  # the summary shows the last validated epoch


# --- validation schedule -----------------------------------------------------------------------------------------


class _Validator:
    def __init__(self) -> None:
        self.epochs: list[int] = []

    def run(self, epoch: int) -> None:
        self.epochs.append(int(epoch))


@pytest.mark.parametrize("interval,max_epochs,expected", [(3, 7, [3, 6, 7]), (1, 3, [1, 2, 3]), (5, 2, [2])])
def test_validate_at_multiples_of_the_interval_and_at_the_last_epoch(
    interval: int, max_epochs: int, expected: list[int]
) -> None:
    validator = _Validator()
    trainer = Engine(lambda e, b: None)
    ValidateHandler(validator, interval=interval).attach(trainer)
    trainer.run([0, 1], max_epochs=max_epochs)
    assert validator.epochs == expected


def test_validate_after_a_resume_and_with_a_bad_interval() -> None:
    validator = _Validator()
    trainer = Engine(lambda e, b: None)
    ValidateHandler(validator, interval=4).attach(trainer)
    trainer.load_state_dict({"epoch": 5, "max_epochs": 9, "epoch_length": 2})
    trainer.run([0, 1])
    assert validator.epochs == [8, 9]
    for interval in (0, -2):
        with pytest.raises(ValueError, match="val_interval must be >= 1"):
            ValidateHandler(validator, interval=interval)


# --- training summary --------------------------------------------------------------------------------------------


def test_summary_table_verdicts() -> None:
    metrics = {"val_mean_dice": ("Dice (%)", True), "val_dose_mae": ("dose (Gy)", False), "val_x": ("x", True)}
    columns = {
        "untrained": {"val_mean_dice": 1.0, "val_dose_mae": 20.0, "val_x": math.nan},
        "best (epoch 2)": {"val_mean_dice": 61.0, "val_dose_mae": 6.0, "val_x": 3.0},
        "last (epoch 3)": {"val_mean_dice": 20.0, "val_dose_mae": 4.0},
    }
    table, record = summary_table(metrics, columns, {"val_mean_dice": 30.0, "val_dose_mae": 5.0})
    # the verdict is the best epoch's (the model kept), not the last one's
    assert record["val_mean_dice"]["beats_floor"] is True
    assert record["val_dose_mae"]["beats_floor"] is False  # lower is better: 6 Gy does not beat 5 Gy
    assert record["val_x"]["beats_floor"] is None and record["val_x"]["floor"] is None
    assert record["val_x"]["last (epoch 3)"] is None
    rows = table.splitlines()
    assert rows[0] == "| metric | untrained | best (epoch 2) | last (epoch 3) | floor | beats floor |"
    assert rows[2] == "| Dice (%) | 1.00 | 61.00 | 20.00 | 30.00 | yes |"
    assert rows[3] == "| dose (Gy) | 20.00 | 6.00 | 4.00 | 5.00 | NO |"
    assert rows[4] == "| x | - | 3.00 | - | - | - |"
    _, lower = summary_table({"val_dose_mae": ("dose", False)}, {"best": {"val_dose_mae": 4.0}}, {"val_dose_mae": 5.0})
    assert lower["val_dose_mae"]["beats_floor"] is True
    # an undefined value (an AUC on a split with one label) is no verdict, not a failure to beat the floor
    table, undefined = summary_table({"val_auc": ("AUC", True)}, {"last": {"val_auc": math.nan}}, {"val_auc": 50.0})
    assert undefined["val_auc"]["beats_floor"] is None and table.splitlines()[-1] == "| AUC | - | 50.00 | - |"


class _StubEvaluator:
    """An evaluator whose run sets fixed metrics (and counts the runs)."""

    def __init__(self, metrics: dict[str, float]) -> None:
        self.state = SimpleNamespace(metrics={}, epoch=0)
        self.metrics = metrics
        self.runs = 0
        self.marked: list[bool] = []

    def run(self, epoch: int = 1) -> None:
        self.runs += 1
        self.marked.append(bool(getattr(self.state, SKIP_MODEL_SELECTION, False)))
        self.state.epoch = epoch
        self.state.metrics = dict(self.metrics)


def _history(tmp_path: Path, history: dict[str, list[list[float]]]) -> None:
    (tmp_path / "metrics_history.json").write_text(json.dumps(history))


def test_summary_untrained_once_best_last_floor_and_resume(tmp_path: Path, capsys, caplog) -> None:
    metrics = {"val_mean_dice": ["mean Dice (%)", True], "val_dose_mae": ["dose score (Gy)", False]}
    evaluator = _StubEvaluator({"val_mean_dice": 2.0, "val_dose_mae": 30.0})
    first = TrainingSummaryHandler(evaluator, tmp_path, metrics)
    first.started(None)
    assert evaluator.runs == 1 and evaluator.marked == [True]  # marked as no candidate for the best model
    assert not getattr(evaluator.state, SKIP_MODEL_SELECTION) and evaluator.state.epoch == 0
    assert json.loads((tmp_path / UNTRAINED_FILE).read_text()) == {"val_mean_dice": 2.0, "val_dose_mae": 30.0}

    # a resumed run (a new handler, the network already trained): the untrained metrics are reused, not re-measured
    evaluator.metrics = {"val_mean_dice": 55.0, "val_dose_mae": 8.0, "val_floor_mean_dice": 40.0}
    evaluator.run(6)
    resumed = TrainingSummaryHandler(evaluator, tmp_path, metrics)
    resumed.started(None)
    assert evaluator.runs == 2
    _history(
        tmp_path,
        {
            "val_key_metric": [[2, 0.1], [4, 0.5], [6, 0.4]],
            "val_mean_dice": [[2, 20.0], [4, 60.0], [6, 55.0]],
            "val_dose_mae": [[2, 12.0], [4, 7.0], [6, 8.0]],
            "train_loss": [[e, 1.0 / e] for e in range(1, 7)],
        },
    )
    with caplog.at_level(logging.WARNING, logger="ctan_monai.summary"):
        resumed.completed(None)
    out = capsys.readouterr().out
    assert "| mean Dice (%) | 2.00 | 60.00 | 55.00 | 40.00 | yes |" in out
    assert "| dose score (Gy) | 30.00 | 7.00 | 8.00 | - | - |" in out  # no floor for it
    record = json.loads((tmp_path / "training_summary.json").read_text())
    assert record["val_mean_dice"]["best (epoch 4)"] == 60.0 and record["val_mean_dice"]["untrained"] == 2.0
    assert (tmp_path / "training_summary.md").read_text() in out
    assert "NOT beat" not in caplog.text

    evaluator.metrics["val_floor_mean_dice"] = 70.0  # now the model does not beat its floor: said loudly
    evaluator.run(6)
    with caplog.at_level(logging.WARNING, logger="ctan_monai.summary"):
        resumed.completed(None)
    assert "mean Dice (%) does NOT beat its floor" in caplog.text and "| NO |" in capsys.readouterr().out


def test_summary_without_key_metric_or_validation(tmp_path: Path, capsys, caplog) -> None:
    metrics = {"val_mean_auc": ["mean AUC (%)", True]}
    handler = TrainingSummaryHandler(_StubEvaluator({}), tmp_path, metrics, evaluate_untrained=False)
    handler.started(None)
    assert handler.evaluator.runs == 0 and not (tmp_path / UNTRAINED_FILE).exists()
    with caplog.at_level(logging.WARNING, logger="ctan_monai.summary"):
        handler.completed(None)  # no history at all
    assert "no validation ran" in caplog.text and not (tmp_path / "training_summary.md").exists()
    _history(tmp_path, {"val_mean_auc": [[2, 60.0], [4, 75.0]]})  # validated, the key metric never set
    handler.completed(None)
    out = capsys.readouterr().out
    assert "| metric | last (epoch 4) | floor | beats floor |" in out and "| mean AUC (%) | 75.00 | - | - |" in out


# --- fine pixel decoder ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["stl", "hps", "mtan", "ctan"])
def test_fine_decoder_output_shapes_2d(arch: str) -> None:
    torch.manual_seed(0)
    net = build_network(
        arch, [SEG, SCALED_DOSE, DX], backbone="resnet18", in_channels=2, fine_decoder_channels=[32, 16], **SMALL
    ).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 2, 48, 40))  # odd multiples: the fine blocks meet the stem's and input's sizes
    assert out["seg"].shape == (2, 3, 48, 40) and out["dose"].shape == (2, 1, 48, 40) and out["dx"].shape == (2, 4)
    seg, dx = ((net.nets[t] if arch == "stl" else net).decoders[t] for t in ("seg", "dx"))
    assert len(seg.fine) == 2 and seg.head.in_channels == 16
    assert not hasattr(dx, "fine")  # image-level decoders are not affected
    torch.testing.assert_close(out["dose"], torch.full_like(out["dose"], 25.0))  # still the initial dose


def test_fine_decoder_3d_and_one_block() -> None:
    torch.manual_seed(0)
    net = build_network("ctan", [SEG, DOSE], backbone="resnet18", spatial_dims=3, fine_decoder_channels=[16], **SMALL)
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 1, 32, 24, 40))
    assert out["seg"].shape == (1, 3, 32, 24, 40) and out["dose"].shape == (1, 1, 32, 24, 40)
    assert len(net.decoders["seg"].fine) == 1 and net.decoders["seg"].head.in_channels == 16
    with pytest.raises(ValueError, match="at most two"):
        build_network("hps", [SEG], backbone="resnet18", fine_decoder_channels=[32, 16, 8])


@pytest.mark.parametrize("arch", ["stl", "hps", "ctan"])
def test_fine_decoder_per_task(arch: str) -> None:
    """``{task: widths}`` gives the fine blocks to the named tasks only (OpenKBP: the organs, not the smooth dose);
    a name the network does not have is refused."""
    torch.manual_seed(0)
    net = build_network(arch, [SEG, SCALED_DOSE], backbone="resnet18", fine_decoder_channels={"seg": [16]}, **SMALL)
    seg, dose = ((net.nets[t] if arch == "stl" else net).decoders[t] for t in ("seg", "dose"))
    assert len(seg.fine) == 1 and seg.head.in_channels == 16
    assert len(dose.fine) == 0 and dose.head.in_channels == SMALL["pixel_decoder_channels"][-1]
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 1, 48, 40))
    assert out["seg"].shape == (1, 3, 48, 40) and out["dose"].shape == (1, 1, 48, 40)
    with pytest.raises(ValueError, match="'sgm'"):
        build_network(arch, [SEG, DOSE], backbone="resnet18", fine_decoder_channels={"sgm": [16]}, **SMALL)


@pytest.mark.parametrize("arch", ["hps", "ctan"])
def test_fine_decoder_torchscript_matches_eager(arch: str) -> None:
    torch.manual_seed(0)
    tasks = [SEG, SCALED_DOSE, DX]
    net = build_network(arch, tasks, backbone="resnet18", fine_decoder_channels=[32, 16], **SMALL).eval()
    with torch.no_grad():
        for p in net.decoders["dose"].head.parameters():
            p.normal_(0.0, 0.05)
    scripted = torch.jit.script(net)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        eager, script = net(x), scripted(x)
    assert set(eager) == set(script)
    for name in eager:
        torch.testing.assert_close(script[name], eager[name], rtol=1e-5, atol=1e-4)


def test_default_pixel_decoder_is_the_papers() -> None:
    """No fine blocks by default: no extra parameters (earlier checkpoints load), the head at 1/4 of the input
    resolution after the three up-sampling blocks, then interpolated to the input size."""
    torch.manual_seed(0)
    net = build_network("hps", [SEG, DOSE], backbone="resnet18", **SMALL).eval()
    assert not [k for k in net.state_dict() if ".fine." in k]
    explicit = build_network("hps", [SEG, DOSE], backbone="resnet18", fine_decoder_channels=[], **SMALL)
    assert set(explicit.state_dict()) == set(net.state_dict())
    x = torch.randn(1, 1, 64, 64)
    decoder = net.decoders["seg"]
    assert len(decoder.fine) == 0 and decoder.head.in_channels == SMALL["pixel_decoder_channels"][-1]
    with torch.no_grad():
        _, _, ps = net.encoder(x)
        y = ps[3]
        for i, block in enumerate(decoder.up):
            y = block(y, ps[2 - i])
        head = decoder.head(y)
        assert head.shape[2:] == (16, 16)  # 1/4 of 64
        expected = F.interpolate(head, size=[64, 64], mode="bilinear", align_corners=False)
        torch.testing.assert_close(net(x)["seg"], expected)
