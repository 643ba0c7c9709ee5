"""The HTTP servers as RL frameworks drive them: slime's SGLang weight sync and vLLM's weight
transfer with a trainer in this process, the reject policy with several API servers (and SGLang's
requests held regardless), and a bounded load of streams through four API servers across
repeated pause(keep) / resume."""

import asyncio
import json
import threading

from datetime import timedelta

import httpx
import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore, ProcessGroupGloo, rendezvous

from frontend.client import AsyncClient
from frontend.weight_sync import TrainerWeightGroup, distinct_tensors
from launch.local import free_port_range
from tests.e2e.engine import start_engine
from tests.e2e.weights_util import PROMPTS, Models

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models) -> Models:
    return Models(tmp_path_factory.mktemp("http-weights"), tiny_models["llama"])


def sglang_greedy(http: httpx.Client, prompts=PROMPTS, num_tokens: int = 8) -> list[dict]:
    body = {"input_ids": prompts, "sampling_params": {"max_new_tokens": num_tokens, "temperature": 0.0,
                                                      "ignore_eos": True}}  # fmt: skip
    response = http.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_slime_style_weight_sync_over_sglang_routes(models):
    engine = start_engine(models.folders["a"], "--max-num-seqs", "8", http=True)
    try:
        with httpx.Client(base_url=engine.http_url, timeout=120) as http:
            port = free_port_range(1)
            group: dict = {}
            trainer = threading.Thread(target=lambda: group.update(g=TrainerWeightGroup.create(
                "127.0.0.1", port, 2, "slime-pp_0", "gloo", 60)))  # fmt: skip
            trainer.start()
            joined = http.post("/init_weights_update_group", json={
                "master_address": "127.0.0.1", "master_port": str(port), "rank_offset": 1, "world_size": 2,
                "group_name": "slime-pp_0", "backend": "gloo"})  # fmt: skip
            trainer.join()
            assert joined.json()["success"], joined.text
            found = {}
            for name, load_format in (("b", None), ("c", "flattened_bucket")):
                state_dict = distinct_tensors(models.state_dict(name))
                assert http.post("/pause_generation", json={"mode": "abort"}).status_code == 200
                assert http.get("/flush_cache").status_code == 200
                sending = threading.Thread(target=group["g"].send, args=(state_dict, load_format is not None,
                                                                        sum(t.nbytes for t in state_dict.values())))
                sending.start()
                updated = http.post("/update_weights_from_distributed", json={
                    "names": list(state_dict), "dtypes": ["float32"] * len(state_dict),
                    "shapes": [list(t.shape) for t in state_dict.values()], "group_name": "slime-pp_0",
                    "flush_cache": False, "weight_version": f"v-{name}", "load_format": load_format})  # fmt: skip
                sending.join()
                assert updated.json()["success"], updated.text
                assert http.post("/continue_generation", json={}).status_code == 200
                found[name] = sglang_greedy(http)
            assert http.post("/destroy_weights_update_group", json={"group_name": "slime-pp_0"}).json()["success"]
            group["g"].destroy()
    finally:
        engine.stop()
    for name in ("b", "c"):
        models.assert_serves(name, [r["output_ids"] for r in found[name]])
        assert {r["meta_info"]["weight_version"] for r in found[name]} == {f"v-{name}"}


class VllmTrainer:
    """Rank 0 of a weight transfer the way vLLM's trainer side makes and feeds it on CPU
    (`TorchDistTransport` over `stateless_init_torch_distributed_process_group`, and
    `packed_nccl_broadcast_producer`'s packing), written from vLLM's code, not from ours."""

    def __init__(self, port: int, world_size: int) -> None:
        address = f"tcp://127.0.0.1:{port}"
        timeout = timedelta(seconds=60)
        store, _, _ = next(rendezvous(address, 0, world_size, timeout=timeout))
        prefixed = PrefixStore(address, store)
        self.group = dist.ProcessGroup(prefixed, 0, world_size)
        backend = ProcessGroupGloo(prefixed, 0, world_size, timeout=timeout)
        self.group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        backend._set_sequence_number_for_group()
        self.group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)

    def broadcast(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, group_src=0, group=self.group)
        dist.barrier(group=self.group)

    def send(self, state_dict: dict, packed: bool, buffer_bytes: int) -> int:
        """Returns the number of broadcasts."""
        if not packed:
            for tensor in state_dict.values():
                self.broadcast(tensor.contiguous())
            return len(state_dict)
        chunk, size, count = [], 0, 0
        for tensor in state_dict.values():
            chunk.append(tensor.contiguous().view(torch.uint8).view(-1))
            size += chunk[-1].numel()
            if size > buffer_bytes:
                self.broadcast(torch.cat(chunk))
                chunk, size, count = [], 0, count + 1
        if chunk:
            self.broadcast(torch.cat(chunk))
            count += 1
        return count


def init_vllm_transfer(http: httpx.Client, **init: object) -> VllmTrainer:
    """`/init_weight_transfer_engine` and the trainer's side together, as rlhf_http_nccl.py does."""
    world_size = http.get("/get_world_size").json()["world_size"] + 1
    port = free_port_range(1)
    answer: dict = {}
    info = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": world_size, **init}
    engine_side = threading.Thread(target=lambda: answer.update(r=http.post(
        "/init_weight_transfer_engine", json={"init_info": info})))  # fmt: skip
    engine_side.start()
    trainer = VllmTrainer(port, world_size)
    engine_side.join()
    assert answer["r"].status_code == 200, answer["r"].text
    return trainer


def vllm_greedy(http: httpx.Client, num_tokens: int = 8) -> list[list[int]]:
    outputs = []
    for prompt in PROMPTS:
        body = {"token_ids": prompt, "sampling_params": {"max_tokens": num_tokens, "temperature": 0.0,
                                                         "ignore_eos": True}}  # fmt: skip
        response = http.post("/inference/v1/generate", json=body)
        assert response.status_code == 200, response.text
        outputs.append(response.json()["choices"][0]["token_ids"])
    return outputs


def test_vllm_weight_transfer_routes_with_a_vllm_style_trainer(models):
    engine = start_engine(models.folders["a"], "--max-num-seqs", "8", http=True)
    small_buckets = 3000  # several buckets of whole tensors
    try:
        with httpx.Client(base_url=engine.http_url, timeout=120) as http:
            assert http.post("/start_weight_update").status_code == 400  # no transfer engine yet
            trainer = init_vllm_transfer(http, packed=True, packed_buffer_size_bytes=small_buckets)
            found, broadcasts = {}, {}
            # b one broadcast per tensor (update_info says so); c packed as init_info says; then a,
            # its update_info naming no tensors: the last update's again.
            for name, packed in (("b", False), ("c", None), ("a", None)):
                state_dict = distinct_tensors(models.state_dict(name))
                update_info: dict = {"names": [], "dtype_names": [], "shapes": []}
                if name != "a":
                    update_info = {"names": list(state_dict), "dtype_names": ["float32"] * len(state_dict),
                                   "shapes": [list(t.shape) for t in state_dict.values()]}  # fmt: skip
                if packed is not None:
                    update_info["packed"] = packed
                assert http.post("/pause?mode=keep&clear_cache=false").status_code == 200
                assert http.post("/start_weight_update", json={"is_checkpoint_format": True}).status_code == 200
                answer: dict = {}
                engine_side = threading.Thread(target=lambda: answer.update(r=http.post(
                    "/update_weights", json={"update_info": update_info})))  # fmt: skip
                engine_side.start()
                broadcasts[name] = trainer.send(state_dict, packed is None, small_buckets)
                engine_side.join()
                assert answer["r"].status_code == 200, answer["r"].text
                finished = http.post("/finish_weight_update", json={"weight_version": f"v-{name}"})
                assert finished.json()["weight_version"] == f"v-{name}"
                assert http.post("/resume").status_code == 200
                found[name] = vllm_greedy(http)
                assert http.get("/weight_info").json() == {"weight_version": f"v-{name}"}
            init_vllm_transfer(http)  # a second init replaces the group
            bad = http.post("/update_weights", json={"update_info": {"names": ["x"], "dtype_names": ["int8"],
                                                                     "shapes": [[1]]}})  # fmt: skip
            unknown = http.post("/init_weight_transfer_engine", json={"init_info": {"nccl_unique_id_b64": "x"}})
    finally:
        engine.stop()
    for name in ("b", "c", "a"):
        models.assert_serves(name, found[name])
    assert 1 < broadcasts["c"] < len(distinct_tensors(models.state_dict("c")))
    assert bad.status_code == 400 and "int8" in bad.text
    assert unknown.status_code == 400


def test_reject_policy_refuses_openai_requests_while_paused_but_holds_sglangs(models):
    engine = start_engine(models.folders["a"], "--paused-requests", "reject", frontends=2, http=True)
    try:
        async def run():
            async with httpx.AsyncClient(base_url=engine.http_url, timeout=60) as http:
                assert (await http.post("/pause?mode=abort")).status_code == 200
                refused = []
                for _ in range(32):  # fresh connections: both servers answer some
                    async with httpx.AsyncClient(base_url=engine.http_url, timeout=60) as fresh:
                        refused.append(await fresh.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}))
                held = asyncio.ensure_future(http.post("/generate", json={
                    "text": "hi", "sampling_params": {"max_new_tokens": 2}}))  # fmt: skip
                await asyncio.sleep(0.5)
                was_held = not held.done()
                assert (await http.post("/resume")).status_code == 200
                after = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                return refused, was_held, (await held), after

        refused, was_held, held, after = asyncio.run(run())
    finally:
        engine.stop()
    assert {r.status_code for r in refused} == {503} and all(r.headers.get("retry-after") for r in refused)
    assert was_held and held.status_code == 200 and held.json()["meta_info"]["completion_tokens"] == 2
    assert after.status_code == 200


def test_256_streams_through_four_api_servers_across_repeated_pauses(models):
    engine = start_engine(models.folders["b"], "--max-num-seqs", "64", frontends=4, http=True)
    num_tokens = 24
    try:
        async def reference(prompt: list[int]) -> list[int]:
            async with AsyncClient(engine.addresses[0]) as client:
                return [t async for o in client.generate(token_ids=prompt, max_tokens=num_tokens, temperature=0.0,
                                                         ignore_eos=True) for t in o.token_ids]  # fmt: skip

        async def stream(index: int) -> tuple[int, list[int], str]:
            prompt = PROMPTS[index % len(PROMPTS)]
            body = {"prompt": prompt, "max_tokens": num_tokens, "temperature": 0.0, "ignore_eos": True,
                    "stream": True, "return_token_ids": True}  # fmt: skip
            tokens, reason = [], None
            async with httpx.AsyncClient(base_url=engine.http_url, timeout=120) as http:
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        return response.status_code, [], "http error"
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            choice = json.loads(line[6:])["choices"][0]
                            tokens += choice.get("token_ids") or []
                            reason = choice["finish_reason"] or reason
            return 200, tokens, reason

        async def pauses(stop: asyncio.Event) -> int:
            count = 0
            async with httpx.AsyncClient(base_url=engine.http_url, timeout=60) as http:
                while not stop.is_set():
                    await asyncio.sleep(2.0)
                    assert (await http.post("/pause?mode=keep")).status_code == 200
                    await asyncio.sleep(0.2)
                    assert (await http.post("/resume")).status_code == 200
                    count += 1
            return count

        async def run():
            want = [await reference(p) for p in PROMPTS]
            stop = asyncio.Event()
            pausing = asyncio.ensure_future(pauses(stop))
            results = await asyncio.gather(*(stream(i) for i in range(256)))
            stop.set()
            return want, results, await pausing

        want, results, num_pauses = asyncio.run(run())
    finally:
        engine.stop()
    assert {status for status, _, _ in results} == {200}
    for index, (_, tokens, reason) in enumerate(results):
        assert reason == "length" and tokens == want[index % len(PROMPTS)], index
    assert num_pauses >= 1
