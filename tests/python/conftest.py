"""Fixtures for the tritonclient tests: a real `remotemedia-model-worker` process per module.

The binary comes from REMOTEMEDIA_WORKER_BIN, which scripts/test.sh sets after building it.
"""

import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

READY_TIMEOUT_S = 30


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


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
