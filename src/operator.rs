//! `stash operator`: the webhook, the caches behind it and the admin port, in one process.

use crate::admin::{self, Readiness};
use crate::controller::ControllerSettings;
use crate::controller::leader::run_while_leader;
use crate::lease::LeaseConfig;
use crate::metrics::Metrics;
use crate::webhook::ca_bundle::{self, CaBundleError, CaBundleFile, CaBundlePublisher, Hold, InjectorSecret};
use crate::webhook::client_auth::{ClientAuth, ClientAuthError};
use crate::webhook::mutate::Mutator;
use crate::webhook::self_signed::{SelfManagedCertificates, SelfSignedConfig, SelfSignedError};
use crate::webhook::server::{ConnectionLimits, serve_tls};
use crate::webhook::tls::{CertificateFiles, FileChanges, ServingCertificate, TlsError, server_config};
use crate::webhook::{caches, routes};
use kube::Client;
use prometheus_client::metrics::gauge::Gauge;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("connecting to the Kubernetes API (KUBECONFIG or in-cluster config): {0}")]
    Kube(#[from] kube::Error),
    #[error("serving certificate: {0}")]
    Tls(#[from] TlsError),
    #[error("self-managed certificates: {0}")]
    SelfSigned(#[from] SelfSignedError),
    #[error(transparent)]
    CaBundle(#[from] CaBundleError),
    #[error(transparent)]
    ClientAuth(#[from] ClientAuthError),
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

/// Where the webhook's serving certificate comes from.
#[derive(Debug, Clone)]
pub enum CertificateSource {
    /// PEM files, reloaded on change and every `poll` (Secret volume, cert-manager, platform tooling),
    /// with the CA bundle to publish as the webhook configuration's caBundle when the platform team
    /// brings its own CA.
    Files { files: CertificateFiles, poll: Duration, ca_bundle: Option<CaBundleFile> },
    /// A CA and leaf the operator generates, keeps in a Secret and rotates itself.
    SelfSigned(SelfSignedConfig),
}

#[derive(Debug, Clone)]
pub struct OperatorConfig {
    pub webhook_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub certificates: CertificateSource,
    pub sidecar_image: String,
    pub max_body_bytes: usize,
    /// Who may call the webhook; `None` answers any client that reaches it.
    pub webhook_client_auth: Option<ClientAuth>,
    /// The controllers and the Lease they run under; `None` serves the webhook only.
    pub controllers: Option<(ControllerSettings, LeaseConfig)>,
}

async fn listen(addr: SocketAddr) -> Result<TcpListener, OperatorError> {
    TcpListener::bind(addr).await.map_err(|source| OperatorError::Listen { addr, source })
}

/// Keeps the serving pair and the published CA bundle in step with their files, until cancelled: one
/// watcher, so that a Secret volume holding both is read once per kubelet update.
async fn watch_with_bundle(
    files: &CertificateFiles,
    serving: &ServingCertificate,
    mut publisher: CaBundlePublisher,
    poll: Duration,
    cancel: CancellationToken,
) -> Result<(), TlsError> {
    let bundle = publisher.path().to_path_buf();
    let file = publisher.file().clone();
    let mut changes = FileChanges::watch(&[&files.cert, &files.key, &bundle], poll, cancel.clone())?;
    while changes.next().await {
        match &file.injector_secret {
            None => {
                files.reload_logged(serving);
                publisher.sync_logged().await;
            }
            // Trust first: the new CA joins the injector's Secret, then the leaf waits for the caBundle.
            Some(secret) => {
                publisher.sync_logged().await;
                let configuration = &file.webhook_configuration;
                if wait_until_trusted(publisher.client(), configuration, files, serving, secret, &cancel).await {
                    files.reload_logged(serving);
                }
            }
        }
    }
    Ok(())
}

/// How long a leaf no CA of the caBundle signed is held back before it is served anyway (the CA
/// injector is not running, or its Secret is not the one the configuration names): the served leaf
/// may be close to expiring, and the failures then show in the API server's metrics and Events.
const UNTRUSTED_HOLD_LIMIT: Duration = Duration::from_secs(300);

/// Waits until the leaf in `files` may replace the one `serving` holds ([`ca_bundle::hold`]): at
/// once when a CA that signed the served leaf signed it, after the propagation delay when the
/// caBundle trusts it through a new CA, and up to [`UNTRUSTED_HOLD_LIMIT`] while it trusts it not.
/// `false` when cancelled.
async fn wait_until_trusted(
    client: &Client,
    configuration: &str,
    files: &CertificateFiles,
    serving: &ServingCertificate,
    secret: &InjectorSecret,
    cancel: &CancellationToken,
) -> bool {
    let Ok(new) = std::fs::read(&files.cert) else { return true };
    let served = serving.cert_pem();
    if new == served {
        return true;
    }
    let (new, served) = (String::from_utf8_lossy(&new), String::from_utf8_lossy(&served));
    let held = &serving.metrics().tls.certificate_held;
    let trusted = hold_until_trusted(client, configuration, (&served, &new), secret, held, cancel).await;
    held.set(0);
    trusted
}

/// [`wait_until_trusted`]'s loop; `held` is 1 while it waits.
async fn hold_until_trusted(
    client: &Client,
    configuration: &str,
    (served, new): (&str, &str),
    secret: &InjectorSecret,
    held: &Gauge<i64, AtomicI64>,
    cancel: &CancellationToken,
) -> bool {
    let started = tokio::time::Instant::now();
    loop {
        let hold = match ca_bundle::published_bundle(client, configuration).await {
            Ok(bundle) => ca_bundle::hold(&bundle, served, new),
            Err(err) => {
                tracing::warn!(error = %err, %configuration, "reading the caBundle; holding the new leaf");
                Hold::Untrusted
            }
        };
        let wait = match hold {
            Hold::SameCa => return true,
            Hold::NewCa => {
                tracing::info!(delay = ?secret.propagation_delay, "caBundle trusts the new CA; serving its leaf after the delay");
                secret.propagation_delay
            }
            Hold::Untrusted if started.elapsed() >= UNTRUSTED_HOLD_LIMIT => {
                tracing::warn!(
                    %configuration, secret = %secret.name,
                    "the caBundle still does not trust the new serving certificate; serving it anyway"
                );
                return true;
            }
            Hold::Untrusted => Duration::from_secs(1),
        };
        held.set(1);
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep(wait) => {}
        }
        if hold == Hold::NewCa {
            return true;
        }
    }
}

/// Loads the first serving pair and starts keeping it current on `tasks`.
async fn serving_certificate(
    client: &Client,
    source: CertificateSource,
    metrics: &Arc<Metrics>,
    tasks: &mut JoinSet<()>,
    cancel: &CancellationToken,
) -> Result<Arc<ServingCertificate>, OperatorError> {
    let cancel = cancel.clone();
    match source {
        CertificateSource::Files { files, poll, ca_bundle } => {
            let serving = files.load(metrics.clone())?;
            let watched = serving.clone();
            // A bundle that cannot be published stops the start, as a pair that does not load does.
            let mut publisher = ca_bundle.map(|file| CaBundlePublisher::new(client.clone(), file, metrics.clone()));
            if let Some(publisher) = &mut publisher {
                publisher.sync().await?;
            }
            tasks.spawn(async move {
                let watched = match publisher {
                    None => files.watch(watched, poll, cancel).await,
                    Some(publisher) => watch_with_bundle(&files, &watched, publisher, poll, cancel).await,
                };
                if let Err(err) = watched {
                    tracing::error!(error = %err, "certificate watch stopped; relying on restarts for rotation");
                }
            });
            Ok(serving)
        }
        CertificateSource::SelfSigned(config) => {
            let manager = SelfManagedCertificates::new(client.clone(), config);
            let pair = manager.reconcile().await?;
            let serving =
                ServingCertificate::new(pair.cert_pem.into_bytes(), pair.key_pem.into_bytes(), metrics.clone())?;
            tasks.spawn(manager.run(serving.clone(), cancel));
            Ok(serving)
        }
    }
}

/// Runs until `cancel` fires, then drains and returns. Every request of the client made from
/// `kube_config` is counted in `stash_api_requests`.
pub async fn run(
    kube_config: kube::Config,
    config: OperatorConfig,
    cancel: CancellationToken,
) -> Result<(), OperatorError> {
    // A client CA that does not load stops the operator before it starts anything.
    let client_verifier = match &config.webhook_client_auth {
        Some(auth) => {
            let verifier = auth.verifier()?;
            let (ca, names) = (auth.ca_file.display(), &auth.names);
            tracing::info!(%ca, ?names, "webhook clients must present a certificate this CA signed");
            Some(verifier)
        }
        None => {
            tracing::warn!(
                "the webhook answers any client that reaches it: anyone in the cluster can read what it \
                 would inject into a namespace's Pods; require the API server's client certificate with \
                 --webhook-client-ca-file (README: \"Who may call the webhook\")"
            );
            None
        }
    };
    let metrics = Arc::new(Metrics::default());
    let client = crate::api_requests::counted_client(kube_config, metrics.api_requests.clone())?;
    let readiness = Arc::new(Readiness::default());
    let mut tasks = JoinSet::new();

    let (catalog, listed, batches) = caches::start(&client, &mut tasks);
    {
        let (listed, readiness) = (listed.clone(), readiness.clone());
        tasks.spawn(async move {
            if crate::reflect::all_listed(&listed).await.is_ok() {
                readiness.caches_synced.store(true, Ordering::Release);
                tracing::info!("caches synced");
            }
        });
    }

    let serving = serving_certificate(&client, config.certificates, &metrics, &mut tasks, &cancel).await?;
    readiness.certificate_loaded.store(true, Ordering::Release);
    let tls = server_config(serving, client_verifier)?;

    let crds_ours = {
        let (client, readiness, cancel) = (client.clone(), readiness.clone(), cancel.clone());
        tokio::spawn(async move { crate::install::wait_until_ours(&client, &readiness, &cancel).await })
    };
    let controllers = config.controllers.clone().map(|(settings, lease)| {
        let (client, metrics, cancel, listed) = (client.clone(), metrics.clone(), cancel.clone(), listed.clone());
        let batches = batches.clone();
        tokio::spawn(async move {
            // Another installation's objects are not ours to run.
            if !matches!(crds_ours.await, Ok(true)) {
                return;
            }
            // The controllers follow the webhook's cache of batches, and list the rest of what they
            // read when leading: only once the webhook's caches have listed, so that a starting
            // process never holds both sets of first lists at once.
            if crate::reflect::all_listed(&listed).await.is_err() {
                return;
            }
            let lead = |token| {
                crate::controller::run(client.clone(), metrics.clone(), settings.clone(), batches.clone(), token)
            };
            run_while_leader(client.clone(), lease, metrics.clone(), cancel, lead).await;
        })
    });

    let mutator = Arc::new(Mutator::new(catalog, config.sidecar_image.clone()));
    let webhook_app = routes::router(mutator, metrics.clone(), config.max_body_bytes);
    let webhook_listener = listen(config.webhook_addr).await?;
    let admin_listener = listen(config.admin_addr).await?;
    tracing::info!(webhook = %config.webhook_addr, admin = %config.admin_addr, "operator serving");

    let webhook =
        tokio::spawn(serve_tls(webhook_listener, tls, webhook_app, ConnectionLimits::default(), cancel.clone()));
    let admin_app = admin::router(readiness, metrics);
    let admin_cancel = cancel.clone();
    let admin = tokio::spawn(async move {
        let served = axum::serve(admin_listener, admin_app)
            .with_graceful_shutdown(async move { admin_cancel.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "admin server failed");
        }
    });

    cancel.cancelled().await;
    tracing::info!("shutting down");
    let _ = webhook.await;
    let _ = admin.await;
    // The leader stops its controllers and hands back its Lease before the caches stop.
    if let Some(controllers) = controllers {
        let _ = tokio::time::timeout(Duration::from_secs(10), controllers).await;
    }
    tasks.abort_all();
    Ok(())
}
