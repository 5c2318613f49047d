//! The controllers against the real control plane, with the operator running in-process (controllers
//! limited to the test's namespace) or as real processes for leader election.

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use stash::api::backup_batch::BackupInvokerPhase;
use stash::api::backup_session::{BackupSessionPhase, HostBackupStats, HostPhase, HostProgress, TargetPhase};
use stash::api::common::ConditionStatus;
use stash::api::{BackupBatch, BackupSession};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::executors::LocalNode;
use support::fixtures::{self, PASSWORD, member, report_host, session_phase};
use support::{TestNamespace, eventually};

/// The label of a session's hook Jobs.
const HOOK_LABEL: &str = "stash.appscode.com/hook";

async fn with_controllers(ns: &TestNamespace) -> support::operator::RunningOperator {
    let controllers = support::operator::controllers_for(&ns.name, "test-operator");
    support::operator::start_on(None, None, Some(controllers)).await
}

/// Waits until the batch's status says `phase`, and returns the batch.
async fn batch_phase(ns: &TestNamespace, name: &str, phase: BackupInvokerPhase) -> BackupBatch {
    let batches = ns.api::<BackupBatch>();
    eventually(&format!("batch {name} to be {phase:?}"), Duration::from_secs(60), || {
        let batches = batches.clone();
        let name = name.to_string();
        async move { batches.get(&name).await.ok().filter(|b| b.status.as_ref().and_then(|s| s.phase) == Some(phase)) }
    })
    .await
}

fn condition<'a>(batch: &'a BackupBatch, type_: &str) -> &'a stash::api::common::Condition {
    let status = batch.status.as_ref().expect("status");
    status.conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} condition"))
}

async fn cronjob_where(ns: &TestNamespace, what: &str, check: impl Fn(&CronJob) -> bool + Clone) -> CronJob {
    let cronjobs = ns.api::<CronJob>();
    eventually(what, Duration::from_secs(60), || {
        let (cronjobs, check) = (cronjobs.clone(), check.clone());
        async move { cronjobs.get_opt("stash-trigger-nightly").await.ok().flatten().filter(|c| check(c)) }
    })
    .await
}

#[tokio::test]
async fn a_ready_batch_gets_its_cronjob_which_follows_edits_and_goes_with_it() {
    let ns = TestNamespace::new("cronjob").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    fixtures::batch(&ns, "nightly", vec![member("Deployment", "app")], json!({"schedule": "0 2 * * *"})).await;

    let batch = batch_phase(&ns, "nightly", BackupInvokerPhase::Ready).await;
    for type_ in ["ValidationPassed", "RepositoryFound", "BackendSecretFound", "CronJobCreated"] {
        assert_eq!(condition(&batch, type_).status, ConditionStatus::True, "{type_}");
    }
    let status = batch.status.as_ref().expect("status");
    assert_eq!(status.observed_generation, batch.metadata.generation);
    let member = &status.member_conditions[0];
    assert!(member.conditions.iter().any(|c| c.type_ == "BackupTargetFound" && c.status == ConditionStatus::True));
    assert!(member.conditions.iter().any(|c| c.type_ == "StashSidecarInjected"), "sidecar injection is reported");

    let cronjob = cronjob_where(&ns, "the trigger CronJob", |_| true).await;
    let spec = cronjob.spec.as_ref().expect("spec");
    assert_eq!(spec.schedule, "0 2 * * *");
    assert_eq!(spec.suspend, Some(false));
    assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
    assert_eq!(spec.successful_jobs_history_limit, Some(1));
    let owner = &cronjob.metadata.owner_references.as_ref().expect("owned")[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("BackupBatch", "nightly", Some(true)));
    let labels = cronjob.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("stash.appscode.com/invoker-name").map(String::as_str), Some("nightly"));
    let pod = spec.job_template.spec.as_ref().and_then(|j| j.template.spec.as_ref()).expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some("stash-trigger"));
    assert_eq!(
        pod.containers[0].args.as_deref().expect("args"),
        ["create-backupsession", "--invoker-kind=BackupBatch", "--invoker-name=nightly"]
    );

    let batches = ns.api::<BackupBatch>();
    batches
        .patch("nightly", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"paused": true}})))
        .await
        .expect("pause");
    cronjob_where(&ns, "the CronJob to be suspended", |c| c.spec.as_ref().and_then(|s| s.suspend) == Some(true)).await;
    let every_minute = json!({"spec": {"paused": false, "schedule": "* * * * *"}});
    batches.patch("nightly", &PatchParams::default(), &Patch::Merge(&every_minute)).await.expect("reschedule");
    cronjob_where(&ns, "the CronJob to follow the new schedule", |c| {
        c.spec.as_ref().is_some_and(|s| s.schedule == "* * * * *" && s.suspend == Some(false))
    })
    .await;

    // The controller-manager fires it at the next minute: its Job (Pending, no kubelet) runs our command.
    let jobs = ns.api::<Job>();
    let job = eventually("a Job from the trigger CronJob", Duration::from_secs(75), || {
        let jobs = jobs.clone();
        async move {
            jobs.list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|j| j.metadata.name.as_deref().is_some_and(|n| n.starts_with("stash-trigger-nightly")))
        }
    })
    .await;
    let container = &job.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod").containers[0];
    assert_eq!(container.args.as_deref().expect("args")[0], "create-backupsession");

    let accounts = ns.api::<k8s_openapi::api::core::v1::ServiceAccount>();
    assert!(accounts.get_opt("stash-trigger").await.expect("get").is_some(), "the namespace's trigger identity");
    batches.delete("nightly", &DeleteParams::background()).await.expect("delete");
    eventually("the last batch's finalizer to remove the shared identities", Duration::from_secs(60), || {
        let accounts = accounts.clone();
        async move {
            let gone = accounts.get_opt("stash-trigger").await.ok()?.is_none()
                && accounts.get_opt("stash-backup").await.ok()?.is_none();
            gone.then_some(())
        }
    })
    .await;
    let cronjobs = ns.api::<CronJob>();
    eventually("the CronJob to be garbage-collected", Duration::from_secs(60), || {
        let cronjobs = cronjobs.clone();
        async move { cronjobs.get_opt("stash-trigger-nightly").await.ok()?.is_none().then_some(()) }
    })
    .await;
    operator.stop().await;
}

/// Issue 15: a Ready batch whose inputs did not change costs no API request when it is reconciled
/// again (an edit of its metadata here, a watch relist alike): what it checks comes from caches.
#[tokio::test]
async fn a_ready_unchanged_batch_is_reconciled_again_without_a_request() {
    let ns = TestNamespace::new("cached").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let members = vec![member("PersistentVolumeClaim", "data")];
    fixtures::batch(&ns, "nightly", members, json!({"schedule": "0 2 * * *"})).await;
    batch_phase(&ns, "nightly", BackupInvokerPhase::Ready).await;
    reconciled_again_without_a_request(&ns, &operator, "nightly").await;
    operator.stop().await;
}

/// The same for a workload member: the workload and its Pods come from caches too, not from a GET
/// and a list per reconcile.
#[tokio::test]
async fn a_ready_batch_of_a_workload_is_reconciled_again_without_a_request() {
    let ns = TestNamespace::new("cachedwl").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    injected_deployment(&ns, "web", "site").await;
    let pods = ns.api::<k8s_openapi::api::core::v1::Pod>();
    eventually("a Pod of web", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move { pods.list(&ListParams::default().labels("app=web")).await.ok().filter(|l| !l.items.is_empty()) }
    })
    .await;
    fixtures::batch(&ns, "site", vec![member("Deployment", "web")], json!({"schedule": "0 2 * * *"})).await;
    let batch = batch_phase(&ns, "site", BackupInvokerPhase::Ready).await;
    let member = &batch.status.expect("status").member_conditions[0];
    let injected = member.conditions.iter().find(|c| c.type_ == "StashSidecarInjected").expect("condition");
    assert_eq!(injected.message.as_deref(), Some("1 of 1 Pods carry the stash sidecar"));
    reconciled_again_without_a_request(&ns, &operator, "site").await;
    operator.stop().await;
}

/// A Deployment whose Pods are as the webhook makes them for batch `batch` (no webhook runs in these
/// tests): with the sidecar, the batch annotation and the sidecar label.
async fn injected_deployment(ns: &TestNamespace, name: &str, batch: &str) {
    let containers =
        json!([{"name": "c", "image": "registry.invalid/c:1"}, {"name": "stash", "image": "registry.invalid/s:1"}]);
    let template = json!({"metadata": {"labels": {"app": name, "stash.appscode.com/sidecar": "injected"},
                                       "annotations": {"stash.appscode.com/backup-batch": batch}},
                          "spec": {"containers": containers}});
    fixtures::create::<Deployment>(
        ns,
        json!({"metadata": {"name": name}, "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": template}}),
    )
    .await;
}

/// Waits until the operator is quiet, edits the batch's metadata, and checks that the reconcile this
/// brings sends no request.
async fn reconciled_again_without_a_request(
    ns: &TestNamespace,
    operator: &support::operator::RunningOperator,
    batch: &str,
) {
    // The Lease renewals and the caches' watches are not the batch's.
    let requests = || operator.samples("stash_api_requests_total", |l| !l.contains("leases") && !l.contains("watch"));
    let reconciles = || async {
        let ok = operator.samples("stash_reconciles_total", |l| l.contains("backupbatch")).await;
        ok.values().sum::<f64>()
    };
    let mut settled = (requests().await, reconciles().await);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = (requests().await, reconciles().await);
        if now == settled {
            break;
        }
        settled = now;
    }
    let (before, reconciled) = settled;
    let patch = json!({"metadata": {"annotations": {"example.com/touched": "yes"}}});
    let batches = ns.api::<BackupBatch>();
    batches.patch(batch, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotate");
    eventually("the batch reconciled again", Duration::from_secs(30), || async {
        (reconciles().await > reconciled).then_some(())
    })
    .await;
    let after = requests().await;
    let added: Vec<_> = after.iter().filter(|(series, n)| before.get(*series) != Some(n)).collect();
    assert!(added.is_empty(), "requests of the reconcile: {added:?}");
}

#[tokio::test]
async fn missing_repository_or_secret_keeps_the_batch_not_ready_saying_which() {
    let ns = TestNamespace::new("notready").await;
    let operator = with_controllers(&ns).await;
    fixtures::targets(&ns).await;
    fixtures::batch(&ns, "nightly", vec![member("Deployment", "app")], json!({"schedule": "0 2 * * *"})).await;
    let batch = batch_phase(&ns, "nightly", BackupInvokerPhase::NotReady).await;
    let repository = condition(&batch, "RepositoryFound");
    assert_eq!((repository.status, repository.reason.as_deref()), (ConditionStatus::False, Some("RepositoryNotFound")));

    fixtures::repository(&ns).await;
    fixtures::secret(&ns, false).await;
    let batches = ns.api::<BackupBatch>();
    let batch = eventually("the missing password to be reported", Duration::from_secs(60), || {
        let batches = batches.clone();
        async move {
            let batch = batches.get("nightly").await.ok()?;
            let reason =
                batch.status.as_ref()?.conditions.iter().find(|c| c.type_ == "BackendSecretFound")?.reason.clone();
            (reason.as_deref() == Some("ResticPasswordMissing")).then_some(batch)
        }
    })
    .await;
    assert_eq!(condition(&batch, "RepositoryFound").status, ConditionStatus::True);
    assert_eq!(batch.status.as_ref().and_then(|s| s.phase), Some(BackupInvokerPhase::NotReady));
    let message = condition(&batch, "BackendSecretFound").message.clone().unwrap_or_default();
    assert!(message.contains("RESTIC_PASSWORD") && !message.contains(PASSWORD));

    let secrets = ns.api::<k8s_openapi::api::core::v1::Secret>();
    let fixed = json!({"stringData": {"RESTIC_PASSWORD": PASSWORD}});
    secrets.patch("repo-secret", &PatchParams::default(), &Patch::Merge(&fixed)).await.expect("fix the secret");
    batch_phase(&ns, "nightly", BackupInvokerPhase::Ready).await;
    operator.stop().await;
}

#[tokio::test]
async fn bad_schedules_and_unsupported_drivers_make_the_batch_invalid() {
    let ns = TestNamespace::new("invalid-batch").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    fixtures::batch(&ns, "bad-cron", vec![member("Deployment", "app")], json!({"schedule": "every tuesday"})).await;
    fixtures::batch(&ns, "snapshots", vec![member("StatefulSet", "db")], json!({"driver": "VolumeSnapshotter"})).await;
    let bad = batch_phase(&ns, "bad-cron", BackupInvokerPhase::Invalid).await;
    let validation = condition(&bad, "ValidationPassed");
    assert_eq!(validation.reason.as_deref(), Some("InvalidSchedule"));
    assert!(validation.message.clone().unwrap_or_default().contains("every tuesday"));
    // croner reads seconds; a CronJob does not, and its API would refuse the trigger.
    fixtures::batch(&ns, "seconds", vec![member("Deployment", "app")], json!({"schedule": "0 0 2 * * *"})).await;
    let seconds = batch_phase(&ns, "seconds", BackupInvokerPhase::Invalid).await;
    assert_eq!(condition(&seconds, "ValidationPassed").reason.as_deref(), Some("InvalidSchedule"));
    let snapshots = batch_phase(&ns, "snapshots", BackupInvokerPhase::Invalid).await;
    assert_eq!(condition(&snapshots, "ValidationPassed").reason.as_deref(), Some("DriverNotSupported"));
    assert!(ns.api::<CronJob>().get_opt("stash-trigger-bad-cron").await.expect("get").is_none());
    // A batch of `member` is refused with `reason`, by the field its message starts with.
    let refused = async |name: &str, member: serde_json::Value, reason: &str, field: &str| {
        fixtures::batch(&ns, name, vec![member], json!({})).await;
        let batch = batch_phase(&ns, name, BackupInvokerPhase::Invalid).await;
        let validation = condition(&batch, "ValidationPassed");
        assert_eq!(validation.reason.as_deref(), Some(reason));
        let message = validation.message.clone().unwrap_or_default();
        assert!(message.starts_with(field), "{message}");
    };
    // A database member whose task names an engine stash does not dump is refused by name, never
    // dumped with pg_dump as if it were PostgreSQL.
    let mongo = json!({"target": {"alias": "mongo", "ref": {"apiVersion": "v1", "kind": "Secret", "name": "repo-secret"}},
                       "task": {"name": "mongodb-backup-4.2.3"}});
    refused("mongo", mongo, "TaskNotSupported", "spec.members[0].task.name \"mongodb-backup-4.2.3\"").await;
    // A member field its backup would drop is refused by name: a PVC member's Job runs no hooks.
    let hooked = json!({"target": {"alias": "files", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "data"}},
                        "hooks": {"preBackup": {"httpGet": {"host": "127.0.0.1", "port": 80}}}});
    refused("hooked", hooked, "UnsupportedField", "spec.members[0].hooks ").await;
    operator.stop().await;
}

async fn new_session(ns: &TestNamespace, batch: &str) -> String {
    let session =
        stash::session::create_backup_session(ns.client.clone(), &ns.name, batch, None).await.expect("session");
    kube::ResourceExt::name_any(&session)
}

#[tokio::test]
async fn sessions_run_aggregate_skip_time_out_and_keep_a_bounded_history() {
    let ns = TestNamespace::new("sessions").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let members = vec![member("Deployment", "app"), member("StatefulSet", "db")];
    fixtures::batch(&ns, "app-backup", members, json!({"backupHistoryLimit": 1})).await;
    let sessions = ns.api::<BackupSession>();

    // Running, with a target per member and the right host counts.
    let first = new_session(&ns, "app-backup").await;
    let running = session_phase(&sessions, &first, BackupSessionPhase::Running).await;
    let targets = &running.status.as_ref().expect("status").targets;
    let hosts: Vec<_> = targets.iter().map(|t| (t.reference.name.as_str(), t.total_hosts)).collect();
    assert_eq!(hosts, [("app", Some(1)), ("db", Some(2))]);
    assert!(targets.iter().all(|t| t.phase == Some(TargetPhase::Running)), "Parallel starts every member");
    let owner = &running.metadata.owner_references.as_ref().expect("owned")[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("BackupBatch", "app-backup"));

    // A second session while the first runs is skipped, not queued.
    std::thread::sleep(Duration::from_millis(1100)); // session names carry the second
    let second = new_session(&ns, "app-backup").await;
    let skipped = session_phase(&sessions, &second, BackupSessionPhase::Skipped).await;
    assert!(
        skipped
            .status
            .expect("status")
            .conditions
            .iter()
            .any(|c| c.reason.as_deref() == Some("PreviousSessionRunning"))
    );

    // Every host reports success → Succeeded.
    report_host(&sessions, &first, 0, "app", HostPhase::Succeeded).await;
    report_host(&sessions, &first, 1, "db-0", HostPhase::Succeeded).await;
    let still = sessions.get(&first).await.expect("get");
    assert_eq!(still.status.and_then(|s| s.phase), Some(BackupSessionPhase::Running), "db has one of two hosts");
    report_host(&sessions, &first, 1, "db-1", HostPhase::Succeeded).await;
    let done = session_phase(&sessions, &first, BackupSessionPhase::Succeeded).await;
    assert!(done.status.expect("status").session_duration.is_some());

    // One failed host fails its target and the session.
    std::thread::sleep(Duration::from_millis(1100));
    let third = new_session(&ns, "app-backup").await;
    session_phase(&sessions, &third, BackupSessionPhase::Running).await;
    report_host(&sessions, &third, 0, "app", HostPhase::Succeeded).await;
    report_host(&sessions, &third, 1, "db-0", HostPhase::Failed).await;
    report_host(&sessions, &third, 1, "db-1", HostPhase::Succeeded).await;
    let failed = session_phase(&sessions, &third, BackupSessionPhase::Failed).await;
    let message = failed.status.expect("status").conditions.iter().find_map(|c| c.message.clone()).unwrap_or_default();
    assert!(message.contains("StatefulSet db"), "{message}");

    // No session is trimmed before its finalize step finished (here nobody runs the finalize Jobs).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left = sessions.list(&ListParams::default()).await.expect("list").items.len();
    assert_eq!(left, 3, "unfinalized sessions stay");
    for name in [&first, &third] {
        fixtures::mark_finalized(&sessions, name).await;
    }

    // History (backupHistoryLimit: 1): the newest finalized session, and the newest skipped one.
    eventually("history trimmed to the limit", Duration::from_secs(60), || {
        let sessions = sessions.clone();
        let expected = [second.clone(), third.clone()];
        async move {
            let mut names: Vec<String> = sessions
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .iter()
                .map(kube::ResourceExt::name_any)
                .collect();
            names.sort();
            (names == expected).then_some(())
        }
    })
    .await;
    let table = stash::commands::sessions_table(ns.client.clone(), &ns.name, "app-backup").await.expect("table");
    assert!(table.contains(&third) && table.contains("Failed"), "{table}");
    operator.stop().await;
}

/// A session's reconciles read its batch and Repository from the caches the batches' controller
/// keeps, not with a GET each: a session is reconciled at every change of its status and its Jobs.
/// The batch is read once to record the finished session (what that write carries must be the
/// latest), twice when a reconcile comes before the cache has seen the record. A RestoreBatch's
/// reconciles take the Repository from the cache too.
#[tokio::test]
async fn sessions_and_restores_read_the_batch_and_repository_from_caches() {
    let ns = TestNamespace::new("sessioncache").await;
    let operator = with_controllers(&ns).await;
    ready_batch_of_app(&ns).await;
    let running = &operator;
    let reads = move |resource: &'static str| async move {
        let quoted = format!("\"{resource}\"");
        let samples =
            running.samples("stash_api_requests_total", |l| l.contains(r#"verb="get""#) && l.contains(&quoted)).await;
        samples.values().sum::<f64>()
    };
    let before = (reads("backupbatches").await, reads("repositories").await);
    let sessions = ns.api::<BackupSession>();
    let session = succeeded_session(&ns, &sessions).await;
    eventually("the finalize Job", Duration::from_secs(30), || {
        let jobs = ns.api::<Job>();
        let name = format!("{session}-finalize");
        async move { jobs.get_opt(&name).await.ok().flatten() }
    })
    .await;
    let batch_reads = reads("backupbatches").await - before.0;
    assert!(batch_reads <= 2.0, "{batch_reads} GETs of the batch while the session ran");
    assert_eq!(reads("repositories").await - before.1, 0.0, "GETs of the Repository while the session ran");

    restore_of_data(&ns).await;
    eventually("the restore Job", Duration::from_secs(30), || {
        let jobs = ns.api::<Job>();
        async move {
            jobs.list(&ListParams::default().labels("stash.appscode.com/restore-batch=bring-back"))
                .await
                .ok()
                .filter(|l| !l.items.is_empty())
        }
    })
    .await;
    assert_eq!(reads("repositories").await - before.1, 0.0, "GETs of the Repository for the restore");
    operator.stop().await;
}

/// The Ready batch `app-backup` of the Deployment `app`, on the Repository `repo`.
async fn ready_batch_of_app(ns: &TestNamespace) {
    fixtures::secret(ns, true).await;
    fixtures::repository(ns).await;
    fixtures::targets(ns).await;
    fixtures::batch(ns, "app-backup", vec![member("Deployment", "app")], json!({})).await;
    batch_phase(ns, "app-backup", BackupInvokerPhase::Ready).await;
}

/// A session of `app-backup` whose one host reported success, once it is Succeeded.
async fn succeeded_session(ns: &TestNamespace, sessions: &Api<BackupSession>) -> String {
    let session = new_session(ns, "app-backup").await;
    session_phase(sessions, &session, BackupSessionPhase::Running).await;
    report_host(sessions, &session, 0, "app", HostPhase::Succeeded).await;
    session_phase(sessions, &session, BackupSessionPhase::Succeeded).await;
    session
}

/// The RestoreBatch `bring-back` of the PVC `data` from the Repository `repo`, its latest session.
async fn restore_of_data(ns: &TestNamespace) {
    let restore = json!({"target": {"alias": "data", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "data"}}});
    fixtures::create::<stash::api::RestoreBatch>(
        ns,
        json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "RestoreBatch",
               "metadata": {"name": "bring-back", "namespace": ns.name},
               "spec": {"repository": {"name": "repo"}, "members": [restore], "restoreFrom": {}}}),
    )
    .await;
}

/// A finalize Job that failed (a backend down for longer than its one retry, a lock held) is made
/// again after a backoff, as long as the session exists: until it succeeds the session is no
/// restorable set and its data is never forgotten. Here the test plays the Job controller, for the
/// cluster runs Pods nowhere: it marks the first Job Failed.
#[tokio::test]
async fn a_failed_finalize_job_is_made_again_after_a_backoff() {
    let ns = TestNamespace::new("finalizeretry").await;
    let operator = with_controllers(&ns).await;
    ready_batch_of_app(&ns).await;
    let sessions = ns.api::<BackupSession>();
    let session = succeeded_session(&ns, &sessions).await;
    let jobs = ns.api::<Job>();
    let name = format!("{session}-finalize");
    let first = eventually("the finalize Job", Duration::from_secs(30), || {
        let (jobs, name) = (jobs.clone(), name.clone());
        async move { jobs.get_opt(&name).await.ok().flatten() }
    })
    .await;
    let started = first.metadata.creation_timestamp.clone().expect("created").0;
    let failed = json!({"status": {
        "startTime": started, "failed": 2, "active": 0,
        "conditions": [
            {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded", "message": "two Pods failed"},
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "two Pods failed"}]}});
    jobs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&failed)).await.expect("the Job failed");

    let again = eventually("a new finalize Job", Duration::from_secs(90), || {
        let (jobs, name, uid) = (jobs.clone(), name.clone(), first.metadata.uid.clone());
        async move { jobs.get_opt(&name).await.ok().flatten().filter(|job| job.metadata.uid != uid) }
    })
    .await;
    let attempt = again.metadata.annotations.as_ref().and_then(|a| a.get("stash.appscode.com/finalize-attempt"));
    assert_eq!(attempt.map(String::as_str), Some("2"));
    assert!(!stash::controller::backup_session::job_failed(&again), "the new Job starts afresh");
    let events = ns.api::<k8s_openapi::api::core::v1::Event>();
    let retried = events.list(&ListParams::default()).await.expect("events").items;
    assert!(
        retried.iter().any(|e| e.reason.as_deref() == Some("FinalizeRetried")
            && e.involved_object.name.as_deref() == Some(session.as_str())),
        "a Warning names the retry"
    );

    // Until its finalize succeeds the session is no restorable set: the batch does not call it its
    // last success (nor its last session), which `StashBackupMissing` watches.
    let batches = ns.api::<BackupBatch>();
    let status = batches.get("app-backup").await.expect("the batch").status.unwrap_or_default();
    assert_eq!((status.last_session, status.last_successful_session), (None, None), "recorded before it was finalized");
    // What the batch exports meanwhile: one session waiting on its finalize, and since when.
    let ours = |labels: &str| labels.contains(&format!("namespace=\"{}\"", ns.name)) && labels.contains("app-backup");
    let waiting = || async {
        let count = operator.samples("stash_backupbatch_unfinalized_sessions", ours).await;
        let since = operator.samples("stash_backupbatch_unfinalized_since_timestamp_seconds", ours).await;
        (count.into_values().collect::<Vec<_>>(), since.into_values().collect::<Vec<_>>())
    };
    let (count, since) = eventually("the session counted", Duration::from_secs(30), || async {
        Some(waiting().await).filter(|w| w.0 == [1.0])
    })
    .await;
    let finished = sessions.get(&session).await.expect("the session");
    let created = finished.metadata.creation_timestamp.as_ref().expect("created").0.as_second();
    let took = finished.status.as_ref().and_then(|s| s.session_duration.clone()).expect("a duration");
    let took: i64 = took.trim_end_matches('s').parse().expect("seconds");
    assert_eq!(since, [(created + took) as f64], "since the session finished: its start and its duration");
    assert_eq!(count, [1.0]);
    fixtures::mark_finalized(&sessions, &session).await;
    assert_eq!(recorded_success(&ns, "app-backup").await, session);
    let (count, since) = eventually("none counted", Duration::from_secs(30), || async {
        Some(waiting().await).filter(|w| w.0 == [0.0])
    })
    .await;
    assert!(since.is_empty(), "no oldest once none waits: {since:?}");
    assert_eq!(count, [0.0]);
    operator.stop().await;
}

#[tokio::test]
async fn the_deadline_fails_a_session_nobody_finishes() {
    let ns = TestNamespace::new("deadline").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    fixtures::batch(&ns, "slow", vec![member("Deployment", "app")], json!({"timeOut": "3s"})).await;
    let sessions = ns.api::<BackupSession>();
    let name = new_session(&ns, "slow").await;
    let running = session_phase(&sessions, &name, BackupSessionPhase::Running).await;
    assert!(running.status.as_ref().and_then(|s| s.session_deadline.clone()).is_some());
    let failed = session_phase(&sessions, &name, BackupSessionPhase::Failed).await;
    let status = failed.status.expect("status");
    assert!(status.conditions.iter().any(|c| c.type_ == "DeadlineExceeded" && c.status == ConditionStatus::True));
    assert_eq!(status.targets[0].phase, Some(TargetPhase::Failed));
    operator.stop().await;
}

#[tokio::test]
async fn sequential_members_start_in_order_and_pvc_members_get_a_read_only_job() {
    let ns = TestNamespace::new("sequential").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let members = vec![member("Deployment", "app"), member("PersistentVolumeClaim", "data")];
    fixtures::batch(&ns, "ordered", members, json!({"executionOrder": "Sequential"})).await;
    let sessions = ns.api::<BackupSession>();
    let name = new_session(&ns, "ordered").await;
    let running = session_phase(&sessions, &name, BackupSessionPhase::Running).await;
    let phases: Vec<_> = running.status.expect("status").targets.iter().map(|t| t.phase).collect();
    assert_eq!(phases, [Some(TargetPhase::Running), Some(TargetPhase::Pending)]);
    let jobs = ns.api::<Job>();
    let selector = format!("stash.appscode.com/backup-session={name}");
    assert!(
        jobs.list(&ListParams::default().labels(&selector)).await.expect("list").items.is_empty(),
        "the PVC waits its turn"
    );

    report_host(&sessions, &name, 0, "app", HostPhase::Succeeded).await;
    let job = eventually("the PVC member's Job", Duration::from_secs(60), || {
        let (jobs, selector) = (jobs.clone(), selector.clone());
        async move { jobs.list(&ListParams::default().labels(&selector)).await.ok()?.items.into_iter().next() }
    })
    .await;
    let pod = job.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("pod");
    let claim = pod.volumes.iter().flatten().find_map(|v| v.persistent_volume_claim.as_ref()).expect("the PVC volume");
    assert_eq!((claim.claim_name.as_str(), claim.read_only), ("data", Some(true)));
    let container = &pod.containers[0];
    assert!(container.volume_mounts.iter().flatten().filter(|m| m.name == "target").all(|m| m.read_only == Some(true)));
    let secret = pod.volumes.iter().flatten().find_map(|v| v.secret.as_ref()).expect("the Secret by reference");
    assert_eq!(secret.secret_name.as_deref(), Some("repo-secret"));
    let spec_text = serde_json::to_string(&job).expect("JSON");
    assert!(!spec_text.contains(PASSWORD), "no secret value in the Job");
    let owner = &job.metadata.owner_references.as_ref().expect("owned")[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("BackupSession", name.as_str()));

    // Restarting the operator mid-session neither duplicates the Job nor loses the session.
    operator.stop().await;
    let operator = with_controllers(&ns).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(jobs.list(&ListParams::default().labels(&selector)).await.expect("list").items.len(), 1);
    let session = sessions.get(&name).await.expect("get");
    assert_eq!(session.status.and_then(|s| s.phase), Some(BackupSessionPhase::Running));
    report_host(&sessions, &name, 1, "data", HostPhase::Succeeded).await;
    session_phase(&sessions, &name, BackupSessionPhase::Succeeded).await;
    operator.stop().await;
}

/// A real `stash operator` process (controllers on, webhook on a free port).
/// It runs as the `stash-operator` ServiceAccount (`kubeconfig`), under a Lease of the test's own in
/// the operator's namespace.
fn operator_process(
    ns: &TestNamespace,
    kubeconfig: &std::path::Path,
    identity: &str,
    certs: &std::path::Path,
    admin_port: u16,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_stash"))
        .args(["operator", "--webhook-addr", "127.0.0.1:0"])
        .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
        .arg("--tls-cert-file")
        .arg(certs.join("tls.crt"))
        .arg("--tls-key-file")
        .arg(certs.join("tls.key"))
        .args(["--watch-namespace", &ns.name, "--identity", identity, "--lease-name", &lease_name(ns)])
        .args(["--lease-duration", "4s", "--lease-renew-interval", "1s"])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("the operator starts")
}

fn lease_name(ns: &TestNamespace) -> String {
    format!("stash-operator-{}", ns.name)
}

async fn holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases.get_opt(name).await.ok()??.spec?.holder_identity
}

#[tokio::test]
async fn one_of_two_operators_leads_and_the_other_takes_over_when_it_is_killed() {
    let ns = TestNamespace::new("leader").await;
    let certs = tempfile::tempdir().expect("temp dir");
    stash::certs::generate_to_dir(
        certs.path(),
        &[],
        &["127.0.0.1".parse().expect("IP")],
        None,
        Duration::from_secs(3600),
        Duration::from_secs(7200),
    )
    .expect("certs");
    let port = |()| std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let (port_a, port_b) = (port(()), port(()));
    let kubeconfig = support::operator_kubeconfig(certs.path()).await;
    let mut a = operator_process(&ns, &kubeconfig, "operator-a", certs.path(), port_a);
    let mut b = operator_process(&ns, &kubeconfig, "operator-b", certs.path(), port_b);
    let leases: Api<Lease> = Api::namespaced(ns.client.clone(), support::OPERATOR_NAMESPACE);
    let lease = lease_name(&ns);
    let leader = eventually("a leader", Duration::from_secs(60), || {
        let leases = leases.clone();
        let lease = lease.clone();
        async move { holder(&leases, &lease).await.filter(|h| !h.is_empty()) }
    })
    .await;

    // Exactly one replica reports leadership in its metrics.
    let leading = |port: u16| async move {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.ok()?.text().await.ok()?;
        text.lines().find(|l| l.starts_with("stash_controller_leader "))?.ends_with(" 1").then_some(())
    };
    eventually("the leader to report it", Duration::from_secs(30), || {
        let port = if leader == "operator-a" { port_a } else { port_b };
        leading(port)
    })
    .await;
    let follower_port = if leader == "operator-a" { port_b } else { port_a };
    assert!(leading(follower_port).await.is_none(), "only one replica leads");

    let killed = Instant::now();
    let (victim, survivor) = if leader == "operator-a" { (&mut a, "operator-b") } else { (&mut b, "operator-a") };
    victim.kill().expect("SIGKILL");
    let _ = victim.wait();
    eventually("the survivor to take the Lease", Duration::from_secs(30), || {
        let leases = leases.clone();
        let lease = lease.clone();
        async move { holder(&leases, &lease).await.filter(|h| h == survivor) }
    })
    .await;
    // Measured, not asserted (the Lease lasts 4 s and is retried every second); tests/lease.rs
    // holds the expiry rule itself.
    println!("takeover after SIGKILL: {:?}", killed.elapsed());
    for child in [&mut a, &mut b] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[tokio::test]
async fn a_failed_session_is_retried_after_the_delay() {
    let ns = TestNamespace::new("retry").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let retry = json!({"retryConfig": {"maxRetry": 1, "delay": "2s"}, "backupHistoryLimit": 5});
    fixtures::batch(&ns, "flaky", vec![member("Deployment", "app")], retry).await;
    let sessions = ns.api::<BackupSession>();
    let first = new_session(&ns, "flaky").await;
    session_phase(&sessions, &first, BackupSessionPhase::Running).await;
    report_host(&sessions, &first, 0, "app", HostPhase::Failed).await;
    let failed = session_phase(&sessions, &first, BackupSessionPhase::Failed).await;
    assert!(failed.status.as_ref().and_then(|s| s.next_retry.clone()).is_some(), "a retry is scheduled");
    let retry = eventually("the retry session", Duration::from_secs(60), || {
        let (sessions, first) = (sessions.clone(), first.clone());
        async move {
            sessions
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|s| kube::ResourceExt::name_any(s) != first)
        }
    })
    .await;
    assert_eq!(retry.spec.retry_left, Some(0), "the retry has no retries left");
    let retried = sessions.get(&first).await.expect("get");
    assert_eq!(retried.status.and_then(|s| s.retried), Some(true));
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http_hooks_run_once_around_the_session() {
    let (port, calls) = hook_server(Duration::ZERO).await;
    let ns = TestNamespace::new("hooks").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let hooks = json!({"hooks": {
        "preBackup": {"httpGet": {"host": "127.0.0.1", "port": port, "path": "/freeze"}},
        "postBackup": {"httpPost": {"host": "127.0.0.1", "port": port, "path": "/thaw", "body": "done"}, "executionPolicy": "OnSuccess"}
    }});
    fixtures::batch(&ns, "hooked", vec![member("Deployment", "app")], hooks).await;
    let unreachable = json!({"hooks": {"preBackup": {"tcpSocket": {"host": "127.0.0.1", "port": 1}}}});
    fixtures::batch(&ns, "blocked", vec![member("StatefulSet", "db")], unreachable).await;

    let sessions = ns.api::<BackupSession>();
    let mut node = LocalNode::new(&ns.name);
    let name = new_session(&ns, "hooked").await;
    phase_running_jobs(&mut node, &ns, &name, BackupSessionPhase::Running).await;
    assert_eq!(*calls.lock().expect("lock"), ["freeze"], "the pre-backup hook ran before the members");
    report_host(&sessions, &name, 0, "app", HostPhase::Succeeded).await;
    phase_running_jobs(&mut node, &ns, &name, BackupSessionPhase::Succeeded).await;
    assert_eq!(*calls.lock().expect("lock"), ["freeze", "thaw done"], "the post-backup hook ran once after");

    let blocked = new_session(&ns, "blocked").await;
    phase_running_jobs(&mut node, &ns, &blocked, BackupSessionPhase::Failed).await;
    let status = sessions.get(&blocked).await.expect("get").status.expect("status");
    assert!(
        status.conditions.iter().any(|c| c.reason.as_deref() == Some("PreBackupHookFailed")),
        "{:?}",
        status.conditions
    );
    assert!(status.targets.is_empty(), "no member started");
    operator.stop().await;
}

/// Plays kubelet for the namespace's hook Jobs until session `name` is `phase`.
async fn phase_running_jobs(node: &mut LocalNode, ns: &TestNamespace, name: &str, phase: BackupSessionPhase) {
    let sessions = ns.api::<BackupSession>();
    node.run_jobs_until(HOOK_LABEL, &format!("session {name} to be {phase:?}"), Duration::from_secs(90), || {
        let sessions = sessions.clone();
        async move { sessions.get(name).await.ok().filter(|s| s.status.as_ref().and_then(|s| s.phase) == Some(phase)) }
    })
    .await;
}

/// A Stash installation's sessions (invoked by a BackupConfiguration) in the same namespace are not
/// ours: they are left alone, never marked Failed, while our own sessions run.
#[tokio::test]
async fn sessions_of_other_invoker_kinds_are_left_alone() {
    let ns = TestNamespace::new("coexist").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let theirs: BackupSession = fixtures::create(
        &ns,
        json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupSession",
               "metadata": {"name": "sample-backup-1700000000"},
               "spec": {"invoker": {"apiGroup": "stash.appscode.com", "kind": "BackupConfiguration", "name": "sample"}}}),
    )
    .await;
    fixtures::batch(&ns, "ours", vec![member("Deployment", "app")], json!({})).await;
    let sessions = ns.api::<BackupSession>();
    let ours = new_session(&ns, "ours").await;
    session_phase(&sessions, &ours, BackupSessionPhase::Running).await;
    let name = kube::ResourceExt::name_any(&theirs);
    let after = sessions.get(&name).await.expect("get");
    assert_eq!(after.status, None, "a BackupConfiguration's session is not ours to judge");
    operator.stop().await;
}

/// A session written by hand without the batch's labels (Stash's docs show such manifests) gets them
/// before it runs: sidecars watch sessions by them, a sibling is found by them, and a finalize
/// protects unsettled sessions by them. Without them, a second session ran beside it.
#[tokio::test]
async fn a_session_written_without_labels_gets_its_batchs_and_runs_alone() {
    let ns = TestNamespace::new("unlabelled").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    fixtures::batch(&ns, "ours", vec![member("Deployment", "app")], json!({})).await;
    let sessions = ns.api::<BackupSession>();
    let by_hand: BackupSession = fixtures::create(
        &ns,
        json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupSession",
               "metadata": {"name": "ours-by-hand", "labels": {"stash.appscode.com/invoker-name": "other"}},
               "spec": {"invoker": {"apiGroup": "stash.appscode.com", "kind": "BackupBatch", "name": "ours"}}}),
    )
    .await;
    let name = kube::ResourceExt::name_any(&by_hand);
    let labelled = session_phase(&sessions, &name, BackupSessionPhase::Running).await;
    let labels = labelled.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get(stash::session::INVOKER_NAME_LABEL).map(String::as_str), Some("ours"), "{labels:?}");
    let second = new_session(&ns, "ours").await;
    session_phase(&sessions, &second, BackupSessionPhase::Skipped).await;
    operator.stop().await;
}

/// A loopback HTTP server that records every request it gets as `<path> <body>` (trimmed), after
/// waiting `delay`; hooks point at it.
async fn hook_server(delay: Duration) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::sync::{Arc, Mutex};
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let recorded = calls.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: String| {
        let recorded = recorded.clone();
        async move {
            recorded.lock().expect("lock").push(format!("{} {body}", uri.path().trim_start_matches('/')).trim().into());
            tokio::time::sleep(delay).await;
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    (port, calls)
}

/// H6: a batch's http and tcp hooks leave from a Job in the batch's own namespace, running as its
/// executor identity with no Secret mounted — never from the operator's process, whose network
/// position a tenant must not borrow. A second Pod of that Job does not send the hook again.
#[tokio::test(flavor = "multi_thread")]
async fn global_http_hooks_are_sent_from_a_job_of_the_batchs_namespace() {
    let (port, calls) = hook_server(Duration::ZERO).await;
    let ns = TestNamespace::new("hookjob").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let hooks = json!({"hooks": {"preBackup": {"httpGet": {"host": "127.0.0.1", "port": port, "path": "/freeze"}}}});
    fixtures::batch(&ns, "hooked", vec![member("Deployment", "app")], hooks).await;
    let name = new_session(&ns, "hooked").await;

    let jobs = ns.api::<Job>();
    let job = eventually("the pre-backup hook's Job", Duration::from_secs(60), || {
        let jobs = jobs.clone();
        async move { jobs.list(&ListParams::default().labels(HOOK_LABEL)).await.ok()?.items.into_iter().next() }
    })
    .await;
    assert!(calls.lock().expect("lock").is_empty(), "the operator sent nothing itself");
    let pod = job.spec.as_ref().and_then(|s| s.template.spec.clone()).expect("a Pod template");
    assert_eq!(pod.service_account_name.as_deref(), Some("stash-backup"));
    assert!(pod.volumes.iter().flatten().all(|v| v.secret.is_none()), "no Secret in the hook's Pod");

    let mut node = LocalNode::new(&ns.name);
    phase_running_jobs(&mut node, &ns, &name, BackupSessionPhase::Running).await;
    assert_eq!(*calls.lock().expect("lock"), ["freeze"]);

    // Another Pod of the same Job (a lost node, a re-created Job) finds the hook taken and sends nothing.
    let args = job.spec.and_then(|s| s.template.spec).map(|p| p.containers[0].args.clone().unwrap_or_default());
    let again = node.command(&args.expect("args"), "another-pod").output().expect("stash runs");
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(*calls.lock().expect("lock"), ["freeze"], "the hook was sent once");
    operator.stop().await;
}

/// The trigger, as its own ServiceAccount, may run twice in one second (a retried trigger Job): the
/// second run finds the session the first made instead of failing.
#[tokio::test]
async fn a_retried_trigger_finds_the_session_of_its_first_run() {
    let ns = TestNamespace::new("retrigger").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::batch(&ns, "nightly", vec![member("Deployment", "app")], json!({"schedule": "0 2 * * *"})).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = support::executors::service_account_kubeconfig(&ns.name, "stash-trigger", dir.path()).await;
    let trigger = support::client_for(&kubeconfig).await;
    eventually("the trigger to create and find one session within one second", Duration::from_secs(30), || {
        let trigger = trigger.clone();
        let namespace = ns.name.clone();
        async move {
            let create = || stash::session::create_backup_session(trigger.clone(), &namespace, "nightly", None);
            let first = create().await.expect("the first run creates its session");
            let again = create().await.expect("the second run finds it");
            // Two runs a second apart make two sessions; that case is not the one under test.
            (first.metadata.name == again.metadata.name).then_some(())
        }
    })
    .await;
    operator.stop().await;
}

/// Two sessions of one batch created together: exactly one runs (its pre-backup hook once), the
/// other is Skipped — even while the first is still Pending behind a slow hook.
#[tokio::test(flavor = "multi_thread")]
async fn two_sessions_created_together_run_one_and_skip_the_other() {
    // Slow enough that the second session is reconciled while the first is still Pending.
    let (port, calls) = hook_server(Duration::from_secs(2)).await;
    let ns = TestNamespace::new("together").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let hooks = json!({"hooks": {"preBackup": {"httpGet": {"host": "127.0.0.1", "port": port, "path": "/freeze"}}}});
    fixtures::batch(&ns, "twice", vec![member("Deployment", "app")], hooks).await;

    // The trigger names sessions by the second; a user's `kubectl create` (or two triggers a second
    // apart) gives a sibling of another name at the same moment.
    let sessions = ns.api::<BackupSession>();
    let first = new_session(&ns, "twice").await;
    let mut sibling = sessions.get(&first).await.expect("get");
    sibling.metadata = kube::api::ObjectMeta {
        name: Some(format!("{first}-b")),
        labels: sibling.metadata.labels.clone(),
        owner_references: sibling.metadata.owner_references.clone(),
        ..Default::default()
    };
    let second = kube::ResourceExt::name_any(&sessions.create(&Default::default(), &sibling).await.expect("create"));
    let mut node = LocalNode::new(&ns.name);
    let phases = node
        .run_jobs_until(HOOK_LABEL, "both sessions decided", Duration::from_secs(60), || {
            let sessions = sessions.clone();
            let (first, second) = (first.clone(), second.clone());
            async move {
                let phase = |s: BackupSession| s.status.and_then(|s| s.phase);
                let a = phase(sessions.get(&first).await.ok()?)?;
                let b = phase(sessions.get(&second).await.ok()?)?;
                (a != BackupSessionPhase::Pending && b != BackupSessionPhase::Pending).then_some([a, b])
            }
        })
        .await;
    let skipped = phases.iter().filter(|p| **p == BackupSessionPhase::Skipped).count();
    assert_eq!(skipped, 1, "exactly one of the two sessions is skipped: {phases:?}");
    assert_eq!(*calls.lock().expect("lock"), ["freeze"], "the pre-backup hook ran once");
    operator.stop().await;
}

#[tokio::test]
async fn existing_pods_get_the_sidecar_through_one_restart_and_edits_restart_nothing() {
    let ns = TestNamespace::new("rollout").await;
    let _operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let deployments = ns.api::<Deployment>();
    // The Deployment's Pod exists (Pending, no webhook here) before the batch names it.
    eventually("a Pod of app", Duration::from_secs(60), || {
        let pods = ns.api::<k8s_openapi::api::core::v1::Pod>();
        async move { pods.list(&ListParams::default().labels("app=app")).await.ok().filter(|l| !l.items.is_empty()) }
    })
    .await;
    fixtures::batch(&ns, "nightly", vec![member("Deployment", "app")], json!({"schedule": "0 2 * * *"})).await;

    let annotation = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.clone())
            .and_then(|a| a.get("stash.appscode.com/sidecar-rollout").cloned())
    };
    let rolled = eventually("the one restart", Duration::from_secs(60), || {
        let deployments = deployments.clone();
        async move { deployments.get("app").await.ok().filter(|d| annotation(d).is_some()) }
    })
    .await;
    assert_eq!(annotation(&rolled).as_deref(), Some("nightly"));
    let generation = rolled.metadata.generation;

    // Editing the batch later restarts nothing: the sidecar reads its configuration at run time.
    let batches = ns.api::<BackupBatch>();
    let patch = json!({"spec": {"schedule": "30 3 * * *", "members": [member("Deployment", "app")], "timeOut": "1h"}});
    batches.patch("nightly", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("edit");
    cronjob_where(&ns, "the edited schedule", |c| c.spec.as_ref().is_some_and(|s| s.schedule == "30 3 * * *")).await;
    tokio::time::sleep(Duration::from_secs(12)).await; // past the controller's recheck
    let after = deployments.get("app").await.expect("deployment");
    assert_eq!(after.metadata.generation, generation, "the edit did not touch the pod template");
    let batch = batches.get("nightly").await.expect("batch");
    let member = &batch.status.expect("status").member_conditions[0];
    let injected = member.conditions.iter().find(|c| c.type_ == "StashSidecarInjected").expect("condition");
    assert!(injected.message.as_deref().unwrap_or_default().contains("restarted once"), "{injected:?}");
}

/// A Ready batch is not reconciled while it is unchanged, so a Pod that came up without the sidecar
/// (the webhook was down, or its certificate had expired) left `StashSidecarInjected=True` until the
/// session ended, hours later. Each session's start checks the batch's members again.
#[tokio::test]
async fn a_session_start_rechecks_that_the_members_pods_carry_the_sidecar() {
    let ns = TestNamespace::new("recheck").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    injected_deployment(&ns, "web", "site").await;
    fixtures::batch(&ns, "site", vec![member("Deployment", "web")], json!({"timeOut": "30m"})).await;
    let injected = |status: ConditionStatus| {
        let batches = ns.api::<BackupBatch>();
        async move {
            eventually(&format!("StashSidecarInjected {status:?}"), Duration::from_secs(60), || {
                let batches = batches.clone();
                async move {
                    let batch = batches.get("site").await.ok()?;
                    let members = batch.status?.member_conditions;
                    let found = members.first()?.conditions.iter().find(|c| c.type_ == "StashSidecarInjected")?.clone();
                    (found.status == status).then_some(found)
                }
            })
            .await
        }
    };
    injected(ConditionStatus::True).await;
    batch_phase(&ns, "site", BackupInvokerPhase::Ready).await;

    // A Pod of the workload comes up without the sidecar (as while the webhook is down): a template
    // without what the webhook adds rolls out a new Pod, and the old one stays (none gets Ready).
    let bare = json!({"spec": {"template": {"metadata": {"labels": {"stash.appscode.com/sidecar": null},
                                                          "annotations": {"stash.appscode.com/backup-batch": null}}}}});
    let deployments = ns.api::<Deployment>();
    deployments.patch("web", &PatchParams::default(), &Patch::Merge(&bare)).await.expect("a bare template");
    eventually("two Pods of web", Duration::from_secs(60), || {
        let deployments = deployments.clone();
        async move {
            let replicas = deployments.get("web").await.ok()?.status?.replicas?;
            (replicas == 2).then_some(())
        }
    })
    .await;
    new_session(&ns, "site").await;
    let stale = injected(ConditionStatus::False).await;
    assert!(stale.message.as_deref().unwrap_or_default().contains("of 2 Pods carry"), "{stale:?}");
    operator.stop().await;
}

/// M1: a hook runs at most once per session even when two controllers act on the same session at
/// once (two leaders, or another operator watching the same cluster): each records its claim
/// before acting, and only the one whose claim was written runs the hook.
#[tokio::test(flavor = "multi_thread")]
async fn hooks_run_at_most_once_even_with_two_controllers_on_one_session() {
    // Slow enough that both controllers see the session before either finishes.
    let (port, calls) = hook_server(Duration::from_millis(500)).await;
    let ns = TestNamespace::new("twohooks").await;
    let first = with_controllers(&ns).await;
    // A second controller under a Lease of its own: both lead, as with a split brain.
    let (settings, mut lease) = support::operator::controllers_for(&ns.name, "second-operator");
    lease.name = format!("another-operator-{}", ns.name);
    let second = support::operator::start_on(None, None, Some((settings, lease))).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let hooks = json!({"hooks": {
        "preBackup": {"httpGet": {"host": "127.0.0.1", "port": port, "path": "/freeze"}},
        "postBackup": {"httpPost": {"host": "127.0.0.1", "port": port, "path": "/thaw"}, "executionPolicy": "Always"}
    }});
    fixtures::batch(&ns, "hooked", vec![member("Deployment", "app")], hooks).await;
    let sessions = ns.api::<BackupSession>();
    let mut node = LocalNode::new(&ns.name);
    for round in 0..3 {
        let name = new_session(&ns, "hooked").await;
        phase_running_jobs(&mut node, &ns, &name, BackupSessionPhase::Running).await;
        report_host(&sessions, &name, 0, "app", HostPhase::Succeeded).await;
        phase_running_jobs(&mut node, &ns, &name, BackupSessionPhase::Succeeded).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let expected: Vec<String> = (0..=round).flat_map(|_| ["freeze".to_string(), "thaw".to_string()]).collect();
        assert_eq!(*calls.lock().expect("lock"), expected, "round {round}: each hook once per session");
    }
    first.stop().await;
    second.stop().await;
}

/// Repository `repo` in `ns` on an NFS export (the volume tenants must never see), with its Secret.
async fn nfs_repository(ns: &TestNamespace, name: &str, usage_policy: serde_json::Value) {
    fixtures::secret(ns, true).await;
    let mut spec = json!({"backend": {"storageSecretName": "repo-secret",
        "local": {"mountPath": "/repo", "nfs": {"server": NFS_SERVER, "path": "/exports/tenant-b"}}}});
    if !usage_policy.is_null() {
        spec["usagePolicy"] = usage_policy;
    }
    fixtures::create::<stash::api::Repository>(
        ns,
        json!({"apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
               "metadata": {"name": name, "namespace": ns.name}, "spec": spec}),
    )
    .await;
}

const NFS_SERVER: &str = "nfs.tenant-b.internal";

/// The batch's RepositoryFound condition once it has one.
async fn repository_condition(ns: &TestNamespace, batch: &str) -> stash::api::common::Condition {
    let batches = ns.api::<BackupBatch>();
    eventually(&format!("batch {batch} to report RepositoryFound"), Duration::from_secs(60), || {
        let (batches, batch) = (batches.clone(), batch.to_string());
        async move {
            let batch = batches.get(&batch).await.ok()?;
            batch.status?.conditions.into_iter().find(|c| c.type_ == "RepositoryFound")
        }
    })
    .await
}

/// Nothing of namespace A's Jobs, CronJobs and Pods names B's NFS export.
async fn nothing_in_a_mounts_b(a: &TestNamespace) {
    let jobs = serde_json::to_string(&a.api::<Job>().list(&ListParams::default()).await.expect("jobs")).expect("JSON");
    let cronjobs =
        serde_json::to_string(&a.api::<CronJob>().list(&ListParams::default()).await.expect("cronjobs")).expect("JSON");
    let pods = a.api::<k8s_openapi::api::core::v1::Pod>().list(&ListParams::default()).await.expect("pods");
    let pods = serde_json::to_string(&pods).expect("JSON");
    for (what, text) in [("Jobs", jobs), ("CronJobs", cronjobs), ("Pods", pods)] {
        assert!(!text.contains(NFS_SERVER), "{what} of {} carry B's volume: {text}", a.name);
    }
}

#[tokio::test]
async fn repository_of_another_namespace_is_not_used_against_its_default_policy() {
    let a = TestNamespace::new("tenant-a").await;
    let b = TestNamespace::new("tenant-b").await;
    let operator = with_controllers(&a).await;
    nfs_repository(&b, "vault", serde_json::Value::Null).await;
    fixtures::targets(&a).await;
    let mut batch = json!({"schedule": "* * * * *", "repository": {"name": "vault", "namespace": b.name}});
    fixtures::batch(&a, "sneaky", vec![member("PersistentVolumeClaim", "data")], batch.take()).await;

    let batch = batch_phase(&a, "sneaky", BackupInvokerPhase::NotReady).await;
    let found = condition(&batch, "RepositoryFound");
    assert_eq!((found.status, found.reason.as_deref()), (ConditionStatus::False, Some("RepositoryNotAllowed")));
    assert_eq!(condition(&batch, "CronJobCreated").status, ConditionStatus::False, "no trigger while refused");
    assert!(a.api::<CronJob>().get_opt("stash-trigger-sneaky").await.expect("get").is_none(), "no CronJob");

    // `stash trigger` anyway: the session fails with the reason, and no Job is made.
    let sessions = a.api::<BackupSession>();
    let name = new_session(&a, "sneaky").await;
    let session = session_phase(&sessions, &name, BackupSessionPhase::Failed).await;
    let host = &session.status.as_ref().expect("status").targets[0].stats[0];
    assert_eq!(host.phase, Some(HostPhase::Failed));
    let error = host.error.clone().unwrap_or_default();
    assert!(error.contains("does not allow use from namespace"), "{error}");
    let jobs = a.api::<Job>().list(&ListParams::default()).await.expect("jobs");
    assert!(
        jobs.items.is_empty(),
        "no Job in A: {:?}",
        jobs.items.iter().map(|j| &j.metadata.name).collect::<Vec<_>>()
    );
    nothing_in_a_mounts_b(&a).await;
    operator.stop().await;
}

#[tokio::test]
async fn repository_selector_needs_every_expression_and_a_missing_one_reads_like_a_refused_one() {
    let a = TestNamespace::new("tenant-a").await;
    let b = TestNamespace::new("tenant-b").await;
    let empty = TestNamespace::new("tenant-c").await;
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(a.client.clone());
    let labels = json!({"metadata": {"labels": {"team": "a"}}});
    namespaces.patch(&a.name, &PatchParams::default(), &Patch::Merge(&labels)).await.expect("label A");
    let operator = with_controllers(&a).await;
    let only_b = json!({"allowedNamespaces": {"from": "Selector",
        "selector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["b-only"]}]}}});
    nfs_repository(&b, "vault", only_b).await;
    let team_a = json!({"allowedNamespaces": {"from": "Selector",
        "selector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a"]}]}}});
    fixtures::create::<stash::api::Repository>(
        &b,
        json!({"apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
               "metadata": {"name": "shared", "namespace": b.name},
               "spec": {"backend": {"storageSecretName": "repo-secret", "rest": {"url": "http://127.0.0.1:8000/shared"}},
                        "usagePolicy": team_a}}),
    )
    .await;
    fixtures::targets(&a).await;
    let pvc = || vec![member("PersistentVolumeClaim", "data")];
    let naming =
        |ns: &TestNamespace, repository: &str| json!({"repository": {"name": repository, "namespace": ns.name}});
    fixtures::batch(&a, "refused", pvc(), naming(&b, "vault")).await;
    fixtures::batch(&a, "missing", pvc(), naming(&empty, "vault")).await;
    fixtures::batch(&a, "allowed", pvc(), naming(&b, "shared")).await;

    let refused = repository_condition(&a, "refused").await;
    let missing = repository_condition(&a, "missing").await;
    assert_eq!((refused.status, refused.reason.as_deref()), (ConditionStatus::False, Some("RepositoryNotAllowed")));
    let anonymous = |c: &stash::api::common::Condition, ns: &TestNamespace| {
        (c.status, c.reason.clone(), c.message.clone().unwrap_or_default().replace(&ns.name, "B"))
    };
    assert_eq!(anonymous(&missing, &empty), anonymous(&refused, &b), "no existence oracle");
    let allowed = repository_condition(&a, "allowed").await;
    assert_eq!(allowed.status, ConditionStatus::True, "{allowed:?}");

    // B has the Secret (nfs_repository made it); it is looked for where the batch's Pods mount it
    // from: A.
    let batches = a.api::<BackupBatch>();
    let secret_found = |status: ConditionStatus| {
        let batches = batches.clone();
        async move {
            eventually(&format!("BackendSecretFound {status:?}"), Duration::from_secs(60), move || {
                let batches = batches.clone();
                async move {
                    let batch = batches.get("allowed").await.ok()?;
                    let found = batch.status?.conditions.into_iter().find(|c| c.type_ == "BackendSecretFound")?;
                    (found.status == status).then_some(found)
                }
            })
            .await
        }
    };
    let missing_in_a = secret_found(ConditionStatus::False).await;
    let message = missing_in_a.message.clone().unwrap_or_default();
    assert!(message.contains(&format!("{}/repo-secret", a.name)), "{missing_in_a:?}");
    fixtures::secret(&a, true).await;
    secret_found(ConditionStatus::True).await;
    nothing_in_a_mounts_b(&a).await;

    // A's executors reach B's allowed Repository through one grant in B, none for the refused one;
    // pointed at A's own Repository, the batch no longer needs it, and it goes.
    let grants = Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(a.client.clone(), &b.name);
    let of_a = ListParams::default().labels(&format!("stash.appscode.com/repository-user={}", a.name));
    let granted = |count: usize| {
        let (grants, of_a) = (grants.clone(), of_a.clone());
        async move {
            eventually(&format!("{count} grants to A in B"), Duration::from_secs(60), || {
                let (grants, of_a) = (grants.clone(), of_a.clone());
                async move {
                    let items = grants.list(&of_a).await.ok()?.items;
                    let names: Vec<String> = items.iter().map(kube::ResourceExt::name_any).collect();
                    (names.len() == count).then_some(names)
                }
            })
            .await
        }
    };
    // One binding for A's accounts, one of the status for A's executor account alone.
    let both = [format!("stash-repository-shared.{}", a.name), format!("stash-status-shared.{}", a.name)];
    assert_eq!(granted(2).await, both);
    let own = json!({"spec": {"repository": {"name": "repo"}}});
    batches.patch("allowed", &PatchParams::default(), &Patch::Merge(&own)).await.expect("repointed");
    granted(0).await;

    // Pointed back and then deleted, the batch takes its grant with it: the grant is gone before the
    // batch is, so an operator removed right after the deletion cannot leave it behind.
    let back = json!({"spec": {"repository": {"name": "shared", "namespace": b.name}}});
    batches.patch("allowed", &PatchParams::default(), &Patch::Merge(&back)).await.expect("pointed back");
    granted(2).await;
    batches.delete("allowed", &Default::default()).await.expect("deleted");
    eventually("the batch gone", Duration::from_secs(60), || {
        let batches = batches.clone();
        async move { batches.get_opt("allowed").await.ok()?.is_none().then_some(()) }
    })
    .await;
    let left: Vec<String> =
        grants.list(&of_a).await.expect("grants").items.iter().map(kube::ResourceExt::name_any).collect();
    assert!(left.is_empty(), "the grant outlived its last batch: {left:?}");
    operator.stop().await;
}

#[tokio::test]
async fn schedule_less_batches_and_lone_restores_get_the_executor_identity() {
    let manual = TestNamespace::new("manual").await;
    let restore_only = TestNamespace::new("restore-only").await;
    let first = with_controllers(&manual).await;
    let second = with_controllers(&restore_only).await;
    fixtures::secret(&manual, true).await;
    fixtures::repository(&manual).await;
    fixtures::targets(&manual).await;
    fixtures::batch(&manual, "manual", vec![member("PersistentVolumeClaim", "data")], json!({})).await;
    fixtures::secret(&restore_only, true).await;
    fixtures::repository(&restore_only).await;
    restore_of_data(&restore_only).await;

    let account = |ns: &TestNamespace, present: bool| {
        let accounts = ns.api::<k8s_openapi::api::core::v1::ServiceAccount>();
        let what = format!("stash-backup in {} to be {}", ns.name, if present { "there" } else { "gone" });
        async move {
            eventually(&what, Duration::from_secs(60), || {
                let accounts = accounts.clone();
                async move { (accounts.get_opt("stash-backup").await.ok()?.is_some() == present).then_some(()) }
            })
            .await
        }
    };
    account(&manual, true).await;
    account(&restore_only, true).await;
    let bindings = restore_only.api::<k8s_openapi::api::rbac::v1::RoleBinding>();
    assert!(bindings.get_opt("stash-backup").await.expect("get").is_some(), "the executor's RoleBinding");

    let restores = restore_only.api::<stash::api::RestoreBatch>();
    restores.delete("bring-back", &DeleteParams::background()).await.expect("delete");
    account(&restore_only, false).await;
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn members_may_only_name_objects_of_their_own_namespace() {
    let a = TestNamespace::new("tenant-a").await;
    let b = TestNamespace::new("tenant-b").await;
    let operator = with_controllers(&a).await;
    fixtures::secret(&a, true).await;
    fixtures::repository(&a).await;
    fixtures::secret(&b, true).await;
    let foreign = |name: &str| json!({"target": {"alias": name, "ref": {"apiVersion": "v1", "kind": "Secret", "name": name, "namespace": b.name}}});
    fixtures::batch(&a, "probe", vec![foreign("repo-secret"), foreign("no-such-secret")], json!({})).await;

    let batch = batch_phase(&a, "probe", BackupInvokerPhase::NotReady).await;
    let found: Vec<_> = batch
        .status
        .as_ref()
        .expect("status")
        .member_conditions
        .iter()
        .map(|m| {
            let c = m.conditions.iter().find(|c| c.type_ == "BackupTargetFound").expect("BackupTargetFound");
            (c.status, c.reason.clone(), c.message.clone().unwrap_or_default().replace(&m.target.name, "NAME"))
        })
        .collect();
    assert_eq!(found.len(), 2);
    assert_eq!((found[0].0, found[0].1.as_deref()), (ConditionStatus::False, Some("CrossNamespaceTarget")));
    assert_eq!(found[0], found[1], "an existing and a missing object of B read the same");
    operator.stop().await;
}

/// The shipped policy, bound here to the test's namespace only (the cluster is shared).
#[tokio::test]
async fn the_admission_policy_refuses_members_of_other_namespaces_at_apply_time() {
    let a = TestNamespace::new("member-policy").await;
    let binding = fixtures::bind_shipped_policy(&a, "stash-same-namespace-members").await;

    let batch = |namespace: &str| -> BackupBatch {
        serde_json::from_value(json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch",
            "metadata": {"name": "probe", "namespace": a.name},
            "spec": {"repository": {"name": "repo"}, "members": [{"target": {"alias": "s",
                "ref": {"apiVersion": "v1", "kind": "Secret", "name": "s", "namespace": namespace}}}]}}))
        .expect("a BackupBatch")
    };
    let dry_run = kube::api::PostParams { dry_run: true, ..Default::default() };
    let batches = a.api::<BackupBatch>();
    let refusal = eventually("the policy to refuse another namespace", Duration::from_secs(30), || {
        let (batches, dry_run, foreign) = (batches.clone(), dry_run.clone(), batch("kube-system"));
        async move { batches.create(&dry_run, &foreign).await.err() }
    })
    .await;
    assert!(refusal.to_string().contains("target.ref.namespace"), "{refusal}");
    batches.create(&dry_run, &batch(&a.name)).await.expect("its own namespace is fine");
    binding.remove().await;
}

/// M3: batch names up to 63 characters still get a CronJob (its name at most 52 characters) and
/// sessions whose Jobs and labels fit, with a status that says the name was shortened.
#[tokio::test]
async fn long_batch_names_get_a_cronjob_and_jobs_that_fit_the_limits() {
    let ns = TestNamespace::new("longnames").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let name = format!("nightly-{}", "x".repeat(55));
    assert_eq!(name.len(), 63);
    let schedule = json!({"schedule": "0 3 * * *"});
    fixtures::batch(&ns, &name, vec![member("PersistentVolumeClaim", "data")], schedule).await;
    let batch = batch_phase(&ns, &name, BackupInvokerPhase::Ready).await;
    let created = condition(&batch, "CronJobCreated");
    assert_eq!(created.status, ConditionStatus::True, "{created:?}");
    assert!(created.message.as_deref().unwrap_or_default().contains("shortened"), "{created:?}");
    let cronjobs = ns.api::<CronJob>().list(&ListParams::default()).await.expect("list").items;
    assert_eq!(cronjobs.len(), 1);
    assert!(kube::ResourceExt::name_any(&cronjobs[0]).len() <= 52);

    let session = new_session(&ns, &name).await;
    let sessions = ns.api::<BackupSession>();
    session_phase(&sessions, &session, BackupSessionPhase::Running).await;
    let jobs = ns.api::<Job>();
    let job = eventually("the backup Job", Duration::from_secs(60), || {
        let jobs = jobs.clone();
        async move { jobs.list(&ListParams::default()).await.ok()?.items.into_iter().next() }
    })
    .await;
    let labels = job.metadata.labels.clone().unwrap_or_default();
    assert!(labels.values().all(|v| v.len() <= 63), "{labels:?}");
    assert!(kube::ResourceExt::name_any(&job).len() <= 63);
    let listed = stash::commands::sessions_table(ns.client.clone(), &ns.name, &name).await.expect("table");
    assert!(listed.contains(&session), "{listed}");
    operator.stop().await;
}

/// M13, H8: members that cannot make one session make the batch Invalid; a workload scaled to zero
/// fails its target at once instead of holding the session (and every later one) until a deadline.
#[tokio::test]
async fn duplicate_members_are_invalid_and_a_workload_scaled_to_zero_fails_at_once() {
    let ns = TestNamespace::new("badmembers").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let twice = vec![member("StatefulSet", "db"), member("StatefulSet", "db")];
    let invalid = batch_phase_of(&ns, "twice", twice, BackupInvokerPhase::Invalid).await;
    assert_eq!(condition(&invalid, "ValidationPassed").reason.as_deref(), Some("DuplicateMember"));

    ns.api::<Deployment>()
        .patch("app", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 0}})))
        .await
        .expect("scale to zero");
    fixtures::batch(&ns, "idle", vec![member("Deployment", "app")], json!({})).await;
    let sessions = ns.api::<BackupSession>();
    let session = new_session(&ns, "idle").await;
    let failed = session_phase(&sessions, &session, BackupSessionPhase::Failed).await;
    let status = failed.status.expect("status");
    let error = status.targets[0].stats[0].error.clone().unwrap_or_default();
    assert!(error.contains("scaled to zero"), "{status:?}");
    assert!(status.session_deadline.is_some(), "every session has a deadline");
    operator.stop().await;
}

async fn batch_phase_of(
    ns: &TestNamespace,
    name: &str,
    members: Vec<serde_json::Value>,
    phase: BackupInvokerPhase,
) -> BackupBatch {
    fixtures::batch(ns, name, members, json!({})).await;
    batch_phase(ns, name, phase).await
}

/// May `system:serviceaccount:<ns>:<account>` list the namespace's BackupSessions? (Asked as admin.)
async fn account_may_list_sessions(ns: &TestNamespace, account: &str) -> bool {
    use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{}:{account}", ns.name)),
            groups: Some(vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{}", ns.name)]),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ns.name.clone()),
                verb: Some("list".into()),
                group: Some("stash.appscode.com".into()),
                resource: Some("backupsessions".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviews: Api<SubjectAccessReview> = Api::all(ns.client.clone());
    let answer = reviews.create(&Default::default(), &review).await.expect("a SubjectAccessReview");
    answer.status.is_some_and(|s| s.allowed)
}

#[tokio::test]
async fn the_sidecar_runs_as_the_workloads_service_account_which_gets_the_sidecar_role() {
    let ns = TestNamespace::new("sidecar-identity").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    assert!(!account_may_list_sessions(&ns, "default").await, "nothing grants it before a batch");
    fixtures::batch(&ns, "web", vec![member("Deployment", "app")], json!({})).await;
    batch_phase(&ns, "web", BackupInvokerPhase::Ready).await;
    eventually("the workload's account to read sessions", Duration::from_secs(30), || async {
        account_may_list_sessions(&ns, "default").await.then_some(())
    })
    .await;

    // Released with the namespace's last batch, like the executor identity.
    ns.api::<BackupBatch>().delete("web", &DeleteParams::background()).await.expect("delete");
    eventually("the workload's binding to go", Duration::from_secs(60), || async {
        (!account_may_list_sessions(&ns, "default").await).then_some(())
    })
    .await;
    operator.stop().await;
}

/// The Pods of every Job the operator makes in a namespace enforcing Pod Security `restricted`
/// (the trigger's, a PVC member's backup Job, the finalize Job) are admitted: Pod Security admission
/// runs at Pod creation, so the Job controller's Pods either exist or were refused.
#[tokio::test(flavor = "multi_thread")]
async fn every_operator_made_pod_passes_pod_security_restricted() {
    use k8s_openapi::api::core::v1::Pod;
    let ns = TestNamespace::restricted("restricted").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let (port, _) = hook_server(Duration::ZERO).await;
    let spec = json!({"schedule": "0 2 * * *",
                      "hooks": {"preBackup": {"httpGet": {"host": "127.0.0.1", "port": port, "path": "/"}}}});
    fixtures::batch(&ns, "nightly", vec![member("PersistentVolumeClaim", "data")], spec).await;
    batch_phase(&ns, "nightly", BackupInvokerPhase::Ready).await;

    // The trigger's Job, as `kubectl create job --from=cronjob/...` makes it.
    let cronjob = cronjob_where(&ns, "the trigger CronJob", |_| true).await;
    let template = cronjob.spec.expect("spec").job_template;
    let trigger = Job {
        metadata: kube::api::ObjectMeta { name: Some("manual-trigger".into()), ..Default::default() },
        spec: template.spec,
        status: None,
    };
    ns.api::<Job>().create(&Default::default(), &trigger).await.expect("create the trigger Job");

    let sessions = ns.api::<BackupSession>();
    let session = new_session(&ns, "nightly").await;
    phase_running_jobs(&mut LocalNode::new(&ns.name), &ns, &session, BackupSessionPhase::Running).await;
    report_host(&sessions, &session, 0, "data", HostPhase::Succeeded).await;
    session_phase(&sessions, &session, BackupSessionPhase::Succeeded).await;

    let pods = ns.api::<Pod>();
    let mut jobs = vec!["manual-trigger".to_string()];
    jobs.extend(["pre-backup", "0", "finalize"].map(|suffix| format!("{session}-{suffix}")));
    for job in jobs {
        let refused = eventually(&format!("a Pod of Job {job} or its refusal"), Duration::from_secs(60), || {
            let (pods, events, job) = (pods.clone(), ns.api::<k8s_openapi::api::core::v1::Event>(), job.clone());
            async move {
                let selector = format!("job-name={job}");
                if !pods.list(&ListParams::default().labels(&selector)).await.ok()?.items.is_empty() {
                    return Some(None);
                }
                // The Job controller reports a refused Pod as the Job's FailedCreate event.
                let about = format!("involvedObject.name={job}");
                let events = events.list(&ListParams::default().fields(&about)).await.ok()?.items;
                events.into_iter().filter_map(|e| e.message).find(|m| m.contains("violates PodSecurity")).map(Some)
            }
        })
        .await;
        assert_eq!(refused, None, "the Pod of Job {job} was refused");
    }
    operator.stop().await;
}

/// An exec hook runs in every live Pod of the batch's workloads. A Pod that does not run yet (no
/// kubelet here: the Deployment's Pod stays Pending) is waited for, then fails the session before any
/// member, named: passed over, it would back up without the hook once it ran.
#[tokio::test]
async fn an_exec_hook_waits_for_a_pod_that_does_not_run_and_fails_naming_it() {
    let ns = TestNamespace::new("exechook").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    let hooks = json!({"hooks": {"preBackup": {"exec": {"command": ["sync"]}, "containerName": "c"}}});
    fixtures::batch(&ns, "flushed", vec![member("Deployment", "app")], hooks).await;
    let pods = ns.api::<k8s_openapi::api::core::v1::Pod>();
    eventually("the Deployment's Pod", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move { pods.list(&ListParams::default().labels("app=app")).await.ok()?.items.into_iter().next() }
    })
    .await;
    let sessions = ns.api::<BackupSession>();
    let name = new_session(&ns, "flushed").await;
    let failed = session_phase(&sessions, &name, BackupSessionPhase::Failed).await;
    let status = failed.status.expect("status");
    let hook = status.conditions.iter().find(|c| c.type_ == "PreBackupHookExecutionSucceeded").expect("hook condition");
    assert_eq!(hook.status, ConditionStatus::False);
    let message = hook.message.clone().unwrap_or_default();
    assert!(message.starts_with("not run: Pod app-"), "{message}");
    assert!(message.contains("(Pending) of the batch's workloads did not run its container"), "{message}");
    assert!(status.targets.is_empty(), "no member started");
    operator.stop().await;
}

/// Batch `measured` (one Deployment member) with one Succeeded session; the operator that ran it,
/// and the session's name.
async fn measured_success(ns: &TestNamespace) -> (support::operator::RunningOperator, String) {
    let operator = with_controllers(ns).await;
    fixtures::secret(ns, true).await;
    fixtures::repository(ns).await;
    fixtures::targets(ns).await;
    fixtures::batch(ns, "measured", vec![member("Deployment", "app")], json!({})).await;
    let sessions = ns.api::<BackupSession>();
    let name = new_session(ns, "measured").await;
    session_phase(&sessions, &name, BackupSessionPhase::Running).await;
    report_host(&sessions, &name, 0, "app", HostPhase::Succeeded).await;
    session_phase(&sessions, &name, BackupSessionPhase::Succeeded).await;
    fixtures::mark_finalized(&sessions, &name).await;
    (operator, name)
}

/// The session batch `name` records as its last success (`status.lastSuccessfulSession`), once it does.
async fn recorded_success(ns: &TestNamespace, name: &str) -> String {
    let batches = ns.api::<BackupBatch>();
    eventually("the last success recorded in the batch's status", Duration::from_secs(30), || {
        let batches = batches.clone();
        async move { Some(batches.get(name).await.ok()?.status?.last_successful_session?.name) }
    })
    .await
}

/// The `/metrics` line of `measured`'s last-success series, if exported.
fn last_success(ns: &TestNamespace, metrics: &str) -> Option<String> {
    let series = format!("namespace=\"{}\",batch=\"measured\"", ns.name);
    metrics.lines().find(|l| l.contains("last_success") && l.contains(&series)).map(ToString::to_string)
}

/// A batch's last success lives in its status (`lastSuccessfulSession`), not only in one process's
/// memory: an operator started afterwards (a restart, a new leader) exports the same series.
#[tokio::test]
async fn a_batchs_last_success_survives_an_operator_restart() {
    let ns = TestNamespace::new("lastsuccess").await;
    let (operator, name) = measured_success(&ns).await;
    let before = eventually("the last success exported", Duration::from_secs(30), || async {
        last_success(&ns, &operator.metrics().await)
    })
    .await;
    assert_eq!(recorded_success(&ns, "measured").await, name);
    operator.stop().await;

    let restarted = with_controllers(&ns).await;
    let after = eventually("the restarted operator to export it", Duration::from_secs(30), || async {
        last_success(&ns, &restarted.metrics().await)
    })
    .await;
    assert_eq!(after, before, "the same series and value after the restart");
    restarted.stop().await;
}

/// `kubectl stash describe` (the `stash` binary installed as `kubectl-stash`, as kubectl finds
/// plugins) shows a batch on one screen, as its user's credentials see it.
#[tokio::test]
async fn kubectl_stash_describes_a_batch() {
    let ns = TestNamespace::new("describe").await;
    let (operator, name) = measured_success(&ns).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let plugin = dir.path().join("kubectl-stash");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_stash"), &plugin).expect("install as a kubectl plugin");
    let described = eventually("a description with the last success", Duration::from_secs(30), || {
        let output = Command::new(&plugin)
            .args(["describe", "measured", "-n", &ns.name])
            .env("KUBECONFIG", &support::cluster().kubeconfig)
            .output()
            .expect("kubectl-stash runs");
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        async move { (output.status.success() && !text.contains("none yet")).then_some(text) }
    })
    .await;
    assert!(described.contains(&format!("{}/measured", ns.name)), "{described}");
    assert!(described.contains(&format!("Last success: {name} at")), "{described}");
    assert!(described.contains("Deployment/app"), "{described}");
    assert!(described.contains(&name), "the session is listed: {described}");
    let missing = Command::new(&plugin)
        .args(["describe", "nothing", "-n", &ns.name])
        .env("KUBECONFIG", &support::cluster().kubeconfig)
        .output()
        .expect("kubectl-stash runs");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"), "a clear error");
    operator.stop().await;
}

/// L10: a batch's metric series (last success) goes with the batch; a deleted batch is not
/// reported forever as "last succeeded at ...".
#[tokio::test]
async fn a_deleted_batch_leaves_no_metric_series_behind() {
    let ns = TestNamespace::new("metrics").await;
    let (operator, _) = measured_success(&ns).await;
    // Exported once the session's record reached the batch's status and the batch was reconciled.
    eventually("the batch's last success exported", Duration::from_secs(30), || async {
        last_success(&ns, &operator.metrics().await)
    })
    .await;

    ns.api::<BackupBatch>().delete("measured", &DeleteParams::default()).await.expect("delete");
    eventually("the batch gone", Duration::from_secs(60), || {
        let batches = ns.api::<BackupBatch>();
        async move { batches.get_opt("measured").await.ok()?.is_none().then_some(()) }
    })
    .await;
    eventually("its metric series gone", Duration::from_secs(30), || async {
        last_success(&ns, &operator.metrics().await).is_none().then_some(())
    })
    .await;
    operator.stop().await;
}

/// M16: a batch applied before its Repository (GitOps ordering) does not spend its one restart while
/// the webhook cannot inject (it knows no Repository): the restart waits for the Repository.
#[tokio::test]
async fn the_one_restart_waits_for_the_repository() {
    let ns = TestNamespace::new("rollwait").await;
    let _operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::targets(&ns).await;
    eventually("a Pod of app", Duration::from_secs(60), || {
        let pods = ns.api::<k8s_openapi::api::core::v1::Pod>();
        async move { pods.list(&ListParams::default().labels("app=app")).await.ok().filter(|l| !l.items.is_empty()) }
    })
    .await;
    fixtures::batch(&ns, "early", vec![member("Deployment", "app")], json!({})).await;
    let deployments = ns.api::<Deployment>();
    let rolled = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .is_some_and(|a| a.contains_key("stash.appscode.com/sidecar-rollout"))
    };
    // Past the settle delay (5 s) and the controller's recheck (10 s): no Repository, no restart.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(!rolled(&deployments.get("app").await.expect("deployment")), "restarted before the Repository existed");

    fixtures::repository(&ns).await;
    eventually("the one restart once the Repository exists", Duration::from_secs(60), || {
        let deployments = deployments.clone();
        async move { deployments.get("app").await.ok().filter(|d| rolled(d)).map(drop) }
    })
    .await;
}

/// Issue 12: the BackupTargetFound condition of each member of `batch`, once it is `phase`:
/// (member name, status, reason, message).
async fn member_found(
    ns: &TestNamespace,
    batch: &str,
    phase: BackupInvokerPhase,
) -> Vec<(String, ConditionStatus, String, String)> {
    let batch = batch_phase(ns, batch, phase).await;
    let members = batch.status.expect("status").member_conditions;
    members
        .iter()
        .map(|m| {
            let c = m.conditions.iter().find(|c| c.type_ == "BackupTargetFound").expect("BackupTargetFound");
            let reason = c.reason.clone().unwrap_or_default();
            (m.target.name.clone(), c.status, reason, c.message.clone().unwrap_or_default())
        })
        .collect()
}

fn app_binding_member(name: &str, task: &str) -> serde_json::Value {
    json!({"target": {"alias": name, "ref": {"apiVersion": "appcatalog.appscode.com/v1alpha1", "kind": "AppBinding", "name": name}},
           "task": {"name": task}})
}

/// Issue 12: Stash's docs batch (a MySQL AppBinding member) on a cluster without the AppBinding CRD:
/// stash does not depend on it, and says what is missing instead of `TargetKindNotSupported`.
#[tokio::test]
async fn an_appbinding_member_without_the_crd_says_the_crd_is_missing() {
    let _crd = support::app_binding::absent().await;
    let ns = TestNamespace::new("appbinding-nocrd").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::batch(&ns, "wordpress", vec![app_binding_member("wordpress-db", "mysql-backup-8.0.14")], json!({})).await;
    let found = member_found(&ns, "wordpress", BackupInvokerPhase::NotReady).await;
    assert_eq!(found.len(), 1);
    let (_, status, reason, message) = &found[0];
    assert_eq!((*status, reason.as_str()), (ConditionStatus::False, "AppBindingCRDMissing"), "{message}");
    assert!(message.contains("appbindings.appcatalog.appscode.com"), "{message}");
    operator.stop().await;
}

/// Issue 12: an AppBinding member as KubeDB writes it (a Service, the auth Secret) makes the batch
/// Ready, and its Job gets the Service's cluster name, port and database through Pod annotations and
/// the Secret's username and password by reference — never a Secret value in the Job.
#[tokio::test]
async fn an_appbinding_member_gives_its_job_the_service_endpoint_and_the_secret_by_reference() {
    let _crd = support::app_binding::installed().await;
    let ns = TestNamespace::new("appbinding-job").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::create::<k8s_openapi::api::core::v1::Secret>(
        &ns,
        json!({"metadata": {"name": "shop-db-auth"}, "stringData": {"username": "postgres", "password": PASSWORD}}),
    )
    .await;
    support::app_binding::create(
        &ns,
        "shop-db",
        json!({"type": "kubedb.com/postgres", "version": "15.1", "secret": {"name": "shop-db-auth"},
               "clientConfig": {"service": {"name": "shop-postgres", "port": 5432, "scheme": "postgresql", "path": "/shop", "query": "sslmode=disable"}},
               "parameters": {"stash": {"addon": {"backupTask": {"name": "postgres-backup-15.1"}}}}}),
    )
    .await;
    fixtures::batch(&ns, "shop", vec![app_binding_member("shop-db", "postgres-backup-15.1")], json!({})).await;
    let found = member_found(&ns, "shop", BackupInvokerPhase::Ready).await;
    assert_eq!((found[0].1, found[0].2.as_str()), (ConditionStatus::True, "TargetAvailable"), "{found:?}");

    let session = new_session(&ns, "shop").await;
    let jobs = ns.api::<Job>();
    let selector = format!("stash.appscode.com/backup-session={session}");
    let job = eventually("the AppBinding member's Job", Duration::from_secs(60), || {
        let (jobs, selector) = (jobs.clone(), selector.clone());
        async move { jobs.list(&ListParams::default().labels(&selector)).await.ok()?.items.into_iter().next() }
    })
    .await;
    let template = &job.spec.as_ref().expect("spec").template;
    let annotations = template.metadata.as_ref().and_then(|m| m.annotations.clone()).unwrap_or_default();
    let endpoint: Vec<(&str, &str)> = annotations
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("stash.appscode.com/database-")?, v.as_str())))
        .collect();
    let host = format!("shop-postgres.{}.svc", ns.name);
    assert_eq!(endpoint, [("database", "shop"), ("host", host.as_str()), ("port", "5432")]);
    let pod = template.spec.as_ref().expect("pod");
    let volume = pod.volumes.iter().flatten().find(|v| v.name == "database-secret").expect("the database volume");
    let sources = volume.projected.as_ref().and_then(|p| p.sources.clone()).expect("a projected volume");
    let secret = sources.iter().find_map(|s| s.secret.as_ref()).expect("the Secret by reference");
    let keys: Vec<(&str, &str)> = secret.items.iter().flatten().map(|i| (i.key.as_str(), i.path.as_str())).collect();
    assert_eq!(
        (secret.name.as_str(), keys),
        ("shop-db-auth", vec![("username", "username"), ("password", "password")])
    );
    let files: Vec<(&str, &str)> = sources
        .iter()
        .filter_map(|s| s.downward_api.as_ref())
        .flat_map(|d| d.items.iter().flatten())
        .map(|i| (i.path.as_str(), i.field_ref.as_ref().map_or("", |f| f.field_path.as_str())))
        .collect();
    assert!(files.contains(&("host", "metadata.annotations['stash.appscode.com/database-host']")), "{files:?}");
    let container = &pod.containers[0];
    let mount = container.volume_mounts.iter().flatten().find(|m| m.name == "database-secret").expect("mounted");
    assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/stash/database", Some(true)));
    let args = container.args.clone().unwrap_or_default();
    assert!(args.contains(&"--target-kind=AppBinding".to_string()), "{args:?}");
    assert!(!serde_json::to_string(&job).expect("JSON").contains(PASSWORD), "no secret value in the Job");
    operator.stop().await;
}

/// Issue 12: what keeps an AppBinding member from being backed up is said per member: a missing
/// AppBinding or Secret as for any member kind, a Secret without `password`, a url that is no
/// endpoint, a task that is no database stash dumps, and an AppBinding of another namespace —
/// refused by the one namespace check before anything of it is read.
#[tokio::test]
async fn appbinding_members_that_cannot_be_used_say_why() {
    let _crd = support::app_binding::installed().await;
    let ns = TestNamespace::new("appbinding-why").await;
    let other = TestNamespace::new("appbinding-other").await;
    let operator = with_controllers(&ns).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    let auth = json!({"metadata": {"name": "auth"}, "stringData": {"username": "u", "password": PASSWORD}});
    fixtures::create::<k8s_openapi::api::core::v1::Secret>(&ns, auth.clone()).await;
    fixtures::create::<k8s_openapi::api::core::v1::Secret>(&other, auth).await;
    fixtures::create::<k8s_openapi::api::core::v1::Secret>(
        &ns,
        json!({"metadata": {"name": "user-only"}, "stringData": {"username": "u"}}),
    )
    .await;
    let binding = |secret: &str, url: &str| json!({"type": "kubedb.com/mysql", "secret": {"name": secret}, "clientConfig": {"url": url}});
    support::app_binding::create(&ns, "no-secret", binding("absent", "tcp(db.example.com:3306)/")).await;
    support::app_binding::create(&ns, "no-password", binding("user-only", "tcp(db.example.com:3306)/")).await;
    support::app_binding::create(&ns, "bad-url", binding("auth", "db.example.com:3306")).await;
    support::app_binding::create(&ns, "mongo", binding("auth", "tcp(db.example.com:3306)/")).await;
    support::app_binding::create(&other, "elsewhere", binding("auth", "tcp(db.example.com:3306)/")).await;
    let mut foreign = app_binding_member("elsewhere", "mysql-backup-8.0.14");
    foreign["target"]["ref"]["namespace"] = json!(other.name);
    let members = vec![
        app_binding_member("missing", "mysql-backup-8.0.14"),
        app_binding_member("no-secret", "mysql-backup-8.0.14"),
        app_binding_member("no-password", "mysql-backup-8.0.14"),
        app_binding_member("bad-url", "mysql-backup-8.0.14"),
        app_binding_member("mongo", "mongodb-backup-4.2.3"),
        foreign,
    ];
    fixtures::batch(&ns, "why", members, json!({})).await;
    let found = member_found(&ns, "why", BackupInvokerPhase::NotReady).await;
    let reasons: Vec<(&str, &str)> = found.iter().map(|(n, _, r, _)| (n.as_str(), r.as_str())).collect();
    assert_eq!(
        reasons,
        [
            ("missing", "TargetNotFound"),
            ("no-secret", "TargetNotFound"),
            ("no-password", "SecretKeyMissing"),
            ("bad-url", "AppBindingInvalid"),
            ("mongo", "TaskNotSupported"),
            ("elsewhere", "CrossNamespaceTarget"),
        ]
    );
    assert!(found.iter().all(|(_, status, _, _)| *status == ConditionStatus::False));
    assert!(found[1].3.contains("Secret absent"), "{}", found[1].3);
    assert!(found[2].3.contains("no password key"), "{}", found[2].3);
    assert!(found.iter().all(|(_, _, _, message)| !message.contains(PASSWORD)));
    operator.stop().await;
}

/// A running host whose progress stands still for `--stall-after` sets the session's `Stalled`
/// condition with a Warning Event. A host that then finishes before its next sample (a backend
/// that came back) leaves the session finished and no longer stalled.
#[tokio::test]
async fn a_stalled_host_is_reported_and_its_session_does_not_end_stalled() {
    let ns = TestNamespace::new("stall").await;
    let mut controllers = support::operator::controllers_for(&ns.name, "test-operator");
    controllers.0.stall_after = Duration::from_secs(2);
    let _operator = support::operator::start_on(None, None, Some(controllers)).await;
    fixtures::secret(&ns, true).await;
    fixtures::repository(&ns).await;
    fixtures::targets(&ns).await;
    fixtures::batch(&ns, "stalling", vec![member("Deployment", "app")], json!({})).await;
    let sessions = ns.api::<BackupSession>();
    let name = new_session(&ns, "stalling").await;
    session_phase(&sessions, &name, BackupSessionPhase::Running).await;
    let sample = HostProgress {
        hostname: "app".into(),
        percent: 40,
        bytes_done: 400,
        total_bytes: 1000,
        files_done: 4,
        total_files: 10,
        seconds_remaining: Some(30),
        last_change: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    };
    stash::agent::status::report_progress(&sessions, &name, "Deployment", "app", &sample).await.expect("progress");

    let stalled = fixtures::session_condition(&sessions, &name, "Stalled").await;
    assert_eq!(stalled.reason.as_deref(), Some("NoProgress"));
    let message = stalled.message.unwrap_or_default();
    assert!(message.starts_with("Deployment/app host app: no progress since"), "{message}");
    let events = ns.api::<k8s_openapi::api::events::v1::Event>();
    eventually("a BackupStalled Event", Duration::from_secs(30), || {
        let events = events.clone();
        async move {
            let listed = events.list(&Default::default()).await.ok()?.items;
            listed.into_iter().find(|e| e.reason.as_deref() == Some("BackupStalled"))
        }
    })
    .await;

    let done = HostBackupStats {
        hostname: "app".into(),
        phase: Some(HostPhase::Succeeded),
        snapshots: Vec::new(),
        duration: Some("9s".into()),
        error: None,
    };
    stash::agent::status::report_host(&sessions, &name, "Deployment", "app", done).await.expect("report");
    let finished = session_phase(&sessions, &name, BackupSessionPhase::Succeeded).await;
    let status = finished.status.expect("status");
    let condition = status.conditions.iter().find(|c| c.type_ == "Stalled").expect("the condition, kept");
    assert_eq!(
        (condition.status, condition.reason.as_deref()),
        (ConditionStatus::False, Some("NoneStalled")),
        "{status:?}"
    );
    assert_eq!(status.progress, None);
}
