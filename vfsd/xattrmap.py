"""virtiofsd's --xattrmap: rule-based renaming of xattr names (pure).

Rules as virtiofsd's doc/xattr-mapping.md defines them: the first matching
rule applies; `prefix` puts `prepend` in front of a client name that starts
with `key` and strips `prepend` from a server name that starts with it; `ok`
passes a name unchanged; `bad` refuses it (EPERM; hidden from listings);
`unsupported` likewise with ENOTSUP.  A name no rule matches cannot be mapped
("there must be a mapping for every xattr name"): EPERM, hidden.

In vfsd the "server" side is the guest-level name space that vfsd then stores
through its own escaping (ownership.XattrNames), so a map written for an
unprivileged virtiofsd (e.g. trusted.* -> user.virtiofs.trusted.*) still works.
"""

from __future__ import annotations

import errno
from typing import Iterable, Protocol


class Rule(Protocol):
    type: str  # prefix | ok | bad | unsupported
    scope: str  # client | server | all
    key: str
    prepend: str


_REFUSE = {"bad": errno.EPERM, "unsupported": errno.ENOTSUP}


class XattrMap:
    def __init__(self, rules: Iterable[Rule]):
        rules = list(rules)
        self._client = [(r.type, r.key.encode(), r.prepend.encode())
                         for r in rules if r.scope in ("client", "all")]
        self._server = [(r.type, r.prepend.encode())
                        for r in rules if r.scope in ("server", "all")]

    def to_server(self, name: bytes) -> bytes:
        """A client (guest) name as the server stores it; OSError if refused."""
        for kind, key, prepend in self._client:
            if name.startswith(key):
                if kind == "prefix":
                    return prepend + name
                if kind == "ok":
                    return name
                raise OSError(_REFUSE[kind], f"xattr {name!r} refused by --xattrmap")
        raise OSError(errno.EPERM, f"xattr {name!r} matches no --xattrmap rule")

    def to_client(self, name: bytes) -> bytes | None:
        """A server name as the client sees it in listxattr, or None (hidden)."""
        for kind, prepend in self._server:
            if name.startswith(prepend):
                if kind == "prefix":
                    return name[len(prepend):]
                return name if kind == "ok" else None
        return None
