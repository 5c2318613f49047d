//! The executors that move data: the `stash` sidecar (`run-backup`), job-model backups
//! (`backup-job`), the per-session finishing step (`finalize-session`), a session's http and tcp
//! hooks (`run-hook`) and restores (`restore`).
//! Each runs in a Pod or, for tests and operators at a shell, as a local process.

pub mod database;
pub mod executor;
pub mod files;
pub mod finalize;
pub mod hook;
pub(crate) mod integrity;
pub mod job;
pub mod locks;
pub mod manifest;
mod progress;
pub mod repository_task;
pub mod restore;
pub(crate) mod retention;
pub mod sidecar;
pub mod status;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

pub use executor::{AgentError, Executor, ExecutorSettings};

/// restic tags that make a run's snapshots one set: `session=`, `batch=`, `member=`, and the
/// session's `namespace=` (same-named batches of two namespaces may share a repository).
pub fn session_tags(session: &crate::api::BackupSession, batch: &str, member: &str) -> Vec<String> {
    use kube::ResourceExt;
    vec![
        format!("session={}", session.name_any()),
        format!("batch={batch}"),
        format!("member={member}"),
        format!("{}={}", retention::NAMESPACE_TAG, session.namespace().unwrap_or_default()),
    ]
}

/// An owner reference for what an executor creates about `owner` (records, Leases), so that it goes
/// with it. Not a controller reference and not blocking deletion: the executor's identity may not
/// set finalizers on its owner.
pub(crate) fn plain_owner<K: kube::Resource<DynamicType = ()>>(owner: &K) -> Option<OwnerReference> {
    owner.meta().uid.clone().map(|uid| OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.meta().name.clone().unwrap_or_default(),
        uid,
        ..Default::default()
    })
}
