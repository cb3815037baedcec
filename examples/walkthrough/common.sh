# Sourced by the walk-through scripts: where they write, and which CLI they call.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
L2=${L2:-llama2-mlx}            # or L2="python cli.py" from a checkout without installing
WORK=${WORK:-runs/walkthrough}  # git-ignored
mkdir -p "$WORK"
