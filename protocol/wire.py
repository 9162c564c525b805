"""One way to define a fixed-layout wire struct, used by every protocol module.

A `WireStruct` is a named, little-endian `struct.Struct` whose fields have names
(and may nest another `WireStruct`), so each ABI struct is written down exactly
once, next to the spec it comes from, and its size is checked by a unit test.
Only headers and small argument blocks go through here; bulk data never does.
"""

from __future__ import annotations

import struct
from collections import namedtuple
from typing import Any, Iterable, Mapping, Sequence, Union

Field = tuple[str, Union[str, "WireStruct"]]
_tuple_new = tuple.__new__


class WireStruct:
    """A little-endian C struct with named fields (no implicit padding).

    `fields` is a sequence of `(name, code)` where `code` is a `struct` format
    code (`"Q"`, `"I"`, `"i"`, `"H"`, `"B"`, `"16s"`, ...) or another
    `WireStruct` (nested by value).  Padding fields are ordinary named fields
    so that the layout reads like the C header it mirrors.
    """

    __slots__ = ("name", "fields", "tuple", "size", "_struct", "_nested", "_flat_len", "_plain",
                 "flat_pack", "flat_pack_into", "flat_unpack", "flat_unpack_from")

    def __init__(self, name: str, fields: Sequence[Field]):
        self.name = name
        self.fields = tuple(fields)
        self.tuple = namedtuple(name, [f for f, _ in self.fields])
        fmt = "<"
        nested: list[tuple[int, int, WireStruct | None]] = []
        flat = 0
        for _, code in self.fields:
            if isinstance(code, WireStruct):
                fmt += code._struct.format[1:]
                nested.append((flat, code._flat_len, code))
                flat += code._flat_len
            else:
                fmt += code
                nested.append((flat, 1, None))
                flat += 1
        self._struct = struct.Struct(fmt)
        self._nested = tuple(nested)
        self._flat_len = flat
        self._plain = all(sub is None for _, _, sub in nested)  # no nested structs
        self.size = self._struct.size
        # The fast paths, for headers and replies of every request: values as
        # plain tuples in `flat_fields` order, no per-field lookups.  They are
        # the struct's own bound methods, not wrappers: a Python frame per call
        # is a sizeable part of a request's CPU (docs/performance.md).
        #   flat_pack(*values) -> bytes
        #   flat_pack_into(buf, offset, *values): straight into a writable buffer
        #   flat_unpack(buf) -> tuple: exactly `size` bytes (struct.error otherwise)
        #   flat_unpack_from(buf, offset=0) -> tuple: the struct at `offset` of a
        #       longer buffer (arguments followed by a name); struct.error if short
        s = self._struct
        self.flat_pack, self.flat_pack_into = s.pack, s.pack_into
        self.flat_unpack, self.flat_unpack_from = s.unpack, s.unpack_from

    def __repr__(self) -> str:
        return f"<WireStruct {self.name} size={self.size}>"

    # -- packing ---------------------------------------------------------
    def _flatten(self, values: Mapping[str, Any] | Sequence[Any] | None) -> list[Any]:
        if values is None:
            values = {}
        if isinstance(values, tuple) and hasattr(values, "_fields"):
            values = values._asdict()
        if not isinstance(values, Mapping):
            values = dict(zip(self.tuple._fields, values))
        unknown = set(values) - set(self.tuple._fields)
        if unknown:
            raise TypeError(f"{self.name}: unknown fields {sorted(unknown)}")
        flat: list[Any] = []
        for (fname, code), (_, _, sub) in zip(self.fields, self._nested):
            v = values.get(fname)
            if sub is not None:
                flat.extend(sub._flatten(v))
            elif v is None:
                flat.append(b"" if code.endswith("s") else 0)
            else:
                flat.append(v)
        return flat

    def pack(self, _values: Mapping[str, Any] | Sequence[Any] | None = None, **kw: Any) -> bytes:
        """Pack from a mapping/namedtuple and/or keywords; missing fields are 0."""
        if kw:
            base = {} if _values is None else (
                _values._asdict() if hasattr(_values, "_asdict") else dict(_values))
            base.update(kw)
            _values = base
        return self._struct.pack(*self._flatten(_values))

    @property
    def flat_fields(self) -> tuple[str, ...]:
        """Field names in the order `flat_pack` takes them (nested structs inlined,
        as `outer.inner`)."""
        out: list[str] = []
        for (fname, _), (_, _, sub) in zip(self.fields, self._nested):
            out.extend([fname] if sub is None else [f"{fname}.{n}" for n in sub.flat_fields])
        return tuple(out)

    def pack_into(self, buf: Any, offset: int, _values: Any = None, **kw: Any) -> None:
        if kw:
            base = {} if _values is None else (
                _values._asdict() if hasattr(_values, "_asdict") else dict(_values))
            base.update(kw)
            _values = base
        self._struct.pack_into(buf, offset, *self._flatten(_values))

    # -- unpacking -------------------------------------------------------
    def _build(self, flat: Sequence[Any]) -> Any:
        out = []
        for start, length, sub in self._nested:
            out.append(flat[start] if sub is None else sub._build(flat[start:start + length]))
        return self.tuple._make(out)

    def unpack_from(self, buf: Any, offset: int = 0) -> Any:
        """Unpack one struct at `offset`; raises `struct.error` if `buf` is short."""
        flat = self._struct.unpack_from(buf, offset)
        # (the named tuple made straight from the values: struct gives exactly
        # one per field, so _make's count check and its Python frame are not needed)
        return _tuple_new(self.tuple, flat) if self._plain else self._build(flat)

    def unpack(self, buf: Any) -> Any:
        """Unpack a buffer that must be exactly `size` bytes long."""
        if len(buf) != self.size:
            raise struct.error(f"{self.name}: need {self.size} bytes, got {len(buf)}")
        return self.unpack_from(buf, 0)


def all_structs(namespace: Mapping[str, Any]) -> Iterable[WireStruct]:
    """Every WireStruct defined in a module namespace (for size tests)."""
    return (v for v in namespace.values() if isinstance(v, WireStruct))
