//! The everyday commands: back up now, pause, resume, list sessions.

use crate::agent::status::human_bytes;
use crate::agent::{AgentError, Executor, manifest};
use crate::api::{BackupBatch, BackupSession};
use crate::session::{SessionError, create_backup_session, invoker_selector};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use std::fmt::Write;

/// Creates a session for `batch` now; returns its name.
pub async fn trigger(client: Client, namespace: &str, batch: &str) -> Result<String, SessionError> {
    Ok(create_backup_session(client, namespace, batch, None).await?.name_any())
}

/// Sets `spec.paused`; the controller suspends or resumes the trigger CronJob.
pub async fn set_paused(client: Client, namespace: &str, batch: &str, paused: bool) -> Result<(), SessionError> {
    let batches: Api<BackupBatch> = Api::namespaced(client, namespace);
    if batches.get_opt(batch).await?.is_none() {
        return Err(SessionError::BatchNotFound { namespace: namespace.into(), name: batch.into() });
    }
    let patch = serde_json::json!({"spec": {"paused": paused}});
    batches.patch(batch, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// A table of the batch's sessions, newest first.
pub async fn sessions_table(client: Client, namespace: &str, batch: &str) -> Result<String, SessionError> {
    let sessions: Api<BackupSession> = Api::namespaced(client, namespace);
    let mut items = sessions.list(&ListParams::default().labels(&invoker_selector(batch))).await?.items;
    items.sort_by(|a, b| b.metadata.creation_timestamp.cmp(&a.metadata.creation_timestamp));
    let mut out =
        format!("{:<40} {:<10} {:<10} {:<9} {:<11} {}\n", "NAME", "PHASE", "DURATION", "TARGETS", "SIZE", "CREATED");
    for session in items {
        let status = session.status.clone().unwrap_or_default();
        let phase = status.phase.map_or("Pending".to_string(), |p| format!("{p:?}"));
        let done = status
            .targets
            .iter()
            .filter(|t| t.phase == Some(crate::api::backup_session::TargetPhase::Succeeded))
            .count();
        let created = session.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
        let sizes = status.targets.iter().flat_map(|t| &t.stats).flat_map(|h| &h.snapshots);
        let bytes: u64 = sizes.filter_map(|s| s.total_size.as_deref().and_then(parse_bytes)).sum();
        let _ = writeln!(
            out,
            "{:<40} {:<10} {:<10} {:<9} {:<11} {}",
            session.name_any(),
            phase,
            status.session_duration.unwrap_or_else(|| "-".into()),
            format!("{done}/{}", status.targets.len()),
            if bytes == 0 { "-".to_string() } else { human_bytes(bytes) },
            created
        );
    }
    Ok(out)
}

/// `12.5 MiB` → bytes (what `human_bytes` wrote into a status).
fn parse_bytes(text: &str) -> Option<u64> {
    let (number, unit) = text.split_once(' ')?;
    let power = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"].iter().position(|u| *u == unit)?;
    let value: f64 = number.parse().ok()?;
    Some((value * 1024f64.powi(i32::try_from(power).ok()?)) as u64)
}

/// The complete sessions of `batch` as its repository's manifests record them, newest first.
pub async fn repository_sessions_table(executor: &Executor, batch: &str) -> Result<String, AgentError> {
    let batch_object = executor.batch(batch).await?;
    let repository = executor.repository(&batch_object.spec.repository).await?;
    let restic = executor.restic(&repository).await?;
    let mut out = format!("{:<40} {:<32} {:<8} {}\n", "SESSION", "FINISHED", "MEMBERS", "SIZE");
    for snapshot in manifest::list(&restic, executor.namespace(), batch).await?.iter().rev() {
        let manifest = manifest::read(&restic, snapshot).await?;
        let hosts = manifest.members.iter().flat_map(|m| &m.hosts);
        let bytes: u64 = hosts.filter_map(|h| h.total_size.as_deref().and_then(parse_bytes)).sum();
        let _ = writeln!(
            out,
            "{:<40} {:<32} {:<8} {}",
            manifest.session,
            manifest.end_time,
            manifest.members.len(),
            human_bytes(bytes)
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_back() {
        assert_eq!(parse_bytes("512 B"), Some(512));
        assert_eq!(parse_bytes("1.5 KiB"), Some(1536));
        assert_eq!(parse_bytes(&human_bytes(50 * 1024 * 1024)), Some(50 * 1024 * 1024));
        assert_eq!(parse_bytes("lots"), None);
    }
}
