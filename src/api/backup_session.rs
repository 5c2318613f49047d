//! `BackupSession` (stash.appscode.com/v1beta1): one run of a BackupBatch, with a status entry per target host.

use super::common::{Condition, ConditionStatus, TargetRef};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1beta1",
    kind = "BackupSession",
    plural = "backupsessions",
    shortname = "bs",
    category = "stash",
    category = "appscode",
    category = "all",
    namespaced,
    status = "BackupSessionStatus",
    printcolumn = r#"{"name":"Invoker-Type","type":"string","jsonPath":".spec.invoker.kind"}"#,
    printcolumn = r#"{"name":"Invoker-Name","type":"string","jsonPath":".spec.invoker.name"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Duration","type":"string","jsonPath":".status.sessionDuration"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupSessionSpec {
    pub invoker: BackupInvokerRef,
    /// Retries left after this session; set on sessions created by `retryConfig`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub retry_left: Option<i32>,
}

/// The object that started the session. Immutable once set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec.invoker is immutable"))]
pub struct BackupInvokerRef {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_group: String,
    #[schemars(length(min = 1))]
    pub kind: String,
    #[schemars(length(min = 1))]
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSessionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BackupSessionPhase>,
    /// How long the session took, e.g. `1m30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_duration: Option<String>,
    /// When the operator fails the session if it is still running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_deadline: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<BackupTargetStatus>,
    /// When a retry session will be created after this one failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry: Option<Time>,
    /// Set once the retry session for this one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried: Option<bool>,
    /// The hosts backing up right now, summed: `42% 1.2 GiB/2.9 GiB, 2 hosts, ETA 1m30s` (ours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
}

/// A session whose batch has no `spec.timeOut` still ends: a host that never reports fails it after
/// this long instead of holding every later session in Skipped.
pub const DEFAULT_SESSION_TIMEOUT: k8s_openapi::jiff::SignedDuration = k8s_openapi::jiff::SignedDuration::from_hours(6);

/// The condition the finalize step sets last: True once the session's manifest decision and
/// retention are done in the repository.
pub const SESSION_FINALIZED: &str = "SessionFinalized";

impl BackupSession {
    /// Whether the repository is done with this session: Skipped (no data), or final and finalized.
    /// Until then its data is protected from retention and the session from history trimming.
    pub fn is_settled(&self) -> bool {
        let Some(status) = self.status.as_ref() else { return false };
        status.phase == Some(BackupSessionPhase::Skipped)
            || (status.phase.is_some_and(BackupSessionPhase::is_final)
                && status.conditions.iter().any(|c| c.type_ == SESSION_FINALIZED && c.status == ConditionStatus::True))
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BackupSessionPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Unknown,
}

impl BackupSessionPhase {
    /// Succeeded, Failed and Skipped sessions never change again.
    pub fn is_final(self) -> bool {
        matches!(self, BackupSessionPhase::Succeeded | BackupSessionPhase::Failed | BackupSessionPhase::Skipped)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupTargetStatus {
    #[serde(rename = "ref")]
    pub reference: TargetRef,
    /// Hosts that must report: StatefulSet replicas, DaemonSet desired pods, otherwise 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_hosts: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TargetPhase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stats: Vec<HostBackupStats>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_backup_actions: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_backup_actions: Vec<String>,
    /// The target's conditions, as Stash writes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Live progress of the hosts still backing up (ours): each host's executor replaces its entry
    /// at most every few seconds, and its entry goes when it reports its stats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub progress: Vec<HostProgress>,
}

/// How far one host's running backup is, from restic's own progress.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostProgress {
    pub hostname: String,
    /// 0–100, as restic estimates it.
    pub percent: i32,
    pub bytes_done: i64,
    pub total_bytes: i64,
    pub files_done: i64,
    pub total_files: i64,
    /// restic's estimate, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_remaining: Option<i64>,
    /// When these numbers last moved: a host whose numbers stop moving is reported as stalled.
    pub last_change: Time,
}

impl BackupSessionStatus {
    /// Recomputes `progress` from the hosts' entries; none left clears it.
    pub fn summarize_progress(&mut self) {
        let hosts: Vec<&HostProgress> = self.targets.iter().flat_map(|t| &t.progress).collect();
        if hosts.is_empty() {
            self.progress = None;
            return;
        }
        let done: i64 = hosts.iter().map(|h| h.bytes_done.max(0)).sum();
        let total: i64 = hosts.iter().map(|h| h.total_bytes.max(0)).sum();
        let percent = if total > 0 { done.saturating_mul(100) / total } else { 0 };
        let mut summary = format!(
            "{percent}% {}/{}",
            human_bytes(u64::try_from(done).unwrap_or(0)),
            human_bytes(u64::try_from(total).unwrap_or(0))
        );
        if hosts.len() > 1 {
            summary.push_str(&format!(", {} hosts", hosts.len()));
        }
        // The slowest host decides when the whole is done.
        if let Some(eta) =
            hosts.iter().map(|h| h.seconds_remaining).collect::<Option<Vec<_>>>().and_then(|s| s.into_iter().max())
        {
            summary.push_str(&format!(", ETA {}", short_duration(eta)));
        }
        self.progress = Some(summary);
    }
}

/// `1.5 MiB`: how Stash writes sizes into a session's status.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// `1h2m3s`, `2m5s`, `40s`.
fn short_duration(seconds: i64) -> String {
    let seconds = seconds.max(0);
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TargetPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// What one host of a target reported.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostBackupStats {
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<HostPhase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum HostPhase {
    Succeeded,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStats {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processing_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_stats: Option<FileStats>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileStats {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_files: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_files: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified_files: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmodified_files: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, bytes_done: i64, total_bytes: i64, seconds_remaining: Option<i64>) -> HostProgress {
        HostProgress {
            hostname: name.into(),
            percent: 0,
            bytes_done,
            total_bytes,
            files_done: 0,
            total_files: 0,
            seconds_remaining,
            last_change: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }
    }

    fn with_hosts(hosts: Vec<Vec<HostProgress>>) -> BackupSessionStatus {
        let targets = hosts
            .into_iter()
            .map(|progress| BackupTargetStatus {
                reference: TargetRef::default(),
                total_hosts: None,
                phase: Some(TargetPhase::Running),
                stats: Vec::new(),
                pre_backup_actions: Vec::new(),
                post_backup_actions: Vec::new(),
                conditions: Vec::new(),
                progress,
            })
            .collect();
        BackupSessionStatus { targets, progress: Some("stale".into()), ..Default::default() }
    }

    #[test]
    fn the_summary_adds_up_every_running_host() {
        let gib = 1 << 30;
        let mut status =
            with_hosts(vec![vec![host("a", gib, 2 * gib, Some(90))], vec![host("b", 0, gib, Some(3_700))]]);
        status.summarize_progress();
        assert_eq!(status.progress.as_deref(), Some("33% 1.0 GiB/3.0 GiB, 2 hosts, ETA 1h1m40s"));
        let mut one = with_hosts(vec![vec![host("a", 512, 2048, None)]]);
        one.summarize_progress();
        assert_eq!(one.progress.as_deref(), Some("25% 512 B/2.0 KiB"), "no ETA until restic has one");
        let mut unknown_total = with_hosts(vec![vec![host("db", 4096, 0, None)]]);
        unknown_total.summarize_progress();
        assert_eq!(unknown_total.progress.as_deref(), Some("0% 4.0 KiB/0 B"));
        let mut none = with_hosts(vec![vec![], vec![]]);
        none.summarize_progress();
        assert_eq!(none.progress, None, "nothing running clears it");
    }

    #[test]
    fn sizes_read_like_stash_writes_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(50 * 1024 * 1024), "50.0 MiB");
    }
}
