//! The Stash-compatible API: CRD types and the generated CustomResourceDefinitions.

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

/// Every CRD this project serves, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        BackupBatch::crd(),
        BackupSession::crd(),
        Repository::crd(),
        RestoreBatch::crd(),
    ]
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
