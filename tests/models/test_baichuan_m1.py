"""Baichuan-M1 checkpoints: per-layer attention types and head counts, sliding windows in every path, the
conversion (checked against mlx-lm's own ``baichuan_m1`` model where MLX is installed) and generation in every
mode equal to the full forward pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import left_pad, tiny_config
from safetensors.torch import load_file, save_file

from kvshift import KVShiftForCausalLM
from kvshift.cli import main
from kvshift.data.tokenizer import byte_tokenizer
from kvshift.models.baichuan_m1 import make_tiny_checkpoint
from kvshift.models.convert import convert_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4
WINDOW = 6
MIXED = dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW,
             layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
             num_swa_attention_heads=2, num_swa_key_value_heads=1)

mlx_needed = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("mlx", "mlx_lm")),
    reason="needs MLX: pip install 'mlx[cpu]' mlx-lm (bash scripts/setup.sh --test installs it)")


@pytest.fixture(scope="module")
def m1_dir(tmp_path_factory):
    """A tiny random checkpoint in Baichuan-M1's layout: GQA, layers 1 and 3 sliding (window 6) with their own
    head counts (2 heads of size 32 / 1 KV head, against 4 of size 16 / 2)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m1") / "m1", seed=0, sliding_window=WINDOW,
                                tokenizer=byte_tokenizer())


@pytest.fixture(scope="module")
def m1(m1_dir):
    return convert_checkpoint(str(m1_dir))


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    m = KVShiftForCausalLM(tiny_config(**{**MIXED, **overrides})).eval()
    with torch.no_grad():  # shift weights off the convex line: the general case
        for layer in m.model.layers:
            layer.self_attn.k_shift.copy_(torch.randn_like(layer.self_attn.k_shift))
            layer.self_attn.v_shift.copy_(torch.randn_like(layer.self_attn.v_shift))
    return m


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, use_cache=False, **kw).logits


# --- the config -------------------------------------------------------------------------------------------
def test_layer_types_follow_transformers_convention():
    assert tiny_config().layer_types == ["full_attention"] * 2
    unused = tiny_config(sliding_window=8, layer_types=["full_attention"] * 2)  # Qwen2's unused window
    assert [unused.layer_attention(i).sliding_window for i in range(2)] == [None, None]
    assert tiny_config(sliding_window=8).layer_types == ["sliding_attention"] * 2  # Mistral: a window everywhere
    c = tiny_config(**MIXED)
    assert c.layer_attention(0) == ("full_attention", 4, 2, 8, None)
    assert c.layer_attention(1) == ("sliding_attention", 2, 1, 16, WINDOW)  # head size hidden / heads, as in M1
    assert tiny_config(**{**MIXED, "swa_head_dim": 8}).layer_attention(1).head_dim == 8


def test_layer_types_survive_save_and_load(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["layer_types"] == MIXED["layer_types"] and raw["num_swa_attention_heads"] == 2
    back = KVShiftForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert back.model.layers[1].self_attn.k_proj.weight.shape == (16, 32)  # one KV head of size 16
    ids = torch.randint(3, 97, (1, 15))
    assert torch.equal(_logits(back, ids), _logits(m, ids))


@pytest.mark.parametrize("bad, field", [
    (dict(layer_types=["full_attention"]), "layer_types"),
    (dict(layer_types=["full_attention", "local"]), "layer_types"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "sliding_window"),
    (dict(sliding_window=4, num_swa_attention_heads=4, num_swa_key_value_heads=3), "num_swa_key_value_heads"),
    (dict(sliding_window=4, num_swa_attention_heads=0), "num_swa_attention_heads"),
    (dict(sliding_window=4, swa_head_dim=7), "swa_head_dim"),
    (dict(sliding_window=4, num_swa_attention_heads=3), "num_swa_attention_heads"),  # 32 / 3 is no head size
])
def test_bad_layer_fields_are_refused_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**bad)


# --- the window -------------------------------------------------------------------------------------------
def test_a_sliding_layer_sees_its_window_and_the_shift_one_token_more():
    """One sliding layer, window 6: the output at t depends on tokens t-6..t (keys t-5..t, each shifted with its
    predecessor) and on nothing earlier. The raw previous row does not leave with the window."""
    m = _model(num_hidden_layers=1, layer_types=["sliding_attention"])
    ids = torch.randint(3, 97, (1, 16))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 97
    diff = (_logits(m, ids) - _logits(m, other)).abs().amax(-1)[0]
    assert (diff[WINDOW + 1:] == 0).all()  # outside the window and its one-token shift reach
    assert diff[WINDOW] > 1e-4  # key 1 is mixed with token 0
    full = _model(num_hidden_layers=1, layer_types=["full_attention"])
    assert (_logits(full, ids) - _logits(full, other)).abs().amax(-1)[0, WINDOW + 1:].min() > 0


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flex_attention"])
def test_every_attention_backend_agrees(impl):
    ref = _model()
    m = _model()
    m.set_attn_implementation(impl)
    ids = torch.randint(3, 97, (2, 17))
    assert (_logits(m, ids) - _logits(ref, ids)).abs().max() <= TOL


@pytest.mark.parametrize("how", ["position_ids", "cu_seqlens"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_packed_rows_equal_separate_sequences(how, mode):
    m = _model()
    m.train(mode == "train")
    m.config.attention_dropout = 0.0
    seqs = [torch.randint(3, 97, (n,)) for n in (9, 13, 5)]
    packed = torch.cat(seqs)[None]
    if how == "cu_seqlens":
        kw = {"cu_seqlens": torch.tensor([0, 9, 22, 27], dtype=torch.int32)}
    else:
        kw = {"position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None]}
    with torch.no_grad():
        got = m(packed, use_cache=False, **kw).logits[0]
        want = torch.cat([m(s[None], use_cache=False).logits[0] for s in seqs])
    assert (got - want).abs().max() <= TOL


# --- generation: every mode equals the full forward -------------------------------------------------------
def recompute_greedy(model, ids, n, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        last = _logits(model, ids, attention_mask=mask, position_ids=pos)[:, -1]
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


GREEDY = dict(do_sample=False, pad_token_id=256, eos_token_id=None)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_converted_m1_greedy_equals_recompute_past_the_window(m1, cache):
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))  # prompt > window
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    out = m1.generate(ids, max_new_tokens=12, **GREEDY, **kw)
    assert torch.equal(out, recompute_greedy(m1, ids, 12))


def test_converted_m1_chunked_prefill_equals_full_forward(m1):
    """The prompt fed 4 tokens at a time through one cache, then decoded: each chunk's logits are the full
    forward's, across the sliding layers' window."""
    from transformers import DynamicCache

    ids = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(4))
    want = _logits(m1, ids)
    cache = DynamicCache(config=m1.config)
    got = []
    with torch.no_grad():
        for s in range(0, 23, 4):
            got.append(m1(ids[:, s:s + 4], cache=cache, use_cache=True).logits)
    assert (torch.cat(got, 1) - want).abs().max() <= TOL
    assert cache.layers[1].keys.shape[2] < 23  # the sliding layers really keep only their window


def test_converted_m1_left_padded_batch_equals_each_alone(m1):
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in (12, 4, 9)]
    ids, mask = left_pad(seqs, pad=256)
    out = m1.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY)
    for i, s in enumerate(seqs):
        assert torch.equal(out[i, ids.shape[1]:], recompute_greedy(m1, s[None], 10)[0, len(s):])


def test_converted_m1_beam_search_equals_recompute(m1):
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(6))
    kw = dict(num_beams=3, num_return_sequences=3, max_new_tokens=10, output_scores=True,
              return_dict_in_generate=True, **GREEDY)
    cached, ref = m1.generate(ids, **kw), m1.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, ref.sequences)
    assert (cached.sequences_scores - ref.sequences_scores).abs().max() <= TOL


@pytest.mark.parametrize("mode", ["assistant", "prompt_lookup"])
def test_converted_m1_assisted_decoding_equals_greedy(m1, m1_dir, tmp_path, mode):
    g = torch.Generator().manual_seed(7)
    motif = torch.randint(0, 256, (5,), generator=g)
    ids = torch.cat([motif, torch.randint(0, 256, (4,), generator=g), motif])[None]  # 14 > window; lookup hits
    if mode == "assistant":  # another M1-layout model: some candidates are rejected, so the caches roll back
        kw = {"assistant_model": convert_checkpoint(str(make_tiny_checkpoint(tmp_path / "a", seed=1)))}
    else:
        kw = {"prompt_lookup_num_tokens": 3}
    greedy = m1.generate(ids, max_new_tokens=16, **GREEDY)
    assert torch.equal(m1.generate(ids, max_new_tokens=16, **GREEDY, **kw), greedy)
    assert torch.equal(greedy, recompute_greedy(m1, ids, 16))


# --- the conversion ---------------------------------------------------------------------------------------
def test_conversion_maps_every_weight(m1_dir, m1):
    src = load_file(str(m1_dir / "model.safetensors"))
    c = m1.config
    assert c.layer_types == ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert (c.num_attention_heads, c.num_key_value_heads, c.num_swa_attention_heads, c.num_swa_key_value_heads) \
        == (4, 2, 2, 1)
    for i, (heads, kv, d) in enumerate([(4, 2, 16), (2, 1, 32), (4, 2, 16), (2, 1, 32)]):
        attn = m1.model.layers[i].self_attn
        packed = src[f"model.layers.{i}.self_attn.W_pack.weight"]
        assert torch.equal(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), packed)
        assert attn.q_proj.weight.shape[0] == heads * d and attn.k_proj.weight.shape[0] == kv * d
        conv = src[f"model.layers.{i}.self_attn.conv_k"].reshape(kv, 2)  # (previous, current)
        assert torch.equal(attn.k_shift, conv.flip(-1))  # kvshift's (current, previous)
        assert attn.k_shift.dtype == torch.float32
    head = src["lm_head.weight"]
    assert (head.norm(dim=-1) - 1).abs().max() > 0.1  # the NormHead is stored un-normalised ...
    assert torch.allclose(m1.lm_head.weight, head / head.norm(dim=-1, keepdim=True), atol=1e-6)  # ... used normalised


def test_convert_command_writes_a_loadable_model_with_the_tokenizer(m1_dir, m1, tmp_path, capsys):
    assert main(["convert", "--from", str(m1_dir), "--to", str(tmp_path / "kv")]) == 0
    assert "4 layers" in capsys.readouterr().out
    back = KVShiftForCausalLM.from_pretrained(tmp_path / "kv").eval()
    ids = torch.randint(0, 256, (1, 20))
    assert torch.equal(_logits(back, ids), _logits(m1, ids))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "kv").decode([104, 105]) == "hi"


def test_convert_refuses_an_init_and_a_wider_conv_window(m1_dir, tmp_path, capsys):
    assert main(["convert", "--from", str(m1_dir), "--to", str(tmp_path / "kv"), "--init", "paper"]) == 2
    assert "conv_k" in capsys.readouterr().err and not (tmp_path / "kv").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    raw = json.loads((m1_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "conv_window": 3}))
    save_file(load_file(str(m1_dir / "model.safetensors")), str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="conv_window=3"):
        convert_checkpoint(str(bad))
    state = load_file(str(m1_dir / "model.safetensors"))
    del state["model.layers.2.self_attn.conv_v"]
    (bad / "config.json").write_text(json.dumps(raw))
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.conv_v"):
        convert_checkpoint(str(bad))


def test_tiny_checkpoint_maker_keeps_an_existing_folder(tmp_path):
    out = tmp_path / "m1"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    script = [sys.executable, str(ROOT / "scripts" / "tiny_baichuan_m1.py"), "--to", str(out)]
    r = subprocess.run(script, capture_output=True, text=True)
    assert r.returncode == 2 and "--overwrite" in r.stderr and (out / "keep.txt").read_text() == "mine"
    r = subprocess.run([*script, "--overwrite", "--seed", "1"], capture_output=True, text=True)
    assert r.returncode == 0 and not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["sliding_window_layers"] == [1, 3]


# --- the oracle: mlx-lm's Baichuan-M1 ---------------------------------------------------------------------
@mlx_needed
def test_logits_equal_mlx_lm_baichuan_m1(m1_dir, m1):
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_model

    oracle, _ = load_model(m1_dir)  # mlx_lm.models.baichuan_m1, NormHead normalised by its sanitize()
    ids = torch.randint(0, 257, (1, 29), generator=torch.Generator().manual_seed(1))  # 29 > window 6
    want = np.array(oracle(mx.array(ids.numpy()))[0])
    got = _logits(m1, ids)[0].numpy()
    assert np.abs(got - want).max() <= TOL
    assert np.abs(want).max() > 1  # not a degenerate model


@mlx_needed
def test_greedy_equals_mlx_lm_baichuan_m1_past_the_window(m1_dir, m1):
    """mlx-lm prefills the 23-token prompt 5 tokens at a time (a rotating KV cache for the sliding layers, its
    ArraysCache for the last raw K/V row) and decodes 24 tokens; kvshift's generate gives the same tokens."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    oracle, _ = load_model(m1_dir)
    ids = torch.randint(0, 257, (1, 23), generator=torch.Generator().manual_seed(2))
    want = [int(t) for t, _ in generate_step(mx.array(ids[0].numpy()), oracle, max_tokens=24,
                                             sampler=lambda x: mx.argmax(x, -1), prefill_step_size=5)]
    got = m1.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=256, eos_token_id=None)[0, 23:]
    assert got.tolist() == want


@mlx_needed
def test_reading_conv_index_0_as_the_current_token_breaks_the_oracle(m1_dir, tmp_path):
    """The mutation check of the index order: swap the columns and mlx-lm no longer agrees."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_model

    model = convert_checkpoint(str(m1_dir))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_shift.copy_(layer.self_attn.k_shift.flip(-1))
            layer.self_attn.v_shift.copy_(layer.self_attn.v_shift.flip(-1))
    oracle, _ = load_model(m1_dir)
    ids = torch.randint(0, 257, (1, 29), generator=torch.Generator().manual_seed(1))
    want = np.array(oracle(mx.array(ids.numpy()))[0])
    assert np.abs(_logits(model, ids)[0].numpy() - want).max() > 1e-2



def test_training_starts_from_a_baichuan_m1_folder_as_converted(m1_dir, m1):
    """`kvshift train --init-from <M1 folder>` starts from the converted model: its layer types, head counts and
    trained shift weights (not a fresh identity shift), computing what the conversion computes."""
    from kvshift.train.recipes import get_recipe
    from kvshift.train.retrofit import checkpoint_config, init_from_checkpoint, load_start_model

    assert checkpoint_config(str(m1_dir)).layer_types == m1.config.layer_types
    model, _ = load_start_model(init_from_checkpoint(get_recipe("tiny"), str(m1_dir)))
    assert torch.equal(model.model.layers[1].self_attn.k_shift.detach(), m1.model.layers[1].self_attn.k_shift)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(8))
    assert (_logits(model.eval(), ids) - _logits(m1, ids)).abs().max() <= 1e-5


def test_a_custom_tokenizer_class_is_copied_with_its_module(m1_dir, tmp_path):
    """Baichuan's tokenizer is remote code (tokenizer_config.json's auto_map names tokenization_baichuan.py): the
    conversion copies the module beside the tokenizer files, so AutoTokenizer(..., trust_remote_code=True) works."""
    import shutil

    src = tmp_path / "m1"
    shutil.copytree(m1_dir, src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]}
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    (src / "tokenization_baichuan.py").write_text("# Baichuan's tokenizer class\n")
    convert_checkpoint(str(src), tmp_path / "kv")
    assert (tmp_path / "kv" / "tokenization_baichuan.py").read_text() == "# Baichuan's tokenizer class\n"
    assert json.loads((tmp_path / "kv" / "tokenizer_config.json").read_text())["auto_map"] == cfg["auto_map"]


def test_retrofit_real_refuses_a_model_that_already_has_a_shift(m1_dir, tmp_path):
    from kvshift.experiments.retrofit_real import run_retrofit_real

    with pytest.raises(ValueError, match="--init-from .* Baichuan-M1"):
        run_retrofit_real(quick=True, out_dir=tmp_path / "out", model=str(m1_dir), data=str(tmp_path / "data"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_a_layer_count_changed_after_loading_is_refused_naming_layer_types(tmp_path):
    _model().save_pretrained(tmp_path / "m")
    from kvshift import KVShiftConfig

    config = KVShiftConfig.from_pretrained(tmp_path / "m", num_hidden_layers=6)  # transformers sets it after init
    with pytest.raises(ValueError, match="layer_types has 4 entries but num_hidden_layers is 6"):
        KVShiftForCausalLM(config)


FAKE_TOKENIZER = '''from transformers import PreTrainedTokenizerFast


class FakeBaichuanTokenizer(PreTrainedTokenizerFast):
    """A tokenizer class of the checkpoint's own, as Baichuan-M1's tokenization_baichuan.py is."""
'''


def test_generate_runs_a_remote_code_tokenizer_only_when_trusted(m1, tmp_path):
    """A converted real M1 keeps Baichuan's own tokenizer class: `kvshift generate` refuses to run its code,
    naming --trust-remote-code, and with the flag prints what the same model prints with a plain tokenizer."""
    plain, custom = tmp_path / "plain", tmp_path / "custom"
    for folder in (plain, custom):
        m1.save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
    cfg = json.loads((custom / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="FakeBaichuanTokenizer",
               auto_map={"AutoTokenizer": [None, "tokenization_fake_baichuan.FakeBaichuanTokenizer"]})
    (custom / "tokenizer_config.json").write_text(json.dumps(cfg))
    (custom / "tokenization_fake_baichuan.py").write_text(FAKE_TOKENIZER)
    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}

    def generate(folder, *flags):
        return subprocess.run([sys.executable, "-m", "kvshift", "generate", "--model", str(folder), "--prompt",
                               "def main(", "--max-new-tokens", "8", "--json", *flags], capture_output=True,
                              text=True, env=env, stdin=subprocess.DEVNULL, timeout=300)

    refused = generate(custom)
    assert refused.returncode == 2 and "--trust-remote-code" in refused.stderr
    want = generate(plain)
    got = generate(custom, "--trust-remote-code")
    assert want.returncode == 0 and got.returncode == 0, got.stderr[-2000:]
    assert json.loads(got.stdout)["completion"] == json.loads(want.stdout)["completion"]
