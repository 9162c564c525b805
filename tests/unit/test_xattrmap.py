import errno

import pytest

from vfsd.config import parse_xattrmap
from vfsd.xattrmap import XattrMap


def test_prefix_trusted_example_from_virtiofsd_docs():
    m = XattrMap(parse_xattrmap("/prefix/all/trusted./user.virtiofs./ /bad/server//trusted./ "
                                "/bad/client/user.virtiofs.// /ok/all///"))
    assert m.to_server(b"trusted.overlay.opaque") == b"user.virtiofs.trusted.overlay.opaque"
    assert m.to_server(b"user.foo") == b"user.foo"
    with pytest.raises(OSError) as ei:
        m.to_server(b"user.virtiofs.x")
    assert ei.value.errno == errno.EPERM
    assert m.to_client(b"user.virtiofs.trusted.a") == b"trusted.a"
    assert m.to_client(b"trusted.hostonly") is None
    assert m.to_client(b"user.foo") == b"user.foo"


def test_unsupported_and_no_match():
    m = XattrMap(parse_xattrmap("/unsupported/all/security.selinux/security.selinux/"
                                "/prefix/client/user./user./"))
    with pytest.raises(OSError) as ei:
        m.to_server(b"security.selinux")
    assert ei.value.errno == errno.ENOTSUP
    with pytest.raises(OSError) as ei:
        m.to_server(b"trusted.x")  # no rule: cannot be mapped
    assert ei.value.errno == errno.EPERM
    assert m.to_client(b"user.x") is None  # no server-scope rule matches
