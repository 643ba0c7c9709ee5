"""Weights in flight on a tiny Llama behind two frontends: updates from a path, from client tensors
and from a trainer's group give transformers' greedy tokens of the new model; KV after an update
(keep, recompute); the prefix cache keyed by weights; failures that change nothing; versions;
sleep. Every call goes through the frontend other than the one that generates."""

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frontend.client import UtilityError
from frontend.weight_sync import sync_weights
from launch.local import free_port_range
from tests.e2e.engine import start_engine
from tests.e2e.streams import Stream
from tests.e2e.weights_util import NUM_TOKENS, PROMPTS, Models, greedy_outputs, two_clients, until, weight_group
from tests.reference import assert_matches_greedy

pytestmark = pytest.mark.timeout(300)

TRAINER = Path(__file__).with_name("trainer_child.py")
LONG = 300  # a stream this long is still running when a pause lands, however fast the machine


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models) -> Models:
    return Models(tmp_path_factory.mktemp("weights"), tiny_models["llama"])


@pytest.fixture(scope="module")
def engine(models):
    engine = start_engine(models.folders["a"], "--max-num-seqs", "8", frontends=2)
    yield engine
    engine.stop()


def test_updates_from_a_path_tensors_and_a_group_serve_the_new_weights(engine, models):
    async def run():
        async with two_clients(engine) as (generating, control):
            found = {}
            await control.pause("abort")
            found["path"] = await control.update_weights(path=str(models.folders["b"]))
            await control.resume()
            found["b"] = await greedy_outputs(generating)
            found["tensors"] = await control.update_weights(tensors=models.state_dict("c"), atomic=True, version="c-1")
            found["c"] = await greedy_outputs(generating)
            async with weight_group(control, "tiny") as group:
                await control.pause("keep")
                await sync_weights(control, group, models.state_dict("b"))
                await control.resume()
                found["group"] = await greedy_outputs(generating)
                found["packed"] = await sync_weights(control, group, models.state_dict("c"), packed=True,
                                                     bucket_bytes=10_000, atomic=True)  # fmt: skip
                found["group packed"] = await greedy_outputs(generating)
            await control.pause("abort")
            await control.update_weights(path=str(models.folders["b"] / "model.safetensors"), version="b-file")
            await control.resume()
            found["file"] = await greedy_outputs(generating)
            return found

    found = asyncio.run(run())
    for name, model in [("b", "b"), ("c", "c"), ("group", "b"), ("group packed", "c"), ("file", "b")]:
        models.assert_serves(model, [o.token_ids for o in found[name]])
    assert found["tensors"].weight_version == "c-1" and found["packed"].weight_version == "c-3"
    assert [o.weight_version for o in found["c"]] == ["c-1"] * len(PROMPTS)
    assert found["group"][0].weight_versions[0].version == "c-2"
    assert [(s.version, s.start, s.end) for s in found["file"][0].weight_versions] == [("b-file", 0, NUM_TOKENS)]


def test_resume_recompute_continues_each_frozen_request_with_the_new_weights(engine, models):
    prompt = PROMPTS[1]

    async def frozen_update(kv: str):
        async with two_clients(engine) as (generating, control):
            await control.pause("abort")
            await control.update_weights(path=str(models.folders["b"]), version=f"before-{kv}")
            await control.resume()
            stream = Stream(generating, token_ids=prompt, max_tokens=LONG, temperature=0.0, ignore_eos=True,
                            request_id=f"frozen-{kv}")  # fmt: skip
            await until(lambda: len(stream.tokens) >= 10)
            frozen = await control.pause("keep")
            await control.update_weights(tensors=models.state_dict("c"), version=f"after-{kv}")
            await control.resume(kv=kv)
            await asyncio.wait_for(stream.task, 60)
            return frozen, stream

    frozen, stream = asyncio.run(frozen_update("recompute"))
    assert frozen.num_frozen == 1
    tokens, final = stream.tokens, stream.final
    spans = [(s.version, s.start, s.end) for s in final.weight_versions]
    split = spans[0][2]
    assert spans == [("before-recompute", 0, split), ("after-recompute", split, LONG)] and 10 <= split < LONG
    assert final.finish_reason == "length" and len(tokens) == LONG and final.num_output_tokens == LONG
    assert_matches_greedy(models.reference("b"), prompt, tokens[:split], models.greedy("b", prompt, split))
    context = prompt + tokens[:split]
    assert_matches_greedy(models.reference("c"), context, tokens[split:], models.greedy("c", context, LONG - split))

    _, kept = asyncio.run(frozen_update("keep"))
    spans = [(s.version, s.start, s.end) for s in kept.final.weight_versions]
    assert [s[0] for s in spans] == ["before-keep", "after-keep"] and spans[0][2] == spans[1][1] and spans[1][2] == LONG
    assert kept.final.finish_reason == "length" and len(kept.tokens) == LONG
    split = spans[0][2]
    assert_matches_greedy(models.reference("b"), prompt, kept.tokens[:split], models.greedy("b", prompt, split))


def test_a_prompt_cached_before_an_update_is_computed_again_after_it(engine, models):
    prompt = list(range(1000, 1040))  # two full blocks of 16 get cached

    async def run():
        async with two_clients(engine) as (generating, control):
            await control.pause("abort")
            await control.update_weights(path=str(models.folders["b"]))
            await control.resume()
            first = await greedy_outputs(generating, [prompt])
            second = await greedy_outputs(generating, [prompt])
            await control.pause("keep")
            await control.update_weights(path=str(models.folders["c"]))
            await control.resume()
            after = await greedy_outputs(generating, [prompt])
            again = await greedy_outputs(generating, [prompt])
            stream = Stream(generating, token_ids=prompt, max_tokens=LONG, temperature=0.0, ignore_eos=True)
            await until(lambda: len(stream.tokens) >= 3)
            frozen = await control.pause("keep")
            dropped = await control.reset_prefix_cache()
            await control.resume()
            await asyncio.wait_for(stream.task, 60)
            return first[0], second[0], after[0], again[0], frozen, dropped, stream

    first, second, after, again, frozen, dropped, stream = asyncio.run(run())
    assert second.cached_tokens == 32 and second.token_ids == first.token_ids
    assert after.cached_tokens == 0 and again.cached_tokens == 32
    assert_matches_greedy(models.reference("c"), prompt, after.token_ids, models.greedy("c", prompt))
    assert frozen.num_frozen == 1 and dropped >= 2  # at least the blocks the old weights computed
    assert stream.final.finish_reason == "length" and len(stream.tokens) == LONG


def _truncated_copy(folder: Path, target: Path) -> Path:
    data = (folder / "model.safetensors").read_bytes()
    target.write_bytes(data[: len(data) - 1000])
    return target


def test_bad_updates_fail_clearly_and_change_nothing(engine, models, tmp_path):
    norm = "model.norm.weight"
    bad_updates = [
        (dict(tensors={"model.nope.weight": torch.zeros(4)}), "'model.nope.weight' is not a parameter"),
        (dict(tensors={norm: torch.zeros(7)}), f"tensor '{norm}' has shape \\[7\\], the model's is \\[64\\]"),
        (dict(tensors={norm: torch.zeros(64, dtype=torch.int64)}), "dtype 'int64' is not accepted"),
        (dict(path=str(tmp_path / "missing")), "no such file or folder"),
        (dict(path=str(_truncated_copy(models.folders["c"], tmp_path / "cut.safetensors"))), "cannot read .*cut"),
        (dict(group="nobody", names=[norm], dtypes=["float32"], shapes=[[64]]), "no weight group 'nobody'"),
    ]

    async def run():
        async with two_clients(engine) as (generating, control):
            await control.pause("abort")
            await control.update_weights(path=str(models.folders["b"]), version="good")
            await control.resume()
            with pytest.raises(UtilityError, match="needs a paused engine: pause\\(mode=...\\) first, or atomic=True"):
                await control.update_weights(path=str(models.folders["c"]))
            before = await greedy_outputs(generating)
            errors = []
            for update, _ in bad_updates:
                await control.pause("abort")
                with pytest.raises(UtilityError) as caught:
                    await control.update_weights(**update)
                errors.append(str(caught.value))
                state = await control.resume()
                assert state.weights_error is None and state.weight_version == "good"
            after = await greedy_outputs(generating)
            return before, errors, after

    before, errors, after = asyncio.run(run())
    for (_, pattern), error in zip(bad_updates, errors):
        assert re.search(pattern, error), error
    # Refused before any rank saw them: the dtype and the group; the others were rolled back.
    assert all("unchanged" in e or "not accepted" in e or "no weight group" in e for e in errors)
    assert [o.token_ids for o in after] == [o.token_ids for o in before]
    models.assert_serves("b", [o.token_ids for o in before])


def test_a_trainer_killed_mid_broadcast_leaves_the_old_weights(engine, models):
    state_dict = models.state_dict("c")
    names = list(state_dict)

    async def run():
        async with two_clients(engine) as (generating, control):
            await control.pause("abort")
            await control.update_weights(path=str(models.folders["b"]), version="kept")
            await control.resume()
            before = await greedy_outputs(generating)
            port = free_port_range(1)
            checkpoint = str(models.folders["c"] / "model.safetensors")
            command = [sys.executable, str(TRAINER), str(port), "2", "dying", checkpoint, "--die-after", "5"]
            trainer = subprocess.Popen(command)
            try:
                await control.init_weight_group("127.0.0.1", port, 1, 2, "dying", timeout_s=30)
                with pytest.raises(UtilityError) as caught:
                    await control.update_weights(
                        group="dying", names=names, dtypes=["float32"] * len(names),
                        shapes=[list(state_dict[n].shape) for n in names], atomic=True,
                    )  # fmt: skip
                assert trainer.wait(timeout=30) == 3
            finally:
                trainer.kill()
                trainer.wait()
            await control.destroy_weight_group("dying")
            state = await control.get_state()
            after = await greedy_outputs(generating)
            return before, str(caught.value), state, after

    before, error, state, after = asyncio.run(run())
    assert "the weights are unchanged" in error
    assert state.state == "running" and state.weights_error is None and state.weight_version == "kept"
    assert [o.token_ids for o in after] == [o.token_ids for o in before]


def test_set_weight_version_relabels_frozen_requests_without_aborting_them(engine, models):
    async def run():
        async with two_clients(engine) as (generating, control):
            stream = Stream(generating, token_ids=PROMPTS[0], max_tokens=LONG, temperature=0.0, ignore_eos=True)
            await until(lambda: len(stream.tokens) >= 5)
            await control.pause("keep")
            old = await control.get_weight_version()
            assert await control.set_weight_version("relabelled") == "relabelled"
            state = await control.get_state()
            await control.resume()
            await asyncio.wait_for(stream.task, 30)
            return old, state, stream

    old, state, stream = asyncio.run(run())
    assert state.num_frozen == 1 and state.weight_version == "relabelled"
    assert stream.final.finish_reason == "length" and len(stream.tokens) == LONG
    assert [s.version for s in stream.final.weight_versions] == [old, "relabelled"]


def test_updates_and_a_resume_from_two_frontends_are_serialised(engine, models):
    """A group update waits for its trainer; meanwhile another frontend's update and resume queue
    behind it, and the resume answers last, onto the last update's weights."""
    state_dict = models.state_dict("b")

    async def run():
        async with two_clients(engine) as (one, other):
            async with weight_group(one, "slow") as group:
                await one.pause("abort")
                finished = []

                async def record(name, call):
                    result = await call
                    finished.append(name)
                    return result

                names, shapes = list(state_dict), [list(t.shape) for t in state_dict.values()]
                first = asyncio.ensure_future(record("b", one.update_weights(
                    group="slow", names=names, dtypes=["float32"] * len(names), shapes=shapes, version="s-1")))
                while not (await other.get_state()).updating_weights:  # the update waits for the broadcast
                    await asyncio.sleep(0.01)
                queued = [asyncio.ensure_future(record("c", other.update_weights(path=str(models.folders["c"])))),
                          asyncio.ensure_future(record("resume", other.resume()))]  # fmt: skip
                await asyncio.sleep(0.3)
                state_meanwhile = await other.get_state()
                await asyncio.to_thread(group.send, state_dict)
                results = await asyncio.gather(first, *queued)
            outputs = await greedy_outputs(one)
            return finished, state_meanwhile, results, outputs

    finished, meanwhile, (b, c, resumed), outputs = asyncio.run(run())
    assert meanwhile.state == "paused" and meanwhile.updating_weights
    assert finished == ["b", "c", "resume"]
    assert resumed.state == "running" and not resumed.updating_weights
    assert (b.weight_version, c.weight_version, resumed.weight_version) == ("s-1", "s-2", "s-2")
    models.assert_serves("c", [o.token_ids for o in outputs])


def test_sleep_frees_the_kv_cache_and_holds_requests_until_wake(engine, models):
    prompt = PROMPTS[1]

    async def run():
        async with two_clients(engine) as (generating, control):
            await control.pause("abort")
            await control.update_weights(path=str(models.folders["b"]))
            await control.resume()
            frozen = Stream(generating, token_ids=prompt, max_tokens=LONG, temperature=0.0, ignore_eos=True)
            await until(lambda: len(frozen.tokens) >= 5)
            await control.pause("keep")
            asleep = await control.sleep(level=1)
            held = Stream(generating, token_ids=PROMPTS[0], max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
            with pytest.raises(UtilityError, match="asleep"):
                await control.resume()
            await asyncio.sleep(0.3)
            held_state, outputs_while_asleep = await control.get_state(), len(held.outputs)
            sleeping = await control.is_sleeping()
            await control.wake_up()
            await control.resume()
            await asyncio.wait_for(asyncio.gather(frozen.task, held.task), 60)
            return asleep, held_state, outputs_while_asleep, sleeping, frozen, held

    asleep, held_state, outputs_while_asleep, sleeping, frozen, held = asyncio.run(run())
    assert asleep.sleeping == ["kv_cache"] and asleep.num_frozen == 0 and sleeping
    assert held_state.num_held == 2 and outputs_while_asleep == 0  # the frozen one is queued again
    assert_matches_greedy(models.reference("b"), prompt, frozen.tokens, models.greedy("b", prompt, LONG))
    assert_matches_greedy(models.reference("b"), PROMPTS[0], held.tokens, models.greedy("b", PROMPTS[0]))


def test_sleep_level_2_on_cpu_drops_the_weights_until_an_update_writes_them(engine, models):
    async def run():
        async with two_clients(engine) as (generating, control):
            await control.pause("abort")
            state = await control.sleep(level=2)
            with pytest.raises(UtilityError, match="dropped the weights on CPU: update_weights must write every"):
                await control.wake_up()
            partial = {"model.norm.weight": models.state_dict("c")["model.norm.weight"]}
            await control.update_weights(tensors=partial)
            with pytest.raises(UtilityError, match="not written yet"):
                await control.wake_up()
            await control.update_weights(path=str(models.folders["c"]))
            awake = await control.wake_up()
            await control.resume()
            return state, awake, await greedy_outputs(generating)

    state, awake, outputs = asyncio.run(run())
    assert state.sleeping == ["kv_cache", "weights"] and awake.sleeping == []
    models.assert_serves("c", [o.token_ids for o in outputs])
