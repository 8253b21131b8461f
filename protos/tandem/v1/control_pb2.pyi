from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeResources(_message.Message):
    __slots__ = ("cpu_cores", "memory_bytes", "cpu_features")
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_FEATURES_FIELD_NUMBER: _ClassVar[int]
    cpu_cores: int
    memory_bytes: int
    cpu_features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cpu_cores: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., cpu_features: _Optional[_Iterable[str]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("join_token", "hostname", "inference_address", "resources", "node_id")
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    join_token: str
    hostname: str
    inference_address: str
    resources: NodeResources
    node_id: str
    def __init__(self, join_token: _Optional[str] = ..., hostname: _Optional[str] = ..., inference_address: _Optional[str] = ..., resources: _Optional[_Union[NodeResources, _Mapping]] = ..., node_id: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("node_id", "node_credential", "model_version", "heartbeat_interval_ms", "manifest_public_key")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_credential: str
    model_version: str
    heartbeat_interval_ms: int
    manifest_public_key: str
    def __init__(self, node_id: _Optional[str] = ..., node_credential: _Optional[str] = ..., model_version: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., manifest_public_key: _Optional[str] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("in_flight", "queue_depth", "tokens_per_second")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    queue_depth: int
    tokens_per_second: float
    def __init__(self, in_flight: _Optional[int] = ..., queue_depth: _Optional[int] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "model_version", "loading_version", "load", "healthy")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADING_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model_version: str
    loading_version: str
    load: NodeLoad
    healthy: bool
    def __init__(self, node_id: _Optional[str] = ..., model_version: _Optional[str] = ..., loading_version: _Optional[str] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ..., healthy: bool = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("desired_model_version", "heartbeat_interval_ms")
    DESIRED_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    desired_model_version: str
    heartbeat_interval_ms: int
    def __init__(self, desired_model_version: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    def __init__(self, model_version: _Optional[str] = ...) -> None: ...

class ArtifactManifest(_message.Message):
    __slots__ = ("model_version", "manifest_json", "signature", "key_id")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    manifest_json: bytes
    signature: bytes
    key_id: str
    def __init__(self, model_version: _Optional[str] = ..., manifest_json: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class FetchArtifactRequest(_message.Message):
    __slots__ = ("model_version", "path", "offset")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    path: str
    offset: int
    def __init__(self, model_version: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...

class VersionOutcomes(_message.Message):
    __slots__ = ("model_version", "requests", "errors", "escalations", "latency_p50_ms", "latency_p99_ms")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ESCALATIONS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    requests: int
    errors: int
    escalations: int
    latency_p50_ms: float
    latency_p99_ms: float
    def __init__(self, model_version: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., escalations: _Optional[int] = ..., latency_p50_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ...) -> None: ...

class OutcomeReport(_message.Message):
    __slots__ = ("node_id", "window_s", "outcomes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    window_s: float
    outcomes: _containers.RepeatedCompositeFieldContainer[VersionOutcomes]
    def __init__(self, node_id: _Optional[str] = ..., window_s: _Optional[float] = ..., outcomes: _Optional[_Iterable[_Union[VersionOutcomes, _Mapping]]] = ...) -> None: ...

class OutcomeAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "hostname", "inference_address", "served_version", "desired_version", "healthy", "last_heartbeat_age_s", "live")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SERVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    DESIRED_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hostname: str
    inference_address: str
    served_version: str
    desired_version: str
    healthy: bool
    last_heartbeat_age_s: float
    live: bool
    def __init__(self, node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., inference_address: _Optional[str] = ..., served_version: _Optional[str] = ..., desired_version: _Optional[str] = ..., healthy: bool = ..., last_heartbeat_age_s: _Optional[float] = ..., live: bool = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...
