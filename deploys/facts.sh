#!/bin/sh
# Read everything `stack` needs to know about this host and print it as ONE JSON object.
#
# POSIX sh only: no jq, no python, no bash. Environment:
#   STACK_PREFIX      the install prefix (default /opt/stack)
#   STACK_SYSFS_ROOT  where sysfs is (default /sys; test hosts point it at a fake tree)
#   STACK_HCCN_CONF   the Ascend NIC settings (default /etc/hccn.conf; for tests)
#
# Escaping: vendor tool outputs (and `stack-agent status --json`) are arbitrary text, so they
# are never put into JSON by hand: each is encoded whole, base64 (`"enc": "base64"`) or, on a
# host without `base64`, hex from od (`"enc": "hex"`). Short values (distro, kernel, paths,
# runtime names) go through `jput`, which drops control characters and escapes `\` and `"`.
# The parsing is done on the controller (deploys/facts.py, agent/gpus).
# The tool commands must stay equal to those in agent/gpus (tests/facts checks it).
#
# Cheap by design (it runs on every host at every plan and apply): files are read with the
# `read` builtin, paths and fields are cut with parameter expansion, and the JSON is built in
# one variable and written once. A host without accelerators starts 5 processes (uname,
# nproc, df, id, python3); each vendor tool present adds itself, `timeout` and the encoder.

PREFIX="${STACK_PREFIX:-/opt/stack}"
SYSFS="${STACK_SYSFS_ROOT:-/sys}"
HCCN_CONF="${STACK_HCCN_CONF:-/etc/hccn.conf}"
PATH="$PATH:/usr/sbin:/sbin:/opt/rocm/bin:/usr/local/Ascend/driver/tools:/usr/local/corex/bin:/usr/local/neuware/bin:/usr/local/musa/bin"
export PATH
LC_ALL=C
export LC_ALL
NL='
'

J="" # the JSON being built

# append $1 to the JSON as a string: control characters dropped, `\` and `"` escaped (only
# a value that has any of them, or a non-ASCII byte, costs a `tr` and a `sed`)
jput() {
  case $1 in
    *[!\ -~]* | *[\"\\]*)
      J="$J\"$(printf '%s' "$1" | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g')\"" ;;
    *) J="$J\"$1\"" ;;
  esac
}

has() { command -v "$1" >/dev/null 2>&1; }

if has base64; then
  ENC=base64
  encode() { base64 | tr -d '\n\r'; }
else
  ENC=hex
  encode() { od -An -v -tx1 | tr -d ' \n\r'; }
fi
if has timeout; then HAS_TIMEOUT=1; else HAS_TIMEOUT=""; fi

# append "NAME": {"rc": N, "enc": "...", "out": "..."} for a command's stdout+stderr
captured() {
  name=$1
  shift
  if [ -n "$HAS_TIMEOUT" ]; then
    out=$(timeout 30 "$@" 2>&1)
  else
    out=$("$@" 2>&1)
  fi
  rc=$?
  jput "$name"
  J="$J: {\"rc\": $rc, \"enc\": \"$ENC\", \"out\": \"$(printf '%s' "$out" | encode)\"}"
}

# the first line of a readable file, in REPLY (empty when it is missing or unreadable)
read_first() {
  REPLY=""
  [ -r "$1" ] || return 0
  IFS= read -r REPLY 2>/dev/null <"$1"
  return 0
}

# dirname(1) without a process, in REPLY
parent() {
  p=$1
  case $p in
    *[!/]*) ;;
    "") REPLY=. && return 0 ;;
    *) REPLY=/ && return 0 ;;
  esac
  while :; do case $p in */) p=${p%/} ;; *) break ;; esac; done
  case $p in */*) ;; *) REPLY=. && return 0 ;; esac
  p=${p%/*}
  while :; do case $p in */) p=${p%/} ;; *) break ;; esac; done
  REPLY=${p:-/}
}

# $1 without its double quotes, in REPLY
unquote() {
  REPLY=$1
  while :; do
    case $REPLY in
      *\"*) REPLY=${REPLY%%\"*}${REPLY#*\"} ;;
      *) break ;;
    esac
  done
}

# -- the agent's status ------------------------------------------------------------------
# append $1 and "agent_status": {...} (captured) when an agent is installed. A running agent
# keeps its status in state/status.json: read as it is (no Python start). Otherwise
# `stack-agent status --json`, which also says which of a stopped agent's instances still
# run; also where there is no /proc (macOS).
agent_status() {
  agent_pid=""
  read_first "$PREFIX/state/agent.pid" # {"pid": N, "cmdline": [...]}
  case $REPLY in
    *'"pid": '[0-9]*) agent_pid=${REPLY#*'"pid": '} && agent_pid=${agent_pid%%[!0-9]*} ;;
  esac
  agent_comm=""
  if [ -n "$agent_pid" ]; then
    read_first "/proc/$agent_pid/stat" # PID (COMM) STATE ...
    agent_comm=${REPLY#*\(}
    agent_comm=${agent_comm%%\)*}
  fi
  if [ "$agent_comm" = stack-agent ] && [ -r "$PREFIX/state/status.json" ]; then
    J="$J$1"
    captured agent_status cat "$PREFIX/state/status.json"
  elif [ -x "$PREFIX/agent/venv/bin/stack-agent" ]; then
    J="$J$1"
    captured agent_status "$PREFIX/agent/venv/bin/stack-agent" status --json --config "$PREFIX/etc/agent.toml"
  fi
}

# STACK_FACTS=agent: only the agent's status (what `stack apply` polls while instances start)
if [ "${STACK_FACTS:-}" = agent ]; then
  J="{"
  agent_status ""
  printf '%s}\n' "$J"
  exit 0
fi

# -- the machine ------------------------------------------------------------------------
set -f # word splitting below, no globbing
# shellcheck disable=SC2046 # split on purpose: "sysname nodename release machine"
set -- $(uname -snrm 2>/dev/null)
if [ $# -eq 4 ]; then
  kernel_name=$1 hostname=$2 kernel=$3 arch=$4
else
  kernel_name=$(uname -s 2>/dev/null || echo unknown)
  hostname=$(uname -n 2>/dev/null)
  kernel=$(uname -r 2>/dev/null)
  arch=$(uname -m 2>/dev/null)
fi
set +f
case "$kernel_name" in
  Linux) os=linux ;;
  Darwin) os=darwin ;;
  MINGW* | MSYS* | CYGWIN* | Windows*) os=windows ;;
  *) os="unknown:$kernel_name" ;;
esac

distro_id="" distro_version="" distro_name=""
if [ -r /etc/os-release ]; then
  seen=""
  while IFS= read -r line || [ -n "$line" ]; do
    # the first line of each key, without its double quotes
    case $line in
      ID=*) case $seen in *i*) ;; *) seen="${seen}i" && unquote "${line#ID=}" && distro_id=$REPLY ;; esac ;;
      VERSION_ID=*) case $seen in *v*) ;; *) seen="${seen}v" && unquote "${line#VERSION_ID=}" && distro_version=$REPLY ;; esac ;;
      PRETTY_NAME=*) case $seen in *n*) ;; *) seen="${seen}n" && unquote "${line#PRETTY_NAME=}" && distro_name=$REPLY ;; esac ;;
    esac
  done </etc/os-release
elif [ "$os" = darwin ] && has sw_vers; then
  distro_id=macos
  distro_version=$(sw_vers -productVersion 2>/dev/null)
  distro_name="macOS $distro_version"
fi

cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 1)
memory=""
if [ -r /proc/meminfo ]; then
  while read -r key value _; do
    if [ "$key" = MemTotal: ]; then
      case $value in "" | *[!0-9]*) memory=0 ;; *) memory=$((value * 1024)) ;; esac
      break
    fi
  done </proc/meminfo
else
  memory=$(sysctl -n hw.memsize 2>/dev/null || echo 0)
fi

# free disk at the prefix, or at its nearest existing parent before it is created
disk_path=$PREFIX
while [ ! -d "$disk_path" ] && [ "$disk_path" != / ] && [ -n "$disk_path" ]; do
  parent "$disk_path"
  disk_path=$REPLY
done
disk_free=""
df_out=$(df -Pk "$disk_path" 2>/dev/null)
case $df_out in
  *"$NL"*)
    line=${df_out#*"$NL"}
    set -f
    # shellcheck disable=SC2086 # split on purpose: the fields of df's second line
    set -- ${line%%"$NL"*}
    set +f
    case $4 in "" | *[!0-9]*) disk_free=0 ;; *) disk_free=$(($4 * 1024)) ;; esac
    ;;
esac

# the agent's interpreter: `python3` on this PATH, its major.minor and the C library (one
# process; a musl host is told by its loader, without one)
python="" libc=""
if has python3; then
  set -f
  # shellcheck disable=SC2046 # split on purpose: "3.12 glibc 2.36"
  set -- $(python3 -I -S -c 'import os, sys; n = "CS_GNU_LIBC_VERSION"; print("%d.%d" % sys.version_info[:2], n in getattr(os, "confstr_names", {}) and os.confstr(n) or "")' 2>/dev/null)
  set +f
  python=${1:-}
  [ $# -ge 3 ] && libc="$2 $3"
  for loader in /lib/ld-musl-*; do
    [ -e "$loader" ] && [ -z "$libc" ] && libc=musl
  done
fi

J="{\"facts_version\": 1, \"os\": "
jput "$os"
J="$J, \"distro_id\": "
jput "$distro_id"
J="$J, \"distro_version\": "
jput "$distro_version"
J="$J, \"distro_name\": "
jput "$distro_name"
J="$J,$NL \"kernel\": "
jput "$kernel"
J="$J, \"arch\": "
jput "$arch"
J="$J, \"python\": "
jput "$python"
J="$J, \"libc\": "
jput "$libc"
J="$J, \"hostname\": "
jput "$hostname"
J="$J,$NL \"cpu_cores\": ${cores:-1}, \"memory_bytes\": ${memory:-0}, \"disk_path\": "
jput "$disk_path"
J="$J, \"disk_free_bytes\": ${disk_free:-0},$NL \"pci\": ["

# -- accelerators on the PCI bus (seen before any driver is installed) -------------------
sep=""
for device in "$SYSFS"/bus/pci/devices/*; do
  if [ ! -r "$device/class" ] || [ ! -r "$device/vendor" ]; then continue; fi
  read_first "$device/class"
  class=$REPLY
  case "$class" in
    0x03* | 0x12*)
      read_first "$device/vendor"
      J="$J$sep"
      jput "$REPLY:$class"
      sep=", "
      ;;
  esac
done
J="$J], \"tools\": {"

# -- vendor tools (the first present tool of each group answers) -------------------------
sep=""
tool() {
  J="$J$sep"
  sep=", "
  captured "$@"
}
if has nvidia-smi; then
  tool nvidia-smi nvidia-smi --query-gpu=index,uuid,name,pci.bus_id,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw,driver_version,compute_cap --format=csv
fi
rocm_flags="--showid --showmeminfo vram --showpower --showuse --showtemp --showproductname --showuniqueid --json"
if has hy-smi; then
  # shellcheck disable=SC2086 # the flags are words on purpose
  tool hy-smi hy-smi $rocm_flags
elif has rocm-smi; then
  # shellcheck disable=SC2086
  tool rocm-smi rocm-smi $rocm_flags
elif has amd-smi; then
  tool amd-smi amd-smi static --json
fi
if has npu-smi; then tool npu-smi npu-smi info; fi
if has mthreads-gmi; then tool mthreads-gmi mthreads-gmi; fi
if has ixsmi; then
  tool ixsmi ixsmi --query-gpu=index,uuid,name,pci.bus_id,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw,driver_version,compute_cap --format=csv
fi
if has cnmon; then
  # `cnmon info -e -m -u -j` writes cnmon_info.json into the current folder
  cn_dir=$(mktemp -d 2>/dev/null || echo "/tmp/stack-cnmon-$$")
  mkdir -p "$cn_dir"
  # shellcheck disable=SC2016 # $1 expands in that shell
  tool cnmon sh -c 'cd "$1" && cnmon info -e -m -u -j >/dev/null 2>&1; cat cnmon_info.json' cnmon "$cn_dir"
  rm -rf "$cn_dir"
fi
if [ "$os" = darwin ] && has system_profiler; then
  tool system_profiler system_profiler SPDisplaysDataType
fi
J="$J},$NL"

# -- Ascend device NICs: the `address_N=IP` lines of /etc/hccn.conf (the device IPs a
# MindIE rank table needs), read with the `read` builtin; parsed on the controller
hccn=""
if [ -r "$HCCN_CONF" ]; then
  while IFS= read -r line || [ -n "$line" ]; do
    case $line in address_*=*) hccn="$hccn${hccn:+ }$line" ;; esac
  done <"$HCCN_CONF"
fi
J="$J \"hccn_conf\": "
jput "$hccn"
J="$J,$NL"

# -- drivers, reboot, Secure Boot ---------------------------------------------------------
read_first "$SYSFS/module/nvidia/version"
nvidia_loaded=$REPLY
nvidia_installed=""
if has modinfo; then
  nvidia_installed=$(modinfo -F version nvidia 2>/dev/null)
  nvidia_installed=${nvidia_installed%%"$NL"*}
fi
read_first "$SYSFS/module/amdgpu/version"
amdgpu_loaded=$REPLY
read_first /opt/rocm/.info/version
rocm_version=$REPLY

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

J="$J \"nvidia_module_loaded\": "
jput "$nvidia_loaded"
J="$J, \"nvidia_module_installed\": "
jput "$nvidia_installed"
J="$J,$NL \"amdgpu_module_loaded\": "
jput "$amdgpu_loaded"
J="$J, \"rocm_version\": "
jput "$rocm_version"
J="$J,$NL \"reboot_required\": $reboot, \"secure_boot\": "
jput "$secure_boot"
J="$J,$NL \"prefix\": "
jput "$PREFIX"
J="$J, \"runtimes\": ["

# -- what stack installed under the prefix -----------------------------------------------
# and the recipe each was made by (its marker's second line, `recipe DIGEST`), kept in R
sep=""
R=""
for marker in "$PREFIX"/runtimes/*/*/.installed; do
  [ -f "$marker" ] || continue
  version_dir=${marker%/.installed}
  name_dir=${version_dir%/*}
  J="$J$sep"
  jput "${name_dir##*/}/${version_dir##*/}"
  line2=""
  { IFS= read -r _ && IFS= read -r line2; } <"$marker" 2>/dev/null || true
  case $line2 in
    "recipe "*[!0-9a-f]* | "recipe ") ;;
    "recipe "*)
      kept=$J; J="$R$sep"
      jput "${name_dir##*/}/${version_dir##*/}=${line2#recipe }"
      R=$J; J=$kept ;;
  esac
  sep=", "
done
J="$J], \"runtime_recipes\": [${R#, }"
read_first "$PREFIX/agent/.installed"
J="$J], \"agent_version\": "
jput "$REPLY"
agent_status ", "

# -- what apply wrote (state/managed: "KIND FINGERPRINT SHA256 PATH" per file) -------------
# printed as it is, then one `sha256sum` over the files that exist (what is there now) and
# `missing PATH` for an upload that is gone; parsed by deploys/facts.py
managed() {
  while IFS= read -r line; do
    printf '%s\n' "$line"
    set -f
    # shellcheck disable=SC2086 # split on purpose: kind, fingerprint, sha256
    set -- $line
    set +f
    kind=$1
    path=${line#* * * }
    case $kind in
      file) [ -f "$path" ] && files="$files$path$NL" ;;
      upload) [ -e "$path" ] || printf 'missing %s\n' "$path" ;;
    esac
  done <"$PREFIX/state/managed"
  echo "--"
  [ -n "$files" ] || return 0
  set -f
  old_ifs=$IFS
  IFS=$NL
  # shellcheck disable=SC2086 # one argument per line
  set -- $files
  IFS=$old_ifs
  set +f
  if has sha256sum; then sha256sum -- "$@"; else shasum -a 256 -- "$@"; fi
}
if [ -r "$PREFIX/state/managed" ]; then
  files=""
  out=$(managed 2>&1)
  J="$J,$NL \"managed\": {\"rc\": 0, \"enc\": \"$ENC\", \"out\": \"$(printf '%s' "$out" | encode)\"}"
fi

# -- how services run here, and which of stack's run --------------------------------------
if [ -d /run/systemd/system ]; then manager=systemd
elif [ "$os" = darwin ]; then manager=launchd
else manager=supervise; fi
J="$J,$NL \"service_manager\": \"$manager\", \"services_alive\": {"
sep=""
for service in agent router; do
  read_first "$PREFIX/run/$service.supervisor.pid"
  case $REPLY in "" | *[!0-9]*) continue ;; esac
  if kill -0 "$REPLY" 2>/dev/null; then alive=true; else alive=false; fi
  J="$J$sep\"$service\": $alive"
  sep=", "
done
J="$J}"

# -- TCP ports listening on this host (any owner: the scheduler gives none of them out) --
ports=""
for table in /proc/net/tcp /proc/net/tcp6; do
  [ -r "$table" ] || continue
  while read -r _ local _ state _; do
    [ "$state" = 0A ] || continue # LISTEN
    port=$((0x${local##*:}))
    case " $ports " in *" $port "*) ;; *) ports="$ports $port" ;; esac
  done <"$table"
done
sep=""
J="$J, \"ports_in_use\": ["
for port in $ports; do
  J="$J$sep$port"
  sep=", "
done
J="$J]"

# -- the stacks this user installed here (apply records each in
# $HOME/.config/modelstack/stacks/NAME: `prefix=PATH`, `agent_port=N` and on a router host
# `router_port=N` lines; destroy removes it); a record whose prefix is gone is stale and
# left out. Checked on the
# controller (deploys/facts.py): names, paths and ports are only data here.
J="$J,$NL \"stacks\": ["
sep=""
if [ -n "${HOME:-}" ]; then
  for record in "$HOME"/.config/modelstack/stacks/*; do
    [ -f "$record" ] || continue
    s_prefix="" s_port="" s_router=""
    while IFS= read -r line || [ -n "$line" ]; do
      case $line in
        prefix=*) s_prefix=${line#prefix=} ;;
        agent_port=*) s_port=${line#agent_port=} ;;
        router_port=*) s_router=${line#router_port=} ;;
      esac
    done <"$record"
    [ -n "$s_prefix" ] && [ -d "$s_prefix" ] || continue
    J="$J$sep{\"name\": "
    jput "${record##*/}"
    J="$J, \"prefix\": "
    jput "$s_prefix"
    J="$J, \"agent_port\": "
    jput "$s_port"
    J="$J, \"router_port\": "
    jput "$s_router"
    J="$J}"
    sep=", "
  done
fi
J="$J]"

# -- build prerequisites the runtime recipes name (deploys/prerequisites.py CHECKED, the
# same list): `command -v` and `test -e` are builtins, no process started
J="$J,$NL \"build_tools\": {"
sep=""
for tool in cmake c++ make tar python3 python3.12 xcrun npu-smi /usr/local/cuda/bin/nvcc \
  /opt/rocm /opt/rocm/llvm/bin/clang /opt/dtk/llvm/bin/clang /usr/local/musa/bin/mcc \
  /usr/local/Ascend/ascend-toolkit/latest glslc /usr/include/vulkan/vulkan.h; do
  case $tool in
    /*) if [ -e "$tool" ]; then v=true; else v=false; fi ;;
    *) if has "$tool"; then v=true; else v=false; fi ;;
  esac
  J="$J$sep\"$tool\": $v"
  sep=", "
done
J="$J}"

# user and uid from one `id` (POSIX format: uid=N(name) gid=N(name) [euid=N(name)] ...)
id_out=$(id 2>/dev/null)
case $id_out in
  *" euid="*) who=${id_out#*" euid="} ;;
  uid=*) who=${id_out#uid=} ;;
  *) who="" ;;
esac
who=${who%%" gid="*}
who=${who%%" egid="*}
who=${who%%" groups="*}
uid=${who%%"("*}
case $uid in "" | *[!0-9]*) uid="" ;; esac
user=""
case $who in *"("*")"*) user=${who#*"("} && user=${user%")"} ;; esac
sudo_ok=false
if [ "$uid" = 0 ]; then sudo_ok=true; elif has sudo && sudo -n true >/dev/null 2>&1; then sudo_ok=true; fi

J="$J,$NL \"user\": "
jput "$user"
J="$J, \"uid\": ${uid:--1}, \"sudo_ok\": $sudo_ok, \"test_host\": "
jput "${STACK_TEST_HOST:-}"
printf '%s}\n' "$J"
