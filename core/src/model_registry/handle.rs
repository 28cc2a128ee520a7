//! Handles to loaded models, and the per-model use counts behind them.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::RegistryError;

/// How one loaded model is used: shared by the registry's entry and every handle to it, so that
/// taking and dropping handles never needs the registry's lock.
pub(super) struct Usage {
    model_id: Box<str>,
    refs: AtomicUsize,
    /// Nanoseconds from `epoch` to the latest hand-out or drop of a handle.
    last_accessed: AtomicU64,
    /// Handles handed out, for LFU.
    accesses: AtomicU64,
    epoch: Instant,
}

impl Usage {
    /// The use count of a model just loaded: one reference, held by the load's result until
    /// every waiting caller has taken its own handle, so the model cannot be evicted before.
    pub(super) fn new_held(model_id: &str, epoch: Instant) -> (Arc<Self>, Lease) {
        let usage = Arc::new(Self {
            model_id: model_id.into(),
            refs: AtomicUsize::new(1),
            last_accessed: AtomicU64::new(nanos_since(epoch, Instant::now())),
            accesses: AtomicU64::new(0),
            epoch,
        });
        (Arc::clone(&usage), Lease(usage))
    }

    /// Counts one more handle. Callers hold the registry's lock (read is enough), so that no
    /// eviction, which takes it for writing, can see the model idle while it is being handed out.
    pub(super) fn acquire(self: &Arc<Self>) -> Lease {
        self.refs.fetch_add(1, Ordering::Relaxed);
        self.accesses.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Lease(Arc::clone(self))
    }

    fn touch(&self) {
        let now = nanos_since(self.epoch, Instant::now());
        self.last_accessed.fetch_max(now, Ordering::Relaxed);
    }

    pub(super) fn reference_count(&self) -> usize {
        // Acquire pairs with the release in `Lease::drop`: whoever sees the count reach zero
        // also sees the `last_accessed` that drop stored before decrementing.
        self.refs.load(Ordering::Acquire)
    }

    pub(super) fn accesses(&self) -> u64 {
        self.accesses.load(Ordering::Relaxed)
    }

    /// Time from the registry's epoch to the last hand-out or drop.
    pub(super) fn last_accessed(&self) -> Duration {
        Duration::from_nanos(self.last_accessed.load(Ordering::Relaxed))
    }

    /// How long the model has been idle at `now`, or `None` while a handle uses it.
    pub(super) fn idle_for(&self, now: Instant) -> Option<Duration> {
        (self.reference_count() == 0).then(|| {
            Duration::from_nanos(nanos_since(self.epoch, now)).saturating_sub(self.last_accessed())
        })
    }
}

fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    // u64 nanoseconds last 584 years, so saturating never changes a real value.
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// One counted reference to a loaded model; dropping the last one makes the model idle.
pub(super) struct Lease(Arc<Usage>);

impl Clone for Lease {
    fn clone(&self) -> Self {
        self.0.acquire()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Stamp the time before decrementing, so the model is never seen idle with the
        // timestamp of an earlier idle period (the sweeper would evict it at once).
        self.0.touch();
        self.0.refs.fetch_sub(1, Ordering::Release);
    }
}

/// A loaded model without its type: what a load hands to the callers waiting for it.
#[derive(Clone)]
pub(super) struct ErasedHandle {
    pub(super) model: Arc<dyn Any + Send + Sync>,
    pub(super) type_name: &'static str,
    pub(super) lease: Lease,
}

impl ErasedHandle {
    pub(super) fn into_typed<T: Send + Sync + 'static>(
        self,
    ) -> Result<ModelHandle<T>, RegistryError> {
        let Self {
            model,
            type_name,
            lease,
        } = self;
        match model.downcast::<T>() {
            Ok(inner) => Ok(ModelHandle { inner, lease }),
            Err(_) => Err(RegistryError::TypeMismatch {
                model_id: lease.0.model_id.to_string(),
                loaded: type_name,
                requested: std::any::type_name::<T>(),
            }),
        }
    }
}

/// A counted reference to a model held by a [`ModelRegistry`](super::ModelRegistry).
///
/// While any handle (or clone of one) lives, the model is in use and never evicted; dropping the
/// last one makes it idle. Clone the handle rather than `inner` to keep the model counted as in
/// use: an `Arc` cloned out of `inner` keeps the instance alive but not registered.
pub struct ModelHandle<T> {
    /// The shared instance: every handle for one model id points to the same one.
    pub inner: Arc<T>,
    lease: Lease,
}

impl<T> ModelHandle<T> {
    /// The model.
    pub fn model(&self) -> &T {
        &self.inner
    }

    /// The id the model was loaded under.
    pub fn model_id(&self) -> &str {
        &self.lease.0.model_id
    }
}

impl<T> Clone for ModelHandle<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            lease: self.lease.clone(),
        }
    }
}

impl<T> fmt::Debug for ModelHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelHandle")
            .field("model_id", &self.model_id())
            .field("reference_count", &self.lease.0.reference_count())
            .finish_non_exhaustive()
    }
}
