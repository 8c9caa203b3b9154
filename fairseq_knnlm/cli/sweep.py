"""fairseq-knnlm-sweep: tune λ, temperature and k on saved neighbours, in seconds.

    fairseq-eval-lm data-bin --path model.pt --user-dir fairseq_knnlm \\
        --task knnlm_language_modeling --knnlm --dstore DSTORE --gen-subset test \\
        --knn-save-neighbors test.nbrs ...
    fairseq-knnlm-sweep test.nbrs --lmbda 0:1:0.05 --knn-temp 1,2,5,10 --k 8,64,1024

See docs/SWEEP.md.
"""

import argparse
import sys

from .. import sweep as sw
from ..retrieval.adaptive import FEATURE_HELP
from ..sweep.tool import run
from .common import run_reporting_errors

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
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    run_reporting_errors(parser, lambda: run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
