//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it: the holder renews
//! `renewTime` every [`RETRY`]; another replica takes the Lease once it has seen the same record
//! unchanged for the lease duration (measured on its own clock, so clock skew between replicas
//! does not matter). Every write carries the `resourceVersion` it read, so two candidates never
//! both win. kube-runtime has no elector; this is small enough to own.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::time::Instant;

use crate::error_chain;

/// How long a Lease stays valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// The holder gives up (and exits) when it could not renew for this long.
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often the holder renews.
const RETRY: Duration = Duration::from_secs(2);
/// How often a candidate looks: it takes over at most this long after the Lease expired.
const CANDIDATE_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("failed to {action} the Lease {lease}")]
    Api {
        action: &'static str,
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("lost the Lease {0}: not renewed within {RENEW_DEADLINE:?}")]
    Lost(String),
    #[error("lost the Lease {name} to {holder}")]
    Taken { name: String, holder: String },
}

/// The Lease record a candidate last saw, and when it first saw it.
struct Seen {
    resource_version: Option<String>,
    since: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    seen: Option<Seen>,
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: String) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity,
            seen: None,
        }
    }

    fn describe(&self) -> String {
        format!("{}/{}", self.api.namespace().unwrap_or_default(), self.name)
    }

    fn api_error(&self, action: &'static str, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            action,
            lease: self.describe(),
            source,
        }
    }

    /// Returns once this replica holds the Lease. Transient API errors are retried.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "failed to try the Lease")
                }
            }
            tokio::time::sleep(CANDIDATE_RETRY).await;
        }
    }

    /// One attempt: takes the Lease if it is free, expired or already ours.
    async fn try_acquire(&mut self) -> Result<bool, LeaderError> {
        let lease = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| self.api_error("read", source))?;
        let Some(lease) = lease else {
            let created = self
                .api
                .create(&PostParams::default(), &self.record(None, 0))
                .await;
            return Ok(created.is_ok());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let version = lease.metadata.resource_version.clone();
        let now = Instant::now();
        let unchanged_since = match &self.seen {
            Some(seen) if seen.resource_version == version => seen.since,
            _ => {
                self.seen = Some(Seen {
                    resource_version: version,
                    since: now,
                });
                now
            }
        };
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(LEASE_DURATION, Duration::from_secs);
        let free = holder.is_empty() || holder == self.identity;
        if !free && now.duration_since(unchanged_since) < duration {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(holder != self.identity);
        let mut taken = self.record(
            spec.acquire_time.filter(|_| holder == self.identity),
            transitions,
        );
        taken.metadata.resource_version = lease.metadata.resource_version;
        // A conflict means another candidate wrote first: not ours this round.
        let replaced = self
            .api
            .replace(&self.name, &PostParams::default(), &taken)
            .await;
        if replaced.is_ok() {
            tracing::info!(lease = %self.describe(), identity = %self.identity, previous = holder, "acquired the Lease");
        }
        Ok(replaced.is_ok())
    }

    /// Renews the Lease until it is lost, which is returned; never returns while leading.
    pub async fn hold(&mut self) -> LeaderError {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(RETRY).await;
            match self.renew().await {
                Ok(()) => renewed = Instant::now(),
                Err(error @ LeaderError::Taken { .. }) => return error,
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "failed to renew the Lease");
                    if renewed.elapsed() >= RENEW_DEADLINE {
                        return LeaderError::Lost(self.describe());
                    }
                }
            }
        }
    }

    async fn renew(&self) -> Result<(), LeaderError> {
        let lease = self
            .api
            .get(&self.name)
            .await
            .map_err(|source| self.api_error("read", source))?;
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.unwrap_or_default();
        if holder != self.identity {
            return Err(LeaderError::Taken {
                name: self.describe(),
                holder,
            });
        }
        let mut renewed = self.record(spec.acquire_time, spec.lease_transitions.unwrap_or(0));
        renewed.metadata.resource_version = lease.metadata.resource_version;
        self.api
            .replace(&self.name, &PostParams::default(), &renewed)
            .await
            .map(|_| ())
            .map_err(|source| self.api_error("renew", source))
    }

    /// Hands the Lease back on shutdown, so a standby takes over at once instead of after the
    /// lease duration.
    pub async fn release(&self) {
        let result = async {
            let mut lease = self.api.get(&self.name).await?;
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        .await;
        match result {
            Ok(()) => tracing::info!(lease = %self.describe(), "released the Lease"),
            Err(error) => tracing::warn!(error = %error, "failed to release the Lease"),
        }
    }

    fn record(&self, acquire_time: Option<MicroTime>, transitions: i32) -> Lease {
        let now = MicroTime(Timestamp::now());
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: i32::try_from(LEASE_DURATION.as_secs()).ok(),
                acquire_time: Some(acquire_time.unwrap_or_else(|| now.clone())),
                renew_time: Some(now),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        }
    }
}
