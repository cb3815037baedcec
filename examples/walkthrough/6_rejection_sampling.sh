#!/usr/bin/env bash
# Step 6, rejection-sampling fine-tuning: K answers per prompt, the RM keeps the best, LoRA SFT on them, repeat.
# Real weights:
#   llama2-mlx rejection-sample weights/llama-2-7b-chat-4bit --reward-model runs/rm --prompts my_prompts.jsonl \
#       --out runs/rs --k 8 --iterations 2 --temperature 1.2 --lr 1e-4 --batch-size 16 --seq-len 2048
#   llama2-mlx chat weights/llama-2-7b-chat-4bit --adapter runs/rs/iter-2/adapter
# Here: the demo model, the reward model of step 5, 32 of the world's prompts.
source "$(dirname "$0")/common.sh"
[[ -d "$WORK/rm" ]] || bash "$(dirname "$0")/5_reward_model.sh"
head -32 "$WORK/world/prompts.jsonl" > "$WORK/prompts.jsonl"
rm -rf "$WORK/rs"
$L2 rejection-sample weights/demo --reward-model "$WORK/rm" --prompts "$WORK/prompts.jsonl" --out "$WORK/rs" \
    --k 4 --iterations 2 --temperature 0.8,1.2 --max-tokens 40 --iters 10 --batch-size 16 --lr 5e-4 \
    --seq-len 256 --no-progress
cat "$WORK/rs/report.md"
