"""System shared memory with a TorchScript model, through the unmodified tritonclient: the test
model `inplace` of scripts/make_models.py, which writes into its input (`x.mul_(2)`), must leave
the client's region as it was."""

import pathlib
import sys

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from conftest import Worker
from test_shared_memory import Region, shm_input, shm_output

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
from make_models import InPlace, build  # noqa: E402


@pytest.fixture(scope="module")
def inplace(tmp_path_factory):
    out = pathlib.Path(tmp_path_factory.mktemp("models"))
    build(out, "inplace", InPlace(), ["input"], ["output"], [(torch.randn(2, 16),)], max_batch_size=8)
    worker = Worker(str(out / "inplace" / "model.pt"))
    yield worker
    worker.stop()


def test_an_in_place_model_leaves_the_clients_region_unchanged(inplace):
    client = grpcclient.InferenceServerClient(inplace.url)
    size = 4 * 16 * 4
    inputs, outputs = Region(size), Region(size)
    try:
        client.register_system_shared_memory("in", inputs.key, size)
        client.register_system_shared_memory("out", outputs.key, size)
        rng = np.random.default_rng(5)
        # Twice with new data in the same region: the worker's cached mapping must see the
        # client's new bytes, not a page the model wrote into the first time.
        for _ in range(2):
            array = rng.standard_normal((4, 16), dtype=np.float32)
            inputs.write(array)
            result = client.infer(
                "inplace",
                [shm_input("input", array, "FP32", "in")],
                outputs=[shm_output("output", "out", array.nbytes)],
            )
            assert list(result.get_output("output").shape) == [4, 16]
            np.testing.assert_array_equal(outputs.read(np.float32, array.shape), array * 2)
            np.testing.assert_array_equal(inputs.read(np.float32, array.shape), array)
    finally:
        client.unregister_system_shared_memory()
        inputs.destroy()
        outputs.destroy()
