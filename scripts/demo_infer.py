"""One inference against a running worker with the stock Triton gRPC client (`make demo`)."""

import sys

import numpy as np
import tritonclient.grpc as grpcclient

url = sys.argv[1] if len(sys.argv) > 1 else "localhost:50051"
model = sys.argv[2] if len(sys.argv) > 2 else "identity"
client = grpcclient.InferenceServerClient(url)
metadata = client.get_model_metadata(model, as_json=True)
print(f"model {metadata['name']} (platform {metadata['platform']}) ready: {client.is_model_ready(model)}")

array = np.array([[0.5, 1.5, 2.5, 3.5]], dtype=np.float32)
tensor = grpcclient.InferInput("INPUT0", list(array.shape), "FP32")
tensor.set_data_from_numpy(array)
result = client.infer(model, [tensor])
output = result.as_numpy("OUTPUT0")
print(f"sent     INPUT0  FP32 {list(array.shape)}: {array.tolist()}")
print(f"received OUTPUT0 {output.dtype} {list(output.shape)}: {output.tolist()}")
if not np.array_equal(output, array):
    sys.exit("the identity model returned something else")
