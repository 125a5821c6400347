"""Decode state of KV shifting kept beside any Hugging Face cache layer.

The KV cache itself holds the *shifted* (and rotated) keys and values, exactly as in vanilla attention.
KV shifting needs one more thing per layer and sequence: the raw (pre-shift) key and value of the
latest token, the predecessor of the next token fed to the model (``shift_k`` / ``shift_v``
``[B, 1, H_kv, D]``). The lab's other mixers keep, in ``conv_state[name]``, the raw last ``window - 1``
rows of each mixed projection (``"q"``, ``"k"``, ``"v"``: ``[B, window - 1, heads, D]``, oldest first)
and the smear its previous embedding (``"smear"``, on layer 0): the state grows only where a variant
needs it. This module grafts that state onto the cache layers of whatever cache the caller uses
(``DynamicCache``, ``StaticCache``, sliding, quantized...) by switching each layer object to a subclass
that also moves the state on beam reorder, batch expansion/selection, crop (speculative rollback) and
reset.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

__all__ = ["KVShiftStateMixin", "kv_shift_layer_state", "last_rows"]

_CLASSES: dict[type, type] = {}


def last_rows(old: torch.Tensor | None, x: torch.Tensor, n: int, pad_mask: torch.Tensor | None = None,
              reset_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The last ``n`` raw rows ``[B, n, ...]`` (oldest first) before the next token: of ``old`` ``[B, n, ...]``
    (zeros when None) followed by the chunk ``x`` ``[B, T, ...]``, skipping padding and every row before the
    chunk's last document start; zeros where fewer than ``n`` such rows exist."""
    B, T = x.shape[:2]
    if old is None:
        old = x.new_zeros(B, n, *x.shape[2:])
    rows = torch.cat([old.to(x.dtype), x], dim=1)  # [B, n + T, ...]
    if pad_mask is None and reset_mask is None:
        return rows[:, -n:].clone()
    real = torch.ones(B, T, dtype=torch.bool, device=x.device) if pad_mask is None else pad_mask.to(torch.bool)
    if reset_mask is not None:  # rows of an earlier document are no predecessors
        seg = reset_mask.to(torch.bool).long().cumsum(-1)
        real = real & (seg == seg[:, -1:])
        old_ok = (seg[:, -1:] == 0).expand(B, n)
    else:
        old_ok = torch.ones(B, n, dtype=torch.bool, device=x.device)
    valid = torch.cat([old_ok, real], dim=1)  # [B, n + T]
    rank = valid.long().cumsum(-1)  # 1-based rank of each valid row
    target = rank[:, -1:] - torch.arange(n - 1, -1, -1, device=x.device)  # [B, n]: ranks wanted, oldest first
    match = (rank[:, None, :] == target[:, :, None]) & valid[:, None, :]  # [B, n, n + T]
    idx = match.long().argmax(-1)  # [B, n]
    picked = rows[torch.arange(B, device=x.device)[:, None], idx]  # [B, n, ...]
    has = match.any(-1).view(B, n, *([1] * (x.dim() - 2)))
    return torch.where(has, picked, torch.zeros((), dtype=x.dtype, device=x.device))


class KVShiftStateMixin:
    """Adds ``shift_k``/``shift_v`` ``[B, W, H_kv, D]`` (raw k/v of the last W tokens) to a cache layer.

    Only the last row is the predecessor of the next token. While ``record_past`` is set (assisted
    generation), every row since the last crop is kept so that a rollback can restore the predecessor
    of the last accepted token.
    """

    shift_k: torch.Tensor | None = None
    shift_v: torch.Tensor | None = None
    # the lab's mixers ({"q", "k", "v", "smear"} -> raw rows [B, n, ...], oldest first): the last n = window - 1
    # rows, or, while recording for a rollback, every row since the last crop after n leading ones
    conv_state: dict[str, torch.Tensor] | None = None
    conv_keep: dict[str, int] | None = None  # n per mixer

    def conv_rows(self, name: str) -> torch.Tensor | None:
        """The last ``window - 1`` raw rows of mixer ``name`` (None before the first chunk)."""
        if not self.conv_state or name not in self.conv_state:
            return None
        return self.conv_state[name][:, -self.conv_keep[name]:]

    def push_conv_rows(self, rows: dict[str, torch.Tensor], n: int, pad_mask: torch.Tensor | None = None,
                       reset_mask: torch.Tensor | None = None) -> None:
        """Record the raw rows ``[B, T, ...]`` of a chunk for every mixer in ``rows`` (window ``n + 1``)."""
        state = dict(self.conv_state or {})
        self.conv_keep = {**(self.conv_keep or {}), **{name: n for name in rows}}
        for name, x in rows.items():
            x = x.detach()
            old = state.get(name)
            if old is not None and old.shape[0] != x.shape[0]:
                raise ValueError(f"cache holds KV-shift state for batch size {old.shape[0]}, got a batch of "
                                 f"{x.shape[0]}")
            if self.record_past:  # every row, padding zeroed (assisted decoding runs one unpadded sequence)
                if pad_mask is not None:
                    x = x * pad_mask.to(x.dtype).view(*pad_mask.shape, *([1] * (x.dim() - 2)))
                head = old if old is not None else x.new_zeros(x.shape[0], n, *x.shape[2:])
                state[name] = torch.cat([head, x], dim=1)
            else:
                state[name] = last_rows(None if old is None else old[:, -n:], x, n, pad_mask, reset_mask)
        self.conv_state = state

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

    def _map_shift(self, fn, conv_fn=None) -> None:
        """Apply ``fn`` to every state tensor (``conv_fn(tensor, n)`` to the mixers' rows, when given)."""
        if self.shift_k is not None:
            self.shift_k, self.shift_v = fn(self.shift_k), fn(self.shift_v)
        if self.conv_state:
            self.conv_state = {k: conv_fn(t, self.conv_keep[k]) if conv_fn else fn(t)
                               for k, t in self.conv_state.items()}


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
            if tokens_to_remove < 0:
                n = -tokens_to_remove
                held = []
                if self.shift_k is not None:
                    held.append(self.shift_k.shape[1] - 1)
                if self.conv_state:
                    held += [t.shape[1] - self.conv_keep[k] for k, t in self.conv_state.items()]
                if held and n > min(held):
                    raise RuntimeError(
                        f"cannot roll back {n} token(s): the KV-shift state keeps the raw k/v of only "
                        f"{min(held)} token(s) before the latest one; call "
                        "cache.activate_past_recording() before generating candidates to roll back"
                    )
                self._map_shift(lambda t: t[:, :-n])
            super().crop(tokens_to_remove)  # the base layer rejects positive (legacy) counts
            self._map_shift(lambda t: t[:, -1:], lambda t, n: t[:, -n:])

        def reset(self) -> None:
            super().reset()
            self.shift_k = self.shift_v = None
            self.conv_state = self.conv_keep = None

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
        layer.conv_state = layer.conv_keep = None
        layer.record_past = bool(getattr(layer, "record_past", False))
    return layer
