//! What a served model looks like from outside: its name, platform and tensor signature, and how
//! that answers ModelMetadata and ModelConfig. Known before the model loads, so both RPCs answer
//! while it is still loading.

use std::time::Duration;

use remotemedia_proto::inference::{
    DataType as ConfigDataType, ModelConfig, ModelDynamicBatching, ModelInput,
    ModelMetadataResponse, ModelOutput, model_config::SchedulingChoice,
    model_metadata_response::TensorMetadata,
};

use crate::{defaults, tensor::DataType};

/// One input or output of a model. `None` means "any": the built-in models accept every datatype
/// and rank, which the protocol cannot express, so metadata shows them as an empty datatype
/// (`TYPE_INVALID` in the configuration) and no dims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: Option<DataType>,
    /// Dimensions, `-1` for a variable one.
    pub dims: Option<Vec<i64>>,
}

/// A model's inputs and outputs, in the order the model takes and returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSignature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// A model as the server presents it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDescription {
    /// The model id clients address it by.
    pub name: String,
    /// Triton's platform string, e.g. `builtin` or `pytorch_libtorch`.
    pub platform: String,
    /// Triton's `max_batch_size`: above 0, the signature's first dim is the batch dim, which
    /// the ModelConfig answer leaves out of its dims as Triton's configuration does.
    pub max_batch_size: u32,
    /// The max queue delay of dynamic batching, when the worker batches this model.
    pub dynamic_batching: Option<Duration>,
    /// Full shapes (as ModelMetadata reports them).
    pub signature: ModelSignature,
}

impl ModelDescription {
    /// The ModelMetadata answer.
    pub fn metadata(&self) -> ModelMetadataResponse {
        let tensors = |specs: &[TensorSpec]| {
            specs
                .iter()
                .map(|spec| TensorMetadata {
                    name: spec.name.clone(),
                    datatype: spec
                        .datatype
                        .map(DataType::name)
                        .unwrap_or_default()
                        .to_owned(),
                    shape: spec.dims.clone().unwrap_or_default(),
                })
                .collect()
        };
        ModelMetadataResponse {
            name: self.name.clone(),
            versions: vec![defaults::MODEL_VERSION.to_owned()],
            platform: self.platform.clone(),
            inputs: tensors(&self.signature.inputs),
            outputs: tensors(&self.signature.outputs),
        }
    }

    /// The ModelConfig answer, as a Triton `ModelConfig`.
    pub fn config(&self) -> ModelConfig {
        let data_type = |spec: &TensorSpec| {
            spec.datatype
                .map_or(ConfigDataType::TypeInvalid, DataType::config_type) as i32
        };
        let batch_dims = usize::from(self.max_batch_size > 0);
        let dims = |spec: &TensorSpec| {
            spec.dims
                .as_ref()
                .map_or_else(Vec::new, |dims| dims[batch_dims.min(dims.len())..].to_vec())
        };
        ModelConfig {
            name: self.name.clone(),
            platform: self.platform.clone(),
            max_batch_size: i32::try_from(self.max_batch_size).unwrap_or(i32::MAX),
            scheduling_choice: self.dynamic_batching.map(|delay| {
                SchedulingChoice::DynamicBatching(ModelDynamicBatching {
                    max_queue_delay_microseconds: u64::try_from(delay.as_micros())
                        .unwrap_or(u64::MAX),
                    ..Default::default()
                })
            }),
            input: self
                .signature
                .inputs
                .iter()
                .map(|spec| ModelInput {
                    name: spec.name.clone(),
                    data_type: data_type(spec),
                    dims: dims(spec),
                    ..Default::default()
                })
                .collect(),
            output: self
                .signature
                .outputs
                .iter()
                .map(|spec| ModelOutput {
                    name: spec.name.clone(),
                    data_type: data_type(spec),
                    dims: dims(spec),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn description() -> ModelDescription {
        ModelDescription {
            name: "m".into(),
            platform: "builtin".into(),
            max_batch_size: 0,
            dynamic_batching: None,
            signature: ModelSignature {
                inputs: vec![TensorSpec {
                    name: "INPUT0".into(),
                    datatype: Some(DataType::Fp32),
                    dims: Some(vec![-1, 4]),
                }],
                outputs: vec![TensorSpec {
                    name: "OUTPUT0".into(),
                    datatype: None,
                    dims: None,
                }],
            },
        }
    }

    #[test]
    fn metadata_reports_datatypes_and_variable_dims() {
        let metadata = description().metadata();
        assert_eq!(metadata.versions, ["1"]);
        assert_eq!(metadata.inputs[0].datatype, "FP32");
        assert_eq!(metadata.inputs[0].shape, [-1, 4]);
        assert_eq!(metadata.outputs[0].datatype, "");
        assert!(metadata.outputs[0].shape.is_empty());
    }

    #[test]
    fn config_uses_triton_type_enums() {
        let config = description().config();
        assert_eq!(config.scheduling_choice, None);
        assert_eq!(config.input[0].data_type, ConfigDataType::TypeFp32 as i32);
        assert_eq!(config.input[0].dims, [-1, 4]);
        assert_eq!(
            config.output[0].data_type,
            ConfigDataType::TypeInvalid as i32
        );
    }

    #[test]
    fn batched_config_leaves_the_batch_dim_out_of_dims() {
        let batched = ModelDescription {
            max_batch_size: 8,
            dynamic_batching: Some(Duration::from_micros(500)),
            ..description()
        };
        assert_eq!(batched.metadata().inputs[0].shape, [-1, 4]);
        let config = batched.config();
        assert_eq!(config.max_batch_size, 8);
        let Some(SchedulingChoice::DynamicBatching(batching)) = config.scheduling_choice else {
            panic!("no dynamic_batching: {config:?}");
        };
        assert_eq!(batching.max_queue_delay_microseconds, 500);
        assert_eq!(config.input[0].dims, [4]);
    }
}
