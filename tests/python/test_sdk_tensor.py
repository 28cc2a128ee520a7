"""remotemedia.core's tensors from Python: NumPy and DLPack views, copies, the allocator, errors."""

import gc

import numpy as np
import pytest
import torch

from remotemedia.core import (
    AllocationError,
    AllocatorConfig,
    DataType,
    RegionNotFoundError,
    RemoteMediaError,
    SharedMemoryAllocator,
    TensorBuffer,
    TensorError,
)

MiB = 1024**2


@pytest.fixture
def allocator():
    return SharedMemoryAllocator(
        AllocatorConfig(
            max_memory_bytes=64 * MiB, per_session_quota=8 * MiB, cleanup_interval_seconds=30.0
        )
    )


def address(array):
    return array.__array_interface__["data"][0]


def test_shared_tensor_round_trips_through_its_region_id():
    data = np.random.default_rng(1).random((256, 1024), dtype=np.float32)
    tensor = TensorBuffer.from_numpy(data, zero_copy=True)
    region_id = tensor.to_shared_memory()
    assert tensor.is_shared and tensor.region_id == region_id
    shared = TensorBuffer.from_shared_memory(
        region_id=region_id, offset=0, size=data.nbytes, shape=[256, 1024], dtype=DataType.F32
    )
    arr = shared.to_numpy()
    assert arr.shape == (256, 1024) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, data)


def test_to_numpy_is_a_view_of_the_mapping():
    tensor = TensorBuffer.from_numpy(np.zeros(1024, dtype=np.int32))
    region_id = tensor.to_shared_memory()
    other = TensorBuffer.from_shared_memory(region_id, 0, 4096, [1024], DataType.I32)
    view = other.to_numpy()
    assert address(view) == address(other.to_numpy())  # the same memory each time
    view[7] = 42  # written through one mapping ...
    assert tensor.to_numpy()[7] == 42  # ... seen through the other


def test_numpy_view_keeps_the_memory_alive_after_the_tensor_is_freed(allocator):
    tensor = allocator.allocate_tensor(MiB)
    tensor.from_numpy(np.full(MiB // 4, 7, dtype=np.float32))
    view = tensor.to_numpy()
    tensor.free()
    del tensor
    gc.collect()
    assert allocator.stats().in_use_bytes == MiB  # the view still holds the region
    assert float(view.sum()) == 7.0 * (MiB // 4)
    del view
    gc.collect()
    assert allocator.stats().in_use_bytes == 0


def test_with_block_frees_the_tensor(allocator):
    with allocator.tensor(MiB, session_id="audio-pipeline") as tensor:
        assert allocator.session_usage("audio-pipeline") == MiB
        tensor.to_numpy()[:] = 1
    assert tensor.freed
    assert allocator.session_usage("audio-pipeline") == 0
    with pytest.raises(TensorError, match="freed"):
        tensor.to_numpy()


def test_allocated_chunk_adopts_the_arrays_shape_and_dtype(allocator):
    segment = np.arange(16000, dtype=np.int16).reshape(4, 4000)
    chunk = allocator.allocate_tensor(size=segment.nbytes, session_id="audio-pipeline")
    assert (chunk.shape, chunk.dtype) == ((segment.nbytes,), DataType.U8)
    chunk.from_numpy(segment)
    assert (chunk.shape, chunk.dtype, chunk.is_shared) == ((4, 4000), DataType.I16, True)
    np.testing.assert_array_equal(chunk.to_numpy(), segment)
    assert address(chunk.to_numpy()) != address(segment)  # one copy in, into the region


def test_from_numpy_zero_copy_views_the_array_and_copy_does_not():
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    view = TensorBuffer.from_numpy(data, zero_copy=True)
    copy = TensorBuffer.from_numpy(data, zero_copy=False)
    assert address(view.to_numpy()) == address(data)
    assert address(copy.to_numpy()) != address(data)
    data[0, 0] = 100
    assert view.to_numpy()[0, 0] == 100
    assert copy.to_numpy()[0, 0] == 0
    assert (view.shape, view.dtype, view.nbytes, view.is_shared) == ((3, 4), DataType.F32, 48, False)


def test_torch_from_dlpack_shares_the_tensors_memory(allocator):
    tensor = allocator.allocate_tensor(4096)
    tensor.from_numpy(np.arange(1024, dtype=np.float32))
    as_torch = torch.from_dlpack(tensor)
    assert as_torch.dtype == torch.float32 and tuple(as_torch.shape) == (1024,)
    assert as_torch.data_ptr() == address(tensor.to_numpy())
    as_torch[3] = -1.0
    assert tensor.to_numpy()[3] == -1.0


def test_numpy_from_dlpack_shares_the_tensors_memory(allocator):
    tensor = allocator.allocate_tensor(64)
    as_numpy = np.from_dlpack(tensor)
    assert address(as_numpy) == address(tensor.to_numpy())


def test_from_dlpack_views_a_torch_tensor_without_copying():
    source = torch.arange(24, dtype=torch.int64).reshape(2, 3, 4)
    tensor = TensorBuffer.from_dlpack(source)
    assert (tensor.shape, tensor.dtype) == ((2, 3, 4), DataType.I64)
    assert address(tensor.to_numpy()) == source.data_ptr()
    source[1, 2, 3] = 1000
    assert tensor.to_numpy()[1, 2, 3] == 1000
    del source
    gc.collect()
    assert tensor.to_numpy()[1, 2, 3] == 1000  # the view keeps torch's storage alive


def test_bfloat16_travels_from_torch_and_back():
    source = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    tensor = TensorBuffer.from_dlpack(source)
    assert tensor.dtype == DataType.BF16
    region_id = tensor.to_shared_memory()
    back = torch.from_dlpack(TensorBuffer.from_shared_memory(region_id, 0, 6, [3], DataType.BF16))
    assert torch.equal(back, source)


@pytest.mark.parametrize(
    "np_dtype, dtype",
    [
        (np.float32, DataType.F32),
        (np.float16, DataType.F16),
        (np.int8, DataType.I8),
        (np.int16, DataType.I16),
        (np.int32, DataType.I32),
        (np.int64, DataType.I64),
        (np.uint8, DataType.U8),
        (np.bool_, DataType.BOOL),
    ],
)
def test_every_numpy_dtype_round_trips_through_shared_memory(np_dtype, dtype):
    data = (np.arange(60) % 2 if np_dtype is np.bool_ else np.arange(60)).astype(np_dtype)
    data = data.reshape(3, 4, 5)
    tensor = TensorBuffer.from_numpy(data, zero_copy=False)
    assert tensor.dtype == dtype
    region_id = tensor.to_shared_memory()
    shared = TensorBuffer.from_shared_memory(region_id, 0, data.nbytes, [3, 4, 5], dtype)
    result = shared.to_numpy()
    assert result.dtype == data.dtype
    np.testing.assert_array_equal(result, data)


def test_dlpack_accepts_numpy_and_torch_keywords_and_copies_when_asked(allocator):
    tensor = allocator.allocate_tensor(64)
    assert tensor.__dlpack_device__() == (1, 0)
    shared = np.from_dlpack(tensor)
    copied = np.from_dlpack(tensor, copy=True)
    assert address(shared) == address(tensor.to_numpy())
    assert address(copied) != address(shared)
    tensor.__dlpack__(stream=None, max_version=(1, 0), dl_device=(1, 0), copy=False)
    with pytest.raises(BufferError, match="device 2:0"):
        tensor.__dlpack__(dl_device=(2, 0))
    with pytest.raises(BufferError, match="stream"):
        tensor.__dlpack__(stream=1)


def test_strided_array_is_viewed_only_when_contiguous():
    data = np.arange(100, dtype=np.float32).reshape(10, 10)[:, ::2]
    with pytest.raises(TensorError, match="not C-contiguous"):
        TensorBuffer.from_numpy(data, zero_copy=True)
    copy = TensorBuffer.from_numpy(data, zero_copy=False)
    np.testing.assert_array_equal(copy.to_numpy(), data)


def test_read_only_array_is_refused_for_zero_copy_and_copied_otherwise():
    data = np.arange(4, dtype=np.int32)
    data.flags.writeable = False
    with pytest.raises(TensorError, match="read-only"):
        TensorBuffer.from_numpy(data, zero_copy=True)
    np.testing.assert_array_equal(TensorBuffer.from_numpy(data, zero_copy=False).to_numpy(), data)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(np.float64, DataType.F64), (np.uint16, DataType.U16), (np.uint32, DataType.U32), (np.uint64, DataType.U64)],
)
def test_every_triton_numeric_dtype_round_trips_through_numpy(dtype, expected):
    data = np.arange(6, dtype=dtype).reshape(2, 3)
    tensor = TensorBuffer.from_numpy(data)
    assert tensor.dtype == expected
    np.testing.assert_array_equal(tensor.to_numpy(), data)
    assert tensor.to_numpy().dtype == data.dtype


def test_unsupported_dtype_is_a_tensor_error():
    with pytest.raises(TensorError, match="unsupported dtype") as raised:
        TensorBuffer.from_numpy(np.zeros(4, dtype=np.complex128))
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, RemoteMediaError)
    with pytest.raises(TensorError, match="unsupported dtype"):
        TensorBuffer.from_dlpack(torch.zeros(2, dtype=torch.complex64))


def test_object_without_dlpack_is_a_tensor_error():
    with pytest.raises(TensorError, match="does not implement __dlpack__"):
        TensorBuffer.from_dlpack([1, 2, 3])


def test_size_shape_and_offset_that_do_not_fit_the_region_are_tensor_errors():
    region_id = TensorBuffer.from_numpy(np.zeros(1024, dtype=np.float32)).to_shared_memory()
    with pytest.raises(TensorError, match=r"shape \[2, 3\] of f32 needs 24 bytes, but the size is 4096"):
        TensorBuffer.from_shared_memory(region_id, 0, 4096, [2, 3], DataType.F32)
    with pytest.raises(TensorError, match="beyond the end"):
        TensorBuffer.from_shared_memory(region_id, 4096, 4096, [1024], DataType.F32)
    with pytest.raises(TensorError, match="needs 8192 bytes"):
        TensorBuffer.from_shared_memory(region_id, 0, 4096, [1024], DataType.I64)


def test_unknown_region_is_region_not_found():
    with pytest.raises(RegionNotFoundError, match="no such region") as raised:
        TensorBuffer.from_shared_memory("remotemedia-1-0123456789abcdef", 0, 4, [1], DataType.F32)
    assert isinstance(raised.value, KeyError) and isinstance(raised.value, ValueError)
    assert str(raised.value).startswith("failed to open region")  # not KeyError's quoted form
    with pytest.raises(RegionNotFoundError):
        TensorBuffer.from_shared_memory("../etc/passwd", 0, 4, [1], DataType.F32)


def test_array_larger_or_smaller_than_the_chunk_is_refused(allocator):
    chunk = allocator.allocate_tensor(4000)
    with pytest.raises(TensorError, match="8000 bytes, more than the tensor's 4000"):
        chunk.from_numpy(np.zeros(2000, dtype=np.float32))
    with pytest.raises(TensorError, match="fewer than the tensor's 4000"):
        chunk.from_numpy(np.zeros(10, dtype=np.float32))
    assert (chunk.shape, chunk.dtype) == ((4000,), DataType.U8)


def test_quota_and_limit_are_allocation_errors(allocator):
    held = allocator.allocate_tensor(6 * MiB, session_id="s")
    with pytest.raises(AllocationError, match="quota") as raised:
        allocator.allocate_tensor(4 * MiB, session_id="s")
    assert isinstance(raised.value, MemoryError)
    with pytest.raises(AllocationError, match="limit"):
        allocator.allocate_tensor(128 * MiB)
    with pytest.raises(TensorError, match="at least one byte"):
        allocator.allocate_tensor(0)
    held.free()
    allocator.allocate_tensor(4 * MiB, session_id="s")


def test_allocator_reuses_a_freed_region(allocator):
    allocator.allocate_tensor(MiB).free()
    allocator.allocate_tensor(MiB)
    stats = allocator.stats()
    assert (stats.regions_created, stats.pool_hits) == (1, 1)


def test_unversioned_capsule_is_exported_to_consumers_that_do_not_ask_for_dlpack_1(allocator):
    tensor = allocator.allocate_tensor(64)
    capsule = tensor.__dlpack__()  # no max_version: a pre-1.0 consumer
    as_torch = torch.from_dlpack(capsule)
    assert as_torch.data_ptr() == address(tensor.to_numpy())


class OldProducer:
    """A DLPack producer from before DLPack 1.0: `__dlpack__` takes no `max_version`."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, stream=None):
        return torch.utils.dlpack.to_dlpack(self.tensor)

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


def test_from_dlpack_falls_back_to_producers_without_max_version():
    source = torch.arange(6, dtype=torch.int32)
    tensor = TensorBuffer.from_dlpack(OldProducer(source))
    assert address(tensor.to_numpy()) == source.data_ptr()
    np.testing.assert_array_equal(tensor.to_numpy(), np.arange(6, dtype=np.int32))
