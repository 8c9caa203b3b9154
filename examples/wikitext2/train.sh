#!/usr/bin/env bash
# Train the CPU-scale WikiText-2 LM: a pre-norm 4-layer 256-d transformer with
# adaptive input and adaptive softmax (the paper's architecture family, shrunk),
# for a fixed wall-clock budget (40 minutes by default).  Resumes from
# SAVE_DIR/checkpoint_last.pt.  256-token blocks, light dropout and a higher
# peak learning rate suit a budget of ~4 epochs; checkpoints and validation at
# epoch ends only, since each validation costs training time (see README.md).
# usage: train.sh DATA_BIN SAVE_DIR [HOURS]
set -euo pipefail
DATA_BIN=$1; SAVE_DIR=$2; HOURS=${3:-0.66}
fairseq-train "$DATA_BIN" --task language_modeling \
  --arch transformer_lm --decoder-layers 4 --decoder-embed-dim 256 --decoder-ffn-embed-dim 1024 \
  --decoder-attention-heads 4 --decoder-normalize-before \
  --decoder-input-dim 256 --decoder-output-dim 256 \
  --adaptive-input --adaptive-input-cutoff 4000,16000 --adaptive-input-factor 4 \
  --adaptive-softmax-cutoff 4000,16000 --adaptive-softmax-factor 4 --tie-adaptive-weights \
  --adaptive-softmax-dropout 0.1 --dropout 0.1 --attention-dropout 0.1 \
  --criterion adaptive_loss --ddp-backend legacy_ddp \
  --tokens-per-sample 256 --sample-break-mode none --max-tokens 4096 \
  --optimizer adam --adam-betas '(0.9, 0.98)' --weight-decay 0.01 --clip-norm 0.5 \
  --lr 0.002 --lr-scheduler inverse_sqrt --warmup-updates 400 --warmup-init-lr 1e-07 \
  --max-epoch 30 --stop-time-hours "$HOURS" --cpu --num-workers 0 --seed 1 \
  --save-dir "$SAVE_DIR" --no-epoch-checkpoints --save-interval-updates 0 \
  --log-format simple --log-interval 50
