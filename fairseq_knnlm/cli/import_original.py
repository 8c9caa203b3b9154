"""fairseq-knnlm-import: use a datastore (and index) made by the original kNN-LM code.

    fairseq-knnlm-import DATA_BIN --path CKPT --dstore-filename PREFIX \\
        --dstore-size N --dim D [--dstore-fp16] [--gen-subset train] \\
        [--knn-keytype last_ffn_input] [--first-token auto] \\
        [--indexfile ORIGINAL_INDEX] --dstore DSTORE_DIR

Keys are referenced, never copied; values are checked against the binarized
split (and rebuilt from it when int16 overflowed); the index is adopted after
checks.  Then ``fairseq-eval-lm ... --knnlm --dstore DSTORE_DIR`` uses them.
"""

import argparse
import json
import sys

from ..tools.importer import PROG, import_original
from ..integration.keys import KEYTYPES
from .common import count_at_least, run_reporting_errors


def _first_token(text: str):
    return None if text == "auto" else count_at_least(0)(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Turn the raw PREFIX_keys.npy / PREFIX_vals.npy memmaps (and the FAISS index) written "
        "by the original kNN-LM code (urvashik/knnlm) into a datastore of this package, without copying "
        "the keys: meta.json references the keys file. Values are checked against the binarized split "
        "they were made from (every one within the dictionary, equal to the split's tokens in order); "
        "int16 values (--dstore-fp16) that overflowed on a vocabulary above 32,767 types are rebuilt "
        "from the split after checking them modulo 2^16, and the number that were wrong is printed. "
        "An --indexfile is adopted (linked as DSTORE/knn.index, with our metadata) once its size, "
        "dimension and metric match and stored keys searched in it find themselves.",
    )
    p.add_argument("data", metavar="DATA_BIN", help="the binarized data (fairseq-preprocess output with dict.txt) "
                   "the datastore was made from")
    p.add_argument("--path", required=True, metavar="CKPT", help="the model checkpoint the datastore was made with")
    p.add_argument("--dstore-filename", "--dstore-mmap", dest="prefix", required=True, metavar="PREFIX",
                   help="the original's datastore prefix: PREFIX_keys.npy and PREFIX_vals.npy")
    p.add_argument("--dstore-size", type=count_at_least(1), required=True, metavar="N",
                   help="entries in the original datastore (its --dstore-size; 103225485 for WikiText-103)")
    p.add_argument("--dim", "--dimension", type=count_at_least(1), required=True, metavar="D",
                   help="key dimension (the original's --dimension / --decoder-embed-dim; 1024 for WikiText-103)")
    p.add_argument("--dstore-fp16", action="store_true",
                   help="the original ran with --dstore-fp16: float16 keys and int16 values")
    p.add_argument("--gen-subset", default="train", metavar="SPLIT",
                   help="the split of DATA_BIN the datastore was made from (default: %(default)s)")
    p.add_argument("--knn-keytype", choices=KEYTYPES, default="last_ffn_input",
                   help="the original's --knn-keytype (default: %(default)s)")
    p.add_argument("--first-token", type=_first_token, default=None, metavar="N|auto",
                   help="position in the split of entry 0's token. The original skips the split's first "
                   "block, so auto (default) takes the split's last --dstore-size tokens; recorded in meta.json")
    p.add_argument("--indexfile", metavar="FILE",
                   help="the original's FAISS index (faiss.write_index output) to adopt; leave out to build "
                   "one later with fairseq-knnlm-build-index")
    p.add_argument("--probe", type=count_at_least(1), default=32,
                   help="nprobe for the self-recall check, also saved as the index's nprobe (default: %(default)s)")
    p.add_argument("--self-recall-queries", type=count_at_least(1), default=1000, metavar="N",
                   help="stored keys searched in the index for the self-recall check (default: %(default)s)")
    p.add_argument("--self-recall-k", type=count_at_least(1), default=1024, metavar="K",
                   help="a key finds itself if its own position is among its K nearest (default: %(default)s)")
    p.add_argument("--min-self-recall", type=float, default=0.95, metavar="FRACTION",
                   help="refuse the index below this self-recall (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed of the self-recall sample (default: %(default)s)")
    p.add_argument("--dstore", required=True, metavar="DIR", help="the datastore directory to create")
    p.add_argument("--dstore-overwrite", action="store_true", help="replace a complete datastore at --dstore")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    meta = run_reporting_errors(parser, lambda: import_original(
        args.prefix, args.dstore_size, args.dim, args.dstore_fp16, args.path, args.data, args.dstore,
        split=args.gen_subset, keytype=args.knn_keytype, first_token=args.first_token,
        index_file=args.indexfile, nprobe=args.probe, self_recall_queries=args.self_recall_queries,
        self_recall_k=args.self_recall_k, min_self_recall=args.min_self_recall, seed=args.seed,
        overwrite=args.dstore_overwrite, progress=not args.quiet,
    ), interrupted="interrupted; rerun the same command (with --dstore-overwrite if --dstore was already written)")
    imported = meta["imported_from"]
    summary = dict(dstore=args.dstore, size=meta["size"], dim=meta["dim"], first_token=meta["first_token"],
                   vals_wrong=imported["vals_wrong"], vals_rebuilt=imported["vals_rebuilt"],
                   seconds=meta["seconds"])
    if "index" in meta:
        summary["index"] = {k: meta["index"][k] for k in ("factory", "metric", "ntotal", "self_recall")}
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
