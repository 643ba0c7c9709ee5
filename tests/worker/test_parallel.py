"""Tensor parallel over 2 CPU processes (gloo) gives the tokens of 1 worker; bad head counts are refused."""

import json
import os
import subprocess
import sys

import pytest
import transformers

from worker.model_loader import ModelError, check_model_config
from tests.worker.worker_testutil import Req, ToyCore, make_runner, prompt, tiny_model

CHILD = os.path.join(os.path.dirname(__file__), "tp_child.py")


def test_two_ranks_match_one_worker(llama_folder, tmp_path):
    out = tmp_path / "tokens.json"
    procs = [
        subprocess.Popen([sys.executable, CHILD, llama_folder, str(tmp_path), str(rank), str(out)])
        for rank in range(2)
    ]
    try:
        for proc in procs:
            assert proc.wait(timeout=50) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    reqs = [Req("a", prompt(1, 5), 6), Req("b", prompt(2, 13), 6, chunk=4, arrival=1)]
    single = ToyCore(make_runner(llama_folder)).run(reqs)
    assert json.loads(out.read_text()) == {rid: r.output for rid, r in single.items()}


def test_heads_not_divisible_are_refused(tmp_path):
    folder = tiny_model("odd", str(tmp_path / "odd"))
    config = transformers.AutoConfig.from_pretrained(folder)
    with pytest.raises(ModelError, match="model has 9 attention heads and 3 KV heads: --workers 2 must divide both"):
        check_model_config(config, 2)
    check_model_config(config, 3)


def test_rope_scaling_with_the_longest_position_is_refused():
    config = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2,
                                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ModelError, match="RoPE type 'dynamic'"):
        check_model_config(config, 1)
