//! What every executor shares: the API client, where it runs, the repository Secret and restic.

use crate::api::backup_batch::BackupMember;
use crate::api::repository::Repository;
use crate::api::{BackupBatch, BackupSession};
use crate::lease::{LeaseConfig, LeaseError, LeaseLock};
use crate::restic::backend::{BackendError, Location};
use crate::restic::secrets::{SecretError, SecretValues};
use crate::restic::{Cache, Restic, ResticError, priority_prefix};
use crate::tenancy::LeaseFor;
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Restic(#[from] ResticError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Repository(#[from] crate::tenancy::Refusal),
    #[error("{kind} {namespace}/{name} not found")]
    NotFound { kind: &'static str, namespace: String, name: String },
    #[error(transparent)]
    RefusedArg(#[from] crate::api::backup_batch::MemberArgRefused),
    #[error("BackupBatch {batch} has no member {kind}/{name}")]
    NoSuchMember { batch: String, kind: String, name: String },
    #[error(
        "the repository Secret {name:?} is missing from namespace {namespace} (or has no keys): create it \
         there; the Pod started without it, as its volume is optional"
    )]
    RepositorySecretMissing { namespace: String, name: String },
    #[error("path {0} does not exist")]
    PathMissing(String),
    #[error("database: {0}")]
    Database(String),
    #[error("the session deadline passed")]
    DeadlinePassed,
    #[error("{0}")]
    Invalid(String),
}

/// Settings every executor takes from its flags and environment.
#[derive(Debug, Clone)]
pub struct ExecutorSettings {
    pub namespace: String,
    /// `POD_NAME`: the lock holder's identity and a StatefulSet Pod's ordinal.
    pub pod_name: Option<String>,
    /// `NODE_NAME`: a DaemonSet Pod's host name.
    pub node_name: Option<String>,
    /// The repository Secret, one file per key.
    pub secret_dir: PathBuf,
    pub restic_binary: Option<PathBuf>,
    /// Target paths are read under this directory (`/` in a Pod).
    pub path_root: PathBuf,
    /// restic's cache for a member's backups (see `member_restic`).
    pub cache_dir: PathBuf,
}

pub struct Executor {
    pub client: Client,
    pub settings: ExecutorSettings,
    recorder: Recorder,
}

impl Executor {
    pub fn new(client: Client, settings: ExecutorSettings, role: &str) -> Self {
        let reporter = Reporter { controller: format!("stash-{role}"), instance: settings.pod_name.clone() };
        let recorder = Recorder::new(client.clone(), reporter);
        Executor { client, settings, recorder }
    }

    pub fn namespace(&self) -> &str {
        &self.settings.namespace
    }

    /// This process's name for Leases: the Pod name, else host and pid.
    pub fn identity(&self) -> String {
        self.settings.pod_name.clone().unwrap_or_else(|| format!("{}-{}", own_hostname(), std::process::id()))
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    pub async fn batch(&self, name: &str) -> Result<BackupBatch, AgentError> {
        self.api::<BackupBatch>().get_opt(name).await?.ok_or_else(|| self.not_found("BackupBatch", name))
    }

    pub async fn session(&self, name: &str) -> Result<BackupSession, AgentError> {
        self.api::<BackupSession>().get_opt(name).await?.ok_or_else(|| self.not_found("BackupSession", name))
    }

    /// The Repository `reference` names, when this executor's namespace may use it. The same check as
    /// the operator's: a Job or sidecar runs on behalf of its namespace, whatever created it. A
    /// `Selector` policy reads the labels of this namespace only, which the executor's RoleBinding
    /// (namespaced) allows and no other namespace's.
    pub async fn repository(&self, reference: &crate::api::common::ObjectReference) -> Result<Repository, AgentError> {
        Ok(crate::tenancy::fetch_repository(&self.client, self.namespace(), reference).await??)
    }

    fn not_found(&self, kind: &'static str, name: &str) -> AgentError {
        AgentError::NotFound { kind, namespace: self.settings.namespace.clone(), name: name.to_string() }
    }

    /// restic for `repository`, opened with the mounted Secret.
    pub async fn restic(&self, repository: &Repository) -> Result<Restic, AgentError> {
        let secrets = repository_secret(&self.settings.secret_dir, repository, self.namespace())?;
        let location = Location::from_backend(&repository.spec.backend, &secrets)?;
        let restic = Restic::open(self.settings.restic_binary.clone(), location, secrets)?;
        // restic retries an unreachable backend for 15 minutes; say so at once instead.
        restic.probe().await?;
        Ok(restic)
    }

    /// restic for backing up `member`: its cache kept in the scratch volume unless the member's
    /// `tempDir.disableCaching` says otherwise, at the member's `nice`/`ionice` priority.
    pub async fn member_restic(&self, repository: &Repository, member: &BackupMember) -> Result<Restic, AgentError> {
        let cache = match member.temp_dir.as_ref().is_some_and(|t| t.disable_caching) {
            true => Cache::Off,
            false => Cache::Dir(self.settings.cache_dir.clone()),
        };
        let container = member.runtime_settings.as_deref().and_then(|r| r.container.as_ref());
        let nice = container.and_then(|c| c.nice.as_ref()).and_then(|n| n.adjustment);
        let ionice = container.and_then(|c| c.ionice.as_ref()).and_then(|i| i.class.map(|class| (class, i.class_data)));
        Ok(self.restic(repository).await?.caching(cache).with_priority(priority_prefix(nice, ionice)))
    }

    /// A Lease held by this process: `name` in `namespace`, renewed while work goes on.
    pub fn lease(&self, namespace: String, name: String) -> LeaseLock {
        let config = LeaseConfig {
            namespace,
            name,
            identity: self.identity(),
            duration: Duration::from_secs(60),
            renew_every: Duration::from_secs(5),
        };
        LeaseLock::new(self.client.clone(), config)
    }

    /// The Lease that serialises `work` on the repository with its other users' (`tenancy::repository_lease`).
    pub(crate) fn repository_lease(&self, repository: &Repository, work: LeaseFor) -> LeaseLock {
        let namespace = repository.namespace().unwrap_or_else(|| self.settings.namespace.clone());
        self.lease(namespace, crate::tenancy::repository_lease(repository, work))
    }

    /// Creates the repository on first use. Two hosts racing `restic init` would leave a config
    /// encrypted with a key the other overwrote, so creation happens under the repository's Lease.
    pub async fn ensure_repository(&self, restic: &Restic, repository: &Repository) -> Result<(), AgentError> {
        if restic.exists().await? {
            return Ok(());
        }
        self.repository_lease(repository, LeaseFor::Creation)
            .hold_while(async {
                if !restic.exists().await? {
                    restic.init().await?;
                }
                Ok::<(), AgentError>(())
            })
            .await?
    }

    /// Runs a file backup, `attempt` (one restic command, safe to run again), against a ready
    /// repository. A local one is readied first: its existence and locks are read from the
    /// directory. A network one is not asked first, because each restic opening of a remote
    /// repository costs a key derivation and round trips (~0.4 s, BENCHMARKS.md): the backup runs at
    /// once, not waiting for locks, and only when it finds no repository (created under the Lease)
    /// or a lock (stale ones healed, live ones waited for) does it run again. Stale shared locks,
    /// which never stop a backup, are healed by the finalize that needs the repository to itself.
    pub async fn backing_up<K: Resource<DynamicType = ()>, T>(
        &self,
        restic: &mut Restic,
        repository: &Repository,
        about: &K,
        mut attempt: impl AsyncFnMut(&Restic) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        if restic.is_local() {
            self.prepare_backup(restic, repository, about).await?;
            return attempt(restic).await;
        }
        restic.probe().await?;
        // The evidence that makes our own lock provably stale should we die holding it.
        super::locks::record_holder(self, about).await?;
        match restic.without_lock_wait(async |restic| attempt(restic).await).await {
            Err(AgentError::Restic(ResticError::NoRepository(_))) => self.ensure_repository(restic, repository).await?,
            Err(AgentError::Restic(ResticError::Locked(_))) => drop(super::locks::heal(self, restic, about).await?),
            done => return done,
        }
        attempt(restic).await
    }

    /// Readies the repository for a backup that cannot simply run again (a database dump): creates
    /// it on first use, then heals stale locks. A network repository is not first asked whether it
    /// exists: listing its locks fails the same way when it does not, so the usual case costs one
    /// opening instead of two.
    pub async fn prepare_backup<K: Resource<DynamicType = ()>>(
        &self,
        restic: &Restic,
        repository: &Repository,
        about: &K,
    ) -> Result<(), AgentError> {
        if restic.is_local() {
            // Both answers come from the directory, without restic.
            self.ensure_repository(restic, repository).await?;
            return super::locks::heal(self, restic, about).await.map(drop);
        }
        restic.probe().await?;
        match super::locks::heal(self, restic, about).await {
            // A repository created now holds no lock to heal.
            Err(AgentError::Restic(ResticError::NoRepository(_))) => self.ensure_repository(restic, repository).await,
            healed => healed.map(drop),
        }
    }

    /// Publishes an Event about `object`; failing to publish never fails the backup.
    pub async fn event<K: Resource<DynamicType = ()>>(&self, object: &K, warning: bool, reason: &str, note: String) {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %err, reason, "publishing an Event failed");
        }
    }
}

/// The kernel's host name: what restic writes into its lock files.
pub fn own_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// The repository Secret mounted at `dir`. Its volume is optional, so a Secret missing from this
/// namespace mounts as an empty directory: that is named here, not as a key restic lacks.
fn repository_secret(dir: &Path, repository: &Repository, namespace: &str) -> Result<SecretValues, AgentError> {
    let secrets = SecretValues::read_dir(dir)?;
    if secrets.is_empty() {
        let name = repository.spec.backend.storage_secret_name.clone();
        return Err(AgentError::RepositorySecretMissing { namespace: namespace.to_string(), name });
    }
    Ok(secrets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repository(secret: &str) -> Repository {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
            "metadata": {"name": "repo", "namespace": "shop"},
            "spec": {"backend": {"storageSecretName": secret, "rest": {"url": "http://127.0.0.1:1/"}}}
        }))
        .expect("a Repository")
    }

    /// A Secret missing from the namespace mounts empty (the volume is optional): the error names it.
    #[test]
    fn an_empty_repository_secret_volume_names_the_missing_secret() {
        let dir = tempfile::tempdir().expect("a directory");
        let err = repository_secret(dir.path(), &repository("shop-repo"), "shop").expect_err("no keys");
        let text = err.to_string();
        assert!(text.contains("\"shop-repo\"") && text.contains("namespace shop"), "{text}");

        std::fs::write(dir.path().join("RESTIC_PASSWORD"), "secret\n").expect("written");
        let secrets = repository_secret(dir.path(), &repository("shop-repo"), "shop").expect("keys");
        assert_eq!(secrets.get("RESTIC_PASSWORD"), Some("secret"));
    }
}
