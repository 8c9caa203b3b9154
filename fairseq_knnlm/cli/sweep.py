"""fairseq-knnlm-sweep: tune λ, temperature and k on saved neighbours, in seconds.

    fairseq-eval-lm data-bin --path model.pt --user-dir fairseq_knnlm \\
        --task knnlm_language_modeling --knnlm --dstore DSTORE --gen-subset test \\
        --knn-save-neighbors test.nbrs ...
    fairseq-knnlm-sweep test.nbrs --lmbda 0:1:0.05 --knn-temp 1,2,5,10 --k 8,64,1024

See docs/SWEEP.md.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from .. import sweep as sw
from ..errors import UserError
from ..neighbors import read_neighbors

PROG = "fairseq-knnlm-sweep"
# Fields two neighbours files must share to be fit on one and evaluated on the other.
SAME_RUN_FIELDS = ("sim_func", "dstore_fingerprint", "checkpoint_sha256", "dictionary_md5", "keytype")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Perplexity of every kNN-LM setting in a grid, from neighbours saved by "
        "fairseq-eval-lm --knnlm --knn-save-neighbors FILE, without rerunning the model or the search.",
    )
    p.add_argument("file", metavar="FILE", help="saved neighbours directory")
    g = p.add_argument_group("grid (values: 1,2,5 or inclusive START:STOP:STEP, or both)")
    g.add_argument("--lmbda", default="0:1:0.05", help="interpolation weights λ (default: %(default)s)")
    g.add_argument("--knn-temp", default=None,
                   help="softmax temperatures (default: the temperature of the saving run)")
    g.add_argument("--k", default=None, help="numbers of neighbours, at most the saved k (default: the saved k)")
    o = p.add_argument_group("output")
    o.add_argument("--plot-prefix", default=None,
                   help="write PREFIX-lambda-temp.png and PREFIX-k.png (default: FILE without trailing /)")
    o.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    o.add_argument("--json", metavar="PATH", help="also write every number to PATH as JSON")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.add_argument_group("analysis (at the best setting of the grid)")
    a.add_argument("--dict", metavar="DICT_TXT", help="fairseq dict.txt of the model, to print words")
    a.add_argument("--freq-from", metavar="PATH",
                   help="perplexity by target frequency: a datastore directory (counts of its values) "
                   "or a fairseq dict.txt (its training-data counts)")
    a.add_argument("--freq-edges", default=None,
                   help="bucket lower bounds of the frequency, e.g. 0,1,10,100 (default: powers of 10)")
    a.add_argument("--top", type=int, default=0,
                   help="print the N tokens (and token types) where kNN helps and hurts most")
    a.add_argument("--context", type=int, default=12, help="preceding tokens printed with --top (default: %(default)s)")
    d = p.add_argument_group("adaptive interpolation (λ per token from test-time signals)")
    d.add_argument("--adaptive-fit", metavar="FIT_FILE",
                   help="neighbours saved on another split (e.g. valid): fit per-bucket λ there, report on FILE")
    d.add_argument("--adaptive-signals", default=",".join(sw.SIGNALS),
                   help="signals to try, none of which looks at the target: "
                   + "; ".join(f"{k}: {v}" for k, v in sw.SIGNAL_HELP.items()) + " (default: all)")
    d.add_argument("--adaptive-buckets", type=int, default=8, help="quantile buckets per signal (default: %(default)s)")
    x = p.add_argument_group("computation")
    x.add_argument("--exact-math", action="store_true",
                   help="compute p_kNN with the scorer's own function per setting (slower; same values to float32 rounding)")
    x.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk (default: ~2M neighbours)")
    x.add_argument("--threads", type=int, default=None,
                   help=f"chunks computed in parallel (default: {sw.default_threads()})")
    return p


# ------------------------------------------------------------ formatting
def fmt_ppl(x: float) -> str:
    if not np.isfinite(x):
        return "inf" if x > 0 else "nan"
    return f"{x:.4f}" if x < 1e4 else f"{x:.4g}"


def print_table(res: sw.SweepResult, best, out) -> None:
    marked = False
    for ki, k in enumerate(res.ks):
        print(f"\nk = {k}: perplexity (rows λ, columns temperature; * best, † tokens skipped)", file=out)
        header = "   λ    " + "".join(f"{'T=' + format(t, 'g'):>14s}" for t in res.temps)
        print(header, file=out)
        for li, lam in enumerate(res.lambdas):
            cells = []
            for ti in range(len(res.temps)):
                cell = fmt_ppl(res.ppl[ki, ti, li])
                mark = ""
                if (ki, ti, li) == best:
                    mark = "*"
                if res.skipped[ki, ti, li] > 0:
                    mark += "†"
                    marked = True
                cells.append(f"{cell + mark:>14s}")
            print(f"  {lam:<6g}" + "".join(cells), file=out)
    if marked:
        print("† some tokens get probability 0 and are skipped, as fairseq-eval-lm skips them; "
              "such perplexities cover fewer tokens and are never chosen as best", file=out)


def words(dictionary, ids) -> list:
    if dictionary is None:
        return [f"#{int(i)}" for i in ids]
    return [dictionary[int(i)] if 0 <= int(i) < len(dictionary) else f"#{int(i)}" for i in ids]


def load_dictionary(path: str, meta: dict):
    from fairseq.data import Dictionary

    from ..datastore import dictionary_md5

    try:
        dictionary = Dictionary.load(path)
    except (OSError, ValueError, RuntimeError) as e:
        raise sw.SweepError(f"cannot read --dict {path} ({e}); pass the model's dict.txt") from None
    if meta.get("dictionary_md5") and dictionary_md5(dictionary) != meta["dictionary_md5"]:
        raise sw.SweepError(
            f"--dict {path} is not the dictionary the neighbours were saved with "
            f"({len(dictionary)} vs {meta.get('dictionary_size')} types); pass the model's dict.txt"
        )
    return dictionary


def frequency_counts(path: str, meta: dict, out):
    """(counts per token id, description)."""
    if os.path.isdir(path):
        from ..datastore import Datastore, DatastoreError

        from ..neighbors import KIND, META_FILE

        try:
            with open(os.path.join(path, META_FILE)) as f:
                kind = json.load(f).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None  # sharded or broken: Datastore says what is wrong
        if kind == KIND:
            raise sw.SweepError(f"--freq-from {path} holds saved neighbours; pass a datastore directory")
        try:
            store = Datastore(path)
        except DatastoreError as e:
            raise sw.SweepError(str(e)) from None
        except (KeyError, TypeError):
            raise sw.SweepError(f"--freq-from {path} is not a readable datastore; pass the --dstore directory") from None
        fp = meta.get("dstore_fingerprint")
        if fp and store.fingerprint != fp:
            print(f"note: {path} is not the datastore the neighbours were retrieved from", file=out)
        return sw.token_counts(store.vals, int(meta.get("dictionary_size") or 0)), f"count in datastore {path}"
    dictionary = load_dictionary(path, meta) if os.path.exists(path) else None
    if dictionary is None:
        raise sw.SweepError(f"--freq-from {path} is neither a datastore directory nor a dict.txt")
    return np.asarray(dictionary.count, dtype=np.int64), f"count in {path} (training data)"


# ------------------------------------------------------------------ plots
def save_plots(res: sw.SweepResult, best, prefix: str) -> list:
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors
    import matplotlib.ticker
    import matplotlib.pyplot as plt

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


# -------------------------------------------------------------- the tool
def check_fit_file(fit, nb) -> None:
    for field in SAME_RUN_FIELDS:
        a, b = fit.meta.get(field), nb.meta.get(field)
        if a is not None and b is not None and a != b:
            raise sw.SweepError(
                f"--adaptive-fit {fit.path} and {nb.path} differ in {field}; save both with the same "
                "model, datastore and --knn-sim-func"
            )
    same_split = (fit.meta.get("data"), fit.meta.get("split")) == (nb.meta.get("data"), nb.meta.get("split"))
    if os.path.realpath(fit.path) == os.path.realpath(nb.path) or (fit.meta.get("split") and same_split):
        raise sw.SweepError(
            f"--adaptive-fit {fit.path} covers the same split as {nb.path}; fit on another split "
            "(e.g. valid) so the comparison is held out"
        )


def run(args, out=None) -> dict:
    started = time.time()
    out = out or sys.stdout
    nb = read_neighbors(args.file)
    if nb.n == 0:
        raise sw.SweepError(f"{nb.path} holds no scored tokens; save neighbours of a non-empty --gen-subset")
    meta = nb.meta
    lambdas = sw.parse_grid(args.lmbda, "--lmbda")
    temps = sw.parse_grid(args.knn_temp if args.knn_temp is not None else str(meta.get("knn_temp", 1.0)),
                          "--knn-temp")
    ks = sw.parse_grid(args.k if args.k is not None else str(nb.k), "--k", cast=int)
    sw.check_grid(ks, temps, lambdas, nb.k, nb.path)
    signals = [s.strip() for s in args.adaptive_signals.split(",") if s.strip()]
    for s in signals:
        if s not in sw.SIGNALS:
            raise sw.SweepError(f"unknown --adaptive-signals {s!r}; choose from {', '.join(sw.SIGNALS)}")
    if args.adaptive_buckets < 1:
        raise sw.SweepError("--adaptive-buckets must be at least 1")
    if args.top < 0 or args.context < 0:
        raise sw.SweepError("--top and --context take non-negative numbers")
    if args.chunk_rows is not None and args.chunk_rows < 1:
        raise sw.SweepError("--chunk-rows must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise sw.SweepError("--threads must be at least 1")
    fit = None
    if args.adaptive_fit:
        fit = read_neighbors(args.adaptive_fit)
        if fit.n == 0:
            raise sw.SweepError(f"--adaptive-fit {fit.path} holds no scored tokens")
        sw.check_grid(ks, temps, lambdas, fit.k, fit.path)
        check_fit_file(fit, nb)
    dictionary = load_dictionary(args.dict, meta) if args.dict else None
    freq_edges = sw.parse_grid(args.freq_edges, "--freq-edges", cast=int) if args.freq_edges else None
    if freq_edges is not None and (freq_edges != sorted(freq_edges) or freq_edges[0] != 0):
        raise sw.SweepError("--freq-edges must be increasing and start at 0, e.g. 0,1,10,100")
    freq = frequency_counts(args.freq_from, meta, out) if args.freq_from else None
    prefix = args.plot_prefix or nb.path.rstrip("/")
    if not args.no_plots and not os.access(os.path.dirname(os.path.abspath(prefix)), os.W_OK):
        raise sw.SweepError(f"cannot write plots next to {prefix}; pass --plot-prefix or --no-plots")

    print(f"{nb.path}: {nb.n:,} tokens, {nb.k} neighbours each, sim func {meta.get('sim_func', '?')}, "
          f"split {meta.get('split', '?')}", file=out)
    if meta.get("dists_dtype") == "float16":
        print("note: distances were saved in float16; perplexities match a float32 run only approximately",
              file=out)
    timings = {}
    tick = time.time()
    table = sw.knn_table(nb, ks, temps, signals=fit is not None, exact=args.exact_math,
                         chunk_rows=args.chunk_rows, progress=not args.quiet, threads=args.threads)
    timings["knn"], tick = time.time() - tick, time.time()
    lm = np.array(nb.lm_log_probs, dtype=np.float32)
    res = sw.sweep(lm, table, lambdas, nb.segments)
    timings["lambdas"], tick = time.time() - tick, time.time()
    best = res.best()
    b = res.setting(best)
    print_table(res, best, out)
    change = 100.0 * (b["ppl"] / res.base.ppl - 1)
    print(f"\nbase LM (λ = 0): perplexity {fmt_ppl(res.base.ppl)}, loss {res.base.loss:.4f} "
          f"over {res.base.count:,} tokens", file=out)
    skipped = f"; {b['skipped']:,} tokens skipped (probability 0)" if b["skipped"] else ""
    print(f"best: --k {b['k']} --knn-temp {b['knn_temp']:g} --lmbda {b['lmbda']:g}: "
          f"perplexity {fmt_ppl(b['ppl'])} ({change:+.2f}%), loss {b['loss']:.4f}{skipped}", file=out)
    report = dict(file=nb.path, tokens=nb.n, saved_k=nb.k, meta=meta, ks=ks, knn_temps=temps, lambdas=lambdas,
                  perplexity=res.ppl.tolist(), loss=res.loss.tolist(), skipped=res.skipped.tolist(),
                  base=vars(res.base), best=b)

    final = sw.interpolated(lm, table.knn_log_probs[best[0], best[1]], b["lmbda"])
    targets = np.asarray(nb.targets)
    if freq is not None:
        counts, source = freq
        rows = sw.frequency_buckets(targets, lm, final, counts, freq_edges)
        print(f"\nby target frequency ({source}); perplexity = exp(mean NLL) per bucket", file=out)
        print(f"  {'frequency':>14s} {'tokens':>9s} {'share':>7s} {'base LM':>11s} {'kNN-LM':>11s} {'change':>8s}",
              file=out)
        for r in rows:
            share = 100.0 * r.tokens / nb.n
            if not r.tokens:
                print(f"  {r.label:>14s} {0:>9,d} {share:>6.1f}% {'-':>11s} {'-':>11s} {'-':>8s}", file=out)
                continue
            rel = 100.0 * (r.knn_ppl / r.base_ppl - 1)
            skip = f"  ({r.knn_skipped} skipped)" if r.knn_skipped else ""
            print(f"  {r.label:>14s} {r.tokens:>9,d} {share:>6.1f}% {fmt_ppl(r.base_ppl):>11s} "
                  f"{fmt_ppl(r.knn_ppl):>11s} {rel:>+7.2f}%{skip}", file=out)
        report["frequency_buckets"] = [vars(r) for r in rows]
    if args.top:
        helps, hurts = sw.biggest_changes(lm, final, args.top)
        report["top_tokens"] = {}
        knn = table.knn_log_probs[best[0], best[1]]
        for title, idx in (("helps", helps), ("hurts", hurts)):
            print(f"\ntokens where kNN {title} most (log-probs in nats; context = preceding tokens)", file=out)
            entries = []
            for i in idx:
                ctx = words(dictionary, targets[max(0, i - args.context) : i])
                tgt = words(dictionary, [targets[i]])[0]
                print(f"  #{i:<8d} {tgt!s:>14s}  LM {lm[i]:8.3f}  kNN {knn[i]:8.3f}  final {final[i]:8.3f}  "
                      f"Δ {final[i] - lm[i]:+7.3f}  | {' '.join(ctx)} [{tgt}]", file=out)
                entries.append(dict(position=int(i), target=tgt, lm=float(lm[i]), knn=float(knn[i]),
                                    final=float(final[i]), context=ctx))
            report["top_tokens"][title] = entries
        type_helps, type_hurts = sw.type_changes(targets, lm, final, args.top)
        report["top_types"] = {}
        for title, rows in (("helps", type_helps), ("hurts", type_hurts)):
            print(f"\ntoken types where kNN {title} most in total (summed Δ log-prob, nats)", file=out)
            for tok, occ, total in rows:
                print(f"  {words(dictionary, [tok])[0]!s:>14s}  {occ:>7,d} x  Σ Δ {total:+10.2f}  "
                      f"mean {total / occ:+.3f}", file=out)
            report["top_types"][title] = [dict(token=words(dictionary, [t])[0], occurrences=o, total=s)
                                          for t, o, s in rows]
    if fit is not None:
        fit_table = sw.knn_table(fit, ks, temps, signals=True, exact=args.exact_math,
                                 chunk_rows=args.chunk_rows, progress=not args.quiet, threads=args.threads)
        fit_lm = np.array(fit.lm_log_probs, dtype=np.float32)
        fit_res = sw.sweep(fit_lm, fit_table, lambdas, fit.segments)
        rep = sw.adaptive_comparison(fit_lm, fit_table, fit.segments, fit_res,
                                     lm, table, nb.segments, res, lambdas, args.adaptive_buckets, signals)
        report["adaptive"] = print_adaptive(rep, fit, nb, out)
    if not args.no_plots:
        try:
            paths = save_plots(res, best, prefix)
        except OSError as e:
            raise sw.SweepError(f"cannot write plots with prefix {prefix} ({e.strerror}); pass --plot-prefix") from None
        print(f"\nplots: {', '.join(paths)}", file=out)
        report["plots"] = paths
    report["seconds"] = time.time() - started
    report["timings"] = timings
    print(f"swept {len(ks) * len(temps) * len(lambdas)} settings in {report['seconds']:.1f}s "
          f"(kNN probabilities {timings['knn']:.1f}s, all λ {timings['lambdas']:.1f}s)", file=out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
    return report


def print_adaptive(rep: sw.AdaptiveReport, fit, nb, out) -> dict:
    fs, es = fit.meta.get("split", "fit"), nb.meta.get("split", "eval")
    print(f"\nadaptive λ: fitted on {fit.path} ({fs}, {fit.n:,} tokens), evaluated on {es}", file=out)
    f = rep.fixed
    print(f"  {'setting':<44s} {fs + ' ppl':>12s} {es + ' ppl':>12s}", file=out)
    fixed_name = f"fixed λ {f['lmbda']:g} (k {f['k']}, T {f['knn_temp']:g}; chosen on {fs})"
    print(f"  {fixed_name:<44s} {fmt_ppl(rep.fixed_fit.ppl):>12s} {fmt_ppl(rep.fixed_eval.ppl):>12s}", file=out)
    rows = []
    for i, (model, fit_stat, eval_stat) in enumerate(rep.per_signal):
        name = f"{model.signal} ({len(model.lambdas)} buckets, k {model.k}, T {model.temp:g})"
        mark = "  <- chosen on " + fs if i == rep.chosen else ""
        print(f"  {name:<44s} {fmt_ppl(fit_stat.ppl):>12s} {fmt_ppl(eval_stat.ppl):>12s}{mark}", file=out)
        rows.append(dict(signal=model.signal, k=model.k, knn_temp=model.temp, edges=model.edges.tolist(),
                         lambdas=model.lambdas.tolist(), fit_ppl=fit_stat.ppl, eval_ppl=eval_stat.ppl,
                         eval_skipped=eval_stat.skipped))
    o = rep.oracle
    print(f"  (oracle: best fixed setting chosen on {es} itself: {fmt_ppl(o['ppl'])}; not a fair comparison)",
          file=out)
    model, _, chosen_eval = rep.per_signal[rep.chosen]
    rel = 100.0 * (chosen_eval.ppl / rep.fixed_eval.ppl - 1)
    verdict = "beats" if rep.beats_fixed else "does not beat"
    print(f"  adaptive λ on {model.signal} {verdict} the best fixed λ on held-out {es}: "
          f"{fmt_ppl(chosen_eval.ppl)} vs {fmt_ppl(rep.fixed_eval.ppl)} ({rel:+.2f}%)", file=out)
    print(f"  buckets of {model.signal}: edges {np.array2string(model.edges, precision=4, separator=', ')}, "
          f"λ {np.array2string(model.lambdas, precision=3, separator=', ')}", file=out)
    return dict(fixed=f, fixed_fit_ppl=rep.fixed_fit.ppl, fixed_eval_ppl=rep.fixed_eval.ppl,
                oracle=o, signals=rows, chosen=rows[rep.chosen]["signal"], beats_fixed=rep.beats_fixed)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except UserError as e:
        parser.exit(2, f"{PROG}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
