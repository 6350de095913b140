export PYTHONPATH=. ATTNBENCH_GIT_SHA=$1 ATTNBENCH_GIT_DIRTY=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python -m pytest -q -x tests/test_fmmformer_triton.py -k "causal" 2>&1 | tail -4 | tee $OUT/cuda_tests.log
timeout 150 python scripts/fmm_probe.py cbwd 2>&1 | tail -30
timeout 150 python tests/test_fmmformer_triton.py --no-odd 2>&1 | tail -25
