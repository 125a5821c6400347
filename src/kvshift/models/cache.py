"""Decode state of KV shifting kept beside any Hugging Face cache layer.

The KV cache itself holds the *shifted* (and rotated) keys and values, exactly as in vanilla attention.
KV shifting needs one more thing per layer and sequence: the raw (pre-shift) key and value of the
latest token, the predecessor of the next token fed to the model. This module grafts that state onto
the cache layers of whatever cache the caller uses (``DynamicCache``, ``StaticCache``, sliding,
quantized...) by switching each layer object to a subclass that also moves the state on beam reorder,
batch expansion/selection, crop (speculative rollback) and reset.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

__all__ = ["KVShiftStateMixin", "kv_shift_layer_state"]

_CLASSES: dict[type, type] = {}


class KVShiftStateMixin:
    """Adds ``shift_k``/``shift_v`` ``[B, W, H_kv, D]`` (raw k/v of the last W tokens) to a cache layer.

    Only the last row is the predecessor of the next token. While ``record_past`` is set (assisted
    generation), every row since the last crop is kept so that a rollback can restore the predecessor
    of the last accepted token.
    """

    shift_k: torch.Tensor | None = None
    shift_v: torch.Tensor | None = None

    # --- state access -------------------------------------------------------------------------------
    def shift_last(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Raw k/v ``[B, 1, H_kv, D]`` of the latest token, no copy (None before the first chunk)."""
        if self.shift_k is None:
            return None, None
        if self.shift_k.shape[1] == 1:
            return self.shift_k, self.shift_v
        return self.shift_k[:, -1:], self.shift_v[:, -1:]

    def push_shift_state(
        self, raw_k: torch.Tensor, raw_v: torch.Tensor, pad_mask: torch.Tensor | None = None
    ) -> None:
        """Record the raw k/v ``[B, T, H_kv, D]`` of a chunk just fed to the model."""
        if self.shift_k is not None and self.shift_k.shape[0] != raw_k.shape[0]:
            raise ValueError(
                f"cache holds KV-shift state for batch size {self.shift_k.shape[0]}, got a batch of {raw_k.shape[0]}"
            )
        if raw_k.requires_grad or raw_v.requires_grad:
            raw_k, raw_v = raw_k.detach(), raw_v.detach()
        if self.record_past:
            new_k, new_v = raw_k, raw_v
            if self.shift_k is not None:
                new_k = torch.cat([self.shift_k, new_k], dim=1)
                new_v = torch.cat([self.shift_v, new_v], dim=1)
            self.shift_k, self.shift_v = new_k, new_v
            return
        if pad_mask is None:
            # a copy of the last row, so the state does not keep a long chunk's projections alive
            last_k, last_v = (raw_k, raw_v) if raw_k.shape[1] == 1 else (raw_k[:, -1:].clone(), raw_v[:, -1:].clone())
        elif raw_k.shape[1] == 1 and self.shift_k is not None:  # decode step: keep the old state under a pad
            real = pad_mask.to(torch.bool).view(-1, 1, 1, 1)
            old_k, old_v = self.shift_last()
            last_k, last_v = torch.where(real, raw_k, old_k), torch.where(real, raw_v, old_v)
        else:
            # The predecessor of the next token is each row's last *real* token (right padding), or the
            # previous state when the chunk holds no real token for that row (long left padding).
            T = raw_k.shape[1]
            real = pad_mask.to(torch.bool)
            idx = (real.long() * torch.arange(1, T + 1, device=real.device)).argmax(dim=1)  # [B]
            rows = torch.arange(raw_k.shape[0], device=raw_k.device)
            last_k, last_v = raw_k[rows, idx][:, None], raw_v[rows, idx][:, None]
            has_real = real.any(dim=1)[:, None, None, None]
            old_k = self.shift_k[:, -1:] if self.shift_k is not None else torch.zeros_like(last_k)
            old_v = self.shift_v[:, -1:] if self.shift_v is not None else torch.zeros_like(last_v)
            last_k = torch.where(has_real, last_k, old_k)
            last_v = torch.where(has_real, last_v, old_v)
        if getattr(self, "is_compileable", False) and self.shift_k is not None and self.shift_k.shape == last_k.shape:
            # a static cache keeps its state tensors: a compiled decode step mutates its inputs instead of
            # returning new Python attributes (no side effects to replay after every step)
            self.shift_k.copy_(last_k)
            self.shift_v.copy_(last_v)
        else:
            self.shift_k, self.shift_v = last_k, last_v
            if getattr(self, "is_compileable", False) and not torch.compiler.is_compiling():
                # fixed addresses, like the static cache's own tensors: CUDA graphs can replay over them
                torch._dynamo.mark_static_address(self.shift_k)
                torch._dynamo.mark_static_address(self.shift_v)

    def _map_shift(self, fn) -> None:
        if self.shift_k is not None:
            self.shift_k, self.shift_v = fn(self.shift_k), fn(self.shift_v)


def _state_class(layer_cls: type) -> type:
    """``layer_cls`` extended with the KV-shift state (the base stays first so instances can switch class)."""
    if layer_cls in _CLASSES:
        return _CLASSES[layer_cls]

    class _Layer(layer_cls, KVShiftStateMixin):
        _layer_type = None  # never replace the base class in Hugging Face's layer-type registry

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            super().reorder_cache(beam_idx)
            self._map_shift(lambda t: t.index_select(0, beam_idx.to(t.device)))

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            self._map_shift(lambda t: t.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            super().batch_select_indices(indices)
            self._map_shift(lambda t: t[indices])

        def crop(self, tokens_to_remove: int) -> None:
            if self.shift_k is not None and tokens_to_remove < 0:
                n = -tokens_to_remove
                if n >= self.shift_k.shape[1]:
                    raise RuntimeError(
                        f"cannot roll back {n} token(s): the KV-shift state keeps the raw k/v of only "
                        f"{self.shift_k.shape[1] - 1} token(s) before the latest one; call "
                        "cache.activate_past_recording() before generating candidates to roll back"
                    )
                self._map_shift(lambda t: t[:, :-n])
            super().crop(tokens_to_remove)  # the base layer rejects positive (legacy) counts
            self._map_shift(lambda t: t[:, -1:])

        def reset(self) -> None:
            super().reset()
            self.shift_k = self.shift_v = None

        def activate_past_recording(self) -> None:
            self.record_past = True
            parent = getattr(super(), "activate_past_recording", None)
            if parent is not None:
                parent()

        @property
        def is_croppable(self) -> bool:  # a rollback is exact only if the raw rows were recorded
            return bool(self.record_past)

        def offload(self):
            super().offload()
            self._map_shift(lambda t: t.to("cpu", non_blocking=True))

        def prefetch(self):
            super().prefetch()
            device = getattr(self, "device", None)
            if device is not None:
                self._map_shift(lambda t: t.to(device, non_blocking=True))

    _Layer.__name__ = _Layer.__qualname__ = f"KVShift{layer_cls.__name__}"
    _CLASSES[layer_cls] = _Layer
    return _Layer


def kv_shift_layer_state(cache: Cache, layer_idx: int) -> KVShiftStateMixin:
    """The cache layer ``layer_idx`` of ``cache``, upgraded (once, in place) to carry the KV-shift state."""
    cache = getattr(cache, "self_attention_cache", cache)
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(cache.layers) <= layer_idx:
            cache.layers.append(cache.layer_class_to_replicate())
    if layer_idx >= len(cache.layers):
        raise ValueError(f"cache has {len(cache.layers)} layers, the model needs layer {layer_idx}")
    layer = cache.layers[layer_idx]
    if not isinstance(layer, KVShiftStateMixin):
        layer.__class__ = _state_class(type(layer))
        layer.shift_k = layer.shift_v = None
        layer.record_past = bool(getattr(layer, "record_past", False))
    return layer
