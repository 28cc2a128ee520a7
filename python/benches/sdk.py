"""Benchmarks of the Python SDK: what a zero-copy view and a cached model lookup cost, each next
to a baseline measured in the same run. `--quick` makes one pass per row.

    python python/benches/sdk.py [--quick]
"""

import argparse
import statistics
import time

import numpy as np
import torch

from remotemedia.core import DataType, ModelRegistry, SharedMemoryAllocator, AllocatorConfig, TensorBuffer

MiB = 1024**2


def timed(function, repeats):
    """Median seconds per call of `function` over `repeats` calls."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one pass per row")
    args = parser.parse_args()
    repeats = 1 if args.quick else 20

    size = 64 * MiB
    allocator = SharedMemoryAllocator(AllocatorConfig(max_memory_bytes=4 * size))
    tensor = allocator.allocate_tensor(size)
    tensor.to_numpy()[:] = 1
    region_id = tensor.region_id
    source = np.ones(size // 4, dtype=np.float32)

    registry = ModelRegistry()
    registry.get_or_load("model", object)
    cache = {"model": object()}

    rows = [
        # (what, baseline name, baseline, measured)
        (
            "64 MiB to_numpy() view",
            "np.copy 64 MiB",
            lambda: np.copy(source),
            lambda: tensor.to_numpy(),
        ),
        (
            "64 MiB torch.from_dlpack view",
            "torch.tensor copy 64 MiB",
            lambda: torch.tensor(source),
            lambda: torch.from_dlpack(tensor),
        ),
        (
            "64 MiB open by id + to_numpy",
            "np.copy 64 MiB",
            lambda: np.copy(source),
            lambda: TensorBuffer.from_shared_memory(
                region_id, 0, size, [size // 4], DataType.F32
            ).to_numpy(),
        ),
        (
            "cached get_or_load",
            "dict lookup",
            lambda: cache["model"],
            lambda: registry.get_or_load("model", object),
        ),
    ]
    print(f"{'row':<32} {'baseline':<26} {'baseline':>12} {'measured':>12} {'ratio':>8}")
    for name, baseline_name, baseline, measured in rows:
        base = timed(baseline, repeats)
        ours = timed(measured, repeats)
        print(
            f"{name:<32} {baseline_name:<26} {base * 1e6:>10.1f}us {ours * 1e6:>10.1f}us"
            f" {ours / base:>8.3g}"
        )


if __name__ == "__main__":
    main()
