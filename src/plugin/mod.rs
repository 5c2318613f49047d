//! `kubectl stash`: the user's verbs beyond trigger/pause/resume/sessions/describe — the repository's
//! snapshots, check and unlock (each a Job in the cluster, see `repository_job`), restore (a
//! RestoreBatch) and a session's executor logs — and `-o json|yaml` for what they read.

pub mod logs;
pub mod report;
pub mod repository_job;
pub mod restore;

use crate::api::BackupBatch;
use kube::Client;
use kube::api::Api;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{kind} {namespace}/{name} not found")]
    NotFound { kind: &'static str, namespace: String, name: String },
    #[error(transparent)]
    Repository(#[from] crate::tenancy::Refusal),
    #[error("{0}")]
    Job(String),
    #[error("{0}")]
    Invalid(String),
    #[error("rendering the output: {0}")]
    Render(String),
}

/// `-o`: the objects as JSON or YAML instead of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Json,
    Yaml,
}

/// `value` as `format`, ending in a newline.
pub fn render<T: Serialize>(value: &T, format: OutputFormat) -> Result<String, PluginError> {
    let text = match format {
        OutputFormat::Json => serde_json::to_string_pretty(value).map(|t| t + "\n").map_err(|e| e.to_string()),
        OutputFormat::Yaml => serde_yaml::to_string(value).map_err(|e| e.to_string()),
    };
    text.map_err(PluginError::Render)
}

/// BackupBatch `namespace`/`name`, or an error naming it.
async fn batch(client: &Client, namespace: &str, name: &str) -> Result<BackupBatch, PluginError> {
    let found = Api::<BackupBatch>::namespaced(client.clone(), namespace).get_opt(name).await?;
    found.ok_or_else(|| PluginError::NotFound { kind: "BackupBatch", namespace: namespace.into(), name: name.into() })
}
