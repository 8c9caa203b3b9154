"""fairseq-knnlm-prefix: a datastore of the first N entries of another (no second pass, no key copy).

    fairseq-knnlm-prefix --dstore DSTORE_DIR (--entries N | --fraction F) --output PREFIX_DIR [--overwrite]
"""

import argparse
import json
import sys

from ..tools.prefix import PROG, write_prefix
from .common import count_at_least, run_reporting_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Make the datastore of the first N entries of DSTORE: what a datastore pass over the "
        "split's first N tokens would have written, since entries are in corpus order. Its meta.json "
        "references DSTORE's keys in place (keep DSTORE where it is) and records prefix_of; only the N "
        "values are written. Build its index with fairseq-knnlm-build-index --dstore OUTPUT.",
    )
    p.add_argument("--dstore", required=True, metavar="DIR", help="datastore to take the prefix of (not sharded, not pruned)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--entries", type=count_at_least(1), metavar="N", help="entries of the prefix")
    size.add_argument("--fraction", type=float, metavar="F",
                      help="the prefix's share of DSTORE's entries, in (0, 1], rounded to the nearest entry")
    p.add_argument("--output", required=True, metavar="DIR", help="directory of the prefix datastore")
    p.add_argument("--overwrite", action="store_true", help="replace a complete datastore at --output")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    meta = run_reporting_errors(parser, lambda: write_prefix(
        args.dstore, args.output, entries=args.entries, fraction=args.fraction, overwrite=args.overwrite))
    print(json.dumps(dict(output=args.output, size=meta["size"], prefix_of=meta["prefix_of"],
                          seconds=meta["seconds"]), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
