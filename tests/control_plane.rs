//! The real control plane from tests/cluster: the CRDs install, valid Stash manifests are accepted,
//! invalid ones are refused naming the field, and the built-in controllers we rely on work.

mod support;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use stash::api::{BackupBatch, BackupSession, Repository, RestoreBatch};
use std::time::Duration;
use support::{TestNamespace, eventually, load_yaml, without_empty};

/// The dynamic API for a manifest's apiVersion/kind in `namespace`.
fn dynamic_api(ns: &TestNamespace, manifest: &Value) -> Api<DynamicObject> {
    let api_version = manifest["apiVersion"].as_str().expect("apiVersion");
    let kind = manifest["kind"].as_str().expect("kind");
    let (group, version) = api_version.split_once('/').expect("a grouped apiVersion");
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    Api::namespaced_with(ns.client.clone(), &ns.name, &resource)
}

async fn create(ns: &TestNamespace, mut manifest: Value) -> Result<DynamicObject, kube::Error> {
    manifest["metadata"]["namespace"] = ns.name.clone().into();
    let object: DynamicObject = serde_json::from_value(manifest.clone()).expect("a Kubernetes object");
    dynamic_api(ns, &manifest).create(&PostParams::default(), &object).await
}

fn data_files(dir: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(support::repo_root().join("tests/data").join(dir))
        .expect("test data directory")
        .map(|entry| entry.expect("a directory entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn crds_install_and_become_established() {
    support::cluster();
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(support::client().await);
    for crd in stash::api::crds() {
        let name = crd.metadata.name.expect("named");
        let live = crds.get(&name).await.expect("CRD is installed");
        let conditions = live.status.and_then(|s| s.conditions).unwrap_or_default();
        assert!(
            conditions.iter().any(|c| c.type_ == "Established" && c.status == "True"),
            "{name} is not Established: {conditions:?}"
        );
    }
}

#[tokio::test]
async fn valid_stash_manifests_are_accepted_and_read_back_unchanged() {
    let ns = TestNamespace::new("valid").await;
    for file in data_files("valid") {
        let manifest = load_yaml(&format!("valid/{file}"));
        let created = create(&ns, manifest.clone()).await.unwrap_or_else(|e| panic!("{file} is refused: {e}"));
        let name = created.metadata.name.clone().expect("named");
        let kind = manifest["kind"].as_str().expect("kind");
        // Read back through our typed API, then compare the spec with what was written.
        let spec = match kind {
            "BackupBatch" => serde_json::to_value(ns.api::<BackupBatch>().get(&name).await.expect("get").spec),
            "BackupSession" => serde_json::to_value(ns.api::<BackupSession>().get(&name).await.expect("get").spec),
            "Repository" => serde_json::to_value(ns.api::<Repository>().get(&name).await.expect("get").spec),
            "RestoreBatch" => serde_json::to_value(ns.api::<RestoreBatch>().get(&name).await.expect("get").spec),
            other => panic!("unexpected kind {other} in {file}"),
        }
        .expect("spec serializes");
        assert_eq!(without_empty(spec), without_empty(manifest["spec"].clone()), "{file} changed on the way");
    }
}

#[tokio::test]
async fn invalid_objects_are_refused_naming_the_field() {
    let ns = TestNamespace::new("invalid").await;
    let files = data_files("invalid");
    assert!(files.len() >= 15, "the invalid cases are all there");
    for file in files {
        let path = support::repo_root().join("tests/data/invalid").join(&file);
        let text = std::fs::read_to_string(&path).expect("readable");
        let field = text
            .lines()
            .find_map(|line| line.strip_prefix("# expect-field: "))
            .unwrap_or_else(|| panic!("{file} names its field"));
        let manifest = load_yaml(&format!("invalid/{file}"));
        match create(&ns, manifest).await {
            Ok(_) => panic!("{file}: the API server accepted an invalid object"),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{file}: {status:?}");
                assert!(status.message.contains(field), "{file}: `{}` does not name {field}", status.message);
            }
            Err(other) => panic!("{file}: unexpected error {other}"),
        }
    }
}

/// M6: the shipped policy refuses, at apply time, a member passing restic a flag outside the
/// allow-list, naming the field and the flag but not its value; allowed flags pass.
#[tokio::test]
async fn the_admission_policy_refuses_restic_flags_outside_the_allow_list() {
    let ns = TestNamespace::new("args-policy").await;
    let binding = support::fixtures::bind_shipped_policy(&ns, "stash-restic-args").await;
    let batch = |args: Value| -> BackupBatch {
        serde_json::from_value(json!({"apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch",
            "metadata": {"name": "probe", "namespace": ns.name},
            "spec": {"repository": {"name": "repo"}, "members": [
                {"target": {"alias": "a", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "a"}}},
                {"target": {"alias": "b", "ref": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "name": "b"},
                    "args": args}}]}}))
        .expect("a BackupBatch")
    };
    let dry_run = PostParams { dry_run: true, ..Default::default() };
    let batches = ns.api::<BackupBatch>();
    let refused = batch(json!(["--exclude", "*.tmp", "--password-command=cat /var/run/secrets/token", "-rrest:x"]));
    let refusal = eventually("the policy to refuse --password-command", Duration::from_secs(30), || {
        let (batches, dry_run, refused) = (batches.clone(), dry_run.clone(), refused.clone());
        async move { batches.create(&dry_run, &refused).await.err() }
    })
    .await;
    let message = refusal.to_string();
    assert!(message.contains("spec.members[].target.args: --password-command, -r may not be passed"), "{message}");
    assert!(!message.contains("/var/run/secrets"), "a flag's value is never echoed: {message}");
    let allowed = batch(json!(["--exclude", "*.tmp", "--exclude-larger-than=1G", "--one-file-system"]));
    batches.create(&dry_run, &allowed).await.expect("allowed flags pass");
    binding.remove().await;
}

#[tokio::test]
async fn backup_session_invoker_is_immutable() {
    let ns = TestNamespace::new("immutable").await;
    create(&ns, load_yaml("valid/backupsession.yaml")).await.expect("session is created");
    let sessions = ns.api::<BackupSession>();
    let patch = json!({"spec": {"invoker": {"name": "another-batch"}}});
    let err = sessions
        .patch("wordpress-backup-1764043200", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect_err("the invoker cannot change");
    let kube::Error::Api(status) = err else { panic!("unexpected error {err}") };
    assert!(status.message.contains("spec.invoker is immutable"), "{}", status.message);
}

#[tokio::test]
async fn deployment_gets_a_replicaset_and_pending_pods_and_is_garbage_collected() {
    let ns = TestNamespace::new("workloads").await;
    let deployments = ns.api::<Deployment>();
    deployments.create(&PostParams::default(), &support::webhook::deployment("web", 2)).await.expect("created");
    let pods = ns.api::<Pod>();
    let listed = eventually("two Pods of web", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&ListParams::default().labels("app=web")).await.ok()?;
            (list.items.len() == 2).then_some(list.items)
        }
    })
    .await;
    for pod in &listed {
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        assert_eq!(phase.as_deref(), Some("Pending"), "no kubelet, so Pods stay Pending");
        let owner = &pod.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!(owner.kind, "ReplicaSet");
    }

    deployments.delete("web", &DeleteParams::background()).await.expect("deleted");
    let replicasets = ns.api::<ReplicaSet>();
    eventually("ReplicaSets and Pods of web collected", Duration::from_secs(60), || {
        let (replicasets, pods) = (replicasets.clone(), pods.clone());
        async move {
            let sets = replicasets.list(&ListParams::default()).await.ok()?;
            let left = pods.list(&ListParams::default().labels("app=web")).await.ok()?;
            (sets.items.is_empty() && left.items.is_empty()).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn deleting_a_backup_batch_collects_what_it_owns() {
    let ns = TestNamespace::new("gc").await;
    let batch = create(&ns, load_yaml("valid/backupbatch.yaml")).await.expect("batch is created");
    let owned: ConfigMap = serde_json::from_value(json!({
        "metadata": {
            "name": "owned-by-batch",
            "ownerReferences": [{
                "apiVersion": "stash.appscode.com/v1beta1",
                "kind": "BackupBatch",
                "name": batch.metadata.name,
                "uid": batch.metadata.uid,
                "controller": true
            }]
        }
    }))
    .expect("a ConfigMap");
    let configmaps = ns.api::<ConfigMap>();
    configmaps.create(&PostParams::default(), &owned).await.expect("created");
    ns.api::<BackupBatch>().delete("wordpress-backup", &DeleteParams::background()).await.expect("deleted");
    eventually("the owned ConfigMap collected", Duration::from_secs(60), || {
        let configmaps = configmaps.clone();
        async move { configmaps.get_opt("owned-by-batch").await.ok()?.is_none().then_some(()) }
    })
    .await;
}

/// CronJobs fire on minute boundaries, so this is the one test that waits for one (up to ~70 s).
#[tokio::test]
async fn cronjob_creates_a_job_at_the_next_minute() {
    let ns = TestNamespace::new("cron").await;
    let cronjob: CronJob = serde_json::from_value(json!({
        "metadata": {"name": "every-minute"},
        "spec": {
            "schedule": "* * * * *",
            "jobTemplate": {"spec": {"template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "tick", "image": "registry.invalid/tick:1", "args": ["tick"]}]
            }}}}
        }
    }))
    .expect("a CronJob");
    ns.api::<CronJob>().create(&PostParams::default(), &cronjob).await.expect("created");
    let jobs = ns.api::<Job>();
    let job = eventually("a Job from the CronJob", Duration::from_secs(75), || {
        let jobs = jobs.clone();
        async move { jobs.list(&ListParams::default()).await.ok()?.items.into_iter().next() }
    })
    .await;
    let owner = &job.metadata.owner_references.as_ref().expect("owned")[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("CronJob", "every-minute"));
}
