//! The session manifest: which snapshots make one complete run. It is written into the repository
//! last, as a snapshot of its own (`manifest.json`, host `stash-manifest`, tagged `stash=manifest`,
//! `batch=`, `session=`), only when every member succeeded. Restores choose sets through manifests,
//! so they never mix runs — and need nothing from etcd.

use super::executor::AgentError;
use crate::api::BackupSession;
use crate::api::backup_session::HostPhase;
use crate::api::restore_batch::SessionSelector;
use crate::restic::output::Snapshot;
use crate::restic::{BackupOutcome, Restic};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::process::Stdio;

pub const MANIFEST_HOST: &str = "stash-manifest";
pub const MANIFEST_TAG: &str = "stash=manifest";
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub version: u32,
    pub session: String,
    pub batch: String,
    pub namespace: String,
    pub start_time: Option<String>,
    pub end_time: String,
    pub members: Vec<ManifestMember>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestMember {
    pub kind: String,
    pub name: String,
    pub hosts: Vec<ManifestHost>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManifestHost {
    pub hostname: String,
    pub snapshot: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded: Option<String>,
}

impl Manifest {
    /// The manifest of a session whose hosts all succeeded; `None` otherwise.
    pub fn of_complete(session: &BackupSession, batch: &str) -> Option<Manifest> {
        let status = session.status.as_ref()?;
        let mut members = Vec::new();
        for target in &status.targets {
            let mut hosts = Vec::new();
            for host in &target.stats {
                let snapshot = host.snapshots.first()?;
                if host.phase != Some(HostPhase::Succeeded) || snapshot.name.is_empty() {
                    return None;
                }
                hosts.push(ManifestHost {
                    hostname: host.hostname.clone(),
                    snapshot: snapshot.name.clone(),
                    total_size: snapshot.total_size.clone(),
                    uploaded: snapshot.uploaded.clone(),
                });
            }
            if hosts.is_empty() || hosts.len() < usize::try_from(target.total_hosts.unwrap_or(1)).unwrap_or(1) {
                return None;
            }
            members.push(ManifestMember {
                kind: target.reference.kind.clone(),
                name: target.reference.name.clone(),
                hosts,
            });
        }
        Some(Manifest {
            version: 1,
            session: session.name_any(),
            batch: batch.to_string(),
            namespace: session.namespace().unwrap_or_default(),
            start_time: session.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
            end_time: Timestamp::now().to_string(),
            members,
        })
    }

    pub fn member(&self, kind: &str, name: &str) -> Option<&ManifestMember> {
        self.members.iter().find(|m| m.kind == kind && m.name == name)
    }

    /// Writes the manifest as the last snapshot of the session.
    pub async fn write(&self, restic: &Restic) -> Result<BackupOutcome, AgentError> {
        let mut file = tempfile::tempfile().map_err(|e| AgentError::Invalid(format!("manifest scratch file: {e}")))?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| AgentError::Invalid(e.to_string()))?;
        file.write_all(&json).map_err(|e| AgentError::Invalid(format!("manifest scratch file: {e}")))?;
        std::io::Seek::rewind(&mut file).map_err(|e| AgentError::Invalid(format!("manifest scratch file: {e}")))?;
        let tags = vec![MANIFEST_TAG.to_string(), format!("batch={}", self.batch), format!("session={}", self.session)];
        Ok(restic.backup_stdin(MANIFEST_FILE, MANIFEST_HOST, &tags, Stdio::from(file)).await?)
    }
}

/// The manifest snapshots of `batch`, oldest first.
pub async fn list(restic: &Restic, batch: &str) -> Result<Vec<Snapshot>, AgentError> {
    let mut snapshots = restic.snapshots(&[MANIFEST_TAG.to_string(), format!("batch={batch}")]).await?;
    snapshots.sort_by(|a, b| a.time.cmp(&b.time));
    Ok(snapshots)
}

pub async fn read(restic: &Restic, snapshot: &Snapshot) -> Result<Manifest, AgentError> {
    let finished = restic.run(&["dump", "--no-lock", &snapshot.id, &format!("/{MANIFEST_FILE}")]).await?;
    serde_json::from_str(&finished.stdout)
        .map_err(|e| AgentError::Invalid(format!("manifest in snapshot {} is unreadable: {e}", snapshot.short_id)))
}

/// The complete session a restore asks for: a named one, the last one before a time, or the latest.
pub async fn select(restic: &Restic, batch: &str, selector: Option<&SessionSelector>) -> Result<Manifest, AgentError> {
    let manifests = list(restic, batch).await?;
    let chosen = match selector {
        Some(SessionSelector { session: Some(name), .. }) => {
            manifests.iter().rev().find(|m| m.tag("session") == Some(name.as_str())).ok_or_else(|| {
                AgentError::Invalid(format!(
                    "session {name} of {batch} has no manifest: it is not complete or was forgotten"
                ))
            })?
        }
        Some(SessionSelector { before: Some(before), .. }) => manifests
            .iter()
            .rev()
            .find(|m| m.time.parse::<Timestamp>().is_ok_and(|t| t < before.0))
            .ok_or_else(|| AgentError::Invalid(format!("no complete session of {batch} before {}", before.0)))?,
        _ => manifests
            .last()
            .ok_or_else(|| AgentError::Invalid(format!("the repository holds no complete session of {batch}")))?,
    };
    read(restic, chosen).await
}
