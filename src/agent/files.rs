//! Backing up a tree of files (a workload's paths, a PVC) for one host of one session.

use super::executor::{AgentError, Executor};
use super::session_tags;
use crate::api::BackupSession;
use crate::api::backup_batch::BackupTarget;
use crate::api::repository::Repository;
use crate::restic::{BackupOutcome, BackupRequest, Restic};

/// One host's backup of `paths` of a member.
pub struct FileBackup<'a> {
    pub batch: &'a str,
    pub session: &'a BackupSession,
    pub repository: &'a Repository,
    pub target: &'a BackupTarget,
    /// The member's index in the batch, to name its fields.
    pub member: usize,
    pub alias: &'a str,
    pub host: &'a str,
    pub paths: Vec<String>,
}

impl FileBackup<'_> {
    /// Checks the member's restic flags and paths, then runs `restic backup` against a ready repository.
    /// Unreadable files fail the host: a partial snapshot is not a backup to count on.
    pub async fn run(&self, executor: &Executor, restic: &mut Restic) -> Result<BackupOutcome, AgentError> {
        // The controllers refuse such a batch, but it may have been edited since the session started.
        self.target.check_args(self.member)?;
        let root = &executor.settings.path_root;
        for path in &self.paths {
            if !root.join(path.trim_start_matches('/')).exists() {
                return Err(AgentError::PathMissing(path.clone()));
            }
        }
        let request = BackupRequest {
            root: root.clone(),
            paths: self.paths.clone(),
            exclude: self.target.exclude.clone(),
            host: self.host.to_string(),
            tags: session_tags(self.session, self.batch, self.alias),
            extra_args: self.target.args.clone(),
        };
        let outcome = executor
            .backing_up(restic, self.repository, self.session, async |restic| Ok(restic.backup(&request).await?))
            .await?;
        if outcome.unreadable_count > 0 {
            let items: Vec<String> = outcome.unreadable.iter().map(|e| e.describe()).collect();
            let snapshot = outcome.summary.snapshot_id.clone();
            restic.forget(&[snapshot]).await?;
            return Err(AgentError::Invalid(format!(
                "{} files could not be read, e.g. {}",
                outcome.unreadable_count,
                items.join("; ")
            )));
        }
        Ok(outcome)
    }
}
