"""Bundle helpers: finding a bundle's folder and loading trained weights with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctan_monai.apps import find_bundle_root, load_weights

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_find_bundle_root_from_the_repository_and_from_the_bundle(tmp_path):
    assert find_bundle_root("ctan_openkbp", REPO_ROOT) == str(REPO_ROOT / "bundles" / "ctan_openkbp")
    assert find_bundle_root("ctan_openkbp", REPO_ROOT / "bundles" / "ctan_openkbp").endswith("ctan_openkbp")
    renamed = tmp_path / "my_copy" / "configs"
    renamed.mkdir(parents=True)
    (renamed / "metadata.json").write_text(json.dumps({"name": "ctan_openkbp"}))
    assert find_bundle_root("ctan_openkbp", tmp_path / "my_copy") == str(tmp_path / "my_copy")
    with pytest.raises(FileNotFoundError, match="--bundle_root"):
        find_bundle_root("ctan_openkbp", tmp_path)


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))


def test_load_weights_reads_bare_checkpoint_and_ddp_state_dicts(tmp_path):
    trained = _net()
    bare, ckpt, ddp = tmp_path / "model.pt", tmp_path / "checkpoint.pt", tmp_path / "ddp.pt"
    torch.save(trained.state_dict(), bare)
    torch.save({"model": trained.state_dict(), "optimizer": {}}, ckpt)
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, ddp)
    x = torch.randn(4, 3)
    for path in (bare, ckpt, ddp):
        net = load_weights(_net().train(), path)
        assert not net.training
        torch.testing.assert_close(net(x), trained(x))


def test_load_weights_names_the_file_on_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="'missing.pt' not found"):
        load_weights(_net(), tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt.*not a readable PyTorch state dict"):
        load_weights(_net(), garbage)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match="tensor.pt.*holds a Tensor, not a state dict"):
        load_weights(_net(), tensor)
    other = tmp_path / "other_arch.pt"
    torch.save(torch.nn.Linear(5, 5).state_dict(), other)
    with pytest.raises(ValueError, match="other_arch.pt.*does not fit this network"):
        load_weights(_net(), other)
