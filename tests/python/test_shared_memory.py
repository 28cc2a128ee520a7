"""Triton's system shared memory, driven by the unmodified tritonclient and its shared-memory
utilities against the worker binary."""

import threading
import time
import urllib.request
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from conftest import Worker

MIB = 1 << 20


class Region:
    """A client-owned POSIX shared-memory object under a fresh key, destroyed (unlinked) at exit."""

    def __init__(self, byte_size):
        self.key = f"/rm-a3-test-{uuid.uuid4().hex}"
        self.handle = shm.create_shared_memory_region(self.key, self.key, byte_size, create_only=True)
        self.destroyed = False

    def write(self, array, offset=0):
        shm.set_shared_memory_region(self.handle, [array], offset=offset)

    def read(self, dtype, shape, offset=0):
        return shm.get_contents_as_numpy(self.handle, dtype, shape, offset=offset).copy()

    def destroy(self):
        if not self.destroyed:
            shm.destroy_shared_memory_region(self.handle)
            self.destroyed = True


@pytest.fixture
def regions():
    created = []

    def make(byte_size):
        region = Region(byte_size)
        created.append(region)
        return region

    yield make
    for region in created:
        region.destroy()


@pytest.fixture
def client(identity):
    client = grpcclient.InferenceServerClient(identity.url)
    yield client
    client.unregister_system_shared_memory()


def status_code(call):
    with pytest.raises(InferenceServerException) as refused:
        call()
    return refused.value.status()


def shm_input(name, array, datatype, region, offset=0):
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_shared_memory(region, array.nbytes, offset=offset)
    return tensor


def shm_output(name, region, byte_size, offset=0):
    output = grpcclient.InferRequestedOutput(name)
    output.set_shared_memory(region, byte_size, offset=offset)
    return output


def test_server_metadata_lists_system_shared_memory(client):
    extensions = client.get_server_metadata(as_json=True)["extensions"]
    assert "system_shared_memory" in extensions
    assert "cuda_shared_memory" not in extensions


@pytest.mark.parametrize(
    "dtype, datatype",
    [(np.float32, "FP32"), (np.int64, "INT64"), (np.uint8, "UINT8"), (np.float16, "FP16")],
)
def test_identity_reads_and_writes_registered_regions(client, regions, dtype, datatype):
    array = (np.arange(3 * 256).reshape(3, 256) % 251).astype(dtype)
    # The input sits 64 bytes into a range registered 4096 bytes into its object, so both
    # offsets are exercised; the output goes 128 bytes into its own region.
    inputs = regions(4096 + 64 + array.nbytes)
    outputs = regions(128 + array.nbytes)
    inputs.write(array, offset=4096 + 64)
    client.register_system_shared_memory("in", inputs.key, 64 + array.nbytes, offset=4096)
    client.register_system_shared_memory("out", outputs.key, 128 + array.nbytes)

    status = client.get_system_shared_memory_status(as_json=True)["regions"]
    assert status["in"]["key"] == inputs.key
    assert int(status["in"]["offset"]) == 4096
    assert int(status["out"]["byte_size"]) == 128 + array.nbytes

    result = client.infer(
        "identity",
        [shm_input("INPUT0", array, datatype, "in", offset=64)],
        outputs=[shm_output("OUTPUT0", "out", array.nbytes, offset=128)],
    )
    output = result.get_output("OUTPUT0")
    assert list(output.shape) == [3, 256]
    assert output.datatype == datatype
    np.testing.assert_array_equal(outputs.read(dtype, array.shape, offset=128), array)
    # The model read the client's pages and left them as they were.
    np.testing.assert_array_equal(inputs.read(dtype, array.shape, offset=4096 + 64), array)


def test_shared_memory_input_with_an_inline_output(client, regions):
    array = np.arange(1000, dtype=np.int32)
    region = regions(array.nbytes)
    region.write(array)
    client.register_system_shared_memory("in", region.key, array.nbytes)
    result = client.infer("identity", [shm_input("INPUT0", array, "INT32", "in")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)


def test_misaligned_input_is_copied_and_still_correct(identity, client, regions):
    array = np.linspace(0, 1, 64, dtype=np.float32)
    region = regions(4096)
    region.write(array, offset=3)
    client.register_system_shared_memory("in", region.key, 4096)
    before = fetch_metric(identity, "remotemedia_worker_shm_misaligned_copies_total")
    result = client.infer("identity", [shm_input("INPUT0", array, "FP32", "in", offset=3)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)
    assert fetch_metric(identity, "remotemedia_worker_shm_misaligned_copies_total") == before + 1


def test_bad_registrations_get_their_codes(client, regions):
    region = regions(4096)
    client.register_system_shared_memory("r", region.key, 4096)
    assert status_code(lambda: client.register_system_shared_memory("r", region.key, 16)) == "StatusCode.ALREADY_EXISTS"
    missing = f"/rm-a3-test-missing-{uuid.uuid4().hex}"
    assert status_code(lambda: client.register_system_shared_memory("m", missing, 16)) == "StatusCode.NOT_FOUND"
    past = lambda: client.register_system_shared_memory("p", region.key, 4000, offset=100)  # noqa: E731
    assert status_code(past) == "StatusCode.INVALID_ARGUMENT"
    assert status_code(lambda: client.get_system_shared_memory_status("p")) == "StatusCode.NOT_FOUND"
    assert list(client.get_system_shared_memory_status(as_json=True)["regions"]) == ["r"]


def test_bad_shared_memory_requests_get_their_codes_and_the_worker_keeps_serving(client, regions):
    array = np.arange(16, dtype=np.float32)
    region = regions(256)
    region.write(array)
    client.register_system_shared_memory("r", region.key, 256)

    def infer(inputs, outputs=None):
        return lambda: client.infer("identity", inputs, outputs=outputs)

    wrong_size = grpcclient.InferInput("INPUT0", [16], "FP32")
    wrong_size.set_shared_memory("r", 60)
    cases = {
        "unknown region": (infer([shm_input("INPUT0", array, "FP32", "nope")]), "StatusCode.NOT_FOUND"),
        "past the range": (infer([shm_input("INPUT0", array, "FP32", "r", offset=208)]), "StatusCode.INVALID_ARGUMENT"),
        "byte size": (infer([wrong_size]), "StatusCode.INVALID_ARGUMENT"),
        "output too small": (
            infer([shm_input("INPUT0", array, "FP32", "r")], [shm_output("OUTPUT0", "r", 32, offset=64)]),
            "StatusCode.INVALID_ARGUMENT",
        ),
        "output past the range": (
            infer([shm_input("INPUT0", array, "FP32", "r")], [shm_output("OUTPUT0", "r", 64, offset=224)]),
            "StatusCode.INVALID_ARGUMENT",
        ),
    }
    for name, (call, code) in cases.items():
        assert status_code(call) == code, name
        result = client.infer("identity", [shm_input("INPUT0", array, "FP32", "r")])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)


def mappings_of(worker, key):
    """Lines of the worker's /proc/<pid>/maps that map the object `key`."""
    with open(f"/proc/{worker.process.pid}/maps") as maps:
        return [line for line in maps if f"/dev/shm{key}" in line]


def test_a_region_is_mapped_once_however_many_requests_use_it_and_unmapped_on_unregister(identity, client, regions):
    array = np.arange(256, dtype=np.float32)
    region = regions(array.nbytes)
    region.write(array)
    client.register_system_shared_memory("r", region.key, array.nbytes)
    client.register_system_shared_memory("r2", region.key, 64)
    # One private mapping for inputs and one shared for outputs, for both registrations.
    assert len(mappings_of(identity, region.key)) == 2
    for _ in range(20):
        result = client.infer(
            "identity",
            [shm_input("INPUT0", array, "FP32", "r")],
            outputs=[shm_output("OUTPUT0", "r", array.nbytes)],
        )
        assert result.get_output("OUTPUT0") is not None
    assert len(mappings_of(identity, region.key)) == 2
    client.unregister_system_shared_memory("r")
    assert len(mappings_of(identity, region.key)) == 2, "r2 still uses the mappings"
    client.unregister_system_shared_memory("r2")
    assert mappings_of(identity, region.key) == []


def test_concurrent_requests_share_one_region_each_writing_its_own_slice(client, regions):
    rows = 32
    array = np.arange(rows * 64, dtype=np.float32).reshape(rows, 64)
    inputs = regions(array.nbytes)
    outputs = regions(array.nbytes)
    inputs.write(array)
    client.register_system_shared_memory("in", inputs.key, array.nbytes)
    client.register_system_shared_memory("out", outputs.key, array.nbytes)
    row_bytes = array[0].nbytes
    errors = []

    def infer(row):
        try:
            client.infer(
                "identity",
                [shm_input("INPUT0", array[row], "FP32", "in", offset=row * row_bytes)],
                outputs=[shm_output("OUTPUT0", "out", row_bytes, offset=row * row_bytes)],
            )
        except Exception as error:  # noqa: BLE001 - reported below with its row
            errors.append((row, error))

    threads = [threading.Thread(target=infer, args=(row,)) for row in range(rows)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    np.testing.assert_array_equal(outputs.read(np.float32, array.shape), array)


def test_stream_infers_through_shared_memory(client, regions):
    array = np.arange(8, dtype=np.int32)
    inputs = regions(array.nbytes)
    outputs = regions(2 * array.nbytes)
    inputs.write(array)
    client.register_system_shared_memory("in", inputs.key, array.nbytes)
    client.register_system_shared_memory("out", outputs.key, 2 * array.nbytes)
    answers = []
    done = threading.Semaphore(0)

    def callback(result, error):
        answers.append((result, error))
        done.release()

    client.start_stream(callback=callback)
    try:
        for k in range(2):
            client.async_stream_infer(
                "identity",
                [shm_input("INPUT0", array, "INT32", "in")],
                outputs=[shm_output("OUTPUT0", "out", array.nbytes, offset=k * array.nbytes)],
                request_id=str(k),
            )
        client.async_stream_infer("identity", [shm_input("INPUT0", array, "INT32", "nope")], request_id="bad")
        for _ in range(3):
            assert done.acquire(timeout=10)
    finally:
        client.stop_stream()
    errors = [error for _, error in answers if error is not None]
    assert len(errors) == 1 and "'nope' is not registered" in errors[0].message()
    np.testing.assert_array_equal(outputs.read(np.int32, (2, 8)), np.stack([array, array]))


def test_a_key_unlinked_after_registering_keeps_serving(client, regions):
    array = np.arange(512, dtype=np.int16)
    region = regions(array.nbytes)
    region.write(array)
    client.register_system_shared_memory("r", region.key, array.nbytes)
    region.destroy()  # unlinks the key; the worker's mappings keep the object
    for _ in range(2):
        result = client.infer("identity", [shm_input("INPUT0", array, "INT16", "r")])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)
    assert status_code(lambda: client.register_system_shared_memory("again", region.key, 16)) == "StatusCode.NOT_FOUND"


@pytest.fixture(scope="module")
def slow_checksum():
    worker = Worker("builtin://checksum?infer_delay_ms=1500")
    yield worker
    worker.stop()


def test_unregister_waits_for_the_request_using_the_region(slow_checksum, regions):
    client = grpcclient.InferenceServerClient(slow_checksum.url)
    array = np.full(1 << 16, 7, dtype=np.uint8)
    region = regions(array.nbytes)
    region.write(array)
    client.register_system_shared_memory("r", region.key, array.nbytes)
    answer = {}

    def infer():
        result = client.infer("checksum", [shm_input("INPUT0", array, "UINT8", "r")])
        answer["checksum"] = result.as_numpy("CHECKSUM").tolist()

    sent_at = time.monotonic()
    request = threading.Thread(target=infer)
    request.start()
    deadline = sent_at + 10
    while fetch_metric(slow_checksum, "remotemedia_worker_in_flight") < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    client.unregister_system_shared_memory("r")
    # The request holds the region for its whole 1.5 s pass, which began after `sent_at`.
    waited = time.monotonic() - sent_at
    request.join(timeout=30)
    assert answer["checksum"] == [7 << 16]
    assert waited >= 1.5, f"unregister returned {waited:.2f}s after the request, while it held the region"
    assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    assert status_code(
        lambda: client.infer("checksum", [shm_input("INPUT0", array, "UINT8", "r")])
    ) == "StatusCode.NOT_FOUND"


def test_shared_memory_is_refused_when_turned_off(regions):
    worker = Worker("builtin://identity", "--allow-named-shm", "false")
    try:
        client = grpcclient.InferenceServerClient(worker.url)
        assert "system_shared_memory" not in client.get_server_metadata(as_json=True)["extensions"]
        region = regions(64)
        assert status_code(lambda: client.register_system_shared_memory("r", region.key, 64)) == "StatusCode.UNIMPLEMENTED"
        array = np.zeros(16, dtype=np.uint8)
        infer = lambda: client.infer("identity", [shm_input("INPUT0", array, "UINT8", "r")])  # noqa: E731
        assert status_code(infer) == "StatusCode.INVALID_ARGUMENT"
    finally:
        worker.stop()


def fetch_metric(worker, sample):
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.admin_port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name == sample:
                return float(value)
    return 0.0


def rss_anon_bytes(pid):
    """Private (anonymous) resident memory of a process, from outside it."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon line")


def peak_rss_anon_growth(worker, infer):
    """Runs `infer` while sampling the worker's RssAnon; returns its result and the peak growth."""
    pid = worker.process.pid
    baseline = rss_anon_bytes(pid)
    peak = baseline
    done = threading.Event()
    answer = {}

    def run():
        try:
            answer["result"] = infer()
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    while not done.is_set():
        peak = max(peak, rss_anon_bytes(pid))
        time.sleep(0.005)
    thread.join()
    return answer["result"], peak - baseline


@pytest.fixture(scope="module")
def big_checksum():
    # Held 1 s per request, so the samples see the input while it is in use; messages up to
    # 1 GiB, so the 512 MiB input also fits inline.
    worker = Worker("builtin://checksum?infer_delay_ms=1000", "--max-message-bytes", str(1 << 30))
    yield worker
    worker.stop()


def test_a_512_mib_shared_memory_input_is_read_without_a_private_copy(big_checksum, regions):
    client = grpcclient.InferenceServerClient(big_checksum.url)
    size = 512 * MIB
    region = regions(size)
    array = np.full(size, 3, dtype=np.uint8)
    region.write(array)
    expected = [3 * size]
    client.register_system_shared_memory("big", region.key, size)
    try:
        result, growth = peak_rss_anon_growth(
            big_checksum,
            lambda: client.infer("checksum", [shm_input("INPUT0", array, "UINT8", "big")]),
        )
        assert result.as_numpy("CHECKSUM").tolist() == expected
        print(f"RssAnon growth, 512 MiB through shared memory: {growth / MIB:.1f} MiB")
        assert growth < 16 * MIB, f"RssAnon grew by {growth / MIB:.1f} MiB through shared memory"

        inline = grpcclient.InferInput("INPUT0", [size], "UINT8")
        inline.set_data_from_numpy(array)
        result, growth = peak_rss_anon_growth(big_checksum, lambda: client.infer("checksum", [inline]))
        assert result.as_numpy("CHECKSUM").tolist() == expected
        print(f"RssAnon growth, 512 MiB inline: {growth / MIB:.1f} MiB")
        assert growth >= size, f"RssAnon grew by only {growth / MIB:.1f} MiB inline"
    finally:
        client.unregister_system_shared_memory()
