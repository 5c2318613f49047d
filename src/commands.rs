//! The everyday commands: back up now, pause, resume, list sessions.

use crate::api::{BackupBatch, BackupSession};
use crate::session::{INVOKER_NAME_LABEL, SessionError, create_backup_session};
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
    let mut items = sessions.list(&ListParams::default().labels(&format!("{INVOKER_NAME_LABEL}={batch}"))).await?.items;
    items.sort_by(|a, b| b.metadata.creation_timestamp.cmp(&a.metadata.creation_timestamp));
    let mut out = format!("{:<40} {:<10} {:<10} {:<9} {}\n", "NAME", "PHASE", "DURATION", "TARGETS", "CREATED");
    for session in items {
        let status = session.status.clone().unwrap_or_default();
        let phase = status.phase.map_or("Pending".to_string(), |p| format!("{p:?}"));
        let done = status
            .targets
            .iter()
            .filter(|t| t.phase == Some(crate::api::backup_session::TargetPhase::Succeeded))
            .count();
        let created = session.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<40} {:<10} {:<10} {:<9} {}",
            session.name_any(),
            phase,
            status.session_duration.unwrap_or_else(|| "-".into()),
            format!("{done}/{}", status.targets.len()),
            created
        );
    }
    Ok(out)
}
