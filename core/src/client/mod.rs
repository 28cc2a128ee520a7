//! `ModelWorkerClient`: inference against a model worker, or through the node sidecar, with
//! tensors going by reference when the server can see them and by value otherwise.
//!
//! ```no_run
//! use remotemedia_runtime_core::model_worker::ModelWorkerClient;
//! use remotemedia_runtime_core::tensor::{DataType, TensorBuffer};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! # let input_data = vec![0i32; 512];
//! let client = ModelWorkerClient::connect("grpc://localhost:50051").await?; // or "unix:///run/remotemedia/infer.sock"
//! let input = TensorBuffer::from_vec(input_data, vec![1, 512], DataType::I32);
//! let output = client.infer(input, Default::default()).await?;
//! let tokens = output.as_i32_slice()?;
//! # Ok(()) }
//! ```
//!
//! How each tensor travels (the caller's code is the same for all three):
//! - in a **brokered** region (allocated with `REMOTEMEDIA_SIDECAR` set), to the node sidecar
//!   on its Unix socket when it lists [`BROKERED_EXTENSION`]: by reference, the region id and
//!   this process's broker session token;
//! - in a **named** region, to a server that lists `system_shared_memory`: the region is
//!   registered with the server once per client (`SystemSharedMemoryRegister`) and referenced by
//!   Triton's `shared_memory_*` parameters; registrations go when the client closes;
//! - anything else, any tensor below [`ClientConfig::inline_threshold`], and a named region
//!   the server cannot open (another machine): inline, in `raw_input_contents`.
//!
//! Requested outputs ([`OutputRequest::into`]) are written by the server into the caller's
//! shared-memory tensor when it can reach it, and copied into it otherwise.

mod endpoint;
mod error;
mod request;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use remotemedia_proto::inference::{
    ModelMetadataRequest, ModelMetadataResponse, ModelStatistics, ModelStatisticsRequest,
    ServerLiveRequest, ServerMetadataRequest, ServerReadyRequest,
    SystemSharedMemoryRegisterRequest, SystemSharedMemoryUnregisterRequest,
    grpc_inference_service_client::GrpcInferenceServiceClient,
};
use remotemedia_proto::params::BROKERED_EXTENSION;
use tokio::sync::{Mutex, OnceCell};
use tonic::transport::Channel;

use crate::shm::Region;
use crate::tensor::{TensorBuffer, TensorError};

pub use endpoint::{DEFAULT_PORT, INFER_SOCKET};
pub use error::ClientError;
pub use stream::{InferStream, StreamResponse};

use endpoint::Address;
use error::Failure;
use request::Prepared;

/// Triton's extension name for system shared memory in `ServerMetadata.extensions`.
const SYSTEM_SHARED_MEMORY_EXTENSION: &str = "system_shared_memory";

/// How a client connects, retries and chooses a transport.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Tensors smaller than this travel inline even from shared memory: registering and
    /// referencing a region costs more than sending a few KiB. Default 64 KiB.
    pub inline_threshold: usize,
    /// Attempts to connect before a call fails with [`ClientError::WorkerUnavailable`].
    pub connect_attempts: u32,
    /// Wait after the first failed connect; doubled after each further one.
    pub retry_backoff: Duration,
    /// Limit for one connection attempt.
    pub connect_timeout: Duration,
    /// Deadline for calls whose [`InferOptions::timeout`] is unset; `None`: no deadline.
    pub default_timeout: Option<Duration>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            inline_threshold: 64 * 1024,
            connect_attempts: 5,
            retry_backoff: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(5),
            default_timeout: None,
        }
    }
}

/// Per-call options of [`ModelWorkerClient::infer`] and friends.
#[derive(Debug, Default)]
pub struct InferOptions {
    /// The model to call; `None`: the only model the server serves (a worker serves one).
    pub model: Option<String>,
    /// Deadline for the call, sent to the server as `grpc-timeout` too.
    pub timeout: Option<Duration>,
    /// For [`ModelWorkerClient::infer`]: a tensor the output is written into (in place when it
    /// is in shared memory the server can reach). Its byte size must be the output's.
    pub output: Option<TensorBuffer>,
}

/// One output asked of [`ModelWorkerClient::infer_many`].
#[derive(Debug)]
pub struct OutputRequest {
    /// The model's output name.
    pub name: String,
    /// Where to put it: a tensor of exactly the output's byte size (see [`InferOptions::output`]);
    /// `None`: a new heap tensor.
    pub into: Option<TensorBuffer>,
}

impl OutputRequest {
    /// The output `name`, into a new heap tensor.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            into: None,
        }
    }
}

/// The outputs of one inference, in the server's order.
#[derive(Debug, Default)]
pub struct InferOutputs {
    tensors: Vec<(String, TensorBuffer)>,
}

impl InferOutputs {
    /// The output called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorBuffer> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Takes the output called `name` out.
    pub fn take(&mut self, name: &str) -> Option<TensorBuffer> {
        let index = self.tensors.iter().position(|(n, _)| n == name)?;
        Some(self.tensors.remove(index).1)
    }

    /// Output names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }

    /// Number of outputs.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the server returned no output.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// `(name, tensor)` pairs, in order.
    pub fn into_vec(self) -> Vec<(String, TensorBuffer)> {
        self.tensors
    }
}

/// A tensor, or the result of building one: what [`ModelWorkerClient::infer`] accepts, so that
/// `TensorBuffer::from_vec(…)` can be passed as it is and its error comes back as the call's.
pub trait IntoTensor {
    /// The tensor, or why it could not be built.
    fn into_tensor(self) -> Result<TensorBuffer, TensorError>;
}

impl IntoTensor for TensorBuffer {
    fn into_tensor(self) -> Result<TensorBuffer, TensorError> {
        Ok(self)
    }
}

impl IntoTensor for Result<TensorBuffer, TensorError> {
    fn into_tensor(self) -> Result<TensorBuffer, TensorError> {
        self
    }
}

/// A model's metadata and statistics, as [`ModelWorkerClient::status`] returns them.
#[derive(Clone, Debug)]
pub struct ModelStatus {
    /// Name, versions, platform, inputs and outputs.
    pub metadata: ModelMetadataResponse,
    /// Request counts and durations; `None` if the server keeps none for the model.
    pub statistics: Option<ModelStatistics>,
}

/// What the server said about itself, asked once per client.
#[derive(Debug)]
struct ServerInfo {
    /// The node sidecar on its Unix socket: brokered regions may be sent by id.
    brokered: bool,
    /// Triton's system shared memory is served.
    named: bool,
}

/// A client of a model worker or of the node sidecar. Cheap to clone; clones share the
/// connection, the cached metadata and the shared-memory registrations.
#[derive(Clone, Debug)]
pub struct ModelWorkerClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// As the caller wrote it, for errors.
    endpoint: String,
    address: Address,
    channel: Channel,
    config: ClientConfig,
    server: OnceCell<ServerInfo>,
    default_model: OnceCell<String>,
    metadata: std::sync::Mutex<HashMap<String, Arc<ModelMetadataResponse>>>,
    /// Named regions registered with the server: region id → registration name. Held across
    /// the Register call so that two concurrent requests register a region once.
    registrations: Mutex<HashMap<String, String>>,
    /// Set when the server could not open a named region of ours (it does not share our
    /// `/dev/shm`): named tensors go inline from then on.
    named_unreachable: AtomicBool,
    /// Distinguishes this client's registrations from other clients' at the same server.
    nonce: String,
}

impl ModelWorkerClient {
    /// Connects to `endpoint` — `grpc://host:port`, `unix:///path/to/socket`, or
    /// `unix:///socket/dir` (its `infer.sock`) — and asks the server what it supports.
    pub async fn connect(endpoint: &str) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, ClientConfig::default()).await
    }

    /// [`ModelWorkerClient::connect`] with a configuration.
    pub async fn connect_with(endpoint: &str, config: ClientConfig) -> Result<Self, ClientError> {
        let address = Address::parse(endpoint)?;
        let channel = address.channel(config.connect_timeout)?;
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce)
            .map_err(|e| ClientError::Shm(crate::shm::ShmError::Random(e)))?;
        let client = Self {
            inner: Arc::new(Inner {
                endpoint: endpoint.to_owned(),
                address,
                channel,
                config,
                server: OnceCell::new(),
                default_model: OnceCell::new(),
                metadata: Default::default(),
                registrations: Mutex::default(),
                named_unreachable: AtomicBool::new(false),
                nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
            }),
        };
        client.server().await?;
        Ok(client)
    }

    /// The node sidecar named by `REMOTEMEDIA_SIDECAR` (its socket directory, e.g.
    /// `unix:///run/remotemedia`); `Ok(None)` when the variable is unset.
    pub async fn from_env() -> Result<Option<Self>, ClientError> {
        Self::from_env_with(ClientConfig::default()).await
    }

    /// [`ModelWorkerClient::from_env`] with a configuration.
    pub async fn from_env_with(config: ClientConfig) -> Result<Option<Self>, ClientError> {
        match std::env::var(crate::shm::broker::SIDECAR_ENV) {
            Ok(value) => Self::connect_with(&sidecar_endpoint(&value)?, config)
                .await
                .map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(ClientError::InvalidEndpoint {
                endpoint: crate::shm::broker::SIDECAR_ENV.to_owned(),
                reason: "the variable is not valid UTF-8",
            }),
        }
    }

    /// The endpoint as given to `connect`.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// Runs the model on one tensor: the model must have one input and one output (their
    /// names come from its metadata). Use [`ModelWorkerClient::infer_many`] for more.
    pub async fn infer(
        &self,
        input: impl IntoTensor,
        options: InferOptions,
    ) -> Result<TensorBuffer, ClientError> {
        let input = input.into_tensor()?;
        let model = self.model_name(&options).await?;
        let metadata = self.model_metadata(&model).await?;
        let input_name = single(&model, "input", &metadata.inputs)?;
        let InferOptions {
            timeout, output, ..
        } = options;
        let outputs = match output {
            Some(into) => vec![OutputRequest {
                name: single(&model, "output", &metadata.outputs)?,
                into: Some(into),
            }],
            None => Vec::new(),
        };
        let mut result = self
            .run(&model, vec![(input_name, input)], outputs, timeout)
            .await?;
        match result.tensors.len() {
            1 => Ok(result.tensors.remove(0).1),
            count => Err(ClientError::BadResponse {
                reason: format!("expected one output from model {model:?}, got {count}"),
            }),
        }
    }

    /// Runs the model on named inputs and returns the outputs asked for (all of them, inline,
    /// when `outputs` is empty). Outputs are placed with [`OutputRequest::into`]; setting
    /// `options.output` here is an error.
    pub async fn infer_many(
        &self,
        inputs: Vec<(String, TensorBuffer)>,
        outputs: Vec<OutputRequest>,
        options: InferOptions,
    ) -> Result<InferOutputs, ClientError> {
        if options.output.is_some() {
            return Err(ClientError::Usage {
                reason: "infer_many places outputs with OutputRequest::into, not InferOptions::output",
            });
        }
        let model = self.model_name(&options).await?;
        self.run(&model, inputs, outputs, options.timeout).await
    }

    /// Opens a `ModelStreamInfer` stream to the model: requests are sent as they come and
    /// answered in any order, each with the id [`InferStream::send`] returned. Of `options`,
    /// only `model` applies to a stream; `timeout` or `output` set is an error.
    pub async fn infer_stream(&self, options: InferOptions) -> Result<InferStream, ClientError> {
        if options.output.is_some() || options.timeout.is_some() {
            return Err(ClientError::Usage {
                reason: "a stream takes only InferOptions::model; place outputs with send_many",
            });
        }
        let model = self.model_name(&options).await?;
        let metadata = self.model_metadata(&model).await?;
        InferStream::open(self.clone(), model, metadata).await
    }

    /// True when the server is live and ready to serve.
    pub async fn health_check(&self) -> Result<bool, ClientError> {
        let live = self
            .call(None, |mut grpc, _| async move {
                grpc.server_live(ServerLiveRequest {}).await
            })
            .await?
            .live;
        if !live {
            return Ok(false);
        }
        Ok(self
            .call(None, |mut grpc, _| async move {
                grpc.server_ready(ServerReadyRequest {}).await
            })
            .await?
            .ready)
    }

    /// The model's metadata and statistics (`model`: `None` for the server's only model).
    pub async fn status(&self, model: Option<&str>) -> Result<ModelStatus, ClientError> {
        let model = match model {
            Some(model) => model.to_owned(),
            None => self.default_model().await?.to_owned(),
        };
        let metadata = self.model_metadata(&model).await?;
        let name = model.clone();
        let statistics = self
            .call(None, move |mut grpc, _| {
                let name = name.clone();
                async move {
                    grpc.model_statistics(ModelStatisticsRequest {
                        name,
                        version: String::new(),
                    })
                    .await
                }
            })
            .await?
            .model_stats
            .into_iter()
            .find(|stats| stats.name == model);
        Ok(ModelStatus {
            metadata: (*metadata).clone(),
            statistics,
        })
    }

    /// Unregisters this client's shared-memory registrations at the server. Dropping the last
    /// clone of a client does the same in the background when a tokio runtime is running.
    pub async fn close(self) -> Result<(), ClientError> {
        let names: Vec<String> = self
            .inner
            .registrations
            .lock()
            .await
            .drain()
            .map(|(_, n)| n)
            .collect();
        for name in names {
            self.unregister(name).await?;
        }
        Ok(())
    }

    /// One inference: prepares the request (choosing each tensor's transport), sends it, and
    /// turns the response into tensors.
    async fn run(
        &self,
        model: &str,
        inputs: Vec<(String, TensorBuffer)>,
        outputs: Vec<OutputRequest>,
        timeout: Option<Duration>,
    ) -> Result<InferOutputs, ClientError> {
        let prepared = Prepared::build(self, model, inputs, outputs).await?;
        let response = self
            .call(timeout, |mut grpc, left| {
                let request = prepared.grpc_request(left);
                async move { grpc.model_infer(request).await }
            })
            .await?;
        prepared.finish(response)
    }

    /// Sends one unary call, retrying while connecting fails (the request never left), with
    /// the deadline applied here and sent as `grpc-timeout`.
    async fn call<T, F, Fut>(&self, timeout: Option<Duration>, call: F) -> Result<T, ClientError>
    where
        F: Fn(GrpcInferenceServiceClient<Channel>, Option<Duration>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let timeout = timeout.or(self.inner.config.default_timeout);
        let deadline = timeout.map(|t| Instant::now() + t);
        let attempts = self.inner.config.connect_attempts.max(1);
        let mut backoff = self.inner.config.retry_backoff;
        for attempt in 1..=attempts {
            let grpc = self.grpc();
            let result = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, call(grpc, Some(left))).await {
                        Ok(result) => result,
                        Err(_) => return Err(deadline_exceeded(timeout)),
                    }
                }
                None => call(grpc, None).await,
            };
            let status = match result {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            match Failure::classify(status) {
                Failure::Connect if attempt < attempts => {
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                }
                Failure::Connect => break,
                Failure::Deadline => return Err(deadline_exceeded(timeout)),
                Failure::Lost(reason) => {
                    return Err(ClientError::ConnectionLost {
                        endpoint: self.inner.endpoint.clone(),
                        reason,
                    });
                }
                // The server may cancel at the deadline just before our own timer fires.
                Failure::Answered(ClientError::Cancelled { .. })
                    if deadline.is_some_and(|d| Instant::now() >= d) =>
                {
                    return Err(deadline_exceeded(timeout));
                }
                Failure::Answered(error) => return Err(error),
            }
        }
        Err(ClientError::WorkerUnavailable {
            endpoint: self.inner.endpoint.clone(),
            attempts,
        })
    }

    fn grpc(&self) -> GrpcInferenceServiceClient<Channel> {
        // The server enforces its own message limits; the client accepts what it is sent.
        GrpcInferenceServiceClient::new(self.inner.channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    async fn server(&self) -> Result<&ServerInfo, ClientError> {
        self.inner
            .server
            .get_or_try_init(|| async {
                let metadata = self
                    .call(None, |mut grpc, _| async move {
                        grpc.server_metadata(ServerMetadataRequest {}).await
                    })
                    .await?;
                let lists = |name: &str| metadata.extensions.iter().any(|e| e == name);
                Ok(ServerInfo {
                    // Region ids are capabilities: they go only over the node's Unix socket.
                    brokered: self.inner.address.is_unix() && lists(BROKERED_EXTENSION),
                    named: lists(SYSTEM_SHARED_MEMORY_EXTENSION),
                })
            })
            .await
    }

    async fn model_name(&self, options: &InferOptions) -> Result<String, ClientError> {
        match &options.model {
            Some(model) => Ok(model.clone()),
            None => self.default_model().await.map(str::to_owned),
        }
    }

    /// The server's only model, from ModelStatistics for every model (a worker answers with
    /// the one it serves).
    async fn default_model(&self) -> Result<&str, ClientError> {
        self.inner
            .default_model
            .get_or_try_init(|| async {
                let stats = self
                    .call(None, |mut grpc, _| async move {
                        grpc.model_statistics(ModelStatisticsRequest::default())
                            .await
                    })
                    .await?;
                let mut names: Vec<String> =
                    stats.model_stats.into_iter().map(|s| s.name).collect();
                names.dedup();
                match <[String; 1]>::try_from(names) {
                    Ok([name]) => Ok(name),
                    Err(names) => Err(ClientError::Model {
                        reason: format!(
                            "the server serves {} models; name one in InferOptions::model",
                            names.len()
                        ),
                    }),
                }
            })
            .await
            .map(String::as_str)
    }

    async fn model_metadata(&self, model: &str) -> Result<Arc<ModelMetadataResponse>, ClientError> {
        if let Some(cached) = self.cached_metadata().get(model) {
            return Ok(cached.clone());
        }
        let name = model.to_owned();
        let metadata = Arc::new(
            self.call(None, move |mut grpc, _| {
                let name = name.clone();
                async move {
                    grpc.model_metadata(ModelMetadataRequest {
                        name,
                        version: String::new(),
                    })
                    .await
                }
            })
            .await?,
        );
        self.cached_metadata()
            .insert(model.to_owned(), metadata.clone());
        Ok(metadata)
    }

    fn cached_metadata(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ModelMetadataResponse>>> {
        self.inner
            .metadata
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The registration name of a named region at the server, registering it the first time.
    /// `None`: the server cannot open our regions, so the tensor goes inline.
    async fn registration(&self, region: &Region) -> Result<Option<String>, ClientError> {
        if self.inner.named_unreachable.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let id = region.id().as_str();
        let mut registrations = self.inner.registrations.lock().await;
        if let Some(name) = registrations.get(id) {
            return Ok(Some(name.clone()));
        }
        // Registrations of regions that no longer exist would keep their pages mapped in the
        // server: drop them before adding one.
        let gone: Vec<String> = registrations
            .keys()
            .filter(|id| !std::path::Path::new("/dev/shm").join(id).exists())
            .cloned()
            .collect();
        for id in gone {
            if let Some(name) = registrations.remove(&id) {
                self.unregister(name).await?;
            }
        }
        let name = format!("remotemedia-client-{}-{id}", self.inner.nonce);
        let request = SystemSharedMemoryRegisterRequest {
            name: name.clone(),
            key: format!("/{id}"),
            offset: 0,
            byte_size: region.len() as u64,
        };
        let registered = self
            .call(None, move |mut grpc, _| {
                let request = request.clone();
                async move { grpc.system_shared_memory_register(request).await }
            })
            .await;
        match registered {
            Ok(_) => {
                registrations.insert(id.to_owned(), name.clone());
                Ok(Some(name))
            }
            // The server does not see our `/dev/shm` (another machine or IPC namespace).
            Err(ClientError::NotFound { .. }) => {
                tracing::info!(endpoint = %self.inner.endpoint, "the server cannot open this process's shared memory; sending tensors inline");
                self.inner.named_unreachable.store(true, Ordering::Relaxed);
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    async fn unregister(&self, name: String) -> Result<(), ClientError> {
        self.call(None, move |mut grpc, _| {
            let name = name.clone();
            async move {
                grpc.system_shared_memory_unregister(SystemSharedMemoryUnregisterRequest { name })
                    .await
            }
        })
        .await
        .map(drop)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let names: Vec<String> = self
            .registrations
            .get_mut()
            .drain()
            .map(|(_, n)| n)
            .collect();
        if names.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                count = names.len(),
                "client dropped outside a tokio runtime: its shared-memory registrations stay until the server restarts"
            );
            return;
        };
        let channel = self.channel.clone();
        runtime.spawn(async move {
            let mut grpc = GrpcInferenceServiceClient::new(channel);
            for name in names {
                let _ = grpc
                    .system_shared_memory_unregister(SystemSharedMemoryUnregisterRequest { name })
                    .await;
            }
        });
    }
}

/// The endpoint of the sidecar whose socket directory `REMOTEMEDIA_SIDECAR` names.
fn sidecar_endpoint(value: &str) -> Result<String, ClientError> {
    let path = value.strip_prefix("unix://").unwrap_or(value);
    if !path.starts_with('/') {
        return Err(ClientError::InvalidEndpoint {
            endpoint: value.chars().take(256).collect(),
            reason: "REMOTEMEDIA_SIDECAR is unix://<socket directory> or an absolute path",
        });
    }
    Ok(format!("unix://{path}"))
}

/// The name of the model's only input (or output).
fn single(
    model: &str,
    what: &str,
    tensors: &[remotemedia_proto::inference::model_metadata_response::TensorMetadata],
) -> Result<String, ClientError> {
    match tensors {
        [tensor] => Ok(tensor.name.clone()),
        _ => Err(ClientError::Model {
            reason: format!(
                "model {model:?} has {} {what}s; infer takes a model with one, use infer_many",
                tensors.len()
            ),
        }),
    }
}

fn deadline_exceeded(timeout: Option<Duration>) -> ClientError {
    ClientError::DeadlineExceeded {
        message: format!("no answer within {:?}", timeout.unwrap_or_default()),
    }
}
