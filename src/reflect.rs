//! Reflector stores fed in the background, shared by the webhook's and the controllers' caches.

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use std::future::Future;
use std::hash::Hash;

/// Drops what no reader of a cache needs: the managedFields, which at 10,000 BackupBatches (three
/// field managers each, one of them for the status) were most of the operator's memory.
pub(crate) fn lean<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// A store fed by `events` (lean), and the future that feeds it until dropped: `changed` runs after
/// the store applied each event; watch errors are logged and retried with backoff.
pub(crate) fn feed<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    changed: impl Fn() + Send + 'static,
) -> (Store<K>, impl Future<Output = ()> + Send + 'static)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let stream = reflector::reflector(writer, events.modify(lean).default_backoff());
    let feeding = async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed(),
                Err(err) => tracing::warn!(%kind, error = %err, "watch failed; retrying with backoff"),
            }
        }
    };
    (reader, feeding)
}
