"""Builds the TorchScript test models with the pinned torch, with fixed seeds.

For each model, writes into OUT/<name>/:
  model.pt       the TorchScript module (torch.jit.script or trace)
  config.pbtxt   its Triton model configuration (inputs and outputs are positional: the i-th
                 input of the config is the forward's i-th argument, the i-th output its i-th
                 returned tensor)
  cases/<k>/     fixed inputs and torch's own outputs for them: one raw little-endian file per
                 tensor (<name>.bin) and case.json naming each tensor's datatype and shape

The saved modules stay on the CPU (the worker loads them onto its --device); with --device cuda
the expected outputs come from torch on the GPU, for the GPU check.

Usage: python make_models.py OUT [--device cpu|cuda]
"""
import argparse
import json
import pathlib

import torch

# Triton datatype names (config `TYPE_*` and wire names) of the torch dtypes we serve.
DTYPES = {
    torch.float32: ("TYPE_FP32", "FP32"),
    torch.float16: ("TYPE_FP16", "FP16"),
    torch.bfloat16: ("TYPE_BF16", "BF16"),
    torch.int8: ("TYPE_INT8", "INT8"),
    torch.int16: ("TYPE_INT16", "INT16"),
    torch.int32: ("TYPE_INT32", "INT32"),
    torch.int64: ("TYPE_INT64", "INT64"),
    torch.uint8: ("TYPE_UINT8", "UINT8"),
    torch.bool: ("TYPE_BOOL", "BOOL"),
}


class Mlp(torch.nn.Module):
    """FP32[-1,16] -> FP32[-1,4]: the everyday small model."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
        )

    def forward(self, x):
        return self.net(x)


class TwoInTwoOut(torch.nn.Module):
    """Two inputs, two outputs: (a + b, a * b)."""

    def forward(self, a, b):
        return a + b, a * b


class TokenEmbedder(torch.nn.Module):
    """INT64 token ids [-1,-1] -> mean-pooled FP32 embedding [-1,8]."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(1000, 8)

    def forward(self, ids):
        return self.embedding(ids).mean(dim=1)


class Classifier(torch.nn.Module):
    """FP32 embedding [-1,8] -> FP32 class probabilities [-1,3]: the pipeline example's second
    stage, after `tokens`."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 3)

    def forward(self, embedding):
        return torch.softmax(self.linear(embedding), dim=1)


class InPlace(torch.nn.Module):
    """Doubles its input in place and returns it: must not corrupt a client's shared memory."""

    def forward(self, x):
        x.mul_(2.0)
        return x


class Heavy(torch.nn.Module):
    """FP32[-1,256] -> FP32[-1,256]: enough work that one forward pass of one row takes over a
    millisecond on one core (8.4M multiply-adds per row; 3.7 ms of CPU time on one thread when
    measured), for batching."""

    def __init__(self):
        super().__init__()
        layers = []
        for _ in range(8):
            layers += [torch.nn.Linear(256, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 256)]
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Dtypes(torch.nn.Module):
    """One input and one output per datatype; each output keeps its input's dtype."""

    def forward(self, f32, f16, bf16, i8, i16, i32, i64, u8, b):
        return (
            f32 * 2.0,
            f16 + 1.0,
            bf16 - 1.0,
            i8 + 1,
            i16 * 3,
            i32 - 7,
            i64 * 5,
            u8 // 2,
            torch.logical_not(b),
        )


def tensor_config(name, tensor, batched):
    dtype, _ = DTYPES[tensor.dtype]
    dims = list(tensor.shape[1:] if batched else tensor.shape)
    return name, dtype, dims


def render_config(name, max_batch_size, inputs, outputs, dynamic_batching):
    lines = [
        f'name: "{name}"',
        'platform: "pytorch_libtorch"',
        f"max_batch_size: {max_batch_size}",
    ]
    for kind, tensors in (("input", inputs), ("output", outputs)):
        for tensor_name, dtype, dims in tensors:
            lines.append(
                f'{kind} {{ name: "{tensor_name}" data_type: {dtype} dims: {dims} }}'
            )
    if dynamic_batching:
        lines.append("dynamic_batching { max_queue_delay_microseconds: 500 }")
    return "\n".join(lines) + "\n"


def write_case(directory, inputs, outputs):
    directory.mkdir(parents=True, exist_ok=True)
    case = {"inputs": {}, "outputs": {}}
    for kind, tensors in (("inputs", inputs), ("outputs", outputs)):
        for name, tensor in tensors.items():
            tensor = tensor.contiguous()
            raw = tensor.view(torch.uint8) if tensor.dtype != torch.bool else tensor.to(torch.uint8)
            (directory / f"{name}.bin").write_bytes(raw.numpy().tobytes())
            case[kind][name] = {"datatype": DTYPES[tensor.dtype][1], "shape": list(tensor.shape)}
    (directory / "case.json").write_text(json.dumps(case, indent=2) + "\n")


DEVICE = torch.device("cpu")


def run(scripted, batch):
    """Torch's outputs for `batch` on DEVICE, as a tuple of CPU tensors. Inputs are cloned: the
    in-place model must not change the inputs written to the case."""
    with torch.no_grad():
        result = scripted(*[t.clone().to(DEVICE) for t in batch])
    result = result if isinstance(result, tuple) else (result,)
    return tuple(t.cpu() for t in result)


def build(out, name, module, input_names, output_names, example_batches, max_batch_size,
          dynamic_batching=False, dims_override=None):
    """Scripts `module`, writes it, its config and one case per example batch."""
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(module.eval())
    scripted.save(str(directory / "model.pt"))
    scripted = scripted.to(DEVICE)
    batched = max_batch_size > 0
    first = example_batches[0]
    first_out = run(scripted, first)
    inputs = [tensor_config(n, t, batched) for n, t in zip(input_names, first)]
    outputs = [tensor_config(n, t, batched) for n, t in zip(output_names, first_out)]
    for override in dims_override or []:
        kind, index, dims = override
        target = inputs if kind == "input" else outputs
        target[index] = (target[index][0], target[index][1], dims)
    (directory / "config.pbtxt").write_text(
        render_config(name, max_batch_size, inputs, outputs, dynamic_batching)
    )
    for k, batch in enumerate(example_batches):
        result = run(scripted, batch)
        write_case(
            directory / "cases" / str(k),
            dict(zip(input_names, batch)),
            dict(zip(output_names, result)),
        )


def main():
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    out = args.out
    DEVICE = torch.device(args.device)
    torch.manual_seed(20261129)
    generator = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    build(out, "mlp", Mlp(), ["input"], ["output"],
          [(randn(1, 16),), (randn(5, 16),)], max_batch_size=8, dynamic_batching=True)
    build(out, "two_io", TwoInTwoOut(), ["a", "b"], ["sum", "product"],
          [(randn(3, 8), randn(3, 8))], max_batch_size=8)
    build(out, "tokens", TokenEmbedder(), ["ids"], ["embedding"],
          [(torch.randint(0, 1000, (2, 7), generator=generator),)], max_batch_size=8,
          dims_override=[("input", 0, [-1])])
    build(out, "inplace", InPlace(), ["input"], ["output"],
          [(randn(2, 16),)], max_batch_size=8)
    build(out, "heavy", Heavy(), ["input"], ["output"],
          [(randn(1, 256),), (randn(4, 256),)], max_batch_size=64, dynamic_batching=True)
    dtype_inputs = (
        randn(2, 3),
        randn(2, 3).to(torch.float16),
        randn(2, 3).to(torch.bfloat16),
        torch.randint(-100, 100, (2, 3), generator=generator, dtype=torch.int8),
        torch.randint(-1000, 1000, (2, 3), generator=generator, dtype=torch.int16),
        torch.randint(-10**6, 10**6, (2, 3), generator=generator, dtype=torch.int32),
        torch.randint(-10**9, 10**9, (2, 3), generator=generator, dtype=torch.int64),
        torch.randint(0, 255, (2, 3), generator=generator, dtype=torch.uint8),
        torch.randint(0, 2, (2, 3), generator=generator).to(torch.bool),
    )
    names = ["f32", "f16", "bf16", "i8", "i16", "i32", "i64", "u8", "b"]
    build(out, "dtypes", Dtypes(), [f"in_{n}" for n in names], [f"out_{n}" for n in names],
          [dtype_inputs], max_batch_size=0)
    # Last, so that the models above keep the weights and inputs the seeds gave them before.
    build(out, "classifier", Classifier(), ["embedding"], ["probabilities"],
          [(randn(3, 8),)], max_batch_size=8)


if __name__ == "__main__":
    main()
