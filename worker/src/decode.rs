//! Turns a `ModelInferRequest` into validated tensors for a model's signature.
//!
//! Everything a client sends is checked here, before a backend sees it: datatype names, shapes
//! against the signature, shape × element size against the bytes given (with overflow-checked
//! arithmetic, so a tensor claiming 2 GiB backed by 16 bytes is refused without allocating), raw
//! versus typed `contents`, the number of raw entries, unknown or repeated inputs and outputs.
//! Raw tensor bytes stay the `Bytes` slices of the received message; typed `contents` are packed
//! into little-endian bytes once; tensors in shared memory (Triton's `shared_memory_*`
//! parameters) are resolved through the [`Resolve`]r passed in (the worker's registry, or a
//! request's own redeemed regions beside it), read in place. The module holds no server state
//! so the sidecar can reuse it.

use std::collections::HashSet;

use bytes::Bytes;
use remotemedia_proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest,
    infer_parameter::ParameterChoice,
    model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
};
use std::collections::HashMap;

use crate::{
    model::{ModelSignature, TensorSpec},
    shm::{OutputSlot, Resolve, SharedMemoryError, SharedMemoryRef},
    tensor::{DataType, TensorView},
};

/// Parameters that place a tensor in shared memory (Triton's system-shared-memory extension).
use remotemedia_proto::params::{
    SHARED_MEMORY_BYTE_SIZE as BYTE_SIZE_PARAMETER, SHARED_MEMORY_OFFSET as OFFSET_PARAMETER,
    SHARED_MEMORY_REGION as REGION_PARAMETER,
};
const SHARED_MEMORY_PARAMETERS: [&str; 3] =
    [REGION_PARAMETER, OFFSET_PARAMETER, BYTE_SIZE_PARAMETER];

/// Longest client-supplied name echoed back in an error, so a huge name cannot blow up the
/// status message (it travels in an HTTP/2 trailer).
const MAX_SHOWN_NAME: usize = 64;

/// Why a request does not fit the model. Every variant is the client's fault: INVALID_ARGUMENT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("request has no inputs")]
    NoInputs,
    #[error("unknown input '{name}': the model's inputs are {expected}")]
    UnknownInput { name: String, expected: String },
    #[error("input '{0}' is given more than once")]
    DuplicateInput(String),
    #[error("missing input '{0}'")]
    MissingInput(String),
    #[error("input '{name}': unknown datatype '{datatype}'")]
    UnknownDatatype { name: String, datatype: String },
    #[error("input '{0}': BYTES tensors are not supported")]
    BytesUnsupported(String),
    #[error("input '{name}': datatype {given} does not match the model's {expected}")]
    DatatypeMismatch {
        name: String,
        given: DataType,
        expected: DataType,
    },
    #[error("input '{name}': dimension {dim} is negative")]
    NegativeDimension { name: String, dim: i64 },
    #[error("input '{name}': shape {given:?} does not match the model's {expected:?}")]
    ShapeMismatch {
        name: String,
        given: Vec<i64>,
        expected: Vec<i64>,
    },
    #[error("input '{name}': shape {shape:?} of {datatype} is larger than memory can address")]
    SizeOverflow {
        name: String,
        shape: Vec<i64>,
        datatype: DataType,
    },
    #[error("{given} raw_input_contents entries for {expected} inputs")]
    RawCountMismatch { given: usize, expected: usize },
    #[error("input '{0}': contents and raw_input_contents are both given")]
    ContentsAndRaw(String),
    #[error(
        "input '{name}': {given} bytes given, but shape {shape:?} of {datatype} is {expected} bytes"
    )]
    ByteSizeMismatch {
        name: String,
        given: usize,
        expected: usize,
        shape: Vec<i64>,
        datatype: DataType,
    },
    #[error("input '{0}': no data; give raw_input_contents or contents")]
    MissingData(String),
    #[error("input '{name}': {datatype} has no typed contents field; send raw_input_contents")]
    NoTypedContents { name: String, datatype: DataType },
    #[error("input '{name}': {datatype} values belong in contents.{field}")]
    WrongContentsField {
        name: String,
        datatype: DataType,
        field: &'static str,
    },
    #[error("input '{name}': {given} values given, but shape {shape:?} has {expected} elements")]
    ElementCountMismatch {
        name: String,
        given: usize,
        expected: usize,
        shape: Vec<i64>,
    },
    #[error("input '{name}': value {value} is out of range for {datatype}")]
    ValueOutOfRange {
        name: String,
        value: String,
        datatype: DataType,
    },
    #[error("{kind} '{name}': shared-memory tensors are turned off on this worker")]
    SharedMemoryUnsupported { kind: &'static str, name: String },
    #[error("{kind} '{name}': {reason}")]
    InvalidSharedMemoryParameter {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("input '{0}': names a shared-memory region and also carries data")]
    SharedMemoryAndData(String),
    #[error("{kind} '{name}': {error}")]
    SharedMemory {
        kind: &'static str,
        name: String,
        error: SharedMemoryError,
    },
    #[error("unknown output '{name}' requested: the model's outputs are {expected}")]
    UnknownOutput { name: String, expected: String },
    #[error("output '{0}' is requested more than once")]
    DuplicateOutput(String),
}

/// A request that fits the model: its inputs in the order given, and the outputs to return.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The client's request id, echoed in the response.
    pub id: String,
    pub inputs: Vec<InputTensor>,
    pub outputs: Vec<RequestedOutput>,
}

/// An output to return: its index in the signature's outputs, and where it goes when the client
/// asked for it in shared memory (holding that region until the response is built).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestedOutput {
    pub index: usize,
    pub shared_memory: Option<OutputSlot>,
}

/// A validated input tensor: `data` is exactly shape × element size bytes (for a shared-memory
/// input, the client's pages themselves, holding the region while `data` lives).
#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

impl InferRequest {
    /// Borrowed views of the inputs, as backends take them.
    pub fn views(&self) -> Vec<TensorView<'_>> {
        self.inputs
            .iter()
            .map(|input| TensorView {
                name: &input.name,
                datatype: input.datatype,
                shape: &input.shape,
                data: &input.data,
            })
            .collect()
    }
}

/// Validates `request` against `signature`. Shared-memory tensors are resolved in
/// `shared_memory`; without one they are refused.
pub fn decode_request(
    request: ModelInferRequest,
    signature: &ModelSignature,
    shared_memory: Option<&dyn Resolve>,
) -> Result<InferRequest, DecodeError> {
    let ModelInferRequest {
        id,
        inputs,
        outputs,
        raw_input_contents,
        ..
    } = request;
    if inputs.is_empty() {
        return Err(DecodeError::NoInputs);
    }
    // As in Triton: raw bytes, when used, come one per input not in shared memory, in order,
    // and then no input may also carry typed contents.
    let inline_inputs = inputs
        .iter()
        .filter(|input| !names_shared_memory(&input.parameters))
        .count();
    let raw_mode = !raw_input_contents.is_empty();
    if raw_mode && raw_input_contents.len() != inline_inputs {
        return Err(DecodeError::RawCountMismatch {
            given: raw_input_contents.len(),
            expected: inline_inputs,
        });
    }
    let mut raw = raw_input_contents.into_iter();
    let mut seen = HashSet::new();
    let mut decoded = Vec::with_capacity(signature.inputs.len());
    for input in inputs {
        let shared = shared_memory_ref("input", &input.name, &input.parameters)?;
        let raw_data = if raw_mode && shared.is_none() {
            raw.next()
        } else {
            None
        };
        let tensor = decode_input(input, raw_data, shared, signature, shared_memory)?;
        if !seen.insert(tensor.name.clone()) {
            return Err(DecodeError::DuplicateInput(shown(&tensor.name)));
        }
        decoded.push(tensor);
    }
    if let Some(missing) = signature
        .inputs
        .iter()
        .find(|spec| !seen.contains(&spec.name))
    {
        return Err(DecodeError::MissingInput(missing.name.clone()));
    }
    Ok(InferRequest {
        id,
        inputs: decoded,
        outputs: decode_outputs(outputs, signature, shared_memory)?,
    })
}

fn decode_input(
    input: InferInputTensor,
    raw: Option<Bytes>,
    shared: Option<SharedMemoryRef>,
    signature: &ModelSignature,
    shared_memory: Option<&dyn Resolve>,
) -> Result<InputTensor, DecodeError> {
    let InferInputTensor {
        name,
        datatype,
        shape: dims,
        parameters: _,
        contents,
    } = input;
    let spec = find_spec(&signature.inputs, &name).ok_or_else(|| DecodeError::UnknownInput {
        name: shown(&name),
        expected: names(&signature.inputs),
    })?;
    let shared = match (shared, shared_memory) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(DecodeError::SharedMemoryUnsupported {
                kind: "input",
                name: shown(&name),
            });
        }
        (Some(reference), Some(registry)) => Some((reference, registry)),
    };
    let datatype = match DataType::from_name(&datatype) {
        Some(DataType::Bytes) => return Err(DecodeError::BytesUnsupported(shown(&name))),
        Some(datatype) => datatype,
        None => {
            return Err(DecodeError::UnknownDatatype {
                name: shown(&name),
                datatype: shown(&datatype),
            });
        }
    };
    if let Some(expected) = spec.datatype.filter(|&expected| expected != datatype) {
        return Err(DecodeError::DatatypeMismatch {
            name,
            given: datatype,
            expected,
        });
    }
    let shape = dims
        .iter()
        .map(|&dim| {
            usize::try_from(dim).map_err(|_| DecodeError::NegativeDimension {
                name: name.clone(),
                dim,
            })
        })
        .collect::<Result<Vec<usize>, _>>()?;
    if let Some(expected) = &spec.dims {
        let fits = expected.len() == dims.len()
            && expected
                .iter()
                .zip(&dims)
                .all(|(&want, &got)| want == -1 || want == got);
        if !fits {
            return Err(DecodeError::ShapeMismatch {
                name,
                given: dims,
                expected: expected.clone(),
            });
        }
    }
    let overflow = || DecodeError::SizeOverflow {
        name: name.clone(),
        shape: dims.clone(),
        datatype,
    };
    let elements = shape
        .iter()
        .try_fold(1usize, |count, &dim| count.checked_mul(dim))
        .ok_or_else(overflow)?;
    let element_size = datatype.element_size().ok_or_else(overflow)?;
    let byte_size = elements.checked_mul(element_size).ok_or_else(overflow)?;
    if let Some((reference, registry)) = shared {
        if contents.is_some() {
            return Err(DecodeError::SharedMemoryAndData(name));
        }
        if reference.byte_size != byte_size as u64 {
            return Err(DecodeError::ByteSizeMismatch {
                name,
                given: usize::try_from(reference.byte_size).unwrap_or(usize::MAX),
                expected: byte_size,
                shape: dims,
                datatype,
            });
        }
        let data = registry.input(&reference, element_size).map_err(|error| {
            DecodeError::SharedMemory {
                kind: "input",
                name: shown(&name),
                error,
            }
        })?;
        return Ok(InputTensor {
            name,
            datatype,
            shape,
            data,
        });
    }
    let data = match (raw, contents) {
        (Some(_), Some(_)) => return Err(DecodeError::ContentsAndRaw(name)),
        (Some(raw), None) => {
            if raw.len() != byte_size {
                return Err(DecodeError::ByteSizeMismatch {
                    name,
                    given: raw.len(),
                    expected: byte_size,
                    shape: dims,
                    datatype,
                });
            }
            raw
        }
        (None, Some(contents)) => pack_contents(&name, &dims, datatype, elements, contents)?,
        (None, None) if elements == 0 => Bytes::new(),
        (None, None) => return Err(DecodeError::MissingData(name)),
    };
    Ok(InputTensor {
        name,
        datatype,
        shape,
        data,
    })
}

fn decode_outputs(
    requested: Vec<InferRequestedOutputTensor>,
    signature: &ModelSignature,
    shared_memory: Option<&dyn Resolve>,
) -> Result<Vec<RequestedOutput>, DecodeError> {
    if requested.is_empty() {
        return Ok((0..signature.outputs.len())
            .map(|index| RequestedOutput {
                index,
                shared_memory: None,
            })
            .collect());
    }
    let mut indexes = Vec::with_capacity(requested.len().min(signature.outputs.len()));
    for output in requested {
        let index = signature
            .outputs
            .iter()
            .position(|spec| spec.name == output.name)
            .ok_or_else(|| DecodeError::UnknownOutput {
                name: shown(&output.name),
                expected: names(&signature.outputs),
            })?;
        if indexes
            .iter()
            .any(|wanted: &RequestedOutput| wanted.index == index)
        {
            return Err(DecodeError::DuplicateOutput(output.name));
        }
        let slot = match (
            shared_memory_ref("output", &output.name, &output.parameters)?,
            shared_memory,
        ) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(DecodeError::SharedMemoryUnsupported {
                    kind: "output",
                    name: shown(&output.name),
                });
            }
            (Some(reference), Some(registry)) => Some(registry.output(&reference).map_err(
                |error| DecodeError::SharedMemory {
                    kind: "output",
                    name: shown(&output.name),
                    error,
                },
            )?),
        };
        indexes.push(RequestedOutput {
            index,
            shared_memory: slot,
        });
    }
    Ok(indexes)
}

/// Reads Triton's three shared-memory parameters of a tensor: none of them means the tensor is
/// not in shared memory; otherwise the region and byte size are required and the offset
/// defaults to 0.
fn shared_memory_ref(
    kind: &'static str,
    name: &str,
    parameters: &HashMap<String, InferParameter>,
) -> Result<Option<SharedMemoryRef>, DecodeError> {
    if !names_shared_memory(parameters) {
        return Ok(None);
    }
    let invalid = |reason: String| DecodeError::InvalidSharedMemoryParameter {
        kind,
        name: shown(name),
        reason,
    };
    let region = match parameters
        .get(REGION_PARAMETER)
        .and_then(|parameter| parameter.parameter_choice.as_ref())
    {
        Some(ParameterChoice::StringParam(region)) if !region.is_empty() => region.clone(),
        _ => {
            return Err(invalid(format!(
                "{REGION_PARAMETER} must be a non-empty string"
            )));
        }
    };
    let number = |key: &str| remotemedia_proto::params::unsigned(parameters, key).map_err(&invalid);
    let offset = number(OFFSET_PARAMETER)?.unwrap_or(0);
    let byte_size = number(BYTE_SIZE_PARAMETER)?
        .ok_or_else(|| invalid(format!("{BYTE_SIZE_PARAMETER} is required")))?;
    Ok(Some(SharedMemoryRef {
        region,
        offset,
        byte_size,
    }))
}

/// Packs typed `contents` into little-endian bytes, after checking that the values sit in the
/// field for `datatype`, that no other field holds values, and that the count matches the shape.
fn pack_contents(
    name: &str,
    dims: &[i64],
    datatype: DataType,
    elements: usize,
    contents: InferTensorContents,
) -> Result<Bytes, DecodeError> {
    let InferTensorContents {
        bool_contents,
        int_contents,
        int64_contents,
        uint_contents,
        uint64_contents,
        fp32_contents,
        fp64_contents,
        bytes_contents,
    } = contents;
    let field = match datatype {
        DataType::Bool => "bool_contents",
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "int_contents",
        DataType::Int64 => "int64_contents",
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => "uint_contents",
        DataType::Uint64 => "uint64_contents",
        DataType::Fp32 => "fp32_contents",
        DataType::Fp64 => "fp64_contents",
        DataType::Fp16 | DataType::Bf16 | DataType::Bytes => "",
    };
    let fields = [
        ("bool_contents", bool_contents.len()),
        ("int_contents", int_contents.len()),
        ("int64_contents", int64_contents.len()),
        ("uint_contents", uint_contents.len()),
        ("uint64_contents", uint64_contents.len()),
        ("fp32_contents", fp32_contents.len()),
        ("fp64_contents", fp64_contents.len()),
        ("bytes_contents", bytes_contents.len()),
    ];
    let given = fields
        .iter()
        .find(|(candidate, _)| *candidate == field)
        .map_or(0, |(_, len)| *len);
    if fields
        .iter()
        .any(|(candidate, len)| *candidate != field && *len > 0)
    {
        if field.is_empty() {
            return Err(DecodeError::NoTypedContents {
                name: name.to_owned(),
                datatype,
            });
        }
        return Err(DecodeError::WrongContentsField {
            name: name.to_owned(),
            datatype,
            field,
        });
    }
    if given != elements {
        return Err(DecodeError::ElementCountMismatch {
            name: name.to_owned(),
            given,
            expected: elements,
            shape: dims.to_vec(),
        });
    }
    let out_of_range = |value: String| DecodeError::ValueOutOfRange {
        name: name.to_owned(),
        value,
        datatype,
    };
    let packed = match datatype {
        DataType::Bool => bool_contents.into_iter().map(u8::from).collect(),
        DataType::Int8 => pack(&int_contents, |v| i8::try_from(v).ok(), out_of_range)?,
        DataType::Int16 => pack(&int_contents, |v| i16::try_from(v).ok(), out_of_range)?,
        DataType::Int32 => pack(&int_contents, Some, out_of_range)?,
        DataType::Int64 => pack(&int64_contents, Some, out_of_range)?,
        DataType::Uint8 => pack(&uint_contents, |v| u8::try_from(v).ok(), out_of_range)?,
        DataType::Uint16 => pack(&uint_contents, |v| u16::try_from(v).ok(), out_of_range)?,
        DataType::Uint32 => pack(&uint_contents, Some, out_of_range)?,
        DataType::Uint64 => pack(&uint64_contents, Some, out_of_range)?,
        DataType::Fp32 => pack(&fp32_contents, Some, out_of_range)?,
        DataType::Fp64 => pack(&fp64_contents, Some, out_of_range)?,
        // Only reachable with zero elements: the checks above refuse any value for these.
        DataType::Fp16 | DataType::Bf16 | DataType::Bytes => Vec::new(),
    };
    Ok(Bytes::from(packed))
}

/// A value that can be written as little-endian bytes.
trait LittleEndian: Copy {
    fn extend_le(self, out: &mut Vec<u8>);
}

macro_rules! little_endian {
    ($($ty:ty),*) => {
        $(impl LittleEndian for $ty {
            fn extend_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        })*
    };
}
little_endian!(i8, i16, i32, i64, u8, u16, u32, u64, f32, f64);

/// Converts each value (narrowing where the datatype is smaller than the field) and packs it.
fn pack<T, U>(
    values: &[T],
    convert: impl Fn(T) -> Option<U>,
    out_of_range: impl Fn(String) -> DecodeError,
) -> Result<Vec<u8>, DecodeError>
where
    T: Copy + ToString,
    U: LittleEndian,
{
    let mut out = Vec::with_capacity(std::mem::size_of_val(values));
    for &value in values {
        convert(value)
            .ok_or_else(|| out_of_range(value.to_string()))?
            .extend_le(&mut out);
    }
    Ok(out)
}

fn find_spec<'a>(specs: &'a [TensorSpec], name: &str) -> Option<&'a TensorSpec> {
    specs.iter().find(|spec| spec.name == name)
}

fn names_shared_memory(parameters: &HashMap<String, InferParameter>) -> bool {
    SHARED_MEMORY_PARAMETERS
        .iter()
        .any(|key| parameters.contains_key(*key))
}

fn names(specs: &[TensorSpec]) -> String {
    let names: Vec<&str> = specs.iter().map(|spec| spec.name.as_str()).collect();
    format!("[{}]", names.join(", "))
}

/// A client-supplied string cut to a length fit for an error message.
pub(crate) fn shown(text: &str) -> String {
    match text.char_indices().nth(MAX_SHOWN_NAME) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use remotemedia_proto::inference::infer_parameter::ParameterChoice;

    use super::*;
    use crate::shm::SharedMemoryRegistry;

    fn spec(name: &str, datatype: Option<DataType>, dims: Option<Vec<i64>>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype,
            dims,
        }
    }

    /// One input of any datatype and shape, one output: the built-in identity.
    fn any_signature() -> ModelSignature {
        ModelSignature {
            inputs: vec![spec("INPUT0", None, None)],
            outputs: vec![spec("OUTPUT0", None, None)],
        }
    }

    /// Two FP32 inputs of shape [-1, 4] and two outputs.
    fn typed_signature() -> ModelSignature {
        let fp32 = |name: &str| spec(name, Some(DataType::Fp32), Some(vec![-1, 4]));
        ModelSignature {
            inputs: vec![fp32("A"), fp32("B")],
            outputs: vec![fp32("X"), fp32("Y")],
        }
    }

    fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        }
    }

    fn raw_request(inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            id: "req-1".into(),
            inputs,
            raw_input_contents: raw.into_iter().map(Bytes::from).collect(),
            ..Default::default()
        }
    }

    fn decode_any(request: ModelInferRequest) -> Result<InferRequest, DecodeError> {
        decode_request(request, &any_signature(), None)
    }

    fn output_indexes(request: &InferRequest) -> Vec<usize> {
        request.outputs.iter().map(|output| output.index).collect()
    }

    #[test]
    fn raw_input_is_accepted_and_keeps_the_received_bytes() {
        let request = raw_request(vec![input("INPUT0", "FP32", &[2, 3])], vec![vec![1; 24]]);
        let received = request.raw_input_contents[0].clone();
        let decoded = decode_any(request).unwrap();
        assert_eq!(decoded.id, "req-1");
        assert_eq!(output_indexes(&decoded), [0]);
        let tensor = &decoded.inputs[0];
        assert_eq!(
            (tensor.datatype, tensor.shape.as_slice()),
            (DataType::Fp32, &[2, 3][..])
        );
        // Same buffer, not a copy: large tensors must not be duplicated on the way in.
        assert_eq!(tensor.data.as_ptr(), received.as_ptr());
    }

    #[test]
    fn unknown_datatype_name_is_refused() {
        let request = raw_request(vec![input("INPUT0", "FLOAT32", &[1])], vec![vec![0; 4]]);
        assert!(matches!(
            decode_any(request),
            Err(DecodeError::UnknownDatatype { .. })
        ));
    }

    #[test]
    fn bytes_tensors_are_refused() {
        let request = raw_request(vec![input("INPUT0", "BYTES", &[1])], vec![vec![0; 8]]);
        assert_eq!(
            decode_any(request),
            Err(DecodeError::BytesUnsupported("INPUT0".into()))
        );
    }

    #[test]
    fn datatype_other_than_the_models_is_refused() {
        let inputs = vec![input("A", "INT32", &[1, 4]), input("B", "FP32", &[1, 4])];
        let request = raw_request(inputs, vec![vec![0; 16], vec![0; 16]]);
        assert!(matches!(
            decode_request(request, &typed_signature(), None),
            Err(DecodeError::DatatypeMismatch {
                expected: DataType::Fp32,
                given: DataType::Int32,
                ..
            })
        ));
    }

    #[test]
    fn shape_that_does_not_fit_the_models_dims_is_refused() {
        for shape in [&[1, 5][..], &[4][..], &[1, 4, 1][..]] {
            let size = shape.iter().product::<i64>() as usize * 4;
            let inputs = vec![input("A", "FP32", shape), input("B", "FP32", &[1, 4])];
            let request = raw_request(inputs, vec![vec![0; size], vec![0; 16]]);
            assert!(
                matches!(
                    decode_request(request, &typed_signature(), None),
                    Err(DecodeError::ShapeMismatch { .. })
                ),
                "{shape:?}"
            );
        }
    }

    #[test]
    fn variable_dims_accept_any_size() {
        let inputs = vec![input("A", "FP32", &[7, 4]), input("B", "FP32", &[0, 4])];
        let request = raw_request(inputs, vec![vec![0; 112], vec![]]);
        let decoded = decode_request(request, &typed_signature(), None).unwrap();
        assert_eq!(decoded.inputs[1].shape, [0, 4]);
        assert_eq!(output_indexes(&decoded), [0, 1]);
    }

    #[test]
    fn negative_dimension_is_refused() {
        let request = raw_request(vec![input("INPUT0", "UINT8", &[-1])], vec![vec![]]);
        assert!(matches!(
            decode_any(request),
            Err(DecodeError::NegativeDimension { dim: -1, .. })
        ));
    }

    #[test]
    fn byte_size_other_than_shape_times_element_size_is_refused() {
        let request = raw_request(vec![input("INPUT0", "FP32", &[4])], vec![vec![0; 15]]);
        assert!(matches!(
            decode_any(request),
            Err(DecodeError::ByteSizeMismatch {
                given: 15,
                expected: 16,
                ..
            })
        ));
    }

    #[test]
    fn tensor_claiming_two_gib_backed_by_sixteen_bytes_is_refused() {
        let request = raw_request(
            vec![input("INPUT0", "UINT8", &[1 << 31])],
            vec![vec![0; 16]],
        );
        assert!(matches!(
            decode_any(request),
            Err(DecodeError::ByteSizeMismatch {
                given: 16,
                expected: 2147483648,
                ..
            })
        ));
    }

    #[test]
    fn shape_whose_size_overflows_is_refused() {
        let shape = [i64::MAX, i64::MAX, 2];
        let request = raw_request(vec![input("INPUT0", "FP64", &shape)], vec![vec![0; 16]]);
        assert!(matches!(
            decode_any(request),
            Err(DecodeError::SizeOverflow { .. })
        ));
        // The product fits, the byte size does not.
        let request = raw_request(vec![input("INPUT0", "FP64", &[1 << 62])], vec![vec![0; 16]]);
        assert!(matches!(
            decode_any(request),
            Err(DecodeError::SizeOverflow { .. })
        ));
    }

    #[test]
    fn contents_and_raw_for_the_same_input_are_refused() {
        let mut tensor = input("INPUT0", "INT32", &[1]);
        tensor.contents = Some(InferTensorContents {
            int_contents: vec![5],
            ..Default::default()
        });
        let request = raw_request(vec![tensor], vec![vec![0; 4]]);
        assert_eq!(
            decode_any(request),
            Err(DecodeError::ContentsAndRaw("INPUT0".into()))
        );
    }

    #[test]
    fn raw_entries_must_match_the_inputs_one_to_one() {
        let inputs = vec![input("A", "FP32", &[1, 4]), input("B", "FP32", &[1, 4])];
        let request = raw_request(inputs, vec![vec![0; 16]]);
        assert_eq!(
            decode_request(request, &typed_signature(), None),
            Err(DecodeError::RawCountMismatch {
                given: 1,
                expected: 2
            })
        );
    }

    #[test]
    fn empty_request_is_refused() {
        assert_eq!(
            decode_any(ModelInferRequest::default()),
            Err(DecodeError::NoInputs)
        );
    }

    #[test]
    fn unknown_missing_and_repeated_inputs_are_refused() {
        let request = raw_request(vec![input("NOPE", "FP32", &[1])], vec![vec![0; 4]]);
        assert!(matches!(
            decode_any(request),
            Err(DecodeError::UnknownInput { .. })
        ));
        let request = raw_request(vec![input("A", "FP32", &[1, 4])], vec![vec![0; 16]]);
        assert_eq!(
            decode_request(request, &typed_signature(), None),
            Err(DecodeError::MissingInput("B".into()))
        );
        let inputs = vec![input("A", "FP32", &[1, 4]), input("A", "FP32", &[1, 4])];
        let request = raw_request(inputs, vec![vec![0; 16], vec![0; 16]]);
        assert_eq!(
            decode_request(request, &typed_signature(), None),
            Err(DecodeError::DuplicateInput("A".into()))
        );
    }

    #[test]
    fn requested_outputs_are_resolved_in_the_order_asked() {
        let inputs = vec![input("A", "FP32", &[1, 4]), input("B", "FP32", &[1, 4])];
        let mut request = raw_request(inputs, vec![vec![0; 16], vec![0; 16]]);
        let output = |name: &str| InferRequestedOutputTensor {
            name: name.into(),
            ..Default::default()
        };
        request.outputs = vec![output("Y"), output("X")];
        let decoded = decode_request(request.clone(), &typed_signature(), None).unwrap();
        assert_eq!(output_indexes(&decoded), [1, 0]);

        request.outputs = vec![output("Z")];
        assert!(matches!(
            decode_request(request.clone(), &typed_signature(), None),
            Err(DecodeError::UnknownOutput { .. })
        ));
        request.outputs = vec![output("X"), output("X")];
        assert_eq!(
            decode_request(request, &typed_signature(), None),
            Err(DecodeError::DuplicateOutput("X".into()))
        );
    }

    fn shared_parameters(
        parameters: &mut HashMap<String, InferParameter>,
        region: &str,
        offset: i64,
        byte_size: i64,
    ) {
        let mut set = |key: &str, choice| {
            parameters.insert(
                key.into(),
                InferParameter {
                    parameter_choice: Some(choice),
                },
            );
        };
        set(
            REGION_PARAMETER,
            ParameterChoice::StringParam(region.into()),
        );
        set(OFFSET_PARAMETER, ParameterChoice::Int64Param(offset));
        set(BYTE_SIZE_PARAMETER, ParameterChoice::Int64Param(byte_size));
    }

    fn shared_input(name: &str, shape: &[i64], offset: i64, byte_size: i64) -> InferInputTensor {
        let mut tensor = input(name, "FP32", shape);
        shared_parameters(&mut tensor.parameters, "r", offset, byte_size);
        tensor
    }

    /// A client region of 4 KiB holding 0, 1, 2, … registered as `r`.
    fn registry_with_region() -> (remotemedia_runtime_core::shm::Region, SharedMemoryRegistry) {
        let mut client = remotemedia_runtime_core::shm::Region::create_named(
            std::num::NonZeroUsize::new(4096).unwrap(),
        )
        .unwrap();
        for (i, byte) in client.as_mut_slice().iter_mut().enumerate() {
            *byte = i as u8;
        }
        let registry = SharedMemoryRegistry::unmeasured();
        registry.register("r", client.id(), 0, 4096).unwrap();
        (client, registry)
    }

    #[test]
    fn shared_memory_tensors_are_refused_when_turned_off() {
        let request = raw_request(vec![shared_input("INPUT0", &[4], 0, 16)], vec![]);
        assert!(matches!(
            decode_any(request),
            Err(DecodeError::SharedMemoryUnsupported { kind: "input", .. })
        ));
    }

    #[test]
    fn shared_memory_inputs_mix_with_raw_ones_and_are_read_in_place() {
        let (client, registry) = registry_with_region();
        // A in shared memory, B raw: the one raw entry belongs to B.
        let inputs = vec![
            shared_input("A", &[1, 4], 64, 16),
            input("B", "FP32", &[1, 4]),
        ];
        let request = raw_request(inputs, vec![vec![9; 16]]);
        let decoded = decode_request(request, &typed_signature(), Some(&registry)).unwrap();
        assert_eq!(decoded.inputs[0].data.as_ref(), &client.as_slice()[64..80]);
        assert_ne!(
            decoded.inputs[0].data.as_ptr(),
            client.as_slice()[64..].as_ptr(),
            "the worker reads its own private mapping, not the client's"
        );
        assert_eq!(decoded.inputs[1].data.as_ref(), [9; 16]);
    }

    #[test]
    fn bad_shared_memory_inputs_get_their_errors() {
        let (_client, registry) = registry_with_region();
        let decode = |tensor: InferInputTensor| {
            let request = raw_request(vec![tensor], vec![]);
            decode_request(request, &any_signature(), Some(&registry))
        };
        assert!(matches!(
            decode(shared_input("INPUT0", &[4], 0, 12)),
            Err(DecodeError::ByteSizeMismatch {
                given: 12,
                expected: 16,
                ..
            })
        ));
        assert!(matches!(
            decode(shared_input("INPUT0", &[4], 4090, 16)),
            Err(DecodeError::SharedMemory {
                error: SharedMemoryError::OutOfRange { .. },
                ..
            })
        ));
        let mut unknown = input("INPUT0", "FP32", &[4]);
        shared_parameters(&mut unknown.parameters, "nope", 0, 16);
        assert!(matches!(
            decode(unknown),
            Err(DecodeError::SharedMemory {
                error: SharedMemoryError::NotRegistered(_),
                ..
            })
        ));
        let mut negative = shared_input("INPUT0", &[4], -1, 16);
        assert!(matches!(
            decode(negative.clone()),
            Err(DecodeError::InvalidSharedMemoryParameter { .. })
        ));
        negative.parameters.remove(BYTE_SIZE_PARAMETER);
        negative.parameters.remove(OFFSET_PARAMETER);
        let message = decode(negative).unwrap_err().to_string();
        assert!(
            message.contains("shared_memory_byte_size is required"),
            "{message}"
        );
        let mut with_contents = shared_input("INPUT0", &[1], 0, 4);
        with_contents.contents = Some(InferTensorContents {
            fp32_contents: vec![1.0],
            ..Default::default()
        });
        assert_eq!(
            decode(with_contents),
            Err(DecodeError::SharedMemoryAndData("INPUT0".into()))
        );
    }

    #[test]
    fn shared_memory_outputs_hold_their_slot() {
        let (_client, registry) = registry_with_region();
        let inputs = vec![input("A", "FP32", &[1, 4]), input("B", "FP32", &[1, 4])];
        let mut request = raw_request(inputs, vec![vec![0; 16], vec![0; 16]]);
        let mut output = InferRequestedOutputTensor {
            name: "Y".into(),
            ..Default::default()
        };
        shared_parameters(&mut output.parameters, "r", 128, 16);
        request.outputs = vec![output];
        let decoded = decode_request(request.clone(), &typed_signature(), Some(&registry)).unwrap();
        assert_eq!(decoded.outputs[0].index, 1);
        let slot = decoded.outputs[0].shared_memory.as_ref().unwrap();
        assert_eq!(
            (slot.reference().offset, slot.reference().byte_size),
            (128, 16)
        );
        assert!(matches!(
            decode_request(request, &typed_signature(), None),
            Err(DecodeError::SharedMemoryUnsupported { kind: "output", .. })
        ));
    }

    fn typed_request(
        datatype: &str,
        shape: &[i64],
        contents: InferTensorContents,
    ) -> ModelInferRequest {
        let mut tensor = input("INPUT0", datatype, shape);
        tensor.contents = Some(contents);
        raw_request(vec![tensor], vec![])
    }

    #[test]
    fn typed_contents_are_packed_little_endian() {
        let contents = InferTensorContents {
            int_contents: vec![-2, 300],
            ..Default::default()
        };
        let decoded = decode_any(typed_request("INT16", &[2], contents)).unwrap();
        assert_eq!(decoded.inputs[0].data.as_ref(), [0xfe, 0xff, 0x2c, 0x01]);

        let contents = InferTensorContents {
            bool_contents: vec![true, false, true],
            ..Default::default()
        };
        let decoded = decode_any(typed_request("BOOL", &[3], contents)).unwrap();
        assert_eq!(decoded.inputs[0].data.as_ref(), [1, 0, 1]);
    }

    #[test]
    fn typed_contents_out_of_range_for_the_datatype_are_refused() {
        let contents = InferTensorContents {
            uint_contents: vec![256],
            ..Default::default()
        };
        assert!(matches!(
            decode_any(typed_request("UINT8", &[1], contents)),
            Err(DecodeError::ValueOutOfRange { .. })
        ));
    }

    #[test]
    fn typed_contents_in_the_wrong_field_or_count_are_refused() {
        let contents = InferTensorContents {
            int_contents: vec![1],
            ..Default::default()
        };
        assert!(matches!(
            decode_any(typed_request("FP32", &[1], contents.clone())),
            Err(DecodeError::WrongContentsField {
                field: "fp32_contents",
                ..
            })
        ));
        assert!(matches!(
            decode_any(typed_request("FP16", &[1], contents.clone())),
            Err(DecodeError::NoTypedContents { .. })
        ));
        assert!(matches!(
            decode_any(typed_request("INT32", &[2], contents)),
            Err(DecodeError::ElementCountMismatch {
                given: 1,
                expected: 2,
                ..
            })
        ));
    }

    #[test]
    fn input_without_data_is_refused_unless_empty() {
        let request = raw_request(vec![input("INPUT0", "FP32", &[2])], vec![]);
        assert_eq!(
            decode_any(request),
            Err(DecodeError::MissingData("INPUT0".into()))
        );
        let request = raw_request(vec![input("INPUT0", "FP32", &[0, 3])], vec![]);
        assert!(decode_any(request).unwrap().inputs[0].data.is_empty());
    }

    #[test]
    fn long_names_are_cut_in_error_messages() {
        let name = "n".repeat(10_000);
        let request = raw_request(vec![input(&name, "FP32", &[1])], vec![vec![0; 4]]);
        let message = decode_any(request).unwrap_err().to_string();
        assert!(message.len() < 200, "{message}");
    }

    fn datatype_strategy() -> impl Strategy<Value = DataType> {
        prop::sample::select(
            DataType::ALL
                .into_iter()
                .filter(|datatype| *datatype != DataType::Bytes)
                .collect::<Vec<_>>(),
        )
    }

    proptest! {
        #[test]
        fn raw_input_is_accepted_exactly_when_its_length_is_shape_times_element_size(
            datatype in datatype_strategy(),
            shape in prop::collection::vec(0i64..6, 0..4),
            delta in -3i64..3,
        ) {
            let size = datatype.element_size().unwrap() as i64 * shape.iter().product::<i64>();
            let len = (size + delta).max(0) as usize;
            let request = raw_request(
                vec![input("INPUT0", datatype.name(), &shape)],
                vec![vec![0xab; len]],
            );
            // A zero-length raw entry is still one entry per input.
            match decode_any(request) {
                Ok(decoded) => {
                    prop_assert_eq!(len as i64, size);
                    prop_assert_eq!(decoded.inputs[0].data.len(), len);
                }
                Err(error) => {
                    prop_assert_ne!(len as i64, size);
                    let is_size_mismatch = matches!(error, DecodeError::ByteSizeMismatch { .. });
                    prop_assert!(is_size_mismatch);
                }
            }
        }

        #[test]
        fn any_shape_and_payload_decode_without_panicking_and_never_trust_the_shape(
            datatype in datatype_strategy(),
            shape in prop::collection::vec(any::<i64>(), 0..5),
            len in 0usize..64,
        ) {
            let request = raw_request(
                vec![input("INPUT0", datatype.name(), &shape)],
                vec![vec![1; len]],
            );
            if let Ok(decoded) = decode_any(request) {
                let elements: i128 = shape.iter().map(|&dim| i128::from(dim)).product();
                prop_assert_eq!(elements * datatype.element_size().unwrap() as i128, len as i128);
                prop_assert_eq!(decoded.inputs[0].data.len(), len);
            }
        }

        #[test]
        fn fp32_contents_pack_to_the_same_bytes_as_raw(values in prop::collection::vec(any::<f32>(), 0..32)) {
            let shape = [values.len() as i64];
            let typed = decode_any(typed_request("FP32", &shape, InferTensorContents {
                fp32_contents: values.clone(),
                ..Default::default()
            })).unwrap();
            let raw: Vec<u8> = values.iter().flat_map(|value| value.to_le_bytes()).collect();
            prop_assert_eq!(typed.inputs[0].data.as_ref(), raw.as_slice());
        }

        #[test]
        fn arbitrary_requests_decode_without_panicking(
            names in prop::collection::vec("[A-Z0-9]{0,7}", 0..4),
            datatypes in prop::collection::vec("[A-Z0-9]{0,6}", 0..4),
            raw_lens in prop::collection::vec(0usize..32, 0..4),
            ints in prop::collection::vec(any::<i32>(), 0..8),
        ) {
            let inputs = names
                .iter()
                .zip(datatypes.iter().cycle())
                .map(|(name, datatype)| {
                    let mut tensor = input(name, datatype, &[ints.len() as i64]);
                    if raw_lens.is_empty() {
                        tensor.contents = Some(InferTensorContents {
                            int_contents: ints.clone(),
                            ..Default::default()
                        });
                    }
                    tensor
                })
                .collect();
            let raw = raw_lens.iter().map(|&len| vec![0; len]).collect();
            let _ = decode_request(raw_request(inputs, raw), &typed_signature(), None);
        }
    }
}
