//! The reflector caches behind the webhook's answers: BackupBatches, Repositories, ReplicaSet and
//! Namespace metadata.

use super::decision::Catalog;
use super::target_index::TargetIndex;
use crate::api::{BackupBatch, Repository};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use tokio::task::JoinSet;

/// Starts one reflector per kind on `tasks`; the returned catalog fills as they list and watch.
pub fn start(client: &Client, tasks: &mut JoinSet<()>) -> Catalog {
    let targets = Arc::new(TargetIndex::default());
    let invalidate = targets.clone();
    // Without status: admission reads specs only, and at 10,000 batches their statuses (conditions
    // with messages) were a tenth of the operator's memory.
    let batches = watcher(Api::<BackupBatch>::all(client.clone()), watcher::Config::default())
        .modify(|batch| batch.status = None);
    let batches = reflect(tasks, batches, move || invalidate.invalidate());
    let repositories = watcher(Api::<Repository>::all(client.clone()), watcher::Config::default())
        .modify(|repository| repository.status = None);
    let repositories = reflect(tasks, repositories, || {});
    // Metadata only: the owner chain is all the webhook reads from a ReplicaSet.
    let replicasets = reflect(
        tasks,
        watcher(Api::<PartialObjectMeta<ReplicaSet>>::all(client.clone()), watcher::Config::default()),
        || {},
    );
    // Metadata only: labels decide Repository usage policies (`tenancy`) without an API call per Pod.
    let namespaces = reflect(
        tasks,
        watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), watcher::Config::default()),
        || {},
    );
    Catalog { batches, repositories, replicasets, namespaces, targets }
}

/// Starts a reflector for `K` on `tasks`; `changed` runs after the store applied each event.
fn reflect<K>(
    tasks: &mut JoinSet<()>,
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    changed: impl Fn() + Send + 'static,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (store, _, feeding) = crate::reflect::feed(events, changed);
    tasks.spawn(feeding);
    store
}

impl Catalog {
    /// Resolves once every cache has completed its first list.
    pub async fn synced(&self) -> Result<(), reflector::store::WriterDropped> {
        self.batches.wait_until_ready().await?;
        self.repositories.wait_until_ready().await?;
        self.replicasets.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await
    }
}
