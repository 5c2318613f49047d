//! Whose CRDs these are. Stash's and ours share the names `*.stash.appscode.com`; objects of another
//! installation's schema are not ours to run. The operator takes no traffic and runs no controller
//! until every CRD it serves is ours, and says which is not, and whose it looks like.

use crate::admin::Readiness;
use crate::api::{PART_OF, crds};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client, ResourceExt};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a missing or foreign CRD is looked at again.
const RECHECK: Duration = Duration::from_secs(30);

/// What is installed under one of our CRD names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Installed {
    Ours,
    Missing,
    /// Another installation's, with what its labels and annotations say about it.
    Foreign(String),
}

/// Judges the object found under a CRD name: ours carries the `part-of` label our CRDs are built with.
pub(crate) fn judge(found: Option<&CustomResourceDefinition>) -> Installed {
    let Some(crd) = found else { return Installed::Missing };
    let labels = crd.labels();
    if labels.get(PART_OF.0).map(String::as_str) == Some(PART_OF.1) {
        return Installed::Ours;
    }
    let annotations = crd.annotations();
    let mut hints = Vec::new();
    if labels.get("app.kubernetes.io/name").map(String::as_str) == Some("stash") {
        hints.push("AppsCode Stash's (label app.kubernetes.io/name=stash)".to_string());
    }
    if let Some(release) = annotations.get("meta.helm.sh/release-name") {
        let namespace = annotations.get("meta.helm.sh/release-namespace").map_or("", String::as_str);
        hints.push(format!("Helm release {namespace}/{release}"));
    } else if let Some(manager) = labels.get("app.kubernetes.io/managed-by") {
        hints.push(format!("managed by {manager}"));
    }
    if hints.is_empty() {
        hints.push(format!("no label {}={}", PART_OF.0, PART_OF.1));
    }
    Installed::Foreign(hints.join(", "))
}

/// The CRD names that are not ours, each with why; empty when all are.
pub(crate) async fn problems(client: &Client) -> Result<Vec<String>, kube::Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut problems = Vec::new();
    for wanted in crds() {
        let name = wanted.name_any();
        match judge(api.get_opt(&name).await?.as_ref()) {
            Installed::Ours => {}
            Installed::Missing => problems.push(format!("{name} is not installed (apply deploy/crds)")),
            Installed::Foreign(hint) => problems.push(format!(
                "{name} belongs to another installation ({hint}); uninstall it first (README: Migrating from Stash)"
            )),
        }
    }
    Ok(problems)
}

/// Returns once every CRD is ours (marking `readiness`), or when cancelled; says what is wrong
/// until then, once per change.
pub(crate) async fn wait_until_ours(client: &Client, readiness: &Readiness, cancel: &CancellationToken) -> bool {
    let mut said = None;
    loop {
        match problems(client).await {
            Ok(problems) if problems.is_empty() => {
                readiness.crds_ours.store(true, Ordering::Release);
                return true;
            }
            Ok(problems) => {
                if said.as_ref() != Some(&problems) {
                    for problem in &problems {
                        tracing::error!(%problem, "not serving: a CRD is not ours");
                    }
                    said = Some(problems);
                }
            }
            Err(err) => tracing::warn!(error = %err, "reading the CRDs"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn crd(metadata: serde_json::Value) -> CustomResourceDefinition {
        serde_json::from_value(json!({"metadata": metadata, "spec": {"group": "stash.appscode.com",
            "names": {"kind": "BackupBatch", "plural": "backupbatches"}, "scope": "Namespaced", "versions": []}}))
        .expect("a CRD")
    }

    #[test]
    fn stashs_own_crds_are_told_apart_from_ours() {
        assert_eq!(judge(None), Installed::Missing);
        for ours in crds() {
            assert_eq!(judge(Some(&ours)), Installed::Ours);
        }
        let stash =
            crd(json!({"name": "backupbatches.stash.appscode.com", "labels": {"app.kubernetes.io/name": "stash"},
            "annotations": {"meta.helm.sh/release-name": "stash", "meta.helm.sh/release-namespace": "kube-system"}}));
        assert_eq!(
            judge(Some(&stash)),
            Installed::Foreign(
                "AppsCode Stash's (label app.kubernetes.io/name=stash), Helm release kube-system/stash".into()
            )
        );
        let bare = crd(json!({"name": "backupbatches.stash.appscode.com"}));
        assert_eq!(judge(Some(&bare)), Installed::Foreign("no label app.kubernetes.io/part-of=stash".into()));
    }
}
