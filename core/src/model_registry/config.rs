//! How a registry decides which idle models to unload.

use std::time::Duration;

/// Which idle models a registry unloads, and in what order under a memory or model-count cap.
///
/// Models in use (a live [`ModelHandle`](super::ModelHandle)) are never unloaded, whatever the
/// policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// The background sweeper unloads a model once it has been idle longer than
    /// [`RegistryConfig::ttl`]; under a cap, the longest-idle model goes first.
    #[default]
    Ttl,
    /// Idle models stay loaded until a cap would be exceeded; then the least recently used goes
    /// first.
    Lru,
    /// Idle models stay loaded until a cap would be exceeded; then the one handed out the fewest
    /// times goes first (ties: least recently used).
    Lfu,
    /// Nothing is unloaded unless asked: [`release`](super::ModelRegistry::release),
    /// [`evict_expired`](super::ModelRegistry::evict_expired), [`clear`](super::ModelRegistry::clear).
    /// A load that would exceed a cap fails instead of making room.
    Manual,
}

/// A registry's limits and eviction policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Which idle models go, and in what order.
    pub eviction_policy: EvictionPolicy,
    /// How long a model may stay idle before it expires (default 30 s).
    pub ttl: Duration,
    /// How often the background sweeper looks for expired models under
    /// [`EvictionPolicy::Ttl`] (default 5 s); an idle model is gone within `ttl + sweep_interval`.
    /// Zero is treated as 1 ms, since a timer cannot tick at a zero period.
    pub sweep_interval: Duration,
    /// The most bytes all loaded models may report together (`None`: no cap).
    pub max_memory_bytes: Option<u64>,
    /// The most models loaded at once (`None`: no cap).
    pub max_models: Option<usize>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            eviction_policy: EvictionPolicy::Ttl,
            ttl: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(5),
            max_memory_bytes: None,
            max_models: None,
        }
    }
}
