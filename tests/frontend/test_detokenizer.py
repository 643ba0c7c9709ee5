"""Detokenizer, request state and tokenizer on SmolLM2's real tokenizer."""

import pytest

from protocol.messages import CoreOutput

from frontend.detokenizer import Detokenizer
from frontend.request_state import RequestState, StreamKey
from frontend.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    " leading spaces and  double spaces",
    "Emoji 😀🎉 and flags 🇫🇷 mixed in",
    "中文字符和日本語のテキスト",
    "Accents: café, naïve, Ångström, ñandú",
    "\n\ttabs and newlines\n",
]


def _deltas(tokenizer: Tokenizer, ids: list[int], chunk: int, stop: list[str]) -> tuple[list[str], bool]:
    detok = Detokenizer(tokenizer.backend, stop)
    deltas, stopped = [], False
    for start in range(0, len(ids), chunk):
        delta = detok.push(ids[start : start + chunk])
        deltas.append(delta.text)
        if delta.stopped:
            return deltas, True
    return deltas + [detok.flush()], stopped


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_add_up_to_decode(tokenizer: Tokenizer, text: str, chunk: int) -> None:
    ids = tokenizer.hf.encode(text, add_special_tokens=False)
    deltas, stopped = _deltas(tokenizer, ids, chunk, stop=[])
    assert not stopped
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_special_tokens_are_skipped(tokenizer: Tokenizer) -> None:
    ids = tokenizer.hf.encode("Hi there", add_special_tokens=False) + tokenizer.eos_token_ids[:1]
    assert "".join(_deltas(tokenizer, ids, 1, stop=[])[0]) == "Hi there"


def test_stop_string_spanning_tokens_is_never_shown(tokenizer: Tokenizer) -> None:
    text = "The answer is forty-two, said the computer."
    ids = tokenizer.hf.encode(text, add_special_tokens=False)
    stop = "forty-two"
    pieces = [tokenizer.decode([i]) for i in ids]
    assert stop not in pieces, "the stop string must span several tokens for this test"
    deltas, stopped = _deltas(tokenizer, ids, 1, stop=[stop, "never"])
    assert stopped
    assert "".join(deltas) == "The answer is "
    assert all("fort" not in d for d in deltas)


def test_near_miss_of_a_stop_string_is_flushed(tokenizer: Tokenizer) -> None:
    text = "count: forty-one, forty-three"
    ids = tokenizer.hf.encode(text, add_special_tokens=False)
    deltas, stopped = _deltas(tokenizer, ids, 1, stop=["forty-two"])
    assert not stopped
    assert "".join(deltas) == text


def test_earliest_stop_string_wins(tokenizer: Tokenizer) -> None:
    ids = tokenizer.hf.encode("alpha beta gamma", add_special_tokens=False)
    deltas, stopped = _deltas(tokenizer, ids, len(ids), stop=["gamma", "beta"])
    assert stopped and "".join(deltas) == "alpha "


def _state(tokenizer: Tokenizer, stop: list[str] = []) -> RequestState:
    return RequestState(
        request_id="0-0",
        user_request_id="user",
        stream=StreamKey(b"c", 1),
        detokenizer=Detokenizer(tokenizer.backend, stop),
        num_prompt_tokens=3,
        stop_token_ids=frozenset(tokenizer.eos_token_ids),
    )


def test_stop_at_eos_hides_its_text(tokenizer: Tokenizer) -> None:
    state = _state(tokenizer)
    ids = tokenizer.hf.encode("Done", add_special_tokens=False)
    first = state.update(CoreOutput("0-0", ids))
    last = state.update(CoreOutput("0-0", [tokenizer.eos_token_ids[0]], finish_reason="stop"))
    assert first.output.text + last.output.text == "Done"
    assert last.output.finish_reason == "stop" and last.output.token_ids == tokenizer.eos_token_ids[:1]
    assert last.output.num_output_tokens == len(ids) + 1
    assert state.finished and not last.stopped_by_string


def test_stop_string_finishes_the_request_and_asks_for_an_abort(tokenizer: Tokenizer) -> None:
    state = _state(tokenizer, stop=["STOP"])
    update = state.update(CoreOutput("0-0", tokenizer.hf.encode("go go STOP more", add_special_tokens=False)))
    assert update.output.text == "go go " and update.output.finish_reason == "stop"
    assert update.stopped_by_string and state.finished
    assert update.output.request_id == "user"


def test_length_finish_flushes_held_text(tokenizer: Tokenizer) -> None:
    state = _state(tokenizer, stop=["forty-two"])
    update = state.update(CoreOutput("0-0", tokenizer.hf.encode("up to forty", add_special_tokens=False), finish_reason="length"))
    assert update.output.text == "up to forty" and update.output.finish_reason == "length"


def test_chat_template_gives_plain_ids(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tokenizer.hf.decode(ids).endswith("<|im_start|>assistant\n")


def test_eos_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.eos_token_ids[0] == tokenizer.hf.eos_token_id


def test_special_tokens_show_when_asked_and_a_stop_string_can_stay_in_the_text(tokenizer: Tokenizer) -> None:
    ids = tokenizer.hf.encode("<|im_start|>Hi there. Bye", add_special_tokens=False)
    assert Detokenizer(tokenizer.backend, [], skip_special_tokens=False).push(ids).text.startswith("<|im_start|>")
    kept = Detokenizer(tokenizer.backend, [" there"], include_stop_str=True).push(ids)
    cut = Detokenizer(tokenizer.backend, [" there"]).push(ids)
    assert (kept.text, kept.stopped, cut.text, cut.stopped) == ("Hi there", True, "Hi", True)


def test_stop_strings_count_only_from_min_tokens_on(tokenizer: Tokenizer) -> None:
    first = tokenizer.hf.encode(" stop", add_special_tokens=False)
    second = tokenizer.hf.encode(" go stop", add_special_tokens=False)
    detok = Detokenizer(tokenizer.backend, [" stop"])
    early = detok.push(first, check_stops=False)
    late = detok.push(second)
    assert (early.text, early.stopped, late.text, late.stopped) == (" stop", False, " go", True)
