"""Process-wide model registry, zero-copy shared-memory tensors, and the model-worker client.

Bindings over the Rust crate ``remotemedia-runtime-core``: the registry, the allocator and every
shape, dtype and size check are core's; this module converts between them and Python.

The registry runs its loads and TTL sweeper on a tokio runtime that the extension owns: one
worker thread plus a blocking pool that runs Python loaders, started on the first registry call.
The model-worker clients run their calls on the same runtime. A runtime does not survive
``fork``: a process forked after the first registry or client call must not use either (use the
``spawn`` start method of ``multiprocessing``).
"""

import enum
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypeVar, overload

import numpy as np
import numpy.typing as npt

_T = TypeVar("_T")

class RemoteMediaError(Exception):
    """Base of every exception this module raises."""

class TensorError(RemoteMediaError, ValueError):
    """A tensor's shape, dtype, size or offset does not fit, or the tensor was freed."""

class RegionNotFoundError(RemoteMediaError, KeyError, ValueError):
    """No shared-memory region has this id (it was freed, or never existed)."""

class AllocationError(RemoteMediaError, MemoryError):
    """An allocation would exceed a session quota or the allocator's limit."""

class SharedMemoryError(RemoteMediaError, OSError):
    """The system refused a shared-memory operation."""

class RegistryError(RemoteMediaError, RuntimeError):
    """The registry could not give a model for another reason than the loader raising
    (a memory or model-count cap it cannot make room under)."""

# --- model registry ---------------------------------------------------------------------------

class ModelWorkerError(RemoteMediaError):
    """A model-worker client call failed."""

    code: str | None
    """The gRPC status code's name (``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"``, ...), or None for a
    failure on this side (a bad answer, a call before ``connect()``)."""
    message: str
    """The server's own message for a status it sent; otherwise the reason, as ``str(error)``."""

class ServerError(ModelWorkerError):
    """The server answered with an error status: ``code`` and ``message`` are its."""

class WorkerUnavailableError(ModelWorkerError, ConnectionError):
    """Nothing answered at the endpoint: every attempt to connect failed (with doubling back-off),
    so no request reached a server. ``code`` is ``"UNAVAILABLE"``."""

class ConnectionLostError(ModelWorkerError, ConnectionError):
    """The connection broke with the request in flight (a worker killed mid-request): the server
    may have run it, so it was not sent again. ``code`` is ``"UNAVAILABLE"``."""

class DeadlineExceededError(ModelWorkerError, TimeoutError):
    """The call's deadline passed, measured here or reported by the server."""

class InvalidEndpointError(ModelWorkerError, ValueError):
    """The endpoint is not ``grpc://host[:port]``, ``unix:///path/to/socket`` or
    ``unix:///socket/dir``, or no endpoint was given and ``REMOTEMEDIA_SIDECAR`` is unset."""

class EvictionPolicy(enum.Enum):
    """Which idle models a registry unloads, and in what order under a cap."""

    TTL = ...
    """Unload a model idle longer than ``ttl_seconds``; under a cap, the longest idle first."""
    LRU = ...
    """Keep idle models until a cap is reached; then the least recently used goes first."""
    LFU = ...
    """Keep idle models until a cap is reached; then the least often used goes first."""
    MANUAL = ...
    """Unload only on ``release``, ``evict_expired`` or ``clear``; a load over a cap fails."""

class RegistryConfig:
    """A registry's limits and eviction policy.

    Durations must be finite and >= 0 (``ValueError`` otherwise). ``enable_metrics=False`` makes
    ``ModelRegistry.metrics()`` raise ``RegistryError`` instead of answering.
    """

    def __init__(
        self,
        ttl_seconds: float = 30.0,
        max_memory_bytes: int | None = None,
        max_models: int | None = None,
        eviction_policy: EvictionPolicy = EvictionPolicy.TTL,
        enable_metrics: bool = True,
        sweep_interval_seconds: float = 5.0,
    ) -> None: ...
    @property
    def ttl_seconds(self) -> float: ...
    @property
    def max_memory_bytes(self) -> int | None: ...
    @property
    def max_models(self) -> int | None: ...
    @property
    def eviction_policy(self) -> EvictionPolicy: ...
    @property
    def enable_metrics(self) -> bool: ...
    @property
    def sweep_interval_seconds(self) -> float: ...

class RegistryMetrics:
    """Counters since a registry was created, and what it holds now."""

    hit_rate: float
    """``cache_hits / (cache_hits + cache_misses)``, 0 before any request."""
    total_memory_bytes: int
    """Sum of the ``memory_bytes`` declared for the loaded models."""
    total_models: int
    cache_hits: int
    cache_misses: int
    loads: int
    """Loads started; one load shared by concurrent callers counts once."""
    evictions: int

class ModelInfo:
    """One loaded model, as ``ModelRegistry.list_models()`` reports it."""

    model_id: str
    memory_bytes: int
    reference_count: int
    """Callers inside ``get_or_load`` right now (0 once they have the object)."""
    loaded_at: float
    """Seconds since the Unix epoch."""
    last_accessed: float
    """Seconds since the Unix epoch: the latest ``get_or_load`` of this id."""
    access_count: int

class ModelRegistry:
    """Holds one instance of each model and hands the same object to every caller.

    ``ModelRegistry(config)`` is a new registry; ``global_registry()`` is the process-wide one
    that the module-level ``get_or_load`` uses.

    A model counts as in use only while a ``get_or_load`` call is handing it out: the TTL
    measures time since the last ``get_or_load`` of its id, and an evicted model stays alive for
    as long as Python holds references to it (the next ``get_or_load`` loads a new one). Call
    ``get_or_load`` where the model is used (a hit costs microseconds), or use
    ``EvictionPolicy.MANUAL`` to keep models until released.
    """

    def __init__(self, config: RegistryConfig | None = None) -> None: ...
    def get_or_load(
        self, model_id: str, loader: Callable[[], _T], *, memory_bytes: int | None = None
    ) -> _T:
        """The model loaded under ``model_id``, calling ``loader()`` to load it if it is not.

        However many threads ask at once, ``loader`` runs once (on a registry thread, holding the
        GIL only while it runs Python) and every caller gets the same object; callers wait with the
        GIL released. An exception raised by ``loader`` is raised to every waiting caller, and the
        next call loads again. ``memory_bytes`` is what the model counts against
        ``max_memory_bytes``. A loader must not ``get_or_load`` its own ``model_id`` (it would
        wait for itself). Ctrl-C during the wait takes effect when the load finishes.
        """
    def metrics(self) -> RegistryMetrics: ...
    def list_models(self) -> list[ModelInfo]:
        """The models loaded now, sorted by id (loads in progress are not listed)."""
    def release(self, model_id: str) -> bool:
        """Unloads ``model_id`` now; False when it was not loaded."""
    def evict_expired(self) -> int:
        """Unloads every model idle longer than ``ttl_seconds``, whatever the policy."""
    def clear(self) -> int:
        """Unloads every model; returns how many."""
    def __contains__(self, model_id: str) -> bool: ...
    def __len__(self) -> int: ...

def get_or_load(model_id: str, loader: Callable[[], _T], *, memory_bytes: int | None = None) -> _T:
    """``ModelRegistry.get_or_load`` on the process-wide registry (default config: TTL 30 s)."""

def global_registry() -> ModelRegistry:
    """The process-wide registry that ``get_or_load`` uses."""

# --- tensors ----------------------------------------------------------------------------------

class DataType(enum.Enum):
    """The element type of a tensor."""

    F64 = ...
    F32 = ...
    F16 = ...
    BF16 = ...
    I8 = ...
    I16 = ...
    I32 = ...
    I64 = ...
    U8 = ...
    U16 = ...
    U32 = ...
    U64 = ...
    BOOL = ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def triton_name(self) -> str:
        """Triton's (KServe v2's) name of the type, e.g. ``"FP32"``."""

class _NewFromNumpy(Protocol):
    def __call__(self, data: npt.ArrayLike, zero_copy: bool = True) -> TensorBuffer: ...

class _CopyFromNumpy(Protocol):
    def __call__(self, data: npt.ArrayLike) -> None: ...

class _FromNumpy:
    @overload
    def __get__(self, instance: None, owner: type[TensorBuffer]) -> _NewFromNumpy: ...
    @overload
    def __get__(self, instance: TensorBuffer, owner: type[TensorBuffer]) -> _CopyFromNumpy: ...

class TensorBuffer:
    """A dense, C-contiguous tensor: on the heap, in shared memory, or a view of a NumPy array or
    torch tensor.

    Every NumPy array or torch tensor made from it (``to_numpy()``, ``numpy.from_dlpack``,
    ``torch.from_dlpack``) is a view of the same memory and keeps that memory alive, even after
    the ``TensorBuffer`` is freed or collected. A tensor is also a context manager that frees it
    when the block ends.
    """

    from_numpy: _FromNumpy
    """``TensorBuffer.from_numpy(data, zero_copy=True)``: a tensor of the array's shape and
    dtype — a view of the array's memory with ``zero_copy=True`` (which needs a writable,
    C-contiguous array, else ``TensorError``), or a copy on the heap.

    ``tensor.from_numpy(data)`` on an instance: copies the array into the tensor's memory (one
    copy) and takes on its shape and dtype; the array must have exactly ``tensor.nbytes`` bytes
    (``TensorError`` otherwise)."""

    def copy_from_numpy(self, data: npt.ArrayLike) -> None:
        """``tensor.from_numpy(data)`` on an instance."""
    @staticmethod
    def from_dlpack(tensor: Any) -> TensorBuffer:
        """A view (no copy) of another library's CPU tensor: anything with ``__dlpack__``, e.g.
        a torch tensor. Raises ``TensorError`` for a tensor on another device, of an unsupported
        dtype, not C-contiguous, or read-only."""
    @staticmethod
    def from_shared_memory(
        region_id: str, offset: int, size: int, shape: list[int], dtype: DataType
    ) -> TensorBuffer:
        """Maps ``size`` bytes at ``offset`` of the region ``region_id`` (from this or another
        process) as a tensor of ``shape`` and ``dtype``, without copying. Raises
        ``RegionNotFoundError`` for an unknown region and ``TensorError`` when shape, dtype,
        size and offset do not fit each other and the region."""
    def to_numpy(self) -> np.ndarray:
        """A NumPy array over the tensor's memory (no copy); writes go to the tensor. The array's
        ``base`` holds the memory alive."""
    def to_shared_memory(
        self, allocator: SharedMemoryAllocator | None = None, session_id: str | None = None
    ) -> str:
        """Moves the tensor into shared memory (one copy, none if it is there already) and
        returns the region id another process passes to ``from_shared_memory``. The region lives
        as long as this tensor or a view of it. Without ``allocator``, a module-wide one with the
        default limits (1 GiB in all) is used."""
    def __dlpack__(
        self,
        stream: Any | None = None,
        *,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any:
        """DLPack export on the CPU (``BufferError`` for another ``dl_device`` or a stream);
        ``copy=True`` exports a copy, anything else the tensor's own memory."""
    def __dlpack_device__(self) -> tuple[Literal[1], Literal[0]]: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> DataType: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def ndim(self) -> int: ...
    @property
    def is_shared(self) -> bool: ...
    @property
    def region_id(self) -> str | None:
        """The shared-memory region's id; None when the tensor is not in shared memory."""
    @property
    def offset(self) -> int: ...
    @property
    def freed(self) -> bool: ...
    def free(self) -> None:
        """Lets go of the memory now (an allocator's region returns to its pool once no view
        uses it). Using the tensor afterwards raises ``TensorError``."""
    def __enter__(self) -> TensorBuffer: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

class AllocatorConfig:
    """Limits and housekeeping of a ``SharedMemoryAllocator``."""

    def __init__(
        self,
        max_memory_bytes: int = 1 << 30,
        per_session_quota: int = 256 << 20,
        cleanup_interval_seconds: float = 60.0,
        allow_heap_fallback: bool = False,
    ) -> None: ...
    @property
    def max_memory_bytes(self) -> int: ...
    @property
    def per_session_quota(self) -> int: ...
    @property
    def cleanup_interval_seconds(self) -> float: ...
    @property
    def allow_heap_fallback(self) -> bool: ...

class AllocatorStats:
    in_use_bytes: int
    regions_created: int
    pool_hits: int
    pooled_regions: int

class SharedMemoryAllocator:
    """Hands out shared-memory tensors, one named POSIX region each, pooled by size class, within
    ``max_memory_bytes`` and a per-session quota. Quota and limit errors are ``AllocationError``."""

    def __init__(self, config: AllocatorConfig | None = None) -> None: ...
    def allocate_tensor(self, size: int, session_id: str | None = None) -> TensorBuffer:
        """A zeroed shared-memory tensor of ``size`` bytes (shape ``(size,)``, ``DataType.U8``),
        charged to ``session_id`` if given; ``tensor.from_numpy(array)`` fills it."""
    def tensor(self, size: int, session_id: str | None = None) -> TensorBuffer:
        """``allocate_tensor`` for ``with allocator.tensor(size) as t:``, which frees it on exit."""
    def session_usage(self, session_id: str) -> int: ...
    def stats(self) -> AllocatorStats: ...

_Tensor = TensorBuffer | npt.ArrayLike
"""An input: a ``TensorBuffer`` (sent by reference when it is in shared memory the server can
reach and at least 64 KiB), or anything ``numpy.asarray`` accepts (copied once, sent inline)."""

class ModelWorkerClient:
    """An asyncio client of a model worker, or of the node sidecar: bindings over the Rust
    ``ModelWorkerClient`` of ``remotemedia-runtime-core`` (one implementation of the protocol).

    ``endpoint``: ``grpc://host[:port]`` (port 50051 by default), ``unix:///path/to/socket``, or
    ``unix:///socket/dir`` (its ``infer.sock``); None: the node sidecar whose socket directory
    ``REMOTEMEDIA_SIDECAR`` names (``InvalidEndpointError`` from ``connect()`` if it is unset).
    How a tensor travels is the client's choice: a tensor of a ``SharedMemoryAllocator`` goes by
    reference to a server that can map it (a named region to a worker or sidecar listing system
    shared memory; a brokered region, allocated with ``REMOTEMEDIA_SIDECAR`` set, to the sidecar
    on its Unix socket), anything else and anything under ``inline_threshold`` bytes inline.
    ``timeout``: default deadline of every call, in seconds (None: none).

    Every method except the constructor returns an awaitable, to be awaited on the event loop
    that called it; cancelling it abandons the call. Outputs are new heap tensors.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float | None = None,
        inline_threshold: int | None = None,
    ) -> None: ...
    @property
    def endpoint(self) -> str | None:
        """The endpoint given, or None for the sidecar of ``REMOTEMEDIA_SIDECAR``."""
    async def connect(self) -> None:
        """Connects (retrying with back-off; ``WorkerUnavailableError`` if nothing answers) and
        asks the server which shared memory it can see."""
    @overload
    async def infer(
        self, input: _Tensor, *, model: str | None = None, timeout: float | None = None
    ) -> TensorBuffer: ...
    @overload
    async def infer(
        self,
        input: Mapping[str, _Tensor],
        *,
        model: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, TensorBuffer]: ...
    async def infer(
        self,
        input: _Tensor | Mapping[str, _Tensor],
        *,
        model: str | None = None,
        timeout: float | None = None,
    ) -> TensorBuffer | dict[str, TensorBuffer]:
        """Runs ``model`` (None: the server's only model) on one tensor (the model must have one
        input and one output) or on named tensors (every output comes back, by name).
        ``timeout`` in seconds overrides the client's. Server errors raise ``ServerError``."""
    async def infer_stream(self, *, model: str | None = None) -> InferStream:
        """Opens a ``ModelStreamInfer`` stream to the model."""
    async def health_check(self) -> bool:
        """True when the server is live and ready."""
    async def status(self, model: str | None = None) -> dict[str, Any]:
        """The model's metadata and statistics: ``name``, ``versions``, ``platform``, ``inputs``
        and ``outputs`` (lists of ``{"name", "datatype", "shape"}``), ``statistics`` (None, or
        ``inference_count``, ``execution_count``, ``last_inference_ms``, ``success_count``,
        ``success_ns``, ``fail_count``, ``fail_ns``)."""
    async def close(self) -> None:
        """Unregisters the client's shared-memory registrations at the server; later calls raise
        ``ModelWorkerError`` until ``connect()`` again. Closing twice does nothing."""
    async def __aenter__(self) -> Self:
        """Connects."""
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Closes."""

class InferStream:
    """A stream of the asyncio client. ``send`` queues a request and returns its id; answers come
    in the server's order, each as ``(id, output)`` (one output: a ``TensorBuffer``; several: a
    dict by name). A request the server rejected raises from the ``next()`` that reaches its
    answer; if the stream breaks, each unanswered request raises ``ConnectionLostError``. One
    call uses the stream at a time: a ``next()`` waiting for an answer delays a ``send()`` until
    that answer came, so send, then read."""

    async def send(self, input: _Tensor | Mapping[str, _Tensor]) -> int: ...
    async def next(self) -> tuple[int, TensorBuffer | dict[str, TensorBuffer]] | None:
        """The next answer; None once every request was answered after ``close_send()``."""
    async def close_send(self) -> None:
        """Ends the sending side; answers to requests already sent still come."""
    def __aiter__(self) -> Self: ...
    async def __anext__(self) -> tuple[int, TensorBuffer | dict[str, TensorBuffer]]: ...

class BlockingModelWorkerClient:
    """``ModelWorkerClient`` with calls that block (the GIL released while they wait); ``with``
    connects and closes."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float | None = None,
        inline_threshold: int | None = None,
    ) -> None: ...
    @property
    def endpoint(self) -> str | None: ...
    def connect(self) -> None: ...
    @overload
    def infer(
        self, input: _Tensor, *, model: str | None = None, timeout: float | None = None
    ) -> TensorBuffer: ...
    @overload
    def infer(
        self,
        input: Mapping[str, _Tensor],
        *,
        model: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, TensorBuffer]: ...
    def infer_stream(self, *, model: str | None = None) -> BlockingInferStream: ...
    def health_check(self) -> bool: ...
    def status(self, model: str | None = None) -> dict[str, Any]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

class BlockingInferStream:
    """``InferStream`` of the blocking client; ``for id, output in stream`` reads to the end."""

    def send(self, input: _Tensor | Mapping[str, _Tensor]) -> int: ...
    def next(self) -> tuple[int, TensorBuffer | dict[str, TensorBuffer]] | None: ...
    def close_send(self) -> None: ...
    def __iter__(self) -> Iterator[tuple[int, TensorBuffer | dict[str, TensorBuffer]]]: ...
