//! The cases `scripts/make_models.py` writes (inputs and torch's outputs, one raw little-endian
//! file per tensor, named in `case.json`): reading them, sending them, comparing answers.
//! Shared by the integration tests and the `check_cases` example the GPU check runs.
//!
//! `case.json` is read into name-ordered maps, so requests name their inputs in alphabetical
//! order rather than the model's: the worker must match them by name, as Triton does.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use remotemedia_proto::inference::{
    ModelInferRequest, ModelInferResponse, model_infer_request::InferInputTensor,
};
use serde_json::Value;

/// One tensor of a case.
pub struct CaseTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

/// One case: the inputs and torch's outputs for them.
pub struct Case {
    pub dir: PathBuf,
    pub inputs: Vec<CaseTensor>,
    pub outputs: Vec<CaseTensor>,
}

/// Every case under `model_dir/cases`, in order.
pub fn read_cases(model_dir: &Path) -> Result<Vec<Case>, String> {
    let dir = model_dir.join("cases");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|error| format!("failed to read {}: {error}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(format!("no cases in {}", dir.display()));
    }
    dirs.into_iter().map(read_case).collect()
}

fn read_case(dir: PathBuf) -> Result<Case, String> {
    let read = |name: &str| {
        std::fs::read(dir.join(name))
            .map_err(|error| format!("failed to read {}/{name}: {error}", dir.display()))
    };
    let json: Value = serde_json::from_slice(&read("case.json")?)
        .map_err(|error| format!("failed to parse {}/case.json: {error}", dir.display()))?;
    let tensors = |kind: &str| -> Result<Vec<CaseTensor>, String> {
        let bad = || format!("{}/case.json: malformed '{kind}'", dir.display());
        json[kind]
            .as_object()
            .ok_or_else(bad)?
            .iter()
            .map(|(name, spec)| {
                Ok(CaseTensor {
                    name: name.clone(),
                    datatype: spec["datatype"].as_str().ok_or_else(bad)?.to_owned(),
                    shape: spec["shape"]
                        .as_array()
                        .ok_or_else(bad)?
                        .iter()
                        .map(|dim| dim.as_i64().ok_or_else(bad))
                        .collect::<Result<_, _>>()?,
                    data: read(&format!("{name}.bin"))?,
                })
            })
            .collect()
    };
    Ok(Case {
        inputs: tensors("inputs")?,
        outputs: tensors("outputs")?,
        dir,
    })
}

impl Case {
    /// The request that sends this case's inputs as raw contents.
    pub fn request(&self, model: &str) -> ModelInferRequest {
        ModelInferRequest {
            model_name: model.into(),
            inputs: self
                .inputs
                .iter()
                .map(|input| InferInputTensor {
                    name: input.name.clone(),
                    datatype: input.datatype.clone(),
                    shape: input.shape.clone(),
                    ..Default::default()
                })
                .collect(),
            raw_input_contents: self
                .inputs
                .iter()
                .map(|input| Bytes::from(input.data.clone()))
                .collect(),
            ..Default::default()
        }
    }

    /// Checks `response` against torch's outputs, matched by name: datatypes and shapes exactly;
    /// FP32 values within `rtol` relative to max(1, |torch's value|); every other datatype
    /// byte for byte.
    pub fn compare(&self, response: &ModelInferResponse, rtol: f32) -> Result<(), String> {
        let case = self.dir.display();
        if response.outputs.len() != self.outputs.len()
            || response.raw_output_contents.len() != self.outputs.len()
        {
            return Err(format!(
                "{case}: {} outputs, torch gave {}",
                response.outputs.len(),
                self.outputs.len()
            ));
        }
        for want in &self.outputs {
            let Some(index) = response
                .outputs
                .iter()
                .position(|got| got.name == want.name)
            else {
                return Err(format!("{case}: no output '{}'", want.name));
            };
            let (got, data) = (
                &response.outputs[index],
                &response.raw_output_contents[index],
            );
            let what = format!("{case}: output '{}'", want.name);
            if got.datatype != want.datatype || got.shape != want.shape {
                return Err(format!(
                    "{what}: got {} {:?}, torch gave {} {:?}",
                    got.datatype, got.shape, want.datatype, want.shape
                ));
            }
            if data.len() != want.data.len() {
                return Err(format!(
                    "{what}: {} bytes, torch gave {}",
                    data.len(),
                    want.data.len()
                ));
            }
            if want.datatype != "FP32" {
                if data.as_ref() != want.data {
                    return Err(format!("{what}: bytes differ from torch's"));
                }
                continue;
            }
            let floats = |bytes: &[u8]| -> Vec<f32> {
                bytes
                    .chunks_exact(4)
                    .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
                    .collect()
            };
            for (index, (got, want)) in floats(data).into_iter().zip(floats(&want.data)).enumerate()
            {
                // Written so that a NaN on either side is never close.
                let close = (got - want).abs() <= rtol * want.abs().max(1.0);
                if !close {
                    return Err(format!("{what}[{index}]: got {got}, torch gave {want}"));
                }
            }
        }
        Ok(())
    }
}
