//! Runs validated requests on the backend: a bounded queue in front of `--instances` executor
//! threads. Each executor takes the oldest queued request, gathers the queued requests that can
//! share its forward pass (dynamic batching, see [`crate::batcher`]), waits up to the batch
//! delay for more, runs the pass and answers each request. Forward passes run on these threads,
//! never on the async runtime, and however many clients call at once no more than `--instances`
//! passes compete for the cores. Also keeps the per-model statistics ModelStatistics reports.

use std::{
    collections::VecDeque,
    io,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use remotemedia_proto::inference::{InferStatistics, ModelStatistics, StatisticDuration};
use tokio::sync::oneshot;

use crate::{
    backend::Backend,
    batcher::{BatchKey, BatchPolicy, batch_shape, concatenate, split},
    decode::InferRequest,
    error::ServiceError,
    metrics::{GaugeGuard, Metrics},
    tensor::OutputTensor,
};

/// How many executors run, and how much work they take on.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Executor threads.
    pub instances: usize,
    /// Requests in forward passes at once, over all executors.
    pub max_concurrency: usize,
    /// Requests waiting for an executor; more are refused.
    pub max_queue: usize,
}

/// Runs requests on one loaded model; the executor threads stop when it is dropped.
pub struct Executor {
    shared: Arc<Shared>,
}

struct Shared {
    backend: Arc<dyn Backend>,
    policy: BatchPolicy,
    limits: Limits,
    state: Mutex<State>,
    /// Signalled whenever the queue or the running count changes.
    changed: Condvar,
    metrics: Metrics,
    stats: Arc<ModelStats>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Pending>,
    /// Executors waiting for work: a request one of them takes at once needs no queue place.
    idle: usize,
    /// Requests in forward passes now.
    running: usize,
    stopped: bool,
}

/// A request waiting for an executor.
struct Pending {
    request: InferRequest,
    /// Its batch key and rows; `None` when it runs alone.
    shape: Option<(BatchKey, usize)>,
    enqueued: Instant,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Vec<OutputTensor>, ServiceError>>,
}

impl Executor {
    /// Starts `limits.instances` executor threads over `backend`.
    pub fn start(
        backend: Arc<dyn Backend>,
        policy: BatchPolicy,
        limits: Limits,
        metrics: Metrics,
        stats: Arc<ModelStats>,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            backend,
            policy,
            limits,
            state: Mutex::default(),
            changed: Condvar::new(),
            metrics,
            stats,
        });
        for index in 0..limits.instances {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("executor-{index}"))
                .spawn(move || {
                    while let Some(batch) = shared.next_batch() {
                        shared.run(batch);
                    }
                })?;
        }
        Ok(Executor { shared })
    }

    /// Queues `request` (or refuses it when the queue is full) and waits for its outputs, at
    /// most until `deadline`: a request still queued then is answered DEADLINE_EXCEEDED and
    /// never runs.
    pub async fn infer(
        &self,
        request: InferRequest,
        deadline: Option<Instant>,
    ) -> Result<Vec<OutputTensor>, ServiceError> {
        let shared = &self.shared;
        if deadline.is_some_and(|deadline| deadline <= Instant::now()) {
            return Err(ServiceError::DeadlineExceeded);
        }
        let shape = (shared.policy.max_batch_size > 1)
            .then(|| batch_shape(&request))
            .flatten();
        let (reply, answer) = oneshot::channel();
        {
            let mut state = shared.lock();
            if state.queue.len() >= shared.limits.max_queue + state.idle {
                return Err(ServiceError::QueueFull(shared.limits.max_queue));
            }
            state.queue.push_back(Pending {
                request,
                shape,
                enqueued: Instant::now(),
                deadline,
                reply,
            });
            shared.queue_changed(&state);
        }
        shared.changed.notify_all();
        let answer = match deadline {
            // Dropping `answer` at the deadline tells the executors to skip the request.
            Some(deadline) => tokio::time::timeout_at(deadline.into(), answer)
                .await
                .map_err(|_| ServiceError::DeadlineExceeded)?,
            None => answer.await,
        };
        // The reply is only dropped unanswered when the executors stopped.
        answer.map_err(|_| ServiceError::Panicked)?
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.changed.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue_changed(&self, state: &State) {
        self.metrics
            .queue_depth
            .set(i64::try_from(state.queue.len()).unwrap_or(i64::MAX));
    }

    /// Blocks until a batch is ready to run: the oldest queued request and those that can join
    /// it, once the batch is full or the oldest has waited the batch delay. `None` once stopped.
    fn next_batch(&self) -> Option<Vec<Pending>> {
        let mut state = self.lock();
        loop {
            if state.stopped {
                return None;
            }
            let now = Instant::now();
            self.drop_abandoned(&mut state, now);
            if state.queue.is_empty() {
                state.idle += 1;
                state = self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                state.idle -= 1;
                continue;
            }
            let capacity = self.limits.max_concurrency.saturating_sub(state.running);
            if capacity == 0 {
                state = self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let (picked, full) = self.gather(&state.queue, capacity);
            let ready_at = state.queue[0].enqueued + self.policy.max_queue_delay;
            if !full && now < ready_at {
                state = self
                    .changed
                    .wait_timeout(state, ready_at - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            // `picked` ascends: removing from the back keeps the other indices valid.
            let mut batch: Vec<Pending> = picked
                .into_iter()
                .rev()
                .filter_map(|index| state.queue.remove(index))
                .collect();
            batch.reverse();
            state.running += batch.len();
            self.queue_changed(&state);
            return Some(batch);
        }
    }

    /// Removes the requests whose client gave up or whose deadline passed: they never run.
    fn drop_abandoned(&self, state: &mut State, now: Instant) {
        let before = state.queue.len();
        let queue = std::mem::take(&mut state.queue);
        for pending in queue {
            if pending.deadline.is_some_and(|deadline| deadline <= now) {
                let _ = pending.reply.send(Err(ServiceError::DeadlineExceeded));
            } else if !pending.reply.is_closed() {
                state.queue.push_back(pending);
            }
        }
        if state.queue.len() != before {
            self.queue_changed(state);
        }
    }

    /// Indices of the queued requests that join the oldest one's pass (the oldest first, then in
    /// queue order: same key, rows within the max batch size, at most `capacity` requests), and
    /// whether that batch can grow no further.
    fn gather(&self, queue: &VecDeque<Pending>, capacity: usize) -> (Vec<usize>, bool) {
        let mut picked = vec![0];
        let Some((key, mut rows)) = queue[0].shape.as_ref().map(|(key, rows)| (key, *rows)) else {
            return (picked, true);
        };
        let max = self.policy.max_batch_size;
        for (index, pending) in queue.iter().enumerate().skip(1) {
            if rows >= max || picked.len() >= capacity {
                break;
            }
            if let Some((other, other_rows)) = &pending.shape
                && other == key
                && rows + other_rows <= max
            {
                picked.push(index);
                rows += other_rows;
            }
        }
        let full = rows >= max || picked.len() >= capacity;
        (picked, full)
    }

    /// Runs one batch and answers each of its requests.
    fn run(&self, batch: Vec<Pending>) {
        let started = Instant::now();
        for pending in &batch {
            let waited = started.saturating_duration_since(pending.enqueued);
            self.stats.record(Stat::Queue, waited);
            self.metrics.queue_delay.observe(waited.as_secs_f64());
        }
        self.metrics.batch_size.observe(batch.len() as f64);
        let results = {
            let _running = GaugeGuard::new(&self.metrics.in_flight);
            match batch.as_slice() {
                // Alone, the request's inputs go to the model where they are: in the received
                // message or the client's shared memory.
                [pending] => vec![self.pass(&pending.request)],
                _ => self.batched_pass(&batch),
            }
        };
        let count = batch.len();
        for (pending, result) in batch.into_iter().zip(results) {
            // A client that gave up gets nothing; the pass already ran.
            let _ = pending.reply.send(result);
        }
        self.lock().running -= count;
        self.changed.notify_all();
    }

    /// One forward pass over several requests: inputs concatenated, outputs split back.
    fn batched_pass(&self, batch: &[Pending]) -> Vec<Result<Vec<OutputTensor>, ServiceError>> {
        let requests: Vec<&InferRequest> = batch.iter().map(|pending| &pending.request).collect();
        let rows: Vec<usize> = batch
            .iter()
            .map(|pending| pending.shape.as_ref().map_or(1, |(_, rows)| *rows))
            .collect();
        let (inputs, copied) = concatenate(&requests);
        self.metrics.batch_copied_bytes.inc_by(copied as u64);
        match self
            .pass(&inputs)
            .and_then(|outputs| split(outputs, &rows).map_err(ServiceError::from))
        {
            Ok(parts) => parts.into_iter().map(Ok).collect(),
            // One request may be what the model refused: each runs alone for its own answer.
            Err(error) => {
                tracing::debug!(%error, requests = batch.len(), "batched pass failed; running its requests one by one");
                requests
                    .into_iter()
                    .map(|request| self.pass(request))
                    .collect()
            }
        }
    }

    fn pass(&self, request: &InferRequest) -> Result<Vec<OutputTensor>, ServiceError> {
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| self.backend.infer(&request.views())));
        self.stats.record(Stat::Execution, started.elapsed());
        result
            .map_err(|_| ServiceError::Panicked)?
            .map_err(ServiceError::from)
    }
}

/// What a duration is recorded as.
#[derive(Debug, Clone, Copy)]
pub enum Stat {
    /// A request answered successfully, end to end.
    Success,
    /// A request that reached the model and failed, end to end.
    Failure,
    /// Time waiting for an executor.
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
    use std::sync::Barrier;

    use bytes::Bytes;
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{
        backend::{BackendError, ModelSource},
        decode::InputTensor,
        tensor::{DataType, TensorView},
    };

    /// Returns its one input as `y`, records each pass's rows and input address, refuses inputs
    /// holding 0xFF, and first waits on `gate` when it has one.
    #[derive(Default)]
    struct Echo {
        passes: Mutex<Vec<(usize, usize)>>,
        gate: Option<Barrier>,
    }

    impl Echo {
        fn gated() -> Self {
            Echo {
                gate: Some(Barrier::new(2)),
                ..Echo::default()
            }
        }

        fn passes(&self) -> Vec<(usize, usize)> {
            self.passes.lock().unwrap().clone()
        }
    }

    impl Backend for Echo {
        fn infer(&self, inputs: &[TensorView<'_>]) -> Result<Vec<OutputTensor>, BackendError> {
            if let Some(gate) = &self.gate {
                gate.wait();
            }
            let input = &inputs[0];
            self.passes
                .lock()
                .unwrap()
                .push((input.shape[0], input.data.as_ptr() as usize));
            if input.data.contains(&0xFF) {
                return Err(BackendError::InvalidInput("0xFF".into()));
            }
            Ok(vec![OutputTensor {
                name: "y".into(),
                datatype: input.datatype,
                shape: input.shape.to_vec(),
                data: Bytes::copy_from_slice(input.data),
            }])
        }
    }

    fn request(shape: &[usize], fill: u8) -> InferRequest {
        InferRequest {
            id: String::new(),
            inputs: vec![InputTensor {
                name: "x".into(),
                datatype: DataType::Uint8,
                shape: shape.to_vec(),
                data: Bytes::from(vec![fill; shape.iter().product()]),
            }],
            outputs: Vec::new(),
        }
    }

    fn start(
        backend: Arc<dyn Backend>,
        max_batch_size: usize,
        delay: Duration,
        max_queue: usize,
    ) -> (Arc<Executor>, Arc<ModelStats>) {
        let metrics = Metrics::register(&mut Registry::default());
        let stats = Arc::new(ModelStats::default());
        let policy = BatchPolicy {
            max_batch_size,
            max_queue_delay: delay,
        };
        let limits = Limits {
            instances: 1,
            max_concurrency: 100,
            max_queue,
        };
        let executor = Executor::start(backend, policy, limits, metrics, stats.clone()).unwrap();
        (Arc::new(executor), stats)
    }

    fn spawn(
        executor: &Arc<Executor>,
        request: InferRequest,
        deadline: Option<Instant>,
    ) -> tokio::task::JoinHandle<Result<Vec<OutputTensor>, ServiceError>> {
        let executor = executor.clone();
        tokio::spawn(async move { executor.infer(request, deadline).await })
    }

    async fn until(condition: impl Fn() -> bool) {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Lets a gated pass go on, from a blocking thread.
    async fn release(echo: &Arc<Echo>) {
        let echo = echo.clone();
        tokio::task::spawn_blocking(move || echo.gate.as_ref().unwrap().wait())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn requests_beyond_the_queue_limit_are_refused_until_it_drains() {
        let echo = Arc::new(Echo::gated());
        let (executor, _) = start(echo.clone(), 1, Duration::ZERO, 1);
        let metrics = executor.shared.metrics.clone();
        let running = spawn(&executor, request(&[1], 1), None);
        until(|| metrics.in_flight.get() == 1).await;
        let queued = spawn(&executor, request(&[1], 2), None);
        until(|| metrics.queue_depth.get() == 1).await;
        assert!(matches!(
            executor.infer(request(&[1], 3), None).await,
            Err(ServiceError::QueueFull(1))
        ));
        release(&echo).await;
        release(&echo).await;
        running.await.unwrap().unwrap();
        queued.await.unwrap().unwrap();
        assert_eq!(metrics.queue_depth.get(), 0);
        let again = spawn(&executor, request(&[1], 4), None);
        release(&echo).await;
        assert_eq!(again.await.unwrap().unwrap()[0].data.as_ref(), [4]);
    }

    #[tokio::test]
    async fn an_idle_executor_needs_no_queue_place() {
        let backend: Arc<dyn Backend> = ModelSource::parse("builtin://identity")
            .unwrap()
            .load(crate::config::Device::Cpu, None)
            .unwrap()
            .into();
        let (executor, _) = start(backend, 1, Duration::ZERO, 0);
        until(|| executor.shared.lock().idle == 1).await;
        executor.infer(request(&[1], 7), None).await.unwrap();
    }

    #[tokio::test]
    async fn statistics_count_passes_and_queue_time() {
        let (executor, stats) = start(Arc::new(Echo::default()), 1, Duration::ZERO, 8);
        let outputs = executor.infer(request(&[1], 7), None).await.unwrap();
        assert_eq!(outputs[0].data.as_ref(), [7]);
        stats.record(Stat::Success, Duration::from_millis(2));
        let snapshot = stats.snapshot("echo", "1");
        assert_eq!(snapshot.execution_count, 1);
        assert_eq!(snapshot.inference_count, 1);
        let inference = snapshot.inference_stats.unwrap();
        assert_eq!(inference.queue.unwrap().count, 1);
        assert_eq!(inference.success.unwrap().ns, 2_000_000);
        assert!(snapshot.last_inference > 0);
    }

    #[tokio::test]
    async fn matching_requests_run_as_one_pass_and_each_gets_its_own_rows() {
        // A long delay: the pass starts because the batch is full (2 + 1 + 1 rows), not late.
        let echo = Arc::new(Echo::default());
        let (executor, _) = start(echo.clone(), 4, Duration::from_secs(30), 8);
        let shapes: [&[usize]; 3] = [&[2, 3], &[1, 3], &[1, 3]];
        let tasks: Vec<_> = shapes
            .iter()
            .zip(1u8..)
            .map(|(shape, fill)| spawn(&executor, request(shape, fill), None))
            .collect();
        for (task, (shape, fill)) in tasks.into_iter().zip(shapes.iter().zip(1u8..)) {
            let output = task.await.unwrap().unwrap().remove(0);
            assert_eq!(output.shape, *shape);
            assert!(output.data.iter().all(|&byte| byte == fill));
        }
        assert_eq!(
            echo.passes().iter().map(|pass| pass.0).collect::<Vec<_>>(),
            [4]
        );
        assert_eq!(executor.shared.metrics.batch_copied_bytes.get(), 12);
    }

    #[tokio::test]
    async fn mismatched_shapes_run_in_separate_passes() {
        let echo = Arc::new(Echo::default());
        let (executor, _) = start(echo.clone(), 8, Duration::from_millis(200), 8);
        let tasks: Vec<_> = [[1, 2], [1, 3], [1, 2], [1, 3]]
            .iter()
            .map(|shape| spawn(&executor, request(shape, 1), None))
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(
            echo.passes().iter().map(|pass| pass.0).collect::<Vec<_>>(),
            [2, 2]
        );
    }

    #[tokio::test]
    async fn a_request_run_alone_is_read_in_place() {
        let echo = Arc::new(Echo::default());
        let (executor, _) = start(echo.clone(), 8, Duration::ZERO, 8);
        let request = request(&[1, 64], 5);
        let address = request.inputs[0].data.as_ptr() as usize;
        executor.infer(request, None).await.unwrap();
        assert_eq!(echo.passes(), [(1, address)]);
        assert_eq!(executor.shared.metrics.batch_copied_bytes.get(), 0);
    }

    #[tokio::test]
    async fn a_deadline_passed_in_the_queue_is_answered_without_running() {
        let echo = Arc::new(Echo::gated());
        let (executor, stats) = start(echo.clone(), 1, Duration::ZERO, 8);
        let metrics = executor.shared.metrics.clone();
        let running = spawn(&executor, request(&[1], 1), None);
        until(|| metrics.in_flight.get() == 1).await;
        let deadline = Instant::now() + Duration::from_millis(50);
        let expired = executor.infer(request(&[1], 2), Some(deadline)).await;
        assert!(
            matches!(expired, Err(ServiceError::DeadlineExceeded)),
            "{expired:?}"
        );
        assert!(Instant::now() < deadline + Duration::from_secs(1));
        release(&echo).await;
        running.await.unwrap().unwrap();
        // The next pass is this one's; the expired request never got one.
        let next = spawn(&executor, request(&[1], 3), None);
        release(&echo).await;
        next.await.unwrap().unwrap();
        assert_eq!(echo.passes().len(), 2);
        assert_eq!(stats.snapshot("echo", "1").execution_count, 2);
    }

    #[tokio::test]
    async fn a_refused_batch_runs_its_requests_alone_for_their_own_answers() {
        let echo = Arc::new(Echo::default());
        let (executor, _) = start(echo.clone(), 3, Duration::from_secs(30), 8);
        let tasks: Vec<_> = [1u8, 0xFF, 3]
            .into_iter()
            .map(|fill| spawn(&executor, request(&[1, 2], fill), None))
            .collect();
        let results: Vec<_> = futures_join(tasks).await;
        assert_eq!(results[0].as_ref().unwrap()[0].data.as_ref(), [1, 1]);
        assert!(matches!(
            results[1],
            Err(ServiceError::Backend(BackendError::InvalidInput(_)))
        ));
        assert_eq!(results[2].as_ref().unwrap()[0].data.as_ref(), [3, 3]);
        assert_eq!(
            echo.passes().iter().map(|pass| pass.0).collect::<Vec<_>>(),
            [3, 1, 1, 1]
        );
    }

    async fn futures_join(
        tasks: Vec<tokio::task::JoinHandle<Result<Vec<OutputTensor>, ServiceError>>>,
    ) -> Vec<Result<Vec<OutputTensor>, ServiceError>> {
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        results
    }
}
