//! The broker's books: sessions, the regions they hold, quotas, the node cap and in-flight
//! holds. No sockets here: the server turns packets into these calls, and tests call them
//! directly.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use remotemedia_runtime_core::shm::broker::memfd;
use remotemedia_runtime_core::shm::broker::{
    ErrorCode, GrantToken, LabelUsage, Refusal, RegionHandleId, RegionKey, SessionStats,
    SessionToken,
};
use remotemedia_runtime_core::shm::{Access, Region as Mapping, ShmError};

/// Region sizes are whole pages.
const PAGE: u64 = 4096;

/// What the broker enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of regions alive on the node (`--max-shm-bytes`).
    pub max_shm_bytes: u64,
    /// Most bytes one session may be charged for.
    pub session_quota_bytes: u64,
    /// Most bytes one allocation label within a session may be charged for (unlabelled
    /// allocations count toward the session quota only).
    pub label_quota_bytes: u64,
    /// Most regions one session may hold (each is a descriptor in the sidecar).
    pub max_regions_per_session: usize,
}

/// A session's handle inside the sidecar (never sent anywhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionId(u64);

/// The broker state, shared by every connection.
#[derive(Debug)]
pub struct Books {
    limits: Limits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    regions: HashMap<RegionKey, Region>,
    sessions: HashMap<SessionId, Session>,
    tokens: HashMap<SessionToken, SessionId>,
    next_session: u64,
    /// Bytes of every live region plus reservations for regions being created.
    node_bytes: u64,
    /// One-time grants of requests in flight (see [`InFlight::grant`]).
    grants: HashMap<GrantToken, Issued>,
    next_group: u64,
}

/// A grant not yet redeemed: the region, the request it belongs to, and, once any grant of that
/// request was redeemed, the session that did it (the only one that may redeem the others).
#[derive(Debug)]
struct Issued {
    key: RegionKey,
    group: GrantGroup,
    redeemer: Option<SessionId>,
}

/// The grants issued for one forwarded request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GrantGroup(u64);

#[derive(Debug)]
struct Region {
    fd: Arc<OwnedFd>,
    size: u64,
    identity: (u64, u64),
    /// Hold counts by session: one per Allocate, Open or Adopt not yet released.
    holders: HashMap<SessionId, u32>,
    /// Requests in flight that use the region (see [`Books::hold`]).
    in_flight: u32,
    /// Who pays for it, while that session holds it.
    charge: Option<(SessionId, String)>,
    /// The sidecar's own mapping, made when a request first reads or writes the region for a
    /// remote worker, and kept while the region lives: a mapping per request faulted every page
    /// in again (16 384 faults for 64 MiB).
    mapping: Option<Arc<Mapping>>,
}

#[derive(Debug)]
struct Session {
    label: String,
    token: SessionToken,
    regions: usize,
    charged: u64,
    labels: HashMap<String, LabelUsage>,
    /// Regions this session holds through Redeem, by the handle it knows them by.
    handles: HashMap<RegionHandleId, RegionKey>,
    next_handle: u64,
}

/// A new session: its id inside the sidecar and the token its client learns.
#[derive(Debug)]
pub struct Ticket {
    pub id: SessionId,
    pub token: SessionToken,
}

/// A region handed to a client: its id, size and descriptor.
#[derive(Debug)]
pub struct Grant {
    pub key: RegionKey,
    pub size: NonZeroU64,
    pub fd: Arc<OwnedFd>,
}

/// What a Redeem gives a session.
#[derive(Debug)]
pub struct Redemption {
    /// The region within the session: the same for every grant of it while the session holds it.
    pub handle: RegionHandleId,
    pub size: NonZeroU64,
    /// The descriptor, only when the session did not hold the region yet.
    pub fd: Option<Arc<OwnedFd>>,
    /// The session's other handles whose regions nobody else holds and no request uses: a
    /// worker's cache would otherwise keep a released region alive, and mapped, on its own.
    pub orphaned: Vec<RegionHandleId>,
}

/// Node-wide totals, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeTotals {
    pub sessions: u64,
    pub regions: u64,
    pub bytes: u64,
}

/// Sessions grouped by their Hello label, for `/debug/sessions` (never ids or tokens).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSummary {
    pub label: String,
    pub sessions: u64,
    pub regions: u64,
    pub charged_bytes: u64,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

/// The one answer for an id that does not exist and for one the session may not use, so the two
/// cannot be told apart.
fn not_found() -> Refusal {
    refuse(ErrorCode::NotFound, "no such region")
}

impl Books {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update below is plain arithmetic and map edits that cannot panic halfway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a session (Hello).
    pub fn open_session(&self, label: String) -> Result<Ticket, Refusal> {
        let token = SessionToken::random()
            .map_err(|_| refuse(ErrorCode::Internal, "failed to draw a session token"))?;
        let mut state = self.state();
        state.next_session += 1;
        let id = SessionId(state.next_session);
        state.tokens.insert(token, id);
        state.sessions.insert(
            id,
            Session {
                label,
                token,
                regions: 0,
                charged: 0,
                labels: HashMap::new(),
                handles: HashMap::new(),
                next_handle: 0,
            },
        );
        Ok(Ticket { id, token })
    }

    /// Creates a sealed, pre-faulted region of `size` bytes rounded up to pages, charged to
    /// `session` and its `label`. Every limit is checked and charged before any memory is
    /// touched, so a refusal allocates nothing.
    pub fn allocate(
        &self,
        session: SessionId,
        size: NonZeroU64,
        label: String,
    ) -> Result<Grant, Refusal> {
        let size = size.get().div_ceil(PAGE) * PAGE;
        self.reserve(session, size, &label)?;
        let created = memfd::create_sealed(size).and_then(|fd| {
            let identity = memfd::identity(fd.as_fd())?;
            Ok((fd, identity))
        });
        let key = RegionKey::random();
        let mut state = self.state();
        let (fd, identity, key) = match (created, key) {
            (Ok((fd, identity)), Ok(key)) if !state.regions.contains_key(&key) => {
                (fd, identity, key)
            }
            (created, _) => {
                state.unreserve(session, size, &label);
                if let Err(error) = created {
                    tracing::warn!(%error, size, "failed to create a region");
                }
                return Err(refuse(
                    ErrorCode::ResourceExhausted,
                    "failed to create a region",
                ));
            }
        };
        let fd = Arc::new(fd);
        state.regions.insert(
            key,
            Region {
                fd: fd.clone(),
                size,
                identity,
                holders: HashMap::from([(session, 1)]),
                in_flight: 0,
                mapping: None,
                charge: Some((session, label)),
            },
        );
        Ok(Grant {
            key,
            size: NonZeroU64::new(size).expect("rounded up from a non-zero size"),
            fd,
        })
    }

    /// Checks and charges every limit in one critical section, and counts the region for the
    /// session before it exists.
    fn reserve(&self, session: SessionId, size: u64, label: &str) -> Result<(), Refusal> {
        let limits = &self.limits;
        let mut state = self.state();
        let node_after = state.node_bytes.saturating_add(size);
        if node_after > limits.max_shm_bytes {
            return Err(refuse(
                ErrorCode::ResourceExhausted,
                format!(
                    "node shared-memory budget of {} bytes reached ({} in use, {size} requested)",
                    limits.max_shm_bytes, state.node_bytes
                ),
            ));
        }
        let entry = state.sessions.get_mut(&session).ok_or_else(not_found)?;
        if entry.regions >= limits.max_regions_per_session {
            return Err(refuse(
                ErrorCode::ResourceExhausted,
                format!("session holds {} regions, the most allowed", entry.regions),
            ));
        }
        if entry.charged.saturating_add(size) > limits.session_quota_bytes {
            return Err(refuse(
                ErrorCode::ResourceExhausted,
                format!(
                    "session quota of {} bytes reached ({} in use, {size} requested)",
                    limits.session_quota_bytes, entry.charged
                ),
            ));
        }
        let label_bytes = entry.labels.get(label).map_or(0, |usage| usage.bytes);
        if !label.is_empty() && label_bytes.saturating_add(size) > limits.label_quota_bytes {
            return Err(refuse(
                ErrorCode::ResourceExhausted,
                format!(
                    "quota of {} bytes for label {label:?} reached ({label_bytes} in use, {size} requested)",
                    limits.label_quota_bytes
                ),
            ));
        }
        entry.charge(label, size);
        entry.regions += 1;
        state.node_bytes = node_after;
        Ok(())
    }

    /// Gives the session a hold on an existing region (Open).
    pub fn open(&self, session: SessionId, key: RegionKey) -> Result<Grant, Refusal> {
        let mut state = self.state();
        let state = &mut *state;
        let entry = state.sessions.get_mut(&session).ok_or_else(not_found)?;
        let region = state.regions.get_mut(&key).ok_or_else(not_found)?;
        let first_hold = !region.holders.contains_key(&session);
        if first_hold && entry.regions >= self.limits.max_regions_per_session {
            return Err(refuse(
                ErrorCode::ResourceExhausted,
                format!("session holds {} regions, the most allowed", entry.regions),
            ));
        }
        *region.holders.entry(session).or_insert(0) += 1;
        entry.regions += usize::from(first_hold);
        Ok(Grant {
            key,
            size: NonZeroU64::new(region.size).expect("regions are never empty"),
            fd: region.fd.clone(),
        })
    }

    /// Drops one of the session's holds on a region (Release).
    pub fn release(&self, session: SessionId, key: RegionKey) -> Result<(), Refusal> {
        let mut state = self.state();
        let holds = state
            .regions
            .get_mut(&key)
            .and_then(|region| region.holders.get_mut(&session))
            .ok_or_else(not_found)?;
        *holds -= 1;
        if *holds == 0 {
            state.drop_holder(session, key);
        }
        Ok(())
    }

    /// Takes a live region back from a client after a restart (Adopt): its seals and size are
    /// checked, an id already known must be the same file, and the node cap counts it again
    /// (it is never refused for the cap: the memory exists whatever the broker answers).
    pub fn adopt(
        &self,
        session: SessionId,
        key: RegionKey,
        size: NonZeroU64,
        label: String,
        owner: bool,
        fd: OwnedFd,
    ) -> Result<(), Refusal> {
        let size = size.get();
        if !size.is_multiple_of(PAGE) {
            return Err(refuse(
                ErrorCode::InvalidArgument,
                "region size is not whole pages",
            ));
        }
        memfd::verify(fd.as_fd(), size)
            .map_err(|error| refuse(ErrorCode::InvalidArgument, error.to_string()))?;
        let identity = memfd::identity(fd.as_fd())
            .map_err(|_| refuse(ErrorCode::InvalidArgument, "failed to inspect the region"))?;
        let mut state = self.state();
        let state = &mut *state;
        let entry = state.sessions.get_mut(&session).ok_or_else(not_found)?;
        let region = match state.regions.get_mut(&key) {
            Some(region) if region.identity != identity => {
                return Err(refuse(
                    ErrorCode::FailedPrecondition,
                    "a different region holds this id",
                ));
            }
            Some(region) => region,
            None => {
                state.node_bytes = state.node_bytes.saturating_add(size);
                if state.node_bytes > self.limits.max_shm_bytes {
                    tracing::warn!(
                        node_bytes = state.node_bytes,
                        max = self.limits.max_shm_bytes,
                        "adopted regions exceed the node budget"
                    );
                }
                state.regions.entry(key).or_insert(Region {
                    fd: Arc::new(fd),
                    size,
                    identity,
                    holders: HashMap::new(),
                    in_flight: 0,
                    mapping: None,
                    charge: None,
                })
            }
        };
        let first_hold = !region.holders.contains_key(&session);
        *region.holders.entry(session).or_insert(0) += 1;
        entry.regions += usize::from(first_hold);
        if owner && region.charge.is_none() {
            entry.charge(&label, size);
            region.charge = Some((session, label));
        }
        Ok(())
    }

    /// The session's own usage (Stats).
    pub fn stats(&self, session: SessionId) -> SessionStats {
        let state = self.state();
        let Some(entry) = state.sessions.get(&session) else {
            return SessionStats::default();
        };
        let (held_regions, held_bytes) = state
            .regions
            .values()
            .filter(|region| region.holders.contains_key(&session))
            .fold((0, 0), |(n, bytes), region| (n + 1, bytes + region.size));
        let mut labels: Vec<_> = entry.labels.values().cloned().collect();
        labels.sort_by(|a, b| a.label.cmp(&b.label));
        SessionStats {
            held_regions,
            held_bytes,
            charged_bytes: entry.charged,
            labels,
        }
    }

    /// Ends a session (its connection closed): every hold goes, and regions nobody else holds
    /// and no request has in flight are destroyed.
    pub fn close_session(&self, session: SessionId) {
        let mut state = self.state();
        let held: Vec<RegionKey> = state
            .regions
            .iter()
            .filter(|(_, region)| region.holders.contains_key(&session))
            .map(|(key, _)| *key)
            .collect();
        for key in held {
            state.drop_holder(session, key);
        }
        if let Some(entry) = state.sessions.remove(&session) {
            state.tokens.remove(&entry.token);
        }
    }

    /// Marks a region as used by a request in flight for the session `token` names: until the
    /// returned hold drops, the region outlives every session's release (the router in C1 holds
    /// regions while a worker reads them). `NOT_FOUND` unless that session holds the region.
    pub fn hold(
        self: &Arc<Self>,
        token: &SessionToken,
        key: RegionKey,
    ) -> Result<InFlight, Refusal> {
        let mut state = self.state();
        let session = *state.tokens.get(token).ok_or_else(not_found)?;
        let region = state.regions.get_mut(&key).ok_or_else(not_found)?;
        if !region.holders.contains_key(&session) {
            return Err(not_found());
        }
        region.in_flight += 1;
        Ok(InFlight {
            books: self.clone(),
            key,
            fd: region.fd.clone(),
            grants: Vec::new(),
        })
    }

    /// A fresh group for the grants of one forwarded request.
    pub fn grant_group(&self) -> GrantGroup {
        let mut state = self.state();
        state.next_group += 1;
        GrantGroup(state.next_group)
    }

    /// Turns a grant into a hold for `session` (Redeem): once, while the hold it was issued from
    /// lives, and only for the session that redeemed the first grant of its request. A region
    /// the session already holds through Redeem comes back as the same handle, without the
    /// descriptor. Every refusal is the same NOT_FOUND, so a guessed grant learns nothing.
    pub fn redeem(&self, session: SessionId, grant: GrantToken) -> Result<Redemption, Refusal> {
        let mut state = self.state();
        let state = &mut *state;
        let issued = state.grants.get(&grant).ok_or_else(not_found)?;
        if issued.redeemer.is_some_and(|redeemer| redeemer != session) {
            return Err(not_found());
        }
        let (key, group) = (issued.key, issued.group);
        let entry = state.sessions.get_mut(&session).ok_or_else(not_found)?;
        let region = state.regions.get_mut(&key).ok_or_else(not_found)?;
        let size = NonZeroU64::new(region.size).expect("regions are never empty");
        let known = entry
            .handles
            .iter()
            .find(|(_, held)| **held == key)
            .map(|(handle, _)| *handle);
        let reply = match known {
            Some(handle) => (handle, size, None),
            None => {
                let first_hold = !region.holders.contains_key(&session);
                if first_hold && entry.regions >= self.limits.max_regions_per_session {
                    return Err(refuse(
                        ErrorCode::ResourceExhausted,
                        format!("session holds {} regions, the most allowed", entry.regions),
                    ));
                }
                *region.holders.entry(session).or_insert(0) += 1;
                entry.regions += usize::from(first_hold);
                entry.next_handle += 1;
                let handle =
                    RegionHandleId(NonZeroU64::new(entry.next_handle).expect("counts up from 1"));
                entry.handles.insert(handle, key);
                (handle, size, Some(region.fd.clone()))
            }
        };
        state.grants.remove(&grant);
        for other in state.grants.values_mut() {
            if other.group == group {
                other.redeemer = Some(session);
            }
        }
        let (handle, size, fd) = reply;
        let mut orphaned = state.orphans(session);
        orphaned.retain(|other| *other != handle);
        Ok(Redemption {
            handle,
            size,
            fd,
            orphaned,
        })
    }

    /// `session`'s handles whose regions nobody else holds and no request uses (GetOrphans).
    pub fn orphans(&self, session: SessionId) -> Vec<RegionHandleId> {
        self.state().orphans(session)
    }

    /// Drops the hold a Redeem gave `session` on the region it knows as `handle` (Forget).
    pub fn forget(&self, session: SessionId, handle: RegionHandleId) -> Result<(), Refusal> {
        let mut state = self.state();
        let key = state
            .sessions
            .get_mut(&session)
            .and_then(|entry| entry.handles.remove(&handle))
            .ok_or_else(not_found)?;
        let holds = state
            .regions
            .get_mut(&key)
            .and_then(|region| region.holders.get_mut(&session))
            .ok_or_else(not_found)?;
        *holds -= 1;
        if *holds == 0 {
            state.drop_holder(session, key);
        }
        Ok(())
    }

    pub fn totals(&self) -> NodeTotals {
        let state = self.state();
        NodeTotals {
            sessions: state.sessions.len() as u64,
            regions: state.regions.len() as u64,
            bytes: state.node_bytes,
        }
    }

    /// Sessions summed by Hello label, sorted by label.
    pub fn summaries(&self) -> Vec<LabelSummary> {
        let state = self.state();
        let mut by_label: HashMap<&str, LabelSummary> = HashMap::new();
        for session in state.sessions.values() {
            let summary = by_label
                .entry(&session.label)
                .or_insert_with(|| LabelSummary {
                    label: session.label.clone(),
                    ..LabelSummary::default()
                });
            summary.sessions += 1;
            summary.regions += session.regions as u64;
            summary.charged_bytes += session.charged;
        }
        let mut summaries: Vec<_> = by_label.into_values().collect();
        summaries.sort_by(|a, b| a.label.cmp(&b.label));
        summaries
    }
}

impl Session {
    fn charge(&mut self, label: &str, size: u64) {
        self.charged += size;
        let usage = self
            .labels
            .entry(label.to_owned())
            .or_insert_with(|| LabelUsage {
                label: label.to_owned(),
                ..LabelUsage::default()
            });
        usage.regions += 1;
        usage.bytes += size;
    }

    fn uncharge(&mut self, label: &str, size: u64) {
        self.charged -= size;
        if let Some(usage) = self.labels.get_mut(label) {
            usage.regions -= 1;
            usage.bytes -= size;
            if usage.regions == 0 {
                self.labels.remove(label);
            }
        }
    }
}

impl State {
    fn unreserve(&mut self, session: SessionId, size: u64, label: &str) {
        self.node_bytes -= size;
        if let Some(entry) = self.sessions.get_mut(&session) {
            entry.uncharge(label, size);
            entry.regions -= 1;
        }
    }

    /// Removes `session` from the region's holders (uncharging it if it paid) and destroys the
    /// region when nobody holds it and nothing is in flight.
    fn drop_holder(&mut self, session: SessionId, key: RegionKey) {
        let Some(region) = self.regions.get_mut(&key) else {
            return;
        };
        region.holders.remove(&session);
        if let Some(entry) = self.sessions.get_mut(&session) {
            entry.regions -= 1;
            entry.handles.retain(|_, held| *held != key);
            if let Some((payer, label)) = &region.charge
                && *payer == session
            {
                entry.uncharge(label, region.size);
                region.charge = None;
            }
        }
        self.destroy_if_unused(key);
    }

    /// `session`'s Redeem handles whose regions only it holds and no request uses: a worker's
    /// cache would otherwise keep a released region alive, and mapped, on its own.
    fn orphans(&self, session: SessionId) -> Vec<RegionHandleId> {
        self.sessions.get(&session).map_or_else(Vec::new, |entry| {
            entry
                .handles
                .iter()
                .filter(|(_, key)| {
                    self.regions.get(key).is_some_and(|region| {
                        region.in_flight == 0 && region.holders.keys().eq([&session])
                    })
                })
                .map(|(handle, _)| *handle)
                .collect()
        })
    }

    fn destroy_if_unused(&mut self, key: RegionKey) {
        let unused = self
            .regions
            .get(&key)
            .is_some_and(|region| region.holders.is_empty() && region.in_flight == 0);
        if unused && let Some(region) = self.regions.remove(&key) {
            self.node_bytes -= region.size;
        }
    }
}

/// A request's hold on a region; the region is destroyed on drop if nobody holds it any more,
/// and the grants issued from it are void.
#[derive(Debug)]
pub struct InFlight {
    books: Arc<Books>,
    key: RegionKey,
    fd: Arc<OwnedFd>,
    grants: Vec<GrantToken>,
}

impl InFlight {
    /// The region's descriptor, for whoever serves the request.
    pub fn fd(&self) -> &Arc<OwnedFd> {
        &self.fd
    }

    /// The sidecar's mapping of the region, made on first use and kept while the region lives.
    pub fn mapping(&self) -> Result<Arc<Mapping>, ShmError> {
        let cached = |state: &State| state.regions.get(&self.key)?.mapping.clone();
        if let Some(mapping) = cached(&self.books.state()) {
            return Ok(mapping);
        }
        // Mapped outside the lock, which every broker call takes.
        let mapping = Arc::new(Mapping::from_sealed(self.fd.clone(), Access::Shared)?);
        let mut state = self.books.state();
        // The hold keeps the region in the books; a racing request may have mapped it first.
        Ok(match state.regions.get_mut(&self.key) {
            Some(region) => region.mapping.get_or_insert(mapping).clone(),
            None => mapping,
        })
    }

    /// The region's size in bytes.
    pub fn size(&self) -> u64 {
        self.books
            .state()
            .regions
            .get(&self.key)
            .map_or(0, |region| region.size)
    }

    /// A one-time grant for this region, valid while this hold lives (see [`Books::redeem`]);
    /// `group` ties together the grants of one request.
    pub fn grant(&mut self, group: GrantGroup) -> Result<GrantToken, Refusal> {
        let grant = GrantToken::random()
            .map_err(|_| refuse(ErrorCode::Internal, "failed to draw a grant"))?;
        self.books.state().grants.insert(
            grant,
            Issued {
                key: self.key,
                group,
                redeemer: None,
            },
        );
        self.grants.push(grant);
        Ok(grant)
    }

    /// Voids every grant issued from this hold (the request went to a worker that failed, and
    /// is retried elsewhere with fresh grants).
    pub fn void_grants(&mut self) {
        let mut state = self.books.state();
        for grant in self.grants.drain(..) {
            state.grants.remove(&grant);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.books.state();
        for grant in &self.grants {
            state.grants.remove(grant);
        }
        if let Some(region) = state.regions.get_mut(&self.key) {
            region.in_flight -= 1;
        }
        state.destroy_if_unused(self.key);
    }
}

#[cfg(test)]
mod tests;
