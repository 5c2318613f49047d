//! RestoreBatch: check the repository, start each member's restore Job (all at once, or one after
//! another for Sequential), aggregate the hosts' entries that `stash restore` writes, and finish —
//! Failed when a member fails, a Job dies before reporting, or `timeOut` passes.

use super::app_binding;
use super::backup_job::job_name;
use super::context::{Context, ControllerError};
use super::executor_job::{DataVolume, DatabaseSource, ExecutorJob};
use super::grants;
use super::identity;
use super::observed;
use crate::api::RestoreBatch;
use crate::api::backup_batch::Driver;
use crate::api::common::{ExecutionOrder, TargetRef};
use crate::api::repository::Repository;
use crate::api::restore_batch::{
    HostRestoreStats, RestoreBatchSpec, RestoreBatchStatus, RestoreHooks, RestoreMember, RestoreMemberPhase,
    RestoreMemberStatus, RestorePhase,
};
use crate::conditions::{self, Desired};
use crate::executor_pod::{
    ENV_REFUSED_WHY, PVC_KIND, RESTORE_HOST_ENV, RESTORE_ROOT, data_mounts, database_task_refusal, env_refusal,
    is_database, rule_for,
};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    EnvVar, PodSecurityContext, PodTemplateSpec, ReplicationController, Volume, VolumeMount,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Client, Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

pub const RESTORE_LABEL: &str = "stash.appscode.com/restore-batch";
const POLL: Duration = Duration::from_secs(30);

#[tracing::instrument(skip_all, fields(namespace = restore.namespace().unwrap_or_default(), name = restore.name_any()))]
pub async fn reconcile(restore: Arc<RestoreBatch>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    let namespace = restore.namespace().unwrap_or_default();
    export_series(&ctx);
    let mut status = restore.status.clone().unwrap_or_default();
    if matches!(status.phase, Some(RestorePhase::Succeeded | RestorePhase::Failed | RestorePhase::Invalid)) {
        return Ok(Action::await_change());
    }
    let repository = match ctx.repository(&namespace, &restore.spec.repository).await? {
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
    grants::ensure(&ctx, &namespace, &repository).await?;
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

    let mut plans = Vec::new();
    let mut databases = Vec::new();
    let refusal = unsupported(&restore.spec);
    for (index, member) in restore.spec.members.iter().enumerate().take_while(|_| refusal.is_none()) {
        let reference = &member.target.reference;
        let template = pod_template(&ctx.client, &namespace, reference).await?;
        let workload =
            matches!(reference.kind.as_str(), "Deployment" | "StatefulSet" | "ReplicaSet" | "ReplicationController");
        if workload && template.is_none() {
            // Perhaps not created yet (restoring into an empty cluster): wait for it.
            let message = format!("{} {} does not exist yet", reference.kind, reference.name);
            conditions::set(&mut status.conditions, &Desired::new("TargetFound", false, "NotFound", message), None);
            write(&restore, &ctx, status).await?;
            return Ok(Action::requeue(POLL));
        }
        let plan = plan_member(index, &namespace, member, template.as_ref());
        // Read only once the plan passed the namespace check, and always in the restore's own namespace.
        let task = member.task.as_ref().map(|t| t.name.as_str());
        let database = match &plan {
            Ok(_) => app_binding::database_source(&ctx.client, &namespace, reference, task).await?,
            Err(_) => Ok(None),
        };
        match database {
            Ok(database) => databases.push(database),
            Err(problem) => {
                // Perhaps not created yet (KubeDB makes it with the database): wait for it.
                let waiting = Desired::new("TargetFound", false, problem.reason(), problem.to_string());
                conditions::set(&mut status.conditions, &waiting, None);
                write(&restore, &ctx, status).await?;
                return Ok(Action::requeue(POLL));
            }
        }
        plans.push(plan);
    }
    if let Some(refusal) = refusal.or_else(|| plans.iter().find_map(|p| p.as_ref().err().cloned())) {
        let refused = Desired::new("MembersValid", false, refusal.reason(), refusal.to_string());
        conditions::set(&mut status.conditions, &refused, None);
        status.phase = Some(RestorePhase::Invalid);
        write(&restore, &ctx, status).await?;
        return Ok(Action::await_change());
    }
    conditions::set(&mut status.conditions, &Desired::new("TargetFound", true, "Found", "found"), None);

    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut previous_done = true;
    let members = restore.spec.members.iter().enumerate().zip(databases);
    for (((index, member), database), plan) in members.zip(plans.into_iter().flatten()) {
        let entry = member_status(&mut status, member, &plan);
        let done = matches!(entry.phase, Some(RestoreMemberPhase::Succeeded | RestoreMemberPhase::Failed));
        if !done && (previous_done || restore.spec.execution_order == ExecutionOrder::Parallel) {
            entry.phase = Some(RestoreMemberPhase::Running);
            for host in &plan {
                let job =
                    restore_job(&restore, (index, member), host, &repository, database.clone(), &ctx.trigger_image);
                let name = job.name_any();
                let existing = match jobs.get_opt(&name).await? {
                    Some(existing) => existing,
                    None => jobs.create(&PostParams::default(), &job).await?,
                };
                let reported = entry.stats.iter().any(|s| s.hostname == host.host);
                if super::backup_session::job_failed(&existing) && !reported {
                    entry.stats.push(HostRestoreStats {
                        hostname: host.host.clone(),
                        phase: Some(RestoreMemberPhase::Failed),
                        duration: None,
                        error: Some(format!("restore Job {name} failed before reporting (or passed its deadline)")),
                    });
                }
            }
        }
        // Finished once every host of the plan reported, not merely as many entries.
        if plan.iter().all(|h| entry.stats.iter().any(|s| s.hostname == h.host)) {
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
/// its last batch or restore, a grant with the last one using it.
pub async fn cleanup(restore: Arc<RestoreBatch>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    identity::release(&ctx, &restore.namespace().unwrap_or_default(), restore.metadata.uid.as_deref()).await?;
    grants::sweep(&ctx).await?;
    export_series(&ctx);
    Ok(Action::await_change())
}

/// Exports the RestoreBatch series from the restore controller's cache (every restore's, since the
/// by-phase counts span them all). A restore's own phase change comes back as a watch event and a
/// reconcile, which exports it.
fn export_series(ctx: &Context) {
    ctx.metrics.controller.state.export(observed::RESTORES_OWNER, observed::restore_series(&ctx.restores.state()));
}

fn member_status<'a>(
    status: &'a mut RestoreBatchStatus,
    member: &RestoreMember,
    plan: &[HostPlan],
) -> &'a mut RestoreMemberStatus {
    let reference = &member.target.reference;
    let position =
        status.members.iter().position(|m| m.reference.kind == reference.kind && m.reference.name == reference.name);
    let index = position.unwrap_or_else(|| {
        status.members.push(RestoreMemberStatus {
            reference: reference.clone(),
            phase: Some(RestoreMemberPhase::Pending),
            total_hosts: Some(i32::try_from(plan.len()).unwrap_or(i32::MAX)),
            stats: Vec::new(),
            conditions: Vec::new(),
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

/// A restore Job without `spec.timeOut` still ends: a claim that never binds fails the host.
const DEFAULT_RESTORE_DEADLINE: Duration = Duration::from_secs(6 * 3600);

/// Why a member is refused before any of its data is touched.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("{field} is not supported by restores ({why}); remove it")]
    Unsupported { field: String, why: &'static str },
    #[error("{member}: target.ref.namespace {namespace}: a restore writes only into its own namespace")]
    OtherNamespace { member: String, namespace: String },
    #[error("{member}: {kind} members cannot be restored (their hosts are nodes, not claims)")]
    UnsupportedKind { member: String, kind: String },
    #[error("{member}: a workload member needs volumeMounts naming the volumes of its pod template to restore into")]
    NoMounts { member: String },
    #[error("{member}: volumeMount {volume:?} at {path} names no volume of the pod template")]
    UnknownVolume { member: String, volume: String, path: String },
    #[error("{member}: volumeMount {volume:?} at {path} is a {kind} volume, not a PersistentVolumeClaim")]
    NotAClaim { member: String, volume: String, path: String, kind: String },
    #[error("{member}: no host matches the rules' targetHosts")]
    NoHosts { member: String },
    #[error("{0}")]
    TaskNotSupported(String),
}

impl Refusal {
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Refusal::Unsupported { .. } => "UnsupportedField",
            Refusal::OtherNamespace { .. } => "OtherNamespace",
            Refusal::UnsupportedKind { .. } => "UnsupportedKind",
            Refusal::NoMounts { .. } | Refusal::UnknownVolume { .. } | Refusal::NotAClaim { .. } => "VolumeNotAClaim",
            Refusal::NoHosts { .. } => "NoTargetHosts",
            Refusal::TaskNotSupported(_) => "TaskNotSupported",
        }
    }
}

/// What restoring a workload needs to know of it: its pod template's volumes and, for a
/// StatefulSet, its claim templates and replicas.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PodTemplate {
    pub(crate) volumes: Vec<Volume>,
    pub(crate) claim_templates: Vec<String>,
    pub(crate) replicas: i32,
    /// The Pods' own: their user owns the files a restore rewrites in place.
    pub(crate) security_context: Option<PodSecurityContext>,
}

/// One restore Job of a member: the host it restores, the StatefulSet ordinal it stands for, and
/// the claims it writes, each at its own mountPaths.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HostPlan {
    pub(crate) host: String,
    pub(crate) ordinal: Option<i32>,
    pub(crate) data: Vec<DataVolume>,
    /// The workload's pod securityContext, for the Job unless the member's settings give one.
    pub(crate) security_context: Option<PodSecurityContext>,
}

/// Fields of the spec that restores do not carry out: refused, never silently ignored.
pub(crate) fn unsupported(spec: &RestoreBatchSpec) -> Option<Refusal> {
    let refuse = |field: String, why| Some(Refusal::Unsupported { field, why });
    let hooks = |prefix: &str, hooks: Option<&RestoreHooks>| {
        let hooks = hooks?;
        let field = if hooks.pre_restore.is_some() { "preRestore" } else { "postRestore" };
        (hooks.pre_restore.is_some() || hooks.post_restore.is_some()).then(|| format!("{prefix}.hooks.{field}"))
    };
    if spec.driver != Driver::Restic {
        return refuse("spec.driver".into(), "only Restic restores exist");
    }
    let pod = spec.runtime_settings.as_deref().and_then(|r| r.pod.as_ref());
    if let Some((field, why)) = pod.and_then(|p| p.refused_in_jobs()) {
        return refuse(format!("spec.runtimeSettings.{field}"), why);
    }
    if let Some(field) = env_refusal(spec.runtime_settings.as_deref().and_then(|r| r.container.as_ref())) {
        return refuse(format!("spec.runtimeSettings.{field}"), ENV_REFUSED_WHY);
    }
    if let Some(field) = hooks("spec", spec.hooks.as_deref()) {
        return refuse(field, "nothing would stop the application while its volumes are rewritten");
    }
    for (index, member) in spec.members.iter().enumerate() {
        let prefix = format!("spec.members[{index}]");
        if let Some(field) = hooks(&prefix, member.hooks.as_deref()) {
            return refuse(field, "nothing would stop the application while its volumes are rewritten");
        }
        if !member.target.args.is_empty() {
            return refuse(format!("{prefix}.target.args"), "restic flags are not passed through");
        }
        if member.interim_volume_template.is_some() {
            return refuse(format!("{prefix}.interimVolumeTemplate"), "data is restored in place");
        }
        if member.task.as_ref().is_some_and(|t| !t.params.is_empty()) {
            return refuse(format!("{prefix}.task.params"), "the task name picks the client and its options are fixed");
        }
        let task = member.task.as_ref().map(|t| t.name.as_str());
        if let Some(why) = database_task_refusal(index, &member.target.reference.kind, task) {
            return Some(Refusal::TaskNotSupported(why));
        }
        let pod = member.runtime_settings.as_deref().and_then(|r| r.pod.as_ref());
        if let Some((field, why)) = pod.and_then(|p| p.refused_in_jobs()) {
            return refuse(format!("{prefix}.runtimeSettings.{field}"), why);
        }
        if let Some(field) = env_refusal(member.runtime_settings.as_deref().and_then(|r| r.container.as_ref())) {
            return refuse(format!("{prefix}.runtimeSettings.{field}"), ENV_REFUSED_WHY);
        }
        if !member.target.volume_claim_templates.is_empty() {
            return refuse(
                format!("{prefix}.target.volumeClaimTemplates"),
                "restores do not create claims yet; create them, then restore into them",
            );
        }
        for (r, rule) in member.target.rules.iter().enumerate() {
            if rule.snapshots.len() > 1 && rule.snapshots.iter().any(|s| s == "latest") {
                return refuse(format!("{prefix}.target.rules[{r}].snapshots"), "`latest` or snapshot ids, not both");
            }
            for (field, patterns) in [("paths", &rule.paths), ("include", &rule.include), ("exclude", &rule.exclude)] {
                if patterns.iter().any(|p| p.trim().is_empty()) {
                    return refuse(format!("{prefix}.target.rules[{r}].{field}"), "an empty pattern names no path");
                }
            }
            let filters = !(rule.paths.is_empty() && rule.include.is_empty() && rule.exclude.is_empty());
            if is_database(&member.target.reference.kind) && filters {
                return refuse(format!("{prefix}.target.rules[{r}]"), "a database dump is replayed whole");
            }
        }
    }
    None
}

/// The Jobs restoring member `index` (in `namespace`): a PVC or a database is one host; a workload
/// has one host per Pod identity (StatefulSet ordinals), each writing the claims its Pod mounts —
/// the pod template's `persistentVolumeClaim` volumes, or its claim templates
/// (`<template>-<statefulset>-<ordinal>`). Any other volume is refused, never guessed.
pub(crate) fn plan_member(
    index: usize,
    namespace: &str,
    member: &RestoreMember,
    template: Option<&PodTemplate>,
) -> Result<Vec<HostPlan>, Refusal> {
    let target = &member.target;
    let reference = &target.reference;
    let name = format!("spec.members[{index}] ({} {})", reference.kind, reference.name);
    if let Some(other) = reference.namespace.as_deref().filter(|n| *n != namespace) {
        return Err(Refusal::OtherNamespace { member: name, namespace: other.into() });
    }
    let alias = if target.alias.is_empty() { reference.name.clone() } else { target.alias.clone() };
    let one = |data| Ok(vec![HostPlan { host: alias.clone(), ordinal: None, data, security_context: None }]);
    let template = match (reference.kind.as_str(), template) {
        (kind, _) if is_database(kind) => return one(Vec::new()),
        (PVC_KIND, _) => {
            let mounts = data_mounts(&target.volume_mounts);
            return one(vec![DataVolume { claim: reference.name.clone(), mounts, read_only: false }]);
        }
        ("DaemonSet", _) | (_, None) => {
            return Err(Refusal::UnsupportedKind { member: name, kind: reference.kind.clone() });
        }
        (_, Some(template)) => template,
    };
    if target.volume_mounts.is_empty() {
        return Err(Refusal::NoMounts { member: name });
    }
    let stateful = reference.kind == "StatefulSet";
    let ordinals: Vec<Option<i32>> =
        if stateful { (0..target.replicas.unwrap_or(template.replicas)).map(Some).collect() } else { vec![None] };
    let mut plans = Vec::new();
    for ordinal in ordinals {
        let host = ordinal.map_or_else(|| alias.clone(), |o| format!("{alias}-{o}"));
        if !target.rules.is_empty() && rule_for(&host, &target.rules).is_none() {
            continue;
        }
        let mut data: Vec<DataVolume> = Vec::new();
        for mount in &target.volume_mounts {
            let claim = claim_of(&name, template, &reference.name, ordinal, mount)?;
            match data.iter_mut().find(|d| d.claim == claim) {
                Some(existing) => existing.mounts.push(mount.clone()),
                None => data.push(DataVolume { claim, mounts: vec![mount.clone()], read_only: false }),
            }
        }
        plans.push(HostPlan { host, ordinal, data, security_context: template.security_context.clone() });
    }
    if plans.is_empty() {
        return Err(Refusal::NoHosts { member: name });
    }
    Ok(plans)
}

/// The claim behind `mount` in the Pod of `ordinal` (None: not a StatefulSet).
fn claim_of(
    member: &str,
    template: &PodTemplate,
    workload: &str,
    ordinal: Option<i32>,
    mount: &VolumeMount,
) -> Result<String, Refusal> {
    // A claim template wins over a same-named pod volume, as in the StatefulSet controller.
    if let Some(ordinal) = ordinal.filter(|_| template.claim_templates.contains(&mount.name)) {
        return Ok(format!("{}-{workload}-{ordinal}", mount.name));
    }
    let (volume, path) = (mount.name.clone(), mount.mount_path.clone());
    match template.volumes.iter().find(|v| v.name == mount.name) {
        Some(found) => match &found.persistent_volume_claim {
            Some(pvc) => Ok(pvc.claim_name.clone()),
            None => Err(Refusal::NotAClaim { member: member.into(), volume, path, kind: volume_source(found) }),
        },
        None => Err(Refusal::UnknownVolume { member: member.into(), volume, path }),
    }
}

/// The kind of a volume's source (`emptyDir`, `configMap`…), as its manifest spells it.
fn volume_source(volume: &Volume) -> String {
    let json = serde_json::to_value(volume).unwrap_or_default();
    let source = json.as_object().and_then(|o| o.keys().find(|k| *k != "name").cloned());
    source.unwrap_or_else(|| "non-claim".into())
}

/// The pod template of a workload member (None: not found); PVC and database members have none.
async fn pod_template(
    client: &Client,
    namespace: &str,
    target: &TargetRef,
) -> Result<Option<PodTemplate>, kube::Error> {
    fn of(spec: Option<&PodTemplateSpec>, claims: Vec<String>, replicas: Option<i32>) -> PodTemplate {
        let pod = spec.and_then(|t| t.spec.as_ref());
        let volumes = pod.and_then(|s| s.volumes.clone()).unwrap_or_default();
        let security_context = pod.and_then(|s| s.security_context.clone());
        PodTemplate { volumes, claim_templates: claims, replicas: replicas.unwrap_or(1), security_context }
    }
    let name = target.name.as_str();
    Ok(match target.kind.as_str() {
        "Deployment" => Api::<Deployment>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await?
            .map(|d| d.spec.map(|s| of(Some(&s.template), Vec::new(), s.replicas)).unwrap_or_default()),
        "StatefulSet" => Api::<StatefulSet>::namespaced(client.clone(), namespace).get_opt(name).await?.map(|s| {
            let spec = s.spec.unwrap_or_default();
            let claims = spec.volume_claim_templates.iter().flatten().filter_map(|c| c.metadata.name.clone()).collect();
            of(Some(&spec.template), claims, spec.replicas)
        }),
        "ReplicaSet" => Api::<ReplicaSet>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await?
            .map(|r| r.spec.map(|s| of(s.template.as_ref(), Vec::new(), s.replicas)).unwrap_or_default()),
        "ReplicationController" => Api::<ReplicationController>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await?
            .map(|r| r.spec.map(|s| of(s.template.as_ref(), Vec::new(), s.replicas)).unwrap_or_default()),
        _ => None,
    })
}

/// The Job restoring host `plan` of member `index`: its claims mounted writable where the member
/// says, a database's connection (`database`) as files, and a deadline.
fn restore_job(
    restore: &RestoreBatch,
    (index, member): (usize, &RestoreMember),
    plan: &HostPlan,
    repository: &Repository,
    database: Option<DatabaseSource>,
    image: &str,
) -> Job {
    let target = &member.target.reference;
    let mut labels = crate::session::invoker_labels(&restore.name_any());
    labels.retain(|k, _| k == crate::api::PART_OF.0);
    labels.insert(RESTORE_LABEL.into(), crate::names::label_value(&restore.name_any()));
    let suffix = plan.ordinal.map_or_else(|| format!("restore-{index}"), |o| format!("restore-{index}-{o}"));
    let deadline = restore.spec.time_out.as_ref().and_then(|t| t.parse().ok()).unwrap_or(DEFAULT_RESTORE_DEADLINE);
    // A RestoreBatch has no Pod of its own: its settings are its members' default.
    let runtime = member.runtime_settings.as_deref().or(restore.spec.runtime_settings.as_deref());
    let mut job = ExecutorJob {
        name: job_name(&restore.name_any(), &suffix),
        namespace: restore.namespace().unwrap_or_default(),
        owner: restore.controller_owner_ref(&()),
        labels,
        args: vec![
            "restore".into(),
            format!("--restore-batch={}", restore.name_any()),
            format!("--target-kind={}", target.kind),
            format!("--target-name={}", target.name),
            format!("--path-root={RESTORE_ROOT}"),
        ],
        image,
        repository: Some(repository),
        runtime,
        temp_dir: member.temp_dir.as_ref(),
        data: plan.data.iter().map(under_restore_root).collect(),
        database,
        deadline_seconds: Some(i64::try_from(deadline.as_secs()).unwrap_or(i64::MAX)),
    }
    .build();
    // Last, so that it wins over a same-named variable of the member's runtime settings.
    let host = EnvVar { name: RESTORE_HOST_ENV.into(), value: Some(plan.host.clone()), ..Default::default() };
    if let Some(pod) = job.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        if pod.security_context.is_none() {
            pod.security_context.clone_from(&plan.security_context);
        }
        let root = Volume { name: "restore-root".into(), empty_dir: Some(Default::default()), ..Default::default() };
        pod.volumes.get_or_insert_with(Vec::new).push(root);
        if let Some(container) = pod.containers.first_mut() {
            container.env.get_or_insert_with(Vec::new).push(host);
            let root =
                VolumeMount { name: "restore-root".into(), mount_path: RESTORE_ROOT.into(), ..Default::default() };
            container.volume_mounts.get_or_insert_with(Vec::new).insert(0, root);
        }
    }
    job
}

/// `data` with its mountPaths below RESTORE_ROOT, where the restore writes.
fn under_restore_root(data: &DataVolume) -> DataVolume {
    let mounts =
        data.mounts.iter().map(|m| VolumeMount { mount_path: format!("{RESTORE_ROOT}{}", m.mount_path), ..m.clone() });
    DataVolume { mounts: mounts.collect(), ..data.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn member(value: serde_json::Value) -> RestoreMember {
        serde_json::from_value(value).expect("a member")
    }

    fn volumes(value: serde_json::Value) -> Vec<Volume> {
        serde_json::from_value(value).expect("volumes")
    }

    /// (host, [(claim, [mountPath])]) of one planned Job.
    type Planned = (String, Vec<(String, Vec<String>)>);

    fn summary(plans: &[HostPlan]) -> Vec<Planned> {
        let claims = |p: &HostPlan| {
            p.data.iter().map(|d| (d.claim.clone(), d.mounts.iter().map(|m| m.mount_path.clone()).collect())).collect()
        };
        plans.iter().map(|p| (p.host.clone(), claims(p))).collect()
    }

    fn owned(host: &str, claims: &[(&str, &[&str])]) -> Planned {
        let claims = claims.iter().map(|(c, paths)| (c.to_string(), paths.iter().map(|p| p.to_string()).collect()));
        (host.to_string(), claims.collect())
    }

    #[test]
    fn a_deployment_restores_each_pvc_volume_at_its_own_path() {
        let web = member(
            json!({"target": {"alias": "web", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "volumeMounts": [{"name": "html", "mountPath": "/var/www/html"}, {"name": "uploads", "mountPath": "/var/www/uploads"}]}}),
        );
        let template = PodTemplate {
            volumes: volumes(json!([{"name": "html", "persistentVolumeClaim": {"claimName": "web-html"}},
                                     {"name": "uploads", "persistentVolumeClaim": {"claimName": "web-uploads"}}])),
            claim_templates: Vec::new(),
            replicas: 3,
            security_context: Some(PodSecurityContext {
                run_as_user: Some(33),
                fs_group: Some(33),
                ..Default::default()
            }),
        };
        let plans = plan_member(0, "ns", &web, Some(&template)).expect("a plan");
        let user = plans[0].security_context.as_ref().and_then(|c| c.run_as_user);
        assert_eq!(user, Some(33), "the Job writes as the application's Pods do");
        assert_eq!(
            summary(&plans),
            [owned("web", &[("web-html", &["/var/www/html"]), ("web-uploads", &["/var/www/uploads"])])]
        );
        assert_eq!(plans[0].ordinal, None, "a Deployment is one host whatever its replicas");
    }

    #[test]
    fn a_volume_name_resolves_to_its_claim_never_a_same_named_pvc() {
        let app = member(json!({"target": {"ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"},
            "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "data", "mountPath": "/logs", "subPath": "logs"}]}}));
        let template = PodTemplate {
            volumes: volumes(json!([{"name": "data", "persistentVolumeClaim": {"claimName": "app-storage"}}])),
            ..Default::default()
        };
        let plans = plan_member(0, "ns", &app, Some(&template)).expect("a plan");
        assert_eq!(summary(&plans), [owned("app", &[("app-storage", &["/data", "/logs"])])], "one volume per claim");
    }

    #[test]
    fn a_statefulset_restores_each_ordinal_into_its_own_claims() {
        let db = member(
            json!({"target": {"alias": "db", "ref": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db"},
            "volumeMounts": [{"name": "data", "mountPath": "/var/lib/db"}, {"name": "shared", "mountPath": "/shared"}]}}),
        );
        let template = PodTemplate {
            volumes: volumes(json!([{"name": "shared", "persistentVolumeClaim": {"claimName": "db-shared"}}])),
            claim_templates: vec!["data".into()],
            replicas: 2,
            security_context: None,
        };
        let plans = plan_member(0, "ns", &db, Some(&template)).expect("a plan");
        assert_eq!(
            summary(&plans),
            [
                owned("db-0", &[("data-db-0", &["/var/lib/db"]), ("db-shared", &["/shared"])]),
                owned("db-1", &[("data-db-1", &["/var/lib/db"]), ("db-shared", &["/shared"])]),
            ]
        );
        assert_eq!(plans.iter().map(|p| p.ordinal).collect::<Vec<_>>(), [Some(0), Some(1)]);

        let only_one = member(
            json!({"target": {"alias": "db", "ref": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db"},
            "volumeMounts": [{"name": "data", "mountPath": "/var/lib/db"}],
            "rules": [{"sourceHost": "db-0", "targetHosts": ["db-1"]}]}}),
        );
        let plans = plan_member(0, "ns", &only_one, Some(&template)).expect("a plan");
        assert_eq!(
            summary(&plans),
            [owned("db-1", &[("data-db-1", &["/var/lib/db"])])],
            "targetHosts choose the hosts"
        );
        assert_eq!(rule_for("db-1", &only_one.target.rules).and_then(|r| r.source_host.as_deref()), Some("db-0"));
    }

    #[test]
    fn non_claim_and_unknown_volumes_are_refused() {
        let app = |name: &str| {
            member(json!({"target": {"ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"},
                "volumeMounts": [{"name": name, "mountPath": "/x"}]}}))
        };
        let template = PodTemplate {
            volumes: volumes(json!([{"name": "cache", "emptyDir": {}}, {"name": "conf", "configMap": {"name": "c"}}])),
            ..Default::default()
        };
        let refused = plan_member(2, "ns", &app("cache"), Some(&template)).expect_err("emptyDir");
        assert_eq!(refused.reason(), "VolumeNotAClaim");
        assert!(
            refused.to_string().contains("spec.members[2]") && refused.to_string().contains("emptyDir"),
            "{refused}"
        );
        let refused = plan_member(0, "ns", &app("conf"), Some(&template)).expect_err("configMap");
        assert!(refused.to_string().contains("configMap"), "{refused}");
        let refused = plan_member(0, "ns", &app("data"), Some(&template)).expect_err("no such volume");
        assert!(matches!(refused, Refusal::UnknownVolume { .. }), "{refused}");
        let no_mounts =
            member(json!({"target": {"ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"}}}));
        assert!(matches!(plan_member(0, "ns", &no_mounts, Some(&template)), Err(Refusal::NoMounts { .. })));
        let elsewhere = member(
            json!({"target": {"ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "d", "namespace": "other"}}}),
        );
        assert!(matches!(plan_member(0, "ns", &elsewhere, None), Err(Refusal::OtherNamespace { .. })));
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        let spec = |member: serde_json::Value| -> RestoreBatchSpec {
            serde_json::from_value(json!({"repository": {"name": "repo"}, "members": [member]})).expect("a spec")
        };
        let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "d"});
        assert_eq!(unsupported(&spec(json!({"target": {"ref": pvc}}))), None);
        // A hook naming no action runs nothing, as in Stash: nothing to refuse.
        let no_action = json!({"target": {"ref": pvc}, "hooks": {"postRestore": {"executionPolicy": "Always"}}});
        assert_eq!(unsupported(&spec(no_action)), None);
        let cases = [
            (
                json!({"target": {"ref": pvc}, "hooks": {"preRestore": {"exec": {"command": ["true"]}}}}),
                "spec.members[0].hooks.preRestore",
            ),
            (
                json!({"target": {"ref": pvc}, "hooks": {"postRestore": {"exec": {"command": ["true"]}}}}),
                "spec.members[0].hooks.postRestore",
            ),
            (json!({"target": {"ref": pvc, "args": ["--no-lock"]}}), "spec.members[0].target.args"),
            (
                json!({"target": {"ref": pvc, "volumeClaimTemplates": [{"metadata": {"name": "data"}}]}}),
                "spec.members[0].target.volumeClaimTemplates",
            ),
            (
                json!({"target": {"ref": pvc}, "hooks": {"postRestore": {"httpGet": {"port": 80}, "executionPolicy": "OnSuccess"}}}),
                "spec.members[0].hooks.postRestore",
            ),
            (
                json!({"target": {"ref": pvc, "rules": [{"snapshots": ["latest", "b"]}]}}),
                "spec.members[0].target.rules[0].snapshots",
            ),
            // restic excludes nothing for an empty pattern: a rule that means something else is refused.
            (
                json!({"target": {"ref": pvc, "rules": [{"exclude": ["/a", ""]}]}}),
                "spec.members[0].target.rules[0].exclude",
            ),
            (json!({"target": {"ref": pvc, "rules": [{"paths": [" "]}]}}), "spec.members[0].target.rules[0].paths"),
            (
                json!({"target": {"ref": pvc}, "runtimeSettings": {"pod": {"serviceAccountName": "admin"}}}),
                "spec.members[0].runtimeSettings.pod.serviceAccountName",
            ),
            (
                json!({"target": {"ref": pvc}, "runtimeSettings": {"container": {"env": [{"name": "POD_NAMESPACE", "value": "b"}]}}}),
                "spec.members[0].runtimeSettings.container.env[POD_NAMESPACE]",
            ),
            (
                json!({"target": {"ref": pvc}, "task": {"name": "pvc-restore", "params": [{"name": "a", "value": "b"}]}}),
                "spec.members[0].task.params",
            ),
        ];
        for (member, field) in cases {
            let refused = unsupported(&spec(member)).expect("refused");
            assert_eq!(refused.reason(), "UnsupportedField");
            assert!(refused.to_string().starts_with(field), "{refused}");
        }
        // A dump of an engine the image has no client for is refused, never fed to psql.
        let mongo = json!({"target": {"ref": {"apiVersion": "v1", "kind": "Secret", "name": "db"}}, "task": {"name": "mongodb-restore-4.2"}});
        let refused = unsupported(&spec(mongo)).expect("refused");
        assert_eq!(refused.reason(), "TaskNotSupported");
        assert!(refused.to_string().starts_with("spec.members[0].task.name \"mongodb-restore-4.2\""), "{refused}");
    }

    #[test]
    fn restore_jobs_mount_each_claim_name_their_host_and_have_a_deadline() {
        let restore: RestoreBatch = serde_json::from_value(json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "RestoreBatch",
            "metadata": {"name": "r", "namespace": "ns", "uid": "u"},
            "spec": {"repository": {"name": "repo"}, "members": [{"target": {"ref": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db"}}}],
                "runtimeSettings": {"pod": {"nodeSelector": {"zone": "a"}}}}}))
        .expect("a restore");
        let repository: Repository = serde_json::from_value(json!({"apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
            "metadata": {"name": "repo"}, "spec": {"backend": {"storageSecretName": "s", "s3": {"endpoint": "e", "bucket": "b"}}}}))
        .expect("a repository");
        let mount =
            |name: &str, path: &str| VolumeMount { name: name.into(), mount_path: path.into(), ..Default::default() };
        let plan = HostPlan {
            host: "db-1".into(),
            ordinal: Some(1),
            security_context: Some(PodSecurityContext { run_as_user: Some(999), ..Default::default() }),
            data: vec![
                DataVolume { claim: "data-db-1".into(), mounts: vec![mount("data", "/var/lib/db")], read_only: false },
                DataVolume { claim: "db-shared".into(), mounts: vec![mount("shared", "/shared")], read_only: false },
            ],
        };
        let job = restore_job(&restore, (0, &restore.spec.members[0]), &plan, &repository, None, "stash:test");
        let spec = job.spec.expect("a spec");
        assert_eq!(job.metadata.name.as_deref(), Some("r-restore-0-1"));
        assert_eq!(spec.active_deadline_seconds, Some(6 * 3600));
        let pod = spec.template.spec.expect("a pod");
        let claims: Vec<(String, String)> = pod
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| v.persistent_volume_claim.as_ref().map(|c| (v.name.clone(), c.claim_name.clone())))
            .collect();
        assert_eq!(claims, [("target".into(), "data-db-1".into()), ("target-1".into(), "db-shared".into())]);
        let container = &pod.containers[0];
        let mounts: Vec<(&str, &str)> =
            container.volume_mounts.iter().flatten().map(|m| (m.name.as_str(), m.mount_path.as_str())).collect();
        // Under a writable root of its own: restic also restores the directories above a mountPath
        // (/var/www above /var/www/html), which a read-only root filesystem refuses.
        assert_eq!(mounts.first(), Some(&("restore-root", RESTORE_ROOT)), "{mounts:?}");
        assert!(
            mounts.contains(&("target", "/stash-restore/var/lib/db"))
                && mounts.contains(&("target-1", "/stash-restore/shared")),
            "{mounts:?}"
        );
        let root = pod.volumes.iter().flatten().find(|v| v.name == "restore-root").expect("the restore root");
        assert!(root.empty_dir.is_some(), "{root:?}");
        assert!(container.args.iter().flatten().any(|a| *a == format!("--path-root={RESTORE_ROOT}")));
        let host = container.env.iter().flatten().find(|e| e.name == RESTORE_HOST_ENV).and_then(|e| e.value.clone());
        assert_eq!(host.as_deref(), Some("db-1"));
        let user = pod.security_context.as_ref().and_then(|c| c.run_as_user);
        assert_eq!(user, Some(999), "the workload's Pod user, so that in-place restores may write its files");
        let zone = pod.node_selector.as_ref().and_then(|s| s.get("zone")).map(String::as_str);
        assert_eq!(zone, Some("a"), "the RestoreBatch's settings are its members' default");
    }
}
