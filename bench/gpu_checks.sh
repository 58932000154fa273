#!/usr/bin/env bash
# Every GPU check of the project in one run on a GPU machine, in under 8 minutes; figures as JSON.
#
#   bash bench/gpu_checks.sh [OUT_DIR]              # OUT_DIR defaults to $OUT, else ./gpu-out
#   bash bench/gpu_checks.sh --cpu-smoke OUT_DIR    # without a GPU: every part tiny, to see none is broken
#
# Writes OUT_DIR/gpu_checks.json (the summary: machine, versions, each part's exit code and seconds) beside each
# part's own JSON and log:
#   gpu_pipeline.json  bench/gpu_pipeline.py: resnet50 ceiling (eager, compiled) vs the training loop fed by the
#                      torch loader and by DALI (hw_decoder_load 0.65 / 0.9), check_step's host-sync cost
#   fsdp_memory.json   bench/fsdp_memory.py: vit_large_patch16_224 peak memory and img/s, DDP vs FSDP2 vs
#                      FSDP2 + grad checkpointing, on one GPU
#   distill_step.json  bench/distill_step.py: ms per step of resnet18 single-label vs distilled from resnet50 (bf16,
#                      224 px, batch 128, channels-last), and the teacher's forward alone
#   gpu_tests.log      pytest tests/gpu (SyncBN on two ranks sharing the GPU, bf16; SyncBN's 2 ranks training like 1
#                      process, fp32; the DALI mixed decoder)
#   progressive_sizes.json  bench/progressive.py --gpu-sizes: resnet50 img/s at 160, 192 and 224 px (bf16, batch 256,
#                      eager) fed generated JPEGs by the loader of a --progressive 160 ramp (DALI, else torch)
#   autobatch.json     bench/autobatch.py: --batch-size auto's probe on resnet50 and vit_base at 224 px (bf16): the
#                      size found, its 90 %, the probe's seconds, and a real AdamW step's peak memory at that size
#   tensorrt.json      bench/tensorrt_speed.py: resnet50 224, TensorRT fp16 (the engine `trainer export --format
#                      engine --half` builds, run by trainer's runtime) vs torch.compile fp16, batch 1 and 32; with
#                      --cpu-smoke: the engine refused in one line without a GPU. Needs tensorrt-cu13 (else skipped)
# Each part has its own time limit and a failing part never stops the others.
#
# Needs torch, timm, accelerate and torchvision, plus `datasets`, pytest and the DALI wheel (nvidia-dali-cuda120 or
# -cuda130 to match the driver): on a GPU machine without a package registry, install their wheels first (copied
# in beside the checkout), then run
#   PYTHONUNBUFFERED=1 bash bench/gpu_checks.sh
# (the parts' limits below sum to 461 s, so the whole run, start-up and wheel installs included, fits one 8-minute
# device call: give the call timeout_s 540).
set -u
cd "$(dirname "$0")/.."
smoke=()
if [ "${1:-}" = "--cpu-smoke" ]; then smoke=(--cpu-smoke); shift; fi
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
if [ -d .whl ] && ! python3 -c "import datasets, pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

summary="$out/gpu_checks.json"
parts=()
part() {  # part NAME SECONDS COMMAND...: run one check under its own limit, note exit code and seconds
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > >(tee "$out/$name.log") 2>&1
  local code=$?
  parts+=("\"$name\": {\"exit_code\": $code, \"seconds\": $((SECONDS - start))}")
  echo "== $name: exit $code after $((SECONDS - start)) s"
}

part gpu_pipeline 180 python3 bench/gpu_pipeline.py "${smoke[@]}" --images 4000 --out "$out/gpu_pipeline.json"
part fsdp_memory 81 python3 bench/fsdp_memory.py "${smoke[@]}" --case-timeout 27 --out "$out/fsdp_memory.json"
part distill_step 40 python3 bench/distill_step.py "${smoke[@]}" --model resnet18 --teacher resnet50 --imgsz 224 \
  --in-chans 3 --batch-size 128 --mixed-precision bf16 --channels-last --out "$out/distill_step.json"
part gpu_tests 70 python3 -m pytest tests/gpu -q -p no:cacheprovider
part autobatch 30 python3 bench/autobatch.py "${smoke[@]}" --out "$out/autobatch.json"
part tensorrt 30 python3 bench/tensorrt_speed.py "${smoke[@]}" --rounds 3 --out "$out/tensorrt.json"
part progressive_sizes 30 python3 bench/progressive.py --gpu-sizes "${smoke[@]}" --images 1500 --out "$out/progressive_sizes.json"

machine=$(python3 - <<'EOF'
import json, platform
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name()
for name in ("timm", "accelerate", "datasets", "nvidia.dali", "tensorrt", "onnxruntime"):
    try:
        info[name] = __import__(name, fromlist=["__version__"]).__version__
    except Exception as e:  # a missing package is a finding, not a failure of the summary
        info[name] = f"missing ({type(e).__name__})"
print(json.dumps(info))
EOF
)
{
  printf '{"machine": %s,\n "parts": {%s}}\n' "${machine:-{\}}" "$(IFS=,; echo "${parts[*]}")"
} > "$summary"
cat "$summary"
