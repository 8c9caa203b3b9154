"""Datastore pruning (fairseq-knnlm-prune) and count-weighted kNN-LM over pruned stores."""

import json
import sys

import numpy as np
import pytest
import torch

from conftest import eval_lm_in_process, run
from fairseq_knnlm.scoring import knn_math
from fairseq_knnlm.storage.datastore import Datastore, DatastoreWriter
from fairseq_knnlm.integration.generation import knnlm_log_probs
from fairseq_knnlm.index import build_index
from fairseq_knnlm.storage.neighbors import read_neighbors
from fairseq_knnlm.tools.prune import greedy_merge, merge_candidates, prune_datastore

PRUNE = [sys.executable, "-m", "fairseq_knnlm.cli.prune"]
UNIQUE_ENTRIES = 200  # small enough to search every entry (k = the whole store)
TEMP, LMBDA = 5.0, 0.5


def quiet(msg):
    pass


# ------------------------------------------------------------ the arithmetic
def test_counts_of_one_change_no_bit_and_counts_weigh_like_copies():
    g = torch.Generator().manual_seed(0)
    n, k, vocab = 64, 12, 30
    dists = torch.rand(n, k, generator=g) * 50
    dists[3, 5:] = float("inf")  # unfilled slots
    vals = torch.randint(0, vocab, (n, k), generator=g)
    vals[3, 5:] = -1
    targets = torch.randint(0, vocab, (n,), generator=g)
    ones = torch.ones(n, k, dtype=torch.int32)
    lm = torch.log_softmax(torch.randn(n, vocab, generator=g), dim=-1)
    for T in (1.0, 7.0):
        assert torch.equal(knn_math.knn_target_log_probs(dists, vals, targets, T, ones),
                           knn_math.knn_target_log_probs(dists, vals, targets, T))
        assert torch.equal(knn_math.knn_vocab_log_probs(dists, vals, vocab, T, ones),
                           knn_math.knn_vocab_log_probs(dists, vals, vocab, T))
        assert torch.equal(knnlm_log_probs(lm, dists, vals, 0.3, T, ones), knnlm_log_probs(lm, dists, vals, 0.3, T))

    # An entry with count c weighs what c copies of it weigh.
    counts = torch.randint(1, 4, (n, k), generator=g, dtype=torch.int32)
    row_d = [torch.repeat_interleave(dists[i], counts[i].long()) for i in range(n)]
    row_v = [torch.repeat_interleave(vals[i], counts[i].long()) for i in range(n)]
    width = max(len(r) for r in row_d)
    copies_d = torch.stack([torch.cat([r, r.new_full((width - len(r),), float("inf"))]) for r in row_d])
    copies_v = torch.stack([torch.cat([r, r.new_full((width - len(r),), -1)]) for r in row_v])
    torch.testing.assert_close(knn_math.knn_target_log_probs(dists, vals, targets, TEMP, counts),
                               knn_math.knn_target_log_probs(copies_d, copies_v, targets, TEMP))
    torch.testing.assert_close(knnlm_log_probs(lm, dists, vals, 0.3, TEMP, counts),
                               knnlm_log_probs(lm, copies_d, copies_v, 0.3, TEMP))


def test_greedy_rule_on_a_hand_made_example():
    # values:          0  1  2  3  4  5
    vals = np.array([7, 7, 7, 9, 7, 9])
    ids = np.arange(6)
    # each entry's search results (itself first, as FAISS usually returns it)
    neighbors = np.array([[0, 1, 2], [1, 0, 4], [2, 3, 1], [3, 5, 0], [4, 1, 0], [5, 3, -1]])
    counts, alive, absorbed = np.ones(6, np.int64), np.ones(6, bool), np.zeros(6, bool)
    candidates = merge_candidates(ids, neighbors, vals, k=2)
    merged = greedy_merge(ids, neighbors, candidates, counts, alive, absorbed)
    # 0 absorbs 1 and 2; 1 and 2 are gone; 3 absorbs 5; 4's candidates (1 merged, 0 absorbed) stay
    assert merged == 3
    assert alive.tolist() == [True, False, False, True, True, False]
    assert counts[alive].tolist() == [3, 2, 1] and counts[alive].sum() == 6
    # k limits the candidates to the k nearest other entries
    assert not merge_candidates(ids, neighbors, vals, k=1)[0, 2]


# ------------------------------------------------------------ real stores
def _copy_meta(ds):
    return {k: v for k, v in ds.meta.items() if k not in ("id", "size", "created", "counts_dtype", "pruned")}


def _write_store(path, source, ids):
    writer = DatastoreWriter(path, source.dim, source.keys.dtype)
    writer.append(np.asarray(source.keys[ids]), np.asarray(source.vals[ids]))
    writer.commit(_copy_meta(source))
    return Datastore(path)


def _flat_index(dstore):
    path = str(dstore) + "/knn.index"
    build_index(str(dstore), output=path, factory="Flat", progress=False, log=quiet)
    return path


@pytest.fixture(scope="module")
def unique_store(artefacts, tiny_datastore):
    """Real keys of the tiny LM, one entry per value: greedy merging can merge nothing."""
    source = Datastore(tiny_datastore)
    _, first = np.unique(np.asarray(source.vals), return_index=True)
    ids = np.sort(first)[:UNIQUE_ENTRIES]
    path = artefacts / "prune-unique"
    store = _write_store(path, source, ids)
    _flat_index(path)
    return store


@pytest.fixture(scope="module")
def duplicated_store(artefacts, unique_store):
    """unique_store with entry i repeated 1 + i % 3 times in a row (exact duplicates)."""
    reps = 1 + np.arange(unique_store.size) % 3
    path = artefacts / "prune-duplicated"
    store = _write_store(path, unique_store, np.repeat(np.arange(unique_store.size), reps))
    _flat_index(path)
    return store



def knnlm_ppl(data_bin, tiny_lm, dstore, k, *extra):
    return eval_lm_in_process(data_bin, tiny_lm, "--knnlm", "--dstore", dstore, "--k", k,
                              "--knn-temp", TEMP, "--lmbda", LMBDA, *extra)


@pytest.fixture(scope="module")
def unique_ppl(data_bin, tiny_lm, unique_store):
    """The plain kNN-LM (no counts) of unique_store, every entry a neighbour."""
    return knnlm_ppl(data_bin, tiny_lm, unique_store.path, unique_store.size)


def printed(loss_ppl):
    """As fairseq-eval-lm prints them."""
    loss, ppl = loss_ppl
    return f"{loss:.4f}", f"{ppl:.2f}"


def test_store_with_counts_of_one_gives_exactly_the_plain_kNN_LM(tmp_path, data_bin, tiny_lm, unique_store,
                                                                 unique_ppl):
    pruned = tmp_path / "pruned"
    summary = prune_datastore(unique_store.path, pruned, k=8, progress=False, log=quiet)
    store = Datastore(pruned)
    assert summary["size_after"] == store.size == unique_store.size  # nothing shares a value
    assert store.counts.tolist() == [1] * store.size
    assert np.array_equal(np.asarray(store.keys), np.asarray(unique_store.keys))
    _flat_index(pruned)
    assert knnlm_ppl(data_bin, tiny_lm, pruned, unique_store.size) == unique_ppl  # every float bit


def test_pruning_exact_duplicates_keeps_the_kNN_LM_and_the_sweep_reproduces_it(
        tmp_path, data_bin, tiny_lm, unique_store, duplicated_store, unique_ppl):
    pruned = tmp_path / "pruned"
    # Each entry's 2 nearest others cover its copies; other entries never share its value.
    proc = run([*PRUNE, "--dstore", duplicated_store.path, "--output", pruned, "--k", 2,
                "--batch-size", 97, "--quiet"])
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["size_before"] == duplicated_store.size and summary["size_after"] == unique_store.size
    assert summary["fraction_kept"] == pytest.approx(unique_store.size / duplicated_store.size, abs=1e-6)
    assert "entries (" in proc.stdout and "kept) in" in proc.stdout
    store = Datastore(pruned)
    assert store.counts.tolist() == (1 + np.arange(unique_store.size) % 3).tolist()
    assert np.array_equal(np.asarray(store.keys), np.asarray(unique_store.keys))
    assert np.array_equal(np.asarray(store.vals), np.asarray(unique_store.vals))
    info = store.meta["pruned"]
    assert info["source_fingerprint"] == duplicated_store.fingerprint
    assert (info["size_before"], info["size_after"], info["k"]) == (duplicated_store.size, store.size, 2)
    assert info["entries_represented"] == duplicated_store.size
    _flat_index(pruned)

    # With k covering every entry, the duplicated store and its pruned version are the
    # same kNN-LM: equal to the last digit fairseq-eval-lm prints (float rounding aside).
    nbdir = tmp_path / "valid.nbrs"
    with_counts = knnlm_ppl(data_bin, tiny_lm, pruned, store.size, "--knn-save-neighbors", nbdir)
    copies = knnlm_ppl(data_bin, tiny_lm, duplicated_store.path, duplicated_store.size)
    assert printed(with_counts) == printed(copies)
    assert with_counts[1] == pytest.approx(copies[1], rel=1e-5)
    # ...and the counts matter: the same entries counted once are another kNN-LM.
    assert printed(unique_ppl) != printed(copies)

    # The saved neighbours carry the counts; the offline sweep reproduces the run.
    from fairseq_knnlm import sweep as sw

    nb = read_neighbors(nbdir)
    assert nb.counts is not None and nb.counts.shape == (nb.n, store.size)
    table = sw.knn_table(nb, [store.size], [TEMP], exact=True)
    result = sw.sweep(nb.lm_log_probs, table, [LMBDA], nb.segments)
    assert result.ppl[0, 0, 0] == pytest.approx(with_counts[1], rel=1e-6)
    fast = sw.knn_table(nb, [store.size], [TEMP], exact=False)
    np.testing.assert_allclose(fast.knn_log_probs, table.knn_log_probs, rtol=1e-5, atol=1e-5)


def test_interrupted_pruning_resumes_to_the_same_store(tmp_path, duplicated_store):
    def crash(visited):
        if visited >= 300:
            raise RuntimeError("simulated crash")

    out = tmp_path / "pruned"
    with pytest.raises(RuntimeError):
        prune_datastore(duplicated_store.path, out, k=4, batch_size=100, progress=False, log=quiet,
                        on_batch=crash)
    assert not out.exists()  # nothing accepted
    messages = []
    prune_datastore(duplicated_store.path, out, k=4, batch_size=100, progress=False, log=messages.append)
    assert any("resuming" in m and "300" in m for m in messages)
    straight = tmp_path / "straight"
    prune_datastore(duplicated_store.path, straight, k=4, batch_size=100, progress=False, log=quiet)
    a, b = Datastore(out), Datastore(straight)
    assert a.counts.sum() == duplicated_store.size
    assert np.array_equal(a.counts, b.counts) and np.array_equal(np.asarray(a.vals), np.asarray(b.vals))
    assert not (tmp_path / "pruned.prune-state").exists()


def test_bad_inputs_are_one_line_errors(tmp_path, capsys, unique_store, duplicated_store):
    from fairseq_knnlm.cli.prune import main

    def fails(*args):
        with pytest.raises(SystemExit) as exit:
            main([str(a) for a in args])
        err = capsys.readouterr().err
        assert exit.value.code == 2, err
        lines = [line for line in err.strip().splitlines() if not line.startswith(("usage:", " "))]
        assert len(lines) == 1 and lines[0].startswith("fairseq-knnlm-prune: error: "), err
        return lines[0]

    src = ["--dstore", unique_store.path]
    out = ["--output", tmp_path / "o"]
    assert "no datastore" in fails("--dstore", tmp_path / "nowhere", *out)
    assert "overlaps" in fails(*src, "--output", unique_store.path + "/sub")
    assert "lower --merge-k" in fails(*src, *out, "--merge-k", unique_store.size)
    assert "must be at least 1" in fails(*src, *out, "--k", 0)
    assert "another datastore" in fails(*src, *out, "--index", duplicated_store.path + "/knn.index")
    assert "no index" in fails(*src, *out, "--index", tmp_path / "none.index")
    done = tmp_path / "done"
    done.mkdir()
    (done / "meta.json").write_text("{}")
    assert "--overwrite" in fails(*src, "--output", done)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.prune-state").exists()
