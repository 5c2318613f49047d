//! Reflector stores fed in the background, shared by the webhook's and the controllers' caches.

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use tokio::sync::broadcast::{self, error::RecvError};
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
/// `changed` runs with each event after the store applied it; watch errors are logged and retried
/// with backoff.
pub(crate) fn feed<K>(
    events: impl Events<K>,
    changed: impl Fn(&watcher::Event<K>) + Send + 'static,
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
                Ok(event) => changed(&event),
                Err(err) => tracing::warn!(%kind, error = %err, "watch failed; retrying with backoff"),
            }
        }
    };
    (reader, listed, feeding)
}

/// Changes a follower of a [`Shared`] store may not have missed by more than this before it reads
/// the whole store again.
const FOLLOWER_BUFFER: usize = 1024;

/// One cache with two readers: the webhook, which keeps it from the start, and the controllers,
/// which follow it while this replica leads. At 10,000 BackupBatches a second watch of their own
/// was a second copy of every batch and, on a new leader, a second list of them all.
#[derive(Clone)]
pub(crate) struct Shared<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    pub(crate) store: Store<K>,
    pub(crate) listed: Listed,
    changes: broadcast::Sender<Change<K>>,
}

/// What the store applied: one object, or every object anew (a list completed).
enum Change<K: Resource> {
    One(ObjectRef<K>),
    All,
}

// Derived, `Clone` would need `K: Clone`; a reference clones without it.
impl<K: Resource> Clone for Change<K>
where
    K::DynamicType: Clone,
{
    fn clone(&self) -> Self {
        match self {
            Change::One(reference) => Change::One(reference.clone()),
            Change::All => Change::All,
        }
    }
}

impl<K> Shared<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    /// As [`feed`], for a store that others may [`follow`](Self::follow).
    pub(crate) fn feed(
        events: impl Events<K>,
        changed: impl Fn() + Send + 'static,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (changes, _) = broadcast::channel(FOLLOWER_BUFFER);
        let publish = changes.clone();
        let (store, listed, feeding) = feed(events, move |event| {
            changed();
            let change = match event {
                watcher::Event::Apply(object) => Change::One(ObjectRef::from_obj(object)),
                // A list's objects reach the store together, when it completes.
                watcher::Event::InitDone => Change::All,
                // Deletions: the controllers see their objects go through finalizers, as updates.
                watcher::Event::Init | watcher::Event::InitApply(_) | watcher::Event::Delete(_) => return,
            };
            // An error only says that nobody follows (this replica does not lead).
            let _ = publish.send(change);
        });
        (Shared { store, listed, changes }, feeding)
    }

    /// Every object in the store now, then each one as the store applies it. A follower that falls
    /// more than [`FOLLOWER_BUFFER`] changes behind gets the whole store again: the store's writer
    /// never waits for a follower, so the webhook's answers never wait for the controllers.
    pub(crate) fn follow(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        // Subscribed before the store is read: a change in between comes twice, never not at all.
        let receiver = self.changes.subscribe();
        let now = self.store.state();
        let later = futures::stream::unfold((receiver, self.store.clone()), |(mut receiver, store)| async move {
            let objects = match receiver.recv().await {
                Ok(Change::One(reference)) => store.get(&reference).into_iter().collect(),
                Ok(Change::All) | Err(RecvError::Lagged(_)) => store.state(),
                Err(RecvError::Closed) => return None,
            };
            Some((futures::stream::iter(objects), (receiver, store)))
        });
        futures::stream::iter(now).chain(later.flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;
    use std::collections::BTreeSet;
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

    fn map(name: &str, value: usize) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta { name: Some(name.into()), namespace: Some("ns".into()), ..Default::default() },
            data: Some([("value".to_string(), value.to_string())].into()),
            ..Default::default()
        }
    }

    fn named(map: &ConfigMap) -> (String, String) {
        let value = map.data.as_ref().and_then(|data| data.get("value")).cloned().unwrap_or_default();
        (map.metadata.name.clone().unwrap_or_default(), value)
    }

    async fn next_ones(
        follower: &mut (impl Stream<Item = Arc<ConfigMap>> + Unpin),
        count: usize,
    ) -> BTreeSet<(String, String)> {
        let mut seen = BTreeSet::new();
        for _ in 0..count {
            let next = tokio::time::timeout(Duration::from_secs(5), follower.next()).await;
            let map = next.expect("the follower went on").expect("the follower did not end");
            seen.insert(named(&map));
        }
        seen
    }

    fn pair(name: &str, value: usize) -> (String, String) {
        (name.to_string(), value.to_string())
    }

    /// A follower gets what the store held when it began, then each change. One that falls behind
    /// holds nothing back: the store goes on, and the follower then reads it whole.
    #[tokio::test]
    async fn a_follower_sees_every_object_and_never_holds_the_store_back() {
        let (sender, events) = futures::channel::mpsc::unbounded::<Result<watcher::Event<ConfigMap>, watcher::Error>>();
        let send = |event| sender.unbounded_send(Ok(event)).expect("sent");
        let (shared, feeding) = Shared::feed(events, || {});
        tokio::spawn(feeding);
        send(watcher::Event::Init);
        send(watcher::Event::InitApply(map("a", 1)));
        send(watcher::Event::InitDone);
        shared.listed.wait().await.expect("listed");

        let mut follower = Box::pin(shared.follow());
        assert_eq!(next_ones(&mut follower, 1).await, BTreeSet::from([pair("a", 1)]), "what the store held");
        send(watcher::Event::Apply(map("b", 1)));
        assert_eq!(next_ones(&mut follower, 1).await, BTreeSet::from([pair("b", 1)]), "a change");

        // Unread for more changes than a follower may miss.
        for value in 0..=FOLLOWER_BUFFER {
            send(watcher::Event::Apply(map("b", value)));
        }
        let reference = ObjectRef::new("b").within("ns");
        let latest = || shared.store.get(&reference).map(|map| named(&map));
        let caught_up = async {
            while latest() != Some(pair("b", FOLLOWER_BUFFER)) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), caught_up).await.expect("the store waited for the follower");
        assert_eq!(
            next_ones(&mut follower, 2).await,
            BTreeSet::from([pair("a", 1), pair("b", FOLLOWER_BUFFER)]),
            "a follower that fell behind reads the whole store"
        );
    }
}
