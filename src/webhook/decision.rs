//! Which BackupBatch member, if any, a new Pod belongs to — answered from reflector caches only.

use super::pod_view::PodView;
use super::target_index::TargetIndex;
use crate::api::backup_batch::BackupMember;
use crate::api::{BackupBatch, Repository};
use crate::tenancy;
use crate::workload::WorkloadKind;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use std::sync::Arc;

/// The label the Deployment controller puts on Pods; it is also the suffix of the ReplicaSet's name.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// The reflector caches the webhook answers from.
#[derive(Clone)]
pub struct Catalog {
    pub batches: Store<BackupBatch>,
    pub repositories: Store<Repository>,
    pub replicasets: Store<PartialObjectMeta<ReplicaSet>>,
    /// Namespace labels, for Repository usage policies.
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// Members by target; whoever feeds `batches` must call `targets.invalidate()` on every change.
    pub targets: Arc<TargetIndex>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub name: String,
}

/// What to do with a Pod being created.
#[derive(Debug)]
pub enum Decision {
    /// No BackupBatch member targets the Pod's workload (or the Pod has none).
    NotTargeted,
    /// The Pod already has a `stash` container (reinvocation, or a manual one).
    AlreadyInjected,
    /// Targeted, but the batch's Repository is not known yet, or may not be used from the Pod's
    /// namespace (the two are not told apart); the controller reports the Pod.
    RepositoryUnknown {
        batch: String,
    },
    Inject(Injection),
}

/// Everything the patch needs, resolved from the caches.
#[derive(Debug)]
pub struct Injection {
    pub batch: Arc<BackupBatch>,
    pub member: usize,
    pub workload: Workload,
    /// The batch's Repository, authorised for the Pod's namespace, with a storage Secret named.
    pub repository: Arc<Repository>,
}

impl Injection {
    pub fn member(&self) -> &BackupMember {
        &self.batch.spec.members[self.member]
    }
}

impl Catalog {
    /// A catalog over these stores, with a fresh target index.
    pub fn new(
        batches: Store<BackupBatch>,
        repositories: Store<Repository>,
        replicasets: Store<PartialObjectMeta<ReplicaSet>>,
        namespaces: Store<PartialObjectMeta<Namespace>>,
    ) -> Self {
        Self { batches, repositories, replicasets, namespaces, targets: Arc::default() }
    }

    pub fn decide(&self, pod: &PodView, namespace: &str, sidecar_name: &str) -> Decision {
        if pod.has_container(sidecar_name) {
            return Decision::AlreadyInjected;
        }
        let Some(workload) = self.controlling_workload(pod, namespace) else {
            return Decision::NotTargeted;
        };
        let Some((batch, member)) = self.targets.lookup(&self.batches, namespace, &workload) else {
            return Decision::NotTargeted;
        };
        let reference = &batch.spec.repository;
        let key = ObjectRef::new(&reference.name).within(tenancy::repository_namespace(namespace, reference));
        let found = self.repositories.get(&key);
        let labels = self.namespaces.get(&ObjectRef::new(namespace)).and_then(|n| n.metadata.labels.clone());
        let authorized = tenancy::authorize_repository(namespace, reference, found.as_deref(), labels.as_ref())
            .is_ok_and(|repo| !repo.spec.backend.storage_secret_name.is_empty());
        match found {
            Some(repository) if authorized => Decision::Inject(Injection { batch, member, workload, repository }),
            _ => Decision::RepositoryUnknown { batch: batch.name_any() },
        }
    }

    /// Follows the Pod's controller reference up to the workload a BackupBatch can name.
    pub fn controlling_workload(&self, pod: &PodView, namespace: &str) -> Option<Workload> {
        let owner = pod.controller()?;
        let group = owner.api_version.split_once('/').map_or("", |(group, _)| group);
        let kind = match (group, &*owner.kind) {
            ("apps", "ReplicaSet") => {
                return Some(self.replicaset_owner(pod, namespace, &owner.name));
            }
            ("apps", "StatefulSet") => WorkloadKind::StatefulSet,
            ("apps", "DaemonSet") => WorkloadKind::DaemonSet,
            ("", "ReplicationController") => WorkloadKind::ReplicationController,
            // Jobs (and CronJobs through them) and foreign controllers are never targets.
            _ => return None,
        };
        Some(Workload { kind, name: owner.name.to_string() })
    }

    /// A ReplicaSet's Deployment, from the cache; on a cache miss (a ReplicaSet created moments ago),
    /// from the Deployment controller's naming rule `<deployment>-<pod-template-hash>`.
    fn replicaset_owner(&self, pod: &PodView, namespace: &str, replicaset: &str) -> Workload {
        let key = ObjectRef::new(replicaset).within(namespace);
        if let Some(cached) = self.replicasets.get(&key) {
            let deployment = cached
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true) && o.kind == "Deployment");
            return match deployment {
                Some(owner) => Workload { kind: WorkloadKind::Deployment, name: owner.name.clone() },
                None => Workload { kind: WorkloadKind::ReplicaSet, name: replicaset.to_string() },
            };
        }
        let by_convention = pod
            .metadata
            .labels
            .get(POD_TEMPLATE_HASH)
            .and_then(|hash| replicaset.strip_suffix(&**hash))
            .and_then(|prefix| prefix.strip_suffix('-'))
            .filter(|name| !name.is_empty());
        match by_convention {
            Some(name) => Workload { kind: WorkloadKind::Deployment, name: name.to_string() },
            None => Workload { kind: WorkloadKind::ReplicaSet, name: replicaset.to_string() },
        }
    }
}
