"""Cached decoding equals the full forward pass: prefill+decode, chunked prefill, padding, generate()."""

from __future__ import annotations

import pytest
import torch
from builders import tiny_model
from transformers import DynamicCache

TOL = 1e-4
CONFIGS = {"mha": dict(num_key_value_heads=4), "gqa": dict(num_key_value_heads=2),
           "mqa": dict(num_key_value_heads=1), "post_rope": dict(kv_shift_position="post_rope"),
           "mixed_layers": dict(num_hidden_layers=3, kv_shift=[True, False, True])}


def full_logits(m, ids, mask=None):
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return m(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


def incremental_logits(m, ids, chunks, mask=None):
    """Feed ``ids`` in chunks of the given sizes through one cache."""
    cache = DynamicCache(config=m.config)
    outs, start = [], 0
    for size in chunks:
        end = start + size
        kwargs = {}
        if mask is not None:
            kwargs["attention_mask"] = mask[:, :end]
            kwargs["position_ids"] = (mask[:, :end].cumsum(-1) - 1).clamp(min=0)[:, start:end]
        with torch.no_grad():
            out = m(ids[:, start:end], past_key_values=cache, use_cache=True, **kwargs)
        outs.append(out.logits)
        start = end
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunks", [[6, 1, 1, 1, 1, 1, 1], [1] * 12, [3, 4, 5], [5, 1, 4, 2]])
def test_incremental_equals_full(name, chunks):
    m = tiny_model(**CONFIGS[name])
    ids = torch.randint(3, 97, (3, sum(chunks)))
    assert (incremental_logits(m, ids, chunks) - full_logits(m, ids)).abs().max() <= TOL


@pytest.mark.parametrize("name", ["mha", "gqa"])
@pytest.mark.parametrize("chunks", [[7, 1, 1, 1, 1], [4, 3, 1, 2, 1]])
def test_left_padded_batch_equals_unpadded(name, chunks):
    m = tiny_model(**CONFIGS[name])
    lens = [11, 6, 9]
    T = max(lens)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    seqs = [torch.randint(3, 97, (n,)) for n in lens]
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    inc = incremental_logits(m, ids, chunks, mask)
    full = full_logits(m, ids, mask)
    for i, s in enumerate(seqs):
        ref = full_logits(m, s[None])[0]
        assert (inc[i, T - len(s):] - ref).abs().max() <= TOL
        assert (full[i, T - len(s):] - ref).abs().max() <= TOL


def test_paper_snippet_bug_would_be_caught():
    """Caching the *mixed* last key (App. F) breaks the first decoded token: our state is raw."""
    m = tiny_model()
    ids = torch.randint(3, 97, (1, 8))
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(ids[:, :7], past_key_values=cache, use_cache=True)
        layer = cache.layers[0]
        attn = m.model.layers[0].self_attn
        h = m.model.layers[0].input_layernorm(m.model.embed_tokens(ids[:, :7]))
        raw_k = attn.k_proj(h).view(1, 7, attn.num_kv_heads, attn.head_dim)
    assert torch.allclose(layer.shift_k[:, -1], raw_k[:, -1], atol=1e-6)


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_generate_greedy_equals_recompute(name):
    m = tiny_model(**CONFIGS[name])
    ids = torch.randint(3, 97, (2, 5))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = m.generate(ids, use_cache=True, **kw)
    recomputed = m.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)
    # and the greedy path is what the full forward pass predicts at every step
    with torch.no_grad():
        logits = m(cached, use_cache=False).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), cached[:, 5:])


def test_generate_left_padded_equals_unpadded():
    m = tiny_model()
    seqs = [torch.randint(3, 97, (n,)) for n in (7, 3)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, 7 - len(s):] = s
        mask[i, 7 - len(s):] = 1
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = m.generate(ids, attention_mask=mask, **kw)
    for i, s in enumerate(seqs):
        single = m.generate(s[None], **kw)
        assert torch.equal(out[i, 7:], single[0, len(s):])


def test_generate_output_logits_equal_full_forward():
    m = tiny_model()
    ids = torch.randint(3, 97, (2, 6))
    out = m.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
                     output_logits=True, return_dict_in_generate=True)
    step_logits = torch.stack(out.logits, dim=1)  # [B, new, V]
    with torch.no_grad():
        full = m(out.sequences, use_cache=False).logits[:, 5:-1]
    assert (step_logits - full).abs().max() <= TOL


def test_cache_reorder_and_select_move_shift_state():
    m = tiny_model()
    ids = torch.randint(3, 97, (3, 6))
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(ids, past_key_values=cache, use_cache=True)
    before = cache.layers[0].shift_k.clone()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(cache.layers[0].shift_k, before[[2, 0, 1]])
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].shift_k.shape[0] == 6
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert torch.equal(cache.layers[0].shift_k, before[[2, 1]])


def test_speculative_rollback_restores_state():
    m = tiny_model()
    ids = torch.randint(3, 97, (1, 12))
    full = full_logits(m, ids)
    cache = DynamicCache(config=m.config)
    cache_ok = False
    with torch.no_grad():
        m(ids[:, :6], past_key_values=cache, use_cache=True)
        cache.activate_past_recording()
        draft = torch.cat([ids[:, 6:8], torch.randint(3, 97, (1, 3))], dim=1)  # 2 right, 3 wrong
        m(draft, past_key_values=cache, use_cache=True)
        cache.crop(-3)
        cache_ok = cache.get_seq_length() == 8
        out = m(ids[:, 8:], past_key_values=cache, use_cache=True).logits
    assert cache_ok
    assert (out - full[:, 8:]).abs().max() <= TOL


def test_rollback_without_recording_is_refused():
    m = tiny_model()
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(torch.randint(3, 97, (1, 6)), past_key_values=cache, use_cache=True)
    with pytest.raises(RuntimeError, match="roll back"):
        cache.crop(-2)


@torch.no_grad()
def test_state_after_prefill_does_not_keep_the_chunk_alive():
    """The decode state is one row per sequence, not a view into the prefill's projections."""
    m = tiny_model()
    out = m(torch.randint(3, 97, (2, 40)), use_cache=True)
    layer = out.past_key_values.layers[0]
    assert layer.shift_k.shape[1] == 1
    assert layer.shift_k.untyped_storage().nbytes() == layer.shift_k.numel() * layer.shift_k.element_size()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_decode_step_is_one_branch_free_path(compiled, monkeypatch):
    """A single-token step with a cache and position_ids takes the small decode path (kv_shift_step) in
    eager and compiled mode alike, and a document start at that step (position 0 after cached tokens)
    still resets: the token equals the same token run alone."""
    from kvshift.layers import attention as attn_mod

    real_rope = attn_mod.kv_shift_rope

    def no_single_tokens(x, *args, **kwargs):
        assert x.shape[1] > 1 or kwargs.get("prev") is None, "a decode step went through the general op"
        return real_rope(x, *args, **kwargs)

    monkeypatch.setattr(attn_mod, "kv_shift_rope", no_single_tokens)
    m = tiny_model()
    step = torch.compile(m, backend="eager", fullgraph=False) if compiled else m
    torch.manual_seed(1)
    doc_a, tok = torch.randint(3, 97, (2, 6)), torch.randint(3, 97, (2, 1))
    with torch.no_grad():
        cache = DynamicCache(config=m.config)
        m(doc_a, past_key_values=cache, use_cache=True)
        cont = step(tok, past_key_values=cache, use_cache=True,
                    position_ids=torch.full((2, 1), 6)).logits  # continues doc A
        cache = DynamicCache(config=m.config)
        m(doc_a, past_key_values=cache, use_cache=True)
        new_doc = step(tok, past_key_values=cache, use_cache=True,
                       position_ids=torch.zeros(2, 1, dtype=torch.long)).logits  # starts doc B
        whole = m(torch.cat([doc_a, tok], 1), use_cache=False).logits[:, -1:]
        alone = m(tok, use_cache=False).logits
    torch.testing.assert_close(cont, whole, rtol=TOL, atol=TOL)
    torch.testing.assert_close(new_doc, alone, rtol=TOL, atol=TOL)


def test_decode_step_reset_equals_the_op():
    from kvshift import kv_shift
    from kvshift.ops.kv_shift import kv_shift_step

    torch.manual_seed(0)
    x, prev, w = torch.randn(3, 1, 2, 4), torch.randn(3, 1, 2, 4), torch.randn(2, 2)
    reset = torch.tensor([[True], [False], [True]])
    torch.testing.assert_close(kv_shift_step(x, w, prev, reset),
                               kv_shift(x, w, prev=prev[:, 0], reset_mask=reset, backend="reference"))
    with pytest.raises(ValueError, match="reset_mask"):
        kv_shift_step(x, w, prev, reset[:2])


@pytest.mark.parametrize("parametrization", ["free", "gate", "clamp"])
@torch.no_grad()
def test_decode_sees_every_change_of_the_shift_weights(parametrization):
    """The decode step keeps the weights' columns between steps: an in-place edit, a new tensor, a
    load_state_dict or a dtype move must still reach the next step."""
    m = tiny_model(kv_shift_parametrization=parametrization)
    ids = torch.randint(3, 97, (2, 9))

    def cached_last():
        cache = DynamicCache(config=m.config)
        m(ids[:, :-1], past_key_values=cache, use_cache=True)
        return m(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]

    assert (cached_last() - m(ids, use_cache=False).logits[:, -1]).abs().max() <= TOL
    m.model.layers[0].self_attn.k_shift.mul_(-2.0)  # in place
    assert (cached_last() - m(ids, use_cache=False).logits[:, -1]).abs().max() <= TOL
    attn = m.model.layers[1].self_attn
    attn.k_shift.data = torch.randn_like(attn.k_shift)  # new storage
    assert (cached_last() - m(ids, use_cache=False).logits[:, -1]).abs().max() <= TOL
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["model.layers.1.self_attn.v_shift"].add_(0.5)
    m.load_state_dict(state)
    assert (cached_last() - m(ids, use_cache=False).logits[:, -1]).abs().max() <= TOL
    m.double()
    ids64 = ids
    cache = DynamicCache(config=m.config)
    m(ids64[:, :-1], past_key_values=cache, use_cache=True)
    out = m(ids64[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    assert out.dtype == torch.float64
    assert (out - m(ids64, use_cache=False).logits[:, -1]).abs().max() <= 1e-9
