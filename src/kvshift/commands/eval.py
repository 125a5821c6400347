"""`kvshift eval`: evaluate a saved model directory with lm-evaluation-harness (its `hf` model, kvshift registered)."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
from pathlib import Path

__all__ = ["add_arguments", "run", "evaluate"]


def _batch_size(value: str):
    if value == "auto" or value.startswith("auto:"):
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch size must be a positive int or 'auto', got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"batch size must be positive, got {n}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory with its tokenizer (kvshift or any Hugging Face causal LM)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (globs allowed)")
    parser.add_argument("--include-path", default=None, metavar="DIR",
                        help="extra directory of task YAML files (default: none)")
    parser.add_argument("--batch-size", type=_batch_size, default=1, help="int or 'auto' (default 1)")
    parser.add_argument("--limit", type=float, default=None,
                        help="at most this many examples per task (a fraction if < 1; for testing; default: all)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype of the model weights (default: auto, the checkpoint's)")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="results JSON (default: DIR/eval_results.json)")
    parser.add_argument("--log-samples", action="store_true", help="keep per-example outputs in the JSON (default: off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of python/numpy/torch and few-shot sampling (default: %(default)s)")
    parser.add_argument("--bootstrap-iters", type=int, default=1000,
                        help="bootstrap iterations for standard errors (0 = none; default: %(default)s)")


def evaluate(
    model_dir: str | Path,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    batch_size: int | str = 1,
    limit: float | None = None,
    device: str | None = None,
    dtype: str = "auto",
    num_fewshot: int | None = None,
    log_samples: bool = False,
    seed: int = 0,
    bootstrap_iters: int = 1000,
) -> dict:
    """Run lm-eval's ``simple_evaluate`` with ``model="hf"`` on a validated model directory."""
    from ..models.loading import check_model_dir

    check_model_dir(model_dir)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ValueError(f"kvshift eval needs lm-evaluation-harness: pip install 'lm-eval[hf]' ({err})") from err
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path} is not a directory")
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ValueError("no task given")
    manager = None
    if include_path is not None:  # indexing only the given directory is much faster than all built-in tasks
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            manager = local
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if not manager.match_tasks([t]) and not Path(t).is_file()]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; list them with `lm_eval ls tasks`"
                         + ("" if include_path else " or pass --include-path for your own task YAMLs"))
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    limit_arg = int(limit) if limit is not None and limit >= 1 else limit
    from ..paths import hub_errors, offline_if_unreachable

    offline = (f"task(s) {','.join(tasks)} need their datasets from the Hugging Face Hub, which could not be "
               "reached (offline, and not in the local datasets cache); run once with network access to cache "
               "them, or pass --include-path with local task YAMLs")
    with offline_if_unreachable(), _quiet_git_hash(), hub_errors("tasks", ",".join(tasks), offline_message=offline,
                                                                 only_offline=True):
        loaded = _load_tasks(manager, tasks)  # datasets first: an unreachable task fails before the model loads
        results = _simple_evaluate(lm_eval, model_dir, dtype, loaded, num_fewshot, batch_size, device, limit_arg,
                                   manager, log_samples, bootstrap_iters, seed)
    if results is None:  # not rank 0 of a distributed run
        return {}
    if not log_samples:
        results.pop("samples", None)
    return results


def _load_tasks(manager, tasks: list[str]) -> list:
    """lm-eval's task and group objects for ``tasks``, their datasets loaded (from the Hub or its cache), to
    hand to ``simple_evaluate``, which would otherwise load the model before the tasks. An lm-eval without
    ``TaskManager.load`` gets the names back (it then loads the model first)."""
    if not hasattr(manager, "load"):
        return tasks
    loaded = manager.load(tasks)
    groups = list(loaded["groups"].values())
    nested = {sub.name for g in groups for sub in g.get_all_groups()}
    grouped = {t.task_name for g in groups for t in g.get_all_tasks()}
    return [g for g in groups if g.name not in nested] + [t for name, t in loaded["tasks"].items()
                                                          if name not in grouped]


def _check_output(path: Path) -> None:
    """Fail before any work when the results JSON could not be written."""
    if path.is_dir():
        raise ValueError(f"--output {path} is a directory; give a file path such as {path / 'eval_results.json'}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--output {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {path}: the directory {parent} is not writable")


def _simple_evaluate(lm_eval, model_dir, dtype, tasks, num_fewshot, batch_size, device, limit_arg, manager,
                     log_samples, bootstrap_iters, seed):
    return lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype, "backend": "causal"},
        tasks=tasks,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit_arg,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


@contextlib.contextmanager
def _quiet_git_hash():
    """lm-eval records ``git describe`` of the working directory and lets git print ``fatal: not a git
    repository`` outside one; ask git quietly instead (same value, None outside a repository)."""
    import lm_eval.evaluator as evaluator

    def git_hash():
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() or None if out.returncode == 0 else None

    original = getattr(evaluator, "get_git_commit_hash", None)
    evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        if original is not None:
            evaluator.get_git_commit_hash = original


def _write_json(path: Path, obj) -> None:
    from lm_eval.utils import handle_non_serializable

    from ..report import atomic_write_json

    atomic_write_json(path, obj, default=handle_non_serializable, strict=False)


def run(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else Path(args.model) / "eval_results.json"
    _check_output(output)
    results = evaluate(
        args.model, args.tasks.split(","), include_path=args.include_path, batch_size=args.batch_size,
        limit=args.limit, device=args.device, dtype=args.dtype, num_fewshot=args.num_fewshot,
        log_samples=args.log_samples, seed=args.seed, bootstrap_iters=args.bootstrap_iters,
    )
    if not results:
        return 0
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    _write_json(output, results)
    print(f"results written to {output}")
    return 0
