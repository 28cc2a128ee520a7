//! `remotemedia-operator`: turns each `ModelWorker` into a Deployment of model-worker pods, a
//! Service for them and, with more than one replica, a PodDisruptionBudget, all applied with
//! server-side apply under one field manager and owned by the ModelWorker; and writes what it
//! observed to the ModelWorker's status (see [`status`] for every condition and its trigger).
//!
//! With leader election (the default) only the replica holding the Lease runs the controller;
//! the others wait and serve their admin port.
//!
//! Worker pods mount the node's socket directory by hostPath, which the `baseline` and
//! `restricted` Pod Security levels forbid: in a namespace enforcing either, the ReplicaSet
//! cannot create the pods, and the ModelWorker says `Ready=False`/`PodSecurityRejected` with the
//! admission message. A CSI ephemeral volume for the socket directory is the planned fix.
//!
//! # RBAC
//!
//! Exactly the verbs the operator uses (a ClusterRole; with `--watch-namespace`, a Role in that
//! namespace holding all of them is enough, which `e2e/tests/operator.rs` checks by running the
//! operator as a service account with only these rules):
//!
//! | API group | Resource | Verbs | Why |
//! |---|---|---|---|
//! | `remotemedia.io` | `modelworkers` | list, watch | the objects it reconciles (its cache) |
//! | `remotemedia.io` | `modelworkers/status` | patch | status by server-side apply on the status subresource |
//! | `apps` | `deployments` | list, watch, create, patch | children are watched, and applied (server-side apply is a patch; applying a new object also needs create) |
//! | `""` | `services` | list, watch, create, patch | the same for the Service |
//! | `policy` | `poddisruptionbudgets` | get, list, watch, create, patch, delete | the same, and read then deleted when replicas drop to 1 or 0 |
//! | `""` | `pods` | list, watch | pod status: readiness, scheduling failures, termination messages |
//! | `events.k8s.io` | `events` | create, patch | events on condition transitions (a repeat is patched into a series) |
//! | `coordination.k8s.io` | `leases` | get, create, update | leader election, in the lease namespace only |
//!
//! Where the `OwnerReferencesPermissionEnforcement` admission plugin is on (not a default of the
//! API server), setting `blockOwnerDeletion` on the children's owner references also needs
//! `update` on `modelworkers/finalizers`; the operator never sets a finalizer.

pub mod admin;
pub mod config;
pub mod controller;
pub mod desired;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod status;

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::Deployment, core::v1::Pod, core::v1::Service, policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client,
    runtime::{
        Controller,
        events::{Recorder, Reporter},
        watcher,
    },
};
use remotemedia_crds::ModelWorker;
use tokio::sync::watch;

pub use config::{Args, Config};

use crate::{
    controller::{Context, error_policy, owner_of_pod, reconcile, same_model_id},
    leader::{Elector, LeaderError},
    metrics::Metrics,
    names::{FIELD_MANAGER, MANAGED_SELECTOR},
};

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("failed to bind the admin port {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error(
        "failed to configure the Kubernetes client (in a cluster: the service account; outside: KUBECONFIG or ~/.kube/config)"
    )]
    Client(#[source] kube::Error),
    #[error("failed to listen for SIGTERM")]
    Signals(#[source] std::io::Error),
    #[error("failed to keep leadership; exiting so a standby takes over")]
    Leadership(#[source] LeaderError),
}

/// Runs until SIGTERM or SIGINT (then exits cleanly, handing the Lease back), or until the Lease
/// is lost (an error: the process must not run a controller it no longer leads).
pub async fn run(config: Config) -> Result<(), OperatorError> {
    let Config {
        admin_port,
        lease,
        worker,
        watch_namespace,
    } = config;
    // A missing or broken kubeconfig is configuration: refused before the port is bound.
    let client = Client::try_default().await.map_err(OperatorError::Client)?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let admin_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, admin_port));
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|source| OperatorError::Bind(admin_addr, source))?;
    let admin_addr = listener
        .local_addr()
        .map_err(|source| OperatorError::Bind(admin_addr, source))?;
    let router = admin::router(ready.clone(), metrics.clone());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(error = %error, "the admin port stopped serving");
        }
    });
    tracing::info!(admin = %admin_addr, "serving /healthz, /readyz and /metrics");

    let stop = stop_on_signals()?;
    wait_for_api(&client).await;
    ready.store(true, Ordering::Release);

    let identity = identity();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(identity.clone()),
        },
    );
    let controller = run_controller(
        client.clone(),
        recorder,
        metrics.clone(),
        worker,
        watch_namespace,
        stop.clone(),
    );
    let Some(lease) = lease else {
        metrics.set_leader(true);
        controller.await;
        return Ok(());
    };
    let mut elector = Elector::new(client, &lease.namespace, &lease.name, identity.clone());
    tracing::info!(lease = %format!("{}/{}", lease.namespace, lease.name), identity = %identity, "waiting to lead");
    tokio::select! {
        () = elector.acquire() => {}
        () = stopped(stop.clone()) => return Ok(()),
    }
    metrics.set_leader(true);
    tokio::select! {
        () = controller => {
            elector.release().await;
            Ok(())
        }
        lost = elector.hold() => {
            metrics.set_leader(false);
            Err(OperatorError::Leadership(lost))
        }
    }
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Pace of watch restarts: 100 ms doubling to 1 s, back to 100 ms once a watch delivers again.
/// kube-runtime merges all of a controller's watches into one stream and backs that off as a
/// whole, one pause per error from any watch. After an API server restart each of the six
/// watches fails to connect and then reports `410 Expired` once before relisting: with the
/// default backoff (up to 30 s, reset after 2 quiet minutes) the controller stayed deaf for over
/// a minute, and even with a 5 s cap the six 410s cost 30 s (both measured in the restart test).
struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (delay * 2).min(Self::MAX);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// The controller until `stop` turns true. Watches restart with [`WatchBackoff`].
async fn run_controller(
    client: Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    worker: config::WorkerDefaults,
    namespace: Option<String>,
    stop: watch::Receiver<bool>,
) {
    let namespace = namespace.as_deref();
    let workers = scoped::<ModelWorker>(&client, namespace);
    let children = || watcher::Config::default().labels(MANAGED_SELECTOR);
    let controller = Controller::new(workers.clone(), watcher::Config::default());
    let store = controller.store();
    let duplicates = store.clone();
    let context = Arc::new(Context {
        client: client.clone(),
        recorder,
        metrics,
        worker,
        store,
    });
    controller
        .owns(scoped::<Deployment>(&client, namespace), children())
        .owns(scoped::<Service>(&client, namespace), children())
        .owns(
            scoped::<PodDisruptionBudget>(&client, namespace),
            children(),
        )
        .watches(scoped::<Pod>(&client, namespace), children(), owner_of_pod)
        .watches(workers, watcher::Config::default(), move |changed| {
            same_model_id(&duplicates, &changed)
        })
        .trigger_backoff(WatchBackoff {
            next: WatchBackoff::FIRST,
        })
        .graceful_shutdown_on(stopped(stop))
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                // Logged and counted by `error_policy`.
                Ok(_) | Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                // Watches failing (the API server away, a permission missing): retried with
                // backoff, and worth seeing.
                Err(error) => tracing::warn!(error = %error_chain(&error), "controller"),
            }
        })
        .await;
}

/// Polls the API server until it answers: `/readyz` says ready only once it has.
async fn wait_for_api(client: &Client) {
    let mut delay = Duration::from_millis(250);
    loop {
        match client.apiserver_version().await {
            Ok(version) => {
                tracing::info!(version = %version.git_version, "connected to the Kubernetes API");
                return;
            }
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), retry_in = ?delay, "failed to reach the Kubernetes API");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// A channel that turns true on SIGTERM or SIGINT.
fn stop_on_signals() -> Result<watch::Receiver<bool>, OperatorError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(OperatorError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(OperatorError::Signals)?;
    let (sender, receiver) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping");
        let _ = sender.send(true);
    });
    Ok(receiver)
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    // A dropped sender counts as stop too.
    let _ = stop.wait_for(|stop| *stop).await;
}

/// This replica's name in the Lease and in events: the host (the pod's name in a cluster) and
/// the process id, so two operators on one machine differ.
fn identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|host| host.trim().to_owned())
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| "remotemedia-operator".to_owned());
    format!("{host}-{}", std::process::id())
}

/// An error with its sources, for one log line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
