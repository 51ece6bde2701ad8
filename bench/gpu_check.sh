#!/usr/bin/env bash
# The GPU check, on the device, in one call (docs/gpu.md, "The GPU check in one lease"): unpack what earlier calls
# copied to PARTS (bench/gpu_pack.py's parts and manifest.json), make torch's CUDA libraries visible, then run
# vpsde doctor, the GPU-marked tests, vpsde parity on the CUDA provider against eager torch (digits EM and
# DPM-Solver++, the CIFAR-scale DDPM++ with random weights) and the benchmarks, with figures under $OUT: the
# device tool returns at most 8 files, and this writes 8 (gpu_check.log, parity-{em,dpm,cifar}.json,
# bench-{em,dpm,lik}.json, gpu_loop.json). The likelihood bundle timed last is carried, not exported there
# (LIKELIHOOD_BUNDLE, default .gpucheck/lik from `make gpu-pack`).
#   bash bench/gpu_check.sh [PARTS]              # on the device (default PARTS: /tmp/gpucheck)
#   bash bench/gpu_check.sh --from STEP [PARTS]  # a rerun on the same machine: skip the steps before STEP
#                                                # (tests, export, parity, bench, gpu_loop, likelihood)
#   bash bench/gpu_check.sh --dry-run PARTS      # anywhere: unpack and import check only (CI runs it on the CPU)
#   bash bench/gpu_check.sh --rehearse PARTS     # every step on the CPU, fewer steps and batches, the DDPM++ at
#                                                # 16x16 (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0 from=tests
device=cuda em_steps=200 batches=1,16,64 loops="vpsde-ort-cuda vpsde-ort-cuda-graph torch-cudagraphs torch-compile"
cifar=score_sde-random  # CIFAR-scale DDPM++ (61.8 M parameters, random weights)
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
if [ "${1:-}" = "--rehearse" ]; then
  device=cpu em_steps=20 batches=1,4 loops="vpsde-ort-cpu torch-cudagraphs"; shift
  cifar='score_sde-random:config={"nf":32,"ch_mult":[1,2],"num_res_blocks":1,"attn_resolutions":[8],"image_size":16}'
fi
if [ "${1:-}" = "--from" ]; then from=$2; shift 2; fi
case "$from" in
  tests|export|parity|bench|gpu_loop|likelihood) ;;
  *) echo "--from: expected tests, export, parity, bench, gpu_loop or likelihood, got '$from'" >&2; exit 2;;
esac
parts=${1:-/tmp/gpucheck}
out=${OUT:-$parts/out}
py=${PYTHON:-python3}
mkdir -p "$out"
log="$out/gpu_check.log"
step() { echo "== $* ($(date +%T))" | tee -a "$log"; }

step unpack
"$py" bench/gpu_unpack.py --parts "$parts" --manifest "$parts/manifest.json" --site "$parts/site" \
  --namespace "$parts/ns" 2>&1 | tee -a "$log"  # ns: the repository as the vpsde package
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
export PYTHONPATH="$parts/site:$parts/ns" PYTHONUNBUFFERED=1
nvidia_libs=$("$py" -c "import glob, os, nvidia; print(':'.join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], '*', 'lib')))))" 2>/dev/null)
export LD_LIBRARY_PATH="${nvidia_libs:+$nvidia_libs:}${LD_LIBRARY_PATH:-}"
step onnxruntime
"$py" -c "import onnxruntime as o; print(o.__file__, o.__version__, o.get_available_providers())" 2>&1 | tee -a "$log"
vpsde() { "$py" -m vpsde.cli.main "$@"; }
step doctor
vpsde doctor 2>&1 | tee -a "$log"
if [ "$dry" = 1 ]; then echo "dry run: unpacked, imported, doctor ran" | tee -a "$log"; exit 0; fi

work=$parts/work  # kept, so a rerun with --from finds the exports
mkdir -p "$work"
order=(tests export parity bench gpu_loop likelihood)
runs() {  # runs STEP: whether STEP comes at or after --from
  local s; for s in "${order[@]}"; do [ "$s" = "$from" ] && return 0; [ "$s" = "$1" ] && return 1; done
}
if runs tests; then
  step tests
  "$py" -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee -a "$log"
fi
if runs export || [ ! -f "$work/cifar/manifest.json" ]; then
  step export
  rm -rf "$work"/{em,dpm,cifar}
  vpsde export --model digits --steps "$em_steps" --grid uniform --out "$work/em" 2>&1 | tee -a "$log"
  vpsde export --model digits --sampler dpmpp-2m --steps 20 --out "$work/dpm" 2>&1 | tee -a "$log"
  vpsde export --model "$cifar" --sampler dpmpp-2m --steps 10 --out "$work/cifar" 2>&1 | tee -a "$log"
fi
if runs parity; then
  step parity
  for b in em dpm cifar; do
    model=(); num=8
    if [ "$b" = cifar ]; then model=(--model "$cifar"); num=2; fi
    vpsde parity "$work/$b" --against eager "${model[@]}" --device "$device" --num "$num" \
      --report "$work/parity-$b" 2>&1 | tee -a "$log"
    cp "$work/parity-$b/report.json" "$out/parity-$b.json" 2>/dev/null
  done
fi
if runs bench; then
  step bench
  vpsde bench "$work/em" --device "$device" --batch "$batches" --steps 20 --iters 5 --json "$out/bench-em.json" 2>&1 \
    | tee -a "$log"
  vpsde bench "$work/dpm" --device "$device" --batch "$batches" --steps 20 --iters 5 --json "$out/bench-dpm.json" 2>&1 \
    | tee -a "$log"
fi
if runs gpu_loop; then
  step gpu_loop  # TensorRT cannot reach the device: its loops are left out
  "$py" bench/gpu_loop.py --device "$device" --steps "$em_steps" --batch "$batches" --loop-timeout 150 \
    --json "$out/gpu_loop.json" --loops diffusers-eager $loops 2>&1 | tee -a "$log"
fi
step likelihood
lik=${LIKELIHOOD_BUNDLE:-.gpucheck/lik}
if [ -f "$lik/manifest.json" ]; then
  vpsde bench "$lik" --device "$device" --batch "$batches" --steps 4 --iters 3 --json "$out/bench-lik.json" 2>&1 \
    | tee -a "$log"
else
  echo "no likelihood bundle at $lik (carry .gpucheck/lik from make gpu-pack): not timed" | tee -a "$log"
fi
step done
