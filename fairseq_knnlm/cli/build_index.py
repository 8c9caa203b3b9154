"""fairseq-knnlm-build-index: build the FAISS index of a datastore.

    fairseq-knnlm-build-index --dstore DSTORE_DIR [--index-factory "IVF4096,PQ64"] \\
        [--train-size 1000000] [--add-batch 500000] [--metric l2|ip] [--gpu] [--seed 1] \\
        [--output DSTORE_DIR/knn.index] [--eval-recall 2000]

An interrupted build (Ctrl-C, crash) is resumed by rerunning the same command.

Sharded build (stores too large for one job; index/shards.py):

    fairseq-knnlm-build-index --dstore DSTORE --train-only --output IDX/trained.index
    fairseq-knnlm-build-index --dstore DSTORE --trained IDX/trained.index --shard-id I --num-shards N
    fairseq-knnlm-build-index --merge IDX        # -> IDX/knn.index + IDX/knn.ivfdata (lists on disk)
"""

import argparse
import json
import sys

from ..errors import UserError
from ..index.build import build_index
from ..index.errors import PROG
from ..index.factory import DEFAULT_NLIST, DEFAULT_PQ_BYTES
from ..index.files import INDEX_FILE
from .common import count_at_least, run_reporting_errors


SUMMARY_FIELDS = ("kind", "factory", "metric", "ntotal", "train_size", "train_seconds", "add_seconds",
                  "shard_id", "num_shards", "first_id", "merge_seconds", "ondisk")


def _sharded(args) -> dict:
    from ..index import shards as sharded_index

    progress = not args.quiet
    if args.merge:
        return sharded_index.merge_shards(
            args.merge, output=args.output, overwrite=args.overwrite, dstore=args.dstore,
            eval_recall=args.eval_recall, nprobe=args.probe, seed=args.seed, progress=progress,
        )
    if args.train_only:
        if not args.output:
            raise UserError("--train-only needs --output IDX/trained.index (the directory of the pieces)")
        return sharded_index.train_only(
            args.dstore, args.output, factory=args.index_factory, train_size=args.train_size,
            metric=args.metric, gpu=args.gpu, seed=args.seed, overwrite=args.overwrite, nprobe=args.probe,
            progress=progress,
        )
    return sharded_index.add_shard(
        args.dstore, args.trained, args.shard_id, args.num_shards, output=args.output,
        add_batch=args.add_batch, gpu=args.gpu, overwrite=args.overwrite,
        checkpoint_every=args.checkpoint_every, progress=progress,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Build the FAISS index over a kNN-LM datastore's keys. Neighbour ids are "
        "datastore positions. Metadata (datastore identity, settings, times, recall) goes to "
        "OUTPUT.meta.json, written last; an interrupted build resumes when rerun. PQ codes skip "
        "FAISS's polysemous training, as the paper's IndexIVFPQ does (same search results, much "
        "faster training).",
    )
    p.add_argument("--dstore", metavar="DIR", help="datastore directory (single or sharded; required "
                   "except with --merge)")
    p.add_argument("--output", metavar="FILE", help=f"index file (default: DSTORE/{INDEX_FILE}; with "
                   f"--shard-id: shard-XXX-of-YYY.index beside --trained; with --merge: IDX/{INDEX_FILE})")
    sharded = p.add_argument_group(
        "sharded build", "train once, add each datastore shard in its own job, then merge the pieces "
        "into one index with on-disk inverted lists or search them in place (--knn-index IDX, "
        "--knn-distributed-index)")
    mode = sharded.add_mutually_exclusive_group()
    mode.add_argument("--train-only", action="store_true",
                      help="only train the empty IVF index on a sample of the whole store; write it to --output")
    mode.add_argument("--trained", metavar="FILE",
                      help="add the keys of datastore shard --shard-id of --num-shards to a copy of this "
                      "trained index (ids: datastore positions); resumable")
    mode.add_argument("--merge", metavar="IDX",
                      help="merge all index shards in directory IDX into one index whose inverted lists "
                      "stay on disk (OUTPUT without .index + .ivfdata, memory-mapped at search time)")
    sharded.add_argument("--shard-id", type=count_at_least(0), metavar="I",
                         help="with --trained: which shard (0-based)")
    sharded.add_argument("--num-shards", type=count_at_least(1), metavar="N",
                         help="with --trained: number of shards; a datastore written by N pass shards is "
                         "split along them, any other into N equal runs")
    p.add_argument(
        "--index-factory", metavar="STRING",
        help=f"any faiss.index_factory string, e.g. Flat (exact), IVF{DEFAULT_NLIST},PQ{DEFAULT_PQ_BYTES}, "
        "OPQ64,IVF4096,PQ64, PCA256,IVF1024,PQ32, fast-scan IVF4096,PQ64x4fs, HNSW coarse quantizer "
        "IVF65536_HNSW32,PQ64, refine IVF4096,PQ64x4fs,RFlat (default: the paper's "
        f"IVF{DEFAULT_NLIST},PQ{DEFAULT_PQ_BYTES}, with fewer centroids or a smaller PQ code when the "
        "store or the key dimension calls for it, or Flat for tiny stores; the choice is printed)",
    )
    p.add_argument("--metric", choices=("l2", "ip"), default="l2",
                   help="squared L2 distance or inner product (default: %(default)s)")
    p.add_argument("--train-size", type=count_at_least(1), default=1_000_000, metavar="N",
                   help="keys sampled to train the index; clamped to the store size (default: %(default)s)")
    p.add_argument("--add-batch", type=count_at_least(1), default=500_000, metavar="N",
                   help="keys read and added per chunk (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed of the training and query samples (default: %(default)s)")
    p.add_argument("--gpu", action="store_true",
                   help="run k-means and the coarse assignment of added keys on all visible GPUs "
                   "(needs a GPU build of faiss); the saved index is a CPU index")
    p.add_argument("--eval-recall", type=count_at_least(0), default=0, metavar="N",
                   help="measure recall@1/10/100/1024 (1024: kNN-LM's k; for stores of at least 1024 keys) "
                   "against exact search with N stored keys as queries (printed and stored in the "
                   "metadata; default: off)")
    p.add_argument("--probe", "--nprobe", dest="probe", type=count_at_least(1), default=32,
                   help="IVF lists probed (nprobe) by --eval-recall, also saved in the index (with --train-only: "
                   "in the trained index, so in every piece) (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=float, default=600.0, metavar="SECONDS",
                   help="save progress for resuming at most this often while adding (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete index at --output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.shard_id is None) != (args.num_shards is None) or (args.shard_id is not None and not args.trained):
        parser.error("--shard-id and --num-shards go together, with --trained")
    if args.trained and args.shard_id is None:
        parser.error("--trained needs --shard-id and --num-shards")
    if not args.merge and not args.dstore:
        parser.error("--dstore is required (except with --merge)")
    if args.merge and args.eval_recall and not args.dstore:
        parser.error("--merge with --eval-recall needs --dstore")
    meta = run_reporting_errors(
        parser, lambda: _sharded(args) if args.train_only or args.trained or args.merge else build_index(
            args.dstore, output=args.output, factory=args.index_factory,
            train_size=args.train_size, add_batch=args.add_batch, metric=args.metric,
            gpu=args.gpu, seed=args.seed, eval_recall=args.eval_recall, nprobe=args.probe,
            overwrite=args.overwrite, checkpoint_every=args.checkpoint_every,
            progress=not args.quiet,
        ), interrupted="interrupted; rerun the same command to continue (added keys are kept)")
    summary = {k: meta[k] for k in SUMMARY_FIELDS if k in meta}
    if "recall" in meta:
        summary["recall"] = meta["recall"]
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
