#!/usr/bin/env python3
"""kNN-LM on WikiText-2, end to end, on a CPU.

    python examples/wikitext2/run.py [--data DIR] [--workdir DIR] [--tiny] [--report-dir DIR]

Stages (each is skipped when its outputs are already complete in --workdir,
so an interrupted or partial run continues where it stopped, and an existing
work directory, e.g. one whose model was trained separately, is reused):

  data        locate WikiText-2 (--data, ../shared/data/wikitext-2, or download
              the official wikitext-2-v1.zip); --tiny takes a small slice
  preprocess  fairseq-preprocess --only-source -> WORKDIR/data-bin
  train       examples/wikitext2/train.sh (full; a fixed wall-clock budget) or a
              much smaller transformer for a few epochs (--tiny)
  baseline    fairseq-eval-lm, plain language_modeling task, valid and test
  dstore      fairseq-eval-lm --save-knnlm-dstore on train -> WORKDIR/dstore
  index       fairseq-knnlm-build-index: IVF-PQ (knn.index) and Flat (flat.index)
  knn-valid-faiss   fairseq-eval-lm --knnlm on valid with the index's (faiss)
                    distances, saving every token's neighbours (--knn-save-neighbors)
  sweep-valid-faiss fairseq-knnlm-sweep over k, temperature and lambda on the saved
                    valid neighbours; chooses temperature and lambda (at k = --k)
  knn-test-faiss    fairseq-eval-lm --knnlm on test at the settings chosen on valid
                    (confirms the chosen setting with a real run), saving neighbours
  sweep-test-faiss  the same grid on test, to report test numbers at valid-chosen settings
  dstore-size       sub-datastores of the first 10% and 30% of train (prefix copies),
                    their IVF-PQ indexes, and kNN-LM on valid with each
  subset            exact (Flat) search vs IVF-PQ (faiss and l2 distances) on the first
                    --subset-tokens tokens of valid (Flat search is too slow for whole splits)
  cache             the continuous cache (Grave et al., 2017), alone and with the kNN-LM: valid
                    neighbours saved with every token's key, cache size, θ, λc and λ swept on
                    them, test run at the valid-chosen setting; base, + cache, + kNN, + both
  keytypes          the paper's key comparison: a second datastore keyed by the last layer's
                    output (--knn-keytype last_layer_output) with its own IVF-PQ index, its own
                    T and λ chosen on valid, and a test run; against the main (last_ffn_input) store
  knn-valid-l2 ... sweep-test-l2   the four kNN stages again with exact (l2) distances
                    recomputed from the stored keys for the IVF-PQ candidates
  report      tables (results.md), results.json and PNG plots -> --report-dir

Numbers go to WORKDIR/results.json as stages finish; every command and its
output go to WORKDIR/logs/.
"""

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import preloaded  # noqa: E402  examples/wikitext2/preloaded.py: commands forked from one import of fairseq

# fairseq (tasks/text_to_speech.py) sets the root logger to DEBUG when imported; the plots need not say so.
logging.getLogger("matplotlib").setLevel(logging.WARNING)
SPLITS = ("train", "valid", "test")
SHARED_WIKITEXT2 = ROOT.parent / "shared" / "data" / "wikitext-2"
WIKITEXT2_URLS = (
    "https://wikitext.smerity.com/wikitext-2-v1.zip",
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
)
PPL_RE = re.compile(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)")
SPEED_RE = re.compile(r"Evaluated ([0-9,]+) tokens in ([0-9.]+)s \(([0-9.]+) tokens/s\)")
# In order of priority: the l2 runs cost most (key reads) and come last.
STAGES = ("data", "preprocess", "train", "baseline", "dstore", "index",
          "knn-valid-faiss", "sweep-valid-faiss", "knn-test-faiss", "sweep-test-faiss",
          "dstore-size", "subset", "cache", "keytypes", "knn-valid-l2", "sweep-valid-l2", "knn-test-l2", "sweep-test-l2", "report")

# Full: the model of train.sh (pre-norm, adaptive input/softmax, trained on 256-token blocks).
FULL = dict(
    slice_bytes=None,
    tokens_per_sample=256,   # = the training block: the model has seen no longer context
    dstore_context=64,       # datastore pass: each scored token sees >= 64 tokens of context
    eval_context=128,        # evaluation: >= 128 (half the block, as the datastore pass's ratio)
    max_tokens=4096,         # 16 blocks = 2048 queries per batch: l2 reads their 1024 neighbour keys (2 GiB)
    ivfpq_factory="IVF4096,PQ64",  # the paper's index, trained on 1M keys like the paper's
    ivfpq_train=1_000_000,
    recall_queries=1000,
    subset_tokens=3000,
    size_fractions=(0.1, 0.3),
)
# Tiny: a small slice and a small model; the same stages and code path.
TINY = dict(
    slice_bytes={"train": 400_000, "valid": 40_000, "test": 40_000},
    tokens_per_sample=128,
    dstore_context=64,
    eval_context=64,
    max_tokens=4096,
    ivfpq_factory="IVF128,PQ16",
    ivfpq_train=250_000,
    recall_queries=200,
    subset_tokens=1000,
    size_fractions=(0.1, 0.3),
)
TINY_TRAIN = [
    "--arch", "transformer_lm", "--decoder-layers", "2", "--decoder-embed-dim", "64",
    "--decoder-ffn-embed-dim", "256", "--decoder-attention-heads", "2", "--decoder-normalize-before",
    "--decoder-input-dim", "64", "--decoder-output-dim", "64",
    "--adaptive-input", "--adaptive-input-cutoff", "2000,6000",
    "--adaptive-softmax-cutoff", "2000,6000", "--tie-adaptive-weights",
    "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp",
    "--tokens-per-sample", "128", "--sample-break-mode", "none", "--max-tokens", "4096",
    "--optimizer", "adam", "--lr", "0.003", "--max-epoch", "2", "--cpu", "--num-workers", "0",
    "--seed", "1", "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "20",
]
KS = (1, 8, 64, 256, 1024)
TEMPS = (1, 2, 5, 10, 15, 20, 30, 50, 75, 100)
LAMBDAS = "0:0.9:0.025"
PAPER_LAMBDA, PAPER_TEMP = 0.25, 1.0
# Continuous cache (Grave et al., 2017): the grid swept on valid, jointly with LAMBDAS at the chosen k and T.
CACHE_SIZES = (100, 250, 500, 1000, 2000)
CACHE_THETAS = (0.003, 0.01, 0.03, 0.1, 0.3, 1, 3)
CACHE_LAMBDAS = "0:0.7:0.05"
CACHE_SAVE_THETA, CACHE_SAVE_LMBDA = 0.1, 0.1  # of the run that saves valid's keys (the grid decides)
SIM_FUNCS = ("faiss", "l2")
MAIN_KEYTYPE, OTHER_KEYTYPE = "last_ffn_input", "last_layer_output"  # the task's default, and the one compared


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Pipeline:
    def __init__(self, args):
        self.args = args
        self.cfg = dict(TINY if args.tiny else FULL)
        self.cfg["eval_tokens"] = None
        for key in ("dstore_context", "eval_context", "max_tokens", "ivfpq_factory", "ivfpq_train",
                    "subset_tokens", "eval_tokens"):
            if getattr(args, key) is not None:
                self.cfg[key] = getattr(args, key)
        self.work = Path(args.workdir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        self.results_path = self.work / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.results.setdefault("stages", {})
        self.results["mode"] = "tiny" if args.tiny else "full"
        self.results["config"] = dict(self.cfg, k=args.k, probe=args.probe, ks=list(KS), temps=list(TEMPS),
                                      lambdas=LAMBDAS, hours=args.hours)
        self.data_bin = self.work / "data-bin"
        self.ckpt_dir = self.work / "ckpt"
        self.ckpt = self.ckpt_dir / "checkpoint_best.pt"
        self.dstore = self.work / "dstore"
        self.ivfpq = self.dstore / "knn.index"
        self.flat = self.dstore / "flat.index"
        self.nbrs = self.work / "neighbors"
        self.sweeps = self.work / "sweeps"
        import fairseq_knnlm

        self.user_dir = os.path.dirname(fairseq_knnlm.__file__)

    # ------------------------------------------------------------ plumbing
    def rel(self, path):
        """A path as results.json records it: relative to the work directory."""
        return os.path.relpath(os.path.abspath(str(path)), self.work)

    def at(self, recorded):
        """The path of a recorded (work-relative, or older absolute) path."""
        return self.work / recorded

    def portable(self, cmd):
        """A command line as results.json records it: to be run from the work directory."""
        return " ".join(_quote(self.rel(c) if os.path.isabs(c) else c) for c in map(str, cmd))

    def save(self):
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=float))
        os.replace(tmp, self.results_path)

    def run(self, cmd, logname, env=None):
        """Run a command, its output appended to logs/LOGNAME.log; returns the output."""
        cmd = [str(c) for c in cmd]
        path = self.work / "logs" / f"{logname}.log"
        line = " ".join(_quote(c) for c in cmd)
        log(f"$ {line}")
        started = time.time()
        with open(path, "a") as f:
            f.write(f"$ {line}\n")
        returncode = preloaded.run(cmd, path, ROOT, env)
        out = path.read_text()
        out = out[out.rfind(f"$ {line}\n"):]
        if returncode != 0:
            sys.stderr.write(out[-4000:])
            raise SystemExit(f"command failed ({returncode}), see {path}: {line}")
        self.results.setdefault("commands", {})[logname] = self.portable(cmd)
        log(f"  done in {time.time() - started:.1f}s")
        return out

    def stage(self, name, done, fn):
        rec = self.results["stages"].get(name, {})
        if name in self.args.skip:
            log(f"stage {name}: skipped (--skip)")
            return
        if done():
            log(f"stage {name}: outputs complete, skipped")
            if name not in self.results["stages"]:  # made outside this script: not timed here
                self.results["stages"][name] = dict(seconds=None, note="outputs found complete")
                self.save()
            return
        log(f"stage {name}")
        started = time.time()
        fn()
        rec = dict(seconds=round(time.time() - started, 1), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.results["stages"][name] = rec
        self.save()

    def eval_lm(self, split, context, logname, *extra, data_bin=None, knn=True):
        cmd = ["fairseq-eval-lm", data_bin or self.data_bin, "--path", self.ckpt, "--gen-subset", split,
               "--tokens-per-sample", self.cfg["tokens_per_sample"], "--context-window", context,
               "--max-tokens", self.cfg["max_tokens"], "--cpu", "--num-workers", 0,
               "--log-format", "simple", "--log-interval", 200]
        if knn:
            cmd += ["--user-dir", self.user_dir, "--task", "knnlm_language_modeling"]
        return parse_eval(self.run(cmd + list(extra), logname), logname)

    @property
    def eval_bin(self):
        """data-bin for the kNN-LM evaluations: the whole splits, or their first --eval-tokens tokens."""
        n = self.cfg.get("eval_tokens")
        if not n:
            return self.data_bin
        out = self.work / f"data-bin-eval{n}"
        if not (out / "test.bin").exists():
            heads = {}
            for split in ("valid", "test"):
                heads[split] = self.work / f"raw-eval{n}" / f"{split}.txt"
                heads[split].parent.mkdir(exist_ok=True)
                self.results.setdefault("eval_heads", {})[split] = write_head(
                    self.at(self.results["data"]["files"][split]), heads[split], n)
            if out.exists():
                shutil.rmtree(out)
            self.run(["fairseq-preprocess", "--only-source", "--srcdict", self.data_bin / "dict.txt",
                      "--validpref", heads["valid"], "--testpref", heads["test"], "--destdir", out,
                      "--workers", 1], "preprocess-eval")
        return out

    def knn_eval(self, split, dstore, index, sim, lmbda, temp, save, logname, k=None, data_bin=None, cache=None,
                 keytype=MAIN_KEYTYPE):
        extra = ["--knnlm", "--dstore", dstore, "--knn-index", index, "--k", k or self.args.k,
                 "--lmbda", lmbda, "--knn-temp", temp, "--probe", self.args.probe, "--knn-sim-func", sim,
                 "--knn-keytype", keytype]
        if cache:  # (size, θ, λc) of the continuous cache; its neighbours then carry every token's key
            extra += ["--knn-cache-size", cache[0], "--knn-cache-theta", cache[1], "--knn-cache-lmbda", cache[2]]
        if save:
            if Path(save).exists():
                shutil.rmtree(save)  # an incomplete earlier attempt (no recorded result)
            extra += ["--knn-save-neighbors", save]
        res = self.eval_lm(split, self.cfg["eval_context"], logname, *extra, data_bin=data_bin or self.eval_bin)
        res.update(k=int(k or self.args.k), lmbda=float(lmbda), knn_temp=float(temp), sim_func=sim,
                   index=self.rel(index), dstore=self.rel(dstore))
        if cache:
            res.update(cache_size=int(cache[0]), cache_theta=float(cache[1]), cache_lmbda=float(cache[2]))
        return res

    def sweep(self, nbrs, name, ks=KS, temps=TEMPS, lambdas=LAMBDAS, plots=False, cache=None):
        """fairseq-knnlm-sweep (in this process) -> its JSON report."""
        from fairseq_knnlm.cli import sweep as sweep_cli
        from fairseq_knnlm.storage.neighbors import read_neighbors

        saved_k = read_neighbors(str(nbrs)).k
        ks = [k for k in ks if k <= saved_k] or [saved_k]
        if saved_k not in ks and saved_k < max(KS):
            ks.append(saved_k)  # the store-limited maximum
        self.sweeps.mkdir(exist_ok=True)
        out_json = self.sweeps / f"{name}.json"
        argv = [str(nbrs), "--k", ",".join(map(str, ks)), "--knn-temp", ",".join(map(str, temps)),
                "--lmbda", lambdas, "--json", str(out_json), "--quiet"]
        argv += ["--plot-prefix", str(self.sweeps / name)] if plots else ["--no-plots"]
        if cache:  # grids of cache sizes, θ and λc, swept jointly with λ
            argv += ["--knn-cache-size", _grid(cache[0]), "--knn-cache-theta", _grid(cache[1]),
                     "--knn-cache-lmbda", _grid(cache[2])]
        line = "fairseq-knnlm-sweep " + " ".join(_quote(a) for a in argv)
        log(f"$ {line}")
        started = time.time()
        with open(self.work / "logs" / f"sweep-{name}.log", "w") as f:
            f.write(f"$ {line}\n")
            sweep_cli.run(sweep_cli.build_parser().parse_args(argv), out=f)
        log(f"  done in {time.time() - started:.1f}s")
        self.results.setdefault("commands", {})[f"sweep-{name}"] = self.portable(["fairseq-knnlm-sweep", *argv])
        rep = json.loads(out_json.read_text())
        rep["file"] = self.rel(rep["file"])
        return rep

    # -------------------------------------------------------------- stages
    def raw_paths(self):
        return {s: self.work / "raw" / f"{s}.txt" for s in SPLITS} if self.args.tiny else \
            {s: self.at(p) for s, p in self.results["data"]["files"].items()}

    def do_data(self):
        src = find_wikitext2(self.args.data, self.work)
        files = {s: str(p) for s, p in src.items()}
        if self.args.tiny:
            (self.work / "raw").mkdir(exist_ok=True)
            for split, nbytes in self.cfg["slice_bytes"].items():
                text = Path(files[split]).read_bytes()[:nbytes]
                (self.work / "raw" / f"{split}.txt").write_bytes(text[: text.rfind(b"\n") + 1])
            files = {s: str(self.work / "raw" / f"{s}.txt") for s in SPLITS}
        self.results["data"] = dict(source=self.rel(Path(src["train"]).parent),
                                    files={s: self.rel(p) for s, p in files.items()},
                                    tokens={s: count_tokens(files[s]) for s in SPLITS})

    def data_done(self):
        d = self.results.get("data")
        return bool(d) and all(self.at(p).exists() for p in d["files"].values())

    def do_preprocess(self):
        files = {s: self.at(p) for s, p in self.results["data"]["files"].items()}
        if self.data_bin.exists():
            shutil.rmtree(self.data_bin)
        self.run(["fairseq-preprocess", "--only-source", "--trainpref", files["train"],
                  "--validpref", files["valid"], "--testpref", files["test"],
                  "--destdir", self.data_bin, "--workers", os.cpu_count() or 1], "preprocess")

    def preprocess_done(self):
        return all((self.data_bin / f"{s}.{e}").exists() for s in SPLITS for e in ("bin", "idx")) and \
            (self.data_bin / "dict.txt").exists()

    def train_log(self):
        return self.work / "train.log"

    def train_done(self):
        log_path = self.train_log()
        if not self.ckpt.exists() or not log_path.exists():
            return False
        m = re.search(r"done training in ([0-9.]+) seconds", log_path.read_text())
        if m:
            self.results["stages"].setdefault("train", dict(seconds=float(m.group(1)), note="from train.log"))
        return m is not None

    def do_train(self):
        log_path = self.train_log()
        if log_path.exists() and time.time() - log_path.stat().st_mtime < 300 and \
                "done training" not in log_path.read_text():
            raise SystemExit(f"{log_path} was written in the last 5 minutes and training has not finished: "
                             "is a training run still going? Wait for it, or remove the log to start anew")
        if self.args.tiny:
            cmd = ["fairseq-train", self.data_bin, "--task", "language_modeling", *TINY_TRAIN,
                   "--save-dir", self.ckpt_dir]
        else:
            cmd = ["bash", HERE / "train.sh", self.data_bin, self.ckpt_dir, self.args.hours]
        line = " ".join(_quote(str(c)) for c in cmd)
        log(f"$ {line}  > {log_path}")
        if preloaded.run([str(c) for c in cmd], log_path, ROOT) != 0:
            raise SystemExit(f"training failed, see {log_path}")
        self.results.setdefault("commands", {})["train"] = self.portable(cmd)

    def do_baseline(self):
        base = {}
        for split in ("valid", "test"):
            base[split] = self.eval_lm(split, self.cfg["eval_context"], f"baseline-{split}", knn=False)
        self.results["baseline"] = base

    def do_dstore(self):
        self.results["dstore"] = self.eval_lm("train", self.cfg["dstore_context"], "dstore", "--save-knnlm-dstore",
                                              "--dstore", self.dstore, "--dstore-overwrite")
        self.describe_dstore()

    def describe_dstore(self, dstore=None, rec=None):
        from fairseq_knnlm.storage.datastore import Datastore

        dstore = dstore or self.dstore
        ds = Datastore(str(dstore))
        (rec or self.results["dstore"]).update(size=ds.size, dim=ds.dim, keys_dtype=str(ds.keys.dtype),
                                               keys_bytes=os.path.getsize(dstore / "keys.npy"),
                                               context_window=ds.meta.get("context_window"),
                                               keytype=ds.meta.get("keytype"))

    def dstore_done(self):
        if not (self.dstore / "meta.json").exists():
            return False
        if "dstore" not in self.results:  # written by an earlier, interrupted invocation
            out = (self.work / "logs" / "dstore.log").read_text()
            self.results["dstore"] = parse_eval(out[out.rfind("$ fairseq-eval-lm"):])
            self.describe_dstore()
            self.results["stages"]["dstore"] = dict(seconds=self.results["dstore"].get("eval_seconds"),
                                                    note="fairseq-eval-lm's own timing, from its log")
            self.save()
        return True

    def build_index(self, dstore, output, factory, train_size, logname, recall=0):
        cmd = ["fairseq-knnlm-build-index", "--dstore", dstore, "--output", output, "--index-factory", factory,
               "--train-size", train_size, "--nprobe", self.args.probe, "--seed", 1, "--quiet", "--overwrite"]
        if recall:
            cmd += ["--eval-recall", recall]
        self.run(cmd, logname)
        meta = json.loads(Path(str(output) + ".meta.json").read_text())
        return {k: meta.get(k) for k in ("factory", "ntotal", "train_size", "train_seconds", "add_seconds",
                                         "build_seconds", "recall", "nprobe")} | \
            dict(bytes=os.path.getsize(output))

    def do_index(self):
        idx = self.results.setdefault("index", {})
        if not index_complete(self.ivfpq):
            idx["ivfpq"] = self.build_index(self.dstore, self.ivfpq, self.cfg["ivfpq_factory"],
                                            self.cfg["ivfpq_train"], "index-ivfpq", self.cfg["recall_queries"])
            self.save()
        if not index_complete(self.flat):
            idx["flat"] = self.build_index(self.dstore, self.flat, "Flat", 1, "index-flat")

    def index_done(self):
        return index_complete(self.ivfpq) and index_complete(self.flat) and \
            {"ivfpq", "flat"} <= set(self.results.get("index", {}))

    def do_knn(self, split, sim):
        if split == "valid":   # the paper's λ and T; the saved neighbours do not depend on them
            lmbda, temp = PAPER_LAMBDA, PAPER_TEMP
        else:                  # the setting chosen on valid
            chosen = self.results["chosen"][sim]
            lmbda, temp = chosen["lmbda"], chosen["knn_temp"]
        self.nbrs.mkdir(exist_ok=True)
        self.results.setdefault(f"knn_{split}", {})[sim] = self.knn_eval(
            split, self.dstore, self.ivfpq, sim, lmbda, temp, self.nbrs / f"{split}-{sim}", f"knn-{split}-{sim}")

    def knn_done(self, split, sim):
        return sim in self.results.get(f"knn_{split}", {}) and (self.nbrs / f"{split}-{sim}" / "meta.json").exists()

    def do_sweep(self, split, sim):
        rep = compact_sweep(self.sweep(self.nbrs / f"{split}-{sim}", f"{split}-{sim}",
                                       plots=(split == "valid" and sim == "faiss")))
        self.results.setdefault(f"sweep_{split}", {})[sim] = rep
        if split == "valid":
            self.results.setdefault("chosen", {})[sim] = choose(rep, self.args.k)

    def sweep_done(self, split, sim):
        return sim in self.results.get(f"sweep_{split}", {})

    def do_dstore_size(self):
        from fairseq_knnlm.storage.datastore import Datastore

        sizes = self.results.setdefault("dstore_size", {})
        full = Datastore(str(self.dstore))
        chosen = self.results["chosen"]["faiss"]
        for frac in self.cfg["size_fractions"]:
            tag = f"p{round(frac * 100):02d}"
            if tag in sizes and "sweep" in sizes[tag]:
                continue
            sub = self.work / f"dstore-{tag}"
            n = int(round(frac * full.size))
            started = time.time()
            if not (sub / "meta.json").exists() or Datastore(str(sub)).size != n:
                write_prefix_datastore(full, sub, n, frac)
            copy_s = time.time() - started
            index = sub / "knn.index"
            idx = self.build_index(sub, index, self.cfg["ivfpq_factory"], min(self.cfg["ivfpq_train"], n),
                                   f"index-ivfpq-{tag}")
            k = min(self.args.k, n)
            nb = self.nbrs / f"valid-faiss-{tag}"
            run = self.knn_eval("valid", sub, index, "faiss", chosen["lmbda"], chosen["knn_temp"], nb,
                                f"knn-valid-faiss-{tag}", k=k)
            rep = compact_sweep(self.sweep(nb, f"valid-faiss-{tag}"))
            sizes[tag] = dict(fraction=frac, size=n, copy_seconds=round(copy_s, 1), index=idx, run=run,
                              sweep=rep, chosen=choose(rep, k), seconds=round(time.time() - started, 1))
            self.save()

    def dstore_size_done(self):
        sizes = self.results.get("dstore_size", {})
        return all(f"p{round(f * 100):02d}" in sizes for f in self.cfg["size_fractions"])

    def do_subset(self):
        sub = self.results.setdefault("subset", {})
        head = self.work / "raw-subset" / "valid.txt"
        bin_dir = self.work / "data-bin-subset"
        if not (bin_dir / "valid.bin").exists():
            head.parent.mkdir(exist_ok=True)
            sub["tokens_raw"] = write_head(self.at(self.results["data"]["files"]["valid"]), head,
                                           self.cfg["subset_tokens"])
            if bin_dir.exists():
                shutil.rmtree(bin_dir)
            self.run(["fairseq-preprocess", "--only-source", "--srcdict", self.data_bin / "dict.txt",
                      "--validpref", head, "--destdir", bin_dir, "--workers", 1], "preprocess-subset")
        if "baseline" not in sub:
            sub["baseline"] = self.eval_lm("valid", self.cfg["eval_context"], "subset-baseline",
                                           data_bin=bin_dir, knn=False)
            self.save()
        # One setting for all three (chosen on the whole of valid with faiss distances),
        # plus each one's own sweep on the subset.
        setting = self.results["chosen"]["faiss"]
        plan = [("ivfpq-faiss", self.ivfpq, "faiss"), ("ivfpq-l2", self.ivfpq, "l2"),
                ("flat", self.flat, "faiss")]  # Flat's own distances are exact squared L2
        for name, index, sim in plan:
            if name in sub and "sweep" in sub[name]:
                continue
            nb = self.nbrs / f"subset-{name}"
            run = self.knn_eval("valid", self.dstore, index, sim, setting["lmbda"], setting["knn_temp"], nb,
                                f"subset-{name}", data_bin=bin_dir)
            sub[name] = dict(run=run, sweep=compact_sweep(self.sweep(nb, f"subset-{name}")))
            self.save()

    def do_cache(self):
        """The continuous cache with and without the kNN-LM (faiss distances, k and T as chosen on valid):
        save valid's neighbours with every token's key, sweep cache size, θ, λc and λ on them,
        run test at the setting chosen on valid and read off the four models on test from its sweep."""
        c = self.results.setdefault("cache", {})
        knn = self.results["chosen"]["faiss"]
        k, temp = knn["k"], knn["knn_temp"]
        grid = (CACHE_SIZES, CACHE_THETAS, CACHE_LAMBDAS)
        if "valid_run" not in c:
            c["valid_run"] = self.knn_eval("valid", self.dstore, self.ivfpq, "faiss", knn["lmbda"], temp,
                                           self.nbrs / "valid-faiss-cache", "cache-valid", k=k,
                                           cache=(max(CACHE_SIZES), CACHE_SAVE_THETA, CACHE_SAVE_LMBDA))
            self.save()
        if "chosen" not in c:
            rep = self.sweep(self.nbrs / "valid-faiss-cache", "valid-faiss-cache", ks=[k], temps=[temp], cache=grid)
            c["grid"] = dict(sizes=list(CACHE_SIZES), thetas=list(CACHE_THETAS), cache_lambdas=CACHE_LAMBDAS,
                             lambdas=LAMBDAS, k=k, knn_temp=temp)
            c["chosen"] = rep["cache"]["rows"]  # base, cache, knn, both: each at its best setting on valid
            c["per_size"] = rep["cache"]["per_size"]
            self.save()
        rows = c["chosen"]
        with_cache = [r for r in rows.values() if r["cache_lmbda"]] or \
            [dict(cache_size=max(CACHE_SIZES), cache_theta=CACHE_SAVE_THETA)]  # keys are saved all the same
        if "test_run" not in c:
            both = rows["both"]
            setting = (both["cache_size"] or with_cache[0]["cache_size"],
                       both["cache_theta"] or with_cache[0]["cache_theta"], both["cache_lmbda"])
            c["test_run"] = self.knn_eval("test", self.dstore, self.ivfpq, "faiss", both["lmbda"], temp,
                                          self.nbrs / "test-faiss-cache", "cache-test", k=k, cache=setting)
            self.save()
        if "table" not in c:
            test_grid = (sorted({r["cache_size"] for r in with_cache}), sorted({r["cache_theta"] for r in with_cache}),
                         sorted({r["cache_lmbda"] for r in rows.values()}))
            lambdas = _grid(sorted({r["lmbda"] for r in rows.values()}))
            rep = self.sweep(self.nbrs / "test-faiss-cache", "test-faiss-cache", ks=[k], temps=[temp],
                             lambdas=lambdas, cache=test_grid)["cache"]
            c["table"] = {name: dict(setting={key: r[key] for key in ("lmbda", "cache_size", "cache_theta",
                                                                        "cache_lmbda")},
                                     valid=r["ppl"], test=cache_cell(rep, r)) for name, r in rows.items()}
            c["test_sweep_base"] = rep["base"]

    def cache_done(self):
        return "table" in self.results.get("cache", {})

    def do_keytypes(self):
        """A datastore keyed by OTHER_KEYTYPE, each step recorded as it finishes: the datastore pass,
        its IVF-PQ index (the main one's factory and training size), the valid run saving neighbours,
        the sweep choosing T and λ at k = --k, and the test run at that setting."""
        kt = self.results.setdefault("keytypes", {})
        main = self.results["chosen"]["faiss"]
        kt[MAIN_KEYTYPE] = dict(dstore={key: self.results["dstore"].get(key) for key in
                                        ("size", "dim", "tokens_per_s", "eval_seconds")},
                                index=self.results["index"]["ivfpq"], chosen=main,
                                test=self.results["knn_test"]["faiss"])
        rec = kt.setdefault(OTHER_KEYTYPE, {})
        dstore = self.work / f"dstore-{OTHER_KEYTYPE}"
        if "dstore" not in rec:
            rec["dstore"] = self.eval_lm("train", self.cfg["dstore_context"], f"dstore-{OTHER_KEYTYPE}",
                                         "--save-knnlm-dstore", "--knn-keytype", OTHER_KEYTYPE,
                                         "--dstore", dstore, "--dstore-overwrite")
            self.describe_dstore(dstore, rec["dstore"])
            self.save()
        index = dstore / "knn.index"
        if "index" not in rec or not index_complete(index):
            rec["index"] = self.build_index(dstore, index, self.cfg["ivfpq_factory"], self.cfg["ivfpq_train"],
                                            f"index-ivfpq-{OTHER_KEYTYPE}", self.cfg["recall_queries"])
            self.save()
        nb = self.nbrs / f"valid-faiss-{OTHER_KEYTYPE}"
        if "valid_run" not in rec:
            rec["valid_run"] = self.knn_eval("valid", dstore, index, "faiss", PAPER_LAMBDA, PAPER_TEMP, nb,
                                             f"knn-valid-faiss-{OTHER_KEYTYPE}", keytype=OTHER_KEYTYPE)
            self.save()
        if "chosen" not in rec:
            rec["sweep"] = compact_sweep(self.sweep(nb, f"valid-faiss-{OTHER_KEYTYPE}"))
            rec["chosen"] = choose(rec["sweep"], self.args.k)
            self.save()
        if "test" not in rec:
            c = rec["chosen"]
            rec["test"] = self.knn_eval("test", dstore, index, "faiss", c["lmbda"], c["knn_temp"], None,
                                        f"knn-test-faiss-{OTHER_KEYTYPE}", keytype=OTHER_KEYTYPE)

    def keytypes_done(self):
        return "test" in self.results.get("keytypes", {}).get(OTHER_KEYTYPE, {})

    def do_whole_test(self):
        """With --eval-tokens: the whole test split at the faiss setting chosen on valid."""
        c = self.results["chosen"]["faiss"]
        self.results["whole_test"] = self.knn_eval("test", self.dstore, self.ivfpq, "faiss", c["lmbda"],
                                                   c["knn_temp"], None, "whole-test-faiss", data_bin=self.data_bin)

    def subset_done(self):
        sub = self.results.get("subset", {})
        return all(n in sub and "sweep" in sub[n] for n in ("ivfpq-faiss", "ivfpq-l2", "flat"))

    # ---------------------------------------------------------------- main
    def main(self):
        a = self.args
        self.stage("data", self.data_done, self.do_data)
        self.stage("preprocess", self.preprocess_done, self.do_preprocess)
        self.stage("train", self.train_done, self.do_train)
        self.stage("baseline", lambda: "baseline" in self.results, self.do_baseline)
        self.stage("dstore", self.dstore_done, self.do_dstore)
        self.stage("index", self.index_done, self.do_index)
        for sim in SIM_FUNCS:
            for split in ("valid", "test"):
                self.stage(f"knn-{split}-{sim}", lambda: self.knn_done(split, sim), lambda: self.do_knn(split, sim))
                self.stage(f"sweep-{split}-{sim}", lambda: self.sweep_done(split, sim),
                           lambda: self.do_sweep(split, sim))
            if sim == "faiss":
                self.stage("dstore-size", self.dstore_size_done, self.do_dstore_size)
                self.stage("subset", self.subset_done, self.do_subset)
                self.stage("cache", self.cache_done, self.do_cache)
                self.stage("keytypes", self.keytypes_done, self.do_keytypes)
        if self.cfg.get("eval_tokens") and a.whole_test:
            self.stage("whole-test", lambda: "whole_test" in self.results, self.do_whole_test)
        report_dir = Path(a.report_dir).resolve() if a.report_dir else self.work / "report"
        from report import headline, write_report  # examples/wikitext2/report.py

        started = time.time()
        paths = write_report(self.results, self.work, report_dir)
        self.results["stages"]["report"] = dict(seconds=round(time.time() - started, 1))
        self.save()
        log(f"report: {', '.join(str(p) for p in paths)}")
        print("\n" + headline(self.results, self.results_path, paths), flush=True)


# ------------------------------------------------------------------ helpers
def _quote(s):
    return s if re.fullmatch(r"[\w@%+=:,./-]+", s) else "'" + s.replace("'", "'\\''") + "'"


def parse_eval(out, logname="fairseq-eval-lm"):
    """Loss, perplexity and speed printed by fairseq-eval-lm."""
    found = PPL_RE.findall(out)
    if not found:
        raise SystemExit(f"no perplexity in the output of {logname}")
    # The printed perplexity is 2 ** (the unrounded loss): more exact than 2 ** (printed loss).
    res = dict(loss=float(found[-1][0]), ppl=float(found[-1][1]))
    speed = SPEED_RE.findall(out)
    if speed:
        res.update(tokens=int(speed[-1][0].replace(",", "")), eval_seconds=float(speed[-1][1]),
                   tokens_per_s=float(speed[-1][2]))
    return res


def index_complete(path):
    return Path(path).exists() and Path(str(path) + ".meta.json").exists()


def count_tokens(path):
    """Tokens as fairseq counts them: words plus one end-of-line per line."""
    n = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            n += len(line.split()) + 1
    return n


def write_head(src, dst, tokens):
    """The first lines of src holding at least ``tokens`` tokens; returns their count."""
    n, out = 0, []
    with open(src, encoding="utf-8") as f:
        for line in f:
            out.append(line)
            n += len(line.split()) + 1
            if n >= tokens:
                break
    Path(dst).write_text("".join(out), encoding="utf-8")
    return n


def split_files(d):
    """{split: path} of a WikiText-2 directory (train.txt or wiki.train.tokens naming), or None."""
    d = Path(d)
    for pattern in ("{}.txt", "wiki.{}.tokens"):
        files = {s: d / pattern.format(s) for s in SPLITS}
        if all(p.is_file() for p in files.values()):
            return files
    return None


def find_wikitext2(data, work):
    if data:
        files = split_files(data) or split_files(Path(data) / "wikitext-2")
        if files is None:
            raise SystemExit(f"--data {data}: expected train.txt/valid.txt/test.txt or wiki.*.tokens")
        return files
    files = split_files(SHARED_WIKITEXT2)
    if files:
        return files
    dl = work / "download"
    files = split_files(dl / "wikitext-2")
    if files:
        return files
    dl.mkdir(exist_ok=True)
    archive = dl / "wikitext-2-v1.zip"
    for url in WIKITEXT2_URLS:
        try:
            log(f"downloading {url}")
            with urllib.request.urlopen(url, timeout=60) as r, open(archive, "wb") as f:
                shutil.copyfileobj(r, f)
            break
        except OSError as e:
            log(f"  failed: {e}")
    else:
        raise SystemExit("could not download wikitext-2-v1.zip; download it yourself and pass --data DIR")
    with zipfile.ZipFile(archive) as z:
        z.extractall(dl)
    files = split_files(dl / "wikitext-2")
    if files is None:
        raise SystemExit(f"{archive} does not hold wikitext-2/wiki.*.tokens")
    return files


def write_prefix_datastore(full, out_dir, n, frac, batch=100_000):
    """A datastore of the first n entries of ``full`` (its first frac of train, in corpus order).

    The keys are the full pass's own keys, so entry i is exactly what a datastore
    pass over the first n tokens of train would have written."""
    import numpy as np
    from fairseq_knnlm.storage.datastore import DatastoreWriter

    if out_dir.exists():
        shutil.rmtree(out_dir)
    writer = DatastoreWriter(str(out_dir), full.dim, full.keys.dtype)
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        writer.append(np.asarray(full.keys[lo:hi]), np.asarray(full.vals[lo:hi]))
    meta = {k: v for k, v in full.meta.items()
            if k not in ("id", "size", "created", "format_version", "num_shards")}
    meta.update(prefix_of=full.path, prefix_of_fingerprint=full.fingerprint, prefix_fraction=frac)
    writer.commit(meta)


def compact_sweep(rep):
    """The parts of a fairseq-knnlm-sweep JSON report the tables use."""
    return dict(file=rep["file"], tokens=rep["tokens"], ks=rep["ks"], temps=rep["knn_temps"],
                lambdas=rep["lambdas"], ppl=rep["perplexity"], skipped=rep["skipped"],
                base=rep["base"], best=rep["best"], seconds=rep.get("seconds"))


def _grid(values):
    """A sweep grid argument: a range string as it is, values comma-joined."""
    return values if isinstance(values, str) else ",".join(f"{v:g}" if isinstance(v, float) else str(v)
                                                           for v in values)


def cache_cell(rep, setting):
    """Perplexity of a setting (λ, cache size, θ, λc) in a sweep's cache report."""
    import numpy as np

    def at(values, x):
        return min(range(len(values)), key=lambda i: abs(values[i] - x))

    clam = setting["cache_lmbda"]
    si = rep["sizes"].index(setting["cache_size"]) if clam else 0
    ti = at(rep["thetas"], setting["cache_theta"]) if clam else 0
    return float(np.array(rep["perplexity"])[si, ti, at(rep["lambdas"], setting["lmbda"]),
                                               at(rep["cache_lambdas"], clam)])


def choose(sw, k):
    """(λ, T) with the lowest perplexity at k (k fixed in advance), on this sweep's split."""
    import numpy as np

    ki = sw["ks"].index(k) if k in sw["ks"] else len(sw["ks"]) - 1
    ppl = np.array(sw["ppl"])[ki]
    skipped = np.array(sw["skipped"])[ki]
    ppl = np.where(skipped == skipped.min(), ppl, np.inf)
    ti, li = np.unravel_index(np.argmin(ppl), ppl.shape)
    return dict(k=sw["ks"][ki], knn_temp=sw["temps"][ti], lmbda=sw["lambdas"][li], ppl=float(ppl[ti, li]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="kNN-LM on WikiText-2 end to end (see the module docstring)")
    p.add_argument("--data", help="WikiText-2 directory (train.txt/valid.txt/test.txt or wiki.*.tokens); "
                   f"default: {SHARED_WIKITEXT2} if present, else download wikitext-2-v1.zip")
    p.add_argument("--workdir", default=None, help="work directory (default: examples/wikitext2/work[-tiny])")
    p.add_argument("--tiny", action="store_true", help="a small slice and a small model: a few minutes")
    p.add_argument("--hours", type=float, default=0.66, help="training budget of train.sh (full mode)")
    p.add_argument("--k", type=int, default=1024, help="neighbours retrieved (default: %(default)s)")
    p.add_argument("--probe", type=int, default=32, help="IVF lists searched (default: %(default)s)")
    p.add_argument("--dstore-context", type=int, help="context window of the datastore pass (default: full 64, tiny 64)")
    p.add_argument("--eval-context", type=int, help="context window of every evaluation (default: full 128, tiny 64)")
    p.add_argument("--max-tokens", type=int, help="fairseq-eval-lm --max-tokens (default: 4096)")
    p.add_argument("--ivfpq-factory", help="IVF-PQ index (default: full IVF4096,PQ64, tiny IVF128,PQ16)")
    p.add_argument("--ivfpq-train", type=int, help="keys to train the IVF-PQ index on (default: full 1M, tiny 250k)")
    p.add_argument("--subset-tokens", type=int, help="valid tokens for the Flat comparison (default: full 3000, tiny 1000)")
    p.add_argument("--eval-tokens", type=int,
                   help="evaluate the kNN-LM on the first N tokens of valid and of test only (default: "
                   "the whole splits); the base LM is also evaluated on the whole splits")
    p.add_argument("--whole-test", action="store_true",
                   help="with --eval-tokens: also run kNN-LM (faiss) on the whole test split at the setting "
                   "chosen on valid")
    p.add_argument("--report-dir", help="where tables and plots go (default: WORKDIR/report)")
    p.add_argument("--skip", default="", help=f"comma-separated stages not to run, of: {', '.join(STAGES[3:-1])}")
    return parse_with_stages(p, argv, STAGES, HERE)


def parse_with_stages(p, argv, stages, here):
    """``p``'s arguments, with --skip checked against ``stages`` and --workdir defaulting to
    HERE/work (or work-tiny); shared by the examples."""
    args = p.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(stages)
    if unknown:
        p.error(f"unknown --skip stage(s): {', '.join(sorted(unknown))}")
    if args.workdir is None:
        args.workdir = str(here / ("work-tiny" if args.tiny else "work"))
    return args


def main(argv=None):
    sys.path.insert(0, str(HERE))
    Pipeline(parse_args(argv)).main()


if __name__ == "__main__":
    main()
