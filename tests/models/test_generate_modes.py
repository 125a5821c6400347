"""generate() in every common mode equals the recompute-everything reference (greedy, beams, sampling, static cache)."""

from __future__ import annotations

import json

import pytest
import torch
from builders import left_pad, tiny_model
from transformers import CompileConfig

import kvshift.models.cache as kv_cache

TOL = 1e-4
GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
CONFIGS = {"mha": dict(num_key_value_heads=4), "gqa": dict(num_key_value_heads=2)}


def recompute_greedy(model, ids, n, mask=None):
    """The reference: one full forward pass (no cache) over the whole sequence for every new token."""
    mask = torch.ones_like(ids) if mask is None else mask
    steps = []
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            last = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
        steps.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, torch.stack(steps, dim=1)


def generate_with_logits(model, ids, **kw):
    out = model.generate(ids, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, dim=1)


# --- greedy -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_recompute_loop(name):
    m = tiny_model(**CONFIGS[name])
    ids = torch.randint(3, 97, (2, 6))
    seq, step_logits = generate_with_logits(m, ids, max_new_tokens=10, **GREEDY)
    ref_seq, ref_logits = recompute_greedy(m, ids, 10)
    assert torch.equal(seq, ref_seq)
    assert (step_logits - ref_logits).abs().max() <= TOL


def test_greedy_left_padded_batch_equals_recompute_loop_and_single():
    m = tiny_model()
    seqs = [torch.randint(3, 97, (n,)) for n in (9, 3, 6)]
    ids, mask = left_pad(seqs)
    seq, step_logits = generate_with_logits(m, ids, attention_mask=mask, max_new_tokens=8, **GREEDY)
    ref_seq, ref_logits = recompute_greedy(m, ids, 8, mask)
    assert torch.equal(seq, ref_seq)
    assert (step_logits - ref_logits).abs().max() <= TOL
    for i, s in enumerate(seqs):
        single, _ = recompute_greedy(m, s[None], 8)
        assert torch.equal(seq[i, ids.shape[1]:], single[0, len(s):])


# --- beam search --------------------------------------------------------------------------------------
def beams(model, ids, **kw):
    out = model.generate(ids, num_beams=3, num_return_sequences=3, output_scores=True,
                         return_dict_in_generate=True, max_new_tokens=10, **GREEDY, **kw)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_beam_search_equals_recompute(name):
    m = tiny_model(**CONFIGS[name])
    ids = torch.randint(3, 97, (2, 5))
    cached = beams(m, ids)
    ref = beams(m, ids, use_cache=False)  # recomputes the full forward pass at every step
    assert cached.sequences.shape == (6, 15)
    assert torch.equal(cached.sequences, ref.sequences)
    assert (cached.sequences_scores - ref.sequences_scores).abs().max() <= TOL
    # the beams really were reordered, so the test exercises the cache reordering
    assert (cached.beam_indices[:, :-1] != torch.arange(6)[:, None]).any()


def test_beam_search_needs_the_raw_state_reordered(monkeypatch):
    """Without moving the raw last k/v on reorder, cached beam search diverges from the reference."""
    m = tiny_model()
    ids = torch.randint(3, 97, (2, 5))
    ref = beams(m, ids, use_cache=False)
    monkeypatch.setattr(kv_cache.KVShiftStateMixin, "_map_shift", lambda self, fn: None)
    broken = beams(m, ids)
    assert not torch.equal(broken.sequences, ref.sequences) or \
        (broken.sequences_scores - ref.sequences_scores).abs().max() > TOL


def test_beam_search_left_padded_batch_equals_single():
    m = tiny_model()
    seqs = [torch.randint(3, 97, (n,)) for n in (7, 4)]
    ids, mask = left_pad(seqs)
    out = beams(m, ids, attention_mask=mask)
    for i, s in enumerate(seqs):
        single = beams(m, s[None])
        assert torch.equal(out.sequences[3 * i:3 * i + 3, ids.shape[1]:], single.sequences[:, len(s):])
        assert (out.sequences_scores[3 * i:3 * i + 3] - single.sequences_scores).abs().max() <= TOL


# --- sampling -----------------------------------------------------------------------------------------
SAMPLING = [dict(top_k=10, temperature=0.7), dict(top_p=0.8), dict(top_k=20, top_p=0.9, temperature=1.3)]


@pytest.mark.parametrize("kw", SAMPLING, ids=["top_k_temperature", "top_p", "all"])
def test_seeded_sampling_is_reproducible_and_equals_recompute(kw):
    m = tiny_model()
    ids = torch.randint(3, 97, (2, 5))

    def sample(seed, **extra):
        torch.manual_seed(seed)
        return m.generate(ids, do_sample=True, max_new_tokens=12, pad_token_id=0, eos_token_id=None,
                          num_return_sequences=2, output_logits=True, return_dict_in_generate=True, **kw, **extra)

    a, b, ref = sample(7), sample(7), sample(7, use_cache=False)
    assert a.sequences.shape == (4, 17)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.sequences, ref.sequences)
    assert (torch.stack(a.logits) - torch.stack(ref.logits)).abs().max() <= TOL
    others = [sample(s).sequences for s in (8, 9)]
    assert any(not torch.equal(o, a.sequences) for o in others)


def test_sampling_left_padded_batch_equals_recompute():
    m = tiny_model()
    ids, mask = left_pad([torch.randint(3, 97, (n,)) for n in (8, 3)])

    def sample(**extra):
        torch.manual_seed(3)
        return m.generate(ids, attention_mask=mask, do_sample=True, top_k=15, temperature=0.9,
                          max_new_tokens=10, pad_token_id=0, eos_token_id=None, **extra)

    assert torch.equal(sample(), sample(use_cache=False))


# --- stopping -----------------------------------------------------------------------------------------
def test_stops_on_eos_and_pads_finished_rows():
    m = tiny_model()
    ids = torch.randint(3, 97, (2, 5))
    free = m.generate(ids, max_new_tokens=12, **GREEDY)
    new = free[:, 5:]
    # pick as EOS a token that row 0 emits (at its first occurrence k) and that row 1 emits later or never
    candidates = [int(t) for t in new[0].unique() if int(t) != 0]
    eos = min(candidates, key=lambda t: int((new[0] == t).nonzero()[0]))
    k0 = int((new[0] == eos).nonzero()[0])
    out = m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert out[0, 5 + k0] == eos
    assert torch.equal(out[0, :6 + k0], free[0, :6 + k0])
    assert (out[0, 6 + k0:] == 0).all()  # finished row padded with pad_token_id
    hits1 = (new[1] == eos).nonzero()
    k1 = int(hits1[0]) if len(hits1) else 11
    assert out.shape[1] == 5 + max(k0, k1) + 1
    assert torch.equal(out[1, :6 + k1], free[1, :6 + k1])


@pytest.mark.parametrize("n", [1, 2, 7])
def test_max_new_tokens(n):
    m = tiny_model()
    ids = torch.randint(3, 97, (2, 4))
    out = m.generate(ids, max_new_tokens=n, **GREEDY)
    assert out.shape == (2, 4 + n)
    assert torch.equal(out, recompute_greedy(m, ids, n)[0])
    assert m.generate(ids, max_length=9, **GREEDY).shape == (2, 9)


# --- static cache and torch.compile -------------------------------------------------------------------
@pytest.mark.parametrize("variant", [{}, {"sliding_window": 4}], ids=["full", "sliding_window"])
def test_static_cache_equals_dynamic(variant):
    m = tiny_model(**variant)
    ids, mask = left_pad([torch.randint(3, 97, (n,)) for n in (7, 4)])
    kw = dict(attention_mask=mask, max_new_tokens=9, **GREEDY)
    seq, step_logits = generate_with_logits(m, ids, cache_implementation="static", **kw)
    ref_seq, ref_logits = recompute_greedy(m, ids, 9, mask)
    assert torch.equal(seq, ref_seq)
    assert (step_logits - ref_logits).abs().max() <= TOL
    static_beams = beams(m, ids, attention_mask=mask, cache_implementation="static")
    ref_beams = beams(m, ids, attention_mask=mask, use_cache=False)
    assert torch.equal(static_beams.sequences, ref_beams.sequences)
    # no padding: the prefill runs without a mask over the whole static cache
    ids = torch.randint(3, 97, (2, 6))
    seq, step_logits = generate_with_logits(m, ids, cache_implementation="static", max_new_tokens=9, **GREEDY)
    ref_seq, ref_logits = recompute_greedy(m, ids, 9)
    assert torch.equal(seq, ref_seq)
    assert (step_logits - ref_logits).abs().max() <= TOL


def _compiled_generate(backend: str):
    m = tiny_model()
    ids, mask = left_pad([torch.randint(3, 97, (n,)) for n in (6, 4)])
    kw = dict(attention_mask=mask, max_new_tokens=8, **GREEDY)
    ref = recompute_greedy(m, ids, 8, mask)[0]
    m.generation_config.compile_config = CompileConfig(
        fullgraph=True, backend=backend, mode="default" if backend == "inductor" else None
    )
    m.generation_config.compile_config._compile_all_devices = True  # Hugging Face compiles on GPUs only by default
    torch._dynamo.reset()
    out = m.generate(ids, cache_implementation="static", **kw)
    assert hasattr(m, "_compiled_call")  # the decode steps ran through torch.compile
    assert torch.equal(out, ref)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_static_cache_with_torch_compile_fullgraph(backend):
    """generate()'s own compiled decode step, fullgraph (no graph break); inductor takes ~10-25 s on 2 CPU cores."""
    _compiled_generate(backend)


# --- kvshift generate CLI -----------------------------------------------------------------------------
def test_generate_cli(tmp_path, capsys):
    from test_hf_auto import make_tokenizer, save_tiny
    from transformers import AutoModelForCausalLM

    from kvshift.cli import main

    save_tiny(tmp_path / "m")
    tok = make_tokenizer()
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    prompts = ["the cat sat", "hello world, hello kv"]
    argv = ["generate", "--model", str(tmp_path / "m"), "--max-new-tokens", "6", "--device", "cpu"]
    for p in prompts:
        argv += ["--prompt", p]
    expected = []
    for p in prompts:  # each prompt alone (the CLI pads the batch on the left)
        enc = tok(p, return_tensors="pt")
        ref = lm.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
        expected.append(tok.decode(ref[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    assert main(argv + ["--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [{"prompt": p, "completion": c} for p, c in zip(prompts, expected, strict=True)]
    assert main(argv) == 0
    assert capsys.readouterr().out == "".join(p + c + "\n" for p, c in zip(prompts, expected, strict=True))
    # sampling and beams run and are seeded
    samp = argv[:7] + ["--prompt", "the cat", "--do-sample", "--top-k", "5", "--temperature", "0.8", "--seed", "1"]
    assert main(samp + ["--json"]) == 0 and main(samp + ["--json"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second
    assert main(argv[:7] + ["--prompt", "the cat", "--num-beams", "3"]) == 0
    # bad input: exit code 2 with a message
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a model directory" in capsys.readouterr().err
