//! The executors that move data: the `stash` sidecar (`run-backup`), job-model backups
//! (`backup-job`), the per-session finishing step (`finalize-session`) and restores (`restore`).
//! Each runs in a Pod or, for tests and operators at a shell, as a local process.

pub mod database;
pub mod executor;
pub mod files;
pub mod finalize;
pub mod job;
pub mod locks;
pub mod manifest;
pub mod restore;
pub mod sidecar;
pub mod status;

pub use executor::{AgentError, Executor, ExecutorSettings};

/// restic tags that make a run's snapshots one set: `session=`, `batch=`, `member=`.
pub fn session_tags(session: &str, batch: &str, member: &str) -> Vec<String> {
    vec![format!("session={session}"), format!("batch={batch}"), format!("member={member}")]
}

/// The restic `--host` of a member: its alias, else the target's name.
pub fn member_alias(target: &crate::api::backup_batch::BackupTarget) -> String {
    if target.alias.is_empty() { target.reference.name.clone() } else { target.alias.clone() }
}
