//! The per-object metric series, computed from API objects only (a batch with its status, its
//! sessions, its Repository; the RestoreBatches), so that a restarted operator or a new leader
//! exports the same values. The controllers hand these to `StateMetrics::export`.

use super::trigger::next_run;
use crate::api::backup_batch::Driver;
use crate::api::backup_session::{BackupSessionPhase, BackupSessionStatus, parse_bytes};
use crate::api::common::Condition;
use crate::api::restore_batch::RestorePhase;
use crate::api::{BackupBatch, BackupSession, Repository, RestoreBatch};
use crate::metrics::{Sample, SeriesLabels, StateGauge};
use crate::session::BACKUP_BATCH_KIND;
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The owner under which a batch's series are exported and removed.
pub(crate) fn batch_owner(namespace: &str, name: &str) -> String {
    format!("BackupBatch/{namespace}/{name}")
}

/// The labels of a batch's own series; `phase` for its session counter.
pub(crate) fn batch_labels(namespace: &str, batch: &str, phase: Option<&str>) -> SeriesLabels {
    let mut labels = vec![("namespace", namespace.to_string()), ("batch", batch.to_string())];
    labels.extend(phase.map(|phase| ("phase", phase.to_string())));
    labels
}

/// The owner of the RestoreBatch series, which are computed over all RestoreBatches at once.
pub(crate) const RESTORES_OWNER: &str = "RestoreBatches";

/// The series of one batch at `now`: from its status (last sessions, conditions), its spec
/// (schedule, paused), its last finished session among `sessions` (duration, bytes, targets), and
/// its Repository's status. `sessions` may hold other batches' sessions; only its own are read.
pub(crate) fn batch_series(
    batch: &BackupBatch,
    sessions: &[Arc<BackupSession>],
    repository: Option<&Repository>,
    now: Timestamp,
) -> Vec<Sample> {
    let namespace = batch.namespace().unwrap_or_default();
    let name = batch.name_any();
    let ours = batch_labels(&namespace, &name, None);
    let stash = stash_labels(batch, batch.spec.driver, &batch.spec.repository.name);
    let mut out = Vec::new();
    let mut push = |gauge, labels: &SeriesLabels, value: f64| out.push(Sample { gauge, labels: labels.clone(), value });

    push(StateGauge::Paused, &ours, f64::from(u8::from(batch.spec.paused)));
    if let Some(created) = &batch.metadata.creation_timestamp {
        push(StateGauge::Created, &ours, created.0.as_second() as f64);
    }
    if let Some(interval) = batch.spec.schedule.as_deref().and_then(|cron| expected_interval(cron, now)) {
        push(StateGauge::ExpectedInterval, &ours, interval);
    }

    let status = batch.status.clone().unwrap_or_default();
    let success_time = status.last_successful_session.as_ref().and_then(|r| r.finish_time.as_ref());
    if let Some(finished) = success_time {
        push(StateGauge::LastSuccess, &ours, finished.0.as_second() as f64);
        push(StateGauge::StashLastSuccess, &stash, finished.0.as_second() as f64);
    }
    if let Some(last) = &status.last_session {
        let succeeded = f64::from(u8::from(last.phase == BackupSessionPhase::Succeeded));
        push(StateGauge::LastSessionSuccess, &ours, succeeded);
        push(StateGauge::StashSessionSuccess, &stash, succeeded);
        let session = sessions.iter().find(|s| s.name_any() == last.name && s.namespace().as_ref() == Some(&namespace));
        if let Some(session_status) = session.and_then(|s| s.status.as_ref()) {
            if let Some(seconds) = session_status.session_duration.as_deref().and_then(duration_seconds) {
                push(StateGauge::StashSessionDuration, &stash, seconds);
            }
            push(StateGauge::StashTargetCount, &stash, session_status.targets.len() as f64);
            push(StateGauge::LastSessionAddedBytes, &ours, added_bytes(session_status) as f64);
        }
    }

    let batch_conditions = status.conditions.iter().map(|c| (String::new(), c));
    let member_conditions = status.member_conditions.iter().flat_map(|member| {
        let target = format!("{}/{}", member.target.kind, member.target.name);
        member.conditions.iter().map(move |c| (target.clone(), c))
    });
    for (target, condition) in batch_conditions.chain(member_conditions) {
        push(StateGauge::Condition, &condition_labels(&ours, target, condition), 1.0);
    }

    let waiting = unfinalized(&namespace, &name, sessions.iter().map(|s| &**s));
    push(StateGauge::UnfinalizedSessions, &ours, waiting.count as f64);
    if let Some((since, _)) = waiting.oldest {
        push(StateGauge::UnfinalizedSince, &ours, since.as_second() as f64);
    }

    if let Some(state) = repository.and_then(|r| r.status.as_ref()) {
        if let Some(integrity) = state.integrity {
            push(StateGauge::StashRepositoryIntegrity, &stash, f64::from(u8::from(integrity)));
        }
        if let Some(size) = state.total_size.as_deref().and_then(parse_bytes) {
            push(StateGauge::StashRepositorySize, &stash, size as f64);
        }
        if let Some(count) = state.snapshot_count {
            push(StateGauge::StashRepositorySnapshots, &stash, count as f64);
        }
        if let Some(removed) = state.snapshots_removed_on_last_cleanup {
            push(StateGauge::StashRepositorySnapshotsCleaned, &stash, removed as f64);
        }
    }
    out
}

/// A batch's finished sessions whose finalize has not completed yet.
#[derive(Debug, Default)]
pub(crate) struct Unfinalized<'a> {
    pub count: usize,
    /// The one of them that finished first, and when.
    pub oldest: Option<(Timestamp, &'a BackupSession)>,
}

/// The sessions of `batch` among `sessions` that finished (Succeeded or Failed) and are not
/// finalized: until its finalize completes a session is no restorable set, and retention keeps
/// its data. A finalize that keeps failing is retried for as long as the session exists; this is
/// what shows it before the batch's last success grows old.
pub(crate) fn unfinalized<'a>(
    namespace: &str,
    batch: &str,
    sessions: impl IntoIterator<Item = &'a BackupSession>,
) -> Unfinalized<'a> {
    let waiting = sessions.into_iter().filter(|s| {
        let phase = s.status.as_ref().and_then(|st| st.phase);
        s.spec.invoker.kind == BACKUP_BATCH_KIND
            && s.spec.invoker.name == batch
            && s.namespace().as_deref() == Some(namespace)
            && s.metadata.deletion_timestamp.is_none()
            && matches!(phase, Some(BackupSessionPhase::Succeeded | BackupSessionPhase::Failed))
            && !s.is_settled()
    });
    waiting.fold(Unfinalized::default(), |seen, session| {
        let finished = finish_time(session).map(|t| (t, session));
        let oldest = match (seen.oldest, finished) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        };
        Unfinalized { count: seen.count + 1, oldest }
    })
}

/// When a finished session finished: its creation plus its duration, so that every controller
/// computes the same time for it.
pub(crate) fn finish_time(session: &BackupSession) -> Option<Timestamp> {
    let created = session.metadata.creation_timestamp.as_ref()?.0;
    let duration = session.status.as_ref()?.session_duration.as_deref()?;
    let seconds: i64 = duration.trim_end_matches('s').parse().ok()?;
    created.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(seconds)).ok()
}

/// The RestoreBatches by namespace and phase, and each finished one's outcome and duration under
/// Stash's names. Objects being deleted are left out: their series go with them.
pub(crate) fn restore_series(restores: &[Arc<RestoreBatch>]) -> Vec<Sample> {
    let live = restores.iter().filter(|r| r.metadata.deletion_timestamp.is_none());
    let mut by_phase: BTreeMap<(String, String), u32> = BTreeMap::new();
    let mut out = Vec::new();
    for restore in live {
        let namespace = restore.namespace().unwrap_or_default();
        let status = restore.status.clone().unwrap_or_default();
        let phase = status.phase.unwrap_or(RestorePhase::Pending);
        *by_phase.entry((namespace.clone(), format!("{phase:?}"))).or_default() += 1;
        if !matches!(phase, RestorePhase::Succeeded | RestorePhase::Failed) {
            continue;
        }
        let stash = stash_labels(&**restore, restore.spec.driver, &restore.spec.repository.name);
        let succeeded = f64::from(u8::from(phase == RestorePhase::Succeeded));
        out.push(Sample { gauge: StateGauge::StashRestoreSuccess, labels: stash.clone(), value: succeeded });
        if let Some(seconds) = status.session_duration.as_deref().and_then(duration_seconds) {
            out.push(Sample { gauge: StateGauge::StashRestoreDuration, labels: stash, value: seconds });
        }
    }
    for ((namespace, phase), count) in by_phase {
        let labels = vec![("namespace", namespace), ("phase", phase)];
        out.push(Sample { gauge: StateGauge::Restores, labels, value: f64::from(count) });
    }
    out
}

/// The `phase` label a finished session is counted under: its phase, except that a session failed
/// at its deadline counts as DeadlineExceeded (a condition in this API, a phase in KubeStash's).
pub(crate) fn session_outcome(status: &BackupSessionStatus) -> Option<&'static str> {
    match status.phase? {
        BackupSessionPhase::Succeeded => Some("Succeeded"),
        BackupSessionPhase::Skipped => Some("Skipped"),
        BackupSessionPhase::Failed
            if status.conditions.iter().any(|c| c.type_ == super::backup_session::DEADLINE_EXCEEDED) =>
        {
            Some("DeadlineExceeded")
        }
        BackupSessionPhase::Failed => Some("Failed"),
        BackupSessionPhase::Pending | BackupSessionPhase::Running | BackupSessionPhase::Unknown => None,
    }
}

/// Every value `session_outcome` gives, so a deleted batch's counters can all be removed.
pub(crate) const SESSION_OUTCOMES: [&str; 4] = ["Succeeded", "Failed", "DeadlineExceeded", "Skipped"];

/// `42s` (as session statuses write durations) → seconds.
pub(crate) fn duration_seconds(text: &str) -> Option<f64> {
    text.strip_suffix('s')?.parse().ok().filter(|s: &f64| s.is_finite() && *s >= 0.0)
}

/// The seconds between the next two runs of `cron` after `now`: the gap a "backup missing" alert
/// waits 1.5 times before firing (the same at any time for regular schedules).
fn expected_interval(cron: &str, now: Timestamp) -> Option<f64> {
    let next = next_run(cron, now)?;
    let after = next_run(cron, next)?;
    Some(after.duration_since(next).as_secs_f64())
}

/// What a session added to the repository: the `uploaded` of every snapshot of every host.
fn added_bytes(status: &BackupSessionStatus) -> u64 {
    let snapshots = status.targets.iter().flat_map(|t| &t.stats).flat_map(|h| &h.snapshots);
    snapshots.filter_map(|s| s.uploaded.as_deref().and_then(parse_bytes)).sum()
}

/// Stash's labels of an invoker's series (its `pkg/metrics`, without user-provided extra labels).
fn stash_labels<K: Resource<DynamicType = ()>>(invoker: &K, driver: Driver, repository: &str) -> SeriesLabels {
    vec![
        ("invoker_kind", K::kind(&()).into_owned()),
        ("invoker_name", invoker.name_any()),
        ("namespace", invoker.namespace().unwrap_or_default()),
        ("driver", format!("{driver:?}")),
        ("repository", repository.to_string()),
    ]
}

fn condition_labels(batch: &SeriesLabels, target: String, condition: &Condition) -> SeriesLabels {
    let mut labels = batch.clone();
    labels.extend([
        ("target", target),
        ("type", condition.type_.clone()),
        ("status", format!("{:?}", condition.status)),
    ]);
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn batch(status: serde_json::Value) -> BackupBatch {
        serde_json::from_value(json!({
            "apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch",
            "metadata": {"name": "app", "namespace": "team", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"repository": {"name": "repo"}, "schedule": "0 */6 * * *",
                     "members": [{"target": {"ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}}}]},
            "status": status,
        }))
        .expect("a batch")
    }

    fn session(name: &str, status: serde_json::Value) -> Arc<BackupSession> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupSession",
                "metadata": {"name": name, "namespace": "team"},
                "spec": {"invoker": {"apiGroup": "stash.appscode.com", "kind": "BackupBatch", "name": "app"}},
                "status": status,
            }))
            .expect("a session"),
        )
    }

    fn value(samples: &[Sample], gauge: StateGauge, extra: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|s| s.gauge == gauge && extra.iter().all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v)))
            .map(|s| s.value)
    }

    #[test]
    fn a_batch_with_a_finished_session_and_a_checked_repository_yields_every_series() {
        let batch = batch(json!({
            "conditions": [{"type": "RepositoryFound", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "memberConditions": [{"target": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "conditions": [{"type": "StashSidecarInjected", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}],
            "lastSession": {"name": "app-2", "phase": "Failed", "finishTime": "2026-01-02T00:01:00Z"},
            "lastSuccessfulSession": {"name": "app-1", "phase": "Succeeded", "finishTime": "2026-01-01T00:01:40Z"},
        }));
        let sessions = [
            session(
                "app-2",
                json!({"phase": "Failed", "sessionDuration": "60s", "targets": [
                {"ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}, "stats": [
                    {"hostname": "web", "snapshots": [{"name": "a", "uploaded": "1.5 MiB"}, {"name": "b", "uploaded": "512 B"}]}]}]}),
            ),
            session("other", json!({"phase": "Succeeded", "sessionDuration": "5s"})),
        ];
        let repository: Repository = serde_json::from_value(json!({
            "apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
            "metadata": {"name": "repo", "namespace": "team"},
            "spec": {"backend": {"storageSecretName": "s", "rest": {"url": "http://r"}}},
            "status": {"integrity": false, "totalSize": "2.0 GiB", "snapshotCount": 7, "snapshotsRemovedOnLastCleanup": 2},
        }))
        .expect("a repository");
        let now = Timestamp::from_second(1_767_225_600).expect("time");
        let samples = batch_series(&batch, &sessions, Some(&repository), now);

        assert_eq!(value(&samples, StateGauge::LastSuccess, &[("batch", "app")]), Some(1_767_225_700.0));
        assert_eq!(
            value(&samples, StateGauge::StashLastSuccess, &[("invoker_kind", "BackupBatch")]),
            Some(1_767_225_700.0)
        );
        assert_eq!(value(&samples, StateGauge::LastSessionSuccess, &[]), Some(0.0));
        assert_eq!(value(&samples, StateGauge::StashSessionSuccess, &[("repository", "repo")]), Some(0.0));
        assert_eq!(
            value(&samples, StateGauge::StashSessionDuration, &[]),
            Some(60.0),
            "the last session's, not another's"
        );
        assert_eq!(value(&samples, StateGauge::StashTargetCount, &[]), Some(1.0));
        assert_eq!(value(&samples, StateGauge::LastSessionAddedBytes, &[]), Some(1_573_376.0));
        assert_eq!(value(&samples, StateGauge::ExpectedInterval, &[]), Some(21_600.0));
        assert_eq!(value(&samples, StateGauge::Paused, &[]), Some(0.0));
        assert_eq!(value(&samples, StateGauge::Created, &[]), Some(1_767_225_600.0));
        let sidecar = [("target", "Deployment/web"), ("type", "StashSidecarInjected"), ("status", "False")];
        assert_eq!(value(&samples, StateGauge::Condition, &sidecar), Some(1.0));
        assert_eq!(value(&samples, StateGauge::Condition, &[("target", ""), ("type", "RepositoryFound")]), Some(1.0));
        assert_eq!(value(&samples, StateGauge::StashRepositoryIntegrity, &[]), Some(0.0));
        assert_eq!(value(&samples, StateGauge::StashRepositorySize, &[]), Some(2_147_483_648.0));
        assert_eq!(value(&samples, StateGauge::StashRepositorySnapshots, &[]), Some(7.0));
        assert_eq!(value(&samples, StateGauge::StashRepositorySnapshotsCleaned, &[]), Some(2.0));
    }

    #[test]
    fn a_new_unscheduled_batch_yields_no_session_or_repository_series() {
        let mut batch = batch(json!({}));
        batch.spec.schedule = None;
        batch.spec.paused = true;
        let samples = batch_series(&batch, &[], None, Timestamp::UNIX_EPOCH);
        let gauges: Vec<StateGauge> = samples.iter().map(|s| s.gauge).collect();
        assert_eq!(gauges, [StateGauge::Paused, StateGauge::Created, StateGauge::UnfinalizedSessions]);
        assert_eq!(samples[0].value, 1.0);
        assert_eq!(samples[2].value, 0.0, "none waits on a finalize");
    }

    #[test]
    fn finished_sessions_not_finalized_are_counted_from_the_oldest() {
        let at = |name: &str, namespace: &str, batch: &str, created: &str, status: serde_json::Value| {
            Arc::new(
                serde_json::from_value::<BackupSession>(json!({
                    "apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupSession",
                    "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
                    "spec": {"invoker": {"apiGroup": "stash.appscode.com", "kind": "BackupBatch", "name": batch}},
                    "status": status,
                }))
                .expect("a session"),
            )
        };
        let finalized =
            json!([{"type": "SessionFinalized", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
        let failed_finalize =
            json!([{"type": "SessionFinalized", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
        let mut deleting = (*at(
            "deleting",
            "team",
            "app",
            "2025-12-01T00:00:00Z",
            json!({"phase": "Failed", "sessionDuration": "1s"}),
        ))
        .clone();
        deleting.metadata.deletion_timestamp = deleting.metadata.creation_timestamp.clone();
        let sessions = [
            at("newer", "team", "app", "2026-01-02T00:00:00Z", json!({"phase": "Succeeded", "sessionDuration": "60s"})),
            at(
                "older",
                "team",
                "app",
                "2026-01-01T00:00:00Z",
                json!({"phase": "Failed", "sessionDuration": "30s", "conditions": failed_finalize}),
            ),
            at(
                "done",
                "team",
                "app",
                "2025-12-01T00:00:00Z",
                json!({"phase": "Succeeded", "sessionDuration": "5s", "conditions": finalized}),
            ),
            at("skipped", "team", "app", "2025-12-01T00:00:00Z", json!({"phase": "Skipped"})),
            at("running", "team", "app", "2025-12-01T00:00:00Z", json!({"phase": "Running"})),
            at(
                "another-batch",
                "team",
                "db",
                "2025-12-01T00:00:00Z",
                json!({"phase": "Succeeded", "sessionDuration": "5s"}),
            ),
            at(
                "another-namespace",
                "prod",
                "app",
                "2025-12-01T00:00:00Z",
                json!({"phase": "Succeeded", "sessionDuration": "5s"}),
            ),
            Arc::new(deleting),
        ];
        let since = "2026-01-01T00:00:30Z".parse::<Timestamp>().expect("time");
        let waiting = unfinalized("team", "app", sessions.iter().map(|s| &**s));
        let oldest = waiting.oldest.map(|(t, s)| (t, s.name_any()));
        assert_eq!((waiting.count, oldest), (2, Some((since, "older".to_string()))));
        let samples = batch_series(&batch(json!({})), &sessions, None, Timestamp::UNIX_EPOCH);
        assert_eq!(value(&samples, StateGauge::UnfinalizedSessions, &[("batch", "app")]), Some(2.0));
        assert_eq!(value(&samples, StateGauge::UnfinalizedSince, &[]), Some(since.as_second() as f64));
        let none = unfinalized("team", "idle", sessions.iter().map(|s| &**s));
        assert_eq!((none.count, none.oldest.is_none()), (0, true));
    }

    #[test]
    fn irregular_schedules_give_the_gap_after_the_next_run() {
        // Runs at 01:00 and 13:00... and 05:00: from 00:00, the next gap is 01:00 → 05:00.
        let now = Timestamp::from_second(1_767_225_600).expect("midnight");
        assert_eq!(expected_interval("0 1,5,13 * * *", now), Some(4.0 * 3600.0));
        assert_eq!(expected_interval("not a schedule", now), None);
    }

    #[test]
    fn restores_are_counted_by_phase_and_finished_ones_reported_under_stashs_names() {
        let restore = |name: &str, phase: Option<&str>, deleting: bool| -> Arc<RestoreBatch> {
            let mut value = json!({
                "apiVersion": "stash.appscode.com/v1beta1", "kind": "RestoreBatch",
                "metadata": {"name": name, "namespace": "team"},
                "spec": {"repository": {"name": "repo"}, "members": [{"target": {"ref": {"kind": "PersistentVolumeClaim", "name": "d"}}}]},
                "status": {"phase": phase, "sessionDuration": "30s"},
            });
            if deleting {
                value["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            Arc::new(serde_json::from_value(value).expect("a restore"))
        };
        let restores = [
            restore("a", Some("Succeeded"), false),
            restore("b", Some("Succeeded"), false),
            restore("c", Some("Running"), false),
            restore("d", None, false),
            restore("gone", Some("Failed"), true),
        ];
        let samples = restore_series(&restores);
        assert_eq!(value(&samples, StateGauge::Restores, &[("phase", "Succeeded")]), Some(2.0));
        assert_eq!(value(&samples, StateGauge::Restores, &[("phase", "Pending")]), Some(1.0), "no phase yet: Pending");
        assert_eq!(value(&samples, StateGauge::Restores, &[("phase", "Failed")]), None, "being deleted");
        assert_eq!(value(&samples, StateGauge::StashRestoreSuccess, &[("invoker_name", "a")]), Some(1.0));
        assert_eq!(value(&samples, StateGauge::StashRestoreDuration, &[("invoker_name", "b")]), Some(30.0));
        assert_eq!(value(&samples, StateGauge::StashRestoreSuccess, &[("invoker_name", "c")]), None, "still running");
    }

    #[test]
    fn a_session_failed_at_its_deadline_counts_as_deadline_exceeded() {
        let status = |phase, deadline: bool| -> BackupSessionStatus {
            let conditions = if deadline {
                json!([{"type": "DeadlineExceeded", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}])
            } else {
                json!([])
            };
            serde_json::from_value(json!({"phase": phase, "conditions": conditions})).expect("a status")
        };
        assert_eq!(session_outcome(&status("Failed", true)), Some("DeadlineExceeded"));
        assert_eq!(session_outcome(&status("Failed", false)), Some("Failed"));
        assert_eq!(session_outcome(&status("Skipped", false)), Some("Skipped"));
        assert_eq!(session_outcome(&status("Running", false)), None);
        assert_eq!(duration_seconds("42s"), Some(42.0));
        assert_eq!(duration_seconds("-1s"), None);
    }
}
