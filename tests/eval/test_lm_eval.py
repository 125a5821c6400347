"""lm-evaluation-harness offline: padded batches score and generate like single examples; `kvshift eval` writes JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm_eval's HFLM imports it (the `lm-eval[hf]` extra)

LL_TASK, GEN_TASK = "kvshift_tiny_ll", "kvshift_tiny_gen"
CONTEXTS = ["the cat", "the cat sat on the mat and", "a quick brown fox", "hello", "hello world, hello kv shift",
            "induction heads copy", "the lazy dog jumps over the quick brown"]
TARGETS = [" sat", " the dog", " jumps over the lazy dog", " world, hello kv", " attention", " the token", " fox"]
NEVER = "@@never@@"  # a stop string the tiny model will not produce: every generation runs max_gen_toks


def write_tasks(task_dir) -> None:
    rows = [{"context": c, "continuation": t} for c, t in zip(CONTEXTS, TARGETS, strict=True)]
    data = task_dir / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
"""
    (task_dir / f"{LL_TASK}.yaml").write_text(f"""task: {LL_TASK}
output_type: loglikelihood
{common}metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (task_dir / f"{GEN_TASK}.yaml").write_text(f"""task: {GEN_TASK}
output_type: generate_until
{common}generation_kwargs:
  until: ["{NEVER}"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import datasets
    from lm_eval.tasks import TaskManager
    from test_hf_auto import save_tiny

    root = tmp_path_factory.mktemp("lm_eval")
    save_tiny(root / "model", seed=1)
    (root / "tasks").mkdir()
    write_tasks(root / "tasks")
    with pytest.MonkeyPatch.context() as mp:  # keep the json dataset cache inside the test directory
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(root / "datasets_cache"))
        yield {"root": root, "model": root / "model", "tasks": root / "tasks",
               "manager": TaskManager(include_path=str(root / "tasks"))}


def run_harness(setup, batch_size: int) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(setup["model"]), "backend": "causal", "dtype": "float32"},
        tasks=[LL_TASK, GEN_TASK], batch_size=batch_size, device="cpu", task_manager=setup["manager"],
        log_samples=True, bootstrap_iters=0,
    )


def by_doc(results: dict, task: str) -> dict[str, object]:
    return {s["doc"]["context"]: s["resps"][0][0] for s in results["samples"][task]}


@pytest.fixture(scope="module")
def harness_runs(setup):
    return {bs: run_harness(setup, bs) for bs in (4, 1)}


def test_loglikelihood_padded_batch_equals_single(setup, harness_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batched, single = by_doc(harness_runs[4], LL_TASK), by_doc(harness_runs[1], LL_TASK)
    assert set(batched) == set(CONTEXTS)
    model = AutoModelForCausalLM.from_pretrained(setup["model"])
    tok = AutoTokenizer.from_pretrained(setup["model"])
    for ctx, target in zip(CONTEXTS, TARGETS, strict=True):
        (ll_b, greedy_b), (ll_1, greedy_1) = batched[ctx], single[ctx]
        assert abs(ll_b - ll_1) <= 1e-4 and greedy_b == greedy_1
        # and both are the model's own log-likelihood of the continuation
        ctx_ids = tok(ctx).input_ids
        ids = tok(ctx + target).input_ids
        with torch.no_grad():
            logp = model(torch.tensor([ids]), use_cache=False).logits.log_softmax(-1)[0]
        ref = sum(logp[i - 1, ids[i]].item() for i in range(len(ctx_ids), len(ids)))
        assert abs(ll_1 - ref) <= 1e-4


def test_generate_until_left_padded_equals_unpadded(setup, harness_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batched, single = by_doc(harness_runs[4], GEN_TASK), by_doc(harness_runs[1], GEN_TASK)
    assert batched == single
    model = AutoModelForCausalLM.from_pretrained(setup["model"])
    tok = AutoTokenizer.from_pretrained(setup["model"])
    for ctx in CONTEXTS:  # each context alone, no padding, straight through generate()
        enc = tok(ctx, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, enc.input_ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id)]
        assert single[ctx] == tok.decode(new, skip_special_tokens=True)
    assert sum(len(s) for s in single.values()) > 0


def test_kvshift_eval_cli_writes_json(setup, capsys):
    from kvshift.cli import main

    out = setup["root"] / "results" / "eval.json"
    argv = ["eval", "--model", str(setup["model"]), "--tasks", f"{LL_TASK},{GEN_TASK}", "--include-path",
            str(setup["tasks"]), "--batch-size", "4", "--device", "cpu", "--limit", "5", "--output", str(out),
            "--bootstrap-iters", "0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert LL_TASK in printed and GEN_TASK in printed and str(out) in printed
    results = json.loads(out.read_text())
    assert set(results["results"]) == {LL_TASK, GEN_TASK}
    assert "acc,none" in results["results"][LL_TASK]
    assert results["n-samples"][LL_TASK]["effective"] == 5
    assert "samples" not in results
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # readable like any file written with open()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the model fails loudly: what must fail fast fails before it."""
    import transformers
    from lm_eval.models.huggingface import HFLM

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before a cheap check failed")

    monkeypatch.setattr(HFLM, "__init__", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def test_kvshift_eval_offline_builtin_task_is_one_line(setup, tmp_path, monkeypatch, capfd, no_model_load):
    """A built-in task needs its dataset from the Hub: offline that is one clear line, before the model is
    loaded, no traceback, and no `fatal: not a git repository` from lm-eval's git lookup outside a repository."""
    import datasets

    from kvshift.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.chdir(tmp_path)  # not a git repository
    rc = main(["eval", "--model", str(setup["model"]), "--tasks", "lambada_openai", "--device", "cpu",
               "--limit", "2", "--output", str(tmp_path / "r.json")])
    err = capfd.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("kvshift eval")]
    assert len(lines) == 1 and "lambada_openai" in lines[0] and "Hugging Face Hub" in lines[0]
    assert "Traceback" not in err and "fatal: not a git repository" not in err
    assert not (tmp_path / "r.json").exists()


def test_kvshift_eval_bad_input(setup, tmp_path, capsys):
    from test_hf_auto import save_tiny

    from kvshift.cli import main

    base = ["--tasks", LL_TASK, "--include-path", str(setup["tasks"]), "--device", "cpu"]
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--model", str(tmp_path / "empty"), *base]) == 2
    assert "not a model directory" in capsys.readouterr().err
    save_tiny(tmp_path / "small", vocab_size=97)  # the tokenizer has 300 tokens
    assert main(["eval", "--model", str(tmp_path / "small"), *base]) == 2
    err = capsys.readouterr().err
    assert "300" in err and "97" in err and "vocab" in err
    assert main(["eval", "--model", str(setup["model"]), "--tasks", "no_such_task_xyz", "--include-path",
                 str(setup["tasks"])]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
    assert not list(tmp_path.glob("**/eval_results.json"))


def test_kvshift_eval_unwritable_output_fails_before_the_model_loads(setup, tmp_path, capsys, no_model_load):
    from kvshift.cli import main

    base = ["eval", "--model", str(setup["model"]), "--tasks", LL_TASK, "--include-path", str(setup["tasks"]),
            "--device", "cpu"]
    (tmp_path / "a_file").write_text("")
    assert main([*base, "--output", str(tmp_path / "a_file" / "sub" / "r.json")]) == 2
    assert "--output" in (err := capsys.readouterr().err) and "a_file is a file" in err
    assert main([*base, "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_git_hash_lookup_is_quiet_outside_a_repository(tmp_path, monkeypatch, capfd):
    import lm_eval.evaluator as evaluator

    from kvshift.commands.eval import _quiet_git_hash

    monkeypatch.chdir(tmp_path)
    with _quiet_git_hash():
        assert evaluator.get_git_commit_hash() is None
    assert "fatal" not in capfd.readouterr().err
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    if (Path.cwd() / ".git").exists():
        with _quiet_git_hash():
            assert evaluator.get_git_commit_hash()
