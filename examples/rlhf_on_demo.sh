#!/usr/bin/env bash
# The RLHF stages on the shipped demo model, measured: rejection sampling (2 iterations), PPO and DPO, each scored
# with `llama2-mlx eval` (held-out task accuracy) and by the held-out reward model (weights/demo-rm) on the held-out
# prompts. Writes $BUILD/results.md (the tables in README "RLHF on the demo model"), with how often the reward model's
# pick among the SFT model's 8 samples is right and how often it ranks a right sample above a wrong one (the world's
# checks judge them, as `annotate` does).
#   examples/rlhf_on_demo.sh            # about 13 minutes on 2 idle CPU cores with OpenBLAS
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-runs/rlhf-demo}
L2=${L2:-python cli.py}
if [[ "$(uname)" == Linux && -z "${LD_PRELOAD:-}" && -f /usr/lib/x86_64-linux-gnu/libopenblas.so.0 ]]; then
    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0
fi
rm -rf "$BUILD"; mkdir -p "$BUILD"
$L2 world --out "$BUILD/world" --sizes corpus=10,corpus_valid=10,valid=10,prompts=1280 >/dev/null
head -n 200 "$BUILD/world/prompts.jsonl" > "$BUILD/rs_prompts.jsonl"  # rejection sampling: 200 x K=8; PPO: all
# the held-out prompts of `eval` (first turns) as prompt/response rows for `score`
python - "$BUILD" <<'PY'
import json, sys
build = sys.argv[1]
rows = [json.loads(line) for line in open(f"{build}/world/heldout.jsonl")]
with open(f"{build}/heldout_prompts.jsonl", "w") as f:
    for row in rows:
        f.write(json.dumps({"messages": row["messages"]}) + "\n")
PY
$L2 rejection-sample --prompts "$BUILD/rs_prompts.jsonl" --out "$BUILD/rs" --k 8 --iterations 2 \
    --temperature 1.0 --max-tokens 48 --iters 40 --batch-size 32 --lr 5e-4 --rank 16 --seq-len 256 --no-progress
$L2 ppo --prompts "$BUILD/world/prompts.jsonl" --out "$BUILD/ppo" --iters 40 --batch-size 32 --minibatch-size 8 \
    --max-tokens 48 --lr 5e-4 --kl-coef 0.05 --rank 16 --no-progress
$L2 ppo --prompts "$BUILD/world/prompts.jsonl" --out "$BUILD/ppo-ptx" --iters 40 --batch-size 32 --minibatch-size 8 \
    --max-tokens 48 --lr 5e-4 --kl-coef 0.05 --rank 16 --ptx-data "$BUILD/world/sft/train.jsonl" --no-progress
$L2 dpo --data "$BUILD/world/preferences" --out "$BUILD/dpo" --iters 60 --batch-size 32 --lr 5e-4 --rank 16 \
    --seq-len 256 --no-progress
$L2 dpo --data "$BUILD/world/preferences" --out "$BUILD/dpo-nll" --iters 60 --batch-size 32 --lr 5e-4 --rank 16 \
    --seq-len 256 --nll-coef 1.0 --no-progress
for name in sft rs ppo ppo-ptx dpo dpo-nll; do
    case $name in
        sft) adapter=() ;;
        rs) adapter=(--adapter "$BUILD/rs/iter-2/adapter") ;;
        *) adapter=(--adapter "$BUILD/$name") ;;
    esac
    $L2 eval "${adapter[@]}" --json "$BUILD/eval_$name.json" > /dev/null
    python - "$BUILD" "$name" "${adapter[@]}" <<'PY'
import json, sys
import llama2_mlx as L
from llama2_mlx.generation import generate_batch
build, name, adapter = sys.argv[1], sys.argv[2], (sys.argv[4] if len(sys.argv) > 4 else None)
model, tok = L.load("weights/demo", adapter)
prompts = [json.loads(line)["messages"] for line in open(f"{build}/heldout_prompts.jsonl")]
answers = [a[0].strip() for a in generate_batch(model, tok, prompts, max_tokens=48)]
rewards = L.load_reward_model("weights/demo-rm").score_batch(prompts, answers)
json.dump({"mean_reward": sum(rewards) / len(rewards)}, open(f"{build}/reward_{name}.json", "w"))
PY
done
python - "$BUILD" <<'PY'
import json, sys
build = sys.argv[1]
from llama2_mlx.ppo import summary
from llama2_mlx.world.annotate import read_world_prompts
from pathlib import Path
names = {"sft": "SFT (weights/demo)", "rs": "+ rejection sampling, 2 iterations", "ppo": "+ PPO",
         "ppo-ptx": "+ PPO with --ptx-data (the world's SFT dialogs)", "dpo": "+ DPO",
         "dpo-nll": "+ DPO with --nll-coef 1.0"}
lines = ["| model | held-out task accuracy | held-out mean reward (demo RM) |", "|---|---|---|"]
for key, label in names.items():
    accuracy = json.load(open(f"{build}/eval_{key}.json"))["task_accuracy_overall"]["accuracy"]
    reward = json.load(open(f"{build}/reward_{key}.json"))["mean_reward"]
    lines.append(f"| {label} | {accuracy:.3f} | {reward:+.3f} |")
lines.append("")
for run in ("ppo", "ppo-ptx"):  # each rollout's prompts differ, so the means over a quarter of the steps
    ppo = summary([json.loads(l) for l in open(f"{build}/{run}/metrics.jsonl")])
    lines.append(f"{run}: mean rollout reward {ppo['first_reward']:+.3f} (first quarter of the steps) -> "
                 f"{ppo['last_reward']:+.3f} (last quarter), KL to the reference {ppo['last_kl']:.4f} per answer "
                 "(last quarter).  ")
# How often the reward model's pick among the SFT model's K samples (rejection sampling's first iteration) is right
prompts = read_world_prompts(Path(f"{build}/rs_prompts.jsonl"))
samples = [json.loads(l) for l in open(f"{build}/rs/iter-1/samples.jsonl")]
rewards = {}
for row in samples:
    rewards.setdefault(row["prompt_index"], []).append((row["reward"], row["answer"]))
tally = {}
for index, scored in rewards.items():
    right = [prompts[index].grade(answer) >= 2 for _, answer in scored]
    pick = max(range(len(scored)), key=lambda i: scored[i][0])
    t = tally.setdefault(prompts[index].check["type"], [0, 0.0, 0, 0, 0, 0])
    t[0] += 1; t[1] += sum(right) / len(right); t[2] += right[pick]; t[3] += any(right)
    good = [reward for (reward, _), ok in zip(scored, right) if ok]  # every right sample against every wrong one
    bad = [reward for (reward, _), ok in zip(scored, right) if not ok]
    t[4] += sum(g > b for g in good for b in bad); t[5] += len(good) * len(bad)
lines += ["", "Right answers among the SFT model's 8 samples per training prompt (the world's checks judge them), and",
          "how often the reward model scores a right sample above a wrong one to the same prompt:", "",
          "| question | prompts | a random sample | the reward model's pick | the best sample | right above wrong |",
          "|---|---|---|---|---|---|"]
for kind, (n, mean, pick, best, wins, pairs) in sorted(tally.items()):
    lines.append(f"| {kind} | {n} | {mean / n:.3f} | {pick / n:.3f} | {best / n:.3f} | "
                 f"{wins / pairs if pairs else float('nan'):.3f} of {pairs} |")
open(f"{build}/results.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
