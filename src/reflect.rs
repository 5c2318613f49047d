//! Reflector stores fed in the background, shared by the webhook's and the controllers' caches.

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use std::future::Future;
use std::hash::Hash;
use tokio::sync::watch;

/// Whether a reflector has completed its first list, awaited by any number of tasks at once. (A
/// kube `Store`'s own `wait_until_ready` wakes only the last of several concurrent waiters: a batch
/// reconcile waiting beside a session reconcile never woke.)
#[derive(Clone)]
pub(crate) struct Listed(watch::Receiver<bool>);

#[derive(Debug, thiserror::Error)]
#[error("a cache stopped before its first list")]
pub struct NeverListed;

impl Listed {
    pub(crate) async fn wait(&self) -> Result<(), NeverListed> {
        self.0.clone().wait_for(|listed| *listed).await.map(drop).map_err(|_| NeverListed)
    }
}

/// Resolves once each of `listed` has.
pub(crate) async fn all_listed(listed: &[Listed]) -> Result<(), NeverListed> {
    for one in listed {
        one.wait().await?;
    }
    Ok(())
}

/// `events` (a reflector's, so the store has applied each one) passed on, and a [`Listed`] that
/// turns true once they carried a complete list.
pub(crate) fn listing<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
) -> (impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>, Listed) {
    let (listed, receiver) = watch::channel(false);
    let events = events.inspect(move |event| {
        if let Ok(watcher::Event::InitDone) = event {
            listed.send_replace(true);
        }
    });
    (events, Listed(receiver))
}

/// Drops what no reader of a cache needs: the managedFields, which at 10,000 BackupBatches (three
/// field managers each, one of them for the status) were most of the operator's memory.
pub(crate) fn lean<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// A watch's events, as a reflector takes them.
pub(crate) trait Events<K>: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static {}
impl<K, S> Events<K> for S where S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static {}

/// A store fed by `events` (lean), whether it has listed, and the future that feeds it until dropped:
/// `changed` runs after the store applied each event; watch errors are logged and retried with
/// backoff.
pub(crate) fn feed<K>(
    events: impl Events<K>,
    changed: impl Fn() + Send + 'static,
) -> (Store<K>, Listed, impl Future<Output = ()> + Send + 'static)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let (stream, listed) = listing(reflector::reflector(writer, events.modify(lean).default_backoff()));
    let feeding = async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed(),
                Err(err) => tracing::warn!(%kind, error = %err, "watch failed; retrying with backoff"),
            }
        }
    };
    (reader, listed, feeding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use std::time::Duration;

    /// Two reconciles waiting at once both go on when the list completes.
    #[tokio::test]
    async fn every_concurrent_waiter_wakes_when_the_list_completes() {
        let (sender, events) = futures::channel::mpsc::unbounded::<Result<watcher::Event<ConfigMap>, watcher::Error>>();
        let (events, listed) = listing(events);
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn({
                    let listed = listed.clone();
                    async move { listed.wait().await }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        sender.unbounded_send(Ok(watcher::Event::Init)).expect("sent");
        sender.unbounded_send(Ok(watcher::Event::InitDone)).expect("sent");
        let forwarded: Vec<_> = events.take(2).collect().await;
        assert_eq!(forwarded.len(), 2, "events are passed on");
        for waiter in waiters {
            let woke = tokio::time::timeout(Duration::from_secs(5), waiter).await;
            assert!(matches!(woke, Ok(Ok(Ok(())))), "a waiter never woke");
        }
    }
}
