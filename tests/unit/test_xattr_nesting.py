"""Nesting of ownership.XattrNames over many levels (docs/ownership.md, "Guest xattrs and
nesting").  tests/unit/test_ownership.py covers one level and a fixed three-level stack of the
default name; this adds what it does not: any depth, a different record name at each level,
every level's own record and reserved tree hidden from the guests below it, listxattr through
the whole stack, and names growing past XATTR_NAME_MAX somewhere on the way out.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vfsd.ownership import XATTR_NAME_MAX, XattrNames

RECORD_NAMES = ["user.o", "user.vfsd", "user.o.x", "user.a.b.c", "user.origin", "user.oo"]

_COMPONENTS = [b"user", b"trusted", b"security", b"system", b"o", b"oo", b"origin", b"x",
               b"vfsd", b"a", b"b", b"c", b"posix_acl_access", b"posix_acl_default",
               b"overlay", b"capability", b""]
_PREFIXES = [b"user.", b"trusted.", b"security.", b"system.", b"user.o", b"user.o.",
             b"user.vfsd", b"user.vfsd.", b"user.a.b", b"system.posix_acl_access",
             b"system.posix_acl_default", b"user.o.trusted.", b""]


@st.composite
def names(draw):
    """Guest xattr names aimed at every rule (and some arbitrary bytes)."""
    if draw(st.integers(0, 7)) == 0:
        return draw(st.binary(max_size=30))
    prefix = draw(st.sampled_from(_PREFIXES))
    return prefix + b".".join(draw(st.lists(st.sampled_from(_COMPONENTS), max_size=5)))


stacks = st.lists(st.sampled_from(RECORD_NAMES), min_size=1, max_size=6).map(
    lambda rs: [XattrNames(r) for r in rs])
same_stacks = st.integers(1, 8).map(lambda n: [XattrNames() for _ in range(n)])


def out(levels, name):
    """A name set by the innermost guest, as the real host stores it (levels[0] is the
    daemon on the real host); OSError if some level refuses it."""
    for x in reversed(levels):
        name = x.guest_to_host(name)
    return name


def back(levels, name):
    """What the innermost guest sees for a real-host name (None: hidden somewhere)."""
    for x in levels:
        name = x.host_to_guest(name)
        if name is None:
            return None
    return name


def maybe_out(levels, name):
    try:
        return out(levels, name)
    except OSError:
        return None


@settings(max_examples=400)
@given(st.one_of(stacks, same_stacks), names(), names())
def test_any_depth_round_trips_and_is_injective(levels, a, b):
    ha, hb = maybe_out(levels, a), maybe_out(levels, b)
    assume(ha is not None)
    assert back(levels, ha) == a
    assert len(ha) <= XATTR_NAME_MAX
    if hb is not None:
        assert (ha == hb) == (a == b)


@settings(max_examples=400)
@given(st.one_of(stacks, same_stacks), names())
def test_no_guest_reaches_an_outer_daemons_record_or_reserved_tree(levels, name):
    """Seen from each daemon k, a name coming from below is one its own guest produced,
    never its record R_k or an unescaped name in R_k's reserved tree."""
    host = maybe_out(levels, name)
    assume(host is not None)
    for k in range(len(levels)):
        at_k = back(levels[:k], host)            # the name in daemon k's host view
        assert at_k is not None
        r = levels[k].record_name
        assert at_k != r
        if at_k.startswith(r + b"."):
            rest = at_k[len(r) + 1:]
            marker = levels[k].marker
            assert (rest == marker or rest.startswith(marker + b".")
                    or rest.startswith((b"trusted.", b"security.", b"system.posix_acl_"))), at_k


@settings(max_examples=200)
@given(st.one_of(stacks, same_stacks))
def test_each_levels_record_is_hidden_below_it_and_plain_above(levels):
    """Daemon k keeps its record R_k in its own host view; the real host stores it escaped
    by the levels above; the guests of k and deeper never see it; daemons above k see it as
    an ordinary name of their guests."""
    for k, x in enumerate(levels):
        host = out(levels[:k], x.record_name)
        assert back(levels[:k], host) == x.record_name       # daemon k's own view
        assert back(levels[:k + 1], host) is None            # hidden from its guest
        for j in range(k):                                   # an ordinary name up there
            assert back(levels[:j + 1], host) is not None


def test_same_name_depth_n_is_n_escapes():
    for depth in range(1, 9):
        levels = [XattrNames() for _ in range(depth)]
        # the record of the daemon at depth k lands at user.o + ".o" * k
        for k in range(depth):
            assert out(levels[:k], b"user.o") == b"user.o" + b".o" * k
        assert out(levels, b"trusted.overlay.opaque") == \
            b"user.o" + b".o" * (depth - 1) + b".trusted.overlay.opaque"
        assert out(levels, b"user.other") == b"user.other"      # untouched at any depth


def test_mixed_names_escape_only_their_own():
    outer, inner = XattrNames("user.o"), XattrNames("user.vfsd")
    levels = [outer, inner]
    assert out(levels, b"user.vfsd") == b"user.vfsd.vfsd"      # inner escapes its name
    assert out(levels, b"user.o") == b"user.o.o"               # outer escapes its own
    # the inner daemon's reserved tree is an ordinary user.* name to the outer one
    assert out(levels, b"trusted.x") == b"user.vfsd.trusted.x"
    assert back(levels, b"user.vfsd.trusted.x") == b"trusted.x"
    assert back(levels[:1], b"user.vfsd.trusted.x") == b"user.vfsd.trusted.x"
    assert out(levels, b"user.o.vfsd") == b"user.o.o.vfsd"
    assert back(levels, b"user.vfsd") is None                  # the inner record
    assert back(levels[:1], b"user.vfsd") == b"user.vfsd"      # plain to the outer daemon


@settings(max_examples=200)
@given(st.one_of(stacks, same_stacks),
       st.lists(names(), max_size=12, unique=True))
def test_listxattr_through_the_stack(levels, guest_names):
    """What the innermost guest set is exactly what it lists back through every level,
    whatever the daemons themselves keep beside it (their records at each level)."""
    stored = [h for h in (maybe_out(levels, n) for n in guest_names) if h is not None]
    expect = [back(levels, h) for h in stored]
    extra = [out(levels[:k], x.record_name) for k, x in enumerate(levels)]
    listing = stored + extra
    for x in levels:
        listing = x.filter_list(listing)
    assert sorted(listing) == sorted(expect)
    assert len(b"".join(n + b"\0" for n in listing)) == sum(len(n) + 1 for n in expect)


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_too_long_somewhere_on_the_way_out(depth):
    """A name that fits in the guest but not after some level's escape: ERANGE, never a
    truncated or colliding name."""
    levels = [XattrNames() for _ in range(depth)]
    escaped_len = lambda n: len(n) + 2 * depth                  # noqa: E731
    name = b"user.o." + b"a" * (XATTR_NAME_MAX - 7 - 2 * depth)
    assert escaped_len(name) == XATTR_NAME_MAX
    assert len(out(levels, name)) == XATTR_NAME_MAX
    longer = name + b"a"
    with pytest.raises(OSError) as e:
        out(levels, longer)
    assert e.value.errno == errno.ERANGE
    trusted = b"trusted." + b"t" * (XATTR_NAME_MAX - 8 - 7 - 2 * (depth - 1))
    assert len(out(levels, trusted)) == XATTR_NAME_MAX
    with pytest.raises(OSError) as e:
        out(levels, trusted + b"t")
    assert e.value.errno == errno.ERANGE
