//! `stash run-backup`: the sidecar. It watches its batch's sessions (idle between them: one watch
//! and no other request), and when its target is running takes the target's Lease — so one Pod of a
//! Deployment backs up, and the Pods of a StatefulSet or DaemonSet take turns, each as its own host —
//! then backs up and writes its host entry. The batch is read at run time: editing it restarts nothing.

use super::executor::{AgentError, Executor};
use super::files::FileBackup;
use super::job::{find_member, time_left};
use super::progress::Reporter;
use super::status::{self, Turn};
use crate::api::{BackupBatch, BackupSession};
use crate::session::invoker_selector;
use futures::StreamExt;
use kube::ResourceExt;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub struct SidecarTarget {
    pub batch: String,
    pub kind: String,
    pub name: String,
}

/// The restic `--host` of this Pod: `<alias>-<ordinal>` in a StatefulSet, the node in a DaemonSet,
/// else the alias.
pub fn host_name(kind: &str, alias: &str, pod: Option<&str>, node: Option<&str>) -> Result<String, AgentError> {
    match kind {
        "StatefulSet" => {
            let ordinal = pod.and_then(|p| p.rsplit_once('-')).map(|(_, o)| o).filter(|o| o.parse::<u32>().is_ok());
            let ordinal = ordinal.ok_or_else(|| AgentError::Invalid("POD_NAME has no StatefulSet ordinal".into()))?;
            Ok(format!("{alias}-{ordinal}"))
        }
        "DaemonSet" => node.map(str::to_string).ok_or_else(|| AgentError::Invalid("NODE_NAME is not set".into())),
        _ => Ok(alias.to_string()),
    }
}

pub async fn run(executor: &Executor, target: &SidecarTarget, cancel: CancellationToken) -> Result<(), AgentError> {
    let sessions = executor.api::<BackupSession>();
    let config = watcher::Config::default().labels(&invoker_selector(&target.batch));
    // The watch keeps a store of the sessions, so that looking at them again costs no request.
    let (store, writer) = reflector::store();
    let mut events = watcher(sessions, config).default_backoff().reflect(writer).applied_objects().boxed();
    let mut recheck = tokio::time::interval(Duration::from_secs(30));
    let mut batches = BatchPerSession::default();
    loop {
        let candidates = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            event = events.next() => match event {
                Some(Ok(session)) => vec![Arc::new(session)],
                // Visible: a 403 here means the Pod's ServiceAccount lacks the sidecar's role. (No
                // Event: without that role it could not publish one either.) The watch retries.
                Some(Err(err)) => { tracing::warn!(error = %err, "watching BackupSessions"); Vec::new() }
                None => return Ok(()),
            },
            // Again, for a turn that failed.
            _ = recheck.tick() => {
                let sessions = store.state();
                batches.keep(&sessions);
                sessions
            }
        };
        for session in &candidates {
            // A settled session has no turn left: it is not worth a read of the batch.
            if session.is_settled() {
                batches.forget(session);
                continue;
            }
            let turn = async {
                let batch = batches.of(executor, &target.batch, session).await?;
                take_turn(executor, target, session, &batch).await
            };
            if let Err(err) = turn.await {
                tracing::warn!(session = %session.name_any(), error = %err, "backing up failed");
            }
        }
    }
}

/// The batch as it was read for each unsettled session, by the session's uid: read once per
/// session rather than at each update of its status (every host's progress, every few seconds).
/// A session runs by the batch as it started anyway: flags added later are refused.
#[derive(Default)]
struct BatchPerSession(HashMap<String, Arc<BackupBatch>>);

impl BatchPerSession {
    async fn of(
        &mut self,
        executor: &Executor,
        name: &str,
        session: &BackupSession,
    ) -> Result<Arc<BackupBatch>, AgentError> {
        let uid = session.uid().unwrap_or_default();
        if let Some(batch) = self.0.get(&uid) {
            return Ok(Arc::clone(batch));
        }
        let batch = Arc::new(executor.batch(name).await?);
        self.0.insert(uid, Arc::clone(&batch));
        Ok(batch)
    }

    fn forget(&mut self, session: &BackupSession) {
        self.0.remove(&session.uid().unwrap_or_default());
    }

    /// Keeps the batches of the unsettled sessions among `sessions` (all there are) alone.
    fn keep(&mut self, sessions: &[Arc<BackupSession>]) {
        self.0.retain(|uid, _| sessions.iter().any(|s| !s.is_settled() && s.uid().as_deref() == Some(uid.as_str())));
    }
}

/// Backs up for `session` if it is this host's turn.
async fn take_turn(
    executor: &Executor,
    target: &SidecarTarget,
    session: &BackupSession,
    batch: &BackupBatch,
) -> Result<(), AgentError> {
    let (index, member) = find_member(batch, &target.kind, &target.name)?;
    let alias = member.target.host_alias();
    let settings = &executor.settings;
    let host = host_name(&target.kind, &alias, settings.pod_name.as_deref(), settings.node_name.as_deref())?;
    if status::turn(session, &target.kind, &target.name, &host) != Turn::Now {
        return Ok(());
    }
    let lease = executor
        .lease(
            executor.namespace().to_string(),
            format!("stash-{}-{}-{}", target.batch, target.kind.to_ascii_lowercase(), target.name),
        )
        .owned_by(super::plain_owner(batch));
    let session_name = session.name_any();
    lease
        .hold_while(async {
            // Another Pod may have finished this host while we waited for the Lease.
            let session = executor.session(&session_name).await?;
            if status::turn(&session, &target.kind, &target.name, &host) != Turn::Now {
                return Ok(());
            }
            let started = Instant::now();
            let repository = executor.repository(&batch.spec.repository).await?;
            let backup = FileBackup {
                batch: &target.batch,
                session: &session,
                repository: &repository,
                target: &member.target,
                member: index,
                alias: &alias,
                host: &host,
                paths: member.target.paths.clone(),
            };
            let limit = time_left(&session);
            let (reporter, progress) = Reporter::start(
                executor.api(),
                session_name.clone(),
                target.kind.clone(),
                target.name.clone(),
                host.clone(),
            );
            let result = async {
                if backup.paths.is_empty() {
                    return Err(AgentError::Invalid(format!("member {alias} names no paths to back up")));
                }
                let mut restic = executor
                    .member_restic(&repository, member)
                    .await?
                    .waiting_for_locks(limit)
                    .reporting_progress(progress);
                run_hook(member.hooks.as_deref().and_then(|h| h.pre_backup.as_ref()), "pre-backup").await?;
                let outcome = backup.run(executor, &mut restic).await;
                if let Some(post) = member.hooks.as_deref().and_then(|h| h.post_backup.as_ref()) {
                    let succeeded = outcome.is_ok();
                    if crate::hooks::post_hook_applies(post.execution_policy, succeeded, false) {
                        run_hook(Some(&post.handler), "post-backup").await?;
                    }
                }
                outcome
            };
            let result = tokio::time::timeout(limit, result).await.unwrap_or(Err(AgentError::DeadlinePassed));
            reporter.stop();
            let path = backup.paths.join(",");
            let entry = match &result {
                Ok(outcome) => status::succeeded(&host, path, outcome, started.elapsed()),
                Err(err) => status::failed(&host, err.to_string(), started.elapsed()),
            };
            status::report_host(&executor.api(), &session_name, &target.kind, &target.name, entry).await?;
            result.map(drop)
        })
        .await?
}

async fn run_hook(handler: Option<&crate::api::common::Handler>, which: &str) -> Result<(), AgentError> {
    match handler {
        Some(handler) => {
            crate::hooks::send(handler).await.map_err(|err| AgentError::Invalid(format!("{which} hook failed: {err}")))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::host_name;

    #[test]
    fn hosts_follow_the_workload_kind() {
        assert_eq!(host_name("Deployment", "app", Some("app-7d9f8c-x2k4q"), None).unwrap(), "app");
        assert_eq!(host_name("StatefulSet", "db", Some("db-2"), None).unwrap(), "db-2");
        assert!(host_name("StatefulSet", "db", Some("db"), None).is_err());
        assert_eq!(host_name("DaemonSet", "logs", Some("logs-abcde"), Some("node-1")).unwrap(), "node-1");
    }
}
