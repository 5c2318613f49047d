//! Grants of a Repository to the other namespaces that use it. A namespace's executors and sidecars
//! act as its own ServiceAccounts, whose roles reach that namespace only; so namespace A's Pods can
//! read namespace B's Repository, which B's `usagePolicy` allows A to use, only through a grant in B.
//!
//! A grant is a Role and a RoleBinding in B, bound to A's ServiceAccounts (the group: B's policy
//! admits namespaces, and the sidecar runs as whichever account a workload has). It lets them
//! - `get` that one Repository;
//! - `get`/`update` the namespace's Repositories' Lease (`tenancy::NAMESPACE_LEASE`), which the
//!   operator creates, so that creating the repository, retention and checks are serialised with
//!   every other user's, whatever its namespace.
//!
//! A second Role and RoleBinding let A's executor account alone (`stash-backup`, which finalize Jobs
//! run as) `get`/`patch` the Repository's status, where finalize reports the repository's numbers:
//! not any Pod of A, which could otherwise rewrite B's integrity and silence B's alerts.
//!
//! Nothing else of B: no other object, no create, no Secret (A's Pods mount A's own). The operator
//! makes a grant while a batch or an unfinished restore of A names the Repository and the one
//! authorisation check (`tenancy::authorize_repository`) allows it, and removes it as soon as either
//! stops: `sweep` decides from the caches, poked by every reconcile and every few minutes.

use super::context::{Context, ControllerError, FIELD_MANAGER, ignore_conflict, ignore_missing};
use super::executor_job::BACKUP_SERVICE_ACCOUNT;
use crate::api::common::ObjectReference;
use crate::api::restore_batch::RestorePhase;
use crate::api::{BackupBatch, Repository, RestoreBatch};
use crate::names::{NAME_MAX, bounded};
use crate::tenancy::NAMESPACE_LEASE;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::{ObjectMeta, PartialObjectMeta};
use kube::runtime::reflector::ObjectRef;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Labels a grant with the namespace it lets in (what the operator's grant cache selects).
pub(crate) const REQUESTER_LABEL: &str = "stash.appscode.com/repository-user";
/// The Repository a grant is for (a name may be longer than a label value).
const REPOSITORY_ANNOTATION: &str = "stash.appscode.com/repository";
/// A namespace's labels can stop matching a `Selector` policy with no event the controllers watch.
const SWEEP_EVERY: Duration = Duration::from_secs(300);
/// Sweeps that pokes ask for within this time are done as one.
const SWEEP_COALESCE: Duration = Duration::from_secs(1);

/// Repository `repository` of namespace `namespace`, granted to namespace `requester`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    namespace: String,
    repository: String,
    requester: String,
}

impl Grant {
    /// The grant a batch or restore of `requester` needs to use `repository`: none in its own namespace.
    fn needed(requester: &str, repository: &Repository) -> Option<Grant> {
        let namespace = repository.namespace().filter(|namespace| namespace != requester)?;
        Some(Grant { namespace, repository: repository.name_any(), requester: requester.into() })
    }

    /// The grant a cached RoleBinding of ours stands for.
    fn of(binding: &PartialObjectMeta<RoleBinding>) -> Option<Grant> {
        let meta = &binding.metadata;
        Some(Grant {
            namespace: meta.namespace.clone()?,
            repository: meta.annotations.as_ref()?.get(REPOSITORY_ANNOTATION)?.clone(),
            requester: meta.labels.as_ref()?.get(REQUESTER_LABEL)?.clone(),
        })
    }

    /// The Role's and the RoleBinding's name. A namespace name has no dot, so the last one splits.
    fn name(&self) -> String {
        bounded(&format!("stash-repository-{}.{}", self.repository, self.requester), NAME_MAX)
    }

    /// The name of the Role and RoleBinding of the status, for the executor account alone: a prefix
    /// no name of the other kind starts with, so that no Repository's name makes them meet.
    fn status_name(&self) -> String {
        bounded(&format!("stash-status-{}.{}", self.repository, self.requester), NAME_MAX)
    }

    fn meta(&self, name: String) -> ObjectMeta {
        let labels = [
            (crate::api::PART_OF.0.to_string(), crate::api::PART_OF.1.to_string()),
            (REQUESTER_LABEL.to_string(), self.requester.clone()),
        ];
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels.into()),
            annotations: Some(BTreeMap::from([(REPOSITORY_ANNOTATION.to_string(), self.repository.clone())])),
            ..Default::default()
        }
    }

    /// The group's Role, and the executor account's Role of the status.
    fn roles(&self) -> [Role; 2] {
        let rule = |group: &str, resource: &str, name: String, verbs: &[&str]| PolicyRule {
            api_groups: Some(vec![group.into()]),
            resources: Some(vec![resource.into()]),
            resource_names: Some(vec![name]),
            verbs: verbs.iter().map(|verb| verb.to_string()).collect(),
            ..Default::default()
        };
        let group = crate::api::common::GROUP;
        [
            Role {
                metadata: self.meta(self.name()),
                rules: Some(vec![
                    rule(group, "repositories", self.repository.clone(), &["get"]),
                    rule("coordination.k8s.io", "leases", NAMESPACE_LEASE.into(), &["get", "update"]),
                ]),
            },
            Role {
                metadata: self.meta(self.status_name()),
                rules: Some(vec![rule(group, "repositories/status", self.repository.clone(), &["get", "patch"])]),
            },
        ]
    }

    /// The group's RoleBinding, and the executor account's of the status.
    fn bindings(&self) -> [RoleBinding; 2] {
        let binding = |name: String, subject: Subject| RoleBinding {
            metadata: self.meta(name.clone()),
            role_ref: RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "Role".into(), name },
            subjects: Some(vec![subject]),
        };
        let group = Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Group".into(),
            name: format!("system:serviceaccounts:{}", self.requester),
            namespace: None,
        };
        let executor = Subject {
            api_group: None,
            kind: "ServiceAccount".into(),
            name: BACKUP_SERVICE_ACCOUNT.into(),
            namespace: Some(self.requester.clone()),
        };
        [binding(self.name(), group), binding(self.status_name(), executor)]
    }

    fn reference(&self) -> ObjectReference {
        ObjectReference { name: self.repository.clone(), namespace: Some(self.namespace.clone()) }
    }

    /// Whether a live batch or an unfinished restore of the requester names the Repository.
    fn in_use(&self, batches: &[Arc<BackupBatch>], restores: &[Arc<RestoreBatch>]) -> bool {
        let names = |meta: &ObjectMeta, reference: &ObjectReference| {
            meta.deletion_timestamp.is_none()
                && meta.namespace.as_deref() == Some(self.requester.as_str())
                && reference.name == self.repository
                && crate::tenancy::repository_namespace(&self.requester, reference) == self.namespace
        };
        let finished = |restore: &RestoreBatch| {
            let phase = restore.status.as_ref().and_then(|s| s.phase);
            matches!(phase, Some(RestorePhase::Succeeded | RestorePhase::Failed | RestorePhase::Invalid))
        };
        batches.iter().any(|b| names(&b.metadata, &b.spec.repository))
            || restores.iter().any(|r| !finished(r) && names(&r.metadata, &r.spec.repository))
    }
}

/// Makes the grant `requester` needs to use `repository` (authorised by the caller), unless the cache
/// (or a creation of ours its watch has not shown yet) has it: an existing grant costs no request.
/// Whether `requester` needs one at all (a Repository of another namespace).
pub(crate) async fn ensure(ctx: &Context, requester: &str, repository: &Repository) -> Result<bool, ControllerError> {
    let Some(grant) = Grant::needed(requester, repository) else { return Ok(false) };
    // The status binding came second: a grant made before it still gives the group the status.
    if ctx.caches.identity_present(&ctx.caches.grants, &grant.namespace, &grant.status_name()) {
        return Ok(true);
    }
    // The holder updates the Lease; only its creation needs a right no grant gives.
    let lease = Lease { metadata: ObjectMeta { name: Some(NAMESPACE_LEASE.into()), ..Default::default() }, spec: None };
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &grant.namespace);
    ignore_conflict(leases.create(&PostParams::default(), &lease).await)?;
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let roles: Api<Role> = Api::namespaced(ctx.client.clone(), &grant.namespace);
    for role in grant.roles() {
        roles.patch(&role.name_any(), &apply, &Patch::Apply(&role)).await?;
    }
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), &grant.namespace);
    for binding in grant.bindings() {
        bindings.patch(&binding.name_any(), &apply, &Patch::Apply(&binding)).await?;
        ctx.caches.identity_created::<RoleBinding>(&grant.namespace, &binding.name_any());
    }
    tracing::info!(namespace = %grant.namespace, repository = %grant.repository, requester = %grant.requester,
        "granted the Repository to the namespace's ServiceAccounts");
    Ok(true)
}

/// Removes every grant (of this operator's scope) no longer both used and allowed. Also run by a
/// batch's or restore's cleanup, so that a grant goes before the last object using it does: the
/// coalesced sweep could otherwise come after the operator itself was removed.
pub(crate) async fn sweep(ctx: &Context) -> Result<(), ControllerError> {
    // A grant's two bindings stand for it alike.
    let grants: BTreeSet<Grant> = ctx.caches.grants.state().iter().filter_map(|b| Grant::of(b)).collect();
    if grants.is_empty() {
        return Ok(());
    }
    let (batches, restores) = (ctx.batches.state(), ctx.restores.state());
    for grant in grants {
        let reference = grant.reference();
        let wanted = grant.in_use(&batches, &restores) && {
            let found = ctx.caches.repositories.get(&ObjectRef::new(&grant.repository).within(&grant.namespace));
            crate::tenancy::authorize_found(&ctx.client, &grant.requester, &reference, found.as_deref()).await?.is_ok()
        };
        if !wanted {
            revoke(ctx, &grant).await?;
        }
    }
    Ok(())
}

async fn revoke(ctx: &Context, grant: &Grant) -> Result<(), ControllerError> {
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), &grant.namespace);
    let roles: Api<Role> = Api::namespaced(ctx.client.clone(), &grant.namespace);
    for name in [grant.name(), grant.status_name()] {
        ctx.caches.creation_undone::<RoleBinding>(&grant.namespace, &name);
        ignore_missing(bindings.delete(&name, &Default::default()).await)?;
        ignore_missing(roles.delete(&name, &Default::default()).await)?;
    }
    tracing::info!(namespace = %grant.namespace, repository = %grant.repository, requester = %grant.requester,
        "revoked the Repository's grant: no longer used or no longer allowed");
    Ok(())
}

/// Sweeps whenever a reconcile asks (`Context::sweep`), and every few minutes, until dropped. Not
/// before the caches have listed: an empty cache would read as "no longer used".
pub(crate) async fn keep_swept(ctx: Arc<Context>) {
    if ctx.caches.ready().await.is_err() {
        return;
    }
    loop {
        let _ = tokio::time::timeout(SWEEP_EVERY, ctx.sweep.notified()).await;
        tokio::time::sleep(SWEEP_COALESCE).await;
        if let Err(err) = sweep(&ctx).await {
            tracing::warn!(error = %err, "sweeping the Repository grants failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn repository(namespace: &str, name: &str) -> Repository {
        let mut repository: Repository = serde_json::from_value(json!({
            "apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"backend": {"s3": {"bucket": "b", "endpoint": "http://s3"}}}
        }))
        .expect("a Repository");
        repository.metadata.namespace = Some(namespace.into());
        repository
    }

    fn batch(namespace: &str, repository: serde_json::Value, deleting: bool) -> Arc<BackupBatch> {
        let mut batch: BackupBatch = serde_json::from_value(json!({
            "apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupBatch",
            "metadata": {"name": "b", "namespace": namespace},
            "spec": {"repository": repository, "members": []}
        }))
        .expect("a batch");
        if deleting {
            batch.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        }
        Arc::new(batch)
    }

    fn restore(namespace: &str, repository: serde_json::Value, phase: Option<&str>) -> Arc<RestoreBatch> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "stash.appscode.com/v1beta1", "kind": "RestoreBatch",
                "metadata": {"name": "r", "namespace": namespace},
                "spec": {"repository": repository, "members": []},
                "status": {"phase": phase}
            }))
            .expect("a restore"),
        )
    }

    #[test]
    fn only_another_namespaces_repository_needs_a_grant() {
        assert_eq!(Grant::needed("platform", &repository("platform", "repo")), None);
        let grant = Grant::needed("tenant", &repository("platform", "repo")).expect("a grant");
        assert_eq!((grant.namespace.as_str(), grant.requester.as_str()), ("platform", "tenant"));
    }

    /// The Role reaches the one Repository, its status and its Lease, nothing else, and only the
    /// requester's ServiceAccounts hold it; the cached binding reads back as the same grant.
    #[test]
    fn a_grant_reaches_one_repository_and_its_lease_for_one_namespace() {
        let grant = Grant::needed("tenant", &repository("platform", "repo")).expect("a grant");
        let [role, status_role] = grant.roles().map(|r| serde_json::to_value(r).expect("JSON"));
        assert_eq!(
            role["rules"],
            json!([
                {"apiGroups": ["stash.appscode.com"], "resources": ["repositories"], "resourceNames": ["repo"], "verbs": ["get"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["stash-repositories"], "verbs": ["get", "update"]},
            ])
        );
        // Only the executor account reports the Repository's numbers: any other Pod of the tenant
        // could rewrite the platform's integrity and silence its alerts.
        assert_eq!(
            status_role["rules"],
            json!([{"apiGroups": ["stash.appscode.com"], "resources": ["repositories/status"], "resourceNames": ["repo"], "verbs": ["get", "patch"]}])
        );
        let [binding, status_binding] = grant.bindings();
        let subject = |binding: &RoleBinding| {
            let subjects = binding.subjects.clone().expect("subjects");
            assert_eq!(subjects.len(), 1);
            (subjects[0].kind.clone(), subjects[0].name.clone(), subjects[0].namespace.clone())
        };
        assert_eq!(subject(&binding), ("Group".into(), "system:serviceaccounts:tenant".into(), None));
        assert_eq!(subject(&status_binding), ("ServiceAccount".into(), "stash-backup".into(), Some("tenant".into())));
        assert_eq!((binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()), ("Role", grant.name().as_str()));
        assert_eq!(status_binding.role_ref.name, grant.status_name());
        for binding in [binding, status_binding] {
            let cached = PartialObjectMeta::<RoleBinding> { metadata: binding.metadata, ..Default::default() };
            assert_eq!(Grant::of(&cached).as_ref(), Some(&grant));
        }
    }

    #[test]
    fn grants_of_distinct_repositories_or_namespaces_have_distinct_names() {
        let named = |name: &str, requester: &str| {
            Grant::needed(requester, &repository("platform", name)).expect("a grant").name()
        };
        assert_ne!(named("a-for-b", "c"), named("a", "b-for-c"));
        assert_ne!(named("x.y", "z"), named("x", "y-z"));
        assert!(named(&"r".repeat(253), "tenant").len() <= NAME_MAX);
        let grant = |name: &str| Grant::needed("tenant", &repository("platform", name)).expect("a grant");
        assert_ne!(grant("status-x").name(), grant("x").status_name());
        assert_ne!(grant("x").name(), grant("x").status_name());
    }

    /// A grant is used while a live batch or an unfinished restore of the requester names that
    /// Repository of that namespace; nothing of another namespace or Repository keeps it.
    #[test]
    fn a_grant_is_used_only_by_the_requesters_live_batches_and_unfinished_restores() {
        let grant = Grant::needed("tenant", &repository("platform", "repo")).expect("a grant");
        let shared = json!({"name": "repo", "namespace": "platform"});
        let used = |batches: &[Arc<BackupBatch>], restores: &[Arc<RestoreBatch>]| grant.in_use(batches, restores);
        assert!(used(&[batch("tenant", shared.clone(), false)], &[]));
        assert!(!used(&[batch("tenant", shared.clone(), true)], &[]), "a batch being deleted");
        assert!(!used(&[batch("tenant", json!({"name": "repo"}), false)], &[]), "its own namespace's repo");
        assert!(!used(&[batch("other", shared.clone(), false)], &[]), "another namespace's batch");
        assert!(!used(&[batch("tenant", json!({"name": "else", "namespace": "platform"}), false)], &[]));
        assert!(used(&[], &[restore("tenant", shared.clone(), Some("Running"))]));
        assert!(used(&[], &[restore("tenant", shared.clone(), None)]), "a restore not started yet");
        assert!(!used(&[], &[restore("tenant", shared.clone(), Some("Succeeded"))]), "a finished restore");
        assert!(!used(&[], &[restore("tenant", shared, Some("Failed"))]));
    }
}
