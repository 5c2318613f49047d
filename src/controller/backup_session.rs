//! The BackupSession lifecycle: Pending → Running (or Skipped) → Succeeded | Failed.
//!
//! Hosts (sidecars, Jobs) write their own entry under `status.targets[].stats`; the operator owns the
//! rest of the status. Every status write replaces the status at the resourceVersion it read, so a
//! concurrent host write makes this reconcile start over instead of clobbering it.

use super::app_binding;
use super::backup_job::{backup_job, finalize_job, hook_job, hook_job_name, is_job_model};
use super::context::{Context, ControllerError, FIELD_MANAGER};
use super::finalize_retry;
use super::grants;
use super::observed;
use super::progress::{self, Progress, STALLED};
use super::targets::{self, TargetState};
use crate::api::backup_batch::{BackupBatchStatus, SessionRecord};
use crate::api::backup_session::{
    BackupSessionPhase, BackupSessionStatus, BackupTargetStatus, DEFAULT_SESSION_TIMEOUT, HostBackupStats, HostPhase,
    TargetPhase,
};
use crate::api::common::{Handler, TargetRef};
use crate::api::{BackupBatch, BackupSession, Repository};
use crate::conditions::{self, Desired};
use crate::hooks::{self, Hook};
use crate::session::{BACKUP_BATCH_KIND, create_backup_session, invoker_labels, invoker_selector};
use crate::status_write::update_status;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
/// The field manager of the session records in a batch's status (see `record_on_batch`).
const SESSION_RECORDS_MANAGER: &str = "stash-operator-sessions";
const POLL: Duration = Duration::from_secs(30);

fn now() -> Timestamp {
    Timestamp::now()
}

/// What this reconcile does about a hook once its status write landed, never before (see
/// `crate::hooks`): run a claimed exec hook, or create the Job that sends an http or tcp hook.
enum Claimed {
    Exec(Hook),
    HookJob(Hook),
}

#[tracing::instrument(skip_all, fields(namespace = session.namespace().unwrap_or_default(), name = session.name_any()))]
pub async fn reconcile(session: Arc<BackupSession>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    ctx.caches.ready().await?;
    let namespace = session.namespace().unwrap_or_default();
    let sessions: Api<BackupSession> = Api::namespaced(ctx.client.clone(), &namespace);
    let batches: Api<BackupBatch> = Api::namespaced(ctx.client.clone(), &namespace);
    let invoker = &session.spec.invoker;
    if invoker.kind != BACKUP_BATCH_KIND {
        // Another installation's (Stash's BackupConfiguration): not ours to run or to judge.
        tracing::debug!(kind = %invoker.kind, "a session of another invoker kind: left alone");
        return Ok(Action::await_change());
    }
    // From the batches' cache; a session created with its batch may come before the batch reached
    // it, so a miss is read rather than taken for "does not exist".
    let batch = match ctx.batches.get(&ObjectRef::new(&invoker.name).within(&namespace)) {
        Some(batch) => Some(batch),
        None => batches.get_opt(&invoker.name).await?.map(Arc::new),
    };
    let mut status = session.status.clone().unwrap_or_default();
    let mut claimed = None;

    let action = match (status.phase, batch.as_deref()) {
        (Some(BackupSessionPhase::Succeeded | BackupSessionPhase::Failed | BackupSessionPhase::Skipped), batch) => {
            return finished(&session, batch, &ctx, &sessions).await;
        }
        (_, None) => {
            let reason = format!("{} {} does not exist", invoker.kind, invoker.name);
            fail(&mut status, "InvokerNotFound", &reason);
            Action::await_change()
        }
        (None | Some(BackupSessionPhase::Pending | BackupSessionPhase::Unknown), Some(batch)) => {
            start(&session, batch, &mut status, &ctx, &sessions, &mut claimed).await?
        }
        (Some(BackupSessionPhase::Running), Some(batch)) => {
            progress(&session, batch, &mut status, &ctx, &mut claimed).await?
        }
    };

    if Some(&status) != session.status.as_ref() {
        let phase_changed = session.status.as_ref().and_then(|s| s.phase) != status.phase;
        let mut updated = (*session).clone();
        updated.status = Some(status.clone());
        match sessions.replace_status(&session.name_any(), &PostParams::default(), &updated).await {
            Ok(_) => {}
            // A host (or another controller) wrote meanwhile: start over from what is there now. A
            // claim that did not land is not ours: its hook does not run.
            Err(kube::Error::Api(e)) if e.code == 409 => return Ok(Action::requeue(Duration::from_millis(100))),
            Err(err) => return Err(err.into()),
        }
        if phase_changed {
            if batch.is_some() {
                count_finished(&ctx, &namespace, &invoker.name, &status);
            }
            announce(&ctx, &session, &status).await;
        }
        if let (Some(now_stalled), None) =
            (progress::stalled_condition(Some(&status)), progress::stalled_condition(session.status.as_ref()))
        {
            let note = now_stalled.message.clone().unwrap_or_default();
            publish(&ctx, &session, EventType::Warning, "BackupStalled", &note).await;
        }
    }
    match (claimed, batch.as_deref()) {
        (Some(Claimed::Exec(hook)), Some(batch)) => {
            let exec_pods = exec_pods(&ctx, &namespace, batch).await?;
            let handler = hook.handler(batch.spec.hooks.as_deref());
            run_claimed(&sessions, &session.name_any(), hook, handler, &exec_pods).await?;
            Ok(Action::requeue(Duration::from_millis(10)))
        }
        (Some(Claimed::HookJob(hook)), Some(batch)) => {
            // Made by another controller meanwhile: its one Pod sends the hook, at most once.
            create_job(&ctx, &namespace, &hook_job(batch, &session, hook, &ctx.trigger_image)).await?;
            Ok(Action::await_change())
        }
        _ => Ok(action),
    }
}

/// Runs an exec hook whose claim is written, and records its outcome (retrying on conflicts: the
/// outcome must land, or the hook would count as lost).
async fn run_claimed(
    sessions: &Api<BackupSession>,
    name: &str,
    hook: Hook,
    handler: Option<&Handler>,
    exec_pods: &hooks::ExecPods,
) -> Result<(), ControllerError> {
    let result = match handler {
        Some(handler) => hooks::exec(handler, exec_pods).await,
        None => Err(format!("the batch no longer has a {} hook", hook.label())),
    };
    let record = hooks::outcome(hook, &result);
    update_status(sessions, name, |current| {
        let status = current.status.get_or_insert_with(Default::default);
        conditions::set(&mut status.conditions, &record, None);
        true
    })
    .await?;
    Ok(())
}

/// The sibling that makes `session` Skipped: one that is Running, or one not yet decided that was
/// created before it (by creation time, then name). The second rule matters while the older one is
/// still Pending behind its pre-backup hook: without it, two sessions created together would both
/// start. Every controller decides the same way from the same list, so at most one starts.
fn blocking_sibling<'a>(session: &BackupSession, siblings: &'a [BackupSession]) -> Option<&'a BackupSession> {
    let order = |s: &BackupSession| (s.metadata.creation_timestamp.clone().map(|t| t.0), s.name_any());
    siblings.iter().find(|other| {
        other.metadata.uid != session.metadata.uid
            && match other.status.as_ref().and_then(|s| s.phase) {
                Some(BackupSessionPhase::Running) => true,
                None | Some(BackupSessionPhase::Pending | BackupSessionPhase::Unknown) => order(other) < order(session),
                Some(BackupSessionPhase::Succeeded | BackupSessionPhase::Failed | BackupSessionPhase::Skipped) => false,
            }
    })
}

/// The Pods a batch's exec hooks run in: those of its workload members (all in its own namespace:
/// `inspect` refuses others without reading them).
async fn exec_pods(ctx: &Context, namespace: &str, batch: &BackupBatch) -> Result<hooks::ExecPods, ControllerError> {
    let mut selectors = Vec::new();
    for member in &batch.spec.members {
        if let TargetState::Workload(workload) =
            targets::inspect(&ctx.client, Some(&ctx.caches), namespace, member).await?
            && let Some(selector) = workload.selector.and_then(|s| kube::core::Selector::try_from(s).ok())
        {
            selectors.push(selector);
        }
    }
    Ok(hooks::ExecPods { pods: Api::namespaced(ctx.client.clone(), namespace), selectors })
}

/// Pending → Skipped when another session of the batch runs; else the pre-backup hook (claimed,
/// then run once), then the targets with their host counts, the deadline, and Running, asking for
/// the batch to be checked again.
async fn start(
    session: &BackupSession,
    batch: &BackupBatch,
    status: &mut BackupSessionStatus,
    ctx: &Context,
    sessions: &Api<BackupSession>,
    claimed: &mut Option<Claimed>,
) -> Result<Action, ControllerError> {
    // A session written by hand may lack the batch's labels (Stash's docs show such manifests) or
    // name another batch in them: sidecars watch sessions by them, and siblings are found and
    // finalizes protect unsettled sessions by them. They are set first; the change comes back here.
    let wanted = invoker_labels(&batch.name_any());
    if wanted.iter().any(|(key, value)| session.labels().get(key) != Some(value)) {
        let patch = serde_json::json!({"metadata": {"labels": wanted}});
        sessions.patch(&session.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
        return Ok(Action::await_change());
    }
    let siblings = sessions.list(&ListParams::default().labels(&invoker_selector(&batch.name_any()))).await?;
    if let Some(other) = blocking_sibling(session, &siblings.items) {
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

    if let Some((reason, message)) = batch.spec.member_problem() {
        fail(status, reason, &format!("the batch is invalid: {message}"));
        return Ok(Action::await_change());
    }
    if let Some(pre) = Hook::PreBackup.handler(batch.spec.hooks.as_deref()) {
        let runner = runner(ctx, session, status, Hook::PreBackup, pre).await?;
        match gate(status, Hook::PreBackup, &runner, claimed) {
            Err(wait) => return Ok(wait),
            Ok(true) => {}
            Ok(false) => {
                let message =
                    status.conditions.iter().find(|c| c.type_ == hooks::PRE_BACKUP).and_then(|c| c.message.clone());
                fail(status, "PreBackupHookFailed", message.as_deref().unwrap_or("the pre-backup hook failed"));
                return Ok(Action::await_change());
            }
        }
    }

    let namespace = session.namespace().unwrap_or_default();
    let mut targets = Vec::with_capacity(batch.spec.members.len());
    for member in &batch.spec.members {
        let state = targets::inspect(&ctx.client, Some(&ctx.caches), &namespace, member).await?;
        let reference = &member.target.reference;
        let unusable = unusable(&state, reference);
        targets.push(BackupTargetStatus {
            reference: reference.clone(),
            total_hosts: Some(state.hosts().max(1)),
            phase: Some(if unusable.is_some() { TargetPhase::Failed } else { TargetPhase::Pending }),
            stats: unusable
                .map(|error| HostBackupStats {
                    hostname: member.target.host_alias(),
                    phase: Some(HostPhase::Failed),
                    snapshots: Vec::new(),
                    duration: None,
                    error: Some(error),
                })
                .into_iter()
                .collect(),
            pre_backup_actions: Vec::new(),
            post_backup_actions: Vec::new(),
            conditions: Vec::new(),
            progress: Vec::new(),
        });
    }
    status.targets = targets;
    progress::advance(&mut status.targets, batch.spec.execution_order);
    let timeout =
        batch.spec.time_out.as_ref().and_then(|t| t.parse().ok()).and_then(|t| SignedDuration::try_from(t).ok());
    status.session_deadline = now().checked_add(timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT)).ok().map(Time);
    status.phase = Some(BackupSessionPhase::Running);
    // The batch's member conditions were last computed when it changed: say now whether its
    // workloads' Pods still carry the sidecar (a Pod admitted while the webhook was down has none).
    // The controller is gone only when the operator stops.
    let _ = ctx.recheck.unbounded_send(ObjectRef::from_obj(batch));
    Ok(Action::requeue(Duration::from_millis(10)))
}

/// Why a target cannot be backed up in this session at all: it fails at once instead of holding
/// the session until its deadline.
fn unusable(state: &TargetState, reference: &TargetRef) -> Option<String> {
    let what = format!("{} {}", reference.kind, reference.name);
    match state {
        TargetState::Missing => Some(format!("{what} does not exist")),
        TargetState::Unsupported => Some(format!("kind {:?} cannot be backed up", reference.kind)),
        TargetState::CrossNamespace => Some(format!("{what}: members may only name objects of their own namespace")),
        TargetState::Unusable(problem) => Some(problem.to_string()),
        TargetState::Workload(_) if state.hosts() == 0 => {
            Some(format!("{what} is scaled to zero: no Pod runs the stash sidecar to back it up"))
        }
        TargetState::Workload(_) | TargetState::Volume => None,
    }
}

/// What runs `hook` of `session`: its claimant (exec), or its Job, whose state is read only while
/// the hook is claimed and undecided.
async fn runner(
    ctx: &Context,
    session: &BackupSession,
    status: &BackupSessionStatus,
    hook: Hook,
    handler: &Handler,
) -> Result<hooks::Runner, ControllerError> {
    if !hooks::runs_in_job(handler) {
        return Ok(hooks::Runner::Claimant);
    }
    let undecided = status
        .conditions
        .iter()
        .any(|c| c.type_ == hook.condition() && c.status == crate::api::common::ConditionStatus::Unknown);
    let job = if undecided {
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
        jobs.get_opt(&hook_job_name(&session.name_any(), hook)).await?
    } else {
        None
    };
    Ok(hooks::Runner::Job(hooks::job_state(job.as_ref())))
}

/// Where the session stands on `hook` (see `hooks::step`): `Err(action)` to return now — this
/// reconcile claimed it or is to create its Job (either happens once the status is written), or it
/// is running elsewhere; `Ok(true)` when it ran and succeeded; `Ok(false)` when it failed, did not
/// run, or its outcome was lost (recorded, never rerun).
fn gate(
    status: &mut BackupSessionStatus,
    hook: Hook,
    runner: &hooks::Runner,
    claimed: &mut Option<Claimed>,
) -> Result<bool, Action> {
    let after_claim = || match runner {
        hooks::Runner::Claimant => Claimed::Exec(hook),
        hooks::Runner::Job(_) => Claimed::HookJob(hook),
    };
    match hooks::step(&status.conditions, hook, now(), runner) {
        hooks::Step::Claim => {
            conditions::set(&mut status.conditions, &hooks::claim(hook), None);
            *claimed = Some(after_claim());
            Err(Action::await_change())
        }
        hooks::Step::CreateJob => {
            *claimed = Some(after_claim());
            Err(Action::await_change())
        }
        hooks::Step::InFlight { until } => Err(Action::requeue(until_then(until))),
        hooks::Step::Ran(succeeded) => Ok(succeeded),
        hooks::Step::NotRun(why) => {
            conditions::set(&mut status.conditions, &hooks::not_run(hook, &why), None);
            Ok(false)
        }
        hooks::Step::Lost => {
            conditions::set(&mut status.conditions, &hooks::lost(hook), None);
            Ok(false)
        }
    }
}

fn until_then(until: Timestamp) -> Duration {
    Duration::try_from(until.duration_since(now())).unwrap_or(Duration::ZERO).max(Duration::from_millis(100))
}

/// Running: enforce the deadline, create job-model Jobs for started members, notice crashed Jobs,
/// finish targets whose hosts all reported, start the next ones, and finish the session.
async fn progress(
    session: &BackupSession,
    batch: &BackupBatch,
    status: &mut BackupSessionStatus,
    ctx: &Context,
    claimed: &mut Option<Claimed>,
) -> Result<Action, ControllerError> {
    let deadline = status.session_deadline.as_ref().map(|t| t.0);
    let timed_out = status.conditions.iter().any(|c| c.type_ == DEADLINE_EXCEEDED);
    if let Some(deadline) = deadline
        && (timed_out || now() >= deadline)
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
        return finish(session, batch, status, ctx, false, Some(("DeadlineExceeded", message)), claimed).await;
    }

    run_job_members(session, batch, status, ctx).await?;
    let advanced = progress::advance(&mut status.targets, batch.spec.execution_order);
    status.summarize_progress();
    // Before finishing too: a host that resumed and finished before its next sample is no longer
    // stalled, and the session must not end saying it is.
    let stall = progress::stalled(&status.targets, now(), ctx.stall_after);
    if let Some(condition) = stall.condition(status.conditions.iter().any(|c| c.type_ == STALLED)) {
        conditions::set(&mut status.conditions, &condition, None);
    }
    match advanced {
        Progress::Finished { succeeded } => finish(session, batch, status, ctx, succeeded, None, claimed).await,
        Progress::Running => {
            // Host writes and owned Jobs wake us; the deadline, the next possible stall and the poll
            // are the backstops.
            let until_deadline = deadline.and_then(|d| Duration::try_from(d.duration_since(now())).ok());
            let wake = [until_deadline, stall.look_again].into_iter().flatten().fold(POLL, Duration::min);
            Ok(Action::requeue(wake))
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
    // Targets are the members at session start; Jobs follow them by identity, so editing the
    // batch's members meanwhile never starts a Job for the wrong target.
    for (index, target) in status.targets.iter_mut().enumerate() {
        if target.phase != Some(TargetPhase::Running) {
            continue;
        }
        let Some(member) = batch.spec.members.iter().find(|m| m.target.reference == target.reference) else {
            if target.stats.is_empty() {
                target.stats.push(HostBackupStats {
                    hostname: target.reference.name.clone(),
                    phase: Some(HostPhase::Failed),
                    snapshots: Vec::new(),
                    duration: None,
                    error: Some("the member was removed from the batch while the session ran".into()),
                });
            }
            continue;
        };
        if !is_job_model(member) {
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
        let task = member.task.as_ref().map(|t| t.name.as_str());
        let database =
            match app_binding::database_source(&ctx.client, &namespace, &member.target.reference, task).await? {
                Ok(database) => database,
                Err(problem) => {
                    target.stats.push(HostBackupStats {
                        hostname: member.target.alias.clone(),
                        phase: Some(HostPhase::Failed),
                        snapshots: Vec::new(),
                        duration: None,
                        error: Some(problem.to_string()),
                    });
                    continue;
                }
            };
        let job =
            backup_job(batch, session, (index, member), repository, database, &ctx.trigger_image, deadline_seconds);
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

/// The batch's Repository when the session's namespace may use it (see `tenancy`), with the grant
/// the namespace's executors need when it is another namespace's: a session created with its
/// batch may start before the batch's first reconcile made it, and its Jobs would get a 403.
async fn batch_repository(
    batch: &BackupBatch,
    ctx: &Context,
    namespace: &str,
) -> Result<Result<Repository, crate::tenancy::Refusal>, ControllerError> {
    let repository = ctx.repository(namespace, &batch.spec.repository).await?;
    if let Ok(repository) = &repository {
        grants::ensure(ctx, namespace, repository).await?;
    }
    Ok(repository)
}

/// A Succeeded or Failed session gets a finalize Job: retention, the manifest (when complete) and
/// the Repository's status, done in the repository by `stash finalize-session`. A Job that failed
/// is replaced after a backoff (`finalize_retry`); the returned time is when to look again.
async fn ensure_finalized(
    session: &BackupSession,
    batch: &BackupBatch,
    ctx: &Context,
) -> Result<Option<Timestamp>, ControllerError> {
    let phase = session.status.as_ref().and_then(|s| s.phase);
    if !matches!(phase, Some(BackupSessionPhase::Succeeded | BackupSessionPhase::Failed)) {
        return Ok(None);
    }
    let namespace = session.namespace().unwrap_or_default();
    let Ok(repository) = batch_repository(batch, ctx, &namespace).await? else { return Ok(None) };
    let mut job = finalize_job(batch, session, &repository, &ctx.trigger_image);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = jobs.get_opt(&job.name_any()).await?;
    let observed = existing.as_ref().map(finalize_retry::Observed::of);
    match finalize_retry::step(session.is_settled(), observed, now()) {
        finalize_retry::Step::Wait => {}
        finalize_retry::Step::RetryAt(when) => return Ok(Some(when)),
        finalize_retry::Step::Make { attempt } => {
            finalize_retry::mark(&mut job, attempt);
            create_job(ctx, &namespace, &job).await?;
        }
        finalize_retry::Step::Replace { attempt } => {
            // Only the Job that failed goes: a replacement another controller made stays.
            let uid = existing.and_then(|j| j.metadata.uid);
            let params = DeleteParams {
                preconditions: Some(Preconditions { uid, resource_version: None }),
                ..DeleteParams::background()
            };
            match jobs.delete(&job.name_any(), &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => return Ok(None),
                Err(err) => return Err(err.into()),
            }
            finalize_retry::mark(&mut job, attempt);
            create_job(ctx, &namespace, &job).await?;
            let note = format!("finalize Job {} failed; attempt {attempt} started", job.name_any());
            publish(ctx, session, EventType::Warning, "FinalizeRetried", &note).await;
        }
    }
    Ok(None)
}

/// Creates `job` unless a Job of its name exists: the name is the session's and the step's, so an
/// existing one is this very Job, made by another reconcile or controller.
async fn create_job(ctx: &Context, namespace: &str, job: &Job) -> Result<(), ControllerError> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    match jobs.create(&PostParams::default(), job).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

fn fail(status: &mut BackupSessionStatus, reason: &str, message: &str) {
    status.phase = Some(BackupSessionPhase::Failed);
    conditions::set(&mut status.conditions, &Desired::new("SessionFailed", true, reason, message), None);
}

/// The post-backup hook (claimed, then run once, while the session stays Running), then the final
/// phase, duration, metrics, and the retry schedule.
async fn finish(
    session: &BackupSession,
    batch: &BackupBatch,
    status: &mut BackupSessionStatus,
    ctx: &Context,
    succeeded: bool,
    failure: Option<(&str, String)>,
    claimed: &mut Option<Claimed>,
) -> Result<Action, ControllerError> {
    let retries_left = retries_left(session, batch) > 0;
    if let Some(post) = batch.spec.hooks.as_deref().and_then(|h| h.post_backup.as_ref())
        && hooks::post_hook_applies(post.execution_policy, succeeded, retries_left)
    {
        let runner = runner(ctx, session, status, Hook::PostBackup, &post.handler).await?;
        if let Err(wait) = gate(status, Hook::PostBackup, &runner, claimed) {
            return Ok(wait);
        }
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
    Ok(Action::await_change())
}

/// Counts a session whose final phase this reconcile just wrote (once: only the leader writes it,
/// and only one write changes the phase), and observes its duration.
fn count_finished(ctx: &Context, namespace: &str, batch: &str, status: &BackupSessionStatus) {
    let Some(outcome) = observed::session_outcome(status) else { return };
    let metrics = &ctx.metrics.controller;
    metrics.sessions.get_or_create(&observed::batch_labels(namespace, batch, Some(outcome))).inc();
    if let Some(seconds) = status.session_duration.as_deref().and_then(observed::duration_seconds) {
        metrics.session_duration.get_or_create(&observed::batch_labels(namespace, batch, None)).observe(seconds);
    }
}

/// The record of a finished (Succeeded or Failed) session, with its finish time.
fn session_record(session: &BackupSession) -> Option<SessionRecord> {
    let status = session.status.as_ref()?;
    let phase = status.phase.filter(|p| matches!(p, BackupSessionPhase::Succeeded | BackupSessionPhase::Failed))?;
    let finish_time = Some(Time(observed::finish_time(session)?));
    Some(SessionRecord { name: session.name_any(), phase, finish_time })
}

/// Whether `candidate` replaces `current`: a session finished later, never an older one finalized
/// late (nor the same one twice).
fn replaces(current: Option<&SessionRecord>, candidate: &SessionRecord) -> bool {
    current.is_none_or(|current| current.name != candidate.name && current.finish_time <= candidate.finish_time)
}

/// Records a finished, finalized session in its batch's status (`lastSession`, `lastSuccessfulSession`) once,
/// under a field manager of its own; the batch's reconcile exports its metrics from there. `batch`
/// comes from the cache: when it says the record is there, it is (records only move forward); when
/// it says one is missing, the batch is read again, for what the write carries must be the latest.
async fn record_on_batch(session: &BackupSession, batch: &BackupBatch, ctx: &Context) -> Result<(), ControllerError> {
    let Some(record) = session_record(session) else { return Ok(()) };
    if records_to_apply(&record, batch.status.as_ref()).is_empty() {
        return Ok(());
    }
    let batches: Api<BackupBatch> = Api::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
    let Some(latest) = batches.get_opt(&batch.name_any()).await? else { return Ok(()) };
    let status = records_to_apply(&record, latest.status.as_ref());
    if !status.is_empty() {
        let patch =
            serde_json::json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch", "status": status});
        let params = PatchParams::apply(SESSION_RECORDS_MANAGER).force();
        batches.patch_status(&batch.name_any(), &params, &Patch::Apply(&patch)).await?;
    }
    Ok(())
}

/// The batch status fields that record `record` over `current`; empty when there is nothing to
/// record. Apply keeps what this manager applied before unless named again: the other record is
/// carried.
fn records_to_apply(
    record: &SessionRecord,
    current: Option<&BackupBatchStatus>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut status = serde_json::Map::new();
    if replaces(current.and_then(|s| s.last_session.as_ref()), record) {
        status.insert("lastSession".into(), serde_json::to_value(record).unwrap_or_default());
    }
    let succeeded = record.phase == BackupSessionPhase::Succeeded;
    if succeeded && replaces(current.and_then(|s| s.last_successful_session.as_ref()), record) {
        status.insert("lastSuccessfulSession".into(), serde_json::to_value(record).unwrap_or_default());
    }
    if !status.is_empty() {
        for (key, kept) in [
            ("lastSession", current.and_then(|s| s.last_session.as_ref())),
            ("lastSuccessfulSession", current.and_then(|s| s.last_successful_session.as_ref())),
        ] {
            if let (false, Some(kept)) = (status.contains_key(key), kept) {
                status.insert(key.into(), serde_json::to_value(kept).unwrap_or_default());
            }
        }
    }
    status
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
    let finalize_again = ensure_finalized(session, batch, ctx).await?;
    // A session is the batch's last success (or failure) once finalized: until its manifest is
    // written it is no restorable set, and the alerts that read the record must not say otherwise.
    if session.is_settled() {
        record_on_batch(session, batch, ctx).await?;
    } else {
        // The batch exports how many of its sessions wait on a finalize; it learns of this one here.
        let _ = ctx.recheck.unbounded_send(ObjectRef::from_obj(batch));
    }
    let status = session.status.clone().unwrap_or_default();
    // The earliest of the finalize's retry and the session's own retry wakes this session.
    let mut wake = finalize_again;
    if status.phase == Some(BackupSessionPhase::Failed)
        && status.retried != Some(true)
        && let Some(next) = status.next_retry.as_ref().map(|t| t.0)
    {
        if now() < next {
            wake = Some(wake.map_or(next, |w| w.min(next)));
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
    Ok(wake.map_or_else(Action::await_change, |when| Action::requeue(until_then(when))))
}

/// Keeps the newest `backupHistoryLimit` finished sessions of the batch, and as many Skipped ones
/// (which hold no data and must not push real history out); Jobs go with their sessions. A session
/// is trimmed only once it is finalized: its finalize Job belongs to it, and until then retention
/// protects its data by its presence (`backupHistoryLimit: 0` still writes manifests).
async fn trim_history(batch: &BackupBatch, sessions: &Api<BackupSession>) -> Result<(), ControllerError> {
    let limit = usize::try_from(batch.spec.backup_history_limit.max(0)).unwrap_or(0);
    let list = sessions.list(&ListParams::default().labels(&invoker_selector(&batch.name_any()))).await?;
    let phase = |s: &BackupSession| s.status.as_ref().and_then(|st| st.phase);
    let awaiting_retry =
        |s: &BackupSession| s.status.as_ref().is_some_and(|st| st.next_retry.is_some() && st.retried != Some(true));
    let mut finished: Vec<&BackupSession> = Vec::new();
    let mut skipped: Vec<&BackupSession> = Vec::new();
    let trimmable =
        |s: &&BackupSession| s.metadata.deletion_timestamp.is_none() && !awaiting_retry(s) && s.is_settled();
    for session in list.items.iter().filter(trimmable) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::backup_session::{BackupInvokerRef, BackupSessionSpec};

    fn session(name: &str, uid: &str, created: i64, phase: Option<BackupSessionPhase>) -> BackupSession {
        let invoker =
            BackupInvokerRef { api_group: String::new(), kind: BACKUP_BATCH_KIND.into(), name: "batch".into() };
        let mut s = BackupSession::new(name, BackupSessionSpec { invoker, retry_left: None });
        s.metadata.uid = Some(uid.into());
        s.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).expect("time")));
        s.status = Some(BackupSessionStatus { phase, ..Default::default() });
        s
    }

    #[test]
    fn of_sessions_created_together_only_the_first_may_start() {
        let a = session("b-1", "a", 100, None);
        let b = session("b-1-b", "b", 100, None);
        let later = session("b-2", "c", 101, None);
        let all = [a.clone(), b.clone(), later.clone()];
        assert!(blocking_sibling(&a, &all).is_none(), "the first starts");
        assert_eq!(blocking_sibling(&b, &all).map(|s| s.name_any()), Some("b-1".into()), "same second: by name");
        assert!(blocking_sibling(&later, &all).is_some());
    }

    #[test]
    fn a_batch_records_the_session_that_finished_last_once() {
        let mut done = session("b-1", "a", 100, Some(BackupSessionPhase::Succeeded));
        assert_eq!(session_record(&done), None, "no duration: not finished yet");
        done.status.as_mut().expect("status").session_duration = Some("42s".into());
        let record = session_record(&done).expect("a record");
        assert_eq!(record.finish_time, Some(Time(Timestamp::from_second(142).expect("time"))));
        assert!(replaces(None, &record));
        assert!(!replaces(Some(&record), &record), "the same session is recorded once");
        let mut older = session("b-0", "z", 50, Some(BackupSessionPhase::Failed));
        older.status.as_mut().expect("status").session_duration = Some("10s".into());
        let older = session_record(&older).expect("a record");
        assert!(!replaces(Some(&record), &older), "an older session finalized late does not replace it");
        assert!(replaces(Some(&older), &record));
        assert_eq!(session_record(&session("s", "s", 1, Some(BackupSessionPhase::Skipped))), None);
    }

    /// The batch status after `records_to_apply`'s fields are applied over `current`.
    fn applied(
        current: Option<BackupBatchStatus>,
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> BackupBatchStatus {
        let mut status = current.unwrap_or_default();
        for (key, value) in fields {
            let record = serde_json::from_value(value).expect("a record");
            match key.as_str() {
                "lastSession" => status.last_session = Some(record),
                _ => status.last_successful_session = Some(record),
            }
        }
        status
    }

    fn record(name: usize, (succeeded, finish): (bool, i64)) -> SessionRecord {
        let phase = if succeeded { BackupSessionPhase::Succeeded } else { BackupSessionPhase::Failed };
        let finish_time = Some(Time(Timestamp::from_second(finish).expect("time")));
        SessionRecord { name: format!("s-{name}"), phase, finish_time }
    }

    proptest::proptest! {
        /// Sessions finish and are recorded in any order, some more than once; a reconcile looks at
        /// the batch as the cache held it at any earlier point. When that stale status has nothing
        /// to record, the latest holds records at least as new: skipping the read never loses a
        /// newer session.
        #[test]
        fn a_stale_batch_that_needs_no_record_never_hides_one(
            sessions in proptest::collection::vec((proptest::bool::ANY, 0i64..20), 1..6),
            recorded in proptest::collection::vec(0usize..6, 1..12),
            stale_at in 0usize..12,
            candidate in 0usize..6,
        ) {
            let of = |i: usize| record(i % sessions.len(), sessions[i % sessions.len()]);
            let mut history = vec![None];
            for i in recorded {
                let latest = history.last().cloned().flatten();
                let fields = records_to_apply(&of(i), latest.as_ref());
                history.push(Some(applied(latest, fields)));
            }
            let stale = history[stale_at.min(history.len() - 1)].clone();
            let latest = history.last().cloned().flatten();
            let candidate = of(candidate);
            if records_to_apply(&candidate, stale.as_ref()).is_empty() {
                let latest = latest.expect("a stale status that holds a record has a successor");
                let at_least = |r: &Option<SessionRecord>| r.as_ref().is_some_and(|r| r.finish_time >= candidate.finish_time);
                proptest::prop_assert!(at_least(&latest.last_session));
                if candidate.phase == BackupSessionPhase::Succeeded {
                    proptest::prop_assert!(at_least(&latest.last_successful_session));
                }
            }
        }
    }

    #[test]
    fn running_blocks_and_decided_sessions_do_not() {
        let me = session("old", "a", 100, None);
        let running = session("new", "b", 200, Some(BackupSessionPhase::Running));
        assert!(blocking_sibling(&me, &[me.clone(), running]).is_some(), "a running session blocks even if newer");
        for phase in [BackupSessionPhase::Succeeded, BackupSessionPhase::Failed, BackupSessionPhase::Skipped] {
            let done = session("older", "c", 50, Some(phase));
            assert!(blocking_sibling(&me, &[done]).is_none(), "{phase:?} does not block");
        }
    }
}
