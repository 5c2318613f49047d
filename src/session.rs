//! Creating a BackupSession for a BackupBatch: what the trigger CronJob, `stash trigger` and retries do.

use crate::api::backup_session::BackupInvokerRef;
use crate::api::common::GROUP;
use crate::api::{BackupBatch, BackupSession, BackupSessionSpec};
use crate::names::label_value;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, PostParams};
use kube::{Client, Resource, ResourceExt};
use std::collections::BTreeMap;

pub const INVOKER_KIND_LABEL: &str = "stash.appscode.com/invoker-kind";
pub const INVOKER_NAME_LABEL: &str = "stash.appscode.com/invoker-name";
pub const BACKUP_BATCH_KIND: &str = "BackupBatch";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("BackupBatch {namespace}/{name} not found")]
    BatchNotFound { namespace: String, name: String },
    #[error("only --invoker-kind=BackupBatch is supported, not {0:?}")]
    UnsupportedInvoker(String),
    #[error("no namespace: pass --namespace, or set POD_NAMESPACE, or run in a Pod")]
    NoNamespace,
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// The label selector of `batch`'s sessions (and trigger CronJob).
pub fn invoker_selector(batch: &str) -> String {
    format!("{INVOKER_NAME_LABEL}={}", label_value(batch))
}

/// The labels that tie a session (or a trigger CronJob) to its batch.
pub fn invoker_labels(batch: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (INVOKER_KIND_LABEL.to_string(), BACKUP_BATCH_KIND.to_string()),
        (INVOKER_NAME_LABEL.to_string(), label_value(batch)),
        (crate::api::PART_OF.0.to_string(), crate::api::PART_OF.1.to_string()),
    ])
}

/// The batch as the controlling owner of an object it makes.
pub fn owned_by(batch: &BackupBatch) -> Option<OwnerReference> {
    batch.controller_owner_ref(&())
}

/// The namespace to act in: the flag, else `POD_NAMESPACE` (clap reads it), else the in-cluster one.
pub fn resolve_namespace(flag: Option<String>) -> Result<String, SessionError> {
    if let Some(namespace) = flag.filter(|n| !n.is_empty()) {
        return Ok(namespace);
    }
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .map(|n| n.trim().to_string())
        .ok()
        .filter(|n| !n.is_empty())
        .ok_or(SessionError::NoNamespace)
}

/// Creates session `<batch>-<unix seconds>` owned by the batch. A second call in the same second
/// (a retried trigger Job) returns the existing session instead of failing.
pub async fn create_backup_session(
    client: Client,
    namespace: &str,
    batch_name: &str,
    retry_left: Option<i32>,
) -> Result<BackupSession, SessionError> {
    let batches: Api<BackupBatch> = Api::namespaced(client.clone(), namespace);
    let batch = batches.get_opt(batch_name).await?.ok_or_else(|| SessionError::BatchNotFound {
        namespace: namespace.to_string(),
        name: batch_name.to_string(),
    })?;
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let mut session = BackupSession::new(
        &format!("{batch_name}-{now}"),
        BackupSessionSpec {
            invoker: BackupInvokerRef {
                api_group: GROUP.to_string(),
                kind: BACKUP_BATCH_KIND.to_string(),
                name: batch.name_any(),
            },
            retry_left,
        },
    );
    session.metadata.namespace = Some(namespace.to_string());
    session.metadata.labels = Some(invoker_labels(batch_name));
    session.metadata.owner_references = owned_by(&batch).map(|owner| vec![owner]);
    let sessions: Api<BackupSession> = Api::namespaced(client, namespace);
    match sessions.create(&PostParams::default(), &session).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(sessions.get(&session.name_any()).await?),
        Err(err) => Err(err.into()),
    }
}
