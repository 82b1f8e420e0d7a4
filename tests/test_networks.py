"""Networks: shapes, cross-task wiring, CTAB against Eq. 2, ImageNet weight loading, TorchScript."""

from __future__ import annotations

import itertools

import pytest
import torch

from ctan_monai.networks import (
    CTAN,
    MTAN,
    CrossTaskAttentionBottleneck,
    ResNetEncoder,
    build_network,
    cross_task_attention,
    load_torchvision_resnet_weights,
)

SEG = {"name": "seg", "level": "pixel", "kind": "segmentation", "out_channels": 5}
DOSE = {"name": "dose", "level": "pixel", "kind": "regression", "out_channels": 1}
DX = {"name": "dx", "level": "image", "kind": "classification", "out_channels": 7}
TASK_SETS = {1: [SEG], 2: [SEG, DX], 3: [SEG, DOSE, DX]}


def _expected_shape(task: dict, batch: int, size: list[int]) -> tuple[int, ...]:
    if task["level"] == "pixel":
        return (batch, task["out_channels"], *size)
    return (batch, task["out_channels"])


@pytest.mark.parametrize(
    "arch,spatial_dims,num_tasks,backbone",
    list(itertools.product(["stl", "hps", "mtan", "ctan"], [2, 3], [1, 2, 3], ["resnet18", "resnet50"])),
)
def test_output_shapes(arch: str, spatial_dims: int, num_tasks: int, backbone: str) -> None:
    torch.manual_seed(0)
    tasks = TASK_SETS[num_tasks]
    # odd sizes check that decoders return exactly the input size
    size = [48, 40] if spatial_dims == 2 else [32, 24, 40]
    small = {"pixel_decoder_channels": (32, 16, 8), "image_decoder_channels": (16, 16, 16, 16)}
    net = build_network(arch, tasks, backbone=backbone, spatial_dims=spatial_dims, in_channels=2, **small).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 2, *size))
    assert list(out) == [t["name"] for t in tasks]
    for task in tasks:
        assert tuple(out[task["name"]].shape) == _expected_shape(task, 2, size)
        assert torch.isfinite(out[task["name"]]).all()


def test_input_checks() -> None:
    net = build_network("hps", [SEG], backbone="resnet18", in_channels=1)
    with pytest.raises(ValueError, match="input channels"):
        net(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="spatial dims"):
        net(torch.zeros(1, 1, 8, 32, 32))
    with pytest.raises(ValueError, match="unknown architecture"):
        build_network("unet", [SEG])
    with pytest.raises(ValueError, match="does not take"):
        build_network("hps", [SEG], ctab_normalization="none")


def _attention_grad_norms(net: torch.nn.Module, task_index: int) -> list[float]:
    norms = []
    for stage in net.stages:
        grads = [p.grad for p in stage.attention[task_index].parameters()]
        norms.append(sum(float(g.abs().sum()) if g is not None else 0.0 for g in grads))
    return norms


@pytest.mark.parametrize("arch,cross", [("ctan", True), ("mtan", False)])
def test_cross_task_wiring(arch: str, cross: bool) -> None:
    """Task 1's loss alone reaches task 2's attention blocks in CTAN (Eq. 1 uses the other task's mask) and never
    in MTAN."""
    torch.manual_seed(0)
    net = build_network(arch, [SEG, DOSE], backbone="resnet18")
    out = net(torch.randn(2, 1, 64, 64))
    out["seg"].square().mean().backward()
    other = _attention_grad_norms(net, task_index=1)
    own = _attention_grad_norms(net, task_index=0)
    if cross:
        assert all(n > 0 for n in other), other
    else:
        assert all(n == 0 for n in other), other
    # task 1's own blocks shape its features in MTAN; in CTAN its mask shapes task 2's features, and its
    # propagated feature feeds its own next-stage attention, so both see gradients except CTAN's last stage
    assert own[0] > 0


def _eq2_einsum(own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    # Ā[d, m] = sum_{n, c} E_t[d, n] E_t'[c, n] E_t[c, m]
    return torch.einsum("bdn,bcn,bcm->bdm", own, other, own)


@pytest.mark.parametrize("channels,positions", [(32, 9), (6, 50)])
@pytest.mark.parametrize("order", ["positions", "channels", "auto"])
def test_ctab_matches_eq2(channels: int, positions: int, order: str) -> None:
    gen = torch.Generator().manual_seed(1)
    own = torch.randn(3, channels, positions, generator=gen, dtype=torch.float64)
    other = torch.randn(3, channels, positions, generator=gen, dtype=torch.float64)
    expected = _eq2_einsum(own, other)
    got = cross_task_attention(own, other, "none", order=order)
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < 1e-10
    scaled = cross_task_attention(own, other, "mean", order=order)
    rel = (scaled - expected / (channels * positions)).abs().max() / (expected.abs().max() / (channels * positions))
    assert rel < 1e-10


def test_ctab_softmax_is_convex_combination() -> None:
    gen = torch.Generator().manual_seed(2)
    own = torch.randn(2, 8, 5, generator=gen, dtype=torch.float64)
    other = torch.randn(2, 8, 5, generator=gen, dtype=torch.float64)
    out = cross_task_attention(own, other, "softmax")
    weights = torch.softmax(torch.einsum("bcn,bcm->bnm", other, own) / 8**0.5, dim=1)
    assert torch.allclose(out, torch.einsum("bcn,bnm->bcm", own, weights))


def test_ctab_default_is_finite_in_half_precision() -> None:
    """Realistic bottleneck activations (post-ReLU, up to tens) at ResNet-50 sizes: C=512 embedding channels,
    N=16 (128x128 input) and N=512 (a 3D 256x256x256 input, 8x8x8 positions)."""
    gen = torch.Generator().manual_seed(3)
    for positions in (16, 512):
        own = (torch.randn(2, 512, positions, generator=gen) * 20).relu()
        other = (torch.randn(2, 512, positions, generator=gen) * 20).relu()
        out = cross_task_attention(own.bfloat16(), other.bfloat16(), "mean")
        assert torch.isfinite(out).all()
        ref = cross_task_attention(own.double(), other.double(), "mean")
        assert ((out.double() - ref).abs().max() / ref.abs().max()) < 0.05
        # the printed product overflows float16, which is why the default normalises
        assert not torch.isfinite(cross_task_attention(own.half(), other.half(), "none")).all()
    ctab = CrossTaskAttentionBottleneck(2, 64, 32, num_tasks=2).to(torch.bfloat16)
    feats = [(torch.randn(2, 64, 4, 4) * 30).bfloat16() for _ in range(2)]
    assert all(torch.isfinite(o).all() for o in ctab(feats))


def _torchvision_resnet50_state(in_channels: int = 3) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's ResNet-50 names and shapes, written out independently of our encoder."""
    gen = torch.Generator().manual_seed(4)

    def bn(prefix: str, ch: int, state: dict) -> None:
        state[f"{prefix}.weight"] = torch.rand(ch, generator=gen)
        state[f"{prefix}.bias"] = torch.randn(ch, generator=gen)
        state[f"{prefix}.running_mean"] = torch.randn(ch, generator=gen)
        state[f"{prefix}.running_var"] = torch.rand(ch, generator=gen) + 0.5
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(7)

    state: dict[str, torch.Tensor] = {"conv1.weight": torch.randn(64, in_channels, 7, 7, generator=gen)}
    bn("bn1", 64, state)
    inplanes = 64
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            state[f"{p}.conv1.weight"] = torch.randn(planes, inplanes, 1, 1, generator=gen)
            bn(f"{p}.bn1", planes, state)
            state[f"{p}.conv2.weight"] = torch.randn(planes, planes, 3, 3, generator=gen)
            bn(f"{p}.bn2", planes, state)
            state[f"{p}.conv3.weight"] = torch.randn(planes * 4, planes, 1, 1, generator=gen)
            bn(f"{p}.bn3", planes * 4, state)
            if b == 0:
                state[f"{p}.downsample.0.weight"] = torch.randn(planes * 4, inplanes, 1, 1, generator=gen)
                bn(f"{p}.downsample.1", planes * 4, state)
            inplanes = planes * 4
    state["fc.weight"] = torch.randn(1000, 2048, generator=gen)
    state["fc.bias"] = torch.randn(1000, generator=gen)
    return state


def test_torchvision_weights_load(tmp_path) -> None:
    state = _torchvision_resnet50_state()
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    encoder = ResNetEncoder("resnet50", in_channels=3)
    report = load_torchvision_resnet_weights(encoder, path)
    assert not report.missing and not report.unexpected and not report.adapted
    own = encoder.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        name = key.replace("layer1.", "layers.0.", 1) if key.startswith("layer1.") else key
        for j in range(2, 5):
            if key.startswith(f"layer{j}."):
                name = key.replace(f"layer{j}.", f"layers.{j - 1}.", 1)
        assert torch.equal(own[name], value), key
    # grey input: the RGB filters are averaged and rescaled
    grey = ResNetEncoder("resnet50", in_channels=1)
    report = load_torchvision_resnet_weights(grey, path)
    assert report.adapted == ["conv1.weight"]
    assert torch.allclose(grey.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True), atol=1e-5)
    # through the factory, into every architecture
    net = build_network("ctan", [SEG, DOSE], backbone="resnet50", in_channels=1, pretrained_weights=path)
    assert torch.equal(net.encoder.layers[3][2].conv3.weight, state["layer4.2.conv3.weight"])


def test_mismatched_weights_give_clear_errors(tmp_path) -> None:
    state = _torchvision_resnet50_state()
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_torchvision_resnet_weights(ResNetEncoder("resnet18"), path)
    del state["layer2.1.conv2.weight"]
    state["head.extra"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(ValueError, match=r"missing key.*layers\.1\.1\.conv2\.weight.*unexpected.*head\.extra"):
        load_torchvision_resnet_weights(ResNetEncoder("resnet50"), broken)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_torchvision_resnet_weights(ResNetEncoder("resnet50"), tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError):
        load_torchvision_resnet_weights(ResNetEncoder("resnet50"), tmp_path / "absent.pth")


@pytest.mark.parametrize("arch", ["stl", "hps", "mtan", "ctan"])
def test_torchscript_matches_eager(arch: str) -> None:
    torch.manual_seed(0)
    net = build_network(arch, [SEG, DOSE, DX], backbone="resnet18").eval()
    x = torch.randn(2, 1, 64, 64)
    scripted = torch.jit.script(net)
    with torch.no_grad():
        eager, script = net(x), scripted(x)
    assert set(eager) == set(script)
    for name in eager:
        assert (eager[name] - script[name]).abs().max() < 1e-5


def test_ctan_and_mtan_differ_only_in_wiring() -> None:
    """Same parameters, different outputs: CTAN without CTAB is MTAN with the masks swapped."""
    torch.manual_seed(0)
    mtan = MTAN([SEG, DOSE], backbone="resnet18").eval()
    ctan = CTAN([SEG, DOSE], backbone="resnet18").eval()
    shared = {k: v for k, v in mtan.state_dict().items() if k.startswith(("encoder.", "stages."))}
    ctan.load_state_dict(shared, strict=False)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        _, us, ps = mtan.encoder(x)
        feats_m, _ = mtan.stages[0](us[0], ps[0], [])
        feats_c, _ = ctan.stages[0](us[0], ps[0], [])
    assert torch.allclose(feats_m[0], feats_c[1]) and torch.allclose(feats_m[1], feats_c[0])


def test_input_windows_add_clipped_copies() -> None:
    """``input_windows``: each window adds a clipped, rescaled copy of every input channel before the first
    convolution; the network still takes ``in_channels`` channels, TorchScript and all four architectures work."""
    encoder = ResNetEncoder("resnet18", spatial_dims=2, in_channels=2, input_windows=[(0.2, 0.3), (0.0, 10.0)])
    x = torch.rand(1, 2, 4, 4)
    windowed = encoder.windowed(x)
    assert encoder.conv1.weight.shape[1] == 6 and windowed.shape == (1, 6, 4, 4)
    assert torch.equal(windowed[:, :2], x)
    assert torch.allclose(windowed[:, 2:4], ((x - 0.2) / 0.1).clamp(0, 1))
    assert torch.allclose(windowed[:, 4:], x / 10.0)
    for arch in ("stl", "hps", "mtan", "ctan"):
        net = build_network(arch, [SEG, DOSE], backbone="resnet18", input_windows=[[0.21, 0.31]]).eval()
        assert net(torch.rand(1, 1, 64, 64))["seg"].shape == (1, 5, 64, 64)
        assert not any("window" in key for key in net.state_dict())  # config, not weights
    scripted = torch.jit.script(net)
    image = torch.rand(1, 1, 64, 64)
    assert torch.allclose(scripted(image)["dose"], net(image)["dose"], atol=1e-5)
    with pytest.raises(ValueError, match="high > low"):
        ResNetEncoder("resnet18", in_channels=1, input_windows=[(0.3, 0.2)])
