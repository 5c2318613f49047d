//! `BackupBatch` (stash.appscode.com/v1beta1): one schedule, one repository, many members.

use super::backup_args::{RefusedArg, check_backup_args};
use super::common::{
    Condition, EmptyDirSettings, ExecutionOrder, Handler, ObjectReference, PersistentVolumeClaimTemplate, PostHook,
    RetentionPolicy, RuntimeSettings, TargetRef, TaskRef, without_empty_hook,
};
use super::duration::DurationString;
use k8s_openapi::api::core::v1::VolumeMount;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1beta1",
    kind = "BackupBatch",
    plural = "backupbatches",
    shortname = "bb",
    category = "stash",
    category = "appscode",
    category = "all",
    namespaced,
    status = "BackupBatchStatus",
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Paused","type":"boolean","jsonPath":".spec.paused"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupBatchSpec {
    /// How data is captured. Only `Restic` is supported; `VolumeSnapshotter` is refused with a reason.
    #[serde(default)]
    pub driver: Driver,
    pub repository: ObjectReference,
    /// Cron schedule of the trigger CronJob: five fields, or a macro such as `@daily` (not `@every`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Upper bound of one session (a duration such as `30m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_out: Option<DurationString>,
    /// Bounded so that the API server can budget the CEL rules nested in members.
    #[schemars(length(min = 1, max = 64))]
    pub members: Vec<BackupMember>,
    /// Applies to the trigger CronJob's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_settings: Option<Box<RuntimeSettings>>,
    /// Run once per session, before the first and after the last member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Box<BackupHooks>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_policy: Option<RetentionPolicy>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// How many finished sessions to keep.
    #[serde(default = "default_backup_history_limit")]
    #[schemars(range(min = 0))]
    pub backup_history_limit: i32,
    #[serde(default)]
    pub execution_order: ExecutionOrder,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_config: Option<RetryConfig>,
}

fn default_backup_history_limit() -> i32 {
    1
}

fn default_max_retry() -> i32 {
    1
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Driver {
    #[default]
    Restic,
    VolumeSnapshotter,
}

/// One part of the application: a workload (sidecar model), a PVC or a database (job model).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupMember {
    pub target: BackupTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_settings: Option<Box<RuntimeSettings>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_dir: Option<EmptyDirSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interim_volume_template: Option<Box<PersistentVolumeClaimTemplate>>,
    /// Run around this member's backup, on each of its hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Box<BackupHooks>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupTarget {
    /// The restic `--host` of this member (StatefulSet pods: `<alias>-<ordinal>`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub alias: String,
    #[serde(rename = "ref")]
    pub reference: TargetRef,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
}

impl BackupBatchSpec {
    /// Why the members cannot make one session, if they cannot: two members naming the same object
    /// (both would report into one target and the other would never finish), two sharing a restic
    /// host, an alias restic would split into several tags, or `args` restic may not get.
    pub fn member_problem(&self) -> Option<(&'static str, String)> {
        for (i, member) in self.members.iter().enumerate() {
            if let Err(refused) = member.target.check_args(i) {
                return Some(("ResticFlagNotAllowed", refused.to_string()));
            }
            if member.interim_volume_template.is_some() {
                return Some((
                    "UnsupportedField",
                    format!(
                        "spec.members[{i}].interimVolumeTemplate is not supported: backups stream from the volume or the \
                         database into restic with no interim copy; remove it"
                    ),
                ));
            }
            if member.task.as_ref().is_some_and(|t| !t.params.is_empty()) {
                return Some((
                    "UnsupportedField",
                    format!(
                        "spec.members[{i}].task.params is not supported: the task name picks the dump tool and its \
                         options are fixed (README, Database members); remove them"
                    ),
                ));
            }
            if member.target.replicas.is_some() {
                return Some((
                    "UnsupportedField",
                    format!(
                        "spec.members[{i}].target.replicas is not supported in a backup: every Pod of the workload \
                         backs up its own host; remove it"
                    ),
                ));
            }
            let (target, alias) = (&member.target.reference, member.target.host_alias());
            if alias.contains([',', '=']) || alias.chars().any(char::is_whitespace) {
                return Some((
                    "InvalidAlias",
                    format!("spec.members[{i}].target.alias {alias:?} may not contain commas, '=' or spaces"),
                ));
            }
            for (j, earlier) in self.members[..i].iter().enumerate() {
                let other = &earlier.target.reference;
                if (&other.kind, &other.name) == (&target.kind, &target.name) {
                    return Some((
                        "DuplicateMember",
                        format!("spec.members[{j}] and [{i}] both name {} {}", target.kind, target.name),
                    ));
                }
                if earlier.target.host_alias() == alias {
                    return Some((
                        "DuplicateAlias",
                        format!("spec.members[{j}] and [{i}] both back up as host {alias:?}; give each its own alias"),
                    ));
                }
            }
        }
        None
    }
}

/// An entry of member `member`'s `target.args` that may not reach restic, named by its field.
#[derive(Debug, thiserror::Error)]
#[error("spec.members[{member}].target.{refused}")]
pub struct MemberArgRefused {
    pub member: usize,
    pub refused: RefusedArg,
}

impl BackupTarget {
    /// Whether `args` (of the member at index `member`) may be passed to `restic backup`: checked by
    /// the controllers before a session starts and by the executor before restic runs, since the
    /// batch may have changed in between.
    pub(crate) fn check_args(&self, member: usize) -> Result<(), MemberArgRefused> {
        check_backup_args(&self.args).map_err(|refused| MemberArgRefused { member, refused })
    }

    /// The restic `--host` of the member: its alias, else the target's name.
    pub fn host_alias(&self) -> String {
        if self.alias.is_empty() { self.reference.name.clone() } else { self.alias.clone() }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupHooks {
    #[serde(default, deserialize_with = "without_empty_hook", skip_serializing_if = "Option::is_none")]
    pub pre_backup: Option<Handler>,
    #[serde(default, deserialize_with = "without_empty_hook", skip_serializing_if = "Option::is_none")]
    pub post_backup: Option<PostHook>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryConfig {
    /// Sessions to retry after a failed one (Stash's default: 1).
    #[serde(default = "default_max_retry")]
    #[schemars(range(min = 0))]
    pub max_retry: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DurationString>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupBatchStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BackupInvokerPhase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub member_conditions: Vec<MemberConditions>,
    /// The batch's last finished (Succeeded or Failed) session, written by the session controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_session: Option<SessionRecord>,
    /// The batch's last Succeeded session: what "last success" metrics and alerts read, so that
    /// they survive an operator restart or a new leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_session: Option<SessionRecord>,
}

/// A finished session, as a batch's status records it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionRecord {
    pub name: String,
    pub phase: super::backup_session::BackupSessionPhase,
    /// The session's creation time plus its duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BackupInvokerPhase {
    Ready,
    NotReady,
    Invalid,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct MemberConditions {
    pub target: TargetRef,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(members: &[(&str, &str, &str)]) -> BackupBatchSpec {
        let members: Vec<serde_json::Value> = members
            .iter()
            .map(|(alias, kind, name)| {
                serde_json::json!({"target": {"alias": alias, "ref": {"apiVersion": "v1", "kind": kind, "name": name}}})
            })
            .collect();
        serde_json::from_value(serde_json::json!({"repository": {"name": "repo"}, "members": members})).expect("spec")
    }

    /// Where Stash accepts less than a full hook or retry policy, it defaults it: a hook naming no
    /// action runs nothing, `maxRetry` is 1.
    #[test]
    fn what_stash_leaves_out_is_defaulted_as_stash_does() {
        let spec: BackupBatchSpec = serde_json::from_value(serde_json::json!({
            "repository": {"name": "repo"},
            "members": [{"target": {"ref": {"kind": "Secret", "name": "db"}}}],
            "retryConfig": {"delay": "1m"},
            "hooks": {"preBackup": {"containerName": "app"}, "postBackup": {"executionPolicy": "OnFailure"}},
        }))
        .expect("spec");
        assert_eq!(spec.retry_config.map(|r| r.max_retry), Some(1));
        assert_eq!(spec.hooks.as_deref(), Some(&BackupHooks::default()));
    }

    /// M13 and L2: members that cannot make one session, each named with the field at fault.
    #[test]
    fn members_that_cannot_make_one_session_are_named() {
        let problem = |members| spec(members).member_problem().map(|(reason, _)| reason);
        assert_eq!(problem(&[("a", "PersistentVolumeClaim", "a"), ("b", "Secret", "b")]), None);
        assert_eq!(problem(&[("a", "Secret", "db"), ("b", "Secret", "db")]), Some("DuplicateMember"));
        assert_eq!(problem(&[("a", "Secret", "x"), ("a", "Secret", "y")]), Some("DuplicateAlias"));
        assert_eq!(problem(&[("a,session=forged", "Secret", "x")]), Some("InvalidAlias"));
        let (_, message) = spec(&[("a b", "Secret", "x")]).member_problem().expect("a problem");
        assert!(message.contains("spec.members[0].target.alias"), "{message}");
    }

    /// M6: a member whose `target.args` would hand restic a flag it may not get makes the batch
    /// invalid, naming the field and the flag.
    #[test]
    fn restic_flags_outside_the_allow_list_are_named() {
        let mut spec = spec(&[("a", "PersistentVolumeClaim", "a"), ("b", "PersistentVolumeClaim", "b")]);
        spec.members[1].target.args = vec!["--exclude".into(), "*.tmp".into(), "--password-command=sh -c id".into()];
        let (reason, message) = spec.member_problem().expect("a problem");
        assert_eq!(reason, "ResticFlagNotAllowed");
        assert!(message.starts_with("spec.members[1].target.args[2]: --password-command is not"), "{message}");
    }

    /// Stash fields we accept in the schema but do not act on are refused by name, never ignored.
    #[test]
    fn fields_accepted_but_not_acted_on_are_refused_by_name() {
        let mut interim = spec(&[("db", "Secret", "pg")]);
        interim.members[0].interim_volume_template = Some(Default::default());
        let (reason, message) = interim.member_problem().expect("refused");
        assert_eq!(reason, "UnsupportedField");
        assert!(message.starts_with("spec.members[0].interimVolumeTemplate"), "{message}");
        let mut params = spec(&[("db", "Secret", "pg")]);
        params.members[0].task = Some(TaskRef {
            name: "postgres-backup-15".into(),
            params: vec![crate::api::common::Param { name: "args".into(), value: "--clean".into() }],
        });
        let (reason, message) = params.member_problem().expect("refused");
        assert_eq!(reason, "UnsupportedField");
        assert!(message.starts_with("spec.members[0].task.params"), "{message}");
        let mut replicas = spec(&[("db", "StatefulSet", "db")]);
        replicas.members[0].target.replicas = Some(1);
        let (reason, message) = replicas.member_problem().expect("refused");
        assert_eq!(reason, "UnsupportedField");
        assert!(message.starts_with("spec.members[0].target.replicas"), "{message}");
    }
}
