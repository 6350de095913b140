# Sourced by the device scripts: optional peers carried as wheels in .whl/ are
# installed into /tmp/site and put on PYTHONPATH (no index, no dependencies: fla-core is pure Python).
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
if [ -d /tmp/site ]; then
  # Peers installed there by this call or by an earlier call on the same (still warm) machine,
  # e.g. flash-attn-4 by scripts/fa4_smoke.sh. A --target folder is no site folder: its .pth
  # files are not read, so the CuTe DSL's own packages folder goes on the path by hand.
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  if [ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ]; then
    export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
    export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4_cache
  fi
fi
