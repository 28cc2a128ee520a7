"""remotemedia.core.ModelWorkerClient (asyncio) and BlockingModelWorkerClient against real
worker and sidecar processes: inline tensors, named shared memory straight to a worker, brokered
shared memory through the node sidecar, streams, server errors, a worker killed mid-request and
an endpoint where nothing listens."""

import asyncio
import os
import signal
import time
import urllib.request

import numpy as np
import pytest

from conftest import Worker, _free_ports
from remotemedia.core import (
    BlockingModelWorkerClient,
    ConnectionLostError,
    DeadlineExceededError,
    InvalidEndpointError,
    ModelWorkerClient,
    ModelWorkerError,
    ServerError,
    SharedMemoryAllocator,
    TensorBuffer,
    WorkerUnavailableError,
)
from test_sidecar import Sidecar


def run(coroutine):
    return asyncio.run(coroutine)


def wait_until_routed(sidecar, *models):
    """Waits until the sidecar has re-read its discovery file and routes to `models`."""
    deadline = time.monotonic() + 30
    with BlockingModelWorkerClient(f"grpc://{sidecar.url}") as client:
        for model in models:
            while True:
                try:
                    client.status(model)
                    break
                except ServerError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)


@pytest.fixture
def no_sidecar(monkeypatch):
    """Named regions, not the broker's: the tests below that allocate expect POSIX names."""
    monkeypatch.delenv("REMOTEMEDIA_SIDECAR", raising=False)


def test_the_issue_snippet_gets_an_inline_array_back_from_a_worker(identity):
    chunk = np.arange(12, dtype=np.float32).reshape(3, 4)

    async def main():
        client = ModelWorkerClient(f"grpc://localhost:{identity.port}")
        await client.connect()
        out = await client.infer(chunk)
        result = out.to_numpy().copy()
        assert await client.health_check() is True
        status = await client.status()
        await client.close()
        return result, status

    result, status = run(main())
    np.testing.assert_array_equal(result, chunk)
    assert result.dtype == np.float32
    assert status["name"] == "identity"
    assert [tensor["name"] for tensor in status["inputs"]] == ["INPUT0"]
    assert status["statistics"]["inference_count"] >= 1


def test_named_inputs_give_named_outputs_and_the_context_manager_connects(identity):
    data = np.arange(6, dtype=np.int64).reshape(2, 3)

    async def main():
        async with ModelWorkerClient(f"grpc://127.0.0.1:{identity.port}") as client:
            tensor = TensorBuffer.from_numpy(data.copy())
            return await client.infer({"INPUT0": tensor})

    outputs = run(main())
    assert list(outputs) == ["OUTPUT0"]
    np.testing.assert_array_equal(outputs["OUTPUT0"].to_numpy(), data)


def test_the_blocking_client_answers_the_same(identity):
    data = np.linspace(0, 1, 64, dtype=np.float64)
    with BlockingModelWorkerClient(f"grpc://localhost:{identity.port}") as client:
        assert client.health_check()
        np.testing.assert_array_equal(client.infer(data).to_numpy(), data)


def test_a_named_shared_memory_tensor_reaches_the_worker_by_reference(checksum, no_sidecar):
    data = np.random.default_rng(3).integers(0, 255, 4 << 20, dtype=np.uint8)
    allocator = SharedMemoryAllocator()
    with allocator.tensor(data.nbytes) as tensor:
        tensor.from_numpy(data)
        region = tensor.region_id
        assert region.startswith("remotemedia-")

        async def main():
            async with ModelWorkerClient(f"grpc://localhost:{checksum.port}") as client:
                answer = await client.infer(tensor)
                # The worker mapped our region (registered by the client), rather than
                # receiving its bytes.
                with open(f"/proc/{checksum.process.pid}/maps") as maps:
                    mapped = region in maps.read()
                return answer.to_numpy().copy(), mapped

        answer, mapped = run(main())
    assert answer.tolist() == [int(data.sum(dtype=np.uint64))]
    assert mapped, "the worker never mapped the client's region"


def test_server_errors_carry_the_status_code_and_message(typed_identity):
    async def main():
        async with ModelWorkerClient(f"grpc://localhost:{typed_identity.port}") as client:
            # The model takes FP32 of shape [-1, 4].
            await client.infer(np.zeros((2, 4), dtype=np.int32))

    with pytest.raises(ServerError) as raised:
        run(main())
    assert raised.value.code == "INVALID_ARGUMENT"
    assert raised.value.message and raised.value.message in str(raised.value)
    assert isinstance(raised.value, ModelWorkerError)


def test_a_stream_answers_every_request_with_its_id(identity):
    arrays = [np.full((3,), i, dtype=np.float32) for i in range(5)]

    async def main():
        async with ModelWorkerClient(f"grpc://localhost:{identity.port}") as client:
            stream = await client.infer_stream()
            ids = {}
            for array in arrays:
                ids[await stream.send(array)] = array
            await stream.close_send()
            answers = {}
            async for request_id, output in stream:
                answers[request_id] = output.to_numpy().copy()
            return ids, answers

    ids, answers = run(main())
    assert sorted(answers) == sorted(ids)
    for request_id, array in ids.items():
        np.testing.assert_array_equal(answers[request_id], array)


def test_a_blocking_stream_iterates_its_answers(identity):
    with BlockingModelWorkerClient(f"grpc://localhost:{identity.port}") as client:
        stream = client.infer_stream()
        sent = [stream.send(np.array([i], dtype=np.int32)) for i in range(3)]
        stream.close_send()
        answers = {request_id: int(output.to_numpy()[0]) for request_id, output in stream}
    assert answers == {request_id: i for i, request_id in enumerate(sent)}


def test_a_worker_killed_mid_request_raises_connection_lost():
    worker = Worker("builtin://identity?infer_delay_ms=10000")
    try:

        async def main():
            async with ModelWorkerClient(f"grpc://localhost:{worker.port}") as client:
                call = asyncio.ensure_future(client.infer(np.ones(4, dtype=np.float32)))
                await asyncio.sleep(0.5)
                assert not call.done()
                os.kill(worker.process.pid, signal.SIGKILL)
                started = time.monotonic()
                with pytest.raises(ConnectionLostError) as raised:
                    await call
                return raised.value, time.monotonic() - started

        error, waited = run(main())
        assert isinstance(error, ConnectionError)
        assert error.code == "UNAVAILABLE"
        assert waited < 5, f"the lost connection was noticed after {waited:.1f} s"
    finally:
        worker.process.kill()
        worker.process.wait()
        worker.stderr.close()
        worker.dir.cleanup()


def test_a_deadline_raises_timeout_and_a_cancelled_call_leaves_the_client_usable():
    worker = Worker("builtin://identity?infer_delay_ms=1000")
    try:

        async def main():
            async with ModelWorkerClient(f"grpc://localhost:{worker.port}") as client:
                with pytest.raises(DeadlineExceededError) as raised:
                    await client.infer(np.ones(2, dtype=np.float32), timeout=0.2)
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(client.infer(np.ones(2, dtype=np.float32)), 0.2)
                answer = await client.infer(np.arange(3, dtype=np.float32), timeout=10)
                return raised.value, answer.to_numpy().tolist()

        error, answer = run(main())
        assert isinstance(error, TimeoutError)
        assert error.code == "DEADLINE_EXCEEDED"
        assert answer == [0.0, 1.0, 2.0]
    finally:
        worker.stop()


def test_an_unreachable_endpoint_raises_worker_unavailable():
    (port,) = _free_ports(1)

    async def main():
        await ModelWorkerClient(f"grpc://127.0.0.1:{port}").connect()

    with pytest.raises(WorkerUnavailableError) as raised:
        run(main())
    assert isinstance(raised.value, ConnectionError)
    assert f"127.0.0.1:{port}" in str(raised.value)
    with pytest.raises(WorkerUnavailableError):
        BlockingModelWorkerClient(f"unix:///nonexistent/{port}/infer.sock").connect()


def test_bad_endpoints_and_calls_before_connect_are_refused(monkeypatch):
    monkeypatch.delenv("REMOTEMEDIA_SIDECAR", raising=False)
    for endpoint in ["localhost:50051", "grpc://", "grpc://host:99999", "unix://relative", None]:
        with pytest.raises(InvalidEndpointError) as raised:
            BlockingModelWorkerClient(endpoint).connect()
        assert isinstance(raised.value, ValueError)
    with pytest.raises(ModelWorkerError, match="not connected"):
        BlockingModelWorkerClient("grpc://localhost:1").infer(np.zeros(1))


def test_a_brokered_tensor_goes_through_the_sidecar_to_a_colocated_worker_in_place(monkeypatch):
    sidecar = Sidecar([("placeholder", 1, "node-b")], "--hold-timeout", "30s")
    worker = None
    try:
        worker = Worker("builtin://checksum", "--broker", sidecar.dir.name)
        # The sidecar re-reads its discovery file: now the worker is colocated (node-a).
        with open(os.path.join(sidecar.dir.name, "workers.yaml"), "w") as file:
            file.write(f"- {{model: checksum, address: '127.0.0.1:{worker.port}', node: node-a}}\n")
        wait_until_routed(sidecar, "checksum")
        monkeypatch.setenv("REMOTEMEDIA_SIDECAR", f"unix://{sidecar.dir.name}")
        data = np.random.default_rng(5).integers(0, 255, 8 << 20, dtype=np.uint8)
        allocator = SharedMemoryAllocator()
        with allocator.tensor(data.nbytes) as tensor:
            tensor.from_numpy(data)
            assert len(tensor.region_id) == 32, "not a brokered region"

            async def main():
                # No endpoint: the sidecar from REMOTEMEDIA_SIDECAR.
                async with ModelWorkerClient() as client:
                    return await client.infer(tensor, model="checksum", timeout=30)

            answer = run(main())
        assert answer.to_numpy().tolist() == [int(data.sum(dtype=np.uint64))]
        url = f"http://127.0.0.1:{sidecar.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            metrics = response.read().decode()
        line = 'remotemedia_sidecar_inference_requests_total{path="shm_local",outcome="ok"} 1'
        assert line in metrics, metrics
    finally:
        if worker is not None:
            worker.stop()
        sidecar.stop()
