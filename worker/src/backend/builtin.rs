//! The built-in models: small, dependency-free backends for tests, demos and health checks.
//!
//! `builtin://identity` returns its one input as `OUTPUT0`; `builtin://checksum` reads every
//! byte of its input and returns their sum as a `UINT64` `CHECKSUM` of shape `[1]`. Both take
//! any datatype and shape unless `datatype=` or `shape=` (comma-separated dims, `-1` variable)
//! constrain them, and `load_delay_ms=` / `infer_delay_ms=` make them slow on purpose.

use std::time::Duration;

use bytes::Bytes;

use super::{Backend, BackendError, SourceError};
use crate::{
    model::{ModelSignature, TensorSpec},
    tensor::{DataType, OutputTensor, TensorView},
};

/// Which built-in model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinKind {
    Identity,
    Checksum,
}

impl BuiltinKind {
    pub fn name(self) -> &'static str {
        match self {
            BuiltinKind::Identity => "identity",
            BuiltinKind::Checksum => "checksum",
        }
    }
}

/// A built-in model and its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Builtin {
    pub kind: BuiltinKind,
    /// Time loading takes, to test readiness.
    pub load_delay: Duration,
    /// Time each forward pass is held, to test draining and concurrency.
    pub infer_delay: Duration,
    /// The input's datatype, if constrained.
    pub datatype: Option<DataType>,
    /// The input's dims, if constrained.
    pub dims: Option<Vec<i64>>,
}

const INPUT: &str = "INPUT0";
const IDENTITY_OUTPUT: &str = "OUTPUT0";
const CHECKSUM_OUTPUT: &str = "CHECKSUM";

impl Builtin {
    /// Parses what follows `builtin://`: a name and an optional query.
    pub(super) fn parse(spec: &str) -> Result<Self, SourceError> {
        let (name, query) = spec.split_once('?').unwrap_or((spec, ""));
        let kind = match name {
            "identity" => BuiltinKind::Identity,
            "checksum" => BuiltinKind::Checksum,
            _ => return Err(SourceError::UnknownBuiltin(name.to_owned())),
        };
        let mut builtin = Builtin {
            kind,
            load_delay: Duration::ZERO,
            infer_delay: Duration::ZERO,
            datatype: None,
            dims: None,
        };
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "load_delay_ms" => builtin.load_delay = parse_millis("load_delay_ms", value)?,
                "infer_delay_ms" => builtin.infer_delay = parse_millis("infer_delay_ms", value)?,
                "datatype" => builtin.datatype = Some(parse_datatype(value)?),
                "shape" => builtin.dims = Some(parse_dims(value)?),
                _ => return Err(SourceError::UnknownParameter(key.to_owned())),
            }
        }
        Ok(builtin)
    }

    pub(super) fn signature(&self) -> ModelSignature {
        let input = TensorSpec {
            name: INPUT.to_owned(),
            datatype: self.datatype,
            dims: self.dims.clone(),
        };
        let output = match self.kind {
            BuiltinKind::Identity => TensorSpec {
                name: IDENTITY_OUTPUT.to_owned(),
                ..input.clone()
            },
            BuiltinKind::Checksum => TensorSpec {
                name: CHECKSUM_OUTPUT.to_owned(),
                datatype: Some(DataType::Uint64),
                dims: Some(vec![1]),
            },
        };
        ModelSignature {
            inputs: vec![input],
            outputs: vec![output],
        }
    }
}

impl Backend for Builtin {
    fn infer(&self, inputs: &[TensorView<'_>]) -> Result<Vec<OutputTensor>, BackendError> {
        let [input] = inputs else {
            return Err(BackendError::InvalidInput(format!(
                "the {} model takes one input, got {}",
                self.kind.name(),
                inputs.len()
            )));
        };
        std::thread::sleep(self.infer_delay);
        let output = match self.kind {
            BuiltinKind::Identity => OutputTensor {
                name: IDENTITY_OUTPUT.to_owned(),
                datatype: input.datatype,
                shape: input.shape.to_vec(),
                data: Bytes::copy_from_slice(input.data),
            },
            BuiltinKind::Checksum => OutputTensor {
                name: CHECKSUM_OUTPUT.to_owned(),
                datatype: DataType::Uint64,
                shape: vec![1],
                data: Bytes::copy_from_slice(&checksum(input.data).to_le_bytes()),
            },
        };
        Ok(vec![output])
    }
}

/// The sum of every byte, wrapping: cheap, yet it touches the whole tensor.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter()
        .fold(0u64, |sum, &byte| sum.wrapping_add(u64::from(byte)))
}

fn parse_millis(key: &'static str, value: &str) -> Result<Duration, SourceError> {
    value
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| SourceError::InvalidParameter {
            key,
            value: value.to_owned(),
            reason: "expected milliseconds as a whole number",
        })
}

fn parse_datatype(value: &str) -> Result<DataType, SourceError> {
    let invalid = |reason| SourceError::InvalidParameter {
        key: "datatype",
        value: value.to_owned(),
        reason,
    };
    match DataType::from_name(value) {
        Some(DataType::Bytes) => Err(invalid("BYTES tensors are not supported")),
        Some(datatype) => Ok(datatype),
        None => Err(invalid("expected a datatype such as FP32 or UINT8")),
    }
}

fn parse_dims(value: &str) -> Result<Vec<i64>, SourceError> {
    let invalid = || SourceError::InvalidParameter {
        key: "shape",
        value: value.to_owned(),
        reason: "expected comma-separated dims, each -1 or at least 0",
    };
    if value.is_empty() {
        // An empty list is a scalar.
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(|dim| match dim.trim().parse::<i64>() {
            Ok(dim) if dim >= -1 => Ok(dim),
            _ => Err(invalid()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(datatype: DataType, shape: &'a [usize], data: &'a [u8]) -> TensorView<'a> {
        TensorView {
            name: INPUT,
            datatype,
            shape,
            data,
        }
    }

    #[test]
    fn parses_name_and_parameters() {
        let builtin =
            Builtin::parse("checksum?load_delay_ms=20&infer_delay_ms=5&datatype=INT8&shape=-1,2")
                .unwrap();
        assert_eq!(builtin.kind, BuiltinKind::Checksum);
        assert_eq!(builtin.load_delay, Duration::from_millis(20));
        assert_eq!(builtin.infer_delay, Duration::from_millis(5));
        assert_eq!(builtin.datatype, Some(DataType::Int8));
        assert_eq!(builtin.dims, Some(vec![-1, 2]));
    }

    #[test]
    fn refuses_unknown_models_parameters_and_values() {
        assert_eq!(
            Builtin::parse("resnet"),
            Err(SourceError::UnknownBuiltin("resnet".into()))
        );
        assert_eq!(
            Builtin::parse("identity?delay=1"),
            Err(SourceError::UnknownParameter("delay".into()))
        );
        for query in [
            "load_delay_ms=-5",
            "infer_delay_ms=",
            "datatype=BYTES",
            "shape=1,-2",
        ] {
            assert!(
                matches!(
                    Builtin::parse(&format!("identity?{query}")),
                    Err(SourceError::InvalidParameter { .. })
                ),
                "{query}"
            );
        }
    }

    #[test]
    fn identity_returns_its_input() {
        let identity = Builtin::parse("identity").unwrap();
        let data = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let outputs = identity
            .infer(&[view(DataType::Int16, &[2, 2], &data)])
            .unwrap();
        assert_eq!(outputs[0].name, "OUTPUT0");
        assert_eq!(outputs[0].datatype, DataType::Int16);
        assert_eq!(outputs[0].shape, [2, 2]);
        assert_eq!(outputs[0].data.as_ref(), data);
    }

    #[test]
    fn checksum_sums_every_byte() {
        let checksum_model = Builtin::parse("checksum").unwrap();
        let data = vec![255u8; 1000];
        let outputs = checksum_model
            .infer(&[view(DataType::Uint8, &[1000], &data)])
            .unwrap();
        assert_eq!(outputs[0].data.as_ref(), 255_000u64.to_le_bytes());
        assert_eq!(outputs[0].shape, [1]);
    }
}
