"""MONAI's ``CheckpointSaver`` with atomic, durable writes: a checkpoint is complete or absent, never half written, and
the previous one is deleted only once the next is complete; checkpoints verified before a resume (every archive
member's CRC); one training per checkpoint folder (an exclusive lock); the best validated model kept as one file,
with a fallback to the last weights for a run that never had a key metric."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import re
import socket
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from ctan_monai.utils.atomic import atomic_path

__all__ = [
    "LOCK_FILENAME",
    "SKIP_MODEL_SELECTION",
    "AtomicCheckpointSaver",
    "BestModelFallback",
    "BestModelSaver",
    "CheckpointDirLockedError",
    "CheckpointMismatchError",
    "checkpoint_problem",
    "lock_checkpoint_dir",
    "release_checkpoint_dir",
    "remove_orphan_files",
]

# an evaluator run whose ``engine.state`` has this attribute set True is not a candidate for the best model (e.g. the
# training summary's evaluation of the untrained network, before the first epoch)
SKIP_MODEL_SELECTION = "skip_model_selection"

# the lock file of a checkpoint folder: held (flock) by the one training that writes there, its PID inside
LOCK_FILENAME = "training.lock"

# temporary files of an interrupted save: ``atomic_path``'s (".checkpoint_epoch=3.pt.k2x9_q1a.part.pt") and those of
# Ignite's own atomic DiskSaver ("tmpk2x9_q1a")
_ORPHAN_RE = re.compile(r"^(?:\..+\.[a-z0-9_]{8}\.part(?:\..*)?|tmp[a-z0-9_]{8})$")

_LOG = logging.getLogger("ctan_monai.checkpoints")


# --- verification --------------------------------------------------------------------------------------------------

# (path, size, mtime, inode) -> problem (None: good): a file is read in full once per process, not at every look
_VERIFIED: dict[tuple[str, int, int, int], str | None] = {}


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a ``torch.save`` file cannot be trusted, or None when it can.

    ``torch.save`` writes a zip archive that stores a CRC-32 of every member, which ``torch.load`` does not check: a
    file with flipped bytes inside loads, with wrong weights. Every member is read here and checked against its CRC
    (``zipfile.ZipFile.testzip``); a file cut short has no central directory. Results are remembered per file (path,
    size, modification time, inode) for the life of the process.

    Args:
        path: the file.

    Returns:
        None for a complete archive whose members all match their CRC; otherwise the reason, e.g.
        ``"member 'ckpt/data/3' fails its CRC check (bytes changed after writing)"``.

    Example:
        >>> import torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint_epoch=1.pt")
        >>> torch.save({"model": torch.nn.Linear(1, 1).state_dict()}, path)
        >>> checkpoint_problem(path) is None
        True
    """
    file = Path(path)
    try:
        info = file.stat()
    except OSError as error:
        return f"cannot be read ({error})"
    key = (str(file.resolve()), info.st_size, info.st_mtime_ns, info.st_ino)
    if key not in _VERIFIED:
        if len(_VERIFIED) > 1024:
            _VERIFIED.clear()
        _VERIFIED[key] = _archive_problem(file, info.st_size)
    return _VERIFIED[key]


def _archive_problem(file: Path, size: int) -> str | None:
    if size == 0:
        return "empty (0 bytes: a write that never started)"
    try:
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
            if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
                return "not a torch checkpoint (no data.pkl in the archive)"
            bad = archive.testzip()
    except Exception as error:  # noqa: BLE001 - whatever breaks the reading of the archive makes the file unusable
        return f"not a complete archive (interrupted write?): {type(error).__name__}: {error}"
    if bad is not None:
        return f"member {bad!r} fails its CRC check (bytes changed after writing)"
    return None


# --- one training per folder ---------------------------------------------------------------------------------------


class CheckpointDirLockedError(RuntimeError):
    """Another process holds the lock of a checkpoint folder: two trainings must not write into one folder.

    Attributes:
        folder: the checkpoint folder.
        pid: the PID of the process that holds it (None when its lock file does not say).
        owner: what its lock file says (``pid``, ``host``, ``started``, ``command``).

    Example:
        >>> error = CheckpointDirLockedError("/runs/ctan/checkpoints", {"pid": "4242", "host": "gpu1"})
        >>> error.pid
        4242
    """

    def __init__(self, folder: str | os.PathLike[str], owner: Mapping[str, str]) -> None:
        self.folder = Path(folder)
        self.owner = dict(owner)
        pid = self.owner.get("pid", "")
        self.pid = int(pid) if pid.isdigit() else None
        who = f"PID {self.pid}" if self.pid is not None else "a process that left no PID"
        details = ", ".join(f"{k} {self.owner[k]}" for k in ("host", "started") if self.owner.get(k))
        command = self.owner.get("command")
        super().__init__(
            f"checkpoint folder {self.folder} is in use by another training ({who}"
            + (f", {details}" if details else "")
            + (f": {command}" if command else "")
            + f"; lock file {self.folder / LOCK_FILENAME}). Two trainings must not write into one folder: wait for"
            " that run to end or stop it, or give this run another output folder (e.g. --output_dir)."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.folder, self.owner))


_REASON_CHARS = 300  # of the loader's error quoted by CheckpointMismatchError (torch lists every key it misses)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint to resume from does not fit this run's objects: another training (another ``--arch``,
    ``--backbone`` or task settings) wrote it into the same output folder.

    Attributes:
        path: the checkpoint file.
        reason: the start of the loader's error, on one line (e.g. ``Error(s) in loading state_dict for CTAN:
            Missing key(s) in state_dict: ...``).

    Example:
        >>> error = CheckpointMismatchError("/runs/ctan/checkpoints/checkpoint_epoch=3.pt", "size mismatch")
        >>> "--output_dir" in str(error) and "--resume False" in str(error)
        True
    """

    def __init__(self, path: str | os.PathLike[str], reason: BaseException | str) -> None:
        self.path = Path(path)
        text = " ".join(line.strip() for line in str(reason).strip().splitlines()[:2] if line.strip())
        text = text or type(reason).__name__
        self.reason = text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."
        super().__init__(
            f"cannot resume from checkpoint {self.path}: it does not fit this run's model or training state. Was it "
            f"written by another training in this output folder (another --arch, --backbone or task settings)? "
            f"({self.reason}) Give this run its own folder (--output_dir <new folder>), or start it from scratch "
            "here with --resume False (its checkpoints then replace that one)."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


# resolved folder -> (fd of its lock file, the PID that took it): the locks this process holds
_HELD: dict[Path, tuple[int, int]] = {}


def _lock_owner(lock_file: Path) -> dict[str, str]:
    try:
        text = lock_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in text.splitlines()) if k.strip()}


def _owner_is_gone(owner: Mapping[str, str]) -> bool:
    """Whether the lock file names a process of this host that no longer exists (its lock is then held only by
    children that outlived it, e.g. data-loader workers of a killed run, which exit within seconds)."""
    pid = owner.get("pid", "")
    if not pid.isdigit() or owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def lock_checkpoint_dir(folder: str | os.PathLike[str], orphan_wait_s: float = 20.0) -> Path:
    """Take the exclusive lock of a checkpoint folder for this process (``fcntl.flock`` on its ``training.lock``,
    non-blocking), and write this process's PID, host, start time and command into the lock file.

    The kernel releases the lock when the process ends, however it ends (``kill -9`` included): a stale lock file
    blocks nothing. Taking a lock this process already holds does nothing. When the holder named in the file is
    gone but the lock is still held (inherited by data-loader workers of a killed run), waits up to
    ``orphan_wait_s`` for them to exit; a live holder makes it fail at once.

    Args:
        folder: the checkpoint folder (created when missing).
        orphan_wait_s: how long to wait for the children of a holder that is gone.

    Returns:
        the lock file.

    Raises:
        CheckpointDirLockedError: when another process holds the lock, naming its PID.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> lock_checkpoint_dir(folder).name
        'training.lock'
        >>> release_checkpoint_dir(folder)
    """
    resolved = Path(folder).resolve()
    held = _HELD.get(resolved)
    if held is not None and held[1] == os.getpid():
        return resolved / LOCK_FILENAME
    resolved.mkdir(parents=True, exist_ok=True)
    lock_file = resolved / LOCK_FILENAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    deadline = time.monotonic() + orphan_wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            owner = _lock_owner(lock_file)
            if not _owner_is_gone(owner) or time.monotonic() > deadline:
                os.close(fd)
                raise CheckpointDirLockedError(resolved, owner) from None
            time.sleep(0.25)
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    command = " ".join(sys.argv)[:500].replace("\n", " ")
    record = f"pid={os.getpid()}\nhost={socket.gethostname()}\nstarted={started}\ncommand={command}\n"
    _HELD[resolved] = (fd, os.getpid())
    try:  # the PID is for the message another process gets; the lock itself is what excludes it
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode("utf-8"), 0)
    except OSError as error:
        _LOG.warning("locked %s but could not write this process's PID into %s: %s", resolved, lock_file, error)
    return lock_file


def release_checkpoint_dir(folder: str | os.PathLike[str]) -> None:
    """Release this process's lock of a checkpoint folder (nothing when it holds none). The lock file stays.

    Args:
        folder: the checkpoint folder.

    Example:
        >>> release_checkpoint_dir("/nonexistent")
    """
    resolved = Path(folder).resolve()
    held = _HELD.pop(resolved, None)
    if held is None or held[1] != os.getpid():  # a forked child does not own its parent's lock
        return
    with contextlib.suppress(OSError):
        fcntl.flock(held[0], fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(held[0])


def remove_orphan_files(folder: str | os.PathLike[str]) -> list[str]:
    """Remove the temporary files that interrupted saves left in a checkpoint folder.

    Call it only while holding the folder's lock (:func:`lock_checkpoint_dir`): a temporary file is then no other
    process's write in progress.

    Args:
        folder: the checkpoint folder (need not exist).

    Returns:
        the names removed.

    Example:
        >>> remove_orphan_files("/nonexistent")
        []
    """
    path = Path(folder)
    if not path.is_dir():
        return []
    removed = []
    for file in sorted(path.iterdir()):
        if _ORPHAN_RE.match(file.name) and file.is_file():
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
            removed.append(file.name)
    if removed:
        _LOG.warning(
            "removed %d temporary file(s) of interrupted checkpoint saves from %s: %s", len(removed), path, removed
        )
    return removed


# --- saving --------------------------------------------------------------------------------------------------------


class _DurableDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` (as MONAI's: an optional fixed file name) that writes through :func:`atomic_path`
    (fsync'ed, disk-full errors named) and deletes a file that ``Checkpoint`` retires only *after* the next one is
    complete: Ignite asks for the removal first, so a kill in between would leave no checkpoint at all."""

    def __init__(
        self,
        dirname: str | os.PathLike[str],
        filename: str | None = None,
        after_save: Callable[[str, Mapping | None], None] | None = None,
    ) -> None:
        super().__init__(dirname=dirname, atomic=True, create_dir=True, require_empty=False)
        self.filename = filename
        self.after_save = after_save
        self.pending_removals: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != self.save_on_rank:
            return
        name = self.filename or filename
        # into a Python file: a failed write then surfaces as the OSError (ENOSPC) behind torch's RuntimeError
        with atomic_path(self.dirname / name) as tmp, open(tmp, "wb") as stream:
            torch.save(checkpoint, stream, **self.kwargs)
        retired, self.pending_removals = self.pending_removals, []
        for old in retired:
            if old != name:
                with contextlib.suppress(FileNotFoundError):
                    (self.dirname / old).unlink()
        if self.after_save is not None:
            self.after_save(name, metadata)

    def remove(self, filename: str) -> None:
        """Retire a file: it is deleted after the next successful save."""
        if idist.get_rank() == self.save_on_rank:
            self.pending_removals.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` whose files are written to a temporary file in the same folder, fsync'ed and
    renamed into place (group and others keep read permission), and whose retired files are deleted only once the
    new one is complete.

    MONAI turns Ignite's atomic mode off, so a run killed while saving leaves a truncated ``checkpoint_epoch=N.pt``
    that a resume would then fail on; and Ignite deletes the previous checkpoint *before* writing the next, so a run
    with ``n_saved: 1`` killed while saving would leave none. With this saver a kill at any instant leaves the last
    complete checkpoint (and, at worst, a temporary file that ``ResumeFromLatestCheckpoint`` removes at the next
    start).

    The epoch (interval) checkpoints are kept as the ``n_saved`` newest in the folder: after each save, files of
    the same name pattern with a later epoch (left by an earlier run that was restarted with ``resume: false``) and
    older ones beyond ``n_saved`` are deleted; when attached, complete ones beyond the ``n_saved`` newest are
    deleted (e.g. the previous checkpoint of a run killed between writing the next and deleting it). A full disk
    raises ``ctan_monai.utils.atomic.DiskFullError`` naming the file and the free space; the previous checkpoint
    survives. Takes every argument of ``CheckpointSaver``.

    Example:
        >>> import torch
        >>> saver = AtomicCheckpointSaver("/tmp/ckpt", {"model": torch.nn.Linear(1, 1)}, save_final=True)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                monai_saver = checkpoint.save_handler
                after = self._prune_after_save if checkpoint is self._interval_checkpoint else None
                checkpoint.save_handler = _DurableDiskSaver(
                    monai_saver.dirname, filename=getattr(monai_saver, "filename", None), after_save=after
                )

    def attach(self, engine: Engine) -> None:
        """Attach as ``CheckpointSaver`` does; first delete surplus complete epoch checkpoints (beyond ``n_saved``)."""
        if self._interval_checkpoint is not None and idist.get_rank() == 0:
            self._prune_surplus()
        super().attach(engine)

    def _interval_files(self) -> dict[int, Path]:
        """The folder's files named like this saver's epoch (or iteration) checkpoints, by epoch (iteration)."""
        checkpoint = self._interval_checkpoint
        folder = Path(self.save_dir)
        if checkpoint is None or not folder.is_dir():
            return {}
        name = next(iter(checkpoint.to_save)) if len(checkpoint.to_save) == 1 else "checkpoint"
        base = f"{checkpoint.filename_prefix}_{name}" if checkpoint.filename_prefix else name
        stem, ext = re.escape(f"{base}_{checkpoint.score_name}="), re.escape(f".{checkpoint.ext}")
        pattern = re.compile(rf"{stem}(\d+){ext}")
        return {int(m.group(1)): p for p in folder.iterdir() if (m := pattern.fullmatch(p.name)) and p.is_file()}

    def _prune_surplus(self) -> None:
        n_saved = self._interval_checkpoint.n_saved  # type: ignore[union-attr]
        if n_saved is None:
            return
        newest_first = sorted(self._interval_files().items(), reverse=True)
        complete = [path for _, path in newest_first if checkpoint_problem(path) is None]
        for path in complete[n_saved:]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            _LOG.info("removed surplus checkpoint %s (n_saved=%d)", path, n_saved)

    def _prune_after_save(self, name: str, metadata: Mapping | None = None) -> None:
        files = self._interval_files()
        saved = next((k for k, p in files.items() if p.name == name), None)
        if saved is None:
            return
        n_saved = self._interval_checkpoint.n_saved  # type: ignore[union-attr]
        kept = sorted((k for k in files if k <= saved), reverse=True)[: n_saved or None]
        for key, path in files.items():
            if key in kept:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            if key > saved:
                _LOG.warning("removed %s: a later checkpoint than this run's %s, left by an earlier run", path, name)


class BestModelSaver(AtomicCheckpointSaver):
    """Keep the weights of the best validated epoch as one file (the model zoo's ``models/model.pt``), chosen by a
    key metric of the evaluator, written atomically.

    Attach it to the evaluator, after the handler that sets ``key_metric_name``. An epoch replaces the file only when
    its key metric is strictly better than every earlier epoch's; an evaluation without the key metric (missing or
    not finite: ``KeyMetricHandler`` leaves it unset) is no candidate, nor is one whose ``engine.state`` has
    ``SKIP_MODEL_SELECTION`` set (the untrained network that ``TrainingSummaryHandler`` evaluates before training).
    Its record of the best score so far is checkpointable: put the saver itself in the trainer's checkpoint objects
    (``state_dict`` / ``load_state_dict``), so that a resumed run replaces ``model.pt`` only with a better epoch than
    any before it.

    A run in which no epoch had a key metric would end without the file: ``BestModelFallback`` on the trainer then
    writes the last weights in its place (``save_fallback``), with a warning.

    Args:
        save_dir: the model folder.
        save_dict: what the file holds, e.g. ``{"model": network}`` (one entry: the file is its bare ``state_dict``).
        key_metric_name: the metric in ``engine.state.metrics`` that ranks epochs (higher is better unless
            ``lower_is_better``).
        filename: the file name of the best model.
        lower_is_better: rank by the negated metric.

    Example:
        >>> import torch
        >>> saver = BestModelSaver("/tmp/models", {"model": torch.nn.Linear(1, 1)}, "val_key_metric")
        >>> saver.has_best()
        False
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        key_metric_name: str = "val_key_metric",
        filename: str = "model.pt",
        lower_is_better: bool = False,
    ) -> None:
        super().__init__(
            save_dir=save_dir,
            save_dict=save_dict,
            save_key_metric=True,
            key_metric_name=key_metric_name,
            key_metric_filename=filename,
            key_metric_negative_sign=lower_is_better,
        )
        self.key_metric_name = key_metric_name
        self.filename = filename
        self.fallback_logger = logging.getLogger("ctan_monai.best_model")

    @property
    def path(self) -> Path:
        """The best model's file."""
        return Path(self.save_dir) / self.filename

    def metrics_completed(self, engine: Engine) -> None:
        """Save when the key metric is there and better than every earlier epoch's (a run without it: nothing)."""
        if getattr(engine.state, SKIP_MODEL_SELECTION, False):
            return
        value = engine.state.metrics.get(self.key_metric_name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        super().metrics_completed(engine)

    def has_best(self) -> bool:
        """Whether an epoch was selected (in this run or, once resumed, an earlier one) and its file is there."""
        return bool(self._key_metric_checkpoint._saved) and self.path.is_file()  # noqa: SLF001 - Ignite's record

    def best_score(self) -> float | None:
        """The best key metric so far (as ranked: negated when ``lower_is_better``), or None."""
        saved = self._key_metric_checkpoint._saved  # noqa: SLF001
        return float(saved[-1].priority) if saved else None

    def save_fallback(self, engine: Engine | None = None) -> bool:
        """Write the current weights as the best file when no epoch was ever selected, with a warning.

        The file is not recorded as a selection: a later (resumed) epoch with a key metric replaces it. Weights that
        are not finite (a diverged run) are not written.

        Args:
            engine: the trainer (for the log message's epoch); optional.

        Returns:
            True when the file was written.
        """
        if self.has_best():
            return False
        state = {name: _unwrapped(obj).state_dict() for name, obj in self.save_dict.items()}
        tensors = [t for s in state.values() if isinstance(s, dict) for t in s.values() if torch.is_tensor(t)]
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors):
            self.fallback_logger.warning("no best model and the last weights are not finite: %s not written", self.path)
            return False
        epoch = getattr(getattr(engine, "state", None), "epoch", None)
        self.fallback_logger.warning(
            "no validated epoch had a finite key metric %r: %s holds the LAST weights (epoch %s), not a selected model",
            self.key_metric_name,
            self.path,
            epoch,
        )
        # as Ignite's Checkpoint writes it: one object is saved as its bare state_dict
        checkpoint: Any = next(iter(state.values())) if len(state) == 1 else state
        self._key_metric_checkpoint.save_handler(checkpoint, self.filename)  # noqa: SLF001 - the atomic saver
        return True

    def state_dict(self) -> dict[str, Any]:
        """The best score so far and its file (Ignite ``Checkpoint`` state)."""
        return self._key_metric_checkpoint.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the best score so far, e.g. when resuming."""
        self._key_metric_checkpoint.load_state_dict(state_dict)


def _unwrapped(obj: Any) -> Any:
    """The module inside a (Distributed)DataParallel wrapper, as Ignite's ``Checkpoint`` saves it."""
    if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return obj.module
    return obj


class BestModelFallback:
    """On the trainer's ``COMPLETED``: when no validated epoch was selected by ``saver`` (no finite key metric in the
    whole run, e.g. an AUC undefined on a tiny validation split), write the last weights as its best file, with a
    warning, so that every finished run leaves ``models/model.pt`` (``BestModelSaver.save_fallback``).

    Attach it to the trainer, after the handlers that validate (a run that ends validated has ranked its last epoch
    first). With distributed training, attach it on the rank that validates only.

    Args:
        saver: the evaluator's ``BestModelSaver``.

    Example:
        >>> import torch
        >>> saver = BestModelSaver("/tmp/models", {"model": torch.nn.Linear(1, 1)})
        >>> fallback = BestModelFallback(saver)
    """

    def __init__(self, saver: BestModelSaver) -> None:
        self.saver = saver

    def attach(self, engine: Engine) -> None:
        """Register on the trainer's ``COMPLETED``."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.saver.save_fallback(engine)
