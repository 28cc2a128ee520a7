use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Barrier;

use super::*;

#[derive(Debug)]
struct Model {
    bytes: Option<u64>,
}

impl RegistryModel for Model {
    fn memory_usage(&self) -> Option<u64> {
        self.bytes
    }
}

#[derive(Debug)]
struct OtherModel;

impl RegistryModel for OtherModel {}

const TTL: Duration = Duration::from_secs(30);
const SWEEP: Duration = Duration::from_secs(5);

fn registry(configure: impl FnOnce(&mut RegistryConfig)) -> Arc<ModelRegistry> {
    let mut config = RegistryConfig {
        ttl: TTL,
        sweep_interval: SWEEP,
        ..RegistryConfig::default()
    };
    configure(&mut config);
    Arc::new(ModelRegistry::new(config))
}

/// Counts loader runs from outside the registry.
#[derive(Clone, Default)]
struct Loads(Arc<AtomicUsize>);

impl Loads {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    async fn get(
        &self,
        registry: &ModelRegistry,
        model_id: &str,
        bytes: u64,
    ) -> Result<ModelHandle<Model>, RegistryError> {
        let loads = Arc::clone(&self.0);
        registry
            .get_or_load_async(model_id, move || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok::<_, io::Error>(Model { bytes: Some(bytes) })
            })
            .await
    }
}

fn loaded_ids(registry: &ModelRegistry) -> Vec<String> {
    registry
        .list_models()
        .into_iter()
        .map(|info| info.model_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_callers_share_one_load_and_one_instance() {
    let registry = registry(|_| {});
    let loads = Loads::default();
    let start = Arc::new(Barrier::new(100));
    let callers: Vec<_> = (0..100)
        .map(|_| {
            let (registry, loads, start) = (registry.clone(), loads.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let counter = Arc::clone(&loads.0);
                registry
                    .get_or_load("whisper-base", move || {
                        counter.fetch_add(1, Ordering::SeqCst);
                        // Slow enough that every caller arrives while the load runs.
                        std::thread::sleep(Duration::from_millis(200));
                        Ok::<_, io::Error>(Model { bytes: Some(10) })
                    })
                    .await
            })
        })
        .collect();
    let mut handles = Vec::new();
    for caller in callers {
        handles.push(caller.await.unwrap().unwrap());
    }

    assert_eq!(loads.count(), 1);
    assert!(
        handles
            .iter()
            .all(|h| Arc::ptr_eq(&h.inner, &handles[0].inner))
    );
    let models = registry.list_models();
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].reference_count, 100);
    let metrics = registry.metrics();
    assert_eq!(metrics.loads, 1);
    assert_eq!(metrics.cache_hits + metrics.cache_misses, 100);
    assert_eq!(metrics.total_memory_bytes, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_loader_fails_every_waiter_and_the_next_call_loads_again() {
    let registry = registry(|_| {});
    let attempts = Arc::new(AtomicUsize::new(0));
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let (registry, attempts) = (registry.clone(), attempts.clone());
            tokio::spawn(async move {
                registry
                    .get_or_load("vad", move || {
                        attempts.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(100));
                        Err::<Model, _>(io::Error::other("weights file is truncated"))
                    })
                    .await
            })
        })
        .collect();
    let mut sources = Vec::new();
    for waiter in waiters {
        match waiter.await.unwrap() {
            Err(RegistryError::LoadFailed { model_id, source }) => {
                assert_eq!(model_id, "vad");
                assert_eq!(source.to_string(), "weights file is truncated");
                sources.push(source);
            }
            other => panic!("expected LoadFailed, got {other:?}"),
        }
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert!(sources.iter().all(|s| Arc::ptr_eq(s, &sources[0])));
    assert!(registry.list_models().is_empty());

    let loads = Loads::default();
    let handle = loads.get(&registry, "vad", 1).await.unwrap();
    assert_eq!(loads.count(), 1);
    assert_eq!(handle.model_id(), "vad");
    assert_eq!(loaded_ids(&registry), ["vad"]);
}

#[tokio::test]
async fn panicking_loader_is_an_error_and_leaves_the_key_loadable() {
    let registry = registry(|_| {});
    let error = registry
        .get_or_load::<Model, io::Error, _>("vad", || panic!("loader bug"))
        .await
        .unwrap_err();
    assert!(matches!(error, RegistryError::LoaderPanicked { ref model_id } if model_id == "vad"));

    let loads = Loads::default();
    loads.get(&registry, "vad", 1).await.unwrap();
    assert_eq!(loads.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn idle_model_is_evicted_within_ttl_plus_sweep_interval() {
    let registry = registry(|_| {});
    let handle = Loads::default().get(&registry, "vad", 1).await.unwrap();
    tokio::time::sleep(TTL * 3).await;
    assert_eq!(loaded_ids(&registry), ["vad"], "in use, so never expires");

    drop(handle);
    tokio::time::sleep(TTL - Duration::from_millis(1)).await;
    assert_eq!(loaded_ids(&registry), ["vad"], "not idle for ttl yet");
    // The model expires when idle *longer* than ttl; the first sweep after that evicts it.
    tokio::time::sleep(SWEEP + Duration::from_millis(2)).await;
    assert!(registry.list_models().is_empty());
    assert_eq!(registry.metrics().evictions, 1);
}

#[tokio::test(start_paused = true)]
async fn a_get_resets_the_idle_clock() {
    let registry = registry(|_| {});
    let loads = Loads::default();
    drop(loads.get(&registry, "vad", 1).await.unwrap());
    tokio::time::sleep(TTL - SWEEP).await;
    drop(loads.get(&registry, "vad", 1).await.unwrap());
    tokio::time::sleep(TTL - SWEEP).await;
    assert_eq!(loaded_ids(&registry), ["vad"]);
    assert_eq!(loads.count(), 1);
}

#[tokio::test]
async fn lru_evicts_the_least_recently_used_idle_model_under_a_memory_cap() {
    let registry = registry(|c| {
        c.eviction_policy = EvictionPolicy::Lru;
        c.max_memory_bytes = Some(300);
    });
    let loads = Loads::default();
    for id in ["a", "b", "c"] {
        drop(loads.get(&registry, id, 100).await.unwrap());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(loads.get(&registry, "a", 100).await.unwrap());

    drop(loads.get(&registry, "d", 100).await.unwrap());
    assert_eq!(loaded_ids(&registry), ["a", "c", "d"]);
    drop(loads.get(&registry, "e", 100).await.unwrap());
    assert_eq!(loaded_ids(&registry), ["a", "d", "e"]);
    assert_eq!(registry.metrics().evictions, 2);
    assert_eq!(registry.metrics().total_memory_bytes, 300);
}

#[tokio::test]
async fn lfu_evicts_the_least_often_used_idle_model_under_a_model_cap() {
    let registry = registry(|c| {
        c.eviction_policy = EvictionPolicy::Lfu;
        c.max_models = Some(2);
    });
    let loads = Loads::default();
    for _ in 0..3 {
        drop(loads.get(&registry, "often", 1).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(2)).await;
    drop(loads.get(&registry, "rare", 1).await.unwrap());

    drop(loads.get(&registry, "new", 1).await.unwrap());
    assert_eq!(loaded_ids(&registry), ["new", "often"]);
}

#[tokio::test]
async fn a_model_in_use_survives_memory_pressure() {
    let registry = registry(|c| c.max_memory_bytes = Some(200));
    let loads = Loads::default();
    let held = loads.get(&registry, "held", 100).await.unwrap();
    drop(loads.get(&registry, "idle", 100).await.unwrap());

    let _new = loads.get(&registry, "new", 100).await.unwrap();
    assert_eq!(loaded_ids(&registry), ["held", "new"]);
    assert_eq!(held.model().bytes, Some(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_reaches_every_waiter_when_nothing_idle_can_go() {
    let registry = registry(|c| c.max_memory_bytes = Some(250));
    let loads = Loads::default();
    let _held = loads.get(&registry, "held", 100).await.unwrap();
    drop(loads.get(&registry, "idle", 100).await.unwrap());

    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let registry = registry.clone();
            tokio::spawn(async move {
                registry
                    .get_or_load("big", || {
                        std::thread::sleep(Duration::from_millis(50));
                        Ok::<_, io::Error>(Model { bytes: Some(200) })
                    })
                    .await
            })
        })
        .collect();
    for waiter in waiters {
        match waiter.await.unwrap() {
            Err(RegistryError::OutOfMemory {
                needed, available, ..
            }) => assert_eq!((needed, available), (200, 150)),
            other => panic!("expected OutOfMemory, got {other:?}"),
        }
    }
    assert_eq!(
        loaded_ids(&registry),
        ["held", "idle"],
        "nothing is evicted for a load that cannot fit anyway"
    );
    assert_eq!(registry.metrics().evictions, 0);
}

#[tokio::test]
async fn registry_full_when_every_model_is_in_use() {
    let registry = registry(|c| c.max_models = Some(1));
    let loads = Loads::default();
    let held = loads.get(&registry, "a", 1).await.unwrap();
    let error = loads.get(&registry, "b", 1).await.unwrap_err();
    assert!(matches!(
        error,
        RegistryError::RegistryFull { max_models: 1, .. }
    ));

    drop(held);
    loads.get(&registry, "b", 1).await.unwrap();
    assert_eq!(loaded_ids(&registry), ["b"]);
}

#[tokio::test(start_paused = true)]
async fn manual_policy_unloads_only_when_asked() {
    let registry = registry(|c| {
        c.eviction_policy = EvictionPolicy::Manual;
        c.max_models = Some(1);
    });
    let loads = Loads::default();
    drop(loads.get(&registry, "a", 1).await.unwrap());
    tokio::time::sleep(TTL * 10).await;
    assert_eq!(loaded_ids(&registry), ["a"]);
    assert!(matches!(
        loads.get(&registry, "b", 1).await,
        Err(RegistryError::RegistryFull { .. })
    ));

    assert_eq!(registry.evict_expired(), 1);
    assert!(registry.list_models().is_empty());
}

#[tokio::test]
async fn release_unloads_an_idle_model_and_refuses_one_in_use() {
    let registry = registry(|_| {});
    let loads = Loads::default();
    let handle = loads.get(&registry, "vad", 1).await.unwrap();
    let second = handle.clone();
    assert!(matches!(
        registry.release("vad"),
        Err(RegistryError::InUse {
            reference_count: 2,
            ..
        })
    ));
    drop((handle, second));
    assert!(registry.release("vad").unwrap());
    assert!(!registry.release("vad").unwrap());
    loads.get(&registry, "vad", 1).await.unwrap();
    assert_eq!(loads.count(), 2, "released, so loaded again");
}

#[tokio::test]
async fn clear_unloads_idle_models_only() {
    let registry = registry(|_| {});
    let loads = Loads::default();
    let _held = loads.get(&registry, "held", 1).await.unwrap();
    drop(loads.get(&registry, "idle", 1).await.unwrap());
    assert_eq!(registry.clear(), 1);
    assert_eq!(loaded_ids(&registry), ["held"]);
}

#[tokio::test]
async fn asking_for_a_model_as_another_type_is_refused() {
    let registry = registry(|_| {});
    let _whisper = Loads::default().get(&registry, "whisper", 1).await.unwrap();
    let error = registry
        .get_or_load("whisper", || Ok::<_, io::Error>(OtherModel))
        .await
        .unwrap_err();
    match error {
        RegistryError::TypeMismatch {
            loaded, requested, ..
        } => {
            assert!(loaded.ends_with("::Model"), "{loaded}");
            assert!(requested.ends_with("::OtherModel"), "{requested}");
        }
        other => panic!("expected TypeMismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn size_hint_counts_for_models_that_cannot_report_memory() {
    let registry = registry(|c| c.max_memory_bytes = Some(100));
    let unsized_model = || Ok::<_, io::Error>(Model { bytes: None });
    let _a = registry
        .with_size_hint(60)
        .get_or_load("a", unsized_model)
        .await
        .unwrap();
    assert_eq!(registry.metrics().total_memory_bytes, 60);
    let error = registry
        .with_size_hint(60)
        .get_or_load_async("b", move || async move { unsized_model() })
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        RegistryError::OutOfMemory {
            needed: 60,
            available: 40,
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_load_finishes_for_later_callers_when_its_caller_gives_up() {
    let registry = registry(|_| {});
    let loads = Loads::default();
    let counter = Arc::clone(&loads.0);
    let slow = registry.get_or_load_async("slow", move || async move {
        counter.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok::<_, io::Error>(Model { bytes: Some(1) })
    });
    assert!(
        tokio::time::timeout(Duration::from_secs(1), slow)
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(loaded_ids(&registry), ["slow"]);
    assert_eq!(registry.list_models()[0].reference_count, 0);
    loads.get(&registry, "slow", 1).await.unwrap();
    assert_eq!(loads.count(), 1);
}

#[tokio::test]
async fn metrics_and_listing_follow_hits_misses_and_references() {
    let registry = registry(|_| {});
    let loads = Loads::default();
    let first = loads.get(&registry, "vad", 7).await.unwrap();
    let second = loads.get(&registry, "vad", 7).await.unwrap();
    let third = second.clone();
    drop(loads.get(&registry, "vad", 7).await.unwrap());

    let metrics = registry.metrics();
    assert_eq!((metrics.cache_hits, metrics.cache_misses), (2, 1));
    assert!((metrics.hit_rate - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!((metrics.total_models, metrics.total_memory_bytes), (1, 7));
    let info = &registry.list_models()[0];
    assert_eq!(info.model_id, "vad");
    assert_eq!(info.memory_bytes, 7);
    assert_eq!(info.reference_count, 3);
    assert!(info.last_accessed >= info.loaded_at);

    drop((first, second, third));
    assert_eq!(registry.list_models()[0].reference_count, 0);
}

#[test]
fn loading_outside_a_tokio_runtime_is_an_error() {
    let registry = registry(|_| {});
    let mut load = std::pin::pin!(registry.get_or_load("vad", || Ok::<_, io::Error>(OtherModel)));
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match load.as_mut().poll(&mut context) {
        std::task::Poll::Ready(Err(RegistryError::NoRuntime { model_id })) => {
            assert_eq!(model_id, "vad")
        }
        other => panic!("expected NoRuntime, got {:?}", other.map(|r| r.map(drop))),
    }
}

#[test]
fn the_global_registry_is_one_instance_and_cannot_be_reconfigured_after_use() {
    assert!(std::ptr::eq(
        ModelRegistry::global(),
        ModelRegistry::global()
    ));
    assert!(matches!(
        ModelRegistry::init_global(RegistryConfig::default()),
        Err(RegistryError::GlobalAlreadyInitialized)
    ));
}

mod properties;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_is_idle_as_soon_as_the_only_caller_drops_its_handle_after_a_load() {
    // The load's task publishes a handle of its own to the waiters; it must be gone by the time
    // the caller returns, or a model nobody holds still counts as in use for a moment.
    let registry = registry(|config| config.eviction_policy = EvictionPolicy::Manual);
    for round in 0..200 {
        let handle = registry
            .get_or_load("m", || Ok::<_, io::Error>(Model { bytes: None }))
            .await
            .expect("loads");
        drop(handle);
        assert_eq!(
            registry.clear(),
            1,
            "round {round}: the model still counted as in use"
        );
    }
}
