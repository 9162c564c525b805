"""libvirt starts vfsd for a guest's <filesystem>, as it starts virtiofsd.

A real libvirtd (qemu:///system; started here with `virtlogd -d` and `libvirtd -d` if it is not
running, and left running) creates a transient TCG domain from qemu-configs/libvirt-domain.xml:
memfd shared memory, direct kernel boot of the test kernel with an initramfs from
tests/vm/guest.py, the console in a file, and a virtiofs <filesystem> whose binary is vfsd.
libvirt runs the binary as root; here it is a wrapper script that records its arguments and
execs vfsd as the unprivileged test user (setpriv; the listening socket libvirt passes as --fd
survives the exec).  The guest mounts the share, chowns and chmods a file, makes a device node,
and powers off; the test finds the records on the host, checks how libvirt started vfsd, and
that vfsd is gone once the domain is.

Two launches:

* `<binary path=WRAPPER>` with <cache>, <sandbox> and <thread_pool>.  libvirt 9.0 (Debian 12)
  always starts virtiofsd with the legacy `-o` form and never asks for capabilities; newer
  libvirt runs `--print-capabilities`, sees vfsd's `separate-options` and passes
  `--shared-dir ... --xattr`.  The test accepts the form that matches what libvirt asked.
* No binary path: libvirt finds vfsd through a vhost-user descriptor made from
  qemu-configs/50-vfsd.json, installed as /etc/qemu/vhost-user/00-vfsd-test-PID.json while the
  domain starts (and removed right after).  The wrapper there hides `separate-options`, so
  every libvirt uses the legacy form; the share's path has commas (doubled by libvirt inside
  `-o source=`) and <lock posix='off' flock='off'/> adds `no_posix_lock,no_flock`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.daemon import test_user, unprivileged_python, workdir
from tests.vm import guest
from vfsd import ownership
from vfsd.legacy_options import split_options

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "qemu-configs" / "libvirt-domain.xml"
DESCRIPTOR = REPO / "qemu-configs" / "50-vfsd.json"
URI = "qemu:///system"
VHOST_USER_DIR = Path("/etc/qemu/vhost-user")
LIBVIRT_LOG_DIR = Path("/var/log/libvirt/qemu")
TAG = "vfsdlv"

SCRIPT = """
set -e
cd /mnt
echo hello > f
chown 1234:5678 f
chmod 4755 f
mknod dev c 1 3
chown 7:8 dev
mkdir d
chown 42:43 d
stat -c '%n %u %g %a' f dev d
"""


def _tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def virsh(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([_tool("virsh") or "virsh", "-c", URI, *args], capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"virsh {shlex.join(args)} failed ({r.returncode}): "
                             f"{r.stderr.strip()}")
    return r


@pytest.fixture(scope="module")
def libvirt():
    """A running libvirtd for qemu:///system (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("qemu:///system needs root")
    missing = [t for t in ("virsh", "libvirtd", "virtlogd") if _tool(t) is None]
    if missing:
        why = (f"libvirt is not installed ({', '.join(missing)} missing; tools/setup installs "
               "libvirt-daemon-system, libvirt-daemon-driver-qemu, libvirt-clients)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)
    if virsh("version", check=False, timeout=30).returncode != 0:
        # no systemd here (or it does not run libvirt): start the daemons ourselves
        subprocess.run([_tool("virtlogd"), "-d"], capture_output=True, timeout=30)
        subprocess.run([_tool("libvirtd"), "-d"], capture_output=True, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            r = virsh("version", check=False, timeout=30)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"libvirtd did not come up: {r.stderr.strip()}")
            time.sleep(0.3)
    return virsh


@pytest.fixture(scope="module")
def setup(libvirt):
    """Everything both launches share: a directory libvirt's QEMU user can read (kernel,
    initramfs base), the unprivileged user, its interpreter and a readable copy of vfsd."""
    who = test_user()
    if who is None:
        pytest.skip("cannot create the unprivileged test user")
    uid, gid, user = who
    with workdir("vfsd-libvirt-") as d:
        kernel = guest.find_kernel()
        boot = d / "kernel"
        shutil.copyfile(kernel.boot_image(), boot)   # libvirt relabels it: use our own copy
        os.chmod(boot, 0o644)
        code = d / "code"
        for pkg in ("vfsd", "protocol"):
            shutil.copytree(REPO / pkg, code / pkg,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy(REPO / "pyproject.toml", code / "pyproject.toml")
        subprocess.run(["chmod", "-R", "u=rwX,go=rX", str(code)], check=True)
        yield dict(dir=d, kernel=boot, base_initrd=guest.base_initramfs(kernel).read_bytes(),
                   uid=uid, gid=gid, python=unprivileged_python(uid, gid), code=code)


def write_wrapper(path: Path, s: dict, *, hide_separate_options: bool) -> Path:
    """The <binary> libvirt runs (as root): records each invocation's arguments in
    argv.<pid> next to itself, then execs vfsd as the test user with a clean environment."""
    argv_dir = path.parent
    hide = ""
    if hide_separate_options:
        hide = ('if [ "$1" = --print-capabilities ]; then\n'
                '    echo \'{"type": "fs", "features": []}\'; exit 0\nfi\n')
    vfsd = shlex.join(["setpriv", f"--reuid={s['uid']}", f"--regid={s['gid']}", "--clear-groups",
                       "--", "env", "-i", "PATH=/usr/bin:/bin", "HOME=/",
                       f"PYTHONPATH={s['code']}", "PYTHONDONTWRITEBYTECODE=1",
                       "PYTHONUNBUFFERED=1", s["python"], "-m", "vfsd"])
    path.write_text("#!/bin/sh\n"
                    "# written by tests/vm/test_libvirt.py: libvirt runs this as root\n"
                    f"printf '%s\\0' \"$@\" > {shlex.quote(str(argv_dir))}/argv.$$\n"
                    f"{hide}exec {vfsd} \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def invocations(d: Path) -> dict[int, list[str]]:
    """{pid: argv} of every wrapper run (the pid is vfsd's: the wrapper execs it)."""
    out = {}
    for p in d.glob("argv.*"):
        raw = p.read_bytes()
        out[int(p.name.split(".")[1])] = raw.decode().split("\0")[:-1] if raw else []
    return out


def domain_xml(s: dict, run: Path, *, name: str, share: Path, binary: Path | None,
               binary_children: list[str]) -> str:
    """qemu-configs/libvirt-domain.xml with its placeholders filled in; without `binary`, the
    <binary> element loses its path (libvirt then looks for a vhost-user descriptor)."""
    values = dict(NAME=name, MEMORY_MIB="512", KERNEL=str(s["kernel"]),
                  INITRD=str(run / "initrd.img"), CMDLINE=f"{guest.DEFAULT_APPEND} vfsd.tag={TAG}",
                  VFSD=str(binary or "/nonexistent"), SHARE=str(share), TAG=TAG,
                  CONSOLE_LOG=str(run / "console.log"))
    text = TEMPLATE.read_text()
    for k, v in values.items():
        text = text.replace(f"@{k}@", v.replace("&", "&amp;").replace("'", "&apos;")
                            .replace("<", "&lt;"))
    assert "@" not in text.split("-->", 1)[1], "unfilled placeholder in the template"
    root = ET.fromstring(text)
    b = root.find("./devices/filesystem/binary")
    if binary is None:
        del b.attrib["path"]
    for child in binary_children:
        b.append(ET.fromstring(child))
    return ET.tostring(root, encoding="unicode")


def run_domain(s: dict, run: Path, xml: str, name: str, *, before_start=None,
               after_start=None, timeout: float = 120) -> guest.GuestResult:
    """`virsh create` the transient domain, wait until it has powered off, parse the console."""
    (run / "initrd.img").write_bytes(s["base_initrd"] + guest.payload_archive(SCRIPT))
    os.chmod(run / "initrd.img", 0o644)
    console = run / "console.log"
    console.write_text("")
    os.chmod(console, 0o644)
    (run / "domain.xml").write_text(xml)
    t0 = time.monotonic()
    try:
        if before_start:
            before_start()
        r = virsh("create", str(run / "domain.xml"), check=False)
    finally:
        if after_start:
            after_start()
    assert r.returncode == 0, f"virsh create failed: {r.stderr.strip()}\n{libvirt_log(name)}"
    timed_out = False
    while True:
        st = virsh("domstate", name, check=False)
        if st.returncode != 0 or "shut off" in st.stdout:
            break   # transient: gone once it powered off
        if time.monotonic() - t0 > timeout:
            timed_out = True
            virsh("destroy", name, check=False)
            break
        time.sleep(0.25)
    raw = console.read_bytes()
    res = guest.GuestResult(console=raw.decode("utf-8", "replace"), timed_out=timed_out,
                            duration=time.monotonic() - t0, command=["virsh", "create", xml],
                            **guest.parse_console(raw))
    res.daemon_log = libvirt_log(name)
    return res


def libvirt_log(name: str) -> str:
    p = LIBVIRT_LOG_DIR / f"{name}-fs0-virtiofsd.log"
    try:
        return p.read_text(errors="replace")
    except OSError as e:
        return f"({p}: {e.strerror})"


def check_share(share: Path, s: dict, r: guest.GuestResult) -> None:
    assert r.status == 0, r.explain()
    assert r.output.splitlines() == ["f 1234 5678 4755", "dev 7 8 644", "d 42 43 755"], \
        r.explain()
    expect = {"f": (stat.S_IFREG, 1234, 5678, 0o4755), "dev": (stat.S_IFCHR, 7, 8, 0o644),
              "d": (stat.S_IFDIR, 42, 43, 0o755)}
    for n, (kind, uid, gid, perm) in expect.items():
        st = os.lstat(share / n)
        assert (st.st_uid, st.st_gid) == (s["uid"], s["gid"]), n   # host: the daemon's user
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), n
        rec = ownership.decode(os.getxattr(share / n, "user.o"))
        assert (rec.file_type, rec.uid, rec.gid, rec.perm) == (kind, uid, gid, perm), n
    assert ownership.decode(os.getxattr(share / "dev", "user.o")).rdev == os.makedev(1, 3)
    assert (share / "f").read_bytes() == b"hello\n"


def check_vfsd_lifecycle(s: dict, pid: int, name: str) -> None:
    """vfsd ran unprivileged, and libvirt (or QEMU's hangup) ended it with the domain."""
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"vfsd (pid {pid}) outlived its domain"
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while True:
        log = libvirt_log(name)
        if "exiting" in log or "terminated by" in log or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert f"vfsd[{pid}]" in log and f"as uid {s['uid']} gid {s['gid']}" in log, log
    assert "frontend connected" in log, log
    assert "frontend disconnected; exiting" in log or "terminated by SIGTERM" in log, log
    assert "Traceback" not in log and " ERROR " not in log, log


def make_share(run: Path, s: dict, name: str) -> Path:
    share = run / name
    share.mkdir()
    os.chown(share, s["uid"], s["gid"])
    return share


@pytest.fixture
def run_dir(setup, request):
    d = setup["dir"] / request.node.name.replace("[", "-").replace("]", "")
    d.mkdir()
    os.chmod(d, 0o711)
    return d


def test_libvirt_binary_path(setup, run_dir):
    s, run = setup, run_dir
    name = f"vfsd-test-{os.getpid()}-path"
    share = make_share(run, s, "share")
    wrapper = write_wrapper(run / "vfsd-wrapper", s, hide_separate_options=False)
    xml = domain_xml(s, run, name=name, share=share, binary=wrapper,
                     binary_children=["<cache mode='always'/>", "<sandbox mode='chroot'/>",
                                      "<thread_pool size='2'/>"])
    r = run_domain(s, run, xml, name)
    check_share(share, s, r)

    calls = invocations(run)
    asked = [pid for pid, argv in calls.items() if argv == ["--print-capabilities"]]
    launches = {pid: argv for pid, argv in calls.items() if pid not in asked}
    assert len(launches) == 1, calls
    pid, argv = launches.popitem()
    assert argv[0].startswith("--fd="), argv
    assert "--thread-pool-size=2" in argv, argv
    if asked:   # libvirt >= 9.x reads vfsd's separate-options
        assert argv[argv.index("--shared-dir") + 1] == str(share), argv
        assert "--xattr" in argv and "chroot" in argv and "always" in argv, argv
    else:       # libvirt 9.0: the legacy form, always
        items = split_options(argv[argv.index("-o") + 1])
        assert set(items) == {f"source={share}", "cache=always", "sandbox=chroot", "xattr"}, argv
    log = libvirt_log(name)
    assert "--sandbox=chroot: vfsd runs unprivileged" in log, log
    check_vfsd_lifecycle(s, pid, name)


def test_libvirt_descriptor_and_legacy_options(setup, run_dir):
    s, run = setup, run_dir
    name = f"vfsd-test-{os.getpid()}-descriptor"
    share = make_share(run, s, "share,with,commas")
    wrapper = write_wrapper(run / "vfsd-wrapper", s, hide_separate_options=True)
    descriptor = json.loads(DESCRIPTOR.read_text())
    assert descriptor["type"] == "fs"
    descriptor.update(binary=str(wrapper), features=[])
    installed = VHOST_USER_DIR / f"00-vfsd-test-{os.getpid()}.json"
    for stale in VHOST_USER_DIR.glob("00-vfsd-test-*.json"):   # from a killed run
        if not Path(f"/proc/{stale.stem.rsplit('-', 1)[1]}").exists():
            stale.unlink(missing_ok=True)
    created = [p for p in (VHOST_USER_DIR.parent, VHOST_USER_DIR) if not p.exists()]

    lock = open("/run/lock/vfsd-test-libvirt-descriptor", "w")   # one test run at a time

    def install():
        fcntl.flock(lock, fcntl.LOCK_EX)
        VHOST_USER_DIR.mkdir(parents=True, exist_ok=True)
        installed.write_text(json.dumps(descriptor))

    def remove():
        installed.unlink(missing_ok=True)
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                pass
        lock.close()

    xml = domain_xml(s, run, name=name, share=share, binary=None,
                     binary_children=["<lock posix='off' flock='off'/>"])
    r = run_domain(s, run, xml, name, before_start=install, after_start=remove)
    assert not installed.exists()
    check_share(share, s, r)

    launches = {pid: argv for pid, argv in invocations(run).items()
                if argv != ["--print-capabilities"]}
    assert len(launches) == 1, launches
    pid, argv = launches.popitem()
    assert argv[0].startswith("--fd=") and argv[1] == "-o", argv
    assert f"source={str(share).replace(',', ',,')}" in argv[2], argv   # libvirt's escaping
    assert set(split_options(argv[2])) == {f"source={share}", "xattr", "no_flock",
                                           "no_posix_lock"}, argv
    check_vfsd_lifecycle(s, pid, name)
