#!/usr/bin/env bash
# The main job: installs what it needs, then runs kNN-LM on WikiText-2 end to end
# (preprocess -> train an LM -> datastore -> FAISS indexes -> baseline vs kNN-LM, and the
# continuous cache). It ends by printing the headline table (valid and test perplexities, from
# WORKDIR/results.json) and where the report (results.md) and the plots are.
#
#   bash scripts/run_demo.sh          # --tiny (default): a small slice and a small model,
#                                     #   a few minutes on 2 CPU cores
#   bash scripts/run_demo.sh --full   # the CPU-scale reproduction of examples/wikitext2/README.md
#
# Other arguments go to examples/wikitext2/run.py, e.g. --data DIR (WikiText-2; default
# ../shared/data/wikitext-2 if present, else the official archive is downloaded) or
# --workdir DIR (default examples/wikitext2/work[-tiny]; a rerun skips finished stages).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=(--tiny)
args=()
for a in "$@"; do
  case $a in
    --full) mode=() ;;
    --tiny) mode=(--tiny) ;;
    *) args+=("$a") ;;
  esac
done
bash scripts/install.sh
exec "${PYTHON:-python3}" examples/wikitext2/run.py "${mode[@]}" "${args[@]}"
