//! The Pod table: each workload kind, already injected, not targeted, no owner, malformed, DELETE, dry-run.

use super::decision::Catalog;
use super::mutate::{BadReview, Mutator, Verdict};
use crate::api::{BackupBatch, Repository};
use crate::executor_pod::SIDECAR_NAME;
use crate::executor_pod::tests::assert_restricted;
use crate::executor_pod::{BATCH_ANNOTATION, SIDECAR_LABEL};
use base64::Engine;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::Event;
use serde_json::{Value, json};

const IMAGE: &str = "stash:test";

fn batch(name: &str, repository: Value, targets: &[(&str, &str, &str)]) -> BackupBatch {
    let members: Vec<Value> = targets
        .iter()
        .map(|(api_version, kind, target)| {
            json!({"target": {
                "alias": target,
                "ref": {"apiVersion": api_version, "kind": kind, "name": target},
                "paths": ["/data"],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "missing", "mountPath": "/missing"}]
            },
            "runtimeSettings": {"container": {"env": [{"name": "EXTRA", "value": "1"}],
                                              "resources": {"limits": {"memory": "256Mi"}}}},
            "tempDir": {"medium": "Memory", "sizeLimit": "128Mi"}})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch",
        "metadata": {"name": name, "namespace": "demo", "uid": format!("{name}-uid"), "resourceVersion": "1"},
        "spec": {"repository": repository, "members": members}
    }))
    .expect("a BackupBatch")
}

pub(super) fn catalog(with_repository: bool) -> Catalog {
    catalog_with_backend(with_repository.then(|| json!({"rest": {"url": "http://127.0.0.1:8000/"}})))
}

/// A catalog whose Repository (when given) has `backend`.
pub(super) fn catalog_with_backend(backend: Option<Value>) -> Catalog {
    let repository = backend.map(|backend| repository("demo", backend, Value::Null));
    catalog_naming(json!({"name": "repo"}), repository)
}

/// Repository `repo` of `namespace`, with `usagePolicy` unless null.
pub(super) fn repository(namespace: &str, mut backend: Value, usage_policy: Value) -> Repository {
    backend["storageSecretName"] = json!("repo-secret");
    let mut spec = json!({"backend": backend});
    if !usage_policy.is_null() {
        spec["usagePolicy"] = usage_policy;
    }
    serde_json::from_value(json!({
        "apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
        "metadata": {"name": "repo", "namespace": namespace, "uid": format!("{namespace}-repo-uid"),
                     "resourceVersion": "1"},
        "spec": spec
    }))
    .expect("a Repository")
}

/// A catalog whose batch names `reference` and whose only Repository (when given) is `repository`.
fn catalog_naming(reference: Value, repository: Option<Repository>) -> Catalog {
    let mut writers = Writers::default();
    writers.batches.apply_watcher_event(&Event::Apply(test_batch(reference)));
    if let Some(repository) = repository {
        writers.repositories.apply_watcher_event(&Event::Apply(repository));
    }
    catalog_of(&writers)
}

/// The test batch `app-backup`, naming `repository`, with a member for each workload kind (and a Job).
pub(super) fn test_batch(repository: Value) -> BackupBatch {
    batch(
        "app-backup",
        repository,
        &[
            ("apps/v1", "Deployment", "app"),
            ("apps/v1", "StatefulSet", "db"),
            ("apps/v1", "DaemonSet", "agent"),
            ("apps/v1", "ReplicaSet", "bare"),
            ("v1", "ReplicationController", "legacy"),
            ("batch/v1", "Job", "migrate"),
        ],
    )
}

/// The writers of a catalog's batches and Repositories, for tests that change them.
#[derive(Default)]
pub(super) struct Writers {
    pub batches: Writer<BackupBatch>,
    pub repositories: Writer<Repository>,
}

/// A catalog reading the stores of `writers`, with the test ReplicaSets and Namespace.
pub(super) fn catalog_of(writers: &Writers) -> Catalog {
    let mut replicasets = Writer::<PartialObjectMeta<ReplicaSet>>::default();
    for (name, owner) in [("app-7d9c5", Some("app")), ("bare", None), ("other-5f6d7", Some("other"))] {
        let owners: Vec<Value> = owner
            .map(|o| json!({"apiVersion": "apps/v1", "kind": "Deployment", "name": o, "uid": "u", "controller": true}))
            .into_iter()
            .collect();
        let meta = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": name, "namespace": "demo", "ownerReferences": owners}
        }))
        .expect("ReplicaSet metadata");
        replicasets.apply_watcher_event(&Event::Apply(meta));
    }
    // The Pods' namespace, labelled for Repository usage policies.
    let mut namespaces = Writer::<PartialObjectMeta<Namespace>>::default();
    let demo = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": {"team": "a"}}});
    namespaces.apply_watcher_event(&Event::Apply(serde_json::from_value(demo).expect("Namespace metadata")));
    Catalog::new(
        writers.batches.as_reader(),
        writers.repositories.as_reader(),
        replicasets.as_reader(),
        namespaces.as_reader(),
    )
}

fn pod(owner: Option<(&str, &str, &str)>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "app-", "labels": {"app": "app"}},
        "spec": {
            "containers": [{"name": "app", "image": "app:1",
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "data", "emptyDir": {}}]
        }
    });
    if let Some((api_version, kind, name)) = owner {
        pod["metadata"]["ownerReferences"] =
            json!([{"apiVersion": api_version, "kind": kind, "name": name, "uid": "u", "controller": true}]);
    }
    pod
}

pub(super) fn review(operation: &str, object: &Value, dry_run: bool) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "7c8e-uid", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "demo", "operation": operation, "dryRun": dry_run,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object
        }
    }))
    .expect("JSON")
}

fn mutator(with_repository: bool) -> Mutator {
    Mutator::new(catalog(with_repository), IMAGE.into())
}

/// Answers `object`, checks the envelope, and returns the patched Pod when there was a patch.
fn answer(mutator: &Mutator, operation: &str, object: &Value, dry_run: bool) -> Option<Pod> {
    let reviewed = mutator.review(&review(operation, object, dry_run)).expect("a readable review");
    let response =
        serde_json::from_slice::<Value>(&reviewed.review.to_json().expect("serializable")).expect("valid JSON");
    assert_eq!(response["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(response["response"]["uid"], "7c8e-uid");
    assert_eq!(response["response"]["allowed"], true);
    let patch = response["response"]["patch"].as_str()?;
    assert_eq!(reviewed.verdict, Verdict::Mutated);
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD.decode(patch).expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON patch");
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &patch).expect("the patch applies");
    Some(serde_json::from_value(patched).expect("the result is a valid Pod"))
}

fn assert_injected(pod: &Pod, kind: &str, name: &str) {
    let spec = pod.spec.as_ref().expect("spec");
    let sidecars: Vec<_> = spec.containers.iter().filter(|c| c.name == SIDECAR_NAME).collect();
    assert_eq!(sidecars.len(), 1, "exactly one stash container");
    let sidecar = sidecars[0];
    assert_eq!(sidecar.image.as_deref(), Some(IMAGE));
    let args = sidecar.args.clone().unwrap_or_default();
    assert!(args.contains(&"--invoker-name=app-backup".to_string()), "{args:?}");
    assert!(args.contains(&format!("--target-kind={kind}")), "{args:?}");
    assert!(args.contains(&format!("--target-name={name}")), "{args:?}");
    let volumes: Vec<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    for mount in sidecar.volume_mounts.iter().flatten() {
        assert!(volumes.contains(&mount.name.as_str()), "mount {} has a volume", mount.name);
        if mount.mount_path != "/tmp" {
            assert_eq!(mount.read_only, Some(true), "{} is read-only", mount.mount_path);
        }
    }
    let paths: Vec<&str> = sidecar.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert_eq!(paths, ["/data", "/tmp", "/etc/stash/repository/secret"], "the missing volume is left out");
    let env: Vec<&str> = sidecar.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert_eq!(env, ["POD_NAME", "POD_NAMESPACE", "NODE_NAME", "EXTRA"]);
    assert!(sidecar.resources.is_some());
    let annotations = pod.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(annotations.get(BATCH_ANNOTATION).map(String::as_str), Some("app-backup"));
    let labels = pod.metadata.labels.as_ref().expect("labels");
    assert_eq!(labels.get(SIDECAR_LABEL.0).map(String::as_str), Some(SIDECAR_LABEL.1));
}

/// The sidecar label is added whatever shape the Pod's labels have: none, null, empty or some.
#[test]
fn the_sidecar_label_is_added_to_any_shape_of_labels() {
    let mutator = mutator(true);
    let owner = Some(("apps/v1", "StatefulSet", "db"));
    for labels in [None, Some(Value::Null), Some(json!({})), Some(json!({"app": "db"}))] {
        let mut pod = pod(owner);
        match &labels {
            None => drop(pod["metadata"].as_object_mut().and_then(|m| m.remove("labels"))),
            Some(labels) => pod["metadata"]["labels"] = labels.clone(),
        }
        let patched = answer(&mutator, "CREATE", &pod, false).unwrap_or_else(|| panic!("{labels:?}: injected"));
        let found = patched.metadata.labels.unwrap_or_default();
        assert_eq!(found.get(SIDECAR_LABEL.0).map(String::as_str), Some(SIDECAR_LABEL.1), "{labels:?}");
        let kept = labels.as_ref().and_then(|l| l.get("app")).and_then(Value::as_str);
        assert_eq!(found.get("app").map(String::as_str), kept, "{labels:?}: the Pod's own labels stay");
    }
}

#[test]
fn pods_of_each_targeted_workload_kind_get_the_sidecar() {
    let mutator = mutator(true);
    let cases = [
        (("apps/v1", "ReplicaSet", "app-7d9c5"), "Deployment", "app"),
        (("apps/v1", "StatefulSet", "db"), "StatefulSet", "db"),
        (("apps/v1", "DaemonSet", "agent"), "DaemonSet", "agent"),
        (("apps/v1", "ReplicaSet", "bare"), "ReplicaSet", "bare"),
        (("v1", "ReplicationController", "legacy"), "ReplicationController", "legacy"),
    ];
    for (owner, kind, name) in cases {
        let patched =
            answer(&mutator, "CREATE", &pod(Some(owner)), false).unwrap_or_else(|| panic!("{kind}/{name} is injected"));
        assert_injected(&patched, kind, name);
    }
}

#[test]
fn a_replicaset_missing_from_the_cache_is_resolved_by_its_pod_template_hash() {
    let mut object = pod(Some(("apps/v1", "ReplicaSet", "app-66b8f4c9d")));
    object["metadata"]["labels"]["pod-template-hash"] = "66b8f4c9d".into();
    let patched = answer(&mutator(true), "CREATE", &object, false).expect("injected");
    assert_injected(&patched, "Deployment", "app");
}

#[test]
fn pods_that_are_not_targets_are_left_alone() {
    let mutator = mutator(true);
    let untouched = [
        ("no owner", pod(None)),
        ("another Deployment", pod(Some(("apps/v1", "ReplicaSet", "other-5f6d7")))),
        ("a Job, even when a member names it", pod(Some(("batch/v1", "Job", "migrate")))),
        ("a StatefulSet no member names", pod(Some(("apps/v1", "StatefulSet", "cache")))),
    ];
    for (what, object) in untouched {
        assert!(answer(&mutator, "CREATE", &object, false).is_none(), "{what} is not patched");
    }
}

#[test]
fn an_already_injected_pod_gets_no_second_sidecar() {
    let mutator = mutator(true);
    let object = pod(Some(("apps/v1", "StatefulSet", "db")));
    let patched = answer(&mutator, "CREATE", &object, false).expect("first pass injects");
    let again = serde_json::to_value(&patched).expect("JSON");
    assert!(answer(&mutator, "CREATE", &again, false).is_none(), "reinvocation changes nothing");
}

#[test]
fn pods_without_volumes_or_annotations_get_the_lists_created() {
    let mut object = pod(Some(("apps/v1", "StatefulSet", "db")));
    object["spec"].as_object_mut().expect("spec").remove("volumes");
    object["metadata"]["annotations"] = json!({"keep": "me"});
    let patched = answer(&mutator(true), "CREATE", &object, false).expect("injected");
    let volumes: Vec<String> =
        patched.spec.expect("spec").volumes.expect("volumes").into_iter().map(|v| v.name).collect();
    assert_eq!(volumes, ["stash-tmp-dir", "stash-repository-secret"]);
    assert_eq!(patched.metadata.annotations.expect("annotations").get("keep").map(String::as_str), Some("me"));
}

#[test]
fn a_local_repository_is_mounted_writable_at_its_mount_path() {
    let backend = json!({"local": {"mountPath": "/safe/repo", "persistentVolumeClaim": {"claimName": "repo-pvc"}}});
    let mutator = Mutator::new(catalog_with_backend(Some(backend)), IMAGE.into());
    let patched = answer(&mutator, "CREATE", &pod(Some(("apps/v1", "StatefulSet", "db"))), false).expect("injected");
    let spec = patched.spec.expect("spec");
    let volume = spec.volumes.iter().flatten().find(|v| v.name == "stash-repository").expect("the repository volume");
    assert_eq!(volume.persistent_volume_claim.as_ref().map(|c| c.claim_name.as_str()), Some("repo-pvc"));
    let sidecar = spec.containers.iter().find(|c| c.name == SIDECAR_NAME).expect("sidecar");
    let mount = sidecar.volume_mounts.iter().flatten().find(|m| m.name == "stash-repository").expect("mounted");
    assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/safe/repo", None));
}

#[test]
fn dry_run_answers_exactly_like_a_real_request() {
    let mutator = mutator(true);
    let object = pod(Some(("apps/v1", "DaemonSet", "agent")));
    let real = answer(&mutator, "CREATE", &object, false);
    let dry = answer(&mutator, "CREATE", &object, true);
    assert!(real.is_some());
    assert_eq!(real, dry);
}

#[test]
fn other_operations_are_allowed_unchanged() {
    let mutator = mutator(true);
    let object = pod(Some(("apps/v1", "StatefulSet", "db")));
    for operation in ["UPDATE", "DELETE", "CONNECT"] {
        assert!(answer(&mutator, operation, &object, false).is_none(), "{operation}");
    }
}

#[test]
fn an_unknown_repository_means_no_injection() {
    let object = pod(Some(("apps/v1", "StatefulSet", "db")));
    assert!(answer(&mutator(false), "CREATE", &object, false).is_none());
}

/// Tenant B's NFS repository must not reach tenant A's Pods unless B's usagePolicy allows A.
#[test]
fn a_pod_whose_batch_names_a_disallowed_foreign_repository_gets_no_patch() {
    let nfs =
        json!({"local": {"mountPath": "/repo", "nfs": {"server": "nfs.tenant-b.internal", "path": "/exports/b"}}});
    let object = pod(Some(("apps/v1", "StatefulSet", "db")));
    let foreign = json!({"name": "repo", "namespace": "tenant-b"});
    let selector = |team: &str| {
        json!({"allowedNamespaces": {"from": "Selector",
               "selector": {"matchExpressions": [{"key": "team", "operator": "In", "values": [team]}]}}})
    };
    for policy in [Value::Null, json!({"allowedNamespaces": {"from": "Same"}}), selector("b-only")] {
        let catalog = catalog_naming(foreign.clone(), Some(repository("tenant-b", nfs.clone(), policy.clone())));
        let mutator = Mutator::new(catalog, IMAGE.into());
        assert!(answer(&mutator, "CREATE", &object, false).is_none(), "{policy}");
    }
    for policy in [json!({"allowedNamespaces": {"from": "All"}}), selector("a")] {
        let catalog = catalog_naming(foreign.clone(), Some(repository("tenant-b", nfs.clone(), policy.clone())));
        let mutator = Mutator::new(catalog, IMAGE.into());
        assert!(answer(&mutator, "CREATE", &object, false).is_some(), "{policy} allows demo");
    }
}

#[test]
fn an_unreadable_pod_is_allowed_with_a_warning_and_the_uid() {
    let mut object = pod(Some(("apps/v1", "StatefulSet", "db")));
    object["spec"]["containers"] = "not a list".into();
    let reviewed = mutator(true).review(&review("CREATE", &object, false)).expect("envelope is fine");
    let response =
        serde_json::from_slice::<Value>(&reviewed.review.to_json().expect("serializable")).expect("valid JSON");
    assert_eq!(response["response"]["uid"], "7c8e-uid");
    assert_eq!(response["response"]["allowed"], true);
    assert!(response["response"]["warnings"][0].as_str().expect("a warning").contains("could not be read"));
}

#[test]
fn malformed_bodies_are_bad_requests() {
    let mutator = mutator(true);
    for body in [&b"not json"[..], b"{}", b"{\"request\": {}}", b"[1,2]", b""] {
        assert!(mutator.review(body).is_err(), "{:?}", String::from_utf8_lossy(body));
    }
    let old = br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"1"}}"#;
    assert!(matches!(mutator.review(old), Err(BadReview::Version(_))));
}

/// The warnings of the answer to `object`.
fn warnings(mutator: &Mutator, object: &Value) -> Vec<String> {
    let reviewed = mutator.review(&review("CREATE", object, false)).expect("a readable review");
    reviewed.review.warnings
}

#[test]
fn a_pod_that_already_has_our_volume_names_gets_free_ones() {
    let backend = json!({"local": {"mountPath": "/repo", "persistentVolumeClaim": {"claimName": "repo-pvc"}}});
    let mutator = Mutator::new(catalog_with_backend(Some(backend)), IMAGE.into());
    let mut object = pod(Some(("apps/v1", "StatefulSet", "db")));
    let theirs = json!([{"name": "data", "emptyDir": {}}, {"name": "stash-tmp-dir", "emptyDir": {}},
                        {"name": "stash-repository-secret", "emptyDir": {}}, {"name": "stash-repository", "emptyDir": {}}]);
    object["spec"]["volumes"] = theirs.clone();
    let patched = answer(&mutator, "CREATE", &object, false).expect("injected");
    let spec = patched.spec.expect("spec");
    let volumes = spec.volumes.expect("volumes");
    let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "volume names are unique: {names:?}");
    assert_eq!(serde_json::to_value(&volumes[..4]).expect("JSON"), theirs, "the Pod's own volumes are untouched");
    let sidecar = spec.containers.iter().find(|c| c.name == SIDECAR_NAME).expect("sidecar");
    let volume_at = |path: &str| {
        let mount = sidecar.volume_mounts.iter().flatten().find(|m| m.mount_path == path).expect("mounted");
        volumes.iter().find(|v| v.name == mount.name).expect("the mount's volume")
    };
    assert!(volume_at("/tmp").empty_dir.as_ref().is_some_and(|e| e.medium.as_deref() == Some("Memory")), "our tmp");
    assert!(volume_at("/etc/stash/repository/secret").secret.is_some(), "our Secret");
    assert!(volume_at("/repo").persistent_volume_claim.is_some(), "our repository");
}

#[test]
fn a_member_mount_at_the_repository_mount_path_is_not_injected_but_warned_about() {
    let backend = json!({"local": {"mountPath": "/data", "persistentVolumeClaim": {"claimName": "repo-pvc"}}});
    let mutator = Mutator::new(catalog_with_backend(Some(backend)), IMAGE.into());
    let object = pod(Some(("apps/v1", "StatefulSet", "db")));
    assert!(answer(&mutator, "CREATE", &object, false).is_none(), "no patch that mounts /data twice");
    let warnings = warnings(&mutator, &object);
    assert!(warnings.iter().any(|w| w.contains("/data") && w.contains("not injected")), "{warnings:?}");
}

#[test]
fn the_sidecar_is_restricted_pod_security_compliant_by_default() {
    let patched =
        answer(&mutator(true), "CREATE", &pod(Some(("apps/v1", "StatefulSet", "db"))), false).expect("injected");
    let spec = patched.spec.expect("spec");
    let sidecar = spec.containers.iter().find(|c| c.name == SIDECAR_NAME).expect("sidecar");
    assert_restricted(sidecar.security_context.as_ref());
}
