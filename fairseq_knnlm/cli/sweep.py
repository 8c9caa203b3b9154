"""fairseq-knnlm-sweep: tune λ, temperature and k on saved neighbours, in seconds.

    fairseq-eval-lm data-bin --path model.pt --user-dir fairseq_knnlm \\
        --task knnlm_language_modeling --knnlm --dstore DSTORE --gen-subset test \\
        --knn-save-neighbors test.nbrs ...
    fairseq-knnlm-sweep test.nbrs --lmbda 0:1:0.05 --knn-temp 1,2,5,10 --k 8,64,1024

See docs/SWEEP.md.
"""

import argparse
import json
import sys
import time

import numpy as np

from .. import sweep as sw
from ..retrieval.adaptive import FEATURE_HELP
from ..sweep.inputs import load_inputs
from .common import run_reporting_errors
from ..sweep.plots import save_plots, save_retrieval_plot
from ..sweep.report import (
    print_adaptive,
    print_best,
    print_cache,
    print_frequency,
    print_retrieval,
    print_table,
    print_top,
)

PROG = "fairseq-knnlm-sweep"


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
    r = p.add_argument_group(
        "adaptive retrieval (search only the tokens a predictor on the LM's own distribution selects)")
    r.add_argument("--retrieval-fractions", default=None, metavar="GRID",
                   help="fractions of tokens to search, e.g. 0:1:0.1: fit the predictor at the best setting "
                   "and report perplexity against the fraction searched (default with --save-predictor or "
                   "--retrieval-fit: 0:1:0.05). Features: "
                   + "; ".join(f"{k}: {v}" for k, v in FEATURE_HELP.items()))
    r.add_argument("--retrieval-fit", metavar="FIT_FILE",
                   help="neighbours saved on another split (e.g. valid): fit the predictor and its thresholds "
                   "there, report the curve on both")
    r.add_argument("--save-predictor", metavar="PATH",
                   help="write the fitted predictor (weights, thresholds per fraction, model and datastore "
                   "identity) for fairseq-eval-lm --knn-retrieval-predictor PATH --knn-retrieval-fraction F")
    c = p.add_argument_group(
        "continuous cache (Grave et al., 2017) with the kNN-LM: p = (1 - λc) p_kNN-LM + λc p_cache; needs "
        "neighbours saved by a run with --knn-cache-size, which then carry every token's key")
    c.add_argument("--knn-cache-size", default=None, metavar="GRID",
                   help="cache sizes N (tokens before each token), e.g. 100,500,2000 (default: the saving run's)")
    c.add_argument("--knn-cache-theta", default=None, metavar="GRID",
                   help="cache flatness θ, e.g. 0.01,0.03,0.1,0.3 (default: the saving run's)")
    c.add_argument("--knn-cache-lmbda", default=None, metavar="GRID",
                   help="cache weights λc (default with the other two: 0:0.5:0.05); λ and λc = 0 are always "
                   "included. Swept jointly with --lmbda at the best k and T of the kNN grid")
    x = p.add_argument_group("computation")
    x.add_argument("--exact-math", action="store_true",
                   help="compute p_kNN with the scorer's own function per setting (slower; same values to float32 rounding)")
    x.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk (default: ~2M neighbours)")
    x.add_argument("--threads", type=int, default=None,
                   help=f"chunks computed in parallel (default: {sw.default_threads()})")
    return p


# -------------------------------------------------------------- the steps
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


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    run_reporting_errors(parser, lambda: run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
