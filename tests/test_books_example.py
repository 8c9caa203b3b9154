"""examples/books: the shared vocabulary, the per-word perplexity, and --tiny end to end."""

import json
import math
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run

BOOKS = ROOT / "examples" / "books"


def load_books_example():
    """examples/books/run.py under its own name (other tests import examples/wikitext2's run.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("books_run", BOOKS / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


books = load_books_example()


# ------------------------------------------------------------ hand-checkable
def test_words_and_per_word_perplexity_by_hand(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The cat, sat.\n\nOn  the mat\n", encoding="utf-8")
    assert books.line_counts(text) == (6, 3)
    assert books.count_words(text) == 9  # 3 + 0 + 3 words, 3 ends of line
    # 12 subword tokens at perplexity 4 per token: NLL = 12 ln 4 over 9 words -> 4 ** (12 / 9).
    assert books.per_word(4.0, 12, 9) == pytest.approx(4 ** (12 / 9), rel=1e-12)
    assert books.per_word(7.5, 9, 9) == pytest.approx(7.5)
    # The printed loss (4 decimals) is the more exact below perplexity ~144, the printed perplexity above.
    assert books.exact_log2_ppl(5.1234, 34.87) == 5.1234
    assert books.exact_log2_ppl(8.9999, 512.04) == math.log2(512.04)


def test_whole_books_and_heads(tmp_path):
    manifest = [dict(split="train", words=w) for w in (10, 30, 25, 35)] + [dict(split="valid", words=99)]
    assert books.whole_books(manifest, 1 / 8) == (1, 10)   # 12.5 of 100: one book (10) is closest
    assert books.whole_books(manifest, 0.5) == (2, 40)
    src = tmp_path / "s.txt"
    src.write_text("a b\nc d e\n\nf\n", encoding="utf-8")
    assert books.write_head_words(src, tmp_path / "h.txt", 3) == 5
    assert (tmp_path / "h.txt").read_text() == "a b\nc d e\n"


def test_shared_vocabulary_encodes_both_corpora_into_one_dictionary(tmp_path):
    import sentencepiece as spm

    corpora = {"a": "the whale swam far out to sea\n\nCall me Ishmael.\n",
               "b": "The Tower of London is a castle\n = Heading = \n"}
    for name, text in corpora.items():
        (tmp_path / f"{name}.txt").write_text(text * 50, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", model_prefix=str(tmp_path / "m"),
                                   vocab_size=30, model_type="unigram", character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    entries = books.spm_dictionary(sp)
    symbols = [e.split()[0] for e in entries]
    assert len(symbols) == sp.get_piece_size() - 3 == len(set(symbols))  # all but <unk>, <s>, </s>
    for name in corpora:
        books.encode_file(sp, tmp_path / f"{name}.txt", tmp_path / f"{name}.enc")
        raw = (tmp_path / f"{name}.txt").read_text().splitlines()
        enc = (tmp_path / f"{name}.enc").read_text().splitlines()
        assert len(raw) == len(enc)
        for r, e in zip(raw, enc):
            assert set(e.split()) <= set(symbols)
            assert "".join(e.split()).replace("\u2581", " ").split() == r.split()  # the same words


# ------------------------------------------------------------------ --tiny
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("books-tiny")
    run([sys.executable, BOOKS / "run.py", "--tiny", "--workdir", work, "--report-dir", work / "report"], cwd=ROOT)
    return work, json.loads((work / "results.json").read_text())


@pytest.mark.slow
def test_tiny_one_dictionary_and_counts_match_fairseq(tiny):
    work, res = tiny
    dicts = {c: (work / "data-bin" / c / "dict.txt").read_bytes() for c in ("books", "wiki", "eighth")}
    assert len(set(dicts.values())) == 1 and dicts["books"] == (work / "dict.txt").read_bytes()
    for name, rec in res["baseline"].items():
        corpus = name.split("@")[1]
        for split in ("valid", "test"):
            counts, r = res["data"]["counts"][corpus][split], rec[split]
            assert r["tokens"] == counts["tokens"]  # fairseq scores every subword and end of line
            # exp(total NLL / words) from fairseq's own loss (bits per token) and token count.
            assert r["ppl_per_word"] == pytest.approx(2 ** (r["loss"] * r["tokens"] / counts["words"]), rel=1e-3)
            assert r["ppl_per_word"] > r["ppl"]  # more subwords than words


@pytest.mark.slow
def test_tiny_results_structure_and_relations(tiny):
    work, res = tiny
    assert set(res["rows"]) == set(books.ROWS)
    assert str(work) not in json.dumps(res)  # no machine paths
    base = res["baseline"]
    for name, rec in res["rows"].items():
        lm, corpus = rec["lm"], rec["corpus"]
        t = rec["table"]
        for split in ("valid", "test"):
            # λ = 0 (no kNN, no cache) is the LM alone, as fairseq-eval-lm's plain task prints it.
            assert t["base"][split] == pytest.approx(base[f"{lm}@{corpus}"][split]["ppl"], abs=0.006)
            assert t["knn"][split] <= t["base"][split] + 1e-9 or split == "test"
        # Settings chosen on valid, used on test.
        assert rec["test_run"]["lmbda"] == t["both"]["setting"]["lmbda"]
        assert rec["test_run"]["knn_temp"] == rec["chosen"]["knn_temp"]
        assert t["knn"]["setting"]["lmbda"] == rec["chosen"]["lmbda"]
        assert t["base"]["setting"]["lmbda"] == 0 and t["base"]["setting"]["cache_lmbda"] == 0
        assert rec["lambda_curve"]["lambdas"][0] == 0
        assert min(rec["lambda_curve"]["ppl"]) == pytest.approx(rec["chosen"]["ppl"])
    sizes = [res["dstore"][f"books-by-eighth-x{m}"]["size"] for m in books.PREFIX_MULTIPLES]
    sizes.append(res["dstore"]["books-by-eighth"]["size"])
    assert sizes == sorted(set(sizes)) and len(sizes) >= 4  # increasing
    assert sizes[0] == res["data"]["counts"]["eighth"]["train"]["tokens"]  # the eighth LM's own data
    assert res["dstore"]["books-by-eighth"]["size"] == res["data"]["counts"]["books"]["train"]["tokens"]
    report = (work / "report" / "results.md").read_text()
    assert "Domain adaptation" in report and (work / "report" / "lambda.png").exists()
    assert (work / "report" / "dstore_size.png").exists()


@pytest.mark.slow
def test_tiny_rerun_skips_every_stage(tiny):
    work, _ = tiny
    proc = run([sys.executable, BOOKS / "run.py", "--tiny", "--workdir", work, "--report-dir", work / "report"],
               cwd=ROOT)
    assert "$ fairseq" not in proc.stdout
    assert proc.stdout.count("outputs complete, skipped") == len(books.STAGES) - 1
