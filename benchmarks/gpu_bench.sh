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
# SECONDS (default 540) bounds the whole script; the bench gets all but the last 110 of them. DEVICE (default
# cuda) lets the same script be tried on the CPU, where the deadline stops the bench long before it ends.
set -u
out=${1:?usage: gpu_bench.sh OUTDIR [SECONDS]}
budget=${2:-540}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-3}
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
device=${DEVICE:-cuda}
here=$(dirname "$0")
left() { local s=$((t0 + $1 - $(date +%s))); echo $((s > 1 ? s : 1)); }

{ nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__, 'gpu', torch.cuda.get_device_name())"
  nproc; } > "$out/env.txt" 2>&1

bench() {  # name, task, CAST steps, methods..., then -- and pairs...
  local name=$1 task=$2 steps=$3; shift 3
  local methods=() pairs=()
  while [ "$1" != "--" ]; do methods+=("$1"); shift; done; shift; pairs=("$@")
  timeout "$(left $((budget - 110)))" python3 -c "import sys; from castlora.cli import main; sys.exit(main())" \
    bench --device "$device" --out "$out/$name" --tasks "$task" --pairs "${pairs[@]}" --methods "${methods[@]}" \
    --cast-steps "$steps" > "$out/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - t0 )) s" >> "$out/groups.txt"
}
default=(cast_auto_gen_all imitation_auto_gen_all cast0 weight_space)
bench shak_into_llama shakespeare 150 "${default[@]}" -- "neox->llama" "mistral->llama" &
bench shak_from_llama shakespeare 150 "${default[@]}" -- "llama->mistral" "llama->neox" &
bench kjv_into_llama kjv 150 "${default[@]}" -- "neox->llama" "mistral->llama" &
bench kjv_from_llama kjv 150 "${default[@]}" -- "llama->mistral" "llama->neox" &
bench shak_sanity shakespeare 150 cast_auto_gen_all cast0 -- "llama->llama" &
# the weakest cell at a GPU-sized budget: 1,000 steps, so 8,000 generated texts (the stream is all generated)
bench shak_n2l_1000 shakespeare 1000 cast_auto_gen_all -- "neox->llama" &
wait

shared=${CASTLORA_SHARED:-../shared}
timeout "$(left $((budget - 70)))" python3 "$here/throughput.py" --source "$shared/zoo/llama" \
  --target "$shared/zoo/mistral" --device "$device" --dtype float32 --amp off --batch 8 --seq-len 128 \
  > "$out/throughput_zoo.log" 2>&1
preset=7b dtype=bfloat16; [ "$device" = cpu ] && preset=tiny dtype=float32  # 7B shapes need a GPU
timeout "$(left $((budget - 5)))" python3 "$here/throughput.py" --preset $preset --device "$device" --dtype $dtype \
  --batch 8 --seq-len 512 > "$out/throughput_7b.log" 2>&1
echo "done after $(( $(date +%s) - t0 )) s" >> "$out/groups.txt"
