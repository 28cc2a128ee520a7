//! What the repository's example ModelWorkers (`examples/`) expect to find in their namespace.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use serde_json::json;

use crate::{Error, TEST_LABEL, api};

/// The volume [`models_claim`] binds in `namespace`: cluster-scoped, so named after it.
fn volume_name(namespace: &str) -> String {
    format!("{namespace}-models")
}

/// A PersistentVolumeClaim `models` in `namespace`, bound to a volume of its own, as the
/// examples' `pvc://models/...` URIs expect (nothing mounts it: kwok runs no containers).
pub async fn models_claim(client: &Client, namespace: &str) -> Result<(), Error> {
    let volume_name = volume_name(namespace);
    let volume: PersistentVolume = serde_json::from_value(json!({
        "metadata": { "name": volume_name, "labels": { TEST_LABEL: "true" } },
        "spec": {
            "capacity": { "storage": "1Gi" }, "accessModes": ["ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "",
            "hostPath": { "path": "/srv/models" },
            "claimRef": { "namespace": namespace, "name": "models" },
        },
    }))
    .expect("a volume built from literals is valid");
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &volume)
        .await
        .map_err(api("create the models volume"))?;
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": { "name": "models" },
        "spec": {
            "accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": volume_name,
            "resources": { "requests": { "storage": "1Gi" } },
        },
    }))
    .expect("a claim built from literals is valid");
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &claim)
        .await
        .map_err(api("create the models claim"))?;
    Ok(())
}

/// Deletes the volume [`models_claim`] made for `namespace`, if it is there: deleting the
/// namespace leaves it.
pub async fn delete_models_volume(client: &Client, namespace: &str) -> Result<(), Error> {
    Api::<PersistentVolume>::all(client.clone())
        .delete(&volume_name(namespace), &DeleteParams::default())
        .await
        .map(|_| ())
        .or_else(|error| match error {
            kube::Error::Api(status) if status.code == 404 => Ok(()),
            error => Err(error),
        })
        .map_err(api("delete the models volume"))
}
