"""Boot throw-away test guests under QEMU (TCG) with a busybox initramfs.

The guest is a Debian kernel plus a small initramfs built here in pure Python (cpio "newc",
gzip): busybox-static and its applet links, the virtio/fuse/virtiofs modules of that kernel,
a few host tools (getfattr/setfattr/getfacl/setfacl with their libraries) and an ``/init``
that mounts the virtio-fs tag at ``/mnt``, runs ``/test.sh`` and powers off.  The base image is
cached; every run appends a second small archive holding ``/test.sh`` and any extra files
(the kernel accepts concatenated archives).  ``python=True`` appends a third, cached archive
with the host's ``/usr/bin/python3.11`` and most of its standard library.

QEMU is started through ``qemu-configs/run-qemu.sh`` so that the tests and users share one
command line.  Everything the guest's script prints (stdout and stderr, byte-exact) ends up in
``GuestResult.output``; ``GuestResult.status`` is its exit status (None if it never finished).

    from tests.vm.guest import run_guest
    r = run_guest("echo hi > /mnt/f; stat -c %s /mnt/f", socket_path=sock)
    r.check()            # raises GuestFailure with console, QEMU stderr, ... unless status 0
    assert r.output == "3\\n"

Environment: VFSD_TEST_CACHE (cache directory, default ~/.cache/vfsd-tests),
VFSD_TEST_KERNEL (a bzImage; its modules must be in /lib/modules/<version>),
VFSD_TEST_PVH=0 (never boot the extracted vmlinux), VFSD_TEST_VERBOSE=1 (echo the guest console
to stderr while it runs), QEMU (the qemu-system-x86_64 binary).
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import gzip
import hashlib
import io
import lzma
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Iterable, Mapping

__all__ = [
    "BUILDER_VERSION", "MARK", "GuestFailure", "GuestFile", "GuestResult", "Kernel",
    "CpioWriter", "base_initramfs", "cache_dir", "find_kernel", "guest_requirements",
    "extra_modules", "host_tool_files", "interactive_guest", "parse_console", "payload_archive",
    "python_layer", "qemu_command", "run_guest",
]

#: Bump when the image layout or /init changes in a way the content hash would not catch.
BUILDER_VERSION = 3

REPO = Path(__file__).resolve().parents[2]
RUN_QEMU = REPO / "qemu-configs" / "run-qemu.sh"

#: Every line the guest's /init prints for the host starts with this.
MARK = "@@VFSD-GUEST@@"

#: Modules the guest needs (with their dependencies) and ones it loads when the kernel has them.
REQUIRED_MODULES = ("virtio_pci", "virtiofs")
OPTIONAL_MODULES = ("9pnet_virtio", "9p")

#: Host programs copied into the base image (with the shared libraries they need) when present.
HOST_TOOLS = ("/usr/bin/getfattr", "/usr/bin/setfattr", "/usr/bin/getfacl", "/usr/bin/setfacl")

GUEST_USERS = (  # name, uid, gid, home
    ("root", 0, 0, "/root"),
    ("user", 1000, 1000, "/home/user"),
    ("other", 1001, 1001, "/home/other"),
    ("nobody", 65534, 65534, "/nonexistent"),
)

DEFAULT_APPEND = "console=ttyS0 quiet panic=-1"

_MEMO: dict = {}   # per-process memo of the cached images' paths


# --------------------------------------------------------------------------------------------
# cache


def cache_dir() -> Path:
    d = Path(os.environ.get("VFSD_TEST_CACHE") or Path.home() / ".cache" / "vfsd-tests")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _file_digest(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# cpio "newc"


class CpioWriter:
    """Writes a cpio archive in the "newc" (070701) format the kernel's initramfs unpacker reads.

    Parent directories are not created implicitly; add them first (the kernel ignores a
    directory entry for a directory that already exists, e.g. from an earlier archive).
    """

    def __init__(self, *, mtime: int = 0) -> None:
        self._buf = io.BytesIO()
        self._ino = 300000
        self._mtime = mtime
        self._names: set[str] = set()
        self._finished = False

    def _entry(self, name: str, mode: int, data: bytes = b"", *, uid: int = 0, gid: int = 0,
               rdev: tuple[int, int] = (0, 0), mtime: int | None = None, nlink: int = 1) -> None:
        if self._finished:
            raise RuntimeError("archive already finished")
        name = name.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"bad archive path {name!r}")
        if name in self._names:
            raise ValueError(f"duplicate archive path {name!r}")
        self._names.add(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, uid, gid, nlink, self._mtime if mtime is None else int(mtime),
                  len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        out = self._buf
        out.write(header)
        out.write(encoded)
        out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    def add_dir(self, name: str, mode: int = 0o755, **kw) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2, **kw)

    def add_dirs(self, name: str, mode: int = 0o755) -> None:
        """Adds `name` and any of its parents not yet in this archive."""
        name = name.strip("/")
        if not name:
            return
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p not in self._names:
                self.add_dir(p, mode)

    def add_file(self, name: str, data: bytes | str, mode: int = 0o644, **kw) -> None:
        if isinstance(data, str):
            data = data.encode()
        self._entry(name, stat.S_IFREG | mode, bytes(data), **kw)

    def add_symlink(self, name: str, target: str, **kw) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode(), **kw)

    def add_node(self, name: str, kind: int, mode: int, major: int = 0, minor: int = 0,
                 **kw) -> None:
        """A device node, FIFO or socket: kind is stat.S_IFCHR, S_IFBLK, S_IFIFO or S_IFSOCK."""
        self._entry(name, kind | mode, rdev=(major, minor), **kw)

    def __contains__(self, name: str) -> bool:
        return name.strip("/") in self._names

    def finish(self) -> bytes:
        if not self._finished:
            self._entry("TRAILER!!!", 0, nlink=1)
            self._finished = True
        return self._buf.getvalue()


# --------------------------------------------------------------------------------------------
# kernel, modules, vmlinux


def _version_key(v: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.\-+~]", v)]


@dataclasses.dataclass(frozen=True)
class Kernel:
    version: str
    image: Path          # the bzImage (/boot/vmlinuz-VERSION)
    modules_dir: Path    # /lib/modules/VERSION

    def builtin_modules(self) -> set[str]:
        p = self.modules_dir / "modules.builtin"
        if not p.exists():
            return set()
        return {_mod_name(line) for line in p.read_text().split() if line.strip()}

    def module_deps(self) -> dict[str, tuple[Path, list[str]]]:
        deps: dict[str, tuple[Path, list[str]]] = {}
        for line in (self.modules_dir / "modules.dep").read_text().splitlines():
            if ":" not in line:
                continue
            mod, _, rest = line.partition(":")
            deps[_mod_name(mod)] = (self.modules_dir / mod, [_mod_name(d) for d in rest.split()])
        return deps

    def module_load_order(self, required: Iterable[str] = REQUIRED_MODULES,
                          optional: Iterable[str] = OPTIONAL_MODULES) -> list[tuple[str, Path]]:
        """Modules to insmod, dependencies first; built-in ones are left out."""
        deps = self.module_deps()
        builtin = self.builtin_modules()
        order: list[tuple[str, Path]] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen:
                return
            seen.add(name)
            if name in builtin:
                return
            if name not in deps:
                raise RuntimeError(f"kernel {self.version}: module {name} is neither built in "
                                   f"nor in {self.modules_dir}/modules.dep")
            path, needs = deps[name]
            for d in needs:
                visit(d)
            order.append((name, path))

        for name in required:
            visit(_mod_name(name))
        for name in optional:
            name = _mod_name(name)
            if name in deps or name in builtin:
                visit(name)
        return order

    def boot_image(self) -> Path:
        """The uncompressed vmlinux (PVH entry; faster under TCG) if it has been seen to boot,
        else the bzImage."""
        if os.environ.get("VFSD_TEST_PVH", "1") == "0":
            return self.image
        key = ("boot_image", self, str(cache_dir()))
        if key not in _MEMO:
            _MEMO[key] = self._choose_boot_image()
        return _MEMO[key]

    def _choose_boot_image(self) -> Path:
        try:
            vmlinux = extract_vmlinux(self)
        except Exception:
            return self.image
        if vmlinux is None:
            return self.image
        ok = vmlinux.with_name(vmlinux.name + ".boots")
        bad = vmlinux.with_name(vmlinux.name + ".fails")
        if ok.exists():
            return vmlinux
        if bad.exists():
            return self.image
        # Probe once: does the vmlinux boot this initramfs to /init and run a script?
        r = _run(self, vmlinux, "echo pvh-probe", socket_path=None, tag="myfs", timeout=90,
                 mem="256M", append_extra="", extra_qemu_args=(), files=None, python=False,
                 num_request_queues=None, queue_size=None, smp=1, mount_opts=None)
        if r.status == 0 and r.output == "pvh-probe\n":
            ok.write_text(f"booted in {r.duration:.2f}s\n")
            return vmlinux
        bad.write_text(r.explain())
        return self.image


def _mod_name(path: str) -> str:
    base = os.path.basename(path.strip())
    for suffix in (".xz", ".zst", ".gz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base.endswith(".ko"):
        base = base[:-3]
    return base.replace("-", "_")


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if not zstd:
            raise RuntimeError(f"{path} is zstd-compressed and no zstd program is installed")
        return subprocess.run([zstd, "-dc", str(path)], check=True, capture_output=True).stdout
    return data


def find_kernel() -> Kernel:
    """The kernel to boot: $VFSD_TEST_KERNEL, else the newest /boot/vmlinuz-* (cloud flavour
    preferred) whose /lib/modules tree has virtiofs."""
    env = os.environ.get("VFSD_TEST_KERNEL")
    candidates = [Path(env)] if env else sorted(Path("/boot").glob("vmlinuz-*"))
    usable = []
    problems = []
    for image in candidates:
        version = image.name.removeprefix("vmlinuz-")
        mods = Path("/lib/modules") / version
        k = Kernel(version, image, mods)
        try:
            if not os.access(image, os.R_OK):
                raise RuntimeError(f"{image} is not readable")
            if not (mods / "modules.dep").exists():
                raise RuntimeError(f"{mods}/modules.dep missing")
            k.module_load_order(optional=())
        except Exception as e:  # noqa: BLE001 - collected for the message below
            problems.append(f"{image}: {e}")
            continue
        usable.append(k)
    if not usable:
        raise RuntimeError("no usable kernel for test guests (install linux-image-cloud-amd64): "
                           + ("; ".join(problems) or "no /boot/vmlinuz-*"))
    usable.sort(key=lambda k: ("cloud" in k.version, _version_key(k.version)))
    return usable[-1]


def _lz4_legacy_decompress(data: bytes) -> bytes:
    """Decodes the LZ4 "legacy" frame format the kernel build uses (pure Python)."""
    if data[:4] != b"\x02\x21\x4c\x18":
        raise ValueError("not an lz4 legacy frame")
    out = bytearray()
    pos = 4
    n = len(data)
    while pos + 4 <= n:
        size = struct.unpack_from("<I", data, pos)[0]
        if size == 0x184C2102:          # another frame concatenated
            pos += 4
            continue
        if pos + 4 + size > n:          # the trailing 4-byte uncompressed size, or garbage
            break
        pos += 4
        end = pos + size
        blk = bytearray()
        while pos < end:
            token = data[pos]
            pos += 1
            lit = token >> 4
            if lit == 15:
                while True:
                    b = data[pos]
                    pos += 1
                    lit += b
                    if b != 255:
                        break
            if lit:
                blk += data[pos:pos + lit]
                pos += lit
            if pos >= end:
                break
            off = data[pos] | (data[pos + 1] << 8)
            pos += 2
            ml = token & 15
            if ml == 15:
                while True:
                    b = data[pos]
                    pos += 1
                    ml += b
                    if b != 255:
                        break
            ml += 4
            start = len(blk) - off
            if off == 0 or start < 0:
                raise ValueError("corrupt lz4 block")
            if off >= ml:
                blk += blk[start:start + ml]
            else:
                chunk = blk[start:]
                q, r = divmod(ml, off)
                blk += chunk * q + chunk[:r]
        out += blk
    return bytes(out)


def _decompress_payload(payload: bytes) -> bytes:
    if payload[:2] == b"\x1f\x8b":
        return zlib.decompressobj(wbits=31).decompress(payload)
    if payload[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload[:3] == b"\x5d\x00\x00":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    if payload[:3] == b"BZh":
        return bz2.BZ2Decompressor().decompress(payload)
    if payload[:4] == b"\x02\x21\x4c\x18":
        return _lz4_legacy_decompress(payload)
    if payload[:4] == b"\x28\xb5\x2f\xfd":
        zstd = shutil.which("zstd")
        if zstd:
            return subprocess.run([zstd, "-dc"], input=payload, check=True,
                                  capture_output=True).stdout
    raise ValueError(f"unsupported kernel payload compression (magic {payload[:6].hex()})")


def extract_vmlinux(kernel: Kernel) -> Path | None:
    """Extracts (once, cached) the ELF vmlinux from the bzImage; None if it has no PVH note."""
    key = hashlib.sha256(f"{kernel.version}:{_file_digest(kernel.image)}".encode()).hexdigest()
    out = cache_dir() / f"vmlinux-{kernel.version}-{key[:16]}"
    if out.exists():
        return out
    none = out.with_name(out.name + ".none")
    if none.exists():
        return None
    d = kernel.image.read_bytes()
    if d[0x202:0x206] != b"HdrS":
        raise ValueError(f"{kernel.image} is not a bzImage")
    setup_sects = d[0x1F1] or 4
    base = (setup_sects + 1) * 512
    off, length = struct.unpack_from("<II", d, 0x248)
    elf = _decompress_payload(d[base + off: base + off + length])
    if elf[:4] != b"\x7fELF" or not _has_pvh_note(elf):
        none.write_text("no ELF with a PVH entry note in the bzImage payload\n")
        return None
    _atomic_write(out, elf)
    return out


def _has_pvh_note(elf: bytes) -> bool:
    # Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (18), owner "Xen", in a PT_NOTE segment.
    if elf[4] != 2:
        return False
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12: pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


# --------------------------------------------------------------------------------------------
# host binaries in the guest


def _elf_interp(path: str) -> str | None:
    """The PT_INTERP of an ELF executable (None when static)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            raise ValueError(f"{path} is not a 64-bit ELF file")
        phoff = struct.unpack_from("<Q", head, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, _fl, p_offset, _va, _pa, p_filesz = struct.unpack_from(
                "<IIQQQQ", ph, i * phentsize)
            if p_type == 3:  # PT_INTERP
                f.seek(p_offset)
                return f.read(p_filesz).rstrip(b"\0").decode()
    return None


def _shared_libs(paths: Iterable[str]) -> dict[str, str]:
    """{path the loader will look up: host file} for the libraries `paths` (executables or
    shared objects) need, from ldd."""
    libs: dict[str, str] = {}
    for p in paths:
        r = subprocess.run(["ldd", p], capture_output=True, text=True)
        if r.returncode != 0:
            if "not a dynamic executable" in r.stdout + r.stderr:
                continue
            raise RuntimeError(f"ldd {p} failed: {r.stderr.strip()}")
        for line in r.stdout.splitlines():
            m = re.match(r"\s*\S+\s+=>\s+(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
            if m:
                lib = m.group(1)
                libs[lib] = os.path.realpath(lib)
            elif "=> not found" in line:
                raise RuntimeError(f"ldd {p}: {line.strip()}")
    return libs


def _add_host_file(w: CpioWriter, guest_path: str, host_path: str, mode: int | None = None,
                   *, keep_mtime: bool = False) -> None:
    st = os.stat(host_path)
    w.add_dirs(os.path.dirname(guest_path.strip("/")))
    with open(host_path, "rb") as f:
        data = f.read()
    w.add_file(guest_path, data, stat.S_IMODE(st.st_mode) if mode is None else mode,
               mtime=int(st.st_mtime) if keep_mtime else None)


# --------------------------------------------------------------------------------------------
# the base image


INIT = r"""#!/bin/sh
# /init of the vfsd test guest, written by tests/vm/guest.py (builder version @VERSION@).
# Kernel command line: vfsd.tag=TAG mounts virtiofs TAG at /mnt (vfsd.opts=O adds -o O);
# vfsd.shell=1 gives a shell on the console.  /test.sh runs with stdout+stderr on the console
# between the BEGIN and END marker lines; then kernel warnings, unmount, poweroff.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=linux
M='@MARK@'
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
ln -sf /proc/self/fd /dev/fd
hostname vfsd-guest
ip link set lo up 2>/dev/null
while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "$M INSMOD-FAILED $m"
done < /lib/modules/load-order
tag=; opts=; shell=
for a in $(cat /proc/cmdline); do
    case "$a" in
        vfsd.tag=*) tag=${a#*=} ;;
        vfsd.opts=*) opts=${a#*=} ;;
        vfsd.shell=1) shell=1 ;;
    esac
done
echo "$M BOOTED $(cut -d' ' -f1 /proc/uptime)"
[ -z "$shell" ] && dmesg -c >/dev/null
mounted=; mount_failed=
if [ -n "$tag" ]; then
    if mount -t virtiofs ${opts:+-o "$opts"} "$tag" /mnt; then
        mounted=1
        echo "$M MOUNTED $tag"
    else
        rc=$?
        mount_failed=1
        echo "$M MOUNT-FAILED rc=$rc"
    fi
fi
if [ -f /test.sh ] && [ -z "$mount_failed" ]; then
    [ -z "$shell" ] && stty -opost 2>/dev/null
    dmesg -n 1
    echo "$M BEGIN"
    (cd /; exec sh /test.sh) </dev/null 2>&1
    st=$?
    printf '\n%s END status=%d\n' "$M" "$st"
    [ -z "$shell" ] && stty opost 2>/dev/null
fi
if [ -n "$shell" ]; then
    dmesg -n 4
    echo "vfsd test guest: share at /mnt (tag '$tag'); exit the shell to power off."
    setsid cttyhack sh -l
fi
if [ -z "$shell" ]; then
    echo "$M KLOG-BEGIN"
    dmesg -r | grep '^<[0-4]>'
    echo "$M KLOG-END"
fi
if [ -n "$mounted" ]; then
    cd /
    sync
    umount /mnt
    echo "$M UMOUNT status=$?"
fi
echo "$M POWEROFF"
poweroff -f
sleep 5
"""

PROFILE = r"""export PATH=/bin:/sbin:/usr/bin:/usr/sbin
PS1='vfsd-guest:\w\$ '
alias ll='ls -la'
"""


def _busybox() -> str:
    for p in (os.environ.get("VFSD_TEST_BUSYBOX"), "/bin/busybox", "/usr/bin/busybox"):
        if p and os.path.exists(p):
            if _elf_interp(p) is not None:
                raise RuntimeError(f"{p} is dynamically linked; install busybox-static")
            return p
    raise RuntimeError("busybox not found; install busybox-static")


def _busybox_applets(busybox: str) -> list[str]:
    out = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def base_initramfs(kernel: Kernel | None = None) -> Path:
    """The cached, gzip-compressed base archive for `kernel` (built on first use)."""
    kernel = kernel or find_kernel()
    key = ("base_initramfs", kernel, str(cache_dir()))
    if key not in _MEMO or not _MEMO[key].exists():
        _MEMO[key] = _base_initramfs(kernel)
    return _MEMO[key]


def _base_initramfs(kernel: Kernel) -> Path:
    busybox = _busybox()
    modules = kernel.module_load_order()
    tools = [t for t in HOST_TOOLS if os.access(t, os.X_OK)]
    init = INIT.replace("@VERSION@", str(BUILDER_VERSION)).replace("@MARK@", MARK)
    key = hashlib.sha256()
    for part in (str(BUILDER_VERSION), kernel.version, _file_digest(busybox), init, PROFILE,
                 *[f"{n}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for n, p in modules],
                 *[f"{t}:{_file_digest(t)}" for t in tools]):
        key.update(part.encode() + b"\0")
    out = cache_dir() / f"initramfs-{kernel.version}-{key.hexdigest()[:16]}.cpio.gz"
    if out.exists():
        return out

    w = CpioWriter()
    for d, mode in (("bin", 0o755), ("sbin", 0o755), ("usr", 0o755), ("usr/bin", 0o755),
                    ("usr/sbin", 0o755), ("dev", 0o755), ("proc", 0o555), ("sys", 0o555),
                    ("mnt", 0o755), ("tmp", 0o1777), ("root", 0o700), ("etc", 0o755),
                    ("run", 0o755), ("var", 0o755), ("var/log", 0o755), ("home", 0o755),
                    ("lib", 0o755), ("lib/modules", 0o755)):
        w.add_dir(d, mode)
    for name, uid, gid, home in GUEST_USERS:
        if home.startswith("/home/"):
            w.add_dir(home, 0o755, uid=uid, gid=gid)
    w.add_node("dev/console", stat.S_IFCHR, 0o600, 5, 1)
    w.add_node("dev/null", stat.S_IFCHR, 0o666, 1, 3)
    w.add_file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    for applet in _busybox_applets(busybox):
        if applet.endswith("/busybox") or applet in w:
            continue
        w.add_dirs(os.path.dirname(applet))
        w.add_symlink(applet, "/bin/busybox")
    if "bin/sh" not in w:
        w.add_symlink("bin/sh", "/bin/busybox")
    for name, path in modules:
        w.add_file(f"lib/modules/{name}.ko", _read_module(path), 0o644)
    w.add_file("lib/modules/load-order", "".join(f"{n}\n" for n, _ in modules))
    w.add_file("etc/passwd", "".join(
        f"{n}:x:{u}:{g}:{n}:{h}:/bin/sh\n" for n, u, g, h in GUEST_USERS))
    w.add_file("etc/group", "".join(f"{n}:x:{g}:\n" for n, _u, g, _h in GUEST_USERS))
    w.add_file("etc/shadow", "".join(f"{n}::1::::::\n" for n, *_ in GUEST_USERS), 0o600)
    w.add_file("etc/profile", PROFILE)
    w.add_file("etc/hostname", "vfsd-guest\n")
    w.add_file("etc/vfsd-guest-modules", "".join(f"{n} {p}\n" for n, p in modules))
    for t in tools:
        _add_host_file(w, t, t)
    for guest_path, host_path in sorted(_shared_libs(tools).items()):
        if guest_path.strip("/") not in w:
            _add_host_file(w, guest_path, host_path)
    w.add_file("init", init, 0o755)
    _atomic_write(out, _pad4(gzip.compress(w.finish(), 6, mtime=0)))
    return out


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


# --------------------------------------------------------------------------------------------
# optional python layer

PYTHON = "/usr/bin/python3.11"
PYTHON_STDLIB = "/usr/lib/python3.11"
# Left out of the guest's standard library (size, or useless without a display/network).
_PY_SKIP_DIRS = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
                 "distutils", "pydoc_data", "site-packages", "dist-packages", "__phello__",
                 "sqlite3", "curses", "dbm", "venv", "msilib"}
_PY_DYNLOAD = ("_ctypes", "mmap", "resource", "termios", "_json", "_contextvars", "_queue",
               "_posixshmem", "_multiprocessing", "_asyncio", "_lzma", "_bz2", "_uuid",
               "_hashlib", "_decimal", "_zoneinfo", "_typing")


def python_layer() -> Path | None:
    """A cached archive with /usr/bin/python3 (Debian's 3.11) and most of its stdlib, or None
    when the host has no /usr/bin/python3.11."""
    key = ("python_layer", str(cache_dir()))
    if key not in _MEMO or (_MEMO[key] is not None and not _MEMO[key].exists()):
        _MEMO[key] = _python_layer()
    return _MEMO[key]


def _python_layer() -> Path | None:
    if not os.access(PYTHON, os.X_OK) or not os.path.isdir(PYTHON_STDLIB):
        return None
    stdlib = Path(PYTHON_STDLIB)
    files: list[Path] = []
    for root, dirs, names in os.walk(stdlib):
        rel = Path(root).relative_to(stdlib)
        dirs[:] = sorted(d for d in dirs if d not in _PY_SKIP_DIRS
                         and not d.startswith("config-") and d != "lib-dynload")
        for n in sorted(names):
            if n.endswith(".py") or (n.endswith(".cpython-311.pyc") and rel.name == "__pycache__"):
                files.append(Path(root) / n)
    dynload = []
    for mod in _PY_DYNLOAD:
        for p in sorted((stdlib / "lib-dynload").glob(f"{mod}.cpython-311-*.so")):
            dynload.append(p)
    key = hashlib.sha256()
    key.update(f"{BUILDER_VERSION}:{_file_digest(PYTHON)}".encode())
    for p in files + dynload:
        st = p.stat()
        key.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    out = cache_dir() / f"python-layer-{key.hexdigest()[:16]}.cpio.gz"
    if out.exists():
        return out
    w = CpioWriter()
    w.add_dirs("usr/lib/python3.11/lib-dynload")
    _add_host_file(w, "/usr/bin/python3", PYTHON, 0o755)
    for p in files:
        w.add_dirs(str(p.parent))
        _add_host_file(w, str(p), str(p), keep_mtime=True)   # pyc validate against mtime
    for p in dynload:
        _add_host_file(w, str(p), str(p))
    for guest_path, host_path in sorted(_shared_libs([PYTHON, *map(str, dynload)]).items()):
        _add_host_file(w, guest_path, host_path)
    _atomic_write(out, _pad4(gzip.compress(w.finish(), 6, mtime=0)))
    return out


# --------------------------------------------------------------------------------------------
# extra per-run contents: more host tools, more kernel modules


def host_tool_files(*tools: str) -> dict[str, "GuestFile"]:
    """Payload files (for run_guest's `files`) that put host programs such as /usr/sbin/setcap
    into the guest at the same path, with the shared libraries they need that the base image
    lacks.  Raises RuntimeError naming the Debian package when a tool is missing."""
    packages = {"setcap": "libcap2-bin", "getcap": "libcap2-bin", "capsh": "libcap2-bin"}
    out: dict[str, GuestFile] = {}
    for t in tools:
        if not os.access(t, os.X_OK):
            pkg = packages.get(os.path.basename(t))
            raise RuntimeError(f"{t} is missing" + (f" (apt-get install {pkg})" if pkg else ""))
        out[t] = GuestFile(Path(t).read_bytes(), mode=0o755)
    have = set(_shared_libs([t for t in HOST_TOOLS if os.access(t, os.X_OK)]))
    for guest_path, host_path in sorted(_shared_libs(tools).items()):
        if guest_path not in have and guest_path not in out:
            out[guest_path] = GuestFile(Path(host_path).read_bytes(), mode=0o755)
    return out


def extra_modules(*names: str, kernel: Kernel | None = None) -> tuple[dict[str, bytes], str]:
    """(payload files, shell snippet) that load the kernel modules `names` (and what they
    need) in the guest: the files go to /lib/modules/extra/, the snippet insmods those the
    base image has not loaded already and fails if one does not load.  Built-in modules need
    nothing."""
    kernel = kernel or find_kernel()
    base = {n for n, _ in kernel.module_load_order()}
    files: dict[str, bytes] = {}
    lines = []
    for name, path in kernel.module_load_order(required=names, optional=()):
        if name in base:
            continue
        files[f"/lib/modules/extra/{name}.ko"] = _read_module(path)
        lines.append(f"[ -d /sys/module/{name} ] || insmod /lib/modules/extra/{name}.ko "
                     f"|| {{ echo 'insmod {name} failed' >&2; exit 97; }}")
    return files, "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# per-run payload


@dataclasses.dataclass(frozen=True)
class GuestFile:
    """A file for the payload archive; `kind` stat.S_IFREG (data), S_IFLNK (data = target),
    S_IFDIR, S_IFIFO, S_IFCHR/S_IFBLK (rdev = (major, minor))."""
    data: bytes | str = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    kind: int = stat.S_IFREG
    rdev: tuple[int, int] = (0, 0)


def payload_archive(script: str | None,
                    files: Mapping[str, bytes | str | GuestFile] | None = None) -> bytes:
    """The per-run archive (gzip): /test.sh plus `files` ({guest path: contents})."""
    w = CpioWriter(mtime=int(time.time()))
    for path, spec in sorted((files or {}).items()):
        if not isinstance(spec, GuestFile):
            spec = GuestFile(spec)
        parent = os.path.dirname(path.strip("/"))
        if parent:
            w.add_dirs(parent)
        kw = dict(uid=spec.uid, gid=spec.gid)
        if spec.kind == stat.S_IFREG:
            w.add_file(path, spec.data, spec.mode, **kw)
        elif spec.kind == stat.S_IFLNK:
            target = spec.data if isinstance(spec.data, str) else spec.data.decode()
            w.add_symlink(path, target, **kw)
        elif spec.kind == stat.S_IFDIR:
            w.add_dir(path, spec.mode, **kw)
        else:
            w.add_node(path, spec.kind, spec.mode, *spec.rdev, **kw)
    if script is not None:
        w.add_file("test.sh", script if script.endswith("\n") else script + "\n", 0o755)
    return _pad4(gzip.compress(w.finish(), 1, mtime=0))


# --------------------------------------------------------------------------------------------
# results


class GuestFailure(AssertionError):
    """A guest run that did not end as the test expected; str() carries the diagnostics."""


_RX_END = re.compile(rb"\n" + re.escape(MARK.encode()) + rb" END status=(\d+)\r?\n")
_END_LINE_MAX = len(MARK) + 32   # the longest text _RX_END matches, with room to spare

#: Seconds QEMU gets to exit once the guest's script has ended.  What is left then (kernel
#: warnings, sync, umount, poweroff, QEMU stopping the vhost-user device) takes a few
#: seconds; a guest still running after this is stuck, most often on a daemon that does
#: not answer (a FUSE reply at umount, GET_VRING_BASE when QEMU stops the device), and
#: waiting out the whole timeout would only hide that for minutes.
SHUTDOWN_GRACE = 120.0

#: Every guest run whose shutdown hung (its GuestResult), in the order they ended; the VM
#: tests' conftest fails a test that left one here, whatever the test itself asserted.
shutdown_hangs: list["GuestResult"] = []


@dataclasses.dataclass
class GuestResult:
    output: str                  # the script's stdout+stderr, byte-exact (decoded utf-8)
    status: int | None           # its exit status; None if it never finished
    console: str = ""            # the whole guest console (\r\n -> \n)
    booted: bool = False         # /init started
    mounted: bool | None = None  # None: no mount requested
    mount_error: str | None = None
    kernel_log: str = ""         # guest kernel messages at warning level or worse (after boot)
    umount_status: int | None = None
    powered_off: bool = False
    timed_out: bool = False      # QEMU was killed (before or after the script ended)
    shutdown_hung: bool = False  # ... after: the script ended, QEMU did not exit in time
    qemu_returncode: int | None = None
    qemu_pid: int | None = None
    qemu_stderr: str = ""
    duration: float = 0.0
    command: list[str] = dataclasses.field(default_factory=list)
    output_bytes: bytes = b""
    daemon_log: str | None = None   # filled in by callers that ran a daemon (see explain())

    @property
    def ok(self) -> bool:
        return self.status == 0 and not self.shutdown_hung

    @property
    def shutdown_stage(self) -> str:
        """Where a hung shutdown stopped, by the last of /init's markers on the console."""
        if self.powered_off:
            return ("after the guest powered off (QEMU did not exit: stopping the "
                    "vhost-user device waits on the daemon)")
        if self.umount_status is not None:
            return "between the umount and the poweroff"
        if self.mounted:
            return "at the sync or umount of the share (a request the daemon did not answer)"
        return "before the poweroff"

    def explain(self, tail: int = 60) -> str:
        what = (f"the script ended with status {self.status}, but the guest's shutdown hung "
                f"{self.shutdown_stage}; QEMU killed" if self.shutdown_hung else
                "timed out (QEMU killed)" if self.timed_out else
                "never booted to /init" if not self.booted else
                f"mount failed: {self.mount_error}" if self.mounted is False else
                "script did not finish" if self.status is None else
                f"script exited with status {self.status}")
        parts = [f"guest run: {what}; QEMU exit code {self.qemu_returncode}, "
                 f"{self.duration:.1f}s",
                 "command: " + shlex.join(self.command)]
        if self.status is not None:
            parts.append("--- script output ---\n" + self.output.rstrip("\n"))
        parts.append(f"--- guest console (last {tail} lines) ---\n" + _tail(self.console, tail))
        if self.kernel_log:
            parts.append("--- guest kernel warnings ---\n" + self.kernel_log.rstrip("\n"))
        if self.qemu_stderr.strip():
            parts.append("--- QEMU stderr ---\n" + _tail(self.qemu_stderr, tail))
        if self.daemon_log is not None:
            parts.append(f"--- daemon log (last {tail} lines) ---\n" +
                         _tail(self.daemon_log, tail))
        return "\n".join(parts)

    def check(self, status: int = 0) -> "GuestResult":
        """Returns self if the script exited with `status` and the guest then shut down;
        raises GuestFailure otherwise."""
        if self.status != status or self.shutdown_hung:
            raise GuestFailure(self.explain())
        return self


def _tail(text: str, n: int) -> str:
    lines = text.rstrip("\n").splitlines()
    return "\n".join(lines[-n:])


def parse_console(raw: bytes) -> dict:
    """Splits the raw console bytes into the GuestResult fields they determine."""
    mark = MARK.encode()
    res: dict = {"booted": mark + b" BOOTED" in raw, "output": "", "status": None,
                 "output_bytes": b""}
    if b"MOUNTED" in raw or b"MOUNT-FAILED" in raw:
        m = re.search(re.escape(mark) + rb" (MOUNTED|MOUNT-FAILED)(?: rc=(\d+))?", raw)
        if m:
            res["mounted"] = m.group(1) == b"MOUNTED"
            if not res["mounted"]:
                before = raw[:m.start()].decode("utf-8", "replace").replace("\r\n", "\n")
                res["mount_error"] = (before.rstrip("\n").splitlines() or ["?"])[-1] + \
                    f" (rc={m.group(2).decode() if m.group(2) else '?'})"
    begin = raw.find(mark + b" BEGIN\n")
    if begin < 0:
        begin = raw.find(mark + b" BEGIN\r\n")
        start = begin + len(mark) + 8 if begin >= 0 else -1
    else:
        start = begin + len(mark) + 7
    rest = raw[start:] if start >= 0 else b""
    if start >= 0:
        m = _RX_END.search(raw, start - 1)
        if m:
            out = raw[start:m.start()]
            res["status"] = int(m.group(1))
            rest = raw[m.end():]
        else:
            out = raw[start:]
        res["output_bytes"] = out
        res["output"] = out.decode("utf-8", "replace")
    k0 = rest.find(mark + b" KLOG-BEGIN")
    k1 = rest.find(mark + b" KLOG-END")
    if 0 <= k0 < k1:
        body = rest[k0:k1].split(b"\n", 1)[1] if b"\n" in rest[k0:k1] else b""
        res["kernel_log"] = body.decode("utf-8", "replace").replace("\r\n", "\n")
    m = re.search(re.escape(mark) + rb" UMOUNT status=(\d+)", rest)
    if m:
        res["umount_status"] = int(m.group(1))
    res["powered_off"] = mark + b" POWEROFF" in rest
    return res


# --------------------------------------------------------------------------------------------
# running QEMU


def require_guest() -> None:
    """Skip the calling test (or fixture) when no test guest can boot here; under CI, fail
    instead: CI must run the VM tests."""
    import pytest

    missing = _missing_once()
    if missing:
        why = "cannot boot test guests: " + "; ".join(missing)
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why + " (CI must run the VM tests; run tools/setup first)")
        pytest.skip(why)


@functools.lru_cache(maxsize=None)
def _missing_once() -> tuple[str, ...]:
    return tuple(guest_requirements())


def guest_requirements() -> list[str]:
    """What is missing for booting test guests (empty when everything is there)."""
    missing = []
    qemu = os.environ.get("QEMU", "qemu-system-x86_64")
    if not shutil.which(qemu):
        missing.append(f"{qemu} (apt-get install qemu-system-x86)")
    if not shutil.which("bash"):
        missing.append("bash")
    try:
        _busybox()
    except RuntimeError as e:
        missing.append(str(e))
    try:
        find_kernel()
    except RuntimeError as e:
        missing.append(str(e))
    return missing


def qemu_command(*, kernel: Path | str, initrd: Path | str, append: str = DEFAULT_APPEND,
                 mem: str = "512M", smp: int = 1, socket_path: Path | str | None = None,
                 tag: str = "myfs", num_request_queues: int | None = None,
                 queue_size: int | None = None, interactive: bool = False,
                 extra_qemu_args: Iterable[str] = ()) -> list[str]:
    """The command that runs QEMU through qemu-configs/run-qemu.sh."""
    cmd = ["bash", str(RUN_QEMU), "--kernel", str(kernel), "--initrd", str(initrd),
           "--append", append, "--mem", str(mem), "--smp", str(smp),
           "--socket", str(socket_path or ""), "--tag", tag]
    cmd += ["--num-request-queues", "" if num_request_queues is None else str(num_request_queues),
            "--queue-size", "" if queue_size is None else str(queue_size)]
    if interactive:
        cmd += ["--interactive"]
    extra = list(extra_qemu_args)
    if extra:
        cmd += ["--", *extra]
    return cmd


def _build_initrd(workdir: Path, kernel: Kernel, script: str | None,
                  files: Mapping[str, bytes | str | GuestFile] | None, python: bool) -> Path:
    parts = [base_initramfs(kernel).read_bytes()]
    if python:
        layer = python_layer()
        if layer is None:
            raise RuntimeError(f"python=True needs {PYTHON} and {PYTHON_STDLIB} on the host")
        parts.append(layer.read_bytes())
    parts.append(payload_archive(script, files))
    initrd = workdir / "initrd.img"
    initrd.write_bytes(b"".join(parts))
    return initrd


def _append_line(tag: str | None, mount_opts: str | None, extra: str, shell: bool = False) -> str:
    append = DEFAULT_APPEND
    if tag:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", tag):
            raise ValueError(f"tag {tag!r} cannot go on the kernel command line")
        append += f" vfsd.tag={tag}"
        if mount_opts:
            if " " in mount_opts:
                raise ValueError("mount options must not contain spaces")
            append += f" vfsd.opts={mount_opts}"
    if shell:
        append += " vfsd.shell=1"
    if extra:
        append += " " + extra
    return append


def _run(kernel: Kernel, boot_image: Path, script: str | None, *, socket_path, tag, timeout,
         mem, append_extra, extra_qemu_args, files, python, num_request_queues, queue_size,
         smp, mount_opts, mount=True) -> GuestResult:
    verbose = os.environ.get("VFSD_TEST_VERBOSE", "") not in ("", "0")
    with tempfile.TemporaryDirectory(prefix="vfsd-guest-") as wd:
        workdir = Path(wd)
        initrd = _build_initrd(workdir, kernel, script, files, python)
        cmd = qemu_command(kernel=boot_image, initrd=initrd,
                           append=_append_line(tag if socket_path and mount else None,
                                               mount_opts, append_extra),
                           mem=mem, smp=smp, socket_path=socket_path, tag=tag,
                           num_request_queues=num_request_queues, queue_size=queue_size,
                           extra_qemu_args=extra_qemu_args)
        env = dict(os.environ)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, env=env)
        out_chunks: list[bytes] = []
        err_chunks: list[bytes] = []

        ended = threading.Event()   # the script's END line (_RX_END) has come on the console

        def pump(stream, sink: list[bytes], echo: bool, watch: bool = False) -> None:
            tail = b""   # the END line may straddle two reads
            while True:
                chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
                if not chunk:
                    break
                sink.append(chunk)
                if watch and not ended.is_set():
                    if _RX_END.search(tail + chunk):
                        ended.set()
                    tail = (tail + chunk)[-_END_LINE_MAX:]
                if echo:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()

        readers = [threading.Thread(target=pump, args=(proc.stdout, out_chunks, verbose, True),
                                    daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, err_chunks, verbose),
                                    daemon=True)]
        for t in readers:
            t.start()
        timed_out = in_grace = False
        deadline = t0 + timeout
        try:
            while True:
                try:
                    proc.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    pass
                if ended.is_set() and not in_grace:
                    in_grace = True   # the script is done: QEMU now has SHUTDOWN_GRACE
                    deadline = min(deadline, time.monotonic() + SHUTDOWN_GRACE)
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        for t in readers:
            t.join(timeout=10)
        duration = time.monotonic() - t0
    raw = b"".join(out_chunks)
    fields = parse_console(raw)
    result = GuestResult(
        console=raw.decode("utf-8", "replace").replace("\r\n", "\n"),
        timed_out=timed_out, shutdown_hung=timed_out and fields["status"] is not None,
        qemu_returncode=proc.returncode, qemu_pid=proc.pid,
        qemu_stderr=b"".join(err_chunks).decode("utf-8", "replace"),
        duration=duration, command=cmd, **fields)
    if result.shutdown_hung:
        shutdown_hangs.append(result)
    return result


def run_guest(script: str | None, *, socket_path: Path | str | None = None, tag: str = "myfs",
              timeout: float = 240, mem: str = "512M", num_request_queues: int | None = None,
              queue_size: int | None = None, extra_qemu_args: Iterable[str] = (),
              files: Mapping[str, bytes | str | GuestFile] | None = None, python: bool = False,
              mount: bool = True, mount_opts: str | None = None, append: str = "",
              smp: int = 1, kernel: Kernel | None = None) -> GuestResult:
    """Boots a guest, runs `script` (busybox sh) in it, returns what happened.

    socket_path: a vhost-user socket (the daemon must already listen on it); with it the guest
    gets a vhost-user-fs-pci device with `tag`, which /init mounts at /mnt unless mount=False
    (mount_opts: options for that mount).  files: extra files for the guest's rootfs.
    python: add /usr/bin/python3 (about 1 s more boot).  append: extra kernel arguments.
    The run is killed after `timeout` seconds (then timed_out is set and status is None),
    or SHUTDOWN_GRACE seconds after the script ended (then status is the script's, and
    timed_out and shutdown_hung are set: `ok` and `check()` count that as a failure).
    """
    kernel = kernel or find_kernel()
    return _run(kernel, kernel.boot_image(), script, socket_path=socket_path,
                tag=tag, mount=mount, timeout=timeout, mem=mem, append_extra=append,
                extra_qemu_args=tuple(extra_qemu_args), files=files, python=python,
                num_request_queues=num_request_queues, queue_size=queue_size, smp=smp,
                mount_opts=mount_opts)


def interactive_guest(script: str | None = None, *, socket_path: Path | str | None = None,
                      tag: str = "myfs", mem: str = "512M", python: bool = False,
                      files: Mapping[str, bytes | str | GuestFile] | None = None,
                      extra_qemu_args: Iterable[str] = ()) -> int:
    """Boots a guest with a shell on this terminal (after running `script`, if any).
    Ctrl-A X quits QEMU.  Returns QEMU's exit code."""
    kernel = find_kernel()
    with tempfile.TemporaryDirectory(prefix="vfsd-guest-") as wd:
        initrd = _build_initrd(Path(wd), kernel, script, files, python)
        cmd = qemu_command(kernel=kernel.boot_image(), initrd=initrd,
                           append=_append_line(tag if socket_path else None, None, "",
                                               shell=True),
                           mem=mem, socket_path=socket_path, tag=tag, interactive=True,
                           extra_qemu_args=extra_qemu_args)
        return subprocess.call(cmd)
