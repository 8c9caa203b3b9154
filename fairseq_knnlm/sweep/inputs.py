"""fairseq-knnlm-sweep's inputs: the files and options it reads, checked up front."""

import json
import os
from dataclasses import dataclass

import numpy as np

from .. import sweep as sw
from ..storage.neighbors import read_neighbors

# Fields two neighbours files must share to be fit on one and evaluated on the other.
SAME_RUN_FIELDS = ("sim_func", "dstore_fingerprint", "checkpoint_sha256", "dictionary_md5", "keytype")


def load_dictionary(path: str, meta: dict):
    from ..integration.artefacts import load_dictionary as read_dictionary
    from ..storage.datastore import dictionary_md5

    dictionary = read_dictionary(path, sw.SweepError, "pass the model's dict.txt")
    if meta.get("dictionary_md5") and dictionary_md5(dictionary) != meta["dictionary_md5"]:
        raise sw.SweepError(
            f"--dict {path} is not the dictionary the neighbours were saved with "
            f"({len(dictionary)} vs {meta.get('dictionary_size')} types); pass the model's dict.txt"
        )
    return dictionary


def frequency_counts(path: str, meta: dict, out):
    """(counts per token id, description)."""
    if os.path.isdir(path):
        from ..storage.datastore import Datastore, DatastoreError

        from ..storage.neighbors import KIND, META_FILE

        try:
            with open(os.path.join(path, META_FILE)) as f:
                kind = json.load(f).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None  # sharded or broken: Datastore says what is wrong
        if kind == KIND:
            raise sw.SweepError(f"--freq-from {path} holds saved neighbours; pass a datastore directory")
        try:
            store = Datastore(path)
        except DatastoreError as e:
            raise sw.SweepError(str(e)) from None
        except (KeyError, TypeError):
            raise sw.SweepError(f"--freq-from {path} is not a readable datastore; pass the --dstore directory") from None
        fp = meta.get("dstore_fingerprint")
        if fp and store.fingerprint != fp:
            print(f"note: {path} is not the datastore the neighbours were retrieved from", file=out)
        return (sw.token_counts(store.vals, int(meta.get("dictionary_size") or 0), weights=store.counts),
                f"count in datastore {path}")
    dictionary = load_dictionary(path, meta) if os.path.exists(path) else None
    if dictionary is None:
        raise sw.SweepError(f"--freq-from {path} is neither a datastore directory nor a dict.txt")
    return np.asarray(dictionary.count, dtype=np.int64), f"count in {path} (training data)"


def check_fit_file(fit, nb, option: str = "--adaptive-fit") -> None:
    """The fit file must come from the same run set-up as FILE, on another split."""
    for field in SAME_RUN_FIELDS:
        a, b = fit.meta.get(field), nb.meta.get(field)
        if a is not None and b is not None and a != b:
            raise sw.SweepError(
                f"{option} {fit.path} and {nb.path} differ in {field}; save both with the same "
                "model, datastore and --knn-sim-func"
            )
    same_split = (fit.meta.get("data"), fit.meta.get("split")) == (nb.meta.get("data"), nb.meta.get("split"))
    if os.path.realpath(fit.path) == os.path.realpath(nb.path) or (fit.meta.get("split") and same_split):
        raise sw.SweepError(
            f"{option} {fit.path} covers the same split as {nb.path}; fit on another split "
            "(e.g. valid) so the comparison is held out"
        )


@dataclass
class Inputs:
    """Everything the sweep reads, checked before any computation."""

    nb: object                       # the neighbours of FILE
    ks: list
    temps: list
    lambdas: list
    signals: list
    fit: object = None               # --adaptive-fit neighbours
    retrieval_fit: object = None     # --retrieval-fit neighbours
    fractions: list = None           # --retrieval-fractions
    dictionary: object = None
    freq: tuple = None               # (counts per token id, description)
    freq_edges: list = None
    prefix: str = ""
    cache: tuple = None              # (sizes, thetas, cache lambdas) of --knn-cache-*


def load_inputs(args, out) -> Inputs:
    nb = read_neighbors(args.file)
    if nb.n == 0:
        raise sw.SweepError(f"{nb.path} holds no scored tokens; save neighbours of a non-empty --gen-subset")
    meta = nb.meta
    lambdas = sw.parse_grid(args.lmbda, "--lmbda")
    temps = sw.parse_grid(args.knn_temp if args.knn_temp is not None else str(meta.get("knn_temp", 1.0)),
                          "--knn-temp")
    ks = sw.parse_grid(args.k if args.k is not None else str(nb.k), "--k", cast=int)
    sw.check_grid(ks, temps, lambdas, nb.k, nb.path)
    signals = [s.strip() for s in args.adaptive_signals.split(",") if s.strip()]
    for s in signals:
        if s not in sw.SIGNALS:
            raise sw.SweepError(f"unknown --adaptive-signals {s!r}; choose from {', '.join(sw.SIGNALS)}")
    if args.adaptive_buckets < 1:
        raise sw.SweepError("--adaptive-buckets must be at least 1")
    if args.top < 0 or args.context < 0:
        raise sw.SweepError("--top and --context take non-negative numbers")
    if args.chunk_rows is not None and args.chunk_rows < 1:
        raise sw.SweepError("--chunk-rows must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise sw.SweepError("--threads must be at least 1")
    inputs = Inputs(nb, ks, temps, lambdas, signals)
    if args.adaptive_fit:
        inputs.fit = read_fit_file(args.adaptive_fit, "--adaptive-fit", nb, ks, temps, lambdas)
    inputs.fractions, inputs.retrieval_fit = load_retrieval_inputs(args, nb, ks, temps, lambdas)
    inputs.cache = load_cache_inputs(args, nb)
    inputs.dictionary = load_dictionary(args.dict, meta) if args.dict else None
    inputs.freq_edges = sw.parse_grid(args.freq_edges, "--freq-edges", cast=int) if args.freq_edges else None
    if inputs.freq_edges is not None and (inputs.freq_edges != sorted(inputs.freq_edges) or inputs.freq_edges[0] != 0):
        raise sw.SweepError("--freq-edges must be increasing and start at 0, e.g. 0,1,10,100")
    inputs.freq = frequency_counts(args.freq_from, meta, out) if args.freq_from else None
    inputs.prefix = args.plot_prefix or nb.path.rstrip("/")
    if not args.no_plots and not os.access(os.path.dirname(os.path.abspath(inputs.prefix)), os.W_OK):
        raise sw.SweepError(f"cannot write plots next to {inputs.prefix}; pass --plot-prefix or --no-plots")
    return inputs


def read_fit_file(path, option, nb, ks, temps, lambdas):
    fit = read_neighbors(path)
    if fit.n == 0:
        raise sw.SweepError(f"{option} {fit.path} holds no scored tokens")
    sw.check_grid(ks, temps, lambdas, fit.k, fit.path)
    check_fit_file(fit, nb, option)
    return fit


def load_retrieval_inputs(args, nb, ks, temps, lambdas):
    """(fractions or None, --retrieval-fit neighbours or None)."""
    wanted = args.retrieval_fractions or args.save_predictor or args.retrieval_fit
    if not wanted:
        return None, None
    fractions = sw.parse_grid(args.retrieval_fractions or "0:1:0.05", "--retrieval-fractions")
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise sw.SweepError(f"--retrieval-fractions values must lie in [0, 1], got {f:g}")
    fit = None
    if args.retrieval_fit:
        fit = read_fit_file(args.retrieval_fit, "--retrieval-fit", nb, ks, temps, lambdas)
        sw.check_features(fit, "--retrieval-fit")
    sw.check_features(nb, "FILE" if fit is None else "FILE (the held-out split)")
    if args.save_predictor:
        directory = os.path.dirname(os.path.abspath(args.save_predictor))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise sw.SweepError(f"cannot write --save-predictor {args.save_predictor}; pass a writable path")
    return fractions, fit


def load_cache_inputs(args, nb):
    """(sizes, thetas, cache lambdas) of --knn-cache-*, or None when none is given."""
    given = (args.knn_cache_size, args.knn_cache_theta, args.knn_cache_lmbda)
    if all(g is None for g in given):
        return None
    sw.check_cache_inputs(nb, [], [], [])  # keys saved, one stream
    meta = nb.meta
    size = args.knn_cache_size if args.knn_cache_size is not None else str(meta.get("cache_size") or "")
    theta = args.knn_cache_theta if args.knn_cache_theta is not None else str(meta.get("cache_theta", ""))
    if not size or size == "0" or not theta or theta == "None":
        raise sw.SweepError(f"{nb.path} records no cache settings; pass --knn-cache-size and --knn-cache-theta")
    sizes = sw.parse_grid(size, "--knn-cache-size", cast=int)
    thetas = sw.parse_grid(theta, "--knn-cache-theta")
    cache_lambdas = sw.parse_grid(args.knn_cache_lmbda or "0:0.5:0.05", "--knn-cache-lmbda")
    sw.check_cache_inputs(nb, sizes, thetas, cache_lambdas)
    return sizes, thetas, cache_lambdas
