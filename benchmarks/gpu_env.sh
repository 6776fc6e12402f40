# Sourced at the start of every device run: wheels the GPU image lacks, compile caches kept between runs.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export TORCHINDUCTOR_CACHE_DIR=/tmp/cache/inductor TRITON_CACHE_DIR=/tmp/cache/triton
mkdir -p /tmp/cache
[ -f .cache/compile.tgz ] && tar -xzf .cache/compile.tgz -C /tmp/cache
save_caches() { tar -czf "$OUT/compile.tgz" -C /tmp/cache . 2>/dev/null; }
nf() { python3 -m nanoflow.entrypoints.cli "$@"; }
