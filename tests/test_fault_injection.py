"""Fault injection: every artefact, damaged the ways a full disk, an interrupted copy or a
bad conversion damages files, is refused where it is read.

For each artefact (datastore meta.json and arrays, pruned and imported stores, index files,
their sidecars and build checkpoints, saved neighbours, retrieval predictors, pruning
checkpoints, the import's inputs): truncation at several offsets, random byte corruption,
a wrong dtype, a header that lies about the shape, out-of-range values, non-finite keys,
metadata with missing or wrongly typed fields.  Every case is a one-line UserError in
process; a few real processes show the command-line tools print it as one line with exit
code 2 and no traceback.  The good artefacts the damaged copies were made from keep
working.  Random corruption may hit bytes nothing depends on (a date in meta.json, the
padding of a header): then the artefact must read back sound, never crash.
"""

import concurrent.futures
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch

from conftest import TOKENS_PER_SAMPLE, USER_DIR, eval_lm, eval_lm_in_process, run
from fairseq_knnlm.storage import datastore as datastore_module
from fairseq_knnlm.retrieval.adaptive import RetrievalPredictor, fit_predictor, fraction_thresholds
from fairseq_knnlm.storage.datastore import (
    NPY_HEADER_BYTES,
    Datastore,
    DatastoreError,
    DatastoreWriter,
    shard_dirname,
)
from fairseq_knnlm.errors import UserError, install_excepthook
from fairseq_knnlm.tools.importer import import_original
from fairseq_knnlm.index import IndexBuildError, KeyReader, build_index, load_index, meta_path, partial_paths
from fairseq_knnlm.storage.neighbors import NeighborsError, NeighborsWriter, read_neighbors
from fairseq_knnlm.tools.prune import STATE_FILE, STATE_SUFFIX, prune_datastore

N = 2000  # entries of the small store the damaged copies are made from
K = 8


def quiet(msg):
    pass


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # deterministic builds; faster on a busy 2-core machine
    yield
    faiss.omp_set_num_threads(before)


def digest(root) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(path.encode())
            if not os.path.islink(path):
                h.update(open(path, "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_datastore, data_bin, tiny_lm):
    """Small real artefacts, written by the real writers, that the cases copy and damage."""
    root = tmp_path_factory.mktemp("good")
    src = Datastore(str(tiny_datastore))
    vocab = int(src.meta["dictionary_size"])
    store = str(root / "dstore")
    writer = DatastoreWriter(store, src.dim, np.float32)
    writer.append(np.asarray(src.keys[:N]), np.asarray(src.vals[:N]))
    writer.commit(dict(src.meta))
    build_index(store, factory="Flat", progress=False, log=quiet)
    flat = os.path.join(store, "knn.index")
    ivf = str(root / "ivf.index")
    build_index(store, output=ivf, factory="IVF16,Flat", train_size=N, progress=False, log=quiet)
    pruned = str(root / "pruned")
    prune_datastore(store, pruned, index=flat, k=2, progress=False, log=quiet)

    rng = np.random.default_rng(0)
    n = 300
    targets = np.asarray(src.vals[N : N + n])
    vals = np.asarray(src.vals[rng.integers(0, N, (n, K))])
    vals[::7, 0] = targets[::7]
    dists = np.sort(rng.uniform(5, 80, (n, K)), axis=1).astype(np.float32)
    dists[3, -2:], vals[3, -2:] = np.inf, -1  # unfilled slots
    lm = -rng.gamma(1.5, 2.0, n).astype(np.float32)
    nbrs = NeighborsWriter(str(root / "nbrs"), K, dict(dictionary_size=vocab, split="valid", sim_func="faiss"))
    for s in range(0, n, 64):
        e = min(s + 64, n)
        nbrs.append(targets[s:e], lm[s:e], dists[s:e], vals[s:e], lengths=[e - s])
    nbrs.commit()

    x = rng.normal(size=(300, 3)).astype(np.float32)
    predictor = fit_predictor(x, x[:, 0] - x[:, 1] ** 2)
    predictor.thresholds = fraction_thresholds(predictor.score(x), [0, 0.5, 1])
    predictor.meta = dict(k=K, knn_temp=1.0, lmbda=0.25)
    predictor.save(str(root / "predictor.json"))

    # An imported store: the original code's headerless files of the first N entries.
    orig = root / "orig"
    orig.mkdir()
    np.asarray(src.keys[:N], dtype=np.float32).tofile(orig / "dstore_keys.npy")
    np.asarray(src.vals[:N], dtype=np.int64).tofile(orig / "dstore_vals.npy")
    imported = str(root / "imported")
    import_original(str(orig / "dstore"), N, src.dim, False, str(tiny_lm), str(data_bin), imported,
                    first_token=0, progress=False, log=quiet)
    artefacts = SimpleNamespace(root=root, store=store, flat=flat, ivf=ivf, pruned=pruned, nbrs=str(root / "nbrs"),
                                predictor=str(root / "predictor.json"), imported=imported, orig=orig,
                                vocab=vocab, dim=src.dim)
    before = digest(root)
    yield artefacts
    # The good artefacts are untouched by everything done to their copies, and still work.
    assert digest(root) == before
    ds = Datastore(store)
    ds.check_values(vocab, full=True)
    index, _ = load_index(flat, ds)
    assert (index.search(np.asarray(ds.keys[:5]), 1)[0] == 0).all()  # each key finds itself
    load_index(ivf, ds)
    Datastore(pruned).check_values(vocab, full=True)
    Datastore(imported).check_values(vocab, full=True)
    read_neighbors(artefacts.nbrs)
    RetrievalPredictor.load(artefacts.predictor)


# ------------------------------------------------------------------ helpers
def refused(fn, *fragments, error=UserError):
    """fn() raises ``error`` with a one-line message holding every fragment."""
    with pytest.raises(error) as raised:
        fn()
    message = str(raised.value)
    assert "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def refused_or_sound(fn, sound):
    """Random damage: a one-line UserError, or a result that passes ``sound`` (never a crash)."""
    try:
        result = fn()
    except UserError as e:
        assert "\n" not in str(e), str(e)
        return "refused"
    sound(result)
    return "read"


def copy(path, tmp_path, name=None):
    target = tmp_path / (name or os.path.basename(path))
    if os.path.isdir(path):
        shutil.copytree(path, target, symlinks=True)
    else:
        shutil.copy(path, target)
    return target


def truncate(path, size):
    os.truncate(path, size)


def flip_bytes(path, seed, count, lo=0, hi=None):
    """XOR ``count`` random bytes in [lo, hi) with random non-zero masks."""
    rng = np.random.default_rng(seed)
    data = bytearray(Path(path).read_bytes())
    hi = len(data) if hi is None else min(hi, len(data))
    for pos in rng.choice(np.arange(lo, hi), count, replace=False):
        data[pos] ^= int(rng.integers(1, 256))
    Path(path).write_bytes(bytes(data))


def edit_json(path, drop=(), **changes):
    obj = json.loads(Path(path).read_text())
    for key in drop:
        obj.pop(key)
    obj.update(changes)
    Path(path).write_text(json.dumps(obj))


def rewrite_header(path, descr=None, shape=None, fortran=False):
    """Replace a .npy file's header (kept at its size) with one that says something else."""
    arr = np.load(path, mmap_mode="r")
    header = {"descr": descr or np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": fortran,
              "shape": tuple(arr.shape if shape is None else shape)}
    body = repr(header).encode("latin1")
    room = NPY_HEADER_BYTES - 10
    raw = np.lib.format.magic(1, 0) + room.to_bytes(2, "little") + body.ljust(room - 1) + b"\n"
    del arr
    with open(path, "r+b") as f:
        f.write(raw)


def set_rows(path, rows, value):
    arr = np.load(path, mmap_mode="r+")
    arr[rows] = value
    arr.flush()
    del arr


# ------------------------------------------------------------------ datastores
def open_store(path, vocab, full=False):
    ds = Datastore(str(path))
    ds.check_values(vocab, full=full)
    return ds


def size_of(d, name):
    return os.path.getsize(d / name)


META_CASES = [
    ("meta empty", lambda d: truncate(d / "meta.json", 0), "not valid JSON"),
    ("meta cut to 1 byte", lambda d: truncate(d / "meta.json", 1), "not valid JSON"),
    ("meta cut in half", lambda d: truncate(d / "meta.json", size_of(d, "meta.json") // 2), "not valid JSON"),
    ("meta cut by 1 byte", lambda d: truncate(d / "meta.json", size_of(d, "meta.json") - 1), "not valid JSON"),
    ("meta not UTF-8", lambda d: (d / "meta.json").write_bytes(b"\xff\x80{}"), "not valid JSON"),
    ("meta a list", lambda d: (d / "meta.json").write_text("[1, 2]"), "not an object"),
    *[(f"meta lacks {f}", lambda d, f=f: edit_json(d / "meta.json", drop=[f]), f"lacks the field '{f}'")
      for f in ("size", "dim", "keys_dtype", "vals_dtype", "id")],
    ("meta lacks format_version", lambda d: edit_json(d / "meta.json", drop=["format_version"]), "format None"),
    *[(f"meta {f}={v!r}", lambda d, f=f, v=v: edit_json(d / "meta.json", **{f: v}), f"field '{f}'")
      for f, v in (("size", "2000"), ("size", -1), ("size", 2000.0), ("size", True), ("dim", 0), ("dim", "64"),
                   ("dim", None), ("keys_dtype", "float64"), ("keys_dtype", 32), ("vals_dtype", "int64"),
                   ("id", 7), ("counts_dtype", "float32"), ("external_keys", "keys.bin"), ("vals_range", "0-9"))],
    ("meta size lies (+1)", lambda d: edit_json(d / "meta.json", size=N + 1), "truncated or corrupt"),
    ("meta size lies (-1)", lambda d: edit_json(d / "meta.json", size=N - 1), "truncated or corrupt"),
    ("meta dim lies", lambda d: edit_json(d / "meta.json", dim=32), "truncated or corrupt"),
    ("meta keys_dtype lies", lambda d: edit_json(d / "meta.json", keys_dtype="float16"), "truncated or corrupt"),
]


def npy_cases(name, dtype, shape):
    n, dtype = shape[0], np.dtype(dtype)
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    cases = [(f"{name} cut at {at}", lambda d, at=at: truncate(d / name, at), "truncated or corrupt")
             for at in (0, 6, 64, NPY_HEADER_BYTES - 1, NPY_HEADER_BYTES, NPY_HEADER_BYTES + row_bytes * 10 + 3)]
    cases += [
        (f"{name} cut by 1 byte", lambda d: truncate(d / name, size_of(d, name) - 1), "truncated or corrupt"),
        (f"{name} with bytes appended", lambda d: open(d / name, "ab").write(b"\0" * row_bytes),
         "truncated or corrupt"),
        (f"{name} removed", lambda d: os.remove(d / name), "missing"),
        (f"{name} magic overwritten", lambda d: flip_bytes(d / name, 1, 4, 0, 6), "not a readable .npy file"),
        (f"{name} header unparsable", lambda d: open(d / name, "r+b").write(b"\x93NUMPY\x01\x00\x76\x00{'descr': @@"),
         "not a readable .npy file"),
        (f"{name} header says fewer rows", lambda d: rewrite_header(d / name, shape=(n - 1,) + shape[1:]),
         "by its header"),
        (f"{name} header says more rows", lambda d: rewrite_header(d / name, shape=(n + 1,) + shape[1:]),
         "not a readable .npy file"),
        (f"{name} header says float64", lambda d: rewrite_header(d / name, descr="<f8"),
         "by its header" if dtype.itemsize == 8 else "not a readable .npy file"),
        (f"{name} header says big-endian", lambda d: rewrite_header(d / name, descr=">" + dtype.str[1:]),
         "by its header"),
        (f"{name} header says int8", lambda d: rewrite_header(d / name, descr="|i1"), "by its header"),
    ]
    if len(shape) > 1:
        cases += [
            (f"{name} header says Fortran order", lambda d: rewrite_header(d / name, fortran=True), "Fortran order"),
            (f"{name} header says other dim", lambda d: rewrite_header(d / name, shape=(n * 2, shape[1] // 2)),
             "by its header"),
        ]
    return cases


KEYS_CASES = npy_cases("keys.npy", np.float32, (N, 64))
VALS_CASES = npy_cases("vals.npy", np.int32, (N,)) + [
    ("vals.npy float32 file", lambda d: np.save(d / "vals.npy", np.zeros(N, np.float32)), "by its header"),
    ("vals.npy int64 file", lambda d: np.save(d / "vals.npy", np.zeros(N, np.int64)), "truncated or corrupt"),
    ("vals.npy a value past the dictionary", lambda d: set_rows(d / "vals.npy", [7], 10**6), "entry 7 holds 1,000,000"),
    ("vals.npy a value of -1", lambda d: set_rows(d / "vals.npy", [1999], -1), "entry 1,999 holds -1"),
]


@pytest.mark.parametrize("case", META_CASES + KEYS_CASES + VALS_CASES, ids=lambda c: c[0])
def test_damaged_datastore_is_refused_in_one_line(good, tmp_path, case):
    _, damage, fragment = case
    store = copy(good.store, tmp_path)
    damage(store)
    message = refused(lambda: open_store(store, good.vocab), fragment, error=DatastoreError)
    assert "rerun" in message or "rebuild" in message


@pytest.mark.parametrize("seed", range(6))
def test_random_corruption_of_a_datastore_is_refused_or_harmless(good, tmp_path, seed):
    expected = Datastore(good.store)

    def sound(ds):  # e.g. a flipped letter of the creation date
        assert ds.size == N and ds.dim == good.dim
        np.testing.assert_array_equal(ds.vals, expected.vals)
        np.testing.assert_array_equal(ds.keys, expected.keys)

    outcomes = []
    for name, lo, hi in (("meta.json", 0, None), ("keys.npy", 0, NPY_HEADER_BYTES), ("vals.npy", 0, NPY_HEADER_BYTES)):
        store = copy(good.store, tmp_path, f"{name}-{seed}")
        flip_bytes(store / name, seed, 3, lo, hi)
        outcomes.append(refused_or_sound(lambda: open_store(store, good.vocab), sound))
    # Values: random bytes of vals.npy's data either stay token ids or are refused.
    store = copy(good.store, tmp_path, f"values-{seed}")
    flip_bytes(store / "vals.npy", seed, 3, NPY_HEADER_BYTES)
    outcomes.append(refused_or_sound(lambda: open_store(store, good.vocab), lambda ds: None))
    assert "refused" in outcomes  # corrupting a .npy header's first bytes is always caught


def test_recorded_value_ranges_and_the_full_check(good, tmp_path, monkeypatch):
    """Stores above ALWAYS_SCAN_ENTRIES trust the ranges their writer recorded;
    --knn-check-datastore (full=True) scans anyway, keys included."""
    monkeypatch.setattr(datastore_module, "ALWAYS_SCAN_ENTRIES", 0)  # every store counts as large
    assert Datastore(good.store).meta["vals_range"] == [int(np.min(Datastore(good.store).vals)),
                                                        int(np.max(Datastore(good.store).vals))]
    damaged = copy(good.store, tmp_path)
    set_rows(damaged / "vals.npy", [11], good.vocab)
    open_store(damaged, good.vocab)  # the recorded range is trusted: no scan
    refused(lambda: open_store(damaged, good.vocab, full=True), "entry 11 holds", "another dictionary")
    edit_json(damaged / "meta.json", drop=["vals_range"])  # no record (an older store): scanned
    refused(lambda: open_store(damaged, good.vocab), "entry 11 holds")
    lying = copy(good.store, tmp_path, "lying")
    edit_json(lying / "meta.json", vals_range=[0, good.vocab])
    refused(lambda: open_store(lying, good.vocab), "vals_range in meta.json",
            f"not all token ids of the {good.vocab:,}")
    refused(lambda: open_store(good.store, 10), "another dictionary")  # a smaller dictionary: from the record

    nan_keys = copy(good.store, tmp_path, "nan")
    set_rows(nan_keys / "keys.npy", [5, 17], np.nan)
    open_store(nan_keys, good.vocab)
    refused(lambda: open_store(nan_keys, good.vocab, full=True), "keys.npy: the keys of entries 5 and 17 (2 of 2,000)")


PRUNED_CASES = [
    ("counts.npy cut", lambda d: truncate(d / "counts.npy", 200), "truncated or corrupt"),
    ("counts.npy removed", lambda d: os.remove(d / "counts.npy"), "missing"),
    ("counts.npy header says float32", lambda d: rewrite_header(d / "counts.npy", descr="<f4"), "by its header"),
    ("a count of 0", lambda d: set_rows(d / "counts.npy", [4], 0), "entry 4 holds 0, not a count of at least 1"),
    ("a negative count", lambda d: set_rows(d / "counts.npy", [9], -3), "entry 9 holds -3"),
    ("counts_dtype int64", lambda d: edit_json(d / "meta.json", counts_dtype="int64"), "field 'counts_dtype'"),
    ("counts_range a string", lambda d: edit_json(d / "meta.json", counts_range="1+"), "field 'counts_range'"),
]


@pytest.mark.parametrize("case", PRUNED_CASES, ids=lambda c: c[0])
def test_damaged_pruned_store_is_refused(good, tmp_path, case):
    _, damage, fragment = case
    store = copy(good.pruned, tmp_path)
    damage(store)
    refused(lambda: open_store(store, good.vocab), fragment, "fairseq-knnlm-prune", error=DatastoreError)


def test_damaged_imported_and_sharded_stores_are_refused(good, tmp_path):
    meta = json.load(open(os.path.join(good.imported, "meta.json")))
    for field, value, fragment in (("path", 3, "field 'path'"), ("offset", "0", "field 'offset'"),
                                   ("offset", -8, "field 'offset'"), ("sampled_rows_sha256", None, "field")):
        store = copy(good.imported, tmp_path, f"imported-{field}-{value}")
        edit_json(store / "meta.json", external_keys=dict(meta["external_keys"], **{field: value}))
        refused(lambda: open_store(store, good.vocab), fragment, "fairseq-knnlm-import", error=DatastoreError)
    store = copy(good.imported, tmp_path, "imported-no-path")
    edit_json(store / "meta.json", external_keys={"offset": 0})
    refused(lambda: open_store(store, good.vocab), "lacks the field 'path'")

    # The referenced keys file cut short (say, a copy that ran out of disk).
    orig = copy(good.orig, tmp_path, "orig")
    store = copy(good.imported, tmp_path, "imported-cut")
    edit_json(store / "meta.json", external_keys=dict(meta["external_keys"], path=str(orig / "dstore_keys.npy")))
    open_store(store, good.vocab)
    truncate(orig / "dstore_keys.npy", os.path.getsize(orig / "dstore_keys.npy") - 256)
    refused(lambda: open_store(store, good.vocab), "missing or changed size", "fairseq-knnlm-import")

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for i in range(2):
        shutil.copytree(good.store, sharded / shard_dirname(i, 2))
    assert open_store(sharded, good.vocab).size == 2 * N
    truncate(sharded / shard_dirname(1, 2) / "vals.npy", 500)
    refused(lambda: open_store(sharded, good.vocab), "shard-001-of-002/vals.npy is truncated")
    odd = tmp_path / "odd"
    (odd / "shard-one").mkdir(parents=True)
    refused(lambda: open_store(odd, good.vocab), "not a shard directory")


# ------------------------------------------------------------------ non-finite keys
def test_writer_refuses_non_finite_keys_and_names_float16_overflow(tmp_path):
    keys = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    fp16 = DatastoreWriter(str(tmp_path / "fp16"), 8, np.float16)
    fp16.append(keys, np.arange(50))
    hot = keys.copy()
    hot[[3, 30], 2] = 70_000.0  # above float16's 65,504
    refused(lambda: fp16.append(hot, np.arange(50)),
            "the keys of entries 53 and 80 (2 of the 50 keys of entries 50 to 99) are not finite",
            "float16 overflows above 65,504: drop --dstore-fp16", "nothing was written", error=DatastoreError)
    fp32 = DatastoreWriter(str(tmp_path / "fp32"), 8, np.float32)
    nan = keys.copy()
    nan[7, 0] = np.nan
    message = refused(lambda: fp32.append(nan, np.arange(50)), "entry 7 (1 of the 50", "check the model")
    assert "float16" not in message
    assert os.listdir(tmp_path) == []  # nothing committed, no .partial left


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_index_build_refuses_non_finite_keys(good, tmp_path, dtype):
    src = Datastore(good.store)
    store = str(tmp_path / "dstore")
    writer = DatastoreWriter(store, src.dim, dtype)
    writer.append(np.asarray(src.keys), np.asarray(src.vals))
    writer.commit(dict(src.meta))
    # What float16 overflow or a NaN-producing model leave, here written into the store afterwards.
    set_rows(os.path.join(store, "keys.npy"), [40, 1500], np.inf if dtype == np.float16 else np.nan)
    for factory in ("Flat", "IVF16,Flat"):  # adding, and training (first read)
        message = refused(lambda: build_index(store, factory=factory, progress=False, log=quiet),
                          "keys.npy: the keys of entries 40 and 1,500 (2 of the", "FAISS cannot index them",
                          error=IndexBuildError)
        assert ("--dstore-fp16" in message) == (dtype == np.float16)
        assert not os.path.exists(os.path.join(store, "knn.index"))  # at most an unfinished checkpoint
    refused(lambda: KeyReader(Datastore(store).keys).take(np.array([1500, 3])), "entry 1,500 (1 of the 2 keys read)")


def test_pass_refuses_float16_overflow(tmp_path, data_bin, tiny_lm):
    """A model whose hidden states exceed float16's range: the --dstore-fp16 pass stops at
    the first batch, names the entries and the flag, and leaves nothing."""
    state = torch.load(tiny_lm, map_location="cpu", weights_only=False)
    state["model"]["decoder.layers.1.final_layer_norm.weight"][0] *= 1e6  # feature 0 of last_ffn_input
    hot = tmp_path / "hot.pt"
    torch.save(state, hot)
    out = tmp_path / "dstore"
    refused(lambda: eval_lm_in_process(data_bin, hot, "--save-knnlm-dstore", "--dstore", out, "--dstore-fp16"),
            f"cannot write datastore {out}: the keys of entries 0, 1", "float16 overflows", "drop --dstore-fp16",
            error=DatastoreError)
    assert os.listdir(tmp_path) == ["hot.pt"]


# ------------------------------------------------------------------ indexes
def load(index, store):
    return load_index(str(index), Datastore(str(store)))


def index_cases():
    cases = []
    for kind in ("flat", "ivf"):
        cases += [(kind, f"cut at {at}", lambda p, at=at: truncate(p, at), "FAISS cannot read index")
                  for at in (0, 3, 16, 40)]
        cases += [
            (kind, "cut in half", lambda p: truncate(p, os.path.getsize(p) // 2), "FAISS cannot read index"),
            (kind, "cut by 1 byte", lambda p: truncate(p, os.path.getsize(p) - 1), "FAISS cannot read index"),
            (kind, "fourcc overwritten", lambda p: open(p, "r+b").write(b"XXXX"), "FAISS cannot read index"),
        ]
    return cases


def sidecar_cases():
    return [
        ("sidecar empty", lambda m: truncate(m, 0), "not valid JSON"),
        ("sidecar cut in half", lambda m: truncate(m, os.path.getsize(m) // 2), "not valid JSON"),
        ("sidecar a string", lambda m: open(m, "w").write('"knn.index"'), "not an object"),
        *[(f"sidecar lacks {f}", lambda m, f=f: edit_json(m, drop=[f]), f"lacks the field '{f}'")
          for f in ("datastore_fingerprint", "ntotal", "dim", "metric")],
        *[(f"sidecar {f}={v!r}", lambda m, f=f, v=v: edit_json(m, **{f: v}), f"field '{f}'")
          for f, v in (("ntotal", "2000"), ("ntotal", -1), ("dim", 0), ("dim", 6.4), ("metric", "cosine"),
                       ("datastore_fingerprint", 12))],
        ("sidecar ntotal lies", lambda m: edit_json(m, ntotal=N + 1), "holds 2001 keys"),
        ("sidecar of another store", lambda m: edit_json(m, datastore_fingerprint="0" * 16), "another datastore"),
        ("sidecar removed", lambda m: os.remove(m), "incomplete"),
    ]


@pytest.mark.parametrize("case", index_cases(), ids=lambda c: f"{c[0]} {c[1]}")
def test_damaged_index_is_refused_in_one_line(good, tmp_path, case):
    kind, _, damage, fragment = case
    store = copy(good.store, tmp_path)
    index = store / "knn.index"
    if kind == "ivf":
        shutil.copy(good.ivf, index)
        shutil.copy(meta_path(good.ivf), meta_path(index))
    damage(index)
    refused(lambda: load(index, store), fragment, "--overwrite", error=IndexBuildError)


@pytest.mark.parametrize("case", sidecar_cases(), ids=lambda c: c[0])
def test_damaged_index_sidecar_is_refused_in_one_line(good, tmp_path, case):
    _, damage, fragment = case
    store = copy(good.store, tmp_path)
    damage(meta_path(store / "knn.index"))
    refused(lambda: load(store / "knn.index", store), fragment, error=IndexBuildError)


def test_index_file_that_disagrees_with_its_sidecar_is_refused(good, tmp_path):
    store = copy(good.store, tmp_path)
    index = store / "knn.index"
    keys = np.asarray(Datastore(good.store).keys)
    for other, fragment in (
        (faiss.IndexFlatL2(32), "holds 32-dim keys"),  # a header that lies about the shape
        (faiss.IndexFlatIP(good.dim), "with metric ip"),
        (faiss.IndexFlatL2(good.dim), "holds 1999 keys"),
    ):
        if other.d == good.dim:
            other.add(keys[: N - 1] if other.metric_type == faiss.METRIC_L2 else keys)
        else:
            other.add(np.zeros((N, 32), np.float32))
        faiss.write_index(other, str(index))
        refused(lambda: load(index, store), fragment, "--overwrite", error=IndexBuildError)


@pytest.mark.parametrize("seed", range(8))
def test_random_corruption_of_an_index_header_is_refused_or_harmless(good, tmp_path, seed):
    ds = Datastore(good.store)
    queries = np.asarray(ds.keys[::97])
    for name, source in (("flat", good.flat), ("ivf", good.ivf)):
        index = tmp_path / f"{name}.index"
        shutil.copy(source, index)
        shutil.copy(meta_path(source), meta_path(index))
        flip_bytes(index, seed, 2, 0, 48)

        def sound(loaded):  # e.g. FAISS's unused header fields, or the saved nprobe (set below)
            got, _ = loaded
            assert got.ntotal == N and got.d == good.dim
            want = load_index(source, ds, nprobe=16)[0].search(queries, 4)[1]
            np.testing.assert_array_equal(got.search(queries, 4)[1], want)

        refused_or_sound(lambda: load_index(str(index), ds, nprobe=16), sound)


def interrupted_build(store, output, chunks=3):
    def crash(added):
        crash.calls += 1
        if crash.calls == chunks:
            raise RuntimeError("simulated crash")

    crash.calls = 0
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(str(store), output=str(output), factory="Flat", add_batch=300, checkpoint_every=0,
                    progress=False, log=quiet, on_chunk=crash)
    return partial_paths(str(output))


CHECKPOINT_CASES = [
    ("index cut short", lambda idx, st: truncate(idx, os.path.getsize(idx) - 100), "discarding"),
    ("index cut to its header", lambda idx, st: truncate(idx, 30), "discarding"),
    ("index of another dim", lambda idx, st: faiss.write_index(faiss.IndexFlatL2(8), idx), "discarding"),
    ("state not JSON", lambda idx, st: truncate(st, 10), "discarding"),
    ("state a list", lambda idx, st: open(st, "w").write("[]"), "discarding"),
    ("state lacks add_seconds", lambda idx, st: edit_json(st, drop=["add_seconds"]), "discarding"),
    ("state train_seconds a string", lambda idx, st: edit_json(st, train_seconds="1 s"), "discarding"),
    ("state of another plan", lambda idx, st: edit_json(st, factory="IVF16,Flat"), "discarding"),
    ("intact", lambda idx, st: None, "resuming"),
]


@pytest.fixture(scope="module")
def uninterrupted_flat(good, tmp_path_factory):
    out = tmp_path_factory.mktemp("flat") / "knn.index"
    build_index(good.store, output=str(out), factory="Flat", add_batch=300, progress=False, log=quiet)
    return out.read_bytes()


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=lambda c: c[0])
def test_damaged_build_checkpoint_is_discarded_and_the_build_ends_equal(good, tmp_path, uninterrupted_flat, case):
    _, damage, said = case
    out = tmp_path / "knn.index"
    part_index, part_state = interrupted_build(good.store, out)
    damage(part_index, part_state)
    log = []
    build_index(good.store, output=str(out), factory="Flat", add_batch=300, progress=False, log=log.append)
    assert any(said in line for line in log), log
    assert out.read_bytes() == uninterrupted_flat
    assert not os.path.exists(part_index) and not os.path.exists(part_state)


# ------------------------------------------------------------------ saved neighbours
def nbr_cases():
    cases = [
        ("meta cut in half", lambda d: truncate(d / "meta.json", size_of(d, "meta.json") // 2), "not valid JSON"),
        ("meta empty", lambda d: truncate(d / "meta.json", 0), "not valid JSON"),
        ("meta a number", lambda d: (d / "meta.json").write_text("3"), "not an object"),
        *[(f"meta lacks {f}", lambda d, f=f: edit_json(d / "meta.json", drop=[f]), f"lacks the field '{f}'")
          for f in ("n", "k", "dists_dtype")],
        *[(f"meta {f}={v!r}", lambda d, f=f, v=v: edit_json(d / "meta.json", **{f: v}), f"field '{f}'")
          for f, v in (("n", "300"), ("n", -1), ("k", 0), ("k", [8]), ("dists_dtype", "float64"), ("num_segments", "5"),
                       ("lm_feature_names", 3), ("counts_dtype", "int64"), ("dictionary_size", "big"))],
        ("meta lm_feature_names of numbers", lambda d: edit_json(d / "meta.json", lm_feature_names=[1, 2]),
         "not a list of names"),
        ("meta n lies", lambda d: edit_json(d / "meta.json", n=301), "truncated or corrupt"),
        ("segments do not add up", lambda d: set_rows(d / "segments.npy", [0], 65), "does not add up"),
        ("a target past the dictionary", lambda d: set_rows(d / "targets.npy", [12], 10**7),
         "targets.npy row 12 holds"),
        ("a neighbour value of -2", lambda d: set_rows(d / "vals.npy", (5, 1), -2), "vals.npy row 5 holds -2"),
        ("a NaN distance", lambda d: set_rows(d / "dists.npy", (9, 3), np.nan), "dists.npy row 9 is NaN"),
        ("a NaN LM log-prob", lambda d: set_rows(d / "lm_log_probs.npy", [299], np.nan),
         "lm_log_probs.npy row 299 is NaN"),
    ]
    for name, dtype, shape in (("dists.npy", np.float32, (300, K)), ("vals.npy", np.int32, (300, K)),
                               ("targets.npy", np.int32, (300,)), ("lm_log_probs.npy", np.float32, (300,)),
                               ("segments.npy", np.int64, (5,))):
        cases += [c for c in npy_cases(name, dtype, shape)
                  if "cut at" not in c[0] or c[0].endswith((" 0", " 64", f" {NPY_HEADER_BYTES}"))]
    return cases


@pytest.mark.parametrize("case", nbr_cases(), ids=lambda c: c[0])
def test_damaged_neighbours_file_is_refused_in_one_line(good, tmp_path, case):
    _, damage, fragment = case
    nbrs = copy(good.nbrs, tmp_path)
    damage(nbrs)
    refused(lambda: read_neighbors(str(nbrs)), fragment, "--knn-save-neighbors", error=NeighborsError)


@pytest.mark.parametrize("seed", range(4))
def test_random_corruption_of_neighbours_is_refused_or_harmless(good, tmp_path, seed):
    want = read_neighbors(good.nbrs)

    def sound(nb):
        for field in ("targets", "lm_log_probs", "dists", "vals", "segments"):
            np.testing.assert_array_equal(np.asarray(getattr(nb, field)), np.asarray(getattr(want, field)))

    for name in ("meta.json", "dists.npy", "vals.npy", "segments.npy"):
        nbrs = copy(good.nbrs, tmp_path, f"{name}-{seed}")
        flip_bytes(nbrs / name, seed, 3, 0, None if name == "meta.json" else NPY_HEADER_BYTES)
        refused_or_sound(lambda: read_neighbors(str(nbrs)), sound)


# ------------------------------------------------------------------ retrieval predictors
def predictor_cases():
    def without(field):
        return lambda p: edit_json(p, drop=[field])

    def changed(**kw):
        return lambda p: edit_json(p, **kw)

    cases = [(f"cut at {at}", lambda p, at=at: truncate(p, at), "not a retrieval predictor") for at in (0, 1, 40)]
    cases += [
        ("cut in half", lambda p: truncate(p, os.path.getsize(p) // 2), "not a retrieval predictor"),
        ("cut by 1 byte", lambda p: truncate(p, os.path.getsize(p) - 1), "not a retrieval predictor"),
    ]
    cases += [(f"lacks {f}", without(f), "predictor") for f in ("kind", "format_version", "model", "feature_names",
                                                                "mean", "scale", "weights", "bias", "thresholds", "meta")]
    cases += [
        ("kind of another file", changed(kind="knnlm-neighbors"), "not a retrieval predictor"),
        ("weights too short", changed(weights=[0.1, 0.2]), "wrong shape"),
        ("mean a string", changed(mean="0"), "wrong shape"),
        ("bias a list", changed(bias=[1.0]), "incomplete"),
        ("thresholds not pairs", changed(thresholds=[[0.5]]), "incomplete"),
        ("a NaN weight", lambda p: p.write_text(p.read_text().replace('"bias": ', '"bias": NaN, "_": ')),
         "non-finite weights"),
        ("a zero scale", changed(scale=[0.0, 1.0, 1.0]), "scale that is not positive"),
        ("a fraction of 2", changed(thresholds=[[2.0, 0.1]]), "outside [0, 1]"),
        ("feature names of another version", changed(feature_names=["a", "b", "c"]), "uses LM features"),
        ("meta a number", changed(meta=5), "incomplete"),
        ("not UTF-8", lambda p: open(p, "r+b").write(b"\xff\xff"), "not a retrieval predictor"),
    ]
    return cases


@pytest.mark.parametrize("case", predictor_cases(), ids=lambda c: c[0])
def test_damaged_predictor_is_refused_in_one_line(good, tmp_path, case):
    from fairseq_knnlm.retrieval.adaptive import RetrievalPredictorError

    _, damage, fragment = case
    path = copy(good.predictor, tmp_path)
    damage(path)
    refused(lambda: RetrievalPredictor.load(str(path)), fragment, "fairseq-knnlm-sweep --save-predictor",
            error=RetrievalPredictorError)


def test_random_corruption_of_a_predictor_is_refused_or_harmless(good, tmp_path):
    want = RetrievalPredictor.load(good.predictor)
    x = np.random.default_rng(1).normal(size=(20, 3))
    sound = sound_predictor(x, want)  # a flipped digit is another valid predictor: it must still work
    outcomes = []
    for seed in range(12):
        path = copy(good.predictor, tmp_path, f"p{seed}.json")
        flip_bytes(path, seed, 2)
        outcomes.append(refused_or_sound(lambda: RetrievalPredictor.load(str(path)), sound))
    assert "refused" in outcomes


def sound_predictor(x, want):
    def sound(p):
        assert p.score(x).shape == (len(x),) and len(p.thresholds) == len(want.thresholds)
        assert all(0 <= f <= 1 for f in p.thresholds)
    return sound


# ------------------------------------------------------------------ pruning checkpoints
@pytest.fixture(scope="module")
def uninterrupted_prune(good, tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "pruned"
    prune_datastore(good.store, str(out), index=good.flat, k=3, batch_size=250, progress=False, log=quiet)
    return {name: (out / name).read_bytes() for name in ("keys.npy", "vals.npy", "counts.npy")}


def npz_with(path, **changes):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    np.savez(path, **arrays)


PRUNE_STATE_CASES = [
    ("state cut short", lambda s: truncate(s / STATE_FILE, os.path.getsize(s / STATE_FILE) - 50), "discarding"),
    ("state cut to 10 bytes", lambda s: truncate(s / STATE_FILE, 10), "discarding"),
    ("state random bytes", lambda s: flip_bytes(s / STATE_FILE, 3, 20), ("discarding", "resuming")),
    ("state counts int32", lambda s: npz_with(s / STATE_FILE, counts=np.ones(N, np.int32)), "discarding"),
    ("state counts short", lambda s: npz_with(s / STATE_FILE, counts=np.ones(N - 1, np.int64)), "discarding"),
    ("state counts not conserved", lambda s: npz_with(s / STATE_FILE, counts=np.full(N, 2, np.int64)), "discarding"),
    ("state position past the end", lambda s: npz_with(s / STATE_FILE, position=np.int64(N + 1)), "discarding"),
    ("state alive as int", lambda s: npz_with(s / STATE_FILE, alive=np.ones(N, np.int64)), "discarding"),
    ("state lacks absorbed", lambda s: np.savez(s / STATE_FILE, position=0), "discarding"),
    ("plan not JSON", lambda s: truncate(s / "plan.json", 5), "discarding"),
    ("plan a list", lambda s: (s / "plan.json").write_text("[]"), "discarding"),
    ("intact", lambda s: None, "resuming"),
]


@pytest.mark.parametrize("case", PRUNE_STATE_CASES, ids=lambda c: c[0])
def test_damaged_prune_checkpoint_is_discarded_and_the_run_ends_equal(good, tmp_path, uninterrupted_prune, case):
    _, damage, said = case
    out = tmp_path / "pruned"

    def crash(visited):
        if visited >= 1000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune_datastore(good.store, str(out), index=good.flat, k=3, batch_size=250, progress=False, log=quiet,
                        on_batch=crash)
    damage(tmp_path / ("pruned" + STATE_SUFFIX))
    log = []
    prune_datastore(good.store, str(out), index=good.flat, k=3, batch_size=250, progress=False, log=log.append)
    assert any(line.startswith(said) for line in log), log
    for name, content in uninterrupted_prune.items():
        assert (out / name).read_bytes() == content, name
    assert not (tmp_path / ("pruned" + STATE_SUFFIX)).exists()


# ------------------------------------------------------------------ the import's inputs
def test_damaged_import_inputs_are_refused(good, tmp_path, data_bin, tiny_lm):
    from fairseq_knnlm.tools.importer import OriginalImportError

    def importing(orig, data=data_bin, index=None):
        return lambda: import_original(str(orig / "dstore"), N, good.dim, False, str(tiny_lm), str(data),
                                       str(tmp_path / "out"), first_token=0, index_file=index, progress=False,
                                       log=quiet)

    data = copy(data_bin, tmp_path, "data")
    (data / "dict.txt").write_text("the 5\nof\n")
    refused(importing(good.orig, data), "dict.txt is not a fairseq dictionary", error=OriginalImportError)
    index = copy(good.flat, tmp_path, "orig.index")
    truncate(index, os.path.getsize(index) // 3)
    refused(importing(good.orig, index=index), "FAISS cannot read", error=IndexBuildError)
    orig = copy(good.orig, tmp_path, "orig")
    keys = np.memmap(orig / "dstore_keys.npy", dtype=np.float32, mode="r+", shape=(N, good.dim))
    keys[:] = np.nan  # every sampled key is NaN
    keys.flush()
    del keys
    refused(importing(orig, index=good.flat), "dstore_keys.npy: the keys of entries", "not finite",
            error=IndexBuildError)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ------------------------------------------------------------------ the command-line tools
def assert_one_line_exit_2(proc, *fragments, prog="fairseq-knnlm"):
    out = proc.stdout
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), out[-3000:]
    for fragment in fragments:
        assert fragment in last, last


def test_command_line_tools_print_one_line_and_exit_2(good, tmp_path, capsys, data_bin, tiny_lm):
    """Real processes of fairseq-eval-lm and fairseq-generate with our task (their one-line
    errors come from the excepthook the task installs), run side by side: each spends
    seconds importing fairseq.  Our own tools print their errors themselves: in process."""
    from fairseq_knnlm.cli.build_index import main as build_index_main

    knnlm = ["--knnlm", "--k", K, "--lmbda", 0.25]
    before = eval_lm_in_process(data_bin, tiny_lm, *knnlm, "--dstore", good.store)
    bad_meta = copy(good.store, tmp_path, "bad-meta")
    truncate(bad_meta / "meta.json", 100)
    cut_index = copy(good.store, tmp_path, "cut-index")
    truncate(cut_index / "knn.index", os.path.getsize(cut_index / "knn.index") // 2)
    jobs = {
        "eval-lm": lambda: eval_lm(data_bin, tiny_lm, *knnlm, "--dstore", bad_meta, check=False),
        "generate": lambda: run([
            "fairseq-generate", data_bin, "--path", tiny_lm, "--user-dir", USER_DIR,
            "--task", "knnlm_language_modeling", "--gen-subset", "valid", "--cpu", "--max-tokens", 512,
            "--tokens-per-sample", TOKENS_PER_SAMPLE, "--num-workers", 0, *knnlm, "--dstore", cut_index,
        ], check=False),
    }
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        done = {name: pool.submit(job) for name, job in jobs.items()}
        procs = {name: future.result() for name, future in done.items()}
    assert_one_line_exit_2(procs["eval-lm"], "meta.json is not valid JSON")
    assert_one_line_exit_2(procs["generate"], "FAISS cannot read index", "--overwrite")

    nan_keys = copy(good.store, tmp_path, "nan-keys")
    set_rows(nan_keys / "keys.npy", [8], np.nan)
    with pytest.raises(SystemExit) as exited:
        build_index_main(["--dstore", str(nan_keys), "--index-factory", "Flat", "--overwrite", "--quiet"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the build's own progress lines
    assert exited.value.code == 2 and "Traceback" not in err, err
    assert last.startswith("fairseq-knnlm-build-index: error: ") and "keys.npy: the keys of entry 8" in last
    load(nan_keys / "knn.index", nan_keys)  # the refused rebuild left the previous index in place

    # The good store next to the damaged copies still evaluates, to the same digits as before them.
    assert eval_lm_in_process(data_bin, tiny_lm, *knnlm, "--dstore", good.store) == before


def _raise_in_worker(rank):
    raise DatastoreError(f"worker {rank}: datastore /x is damaged; rebuild it")


def test_user_errors_of_spawned_workers_print_one_line(capfd, monkeypatch):
    """fairseq's multi-GPU runs (torch.multiprocessing) hand a worker's exception to the parent as
    text; the excepthook still prints a worker's UserError as one line with exit code 2."""
    from torch.multiprocessing import start_processes

    with pytest.raises(Exception) as raised:
        start_processes(_raise_in_worker, nprocs=1, start_method="fork")
    assert "Traceback" in str(raised.value)  # what the parent gets: the worker's traceback as text
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    install_excepthook("fairseq-eval-lm")
    with pytest.raises(SystemExit) as exited:
        sys.excepthook(type(raised.value), raised.value, None)
    assert exited.value.code == 2
    assert capfd.readouterr().err.endswith("fairseq-eval-lm: error: worker 0: datastore /x is damaged; rebuild it\n")
