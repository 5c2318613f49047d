//! `stash finalize-session`: once per finished session, under the repository's Lease — write the
//! manifest (complete sessions only), apply the retention policy by whole sessions, check the
//! repository when its check is due (see `integrity`), and update the Repository's status and the
//! session's conditions.

use super::executor::{AgentError, Executor};
use super::integrity::{self, Check};
use super::job::session_timeout;
use super::locks;
use super::manifest::{MANIFEST_HOST, MANIFEST_TAG};
use super::retention::{self, NAMESPACE_TAG, Ownership, Plan};
use crate::api::BackupSession;
use crate::api::backup_session::BackupSessionPhase;
use crate::api::backup_session::human_bytes;
use crate::api::common::RetentionPolicy;
use crate::api::repository::Repository;
use crate::conditions::{self, Desired};
use crate::restic::output::Snapshot;
use crate::restic::{IDS_PER_RUN, Restic};
use crate::session::invoker_selector;
use crate::status_write::update_status;
use crate::tenancy::LeaseFor;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use std::collections::BTreeSet;
use std::time::Instant;

pub const MANIFEST_WRITTEN: &str = "ManifestWritten";
pub const RETENTION_APPLIED: &str = "RetentionPolicyApplied";
pub const INTEGRITY_VERIFIED: &str = "RepositoryIntegrityVerified";
pub use crate::api::backup_session::SESSION_FINALIZED as FINALIZED;

/// What finalizing did, for the session's conditions.
struct Outcome {
    conditions: Vec<Desired>,
}

pub async fn run(executor: &Executor, session_name: &str) -> Result<(), AgentError> {
    let result = finalize_session(executor, session_name).await;
    // Every run ends with SessionFinalized, so a failure here is as visible as the session's own.
    let conditions = match &result {
        Ok(conditions) => {
            let mut conditions = conditions.clone();
            conditions.push(Desired::new(FINALIZED, true, "Finalized", "the session is finished in the repository"));
            conditions
        }
        Err(err) => vec![Desired::new(FINALIZED, false, "FinalizeFailed", err.to_string())],
    };
    record_conditions(executor, session_name, conditions).await?;
    result.map(drop)
}

async fn finalize_session(executor: &Executor, session_name: &str) -> Result<Vec<Desired>, AgentError> {
    let session = executor.session(session_name).await?;
    let phase = session.status.as_ref().and_then(|s| s.phase);
    if !matches!(phase, Some(BackupSessionPhase::Succeeded | BackupSessionPhase::Failed)) {
        return Err(AgentError::Invalid(format!("session {session_name} has not finished (phase {phase:?})")));
    }
    let batch = executor.batch(&session.spec.invoker.name).await?;
    let repository = executor.repository(&batch.spec.repository).await?;
    let mut restic = executor.restic(&repository).await?;
    let policy = batch.spec.retention_policy.as_ref();
    let deadline = Instant::now() + session_timeout();
    let finalizing = locks::exclusively(executor, &mut restic, &session, deadline, async |restic| {
        finalize(executor, restic, &repository, &session, policy).await
    });
    let outcome = executor.repository_lease(&repository, LeaseFor::Maintenance).hold_while(finalizing).await??;
    Ok(outcome.conditions)
}

async fn finalize(
    executor: &Executor,
    restic: &Restic,
    repository: &Repository,
    session: &BackupSession,
    policy: Option<&RetentionPolicy>,
) -> Result<Outcome, AgentError> {
    let batch = session.spec.invoker.name.clone();
    let name = session.name_any();
    let mut outcome = Outcome { conditions: Vec::new() };

    // The one listing of the finalize: what retention may forget must have been listed before it
    // reads which sessions are unsettled (a session that starts later writes snapshots this listing
    // never holds), and the Repository's snapshot count follows from it.
    let snapshots = restic.snapshots(&[]).await?;
    let already = snapshots.iter().find(|s| {
        retention::is_manifest(s)
            && s.tag("session") == Some(name.as_str())
            && retention::ownership(s, executor.namespace(), &batch) == Ownership::Ours
    });
    let mut written = None;
    let manifest = match already {
        Some(existing) => {
            Desired::new(MANIFEST_WRITTEN, true, "ManifestWritten", format!("manifest snapshot {}", existing.short_id))
        }
        None => match retention::manifest_of(session, &batch, &snapshots, Timestamp::now()) {
            Ok(manifest) => {
                let id = manifest.write(restic).await?.summary.snapshot_id;
                let condition =
                    Desired::new(MANIFEST_WRITTEN, true, "ManifestWritten", format!("manifest snapshot {id}"));
                written = Some(id);
                condition
            }
            Err(why) => Desired::new(
                MANIFEST_WRITTEN,
                false,
                "SessionIncomplete",
                format!("this session is not a restorable set: {why}"),
            ),
        },
    };
    outcome.conditions.push(manifest);

    let retention = match policy {
        Some(policy) => Some(plan_retention(executor, restic, &batch, &name, policy, &snapshots).await?),
        None => None,
    };
    let forgotten: BTreeSet<&str> = retention.iter().flat_map(|r| r.plan.forget.iter().map(String::as_str)).collect();
    let left: Vec<&str> = snapshots
        .iter()
        .map(|s| s.id.as_str())
        .chain(written.as_deref())
        .filter(|id| !forgotten.contains(id))
        .collect();
    let sizing = sizing(left, retention.as_ref().is_some_and(|r| r.prune));
    let measuring = async {
        match &sizing {
            Sizing::Beside(ids) => Some(restic.stored_size(ids).await),
            Sizing::After => None,
        }
    };
    let maintaining = async {
        let mut conditions = Vec::new();
        if let Some(retention) = &retention {
            for step in retention.plan.steps() {
                restic.forget(step).await?;
            }
            if retention.prune {
                restic.prune().await?;
            }
            conditions.push(Desired::new(RETENTION_APPLIED, true, "RetentionPolicyApplied", retention.message.clone()));
        }
        let integrity = match integrity::decide(Timestamp::now(), repository) {
            Check::Run { note } => {
                let passed = restic.check().await?;
                let said = if passed { "restic check found no errors" } else { "restic check reported errors" };
                let message = note.map_or_else(|| said.to_string(), |note| format!("{said}; {note}"));
                let reason = if passed { "CheckPassed" } else { "CheckFailed" };
                conditions.push(Desired::new(INTEGRITY_VERIFIED, passed, reason, message));
                Some(passed)
            }
            Check::Skip { passed, next } => {
                let message = format!(
                    "restic check passed at {passed}; the next runs after {next} (annotation {})",
                    integrity::CHECK_INTERVAL_ANNOTATION
                );
                conditions.push(Desired::new(INTEGRITY_VERIFIED, true, "CheckedRecently", message));
                None
            }
        };
        Ok::<_, AgentError>((conditions, integrity))
    };
    let (measured, maintained) = tokio::join!(measuring, maintaining);
    let (conditions, integrity) = maintained?;
    outcome.conditions.extend(conditions);
    let size = match measured {
        Some(size) => size?,
        None => restic.stored_size(&[]).await?,
    };
    let data = snapshots.iter().filter(|s| !forgotten.contains(s.id.as_str()) && s.hostname != MANIFEST_HOST).count();
    let removed = retention.as_ref().map(|r| r.plan.forget.len());
    update_repository(executor, repository, session, Counts { size, data, removed, integrity }).await?;
    Ok(outcome)
}

/// When the Repository's size is measured.
#[derive(Debug, PartialEq)]
enum Sizing<'a> {
    /// Over the snapshots retention leaves, beside its deletions and the check: forget deletes
    /// only snapshot files these do not name, and removes no data they read.
    Beside(Vec<&'a str>),
    /// Over the whole repository once retention is done: a prune rewrites the packs a measure
    /// reads, and too many ids do not fit one command line.
    After,
}

fn sizing(left: Vec<&str>, prunes: bool) -> Sizing<'_> {
    if prunes || left.is_empty() || left.len() > IDS_PER_RUN { Sizing::After } else { Sizing::Beside(left) }
}

/// restic forget flags of a policy; empty when it keeps nothing explicitly (then nothing is removed).
/// `keepTags` alone also keeps the newest manifest: restic refuses a rule that would keep nothing
/// of a group ("refusing to delete last snapshot"), and retention keeps that session anyway.
fn keep_flags(policy: &RetentionPolicy) -> Vec<String> {
    let mut flags = Vec::new();
    for (flag, value) in [
        ("--keep-last", policy.keep_last),
        ("--keep-hourly", policy.keep_hourly),
        ("--keep-daily", policy.keep_daily),
        ("--keep-weekly", policy.keep_weekly),
        ("--keep-monthly", policy.keep_monthly),
        ("--keep-yearly", policy.keep_yearly),
    ] {
        if let Some(n) = value.filter(|n| *n > 0) {
            flags.extend([flag.to_string(), n.to_string()]);
        }
    }
    let counted = !flags.is_empty();
    for tag in &policy.keep_tags {
        flags.extend(["--keep-tag".to_string(), tag.clone()]);
    }
    if !counted && !flags.is_empty() {
        flags.extend(["--keep-last".to_string(), "1".to_string()]);
    }
    flags
}

/// Retention by whole sessions: restic's keep rules pick among this namespace's manifests (dated at
/// their sessions' start), and `retention::plan` decides what is forgotten — never the newest complete
/// session, nor any session not finalized yet. Per-host retention would break the sets. `listed` is
/// the repository as the finalize listed it first. Deletes nothing: the finalize applies the plan.
async fn plan_retention(
    executor: &Executor,
    restic: &Restic,
    batch: &str,
    current: &str,
    policy: &RetentionPolicy,
    listed: &[Snapshot],
) -> Result<Retention, AgentError> {
    let flags = keep_flags(policy);
    if flags.is_empty() {
        let message = "the policy keeps everything".into();
        return Ok(Retention { plan: Plan::default(), prune: false, message });
    }
    let namespace = executor.namespace();
    // The dry run only reads, under the maintenance Lease: restic's lock would add its 200 ms of
    // settling, and the forget that acts on the plan takes the exclusive lock anyway.
    let mut args = vec![
        "forget".to_string(),
        "--json".into(),
        "--dry-run".into(),
        "--no-lock".into(),
        "--group-by".into(),
        "host".into(),
        "--host".into(),
        MANIFEST_HOST.into(),
        "--tag".into(),
        format!("{MANIFEST_TAG},batch={batch},{NAMESPACE_TAG}={namespace}"),
    ];
    args.extend(flags);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let planned = dry_run(&restic.run_listing(&argv).await?)?;
    let kept_by_policy: BTreeSet<String> =
        planned.keep.iter().filter_map(|s| s.tag("session").map(str::to_string)).collect();

    let unsettled: BTreeSet<String> = executor
        .api::<BackupSession>()
        .list(&ListParams::default().labels(&invoker_selector(batch)))
        .await?
        .items
        .into_iter()
        .filter(|s| s.name_any() != current && !s.is_settled())
        .map(|s| s.name_any())
        .collect();
    // The listing plus the manifest this finalize wrote, which the keep rules' run listed after it.
    let mut snapshots = listed.to_vec();
    let known: BTreeSet<String> = listed.iter().map(|s| s.id.clone()).collect();
    snapshots.extend(planned.keep.into_iter().chain(planned.remove).filter(|s| !known.contains(&s.id)));
    let plan = retention::plan(&retention::Observed {
        namespace,
        batch,
        snapshots: &snapshots,
        kept_by_policy: &kept_by_policy,
        unsettled: &unsettled,
    });
    let sessions = plan.keep.iter().cloned().collect::<Vec<_>>().join(", ");
    if policy.dry_run {
        let message = format!("dry run: would forget {} snapshots; keeping sessions {sessions}", plan.forget.len());
        return Ok(Retention { plan: Plan::default(), prune: false, message });
    }
    let message = format!("forgot {} snapshots; keeping sessions {sessions}", plan.forget.len());
    Ok(Retention { prune: policy.prune && !plan.forget.is_empty(), plan, message })
}

/// What retention will do: the snapshots to forget, whether a prune follows, and what to say.
struct Retention {
    plan: Plan,
    prune: bool,
    message: String,
}

/// What `restic forget --dry-run --json` would keep and remove, over every group.
#[derive(Debug, Default)]
struct DryRun {
    keep: Vec<Snapshot>,
    remove: Vec<Snapshot>,
}

fn dry_run(forget_json: &str) -> Result<DryRun, AgentError> {
    #[derive(serde::Deserialize)]
    struct Group {
        #[serde(default)]
        keep: Option<Vec<Snapshot>>,
        #[serde(default)]
        remove: Option<Vec<Snapshot>>,
    }
    let text = forget_json.lines().rev().find(|l| l.starts_with('[')).unwrap_or("[]");
    let groups: Vec<Group> = serde_json::from_str(text)
        .map_err(|e| AgentError::Invalid(format!("restic forget printed unexpected JSON: {e}")))?;
    Ok(groups.into_iter().fold(DryRun::default(), |mut all, group| {
        all.keep.extend(group.keep.unwrap_or_default());
        all.remove.extend(group.remove.unwrap_or_default());
        all
    }))
}

/// What the finalize learnt about the repository, for its status.
struct Counts {
    /// Bytes the repository stores (`restic stats --mode raw-data`).
    size: u64,
    /// Snapshots of members (not manifests) left after retention.
    data: usize,
    /// Snapshots retention forgot; None when the batch has no policy.
    removed: Option<usize>,
    /// The check's verdict, when it ran.
    integrity: Option<bool>,
}

async fn update_repository(
    executor: &Executor,
    repository: &Repository,
    session: &BackupSession,
    counts: Counts,
) -> Result<(), AgentError> {
    let Counts { size, data, removed, integrity } = counts;
    let succeeded = session.status.as_ref().and_then(|s| s.phase) == Some(BackupSessionPhase::Succeeded);
    let now = Time(Timestamp::now());
    let current = repository.status.clone().unwrap_or_default();
    let mut status = serde_json::json!({
        "totalSize": human_bytes(size),
        "snapshotCount": data,
    });
    if let Some(integrity) = integrity {
        status["integrity"] = integrity.into();
        status["lastIntegrityCheckTime"] = serde_json::to_value(&now).unwrap_or_default();
    }
    if succeeded {
        status["lastBackupTime"] = serde_json::to_value(&now).unwrap_or_default();
        if current.first_backup_time.is_none() {
            status["firstBackupTime"] = serde_json::to_value(&now).unwrap_or_default();
        }
    }
    if let Some(removed) = removed {
        status["snapshotsRemovedOnLastCleanup"] = removed.into();
    }
    let api: Api<Repository> = Api::namespaced(
        executor.client.clone(),
        &repository.namespace().unwrap_or_else(|| executor.namespace().into()),
    );
    api.patch_status(
        &repository.name_any(),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// Adds the finalize conditions to the session, retrying on conflict with the operator's writes.
async fn record_conditions(executor: &Executor, session: &str, conditions: Vec<Desired>) -> Result<(), AgentError> {
    update_status(&executor.api::<BackupSession>(), session, |current| {
        let generation = current.metadata.generation;
        let status = current.status.get_or_insert_with(Default::default);
        for desired in &conditions {
            conditions::set(&mut status.conditions, desired, generation);
        }
        true
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_the_policy_names() {
        let policy = RetentionPolicy {
            keep_last: Some(5),
            keep_daily: Some(7),
            keep_tags: vec!["monthly".into()],
            ..Default::default()
        };
        assert_eq!(keep_flags(&policy), ["--keep-last", "5", "--keep-daily", "7", "--keep-tag", "monthly"]);
        assert!(keep_flags(&RetentionPolicy::default()).is_empty());
        let tags_alone = RetentionPolicy { keep_tags: vec!["pinned".into()], ..Default::default() };
        assert_eq!(keep_flags(&tags_alone), ["--keep-tag", "pinned", "--keep-last", "1"]);
    }

    #[test]
    fn the_size_is_measured_beside_retention_unless_a_prune_or_the_command_line_forbids_it() {
        assert_eq!(sizing(vec!["a", "b"], false), Sizing::Beside(vec!["a", "b"]));
        assert_eq!(sizing(vec!["a", "b"], true), Sizing::After);
        assert_eq!(sizing(Vec::new(), false), Sizing::After, "no ids means every snapshot to restic");
        assert_eq!(sizing(vec!["a"; IDS_PER_RUN + 1], false), Sizing::After);
    }

    #[test]
    fn reads_the_kept_manifests() {
        let json = r#"[{"tags":null,"host":"stash-manifest","paths":null,"keep":[{"id":"a","time":"2026-11-25T07:00:00Z","tags":["session=s2"]}],"remove":[{"id":"b","time":"2026-11-24T07:00:00Z","tags":["session=s1"]}],"reasons":[]}]"#;
        let planned = dry_run(json).unwrap();
        assert_eq!(planned.keep.len(), 1);
        assert_eq!(planned.keep[0].tag("session"), Some("s2"));
        assert_eq!(planned.remove[0].tag("session"), Some("s1"));
        assert!(dry_run("[]").unwrap().keep.is_empty());
    }
}
