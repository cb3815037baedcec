#!/usr/bin/env bash
# The paper's margin comparison (its Table 28) on the world: one LoRA reward model per --margin on the demo model,
# same data (8000 graded pairs), seed and steps, each scored on the 200 held-out pairs. weights/demo-rm is the
# "large" one of this script (its base_model set to ../demo). About 25 minutes per margin on 2 shared CPU cores.
#   examples/reward_margins.sh                 # none and large
#   MARGINS="none small large" examples/reward_margins.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-runs/reward-margins}
L2=${L2:-python cli.py}
MARGINS=${MARGINS:-none large}
$L2 world --out "$BUILD/world" --sizes corpus=10,corpus_valid=10,train=10,valid=10,preferences=8000 --force >/dev/null
for margin in $MARGINS; do
    rm -rf "$BUILD/rm-$margin"
    $L2 train-rm weights/demo --data "$BUILD/world/preferences" --out "$BUILD/rm-$margin" --margin "$margin" \
        --batch-size 32 --lr 2e-3 --rank 16 --targets q,k,v,o,gate,up,down --eval-every 50 --seq-len 512 \
        --no-progress
    echo "== margin $margin"
    $L2 score "$BUILD/rm-$margin" --data "$BUILD/world/preferences/valid.jsonl"
done
