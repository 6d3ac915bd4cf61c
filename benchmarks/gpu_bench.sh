#!/usr/bin/env bash
# The retention bench's default rows on one GPU, within a deadline, then the CAST step's throughput.
#
# The zoo models are tiny, so one bench process leaves a GPU idle between kernel launches: the cells run
# as parallel processes (one per task and pair group, a few CPU threads each), each writing its own
# results.json after every row, so whatever finished by the deadline is kept. Then benchmarks/throughput.py
# times the CAST step alone on the GPU: the zoo pair at the bench's batch, and 7B-shaped random models.
#
#   CASTLORA_SHARED=../shared benchmarks/gpu_bench.sh OUTDIR [SECONDS]
#
# SECONDS (default 540) bounds the whole script; the bench gets all but the last 110 of them (the throughput's).
# ONLY="group ..." runs just the named groups (the names below, and `throughput`). DEVICE (default cuda) lets
# the same script be tried on the CPU, where the deadline stops the bench long before it ends.
set -u
out=${1:?usage: gpu_bench.sh OUTDIR [SECONDS]}
budget=${2:-540}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
device=${DEVICE:-cuda}
here=$(dirname "$0")
left() { local s=$((t0 + $1 - $(date +%s))); echo $((s > 1 ? s : 1)); }

{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__, 'gpu', torch.cuda.get_device_name())"
  nproc; } > "$out/env.txt" 2>&1

want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }  # ONLY="name ...": run just those groups
tail_s=110; want throughput || tail_s=10
bench() {  # name, task, CAST steps, methods..., then -- and pairs...
  local name=$1 task=$2 steps=$3; shift 3
  local methods=() pairs=()
  while [ "$1" != "--" ]; do methods+=("$1"); shift; done; shift; pairs=("$@")
  want "$name" || return 0
  timeout "$(left $((budget - tail_s)))" python3 -c "import sys; from castlora.cli import main; sys.exit(main())" \
    bench --device "$device" --out "$out/$name" --tasks "$task" --pairs "${pairs[@]}" --methods "${methods[@]}" \
    --cast-steps "$steps" > "$out/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - t0 )) s" >> "$out/groups.txt"
}
# one process per cell: the default (--teacher auto, every text generated), its imitation control, CAST-0 and
# the weight-space baseline
lm=(cast_auto_gen_all imitation_auto_gen_all cast0 weight_space)
for task in shakespeare kjv; do
  for pair in llama-mistral llama-neox mistral-llama neox-llama; do
    bench "${task}_$pair" $task 150 "${lm[@]}" -- "${pair/-/->}" &
  done
done
bench shakespeare_sanity shakespeare 150 cast_auto_gen_all cast0 -- "llama->llama" &
# the weakest cell at a GPU-sized budget: 1,000 steps, so 8,000 generated texts (the stream is all generated)
bench shakespeare_neox-llama_1000 shakespeare 1000 cast_auto_gen_all -- "neox->llama" &
# an exact-match cell: its recipe (zero-delta start, lr 1e-2, 400 steps), its control and the two baselines
bench greet_llama-mistral greet 150 cast_auto_gen_zd imitation_auto_gen_zd cast0 weight_space -- "llama->mistral" &
wait

shared=${CASTLORA_SHARED:-../shared}
if want throughput; then
  timeout "$(left $((budget - 70)))" python3 "$here/throughput.py" --source "$shared/zoo/llama" \
    --target "$shared/zoo/mistral" --device "$device" --dtype float32 --amp off --batch 8 --seq-len 128 \
    > "$out/throughput_zoo.log" 2>&1
  preset=7b dtype=bfloat16; [ "$device" = cpu ] && preset=tiny dtype=float32  # 7B shapes need a GPU
  timeout "$(left $((budget - 5)))" python3 "$here/throughput.py" --preset $preset --device "$device" --dtype $dtype \
    --batch 8 --seq-len 512 > "$out/throughput_7b.log" 2>&1
fi
echo "done after $(( $(date +%s) - t0 )) s" >> "$out/groups.txt"
