"""virtiofsd's legacy ``-o`` option form: ``-o source=DIR,cache=auto,xattr``.

This is what the original C virtiofsd (QEMU <= 7.2, ``/usr/lib/qemu/virtiofsd``) took and
what the Rust virtiofsd still accepts for compatibility; libvirt uses it for every backend
whose ``--print-capabilities`` does not list ``separate-options``.  Several ``-o`` may be
given; each is a comma-separated list of ``key`` or ``key=value`` items, and ``,,`` stands
for a literal comma (libvirt doubles the commas in a path it passes as ``source=``).

The items are applied after every long option, in order, so ``-o`` wins, as in virtiofsd.
Unknown items are an error.  docs/virtiofsd-compat.md lists what each one does in vfsd.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["LegacyOptionError", "split_options", "apply_legacy_options", "LEGACY_KEYS"]


class LegacyOptionError(ValueError):
    pass


def split_options(value: str) -> list[str]:
    """Splits one ``-o`` argument at commas; ``,,`` is a comma inside an item.  Empty items
    (from a trailing comma, say) are dropped."""
    items: list[str] = []
    cur: list[str] = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == ",":
            if i + 1 < n and value[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return [item for item in items if item]


# Each handler gets the argparse namespace (dests as in vfsd.cli), the value (None for a
# bare key) and a list to append (level, message) notes to.
Handler = Callable[[object, "str | None", list], None]

_CACHE = {"auto": "auto", "always": "always", "none": "never", "never": "never",
          "metadata": "metadata"}
_LOG_LEVEL = {"debug": "debug", "info": "info", "warn": "warn", "warning": "warn",
              "err": "error", "error": "error", "trace": "trace", "off": "off"}
_SANDBOX = ("namespace", "chroot", "none")


def _flag(dest: str, value: bool) -> Handler:
    def set_flag(ns, v, notes):
        setattr(ns, dest, value)
    return set_flag


def _choice(dest: str, table: dict | tuple) -> Handler:
    def set_choice(ns, v, notes):
        key = v.lower()
        if key not in table:
            raise LegacyOptionError(f"expected one of {', '.join(table)}")
        setattr(ns, dest, table[key] if isinstance(table, dict) else key)
    return set_choice


def _string(dest: str) -> Handler:
    def set_string(ns, v, notes):
        if not v:
            raise LegacyOptionError("needs a value")
        setattr(ns, dest, v)
    return set_string


def _timeout(ns, v, notes):
    try:
        t = float(v)
    except ValueError:
        t = -1.0
    if not t >= 0 or t != t or t == float("inf"):
        raise LegacyOptionError("expected a number of seconds >= 0")
    ns.timeout = t


def _debug(ns, v, notes):
    ns.log_level = "debug"


def _no_effect(why: str) -> Handler:
    def note(ns, v, notes):
        notes.append(("info", why))
    return note


def _max_idle_threads(ns, v, notes):
    if not (v or "").isdigit():
        raise LegacyOptionError("expected a number")
    notes.append(("info", "-o max_idle_threads has no effect: vfsd runs a fixed number of "
                          "threads (one for all the queues, plus the pool of "
                          "--thread-pool-size)"))


def _remote_locks(which: str) -> Handler:
    def refuse(ns, v, notes):
        raise LegacyOptionError(
            f"vfsd does not implement remote {which} locks (the guest kernel keeps "
            f"{which} locks local to the guest, which is what no_{which.replace('-', '_')}"
            " gives); remove the option")
    return refuse


#: key -> (takes a value?, handler)
LEGACY_KEYS: dict[str, tuple[bool, Handler]] = {
    "source": (True, _string("shared_dir")),
    "cache": (True, _choice("cache", _CACHE)),
    "timeout": (True, _timeout),
    "xattr": (False, _flag("xattr", True)),
    "no_xattr": (False, _flag("xattr", False)),
    "posix_acl": (False, _flag("posix_acl", True)),
    "no_posix_acl": (False, _flag("posix_acl", False)),
    "security_label": (False, _flag("security_label", True)),
    "no_security_label": (False, _flag("security_label", False)),
    "readdirplus": (False, _flag("readdirplus", True)),
    "no_readdirplus": (False, _flag("readdirplus", False)),
    "writeback": (False, _flag("writeback", True)),
    "no_writeback": (False, _flag("writeback", False)),
    "allow_direct_io": (False, _flag("allow_direct_io", True)),
    "no_allow_direct_io": (False, _flag("allow_direct_io", False)),
    "announce_submounts": (False, _flag("announce_submounts", True)),
    "no_announce_submounts": (False, _flag("announce_submounts", False)),
    "killpriv_v2": (False, _flag("killpriv_v2", True)),
    "no_killpriv_v2": (False, _flag("killpriv_v2", False)),
    "xattrmap": (True, _string("xattrmap")),
    "modcaps": (True, _string("modcaps")),
    "log_level": (True, _choice("log_level", _LOG_LEVEL)),   # C virtiofsd
    "loglevel": (True, _choice("log_level", _LOG_LEVEL)),    # Rust virtiofsd's -o spelling
    "debug": (False, _debug),
    "sandbox": (True, _choice("sandbox", _SANDBOX)),
    "flock": (False, _remote_locks("flock")),
    "posix_lock": (False, _remote_locks("posix_lock")),
    "no_flock": (False, lambda ns, v, notes: None),        # vfsd's behaviour
    "no_posix_lock": (False, lambda ns, v, notes: None),   # vfsd's behaviour
    "norace": (False, _no_effect("-o norace has no effect: vfsd has no racy fallback path")),
    "allow_root": (False, _no_effect("-o allow_root has no effect: it is a FUSE mount option, "
                                     "and the guest kernel mounts virtio-fs itself")),
    "max_idle_threads": (True, _max_idle_threads),
}


def apply_legacy_options(ns, values: list[str] | None, notes: list) -> None:
    """Applies every ``-o`` argument in `values` (in order) to the argparse namespace `ns`.
    Raises LegacyOptionError naming the offending item."""
    for value in values or ():
        for item in split_options(value):
            key, eq, v = item.partition("=")
            spec = LEGACY_KEYS.get(key)
            if spec is None:
                raise LegacyOptionError(f"-o {item}: unknown option (vfsd accepts: "
                                        f"{', '.join(sorted(LEGACY_KEYS))})")
            takes_value, handler = spec
            if takes_value and not eq:
                raise LegacyOptionError(f"-o {item}: needs a value (-o {key}=...)")
            if not takes_value and eq:
                raise LegacyOptionError(f"-o {item}: takes no value")
            try:
                handler(ns, v if eq else None, notes)
            except LegacyOptionError as e:
                raise LegacyOptionError(f"-o {item}: {e}") from None
