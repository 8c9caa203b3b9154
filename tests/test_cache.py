"""The continuous cache (--knn-cache-size): the plain run when off, a brute-force numpy
reference, corpus order, the offline sweep's exactness, and the refusals."""

import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import CONTEXT_WINDOW, TOKENS_PER_SAMPLE, eval_lm_in_process
from fairseq_knnlm.scoring.cache import ContinuousCache, cache_log_probs, interpolate_cache
from fairseq_knnlm.cli import sweep as sweep_cli
from fairseq_knnlm.errors import UserError
from fairseq_knnlm.storage.neighbors import read_neighbors
from test_datastore_pass import load_model, reference_keys, split_tokens

SIZE, THETA, CACHE_LMBDA = 200, 0.05, 0.2
K, TEMP, LMBDA = 16, 5, 0.25


def numpy_cache_log_probs(keys, vals, size, theta):
    """Grave et al.'s cache, one token at a time in float64; shares no code with the package."""
    keys = np.asarray(keys, dtype=np.float64)
    out = np.full(len(vals), np.nan)
    for t in range(1, len(vals)):
        lo = max(0, t - size)
        logits = theta * (keys[lo:t] @ keys[t])
        w = np.exp(logits - logits.max())
        hit = vals[lo:t] == vals[t]
        out[t] = np.log(w[hit].sum() / w.sum()) if hit.any() else -np.inf
    return out


def test_cache_math_equals_numpy_for_every_size_theta_and_chunking():
    rng = np.random.default_rng(0)
    n, dim = 700, 16
    keys = rng.normal(size=(n, dim)).astype(np.float32)
    vals = rng.integers(0, 12, n)
    sizes, thetas = [1, 37, 300], [0.0, 0.3, 2.0]
    got = cache_log_probs(torch.from_numpy(keys), torch.from_numpy(vals), 0, sizes, thetas, chunk_rows=64).numpy()
    for si, size in enumerate(sizes):
        for ti, theta in enumerate(thetas):
            want = numpy_cache_log_probs(keys, vals, size, theta)
            np.testing.assert_allclose(got[si, ti], want, rtol=1e-6, atol=1e-6)
    assert np.isnan(got[:, :, 0]).all()  # the first token has an empty cache
    # θ = 0: the count-based cache, (occurrences of the target among the last N) / N.
    t = 500
    assert math.exp(got[1, 0, t]) == pytest.approx((vals[t - 37 : t] == vals[t]).mean())
    # Rows scored with history give the same numbers as rows scored in one stream.
    part = cache_log_probs(torch.from_numpy(keys[200:]), torch.from_numpy(vals[200:]), 300, sizes, thetas).numpy()
    np.testing.assert_allclose(part, got[:, :, 500:], rtol=1e-6)


def test_streaming_cache_equals_one_pass_and_refuses_blocks_out_of_order():
    rng = np.random.default_rng(1)
    keys = torch.from_numpy(rng.normal(size=(300, 8)).astype(np.float32))
    vals = torch.from_numpy(rng.integers(0, 5, 300))
    model = torch.from_numpy(rng.normal(-3, 1, 300).astype(np.float32))
    whole = interpolate_cache(model, cache_log_probs(keys, vals, 0, [50], [0.5])[0, 0], 0.3)
    cache = ContinuousCache(50, 0.5, 0.3)
    parts = [cache(keys[a:b], vals[a:b], model[a:b], torch.tensor([i])) for i, (a, b) in
             enumerate(((0, 7), (7, 120), (120, 121), (121, 300)))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    assert torch.equal(whole[0], model[0])  # empty cache: the model's probability
    with pytest.raises(UserError, match="corpus order"):
        cache(keys[:3], vals[:3], model[:3], torch.tensor([2]))
    assert ContinuousCache(50, 0.5, 0.0)(keys, vals, model) is model  # λc = 0: the model's scores


@pytest.fixture(scope="module")
def knn(tiny_datastore, flat_index):
    return ["--knnlm", "--dstore", tiny_datastore, "--knn-index", flat_index, "--k", K, "--knn-temp", TEMP,
            "--lmbda", LMBDA]


def cache_flags(size=SIZE, theta=THETA, lmbda=CACHE_LMBDA):
    return ["--knn-cache-size", size, "--knn-cache-theta", theta, "--knn-cache-lmbda", lmbda]


def test_no_cache_or_zero_weight_is_the_plain_run(data_bin, tiny_lm, knn):
    """Full-precision loss and perplexity, not just the printed digits."""
    plain = eval_lm_in_process(data_bin, tiny_lm)
    assert eval_lm_in_process(data_bin, tiny_lm, *cache_flags(size=0)) == plain
    assert eval_lm_in_process(data_bin, tiny_lm, *cache_flags(lmbda=0)) == plain
    knnlm = eval_lm_in_process(data_bin, tiny_lm, *knn)
    assert knnlm != plain
    assert eval_lm_in_process(data_bin, tiny_lm, *knn, *cache_flags(size=0)) == knnlm
    assert eval_lm_in_process(data_bin, tiny_lm, *knn, *cache_flags(lmbda=0)) == knnlm


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory, data_bin, tiny_lm, knn):
    """kNN-LM + cache, saving the neighbours (and with them every token's key)."""
    nbdir = tmp_path_factory.mktemp("cache") / "valid.nbrs"
    result = eval_lm_in_process(data_bin, tiny_lm, *knn, *cache_flags(), "--knn-save-neighbors", nbdir)
    return result, read_neighbors(nbdir)


def test_cache_stream_is_the_split_in_corpus_order(data_bin, tiny_lm, cached_run):
    """The saved keys and targets -- the cache's memory -- are the split's positions in order,
    across the rows of a batch and across batches."""
    _, nb = cached_run
    stream = split_tokens(data_bin, "valid")
    np.testing.assert_array_equal(nb.targets, stream)
    rows_per_batch = 4096 // (TOKENS_PER_SAMPLE + CONTEXT_WINDOW)
    block = TOKENS_PER_SAMPLE - CONTEXT_WINDOW
    positions = np.array([0, block - 1, block, rows_per_batch * block - 1, rows_per_batch * block,
                          2 * rows_per_batch * block, len(stream) - 1])
    model = load_model(tiny_lm)
    expected = reference_keys(model, stream, model.decoder.dictionary.eos(), positions, "last_ffn_input")
    np.testing.assert_allclose(nb.queries[positions], expected, rtol=1e-4, atol=1e-4)
    assert nb.meta["query_dim"] == nb.queries.shape[1] and nb.meta["cache_size"] == SIZE


def numpy_perplexity(log_probs):
    return float(np.exp(-np.mean(log_probs)))


def test_eval_lm_cache_equals_a_brute_force_numpy_reference(data_bin, tiny_lm, cached_run):
    (loss, ppl), nb = cached_run
    keys, targets = np.asarray(nb.queries), np.asarray(nb.targets)
    cache = numpy_cache_log_probs(keys, targets, SIZE, THETA)
    lm = np.asarray(nb.lm_log_probs, dtype=np.float64)
    logits = -np.asarray(nb.dists, dtype=np.float64)[:, :K] / TEMP
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    p_knn = (w * (np.asarray(nb.vals)[:, :K] == targets[:, None])).sum(1) / w.sum(1)
    p_model = LMBDA * p_knn + (1 - LMBDA) * np.exp(lm)
    p = np.where(np.isnan(cache), p_model, (1 - CACHE_LMBDA) * p_model + CACHE_LMBDA * np.exp(cache))
    assert ppl == pytest.approx(numpy_perplexity(np.log(p)), rel=1e-5)
    assert loss == pytest.approx(math.log2(ppl), rel=1e-6)
    # The LM alone with the cache (no --knnlm, no datastore): the same formula with p_LM.
    p_lm = np.where(np.isnan(cache), np.exp(lm), (1 - CACHE_LMBDA) * np.exp(lm) + CACHE_LMBDA * np.exp(cache))
    _, lm_cache_ppl = eval_lm_in_process(data_bin, tiny_lm, *cache_flags())
    assert lm_cache_ppl == pytest.approx(numpy_perplexity(np.log(p_lm)), rel=1e-5)
    assert lm_cache_ppl < numpy_perplexity(lm)


def test_sweep_reproduces_eval_lm_runs_with_the_cache(tmp_path, data_bin, tiny_lm, knn, cached_run, capsys):
    (loss, ppl), nb = cached_run
    out = tmp_path / "r.json"
    code = sweep_cli.main([str(nb.path), "--k", str(K), "--knn-temp", str(TEMP), "--lmbda", f"0,{LMBDA}",
                           "--knn-cache-size", f"50,{SIZE}", "--knn-cache-theta", f"{THETA},0.2",
                           "--knn-cache-lmbda", f"{CACHE_LMBDA},0.5", "--json", str(out), "--no-plots", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "+ kNN + cache" in printed
    rep = json.loads(out.read_text())["cache"]
    assert rep["lambdas"] == [0.0, LMBDA] and rep["cache_lambdas"] == [0.0, CACHE_LMBDA, 0.5]
    # A grid point against the run that saved the file, and another against its own run (the LM
    # with a smaller, sharper cache, no kNN): eval-lm's printed digits, and to float32 rounding.
    others = eval_lm_in_process(data_bin, tiny_lm, *cache_flags(50, 0.2, 0.5))
    for cell, (run_loss, run_ppl) in (((rep["sizes"].index(SIZE), rep["thetas"].index(THETA), 1, 1), (loss, ppl)),
                                      ((0, 1, 0, 2), others)):
        swept_loss, swept_ppl = np.array(rep["loss"])[cell], np.array(rep["perplexity"])[cell]
        assert (f"{swept_loss:.4f}", f"{swept_ppl:.2f}") == (f"{run_loss:.4f}", f"{run_ppl:.2f}")
        assert swept_ppl == pytest.approx(run_ppl, rel=1e-6) and swept_loss == pytest.approx(run_loss, rel=1e-6)
    rows = rep["rows"]
    assert rows["base"]["ppl"] > rows["knn"]["ppl"] > rows["both"]["ppl"]
    assert rows["cache"]["lmbda"] == 0 and rows["knn"]["cache_lmbda"] == 0
    # --knn-overlap runs the cache in its search step, batch after batch: the same digits.
    assert eval_lm_in_process(data_bin, tiny_lm, *knn, *cache_flags(), "--knn-overlap") == (loss, ppl)


@pytest.mark.parametrize("flags, message", [
    (cache_flags(size=-1), "--knn-cache-size must be 0"),
    (cache_flags(lmbda=1.5), "--knn-cache-lmbda must lie in [0, 1]"),
    (cache_flags(theta=-1), "--knn-cache-theta must be a finite number >= 0"),
    (cache_flags() + ["--num-shards", 2, "--shard-id", 0], "evaluate with one process"),
    (cache_flags() + ["--context-window", 0], "needs fairseq-eval-lm's --context-window"),
    (cache_flags() + ["--knn-save-neighbors", "x.nbrs"], "add --knnlm --dstore DIR"),
])
def test_refusals(data_bin, tiny_lm, flags, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        eval_lm_in_process(data_bin, tiny_lm, *flags)


def test_refusals_outside_eval_lm(data_bin, tiny_datastore, cached_run, tmp_path, capsys):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from conftest import USER_DIR

    argv = [str(data_bin), "--user-dir", USER_DIR, "--task", "knnlm_language_modeling", *map(str, cache_flags())]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_generation_parser(), argv))
    task = tasks.setup_task(cfg.task)
    with pytest.raises(UserError, match="drop it for generation"):
        task.build_generator([], cfg.generation)
    with pytest.raises(UserError, match="drop --knn-cache-size from --save-knnlm-dstore"):
        eval_lm_in_process(data_bin, "unused.pt", "--save-knnlm-dstore", "--dstore", tmp_path / "d", *cache_flags())
    # A neighbours file saved without the cache has no keys: the sweep says how to get them.
    _, nb = cached_run
    plain = tmp_path / "plain.nbrs"
    plain.mkdir()
    for name in os.listdir(nb.path):
        if name not in ("queries.npy", "meta.json"):
            (plain / name).symlink_to(os.path.join(nb.path, name))
    meta = {k: v for k, v in nb.meta.items() if k not in ("queries_dtype", "query_dim")}
    (plain / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exit_:
        sweep_cli.main([str(plain), "--knn-cache-size", "10", "--no-plots", "--quiet"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert "save the neighbours from a run with --knn-cache-size" in err
