//! What the controllers read without a request: reflector stores of Repositories, of PVC and
//! identity metadata, of the trigger CronJobs and of what workload members name (the workloads, lean,
//! and their Pods' metadata), and three small memos for what no store can say —
//! a backend Secret checked once per Repository version (Secrets are never listed or watched), the
//! last CronJob applied per batch, and identities just created whose watch event is still on its way.
//!
//! The Repository and CronJob stores are fed by the BackupBatch controller's own trigger streams, so a
//! reconcile woken by one of them always finds the change in the store.

use super::targets::ROLLOUT_ANNOTATION;
use crate::api::{BackupBatch, Repository};
use crate::executor_pod::SIDECAR_LABEL;
use crate::reflect::{Listed, NeverListed, all_listed, feed};
use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetStatus, Deployment, DeploymentStatus, ReplicaSet, ReplicaSetStatus, StatefulSet,
    StatefulSetStatus,
};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, Pod, PodSpec, PodTemplateSpec, ReplicationController, ReplicationControllerStatus,
    ServiceAccount,
};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::core::{ObjectMeta, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an identity this operator created counts as present without its watch event: far longer
/// than an event takes to arrive, far shorter than anyone deleting it by hand and expecting it back.
const CREATED_GRACE: Duration = Duration::from_secs(30);

/// The fingerprint of a CronJob applied, and the generation the API server gave it.
type Applied = (u64, Option<i64>);

/// A batch's resourceVersion before and after a status write.
type StatusWrite = (Option<String>, Option<String>);

pub struct Caches {
    pub(crate) repositories: Store<Repository>,
    pub(crate) claims: Store<PartialObjectMeta<PersistentVolumeClaim>>,
    pub(crate) cronjobs: Store<PartialObjectMeta<CronJob>>,
    pub(crate) accounts: Store<PartialObjectMeta<ServiceAccount>>,
    pub(crate) bindings: Store<PartialObjectMeta<RoleBinding>>,
    /// The Repository grants (`grants`) to the namespaces of this operator's scope, wherever they are.
    pub(crate) grants: Store<PartialObjectMeta<RoleBinding>>,
    pub(crate) members: Members,
    /// Repositories whose backend Secret was found usable in a namespace that uses them (where its
    /// Pods mount the Secret), at the Repository's resourceVersion.
    secrets_checked: Mutex<HashMap<(ObjectRef<Repository>, String), String>>,
    /// Per trigger CronJob: the fingerprint of what was last applied, and the generation it got.
    applied: Mutex<HashMap<ObjectRef<PartialObjectMeta<CronJob>>, Applied>>,
    /// Per batch: its resourceVersion before and after the status this operator last wrote.
    statuses: Mutex<HashMap<ObjectRef<BackupBatch>, StatusWrite>>,
    /// Identities created by this operator, by kind, namespace and name, and when.
    created: Mutex<HashMap<(String, String, String), Instant>>,
    /// Held while an identity is created, so that a namespace's batches do not race to create it.
    pub(crate) creating: tokio::sync::Mutex<()>,
    /// Whether each store has completed its first list.
    listed: Vec<Listed>,
}

/// The writers of the stores the controllers' trigger streams feed.
pub struct Writers {
    pub repositories: Writer<Repository>,
    pub cronjobs: Writer<PartialObjectMeta<CronJob>>,
}

/// The stores fed by reflectors of their own, as one future that runs until dropped.
pub type Feeds = futures::future::BoxFuture<'static, ()>;

impl Caches {
    /// The caches of `namespace` (or all), the writers for the trigger-fed stores, and the future
    /// that feeds the others. Identities are watched with `identities` (our label), the Repository
    /// grants with `grants`, in every namespace.
    pub(crate) fn new(
        client: &Client,
        namespace: Option<&str>,
        identities: watcher::Config,
        grants: watcher::Config,
    ) -> (Self, Writers, Feeds) {
        let (repositories, repositories_writer) = reflector::store();
        let (cronjobs, cronjobs_writer) = reflector::store();
        let claims_api = super::api::<PartialObjectMeta<PersistentVolumeClaim>>(client, namespace);
        let (claims_store, claims_listed, claims_feed) = feed(watcher(claims_api, watcher::Config::default()), |_| {});
        let accounts_api = super::api::<PartialObjectMeta<ServiceAccount>>(client, namespace);
        let (accounts, accounts_listed, accounts_feed) = feed(watcher(accounts_api, identities.clone()), |_| {});
        let bindings_api = super::api::<PartialObjectMeta<RoleBinding>>(client, namespace);
        let (bindings, bindings_listed, bindings_feed) = feed(watcher(bindings_api, identities), |_| {});
        let grants_api = kube::Api::<PartialObjectMeta<RoleBinding>>::all(client.clone());
        let (grants_store, grants_listed, grants_feed) = feed(watcher(grants_api, grants), |_| {});
        let (members, members_listed, members_feed) = Members::watch(client, namespace);
        let feeds = Box::pin(async move {
            futures::join!(claims_feed, accounts_feed, bindings_feed, grants_feed, members_feed);
        });
        let mut listed = vec![claims_listed, accounts_listed, bindings_listed, grants_listed];
        listed.extend(members_listed);
        let caches = Caches {
            repositories,
            claims: claims_store,
            cronjobs,
            accounts,
            bindings,
            grants: grants_store,
            members,
            secrets_checked: Mutex::default(),
            applied: Mutex::default(),
            statuses: Mutex::default(),
            created: Mutex::default(),
            creating: tokio::sync::Mutex::const_new(()),
            listed,
        };
        (caches, Writers { repositories: repositories_writer, cronjobs: cronjobs_writer }, feeds)
    }

    /// Resolves once every store has completed its first list: before that, a missing object would
    /// read as absent, and a batch would report (and create) what is in fact there.
    pub(crate) async fn ready(&self) -> Result<(), NeverListed> {
        all_listed(&self.listed).await
    }

    /// A store the controllers feed themselves (their trigger streams, their own caches) is ready
    /// once `listed` says so.
    pub(crate) fn also_ready_when(&mut self, listed: Listed) {
        self.listed.push(listed);
    }

    /// Whether `repository`, at its current version, was seen with a usable backend Secret in
    /// `namespace`.
    pub(crate) fn secret_known_usable(&self, repository: &Repository, namespace: &str) -> bool {
        let version = repository.metadata.resource_version.as_deref();
        let checked = self.secrets_checked.lock().unwrap_or_else(|e| e.into_inner());
        let key = (ObjectRef::from_obj(repository), namespace.to_string());
        version.is_some() && checked.get(&key).map(String::as_str) == version
    }

    /// `repository`'s Secret, at its current version, was found usable in `namespace`.
    pub(crate) fn secret_usable(&self, repository: &Repository, namespace: &str) {
        if let Some(version) = repository.metadata.resource_version.clone() {
            let mut checked = self.secrets_checked.lock().unwrap_or_else(|e| e.into_inner());
            checked.insert((ObjectRef::from_obj(repository), namespace.to_string()), version);
        }
    }

    /// Whether applying `fingerprint` to CronJob `name` would change nothing: it was the last thing
    /// applied, and nobody changed the CronJob's spec since (its generation is the one it got).
    pub(crate) fn cronjob_current(&self, namespace: &str, name: &str, fingerprint: u64) -> bool {
        let key = ObjectRef::new(name).within(namespace);
        let Some(cached) = self.cronjobs.get(&key) else { return false };
        let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        applied.get(&key) == Some(&(fingerprint, cached.metadata.generation))
    }

    pub(crate) fn cronjob_applied(&self, namespace: &str, name: &str, fingerprint: u64, generation: Option<i64>) {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        applied.insert(ObjectRef::new(name).within(namespace), (fingerprint, generation));
    }

    /// Whether the cached `batch` is still the version this operator's last status write replaced:
    /// the write's own watch event is on its way and brings a reconcile that sees it. Reconciling the
    /// stale copy would write the status (and publish its Events) again. Under load, reconciles woken
    /// by a CronJob or Repository event often read the batch one write behind.
    pub(crate) fn status_pending(&self, batch: &BackupBatch) -> bool {
        let statuses = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
        let version = &batch.metadata.resource_version;
        statuses.get(&ObjectRef::from_obj(batch)).is_some_and(|(before, after)| before == version && before != after)
    }

    /// `batch` (as cached) got a status write, which gave it resourceVersion `written`.
    pub(crate) fn status_written(&self, batch: &BackupBatch, written: Option<String>) {
        let mut statuses = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
        statuses.insert(ObjectRef::from_obj(batch), (batch.metadata.resource_version.clone(), written));
    }

    /// The batch is gone: what was remembered of it goes too.
    pub(crate) fn forget_batch(&self, batch: &BackupBatch, cronjob: &str) {
        self.statuses.lock().unwrap_or_else(|e| e.into_inner()).remove(&ObjectRef::from_obj(batch));
        let cronjob = ObjectRef::new(cronjob).within(&batch.metadata.namespace.clone().unwrap_or_default());
        self.applied.lock().unwrap_or_else(|e| e.into_inner()).remove(&cronjob);
    }

    /// Whether identity `K` `namespace/name` exists, as the store or a recent creation of ours says.
    pub(crate) fn identity_present<K>(&self, store: &Store<PartialObjectMeta<K>>, namespace: &str, name: &str) -> bool
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        if store.get(&ObjectRef::new(name).within(namespace)).is_some() {
            return true;
        }
        let created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        let key = (K::kind(&()).into_owned(), namespace.to_string(), name.to_string());
        created.get(&key).is_some_and(|at| at.elapsed() < CREATED_GRACE)
    }

    pub(crate) fn identity_created<K: Resource<DynamicType = ()>>(&self, namespace: &str, name: &str) {
        let mut created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        created.retain(|_, at| at.elapsed() < CREATED_GRACE);
        created.insert((K::kind(&()).into_owned(), namespace.to_string(), name.to_string()), Instant::now());
    }

    /// Identity `K` `namespace/name` is being removed: it no longer counts as just created.
    pub(crate) fn creation_undone<K: Resource<DynamicType = ()>>(&self, namespace: &str, name: &str) {
        let mut created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        created.remove(&(K::kind(&()).into_owned(), namespace.to_string(), name.to_string()));
    }

    /// The namespace's identities are being removed: none of them counts as just created.
    pub(crate) fn identities_released(&self, namespace: &str) {
        let mut created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        created.retain(|(_, ns, _), _| ns != namespace);
    }
}

/// What workload members name, kept lean: only what `targets` reads of them. The five workload kinds
/// (selector, replicas, the pod template's ServiceAccount and rollout annotation, and from the status
/// how many Pods the workload has) and the metadata of the Pods the webhook gave the sidecar (by its
/// label, so the API server sends no others). A reconcile then counts a workload's sidecars without a
/// request, and a batch that waits for its Pods re-checks them for free.
pub(crate) struct Members {
    pub(crate) deployments: Store<Deployment>,
    pub(crate) statefulsets: Store<StatefulSet>,
    pub(crate) daemonsets: Store<DaemonSet>,
    pub(crate) replicasets: Store<ReplicaSet>,
    pub(crate) controllers: Store<ReplicationController>,
    /// Pods carrying the sidecar label.
    pub(crate) injected: Store<PartialObjectMeta<Pod>>,
}

impl Members {
    /// The stores (of `namespace`, or all), whether each has listed, and the future that feeds them.
    fn watch(client: &Client, namespace: Option<&str>) -> (Self, Vec<Listed>, Feeds) {
        let config = watcher::Config::default;
        let (deployments, deployments_listed, deployments_feed) =
            feed(watcher(super::api(client, namespace), config()).modify(lean_deployment), |_| {});
        let (statefulsets, statefulsets_listed, statefulsets_feed) =
            feed(watcher(super::api(client, namespace), config()).modify(lean_statefulset), |_| {});
        let (daemonsets, daemonsets_listed, daemonsets_feed) =
            feed(watcher(super::api(client, namespace), config()).modify(lean_daemonset), |_| {});
        let (replicasets, replicasets_listed, replicasets_feed) =
            feed(watcher(super::api(client, namespace), config()).modify(lean_replicaset), |_| {});
        let (controllers, controllers_listed, controllers_feed) =
            feed(watcher(super::api(client, namespace), config()).modify(lean_controller), |_| {});
        let labelled = config().labels(&format!("{}={}", SIDECAR_LABEL.0, SIDECAR_LABEL.1));
        let (injected, injected_listed, injected_feed) =
            feed(watcher(super::api(client, namespace), labelled).modify(lean_pod), |_| {});
        let feeds = Box::pin(async move {
            futures::join!(
                deployments_feed,
                statefulsets_feed,
                daemonsets_feed,
                replicasets_feed,
                controllers_feed,
                injected_feed
            );
        });
        let listed = vec![
            deployments_listed,
            statefulsets_listed,
            daemonsets_listed,
            replicasets_listed,
            controllers_listed,
            injected_listed,
        ];
        (Self { deployments, statefulsets, daemonsets, replicasets, controllers, injected }, listed, feeds)
    }
}

/// Keeps of `annotations` only the one named `key`.
fn only(annotations: Option<BTreeMap<String, String>>, key: &str) -> Option<BTreeMap<String, String>> {
    annotations.and_then(|mut all| all.remove_entry(key)).map(|entry| BTreeMap::from([entry]))
}

/// A workload's own metadata is read for its name only: a `kubectl apply`'d one carries its whole
/// last spec in an annotation.
fn lean_workload_meta(meta: &mut ObjectMeta) {
    meta.labels = None;
    meta.annotations = None;
    meta.owner_references = None;
}

fn lean_template(template: &mut PodTemplateSpec) {
    let annotations = only(template.metadata.take().and_then(|m| m.annotations), ROLLOUT_ANNOTATION);
    template.metadata = Some(ObjectMeta { annotations, ..Default::default() });
    template.spec = template.spec.take().map(|spec| PodSpec {
        service_account_name: spec.service_account_name,
        service_account: spec.service_account,
        ..Default::default()
    });
}

fn lean_deployment(deployment: &mut Deployment) {
    lean_workload_meta(&mut deployment.metadata);
    if let Some(spec) = deployment.spec.as_mut() {
        lean_template(&mut spec.template);
    }
    let replicas = deployment.status.take().and_then(|status| status.replicas);
    deployment.status = Some(DeploymentStatus { replicas, ..Default::default() });
}

fn lean_statefulset(statefulset: &mut StatefulSet) {
    lean_workload_meta(&mut statefulset.metadata);
    if let Some(spec) = statefulset.spec.as_mut() {
        lean_template(&mut spec.template);
        spec.volume_claim_templates = None;
    }
    let replicas = statefulset.status.take().map_or(0, |status| status.replicas);
    statefulset.status = Some(StatefulSetStatus { replicas, ..Default::default() });
}

fn lean_daemonset(daemonset: &mut DaemonSet) {
    lean_workload_meta(&mut daemonset.metadata);
    if let Some(spec) = daemonset.spec.as_mut() {
        lean_template(&mut spec.template);
    }
    daemonset.status = daemonset.status.take().map(|status| DaemonSetStatus {
        desired_number_scheduled: status.desired_number_scheduled,
        current_number_scheduled: status.current_number_scheduled,
        number_misscheduled: status.number_misscheduled,
        ..Default::default()
    });
}

fn lean_replicaset(replicaset: &mut ReplicaSet) {
    lean_workload_meta(&mut replicaset.metadata);
    if let Some(template) = replicaset.spec.as_mut().and_then(|spec| spec.template.as_mut()) {
        lean_template(template);
    }
    let replicas = replicaset.status.take().map_or(0, |status| status.replicas);
    replicaset.status = Some(ReplicaSetStatus { replicas, ..Default::default() });
}

fn lean_controller(controller: &mut ReplicationController) {
    lean_workload_meta(&mut controller.metadata);
    if let Some(template) = controller.spec.as_mut().and_then(|spec| spec.template.as_mut()) {
        lean_template(template);
    }
    let replicas = controller.status.take().map_or(0, |status| status.replicas);
    controller.status = Some(ReplicationControllerStatus { replicas, ..Default::default() });
}

/// An injected Pod is matched to its workload by its labels.
fn lean_pod(pod: &mut PartialObjectMeta<Pod>) {
    pod.metadata.annotations = None;
    pod.metadata.owner_references = None;
}

/// A stable fingerprint of what is applied, to tell whether applying it again would change anything.
pub(crate) fn fingerprint(object: &serde_json::Value) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    object.to_string().hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caches() -> Caches {
        let config = watcher::Config::default;
        let client = || {
            let service = tower::service_fn(|_| async { Err::<http::Response<kube::client::Body>, _>("no server") });
            kube::Client::new(service, "default")
        };
        Caches::new(&client(), None, config(), config()).0
    }

    fn batch(version: &str) -> BackupBatch {
        let mut batch = BackupBatch::new(
            "b",
            serde_json::from_value(serde_json::json!({"repository": {"name": "r"}, "members": []})).expect("a spec"),
        );
        batch.metadata.namespace = Some("ns".into());
        batch.metadata.resource_version = Some(version.into());
        batch
    }

    /// What `targets` reads of a workload and of a Pod survives the trim; the bulk does not.
    #[test]
    fn lean_members_keep_what_targets_read() {
        let template = serde_json::json!({
            "metadata": {"labels": {"app": "web"}, "annotations": {ROLLOUT_ANNOTATION: "nightly", "other": "x"}},
            "spec": {"serviceAccountName": "web", "containers": [{"name": "c", "image": "c:1"}],
                     "volumes": [{"name": "v", "emptyDir": {}}]}
        });
        let mut deployment: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns", "labels": {"a": "b"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"}},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "web"}}, "template": template},
            "status": {"replicas": 1, "readyReplicas": 1, "conditions": [{"type": "Available", "status": "True"}]}
        }))
        .expect("a Deployment");
        lean_deployment(&mut deployment);
        let spec = deployment.spec.as_ref().expect("spec");
        assert_eq!((deployment.metadata.name.as_deref(), spec.replicas), (Some("web"), Some(0)));
        assert_eq!(spec.selector.match_labels, Some(BTreeMap::from([("app".to_string(), "web".to_string())])));
        let annotations = spec.template.metadata.as_ref().and_then(|m| m.annotations.clone());
        assert_eq!(annotations, Some(BTreeMap::from([(ROLLOUT_ANNOTATION.to_string(), "nightly".to_string())])));
        let pod = spec.template.spec.as_ref().expect("pod spec");
        assert_eq!(pod.service_account_name.as_deref(), Some("web"));
        assert!(pod.containers.is_empty() && pod.volumes.is_none());
        assert!(deployment.metadata.annotations.is_none());
        let status = deployment.status.expect("status");
        assert_eq!((status.replicas, status.ready_replicas, status.conditions), (Some(1), None, None));

        let mut daemonset: DaemonSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "agent"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": {"spec": {"containers": []}}},
            "status": {"desiredNumberScheduled": 3, "currentNumberScheduled": 2, "numberMisscheduled": 0, "numberReady": 2}
        }))
        .expect("a DaemonSet");
        lean_daemonset(&mut daemonset);
        let status = daemonset.status.map(|s| (s.desired_number_scheduled, s.current_number_scheduled, s.number_ready));
        assert_eq!(status, Some((3, 2, 0)));

        let mut pod: PartialObjectMeta<Pod> = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "labels": {"app": "web"}, "annotations": {"big": "x"}}
        }))
        .expect("Pod metadata");
        lean_pod(&mut pod);
        assert_eq!(pod.metadata.labels, Some(BTreeMap::from([("app".to_string(), "web".to_string())])));
        assert_eq!(pod.metadata.annotations, None);
    }

    /// A reconcile of the copy our status write replaced waits for the write's own event; a write
    /// that changed nothing (same version back) leaves nothing to wait for.
    #[tokio::test]
    async fn a_batch_is_stale_only_until_the_cache_shows_our_status_write() {
        let caches = caches();
        assert!(!caches.status_pending(&batch("1")), "nothing written yet");
        caches.status_written(&batch("1"), Some("2".into()));
        assert!(caches.status_pending(&batch("1")), "the cache still has the replaced version");
        assert!(!caches.status_pending(&batch("2")), "the cache caught up");
        assert!(!caches.status_pending(&batch("3")), "someone else wrote since");
        caches.status_written(&batch("3"), Some("3".into()));
        assert!(!caches.status_pending(&batch("3")), "a no-op write brings no event to wait for");
        caches.status_written(&batch("3"), Some("4".into()));
        caches.forget_batch(&batch("3"), "stash-trigger-b");
        assert!(!caches.status_pending(&batch("3")), "a deleted batch is forgotten");
    }
}
