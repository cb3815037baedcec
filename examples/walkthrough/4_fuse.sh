#!/usr/bin/env bash
# Step 4, fuse the adapter into a standalone model folder. Real weights:
#   llama2-mlx fuse weights/llama-2-7b-chat-4bit --adapter runs/my-adapter --out weights/my-llama --dequantize
source "$(dirname "$0")/common.sh"
$L2 fuse weights/demo --adapter "$WORK/adapter" --out "$WORK/demo-fused" --force
$L2 generate "$WORK/demo-fused" --prompt "What is 3 + 4?" --temperature 0
