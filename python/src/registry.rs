//! `ModelRegistry`, `get_or_load` and their configuration, over core's `ModelRegistry`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pyo3::prelude::*;
use remotemedia_runtime_core::model_registry as core;

use crate::errors::{self, Kind};

/// A Python object held by a registry. Python cannot report its size itself: callers declare it
/// with `memory_bytes`, which core counts as a size hint.
struct PyModel {
    object: Py<PyAny>,
}

impl core::RegistryModel for PyModel {}

/// Which idle models a registry unloads, and in what order under a cap.
#[pyclass(
    name = "EvictionPolicy",
    module = "remotemedia.core",
    eq,
    eq_int,
    frozen,
    hash,
    from_py_object
)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum EvictionPolicy {
    /// Unload a model idle longer than `ttl_seconds`; under a cap, the longest idle goes first.
    #[pyo3(name = "TTL")]
    Ttl,
    /// Keep idle models until a cap is reached; then the least recently used goes first.
    #[pyo3(name = "LRU")]
    Lru,
    /// Keep idle models until a cap is reached; then the least often used goes first.
    #[pyo3(name = "LFU")]
    Lfu,
    /// Unload only on `release`, `evict_expired` or `clear`; a load over a cap fails.
    #[pyo3(name = "MANUAL")]
    Manual,
}

impl From<EvictionPolicy> for core::EvictionPolicy {
    fn from(policy: EvictionPolicy) -> Self {
        match policy {
            EvictionPolicy::Ttl => Self::Ttl,
            EvictionPolicy::Lru => Self::Lru,
            EvictionPolicy::Lfu => Self::Lfu,
            EvictionPolicy::Manual => Self::Manual,
        }
    }
}

impl From<core::EvictionPolicy> for EvictionPolicy {
    fn from(policy: core::EvictionPolicy) -> Self {
        match policy {
            core::EvictionPolicy::Ttl => Self::Ttl,
            core::EvictionPolicy::Lru => Self::Lru,
            core::EvictionPolicy::Lfu => Self::Lfu,
            core::EvictionPolicy::Manual => Self::Manual,
        }
    }
}

/// A registry's limits and eviction policy.
#[pyclass(name = "RegistryConfig", module = "remotemedia.core", frozen)]
pub(crate) struct RegistryConfig {
    config: core::RegistryConfig,
    enable_metrics: bool,
}

#[pymethods]
impl RegistryConfig {
    #[new]
    #[pyo3(signature = (
        ttl_seconds = 30.0,
        max_memory_bytes = None,
        max_models = None,
        eviction_policy = EvictionPolicy::Ttl,
        enable_metrics = true,
        sweep_interval_seconds = 5.0,
    ))]
    fn new(
        ttl_seconds: f64,
        max_memory_bytes: Option<u64>,
        max_models: Option<usize>,
        eviction_policy: EvictionPolicy,
        enable_metrics: bool,
        sweep_interval_seconds: f64,
    ) -> PyResult<Self> {
        Ok(Self {
            config: core::RegistryConfig {
                eviction_policy: eviction_policy.into(),
                ttl: seconds("ttl_seconds", ttl_seconds)?,
                sweep_interval: seconds("sweep_interval_seconds", sweep_interval_seconds)?,
                max_memory_bytes,
                max_models,
            },
            enable_metrics,
        })
    }

    #[getter]
    fn ttl_seconds(&self) -> f64 {
        self.config.ttl.as_secs_f64()
    }

    #[getter]
    fn max_memory_bytes(&self) -> Option<u64> {
        self.config.max_memory_bytes
    }

    #[getter]
    fn max_models(&self) -> Option<usize> {
        self.config.max_models
    }

    #[getter]
    fn eviction_policy(&self) -> EvictionPolicy {
        self.config.eviction_policy.into()
    }

    #[getter]
    fn enable_metrics(&self) -> bool {
        self.enable_metrics
    }

    #[getter]
    fn sweep_interval_seconds(&self) -> f64 {
        self.config.sweep_interval.as_secs_f64()
    }

    fn __repr__(&self) -> String {
        format!(
            "RegistryConfig(ttl_seconds={}, max_memory_bytes={}, max_models={}, eviction_policy=EvictionPolicy.{:?}, enable_metrics={}, sweep_interval_seconds={})",
            self.config.ttl.as_secs_f64(),
            optional(self.config.max_memory_bytes),
            optional(self.config.max_models),
            self.config.eviction_policy,
            if self.enable_metrics { "True" } else { "False" },
            self.config.sweep_interval.as_secs_f64(),
        )
    }
}

fn optional<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "None".to_owned(), |value| value.to_string())
}

/// A duration in seconds from Python, refusing what `Duration` cannot hold.
pub(crate) fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        pyo3::exceptions::PyValueError::new_err(format!(
            "failed to read {name}: expected a finite number of seconds >= 0, got {value}"
        ))
    })
}

/// Counters since a registry was created, and what it holds now.
#[pyclass(name = "RegistryMetrics", module = "remotemedia.core", frozen, get_all)]
pub(crate) struct RegistryMetrics {
    hit_rate: f64,
    total_memory_bytes: u64,
    total_models: usize,
    cache_hits: u64,
    cache_misses: u64,
    loads: u64,
    evictions: u64,
}

#[pymethods]
impl RegistryMetrics {
    fn __repr__(&self) -> String {
        format!(
            "RegistryMetrics(hit_rate={}, total_memory_bytes={}, total_models={}, cache_hits={}, cache_misses={}, loads={}, evictions={})",
            self.hit_rate,
            self.total_memory_bytes,
            self.total_models,
            self.cache_hits,
            self.cache_misses,
            self.loads,
            self.evictions
        )
    }
}

/// One loaded model, as `ModelRegistry.list_models()` reports it.
#[pyclass(name = "ModelInfo", module = "remotemedia.core", frozen, get_all)]
pub(crate) struct ModelInfo {
    model_id: String,
    memory_bytes: u64,
    reference_count: usize,
    /// Seconds since the Unix epoch.
    loaded_at: f64,
    /// Seconds since the Unix epoch.
    last_accessed: f64,
    access_count: u64,
}

#[pymethods]
impl ModelInfo {
    fn __repr__(&self) -> String {
        format!(
            "ModelInfo(model_id={:?}, memory_bytes={}, access_count={})",
            self.model_id, self.memory_bytes, self.access_count
        )
    }
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

enum Registry {
    Owned(core::ModelRegistry),
    /// core's process-wide registry, the one `get_or_load` uses.
    Global,
}

/// Holds one instance of each model and hands the same object to every caller.
///
/// `ModelRegistry(config)` is a new registry; `global_registry()` is the process-wide one.
#[pyclass(name = "ModelRegistry", module = "remotemedia.core", frozen)]
pub(crate) struct ModelRegistry {
    registry: Registry,
    enable_metrics: bool,
}

impl ModelRegistry {
    fn core(&self) -> &core::ModelRegistry {
        match &self.registry {
            Registry::Owned(registry) => registry,
            Registry::Global => core::ModelRegistry::global(),
        }
    }
}

#[pymethods]
impl ModelRegistry {
    #[new]
    #[pyo3(signature = (config = None))]
    fn new(config: Option<PyRef<'_, RegistryConfig>>) -> Self {
        let (config, enable_metrics) = match config {
            Some(config) => (config.config.clone(), config.enable_metrics),
            None => (core::RegistryConfig::default(), true),
        };
        Self {
            registry: Registry::Owned(core::ModelRegistry::new(config)),
            enable_metrics,
        }
    }

    /// The model loaded under `model_id`, calling `loader()` to load it if it is not loaded.
    #[pyo3(signature = (model_id, loader, *, memory_bytes = None))]
    fn get_or_load(
        &self,
        py: Python<'_>,
        model_id: &str,
        loader: Py<PyAny>,
        memory_bytes: Option<u64>,
    ) -> PyResult<Py<PyAny>> {
        get_or_load_in(py, self.core(), model_id, loader, memory_bytes)
    }

    /// Counters since the registry was created, and the models and bytes held now.
    fn metrics(&self) -> PyResult<RegistryMetrics> {
        if !self.enable_metrics {
            return Err(errors::raise(
                Kind::Registry,
                "failed to read metrics: this registry was created with enable_metrics=False",
            ));
        }
        let metrics = self.core().metrics();
        Ok(RegistryMetrics {
            hit_rate: metrics.hit_rate,
            total_memory_bytes: metrics.total_memory_bytes,
            total_models: metrics.total_models,
            cache_hits: metrics.cache_hits,
            cache_misses: metrics.cache_misses,
            loads: metrics.loads,
            evictions: metrics.evictions,
        })
    }

    /// The models loaded now, sorted by id.
    fn list_models(&self) -> Vec<ModelInfo> {
        self.core()
            .list_models()
            .into_iter()
            .map(|info| ModelInfo {
                model_id: info.model_id,
                memory_bytes: info.memory_bytes,
                reference_count: info.reference_count,
                loaded_at: unix_seconds(info.loaded_at),
                last_accessed: unix_seconds(info.last_accessed),
                access_count: info.access_count,
            })
            .collect()
    }

    /// Unloads `model_id` now; False when it was not loaded.
    fn release(&self, py: Python<'_>, model_id: &str) -> PyResult<bool> {
        self.core()
            .release(model_id)
            .map_err(|error| errors::registry_error(py, error))
    }

    /// Unloads every model idle longer than `ttl_seconds`; returns how many.
    fn evict_expired(&self) -> usize {
        self.core().evict_expired()
    }

    /// Unloads every model; returns how many.
    fn clear(&self) -> usize {
        self.core().clear()
    }

    fn __contains__(&self, model_id: &str) -> bool {
        self.core()
            .list_models()
            .iter()
            .any(|info| info.model_id == model_id)
    }

    fn __len__(&self) -> usize {
        self.core().list_models().len()
    }
}

/// Waits for core's single-flight load with the GIL released; the loader runs on the runtime's
/// blocking pool and takes the GIL itself.
fn get_or_load_in(
    py: Python<'_>,
    registry: &core::ModelRegistry,
    model_id: &str,
    loader: Py<PyAny>,
    memory_bytes: Option<u64>,
) -> PyResult<Py<PyAny>> {
    let runtime = crate::runtime().map_err(|error| {
        errors::raise(
            Kind::Registry,
            format!("failed to start the registry's tokio runtime: {error}"),
        )
    })?;
    let load = move || Python::attach(|py| loader.call0(py).map(|object| PyModel { object }));
    let handle = py
        .detach(|| {
            runtime.block_on(async {
                match memory_bytes {
                    Some(bytes) => {
                        registry
                            .with_size_hint(bytes)
                            .get_or_load(model_id, load)
                            .await
                    }
                    None => registry.get_or_load(model_id, load).await,
                }
            })
        })
        .map_err(|error| errors::registry_error(py, error))?;
    Ok(handle.model().object.clone_ref(py))
}

/// The model loaded under `model_id` in the process-wide registry, calling `loader()` once to
/// load it however many threads ask at the same time.
#[pyfunction]
#[pyo3(signature = (model_id, loader, *, memory_bytes = None))]
fn get_or_load(
    py: Python<'_>,
    model_id: &str,
    loader: Py<PyAny>,
    memory_bytes: Option<u64>,
) -> PyResult<Py<PyAny>> {
    get_or_load_in(
        py,
        core::ModelRegistry::global(),
        model_id,
        loader,
        memory_bytes,
    )
}

/// The process-wide registry that `get_or_load` uses.
#[pyfunction]
fn global_registry() -> ModelRegistry {
    ModelRegistry {
        registry: Registry::Global,
        enable_metrics: true,
    }
}

pub(crate) fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<EvictionPolicy>()?;
    module.add_class::<RegistryConfig>()?;
    module.add_class::<RegistryMetrics>()?;
    module.add_class::<ModelInfo>()?;
    module.add_class::<ModelRegistry>()?;
    module.add_function(wrap_pyfunction!(get_or_load, module)?)?;
    module.add_function(wrap_pyfunction!(global_registry, module)?)?;
    Ok(())
}
