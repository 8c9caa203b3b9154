"""Fast kNN-LM: throughput against perplexity, every configuration side by side in one run.

    python benchmarks/bench_fast_knnlm.py --workdir WORK [--configs NAME,...] [--report-dir DIR]

WORK is an examples/wikitext2 work directory after its run (data-bin, ckpt,
dstore with the paper's IVF4096,PQ64 index, results.json with the temperature
and λ chosen on valid).  The benchmark

  1. builds the candidate indexes of INDEXES next to the datastore (recall@1024
     measured by the builder against exact search),
  2. saves the valid split's neighbours with the LM features once, sweeps them,
     and fits the adaptive-retrieval predictor on valid (retrieval fractions are
     chosen there, never on test),
  3. evaluates the whole test split with the base LM (stock fairseq-eval-lm) and
     with every configuration of CONFIGS, in that order, one process at a time,
  4. writes a table (markdown), the numbers (JSON) and the Pareto plot (PNG).

Throughput is fairseq-eval-lm's own "tokens/s" (the evaluation loop, without
start-up); the ratio is to the base LM measured in the same invocation.
Everything is resumable: finished indexes and runs are kept in WORK/fast/.
Run it alone on the machine: every other process on the cores skews the ratios.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import USER_DIR, eval_tokens_per_s, machine

PPL_RE = re.compile(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)")
SEARCHES_RE = re.compile(r"kNN searches: ([0-9,]+) for ([0-9,]+) scored tokens")

# name -> (index factory, training keys); "ref" is the example's own index.
INDEXES = {
    "ivfpq64": ("IVF4096,PQ64", None),
    "fs64": ("IVF4096,PQ64x4fs", 500_000),
    "fs128": ("IVF4096,PQ128x4fs", 500_000),
    "fs256": ("IVF4096,PQ256x4fs", 500_000),
    "fs32": ("IVF4096,PQ32x4fs", 500_000),
    "hnsw-fs64": ("IVF4096_HNSW32,PQ64x4fs", 500_000),
    "opq-fs32": ("OPQ32,IVF4096,PQ32x4fs", 500_000),
    "pca128-fs32": ("PCAR128,IVF4096,PQ32x4fs", 500_000),
    "pruned-fs64": ("IVF4096,PQ64x4fs", 500_000),  # of the pruned store (PRUNED below)
}
# The pruned store: greedy merging of each entry's PRUNE_K nearest, found through fs64 at nprobe 8.
PRUNED, PRUNE_K = "dstore-pruned", 8


def config(index, probe=32, **flags):
    return dict(index=index, probe=probe, **flags)


# name -> configuration; flags are fairseq-eval-lm options (True = bare switch).
CONFIGS = {
    "full": config("ivfpq64"),
    "fs64-p8": config("fs64", 8),
    "fs64-p8-overlap": config("fs64", 8, knn_overlap=True),
    "ivfpq64-p8": config("ivfpq64", 8),
    "ivfpq64-p8-overlap": config("ivfpq64", 8, knn_overlap=True),
    "hnsw-fs64-p8-overlap": config("hnsw-fs64", 8, knn_overlap=True),
    # "fs64-p8-pointers-overlap": config("fs64", 8, knn_pointers=True, knn_overlap=True),
    "full-adaptive50": config("ivfpq64", retrieval_fraction=0.5),
    "full-pointers": config("ivfpq64", knn_pointers=True),
    "full-overlap": config("ivfpq64", knn_overlap=True),
    "fs64-p8-overlap-f1": config("fs64", 8, knn_overlap=True, knn_faiss_threads=1),
    "fs32-p8": config("fs32", 8),
    "pca128-fs32-p8": config("pca128-fs32", 8),
    "opq-fs32-p8": config("opq-fs32", 8),
    "fs64-p8-l2x2": config("fs64", 8, knn_sim_func="l2", knn_candidates=2048),
    "pruned-fs64-p8": config("pruned-fs64", 8),
    "fs128-p8": config("fs128", 8),
    "fs128-p8-overlap": config("fs128", 8, knn_overlap=True),
    # T and λ chosen on valid for the configuration itself (its own saved neighbours)
    "fs64-p8-overlap-tuned": config("fs64", 8, knn_overlap=True, tune=True),
    "fs128-p8-overlap-tuned": config("fs128", 8, knn_overlap=True, tune=True),
    "fs256-p8": config("fs256", 8),
    "fs256-p16": config("fs256", 16),
    "fs128-p16": config("fs128", 16),
    "fs128-p16-overlap": config("fs128", 16, knn_overlap=True),
    "fs256-p16-overlap": config("fs256", 16, knn_overlap=True),
    "fs128-p12": config("fs128", 12),
}
# The example's grids (examples/wikitext2/run.py) for configurations tuned on valid.
TUNE_TEMPS, TUNE_LAMBDAS = "1,2,5,10,15,20,30,50,75,100", "0:0.9:0.025"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.workdir).resolve()
        self.out = self.work / "fast"
        self.out.mkdir(exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        self.results_path = self.out / "results.json"
        self.invocation = time.strftime("%Y-%m-%d %H:%M:%S")  # runs are compared within one invocation
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        example = json.loads((self.work / "results.json").read_text())
        chosen = example.get("chosen", {}).get("faiss")
        if chosen is None and not args.only_indexes:
            raise SystemExit(f"{self.work}: no setting chosen on valid yet; run examples/wikitext2/run.py first")
        chosen = chosen or dict(lmbda=None, knn_temp=None, k=1024)
        self.lmbda, self.temp, self.k = chosen["lmbda"], chosen["knn_temp"], chosen["k"]
        self.cfg = example["config"]
        self.data_bin = self.work / "data-bin"
        self.ckpt = self.work / "ckpt" / "checkpoint_best.pt"
        self.dstore = self.work / "dstore"

    # ------------------------------------------------------------ plumbing
    def save(self):
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, self.results_path)

    def run(self, cmd, name):
        cmd = [str(c) for c in cmd]
        line = shlex.join(cmd)
        log(f"$ {line}")
        env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        (self.out / "logs" / f"{name}.log").write_text(f"$ {line}\n{proc.stdout}")
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:])
            raise SystemExit(f"failed ({proc.returncode}): {line}")
        return proc.stdout

    def rel(self, path) -> str:
        """Paths in results and tables: relative to the work directory."""
        return os.path.relpath(str(path), str(self.work))

    def index_path(self, name):
        if name.startswith("pruned-"):
            return self.work / PRUNED / "knn.index"
        return self.dstore / ("knn.index" if name == "ivfpq64" else f"{name}.index")

    def dstore_of(self, index_name):
        return self.work / PRUNED if index_name.startswith("pruned-") else self.dstore

    def prune(self):
        """The pruned store (once), timed, and its size."""
        out = self.work / PRUNED
        if not (out / "meta.json").exists():
            self.build_indexes(["fs64"])
            started = time.time()
            self.run([sys.executable, "-m", "fairseq_knnlm.cli.prune", "--dstore", self.dstore, "--output", out,
                      "--index", self.index_path("fs64"), "--nprobe", 8, "--k", PRUNE_K, "--overwrite"], "prune")
            self.results["prune"] = dict(seconds=round(time.time() - started, 1))
        meta = json.loads((out / "meta.json").read_text())["pruned"]
        self.results.setdefault("prune", {}).update(size_before=meta["size_before"], size_after=meta["size_after"],
                                                    k=PRUNE_K, index="fs64, nprobe 8")
        self.save()

    def eval_cmd(self, split, *extra, knn=True):
        cmd = ["fairseq-eval-lm", self.data_bin, "--path", self.ckpt, "--gen-subset", split,
               "--tokens-per-sample", self.cfg["tokens_per_sample"], "--context-window",
               self.cfg["eval_context"], "--max-tokens", self.cfg["max_tokens"], "--cpu",
               "--num-workers", 0, "--no-progress-bar"]
        if knn:
            cmd += ["--user-dir", USER_DIR, "--task", "knnlm_language_modeling"]
        return cmd + list(extra)

    # ---------------------------------------------------------- 1. indexes
    def build_indexes(self, names):
        idx = self.results.setdefault("indexes", {})
        for name in names:
            if name in idx:
                continue
            factory, train = INDEXES[name]
            path = self.index_path(name)
            if name.startswith("pruned-"):
                self.prune()
            if name != "ivfpq64" and not Path(str(path) + ".meta.json").exists():
                self.run(["fairseq-knnlm-build-index", "--dstore", self.dstore_of(name), "--output", path,
                          "--index-factory", factory, "--train-size", train, "--nprobe", 32,
                          "--seed", 1, "--quiet", "--overwrite"], f"index-{name}")
            meta = json.loads(Path(str(path) + ".meta.json").read_text())
            idx[name] = dict(factory=meta["factory"], train_size=meta.get("train_size"),
                             train_seconds=meta.get("train_seconds"), add_seconds=meta.get("add_seconds"),
                             bytes=os.path.getsize(path))
            self.save()
        for name in names:
            self.measure_recall(name)

    def measure_recall(self, name):
        """recall@k of the index at each nprobe the configurations use (stored keys as queries)."""
        from fairseq_knnlm.storage.datastore import Datastore
        from fairseq_knnlm.index import KeyReader, evaluate_recall, load_index

        rec = self.results["indexes"][name].setdefault("recall", {})
        for probe in sorted({c["probe"] for c in CONFIGS.values() if c["index"] == name}):
            if str(probe) in rec:
                continue
            ds = Datastore(str(self.dstore_of(name)))
            index, meta = load_index(str(self.index_path(name)), ds, nprobe=probe)
            log(f"recall@{self.k} of {name} at nprobe {probe}")
            started = time.time()
            rec[str(probe)] = evaluate_recall(index, KeyReader(ds.keys), self.args.recall_queries,
                                              meta.get("metric", "l2"), ks=(1, 100, self.k))
            rec[str(probe)]["seconds"] = round(time.time() - started, 1)
            self.save()

    # ------------------------------------------------- 2. valid: predictor
    def fit_predictor(self):
        """Valid neighbours with LM features (full config), then the predictor fit on them.

        The example's own valid neighbours (saved at the full configuration) are used
        when they carry the LM features."""
        nbrs = self.out / "valid-full.nbrs"
        example_nbrs = self.work / "neighbors" / "valid-faiss"
        if (example_nbrs / "lm_features.npy").exists():
            nbrs = example_nbrs
        predictor = self.out / "retrieval-predictor.json"
        if not (nbrs / "meta.json").exists():
            self.run(self.eval_cmd("valid", *self.knn_flags(CONFIGS["full"]), "--knn-save-neighbors", nbrs,
                                   "--knn-save-neighbors-overwrite"), "valid-full")
        if not predictor.exists():
            out = self.run(["fairseq-knnlm-sweep", nbrs, "--k", self.k, "--knn-temp", self.temp,
                            "--lmbda", self.lmbda, "--retrieval-fractions", "0:1:0.05",
                            "--save-predictor", predictor, "--json", self.out / "valid-sweep.json",
                            "--no-plots", "--quiet"], "sweep-valid")
            self.results["valid_sweep"] = out.splitlines()[-40:]
            self.save()
        return predictor

    # ----------------------------------------------------------- 3. test
    def tuned_setting(self, name, c):
        """(λ, T) chosen on valid for this configuration: its own valid neighbours, swept."""
        tuned = self.results.setdefault("tuned", {})
        searched = {key: v for key, v in c.items() if key not in ("tune", "knn_overlap")}
        # Configurations that search alike (e.g. with and without --knn-overlap) share one tuning.
        same = [n for n in tuned if n in CONFIGS and
                {key: v for key, v in CONFIGS[n].items() if key not in ("tune", "knn_overlap")} == searched]
        if name not in tuned and same:
            tuned[name] = dict(tuned[same[0]], same_as=same[0])
        if name not in tuned:
            nbrs, js = self.out / f"valid-{name}.nbrs", self.out / f"valid-{name}-sweep.json"
            if not (nbrs / "meta.json").exists():
                self.run(self.eval_cmd("valid", *self.knn_flags(searched), "--knn-save-neighbors", nbrs,
                                       "--knn-save-neighbors-overwrite"), f"valid-{name}")
            self.run(["fairseq-knnlm-sweep", nbrs, "--k", self.k, "--knn-temp", TUNE_TEMPS, "--lmbda",
                      TUNE_LAMBDAS, "--json", js, "--no-plots", "--quiet"], f"sweep-valid-{name}")
            best = json.loads(js.read_text())["best"]
            tuned[name] = dict(lmbda=best["lmbda"], knn_temp=best["knn_temp"], valid_ppl=best["ppl"])
            self.save()
        return tuned[name]["lmbda"], tuned[name]["knn_temp"]

    def knn_flags(self, c, name=None):
        lmbda, temp = self.tuned_setting(name, c) if c.get("tune") else (self.lmbda, self.temp)
        flags = ["--knnlm", "--dstore", self.dstore_of(c["index"]), "--knn-index", self.index_path(c["index"]),
                 "--k", self.k, "--lmbda", lmbda, "--knn-temp", temp, "--probe", c["probe"]]
        for key, value in c.items():
            if key in ("index", "probe", "tune"):
                continue
            if key == "retrieval_fraction":
                flags += ["--knn-retrieval-predictor", self.out / "retrieval-predictor.json",
                          "--knn-retrieval-fraction", value]
            elif value is True:
                flags.append("--" + key.replace("_", "-"))
            else:
                flags += ["--" + key.replace("_", "-"), value]
        return flags

    def evaluate(self, name):
        runs = self.results.setdefault("runs", {})
        if name in runs and not self.args.rerun:
            return
        if name.startswith("base"):
            cmd = self.eval_cmd("test", "--task", "language_modeling", knn=False)
        else:
            cmd = self.eval_cmd("test", *self.knn_flags(CONFIGS[name], name))
        started = time.time()
        out = self.run(cmd, f"test-{name}")
        loss, ppl = PPL_RE.findall(out)[-1]
        tokens, tps = eval_tokens_per_s(out)
        searches = SEARCHES_RE.findall(out)
        per_token = (int(searches[-1][0].replace(",", "")) / int(searches[-1][1].replace(",", ""))
                     if searches else (0.0 if name.startswith("base") else None))
        runs[name] = dict(command=" ".join(self.rel(c) if str(c).startswith(str(self.work)) else str(c)
                                           for c in cmd),
                          loss=float(loss), ppl=float(ppl), tokens=tokens, tokens_per_s=tps,
                          searches_per_token=per_token, wall_seconds=round(time.time() - started, 1),
                          invocation=self.invocation,
                          finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.save()
        log(f"  {name}: ppl {ppl}, {tps:,.0f} tokens/s")

    # --------------------------------------------------------- 4. report
    def report(self, report_dir: Path):
        from fast_report import write_fast_report  # benchmarks/fast_report.py

        self.results["machine"] = machine()
        self.results["setting"] = dict(k=self.k, lmbda=self.lmbda, knn_temp=self.temp,
                                       chosen_on="valid (examples/wikitext2 sweep, IVF4096,PQ64, faiss)")
        self.save()
        roots = {self.work: "WORK/", Path(USER_DIR).parent: ""}
        return write_fast_report(self.results, CONFIGS, report_dir, roots)

    def main(self):
        names = [n for n in self.args.configs.split(",") if n] if self.args.configs else list(CONFIGS)
        unknown = set(names) - set(CONFIGS)
        if unknown:
            raise SystemExit(f"unknown --configs: {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}")
        self.build_indexes(sorted({CONFIGS[n]["index"] for n in names} | {"ivfpq64"}))
        if self.args.only_indexes:
            return
        if any("retrieval_fraction" in CONFIGS[n] for n in names):
            self.fit_predictor()
        # The base LM first and again last: ratios are to the first, the second shows how
        # steady the machine was.  A later invocation measures its own base LM.
        todo = [n for n in names if n not in self.results.get("runs", {}) or self.args.rerun]
        if todo:
            first = "base" if "base" not in self.results.get("runs", {}) else f"base {self.invocation}"
            for name in [first, *todo, f"base-end {self.invocation}"]:
                self.evaluate(name)
        paths = self.report(Path(self.args.report_dir).resolve())
        log("report: " + ", ".join(str(p) for p in paths))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="an examples/wikitext2 work directory after its run")
    p.add_argument("--configs", help=f"comma-separated subset of: {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--recall-queries", type=int, default=1000, help="stored keys used as recall queries")
    p.add_argument("--only-indexes", action="store_true", help="build the indexes (and recall), nothing else")
    p.add_argument("--rerun", action="store_true", help="re-time test runs already recorded")
    p.add_argument("--report-dir", default=str(Path(__file__).resolve().parents[1] / "docs" / "fast_knnlm"),
                   help="where the table, JSON and plot go (default: docs/fast_knnlm)")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    Bench(args).main()


if __name__ == "__main__":
    main()
