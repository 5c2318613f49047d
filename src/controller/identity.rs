//! The namespace's executor and trigger identities: ensured by every BackupBatch and RestoreBatch
//! (executor Jobs of a schedule-less batch or a lone restore need them too), removed with the last.

use super::context::{Context, ControllerError, ignore_conflict, ignore_missing};
use super::executor_job::BACKUP_SERVICE_ACCOUNT;
use super::targets::WorkloadInfo;
use super::trigger::{BACKUP_CLUSTER_ROLE, TRIGGER_CLUSTER_ROLE, TRIGGER_SERVICE_ACCOUNT};
use crate::api::RestoreBatch;
use crate::names::NAME_MAX;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use kube::core::{ObjectMeta, PartialObjectMeta};
use kube::runtime::reflector::Store;

const IDENTITIES: [(&str, &str); 2] =
    [(TRIGGER_SERVICE_ACCOUNT, TRIGGER_CLUSTER_ROLE), (BACKUP_SERVICE_ACCOUNT, BACKUP_CLUSTER_ROLE)];
/// Names the RoleBindings of workload ServiceAccounts (the namespace's own identities are named
/// after their account, so never start with it).
const WORKLOAD_BINDING_PREFIX: &str = "stash-sidecar-";

/// Our objects in a namespace, labelled so that release finds them.
fn identity_meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        labels: Some([(crate::api::PART_OF.0.to_string(), crate::api::PART_OF.1.to_string())].into()),
        ..Default::default()
    }
}

/// RoleBinding `name` of `cluster_role` to ServiceAccount `account` of `namespace`.
fn binding(namespace: &str, name: &str, account: &str, cluster_role: &str) -> RoleBinding {
    RoleBinding {
        metadata: identity_meta(namespace, name),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: cluster_role.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: account.into(),
            namespace: Some(namespace.into()),
            ..Default::default()
        }]),
    }
}

/// A per-namespace ServiceAccount bound to one of our ClusterRoles (deploy/base/rbac.yaml), shared by
/// every batch and restore of the namespace. (Owning it by every batch made these two objects collect
/// one ownerReference and one field manager per batch: with hundreds of batches every write to them
/// timed out — see BENCHMARKS.md.)
fn namespace_identity(namespace: &str, account: &str, cluster_role: &str) -> (ServiceAccount, RoleBinding) {
    let service_account = ServiceAccount { metadata: identity_meta(namespace, account), ..Default::default() };
    (service_account, binding(namespace, account, account, cluster_role))
}

/// The binding of the sidecar's role to a workload's ServiceAccount.
fn workload_binding(namespace: &str, account: &str) -> RoleBinding {
    let name = crate::names::bounded(&format!("{WORKLOAD_BINDING_PREFIX}{account}"), NAME_MAX);
    binding(namespace, &name, account, BACKUP_CLUSTER_ROLE)
}

/// Creates `object` unless the cache (or a creation of ours its watch has not shown yet) has it:
/// an existing identity costs no request. Creations are serialised, so that a namespace's batches
/// reconciled together create each identity once instead of racing to it.
async fn create_once<K>(ctx: &Context, store: &Store<PartialObjectMeta<K>>, object: &K) -> Result<(), kube::Error>
where
    K: kube::Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + 'static,
{
    let (namespace, name) = (object.namespace().unwrap_or_default(), object.name_any());
    if ctx.caches.identity_present(store, &namespace, &name) {
        return Ok(());
    }
    let _creating = ctx.caches.creating.lock().await;
    if ctx.caches.identity_present(store, &namespace, &name) {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    ignore_conflict(api.create(&PostParams::default(), object).await)?;
    ctx.caches.identity_created::<K>(&namespace, &name);
    Ok(())
}

/// Creates the identities once.
pub(crate) async fn ensure(ctx: &Context, namespace: &str) -> Result<(), ControllerError> {
    for (account, role) in IDENTITIES {
        let (service_account, binding) = namespace_identity(namespace, account, role);
        create_once(ctx, &ctx.caches.accounts, &service_account).await?;
        create_once(ctx, &ctx.caches.bindings, &binding).await?;
    }
    Ok(())
}

/// The injected sidecar is a container of the workload's Pod, so it runs as the Pod's ServiceAccount
/// (`default` when unset): that account gets the sidecar's role in the namespace, once.
/// The application can then write BackupSession status too, and so forge a host entry. That cannot
/// make a manifest: finalize writes one only after finding every reported snapshot in the repository
/// with this session's tags (agent::retention::manifest_of), so retention never trusts a forged entry.
pub(crate) async fn ensure_workload(
    ctx: &Context,
    namespace: &str,
    workload: &WorkloadInfo,
) -> Result<(), ControllerError> {
    create_once(ctx, &ctx.caches.bindings, &workload_binding(namespace, &workload.service_account)).await?;
    Ok(())
}

/// Removes the identities when the object `leaving` (uid) was the namespace's last live batch or
/// restore.
pub(crate) async fn release(ctx: &Context, namespace: &str, leaving: Option<&str>) -> Result<(), ControllerError> {
    let batches = ctx.batches.state();
    let restores = Api::<RestoreBatch>::namespaced(ctx.client.clone(), namespace).list(&ListParams::default()).await?;
    let users = batches
        .iter()
        .filter(|b| b.namespace().as_deref() == Some(namespace))
        .map(|b| &b.metadata)
        .chain(restores.items.iter().map(|r| &r.metadata));
    if still_used(users, leaving) {
        return Ok(());
    }
    ctx.caches.identities_released(namespace);
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), namespace);
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), namespace);
    for (account, _) in IDENTITIES {
        ignore_missing(bindings.delete(account, &Default::default()).await)?;
        ignore_missing(accounts.delete(account, &Default::default()).await)?;
    }
    let ours = ListParams::default().labels(&format!("{}={}", crate::api::PART_OF.0, crate::api::PART_OF.1));
    for workload in bindings.list(&ours).await?.items.iter().filter(|b| is_workload_binding(b)) {
        ignore_missing(bindings.delete(&workload.name_any(), &Default::default()).await)?;
    }
    Ok(())
}

fn is_workload_binding(binding: &RoleBinding) -> bool {
    binding.name_any().starts_with(WORKLOAD_BINDING_PREFIX) && binding.role_ref.name == BACKUP_CLUSTER_ROLE
}

/// Any user other than `leaving` that is not being deleted.
fn still_used<'a>(mut users: impl Iterator<Item = &'a ObjectMeta>, leaving: Option<&str>) -> bool {
    users.any(|meta| meta.uid.as_deref() != leaving && meta.deletion_timestamp.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn meta(uid: &str, deleting: bool) -> ObjectMeta {
        let deletion_timestamp = deleting.then_some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        ObjectMeta { uid: Some(uid.into()), deletion_timestamp, ..Default::default() }
    }

    #[test]
    fn identities_stay_while_another_live_batch_or_restore_needs_them() {
        let leaving = Some("gone");
        assert!(!still_used([].iter(), leaving), "nothing left");
        assert!(!still_used([meta("gone", true)].iter(), leaving), "only the leaving one");
        assert!(!still_used([meta("gone", true), meta("other", true)].iter(), leaving), "others are going too");
        assert!(still_used([meta("gone", true), meta("restore", false)].iter(), leaving), "a live restore");
    }

    #[test]
    fn the_identity_binds_the_namespace_account_to_its_cluster_role() {
        let (account, binding) = namespace_identity("demo", BACKUP_SERVICE_ACCOUNT, BACKUP_CLUSTER_ROLE);
        assert_eq!(account.metadata.namespace.as_deref(), Some("demo"));
        assert_eq!(binding.role_ref.name, BACKUP_CLUSTER_ROLE);
        let subject = &binding.subjects.as_ref().expect("a subject")[0];
        assert_eq!((subject.name.as_str(), subject.namespace.as_deref()), (BACKUP_SERVICE_ACCOUNT, Some("demo")));
        assert!(!is_workload_binding(&binding), "release tells the two kinds apart");
    }

    #[test]
    fn a_workload_account_gets_a_bounded_sidecar_binding_found_by_release() {
        let binding = workload_binding("demo", &"a".repeat(300));
        assert!(binding.name_any().len() <= NAME_MAX);
        assert_eq!(binding.role_ref.name, BACKUP_CLUSTER_ROLE);
        assert!(is_workload_binding(&binding));
    }
}
