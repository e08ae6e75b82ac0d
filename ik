#!/usr/bin/env bash
# imagekit's one entry point. It sets up what is missing, then runs what you asked for:
#   ./ik build [--distro D]   set up, then run the main job (`invoke build`)
#   ./ik test [PYTEST ARGS]   set up, then run the whole test suite (ruff, mypy, the fast lane, then the
#                             VM lane side by side); with PYTEST ARGS, ruff, mypy and pytest with those
#   ./ik setup                only set up: host packages (apt-get, as root) and the Python env (.venv)
#   ./ik TASK [ARGS]          set up, then run any invoke task (./ik --list shows them)
# Set-up that is already done is not redone: host packages are checked with dpkg-query, the virtual
# environment is rebuilt only when pyproject.toml changes, node_modules only when package-lock.json does.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

HOST_PACKAGES=(
  qemu-system-x86 qemu-utils ovmf       # the VM runner and image conversion
  mmdebstrap debian-archive-keyring     # building Debian root filesystems
  e2fsprogs fdisk dosfstools ntfs-3g    # disk images, the NTFS resource disk
  xfsprogs                              # the tests make xfs roots (the leak scan's RHEL-family path)
  udftools util-linux mount iproute2    # blkid/losetup/unshare/mount, network namespaces
  socat                                 # the ssh ProxyCommand printed for --keep
  zstd xz-utils bzip2 ca-certificates   # vendor image decompression, downloads
  systemd openssh-client procps         # offline unit enabling, key fingerprints, process checks
  binutils                              # the tests rebuild the KVM probe's payload from its source
)
# What only the test suite needs (./ik test installs these too): a real browser for the HTML reports. Kept
# apart so that the tasks set up on hosts whose package names differ (Ubuntu has no `chromium` deb).
TEST_HOST_PACKAGES=(
  chromium                              # the tests render the HTML reports in a real browser (headless)
)
wanted_packages=("${HOST_PACKAGES[@]}")

missing_host_packages() {
  local p missing=()
  for p in "${wanted_packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$p")
    fi
  done
  echo "${missing[@]:-}"
}

setup_host() {
  if ! command -v dpkg-query >/dev/null; then
    echo "imagekit: this set-up needs a Debian-based host (dpkg and apt-get); install by hand: ${wanted_packages[*]}" >&2
    exit 2
  fi
  local missing
  missing=$(missing_host_packages)
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "imagekit: missing host packages: $missing" >&2
    echo "imagekit: install them as root:  sudo apt-get install -y $missing" >&2
    exit 2
  fi
  echo "imagekit: installing host packages: $missing" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

setup_python() {
  local stamp=.venv/.imagekit-setup want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  echo "imagekit: setting up the Python environment in .venv" >&2
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
}

setup_node() {
  # Azurite (the Azure Storage emulator the publish tests upload to) from package.json / package-lock.json,
  # reinstalled only when the lock file changes.
  local stamp=node_modules/.imagekit-setup want
  want=$(sha256sum package-lock.json | cut -d' ' -f1)
  if [ -x node_modules/.bin/azurite-blob ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  if ! command -v npm >/dev/null; then
    # Node is looked for as a command, not a package: it is often installed outside dpkg.
    if [ "$(id -u)" != 0 ]; then
      echo "imagekit: npm is missing (Node.js 18 or later; the publish tests run Azurite)" >&2
      echo "imagekit: install it as root:  sudo apt-get install -y nodejs npm" >&2
      exit 2
    fi
    echo "imagekit: installing host packages: nodejs npm" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  echo "imagekit: installing the Node tools (Azurite) in node_modules" >&2
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
  echo "$want" > "$stamp"
}

setup() { setup_host; setup_python; setup_node; }

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  test)
    wanted_packages+=("${TEST_HOST_PACKAGES[@]}")
    setup
    export PATH="$here/.venv/bin:$PATH"
    echo "== ruff" && ruff check imagekit tests tasks.py
    echo "== mypy" && mypy
    if [ $# -gt 0 ]; then
      echo "== pytest $*"
      exec pytest "$@"
    fi
    # The whole suite: the fast lane first, then the VM lane, each with its tests side by side, one worker
    # per core (each TCG guest keeps one core busy). IMAGEKIT_TEST_WORKERS sets that number; 0 runs the tests
    # one at a time.
    workers=${IMAGEKIT_TEST_WORKERS:-$(nproc)}
    [ "$workers" -gt 4 ] && workers=4
    [ "$workers" -eq 1 ] && workers=0
    status=0
    echo "== pytest: the fast lane (-m 'not vm')"
    pytest -m 'not vm' -n "$workers" --dist loadscope --no-loadscope-reorder || status=$?
    echo "== pytest: the VM lane (-m vm), $( [ "$workers" -eq 0 ] && echo "one test at a time" || echo "$workers side by side")"
    # One vCPU per VM while the VMs run one per core: two VMs of one vCPU get through more than two of two
    # on two cores (measured: login prompt 70 s each vs 83–92 s each; alone, two vCPUs take 50 s, one 68 s).
    vm_cpus=${IMAGEKIT_CPUS:-$( [ "$workers" -ge 2 ] && echo 1 || echo "")}
    IMAGEKIT_CPUS=$vm_cpus pytest -m vm -n "$workers" --dist loadscope --no-loadscope-reorder || status=$?
    exit "$status"
    ;;
  "" | -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' ;;
  *)
    setup
    exec .venv/bin/invoke "$cmd" "$@"
    ;;
esac
