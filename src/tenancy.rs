//! The one Repository authorisation check (DESIGN §6b invariant 5): may namespace A use the Repository
//! its batch or restore names? Webhook, controllers and executors all ask `authorize_repository`.

use crate::api::common::ObjectReference;
use crate::api::repository::{FromNamespaces, Repository};
use k8s_openapi::api::core::v1::Namespace;
use kube::core::{Selector, SelectorExt};
use kube::{Api, Client, ResourceExt};
use std::collections::BTreeMap;

/// Why a Repository may not be used. A foreign Repository that is missing and one that refuses read
/// the same, so that naming other namespaces' objects reveals nothing about them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("Repository {namespace}/{name} does not exist")]
    NotFound { namespace: String, name: String },
    #[error(
        "Repository {namespace}/{name} does not exist or does not allow use from namespace {requester} (spec.usagePolicy)"
    )]
    NotAllowed { namespace: String, name: String, requester: String },
    /// Stored before the schema demanded a volume (the API server had pruned a kind it did not list).
    #[error(
        "Repository {namespace}/{name}: spec.backend.local names no volume; Kubernetes would mount an emptyDir \
         and the backups would go with the Pod"
    )]
    NoVolume { namespace: String, name: String },
}

impl Refusal {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotFound { .. } => "RepositoryNotFound",
            Refusal::NotAllowed { .. } => "RepositoryNotAllowed",
            Refusal::NoVolume { .. } => "LocalVolumeMissing",
        }
    }
}

/// The namespace `reference` points into, seen from `requester`.
pub(crate) fn repository_namespace<'a>(requester: &'a str, reference: &'a ObjectReference) -> &'a str {
    reference.namespace.as_deref().unwrap_or(requester)
}

/// `repository` (what was found under `reference`, if anything) when `requester` may use it.
///
/// Same namespace: always. Another namespace: only as `spec.usagePolicy.allowedNamespaces` says —
/// `Same` (the default) never, `All` always, `Selector` when the requester's labels match the whole
/// selector. Unknown labels (`None`) and a missing, empty or unparsable selector refuse. A `local`
/// Repository without a volume is refused wherever it is: it could hold no backup.
pub(crate) fn authorize_repository<'r>(
    requester: &str,
    reference: &ObjectReference,
    repository: Option<&'r Repository>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Result<&'r Repository, Refusal> {
    let namespace = repository_namespace(requester, reference);
    let name = reference.name.clone();
    let repository = if namespace == requester {
        repository.ok_or_else(|| Refusal::NotFound { namespace: namespace.to_string(), name: name.clone() })?
    } else {
        permitted_from_elsewhere(requester, namespace, &name, repository, namespace_labels)?
    };
    if repository.spec.backend.local.as_ref().is_some_and(|local| !local.has_volume()) {
        return Err(Refusal::NoVolume { namespace: namespace.to_string(), name });
    }
    Ok(repository)
}

/// `repository` of another namespace, as its `spec.usagePolicy` lets `requester` use it.
fn permitted_from_elsewhere<'r>(
    requester: &str,
    namespace: &str,
    name: &str,
    repository: Option<&'r Repository>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Result<&'r Repository, Refusal> {
    let refused = || Refusal::NotAllowed {
        namespace: namespace.to_string(),
        name: name.to_string(),
        requester: requester.into(),
    };
    let repository = repository.ok_or_else(refused)?;
    let allowed = repository.spec.usage_policy.as_ref().and_then(|p| p.allowed_namespaces.as_ref());
    let permitted = match allowed.map(|a| a.from) {
        None | Some(FromNamespaces::Same) => false,
        Some(FromNamespaces::All) => true,
        Some(FromNamespaces::Selector) => {
            let selector = allowed.and_then(|a| a.selector.clone()).map(Selector::try_from);
            match (selector, namespace_labels) {
                // An empty selector would select everything; here it selects nothing, as a missing one.
                (Some(Ok(selector)), Some(labels)) => !selector.selects_all() && selector.matches(labels),
                _ => false,
            }
        }
    };
    if permitted { Ok(repository) } else { Err(refused()) }
}

/// A namespace's one Lease of its Repositories: every creation of one, and all the repository-wide
/// work on those that other namespaces may use. The operator may grant another namespace only a
/// Lease it holds itself, and of Leases it holds only this name anywhere (so that it can take over
/// no one else's): hence one for all of them.
pub(crate) const NAMESPACE_LEASE: &str = "stash-repositories";

/// What a repository's Lease serialises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseFor {
    /// `restic init`, which two hosts must never run at once.
    Creation,
    /// Retention and checks. restic's locks guard one command each; the Lease keeps whole finalizes
    /// (list, plan, write the manifest, forget) one at a time, which retention's proofs assume, so
    /// maintenance never goes on without it.
    Maintenance,
}

/// The Lease, in `repository`'s namespace, under which every user of it does `work`, whatever
/// namespace it runs in. Creation: `NAMESPACE_LEASE` whatever the policy, because executors that
/// read the Repository before its policy changed must take the same Lease as those that read it
/// after. Maintenance: one Lease per Repository that only its own namespace uses, else
/// `NAMESPACE_LEASE`.
pub(crate) fn repository_lease(repository: &Repository, work: LeaseFor) -> String {
    let from = repository.spec.usage_policy.as_ref().and_then(|p| p.allowed_namespaces.as_ref()).map(|a| a.from);
    match (work, from) {
        (LeaseFor::Maintenance, None | Some(FromNamespaces::Same)) => {
            crate::names::bounded(&format!("stash-repository-{}", repository.name_any()), crate::names::NAME_MAX)
        }
        _ => NAMESPACE_LEASE.into(),
    }
}

/// Whether deciding needs the requester's namespace labels: a foreign Repository with a `Selector`
/// policy. Everything else is decided without reading the Namespace.
fn needs_labels(requester: &str, repository: &Repository) -> bool {
    let from = repository.spec.usage_policy.as_ref().and_then(|p| p.allowed_namespaces.as_ref()).map(|a| a.from);
    repository.namespace().as_deref() != Some(requester) && from == Some(FromNamespaces::Selector)
}

/// Reads the Repository `reference` names (and, only when the policy needs them, the requester's
/// namespace labels) and authorises it: the I/O edge for the controllers and the executors.
pub(crate) async fn fetch_repository(
    client: &Client,
    requester: &str,
    reference: &ObjectReference,
) -> Result<Result<Repository, Refusal>, kube::Error> {
    let namespace = repository_namespace(requester, reference);
    let repository = Api::<Repository>::namespaced(client.clone(), namespace).get_opt(&reference.name).await?;
    authorize_found(client, requester, reference, repository.as_ref()).await
}

/// Authorises `repository`, what was found under `reference` (read by the caller, or from a cache),
/// reading the requester's namespace labels only when the policy needs them.
pub(crate) async fn authorize_found(
    client: &Client,
    requester: &str,
    reference: &ObjectReference,
    repository: Option<&Repository>,
) -> Result<Result<Repository, Refusal>, kube::Error> {
    let labels = match repository {
        Some(repository) if needs_labels(requester, repository) => Api::<Namespace>::all(client.clone())
            .get_metadata_opt(requester)
            .await?
            .map(|n| n.metadata.labels.unwrap_or_default()),
        _ => None,
    };
    Ok(authorize_repository(requester, reference, repository, labels.as_ref()).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::collections::BTreeSet;

    fn repository(namespace: &str, policy: Value) -> Repository {
        let mut spec = json!({"backend": {"storageSecretName": "s", "local": {"mountPath": "/repo", "nfs": {"server": "nfs.b", "path": "/b"}}}});
        if !policy.is_null() {
            spec["usagePolicy"] = policy;
        }
        serde_json::from_value(json!({
            "apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
            "metadata": {"name": "repo", "namespace": namespace}, "spec": spec
        }))
        .expect("a Repository")
    }

    fn reference(namespace: Option<&str>) -> ObjectReference {
        ObjectReference { name: "repo".into(), namespace: namespace.map(Into::into) }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn selector(selector: Value) -> Value {
        json!({"allowedNamespaces": {"from": "Selector", "selector": selector}})
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> Value {
        if values.is_empty() {
            json!({"matchExpressions": [{"key": key, "operator": operator}]})
        } else {
            json!({"matchExpressions": [{"key": key, "operator": operator, "values": values}]})
        }
    }

    /// A namespace's labels, when known.
    type KnownLabels = Option<&'static [(&'static str, &'static str)]>;

    /// Namespace `a` asks for `b/repo` under `policy`, with `a`'s labels.
    fn allowed_from_a(policy: Value, a_labels: KnownLabels) -> bool {
        let repo = repository("b", policy);
        let a_labels = a_labels.map(labels);
        let decision = authorize_repository("a", &reference(Some("b")), Some(&repo), a_labels.as_ref());
        match decision {
            Ok(found) => {
                assert!(std::ptr::eq(found, &repo), "the Repository found is the one returned");
                true
            }
            Err(refusal) => {
                assert_eq!(
                    refusal,
                    Refusal::NotAllowed { namespace: "b".into(), name: "repo".into(), requester: "a".into() }
                );
                false
            }
        }
    }

    #[test]
    fn same_namespace_is_always_allowed_whatever_the_policy() {
        for policy in
            [Value::Null, json!({"allowedNamespaces": {"from": "Same"}}), selector(json!({"matchLabels": {"x": "y"}}))]
        {
            let repo = repository("a", policy);
            for reference in [reference(None), reference(Some("a"))] {
                let found = authorize_repository("a", &reference, Some(&repo), None).expect("allowed");
                assert!(std::ptr::eq(found, &repo));
            }
        }
    }

    /// Issue 12: a Repository stored while the API server pruned volume kinds it did not list
    /// is refused, never backed up into the emptyDir Kubernetes would mount in its place.
    #[test]
    fn a_local_repository_without_a_volume_is_refused_by_name() {
        let mut repo = repository("a", Value::Null);
        repo.spec.backend.local = serde_json::from_value(json!({"mountPath": "/repo"})).expect("a local backend");
        let refusal = authorize_repository("a", &reference(None), Some(&repo), None).expect_err("refused");
        assert_eq!(refusal.reason(), "LocalVolumeMissing");
        assert!(refusal.to_string().contains("spec.backend.local names no volume"), "{refusal}");
        let elsewhere = repository("b", json!({"allowedNamespaces": {"from": "All"}}));
        assert!(authorize_repository("a", &reference(Some("b")), Some(&elsewhere), None).is_ok());
    }

    #[test]
    fn a_missing_repository_of_the_own_namespace_is_not_found() {
        let refusal = authorize_repository("a", &reference(None), None, None).expect_err("refused");
        assert_eq!(refusal.reason(), "RepositoryNotFound");
        assert_eq!(refusal.to_string(), "Repository a/repo does not exist");
    }

    #[test]
    fn another_namespace_follows_allowed_namespaces() {
        let team_b = Some(&[("team", "b"), ("env", "prod")][..]);
        let no_labels = Some(&[][..]);
        let table: Vec<(&str, Value, KnownLabels, bool)> = vec![
            ("no usagePolicy", Value::Null, team_b, false),
            ("no allowedNamespaces", json!({}), team_b, false),
            ("from omitted means Same", json!({"allowedNamespaces": {}}), team_b, false),
            ("Same", json!({"allowedNamespaces": {"from": "Same"}}), team_b, false),
            ("All", json!({"allowedNamespaces": {"from": "All"}}), team_b, true),
            ("All, labels unknown", json!({"allowedNamespaces": {"from": "All"}}), None, true),
            ("Selector without selector", json!({"allowedNamespaces": {"from": "Selector"}}), team_b, false),
            ("Selector with an empty selector", selector(json!({})), team_b, false),
            ("Selector with empty lists", selector(json!({"matchLabels": {}, "matchExpressions": []})), team_b, false),
            ("matchLabels match", selector(json!({"matchLabels": {"team": "b"}})), team_b, true),
            ("matchLabels differ", selector(json!({"matchLabels": {"team": "c"}})), team_b, false),
            ("matchLabels, key missing", selector(json!({"matchLabels": {"team": "b"}})), no_labels, false),
            (
                "matchLabels, all must match",
                selector(json!({"matchLabels": {"team": "b", "env": "dev"}})),
                team_b,
                false,
            ),
            ("labels unknown", selector(json!({"matchLabels": {"team": "b"}})), None, false),
            ("In matches", selector(expression("team", "In", &["a", "b"])), team_b, true),
            ("In does not match", selector(expression("team", "In", &["b-only"])), team_b, false),
            ("In, key missing", selector(expression("team", "In", &["b"])), no_labels, false),
            ("NotIn matches", selector(expression("team", "NotIn", &["c"])), team_b, true),
            ("NotIn does not match", selector(expression("team", "NotIn", &["b"])), team_b, false),
            ("NotIn, key missing", selector(expression("team", "NotIn", &["b"])), no_labels, true),
            ("Exists", selector(expression("team", "Exists", &[])), team_b, true),
            ("Exists, key missing", selector(expression("team", "Exists", &[])), no_labels, false),
            ("DoesNotExist", selector(expression("owner", "DoesNotExist", &[])), team_b, true),
            ("DoesNotExist, key present", selector(expression("team", "DoesNotExist", &[])), team_b, false),
            ("unknown operator", selector(expression("team", "Like", &["b"])), team_b, false),
            (
                "matchLabels and matchExpressions both hold",
                selector(
                    json!({"matchLabels": {"team": "b"}, "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}),
                ),
                team_b,
                true,
            ),
            (
                "matchLabels hold, matchExpressions do not",
                selector(
                    json!({"matchLabels": {"team": "b"}, "matchExpressions": [{"key": "env", "operator": "In", "values": ["dev"]}]}),
                ),
                team_b,
                false,
            ),
            (
                "matchExpressions hold, matchLabels do not",
                selector(
                    json!({"matchLabels": {"team": "c"}, "matchExpressions": [{"key": "env", "operator": "Exists"}]}),
                ),
                team_b,
                false,
            ),
        ];
        for (case, policy, a_labels, expected) in table {
            assert_eq!(allowed_from_a(policy, a_labels), expected, "{case}");
        }
    }

    #[test]
    fn a_missing_foreign_repository_reads_exactly_like_a_refused_one() {
        let refused = repository("b", Value::Null);
        let a = labels(&[("team", "a")]);
        let missing = authorize_repository("a", &reference(Some("b")), None, Some(&a)).expect_err("refused");
        let denied = authorize_repository("a", &reference(Some("b")), Some(&refused), Some(&a)).expect_err("refused");
        assert_eq!(missing, denied);
        assert_eq!(missing.reason(), "RepositoryNotAllowed");
        assert_eq!(missing.to_string(), denied.to_string());
    }

    /// Every user of a Repository that others may use maintains it under the namespace's one Lease,
    /// the only one the operator may grant; one used by its own namespace only keeps a Lease of its own.
    #[test]
    fn a_repository_others_may_use_is_maintained_under_the_namespace_lease() {
        let repo = |policy: Value| repository("b", policy);
        assert_eq!(repository_lease(&repo(Value::Null), LeaseFor::Maintenance), "stash-repository-repo");
        assert_eq!(
            repository_lease(&repo(json!({"allowedNamespaces": {"from": "Same"}})), LeaseFor::Maintenance),
            "stash-repository-repo"
        );
        assert_eq!(
            repository_lease(&repo(json!({"allowedNamespaces": {"from": "All"}})), LeaseFor::Maintenance),
            NAMESPACE_LEASE
        );
        let selector = json!({"allowedNamespaces": {"from": "Selector", "selector": {"matchLabels": {"a": "b"}}}});
        assert_eq!(repository_lease(&repo(selector), LeaseFor::Maintenance), NAMESPACE_LEASE);
    }

    /// Two hosts running `restic init` at once leave a repository that a key of one of them cannot
    /// open. A Repository's policy may change while executors run, some having read it before: so
    /// the Lease of its creation must not depend on the policy.
    #[test]
    fn a_repository_is_created_under_one_lease_whatever_its_policy() {
        let selector = json!({"allowedNamespaces": {"from": "Selector", "selector": {"matchLabels": {"a": "b"}}}});
        let policies = [
            Value::Null,
            json!({"allowedNamespaces": {"from": "Same"}}),
            json!({"allowedNamespaces": {"from": "All"}}),
            selector,
        ];
        let created = |policy| repository_lease(&repository("b", policy), LeaseFor::Creation);
        let leases: BTreeSet<String> = policies.into_iter().map(created).collect();
        assert_eq!(leases.len(), 1, "{leases:?}");
    }

    #[test]
    fn labels_are_needed_only_for_a_foreign_selector_policy() {
        let selector = selector(json!({"matchLabels": {"team": "b"}}));
        assert!(needs_labels("a", &repository("b", selector.clone())));
        assert!(!needs_labels("b", &repository("b", selector)));
        assert!(!needs_labels("a", &repository("b", json!({"allowedNamespaces": {"from": "All"}}))));
        assert!(!needs_labels("a", &repository("b", Value::Null)));
    }
}
