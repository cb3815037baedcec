#!/usr/bin/env bash
# Step 1, convert. With real weights you would run one of:
#   llama2-mlx convert path/to/llama-2-7b-chat weights/llama-2-7b-chat-4bit --quantize 4 --verify   (Meta download)
#   llama2-mlx convert meta-llama/Llama-2-7b-chat-hf weights/llama-2-7b-chat-4bit --quantize 4      (hub id)
# Here the demo model goes out as a Hugging Face folder and comes back as a 4-bit MLX folder.
source "$(dirname "$0")/common.sh"
$L2 export weights/demo "$WORK/demo-hf" --format hf --force
$L2 convert "$WORK/demo-hf" "$WORK/demo-4bit" --quantize 4 --group-size 32 --force
