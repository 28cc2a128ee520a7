//! Brokered region references in ModelInfer requests (`remotemedia_proto::params`).
//!
//! A client names a region it holds with `remotemedia_region` (its id), `remotemedia_offset` and
//! `remotemedia_byte_size`, and its broker session with `remotemedia-session` metadata. The
//! router takes an in-flight hold on each region for the session (NOT_FOUND unless the session
//! holds it, the same answer as for an id that never existed), then:
//! - for a colocated worker, replaces the id with a one-time grant issued from that hold (the
//!   offset is absolute: a brokered reference has no registered sub-range); the worker redeems
//!   it on its own broker connection and reads and writes in place;
//! - for a remote worker, sends the input bytes inline (slices of the sidecar's mapping, copied
//!   once by the gRPC encoder) and writes inline outputs into the client's region.
//!
//! Either way the response names each output written into a region with the client's three
//! parameters and an empty `raw_output_contents` entry. The holds end when this value drops,
//! which voids every grant issued from them.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use remotemedia_proto::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice,
};
use remotemedia_proto::params::{
    BROKERED_BYTE_SIZE, BROKERED_GRANT, BROKERED_OFFSET, BROKERED_REGION, SHARED_MEMORY_REGION,
};
use remotemedia_runtime_core::shm::Region;
use remotemedia_runtime_core::shm::broker::{RegionKey, SessionToken};

use crate::broker::{Books, InFlight};

/// Why a request's brokered references were refused.
#[derive(Debug, thiserror::Error)]
pub enum BrokeredError {
    #[error("brokered region references are accepted only on the sidecar's Unix socket")]
    NotOnUnixSocket,
    #[error("brokered region references need the caller's broker session in metadata '{0}'")]
    MissingSession(&'static str),
    #[error("{kind} '{name}': {reason}")]
    BadParameter {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("{kind} '{name}': no such region")]
    NotFound { kind: &'static str, name: String },
    #[error(
        "{kind} '{name}': offset {offset} + byte_size {byte_size} passes the region's {size} bytes"
    )]
    OutOfRange {
        kind: &'static str,
        name: String,
        offset: u64,
        byte_size: u64,
        size: u64,
    },
    #[error("a remote worker needs every other input as raw_input_contents when one is brokered")]
    MixedContents,
    #[error("failed to map a client region")]
    Map,
    #[error("failed to issue a region grant")]
    Grant,
    #[error("output '{name}' is {needed} bytes, more than the {given} bytes given in its region")]
    OutputTooSmall {
        name: String,
        needed: usize,
        given: u64,
    },
    #[error("the worker's response lacks output '{0}'")]
    MissingOutput(String),
}

/// One brokered tensor: the hold on its region, the client's id to echo, and the range.
struct Slot {
    hold: InFlight,
    id: String,
    offset: u64,
    byte_size: u64,
}

impl Slot {
    /// The sidecar's mapping of the region (remote path only).
    fn mapping(&self) -> Result<Arc<Region>, BrokeredError> {
        self.hold.mapping().map_err(|error| {
            tracing::warn!(%error, "failed to map a client region");
            BrokeredError::Map
        })
    }

    fn set_parameters(
        &self,
        parameters: &mut HashMap<String, InferParameter>,
        reference: Reference,
    ) {
        parameters.remove(BROKERED_REGION);
        parameters.remove(BROKERED_GRANT);
        let (key, value) = match reference {
            Reference::Region => (BROKERED_REGION, self.id.clone()),
            Reference::Grant(grant) => (BROKERED_GRANT, grant),
        };
        parameters.insert(key.into(), string(value));
        parameters.insert(BROKERED_OFFSET.into(), uint(self.offset));
        parameters.insert(BROKERED_BYTE_SIZE.into(), uint(self.byte_size));
    }
}

enum Reference {
    Region,
    Grant(String),
}

fn string(value: String) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(value)),
    }
}

fn uint(value: u64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::Uint64Param(value)),
    }
}

/// The brokered tensors of one request, with their holds.
pub struct Brokered {
    books: Arc<Books>,
    /// By input index.
    inputs: Vec<(usize, Slot)>,
    /// By output name.
    outputs: Vec<(String, Slot)>,
}

/// Whether a tensor names a brokered region.
fn names_region(parameters: &HashMap<String, InferParameter>) -> bool {
    parameters.contains_key(BROKERED_REGION) || parameters.contains_key(BROKERED_GRANT)
}

/// Whether the request names any brokered region (inputs or outputs).
pub fn has_references(request: &ModelInferRequest) -> bool {
    request.inputs.iter().any(|i| names_region(&i.parameters))
        || request.outputs.iter().any(|o| names_region(&o.parameters))
}

impl Brokered {
    /// Takes a hold for `session` on every region the request names. `None`: it names none.
    pub fn prepare(
        request: &ModelInferRequest,
        session: Option<&str>,
        books: &Arc<Books>,
    ) -> Result<Option<Self>, BrokeredError> {
        if !has_references(request) {
            return Ok(None);
        }
        let session = session.ok_or(BrokeredError::MissingSession(
            remotemedia_proto::params::SESSION_METADATA,
        ))?;
        let token = SessionToken::parse_hex(session).ok_or(BrokeredError::MissingSession(
            remotemedia_proto::params::SESSION_METADATA,
        ))?;
        let mut inputs = Vec::new();
        for (index, input) in request.inputs.iter().enumerate() {
            if names_region(&input.parameters) {
                let slot = hold("input", &input.name, &input.parameters, &token, books)?;
                inputs.push((index, slot));
            }
        }
        let mut outputs = Vec::new();
        for output in &request.outputs {
            if names_region(&output.parameters) {
                let slot = hold("output", &output.name, &output.parameters, &token, books)?;
                outputs.push((output.name.clone(), slot));
            }
        }
        Ok(Some(Self {
            books: books.clone(),
            inputs,
            outputs,
        }))
    }

    /// The request for a colocated worker: each region named by a fresh one-time grant.
    pub fn for_colocated(
        &mut self,
        request: &ModelInferRequest,
    ) -> Result<ModelInferRequest, BrokeredError> {
        let group = self.books.grant_group();
        let mut forwarded = request.clone();
        for (index, slot) in &mut self.inputs {
            let grant = slot.hold.grant(group).map_err(|_| BrokeredError::Grant)?;
            let reference = Reference::Grant(grant.to_hex());
            slot.set_parameters(&mut forwarded.inputs[*index].parameters, reference);
        }
        for (name, slot) in &mut self.outputs {
            let grant = slot.hold.grant(group).map_err(|_| BrokeredError::Grant)?;
            if let Some(output) = forwarded.outputs.iter_mut().find(|o| &o.name == name) {
                slot.set_parameters(&mut output.parameters, Reference::Grant(grant.to_hex()));
            }
        }
        Ok(forwarded)
    }

    /// The request for a remote worker: brokered inputs inline, brokered outputs asked inline.
    pub fn for_remote(
        &mut self,
        request: &ModelInferRequest,
    ) -> Result<ModelInferRequest, BrokeredError> {
        let mut forwarded = request.clone();
        let brokered: HashMap<usize, usize> = self
            .inputs
            .iter()
            .enumerate()
            .map(|(slot, (input, _))| (*input, slot))
            .collect();
        let mut given = std::mem::take(&mut forwarded.raw_input_contents).into_iter();
        let mut raw = Vec::with_capacity(forwarded.inputs.len());
        for (index, input) in forwarded.inputs.iter_mut().enumerate() {
            match brokered.get(&index) {
                Some(&slot) => {
                    let slot = &self.inputs[slot].1;
                    let region = slot.mapping()?;
                    let (start, len) = (slot.offset as usize, slot.byte_size as usize);
                    raw.push(Bytes::from_owner(Slice { region, start, len }));
                    for key in [BROKERED_REGION, BROKERED_OFFSET, BROKERED_BYTE_SIZE] {
                        input.parameters.remove(key);
                    }
                }
                None if input.contents.is_some()
                    || input.parameters.contains_key(SHARED_MEMORY_REGION) =>
                {
                    return Err(BrokeredError::MixedContents);
                }
                None => raw.push(given.next().ok_or(BrokeredError::MixedContents)?),
            }
        }
        forwarded.raw_input_contents = raw;
        for output in &mut forwarded.outputs {
            for key in [BROKERED_REGION, BROKERED_OFFSET, BROKERED_BYTE_SIZE] {
                output.parameters.remove(key);
            }
        }
        Ok(forwarded)
    }

    /// Voids the grants of a failed attempt.
    pub fn void_grants(&mut self) {
        let slots = self.inputs.iter_mut().map(|(_, s)| s);
        for slot in slots.chain(self.outputs.iter_mut().map(|(_, s)| s)) {
            slot.hold.void_grants();
        }
    }

    /// Bytes of the brokered tensors, for the forwarded-bytes metric.
    pub fn bytes(&self) -> u64 {
        let inputs = self.inputs.iter().map(|(_, s)| s.byte_size);
        inputs
            .chain(self.outputs.iter().map(|(_, s)| s.byte_size))
            .sum()
    }

    /// Puts the worker's answer in the client's terms: outputs returned inline by a remote
    /// worker are written into their regions (`remote`), and every brokered output carries the
    /// client's three parameters and an empty raw entry.
    pub fn finish(
        &mut self,
        response: &mut ModelInferResponse,
        remote: bool,
    ) -> Result<(), BrokeredError> {
        for (name, slot) in &mut self.outputs {
            let index = response
                .outputs
                .iter()
                .position(|o| &o.name == name)
                .ok_or_else(|| BrokeredError::MissingOutput(name.clone()))?;
            if remote {
                let data = response
                    .raw_output_contents
                    .get_mut(index)
                    .map(std::mem::take)
                    .ok_or_else(|| BrokeredError::MissingOutput(name.clone()))?;
                if data.len() as u64 > slot.byte_size {
                    return Err(BrokeredError::OutputTooSmall {
                        name: name.clone(),
                        needed: data.len(),
                        given: slot.byte_size,
                    });
                }
                let region = slot.mapping()?;
                let offset = slot.offset as usize;
                // Up to hundreds of MiB: let the runtime move other tasks off this thread.
                tokio::task::block_in_place(|| region.write_at(offset, &data))
                    .ok_or(BrokeredError::Map)?;
            }
            slot.set_parameters(&mut response.outputs[index].parameters, Reference::Region);
        }
        Ok(())
    }
}

/// Input bytes read in place from the sidecar's mapping of a client region.
struct Slice {
    region: Arc<Region>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for Slice {
    fn as_ref(&self) -> &[u8] {
        &self.region.as_slice()[self.start..self.start + self.len]
    }
}

/// Reads one tensor's brokered parameters and takes the session's hold on its region.
fn hold(
    kind: &'static str,
    name: &str,
    parameters: &HashMap<String, InferParameter>,
    token: &SessionToken,
    books: &Arc<Books>,
) -> Result<Slot, BrokeredError> {
    let shown: String = name.chars().take(64).collect();
    let bad = |reason: String| BrokeredError::BadParameter {
        kind,
        name: shown.clone(),
        reason,
    };
    if parameters.contains_key(BROKERED_GRANT) {
        return Err(bad(format!("{BROKERED_GRANT} is for workers, not clients")));
    }
    if parameters.contains_key(SHARED_MEMORY_REGION) {
        return Err(bad(format!(
            "names both {BROKERED_REGION} and {SHARED_MEMORY_REGION}"
        )));
    }
    let id = match parameters
        .get(BROKERED_REGION)
        .and_then(|p| p.parameter_choice.as_ref())
    {
        Some(ParameterChoice::StringParam(id)) => id.clone(),
        _ => return Err(bad(format!("{BROKERED_REGION} must be a string"))),
    };
    let number = |key: &str| remotemedia_proto::params::unsigned(parameters, key).map_err(&bad);
    let offset = number(BROKERED_OFFSET)?.unwrap_or(0);
    let byte_size = number(BROKERED_BYTE_SIZE)?
        .ok_or_else(|| bad(format!("{BROKERED_BYTE_SIZE} is required")))?;
    let not_found = || BrokeredError::NotFound {
        kind,
        name: shown.clone(),
    };
    // A malformed id is as unknown as a well-formed one nobody holds.
    let key = RegionKey::parse_hex(&id).ok_or_else(not_found)?;
    let hold = books.hold(token, key).map_err(|_| not_found())?;
    let size = hold.size();
    if offset.checked_add(byte_size).is_none_or(|end| end > size) {
        return Err(BrokeredError::OutOfRange {
            kind,
            name: shown,
            offset,
            byte_size,
            size,
        });
    }
    Ok(Slot {
        hold,
        id,
        offset,
        byte_size,
    })
}
