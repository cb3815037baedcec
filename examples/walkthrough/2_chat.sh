#!/usr/bin/env bash
# Step 2, chat. Real weights: llama2-mlx chat weights/llama-2-7b-chat-4bit --system "You are a helpful assistant."
# Here two questions are piped into a chat with the 4-bit demo model from step 1 (greedy, so the run repeats).
source "$(dirname "$0")/common.sh"
printf 'What is 12 + 7?\nAnd double it?\n' | $L2 chat "$WORK/demo-4bit" --temperature 0
