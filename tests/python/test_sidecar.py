"""The stock tritonclient through the node sidecar's router (TCP port), to a worker it discovers
from a static file: inline tensors, and Triton's system shared memory when the sidecar allows it
(the sidecar reads the client's region and forwards the bytes inline)."""

import os
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm

from conftest import ServerProcess, Worker


class Sidecar(ServerProcess):
    def __init__(self, workers, *extra):
        super().__init__("sidecar", "REMOTEMEDIA_SIDECAR_BIN")
        discovery = os.path.join(self.dir.name, "workers.yaml")
        with open(discovery, "w") as file:
            for model, port, node in workers:
                file.write(f"- {{model: {model}, address: '127.0.0.1:{port}', node: {node}}}\n")
        self.url = f"127.0.0.1:{self.port}"
        self._start(
            [
                "--socket-dir", self.dir.name,
                "--admin-address", "127.0.0.1",
                "--port", str(self.port),
                "--discovery", "static",
                "--workers", discovery,
                "--node-name", "node-a",
                *extra,
            ]
        )


@pytest.fixture(scope="module")
def sidecar(identity):
    # The worker is on another node: every tensor reaches it inline.
    sidecar = Sidecar([("team/identity", identity.port, "node-b")], "--allow-named-shm")
    yield sidecar
    sidecar.stop()


@pytest.fixture
def client(sidecar):
    client = grpcclient.InferenceServerClient(sidecar.url)
    yield client
    client.unregister_system_shared_memory()


def test_an_inline_tensor_comes_back_through_the_sidecar_under_either_model_name(client):
    assert client.is_server_live()
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    for name in ["identity", "team/identity"]:
        tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        result = client.infer(name, [tensor])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    assert client.is_model_ready("identity")
    assert client.get_model_metadata("identity", as_json=True)["name"] == "identity"
    # The brokered extension is listed on the Unix socket only.
    extensions = client.get_server_metadata(as_json=True)["extensions"]
    assert "system_shared_memory" in extensions
    assert "remotemedia_brokered_shared_memory" not in extensions


def test_system_shared_memory_through_the_sidecar_reads_and_writes_the_clients_region(client):
    data = np.random.default_rng(7).random((256, 1024), dtype=np.float32)
    keys = [f"/rm-c1-test-{uuid.uuid4().hex}" for _ in range(2)]
    regions = [shm.create_shared_memory_region(key, key, data.nbytes, create_only=True) for key in keys]
    try:
        shm.set_shared_memory_region(regions[0], [data])
        client.register_system_shared_memory("in", keys[0], data.nbytes)
        client.register_system_shared_memory("out", keys[1], data.nbytes)
        status = client.get_system_shared_memory_status(as_json=True)
        assert sorted(region["name"] for region in status["regions"].values()) == ["in", "out"]
        tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_shared_memory("in", data.nbytes)
        output = grpcclient.InferRequestedOutput("OUTPUT0")
        output.set_shared_memory("out", data.nbytes)
        result = client.infer("identity", [tensor], outputs=[output])
        assert result.get_output("OUTPUT0") is not None
        written = shm.get_contents_as_numpy(regions[1], np.float32, list(data.shape))
        np.testing.assert_array_equal(written, data)
    finally:
        client.unregister_system_shared_memory()
        for region in regions:
            shm.destroy_shared_memory_region(region)
