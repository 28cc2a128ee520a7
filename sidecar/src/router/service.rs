//! `inference.GRPCInferenceService` as the sidecar serves it: server-level RPCs answer for the
//! sidecar, model-level ones go to a worker of the named model (see [`super::Router`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use remotemedia_proto::inference::{
    ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
    ModelStatisticsRequest, ModelStatisticsResponse, ModelStreamInferResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse, SystemSharedMemoryRegisterRequest, SystemSharedMemoryRegisterResponse,
    SystemSharedMemoryStatusRequest, SystemSharedMemoryStatusResponse,
    SystemSharedMemoryUnregisterRequest, SystemSharedMemoryUnregisterResponse,
    grpc_inference_service_server::GrpcInferenceService,
};
use remotemedia_proto::params::{BROKERED_EXTENSION, SESSION_METADATA};
use remotemedia_proto::stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};

use super::brokered::{Brokered, BrokeredError, has_references};
use super::connection::ConnectionId;
use super::named::{NamedError, NamedRegistry};
use super::{RouteError, Router};
use crate::broker::Books;
use crate::metrics::{Metrics, Path};

/// Which listener a service instance answers on: brokered references are accepted only on the
/// Unix socket, where every caller is a pod of this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

/// Metadata passed through to workers (W3C trace context).
const PASSED_THROUGH: [&str; 2] = ["traceparent", "tracestate"];

/// Calls `$method` with `$message` on `$route`'s worker, counted as outstanding, with the
/// caller's deadline and trace headers; a worker that failed is marked down.
macro_rules! call_worker {
    ($route:expr, $method:ident, $message:expr, $metadata:expr) => {{
        let route = &$route;
        let _call = route.worker.start();
        let answer = route
            .worker
            .client()
            .$method(outgoing($message, $metadata, deadline($metadata)))
            .await;
        if answer.as_ref().is_err_and(worker_failed) {
            route.worker.mark_down();
        }
        answer
    }};
}

/// The sidecar's inference service; one per listener.
#[derive(Clone)]
pub struct RouterService {
    router: Arc<Router>,
    books: Arc<Books>,
    metrics: Arc<Metrics>,
    named: Arc<NamedRegistry>,
    transport: Transport,
}

impl From<BrokeredError> for Status {
    fn from(error: BrokeredError) -> Self {
        use BrokeredError::*;
        match error {
            NotFound { .. } => Status::not_found(error.to_string()),
            NotOnUnixSocket
            | MissingSession(_)
            | BadParameter { .. }
            | OutOfRange { .. }
            | MixedContents
            | OutputTooSmall { .. } => Status::invalid_argument(error.to_string()),
            Map | Grant | MissingOutput(_) => Status::internal(error.to_string()),
        }
    }
}

impl From<NamedError> for Status {
    fn from(error: NamedError) -> Self {
        use NamedError::*;
        let message = error.to_string();
        match error {
            Disabled => Status::unimplemented(message),
            AlreadyRegistered(_) => Status::already_exists(message),
            KeyNotFound(_) | NotRegistered(_) => Status::not_found(message),
            Invalid { .. }
            | OutOfRange { .. }
            | BadParameter { .. }
            | MixedContents(_)
            | OutputTooSmall { .. } => Status::invalid_argument(message),
            MissingOutput(_) => Status::internal(message),
        }
    }
}

/// The client connection a call came on (every listener tags its connections).
fn connection<T>(request: &Request<T>) -> Option<ConnectionId> {
    request
        .extensions()
        .get::<axum::extract::ConnectInfo<ConnectionId>>()
        .map(|info| info.0)
}

fn own_connection<T>(request: &Request<T>) -> Result<ConnectionId, Status> {
    connection(request).ok_or_else(|| Status::internal("failed to identify the connection"))
}

impl From<RouteError> for Status {
    fn from(error: RouteError) -> Self {
        match error {
            RouteError::Ambiguous(_) => Status::invalid_argument(error.to_string()),
            RouteError::Unavailable(_)
            | RouteError::TooManyHeld(_)
            | RouteError::ScaledToZero(_) => Status::unavailable(error.to_string()),
        }
    }
}

/// The client's deadline (`grpc-timeout`), if it set one.
fn deadline(metadata: &MetadataMap) -> Option<Instant> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let value: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(value.checked_mul(3600)?),
        "M" => Duration::from_secs(value.checked_mul(60)?),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
}

/// A request to a worker carrying the client's remaining deadline and trace context.
fn outgoing<T>(message: T, metadata: &MetadataMap, deadline: Option<Instant>) -> Request<T> {
    let mut request = Request::new(message);
    for key in PASSED_THROUGH {
        if let Some(value) = metadata.get(key) {
            request.metadata_mut().insert(key, value.clone());
        }
    }
    if let Some(deadline) = deadline {
        request.set_timeout(deadline.saturating_duration_since(Instant::now()));
    }
    request
}

/// A call that failed because the worker is not there: UNAVAILABLE (connection refused, worker
/// draining), or the connection breaking before or during the call (a killed worker), which
/// tonic reports as UNKNOWN or CANCELLED with the transport's error as its source. A status the
/// worker sent has no source, and the client's own deadline running out is no fault of the
/// worker's.
fn worker_failed(status: &Status) -> bool {
    let transport = std::error::Error::source(status)
        .is_some_and(|source| !source.is::<tonic::TimeoutExpired>());
    match status.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Cancelled => transport,
        _ => false,
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::InvalidArgument => "invalid_argument",
        Code::NotFound => "not_found",
        Code::ResourceExhausted => "resource_exhausted",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::FailedPrecondition => "failed_precondition",
        Code::Unimplemented => "unimplemented",
        _ => "other",
    }
}

impl RouterService {
    pub fn new(
        router: Arc<Router>,
        books: Arc<Books>,
        metrics: Arc<Metrics>,
        named: Arc<NamedRegistry>,
        transport: Transport,
    ) -> Self {
        Self {
            router,
            books,
            metrics,
            named,
            transport,
        }
    }

    /// One inference, measured: routed, and bounded by the client's deadline.
    async fn infer(
        &self,
        metadata: &MetadataMap,
        connection: Option<ConnectionId>,
        message: ModelInferRequest,
    ) -> Result<ModelInferResponse, Status> {
        let started = Instant::now();
        let deadline = deadline(metadata);
        let mut path = Path::InlineLocal;
        let routed = self.route_infer(metadata, connection, message, deadline, &mut path);
        let result = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), routed).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded("deadline passed in the sidecar")),
            },
            None => routed.await,
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(status) => code_name(status.code()),
        };
        self.metrics.inference(path, outcome, started.elapsed());
        result
    }

    async fn route_infer(
        &self,
        metadata: &MetadataMap,
        connection: Option<ConnectionId>,
        mut message: ModelInferRequest,
        deadline: Option<Instant>,
        path: &mut Path,
    ) -> Result<ModelInferResponse, Status> {
        if has_references(&message) && self.transport != Transport::Unix {
            return Err(BrokeredError::NotOnUnixSocket.into());
        }
        let named = self.named.prepare(connection, &mut message)?;
        let session = metadata.get(SESSION_METADATA).and_then(|v| v.to_str().ok());
        let mut brokered = Brokered::prepare(&message, session, &self.books)?;
        let mut tried = Vec::new();
        loop {
            let route = if tried.is_empty() {
                self.router
                    .pick_or_hold(&message.model_name, &tried, deadline)
                    .await?
            } else {
                self.router
                    .pick(&message.model_name, &tried)?
                    .ok_or_else(|| RouteError::Unavailable(message.model_name.clone()))?
            };
            let colocated = route.worker.colocated;
            *path = match (colocated, &brokered) {
                (true, Some(_)) => Path::ShmLocal,
                (true, None) => Path::InlineLocal,
                (false, _) => Path::InlineRemote,
            };
            let mut forwarded = match &mut brokered {
                Some(brokered) if colocated => brokered.for_colocated(&message)?,
                Some(brokered) => brokered.for_remote(&message)?,
                None => message.clone(),
            };
            forwarded.model_name = route.model.clone();
            let inline: u64 = forwarded
                .raw_input_contents
                .iter()
                .map(|b| b.len() as u64)
                .sum();
            let call = route.worker.start();
            let answer = route
                .worker
                .client()
                .model_infer(outgoing(forwarded, metadata, deadline))
                .await;
            drop(call);
            match answer {
                Ok(response) => {
                    let mut response = response.into_inner();
                    let returned: u64 = response
                        .raw_output_contents
                        .iter()
                        .map(|b| b.len() as u64)
                        .sum();
                    if let Some(named) = &named {
                        named.finish(&mut response)?;
                    }
                    if let Some(brokered) = &mut brokered {
                        brokered.finish(&mut response, !colocated)?;
                        if colocated {
                            self.metrics.forwarded(*path, brokered.bytes());
                        }
                    }
                    self.metrics.forwarded(*path, inline + returned);
                    return Ok(response);
                }
                Err(status) if worker_failed(&status) => {
                    tracing::info!(
                        endpoint = %route.worker.address,
                        message = status.message(),
                        "worker unavailable; trying another"
                    );
                    route.worker.mark_down();
                    if !tried.is_empty() {
                        return Err(RouteError::Unavailable(message.model_name.clone()).into());
                    }
                    tried.push(route.worker.address.clone());
                    if let Some(brokered) = &mut brokered {
                        brokered.void_grants();
                    }
                }
                Err(status) => return Err(status),
            }
        }
    }

    /// ModelStatistics without a model name, as Triton answers it: every model discovery lists
    /// and a ready worker serves, each under its discovery name (`modelId` or
    /// `namespace/modelId`), counted by one of its workers (the one a request naming it would
    /// reach). A worker that cannot be reached is left out; any other error is the answer.
    async fn every_models_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let models: std::collections::BTreeSet<String> = self
            .router
            .endpoints()
            .iter()
            .map(|spec| spec.model.clone())
            .collect();
        let mut model_stats = Vec::new();
        for model in models {
            let Some(route) = self.router.pick(&model, &[])? else {
                continue;
            };
            let asked = ModelStatisticsRequest {
                name: route.model.clone(),
                ..message.clone()
            };
            match call_worker!(route, model_statistics, asked, &metadata) {
                Ok(answer) => model_stats.extend(answer.into_inner().model_stats.into_iter().map(
                    |mut stats| {
                        stats.name = model.clone();
                        stats
                    },
                )),
                // Marked down; left out.
                Err(status) if worker_failed(&status) => {}
                Err(status) => return Err(status),
            }
        }
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }

    /// An endpoint for a model-level call that is not an inference (no holding).
    fn route_now(&self, model: &str) -> Result<super::Route, Status> {
        if model.is_empty() {
            return Err(Status::invalid_argument("the model name is empty"));
        }
        Ok(self
            .router
            .pick(model, &[])?
            .ok_or_else(|| RouteError::Unavailable(model.to_owned()))?)
    }
}

/// Forwards a model-level call to a worker of `$message.name`, under the name it serves.
macro_rules! forward {
    ($self:ident, $request:ident, $method:ident) => {{
        let (metadata, _, mut message) = $request.into_parts();
        let route = $self.route_now(&message.name)?;
        message.name = route.model.clone();
        call_worker!(route, $method, message, &metadata)
    }};
}

#[tonic::async_trait]
impl GrpcInferenceService for RouterService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let name = &request.get_ref().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("the model name is empty"));
        }
        if self.router.pick(name, &[])?.is_none() {
            return Ok(Response::new(ModelReadyResponse { ready: false }));
        }
        forward!(self, request, model_ready)
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        let mut extensions = vec!["model_configuration".to_owned(), "statistics".to_owned()];
        if self.transport == Transport::Unix {
            extensions.push(BROKERED_EXTENSION.to_owned());
        }
        if self.named.allowed() {
            extensions.push("system_shared_memory".to_owned());
        }
        Ok(Response::new(ServerMetadataResponse {
            name: "remotemedia-sidecar".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions,
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        forward!(self, request, model_metadata)
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let connection = connection(&request);
        let (metadata, _, message) = request.into_parts();
        self.infer(&metadata, connection, message)
            .await
            .map(Response::new)
    }

    type ModelStreamInferStream = ReceiverStream<Result<ModelStreamInferResponse, Status>>;

    /// Each request of the stream is routed like ModelInfer as it arrives
    /// (`remotemedia_proto::stream`: its response goes back when ready, a failed one is reported
    /// in its own response and the stream goes on).
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let connection = connection(&request);
        let (metadata, _, incoming) = request.into_parts();
        let metadata = Arc::new(metadata);
        let service = self.clone();
        Ok(Response::new(stream::pipeline(incoming, move |message| {
            let (service, metadata) = (service.clone(), metadata.clone());
            async move { service.infer(&metadata, connection, message).await }
        })))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        forward!(self, request, model_config)
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        if request.get_ref().name.is_empty() {
            return self.every_models_statistics(request).await;
        }
        forward!(self, request, model_statistics)
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<SystemSharedMemoryStatusResponse>, Status> {
        let connection = own_connection(&request)?;
        let regions = self.named.status(connection, &request.get_ref().name)?;
        Ok(Response::new(SystemSharedMemoryStatusResponse { regions }))
    }

    async fn system_shared_memory_register(
        &self,
        request: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<SystemSharedMemoryRegisterResponse>, Status> {
        let connection = own_connection(&request)?;
        let SystemSharedMemoryRegisterRequest {
            name,
            key,
            offset,
            byte_size,
        } = request.into_inner();
        self.named
            .register(connection, &name, &key, offset, byte_size)?;
        Ok(Response::new(SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        request: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<SystemSharedMemoryUnregisterResponse>, Status> {
        let connection = own_connection(&request)?;
        self.named
            .unregister(connection, &request.get_ref().name)
            .await?;
        Ok(Response::new(SystemSharedMemoryUnregisterResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_grpc_timeout_becomes_a_deadline_and_garbage_is_ignored() {
        let mut metadata = MetadataMap::new();
        assert!(deadline(&metadata).is_none());
        metadata.insert("grpc-timeout", "1500m".parse().unwrap());
        let left = deadline(&metadata).unwrap() - Instant::now();
        assert!(left <= Duration::from_millis(1500) && left > Duration::from_millis(1000));
        for garbage in ["", "15", "m", "-1S", "99999999999999999999H", "1X"] {
            metadata.insert("grpc-timeout", garbage.parse().unwrap());
            assert!(deadline(&metadata).is_none(), "{garbage:?}");
        }
    }

    #[test]
    fn a_broken_connection_counts_as_an_unavailable_worker_but_a_workers_own_error_does_not() {
        assert!(worker_failed(&Status::unavailable("connection refused")));
        let broken = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reset");
        let transport = Status::from_error(Box::new(broken));
        assert_eq!(transport.code(), Code::Unknown);
        assert!(worker_failed(&transport));
        assert!(!worker_failed(&Status::unknown("the worker said so")));
        let timeout = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert!(!worker_failed(&timeout), "{timeout:?}");
        assert!(!worker_failed(&Status::invalid_argument("bad shape")));
    }
}
