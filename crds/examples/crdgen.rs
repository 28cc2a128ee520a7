//! Prints the ModelWorker CustomResourceDefinition as YAML. `make crds` writes it to
//! `crds/modelworker.yaml`; `make test` regenerates it and fails if the committed file differs.

use kube::CustomResourceExt;
use remotemedia_crds::ModelWorker;

fn main() -> Result<(), serde_saphyr::ser_error::Error> {
    let yaml = serde_saphyr::to_string(&ModelWorker::crd())?;
    print!("# Generated from crds/src by `make crds`: edit the Rust types, not this file.\n{yaml}");
    Ok(())
}
