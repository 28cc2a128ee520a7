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


class ServerProcess:
    """A server binary of ours run as a child: stderr kept in a temporary folder of its own,
    ready when its admin port answers /readyz, stopped with SIGTERM (a non-zero exit fails)."""

    def __init__(self, name, env_var):
        self.name = name
        self.binary = os.environ.get(env_var)
        if not self.binary:
            pytest.fail(f"{env_var} is not set; run the tests through `make test`")
        self.port, self.admin_port = _free_ports(2)
        self.dir = tempfile.TemporaryDirectory()
        self.stderr = open(os.path.join(self.dir.name, "stderr"), "w+")

    def _start(self, args):
        self.process = subprocess.Popen(
            [self.binary, "--admin-port", str(self.admin_port), *args],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.process.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        pytest.fail(f"{self.name} not ready: {self.log()}")

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
        assert code == 0, f"{self.name} exited with {code}"


class Worker(ServerProcess):
    def __init__(self, model_path, *extra):
        super().__init__("worker", "REMOTEMEDIA_WORKER_BIN")
        self.url = f"localhost:{self.port}"
        self._start(
            [
                "--model-path", model_path,
                "--port", str(self.port),
                "--termination-log", os.path.join(self.dir.name, "termination-log"),
                "--drain-delay", "0s",
                *extra,
            ]
        )


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
