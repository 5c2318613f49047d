//! `stash restore`: restores one member of a RestoreBatch from one complete session — the latest,
//! a named one, or the last before a time — chosen through the manifests in the repository, so a
//! restore never mixes runs and works on an empty cluster — or one snapshot a rule names. Each Job
//! restores one host (`STASH_RESTORE_HOST`, set by the operator). Files go back under the path root
//! (the snapshot keeps the application's paths), and only when every one of them lands in a volume
//! the Job mounts; a database gets its dump replayed.

use super::database::{Connection, Engine};
use super::executor::{AgentError, Executor};
use super::job::session_timeout;
use super::manifest::{self, MANIFEST_TAG};
use super::retention::NAMESPACE_TAG;
use super::sidecar::host_name;
use super::status::{matches, seconds};
use crate::api::RestoreBatch;
use crate::api::restore_batch::{
    HostRestoreStats, RestoreMember, RestoreMemberPhase, RestoreMemberStatus, RestoreRule,
};
use crate::executor_pod::{RESTORE_HOST_ENV, data_mounts, is_database, rule_for};
use crate::restic::Restic;
use crate::restic::secrets::SecretValues;
use crate::status_write::update_status;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

pub struct RestoreTarget {
    pub restore_batch: String,
    pub kind: String,
    pub name: String,
    pub database_secret_dir: PathBuf,
}

pub async fn run(executor: &Executor, target: &RestoreTarget) -> Result<(), AgentError> {
    let api = executor.api::<RestoreBatch>();
    let restore = api.get_opt(&target.restore_batch).await?.ok_or_else(|| AgentError::NotFound {
        kind: "RestoreBatch",
        namespace: executor.namespace().into(),
        name: target.restore_batch.clone(),
    })?;
    let member =
        restore.spec.members.iter().find(|m| matches(&m.target.reference, &target.kind, &target.name)).ok_or_else(
            || {
                AgentError::Invalid(format!(
                    "RestoreBatch {} has no member {}/{}",
                    target.restore_batch, target.kind, target.name
                ))
            },
        )?;
    // The operator names the host; a Job made before it did restores the member's only host.
    let host = match std::env::var(RESTORE_HOST_ENV).ok().filter(|h| !h.is_empty()) {
        Some(host) => host,
        None => member_host(executor, member)?,
    };
    let started = Instant::now();
    let result = restore_member(executor, &restore, member, target, &host).await;
    let entry = HostRestoreStats {
        hostname: host,
        phase: Some(if result.is_ok() { RestoreMemberPhase::Succeeded } else { RestoreMemberPhase::Failed }),
        duration: Some(seconds(started.elapsed())),
        error: result.as_ref().err().map(ToString::to_string),
    };
    report(executor, &target.restore_batch, member, entry, result.as_ref().ok().cloned().flatten()).await?;
    result.map(drop)
}

fn alias(member: &RestoreMember) -> String {
    if member.target.alias.is_empty() { member.target.reference.name.clone() } else { member.target.alias.clone() }
}

fn member_host(executor: &Executor, member: &RestoreMember) -> Result<String, AgentError> {
    let settings = &executor.settings;
    let (pod, node) = (settings.pod_name.as_deref(), settings.node_name.as_deref());
    host_name(&member.target.reference.kind, &alias(member), pod, node)
}

/// Restores host `host` of the member; returns the session it came from, when known.
async fn restore_member(
    executor: &Executor,
    restore: &RestoreBatch,
    member: &RestoreMember,
    target: &RestoreTarget,
    host: &str,
) -> Result<Option<String>, AgentError> {
    let rules = &member.target.rules;
    let rule = rule_for(host, rules);
    if rule.is_none() && !rules.is_empty() {
        return Err(AgentError::Invalid(format!("no rule of the member applies to host {host}")));
    }
    let repository = executor.repository(&restore.spec.repository).await?;
    let restic = executor.restic(&repository).await?.waiting_for_locks(session_timeout());
    let selector = restore.spec.restore_from.as_ref();
    let source_namespace = selector.and_then(|s| s.namespace.as_deref()).unwrap_or(executor.namespace());
    let (snapshot, session) = match rule.and_then(|r| r.snapshots.first()).filter(|s| *s != "latest") {
        Some(id) => named_snapshot(&restic, source_namespace, member, id).await?,
        None => {
            let batch = match selector.and_then(|s| s.batch.clone()) {
                Some(batch) => batch,
                None => only_batch(&restic, source_namespace).await?,
            };
            let manifest = manifest::select(&restic, source_namespace, &batch, selector).await?;
            let source = manifest.member(&target.kind, &target.name).ok_or_else(|| {
                let session = &manifest.session;
                AgentError::Invalid(format!("session {session} holds no member {}/{}", target.kind, target.name))
            })?;
            let wanted = match rule.and_then(|r| r.source_host.clone()) {
                Some(source_host) => source_host,
                None if source.hosts.len() == 1 => source.hosts[0].hostname.clone(),
                None => host.to_string(),
            };
            let found = source.hosts.iter().find(|h| h.hostname == wanted).ok_or_else(|| {
                AgentError::Invalid(format!("session {} has no snapshot of host {wanted}", manifest.session))
            })?;
            (found.snapshot.clone(), Some(manifest.session.clone()))
        }
    };
    restore_snapshot(executor, &restic, member, rule, &snapshot, target).await?;
    Ok(session)
}

/// The snapshot `id` of a rule, when it is one of this member in this namespace (never another
/// namespace's or another member's data); with the session it belongs to.
async fn named_snapshot(
    restic: &Restic,
    namespace: &str,
    member: &RestoreMember,
    id: &str,
) -> Result<(String, Option<String>), AgentError> {
    let tags = [format!("{NAMESPACE_TAG}={namespace}"), format!("member={}", alias(member))];
    let snapshots = restic.snapshots(&tags).await?;
    let found = snapshots.iter().find(|s| s.id == id || (id.len() >= 8 && s.id.starts_with(id))).ok_or_else(|| {
        AgentError::Invalid(format!("snapshot {id} is not a snapshot of member {} in this namespace", alias(member)))
    })?;
    Ok((found.id.clone(), found.tag("session").map(str::to_string)))
}

async fn restore_snapshot(
    executor: &Executor,
    restic: &Restic,
    member: &RestoreMember,
    rule: Option<&RestoreRule>,
    snapshot: &str,
    target: &RestoreTarget,
) -> Result<(), AgentError> {
    if is_database(&target.kind) {
        let engine = Engine::from_task(member.task.as_ref().map(|t| t.name.as_str()));
        let connection = Connection::from_secret(engine, SecretValues::read_dir(&target.database_secret_dir)?)?;
        return connection.restore(restic, snapshot).await;
    }
    let include: Vec<String> = rule.map(|r| r.paths.iter().chain(&r.include).cloned().collect()).unwrap_or_default();
    let exclude: Vec<String> = rule.map(|r| r.exclude.clone()).unwrap_or_default();
    let mounts: Vec<String> = data_mounts(&member.target.volume_mounts).into_iter().map(|m| m.mount_path).collect();
    lands_in_volumes(restic, snapshot, &Selection::new(&mounts, &include, &exclude)).await?;
    let root = &executor.settings.path_root;
    std::fs::create_dir_all(root).map_err(|e| AgentError::Invalid(format!("creating {}: {e}", root.display())))?;
    restic.restore(snapshot, root, &include, &exclude).await?;
    Ok(())
}

/// Fails unless everything of `snapshot` the selection restores lands in a mounted volume: walks
/// the snapshot's directories that lead to a mountPath (one `restic ls` per level), so that a
/// restore whose volumeMounts differ from the backed-up paths is refused instead of writing into
/// the Job's own filesystem and reporting success.
async fn lands_in_volumes(restic: &Restic, snapshot: &str, selection: &Selection<'_>) -> Result<(), AgentError> {
    let mut level = vec!["/".to_string()];
    while !level.is_empty() {
        let mut args = vec!["ls", "--json", "--no-lock", snapshot];
        args.extend(level.iter().map(String::as_str));
        // A directory may hold millions of entries: each line is placed as restic prints it, and
        // only the few that lead on towards a mountPath are kept.
        let mut next = Vec::new();
        let mut outside = None;
        let mut on_line = |line: &str| {
            let Ok(node) = serde_json::from_str::<LsNode>(line) else { return };
            if outside.is_some() || node.struct_type != "node" || level.contains(&node.path) {
                return;
            }
            match selection.place(&node.path, node.kind == "dir") {
                Place::Inside | Place::Skipped => {}
                Place::Leads => next.push(node.path),
                Place::Outside => outside = Some(node.path),
            }
        };
        restic.run_lines(&args, &mut on_line).await?;
        if let Some(path) = outside {
            return Err(AgentError::Invalid(format!(
                "{path} of snapshot {snapshot} would land outside every mounted volume ({}): set volumeMounts \
                 to where the data was backed up, or restrict rules[].paths",
                selection.mounts.join(", ")
            )));
        }
        level = next;
    }
    Ok(())
}

/// A line of `restic ls --json`.
#[derive(serde::Deserialize)]
struct LsNode {
    #[serde(default)]
    struct_type: String,
    #[serde(default)]
    path: String,
    #[serde(default, rename = "type")]
    kind: String,
}

/// Where a snapshot entry goes on restore, relative to the Job's volumes.
#[derive(Debug, PartialEq)]
enum Place {
    /// Under a mountPath.
    Inside,
    /// A directory above a mountPath or a chosen path: its entries decide.
    Leads,
    /// Not restored (excluded, or outside the chosen paths).
    Skipped,
    /// Restored, and in no volume.
    Outside,
}

/// The mountPaths of the Job, and what the rule restores of the snapshot.
struct Selection<'a> {
    mounts: &'a [String],
    /// Literal absolute paths chosen by `paths`/`include`; None: everything (also when a pattern is
    /// a glob, which is judged conservatively).
    chosen: Option<Vec<&'a str>>,
    exclude: &'a [String],
}

impl<'a> Selection<'a> {
    fn new(mounts: &'a [String], include: &'a [String], exclude: &'a [String]) -> Self {
        let literal = |p: &String| p.starts_with('/') && !p.contains(['*', '?', '[']);
        let chosen = (!include.is_empty() && include.iter().all(literal))
            .then(|| include.iter().map(|p| p.trim_end_matches('/')).collect());
        Selection { mounts, chosen, exclude }
    }

    fn place(&self, path: &str, is_dir: bool) -> Place {
        if self.exclude.iter().any(|e| under(path, e)) {
            return Place::Skipped;
        }
        if self.mounts.iter().any(|m| under(path, m)) {
            return Place::Inside;
        }
        let chosen = self.chosen.as_ref().is_none_or(|c| c.iter().any(|c| under(path, c)));
        let leads = is_dir
            && (self.mounts.iter().any(|m| under(m, path))
                || self.chosen.as_ref().is_some_and(|c| c.iter().any(|c| under(c, path))));
        match (leads, chosen) {
            (true, _) => Place::Leads,
            (false, true) => Place::Outside,
            (false, false) => Place::Skipped,
        }
    }
}

/// Whether `path` is `dir` or inside it, component-wise (`/data2` is not under `/data`).
fn under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    dir.is_empty() || path == dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
}

/// The batch whose sessions a repository holds, when there is exactly one.
async fn only_batch(restic: &Restic, namespace: &str) -> Result<String, AgentError> {
    let batches: BTreeSet<String> = restic
        .snapshots(&[MANIFEST_TAG.to_string()])
        .await?
        .iter()
        .filter(|s| s.tag(NAMESPACE_TAG).is_none_or(|ns| ns == namespace))
        .filter_map(|s| s.tag("batch").map(str::to_string))
        .collect();
    let mut names = batches.iter();
    match (names.next(), names.next()) {
        (Some(batch), None) => Ok(batch.clone()),
        (None, _) => Err(AgentError::Invalid("the repository holds no complete session".into())),
        _ => Err(AgentError::Invalid(format!(
            "the repository holds sessions of several batches ({}): set spec.restoreFrom.batch",
            batches.into_iter().collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Writes this host's entry under the member, retrying on conflict with other hosts and the operator.
async fn report(
    executor: &Executor,
    name: &str,
    member: &RestoreMember,
    entry: HostRestoreStats,
    session: Option<String>,
) -> Result<(), AgentError> {
    update_status(&executor.api::<RestoreBatch>(), name, |current| {
        let status = current.status.get_or_insert_with(Default::default);
        if status.restored_session.is_none() {
            status.restored_session = session.clone();
        }
        let reference = &member.target.reference;
        let index = match status.members.iter().position(|m| matches(&m.reference, &reference.kind, &reference.name)) {
            Some(index) => index,
            None => {
                status.members.push(RestoreMemberStatus {
                    reference: reference.clone(),
                    phase: Some(RestoreMemberPhase::Running),
                    total_hosts: Some(1),
                    stats: Vec::new(),
                    conditions: Vec::new(),
                });
                status.members.len() - 1
            }
        };
        let stats = &mut status.members[index].stats;
        stats.retain(|s| s.hostname != entry.hostname);
        stats.push(entry.clone());
        true
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn data_outside_every_mount_is_found() {
        let mounts = strings(&["/stash-data/uploads"]);
        let none = Vec::new();
        let all = Selection::new(&mounts, &none, &none);
        assert_eq!(all.place("/stash-data", true), Place::Leads);
        assert_eq!(all.place("/stash-data/uploads", true), Place::Inside);
        assert_eq!(all.place("/stash-data/uploads/a/b", false), Place::Inside);
        assert_eq!(all.place("/stash-data/other.txt", false), Place::Outside, "a sibling of the mount");
        assert_eq!(all.place("/stash-data/uploads2", true), Place::Outside, "a prefix is not a parent");
        assert_eq!(all.place("/var", true), Place::Outside);

        let exclude = strings(&["/stash-data/other.txt"]);
        assert_eq!(Selection::new(&mounts, &none, &exclude).place("/stash-data/other.txt", false), Place::Skipped);
        let include = strings(&["/stash-data/uploads/2026"]);
        let chosen = Selection::new(&mounts, &include, &none);
        assert_eq!(chosen.place("/var", true), Place::Skipped, "not restored");
        let glob = strings(&["*.php"]);
        assert_eq!(Selection::new(&mounts, &glob, &none).place("/var", true), Place::Outside, "globs are judged whole");
        let wrong = strings(&["/var/lib/app"]);
        let wrong = Selection::new(&mounts, &wrong, &none);
        assert_eq!(wrong.place("/var", true), Place::Leads);
        assert_eq!(wrong.place("/var/lib/app/x", false), Place::Outside);
    }
}
