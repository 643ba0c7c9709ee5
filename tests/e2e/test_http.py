"""The HTTP API servers on a tiny Llama behind two frontends sharing one port: the openai client
gets what the ZMQ client gets; errors, the API key and the body limit; vLLM's control routes and
their state transitions; metrics the same from either server; a client that leaves aborts."""

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch
import transformers

from frontend.client import AsyncClient, Client
from tests.e2e.engine import start_engine

pytestmark = pytest.mark.timeout(300)

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["Once upon a time", "The capital of France is"]


@pytest.fixture(scope="module")
def engine(tiny_models):
    engine = start_engine(tiny_models["llama"], "--max-num-seqs", "8", "--api-key", API_KEY,
                          "--served-model-name", "tiny", frontends=2, http=True)  # fmt: skip
    yield engine
    engine.stop()


def zmq_greedy(engine, max_tokens: int = 12, **request) -> tuple[str, list[int]]:
    with Client(engine.addresses[0]) as client:
        outputs = list(client.generate(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **request))
    return "".join(o.text for o in outputs), [t for o in outputs for t in o.token_ids]


def test_openai_completions_and_chat_give_the_zmq_clients_greedy_tokens(engine):
    api = openai.OpenAI(base_url=f"{engine.http_url}/v1", api_key=API_KEY)
    greedy = dict(temperature=0.0, max_tokens=12, extra_body={"ignore_eos": True, "return_token_ids": True})
    for prompt in PROMPTS:
        text, ids = zmq_greedy(engine, prompt=prompt)
        done = api.completions.create(model="tiny", prompt=prompt, logprobs=2, **greedy)
        choice = done.choices[0]
        assert (choice.text, choice.token_ids) == (text, ids)
        assert len(choice.logprobs.token_logprobs) == 12 and all(len(t) == 2 for t in choice.logprobs.top_logprobs)
        assert done.usage.completion_tokens == 12 and choice.finish_reason == "length"
        streamed = api.completions.create(model="tiny", prompt=prompt, stream=True,
                                          stream_options={"include_usage": True}, **greedy)  # fmt: skip
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert chunks[-1].usage.completion_tokens == 12
        echoed = api.completions.create(model="tiny", prompt=prompt, echo=True, **greedy)
        assert echoed.choices[0].text == prompt + text
    messages = [{"role": "user", "content": "Tell me a story"}]
    text, ids = zmq_greedy(engine, messages=messages)
    chat = api.chat.completions.create(model="tiny", messages=messages, n=2, logprobs=True, top_logprobs=1, **greedy)
    assert [c.message.content for c in chat.choices] == [text, text] and chat.choices[0].token_ids == ids
    assert len(chat.choices[1].logprobs.content) == 12
    streamed = api.chat.completions.create(model="tiny", messages=messages, stream=True, **greedy)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    assert chat.choices[0].model_extra["weight_version"] == "0"


def test_prompt_logprobs_in_every_dialect_equal_transformers(engine, tiny_models):
    """lm-eval's log-likelihood request (echo, logprobs=1, max_tokens=1), SGLang's
    logprob_start_len and vLLM's prompt_logprobs, twice (the second time from a warm prefix cache)."""
    prompt_ids = [17, 4000, 220, 9, 31, 77, 1200, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 300]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0].log_softmax(-1)
    expected = logits[:-1].gather(-1, torch.tensor(prompt_ids[1:])[:, None])[:, 0].tolist()
    api = openai.OpenAI(base_url=f"{engine.http_url}/v1", api_key=API_KEY)
    for _ in range(2):
        done = api.completions.create(model="tiny", prompt=prompt_ids, echo=True, logprobs=1, max_tokens=1,
                                      temperature=0.0)  # fmt: skip
        logprobs = done.choices[0].logprobs
        assert len(logprobs.tokens) == len(prompt_ids) + 1 and logprobs.token_logprobs[0] is None
        assert logprobs.token_logprobs[1 : len(prompt_ids)] == pytest.approx(expected, abs=1e-4)
        assert logprobs.top_logprobs[0] is None and all(len(t) == 1 for t in logprobs.top_logprobs[1:])
        assert logprobs.text_offset[0] == 0 and done.choices[0].text.startswith(logprobs.tokens[0])
        chunks = [c for c in api.completions.create(model="tiny", prompt=prompt_ids, echo=True, logprobs=1,
                                                    max_tokens=3, temperature=0.0, stream=True) if c.choices]
        streamed = [lp for c in chunks for lp in c.choices[0].logprobs.token_logprobs]
        assert streamed[0] is None and streamed[1 : len(prompt_ids)] == pytest.approx(expected, abs=1e-4)
        assert len(streamed) == len(prompt_ids) + 3
    with httpx.Client(base_url=engine.http_url, headers=AUTH, timeout=60) as http:
        sglang = http.post("/generate", json={"input_ids": prompt_ids, "return_logprob": True, "logprob_start_len": 3,
                                              "sampling_params": {"max_new_tokens": 1}}).json()  # fmt: skip
        vllm = http.post("/inference/v1/generate", json={"token_ids": prompt_ids, "sampling_params": {
            "max_tokens": 1, "prompt_logprobs": 2}}).json()  # fmt: skip
    inputs = sglang["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == prompt_ids[3:]
    assert [lp for lp, _, _ in inputs] == pytest.approx(expected[2:], abs=1e-4)
    prompt_logprobs = vllm["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(prompt_ids)
    own = [entry[str(t)]["logprob"] for entry, t in zip(prompt_logprobs[1:], prompt_ids[1:])]
    assert own == pytest.approx(expected, abs=1e-4)
    assert all(2 <= len(entry) <= 3 for entry in prompt_logprobs[1:])


def test_bad_requests_get_openai_errors_naming_the_field(engine):
    url = engine.http_url
    json_body = {**AUTH, "Content-Type": "application/json"}

    def post(path: str, headers: dict = AUTH, **kw) -> httpx.Response:
        return httpx.post(url + path, headers=headers, timeout=30, **kw)

    unknown = post("/v1/completions", json={"prompt": "x", "max_tokenz": 3})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "max_tokenz"
    wrong = post("/v1/completions", json={"prompt": "x", "temperature": "hot"})
    assert wrong.status_code == 400 and "temperature" in wrong.json()["error"]["message"]
    malformed = post("/v1/completions", content=b"{not json", headers=json_body)
    assert malformed.status_code == 400
    assert post("/v1/completions", json={"prompt": "x", "model": "other"}).status_code == 404
    assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
    too_big = post("/v1/completions", content=b"x" * (65 * 2**20), headers=json_body)
    assert too_big.status_code == 413
    too_long = post("/v1/completions", json={"prompt": [5] * 3000, "max_tokens": 4})
    assert too_long.status_code == 400 and "max_model_len" in too_long.json()["error"]["message"]


async def _stream_chunks(http: httpx.AsyncClient, arrivals: list[float], **body) -> dict:
    """Stream a completion; record when each chunk came; the final chunk's choice."""
    last = None
    async with http.stream("POST", "/v1/completions", json={"stream": True, **body}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if event["choices"]:
                    arrivals.append(time.monotonic())
                    last = event["choices"][0]
    return last


def test_vllm_pause_and_resume_in_every_mode(engine):
    long = dict(prompt="Story:", max_tokens=300, temperature=0.0, ignore_eos=True)

    async def run():
        async with httpx.AsyncClient(base_url=engine.http_url, headers=AUTH, timeout=60) as http:
            found = {}
            for mode in ("abort", "wait", "keep"):
                arrivals: list[float] = []
                stream = asyncio.ensure_future(_stream_chunks(http, arrivals, **long))
                while len(arrivals) < 3:
                    await asyncio.sleep(0.01)
                paused = (await http.post(f"/pause?mode={mode}")).json()
                again = (await http.post(f"/pause?mode={mode}")).json()  # idempotent
                if mode == "keep":
                    await asyncio.sleep(0.2)  # chunks sent before the pause may still be on their way
                    count = len(arrivals)
                    await asyncio.sleep(5)
                    found["keep gap"] = len(arrivals) - count
                else:
                    # Ended before /pause answered: its last chunk (on another connection, maybe
                    # another server) comes without any resume.
                    found[f"{mode} ends paused"] = (await asyncio.wait_for(asyncio.shield(stream), 10))["finish_reason"]
                await http.post("/resume")
                resumed = (await http.post("/resume")).json()  # idempotent
                found[mode] = (paused["state"], again["state"], resumed["state"], (await stream)["finish_reason"])
            bad = await http.post("/pause?mode=sideways")
            found["bad"] = (bad.status_code, (await http.get("/is_paused")).json())
            return found

    found = asyncio.run(run())
    assert found["abort"] == ("paused", "paused", "running", "abort") and found["abort ends paused"] == "abort"
    assert found["wait"] == ("paused", "paused", "running", "length") and found["wait ends paused"] == "length"
    assert found["keep"] == ("paused", "paused", "running", "length") and found["keep gap"] == 0
    assert found["bad"] == (400, {"is_paused": False})


def test_an_abort_by_request_id_works_through_either_server_and_a_client_that_leaves_aborts(engine):
    async def run():
        async with httpx.AsyncClient(base_url=engine.http_url, headers=AUTH, timeout=60) as http, \
                AsyncClient(engine.addresses[1]) as control:  # fmt: skip
            arrivals: list[float] = []
            body = dict(prompt="Story:", max_tokens=300, temperature=0.0, ignore_eos=True, request_id="mine")
            stream = asyncio.ensure_future(_stream_chunks(http, arrivals, **body))
            while len(arrivals) < 3:
                await asyncio.sleep(0.01)
            aborted = (await http.post("/abort_requests", json={"request_ids": ["mine"]})).json()
            final = await stream
            leaving = asyncio.ensure_future(_stream_chunks(http, [], **{**body, "request_id": "leaver"}))
            while (await control.get_state()).num_running == 0:
                await asyncio.sleep(0.01)
            leaving.cancel()
            deadline = time.monotonic() + 10
            while (await control.get_state()).num_running and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return aborted, final, await control.get_state()

    aborted, final, state = asyncio.run(run())
    assert aborted["aborted"] == ["mine"] and final["finish_reason"] == "abort"
    assert state.num_running == 0


def test_metrics_are_the_engines_from_either_server(engine):
    texts = []
    for _ in range(6):  # several connections: they land on both servers
        with httpx.Client(base_url=engine.http_url, headers=AUTH) as http:
            http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
            texts.append(http.get("/metrics").text)
    def value(text: str, name: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))
    generated = [value(t, "zeroserve_generation_tokens_total") for t in texts]
    assert generated == sorted(generated) and generated[-1] >= 18
    assert value(texts[-1], "zeroserve_time_to_first_token_seconds_count") >= 6
    assert 'zeroserve_weight_version{version="0"} 1.0' in texts[-1]


def test_the_python_client_connects_on_first_use(engine):
    client = Client(engine.addresses[0])
    try:
        assert client.ping() == "pong"
        assert len([t for o in client.generate(prompt="hi", max_tokens=3) for t in o.token_ids]) == 3
    finally:
        client.close()


def test_profile_routes_answer_the_step_profile(engine):
    with httpx.Client(base_url=engine.http_url, headers=AUTH, timeout=60) as http:
        assert http.post("/start_profile", json={"activities": ["CPU"]}).json() == {}
        zmq_greedy(engine, token_ids=list(range(50, 70)), max_tokens=3)  # a prompt no other test sends
        profile = http.post("/stop_profile").json()
        assert profile["steps"]["decode"]["num_steps"] == 2 and profile["steps"]["prefill"]["num_steps"] == 1
        assert profile["steps"]["decode"]["seconds"]["forward.attention"] > 0
        again = http.post("/stop_profile")
    assert again.status_code == 400 and "start_profile first" in again.text
