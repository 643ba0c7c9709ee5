"""Weight updates in the core: one transaction for every source, the weight version, and what a
failure leaves behind.

    update_weights(path | group) ─▶ queued ─▶ [atomic: pause(keep), settled] ─▶ BeginWeights to every rank
        every rank checked and loaded (old values kept) ─▶ EndWeights(commit) ─▶ new version [─▶ resume]
        any rank failed ─▶ EndWeights(roll back) ─▶ old weights back [─▶ resume]
                                                 └▶ not kept: paused, `broken`, until an update succeeds

Tensors from a client: `begin_weight_transfer` opens the transaction the same way and answers its
id; each `weight_chunk` goes to every rank and is answered once all took it (so one chunk is in
flight); `end_weight_transfer` commits when every declared byte came, else rolls back. A transfer
whose frontend dies, or that sends nothing for TRANSFER_IDLE_S, is rolled back.

Updates run one at a time in arrival order. A resume that arrives meanwhile waits for all of
them: it never runs onto half-written weights.

The weight groups every rank joined are kept here with how they pack, and the tensors of their
last update, which an update through the group that names none sends again (vLLM's rule).
"""

import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from core.pause import Waiter
from core.workers import first_error
from protocol.errors import UtilityError
from protocol.weights import (
    DEFAULT_BUCKET_BYTES,
    BeginWeights,
    EndWeights,
    InitWeightGroupArgs,
    KvMode,
    TensorPiece,
    TensorSpec,
    UpdateWeightsArgs,
    WeightPieces,
    WeightUpdateResult,
    WorkerReply,
    tensor_specs,
)

if TYPE_CHECKING:
    from core.loop import EngineLoop

logger = logging.getLogger(__name__)

TRANSFER_IDLE_S = 60.0


def next_version(version: str) -> str:
    """The version after `version`: its trailing number plus one ("7" -> "8", "step-9" ->
    "step-10"); "-1" appended where it has none."""
    match = re.search(r"\d+$", version)
    if match is None:
        return version + "-1"
    return version[: match.start()] + str(int(match.group()) + 1)


@dataclass
class JoinedGroup:
    args: InitWeightGroupArgs
    last_specs: list[TensorSpec] = field(default_factory=list)


@dataclass
class Update:
    caller: Optional[Waiter]  # who gets the result (None once a transfer's opening was answered)
    args: UpdateWeightsArgs
    specs: list[TensorSpec]  # empty for a path: the workers read the names from the files
    from_client: bool
    packed: bool = False
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    started: float = field(default_factory=time.monotonic)
    phase: str = "queued"  # queued -> pausing -> loading -> (receiving ->) ending
    op_id: int = -1  # its BeginWeights, which names it on the workers
    pauses: bool = False  # it paused the engine itself and resumes it at the end
    resume_kv: KvMode = "keep"
    owner: int = -1  # the frontend of a client transfer
    received: dict[str, int] = field(default_factory=dict)  # bytes per tensor, client transfers
    last_chunk: float = 0.0
    num_tensors: int = 0


class WeightUpdates:
    def __init__(self, engine: "EngineLoop") -> None:
        self.engine = engine
        self.queue: deque[Update] = deque()
        self.active: Optional[Update] = None
        self.broken: Optional[str] = None  # why the weights must not serve, after a failed update
        self.waiting_resumes: list[tuple[Waiter, KvMode]] = []
        self.groups: dict[str, JoinedGroup] = {}

    @property
    def busy(self) -> bool:
        return self.active is not None or bool(self.queue)

    def submit(self, caller: Waiter, args: UpdateWeightsArgs, from_client: bool) -> None:
        """Queue an update; UtilityError at once for bad arguments or an engine not paused."""
        specs = _checked_specs(args, from_client)
        packed, bucket_bytes = bool(args.packed), args.bucket_bytes or DEFAULT_BUCKET_BYTES
        if args.group is not None:
            joined = self.groups.get(args.group)
            if joined is None:
                known = ", ".join(sorted(self.groups)) or "none"
                raise UtilityError(f"no weight group {args.group!r} (joined: {known}): init_weight_group first")
            specs = specs or joined.last_specs
            if not specs:
                raise UtilityError(f"no tensors to update: names is empty and group {args.group!r} sent none before")
            packed = joined.args.packed if args.packed is None else args.packed
            bucket_bytes = args.bucket_bytes or joined.args.bucket_bytes
        if not args.atomic and self.engine.pause.status != "paused":
            raise UtilityError("updating weights needs a paused engine: pause(mode=...) first, or atomic=True")
        if args.group is not None:
            self.groups[args.group].last_specs = specs
        update = Update(caller, args, specs, from_client, packed, bucket_bytes, owner=caller.client_index)
        self.queue.append(update)
        self.poll()

    def poll(self) -> None:
        """Start the next update once the engine is paused and no step runs; roll back an idle
        client transfer. Called by the loop between steps."""
        active = self.active
        if active is not None and active.phase == "receiving":
            if time.monotonic() - active.last_chunk > TRANSFER_IDLE_S:
                self._end(active, False, f"no weight chunk came for {TRANSFER_IDLE_S:.0f} s")
        if self.active is None and self.queue:
            self.active = self.queue.popleft()
        update = self.active
        if update is None or update.phase not in ("queued", "pausing"):
            return
        engine = self.engine
        if update.phase == "queued" and update.args.atomic and engine.pause.status == "running":
            update.pauses, update.resume_kv, update.phase = True, update.args.kv or "keep", "pausing"
            engine.pause.begin("keep")
            engine.interrupt_step()
            engine.settle_pause()
        if engine.pause.status == "paused" and engine.step_in_flight is None:
            self._load(update)

    def add_chunk(self, caller: Waiter, transfer_id: int, pieces: list[TensorPiece]) -> None:
        update = self._transfer(transfer_id)
        problem = _account(update, pieces)
        if problem is not None:
            self._end(update, False, problem)
            raise UtilityError(problem)
        update.last_chunk = time.monotonic()
        self.engine.ops.run(
            lambda op_id: WeightPieces(op_id, update.op_id, pieces),
            lambda replies: self._chunk_taken(update, caller, replies),
        )

    def finish_transfer(self, caller: Waiter, transfer_id: int, commit: bool) -> None:
        update = self._transfer(transfer_id)
        update.caller = caller
        if not commit:
            self._end(update, False, "the client cancelled the weight transfer")
            return
        missing = [s for s in update.specs if update.received.get(s.name, 0) != s.nbytes]
        if missing:
            spec = missing[0]
            got = update.received.get(spec.name, 0)
            self._end(update, False, f"tensor {spec.name!r} got {got} of its {spec.nbytes} bytes")
        else:
            self._end(update, True)

    def abandon_frontend(self, client_index: int) -> None:
        """A frontend died: its transfer is rolled back, its queued updates dropped."""
        self.queue = deque(u for u in self.queue if u.owner != client_index)
        active = self.active
        if active is not None and active.from_client and active.owner == client_index and active.phase == "receiving":
            self._end(active, False, f"frontend {client_index} died during the weight transfer")

    def on_user_pause(self) -> None:
        """A pause() while an atomic update holds the engine paused: the pause is the user's now."""
        if self.active is not None:
            self.active.pauses = False

    def resume_after_updates(self, caller: Waiter, kv: KvMode) -> None:
        self.waiting_resumes.append((caller, kv))

    def _load(self, update: Update) -> None:
        update.phase = "loading"
        args = update.args
        update.op_id = self.engine.ops.run(
            lambda op_id: BeginWeights(op_id, args.path, args.group, update.specs, update.packed, update.bucket_bytes),
            lambda replies: self._loaded(update, replies),
        )

    def _loaded(self, update: Update, replies: list[WorkerReply]) -> None:
        update.num_tensors = replies[0].num_tensors
        error = first_error(replies)
        if error is not None:
            self._end(update, False, error)
        elif update.from_client:
            update.phase, update.last_chunk = "receiving", time.monotonic()
            self.engine.answer(update.caller, {"transfer_id": update.op_id})
            update.caller = None
        else:
            self._end(update, True)

    def _chunk_taken(self, update: Update, caller: Waiter, replies: list[WorkerReply]) -> None:
        error = first_error(replies)
        if error is None:
            self.engine.answer(caller, None)
            return
        if update is self.active and update.phase == "receiving":
            self._end(update, False, error)
        self.engine.answer(caller, None, UtilityError(error))

    def _end(self, update: Update, commit: bool, error: Optional[str] = None) -> None:
        update.phase = "ending"
        self.engine.ops.run(
            lambda op_id: EndWeights(op_id, update.op_id, commit),
            lambda replies: self._ended(update, commit and error is None, error or first_error(replies), replies),
        )

    def _ended(self, update: Update, commit: bool, error: Optional[str], replies: list[WorkerReply]) -> None:
        self.active = None
        if commit and error is None:
            scheduler = self.engine.scheduler
            version = update.args.version or next_version(scheduler.weight_version)
            scheduler.new_weights(version)
            self.broken = None
            seconds = round(time.monotonic() - update.started, 3)
            logger.info("weights updated to version %s: %d tensor(s) in %.2f s", version, update.num_tensors, seconds)
            self._release_pause(update, update.resume_kv)
            result: Any = WeightUpdateResult(version, update.num_tensors, seconds)
            failure = None
        else:
            message = f"weight update failed: {error}"
            if all(r.restored for r in replies):
                message += " (the weights are unchanged)"
            else:
                self.broken = error
                message += "; the old weights could not be restored: the engine stays paused until an update succeeds"
            logger.error("%s", message)
            self._release_pause(update, "keep")  # the KV is still the old weights'
            result, failure = None, UtilityError(message)
        if update.caller is not None:
            self.engine.answer(update.caller, result, failure)
        self._after_updates()

    def _release_pause(self, update: Update, kv: KvMode) -> None:
        """An update that paused the engine resumes it, or hands that to the next queued update."""
        if not update.pauses:
            return
        if self.queue:
            following = self.queue[0]
            following.pauses = True
            following.resume_kv = "recompute" if "recompute" in (kv, following.args.kv) else "keep"
        elif self.broken is None:
            self.engine.resume(kv)

    def _after_updates(self) -> None:
        self.poll()
        if self.busy:
            return
        resumes, self.waiting_resumes = self.waiting_resumes, []
        for caller, kv in resumes:
            problem = self.engine.resume_problem()
            if problem is not None:
                self.engine.answer(caller, None, UtilityError(problem))
            else:
                self.engine.resume(kv)
                self.engine.answer(caller, self.engine.state())

    def _transfer(self, transfer_id: int) -> Update:
        update = self.active
        if update is None or not update.from_client or update.op_id != transfer_id or update.phase != "receiving":
            raise UtilityError(f"no weight transfer {transfer_id} is open")
        return update


def _checked_specs(args: UpdateWeightsArgs, from_client: bool) -> list[TensorSpec]:
    if from_client and (args.path is not None or args.group is not None):
        raise UtilityError("a weight transfer takes names, dtypes and shapes, not path or group")
    if not from_client and (args.path is None) == (args.group is None):
        raise UtilityError("update_weights takes exactly one of path=, group= (or tensors=, from a client)")
    if args.kv is not None and not args.atomic:
        raise UtilityError("kv= is for atomic=True updates; otherwise pass it to resume()")
    if args.bucket_bytes is not None and args.bucket_bytes < 1:
        raise UtilityError(f"bucket_bytes must be >= 1, got {args.bucket_bytes}")
    if args.version is not None and not args.version:
        raise UtilityError("version must be a non-empty string")
    if args.path is not None:
        if args.names or args.dtypes or args.shapes:
            raise UtilityError("update_weights(path=...) reads names, dtypes and shapes from the files")
        return []
    try:
        specs = tensor_specs(args.names, args.dtypes, args.shapes)
    except ValueError as error:
        raise UtilityError(str(error)) from None
    if not specs and args.group is None:
        raise UtilityError("no tensors to update: names is empty")
    return specs


def _account(update: Update, pieces: list[TensorPiece]) -> Optional[str]:
    """Count a chunk's bytes; a problem (unknown tensor, bytes out of order or past its end) is
    returned. Each tensor's bytes come in order."""
    sizes = {s.name: s.nbytes for s in update.specs}
    for piece in pieces:
        if piece.name not in sizes:
            return f"tensor {piece.name!r} was not declared when the transfer began"
        got = update.received.get(piece.name, 0)
        if piece.offset != got or got + len(piece.data) > sizes[piece.name]:
            return f"bytes {piece.offset}..{piece.offset + len(piece.data)} of tensor {piece.name!r} came out of order"
        update.received[piece.name] = got + len(piece.data)
    return None
