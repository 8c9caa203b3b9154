"""fairseq-knnlm-sweep's PNG plots."""

import numpy as np

from .. import sweep as sw


def _pyplot():
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plots(res: sw.SweepResult, best, prefix: str) -> list:
    """PREFIX-lambda-temp.png (λ × T heat map per k) and PREFIX-k.png (perplexity vs k)."""
    plt = _pyplot()
    import matplotlib.colors
    import matplotlib.ticker

    paths = []
    finite = res.ppl[np.isfinite(res.ppl) & (res.skipped == res.skipped.min())]
    vmin = float(res.ppl[best])
    # Log colour scale from the best to the base LM; worse cells saturate.
    vmax = float(min(finite.max(), res.base.ppl)) if finite.size else vmin + 1
    norm = matplotlib.colors.LogNorm(vmin=vmin, vmax=max(vmax, vmin * (1 + 1e-6)))
    fig, axes = plt.subplots(1, len(res.ks), figsize=(1.2 + 3.2 * len(res.ks), 4.5), squeeze=False)
    for ki, k in enumerate(res.ks):
        ax = axes[0, ki]
        grid = np.where(res.skipped[ki] == res.skipped.min(), res.ppl[ki], np.nan).T  # (L, T)
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r", norm=norm,
                       extent=(-0.5, len(res.temps) - 0.5, -0.5, len(res.lambdas) - 0.5))
        ax.set_xticks(range(len(res.temps)), [f"{t:g}" for t in res.temps])
        step = max(1, len(res.lambdas) // 10)
        ax.set_yticks(range(0, len(res.lambdas), step), [f"{l:g}" for l in res.lambdas[::step]])
        ax.set_xlabel("temperature")
        if ki == 0:
            ax.set_ylabel("λ")
        ax.set_title(f"k = {k}")
        if best[0] == ki:
            ax.plot(best[1], best[2], marker="*", color="red", markersize=14)
    bar = fig.colorbar(im, ax=axes[0, :].tolist(), label="perplexity", extend="max")
    bar.ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    bar.ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    blank = "; blank: tokens skipped" if (res.skipped > res.skipped.min()).any() else ""
    fig.suptitle(f"kNN-LM perplexity (base LM {res.base.ppl:.2f}; best {res.ppl[best]:.2f} *{blank})")
    paths.append(prefix + "-lambda-temp.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    comparable = np.where(res.skipped == res.skipped.min(), res.ppl, np.inf)
    for ti, t in enumerate(res.temps):
        ax.plot(res.ks, comparable[:, ti, :].min(axis=1), marker="o", alpha=0.6, label=f"T={t:g}, best λ")
    ax.plot(res.ks, comparable.min(axis=(1, 2)), marker="o", color="black", linewidth=2, label="best λ, T")
    ax.axhline(res.base.ppl, color="gray", linestyle="--", label="base LM")
    if len(res.ks) > 1:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(res.ks, [str(k) for k in res.ks])
    ax.set_xlabel("k (neighbours)")
    ax.set_ylabel("perplexity")
    ax.set_title("kNN-LM perplexity vs k")
    ax.legend()
    fig.tight_layout()
    paths.append(prefix + "-k.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths



def save_retrieval_plot(rep: sw.RetrievalReport, prefix: str) -> str:
    """Perplexity against the fraction of tokens searched (predictor, random, oracle)."""
    plt = _pyplot()
    curves = [c for c in (rep.fit, rep.held_out) if c is not None]
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), squeeze=False)
    for ax, curve in zip(axes[0], curves):
        ppl = [st.ppl for st in curve.stats]
        ax.plot(curve.searched, ppl, marker="o", color="black", label="predictor")
        ax.plot(curve.searched, curve.random_ppl, marker=".", alpha=0.6, label="random tokens")
        ax.plot(curve.searched, curve.oracle_ppl, marker=".", alpha=0.6, label="oracle (uses the target)")
        ax.axhline(curve.base.ppl, color="gray", linestyle="--", label="base LM")
        ax.axhline(curve.full.ppl, color="gray", linestyle=":", label="every token searched")
        ax.set_xlabel("fraction of tokens searched")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{curve.split}" + (f" (thresholds from {rep.fit.split})" if curve is rep.held_out else ""))
        ax.legend()
    s = rep.setting
    fig.suptitle(f"adaptive retrieval: k {s['k']}, T {s['knn_temp']:g}, λ {s['lmbda']:g}")
    fig.tight_layout()
    path = prefix + "-retrieval.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
