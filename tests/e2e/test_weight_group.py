"""A trainer (this test's process, gloo on CPU) makes a weight group that the engine joins; plain and
packed broadcasts land on every rank of a tensor-parallel engine, and on SmolLM2."""

import asyncio

import pytest

from frontend.client import AsyncClient
from frontend.weight_sync import sync_weights
from tests.e2e.engine import start_engine
from tests.e2e.weights_util import Models, greedy_outputs, weight_group

pytestmark = pytest.mark.timeout(300)


def test_two_worker_ranks_load_their_shards_from_broadcasts_and_from_a_path(tiny_models, tmp_path):
    models = Models(tmp_path, tiny_models["llama"])
    engine = start_engine(models.folders["a"], "--workers", "2", "--max-num-seqs", "8")
    try:
        async def run():
            async with AsyncClient(engine.addresses[0]) as client:
                found = {}
                async with weight_group(client, "tp", num_workers=2) as group:
                    await client.pause("keep")
                    found["plain"] = await sync_weights(client, group, models.state_dict("b"), version="tp-1")
                    await client.resume()
                    found["b"] = await greedy_outputs(client)
                    found["packed"] = await sync_weights(client, group, models.state_dict("c"), packed=True,
                                                         bucket_bytes=50_000, atomic=True)  # fmt: skip
                    found["c"] = await greedy_outputs(client)
                found["path"] = await client.update_weights(path=str(models.folders["b"]), atomic=True)
                found["path b"] = await greedy_outputs(client)
                return found

        found = asyncio.run(run())
    finally:
        engine.stop()
    models.assert_serves("b", [o.token_ids for o in found["b"]])
    models.assert_serves("c", [o.token_ids for o in found["c"]])
    models.assert_serves("b", [o.token_ids for o in found["path b"]])
    assert [found[k].weight_version for k in ("plain", "packed", "path")] == ["tp-1", "tp-2", "tp-3"]
    assert all(found[k].num_tensors == 20 for k in ("plain", "packed", "path"))


def test_smollm2_takes_a_trainer_update_and_a_path_update_back(smollm2_folder, tmp_path):
    models = Models(tmp_path, smollm2_folder, scale=0.05)
    engine = start_engine(smollm2_folder, "--max-num-seqs", "8", "--kv-cache-memory", "512MiB")
    try:
        async def run():
            async with AsyncClient(engine.addresses[0]) as client:
                before = await greedy_outputs(client)
                async with weight_group(client, "smollm2") as group:
                    result = await sync_weights(client, group, models.state_dict("b"), packed=True, atomic=True)
                    updated = await greedy_outputs(client)
                await client.update_weights(path=str(smollm2_folder), atomic=True)
                back = await greedy_outputs(client)
                return before, result, updated, back

        before, result, updated, back = asyncio.run(run())
    finally:
        engine.stop()
    models.assert_serves("b", [o.token_ids for o in updated])
    assert [o.token_ids for o in updated] != [o.token_ids for o in before]
    assert [o.token_ids for o in back] == [o.token_ids for o in before]
    assert result.num_tensors == 272  # SmolLM2's 30 layers of 9 tensors, the embedding and the final norm

