"""The Books corpus rebuilt from Project Gutenberg, for machines without a copy of it.

    python examples/books/gutenberg.py MANIFEST OUT_DIR

Downloads each ebook of MANIFEST (examples/books/manifest.json: ebook, split,
words, in file order) from gutenberg.org, cuts Project Gutenberg's licence
header and footer, drops blank lines at each book's start and end, and writes
OUT_DIR/{train,valid,test}.txt with the books of each split in manifest order,
one blank line between books.  Gutenberg's current files may differ slightly
from the snapshot the manifest's word counts describe; the counts are reported.
"""

import json
import re
import sys
import urllib.request
from pathlib import Path

URL = "https://www.gutenberg.org/cache/epub/{ebook}/pg{ebook}.txt"
START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M | re.I)
END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK|End of (the )?Project Gutenberg).*$",
                 re.M | re.I)
SPLITS = ("train", "valid", "test")


def strip_gutenberg(text):
    """The book between Gutenberg's START and END lines, without blank lines around it."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    start = START.search(text)
    if start:
        text = text[start.end():]
    end = END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n") + "\n"


def download(manifest, out_dir, timeout=60):
    """OUT_DIR/{split}.txt from the manifest's ebooks; returns {ebook: words} as downloaded."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    books = json.loads(Path(manifest).read_text())
    texts, words = {s: [] for s in SPLITS}, {}
    for book in books:
        url = URL.format(ebook=book["ebook"])
        print(f"downloading {url}", flush=True)
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = strip_gutenberg(r.read().decode("utf-8"))
        texts[book["split"]].append(text)
        words[book["ebook"]] = len(text.split())
    for split in SPLITS:
        (out_dir / f"{split}.txt").write_text("\n".join(texts[split]), encoding="utf-8")
    return words


if __name__ == "__main__":
    got = download(*sys.argv[1:3])
    print(json.dumps(got))
