//! The registry: single-flight loading, caps, eviction and the sweeper.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, SystemTime};

use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::handle::{ErasedHandle, Usage};
use super::{EvictionPolicy, ModelHandle, RegistryConfig, RegistryError, RegistryModel};

type BoxError = Box<dyn Error + Send + Sync + 'static>;
/// What a load publishes to the callers waiting for it: `None` until it finishes. A loaded model
/// itself is handed over through the flight's [`Handover`].
type LoadOutcome = Option<Result<(), RegistryError>>;

/// Counters since the registry was created, and what it holds now.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryMetrics {
    /// `cache_hits / (cache_hits + cache_misses)`, 0 before any request.
    pub hit_rate: f64,
    /// Bytes reported by the loaded models (see [`RegistryModel::memory_usage`]).
    pub total_memory_bytes: u64,
    /// Models loaded now.
    pub total_models: usize,
    /// Requests answered with a model already loaded.
    pub cache_hits: u64,
    /// Requests that found no loaded model: they started a load or waited for one.
    pub cache_misses: u64,
    /// Loads started (a load shared by several waiting callers counts once).
    pub loads: u64,
    /// Loaded models unloaded, for any reason (expiry, a cap, `release`, `clear`).
    pub evictions: u64,
}

/// One loaded model, as [`ModelRegistry::list_models`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The id it was loaded under.
    pub model_id: String,
    /// The Rust type it was loaded as.
    pub type_name: &'static str,
    /// What it counts against `max_memory_bytes`.
    pub memory_bytes: u64,
    /// Live handles; 0 means idle.
    pub reference_count: usize,
    /// When its loader returned.
    pub loaded_at: SystemTime,
    /// The latest time a handle was handed out or dropped.
    pub last_accessed: SystemTime,
    /// Handles handed out since it was loaded.
    pub access_count: u64,
}

/// Holds one instance of each model per process and hands out counted handles to it.
///
/// Concurrent requests for one model id share a single load; loaded models stay until they are
/// idle (no live [`ModelHandle`]) and the [`EvictionPolicy`] or a cap unloads them. The registry
/// is not generic: each model id holds its own type, and asking for it as another type is a
/// [`RegistryError::TypeMismatch`]. Loads need a tokio runtime.
pub struct ModelRegistry {
    inner: Arc<Inner>,
}

/// Loads that count a declared size when the model cannot report its own; see
/// [`ModelRegistry::with_size_hint`].
pub struct SizedLoad<'a> {
    registry: &'a ModelRegistry,
    size_hint: u64,
}

struct Inner {
    config: RegistryConfig,
    /// The zero of every entry's `last_accessed`.
    epoch: Instant,
    slots: RwLock<HashMap<String, Slot>>,
    next_flight: AtomicU64,
    sweeper_running: AtomicBool,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    loads: AtomicU64,
    evictions: AtomicU64,
}

enum Slot {
    Loading(Flight),
    Loaded(Entry),
}

/// A load in progress: callers wait on `outcome` rather than holding any lock across it.
struct Flight {
    id: u64,
    type_id: TypeId,
    type_name: &'static str,
    outcome: watch::Receiver<LoadOutcome>,
    handover: Arc<Handover>,
}

/// Where a finished load leaves its model for the callers that waited for it. The load's own
/// reference stays here until the last waiter has taken a handle of its own (or given up), and is
/// dropped by that waiter: once every caller has returned, only the callers' handles count, so a
/// model nobody holds is idle at once and still could not be evicted before its waiters had it.
#[derive(Default)]
struct Handover(Mutex<HandoverState>);

#[derive(Default)]
struct HandoverState {
    /// Callers still waiting on the flight.
    waiters: usize,
    /// The load's own handle, while waiters remain.
    handle: Option<ErasedHandle>,
}

impl Handover {
    fn lock(&self) -> std::sync::MutexGuard<'_, HandoverState> {
        // Nothing that can panic runs under this lock.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn join(self: &Arc<Self>, outcome: watch::Receiver<LoadOutcome>) -> Waiter {
        self.lock().waiters += 1;
        Waiter {
            outcome,
            handover: Arc::clone(self),
            counted: true,
        }
    }

    /// Leaves the finished load's handle for the waiters, or drops it if none is left.
    fn deliver(&self, handle: ErasedHandle) {
        let mut state = self.lock();
        if state.waiters > 0 {
            state.handle = Some(handle);
        }
    }
}

/// One caller waiting for a load, counted in its flight's [`Handover`] until it leaves.
struct Waiter {
    outcome: watch::Receiver<LoadOutcome>,
    handover: Arc<Handover>,
    counted: bool,
}

impl Waiter {
    /// Takes this caller's own handle to the delivered model, and leaves.
    fn take(mut self) -> Option<ErasedHandle> {
        let mut state = self.handover.lock();
        let handle = state.handle.clone();
        Self::leave(&mut state);
        self.counted = false;
        handle
    }

    fn leave(state: &mut HandoverState) {
        state.waiters -= 1;
        if state.waiters == 0 {
            state.handle = None;
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        // A caller that gave up, or that got an error, leaves without a handle.
        if self.counted {
            Self::leave(&mut self.handover.lock());
        }
    }
}

struct Entry {
    model: Arc<dyn Any + Send + Sync>,
    type_id: TypeId,
    type_name: &'static str,
    memory_bytes: u64,
    loaded_at: SystemTime,
    /// `loaded_at` on the registry's clock, to place `last_accessed` in wall-clock time.
    loaded_since_epoch: Duration,
    usage: Arc<Usage>,
}

/// What a request found under the lock.
enum Found<T> {
    Ready(ModelHandle<T>),
    Wait(Waiter),
}

static GLOBAL: OnceLock<ModelRegistry> = OnceLock::new();

impl ModelRegistry {
    /// An empty registry. Its TTL sweeper starts with the first request made in a tokio runtime.
    pub fn new(config: RegistryConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                epoch: Instant::now(),
                slots: RwLock::default(),
                next_flight: AtomicU64::new(0),
                sweeper_running: AtomicBool::new(false),
                cache_hits: AtomicU64::new(0),
                cache_misses: AtomicU64::new(0),
                loads: AtomicU64::new(0),
                evictions: AtomicU64::new(0),
            }),
        }
    }

    /// The process-wide registry, created with [`RegistryConfig::default`] on first use unless
    /// [`init_global`](Self::init_global) came first.
    pub fn global() -> &'static ModelRegistry {
        GLOBAL.get_or_init(|| Self::new(RegistryConfig::default()))
    }

    /// Creates the process-wide registry with `config`; fails if it already exists.
    pub fn init_global(config: RegistryConfig) -> Result<&'static ModelRegistry, RegistryError> {
        let mut created = false;
        let registry = GLOBAL.get_or_init(|| {
            created = true;
            Self::new(config)
        });
        if created {
            Ok(registry)
        } else {
            Err(RegistryError::GlobalAlreadyInitialized)
        }
    }

    /// The limits and policy it was created with.
    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    /// A handle to the model loaded under `model_id`, loading it with `loader` if it is not
    /// loaded. `loader` runs on tokio's blocking pool, once however many callers ask at the same
    /// time; they all get the same instance, or all get the loader's error, and the next call
    /// after a failure loads again. A load finishes even if every caller gave up waiting.
    pub async fn get_or_load<T, E, F>(
        &self,
        model_id: &str,
        loader: F,
    ) -> Result<ModelHandle<T>, RegistryError>
    where
        T: RegistryModel,
        E: Into<BoxError>,
        F: FnOnce() -> Result<T, E> + Send + 'static,
    {
        self.load_blocking(model_id, None, loader).await
    }

    /// [`get_or_load`](Self::get_or_load) with an async loader, run as its own tokio task.
    pub async fn get_or_load_async<T, E, F, Fut>(
        &self,
        model_id: &str,
        loader: F,
    ) -> Result<ModelHandle<T>, RegistryError>
    where
        T: RegistryModel,
        E: Into<BoxError>,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.load_async(model_id, None, loader).await
    }

    /// Loads that count `bytes` against `max_memory_bytes` for a model whose
    /// [`RegistryModel::memory_usage`] is `None`.
    pub fn with_size_hint(&self, bytes: u64) -> SizedLoad<'_> {
        SizedLoad {
            registry: self,
            size_hint: bytes,
        }
    }

    /// The models loaded now, sorted by id. Models still loading are not listed.
    pub fn list_models(&self) -> Vec<ModelInfo> {
        let slots = self.inner.read();
        let mut models: Vec<ModelInfo> = slots
            .iter()
            .filter_map(|(model_id, slot)| match slot {
                Slot::Loaded(entry) => Some(entry.info(model_id)),
                Slot::Loading(_) => None,
            })
            .collect();
        models.sort_unstable_by(|a, b| a.model_id.cmp(&b.model_id));
        models
    }

    /// Counters since creation, and the models and bytes held now.
    pub fn metrics(&self) -> RegistryMetrics {
        let inner = &self.inner;
        let (total_memory_bytes, total_models) = totals(&inner.read());
        let cache_hits = inner.cache_hits.load(Ordering::Relaxed);
        let cache_misses = inner.cache_misses.load(Ordering::Relaxed);
        let requests = cache_hits + cache_misses;
        RegistryMetrics {
            hit_rate: if requests == 0 {
                0.0
            } else {
                cache_hits as f64 / requests as f64
            },
            total_memory_bytes,
            total_models,
            cache_hits,
            cache_misses,
            loads: inner.loads.load(Ordering::Relaxed),
            evictions: inner.evictions.load(Ordering::Relaxed),
        }
    }

    /// Unloads `model_id` now if it is idle. `Ok(false)` when it is not loaded (or still
    /// loading); [`RegistryError::InUse`] while handles use it.
    pub fn release(&self, model_id: &str) -> Result<bool, RegistryError> {
        let removed = {
            let mut slots = self.inner.write();
            match slots.get(model_id) {
                Some(Slot::Loaded(entry)) => {
                    let reference_count = entry.usage.reference_count();
                    if reference_count > 0 {
                        return Err(RegistryError::InUse {
                            model_id: model_id.to_owned(),
                            reference_count,
                        });
                    }
                }
                Some(Slot::Loading(_)) | None => return Ok(false),
            }
            slots.remove(model_id)
        };
        self.inner.evictions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(model_id, "released model");
        // The model itself is dropped here, outside the lock.
        drop(removed);
        Ok(true)
    }

    /// Unloads every model idle longer than the configured `ttl`, whatever the policy; returns
    /// how many. The sweeper calls this under [`EvictionPolicy::Ttl`].
    pub fn evict_expired(&self) -> usize {
        self.inner.evict_expired()
    }

    /// Unloads every idle model; models in use and loads in progress stay. Returns how many.
    pub fn clear(&self) -> usize {
        self.inner.evict_idle(|_| true)
    }

    async fn load_blocking<T, E, F>(
        &self,
        model_id: &str,
        size_hint: Option<u64>,
        loader: F,
    ) -> Result<ModelHandle<T>, RegistryError>
    where
        T: RegistryModel,
        E: Into<BoxError>,
        F: FnOnce() -> Result<T, E> + Send + 'static,
    {
        self.get_or_start(model_id, size_hint, move |runtime| {
            runtime.spawn_blocking(move || loader().map_err(Into::into))
        })
        .await
    }

    async fn load_async<T, E, F, Fut>(
        &self,
        model_id: &str,
        size_hint: Option<u64>,
        loader: F,
    ) -> Result<ModelHandle<T>, RegistryError>
    where
        T: RegistryModel,
        E: Into<BoxError>,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        // Its own task, so that a panicking loader is reported like a panicking sync one.
        self.get_or_start(model_id, size_hint, move |runtime| {
            runtime.spawn(async move { loader().await.map_err(Into::into) })
        })
        .await
    }

    /// Answers from the map, or starts a load with `start` and waits for it with the callers
    /// that join it.
    async fn get_or_start<T, S>(
        &self,
        model_id: &str,
        size_hint: Option<u64>,
        start: S,
    ) -> Result<ModelHandle<T>, RegistryError>
    where
        T: RegistryModel,
        S: FnOnce(&Handle) -> JoinHandle<Result<T, BoxError>>,
    {
        self.inner.ensure_sweeper();
        let mut waiter = match self.inner.find_or_start(model_id, size_hint, start)? {
            Found::Ready(handle) => return Ok(handle),
            Found::Wait(waiter) => waiter,
        };
        let published = match waiter.outcome.wait_for(Option::is_some).await {
            Ok(published) => published.clone(),
            // The load's task was dropped before publishing: its runtime shut down.
            Err(_) => None,
        };
        let aborted = || RegistryError::LoadAborted {
            model_id: model_id.to_owned(),
        };
        match published {
            // Cloning the delivered handle takes this caller's own reference.
            Some(Ok(())) => waiter.take().ok_or_else(aborted)?.into_typed(),
            Some(Err(error)) => Err(error),
            None => Err(aborted()),
        }
    }
}

impl SizedLoad<'_> {
    /// [`ModelRegistry::get_or_load`], counting the declared size.
    pub async fn get_or_load<T, E, F>(
        &self,
        model_id: &str,
        loader: F,
    ) -> Result<ModelHandle<T>, RegistryError>
    where
        T: RegistryModel,
        E: Into<BoxError>,
        F: FnOnce() -> Result<T, E> + Send + 'static,
    {
        self.registry
            .load_blocking(model_id, Some(self.size_hint), loader)
            .await
    }

    /// [`ModelRegistry::get_or_load_async`], counting the declared size.
    pub async fn get_or_load_async<T, E, F, Fut>(
        &self,
        model_id: &str,
        loader: F,
    ) -> Result<ModelHandle<T>, RegistryError>
    where
        T: RegistryModel,
        E: Into<BoxError>,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.registry
            .load_async(model_id, Some(self.size_hint), loader)
            .await
    }
}

impl fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelRegistry")
            .field("config", &self.inner.config)
            .field("metrics", &self.metrics())
            .finish()
    }
}

impl Inner {
    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Slot>> {
        // No code that can panic runs under this lock (models are measured and dropped outside
        // it), so a poisoned lock still guards consistent data.
        self.slots
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Slot>> {
        self.slots
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Answers a request from what is in the map, starting a load (with `start`) if nothing is.
    fn find_or_start<T, S>(
        self: &Arc<Self>,
        model_id: &str,
        size_hint: Option<u64>,
        start: S,
    ) -> Result<Found<T>, RegistryError>
    where
        T: RegistryModel,
        S: FnOnce(&Handle) -> JoinHandle<Result<T, BoxError>>,
    {
        if let Some(slot) = self.read().get(model_id) {
            return self.join(model_id, slot);
        }
        let runtime = Handle::try_current().map_err(|_| RegistryError::NoRuntime {
            model_id: model_id.to_owned(),
        })?;
        let mut slots = self.write();
        // Another caller may have started the load between the two locks.
        if let Some(slot) = slots.get(model_id) {
            return self.join(model_id, slot);
        }
        let (publish, outcome) = watch::channel(None);
        let handover = Arc::new(Handover::default());
        let waiter = handover.join(outcome.clone());
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        slots.insert(
            model_id.to_owned(),
            Slot::Loading(Flight {
                id,
                type_id: TypeId::of::<T>(),
                type_name: std::any::type_name::<T>(),
                outcome,
                handover: Arc::clone(&handover),
            }),
        );
        drop(slots);
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
        self.loads.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(model_id, "loading model");
        let loading = start(&runtime);
        runtime.spawn(Arc::clone(self).finish_load(
            model_id.to_owned(),
            id,
            size_hint,
            loading,
            (publish, handover),
        ));
        Ok(Found::Wait(waiter))
    }

    fn join<T: RegistryModel>(
        &self,
        model_id: &str,
        slot: &Slot,
    ) -> Result<Found<T>, RegistryError> {
        let (type_id, loaded) = match slot {
            Slot::Loaded(entry) => (entry.type_id, entry.type_name),
            Slot::Loading(flight) => (flight.type_id, flight.type_name),
        };
        if type_id != TypeId::of::<T>() {
            return Err(RegistryError::TypeMismatch {
                model_id: model_id.to_owned(),
                loaded,
                requested: std::any::type_name::<T>(),
            });
        }
        match slot {
            Slot::Loaded(entry) => {
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                let handle = ErasedHandle {
                    model: Arc::clone(&entry.model),
                    type_name: entry.type_name,
                    lease: entry.usage.acquire(),
                };
                handle.into_typed().map(Found::Ready)
            }
            Slot::Loading(flight) => {
                self.cache_misses.fetch_add(1, Ordering::Relaxed);
                Ok(Found::Wait(flight.handover.join(flight.outcome.clone())))
            }
        }
    }

    /// Runs as its own task, so a load finishes (and its waiters hear of it) even when the
    /// caller that started it is cancelled.
    async fn finish_load<T: RegistryModel>(
        self: Arc<Self>,
        model_id: String,
        flight: u64,
        size_hint: Option<u64>,
        loading: JoinHandle<Result<T, BoxError>>,
        (publish, handover): (watch::Sender<LoadOutcome>, Arc<Handover>),
    ) {
        // Also runs if this task is dropped mid-load (runtime shutdown): then the waiters see
        // the channel close, and the next request loads again.
        let unregister = FlightGuard {
            inner: &self,
            model_id: &model_id,
            flight,
        };
        let outcome = match loading.await {
            Ok(Ok(model)) => self.admit(&model_id, model, size_hint),
            Ok(Err(source)) => Err(RegistryError::LoadFailed {
                model_id: model_id.clone(),
                source: Arc::from(source),
            }),
            Err(join) if join.is_panic() => Err(RegistryError::LoaderPanicked {
                model_id: model_id.clone(),
            }),
            Err(_) => Err(RegistryError::LoadAborted {
                model_id: model_id.clone(),
            }),
        };
        if let Err(error) = &outcome {
            tracing::warn!(model_id, %error, "model load failed");
        }
        // A failed flight leaves the map before its waiters hear, so that whoever asks after
        // them starts a fresh load instead of reading the old error.
        drop(unregister);
        // With no waiter left (every caller gave up), the handle drops here and the model stays
        // loaded, idle.
        let outcome = outcome.map(|handle| handover.deliver(handle));
        publish.send_replace(Some(outcome));
    }

    /// Registers a freshly loaded model, making room under the caps if idle models can go.
    fn admit<T: RegistryModel>(
        &self,
        model_id: &str,
        model: T,
        size_hint: Option<u64>,
    ) -> Result<ErasedHandle, RegistryError> {
        // Measured before taking the lock: `memory_usage` is the model's code.
        let memory_bytes = model.memory_usage().or(size_hint).unwrap_or(0);
        let model: Arc<dyn Any + Send + Sync> = Arc::new(model);
        let mut evicted = Vec::new();
        let admitted = {
            let mut slots = self.write();
            self.make_room(&mut slots, model_id, memory_bytes, &mut evicted)
                .map(|()| {
                    let (usage, lease) = Usage::new_held(model_id, self.epoch);
                    let loaded_since_epoch = usage.last_accessed();
                    slots.insert(
                        model_id.to_owned(),
                        Slot::Loaded(Entry {
                            model: Arc::clone(&model),
                            type_id: TypeId::of::<T>(),
                            type_name: std::any::type_name::<T>(),
                            memory_bytes,
                            loaded_at: SystemTime::now(),
                            loaded_since_epoch,
                            usage,
                        }),
                    );
                    ErasedHandle {
                        model,
                        type_name: std::any::type_name::<T>(),
                        lease,
                    }
                })
        };
        self.evictions
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        for (victim, _) in &evicted {
            tracing::debug!(model_id = %victim, "evicted idle model to make room");
        }
        // Evicted models, and on failure the new one, are dropped here, outside the lock.
        drop(evicted);
        admitted
    }

    /// Evicts idle models, in policy order, until `needed` more bytes and one more model fit
    /// under the caps. Evicts nothing if even evicting every idle model would not be enough.
    fn make_room(
        &self,
        slots: &mut HashMap<String, Slot>,
        model_id: &str,
        needed: u64,
        evicted: &mut Vec<(String, Slot)>,
    ) -> Result<(), RegistryError> {
        let RegistryConfig {
            eviction_policy,
            max_memory_bytes,
            max_models,
            ..
        } = self.config;
        let memory_fits =
            |bytes: u64| max_memory_bytes.is_none_or(|max| bytes.saturating_add(needed) <= max);
        let count_fits = |models: usize| max_models.is_none_or(|max| models < max);
        let (mut bytes, mut models) = totals(slots);
        if memory_fits(bytes) && count_fits(models) {
            return Ok(());
        }
        let mut victims: Vec<(&String, &Entry)> = match eviction_policy {
            EvictionPolicy::Manual => Vec::new(),
            EvictionPolicy::Ttl | EvictionPolicy::Lru | EvictionPolicy::Lfu => slots
                .iter()
                .filter_map(|(id, slot)| match slot {
                    Slot::Loaded(entry) if entry.usage.reference_count() == 0 => Some((id, entry)),
                    _ => None,
                })
                .collect(),
        };
        let pinned_bytes = bytes - victims.iter().map(|(_, e)| e.memory_bytes).sum::<u64>();
        if !memory_fits(pinned_bytes) {
            return Err(RegistryError::OutOfMemory {
                model_id: model_id.to_owned(),
                needed,
                available: max_memory_bytes
                    .map_or(u64::MAX, |max| max.saturating_sub(pinned_bytes)),
            });
        }
        if !count_fits(models - victims.len()) {
            return Err(RegistryError::RegistryFull {
                model_id: model_id.to_owned(),
                max_models: max_models.unwrap_or(usize::MAX),
            });
        }
        match eviction_policy {
            EvictionPolicy::Lfu => {
                victims.sort_unstable_by_key(|(_, e)| (e.usage.accesses(), e.usage.last_accessed()))
            }
            _ => victims.sort_unstable_by_key(|(_, e)| e.usage.last_accessed()),
        }
        let victims: Vec<String> = victims.into_iter().map(|(id, _)| id.clone()).collect();
        for victim in victims {
            if memory_fits(bytes) && count_fits(models) {
                break;
            }
            if let Some(slot) = slots.remove_entry(&victim) {
                if let Slot::Loaded(entry) = &slot.1 {
                    bytes -= entry.memory_bytes;
                }
                models -= 1;
                evicted.push(slot);
            }
        }
        Ok(())
    }

    fn evict_expired(&self) -> usize {
        let now = Instant::now();
        let ttl = self.config.ttl;
        self.evict_idle(|usage| usage.idle_for(now).is_some_and(|idle| idle > ttl))
    }

    /// Evicts the idle models `pick` selects; returns how many.
    fn evict_idle(&self, pick: impl Fn(&Usage) -> bool) -> usize {
        let evicted: Vec<(String, Slot)> = self
            .write()
            .extract_if(|_, slot| match slot {
                Slot::Loaded(entry) => entry.usage.reference_count() == 0 && pick(&entry.usage),
                Slot::Loading(_) => false,
            })
            .collect();
        self.evictions
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        for (model_id, _) in &evicted {
            tracing::debug!(model_id, "evicted idle model");
        }
        // The models are dropped here, after the lock.
        evicted.len()
    }

    /// Starts the TTL sweeper on the current runtime unless one runs. Checked on every request,
    /// so a registry that outlives a runtime (the global one, in tests) gets a new sweeper.
    fn ensure_sweeper(self: &Arc<Self>) {
        if self.config.eviction_policy != EvictionPolicy::Ttl
            || self.sweeper_running.load(Ordering::Relaxed)
        {
            return;
        }
        let Ok(runtime) = Handle::try_current() else {
            return;
        };
        if self.sweeper_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let every = self.config.sweep_interval.max(Duration::from_millis(1));
        runtime.spawn(sweep(Arc::downgrade(self), every));
    }
}

/// Evicts expired models every `every` until the registry is dropped.
async fn sweep(registry: Weak<Inner>, every: Duration) {
    let _running = SweeperFlag(registry.clone());
    let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = registry.upgrade() else {
            return;
        };
        inner.evict_expired();
    }
}

/// Clears `sweeper_running` when the sweeper task ends or its runtime drops it.
struct SweeperFlag(Weak<Inner>);

impl Drop for SweeperFlag {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.sweeper_running.store(false, Ordering::Release);
        }
    }
}

/// Removes a flight from the map unless it was replaced by its loaded model.
struct FlightGuard<'a> {
    inner: &'a Inner,
    model_id: &'a str,
    flight: u64,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut slots = self.inner.write();
        if matches!(slots.get(self.model_id), Some(Slot::Loading(f)) if f.id == self.flight) {
            slots.remove(self.model_id);
        }
    }
}

impl Entry {
    fn info(&self, model_id: &str) -> ModelInfo {
        let since_load = self
            .usage
            .last_accessed()
            .saturating_sub(self.loaded_since_epoch);
        ModelInfo {
            model_id: model_id.to_owned(),
            type_name: self.type_name,
            memory_bytes: self.memory_bytes,
            reference_count: self.usage.reference_count(),
            loaded_at: self.loaded_at,
            last_accessed: self.loaded_at + since_load,
            access_count: self.usage.accesses(),
        }
    }
}

/// Bytes and count of the loaded models.
fn totals(slots: &HashMap<String, Slot>) -> (u64, usize) {
    slots
        .values()
        .filter_map(|slot| match slot {
            Slot::Loaded(entry) => Some(entry.memory_bytes),
            Slot::Loading(_) => None,
        })
        .fold((0, 0), |(bytes, models), size| {
            (bytes.saturating_add(size), models + 1)
        })
}
