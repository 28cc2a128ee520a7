//! Random sequences of gets, drops, releases, clears and time passing, against the invariants a
//! user relies on: one instance per model id, counted references, caps kept, models in use never
//! evicted, idle models gone after `ttl + sweep_interval` under TTL and kept otherwise.

use proptest::prelude::*;
use tokio::time::Instant;

use super::*;

const KEYS: [&str; 4] = ["a", "b", "c", "d"];

fn size(key: usize) -> u64 {
    50 * (key as u64 + 1)
}

#[derive(Debug, Clone)]
enum Op {
    Get(usize),
    Drop(usize),
    Advance(Duration),
    Release(usize),
    Clear,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS.len()).prop_map(Op::Get),
        3 => any::<usize>().prop_map(Op::Drop),
        2 => (0..40_000u64).prop_map(|ms| Op::Advance(Duration::from_millis(ms))),
        1 => (0..KEYS.len()).prop_map(Op::Release),
        1 => Just(Op::Clear),
    ]
}

fn config() -> impl Strategy<Value = RegistryConfig> {
    let policy = prop_oneof![
        Just(EvictionPolicy::Ttl),
        Just(EvictionPolicy::Lru),
        Just(EvictionPolicy::Lfu),
        Just(EvictionPolicy::Manual),
    ];
    let memory = prop_oneof![Just(None), Just(Some(250)), Just(Some(400))];
    let models = prop_oneof![Just(None), Just(Some(2)), Just(Some(3))];
    (policy, memory, models).prop_map(|(eviction_policy, max_memory_bytes, max_models)| {
        RegistryConfig {
            eviction_policy,
            ttl: TTL,
            sweep_interval: SWEEP,
            max_memory_bytes,
            max_models,
        }
    })
}

/// What the test knows from outside the registry.
struct World {
    config: RegistryConfig,
    registry: ModelRegistry,
    loads: Loads,
    held: Vec<(usize, ModelHandle<Model>)>,
    /// When each key last got or dropped a handle.
    last_touch: [Option<Instant>; KEYS.len()],
    gets: u64,
    refused_loads: usize,
}

impl World {
    fn listed(&self) -> Vec<usize> {
        self.registry
            .list_models()
            .iter()
            .map(|info| KEYS.iter().position(|k| *k == info.model_id).unwrap())
            .collect()
    }

    fn held_count(&self, key: usize) -> usize {
        self.held.iter().filter(|(k, _)| *k == key).count()
    }

    /// Loaded models that cannot be evicted to make room: those in use, or all under Manual.
    fn pinned(&self) -> (u64, usize) {
        let pinned: Vec<usize> = self
            .listed()
            .into_iter()
            .filter(|&k| {
                self.config.eviction_policy == EvictionPolicy::Manual || self.held_count(k) > 0
            })
            .collect();
        (pinned.iter().map(|&k| size(k)).sum(), pinned.len())
    }

    fn get(&mut self, runtime: &tokio::runtime::Runtime, key: usize) -> Result<(), TestCaseError> {
        let was_loaded = self.listed().contains(&key);
        let (pinned_bytes, pinned_models) = self.pinned();
        let loads_before = self.loads.count();
        self.gets += 1;
        let result = runtime.block_on(self.loads.get(&self.registry, KEYS[key], size(key)));
        match result {
            Ok(handle) => {
                if was_loaded {
                    prop_assert_eq!(self.loads.count(), loads_before, "loaded model reloaded");
                }
                for (_, other) in self.held.iter().filter(|(k, _)| *k == key) {
                    prop_assert!(Arc::ptr_eq(&other.inner, &handle.inner), "two instances");
                }
                self.held.push((key, handle));
                self.last_touch[key] = Some(Instant::now());
            }
            Err(RegistryError::OutOfMemory {
                needed, available, ..
            }) => {
                self.refused_loads += 1;
                let max = self.config.max_memory_bytes.unwrap();
                prop_assert!(!was_loaded);
                prop_assert_eq!(needed, size(key));
                prop_assert!(pinned_bytes + needed > max, "refused a load that fits");
                prop_assert_eq!(available, max - pinned_bytes);
            }
            Err(RegistryError::RegistryFull { max_models, .. }) => {
                self.refused_loads += 1;
                prop_assert!(!was_loaded);
                prop_assert_eq!(Some(max_models), self.config.max_models);
                prop_assert!(pinned_models >= max_models, "refused a load that fits");
            }
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
        Ok(())
    }

    fn check_invariants(&self) -> Result<(), TestCaseError> {
        let models = self.registry.list_models();
        for (key, id) in KEYS.iter().enumerate() {
            let listed = models.iter().find(|info| info.model_id == *id);
            let held = self.held_count(key);
            match listed {
                Some(info) => prop_assert_eq!(info.reference_count, held),
                None => prop_assert_eq!(held, 0, "model in use was evicted"),
            }
        }
        let metrics = self.registry.metrics();
        prop_assert_eq!(metrics.total_models, models.len());
        prop_assert_eq!(
            metrics.total_memory_bytes,
            models.iter().map(|info| info.memory_bytes).sum::<u64>()
        );
        if let Some(max) = self.config.max_memory_bytes {
            prop_assert!(metrics.total_memory_bytes <= max);
        }
        if let Some(max) = self.config.max_models {
            prop_assert!(metrics.total_models <= max);
        }
        prop_assert_eq!(metrics.cache_hits + metrics.cache_misses, self.gets);
        prop_assert_eq!(metrics.loads as usize, self.loads.count());
        prop_assert_eq!(
            self.loads.count(),
            models.len() + metrics.evictions as usize + self.refused_loads,
            "every load is loaded, evicted or refused"
        );
        if self.config.eviction_policy == EvictionPolicy::Ttl {
            let now = Instant::now();
            for key in self.listed() {
                if self.held_count(key) == 0 {
                    let idle = now - self.last_touch[key].unwrap();
                    prop_assert!(idle <= TTL + SWEEP, "{} idle for {idle:?}", KEYS[key]);
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn random_use_keeps_the_registry_invariants(
        config in config(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        // Makes `Instant::now` read the runtime's paused clock outside `block_on` too.
        let _entered = runtime.enter();
        let mut world = World {
            registry: ModelRegistry::new(config.clone()),
            config,
            loads: Loads::default(),
            held: Vec::new(),
            last_touch: [None; KEYS.len()],
            gets: 0,
            refused_loads: 0,
        };
        for op in ops {
            match op {
                Op::Get(key) => world.get(&runtime, key)?,
                Op::Drop(index) => {
                    if !world.held.is_empty() {
                        let (key, handle) = world.held.swap_remove(index % world.held.len());
                        drop(handle);
                        world.last_touch[key] = Some(Instant::now());
                    }
                }
                Op::Advance(by) => {
                    let before = world.listed();
                    runtime.block_on(tokio::time::sleep(by));
                    let after = world.listed();
                    if world.config.eviction_policy != EvictionPolicy::Ttl {
                        prop_assert_eq!(after, before, "evicted without pressure");
                    } else {
                        let now = Instant::now();
                        for key in before.into_iter().filter(|k| !after.contains(k)) {
                            let idle = now - world.last_touch[key].unwrap();
                            prop_assert!(idle > TTL, "{} expired after {idle:?}", KEYS[key]);
                        }
                    }
                }
                Op::Release(key) => {
                    let listed = world.listed().contains(&key);
                    let held = world.held_count(key);
                    match world.registry.release(KEYS[key]) {
                        Ok(true) => prop_assert!(listed && held == 0),
                        Ok(false) => prop_assert!(!listed),
                        Err(RegistryError::InUse { reference_count, .. }) => {
                            prop_assert_eq!(reference_count, held)
                        }
                        Err(other) => prop_assert!(false, "unexpected error {other}"),
                    }
                }
                Op::Clear => {
                    world.registry.clear();
                    let mut in_use: Vec<usize> = world.held.iter().map(|(k, _)| *k).collect();
                    in_use.sort_unstable();
                    in_use.dedup();
                    prop_assert_eq!(world.listed(), in_use);
                }
            }
            world.check_invariants()?;
        }
    }
}
