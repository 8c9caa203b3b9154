"""fairseq-knnlm-import: artefacts in the original kNN-LM code's formats (urvashik/knnlm),
written here the way that code writes them, become a datastore and index of ours."""

import json
import logging
import os
import re

import faiss
import numpy as np
import pytest

from conftest import TINY_TRANSFORMER, TOKENS_PER_SAMPLE, eval_lm, eval_lm_in_process, run, train_tiny_lm
from fairseq_knnlm.cli.import_original import main as import_main
from fairseq_knnlm.storage.datastore import Datastore, DatastoreError, DatastoreWriter
from fairseq_knnlm.integration.artefacts import split_tokens
from fairseq_knnlm.tools.importer import import_original
from fairseq_knnlm.index import IndexMismatchError, build_index, default_index_path, load_index

# The original's datastore pass skips the split's first block (its size is the
# split's token count minus one --tokens-per-sample block).
FIRST_BLOCK = TOKENS_PER_SAMPLE
IVFPQ = "IVF16,PQ8"


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


# ------------------------------------------------------------ the original's writers


def write_original_store(prefix, keys, vals, fp16):
    """PREFIX_keys.npy / PREFIX_vals.npy as the original's eval_lm.py writes them:
    headerless np.memmap files, (N, dim) float16/float32 and (N, 1) int16/int64
    (int16 wraps around above 32,767, as numpy's astype does)."""
    n, dim = keys.shape
    k = np.memmap(f"{prefix}_keys.npy", dtype=np.float16 if fp16 else np.float32, mode="w+", shape=(n, dim))
    v = np.memmap(f"{prefix}_vals.npy", dtype=np.int16 if fp16 else np.int64, mode="w+", shape=(n, 1))
    k[:] = keys
    v[:] = np.asarray(vals).reshape(-1, 1).astype(v.dtype)
    k.flush(), v.flush()
    del k, v
    return str(prefix)


def add_with_ids_like_the_original(trained_index, keys, path, chunk=20_000):
    """The original's build_dstore.py adding loop: an IndexIVFPQ over an IndexFlatL2
    quantizer, keys added with add_with_ids (ids = positions), faiss.write_index.

    The trained state (centroids, PQ codebooks) is taken from ``trained_index`` so
    that the codes are those of our own build: the comparison is then about the
    import, not about two k-means runs."""
    index = faiss.clone_index(trained_index)
    index.reset()
    assert isinstance(index, faiss.IndexIVFPQ) and isinstance(faiss.downcast_index(index.quantizer), faiss.IndexFlatL2)
    for start in range(0, len(keys), chunk):
        end = min(start + chunk, len(keys))
        index.add_with_ids(np.asarray(keys[start:end], dtype=np.float32), np.arange(start, end))
    faiss.write_index(index, str(path))
    return str(path)


def padded_dictionary(real_dict, path):
    """A fake large vocabulary: the real words at ids below 32,768, between 40,000
    and 42,000 (negative as int16) and from 70,000 (wrapping to plausible small ids)."""
    words = [line for line in real_dict.read_text().splitlines() if line.strip()]
    lines, next_id, fake = [], 4, 0  # fairseq's 4 special symbols come first

    def pad_to(target):
        nonlocal next_id, fake
        while next_id < target:
            lines.append(f"<padding-{fake:05d}> 0")
            fake, next_id = fake + 1, next_id + 1

    for block, start_id in ((words[:1000], None), (words[1000:3000], 40_000), (words[3000:], 70_000)):
        if start_id:
            pad_to(start_id)
        lines += block
        next_id += len(block)
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def large_vocab(artefacts, data_bin):
    """(data-bin, checkpoint) of a tiny LM with a 70,000+ type vocabulary.

    Its splits are small (train: the valid slice, valid: the test slice): every
    scored token costs a softmax over the whole vocabulary."""
    root = artefacts / "large-vocab"
    root.mkdir()
    srcdict = padded_dictionary(data_bin / "dict.txt", root / "dict.txt")
    raw = artefacts / "raw"
    out = root / "data-bin"
    run(["fairseq-preprocess", "--only-source", "--srcdict", srcdict, "--trainpref", raw / "valid.txt",
         "--validpref", raw / "test.txt", "--destdir", out, "--workers", 1])
    return out, train_tiny_lm(out, root / "ckpt", TINY_TRANSFORMER, max_epoch=1)


def import_argv(data, ckpt, prefix, size, dim, out, *extra):
    return [str(data), "--path", str(ckpt), "--dstore-filename", str(prefix), "--dstore-size", str(size),
            "--dim", str(dim), "--dstore", str(out), "--quiet", *map(str, extra)]


# ------------------------------------------------------------ float32 keys, int64 values


@pytest.fixture(scope="module")
def original_fp32(tmp_path_factory, tiny_datastore):
    """The tiny store's entries after the first block, as the original writes them without --dstore-fp16."""
    ds = Datastore(tiny_datastore)
    keys, vals = np.asarray(ds.keys[FIRST_BLOCK:]), np.asarray(ds.vals[FIRST_BLOCK:])
    prefix = write_original_store(tmp_path_factory.mktemp("orig-fp32") / "dstore", keys, vals, fp16=False)
    return prefix, keys, vals


def test_fp32_store_is_referenced_not_copied(tmp_path, data_bin, tiny_lm, original_fp32):
    prefix, keys, vals = original_fp32
    out = tmp_path / "imported"
    log = []
    meta = import_original(prefix, len(keys), keys.shape[1], False, str(tiny_lm), str(data_bin), str(out),
                           progress=False, log=log.append)
    assert f"values: all {len(vals):,} match" in "\n".join(log)
    store = Datastore(out)
    assert sorted(os.listdir(out)) == ["meta.json", "vals.npy"]  # no keys.npy
    assert store.keys.filename == os.path.abspath(f"{prefix}_keys.npy") and store.keys.dtype == np.float32
    np.testing.assert_array_equal(store.keys, keys)
    np.testing.assert_array_equal(store.vals, vals)
    assert meta["first_token"] == store.meta["first_token"] == FIRST_BLOCK
    assert meta["imported_from"]["vals_wrong"] == 0 and not meta["imported_from"]["vals_rebuilt"]

    # Our builder works on it, and its ids index the original's positions.
    index_path = tmp_path / "flat.index"
    build_index(str(out), output=str(index_path), factory="Flat", progress=False, log=lambda m: None)
    index, _ = load_index(str(index_path), store)
    _, ids = index.search(keys[::997], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(0, len(keys), 997))

    # A later change to the referenced keys is caught when the store is opened.
    with open(f"{prefix}_keys.npy", "r+b") as f:
        row0 = f.read(4 * keys.shape[1])
        f.seek(0)
        f.write(bytes(len(row0)))
    try:
        with pytest.raises(DatastoreError, match="changed since the import"):
            Datastore(out)
    finally:
        with open(f"{prefix}_keys.npy", "r+b") as f:
            f.write(row0)
    Datastore(out)


# ------------------------------------------------------------ refusals


def refused(capsys, argv, out, match):
    with pytest.raises(SystemExit) as exit_info:
        import_main(argv)
    printed = capsys.readouterr().err.strip()
    err = printed.splitlines()[-1]  # after the progress lines, if any
    assert exit_info.value.code == 2, printed
    assert err.startswith("fairseq-knnlm-import: error: ") and "Traceback" not in printed, printed
    assert printed.count("error:") == 1 and match in err, printed
    # Nothing a later stage could take for a datastore.
    assert not os.path.exists(out) and not os.path.exists(f"{out}.partial")
    with pytest.raises(DatastoreError):
        Datastore(out)
    return err


def test_bad_inputs_get_one_line_errors_and_leave_nothing(tmp_path, capsys, data_bin, tiny_lm, original_fp32):
    prefix, keys, vals = original_fp32
    n, dim = keys.shape
    out = tmp_path / "never"

    def argv(size=n, d=dim, prefix=prefix, *extra):
        return import_argv(data_bin, tiny_lm, prefix, size, d, out, *extra)

    refused(capsys, argv(n + 1), out, f"holds {n:,} {dim}-dim float32 keys, not --dstore-size {n + 1:,}")
    odd_dim = next(d for d in range(dim - 1, 1, -1) if (n * dim) % d)
    refused(capsys, argv(n, odd_dim), out, f"is not a whole number of {odd_dim}-dim float32 keys")
    refused(capsys, argv(n, dim, prefix, "--dstore-fp16"), out, "float32 keys: drop --dstore-fp16")
    refused(capsys, argv(n, dim, prefix, "--first-token", FIRST_BLOCK - 1), out, "disagrees with the split")

    beyond = tmp_path / "beyond"
    bad_vals = vals.copy()
    bad_vals[n // 2] = 1_000_000
    write_original_store(beyond, keys, bad_vals, fp16=False)
    refused(capsys, argv(n, dim, beyond), out, f"entry {n // 2:,} holds 1000000, outside the dictionary")

    # An index of another store: of fewer keys, or of these keys under other ids.
    fewer = faiss.IndexFlatL2(dim)
    fewer.add(keys[:1000])
    faiss.write_index(fewer, str(tmp_path / "fewer.index"))
    refused(capsys, argv(n, dim, prefix, "--indexfile", tmp_path / "fewer.index"), out,
            "is an index of another store")
    shuffled = faiss.IndexIDMap(faiss.IndexFlatL2(dim))
    shuffled.add_with_ids(keys, np.random.default_rng(0).permutation(n))
    faiss.write_index(shuffled, str(tmp_path / "shuffled.index"))
    err = refused(capsys, argv(n, dim, prefix, "--indexfile", tmp_path / "shuffled.index",
                               "--self-recall-queries", 100, "--self-recall-k", 8), out, "does not find this store's keys")
    assert "self-recall 0.0" in err

    # A complete store is never replaced without --dstore-overwrite; an adopted index
    # that changes afterwards is refused.
    own = faiss.IndexIDMap(faiss.IndexFlatL2(dim))
    own.add_with_ids(keys, np.arange(n))
    faiss.write_index(own, str(tmp_path / "own.index"))
    assert import_main(argv(n, dim, prefix, "--indexfile", tmp_path / "own.index",
                            "--self-recall-queries", 100, "--self-recall-k", 8)) == 0
    capsys.readouterr()
    first_id = Datastore(out).meta["id"]
    with pytest.raises(SystemExit) as exit_info:
        import_main(argv())
    assert exit_info.value.code == 2 and "--dstore-overwrite" in capsys.readouterr().err
    assert Datastore(out).meta["id"] == first_id
    load_index(default_index_path(out), Datastore(out))
    with open(tmp_path / "own.index", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IndexMismatchError, match="changed since it was adopted"):
        load_index(default_index_path(out), Datastore(out))


# ------------------------------------------------------------ the whole way


def test_fp16_store_with_overflowed_values_and_ivfpq_index_equals_our_pipeline(tmp_path, capsys, caplog, data_bin,
                                                                              large_vocab):
    data, ckpt = large_vocab
    ours = tmp_path / "ours-whole-split"
    eval_lm(data, ckpt, "--save-knnlm-dstore", "--dstore-fp16", "--dstore", ours, split="train")
    whole = Datastore(ours)
    keys, vals = np.asarray(whole.keys[FIRST_BLOCK:]), np.asarray(whole.vals[FIRST_BLOCK:])
    n, dim = keys.shape
    overflowing = int((vals > 32_767).sum())
    assert 0 < overflowing < n and (vals >= 70_000).any()  # negative and wrapped-positive int16 alike

    # Our own pipeline on the same entries: our writer, our index builder.
    reference = tmp_path / "reference"
    writer = DatastoreWriter(str(reference), dim, np.float16)
    writer.append(keys, vals)
    writer.commit({k: whole.meta[k] for k in ("keytype", "dictionary_size", "dictionary_md5", "checkpoint_sha256")})
    build_index(str(reference), factory=IVFPQ, progress=False, log=lambda m: None)

    # The original's artefacts of the same entries.
    (tmp_path / "orig").mkdir()
    prefix = write_original_store(tmp_path / "orig" / "dstore", keys, vals, fp16=True)
    stored = np.fromfile(f"{prefix}_vals.npy", dtype=np.int16)
    assert (stored < 0).any() and int((stored != vals).sum()) == overflowing
    original_index = add_with_ids_like_the_original(
        faiss.read_index(default_index_path(reference)), keys, tmp_path / "orig" / "knn.index")

    imported = tmp_path / "imported"
    assert import_main(import_argv(data, ckpt, prefix, n, dim, imported, "--dstore-fp16",
                                   "--indexfile", original_index, "--probe", 8)) == 0
    printed = capsys.readouterr()
    assert f"values: {overflowing:,} of {n:,} int16 values were wrong" in printed.err
    assert "self-recall 1.0000" in printed.err
    summary = json.loads(printed.out.strip().splitlines()[-1])
    assert summary["first_token"] == FIRST_BLOCK and summary["vals_wrong"] == overflowing

    # No key was copied: the store reads the original's file in place.
    store = Datastore(imported)
    assert sorted(os.listdir(imported)) == ["knn.index", "knn.index.meta.json", "meta.json", "vals.npy"]
    assert os.path.realpath(store.keys.filename) == os.path.realpath(f"{prefix}_keys.npy")
    assert os.readlink(imported / "knn.index") == original_index
    np.testing.assert_array_equal(store.vals, vals)
    np.testing.assert_array_equal(store.vals, split_tokens(str(data), "train")[FIRST_BLOCK:])
    assert store.meta["first_token"] == FIRST_BLOCK

    # The original's files are only read.
    np.testing.assert_array_equal(np.fromfile(f"{prefix}_vals.npy", dtype=np.int16), stored)

    # Values that do not match the split even modulo 2^16, and a model of another dictionary.
    other = tmp_path / "never"
    refused(capsys, import_argv(data, ckpt, prefix, n, dim, other, "--dstore-fp16", "--first-token", FIRST_BLOCK - 1),
            other, "disagrees even modulo 2^16 with the split")
    refused(capsys, import_argv(data_bin, ckpt, prefix, n, dim, other, "--dstore-fp16"), other,
            f"cannot load {ckpt} with the dictionary of {data_bin}")

    # --knnlm with no --knn-index: the adopted index serves as if our builder had made it.
    flags = ["--knnlm", "--k", 16, "--lmbda", 0.25, "--probe", 8, "--knn-sim-func", "l2"]
    want = eval_lm_in_process(data, ckpt, *flags, "--dstore", reference)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        got = eval_lm_in_process(data, ckpt, *flags, "--dstore", imported)
    assert got == want  # to the last float digit
    searched, scored = re.search(r"kNN searches: ([\d,]+) for ([\d,]+) scored tokens", caplog.text).groups()
    assert searched == scored != "0"  # the kNN part ran, for every token
