//! The everyday commands: back up now, pause, resume, list sessions.

use crate::agent::{AgentError, Executor, manifest};
use crate::api::backup_session::{SESSION_FINALIZED, human_bytes, parse_bytes};
use crate::api::{BackupBatch, BackupSession, Repository};
use crate::controller::observed::unfinalized;
use crate::controller::trigger::next_run;
use crate::session::{SessionError, create_backup_session, invoker_selector};
use k8s_openapi::jiff::Timestamp;
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
    Ok(render_sessions(batch_sessions(client, namespace, batch).await?))
}

/// The batch's sessions, newest first.
pub async fn batch_sessions(client: Client, namespace: &str, batch: &str) -> Result<Vec<BackupSession>, SessionError> {
    let sessions: Api<BackupSession> = Api::namespaced(client, namespace);
    let mut items = sessions.list(&ListParams::default().labels(&invoker_selector(batch))).await?.items;
    items.sort_by(|a, b| b.metadata.creation_timestamp.cmp(&a.metadata.creation_timestamp));
    Ok(items)
}

/// `stash describe`: the batch, its schedule and next run, its Repository's state, its last
/// success, its conditions and members', and its latest sessions, on one screen.
pub async fn describe(client: Client, namespace: &str, batch: &str) -> Result<String, SessionError> {
    let found = description(client, namespace, batch).await?;
    Ok(render_description(&found.batch, found.repository.as_ref(), &found.sessions, Timestamp::now()))
}

/// What `describe` shows, as the objects themselves (`-o json|yaml`).
#[derive(Debug, serde::Serialize)]
pub struct Description {
    pub batch: BackupBatch,
    pub repository: Option<Repository>,
    pub sessions: Vec<BackupSession>,
}

/// The batch, its Repository when readable here, and its sessions, newest first.
pub async fn description(client: Client, namespace: &str, batch: &str) -> Result<Description, SessionError> {
    let batches: Api<BackupBatch> = Api::namespaced(client.clone(), namespace);
    let Some(found) = batches.get_opt(batch).await? else {
        return Err(SessionError::BatchNotFound { namespace: namespace.into(), name: batch.into() });
    };
    let reference = &found.spec.repository;
    let repository_namespace = reference.namespace.clone().unwrap_or_else(|| namespace.to_string());
    let repositories: Api<Repository> = Api::namespaced(client.clone(), &repository_namespace);
    // Unreadable (another namespace's, or not allowed to this user) reads as unknown, not as an error.
    let repository = repositories.get_opt(&reference.name).await.ok().flatten();
    let sessions = batch_sessions(client, namespace, batch).await?;
    Ok(Description { batch: found, repository, sessions })
}

/// How many sessions `describe` shows.
const DESCRIBED_SESSIONS: usize = 5;

fn render_description(
    batch: &BackupBatch,
    repository: Option<&Repository>,
    sessions: &[BackupSession],
    now: Timestamp,
) -> String {
    let status = batch.status.clone().unwrap_or_default();
    let mut out = String::new();
    let phase = status.phase.map_or_else(|| "-".to_string(), |p| format!("{p:?}"));
    let _ =
        writeln!(out, "{:<14}{}/{}   {phase}", "BackupBatch:", batch.namespace().unwrap_or_default(), batch.name_any());
    let schedule = match batch.spec.schedule.as_deref() {
        None => "none (sessions only when triggered)".to_string(),
        Some(_) if batch.spec.paused => "paused".to_string(),
        Some(cron) => match next_run(cron, now) {
            Some(next) => format!("{cron}   next run {next}"),
            None => format!("{cron}   (no next run: not a valid schedule)"),
        },
    };
    let _ = writeln!(out, "{:<14}{schedule}", "Schedule:");
    let repository_line = match repository {
        None => format!("{} (not readable here)", batch.spec.repository.name),
        Some(repository) => {
            let state = repository.status.clone().unwrap_or_default();
            let integrity = match (state.integrity, &state.last_integrity_check_time) {
                (Some(true), Some(t)) => format!("check passed {}", t.0),
                (Some(false), Some(t)) => format!("CHECK FAILED {}", t.0),
                _ => "not checked yet".into(),
            };
            let snapshots = state.snapshot_count.map_or_else(|| "-".to_string(), |n| n.to_string());
            let size = state.total_size.unwrap_or_else(|| "-".into());
            format!("{}   {integrity}   {snapshots} snapshots   {size}", repository.name_any())
        }
    };
    let _ = writeln!(out, "{:<14}{repository_line}", "Repository:");
    let last = status.last_successful_session.as_ref().map_or_else(
        || "none yet".to_string(),
        |r| format!("{} at {}", r.name, r.finish_time.as_ref().map_or_else(|| "-".to_string(), |t| t.0.to_string())),
    );
    let _ = writeln!(out, "{:<14}{last}", "Last success:");
    let namespace = batch.namespace().unwrap_or_default();
    let waiting = unfinalized(&namespace, &batch.name_any(), sessions);
    if waiting.count > 0 {
        // A finalize that keeps failing: the session is no restorable set until it completes.
        let oldest = waiting.oldest.map_or_else(String::new, |(finished, session)| {
            let said = session.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == SESSION_FINALIZED));
            let said = said.map(|c| format!(": {}", c.message.as_deref().unwrap_or("-"))).unwrap_or_default();
            format!("; the oldest, {}, finished {finished}{said}", session.name_any())
        });
        let _ = writeln!(out, "{:<14}{} finished, not finalized yet{oldest}", "Finalizing:", waiting.count);
    }
    let _ = writeln!(out, "\nConditions:");
    for c in &status.conditions {
        let _ = writeln!(
            out,
            "  {:<22} {:<8} {:<28} {}",
            c.type_,
            format!("{:?}", c.status),
            c.reason.as_deref().unwrap_or("-"),
            c.message.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(out, "\nMembers:");
    for member in &batch.spec.members {
        let reference = &member.target.reference;
        let conditions = status.member_conditions.iter().find(|m| m.target == *reference);
        let summary: Vec<String> = conditions
            .into_iter()
            .flat_map(|m| &m.conditions)
            .map(|c| {
                format!(
                    "{}={:?}{}",
                    c.type_,
                    c.status,
                    c.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "  {:<16} {:<40} {}",
            member.target.host_alias(),
            format!("{}/{}", reference.kind, reference.name),
            if summary.is_empty() { "-".to_string() } else { summary.join(", ") }
        );
    }
    let running: Vec<String> = sessions.iter().flat_map(live_progress).collect();
    if !running.is_empty() {
        let _ = writeln!(out, "\nRunning now:");
        for line in &running {
            let _ = writeln!(out, "  {line}");
        }
    }
    let _ = writeln!(out, "\nSessions (newest first):");
    out.push_str(&render_sessions(sessions.iter().take(DESCRIBED_SESSIONS).cloned().collect()));
    out
}

/// One line per host of `session` still backing up, and the session's `Stalled` condition if True.
fn live_progress(session: &BackupSession) -> Vec<String> {
    let Some(status) = session.status.as_ref() else { return Vec::new() };
    let mut lines: Vec<String> = status
        .targets
        .iter()
        .flat_map(|t| t.progress.iter().map(move |host| (t, host)))
        .map(|(target, host)| {
            let size = |n: i64| human_bytes(u64::try_from(n).unwrap_or(0));
            let eta = host.seconds_remaining.map(|s| format!(", ETA {s}s")).unwrap_or_default();
            format!(
                "{} {}/{} host {}: {}% {}/{}, {}/{} files{eta}, last moved {}",
                session.name_any(),
                target.reference.kind,
                target.reference.name,
                host.hostname,
                host.percent,
                size(host.bytes_done),
                size(host.total_bytes),
                host.files_done,
                host.total_files,
                host.last_change.0
            )
        })
        .collect();
    if let Some(stalled) = crate::controller::progress::stalled_condition(Some(status)) {
        lines.push(format!("{} STALLED: {}", session.name_any(), stalled.message.as_deref().unwrap_or("")));
    }
    lines
}

pub fn render_sessions(items: Vec<BackupSession>) -> String {
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
    out
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
    fn a_description_says_what_runs_next_and_what_last_succeeded() {
        let batch: BackupBatch = serde_json::from_value(serde_json::json!({
            "apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch",
            "metadata": {"name": "site", "namespace": "shop"},
            "spec": {"repository": {"name": "repo"}, "schedule": "30 2 * * *", "members": [
                {"target": {"alias": "web", "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}}}]},
            "status": {"phase": "Ready",
                "conditions": [{"type": "RepositoryFound", "status": "True", "reason": "RepositoryAvailable"}],
                "memberConditions": [{"target": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                    "conditions": [{"type": "StashSidecarInjected", "status": "True", "reason": "Injected"}]}],
                "lastSuccessfulSession": {"name": "site-1", "phase": "Succeeded", "finishTime": "2026-11-25T02:31:00Z"}}
        }))
        .expect("a batch");
        let now: Timestamp = "2026-11-26T10:00:00Z".parse().expect("time");
        let text = render_description(&batch, None, &[], now);
        assert!(text.contains("shop/site   Ready"), "{text}");
        assert!(text.contains("next run 2026-11-27T02:30:00Z"), "{text}");
        assert!(text.contains("repo (not readable here)"), "{text}");
        assert!(text.contains("site-1 at 2026-11-25T02:31:00Z"), "{text}");
        assert!(text.contains("StashSidecarInjected=True (Injected)"), "{text}");
        let mut paused = batch.clone();
        paused.spec.paused = true;
        assert!(render_description(&paused, None, &[], now).contains("Schedule:     paused"));

        let running: BackupSession = serde_json::from_value(serde_json::json!({
            "apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupSession",
            "metadata": {"name": "site-2", "namespace": "shop"},
            "spec": {"invoker": {"apiGroup": "stash.appscode.com", "kind": "BackupBatch", "name": "site"}},
            "status": {"phase": "Running", "progress": "42% 430.0 MiB/1.0 GiB",
                "conditions": [{"type": "Stalled", "status": "True", "reason": "NoProgress", "message": "Deployment/web host web: no progress since 2026-11-26T09:50:00Z (42%)"}],
                "targets": [{"ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}, "phase": "Running",
                    "progress": [{"hostname": "web", "percent": 42, "bytesDone": 450_887_680_i64, "totalBytes": 1_073_741_824_i64,
                        "filesDone": 12, "totalFiles": 18, "secondsRemaining": 90, "lastChange": "2026-11-26T09:50:00Z"}]}]}
        }))
        .expect("a session");
        let text = render_description(&batch, None, &[running], now);
        assert!(
            text.contains("site-2 Deployment/web host web: 42% 430.0 MiB/1.0 GiB, 12/18 files, ETA 90s, last moved 2026-11-26T09:50:00Z"),
            "{text}"
        );
        assert!(text.contains("site-2 STALLED: Deployment/web host web: no progress since"), "{text}");
        assert!(!text.contains("Finalizing:"), "nothing waits on a finalize: {text}");

        let waiting: BackupSession = serde_json::from_value(serde_json::json!({
            "apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupSession",
            "metadata": {"name": "site-1b", "namespace": "shop", "creationTimestamp": "2026-11-26T02:30:00Z"},
            "spec": {"invoker": {"apiGroup": "stash.appscode.com", "kind": "BackupBatch", "name": "site"}},
            "status": {"phase": "Succeeded", "sessionDuration": "90s", "conditions": [{"type": "SessionFinalized",
                "status": "False", "reason": "FinalizeFailed", "message": "the backend refused the connection"}]}
        }))
        .expect("a session");
        let text = render_description(&batch, None, &[waiting], now);
        assert!(
            text.contains("Finalizing:   1 finished, not finalized yet; the oldest, site-1b, finished 2026-11-26T02:31:30Z: the backend refused the connection"),
            "{text}"
        );
    }

    #[test]
    fn sizes_read_back() {
        assert_eq!(parse_bytes("512 B"), Some(512));
        assert_eq!(parse_bytes("1.5 KiB"), Some(1536));
        assert_eq!(parse_bytes(&human_bytes(50 * 1024 * 1024)), Some(50 * 1024 * 1024));
        assert_eq!(parse_bytes("lots"), None);
    }
}
