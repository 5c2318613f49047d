//! The monitoring pack (deploy/components/monitoring): its alert rules pass `promtool check rules` and
//! their unit tests (`promtool test rules`, tests/monitoring/rules-test.yaml), each alert has its runbook,
//! every metric the rules and the Grafana dashboard query is one a running operator exports, and a
//! batch's series appear with its sessions, move to a new leader unchanged, and go with the batch.

mod support;

use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};
use stash::api::backup_session::{BackupSessionPhase, HostBackupStats, HostPhase, SnapshotStats};
use stash::api::{BackupBatch, BackupSession, Repository, RestoreBatch};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::fixtures::{self, member, session_phase};
use support::{TestNamespace, eventually};

const COMPONENT: &str = "deploy/components/monitoring";

/// The PrometheusRule's spec: a Prometheus rule file (`groups:`).
fn rule_groups() -> Value {
    let path = support::repo_root().join(COMPONENT).join("prometheusrule.yaml");
    let rule: Value = serde_yaml::from_str(&std::fs::read_to_string(path).expect("the PrometheusRule")).expect("YAML");
    rule["spec"].clone()
}

fn rules(groups: &Value) -> impl Iterator<Item = &Value> {
    groups["groups"].as_array().into_iter().flatten().flat_map(|g| g["rules"].as_array().into_iter().flatten())
}

fn dashboard() -> Value {
    let path = support::repo_root().join(COMPONENT).join("grafana-dashboard.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard")).expect("JSON")
}

/// Every `stash_…` metric name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("stash_") {
        let after = &rest[start..];
        let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
        names.insert(after[..end].to_string());
        rest = &after[end..];
    }
    names
}

/// Every PromQL expression of the dashboard: panel targets and template variable queries.
fn dashboard_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "definition", Value::String(expr)) => out.push(expr.clone()),
                    _ => dashboard_exprs(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| dashboard_exprs(item, out)),
        _ => {}
    }
}

fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(support::promtool_path()).current_dir(dir).args(args).output().expect("promtool runs");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{said}");
    said
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests() {
    let dir = tempfile::tempdir().expect("temp dir");
    let groups = rule_groups();
    std::fs::write(dir.path().join("rules.yaml"), serde_yaml::to_string(&groups).expect("YAML")).expect("rules");
    let tests = support::repo_root().join("tests/monitoring/rules-test.yaml");
    std::fs::copy(&tests, dir.path().join("rules-test.yaml")).expect("the rule tests");

    let checked = promtool(dir.path(), &["check", "rules", "rules.yaml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(dir.path(), &["test", "rules", "rules-test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Every alert is tested, firing at least once, and names a runbook that exists.
    let tests = std::fs::read_to_string(tests).expect("the rule tests");
    let alerts: Vec<&str> = rules(&groups).filter_map(|r| r["alert"].as_str()).collect();
    assert_eq!(alerts.len(), 8, "{alerts:?}");
    for alert in alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}\n        exp_alerts:\n          -")),
            "{alert} never fires in a test"
        );
        let rule = rules(&groups).find(|r| r["alert"] == alert).expect("the rule");
        let runbook = format!("docs/runbooks/{alert}.md");
        assert_eq!(rule["annotations"]["runbook_url"], runbook.as_str());
        assert!(support::repo_root().join(&runbook).is_file(), "{runbook} is missing");
    }
}

/// Batch `measured` (a Deployment member, hourly) with one Succeeded session whose host added
/// 1.5 MiB, and its Repository's status as a finalize Job writes it; the operator that ran it.
async fn measured(ns: &TestNamespace) -> support::operator::RunningOperator {
    let controllers = support::operator::controllers_for(&ns.name, "test-operator");
    let operator = support::operator::start_on(None, None, Some(controllers)).await;
    fixtures::secret(ns, true).await;
    fixtures::repository(ns).await;
    fixtures::targets(ns).await;
    fixtures::batch(ns, "measured", vec![member("Deployment", "app")], json!({"schedule": "0 * * * *"})).await;
    let sessions = ns.api::<BackupSession>();
    let name = succeeded_session(ns).await;
    fixtures::mark_finalized(&sessions, &name).await;
    let status = json!({"status": {"integrity": true, "totalSize": "2.0 GiB", "snapshotCount": 3,
        "snapshotsRemovedOnLastCleanup": 1}});
    ns.api::<Repository>()
        .patch_status("repo", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("the Repository's status");
    operator
}

/// A session of `measured` run to Succeeded by its one host, not finalized.
async fn succeeded_session(ns: &TestNamespace) -> String {
    let sessions = ns.api::<BackupSession>();
    let name =
        stash::session::create_backup_session(ns.client.clone(), &ns.name, "measured", None).await.expect("a session");
    let name = kube::ResourceExt::name_any(&name);
    session_phase(&sessions, &name, BackupSessionPhase::Running).await;
    let entry = HostBackupStats {
        hostname: "app".into(),
        phase: Some(HostPhase::Succeeded),
        snapshots: vec![SnapshotStats { name: "1a2b".into(), uploaded: Some("1.5 MiB".into()), ..Default::default() }],
        duration: Some("1s".into()),
        error: None,
    };
    stash::status_write::update_status(&sessions, &name, |session| {
        session.status.as_mut().expect("a status").targets[0].stats.push(entry.clone());
        true
    })
    .await
    .expect("the host entry");
    session_phase(&sessions, &name, BackupSessionPhase::Succeeded).await;
    name
}

/// The `/metrics` lines of `measured`'s series: ours (`batch=`) and Stash's (`invoker_name=`).
fn measured_lines(ns: &TestNamespace, metrics: &str) -> Vec<String> {
    let ours = format!("namespace=\"{}\",batch=\"measured\"", ns.name);
    let stash = format!("invoker_name=\"measured\",namespace=\"{}\"", ns.name);
    metrics.lines().filter(|l| l.contains(&ours) || l.contains(&stash)).map(ToString::to_string).collect()
}

/// The value of the line of `metric` among `lines` that has every one of `labels`.
fn value(lines: &[String], metric: &str, labels: &[&str]) -> Option<f64> {
    let line = lines.iter().find(|l| l.starts_with(&format!("{metric}{{")) && labels.iter().all(|x| l.contains(x)))?;
    line.rsplit(' ').next()?.parse().ok()
}

/// Every per-batch family, once the session's record and the Repository's status reached the batch.
const PER_BATCH: [&str; 16] = [
    "stash_backup_last_success_timestamp_seconds",
    "stash_backupbatch_unfinalized_sessions",
    "stash_backupbatch_last_session_success",
    "stash_backupbatch_expected_interval_seconds",
    "stash_backupbatch_paused",
    "stash_backupbatch_created_timestamp_seconds",
    "stash_backupbatch_last_session_added_bytes",
    "stash_backupbatch_condition",
    "stash_backupbatch_sessions_total",
    "stash_backupbatch_session_duration_seconds_count",
    "stash_backup_session_success",
    "stash_backup_session_duration_seconds",
    "stash_backup_last_success_time_seconds",
    "stash_repository_integrity",
    "stash_repository_size_bytes",
    "stash_repository_snapshot_count",
];

async fn all_series(ns: &TestNamespace, operator: &support::operator::RunningOperator) -> Vec<String> {
    eventually("every per-batch series of measured", Duration::from_secs(60), || async {
        let lines = measured_lines(ns, &operator.metrics().await);
        PER_BATCH.iter().all(|m| lines.iter().any(|l| l.starts_with(&format!("{m}{{")))).then_some(lines)
    })
    .await
}

/// The metric names of a `/metrics` exposition's samples.
fn exported_names(metrics: &str) -> BTreeSet<String> {
    let samples = metrics.lines().filter(|line| !line.starts_with('#'));
    samples.filter_map(|line| line.split(['{', ' ']).next()).map(ToString::to_string).collect()
}

/// Something for the operator's other families to count: a RestoreBatch (RestoreBatches by phase) and
/// an admission review (webhook requests). The review's Pod is no member of anything: any answer counts.
async fn exercise_restores_and_the_webhook(ns: &TestNamespace, operator: &support::operator::RunningOperator) {
    let member = json!({"target": {"alias": "data", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "data"}}});
    fixtures::create::<RestoreBatch>(
        ns,
        json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "RestoreBatch",
               "metadata": {"name": "bring-back", "namespace": ns.name},
               "spec": {"repository": {"name": "repo"}, "members": [member]}}),
    )
    .await;
    let ca = reqwest::Certificate::from_pem(&operator.ca_pem).expect("CA PEM");
    let client = reqwest::Client::builder().use_rustls_tls().add_root_certificate(ca).build().expect("a client");
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "monitoring", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
                    "namespace": ns.name, "object": {"metadata": {"name": "p"}, "spec": {"containers": []}}}
    });
    let url = format!("https://localhost:{}/mutate-pods", operator.webhook_addr.port());
    let answer = client.post(url).json(&review).send().await.expect("the webhook answers");
    assert!(answer.status().is_success(), "{:?}", answer.status());
}

#[tokio::test]
async fn every_metric_the_rules_and_the_dashboard_query_is_exported() {
    let ns = TestNamespace::new("monnames").await;
    let operator = measured(&ns).await;
    all_series(&ns, &operator).await;
    // A second session, left waiting on its finalize: the oldest-waiting series exists only then.
    // Session names are per second: one made in the first's second would be the first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    succeeded_session(&ns).await;
    exercise_restores_and_the_webhook(&ns, &operator).await;
    let exported = eventually("the RestoreBatch and the waiting session counted", Duration::from_secs(30), || async {
        let exported = exported_names(&operator.metrics().await);
        let counted = ["stash_restorebatches", "stash_backupbatch_unfinalized_since_timestamp_seconds"];
        counted.iter().all(|name| exported.contains(*name)).then_some(exported)
    })
    .await;
    operator.stop().await;

    let mut queried = BTreeSet::new();
    for rule in rules(&rule_groups()) {
        queried.extend(metric_names(rule["expr"].as_str().unwrap_or_default()));
    }
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard(), &mut exprs);
    assert!(exprs.len() > 15, "the dashboard's queries were found: {exprs:?}");
    for expr in &exprs {
        queried.extend(metric_names(expr));
    }
    let unknown: Vec<&String> = queried.iter().filter(|name| !exported.contains(*name)).collect();
    assert!(unknown.is_empty(), "queried but not exported: {unknown:?}\nexported: {exported:?}");
}

#[tokio::test]
async fn a_batchs_series_come_from_its_objects_and_go_with_it() {
    let ns = TestNamespace::new("monseries").await;
    let operator = measured(&ns).await;
    let lines = all_series(&ns, &operator).await;
    let batch = "batch=\"measured\"";
    assert_eq!(value(&lines, "stash_backupbatch_last_session_success", &[batch]), Some(1.0));
    assert_eq!(value(&lines, "stash_backupbatch_expected_interval_seconds", &[batch]), Some(3600.0));
    assert_eq!(value(&lines, "stash_backupbatch_paused", &[batch]), Some(0.0));
    assert_eq!(
        value(&lines, "stash_backupbatch_unfinalized_sessions", &[batch]),
        Some(0.0),
        "its one session is finalized"
    );
    assert_eq!(value(&lines, "stash_backupbatch_last_session_added_bytes", &[batch]), Some(1_572_864.0));
    assert_eq!(value(&lines, "stash_backupbatch_sessions_total", &[batch, "phase=\"Succeeded\""]), Some(1.0));
    assert_eq!(value(&lines, "stash_backupbatch_session_duration_seconds_count", &[batch]), Some(1.0));
    let sidecar = "type=\"StashSidecarInjected\"";
    assert!(value(&lines, "stash_backupbatch_condition", &[batch, "target=\"Deployment/app\"", sidecar]).is_some());
    let stash =
        ["invoker_kind=\"BackupBatch\"", "invoker_name=\"measured\"", "driver=\"Restic\"", "repository=\"repo\""];
    assert_eq!(value(&lines, "stash_backup_session_success", &stash), Some(1.0));
    assert_eq!(value(&lines, "stash_backup_target_count_total", &stash), Some(1.0));
    assert_eq!(value(&lines, "stash_repository_integrity", &stash), Some(1.0));
    assert_eq!(value(&lines, "stash_repository_size_bytes", &stash), Some(2_147_483_648.0));
    assert_eq!(value(&lines, "stash_repository_snapshot_count", &stash), Some(3.0));
    assert_eq!(value(&lines, "stash_repository_snapshot_cleaned", &stash), Some(1.0));
    let ours = value(&lines, "stash_backup_last_success_timestamp_seconds", &[batch]);
    assert!(ours.is_some_and(|t| t > 0.0));
    assert_eq!(value(&lines, "stash_backup_last_success_time_seconds", &stash), ours, "Stash's name, same value");

    // Pausing is read from the batch at once.
    let paused = json!({"spec": {"paused": true}});
    let batches = ns.api::<BackupBatch>();
    batches.patch("measured", &PatchParams::default(), &Patch::Merge(&paused)).await.expect("pause");
    eventually("the batch reported paused", Duration::from_secs(30), || async {
        let lines = measured_lines(&ns, &operator.metrics().await);
        (value(&lines, "stash_backupbatch_paused", &[batch]) == Some(1.0)).then_some(())
    })
    .await;

    batches.delete("measured", &DeleteParams::default()).await.expect("delete");
    eventually("every series of the deleted batch gone", Duration::from_secs(60), || async {
        measured_lines(&ns, &operator.metrics().await).is_empty().then_some(())
    })
    .await;
    operator.stop().await;
}

/// Only the Lease holder exports a batch's series; when it steps down, the next leader exports the same
/// values from the same objects, though it never saw the session run (its counters start anew).
#[tokio::test]
async fn a_new_leader_exports_the_same_series_and_a_standby_none() {
    let ns = TestNamespace::new("monleader").await;
    let leader = measured(&ns).await;
    let before = all_series(&ns, &leader).await;
    let standby =
        support::operator::start_on(None, None, Some(support::operator::controllers_for(&ns.name, "standby"))).await;
    assert!(measured_lines(&ns, &standby.metrics().await).is_empty(), "a standby exports no batch series");

    leader.stop().await;
    // The series apart from what was counted as it happened, in no particular order.
    let state = |lines: Vec<String>| -> BTreeSet<String> {
        let counted = ["stash_backupbatch_sessions_total", "stash_backupbatch_session_duration_seconds"];
        lines.into_iter().filter(|l| !counted.iter().any(|c| l.starts_with(c))).collect()
    };
    let after = eventually("the new leader to export the batch's series", Duration::from_secs(60), || async {
        let lines = state(measured_lines(&ns, &standby.metrics().await));
        (lines.len() == state(before.clone()).len()).then_some(lines)
    })
    .await;
    assert_eq!(after, state(before), "the same series and values from the new leader");
    standby.stop().await;
}
