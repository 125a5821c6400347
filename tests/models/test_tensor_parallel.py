"""`from_pretrained(..., tp_plan="auto")` under torchrun shards the model (2 CPU processes on gloo), the
shift weights with the K/V heads they mix, and gives the single-process logits and greedy tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from builders import tiny_model

SCRIPT = r"""
import os, sys, torch
import kvshift
from transformers import AutoModelForCausalLM
d = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(d, tp_plan="auto", dtype=torch.float32).eval()
ids = torch.tensor([[5, 9, 13, 2, 40, 7, 7, 19]])
with torch.no_grad():
    logits = model(ids).logits
shift = model.model.layers[0].self_attn.k_shift
local = shift.to_local() if hasattr(shift, "to_local") else shift
gen = model.generate(ids, max_new_tokens=6, do_sample=False)
torch.save({"logits": logits, "gen": gen, "local_shift": local.detach().clone()},
           os.path.join(d, f"tp_rank{os.environ['RANK']}.pt"))
"""


def test_tensor_parallel_two_processes_match_one(tmp_path: Path):
    model = tiny_model(num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(tmp_path)
    (tmp_path / "tp.py").write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29811",
           str(tmp_path / "tp.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = torch.tensor([[5, 9, 13, 2, 40, 7, 7, 19]])
    with torch.no_grad():
        ref = model(ids).logits
    ref_gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    full_shift = model.model.layers[0].self_attn.k_shift.detach()
    for rank in (0, 1):
        out = torch.load(tmp_path / f"tp_rank{rank}.pt")
        assert (out["logits"] - ref).abs().max() <= 1e-5
        assert torch.equal(out["gen"], ref_gen)
        # each rank holds the shift weights of its own KV head
        assert torch.equal(out["local_shift"], full_shift[rank:rank + 1])
