"""kNN-LM perplexity from the stock fairseq-eval-lm, against independent references."""

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import refusal, ROOT, USER_DIR, eval_lm, eval_lm_in_process, perplexity_line, quiet, run
import fairseq_knnlm.index
from fairseq_knnlm.storage.datastore import Datastore, DatastoreWriter


def build_index(dstore, output, factory="Flat", *extra):
    run(["fairseq-knnlm-build-index", "--dstore", dstore, "--index-factory", factory,
         "--output", output, *extra])
    return output


WORD_PROB = re.compile(r"\S+ \[(-?[0-9.]+|-?inf)\]")


WORD_PROB_LINE = re.compile(r"fairseq_cli\.eval_lm:\d+ (.*)$", re.M)


def word_log_probs(output):
    """Per-token natural-log probabilities printed by --output-word-probs, in order."""
    lines = WORD_PROB_LINE.findall(output)
    return np.array([float(x) for line in lines for x in WORD_PROB.findall(line)])


def knnlm(data_bin, tiny_lm, dstore, index, *flags, check=True):
    return eval_lm(data_bin, tiny_lm, "--knnlm", "--dstore", dstore, "--knn-index", index, *flags, check=check)


def test_lambda_zero_reproduces_baseline(data_bin, tiny_lm, tiny_datastore, flat_index, stock_valid):
    ours = knnlm(data_bin, tiny_lm, tiny_datastore, flat_index, "--lmbda", "0", "--k", "8")
    assert perplexity_line(ours.stdout) == perplexity_line(stock_valid)


def brute_force_knnlm_ppl(train_keys, train_vals, queries, targets, lm_lp, k, lmbda, temp, sim="l2"):
    """The paper's formula with exhaustive numpy search; shares no code with the package.

    sim "l2": squared distances; "ip": inner products (the larger, the nearer)."""
    train_keys = train_keys.astype(np.float64)
    sq_norms = (train_keys ** 2).sum(1)
    knn_p = np.empty(len(queries))
    for s in range(0, len(queries), 512):
        q = queries[s : s + 512].astype(np.float64)
        if sim == "l2":
            d = sq_norms[None, :] - 2 * q @ train_keys.T + (q ** 2).sum(1)[:, None]
        else:
            d = -(q @ train_keys.T)
        nn = np.argpartition(d, k - 1, axis=1)[:, :k]
        nd = np.take_along_axis(d, nn, 1)
        w = np.exp(-(nd - nd.min(1, keepdims=True)) / temp)
        w /= w.sum(1, keepdims=True)
        knn_p[s : s + 512] = (w * (train_vals[nn] == targets[s : s + 512, None])).sum(1)
    p = lmbda * knn_p + (1 - lmbda) * np.exp(lm_lp)
    return math.exp(-np.log(p).mean())


def brute_force_reference(tiny_datastore, valid_datastore, stock_valid, k, lmbda, temp, sim="l2"):
    lm_lp = word_log_probs(stock_valid)
    train, valid = Datastore(tiny_datastore), Datastore(valid_datastore)
    assert len(lm_lp) == valid.size
    return brute_force_knnlm_ppl(
        np.asarray(train.keys), np.asarray(train.vals), np.asarray(valid.keys),
        np.asarray(valid.vals), lm_lp, k, lmbda, temp, sim,
    )


def test_flat_l2_matches_brute_force_numpy(data_bin, tiny_lm, tiny_datastore, flat_index, valid_datastore,
                                           stock_valid):
    k, lmbda, temp = 16, 0.25, 5.0
    expected = brute_force_reference(tiny_datastore, valid_datastore, stock_valid, k, lmbda, temp)
    _, ppl = eval_lm_in_process(data_bin, tiny_lm, "--knnlm", "--dstore", tiny_datastore, "--knn-index", flat_index,
                                "--k", k, "--lmbda", lmbda, "--knn-temp", temp, "--knn-sim-func", "l2")
    assert ppl == pytest.approx(expected, rel=1e-4)
    # The interpolation actually did something on this data.
    assert abs(ppl - 2 ** float(perplexity_line(stock_valid)[0])) > 1.0


def test_word_probs_report_interpolated_probabilities(data_bin, tiny_lm, tiny_datastore, flat_index):
    out = knnlm(data_bin, tiny_lm, tiny_datastore, flat_index, "--k", 8, "--lmbda", 0.5,
                "--knn-temp", 5, "--output-word-probs")
    lp = word_log_probs(out.stdout)
    loss = float(perplexity_line(out.stdout)[0])
    assert -lp.mean() / math.log(2) == pytest.approx(loss, abs=1e-4)


def test_memorisation_drives_perplexity_to_one(data_bin, tiny_lm, valid_datastore, valid_self_index):
    _, ppl = eval_lm_in_process(data_bin, tiny_lm, "--knnlm", "--dstore", valid_datastore, "--knn-index",
                                valid_self_index, "--k", 4, "--lmbda", 0.999, "--knn-temp", 0.01,
                                "--knn-sim-func", "l2")
    assert ppl < 1.1


def test_lambda_one_works_when_every_token_matches(data_bin, tiny_lm, valid_datastore, valid_self_index):
    _, ppl = eval_lm_in_process(data_bin, tiny_lm, "--knnlm", "--dstore", valid_datastore, "--knn-index",
                                valid_self_index, "--k", 1, "--lmbda", 1)
    assert ppl == pytest.approx(1.0, abs=0.01)


def test_ivfpq_with_faiss_distances_lands_near_exact(data_bin, tiny_lm, tiny_datastore, flat_index):
    ivf = build_index(tiny_datastore, tiny_datastore / "ivfpq.index", "IVF64,PQ16")
    args = ["--knnlm", "--dstore", tiny_datastore, "--k", 32, "--lmbda", 0.25, "--knn-temp", 5]
    _, e = eval_lm_in_process(data_bin, tiny_lm, *args, "--knn-index", flat_index, "--knn-sim-func", "l2")
    _, a = eval_lm_in_process(data_bin, tiny_lm, *args, "--knn-index", ivf, "--probe", 16)
    _, r = eval_lm_in_process(data_bin, tiny_lm, *args, "--knn-index", ivf, "--probe", 16, "--knn-sim-func", "l2")
    assert a == pytest.approx(e, rel=0.05)
    assert abs(r - e) <= abs(a - e) + 1e-6 or r == pytest.approx(e, rel=0.01)


def test_domain_datastore_from_another_corpus(artefacts, data_bin, tiny_lm):
    """A store built from text binarized with the model's dictionary is used as-is."""
    other = artefacts / "other-bin"
    run(["fairseq-preprocess", "--only-source", "--srcdict", data_bin / "dict.txt",
         "--trainpref", artefacts / "raw" / "test.txt", "--destdir", other, "--workers", 1])
    dstore = artefacts / "dstore-other"
    eval_lm_in_process(other, tiny_lm, "--save-knnlm-dstore", "--dstore", dstore, split="train")
    build_index(dstore, dstore / "knn.index")  # the default --knn-index location
    _, base = eval_lm_in_process(data_bin, tiny_lm, split="test")
    _, adapted = eval_lm_in_process(data_bin, tiny_lm, "--knnlm", "--dstore", dstore, "--k", 16, "--lmbda", 0.5,
                                    "--knn-temp", 5, split="test")
    # The store holds the test text itself, so adapting to it must help a lot.
    assert adapted < 0.8 * base


def test_startup_refusals(artefacts, data_bin, tiny_lm, tiny_datastore, flat_index, valid_self_index):
    knn = ["--knnlm", "--dstore", tiny_datastore, "--knn-index", flat_index]
    assert "--lmbda must lie in [0, 1]" in refusal(data_bin, tiny_lm, *knn, "--lmbda", "1.5")
    assert "--k must be at least 1" in refusal(data_bin, tiny_lm, *knn, "--k", "0")
    assert "exceeds the datastore" in refusal(data_bin, tiny_lm, *knn, "--k", str(10**9))
    assert "--knn-temp must be positive" in refusal(data_bin, tiny_lm, *knn, "--knn-temp", "0")
    assert "--knn-keytype" in refusal(data_bin, tiny_lm, *knn, "--knn-keytype", "last_layer_output")
    # An index built for another datastore.
    last = refusal(data_bin, tiny_lm, "--knnlm", "--dstore", tiny_datastore, "--knn-index", valid_self_index)
    assert "fairseq-knnlm-build-index" in last
    # Missing datastore and missing index.
    assert "no datastore" in refusal(data_bin, tiny_lm, "--knnlm", "--dstore", artefacts / "nope")
    missing = artefacts / "nope.index"
    last = refusal(data_bin, tiny_lm, *knn[:3], "--knn-index", missing)
    assert last.startswith(f"no index at {missing}; build it with fairseq-knnlm-build-index --dstore "), last


def _fake_store(path, dim, like: Datastore, **meta_changes):
    writer = DatastoreWriter(path, dim, np.float32)
    writer.append(np.zeros((8, dim), np.float32), np.arange(8, dtype=np.int32))
    meta = {k: like.meta[k] for k in ("keytype", "dictionary_md5", "dictionary_size", "checkpoint_sha256")}
    meta.update(meta_changes)
    writer.commit(meta)
    fairseq_knnlm.index.build_index(str(path), factory="Flat", progress=False, log=quiet)  # at the default --knn-index path


def test_mismatched_datastore_refusals(artefacts, data_bin, tiny_lm, tiny_datastore):
    like = Datastore(tiny_datastore)
    wrong_dim = artefacts / "dstore-wrong-dim"
    _fake_store(wrong_dim, like.dim * 2, like)
    assert "dimension" in refusal(data_bin, tiny_lm, "--knnlm", "--dstore", wrong_dim, "--k", 4)
    wrong_dict = artefacts / "dstore-wrong-dict"
    _fake_store(wrong_dict, like.dim, like, dictionary_md5="0" * 32)
    assert "dictionary" in refusal(data_bin, tiny_lm, "--knnlm", "--dstore", wrong_dict, "--k", 4)


def test_l2_similarity_needs_an_l2_index(data_bin, tiny_lm, tiny_datastore, valid_datastore, stock_valid):
    ip_index = build_index(tiny_datastore, tiny_datastore / "ip.index", "Flat", "--metric", "ip")
    last = refusal(data_bin, tiny_lm, "--knnlm", "--dstore", tiny_datastore, "--knn-index", ip_index,
                   "--knn-sim-func", "l2", "--k", 4)
    assert "--metric l2" in last
    # An inner-product index serves --knn-sim-func ip: exact inner products, the brute-force reference.
    _, ppl = eval_lm_in_process(data_bin, tiny_lm, "--knnlm", "--dstore", tiny_datastore, "--knn-index", ip_index,
                                "--knn-sim-func", "ip", "--k", 4, "--knn-temp", 5)
    assert ppl == pytest.approx(brute_force_reference(tiny_datastore, valid_datastore, stock_valid, 4, 0.25, 5.0,
                                                      sim="ip"), rel=1e-4)


def _eval_lm_argv(data_bin, tiny_lm, *flags):
    return [str(a) for a in (
        data_bin, "--path", tiny_lm, "--gen-subset", "valid", "--tokens-per-sample", 128,
        "--context-window", 64, "--cpu", "--max-tokens", 4096, "--num-workers", 0, "--no-progress-bar",
        "--user-dir", USER_DIR, "--task", "knnlm_language_modeling", *flags)]


def test_eval_lm_run_as_a_module_under_a_profiler(tmp_path, data_bin, tiny_lm, tiny_datastore, flat_index):
    """runpy without a module of its own (``python -m cProfile -m fairseq_cli.eval_lm``) still scores the kNN-LM."""
    flags = ["--knnlm", "--dstore", tiny_datastore, "--knn-index", flat_index, "--k", 8, "--lmbda", 0.5,
             "--knn-temp", 5]
    loss, ppl = eval_lm_in_process(data_bin, tiny_lm, *flags)
    profiled = run([sys.executable, "-m", "cProfile", "-o", tmp_path / "eval.prof", "-m", "fairseq_cli.eval_lm",
                    *_eval_lm_argv(data_bin, tiny_lm, *flags)])
    assert perplexity_line(profiled.stdout) == (f"{loss:.4f}", f"{ppl:.2f}")  # as eval-lm prints them


def test_refuses_to_run_with_fairseqs_own_scorer(artefacts, data_bin, tiny_lm):
    """If the scorer cannot be swapped in, eval-lm must stop instead of printing the plain LM's perplexity."""
    dstore = artefacts / "dstore-never-written"
    script = (
        "import runpy, sys; import fairseq_knnlm.integration.task as task; "
        "task.install_scorer = lambda t: (lambda: None); "  # a runner whose scorer we cannot reach
        f"sys.argv = ['eval-lm'] + {_eval_lm_argv(data_bin, tiny_lm, '--save-knnlm-dstore', '--dstore', dstore)!r}; "
        "runpy.run_module('fairseq_cli.eval_lm', run_name='__main__')"
    )
    proc = run([sys.executable, "-c", script], check=False, cwd=ROOT)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("fairseq-knnlm: error: fairseq-eval-lm built")
    assert not dstore.exists() and not Path(str(dstore) + ".partial").exists()
