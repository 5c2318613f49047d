//! Property tests: no input makes the admission handler panic, every readable review is answered
//! with its own uid, and every targeted Pod gets a valid, idempotent patch or a reason why not.

use super::mutate::Mutator;
use super::mutate_tests::{Writers, catalog, catalog_of, catalog_with_backend, repository, review, test_batch};
use crate::api::common::EmptyDirSettings;
use crate::executor_pod::SIDECAR_NAME;
use crate::executor_pod::{BATCH_ANNOTATION, SIDECAR_LABEL};
use k8s_openapi::api::core::v1::{Pod, SecurityContext};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::runtime::watcher::Event;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};

fn mutator() -> Mutator {
    Mutator::new(catalog(true), "stash:test".into())
}

/// Arbitrary JSON, biased towards the keys a Pod and a review use.
fn arbitrary_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("metadata".to_string()),
        Just("spec".to_string()),
        Just("containers".to_string()),
        Just("volumes".to_string()),
        Just("ownerReferences".to_string()),
        Just("name".to_string()),
        Just("kind".to_string()),
        Just("controller".to_string()),
        Just("labels".to_string()),
        Just("annotations".to_string()),
        Just("apiVersion".to_string()),
        "[a-z]{1,6}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        prop_oneof![
            Just("ReplicaSet".to_string()),
            Just("app-7d9c5".to_string()),
            Just("stash".to_string()),
            ".{0,12}"
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = mutator().review(&body);
    }

    #[test]
    fn arbitrary_objects_are_answered_with_their_uid(object in arbitrary_json(), op in "CREATE|UPDATE|[A-Z]{0,6}") {
        let body = serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "fuzz-uid", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": op, "namespace": "demo", "object": object}
        })).expect("JSON");
        let reviewed = mutator().review(&body).expect("a well-formed envelope is always answered");
        let response = serde_json::from_slice::<Value>(&reviewed.review.to_json().expect("serializable")).expect("valid JSON");
        prop_assert_eq!(&response["response"]["uid"], "fuzz-uid");
        prop_assert_eq!(&response["response"]["allowed"], true);
    }
}

/// `volumes` or `annotations` of a generated Pod: missing, `null`, or present.
#[derive(Debug, Clone)]
enum Field<T> {
    Absent,
    Null,
    Present(T),
}

impl<T: serde::Serialize> Field<T> {
    fn set(&self, object: &mut Value, key: &str) {
        match self {
            Field::Absent => {}
            Field::Null => object[key] = Value::Null,
            Field::Present(value) => object[key] = json!(value),
        }
    }
}

fn field<T: std::fmt::Debug + Clone>(present: impl Strategy<Value = T>) -> impl Strategy<Value = Field<T>> {
    prop_oneof![1 => Just(Field::Absent), 1 => Just(Field::Null), 6 => present.prop_map(Field::Present)]
}

/// The owners a batch member of the test catalog targets (the last one is a ReplicaSet the cache
/// has not seen yet, resolved by its `pod-template-hash`).
const OWNERS: [(&str, &str, &str); 6] = [
    ("apps/v1", "ReplicaSet", "app-7d9c5"),
    ("apps/v1", "ReplicaSet", "app-66b8f4c9d"),
    ("apps/v1", "StatefulSet", "db"),
    ("apps/v1", "DaemonSet", "agent"),
    ("apps/v1", "ReplicaSet", "bare"),
    ("v1", "ReplicationController", "legacy"),
];

/// Volume names, including every one the patch adds and the member's `data` and `missing`.
fn volume_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("data".to_string()),
        Just("missing".to_string()),
        Just("stash-tmp-dir".to_string()),
        Just("stash-tmp-dir-1".to_string()),
        Just("stash-repository-secret".to_string()),
        Just("stash-repository".to_string()),
        "[a-z]{1,8}",
    ]
}

/// Mount paths, including the sidecar's own and the generated repositories'.
fn mount_path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/data".to_string()),
        Just("/tmp".to_string()),
        Just("/repo".to_string()),
        Just("/missing".to_string()),
        Just("/etc/stash/repository/secret".to_string()),
        "/var/[a-z]{1,4}",
    ]
}

/// A container of the Pod, mounting some of `volumes` at distinct paths (the Pod itself is valid).
fn container(name: String, volumes: Vec<String>) -> impl Strategy<Value = Value> {
    let mounts = if volumes.is_empty() {
        Just(Vec::new()).boxed()
    } else {
        prop::collection::btree_map(mount_path(), prop::sample::select(volumes), 0..4)
            .prop_map(|m| m.into_iter().map(|(path, name)| json!({"name": name, "mountPath": path})).collect())
            .boxed()
    };
    mounts.prop_map(move |mounts: Vec<Value>| json!({"name": name, "image": "app:1", "volumeMounts": mounts}))
}

/// A valid Pod of a targeted workload.
fn targeted_pod() -> impl Strategy<Value = Value> {
    let volumes = field(
        prop::collection::btree_set(volume_name(), 0..6)
            .prop_map(|names| names.into_iter().map(|name| json!({"name": name, "emptyDir": {}})).collect::<Vec<_>>()),
    );
    let annotation_key = prop_oneof![Just("a/b"), Just("c~d"), Just("stash.appscode.com/backup-batch"), Just("x")];
    let annotations = field(prop::collection::btree_map(annotation_key, "[a-z~/]{0,4}", 0..3));
    let run_as_user = prop::option::of(prop_oneof![Just(0i64), Just(1000)]);
    // Our label may be there already (a template copied from an injected Pod), with any value.
    let sidecar_label = prop::option::of("[a-z]{0,4}");
    (volumes, annotations, prop::sample::select(OWNERS.to_vec()), run_as_user, sidecar_label).prop_flat_map(
        |(volumes, annotations, (api_version, kind, name), run_as_user, sidecar_label)| {
            let names: Vec<String> = match &volumes {
                Field::Present(volumes) => {
                    volumes.iter().filter_map(|v| v["name"].as_str().map(String::from)).collect()
                }
                _ => Vec::new(),
            };
            let per_container = names.clone();
            let containers = (1..=3usize).prop_flat_map(move |n| {
                (1..=n).map(|i| container(format!("app{i}"), per_container.clone())).collect::<Vec<_>>()
            });
            let init = prop::option::weighted(0.3, container("init".into(), names));
            (containers, init).prop_map(move |(containers, init)| {
                let mut metadata = json!({"generateName": "app-", "labels": {"pod-template-hash": "66b8f4c9d"},
                                          "ownerReferences": [{"apiVersion": api_version, "kind": kind, "name": name,
                                                               "uid": "u", "controller": true}]});
                annotations.set(&mut metadata, "annotations");
                if let Some(value) = &sidecar_label {
                    metadata["labels"][SIDECAR_LABEL.0] = json!(value);
                }
                let mut spec = json!({"containers": containers});
                if let Some(init) = &init {
                    spec["initContainers"] = json!([init]);
                }
                if let Some(uid) = run_as_user {
                    spec["securityContext"] = json!({"runAsUser": uid});
                }
                volumes.set(&mut spec, "volumes");
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
            })
        },
    )
}

/// The Repository backend: remote, or `local` at a free path or at one the sidecar already uses.
fn backend() -> impl Strategy<Value = Value> {
    let local = |path: &str| json!({"local": {"mountPath": path, "persistentVolumeClaim": {"claimName": "repo-pvc"}}});
    prop_oneof![
        5 => Just(json!({"rest": {"url": "http://127.0.0.1:8000/"}})),
        3 => Just(local("/repo")),
        1 => Just(local("/data")),
        1 => Just(local("/tmp")),
    ]
}

/// The sidecar's mount paths for `pod`: the member's mounts whose volume exists, then its own.
fn sidecar_paths(pod: &Value, backend: &Value) -> Vec<String> {
    let has = |name: &str| pod["spec"]["volumes"].as_array().is_some_and(|v| v.iter().any(|v| v["name"] == name));
    let mut paths: Vec<String> = [("data", "/data"), ("missing", "/missing")]
        .iter()
        .filter(|(v, _)| has(v))
        .map(|(_, p)| p.to_string())
        .collect();
    paths.extend(["/tmp".to_string(), "/etc/stash/repository/secret".to_string()]);
    paths.extend(backend["local"]["mountPath"].as_str().map(String::from));
    paths
}

fn all_containers(pod: &Value) -> Vec<&Value> {
    ["containers", "initContainers"].iter().flat_map(|k| pod["spec"][k].as_array().into_iter().flatten()).collect()
}

fn unique<T: Ord + Clone>(items: &[T]) -> bool {
    items.iter().collect::<std::collections::BTreeSet<_>>().len() == items.len()
}

/// Reviews `pod`; returns the patched Pod (or `None`) and the warnings.
fn reviewed(mutator: &Mutator, pod: &Value) -> (Option<Value>, Vec<String>) {
    let reviewed = mutator.review(&review("CREATE", pod, false)).expect("a readable review");
    let patched = reviewed.review.patch.as_ref().map(|patch| {
        let patch: json_patch::Patch = serde_json::from_slice(patch.json()).expect("a JSON patch");
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).expect("the patch applies");
        patched
    });
    (patched, reviewed.review.warnings)
}

/// Checks one targeted Pod; `Ok(true)` when it was patched, `Ok(false)` when refused.
fn check_targeted_pod(pod: &Value, backend: &Value) -> Result<bool, TestCaseError> {
    let mutator = Mutator::new(catalog_with_backend(Some(backend.clone())), "stash:test".into());
    let (patched, warnings) = reviewed(&mutator, pod);
    let collides = !unique(&sidecar_paths(pod, backend));
    let Some(patched) = patched else {
        prop_assert!(collides, "refused without a collision: {warnings:?}");
        prop_assert!(warnings.iter().any(|w| w.contains("not injected")), "refused silently");
        return Ok(false);
    };
    prop_assert!(!collides, "patched although the sidecar's mount paths collide");
    prop_assert!(warnings.is_empty(), "{warnings:?}");
    serde_json::from_value::<Pod>(patched.clone()).map_err(|e| TestCaseError::fail(format!("not a Pod: {e}")))?;

    let containers = all_containers(&patched);
    let sidecars: Vec<&&Value> = containers.iter().filter(|c| c["name"] == SIDECAR_NAME).collect();
    prop_assert_eq!(sidecars.len(), 1, "exactly one stash container");
    let volumes: Vec<&str> =
        patched["spec"]["volumes"].as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).collect();
    prop_assert!(unique(&volumes), "volume names are unique: {volumes:?}");
    for container in &containers {
        let mounts = container["volumeMounts"].as_array().cloned().unwrap_or_default();
        let paths: Vec<&str> = mounts.iter().filter_map(|m| m["mountPath"].as_str()).collect();
        prop_assert!(unique(&paths), "{}: mount paths are unique: {paths:?}", container["name"]);
        for mount in &mounts {
            prop_assert!(volumes.iter().any(|v| mount["name"] == *v), "{} mounts a volume that exists", mount["name"]);
        }
    }

    // The Pod's own containers, init containers and volumes come first and are untouched.
    let original = pod["spec"]["containers"].as_array().cloned().unwrap_or_default();
    let now = patched["spec"]["containers"].as_array().cloned().unwrap_or_default();
    prop_assert_eq!(&now[..original.len()], &original[..]);
    prop_assert_eq!(&patched["spec"]["initContainers"], &pod["spec"]["initContainers"]);
    let original = pod["spec"]["volumes"].as_array().cloned().unwrap_or_default();
    let now = patched["spec"]["volumes"].as_array().cloned().unwrap_or_default();
    prop_assert_eq!(&now[..original.len()], &original[..]);
    for (key, value) in pod["metadata"]["annotations"].as_object().into_iter().flatten() {
        if key != BATCH_ANNOTATION {
            prop_assert_eq!(&patched["metadata"]["annotations"][key], value);
        }
    }
    prop_assert_eq!(&patched["metadata"]["annotations"][BATCH_ANNOTATION], "app-backup");
    for (key, value) in pod["metadata"]["labels"].as_object().into_iter().flatten() {
        if key != SIDECAR_LABEL.0 {
            prop_assert_eq!(&patched["metadata"]["labels"][key], value);
        }
    }
    prop_assert_eq!(&patched["metadata"]["labels"][SIDECAR_LABEL.0], SIDECAR_LABEL.1);

    let context: SecurityContext = serde_json::from_value(sidecars[0]["securityContext"].clone())
        .map_err(|e| TestCaseError::fail(format!("securityContext: {e}")))?;
    prop_assert_eq!(context.allow_privilege_escalation, Some(false));
    prop_assert_eq!(context.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_string()]));
    prop_assert_eq!(context.seccomp_profile.map(|p| p.type_), Some("RuntimeDefault".to_string()));
    // runAsNonRoot, unless the Pod asks for uid 0: the kubelet would then refuse to start the sidecar.
    let root = pod["spec"]["securityContext"]["runAsUser"] == 0;
    prop_assert_eq!(context.run_as_non_root, (!root).then_some(true));

    let (again, warnings) = reviewed(&mutator, &patched);
    prop_assert!(again.is_none() && warnings.is_empty(), "re-reviewing the patched Pod changes nothing");
    Ok(true)
}

/// Structured Pods of every targeted workload kind, with colliding volume names and mount paths:
/// the applied patch always yields a valid Pod, or there is no patch and a warning says why.
#[test]
fn targeted_pods_get_a_valid_idempotent_patch_or_a_reason() {
    let patched = std::sync::atomic::AtomicUsize::new(0);
    let refused = std::sync::atomic::AtomicUsize::new(0);
    let config = ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() };
    let result = proptest::test_runner::TestRunner::new(config).run(&(targeted_pod(), backend()), |(pod, backend)| {
        let counter = if check_targeted_pod(&pod, &backend)? { &patched } else { &refused };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    });
    if let Err(err) = result {
        panic!("{err}");
    }
    let (patched, refused) = (patched.into_inner(), refused.into_inner());
    eprintln!("targeted Pods: {patched} patched, {refused} refused with a reason");
    assert!(
        patched * 4 >= (patched + refused) * 3,
        "most generated Pods reach the patch: {patched} of {}",
        patched + refused
    );
}

/// `pod` with some of the facts a patch reads changed, one per bit of `changes`: Pods that differ
/// in one of them are the ones a reused patch could confuse.
fn varied(pod: &Value, changes: u8) -> Value {
    let mut pod = pod.clone();
    let change = |bit: u8| changes & (1 << bit) != 0;
    if change(0) {
        pod["metadata"]["annotations"] = Value::Null;
    }
    if change(1) {
        pod["metadata"]["labels"] = json!({});
    }
    if change(2) {
        pod["spec"]["securityContext"] = json!({"runAsUser": 0});
    }
    if change(3) {
        pod["spec"]["volumes"] = Value::Null;
    }
    if let Some(volumes) = pod["spec"]["volumes"].as_array_mut() {
        if change(4) {
            volumes.retain(|v| v["name"] != "data");
        }
        if change(5) && !volumes.iter().any(|v| v["name"] == "stash-tmp-dir") {
            volumes.push(json!({"name": "stash-tmp-dir", "emptyDir": {}}));
        }
    }
    pod
}

/// The test batch, its members' temp dirs sized by `variant`, at `version`.
fn batch_variant(variant: u8, version: usize) -> crate::api::BackupBatch {
    let mut batch = test_batch(json!({"name": "repo"}));
    batch.metadata.resource_version = Some(version.to_string());
    for member in &mut batch.spec.members {
        let size = Quantity(format!("{}Mi", 64 << variant));
        member.temp_dir = Some(EmptyDirSettings { size_limit: Some(size), ..EmptyDirSettings::default() });
    }
    batch
}

/// The Repository with `backend`, at `version`.
fn repository_at(backend: &Value, version: usize) -> crate::api::Repository {
    let mut repository = repository("demo", backend.clone(), Value::Null);
    repository.metadata.resource_version = Some(version.to_string());
    repository
}

/// A mutator over a catalog holding `variant` of the batch and a Repository with `backend`.
fn fresh_mutator(variant: u8, backend: &Value) -> Mutator {
    let mut writers = Writers::default();
    writers.batches.apply_watcher_event(&Event::Apply(batch_variant(variant, 1)));
    writers.repositories.apply_watcher_event(&Event::Apply(repository_at(backend, 1)));
    Mutator::new(catalog_of(&writers), "stash:test".into())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Rendered patches are reused across Pods and versions of the batch and the Repository: one
    /// mutator that answered other Pods, before and after those objects changed, answers each Pod
    /// exactly as a fresh mutator over the same objects does.
    #[test]
    fn a_mutator_answers_each_pod_as_a_fresh_one_would(
        base in targeted_pod(),
        first_backend in backend(),
        // Mostly Pods of the same objects, now and then a new version of one of them.
        steps in prop::collection::vec(
            (0..64u8, prop::option::weighted(0.1, backend()), prop::option::weighted(0.1, 0..2u8)),
            1..16,
        )
    ) {
        let mut writers = Writers::default();
        writers.batches.apply_watcher_event(&Event::Apply(batch_variant(0, 1)));
        writers.repositories.apply_watcher_event(&Event::Apply(repository_at(&first_backend, 1)));
        let catalog = catalog_of(&writers);
        let targets = catalog.targets.clone();
        let shared = Mutator::new(catalog, "stash:test".into());
        let (mut variant, mut backend, mut version) = (0, first_backend, 1);
        for (changes, next_backend, next_variant) in steps {
            if let Some(next) = next_variant {
                version += 1;
                variant = next;
                writers.batches.apply_watcher_event(&Event::Apply(batch_variant(variant, version)));
                targets.invalidate();
            }
            if let Some(next) = next_backend {
                version += 1;
                backend = next;
                writers.repositories.apply_watcher_event(&Event::Apply(repository_at(&backend, version)));
            }
            let body = review("CREATE", &varied(&base, changes), false);
            let answered = shared.review(&body).expect("a readable review").review;
            let fresh = fresh_mutator(variant, &backend).review(&body).expect("a readable review").review;
            prop_assert_eq!(answered, fresh);
        }
    }
}
