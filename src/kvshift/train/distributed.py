"""torch.distributed set-up for torchrun launches, and DDP / FSDP2 wrapping selected by config."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import TrainConfig

__all__ = ["DistInfo", "setup_distributed", "wrap_model", "fsdp_mixed_precision", "gradient_sync", "all_reduce_sum",
           "teardown"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> DistInfo:
    """Read torchrun's environment; initialise the process group when more than one process runs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available")
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        if cfg.distributed.strategy == "none":
            raise ValueError(
                f"launched with {world} processes but distributed.strategy=none; "
                "pass --set distributed.strategy=ddp (or fsdp)"
            )
        if not dist.is_initialized():
            backend = cfg.distributed.backend
            if backend == "auto":
                backend = "nccl" if want_cuda else "gloo"
            dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo) -> torch.nn.Module:
    """DDP or FSDP2 (``fully_shard`` per decoder layer, then the root) when running distributed."""
    if info.world_size == 1 or cfg.distributed.strategy == "none":
        return model
    if cfg.distributed.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    mp = fsdp_mixed_precision(cfg, info.device)
    kw = {} if mp is None else {"mp_policy": mp}
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def fsdp_mixed_precision(cfg: TrainConfig, device: torch.device):
    """FSDP2's ``MixedPrecisionPolicy`` for a bf16 run (``dtype`` bfloat16, or auto on CUDA): parameters
    all-gathered and computed in bf16, gradients reduce-scattered in fp32 (without it FSDP2 moves fp32 both
    ways: twice the bytes); None for an fp32 run. The fp32 master weights and optimizer state stay sharded."""
    if not (cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient communication on (the last accumulation micro-step) or off (the others): FSDP2's
    ``set_requires_gradient_sync`` (FSDP2 has no ``no_sync``, so it reduce-scattered on every micro-step),
    DDP's ``no_sync``; a no-op for an unwrapped model."""
    if enabled or not (hasattr(model, "set_requires_gradient_sync") or hasattr(model, "no_sync")):
        yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
