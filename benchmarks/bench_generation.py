"""Generation speed, tokens per second, of the plain LM and of kNN-LM, in one run.

    python benchmarks/bench_generation.py --workdir /tmp/bench-gen [--index-factory Flat] [--k 1024]

Without --path it binarizes WikiText-2 and briefly trains the 4-layer 256-d
adaptive LM of the other benchmarks; without --dstore it writes a datastore
of --dstore-split with that model and indexes it.  Both models generate from
the same prompts (the first words of WikiText-2 test lines) through the
fairseq hub, alternating plain / kNN-LM runs; eos is blocked until the
length limit so that both write exactly --new-tokens per hypothesis.  Prints
a Markdown table row for docs/BENCHMARKS.md.
"""

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from common import (
    USER_DIR, WIKITEXT2, machine, median, prepare_wikitext2, run_quiet, train_bench_model,
)


def build_datastore(workdir, data, ckpt, split):
    dstore = workdir / f"dstore-{split}"
    if not (dstore / "meta.json").exists():
        run_quiet([
            "fairseq-eval-lm", data, "--path", ckpt, "--gen-subset", split, "--user-dir", USER_DIR,
            "--task", "knnlm_language_modeling", "--save-knnlm-dstore", "--dstore", dstore,
            "--dstore-fp16", "--tokens-per-sample", "512", "--max-tokens", "8192", "--cpu",
            "--num-workers", "0", "--dstore-overwrite",
        ])
    return dstore


def build_index(dstore, factory):
    name = f"knn-{factory or 'default'}.index".replace(",", "_")
    index = dstore / name
    if not index.exists():
        cmd = ["fairseq-knnlm-build-index", "--dstore", dstore, "--output", index]
        run_quiet(cmd + (["--index-factory", factory] if factory else []))
    return index


def index_factory(index: Path) -> str:
    """The factory string the build tool recorded next to the index."""
    meta = Path(f"{index}.meta.json")
    return json.loads(meta.read_text()).get("factory", "?") if meta.exists() else "?"


def read_prompts(path: Path, n: int, words: int):
    """The first ``words`` words of the first ``n`` long enough non-heading lines."""
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        toks = line.split()
        if len(toks) >= words and not line.lstrip().startswith("="):
            prompts.append(" ".join(toks[:words]))
        if len(prompts) == n:
            break
    return prompts


class SearchClock:
    """Wall time spent inside the retriever's FAISS searches."""

    def __init__(self, retriever):
        self.seconds, self.calls = 0.0, 0
        search = retriever.search

        def timed(queries):
            start = time.perf_counter()
            try:
                return search(queries)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        retriever.search = timed


def generate(hub, prompts, args):
    """(seconds, generated tokens) of one batched generation."""
    tokens = [hub.encode(p) for p in prompts]
    prompt_len = max(len(t) for t in tokens)
    limit = prompt_len + args.new_tokens
    start = time.perf_counter()
    hypos = hub.generate(
        tokens, beam=args.beam, sampling=args.sampling, sampling_topk=args.topk,
        max_len_a=0, max_len_b=limit, min_len=limit,
    )
    seconds = time.perf_counter() - start
    new = sum(len(h[0]["tokens"]) for h in hypos) - sum(len(t) for t in tokens)
    return seconds, new


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="data-bin (default: binarize WikiText-2)")
    parser.add_argument("--path", type=Path, help="checkpoint (default: train a small one)")
    parser.add_argument("--dstore", type=Path, help="datastore (default: build one of --dstore-split)")
    parser.add_argument("--dstore-split", default="valid")
    parser.add_argument("--index-factory", help="FAISS factory (default: the build tool's choice)")
    parser.add_argument("--prompts-file", type=Path, default=WIKITEXT2 / "test.txt")
    parser.add_argument("--prompts", type=int, default=8, help="prompts generated in one batch")
    parser.add_argument("--prompt-words", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--sampling", action="store_true", help="top-k sampling instead of beam search")
    parser.add_argument("--topk", type=int, default=-1)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--lmbda", type=float, default=0.25)
    parser.add_argument("--probe", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from fairseq.models.transformer_lm import TransformerLanguageModel

    from fairseq_knnlm.integration.hub import from_pretrained

    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.data or prepare_wikitext2(args.workdir)
    ckpt = args.path or train_bench_model(args.workdir, data)
    dstore = args.dstore or build_datastore(args.workdir, data, ckpt, args.dstore_split)
    index = build_index(dstore, args.index_factory)
    prompts = read_prompts(args.prompts_file, args.prompts, args.prompt_words)

    plain = TransformerLanguageModel.from_pretrained(str(ckpt.parent), ckpt.name, str(data)).eval()
    knn = from_pretrained(
        str(ckpt.parent), ckpt.name, str(data), dstore=str(dstore), knn_index=str(index),
        k=args.k, lmbda=args.lmbda, probe=args.probe,
    ).eval()
    clock = SearchClock(knn.task.knnlm.retriever)
    hubs = {"plain": plain, "knn": knn}
    for hub in hubs.values():
        generate(hub, prompts[:1], args)  # warm-up: first-call allocations, index pages

    results = {name: [] for name in hubs}
    clock.seconds = clock.calls = 0
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, hub in hubs.items():
                results[name].append(generate(hub, prompts, args))
    tps = {name: median([n / s for s, n in r]) for name, r in results.items()}
    knn_seconds = sum(s for s, _ in results["knn"])
    steps = clock.calls / args.repeats

    factory = index_factory(index)
    if "IVF" in factory:
        factory += f", nprobe {args.probe}"
    mode = f"sampling top-{args.topk}" if args.sampling else f"beam {args.beam}"
    print(f"machine: {machine()}, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"command: python {shlex.join(['benchmarks/bench_generation.py', *sys.argv[1:]])}")
    print(f"datastore: {dstore} ({knn.task.knnlm.datastore.size:,} keys, dim {knn.task.knnlm.datastore.dim}), "
          f"index {index.name}")
    print("| datastore keys | index | k | λ | prompts × hypotheses | new tokens each | decoding "
          "| plain tok/s | kNN-LM tok/s | kNN-LM / plain | searches per batch | search share of kNN-LM time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {knn.task.knnlm.datastore.size:,} | {factory} | {args.k} | {args.lmbda} "
          f"| {len(prompts)} × {args.beam} | {args.new_tokens} | {mode} | {tps['plain']:,.0f} "
          f"| {tps['knn']:,.0f} | {tps['knn'] / tps['plain']:.3f} | {steps:.0f} "
          f"| {clock.seconds / knn_seconds:.0%} |")


if __name__ == "__main__":
    main()
