"""Two Python processes sharing a tensor by region id, with zero-copy evidence read from
/proc/<pid>/status of the other process."""

import os
import subprocess
import sys

import numpy as np
import pytest

from remotemedia.core import AllocatorConfig, SharedMemoryAllocator, TensorBuffer

MiB = 1024**2
SIZE = 256 * MiB
PAGE_FLOATS = 4096 // 4
PEER = os.path.join(os.path.dirname(__file__), "sdk_peer.py")


class Peer:
    """sdk_peer.py as a child process, driven line by line."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, PEER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout.readline().strip() == "ready"

    def ask(self, command):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        assert answer, f"peer exited on {command!r} (status {self.process.poll()})"
        return answer

    def status_kib(self, field):
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"{field} missing from /proc/{self.process.pid}/status")

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture
def peer():
    peer = Peer()
    yield peer
    peer.close()


def test_two_processes_share_a_tensor_by_region_id(peer):
    data = np.arange(4 * PAGE_FLOATS, dtype=np.float32)
    tensor = TensorBuffer.from_numpy(data, zero_copy=True)
    region_id = tensor.to_shared_memory()
    assert peer.ask(f"map {region_id} {data.nbytes}") == "mapped"
    assert float(peer.ask(f"get {PAGE_FLOATS + 5}")) == PAGE_FLOATS + 5

    # A write in the other process is seen here, and one here is seen there.
    assert peer.ask("set 3 -7.5") == "ok"
    assert tensor.to_numpy()[3] == -7.5
    tensor.to_numpy()[9] = 123.0
    assert float(peer.ask("get 9")) == 123.0


def test_viewing_a_256_mib_shared_tensor_in_another_process_copies_nothing(peer):
    allocator = SharedMemoryAllocator(AllocatorConfig(max_memory_bytes=512 * MiB))
    tensor = allocator.allocate_tensor(SIZE)
    view = tensor.to_numpy().view(np.float32)
    pages = SIZE // 4096
    view[::PAGE_FLOATS] = np.arange(pages, dtype=np.float32)  # one value on each page
    expected = float(pages * (pages - 1) // 2)

    anon_before = peer.status_kib("RssAnon")
    shmem_before = peer.status_kib("RssShmem")
    assert peer.ask(f"map {tensor.region_id} {SIZE}") == "mapped"
    assert float(peer.ask("sum")) == expected  # every page read through the peer's view
    anon_growth = (peer.status_kib("RssAnon") - anon_before) * 1024
    shmem_growth = (peer.status_kib("RssShmem") - shmem_before) * 1024

    assert shmem_growth >= SIZE * 0.99, "the peer did not map and touch the shared pages"
    assert anon_growth < 8 * MiB, f"the peer's private memory grew by {anon_growth} bytes"

    # The peer writes through its view; this process reads it through its own, in place.
    assert peer.ask(f"set {SIZE // 4 - 1} 42") == "ok"
    assert view[-1] == 42.0
