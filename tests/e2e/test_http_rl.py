"""The HTTP servers as RL frameworks drive them: slime's SGLang weight sync with a trainer in this
process, the reject policy with several API servers (and SGLang's requests held regardless), and
a bounded load of streams through four API servers across repeated pause(keep) / resume."""

import asyncio
import json
import threading

import httpx
import pytest

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
