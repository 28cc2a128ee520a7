//! Runs TorchScript modules with libtorch, through `tch` (the `torch` feature).
//!
//! Inputs are copied once into tensors libtorch owns. The bytes the server hands over are
//! borrowed and read-only, while a TorchScript module may write into its inputs (`x.mul_(2)`):
//! wrapping them with `from_blob` would let libtorch write through a shared borrow. The copy
//! also aligns them, whatever their offset in the received message.

use bytes::Bytes;
use tch::{CModule, IValue, Kind, TchError, Tensor};

use super::{Backend, BackendError, LoadError, torchscript::TorchScript};
use crate::{
    config::Device,
    model::TensorSpec,
    tensor::{DataType, OutputTensor, TensorView},
};

/// Every datatype libtorch holds, with its tensor kind. libtorch's unsigned 16/32/64-bit
/// types are not exposed by `tch`, and BYTES is no tensor at all.
const KINDS: [(DataType, Kind); 10] = [
    (DataType::Bool, Kind::Bool),
    (DataType::Uint8, Kind::Uint8),
    (DataType::Int8, Kind::Int8),
    (DataType::Int16, Kind::Int16),
    (DataType::Int32, Kind::Int),
    (DataType::Int64, Kind::Int64),
    (DataType::Fp16, Kind::Half),
    (DataType::Bf16, Kind::BFloat16),
    (DataType::Fp32, Kind::Float),
    (DataType::Fp64, Kind::Double),
];

fn kind_of(datatype: DataType) -> Option<Kind> {
    KINDS
        .iter()
        .find_map(|&(d, kind)| (d == datatype).then_some(kind))
}

fn datatype_of(kind: Kind) -> Option<DataType> {
    KINDS
        .iter()
        .find_map(|&(datatype, k)| (k == kind).then_some(datatype))
}

/// Number of CUDA devices libtorch can use here.
pub fn cuda_device_count() -> usize {
    usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
}

/// A loaded TorchScript module.
pub struct TorchScriptBackend {
    module: CModule,
    device: tch::Device,
    max_batch_size: u32,
    /// Input names in the forward method's argument order.
    inputs: Vec<String>,
    outputs: Vec<TensorSpec>,
}

/// Loads `model` on `device`; `intra_op_threads` sizes libtorch's (process-wide) intra-op pool.
pub fn load(
    model: &TorchScript,
    device: Device,
    intra_op_threads: Option<usize>,
) -> Result<TorchScriptBackend, LoadError> {
    for spec in model
        .signature
        .inputs
        .iter()
        .chain(&model.signature.outputs)
    {
        if let Some(datatype) = spec
            .datatype
            .filter(|&datatype| kind_of(datatype).is_none())
        {
            return Err(LoadError::Unsupported(format!(
                "'{}' is {datatype}, which libtorch tensors cannot hold",
                spec.name
            )));
        }
    }
    if let Some(threads) = intra_op_threads {
        tch::set_num_threads(i32::try_from(threads).unwrap_or(i32::MAX));
    }
    let device = match device {
        Device::Cpu => tch::Device::Cpu,
        Device::Cuda(index) => tch::Device::Cuda(index as usize),
    };
    let mut module =
        CModule::load_on_device(&model.path, device).map_err(|error| LoadError::Model {
            path: model.path.clone(),
            reason: summary(&error),
        })?;
    module.set_eval();
    Ok(TorchScriptBackend {
        module,
        device,
        max_batch_size: model.max_batch_size,
        inputs: model
            .signature
            .inputs
            .iter()
            .map(|spec| spec.name.clone())
            .collect(),
        outputs: model.signature.outputs.clone(),
    })
}

impl Backend for TorchScriptBackend {
    fn infer(&self, inputs: &[TensorView<'_>]) -> Result<Vec<OutputTensor>, BackendError> {
        self.check_batch(inputs)?;
        let _no_grad = tch::no_grad_guard();
        // Clients name inputs in any order; the forward method takes them by position.
        let arguments = self
            .inputs
            .iter()
            .map(|name| {
                let input = inputs
                    .iter()
                    .find(|input| input.name == name)
                    .ok_or_else(|| {
                        BackendError::InvalidInput(format!("input '{name}' is missing"))
                    })?;
                self.to_tensor(input).map(IValue::Tensor)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let result = self
            .module
            .forward_is(&arguments)
            .map_err(|error| BackendError::Failed(summary(&error)))?;
        let tensors = match result {
            IValue::Tensor(tensor) => vec![tensor],
            IValue::Tuple(items) | IValue::GenericList(items) => items
                .into_iter()
                .enumerate()
                .map(|(index, item)| match item {
                    IValue::Tensor(tensor) => Ok(tensor),
                    _ => Err(BackendError::Failed(format!(
                        "output {index} of the model is not a tensor"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => {
                return Err(BackendError::Failed(
                    "the model returned neither a tensor nor a tuple or list of tensors".into(),
                ));
            }
        };
        if tensors.len() != self.outputs.len() {
            return Err(BackendError::Failed(format!(
                "the model returned {} outputs, its configuration declares {}",
                tensors.len(),
                self.outputs.len()
            )));
        }
        self.outputs
            .iter()
            .zip(tensors)
            .map(|(spec, tensor)| output(spec, &tensor))
            .collect()
    }
}

impl TorchScriptBackend {
    /// With batching configured, every input's first dim is the batch size: the same for all,
    /// at most `max_batch_size`.
    fn check_batch(&self, inputs: &[TensorView<'_>]) -> Result<(), BackendError> {
        if self.max_batch_size == 0 {
            return Ok(());
        }
        let mut sizes = inputs.iter().map(|input| input.shape.first().copied());
        let first = sizes.next().flatten().unwrap_or(0);
        if sizes.any(|size| size != Some(first)) {
            return Err(BackendError::InvalidInput(
                "every input must have the same batch size (first dim)".into(),
            ));
        }
        if first > self.max_batch_size as usize {
            return Err(BackendError::InvalidInput(format!(
                "batch size {first} exceeds the model's max_batch_size {}",
                self.max_batch_size
            )));
        }
        Ok(())
    }

    fn to_tensor(&self, input: &TensorView<'_>) -> Result<Tensor, BackendError> {
        let invalid =
            |reason: String| BackendError::InvalidInput(format!("input '{}' {reason}", input.name));
        let kind = kind_of(input.datatype).ok_or_else(|| {
            invalid(format!(
                "is {}, which the model cannot take",
                input.datatype
            ))
        })?;
        let shape = input
            .shape
            .iter()
            .map(|&dim| i64::try_from(dim))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(|_| invalid("has a dim too large".into()))?;
        // `from_data_size` copies as many bytes as the shape says without checking the slice:
        // the decoder checked it, and this keeps a mistake there from becoming an overread.
        let expected = input
            .shape
            .iter()
            .try_fold(kind.elt_size_in_bytes(), |size, &dim| size.checked_mul(dim));
        if expected != Some(input.data.len()) {
            return Err(invalid(format!(
                "has {} bytes, which does not fit its shape {:?}",
                input.data.len(),
                input.shape
            )));
        }
        if input.datatype == DataType::Bool && input.data.iter().any(|&byte| byte > 1) {
            return Err(invalid("is BOOL but holds bytes other than 0 and 1".into()));
        }
        let tensor = Tensor::f_from_data_size(input.data, &shape, kind)
            .map_err(|error| BackendError::Failed(summary(&error)))?;
        if self.device == tch::Device::Cpu {
            return Ok(tensor);
        }
        // On CUDA a pageable host-to-device copy: no GPU zero-copy is claimed (DESIGN §5).
        tensor
            .f_to_device(self.device)
            .map_err(|error| BackendError::Failed(summary(&error)))
    }
}

/// Copies one output tensor out, checking it against its configuration.
fn output(spec: &TensorSpec, tensor: &Tensor) -> Result<OutputTensor, BackendError> {
    let mismatch = |what: String| {
        BackendError::Failed(format!(
            "output '{}' {what}; the model and its configuration disagree",
            spec.name
        ))
    };
    let kind = tensor
        .f_kind()
        .map_err(|error| BackendError::Failed(summary(&error)))?;
    let datatype = datatype_of(kind).ok_or_else(|| mismatch(format!("is of kind {kind:?}")))?;
    if spec.datatype.is_some_and(|declared| declared != datatype) {
        return Err(mismatch(format!(
            "is {datatype}, the configuration says {}",
            spec.datatype.map_or("", DataType::name)
        )));
    }
    let size = tensor.size();
    if let Some(dims) = &spec.dims {
        let fits = dims.len() == size.len()
            && dims
                .iter()
                .zip(&size)
                .all(|(&declared, &actual)| declared == -1 || declared == actual);
        if !fits {
            return Err(mismatch(format!(
                "has shape {size:?}, the configuration says {dims:?}"
            )));
        }
    }
    let shape: Vec<usize> = size
        .iter()
        .map(|&dim| usize::try_from(dim).unwrap_or(0))
        .collect();
    let numel = shape.iter().product::<usize>();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    // Copies from the device and makes the layout contiguous as needed.
    tensor
        .f_copy_data_u8(&mut data, numel)
        .map_err(|error| BackendError::Failed(summary(&error)))?;
    Ok(OutputTensor {
        name: spec.name.clone(),
        datatype,
        shape,
        data: Bytes::from(data),
    })
}

/// libtorch's errors run over many lines (a TorchScript traceback, a C++ backtrace); the line
/// that says what went wrong is the `RuntimeError:` one at the end of a traceback, else the
/// first.
fn summary(error: &TchError) -> String {
    let text = match error {
        TchError::Torch(message) => message.clone(),
        other => other.to_string(),
    };
    let lines = || text.lines().map(str::trim).filter(|line| !line.is_empty());
    lines()
        .filter_map(|line| line.strip_prefix("RuntimeError: "))
        .next_back()
        .or_else(|| lines().next())
        .unwrap_or("unknown libtorch error")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_and_kind_map_both_ways() {
        for (datatype, kind) in KINDS {
            assert_eq!(kind_of(datatype), Some(kind));
            assert_eq!(datatype_of(kind), Some(datatype));
            assert_eq!(datatype.element_size(), Some(kind.elt_size_in_bytes()));
        }
        for datatype in [
            DataType::Uint16,
            DataType::Uint32,
            DataType::Uint64,
            DataType::Bytes,
        ] {
            assert_eq!(kind_of(datatype), None);
        }
    }

    #[test]
    fn summary_keeps_the_line_that_says_what_failed() {
        let traceback = TchError::Torch(
            "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript (most recent call last):\n  File \"code.py\", line 3\nRuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3 and 16x32)\n".into(),
        );
        assert_eq!(
            summary(&traceback),
            "mat1 and mat2 shapes cannot be multiplied (1x3 and 16x32)"
        );
        let plain = TchError::Torch("forward() expected at most 2 argument(s)\nframe #0: x".into());
        assert!(summary(&plain).starts_with("forward() expected"));
    }
}
