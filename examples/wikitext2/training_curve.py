"""The training run's curve and speed, read from fairseq-train's log (``--log-format simple``).

    python examples/wikitext2/training_curve.py WORK/train.log [OUT.png]
"""

import json
import re
import statistics
import sys
from pathlib import Path

TRAIN_RE = re.compile(r"train_inner \| epoch (\d+):.*?loss=([0-9.]+).*?wps=([0-9.]+).*?num_updates=(\d+).*?wall=(\d+)")
VALID_RE = re.compile(r"\| valid \| epoch (\d+) \|.*?\| loss ([0-9.]+) \| ppl ([0-9.]+).*?\| num_updates (\d+)")
DONE_RE = re.compile(r"done training in ([0-9.]+) seconds")


def parse(text: str) -> dict:
    """Training loss (base 2) and tokens/s every log interval, valid loss at every validation."""
    train = [dict(epoch=int(e), loss=float(l), wps=float(w), updates=int(u), wall=int(s))
             for e, l, w, u, s in TRAIN_RE.findall(text)]
    valid = [dict(epoch=int(e), loss=float(l), ppl=float(p), updates=int(u)) for e, l, p, u in VALID_RE.findall(text)]
    done = DONE_RE.search(text)
    return dict(train=train, valid=valid, seconds=float(done.group(1)) if done else None)


def summary(curve: dict) -> dict:
    train, valid = curve["train"], curve["valid"]
    best = min(valid, key=lambda v: v["loss"]) if valid else None
    points = train + valid
    return dict(
        updates=max((p["updates"] for p in points), default=0),
        epochs=max((p["epoch"] for p in points), default=0),
        median_tokens_per_s=round(statistics.median(t["wps"] for t in train)) if train else None,
        seconds=curve["seconds"],
        best_valid_ppl=best["ppl"] if best else None,  # fairseq's, over its own valid blocks
        best_valid_updates=best["updates"] if best else None,
    )


def plot(curve: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([t["updates"] for t in curve["train"]], [t["loss"] for t in curve["train"]], label="train loss")
    ax.plot([v["updates"] for v in curve["valid"]], [v["loss"] for v in curve["valid"]], "o-", label="valid loss")
    ax.set(xlabel="updates (4,096 tokens each)", ylabel="loss (base 2)", ylim=(None, 12),
           title="WikiText-2 LM: fairseq-train on 2 CPU cores")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    log = Path(sys.argv[1])
    curve = parse(log.read_text())
    print(json.dumps(summary(curve)))
    if len(sys.argv) > 2:
        plot(curve, sys.argv[2])
