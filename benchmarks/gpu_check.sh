#!/usr/bin/env bash
# The device checks, as one run on a machine with an accelerator (one GPU).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [PART ...]
#
# Parts (default: phases diagnostics, about 520 s on an H200 with jax 0.11.2,
# most of it compilation, so that they fit one 10-minute call of the device
# tool inside a 15-minute lease with the machine's start):
#   phases       benchmarks/phases.py: the default K-FAC step and its phases
#                against the suite's AdamW step on the suite's five models
#                (the step-time ratios; ~290 s);
#   diagnostics  benchmarks/diagnostics_cost.py: the diagnostics' extra over
#                one statistics pass (issue 12's "≤ 10% of that pass"; ~220 s);
#   suite        benchmarks/suite.py --baselines adamw: time to tuned AdamW's
#                loss (~120 s);
#   dispatch     benchmarks/dispatch.py: what a skipped lax.cond costs (~30 s);
#   forms        benchmarks/diagnostics_forms.py: which form of the per-example
#                norms is fastest at the models' shapes (whether use_gram's
#                XLA:CPU rule holds on the device; ~30 s).
# Each part has a time limit, so that the others' results come back even if
# one is cut short; phases.py writes its JSON after every model.
set -uo pipefail
out="${1:-gpu_results}"
shift || true
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(phases diagnostics)
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  "$py" -c "import jax, optax, flax, chex; print('jax', jax.__version__, 'optax', optax.__version__,
'flax', flax.__version__, 'chex', chex.__version__, jax.devices())"
  uptime; } 2>&1 | tee "$out/env.txt"

for part in "${parts[@]}"; do
  case "$part" in
    phases) timeout 310 "$py" benchmarks/phases.py --json "$out/phases.json" ;;
    diagnostics) timeout 240 "$py" benchmarks/diagnostics_cost.py --calls 40 ;;  # within the limit
    suite) timeout 150 "$py" benchmarks/suite.py --baselines adamw --json "$out/suite.json" \
             --png "$out/suite.png" ;;
    dispatch) timeout 60 "$py" benchmarks/dispatch.py ;;
    forms) timeout 60 "$py" benchmarks/diagnostics_forms.py ;;
    *) echo "unknown part: $part (phases, diagnostics, suite, dispatch, forms)"; exit 2 ;;
  esac 2>&1 | tee "$out/$part.log"
done
uptime | tee -a "$out/env.txt"
