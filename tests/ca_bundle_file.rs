//! Bring-your-own certificates (`--ca-bundle-file`) against the real API server: the operator serves
//! the pair a platform team mounts and publishes the CA bundle mounted beside it as the webhook
//! configuration's caBundle, at start and on every change. A CA rotated by hand the way a PKI job does
//! it (both CAs, then the new leaf, then the new CA alone), with files replaced as kubelet replaces a
//! Secret volume, fails no admission; a bundle that is empty or unparsable is refused and the last good
//! one stays published; the flag and `--self-signed-certs` are refused together.
//!
//! The operator runs in-process and the API server calls it at a loopback URL, so this needs no node;
//! on a cluster with one it runs the same.

mod support;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use stash::certs::{PemPair, generate_ca, issue_serving};
use stash::operator::CertificateSource;
use stash::webhook::ca_bundle::CaBundleFile;
use stash::webhook::tls::CertificateFiles;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::TestNamespace;
use support::operator::RunningOperator;
use support::webhook::{AdmissionLoad, ca_bundle, create_app_batch, handshake, register_webhook, webhook_is_effective};

const HOUR: Duration = Duration::from_secs(3600);
/// The mounted Secret's keys: the serving pair, and the CA bundle `--ca-bundle-file` names.
const FILES: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];

fn leaf_of(ca: &PemPair) -> PemPair {
    issue_serving(ca, &["localhost".into()], &["127.0.0.1".parse().expect("IP")], HOUR).expect("a leaf")
}

/// Writes one version of the Secret volume: the serving pair and the bundle.
fn secret_volume(volume: &Path, generation: usize, leaf: &PemPair, bundle: &[u8]) {
    support::volume::swap(volume, generation, |version| {
        for (name, content) in
            [("tls.crt", leaf.cert_pem.as_bytes()), ("tls.key", leaf.key_pem.as_bytes()), ("ca.crt", bundle)]
        {
            std::fs::write(version.join(name), content).expect("write");
        }
    });
}

/// A namespace with a batch targeting Deployment `app`, a webhook configuration of its own pointed at a
/// free loopback port with no caBundle, and a Secret volume holding `leaf` and `bundle`.
struct Setup {
    ns: TestNamespace,
    configuration: String,
    webhooks: Api<MutatingWebhookConfiguration>,
    port: u16,
    volume: tempfile::TempDir,
}

impl Setup {
    async fn new(prefix: &str, leaf: &PemPair, bundle: &[u8]) -> Self {
        let ns = TestNamespace::new(prefix).await;
        let configuration = format!("stash-{prefix}-{}", ns.name);
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let webhooks = register_webhook(&ns, &configuration, port, None).await;
        create_app_batch(&ns, &["app"]).await;
        let volume = tempfile::tempdir().expect("temp dir");
        secret_volume(volume.path(), 0, leaf, bundle);
        support::volume::link_files(volume.path(), &FILES);
        Self { ns, configuration, webhooks, port, volume }
    }

    /// The operator as the chart's existingSecret mode runs it: pair and bundle from the volume, the
    /// periodic re-read left at its default, so that only file events make changes quick.
    async fn start_operator(&self) -> RunningOperator {
        let dir = self.volume.path();
        let source = CertificateSource::Files {
            files: CertificateFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key") },
            poll: Duration::from_secs(30),
            ca_bundle: Some(CaBundleFile {
                path: dir.join("ca.crt"),
                webhook_configuration: self.configuration.clone(),
                injector_secret: None,
            }),
        };
        support::operator::start_on(Some(self.port), Some(source), None).await
    }

    async fn published(&self) -> Option<Vec<u8>> {
        ca_bundle(&self.webhooks, &self.configuration).await
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    async fn cleanup(self) {
        self.webhooks.delete(&self.configuration, &DeleteParams::default()).await.expect("cleanup");
    }
}

/// Polls `probe` every 10 ms until it holds; how long that took. Panics after `limit`.
async fn time_until<F, Fut>(what: &str, limit: Duration, mut probe: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !probe().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

/// The value of the metric line starting with `name` (labels included), if exported.
fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
}

fn not_after(pem: &str) -> f64 {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("X.509");
    cert.validity().not_after.timestamp() as f64
}

const PUBLISHED_OK: &str = "stash_webhook_ca_bundle_publishes_total{result=\"Ok\"}";
const PUBLISHED_FAILED: &str = "stash_webhook_ca_bundle_publishes_total{result=\"Failed\"}";
const BUNDLE_NOT_AFTER: &str = "stash_webhook_ca_bundle_not_after_seconds";

#[tokio::test]
async fn a_ca_rotated_by_hand_fails_no_admission() {
    let (ca1, ca2) = (generate_ca("platform-ca-1", HOUR).expect("CA"), generate_ca("platform-ca-2", HOUR).expect("CA"));
    let (leaf1, leaf2) = (leaf_of(&ca1), leaf_of(&ca2));
    let setup = Setup::new("byo-rotate", &leaf1, ca1.cert_pem.as_bytes()).await;
    let operator = setup.start_operator().await;
    assert_eq!(setup.published().await.as_deref(), Some(ca1.cert_pem.as_bytes()), "published at start");
    let pods = setup.ns.api::<Pod>();
    webhook_is_effective(&pods).await;

    let load = AdmissionLoad::start(&pods, 4);
    let both = format!("{}{}", ca1.cert_pem, ca2.cert_pem);
    let steps = [
        ("bundle CA1+CA2", &leaf1, both.as_str()),
        ("leaf from CA2", &leaf2, both.as_str()),
        ("bundle CA2 only", &leaf2, ca2.cert_pem.as_str()),
    ];
    for (generation, (step, leaf, bundle)) in steps.into_iter().enumerate() {
        let bundle_changed = setup.published().await.as_deref() != Some(bundle.as_bytes());
        secret_volume(setup.volume.path(), generation + 1, leaf, bundle.as_bytes());
        let published = time_until("the caBundle to follow the file", Duration::from_secs(10), || async {
            setup.published().await.as_deref() == Some(bundle.as_bytes())
        })
        .await;
        let served = time_until("the new leaf to be served", Duration::from_secs(10), || async {
            let served = handshake(setup.addr(), bundle.as_bytes()).await;
            served.is_ok_and(|cert| {
                cert.as_ref() == CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("PEM").as_ref()
            })
        })
        .await;
        if bundle_changed {
            eprintln!("{step}: file swapped -> caBundle in the API after {} ms", published.as_millis());
        } else {
            eprintln!("{step}: file swapped -> new leaf served after {} ms (caBundle unchanged)", served.as_millis());
        }
        // What a platform team waits between steps: every API server reads the new caBundle.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let admissions = load.stop().await;
    eprintln!(
        "admissions during the rotation: {} ({} with the sidecar, {} without, {} errors)",
        admissions.total(),
        admissions.injected,
        admissions.not_injected,
        admissions.errors
    );
    assert_eq!(admissions.failed(), 0, "no admission failed: {admissions:?}");
    assert!(admissions.injected >= 100, "the load kept the webhook busy: {admissions:?}");

    let metrics = operator.metrics().await;
    assert_eq!(metric(&metrics, PUBLISHED_OK), Some(3.0), "start and the two bundle changes:\n{metrics}");
    assert_eq!(metric(&metrics, BUNDLE_NOT_AFTER), Some(not_after(&ca2.cert_pem)), "{metrics}");
    operator.stop().await;
    setup.cleanup().await;
}

#[tokio::test]
async fn an_empty_or_unparsable_bundle_is_refused_and_the_last_good_one_stays() {
    let ca = generate_ca("platform-ca", HOUR).expect("CA");
    let leaf = leaf_of(&ca);
    let setup = Setup::new("byo-refuse", &leaf, ca.cert_pem.as_bytes()).await;
    let operator = setup.start_operator().await;
    let pods = setup.ns.api::<Pod>();
    webhook_is_effective(&pods).await;

    let half = &ca.cert_pem[..ca.cert_pem.len() / 2];
    let with_key = format!("{}{}", ca.cert_pem, leaf.key_pem);
    let bad: [(&str, &[u8]); 4] = [
        ("empty", b""),
        ("garbage", b"\x00\x01 not a certificate at all \xff"),
        ("half-written", half.as_bytes()),
        ("with a private key", with_key.as_bytes()),
    ];
    for (generation, (what, bundle)) in bad.into_iter().enumerate() {
        secret_volume(setup.volume.path(), generation + 1, &leaf, bundle);
        let failed = (generation + 1) as f64;
        time_until(&format!("the {what} bundle to be refused"), Duration::from_secs(10), || async {
            metric(&operator.metrics().await, PUBLISHED_FAILED).is_some_and(|count| count >= failed)
        })
        .await;
        assert_eq!(setup.published().await.as_deref(), Some(ca.cert_pem.as_bytes()), "{what}: the last good one stays");
    }
    assert!(support::webhook::mutates_dry_run_pod(&pods).await, "the webhook is still trusted");
    let metrics = operator.metrics().await;
    assert_eq!(metric(&metrics, PUBLISHED_OK), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, BUNDLE_NOT_AFTER), Some(not_after(&ca.cert_pem)), "{metrics}");

    // Fixed: the next good bundle is published.
    let other = generate_ca("platform-ca-next", HOUR).expect("CA");
    let fixed = format!("{}{}", ca.cert_pem, other.cert_pem);
    secret_volume(setup.volume.path(), 9, &leaf, fixed.as_bytes());
    time_until("the fixed bundle to be published", Duration::from_secs(10), || async {
        setup.published().await.as_deref() == Some(fixed.as_bytes())
    })
    .await;
    operator.stop().await;
    setup.cleanup().await;
}

/// Two owners of one caBundle would overwrite each other: the combination stops the operator before
/// it starts anything, whether the bundle is named by flag or by environment.
#[test]
fn a_ca_bundle_file_and_self_signed_certificates_are_refused_together() {
    for (args, env) in [
        (&["operator", "--self-signed-certs", "--ca-bundle-file=/etc/stash/ca/ca.crt"][..], None),
        (&["operator", "--self-signed-certs"][..], Some("/etc/stash/ca/ca.crt")),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stash"));
        command.args(args).env_remove("STASH_CA_BUNDLE_FILE");
        if let Some(path) = env {
            command.env("STASH_CA_BUNDLE_FILE", path);
        }
        let out = command.output().expect("stash runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?} started");
        assert!(stderr.contains("--ca-bundle-file") && stderr.contains("--self-signed-certs"), "{stderr}");
    }
}
