#!/usr/bin/env python3
"""The paper's other two claims on a CPU: domain adaptation by swapping the datastore, and
memorising more text than the LM was trained on (Khandelwal et al., 2020, Tables 3-4, Figures 2 and 5).

    python examples/books/run.py [--books DIR] [--wikitext DIR] [--workdir DIR] [--tiny] [--hours H]

Three LMs, one recipe (examples/wikitext2/train.sh), one wall-clock budget each (--hours),
best valid checkpoint: "wiki" (WikiText-2 train), "books" (Books train), "eighth" (the first
whole books of Books train, about 1/8 of it).  One sentencepiece vocabulary, trained on the
union of both training sets, and one fairseq dictionary for every model, datastore and number.

Stages (each skipped when its outputs are complete in --workdir; see README.md for the plan):

  data        locate Books (--books, ../shared/data/books, or download from Project Gutenberg) and
              WikiText-2 (as examples/wikitext2); heads of valid/test (--eval-words); the eighth
  vocab       sentencepiece on both training sets -> WORKDIR/spm.model, the shared dict.txt
  encode      every split of both corpora in subwords -> WORKDIR/encoded/
  preprocess  fairseq-preprocess --only-source --srcdict dict.txt -> WORKDIR/data-bin/{books,wiki,eighth}
  train-*     the three LMs, each within --hours
  baseline    fairseq-eval-lm (plain task): each LM on valid and test of the corpora it is scored on
  dstore      datastore passes: Books train keyed by each LM; WikiText-2 train keyed by the wiki LM
  prefix      fairseq-knnlm-prefix: the eighth LM's Books store cut at 1, 2, 4 x the eighth's tokens
  index       fairseq-knnlm-build-index (IVF-PQ) of every store
  knn-valid   fairseq-eval-lm --knnlm on valid per row, saving neighbours with every token's key
  sweep-valid fairseq-knnlm-sweep: k, T, λ, and the continuous cache, chosen on valid
  knn-test    the test run at the setting chosen on valid, saving neighbours
  sweep-test  the test numbers of every model (base, + cache, + kNN, + both) at valid's settings
  report      tables (results.md), results.json and plots -> --report-dir

Perplexities are reported per subword token (what fairseq prints) and per word: exp(total NLL of
the scored subword tokens / words of the split), words = whitespace-separated tokens plus one
end of line per line; the scored tokens are the subwords plus the same end of line per line.
"""

import argparse
import importlib.util
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SPLITS = ("train", "valid", "test")
CORPORA = ("books", "wiki")
SHARED_BOOKS = ROOT.parent / "shared" / "data" / "books"


def load_wikitext2_example():
    """examples/wikitext2/run.py as a module: its data download, command runner and sweep plumbing."""
    spec = importlib.util.spec_from_file_location("wikitext2_run", ROOT / "examples" / "wikitext2" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wt2 = load_wikitext2_example()
log = wt2.log

# The LMs: name -> the data-bin they are trained on.
LMS = {"wiki": "wiki", "books": "books", "eighth": "eighth"}
# Datastores: name -> (LM whose keys, corpus whose train split).
DSTORES = {"books-by-wiki": ("wiki", "books"), "books-by-books": ("books", "books"),
           "wiki-by-wiki": ("wiki", "wiki"), "books-by-eighth": ("eighth", "books")}
# Datastore-size curve: prefixes of books-by-eighth at these multiples of the eighth's own tokens.
PREFIX_MULTIPLES = (1, 2, 4)
# Rows measured with a datastore: name -> (LM, datastore, corpus scored).
ROWS = {"wiki+books": ("wiki", "books-by-wiki", "books"), "books+books": ("books", "books-by-books", "books"),
        "wiki+wiki": ("wiki", "wiki-by-wiki", "wiki")}
ROWS.update({f"eighth+x{m}": ("eighth", f"books-by-eighth-x{m}", "books") for m in PREFIX_MULTIPLES})
ROWS["eighth+all"] = ("eighth", "books-by-eighth", "books")
# LMs alone: (LM, corpus scored).
BASE_ROWS = (("wiki", "books"), ("books", "books"), ("wiki", "wiki"), ("eighth", "books"))
PAPER_LAMBDA, PAPER_TEMP = 0.25, 1.0

FULL = dict(
    slice_bytes=None,
    eval_words=80_000,       # valid and test: their first 80k words (~100k subwords), every row alike
    vocab_size=20_000,       # > train.sh's adaptive cutoffs (4000, 16000)
    eighth=1 / 8,
    tokens_per_sample=256, dstore_context=64, eval_context=128, max_tokens=4096,
    ivfpq_factory="IVF4096,PQ64", ivfpq_train=1_000_000, k=1024,
    ks=wt2.KS, temps=wt2.TEMPS, lambdas="0:0.95:0.025",
    cache_sizes=wt2.CACHE_SIZES, cache_thetas=wt2.CACHE_THETAS, cache_lambdas=wt2.CACHE_LAMBDAS,
)
TINY = dict(
    slice_bytes={"train": 80_000, "valid": 10_000, "test": 10_000},
    eval_words=None,
    vocab_size=1000,
    eighth=1 / 8,
    tokens_per_sample=64, dstore_context=32, eval_context=32, max_tokens=2048,
    ivfpq_factory="IVF32,PQ8", ivfpq_train=100_000, k=64,
    ks=(8, 64), temps=(1, 5, 20), lambdas="0:0.9:0.1",
    cache_sizes=(100, 500), cache_thetas=(0.1, 1), cache_lambdas="0:0.3:0.1",
)
# Tiny: the wikitext2 example's tiny model, adaptive cutoffs inside a 1,000-piece vocabulary.
TINY_TRAIN = [
    "--arch", "transformer_lm", "--decoder-layers", "2", "--decoder-embed-dim", "64",
    "--decoder-ffn-embed-dim", "128", "--decoder-attention-heads", "2", "--decoder-normalize-before",
    "--decoder-input-dim", "64", "--decoder-output-dim", "64",
    "--adaptive-input", "--adaptive-input-cutoff", "250,500",
    "--adaptive-softmax-cutoff", "250,500", "--tie-adaptive-weights",
    "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp",
    "--tokens-per-sample", "64", "--sample-break-mode", "none", "--max-tokens", "2048",
    "--optimizer", "adam", "--lr", "0.003", "--max-epoch", "1", "--cpu", "--num-workers", "0",
    "--seed", "1", "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "20",
]
STAGES = ("data", "vocab", "encode", "preprocess", *(f"train-{lm}" for lm in LMS), "baseline", "dstore",
          "prefix", "index", "knn-valid", "sweep-valid", "knn-test", "sweep-test", "report")


# ------------------------------------------------------------ pure helpers
def line_counts(path):
    """(whitespace-separated tokens, lines) of a text file."""
    words = lines = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            words += len(line.split())
            lines += 1
    return words, lines


def count_words(path):
    """Words of a split as the per-word perplexity counts them: tokens plus one end of line per line."""
    words, lines = line_counts(path)
    return words + lines


def exact_log2_ppl(loss, ppl):
    """log2 of the perplexity from fairseq-eval-lm's printed loss (4 decimals) or perplexity
    (2 decimals), whichever is the more precise: the perplexity once it exceeds ~144."""
    return math.log2(ppl) if 0.005 / (ppl * math.log(2)) < 5e-5 else loss


def per_word(ppl_token, tokens, words):
    """Per-word perplexity: exp(NLL / words) with NLL = tokens * log(ppl_token)."""
    return math.exp(tokens * math.log(ppl_token) / words)


def write_head_words(src, dst, words):
    """The first lines of src holding ``words`` whitespace-separated tokens (at least; whole lines)."""
    n, out = 0, []
    with open(src, encoding="utf-8") as f:
        for line in f:
            if n >= words:
                break
            out.append(line)
            n += len(line.split())
    Path(dst).write_text("".join(out), encoding="utf-8")
    return n


def whole_books(manifest, fraction):
    """The first whole books of train (manifest order) whose words come closest to ``fraction`` of
    train's: (number of books, their words)."""
    train = [b["words"] for b in manifest if b["split"] == "train"]
    target = fraction * sum(train)
    sums = [sum(train[:i]) for i in range(1, len(train) + 1)]
    i = min(range(len(sums)), key=lambda j: abs(sums[j] - target))
    return i + 1, sums[i]


def encode_file(sp, src, dst):
    """Each line of src as its sentencepiece pieces joined by spaces (a blank line stays blank)."""
    with open(src, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    pieces = sp.encode(lines, out_type=str)
    Path(dst).write_text("".join(" ".join(p) + "\n" for p in pieces), encoding="utf-8")


def spm_dictionary(sp):
    """fairseq dict.txt lines of a sentencepiece model: its pieces in id order, without the pieces
    fairseq adds itself (<unk>, <s>, </s>); fairseq's order, not counts, fixes the ids."""
    return [f"{sp.id_to_piece(i)} 1\n" for i in range(sp.get_piece_size())
            if not (sp.is_control(i) or sp.is_unknown(i))]


def split_files(d):
    d = Path(d)
    files = {s: d / f"{s}.txt" for s in SPLITS}
    return files if all(p.is_file() for p in files.values()) else None


def find_books(books, work):
    """{split: path} of the Books corpus: --books, ../shared/data/books, or a download."""
    if books:
        files = split_files(books)
        if files is None:
            raise SystemExit(f"--books {books}: expected train.txt, valid.txt and test.txt of raw text")
        return files
    for d in (SHARED_BOOKS, work / "download" / "books"):
        if split_files(d):
            return split_files(d)
    import gutenberg  # examples/books/gutenberg.py

    try:
        gutenberg.download(HERE / "manifest.json", work / "download" / "books")
    except OSError as e:
        raise SystemExit(f"could not download the books from gutenberg.org ({e}); pass --books DIR") from None
    return split_files(work / "download" / "books")


def grid_arg(values):
    return values if isinstance(values, str) else ",".join(f"{v:g}" for v in values)


# ---------------------------------------------------------------- pipeline
class Pipeline(wt2.Pipeline):
    """The wikitext2 example's plumbing (commands, logs, stage skipping, sweeps) over three LMs."""

    def __init__(self, args):  # noqa: the parent's __init__ configures one LM on one corpus
        self.args = args
        self.cfg = dict(TINY if args.tiny else FULL)
        if args.eval_words is not None:
            self.cfg["eval_words"] = args.eval_words or None
        self.work = Path(args.workdir).resolve()
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.results_path = self.work / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.results.setdefault("stages", {})
        self.results["mode"] = "tiny" if args.tiny else "full"
        self.results["config"] = dict(self.cfg, k=self.cfg["k"], probe=args.probe, hours=args.hours,
                                      recipe="tiny (TINY_TRAIN)" if args.tiny else "examples/wikitext2/train.sh")
        self.nbrs = self.work / "neighbors"
        self.sweeps = self.work / "sweeps"
        import fairseq_knnlm

        self.user_dir = os.path.dirname(fairseq_knnlm.__file__)

    # paths
    def raw(self, corpus, split):
        return self.at(self.results["data"]["files"][corpus][split])

    def encoded(self, corpus, split):
        return self.work / "encoded" / corpus / f"{split}.txt"

    def data_bin(self, corpus):
        return self.work / "data-bin" / corpus

    def ckpt(self, lm):
        return self.work / "ckpt" / lm / "checkpoint_best.pt"

    def dstore(self, name):
        return self.work / "dstore" / name

    # commands
    def eval_lm(self, lm, corpus, split, context, logname, *extra, knn=True):
        cmd = ["fairseq-eval-lm", self.data_bin(corpus), "--path", self.ckpt(lm), "--gen-subset", split,
               "--tokens-per-sample", self.cfg["tokens_per_sample"], "--context-window", context,
               "--max-tokens", self.cfg["max_tokens"], "--cpu", "--num-workers", 0,
               "--log-format", "simple", "--log-interval", 200]
        if knn:
            cmd += ["--user-dir", self.user_dir, "--task", "knnlm_language_modeling"]
        return wt2.parse_eval(self.run(cmd + list(extra), logname), logname)

    def knn_eval(self, row, split, lmbda, temp, cache, save, logname):
        lm, name, corpus = ROWS[row]
        dstore = self.dstore(name)
        k = self.row_k(row)
        extra = ["--knnlm", "--dstore", dstore, "--knn-index", dstore / "knn.index", "--k", k, "--lmbda", lmbda,
                 "--knn-temp", temp, "--probe", self.args.probe, "--knn-sim-func", "faiss",
                 "--knn-cache-size", cache[0], "--knn-cache-theta", cache[1], "--knn-cache-lmbda", cache[2]]
        if save.exists():
            shutil.rmtree(save)  # an incomplete earlier attempt (no recorded result)
        res = self.eval_lm(lm, corpus, split, self.cfg["eval_context"], logname, *extra,
                           "--knn-save-neighbors", save)
        res.update(k=k, lmbda=float(lmbda), knn_temp=float(temp), cache_size=int(cache[0]),
                   cache_theta=float(cache[1]), cache_lmbda=float(cache[2]), dstore=self.rel(dstore))
        return self.with_per_word(res, corpus, split)

    def row_k(self, row):
        return int(min(self.cfg["k"], self.results["dstore"][ROWS[row][1]]["size"]))

    def with_per_word(self, res, corpus, split):
        """A fairseq-eval-lm result with its exact token perplexity and per-word perplexity."""
        counts = self.results["data"]["counts"][corpus][split]
        ppl = 2 ** exact_log2_ppl(res["loss"], res["ppl"])
        res.update(ppl_per_word=per_word(ppl, counts["tokens"], counts["words"]))
        return res

    # ------------------------------------------------------------------ stages
    def do_data(self):
        files = {"books": find_books(self.args.books, self.work), "wiki": wt2.find_wikitext2(self.args.wikitext, self.work)}
        sources = {c: self.rel(Path(f["train"]).parent) for c, f in files.items()}
        out = {c: {s: str(p) for s, p in f.items()} for c, f in files.items()}
        for corpus in CORPORA:
            d = self.work / "raw" / corpus
            d.mkdir(parents=True, exist_ok=True)
            for split in SPLITS:
                dst = d / f"{split}.txt"
                if self.cfg["slice_bytes"]:
                    text = Path(out[corpus][split]).read_bytes()[: self.cfg["slice_bytes"][split]]
                    dst.write_bytes(text[: text.rfind(b"\n") + 1])
                elif split != "train" and self.cfg["eval_words"]:
                    write_head_words(out[corpus][split], dst, self.cfg["eval_words"])
                else:
                    continue
                out[corpus][split] = str(dst)
        eighth = self.work / "raw" / "eighth"
        eighth.mkdir(exist_ok=True)
        manifest_path = Path(out["books"]["train"]).parent / "manifest.json"
        train_words = line_counts(out["books"]["train"])[0]
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        if manifest and sum(b["words"] for b in manifest if b["split"] == "train") == train_words:
            books, words = whole_books(manifest, self.cfg["eighth"])
            how = f"the first {books} whole books of Books train (manifest order)"
        else:  # a slice (--tiny) or a books directory without a matching manifest
            books, words = None, round(self.cfg["eighth"] * train_words)
            how = f"the first lines of Books train holding {self.cfg['eighth']:g} of its words"
        got = write_head_words(out["books"]["train"], eighth / "train.txt", words)
        out["eighth"] = dict(out["books"], train=str(eighth / "train.txt"))
        self.results["data"] = dict(
            sources=sources, files={c: {s: self.rel(p) for s, p in f.items()} for c, f in out.items()},
            eighth=dict(how=how, books=books, words=got, fraction_of_train_words=got / train_words))

    def data_done(self):
        d = self.results.get("data")
        return bool(d) and all(self.at(p).exists() for f in d["files"].values() for p in f.values())

    def do_vocab(self):
        import sentencepiece as spm

        prefix = self.work / "spm"
        trains = [str(self.raw(c, "train")) for c in CORPORA]
        spm.SentencePieceTrainer.train(
            input=",".join(trains), model_prefix=str(prefix), vocab_size=self.cfg["vocab_size"],
            model_type="unigram", character_coverage=1.0, input_sentence_size=2_000_000,
            shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=1)
        sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
        (self.work / "dict.txt").write_text("".join(spm_dictionary(sp)), encoding="utf-8")
        self.results["vocab"] = dict(model="spm.model", pieces=sp.get_piece_size(), trained_on=list(CORPORA),
                                     command=f"spm_train --input={','.join(self.rel(t) for t in trains)} "
                                     f"--model_prefix=spm --vocab_size={self.cfg['vocab_size']} "
                                     "--model_type=unigram --character_coverage=1.0")

    def vocab_done(self):
        return "vocab" in self.results and (self.work / "spm.model").exists() and (self.work / "dict.txt").exists()

    def do_encode(self):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(self.work / "spm.model"))
        counts = {}
        for corpus in (*CORPORA, "eighth"):
            self.encoded(corpus, "train").parent.mkdir(parents=True, exist_ok=True)
            for split in SPLITS:
                encode_file(sp, self.raw(corpus, split), self.encoded(corpus, split))
                pieces, lines = line_counts(self.encoded(corpus, split))
                counts.setdefault(corpus, {})[split] = dict(words=count_words(self.raw(corpus, split)),
                                                            tokens=pieces + lines, lines=lines)
        self.results["data"]["counts"] = counts

    def encode_done(self):
        return "counts" in self.results.get("data", {})

    def do_preprocess(self):
        for corpus in (*CORPORA, "eighth"):
            out = self.data_bin(corpus)
            if out.exists():
                shutil.rmtree(out)
            self.run(["fairseq-preprocess", "--only-source", "--srcdict", self.work / "dict.txt",
                      *(x for s in SPLITS for x in (f"--{s}pref", self.encoded(corpus, s))),
                      "--destdir", out, "--workers", 1 if self.args.tiny else os.cpu_count() or 1],
                     f"preprocess-{corpus}")

    def preprocess_done(self):
        return all((self.data_bin(c) / f"{s}.idx").exists() for c in (*CORPORA, "eighth") for s in SPLITS)

    def do_train(self, lm):
        save_dir = self.ckpt(lm).parent
        log_path = self.work / "logs" / f"train-{lm}.log"
        if self.args.tiny:
            cmd = ["fairseq-train", self.data_bin(LMS[lm]), "--task", "language_modeling", *TINY_TRAIN,
                   "--save-dir", save_dir]
        else:
            cmd = ["bash", ROOT / "examples" / "wikitext2" / "train.sh", self.data_bin(LMS[lm]), save_dir,
                   self.args.hours]
        log(f"$ {' '.join(shlex.quote(str(c)) for c in cmd)}  > {log_path}")
        if wt2.preloaded.run([str(c) for c in cmd], log_path, ROOT) != 0:
            raise SystemExit(f"training failed, see {log_path}")
        self.results.setdefault("commands", {})[f"train-{lm}"] = self.portable(cmd)

    def train_done(self, lm):
        log_path = self.work / "logs" / f"train-{lm}.log"
        return self.ckpt(lm).exists() and log_path.exists() and "done training" in log_path.read_text()

    def do_baseline(self):
        base = self.results.setdefault("baseline", {})
        for lm, corpus in BASE_ROWS:
            for split in ("valid", "test"):
                name = f"{lm}@{corpus}"
                if split not in base.get(name, {}):
                    res = self.eval_lm(lm, corpus, split, self.cfg["eval_context"], f"baseline-{name}-{split}", knn=False)
                    base.setdefault(name, {})[split] = self.with_per_word(res, corpus, split)
                    self.save()

    def baseline_done(self):
        return all(s in self.results.get("baseline", {}).get(f"{lm}@{c}", {}) for lm, c in BASE_ROWS
                   for s in ("valid", "test"))

    def do_dstore(self):
        from fairseq_knnlm.storage.datastore import Datastore

        recs = self.results.setdefault("dstore", {})
        for name, (lm, corpus) in DSTORES.items():
            if name in recs and (self.dstore(name) / "meta.json").exists():
                continue
            rec = self.eval_lm(lm, corpus, "train", self.cfg["dstore_context"], f"dstore-{name}",
                               "--save-knnlm-dstore", "--dstore", self.dstore(name), "--dstore-overwrite")
            ds = Datastore(str(self.dstore(name)))
            recs[name] = dict(rec, lm=lm, corpus=corpus, size=ds.size, dim=ds.dim, keys_dtype=str(ds.keys.dtype))
            self.save()

    def dstore_done(self):
        return all(n in self.results.get("dstore", {}) for n in DSTORES)

    def do_prefix(self):
        recs = self.results["dstore"]
        full = recs["books-by-eighth"]["size"]
        own = self.results["data"]["counts"]["eighth"]["train"]["tokens"]  # the eighth LM's training tokens
        for m in PREFIX_MULTIPLES:
            name = f"books-by-eighth-x{m}"
            n = min(m * own, full)
            cmd = ["fairseq-knnlm-prefix", "--dstore", self.dstore("books-by-eighth"), "--entries", n,
                   "--output", self.dstore(name), "--overwrite"]
            self.run(cmd, f"prefix-{name}")
            recs[name] = dict(lm="eighth", corpus="books", size=n, multiple_of_lm_train=m, prefix_of="books-by-eighth",
                              fraction_of_train=n / full)
            self.save()

    def prefix_done(self):
        return all(f"books-by-eighth-x{m}" in self.results.get("dstore", {}) and
                   (self.dstore(f"books-by-eighth-x{m}") / "meta.json").exists() for m in PREFIX_MULTIPLES)

    def stores(self):
        return [*DSTORES, *(f"books-by-eighth-x{m}" for m in PREFIX_MULTIPLES)]

    def do_index(self):
        idx = self.results.setdefault("index", {})
        for name in self.stores():
            path = self.dstore(name) / "knn.index"
            if name in idx and wt2.index_complete(path):
                continue
            size = self.results["dstore"][name]["size"]
            idx[name] = self.build_index(self.dstore(name), path, self.cfg["ivfpq_factory"],
                                         min(self.cfg["ivfpq_train"], size), f"index-{name}")
            self.save()

    def index_done(self):
        return all(n in self.results.get("index", {}) and wt2.index_complete(self.dstore(n) / "knn.index")
                   for n in self.stores())

    def rows(self):
        return self.results.setdefault("rows", {})

    def do_knn_valid(self):
        cache = (max(self.cfg["cache_sizes"]), wt2.CACHE_SAVE_THETA, wt2.CACHE_SAVE_LMBDA)
        for row, (lm, name, corpus) in ROWS.items():
            rec = self.rows().setdefault(row, dict(lm=lm, dstore=name, corpus=corpus))
            if "valid_run" not in rec:  # the paper's λ and T: the saved neighbours do not depend on them
                rec["valid_run"] = self.knn_eval(row, "valid", PAPER_LAMBDA, PAPER_TEMP, cache,
                                                 self.nbrs / f"{row}-valid", f"knn-{row}-valid")
                self.save()

    def do_sweep_valid(self):
        c = self.cfg
        for row, (lm, name, corpus) in ROWS.items():
            rec = self.rows()[row]
            if "cache_chosen" in rec:
                continue
            nb, k = self.nbrs / f"{row}-valid", self.row_k(row)
            rep = wt2.compact_sweep(self.sweep(nb, f"{row}-valid", ks=list(c["ks"]), temps=c["temps"],
                                               lambdas=c["lambdas"]))
            rec["sweep_valid"] = rep
            rec["chosen"] = wt2.choose(rep, k)
            ch = rec["chosen"]
            ki, ti = rep["ks"].index(ch["k"]), rep["temps"].index(ch["knn_temp"])
            rec["lambda_curve"] = dict(lambdas=rep["lambdas"], ppl=rep["ppl"][ki][ti])
            grid = (c["cache_sizes"], c["cache_thetas"], c["cache_lambdas"])
            cache = self.sweep(nb, f"{row}-valid-cache", ks=[ch["k"]], temps=[ch["knn_temp"]],
                               lambdas=c["lambdas"], cache=grid)["cache"]
            rec["cache_chosen"] = cache["rows"]  # base, cache, knn, both: each at its best setting on valid
            self.save()

    def test_setting(self, rec):
        """The test run's (λ, cache size, θ, λc): kNN + cache as chosen on valid."""
        rows = rec["cache_chosen"]
        with_cache = [r for r in rows.values() if r["cache_lmbda"]] or \
            [dict(cache_size=max(self.cfg["cache_sizes"]), cache_theta=wt2.CACHE_SAVE_THETA)]
        both = rows["both"]
        return both["lmbda"], (both["cache_size"] or with_cache[0]["cache_size"],
                               both["cache_theta"] or with_cache[0]["cache_theta"], both["cache_lmbda"]), with_cache

    def do_knn_test(self):
        for row in ROWS:
            rec = self.rows()[row]
            if "test_run" not in rec:
                lmbda, cache, _ = self.test_setting(rec)
                rec["test_run"] = self.knn_eval(row, "test", lmbda, rec["chosen"]["knn_temp"], cache,
                                                self.nbrs / f"{row}-test", f"knn-{row}-test")
                self.save()

    def do_sweep_test(self):
        for row, (lm, name, corpus) in ROWS.items():
            rec = self.rows()[row]
            if "table" in rec:
                continue
            rows = rec["cache_chosen"]
            _, _, with_cache = self.test_setting(rec)
            ch = rec["chosen"]
            grid = (sorted({r["cache_size"] for r in with_cache}), sorted({r["cache_theta"] for r in with_cache}),
                    grid_arg(sorted({r["cache_lmbda"] for r in rows.values()})))
            rep = self.sweep(self.nbrs / f"{row}-test", f"{row}-test-cache", ks=[ch["k"]], temps=[ch["knn_temp"]],
                             lambdas=grid_arg(sorted({r["lmbda"] for r in rows.values()} | {ch["lmbda"]})),
                             cache=grid)
            counts = self.results["data"]["counts"][corpus]
            table = {}
            for model, r in rows.items():
                setting = {key: r[key] for key in ("lmbda", "cache_size", "cache_theta", "cache_lmbda")}
                valid, test = r["ppl"], wt2.cache_cell(rep["cache"], r)
                table[model] = dict(setting=setting, valid=valid, test=test,
                                    valid_per_word=per_word(valid, rec["sweep_valid"]["tokens"], counts["valid"]["words"]),
                                    test_per_word=per_word(test, rep["tokens"], counts["test"]["words"]))
            rec["table"] = table
            rec["test_tokens"] = rep["tokens"]
            self.save()

    def rows_have(self, key):
        return all(key in self.rows().get(r, {}) for r in ROWS)

    # -------------------------------------------------------------------- main
    def main(self):
        self.stage("data", self.data_done, self.do_data)
        self.stage("vocab", self.vocab_done, self.do_vocab)
        self.stage("encode", self.encode_done, self.do_encode)
        self.stage("preprocess", self.preprocess_done, self.do_preprocess)
        for lm in LMS:
            self.stage(f"train-{lm}", lambda: self.train_done(lm), lambda: self.do_train(lm))
        self.stage("baseline", self.baseline_done, self.do_baseline)
        self.stage("dstore", self.dstore_done, self.do_dstore)
        self.stage("prefix", self.prefix_done, self.do_prefix)
        self.stage("index", self.index_done, self.do_index)
        self.nbrs.mkdir(exist_ok=True)
        self.stage("knn-valid", lambda: self.rows_have("valid_run"), self.do_knn_valid)
        self.stage("sweep-valid", lambda: self.rows_have("cache_chosen"), self.do_sweep_valid)
        self.stage("knn-test", lambda: self.rows_have("test_run"), self.do_knn_test)
        self.stage("sweep-test", lambda: self.rows_have("table"), self.do_sweep_test)
        from report import headline, write_report  # examples/books/report.py

        report_dir = Path(self.args.report_dir).resolve() if self.args.report_dir else self.work / "report"
        started = time.time()
        paths = write_report(self.results, report_dir)
        self.results["stages"]["report"] = dict(seconds=round(time.time() - started, 1))
        self.save()
        log(f"report: {', '.join(str(p) for p in paths)}")
        print("\n" + headline(self.results), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="kNN-LM domain adaptation and datastore size on Books (see the "
                                "module docstring and examples/books/README.md)")
    p.add_argument("--books", help=f"Books directory (train.txt, valid.txt, test.txt of raw text); default: "
                   f"{SHARED_BOOKS} if present, else downloaded from gutenberg.org (examples/books/manifest.json)")
    p.add_argument("--wikitext", help="WikiText-2 directory; default as examples/wikitext2 (shared copy or download)")
    p.add_argument("--workdir", help="work directory (default: examples/books/work[-tiny])")
    p.add_argument("--report-dir", help="where tables and plots go (default: WORKDIR/report)")
    p.add_argument("--tiny", action="store_true", help="small slices of both corpora and a small model: minutes")
    p.add_argument("--hours", type=float, default=0.4, help="wall-clock training budget of each LM (full mode; "
                   "default: %(default)s, see README.md for the plan)")
    p.add_argument("--eval-words", type=int, help="score the first N words of valid and test (default: full "
                   "80000, tiny the whole slices; 0: whole splits)")
    p.add_argument("--probe", type=int, default=32, help="IVF lists searched (default: %(default)s)")
    p.add_argument("--skip", default="", help=f"comma-separated stages not to run, of: {', '.join(STAGES[5:-1])}")
    return wt2.parse_with_stages(p, argv, STAGES, HERE)


def main(argv=None):
    sys.path.insert(0, str(HERE))
    Pipeline(parse_args(argv)).main()


if __name__ == "__main__":
    main()
