"""The guest machinery itself: output and exit status come back exactly, timeouts kill QEMU,
a shutdown that hangs on its daemon is a failure, the images are what the kernel expects."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import threading
import time
import zlib

import pytest

from tests.vm import guest as g
from tests.vm.guest import GuestFailure, GuestFile, MARK, run_guest


def test_output_and_status_round_trip():
    r = run_guest("echo hello; echo to-stderr >&2; printf 'no newline'; exit 7", timeout=120)
    assert r.booted and r.powered_off and not r.timed_out, r.explain()
    assert r.status == 7, r.explain()
    assert r.output == "hello\nto-stderr\nno newline"
    assert r.mounted is None            # no device, nothing mounted
    assert r.qemu_returncode == 0, r.explain()
    with pytest.raises(GuestFailure) as e:
        r.check()
    assert "status 7" in str(e.value) and "no newline" in str(e.value)


def test_output_is_byte_exact_and_modules_load():
    script = r"""
printf 'a\r\nb\tc\001\377\n'
grep -c . /lib/modules/load-order >/dev/null
grep -w virtiofs /proc/filesystems
cat /sys/module/virtiofs/initstate 2>/dev/null || echo builtin
"""
    r = run_guest(script, timeout=120).check()
    assert r.output_bytes.startswith(b"a\r\nb\tc\x01\xff\n"), r.output_bytes[:40]
    assert "\tvirtiofs\n" in r.output
    assert r.output.endswith("live\n") or r.output.endswith("builtin\n")


def test_payload_files_and_guest_tools():
    files = {
        "/data/blob": bytes(range(256)) * 4,
        "/data/tool.sh": GuestFile("#!/bin/sh\necho tool $1\n", mode=0o755),
        "/data/link": GuestFile("blob", kind=stat.S_IFLNK),
        "/data/owned": GuestFile("x", mode=0o640, uid=1234, gid=5678),
    }
    script = r"""
set -e
md5sum /data/blob | cut -d' ' -f1
/data/tool.sh ok
readlink /data/link
stat -c '%a %u:%g' /data/owned
su -s /bin/sh user -c 'id -u'
cd /tmp && mkfifo p && mknod c c 1 3 && stat -c '%F' p c
ln -s /tmp/sock /dev/log && syslogd -n -O /dev/null & sleep 1; stat -c '%F' /tmp/sock
getfacl --version >/dev/null && setfattr --version >/dev/null && echo xattr-tools
"""
    import hashlib
    r = run_guest(script, files=files, timeout=120).check()
    assert r.output.split("\n") == [
        hashlib.md5(files["/data/blob"]).hexdigest(), "tool ok", "blob", "640 1234:5678",
        "1000", "fifo", "character special file", "socket", "xattr-tools", ""], r.explain()


def test_timeout_kills_qemu():
    t0 = time.monotonic()
    r = run_guest("echo started; sleep 600", timeout=10)
    assert r.timed_out and r.status is None
    assert r.output == "started\n", r.explain()
    assert time.monotonic() - t0 < 40
    assert r.qemu_returncode == -9
    with pytest.raises(ProcessLookupError):
        os.kill(r.qemu_pid, 0)
    assert "timed out" in r.explain()


def test_a_shutdown_that_hangs_on_the_daemon_fails_in_the_grace(start_vfsd, monkeypatch):
    """The script passes, then the daemon stops answering (SIGSTOP, a while after the
    script's last request, a MKDIR, and before the script ends): the guest's sync and
    umount wait for it.  QEMU is killed SHUTDOWN_GRACE after the script ended, not at the
    timeout, and the run is a failure that says where the shutdown stopped."""
    monkeypatch.setattr(g, "SHUTDOWN_GRACE", 5.0)
    daemon = start_vfsd()
    flag = daemon.shared_dir / "stop-now"
    stopped = threading.Event()

    def stop_when_flagged() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not flag.exists():
            time.sleep(0.01)
        if flag.exists():
            # The host sees the directory before the daemon has replied: give it time to.
            # (One request, so no FLUSH or RELEASE follows it; the guest sleeps 6 s more.)
            time.sleep(2)
            os.killpg(daemon.proc.pid, signal.SIGSTOP)   # (its own session)
            stopped.set()

    watcher = threading.Thread(target=stop_when_flagged, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        # (the sleep gives the host time to stop the daemon before /init's sync)
        r = run_guest("mkdir /mnt/stop-now; sleep 6; echo done", timeout=200,
                      socket_path=daemon.socket_path)
    finally:
        watcher.join(timeout=5)   # (not to stop the daemon after the SIGCONT)
        os.killpg(daemon.proc.pid, signal.SIGCONT)
    hung = [x for x in g.shutdown_hangs if x is r]
    for x in hung:   # this test's hang is the one expected; the conftest fails others
        g.shutdown_hangs.remove(x)
    assert stopped.is_set(), r.explain()
    assert r.status == 0 and r.output == "done\n", r.explain()
    assert r.timed_out and r.shutdown_hung and hung and not r.ok, r.explain()
    assert not r.powered_off and r.umount_status is None
    assert time.monotonic() - t0 < 120, "killed at the timeout, not after the grace"
    with pytest.raises(GuestFailure) as e:
        r.check()
    assert "shutdown hung at the sync or umount of the share" in str(e.value)


def test_python_layer():
    r = run_guest("python3 -c 'import os, socket, ctypes, json; print(sum(range(10)))'",
                  python=True, timeout=180).check()
    assert r.output == "45\n"


# -- no VM needed --------------------------------------------------------------------------


def test_parse_console_variants():
    m = MARK.encode()
    full = (b"[ 1.0] noise\r\n" + m + b" BOOTED 1.5\n" + m + b" MOUNTED myfs\n" + m +
            b" BEGIN\nline\r\n\n" + m + b" END status=3\n" + m + b" KLOG-BEGIN\n<4>[ 2.0] warn\n"
            + m + b" KLOG-END\n" + m + b" UMOUNT status=0\n" + m + b" POWEROFF\n")
    f = g.parse_console(full)
    assert f["status"] == 3 and f["output"] == "line\r\n" and f["mounted"] is True
    assert f["kernel_log"] == "<4>[ 2.0] warn\n" and f["umount_status"] == 0
    assert f["powered_off"] and f["booted"]

    partial = g.parse_console(m + b" BOOTED 1\n" + m + b" BEGIN\nhalf way")
    assert partial["status"] is None and partial["output"] == "half way"

    failed = g.parse_console(m + b" BOOTED 1\nmount: mounting myfs on /mnt failed: "
                             b"No such device\n" + m + b" MOUNT-FAILED rc=255\n")
    assert failed["mounted"] is False and "No such device" in failed["mount_error"]
    assert failed["status"] is None

    assert g.parse_console(b"Kernel panic")["booted"] is False


@pytest.mark.skipif(not shutil.which("cpio"), reason="needs GNU cpio to cross-check")
def test_cpio_archive_readable_by_gnu_cpio(tmp_path):
    w = g.CpioWriter()
    w.add_dirs("a/b")
    w.add_file("a/b/f", b"data", 0o600)
    w.add_symlink("a/l", "b/f")
    w.add_node("a/fifo", stat.S_IFIFO, 0o644)
    data = w.finish()
    listing = subprocess.run(["cpio", "-itv"], input=data, capture_output=True).stdout.decode()
    assert "a/b/f" in listing and "a/l -> b/f" in listing and listing.startswith("drwxr-xr-x")
    subprocess.run(["cpio", "-id", "--quiet"], input=data, cwd=tmp_path, check=True)
    assert (tmp_path / "a/b/f").read_bytes() == b"data"
    assert stat.S_IMODE((tmp_path / "a/b/f").stat().st_mode) == 0o600
    payload = g.payload_archive("echo hi", {"/x/y": b"1"})
    assert len(payload) % 4 == 0
    assert b"test.sh" in zlib.decompressobj(wbits=31).decompress(payload)  # padding after it


def test_run_qemu_script_device_line():
    cmd = g.qemu_command(kernel="/k", initrd="/i", socket_path="/run/a,b.sock", tag="t1",
                         num_request_queues=2, queue_size=1024, extra_qemu_args=["-cpu", "max"])
    out = subprocess.run(cmd + [], capture_output=True, text=True,
                         env=dict(os.environ, DRY_RUN="1")).stdout
    assert "memory-backend-memfd" in out and "share=on" in out and "-accel tcg" in out
    assert "vhost-user-fs-pci" in out and "tag=t1" in out and "queue-size=1024" in out
    assert "num-request-queues=2" in out and "path=/run/a,,b.sock" in out.replace("\\", "")
    assert out.rstrip().endswith("-cpu max")


def test_lz4_legacy_decoder(tmp_path):
    lz4 = shutil.which("lz4")
    if not lz4:
        pytest.skip("no lz4 program to make test data")
    data = (b"abcabcabc" * 1000 + os.urandom(3000) + b"\0" * 70000) * 3
    src = tmp_path / "d"
    src.write_bytes(data)
    subprocess.run([lz4, "-l", "-q", "-f", str(src), str(tmp_path / "d.lz4")], check=True)
    assert g._lz4_legacy_decompress((tmp_path / "d.lz4").read_bytes()) == data
