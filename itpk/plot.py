"""Concentration-time figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from itpk.io import atomic_write
from itpk.simulate import Profiles


def plot_formats() -> tuple[str, ...]:
    """The figure formats matplotlib writes here, by file suffix (not pgf, which needs LaTeX; not raw pixels)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"pgf", "raw", "rgba"}))


def figure_format(path: str | Path) -> str:
    """The figure format a ``--plot`` file name asks for (its suffix), ``png`` without a suffix matplotlib knows."""
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix in plot_formats() else "png"


def plot_profiles(
    profiles: Profiles,
    path: str | Path,
    *,
    dose_times: Sequence[float] = (),
    title: str = "",
    max_lines: int = 20,
) -> Path:
    """Write a PNG: one row per output, linear axis left, log axis right.

    A population (S > 1) is drawn as its median with the 5–95% band and up to
    ``max_lines`` individual curves; dose times are marked on the time axis.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(profiles.outputs)
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False, constrained_layout=True)
    t = profiles.times
    tu = profiles.spec.time_unit
    for row, name in enumerate(names):
        values = profiles.outputs[name]
        unit = profiles.spec.outputs[name].unit
        for col, scale in enumerate(("linear", "log")):
            ax = axes[row, col]
            _draw(ax, t, values, max_lines)
            for dt in dose_times:
                ax.axvline(dt, color="0.6", lw=0.8, ls=":", zorder=0)
            ax.set_xlabel(f"time ({tu})")
            ax.set_ylabel(f"{name} ({unit})")
            ax.grid(alpha=0.3)
            if scale == "log":
                positive = values[values > 0]
                if positive.size:
                    ax.set_yscale("log")
                    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                    ax.set_ylim(max(positive.min(), positive.max() * 1e-6) * 0.8, positive.max() * 1.5)
            ax.set_title(f"{name} — {scale} scale", fontsize=10)
    fig.suptitle(title or profiles.spec.name)
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=figure_format(path)))
    plt.close(fig)
    return out


def _draw(ax, t: np.ndarray, values: np.ndarray, max_lines: int) -> None:  # noqa: ANN001
    if values.shape[0] == 1:
        ax.plot(t, values[0], color="C0", lw=1.8)
        return
    lo, med, hi = np.percentile(values, [5, 50, 95], axis=0)
    for v in values[:max_lines]:
        ax.plot(t, v, color="C0", lw=0.5, alpha=0.25)
    ax.fill_between(t, lo, hi, color="C0", alpha=0.2, label="5–95%")
    ax.plot(t, med, color="C0", lw=2, label="median")
    ax.legend(fontsize=8, loc="best")


def plot_routes(spec, values, schedules, path, *, roles=None, title: str = "") -> Path:  # noqa: ANN001
    """Local (tumour) and systemic (plasma) profiles of each route side by side, log scale.

    ``roles``: the ``[exposure]`` outputs in force (:func:`itpk.exposure.roles_at`); the model file's by default.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from itpk.exposure import ROLE_TITLES, default_horizon
    from itpk.simulate import simulate
    from itpk.workflows import output_grid

    in_force = dict(roles if roles is not None else spec.exposure)
    roles = [in_force[r] for r in ("local", "systemic", "abscopal") if r in in_force] or list(spec.outputs)[:2]
    # titles by role: the model file's descriptions name the lesions as the model file's routes inject them
    role_of = {name: ROLE_TITLES[r] for r, name in in_force.items() if r in ROLE_TITLES}
    fig, axes = plt.subplots(1, len(roles), figsize=(5.5 * len(roles), 4.2), squeeze=False, constrained_layout=True)
    first = next(iter(schedules.values()))
    horizon = max(24.0, 0.4 * default_horizon(values, first)) if spec.is_linear else None  # about 4 slowest half-lives
    for route, schedule in schedules.items():
        grid = output_grid(schedule, horizon=horizon, step=horizon / 600 if horizon else None)
        horizon = grid[-1]
        prof = simulate(spec, schedule, values, grid, outputs=roles)
        for ax, name in zip(axes[0], roles, strict=True):
            y = prof.outputs[name][0]
            ax.plot(grid, np.where(y > 0, y, np.nan), lw=1.8, label=str(schedule.doses[0].target) if schedule.doses else route)
    for ax, name in zip(axes[0], roles, strict=True):
        ax.set_yscale("log")
        top = max(np.nanmax(line.get_ydata()) for line in ax.get_lines())
        ax.set_ylim(top * 1e-6, top * 2)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(f"time ({spec.time_unit})")
        ax.set_ylabel(f"{name} ({spec.outputs[name].unit})")
        ax.set_title(f"{name} ({role_of[name]})" if name in role_of else spec.outputs[name].description or name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(title="route", fontsize=8)
    fig.suptitle(title or spec.name)
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=figure_format(path)))
    plt.close(fig)
    return out
