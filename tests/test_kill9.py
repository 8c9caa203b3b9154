"""kill -9 at random points of every stage that writes an artefact.

The datastore pass, the index build (training and adding), the saved neighbours, the
retrieval predictor (fairseq-knnlm-sweep --save-predictor), pruning and the import each run
as a real process: uninterrupted once (the reference, which also measures its run time T),
then twice sent SIGKILL after a delay drawn from a seeded RNG, in [0, T/2] and in [T/2, T]
(the second run starting from what the first left), then once more to the end.  After every
kill nothing partial is accepted: the artefact's reader refuses the output, or it is
complete and equal to the reference.  The last run ends equal to the reference: byte for
byte in every array and index file, with the same metadata apart from ids, times and
resume counts.

The processes are forked from a server that imported fairseq, torch and FAISS once
(multiprocessing's forkserver): each is a separate process running the tool's own main(),
started in milliseconds instead of the seconds a fresh interpreter spends importing.
"""

import importlib
import json
import multiprocessing
import os
import sys
import time

import faiss
import numpy as np
import pytest

from conftest import CONTEXT_WINDOW, TOKENS_PER_SAMPLE, USER_DIR
from fairseq_knnlm.retrieval.adaptive import RetrievalPredictor
from fairseq_knnlm.storage.datastore import Datastore
from fairseq_knnlm.errors import UserError
from fairseq_knnlm.index import build_index, load_index, meta_path
from fairseq_knnlm.storage.neighbors import read_neighbors

pytestmark = pytest.mark.slow  # every writer runs four times, twice killed

# tool: (module, entry point, program name)
TOOLS = {
    "eval-lm": ("fairseq_cli.eval_lm", "cli_main", "fairseq-eval-lm"),
    "build-index": ("fairseq_knnlm.cli.build_index", "main", "fairseq-knnlm-build-index"),
    "sweep": ("fairseq_knnlm.cli.sweep", "main", "fairseq-knnlm-sweep"),
    "prune": ("fairseq_knnlm.cli.prune", "main", "fairseq-knnlm-prune"),
    "import": ("fairseq_knnlm.cli.import_original", "main", "fairseq-knnlm-import"),
}
# Metadata that differs between any two runs.
VOLATILE = {"id", "created", "train_seconds", "add_seconds", "resumed", "seconds", "merge_seconds"}


def quiet(msg):
    pass


def _run_tool(tool, argv, log):
    """In the forked process: the tool's main() with its output in ``log``, one thread."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    module, entry, prog = TOOLS[tool]
    sys.argv = [prog, *argv]
    main = getattr(importlib.import_module(module), entry)
    sys.exit((main() if tool == "eval-lm" else main(argv)) or 0)


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(sorted({module for module, _, _ in TOOLS.values()}) + [__name__])
    before = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # idle OpenMP threads sleep: 2 busy cores
    try:
        warm = ctx.Process(target=os.getpid)  # returns once the server has imported everything
        warm.start()
        warm.join()
    finally:
        if before is None:
            os.environ.pop("OMP_WAIT_POLICY")
        else:
            os.environ["OMP_WAIT_POLICY"] = before
    return ctx


class Writer:
    """One writing stage: its command, and how to read and compare what it wrote."""

    def __init__(self, ctx, tmp, tool, argv, output, read, compare):
        self.ctx, self.tmp, self.tool = ctx, tmp, tool
        self.argv = [str(a) for a in argv]
        self.output, self.read, self.compare = str(output), read, compare

    def run(self, output, log, kill_after=None):
        """(exit code, seconds); -9 (SIGKILL) if it was killed."""
        argv = [a.replace(self.output, str(output)) for a in self.argv]
        proc = self.ctx.Process(target=_run_tool, args=(self.tool, argv, str(self.tmp / log)))
        start = time.monotonic()
        proc.start()
        proc.join(kill_after)
        if proc.exitcode is None:
            proc.kill()  # SIGKILL
            proc.join()
        return proc.exitcode, time.monotonic() - start

    def log(self, name):
        return (self.tmp / name).read_text()[-3000:]

    def accepted(self, path):
        """What the reader makes of ``path``: None when it refuses it."""
        try:
            return self.read(str(path))
        except UserError as e:
            assert "\n" not in str(e)
            return None

    def kill_twice_then_finish(self, seed):
        reference = self.tmp / "reference"
        code, seconds = self.run(reference, "reference.log")
        assert code == 0, self.log("reference.log")
        want = self.read(str(reference))
        rng = np.random.default_rng(seed)
        landed = []
        for attempt in range(2):  # one kill in each half of the run, at a random point of it
            delay = float(rng.uniform(attempt * seconds / 2, (attempt + 1) * seconds / 2))
            code, _ = self.run(self.output, f"kill{attempt}.log", kill_after=delay)
            assert code in (-9, 0), self.log(f"kill{attempt}.log")
            got = self.accepted(self.output)
            assert code == -9 or got is not None  # a run that finished wrote a readable artefact
            if got is not None:  # complete: killed after its commit, or finished before the kill
                self.compare(got, want)
            landed.append(f"{delay:.2f}s of {seconds:.2f}s: {'killed' if code == -9 else 'finished'}"
                          f"{', output accepted' if got is not None else ''}")
        code, _ = self.run(self.output, "final.log")
        assert code == 0, self.log("final.log")
        self.compare(self.read(self.output), want)
        return landed


def same_meta(a: dict, b: dict, also=()):
    """Equal metadata, nested dictionaries included, apart from VOLATILE fields and ``also``."""
    drop = VOLATILE | set(also)

    def stable(meta):
        return {k: stable(v) if isinstance(v, dict) else v for k, v in meta.items() if k not in drop}

    assert stable(a) == stable(b)


def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read(), (a, b)


def same_files(a, b, names):
    for name in names:
        same_bytes(os.path.join(a, name), os.path.join(b, name))


def read_store(path):
    ds = Datastore(path)
    ds.check_values(int(ds.meta["dictionary_size"]))
    return ds


def compare_stores(got, want, names=("keys.npy", "vals.npy")):
    same_files(got.path, want.path, names)
    same_meta(got.meta, want.meta)


@pytest.fixture(scope="module")
def ivf_flat(tiny_datastore, tmp_path_factory):
    """An exact-list IVF index of the tiny store (searched by neighbours, pruning, import)."""
    out = str(tmp_path_factory.mktemp("kill9-index") / "knn.index")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        build_index(str(tiny_datastore), output=out, factory="IVF64,Flat", train_size=20_000, progress=False,
                    log=quiet)
    finally:
        faiss.omp_set_num_threads(before)
    return out


def eval_lm_argv(data_bin, tiny_lm, *extra):
    return [data_bin, "--path", tiny_lm, "--gen-subset", "valid", "--tokens-per-sample", TOKENS_PER_SAMPLE,
            "--context-window", CONTEXT_WINDOW, "--cpu", "--max-tokens", 1024, "--num-workers", 0,
            "--no-progress-bar", "--user-dir", USER_DIR, "--task", "knnlm_language_modeling", *extra]


# ------------------------------------------------------------------ the writers
def test_datastore_pass(forkserver, tmp_path, data_bin, tiny_lm):
    out = tmp_path / "dstore"
    writer = Writer(forkserver, tmp_path, "eval-lm",
                    eval_lm_argv(data_bin, tiny_lm, "--save-knnlm-dstore", "--dstore", out, "--dstore-overwrite"),
                    out, read_store, compare_stores)
    print(writer.kill_twice_then_finish(seed=1))
    assert not os.path.exists(f"{out}.partial")


def test_index_build_training_and_adding(forkserver, tmp_path, tiny_datastore):
    out = tmp_path / "knn.index"
    argv = ["--dstore", tiny_datastore, "--output", out, "--index-factory", "IVF64,PQ8", "--train-size", 20_000,
            "--add-batch", 4000, "--checkpoint-every", 0, "--overwrite", "--quiet"]

    def read(path):
        return load_index(path, str(tiny_datastore))[1]

    def compare(got, want):
        same_bytes(got["path"], want["path"])
        same_meta(got, want, also=("path",))

    writer = Writer(forkserver, tmp_path, "build-index", argv, out, read, compare)
    print(writer.kill_twice_then_finish(seed=2))
    assert not [n for n in os.listdir(tmp_path) if ".partial" in n or n.endswith(".tmp")]


@pytest.fixture(scope="module")
def neighbours(forkserver, tmp_path_factory, data_bin, tiny_lm, tiny_datastore, ivf_flat):
    """The neighbours file, killed twice and finished (the predictor is fit on the reference)."""
    tmp = tmp_path_factory.mktemp("kill9-neighbours")
    out = tmp / "valid.nbrs"
    argv = eval_lm_argv(data_bin, tiny_lm, "--knnlm", "--dstore", tiny_datastore, "--knn-index", ivf_flat,
                        "--k", 16, "--probe", 4, "--knn-save-neighbors", out, "--knn-save-neighbors-overwrite")
    names = ["targets.npy", "lm_log_probs.npy", "dists.npy", "vals.npy", "segments.npy", "lm_features.npy"]

    def compare(got, want):
        same_files(got.path, want.path, names)
        same_meta(got.meta, want.meta)

    writer = Writer(forkserver, tmp, "eval-lm", argv, out, read_neighbors, compare)
    return writer.kill_twice_then_finish(seed=3), tmp / "reference"


def test_neighbours_file(neighbours):
    landed, reference = neighbours
    print(landed)
    assert read_neighbors(str(reference)).lm_features is not None


def test_predictor(forkserver, tmp_path, neighbours):
    _, nbrs = neighbours
    out = tmp_path / "predictor.json"
    argv = [nbrs, "--k", 16, "--knn-temp", 1, "--lmbda", 0.25, "--retrieval-fractions", "0:1:0.25",
            "--save-predictor", out, "--no-plots", "--quiet"]

    def read(path):
        RetrievalPredictor.load(path)
        return open(path, "rb").read()

    def compare(got, want):
        assert got == want

    writer = Writer(forkserver, tmp_path, "sweep", argv, out, read, compare)
    print(writer.kill_twice_then_finish(seed=4))


def test_pruning(forkserver, tmp_path, tiny_datastore, ivf_flat):
    out = tmp_path / "pruned"
    argv = ["--dstore", tiny_datastore, "--output", out, "--index", ivf_flat, "--k", 4, "--nprobe", 1,
            "--batch-size", 2048, "--checkpoint-every", 0, "--overwrite", "--quiet"]
    writer = Writer(forkserver, tmp_path, "prune", argv, out, read_store,
                    lambda got, want: compare_stores(got, want, ("keys.npy", "vals.npy", "counts.npy")))
    print(writer.kill_twice_then_finish(seed=5))
    assert not os.path.exists(f"{out}.prune-state") and not os.path.exists(f"{out}.partial")


def test_import(forkserver, tmp_path, data_bin, tiny_lm, tiny_datastore, ivf_flat):
    src = Datastore(str(tiny_datastore))
    np.asarray(src.keys, dtype=np.float32).tofile(tmp_path / "orig_keys.npy")
    np.asarray(src.vals, dtype=np.int64).tofile(tmp_path / "orig_vals.npy")
    out = tmp_path / "imported"
    argv = [data_bin, "--path", tiny_lm, "--dstore-filename", tmp_path / "orig", "--dstore-size", src.size,
            "--dim", src.dim, "--first-token", 0, "--indexfile", ivf_flat, "--probe", 4,
            "--self-recall-queries", 200, "--dstore", out, "--dstore-overwrite", "--quiet"]

    def read(path):
        store = read_store(path)
        index_meta = json.load(open(meta_path(os.path.join(path, "knn.index"))))
        load_index(os.path.join(path, "knn.index"), store)  # the store never appears without its index
        return store, index_meta

    def compare(got, want):
        compare_stores(got[0], want[0], ("vals.npy",))
        same_meta(got[1], want[1], also=("datastore_path", "datastore_fingerprint"))

    writer = Writer(forkserver, tmp_path, "import", argv, out, read, compare)
    print(writer.kill_twice_then_finish(seed=6))
    assert not os.path.exists(f"{out}.partial")
