#!/usr/bin/env bash
# The portability pass (`make test-portable`): strict nbval on every notebook
# again, under settings that change the floating-point path on this machine.
# A stored output that holds the last bits of one CPU fails here.
#
#   1. PyTorch's generic kernels (ATEN_CPU_CAPABILITY=default), one thread;
#   2. AVX2 kernels for PyTorch and for TensorFlow's oneDNN;
#   3. the machine's native settings, inside a network namespace with only
#      the loopback interface, so that nothing may reach the network (skipped,
#      with the reason, where unshare cannot make one).
#
# Usage: tests/portability.sh PYTHON NOTEBOOK...
set -uo pipefail

python=$1
shift
nbval=("$python" -m pytest --nbval --nbval-current-env
       --nbval-sanitize-with tests/nbval_sanitize.cfg -q "$@")
failed=0

leg() {
  local name=$1
  shift
  local start=$SECONDS
  echo "== portability: $name"
  if "$@"; then
    echo "== portability: $name passed in $((SECONDS - start)) s"
  else
    echo "== portability: $name FAILED after $((SECONDS - start)) s"
    failed=1
  fi
}

# What PyTorch really dispatches to under a leg's settings, for the record.
capability() {
  env "$@" "$python" -c 'import torch; print("   torch CPU capability:",
    torch.backends.cpu.get_cpu_capability(), "| threads:",
    torch.get_num_threads())'
}

capability ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1
leg "generic kernels, one thread (ATEN_CPU_CAPABILITY=default, OMP_NUM_THREADS=1)" \
  env ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  "${nbval[@]}"

capability ATEN_CPU_CAPABILITY=avx2
leg "AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2)" \
  env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 "${nbval[@]}"

# A namespace with only loopback: as root `unshare -n`; otherwise try a user
# namespace (`unshare -rn`), which many laptops allow.
offline=""
if ! command -v ip >/dev/null 2>&1; then
  reason="the 'ip' command (iproute2) is not installed"
elif unshare -n true 2>/dev/null; then
  offline="unshare -n"
elif unshare -rn true 2>/dev/null; then
  offline="unshare -rn"
else
  reason="unshare cannot create a network namespace here"
fi

capability A=1
if [ -n "$offline" ]; then
  # shellcheck disable=SC2016
  leg "native settings, offline (network namespace with loopback only)" \
    $offline sh -c '
      ip link set lo up || exit 1
      links=$(ip -o link | wc -l)
      if [ "$links" -ne 1 ]; then echo "expected only lo, found $links links"; exit 1; fi
      exec "$@"' sh "${nbval[@]}"
else
  echo "== portability: native settings, offline: SKIPPED ($reason);" \
       "running natively with the network"
  leg "native settings" "${nbval[@]}"
fi

exit $failed
