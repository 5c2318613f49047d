//! RestoreBatch: check the repository, start each member's restore Job (all at once, or one after
//! another for Sequential), aggregate the hosts' entries that `stash restore` writes, and finish —
//! Failed when a member fails, a Job dies before reporting, or `timeOut` passes.

use super::backup_job::{DATABASE_KIND, PVC_KIND, data_mounts, job_name};
use super::conditions::{self, Desired};
use super::context::{Context, ControllerError};
use super::executor_job::{DataVolume, ExecutorJob};
use super::identity;
use crate::api::RestoreBatch;
use crate::api::common::ExecutionOrder;
use crate::api::repository::Repository;
use crate::api::restore_batch::{
    HostRestoreStats, RestoreBatchStatus, RestoreMember, RestoreMemberPhase, RestoreMemberStatus, RestorePhase,
};
use crate::tenancy;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

pub const RESTORE_LABEL: &str = "stash.appscode.com/restore-batch";
const POLL: Duration = Duration::from_secs(30);

#[tracing::instrument(skip_all, fields(namespace = restore.namespace().unwrap_or_default(), name = restore.name_any()))]
pub async fn reconcile(restore: Arc<RestoreBatch>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    let namespace = restore.namespace().unwrap_or_default();
    let mut status = restore.status.clone().unwrap_or_default();
    if matches!(status.phase, Some(RestorePhase::Succeeded | RestorePhase::Failed | RestorePhase::Invalid)) {
        return Ok(Action::await_change());
    }
    let repository = match tenancy::fetch_repository(&ctx.client, &namespace, &restore.spec.repository).await? {
        Ok(repository) => repository,
        Err(refusal) => {
            let refused = Desired::new("RepositoryFound", false, refusal.reason(), refusal.to_string());
            conditions::set(&mut status.conditions, &refused, None);
            status.phase = Some(RestorePhase::Pending);
            write(&restore, &ctx, status).await?;
            return Ok(Action::requeue(POLL));
        }
    };
    // Restore Jobs run as the namespace's executor identity, also where no BackupBatch made it.
    identity::ensure(&ctx, &namespace).await?;
    conditions::set(&mut status.conditions, &Desired::new("RepositoryFound", true, "Found", "found"), None);
    if status.phase.is_none() || status.phase == Some(RestorePhase::Pending) {
        status.phase = Some(RestorePhase::Running);
    }
    let deadline = restore
        .spec
        .time_out
        .as_ref()
        .and_then(|t| t.parse().ok())
        .and_then(|t| k8s_openapi::jiff::SignedDuration::try_from(t).ok())
        .and_then(|t| restore.metadata.creation_timestamp.as_ref().and_then(|c| c.0.checked_add(t).ok()));

    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut previous_done = true;
    for (index, member) in restore.spec.members.iter().enumerate() {
        let entry = member_status(&mut status, member);
        let done = matches!(entry.phase, Some(RestoreMemberPhase::Succeeded | RestoreMemberPhase::Failed));
        if !done && (previous_done || restore.spec.execution_order == ExecutionOrder::Parallel) {
            let job = restore_job(&restore, index, member, &repository, &ctx.trigger_image);
            let name = job.name_any();
            let existing = match jobs.get_opt(&name).await? {
                Some(existing) => existing,
                None => jobs.create(&PostParams::default(), &job).await?,
            };
            entry.phase = Some(RestoreMemberPhase::Running);
            if super::backup_session::job_failed(&existing) && entry.stats.is_empty() {
                entry.stats.push(HostRestoreStats {
                    hostname: member.target.alias.clone(),
                    phase: Some(RestoreMemberPhase::Failed),
                    duration: None,
                    error: Some(format!("restore Job {name} failed before reporting")),
                });
            }
        }
        let total = usize::try_from(entry.total_hosts.unwrap_or(1)).unwrap_or(1);
        if entry.stats.len() >= total {
            let failed = entry.stats.iter().any(|s| s.phase != Some(RestoreMemberPhase::Succeeded));
            entry.phase = Some(if failed { RestoreMemberPhase::Failed } else { RestoreMemberPhase::Succeeded });
        }
        previous_done = matches!(entry.phase, Some(RestoreMemberPhase::Succeeded | RestoreMemberPhase::Failed));
    }

    let all_done = status
        .members
        .iter()
        .all(|m| matches!(m.phase, Some(RestoreMemberPhase::Succeeded | RestoreMemberPhase::Failed)));
    let any_failed = status.members.iter().any(|m| m.phase == Some(RestoreMemberPhase::Failed));
    let now = Timestamp::now();
    let action = if all_done {
        status.phase = Some(if any_failed { RestorePhase::Failed } else { RestorePhase::Succeeded });
        Action::await_change()
    } else if deadline.is_some_and(|d| now >= d) {
        let message = "the restore did not finish before spec.timeOut".to_string();
        conditions::set(&mut status.conditions, &Desired::new("DeadlineExceeded", true, "TimeOut", message), None);
        status.phase = Some(RestorePhase::Failed);
        Action::await_change()
    } else {
        Action::requeue(POLL)
    };
    if matches!(status.phase, Some(RestorePhase::Succeeded | RestorePhase::Failed)) {
        let started = restore.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0);
        status.session_duration = Some(format!("{}s", now.duration_since(started).as_secs().max(0)));
    }
    let phase_changed = restore.status.as_ref().and_then(|s| s.phase) != status.phase;
    if write(&restore, &ctx, status.clone()).await? && phase_changed {
        let warning = status.phase == Some(RestorePhase::Failed);
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: format!("Restore{:?}", status.phase.unwrap_or(RestorePhase::Unknown)),
            note: Some(format!("restore is {:?}", status.phase.unwrap_or(RestorePhase::Unknown))),
            action: "Restore".into(),
            secondary: None,
        };
        let _ = ctx.recorder.publish(&event, &restore.object_ref(&())).await;
    }
    Ok(action)
}

/// The restore is being deleted: its Jobs go by garbage collection, the namespace's identities with
/// its last batch or restore.
pub async fn cleanup(restore: Arc<RestoreBatch>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    identity::release(&ctx, &restore.namespace().unwrap_or_default(), restore.metadata.uid.as_deref()).await?;
    Ok(Action::await_change())
}

fn member_status<'a>(status: &'a mut RestoreBatchStatus, member: &RestoreMember) -> &'a mut RestoreMemberStatus {
    let reference = &member.target.reference;
    let position =
        status.members.iter().position(|m| m.reference.kind == reference.kind && m.reference.name == reference.name);
    let index = position.unwrap_or_else(|| {
        status.members.push(RestoreMemberStatus {
            reference: reference.clone(),
            phase: Some(RestoreMemberPhase::Pending),
            total_hosts: Some(member.target.replicas.unwrap_or(1).max(1)),
            stats: Vec::new(),
        });
        status.members.len() - 1
    });
    &mut status.members[index]
}

/// Writes `status` (guarded by the resourceVersion read); false when a host wrote first.
async fn write(restore: &RestoreBatch, ctx: &Context, status: RestoreBatchStatus) -> Result<bool, ControllerError> {
    if restore.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let api: Api<RestoreBatch> = Api::namespaced(ctx.client.clone(), &restore.namespace().unwrap_or_default());
    let mut updated = restore.clone();
    updated.status = Some(status);
    match api.replace_status(&restore.name_any(), &PostParams::default(), &updated).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// The Job restoring member `index`: a PVC is mounted writable where the member says (default
/// /stash-data), a database's connection Secret as files. Workload members restore into the
/// volumes named by their volumeMounts when those are PVCs of the same name.
fn restore_job(
    restore: &RestoreBatch,
    index: usize,
    member: &RestoreMember,
    repository: &Repository,
    image: &str,
) -> Job {
    let target = &member.target.reference;
    let mounts = data_mounts(&member.target.volume_mounts);
    let data = match target.kind.as_str() {
        PVC_KIND => Some(DataVolume { claim: target.name.clone(), mounts, read_only: false }),
        DATABASE_KIND => None,
        _ => member.target.volume_mounts.first().map(|m| DataVolume {
            claim: m.name.clone(),
            mounts: member.target.volume_mounts.clone(),
            read_only: false,
        }),
    };
    let mut labels = crate::session::invoker_labels(&restore.name_any());
    labels.retain(|k, _| k == crate::api::PART_OF.0);
    labels.insert(RESTORE_LABEL.into(), crate::names::label_value(&restore.name_any()));
    ExecutorJob {
        name: job_name(&restore.name_any(), &format!("restore-{index}")),
        namespace: restore.namespace().unwrap_or_default(),
        owner: restore.controller_owner_ref(&()),
        labels,
        args: vec![
            "restore".into(),
            format!("--restore-batch={}", restore.name_any()),
            format!("--target-kind={}", target.kind),
            format!("--target-name={}", target.name),
        ],
        image,
        repository,
        runtime: member.runtime_settings.as_ref().and_then(|r| r.container.as_ref()),
        temp_dir: member.temp_dir.as_ref(),
        data,
        database_secret: (target.kind == DATABASE_KIND).then(|| target.name.clone()),
        deadline_seconds: None,
    }
    .build()
}
