from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]
    DATA_TYPE_INT16: _ClassVar[DataType]
    DATA_TYPE_INT32: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_UINT8: DataType
DATA_TYPE_INT16: DataType
DATA_TYPE_INT32: DataType
DATA_TYPE_INT64: DataType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("model", "version", "session_id", "resume")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    session_id: str
    resume: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., session_id: _Optional[str] = ..., resume: _Optional[bool] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "model", "version", "next_seq")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    version: int
    next_seq: int
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., next_seq: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("seq", "tensor", "text", "pcm16", "end", "timeout_ms")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PCM16_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    tensor: Tensor
    text: str
    pcm16: bytes
    end: bool
    timeout_ms: int
    def __init__(self, seq: _Optional[int] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., text: _Optional[str] = ..., pcm16: _Optional[bytes] = ..., end: _Optional[bool] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("open", "chunk")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    open: OpenSessionRequest
    chunk: Chunk
    def __init__(self, open: _Optional[_Union[OpenSessionRequest, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ChunkResult(_message.Message):
    __slots__ = ("seq", "outputs", "end")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    seq: int
    outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    end: bool
    def __init__(self, seq: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., end: _Optional[bool] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("opened", "result")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    opened: SessionInfo
    result: ChunkResult
    def __init__(self, opened: _Optional[_Union[SessionInfo, _Mapping]] = ..., result: _Optional[_Union[ChunkResult, _Mapping]] = ...) -> None: ...

class ManyItem(_message.Message):
    __slots__ = ("session_id", "open", "chunk")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    open: OpenSessionRequest
    chunk: Chunk
    def __init__(self, session_id: _Optional[str] = ..., open: _Optional[_Union[OpenSessionRequest, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class ManyRequest(_message.Message):
    __slots__ = ("id", "items")
    ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    id: int
    items: _containers.RepeatedCompositeFieldContainer[ManyItem]
    def __init__(self, id: _Optional[int] = ..., items: _Optional[_Iterable[_Union[ManyItem, _Mapping]]] = ...) -> None: ...

class ManyResult(_message.Message):
    __slots__ = ("session_id", "code", "message", "retry_after_ms", "opened", "result")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    code: int
    message: str
    retry_after_ms: int
    opened: SessionInfo
    result: ChunkResult
    def __init__(self, session_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ..., opened: _Optional[_Union[SessionInfo, _Mapping]] = ..., result: _Optional[_Union[ChunkResult, _Mapping]] = ...) -> None: ...

class ManyResponse(_message.Message):
    __slots__ = ("id", "results")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    id: int
    results: _containers.RepeatedCompositeFieldContainer[ManyResult]
    def __init__(self, id: _Optional[int] = ..., results: _Optional[_Iterable[_Union[ManyResult, _Mapping]]] = ...) -> None: ...

class PackedRequest(_message.Message):
    __slots__ = ("id", "model", "version", "session_ids", "seqs", "chunks", "opens", "ends", "timeout_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    OPENS_FIELD_NUMBER: _ClassVar[int]
    ENDS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    id: int
    model: str
    version: int
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    seqs: _containers.RepeatedScalarFieldContainer[int]
    chunks: Tensor
    opens: _containers.RepeatedScalarFieldContainer[int]
    ends: _containers.RepeatedScalarFieldContainer[int]
    timeout_ms: int
    def __init__(self, id: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., session_ids: _Optional[_Iterable[str]] = ..., seqs: _Optional[_Iterable[int]] = ..., chunks: _Optional[_Union[Tensor, _Mapping]] = ..., opens: _Optional[_Iterable[int]] = ..., ends: _Optional[_Iterable[int]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class PackedFailure(_message.Message):
    __slots__ = ("index", "code", "message", "retry_after_ms")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    index: int
    code: int
    message: str
    retry_after_ms: int
    def __init__(self, index: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class PackedResponse(_message.Message):
    __slots__ = ("id", "code", "message", "failures", "outputs", "retry_after_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    id: int
    code: int
    message: str
    failures: _containers.RepeatedCompositeFieldContainer[PackedFailure]
    outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    retry_after_ms: int
    def __init__(self, id: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., failures: _Optional[_Iterable[_Union[PackedFailure, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "chunk")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    chunk: Chunk
    def __init__(self, session_id: _Optional[str] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: ChunkResult
    def __init__(self, result: _Optional[_Union[ChunkResult, _Mapping]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelMetadata]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelMetadata, _Mapping]]] = ...) -> None: ...

class GetModelMetadataRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelMetadata(_message.Message):
    __slots__ = ("name", "version", "versions", "arch", "task", "input_kind", "input", "outputs", "labels", "sample_rate", "hop_samples", "state_bytes_per_session", "execution_provider", "properties", "default_version", "withdrawn_versions")
    class PropertiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    HOP_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_PER_SESSION_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    arch: str
    task: str
    input_kind: str
    input: TensorInfo
    outputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    labels: _containers.RepeatedScalarFieldContainer[str]
    sample_rate: int
    hop_samples: int
    state_bytes_per_session: int
    execution_provider: str
    properties: _containers.ScalarMap[str, str]
    default_version: int
    withdrawn_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., arch: _Optional[str] = ..., task: _Optional[str] = ..., input_kind: _Optional[str] = ..., input: _Optional[_Union[TensorInfo, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ..., sample_rate: _Optional[int] = ..., hop_samples: _Optional[int] = ..., state_bytes_per_session: _Optional[int] = ..., execution_provider: _Optional[str] = ..., properties: _Optional[_Mapping[str, str]] = ..., default_version: _Optional[int] = ..., withdrawn_versions: _Optional[_Iterable[int]] = ...) -> None: ...
