"""The builders of the filesystem API's per-request types (vfsd.fsapi.new_*)
make exactly what the named tuples' own constructors make."""

import pytest

from vfsd import fsapi


@pytest.mark.parametrize("build, cls", [(fsapi.new_ctx, fsapi.Ctx), (fsapi.new_attr, fsapi.Attr),
                                        (fsapi.new_entry, fsapi.Entry),
                                        (fsapi.new_dirent, fsapi.DirEntry)])
def test_builder_is_the_constructor(build, cls):
    values = tuple(range(1, len(cls._fields) + 1))
    made = build(values)
    assert type(made) is cls
    assert made == cls(*values)
    assert made._asdict() == cls(*values)._asdict()
    assert getattr(made, cls._fields[-1]) == values[-1]
