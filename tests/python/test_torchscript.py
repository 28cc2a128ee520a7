"""A TorchScript model and a Triton-style config.pbtxt written here, as a user would write them,
served by the worker and called through the stock Triton client. Outputs are compared with torch
run in this process on the same inputs (same libtorch, same CPU): within 1e-6 relative."""

import pathlib
import textwrap

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import Worker

CONFIG = textwrap.dedent(
    """\
    # Written in Triton's own style: lists without colons, fields this worker does not act on.
    name: "scorer"
    platform: "pytorch_libtorch"
    max_batch_size: 4
    input [
      {
        name: "features"
        data_type: TYPE_FP32
        dims: [ 6 ]
      },
      {
        name: "mask"
        data_type: TYPE_BOOL
        dims: [ 6 ]
      }
    ]
    output [
      {
        name: "score"
        data_type: TYPE_FP32
        dims: [ 2 ]
      },
      {
        name: "count"
        data_type: TYPE_INT64
        dims: [ 1 ]
      }
    ]
    instance_group [ { count: 1, kind: KIND_CPU } ]
    """
)


class Scorer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 2)

    def forward(self, features, mask):
        masked = features * mask.to(features.dtype)
        return torch.tanh(self.linear(masked)), mask.sum(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    torch.manual_seed(3)
    module = Scorer().eval()
    directory = pathlib.Path(tmp_path_factory.mktemp("scorer"))
    example = (torch.randn(2, 6), torch.ones(2, 6, dtype=torch.bool))
    torch.jit.trace(module, example).save(str(directory / "model.pt"))
    (directory / "config.pbtxt").write_text(CONFIG)
    worker = Worker(str(directory / "model.pt"))
    yield worker, torch.jit.load(str(directory / "model.pt"))
    worker.stop()


def test_users_model_and_config_serve_like_torch(scorer):
    worker, module = scorer
    client = grpcclient.InferenceServerClient(worker.url)
    assert client.is_model_ready("scorer")
    rng = np.random.default_rng(11)
    features = rng.standard_normal((3, 6), dtype=np.float32)
    mask = rng.integers(0, 2, size=(3, 6)).astype(np.bool_)
    inputs = [
        grpcclient.InferInput("features", list(features.shape), "FP32"),
        grpcclient.InferInput("mask", list(mask.shape), "BOOL"),
    ]
    inputs[0].set_data_from_numpy(features)
    inputs[1].set_data_from_numpy(mask)
    result = client.infer("scorer", inputs)

    with torch.no_grad():
        score, count = module(torch.from_numpy(features), torch.from_numpy(mask))
    np.testing.assert_allclose(result.as_numpy("score"), score.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(result.as_numpy("count"), count.numpy())


def test_metadata_and_config_come_from_config_pbtxt(scorer):
    worker, _ = scorer
    client = grpcclient.InferenceServerClient(worker.url)
    metadata = client.get_model_metadata("scorer", as_json=True)
    assert metadata["platform"] == "pytorch_libtorch"
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("features", "FP32", ["-1", "6"]),
        ("mask", "BOOL", ["-1", "6"]),
    ]
    config = client.get_model_config("scorer", as_json=True)["config"]
    assert config["max_batch_size"] == 4
    assert [o["name"] for o in config["output"]] == ["score", "count"]
    assert config["output"][1]["data_type"] == "TYPE_INT64"


def test_batch_over_max_batch_size_is_refused(scorer):
    worker, _ = scorer
    client = grpcclient.InferenceServerClient(worker.url)
    features = np.zeros((5, 6), dtype=np.float32)
    mask = np.ones((5, 6), dtype=np.bool_)
    inputs = [
        grpcclient.InferInput("features", [5, 6], "FP32"),
        grpcclient.InferInput("mask", [5, 6], "BOOL"),
    ]
    inputs[0].set_data_from_numpy(features)
    inputs[1].set_data_from_numpy(mask)
    with pytest.raises(InferenceServerException, match="max_batch_size 4"):
        client.infer("scorer", inputs)
