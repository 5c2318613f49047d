//! `stash restore`: restores one member of a RestoreBatch from one complete session — the latest,
//! a named one, or the last before a time — chosen through the manifests in the repository, so a
//! restore never mixes runs and works on an empty cluster. Files go back under the path root (the
//! snapshot keeps the application's paths); a database gets its dump replayed.

use super::database::{Connection, Engine};
use super::executor::{AgentError, Executor};
use super::manifest::{self, MANIFEST_TAG};
use super::retention::NAMESPACE_TAG;
use super::sidecar::host_name;
use super::status::{matches, seconds};
use crate::api::RestoreBatch;
use crate::api::restore_batch::{HostRestoreStats, RestoreMember, RestoreMemberPhase, RestoreMemberStatus};
use crate::controller::backup_job::DATABASE_KIND;
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
    let started = Instant::now();
    let result = restore_member(executor, &restore, member, target).await;
    let (host, session) = match &result {
        Ok((host, session)) => (host.clone(), Some(session.clone())),
        Err(_) => (member_host(executor, member).unwrap_or_else(|_| member.target.alias.clone()), None),
    };
    let entry = HostRestoreStats {
        hostname: host,
        phase: Some(if result.is_ok() { RestoreMemberPhase::Succeeded } else { RestoreMemberPhase::Failed }),
        duration: Some(seconds(started.elapsed())),
        error: result.as_ref().err().map(ToString::to_string),
    };
    report(executor, &target.restore_batch, member, entry, session).await?;
    result.map(drop)
}

fn member_host(executor: &Executor, member: &RestoreMember) -> Result<String, AgentError> {
    let alias =
        if member.target.alias.is_empty() { member.target.reference.name.clone() } else { member.target.alias.clone() };
    let settings = &executor.settings;
    host_name(&member.target.reference.kind, &alias, settings.pod_name.as_deref(), settings.node_name.as_deref())
}

/// Restores the member; returns the host restored and the session it came from.
async fn restore_member(
    executor: &Executor,
    restore: &RestoreBatch,
    member: &RestoreMember,
    target: &RestoreTarget,
) -> Result<(String, String), AgentError> {
    let repository = executor.repository(&restore.spec.repository).await?;
    let restic = executor.restic(&repository).await?;
    let selector = restore.spec.restore_from.as_ref();
    let batch = match selector.and_then(|s| s.batch.clone()) {
        Some(batch) => batch,
        None => only_batch(&restic, executor.namespace()).await?,
    };
    let manifest = manifest::select(&restic, executor.namespace(), &batch, selector).await?;
    let rule = member.target.rules.first();
    let source = manifest.member(&target.kind, &target.name).ok_or_else(|| {
        AgentError::Invalid(format!("session {} holds no member {}/{}", manifest.session, target.kind, target.name))
    })?;
    let wanted = match rule.and_then(|r| r.source_host.clone()) {
        Some(host) => host,
        None if source.hosts.len() == 1 => source.hosts[0].hostname.clone(),
        None => member_host(executor, member)?,
    };
    let host =
        source.hosts.iter().find(|h| h.hostname == wanted).ok_or_else(|| {
            AgentError::Invalid(format!("session {} has no snapshot of host {wanted}", manifest.session))
        })?;
    restore_snapshot(executor, &restic, member, &host.snapshot, target).await?;
    Ok((host.hostname.clone(), manifest.session.clone()))
}

async fn restore_snapshot(
    executor: &Executor,
    restic: &Restic,
    member: &RestoreMember,
    snapshot: &str,
    target: &RestoreTarget,
) -> Result<(), AgentError> {
    if target.kind == DATABASE_KIND {
        let engine = Engine::from_task(member.task.as_ref().map(|t| t.name.as_str()));
        let connection = Connection::from_secret(engine, SecretValues::read_dir(&target.database_secret_dir)?)?;
        return connection.restore(restic, snapshot).await;
    }
    let include: Vec<String> =
        member.target.rules.iter().flat_map(|r| r.paths.iter().chain(r.include.iter()).cloned()).collect();
    let root = &executor.settings.path_root;
    std::fs::create_dir_all(root).map_err(|e| AgentError::Invalid(format!("creating {}: {e}", root.display())))?;
    restic.restore(snapshot, root, &include).await?;
    Ok(())
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
