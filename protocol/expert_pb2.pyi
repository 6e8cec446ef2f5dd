from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "pad")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    pad: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., pad: _Optional[bytes] = ...) -> None: ...

class ExpertBatch(_message.Message):
    __slots__ = ("uid", "inputs", "grad_outputs", "forward_id", "input_grads_only")
    UID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRADS_ONLY_FIELD_NUMBER: _ClassVar[int]
    uid: str
    inputs: Tensor
    grad_outputs: Tensor
    forward_id: str
    input_grads_only: bool
    def __init__(self, uid: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., grad_outputs: _Optional[_Union[Tensor, _Mapping]] = ..., forward_id: _Optional[str] = ..., input_grads_only: _Optional[bool] = ...) -> None: ...

class ExpertRequest(_message.Message):
    __slots__ = ("model", "request_id", "batches", "backward", "keep_activations")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    KEEP_ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    request_id: str
    batches: _containers.RepeatedCompositeFieldContainer[ExpertBatch]
    backward: bool
    keep_activations: bool
    def __init__(self, model: _Optional[str] = ..., request_id: _Optional[str] = ..., batches: _Optional[_Iterable[_Union[ExpertBatch, _Mapping]]] = ..., backward: _Optional[bool] = ..., keep_activations: _Optional[bool] = ...) -> None: ...

class ExpertResponse(_message.Message):
    __slots__ = ("request_id", "tensors", "error_code", "error_message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    error_code: int
    error_message: str
    def __init__(self, request_id: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSpecMsg(_message.Message):
    __slots__ = ("name", "d_model", "d_ff", "n_layers", "n_experts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    D_FF_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    d_model: int
    d_ff: int
    n_layers: int
    n_experts: int
    def __init__(self, name: _Optional[str] = ..., d_model: _Optional[int] = ..., d_ff: _Optional[int] = ..., n_layers: _Optional[int] = ..., n_experts: _Optional[int] = ...) -> None: ...

class ExpertState(_message.Message):
    __slots__ = ("uid", "version", "rows_served")
    UID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_SERVED_FIELD_NUMBER: _ClassVar[int]
    uid: str
    version: int
    rows_served: int
    def __init__(self, uid: _Optional[str] = ..., version: _Optional[int] = ..., rows_served: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "experts", "queue_depth", "rows_per_s", "wire_dtypes", "max_rows", "max_message_bytes", "peer_id", "reused_activation_rows")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_S_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    REUSED_ACTIVATION_ROWS_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpecMsg
    experts: _containers.RepeatedCompositeFieldContainer[ExpertState]
    queue_depth: int
    rows_per_s: float
    wire_dtypes: _containers.RepeatedScalarFieldContainer[str]
    max_rows: int
    max_message_bytes: int
    peer_id: str
    reused_activation_rows: int
    def __init__(self, model: _Optional[_Union[ModelSpecMsg, _Mapping]] = ..., experts: _Optional[_Iterable[_Union[ExpertState, _Mapping]]] = ..., queue_depth: _Optional[int] = ..., rows_per_s: _Optional[float] = ..., wire_dtypes: _Optional[_Iterable[str]] = ..., max_rows: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., peer_id: _Optional[str] = ..., reused_activation_rows: _Optional[int] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("uid", "max_chunk_bytes")
    UID_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    uid: str
    max_chunk_bytes: int
    def __init__(self, uid: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("uid", "version", "name", "dtype", "shape", "offset", "data")
    UID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    uid: str
    version: int
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    def __init__(self, uid: _Optional[str] = ..., version: _Optional[int] = ..., name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
