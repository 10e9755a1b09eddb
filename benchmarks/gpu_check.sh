#!/usr/bin/env bash
# The GPU check: one call on a machine with an NVIDIA GPU, under 8 minutes on one GPU. It prints
#   1. the paper preset's iterations/s at 128 px, fp32 and bf16, at batch 4 and at the largest
#      batch that fits, with peak GPU memory (benchmarks/gpu_check.py);
#   2. dgan synth's images/s at 128 px against the bare generator (benchmarks/bench_synth.py);
#   3. a 2-process Defect-GAN run through Accelerate: on every GPU when there are two or more,
#      and on one GPU otherwise (two ranks sharing it), to check that the DDP path starts.
# Each part has its own time limit; a part that fails prints why and the check goes on.
#
#   bash benchmarks/gpu_check.sh            # needs .venv (make test or make demo builds it)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MLFLOW_DISABLE_TELEMETRY=true
work=$(mktemp -d /tmp/dgan-gpu-check.XXXXXX)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
part() { echo; echo "== $1 ($(( $(date +%s) - start )) s in)"; }

part "the device"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader \
  || echo "nvidia-smi not found: no NVIDIA GPU here; the figures below are for the CPU"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'GPUs', torch.cuda.device_count())"

part "1. training step, paper preset, 128 px"
timeout 270 "$PY" benchmarks/gpu_check.py --preset paper --size 128 || echo "part 1 failed or ran out of time (exit $?)"

part "2. dgan synth at 128 px against the bare generator"
timeout 120 "$PY" benchmarks/bench_synth.py --config paper --size 128 --batch 64 --n 4000 \
  --workers 4 --writers 4 --memory-n || echo "part 2 failed or ran out of time (exit $?)"

part "3. two processes through Accelerate (the DDP path)"
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
"$PY" -m cli data demo --out "$work/data" --size 128 --n-normal 200 --n-defect 100 --workers 4 >/dev/null
run=(-m cli train gan --config paper --data "$work/data" --quiet --name ddp
     --tracking-uri "sqlite:///$work/mlflow.db"
     --set train.iterations=20 --set log.log_every=10 --set log.run_root="$work/runs"
     --set log.eval_every=0 --set log.sample_every=0 --set log.checkpoint_every=20)
t0=$(date +%s)
if [ "${gpus:-0}" -ge 2 ]; then
  timeout 150 "$PY" "${run[@]}" --gpus 2 2>&1 | tail -n 8
else
  # Two ranks on one GPU: Accelerate gives local rank r the GPU r, so each rank is told it is
  # local rank 0 of a machine whose only GPU is 0. NCCL may refuse two ranks on one GPU; the
  # output then says so, which is the answer this part exists to give.
  timeout 150 "$PY" -m torch.distributed.run --nproc_per_node 2 --no-python bash -c \
    'export CUDA_VISIBLE_DEVICES=0 LOCAL_RANK=0; exec "$0" "$@"' "$PY" "${run[@]}" 2>&1 | tail -n 8
fi
echo "2-process run: exit ${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s"
"$PY" - "$work/runs" <<'PY'
import json, sys, pathlib
for status in pathlib.Path(sys.argv[1]).glob("gan/*/status.json"):
    s = json.loads(status.read_text())
    print(f"{status.parent.name}: state {s.get('state')}, processes {s.get('processes')}, "
          f"iteration {s.get('iteration')}")
PY
part "done"
