//! Where each model's workers are: a [`Discovery`] keeps a watch channel of [`EndpointSpec`]s
//! current. `static` reads a YAML file and re-reads it when its modification time changes;
//! [`kubernetes`] watches EndpointSlices and ModelWorkers through the API server.

pub mod kubernetes;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::watch;

/// One worker endpoint serving one model.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// `modelId` or `namespace/modelId`.
    pub model: String,
    /// `host:port` of the worker's gRPC port.
    pub address: String,
    /// The node the worker runs on; colocated when it is the sidecar's `--node-name`.
    pub node: String,
}

/// The current endpoints; every change replaces the whole list.
pub type Endpoints = watch::Receiver<Arc<Vec<EndpointSpec>>>;

/// A source of endpoints.
pub trait Discovery: Send + 'static {
    /// Starts watching (spawning what it needs on the current runtime).
    fn watch(self: Box<Self>) -> Endpoints;
}

/// How often the static file's modification time is checked.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// `--discovery static --workers FILE`: a YAML list of `{model, address, node}`.
#[derive(Debug)]
pub struct StaticFile {
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StaticFileError {
    #[error("failed to read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse {}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
}

/// Reads and checks a static endpoints file.
pub fn read_static(path: &Path) -> Result<Vec<EndpointSpec>, StaticFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| StaticFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_static(&text).map_err(|reason| StaticFileError::Parse {
        path: path.to_owned(),
        reason,
    })
}

fn parse_static(text: &str) -> Result<Vec<EndpointSpec>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let specs: Vec<EndpointSpec> =
        serde_saphyr::from_str(text).map_err(|error| error.to_string())?;
    for spec in &specs {
        if spec.model.is_empty() || spec.model.split('/').count() > 2 {
            return Err(format!(
                "model {:?} is neither modelId nor namespace/modelId",
                spec.model
            ));
        }
        let host_port = spec.address.rsplit_once(':');
        let valid = host_port.is_some_and(|(host, port)| {
            !host.is_empty() && !host.contains(['/', ' ']) && port.parse::<u16>().is_ok()
        });
        if !valid {
            return Err(format!("address {:?} is not host:port", spec.address));
        }
    }
    Ok(specs)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Discovery for StaticFile {
    fn watch(self: Box<Self>) -> Endpoints {
        let path = self.path;
        let mut seen = modified(&path);
        let first = read_static(&path).unwrap_or_else(|error| {
            tracing::warn!(error = %error_chain(&error), "no endpoints until the file is fixed");
            Vec::new()
        });
        let (sender, receiver) = watch::channel(Arc::new(first));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL_INTERVAL).await;
                if sender.is_closed() {
                    return;
                }
                let now = modified(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                match read_static(&path) {
                    Ok(specs) => {
                        tracing::info!(endpoints = specs.len(), "endpoints file re-read");
                        sender.send_replace(Arc::new(specs));
                    }
                    // The last good list stays: a half-written or broken file must not empty it.
                    Err(error) => tracing::warn!(
                        error = %error_chain(&error),
                        "keeping the last good endpoints"
                    ),
                }
            }
        });
        receiver
    }
}

pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        text.push_str(": ");
        text.push_str(&next.to_string());
        source = next.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_static_file_lists_model_address_and_node_per_endpoint() {
        let specs = parse_static(
            "- {model: ns/echo, address: '127.0.0.1:50051', node: n1}\n- model: echo\n  address: 'w:1'\n  node: n2\n",
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].model, "ns/echo");
        assert_eq!(specs[1].node, "n2");
        assert_eq!(parse_static("").unwrap(), []);
    }

    #[test]
    fn bad_entries_are_refused_naming_the_field() {
        for (text, says) in [
            ("- {model: a/b/c, address: 'h:1', node: n}", "model"),
            ("- {model: a, address: 'no port', node: n}", "address"),
            ("- {model: a, address: 'h:1'}", "node"),
            ("- {model: a, address: 'h:1', node: n, extra: 1}", "extra"),
        ] {
            let error = parse_static(text).unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[tokio::test]
    async fn a_changed_file_is_re_read_and_a_broken_one_keeps_the_last_good_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workers.yaml");
        std::fs::write(&path, "").unwrap();
        let mut endpoints = Box::new(StaticFile { path: path.clone() }).watch();
        assert!(endpoints.borrow().is_empty());
        // Modification times can be coarse: make sure the next write looks newer.
        tokio::time::sleep(Duration::from_millis(20)).await;
        std::fs::write(&path, "- {model: m, address: 'h:1', node: n}").unwrap();
        tokio::time::timeout(Duration::from_secs(5), endpoints.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(endpoints.borrow_and_update().len(), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        std::fs::write(&path, "- {model: [").unwrap();
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        assert!(!endpoints.has_changed().unwrap());
        assert_eq!(endpoints.borrow().len(), 1);
    }
}
