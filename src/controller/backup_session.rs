//! The BackupSession lifecycle: Pending → Running (or Skipped) → Succeeded | Failed.
//!
//! Hosts (sidecars, Jobs) write their own entry under `status.targets[].stats`; the operator owns the
//! rest of the status. Every status write replaces the status at the resourceVersion it read, so a
//! concurrent host write makes this reconcile start over instead of clobbering it.

use super::backup_job::{backup_job, finalize_job, is_job_model};
use super::conditions::{self, Desired};
use super::context::{Context, ControllerError, FIELD_MANAGER};
use super::hooks;
use super::progress::{self, Progress};
use super::targets;
use crate::api::backup_session::{
    BackupSessionPhase, BackupSessionStatus, BackupTargetStatus, HostBackupStats, HostPhase, TargetPhase,
};
use crate::api::{BackupBatch, BackupSession, Repository};
use crate::metrics::{BatchLabels, SessionLabels};
use crate::session::{BACKUP_BATCH_KIND, INVOKER_NAME_LABEL, create_backup_session};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
const POLL: Duration = Duration::from_secs(30);

fn now() -> Timestamp {
    Timestamp::now()
}

#[tracing::instrument(skip_all, fields(namespace = session.namespace().unwrap_or_default(), name = session.name_any()))]
pub async fn reconcile(session: Arc<BackupSession>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    let namespace = session.namespace().unwrap_or_default();
    let sessions: Api<BackupSession> = Api::namespaced(ctx.client.clone(), &namespace);
    let batches: Api<BackupBatch> = Api::namespaced(ctx.client.clone(), &namespace);
    let invoker = &session.spec.invoker;
    let batch = if invoker.kind == BACKUP_BATCH_KIND { batches.get_opt(&invoker.name).await? } else { None };
    let mut status = session.status.clone().unwrap_or_default();

    let action = match (status.phase, batch) {
        (Some(BackupSessionPhase::Succeeded | BackupSessionPhase::Failed | BackupSessionPhase::Skipped), batch) => {
            return finished(&session, batch.as_ref(), &ctx, &sessions).await;
        }
        (_, None) => {
            let reason = format!("{} {} does not exist", invoker.kind, invoker.name);
            fail(&mut status, "InvokerNotFound", &reason);
            Action::await_change()
        }
        (None | Some(BackupSessionPhase::Pending | BackupSessionPhase::Unknown), Some(batch)) => {
            start(&session, &batch, &mut status, &ctx, &sessions).await?
        }
        (Some(BackupSessionPhase::Running), Some(batch)) => progress(&session, &batch, &mut status, &ctx).await?,
    };

    if Some(&status) != session.status.as_ref() {
        let phase_changed = session.status.as_ref().and_then(|s| s.phase) != status.phase;
        let mut updated = (*session).clone();
        updated.status = Some(status.clone());
        match sessions.replace_status(&session.name_any(), &PostParams::default(), &updated).await {
            Ok(_) => {}
            // A host wrote its entry meanwhile: start over from what is there now.
            Err(kube::Error::Api(e)) if e.code == 409 => return Ok(Action::requeue(Duration::from_millis(100))),
            Err(err) => return Err(err.into()),
        }
        if phase_changed {
            announce(&ctx, &session, &status).await;
        }
    }
    Ok(action)
}

/// Pending → Skipped when another session of the batch runs; else run the pre-backup hook, list the
/// targets with their host counts, set the deadline, and go Running.
async fn start(
    session: &BackupSession,
    batch: &BackupBatch,
    status: &mut BackupSessionStatus,
    ctx: &Context,
    sessions: &Api<BackupSession>,
) -> Result<Action, ControllerError> {
    let siblings =
        sessions.list(&ListParams::default().labels(&format!("{INVOKER_NAME_LABEL}={}", batch.name_any()))).await?;
    let running = siblings.items.iter().find(|other| {
        other.metadata.uid != session.metadata.uid
            && other.status.as_ref().and_then(|s| s.phase) == Some(BackupSessionPhase::Running)
    });
    if let Some(other) = running {
        status.phase = Some(BackupSessionPhase::Skipped);
        let message =
            format!("session {} of this batch is still running; this one is skipped, not queued", other.name_any());
        conditions::set(
            &mut status.conditions,
            &Desired::new("Skipped", true, "PreviousSessionRunning", message),
            None,
        );
        return Ok(Action::await_change());
    }

    if let Some(pre) = batch.spec.hooks.as_ref().and_then(|h| h.pre_backup.as_ref()) {
        match hooks::run(pre).await {
            Ok(()) => {
                conditions::set(
                    &mut status.conditions,
                    &Desired::new("PreBackupHookExecutionSucceeded", true, "HookSucceeded", "pre-backup hook ran"),
                    None,
                );
            }
            Err(err) => {
                conditions::set(
                    &mut status.conditions,
                    &Desired::new("PreBackupHookExecutionSucceeded", false, "HookFailed", err.clone()),
                    None,
                );
                fail(status, "PreBackupHookFailed", &err);
                return Ok(Action::await_change());
            }
        }
    }

    let namespace = session.namespace().unwrap_or_default();
    let mut targets = Vec::with_capacity(batch.spec.members.len());
    for member in &batch.spec.members {
        let state = targets::inspect(&ctx.client, &namespace, &member.target.reference).await?;
        targets.push(BackupTargetStatus {
            reference: member.target.reference.clone(),
            total_hosts: Some(state.hosts()),
            phase: Some(TargetPhase::Pending),
            stats: Vec::new(),
            pre_backup_actions: Vec::new(),
            post_backup_actions: Vec::new(),
        });
    }
    status.targets = targets;
    progress::advance(&mut status.targets, batch.spec.execution_order);
    let timeout = batch.spec.time_out.as_ref().and_then(|t| t.parse().ok());
    status.session_deadline =
        timeout.and_then(|t| SignedDuration::try_from(t).ok()).and_then(|t| now().checked_add(t).ok()).map(Time);
    status.phase = Some(BackupSessionPhase::Running);
    Ok(Action::requeue(Duration::from_millis(10)))
}

/// Running: enforce the deadline, create job-model Jobs for started members, notice crashed Jobs,
/// finish targets whose hosts all reported, start the next ones, and finish the session.
async fn progress(
    session: &BackupSession,
    batch: &BackupBatch,
    status: &mut BackupSessionStatus,
    ctx: &Context,
) -> Result<Action, ControllerError> {
    let deadline = status.session_deadline.as_ref().map(|t| t.0);
    if let Some(deadline) = deadline
        && now() >= deadline
    {
        let message = format!("the session did not finish before its deadline {deadline} (spec.timeOut)");
        conditions::set(
            &mut status.conditions,
            &Desired::new(DEADLINE_EXCEEDED, true, "TimeOut", message.clone()),
            None,
        );
        for target in
            status.targets.iter_mut().filter(|t| !matches!(t.phase, Some(TargetPhase::Succeeded | TargetPhase::Failed)))
        {
            target.phase = Some(TargetPhase::Failed);
        }
        finish(session, batch, status, ctx, false, Some(("DeadlineExceeded", message))).await;
        return Ok(Action::await_change());
    }

    run_job_members(session, batch, status, ctx).await?;
    match progress::advance(&mut status.targets, batch.spec.execution_order) {
        Progress::Finished { succeeded } => {
            finish(session, batch, status, ctx, succeeded, None).await;
            Ok(Action::await_change())
        }
        Progress::Running => {
            // Host writes and owned Jobs wake us; the deadline and the poll are the backstops.
            let until_deadline = deadline.and_then(|d| Duration::try_from(d.duration_since(now())).ok());
            Ok(Action::requeue(until_deadline.map_or(POLL, |d| d.min(POLL))))
        }
    }
}

/// For each started job-model member (PVC, database): make sure its Job exists; a failed Job with no
/// host entry becomes a Failed entry, so a crashed Job cannot leave the session Running.
async fn run_job_members(
    session: &BackupSession,
    batch: &BackupBatch,
    status: &mut BackupSessionStatus,
    ctx: &Context,
) -> Result<(), ControllerError> {
    let namespace = session.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut repository = None;
    let deadline_seconds = status.session_deadline.as_ref().map(|d| d.0.duration_since(now()).as_secs().max(1));
    for (index, member) in batch.spec.members.iter().enumerate() {
        let Some(target) = status.targets.get_mut(index) else { continue };
        if !is_job_model(member) || target.phase != Some(TargetPhase::Running) {
            continue;
        }
        if repository.is_none() {
            repository = Some(batch_repository(batch, ctx, &namespace).await?);
        }
        let Some(Ok(repository)) = &repository else {
            let refusal = repository.as_ref().and_then(|r| r.as_ref().err());
            target.stats.push(HostBackupStats {
                hostname: member.target.alias.clone(),
                phase: Some(HostPhase::Failed),
                snapshots: Vec::new(),
                duration: None,
                error: refusal.map(ToString::to_string),
            });
            continue;
        };
        let job = backup_job(batch, session, index, member, repository, &ctx.trigger_image, deadline_seconds);
        let name = job.name_any();
        let existing = match jobs.get_opt(&name).await? {
            Some(existing) => existing,
            None => jobs.create(&PostParams::default(), &job).await?,
        };
        if job_failed(&existing) && target.stats.is_empty() {
            target.stats.push(HostBackupStats {
                hostname: member.target.alias.clone(),
                phase: Some(HostPhase::Failed),
                snapshots: Vec::new(),
                duration: None,
                error: Some(format!("backup Job {name} failed before reporting")),
            });
        }
    }
    Ok(())
}

pub fn job_failed(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| conditions.iter().any(|c| c.type_ == "Failed" && c.status == "True"))
}

/// The batch's Repository when the session's namespace may use it (see `tenancy`).
async fn batch_repository(
    batch: &BackupBatch,
    ctx: &Context,
    namespace: &str,
) -> Result<Result<Repository, crate::tenancy::Refusal>, ControllerError> {
    Ok(crate::tenancy::fetch_repository(&ctx.client, namespace, &batch.spec.repository).await?)
}

/// A Succeeded or Failed session gets one finalize Job: retention, the manifest (when complete) and
/// the Repository's status, done in the repository by `stash finalize-session`.
async fn ensure_finalized(session: &BackupSession, batch: &BackupBatch, ctx: &Context) -> Result<(), ControllerError> {
    let phase = session.status.as_ref().and_then(|s| s.phase);
    if !matches!(phase, Some(BackupSessionPhase::Succeeded | BackupSessionPhase::Failed)) {
        return Ok(());
    }
    let namespace = session.namespace().unwrap_or_default();
    let Ok(repository) = batch_repository(batch, ctx, &namespace).await? else { return Ok(()) };
    let job = finalize_job(batch, session, &repository, &ctx.trigger_image);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    if jobs.get_opt(&job.name_any()).await?.is_none() {
        match jobs.create(&PostParams::default(), &job).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

fn fail(status: &mut BackupSessionStatus, reason: &str, message: &str) {
    status.phase = Some(BackupSessionPhase::Failed);
    conditions::set(&mut status.conditions, &Desired::new("SessionFailed", true, reason, message), None);
}

/// Final phase, post-backup hook, duration, metrics, and the retry schedule.
async fn finish(
    session: &BackupSession,
    batch: &BackupBatch,
    status: &mut BackupSessionStatus,
    ctx: &Context,
    succeeded: bool,
    failure: Option<(&str, String)>,
) {
    let retries_left = retries_left(session, batch) > 0;
    if let Some(post) = batch.spec.hooks.as_ref().and_then(|h| h.post_backup.as_ref())
        && hooks::post_hook_applies(post.execution_policy, succeeded, retries_left)
    {
        let outcome = hooks::run(&post.handler).await;
        let desired = match &outcome {
            Ok(()) => Desired::new("PostBackupHookExecutionSucceeded", true, "HookSucceeded", "post-backup hook ran"),
            Err(err) => Desired::new("PostBackupHookExecutionSucceeded", false, "HookFailed", err.clone()),
        };
        conditions::set(&mut status.conditions, &desired, None);
    }
    if succeeded {
        status.phase = Some(BackupSessionPhase::Succeeded);
    } else {
        let (reason, message) = failure.unwrap_or_else(|| ("TargetFailed", failed_targets(status)));
        fail(status, reason, &message);
        if retries_left {
            let delay = batch.spec.retry_config.as_ref().and_then(|r| r.delay.as_ref()).and_then(|d| d.parse().ok());
            let delay = delay.and_then(|d| SignedDuration::try_from(d).ok()).unwrap_or(SignedDuration::ZERO);
            status.next_retry = now().checked_add(delay).ok().map(Time);
        }
    }
    let started = session.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or_else(now);
    let elapsed = now().duration_since(started);
    status.session_duration = Some(format!("{}s", elapsed.as_secs().max(0)));

    let phase = format!("{:?}", status.phase.unwrap_or(BackupSessionPhase::Unknown));
    ctx.metrics.controller.sessions_finished.get_or_create(&SessionLabels { phase }).inc();
    if succeeded {
        let labels = BatchLabels { namespace: session.namespace().unwrap_or_default(), batch: batch.name_any() };
        ctx.metrics.controller.last_success.get_or_create(&labels).set(now().as_second());
    }
}

fn failed_targets(status: &BackupSessionStatus) -> String {
    let failed: Vec<String> = status
        .targets
        .iter()
        .filter(|t| t.phase == Some(TargetPhase::Failed))
        .map(|t| {
            let errors: Vec<&str> = t.stats.iter().filter_map(|s| s.error.as_deref()).collect();
            format!(
                "{} {}: {}",
                t.reference.kind,
                t.reference.name,
                if errors.is_empty() { "failed".into() } else { errors.join("; ") }
            )
        })
        .collect();
    format!("failed targets: {}", failed.join(", "))
}

fn retries_left(session: &BackupSession, batch: &BackupBatch) -> i32 {
    let max = batch.spec.retry_config.as_ref().map_or(0, |r| r.max_retry);
    session.spec.retry_left.unwrap_or(max)
}

/// A finished session: create its retry when due, and trim the batch's history.
async fn finished(
    session: &BackupSession,
    batch: Option<&BackupBatch>,
    ctx: &Context,
    sessions: &Api<BackupSession>,
) -> Result<Action, ControllerError> {
    let Some(batch) = batch else { return Ok(Action::await_change()) };
    ensure_finalized(session, batch, ctx).await?;
    let status = session.status.clone().unwrap_or_default();
    let mut action = Action::await_change();
    if status.phase == Some(BackupSessionPhase::Failed)
        && status.retried != Some(true)
        && let Some(next) = status.next_retry.as_ref().map(|t| t.0)
    {
        if now() < next {
            action = Action::requeue(Duration::try_from(next.duration_since(now())).unwrap_or(POLL));
        } else {
            let namespace = session.namespace().unwrap_or_default();
            let retry = create_backup_session(
                ctx.client.clone(),
                &namespace,
                &batch.name_any(),
                Some(retries_left(session, batch) - 1),
            )
            .await
            .map_err(|err| match err {
                crate::session::SessionError::Kube(e) => ControllerError::Kube(e),
                other => ControllerError::Kube(kube::Error::Service(other.to_string().into())),
            })?;
            let patch = serde_json::json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupSession", "status": {"retried": true}});
            sessions
                .patch_status(&session.name_any(), &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch))
                .await?;
            publish(
                ctx,
                session,
                EventType::Normal,
                "RetryCreated",
                &format!("retrying as session {}", retry.name_any()),
            )
            .await;
        }
    }
    trim_history(batch, sessions).await?;
    Ok(action)
}

/// Keeps the newest `backupHistoryLimit` finished sessions of the batch, and as many Skipped ones
/// (which hold no data and must not push real history out); Jobs go with their sessions.
async fn trim_history(batch: &BackupBatch, sessions: &Api<BackupSession>) -> Result<(), ControllerError> {
    let limit = usize::try_from(batch.spec.backup_history_limit.max(0)).unwrap_or(0);
    let list =
        sessions.list(&ListParams::default().labels(&format!("{INVOKER_NAME_LABEL}={}", batch.name_any()))).await?;
    let phase = |s: &BackupSession| s.status.as_ref().and_then(|st| st.phase);
    let awaiting_retry =
        |s: &BackupSession| s.status.as_ref().is_some_and(|st| st.next_retry.is_some() && st.retried != Some(true));
    let mut finished: Vec<&BackupSession> = Vec::new();
    let mut skipped: Vec<&BackupSession> = Vec::new();
    for session in list.items.iter().filter(|s| s.metadata.deletion_timestamp.is_none() && !awaiting_retry(s)) {
        match phase(session) {
            Some(BackupSessionPhase::Succeeded | BackupSessionPhase::Failed) => finished.push(session),
            Some(BackupSessionPhase::Skipped) => skipped.push(session),
            _ => {}
        }
    }
    for mut group in [finished, skipped] {
        group.sort_by(|a, b| {
            b.metadata
                .creation_timestamp
                .cmp(&a.metadata.creation_timestamp)
                .then_with(|| b.name_any().cmp(&a.name_any()))
        });
        for old in group.into_iter().skip(limit) {
            match sessions.delete(&old.name_any(), &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(err) => return Err(err.into()),
            }
        }
    }
    Ok(())
}

async fn announce(ctx: &Context, session: &BackupSession, status: &BackupSessionStatus) {
    let (type_, reason, note) = match status.phase {
        Some(BackupSessionPhase::Running) => {
            (EventType::Normal, "SessionRunning", "backup session started".to_string())
        }
        Some(BackupSessionPhase::Succeeded) => {
            (EventType::Normal, "SessionSucceeded", "every member backed up".to_string())
        }
        Some(BackupSessionPhase::Skipped) => {
            (EventType::Normal, "SessionSkipped", "another session of the batch is running".to_string())
        }
        Some(BackupSessionPhase::Failed) => {
            let message = status.conditions.iter().rev().find_map(|c| c.message.clone()).unwrap_or_default();
            (EventType::Warning, "SessionFailed", message)
        }
        _ => return,
    };
    publish(ctx, session, type_, reason, &note).await;
}

async fn publish(ctx: &Context, session: &BackupSession, type_: EventType, reason: &str, note: &str) {
    let event =
        Event { type_, reason: reason.into(), note: Some(note.into()), action: "Backup".into(), secondary: None };
    if let Err(err) = ctx.recorder.publish(&event, &session.object_ref(&())).await {
        tracing::debug!(error = %err, "publishing an Event failed");
    }
}
