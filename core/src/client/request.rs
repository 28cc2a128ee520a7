//! One inference request: where each tensor travels, and turning the answer into tensors.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use remotemedia_proto::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse,
    infer_parameter::ParameterChoice,
    model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
};
use remotemedia_proto::params::{
    BROKERED_BYTE_SIZE, BROKERED_OFFSET, BROKERED_REGION, SESSION_METADATA,
    SHARED_MEMORY_BYTE_SIZE, SHARED_MEMORY_OFFSET, SHARED_MEMORY_REGION,
};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};

use super::{ClientError, InferOutputs, ModelWorkerClient, OutputRequest};
use crate::shm::broker::BrokerClient;
use crate::tensor::{DataType, TensorBuffer, byte_size, check_size};

/// A request ready to send (again, if connecting failed), and what its answer needs.
pub(super) struct Prepared {
    request: ModelInferRequest,
    /// This process's broker session, when a tensor goes by brokered reference.
    session: Option<AsciiMetadataValue>,
    /// Shared-memory inputs stay mapped (and their regions alive) until the answer came: the
    /// server reads them in place.
    _shared_inputs: Vec<TensorBuffer>,
    outputs: Vec<PendingOutput>,
}

struct PendingOutput {
    name: String,
    into: Option<TensorBuffer>,
    /// The server writes it into `into` itself.
    by_reference: bool,
}

/// Parameters naming a tensor in shared memory, and whether they need the broker session.
struct Reference {
    parameters: HashMap<String, InferParameter>,
    brokered: bool,
}

/// A heap tensor as the bytes of `raw_input_contents`, without copying it.
struct Owned(TensorBuffer);

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl Prepared {
    pub(super) async fn build(
        client: &ModelWorkerClient,
        model: &str,
        inputs: Vec<(String, TensorBuffer)>,
        outputs: Vec<OutputRequest>,
    ) -> Result<Prepared, ClientError> {
        let mut request = ModelInferRequest {
            model_name: model.to_owned(),
            ..Default::default()
        };
        let mut brokered = false;
        let mut shared_inputs = Vec::new();
        for (name, tensor) in inputs {
            let mut input = InferInputTensor {
                name,
                datatype: tensor.dtype().triton_name().to_owned(),
                shape: wire_shape(tensor.shape())?,
                ..Default::default()
            };
            match reference(client, &tensor).await? {
                Some(reference) => {
                    input.parameters = reference.parameters;
                    brokered |= reference.brokered;
                    shared_inputs.push(tensor);
                }
                // Raw contents line up with the inputs that name no shared memory, in order.
                None => request
                    .raw_input_contents
                    .push(Bytes::from_owner(Owned(tensor))),
            }
            request.inputs.push(input);
        }
        let mut pending = Vec::with_capacity(outputs.len());
        for OutputRequest { name, into } in outputs {
            let mut output = InferRequestedOutputTensor {
                name: name.clone(),
                ..Default::default()
            };
            let mut by_reference = false;
            if let Some(into) = &into
                && let Some(reference) = reference(client, into).await?
            {
                output.parameters = reference.parameters;
                brokered |= reference.brokered;
                by_reference = true;
            }
            request.outputs.push(output);
            pending.push(PendingOutput {
                name,
                into,
                by_reference,
            });
        }
        let session = if brokered {
            Some(session_token()?)
        } else {
            None
        };
        Ok(Prepared {
            request,
            session,
            _shared_inputs: shared_inputs,
            outputs: pending,
        })
    }

    /// Sets the request's id (a stream matches answers to requests by it).
    pub(super) fn set_id(&mut self, id: String) {
        self.request.id = id;
    }

    /// The request message (cheap: tensor bytes are shared, not copied).
    pub(super) fn message(&self) -> ModelInferRequest {
        self.request.clone()
    }

    /// The gRPC request, with the time left as `grpc-timeout` and the broker session.
    pub(super) fn grpc_request(&self, left: Option<Duration>) -> tonic::Request<ModelInferRequest> {
        let mut request = tonic::Request::new(self.request.clone());
        if let Some(left) = left {
            request.set_timeout(left);
        }
        if let Some(session) = &self.session {
            request
                .metadata_mut()
                .insert(SESSION_METADATA, session.clone());
        }
        request
    }

    /// The answer as tensors: outputs the server wrote into the caller's tensors are those
    /// tensors, reshaped; inline outputs are copied into the caller's tensor or a new one.
    pub(super) fn finish(
        mut self,
        response: ModelInferResponse,
    ) -> Result<InferOutputs, ClientError> {
        let mut tensors = Vec::with_capacity(response.outputs.len());
        // Our servers leave an empty raw entry for each output written into shared memory, so
        // positions line up; a server that lists only the inline outputs' bytes is read by
        // counting those.
        let aligned = response.raw_output_contents.len() == response.outputs.len();
        let mut inline_seen = 0;
        for (position, output) in response.outputs.into_iter().enumerate() {
            let in_memory = [SHARED_MEMORY_REGION, BROKERED_REGION]
                .iter()
                .any(|key| output.parameters.contains_key(*key));
            let index = if aligned {
                Some(position)
            } else if in_memory {
                None
            } else {
                inline_seen += 1;
                Some(inline_seen - 1)
            };
            let dtype = DataType::from_triton_name(&output.datatype).ok_or_else(|| {
                bad(format!(
                    "output {:?} has datatype {:?}, which this client does not know",
                    output.name, output.datatype
                ))
            })?;
            let shape = output
                .shape
                .iter()
                .map(|&dim| usize::try_from(dim))
                .collect::<Result<Vec<usize>, _>>()
                .map_err(|_| bad(format!("output {:?} has a negative dimension", output.name)))?;
            let into = self
                .outputs
                .iter_mut()
                .find(|pending| pending.name == output.name)
                .and_then(|pending| Some((pending.into.take()?, pending.by_reference)));
            let raw = |shape: &[usize]| {
                raw_output(
                    &response.raw_output_contents,
                    index,
                    &output.name,
                    shape,
                    dtype,
                )
            };
            let tensor = match into {
                Some((mut into, by_reference)) => {
                    check_size(&shape, dtype, into.byte_len())?;
                    if !by_reference {
                        into.as_mut_slice().copy_from_slice(raw(&shape)?);
                    }
                    into.reshape(shape, dtype)?
                }
                None => TensorBuffer::copy_from_bytes(raw(&shape)?, shape, dtype)?,
            };
            tensors.push((output.name, tensor));
        }
        Ok(InferOutputs { tensors })
    }
}

/// The raw bytes of output `index`, checked against its shape and datatype.
fn raw_output<'a>(
    raw: &'a [Bytes],
    index: Option<usize>,
    name: &str,
    shape: &[usize],
    dtype: DataType,
) -> Result<&'a [u8], ClientError> {
    let bytes = index
        .and_then(|index| raw.get(index))
        .ok_or_else(|| bad(format!("output {name:?} came without its bytes")))?;
    let expected = byte_size(shape, dtype)?;
    if bytes.len() != expected {
        return Err(bad(format!(
            "output {name:?} has {} bytes, but its shape {shape:?} of {dtype} needs {expected}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// How `tensor` can be named instead of sent: `None` means inline.
async fn reference(
    client: &ModelWorkerClient,
    tensor: &TensorBuffer,
) -> Result<Option<Reference>, ClientError> {
    if tensor.byte_len() < client.inner.config.inline_threshold {
        return Ok(None);
    }
    let Some(region) = tensor.storage().region() else {
        return Ok(None);
    };
    let server = client.server().await?;
    let offset = tensor.storage().offset() as u64;
    let size = tensor.byte_len() as u64;
    let parameters = |keys: [&str; 3], region: String| {
        [
            (keys[0], ParameterChoice::StringParam(region)),
            (keys[1], ParameterChoice::Uint64Param(offset)),
            (keys[2], ParameterChoice::Uint64Param(size)),
        ]
        .into_iter()
        .map(|(key, choice)| {
            (
                key.to_owned(),
                InferParameter {
                    parameter_choice: Some(choice),
                },
            )
        })
        .collect()
    };
    if region.is_brokered() {
        return Ok(server.brokered.then(|| Reference {
            parameters: parameters(
                [BROKERED_REGION, BROKERED_OFFSET, BROKERED_BYTE_SIZE],
                region.id().to_string(),
            ),
            brokered: true,
        }));
    }
    if !server.named {
        return Ok(None);
    }
    Ok(client.registration(region).await?.map(|name| Reference {
        parameters: parameters(
            [
                SHARED_MEMORY_REGION,
                SHARED_MEMORY_OFFSET,
                SHARED_MEMORY_BYTE_SIZE,
            ],
            name,
        ),
        brokered: false,
    }))
}

/// The broker session token this process's brokered regions are held by, as metadata.
pub(super) fn session_token() -> Result<AsciiMetadataValue, ClientError> {
    let token = BrokerClient::from_env()
        .map_err(crate::shm::ShmError::from)?
        .and_then(|broker| broker.session_token())
        .ok_or(ClientError::NoBrokerSession)?;
    MetadataValue::try_from(token.to_hex())
        .map_err(|_| bad("a session token that is not ASCII".into()))
}

fn wire_shape(shape: &[usize]) -> Result<Vec<i64>, ClientError> {
    shape
        .iter()
        .map(|&dim| i64::try_from(dim))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            ClientError::Tensor(crate::tensor::TensorError::ShapeOverflow {
                shape: shape.to_vec(),
            })
        })
}

fn bad(reason: String) -> ClientError {
    ClientError::BadResponse { reason }
}

#[cfg(test)]
mod tests {
    use remotemedia_proto::inference::model_infer_response::InferOutputTensor;

    use super::*;

    fn output(name: &str, datatype: &str, shape: Vec<i64>, shared: bool) -> InferOutputTensor {
        let mut tensor = InferOutputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            ..Default::default()
        };
        if shared {
            let region = InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam("r".into())),
            };
            tensor
                .parameters
                .insert(SHARED_MEMORY_REGION.into(), region);
        }
        tensor
    }

    fn prepared(by_reference: TensorBuffer) -> Prepared {
        Prepared {
            request: ModelInferRequest::default(),
            session: None,
            _shared_inputs: Vec::new(),
            outputs: vec![PendingOutput {
                name: "A".into(),
                into: Some(by_reference),
                by_reference: true,
            }],
        }
    }

    #[test]
    fn inline_outputs_are_found_whether_or_not_shared_ones_leave_an_empty_raw_entry() {
        let b: Vec<u8> = bytemuck::cast_slice(&[7i32, -1]).to_vec();
        for raw in [
            vec![Bytes::new(), Bytes::from(b.clone())],
            vec![Bytes::from(b.clone())],
        ] {
            let written =
                TensorBuffer::from_vec(vec![1u8, 2, 3, 4], vec![4], DataType::U8).unwrap();
            let response = ModelInferResponse {
                outputs: vec![
                    output("A", "UINT8", vec![2, 2], true),
                    output("B", "INT32", vec![2], false),
                ],
                raw_output_contents: raw,
                ..Default::default()
            };
            let mut outputs = prepared(written).finish(response).unwrap();
            let a = outputs.take("A").unwrap();
            assert_eq!((a.shape(), a.as_bytes()), (&[2, 2][..], &[1, 2, 3, 4][..]));
            assert_eq!(outputs.get("B").unwrap().as_i32_slice().unwrap(), &[7, -1]);
        }
    }

    #[test]
    fn an_answer_whose_bytes_do_not_fit_its_shape_is_a_bad_response() {
        let written = TensorBuffer::from_vec(vec![0u8; 4], vec![4], DataType::U8).unwrap();
        let response = ModelInferResponse {
            outputs: vec![
                output("A", "UINT8", vec![4], true),
                output("B", "INT32", vec![3], false),
            ],
            raw_output_contents: vec![Bytes::new(), Bytes::from(vec![0u8; 8])],
            ..Default::default()
        };
        let error = prepared(written).finish(response).unwrap_err();
        assert!(
            matches!(error, ClientError::BadResponse { .. }),
            "{error:?}"
        );
        let written = TensorBuffer::from_vec(vec![0u8; 4], vec![4], DataType::U8).unwrap();
        let response = ModelInferResponse {
            outputs: vec![output("A", "UINT8", vec![-4], true)],
            raw_output_contents: vec![Bytes::new()],
            ..Default::default()
        };
        let error = prepared(written).finish(response).unwrap_err();
        assert!(error.to_string().contains("negative dimension"), "{error}");
    }
}
