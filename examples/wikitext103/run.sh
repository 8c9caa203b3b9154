#!/usr/bin/env bash
# kNN-LM on WikiText-103: the paper's recipe (Khandelwal et al., ICLR 2020), end to end.
#
#   bash examples/wikitext103/run.sh [--workdir DIR] [--pretrained] [--data DIR] [--num-shards N]
#                                    [--gpu | --cpu] [--fp16] [--stages LIST] [--tiny]
#
# Stages (each skipped when its outputs are complete, so a rerun continues):
#   prepare  download wikitext-103-v1.zip (or use --data DIR) and binarize it
#            (with the pretrained model's dict.txt when --pretrained)
#   model    train transformer_lm_wiki103 with fairseq's adaptive-input recipe, or
#            (--pretrained) download fairseq's adaptive_lm_wiki103.v2 checkpoint
#   dstore   save the datastore of train: --tokens-per-sample 3072 --context-window 1536
#            --dstore-fp16 (--num-shards N: N jobs, one per GPU)
#   index    fairseq-knnlm-build-index IVF4096,PQ64 trained on 1M keys (on GPUs if any)
#   eval     valid and test: base LM, kNN-LM with faiss distances, kNN-LM with l2
#            (exact) distances; --context-window 2560 --k 1024 --lmbda 0.25 --probe 32
#   summary  WORKDIR/results.md: our numbers beside the paper's
#
# --tiny runs the same stages on a slice of WikiText-2 standing in for WikiText-103,
# with a tiny model and small blocks, on a CPU in a few minutes (the tests run it).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

TINY=0; PRETRAINED=0; WORK=""; DATA=""; NUM_SHARDS=1; DEVICE=auto; FP16=0
STAGES="prepare,model,dstore,index,eval,summary"
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --tiny) TINY=1 ;;
    --pretrained) PRETRAINED=1 ;;
    --workdir) WORK=$2; shift ;;
    --data) DATA=$2; shift ;;
    --num-shards) NUM_SHARDS=$2; shift ;;
    --gpu) DEVICE=gpu ;;
    --cpu) DEVICE=cpu ;;
    --fp16) FP16=1 ;;
    --stages) STAGES=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$WORK" ] || WORK="$HERE/work$([ $TINY = 1 ] && echo -tiny)"
mkdir -p "$WORK/logs"
WORK=$(cd "$WORK" && pwd)
LOGS=$WORK/logs
KNNLM=$(python -c "import fairseq_knnlm, os; print(os.path.dirname(fairseq_knnlm.__file__))")
log() { echo "[$(date +%H:%M:%S)] $*"; }
has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
# run LOGNAME CMD...: print the command, run it with its output in logs/LOGNAME.log
run() {
  local name=$1; shift
  log "\$ $*"
  { echo "\$ $*"; "$@"; } > "$LOGS/$name.log" 2>&1 || { tail -40 "$LOGS/$name.log" >&2; echo "failed: see $LOGS/$name.log" >&2; exit 1; }
}

# ------------------------------------------------------------------ settings
if [ $TINY = 1 ]; then
  # A slice of WikiText-2 (same valid/test articles as WikiText-103) and a tiny model.
  TPS=128; DSTORE_CW=64; EVAL_CW=96; MAX_TOKENS=2048
  FACTORY="IVF64,PQ16"; TRAIN_SIZE=1000000; RECALL=200
  [ $DEVICE = auto ] && DEVICE=cpu
else
  # The paper: datastore with 3072-token blocks and 1536 tokens of context,
  # evaluation with 2560 tokens of context; IVF4096,PQ64 trained on 1M keys.
  TPS=3072; DSTORE_CW=1536; EVAL_CW=2560; MAX_TOKENS=3072
  FACTORY="IVF4096,PQ64"; TRAIN_SIZE=1000000; RECALL=1000
fi
K=1024; LMBDA=0.25; PROBE=32; KNN_TEMP=1
if [ $DEVICE = auto ]; then
  DEVICE=$(python -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
fi
DEV_FLAGS=(); INDEX_GPU=(); KNN_GPU=()
if [ $DEVICE = cpu ]; then
  DEV_FLAGS=(--cpu)
else
  if python -c "import faiss, sys; sys.exit(0 if hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0 else 1)"; then
    INDEX_GPU=(--gpu); KNN_GPU=(--knn-gpu)
  else
    log "faiss has no GPU support here: building and searching the index on the CPU (FAISS=gpu bash scripts/install.sh)"
  fi
fi
[ $FP16 = 1 ] && DEV_FLAGS+=(--fp16)
NGPU=$([ $DEVICE = gpu ] && python -c "import torch; print(torch.cuda.device_count())" || echo 1)

DATA_BIN=$WORK/data-bin
CKPT_DIR=$WORK/checkpoints
CKPT=$CKPT_DIR/checkpoint_best.pt
DSTORE=$WORK/dstore
INDEX=$DSTORE/knn.index
PRETRAINED_URL=https://dl.fbaipublicfiles.com/fairseq/models/lm/adaptive_lm_wiki103.v2.tar.bz2
WT103_URLS=(https://wikitext.smerity.com/wikitext-103-v1.zip
            https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip)
WIKITEXT2_DIR=${WIKITEXT2_DIR:-$ROOT/../shared/data/wikitext-2}

download() {  # download URL FILE
  python - "$1" "$2" <<'EOF'
import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2] + ".part", "wb") as f:
    shutil.copyfileobj(r, f, 1 << 24)
shutil.move(sys.argv[2] + ".part", sys.argv[2])
EOF
}

# ----------------------------------------------------------- model download
fetch_pretrained() {
  [ -f "$WORK/pretrained/model.pt" ] && return
  mkdir -p "$WORK/pretrained"
  log "downloading $PRETRAINED_URL"
  download "$PRETRAINED_URL" "$WORK/pretrained/model.tar.bz2"
  tar -xjf "$WORK/pretrained/model.tar.bz2" -C "$WORK/pretrained"
  local pt dict
  pt=$(find "$WORK/pretrained" -name model.pt | head -1); dict=$(find "$WORK/pretrained" -name dict.txt | head -1)
  [ -n "$pt" ] && [ -n "$dict" ] || { echo "no model.pt/dict.txt in $PRETRAINED_URL" >&2; exit 1; }
  [ "$pt" = "$WORK/pretrained/model.pt" ] || mv "$pt" "$WORK/pretrained/model.pt"
  [ "$dict" = "$WORK/pretrained/dict.txt" ] || mv "$dict" "$WORK/pretrained/dict.txt"
  rm -f "$WORK/pretrained/model.tar.bz2"
}

# ----------------------------------------------------------------- prepare
if has_stage prepare && [ ! -f "$DATA_BIN/test.bin" ]; then
  log "stage prepare"
  RAW=$WORK/raw; mkdir -p "$RAW"
  if [ $TINY = 1 ]; then
    for split in train:400000 valid:40000 test:40000; do
      s=${split%%:*}; n=${split##*:}
      python - "$WIKITEXT2_DIR/$s.txt" "$RAW/wiki.$s.tokens" "$n" <<'EOF'
import sys
text = open(sys.argv[1], "rb").read()[: int(sys.argv[3])]
open(sys.argv[2], "wb").write(text[: text.rfind(b"\n") + 1])
EOF
    done
  elif [ -n "$DATA" ]; then
    RAW=$DATA
  elif [ ! -f "$RAW/wikitext-103/wiki.test.tokens" ]; then
    for url in "${WT103_URLS[@]}"; do
      log "downloading $url"
      download "$url" "$RAW/wikitext-103-v1.zip" && break || log "  failed"
    done
    [ -f "$RAW/wikitext-103-v1.zip" ] || { echo "could not download wikitext-103-v1.zip; pass --data DIR" >&2; exit 1; }
    python -c "import zipfile, sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$RAW/wikitext-103-v1.zip" "$RAW"
    RAW=$RAW/wikitext-103
  else
    RAW=$RAW/wikitext-103
  fi
  DICT=()
  if [ $PRETRAINED = 1 ]; then fetch_pretrained; DICT=(--srcdict "$WORK/pretrained/dict.txt"); fi
  rm -rf "$DATA_BIN"
  run preprocess fairseq-preprocess --only-source "${DICT[@]}" \
    --trainpref "$RAW/wiki.train.tokens" --validpref "$RAW/wiki.valid.tokens" --testpref "$RAW/wiki.test.tokens" \
    --destdir "$DATA_BIN" --workers "$(nproc)"
fi

# ------------------------------------------------------------------- model
if has_stage model && [ ! -f "$CKPT" ]; then
  log "stage model"
  if [ $PRETRAINED = 1 ]; then
    fetch_pretrained
    mkdir -p "$CKPT_DIR"; ln -sf "$WORK/pretrained/model.pt" "$CKPT"
  elif [ $TINY = 1 ]; then
    # fairseq's adaptive-input recipe with a tiny model and a short schedule.
    run train fairseq-train --task language_modeling "$DATA_BIN" --save-dir "$CKPT_DIR" \
      --arch transformer_lm --decoder-layers 2 --decoder-embed-dim 64 --decoder-ffn-embed-dim 256 \
      --decoder-attention-heads 2 --decoder-normalize-before --decoder-input-dim 64 --decoder-output-dim 64 \
      --adaptive-input --adaptive-input-cutoff 2000,6000 --adaptive-softmax-cutoff 2000,6000 --tie-adaptive-weights \
      --max-update 120 --lr 1.0 --t-mult 2 --lr-period-updates 110 --lr-scheduler cosine --lr-shrink 0.75 \
      --warmup-updates 10 --warmup-init-lr 1e-07 --stop-min-lr 1e-09 --optimizer nag --min-lr 0.0001 --clip-norm 0.1 \
      --criterion adaptive_loss --max-tokens 2048 --update-freq 1 --tokens-per-sample $TPS --seed 1 \
      --sample-break-mode none --skip-invalid-size-inputs-valid-test --ddp-backend=legacy_ddp \
      --no-epoch-checkpoints --num-workers 0 --log-format simple "${DEV_FLAGS[@]}"
  else
    # fairseq examples/language_model/README.adaptive_inputs.md, for 8 GPUs; on G GPUs
    # --update-freq 24/G keeps the batch (8 x 3 x 3072 tokens).
    run train fairseq-train --task language_modeling "$DATA_BIN" --save-dir "$CKPT_DIR" \
      --arch transformer_lm_wiki103 \
      --max-update 286000 --lr 1.0 --t-mult 2 --lr-period-updates 270000 --lr-scheduler cosine --lr-shrink 0.75 \
      --warmup-updates 16000 --warmup-init-lr 1e-07 --stop-min-lr 1e-09 --optimizer nag --min-lr 0.0001 --clip-norm 0.1 \
      --criterion adaptive_loss --max-tokens 3072 --update-freq $(( NGPU >= 24 ? 1 : 24 / NGPU )) \
      --tokens-per-sample 3072 --seed 1 \
      --sample-break-mode none --skip-invalid-size-inputs-valid-test --ddp-backend=legacy_ddp "${DEV_FLAGS[@]}"
  fi
fi

# ------------------------------------------------------------------ dstore
EVAL_COMMON=(--path "$CKPT" --user-dir "$KNNLM" --task knnlm_language_modeling --max-tokens $MAX_TOKENS
             --softmax-batch 1024 --num-workers 0 --log-format simple --log-interval 100 "${DEV_FLAGS[@]}")
dstore_done() { python -c "from fairseq_knnlm.storage.datastore import Datastore; Datastore('$DSTORE')" 2>/dev/null; }
if has_stage dstore && ! dstore_done; then
  log "stage dstore"
  DSTORE_ARGS=("$DATA_BIN" "${EVAL_COMMON[@]}" --gen-subset train --tokens-per-sample $TPS
               --context-window $DSTORE_CW --sample-break-mode none
               --save-knnlm-dstore --dstore "$DSTORE" --dstore-fp16 --knn-keytype last_ffn_input --dstore-overwrite)
  if [ "$NUM_SHARDS" -gt 1 ]; then
    # N independent jobs, one per GPU: shard i writes DSTORE/shard-00i-of-00N/.
    pids=()
    for ((i = 0; i < NUM_SHARDS; i++)); do
      line="CUDA_VISIBLE_DEVICES=$(( i % NGPU )) fairseq-eval-lm ${DSTORE_ARGS[*]} --num-shards $NUM_SHARDS --shard-id $i"
      log "\$ $line"
      { echo "\$ $line"
        CUDA_VISIBLE_DEVICES=$(( i % NGPU )) fairseq-eval-lm "${DSTORE_ARGS[@]}" --num-shards "$NUM_SHARDS" --shard-id $i
      } > "$LOGS/dstore-shard$i.log" 2>&1 &
      pids+=($!)
    done
    for i in "${!pids[@]}"; do
      wait "${pids[$i]}" || { tail -40 "$LOGS/dstore-shard$i.log" >&2; exit 1; }
    done
  else
    run dstore fairseq-eval-lm "${DSTORE_ARGS[@]}"
  fi
fi

# ------------------------------------------------------------------- index
if has_stage index && [ ! -f "$INDEX.meta.json" ]; then
  log "stage index"
  run index fairseq-knnlm-build-index --dstore "$DSTORE" --output "$INDEX" --index-factory "$FACTORY" \
    --train-size $TRAIN_SIZE --eval-recall $RECALL --nprobe $PROBE "${INDEX_GPU[@]}"
fi

# -------------------------------------------------------------------- eval
ppl_of() { grep -o "Perplexity: [0-9.]*" "$LOGS/$1.log" 2>/dev/null | tail -1 | cut -d' ' -f2; }
if has_stage eval; then
  for split in valid test; do
    EVAL_ARGS=("$DATA_BIN" "${EVAL_COMMON[@]}" --gen-subset $split --tokens-per-sample $TPS
               --context-window $EVAL_CW --sample-break-mode complete)
    [ -n "$(ppl_of base-$split)" ] || run base-$split fairseq-eval-lm "${EVAL_ARGS[@]}"
    for sim in faiss l2; do
      [ -n "$(ppl_of knnlm-$sim-$split)" ] || run knnlm-$sim-$split fairseq-eval-lm "${EVAL_ARGS[@]}" \
        --knnlm --dstore "$DSTORE" --knn-index "$INDEX" --k $K --lmbda $LMBDA --probe $PROBE \
        --knn-temp $KNN_TEMP --knn-sim-func $sim "${KNN_GPU[@]}"
    done
  done
fi

# ----------------------------------------------------------------- summary
if has_stage summary; then
  {
    echo "# kNN-LM on WikiText-103$([ $TINY = 1 ] && echo ' (--tiny: a WikiText-2 slice and a tiny model)')"
    echo
    echo "k $K, λ $LMBDA, T $KNN_TEMP, nprobe $PROBE, index $FACTORY, eval --tokens-per-sample $TPS --context-window $EVAL_CW"
    echo
    echo "| model | paper dev | paper test | ours dev | ours test |"
    echo "|---|---|---|---|---|"
    echo "| base LM | 17.96 | 18.65 | $(ppl_of base-valid) | $(ppl_of base-test) |"
    echo "| kNN-LM, faiss (approximate) distances | 16.5 | – | $(ppl_of knnlm-faiss-valid) | $(ppl_of knnlm-faiss-test) |"
    echo "| kNN-LM, l2 (exact) distances | 16.06 | 16.12 | $(ppl_of knnlm-l2-valid) | $(ppl_of knnlm-l2-test) |"
  } > "$WORK/results.md"
  cat "$WORK/results.md"
fi
