//! The reflector caches behind the webhook's answers: BackupBatches, Repositories, ReplicaSet and
//! Namespace metadata. The BackupBatches' cache is the controllers' too (`reflect::Shared`).

use super::decision::Catalog;
use super::target_index::TargetIndex;
use crate::api::{BackupBatch, Repository};
use crate::reflect::{Events, Listed, Shared};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use tokio::task::JoinSet;

/// Starts one reflector per kind on `tasks`; the returned catalog fills as they list and watch, and
/// each [`Listed`] says when one of them has completed its first list. The BackupBatches' cache is
/// returned for the controllers to follow too.
pub(crate) fn start(client: &Client, tasks: &mut JoinSet<()>) -> (Catalog, Vec<Listed>, Shared<BackupBatch>) {
    // With status, which admission does not read: the controllers do.
    let batches = watcher(Api::<BackupBatch>::all(client.clone()), watcher::Config::default());
    // Without status: admission reads specs only, and at 10,000 batches the statuses of batches and
    // Repositories (conditions with messages) were a tenth of the operator's memory.
    let repositories = watcher(Api::<Repository>::all(client.clone()), watcher::Config::default())
        .modify(|repository| repository.status = None);
    // Metadata only: the owner chain is all the webhook reads from a ReplicaSet.
    let replicasets = watcher(Api::<PartialObjectMeta<ReplicaSet>>::all(client.clone()), watcher::Config::default());
    // Metadata only: labels decide Repository usage policies (`tenancy`) without an API call per Pod.
    let namespaces = watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), watcher::Config::default());
    fed(tasks, batches, repositories, replicasets, namespaces)
}

/// The catalog fed by these event streams, on `tasks`, whether each has listed, and the batches'
/// cache to follow.
fn fed(
    tasks: &mut JoinSet<()>,
    batches: impl Events<BackupBatch>,
    repositories: impl Events<Repository>,
    replicasets: impl Events<PartialObjectMeta<ReplicaSet>>,
    namespaces: impl Events<PartialObjectMeta<Namespace>>,
) -> (Catalog, Vec<Listed>, Shared<BackupBatch>) {
    let targets = Arc::new(TargetIndex::default());
    let invalidate = targets.clone();
    let (shared, feeding) = Shared::feed(batches, move || invalidate.invalidate());
    tasks.spawn(feeding);
    let mut listed = vec![shared.listed.clone()];
    let repositories = reflect(tasks, &mut listed, repositories);
    let replicasets = reflect(tasks, &mut listed, replicasets);
    let namespaces = reflect(tasks, &mut listed, namespaces);
    let catalog = Catalog { batches: shared.store.clone(), repositories, replicasets, namespaces, targets };
    (catalog, listed, shared)
}

/// Starts a reflector for `K` on `tasks` and adds whether it has listed to `listed`.
fn reflect<K>(tasks: &mut JoinSet<()>, listed: &mut Vec<Listed>, events: impl Events<K>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (store, first_list, feeding) = crate::reflect::feed(events, |_| {});
    tasks.spawn(feeding);
    listed.push(first_list);
    store
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reflect::all_listed;
    use futures::channel::mpsc;
    use std::time::Duration;

    type Sender<K> = mpsc::UnboundedSender<Result<watcher::Event<K>, watcher::Error>>;

    fn list_nothing<K>(sender: &Sender<K>) {
        sender.unbounded_send(Ok(watcher::Event::Init)).expect("sent");
        sender.unbounded_send(Ok(watcher::Event::InitDone)).expect("sent");
    }

    /// The readiness probe and the controllers' start both wait for the webhook's first lists; each
    /// must go on once they complete (a kube `Store` wakes only one of two waiters).
    #[tokio::test]
    async fn every_waiter_for_the_first_lists_wakes() {
        let mut tasks = JoinSet::new();
        let (batches, batch_events) = mpsc::unbounded();
        let (repositories, repository_events) = mpsc::unbounded();
        let (replicasets, replicaset_events) = mpsc::unbounded();
        let (namespaces, namespace_events) = mpsc::unbounded();
        let (_catalog, listed, _batches) =
            fed(&mut tasks, batch_events, repository_events, replicaset_events, namespace_events);
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let listed = listed.clone();
                tokio::spawn(async move { all_listed(&listed).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        list_nothing::<BackupBatch>(&batches);
        list_nothing::<Repository>(&repositories);
        list_nothing::<PartialObjectMeta<ReplicaSet>>(&replicasets);
        list_nothing::<PartialObjectMeta<Namespace>>(&namespaces);
        for waiter in waiters {
            let woke = tokio::time::timeout(Duration::from_secs(5), waiter).await;
            assert!(matches!(woke, Ok(Ok(Ok(())))), "a waiter never woke");
        }
    }
}
