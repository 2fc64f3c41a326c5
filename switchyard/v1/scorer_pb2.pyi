from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("scorer", "messages", "request_id", "available", "has_available")
    SCORER_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    HAS_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    scorer: str
    messages: bytes
    request_id: str
    available: _containers.RepeatedScalarFieldContainer[str]
    has_available: bool
    def __init__(self, scorer: _Optional[str] = ..., messages: _Optional[bytes] = ..., request_id: _Optional[str] = ..., available: _Optional[_Iterable[str]] = ..., has_available: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("values", "costs", "batch_size")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class CostsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    COSTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, float]
    costs: _containers.ScalarMap[str, float]
    batch_size: int
    def __init__(self, values: _Optional[_Mapping[str, float]] = ..., costs: _Optional[_Mapping[str, float]] = ..., batch_size: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("scorers",)
    SCORERS_FIELD_NUMBER: _ClassVar[int]
    scorers: _containers.RepeatedCompositeFieldContainer[ScorerInfo]
    def __init__(self, scorers: _Optional[_Iterable[_Union[ScorerInfo, _Mapping]]] = ...) -> None: ...

class ScorerInfo(_message.Message):
    __slots__ = ("name", "kind", "outputs", "pool", "default_deadline_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    outputs: _containers.RepeatedScalarFieldContainer[str]
    pool: _containers.RepeatedScalarFieldContainer[str]
    default_deadline_ms: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., outputs: _Optional[_Iterable[str]] = ..., pool: _Optional[_Iterable[str]] = ..., default_deadline_ms: _Optional[float] = ...) -> None: ...
