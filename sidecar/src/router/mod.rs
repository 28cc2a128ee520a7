//! The inference router: serves the worker's gRPC protocol on `infer.sock` (and TCP when
//! enabled) and sends each model-level call to one of the model's workers.
//!
//! - Endpoints come from a [`discovery::Discovery`]. An endpoint is ready unless a call to it
//!   failed with UNAVAILABLE (connection refused, worker gone) in the last [`DOWN_FOR`]: the
//!   router does not probe, it learns from the calls it makes (documented choice).
//! - Picking: ready endpoints on this node (`--node-name`) first, then the others; of those, the
//!   less busy of two random choices (requests in flight through this sidecar).
//! - A call that fails with UNAVAILABLE is retried once on another endpoint.
//! - While a model has no ready endpoint, ModelInfer waits up to `--hold-timeout` (at most
//!   `--max-held` requests at once), then answers UNAVAILABLE naming the model.
//! - [`scale`]: with Kubernetes discovery, a held request for a ModelWorker at zero replicas that
//!   allows it asks for one replica; one at zero that does not is answered at once.
//! - [`brokered`]: brokered region references become one-time grants for a colocated worker, or
//!   bytes read from the region for a remote one.
//! - [`named`]: Triton-style registrations (`--allow-named-shm`), per client connection
//!   ([`connection`]), sent to every worker inline.

pub mod brokered;
pub mod connection;
pub mod discovery;
pub mod named;
pub mod scale;
mod service;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use remotemedia_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::transport::Channel;

pub use discovery::{Discovery, EndpointSpec, Endpoints, StaticFile};
use scale::{Joined, ScaleFromZero, Target};
pub use service::{RouterService, Transport};

/// How long an endpoint that answered UNAVAILABLE gets no new requests.
pub const DOWN_FOR: Duration = Duration::from_secs(2);
/// How often a held request looks again (besides every discovery change).
const HOLD_RECHECK: Duration = Duration::from_millis(100);

/// Settings of the router.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub node_name: Option<String>,
    pub hold_timeout: Duration,
    pub max_held: usize,
    pub max_message_bytes: usize,
}

/// Routing state shared by the Unix-socket and TCP services.
pub struct Router {
    config: RouterConfig,
    endpoints: Endpoints,
    workers: Mutex<HashMap<String, Arc<Worker>>>,
    held: AtomicUsize,
    held_gauge: Gauge,
    seed: AtomicU64,
    /// Scale from zero (Kubernetes discovery only).
    scale: Option<ScaleFromZero>,
}

/// One worker endpoint: its client (connected lazily) and its load.
pub struct Worker {
    pub address: String,
    pub colocated: bool,
    client: GrpcInferenceServiceClient<Channel>,
    outstanding: AtomicUsize,
    down_until: Mutex<Option<Instant>>,
}

/// A chosen endpoint and the model name it serves the request under.
pub struct Route {
    pub worker: Arc<Worker>,
    pub model: String,
}

/// Why no endpoint was chosen.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("no ready worker for model '{0}'")]
    Unavailable(String),
    #[error("model '{0}' is served under more than one namespace: name it as namespace/modelId")]
    Ambiguous(String),
    #[error("too many requests held waiting for a worker for model '{0}'")]
    TooManyHeld(String),
    #[error(
        "no ready worker for model '{0}': its ModelWorker has 0 replicas and does not allow scale from zero"
    )]
    ScaledToZero(String),
}

impl Worker {
    pub fn client(&self) -> GrpcInferenceServiceClient<Channel> {
        self.client.clone()
    }

    /// Counts a call in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlightCall {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlightCall(self.clone())
    }

    /// Takes the endpoint out of rotation for [`DOWN_FOR`].
    pub fn mark_down(&self) {
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + DOWN_FOR);
    }

    fn ready(&self, now: Instant) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|until| until <= now)
    }
}

/// A call counted against its worker's load.
pub struct InFlightCall(Arc<Worker>);

impl Drop for InFlightCall {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The model name a worker serves for the entry `declared` (`modelId` or `namespace/modelId`)
/// when a client asks for `requested`, if that entry serves it.
fn served_name<'a>(declared: &'a str, requested: &str) -> Option<&'a str> {
    let bare = declared.rsplit('/').next().unwrap_or(declared);
    (declared == requested || bare == requested).then_some(bare)
}

/// Refuses a bare `requested` name that entries declared in more than one namespace serve.
fn unambiguous<'a>(
    declared: impl Iterator<Item = &'a str>,
    requested: &str,
) -> Result<(), RouteError> {
    let mut namespaces = declared
        .filter(|declared| served_name(declared, requested).is_some())
        .map(|declared| declared.rsplit_once('/').map(|(ns, _)| ns));
    if let Some(first) = namespaces.next()
        && namespaces.any(|other| other != first)
        && !requested.contains('/')
    {
        return Err(RouteError::Ambiguous(requested.to_owned()));
    }
    Ok(())
}

impl Router {
    pub fn new(
        config: RouterConfig,
        endpoints: Endpoints,
        held_gauge: Gauge,
        scale: Option<ScaleFromZero>,
    ) -> Arc<Self> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Arc::new(Self {
            config,
            endpoints,
            workers: Mutex::default(),
            held: AtomicUsize::new(0),
            held_gauge,
            seed: AtomicU64::new(seed),
            scale,
        })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// The endpoints discovery lists now.
    pub fn endpoints(&self) -> Arc<Vec<EndpointSpec>> {
        self.endpoints.borrow().clone()
    }

    /// Whether `spec` runs on this sidecar's node: its regions are granted in place.
    pub fn colocated(&self, spec: &EndpointSpec) -> bool {
        self.config.node_name.as_deref() == Some(spec.node.as_str())
    }

    /// Requests waiting for an endpoint now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// xorshift64: picking needs spread, not secrecy.
    fn random(&self) -> u64 {
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        x
    }

    fn worker(&self, spec: &EndpointSpec) -> Arc<Worker> {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        let colocated = self.colocated(spec);
        if let Some(worker) = workers.get(&spec.address)
            && worker.colocated == colocated
        {
            return worker.clone();
        }
        // Addresses were checked as host:port when the file was read.
        let channel = Channel::from_shared(format!("http://{}", spec.address))
            .expect("a checked host:port is a valid URI")
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        let client = GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(self.config.max_message_bytes)
            .max_encoding_message_size(self.config.max_message_bytes);
        let worker = Arc::new(Worker {
            address: spec.address.clone(),
            colocated,
            client,
            outstanding: AtomicUsize::new(0),
            down_until: Mutex::new(None),
        });
        workers.insert(spec.address.clone(), worker.clone());
        worker
    }

    /// A ready endpoint for `model`, not one of `tried`: colocated first, then the less busy of
    /// two random choices. `Ok(None)`: the model has no ready endpoint now.
    pub fn pick(&self, model: &str, tried: &[String]) -> Result<Option<Route>, RouteError> {
        let specs = self.endpoints.borrow().clone();
        unambiguous(specs.iter().map(|spec| spec.model.as_str()), model)?;
        let now = Instant::now();
        let candidates: Vec<(Arc<Worker>, &str)> = specs
            .iter()
            .filter(|spec| !tried.contains(&spec.address))
            .filter_map(|spec| {
                let name = served_name(&spec.model, model)?;
                let worker = self.worker(spec);
                worker.ready(now).then_some((worker, name))
            })
            .collect();
        let local: Vec<_> = candidates.iter().filter(|(w, _)| w.colocated).collect();
        let pool: Vec<_> = if local.is_empty() {
            candidates.iter().collect()
        } else {
            local
        };
        let chosen = match pool.len() {
            0 => return Ok(None),
            1 => pool[0],
            n => {
                let a = pool[(self.random() % n as u64) as usize];
                let b = pool[(self.random() % n as u64) as usize];
                let load = |(w, _): &(Arc<Worker>, &str)| w.outstanding.load(Ordering::Relaxed);
                if load(b) < load(a) { b } else { a }
            }
        };
        Ok(Some(Route {
            worker: chosen.0.clone(),
            model: chosen.1.to_owned(),
        }))
    }

    /// What scale from zero says of `model`, which has no ready endpoint: the ModelWorker to
    /// ask for a replica of, nothing, or an error when nothing will start a worker.
    fn scaling(&self, model: &str) -> Result<Option<(&ScaleFromZero, Target)>, RouteError> {
        let Some(scale) = &self.scale else {
            return Ok(None);
        };
        match scale.decide(model)? {
            scale::Decision::Wait => Ok(None),
            scale::Decision::ScaleUp(target) => Ok(Some((scale, target))),
            scale::Decision::Refuse => Err(RouteError::ScaledToZero(model.to_owned())),
        }
    }

    /// Like [`Router::pick`], but waits (up to the hold timeout, or `deadline` if sooner) while
    /// the model has no ready endpoint, asking for a replica of a ModelWorker at zero that
    /// allows it.
    pub async fn pick_or_hold(
        &self,
        model: &str,
        tried: &[String],
        deadline: Option<Instant>,
    ) -> Result<Route, RouteError> {
        if let Some(route) = self.pick(model, tried)? {
            return Ok(route);
        }
        // Before taking a hold place: a model nothing will start is answered at once.
        let mut scaling = self.scaling(model)?;
        let limit = Instant::now() + self.config.hold_timeout;
        let until = deadline.map_or(limit, |deadline| deadline.min(limit));
        let held = self.held.fetch_add(1, Ordering::Relaxed);
        self.held_gauge.inc();
        let _held = HeldGuard(self);
        if held >= self.config.max_held {
            return Err(RouteError::TooManyHeld(model.to_owned()));
        }
        let mut changes = self.endpoints.clone();
        // A source that stopped (or never had a sender) cannot wake us: poll only.
        let mut watching = true;
        let mut episode: Option<Joined> = None;
        loop {
            if episode.is_none()
                && let Some((scale, target)) = scaling.take()
            {
                episode = Some(scale.join(target));
            }
            let now = Instant::now();
            if now >= until {
                return Err(RouteError::Unavailable(model.to_owned()));
            }
            let wait = (until - now).min(HOLD_RECHECK);
            tokio::select! {
                changed = changes.changed(), if watching => watching = changed.is_ok(),
                () = tokio::time::sleep(wait) => {}
            }
            if let Some(route) = self.pick(model, tried)? {
                return Ok(route);
            }
            scaling = self.scaling(model)?;
        }
    }
}

struct HeldGuard<'a>(&'a Router);

impl Drop for HeldGuard<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
        self.0.held_gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: &str, address: &str, node: &str) -> EndpointSpec {
        EndpointSpec {
            model: model.into(),
            address: address.into(),
            node: node.into(),
        }
    }

    fn router(
        specs: Vec<EndpointSpec>,
    ) -> (
        Arc<Router>,
        tokio::sync::watch::Sender<Arc<Vec<EndpointSpec>>>,
    ) {
        let (sender, receiver) = tokio::sync::watch::channel(Arc::new(specs));
        let config = RouterConfig {
            node_name: Some("here".into()),
            hold_timeout: Duration::from_millis(300),
            max_held: 1,
            max_message_bytes: 1 << 20,
        };
        (
            Router::new(config, receiver, Gauge::default(), None),
            sender,
        )
    }

    #[tokio::test]
    async fn colocated_ready_endpoints_come_first_then_remote_ones() {
        let (router, _sender) = router(vec![
            spec("ns/m", "far:1", "there"),
            spec("ns/m", "near:1", "here"),
        ]);
        for _ in 0..20 {
            let route = router.pick("m", &[]).unwrap().unwrap();
            assert_eq!(route.worker.address, "near:1");
            assert_eq!(route.model, "m");
        }
        router
            .pick("ns/m", &[])
            .unwrap()
            .unwrap()
            .worker
            .mark_down();
        assert_eq!(
            router.pick("m", &[]).unwrap().unwrap().worker.address,
            "far:1"
        );
        let tried = ["far:1".to_owned()];
        assert!(router.pick("m", &tried).unwrap().is_none());
        assert!(router.pick("other", &[]).unwrap().is_none());
    }

    #[tokio::test]
    async fn the_less_busy_of_two_choices_gets_the_request() {
        let (router, _sender) = router(vec![spec("m", "a:1", "here"), spec("m", "b:1", "here")]);
        let busy = router.pick("m", &[]).unwrap().unwrap().worker;
        let _calls: Vec<_> = (0..5).map(|_| busy.start()).collect();
        let mut other = 0;
        for _ in 0..200 {
            if router.pick("m", &[]).unwrap().unwrap().worker.address != busy.address {
                other += 1;
            }
        }
        // Only when both random choices hit the busy one (1 in 4) does it win.
        assert!(other > 120, "{other} of 200 went to the idle endpoint");
    }

    #[tokio::test]
    async fn a_bare_name_served_in_two_namespaces_is_ambiguous() {
        let (router, _sender) =
            router(vec![spec("a/m", "a:1", "here"), spec("b/m", "b:1", "here")]);
        assert!(matches!(
            router.pick("m", &[]),
            Err(RouteError::Ambiguous(_))
        ));
        assert_eq!(
            router.pick("b/m", &[]).unwrap().unwrap().worker.address,
            "b:1"
        );
    }

    #[tokio::test]
    async fn a_request_held_without_a_discovery_source_waits_the_hold_timeout_then_names_the_model()
    {
        let (router, sender) = router(vec![]);
        drop(sender);
        let started = Instant::now();
        let error = router.pick_or_hold("m", &[], None).await.err().unwrap();
        assert_eq!(error.to_string(), "no ready worker for model 'm'");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_held_request_completes_when_an_endpoint_appears_and_times_out_otherwise() {
        let (router, sender) = router(vec![]);
        let error = router.pick_or_hold("m", &[], None).await.err().unwrap();
        assert_eq!(error.to_string(), "no ready worker for model 'm'");
        let waiting = tokio::spawn({
            let router = router.clone();
            async move {
                router
                    .pick_or_hold("m", &[], None)
                    .await
                    .map(|r| r.worker.address.clone())
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(router.held(), 1);
        assert!(matches!(
            router.pick_or_hold("m", &[], None).await,
            Err(RouteError::TooManyHeld(_))
        ));
        sender.send_replace(Arc::new(vec![spec("m", "a:1", "there")]));
        assert_eq!(waiting.await.unwrap().unwrap(), "a:1");
        assert_eq!(router.held(), 0);
    }

    /// Records each ask for a replica and answers `scaled`.
    #[derive(Default)]
    struct FakeScaler {
        asks: Mutex<Vec<scale::Target>>,
    }

    impl scale::Scaler for FakeScaler {
        fn ask_for_one(
            &self,
            target: scale::Target,
        ) -> futures::future::BoxFuture<'static, crate::metrics::ScaleUp> {
            self.asks.lock().unwrap().push(target);
            Box::pin(async { crate::metrics::ScaleUp::Scaled })
        }
    }

    impl FakeScaler {
        fn asks(&self) -> usize {
            self.asks.lock().unwrap().len()
        }
    }

    fn vad_scale(replicas: i32, scale_from_zero: bool) -> scale::WorkerScale {
        scale::WorkerScale {
            target: scale::Target {
                namespace: "ml".into(),
                name: "vad-worker".into(),
            },
            model: "ml/vad".into(),
            replicas,
            scale_from_zero,
        }
    }

    struct Scaling {
        router: Arc<Router>,
        endpoints: tokio::sync::watch::Sender<Arc<Vec<EndpointSpec>>>,
        scales: tokio::sync::watch::Sender<Arc<Vec<scale::WorkerScale>>>,
        scaler: Arc<FakeScaler>,
        metrics: Arc<crate::metrics::Metrics>,
    }

    /// A router with Kubernetes-like scale from zero over a fake scaler: `vad` in `ml` at
    /// `vad`'s scale, no endpoint, three hold places.
    fn scaling(vad: scale::WorkerScale, hold_timeout: Duration) -> Scaling {
        let (endpoints, receiver) = tokio::sync::watch::channel(Arc::new(Vec::new()));
        let (scales, scales_receiver) = tokio::sync::watch::channel(Arc::new(vec![vad]));
        let scaler = Arc::new(FakeScaler::default());
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let config = RouterConfig {
            node_name: Some("here".into()),
            hold_timeout,
            max_held: 3,
            max_message_bytes: 1 << 20,
        };
        let scale = ScaleFromZero::new(scales_receiver, scaler.clone(), metrics.clone());
        let router = Router::new(config, receiver, Gauge::default(), Some(scale));
        Scaling {
            router,
            endpoints,
            scales,
            scaler,
            metrics,
        }
    }

    async fn until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn held_requests_for_a_model_at_zero_ask_for_one_replica_once_per_episode_and_are_served_when_ready()
     {
        let s = scaling(vad_scale(0, true), Duration::from_secs(10));
        let held: Vec<_> = (0..3)
            .map(|_| {
                let router = s.router.clone();
                tokio::spawn(async move {
                    router
                        .pick_or_hold("vad", &[], None)
                        .await
                        .map(|r| r.worker.address.clone())
                })
            })
            .collect();
        until("three held requests", || s.router.held() == 3).await;
        assert!(matches!(
            s.router.pick_or_hold("vad", &[], None).await,
            Err(RouteError::TooManyHeld(_))
        ));
        assert_eq!(s.scaler.asks(), 1, "one ask for the whole episode");
        until("the ask counted", || {
            s.metrics
                .encode()
                .contains("remotemedia_sidecar_scale_ups_total{outcome=\"scaled\"} 1\n")
        })
        .await;
        // The replica the ask started becomes ready: every held request is served by it.
        s.scales.send_replace(Arc::new(vec![vad_scale(1, true)]));
        s.endpoints
            .send_replace(Arc::new(vec![spec("ml/vad", "a:1", "here")]));
        for request in held {
            assert_eq!(request.await.unwrap().unwrap(), "a:1");
        }
        assert_eq!(s.router.held(), 0);
        assert_eq!(s.scaler.asks(), 1);

        // Back at zero later: the next request opens a new episode and asks again.
        s.endpoints.send_replace(Arc::new(Vec::new()));
        s.scales.send_replace(Arc::new(vec![vad_scale(0, true)]));
        let soon = Instant::now() + Duration::from_millis(200);
        let error = s.router.pick_or_hold("ml/vad", &[], Some(soon)).await;
        assert!(matches!(error, Err(RouteError::Unavailable(_))));
        assert_eq!(s.scaler.asks(), 2);
    }

    #[tokio::test]
    async fn a_held_request_whose_replica_never_gets_ready_times_out_naming_the_model() {
        let s = scaling(vad_scale(0, true), Duration::from_millis(300));
        let started = Instant::now();
        let error = s.router.pick_or_hold("vad", &[], None).await.err().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(error.to_string(), "no ready worker for model 'vad'");
        assert_eq!(s.scaler.asks(), 1);
    }

    #[tokio::test]
    async fn a_model_at_zero_without_scale_from_zero_is_refused_at_once_without_holding() {
        let s = scaling(vad_scale(0, false), Duration::from_secs(10));
        let started = Instant::now();
        let error = s.router.pick_or_hold("vad", &[], None).await.err().unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(matches!(error, RouteError::ScaledToZero(_)), "{error}");
        assert!(error.to_string().contains("'vad'"), "{error}");
        assert_eq!(s.router.held(), 0);
        assert_eq!(s.scaler.asks(), 0);

        // Scaled to zero while a request waits for a replica that was coming: refused then.
        s.scales.send_replace(Arc::new(vec![vad_scale(1, false)]));
        let waiting = tokio::spawn({
            let router = s.router.clone();
            async move { router.pick_or_hold("vad", &[], None).await.err() }
        });
        until("a held request", || s.router.held() == 1).await;
        s.scales.send_replace(Arc::new(vec![vad_scale(0, false)]));
        let error = waiting.await.unwrap().unwrap();
        assert!(matches!(error, RouteError::ScaledToZero(_)), "{error}");
        assert_eq!(s.scaler.asks(), 0);
    }
}
