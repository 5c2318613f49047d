//! What a repository Job of `kubectl stash` (snapshots, check, unlock) hands back to the CLI, and
//! how the CLI shows it. The Job writes it as JSON into a ConfigMap the CLI reads (see
//! `repository_job`); both sides share these types, so the two cannot drift.

use crate::agent::locks::LockVerdict;
use crate::agent::retention::{Ownership, is_manifest, ownership};
use crate::api::backup_session::human_bytes;
use crate::restic::output::Snapshot;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt::Write;

/// The repository commands that run as a Job in the batch's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RepositoryTask {
    Snapshots,
    Check,
    Unlock,
}

impl RepositoryTask {
    pub(crate) fn label(self) -> &'static str {
        match self {
            RepositoryTask::Snapshots => "snapshots",
            RepositoryTask::Check => "check",
            RepositoryTask::Unlock => "unlock",
        }
    }
}

/// One backup snapshot of the batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRow {
    pub id: String,
    pub time: String,
    /// restic's `--host`: the member's alias (`<alias>-<ordinal>` for a StatefulSet Pod).
    pub host: String,
    pub member: Option<String>,
    pub paths: Vec<String>,
    /// Bytes the backup read (restic 0.17 and later record it).
    pub size_bytes: Option<u64>,
    pub session: Option<String>,
    /// The session's manifest is in the repository: the snapshot belongs to a restorable set.
    pub complete: bool,
}

/// One lock and what the operator's rule decided about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockRow {
    pub id: String,
    pub holder: String,
    pub removed: bool,
    pub reason: String,
}

impl From<LockVerdict> for LockRow {
    fn from(v: LockVerdict) -> Self {
        LockRow { id: v.id, holder: v.holder, removed: v.removed, reason: v.why }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "task")]
pub enum RepositoryReport {
    Snapshots { repository: String, snapshots: Vec<SnapshotRow> },
    Check { repository: String, healthy: bool },
    Unlock { repository: String, locks: Vec<LockRow> },
}

/// What the Job writes: its report, or why it has none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JobOutcome {
    Report(RepositoryReport),
    Error(String),
}

/// The batch's backup snapshots of namespace `namespace`, oldest first, each marked complete when
/// a manifest of its session is among `snapshots` (manifests themselves are not listed).
pub(crate) fn snapshot_rows(snapshots: &[Snapshot], namespace: &str, batch: &str) -> Vec<SnapshotRow> {
    let ours = |s: &&Snapshot| ownership(s, namespace, batch) != Ownership::Foreign;
    let complete: BTreeSet<&str> =
        snapshots.iter().filter(ours).filter(|s| is_manifest(s)).filter_map(|s| s.tag("session")).collect();
    let mut backups: Vec<&Snapshot> = snapshots.iter().filter(ours).filter(|s| !is_manifest(s)).collect();
    backups.sort_by(Snapshot::chronological);
    backups
        .into_iter()
        .map(|s| SnapshotRow {
            id: s.id.clone(),
            time: s.time.clone(),
            host: s.hostname.clone(),
            member: s.tag("member").map(str::to_string),
            paths: s.paths.clone(),
            size_bytes: s.summary.as_ref().map(|m| m.total_bytes_processed),
            session: s.tag("session").map(str::to_string),
            complete: s.tag("session").is_some_and(|session| complete.contains(session)),
        })
        .collect()
}

/// restic's nanosecond time to the second, in UTC; as given when it does not parse.
fn whole_seconds(time: &str) -> String {
    let parsed = time.parse::<Timestamp>().ok().and_then(|t| Timestamp::from_second(t.as_second()).ok());
    parsed.map_or_else(|| time.to_string(), |t| t.to_string())
}

/// The report as a person reads it.
pub fn render_report(report: &RepositoryReport) -> String {
    let mut out = String::new();
    match report {
        RepositoryReport::Snapshots { snapshots, .. } => {
            let _ = writeln!(
                out,
                "{:<10} {:<21} {:<20} {:<10} {:<8} {:<36} PATHS",
                "ID", "TIME", "HOST", "SIZE", "COMPLETE", "SESSION"
            );
            for s in snapshots {
                let _ = writeln!(
                    out,
                    "{:<10} {:<21} {:<20} {:<10} {:<8} {:<36} {}",
                    s.id.chars().take(8).collect::<String>(),
                    whole_seconds(&s.time),
                    s.host,
                    s.size_bytes.map_or_else(|| "-".to_string(), human_bytes),
                    if s.complete { "yes" } else { "no" },
                    s.session.as_deref().unwrap_or("-"),
                    s.paths.join(",")
                );
            }
        }
        RepositoryReport::Check { repository, healthy: true } => {
            let _ = writeln!(out, "Repository {repository}: no errors found");
        }
        RepositoryReport::Check { repository, healthy: false } => {
            let _ = writeln!(out, "Repository {repository}: CHECK FAILED (see the Job's log for restic's findings)");
        }
        RepositoryReport::Unlock { repository, locks } if locks.is_empty() => {
            let _ = writeln!(out, "Repository {repository}: no locks");
        }
        RepositoryReport::Unlock { locks, .. } => {
            for lock in locks {
                let verb = if lock.removed { "removed" } else { "kept" };
                let _ = writeln!(out, "{verb:<8} {}: {}", lock.holder, lock.reason);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(id: &str, time: &str, tags: &[&str], bytes: Option<u64>) -> Snapshot {
        Snapshot {
            id: id.into(),
            short_id: id.into(),
            time: time.into(),
            hostname: "uploads".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            paths: vec!["/data".into()],
            summary: bytes
                .map(|total_bytes_processed| crate::restic::output::SnapshotSummary { total_bytes_processed }),
        }
    }

    #[test]
    fn rows_are_the_batchs_own_backups_marked_complete_by_their_manifest() {
        let listed = [
            snapshot(
                "b2",
                "2026-11-26T02:00:00Z",
                &["session=s-2", "batch=app", "member=uploads", "namespace=shop"],
                None,
            ),
            snapshot("b1", "2026-11-25T02:00:00Z", &["session=s-1", "batch=app", "namespace=shop"], Some(2048)),
            snapshot(
                "m1",
                "2026-11-25T02:01:00Z",
                &["stash=manifest", "session=s-1", "batch=app", "namespace=shop"],
                None,
            ),
            snapshot("x1", "2026-11-25T02:00:00Z", &["session=s-9", "batch=app", "namespace=staging"], None),
            snapshot("y1", "2026-11-25T02:00:00Z", &["session=s-8", "batch=other", "namespace=shop"], None),
        ];
        let rows = snapshot_rows(&listed, "shop", "app");
        let summary: Vec<_> = rows.iter().map(|r| (r.id.as_str(), r.complete, r.size_bytes)).collect();
        assert_eq!(summary, vec![("b1", true, Some(2048)), ("b2", false, None)]);
        assert_eq!(rows[1].member.as_deref(), Some("uploads"));
        let text = render_report(&RepositoryReport::Snapshots { repository: "repo".into(), snapshots: rows });
        assert!(text.contains("2.0 KiB") && text.contains("s-1"), "{text}");
        assert_eq!(whole_seconds("2026-11-26T15:36:12.700964076+01:00"), "2026-11-26T14:36:12Z");
        assert_eq!(whole_seconds("soon"), "soon");
    }

    /// Oldest first by instant: a restic in another zone writes a later text for an earlier time.
    #[test]
    fn rows_are_ordered_by_instant() {
        let tags = ["session=s-1", "batch=app", "namespace=shop"];
        let listed = [
            snapshot("later", "2026-11-26T02:00:00Z", &tags, None),
            snapshot("earlier", "2026-11-26T03:00:00+02:00", &tags, None),
        ];
        let ids: Vec<_> = snapshot_rows(&listed, "shop", "app").into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["earlier", "later"]);
    }

    #[test]
    fn an_outcome_reads_back_as_written() {
        let outcome = JobOutcome::Report(RepositoryReport::Unlock {
            repository: "repo".into(),
            locks: vec![LockRow { id: "ab".into(), holder: "h".into(), removed: true, reason: "gone".into() }],
        });
        let text = serde_json::to_string(&outcome).expect("JSON");
        assert_eq!(serde_json::from_str::<JobOutcome>(&text).expect("parses"), outcome);
        assert!(
            render_report(&RepositoryReport::Check { repository: "r".into(), healthy: false }).contains("CHECK FAILED")
        );
    }
}
