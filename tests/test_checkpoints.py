"""Checkpoints are complete or absent: the atomic saver, and a resume that skips a truncated file."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from ctan_monai.engines import AtomicCheckpointSaver, latest_checkpoint


def _train(saver: AtomicCheckpointSaver, epochs: int) -> Engine:
    engine = Engine(lambda e, b: 0.0)
    saver.attach(engine)
    engine.run([0, 1], max_epochs=epochs)
    return engine


def test_saver_is_atomic_and_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    saver = AtomicCheckpointSaver(
        str(tmp_path), {"model": net, "optimizer": opt}, save_interval=1, n_saved=1, epoch_level=True
    )
    assert saver._interval_checkpoint.save_handler._atomic
    _train(saver, 1)
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=1.pt")

    def broken_save(obj, f, **kwargs):  # a save cut short: some bytes written, then the process "dies"
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    engine = Engine(lambda e, b: 0.0)
    saver = AtomicCheckpointSaver(
        str(tmp_path), {"model": net, "optimizer": opt}, save_interval=1, n_saved=1, epoch_level=True
    )
    saver.attach(engine)
    engine.state.epoch = 1
    with pytest.raises(KeyboardInterrupt):
        engine.fire_event(Events.EPOCH_COMPLETED)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint_epoch=1.pt"], names  # no half-written file, no leftover temp file
    monkeypatch.undo()
    assert set(torch.load(latest_checkpoint(tmp_path), weights_only=True)) == {"model", "optimizer"}


def test_latest_checkpoint_skips_truncated_file(tmp_path):
    torch.save({"model": {}}, tmp_path / "checkpoint_epoch=3.pt")
    full = (tmp_path / "checkpoint_epoch=3.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=4.pt").write_bytes(full[: len(full) // 2])
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=3.pt")
    assert latest_checkpoint(tmp_path / "absent") is None
