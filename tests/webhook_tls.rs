//! The webhook's HTTPS server with real rustls clients: HTTP/1.1 and h2, limits, certificate rotation
//! under load (plain file replacement and Kubernetes' `..data` symlink swap), and a bad pair kept out.

use kube::runtime::reflector::store::Writer;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use stash::metrics::{Metrics, ReloadLabels, ReloadResult};
use stash::webhook::decision::Catalog;
use stash::webhook::mutate::Mutator;
use stash::webhook::routes;
use stash::webhook::server::{ConnectionLimits, serve_tls};
use stash::webhook::tls::{CertificateFiles, ServingCertificate, server_config};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const MAX_BODY: usize = 64 * 1024;

struct Server {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn empty_catalog() -> Catalog {
    Catalog::new(
        Writer::default().as_reader(),
        Writer::default().as_reader(),
        Writer::default().as_reader(),
        Writer::default().as_reader(),
    )
}

async fn start(cert: PathBuf, key: PathBuf) -> (Server, Arc<ServingCertificate>, CertificateFiles) {
    let metrics = Arc::new(Metrics::default());
    let files = CertificateFiles { cert, key };
    let serving = files.load(metrics.clone()).expect("the first pair loads");
    let tls = server_config(serving.clone()).expect("TLS config");
    let mutator = Arc::new(Mutator { catalog: empty_catalog(), sidecar_image: "stash:test".into() });
    let app = routes::router(mutator, metrics.clone(), MAX_BODY);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let cancel = CancellationToken::new();
    let task = tokio::spawn(serve_tls(listener, tls, app, ConnectionLimits::default(), cancel.clone()));
    let watch = files.clone().watch(serving.clone(), Duration::from_millis(200), cancel.clone());
    tokio::spawn(async move { watch.await.expect("watching works") });
    (Server { addr, metrics, cancel, task }, serving, files)
}

fn generate(dir: &Path, ca_dir: Option<&Path>) {
    stash::certs::generate_to_dir(
        dir,
        &["localhost".into()],
        &["127.0.0.1".parse().expect("IP")],
        ca_dir,
        Duration::from_secs(3600),
        Duration::from_secs(86400),
    )
    .expect("certificates are generated");
}

fn client(ca_pem: &[u8], http2: bool) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(ca_pem).expect("CA PEM");
    let builder = reqwest::Client::builder().use_rustls_tls().add_root_certificate(ca).timeout(Duration::from_secs(10));
    let builder = if http2 { builder.http2_prior_knowledge() } else { builder.http1_only() };
    builder.build().expect("a client")
}

fn review_body(uid: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
                    "namespace": "demo", "object": {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}}
    }))
    .expect("JSON")
}

async fn post(client: &reqwest::Client, addr: SocketAddr, body: Vec<u8>) -> reqwest::Result<reqwest::Response> {
    client.post(format!("https://localhost:{}/mutate-pods", addr.port())).body(body).send().await
}

/// The leaf certificate a fresh TLS connection is served.
async fn served_leaf(addr: SocketAddr, ca_pem: &[u8]) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.expect("CA PEM")).expect("a root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let tls = connector.connect(ServerName::try_from("localhost").expect("name"), tcp).await.expect("handshake");
    tls.get_ref().1.peer_certificates().expect("a chain")[0].clone().into_owned()
}

fn leaf_on_disk(path: &Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(path).expect("PEM").next().expect("a certificate").expect("valid PEM")
}

#[tokio::test]
async fn serves_admission_reviews_over_http1_and_h2() {
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), None);
    let (server, _, _) = start(dir.path().join("tls.crt"), dir.path().join("tls.key")).await;
    let ca = std::fs::read(dir.path().join("ca.crt")).expect("CA");
    for (http2, version) in [(false, reqwest::Version::HTTP_11), (true, reqwest::Version::HTTP_2)] {
        let response = post(&client(&ca, http2), server.addr, review_body("uid-1")).await.expect("a response");
        assert_eq!(response.version(), version);
        assert_eq!(response.status(), 200);
        let review: serde_json::Value = response.json().await.expect("JSON");
        assert_eq!(review["response"]["uid"], "uid-1");
        assert_eq!(review["response"]["allowed"], true);
    }
    let bad = post(&client(&ca, false), server.addr, b"{not json".to_vec()).await.expect("a response");
    assert_eq!(bad.status(), 400);
    let huge = post(&client(&ca, false), server.addr, vec![b' '; MAX_BODY + 1]).await.expect("a response");
    assert_eq!(huge.status(), 413);
    server.cancel.cancel();
    server.task.await.expect("the server stops cleanly");
    assert!(TcpStream::connect(server.addr).await.is_err(), "nothing listens after shutdown");
}

/// Replaces the pair the way kubelet updates a Secret volume: a new timestamped directory, then an
/// atomic swap of the `..data` symlink that `tls.crt` and `tls.key` point through.
fn swap_secret_volume(volume: &Path, generation: usize, ca_dir: &Path) {
    let version = volume.join(format!("..2026_11_25_{generation:04}"));
    generate(&version, Some(ca_dir));
    let tmp = volume.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version.file_name().expect("a name"), &tmp).expect("symlink");
    std::fs::rename(&tmp, volume.join("..data")).expect("swap");
}

#[tokio::test]
async fn rotating_certificates_under_load_fails_no_request() {
    let ca_dir = tempfile::tempdir().expect("temp dir");
    generate(ca_dir.path(), None);
    let ca = std::fs::read(ca_dir.path().join("ca.crt")).expect("CA");

    // Half the rotations replace plain files, half swap a Secret volume's `..data` link.
    let plain = tempfile::tempdir().expect("temp dir");
    generate(plain.path(), Some(ca_dir.path()));
    let volume = tempfile::tempdir().expect("temp dir");
    swap_secret_volume(volume.path(), 0, ca_dir.path());
    for name in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), volume.path().join(name)).expect("symlink");
    }

    for (dir, secret_volume) in [(plain.path(), false), (volume.path(), true)] {
        let (server, _, _) = start(dir.join("tls.crt"), dir.join("tls.key")).await;
        let stop = CancellationToken::new();
        let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut load = Vec::new();
        for http2 in [false, true] {
            let (client, stop, sent, failed, addr) =
                (client(&ca, http2), stop.clone(), sent.clone(), failed.clone(), server.addr);
            load.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.is_cancelled() {
                    n += 1;
                    match post(&client, addr, review_body(&format!("uid-{n}"))).await {
                        Ok(response) if response.status() == 200 => sent.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }

        for generation in 1..=5 {
            let before = served_leaf(server.addr, &ca).await;
            if secret_volume {
                swap_secret_volume(dir, generation, ca_dir.path());
            } else {
                generate(dir, Some(ca_dir.path()));
            }
            let expected = leaf_on_disk(&dir.join("tls.crt"));
            assert_ne!(before, expected, "a new leaf was written");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while served_leaf(server.addr, &ca).await != expected {
                assert!(tokio::time::Instant::now() < deadline, "new connections never saw rotation {generation}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        stop.cancel();
        for task in load {
            task.await.expect("load task");
        }
        assert!(sent.load(Ordering::Relaxed) > 0, "requests were sent during the rotations");
        assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed during rotation");
        let ok = server.metrics.tls.reloads.get_or_create(&ReloadLabels { result: ReloadResult::Ok }).get();
        assert_eq!(ok, 5, "each rotation was one reload");
        server.cancel.cancel();
        server.task.await.expect("the server stops cleanly");
    }
}

#[tokio::test]
async fn a_bad_new_pair_keeps_the_old_one_and_is_counted() {
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), None);
    let ca = std::fs::read(dir.path().join("ca.crt")).expect("CA");
    let (server, serving, files) = start(dir.path().join("tls.crt"), dir.path().join("tls.key")).await;
    let original = served_leaf(server.addr, &ca).await;

    // A key that does not belong to the certificate, then a certificate that is not PEM.
    let other = tempfile::tempdir().expect("temp dir");
    generate(other.path(), None);
    std::fs::copy(other.path().join("tls.key"), dir.path().join("tls.key")).expect("copy");
    assert!(files.reload(&serving).is_err());
    std::fs::write(dir.path().join("tls.crt"), "not a certificate").expect("write");
    assert!(files.reload(&serving).is_err());

    assert_eq!(served_leaf(server.addr, &ca).await, original, "the old pair is still served");
    let response = post(&client(&ca, true), server.addr, review_body("still-up")).await.expect("served");
    assert_eq!(response.status(), 200);
    let failed = server.metrics.tls.reloads.get_or_create(&ReloadLabels { result: ReloadResult::Failed }).get();
    assert!(failed >= 2, "failed reloads are counted ({failed})");
    server.cancel.cancel();
}
