"""The examples run end to end in their --tiny modes: real fairseq, real FAISS, real files."""

import json
import math
import re
import sys

import numpy as np
import pytest

from conftest import ROOT, WIKITEXT2, perplexity_line, run
from fairseq_knnlm.storage.datastore import Datastore

WT2 = ROOT / "examples" / "wikitext2"
WT103 = ROOT / "examples" / "wikitext103"
STAGES = ("data", "preprocess", "train", "baseline", "dstore", "index",
          "knn-valid-faiss", "sweep-valid-faiss", "knn-test-faiss", "sweep-test-faiss",
          "dstore-size", "subset", "cache", "keytypes", "knn-valid-l2", "sweep-valid-l2", "knn-test-l2", "sweep-test-l2", "report")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (WIKITEXT2 / "train.txt").exists(), reason=f"no WikiText-2 in {WIKITEXT2}")]


def run_wikitext2(work, *extra):
    return run([sys.executable, WT2 / "run.py", "--tiny", "--data", WIKITEXT2, "--workdir", work, *extra])


@pytest.fixture(scope="module")
def wt2(tmp_path_factory):
    work = tmp_path_factory.mktemp("wt2-tiny")
    out = run_wikitext2(work).stdout
    return work, json.loads((work / "results.json").read_text()), out


def swept(sw, k, temp, lmbda):
    ki, ti = sw["ks"].index(k), sw["temps"].index(temp)
    li = min(range(len(sw["lambdas"])), key=lambda i: abs(sw["lambdas"][i] - lmbda))
    return sw["ppl"][ki][ti][li]


def test_wikitext2_tiny_runs_every_stage(wt2):
    work, res, _ = wt2
    assert set(STAGES) <= set(res["stages"])
    for split in ("valid", "test"):  # the printed perplexity is 2 ** the printed loss (4 decimals)
        base = res["baseline"][split]
        assert base["ppl"] == pytest.approx(2 ** base["loss"], rel=1e-3)
    # The sweep's λ = 0 column is the baseline run.
    assert res["sweep_valid"]["faiss"]["base"]["ppl"] == pytest.approx(res["baseline"]["valid"]["ppl"], rel=1e-3)
    ds = Datastore(str(work / "dstore"))
    assert ds.size == res["dstore"]["size"] > 0
    assert res["index"]["ivfpq"]["factory"] == "IVF128,PQ16"
    assert res["index"]["ivfpq"]["recall"]["recall@1"] > 0
    assert res["index"]["flat"]["factory"] == "Flat"


def test_wikitext2_settings_chosen_on_valid_then_confirmed_on_test(wt2):
    _, res, _ = wt2
    for sim in ("faiss", "l2"):
        chosen = res["chosen"][sim]
        valid = res["sweep_valid"][sim]
        # λ = 0 (the base LM) is in the grid, so the chosen setting is never worse on valid.
        assert chosen["ppl"] <= valid["base"]["ppl"] + 1e-9
        assert chosen["ppl"] == pytest.approx(min(min(row) for row in valid["ppl"][valid["ks"].index(chosen["k"])]))
        # The test run uses exactly the valid-chosen setting, and the offline sweep of its
        # saved neighbours reproduces its printed loss (4 decimals).
        test = res["knn_test"][sim]
        assert (test["k"], test["knn_temp"], test["lmbda"]) == (chosen["k"], chosen["knn_temp"], chosen["lmbda"])
        offline = swept(res["sweep_test"][sim], test["k"], test["knn_temp"], test["lmbda"])
        assert abs(math.log2(offline) - test["loss"]) < 2e-4
        # The sweep's λ = 0 is the plain fairseq-eval-lm baseline.
        assert res["sweep_test"][sim]["base"]["loss"] == pytest.approx(res["baseline"]["test"]["loss"], abs=2e-4)


def test_wikitext2_datastore_size_uses_prefixes_of_train(wt2):
    work, res, _ = wt2
    full = Datastore(str(work / "dstore"))
    for tag, frac in (("p10", 0.1), ("p30", 0.3)):
        entry = res["dstore_size"][tag]
        sub = Datastore(str(work / f"dstore-{tag}"))
        assert sub.size == entry["size"] == round(frac * full.size)
        np.testing.assert_array_equal(np.asarray(sub.vals), np.asarray(full.vals[: sub.size]))
        np.testing.assert_array_equal(np.asarray(sub.keys[-5:]), np.asarray(full.keys[sub.size - 5 : sub.size]))
        assert sub.meta["prefix_fraction"] == frac
        assert entry["run"]["dstore"] == f"dstore-{tag}"  # relative to the work directory


def test_wikitext2_report_tables_and_plots(wt2):
    work, res, out = wt2
    report = work / "report"
    md = (report / "results.md").read_text()
    for title in ("base LM vs kNN-LM", "Continuous cache", "Perplexity vs k", "Perplexity vs λ",
                  "Perplexity vs temperature", "Perplexity vs datastore size", "Exact vs approximate",
                  "Wall time of every stage", "## Training"):
        assert title in md
    assert "not run" not in md
    # the training section reads fairseq-train's own log
    log = (work / "train.log").read_text()
    updates = max(map(int, re.findall(r"num_updates[= ](\d+)", log)))
    assert f"ran {updates:,} updates" in md
    for png in ("ppl_vs_k", "ppl_vs_lambda", "ppl_vs_temperature", "ppl_vs_dstore_size", "training"):
        assert (report / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((report / "results.json").read_text())["chosen"] == res["chosen"]
    # Flat (exact) and IVF-PQ were compared on the same subset of valid.
    sub = res["subset"]
    assert {"baseline", "ivfpq-faiss", "ivfpq-l2", "flat"} <= set(sub)
    assert sub["flat"]["run"]["index"].endswith("flat.index")
    # The run ends with the headline table, from results.json, and where everything is.
    tail = out[out.rindex("kNN-LM on WikiText-2 (tiny run)"):].splitlines()
    f2 = "{:.2f}".format
    assert tail[2].split()[-2:] == [f2(res["baseline"]["valid"]["ppl"]), f2(res["baseline"]["test"]["ppl"])]
    assert tail[3].split()[-2:] == [f2(res["chosen"]["faiss"]["ppl"]), f2(res["knn_test"]["faiss"]["ppl"])]
    both = res["cache"]["table"]["both"]
    assert "continuous cache" in tail[-4] and tail[-4].split()[-2:] == [f2(both["valid"]), f2(both["test"])]
    assert tail[-3].endswith("report/results.md") and "ppl_vs_k.png" in tail[-2]
    assert tail[-1].endswith("results.json")
    # No result file records an absolute path of this machine: paths are relative to the work directory.
    def strings(x):
        if isinstance(x, dict):
            x = list(x.values())
        if isinstance(x, list):
            return [s for v in x for s in strings(v)]
        return [x] if isinstance(x, str) else []

    for name in ("results.json", "report/results.json"):
        words = [w for s in strings(json.loads((work / name).read_text())) for w in s.split()]
        assert not [w for w in words if w.startswith("/")], name
        assert "data-bin" in words and "--user-dir" in words  # the commands are there, relative
    assert str(work) not in md


def test_wikitext2_continuous_cache_chosen_on_valid(wt2):
    _, res, _ = wt2
    cache = res["cache"]
    table, chosen = cache["table"], res["chosen"]["faiss"]
    # The cache sweep's λ and λc = 0 slices are the base LM and the kNN-LM chosen before.
    assert table["base"]["valid"] == pytest.approx(res["sweep_valid"]["faiss"]["base"]["ppl"])
    assert table["knn"]["valid"] == pytest.approx(chosen["ppl"])
    assert table["knn"]["test"] == pytest.approx(res["knn_test"]["faiss"]["ppl"], abs=0.006)
    assert table["both"]["valid"] <= min(table["knn"]["valid"], table["cache"]["valid"])
    # The test run at the setting chosen on valid prints what the offline sweep of its keys gives.
    run = cache["test_run"]
    assert (run["lmbda"], run["cache_lmbda"]) == (table["both"]["setting"]["lmbda"],
                                                  table["both"]["setting"]["cache_lmbda"])
    assert abs(math.log2(table["both"]["test"]) - run["loss"]) < 2e-4


def test_wikitext2_key_types_each_with_own_store_index_and_setting(wt2):
    work, res, _ = wt2
    kt = res["keytypes"]
    main, other = kt["last_ffn_input"], kt["last_layer_output"]
    assert main["chosen"] == res["chosen"]["faiss"] and main["test"] == res["knn_test"]["faiss"]
    ds = Datastore(str(work / "dstore-last_layer_output"))
    assert ds.meta["keytype"] == "last_layer_output" and Datastore(str(work / "dstore")).meta["keytype"] == "last_ffn_input"
    assert ds.size == res["dstore"]["size"] == other["dstore"]["size"]
    assert np.array_equal(ds.vals[:], Datastore(str(work / "dstore")).vals[:])  # same targets, other keys
    assert not np.array_equal(ds.keys[:100], Datastore(str(work / "dstore")).keys[:100])
    assert other["index"]["ntotal"] == ds.size
    # Its own T and λ, chosen on valid (λ = 0 is in the grid), then run on test at that setting.
    sw, c = other["sweep"], other["chosen"]
    assert c["ppl"] == pytest.approx(min(min(row) for row in sw["ppl"][sw["ks"].index(c["k"])]))
    assert c["ppl"] <= sw["base"]["ppl"] + 1e-9
    assert (other["test"]["lmbda"], other["test"]["knn_temp"]) == (c["lmbda"], c["knn_temp"])
    assert "--knn-keytype last_layer_output" in res["commands"]["knn-test-faiss-last_layer_output"]
    md = (work / "report" / "results.md").read_text()
    assert "## Which hidden state is the key" in md and f"| {other['test']['ppl']:.2f} |" in md


def test_wikitext2_rerun_reuses_the_work_directory(wt2):
    work, res, _ = wt2
    out = run_wikitext2(work).stdout
    for stage in STAGES[:-1]:
        assert f"stage {stage}: outputs complete, skipped" in out
    assert "$ fairseq-" not in out
    assert json.loads((work / "results.json").read_text())["chosen"] == res["chosen"]


PPL_ROW = re.compile(r"^\| (base LM|kNN-LM[^|]*) \|[^|]*\|[^|]*\| ([0-9.]+) \| ([0-9.]+) \|$", re.M)


def test_wikitext103_recipe_tiny(tmp_path):
    work = tmp_path / "wt103"
    cmd = ["bash", WT103 / "run.sh", "--tiny", "--num-shards", "2", "--workdir", work]
    out = run(cmd, env={"WIKITEXT2_DIR": str(WIKITEXT2)}).stdout
    rows = PPL_ROW.findall((work / "results.md").read_text())
    assert [r[0] for r in rows] == ["base LM", "kNN-LM, faiss (approximate) distances",
                                   "kNN-LM, l2 (exact) distances"], out[-3000:]
    # Each cell is the perplexity its own fairseq-eval-lm run printed.
    for (_, dev, test), run_name in zip(rows, ("base", "knnlm-faiss", "knnlm-l2")):
        for split, cell in (("valid", dev), ("test", test)):
            assert cell == perplexity_line((work / "logs" / f"{run_name}-{split}.log").read_text())[1]
    # The kNN-LM (λ = 0.25) scores the text differently from the LM alone.
    assert rows[2][1:] != rows[0][1:]
    # The datastore was saved by two shard jobs with the paper's flags, fp16 keys.
    ds = Datastore(str(work / "dstore"))
    assert ds.meta["num_shards"] == 2 and ds.keys.dtype == np.float16
    assert "--context-window 64" in (work / "logs" / "dstore-shard0.log").read_text()
    meta = json.loads((work / "dstore" / "knn.index.meta.json").read_text())
    assert meta["factory"] == "IVF64,PQ16" and meta["ntotal"] == ds.size
    for split in ("valid", "test"):
        log = (work / "logs" / f"knnlm-l2-{split}.log").read_text()
        assert "--k 1024 --lmbda 0.25 --probe 32" in log and "--knn-sim-func l2" in log
    # A rerun finds every stage done and only rewrites the summary.
    again = run(cmd, env={"WIKITEXT2_DIR": str(WIKITEXT2)}).stdout
    assert "$ fairseq-" not in again and not re.search(r"\] stage ", again)


def test_run_demo_script_installs_then_runs_tiny_by_default():
    text = (ROOT / "scripts" / "run_demo.sh").read_text()
    # The install line comes before the command that runs the example (the last mention).
    assert text.index("bash scripts/install.sh") < text.rindex("examples/wikitext2/run.py")
    assert "mode=(--tiny)" in text
    run(["bash", "-n", ROOT / "scripts" / "run_demo.sh"])
    out = run([sys.executable, WT2 / "run.py", "--help"]).stdout
    assert "--tiny" in out and "--workdir" in out
