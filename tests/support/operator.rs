//! Runs `stash operator` in-process against the test cluster, on free loopback ports.

use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct RunningOperator {
    pub webhook_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub ca_pem: Vec<u8>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    _certs: tempfile::TempDir,
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("an address")
}

/// Starts the operator with a generated certificate on disk and waits until `/readyz` says ok.
pub async fn start() -> RunningOperator {
    start_on(None, None, None).await
}

/// Controllers for `namespace` only, under a Lease of their own in the operator's namespace (where
/// the shipped RBAC allows Leases), renewed every second.
pub fn controllers_for(
    namespace: &str,
    identity: &str,
) -> (stash::controller::ControllerSettings, stash::lease::LeaseConfig) {
    let settings = stash::controller::ControllerSettings {
        image: "stash:test".into(),
        namespace: Some(namespace.into()),
        identity: identity.into(),
        stall_after: Duration::from_secs(600),
        max_concurrent_reconciles: stash::controller::DEFAULT_MAX_CONCURRENT_RECONCILES,
    };
    let lease = stash::lease::LeaseConfig {
        namespace: super::OPERATOR_NAMESPACE.into(),
        name: format!("stash-operator-{namespace}"),
        identity: identity.into(),
        duration: Duration::from_secs(4),
        renew_every: Duration::from_secs(1),
    };
    (settings, lease)
}

/// Starts the operator with its webhook on `webhook_port` (else a free one) and `certificates` (else a
/// generated pair on disk), and waits until ready. It runs as the `stash-operator` ServiceAccount,
/// except when it maintains a caBundle (self-managed certificates, a CA bundle file): those tests keep
/// a webhook configuration (and Secret) of their own, which the shipped RBAC grants only under the
/// production names.
pub async fn start_on(
    webhook_port: Option<u16>,
    certificates: Option<stash::operator::CertificateSource>,
    controllers: Option<(stash::controller::ControllerSettings, stash::lease::LeaseConfig)>,
) -> RunningOperator {
    start_configured(webhook_port, certificates, controllers, None).await
}

/// Starts the operator, without controllers, answering only the webhook clients `client_auth` admits.
pub async fn start_with_client_auth(client_auth: stash::webhook::client_auth::ClientAuth) -> RunningOperator {
    start_configured(None, None, None, Some(client_auth)).await
}

async fn start_configured(
    webhook_port: Option<u16>,
    certificates: Option<stash::operator::CertificateSource>,
    controllers: Option<(stash::controller::ControllerSettings, stash::lease::LeaseConfig)>,
    webhook_client_auth: Option<stash::webhook::client_auth::ClientAuth>,
) -> RunningOperator {
    let certs = tempfile::tempdir().expect("temp dir");
    stash::certs::generate_to_dir(
        certs.path(),
        &["localhost".into()],
        &["127.0.0.1".parse().expect("IP")],
        None,
        Duration::from_secs(3600),
        Duration::from_secs(86400),
    )
    .expect("certificates");
    let config = stash::operator::OperatorConfig {
        webhook_addr: webhook_port.map_or_else(free_port, |port| SocketAddr::from(([127, 0, 0, 1], port))),
        admin_addr: free_port(),
        certificates: certificates.unwrap_or(stash::operator::CertificateSource::Files {
            files: stash::webhook::tls::CertificateFiles {
                cert: certs.path().join("tls.crt"),
                key: certs.path().join("tls.key"),
            },
            poll: Duration::from_secs(30),
            ca_bundle: None,
        }),
        sidecar_image: "stash:test".into(),
        max_body_bytes: 4 * 1024 * 1024,
        webhook_client_auth,
        controllers,
    };
    let (webhook_addr, admin_addr) = (config.webhook_addr, config.admin_addr);
    let cancel = CancellationToken::new();
    let kube_config = match config.certificates {
        stash::operator::CertificateSource::SelfSigned(_)
        | stash::operator::CertificateSource::Files { ca_bundle: Some(_), .. } => {
            super::config_for(&super::cluster().kubeconfig).await
        }
        stash::operator::CertificateSource::Files { ca_bundle: None, .. } => super::operator_config().await,
    };
    let run = stash::operator::run(kube_config, config, cancel.clone());
    let task = tokio::spawn(async move { run.await.expect("the operator runs") });
    let http = reqwest::Client::new();
    super::eventually("the operator to be ready", Duration::from_secs(60), || {
        let request = http.get(format!("http://{admin_addr}/readyz")).send();
        async move { request.await.ok().filter(|r| r.status() == 200).map(|_| ()) }
    })
    .await;
    let ca_pem = std::fs::read(certs.path().join("ca.crt")).expect("CA");
    RunningOperator { webhook_addr, admin_addr, ca_pem, cancel, task: Some(task), _certs: certs }
}

impl RunningOperator {
    /// Stops the operator the way SIGTERM does and waits for it to finish.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("the operator stops cleanly");
        }
    }

    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin_addr);
        reqwest::get(url).await.expect("metrics").text().await.expect("text")
    }

    /// The samples of metric `name` whose label text (`{a="b",…}`) `keep` accepts, by label text.
    pub async fn samples(&self, name: &str, keep: impl Fn(&str) -> bool) -> std::collections::BTreeMap<String, f64> {
        let text = self.metrics().await;
        text.lines()
            .filter_map(|line| {
                let (labels, value) = line.strip_prefix(name)?.rsplit_once(' ')?;
                let value = value.parse().ok()?;
                (labels.is_empty() || labels.starts_with('{')).then(|| (labels.to_string(), value))
            })
            .filter(|(labels, _)| keep(labels))
            .collect()
    }
}

impl Drop for RunningOperator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
