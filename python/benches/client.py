"""Benchmark of the Python model-worker client against the Rust client (the baseline, measured
in the same run by core's `infer_loop` example), both through the node sidecar's Unix socket to a
colocated `builtin://checksum` worker: 4 KiB inline, and 64 MiB in a brokered shared-memory
region sent by reference. The ratio is Python's median call time over Rust's. `--quick` makes one
pass per row.

    python python/benches/client.py [--quick]    # needs REMOTEMEDIA_WORKER_BIN,
                                                 # REMOTEMEDIA_SIDECAR_BIN, REMOTEMEDIA_INFER_LOOP_BIN
"""

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np

KiB = 1024
MiB = 1024**2


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_ready(process, port, what):
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise SystemExit(f"failed to start the {what}: it exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise SystemExit(f"failed to start the {what}: not ready after 60 s")
            time.sleep(0.05)


def binary(variable):
    path = os.environ.get(variable)
    if not path:
        raise SystemExit(f"failed to find a binary: set {variable} (`make bench` does)")
    return path


async def python_median(size, repeats, shared):
    from remotemedia.core import ModelWorkerClient, SharedMemoryAllocator

    allocator = SharedMemoryAllocator()
    async with ModelWorkerClient() as client:
        if shared:
            tensor = allocator.allocate_tensor(size)
            tensor.to_numpy()[:] = 1
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            source = tensor if shared else np.ones(size, dtype=np.uint8)
            await client.infer(source, model="checksum")
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one pass per row")
    args = parser.parse_args()
    repeats = 1 if args.quick else 30

    with tempfile.TemporaryDirectory() as directory:
        worker_port, worker_admin, sidecar_admin = free_ports(3)
        with open(os.path.join(directory, "workers.yaml"), "w") as file:
            file.write(f"- {{model: checksum, address: '127.0.0.1:{worker_port}', node: bench}}\n")
        sidecar = subprocess.Popen(
            [binary("REMOTEMEDIA_SIDECAR_BIN"), "--socket-dir", directory,
             "--admin-address", "127.0.0.1", "--admin-port", str(sidecar_admin),
             "--discovery", "static", "--workers", os.path.join(directory, "workers.yaml"),
             "--node-name", "bench"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        worker = None
        try:
            wait_ready(sidecar, sidecar_admin, "sidecar")
            worker = subprocess.Popen(
                [binary("REMOTEMEDIA_WORKER_BIN"), "--model-path", "builtin://checksum",
                 "--port", str(worker_port), "--admin-port", str(worker_admin),
                 "--broker", directory, "--drain-delay", "0s",
                 "--termination-log", os.path.join(directory, "termination-log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            wait_ready(worker, worker_admin, "worker")
            os.environ["REMOTEMEDIA_SIDECAR"] = f"unix://{directory}"
            endpoint = f"unix://{directory}"
            print(f"{'row':<34} {'rust client':>12} {'python client':>14} {'ratio':>8}")
            for name, size, shared in [
                ("4 KiB inline", 4 * KiB, False),
                ("64 MiB brokered, by reference", 64 * MiB, True),
            ]:
                rust = subprocess.run(
                    [binary("REMOTEMEDIA_INFER_LOOP_BIN"), endpoint, "checksum", str(size),
                     str(repeats), "shared" if shared else "heap"],
                    capture_output=True, text=True, check=True,
                )
                rust_s = float(rust.stdout.split()[1]) / 1e6
                python_s = asyncio.run(python_median(size, repeats, shared))
                print(
                    f"{name:<34} {rust_s * 1e6:>10.1f}us {python_s * 1e6:>12.1f}us"
                    f" {python_s / rust_s:>8.3g}"
                )
        finally:
            for process in [worker, sidecar]:
                if process is not None:
                    process.terminate()
                    process.wait(timeout=20)


if __name__ == "__main__":
    main()
