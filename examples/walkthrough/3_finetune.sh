#!/usr/bin/env bash
# Step 3, fine-tune with LoRA on your own jsonl. Real weights (QLoRA on the 4-bit model):
#   llama2-mlx sft weights/llama-2-7b-chat-4bit --data my_data.jsonl --out runs/my-adapter --lr 1e-4 --pack \
#       --seq-len 2048 --batch-size 8 --iters 600
# Here: a few LoRA steps on the demo model with the example dialogs.
source "$(dirname "$0")/common.sh"
rm -rf "$WORK/adapter"
$L2 sft weights/demo --data examples/data/sft_messages.jsonl --out "$WORK/adapter" \
    --lr 1e-3 --batch-size 4 --seq-len 256 --iters 20 --rank 8 --targets q,k,v,o --pack
$L2 generate weights/demo --adapter "$WORK/adapter" --prompt "What is 3 + 4?" --temperature 0
