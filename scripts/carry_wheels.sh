# Sourced by the device scripts: optional peers carried as wheels in .whl/ are
# installed into /tmp/site and put on PYTHONPATH (no index, no dependencies: fla-core is pure Python).
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
