//! Member targets: do they exist, how many hosts back them up, and do their Pods carry the sidecar.

use super::backup_batch::SIDECAR_INJECTED;
use super::caches::Caches;
use crate::api::backup_batch::BackupMember;
use crate::api::{BackupBatch, Repository};
use crate::conditions::Desired;
use crate::executor_pod::APP_BINDING_KIND;
use crate::workload::WorkloadKind;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, PodTemplateSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::core::{PartialObjectMeta, SelectorExt};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use std::collections::BTreeMap;

/// Set on a workload's pod template when the controller restarted it once to inject the sidecar.
pub const ROLLOUT_ANNOTATION: &str = "stash.appscode.com/sidecar-rollout";
/// How old a batch must be before its workloads are restarted (webhook caches catch up meanwhile).
const ROLL_SETTLE_SECONDS: i64 = 5;

#[derive(Debug, Clone)]
pub struct WorkloadInfo {
    pub kind: WorkloadKind,
    pub name: String,
    pub selector: Option<LabelSelector>,
    pub template_annotations: BTreeMap<String, String>,
    /// The ServiceAccount its Pods (and so the injected sidecar) run as.
    pub service_account: String,
    /// How many hosts back the workload up: StatefulSet replicas, DaemonSet desired Pods, else 1 —
    /// and 0 for any workload scaled to zero (nothing can back it up: its target fails at once).
    pub hosts: i32,
    /// How many Pods the workload has, as its status says (its controller counts the ones it owns
    /// and that are not terminating).
    pub pods: i32,
}

#[derive(Debug, Clone)]
pub enum TargetState {
    Missing,
    Unsupported,
    /// `target.ref.namespace` names another namespace: refused without reading it, so that batches
    /// cannot probe other namespaces' objects.
    CrossNamespace,
    Workload(WorkloadInfo),
    Volume,
    /// An AppBinding member that cannot be used, and why.
    Unusable(super::app_binding::Problem),
}

impl TargetState {
    pub fn hosts(&self) -> i32 {
        match self {
            TargetState::Workload(workload) => workload.hosts,
            _ => 1,
        }
    }
}

fn workload<K>(
    kind: WorkloadKind,
    object: K,
    (hosts, pods): (i32, i32),
    selector: Option<LabelSelector>,
    template: Option<&PodTemplateSpec>,
) -> TargetState
where
    K: ResourceExt,
{
    let annotations = template.and_then(|t| t.metadata.as_ref()).and_then(|m| m.annotations.clone());
    let pod = template.and_then(|t| t.spec.as_ref());
    // `serviceAccount` is the deprecated alias the API server still honours.
    let service_account = pod
        .and_then(|p| p.service_account_name.clone().or_else(|| p.service_account.clone()))
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "default".into());
    TargetState::Workload(WorkloadInfo {
        kind,
        name: object.name_any(),
        selector,
        template_annotations: annotations.unwrap_or_default(),
        service_account,
        hosts,
        pods,
    })
}

/// `K` `namespace/name`: from `store` when the controllers have one, else from the API server.
async fn read<K>(
    store: Option<&Store<K>>,
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<K>, kube::Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    match store {
        Some(store) => Ok(store.get(&ObjectRef::new(name).within(namespace)).map(|cached| K::clone(&cached))),
        None => Api::<K>::namespaced(client.clone(), namespace).get_opt(name).await,
    }
}

/// What `member` names: workloads and PersistentVolumeClaims from the controllers' `cached` stores
/// when given, Secrets and AppBindings (and everything, for the CLI) from the API server.
pub async fn inspect(
    client: &Client,
    cached: Option<&Caches>,
    namespace: &str,
    member: &BackupMember,
) -> Result<TargetState, kube::Error> {
    let target = &member.target.reference;
    if target.namespace.as_deref().is_some_and(|other| other != namespace) {
        return Ok(TargetState::CrossNamespace);
    }
    let name = target.name.as_str();
    Ok(match target.kind.as_str() {
        "Deployment" => match read(cached.map(|c| &c.members.deployments), client, namespace, name).await? {
            Some(d) => {
                let spec = d.spec.clone().unwrap_or_default();
                let hosts = i32::from(spec.replicas.unwrap_or(1) > 0);
                let pods = d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0);
                workload(WorkloadKind::Deployment, d, (hosts, pods), Some(spec.selector), Some(&spec.template))
            }
            None => TargetState::Missing,
        },
        "StatefulSet" => match read(cached.map(|c| &c.members.statefulsets), client, namespace, name).await? {
            Some(s) => {
                let spec = s.spec.clone().unwrap_or_default();
                let replicas = spec.replicas.unwrap_or(1);
                let pods = s.status.as_ref().map_or(0, |s| s.replicas);
                workload(WorkloadKind::StatefulSet, s, (replicas, pods), Some(spec.selector), Some(&spec.template))
            }
            None => TargetState::Missing,
        },
        "DaemonSet" => match read(cached.map(|c| &c.members.daemonsets), client, namespace, name).await? {
            Some(d) => {
                let spec = d.spec.clone().unwrap_or_default();
                let desired = d.status.as_ref().map_or(0, |s| s.desired_number_scheduled);
                let pods = d.status.as_ref().map_or(0, |s| s.current_number_scheduled + s.number_misscheduled);
                workload(WorkloadKind::DaemonSet, d, (desired, pods), Some(spec.selector), Some(&spec.template))
            }
            None => TargetState::Missing,
        },
        "ReplicaSet" => match read(cached.map(|c| &c.members.replicasets), client, namespace, name).await? {
            Some(r) => {
                let spec = r.spec.clone().unwrap_or_default();
                let hosts = i32::from(spec.replicas.unwrap_or(1) > 0);
                let pods = r.status.as_ref().map_or(0, |s| s.replicas);
                workload(WorkloadKind::ReplicaSet, r, (hosts, pods), Some(spec.selector), spec.template.as_ref())
            }
            None => TargetState::Missing,
        },
        "ReplicationController" => match read(cached.map(|c| &c.members.controllers), client, namespace, name).await? {
            Some(r) => {
                let spec = r.spec.clone().unwrap_or_default();
                let selector =
                    spec.selector.map(|labels| LabelSelector { match_labels: Some(labels), ..Default::default() });
                let hosts = i32::from(spec.replicas.unwrap_or(1) > 0);
                let pods = r.status.as_ref().map_or(0, |s| s.replicas);
                workload(WorkloadKind::ReplicationController, r, (hosts, pods), selector, spec.template.as_ref())
            }
            None => TargetState::Missing,
        },
        "PersistentVolumeClaim" => {
            let exists = match cached {
                Some(cached) => cached.claims.get(&ObjectRef::new(name).within(namespace)).is_some(),
                None => {
                    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace);
                    claims.get_metadata_opt(name).await?.is_some()
                }
            };
            if exists { TargetState::Volume } else { TargetState::Missing }
        }
        // A database member: the Secret holding its connection (see agent::database).
        "Secret" => match Api::<Secret>::namespaced(client.clone(), namespace).get_metadata_opt(name).await? {
            Some(_) => TargetState::Volume,
            None => TargetState::Missing,
        },
        APP_BINDING_KIND => {
            let task = member.task.as_ref().map(|t| t.name.as_str());
            match super::app_binding::resolve(client, namespace, name, task).await? {
                Ok(_) => TargetState::Volume,
                Err(problem) => TargetState::Unusable(problem),
            }
        }
        _ => TargetState::Unsupported,
    })
}

pub struct SidecarStatus {
    pub desired: Desired,
    /// The workload was restarted by this reconcile.
    pub rolled: bool,
}

/// StashSidecarInjected: how many of the workload's Pods carry the sidecar: those among `injected`
/// (the controllers' cache of the Pods the webhook labelled) that its selector matches, of the Pods
/// its status counts. Pods that predate the batch get it through one restart of the workload, never
/// more: later edits of the batch change no pod template (the sidecar reads its configuration at run
/// time).
pub async fn sidecar_status(
    client: &Client,
    injected: &Store<PartialObjectMeta<Pod>>,
    namespace: &str,
    workload: &WorkloadInfo,
    batch: &BackupBatch,
    repository: Option<&Repository>,
) -> Result<SidecarStatus, kube::Error> {
    let Some(selector) = workload.selector.clone().and_then(|s| kube::core::Selector::try_from(s).ok()) else {
        let desired = Desired::new(SIDECAR_INJECTED, false, "NoSelector", "the workload has no usable selector");
        return Ok(SidecarStatus { desired, rolled: false });
    };
    let unlabelled = BTreeMap::new();
    let injected = injected
        .state()
        .iter()
        .filter(|pod| {
            let meta = &pod.metadata;
            meta.namespace.as_deref() == Some(namespace)
                && meta.deletion_timestamp.is_none()
                && selector.matches(meta.labels.as_ref().unwrap_or(&unlabelled))
        })
        .count();
    // The status can lag behind the Pods for a moment.
    let total = usize::try_from(workload.pods).unwrap_or(0).max(injected);
    if injected == total {
        let message = if total == 0 {
            "no Pods yet; they get the sidecar when created".to_string()
        } else {
            format!("{injected} of {total} Pods carry the stash sidecar")
        };
        return Ok(SidecarStatus {
            desired: Desired::new(SIDECAR_INJECTED, true, "SidecarInjected", message),
            rolled: false,
        });
    }
    let already_rolled = workload.template_annotations.contains_key(ROLLOUT_ANNOTATION);
    let rollable =
        matches!(workload.kind, WorkloadKind::Deployment | WorkloadKind::StatefulSet | WorkloadKind::DaemonSet);
    // Every webhook replica must know the batch and its Repository before the restart creates Pods,
    // or they come up without the sidecar and the one restart is spent: a batch applied together with
    // its workload or Repository waits a moment, and one applied before its Repository waits for it.
    let old_enough = |created: Option<&Time>| {
        created.is_none_or(|t| Timestamp::now().duration_since(t.0) >= SignedDuration::from_secs(ROLL_SETTLE_SECONDS))
    };
    let settled = old_enough(batch.metadata.creation_timestamp.as_ref())
        && repository.is_some_and(|r| old_enough(r.metadata.creation_timestamp.as_ref()));
    let rolled = !already_rolled && rollable && settled && roll(client, namespace, workload, batch).await?;
    let message = match (rollable, already_rolled || rolled) {
        (true, false) if repository.is_none() => format!(
            "{injected} of {total} Pods carry the stash sidecar; the workload is restarted once when its Repository is available"
        ),
        (true, false) if !settled => format!(
            "{injected} of {total} Pods carry the stash sidecar; the workload is restarted once in a few seconds"
        ),
        (true, true) => {
            format!("{injected} of {total} Pods carry the stash sidecar; the workload was restarted once to add it")
        }
        (true, false) => format!("{injected} of {total} Pods carry the stash sidecar"),
        (false, _) => format!(
            "{injected} of {total} Pods carry the stash sidecar; a {} is not restarted automatically: delete its Pods to add it",
            workload.kind.as_str()
        ),
    };
    Ok(SidecarStatus { desired: Desired::new(SIDECAR_INJECTED, false, "PodsWithoutSidecar", message), rolled })
}

async fn roll(
    client: &Client,
    namespace: &str,
    workload: &WorkloadInfo,
    batch: &BackupBatch,
) -> Result<bool, kube::Error> {
    let patch = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {ROLLOUT_ANNOTATION: batch.name_any()}}}}});
    let params = PatchParams::default();
    let patch = Patch::Merge(&patch);
    match workload.kind {
        WorkloadKind::Deployment => {
            drop(Api::<Deployment>::namespaced(client.clone(), namespace).patch(&workload.name, &params, &patch).await?)
        }
        WorkloadKind::StatefulSet => drop(
            Api::<StatefulSet>::namespaced(client.clone(), namespace).patch(&workload.name, &params, &patch).await?,
        ),
        WorkloadKind::DaemonSet => {
            drop(Api::<DaemonSet>::namespaced(client.clone(), namespace).patch(&workload.name, &params, &patch).await?)
        }
        WorkloadKind::ReplicaSet | WorkloadKind::ReplicationController => return Ok(false),
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sidecar runs as the Pod's ServiceAccount: the template's, its deprecated alias, else `default`.
    #[test]
    fn a_workload_records_the_service_account_its_pods_run_as() {
        let account = |spec: serde_json::Value| {
            let template: PodTemplateSpec =
                serde_json::from_value(serde_json::json!({"spec": spec})).expect("a template");
            let deployment = Deployment { metadata: kube::core::ObjectMeta::default(), ..Default::default() };
            match workload(WorkloadKind::Deployment, deployment, (1, 0), None, Some(&template)) {
                TargetState::Workload(info) => info.service_account,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(account(serde_json::json!({"containers": []})), "default");
        assert_eq!(account(serde_json::json!({"containers": [], "serviceAccountName": "app"})), "app");
        assert_eq!(account(serde_json::json!({"containers": [], "serviceAccount": "old"})), "old");
    }
}
