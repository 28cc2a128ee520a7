//! The `inference.GRPCInferenceService` implementation: routes each RPC to the served model.

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use remotemedia_proto::inference::{
    InferParameter, ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
    ModelStatisticsRequest, ModelStatisticsResponse, ModelStreamInferResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse, SystemSharedMemoryRegisterRequest, SystemSharedMemoryRegisterResponse,
    SystemSharedMemoryStatusRequest, SystemSharedMemoryStatusResponse,
    SystemSharedMemoryUnregisterRequest, SystemSharedMemoryUnregisterResponse,
    grpc_inference_service_server::GrpcInferenceService, infer_parameter::ParameterChoice,
    model_infer_response::InferOutputTensor,
};
use remotemedia_proto::params::{
    SHARED_MEMORY_BYTE_SIZE, SHARED_MEMORY_OFFSET, SHARED_MEMORY_REGION,
};
use remotemedia_proto::stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status, Streaming,
    metadata::{Ascii, MetadataValue},
};

use crate::{
    backend::BackendError,
    decode::{RequestedOutput, decode_request},
    defaults,
    error::ServiceError,
    executor::{Executor, ModelStats, Stat},
    granted::{GrantError, Granted, has_grants},
    lifecycle::Lifecycle,
    metrics::{Metrics, Outcome},
    model::ModelDescription,
    shm::{Resolve, SharedMemoryError, SharedMemoryRegistry},
    tensor::OutputTensor,
};

/// Extensions of the protocol this build implements, as ServerMetadata lists them.
const EXTENSIONS: [&str; 2] = ["model_configuration", "statistics"];
/// Listed too while `--allow-named-shm` is on.
const SHARED_MEMORY_EXTENSION: &str = "system_shared_memory";

/// gRPC's header for the time a client gives a call.
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The inference service; clones share one model.
#[derive(Clone)]
pub struct InferenceService {
    inner: Arc<Inner>,
}

struct Inner {
    model: ModelDescription,
    /// Set once the model has loaded.
    executor: OnceLock<Executor>,
    stats: Arc<ModelStats>,
    lifecycle: Arc<Lifecycle>,
    metrics: Metrics,
    /// Registered system shared-memory regions; `None` when `--allow-named-shm` is off.
    shared_memory: Option<Arc<SharedMemoryRegistry>>,
    /// The node broker session grants are redeemed on (`--broker`).
    granted: Option<Arc<Granted>>,
}

impl InferenceService {
    pub fn new(
        model: ModelDescription,
        stats: Arc<ModelStats>,
        lifecycle: Arc<Lifecycle>,
        metrics: Metrics,
        shared_memory: Option<Arc<SharedMemoryRegistry>>,
        granted: Option<Arc<Granted>>,
    ) -> Self {
        InferenceService {
            inner: Arc::new(Inner {
                model,
                executor: OnceLock::new(),
                stats,
                lifecycle,
                metrics,
                shared_memory,
                granted,
            }),
        }
    }

    fn shared_memory(&self) -> Result<&SharedMemoryRegistry, ServiceError> {
        self.inner
            .shared_memory
            .as_deref()
            .ok_or(ServiceError::SharedMemory(SharedMemoryError::Disabled))
    }

    /// Hands the loaded model to the service; called once, before the worker turns ready.
    pub fn set_executor(&self, executor: Executor) {
        // A second call would be a wiring bug; the first executor stays.
        let _ = self.inner.executor.set(executor);
    }

    /// The served model, if `name` and `version` address it.
    fn model(&self, name: &str, version: &str) -> Result<&ModelDescription, ServiceError> {
        let model = &self.inner.model;
        if name.is_empty() {
            return Err(ServiceError::MissingModelName);
        }
        if name != model.name {
            return Err(ServiceError::UnknownModel(name.chars().take(64).collect()));
        }
        if !version.is_empty() && version != defaults::MODEL_VERSION {
            return Err(ServiceError::UnknownVersion {
                model: model.name.clone(),
                version: version.chars().take(64).collect(),
                served: defaults::MODEL_VERSION,
            });
        }
        Ok(model)
    }

    /// One inference, counted in the metrics; `timeout` is the client's `grpc-timeout`.
    #[tracing::instrument(skip_all, fields(model = %request.model_name, id = %request.id))]
    async fn infer_measured(
        &self,
        request: ModelInferRequest,
        timeout: Option<&MetadataValue<Ascii>>,
    ) -> Result<ModelInferResponse, Status> {
        let started = Instant::now();
        let result = match timeout.map(grpc_timeout).transpose() {
            Ok(timeout) => {
                // Saturates far in the future for a timeout no Instant can hold: no deadline.
                let deadline = timeout.and_then(|timeout| started.checked_add(timeout));
                self.infer(request, deadline).await
            }
            Err(error) => Err(error),
        }
        .map_err(Status::from);
        self.inner
            .metrics
            .record(Outcome::of(&result), started.elapsed());
        if let Err(status) = &result {
            tracing::debug!(code = ?status.code(), message = status.message(), "request refused");
        }
        result
    }

    async fn infer(
        &self,
        request: ModelInferRequest,
        deadline: Option<Instant>,
    ) -> Result<ModelInferResponse, ServiceError> {
        let model = self.model(&request.model_name, &request.model_version)?;
        let started = Instant::now();
        let result = self.run_model(model, request, deadline).await;
        let stat = if result.is_ok() {
            Stat::Success
        } else {
            Stat::Failure
        };
        self.inner.stats.record(stat, started.elapsed());
        result
    }

    async fn run_model(
        &self,
        model: &ModelDescription,
        request: ModelInferRequest,
        deadline: Option<Instant>,
    ) -> Result<ModelInferResponse, ServiceError> {
        // Draining workers still serve: only loading ones refuse.
        let executor = self
            .inner
            .executor
            .get()
            .ok_or_else(|| ServiceError::NotReady(model.name.clone()))?;
        // Grants from a colocated sidecar: redeemed (a broker round trip each) off the runtime.
        let (request, regions) = match (&self.inner.granted, has_grants(&request)) {
            (_, false) => (request, Default::default()),
            (None, true) => return Err(GrantError::NoBroker.into()),
            (Some(granted), true) => {
                let granted = granted.clone();
                let mut request = request;
                tokio::task::spawn_blocking(move || {
                    granted
                        .redeem(&mut request)
                        .map(|regions| (request, regions))
                })
                .await
                .map_err(|_| ServiceError::Panicked)??
            }
        };
        let named = self.inner.shared_memory.as_deref();
        let resolver = self
            .inner
            .granted
            .as_ref()
            .filter(|_| !regions.is_empty())
            .map(|granted| granted.resolver(&regions, named));
        let shared: Option<&dyn Resolve> = match &resolver {
            Some(resolver) => Some(resolver),
            None => named.map(|named| named as &dyn Resolve),
        };
        let mut decoded = decode_request(request, &model.signature, shared)?;
        let id = std::mem::take(&mut decoded.id);
        let wanted = std::mem::take(&mut decoded.outputs);
        let outputs = executor.infer(decoded, deadline).await?;
        if outputs.len() != model.signature.outputs.len() {
            return Err(ServiceError::Backend(BackendError::Failed(format!(
                "the model returned {} outputs, its signature has {}",
                outputs.len(),
                model.signature.outputs.len()
            ))));
        }
        if wanted.iter().any(|output| output.shared_memory.is_some()) {
            // Copying into the client's region may move hundreds of MiB: off the async runtime.
            let name = model.name.clone();
            return tokio::task::spawn_blocking(move || response(&name, id, &outputs, &wanted))
                .await
                .map_err(|_| ServiceError::Panicked)?;
        }
        response(&model.name, id, &outputs, &wanted)
    }
}

/// Longest `grpc-timeout` echoed back in an error.
const MAX_SHOWN_TIMEOUT: usize = 16;

/// Parses gRPC's `grpc-timeout` header: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`,
/// `n`). tonic's own timeout layer is not in our axum router, so the worker reads it here.
fn grpc_timeout(value: &MetadataValue<Ascii>) -> Result<Duration, ServiceError> {
    let text = value.to_str().unwrap_or_default();
    let invalid = || ServiceError::InvalidTimeout(text.chars().take(MAX_SHOWN_TIMEOUT).collect());
    let split = text.len().checked_sub(1).ok_or_else(invalid)?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let amount: u64 = digits.parse().map_err(|_| invalid())?;
    Ok(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return Err(invalid()),
    })
}

/// The response carrying the `wanted` outputs, in that order. An output requested in shared
/// memory is copied into the client's range (the one copy) and leaves an empty raw entry, so
/// raw entries still line up with outputs for clients that index them by position.
fn response(
    model_name: &str,
    id: String,
    outputs: &[OutputTensor],
    wanted: &[RequestedOutput],
) -> Result<ModelInferResponse, ServiceError> {
    let mut tensors = Vec::with_capacity(wanted.len());
    let mut raw = Vec::with_capacity(wanted.len());
    for requested in wanted {
        let Some(output) = outputs.get(requested.index) else {
            continue;
        };
        let mut tensor = InferOutputTensor {
            name: output.name.clone(),
            datatype: output.datatype.name().to_owned(),
            shape: output
                .shape
                .iter()
                .map(|&dim| i64::try_from(dim).unwrap_or(i64::MAX))
                .collect(),
            ..Default::default()
        };
        match &requested.shared_memory {
            Some(slot) => {
                slot.write(&output.name, &output.data)?;
                let reference = slot.reference();
                let parameter = |choice| InferParameter {
                    parameter_choice: Some(choice),
                };
                tensor.parameters = [
                    (
                        SHARED_MEMORY_REGION,
                        parameter(ParameterChoice::StringParam(reference.region.clone())),
                    ),
                    (
                        SHARED_MEMORY_OFFSET,
                        parameter(ParameterChoice::Uint64Param(reference.offset)),
                    ),
                    (
                        SHARED_MEMORY_BYTE_SIZE,
                        parameter(ParameterChoice::Uint64Param(output.data.len() as u64)),
                    ),
                ]
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value))
                .collect();
                raw.push(Bytes::new());
            }
            None => raw.push(output.data.clone()),
        }
        tensors.push(tensor);
    }
    Ok(ModelInferResponse {
        model_name: model_name.to_owned(),
        model_version: defaults::MODEL_VERSION.to_owned(),
        id,
        outputs: tensors,
        raw_output_contents: raw,
        ..Default::default()
    })
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
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
        Ok(Response::new(ServerReadyResponse {
            ready: self.inner.lifecycle.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        // Readiness has a plain answer for any name: a model not served here is not ready.
        let served = self.model(&request.name, &request.version).is_ok();
        Ok(Response::new(ModelReadyResponse {
            ready: served && self.inner.lifecycle.is_ready(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: defaults::SERVER_NAME.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: EXTENSIONS
                .iter()
                .chain(
                    self.inner
                        .shared_memory
                        .as_ref()
                        .map(|_| &SHARED_MEMORY_EXTENSION),
                )
                .map(|&name| name.to_owned())
                .collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let model = self.model(&request.name, &request.version)?;
        Ok(Response::new(model.metadata()))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let timeout = request.metadata().get(GRPC_TIMEOUT).cloned();
        self.infer_measured(request.into_inner(), timeout.as_ref())
            .await
            .map(Response::new)
    }

    type ModelStreamInferStream = ReceiverStream<Result<ModelStreamInferResponse, Status>>;

    /// Each request runs as it arrives (`remotemedia_proto::stream`); the stream's deadline
    /// bounds the stream, not each of its requests.
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let service = self.clone();
        Ok(Response::new(stream::pipeline(
            request.into_inner(),
            move |request| {
                let service = service.clone();
                async move { service.infer_measured(request, None).await }
            },
        )))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let request = request.into_inner();
        let model = self.model(&request.name, &request.version)?;
        Ok(Response::new(ModelConfigResponse {
            config: Some(model.config()),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        // An empty name asks for every model: here, the one served.
        let model = if request.name.is_empty() {
            &self.inner.model
        } else {
            self.model(&request.name, &request.version)?
        };
        Ok(Response::new(ModelStatisticsResponse {
            model_stats: vec![
                self.inner
                    .stats
                    .snapshot(&model.name, defaults::MODEL_VERSION),
            ],
        }))
    }

    async fn system_shared_memory_status(
        &self,
        request: Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<SystemSharedMemoryStatusResponse>, Status> {
        let request = request.into_inner();
        let regions = self
            .shared_memory()?
            .status(&request.name)
            .map_err(ServiceError::from)?;
        Ok(Response::new(SystemSharedMemoryStatusResponse { regions }))
    }

    async fn system_shared_memory_register(
        &self,
        request: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<SystemSharedMemoryRegisterResponse>, Status> {
        let SystemSharedMemoryRegisterRequest {
            name,
            key,
            offset,
            byte_size,
        } = request.into_inner();
        let registry = self.shared_memory()?;
        // A few system calls (open, stat, mmap without populating): cheap enough to run here.
        registry
            .register(&name, &key, offset, byte_size)
            .map_err(ServiceError::from)?;
        Ok(Response::new(SystemSharedMemoryRegisterResponse {}))
    }

    /// Waits until no in-flight request holds what it unregisters (see [`crate::shm`]).
    async fn system_shared_memory_unregister(
        &self,
        request: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<SystemSharedMemoryUnregisterResponse>, Status> {
        let request = request.into_inner();
        self.shared_memory()?.unregister(&request.name).await;
        Ok(Response::new(SystemSharedMemoryUnregisterResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(text: &'static str) -> Result<Duration, ServiceError> {
        grpc_timeout(&MetadataValue::from_static(text))
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(timeout("2H").unwrap(), Duration::from_secs(7200));
        assert_eq!(timeout("3M").unwrap(), Duration::from_secs(180));
        assert_eq!(timeout("1S").unwrap(), Duration::from_secs(1));
        assert_eq!(timeout("250m").unwrap(), Duration::from_millis(250));
        assert_eq!(
            timeout("99999999u").unwrap(),
            Duration::from_micros(99_999_999)
        );
        assert_eq!(timeout("7n").unwrap(), Duration::from_nanos(7));
    }

    #[test]
    fn malformed_grpc_timeouts_are_invalid_arguments() {
        for bad in ["", "S", "10", "123456789m", "-1S", "1s", "1.5S"] {
            let error = timeout(bad).unwrap_err();
            assert_eq!(
                Status::from(error).code(),
                tonic::Code::InvalidArgument,
                "{bad}"
            );
        }
    }
}
