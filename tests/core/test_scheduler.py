from core.block_pool import BlockPool
from core.request import Request, Status
from core.scheduler import Scheduler, SchedulerLimits
from protocol.messages import AddRequest, Logprobs, SamplingParams
from protocol.step import PromptLogprobs, StepResult


def make_scheduler(num_blocks=16, block_size=4, max_num_seqs=8, budget=64, max_model_len=64):
    return Scheduler(BlockPool(num_blocks, block_size), SchedulerLimits(max_num_seqs, budget, max_model_len))


def add(scheduler, request_id, prompt, max_tokens=4, eos=()):
    message = AddRequest(request_id, request_id, 0, list(prompt), SamplingParams(max_tokens=max_tokens), list(eos))
    request = Request.from_message(message)
    scheduler.add(request)
    return request


def sample_all(step, token=7):
    """Pretend the workers sampled `token` for every request that reached its end."""
    ids = [r.request_id for r, n in step.requests if r.num_computed_tokens + n == r.num_tokens]
    return StepResult(step.plan.step_id, ids, [token] * len(ids))


def run_step(scheduler, token=7):
    step = scheduler.schedule()
    return step, scheduler.update(step, sample_all(step, token))


def test_new_request_is_sent_in_full_then_as_deltas():
    scheduler = make_scheduler()
    add(scheduler, "a", range(6))
    step, outputs = run_step(scheduler)
    assert [n.request_id for n in step.plan.new_requests] == ["a"]
    assert step.plan.new_requests[0].block_ids == [0, 1]
    assert [(s.request_id, s.num_scheduled_tokens) for s in step.plan.scheduled] == [("a", 6)]
    assert outputs[0][1].new_token_ids == [7]
    step, _ = run_step(scheduler)
    assert step.plan.new_requests == []
    delta = step.plan.scheduled[0]
    assert (delta.num_scheduled_tokens, delta.new_token_ids, delta.new_block_ids) == (1, [7], [])


def test_chunked_prefill_under_token_budget_samples_only_at_the_end():
    scheduler = make_scheduler(budget=4)
    request = add(scheduler, "a", range(10))
    sizes = []
    for _ in range(3):
        step, outputs = run_step(scheduler)
        sizes.append(step.requests[0][1])
    assert sizes == [4, 4, 2]
    assert request.num_output_tokens == 1 and request.block_ids == [0, 1, 2]


def test_decodes_and_prefill_share_a_step_and_max_num_seqs_holds():
    scheduler = make_scheduler(max_num_seqs=2)
    add(scheduler, "a", range(3))
    run_step(scheduler)
    add(scheduler, "b", range(5))
    add(scheduler, "c", range(5))
    step, _ = run_step(scheduler)
    assert [(r.request_id, n) for r, n in step.requests] == [("a", 1), ("b", 5)]
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_finish_by_length_and_stop_token_frees_blocks():
    scheduler = make_scheduler()
    add(scheduler, "a", range(3), max_tokens=2)
    add(scheduler, "b", range(3), max_tokens=9, eos=[5])
    _, outputs = run_step(scheduler, token=1)
    assert [o.finish_reason for _, o in outputs] == [None, None]
    _, outputs = run_step(scheduler, token=5)
    reasons = {o.request_id: o.finish_reason for _, o in outputs}
    assert reasons == {"a": "length", "b": "stop"}
    assert scheduler.pool.num_free == 16 and not scheduler.running and not scheduler.waiting
    step = None
    add(scheduler, "c", range(3))
    step = scheduler.schedule()
    assert sorted(step.plan.finished_ids) == ["a", "b"]


def test_prefix_cache_hit_skips_computed_blocks():
    scheduler = make_scheduler()
    add(scheduler, "a", range(10), max_tokens=1)
    run_step(scheduler)
    second = add(scheduler, "b", list(range(8)) + [50, 51, 52])
    step = scheduler.schedule()
    assert step.requests[0][1] == 3
    assert second.num_cached_tokens == 8
    assert step.plan.new_requests[0].num_computed_tokens == 8
    assert step.plan.new_requests[0].block_ids[:2] == [0, 1]


def prompt_logprobs_of(step) -> dict[str, PromptLogprobs]:
    """What the workers find for each request asking for prompt logprobs: token i's logprob is -i."""
    found = {}
    for request, n in step.requests:
        first = request.num_computed_tokens + 1
        last = min(request.num_computed_tokens + n, request.num_prompt_tokens - 1)
        if request.sampling.prompt_logprobs is not None and first <= last:
            values = [-float(i) for i in range(first, last + 1)]
            found[request.request_id] = PromptLogprobs(first, Logprobs(values, [[]] * len(values), [[]] * len(values)))
    return found


def test_prompt_logprobs_compute_the_whole_prompt_and_come_once_with_the_first_output():
    scheduler = make_scheduler(budget=4)
    add(scheduler, "a", range(10), max_tokens=1)
    for _ in range(3):
        run_step(scheduler)
    message = AddRequest("b", "b", 0, list(range(10)), SamplingParams(max_tokens=2, prompt_logprobs=0), [])
    request = Request.from_message(message)
    scheduler.add(request)
    firsts = []
    for _ in range(4):
        step = scheduler.schedule()
        firsts.append(step.requests[0][0].num_computed_tokens)
        result = sample_all(step)
        result.prompt_logprobs = prompt_logprobs_of(step)
        outputs = scheduler.update(step, result)
        if outputs:
            found = outputs[0][1].prompt_logprobs
            assert (found is None) == (request.num_output_tokens > 1)
            if found is not None:
                assert found.token_logprobs == [-float(i) for i in range(1, 10)]
    assert firsts == [0, 4, 8, 10]  # nothing reused from the cache: every prompt token's logits
    assert request.num_cached_tokens == 0


def test_samples_of_one_prompt_compute_it_once_and_others_are_not_held_up():
    scheduler = make_scheduler(budget=14)
    first = add(scheduler, "s0", range(13), max_tokens=2)
    second = add(scheduler, "s1", range(13), max_tokens=2)
    add(scheduler, "other", range(100, 103), max_tokens=2)
    step, _ = run_step(scheduler)  # s1 waits for the blocks s0 computes; the request after it runs
    assert [(r.request_id, n) for r, n in step.requests] == [("s0", 13), ("other", 1)]
    prompt_blocks = first.block_ids[:3]
    step, _ = run_step(scheduler)
    assert [(r.request_id, n) for r, n in step.requests] == [("s0", 1), ("other", 2), ("s1", 1)]
    assert second.num_cached_tokens == 12 and second.block_ids[:3] == prompt_blocks


def test_whole_prompt_cached_still_runs_last_token():
    scheduler = make_scheduler()
    add(scheduler, "a", range(8), max_tokens=1)
    run_step(scheduler)
    add(scheduler, "b", range(8))
    step = scheduler.schedule()
    assert step.requests[0][1] == 4  # the last block is recomputed: its last token makes the logits


def test_preemption_when_blocks_run_out_and_resume_from_cache():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    a = add(scheduler, "a", range(7), max_tokens=8)
    b = add(scheduler, "b", range(100, 107), max_tokens=8)
    run_step(scheduler)
    assert len(a.block_ids) == 2 and len(b.block_ids) == 2
    step, _ = run_step(scheduler)  # both grow to 8 tokens: still 2 blocks each
    step = scheduler.schedule()  # token 9 needs a third block: b (newest) is preempted
    assert scheduler.num_preemptions == 1 and b.status is Status.WAITING
    assert [r.request_id for r, _ in step.requests] == ["a"]
    assert step.plan.finished_ids == ["b"]
    assert a.block_ids == [0, 1, 3] and b.block_ids == [] and b.num_computed_tokens == 0
    scheduler.update(step, sample_all(step))
    scheduler.abort(["a"])
    step = scheduler.schedule()  # b starts over from its first block, still cached in block 2
    assert [(r.request_id, n) for r, n in step.requests] == [("b", 5)]
    assert step.plan.new_requests[0].num_computed_tokens == 4
    assert step.plan.new_requests[0].token_ids == list(range(100, 107)) + [7, 7]
    assert b.block_ids[0] == 2


def test_abort_during_step_wins_over_its_output():
    scheduler = make_scheduler()
    add(scheduler, "a", range(5))
    step = scheduler.schedule()
    assert scheduler.abort(["a", "zzz"]) == ["a"]
    outputs = scheduler.take_finished_outputs() + scheduler.update(step, sample_all(step))
    assert [(o.request_id, o.finish_reason, o.new_token_ids) for _, o in outputs] == [("a", "abort", [])]
    assert scheduler.pool.num_free == 16


def test_abort_waiting_request_gives_one_final_output():
    scheduler = make_scheduler(max_num_seqs=1)
    add(scheduler, "a", range(5))
    add(scheduler, "b", range(5))
    scheduler.schedule()
    scheduler.abort(["b"])
    outputs = scheduler.take_finished_outputs()
    assert [(o.request_id, o.finish_reason) for _, o in outputs] == [("b", "abort")]
    assert [r.request_id for r in scheduler.waiting] == []


def test_blocks_computed_with_old_weights_are_never_reused_after_new_weights():
    scheduler = make_scheduler()
    add(scheduler, "a", range(9), max_tokens=1)
    run_step(scheduler)  # caches blocks 0 and 1 (8 tokens)
    held = add(scheduler, "held", range(9), max_tokens=1)  # arrived before the update, waits
    scheduler.new_weights("v1")
    new = add(scheduler, "new", range(9), max_tokens=1)
    step = scheduler.schedule()
    # held computes from the start; new, of the same prompt, waits for those blocks
    assert [(r, r.num_computed_tokens) for r, _ in step.requests] == [(held, 0)]
    scheduler.update(step, sample_all(step))
    step = scheduler.schedule()
    assert [(r, r.num_computed_tokens) for r, _ in step.requests] == [(new, 8)]  # the new weights' blocks


def test_recompute_requeues_running_requests_in_order_and_keeps_their_tokens():
    scheduler = make_scheduler()
    a, b = add(scheduler, "a", range(5), max_tokens=9), add(scheduler, "b", range(6), max_tokens=9)
    run_step(scheduler)  # b waits for the first block, which it shares with a
    run_step(scheduler)
    assert scheduler.recompute_running() == 2
    assert [r.request_id for r in scheduler.waiting] == ["a", "b"] and scheduler.pool.num_free == 16
    step = scheduler.schedule()
    assert sorted(step.plan.finished_ids) == ["a", "b"]  # the workers drop their old rows
    # Each sends its prompt and the tokens sampled so far again; the first full block is a prefix hit.
    new = [(n.request_id, len(n.token_ids), n.num_computed_tokens) for n in step.plan.new_requests]
    assert new == [("a", 7, 4), ("b", 7, 4)]
    assert (a.num_output_tokens, b.num_output_tokens) == (2, 1)


def test_output_spans_follow_the_weight_version_of_each_token():
    scheduler = make_scheduler()
    add(scheduler, "a", range(3), max_tokens=4)
    run_step(scheduler)
    scheduler.weight_version = "relabelled"
    run_step(scheduler)
    scheduler.new_weights("v2")
    _, outputs = run_step(scheduler)
    spans = [(s.version, s.start, s.end) for s in outputs[0][1].weight_versions]
    assert spans == [("0", 0, 1), ("relabelled", 1, 2), ("v2", 2, 3)]
    assert outputs[0][1].weight_version == "v2"


def test_reset_prefix_cache_drops_only_blocks_no_request_holds():
    scheduler = make_scheduler()
    add(scheduler, "done", range(9), max_tokens=1)
    run_step(scheduler)
    add(scheduler, "running", range(100, 109), max_tokens=5)
    run_step(scheduler)
    assert scheduler.reset_prefix_cache() == 2
    assert scheduler.reset_prefix_cache() == 0
    add(scheduler, "again", range(100, 109), max_tokens=1)
    step = scheduler.schedule()
    assert step.requests[-1][0].num_computed_tokens == 8  # the running request's blocks stayed cached
