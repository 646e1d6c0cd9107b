"""Checkpoints of the comparison: written so that a crash never leaves one that looks complete,
found again when the same command starts over (so torchrun can restart it as it is).

Layout under the checkpoint folder: one folder per checkpoint, ``ckpt-<seq>`` (``seq`` orders
checkpoints across the runs of the comparison: run index x (steps + 1) + step), holding each
rank's part ``rank<r>.pt`` and rank 0's marker ``complete.json``. A part is written to a
temporary name, fsynced and renamed; when every rank has written its part (they exchange its
size and sha256, which is also the barrier), rank 0 writes the marker the same way. The marker
names the run, its index and the step, the configuration (and its digest) and every part's
size and sha256. A checkpoint is loaded only when its marker is there and every part matches
it; otherwise it is skipped with a one-line warning and the previous complete one is used.
The newest ``KEEP`` complete checkpoints are kept, older folders deleted.

A step of 0 with run index i is the boundary before run i (every earlier run finished; their
results are in the parts); a boundary past the last run means the comparison is done.

Writing happens behind training: ``save`` serializes the part on the calling thread (the only
time the step loop spends; the part holds live tensors) and a writer thread writes it, agrees
with the other ranks' writers on a process group of its own (gloo, so its collectives never
interleave with training's) and, on rank 0, writes the marker. The next ``save`` and ``wait``
first join the previous writer, so at most one write is in flight and a write that failed
raises there.

The parts are pickles (``torch.save``) of this trainer's own state (numpy and Python RNG
states included), loaded with ``weights_only=False``: load only checkpoint folders you wrote.
"""

import hashlib
import io
import json
import os
import re
import shutil
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

MARKER = "complete.json"
KEEP = 2
FORMAT = 1
_FOLDER = re.compile(r"^ckpt-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder that must not be resumed from (another configuration)."""


def config_digest(config: Dict[str, Any]) -> str:
    """sha256 of the configuration's fields (every field of ``Config``: each one changes the
    data, the model or the training, the world size included)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def differing_fields(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """"name: checkpoint X, this run Y" for every field whose value differs."""
    names = sorted(set(saved) | set(current))
    return [f"{n}: checkpoint {saved.get(n)!r}, this run {current.get(n)!r}"
            for n in names if saved.get(n) != current.get(n)]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file, fsynced, renamed over it, and the
    folder fsynced: after a crash ``path`` is either absent (or the old file) or complete."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _warn(message: str) -> None:
    print(f"checkpoint: {message}", file=sys.stderr, flush=True)


def folders(directory: str) -> List[tuple]:
    """(seq, path) of every checkpoint folder, newest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _FOLDER.match(name)
        if m and os.path.isdir(os.path.join(directory, name)):
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found, reverse=True)


def check_folder(path: str) -> Optional[str]:
    """Why the checkpoint in ``path`` is not complete (None when it is): no marker, an
    unreadable marker, a part missing, or a part whose size or sha256 differs from the
    marker's."""
    marker_path = os.path.join(path, MARKER)
    if not os.path.exists(marker_path):
        return "no marker (not completely written)"
    try:
        with open(marker_path) as f:
            marker = json.load(f)
        parts = marker["parts"]
    except (OSError, ValueError, KeyError) as exc:
        return f"unreadable marker ({exc})"
    for name, want in parts.items():
        part = os.path.join(path, name)
        if not os.path.exists(part):
            return f"{name} is missing"
        size = os.path.getsize(part)
        if size != want["size"]:
            return f"{name} has {size} bytes, the marker says {want['size']}"
        if _sha256_file(part) != want["sha256"]:
            return f"{name}'s sha256 differs from the marker's"
    return None


def newest_complete(directory: str, config: Dict[str, Any]) -> Optional[dict]:
    """The marker of the newest complete checkpoint in ``directory`` (with its ``path``), or
    None. Incomplete newer ones are skipped with a warning each. Raises CheckpointError, naming
    the differing fields, when the newest complete one is of another configuration."""
    for _, path in folders(directory):
        problem = check_folder(path)
        if problem is not None:
            _warn(f"ignored {path}: {problem}")
            continue
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
        if marker.get("config_digest") != config_digest(config):
            raise CheckpointError(
                f"checkpoint {path} is of another configuration ("
                + "; ".join(differing_fields(marker.get("config", {}), config))
                + "); use another --checkpoint-dir or the same settings")
        marker["path"] = path
        return marker
    return None


def prune(directory: str, keep: int = KEEP) -> None:
    """Delete every checkpoint folder older than the newest ``keep`` complete ones (a folder
    is complete by its marker alone here: the parts were checked when it was written)."""
    kept = 0
    for _, path in folders(directory):
        if kept >= keep:
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(os.path.join(path, MARKER)):
            kept += 1


class Checkpointer:
    """Writes and finds the checkpoints of one comparison; every method is collective (every
    rank of ``group`` calls it, in the same order).

    ``config``: ``Config.as_dict()`` of the run (world size included); ``every``: steps
    between checkpoints within a run. The folder must be shared by the ranks (one machine,
    or a shared file system): rank 0 checks the parts and writes the marker."""

    def __init__(self, directory: str, every: int, config: Dict[str, Any], group=None):
        if every < 1:
            raise ValueError(f"checkpoint_every: expected >= 1, got {every}")
        self.directory, self.every, self.config = os.path.abspath(directory), every, config
        self.steps = int(config["steps"])
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.seconds: List[float] = []   # each save's time on the calling thread, this rank
        self.write_seconds: List[float] = []  # each write's time in the writer thread
        # The writers' own group: collective over every rank of the world, created in the
        # same order on every rank (here, before any run's groups).
        ranks = None if group is None else dist.get_process_group_ranks(group)
        self._writer_group = dist.new_group(ranks=ranks, backend="gloo")
        self._writer: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        if self.rank == 0:
            os.makedirs(self.directory, exist_ok=True)

    def seq(self, run_index: int, step: int) -> int:
        return run_index * (self.steps + 1) + step

    def latest(self) -> Optional[dict]:
        """The marker of the checkpoint to resume from (None: start afresh), the same on every
        rank. Raises CheckpointError on every rank when it is of another configuration."""
        answer: List[Any] = [None]
        if self.rank == 0:
            try:
                answer[0] = newest_complete(self.directory, self.config)
            except CheckpointError as exc:
                answer[0] = {"error": str(exc)}
        dist.broadcast_object_list(answer, src=self._src(), group=self.group)
        marker = answer[0]
        if marker is not None and "error" in marker:
            raise CheckpointError(marker["error"])
        return marker

    def _src(self) -> int:
        # broadcast_object_list takes a global rank.
        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def load(self, marker: dict) -> dict:
        """This rank's part of the checkpoint ``marker`` names."""
        path = os.path.join(marker["path"], f"rank{self.rank}.pt")
        part = torch.load(path, map_location="cpu", weights_only=False)
        if part.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format {part.get('format')!r}, expected {FORMAT}")
        return part

    def save(self, run_index: int, run: Optional[str], step: int, part: dict) -> float:
        """Serialize this rank's ``part`` of the checkpoint (run ``run_index``, ``step``) and
        hand it to the writer thread (the previous write is joined first); the writer writes
        it, and rank 0's writes the marker once every rank's has written, then prunes. Returns
        the seconds the calling thread spent.

        Raises:
            Whatever the previous write raised (CheckpointError, OSError, a collective's
            error)."""
        t0 = time.perf_counter()
        self.wait()
        buffer = io.BytesIO()
        torch.save(dict(part, format=FORMAT, run=run, run_index=run_index, step=step,
                        rank=self.rank, world=self.world), buffer)
        self._writer = threading.Thread(
            target=self._write, args=(run_index, run, step, buffer.getvalue()),
            name="checkpoint-writer", daemon=True)
        self._writer.start()
        seconds = time.perf_counter() - t0
        self.seconds.append(seconds)
        return seconds

    def wait(self) -> None:
        """Join the write in flight (if any); raise what it raised."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, run_index: int, run: Optional[str], step: int, data: bytes) -> None:
        try:
            t0 = time.perf_counter()
            folder = os.path.join(self.directory, f"ckpt-{self.seq(run_index, step):010d}")
            os.makedirs(folder, exist_ok=True)
            name = f"rank{self.rank}.pt"
            write_atomic(os.path.join(folder, name), data)
            mine = (name, {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            everyone: List[Any] = [None] * self.world
            # Also the barrier: the marker is written only after every part is.
            dist.all_gather_object(everyone, mine, group=self._writer_group)
            if self.rank == 0:
                marker = {"format": FORMAT, "run": run, "run_index": run_index, "step": step,
                          "world_size": self.world,
                          "config_digest": config_digest(self.config),
                          "config": self.config, "parts": dict(everyone)}
                write_atomic(os.path.join(folder, MARKER),
                             json.dumps(marker, indent=1, sort_keys=True).encode())
                prune(self.directory)
            self.write_seconds.append(time.perf_counter() - t0)
        except BaseException as error:  # raised on the training thread by the next wait()
            self._error = error
