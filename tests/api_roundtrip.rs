//! Stash-style manifests parse into our types and serialize back with the same field names and values.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use stash::api::backup_batch::{BackupMember, Driver};
use stash::api::backup_session::{BackupSessionPhase, HostPhase};
use stash::api::common::{ExecutionOrder, HookExecutionPolicy};
use stash::api::{BackupBatch, BackupSession, Repository, RestoreBatch};

mod support;

use support::{load_yaml, without_empty};

fn load(name: &str) -> Value {
    load_yaml(&format!("valid/{name}"))
}

/// Parses `manifest` as `T`, serializes it back, and checks that nothing was renamed, lost or added.
fn round_trip<T: DeserializeOwned + Serialize>(manifest: Value) -> T {
    let typed: T = serde_json::from_value(manifest.clone()).expect("manifest parses");
    let back = serde_json::to_value(&typed).expect("object serializes");
    assert_eq!(without_empty(back), without_empty(manifest));
    typed
}

#[test]
fn backup_batch_with_workload_pvc_and_database_members_round_trips() {
    let batch: BackupBatch = round_trip(load("backupbatch.yaml"));
    let kinds: Vec<&str> = batch.spec.members.iter().map(|m| m.target.reference.kind.as_str()).collect();
    assert_eq!(kinds, ["Deployment", "PersistentVolumeClaim", "AppBinding"]);
    assert_eq!(batch.spec.execution_order, ExecutionOrder::Sequential);
    assert_eq!(batch.spec.backup_history_limit, 3);
    let time_out = batch.spec.time_out.as_ref().map(|t| t.parse());
    assert_eq!(time_out, Some(Ok(std::time::Duration::from_secs(1800))));
    let hooks = batch.spec.hooks.as_ref().expect("global hooks");
    assert_eq!(hooks.post_backup.as_ref().map(|h| h.execution_policy), Some(HookExecutionPolicy::OnSuccess));
    let mount = &batch.spec.members[0].target.volume_mounts[0];
    assert_eq!(mount.mount_path, "/var/www/html");
}

#[test]
fn backup_batch_defaults_match_stash() {
    let manifest = serde_json::json!({
        "apiVersion": "stash.appscode.com/v1beta1",
        "kind": "BackupBatch",
        "metadata": {"name": "minimal"},
        "spec": {
            "repository": {"name": "repo"},
            "members": [{"target": {"ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app"}}}]
        }
    });
    let batch: BackupBatch = serde_json::from_value(manifest).expect("minimal batch parses");
    assert_eq!(batch.spec.backup_history_limit, 1);
    assert_eq!(batch.spec.execution_order, ExecutionOrder::Parallel);
    assert_eq!(batch.spec.driver, Driver::Restic);
    assert!(!batch.spec.paused);
}

#[test]
fn unknown_fields_from_newer_stash_releases_are_ignored() {
    let mut manifest = load("backupbatch.yaml");
    manifest["spec"]["someFutureField"] = serde_json::json!({"enabled": true});
    manifest["spec"]["members"][0]["target"]["volumeSnapshotClassName"] = "csi-snapclass".into();
    manifest["spec"]["members"][0]["futureMemberSetting"] = 3.into();
    manifest["status"] = serde_json::json!({"phase": "Ready", "sessionsPending": 2});
    let batch: BackupBatch = serde_json::from_value(manifest).expect("newer fields do not break parsing");
    assert_eq!(batch.spec.members.len(), 3);
}

#[test]
fn backup_session_status_with_per_host_stats_round_trips() {
    let session: BackupSession = round_trip(load("backupsession.yaml"));
    let status = session.status.expect("status");
    assert_eq!(status.phase, Some(BackupSessionPhase::Succeeded));
    let target = &status.targets[0];
    assert_eq!(target.total_hosts, Some(2));
    assert_eq!(target.stats.len(), 2);
    assert_eq!(target.stats[1].phase, Some(HostPhase::Failed));
    let files = target.stats[0].snapshots[0].file_stats.as_ref().expect("file stats");
    assert_eq!(files.total_files, Some(2004));
}

#[test]
fn repository_of_every_backend_kind_round_trips() {
    for kind in ["local", "s3", "gcs", "azure", "swift", "b2", "rest"] {
        let repo: Repository = round_trip(load(&format!("repository-{kind}.yaml")));
        let backend = &repo.spec.backend;
        let set = [
            backend.local.is_some(),
            backend.s3.is_some(),
            backend.gcs.is_some(),
            backend.azure.is_some(),
            backend.swift.is_some(),
            backend.b2.is_some(),
            backend.rest.is_some(),
        ];
        assert_eq!(set.iter().filter(|s| **s).count(), 1, "{kind} sets exactly one backend");
        assert_eq!(backend.storage_secret_name, format!("{kind}-secret"));
    }
}

#[test]
fn local_repository_of_any_volume_kind_round_trips_into_its_pod_volume() {
    let repo: Repository = round_trip(load("repository-local-gce.yaml"));
    let local = repo.spec.backend.local.expect("a local backend");
    let (volume, mount) = local.volume("repository");
    assert_eq!(volume.name, "repository");
    assert_eq!(volume.gce_persistent_disk.map(|disk| disk.pd_name), Some("stash-repo".to_string()));
    assert_eq!((mount.mount_path.as_str(), mount.sub_path.as_deref()), ("/safe/data", Some("stash")));
}

#[test]
fn restore_batch_round_trips() {
    let restore: RestoreBatch = round_trip(load("restorebatch.yaml"));
    assert_eq!(restore.spec.members.len(), 2);
    assert!(restore.spec.restore_from.and_then(|f| f.before).is_some());
    let post_restore = restore.spec.hooks.and_then(|h| h.post_restore).map(|h| h.execution_policy);
    assert_eq!(post_restore, Some(HookExecutionPolicy::OnSuccess));
}

#[test]
fn member_without_target_ref_does_not_parse() {
    let member = serde_json::json!({"target": {"paths": ["/data"]}});
    let err = serde_json::from_value::<BackupMember>(member).expect_err("ref is required");
    assert!(err.to_string().contains("ref"), "{err}");
}
