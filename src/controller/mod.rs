//! The operator's controllers: BackupBatch → trigger CronJob, the BackupSession lifecycle, and RestoreBatch.

mod app_binding;
pub mod backup_batch;
pub mod backup_job;
pub mod backup_session;
pub mod caches;
pub mod context;
pub mod executor_job;
mod finalize_retry;
mod grants;
mod identity;
pub mod leader;
pub(crate) mod observed;
pub mod progress;
pub mod restore_batch;
pub mod targets;
pub mod trigger;

use crate::api::{BackupBatch, BackupSession, Repository, RestoreBatch};
use crate::metrics::{ControllerLabels, Metrics, ReconcileLabels, ReconcileResult};
use crate::reflect::{Listed, Shared, lean, listing};
use context::{Context, ControllerError};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Reconciles each controller runs at once unless told otherwise.
pub const DEFAULT_MAX_CONCURRENT_RECONCILES: u16 = 32;

#[derive(Debug, Clone)]
pub struct ControllerSettings {
    /// Image of the trigger CronJobs and backup Jobs.
    pub image: String,
    /// Watch one namespace only (a namespaced install); all namespaces when `None`.
    pub namespace: Option<String>,
    /// This replica's name, for Events and the Lease.
    pub identity: String,
    /// A running host whose progress stands still this long is reported as stalled.
    pub stall_after: Duration,
    /// Reconciles each controller runs at once (0: unbounded). Each waiting reconcile holds its
    /// whole future: unbounded, a new leader over 10,000 batches peaked at 1.1 GiB.
    pub max_concurrent_reconciles: u16,
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// The namespace the controllers run (`--watch-namespace`), or all: the batches' cache they follow
/// is the webhook's, which holds every namespace's.
#[derive(Clone)]
struct Scope(Option<String>);

impl Scope {
    fn holds(&self, object: &impl Resource) -> bool {
        self.0.as_deref().is_none_or(|namespace| object.meta().namespace.as_deref() == Some(namespace))
    }

    /// How many of `batches` are in scope: the store's length unless a namespace is watched.
    fn count(&self, batches: &Store<BackupBatch>) -> usize {
        match self.0 {
            None => batches.len(),
            Some(_) => batches.state().iter().filter(|batch| self.holds(&***batch)).count(),
        }
    }
}

/// Runs the controllers until `cancel` fires; the BackupBatch controller follows `batches`.
pub(crate) async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    settings: ControllerSettings,
    batches: Shared<BackupBatch>,
    cancel: CancellationToken,
) {
    let namespace = settings.namespace.as_deref();
    let scope = Scope(settings.namespace.clone());
    let ours = watcher::Config::default().labels(&format!("{}={}", crate::api::PART_OF.0, crate::api::PART_OF.1));
    let reporter = Reporter { controller: "stash-operator".into(), instance: Some(settings.identity.clone()) };
    let config = controller::Config::default().concurrency(settings.max_concurrent_reconciles);
    let in_scope = scope.clone();
    let followed = batches.follow().filter(move |batch| futures::future::ready(in_scope.holds(&**batch)));
    let batch_controller = Controller::for_shared_stream(followed, batches.store.clone()).with_config(config.clone());
    let (batches, batches_listed) = (batches.store, batches.listed);
    let (restore_controller, restores_listed) = lean_controller(api::<RestoreBatch>(&client, namespace), &config);
    let (session_controller, sessions_listed) = lean_controller(api::<BackupSession>(&client, namespace), &config);
    let (mut caches, writers, feeds) = caches::Caches::new(
        &client,
        namespace,
        ours.clone(),
        // The grants to this scope's namespaces live in the Repositories' namespaces.
        watcher::Config::default().labels(&match namespace {
            Some(namespace) => format!("{}={namespace}", grants::REQUESTER_LABEL),
            None => grants::REQUESTER_LABEL.to_string(),
        }),
    );
    // Every namespace's Repositories, whatever the install's scope: a batch may use another
    // namespace's that allows it.
    let repositories = watcher(Api::<Repository>::all(client.clone()), Default::default()).modify(lean);
    let (repositories, listed) = listing(reflector(writers.repositories, repositories));
    caches.also_ready_when(listed);
    let repositories = repositories.default_backoff().touched_objects();
    let cronjobs = watcher(api::<PartialObjectMeta<CronJob>>(&client, namespace), ours.clone()).modify(lean);
    let (cronjobs, listed) = listing(reflector(writers.cronjobs, cronjobs));
    caches.also_ready_when(listed);
    let cronjobs = cronjobs.default_backoff().touched_objects();
    // The batch's metric series are computed from its sessions: a reconcile that costs no request
    // could otherwise run before a new leader's session cache has listed them, export a partial set
    // and, the batch being Ready, not run again.
    caches.also_ready_when(sessions_listed);
    // A grant is swept once no batch or restore uses it: not before both caches can say so.
    caches.also_ready_when(batches_listed);
    caches.also_ready_when(restores_listed);
    let (recheck, rechecks) = futures::channel::mpsc::unbounded();
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        metrics: metrics.clone(),
        trigger_image: settings.image.clone(),
        batches: batches.clone(),
        stall_after: settings.stall_after,
        sessions: session_controller.store(),
        restores: restore_controller.store(),
        caches,
        sweep: tokio::sync::Notify::new(),
        recheck,
    });
    let sweeping = grants::keep_swept(ctx.clone());

    let counting = keep_counted(scope.clone(), batches.clone(), metrics.clone());
    let by_repository = batches.clone();
    let batch_loop = batch_controller
        .owns_stream(cronjobs)
        .reconcile_on(rechecks)
        .watches_stream(repositories, move |repository: Repository| {
            // A Repository appearing or changing re-checks the batches that use it.
            let (name, namespace) = (repository.name_any(), repository.namespace());
            by_repository
                .state()
                .into_iter()
                .filter(|b| {
                    scope.holds(&**b)
                        && b.spec.repository.name == name
                        && b.spec.repository.namespace.clone().or(b.namespace()) == namespace
                })
                .map(|b| ObjectRef::from_obj(&*b))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(cancel.clone().cancelled_owned())
        .run(
            |batch, ctx: Arc<Context>| timed("backupbatch", ctx.clone(), reconcile_batch(batch, ctx)),
            |_, err, ctx| error_policy("backupbatch", err, ctx),
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));

    let restore_loop = restore_controller
        .owns(api::<Job>(&client, namespace), ours.clone())
        .graceful_shutdown_on(cancel.clone().cancelled_owned())
        .run(
            |restore, ctx: Arc<Context>| timed("restorebatch", ctx.clone(), reconcile_restore(restore, ctx)),
            |_, err, ctx| error_policy("restorebatch", err, ctx),
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));

    let session_loop = session_controller
        .owns(api::<Job>(&client, namespace), ours)
        .graceful_shutdown_on(cancel.clone().cancelled_owned())
        .run(
            |session, ctx: Arc<Context>| timed("backupsession", ctx.clone(), backup_session::reconcile(session, ctx)),
            |_, err, ctx| error_policy("backupsession", err, ctx),
            ctx,
        )
        .for_each(|_| futures::future::ready(()));

    // The feeds never end; the controllers end on `cancel`.
    let controllers = Box::pin(async {
        futures::join!(batch_loop, session_loop, restore_loop);
    });
    let background = Box::pin(async {
        futures::join!(feeds, sweeping, counting);
    });
    futures::future::select(controllers, background).await;
}

/// How often `stash_managed_backup_batches` is counted. A watched namespace's count walks the whole
/// shared cache (every namespace's batches), so it is not done per reconcile.
const COUNT_EVERY: Duration = Duration::from_secs(15);

/// Keeps `stash_managed_backup_batches` at the number of batches in scope, while this replica leads.
async fn keep_counted(scope: Scope, batches: Store<BackupBatch>, metrics: Arc<Metrics>) {
    let mut every = tokio::time::interval(COUNT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        metrics.controller.managed_batches.set(i64::try_from(scope.count(&batches)).unwrap_or(i64::MAX));
    }
}

/// A controller of `K` whose cache holds its objects lean (`reflect::lean`), and whether that cache
/// has completed its first list.
fn lean_controller<K>(api: Api<K>, config: &controller::Config) -> (Controller<K>, Listed)
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = kube::runtime::reflector::store();
    let (objects, listed) = listing(reflector(writer, watcher(api, watcher::Config::default()).modify(lean)));
    (Controller::for_stream(objects.applied_objects(), reader).with_config(config.clone()), listed)
}

/// The namespace's shared identities are removed with its last BackupBatch or RestoreBatch; this
/// finalizer, on both, makes sure the controller sees each one go.
pub const BATCH_FINALIZER: &str = "stash.appscode.com/cleanup";

async fn reconcile_batch(batch: Arc<BackupBatch>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    ctx.caches.ready().await?;
    let api: Api<BackupBatch> = Api::namespaced(ctx.client.clone(), &batch.namespace().unwrap_or_default());
    let reconciled = kube::runtime::finalizer(&api, BATCH_FINALIZER, batch, |event| async {
        match event {
            kube::runtime::finalizer::Event::Apply(batch) => backup_batch::reconcile(batch, ctx.clone()).await,
            kube::runtime::finalizer::Event::Cleanup(batch) => backup_batch::cleanup(batch, ctx.clone()).await,
        }
    })
    .await;
    // Its Repository, or whether it still exists, may have changed: so may the grants it needs.
    ctx.sweep.notify_one();
    reconciled.map_err(|err| ControllerError::Finalizer(Box::new(err)))
}

async fn reconcile_restore(restore: Arc<RestoreBatch>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    ctx.caches.ready().await?;
    let api: Api<RestoreBatch> = Api::namespaced(ctx.client.clone(), &restore.namespace().unwrap_or_default());
    let reconciled = kube::runtime::finalizer(&api, BATCH_FINALIZER, restore, |event| async {
        match event {
            kube::runtime::finalizer::Event::Apply(restore) => restore_batch::reconcile(restore, ctx.clone()).await,
            kube::runtime::finalizer::Event::Cleanup(restore) => restore_batch::cleanup(restore, ctx.clone()).await,
        }
    })
    .await;
    ctx.sweep.notify_one();
    reconciled.map_err(|err| ControllerError::Finalizer(Box::new(err)))
}

async fn timed(
    controller: &'static str,
    ctx: Arc<Context>,
    reconcile: impl Future<Output = Result<Action, ControllerError>>,
) -> Result<Action, ControllerError> {
    let started = Instant::now();
    let result = reconcile.await;
    let metrics = &ctx.metrics.controller;
    metrics.reconcile_duration.get_or_create(&ControllerLabels { controller }).observe(started.elapsed().as_secs_f64());
    let outcome = if result.is_ok() { ReconcileResult::Ok } else { ReconcileResult::Error };
    metrics.reconciles.get_or_create(&ReconcileLabels { controller, result: outcome }).inc();
    result
}

fn error_policy(controller: &'static str, err: &ControllerError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(controller, error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn batch(namespace: &str, name: &str) -> BackupBatch {
        let spec = serde_json::from_value(serde_json::json!({"repository": {"name": "repo"}, "members": []}));
        let mut batch = BackupBatch::new(name, spec.expect("a spec"));
        batch.metadata =
            ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..Default::default() };
        batch
    }

    /// The batches' cache is the webhook's, with every namespace's: an operator that watches one
    /// namespace reconciles and counts that namespace's only.
    #[test]
    fn a_watched_namespace_holds_only_its_own_batches() {
        let (store, mut writer) = kube::runtime::reflector::store();
        for (namespace, name) in [("a", "one"), ("a", "two"), ("b", "one")] {
            writer.apply_watcher_event(&watcher::Event::Apply(batch(namespace, name)));
        }
        let (everywhere, only_a) = (Scope(None), Scope(Some("a".into())));
        assert_eq!((everywhere.count(&store), only_a.count(&store)), (3, 2));
        assert!(everywhere.holds(&batch("b", "one")));
        assert!(only_a.holds(&batch("a", "one")) && !only_a.holds(&batch("b", "one")));
    }

    /// The gauge is counted apart from the reconciles (a watched namespace's count walks every
    /// namespace's batches), and goes back to 0 when this replica stops leading.
    #[tokio::test]
    async fn the_managed_batches_are_counted_without_a_reconcile() {
        let (store, mut writer) = kube::runtime::reflector::store();
        for (namespace, name) in [("a", "one"), ("a", "two"), ("b", "one")] {
            writer.apply_watcher_event(&watcher::Event::Apply(batch(namespace, name)));
        }
        let metrics = Arc::new(Metrics::default());
        let counting = tokio::spawn(keep_counted(Scope(Some("a".into())), store, metrics.clone()));
        let gauge = &metrics.controller.managed_batches;
        tokio::time::timeout(Duration::from_secs(5), async {
            while gauge.get() != 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the first count comes at once");
        counting.abort();
        metrics.controller.clear_objects();
        assert_eq!(gauge.get(), 0);
    }
}
