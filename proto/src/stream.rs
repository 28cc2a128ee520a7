//! ModelStreamInfer, served the same way by the worker and the sidecar: each request runs as it
//! arrives, up to [`MAX_IN_FLIGHT`] at once, and its response goes back as soon as it is ready,
//! so one slow request does not hold up the others; clients match responses by `id`, as with
//! Triton. A failed request is answered in its own response (`error_message`, with its
//! `model_name` and `id` echoed) and the stream goes on; a stream that breaks ends with its
//! status.

use std::{future::Future, sync::Arc};

use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use crate::inference::{ModelInferRequest, ModelInferResponse, ModelStreamInferResponse};

/// Requests of one stream in progress at once; the stream reads no further until one finishes,
/// so a client cannot pile up unbounded work or responses.
pub const MAX_IN_FLIGHT: usize = 64;

/// The responses of a ModelStreamInfer stream whose requests `infer` answers.
pub fn pipeline<F, Fut>(
    mut inbound: Streaming<ModelInferRequest>,
    infer: F,
) -> ReceiverStream<Result<ModelStreamInferResponse, Status>>
where
    F: Fn(ModelInferRequest) -> Fut + Send + 'static,
    Fut: Future<Output = Result<ModelInferResponse, Status>> + Send + 'static,
{
    let (responses, stream) = mpsc::channel(MAX_IN_FLIGHT);
    tokio::spawn(async move {
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        loop {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            let request = match inbound.message().await {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(status) => {
                    // tonic reports a message over the size limit as OUT_OF_RANGE; gRPC's code
                    // for it is RESOURCE_EXHAUSTED.
                    let status = if status.code() == Code::OutOfRange {
                        Status::resource_exhausted(status.message())
                    } else {
                        status
                    };
                    let _ = responses.send(Err(status)).await;
                    break;
                }
            };
            let echo = ModelInferResponse {
                model_name: request.model_name.clone(),
                id: request.id.clone(),
                ..Default::default()
            };
            let answer = infer(request);
            let responses = responses.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let response = match answer.await {
                    Ok(response) => ModelStreamInferResponse {
                        error_message: String::new(),
                        infer_response: Some(response),
                    },
                    Err(status) => ModelStreamInferResponse {
                        error_message: status.message().to_owned(),
                        infer_response: Some(echo),
                    },
                };
                // A client that hung up gets nothing more; the work is already done.
                let _ = responses.send(Ok(response)).await;
            });
        }
    });
    ReceiverStream::new(stream)
}
