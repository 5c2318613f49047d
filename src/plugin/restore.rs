//! `kubectl stash restore <batch>`: a RestoreBatch of the batch's members, from one complete session
//! (latest, named, or the last before a time), in the batch's namespace or another one. The operator
//! does the restore; this only writes what a user would, checked first as the operator will check it.

use super::PluginError;
use crate::api::backup_batch::BackupMember;
use crate::api::common::{ObjectReference, TargetRef, TaskRef};
use crate::api::restore_batch::{RestoreBatchSpec, RestoreMember, RestoreTarget, SessionSelector};
use crate::api::{BackupBatch, RestoreBatch};
use crate::controller::backup_job::job_name;
use crate::tenancy::repository_namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::core::ObjectMeta;
use kube::{Client, ResourceExt};

/// Which session to restore, and where.
#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    pub namespace: String,
    pub batch: String,
    pub session: Option<String>,
    pub before: Option<Timestamp>,
    pub to_namespace: Option<String>,
    /// The RestoreBatch's name; default `<batch>-restore-<unix seconds>`.
    pub name: Option<String>,
}

/// `--before`: an RFC 3339 time.
pub fn parse_time(text: &str) -> Result<Timestamp, String> {
    text.parse().map_err(|_| format!("{text:?} is not an RFC 3339 time such as 2026-11-25T02:00:00Z"))
}

/// A member as restored: into the same target and volumes, by the same alias and task. What a
/// restore refuses (hooks, restic args, interim volumes, task params) is left out, not copied.
fn restore_member(member: &BackupMember) -> RestoreMember {
    RestoreMember {
        target: RestoreTarget {
            alias: member.target.host_alias(),
            // A restore writes only into its own namespace.
            reference: TargetRef { namespace: None, ..member.target.reference.clone() },
            volume_mounts: member.target.volume_mounts.clone(),
            rules: Vec::new(),
            replicas: member.target.replicas,
            args: Vec::new(),
            volume_claim_templates: Vec::new(),
        },
        task: member.task.as_ref().map(|t| TaskRef { name: t.name.clone(), params: Vec::new() }),
        runtime_settings: member.runtime_settings.clone(),
        temp_dir: member.temp_dir.clone(),
        interim_volume_template: None,
        hooks: None,
    }
}

/// The RestoreBatch `name` in `to_namespace` for `batch`: its Repository (named from `to_namespace`),
/// its members, and the session selector — with the batch's namespace when restoring elsewhere, so
/// that the sessions of the namespace that made them are found.
pub(crate) fn restore_batch(
    batch: &BackupBatch,
    request: &RestoreRequest,
    to_namespace: &str,
    name: &str,
) -> RestoreBatch {
    let source = batch.namespace().unwrap_or_default();
    let reference = &batch.spec.repository;
    let repository = ObjectReference {
        name: reference.name.clone(),
        namespace: (to_namespace != source || reference.namespace.is_some())
            .then(|| repository_namespace(&source, reference).to_string()),
    };
    let spec = RestoreBatchSpec {
        driver: Default::default(),
        repository,
        restore_from: Some(SessionSelector {
            batch: Some(batch.name_any()),
            namespace: (to_namespace != source).then_some(source),
            session: request.session.clone(),
            before: request.before.map(Time),
        }),
        members: batch.spec.members.iter().map(restore_member).collect(),
        execution_order: batch.spec.execution_order,
        hooks: None,
        time_out: None,
        runtime_settings: None,
    };
    let metadata = ObjectMeta { name: Some(name.into()), namespace: Some(to_namespace.into()), ..Default::default() };
    RestoreBatch { metadata, spec, status: None }
}

/// Creates the RestoreBatch; returns its namespace and name. Refused before anything is created
/// when the target namespace may not use the Repository (the operator's own check) or the restore
/// has a field restores do not carry out.
pub async fn create(client: Client, request: RestoreRequest) -> Result<(String, String), PluginError> {
    let batch = super::batch(&client, &request.namespace, &request.batch).await?;
    let to_namespace = request.to_namespace.clone().unwrap_or_else(|| request.namespace.clone());
    let default_name = || job_name(&request.batch, &format!("restore-{}", Timestamp::now().as_second()));
    let name = request.name.clone().unwrap_or_else(default_name);
    let restore = restore_batch(&batch, &request, &to_namespace, &name);
    if let Some(refusal) = crate::controller::restore_batch::unsupported(&restore.spec) {
        return Err(PluginError::Invalid(format!("the restore of {}: {refusal}", request.batch)));
    }
    if let Err(refusal) = crate::tenancy::fetch_repository(&client, &to_namespace, &restore.spec.repository).await? {
        return Err(PluginError::Invalid(format!("--to-namespace {to_namespace}: {refusal}")));
    }
    Api::<RestoreBatch>::namespaced(client, &to_namespace).create(&PostParams::default(), &restore).await?;
    Ok((to_namespace, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> BackupBatch {
        serde_json::from_value(serde_json::json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch",
            "metadata": {"name": "app", "namespace": "shop"},
            "spec": {"repository": {"name": "repo"}, "executionOrder": "Sequential", "members": [
                {"target": {"ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "uploads", "namespace": "shop"},
                    "volumeMounts": [{"name": "uploads", "mountPath": "/data"}], "paths": ["/data"], "args": ["--one-file-system"]},
                 "hooks": {"preBackup": {"exec": {"command": ["sync"]}}}},
                {"target": {"alias": "db", "ref": {"apiVersion": "v1", "kind": "Secret", "name": "pg"}},
                 "task": {"name": "postgres-backup-15", "params": [{"name": "args", "value": "--clean"}]}}]}}))
        .expect("a batch")
    }

    #[test]
    fn a_restore_in_place_names_the_session_and_leaves_out_what_restores_refuse() {
        let before = parse_time("2026-11-25T02:00:00Z").ok();
        let request = RestoreRequest { before, ..Default::default() };
        let restore = restore_batch(&batch(), &request, "shop", "app-restore-1");
        let spec = &restore.spec;
        assert_eq!(spec.repository, ObjectReference { name: "repo".into(), namespace: None });
        let from = spec.restore_from.clone().expect("restoreFrom");
        assert_eq!((from.batch.as_deref(), from.namespace, from.before.map(|t| t.0)), (Some("app"), None, before));
        assert_eq!(spec.members[0].target.alias, "uploads");
        assert_eq!(spec.members[0].target.reference.namespace, None);
        assert_eq!(spec.members[0].target.volume_mounts[0].mount_path, "/data");
        assert_eq!(
            spec.members[1].task.as_ref().map(|t| (t.name.as_str(), t.params.len())),
            Some(("postgres-backup-15", 0))
        );
        assert_eq!(crate::controller::restore_batch::unsupported(spec), None, "the operator accepts it");
    }

    #[test]
    fn a_restore_elsewhere_names_the_repository_and_the_sessions_namespace() {
        let request = RestoreRequest { session: Some("app-1764043200".into()), ..Default::default() };
        let restore = restore_batch(&batch(), &request, "shop-copy", "r");
        assert_eq!(restore.metadata.namespace.as_deref(), Some("shop-copy"));
        assert_eq!(restore.spec.repository, ObjectReference { name: "repo".into(), namespace: Some("shop".into()) });
        let from = restore.spec.restore_from.expect("restoreFrom");
        assert_eq!((from.namespace.as_deref(), from.session.as_deref()), (Some("shop"), Some("app-1764043200")));
    }

    #[test]
    fn a_bad_time_names_what_is_expected() {
        let message = parse_time("yesterday").expect_err("not a time");
        assert!(message.contains("\"yesterday\"") && message.contains("RFC 3339"), "{message}");
    }
}
