#!/usr/bin/env bash
# The device checks, as one run on a machine with an accelerator (one GPU).
#
# 1. benchmarks/diagnostics_cost.py: the diagnostics' extra over one statistics
#    pass (issue 12's "≤ 10% of that pass");
# 2. benchmarks/phases.py: the default K-FAC step and its phases against the
#    suite's AdamW step on the suite's five models (the step-time ratios);
# 3. benchmarks/suite.py --baselines adamw: the suite itself (time to tuned
#    AdamW's loss), with what time is left.
#
# Each part has its own time limit so that the earlier parts' results come back
# even if a later one is cut short. Outputs (logs, JSON, PNG) go to $1 (default
# ./gpu_results). Run from the repository root: bash benchmarks/gpu_check.sh DIR
set -uo pipefail
out="${1:-gpu_results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  "$py" -c "import jax, optax, flax, chex; print('jax', jax.__version__, 'optax', optax.__version__,
'flax', flax.__version__, 'chex', chex.__version__, jax.devices())"
  uptime; } 2>&1 | tee "$out/env.txt"

timeout 90 "$py" benchmarks/diagnostics_cost.py 2>&1 | tee "$out/diagnostics_cost.log"
timeout 240 "$py" benchmarks/phases.py --json "$out/phases.json" 2>&1 | tee "$out/phases.log"
timeout 150 "$py" benchmarks/suite.py --baselines adamw --json "$out/suite.json" \
  --png "$out/suite.png" 2>&1 | tee "$out/suite.log"
uptime | tee -a "$out/env.txt"
