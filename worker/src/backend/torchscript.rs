//! TorchScript models: a model file (`model.pt`) with Triton's `config.pbtxt` beside it.
//!
//! TorchScript carries no input signature, so the configuration declares it: the i-th input of
//! the configuration is the forward method's i-th argument, the i-th output its i-th returned
//! tensor. This part reads and checks the configuration and needs no libtorch; running the model
//! is [`super::libtorch`]'s, built with the `torch` feature.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Duration,
};

use remotemedia_proto::inference::{
    DataType as ConfigDataType, ModelConfig, model_config::SchedulingChoice,
};

use super::SourceError;
use crate::{
    model::{ModelSignature, TensorSpec},
    pbtxt,
    tensor::DataType,
};

/// The configuration file expected beside the model file.
pub const CONFIG_FILE: &str = "config.pbtxt";
/// Triton's platform name for TorchScript models.
pub const PLATFORM: &str = "pytorch_libtorch";

/// A TorchScript model file and what its configuration declares.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchScript {
    pub path: PathBuf,
    /// The configuration's `name`, else the model's directory name.
    pub name: String,
    /// Triton's `max_batch_size`: above 0, every input and output has a leading batch dim of
    /// at most this size, which the configuration's dims leave out.
    pub max_batch_size: u32,
    /// Full shapes, the batch dim included as -1.
    pub signature: ModelSignature,
    /// Triton's `dynamic_batching`, when set: its `max_queue_delay_microseconds`.
    pub dynamic_batching: Option<Duration>,
    /// Triton fields set in the configuration that the worker does not act on.
    pub ignored_fields: Vec<String>,
}

impl TorchScript {
    /// Reads and checks the configuration beside `path`; the model file itself loads later.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let config_path = path.with_file_name(CONFIG_FILE);
        let invalid = |reason: String| SourceError::Config {
            path: config_path.clone(),
            reason,
        };
        let text = match std::fs::read_to_string(&config_path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(SourceError::MissingConfig(path.to_owned()));
            }
            Err(error) => return Err(invalid(format!("failed to read it: {error}"))),
        };
        let parsed = pbtxt::parse(&text).map_err(|error| invalid(error.to_string()))?;
        let (max_batch_size, signature) = signature(&parsed.config).map_err(invalid)?;
        let name = match parsed.config.name.as_str() {
            "" => path
                .parent()
                .and_then(Path::file_name)
                .and_then(|name| name.to_str())
                .unwrap_or_default()
                .to_owned(),
            name => name.to_owned(),
        };
        Ok(TorchScript {
            path: path.to_owned(),
            name,
            max_batch_size,
            signature,
            dynamic_batching: match &parsed.config.scheduling_choice {
                Some(SchedulingChoice::DynamicBatching(batching)) => {
                    Some(Duration::from_micros(batching.max_queue_delay_microseconds))
                }
                _ => None,
            },
            ignored_fields: parsed.ignored_fields,
        })
    }
}

/// The model's signature from its configuration, with the batch dim made explicit.
fn signature(config: &ModelConfig) -> Result<(u32, ModelSignature), String> {
    if !config.platform.is_empty() && config.platform != PLATFORM {
        return Err(format!(
            "platform '{}' is not served here: this worker runs TorchScript ({PLATFORM})",
            config.platform
        ));
    }
    let max_batch_size = u32::try_from(config.max_batch_size)
        .map_err(|_| format!("max_batch_size {} is negative", config.max_batch_size))?;
    let batch_dim = (max_batch_size > 0).then_some(-1);
    let inputs = config
        .input
        .iter()
        .map(|input| {
            tensor_spec(
                "input",
                &input.name,
                input.data_type,
                &input.dims,
                batch_dim,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = config
        .output
        .iter()
        .map(|output| {
            tensor_spec(
                "output",
                &output.name,
                output.data_type,
                &output.dims,
                batch_dim,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (kind, specs) in [("input", &inputs), ("output", &outputs)] {
        if specs.is_empty() {
            return Err(format!("it declares no {kind}"));
        }
        let mut seen = HashSet::new();
        if let Some(duplicate) = specs.iter().find(|spec| !seen.insert(&spec.name)) {
            return Err(format!("{kind} '{}' is declared twice", duplicate.name));
        }
    }
    Ok((max_batch_size, ModelSignature { inputs, outputs }))
}

fn tensor_spec(
    kind: &str,
    name: &str,
    data_type: i32,
    dims: &[i64],
    batch_dim: Option<i64>,
) -> Result<TensorSpec, String> {
    if name.is_empty() {
        return Err(format!("an {kind} has no name"));
    }
    let datatype = ConfigDataType::try_from(data_type)
        .ok()
        .and_then(DataType::from_config_type)
        .ok_or_else(|| format!("{kind} '{name}' has no data_type"))?;
    if datatype == DataType::Bytes {
        return Err(format!(
            "{kind} '{name}' is TYPE_STRING: BYTES tensors are not supported"
        ));
    }
    if let Some(dim) = dims.iter().find(|&&dim| dim < -1) {
        return Err(format!(
            "{kind} '{name}' has dim {dim}: dims are -1 (variable) or at least 0"
        ));
    }
    Ok(TensorSpec {
        name: name.to_owned(),
        datatype: Some(datatype),
        dims: Some(batch_dim.into_iter().chain(dims.iter().copied()).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `config` beside a model file in a fresh directory named `dir_name`.
    fn open_with(
        dir_name: &str,
        config: Option<&str>,
    ) -> (tempfile::TempDir, Result<TorchScript, SourceError>) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(dir_name);
        std::fs::create_dir(&dir).unwrap();
        let model = dir.join("model.pt");
        std::fs::write(&model, b"not read here").unwrap();
        if let Some(config) = config {
            std::fs::write(dir.join(CONFIG_FILE), config).unwrap();
        }
        let opened = TorchScript::open(&model);
        (root, opened)
    }

    fn config_error(config: &str) -> String {
        match open_with("m", Some(config)).1 {
            Err(SourceError::Config { reason, .. }) => reason,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    const MLP: &str = r#"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "input" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "output" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 250 }
"#;

    #[test]
    fn batched_configuration_gets_a_variable_batch_dim() {
        let (_dir, opened) = open_with("mlp", Some(MLP));
        let model = opened.unwrap();
        assert_eq!(
            model.name, "mlp",
            "the directory name when the config has none"
        );
        assert_eq!(model.max_batch_size, 8);
        assert_eq!(model.signature.inputs[0].dims, Some(vec![-1, 16]));
        assert_eq!(model.signature.inputs[0].datatype, Some(DataType::Fp32));
        assert_eq!(model.signature.outputs[0].dims, Some(vec![-1, 4]));
        assert_eq!(model.dynamic_batching, Some(Duration::from_micros(250)));
        assert_eq!(model.ignored_fields, ["instance_group"]);
    }

    #[test]
    fn unbatched_configuration_keeps_its_dims_and_name() {
        let (_dir, opened) = open_with(
            "dir",
            Some(
                "name: \"tok\" input [ { name: \"ids\" data_type: TYPE_INT64 dims: [ -1, -1 ] } ] output [ { name: \"e\" data_type: TYPE_BF16 dims: [ 8 ] } ]",
            ),
        );
        let model = opened.unwrap();
        assert_eq!(model.name, "tok");
        assert_eq!(model.max_batch_size, 0);
        assert_eq!(model.dynamic_batching, None);
        assert_eq!(model.signature.inputs[0].dims, Some(vec![-1, -1]));
        assert_eq!(model.signature.outputs[0].datatype, Some(DataType::Bf16));
    }

    #[test]
    fn model_without_a_configuration_is_refused() {
        let (_dir, opened) = open_with("m", None);
        let error = opened.unwrap_err();
        assert!(matches!(error, SourceError::MissingConfig(_)));
        assert!(error.to_string().contains("config.pbtxt"), "{error}");
    }

    #[test]
    fn field_outside_tritons_schema_is_a_configuration_error() {
        let reason = config_error(&format!("{MLP}\ninput_signature: \"x\"\n"));
        assert!(reason.contains("input_signature"), "{reason}");
    }

    #[test]
    fn inconsistent_configurations_are_refused_with_the_reason() {
        let io = "output [ { name: \"o\" data_type: TYPE_FP32 dims: [ 1 ] } ]";
        let cases = [
            (format!("platform: \"onnxruntime_onnx\" {MLP}"), "platform"),
            (
                format!(
                    "max_batch_size: -1 input [ {{ name: \"i\" data_type: TYPE_FP32 dims: [1] }} ] {io}"
                ),
                "negative",
            ),
            (io.to_owned(), "no input"),
            (
                "input [ { name: \"i\" data_type: TYPE_FP32 dims: [1] } ]".to_owned(),
                "no output",
            ),
            (
                format!("input [ {{ name: \"i\" dims: [1] }} ] {io}"),
                "no data_type",
            ),
            (
                format!("input [ {{ data_type: TYPE_FP32 dims: [1] }} ] {io}"),
                "no name",
            ),
            (
                format!("input [ {{ name: \"i\" data_type: TYPE_STRING dims: [1] }} ] {io}"),
                "BYTES",
            ),
            (
                format!("input [ {{ name: \"i\" data_type: TYPE_FP32 dims: [-2] }} ] {io}"),
                "dim -2",
            ),
            (
                format!(
                    "input [ {{ name: \"i\" data_type: TYPE_FP32 dims: [1] }}, {{ name: \"i\" data_type: TYPE_FP32 dims: [1] }} ] {io}"
                ),
                "declared twice",
            ),
        ];
        for (config, expected) in cases {
            let reason = config_error(&config);
            assert!(reason.contains(expected), "{config}: {reason}");
        }
    }
}
