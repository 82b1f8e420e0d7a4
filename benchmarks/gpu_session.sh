#!/usr/bin/env bash
# One short GPU session, as run for docs/benchmarks.md: the throughput benchmark in its GPU mode (bf16 autocast,
# channels-last, the bundles' real data pipelines with workers), then the real-data OpenKBP comparison of
# docs/comparison.md (the fixed recipe's budget, 1,344 iterations per run, three seeds; four runs at a time on the one
# GPU: ResNet-18 at 128 px leaves most of an H100 idle). Runs cut by COMPARE_LIMIT_S resume when the script is
# rerun on the same machine.
#
# Usage, from the repository root of a CUDA machine with torch installed:
#   OUT=gpu_results OPENKBP_CACHE=/path/to/openkbp/cache bash benchmarks/gpu_session.sh
# OPENKBP_CACHE: a cache written by `convert_dataset` / the bundle (manifest.json + NIfTI); the CSVs need not be there.
# WHEELS (optional): a folder of wheels to install first (monai, nibabel, pytorch-ignite, fire, termcolor) on a
# machine without package access.
set -uo pipefail
OUT=${OUT:-gpu_results}
OPENKBP_CACHE=${OPENKBP_CACHE:-.gpu_data/openkbp_cache}
BENCH_LIMIT_S=${BENCH_LIMIT_S:-200}
COMPARE_LIMIT_S=${COMPARE_LIMIT_S:-300}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/session.log"
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/session.log"

timeout "$BENCH_LIMIT_S" python3 benchmarks/throughput.py ${BENCH_ARGS:---settings all --device cuda --amp bf16 --channels_last --pipeline_workers 8} \
  --output "$OUT/throughput_cuda.json" --markdown "$OUT/throughput_cuda.md" 2>&1 | tail -n 60 | tee -a "$OUT/session.log"

mkdir -p /tmp/no_csv
timeout "$COMPARE_LIMIT_S" python3 -m ctan_monai.compare --bundle bundles/ctan_openkbp --archs stl hps mtan ctan --seeds 0 1 2 \
  --output_dir /tmp/compare_openkbp_gpu --dataset_dir /tmp/no_csv --set cache_dir="$PWD/$OPENKBP_CACHE" \
  ${COMPARE_ARGS:---set epochs=12 --set train_slices_per_epoch=896 --set val_interval=4 --set summary_untrained=false --set eval_figures=0 --set num_workers=3} --jobs 4 --gpus 0 \
  2>&1 | grep -E "INFO|ERROR|WARN" | tail -n 40 | tee -a "$OUT/session.log"
python3 -m ctan_monai.compare --bundle bundles/ctan_openkbp --archs stl hps mtan ctan --seeds 0 1 2 \
  --output_dir /tmp/compare_openkbp_gpu --dataset_dir /tmp/no_csv --set cache_dir="$PWD/$OPENKBP_CACHE" \
  ${COMPARE_ARGS:---set epochs=12 --set train_slices_per_epoch=896 --set val_interval=4 --set summary_untrained=false --set eval_figures=0 --set num_workers=3} --jobs 4 --gpus 0 \
  --table_only 2>&1 | tail -n 30 | tee -a "$OUT/session.log"
cp /tmp/compare_openkbp_gpu/table.md "$OUT/compare_table.md" 2>/dev/null
cp /tmp/compare_openkbp_gpu/runs.json "$OUT/compare_runs.json" 2>/dev/null
cp /tmp/compare_openkbp_gpu/metrics.png "$OUT/compare_metrics.png" 2>/dev/null
exit 0
