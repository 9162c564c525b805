"""The filesystem: a shared host directory served to the guest, unprivileged.

Only this module makes host filesystem calls.  Rules it keeps (see
docs/ownership.md and ../shared/design/ownership.md):

* Every live node holds an O_PATH fd (up to the fd budget: past it, the oldest
  give theirs up and are reopened by name, see "The fd budget"); every call
  is an `*at` call relative to such an fd with a single, checked name
  component (`server.check_name`), opened with O_NOFOLLOW, so no guest name
  can reach outside the shared directory ('..', '/', symlinks and NUL never
  get that far).
* The guest's uid/gid/mode/device number live in a record xattr on the host
  inode (`ownership.encode`); the host inode stays owned by the daemon's user
  with a safe mode (`ownership.host_mode_for`).  Objects without a valid
  record show the default owner (`ownership.default_record`).
* Guest symlinks, device nodes, FIFOs and sockets are regular host files
  carrying their record (Linux refuses user.* xattrs on the real thing, and
  the daemon must never open a host special file for the guest); a symlink
  file holds its target.
* New regular objects are created as O_TMPFILE, get content and record, and
  only then are linked into place, so a crash never shows a file whose
  record is missing or half-written.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import stat
import sys
import threading
import time
from collections import OrderedDict, deque

from . import ownership, syscalls
from . import posix_acl as pacl
from .closer import FdCloser
from .grace import DeferredClose
from .fsapi import (Attr, Ctx, Entry, Opened, SetAttr, StatFs, new_attr,
                    new_dirent, new_entry)
from .ownership import Record, RecordError
from .syscalls import proc_fd
from .xattrmap import XattrMap

log = logging.getLogger(__name__)

ROOT_ID = 1
_OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_TRUNC | os.O_TMPFILE
_HOST_RECORD_TYPES = (stat.S_IFREG, stat.S_IFDIR)  # host types that can carry user.*
_MAX_SYMLINK = 4095
XATTR_CREATE, XATTR_REPLACE = os.XATTR_CREATE, os.XATTR_REPLACE
SECURITY_CAPABILITY = b"security.capability"
_ACL_NAMES = (pacl.ACCESS, pacl.DEFAULT)
# Open flags a new file's handle needs a real open(2) for (fcntl F_SETFL cannot
# set them on the creating fd): synchronous writes, O_DIRECT, O_NOATIME.
_NEEDS_REOPEN = os.O_SYNC | os.O_DSYNC | os.O_DIRECT | os.O_NOATIME
_MAX_MEMO = 4096  # entries in each of PassthroughFs's memo dicts
_MAX_FORGOTTEN = 16384  # records kept for forgotten nodes (PassthroughFs._forgotten)
# With coarse timestamps, an inode changed less than a clock tick (1-10 ms)
# before we looked may change again without its ctime moving.
_RACY_NS = 50_000_000


def _creator_id(value: int) -> int:
    """fuse_in_header's uid or gid as the owner of a new object.  (u32)-1 is
    no owner: the guest's fuse sends no request with it (fs/fuse/dev.c,
    fuse_get_req: EOVERFLOW, for ids its user namespace cannot map), so only a
    misbehaving guest gets here, and it gets the same answer."""
    if value > ownership.MAX_ID:
        raise OSError(errno.EOVERFLOW, f"id {value} cannot own a file")
    return value


# os.fsencode's conversion, as constants: the snapshot encodes every name of a
# listing (os.scandir of an fd gives str names), and os.fsencode is a Python
# call per name.
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()

# Per-node locks (record read-modify-write, _materialize) come from a small
# shared pool instead of one Lock per node: a LOOKUP of a new node then
# allocates no lock, and a node costs less memory.  Two nodes may share a lock;
# that only serializes them, since no code path holds two node locks at once.
_NODE_LOCKS = tuple(threading.Lock() for _ in range(64))
_NO_NAMES: frozenset[bytes] = frozenset()


def _proc_path(fd: int) -> bytes:
    """`/proc/self/fd/N` as bytes: the syscalls take bytes without re-encoding."""
    return b"/proc/self/fd/%d" % fd


class Inode:
    """One live node.  Slotted and without per-node Lock or list: the guest
    makes and forgets thousands of them, each a LOOKUP on the hot path."""

    __slots__ = ("nodeid", "fd", "path", "key", "nlookup", "record", "record_loaded",
                 "bad_record_logged", "retired_fds", "default", "xabsent", "seen_ctime",
                 "live_children", "parent", "name", "opened", "evicted")

    def __init__(self, nodeid: int, fd: int, key: tuple[int, int], nlookup: int = 0):
        self.nodeid = nodeid
        self.fd = fd  # O_PATH
        # names the inode for *xattr, reopen, chmod, utimes (_proc_path, inlined)
        self.path = b"/proc/self/fd/%d" % fd
        self.key = key  # (st_dev, st_ino)
        self.nlookup = nlookup
        # Cached record: a write by this daemon updates it; it is read once per
        # live node (host-side record edits show after the node is forgotten).
        self.record: Record | None = None
        self.record_loaded = False
        self.bad_record_logged = False
        # fds replaced by _materialize, closed with the node (another thread
        # may still be using the number, which must not be reused under it)
        self.retired_fds: list[int] | None = None
        # The default record (no valid record of our own), keyed by the host
        # fields it is made from, so GETATTR does not rebuild it every time.
        self.default: tuple[tuple, Record] | None = None
        # Host xattr names in the daemon's reserved tree (R.*: the guest's
        # ACLs, capabilities, trusted.*/security.*) known to be absent, so the
        # guest kernel's many GETXATTRs of them (each chmod, write, create
        # asks for an ACL or security.capability) need no syscall.  Like the
        # record, it is kept per live node and updated by every xattr write
        # of this daemon; a host-side edit of R.* shows once the node is
        # forgotten.  Replaced, never mutated (see PassthroughFs._xabsent_add).
        self.xabsent: frozenset[bytes] = _NO_NAMES
        # st_ctime_ns of the host inode when its record was read (the fstat
        # before the getxattr), or just after this daemon wrote it; None when
        # unknown.  What PassthroughFs._forgotten checks a record against.
        self.seen_ctime: int | None = None
        # Whether the last LOOKUP of a name in this directory found a live
        # node (PassthroughFs.lookup: which way to look the next one up).
        self.live_children = True
        # Where the node was last looked up, made or renamed to by the guest:
        # the name it is reopened by once its fd was closed to stay within
        # the fd budget (PassthroughFs._evict).  None: no name known.
        self.parent: Inode | None = None
        self.name: bytes | None = None
        self.opened = 0  # open handles (a node with any keeps its fd)
        # While the fd is closed (`fd` and `path` deleted): (the filesystem,
        # the inode's file handle), which the reopened fd must show again;
        # (the filesystem, None) once it cannot be reopened.
        self.evicted: tuple[PassthroughFs, bytes | None] | None = None

    @property
    def lock(self) -> threading.Lock:
        return _NODE_LOCKS[self.nodeid & 63]

    def set_fd(self, fd: int) -> None:
        self.fd, self.path = fd, _proc_path(fd)


class EvictedInode(Inode):
    """An Inode whose fd was closed (PassthroughFs._evict): the instance's class
    while it is evicted, so that only its attribute reads pay for the hook that
    opens it again (a class with __getattr__ reads every attribute slower, and
    Inode's are read on every request)."""

    __slots__ = ()

    def __getattr__(self, attr: str):
        # Only reached for a slot that is not set: `fd` and `path`, which the
        # first use opens again by name.
        if attr in ("fd", "path") and self.evicted is not None:
            fd, path = self.evicted[0]._reopen(self)
            return fd if attr == "fd" else path
        raise AttributeError(attr)


class Handle:
    __slots__ = ("fd", "nodeid", "is_dir", "entries", "lock")

    def __init__(self, fd: int, nodeid: int, is_dir: bool = False):
        self.fd = fd
        self.nodeid = nodeid
        self.is_dir = is_dir
        self.entries: list | None = None  # directory snapshot for READDIR offsets
        # only directory handles need one (READDIR snapshot); files have none
        self.lock = threading.Lock() if is_dir else None


class PassthroughFs:
    def __init__(self, shared_dir: str, *, record_name: str = ownership.DEFAULT_RECORD_NAME.decode(),
                 uidmap: ownership.IdMap | None = None, gidmap: ownership.IdMap | None = None,
                 key: bytes | None = None, readonly: bool = False, posix_acl: bool = True,
                 allow_direct_io: bool = False, preserve_noatime: bool = False,
                 xattrmap: XattrMap | None = None, writeback: bool = False,
                 fd_budget: int | None = None):
        """`writeback`: the session offers the guest its writeback cache
        (FUSE_WRITEBACK_CACHE), which changes how files must be opened.
        `fd_budget`: how many nodes may hold an O_PATH fd at once (see
        `_evict`); None for no bound."""
        self.writeback = writeback
        self.record_name = record_name
        self._record_name_b = record_name.encode()
        self.names = ownership.XattrNames(self._record_name_b)
        # ACL bookkeeping (mode <-> access ACL, default ACL inheritance) is
        # only done when the guest kernel uses ACLs (FUSE_POSIX_ACL).
        self.posix_acl = posix_acl
        self._acl_access = self.names.guest_to_host(pacl.ACCESS)
        self._acl_default = self.names.guest_to_host(pacl.DEFAULT)
        self._caps = self.names.guest_to_host(SECURITY_CAPABILITY)
        # What a new object made by this daemon is known not to carry (see
        # Inode.xabsent): the reserved names the guest kernel keeps asking for.
        self._new_xabsent = frozenset((self._acl_access, self._acl_default, self._caps))
        # Only names in the daemon's reserved tree are cached as absent; other
        # user.* xattrs belong to host users as much as to the guest.
        self._reserved_prefix = self._record_name_b + b"."
        # Memo of guest xattr name -> host name (a pure function of the
        # configuration), and of record bytes -> decoded Record (immutable, so
        # one object serves every node with the same owner and mode).  Both
        # are bounded: the guest chooses the names and the records.
        self._xname_memo: dict[bytes, bytes] = {}
        self._decoded: dict[bytes, Record] = {}
        self._xgen = 0  # bumped after each xattr write (see _xabsent_add)
        self._name_sets: dict[frozenset[bytes], frozenset[bytes]] = {}
        # Record and xabsent of recently forgotten nodes, by host (st_dev,
        # st_ino), with the st_ctime_ns they were last seen valid at.  The
        # guest forgets inodes under memory pressure (or drop_caches) and looks
        # them up again soon; a record read is then a getxattr through procfs,
        # the dearest syscall of a LOOKUP.  Every change of an inode's xattrs
        # (or mode, owner, links, data) moves its ctime, so an unchanged ctime
        # means the record is still the one the node was forgotten with; with
        # multigrain timestamps (Linux 6.13+) even a change in the same clock
        # tick as our fstat shows; without them (see _seen) a ctime that
        # recent is not trusted.  Bounded, oldest dropped first.
        self._forgotten: OrderedDict[tuple[int, int], tuple[int, Record | None,
                                                            frozenset[bytes]]] = OrderedDict()
        self.xattrmap = xattrmap
        # virtiofsd drops O_DIRECT (page-cache coherency with the guest's own
        # cache) and O_NOATIME (EPERM on files one does not own) by default.
        # Bit 31 and up are no open flag (open(2) drops what is not in
        # VALID_OPEN_FLAGS) and would not fit the C int the host call takes.
        self._open_keep = 0x7FFFFFFF & ~(_OPEN_STRIP | (0 if allow_direct_io else os.O_DIRECT) | (
            0 if preserve_noatime else os.O_NOATIME))
        self.uidmap = uidmap
        self.gidmap = gidmap
        self.key = key
        self.readonly = readonly
        self._lock = threading.Lock()
        # The fds of forgotten nodes are closed there (see vfsd/closer.py).
        self.closer = FdCloser()
        # The fds of evicted nodes, closed once no request can still use them;
        # the server brackets each request with it (vfsd/grace.py).
        self.grace = DeferredClose()
        if fd_budget is not None and fd_budget < 1:
            raise ValueError(f"fd budget {fd_budget}")
        self.fd_budget = fd_budget
        self._open_node_fds = 0  # nodes but the root holding an fd
        # Nodes in the order their fds were opened (the oldest are evicted
        # first), kept from when half the budget is in use (before that a
        # new node costs nothing more): None until then.  It may hold
        # forgotten and evicted nodes, skipped when met, and is rebuilt when
        # they are most of it.
        self._fd_order: deque[Inode] | None = None
        self._order_from = sys.maxsize if fd_budget is None else fd_budget // 2
        self._evict_again_at = 0  # _open_node_fds at which a failed eviction is tried again
        self._unexportable_logged = False
        self.evictions = self.reopens = self.stale = 0
        self._by_id: dict[int, Inode] = {}
        self._by_key: dict[tuple[int, int], Inode] = {}
        self._next_id = itertools.count(ROOT_ID + 1)
        self._handles: dict[int, Handle] = {}
        self._next_fh = itertools.count(1)
        self._tmpfile_ok = True
        # The process umask (read by setting it back at once), which open(2)
        # applies to the mode of a new file.
        self._umask = os.umask(0o022)
        os.umask(self._umask)
        fd = os.open(shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        root = Inode(ROOT_ID, fd, (st.st_dev, st.st_ino), nlookup=1 << 62)
        self._by_id[ROOT_ID] = root
        self._by_key[root.key] = root
        self._syncfs_fd = os.open(shared_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._closed = False
        self._root_path = os.readlink(proc_fd(fd).encode())
        self._fine_ctime = self._probe_fine_ctime()

    # ------------------------------------------------------------------
    # Start-up checks
    # ------------------------------------------------------------------
    def check_xattr_support(self) -> None:
        """Fail early on a filesystem that cannot hold records (no user.* xattrs)."""
        probe = "user.vfsd-probe"
        path = proc_fd(self._by_id[ROOT_ID].fd)
        try:
            os.setxattr(path, probe, b"1")
            os.removexattr(path, probe)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise OSError(e.errno, "the shared directory's filesystem does not support "
                                       "user.* extended attributes, where vfsd keeps guest "
                                       "ownership") from None
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and self.readonly:
                return
            raise

    def _probe_fine_ctime(self) -> bool:
        """Whether the host filesystem gives a change right after an fstat a
        new ctime (fine-grained or multigrain timestamps): a few changes of an
        unnamed file, each between two fstats.  False when unsure."""
        if self.readonly:
            return False
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600,
                         dir_fd=self._by_id[ROOT_ID].fd)
        except OSError:
            return False
        try:
            for mode in (0o700, 0o600, 0o700, 0o600):
                before = os.fstat(fd).st_ctime_ns
                os.fchmod(fd, mode)
                if os.fstat(fd).st_ctime_ns == before:
                    return False
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _seen(self, ctime_ns: int) -> int | None:
        """Inode.seen_ctime for a record known to match the inode at `ctime_ns`,
        or None if a later change might keep that ctime (coarse timestamps and
        a change within the last clock tick)."""
        if self._fine_ctime or time.time_ns() - ctime_ns > _RACY_NS:
            return ctime_ns
        return None

    # ------------------------------------------------------------------
    # Inode table
    # ------------------------------------------------------------------
    def _inode(self, nodeid: int) -> Inode:
        ino = self._by_id.get(nodeid)
        if ino is None:
            raise OSError(errno.EBADF, f"unknown node id {nodeid}")
        return ino

    def _adopt(self, fd: int, st: os.stat_result, new: Record | None = None,
               xabsent: frozenset[bytes] = _NO_NAMES, parent: Inode | None = None,
               name: bytes | None = None, opening: bool = False) -> Inode:
        """Enter an O_PATH fd into the table (or reuse the live node) with one lookup.

        `new`: the record of an object this daemon just made, and `xabsent`
        the reserved xattrs it is known not to have; the latter is only
        trusted for a node made here (a live node met by another thread's
        LOOKUP in between may have been changed through it already).
        `parent` and `name`: where the guest found or made it.  `opening`:
        a handle of it is about to be opened (counted now, see Inode.opened)."""
        key = (st.st_dev, st.st_ino)
        with self._lock:
            ino = self._by_key.get(key)
            revived = False
            if ino is not None and ino.evicted is not None:
                revived = self._revive(ino, fd)
                if not revived:
                    ino = None  # a stale node, out of _by_key now
            if ino is not None:
                ino.nlookup += 1
                if not revived:
                    os.close(fd)
                elif self._open_node_fds > self.fd_budget:
                    self._evict()
                if name is not None:
                    ino.parent, ino.name = parent, name
                ino.opened += opening
            else:
                ino = Inode(next(self._next_id), fd, key, nlookup=1)
                ino.xabsent = xabsent
                ino.parent, ino.name, ino.opened = parent, name, opening
                known = self._forgotten.pop(key, None) if self._forgotten else None
                if new is not None:
                    ino.record, ino.record_loaded = new, True
                    ino.seen_ctime = self._seen(st.st_ctime_ns)  # st: after the record landed
                elif known is not None and known[0] == st.st_ctime_ns:
                    ino.record, ino.record_loaded, ino.xabsent = known[1], True, known[2]
                    ino.seen_ctime = known[0]
                self._by_id[ino.nodeid] = ino
                self._by_key[key] = ino
                self._open_node_fds += 1
                order = self._fd_order
                if order is not None:
                    # (_opened_fd, inlined: each new node)
                    order.append(ino)
                    if len(order) > 2 * self._open_node_fds + 1024:
                        self._compact_order()
                    if self._open_node_fds > self.fd_budget:
                        self._evict()
                elif self._open_node_fds > self._order_from:
                    self._fd_order = deque(i for i in self._by_id.values()
                                           if i.nodeid != ROOT_ID and i.evicted is None)
                return ino
        if new is not None:
            with ino.lock:
                ino.record, ino.record_loaded = new, True
                ino.seen_ctime = None  # the live node may have changed since st
        return ino

    def _open_child(self, parent: Inode, name: bytes) -> tuple[int, os.stat_result]:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            return fd, os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise

    # ------------------------------------------------------------------
    # The fd budget
    # ------------------------------------------------------------------
    # Every live node holds an O_PATH fd, and an unprivileged daemon cannot
    # raise RLIMIT_NOFILE past its hard limit (20,000 on these machines): a
    # guest that holds more inodes than that (a `find` over a large tree
    # keeps them all in its caches) would get EMFILE from every LOOKUP.  So
    # past `fd_budget` the nodes whose fds were opened longest ago give them
    # up, and are opened again by the name the guest last used for them
    # (their parent node's fd and their own name: an *at call as every
    # other, never a path) the next time a request needs them.  The file
    # handle the inode had (name_to_handle_at, which needs no privilege and
    # holds its generation) tells whether that name still leads to it.
    #
    # A node keeps its fd while it has an open handle, or when no name of it
    # is known to be right: a file with more than one link (the guest may
    # unlink the name we know and keep using it through another), an
    # unlinked one, one the filesystem cannot make a handle of.  Renames by
    # the guest move the name along (`_renamed`); a name changed on the host
    # behind the daemon's back makes the node stale (ESTALE), as the C
    # virtiofsd's file handles would not.
    def _evict(self) -> None:
        """Close the fds of the nodes opened longest ago, a batch of them, down
        to under the budget.  Caller holds _lock."""
        budget = self.fd_budget
        if self._open_node_fds < self._evict_again_at:
            return  # the last try found too few to evict; wait for more nodes
        batch = max(budget // 16, 1)
        target = budget - batch
        order, by_id = self._fd_order, self._by_id
        retired: list[int] = []
        unexportable: OSError | None = None
        for _ in range(len(order)):
            if self._open_node_fds <= target:
                break
            ino = order.popleft()
            if by_id.get(ino.nodeid) is not ino or ino.evicted is not None:
                continue  # forgotten, or evicted (back in the order once reopened)
            if ino.opened or ino.parent is None:
                order.append(ino)
                continue
            fd = ino.fd
            try:
                st = os.fstat(fd)
                if st.st_nlink != 1 and not (st.st_nlink and stat.S_ISDIR(st.st_mode)):
                    order.append(ino)  # several names (or none): which one stays?
                    continue
                handle = syscalls.file_handle_of(fd)
            except OSError as e:
                unexportable = e
                continue  # (it stays out of the order: the filesystem cannot)
            ino.evicted = (self, handle)
            # the class first: a reader on another thread finds the old fd (which
            # stays open for it, vfsd/grace.py) or none and opens it again
            ino.__class__ = EvictedInode
            del ino.fd, ino.path
            retired.append(fd)
            self._open_node_fds -= 1
        if not self.evictions and retired:
            log.info("the guest holds more than %d inodes: closing the fds of those opened "
                     "longest ago, to reopen by name when the guest uses them again", budget)
        if unexportable is not None and not self._unexportable_logged:
            self._unexportable_logged = True
            log.warning("some inodes keep their fds over the budget of %d: %s", budget,
                        unexportable)
        self.evictions += len(retired)
        self._evict_again_at = (self._open_node_fds + batch
                                if self._open_node_fds > target else 0)
        self.grace.retire(retired)

    def _opened_fd(self, ino: Inode) -> None:
        """Note that `ino` holds an fd now, the newest.  Caller holds _lock."""
        order = self._fd_order
        order.append(ino)
        if len(order) > 2 * self._open_node_fds + 1024:
            self._compact_order()

    def _compact_order(self) -> None:
        """Drop forgotten and evicted nodes from the order, once they are most of
        it (it would keep forgotten ones in memory).  Caller holds _lock."""
        by_id = self._by_id
        self._fd_order = deque(i for i in self._fd_order
                               if by_id.get(i.nodeid) is i and i.evicted is None)

    def _install(self, ino: Inode, fd: int) -> None:
        """Give an evicted node its reopened fd.  Caller holds _lock."""
        ino.set_fd(fd)
        ino.__class__ = Inode
        ino.evicted = None
        self._open_node_fds += 1
        self._opened_fd(ino)

    def _revive(self, ino: Inode, fd: int) -> bool:
        """Take `fd`, just opened by name for the evicted node's host inode number,
        as its fd if it is still that inode (else the node is stale, out of
        _by_key: the number was reused by another).  Caller holds _lock."""
        try:
            same = syscalls.file_handle_of(fd) == ino.evicted[1]
        except OSError:
            same = False
        if not same:
            self._make_stale(ino)
            return False
        self._install(ino, fd)
        self.reopens += 1
        return True

    def _make_stale(self, ino: Inode) -> None:
        ino.evicted = (self, None)
        self.stale += 1
        if self._by_key.get(ino.key) is ino:
            del self._by_key[ino.key]

    def _reopen(self, ino: Inode) -> tuple[int, bytes]:
        """Open an evicted node again by its name (and its parents, the
        evicted ones among them); its fd and path.  ESTALE if a name no longer
        leads to the inode the node was."""
        with self._lock:
            if ino.evicted is None:  # another thread was first
                return ino.fd, ino.path
            if self._open_node_fds >= self.fd_budget:
                self._evict()  # first: what is opened here must stay open for the caller
            chain = []
            node = ino
            while node.evicted is not None:
                if (node.evicted[1] is None or node.parent is None or node in chain
                        or self._by_id.get(node.nodeid) is not node):
                    raise OSError(errno.ESTALE, f"inode {ino.nodeid} cannot be reopened")
                chain.append(node)
                node = node.parent
            if self._by_id.get(node.nodeid) is not node:
                raise OSError(errno.ESTALE, f"inode {ino.nodeid}: its directory was forgotten")
            dir_fd = node.fd
            for node in reversed(chain):
                try:
                    fd = os.open(node.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=dir_fd)
                except OSError as e:
                    fd, why = None, e.strerror
                else:
                    if self._revive(node, fd):
                        dir_fd = fd
                        continue
                    why = "another inode has that name now"
                    os.close(fd)
                if node.evicted[1] is not None:
                    self._make_stale(node)
                log.warning("inode %d (%r) is stale: it was renamed or removed on the host "
                            "while its fd was closed (%s)", node.nodeid,
                            node.name.decode(errors="replace"), why)
                raise OSError(errno.ESTALE, f"inode {node.nodeid} is no longer where it was")
            return ino.fd, ino.path

    def _renamed(self, src: Inode, name: bytes, dst: Inode, newname: bytes,
                 exchange: bool) -> None:
        """Move the name a node is reopened by along with a rename the guest made."""
        moves = [(dst, newname, src, name)]
        if exchange:
            moves.append((src, name, dst, newname))
        for where, now, was_in, was in moves:
            try:
                st = os.stat(now, dir_fd=where.fd, follow_symlinks=False)
            except OSError:
                continue  # changed on the host since: its own LOOKUP names it again
            with self._lock:
                ino = self._by_key.get((st.st_dev, st.st_ino))
                if ino is not None and ino.parent is was_in and ino.name == was:
                    ino.parent, ino.name = where, now

    def _entry(self, ino: Inode, st: os.stat_result | None = None) -> Entry:
        """The entry of a node just made or linked in its parent (never a mount
        point: `lookup` finds those)."""
        return new_entry((ino.nodeid, 0, self._attr(ino, st)))

    def forget(self, nodeid: int, nlookup: int) -> None:
        if nodeid == ROOT_ID:
            return
        with self._lock:
            ino = self._drop(nodeid, nlookup)
        if ino is not None:
            self.closer.close_later(self._node_fds(ino))

    def _drop(self, nodeid: int, nlookup: int) -> Inode | None:
        """Take `nlookup` lookups off a node; the node if that was its last
        (removed from the table, for the caller to close).  Caller holds _lock."""
        ino = self._by_id.get(nodeid)
        if ino is None or nodeid == ROOT_ID:
            return None
        ino.nlookup -= nlookup
        if ino.nlookup > 0:
            return None
        del self._by_id[nodeid]
        if ino.evicted is None:
            self._open_node_fds -= 1
        if self._by_key.get(ino.key) is ino:
            del self._by_key[ino.key]
            if ino.record_loaded and ino.seen_ctime is not None:
                forgotten = self._forgotten
                if len(forgotten) >= _MAX_FORGOTTEN:
                    forgotten.popitem(last=False)
                forgotten[ino.key] = (ino.seen_ctime, ino.record, ino.xabsent)
        return ino

    @staticmethod
    def _node_fds(ino: Inode) -> list[int]:
        """A dropped node's fds (an evicted one's own was retired when it was)."""
        fds = [ino.fd] if ino.evicted is None else []
        if ino.retired_fds:
            fds += ino.retired_fds
        return fds

    def batch_forget(self, items) -> None:
        # One table lock for the whole batch; the fds are closed outside it,
        # on the closer's thread (an unlinked file's last close frees it).
        dead: list[int] = []
        try:
            with self._lock:
                for item in items:
                    ino = self._drop(item.nodeid, item.nlookup)
                    if ino is not None:
                        dead += self._node_fds(ino)
        finally:
            self.closer.close_later(dead)

    def destroy(self) -> None:
        """The guest unmounted: drop every handle and every node but the root."""
        with self._lock:
            handles, self._handles = self._handles, {}
            nodes = [i for i in self._by_id.values() if i.nodeid != ROOT_ID]
            root = self._by_id[ROOT_ID]
            root.xabsent = _NO_NAMES  # a new mount reads the root's xattrs afresh
            self._by_id = {ROOT_ID: root}
            self._by_key = {root.key: root}
            self._forgotten.clear()
            self._fd_order = None
            self._open_node_fds = self._evict_again_at = 0
            if self.evictions:
                log.info("fd budget this session: %d fds closed, %d reopened, %d nodes stale",
                         self.evictions, self.reopens, self.stale)
            self.evictions = self.reopens = self.stale = 0
        for h in handles.values():
            os.close(h.fd)
        for ino in nodes:
            for fd in self._node_fds(ino):
                os.close(fd)
        self.closer.drain()  # and the fds of the nodes forgotten before

    # ------------------------------------------------------------------
    # Records
    # ------------------------------------------------------------------
    def _load_record(self, ino: Inode, st: os.stat_result) -> Record | None:
        if ino.record_loaded:
            return ino.record
        rec = None
        host_type = stat.S_IFMT(st.st_mode)
        # st was taken before the read: a record changed in between was read
        # with an older ctime, which then never matches (a re-read, not a stale one)
        ino.seen_ctime = self._seen(st.st_ctime_ns)
        if host_type in _HOST_RECORD_TYPES:
            try:
                data = os.getxattr(ino.path, self._record_name_b)
            except OSError as e:
                # EACCES: a host file the daemon's user may not read (another
                # host user's) cannot have a record of ours: default owner.
                if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP,
                                   errno.EACCES, errno.EPERM):
                    raise
            else:
                try:
                    rec = self._decode(data)
                    if ownership.host_type_for(rec.mode) != host_type:
                        raise RecordError(f"record type {stat.S_IFMT(rec.mode):#o} does not "
                                          f"fit a host {stat.filemode(st.st_mode)[0]} inode")
                except RecordError as e:
                    if not ino.bad_record_logged:
                        ino.bad_record_logged = True
                        log.warning("inode %d (host ino %d): ignoring invalid %s record: %s; "
                                    "showing the default owner", ino.nodeid, st.st_ino,
                                    self.record_name, e)
                    rec = None
        ino.record, ino.record_loaded = rec, True
        return rec

    def _decode(self, data: bytes) -> Record:
        """ownership.decode, interned: nodes with the same owner and mode (most
        of a tree) share one Record and skip the parse and checks."""
        rec = self._decoded.get(data)
        if rec is None:
            rec = ownership.decode(data, self.key, name=self._record_name_b)
            if len(self._decoded) >= _MAX_MEMO:
                self._decoded.clear()
            self._decoded[data] = rec
        return rec

    def _effective(self, ino: Inode, st: os.stat_result) -> Record:
        rec = self._load_record(ino, st)
        if rec is not None:
            return rec
        return self._default_record(ino, st)

    def _default_record(self, ino: Inode, st: os.stat_result) -> Record:
        key = (st.st_uid, st.st_gid, st.st_mode, st.st_rdev)
        cached = ino.default
        if cached is not None and cached[0] == key:
            return cached[1]
        rec = ownership.default_record(st.st_uid, st.st_gid, st.st_mode, self.uidmap,
                                       self.gidmap, host_rdev=st.st_rdev)
        ino.default = (key, rec)
        return rec

    def _store_record(self, ino: Inode, rec: Record, st: os.stat_result | None) -> None:
        """Write the node's record, and give the host inode the mode that goes
        with it.  `st` None: the node holds a record of its own, so its host
        inode can carry one, and the caller fixes the host mode from the fstat
        it makes afterwards anyway (`_fix_host_mode`)."""
        if st is not None and stat.S_IFMT(st.st_mode) not in _HOST_RECORD_TYPES:
            st = self._materialize(ino, st)
        os.setxattr(ino.path, self._record_name_b,
                    ownership.encode(rec, self.key, name=self._record_name_b))
        # the node holds what the host holds, even if the chmod fails; the
        # ctime this write gave the inode is unknown (setattr learns it)
        ino.record, ino.record_loaded, ino.seen_ctime = rec, True, None
        if st is not None:
            self._fix_host_mode(ino, rec, st)

    @staticmethod
    def _fix_host_mode(ino: Inode, rec: Record, st: os.stat_result) -> bool:
        """chmod the host inode to the mode `rec` asks for, if `st` shows another."""
        want = ownership.host_mode_for(rec.mode)
        if stat.S_IMODE(st.st_mode) == want:
            return False
        os.chmod(ino.path, want)
        return True

    def _materialize(self, ino: Inode, st: os.stat_result) -> os.stat_result:
        """Turn a host-made symlink, FIFO, socket or device node — which cannot
        carry user.* xattrs — into vfsd's own representation (a regular file
        holding the symlink target, with a record), in place, so that a guest
        chown/chmod/setxattr on it works.  The node id stays; the host object
        is replaced atomically by rename.  Caller holds ino.lock."""
        self._check_writable()
        where = os.readlink(proc_fd(ino.fd).encode())
        if not where.startswith(self._root_path + b"/"):
            raise OSError(errno.ESTALE, "object is no longer inside the share")
        rel_dir, _, name = where[len(self._root_path) + 1:].rpartition(b"/")
        # Reopen the parent from the share's root, confined below it: the
        # path comes from the kernel, but host users may rename things.
        dir_fd = syscalls.openat2(self._by_id[ROOT_ID].fd, rel_dir or b".",
                                  os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                                  syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_MAGICLINKS)
        try:
            cur = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (cur.st_dev, cur.st_ino) != ino.key:
                raise OSError(errno.ESTALE, "object was replaced on the host")
            rec = self._effective(ino, st)
            content = os.fsencode(os.readlink("", dir_fd=ino.fd)) if stat.S_ISLNK(st.st_mode) else b""
            parent = Inode(0, dir_fd, (0, 0))
            fd = self._make_file(parent, None if self._tmpfile_ok else b".vfsd-new." + name,
                                 rec, content)
            try:
                syscalls.utimensat(syscalls.AT_FDCWD, proc_fd(fd), st.st_atime_ns, st.st_mtime_ns)
                if self._tmpfile_ok:
                    tmp = b".vfsd-new.%d.%s" % (os.getpid(), name[:200])
                    syscalls.link_fd(fd, dir_fd, tmp)
                else:
                    tmp = b".vfsd-new." + name
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                new_fd = os.open(proc_fd(fd), os.O_PATH | os.O_CLOEXEC)
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)
        new_st = os.fstat(new_fd)
        with self._lock:
            if self._by_key.get(ino.key) is ino:
                del self._by_key[ino.key]
            if ino.evicted is not None:  # its fd was retired by _evict
                self._install(ino, new_fd)
            else:
                if ino.retired_fds is None:
                    ino.retired_fds = []
                ino.retired_fds.append(ino.fd)
                ino.set_fd(new_fd)
            ino.key = (new_st.st_dev, new_st.st_ino)
            self._by_key[ino.key] = ino
            # a new host inode, with nothing but its record
            self._xgen += 1
            ino.xabsent = self._new_xabsent
            ino.seen_ctime = None
        ino.record, ino.record_loaded = rec, True
        log.info("inode %d: host %s %r now stored as a file with a record (guest changed it)",
                 ino.nodeid, stat.filemode(st.st_mode)[0], where.decode(errors="replace"))
        return new_st

    def _attr(self, ino: Inode, st: os.stat_result | None = None,
              submount: bool = False) -> Attr:
        if st is None:
            st = os.fstat(ino.fd)
        # _effective, inlined: this runs for every GETATTR, LOOKUP and SETATTR
        rec = ino.record if ino.record_loaded else self._load_record(ino, st)
        if rec is None:
            rec = self._default_record(ino, st)
        return new_attr((st.st_ino, st.st_size, st.st_blocks, st.st_atime_ns, st.st_mtime_ns,
                         st.st_ctime_ns, rec.mode, st.st_nlink, rec.uid, rec.gid,
                         rec.rdev if rec.rdev_major or rec.rdev_minor else 0, st.st_blksize,
                         submount))

    def _record_of(self, ino: Inode) -> Record:
        """_effective without the fstat when the node's own record is known
        (the host fields only matter for the default record)."""
        rec = ino.record
        if rec is None or not ino.record_loaded:
            rec = self._effective(ino, os.fstat(ino.fd))
        return rec

    def _new_record(self, ctx: Ctx, parent: Inode, mode: int, rdev: int = 0,
                    umask: int = 0) -> tuple[Record, dict[bytes, bytes]]:
        """Owner, mode and inherited ACL xattrs of a new object.

        The owner is the caller, or the parent's group under a setgid
        directory (which new subdirectories inherit) — POSIX semantics the host
        kernel cannot supply since it sees only the daemon's user.  With a
        default ACL on the parent, the new object's mode and access ACL come
        from it and the umask is not applied (posix_acl_create); otherwise the
        umask is (FUSE_DONT_MASK hands it to us; 0 when the guest applied it)."""
        prec = self._record_of(parent)
        kind = stat.S_IFMT(mode)
        gid, perm = ctx.gid, mode & 0o7777
        if prec.mode & stat.S_ISGID:
            gid = prec.gid
            if kind == stat.S_IFDIR:
                perm |= stat.S_ISGID
        xattrs: dict[bytes, bytes] = {}
        default = self._default_acl(parent) if kind != stat.S_IFLNK else None
        if default is not None:
            perm, access = pacl.create_masq(default, perm)
            if access is not None:
                xattrs[self._acl_access] = pacl.encode(access)
            if kind == stat.S_IFDIR:
                xattrs[self._acl_default] = pacl.encode(default)
        elif kind != stat.S_IFLNK:
            perm &= ~(umask & 0o777)
        for name, value in ctx.secctx:  # FUSE_SECURITY_CTX: labelled at birth
            xattrs[self._host_xattr(name)] = value
        major = minor = 0
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            major, minor = os.major(rdev), os.minor(rdev)
        return Record(_creator_id(ctx.uid), _creator_id(gid), kind | perm, major, minor), xattrs

    def _default_acl(self, parent: Inode) -> list | None:
        if not self.posix_acl:
            return None
        value = self._xget(parent, self._acl_default)
        if not value:
            return None
        try:
            entries = pacl.parse(value)
        except OSError as e:
            log.warning("inode %d: ignoring malformed default ACL: %s", parent.nodeid, e)
            return None
        return entries or None

    # ------------------------------------------------------------------
    # Host xattrs (the names here are host names, already mapped)
    # ------------------------------------------------------------------
    def _xget(self, ino: Inode, host_name: bytes) -> bytes | None:
        """The value of a host xattr; None if there is none (or the host
        object cannot have one)."""
        if host_name in ino.xabsent:
            return None
        gen = self._xgen
        try:
            return os.getxattr(ino.path, host_name)
        except OSError as e:
            if e.errno == errno.ENODATA:
                self._xabsent_add(ino, host_name, gen)
                return None
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                return None
            raise

    def _xremove(self, ino: Inode, host_name: bytes) -> None:
        gen = self._xgen
        try:
            os.removexattr(ino.path, host_name)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
        self._xabsent_add(ino, host_name, gen)

    def _xabsent_add(self, ino: Inode, host_name: bytes, gen: int) -> None:
        """Remember that the node has no xattr `host_name` (Inode.xabsent), as
        a read or removal begun at write generation `gen` found — unless a
        write of an xattr finished since: it may have come after the read.
        Only names in the daemon's reserved tree, and a few per node."""
        if not host_name.startswith(self._reserved_prefix) or len(ino.xabsent) >= 8:
            return
        with self._lock:
            if self._xgen == gen:
                ino.xabsent = self._interned_names(ino.xabsent | {host_name})

    def _xwritten(self, ino: Inode, host_name: bytes) -> None:
        """Call after every write of an xattr of a live node (success or not):
        the name may exist now."""
        with self._lock:
            self._xgen += 1
            if host_name in ino.xabsent:
                ino.xabsent = self._interned_names(ino.xabsent - {host_name})

    def _interned_names(self, names: frozenset[bytes]) -> frozenset[bytes]:
        """One shared object per distinct set (there are a handful), not one per node."""
        got = self._name_sets.get(names)
        if got is None:
            if len(self._name_sets) >= _MAX_MEMO:
                self._name_sets.clear()
            got = self._name_sets[names] = names
        return got

    def _xset(self, ino: Inode, host_name: bytes, value: bytes, flags: int = 0) -> None:
        try:
            os.setxattr(ino.path, host_name, value, flags)
        finally:
            self._xwritten(ino, host_name)

    def _check_writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "read-only share")

    # ------------------------------------------------------------------
    # Creating objects
    # ------------------------------------------------------------------
    def _make_file(self, parent: Inode, name: bytes | None, rec: Record, content: bytes = b"",
                   xattrs: dict[bytes, bytes] | None = None) -> int:
        """Create a regular host file holding `content`, `rec` and `xattrs`,
        atomically where the host allows it; returns an O_RDWR fd of the new
        file, named `name` (or left unnamed, an O_TMPFILE, for name None)."""
        mode = ownership.host_mode_for(rec.mode)
        value = ownership.encode(rec, self.key, name=self._record_name_b)
        xattrs = xattrs or {}
        if name is None and not self._tmpfile_ok:
            raise OSError(errno.EOPNOTSUPP, "host filesystem has no O_TMPFILE")
        if self._tmpfile_ok:
            try:
                # Created with its final mode unless the daemon's umask would
                # strip some of it (host modes have no group/other write bits,
                # so the usual 022 strips nothing): one fchmod less.
                direct = not mode & self._umask
                fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC,
                             mode if direct else 0o600, dir_fd=parent.fd)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                log.info("host filesystem has no O_TMPFILE (%s); creating files "
                         "non-atomically", e)
                self._tmpfile_ok = False
            else:
                try:
                    if not direct:
                        os.fchmod(fd, mode)
                    if content:
                        os.write(fd, content)
                    for xname, xvalue in xattrs.items():
                        os.setxattr(fd, xname, xvalue)
                    os.setxattr(fd, self._record_name_b, value)
                    if name is not None:
                        syscalls.link_fd(fd, parent.fd, name)
                    return fd
                except BaseException:
                    os.close(fd)
                    raise
        # Fallback: the name is visible for a moment without its record, which
        # shows the default owner and never more (ownership.md, The record).
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent.fd)
        try:
            os.setxattr(fd, self._record_name_b, value)
            for xname, xvalue in xattrs.items():
                os.setxattr(fd, xname, xvalue)
            os.fchmod(fd, mode)
            if content:
                os.write(fd, content)
            return fd
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=parent.fd)
            raise

    def _adopt_new(self, fd: int, rec: Record, xattrs: dict[bytes, bytes] | None,
                   parent: Inode | None = None, name: bytes | None = None,
                   opening: bool = False) -> tuple[Inode, os.stat_result]:
        """Enter a just-created object, whose record and xattrs we know, into
        the table; with its stat, which serves the reply.  `parent`, `name`,
        `opening`: as for `_adopt` (no name: an unnamed O_TMPFILE)."""
        path_fd = os.open(_proc_path(fd), os.O_PATH | os.O_CLOEXEC)
        try:
            st = os.fstat(path_fd)
        except BaseException:
            os.close(path_fd)
            raise
        return self._adopt(path_fd, st, rec, self._absent_on_new(xattrs), parent, name,
                           opening), st

    def _absent_on_new(self, xattrs: dict[bytes, bytes] | None) -> frozenset[bytes]:
        """What a new object made with `xattrs` (and its record) lacks."""
        if not xattrs:
            return self._new_xabsent
        with self._lock:
            return self._interned_names(self._new_xabsent.difference(xattrs))

    def _create_special(self, ctx: Ctx, parent_id: int, name: bytes, rec: Record,
                        content: bytes = b"", xattrs: dict[bytes, bytes] | None = None) -> Entry:
        self._check_writable()
        parent = self._inode(parent_id)
        fd = self._make_file(parent, name, rec, content, xattrs)
        try:
            ino, st = self._adopt_new(fd, rec, xattrs, parent, name)
        finally:
            os.close(fd)
        return self._entry(ino, st)

    # ------------------------------------------------------------------
    # Operations: names
    # ------------------------------------------------------------------
    def lookup(self, ctx: Ctx, parent_id: int, name: bytes, listed_ino: int = 0) -> Entry:
        """`listed_ino`: the host inode number a listing of the parent showed
        for `name` (READDIRPLUS), or 0; only a hint of whether it is live."""
        parent = self._by_id.get(parent_id)  # _inode, inlined: each LOOKUP, READDIRPLUS entry
        if parent is None:
            raise OSError(errno.EBADF, f"unknown node id {parent_id}")
        # Many names the guest looks up name a live node: its kernel
        # revalidates dentries it holds (a tar's mkdir of each leading
        # directory of every file it extracts makes it send LOOKUPs of all
        # of them: 4 of the 6 LOOKUPs per file), and READDIRPLUS looks up
        # every entry of a directory it has walked.  One fstatat finds such a
        # node by its host inode (which the node's open fd keeps from being
        # freed, so its number cannot name another inode; an evicted node has
        # no fd, so it takes the open, and `_adopt` checks its file handle);
        # only a node that is not live needs the open (and fstat) that enters
        # it.  Which way goes first follows the listing for READDIRPLUS, and
        # for LOOKUP what the parent's last lookup found (after drop_caches, or
        # in a `find`, none of the names is live, and a stat first would be
        # one syscall more).
        ino = None
        if listed_ino:
            probe = (parent.key[0], listed_ino) in self._by_key
        else:
            probe = parent.live_children
        if probe:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
            with self._lock:
                ino = self._by_key.get((st.st_dev, st.st_ino))
                if ino is not None:
                    if ino.evicted is None:
                        ino.nlookup += 1
                        ino.parent, ino.name = parent, name
                    else:  # only an inode open by name again is known to be that node
                        ino = None
        if ino is None:
            fd, st = self._open_child(parent, name)
            ino = self._adopt(fd, st, None, _NO_NAMES, parent, name)
            probe = ino.nlookup > 1  # (it was live after all: a hint only)
        if not listed_ino:
            parent.live_children = probe
        # (_entry, inlined) A different st_dev than the parent's: a mount
        # point inside the share, FUSE_ATTR_SUBMOUNT for the guest.
        return new_entry((ino.nodeid, 0, self._attr(ino, st, parent.key[0] != ino.key[0])))

    def getattr(self, ctx: Ctx, nodeid: int, fh: int | None) -> Attr:
        ino = self._by_id.get(nodeid)  # _inode, inlined on the most frequent request
        if ino is None:
            raise OSError(errno.EBADF, f"unknown node id {nodeid}")
        return self._attr(ino)

    def setattr(self, ctx: Ctx, nodeid: int, ch: SetAttr) -> Attr:
        self._check_writable()
        ino = self._inode(nodeid)
        asked = ch.mode is not None or ch.uid is not None or ch.gid is not None
        owner = asked or ch.kill_suidgid
        new = None  # the record written, if any
        with ino.lock:
            # Host fields before the change are only needed to truncate, and
            # to chown a node without a record of its own; a node with one
            # (most of them: the guest chowns what it made) goes by its record.
            # And to keep a checked record checked across a change of times
            # or size (a tar's utimens after each file; see `write`).
            seen = ino.seen_ctime
            st = (os.fstat(ino.fd) if ch.size is not None or (seen is not None and not owner)
                  else None)
            unchanged = st is not None and st.st_ctime_ns == seen
            if ch.size is not None:
                rec = self._effective(ino, st)
                if stat.S_ISDIR(rec.mode):
                    raise OSError(errno.EISDIR, "truncate of a directory")
                if not stat.S_ISREG(rec.mode):
                    raise OSError(errno.EINVAL, "truncate of a special file")
                h = self._handles.get(ch.fh) if ch.fh is not None else None
                if h is not None and not h.is_dir and h.nodeid == nodeid:
                    os.ftruncate(h.fd, ch.size)
                else:
                    os.truncate(ino.path, ch.size)
            if owner:
                old = ino.record if ino.record_loaded else None
                if old is None:
                    if st is None:
                        st = os.fstat(ino.fd)
                    old = self._effective(ino, st)
                rec = old.with_owner(ch.uid, ch.gid)
                if ch.mode is not None:
                    rec = rec.with_mode(ch.mode)
                if ch.kill_suidgid:
                    rec = rec.without_suid_sgid()
                    if self._caps not in ino.xabsent and (
                            st is None or stat.S_IFMT(st.st_mode) in _HOST_RECORD_TYPES):
                        self._xremove(ino, self._caps)
                # (records are interned: the same owner and mode is most often
                # the same object, which spares the field-by-field compare)
                # A node without a record gets one from a chown or chmod, even to
                # the values it shows; a kill alone (a truncate under KILLPRIV_V2)
                # that clears nothing leaves a host file as it is.
                if (rec is not old and rec != old) or (
                        ino.record is None and asked):
                    self._store_record(ino, rec, st)
                    new = rec
                if ch.mode is not None and self.posix_acl:
                    self._chmod_acl(ino, rec.mode)
            if ch.atime_ns is not None or ch.mtime_ns is not None:
                self._utimens(ino, ch.atime_ns, ch.mtime_ns)
            if st is None and new is not None and ch.mode is not None:
                # A chmod whose host mode follows (`_store_record` left it to
                # us, st None): chmod before the one fstat the reply needs,
                # not fstat, chmod, fstat.  The check after that fstat still
                # mends a host mode that had drifted from the record.
                want = ownership.host_mode_for(new.mode)
                if ownership.host_mode_for(old.mode) != want:
                    os.chmod(ino.path, want)
            st = os.fstat(ino.fd)
            if new is not None:
                if self._fix_host_mode(ino, new, st):
                    st = os.fstat(ino.fd)
                # the record is this daemon's, and the host inode has changed
                # only by this request since it was written (µs ago)
                ino.seen_ctime = self._seen(st.st_ctime_ns)
            elif unchanged and ino.seen_ctime == seen:
                # nothing but this request changed the inode since its record
                # was checked (the fstat before it found that ctime)
                ino.seen_ctime = self._seen(st.st_ctime_ns)
            return self._attr(ino, st)

    @staticmethod
    def _utimens(ino: Inode, atime_ns: int | str | None, mtime_ns: int | str | None) -> None:
        if type(atime_ns) is int and type(mtime_ns) is int:
            # Both times given (tar, cp -p, touch -d): the same utimensat(2)
            # through os, cheaper than building timespecs with ctypes.
            os.utime(ino.path, ns=(atime_ns, mtime_ns))
        else:  # "now" or one time left alone: UTIME_NOW / UTIME_OMIT
            syscalls.utimensat(syscalls.AT_FDCWD, ino.path, atime_ns, mtime_ns)

    def _xremove_quiet(self, ino: Inode, host_name: bytes, st: os.stat_result) -> None:
        if stat.S_IFMT(st.st_mode) in _HOST_RECORD_TYPES:
            self._xremove(ino, host_name)

    def _chmod_acl(self, ino: Inode, mode: int) -> None:
        """chmod rewrites the access ACL's owner/mask/other entries (posix_acl_chmod)."""
        value = self._xget(ino, self._acl_access)
        if value:
            acl = pacl.chmod(pacl.parse(value), mode)
            self._xset(ino, self._acl_access, pacl.encode(acl))

    def readlink(self, ctx: Ctx, nodeid: int) -> bytes:
        ino = self._inode(nodeid)
        st = os.fstat(ino.fd)
        if stat.S_ISLNK(st.st_mode):
            return os.fsencode(os.readlink("", dir_fd=ino.fd))  # readlinkat(fd, "")
        if not stat.S_ISLNK(self._effective(ino, st).mode):
            raise OSError(errno.EINVAL, "not a symlink")
        fd = os.open(ino.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.read(fd, _MAX_SYMLINK + 1)
        finally:
            os.close(fd)
        if not target or len(target) > _MAX_SYMLINK or b"\0" in target:
            raise OSError(errno.EIO, "corrupt symlink file")
        return target

    def symlink(self, ctx: Ctx, parent_id: int, name: bytes, target: bytes) -> Entry:
        rec, xattrs = self._new_record(ctx, self._inode(parent_id), stat.S_IFLNK | 0o777)
        return self._create_special(ctx, parent_id, name, rec, target, xattrs)

    def mknod(self, ctx: Ctx, parent_id: int, name: bytes, mode: int, rdev: int,
              umask: int) -> Entry:
        kind = stat.S_IFMT(mode)
        if kind == 0:
            mode |= stat.S_IFREG  # mknod(2): a zero type means a regular file
        elif kind not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
                          stat.S_IFSOCK):
            raise OSError(errno.EINVAL, "mknod of this file type")
        rec, xattrs = self._new_record(ctx, self._inode(parent_id), mode, rdev, umask)
        return self._create_special(ctx, parent_id, name, rec, xattrs=xattrs)

    def mkdir(self, ctx: Ctx, parent_id: int, name: bytes, mode: int, umask: int) -> Entry:
        self._check_writable()
        parent = self._inode(parent_id)
        rec, xattrs = self._new_record(ctx, parent, stat.S_IFDIR | (mode & 0o7777), umask=umask)
        # A directory cannot be made as O_TMPFILE; until its record lands it
        # shows the default owner with a 0700 host mode, never more.
        os.mkdir(name, 0o700, dir_fd=parent.fd)
        try:
            fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent.fd)
            st = os.fstat(fd)
            ino = self._adopt(fd, st, xabsent=self._absent_on_new(xattrs), parent=parent,
                              name=name)
            with ino.lock:
                for xname, xvalue in xattrs.items():
                    self._xset(ino, xname, xvalue)
                self._store_record(ino, rec, st)
        except BaseException:
            try:
                os.rmdir(name, dir_fd=parent.fd)
            except OSError:
                pass
            raise
        return self._entry(ino)

    def unlink(self, ctx: Ctx, parent_id: int, name: bytes) -> None:
        self._check_writable()
        os.unlink(name, dir_fd=self._inode(parent_id).fd)

    def rmdir(self, ctx: Ctx, parent_id: int, name: bytes) -> None:
        self._check_writable()
        os.rmdir(name, dir_fd=self._inode(parent_id).fd)

    def rename(self, ctx: Ctx, parent_id: int, name: bytes, newparent_id: int, newname: bytes,
               flags: int) -> None:
        self._check_writable()
        known = syscalls.RENAME_NOREPLACE | syscalls.RENAME_EXCHANGE | syscalls.RENAME_WHITEOUT
        if flags & ~known:
            raise OSError(errno.EINVAL, f"unsupported rename flags {flags:#x}")
        src, dst = self._inode(parent_id), self._inode(newparent_id)
        if flags & syscalls.RENAME_WHITEOUT:
            self._rename_whiteout(ctx, src, name, dst, newname, flags)
        elif flags:
            syscalls.renameat2(src.fd, name, dst.fd, newname, flags)
        else:
            os.rename(name, newname, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        if self.fd_budget is not None:
            self._renamed(src, name, dst, newname, bool(flags & syscalls.RENAME_EXCHANGE))

    def _rename_whiteout(self, ctx: Ctx, src: Inode, name: bytes, dst: Inode, newname: bytes,
                         flags: int) -> None:
        """RENAME_WHITEOUT (overlayfs): the source name becomes a whiteout, a
        character device 0/0 — which the host would only let CAP_MKNOD make,
        so it is a regular file whose record says so, made unnamed first and
        linked at the old name right after the rename."""
        if flags & syscalls.RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, "RENAME_WHITEOUT with RENAME_EXCHANGE")
        rec = Record(_creator_id(ctx.uid), _creator_id(ctx.gid), stat.S_IFCHR)
        fd = self._make_file(src, None, rec)
        try:
            syscalls.renameat2(src.fd, name, dst.fd, newname, flags & ~syscalls.RENAME_WHITEOUT)
            try:
                syscalls.link_fd(fd, src.fd, name)
            except OSError:
                syscalls.renameat2(dst.fd, newname, src.fd, name, syscalls.RENAME_NOREPLACE)
                raise
        finally:
            os.close(fd)

    def link(self, ctx: Ctx, nodeid: int, newparent_id: int, newname: bytes) -> Entry:
        self._check_writable()
        ino, parent = self._inode(nodeid), self._inode(newparent_id)
        if stat.S_ISDIR(os.fstat(ino.fd).st_mode):
            raise OSError(errno.EPERM, "hard link to a directory")
        syscalls.link_fd(ino.fd, parent.fd, newname)
        return self.lookup(ctx, newparent_id, newname)

    def statfs(self, ctx: Ctx, nodeid: int) -> StatFs:
        s = os.statvfs(self._inode(nodeid).fd)
        return StatFs(blocks=s.f_blocks, bfree=s.f_bfree, bavail=s.f_bavail, files=s.f_files,
                      ffree=s.f_ffree, bsize=s.f_bsize, namelen=s.f_namemax, frsize=s.f_frsize)

    def access(self, ctx: Ctx, nodeid: int, mask: int) -> None:
        """access(2) against the guest's view (guest kernels with
        default_permissions do this themselves; this serves the others)."""
        ino = self._inode(nodeid)
        rec = self._effective(ino, os.fstat(ino.fd))
        mask &= os.R_OK | os.W_OK | os.X_OK
        if not mask:
            return
        if ctx.uid == 0:
            if mask & os.X_OK and not stat.S_ISDIR(rec.mode) and not rec.mode & 0o111:
                raise OSError(errno.EACCES, "no execute bit")
            return
        if ctx.uid == rec.uid:
            bits = (rec.mode >> 6) & 7
        elif ctx.gid == rec.gid:
            bits = (rec.mode >> 3) & 7
        else:
            bits = rec.mode & 7
        if mask & ~bits:
            raise OSError(errno.EACCES, "permission denied")

    # ------------------------------------------------------------------
    # Operations: files
    # ------------------------------------------------------------------
    def _new_handle(self, fd: int, nodeid: int, is_dir: bool = False,
                    counted: bool = False) -> int:
        """Register an open fd of the node as a handle, which keeps the node's
        own fd open too (Inode.opened) - `counted`: already counted."""
        with self._lock:
            fh = next(self._next_fh)
            self._handles[fh] = Handle(fd, nodeid, is_dir)
            ino = self._by_id.get(nodeid)
            if ino is not None and not counted:
                ino.opened += 1
        if ino is not None and ino.evicted is not None:
            # evicted between the handle's open and its count: open it again,
            # to stay open now that the count keeps it from the budget
            self._reopen(ino)
        return fh

    def _closed_handle(self, fh: int, what: str) -> Handle:
        with self._lock:
            h = self._handles.pop(fh, None)
            if h is not None:
                ino = self._by_id.get(h.nodeid)
                if ino is not None and ino.opened:
                    ino.opened -= 1
        if h is None:
            raise OSError(errno.EBADF, f"unknown {what} handle {fh}")
        return h

    def _handle(self, fh: int, is_dir: bool = False) -> Handle:
        h = self._handles.get(fh)
        if h is None or h.is_dir != is_dir:
            raise OSError(errno.EBADF, f"unknown file handle {fh}")
        return h

    def _host_open_flags(self, flags: int) -> int:
        flags = (flags & self._open_keep) | os.O_CLOEXEC
        if self.writeback:
            # With the writeback cache the guest kernel reads pages through
            # write-only opens (to fill a partly written page), and writes
            # dirty pages back at their own offsets, also for O_APPEND files,
            # whose appending it does itself: a host O_APPEND would move those
            # writes to the end (pwrite(2) ignores the offset then).
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags

    def open(self, ctx: Ctx, nodeid: int, flags: int) -> Opened:
        ino = self._inode(nodeid)
        kind = stat.S_IFMT(self._record_of(ino).mode)
        if kind == stat.S_IFDIR:
            raise OSError(errno.EISDIR, "open of a directory")
        if kind == stat.S_IFLNK:
            raise OSError(errno.ELOOP, "open of a symlink")
        if kind != stat.S_IFREG:
            # The guest kernel opens devices/FIFOs/sockets itself; a host
            # special file is never opened on the guest's behalf.
            raise OSError(errno.ENXIO, "open of a special file")
        if self.readonly and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise OSError(errno.EROFS, "read-only share")
        fd = os.open(ino.path, self._host_open_flags(flags))
        return Opened(self._new_handle(fd, nodeid), noflush=True)

    def create(self, ctx: Ctx, parent_id: int, name: bytes, mode: int, umask: int,
               flags: int) -> tuple[Entry, Opened]:
        self._check_writable()
        parent = self._inode(parent_id)
        rec, xattrs = self._new_record(ctx, parent, stat.S_IFREG | (mode & 0o7777), umask=umask)
        try:
            fd = self._make_file(parent, name, rec, xattrs=xattrs)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # Raced with another creator: open what is there, as open(2) would.
            entry = self.lookup(ctx, parent_id, name)
            try:
                opened = self.open(ctx, entry.nodeid, flags)
                if flags & os.O_TRUNC:
                    os.ftruncate(self._handles[opened.fh].fd, 0)
            except BaseException:
                self.forget(entry.nodeid, 1)
                raise
            return self._entry(self._inode(entry.nodeid)), opened
        return self._open_new(fd, rec, xattrs, flags, parent, name)

    def _open_new(self, fd: int, rec: Record, xattrs: dict[bytes, bytes] | None,
                  flags: int, parent: Inode | None = None,
                  name: bytes | None = None) -> tuple[Entry, Opened]:
        """Enter a just-made file (its O_RDWR fd, closed here) and open a handle
        with the guest's own flags (O_APPEND, access mode, ...)."""
        host_flags = self._host_open_flags(flags)
        ino = None
        try:
            ino, st = self._adopt_new(fd, rec, xattrs, parent, name, opening=True)
            if host_flags & _NEEDS_REOPEN:
                hfd = os.open(_proc_path(fd), host_flags)
            else:
                # The creating fd serves as the handle: O_RDWR covers any access
                # mode the guest asked for (its own kernel checks the mode of
                # each guest fd), and O_APPEND is the one status flag to copy.
                if host_flags & os.O_APPEND:
                    fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND)
                hfd, fd = fd, None
        except BaseException:
            if ino is not None:  # no handle after all
                with self._lock:
                    ino.opened -= 1
            raise
        finally:
            if fd is not None:
                os.close(fd)
        # st (taken after the link) is still the file's: opening changes nothing
        return self._entry(ino, st), Opened(self._new_handle(hfd, ino.nodeid, counted=True),
                                            noflush=True)

    def read(self, ctx: Ctx, nodeid: int, fh: int, offset: int, views: list) -> int:
        if not views:
            return 0
        return os.preadv(self._handle(fh).fd, views, offset)

    def write(self, ctx: Ctx, nodeid: int, fh: int, offset: int, views: list,
              kill_suidgid: bool = False, kill_caps: bool = False) -> int:
        self._check_writable()
        h = self._handle(fh)
        ino = self._by_id.get(h.nodeid)
        if kill_suidgid or kill_caps:
            # (under KILLPRIV_V2 every write asks to drop capabilities; once
            # they are known absent, that costs no call here)
            if ino is None:
                ino = self._inode(h.nodeid)  # EBADF, as without the fast path
            if kill_suidgid or self._caps not in ino.xabsent:
                self._kill_priv(ctx, ino, kill_suidgid, kill_caps)
        if not views:
            return 0
        seen = ino.seen_ctime if ino is not None else None
        if seen is None:
            return os.pwritev(h.fd, views, offset)
        # The write moves the inode's ctime, which would make a kept record
        # of the node, once forgotten, be read again (the stat after an
        # `echo x > f`).  If the ctime is still the one the record was
        # checked at, nothing else changed the inode since, and the ctime
        # after is this write's: the record stays checked.  (A host edit in
        # the µs between the fstats goes unseen, as after a record write.)
        if os.fstat(h.fd).st_ctime_ns != seen:
            return os.pwritev(h.fd, views, offset)
        n = os.pwritev(h.fd, views, offset)
        self._ctime_moved(ino, seen, os.fstat(h.fd).st_ctime_ns)
        return n

    def _ctime_moved(self, ino: Inode, seen: int, ctime_ns: int) -> None:
        """The node's host inode went from ctime `seen` (its record checked
        then) to `ctime_ns` by this daemon's own change: keep the record
        checked, unless another change of ours meanwhile decided otherwise."""
        with ino.lock:
            if ino.seen_ctime == seen:
                ino.seen_ctime = self._seen(ctime_ns)

    def _kill_priv(self, ctx: Ctx, ino: Inode, suidgid: bool, caps: bool) -> None:
        """What a local filesystem's file_remove_privs() does on a write, when
        the guest kernel leaves it to us: drop setuid; drop setgid when group
        execute is set or the writer is outside the file's group (Linux
        setattr_should_drop_sgid; the primary gid is all FUSE tells us); drop
        the guest's file capabilities."""
        with ino.lock:
            # caps: nothing to do (not even an fstat) once known absent
            caps = caps and self._caps not in ino.xabsent
            if not (suidgid or caps):
                return
            st = os.fstat(ino.fd)
            if suidgid:
                rec = self._load_record(ino, st)
                if rec is not None and stat.S_ISREG(rec.mode) and rec.mode & 0o6000:
                    mode = rec.mode & ~stat.S_ISUID
                    if rec.mode & stat.S_IXGRP or ctx.gid != rec.gid:
                        mode &= ~stat.S_ISGID
                    if mode != rec.mode:
                        self._store_record(ino, rec.with_mode(mode), st)
            if caps:
                self._xremove_quiet(ino, self._caps, st)

    def release(self, ctx: Ctx, nodeid: int, fh: int) -> None:
        os.close(self._closed_handle(fh, "file").fd)

    def flush(self, ctx: Ctx, nodeid: int, fh: int) -> None:
        # POSIX locks are kept by the guest kernel (POSIX_LOCKS is not
        # negotiated), so there is nothing host-side to drop on close; opens
        # say so (Opened.noflush), and the guest only sends FLUSH when its
        # writeback cache needs one.
        self._handle(fh)

    def fsync(self, ctx: Ctx, nodeid: int, fh: int, datasync: bool) -> None:
        fd = self._handle(fh).fd
        (os.fdatasync if datasync else os.fsync)(fd)

    # ------------------------------------------------------------------
    # Operations: directories
    # ------------------------------------------------------------------
    def opendir(self, ctx: Ctx, nodeid: int, flags: int) -> Opened:
        ino = self._inode(nodeid)
        fd = os.open(ino.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return Opened(self._new_handle(fd, nodeid, is_dir=True))

    def _snapshot(self, h: Handle) -> list[tuple[bytes, int, int]]:
        """The directory's entries, taken once per rewind so offsets stay stable."""
        st = os.fstat(h.fd)
        entries = [(b".", st.st_ino, stat.S_IFDIR >> 12), (b"..", st.st_ino, stat.S_IFDIR >> 12)]
        enc, errors = _FS_ENCODING, _FS_ERRORS
        with os.scandir(h.fd) as it:
            for de in it:
                name = de.name.encode(enc, errors)
                # (the most frequent type first: one d_type test per file)
                if de.is_file(follow_symlinks=False):
                    kind = None  # a record may say otherwise: read when listed
                elif de.is_dir(follow_symlinks=False):
                    kind = stat.S_IFDIR
                elif de.is_symlink():
                    kind = stat.S_IFLNK
                else:
                    try:
                        kind = stat.S_IFMT(os.stat(name, dir_fd=h.fd,
                                                   follow_symlinks=False).st_mode)
                    except OSError:
                        continue
                entries.append((name, de.inode(), None if kind is None else kind >> 12))
        return entries

    def _listed_file_type(self, dir_fd: int, name: bytes) -> int:
        """The guest's type of a host regular file: its record may say symlink,
        device, FIFO or socket.  `name` comes from the host listing, not the guest."""
        try:
            data = os.getxattr(b"/proc/self/fd/%d/%s" % (dir_fd, name), self._record_name_b,
                               follow_symlinks=False)
            rec = self._decode(data)
        except (OSError, RecordError):
            return stat.S_IFREG
        kind = stat.S_IFMT(rec.mode)
        return kind if kind != stat.S_IFDIR else stat.S_IFREG

    def readdir(self, ctx: Ctx, nodeid: int, fh: int, offset: int, plus: bool = False):
        """Entries from `offset` on.  The type of a host regular file comes from
        its record (a getxattr each); with `plus` the caller looks every entry up
        anyway and takes the type from there, so it is left DT_UNKNOWN (0)."""
        h = self._handle(fh, is_dir=True)
        with h.lock:
            if h.entries is None or offset == 0:
                h.entries = self._snapshot(h)
            entries = h.entries
        for i in range(offset, len(entries)):
            name, ino, dtype = entries[i]
            if dtype is None:
                dtype = 0 if plus else self._listed_file_type(h.fd, name) >> 12
            yield new_dirent((name, ino, dtype, i + 1))

    def releasedir(self, ctx: Ctx, nodeid: int, fh: int) -> None:
        os.close(self._closed_handle(fh, "directory").fd)

    def fsyncdir(self, ctx: Ctx, nodeid: int, fh: int, datasync: bool) -> None:
        fd = self._handle(fh, is_dir=True).fd
        (os.fdatasync if datasync else os.fsync)(fd)

    # ------------------------------------------------------------------
    # Operations: guest xattrs (names mapped by ownership.XattrNames)
    # ------------------------------------------------------------------
    def _host_xattr(self, name: bytes) -> bytes:
        """guest name -> (--xattrmap) -> vfsd's escaping -> host name.  ACL names
        skip the map: vfsd keeps them in step with the mode at fixed names."""
        if self.xattrmap is not None and not (self.posix_acl and name in _ACL_NAMES):
            name = self.xattrmap.to_server(name)
        return self.names.guest_to_host(name)

    def _existing_xattr(self, name: bytes) -> bytes:
        """Host name of an xattr to read or remove.  A name that is too long
        once escaped cannot exist: ENODATA (ERANGE would read as "buffer too
        small" to a getxattr caller); setxattr keeps ERANGE."""
        try:
            return self._host_xattr(name)
        except OSError as e:
            if e.errno == errno.ERANGE:
                raise OSError(errno.ENODATA, "no such attribute") from None
            raise

    def getxattr(self, ctx: Ctx, nodeid: int, name: bytes) -> bytes:
        # A quarter of the guest's requests, nearly all answered ENODATA
        # (security.capability before each write, ACLs after each chmod or
        # utimes): the name mapping is memoized and absence remembered.
        ino = self._by_id.get(nodeid)
        if ino is None:
            raise OSError(errno.EBADF, f"unknown node id {nodeid}")
        try:
            host = self._xname_memo.get(name)
            if host is None:
                host = self._existing_xattr(name)
                if len(self._xname_memo) >= _MAX_MEMO:
                    self._xname_memo.clear()
                self._xname_memo[name] = host
            if host in ino.xabsent:
                raise OSError(errno.ENODATA, "no such attribute")
            gen = self._xgen
            try:
                return os.getxattr(ino.path, host)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    self._xabsent_add(ino, host, gen)
                raise
        except OSError as e:
            # EPERM: refused by --xattrmap (as virtiofsd) or a host special file
            if e.errno == errno.EPERM:
                raise OSError(errno.ENODATA, "no such attribute") from None
            raise

    def listxattr(self, ctx: Ctx, nodeid: int) -> list[bytes]:
        ino = self._inode(nodeid)
        names = self.names.filter_list([os.fsencode(n) for n in os.listxattr(ino.path)])
        if self.xattrmap is not None:
            names = [n if self.posix_acl and n in _ACL_NAMES else self.xattrmap.to_client(n)
                     for n in names]
            names = [n for n in names if n is not None]
        return names

    def setxattr(self, ctx: Ctx, nodeid: int, name: bytes, value: bytes, flags: int,
                 acl_kill_sgid: bool = False) -> None:
        self._check_writable()
        ino = self._inode(nodeid)
        host = self._host_xattr(name)
        st = os.fstat(ino.fd)
        if stat.S_IFMT(st.st_mode) not in _HOST_RECORD_TYPES:
            with ino.lock:
                self._materialize(ino, st)
        if name == pacl.ACCESS and self.posix_acl:
            self._set_access_acl(ino, value, flags, acl_kill_sgid)
            return
        if name == pacl.DEFAULT and self.posix_acl and value:
            pacl.parse(value)  # refuse what could not be inherited later
        self._xset(ino, host, value, flags)

    def _set_access_acl(self, ino: Inode, value: bytes, flags: int, kill_sgid: bool) -> None:
        """Setting the access ACL also sets the mode it implies, and an ACL that
        says no more than the mode is not stored (posix_acl_update_mode)."""
        entries = pacl.parse(value)
        with ino.lock:
            st = os.fstat(ino.fd)
            exists = self._xget(ino, self._acl_access) is not None
            if flags & XATTR_CREATE and exists:
                raise OSError(errno.EEXIST, "ACL exists")
            if flags & XATTR_REPLACE and not exists:
                raise OSError(errno.ENODATA, "no ACL")
            rec = self._effective(ino, st)
            mode, equivalent = pacl.equiv_mode(entries, rec.mode)
            if kill_sgid:
                mode &= ~stat.S_ISGID
            if equivalent:
                self._xremove(ino, self._acl_access)
            else:
                self._xset(ino, self._acl_access, value)
            if mode != rec.mode or self._load_record(ino, st) is None:
                self._store_record(ino, rec.with_mode(mode), st)

    def removexattr(self, ctx: Ctx, nodeid: int, name: bytes) -> None:
        self._check_writable()
        ino = self._inode(nodeid)
        host = self._existing_xattr(name)
        gen = self._xgen
        os.removexattr(ino.path, host)
        self._xabsent_add(ino, host, gen)

    # ------------------------------------------------------------------
    # Operations: file space and copies
    # ------------------------------------------------------------------
    def fallocate(self, ctx: Ctx, nodeid: int, fh: int, offset: int, length: int,
                  mode: int, kill_suidgid: bool = False, kill_caps: bool = False) -> None:
        self._check_writable()
        h = self._handle(fh)
        if kill_suidgid or kill_caps:
            self._kill_priv(ctx, self._inode(h.nodeid), kill_suidgid, kill_caps)
        syscalls.fallocate(h.fd, mode, offset, length)

    def lseek(self, ctx: Ctx, nodeid: int, fh: int, offset: int, whence: int) -> int:
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            # The guest kernel resolves SEEK_SET/CUR/END itself.
            raise OSError(errno.EINVAL, "only SEEK_DATA/SEEK_HOLE are passed on")
        return os.lseek(self._handle(fh).fd, offset, whence)

    def copy_file_range(self, ctx: Ctx, fh_in: int, off_in: int, fh_out: int, off_out: int,
                        length: int, flags: int, kill_suidgid: bool = False,
                        kill_caps: bool = False) -> int:
        self._check_writable()
        if flags:
            raise OSError(errno.EINVAL, "copy_file_range flags must be 0")
        out = self._handle(fh_out)
        if kill_suidgid or kill_caps:
            self._kill_priv(ctx, self._inode(out.nodeid), kill_suidgid, kill_caps)
        return os.copy_file_range(self._handle(fh_in).fd, out.fd, length, off_in, off_out)

    def syncfs(self, ctx: Ctx, nodeid: int) -> None:
        syscalls.syncfs(self._syncfs_fd)

    def tmpfile(self, ctx: Ctx, parent_id: int, mode: int, umask: int,
                flags: int) -> tuple[Entry, Opened]:
        """O_TMPFILE in the guest: an unnamed host O_TMPFILE with its record;
        a later LINK gives it a name."""
        self._check_writable()
        parent = self._inode(parent_id)
        rec, xattrs = self._new_record(ctx, parent, stat.S_IFREG | (mode & 0o7777), umask=umask)
        return self._open_new(self._make_file(parent, None, rec, xattrs=xattrs), rec, xattrs,
                              flags)

    def close(self) -> None:
        """Release every fd (for tests and embedding; the daemon just exits).
        Once: a second close would close fd numbers reused by then."""
        if self._closed:
            return
        self._closed = True
        self.grace.close_all()
        self.destroy()
        for fd in (self._by_id[ROOT_ID].fd, self._syncfs_fd):
            os.close(fd)
