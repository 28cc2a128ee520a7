//! Backends: what runs a model's forward pass. The server only knows [`Backend`]; the built-in
//! models live in [`builtin`], TorchScript models in [`torchscript`] (configuration) and
//! `libtorch` (execution, with the `torch` feature).

mod builtin;
#[cfg(feature = "torch")]
mod libtorch;
pub mod torchscript;

use std::path::PathBuf;

pub use builtin::{Builtin, BuiltinKind};
#[cfg(feature = "torch")]
pub use libtorch::cuda_device_count;
pub use torchscript::TorchScript;

use crate::{
    config::Device,
    model::{ModelDescription, ModelSignature},
    tensor::{DataType, OutputTensor, TensorView},
};

/// A loaded model.
///
/// `infer` blocks (a libtorch forward pass does), so the server calls it on a blocking thread,
/// never on the async runtime. Inputs are borrowed views: the bytes stay in the received message
/// or, later, in a shared-memory mapping, and a backend copies only what it must.
pub trait Backend: Send + Sync + 'static {
    /// Runs one forward pass. `inputs` were validated against the model's signature; the result
    /// holds every output of the signature, in its order.
    fn infer(&self, inputs: &[TensorView<'_>]) -> Result<Vec<OutputTensor>, BackendError>;
}

/// Why a forward pass failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The inputs passed validation but the model still refuses them (a shape it cannot take).
    #[error("{0}")]
    InvalidInput(String),
    /// The model itself failed; the message is logged, never sent to the client.
    #[error("failed to run the model: {0}")]
    Failed(String),
}

/// Why a model could not be loaded or warmed up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("failed to load the model file {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("failed to load the model: {0}")]
    Unsupported(String),
    #[error("failed to warm up the model")]
    Warmup(#[source] BackendError),
}

/// Where a model comes from: `--model-path`, parsed and checked before anything is served.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Builtin(Builtin),
    #[cfg(feature = "torch")]
    TorchScript(TorchScript),
}

/// Why `--model-path` cannot be served.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SourceError {
    #[error("model file {0} does not exist or is not a file")]
    Missing(PathBuf),
    #[error(
        "model file {0} cannot be served: this build has no TorchScript backend (build with --features torch); use builtin://identity or builtin://checksum"
    )]
    TorchScriptUnsupported(PathBuf),
    #[error(
        "model file {0} has no config.pbtxt beside it: TorchScript carries no input signature, so the model's inputs and outputs must be declared there"
    )]
    MissingConfig(PathBuf),
    #[error("invalid model configuration {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("unknown built-in model '{0}': expected builtin://identity or builtin://checksum")]
    UnknownBuiltin(String),
    #[error(
        "unknown parameter '{0}' of a built-in model: expected load_delay_ms, infer_delay_ms, datatype or shape"
    )]
    UnknownParameter(String),
    #[error("invalid value '{value}' for built-in model parameter {key}: {reason}")]
    InvalidParameter {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

const BUILTIN_SCHEME: &str = "builtin://";

impl ModelSource {
    /// Parses `--model-path`: `builtin://NAME[?key=value&…]` or a model file.
    pub fn parse(path: &str) -> Result<Self, SourceError> {
        if let Some(rest) = path.strip_prefix(BUILTIN_SCHEME) {
            return Builtin::parse(rest).map(ModelSource::Builtin);
        }
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(SourceError::Missing(path));
        }
        Self::torchscript(path)
    }

    #[cfg(feature = "torch")]
    fn torchscript(path: PathBuf) -> Result<Self, SourceError> {
        TorchScript::open(&path).map(ModelSource::TorchScript)
    }

    #[cfg(not(feature = "torch"))]
    fn torchscript(path: PathBuf) -> Result<Self, SourceError> {
        Err(SourceError::TorchScriptUnsupported(path))
    }

    /// The name the model is served under when `--model-id` is not given.
    pub fn default_model_id(&self) -> &str {
        match self {
            ModelSource::Builtin(builtin) => builtin.kind.name(),
            #[cfg(feature = "torch")]
            ModelSource::TorchScript(model) => &model.name,
        }
    }

    /// What the model's configuration says about batching: Triton's `max_batch_size` (0: the
    /// model has no batch dim) and, when it sets `dynamic_batching`, its max queue delay.
    /// Built-ins have no batch dim: checksum's answer is one sum of a whole tensor.
    pub fn batching(&self) -> (u32, Option<std::time::Duration>) {
        match self {
            ModelSource::Builtin(_) => (0, None),
            #[cfg(feature = "torch")]
            ModelSource::TorchScript(model) => (model.max_batch_size, model.dynamic_batching),
        }
    }

    /// How the model looks to clients, before and after it loads; its dynamic batching is the
    /// worker's to fill in.
    pub fn describe(&self, model_id: &str) -> ModelDescription {
        match self {
            ModelSource::Builtin(builtin) => ModelDescription {
                name: model_id.to_owned(),
                platform: "builtin".to_owned(),
                max_batch_size: 0,
                dynamic_batching: None,
                signature: builtin.signature(),
            },
            #[cfg(feature = "torch")]
            ModelSource::TorchScript(model) => ModelDescription {
                name: model_id.to_owned(),
                platform: torchscript::PLATFORM.to_owned(),
                max_batch_size: model.max_batch_size,
                dynamic_batching: None,
                signature: model.signature.clone(),
            },
        }
    }

    /// Loads the model on `device` and runs one warm-up pass, blocking the calling thread.
    /// `intra_op_threads` sizes libtorch's intra-op thread pool; built-ins have none.
    #[cfg_attr(not(feature = "torch"), allow(unused_variables))]
    pub fn load(
        &self,
        device: Device,
        intra_op_threads: Option<usize>,
    ) -> Result<Box<dyn Backend>, LoadError> {
        let (backend, signature): (Box<dyn Backend>, ModelSignature) = match self {
            ModelSource::Builtin(builtin) => {
                std::thread::sleep(builtin.load_delay);
                (Box::new(builtin.clone()), builtin.signature())
            }
            #[cfg(feature = "torch")]
            ModelSource::TorchScript(model) => {
                if !model.ignored_fields.is_empty() {
                    tracing::info!(
                        fields = ?model.ignored_fields,
                        "config.pbtxt sets Triton fields this worker accepts but does not act on"
                    );
                }
                let backend = libtorch::load(model, device, intra_op_threads)?;
                (Box::new(backend), model.signature.clone())
            }
        };
        warm_up(backend.as_ref(), &signature)?;
        Ok(backend)
    }
}

/// Runs the model once on zero-filled inputs of the smallest size its signature allows, so the
/// first client does not pay for lazy initialisation and a broken model never turns ready.
fn warm_up(backend: &dyn Backend, signature: &ModelSignature) -> Result<(), LoadError> {
    let inputs: Vec<(String, DataType, Vec<usize>, Vec<u8>)> = signature
        .inputs
        .iter()
        .map(|spec| {
            let datatype = spec.datatype.unwrap_or(DataType::Uint8);
            let shape: Vec<usize> = spec.dims.as_ref().map_or(vec![1], |dims| {
                dims.iter()
                    .map(|&dim| usize::try_from(dim).unwrap_or(1))
                    .collect()
            });
            let size = shape.iter().product::<usize>() * datatype.element_size().unwrap_or(1);
            (spec.name.clone(), datatype, shape, vec![0; size])
        })
        .collect();
    let views: Vec<TensorView<'_>> = inputs
        .iter()
        .map(|(name, datatype, shape, data)| TensorView {
            name,
            datatype: *datatype,
            shape,
            data,
        })
        .collect();
    let outputs = backend.infer(&views).map_err(LoadError::Warmup)?;
    if outputs.len() != signature.outputs.len() {
        return Err(LoadError::Warmup(BackendError::Failed(format!(
            "the model returned {} outputs, its signature has {}",
            outputs.len(),
            signature.outputs.len()
        ))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_model_file_is_its_own_error() {
        let error = ModelSource::parse("/nonexistent/model.pt").unwrap_err();
        assert_eq!(error, SourceError::Missing("/nonexistent/model.pt".into()));
    }

    #[cfg(not(feature = "torch"))]
    #[test]
    fn model_file_is_refused_without_the_torch_feature() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let error = ModelSource::parse(file.path().to_str().unwrap()).unwrap_err();
        assert!(matches!(error, SourceError::TorchScriptUnsupported(_)));
        assert!(error.to_string().contains("no TorchScript backend"));
    }

    #[cfg(feature = "torch")]
    #[test]
    fn model_file_without_config_is_refused() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let error = ModelSource::parse(file.path().to_str().unwrap()).unwrap_err();
        assert!(matches!(error, SourceError::MissingConfig(_)), "{error}");
    }

    #[test]
    fn directory_is_not_a_model_file() {
        let dir = tempfile::tempdir().unwrap();
        let error = ModelSource::parse(dir.path().to_str().unwrap()).unwrap_err();
        assert!(matches!(error, SourceError::Missing(_)), "{error}");
    }

    #[test]
    fn builtins_load_and_warm_up() {
        for path in [
            "builtin://identity",
            "builtin://checksum?datatype=FP64&shape=-1,3",
        ] {
            let source = ModelSource::parse(path).unwrap();
            source.load(Device::Cpu, None).unwrap();
        }
    }
}
