"""The Python client against the Rust client, through one node sidecar to `builtin://checksum`
workers: at 4 KiB and 64 MiB, to a colocated worker with the tensor in a brokered region and to a
remote worker with the tensor inline. Each row's loop is run by the Rust `ModelWorkerClient`
(`core/examples/client_loop.rs`, a process of its own, the baseline), the Python
`ModelWorkerClient` (asyncio) and `BlockingModelWorkerClient`: same sidecar, same workers, same
bytes and placement, in rounds that take turns so that the load of a shared machine falls on all
three alike. The sidecar's own counters confirm each call took the path its row names.
`--quick` makes one pass per row.

    python python/benches/client.py [--quick] [--bin-dir DIR]

The binaries (`remotemedia-sidecar`, `remotemedia-model-worker`, `examples/client_loop`) come
from `--bin-dir`; `make bench` builds them and installs the SDK first.
"""

import argparse
import asyncio
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The test tier's process fixtures: the worker and sidecar started the same way as in the tests.
sys.path.insert(0, str(ROOT / "tests" / "python"))

KiB, MiB = 1 << 10, 1 << 20
SIZES = [("4 KiB", 4 * KiB), ("64 MiB", 64 * MiB)]
# (label, model, placement, the sidecar's path label for a call of at least 64 KiB, below it)
PATHS = [
    ("colocated, shared", "near", "shared", "shm_local", "inline_local"),
    ("remote, inline", "far", "inline", "inline_remote", "inline_remote"),
]
CLIENTS = ["Rust", "Python asyncio", "Python blocking"]
# (rounds, timed calls per round and client) by size and placement: about 100 calls of each
# client per row, but 30 of the slowest.
ROUNDS = {
    (4 * KiB, "shared"): (100, 5),
    (4 * KiB, "inline"): (100, 5),
    (64 * MiB, "shared"): (100, 1),
    (64 * MiB, "inline"): (30, 1),
}
# Room for a 64 MiB tensor inline, on the sidecar and on the workers.
MAX_MESSAGE = str(96 * MiB)
TARGET_OVERHEAD = 0.05


def pattern(size):
    """The input bytes: byte i is i % 251, as client_loop makes them."""
    return (np.arange(size, dtype=np.uint64) % 251).astype(np.uint8)


def checked(output, expected):
    (value,) = output.to_numpy().tolist()
    if value != expected:
        raise RuntimeError(f"failed to check the answer: checksum {value}, expected {expected}")


class PythonAsyncio:
    """`ModelWorkerClient` on one event loop, connected once; one untimed call, then one round
    of timed calls per `run(passes)`."""

    def __init__(self, model, tensor, expected):
        from remotemedia.core import ModelWorkerClient

        self.model, self.tensor, self.expected = model, tensor, expected
        self.runner = asyncio.Runner()
        self.client = ModelWorkerClient()
        # The client's calls need the running loop, hence a coroutine around each.
        self.runner.run(self.awaited(self.client.connect))
        self.runner.run(self.calls(1))

    @staticmethod
    async def awaited(call):
        return await call()

    async def calls(self, passes):
        times = []
        for _ in range(passes):
            start = time.perf_counter_ns()
            checked(await self.client.infer(self.tensor, model=self.model), self.expected)
            times.append(time.perf_counter_ns() - start)
        return times

    def run(self, passes):
        return self.runner.run(self.calls(passes))

    def close(self):
        self.runner.run(self.awaited(self.client.close))
        self.runner.close()


class PythonBlocking:
    """`BlockingModelWorkerClient`, connected once, used as `PythonAsyncio` is."""

    def __init__(self, model, tensor, expected):
        from remotemedia.core import BlockingModelWorkerClient

        self.model, self.tensor, self.expected = model, tensor, expected
        self.client = BlockingModelWorkerClient()
        self.client.connect()
        self.run(1)

    def run(self, passes):
        times = []
        for _ in range(passes):
            start = time.perf_counter_ns()
            checked(self.client.infer(self.tensor, model=self.model), self.expected)
            times.append(time.perf_counter_ns() - start)
        return times

    def close(self):
        self.client.close()


class RustLoop:
    """`client_loop` in a process of its own, used as `PythonAsyncio` is: it makes its tensor,
    connects and makes its untimed call at start, then times a round per line it reads."""

    def __init__(self, binary, model, placement, size):
        self.stderr = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [binary, model, placement, str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )

    def run(self, passes):
        self.process.stdin.write(f"{passes}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.close()
        times = [int(word) for word in line.split()]
        if len(times) != passes:
            raise RuntimeError(f"failed to read client_loop's times: {len(times)}, not {passes}")
        return times

    def close(self):
        self.process.stdin.close()
        code = self.process.wait(timeout=60)
        self.stderr.seek(0)
        error = self.stderr.read()
        self.stderr.close()
        if code != 0:
            raise RuntimeError(f"failed to run client_loop (exit {code}): {error}")


def requests_by_path(sidecar):
    """The sidecar's successful inference requests, by path (`shm_local`, `inline_remote`, ...)."""
    url = f"http://127.0.0.1:{sidecar.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    sample = re.compile(
        r'^remotemedia_sidecar_inference_requests_total\{path="(\w+)",outcome="ok"\} (\S+)$', re.M
    )
    return {path: float(count) for path, count in sample.findall(text)}


def start(bin_dir):
    """The sidecar (node-a), a colocated `near` worker redeeming its grants and a `far` worker
    on another node; REMOTEMEDIA_SIDECAR names the sidecar from then on."""
    os.environ["REMOTEMEDIA_WORKER_BIN"] = str(bin_dir / "remotemedia-model-worker")
    os.environ["REMOTEMEDIA_SIDECAR_BIN"] = str(bin_dir / "remotemedia-sidecar")
    from conftest import Worker
    from test_sidecar import Sidecar

    message = ("--max-message-bytes", MAX_MESSAGE)
    started = [Worker("builtin://checksum", "--model-id", "far", *message)]
    try:
        far = started[0]
        sidecar = Sidecar([("far", far.port, "node-b")], *message)
        started.append(sidecar)
        # The colocated worker joins the sidecar's broker, which exists only now.
        near = Worker(
            "builtin://checksum", "--model-id", "near", "--broker", sidecar.dir.name, *message
        )
        started.append(near)
        workers = pathlib.Path(sidecar.dir.name, "workers.yaml")
        fresh = workers.with_suffix(".new")
        fresh.write_text(
            f"- {{model: far, address: '127.0.0.1:{far.port}', node: node-b}}\n"
            f"- {{model: near, address: '127.0.0.1:{near.port}', node: node-a}}\n"
        )
        fresh.rename(workers)
        os.environ["REMOTEMEDIA_SIDECAR"] = f"unix://{sidecar.dir.name}"
        wait_until_routed("near")
    except BaseException:
        stop(reversed(started))
        raise
    return sidecar, [near, far]


def stop(processes):
    for process in processes:
        process.process.kill()
        process.process.wait()


def wait_until_routed(model):
    from remotemedia.core import BlockingModelWorkerClient, ServerError

    deadline = time.monotonic() + 30
    with BlockingModelWorkerClient() as client:
        while True:
            try:
                client.status(model)
                return
            except ServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def release_dir():
    """`release/` in the workspace's target directory, wherever CARGO_TARGET_DIR puts it."""
    metadata = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        text=True,
    )
    return pathlib.Path(json.loads(metadata.stdout)["target_directory"]) / "release"


def percentile(times, q):
    ordered = sorted(times)
    return ordered[round((len(ordered) - 1) * q)]


def show(nanos):
    micros = nanos / 1e3
    return f"{micros:.1f} µs" if micros < 1000 else f"{micros / 1000:.2f} ms"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one pass per row")
    parser.add_argument(
        "--bin-dir",
        type=pathlib.Path,
        help="where the sidecar, worker and examples/client_loop binaries are"
        " (default: the release folder of cargo's target directory)",
    )
    args = parser.parse_args()
    bin_dir = (args.bin_dir or release_dir()).resolve()
    loop_binary = bin_dir / "examples" / "client_loop"
    if not loop_binary.exists():
        sys.exit(
            f"failed to find {loop_binary}: build it with `cargo build --release"
            " -p remotemedia-runtime-core --example client_loop` (`make bench` does)"
        )

    sidecar, workers = start(bin_dir)
    from remotemedia.core import SharedMemoryAllocator

    try:
        allocator = SharedMemoryAllocator()
        # (size label, path label, client) -> nanoseconds of each timed call
        times = {}
        for size_label, size in SIZES:
            data = pattern(size)
            expected = int(data.sum(dtype=np.uint64))
            shared = allocator.allocate_tensor(size)
            shared.copy_from_numpy(data)
            if len(shared.region_id) != 32:
                raise RuntimeError("failed to allocate a brokered region")
            for path_label, model, placement, big_path, small_path in PATHS:
                rounds, passes = (1, 1) if args.quick else ROUNDS[size, placement]
                sidecar_path = big_path if size >= 64 * KiB else small_path
                tensor = shared if placement == "shared" else data
                before = requests_by_path(sidecar).get(sidecar_path, 0)
                clients = {
                    "Rust": RustLoop(loop_binary, model, placement, size),
                    "Python asyncio": PythonAsyncio(model, tensor, expected),
                    "Python blocking": PythonBlocking(model, tensor, expected),
                }
                # The clients take turns, round after round, so that the changing load of a
                # shared machine falls on all three alike.
                for _ in range(rounds):
                    for name, client in clients.items():
                        times.setdefault((size_label, path_label, name), []).extend(
                            client.run(passes)
                        )
                for client in clients.values():
                    client.close()
                # Each client made one untimed call first.
                counted = requests_by_path(sidecar).get(sidecar_path, 0) - before
                calls = len(clients) * (rounds * passes + 1)
                if counted != calls:
                    raise RuntimeError(
                        f"failed to confirm the path: the sidecar counted {counted:g} "
                        f"{sidecar_path} requests for {size_label} {path_label}, not {calls}"
                    )
            shared.free()
    finally:
        for worker in workers:
            worker.stop()
        sidecar.stop()

    print(
        "Python client vs Rust client through the sidecar: builtin://checksum, "
        f"{'one pass per row' if args.quick else 'the clients taking turns'} "
        "(calls timed; p50 / p99 per call; GB/s = size / p50; vs Rust = p50 / the Rust client's p50)\n"
    )
    print(
        f"{'size':<8} {'path':<19} {'client':<16} {'calls':>5} {'p50':>10} {'p99':>10} {'GB/s':>7}"
        f" {'vs Rust':>8}"
    )
    overheads = []
    for size_label, size in SIZES:
        for path_label, *_ in PATHS:
            baseline = percentile(times[(size_label, path_label, "Rust")], 0.5)
            for client in CLIENTS:
                samples = times[(size_label, path_label, client)]
                p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
                ratio = p50 / baseline
                print(
                    f"{size_label:<8} {path_label:<19} {client:<16} {len(samples):>5} {show(p50):>10}"
                    f" {show(p99):>10}"
                    f" {size / p50:>7.2f} {ratio:>7.3f}x"
                )
                if size == 64 * MiB and client != "Rust":
                    overheads.append((f"{path_label}, {client}", ratio - 1))
        print()
    if args.quick:
        print("targets: not judged from one pass per row (run without --quick)")
        return
    for what, overhead in overheads:
        verdict = "met" if overhead <= TARGET_OVERHEAD else "MISSED"
        print(
            f"target Python overhead at 64 MiB <= {TARGET_OVERHEAD:.0%} of Rust ({what}):"
            f" {overhead:+.1%} ({verdict})"
        )


if __name__ == "__main__":
    main()
