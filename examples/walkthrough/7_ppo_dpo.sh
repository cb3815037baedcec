#!/usr/bin/env bash
# Step 7, RLHF on one base model: PPO against the reward model, or DPO on the preference pairs.
# Real weights (one 4-bit base holds policy, reference and reward model):
#   llama2-mlx ppo weights/llama-2-7b-chat-4bit --reward-model runs/rm --prompts my_prompts.jsonl --out runs/ppo \
#       --iters 200 --batch-size 64 --minibatch-size 16 --max-tokens 256
#   llama2-mlx dpo weights/llama-2-7b-chat-4bit --data my_prefs.jsonl --out runs/dpo --beta 0.1 --lr 1e-5
#   llama2-mlx chat weights/llama-2-7b-chat-4bit --adapter runs/ppo
# Here: the demo model, the reward model and world of step 5.
source "$(dirname "$0")/common.sh"
[[ -d "$WORK/rm" ]] || bash "$(dirname "$0")/5_reward_model.sh"
head -32 "$WORK/world/prompts.jsonl" > "$WORK/prompts.jsonl"
rm -rf "$WORK/ppo" "$WORK/dpo"
$L2 ppo weights/demo --reward-model "$WORK/rm" --prompts "$WORK/prompts.jsonl" --out "$WORK/ppo" \
    --iters 4 --batch-size 16 --minibatch-size 8 --max-tokens 40 --lr 1e-4 --no-progress
$L2 dpo weights/demo --data "$WORK/world/preferences" --out "$WORK/dpo" --iters 20 --batch-size 16 \
    --lr 5e-4 --seq-len 256 --no-progress
$L2 generate weights/demo --adapter "$WORK/dpo" --prompt "What is 3 + 4?" --temperature 0
