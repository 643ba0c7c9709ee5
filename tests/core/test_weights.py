"""The core's weight-update transaction, in-process: what it sends the ranks, what it answers, and
the state a failure leaves. The ranks are played by hand."""

import queue

import numpy as np
import pytest

from core.weights import next_version
from protocol.codec import encode_args
from protocol.messages import EngineState, FrontendHello, PauseArgs, UtilityCall, UtilityResult
from protocol.weights import (
    BeginWeights,
    EndWeights,
    GroupNameArgs,
    InitWeightGroupArgs,
    ResumeArgs,
    TensorPiece,
    TransferArgs,
    UpdateWeightsArgs,
    WeightPieces,
    WorkerReply,
)
from tests.core.test_loop import RecordingOutput, RecordingWorkers, make_loop

NORM = dict(names=["model.norm.weight"], dtypes=["float32"], shapes=[[4]])  # 16 bytes


class Engine:
    """The loop with recorded outputs and commands, and calls by name."""

    def __init__(self, num_workers: int = 1) -> None:
        self.output = RecordingOutput()
        self.workers = RecordingWorkers(num_workers)
        self.inbox: queue.Queue = queue.Queue()
        self.loop = make_loop(self.output, self.inbox, self.workers)
        self.deliver(FrontendHello(0))
        self.next_call = 0

    def deliver(self, message) -> None:
        """As the loop takes an input between steps."""
        self.inbox.put(message)
        self.loop.handle_inputs(block=False)
        self.loop.weights.poll()

    def call(self, method: str, args=None, tensors=()) -> int:
        self.next_call += 1
        self.deliver(UtilityCall(0, self.next_call, method, encode_args(args), list(tensors)))
        return self.next_call

    def answer(self, call_id: int) -> UtilityResult | None:
        found = [m for _, m in self.output.sent if isinstance(m, UtilityResult) and m.call_id == call_id]
        return found[-1] if found else None

    def reply(self, **fields) -> None:
        """Every rank answers the last command."""
        command = self.workers.submitted[-1]
        for rank in range(self.workers.num_workers):
            self.deliver(WorkerReply(command.op_id, rank, **fields))

    def state(self) -> EngineState:
        return self.loop.state()

    def join_group(self, name: str = "g", **args) -> None:
        self.call("init_weight_group", InitWeightGroupArgs("127.0.0.1", 1234, 1, 1 + self.workers.num_workers,
                                                           name, **args))  # fmt: skip
        self.reply()


def test_an_update_needs_a_paused_engine_or_atomic():
    engine = Engine()
    call = engine.call("update_weights", UpdateWeightsArgs(path="/ckpt"))
    assert "needs a paused engine" in engine.answer(call).error
    assert engine.workers.submitted == []


def test_an_atomic_update_pauses_loads_on_every_rank_commits_and_resumes():
    engine = Engine(num_workers=2)
    call = engine.call("update_weights", UpdateWeightsArgs(path="/ckpt", atomic=True, version="v7"))
    begin = engine.workers.submitted[-1]
    assert isinstance(begin, BeginWeights) and begin.path == "/ckpt" and engine.state().state == "paused"
    engine.deliver(WorkerReply(begin.op_id, 0, num_tensors=3))
    assert len(engine.workers.submitted) == 1  # rank 1 has not answered
    engine.deliver(WorkerReply(begin.op_id, 1, num_tensors=3))
    end = engine.workers.submitted[-1]
    assert isinstance(end, EndWeights) and end.update_id == begin.op_id and end.commit
    assert engine.answer(call) is None
    engine.reply()
    assert engine.answer(call).value["weight_version"] == "v7" and engine.answer(call).value["num_tensors"] == 3
    state = engine.state()
    assert (state.state, state.weight_version, state.updating_weights) == ("running", "v7", False)


def test_a_failed_update_that_could_not_restore_keeps_the_engine_paused_until_one_succeeds():
    engine = Engine()
    engine.join_group()
    engine.call("pause", PauseArgs("abort"))
    call = engine.call("update_weights", UpdateWeightsArgs(group="g", **NORM))
    engine.reply(error="the broadcast broke")
    assert not engine.workers.submitted[-1].commit
    engine.reply(restored=False)
    assert "could not be restored: the engine stays paused" in engine.answer(call).error
    assert engine.state().weights_error == "the broadcast broke"
    assert "must succeed before resume" in engine.answer(engine.call("resume")).error
    good = engine.call("update_weights", UpdateWeightsArgs(path="/ckpt"))
    engine.reply()
    engine.reply()
    assert engine.answer(good).value["weight_version"] == "1" and engine.state().weights_error is None
    assert engine.answer(engine.call("resume")).value["state"] == "running"


def test_a_restored_failure_changes_nothing_and_an_atomic_one_resumes():
    engine = Engine()
    call = engine.call("update_weights", UpdateWeightsArgs(path="/ckpt", atomic=True))
    engine.reply(error="tensor 'x' has shape [2]")
    engine.reply()
    assert engine.answer(call).error.endswith("tensor 'x' has shape [2] (the weights are unchanged)")
    state = engine.state()
    assert (state.state, state.weight_version, state.weights_error) == ("running", "0", None)


def test_a_resume_during_an_update_answers_after_it():
    engine = Engine()
    engine.call("pause", PauseArgs("keep"))
    update = engine.call("update_weights", UpdateWeightsArgs(path="/ckpt", version="new"))
    resume = engine.call("resume", ResumeArgs("recompute"))
    assert engine.answer(resume) is None and engine.state().state == "paused"
    engine.reply()
    engine.reply()
    results = [m.call_id for _, m in engine.output.sent if isinstance(m, UtilityResult)]
    assert results[-2:] == [update, resume]
    assert engine.answer(resume).value["weight_version"] == "new" and engine.state().state == "running"


def norm_piece(offset: int, length: int) -> TensorPiece:
    return TensorPiece("model.norm.weight", offset, np.zeros(length, np.uint8))


def open_transfer(engine: Engine) -> int:
    """A paused engine's transfer of NORM, opened; its id."""
    engine.call("pause", PauseArgs("abort"))
    opened = engine.call("begin_weight_transfer", UpdateWeightsArgs(**NORM))
    engine.reply(num_tensors=1)
    return engine.answer(opened).value["transfer_id"]


def test_a_client_transfer_checks_each_chunk_and_commits_only_when_complete():
    engine = Engine()
    transfer_id = open_transfer(engine)
    first = engine.call("weight_chunk", TransferArgs(transfer_id), [norm_piece(0, 10)])
    assert isinstance(engine.workers.submitted[-1], WeightPieces) and engine.answer(first) is None
    engine.reply()
    assert engine.answer(first).error is None
    short = engine.call("end_weight_transfer", TransferArgs(transfer_id))
    assert not engine.workers.submitted[-1].commit
    engine.reply()
    assert "tensor 'model.norm.weight' got 10 of its 16 bytes" in engine.answer(short).error
    assert "no weight transfer" in engine.answer(engine.call("weight_chunk", TransferArgs(transfer_id))).error


def test_a_chunk_out_of_order_rolls_the_transfer_back():
    engine = Engine()
    transfer_id = open_transfer(engine)
    late = engine.call("weight_chunk", TransferArgs(transfer_id), [norm_piece(8, 8)])
    assert "came out of order" in engine.answer(late).error
    assert isinstance(engine.workers.submitted[-1], EndWeights) and not engine.workers.submitted[-1].commit


@pytest.mark.parametrize(
    "args, error",
    [
        (UpdateWeightsArgs(), "exactly one of path=, group="),
        (UpdateWeightsArgs(path="/a", group="g"), "exactly one of path=, group="),
        (UpdateWeightsArgs(group="g"), "no tensors to update: names is empty and group 'g' sent none before"),
        (UpdateWeightsArgs(group="h", **NORM), "no weight group 'h' (joined: g)"),
        (UpdateWeightsArgs(group="g", names=["a"], dtypes=["int8"], shapes=[[1]]), "dtype 'int8' is not accepted"),
        (UpdateWeightsArgs(group="g", names=["a", "b"], dtypes=["float32"], shapes=[[1]]), "differ in length"),
        (UpdateWeightsArgs(path="/a", kv="recompute"), "kv= is for atomic=True"),
        (UpdateWeightsArgs(path="/a", names=["x"]), "reads names, dtypes and shapes from the files"),
    ],
)
def test_bad_update_arguments_are_refused_before_any_rank_sees_them(args, error):
    engine = Engine()
    engine.join_group()
    engine.call("pause", PauseArgs("abort"))
    submitted = len(engine.workers.submitted)
    assert error in engine.answer(engine.call("update_weights", args)).error
    assert len(engine.workers.submitted) == submitted


def test_a_group_update_packs_as_its_group_says_and_without_names_sends_its_last_tensors():
    engine = Engine()
    engine.join_group("v", style="vllm", packed=True, bucket_bytes=4096)
    assert engine.state().weight_groups == ["v"]
    engine.call("pause", PauseArgs("abort"))
    for args in (UpdateWeightsArgs(group="v", **NORM), UpdateWeightsArgs(group="v", packed=False, bucket_bytes=8)):
        engine.call("update_weights", args)
        begin = engine.workers.submitted[-1]
        engine.reply()
        engine.reply()
        assert isinstance(begin, BeginWeights) and [s.name for s in begin.tensors] == NORM["names"]
        assert (begin.packed, begin.bucket_bytes) == ((True, 4096) if args.names else (False, 8))
    engine.call("destroy_weight_group", GroupNameArgs("v"))
    engine.reply()
    assert engine.state().weight_groups == []


def test_next_version_counts_up_the_trailing_number():
    assert [next_version(v) for v in ["0", "9", "step-9", "v09", "main"]] == ["1", "10", "step-10", "v10", "main-1"]
