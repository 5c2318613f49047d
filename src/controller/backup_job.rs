//! The Job that backs up one job-model member (a PVC or a database) for one session, and the Job
//! that finishes the session in the repository (retention, manifest, Repository status).

use super::executor_job::{DataVolume, DatabaseSource, ExecutorJob};
use crate::api::backup_batch::BackupMember;
use crate::api::repository::Repository;
use crate::api::{BackupBatch, BackupSession};
use crate::executor_pod::{PVC_KIND, data_mounts, is_database};
use crate::hooks::Hook;
use crate::names::{LABEL_VALUE_MAX, bounded, label_value};
use crate::session::invoker_labels;
use k8s_openapi::api::batch::v1::Job;
use kube::{Resource, ResourceExt};

pub const SESSION_LABEL: &str = "stash.appscode.com/backup-session";
/// Marks a session's hook Jobs, with the hook as value.
pub const HOOK_LABEL: &str = "stash.appscode.com/hook";
/// How long a hook's Job may take, its Pod's start included; the hook itself gives up after 30 s.
const HOOK_JOB_DEADLINE_SECONDS: i64 = 300;
/// Whether a member is backed up by a Job (a PVC or a database) rather than a sidecar.
pub fn is_job_model(member: &BackupMember) -> bool {
    member.target.reference.kind == PVC_KIND || is_database(&member.target.reference.kind)
}

/// `<session>-<suffix>`, kept within the 63 characters a Job name (and its Pods' label) allows.
pub fn job_name(session: &str, suffix: &str) -> String {
    let suffix = format!("-{suffix}");
    format!("{}{suffix}", bounded(session, LABEL_VALUE_MAX - suffix.len()))
}

fn session_labels(batch: &BackupBatch, session: &BackupSession) -> std::collections::BTreeMap<String, String> {
    let mut labels = invoker_labels(&batch.name_any());
    labels.insert(SESSION_LABEL.into(), label_value(&session.name_any()));
    labels
}

/// The Job for member `index` of `batch` in `session`: a PVC is mounted read-only, a database's
/// connection (`database`) as files; the Job belongs to the session.
pub fn backup_job(
    batch: &BackupBatch,
    session: &BackupSession,
    (index, member): (usize, &BackupMember),
    repository: &Repository,
    database: Option<DatabaseSource>,
    image: &str,
    deadline_seconds: Option<i64>,
) -> Job {
    let target = &member.target.reference;
    let data = (target.kind == PVC_KIND).then(|| DataVolume {
        claim: target.name.clone(),
        mounts: data_mounts(&member.target.volume_mounts),
        read_only: true,
    });
    ExecutorJob {
        name: job_name(&session.name_any(), &index.to_string()),
        namespace: session.namespace().unwrap_or_default(),
        owner: session.controller_owner_ref(&()),
        labels: session_labels(batch, session),
        args: vec![
            "backup-job".into(),
            "--invoker-kind=BackupBatch".into(),
            format!("--invoker-name={}", batch.name_any()),
            format!("--session={}", session.name_any()),
            format!("--target-kind={}", target.kind),
            format!("--target-name={}", target.name),
        ],
        image,
        repository: Some(repository),
        runtime: member.runtime_settings.as_deref(),
        temp_dir: member.temp_dir.as_ref(),
        data: data.into_iter().collect(),
        database,
        deadline_seconds,
    }
    .build()
}

/// The Job that finishes `session` in the repository once every member is done.
pub fn finalize_job(batch: &BackupBatch, session: &BackupSession, repository: &Repository, image: &str) -> Job {
    let name = job_name(&session.name_any(), "finalize");
    let namespace = session.namespace().unwrap_or_default();
    ExecutorJob {
        owner: session.controller_owner_ref(&()),
        labels: session_labels(batch, session),
        args: vec!["finalize-session".into(), format!("--session={}", session.name_any())],
        ..ExecutorJob::on_repository(name, namespace, repository, batch.spec.runtime_settings.as_deref(), image)
    }
    .build()
}

/// The name of `session`'s Job for `hook`.
pub fn hook_job_name(session: &str, hook: Hook) -> String {
    job_name(session, hook.label())
}

/// The Job that sends `session`'s http or tcp `hook` from the batch's namespace, as its executor
/// identity, with no Secret mounted.
pub fn hook_job(batch: &BackupBatch, session: &BackupSession, hook: Hook, image: &str) -> Job {
    let mut labels = session_labels(batch, session);
    labels.insert(HOOK_LABEL.into(), hook.label().into());
    ExecutorJob {
        name: hook_job_name(&session.name_any(), hook),
        namespace: session.namespace().unwrap_or_default(),
        owner: session.controller_owner_ref(&()),
        labels,
        args: vec!["run-hook".into(), format!("--session={}", session.name_any()), format!("--hook={}", hook.label())],
        image,
        repository: None,
        runtime: batch.spec.runtime_settings.as_deref(),
        temp_dir: None,
        data: Vec::new(),
        database: None,
        deadline_seconds: Some(HOOK_JOB_DEADLINE_SECONDS),
    }
    .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Issue 12: a member's pod-level runtimeSettings reach its Job's Pod (they were read for the
    /// trigger only), while the Job keeps its own identity and labels.
    #[test]
    fn a_members_pod_settings_reach_its_job() {
        let pod = json!({"nodeSelector": {"disk": "ssd"}, "tolerations": [{"key": "backup", "operator": "Exists"}],
            "priorityClassName": "low", "podLabels": {"team": "shop", "stash.appscode.com/invoker-name": "mine"},
            "podAnnotations": {"note": "nightly"}, "securityContext": {"fsGroup": 1000}});
        let batch: BackupBatch = serde_json::from_value(json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch",
            "metadata": {"name": "b", "namespace": "ns", "uid": "u"},
            "spec": {"repository": {"name": "repo"}, "members": [{"target": {"ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "data"}},
                "runtimeSettings": {"pod": pod}}]}}))
        .expect("a batch");
        let session: BackupSession =
            serde_json::from_value(json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupSession",
            "metadata": {"name": "b-1", "namespace": "ns", "uid": "s"},
            "spec": {"invoker": {"apiGroup": "stash.appscode.com", "kind": "BackupBatch", "name": "b"}}}))
            .expect("a session");
        let repository: Repository = serde_json::from_value(json!({"apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
            "metadata": {"name": "repo"}, "spec": {"backend": {"storageSecretName": "s", "s3": {"endpoint": "e", "bucket": "b"}}}}))
        .expect("a repository");
        let job = backup_job(&batch, &session, (0, &batch.spec.members[0]), &repository, None, "stash:test", None);
        let template = job.spec.expect("a spec").template;
        let pod = template.spec.expect("a pod");
        assert_eq!(pod.node_selector.unwrap_or_default().get("disk").map(String::as_str), Some("ssd"));
        assert_eq!(pod.tolerations.unwrap_or_default().len(), 1);
        assert_eq!(pod.priority_class_name.as_deref(), Some("low"));
        assert_eq!(pod.security_context.and_then(|s| s.fs_group), Some(1000));
        assert_eq!(pod.service_account_name.as_deref(), Some("stash-backup"), "the Job keeps its identity");
        let metadata = template.metadata.expect("metadata");
        let labels = metadata.labels.unwrap_or_default();
        assert_eq!(labels.get("team").map(String::as_str), Some("shop"));
        assert_eq!(labels.get("stash.appscode.com/invoker-name").map(String::as_str), Some("b"), "ours win");
        assert_eq!(metadata.annotations.unwrap_or_default().get("note").map(String::as_str), Some("nightly"));
    }

    #[test]
    fn job_names_fit_in_63_characters() {
        assert_eq!(job_name("app-backup-1764043200", "2"), "app-backup-1764043200-2");
        let long = format!("{}-1764043200", "a".repeat(80));
        let name = job_name(&long, "12");
        assert!(name.len() <= 63, "{name}");
        assert_ne!(name, job_name(&format!("{}-1764043201", "a".repeat(80)), "12"), "distinct sessions stay distinct");
        assert!(job_name(&long, "finalize").len() <= 63);
    }
}
