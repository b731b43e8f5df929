#!/bin/sh
# Read everything `stack` needs to know about this host and print it as ONE JSON object.
#
# POSIX sh only: no jq, no python, no bash. Environment:
#   STACK_PREFIX      the install prefix (default /opt/stack)
#   STACK_SYSFS_ROOT  where sysfs is (default /sys; test hosts point it at a fake tree)
#
# Escaping: vendor tool outputs (and `stack-agent status --json`) are arbitrary text, so they
# are never put into JSON by hand: each is encoded whole, base64 (`"enc": "base64"`) or, on a
# host without `base64`, hex from od (`"enc": "hex"`). Short values (distro, kernel, paths,
# runtime names) go through `jstr`, which drops control characters and escapes `\` and `"`.
# The parsing is done on the controller (deploys/facts.py, agent/gpus).
# The tool commands must stay equal to those in agent/gpus (tests/facts checks it).

PREFIX="${STACK_PREFIX:-/opt/stack}"
SYSFS="${STACK_SYSFS_ROOT:-/sys}"
PATH="$PATH:/usr/sbin:/sbin:/opt/rocm/bin:/usr/local/Ascend/driver/tools:/usr/local/corex/bin:/usr/local/neuware/bin:/usr/local/musa/bin"
export PATH
LC_ALL=C
export LC_ALL

jstr() {
  printf '"%s"' "$(printf '%s' "$1" | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g')"
}

if command -v base64 >/dev/null 2>&1; then
  ENC=base64
  encode() { base64 | tr -d '\n\r'; }
else
  ENC=hex
  encode() { od -An -v -tx1 | tr -d ' \n\r'; }
fi

# "NAME": {"rc": N, "enc": "...", "out": "..."} for a command's stdout+stderr
captured() {
  name=$1
  shift
  if command -v timeout >/dev/null 2>&1; then
    out=$(timeout 30 "$@" 2>&1)
  else
    out=$("$@" 2>&1)
  fi
  rc=$?
  printf '%s: {"rc": %d, "enc": "%s", "out": "%s"}' "$(jstr "$name")" "$rc" "$ENC" \
    "$(printf '%s' "$out" | encode)"
}

has() { command -v "$1" >/dev/null 2>&1; }
read_first() { [ -r "$1" ] && head -n 1 "$1" 2>/dev/null | tr -d '\r'; }

# -- the machine ------------------------------------------------------------------------
kernel_name=$(uname -s 2>/dev/null || echo unknown)
case "$kernel_name" in
  Linux) os=linux ;;
  Darwin) os=darwin ;;
  MINGW* | MSYS* | CYGWIN* | Windows*) os=windows ;;
  *) os="unknown:$kernel_name" ;;
esac

distro_id="" distro_version="" distro_name=""
if [ -r /etc/os-release ]; then
  distro_id=$(sed -n 's/^ID=//p' /etc/os-release | tr -d '"' | head -n 1)
  distro_version=$(sed -n 's/^VERSION_ID=//p' /etc/os-release | tr -d '"' | head -n 1)
  distro_name=$(sed -n 's/^PRETTY_NAME=//p' /etc/os-release | tr -d '"' | head -n 1)
elif [ "$os" = darwin ] && has sw_vers; then
  distro_id=macos
  distro_version=$(sw_vers -productVersion 2>/dev/null)
  distro_name="macOS $distro_version"
fi

cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 1)
if [ -r /proc/meminfo ]; then
  memory=$(awk '/^MemTotal:/ {printf "%.0f", $2 * 1024}' /proc/meminfo)
else
  memory=$(sysctl -n hw.memsize 2>/dev/null || echo 0)
fi

# free disk at the prefix, or at its nearest existing parent before it is created
disk_path=$PREFIX
while [ ! -d "$disk_path" ] && [ "$disk_path" != / ] && [ -n "$disk_path" ]; do
  disk_path=$(dirname "$disk_path")
done
disk_free=$(df -Pk "$disk_path" 2>/dev/null | awk 'NR == 2 {printf "%.0f", $4 * 1024}')

# -- accelerators on the PCI bus (seen before any driver is installed) -------------------
pci=""
for device in "$SYSFS"/bus/pci/devices/*; do
  [ -r "$device/class" ] && [ -r "$device/vendor" ] || continue
  class=$(read_first "$device/class")
  case "$class" in
    0x03* | 0x12*)
      entry="$(read_first "$device/vendor"):$class"
      pci="$pci${pci:+, }$(jstr "$entry")"
      ;;
  esac
done

# -- vendor tools (the first present tool of each group answers) -------------------------
tools=""
add_tool() { tools="$tools${tools:+, }$1"; }
if has nvidia-smi; then
  add_tool "$(captured nvidia-smi nvidia-smi --query-gpu=index,uuid,name,pci.bus_id,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw,driver_version,compute_cap --format=csv)"
fi
rocm_flags="--showid --showmeminfo vram --showpower --showuse --showtemp --showproductname --showuniqueid --json"
if has hy-smi; then
  # shellcheck disable=SC2086 # the flags are words on purpose
  add_tool "$(captured hy-smi hy-smi $rocm_flags)"
elif has rocm-smi; then
  # shellcheck disable=SC2086
  add_tool "$(captured rocm-smi rocm-smi $rocm_flags)"
elif has amd-smi; then
  add_tool "$(captured amd-smi amd-smi static --json)"
fi
if has npu-smi; then add_tool "$(captured npu-smi npu-smi info)"; fi
if has mthreads-gmi; then add_tool "$(captured mthreads-gmi mthreads-gmi)"; fi
if has ixsmi; then
  add_tool "$(captured ixsmi ixsmi --query-gpu=index,uuid,name,pci.bus_id,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw,driver_version,compute_cap --format=csv)"
fi
if has cnmon; then
  # `cnmon info -e -m -u -j` writes cnmon_info.json into the current folder
  cn_dir=$(mktemp -d 2>/dev/null || echo "/tmp/stack-cnmon-$$")
  mkdir -p "$cn_dir"
  add_tool "$(captured cnmon sh -c 'cd "$1" && cnmon info -e -m -u -j >/dev/null 2>&1; cat cnmon_info.json' cnmon "$cn_dir")"
  rm -rf "$cn_dir"
fi
if [ "$os" = darwin ] && has system_profiler; then
  add_tool "$(captured system_profiler system_profiler SPDisplaysDataType)"
fi

# -- drivers, reboot, Secure Boot ---------------------------------------------------------
nvidia_loaded=$(read_first "$SYSFS/module/nvidia/version")
nvidia_installed=""
if has modinfo; then nvidia_installed=$(modinfo -F version nvidia 2>/dev/null | head -n 1); fi
amdgpu_loaded=$(read_first "$SYSFS/module/amdgpu/version")
rocm_version=$(read_first /opt/rocm/.info/version)

reboot=false
if [ -e /var/run/reboot-required ] || [ -e /run/reboot-required ]; then reboot=true; fi
if has needs-restarting && ! needs-restarting -r >/dev/null 2>&1; then reboot=true; fi

secure_boot=""
if has mokutil; then
  case "$(mokutil --sb-state 2>&1)" in
    *"SecureBoot enabled"*) secure_boot=enabled ;;
    *"SecureBoot disabled"*) secure_boot=disabled ;;
    *) secure_boot=unknown ;;
  esac
fi

# -- what stack installed under the prefix -----------------------------------------------
runtimes=""
for marker in "$PREFIX"/runtimes/*/*/.installed; do
  [ -f "$marker" ] || continue
  version_dir=$(dirname "$marker")
  name=$(basename "$(dirname "$version_dir")")
  runtimes="$runtimes${runtimes:+, }$(jstr "$name/$(basename "$version_dir")")"
done
agent_version=$(read_first "$PREFIX/agent/.installed")
agent_status=""
if [ -x "$PREFIX/agent/venv/bin/stack-agent" ]; then
  agent_status=", $(captured agent_status "$PREFIX/agent/venv/bin/stack-agent" status --json --config "$PREFIX/etc/agent.toml")"
fi

user=$(id -un 2>/dev/null)
uid=$(id -u 2>/dev/null || echo -1)
sudo_ok=false
if [ "$uid" = 0 ]; then sudo_ok=true; elif has sudo && sudo -n true >/dev/null 2>&1; then sudo_ok=true; fi

cat <<EOF
{"facts_version": 1, "os": $(jstr "$os"), "distro_id": $(jstr "$distro_id"), "distro_version": $(jstr "$distro_version"), "distro_name": $(jstr "$distro_name"),
 "kernel": $(jstr "$(uname -r 2>/dev/null)"), "arch": $(jstr "$(uname -m 2>/dev/null)"), "hostname": $(jstr "$(uname -n 2>/dev/null)"),
 "cpu_cores": ${cores:-1}, "memory_bytes": ${memory:-0}, "disk_path": $(jstr "$disk_path"), "disk_free_bytes": ${disk_free:-0},
 "pci": [$pci], "tools": {$tools},
 "nvidia_module_loaded": $(jstr "$nvidia_loaded"), "nvidia_module_installed": $(jstr "$nvidia_installed"),
 "amdgpu_module_loaded": $(jstr "$amdgpu_loaded"), "rocm_version": $(jstr "$rocm_version"),
 "reboot_required": $reboot, "secure_boot": $(jstr "$secure_boot"),
 "prefix": $(jstr "$PREFIX"), "runtimes": [$runtimes], "agent_version": $(jstr "$agent_version")$agent_status,
 "user": $(jstr "$user"), "uid": ${uid:--1}, "sudo_ok": $sudo_ok, "test_host": $(jstr "${STACK_TEST_HOST:-}")}
EOF
