"""kNN-LM evaluation cost against its two irreducible parts, in one run.

    python benchmarks/bench_knnlm_eval.py --workdir /tmp/bench-knn [--data DATA_BIN --path CKPT]

Measures, interleaved, on an evaluation slice of WikiText-2 test:
  plain    stock fairseq-eval-lm (language_modeling)
  knn      fairseq-eval-lm --knnlm --knn-sim-func faiss
  knn-l2   fairseq-eval-lm --knnlm --knn-sim-func l2
  search   the bare FAISS search of the same queries (same k, nprobe), timed in-process
and reports knn ÷ (plain + search); the target is ≤ 1.10.
"""

import argparse
import shlex
import sys
from pathlib import Path

from common import (
    USER_DIR, WIKITEXT2, alternate, eval_tokens_per_s, machine, median, prepare_wikitext2,
    run_quiet, timed, train_bench_model,
)

SEARCH_SNIPPET = """
import sys, time, faiss, numpy as np
from fairseq_knnlm.storage.datastore import Datastore
index = faiss.read_index(sys.argv[1])
faiss.extract_index_ivf(index).nprobe = int(sys.argv[4])
q = np.ascontiguousarray(np.asarray(Datastore(sys.argv[2]).keys, dtype=np.float32))
t = time.perf_counter()
index.search(q, int(sys.argv[3]))
print(f"SEARCH {time.perf_counter() - t:.3f} {len(q)}")
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="data-bin of WikiText-2 (default: binarize it)")
    parser.add_argument("--path", type=Path, help="checkpoint (default: train a small one)")
    parser.add_argument("--eval-bytes", type=int, default=120_000, help="size of the test slice evaluated")
    parser.add_argument("--store-split", default="valid", help="split the datastore is built from")
    parser.add_argument("--index-factory", default="IVF1024,PQ32")
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--probe", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    data = args.data or prepare_wikitext2(w)
    ckpt = args.path or train_bench_model(w, data)

    # The evaluation slice, binarized with the model's dictionary as split "bench".
    slice_bin = w / "slice-bin"
    if not (slice_bin / "bench.bin").exists():
        text = (WIKITEXT2 / "test.txt").read_bytes()[: args.eval_bytes]
        (w / "slice.txt").write_bytes(text[: text.rfind(b"\n") + 1])
        run_quiet(["fairseq-preprocess", "--only-source", "--srcdict", data / "dict.txt",
                   "--testpref", w / "slice.txt", "--destdir", w / "slice-raw", "--workers", "1"])
        slice_bin.mkdir(exist_ok=True)
        for f in ("dict.txt",):
            (slice_bin / f).write_bytes((data / f).read_bytes())
        for ext in ("bin", "idx"):
            (slice_bin / f"bench.{ext}").write_bytes((w / "slice-raw" / f"test.{ext}").read_bytes())

    eval_common = ["fairseq-eval-lm", slice_bin, "--path", ckpt, "--gen-subset", "bench",
                   "--tokens-per-sample", 512, "--context-window", 256, "--max-tokens", 8192,
                   "--cpu", "--num-workers", 0, "--no-progress-bar"]
    ours = ["--user-dir", USER_DIR, "--task", "knnlm_language_modeling"]
    store, queries = w / "store", w / "queries"
    if not (store / "meta.json").exists():
        timed(["fairseq-eval-lm", data, "--path", ckpt, "--gen-subset", args.store_split,
               "--tokens-per-sample", 512, "--context-window", 256, "--max-tokens", 8192, "--cpu",
               "--num-workers", 0, *ours, "--save-knnlm-dstore", "--dstore", store])
    if not (queries / "meta.json").exists():
        timed(eval_common + ours + ["--save-knnlm-dstore", "--dstore", queries])
    index = store / "knn.index"
    if not index.exists():
        timed(["fairseq-knnlm-build-index", "--dstore", store, "--index-factory", args.index_factory,
               "--train-size", 200_000])

    knn = ["--knnlm", "--dstore", store, "--k", args.k, "--probe", args.probe, "--lmbda", 0.25]
    commands = {
        "plain": eval_common + ["--task", "language_modeling"],
        "knn": eval_common + ours + knn + ["--knn-sim-func", "faiss"],
        "knn-l2": eval_common + ours + knn + ["--knn-sim-func", "l2"],
        "search": [sys.executable, "-c", SEARCH_SNIPPET, index, queries, args.k, args.probe],
    }
    results = alternate(commands, args.repeats)
    wall = {k: median([r[0] for r in v]) for k, v in results.items()}
    search_s = median([float(r[2].split("SEARCH ")[1].split()[0]) for r in results["search"]])
    n_queries = int(results["search"][0][2].split("SEARCH ")[1].split()[1])
    tps = {k: eval_tokens_per_s(results[k][-1][2])[1] for k in ("plain", "knn", "knn-l2")}
    ratio = wall["knn"] / (wall["plain"] + search_s)
    print(f"machine: {machine()}")
    for name, cmd in commands.items():
        print(f"{name}: {shlex.join(map(str, cmd))}" if name != "search" else "search: faiss index.search(queries, k) after nprobe is set")
    print(f"queries (scored tokens): {n_queries:,}; datastore: {args.store_split} split; index {args.index_factory}; k={args.k}; nprobe={args.probe}")
    print("| plain eval s | bare search s | kNN-LM (faiss) s | kNN ÷ (plain + search) | kNN-LM (l2) s | l2 ÷ faiss "
          "| plain tok/s | kNN faiss tok/s | kNN l2 tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {wall['plain']:.1f} | {search_s:.1f} | {wall['knn']:.1f} | {ratio:.3f} | {wall['knn-l2']:.1f} | "
          f"{wall['knn-l2'] / wall['knn']:.2f} | {tps['plain']:,.0f} | {tps['knn']:,.0f} | {tps['knn-l2']:,.0f} |")


if __name__ == "__main__":
    main()
