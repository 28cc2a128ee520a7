//! Triton's system shared memory through the sidecar (`--allow-named-shm`): a client registers
//! a POSIX shared-memory object by key and names it in requests, as with Triton. Registrations
//! are scoped to the client's connection (status, unregister and inference see only the
//! caller's own, and they go when the connection closes), and their bytes travel to workers
//! inline, never as descriptors: the sidecar reads input slices from its mapping and writes
//! inline outputs into the client's range.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use remotemedia_proto::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, infer_parameter::ParameterChoice,
    system_shared_memory_status_response::RegionStatus,
};
use remotemedia_proto::params::{
    SHARED_MEMORY_BYTE_SIZE, SHARED_MEMORY_OFFSET, SHARED_MEMORY_REGION,
};
use remotemedia_runtime_core::shm::{Access, Region, ShmError, open_named_region};

use super::connection::ConnectionId;

/// How often an unregister looks whether the requests using a registration have finished.
const UNREGISTER_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Why a registration or a named tensor was refused.
#[derive(Debug, thiserror::Error)]
pub enum NamedError {
    #[error("system shared memory through the sidecar is off (--allow-named-shm)")]
    Disabled,
    #[error("failed to register shared-memory region '{0}': a region of that name is registered")]
    AlreadyRegistered(String),
    #[error("failed to register shared-memory region '{0}': no shared-memory object has that key")]
    KeyNotFound(String),
    #[error("failed to register shared-memory region '{name}': {reason}")]
    Invalid { name: String, reason: String },
    #[error("shared-memory region '{0}' is not registered")]
    NotRegistered(String),
    #[error(
        "{kind} '{name}': offset {offset} + byte_size {byte_size} passes the {registered} bytes registered as region '{region}'"
    )]
    OutOfRange {
        kind: &'static str,
        name: String,
        region: String,
        offset: u64,
        byte_size: u64,
        registered: u64,
    },
    #[error("{kind} '{name}': {reason}")]
    BadParameter {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("input '{0}' names a shared-memory region while other inputs carry typed contents")]
    MixedContents(String),
    #[error("output '{name}' is {needed} bytes, more than the {given} bytes given in its region")]
    OutputTooSmall {
        name: String,
        needed: usize,
        given: u64,
    },
    #[error("the worker's response lacks output '{0}'")]
    MissingOutput(String),
}

fn shown(text: &str) -> String {
    text.chars().take(64).collect()
}

/// One registration: the client's range of its object, mapped once here.
struct Registration {
    key: String,
    offset: u64,
    byte_size: u64,
    region: Arc<Region>,
}

impl Registration {
    /// The absolute start and length of `offset..offset + byte_size` of the registered range.
    fn locate(
        &self,
        kind: &'static str,
        name: &str,
        region: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(usize, usize), NamedError> {
        let out_of_range = || NamedError::OutOfRange {
            kind,
            name: shown(name),
            region: shown(region),
            offset,
            byte_size,
            registered: self.byte_size,
        };
        let end = offset.checked_add(byte_size).ok_or_else(out_of_range)?;
        if end > self.byte_size {
            return Err(out_of_range());
        }
        // Registration checked that the registered range fits the mapping.
        Ok(((self.offset + offset) as usize, byte_size as usize))
    }
}

/// Every connection's registrations.
pub struct NamedRegistry {
    allowed: bool,
    connections: Mutex<HashMap<ConnectionId, HashMap<String, Arc<Registration>>>>,
}

/// The named outputs of one request, written into their ranges when the response comes.
pub struct NamedOutputs(Vec<Output>);

struct Output {
    name: String,
    registration: Arc<Registration>,
    start: usize,
    len: usize,
    parameters: HashMap<String, InferParameter>,
}

/// Input bytes read in place from the sidecar's mapping of a registration.
struct Slice {
    registration: Arc<Registration>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for Slice {
    fn as_ref(&self) -> &[u8] {
        &self.registration.region.as_slice()[self.start..self.start + self.len]
    }
}

/// Triton's three parameters of a tensor: `None` when it names no region.
fn reference(
    kind: &'static str,
    name: &str,
    parameters: &HashMap<String, InferParameter>,
) -> Result<Option<(String, u64, u64)>, NamedError> {
    if !parameters.contains_key(SHARED_MEMORY_REGION) {
        return Ok(None);
    }
    let bad = |reason: String| NamedError::BadParameter {
        kind,
        name: shown(name),
        reason,
    };
    let region = match parameters[SHARED_MEMORY_REGION].parameter_choice.as_ref() {
        Some(ParameterChoice::StringParam(region)) if !region.is_empty() => region.clone(),
        _ => {
            return Err(bad(format!(
                "{SHARED_MEMORY_REGION} must be a non-empty string"
            )));
        }
    };
    let number = |key: &str| remotemedia_proto::params::unsigned(parameters, key).map_err(&bad);
    let offset = number(SHARED_MEMORY_OFFSET)?.unwrap_or(0);
    let byte_size = number(SHARED_MEMORY_BYTE_SIZE)?
        .ok_or_else(|| bad(format!("{SHARED_MEMORY_BYTE_SIZE} is required")))?;
    Ok(Some((region, offset, byte_size)))
}

impl NamedRegistry {
    pub fn new(allowed: bool) -> Self {
        Self {
            allowed,
            connections: Mutex::default(),
        }
    }

    fn connections(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ConnectionId, HashMap<String, Arc<Registration>>>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `--allow-named-shm` is on.
    pub fn allowed(&self) -> bool {
        self.allowed
    }

    fn check_allowed(&self) -> Result<(), NamedError> {
        if self.allowed {
            Ok(())
        } else {
            Err(NamedError::Disabled)
        }
    }

    /// Registers `byte_size` bytes at `offset` of the object `key` as `name` for `connection`.
    pub fn register(
        &self,
        connection: ConnectionId,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(), NamedError> {
        self.check_allowed()?;
        let invalid = |reason: &str| NamedError::Invalid {
            name: shown(name),
            reason: reason.to_owned(),
        };
        if name.is_empty() {
            return Err(invalid("the name is empty"));
        }
        if byte_size == 0 {
            return Err(invalid("byte_size is 0"));
        }
        let region =
            open_named_region(key.trim_start_matches('/'), Access::Shared).map_err(|error| {
                match error {
                    ShmError::NotFound { .. } => NamedError::KeyNotFound(shown(name)),
                    ShmError::InvalidRegionId { reason, .. } => invalid(reason),
                    other => {
                        tracing::warn!(error = %other, "failed to map a registered region");
                        invalid("the object cannot be mapped")
                    }
                }
            })?;
        if offset
            .checked_add(byte_size)
            .is_none_or(|end| end > region.len() as u64)
        {
            return Err(invalid("the range passes the end of the object"));
        }
        let mut connections = self.connections();
        let own = connections.entry(connection).or_default();
        if own.contains_key(name) {
            return Err(NamedError::AlreadyRegistered(shown(name)));
        }
        own.insert(
            name.to_owned(),
            Arc::new(Registration {
                key: key.to_owned(),
                offset,
                byte_size,
                region,
            }),
        );
        Ok(())
    }

    /// The caller's registrations, or the one named.
    pub fn status(
        &self,
        connection: ConnectionId,
        name: &str,
    ) -> Result<HashMap<String, RegionStatus>, NamedError> {
        self.check_allowed()?;
        let connections = self.connections();
        let empty = HashMap::new();
        let own = connections.get(&connection).unwrap_or(&empty);
        let status = |(name, registration): (&String, &Arc<Registration>)| {
            let status = RegionStatus {
                name: name.clone(),
                key: registration.key.clone(),
                offset: registration.offset,
                byte_size: registration.byte_size,
            };
            (name.clone(), status)
        };
        if name.is_empty() {
            return Ok(own.iter().map(status).collect());
        }
        let found = own
            .get_key_value(name)
            .ok_or_else(|| NamedError::NotRegistered(shown(name)))?;
        Ok(HashMap::from([status(found)]))
    }

    /// Drops the caller's registration `name` (all of them when empty); an unknown name
    /// succeeds, as in Triton. **Waits**, as the worker does: new requests cannot name it at
    /// once, and this returns when no request in flight reads or writes it any more.
    pub async fn unregister(&self, connection: ConnectionId, name: &str) -> Result<(), NamedError> {
        self.check_allowed()?;
        let removed: Vec<Arc<Registration>> = {
            let mut connections = self.connections();
            match connections.get_mut(&connection) {
                Some(own) if name.is_empty() => own.drain().map(|(_, r)| r).collect(),
                Some(own) => own.remove(name).into_iter().collect(),
                None => Vec::new(),
            }
        };
        for registration in removed {
            // Requests hold it through their input slices and output slots.
            while Arc::strong_count(&registration) > 1 {
                tokio::time::sleep(UNREGISTER_POLL).await;
            }
        }
        Ok(())
    }

    /// The connection closed: its registrations go.
    pub fn drop_connection(&self, connection: ConnectionId) {
        self.connections().remove(&connection);
    }

    /// Sends the request's named inputs inline (slices of the sidecar's mappings) and asks for
    /// its named outputs inline; the returned value writes them where the client asked.
    pub fn prepare(
        &self,
        connection: Option<ConnectionId>,
        request: &mut ModelInferRequest,
    ) -> Result<Option<NamedOutputs>, NamedError> {
        let names_region =
            |p: &HashMap<String, InferParameter>| p.contains_key(SHARED_MEMORY_REGION);
        let used = request.inputs.iter().any(|i| names_region(&i.parameters))
            || request.outputs.iter().any(|o| names_region(&o.parameters));
        if !used {
            return Ok(None);
        }
        self.check_allowed()?;
        let own: HashMap<String, Arc<Registration>> = connection
            .and_then(|connection| self.connections().get(&connection).cloned())
            .unwrap_or_default();
        let lookup = |region: &str| {
            own.get(region)
                .cloned()
                .ok_or_else(|| NamedError::NotRegistered(shown(region)))
        };
        let brokered = |p: &HashMap<String, InferParameter>| {
            p.contains_key(remotemedia_proto::params::BROKERED_REGION)
        };
        let mut given = std::mem::take(&mut request.raw_input_contents).into_iter();
        let mut raw = Vec::with_capacity(request.inputs.len());
        for input in &mut request.inputs {
            match reference("input", &input.name, &input.parameters)? {
                Some((region, offset, byte_size)) => {
                    let registration = lookup(&region)?;
                    let (start, len) =
                        registration.locate("input", &input.name, &region, offset, byte_size)?;
                    raw.push(Bytes::from_owner(Slice {
                        registration,
                        start,
                        len,
                    }));
                    for key in [
                        SHARED_MEMORY_REGION,
                        SHARED_MEMORY_OFFSET,
                        SHARED_MEMORY_BYTE_SIZE,
                    ] {
                        input.parameters.remove(key);
                    }
                }
                // Brokered inputs have no raw entry; the brokered step adds theirs.
                None if brokered(&input.parameters) => {}
                None if input.contents.is_some() => {
                    return Err(NamedError::MixedContents(shown(&input.name)));
                }
                None => raw.push(
                    given
                        .next()
                        .ok_or_else(|| NamedError::MixedContents(shown(&input.name)))?,
                ),
            }
        }
        request.raw_input_contents = raw;
        let mut outputs = Vec::new();
        for output in &mut request.outputs {
            if let Some((region, offset, byte_size)) =
                reference("output", &output.name, &output.parameters)?
            {
                let registration = lookup(&region)?;
                let (start, len) =
                    registration.locate("output", &output.name, &region, offset, byte_size)?;
                let mut parameters = HashMap::new();
                for key in [
                    SHARED_MEMORY_REGION,
                    SHARED_MEMORY_OFFSET,
                    SHARED_MEMORY_BYTE_SIZE,
                ] {
                    if let Some(value) = output.parameters.remove(key) {
                        parameters.insert(key.to_owned(), value);
                    }
                }
                outputs.push(Output {
                    name: output.name.clone(),
                    registration,
                    start,
                    len,
                    parameters,
                });
            }
        }
        Ok(Some(NamedOutputs(outputs)))
    }
}

impl NamedOutputs {
    /// Writes each named output into the client's range, leaving an empty raw entry and the
    /// client's parameters, as a Triton server answers.
    pub fn finish(&self, response: &mut ModelInferResponse) -> Result<(), NamedError> {
        for output in &self.0 {
            let index = response
                .outputs
                .iter()
                .position(|o| o.name == output.name)
                .ok_or_else(|| NamedError::MissingOutput(shown(&output.name)))?;
            let data = response
                .raw_output_contents
                .get_mut(index)
                .map(std::mem::take)
                .ok_or_else(|| NamedError::MissingOutput(shown(&output.name)))?;
            if data.len() > output.len {
                return Err(NamedError::OutputTooSmall {
                    name: shown(&output.name),
                    needed: data.len(),
                    given: output.len as u64,
                });
            }
            tokio::task::block_in_place(|| {
                output.registration.region.write_at(output.start, &data)
            })
            .ok_or_else(|| NamedError::MissingOutput(shown(&output.name)))?;
            response.outputs[index]
                .parameters
                .extend(output.parameters.clone());
        }
        Ok(())
    }
}
