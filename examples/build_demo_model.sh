#!/usr/bin/env bash
# Build the shipped demo model (weights/demo) from nothing, on a CPU, with this project's own commands:
#   the synthetic world -> tokenizer -> pretraining -> supervised fine-tuning -> eval of both models.
# Everything is seeded (a rerun gives the same weights); intermediate files go to $BUILD (runs/demo, git-ignored).
# About 30 minutes on 2 shared CPU cores with OpenBLAS (pretraining 15, fine-tuning 12, evals 1); see below.
#
#   examples/build_demo_model.sh            # the shipped recipe
#   BUILD=runs/smoke OUT=runs/smoke/out CORPUS_LINES=2000 SFT_ITERS=20 examples/build_demo_model.sh  # smoke run
#
# The model: Llama 2 architecture (RMSNorm, RoPE, SwiGLU, GQA with 4 query and 2 key/value heads), dim 128,
# 4 layers, a 512-piece BPE vocabulary: about 0.87 M parameters, 3.5 MB in float32 (examples/demo_params.json).
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-runs/demo}
OUT=${OUT:-weights/demo}
SEED=${SEED:-0}
VOCAB=${VOCAB:-512}
SEQ_LEN=${SEQ_LEN:-256}
CORPUS_LINES=${CORPUS_LINES:-40000}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-2}
SFT_ITERS=${SFT_ITERS:-1200}
L2=${L2:-python cli.py}

# MLX's Linux CPU wheel links the reference BLAS; a system OpenBLAS, if present, makes its matmuls ~15x faster.
if [[ "$(uname)" == Linux && -z "${LD_PRELOAD:-}" ]]; then
    for lib in /lib/x86_64-linux-gnu/libopenblas.so.0 /usr/lib/x86_64-linux-gnu/libopenblas.so.0 /usr/lib64/libopenblas.so.0; do
        if [[ -f "$lib" ]]; then export LD_PRELOAD="$lib"; echo "using $lib for BLAS"; break; fi
    done
fi

step() { echo; echo "== $* ($(date +%H:%M:%S))"; }

step "1/6 the synthetic world"
$L2 world --out "$BUILD/world" --seed "$SEED" --sizes "corpus=$CORPUS_LINES" --force

step "2/6 tokenizer"
$L2 train-tokenizer --corpus "$BUILD/world/corpus.txt" --vocab-size "$VOCAB" --out "$BUILD/tokenizer"

step "3/6 pretraining from random weights"
rm -rf "$BUILD/pretrained"
$L2 pretrain --config examples/demo_params.json --data "$BUILD/world/corpus.txt" \
    --valid "$BUILD/world/corpus_valid.txt" --tokenizer "$BUILD/tokenizer" --out "$BUILD/pretrained" \
    --seq-len "$SEQ_LEN" --batch-size 32 --lr 2e-3 --warmup 30 --epochs "$PRETRAIN_EPOCHS" \
    --eval-every 50 --save-every 100000 --seed "$SEED" --no-progress

step "4/6 supervised fine-tuning (all weights) on the world's dialogs"
rm -rf "$BUILD/sft"
$L2 sft "$BUILD/pretrained" --data "$BUILD/world/sft" --out "$BUILD/sft" --full \
    --seq-len "$SEQ_LEN" --batch-size 32 --lr 1e-3 --warmup 20 --iters "$SFT_ITERS" \
    --eval-every 50 --save-every 100000 --seed "$SEED" --no-progress

step "5/6 held-out evaluation: pretrained only, then fine-tuned"
$L2 eval "$BUILD/pretrained" --seed "$SEED" --json "$BUILD/eval_pretrained.json"
$L2 eval "$BUILD/sft" --seed "$SEED" --json "$BUILD/eval_sft.json"

step "6/6 the model folder $OUT"
tmp="$OUT.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
cp "$BUILD/sft"/{config.json,model.safetensors,tokenizer.model,tokenizer_config.json} "$tmp/"
cp "$BUILD/eval_pretrained.json" "$BUILD/eval_sft.json" "$tmp/"
rm -rf "$OUT"
mv "$tmp" "$OUT"
du -sh "$OUT"
