"""remotemedia.core's model registry from Python: single flight, errors, the GIL, configuration."""

import subprocess
import sys
import threading
import time

import pytest

from remotemedia.core import (
    EvictionPolicy,
    ModelRegistry,
    RegistryConfig,
    RegistryError,
    RemoteMediaError,
    get_or_load,
    global_registry,
)

THREADS = 16


class Model:
    def __init__(self, name):
        self.name = name


GIL_PROBE = """
import threading
from remotemedia.core import ModelRegistry

registry = ModelRegistry()
loader_started = threading.Event()
may_finish = threading.Event()
result = []

def loader():
    # Running this line needs the GIL, while the caller waits in Rust.
    loader_started.set()
    may_finish.wait(timeout=30)
    return "asr"

caller = threading.Thread(target=lambda: result.append(registry.get_or_load("asr", loader)))
caller.start()
assert loader_started.wait(timeout=10), "the loader never ran"
assert sum(range(10_000)) == 49_995_000  # this thread runs Python too, meanwhile
assert caller.is_alive()
may_finish.set()
caller.join(timeout=30)
print(result[0])
"""


# First in the file: without a released GIL, every other test here hangs instead of failing.
def test_waiting_caller_releases_the_gil_so_the_loader_and_other_threads_run_python():
    # In a child process: a caller that kept the GIL while waiting would hang the whole
    # interpreter (the loader needs the GIL to finish), which only a timeout from outside reports.
    try:
        probe = subprocess.run(
            [sys.executable, "-c", GIL_PROBE], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the interpreter hung: the caller waiting in get_or_load held the GIL")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "asr"


def test_get_or_load_returns_the_same_object_and_loads_once():
    calls = []

    def load_whisper():
        calls.append(threading.get_ident())
        return Model("whisper-base")

    model1 = get_or_load("test-whisper-base", load_whisper)
    model2 = get_or_load("test-whisper-base", load_whisper)
    assert model1 is model2
    assert len(calls) == 1
    assert "test-whisper-base" in global_registry()


def test_loader_runs_once_however_many_threads_ask_at_once():
    registry = ModelRegistry(RegistryConfig())
    calls = []
    barrier = threading.Barrier(THREADS)
    results = [None] * THREADS

    def loader():
        calls.append(1)
        time.sleep(0.3)  # long enough that every thread arrives while the load is in flight
        return Model("vad")

    def ask(i):
        barrier.wait()
        results[i] = registry.get_or_load("vad", loader)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(calls) == 1
    assert all(result is results[0] for result in results)
    assert isinstance(results[0], Model)
    metrics = registry.metrics()
    assert metrics.loads == 1
    assert metrics.cache_hits + metrics.cache_misses == THREADS


class LoaderFailed(Exception):
    pass


def test_raising_loader_reaches_every_waiter_and_does_not_poison_the_key():
    registry = ModelRegistry()
    barrier = threading.Barrier(4)
    errors = []

    def failing_loader():
        time.sleep(0.2)
        raise LoaderFailed("weights missing")

    def ask():
        barrier.wait()
        try:
            registry.get_or_load("llm", failing_loader)
        except LoaderFailed as error:
            errors.append(error)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(errors) == 4
    assert all(str(error) == "weights missing" for error in errors)
    assert "llm" not in registry

    model = registry.get_or_load("llm", lambda: Model("llm"))
    assert model.name == "llm"
    assert registry.get_or_load("llm", failing_loader) is model


def test_metrics_and_list_models_report_hits_and_declared_sizes():
    registry = ModelRegistry(
        RegistryConfig(
            ttl_seconds=60.0,
            max_memory_bytes=10 * 1024**3,
            eviction_policy=EvictionPolicy.LRU,
            enable_metrics=True,
        )
    )
    for _ in range(3):
        registry.get_or_load("embedder", lambda: Model("embedder"), memory_bytes=5 * 1024**2)
    registry.get_or_load("vad", lambda: Model("vad"), memory_bytes=1024)
    m = registry.metrics()
    assert m.hit_rate == pytest.approx(2 / 4)
    assert m.total_memory_bytes == 5 * 1024**2 + 1024
    assert m.total_models == 2
    infos = registry.list_models()
    assert [(info.model_id, info.memory_bytes) for info in infos] == [
        ("embedder", 5 * 1024**2),
        ("vad", 1024),
    ]
    assert infos[0].access_count == 3
    assert infos[0].loaded_at <= infos[0].last_accessed <= time.time() + 1


def test_lru_registry_unloads_the_least_recently_used_model_at_its_cap():
    registry = ModelRegistry(RegistryConfig(max_models=2, eviction_policy=EvictionPolicy.LRU))
    first = registry.get_or_load("a", lambda: Model("a"))
    registry.get_or_load("b", lambda: Model("b"))
    assert registry.get_or_load("a", lambda: Model("again")) is first  # "b" is now the oldest
    registry.get_or_load("c", lambda: Model("c"))
    assert [info.model_id for info in registry.list_models()] == ["a", "c"]
    assert registry.metrics().evictions == 1


def test_release_and_clear_unload_models():
    registry = ModelRegistry(RegistryConfig(eviction_policy=EvictionPolicy.MANUAL))
    registry.get_or_load("a", lambda: Model("a"))
    registry.get_or_load("b", lambda: Model("b"))
    assert registry.release("a") is True
    assert registry.release("a") is False
    assert registry.clear() == 1
    assert len(registry) == 0


def test_manual_registry_refuses_a_load_over_its_cap_with_a_registry_error():
    registry = ModelRegistry(
        RegistryConfig(max_memory_bytes=1000, eviction_policy=EvictionPolicy.MANUAL)
    )
    registry.get_or_load("small", lambda: Model("small"), memory_bytes=600)
    with pytest.raises(RegistryError, match="failed to load model big") as raised:
        registry.get_or_load("big", lambda: Model("big"), memory_bytes=600)
    assert isinstance(raised.value, RemoteMediaError)
    assert isinstance(raised.value, RuntimeError)


def test_ttl_registry_unloads_idle_models_after_their_ttl():
    registry = ModelRegistry(RegistryConfig(ttl_seconds=0.2, sweep_interval_seconds=0.05))
    registry.get_or_load("short-lived", lambda: Model("x"))
    deadline = time.monotonic() + 10
    while "short-lived" in registry and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "short-lived" not in registry


def test_disabled_metrics_say_so():
    registry = ModelRegistry(RegistryConfig(enable_metrics=False))
    with pytest.raises(RegistryError, match="enable_metrics=False"):
        registry.metrics()


@pytest.mark.parametrize("field", ["ttl_seconds", "sweep_interval_seconds"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_config_refuses_durations_that_are_not_finite_and_non_negative(field, value):
    with pytest.raises(ValueError, match=f"failed to read {field}"):
        RegistryConfig(**{field: value})


def test_config_keeps_what_it_was_given():
    config = RegistryConfig(
        ttl_seconds=60.0,
        max_memory_bytes=10 * 1024**3,
        eviction_policy=EvictionPolicy.LRU,
        enable_metrics=True,
    )
    assert (config.ttl_seconds, config.max_memory_bytes, config.eviction_policy) == (
        60.0,
        10 * 1024**3,
        EvictionPolicy.LRU,
    )
    assert config.max_models is None
