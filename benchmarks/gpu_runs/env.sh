# Sourced first by every script here, on the GPU machine from the project root (carry .whl, and
# .peer where the official step runs): the carried wheels installed over the machine's packages,
# DeepSpeed's op builds set up (TORCH_CUDA_ARCH_LIST=9.0: the image's 9.0a breaks them) in one
# extensions folder for every call on the same warm machine (FusedAdam's build, about a minute,
# paid once), results under $R, and the GPU's name, memory and driver in $OUT/gpu.txt.
# unlock_builds: a build ended by a limit leaves a lock that hangs every later build in the folder;
# commands run one at a time there, so a lock found before a command starts is such a leftover.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MD4_SRC=$PWD/.peer TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/ext}
R=$OUT/results; mkdir -p $R
# At most 8 files come back from $OUT: the rows' JSON travel as one archive, results.tgz (unpacked
# here with `tar xzf results.tgz -C benchmarks`); 2026-12-07, eight rows' JSON were lost without it.
trap 'tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$R"' EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
unlock_builds() { find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null; true; }
unlock_builds
