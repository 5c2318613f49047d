//! The session manifest: which snapshots make one complete run. It is written into the repository
//! last, as a snapshot of its own (`manifest.json`, host `stash-manifest`, tagged `stash=manifest`,
//! `batch=`, `session=`, `namespace=`), only for a complete session (`retention::manifest_of`). Restores choose sets through manifests,
//! so they never mix runs — and need nothing from etcd.

use super::executor::AgentError;
use super::retention::{NAMESPACE_TAG, Ownership, is_manifest, ownership};
use crate::api::restore_batch::SessionSelector;
use crate::restic::output::Snapshot;
use crate::restic::{BackupOutcome, Restic};
use k8s_openapi::jiff::Timestamp;
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
    pub fn member(&self, kind: &str, name: &str) -> Option<&ManifestMember> {
        self.members.iter().find(|m| m.kind == kind && m.name == name)
    }

    /// Writes the manifest as the last snapshot of the session, dated at the session's start so that
    /// keep rules and "latest" order sets by when they were taken, not by when finalize ran.
    pub async fn write(&self, restic: &Restic) -> Result<BackupOutcome, AgentError> {
        let mut file = tempfile::tempfile().map_err(|e| AgentError::Invalid(format!("manifest scratch file: {e}")))?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| AgentError::Invalid(e.to_string()))?;
        file.write_all(&json).map_err(|e| AgentError::Invalid(format!("manifest scratch file: {e}")))?;
        std::io::Seek::rewind(&mut file).map_err(|e| AgentError::Invalid(format!("manifest scratch file: {e}")))?;
        let tags = vec![
            MANIFEST_TAG.to_string(),
            format!("batch={}", self.batch),
            format!("session={}", self.session),
            format!("{NAMESPACE_TAG}={}", self.namespace),
        ];
        let time = self.start_time.as_deref().and_then(|t| t.parse::<Timestamp>().ok());
        Ok(restic.backup_stdin(MANIFEST_FILE, MANIFEST_HOST, &tags, time, Stdio::from(file)).await?)
    }
}

/// The manifest snapshots of `batch` of `namespace` (and legacy ones that name no namespace),
/// oldest first.
pub async fn list(restic: &Restic, namespace: &str, batch: &str) -> Result<Vec<Snapshot>, AgentError> {
    let listed = restic.snapshots(&[MANIFEST_TAG.to_string(), format!("batch={batch}")]).await?;
    Ok(of(&listed, namespace, batch).into_iter().cloned().collect())
}

/// The same, from a listing of the repository.
fn of<'a>(listing: &'a [Snapshot], namespace: &str, batch: &str) -> Vec<&'a Snapshot> {
    let mut snapshots: Vec<&Snapshot> =
        listing.iter().filter(|s| is_manifest(s) && ownership(s, namespace, batch) != Ownership::Foreign).collect();
    snapshots.sort_by(Snapshot::chronological);
    snapshots
}

pub async fn read(restic: &Restic, snapshot: &Snapshot) -> Result<Manifest, AgentError> {
    let printed = restic.run(&["dump", "--no-lock", &snapshot.id, &format!("/{MANIFEST_FILE}")]).await?;
    serde_json::from_str(&printed)
        .map_err(|e| AgentError::Invalid(format!("manifest in snapshot {} is unreadable: {e}", snapshot.short_id)))
}

/// The newest manifest tagged with `namespace`, read without a listing first: restic picks it
/// (`dump latest` with the manifests' host and tags). Only a guess at what `select` would choose;
/// the caller compares it with the listing.
pub async fn newest(restic: &Restic, namespace: &str) -> Result<Manifest, AgentError> {
    let tags = format!("{MANIFEST_TAG},{NAMESPACE_TAG}={namespace}");
    let file = format!("/{MANIFEST_FILE}");
    let printed = restic.run(&["dump", "--no-lock", "--host", MANIFEST_HOST, "--tag", &tags, "latest", &file]).await?;
    serde_json::from_str(&printed).map_err(|e| AgentError::Invalid(format!("the newest manifest is unreadable: {e}")))
}

/// Whether `guessed` is the manifest `select` would read first: of `first` (`first_choice` of
/// the listing), the batch, and the namespace, as its body says.
pub fn is_first_choice(guessed: &Manifest, first: Option<&str>, namespace: &str, batch: &str) -> bool {
    guessed.namespace == namespace && guessed.batch == batch && first == Some(guessed.session.as_str())
}

/// The complete session a restore in `namespace` asks for: a named one, the last one before a time,
/// or the latest, among the manifests of `listing` (the repository's snapshots). Never another
/// namespace's: a legacy manifest (no namespace tag) counts only when its body names this namespace.
pub async fn select(
    restic: &Restic,
    listing: &[Snapshot],
    namespace: &str,
    batch: &str,
    selector: Option<&SessionSelector>,
) -> Result<Manifest, AgentError> {
    let mut manifests = of(listing, namespace, batch);
    loop {
        let chosen = choose(&manifests, batch, selector)?;
        let manifest = read(restic, chosen).await?;
        if manifest.namespace == namespace {
            return Ok(manifest);
        }
        let id = chosen.id.clone();
        manifests.retain(|m| m.id != id);
    }
}

/// The session of the manifest `select` reads first, without I/O.
pub fn first_choice<'a>(
    listing: &'a [Snapshot],
    namespace: &str,
    batch: &str,
    selector: Option<&SessionSelector>,
) -> Option<&'a str> {
    choose(&of(listing, namespace, batch), batch, selector).ok()?.tag("session")
}

fn choose<'a>(
    manifests: &[&'a Snapshot],
    batch: &str,
    selector: Option<&SessionSelector>,
) -> Result<&'a Snapshot, AgentError> {
    Ok(match selector {
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
            .find(|m| m.instant().is_some_and(|t| t < before.0))
            .ok_or_else(|| AgentError::Invalid(format!("no complete session of {batch} before {}", before.0)))?,
        _ => manifests
            .last()
            .ok_or_else(|| AgentError::Invalid(format!("the repository holds no complete session of {batch}")))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(id: &str, time: &str, tags: &[&str]) -> Snapshot {
        Snapshot {
            id: id.into(),
            short_id: id.into(),
            time: time.into(),
            hostname: MANIFEST_HOST.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            paths: Vec::new(),
            summary: None,
        }
    }

    /// A manifest read before the listing is used only when the listing's first choice for the
    /// batch is its session, in its namespace and batch; any other counts as a wrong guess.
    #[test]
    fn a_guessed_manifest_counts_only_as_the_listings_first_choice() {
        let listing = [
            listed("old", "2026-11-27T01:00:00Z", &[MANIFEST_TAG, "batch=app", "namespace=prod", "session=s1"]),
            listed("new", "2026-11-27T02:00:00Z", &[MANIFEST_TAG, "batch=app", "namespace=prod", "session=s2"]),
            listed("web", "2026-11-27T03:00:00Z", &[MANIFEST_TAG, "batch=web", "namespace=prod", "session=w1"]),
        ];
        let manifest = |batch: &str, session: &str, namespace: &str| Manifest {
            version: 1,
            session: session.into(),
            batch: batch.into(),
            namespace: namespace.into(),
            start_time: None,
            end_time: String::new(),
            members: Vec::new(),
        };
        let first = |guessed: &Manifest, selector: Option<&SessionSelector>| {
            is_first_choice(guessed, first_choice(&listing, "prod", "app", selector), "prod", "app")
        };
        assert!(first(&manifest("app", "s2", "prod"), None));
        assert!(!first(&manifest("app", "s1", "prod"), None), "an older session");
        assert!(!first(&manifest("web", "w1", "prod"), None), "the namespace's newest, of another batch");
        assert!(!first(&manifest("app", "s2", "dev"), None), "a body naming another namespace");
        let older = SessionSelector { session: Some("s1".into()), ..Default::default() };
        assert!(first(&manifest("app", "s1", "prod"), Some(&older)));
        assert!(!first(&manifest("app", "s2", "prod"), Some(&older)));
    }

    /// A restore picks its session from the listing it already made: the batch's manifests of its
    /// namespace and legacy ones, oldest first; nothing of another namespace or batch, no data.
    #[test]
    fn the_manifests_of_a_listing_are_the_batchs_own_oldest_first() {
        let listing = [
            listed("new", "2026-11-27T02:00:00Z", &[MANIFEST_TAG, "batch=app", "namespace=prod", "session=s2"]),
            listed("data", "2026-11-27T00:30:00Z", &["batch=app", "namespace=prod", "session=s1"]),
            listed("old", "2026-11-27T01:00:00Z", &[MANIFEST_TAG, "batch=app", "namespace=prod", "session=s1"]),
            listed("legacy", "2026-11-26T00:00:00Z", &[MANIFEST_TAG, "batch=app", "session=s0"]),
            listed("other-ns", "2026-11-27T03:00:00Z", &[MANIFEST_TAG, "batch=app", "namespace=dev", "session=d"]),
            listed("other-batch", "2026-11-27T03:00:00Z", &[MANIFEST_TAG, "batch=web", "namespace=prod"]),
        ];
        let ids: Vec<&str> = of(&listing, "prod", "app").into_iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["legacy", "old", "new"]);
    }

    /// Times are instants, not texts: restic writes each in the zone of the restic that wrote it
    /// (a TZ in an executor's env, another tool's manifests), and with or without a fraction.
    #[test]
    fn manifests_are_ordered_by_instant_whatever_the_zone_or_fraction() {
        let tags = |session: &'static str| [MANIFEST_TAG, "batch=app", "namespace=prod", session];
        let listing = [
            listed("berlin", "2026-11-27T03:00:00+02:00", &tags("session=s1")),
            listed("utc", "2026-11-27T02:00:00Z", &tags("session=s2")),
            listed("fraction", "2026-11-27T02:00:00.5Z", &tags("session=s3")),
        ];
        let ids: Vec<&str> = of(&listing, "prod", "app").into_iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["berlin", "utc", "fraction"]);
        assert_eq!(first_choice(&listing, "prod", "app", None), Some("s3"));
    }
}
