//! BackupBatch → validation conditions, the trigger CronJob and its identity, status and Events.

use super::backup_job::is_job_model;
use super::caches;
use super::context::{Context, ControllerError, FIELD_MANAGER, ignore_missing};
use super::grants;
use super::identity;
use super::observed;
use super::targets::{self, TargetState};
use super::trigger::{CRONJOB_NAME_MAX, cronjob_name, schedule_problem, trigger_cronjob};
use crate::api::backup_batch::{BackupBatchSpec, BackupBatchStatus, BackupInvokerPhase, Driver, MemberConditions};
use crate::api::common::{ConditionStatus, PodRuntimeSettings, TargetRef};
use crate::api::{BackupBatch, Repository};
use crate::conditions::{self, Desired};
use crate::executor_pod::{ENV_REFUSED_WHY, database_task_refusal, env_refusal, is_database};
use crate::metrics::StateGauge;
use crate::tenancy::{self, Refusal};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

pub const REPOSITORY_FOUND: &str = "RepositoryFound";
pub const BACKEND_SECRET_FOUND: &str = "BackendSecretFound";
pub const CRONJOB_CREATED: &str = "CronJobCreated";
pub const VALIDATION_PASSED: &str = "ValidationPassed";
pub const BACKUP_TARGET_FOUND: &str = "BackupTargetFound";
pub const SIDECAR_INJECTED: &str = "StashSidecarInjected";

/// While something is missing or Pods still lack the sidecar, look again after this. (Secrets are not
/// watched: that would need list/watch on every Secret of the cluster.)
const RECHECK: Duration = Duration::from_secs(10);
/// How often a Ready batch using another namespace's Repository makes sure of its grant there.
const REGRANT: Duration = Duration::from_secs(300);
/// While a session of the batch waits on its finalize, how often the batch's series are computed
/// again: a late finalize of an older session writes nothing on the batch that would wake it.
const FINALIZE_LOOK: Duration = Duration::from_secs(300);

#[tracing::instrument(skip_all, fields(namespace = batch.namespace().unwrap_or_default(), name = batch.name_any()))]
pub async fn reconcile(batch: Arc<BackupBatch>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    if ctx.caches.status_pending(&batch) {
        return Ok(Action::await_change());
    }
    let namespace = batch.namespace().unwrap_or_default();
    let generation = batch.metadata.generation;

    let validation = validate(&batch, &ctx);
    let reference = &batch.spec.repository;
    let cached = ObjectRef::new(&reference.name).within(tenancy::repository_namespace(&namespace, reference));
    let found = ctx.caches.repositories.get(&cached);
    let repository = tenancy::authorize_found(&ctx.client, &namespace, reference, found.as_deref()).await?;
    let secret = match &repository {
        Ok(repo) => check_secret(&ctx, repo, &namespace).await?,
        Err(refusal) => Desired::new(BACKEND_SECRET_FOUND, false, refusal.reason(), "the Repository cannot be used"),
    };
    let repository_condition = match &repository {
        // wipeOut is not acted on; keeping the data is the safe side, so it is said, not refused.
        Ok(repo) if repo.spec.wipe_out => Desired::new(
            REPOSITORY_FOUND,
            true,
            "RepositoryAvailable",
            format!(
                "Repository {} found; its spec.wipeOut is not acted on: deleting the Repository keeps the data",
                repo.name_any()
            ),
        ),
        Ok(repo) => {
            Desired::new(REPOSITORY_FOUND, true, "RepositoryAvailable", format!("Repository {} found", repo.name_any()))
        }
        Err(refusal) => Desired::new(REPOSITORY_FOUND, false, refusal.reason(), refusal.to_string()),
    };

    let mut member_conditions = Vec::with_capacity(batch.spec.members.len());
    let mut members_ready = true;
    let mut sidecars_pending = false;
    for member in &batch.spec.members {
        let reference = &member.target.reference;
        let state = targets::inspect(&ctx.client, Some(&ctx.caches), &namespace, member).await?;
        let mut conditions = previous_member_conditions(&batch, reference);
        let found = match &state {
            TargetState::Missing => Desired::new(
                BACKUP_TARGET_FOUND,
                false,
                "TargetNotFound",
                format!("{} {} does not exist", reference.kind, reference.name),
            ),
            TargetState::Unsupported => Desired::new(
                BACKUP_TARGET_FOUND,
                false,
                "TargetKindNotSupported",
                format!("kind {:?} cannot be backed up", reference.kind),
            ),
            TargetState::CrossNamespace => Desired::new(
                BACKUP_TARGET_FOUND,
                false,
                "CrossNamespaceTarget",
                format!(
                    "{} {}: a member may only name objects of the batch's own namespace (target.ref.namespace)",
                    reference.kind, reference.name
                ),
            ),
            TargetState::Unusable(problem) => {
                Desired::new(BACKUP_TARGET_FOUND, false, problem.reason(), problem.to_string())
            }
            _ => Desired::new(
                BACKUP_TARGET_FOUND,
                true,
                "TargetAvailable",
                format!("{} {} found", reference.kind, reference.name),
            ),
        };
        members_ready &= found.is_true();
        record(&ctx, &batch, &mut conditions, &found, generation).await;
        if let TargetState::Workload(workload) = &state {
            // Its Pods' sidecar acts as the workload's ServiceAccount.
            identity::ensure_workload(&ctx, &namespace, workload).await?;
            let usable = repository.as_ref().ok();
            let injected = targets::sidecar_status(
                &ctx.client,
                &ctx.caches.members.injected,
                &namespace,
                workload,
                &batch,
                usable,
            )
            .await?;
            sidecars_pending |= !injected.desired.is_true();
            record(&ctx, &batch, &mut conditions, &injected.desired, generation).await;
            if injected.rolled {
                publish(
                    &ctx,
                    &batch,
                    EventType::Normal,
                    "WorkloadRolled",
                    &format!(
                        "{} {} restarted once so that its Pods get the stash sidecar",
                        reference.kind, reference.name
                    ),
                )
                .await;
            }
        }
        member_conditions.push(MemberConditions { target: reference.clone(), conditions });
    }

    let mut status_conditions = batch.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    record(&ctx, &batch, &mut status_conditions, &validation, generation).await;
    record(&ctx, &batch, &mut status_conditions, &repository_condition, generation).await;
    record(&ctx, &batch, &mut status_conditions, &secret, generation).await;

    // Every batch's executor Jobs run as the namespace's identity, with or without a schedule.
    identity::ensure(&ctx, &namespace).await?;
    let granted_elsewhere = match &repository {
        Ok(repository) => grants::ensure(&ctx, &namespace, repository).await?,
        Err(_) => false,
    };
    let cronjob = match withheld_trigger(&validation, &repository) {
        Some(withheld) => {
            remove_trigger(&batch, &ctx, &namespace).await?;
            withheld
        }
        None => ensure_trigger(&batch, &ctx, &namespace).await?,
    };
    record(&ctx, &batch, &mut status_conditions, &cronjob, generation).await;

    let phase = if !validation.is_true() {
        BackupInvokerPhase::Invalid
    } else if repository_condition.is_true() && secret.is_true() && members_ready {
        BackupInvokerPhase::Ready
    } else {
        BackupInvokerPhase::NotReady
    };
    let status = BackupBatchStatus {
        observed_generation: generation,
        phase: Some(phase),
        conditions: status_conditions,
        member_conditions,
        // The session records are the session controller's (see `write_status`).
        ..Default::default()
    };
    let finalizes_pending = export_series(&batch, &status, repository.as_ref().ok(), &ctx, &namespace);
    write_status(&batch, &ctx, &namespace, status).await?;

    Ok(if phase != BackupInvokerPhase::Ready || sidecars_pending {
        Action::requeue(RECHECK)
    } else if granted_elsewhere {
        // Its grant lives in another namespace, where nothing it watches sees it go.
        Action::requeue(REGRANT)
    } else if finalizes_pending {
        Action::requeue(FINALIZE_LOOK)
    } else {
        Action::await_change()
    })
}

/// Exports the batch's series as of this reconcile: the status just computed (conditions) with the
/// session records of the cached one, the sessions from the session controller's cache and the
/// Repository read above, so the metrics cost no request of their own. True while a session of the
/// batch waits on its finalize.
fn export_series(
    batch: &BackupBatch,
    status: &BackupBatchStatus,
    repository: Option<&Repository>,
    ctx: &Context,
    namespace: &str,
) -> bool {
    let records = batch.status.as_ref();
    let observed = BackupBatch {
        status: Some(BackupBatchStatus {
            last_session: records.and_then(|s| s.last_session.clone()),
            last_successful_session: records.and_then(|s| s.last_successful_session.clone()),
            ..status.clone()
        }),
        ..batch.clone()
    };
    let samples = observed::batch_series(&observed, &ctx.sessions.state(), repository, Timestamp::now());
    // Read from the series just computed: another pass over every cached session would cost each
    // reconcile as much again.
    let waiting = samples.iter().any(|s| s.gauge == StateGauge::UnfinalizedSessions && s.value > 0.0);
    ctx.metrics.controller.state.export(&observed::batch_owner(namespace, &batch.name_any()), samples);
    waiting
}

/// Applies `status` unless the batch already has it. Our own write comes back as a watch event and
/// another reconcile: that one must write nothing, or batches wake each other forever. (Under load the
/// reconcile reads a cache a write behind; rewriting unconditionally kept reverting the newer status,
/// each revert a new event: with 300 batches, 36,000 requests in an idle minute.)
async fn write_status(
    batch: &BackupBatch,
    ctx: &Context,
    namespace: &str,
    status: BackupBatchStatus,
) -> Result<(), ControllerError> {
    // The session records are written by the session controller under a field manager of their
    // own: this apply neither compares nor carries them, so a stale cache never reverts them.
    let ours = batch.status.clone().map(|current| BackupBatchStatus {
        last_session: None,
        last_successful_session: None,
        ..current
    });
    if ours.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": "stash.appscode.com/v1beta1",
        "kind": "BackupBatch",
        "status": status,
    });
    let batches: Api<BackupBatch> = Api::namespaced(ctx.client.clone(), namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let written = batches.patch_status(&batch.name_any(), &params, &Patch::Apply(&patch)).await?;
    ctx.caches.status_written(batch, written.metadata.resource_version);
    Ok(())
}

/// Checks that need no API call: driver, schedule, and that no other batch claims the same workload.
fn validate(batch: &BackupBatch, ctx: &Context) -> Desired {
    if batch.spec.driver == Driver::VolumeSnapshotter {
        return Desired::new(
            VALIDATION_PASSED,
            false,
            "DriverNotSupported",
            "spec.driver VolumeSnapshotter is not supported yet; use Restic",
        );
    }
    if let Some(schedule) = &batch.spec.schedule
        && let Some(problem) = schedule_problem(schedule, Timestamp::now())
    {
        return Desired::new(
            VALIDATION_PASSED,
            false,
            "InvalidSchedule",
            format!("spec.schedule {schedule:?}: {problem}"),
        );
    }
    if let Some((reason, message)) = batch.spec.member_problem() {
        return Desired::new(VALIDATION_PASSED, false, reason, message);
    }
    if let Some(message) = runtime_refusal(&batch.spec).or_else(|| dropped_member_field(&batch.spec)) {
        return Desired::new(VALIDATION_PASSED, false, "UnsupportedField", message);
    }
    let tasks = batch.spec.members.iter().enumerate().map(|(index, member)| {
        let task = member.task.as_ref().map(|t| t.name.as_str());
        database_task_refusal(index, &member.target.reference.kind, task)
    });
    if let Some(message) = tasks.flatten().next() {
        return Desired::new(VALIDATION_PASSED, false, "TaskNotSupported", message);
    }
    if let Some((target, other)) = claimed_elsewhere(batch, ctx) {
        return Desired::new(
            VALIDATION_PASSED,
            false,
            "TargetClaimedByAnotherBatch",
            format!(
                "{} {} already belongs to BackupBatch {other}; a workload belongs to one batch",
                target.kind, target.name
            ),
        );
    }
    Desired::new(VALIDATION_PASSED, true, "ValidationSucceeded", "the batch is valid")
}

/// A pod-level `runtimeSettings` field that the Pods it would apply to cannot honour, as a message.
/// The batch's own settings apply to its trigger, finalize and hook Pods (its serviceAccountName
/// to the trigger only); a member's to its Jobs; a sidecar's Pod is the workload's.
fn runtime_refusal(spec: &BackupBatchSpec) -> Option<String> {
    if let Some(field) = env_refusal(spec.runtime_settings.as_deref().and_then(|r| r.container.as_ref())) {
        return Some(format!("spec.runtimeSettings.{field} is not supported: {ENV_REFUSED_WHY}"));
    }
    for (i, member) in spec.members.iter().enumerate() {
        if let Some(field) = env_refusal(member.runtime_settings.as_deref().and_then(|r| r.container.as_ref())) {
            return Some(format!("spec.members[{i}].runtimeSettings.{field} is not supported: {ENV_REFUSED_WHY}"));
        }
    }
    let batch = spec.runtime_settings.as_deref().and_then(|r| r.pod.as_ref());
    let batch = batch.map(|p| PodRuntimeSettings { service_account_name: None, ..p.clone() });
    if let Some((field, why)) = batch.as_ref().and_then(PodRuntimeSettings::refused_in_jobs) {
        return Some(format!("spec.runtimeSettings.{field} is not supported: {why}"));
    }
    for (i, member) in spec.members.iter().enumerate() {
        let Some(pod) = member.runtime_settings.as_deref().and_then(|r| r.pod.as_ref()) else { continue };
        let refused = if is_job_model(member) {
            pod.refused_in_jobs()
        } else {
            (*pod != PodRuntimeSettings::default()).then_some((
                "pod",
                "the member is backed up by the sidecar in its workload's own Pods; set these on the workload",
            ))
        };
        if let Some((field, why)) = refused {
            return Some(format!("spec.members[{i}].runtimeSettings.{field} is not supported: {why}"));
        }
    }
    None
}

/// A member field the way the member is backed up would drop: refused by name, never ignored. A
/// Job (PVC and database members) runs no member hooks, a sidecar sends no exec hook, and a
/// database is dumped whole.
fn dropped_member_field(spec: &BackupBatchSpec) -> Option<String> {
    for (i, member) in spec.members.iter().enumerate() {
        let (target, kind) = (&member.target, &member.target.reference.kind);
        let hooks = member.hooks.as_deref();
        let pre = hooks.and_then(|h| h.pre_backup.as_ref());
        let post = hooks.and_then(|h| h.post_backup.as_ref()).map(|p| &p.handler);
        if is_job_model(member) && (pre.is_some() || post.is_some()) {
            return Some(format!(
                "spec.members[{i}].hooks is not supported for a {kind} member: its Job runs no hooks; use spec.hooks"
            ));
        }
        for (field, handler) in [("preBackup", pre), ("postBackup", post)] {
            if handler.is_some_and(|h| h.exec.is_some()) {
                return Some(format!(
                    "spec.members[{i}].hooks.{field}.exec is not supported: the sidecar sends httpGet, httpPost and \
                     tcpSocket hooks; use spec.hooks for exec"
                ));
            }
        }
        if is_database(kind) {
            let set = [
                ("paths", !target.paths.is_empty()),
                ("exclude", !target.exclude.is_empty()),
                ("volumeMounts", !target.volume_mounts.is_empty()),
                ("args", !target.args.is_empty()),
            ];
            if let Some((field, _)) = set.into_iter().find(|(_, set)| *set) {
                return Some(format!(
                    "spec.members[{i}].target.{field} is not supported for a database member: the dump is backed up whole"
                ));
            }
        }
    }
    None
}

/// A member target that an older batch of the namespace already backs up. (Volumes may be shared:
/// a batch of volumes only skips the scan, which goes over every cached batch on each reconcile.)
fn claimed_elsewhere(batch: &BackupBatch, ctx: &Context) -> Option<(TargetRef, String)> {
    if batch.spec.members.iter().all(|m| m.target.reference.kind == "PersistentVolumeClaim") {
        return None;
    }
    let meta = &batch.metadata;
    let older = |other: &BackupBatch| {
        (other.metadata.creation_timestamp.as_ref(), &other.metadata.name)
            < (meta.creation_timestamp.as_ref(), &meta.name)
    };
    let others = ctx.batches.state_filter(|other| {
        other.metadata.namespace == meta.namespace && other.metadata.uid != meta.uid && older(other)
    });
    for member in &batch.spec.members {
        let target = &member.target.reference;
        if target.kind == "PersistentVolumeClaim" {
            continue;
        }
        for other in &others {
            let same = |m: &crate::api::backup_batch::BackupMember| {
                m.target.reference.kind == target.kind && m.target.reference.name == target.name
            };
            if other.spec.members.iter().any(same) {
                return Some((target.clone(), other.name_any()));
            }
        }
    }
    None
}

/// Why the batch may have no trigger CronJob now, if so: it is invalid, or its Repository is another
/// namespace's that refuses it (a CronJob would start sessions for a Repository it may not use).
fn withheld_trigger(validation: &Desired, repository: &Result<Repository, Refusal>) -> Option<Desired> {
    if !validation.is_true() {
        return Some(Desired::new(CRONJOB_CREATED, false, "ValidationFailed", "no CronJob while the batch is invalid"));
    }
    match repository {
        Err(refusal @ Refusal::NotAllowed { .. }) => Some(Desired::new(
            CRONJOB_CREATED,
            false,
            refusal.reason(),
            "no CronJob while the Repository may not be used from this namespace",
        )),
        _ => None,
    }
}

/// BackendSecretFound: the Secret exists and holds RESTIC_PASSWORD (its value is never read into logs).
/// It is looked up in `namespace`, the batch's: its Pods and Jobs mount the Secret by name from there,
/// whichever namespace the Repository is in. Secrets are neither listed nor watched (that would need
/// every Secret of the cluster): a usable one is read once per version of its Repository, and a
/// missing or incomplete one on every recheck. A Secret removed later is not noticed here; the next
/// session's executors fail saying so.
async fn check_secret(ctx: &Context, repository: &Repository, namespace: &str) -> Result<Desired, ControllerError> {
    let name = &repository.spec.backend.storage_secret_name;
    if name.is_empty() {
        return Ok(Desired::new(
            BACKEND_SECRET_FOUND,
            false,
            "SecretNotNamed",
            "the Repository names no spec.backend.storageSecretName",
        ));
    }
    let usable =
        || Desired::new(BACKEND_SECRET_FOUND, true, "SecretAvailable", format!("Secret {namespace}/{name} found"));
    if ctx.caches.secret_known_usable(repository, namespace) {
        return Ok(usable());
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(match secrets.get_opt(name).await? {
        None => Desired::new(
            BACKEND_SECRET_FOUND,
            false,
            "SecretNotFound",
            format!("Secret {namespace}/{name} does not exist"),
        ),
        Some(secret) if !has_key(&secret, "RESTIC_PASSWORD") => Desired::new(
            BACKEND_SECRET_FOUND,
            false,
            "ResticPasswordMissing",
            format!("Secret {namespace}/{name} has no RESTIC_PASSWORD key"),
        ),
        Some(_) => {
            ctx.caches.secret_usable(repository, namespace);
            usable()
        }
    })
}

pub(crate) fn has_key(secret: &Secret, key: &str) -> bool {
    secret.data.as_ref().is_some_and(|d| d.contains_key(key))
        || secret.string_data.as_ref().is_some_and(|d| d.contains_key(key))
}

/// Applies the trigger CronJob when there is a schedule, else removes it.
async fn ensure_trigger(batch: &BackupBatch, ctx: &Context, namespace: &str) -> Result<Desired, ControllerError> {
    let Some(schedule) = &batch.spec.schedule else {
        remove_trigger(batch, ctx, namespace).await?;
        return Ok(Desired::new(
            CRONJOB_CREATED,
            false,
            "NoSchedule",
            "spec.schedule is empty: back up with `stash trigger`",
        ));
    };
    let cronjob = trigger_cronjob(batch, schedule, &ctx.trigger_image);
    let name = cronjob.name_any();
    let desired = typed(cronjob);
    let fingerprint = caches::fingerprint(&desired);
    // Applying what was applied last, to a CronJob nobody changed since, would change nothing.
    if !ctx.caches.cronjob_current(namespace, &name, fingerprint) {
        let cronjobs: Api<CronJob> = Api::namespaced(ctx.client.clone(), namespace);
        let applied =
            cronjobs.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired)).await?;
        ctx.caches.cronjob_applied(namespace, &name, fingerprint, applied.metadata.generation);
    }
    let shortened = if name == format!("stash-trigger-{}", batch.name_any()) {
        String::new()
    } else {
        format!(" (name shortened: CronJob names have at most {CRONJOB_NAME_MAX} characters)")
    };
    Ok(Desired::new(CRONJOB_CREATED, true, "CronJobApplied", format!("CronJob {name} runs on {schedule:?}{shortened}")))
}

async fn remove_trigger(batch: &BackupBatch, ctx: &Context, namespace: &str) -> Result<(), ControllerError> {
    let name = cronjob_name(&batch.name_any());
    if ctx.caches.cronjobs.get(&ObjectRef::new(&name).within(namespace)).is_some() {
        let cronjobs: Api<CronJob> = Api::namespaced(ctx.client.clone(), namespace);
        ignore_missing(cronjobs.delete(&name, &Default::default()).await)?;
    }
    Ok(())
}

/// The batch is being deleted: owned objects go by garbage collection; the namespace's shared
/// identities go with its last batch or restore, and a grant of another namespace's Repository with
/// the last one using it, before the batch does; its metric series go now (a batch that is gone must
/// not read as "last succeeded at ..." forever).
pub async fn cleanup(batch: Arc<BackupBatch>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    let namespace = batch.namespace().unwrap_or_default();
    identity::release(&ctx, &namespace, batch.metadata.uid.as_deref()).await?;
    grants::sweep(&ctx).await?;
    let name = batch.name_any();
    ctx.caches.forget_batch(&batch, &cronjob_name(&name));
    let metrics = &ctx.metrics.controller;
    metrics.state.remove(&observed::batch_owner(&namespace, &name));
    metrics.session_duration.remove(&observed::batch_labels(&namespace, &name, None));
    for outcome in observed::SESSION_OUTCOMES {
        metrics.sessions.remove(&observed::batch_labels(&namespace, &name, Some(outcome)));
    }
    Ok(Action::await_change())
}

/// A built-in object with apiVersion and kind filled in, as server-side apply needs.
fn typed<K: Resource<DynamicType = ()> + serde::Serialize>(object: K) -> serde_json::Value {
    let mut value = serde_json::to_value(&object).unwrap_or_default();
    value["apiVersion"] = K::api_version(&()).into();
    value["kind"] = K::kind(&()).into();
    value
}

fn previous_member_conditions(batch: &BackupBatch, target: &TargetRef) -> Vec<crate::api::common::Condition> {
    batch
        .status
        .iter()
        .flat_map(|s| &s.member_conditions)
        .find(|m| &m.target == target)
        .map(|m| m.conditions.clone())
        .unwrap_or_default()
}

/// Sets a condition and publishes an Event when its status changed.
async fn record(
    ctx: &Context,
    batch: &BackupBatch,
    conditions: &mut Vec<crate::api::common::Condition>,
    desired: &Desired,
    generation: Option<i64>,
) {
    if let Some(previous) = conditions::set(conditions, desired, generation) {
        let first_and_fine = previous.is_none() && desired.is_true();
        if !first_and_fine || matches!(previous, Some(ConditionStatus::False)) {
            let type_ = if desired.is_true() { EventType::Normal } else { EventType::Warning };
            publish(ctx, batch, type_, &desired.reason, &desired.message).await;
        }
    }
}

async fn publish(ctx: &Context, batch: &BackupBatch, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.to_string()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &batch.object_ref(&())).await {
        tracing::debug!(error = %err, "publishing an Event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12: pod settings are honoured where a Pod of ours runs, and refused by name where
    /// they cannot be (a sidecar's Pod is the workload's; Jobs keep their identity and token).
    #[test]
    fn pod_settings_a_members_pods_cannot_honour_are_refused_by_name() {
        let batch = |members: serde_json::Value, runtime: serde_json::Value| -> BackupBatchSpec {
            serde_json::from_value(
                serde_json::json!({"repository": {"name": "r"}, "members": members, "runtimeSettings": runtime}),
            )
            .expect("a spec")
        };
        let pvc = |pod: serde_json::Value| {
            serde_json::json!([{"target": {"ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "d"}},
                "runtimeSettings": {"pod": pod}}])
        };
        let app = |pod: serde_json::Value| {
            serde_json::json!([{"target": {"ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "a"}},
                "runtimeSettings": {"pod": pod}}])
        };
        let none = serde_json::json!({});
        assert_eq!(runtime_refusal(&batch(pvc(serde_json::json!({"nodeSelector": {"a": "b"}})), none.clone())), None);
        assert_eq!(runtime_refusal(&batch(app(none.clone()), none.clone())), None, "an empty pod block says nothing");
        let trigger = serde_json::json!({"pod": {"serviceAccountName": "cron"}});
        assert_eq!(runtime_refusal(&batch(app(none.clone()), trigger)), None, "the trigger's own identity");
        let cases = [
            (
                batch(pvc(serde_json::json!({"serviceAccountName": "admin"})), none.clone()),
                "spec.members[0].runtimeSettings.pod.serviceAccountName",
            ),
            (
                batch(pvc(serde_json::json!({"automountServiceAccountToken": false})), none.clone()),
                "spec.members[0].runtimeSettings.pod.automountServiceAccountToken",
            ),
            (
                batch(app(serde_json::json!({"nodeSelector": {"a": "b"}})), none.clone()),
                "spec.members[0].runtimeSettings.pod ",
            ),
            (
                batch(app(none.clone()), serde_json::json!({"pod": {"serviceAccountAnnotations": {"k": "v"}}})),
                "spec.runtimeSettings.pod.serviceAccountAnnotations",
            ),
            // An executor takes the namespace it acts for from POD_NAMESPACE.
            (
                batch(
                    app(none.clone()),
                    serde_json::json!({"container": {"env": [{"name": "POD_NAMESPACE", "value": "b"}]}}),
                ),
                "spec.runtimeSettings.container.env[POD_NAMESPACE]",
            ),
        ];
        for (spec, field) in cases {
            let message = runtime_refusal(&spec).expect("refused");
            assert!(message.starts_with(field), "{message}");
        }
    }

    /// Member fields the member's backup would drop are refused by name instead of ignored.
    #[test]
    fn member_fields_a_backup_would_drop_are_refused_by_name() {
        let spec = |member: serde_json::Value| -> BackupBatchSpec {
            serde_json::from_value(serde_json::json!({"repository": {"name": "r"}, "members": [member]}))
                .expect("a spec")
        };
        let pvc = serde_json::json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "d"});
        let app = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": "a"});
        let db = serde_json::json!({"apiVersion": "v1", "kind": "Secret", "name": "pg"});
        let http = serde_json::json!({"preBackup": {"httpGet": {"host": "h", "port": 80}}});
        assert_eq!(dropped_member_field(&spec(serde_json::json!({"target": {"ref": app}, "hooks": http}))), None);
        assert_eq!(dropped_member_field(&spec(serde_json::json!({"target": {"ref": pvc, "paths": ["/d"]}}))), None);
        let cases = [
            (serde_json::json!({"target": {"ref": pvc}, "hooks": http}), "spec.members[0].hooks "),
            (serde_json::json!({"target": {"ref": db}, "hooks": http}), "spec.members[0].hooks "),
            (
                serde_json::json!({"target": {"ref": app}, "hooks": {"postBackup": {"exec": {"command": ["sync"]}}}}),
                "spec.members[0].hooks.postBackup.exec ",
            ),
            (serde_json::json!({"target": {"ref": db, "paths": ["/x"]}}), "spec.members[0].target.paths "),
            (serde_json::json!({"target": {"ref": db, "args": ["--compression=max"]}}), "spec.members[0].target.args "),
        ];
        for (member, field) in cases {
            let message = dropped_member_field(&spec(member)).expect("refused");
            assert!(message.starts_with(field), "{message}");
        }
    }

    #[test]
    fn the_trigger_is_withheld_while_invalid_or_while_the_repository_refuses_this_namespace() {
        let valid = Desired::new(VALIDATION_PASSED, true, "ValidationSucceeded", "");
        let invalid = Desired::new(VALIDATION_PASSED, false, "InvalidSchedule", "");
        let refused = || Refusal::NotAllowed { namespace: "b".into(), name: "r".into(), requester: "a".into() };
        let missing = || Refusal::NotFound { namespace: "a".into(), name: "r".into() };
        let reason = |validation: &Desired, repository: Result<Repository, Refusal>| {
            withheld_trigger(validation, &repository).map(|d| d.reason)
        };
        assert_eq!(reason(&invalid, Err(missing())).as_deref(), Some("ValidationFailed"));
        assert_eq!(reason(&valid, Err(refused())).as_deref(), Some("RepositoryNotAllowed"));
        // A Repository of its own namespace that is not there yet keeps the schedule (apply order).
        assert_eq!(reason(&valid, Err(missing())), None);
    }
}
