"""The sweep as one run: saved neighbours in, every setting's perplexity, the analyses,
plots and a JSON report out (what ``fairseq-knnlm-sweep`` does)."""

import json
import sys
import time

import numpy as np

from .. import sweep as sw
from .inputs import load_inputs
from .plots import save_plots, save_retrieval_plot
from .report import (
    print_adaptive,
    print_best,
    print_cache,
    print_frequency,
    print_retrieval,
    print_table,
    print_top,
)


def knn_table(nb, inputs, args, signals=False):
    return sw.knn_table(nb, inputs.ks, inputs.temps, signals=signals, exact=args.exact_math,
                        chunk_rows=args.chunk_rows, progress=not args.quiet, threads=args.threads)


def analyses(args, inputs, lm, knn, final, out) -> dict:
    """Perplexity by target frequency, and where kNN helps and hurts most."""
    report = {}
    targets = np.asarray(inputs.nb.targets)
    if inputs.freq is not None:
        counts, source = inputs.freq
        rows = sw.frequency_buckets(targets, lm, final, counts, inputs.freq_edges)
        report["frequency_buckets"] = print_frequency(rows, source, inputs.nb.n, out)
    if args.top:
        report.update(print_top(targets, lm, knn, final, args.top, args.context, inputs.dictionary, out))
    return report


def adaptive_lambda(args, inputs, lm, table, res, out) -> dict:
    """λ per bucket of a test-time signal, fit on --adaptive-fit, reported on FILE."""
    fit = inputs.fit
    fit_table = knn_table(fit, inputs, args, signals=True)
    fit_lm = np.array(fit.lm_log_probs, dtype=np.float32)
    fit_res = sw.sweep(fit_lm, fit_table, inputs.lambdas, fit.segments)
    rep = sw.adaptive_comparison(fit_lm, fit_table, fit.segments, fit_res,
                                 lm, table, inputs.nb.segments, res, inputs.lambdas, args.adaptive_buckets,
                                 inputs.signals)
    return print_adaptive(rep, fit, inputs.nb, out)


def adaptive_retrieval(args, inputs, table, res, out):
    """Fit the retrieval predictor at the fit split's best setting; the curve on both splits."""
    held_out = inputs.retrieval_fit is not None
    if held_out:
        fit = inputs.retrieval_fit
        fit_table = knn_table(fit, inputs, args)
        fit_res = sw.sweep(np.array(fit.lm_log_probs, dtype=np.float32), fit_table, inputs.lambdas, fit.segments)
    else:
        fit, fit_table, fit_res = inputs.nb, table, res
    best = fit_res.best()
    ki, ti, _ = best
    rep = sw.adaptive_retrieval(fit, fit_table.knn_log_probs[ki, ti], fit_res.setting(best), inputs.fractions,
                                inputs.nb if held_out else None, table.knn_log_probs[ki, ti] if held_out else None)
    report = print_retrieval(rep, out)
    if args.save_predictor:
        path = rep.predictor.save(args.save_predictor)
        print(f"  predictor: {path} (fairseq-eval-lm ... --knn-retrieval-predictor {path} "
              f"--knn-retrieval-fraction F, F one of {','.join(f'{f:g}' for f in inputs.fractions)})", file=out)
        report["predictor"] = path
    return rep, report


def continuous_cache(args, inputs, table, res, lm, out) -> dict:
    """The cache from the saved keys, swept jointly with λ at the best (k, T) of the kNN grid."""
    sizes, thetas, cache_lambdas = inputs.cache
    ki, ti, _ = res.best()
    nb = inputs.nb
    tick = time.time()
    cache = sw.cache_table(nb, sizes, thetas, chunk_rows=None, threads=args.threads, progress=not args.quiet)
    result = sw.cache_sweep(lm, table.knn_log_probs[ki, ti], inputs.lambdas, cache, cache_lambdas, nb.segments,
                            k=inputs.ks[ki], knn_temp=inputs.temps[ti])
    return print_cache(result, out, seconds=time.time() - tick)


def plots(args, inputs, res, best, retrieval) -> list:
    try:
        paths = save_plots(res, best, inputs.prefix)
        if retrieval is not None:
            paths.append(save_retrieval_plot(retrieval, inputs.prefix))
    except OSError as e:
        raise sw.SweepError(
            f"cannot write plots with prefix {inputs.prefix} ({e.strerror}); pass --plot-prefix") from None
    return paths


def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=float)


# -------------------------------------------------------------- the tool
def run(args, out=None) -> dict:
    started = time.time()
    out = out or sys.stdout
    inputs = load_inputs(args, out)
    nb, meta = inputs.nb, inputs.nb.meta
    print(f"{nb.path}: {nb.n:,} tokens, {nb.k} neighbours each, sim func {meta.get('sim_func', '?')}, "
          f"split {meta.get('split', '?')}", file=out)
    if meta.get("dists_dtype") == "float16":
        print("note: distances were saved in float16; perplexities match a float32 run only approximately",
              file=out)
    timings = {}
    tick = time.time()
    table = knn_table(nb, inputs, args, signals=inputs.fit is not None)
    timings["knn"], tick = time.time() - tick, time.time()
    lm = np.array(nb.lm_log_probs, dtype=np.float32)
    res = sw.sweep(lm, table, inputs.lambdas, nb.segments)
    timings["lambdas"], tick = time.time() - tick, time.time()
    best = res.best()
    print_table(res, best, out)
    b = print_best(res, best, out)
    report = dict(file=nb.path, tokens=nb.n, saved_k=nb.k, meta=meta, ks=inputs.ks, knn_temps=inputs.temps,
                  lambdas=inputs.lambdas, perplexity=res.ppl.tolist(), loss=res.loss.tolist(),
                  skipped=res.skipped.tolist(), base=vars(res.base), best=b)
    knn = table.knn_log_probs[best[0], best[1]]
    report.update(analyses(args, inputs, lm, knn, sw.interpolated(lm, knn, b["lmbda"]), out))
    if inputs.fit is not None:
        report["adaptive"] = adaptive_lambda(args, inputs, lm, table, res, out)
    retrieval = None
    if inputs.fractions is not None:
        retrieval, report["adaptive_retrieval"] = adaptive_retrieval(args, inputs, table, res, out)
    if inputs.cache is not None:
        report["cache"] = continuous_cache(args, inputs, table, res, lm, out)
    if not args.no_plots:
        report["plots"] = plots(args, inputs, res, best, retrieval)
        print(f"\nplots: {', '.join(report['plots'])}", file=out)
    report["seconds"] = time.time() - started
    report["timings"] = timings
    print(f"swept {len(inputs.ks) * len(inputs.temps) * len(inputs.lambdas)} settings in {report['seconds']:.1f}s "
          f"(kNN probabilities {timings['knn']:.1f}s, all λ {timings['lambdas']:.1f}s)", file=out)
    if args.json:
        write_json(args.json, report)
    return report
