from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_STOPPING: _ClassVar[RunState]
    RUN_STATE_FINISHED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_STOPPING: RunState
RUN_STATE_FINISHED: RunState
RUN_STATE_FAILED: RunState

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Worker(_message.Message):
    __slots__ = ("rank", "node", "pid", "experts", "backend")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    rank: int
    node: str
    pid: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    backend: str
    def __init__(self, rank: _Optional[int] = ..., node: _Optional[str] = ..., pid: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ..., backend: _Optional[str] = ...) -> None: ...

class MoELayer(_message.Message):
    __slots__ = ("layer", "n_experts", "thresholds")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    N_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    n_experts: int
    thresholds: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layer: _Optional[int] = ..., n_experts: _Optional[int] = ..., thresholds: _Optional[_Iterable[float]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("state", "run_dir", "router", "step", "total_steps", "train_loss", "val_loss", "val_loss_step", "tokens_per_s", "workers", "layers", "checkpoint_step", "checkpoint_path", "failures", "stopped_at_step", "error")
    STATE_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_STEP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    STOPPED_AT_STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    state: RunState
    run_dir: str
    router: str
    step: int
    total_steps: int
    train_loss: float
    val_loss: float
    val_loss_step: int
    tokens_per_s: float
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    layers: _containers.RepeatedCompositeFieldContainer[MoELayer]
    checkpoint_step: int
    checkpoint_path: str
    failures: int
    stopped_at_step: int
    error: str
    def __init__(self, state: _Optional[_Union[RunState, str]] = ..., run_dir: _Optional[str] = ..., router: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., val_loss_step: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ..., layers: _Optional[_Iterable[_Union[MoELayer, _Mapping]]] = ..., checkpoint_step: _Optional[int] = ..., checkpoint_path: _Optional[str] = ..., failures: _Optional[int] = ..., stopped_at_step: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class StreamMetricsRequest(_message.Message):
    __slots__ = ("from_step", "follow")
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    from_step: int
    follow: bool
    def __init__(self, from_step: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class DoubleArray(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class MetricsRow(_message.Message):
    __slots__ = ("step", "values", "arrays")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ArraysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: DoubleArray
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[DoubleArray, _Mapping]] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    step: int
    values: _containers.ScalarMap[str, float]
    arrays: _containers.MessageMap[str, DoubleArray]
    def __init__(self, step: _Optional[int] = ..., values: _Optional[_Mapping[str, float]] = ..., arrays: _Optional[_Mapping[str, DoubleArray]] = ...) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("workers", "experts", "noise")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    workers: int
    experts: int
    noise: float
    def __init__(self, workers: _Optional[int] = ..., experts: _Optional[int] = ..., noise: _Optional[float] = ...) -> None: ...

class ScaleResponse(_message.Message):
    __slots__ = ("step", "workers", "experts")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    workers: int
    experts: int
    def __init__(self, step: _Optional[int] = ..., workers: _Optional[int] = ..., experts: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("step", "path")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    step: int
    path: str
    def __init__(self, step: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopResponse(_message.Message):
    __slots__ = ("step", "total_steps")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ...) -> None: ...
