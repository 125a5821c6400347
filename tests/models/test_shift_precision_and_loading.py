"""Shift weights stay fp32 in every load path and learn in bf16 models; saved folders load with
trust_remote_code in a fresh process; kvshift's optimizer groups for any trainer; GGUF input errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from builders import tiny_model
from transformers import AutoModelForCausalLM

import kvshift
from kvshift import KVShiftForCausalLM

SHIFT = ("k_shift", "v_shift")


def _shift_dtypes(model) -> set:
    return {p.dtype for n, p in model.named_parameters() if n.endswith(SHIFT)}


def _other_dtypes(model) -> set:
    return {p.dtype for n, p in model.named_parameters() if not n.endswith(SHIFT)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "m"
    tiny_model(seed=0).save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shift_weights_stay_fp32_in_every_load_path(saved, dtype):
    for loader in (AutoModelForCausalLM.from_pretrained, KVShiftForCausalLM.from_pretrained):
        model = loader(saved, dtype=dtype)
        assert _shift_dtypes(model) == {torch.float32} and _other_dtypes(model) == {dtype}
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    ref = KVShiftForCausalLM.from_pretrained(saved).eval()
    low = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype).eval()
    with torch.no_grad():
        out = low(ids).logits
    assert out.dtype == dtype and (out.float() - ref(ids).logits).abs().max() < 0.1
    assert torch.equal(low.generate(ids, max_new_tokens=4, do_sample=False)[:, :6], ids)


def test_bf16_model_current_token_weight_learns(saved):
    """A bf16 current-token weight of 1 cannot take a 1e-4 step; kept fp32, it does."""
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    shift = [p for n, p in model.named_parameters() if n.endswith(SHIFT)]
    for p in shift:
        with torch.no_grad():
            p.copy_(torch.tensor([1.0, 0.0]).expand_as(p))
        p.requires_grad_(True)
    opt = torch.optim.AdamW(shift, lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all((p[:, 0] != 1.0).all() for p in shift)


def test_convert_bf16_keeps_shift_fp32(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvshift.models.convert import convert_checkpoint

    src = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2))
    model = convert_checkpoint(src, tmp_path / "kv", dtype="bfloat16")
    assert _shift_dtypes(model) == {torch.float32} and _other_dtypes(model) == {torch.bfloat16}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "kv")  # dtype auto: the saved bf16
    assert _shift_dtypes(loaded) == {torch.float32} and _other_dtypes(loaded) == {torch.bfloat16}


def _fresh(code: str, *, hide_kvshift: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter that has not imported kvshift (or cannot: ``hide_kvshift``)."""
    prelude = textwrap.dedent("""
        import sys, importlib.abc
        class _Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "kvshift" or name.startswith("kvshift."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
        sys.meta_path.insert(0, _Hide())
    """) if hide_kvshift else ""
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_saved_folder_loads_with_trust_remote_code_in_a_fresh_process(saved):
    assert (saved / "kvshift_auto.py").is_file()
    ids = [[1, 5, 9, 2, 7]]
    expected = KVShiftForCausalLM.from_pretrained(saved).eval()(torch.tensor(ids)).logits
    torch.save(expected, saved.parent / "expected.pt")
    run = _fresh(f"""
        import sys, torch
        assert "kvshift" not in sys.modules
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True).eval()
        out = m(torch.tensor({ids})).logits
        ref = torch.load({str(saved.parent / 'expected.pt')!r})
        print(type(m).__name__, float((out - ref).abs().max()))
    """)
    assert run.returncode == 0, run.stderr[-2000:]
    name, diff = run.stdout.split()[-2:]
    assert name == "KVShiftForCausalLM" and float(diff) <= 1e-6


def test_without_kvshift_the_error_says_to_install_it(saved):
    run = _fresh(f"""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True)
    """, hide_kvshift=True)
    assert run.returncode != 0
    assert "kvshift" in run.stderr.splitlines()[-1] and "install" in run.stderr.splitlines()[-1].lower()


def test_in_memory_config_has_no_auto_map_and_round_trips(saved):
    model = KVShiftForCausalLM.from_pretrained(saved)
    assert not hasattr(model.config, "auto_map")
    assert model.config.to_dict() == KVShiftForCausalLM.from_pretrained(saved).config.to_dict()


def test_optimizer_param_groups_in_a_plain_loop():
    model = tiny_model(seed=0)
    groups = kvshift.optimizer_param_groups(model, lr=1e-3, weight_decay=0.1, shift_lr_mult=10)
    by = {g["name"]: g for g in groups}
    shift_ids = {id(p) for n, p in model.named_parameters() if n.endswith(SHIFT)}
    assert {id(p) for p in by["kv_shift"]["params"]} == shift_ids
    assert by["kv_shift"]["weight_decay"] == 0.0 and by["kv_shift"]["lr"] == pytest.approx(1e-2)
    assert by["decay"]["weight_decay"] == 0.1 and by["decay"]["lr"] == 1e-3 and by["no_decay"]["weight_decay"] == 0
    # decay acts on matrices only: with zero gradients, one step leaves the shift weights where they are
    opt = torch.optim.AdamW(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (p.dim() >= 2 and not n.endswith(SHIFT)), n
    with pytest.raises(ValueError, match="shift_lr_mult"):
        kvshift.optimizer_param_groups(model, lr=1e-3, shift_lr_mult=0)


def test_optimizer_param_groups_with_hf_trainer(tmp_path):
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Rows(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    model = tiny_model(seed=0)
    for p in [p for n, p in model.named_parameters() if n.endswith(SHIFT)]:
        with torch.no_grad():
            p.copy_(torch.tensor([1.0, 0.0]).expand_as(p))
    groups = kvshift.optimizer_param_groups(model, lr=1e-3, weight_decay=0.5, shift_lr_mult=10)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                             report_to=[], save_strategy="no", use_cpu=True, lr_scheduler_type="constant",
                             logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), optimizers=(torch.optim.AdamW(groups), None))
    trainer.train()
    by = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert by["kv_shift"]["weight_decay"] == 0.0 and by["decay"]["weight_decay"] == 0.5
    assert by["kv_shift"]["lr"] == pytest.approx(10 * by["decay"]["lr"])
    # Trainer's default optimizer would have decayed the shift weights: its own grouping puts them in decay
    from transformers.trainer_pt_utils import get_parameter_names

    default_decay = get_parameter_names(model, [torch.nn.LayerNorm], ["bias", "layernorm", "rmsnorm"])
    assert any(n.endswith("k_shift") for n in default_decay)


def test_gguf_errors_are_one_line(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    from kvshift.cli import main
    from kvshift.models.gguf import check_gguf

    with pytest.raises(FileNotFoundError, match="no such file"):
        check_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "foo.gguf"
    writer = gguf.GGUFWriter(str(bad), "madeup-arch")
    writer.add_tensor("w", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'madeup-arch' cannot be loaded"):
        check_gguf(bad)
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        check_gguf(not_gguf)
    import gguf.quants

    monkeypatch.setattr(gguf.quants, "_type_traits", {})  # a gguf build that cannot dequantise Q4_1
    # the real fixture holds Q4_1 tensors (without it, the paths above are what is checked)
    from kvshift.experiments.retrofit_real import default_model

    if default_model():
        with pytest.raises(ValueError, match="tensor type Q4_1 cannot be dequantised"):
            check_gguf(default_model())
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "gguf", None)  # the package is missing
    assert main(["convert", "--from", str(bad), "--to", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"pip install 'kvshift\[gguf\]'"):
        check_gguf(bad)
