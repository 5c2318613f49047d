//! `stash restore`: restores one member of a RestoreBatch from one complete session — the latest,
//! a named one, or the last before a time — chosen through the manifests in the repository, so a
//! restore never mixes runs and works on an empty cluster — or one snapshot a rule names. Each Job
//! restores one host (`STASH_RESTORE_HOST`, set by the operator). Files go back under the path root
//! (the snapshot keeps the application's paths), and only when every one of them lands in a volume
//! the Job mounts; a database gets its dump replayed.

use super::database::{Connection, Engine};
use super::executor::{AgentError, Executor};
use super::job::session_timeout;
use super::manifest;
use super::retention::{NAMESPACE_TAG, is_manifest};
use super::sidecar::host_name;
use super::status::{matches, seconds};
use crate::api::RestoreBatch;
use crate::api::restore_batch::{
    HostRestoreStats, RestoreMember, RestoreMemberPhase, RestoreMemberStatus, RestoreRule, SessionSelector,
};
use crate::executor_pod::{RESTORE_HOST_ENV, data_mounts, is_database, rule_for};
use crate::restic::Restic;
use crate::restic::output::Snapshot;
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
    let alias = alias(member);
    let wanted = Wanted { namespace: source_namespace, alias: &alias, host, rule, selector };
    let include: Vec<String> = rule.map(|r| r.paths.iter().chain(&r.include).cloned().collect()).unwrap_or_default();
    let exclude: Vec<String> = rule.map(|r| r.exclude.clone()).unwrap_or_default();
    let mounts: Vec<String> = data_mounts(&member.target.volume_mounts).into_iter().map(|m| m.mount_path).collect();
    let selection = Selection::new(&mounts, &include, &exclude);
    let restoring = Restoring { executor, restic: &restic, member, target, include: &include, exclude: &exclude };

    let database = is_database(&target.kind);
    let named = named_snapshots(rule);
    if !named.is_empty() {
        // Every named snapshot is checked before any is restored.
        let mut snapshots = Vec::with_capacity(named.len());
        for id in named {
            snapshots.push(named_snapshot(&restic, id, &wanted, &selection, database).await?);
        }
        let sessions: BTreeSet<Option<&str>> = snapshots.iter().map(|s| s.tag("session")).collect();
        let session = if sessions.len() == 1 { sessions.into_iter().flatten().next() } else { None };
        let session = session.map(str::to_string);
        // In the order the rule names them: a later snapshot's files win, as in Stash.
        for snapshot in &snapshots {
            restoring.restore(snapshot).await?;
        }
        return Ok(session);
    }

    // A restore of the latest session reads the newest manifest of the namespace while it lists
    // the repository (two openings side by side); the listing then says whether it is the one.
    let latest = selector.is_none_or(|s| s.session.is_none() && s.before.is_none());
    let guess = async { if latest { manifest::newest(&restic, source_namespace).await.ok() } else { None } };
    let (listing, guessed) = tokio::join!(restic.snapshots(&[]), guess);
    let listing = listing?;
    let (snapshot, session, walked) = match source(&listing, &wanted)? {
        Source::StashLatest(snapshot) => (snapshot, None, None),
        Source::Session => {
            let batch = match selector.and_then(|s| s.batch.clone()) {
                Some(batch) => batch,
                None => only_batch(&listing, source_namespace)?,
            };
            // Reading the manifest and walking the snapshot it most likely names are two repository
            // openings (~0.5 s of key derivation each): they run side by side, and the walk counts
            // only if the manifest names that snapshot.
            let first = manifest::first_choice(&listing, source_namespace, &batch, selector);
            let likely = first
                .and_then(|session| likely_snapshot(&listing, &wanted, &batch, session))
                .filter(|s| !database && selection.needs_walk(&s.paths));
            let walk = async {
                match likely {
                    Some(s) => Some((s.id.as_str(), list_leading(&restic, &s.id, &selection).await)),
                    None => None,
                }
            };
            let guessed = guessed.filter(|m| manifest::is_first_choice(m, first, source_namespace, &batch));
            let read = async {
                match guessed {
                    Some(manifest) => Ok(manifest),
                    None => manifest::select(&restic, &listing, source_namespace, &batch, selector).await,
                }
            };
            let (manifest, walked) = tokio::join!(read, walk);
            let manifest = manifest?;
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
            let snapshot = listing.iter().find(|s| s.id == found.snapshot).ok_or_else(|| {
                AgentError::Invalid(format!("snapshot {} of session {} is gone", found.snapshot, manifest.session))
            })?;
            let walked = walked.filter(|(id, _)| *id == snapshot.id).map(|(_, listed)| listed);
            (snapshot, Some(manifest.session.clone()), walked)
        }
    };
    // The data must land in mounted volumes, or the restore is refused before writing anything.
    if !database && selection.needs_walk(&snapshot.paths) {
        let listed = match walked {
            Some(listed) => listed?,
            None => list_leading(&restic, &snapshot.id, &selection).await?,
        };
        if let Some(path) = listed.outside {
            return Err(lands_outside(&path, &snapshot.id, &selection));
        }
    }
    restoring.restore(snapshot).await?;
    Ok(session)
}

/// The snapshot of this host in `session` (the one a restore reads the manifest of first), as the
/// listing's tags say, without I/O: the one the manifest names unless the session wrote the host
/// twice (then none is guessed). The manifest decides; this only lets the walk start early.
fn likely_snapshot<'a>(
    listing: &'a [Snapshot],
    wanted: &Wanted<'_>,
    batch: &str,
    session: &str,
) -> Option<&'a Snapshot> {
    let of_member = |s: &&Snapshot| {
        s.tag("session") == Some(session)
            && s.tag("batch") == Some(batch)
            && s.tag(NAMESPACE_TAG) == Some(wanted.namespace)
            && s.tag("member") == Some(wanted.alias)
            && !is_manifest(s)
    };
    let hosts: Vec<&Snapshot> = listing.iter().filter(of_member).collect();
    // A member of one host restores it whatever this host is called, as the manifest says.
    let host = match wanted.rule.and_then(|r| r.source_host.as_deref()) {
        Some(source_host) => Some(source_host),
        None if hosts.len() == 1 => None,
        None => Some(wanted.host),
    };
    let mut found = hosts.into_iter().filter(|s| host.is_none_or(|h| s.hostname == h));
    match (found.next(), found.next()) {
        (Some(snapshot), None) => Some(snapshot),
        _ => None,
    }
}

/// What one host of a restore asks for.
struct Wanted<'a> {
    /// The namespace whose sessions are restored.
    namespace: &'a str,
    alias: &'a str,
    host: &'a str,
    rule: Option<&'a RestoreRule>,
    selector: Option<&'a SessionSelector>,
}

/// Where a host's snapshot comes from when the rule names none.
#[derive(Debug, PartialEq)]
enum Source<'a> {
    /// One complete session, chosen through the manifests.
    Session,
    /// A repository Stash wrote (no manifests): the newest snapshot of the rule's source host.
    StashLatest(&'a Snapshot),
}

/// Chooses from the repository's listing, without I/O, when the rule names no snapshot: a
/// repository holding any data of the source namespace (or a `restoreFrom` saying which session)
/// restores a complete session, so runs are never mixed; only a repository holding nothing of ours
/// but Stash's snapshots restores Stash's way: per host, the newest snapshot holding the rule's
/// `paths`.
fn source<'a>(listing: &'a [Snapshot], wanted: &Wanted<'_>) -> Result<Source<'a>, AgentError> {
    let ours = |s: &Snapshot| s.tag(NAMESPACE_TAG) == Some(wanted.namespace);
    let asks_for_session = wanted.selector.is_some_and(|s| *s != SessionSelector::default());
    let legacy_manifest = |s: &Snapshot| is_manifest(s) && s.tag(NAMESPACE_TAG).is_none();
    if asks_for_session || listing.iter().any(|s| ours(s) || legacy_manifest(s)) || !listing.iter().any(stash_written) {
        return Ok(Source::Session);
    }
    let source_host = wanted.rule.and_then(|r| r.source_host.as_deref()).unwrap_or(wanted.host);
    let paths = wanted.rule.map(|r| r.paths.as_slice()).unwrap_or_default();
    listing
        .iter()
        .filter(|s| stash_written(s) && s.hostname == source_host && paths.iter().all(|p| s.paths.contains(p)))
        .max_by(Snapshot::chronological)
        .map(Source::StashLatest)
        .ok_or_else(|| {
            let with = if paths.is_empty() { String::new() } else { format!(" with paths {}", paths.join(", ")) };
            AgentError::Invalid(format!("the repository holds no snapshot of host {source_host}{with}"))
        })
}

/// A snapshot Stash (or anyone but us) wrote: none of the tags our sessions and manifests carry.
fn stash_written(snapshot: &Snapshot) -> bool {
    snapshot.tag("batch").is_none() && snapshot.tag(NAMESPACE_TAG).is_none() && !is_manifest(snapshot)
}

/// The ids a rule names; `latest` names none (the newest is chosen as without ids).
fn named_snapshots(rule: Option<&RestoreRule>) -> Vec<&str> {
    rule.iter().flat_map(|r| &r.snapshots).map(String::as_str).filter(|s| *s != "latest").collect()
}

/// A snapshot a rule names, checked by one `restic ls` of it: one repository opening (~0.5 s of
/// key derivation) instead of a listing of the repository and then a walk. The ls prints the
/// snapshot's own record first, which says whose it is, then the entries of its leading
/// directories, which say where its files land.
async fn named_snapshot(
    restic: &Restic,
    id: &str,
    wanted: &Wanted<'_>,
    selection: &Selection<'_>,
    database: bool,
) -> Result<Snapshot, AgentError> {
    // Checked before restic sees it: an id is an argument, and a short prefix names too much.
    let hex = id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !(8..=64).contains(&id.len()) || !hex {
        return Err(not_eligible(id, wanted));
    }
    let listed = list_leading(restic, id, selection).await?;
    judge_named(id, listed, wanted, selection, database)
}

/// Whether a named snapshot may be restored, from what its `ls` showed, without I/O: only one of
/// this member in the source namespace, or one Stash wrote (which carries no namespace), never
/// another namespace's or another member's; and only when all of it the selection restores lands
/// in a volume (a database's dump is replayed, not written to a volume).
fn judge_named(
    id: &str,
    listed: Listed,
    wanted: &Wanted<'_>,
    selection: &Selection<'_>,
    database: bool,
) -> Result<Snapshot, AgentError> {
    let snapshot = listed
        .snapshot
        .filter(|s| s.id.starts_with(id) && eligible(s, wanted))
        .ok_or_else(|| not_eligible(id, wanted))?;
    match listed.outside {
        Some(path) if !database && selection.needs_walk(&snapshot.paths) => {
            Err(lands_outside(&path, &snapshot.id, selection))
        }
        _ => Ok(snapshot),
    }
}

fn eligible(snapshot: &Snapshot, wanted: &Wanted<'_>) -> bool {
    let ours = snapshot.tag(NAMESPACE_TAG) == Some(wanted.namespace) && snapshot.tag("member") == Some(wanted.alias);
    ours || stash_written(snapshot)
}

fn not_eligible(id: &str, wanted: &Wanted<'_>) -> AgentError {
    AgentError::Invalid(format!(
        "snapshot {id} is neither a snapshot of member {} in namespace {} nor one Stash wrote",
        wanted.alias, wanted.namespace
    ))
}

/// What restoring one snapshot of the member needs.
struct Restoring<'a> {
    executor: &'a Executor,
    restic: &'a Restic,
    member: &'a RestoreMember,
    target: &'a RestoreTarget,
    include: &'a [String],
    exclude: &'a [String],
}

impl Restoring<'_> {
    /// Restores a snapshot already checked: its files under the path root, or its dump replayed.
    async fn restore(&self, snapshot: &Snapshot) -> Result<(), AgentError> {
        if is_database(&self.target.kind) {
            let task = self.member.task.as_ref().map(|t| t.name.as_str());
            let engine = Engine::from_task(task).map_err(AgentError::Invalid)?;
            let values = SecretValues::read_dir(&self.target.database_secret_dir)?;
            let connection = Connection::from_secret(engine, values)?;
            // A dump read from stdin is the snapshot's one file, whatever its name (Stash: dumpfile.sql).
            let file = match snapshot.paths.as_slice() {
                [file] => file.clone(),
                _ => format!("/{}", connection.dump_filename()),
            };
            return connection.restore(self.restic, &snapshot.id, &file).await;
        }
        let root = &self.executor.settings.path_root;
        std::fs::create_dir_all(root).map_err(|e| AgentError::Invalid(format!("creating {}: {e}", root.display())))?;
        self.restic.restore(&snapshot.id, root, self.include, self.exclude).await?;
        Ok(())
    }
}

/// A restore whose volumeMounts differ from the backed-up paths is refused instead of writing into
/// the Job's own filesystem and reporting success.
fn lands_outside(path: &str, snapshot: &str, selection: &Selection<'_>) -> AgentError {
    AgentError::Invalid(format!(
        "{path} of snapshot {snapshot} would land outside every mounted volume ({}): set volumeMounts \
         to where the data was backed up, or restrict rules[].paths",
        selection.mounts.join(", ")
    ))
}

/// What one `restic ls` of a snapshot's leading directories showed.
#[derive(Default)]
struct Listed {
    /// The snapshot's own record (its first line).
    snapshot: Option<Snapshot>,
    /// The first entry that would land outside every volume.
    outside: Option<String>,
}

/// One `restic ls` of the directories that lead to a mountPath or a chosen path prints their
/// entries (restic walks only the trees towards them): one repository opening whatever the depth.
async fn list_leading(restic: &Restic, snapshot: &str, selection: &Selection<'_>) -> Result<Listed, AgentError> {
    let leading = selection.leading_dirs();
    let mut args = vec!["ls", "--json", "--no-lock", snapshot];
    args.extend(leading.iter().map(String::as_str));
    // A directory may hold millions of entries: each line is placed as restic prints it, and only
    // the first that lands outside is kept.
    let mut listed = Listed::default();
    let mut on_line = |line: &str| {
        let Ok(node) = serde_json::from_str::<LsNode>(line) else { return };
        match node.struct_type.as_str() {
            "snapshot" if listed.snapshot.is_none() => listed.snapshot = serde_json::from_str(line).ok(),
            "node" if listed.outside.is_none() && selection.place(&node.path, node.kind == "dir") == Place::Outside => {
                listed.outside = Some(node.path);
            }
            _ => {}
        }
    };
    restic.run_lines(&args, &mut on_line).await?;
    Ok(listed)
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
    /// The literal absolute excludes: what restic reads otherwise (an empty pattern, a glob, a
    /// relative one) is judged to skip nothing.
    exclude: Vec<&'a str>,
}

impl<'a> Selection<'a> {
    fn new(mounts: &'a [String], include: &'a [String], exclude: &'a [String]) -> Self {
        let literal = |p: &&String| p.starts_with('/') && !p.contains(['*', '?', '[', '\\']);
        let chosen = (!include.is_empty() && include.iter().all(|p| literal(&p)))
            .then(|| include.iter().map(|p| p.trim_end_matches('/')).collect());
        let exclude = exclude.iter().filter(literal).map(String::as_str).collect();
        Selection { mounts, chosen, exclude }
    }

    /// Whether the snapshot's tree must be walked to prove the selection lands in volumes: not when
    /// each of its backed-up paths is inside a mount or not restored at all, since restic's tree
    /// holds those paths and only their ancestors (directories restore creates under the root).
    /// A relative target is recorded as its absolute path but stored from the tree's root, so any
    /// trailing part of a path may be what the tree holds: every one must land. The walk is one more
    /// repository opening (~0.5 s), which a PVC member (`/stash-data` at `/`) saves.
    fn needs_walk(&self, paths: &[String]) -> bool {
        let lands = |path: &str| {
            let path = path.trim_end_matches('/');
            let starts = path.match_indices('/').map(|(i, _)| i);
            let mut suffixes = starts.map(|i| &path[i..]);
            path.starts_with('/') && suffixes.all(|p| matches!(self.place(p, true), Place::Inside | Place::Skipped))
        };
        paths.is_empty() || !paths.iter().all(|p| lands(p))
    }

    /// `/`, every directory above a mountPath, and every chosen path with the directories above
    /// it: the directories whose entries `place` must see. An entry that lands outside is one of
    /// their entries or lies under one that does (then that one lands outside too), so listing
    /// their entries finds it.
    fn leading_dirs(&self) -> BTreeSet<String> {
        let above = |path: &str| -> Vec<String> {
            let path = path.trim_end_matches('/');
            path.match_indices('/').map(|(i, _)| if i == 0 { "/".to_string() } else { path[..i].to_string() }).collect()
        };
        let mut dirs: BTreeSet<String> = BTreeSet::from(["/".to_string()]);
        dirs.extend(self.mounts.iter().flat_map(|m| above(m)));
        for chosen in self.chosen.iter().flatten().filter(|c| !c.is_empty()) {
            dirs.extend(above(chosen));
            dirs.insert(chosen.to_string());
        }
        dirs
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
fn only_batch(listing: &[Snapshot], namespace: &str) -> Result<String, AgentError> {
    let batches: BTreeSet<&str> = listing
        .iter()
        .filter(|s| is_manifest(s) && s.tag(NAMESPACE_TAG).is_none_or(|ns| ns == namespace))
        .filter_map(|s| s.tag("batch"))
        .collect();
    let mut names = batches.iter();
    match (names.next(), names.next()) {
        (Some(batch), None) => Ok(batch.to_string()),
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
    use k8s_openapi::jiff::Timestamp;
    use proptest::prelude::*;

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn a_snapshot_whose_paths_all_land_in_volumes_needs_no_walk() {
        let mounts = strings(&["/stash-data"]);
        let none = Vec::new();
        let all = Selection::new(&mounts, &none, &none);
        assert!(!all.needs_walk(&strings(&["/stash-data"])), "the PVC member's own path");
        assert!(!all.needs_walk(&strings(&["/stash-data", "/stash-data/"])));
        assert!(all.needs_walk(&strings(&["/stash-data/a"])), "backed up as `a` from /stash-data, its tree holds /a");
        assert!(all.needs_walk(&strings(&["/stash-data", "/var"])), "one path outside: the walk finds it");
        assert!(all.needs_walk(&strings(&["/"])), "above the mount: its entries decide");
        assert!(all.needs_walk(&strings(&["stash-data"])), "a relative path is not trusted");
        assert!(all.needs_walk(&[]), "no paths listed");
        let excluded = strings(&["/var"]);
        let skipping = Selection::new(&mounts, &none, &excluded);
        assert!(!skipping.needs_walk(&strings(&["/stash-data", "/var"])), "what is excluded is not restored");
        // restic excludes nothing for "" and reads a glob or a relative pattern its own way: judged
        // to skip nothing, so the walk still proves where /var lands.
        for pattern in ["", "va?", "/va[r]", "var", "/va\\r"] {
            let unclear = strings(&[pattern]);
            let selection = Selection::new(&mounts, &none, &unclear);
            assert!(selection.needs_walk(&strings(&["/stash-data", "/var"])), "exclude {pattern:?}");
        }
        let deep = strings(&["/stash-data/uploads"]);
        assert!(Selection::new(&deep, &none, &none).needs_walk(&strings(&["/stash-data"])));
        // restic records a relative target as its absolute path but stores it at the tree's root:
        // backed up as `stash-data` from /srv/app, the snapshot says /srv/app/stash-data while its
        // tree holds /stash-data, which a mount at /srv does not take.
        let srv = strings(&["/srv"]);
        assert!(Selection::new(&srv, &none, &none).needs_walk(&strings(&["/srv/app/stash-data"])));
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

    fn listed(id: &str, host: &str, time: i64, tags: &[&str], paths: &[&str]) -> Snapshot {
        Snapshot {
            id: id.into(),
            short_id: id.chars().take(8).collect(),
            time: Timestamp::from_second(time).expect("time").to_string(),
            hostname: host.into(),
            tags: strings(tags),
            paths: strings(paths),
            summary: None,
        }
    }

    fn wanted<'a>(rule: Option<&'a RestoreRule>, selector: Option<&'a SessionSelector>) -> Wanted<'a> {
        Wanted { namespace: "prod", alias: "app", host: "app", rule, selector }
    }

    fn ids(source: Result<Source<'_>, AgentError>) -> Result<Vec<String>, String> {
        match source.map_err(|e| e.to_string())? {
            Source::StashLatest(found) => Ok(vec![found.id.clone()]),
            Source::Session => Ok(vec!["<session>".into()]),
        }
    }

    #[test]
    fn a_repository_stash_wrote_restores_the_newest_snapshot_of_the_rules_host() {
        let listing = [
            listed("a1aaaaaaaaaa", "app", 10, &[], &["/var/www/html"]),
            listed("a2aaaaaaaaaa", "app", 20, &[], &["/var/www/html"]),
            listed("a3aaaaaaaaaa", "app", 30, &[], &["/srv"]),
            listed("s1aaaaaaaaaa", "staging", 40, &[], &["/var/www/html"]),
        ];
        assert_eq!(ids(source(&listing, &wanted(None, None))), Ok(strings(&["a3aaaaaaaaaa"])));
        let paths = RestoreRule { paths: strings(&["/var/www/html"]), ..Default::default() };
        assert_eq!(ids(source(&listing, &wanted(Some(&paths), None))), Ok(strings(&["a2aaaaaaaaaa"])));
        let staging = RestoreRule { source_host: Some("staging".into()), ..Default::default() };
        assert_eq!(ids(source(&listing, &wanted(Some(&staging), None))), Ok(strings(&["s1aaaaaaaaaa"])));
        let latest = RestoreRule { snapshots: strings(&["latest"]), ..Default::default() };
        assert!(named_snapshots(Some(&latest)).is_empty(), "`latest` names no snapshot");
        assert_eq!(ids(source(&listing, &wanted(Some(&latest), None))), Ok(strings(&["a3aaaaaaaaaa"])));
        let missing = RestoreRule { source_host: Some("prod".into()), ..paths.clone() };
        let error = ids(source(&listing, &wanted(Some(&missing), None))).expect_err("no such host");
        assert!(error.contains("no snapshot of host prod with paths /var/www/html"), "{error}");
    }

    /// The walk starts on the snapshot the listing's tags say the latest manifest names: this
    /// member's in that session and namespace, of the host the manifest would pick; no guess when
    /// two would do.
    #[test]
    fn the_walk_guesses_the_snapshot_of_the_session_the_manifest_is_read_of() {
        let tags = |session: &str, namespace: &str, member: &str| {
            vec![
                format!("batch=b"),
                format!("session={session}"),
                format!("namespace={namespace}"),
                format!("member={member}"),
            ]
        };
        let snapshot = |id: &str, host: &str, time: i64, tags: Vec<String>| {
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            listed(id, host, time, &tags, &["/data"])
        };
        let manifest = |id: &str, session: &str, time: i64| {
            listed(
                id,
                "stash-manifest",
                time,
                &["stash=manifest", "batch=b", &format!("session={session}"), "namespace=prod"],
                &[],
            )
        };
        let mut listing = vec![
            manifest("m1", "s1", 10),
            manifest("m2", "s2", 20),
            snapshot("old", "app", 10, tags("s1", "prod", "app")),
            snapshot("new", "app-0", 20, tags("s2", "prod", "app")),
            snapshot("dev", "app-0", 20, tags("s2", "dev", "app")),
            snapshot("db", "app-0", 20, tags("s2", "prod", "db")),
        ];
        let guess = |listing: &[Snapshot], rule: Option<&RestoreRule>, selector: Option<&SessionSelector>| {
            let session = manifest::first_choice(listing, "prod", "b", selector)?;
            likely_snapshot(listing, &wanted(rule, selector), "b", session).map(|s| s.id.clone())
        };
        assert_eq!(guess(&listing, None, None), Some("new".into()), "the one host of the latest session");
        let first = SessionSelector { session: Some("s1".into()), ..Default::default() };
        assert_eq!(guess(&listing, None, Some(&first)), Some("old".into()));
        listing.push(snapshot("twin", "app-1", 20, tags("s2", "prod", "app")));
        assert_eq!(guess(&listing, None, None), None, "two hosts, none called app");
        let staging = RestoreRule { source_host: Some("app-1".into()), ..Default::default() };
        assert_eq!(guess(&listing, Some(&staging), None), Some("twin".into()));
        listing.push(snapshot("again", "app-1", 21, tags("s2", "prod", "app")));
        assert_eq!(guess(&listing, Some(&staging), None), None, "the host written twice");
    }

    /// What `ls` of a named snapshot showed.
    fn shown(snapshot: &Snapshot, outside: Option<&str>) -> Listed {
        Listed { snapshot: Some(snapshot.clone()), outside: outside.map(str::to_string) }
    }

    /// A named snapshot is judged by its own record: this member's in the source namespace or one
    /// Stash wrote, never another namespace's or member's, and with nothing landing outside.
    #[test]
    fn a_named_snapshot_is_restored_only_when_it_is_ours_and_lands_in_volumes() {
        let mounts = strings(&["/var/www/html"]);
        let none = Vec::new();
        let selection = Selection::new(&mounts, &none, &none);
        let judge = |id: &str, listed: Listed, database: bool| {
            judge_named(id, listed, &wanted(None, None), &selection, database).map(|s| s.id).map_err(|e| e.to_string())
        };
        let stash = listed("a1aaaaaaaaaa", "app", 10, &[], &["/var/www/html"]);
        let ours = listed("b1aaaaaaaaaa", "app", 5, &["batch=b", "session=s", "namespace=prod", "member=app"], &["/"]);
        let theirs = listed("c1aaaaaaaaaa", "app", 5, &["batch=b", "session=s", "namespace=dev", "member=app"], &[]);
        let other = listed("d1aaaaaaaaaa", "app", 5, &["batch=b", "session=s", "namespace=prod", "member=db"], &[]);
        assert_eq!(judge("a1aaaaaa", shown(&stash, None), false), Ok("a1aaaaaaaaaa".into()));
        assert_eq!(judge("b1aaaaaaaaaa", shown(&ours, None), false), Ok("b1aaaaaaaaaa".into()));
        for (id, refused) in [("c1aaaaaa", &theirs), ("d1aaaaaa", &other)] {
            let error = judge(id, shown(refused, None), false).expect_err("not ours");
            assert!(
                error.contains("neither a snapshot of member app in namespace prod nor one Stash wrote"),
                "{error}"
            );
        }
        assert!(judge("b1aaaaaa", Listed::default(), false).is_err(), "no record printed");
        assert!(judge("a1aaaaab", shown(&stash, None), false).is_err(), "a record of another id");
        let error = judge("b1aaaaaa", shown(&ours, Some("/etc/passwd")), false).expect_err("lands outside");
        assert!(error.contains("/etc/passwd of snapshot b1aaaaaaaaaa would land outside"), "{error}");
        assert!(judge("b1aaaaaa", shown(&ours, Some("/etc/passwd")), true).is_ok(), "a dump is replayed");
    }

    #[test]
    fn a_repository_with_our_sessions_never_restores_stashs_way() {
        let stash = listed("a1aaaaaaaaaa", "app", 10, &[], &["/var/www/html"]);
        let ours = listed("b1aaaaaaaaaa", "app", 5, &["batch=b", "session=s", "namespace=prod", "member=app"], &[]);
        let theirs = listed("c1aaaaaaaaaa", "app", 5, &["batch=b", "session=s", "namespace=dev", "member=app"], &[]);
        let legacy = listed("d1aaaaaaaaaa", "stash-manifest", 5, &["batch=b", "session=s", "stash=manifest"], &[]);
        for listing in [vec![stash.clone(), ours.clone()], vec![stash.clone(), legacy], vec![theirs.clone()], vec![]] {
            assert_eq!(ids(source(&listing, &wanted(None, None))), Ok(strings(&["<session>"])), "{listing:?}");
        }
        let asked = SessionSelector { session: Some("s".into()), ..Default::default() };
        let listing = [stash.clone(), theirs.clone()];
        assert_eq!(ids(source(&listing, &wanted(None, Some(&asked)))), Ok(strings(&["<session>"])));
        assert_eq!(
            ids(source(&listing, &wanted(None, Some(&SessionSelector::default())))),
            Ok(strings(&["a1aaaaaaaaaa"]))
        );
    }

    /// A random snapshot: our data, another namespace's or member's, a manifest, or Stash's (no tags).
    fn any_snapshot() -> impl Strategy<Value = Snapshot> {
        let owner = prop_oneof![Just(None), Just(Some("prod")), Just(Some("dev")), Just(Some("legacy"))];
        let member = prop_oneof![Just("app"), Just("db")];
        let host = prop_oneof![Just("app"), Just("staging"), Just("stash-manifest")];
        let paths = proptest::sample::subsequence(vec!["/var/www/html", "/srv"], 0..=2);
        (any::<u16>(), 0i64..50, owner, member, any::<bool>(), host, paths).prop_map(
            |(id, time, owner, member, manifest, host, paths)| {
                let mut tags = Vec::new();
                match owner {
                    // A manifest written before manifests named their namespace.
                    Some("legacy") => tags.extend(["batch=b", "session=s", "stash=manifest"].map(String::from)),
                    Some(namespace) => {
                        tags.extend(["batch=b".to_string(), "session=s".into(), format!("namespace={namespace}")]);
                        tags.push(if manifest { "stash=manifest".into() } else { format!("member={member}") });
                    }
                    None => {}
                }
                let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
                listed(&format!("{id:04x}{id:04x}aaaa"), host, time, &tags, &paths)
            },
        )
    }

    fn any_rule() -> impl Strategy<Value = Option<RestoreRule>> {
        let ids = proptest::collection::vec(prop_oneof![Just("latest".to_string()), "[0-9a-f]{8}"], 0..3);
        let host = proptest::option::of(prop_oneof![Just("app".to_string()), Just("staging".to_string())]);
        let paths = proptest::sample::subsequence(vec!["/var/www/html".to_string()], 0..=1);
        proptest::option::of((ids, host, paths).prop_map(|(snapshots, source_host, paths)| RestoreRule {
            snapshots,
            source_host,
            paths,
            ..Default::default()
        }))
    }

    proptest! {
        /// Whatever the repository holds and the rule asks (naming no snapshot), a restore in
        /// `prod` of member `app` restores Stash's way only when the repository holds nothing of
        /// `prod`, and then the newest snapshot Stash wrote of the host.
        #[test]
        fn a_restore_never_takes_another_namespaces_or_members_data(
            mut listing in proptest::collection::vec(any_snapshot(), 0..12),
            rule in any_rule(),
        ) {
            listing.dedup_by(|a, b| a.id == b.id);
            let mut rule = rule;
            if let Some(rule) = rule.as_mut() {
                rule.snapshots.retain(|s| s == "latest");
            }
            let ours = |s: &Snapshot| s.tag(NAMESPACE_TAG) == Some("prod");
            match source(&listing, &wanted(rule.as_ref(), None)) {
                Ok(Source::StashLatest(s)) => {
                    prop_assert!(stash_written(s));
                    let legacy = |s: &Snapshot| is_manifest(s) && s.tag(NAMESPACE_TAG).is_none();
                    prop_assert!(!listing.iter().any(|s| ours(s) || legacy(s)), "{listing:?}");
                    let host = rule.as_ref().and_then(|r| r.source_host.as_deref()).unwrap_or("app");
                    prop_assert_eq!(&s.hostname, host);
                    let time = |s: &Snapshot| s.time.parse::<Timestamp>().ok();
                    let mut newer = listing.iter().filter(|o| stash_written(o) && o.hostname == host && time(o) > time(s));
                    let paths = rule.as_ref().map(|r| r.paths.clone()).unwrap_or_default();
                    prop_assert!(!newer.any(|o| paths.iter().all(|p| o.paths.contains(p))));
                }
                Ok(Source::Session) | Err(_) => {}
            }
        }

        /// Whatever a named snapshot is and whatever its `ls` printed, a restore in `prod` of
        /// member `app` takes it only when it is the snapshot named, is `prod`'s of `app` or one
        /// Stash wrote, and lands in the volumes (or is a dump).
        #[test]
        fn a_named_snapshot_is_never_another_namespaces_or_members(
            snapshot in any_snapshot(),
            named in prop_oneof![(8usize..=12).prop_map(Some), Just(None)],
            other in "[0-9a-f]{8}",
            outside in proptest::option::of(any_path()),
            database in any::<bool>(),
        ) {
            let id = named.map_or(other, |len| snapshot.id[..len].to_string());
            let mounts = ["/var/www".to_string()];
            let none = Vec::new();
            let selection = Selection::new(&mounts, &none, &none);
            let listed = Listed { snapshot: Some(snapshot.clone()), outside: outside.clone() };
            if let Ok(taken) = judge_named(&id, listed, &wanted(None, None), &selection, database) {
                prop_assert!(taken.id.starts_with(&id));
                let ours = taken.tag(NAMESPACE_TAG) == Some("prod") && taken.tag("member") == Some("app");
                prop_assert!(ours || stash_written(&taken), "{taken:?}");
                prop_assert!(outside.is_none() || database || !selection.needs_walk(&taken.paths));
            }
        }

        /// Invariant 4 where the walk is skipped: whatever the snapshot records (relative targets
        /// included, whose tree holds any trailing part of the recorded path) and whatever the
        /// rule selects, everything the tree can hold under a recorded path lands in a volume or is
        /// not restored.
        #[test]
        fn skipping_the_walk_never_lets_data_land_outside_the_volumes(
            paths in proptest::collection::vec(any_path(), 1..3),
            mounts in proptest::collection::vec(any_path(), 1..3),
            include in proptest::collection::vec(any_path(), 0..2),
            exclude in proptest::collection::vec(any_path(), 0..2),
            leaf in "[a-c]",
        ) {
            let selection = Selection::new(&mounts, &include, &exclude);
            if !selection.needs_walk(&paths) {
                for path in &paths {
                    let starts = path.match_indices('/').map(|(i, _)| i);
                    for held in starts.map(|i| &path[i..]) {
                        for (entry, is_dir) in [(held.to_string(), true), (format!("{held}/{leaf}"), false)] {
                            let place = selection.place(&entry, is_dir);
                            prop_assert!(matches!(place, Place::Inside | Place::Skipped), "{entry}: {place:?}");
                        }
                    }
                }
            }
        }
    }

    proptest! {
        /// Invariant 4 where the walk runs: the one `restic ls` of the leading directories prints
        /// an entry that lands outside the volumes whenever the snapshot holds one.
        #[test]
        fn one_listing_finds_whatever_lands_outside_the_volumes(
            entries in proptest::collection::vec((any_path(), any::<bool>()), 1..6),
            mounts in proptest::collection::vec(any_path(), 1..3),
            include in proptest::collection::vec(any_path(), 0..2),
            exclude in proptest::collection::vec(any_path(), 0..2),
        ) {
            // The tree: each entry and every directory above it; what holds another is a directory.
            let mut tree = std::collections::BTreeMap::new();
            for (path, is_dir) in &entries {
                for (i, _) in path.match_indices('/').skip(1) {
                    tree.insert(path[..i].to_string(), true);
                }
                let held = entries.iter().any(|(other, _)| other != path && under(other, path));
                tree.entry(path.clone()).or_insert(*is_dir || held);
            }
            let selection = Selection::new(&mounts, &include, &exclude);
            let dirs = selection.leading_dirs();
            // What restic's `ls` prints for those directories: the entries within one of them whose
            // parent it enters (a directory above or equal to one of them).
            let parent = |p: &str| p.rfind('/').map_or("/", |i| if i == 0 { "/" } else { &p[..i] }).to_string();
            let printed = tree.iter().filter(|(path, _)| {
                dirs.iter().any(|d| under(d, &parent(path))) && dirs.iter().any(|d| under(path, d))
            });
            let found = printed.clone().any(|(path, is_dir)| selection.place(path, *is_dir) == Place::Outside);
            let held = tree.iter().any(|(path, is_dir)| selection.place(path, *is_dir) == Place::Outside);
            prop_assert_eq!(found, held, "listed {:?}, printed {:?}", dirs, printed.collect::<Vec<_>>());
        }
    }

    /// An absolute path of one to three components from a small alphabet, so that paths, mounts
    /// and rules often nest.
    fn any_path() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("stash-data")], 1..4)
            .prop_map(|parts| format!("/{}", parts.join("/")))
    }
}
