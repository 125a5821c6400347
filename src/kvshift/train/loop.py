"""The training loop, top to bottom: data, model, optimizer, steps, evaluation, logging, checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..layers.attention import is_shift_parameter
from ..models import KVShiftConfig, KVShiftForCausalLM
from ..report import apply_umask, atomic_write_text
from .checkpoint import list_checkpoints, load_checkpoint, run_dir_of, save_checkpoint, set_rng_state
from .config import TrainConfig, config_to_dict
from .distributed import DistInfo, all_reduce_sum, gradient_sync, setup_distributed, teardown, wrap_model
from .optim import build_optimizer, lr_factor

__all__ = ["train", "TrainingDiverged", "TrainingInterrupted", "load_datasets", "build_model_for_data", "evaluate"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped the run after a step; ``checkpoint`` holds that step."""

    def __init__(self, message: str, step: int, checkpoint: Path | None, run_dir: Path) -> None:
        super().__init__(message)
        self.step, self.checkpoint, self.run_dir = step, checkpoint, run_dir


class _StopRequests:
    """While training: the first SIGINT / SIGTERM asks the loop to finish its step, save a checkpoint and
    stop; a second one aborts at once (KeyboardInterrupt). Handlers are installed only in the main thread
    and restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool) -> None:
        self.announce = announce
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            self._restore()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self.announce:
            print(f"\n{self.requested}: finishing this step and saving a checkpoint (send it again to stop at "
                  "once, without saving)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


def load_datasets(cfg: TrainConfig):
    """``(train, val)`` datasets for ``cfg.data``."""
    if cfg.data.source == "stdlib-bytes":
        from ..data.bytes import stdlib_byte_corpus

        return (stdlib_byte_corpus("train", cfg.data.byte_files), stdlib_byte_corpus("val", cfg.data.byte_files))
    from ..data.packing import TokenDataset

    path = Path(cfg.data.path)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(
            f"data.path {path} is not a prepared data folder (no meta.json); run "
            f"`kvshift data prepare --source stdlib --out {path}` first, or use --set data.source=stdlib-bytes"
        )
    return TokenDataset(path, "train"), TokenDataset(path, "val")


def attention_for_device(attn_implementation: str, device_type: str) -> str:
    """``model.attn_implementation="auto"``: FlexAttention on CUDA (packed rows get a block-sparse document
    mask, never a dense one), SDPA elsewhere (FlexAttention has no backward on CPU in torch 2.13)."""
    if attn_implementation != "auto":
        return attn_implementation
    return "flex_attention" if device_type == "cuda" else "sdpa"


def build_model_for_data(cfg: TrainConfig, vocab_size: int, eos_id: int | None,
                         device_type: str = "cpu") -> KVShiftForCausalLM:
    """The model of ``cfg.model`` (fields named as in :class:`KVShiftConfig`, which owns them) for this
    data: vocabulary, context length and EOS (which also pads; no BOS) from the data; inference defaults
    (``use_cache``) saved, as the trainer passes ``use_cache=False`` itself."""
    fields = dataclasses.asdict(cfg.model)
    if fields.pop("init_from"):
        raise ValueError("build_model_for_data builds a model from scratch; model.init_from is set (use "
                         "kvshift.train.retrofit.load_start_model)")
    if fields["kv_shift_init"] == "auto":  # from scratch: the paper's init
        fields["kv_shift_init"] = "paper"
    fields["attn_implementation"] = attention_for_device(fields["attn_implementation"], device_type)
    vocab = fields.pop("vocab_size") or vocab_size
    if vocab < vocab_size:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the data's vocabulary ({vocab_size} ids)")
    # pad_token_id stays None in the model config: it becomes the embedding's padding_idx, whose row gets
    # no gradient, and EOS (which pads at generation time) is a real token of the training stream
    config = KVShiftConfig(**fields, vocab_size=vocab, max_position_embeddings=cfg.data.seq_len,
                           bos_token_id=None, eos_token_id=eos_id, pad_token_id=None, use_cache=True)
    torch.manual_seed(cfg.seed)
    model = KVShiftForCausalLM(config)
    model.generation_config.pad_token_id = eos_id  # generate() pads with EOS, as the saved tokenizer does
    return model


def _nll_sum(model, batch, device, autocast) -> tuple[torch.Tensor, int]:
    ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    # Decided on the host copy of the batch (no device sync, no data-dependent branch in the model): a
    # batch in which no document starts inside a row is plain causal attention, so the model gets no
    # position_ids and builds no mask (SDPA's is_causal / flash path); only packed batches pass them.
    pos = batch["position_ids"]
    packed = bool((pos[:, 1:] == 0).any())
    pos = pos.to(device, non_blocking=True) if packed else None
    with autocast():
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def validation_set(dataset, cfg: TrainConfig, final: bool = True) -> dict:
    """The rows a validation pass scores and what they cover (see :func:`kvshift.data.validation_rows`)."""
    from ..data.packing import documents_covered, validation_rows

    budget = cfg.validation_budget(final)
    rows = validation_rows(dataset, cfg.data.seq_len, budget, seed=cfg.seed)
    docs = documents_covered(dataset, rows)
    keys = dataset.doc_keys() if hasattr(dataset, "doc_keys") else None
    return {"rows": rows, "mode": "whole split" if budget == 0 or budget >= len(dataset) - 1 else "sample",
            "budget_tokens": budget, "split_tokens": len(dataset), "split_docs": dataset.num_docs,
            "docs_covered": len(docs), "doc_keys": [keys[d] for d in docs] if keys else docs}


@torch.no_grad()
def evaluate(model, dataset, cfg: TrainConfig, info: DistInfo, autocast, final: bool = True,
             val_set: dict | None = None) -> dict:
    """Validation loss (nats per target token) and bits per byte (the target tokens' UTF-8 bytes) over the
    val set of ``cfg.data`` (the whole split by default); ``final=False`` uses ``val_curve_tokens``."""
    from ..data.packing import validation_batches

    val_set = val_set if val_set is not None else validation_set(dataset, cfg, final)
    byte_len = dataset.token_byte_lengths() if hasattr(dataset, "token_byte_lengths") else None
    byte_len = torch.from_numpy(byte_len) if byte_len is not None else None
    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=info.device)  # nats, targets, bytes
    # FSDP gathers parameters collectively in every forward: every rank must run as many (filler batches
    # score nothing), or the ranks with more batches wait for ever
    sharded = info.world_size > 1 and cfg.distributed.strategy == "fsdp"
    for batch in validation_batches(dataset, cfg.data.val_batch_size, val_set["rows"], rank=info.rank,
                                    world_size=info.world_size, equal_counts=sharded):
        nll, count = _nll_sum(model, batch, info.device, autocast)
        labels = batch["labels"]
        nbytes = float(byte_len[labels[labels != -100]].sum()) if byte_len is not None else 0.0
        total += torch.tensor([float(nll), count, nbytes], dtype=torch.float64, device=info.device)
    model.train()
    all_reduce_sum(total, info)
    loss = float(total[0] / total[1].clamp(min=1))
    if byte_len is not None and float(total[2]) > 0:
        bpb = float(total[0]) / math.log(2) / float(total[2])
    else:  # no per-token byte table: the split's average bytes per token
        split = dataset.meta.get("splits", {}).get(dataset.split, {})
        bytes_per_token = split.get("text_bytes", 0) / max(1, split.get("tokens", 1))
        bpb = loss / math.log(2) / bytes_per_token if bytes_per_token > 0 else float("nan")
    return {"val_loss": loss, "val_bpb": bpb, "val_tokens": int(total[1]), "val_bytes": int(total[2]),
            "val_docs": val_set["docs_covered"], "val_mode": val_set["mode"]}


class _Logger:
    """stdout + JSONL (+ TensorBoard) metrics on the main process."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.file = open(out / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def log(self, step: int, metrics: dict, echo: bool = False) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if echo:
            print(f"step {step}: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in metrics.items()), file=sys.stderr)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _prepare_out(out: Path, resuming: bool, info: DistInfo) -> None:
    """Create the run folder. A new run needs a new or empty folder: a folder holding anything (another
    run, a data folder) is refused, nothing in it touched."""
    if info.is_main:
        if not resuming and out.exists():
            if not out.is_dir():
                raise FileExistsError(f"--out {out} exists and is not a folder")
            entries = sorted(p.name for p in out.iterdir())
            if entries:
                if list_checkpoints(out):
                    hint = f"it holds a run with checkpoints: pass --resume {out} to continue it"
                elif (out / "metrics.jsonl").exists() or (out / "summary.json").exists():
                    hint = "it holds an earlier run without checkpoints"
                else:
                    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
                    hint = f"it is not a run folder (it holds {shown})"
                raise FileExistsError(f"--out {out} is not empty; {hint}. Choose a new or empty folder "
                                      "(nothing was written)")
        out.mkdir(parents=True, exist_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows a killed run logged after the checkpoint it resumes from (and a torn last line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(row.get("step", 0)) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _save_final(model, out: Path, state: dict, data_dir: Path | None, tokenizer=None) -> Path:
    """``out/final``: the model with inference defaults and its tokenizer, usable by ``kvshift generate``
    and ``AutoTokenizer`` (``tokenizer``: a pretrained checkpoint's own; else the data's, or the raw-byte
    tokenizer when ``data_dir`` is None), written to a temp folder and renamed."""
    from ..data.tokenizer import model_tokenizer

    final, tmp = out / "final", out / f".tmp-final-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state)
    (tokenizer if tokenizer is not None else model_tokenizer(data_dir)).save_pretrained(tmp)
    apply_umask(tmp)  # safetensors >= 0.8 writes model.safetensors private (0600)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _kept_line(out: Path, cfg: TrainConfig) -> str:
    """What a stopped run leaves behind, for its one-line message."""
    kept = list_checkpoints(out)
    if kept:
        step = json.loads((kept[-1] / "trainer_state.json").read_text())["step"]
        return f"the last good checkpoint is {kept[-1]} (step {step})"
    due = f"the first was due at step {cfg.ckpt_every}" if cfg.ckpt_every else "ckpt_every=0"
    return f"no checkpoint was written ({due})"


def train(cfg: TrainConfig, out_dir: str | os.PathLike, resume: str | os.PathLike | None = None) -> dict:
    """Train per ``cfg``; write config, metrics, checkpoints and ``final/`` under ``out_dir``.

    ``resume``: a run folder, its ``checkpoints`` folder or one ``step_*`` folder to continue from.
    Returns a summary with the losses of every step of this process (``losses``) and the final
    validation metrics. Raises :class:`TrainingDiverged` on a non-finite loss and
    :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) after saving a checkpoint when SIGINT or
    SIGTERM arrives. Nothing is created under ``out_dir`` until the config, the data and the model are
    known to be valid.
    """
    cfg.validate()
    info = setup_distributed(cfg)
    out = Path(out_dir)
    if resume is not None and out.resolve() == Path(resume).resolve():
        out = run_dir_of(resume)  # resuming "from DIR into DIR" with DIR a checkpoint: continue its run
    resumed = load_checkpoint(resume) if resume is not None else None
    if resumed is not None and int(resumed[2]["step"]) >= cfg.steps:
        return _already_finished(resumed, cfg, info)
    if cfg.threads and info.device.type == "cpu":
        torch.set_num_threads(cfg.threads)

    train_ds, val_ds = load_datasets(cfg)
    attn = attention_for_device(cfg.model.attn_implementation, info.device.type)
    if attn == "flex_attention" and info.device.type == "cpu":
        raise ValueError("model.attn_implementation=flex_attention cannot train on CPU (FlexAttention has no "
                         "backward on CPU in torch 2.13); use sdpa or auto")
    tokenizer = None
    if cfg.model.init_from:  # a pretrained checkpoint: its architecture, weights and tokenizer
        from .retrofit import check_data_tokenizer, checkpoint_config, load_start_model, source_tokenizer

        ckpt_config = checkpoint_config(cfg.model.init_from)
        tokenizer = source_tokenizer(cfg.model.init_from)
        check_data_tokenizer(cfg, train_ds, tokenizer, ckpt_config.vocab_size)
        if cfg.data.seq_len > ckpt_config.max_position_embeddings:
            raise ValueError(f"data.seq_len={cfg.data.seq_len} is longer than --init-from's context "
                             f"(max_position_embeddings {ckpt_config.max_position_embeddings})")
        base, _ = load_start_model(cfg, info.device.type)
    else:
        base = build_model_for_data(cfg, train_ds.vocab_size, train_ds.eos_id, info.device.type)
    base = base.to(info.device)
    for name, p in base.named_parameters():  # the shift scalars stay fp32 whatever the compute dtype
        if is_shift_parameter(name):
            p.data = p.data.float()
    from .retrofit import apply_trainable

    trainee, n_trainable, n_total = apply_trainable(base, cfg)
    model = wrap_model(trainee, cfg, info)
    optimizer = build_optimizer(model, cfg.optim)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    same_run = resumed is not None and run_dir_of(resumed[3]).resolve() == out.resolve()
    _prepare_out(out, same_run, info)

    start_step = 0
    if resumed is not None:
        model_state, optim_payload, saved, folder = resumed
        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, optim_payload["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        set_rng_state(optim_payload["rng"])
        start_step = int(saved["step"])
        del resumed, model_state, optim_payload
        if info.is_main:
            _truncate_metrics(out / "metrics.jsonl", start_step)
            print(f"resumed from {folder} at step {start_step}", file=sys.stderr)

    from ..data.packing import PackedBatches

    batches = PackedBatches(train_ds, cfg.data.batch_size, cfg.data.seq_len, seed=cfg.seed, rank=info.rank,
                            world_size=info.world_size, start_step=start_step * cfg.data.grad_accum)
    data_iter = iter(batches)
    if cfg.compile:
        model = torch.compile(model)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and info.device.type == "cuda")

    def autocast():
        if use_bf16:
            return torch.autocast(info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if info.is_main:
        atomic_write_text(out / "config.json", json.dumps(config_to_dict(cfg), indent=2))
    logger = _Logger(out, info.is_main, cfg.tensorboard)
    rows_per_step = cfg.data.batch_size * cfg.data.grad_accum * info.world_size
    tokens_per_step = rows_per_step * cfg.data.seq_len
    if info.is_main:
        start = f"--init-from {cfg.model.init_from}" if cfg.model.init_from else "from scratch"
        print(f"{cfg.name}: {start}, kv_shift={cfg.model.kv_shift}; trainable parameters: {n_trainable:,} of "
              f"{n_total:,} (optim.trainable={cfg.optim.trainable})", file=sys.stderr)
        print(f"{cfg.name}: global batch {rows_per_step} rows x {cfg.data.seq_len} tokens = {tokens_per_step} "
              f"tokens per step ({cfg.data.batch_size} rows x {cfg.data.grad_accum} accumulation x "
              f"{info.world_size} process{'es' if info.world_size > 1 else ''}); {cfg.steps} steps, "
              f"checkpoint every {cfg.ckpt_every or cfg.steps} -> {out}", file=sys.stderr)
    end_step = cfg.steps if not cfg.stop_after else min(cfg.steps, start_step + cfg.stop_after)
    bar = None
    if info.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.name, unit="step", file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)

    def trainer_state(step: int) -> dict:
        return {"step": step, "data": batches.state_dict(), "config": config_to_dict(cfg),
                "tokens": step * tokens_per_step}

    def checkpoint(step: int) -> Path:
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
        if info.is_main:
            return save_checkpoint(out, step, msd, osd, trainer_state(step), keep=cfg.keep_checkpoints)
        return out / "checkpoints" / f"step_{step:07d}"

    losses: list[float] = []
    last_eval: dict = {}
    curve_set = None
    t0 = time.perf_counter()
    model.train()
    stop = _StopRequests(announce=info.is_main)
    try:
        with stop:
            for step in range(start_step, end_step):
                for g in optimizer.param_groups:
                    g["lr"] = cfg.optim.lr * g["lr_mult"] * lr_factor(step, cfg.steps, cfg.optim)
                micro = [next(data_iter) for _ in range(cfg.data.grad_accum)]
                count = torch.tensor(float(sum(int((b["labels"] != -100).sum()) for b in micro)),
                                     device=info.device)
                count = float(all_reduce_sum(count, info))  # normalise by the global token count of the step
                total = torch.zeros((), dtype=torch.float64, device=info.device)
                for i, mb in enumerate(micro):
                    with gradient_sync(model, i == len(micro) - 1):
                        nll, _ = _nll_sum(model, mb, info.device, autocast)
                        (nll * info.world_size / count).backward()  # DDP / FSDP average over ranks
                    total += nll.detach().double()
                loss = float(all_reduce_sum(total, info)) / count
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"non-finite loss ({loss}) at step {step + 1}; stopped before the optimizer step; "
                        f"{_kept_line(out, cfg)}. Lower optim.lr or check the data"
                    )
                gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                             cfg.optim.grad_clip or float("inf")))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss)
                done = step + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if done % cfg.log_every == 0 or done == end_step:
                    elapsed = time.perf_counter() - t0
                    logger.log(done, {"loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": gnorm,
                                      "tokens": done * tokens_per_step,
                                      "tokens_per_s": (done - start_step) * tokens_per_step / max(elapsed, 1e-9)})
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    final_eval = done == cfg.steps
                    if final_eval or curve_set is None:
                        curve_set = validation_set(val_ds, cfg, final=final_eval)
                    last_eval = evaluate(model, val_ds, cfg, info, autocast, val_set=curve_set)
                    logger.log(done, last_eval, echo=info.is_main and not cfg.progress)
                saved_now = (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == end_step
                if saved_now:
                    kept = checkpoint(done)
                requested = stop.requested is not None
                if info.world_size > 1:  # every rank stops at the same step (the checkpoint is collective)
                    flag = torch.tensor(float(requested), device=info.device)
                    requested = float(all_reduce_sum(flag, info)) > 0
                if requested and done < end_step:
                    kept = kept if saved_now else checkpoint(done)
                    raise TrainingInterrupted(
                        f"stopped by {stop.requested or 'a signal on another rank'} after step {done}; checkpoint "
                        f"saved to {kept}; continue with `kvshift train --resume {out}`", done, kept, out)
    finally:
        if bar is not None:
            bar.close()
        logger.close()

    previous = _read_summary(out) if start_step > 0 else {}
    summary = {"steps": end_step, "losses": losses,
               "final_loss": losses[-1] if losses else previous.get("final_loss"),
               "tokens": end_step * tokens_per_step, "seconds": time.perf_counter() - t0, **last_eval}
    if curve_set is not None:  # which documents and how many tokens the last validation scored
        summary["validation"] = {k: v for k, v in curve_set.items() if k != "rows"}
    if end_step == cfg.steps:
        if cfg.optim.trainable == "lora":  # the final model is saved with LoRA merged into its weights
            from .retrofit import merged_model

            base = merged_model(trainee)
            state = base.state_dict()
        else:
            state = get_model_state_dict(model, options=opts)
        if info.is_main:
            data_dir = Path(cfg.data.path) if cfg.data.source == "prepared" else None
            summary["final_dir"] = str(_save_final(base, out, state, data_dir, tokenizer))
    if info.is_main:
        atomic_write_text(out / "summary.json",
                          json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    teardown()
    return summary


def _read_summary(out: Path) -> dict:
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _already_finished(resumed: tuple, cfg: TrainConfig, info: DistInfo) -> dict:
    """``--resume`` of a run that reached ``cfg.steps``: change nothing, return its summary."""
    folder, step = resumed[3], int(resumed[2]["step"])
    summary = _read_summary(run_dir_of(folder))
    if info.is_main:
        print(f"{run_dir_of(folder)} already finished ({step} of {cfg.steps} steps); nothing to do, nothing "
              f"rewritten (pass --set steps=N with N > {step} to train longer)", file=sys.stderr)
    teardown()
    return {**summary, "steps": summary.get("steps", step), "losses": []}
