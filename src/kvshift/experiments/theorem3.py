"""Theorem 3 / Fig. 2: the closed-form loss of one KV-shifting head, its landscape and gradient flow.

Setting (paper §3, App. C): the d -> infinity loss of predicting x_{i+1} at the end of a length-(T+1)
sequence whose last token repeats token i, as a function of the shift weights with
``alpha2 = 1 - alpha1`` and ``beta2 = 1 - beta1``, and the O(T) term held constant::

    S  = e^{alpha2} + 2 e^{alpha1} + O(T),   a1 = e^{alpha1} / S,   a2 = e^{alpha2} / S
    L  = -log( e^{a2 b1 + b2/S} / (e^{a2 b1 + b2/S} + 2 e^{b1/S + b2 a2} + e^{2 a1 b1 + a2 b2} + O(T)) )

(``a2*beta2`` in the last term; App. E's code has ``a2+beta2``, a typo). The induction solution is
``(alpha1, beta1) = (0, 1)``: key = previous token, value = current token.

:func:`run_theorem3` evaluates the loss on a grid over ``[0, 1]^2``, locates the minimum, and runs
projected gradient flow (autograd gradient, Euler steps clipped to the square) from random starts.
Gradient-flow paths do not depend on a constant time scale, so each O(T) uses a step of
``step_size / max |grad|`` (the largest grid gradient moves at most ``step_size`` per step).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..report import get_pyplot, markdown_table, mean_std, save_figure
from .common import ROW_COLUMNS, write_results

__all__ = ["gradient_flow", "run_theorem3", "theorem3_loss", "theorem3_grid"]

INDUCTION_SOLUTION = (0.0, 1.0)
COPY_SOLUTION = (1.0, 0.0)  # key and value on the current token: attention copies the current token
PLOT_STARTS = torch.tensor(
    [[0.15, 0.15], [0.5, 0.1], [0.9, 0.2], [0.9, 0.55], [0.85, 0.9], [0.5, 0.5], [0.2, 0.55], [0.45, 0.85]],
    dtype=torch.float64,
)  # fixed starts of the trajectories drawn in the figure


def theorem3_loss(alpha1: torch.Tensor | float, beta1: torch.Tensor | float, o_t: float) -> torch.Tensor:
    """Closed-form Theorem 3 loss at ``(alpha1, beta1)`` (broadcasting tensors) for a constant ``O(T) = o_t``."""
    a1_, b1 = torch.broadcast_tensors(
        torch.as_tensor(alpha1, dtype=torch.float64), torch.as_tensor(beta1, dtype=torch.float64)
    )
    a2_ = 1.0 - a1_
    b2 = 1.0 - b1
    S = torch.exp(a2_) + 2.0 * torch.exp(a1_) + o_t
    a1 = torch.exp(a1_) / S
    a2 = torch.exp(a2_) / S
    z_target = a2 * b1 + b2 / S  # logit of the correct token x_{i+1}
    terms = [z_target, math.log(2.0) + b1 / S + b2 * a2, 2.0 * a1 * b1 + a2 * b2]
    if o_t > 0:  # the O(T) remaining tokens, each with logit ~ 0
        terms.append(torch.full_like(z_target, math.log(o_t)))
    return torch.logsumexp(torch.stack(terms), dim=0) - z_target


def theorem3_grid(o_t: float, n: int = 101) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(alpha1, beta1, loss)`` on an ``n x n`` grid over ``[0, 1]^2`` (``ij`` indexing: alpha1 varies along dim 0)."""
    g = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    A, B = torch.meshgrid(g, g, indexing="ij")
    return A, B, theorem3_loss(A, B, o_t)


def _grad(points: torch.Tensor, o_t: float) -> torch.Tensor:
    p = points.detach().clone().requires_grad_(True)
    loss = theorem3_loss(p[:, 0], p[:, 1], o_t).sum()
    (g,) = torch.autograd.grad(loss, p)
    return g


def gradient_flow(
    starts: torch.Tensor, o_t: float, steps: int = 2000, step_size: float = 0.005, record_every: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Projected Euler gradient flow from ``starts`` ``[N, 2]`` (alpha1, beta1); returns ``(ends, path)``.

    The time step is ``step_size / max_grid |grad L|``. ``path`` is ``[steps // record_every + 1, N, 2]``
    when ``record_every > 0``, else None.
    """
    A, B, _ = theorem3_grid(o_t, 41)
    gmax = float(_grad(torch.stack([A.flatten(), B.flatten()], 1), o_t).norm(dim=1).max())
    dt = step_size / gmax
    x = starts.to(torch.float64).clone()
    path = [x.clone()] if record_every > 0 else None
    for s in range(1, steps + 1):
        x = (x - dt * _grad(x, o_t)).clamp(0.0, 1.0)
        if path is not None and s % record_every == 0:
            path.append(x.clone())
    return x, (torch.stack(path) if path is not None else None)


def _plot(out_path: Path, o_values: Sequence[float], flows: dict[float, torch.Tensor], grid_n: int) -> None:
    plt = get_pyplot()
    fig, axes = plt.subplots(1, len(o_values), figsize=(5.6 * len(o_values), 4.8))
    fig.subplots_adjust(wspace=0.45)
    for ax, o_t in zip(axes if len(o_values) > 1 else [axes], o_values, strict=True):
        A, B, L = theorem3_grid(o_t, grid_n)
        cs = ax.contourf(A.numpy(), B.numpy(), L.numpy(), levels=25, cmap="viridis")
        fig.colorbar(cs, ax=ax, shrink=0.85, label="loss")
        qa, qb, _ = theorem3_grid(o_t, 15)
        g = _grad(torch.stack([qa.flatten(), qb.flatten()], 1), o_t)
        d = -g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)  # direction of steepest descent
        ax.quiver(
            qa.flatten().numpy(),
            qb.flatten().numpy(),
            d[:, 0].numpy(),
            d[:, 1].numpy(),
            color="white",
            alpha=0.75,
            scale=22,
            width=0.004,
        )
        path = flows[o_t]
        for j in range(path.shape[1]):
            ax.plot(path[:, j, 0].numpy(), path[:, j, 1].numpy(), color="tab:red", lw=1.3)
            ax.plot(path[0, j, 0].item(), path[0, j, 1].item(), "o", color="tab:red", ms=3.5)
        ax.plot(*INDUCTION_SOLUTION, marker="*", color="gold", ms=16, mec="black", clip_on=False, zorder=5)
        ax.plot(*COPY_SOLUTION, marker="X", color="tab:orange", ms=10, mec="black", clip_on=False, zorder=5)
        ax.set_title(f"O(T) = {o_t:g}   (span {float(L.max() - L.min()):.3f})")
        ax.set_xlabel(r"$\alpha_1$ (key weight on current token)")
        ax.set_ylabel(r"$\beta_1$ (value weight on current token)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
    fig.suptitle(
        "Theorem 3: closed-form loss, descent directions (arrows) and gradient-flow paths (red); "
        "star: induction solution (0,1), X: copy-current corner (1,0)"
    )
    save_figure(fig, out_path)


def run_theorem3(
    quick: bool = False,
    seeds: int = 3,
    out_dir: str | os.PathLike = "runs/theorem3",
    *,
    o_values: Sequence[float] = (0.0, 10.0, 100.0),
    grid_n: int = 101,
    starts_per_seed: int | None = None,
    steps: int | None = None,
    step_size: float = 0.005,
    tol: float = 0.05,
    verbose: bool = False,
) -> dict[str, Any]:
    """Evaluate the Theorem 3 landscape and gradient flow; write results.json/.md, config.json, theorem3.png.

    Rows per O(T): loss at (0, 1), loss at (1, 0), loss span over the grid, and the fraction of random
    starts (uniform on the square, ``starts_per_seed`` per seed) whose flow ends within ``tol`` of
    (0, 1), as mean and std over ``seeds``. Returns the payload plus ``"markdown"``.
    """
    t0 = time.perf_counter()
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    starts_per_seed = starts_per_seed or (64 if quick else 256)
    steps = steps or (1500 if quick else 4000)
    config = {
        "experiment": "theorem3",
        "quick": quick,
        "seeds": seeds,
        "o_values": list(o_values),
        "grid_n": grid_n,
        "starts_per_seed": starts_per_seed,
        "steps": steps,
        "step_size": step_size,
        "tol": tol,
        "start_distribution": "uniform on [0,1]^2",
        "alpha2": "1 - alpha1",
        "beta2": "1 - beta1",
    }
    out = Path(out_dir)
    rows: list[dict[str, Any]] = []
    per_o: dict[str, Any] = {}
    flows: dict[float, torch.Tensor] = {}
    for o_t in o_values:
        A, B, L = theorem3_grid(o_t, grid_n)
        i = int(L.argmin())
        argmin = (float(A.flatten()[i]), float(B.flatten()[i]))
        l01 = float(theorem3_loss(0.0, 1.0, o_t))
        l10 = float(theorem3_loss(1.0, 0.0, o_t))
        span = float(L.max() - L.min())
        fractions, stuck, mean_dist = [], [], []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            starts = torch.rand(starts_per_seed, 2, generator=g, dtype=torch.float64)
            ends, _ = gradient_flow(starts, o_t, steps=steps, step_size=step_size)
            dist = (ends - torch.tensor(INDUCTION_SOLUTION, dtype=torch.float64)).norm(dim=1)
            fractions.append(float((dist <= tol).double().mean()))
            copy_corner = (ends - torch.tensor(COPY_SOLUTION, dtype=torch.float64)).norm(dim=1)
            stuck.append(float((copy_corner <= tol).double().mean()))
            mean_dist.append(float(dist.mean()))
        _, path = gradient_flow(
            PLOT_STARTS, o_t, steps=steps, step_size=step_size, record_every=max(1, steps // 200)
        )
        flows[o_t] = path
        name = f"closed form, O(T)={o_t:g}"
        base = {"model": name, "layers": 1, "kv_shift": True}
        rows.append({**base, "metric": "loss at (0,1)", "mean": l01, "std": 0.0, "seeds": 1})
        rows.append({**base, "metric": "loss at (1,0)", "mean": l10, "std": 0.0, "seeds": 1})
        rows.append({**base, "metric": "loss span over grid", "mean": span, "std": 0.0, "seeds": 1})
        m, s = mean_std(fractions)
        rows.append(
            {
                **base,
                "metric": f"fraction of flows ending within {tol:g} of (0,1)",
                "mean": m,
                "std": s,
                "seeds": seeds,
            }
        )
        per_o[f"{o_t:g}"] = {
            "argmin": list(argmin),
            "argmin_is_induction_solution": argmin == INDUCTION_SOLUTION,
            "loss_min": float(L.min()),
            "loss_max": float(L.max()),
            "span": span,
            "loss_at_0_1": l01,
            "loss_at_1_0": l10,
            "fraction_converged": fractions,
            "fraction_converged_mean": m,
            "fraction_ending_at_1_0": stuck,
            "mean_final_distance": mean_dist,
            "grad_at_1_0": _grad(torch.tensor([COPY_SOLUTION], dtype=torch.float64), o_t)[0].tolist(),
        }
    plot = out / "theorem3.png"
    _plot(plot, list(o_values), flows, grid_n)
    notes = [
        "Closed form of Theorem 3 (alpha2 = 1 - alpha1, beta2 = 1 - beta1); values computed, not copied.",
        "Paper digest: L(0,1) = 1.178 / 2.489 / 4.619, L(1,0) = 1.386 / 2.596 / 4.635, span = 0.49 / 0.13 / 0.017.",
        f"Gradient flow: {steps} projected Euler steps of size {step_size} / max|grad| from uniform starts.",
        "On the square, the corner (1,0) (copy the current token) is a local minimum when the descent direction "
        "there points out of the square (see grad_at_1_0); flows that do not reach (0,1) end there.",
    ]
    extra = {"per_o": per_o, "plot": plot.name, "notes": notes, "seconds": round(time.perf_counter() - t0, 2)}
    payload = write_results(out, "theorem3", rows, config, extra)
    md = markdown_table(rows, ROW_COLUMNS)
    if verbose:
        print(md)
    return {**payload, "markdown": md, "out_dir": str(out)}
