//! `kubectl stash logs <session>`: what the executors of one session wrote — its backup, finalize
//! and hook Jobs' Pods (by the session label) and the `stash` sidecars of its workload members (by
//! the workloads' selectors, from the session's start).

use super::PluginError;
use crate::api::BackupSession;
use crate::controller::backup_job::{SESSION_LABEL, is_job_model};
use crate::controller::targets::{TargetState, inspect};
use crate::executor_pod::SIDECAR_NAME;
use crate::names::label_value;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams};
use kube::{Client, ResourceExt};
use std::fmt::Write;

/// Whether `pod` runs the `stash` sidecar (a native sidecar is an init container).
pub(crate) fn has_sidecar(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else { return false };
    spec.containers.iter().chain(spec.init_containers.iter().flatten()).any(|c| c.name == SIDECAR_NAME)
}

/// The logs of every executor Pod of `session`, each under a `==> pod/<name> <==` header.
pub async fn session_logs(client: Client, namespace: &str, session: &str) -> Result<String, PluginError> {
    let sessions: Api<BackupSession> = Api::namespaced(client.clone(), namespace);
    let Some(found) = sessions.get_opt(session).await? else {
        return Err(PluginError::NotFound { kind: "BackupSession", namespace: namespace.into(), name: session.into() });
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let own = ListParams::default().labels(&format!("{SESSION_LABEL}={}", label_value(session)));
    let mut readings: Vec<(Pod, LogParams)> = pods
        .list(&own)
        .await?
        .items
        .into_iter()
        .map(|p| (p, LogParams { container: Some(SIDECAR_NAME.into()), ..Default::default() }))
        .collect();
    // Sidecars serve every session of their batch: only what they wrote since this one began.
    let since = found.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let batch = super::batch(&client, namespace, &found.spec.invoker.name).await?;
    for member in batch.spec.members.iter().filter(|m| !is_job_model(m)) {
        let TargetState::Workload(workload) = inspect(&client, None, namespace, member).await? else { continue };
        let Some(selector) = workload.selector.and_then(|s| kube::core::Selector::try_from(s).ok()) else { continue };
        let selected = pods.list(&ListParams::default().labels_from(&selector)).await?.items;
        readings.extend(
            selected.into_iter().filter(has_sidecar).map(|p| {
                (p, LogParams { container: Some(SIDECAR_NAME.into()), since_time: since, ..Default::default() })
            }),
        );
    }
    if readings.is_empty() {
        return Ok(format!("no executor Pods of BackupSession {namespace}/{session} remain\n"));
    }
    let mut out = String::new();
    for (pod, params) in readings {
        let name = pod.name_any();
        let text = match pods.logs(&name, &params).await {
            Ok(text) => text,
            Err(err) => format!("(no log: {err})\n"),
        };
        let _ = write!(out, "==> pod/{name} <==\n{text}");
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecars_are_found_among_containers_and_init_containers() {
        let pod = |containers: serde_json::Value, init: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"spec": {"containers": containers, "initContainers": init}}))
                .expect("a Pod")
        };
        assert!(has_sidecar(&pod(serde_json::json!([{"name": "app"}, {"name": "stash"}]), serde_json::json!([]))));
        assert!(has_sidecar(&pod(serde_json::json!([{"name": "app"}]), serde_json::json!([{"name": "stash"}]))));
        assert!(!has_sidecar(&pod(serde_json::json!([{"name": "app"}]), serde_json::json!([]))));
    }
}
