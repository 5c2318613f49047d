//! `stash backup-job`: one job-model member (a PVC or a database) of one session, then its host entry.

use super::database::{Connection, Engine};
use super::executor::{AgentError, Executor};
use super::files::FileBackup;
use super::progress::Reporter;
use super::session_tags;
use super::status::{self, Turn};
use crate::api::backup_batch::BackupMember;
use crate::api::backup_session::DEFAULT_SESSION_TIMEOUT;
use crate::api::{BackupBatch, BackupSession};
use crate::executor_pod::{DEFAULT_DATA_PATH, is_database};
use crate::restic::BackupOutcome;
use crate::restic::output::BackupProgress;
use crate::restic::secrets::SecretValues;
use kube::ResourceExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub struct JobTarget {
    pub batch: String,
    pub session: String,
    pub kind: String,
    pub name: String,
    /// The database member's connection Secret, one file per key.
    pub database_secret_dir: PathBuf,
}

/// The member of `batch` that backs up `kind`/`name`, with its index.
pub fn find_member<'a>(
    batch: &'a BackupBatch,
    kind: &str,
    name: &str,
) -> Result<(usize, &'a BackupMember), AgentError> {
    batch
        .spec
        .members
        .iter()
        .enumerate()
        .find(|(_, m)| status::matches(&m.target.reference, kind, name))
        .ok_or_else(|| AgentError::NoSuchMember { batch: batch.name_any(), kind: kind.into(), name: name.into() })
}

/// The default session timeout, which also bounds how long a finalize or a restore waits for other
/// processes' locks: a backup holding one ends by its own session's deadline.
pub fn session_timeout() -> Duration {
    Duration::try_from(DEFAULT_SESSION_TIMEOUT).unwrap_or(Duration::from_secs(6 * 3600))
}

/// Time left until the session's deadline. The operator gives every session one; a session started
/// by an older operator without one gets the default session timeout, never less.
pub fn time_left(session: &BackupSession) -> Duration {
    let default = session_timeout();
    session
        .status
        .as_ref()
        .and_then(|s| s.session_deadline.as_ref())
        .map_or(Some(default), |d| d.0.duration_since(k8s_openapi::jiff::Timestamp::now()).try_into().ok())
        .unwrap_or(Duration::ZERO)
}

pub async fn run(executor: &Executor, job: &JobTarget) -> Result<(), AgentError> {
    let sessions = executor.api::<BackupSession>();
    // Two reads at once: each is a round trip before restic can start.
    let (batch, session) = tokio::try_join!(executor.batch(&job.batch), executor.session(&job.session))?;
    let (index, member) = find_member(&batch, &job.kind, &job.name)?;
    let host = member.target.host_alias();
    if status::turn(&session, &job.kind, &job.name, &host) != Turn::Now {
        tracing::info!(session = %job.session, host, "nothing to do: the target is not running or already reported");
        return Ok(());
    }
    let started = Instant::now();
    let limit = time_left(&session);
    let (reporter, progress) =
        Reporter::start(sessions.clone(), job.session.clone(), job.kind.clone(), job.name.clone(), host.clone());
    let backup = back_up(executor, &batch, &session, (index, member), &host, job, progress);
    let result = match tokio::time::timeout(limit, backup).await {
        Ok(result) => result,
        Err(_) => Err(AgentError::DeadlinePassed),
    };
    reporter.stop();
    let entry = match &result {
        Ok((path, outcome)) => status::succeeded(&host, path.clone(), outcome, started.elapsed()),
        Err(err) => status::failed(&host, err.to_string(), started.elapsed()),
    };
    status::report_host(&sessions, &job.session, &job.kind, &job.name, entry).await?;
    result.map(drop)
}

async fn back_up(
    executor: &Executor,
    batch: &BackupBatch,
    session: &BackupSession,
    (index, member): (usize, &BackupMember),
    host: &str,
    job: &JobTarget,
    progress: watch::Sender<BackupProgress>,
) -> Result<(String, BackupOutcome), AgentError> {
    let repository = executor.repository(&batch.spec.repository).await?;
    let mut restic = executor
        .member_restic(&repository, member)
        .await?
        .waiting_for_locks(time_left(session))
        .reporting_progress(progress);
    if is_database(&job.kind) {
        let engine = Engine::from_task(member.task.as_ref().map(|t| t.name.as_str())).map_err(AgentError::Invalid)?;
        let connection = Connection::from_secret(engine, SecretValues::read_dir(&job.database_secret_dir)?)?;
        executor.prepare_backup(&restic, &repository, session).await?;
        let tags = session_tags(session, &batch.name_any(), host);
        let outcome = connection.backup(&restic, host, &tags).await?;
        return Ok((format!("/{}", connection.dump_filename()), outcome));
    }
    let paths = if !member.target.paths.is_empty() {
        member.target.paths.clone()
    } else if !member.target.volume_mounts.is_empty() {
        member.target.volume_mounts.iter().map(|m| m.mount_path.clone()).collect()
    } else {
        vec![DEFAULT_DATA_PATH.to_string()]
    };
    let backup = FileBackup {
        batch: &batch.name_any(),
        session,
        repository: &repository,
        target: &member.target,
        member: index,
        alias: host,
        host,
        paths: paths.clone(),
    };
    let outcome = backup.run(executor, &mut restic).await?;
    Ok((paths.join(","), outcome))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BackupSessionSpec;
    use crate::api::backup_session::BackupInvokerRef;
    use crate::api::backup_session::BackupSessionStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    fn session(deadline: Option<Timestamp>) -> BackupSession {
        let invoker = BackupInvokerRef { api_group: String::new(), kind: "BackupBatch".into(), name: "app".into() };
        let mut session = BackupSession::new("app-1", BackupSessionSpec { invoker, retry_left: None });
        session.status = Some(BackupSessionStatus { session_deadline: deadline.map(Time), ..Default::default() });
        session
    }

    /// M12: no hidden one-hour limit, and a passed deadline leaves no time.
    #[test]
    fn time_left_follows_the_deadline() {
        let in_two_hours = Timestamp::now().checked_add(SignedDuration::from_hours(2)).expect("time");
        assert!(time_left(&session(Some(in_two_hours))) > Duration::from_secs(3600 + 3500));
        assert!(time_left(&session(None)) >= Duration::from_secs(6 * 3600 - 5));
        let passed = Timestamp::now().checked_sub(SignedDuration::from_secs(5)).expect("time");
        assert_eq!(time_left(&session(Some(passed))), Duration::ZERO);
    }
}
