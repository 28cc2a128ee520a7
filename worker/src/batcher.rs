//! Dynamic batching's pure part: which requests may share one forward pass, how their inputs are
//! concatenated along dim 0, and how the pass's outputs are split back. The queue and the
//! executor threads that use it are [`crate::executor`]'s.

use std::time::Duration;

use bytes::Bytes;

use crate::{
    backend::BackendError,
    decode::{InferRequest, InputTensor},
    tensor::{DataType, OutputTensor},
};

/// How requests are grouped into forward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most rows (dim 0, summed over the requests) in one pass; 1: every request runs alone.
    pub max_batch_size: usize,
    /// How long the oldest waiting request is held back for others to join its batch.
    pub max_queue_delay: Duration,
}

impl BatchPolicy {
    /// Every request runs alone, at once.
    pub const OFF: BatchPolicy = BatchPolicy {
        max_batch_size: 1,
        max_queue_delay: Duration::ZERO,
    };
}

/// What requests must share to be concatenated: for each input, by name, its datatype and its
/// dims after the batch dim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchKey(Vec<(String, DataType, Vec<usize>)>);

/// The key and the rows (the shared dim 0) of a request that can join a batch; `None` for one
/// that cannot (a scalar input, or inputs whose dim 0 differ): it runs alone and the model
/// answers it, usually with its own error.
pub fn batch_shape(request: &InferRequest) -> Option<(BatchKey, usize)> {
    let rows = *request.inputs.first()?.shape.first()?;
    let mut key = Vec::with_capacity(request.inputs.len());
    for input in &request.inputs {
        let (&first, rest) = input.shape.split_first()?;
        if first != rows {
            return None;
        }
        key.push((input.name.clone(), input.datatype, rest.to_vec()));
    }
    // Clients name inputs in any order.
    key.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Some((BatchKey(key), rows))
}

/// The inputs of one forward pass over `requests` (which share a [`BatchKey`]): each input
/// concatenated along dim 0 in the requests' order. This is the one copy batching costs; the
/// second value is how many bytes it copied.
pub fn concatenate(requests: &[&InferRequest]) -> (InferRequest, usize) {
    let Some((first, rest)) = requests.split_first() else {
        return (empty_request(Vec::new()), 0);
    };
    let mut copied = 0;
    let inputs = first
        .inputs
        .iter()
        .map(|input| {
            let parts = std::iter::once(input).chain(rest.iter().filter_map(|request| {
                request.inputs.iter().find(|other| other.name == input.name)
            }));
            let size = parts.clone().map(|part| part.data.len()).sum();
            let mut data = Vec::with_capacity(size);
            let mut rows = 0;
            for part in parts {
                data.extend_from_slice(&part.data);
                rows += part.shape.first().copied().unwrap_or(0);
            }
            copied += data.len();
            let mut shape = input.shape.clone();
            if let Some(batch) = shape.first_mut() {
                *batch = rows;
            }
            InputTensor {
                name: input.name.clone(),
                datatype: input.datatype,
                shape,
                data: Bytes::from(data),
            }
        })
        .collect();
    (empty_request(inputs), copied)
}

fn empty_request(inputs: Vec<InputTensor>) -> InferRequest {
    InferRequest {
        id: String::new(),
        inputs,
        outputs: Vec::new(),
    }
}

/// Splits the outputs of a pass over requests of `rows` rows each back into one set per request,
/// as slices of the pass's output bytes (no copy). Every output must keep the batch dim.
pub fn split(
    outputs: Vec<OutputTensor>,
    rows: &[usize],
) -> Result<Vec<Vec<OutputTensor>>, BackendError> {
    let total: usize = rows.iter().sum();
    let mut split = vec![Vec::with_capacity(outputs.len()); rows.len()];
    for output in outputs {
        if output.shape.first() != Some(&total) || total == 0 {
            return Err(BackendError::Failed(format!(
                "output '{}' has shape {:?}, which does not keep the batch of {total} rows",
                output.name, output.shape
            )));
        }
        let row_bytes = output.data.len() / total;
        let mut start = 0;
        for (part, &request_rows) in split.iter_mut().zip(rows) {
            let end = start + request_rows * row_bytes;
            let mut shape = output.shape.clone();
            shape[0] = request_rows;
            part.push(OutputTensor {
                name: output.name.clone(),
                datatype: output.datatype,
                shape,
                data: output.data.slice(start..end),
            });
            start = end;
        }
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, shape: &[usize], fill: u8) -> InputTensor {
        let size = shape.iter().product::<usize>() * 4;
        InputTensor {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: shape.to_vec(),
            data: Bytes::from(vec![fill; size]),
        }
    }

    fn request(inputs: Vec<InputTensor>) -> InferRequest {
        empty_request(inputs)
    }

    #[test]
    fn requests_whose_non_batch_dims_match_share_a_key_whatever_their_input_order() {
        let a = request(vec![input("x", &[2, 3], 1), input("y", &[2, 5], 1)]);
        let b = request(vec![input("y", &[1, 5], 2), input("x", &[1, 3], 2)]);
        let (key_a, rows_a) = batch_shape(&a).unwrap();
        let (key_b, rows_b) = batch_shape(&b).unwrap();
        assert_eq!(key_a, key_b);
        assert_eq!((rows_a, rows_b), (2, 1));
    }

    #[test]
    fn mismatched_dims_or_datatypes_get_different_keys() {
        let base = batch_shape(&request(vec![input("x", &[1, 3], 0)]))
            .unwrap()
            .0;
        let wider = batch_shape(&request(vec![input("x", &[1, 4], 0)]))
            .unwrap()
            .0;
        let mut int = input("x", &[1, 3], 0);
        int.datatype = DataType::Int32;
        let int = batch_shape(&request(vec![int])).unwrap().0;
        assert_ne!(base, wider);
        assert_ne!(base, int);
    }

    #[test]
    fn scalars_and_disagreeing_batch_dims_run_alone() {
        assert!(batch_shape(&request(vec![input("x", &[], 0)])).is_none());
        assert!(
            batch_shape(&request(vec![
                input("x", &[2, 3], 0),
                input("y", &[1, 3], 0)
            ]))
            .is_none()
        );
    }

    #[test]
    fn concatenation_follows_request_order_and_split_gives_each_its_rows() {
        let a = request(vec![input("x", &[2, 1], 1)]);
        let b = request(vec![input("x", &[1, 1], 2)]);
        let (batch, copied) = concatenate(&[&a, &b]);
        assert_eq!(batch.inputs[0].shape, [3, 1]);
        assert_eq!(
            batch.inputs[0].data.as_ref(),
            [[1u8; 8].as_slice(), &[2; 4]].concat()
        );
        assert_eq!(copied, 12);
        // An identity model's outputs, split back.
        let outputs = vec![OutputTensor {
            name: "y".into(),
            datatype: DataType::Fp32,
            shape: batch.inputs[0].shape.clone(),
            data: batch.inputs[0].data.clone(),
        }];
        let parts = split(outputs, &[2, 1]).unwrap();
        assert_eq!(parts[0][0].shape, [2, 1]);
        assert_eq!(parts[0][0].data.as_ref(), [1; 8]);
        assert_eq!(parts[1][0].shape, [1, 1]);
        assert_eq!(parts[1][0].data.as_ref(), [2; 4]);
    }

    #[test]
    fn an_output_without_the_batch_dim_cannot_be_split() {
        let output = OutputTensor {
            name: "sum".into(),
            datatype: DataType::Uint64,
            shape: vec![1],
            data: Bytes::from(vec![0; 8]),
        };
        let error = split(vec![output], &[1, 1]).unwrap_err();
        assert!(error.to_string().contains("batch of 2 rows"), "{error}");
    }
}
