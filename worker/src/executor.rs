//! Runs validated requests on the backend: a bounded queue in front of `--max-concurrency`
//! slots, each forward pass on a blocking thread so a slow model never stalls the async runtime.
//! Also keeps the per-model statistics ModelStatistics reports.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use remotemedia_proto::inference::{InferStatistics, ModelStatistics, StatisticDuration};
use tokio::sync::Semaphore;

use crate::{
    backend::Backend,
    decode::InferRequest,
    error::ServiceError,
    metrics::{GaugeGuard, Metrics},
    tensor::OutputTensor,
};

/// Runs requests on one loaded model.
pub struct Executor {
    backend: Arc<dyn Backend>,
    slots: Arc<Semaphore>,
    max_queue: usize,
    queued: AtomicUsize,
    metrics: Metrics,
    stats: Arc<ModelStats>,
}

impl Executor {
    pub fn new(
        backend: Arc<dyn Backend>,
        max_concurrency: usize,
        max_queue: usize,
        metrics: Metrics,
        stats: Arc<ModelStats>,
    ) -> Self {
        Executor {
            backend,
            slots: Arc::new(Semaphore::new(max_concurrency)),
            max_queue,
            queued: AtomicUsize::new(0),
            metrics,
            stats,
        }
    }

    /// Waits for a slot (or refuses when the queue is full), then runs one forward pass.
    pub async fn infer(&self, request: InferRequest) -> Result<Vec<OutputTensor>, ServiceError> {
        let queued_at = Instant::now();
        // A free slot is taken at once; only a request that must wait takes a queue place. The
        // semaphore hands released slots to waiters first, so this does not overtake them.
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let _waiting = self.enter_queue()?;
                self.slots
                    .clone()
                    .acquire_owned()
                    .await
                    // Only a closed semaphore fails to give a permit, and this one never closes.
                    .map_err(|_| ServiceError::Panicked)?
            }
        };
        self.stats.record(Stat::Queue, queued_at.elapsed());

        let backend = Arc::clone(&self.backend);
        let running = GaugeGuard::new(&self.metrics.in_flight);
        let (result, elapsed) = tokio::task::spawn_blocking(move || {
            // The slot and gauge are released only when the pass ends, even if the client has
            // gone: the work is still using the CPU.
            let _slot = slot;
            let _running = running;
            let started = Instant::now();
            let result = backend.infer(&request.views());
            (result, started.elapsed())
        })
        .await
        .map_err(|_| ServiceError::Panicked)?;
        self.stats.record(Stat::Execution, elapsed);
        Ok(result?)
    }

    /// Admits a request to the queue unless `--max-queue` are already waiting.
    fn enter_queue(&self) -> Result<QueueGuard<'_>, ServiceError> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued < self.max_queue).then_some(queued + 1)
            })
            .map_err(ServiceError::QueueFull)?;
        Ok(QueueGuard {
            queued: &self.queued,
            _gauge: GaugeGuard::new(&self.metrics.queue_depth),
        })
    }
}

/// A place in the queue, given back when the request gets a slot or is cancelled.
struct QueueGuard<'a> {
    queued: &'a AtomicUsize,
    _gauge: GaugeGuard,
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a duration is recorded as.
#[derive(Debug, Clone, Copy)]
pub enum Stat {
    /// A request answered successfully, end to end.
    Success,
    /// A request that reached the model and failed, end to end.
    Failure,
    /// Time waiting for a slot.
    Queue,
    /// One forward pass.
    Execution,
}

#[derive(Debug, Default, Clone, Copy)]
struct Total {
    count: u64,
    ns: u64,
}

impl Total {
    fn add(&mut self, elapsed: Duration) {
        self.count += 1;
        self.ns = self
            .ns
            .saturating_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    fn proto(self) -> Option<StatisticDuration> {
        Some(StatisticDuration {
            count: self.count,
            ns: self.ns,
        })
    }
}

#[derive(Debug, Default)]
struct Totals {
    success: Total,
    failure: Total,
    queue: Total,
    execution: Total,
    last_inference_ms: u64,
}

/// Counts and durations for ModelStatistics.
#[derive(Debug, Default)]
pub struct ModelStats(Mutex<Totals>);

impl ModelStats {
    pub fn record(&self, stat: Stat, elapsed: Duration) {
        let mut totals = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match stat {
            Stat::Success => {
                totals.success.add(elapsed);
                totals.last_inference_ms = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |since| {
                        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
                    });
            }
            Stat::Failure => totals.failure.add(elapsed),
            Stat::Queue => totals.queue.add(elapsed),
            Stat::Execution => totals.execution.add(elapsed),
        }
    }

    /// The ModelStatistics entry for this model.
    pub fn snapshot(&self, name: &str, version: &str) -> ModelStatistics {
        let totals = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        ModelStatistics {
            name: name.to_owned(),
            version: version.to_owned(),
            last_inference: totals.last_inference_ms,
            inference_count: totals.success.count,
            execution_count: totals.execution.count,
            inference_stats: Some(InferStatistics {
                success: totals.success.proto(),
                fail: totals.failure.proto(),
                queue: totals.queue.proto(),
                compute_infer: totals.execution.proto(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{
        backend::{BackendError, ModelSource},
        tensor::{DataType, TensorView},
    };

    struct Gate(std::sync::Barrier);

    impl Backend for Gate {
        fn infer(&self, _: &[TensorView<'_>]) -> Result<Vec<OutputTensor>, BackendError> {
            self.0.wait();
            Ok(Vec::new())
        }
    }

    fn request() -> InferRequest {
        InferRequest {
            id: String::new(),
            inputs: vec![crate::decode::InputTensor {
                name: "INPUT0".into(),
                datatype: DataType::Uint8,
                shape: vec![1],
                data: bytes::Bytes::from_static(&[7]),
            }],
            outputs: vec![crate::decode::RequestedOutput {
                index: 0,
                shared_memory: None,
            }],
        }
    }

    fn executor(backend: Arc<dyn Backend>, max_queue: usize) -> (Executor, Arc<ModelStats>) {
        let metrics = Metrics::register(&mut Registry::default());
        let stats = Arc::new(ModelStats::default());
        (
            Executor::new(backend, 1, max_queue, metrics, stats.clone()),
            stats,
        )
    }

    #[tokio::test]
    async fn requests_beyond_the_queue_limit_are_refused() {
        // One slot, held by a pass that waits on the barrier; one queue place.
        let gate = Arc::new(Gate(std::sync::Barrier::new(2)));
        let (executor, _) = executor(gate.clone(), 1);
        let executor = Arc::new(executor);
        let running = tokio::spawn({
            let executor = executor.clone();
            async move { executor.infer(request()).await }
        });
        while executor.metrics.in_flight.get() == 0 {
            tokio::task::yield_now().await;
        }
        let queued = tokio::spawn({
            let executor = executor.clone();
            async move { executor.infer(request()).await }
        });
        while executor.metrics.queue_depth.get() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            executor.infer(request()).await,
            Err(ServiceError::QueueFull(1))
        ));
        // Release both passes.
        let release = {
            let gate = gate.clone();
            move || gate.0.wait()
        };
        tokio::task::spawn_blocking(release.clone()).await.unwrap();
        tokio::task::spawn_blocking(release).await.unwrap();
        running.await.unwrap().unwrap();
        queued.await.unwrap().unwrap();
        assert_eq!(executor.metrics.queue_depth.get(), 0);
    }

    #[tokio::test]
    async fn a_free_slot_needs_no_queue_place() {
        let backend: Arc<dyn Backend> = ModelSource::parse("builtin://identity")
            .unwrap()
            .load(crate::config::Device::Cpu, None)
            .unwrap()
            .into();
        let (executor, _) = executor(backend, 0);
        executor.infer(request()).await.unwrap();
    }

    #[tokio::test]
    async fn statistics_count_passes_and_queue_time() {
        let backend: Arc<dyn Backend> = ModelSource::parse("builtin://identity")
            .unwrap()
            .load(crate::config::Device::Cpu, None)
            .unwrap()
            .into();
        let (executor, stats) = executor(backend, 8);
        let outputs = executor.infer(request()).await.unwrap();
        assert_eq!(outputs[0].data.as_ref(), [7]);
        stats.record(Stat::Success, Duration::from_millis(2));
        let snapshot = stats.snapshot("identity", "1");
        assert_eq!(snapshot.execution_count, 1);
        assert_eq!(snapshot.inference_count, 1);
        let inference = snapshot.inference_stats.unwrap();
        assert_eq!(inference.queue.unwrap().count, 1);
        assert_eq!(inference.success.unwrap().ns, 2_000_000);
        assert!(snapshot.last_inference > 0);
    }
}
