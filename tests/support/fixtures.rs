//! Objects the controller tests build on: a backend Secret, a Repository, targets, a BackupBatch, and
//! a stand-in for a backup host that writes its entry into a session.

use super::TestNamespace;
use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use stash::api::backup_session::{BackupSessionPhase, HostBackupStats, HostPhase};
use stash::api::common::{Condition, ConditionStatus};
use stash::api::{BackupBatch, BackupSession, Repository};
use std::time::Duration;

pub const PASSWORD: &str = "not-a-real-password-7d41";

pub async fn create<K>(ns: &TestNamespace, object: Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let object: K = serde_json::from_value(object).expect("a valid object");
    ns.api::<K>().create(&PostParams::default(), &object).await.expect("object is created")
}

pub async fn secret(ns: &TestNamespace, with_password: bool) -> Secret {
    let data = if with_password { json!({"RESTIC_PASSWORD": PASSWORD}) } else { json!({"OTHER": "x"}) };
    create(ns, json!({"metadata": {"name": "repo-secret"}, "stringData": data})).await
}

pub async fn repository(ns: &TestNamespace) -> Repository {
    create(
        ns,
        json!({
            "apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
            "metadata": {"name": "repo", "namespace": ns.name},
            "spec": {"backend": {"storageSecretName": "repo-secret", "rest": {"url": "http://127.0.0.1:8000/repo"}}}
        }),
    )
    .await
}

/// Deployment `app` (1 replica), StatefulSet `db` (2 replicas) and PVC `data`.
pub async fn targets(ns: &TestNamespace) {
    let template = |app: &str| {
        json!({
            "metadata": {"labels": {"app": app}},
            "spec": {"containers": [{"name": "c", "image": "registry.invalid/c:1"}]}
        })
    };
    create::<Deployment>(
        ns,
        json!({"metadata": {"name": "app"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": "app"}}, "template": template("app")}}),
    )
    .await;
    create::<StatefulSet>(
        ns,
        json!({"metadata": {"name": "db"}, "spec": {
        "replicas": 2, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}}, "template": template("db")}}),
    )
    .await;
    create::<PersistentVolumeClaim>(
        ns,
        json!({"metadata": {"name": "data"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}),
    )
    .await;
}

pub fn member(kind: &str, name: &str) -> Value {
    let api_version = match kind {
        "PersistentVolumeClaim" => "v1",
        _ => "apps/v1",
    };
    json!({"target": {"alias": name, "ref": {"apiVersion": api_version, "kind": kind, "name": name}, "paths": ["/data"]}})
}

/// BackupBatch `name` over `members`, with `spec` merged in.
pub async fn batch(ns: &TestNamespace, name: &str, members: Vec<Value>, spec: Value) -> BackupBatch {
    let mut object = json!({
        "apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch",
        "metadata": {"name": name, "namespace": ns.name},
        "spec": {"repository": {"name": "repo"}, "members": members}
    });
    for (key, value) in spec.as_object().cloned().unwrap_or_default() {
        object["spec"][key] = value;
    }
    create(ns, object).await
}

/// Waits until the session reaches `phase`; on timeout, shows where it stood.
pub async fn session_phase(sessions: &Api<BackupSession>, name: &str, phase: BackupSessionPhase) -> BackupSession {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let session = sessions.get_opt(name).await.expect("get");
        if let Some(session) = &session
            && session.status.as_ref().and_then(|s| s.phase) == Some(phase)
        {
            return session.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "session {name} never became {phase:?}; last seen: {:?}",
            session.map(|s| s.status)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until session `name` has condition `type_` True, and returns it.
pub async fn session_condition(sessions: &Api<BackupSession>, name: &str, type_: &str) -> Condition {
    super::eventually(&format!("session {name} to be {type_}"), Duration::from_secs(120), || {
        let sessions = sessions.clone();
        let name = name.to_string();
        async move {
            let status = sessions.get(&name).await.ok()?.status?;
            status.conditions.into_iter().find(|c| c.type_ == type_ && c.status == ConditionStatus::True)
        }
    })
    .await
}

/// Plays a backup host: appends its own entry to target `index`, retrying on conflicts.
pub async fn report_host(sessions: &Api<BackupSession>, name: &str, index: usize, host: &str, phase: HostPhase) {
    let entry = HostBackupStats {
        hostname: host.into(),
        phase: Some(phase),
        snapshots: Vec::new(),
        duration: Some("1s".into()),
        error: (phase == HostPhase::Failed).then(|| "restic backup: exit status 1".into()),
    };
    stash::status_write::update_status(sessions, name, |session| {
        session.status.as_mut().expect("a status").targets[index].stats.push(entry.clone());
        true
    })
    .await
    .expect("writing the host entry");
}

/// Plays a finalize Job that finished: session `name` gets `SessionFinalized=True`.
pub async fn mark_finalized(sessions: &Api<BackupSession>, name: &str) {
    stash::status_write::update_status(sessions, name, |session| {
        let status = session.status.get_or_insert_with(Default::default);
        status.conditions.push(Condition {
            type_: stash::api::backup_session::SESSION_FINALIZED.into(),
            status: ConditionStatus::True,
            observed_generation: None,
            last_transition_time: None,
            reason: Some("Finalized".into()),
            message: None,
            severity: None,
        });
        true
    })
    .await
    .expect("finalized");
}

/// The shipped ValidatingAdmissionPolicy `policy` (deploy/base/admission-policy.yaml) applied, and
/// bound to `ns` alone: the cluster is shared, and other tests create what it refuses.
pub async fn bind_shipped_policy(ns: &TestNamespace, policy: &str) -> PolicyBinding {
    let path = super::repo_root().join("deploy/base/admission-policy.yaml");
    let text = std::fs::read_to_string(&path).expect("the policy file");
    let document = serde_yaml::Deserializer::from_str(&text)
        .map(|document| <Value as serde::Deserialize>::deserialize(document).expect("YAML"))
        .find(|document| document["kind"] == "ValidatingAdmissionPolicy" && document["metadata"]["name"] == policy)
        .unwrap_or_else(|| panic!("no ValidatingAdmissionPolicy {policy} in {}", path.display()));
    let apply = PatchParams::apply(super::FIELD_MANAGER).force();
    let policies = Api::<ValidatingAdmissionPolicy>::all(ns.client.clone());
    policies.patch(policy, &apply, &Patch::Apply(&document)).await.expect("the policy applies");
    let name = format!("{policy}-{}", ns.name);
    let binding = json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": policy, "validationActions": ["Deny"], "matchResources": {"namespaceSelector":
            {"matchLabels": {"kubernetes.io/metadata.name": ns.name}}}}});
    let bindings = Api::<ValidatingAdmissionPolicyBinding>::all(ns.client.clone());
    bindings.patch(&name, &apply, &Patch::Apply(&binding)).await.expect("the binding applies");
    PolicyBinding { bindings, name }
}

/// A binding made by `bind_shipped_policy`, removed by `remove` (it is cluster-scoped: the test's
/// namespace does not take it along).
pub struct PolicyBinding {
    bindings: Api<ValidatingAdmissionPolicyBinding>,
    name: String,
}

impl PolicyBinding {
    pub async fn remove(self) {
        self.bindings.delete(&self.name, &DeleteParams::default()).await.expect("unbind");
    }
}
