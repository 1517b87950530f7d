"""The figures of the paper runner, as PNG files (matplotlib, Agg backend), one set per
(dataset, model):

- ``fig1_accuracy-*``: train (dashed) and test (solid) accuracy per epoch, per method, one panel
  per regime (the paper's Fig. 1 / 5);
- ``fig2_input_gradient-*``: the mean l2 norm of the loss gradient with respect to the input,
  on train and on test data, against the generalization gap of the same epoch (Fig. 2 / 6);
- ``fig3_hessian-*``: the largest Hessian eigenvalue of the loss on train (solid) and test
  (dashed) data per epoch (Fig. 3);
- ``fig4_singular_values-*``: the singular values of one weight matrix after training, in
  decreasing order, per method (Fig. 4);
- ``fig5_slope-*``: the distribution of the slope over test inputs after training, per method
  (arXiv:2107.01473).

Curves are means over seeds; Fig. 4 and 5 pool or show the first seed as labelled.
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple


def _ok(v) -> bool:
    """A finite number (NaN / None mark a diverged run's values)."""
    return v is not None and v == v and abs(v) != float("inf")


def _mean_curve(runs: Sequence[dict], key, sub: Optional[str] = None) -> Tuple[list, list]:
    """(epochs, mean over runs) of history[key] (or history[key][sub]) where present."""
    per_epoch: Dict[int, List[float]] = {}
    for r in runs:
        for e in r["history"]:
            v = e.get(key)
            if v is None:
                continue
            if sub is not None:
                v = v[sub]
            per_epoch.setdefault(e["epoch"], []).append(v)
    epochs = sorted(per_epoch)
    return epochs, [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]


def _groups(runs):
    blocks: Dict[tuple, Dict[str, Dict[str, List[dict]]]] = {}
    for r in runs:
        blocks.setdefault((r["dataset"], r["model"]), {}).setdefault(r["regime"], {}) \
            .setdefault(r["method"], []).append(r)
    return blocks


def write_all(runs: Sequence[dict], out: str) -> Tuple[List[str], Optional[str]]:
    """Writes every figure; returns (paths, None), or ([], reason) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        return [], f"matplotlib is not installed ({e})"
    paths = []
    for (ds, model), regimes in _groups(runs).items():
        tag = f"{ds}-{model}"
        names = list(regimes)
        methods = list(dict.fromkeys(m for g in regimes.values() for m in g))
        colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}

        def panel_grid(rows=1, title=""):
            fig, axes = plt.subplots(rows, len(names), figsize=(5.2 * len(names), 3.8 * rows),
                                     squeeze=False)
            fig.suptitle(f"{title} — {ds}, {model}")
            return fig, axes

        def save(fig, name):
            fig.tight_layout()
            path = os.path.join(out, f"{name}-{tag}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)

        # Fig. 1/5: accuracy curves
        fig, axes = panel_grid(title="Accuracy (train dashed, test solid)")
        for ax, g in zip(axes[0], names):
            for m, rs in regimes[g].items():
                ep, tr = _mean_curve(rs, "train_acc")
                _, te = _mean_curve(rs, "test_acc")
                ax.plot(ep, te, "-", color=colors[m], label=m)
                ax.plot(ep, tr, "--", color=colors[m], alpha=0.7)
            ax.set(title=f"{g} batch (B={rs[0]['batch_size_effective']})", xlabel="epoch",
                   ylabel="accuracy")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=7)
        save(fig, "fig1_accuracy")

        # Fig. 2/6: input-gradient norm against the gap
        fig, axes = panel_grid(rows=2, title="‖∂L/∂x‖₂ against the generalization gap")
        for j, g in enumerate(names):
            for i, part in enumerate(("train", "test")):
                ax = axes[i][j]
                for m, rs in regimes[g].items():
                    _, gap = _mean_curve(rs, "gap")
                    _, gn = _mean_curve(rs, f"input_grad_{part}")
                    ax.plot(gap, gn, "o-", ms=3, color=colors[m], label=m)
                ax.set(title=f"{g} batch, {part} data", xlabel="train − test accuracy",
                       ylabel="mean ‖∂L/∂x‖₂")
                ax.legend(fontsize=7)
        save(fig, "fig2_input_gradient")

        # Fig. 3: largest Hessian eigenvalue
        fig, axes = panel_grid(title="Largest Hessian eigenvalue (train solid, test dashed)")
        for ax, g in zip(axes[0], names):
            for m, rs in regimes[g].items():
                ep, tr = _mean_curve(rs, "hessian_train", "eigenvalue")
                ep2, te = _mean_curve(rs, "hessian_test", "eigenvalue")
                ax.plot(ep, tr, "o-", ms=3, color=colors[m], label=m)
                ax.plot(ep2, te, "o--", ms=3, color=colors[m], alpha=0.7)
            ax.set(title=f"{g} batch", xlabel="epoch", ylabel="eigenvalue")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=7)
        save(fig, "fig3_hessian")

        # Fig. 4: singular values of one weight (first seed)
        fig, axes = panel_grid(title="Singular values of one weight matrix (first seed)")
        for ax, g in zip(axes[0], names):
            layer = ""
            for m, rs in regimes[g].items():
                sv = [v for v in rs[0]["final"]["singular_values"] if _ok(v)]
                layer = f"{rs[0]['final']['spectrum_layer']} {tuple(rs[0]['final']['spectrum_shape'])}"
                ax.plot(range(1, len(sv) + 1), sv, "-", color=colors[m],
                        label=m if sv else f"{m} (diverged)")
            ax.set(title=f"{g} batch: {layer}", xlabel="index", ylabel="singular value")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        save(fig, "fig4_singular_values")

        # slope distribution (pooled over seeds)
        fig, axes = panel_grid(title="Slope σ_max(∂f/∂x) at test inputs")
        for ax, g in zip(axes[0], names):
            ms = list(regimes[g])
            vals = [[v for r in regimes[g][m] for v in r["final"]["slope_values"] if _ok(v)]
                    for m in ms]
            ax.boxplot(vals, showfliers=False)
            ax.set_xticks(range(1, len(ms) + 1), ms, rotation=30, fontsize=8)
            ax.set(title=f"{g} batch", ylabel="slope")
        save(fig, "fig5_slope")
    return paths, None
