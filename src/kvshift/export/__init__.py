"""Exports of kvshift checkpoints to other runtimes: :func:`export_mlx` writes an mlx-lm model folder."""

from .mlx import export_mlx

__all__ = ["export_mlx"]
