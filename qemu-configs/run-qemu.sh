#!/usr/bin/env bash
# Boot a guest that mounts a vfsd share, with a plain QEMU command line.
#
#   qemu-configs/run-qemu.sh --kernel /boot/vmlinuz-X --initrd initrd.img --socket /run/vfsd.sock
#
# Start vfsd first (QEMU gives up at once if nothing listens on the socket):
#
#   python3 -m vfsd --socket-path /run/vfsd.sock --shared-dir /srv/share &
#
# and in the guest: mount -t virtiofs myfs /mnt
#
# Every setting below can come from the environment or from the option next to it.  Anything
# after "--" is passed to QEMU unchanged.  The test suite (tests/vm/guest.py) boots its guests
# through this script, so what works here is what the tests run.
#
# Notes
# - vhost-user needs the guest RAM in shared memory: the memory-backend-memfd object with
#   share=on plus the NUMA node that uses it.  The memory size given to -m and to the backend
#   must agree, so both come from MEM.
# - TCG (software emulation) by default: set ACCEL=kvm (or --accel kvm) where KVM works.
# - The console is the first serial port on stdio; -no-reboot makes a guest "reboot" or a
#   kernel panic (panic=-1) end QEMU, and "poweroff -f" in the guest ends it cleanly.
set -euo pipefail

QEMU=${QEMU:-qemu-system-x86_64}
KERNEL=${KERNEL:-}                      # bzImage or uncompressed vmlinux (PVH); default newest /boot/vmlinuz-*
INITRD=${INITRD:-}                      # initramfs (required)
APPEND=${APPEND:-console=ttyS0 quiet panic=-1}   # kernel command line
MEM=${MEM:-512M}                        # guest RAM (also the size of the shared memfd)
SMP=${SMP:-1}                           # guest CPUs
ACCEL=${ACCEL:-tcg}                     # tcg | kvm
SOCKET=${SOCKET:-}                      # vhost-user socket of vfsd; empty: no virtio-fs device
TAG=${TAG:-myfs}                        # the virtio-fs tag (mount -t virtiofs TAG /mnt)
NUM_REQUEST_QUEUES=${NUM_REQUEST_QUEUES:-}   # vhost-user-fs-pci num-request-queues (QEMU default 1)
QUEUE_SIZE=${QUEUE_SIZE:-}              # vhost-user-fs-pci queue-size (QEMU default 128, max 1024)
INTERACTIVE=${INTERACTIVE:-}            # non-empty: console multiplexed with the monitor (Ctrl-A X quits)
DRY_RUN=${DRY_RUN:-}                    # non-empty: print the QEMU command instead of running it

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    cat <<'EOF'
Options (each sets the variable of the same name):
  --kernel PATH  --initrd PATH  --append CMDLINE  --mem SIZE  --smp N  --accel tcg|kvm
  --socket PATH  --tag TAG  --num-request-queues N  --queue-size N  --qemu BINARY
  --interactive  --dry-run  --help  [-- QEMU ARGS...]
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --kernel) KERNEL=$2; shift 2 ;;
        --initrd) INITRD=$2; shift 2 ;;
        --append) APPEND=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        --accel) ACCEL=$2; shift 2 ;;
        --socket) SOCKET=$2; shift 2 ;;
        --tag) TAG=$2; shift 2 ;;
        --num-request-queues) NUM_REQUEST_QUEUES=$2; shift 2 ;;
        --queue-size) QUEUE_SIZE=$2; shift 2 ;;
        --qemu) QEMU=$2; shift 2 ;;
        --interactive) INTERACTIVE=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) echo "run-qemu.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$KERNEL" ]; then
    KERNEL=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
fi
[ -n "$KERNEL" ] || { echo "run-qemu.sh: no kernel; use --kernel" >&2; exit 2; }
[ -n "$INITRD" ] || { echo "run-qemu.sh: no initramfs; use --initrd" >&2; exit 2; }

args=(
    "$QEMU"
    -nodefaults -no-user-config
    -accel "$ACCEL"
    -m "$MEM" -smp "$SMP"
    -object "memory-backend-memfd,id=mem,size=$MEM,share=on"
    -numa node,memdev=mem
    -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND"
    -display none -no-reboot
)
if [ -n "$INTERACTIVE" ]; then
    args+=(-serial mon:stdio)
else
    args+=(-serial stdio)
fi
if [ -n "$SOCKET" ]; then
    dev="vhost-user-fs-pci,chardev=vfs,tag=$TAG"
    [ -n "$NUM_REQUEST_QUEUES" ] && dev+=",num-request-queues=$NUM_REQUEST_QUEUES"
    [ -n "$QUEUE_SIZE" ] && dev+=",queue-size=$QUEUE_SIZE"
    args+=(-chardev "socket,id=vfs,path=${SOCKET//,/,,}" -device "$dev")   # "," is doubled in QEMU option values
fi
args+=("$@")

if [ -n "$DRY_RUN" ]; then
    printf '%q ' "${args[@]}"
    echo
    exit 0
fi
exec "${args[@]}"
