//! `RestoreBatch` (stash.appscode.com/v1beta1): restore the members of one complete session together.

use super::backup_batch::Driver;
use super::common::{
    Condition, EmptyDirSettings, ExecutionOrder, Handler, ObjectReference, PersistentVolumeClaimTemplate, PostHook,
    RuntimeSettings, TargetRef, TaskRef, without_empty_hook,
};
use super::duration::DurationString;
use k8s_openapi::api::core::v1::VolumeMount;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1beta1",
    kind = "RestoreBatch",
    plural = "restorebatches",
    shortname = "rb",
    category = "stash",
    category = "appscode",
    category = "all",
    namespaced,
    status = "RestoreBatchStatus",
    printcolumn = r#"{"name":"Repository","type":"string","jsonPath":".spec.repository.name"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Duration","type":"string","jsonPath":".status.sessionDuration"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RestoreBatchSpec {
    #[serde(default)]
    pub driver: Driver,
    pub repository: ObjectReference,
    /// Which complete session to restore; the latest complete one when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<SessionSelector>,
    /// Bounded so that the API server can budget the CEL rules nested in members.
    #[schemars(length(min = 1, max = 64))]
    pub members: Vec<RestoreMember>,
    #[serde(default)]
    pub execution_order: ExecutionOrder,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Box<RestoreHooks>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_out: Option<DurationString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_settings: Option<Box<RuntimeSettings>>,
}

/// Picks one complete session from the manifests in the repository.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.session) && has(self.before))")
    .message("set at most one of session, before"))]
pub struct SessionSelector {
    /// The BackupBatch whose sessions to choose from; needed only when the repository holds
    /// complete sessions of several batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    /// The namespace the sessions were backed up in (default: the RestoreBatch's own): restoring
    /// another namespace's backup into this one, as a clone or a move, through this namespace's own
    /// Repository and password. Without it, a namespace never sees another's sessions by accident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// A BackupSession name, e.g. `app-backup-1764043200`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The newest complete session that started before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreMember {
    pub target: RestoreTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_settings: Option<Box<RuntimeSettings>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_dir: Option<EmptyDirSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interim_volume_template: Option<Box<PersistentVolumeClaimTemplate>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Box<RestoreHooks>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTarget {
    /// The alias the member was backed up under (its restic `--host`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub alias: String,
    #[serde(rename = "ref")]
    pub reference: TargetRef,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RestoreRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Claims to create before restoring into them (Stash's StatefulSet restores).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_claim_templates: Vec<PersistentVolumeClaimTemplate>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_host: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreHooks {
    #[serde(default, deserialize_with = "without_empty_hook", skip_serializing_if = "Option::is_none")]
    pub pre_restore: Option<Handler>,
    #[serde(default, deserialize_with = "without_empty_hook", skip_serializing_if = "Option::is_none")]
    pub post_restore: Option<PostHook>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreBatchStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_duration: Option<String>,
    /// When the restore is failed if still running (written by Stash; ours fail at `spec.timeOut`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_deadline: Option<Time>,
    /// The backup session whose snapshots were restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_session: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<RestoreMemberStatus>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RestorePhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
    Invalid,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreMemberStatus {
    #[serde(rename = "ref")]
    pub reference: TargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestoreMemberPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_hosts: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stats: Vec<HostRestoreStats>,
    /// The member's conditions, as Stash writes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RestoreMemberPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    /// Written by Stash when a host's outcome could not be told.
    Unknown,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostRestoreStats {
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestoreMemberPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
