#!/usr/bin/env bash
# Step 5, a reward model on your preference pairs (LoRA + a scalar head on the chat model; the paper's margin).
# Real weights (QLoRA on the 4-bit model; pairs as in README "Formats"):
#   llama2-mlx train-rm weights/llama-2-7b-chat-4bit --data my_prefs.jsonl --out runs/rm --margin large \
#       --batch-size 32 --seq-len 2048 --grad-checkpoint
#   llama2-mlx score runs/rm --data my_prefs_valid.jsonl          # accuracy per rating (the paper's Table 8)
# Here: the world's graded preference pairs on the demo model.
source "$(dirname "$0")/common.sh"
$L2 world --out "$WORK/world" --sizes corpus=10,corpus_valid=10,train=10,valid=10,preferences=800 --force
rm -rf "$WORK/rm"
$L2 train-rm weights/demo --data "$WORK/world/preferences" --out "$WORK/rm" --margin large \
    --batch-size 32 --lr 2e-3 --rank 16 --targets q,k,v,o,gate,up,down --seq-len 256 --no-progress
$L2 score "$WORK/rm" --data "$WORK/world/preferences/valid.jsonl"
