"""`kvshift export mlx`: an mlx-lm folder that mlx-lm's own tools run, equal to the Hugging Face model.

The export itself needs only PyTorch (tested everywhere); running the folder needs MLX (``pip install
'mlx[cpu]' mlx-lm`` on Linux, which ``bash scripts/setup.sh --test`` installs, so CI runs them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from builders import tiny_model

from kvshift.cli import main
from kvshift.data.tokenizer import byte_tokenizer
from kvshift.export import export_mlx
from kvshift.models import KVShiftForCausalLM

EOS = 256
CASES = {
    "mha": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4),
    # GQA, gate parametrisation, QK-norm, QKV bias, the shift in layer 0 only, tied embeddings
    "gqa-gate-qknorm-layer0-tied": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, qk_norm=True,
                                        qkv_bias=True, kv_shift_parametrization="gate", kv_shift=[True, False],
                                        tie_word_embeddings=True),
    # Baichuan-M1's shape: layer 0 slides over 8 tokens (the prompts are longer) with its own heads (2 of size 64,
    # 1 KV head: a rotating KV cache beside the shift state)
    "sliding-own-heads": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], num_swa_attention_heads=2,
                              num_swa_key_value_heads=1),
}


def _save(path, **overrides):
    fields = dict(vocab_size=257, intermediate_size=256, num_hidden_layers=2, max_position_embeddings=128,
                  initializer_range=0.1, pad_token_id=EOS, bos_token_id=None, eos_token_id=EOS)
    model = tiny_model(seed=0, **{**fields, **overrides})
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_export_writes_an_mlx_lm_folder_without_mlx(tmp_path):
    src = _save(tmp_path / "ck", **CASES["gqa-gate-qknorm-layer0-tied"])
    out = export_mlx(src, tmp_path / "mlx")
    config = json.loads((out / "config.json").read_text())
    assert config["model_file"] == "kvshift_mlx.py" and (out / "kvshift_mlx.py").is_file()
    assert config["kv_shift"] == [True, False] and config["tie_word_embeddings"] is True
    assert (out / "tokenizer.json").is_file()
    from safetensors.numpy import load_file

    weights = load_file(str(out / "model.safetensors"))
    model = KVShiftForCausalLM.from_pretrained(src)
    k_eff, _ = model.model.layers[0].self_attn.shift_weights()  # the gate's effective (sigmoid) pair
    assert torch.allclose(torch.from_numpy(weights["model.layers.0.self_attn.k_shift"]), k_eff.float())
    assert "model.layers.1.self_attn.k_shift" not in weights and "lm_head.weight" not in weights


@pytest.mark.parametrize("field,value", [("kv_shift_window", 3), ("kv_shift_granularity", "channel"),
                                         ("kv_shift_targets", "qkv"), ("kv_shift_position", "post_rope"),
                                         ("kv_shift_residual", True), ("token_smear", True)])
def test_export_refuses_what_mlx_cannot_express_naming_the_field(tmp_path, field, value, capsys):
    src = _save(tmp_path / "ck", **CASES["mha"], **{field: value})
    assert main(["export", "mlx", "--model", str(src), "--to", str(tmp_path / "mlx")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "mlx").exists()


def test_export_keeps_an_existing_folder_unless_overwrite(tmp_path, capsys):
    src = _save(tmp_path / "ck", **CASES["mha"])
    out = tmp_path / "mlx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "mlx", "--model", str(src), "--to", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["export", "mlx", "--model", str(src), "--to", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


# -- running the folder in MLX ---------------------------------------------------------------------------

mlx_needed = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("mlx", "mlx_lm")),
    reason="needs MLX: pip install 'mlx[cpu]' mlx-lm (bash scripts/setup.sh --test installs it)")


def _hf_logits(src, ids):
    model = KVShiftForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy(), model


@mlx_needed
@pytest.mark.parametrize("name", list(CASES))
def test_mlx_logits_equal_hf(tmp_path, name):
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    src = _save(tmp_path / "ck", **CASES[name])
    out = export_mlx(src, tmp_path / "mlx")
    model, _ = load(str(out), trust_remote_code=True)
    ids = torch.randint(1, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    want, _ = _hf_logits(src, ids)
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    assert np.abs(got - want).max() <= 1e-4


@mlx_needed
def test_the_mlx_model_really_takes_the_window(tmp_path):
    """The sliding-window check can fail: the same folder with the window widened past the prompt is far off HF."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    src = _save(tmp_path / "ck", **CASES["sliding-own-heads"])
    out = export_mlx(src, tmp_path / "mlx")
    ids = torch.randint(1, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    want, _ = _hf_logits(src, ids)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "sliding_window": 10_000}))
    model, _ = load(str(out), trust_remote_code=True)
    assert np.abs(np.array(model(mx.array([ids]))[0].astype(mx.float32)) - want).max() > 1e-2


@mlx_needed
@pytest.mark.parametrize("name", list(CASES))
def test_mlx_greedy_equals_hf_with_a_prompt_prefilled_in_several_steps(tmp_path, name):
    """mlx-lm's generate_step prefills 5 tokens at a time from a 37-token prompt, then decodes one token at a
    time with the shift state and KV cache: the tokens equal HF ``generate``'s."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    src = _save(tmp_path / "ck", **CASES[name])
    out = export_mlx(src, tmp_path / "mlx")
    model, _ = load(str(out), trust_remote_code=True)
    ids = torch.randint(1, 256, (37,), generator=torch.Generator().manual_seed(2)).tolist()
    _, hf = _hf_logits(src, ids)
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20, min_new_tokens=20)[0, 37:].tolist()
    got = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=20, prefill_step_size=5)]
    assert got == want


@mlx_needed
def test_mlx_lm_generate_command_runs_the_exported_folder(tmp_path):
    src = _save(tmp_path / "ck", **CASES["mha"])
    out = export_mlx(src, tmp_path / "mlx")
    prompt = "def main("
    ids = byte_tokenizer()(prompt, add_special_tokens=False)["input_ids"]
    _, hf = _hf_logits(src, ids)
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0, len(ids):].tolist()
    want = byte_tokenizer().decode([t for t in gen if t != EOS])
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(out), "--trust-remote-code",
                           "--prompt", prompt, "--max-tokens", "12", "--temp", "0", "--ignore-chat-template"],
                          capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert want.strip() and want.strip() in proc.stdout


@mlx_needed
def test_4bit_export_is_quantised_by_mlx_lm_and_still_generates(tmp_path):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load

    src = _save(tmp_path / "ck", **CASES["mha"])
    out = export_mlx(src, tmp_path / "mlx4", bits=4)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["model_file"] == "kvshift_mlx.py"
    model, _ = load(str(out), trust_remote_code=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    ids = list(range(1, 33))
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    want, _ = _hf_logits(src, ids)
    import numpy as np

    err = np.abs(np.array(logits) - want).max()
    assert 0 < err < np.abs(want).max()  # quantised: not equal, but the same model
