"""The worker served to the unmodified Triton gRPC client."""

import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def infer_input(name, array, datatype):
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_health_and_metadata_rpcs_answer(identity):
    client = grpcclient.InferenceServerClient(identity.url)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("identity")
    assert not client.is_model_ready("missing")

    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "remotemedia-model-worker"
    assert server["extensions"] == ["model_configuration", "statistics", "system_shared_memory"]

    model = client.get_model_metadata("identity", as_json=True)
    assert model["name"] == "identity"
    assert model["versions"] == ["1"]
    assert [tensor["name"] for tensor in model["inputs"]] == ["INPUT0"]
    assert [tensor["name"] for tensor in model["outputs"]] == ["OUTPUT0"]

    config = client.get_model_config("identity", as_json=True)["config"]
    assert config["name"] == "identity"
    assert config["platform"] == "builtin"


@pytest.mark.parametrize(
    "dtype, datatype",
    [(np.float32, "FP32"), (np.int64, "INT64"), (np.uint8, "UINT8"), (np.float16, "FP16"), (np.bool_, "BOOL")],
)
def test_identity_returns_its_input(identity, dtype, datatype):
    client = grpcclient.InferenceServerClient(identity.url)
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    result = client.infer("identity", [infer_input("INPUT0", array, datatype)], request_id="r-1")
    assert result.get_response().id == "r-1"
    output = result.as_numpy("OUTPUT0")
    assert output.dtype == array.dtype
    np.testing.assert_array_equal(output, array)


def test_checksum_sums_every_byte(checksum):
    client = grpcclient.InferenceServerClient(checksum.url)
    array = np.random.default_rng(7).integers(0, 256, size=(512, 1024), dtype=np.uint8)
    result = client.infer("checksum", [infer_input("INPUT0", array, "UINT8")])
    assert result.as_numpy("CHECKSUM").tolist() == [int(array.sum(dtype=np.uint64))]


def test_statistics_count_requests(checksum):
    client = grpcclient.InferenceServerClient(checksum.url)
    before = client.get_inference_statistics("checksum", as_json=True)["model_stats"][0]
    array = np.ones((4,), dtype=np.float32)
    client.infer("checksum", [infer_input("INPUT0", array, "FP32")])
    after = client.get_inference_statistics("checksum", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 1
    assert int(after["inference_stats"]["success"]["count"]) >= 1


def test_stream_reports_a_bad_request_and_stays_open(identity):
    client = grpcclient.InferenceServerClient(identity.url)
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        good = np.arange(4, dtype=np.int32)
        client.async_stream_infer("identity", [infer_input("INPUT0", good, "INT32")], request_id="a")
        client.async_stream_infer("missing", [infer_input("INPUT0", good, "INT32")], request_id="b")
        client.async_stream_infer("identity", [infer_input("INPUT0", good * 2, "INT32")], request_id="c")
        answers = [results.get(timeout=10) for _ in range(3)]
    finally:
        client.stop_stream()
    errors = [error for _, error in answers if error is not None]
    outputs = {
        result.get_response().id: result.as_numpy("OUTPUT0").tolist()
        for result, error in answers
        if error is None
    }
    assert len(errors) == 1 and "unknown model 'missing'" in errors[0].message()
    assert outputs == {"a": [0, 1, 2, 3], "c": [0, 2, 4, 6]}


@pytest.mark.parametrize(
    "model, array, datatype, status",
    [
        ("typed", np.zeros((2, 4), dtype=np.int32), "INT32", "StatusCode.INVALID_ARGUMENT"),
        ("typed", np.zeros((2, 5), dtype=np.float32), "FP32", "StatusCode.INVALID_ARGUMENT"),
        ("nope", np.zeros((2, 4), dtype=np.float32), "FP32", "StatusCode.NOT_FOUND"),
    ],
    ids=["wrong datatype", "wrong shape", "unknown model"],
)
def test_bad_requests_get_their_code_and_the_worker_keeps_serving(typed_identity, model, array, datatype, status):
    client = grpcclient.InferenceServerClient(typed_identity.url)
    with pytest.raises(InferenceServerException) as refused:
        client.infer(model, [infer_input("INPUT0", array, datatype)])
    assert refused.value.status() == status
    good = np.ones((3, 4), dtype=np.float32)
    result = client.infer("typed", [infer_input("INPUT0", good, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), good)


def test_rpcs_outside_our_subset_are_unimplemented(identity):
    client = grpcclient.InferenceServerClient(identity.url)
    with pytest.raises(InferenceServerException) as refused:
        client.get_model_repository_index()
    assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
