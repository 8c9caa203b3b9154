"""fairseq-knnlm-prune: a smaller datastore by greedy merging (He et al., 2021).

    fairseq-knnlm-prune --dstore DSTORE_DIR --output PRUNED_DIR [--index DSTORE_DIR/knn.index] \\
        [--merge-k 8] [--probe 32] [--batch-size 4096] [--overwrite]

An interrupted run continues where it stopped when the same command is rerun.
"""

import argparse
import json
import sys

from ..tools.prune import PROG, prune_datastore
from .common import count_at_least, run_reporting_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Prune a kNN-LM datastore by greedy merging (He et al., 2021): entries are visited in "
        "corpus order, and each one still in the store absorbs those of its K nearest entries that have the "
        "same value (and have not absorbed others), whose count it adds to its own. Writes a new datastore "
        "(keys.npy, vals.npy, counts.npy, meta.json with 'pruned'); the kNN-LM weighs each of its entries "
        "by count * exp(-d / T). Build its index with fairseq-knnlm-build-index --dstore OUTPUT.",
    )
    p.add_argument("--dstore", required=True, metavar="DIR", help="datastore to prune (single, sharded or pruned)")
    p.add_argument("--output", required=True, metavar="DIR", help="directory of the pruned datastore")
    p.add_argument("--index", metavar="FILE",
                   help="FAISS index of --dstore used to find each entry's neighbours (default: DSTORE/knn.index)")
    p.add_argument("--merge-k", "--k", dest="merge_k", type=count_at_least(1), default=8, metavar="K",
                   help="nearest other entries each entry may absorb; larger K prunes more (not eval-lm's --k, "
                   "the neighbours retrieved; default: %(default)s)")
    p.add_argument("--probe", "--nprobe", dest="probe", type=count_at_least(1), default=32,
                   help="IVF lists visited per search (nprobe; default: %(default)s)")
    p.add_argument("--batch-size", type=count_at_least(1), default=4096, metavar="N",
                   help="entries searched per FAISS call (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=float, default=600.0, metavar="SECONDS",
                   help="save progress for resuming at most this often (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete datastore at --output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    summary = run_reporting_errors(parser, lambda: prune_datastore(
        args.dstore, args.output, index=args.index, k=args.merge_k, nprobe=args.probe,
        batch_size=args.batch_size, overwrite=args.overwrite,
        checkpoint_every=args.checkpoint_every, progress=not args.quiet,
    ), interrupted="interrupted; rerun the same command to continue (progress is kept)")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
