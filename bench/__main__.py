"""vfsd benchmarks (they print figures; they are not tests).

    python3 -m bench guest  [--backends vfsd,virtiofsd,9p,tmpfs] [--quick]
    python3 -m bench micro  [--quick] [--depth N]
    python3 -m bench memory [--files N]
    python3 -m bench profile [--quick] [--top N] [--py-spy]
    python3 -m bench components      (per-request costs of vfsd's pieces, in process)
    python3 -m bench instructions [--compare REV]   (the same, counted by valgrind: no noise)
    python3 -m bench listing [--backends ...] (ls -ln of a long directory, timed in the guest)
    python3 -m bench paired [--backends vfsd,virtiofsd] [--rounds 4]  (both in one guest,
                                                          phase by phase)

`--wait-idle SECONDS` (any benchmark) first waits up to that long for the machine to be idle
(1-minute load average under 0.6, no other QEMU or vfsd running); the load is printed either
way, since a busy machine skews every figure.

Run from the repository root, as root (the daemon then runs as the unprivileged user
vfsd-test, like the test suite; the C virtiofsd and 9p need root).  docs/performance.md has
the figures measured on the project's machines.

The host-side Python (the vhost-user frontend and the direct-syscall baselines) runs on the
same interpreter as the daemon: when that is not this one, the command re-executes itself with
/usr/bin/python3 (set VFSD_BENCH_NO_REEXEC=1 to stop that).
"""

from __future__ import annotations

import os
import sys

SYSTEM_PYTHON = "/usr/bin/python3"


def _reexec() -> None:
    if os.environ.get("VFSD_BENCH_NO_REEXEC") or os.geteuid() != 0:
        return
    if not os.path.exists(SYSTEM_PYTHON):
        return
    if os.path.realpath(sys.executable) == os.path.realpath(SYSTEM_PYTHON):
        return
    os.environ["VFSD_BENCH_NO_REEXEC"] = "1"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = repo + (os.pathsep + os.environ["PYTHONPATH"]
                                       if os.environ.get("PYTHONPATH") else "")
    os.execv(SYSTEM_PYTHON, [SYSTEM_PYTHON, "-m", "bench", *sys.argv[1:]])


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], list(argv[1:])
    wait = 0.0
    if "--wait-idle" in rest:
        i = rest.index("--wait-idle")
        wait = float(rest[i + 1])
        del rest[i:i + 2]
    if cmd == "guest":
        from .guest import main as m
    elif cmd == "micro":
        from .micro import main as m
    elif cmd == "memory":
        from .memory import main as m
    elif cmd == "profile":
        from .profile import main as m
    elif cmd == "components":
        from .components import main as m
    elif cmd == "instructions":
        from .instructions import main as m
    elif cmd == "listing":
        from .listing import main as m
    elif cmd == "paired":
        from .paired import main as m
    else:
        print(f"unknown benchmark {cmd!r}\n\n{__doc__.strip()}", file=sys.stderr)
        return 2
    import subprocess
    from .common import loadavg, quiet_machine
    rev = subprocess.run(["git", "-C", os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "describe", "--always", "--dirty"], capture_output=True, text=True)
    print(f"# {cmd}: code {rev.stdout.strip() or '?'}; {quiet_machine(wait)}", flush=True)
    try:
        return m(rest)
    finally:
        print(f"# {cmd}: load average {loadavg():.2f} at end", flush=True)


if __name__ == "__main__":
    _reexec()
    sys.exit(main(sys.argv[1:]))
