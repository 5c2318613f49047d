//! The Stash-compatible API: CRD types and the generated CustomResourceDefinitions.

pub mod backup_args;
pub mod backup_batch;
pub mod backup_session;
pub mod common;
pub mod duration;
pub mod repository;
pub mod restore_batch;

pub use backup_batch::{BackupBatch, BackupBatchSpec, BackupBatchStatus};
pub use backup_session::{BackupSession, BackupSessionSpec, BackupSessionStatus};
pub use repository::{Repository, RepositorySpec, RepositoryStatus};
pub use restore_batch::{RestoreBatch, RestoreBatchSpec, RestoreBatchStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The label every object this project installs carries (`kubectl get crd -l app.kubernetes.io/part-of=stash`).
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "stash");

/// Every CRD this project serves, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![BackupBatch::crd(), BackupSession::crd(), Repository::crd(), RestoreBatch::crd()];
    for crd in &mut crds {
        let labels = crd.metadata.labels.get_or_insert_with(Default::default);
        labels.insert(PART_OF.0.to_string(), PART_OF.1.to_string());
    }
    crds
}

/// The CRDs as one multi-document YAML stream: the content of `deploy/crds/stash.yaml`.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
