//! A host writes its own entry into `BackupSession.status.targets[]`, and nothing else: the write
//! carries the resourceVersion it read and is retried on conflict, so hosts never clobber each other.

use crate::api::BackupSession;
use crate::api::backup_session::BackupSessionPhase;
use crate::api::backup_session::FileStats;
use crate::api::backup_session::{
    BackupTargetStatus, HostBackupStats, HostPhase, HostProgress, SnapshotStats, TargetPhase, human_bytes,
};
use crate::api::common::TargetRef;
use crate::restic::BackupOutcome;
use crate::status_write::update_status;
use kube::api::Api;
use std::time::Duration;

/// What a host should do about a session, read from its status.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    /// The target is Running and this host has no entry yet.
    Now,
    /// Not yet (Pending, or Sequential order not there yet).
    Later,
    /// Done, or the session is over.
    Never,
}

pub fn matches(reference: &TargetRef, kind: &str, name: &str) -> bool {
    reference.kind == kind && reference.name == name
}

pub fn target_status<'a>(session: &'a BackupSession, kind: &str, name: &str) -> Option<&'a BackupTargetStatus> {
    session.status.as_ref()?.targets.iter().find(|t| matches(&t.reference, kind, name))
}

/// Whether `host` of target `kind/name` should back up now.
pub fn turn(session: &BackupSession, kind: &str, name: &str, host: &str) -> Turn {
    let Some(status) = session.status.as_ref() else { return Turn::Later };
    match status.phase {
        Some(BackupSessionPhase::Running) => {}
        None | Some(BackupSessionPhase::Pending) => return Turn::Later,
        _ => return Turn::Never,
    }
    let Some(target) = target_status(session, kind, name) else { return Turn::Never };
    if target.stats.iter().any(|s| s.hostname == host) {
        return Turn::Never;
    }
    match target.phase {
        Some(TargetPhase::Running) => Turn::Now,
        Some(TargetPhase::Succeeded | TargetPhase::Failed) => Turn::Never,
        _ => Turn::Later,
    }
}

/// Appends `stats` to the target's entries unless this host already reported; its live progress
/// entry goes with it.
pub async fn report_host(
    sessions: &Api<BackupSession>,
    session: &str,
    kind: &str,
    name: &str,
    stats: HostBackupStats,
) -> Result<(), kube::Error> {
    update_status(sessions, session, |current| {
        let Some(target) =
            current.status.as_mut().and_then(|s| s.targets.iter_mut().find(|t| matches(&t.reference, kind, name)))
        else {
            tracing::warn!(session, kind, name, "the session lists no such target; nothing reported");
            return false;
        };
        if target.stats.iter().any(|s| s.hostname == stats.hostname) {
            return false;
        }
        target.stats.push(stats.clone());
        target.progress.retain(|p| p.hostname != stats.hostname);
        if let Some(status) = current.status.as_mut() {
            status.summarize_progress();
        }
        true
    })
    .await
}

/// Replaces this host's live progress entry, unless it has reported already (a late sample must
/// not outlive the report).
pub async fn report_progress(
    sessions: &Api<BackupSession>,
    session: &str,
    kind: &str,
    name: &str,
    entry: &HostProgress,
) -> Result<(), kube::Error> {
    update_status(sessions, session, |current| {
        let Some(status) = current.status.as_mut() else { return false };
        let Some(target) = status.targets.iter_mut().find(|t| matches(&t.reference, kind, name)) else {
            return false;
        };
        if target.phase != Some(TargetPhase::Running) || target.stats.iter().any(|s| s.hostname == entry.hostname) {
            return false;
        }
        match target.progress.iter_mut().find(|p| p.hostname == entry.hostname) {
            Some(existing) => *existing = entry.clone(),
            None => target.progress.push(entry.clone()),
        }
        status.summarize_progress();
        true
    })
    .await
}

/// A successful host entry from restic's summary.
pub fn succeeded(host: &str, path: String, outcome: &BackupOutcome, took: Duration) -> HostBackupStats {
    let summary = &outcome.summary;
    HostBackupStats {
        hostname: host.into(),
        phase: Some(HostPhase::Succeeded),
        snapshots: vec![SnapshotStats {
            name: summary.snapshot_id.clone(),
            path: Some(path),
            total_size: Some(human_bytes(summary.total_bytes_processed)),
            uploaded: Some(human_bytes(summary.data_added)),
            processing_time: Some(seconds(Duration::from_secs_f64(summary.total_duration.max(0.0)))),
            file_stats: Some(FileStats {
                total_files: Some(summary.total_files_processed),
                new_files: Some(summary.files_new),
                modified_files: Some(summary.files_changed),
                unmodified_files: Some(summary.files_unmodified),
            }),
        }],
        duration: Some(seconds(took)),
        error: None,
    }
}

pub fn failed(host: &str, error: String, took: Duration) -> HostBackupStats {
    HostBackupStats {
        hostname: host.into(),
        phase: Some(HostPhase::Failed),
        snapshots: Vec::new(),
        duration: Some(seconds(took)),
        error: Some(error),
    }
}

/// `12.3s`: a Go-style duration with one decimal.
pub fn seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_durations() {
        assert_eq!(seconds(Duration::from_millis(12_345)), "12.3s");
    }
}
