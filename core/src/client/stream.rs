//! `ModelStreamInfer`: many requests on one stream, answered in any order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use remotemedia_proto::inference::{
    ModelInferRequest, ModelMetadataResponse, ModelStreamInferResponse,
};
use remotemedia_proto::params::SESSION_METADATA;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::error::Failure;
use super::request::{Prepared, session_token};
use super::{ClientError, InferOutputs, IntoTensor, ModelWorkerClient, OutputRequest, single};
use crate::tensor::TensorBuffer;

/// Requests queued for the stream before [`InferStream::send`] waits.
const SEND_QUEUE: usize = 16;

/// An open `ModelStreamInfer` stream to one model. [`InferStream::send`] queues a request and
/// returns its id; [`InferStream::next`] returns answers as they arrive, each with its id.
/// Shared-memory tensors of a request stay alive until its answer came.
pub struct InferStream {
    client: ModelWorkerClient,
    model: String,
    metadata: Arc<ModelMetadataResponse>,
    requests: Option<mpsc::Sender<ModelInferRequest>>,
    responses: Streaming<ModelStreamInferResponse>,
    pending: HashMap<u64, Prepared>,
    next_id: u64,
    /// Set when the stream broke: every pending request is answered with this, then `None`.
    broken: Option<String>,
    lost: VecDeque<u64>,
}

/// One answer of a stream: the id [`InferStream::send`] returned, and the outcome.
#[derive(Debug)]
pub struct StreamResponse {
    pub id: u64,
    pub result: Result<InferOutputs, ClientError>,
}

impl std::fmt::Debug for InferStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferStream")
            .field("model", &self.model)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl InferStream {
    pub(super) async fn open(
        client: ModelWorkerClient,
        model: String,
        metadata: Arc<ModelMetadataResponse>,
    ) -> Result<Self, ClientError> {
        // Brokered tensors may come later on this stream: send the session with the stream
        // when the server takes them and this process has one.
        let session = if client.server().await?.brokered {
            session_token().ok()
        } else {
            None
        };
        // Each attempt gets a fresh request channel: a failed attempt consumed its receiver.
        let sender = Mutex::new(None);
        let responses = client
            .call(None, |mut grpc, _| {
                let (requests, receiver) = mpsc::channel(SEND_QUEUE);
                *sender.lock().unwrap_or_else(|e| e.into_inner()) = Some(requests);
                let mut request = tonic::Request::new(ReceiverStream::new(receiver));
                if let Some(session) = &session {
                    request
                        .metadata_mut()
                        .insert(SESSION_METADATA, session.clone());
                }
                async move { grpc.model_stream_infer(request).await }
            })
            .await?;
        let requests = sender.into_inner().unwrap_or_else(|e| e.into_inner());
        Ok(Self {
            client,
            model,
            metadata,
            requests,
            responses,
            pending: HashMap::new(),
            next_id: 0,
            broken: None,
            lost: VecDeque::new(),
        })
    }

    /// Queues one tensor for a model with one input (as [`ModelWorkerClient::infer`]); the
    /// answer carries the returned id.
    pub async fn send(&mut self, input: impl IntoTensor) -> Result<u64, ClientError> {
        let input = input.into_tensor()?;
        let name = single(&self.model, "input", &self.metadata.inputs)?;
        self.send_many(vec![(name, input)], Vec::new()).await
    }

    /// Queues a request with named inputs and outputs (as [`ModelWorkerClient::infer_many`]).
    pub async fn send_many(
        &mut self,
        inputs: Vec<(String, TensorBuffer)>,
        outputs: Vec<OutputRequest>,
    ) -> Result<u64, ClientError> {
        let lost = || ClientError::ConnectionLost {
            endpoint: self.client.endpoint().to_owned(),
            reason: "the stream is closed".into(),
        };
        let Some(requests) = &self.requests else {
            return Err(lost());
        };
        let mut prepared = Prepared::build(&self.client, &self.model, inputs, outputs).await?;
        let id = self.next_id;
        self.next_id += 1;
        prepared.set_id(id.to_string());
        requests
            .send(prepared.message())
            .await
            .map_err(|_| lost())?;
        self.pending.insert(id, prepared);
        Ok(id)
    }

    /// Ends the sending side; answers to requests already sent still arrive.
    pub fn close_send(&mut self) {
        self.requests = None;
    }

    /// Requests sent and not answered yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The next answer, or `None` when nothing more will come: every sent request gets one
    /// answer, an error of its own if the stream broke before it was answered.
    pub async fn next(&mut self) -> Option<StreamResponse> {
        if let Some(response) = self.next_lost() {
            return Some(response);
        }
        if self.broken.is_some() {
            return None;
        }
        let failure = match self.responses.message().await {
            Ok(Some(response)) => return Some(self.answer(response)),
            Ok(None) => "the server ended the stream".to_owned(),
            Err(status) => match Failure::classify(status) {
                Failure::Connect => "failed to connect".to_owned(),
                Failure::Deadline => "the deadline passed".to_owned(),
                Failure::Lost(reason) => reason,
                Failure::Answered(error) => error.to_string(),
            },
        };
        self.broken = Some(failure);
        self.requests = None;
        let mut ids: Vec<u64> = self.pending.keys().copied().collect();
        ids.sort_unstable();
        self.lost = ids.into();
        self.next_lost()
    }

    fn next_lost(&mut self) -> Option<StreamResponse> {
        let id = self.lost.pop_front()?;
        self.pending.remove(&id);
        Some(StreamResponse {
            id,
            result: Err(ClientError::ConnectionLost {
                endpoint: self.client.endpoint().to_owned(),
                reason: self.broken.clone().unwrap_or_default(),
            }),
        })
    }

    fn answer(&mut self, response: ModelStreamInferResponse) -> StreamResponse {
        let ModelStreamInferResponse {
            error_message,
            infer_response,
        } = response;
        let infer_response = infer_response.unwrap_or_default();
        let id = infer_response.id.parse::<u64>().ok();
        let Some((id, prepared)) = id.and_then(|id| Some((id, self.pending.remove(&id)?))) else {
            return StreamResponse {
                id: id.unwrap_or(u64::MAX),
                result: Err(ClientError::BadResponse {
                    reason: format!(
                        "an answer for a request this stream did not send ({:?})",
                        infer_response.id.chars().take(32).collect::<String>()
                    ),
                }),
            };
        };
        let result = if error_message.is_empty() {
            prepared.finish(infer_response)
        } else {
            Err(ClientError::Rejected {
                message: error_message,
            })
        };
        StreamResponse { id, result }
    }
}
