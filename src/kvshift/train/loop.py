"""The training loop, top to bottom: data, model, optimizer, steps, evaluation, logging, checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
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
from .checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from .config import TrainConfig, config_to_dict
from .distributed import DistInfo, all_reduce_sum, setup_distributed, teardown, wrap_model
from .optim import build_optimizer, lr_factor

__all__ = ["train", "TrainingDiverged", "load_datasets", "build_model_for_data", "evaluate"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


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


def build_model_for_data(cfg: TrainConfig, vocab_size: int, eos_id: int | None) -> KVShiftForCausalLM:
    """The model of ``cfg.model`` (fields named as in :class:`KVShiftConfig`, which owns them) for this
    data: vocabulary, context length and EOS from the data; inference defaults (``use_cache``) saved, as
    the trainer passes ``use_cache=False`` itself."""
    fields = dataclasses.asdict(cfg.model)
    vocab = fields.pop("vocab_size") or vocab_size
    if vocab < vocab_size:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the data's vocabulary ({vocab_size} ids)")
    config = KVShiftConfig(**fields, vocab_size=vocab, max_position_embeddings=cfg.data.seq_len,
                           bos_token_id=None, eos_token_id=eos_id, pad_token_id=None, use_cache=True)
    torch.manual_seed(cfg.seed)
    return KVShiftForCausalLM(config)


def _nll_sum(model, batch, device, autocast) -> tuple[torch.Tensor, int]:
    ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    pos = batch["position_ids"].to(device, non_blocking=True)
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
    for batch in validation_batches(dataset, cfg.data.val_batch_size, val_set["rows"],
                                    rank=info.rank, world_size=info.world_size):
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
    if info.is_main:
        if not resuming and (out / "checkpoints").exists() and any((out / "checkpoints").glob("step_*")):
            raise FileExistsError(
                f"{out} already holds a run with checkpoints; pass --resume {out} to continue it, "
                "or choose another --out (nothing was overwritten)"
            )
        out.mkdir(parents=True, exist_ok=True)


def _save_final(model, cfg: TrainConfig, out: Path, state: dict, data_dir: Path | None) -> Path:
    final, tmp = out / "final", out / f".tmp-final-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state)
    if data_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (data_dir / name).exists():
                shutil.copy(data_dir / name, tmp / name)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def train(cfg: TrainConfig, out_dir: str | os.PathLike, resume: str | os.PathLike | None = None) -> dict:
    """Train per ``cfg``; write config, metrics, checkpoints and ``final/`` under ``out_dir``.

    Returns a summary with the losses of every step of this process (``losses``) and the final
    validation metrics. Raises :class:`TrainingDiverged` on a non-finite loss.
    """
    cfg.validate()
    info = setup_distributed(cfg)
    out = Path(out_dir)
    _prepare_out(out, resume is not None, info)
    if cfg.threads and info.device.type == "cpu":
        torch.set_num_threads(cfg.threads)

    train_ds, val_ds = load_datasets(cfg)
    base = build_model_for_data(cfg, train_ds.vocab_size, train_ds.eos_id).to(info.device)
    for name, p in base.named_parameters():  # the shift scalars stay fp32 whatever the compute dtype
        if is_shift_parameter(name):
            p.data = p.data.float()
    model = wrap_model(base, cfg, info)
    optimizer = build_optimizer(model, cfg.optim)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)

    start_step = 0
    if resume is not None:
        model_state, optim_payload, saved, folder = load_checkpoint(resume)
        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, optim_payload["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        set_rng_state(optim_payload["rng"])
        start_step = int(saved["step"])
        if info.is_main:
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
        (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    logger = _Logger(out, info.is_main, cfg.tensorboard)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.data.grad_accum * info.world_size
    end_step = cfg.steps if not cfg.stop_after else min(cfg.steps, start_step + cfg.stop_after)
    bar = None
    if info.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.name, unit="step", file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)

    def trainer_state(step: int) -> dict:
        return {"step": step, "data": batches.state_dict(), "config": config_to_dict(cfg),
                "tokens": step * tokens_per_step}

    def checkpoint(step: int) -> None:
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
        if info.is_main:
            save_checkpoint(out, step, msd, osd, trainer_state(step), keep=cfg.keep_checkpoints)

    losses: list[float] = []
    last_eval: dict = {}
    curve_set = None
    t0 = time.perf_counter()
    model.train()
    try:
        for step in range(start_step, end_step):
            for g in optimizer.param_groups:
                g["lr"] = cfg.optim.lr * g["lr_mult"] * lr_factor(step, cfg.steps, cfg.optim)
            micro = [next(data_iter) for _ in range(cfg.data.grad_accum)]
            count = torch.tensor(float(sum(int((b["labels"] != -100).sum()) for b in micro)), device=info.device)
            count = float(all_reduce_sum(count, info))  # normalise by the global token count of the step
            total = torch.zeros((), dtype=torch.float64, device=info.device)
            for i, mb in enumerate(micro):
                sync = i == len(micro) - 1 or not hasattr(model, "no_sync")
                with contextlib.nullcontext() if sync else model.no_sync():
                    nll, _ = _nll_sum(model, mb, info.device, autocast)
                    (nll * info.world_size / count).backward()  # DDP / FSDP average over ranks
                total += nll.detach().double()
            loss = float(all_reduce_sum(total, info)) / count
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"non-finite loss ({loss}) at step {step + 1}; stopped before the optimizer step. "
                    f"The last good checkpoint in {out / 'checkpoints'} is untouched; lower optim.lr or "
                    "check the data"
                )
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf")))
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
            if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == end_step:
                checkpoint(done)
    finally:
        if bar is not None:
            bar.close()
        logger.close()

    summary = {"steps": end_step, "losses": losses, "final_loss": losses[-1] if losses else None,
               "tokens": end_step * tokens_per_step, "seconds": time.perf_counter() - t0, **last_eval}
    if curve_set is not None:  # which documents and how many tokens the last validation scored
        summary["validation"] = {k: v for k, v in curve_set.items() if k != "rows"}
    if end_step == cfg.steps:
        state = get_model_state_dict(model, options=opts)
        if info.is_main:
            data_dir = Path(cfg.data.path) if cfg.data.source == "prepared" else None
            summary["final_dir"] = str(_save_final(base, cfg, out, state, data_dir))
    if info.is_main:
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    teardown()
    return summary
