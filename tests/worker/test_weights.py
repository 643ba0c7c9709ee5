"""The worker's side of weight updates and sleep, in-process on tiny models: checks before any
write, writes both forwards see (fused projections, tied head), roll back, files, pieces, and
freeing and restoring device memory."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from protocol.weights import BeginWeights, EndWeights, Sleep, TensorSpec, WakeUp, bucket_layout, bucket_sizes
from worker.commands import WorkerCommands
from worker.weight_files import file_tensors, read_tensors
from worker.weights import ModelWeights, PieceAssembler, WeightError
from tests.tiny_models import perturbed_copy
from tests.worker.worker_testutil import Req, ToyCore, make_runner, prompt, reference_generate


@pytest.fixture(scope="module")
def other_folder(llama_folder, tmp_path_factory) -> str:
    return str(perturbed_copy(Path(llama_folder), tmp_path_factory.mktemp("other"), seed=3))


def generate(runner, prompts=((1, 7), (2, 12))) -> dict[str, list[int]]:
    reqs = [Req(f"r{seed}", prompt(seed, n), 5) for seed, n in prompts]
    return {rid: r.output for rid, r in ToyCore(runner).run(reqs).items()}


def spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))


@pytest.mark.parametrize("native", [True, False], ids=["native", "transformers"])
def test_writing_another_models_tensors_gives_its_tokens(llama_folder, other_folder, native):
    """As the worker runs an update: its packed weights are made again on commit."""
    runner = make_runner(llama_folder, native=native)
    copies = runner.native.packed if native else None
    commands = WorkerCommands(runner.model, runner.kv_cache, 0, torch.device("cpu"), copies)
    assert commands.handle(BeginWeights(1, path=other_folder)).error is None
    assert commands.handle(EndWeights(2, 1, commit=True)).error is None
    want = {f"r{s}": reference_generate(other_folder, prompt(s, n), 5) for s, n in ((1, 7), (2, 12))}
    assert generate(runner) == want


def test_the_tied_head_is_the_embedding(llama_folder):
    runner = make_runner(llama_folder)
    weights = ModelWeights(runner.model)
    head = runner.model.lm_head.weight
    [target] = weights.targets([spec("lm_head.weight", head)])
    update = weights.begin([target])
    update.write(target, torch.full_like(head, 0.25))
    assert torch.all(runner.model.model.embed_tokens.weight == 0.25)
    assert update.roll_back() and not torch.all(runner.model.model.embed_tokens.weight == 0.25)


def test_roll_back_restores_every_written_parameter_exactly(llama_folder):
    runner = make_runner(llama_folder)
    before = generate(runner)
    weights = ModelWeights(runner.model)
    params = {n: p.detach().clone() for n, p in runner.model.named_parameters()}
    targets = weights.targets([spec(n, p) for n, p in params.items()])
    update = weights.begin(targets)
    for target in targets[: len(targets) // 2]:
        update.write(target, torch.randn(target.spec.shape))
    assert update.roll_back()
    assert all(torch.equal(params[n], p) for n, p in runner.model.named_parameters())
    assert generate(runner) == before


def test_names_shapes_and_duplicates_are_checked_before_anything(llama_folder):
    weights = ModelWeights(make_runner(llama_folder).model)
    with pytest.raises(WeightError, match=r"'model.norm.weigth' is not a parameter .*did you mean 'model.norm.weight'"):
        weights.targets([TensorSpec("model.norm.weigth", "float32", (64,))])
    with pytest.raises(WeightError, match=r"tensor 'model.norm.weight' has shape \[65\], the model's is \[64\]"):
        weights.targets([TensorSpec("model.norm.weight", "float32", (65,))])
    with pytest.raises(WeightError, match="appears twice"):
        weights.targets([TensorSpec("model.norm.weight", "float32", (64,))] * 2)


def test_pieces_at_any_offsets_assemble_into_the_tensor(llama_folder):
    runner = make_runner(llama_folder)
    weights = ModelWeights(runner.model)
    value = torch.randn(64, dtype=torch.float32)
    other = torch.randn(512, 64).to(torch.bfloat16)
    targets = weights.targets([spec("model.norm.weight", value), spec("model.embed_tokens.weight", other)])
    assembler = PieceAssembler(weights.begin(targets), targets)
    specs = [t.spec for t in targets]
    stream = torch.cat([value.view(torch.uint8), other.reshape(-1).view(torch.uint8)])
    layout = bucket_layout(specs, 333)  # odd: tensors start at unaligned bucket offsets
    start = 0
    for pieces, size in zip(layout, bucket_sizes(layout)):
        bucket = stream[start : start + size]
        for piece in pieces:
            data = bucket[piece.bucket_offset : piece.bucket_offset + piece.length]
            assembler.add(specs[piece.index].name, piece.tensor_offset, data)
        start += size
    assert torch.equal(runner.model.model.norm.weight, value)
    assert torch.equal(runner.model.model.embed_tokens.weight, other.float())


def test_bad_files_fail_before_any_tensor_is_read(llama_folder, tmp_path):
    data = (Path(llama_folder) / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(WeightError, match="cannot read .*cut.safetensors: .*incomplete metadata"):
        file_tensors(str(tmp_path / "cut.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightError, match="no .safetensors files in"):
        file_tensors(str(tmp_path / "empty"))
    save_file({"model.norm.weight": torch.zeros(64, dtype=torch.int64)}, tmp_path / "ints.safetensors")
    with pytest.raises(WeightError, match="tensor 'model.norm.weight' in .* is I64: not one of float32"):
        file_tensors(str(tmp_path / "ints.safetensors"))
    tensors = file_tensors(llama_folder)
    weights = ModelWeights(make_runner(llama_folder).model)
    read = dict((t.spec.name, v) for t, v in read_tensors(tensors, weights.targets([t.spec for t in tensors])))
    assert set(read) == {t.spec.name for t in tensors} and "lm_head.weight" not in read


def test_sleep_frees_the_kv_cache_and_level_2_drops_the_weights_until_rewritten(llama_folder):
    runner = make_runner(llama_folder)
    before = generate(runner)
    commands = WorkerCommands(runner.model, runner.kv_cache, 0, torch.device("cpu"), runner.native.packed)
    saved = {n: p.detach().clone() for n, p in runner.model.named_parameters()}
    assert commands.handle(Sleep(1, 2)).error is None
    assert not any(p.has_copies for p in runner.native.packed.projections)
    assert all(k.untyped_storage().nbytes() == 0 for k in runner.kv_cache.keys)
    assert all(p.untyped_storage().nbytes() == 0 for p in runner.model.parameters())
    with pytest.raises(WeightError, match="dropped the weights on CPU"):
        commands.memory.wake(["weights", "kv_cache"])
    targets = commands.weights.targets([spec(n, t) for n, t in saved.items()])
    commands.memory.prepare_writes(targets)
    update = commands.weights.begin(targets)
    for target in targets:
        update.write(target, saved[target.spec.name])
    update.commit()
    commands.memory.written(update.written)
    assert commands.handle(WakeUp(2, ["weights", "kv_cache"])).error is None
    assert commands.memory.asleep == set() and all(p.has_copies for p in runner.native.packed.projections)
    assert all(torch.count_nonzero(k) == 0 for k in runner.kv_cache.keys)
    assert generate(runner) == before
