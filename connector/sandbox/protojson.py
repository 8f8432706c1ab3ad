"""Strict reading of proto3 JSON request bodies against the official client's message descriptors, the
way Google's REST front end reads them: unknown names are refused ("Invalid JSON payload received.
Unknown name ..."), two members of one oneof are refused, enum names become numbers. The body is
parsed once (``json.loads``) and checked in place, with no message objects built: a 10,000-member
request costs a walk over plain dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_ENUM = FieldDescriptor.TYPE_ENUM
_STRING = FieldDescriptor.TYPE_STRING
_BOOL = FieldDescriptor.TYPE_BOOL
# well-known types written as JSON strings or free-form values
_SCALAR_MESSAGES = frozenset({"google.protobuf.Duration", "google.protobuf.Timestamp", "google.protobuf.FieldMask",
                              "google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})  # fmt: skip


class JsonFieldError(ValueError):
    """`field` is the proto path of the offending value (``audience_members[3].user_data``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class _Problem(Exception):
    """Raised deep in a body; each level on the way up adds its part of the path (no path is built
    for bodies that are fine)."""

    def __init__(self, template: str, *parts: str | int) -> None:
        super().__init__(template)
        self.template = template
        self.parts: list[str | int] = list(parts)

    def error(self) -> JsonFieldError:
        path = ""
        for part in self.parts:
            path = f"{path}[{part}]" if isinstance(part, int) else (f"{path}.{part}" if path else part)
        return JsonFieldError(self.template.format(path=path or "request"), path)


@dataclass(slots=True)
class _Field:
    name: str
    kind: int
    repeated: bool
    oneof: str | None
    message: Descriptor | None
    walk: bool  # a message checked field by field (not a well-known type written as a JSON value)
    enum_numbers: frozenset[int] = frozenset()
    enum_names: dict[str, int] = field(default_factory=dict)
    child: _Message | None = None  # the message's field table, for fields that are messages checked by name

    def table(self) -> _Message:
        if self.child is None:
            assert self.message is not None
            self.child = _message(self.message)
        return self.child


@dataclass(slots=True)
class _Message:
    # JSON name and proto name -> field; the JSON names are what we store under
    by_name: dict[str, tuple[str, _Field]]
    json_names: frozenset[str]
    fields: dict[str, _Field]  # JSON name -> field


_CACHE: dict[str, _Message] = {}


def _message(desc: Descriptor) -> _Message:
    cached = _CACHE.get(desc.full_name)
    if cached is not None:
        return cached
    by_name: dict[str, tuple[str, _Field]] = {}
    for f in desc.fields:
        message = f.message_type if f.type == _MESSAGE else None
        info = _Field(
            name=f.name, kind=f.type, repeated=f.is_repeated,
            oneof=f.containing_oneof.name if f.containing_oneof is not None else None,
            message=message, walk=message is not None and message.full_name not in _SCALAR_MESSAGES,
        )  # fmt: skip
        if f.type == _ENUM:
            info.enum_numbers = frozenset(v.number for v in f.enum_type.values)
            info.enum_names = {v.name: v.number for v in f.enum_type.values}
        by_name[f.json_name] = (f.json_name, info)
        by_name[f.name] = (f.json_name, info)
    msg = _Message(by_name, frozenset(f.json_name for f in desc.fields), {k: v[1] for k, v in by_name.items() if k == v[0]})
    _CACHE[desc.full_name] = msg
    return msg


def check(obj: Any, desc: Descriptor) -> None:
    """Refuse what the API would refuse; rename proto names to JSON names and enum names to numbers, in place."""
    try:
        _check(obj, _message(desc))
    except _Problem as exc:
        raise exc.error() from None


def _check(obj: Any, msg: _Message) -> None:
    if type(obj) is not dict:
        raise _Problem("Invalid value at '{path}': expected an object")
    if not msg.json_names.issuperset(obj):
        _rename(obj, msg)
    oneofs: dict[str, str] | None = None
    fields = msg.fields
    for key, value in obj.items():
        f = fields[key]
        if f.oneof is not None and len(obj) > 1:
            oneofs = oneofs if oneofs is not None else {}
            if f.oneof in oneofs:
                raise _Problem(f"Invalid value at '{{path}}': oneof field '{f.oneof}' is already set "
                               f"({oneofs[f.oneof]}), cannot set '{f.name}'")  # fmt: skip
            oneofs[f.oneof] = f.name
        if value is None:
            continue
        try:
            if f.repeated:
                if type(value) is not list:
                    raise _Problem("Invalid value at '{path}': expected a list")
                if f.walk:
                    table = f.child or f.table()
                    i = 0
                    strings = table.fields
                    try:
                        for i, item in enumerate(value):  # noqa: B007 - i names the item on error
                            if type(item) is dict and len(item) == 1:
                                # the usual item, one string field by its JSON name (an identifier): checked here
                                ((name, text),) = item.items()
                                g = strings.get(name)
                                if type(text) is str and g is not None and g.kind == _STRING and not g.repeated:
                                    continue
                            _check(item, table)
                    except _Problem as exc:
                        exc.parts.insert(0, i)
                        raise
                elif f.kind == _ENUM:
                    for i, item in enumerate(value):
                        value[i] = _enum(item, f)
            elif f.message is not None:
                if f.walk:
                    _check(value, f.child or f.table())
            elif f.kind == _ENUM:
                if type(value) is not int or value not in f.enum_numbers:
                    obj[key] = _enum(value, f)
            elif f.kind == _STRING and type(value) is not str:
                raise _Problem(f"Invalid value at '{{path}}' ({type(value).__name__}): expected a string")
            elif f.kind == _BOOL and type(value) is not bool:
                raise _Problem("Invalid value at '{path}': expected true or false")
        except _Problem as exc:
            exc.parts.insert(0, f.name)
            raise


def _rename(obj: dict[str, Any], msg: _Message) -> None:
    for key in list(obj):
        hit = msg.by_name.get(key)
        if hit is None:
            raise _Problem(f"Invalid JSON payload received. Unknown name \"{key}\" at '{{path}}': Cannot find field.")
        json_name = hit[0]
        if json_name != key:
            if json_name in obj:
                raise _Problem(f"Invalid JSON payload received. Field '{key}' is set twice at '{{path}}'")
            obj[json_name] = obj.pop(key)


def _enum(value: Any, f: _Field) -> int:
    if type(value) is int and value in f.enum_numbers:
        return value
    if isinstance(value, str) and value in f.enum_names:
        return f.enum_names[value]
    raise _Problem(f"Invalid value at '{{path}}' ({value!r}): not a valid enum value")
