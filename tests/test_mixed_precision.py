"""bf16 + channels-last training and inference on the CPU for the four architectures, through MONAI's trainer as the
bundles run it (``amp: bf16``, ``channels_last: true``), and the pieces behind the option (issue 17).

Tolerances of bf16 inference against float32 (same weights, eval mode, 32 x 32 inputs, ResNet-18, doses of tens of
Gy on a 70 Gy scale): segmentation probabilities within 0.01 at every pixel and 0.002 on average, the dose within
0.1 Gy on average and 0.5 Gy at any pixel, diagnosis probabilities within 0.01. Measured (AVX2 CPU, bf16 emulated
by oneDNN): at most 3e-4 for the probabilities, 0.014 Gy mean and 0.064 Gy max for the dose, about 10x inside the
tolerances. bf16 keeps 8 bits of mantissa (0.4 % per rounding); the output layers and the CTAB products run in
float32, so the error is that of the features, not of the outputs' own rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from copy import deepcopy
from typing import Any

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer

from ctan_monai.engines import AutocastInferer, MixedPrecision, MultiTaskPrepareBatch, place_network
from ctan_monai.engines.precision import is_channels_last, resolve_amp
from ctan_monai.losses import MultiTaskLoss
from ctan_monai.networks import build_network
from ctan_monai.networks.attention import cross_task_attention
from ctan_monai.networks.decoders import ImageDecoder, PixelDecoder
from tests.conftest import REPO_ROOT

SEG = {"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 3}
DOSE = {
    "name": "dose",
    "level": "pixel",
    "kind": "regression",
    "out_channels": 1,
    "output_scale": 70.0,
    "output_bias": 25.0,
}
DX = {"name": "dx", "level": "image", "kind": "classification", "out_channels": 4}
TASKS = [SEG, DOSE, DX]
SMALL = {"pixel_decoder_channels": (32, 16, 8), "image_decoder_channels": (16, 16, 16, 16)}
STEPS = 4
SIZE = 32


def _fixed_batch() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(4, 1, SIZE, SIZE, generator=gen)
    seg = (image > 0.6).long() + (image > 0.85).long()  # learnable from the pixel itself
    return {
        "image": image,
        "seg": seg,
        "dose": 20.0 + 40.0 * image,
        "dose_mask": torch.ones(4, 1, SIZE, SIZE),
        "dx": torch.tensor([0, 1, 2, 3]),
        "dx_present": torch.tensor([1.0, 1.0, 1.0, 0.0]),
    }


def _train_bf16(arch: str, batch: dict[str, Any]) -> dict[str, Any]:
    """Train ``arch`` for STEPS bf16 + channels-last steps on ``batch`` through MONAI's trainer, as a bundle with
    ``amp: bf16`` and ``channels_last: true`` does; the losses, the dtypes seen inside the network, the network."""
    precision = MixedPrecision("bf16", "cpu")
    torch.manual_seed(0)
    network = place_network(build_network(arch, TASKS, backbone="resnet18", **SMALL), "cpu", channels_last=True)
    conv_dtypes: list[torch.dtype] = []
    first_conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, args, out: conv_dtypes.append(out.dtype))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch] * STEPS,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=2e-3),
        loss_function=MultiTaskLoss(TASKS, weighting="equal"),
        prepare_batch=MultiTaskPrepareBatch(task_names=["seg", "dose", "dx"], channels_last=True),
        inferer=precision.inferer(),
        amp=precision.monai_amp,
        amp_kwargs=precision.amp_kwargs,
        decollate=False,
    )
    losses: list[float] = []
    outputs: list[dict[str, torch.dtype]] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine: Any) -> None:
        losses.append(float(engine.state.output["loss"].detach()))
        outputs.append({k: v.dtype for k, v in engine.state.output["pred"].items()})

    trainer.run()
    return {"losses": losses, "conv_dtypes": conv_dtypes, "outputs": outputs, "network": network}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: these networks are tiny, and on a shared 2-core machine OpenMP threads waiting for each
    other cost more CPU time than the second thread saves (measured: 16 s instead of 65 s of CPU for the four
    trainings)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> dict[str, Any]:
    """Each architecture trained for a few bf16 + channels-last steps on one fixed batch."""
    batch = _fixed_batch()
    return {arch: _train_bf16(arch, batch) for arch in ("stl", "hps", "mtan", "ctan")}


@pytest.mark.parametrize("arch", ["stl", "hps", "mtan", "ctan"])
def test_bf16_channels_last_training_is_finite_and_learns(trained: dict[str, Any], arch: str) -> None:
    result = trained[arch]
    losses = result["losses"]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses
    # it ran in bf16 (the convolutions) with float32 outputs (the heads), channels-last throughout
    assert set(result["conv_dtypes"]) == {torch.bfloat16}
    assert all(set(o.values()) == {torch.float32} for o in result["outputs"])
    assert is_channels_last(result["network"])
    assert all(torch.isfinite(p).all() for p in result["network"].parameters())


@pytest.mark.parametrize("arch", ["stl", "hps", "mtan", "ctan"])
def test_bf16_inference_is_finite_and_close_to_float32(trained: dict[str, Any], arch: str) -> None:
    network = deepcopy(trained[arch]["network"]).eval()
    for module in network.modules():
        if isinstance(module, PixelDecoder):
            # the scaled dose head starts at zero weights (a constant 25 Gy): give it a default init, so that the
            # dose varies by tens of Gy and its bf16 error is measured where it matters
            module.head.reset_parameters()
    image = _fixed_batch()["image"] + 0.05 * torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = network(image)
        channels_last = image.contiguous(memory_format=torch.channels_last)
        plain = network(channels_last)  # float32, channels-last: the memory format alone changes nothing
        conv_dtypes: list[torch.dtype] = []
        first_conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
        hook = first_conv.register_forward_hook(lambda module, args, out: conv_dtypes.append(out.dtype))
        low = AutocastInferer(device_type="cpu", dtype=torch.bfloat16)(channels_last, network)
        hook.remove()
    for name in reference:
        assert low[name].dtype == torch.float32 and torch.isfinite(low[name]).all()
        torch.testing.assert_close(plain[name], reference[name], rtol=1e-4, atol=1e-4)
    assert set(conv_dtypes) == {torch.bfloat16}  # the bf16 run was one
    assert reference["dose"].max() - reference["dose"].min() > 2.0  # a dose that varies
    seg = (low["seg"].softmax(1) - reference["seg"].softmax(1)).abs()
    assert seg.max() < 0.01 and seg.mean() < 0.002, (seg.max(), seg.mean())
    dose = (low["dose"] - reference["dose"]).abs()
    assert dose.mean() < 0.1 and dose.max() < 0.5, (dose.mean(), dose.max())
    dx = (low["dx"].softmax(1) - reference["dx"].softmax(1)).abs()
    assert dx.max() < 0.01, dx.max()


@pytest.mark.parametrize("normalization", ["mean", "none", "softmax"])
def test_ctab_is_computed_in_float32_under_bf16_autocast(normalization: str) -> None:
    gen = torch.Generator().manual_seed(3)
    own = ((torch.randn(2, 256, 16, generator=gen) * 20).relu()).bfloat16()
    other = ((torch.randn(2, 256, 16, generator=gen) * 20).relu()).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cross_task_attention(own, other, normalization)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # against float64 on the same (bf16) inputs: only the final rounding to bf16 remains
    expected = cross_task_attention(own.double(), other.double(), normalization)
    assert ((out.double() - expected).abs().max() / expected.abs().max()) < 1e-2


def test_amp_option_values() -> None:
    assert resolve_amp(False, "cpu") == resolve_amp("none", "cpu") == resolve_amp(None, "cpu") == "none"
    assert resolve_amp("false", "cpu") == "none" and resolve_amp("BF16", "cpu") == "bf16"
    assert resolve_amp(True, "cpu") == "bf16" and resolve_amp("true", "cpu") == "bf16"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_amp("fp16", "cpu")
    with pytest.raises(ValueError, match="amp must be one of"):
        resolve_amp("int8", "cpu")
    none, bf16 = MixedPrecision("none", "cpu"), MixedPrecision("bf16", "cpu")
    assert (none.monai_amp, none.amp_kwargs, bf16.monai_amp, bf16.amp_kwargs) == (False, {}, False, {})
    assert not isinstance(none.inferer(), AutocastInferer) and isinstance(bf16.inferer(), AutocastInferer)
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with none.autocast():
        assert not torch.is_autocast_enabled("cpu")
    if torch.cuda.is_available():
        fp16 = MixedPrecision("fp16", "cuda")
        assert fp16.monai_amp and fp16.amp_kwargs == {"dtype": torch.float16}
        assert not isinstance(fp16.inferer(), AutocastInferer)


def test_place_network_converts_2d_and_3d_weights() -> None:
    net3d = place_network(torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4)), channels_last=True)
    assert net3d[0].weight.is_contiguous(memory_format=torch.channels_last_3d) and is_channels_last(net3d)
    parameter = net3d[0].weight
    assert place_network(net3d, "cpu", channels_last=True)[0].weight is parameter  # identity kept
    assert not is_channels_last(torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.contiguous_format))


@pytest.mark.parametrize("bundle", ["openkbp", "prostate", "ham10000", "stoic"])
def test_bundle_configs_wire_the_amp_option(bundle: str) -> None:
    """train.yaml gives the trainer and the validation evaluator the precision's inferer, amp and amp_kwargs."""
    for amp, wrapped in (("none", False), (False, False), ("bf16", True)):
        parser = ConfigParser()
        parser.read_config(str(REPO_ROOT / "bundles" / f"ctan_{bundle}" / "configs" / "train.yaml"))
        parser["device"] = "$torch.device('cpu')"
        parser["amp"] = amp
        own = parser.get_parsed_content("validate#inferer")
        inferer = parser.get_parsed_content("validate#evaluator#inferer")
        assert isinstance(inferer, AutocastInferer) == wrapped
        assert type(inferer.inferer if wrapped else inferer) is type(own)
        assert isinstance(parser.get_parsed_content("train#trainer#inferer"), AutocastInferer) == wrapped
        for engine in ("train#trainer", "validate#evaluator"):
            assert parser.get_parsed_content(f"{engine}#amp") is False
            assert parser.get_parsed_content(f"{engine}#amp_kwargs") == {}
    parser["amp"] = "fp16"
    with pytest.raises(RuntimeError) as caught:  # MONAI's wrapper of the expression's error
        parser.get_parsed_content("precision")
    assert "needs CUDA" in str(caught.value.__cause__)


def test_image_decoder_runs_one_pixel_wide_layers_in_float32_under_cpu_autocast() -> None:
    # oneDNN's bf16 weight gradient of a padded stride-2 convolution on a 1x1 input is not finite on CPUs with
    # native bf16: such a layer runs in float32, the others in bf16, and the weight gradients stay finite
    decoder = ImageDecoder(2, (64, 128, 256), 512, out_channels=7, decoder_channels=(16, 16, 16, 16))
    dtypes: list[torch.dtype] = []
    for layer in decoder.down:
        layer.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    gen = torch.Generator().manual_seed(0)
    skips = [torch.randn(2, c, s, s, generator=gen) for c, s in ((64, 8), (128, 4), (256, 2))]
    bottleneck = torch.randn(2, 512, 1, 1, generator=gen)
    for _ in range(3):
        decoder.zero_grad(set_to_none=True)
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = decoder(skips, bottleneck, [32, 32], [])
        logits.sum().backward()
        assert dtypes == [torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32]  # inputs 8, 4, 2, 1 px
        assert all(torch.isfinite(p.grad).all() for p in decoder.parameters() if p.grad is not None)
