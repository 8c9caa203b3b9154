"""Datastore pass time ÷ plain fairseq-eval-lm time, on the same split, in one run.

    python benchmarks/bench_datastore_pass.py --workdir /tmp/bench [--split valid] [--repeats 3]

Without --path it binarizes WikiText-2 and briefly trains a 4-layer 256-d
adaptive LM to time.  Prints a Markdown table row for docs/BENCHMARKS.md.
"""

import argparse
import shlex
import shutil
from pathlib import Path

from common import (
    USER_DIR, alternate, eval_tokens_per_s, machine, median, prepare_wikitext2, train_bench_model,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="data-bin (default: binarize WikiText-2)")
    parser.add_argument("--path", type=Path, help="checkpoint (default: train a small one)")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--tokens-per-sample", type=int, default=512)
    parser.add_argument("--context-window", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.data or prepare_wikitext2(args.workdir)
    ckpt = args.path or train_bench_model(args.workdir, data)
    dstore = args.workdir / "bench-dstore"
    common = [
        "fairseq-eval-lm", data, "--path", ckpt, "--gen-subset", args.split,
        "--tokens-per-sample", args.tokens_per_sample, "--context-window", args.context_window,
        "--max-tokens", args.max_tokens, "--cpu", "--num-workers", "0", "--no-progress-bar",
    ]
    commands = {
        "plain": common + ["--task", "language_modeling"],
        "dstore": common + ["--user-dir", USER_DIR, "--task", "knnlm_language_modeling",
                            "--save-knnlm-dstore", "--dstore", dstore, "--dstore-fp16"],
    }
    results = alternate(
        commands, args.repeats,
        prepare=lambda name: shutil.rmtree(dstore, ignore_errors=True),
    )
    wall = {k: median([r[0] for r in v]) for k, v in results.items()}
    rss = {k: max(r[1] for r in v) for k, v in results.items()}
    tps = {k: eval_tokens_per_s(v[-1][2]) for k, v in results.items()}
    ratios = [d[0] / p[0] for d, p in zip(results["dstore"], results["plain"])]
    print(f"machine: {machine()}")
    for name, cmd in commands.items():
        print(f"{name}: {shlex.join(map(str, cmd))}")
    print("| split | tokens | plain eval-lm s | datastore pass s | ratio (median of pairs) "
          "| plain tok/s | pass tok/s | plain peak RSS MiB | pass peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.split} | {tps['plain'][0]:,} | {wall['plain']:.1f} | {wall['dstore']:.1f} | "
          f"{median(ratios):.3f} | {tps['plain'][1]:,.0f} | {tps['dstore'][1]:,.0f} | "
          f"{rss['plain']:.0f} | {rss['dstore']:.0f} |")


if __name__ == "__main__":
    main()
