"""Fixtures for the tritonclient tests: a real `remotemedia-model-worker` process per module.

The binary comes from REMOTEMEDIA_WORKER_BIN, which scripts/test.sh sets after building it.
"""

import itertools
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

READY_TIMEOUT_S = 30


# Ports below the kernel's ephemeral range, for the same reason as core/tests/support/ports.rs:
# a port asked of the kernel (bind to 0) and handed to a child races with the source ports of
# every outgoing connection. Each test process walks its own stretch, skipping ports in use.
_FIRST_PORT = 10_000
_next_port = itertools.count()


def _ephemeral_start():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            start = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        start = 32_768
    return max(start, _FIRST_PORT + 1_000)


def _free_ports(count):
    span = _ephemeral_start() - _FIRST_PORT
    start = (os.getpid() * 7919) % span
    ports = []
    for _ in range(span):
        port = _FIRST_PORT + (start + next(_next_port)) % span
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free TCP ports between {_FIRST_PORT} and the ephemeral range")


class Worker:
    def __init__(self, model_path, *extra):
        binary = os.environ.get("REMOTEMEDIA_WORKER_BIN")
        if not binary:
            pytest.fail("REMOTEMEDIA_WORKER_BIN is not set; run the tests through `make test`")
        self.port, self.admin_port = _free_ports(2)
        self.dir = tempfile.TemporaryDirectory()
        self.stderr = open(os.path.join(self.dir.name, "stderr"), "w+")
        self.process = subprocess.Popen(
            [
                binary,
                "--model-path", model_path,
                "--port", str(self.port),
                "--admin-port", str(self.admin_port),
                "--termination-log", os.path.join(self.dir.name, "termination-log"),
                "--drain-delay", "0s",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )
        self.url = f"localhost:{self.port}"
        self._wait_ready()

    def _wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"worker exited with {self.process.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        pytest.fail(f"worker not ready: {self.log()}")

    def log(self):
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self):
        self.process.terminate()
        try:
            code = self.process.wait(timeout=20)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.stderr.close()
            self.dir.cleanup()
        assert code == 0, f"worker exited with {code}"


@pytest.fixture(scope="module")
def identity():
    worker = Worker("builtin://identity")
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def typed_identity():
    """An identity model whose input must be FP32 of shape [-1, 4]."""
    worker = Worker("builtin://identity?datatype=FP32&shape=-1,4", "--model-id", "typed")
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def checksum():
    worker = Worker("builtin://checksum")
    yield worker
    worker.stop()
