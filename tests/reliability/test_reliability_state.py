"""Issue 16, "Lose or corrupt state": each test fails on the code before the fix.

1. a kill while saving with ``n_saved: 1`` keeps the previous checkpoint; a start cleans orphans and surplus files
   and says loudly when a folder has no usable checkpoint;
2. a checkpoint with flipped bytes is skipped, naming it;
3. a second training on one checkpoint folder fails at once, naming the first one's PID;
4. a corrupt ``metrics_history.json`` never blocks training or checkpoints;
5. atomic writes are fsync'ed, and a full disk names the path and the free space and keeps the previous file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from ctan_monai.engines import AtomicCheckpointSaver, MetricsHistoryHandler, ResumeFromLatestCheckpoint
from ctan_monai.engines import latest_checkpoint as latest
from ctan_monai.engines.checkpoints import (
    LOCK_FILENAME,
    CheckpointDirLockedError,
    checkpoint_problem,
    lock_checkpoint_dir,
    release_checkpoint_dir,
)
from ctan_monai.utils.atomic import DiskFullError, atomic_path, atomic_write_text
from tests.conftest import REPO_ROOT


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _usable(folder: Path) -> list[str]:
    """The checkpoint files of a folder that load completely (the test's own check, not the code under test's)."""
    good = []
    for path in sorted(folder.glob("checkpoint_epoch=*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                assert archive.testzip() is None
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - anything that fails to read is not usable
            continue
        good.append(path.name)
    return good


def _model_and_trainer() -> tuple[torch.nn.Module, torch.optim.Optimizer, Engine]:
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)

    def step(engine: Engine, batch: int) -> float:
        opt.zero_grad()
        loss = net(torch.ones(1, 8)).pow(2).sum()
        loss.backward()
        opt.step()
        return loss.item()

    return net, opt, Engine(step)


@pytest.fixture(autouse=True)
def _no_locks_left(tmp_path: Path):
    yield
    for folder in [tmp_path, *(p for p in tmp_path.rglob("*") if p.is_dir())]:
        release_checkpoint_dir(folder)


# --- 1. kill while saving ------------------------------------------------------------------------------------------


def test_reliability_previous_checkpoint_is_kept_until_the_next_is_complete(tmp_path: Path, monkeypatch) -> None:
    """At the instant each checkpoint is being written (where a kill -9 would strike) the previous one is still
    there and loads; Ignite used to delete it first."""
    net, opt, trainer = _model_and_trainer()
    saver = AtomicCheckpointSaver(
        str(tmp_path), {"model": net, "optimizer": opt, "trainer": trainer}, save_interval=1, n_saved=1
    )
    saver.attach(trainer)
    during_writes = []
    real_save = torch.save

    def watched_save(obj, f, **kwargs):
        during_writes.append(_usable(tmp_path))
        real_save(obj, f, **kwargs)

    monkeypatch.setattr(torch, "save", watched_save)
    trainer.run([0, 1], max_epochs=3)
    assert during_writes == [[], ["checkpoint_epoch=1.pt"], ["checkpoint_epoch=2.pt"]]
    assert _names(tmp_path) == ["checkpoint_epoch=3.pt"]  # the older ones deleted once the next was complete


_DYING_TRAINING = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from ignite.engine import Engine
    from ctan_monai.engines import AtomicCheckpointSaver

    net = torch.nn.Linear(64, 64)
    opt = torch.optim.Adam(net.parameters())

    def step(engine, batch):
        opt.zero_grad()
        net(torch.ones(1, 64)).sum().backward()
        opt.step()

    engine = Engine(step)
    saver = AtomicCheckpointSaver(
        sys.argv[1], {"model": net, "optimizer": opt, "trainer": engine}, save_interval=1, n_saved=1
    )
    saver.attach(engine)
    real_save = torch.save

    def dying_save(obj, f, **kwargs):
        if engine.state.epoch == 2:  # the second save: part of the archive written, then kill -9
            f.write(b"PK\\x03\\x04" + bytes(4096))
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, f, **kwargs)

    torch.save = dying_save
    engine.run([0], max_epochs=3)
    """
)


def test_reliability_sigkill_during_a_save_resumes_from_the_previous_epoch(tmp_path: Path, caplog) -> None:
    """A real SIGKILL in the middle of writing epoch 2's checkpoint (n_saved 1): epoch 1's checkpoint survives, the
    rerun removes the orphan temporary file and resumes after epoch 1 with the optimiser state."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _DYING_TRAINING, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert _usable(tmp_path) == ["checkpoint_epoch=1.pt"], _names(tmp_path)
    assert latest(tmp_path).endswith("checkpoint_epoch=1.pt")

    net = torch.nn.Linear(64, 64)
    opt = torch.optim.Adam(net.parameters())
    trainer = Engine(lambda e, b: None)
    resume = ResumeFromLatestCheckpoint(tmp_path, {"model": net, "optimizer": opt, "trainer": trainer})
    with caplog.at_level(logging.WARNING):
        resume.attach(trainer)  # removes the orphan temporary file
    assert resume.orphans_removed and "interrupted checkpoint saves" in caplog.text
    assert _names(tmp_path) == ["checkpoint_epoch=1.pt", LOCK_FILENAME]
    resume(trainer)  # what STARTED does
    assert resume.resumed_from.endswith("checkpoint_epoch=1.pt") and trainer.state.epoch == 1
    assert {int(s["step"]) for s in opt.state_dict()["state"].values()} == {1}


def test_reliability_start_removes_orphans_and_surplus_checkpoints(tmp_path: Path, caplog) -> None:
    """A start after a kill: orphan temporary files (of this saver and of Ignite's) and complete checkpoints beyond
    n_saved are deleted; the run resumes from the newest complete one and keeps only its own newest."""
    net, opt, trainer = _model_and_trainer()
    objects = {"model": net, "optimizer": opt, "trainer": trainer}
    AtomicCheckpointSaver(str(tmp_path), objects, save_interval=1, n_saved=None).attach(trainer)
    trainer.run([0], max_epochs=2)
    (tmp_path / ".checkpoint_epoch=3.pt.k2x9_q1a.part.pt").write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / "tmpab12cd34").write_bytes(b"")
    assert _names(tmp_path)[-2:] == ["checkpoint_epoch=2.pt", "tmpab12cd34"]

    net, opt, trainer = _model_and_trainer()
    objects = {"model": net, "optimizer": opt, "trainer": trainer}
    resume = ResumeFromLatestCheckpoint(tmp_path, objects)
    with caplog.at_level(logging.WARNING):
        resume.attach(trainer)
        AtomicCheckpointSaver(str(tmp_path), objects, save_interval=1, n_saved=1).attach(trainer)
    assert sorted(resume.orphans_removed) == [".checkpoint_epoch=3.pt.k2x9_q1a.part.pt", "tmpab12cd34"]
    assert _names(tmp_path) == ["checkpoint_epoch=2.pt", LOCK_FILENAME]  # epoch 1: surplus with n_saved 1
    trainer.run([0], max_epochs=3)
    assert resume.resumed_from.endswith("checkpoint_epoch=2.pt")
    assert _names(tmp_path) == ["checkpoint_epoch=3.pt", LOCK_FILENAME]


def test_reliability_folder_without_a_usable_checkpoint_is_reported_loudly(tmp_path: Path, caplog) -> None:
    torch.save({"model": {}}, tmp_path / "checkpoint_epoch=1.pt")
    full = (tmp_path / "checkpoint_epoch=1.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=1.pt").write_bytes(full[: len(full) // 2])
    net, opt, trainer = _model_and_trainer()
    resume = ResumeFromLatestCheckpoint(tmp_path, {"model": net, "trainer": trainer})
    resume.attach(trainer)
    with caplog.at_level(logging.WARNING):
        trainer.run([0], max_epochs=1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "NO USABLE CHECKPOINT" in r.message]
    assert len(warnings) == 1 and str(tmp_path) in warnings[0].message, caplog.text
    assert "checkpoint_epoch=1.pt" in warnings[0].message and "starts from epoch 0" in warnings[0].message
    assert resume.resumed_from is None


# --- 2. flipped bytes ----------------------------------------------------------------------------------------------


def _flip_tensor_bytes(path: Path) -> None:
    """Flip 64 bytes inside the largest tensor member of a torch.save archive (not in any zip header)."""
    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, member.header_offset + 26)
    start = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
    for k in range(start, start + 64):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def test_reliability_checkpoint_with_flipped_bytes_is_skipped_naming_it(tmp_path: Path, caplog) -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64)
    torch.save({"model": net.state_dict()}, tmp_path / "checkpoint_epoch=1.pt")
    torch.save({"model": net.state_dict()}, tmp_path / "checkpoint_epoch=2.pt")
    bad = tmp_path / "checkpoint_epoch=2.pt"
    _flip_tensor_bytes(bad)
    loaded = torch.load(bad, weights_only=True)["model"]["weight"]  # torch itself loads it, with wrong weights
    assert not torch.equal(loaded, net.weight.detach())
    with caplog.at_level(logging.WARNING):
        assert latest(tmp_path).endswith("checkpoint_epoch=1.pt")
    assert str(bad) in caplog.text and "CRC" in caplog.text
    assert "CRC" in checkpoint_problem(bad) and checkpoint_problem(tmp_path / "checkpoint_epoch=1.pt") is None


# --- 3. one training per folder ------------------------------------------------------------------------------------


def test_reliability_second_training_on_a_folder_fails_at_once_naming_the_pid(tmp_path: Path) -> None:
    """Another process (a fork) holds the checkpoint folder: taking it, or attaching the resume handler, fails at
    once naming that PID; once the other process has ended, the folder is free again."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    child = os.fork()
    if child == 0:  # the "first training": takes the lock and holds it until told to end
        code = 1
        try:
            lock_checkpoint_dir(tmp_path)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
            code = 0
        finally:
            os._exit(code)
    try:
        assert select.select([ready_r], [], [], 30)[0], "the other process did not take the lock"
        os.read(ready_r, 1)
        assert f"pid={child}\n" in (tmp_path / LOCK_FILENAME).read_text()
        with pytest.raises(CheckpointDirLockedError, match=f"PID {child}") as error:
            lock_checkpoint_dir(tmp_path)
        assert error.value.pid == child and str(tmp_path.resolve()) in str(error.value)
        net, _, trainer = _model_and_trainer()
        with pytest.raises(CheckpointDirLockedError, match=f"PID {child}"):
            ResumeFromLatestCheckpoint(tmp_path, {"model": net}).attach(trainer)
    finally:
        os.write(done_w, b"1")
        os.waitpid(child, 0)
    lock_checkpoint_dir(tmp_path)
    assert f"pid={os.getpid()}\n" in (tmp_path / LOCK_FILENAME).read_text()


# --- 4. a corrupt history never blocks training ---------------------------------------------------------------------


def _history_trainer(tmp_path: Path, monkeypatch) -> tuple[Engine, Path]:
    import ctan_monai.engines.figures as figures

    monkeypatch.setattr(figures, "plot_learning_curves", lambda history, path: None)  # speed: no figure
    net, opt, trainer = _model_and_trainer()

    @trainer.on(Events.EPOCH_COMPLETED)
    def _metrics(engine: Engine) -> None:
        engine.state.metrics["train_loss"] = 1.0 / engine.state.epoch

    MetricsHistoryHandler(tmp_path).attach(trainer)
    ckpt = tmp_path / "checkpoints"
    objects = {"model": net, "optimizer": opt, "trainer": trainer}
    ResumeFromLatestCheckpoint(ckpt, objects).attach(trainer)
    AtomicCheckpointSaver(str(ckpt), objects, save_interval=1, n_saved=1).attach(trainer)
    return trainer, ckpt


def test_reliability_corrupt_history_is_moved_aside_and_training_goes_on(tmp_path: Path, monkeypatch, caplog) -> None:
    history = tmp_path / "metrics_history.json"
    history.write_text('{"train_loss": [[1, 0.5], [2, 0.')  # cut short
    (tmp_path / ".metrics_history.json.k2x9_q1a.part.json").write_text("{")  # a write that a kill interrupted
    trainer, ckpt = _history_trainer(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING):
        trainer.run([0], max_epochs=2)
    assert _names(ckpt) == ["checkpoint_epoch=2.pt", LOCK_FILENAME]
    aside = list(tmp_path.glob("metrics_history.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"train_loss": [[1, 0.5], [2, 0.'
    assert str(history) in caplog.text and str(aside[0]) in caplog.text
    assert json.loads(history.read_text())["train_loss"] == [[1, 1.0], [2, 0.5]]
    assert not list(tmp_path.glob(".metrics_history.json.*"))


def test_reliability_history_errors_are_logged_not_raised(tmp_path: Path, monkeypatch, caplog) -> None:
    import ctan_monai.engines.figures as figures
    import ctan_monai.utils.atomic as atomic

    trainer, ckpt = _history_trainer(tmp_path, monkeypatch)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def broken_figure(*args, **kwargs):
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(atomic, "atomic_write_json", full_disk)
    monkeypatch.setattr(figures, "plot_learning_curves", broken_figure)
    with caplog.at_level(logging.WARNING):
        trainer.run([0], max_epochs=2)
    assert _names(ckpt) == ["checkpoint_epoch=2.pt", LOCK_FILENAME]  # the checkpoints were written
    assert caplog.text.count("metrics history of epoch") == 2 and "No space left" in caplog.text


def test_reliability_history_drops_epochs_a_killed_run_recorded_beyond_its_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    """A history that runs ahead of the checkpoints (a run killed after recording an epoch but before saving it, or
    an earlier run restarted): the points from the epoch being run on are replaced, none of the old ones stays."""
    trainer, _ = _history_trainer(tmp_path, monkeypatch)
    (tmp_path / "metrics_history.json").write_text(json.dumps({"train_loss": [[1, 9.0], [2, 9.0], [3, 9.0]]}))
    trainer.run([0], max_epochs=2)
    assert json.loads((tmp_path / "metrics_history.json").read_text())["train_loss"] == [[1, 1.0], [2, 0.5]]


# --- 5. durable atomic writes, full disk ---------------------------------------------------------------------------


def test_reliability_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch
) -> None:
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "report.json"
    atomic_write_text(target, "{}")
    monkeypatch.undo()
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"], events
    assert Path(events[0][1]).parent == tmp_path and Path(events[0][1]).name.startswith(".report.json.")
    assert events[1][1] == str(target) and events[2][1] == str(tmp_path)


def _fake_disk_usage(free: int):
    usage = namedtuple("usage", "total used free")
    return lambda path: usage(10**12, 10**12 - free, free)


def test_reliability_disk_full_names_the_path_and_free_space_and_keeps_the_previous_file(
    tmp_path: Path, monkeypatch
) -> None:
    target = tmp_path / "summary.md"
    target.write_text("previous")
    monkeypatch.setattr("shutil.disk_usage", _fake_disk_usage(12345))

    with pytest.raises(OSError) as error, atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(error.value, DiskFullError) and error.value.errno == errno.ENOSPC
    assert str(target) in str(error.value) and "12345 bytes" in str(error.value) and "free" in str(error.value)
    assert target.read_text() == "previous" and _names(tmp_path) == ["summary.md"]  # nothing partial left


def test_reliability_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    """torch.save into a file that hits ENOSPC after 1 kB (torch reports it as a RuntimeError): the error names
    the checkpoint and the free space; epoch 1's checkpoint survives, nothing partial is left."""
    net, opt, trainer = _model_and_trainer()
    saver = AtomicCheckpointSaver(
        str(tmp_path), {"model": net, "optimizer": opt, "trainer": trainer}, save_interval=1, n_saved=1
    )
    saver.attach(trainer)
    real_save = torch.save

    class FullDisk:
        def __init__(self, stream):
            self.stream, self.written = stream, 0

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.stream.write(data)

        def flush(self) -> None:
            self.stream.flush()

    def save(obj, f, **kwargs):
        real_save(obj, FullDisk(f) if trainer.state.epoch == 2 else f, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr("shutil.disk_usage", _fake_disk_usage(777))
    with pytest.raises(OSError) as error:
        trainer.run([0], max_epochs=2)
    assert isinstance(error.value, DiskFullError), repr(error.value)
    assert str(tmp_path / "checkpoint_epoch=2.pt") in str(error.value) and "777 bytes" in str(error.value)
    monkeypatch.undo()
    assert _names(tmp_path) == ["checkpoint_epoch=1.pt"] and _usable(tmp_path) == ["checkpoint_epoch=1.pt"]
