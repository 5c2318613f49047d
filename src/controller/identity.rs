//! The namespace's executor and trigger identities: ensured by every BackupBatch and RestoreBatch
//! (executor Jobs of a schedule-less batch or a lone restore need them too), removed with the last.

use super::context::{Context, ControllerError};
use super::executor_job::BACKUP_SERVICE_ACCOUNT;
use super::trigger::{BACKUP_CLUSTER_ROLE, TRIGGER_CLUSTER_ROLE, TRIGGER_SERVICE_ACCOUNT};
use crate::api::RestoreBatch;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use kube::core::ObjectMeta;

const IDENTITIES: [(&str, &str); 2] =
    [(TRIGGER_SERVICE_ACCOUNT, TRIGGER_CLUSTER_ROLE), (BACKUP_SERVICE_ACCOUNT, BACKUP_CLUSTER_ROLE)];

/// A per-namespace ServiceAccount bound to one of our ClusterRoles (deploy/base/rbac.yaml), shared by
/// every batch and restore of the namespace. (Owning it by every batch made these two objects collect
/// one ownerReference and one field manager per batch: with hundreds of batches every write to them
/// timed out — see BENCHMARKS.md.)
fn namespace_identity(namespace: &str, account: &str, cluster_role: &str) -> (ServiceAccount, RoleBinding) {
    let meta = || ObjectMeta {
        name: Some(account.into()),
        namespace: Some(namespace.into()),
        labels: Some([(crate::api::PART_OF.0.to_string(), crate::api::PART_OF.1.to_string())].into()),
        ..Default::default()
    };
    let service_account = ServiceAccount { metadata: meta(), ..Default::default() };
    let binding = RoleBinding {
        metadata: meta(),
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
    };
    (service_account, binding)
}

/// Creates the identities once; an existing one costs a read, never a write.
pub(crate) async fn ensure(ctx: &Context, namespace: &str) -> Result<(), ControllerError> {
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), namespace);
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), namespace);
    for (account, role) in IDENTITIES {
        let (service_account, binding) = namespace_identity(namespace, account, role);
        if accounts.get_opt(account).await?.is_none() {
            ignore_conflict(accounts.create(&PostParams::default(), &service_account).await)?;
        }
        if bindings.get_opt(account).await?.is_none() {
            ignore_conflict(bindings.create(&PostParams::default(), &binding).await)?;
        }
    }
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
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), namespace);
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), namespace);
    for (account, _) in IDENTITIES {
        ignore_missing(bindings.delete(account, &Default::default()).await)?;
        ignore_missing(accounts.delete(account, &Default::default()).await)?;
    }
    Ok(())
}

/// Any user other than `leaving` that is not being deleted.
fn still_used<'a>(mut users: impl Iterator<Item = &'a ObjectMeta>, leaving: Option<&str>) -> bool {
    users.any(|meta| meta.uid.as_deref() != leaving && meta.deletion_timestamp.is_none())
}

/// Another batch created it meanwhile: just as good.
fn ignore_conflict<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(err) => Err(err),
    }
}

fn ignore_missing<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
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
    }
}
