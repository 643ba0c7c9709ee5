"""The worker's side of weight updates, weight groups and sleep: every rank runs each command and
answers with a `WorkerReply`.

An update is two-phase, so that under tensor parallelism no rank keeps weights another rank
failed to load: `BeginWeights` checks and (for a path or a group) loads everything while the old
values are kept; the core then sends `EndWeights`, commit when every rank succeeded, else roll back.

Copies made from the parameters (the native forward's packed weights) are made again after a
commit and after the weights wake, and dropped when they sleep.
"""

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from protocol.weights import (
    BeginWeights,
    DestroyWeightGroup,
    EndWeights,
    InitWeightGroup,
    Sleep,
    WakeUp,
    WeightPieces,
    WorkerCommand,
    WorkerReply,
)
from worker.kv_cache import KVCache
from worker.sleep import DeviceMemory
from worker.weight_files import file_tensors, read_tensors
from worker.weight_group import WeightGroups
from worker.weights import ModelWeights, PieceAssembler, Target, WeightError, WeightUpdate

logger = logging.getLogger(__name__)


class WeightCopies(Protocol):
    def pack(self) -> None: ...

    def release(self) -> None: ...


@dataclass
class OpenUpdate:
    op_id: int
    update: WeightUpdate
    assembler: PieceAssembler


class WorkerCommands:
    def __init__(
        self, model: torch.nn.Module, kv_cache: KVCache, rank: int, device: torch.device,
        copies: WeightCopies | None = None,
    ) -> None:  # fmt: skip
        self.rank = rank
        self.copies = copies
        self.weights = ModelWeights(model)
        self.groups = WeightGroups(rank, device)
        self.memory = DeviceMemory(self.weights, kv_cache, device)
        self._open: OpenUpdate | None = None

    def handle(self, command: WorkerCommand) -> WorkerReply:
        num_tensors = 0
        try:
            match command:
                case BeginWeights():
                    with one_thread():
                        num_tensors = self._begin(command)
                case WeightPieces():
                    with one_thread():
                        self._add_pieces(command)
                case EndWeights():
                    return self._end(command)
                case InitWeightGroup(args=args):
                    self.groups.join(args)
                case DestroyWeightGroup(group_name=name):
                    self.groups.destroy(name)
                case Sleep(level=level):
                    if level >= 2 and self.copies is not None:
                        self.copies.release()
                    self.memory.sleep(level)
                case WakeUp(tags=tags):
                    weights_slept = "weights" in self.memory.asleep
                    self.memory.wake(tags)
                    if weights_slept and "weights" not in self.memory.asleep and self.copies is not None:
                        self.copies.pack()
        except Exception as error:  # the command fails, the worker keeps serving
            logger.warning("%s failed: %s", type(command).__name__, error, exc_info=not isinstance(error, ValueError))
            return WorkerReply(command.op_id, self.rank, error=one_line(error))
        return WorkerReply(command.op_id, self.rank, num_tensors=num_tensors)

    def _begin(self, command: BeginWeights) -> int:
        if self._open is not None:  # never left open by the core; if it were, nothing of it is kept
            logger.error("update %d was still open: rolled back", self._open.op_id)
            self._open.update.roll_back()
        files = file_tensors(command.path) if command.path is not None else []
        try:
            targets = self.weights.targets([f.spec for f in files] if files else command.tensors)
            self.memory.prepare_writes(targets)
        except WeightError:
            if command.group is not None:
                self.groups.drain(command.group, command.tensors, command.packed, command.bucket_bytes)
            raise
        update = self.weights.begin(targets, frozenset(self.memory.dropped))
        self._open = OpenUpdate(command.op_id, update, PieceAssembler(update, targets))
        if files:
            for target, part in read_tensors(files, targets):
                update.write(target, part)
        elif command.group is not None:
            self._receive(command.group, command, targets, self._open)
        return len(targets)

    def _receive(self, group: str, command: BeginWeights, targets: list[Target], opened: OpenUpdate) -> None:
        if command.packed:
            self.groups.receive_packed(group, targets, command.bucket_bytes, opened.assembler)
        else:
            self.groups.receive(group, targets, opened.update)

    def _add_pieces(self, command: WeightPieces) -> None:
        if self._open is None or self._open.op_id != command.update_id:
            raise ValueError(f"weight pieces for update {command.update_id}, which is not open")
        for piece in command.pieces:
            if len(piece.data):
                self._open.assembler.add(piece.name, piece.offset, bytes_tensor(piece.data))

    def _end(self, command: EndWeights) -> WorkerReply:
        opened = self._open
        if opened is None or opened.op_id != command.update_id:  # it failed before anything was written
            return WorkerReply(command.op_id, self.rank)
        self._open = None
        if command.commit:
            opened.update.commit()
            self.memory.written(opened.update.written)
            if self.copies is not None and "weights" not in self.memory.asleep:
                self.copies.pack()
            return WorkerReply(command.op_id, self.rank)
        return WorkerReply(command.op_id, self.rank, restored=opened.update.roll_back())


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Loading is copies between receives: with torch's other threads, each copy leaves them
    spinning for a while, on the cores the receives (and a trainer beside us) need. Measured on
    2 cores, SmolLM2 from a group: 0.6 s with them, 0.3 s (a bare broadcast's time) without."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bytes_tensor(array: np.ndarray) -> torch.Tensor:
    """A uint8 tensor over a received frame's bytes, without a copy (it is only read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array.reshape(-1).view(np.uint8))


def one_line(error: BaseException) -> str:
    """A clear message for the core: a ValueError already is one; others get their type name."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    return first if isinstance(error, ValueError) else f"{type(error).__name__}: {first}"
