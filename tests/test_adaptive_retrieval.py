"""Adaptive retrieval: LM features saved with neighbours, the fitted predictor, the sweep's
perplexity-vs-fraction report, and eval-lm / generation searching only the selected tokens.

Exactness, against real fairseq-eval-lm runs of the tiny LM with a real FAISS index:
fraction 1 = the full kNN-LM, fraction 0 = the base LM (and no search), and any
other fraction = the offline sweep's number for it.
"""

import json
import logging
import math
import re
import types

import numpy as np
import pytest
import torch

from conftest import eval_lm, eval_lm_in_process
from fairseq_knnlm.retrieval import adaptive
from fairseq_knnlm.retrieval.adaptive import (
    FEATURE_NAMES,
    RetrievalPredictor,
    RetrievalPredictorError,
    fit_predictor,
    fraction_thresholds,
)
from fairseq_knnlm.storage.datastore import shard_dirname
from fairseq_knnlm.storage.neighbors import NeighborsError, NeighborsWriter, read_neighbors
from test_sweep import run_cli, synthetic, write

K, TEMP, LMBDA = 16, 5.0, 0.25
SEARCHED_RE = re.compile(r"adaptive retrieval: searched ([0-9,]+) of ([0-9,]+) scored tokens")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def informative(n, k, seed):
    """Synthetic neighbours whose LM features say where retrieval helps: the neighbours are
    right when the LM is unsure (high entropy), random otherwise."""
    targets, lm, dists, vals = synthetic(n, k, seed=seed)
    rng = np.random.default_rng(seed + 100)
    entropy = rng.uniform(0, 6, n)
    hit = rng.random((n, k)) < np.where(entropy > 3, 0.8, 0.0)[:, None]
    other = (targets[:, None] + rng.integers(1, 50, (n, k))) % 500  # never the target
    vals = np.where(hit, targets[:, None], other).astype(np.int32)
    top = -rng.uniform(0, 3, n)
    features = np.stack([entropy, top, rng.uniform(0, 2, n)], axis=1).astype(np.float32)
    return (targets, lm, dists, vals), features


def write_with_features(path, arrays, features, split, batch=97):
    targets, lm, dists, vals = arrays
    w = NeighborsWriter(str(path), dists.shape[1], dict(sim_func="faiss", split=split, data="/d",
                                                      knn_temp=1.0, dstore_fingerprint="f00d"),
                        feature_names=FEATURE_NAMES)
    for s in range(0, len(targets), batch):
        e = min(s + batch, len(targets))
        w.append(targets[s:e], lm[s:e], dists[s:e], vals[s:e], lm_features=features[s:e])
    return w.commit()


# ------------------------------------------------------------------ features
def test_lm_features_are_entropy_top_log_prob_and_gap_of_each_row():
    logits = torch.randn(50, 300, generator=torch.Generator().manual_seed(0)) * 3
    lprobs = torch.log_softmax(logits, dim=-1)
    f = adaptive.lm_features(lprobs).double().numpy()
    p = np.exp(lprobs.double().numpy())
    top2 = np.sort(lprobs.numpy(), axis=1)[:, ::-1][:, :2]
    np.testing.assert_allclose(f[:, 0], -(p * np.log(p)).sum(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(f[:, 1], top2[:, 0])
    np.testing.assert_allclose(f[:, 2], top2[:, 0] - top2[:, 1], rtol=1e-6)
    # Row by row: a row's features do not depend on the other rows of the chunk.
    np.testing.assert_array_equal(adaptive.lm_features(lprobs[7:9]).numpy(), f[7:9].astype(np.float32))


def test_predictor_scores_are_the_same_bits_in_any_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 3)).astype(np.float32)
    gain = x[:, 0] ** 2 - x[:, 1] + rng.normal(scale=0.1, size=5000)
    pred = fit_predictor(x, gain)
    scores = pred.score(x)
    assert np.corrcoef(scores, gain)[0, 1] > 0.9  # the quadratic model fits a quadratic gain
    for rows in (slice(0, 1), slice(3, 19), slice(100, 4000), np.arange(4999, -1, -7)):
        assert np.array_equal(pred.score(x[rows]), scores[rows])
    assert np.array_equal(pred.score(torch.from_numpy(x[:10])), scores[:10])


def test_thresholds_search_the_asked_fraction_and_the_ends_are_all_or_none():
    scores = np.array([5.0, 1.0, 3.0, 3.0, 2.0, 4.0, 0.0, 3.0, 6.0, 7.0])
    th = fraction_thresholds(scores, [0, 0.1, 0.3, 0.5, 1])
    sel = {f: RetrievalPredictor.select(scores, t) for f, t in th.items()}
    assert sel[0].sum() == 0 and th[0] == math.inf
    assert sel[1].all() and th[1] == -math.inf
    assert sel[0.1].sum() == 1 and sel[0.3].sum() == 3
    assert sel[0.5].sum() == 7  # 5th highest is 3.0, tied three times: ties are all searched
    # Even unsure (NaN) scores are never searched at fraction 0, always at fraction 1.
    nan = np.array([np.nan, 1.0])
    assert RetrievalPredictor.select(nan, math.inf).sum() == 0 and RetrievalPredictor.select(nan, -math.inf).all()
    with pytest.raises(RetrievalPredictorError, match=r"\[0, 1\]"):
        fraction_thresholds(scores, [1.5])


# ------------------------------------------------------ file and start-up checks
def test_predictor_file_round_trip_and_one_line_refusals(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    pred = fit_predictor(x, x[:, 0])
    pred.thresholds = fraction_thresholds(pred.score(x), [0, 0.3, 1])
    pred.meta = dict(checkpoint_sha256="c" * 8, dictionary_md5="d" * 8, dstore_fingerprint="f00d",
                     dstore_size=10, keytype="last_ffn_input", k=16, knn_temp=1.0, lmbda=0.25)
    path = pred.save(str(tmp_path / "p.json"))
    assert not (tmp_path / "p.json.tmp").exists()
    loaded = RetrievalPredictor.load(path)
    assert np.array_equal(loaded.score(x), pred.score(x)) and loaded.thresholds == pred.thresholds
    assert loaded.threshold(0.3) == pred.thresholds[0.3] and loaded.threshold(1) == -math.inf
    with pytest.raises(RetrievalPredictorError, match="fractions 0, 0.3, 1, not 0.5"):
        loaded.threshold(0.5)
    same = dict(pred.meta)
    loaded.check_run(same)
    for key, value in (("checkpoint_sha256", "e" * 8), ("dstore_fingerprint", "beef"), ("dstore_size", 11),
                       ("keytype", "last_layer_output"), ("dictionary_md5", "x")):
        with pytest.raises(RetrievalPredictorError, match=f"fit for another .*{key}") as err:
            loaded.check_run(dict(same, **{key: value}))
        assert "\n" not in str(err.value)
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "something-else"}))
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(RetrievalPredictorError, match="fairseq-knnlm-sweep --save-predictor"):
            RetrievalPredictor.load(str(bad))


def test_neighbours_files_keep_features_and_old_files_still_read(tmp_path, capsys):
    arrays, features = informative(500, 8, seed=0)
    nb = read_neighbors(write_with_features(tmp_path / "f.nbrs", arrays, features, "valid"))
    assert nb.feature_names == list(FEATURE_NAMES) and nb.meta["lm_features_dtype"] == "float32"
    np.testing.assert_array_equal(nb.lm_features, features)
    root = tmp_path / "sharded.nbrs"
    for i, rows in enumerate((slice(0, 200), slice(200, 500))):
        write_with_features(root / shard_dirname(i, 2), tuple(a[rows] for a in arrays), features[rows], "valid")
    np.testing.assert_array_equal(read_neighbors(root).lm_features, features)  # shards join in order
    with pytest.raises(NeighborsError, match="lm_features of shape"):
        NeighborsWriter(str(tmp_path / "g"), 8, {}, feature_names=FEATURE_NAMES).append(*arrays)
    old = write(tmp_path / "old.nbrs", arrays)  # saved without features
    assert read_neighbors(old).lm_features is None and read_neighbors(old).feature_names == []
    code, out, _ = run_cli([old, "--no-plots", "--quiet"], capsys)
    assert code == 0 and "best:" in out  # the sweep itself still works
    code, _, err = run_cli([old, "--retrieval-fractions", "0:1:0.5", "--no-plots"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "saved without LM features" in err


# -------------------------------------------------------------- the sweep
def test_sweep_reports_the_curve_held_out_and_saves_the_predictor(tmp_path, capsys):
    valid = write_with_features(tmp_path / "valid.nbrs", *informative(4000, 16, seed=1), "valid")
    test = write_with_features(tmp_path / "test.nbrs", *informative(4000, 16, seed=2), "test")
    pred_path = tmp_path / "pred.json"
    code, out, err = run_cli([test, "--retrieval-fit", valid, "--retrieval-fractions", "0:1:0.25", "--k", 16,
                              "--lmbda", "0:0.9:0.1", "--save-predictor", pred_path, "--json", tmp_path / "r.json",
                              "--plot-prefix", tmp_path / "plots", "--quiet"], capsys)
    assert code == 0, err
    rep = json.load(open(tmp_path / "r.json"))["adaptive_retrieval"]
    assert "adaptive retrieval: predictor fit on valid" in out and (tmp_path / "plots-retrieval.png").exists()
    for part in ("fit", "held_out"):
        rows = {r["fraction"]: r for r in rep[part]["rows"]}
        assert rows[0]["searched"] == 0 and rows[0]["ppl"] == rep[part]["base_ppl"]
        assert rows[1]["searched"] == 1 and rows[1]["ppl"] == rep[part]["full_ppl"]
        # The features carry the signal: searching half the tokens the predictor picks
        # beats half chosen at random, and nearly reaches searching them all.
        assert rows[0.5]["ppl"] < rows[0.5]["random_ppl"]
        assert rows[0.5]["ppl"] < 1.02 * rows[1]["ppl"]
    assert abs(rows[0.5]["searched"] - 0.5) < 0.05  # held-out: thresholds from valid
    pred = RetrievalPredictor.load(str(pred_path))
    assert sorted(pred.thresholds) == [0, 0.25, 0.5, 0.75, 1.0]
    assert pred.meta["fit_split"] == "valid" and pred.meta["dstore_fingerprint"] == "f00d"
    assert pred.meta["k"] == 16 and pred.meta["lmbda"] == rep["setting"]["lmbda"]
    # The fit file must be another split of the same set-up.
    code, _, err = run_cli([test, "--retrieval-fit", test, "--no-plots"], capsys)
    assert code == 2 and "same split" in err


# ------------------------------------------------ against fairseq-eval-lm itself
@pytest.fixture(scope="module")
def fitted(tmp_path_factory, data_bin, tiny_lm, tiny_datastore, flat_index):
    """Valid neighbours (with LM features) of a full kNN-LM run, and a predictor fit on them."""
    work = tmp_path_factory.mktemp("adaptive")
    knn = ["--knnlm", "--dstore", tiny_datastore, "--knn-index", flat_index, "--k", K, "--knn-temp", TEMP,
           "--lmbda", LMBDA]
    full = eval_lm_in_process(data_bin, tiny_lm, *knn, "--knn-save-neighbors", work / "valid.nbrs")
    predictor = work / "predictor.json"
    from fairseq_knnlm.cli import sweep as cli

    report = cli.run(cli.build_parser().parse_args(
        [str(work / "valid.nbrs"), "--k", str(K), "--knn-temp", str(TEMP), "--lmbda", str(LMBDA),
         "--retrieval-fractions", "0,0.4,1", "--save-predictor", str(predictor), "--no-plots", "--quiet"]),
        out=open(work / "sweep.txt", "w"))
    rows = {r["fraction"]: r for r in report["adaptive_retrieval"]["fit"]["rows"]}
    return types.SimpleNamespace(knn=knn, full=full, predictor=predictor, rows=rows, work=work,
                                 nb=read_neighbors(work / "valid.nbrs"))


def searched(caplog):
    found = SEARCHED_RE.findall(caplog.text)
    assert found, caplog.text[-2000:]
    return tuple(int(x.replace(",", "")) for x in found[-1])


def test_eval_lm_at_a_fraction_is_the_sweeps_number_and_the_ends_are_exact(data_bin, tiny_lm, fitted, caplog):
    nb = fitted.nb
    assert nb.feature_names == list(FEATURE_NAMES) and nb.lm_features.shape == (nb.n, len(FEATURE_NAMES))
    flags = [*fitted.knn, "--knn-retrieval-predictor", fitted.predictor]
    caplog.set_level(logging.INFO)
    # Fraction 1: every token searched, the full kNN-LM to the last digit.
    assert eval_lm_in_process(data_bin, tiny_lm, *flags, "--knn-retrieval-fraction", 1) == fitted.full
    assert searched(caplog) == (nb.n, nb.n)
    # Fraction 0: no search at all, the base LM to the last digit.
    caplog.clear()
    base = eval_lm_in_process(data_bin, tiny_lm, *fitted.knn[:-2], "--lmbda", 0)
    caplog.clear()
    assert eval_lm_in_process(data_bin, tiny_lm, *flags, "--knn-retrieval-fraction", 0) == base
    assert searched(caplog) == (0, nb.n)
    assert re.search(r"kNN searches: 0 for", caplog.text) or "kNN searches" not in caplog.text
    # In between: the same tokens searched as offline, and the sweep's perplexity.
    caplog.clear()
    loss, ppl = eval_lm_in_process(data_bin, tiny_lm, *flags, "--knn-retrieval-fraction", 0.4)
    row = fitted.rows[0.4]
    assert searched(caplog) == (round(row["searched"] * nb.n), nb.n)
    assert 0.35 < row["searched"] < 0.45
    # Within float32 rounding, not to the last bit: the searched rows' p_kNN is computed on a
    # sub-batch online and on the whole split offline, and on some CPUs torch's float32 kernels
    # round differently for different batch shapes (the same tokens are searched either way).
    assert loss == pytest.approx(row["loss"], rel=1e-6) and ppl == pytest.approx(row["ppl"], rel=1e-5)
    assert base[1] > ppl > fitted.full[1]


def test_saved_lm_features_describe_the_lm_distribution(fitted):
    """Each row's features are those of the LM's whole distribution (the tiny LM has an adaptive
    softmax: given the targets, fairseq computes only their tail clusters)."""
    nb = fitted.nb
    entropy, top, gap = np.asarray(nb.lm_features, dtype=np.float64).T
    vocab = int(nb.meta["dictionary_size"])
    assert (entropy >= -1e-4).all() and (entropy <= math.log(vocab) + 1e-4).all()
    assert (top >= np.asarray(nb.lm_log_probs) - 1e-5).all() and (top < 0).any()
    assert (gap >= 0).all() and (gap > 0).any()


def test_eval_lm_refuses_a_predictor_fit_for_another_datastore(data_bin, tiny_lm, fitted, tmp_path):
    obj = json.load(open(fitted.predictor))
    obj["meta"]["dstore_fingerprint"] = "0123456789abcdef"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(obj))
    proc = eval_lm(data_bin, tiny_lm, *fitted.knn, "--knn-retrieval-predictor", other,
                   "--knn-retrieval-fraction", 0.4, check=False)
    assert proc.returncode != 0
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("fairseq-knnlm: error: --knn-retrieval-predictor"), proc.stdout[-2000:]
    assert "fit for another datastore (--dstore)" in last and "Traceback" not in proc.stdout


def test_generation_with_a_predictor_searches_only_selected_steps(data_bin, tiny_lm, tiny_datastore, fitted):
    from fairseq_knnlm.integration.generation import retrieval_counts, search_count
    from fairseq_knnlm.integration.hub import from_pretrained

    index = fitted.knn[fitted.knn.index("--knn-index") + 1]
    hub = from_pretrained(str(tiny_lm.parent), tiny_lm.name, str(data_bin), dstore=str(tiny_datastore),
                          knn_index=str(index), k=K, lmbda=LMBDA, knn_temp=TEMP,
                          knn_retrieval_predictor=str(fitted.predictor), knn_retrieval_fraction=1.0).eval()
    task, model = hub.task, hub.models[0]
    sentences = ["The game was released in Japan .", "In 1998 , the band toured Europe with a new album ."]

    def scores():
        return [h["positional_scores"] for h in hub.score(sentences)]

    with_all = scores()  # fraction 1
    predictor = task.knnlm.predictor
    task.knnlm.predictor = None
    full = scores()
    for a, b in zip(with_all, full):
        assert torch.equal(a, b)
    task.knnlm.predictor, task.knnlm.threshold = predictor, math.inf  # fraction 0
    before = search_count(model)
    none = scores()
    assert search_count(model) == before  # not a single search
    task.knnlm.predictor, task.args.lmbda = None, 0.0
    plain = scores()
    for a, b in zip(none, plain):
        assert torch.equal(a, b)
    task.knnlm.predictor, task.args.lmbda = predictor, LMBDA
    task.knnlm.threshold = predictor.threshold(0.4)
    done, decided = retrieval_counts(model)
    text = hub.sample("The game was", beam=2, max_len_b=12)
    now_done, now_decided = retrieval_counts(model)
    assert isinstance(text, str) and now_decided > decided and now_done - done < now_decided - decided
