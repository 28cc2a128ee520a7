//! Backends: what runs a model's forward pass. The server only knows [`Backend`]; the built-in
//! models live in [`builtin`], and a TorchScript backend joins as another implementation.

mod builtin;

use std::path::PathBuf;

pub use builtin::{Builtin, BuiltinKind};

use crate::{
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
    #[error("failed to warm up the model")]
    Warmup(#[source] BackendError),
}

/// Where a model comes from: `--model-path`, parsed and checked before anything is served.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Builtin(Builtin),
}

/// Why `--model-path` cannot be served.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SourceError {
    #[error("model file {0} does not exist")]
    Missing(PathBuf),
    #[error(
        "model file {0} cannot be served: this build has no TorchScript backend yet; use builtin://identity or builtin://checksum"
    )]
    TorchScriptUnsupported(PathBuf),
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
        if !path.exists() {
            return Err(SourceError::Missing(path));
        }
        Err(SourceError::TorchScriptUnsupported(path))
    }

    /// The name the model is served under when `--model-id` is not given.
    pub fn default_model_id(&self) -> &'static str {
        match self {
            ModelSource::Builtin(builtin) => builtin.kind.name(),
        }
    }

    /// How the model looks to clients, before and after it loads.
    pub fn describe(&self, model_id: &str) -> ModelDescription {
        match self {
            ModelSource::Builtin(builtin) => ModelDescription {
                name: model_id.to_owned(),
                platform: "builtin".to_owned(),
                signature: builtin.signature(),
            },
        }
    }

    /// Loads the model and runs one warm-up pass, blocking the calling thread.
    pub fn load(&self) -> Result<Box<dyn Backend>, LoadError> {
        let (backend, signature): (Box<dyn Backend>, ModelSignature) = match self {
            ModelSource::Builtin(builtin) => {
                std::thread::sleep(builtin.load_delay);
                (Box::new(builtin.clone()), builtin.signature())
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

    #[test]
    fn existing_model_file_is_refused_until_torchscript_lands() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let error = ModelSource::parse(file.path().to_str().unwrap()).unwrap_err();
        assert!(matches!(error, SourceError::TorchScriptUnsupported(_)));
        assert!(error.to_string().contains("no TorchScript backend"));
    }

    #[test]
    fn builtins_load_and_warm_up() {
        for path in [
            "builtin://identity",
            "builtin://checksum?datatype=FP64&shape=-1,3",
        ] {
            let source = ModelSource::parse(path).unwrap();
            source.load().unwrap();
        }
    }
}
