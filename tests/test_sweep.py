"""Saved neighbours and fairseq-knnlm-sweep: file format, exactness, analyses, errors."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch

from conftest import eval_lm_in_process

from fairseq_knnlm.scoring import knn_math
from fairseq_knnlm import sweep as sw
from fairseq_knnlm.cli import sweep as cli
from fairseq_knnlm.storage.datastore import DatastoreWriter, shard_dirname
from fairseq_knnlm.storage.neighbors import (
    DISTS_FILE,
    META_FILE,
    NeighborsError,
    NeighborsWriter,
    read_neighbors,
)

VOCAB = 500


def synthetic(n, k, seed=0, reliable_near=False):
    """Arrays shaped like a kNN-LM run: sorted distances, Zipfian values, some hits.

    With ``reliable_near`` the neighbours are right when the nearest one is close
    and random when it is far, so a λ that depends on the distance should win.
    """
    rng = np.random.default_rng(seed)
    targets = (np.minimum(rng.zipf(1.4, n), VOCAB) - 1).astype(np.int64)
    lm = (-rng.gamma(1.5, 2.0, n)).astype(np.float32)
    near = rng.uniform(20, 400, (n, 1))
    dists = (near + np.cumsum(rng.exponential(1.0, (n, k)), axis=1)).astype(np.float32)
    vals = (np.minimum(rng.zipf(1.4, (n, k)), VOCAB) - 1).astype(np.int32)
    if reliable_near:
        p_hit = np.where(near < 120, 0.9, 0.02)
    else:
        p_hit = rng.beta(0.6, 1.5, (n, 1))
    hit = rng.random((n, k)) < p_hit
    vals[hit] = np.broadcast_to(targets[:, None], (n, k))[hit]
    return targets, lm, dists, vals


def write(path, arrays, k=None, meta=None, batch=97, fp16=False, split="test"):
    targets, lm, dists, vals = arrays
    k = k or dists.shape[1]
    info = dict(sim_func="faiss", split=split, data="/data-bin", knn_temp=1.0, lmbda=0.25,
                dstore_fingerprint="f00d", dictionary_md5=None)
    info.update(meta or {})
    w = NeighborsWriter(str(path), k, info, fp16_dists=fp16)
    for s in range(0, len(targets), batch):
        e = min(s + batch, len(targets))
        cut = (s + e) // 2
        w.append(targets[s:e], lm[s:e], dists[s:e, :k], vals[s:e, :k], lengths=[cut - s, e - cut])
    return w.commit()


def reference_eval_lm(arrays, k, temp, lmbda, segments, _cache={}):
    """What fairseq-eval-lm computes: the scorer's knn_math on whole arrays, then its
    loop over sequences (drop ±inf, float32 sums into a running total)."""
    targets, lm, dists, vals = (torch.from_numpy(np.asarray(a)) for a in arrays)
    key = (id(arrays), k, temp)
    if key not in _cache:
        _cache[key] = knn_math.knn_target_log_probs(dists[:, :k], vals[:, :k], targets, temp)
    final = knn_math.interpolate(lm, _cache[key], lmbda)
    score_sum, count, offset = 0.0, 0, 0
    for length in segments:
        pos_scores = final[offset : offset + length].float()
        offset += length
        inf_scores = pos_scores.eq(float("inf")) | pos_scores.eq(float("-inf"))
        if inf_scores.any():
            pos_scores = pos_scores[(~inf_scores).nonzero()]
        score_sum += pos_scores.sum().cpu()
        count += pos_scores.numel()
    loss = -score_sum / count / math.log(2)
    return float(2**loss), float(loss)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small tensors: OpenMP threads only add waiting on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def arrays():
    return synthetic(3000, 64, seed=1)


@pytest.fixture(scope="module")
def nbfile(tmp_path_factory, arrays):
    return write(tmp_path_factory.mktemp("nb") / "test.nbrs", arrays)


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of fairseq-knnlm-sweep run in-process."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fairseq-knnlm-sweep: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------- file format
def test_round_trip_keeps_every_array_and_the_metadata(tmp_path, arrays):
    targets, lm, dists, vals = arrays
    path = write(tmp_path / "nb", arrays, meta={"checkpoint_sha256": "abc", "split": "valid"})
    nb = read_neighbors(path)
    assert (nb.n, nb.k) == (len(targets), 64)
    np.testing.assert_array_equal(nb.targets, targets)
    np.testing.assert_array_equal(nb.lm_log_probs, lm)
    np.testing.assert_array_equal(nb.dists, dists)
    np.testing.assert_array_equal(nb.vals, vals)
    assert nb.segments.sum() == len(targets) and (nb.segments > 0).all()
    assert isinstance(nb.dists, np.memmap)
    meta = json.load(open(os.path.join(path, META_FILE)))
    assert meta["format_version"] == 1 and meta["kind"] == "knnlm-neighbors"
    assert meta["checkpoint_sha256"] == "abc" and meta["split"] == "valid"
    assert (meta["dists_dtype"], meta["vals_dtype"], meta["targets_dtype"]) == ("float32", "int32", "int32")
    for name in ("targets.npy", "lm_log_probs.npy", "dists.npy", "vals.npy", "segments.npy"):
        assert np.load(os.path.join(path, name)).shape[0] >= 1  # plain .npy files


def test_writer_takes_torch_tensors_and_fp16_distances(tmp_path, arrays):
    targets, lm, dists, vals = arrays
    w = NeighborsWriter(str(tmp_path / "nb"), 64, {}, fp16_dists=True)
    w.append(torch.from_numpy(targets), torch.from_numpy(lm), torch.from_numpy(dists),
             torch.from_numpy(vals).long())
    nb = read_neighbors(w.commit())
    assert nb.dists.dtype == np.float16 and nb.meta["dists_dtype"] == "float16"
    np.testing.assert_allclose(nb.dists, dists, rtol=1e-3)
    assert len(nb.segments) == 1


def test_fp16_refuses_distances_it_cannot_hold_but_keeps_empty_slots(tmp_path):
    w = NeighborsWriter(str(tmp_path / "nb"), 2, {}, fp16_dists=True)
    w.append([1], np.zeros(1, np.float32), np.array([[3.0, np.inf]]), np.array([[1, -1]]))
    with pytest.raises(NeighborsError, match="without --knn-save-neighbors-fp16"):
        w.append([1], np.zeros(1, np.float32), np.array([[3.0, 1e6]]), np.array([[1, 2]]))
    w.abort()


def test_nothing_is_readable_before_commit_and_abort_cleans_up(tmp_path, arrays):
    path = str(tmp_path / "nb")
    w = NeighborsWriter(path, 64, {})
    w.append(*(a[:10] for a in arrays))
    assert not os.path.exists(path) and os.path.isdir(path + ".partial")
    with pytest.raises(NeighborsError, match="did not finish"):
        read_neighbors(path)
    w.abort()
    assert not os.path.exists(path + ".partial")
    with pytest.raises(RuntimeError):
        with NeighborsWriter(path, 64, {}) as w:
            w.append(*(a[:10] for a in arrays))
            raise RuntimeError("scoring crashed")
    assert not os.path.exists(path) and not os.path.exists(path + ".partial")


def test_writer_refuses_to_clobber_and_checks_shapes(tmp_path, arrays):
    path = write(tmp_path / "nb", arrays)
    with pytest.raises(NeighborsError, match="already holds a complete neighbours file"):
        NeighborsWriter(path, 64, {})
    w = NeighborsWriter(path, 8, {"note": "second"}, overwrite=True)
    with pytest.raises(NeighborsError, match=r"\(n, 8\)"):
        w.append(*arrays)  # 64 columns into k=8
    w.append(arrays[0], arrays[1], arrays[2][:, :8], arrays[3][:, :8])
    assert read_neighbors(w.commit()).meta["note"] == "second"
    with pytest.raises(NeighborsError, match="JSON"):
        NeighborsWriter(str(tmp_path / "other"), 8, {"bad": object()})


def test_shards_are_read_as_one_file_in_order(tmp_path, arrays):
    root = tmp_path / "nb"
    halves = [tuple(a[:1000] for a in arrays), tuple(a[1000:] for a in arrays)]
    for i, part in enumerate(halves):
        write(root / shard_dirname(i, 2), part, meta={"num_shards": 2})
    nb = read_neighbors(root)
    assert nb.n == len(arrays[0])
    np.testing.assert_array_equal(nb.targets, arrays[0])
    np.testing.assert_array_equal(nb.dists[990:1010], arrays[2][990:1010])
    os.rename(root / shard_dirname(1, 2), tmp_path / "elsewhere")
    with pytest.raises(NeighborsError, match="missing shard"):
        read_neighbors(root)


# ---------------------------------------------------------- bad files, CLI
def test_bad_files_give_one_line_errors(tmp_path, arrays, capsys):
    good = write(tmp_path / "good", arrays)

    truncated = write(tmp_path / "truncated", arrays)
    with open(os.path.join(truncated, DISTS_FILE), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(truncated, DISTS_FILE)) - 100)
    code, _, err = run_cli([truncated], capsys)
    assert_one_line_error(code, err, "dists.npy is truncated", "rerun fairseq-eval-lm")

    wrong_version = write(tmp_path / "version", arrays)
    meta_path = os.path.join(wrong_version, META_FILE)
    meta = json.load(open(meta_path))
    meta["format_version"] = 99
    json.dump(meta, open(meta_path, "w"))
    code, _, err = run_cli([wrong_version], capsys)
    assert_one_line_error(code, err, "format 99", "reads 1")

    code, _, err = run_cli([good, "--k", "8,128"], capsys)
    assert_one_line_error(code, err, "--k 128 exceeds the 64 neighbours saved", "lower --k")

    os.remove(os.path.join(str(tmp_path / "version"), META_FILE))
    code, _, err = run_cli([wrong_version], capsys)
    assert_one_line_error(code, err, "no meta.json")

    code, _, err = run_cli([tmp_path / "missing"], capsys)
    assert_one_line_error(code, err, "does not exist")

    store = DatastoreWriter(str(tmp_path / "dstore"), 4, np.float32)
    store.append(np.zeros((3, 4), np.float32), np.array([1, 2, 3]))
    store.commit({})
    code, _, err = run_cli([tmp_path / "dstore"], capsys)
    assert_one_line_error(code, err, "not a saved-neighbours file")

    for argv, fragment in (
        ([good, "--lmbda", "0:1:x"], "cannot parse --lmbda"),
        ([good, "--lmbda", "0,1.5"], "[0, 1]"),
        ([good, "--knn-temp", "0"], "must be positive"),
        ([good, "--k", "2.5"], "integers"),
        ([good, "--adaptive-fit", good, "--no-plots"], "same split"),
    ):
        code, _, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, fragment)


def test_parse_grid_gives_the_floats_eval_lm_flags_parse_to():
    lambdas = sw.parse_grid("0:1:0.05", "--lmbda")
    assert len(lambdas) == 21 and lambdas[3] == float("0.15") and lambdas[-1] == 1.0
    assert sw.parse_grid("1,2, 5,10,2", "--knn-temp") == [1.0, 2.0, 5.0, 10.0]
    assert sw.parse_grid("0,0.1:0.3:0.1", "--lmbda") == [0.0, 0.1, 0.2, 0.3]
    assert sw.parse_grid("8,64,1024", "--k", cast=int) == [8, 64, 1024]


# ---------------------------------------------------------------- exactness
def test_fast_knn_log_probs_equal_knn_math(arrays):
    targets, _, dists, vals = (torch.from_numpy(a) for a in arrays)
    dists, vals = dists.clone(), vals.clone()
    dists[0, 5:] = float("inf")        # unfilled FAISS slots
    vals[0, 5:] = -1
    dists[1] = float("inf")            # no neighbour at all
    vals[1] = -1
    vals[2] = targets[2]
    vals[2, 0] = targets[2] + 1        # the only miss is the nearest ...
    dists[2, 1:] += 5000               # ... and the hits are 5000 further: underflow
    match = (vals == targets.unsqueeze(1)).float()
    for temp in (0.5, 1.0, 10.0):
        ref = knn_math.knn_target_log_probs(dists, vals, targets, temp)
        fast, top_w, nn_d, _ = sw.knn_target_log_probs_fast(dists.clone(), match, temp)
        np.testing.assert_array_equal(torch.isinf(fast).numpy(), torch.isinf(ref).numpy())
        finite = torch.isfinite(ref)
        assert finite[2] and ref[2] < -100
        np.testing.assert_allclose(fast[finite].numpy(), ref[finite].numpy(), rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(nn_d[2:].numpy(), dists[2:].amin(1).numpy(), rtol=1e-6)


@pytest.mark.parametrize("exact", [False, True])
def test_swept_perplexity_equals_eval_lm_arithmetic(nbfile, arrays, exact):
    nb = read_neighbors(nbfile)
    ks, temps, lambdas = [4, 16, 64], [1.0, 3.0, 10.0], sw.parse_grid("0:1:0.25", "--lmbda")
    table = sw.knn_table(nb, ks, temps, exact=exact, chunk_rows=500)
    res = sw.sweep(np.array(nb.lm_log_probs), table, lambdas, nb.segments)
    assert res.skipped[:, :, -1].min() > 0  # λ = 1 skips tokens no neighbour predicts
    for ki, k in enumerate(ks):
        for ti, temp in enumerate(temps):
            for li, lmbda in enumerate(lambdas):
                ppl, loss = reference_eval_lm(arrays, k, temp, lmbda, nb.segments)
                assert res.ppl[ki, ti, li] == pytest.approx(ppl, rel=1e-6), (k, temp, lmbda)
                assert res.loss[ki, ti, li] == pytest.approx(loss, rel=1e-6)
    best = res.setting(res.best())
    assert best["lmbda"] < 1 and best["ppl"] < res.base.ppl


def test_chunking_and_saved_k_do_not_change_results(tmp_path, nbfile, arrays):
    nb = read_neighbors(nbfile)
    whole = sw.knn_table(nb, [8, 64], [2.0], chunk_rows=10_000)
    chunked = sw.knn_table(nb, [8, 64], [2.0], chunk_rows=37, threads=3)
    np.testing.assert_allclose(chunked.knn_log_probs, whole.knn_log_probs, rtol=1e-6)
    # Sweeping k=8 of a k=64 file equals a run that retrieved 8 neighbours.
    small = read_neighbors(write(tmp_path / "k8", arrays, k=8))
    np.testing.assert_array_equal(sw.knn_table(small, [8], [2.0]).knn_log_probs[0], whole.knn_log_probs[0])


# ---------------------------------------------------------------- the tool
def test_cli_prints_table_marks_best_and_writes_plots(tmp_path, nbfile, capsys):
    report_path = tmp_path / "report.json"
    code, out, err = run_cli([nbfile, "--lmbda", "0:1:0.1", "--knn-temp", "1,2,5,10", "--k", "8,64",
                              "--plot-prefix", tmp_path / "plot", "--json", report_path, "--quiet"], capsys)
    assert code == 0, err
    report = json.load(open(report_path))
    best = report["best"]
    assert len(re.findall(r"\d\*", out)) == 1 and f"best: --k {best['k']} --knn-temp {best['knn_temp']:g}" in out
    assert "k = 8:" in out and "k = 64:" in out and "†" in out
    ppl = np.array(report["perplexity"])
    assert ppl.shape == (2, 4, 11) and best["ppl"] == ppl[np.array(report["skipped"]) == 0].min()
    for name in ("plot-lambda-temp.png", "plot-k.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_frequency_buckets_and_biggest_changes(tmp_path, nbfile, arrays, capsys):
    targets = arrays[0]
    store = DatastoreWriter(str(tmp_path / "dstore"), 2, np.float32)
    train = np.concatenate([targets, targets[:500], np.arange(VOCAB)])
    store.append(np.zeros((len(train), 2), np.float32), train)
    store.commit({"dictionary_md5": None})
    words = [f"w{i}" for i in range(4, VOCAB)]
    with open(tmp_path / "dict.txt", "w") as f:
        f.writelines(f"{w} {1000 - i}\n" for i, w in enumerate(words))
    code, out, err = run_cli([nbfile, "--lmbda", "0,0.25", "--freq-from", tmp_path / "dstore", "--top", "3",
                              "--dict", tmp_path / "dict.txt", "--json", tmp_path / "r.json", "--no-plots",
                              "--quiet"], capsys)
    assert code == 0, err
    report = json.load(open(tmp_path / "r.json"))
    buckets = report["frequency_buckets"]
    assert sum(b["tokens"] for b in buckets) == len(targets)
    assert buckets[0]["label"] == "0" and buckets[0]["tokens"] == 0  # every token is in the store
    assert "by target frequency" in out and "tokens where kNN helps most" in out
    helps = report["top_tokens"]["helps"]
    assert len(helps) == 3 and helps[0]["final"] - helps[0]["lm"] >= helps[1]["final"] - helps[1]["lm"]
    first = helps[0]
    assert first["context"] == [f"w{t}" if t >= 4 else ["<s>", "<pad>", "</s>", "<unk>"][t]
                                for t in targets[max(0, first["position"] - 12) : first["position"]]]
    # Frequencies from dict.txt counts instead of a datastore.
    code, out, _ = run_cli([nbfile, "--lmbda", "0.25", "--freq-from", tmp_path / "dict.txt", "--no-plots",
                            "--quiet"], capsys)
    assert code == 0 and "training data" in out


def test_frequency_bucket_arithmetic():
    targets = np.array([0, 1, 1, 2, 2, 2])
    lm = np.log(np.array([0.1, 0.2, 0.2, 0.5, 0.5, 0.5], dtype=np.float32))
    final = np.log(np.array([0.4, 0.2, 0.2, 0.5, 0.5, 0.5], dtype=np.float32))
    counts = np.array([0, 5, 50])
    rows = sw.frequency_buckets(targets, lm, final, counts)
    assert [r.label for r in rows] == ["0", "1-9", ">=10"]
    assert [r.tokens for r in rows] == [1, 2, 3]
    assert rows[0].base_ppl == pytest.approx(10) and rows[0].knn_ppl == pytest.approx(2.5)
    assert rows[2].base_ppl == pytest.approx(2)
    np.testing.assert_array_equal(sw.token_counts(np.array([3, 3, -1, 0]), 2), [1, 0, 0, 2])


# ------------------------------------------------------------- adaptive λ
def test_signals_never_see_the_target(tmp_path, arrays):
    targets, lm, dists, vals = arrays
    other = (np.roll(targets, 1), lm, dists, vals)
    a = sw.knn_table(read_neighbors(write(tmp_path / "a", arrays)), [16, 64], [1.0, 5.0], signals=True)
    b = sw.knn_table(read_neighbors(write(tmp_path / "b", other)), [16, 64], [1.0, 5.0], signals=True)
    assert not np.array_equal(a.knn_log_probs, b.knn_log_probs)
    for name in sw.SIGNALS:
        np.testing.assert_array_equal(a.signals[name], b.signals[name])
    sig = a.signals
    assert (sig["distinct_vals"][0] <= 16).all() and (sig["distinct_vals"][1] >= sig["distinct_vals"][0]).all()
    assert ((sig["knn_max_prob"] >= sig["top_weight"] - 1e-6) & (sig["knn_max_prob"] <= 1 + 1e-6)).all()
    np.testing.assert_allclose(sig["nn_dist"][1, 0], dists.min(axis=1), rtol=1e-6)
    model = sw.fit_bucketed_lambda(sig["nn_dist"][1, 0], lm, a.knn_log_probs[1, 0], [0, 0.5, 1], 4)
    assert 1.0 not in model.lambdas  # λ = 1 would zero unseen targets


def test_adaptive_lambda_is_fit_on_one_split_and_reported_on_the_other(tmp_path, capsys):
    valid = write(tmp_path / "valid", synthetic(4000, 32, seed=2, reliable_near=True), split="valid")
    test = write(tmp_path / "test", synthetic(4000, 32, seed=3, reliable_near=True), split="test")
    code, out, err = run_cli([test, "--adaptive-fit", valid, "--lmbda", "0:1:0.1", "--knn-temp", "1,5",
                              "--k", "32", "--adaptive-signals", "top_weight,nn_dist",
                              "--json", tmp_path / "r.json", "--no-plots", "--quiet"], capsys)
    assert code == 0, err
    ad = json.load(open(tmp_path / "r.json"))["adaptive"]
    by_signal = {r["signal"]: r for r in ad["signals"]}
    # Distance tells reliable neighbours apart here: fitted on valid, it wins on test.
    assert ad["chosen"] == "nn_dist" and ad["beats_fixed"]
    assert by_signal["nn_dist"]["eval_ppl"] < ad["fixed_eval_ppl"]
    lambdas = by_signal["nn_dist"]["lambdas"]
    assert lambdas[0] > lambdas[-1]  # near neighbours: trust kNN more
    assert "beats the best fixed λ on held-out test" in out
    # The report is honest either way: "beats" only when the held-out number is lower.
    uninformative = write(tmp_path / "valid2", synthetic(3000, 32, seed=4), split="valid")
    test2 = write(tmp_path / "test2", synthetic(3000, 32, seed=5), split="test")
    code, out, _ = run_cli([test2, "--adaptive-fit", uninformative, "--lmbda", "0:1:0.1", "--k", "32",
                            "--json", tmp_path / "r2.json", "--no-plots", "--quiet"], capsys)
    ad2 = json.load(open(tmp_path / "r2.json"))["adaptive"]
    chosen = next(r for r in ad2["signals"] if r["signal"] == ad2["chosen"])
    assert ad2["beats_fixed"] == (chosen["eval_ppl"] < ad2["fixed_eval_ppl"])
    assert ("does not beat" in out) == (not ad2["beats_fixed"])


# ------------------------------------------- against fairseq-eval-lm itself

def test_swept_perplexity_equals_fairseq_eval_lm_runs(tmp_path, data_bin, tiny_lm, tiny_datastore,
                                                      flat_index, capsys):
    """The issue's exactness promise: any grid point = a full eval-lm run with those flags."""
    from fairseq_knnlm.storage.datastore import Datastore

    knn = ["--knnlm", "--dstore", tiny_datastore, "--knn-index", flat_index]
    nbdir = tmp_path / "valid.nbrs"
    saved = eval_lm_in_process(data_bin, tiny_lm, *knn, "--k", 16, "--knn-temp", 5, "--lmbda", 0.25,
                               "--knn-save-neighbors", nbdir)
    nb = read_neighbors(nbdir)
    assert nb.k == 16 and nb.n > 1000 and nb.meta["split"] == "valid"
    assert nb.meta["dstore_fingerprint"] == Datastore(tiny_datastore).fingerprint
    assert nb.meta["sim_func"] == "faiss" and nb.meta["dictionary_md5"]

    code, out, err = run_cli([nbdir, "--k", "4,16", "--knn-temp", "1,5", "--lmbda", "0,0.25,1",
                              "--json", tmp_path / "r.json", "--no-plots", "--quiet"], capsys)
    assert code == 0, err
    report = json.load(open(tmp_path / "r.json"))
    ppl, loss = np.array(report["perplexity"]), np.array(report["loss"])
    assert ppl[1, 1, 1] == pytest.approx(saved[1], rel=1e-6)
    assert loss[1, 1, 1] == pytest.approx(saved[0], rel=1e-6)
    # Other grid points, each against its own full run: fewer neighbours than saved,
    # another temperature, λ = 0 and λ = 1 (where eval-lm skips tokens no neighbour predicts).
    for (ki, ti, li), (k, temp, lmbda) in (((0, 0, 1), (4, 1, 0.25)), ((1, 0, 0), (16, 1, 0)),
                                           ((1, 1, 2), (16, 5, 1))):
        run_loss, run_ppl = eval_lm_in_process(data_bin, tiny_lm, *knn, "--k", k, "--knn-temp", temp,
                                               "--lmbda", lmbda)
        assert ppl[ki, ti, li] == pytest.approx(run_ppl, rel=1e-6), (k, temp, lmbda)
        assert loss[ki, ti, li] == pytest.approx(run_loss, rel=1e-6), (k, temp, lmbda)
    assert np.array(report["skipped"])[1, 1, 2] > 0
