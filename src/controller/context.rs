//! What every reconcile shares: the client, the Event recorder, metrics, caches and settings.

use crate::api::common::ObjectReference;
use crate::api::{BackupBatch, BackupSession, Repository, RestoreBatch};
use crate::metrics::Metrics;
use crate::tenancy::{self, Refusal};
use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use std::sync::Arc;

/// The field manager of everything the controllers apply.
pub const FIELD_MANAGER: &str = "stash-operator";

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Image of the trigger CronJob and backup Jobs.
    pub trigger_image: String,
    /// The controller's own BackupBatch cache.
    pub batches: Store<BackupBatch>,
    /// A running host whose progress stands still this long is reported as stalled.
    pub stall_after: std::time::Duration,
    /// The session controller's cache: what a batch's metrics read of its sessions, with no request.
    pub sessions: Store<BackupSession>,
    /// The restore controller's cache, for the RestoreBatch metrics.
    pub restores: Store<RestoreBatch>,
    /// What the controllers read without a request.
    pub caches: super::caches::Caches,
    /// Asks for a sweep of the Repository grants (`grants::keep_swept`).
    pub sweep: tokio::sync::Notify,
    /// Asks the BackupBatch controller to reconcile a batch: a Ready one is otherwise left alone
    /// while it is unchanged, and its members' Pods may have changed (see `backup_session::start`).
    pub recheck: futures::channel::mpsc::UnboundedSender<ObjectRef<BackupBatch>>,
}

impl Context {
    /// The Repository `reference` names, authorised for `requester` (see `tenancy`), from the
    /// cache; a miss is read rather than refused, for an object created a moment ago may not have
    /// reached the cache yet.
    pub(crate) async fn repository(
        &self,
        requester: &str,
        reference: &ObjectReference,
    ) -> Result<Result<Repository, Refusal>, kube::Error> {
        let namespace = tenancy::repository_namespace(requester, reference);
        match self.caches.repositories.get(&ObjectRef::new(&reference.name).within(namespace)) {
            Some(found) => tenancy::authorize_found(&self.client, requester, reference, Some(&found)).await,
            None => tenancy::fetch_repository(&self.client, requester, reference).await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serializing: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("the controllers' caches stopped before their first list")]
    CachesStopped(#[from] crate::reflect::NeverListed),
    #[error("finalizer: {0}")]
    Finalizer(#[from] Box<kube::runtime::finalizer::Error<ControllerError>>),
}

/// Another reconcile created it meanwhile: just as good.
pub(crate) fn ignore_conflict<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(err) => Err(err),
    }
}

/// A delete whose object is already gone did what it was for.
pub(crate) fn ignore_missing<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}
