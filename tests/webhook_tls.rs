//! The webhook's HTTPS server with real rustls clients: HTTP/1.1 and h2, limits, certificate rotation
//! under load (plain file replacement and Kubernetes' `..data` symlink swap), a bad pair kept out, and
//! client certificates required when a client CA is given.

mod support;

use kube::runtime::reflector::store::Writer;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use stash::certs::{PemPair, generate_ca};
use stash::metrics::{Metrics, ReloadLabels, ReloadResult};
use stash::webhook::client_auth::ClientAuth;
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
    start_with(cert, key, None).await
}

/// Like `start`, answering only the clients `client_auth` admits (when given).
async fn start_with(
    cert: PathBuf,
    key: PathBuf,
    client_auth: Option<ClientAuth>,
) -> (Server, Arc<ServingCertificate>, CertificateFiles) {
    let metrics = Arc::new(Metrics::default());
    let files = CertificateFiles { cert, key };
    let serving = files.load(metrics.clone()).expect("the first pair loads");
    let verifier = client_auth.map(|auth| auth.verifier().expect("the client CA loads"));
    let tls = server_config(serving.clone(), verifier).expect("TLS config");
    let mutator = Arc::new(Mutator::new(empty_catalog(), "stash:test".into()));
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
    client_presenting(ca_pem, http2, None)
}

/// A client trusting `ca_pem` that presents `identity` when the server asks for a certificate.
fn client_presenting(ca_pem: &[u8], http2: bool, identity: Option<reqwest::Identity>) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(ca_pem).expect("CA PEM");
    let builder = reqwest::Client::builder().use_rustls_tls().add_root_certificate(ca).timeout(Duration::from_secs(10));
    let builder = if http2 { builder.http2_prior_knowledge() } else { builder.http1_only() };
    let builder = match identity {
        Some(identity) => builder.identity(identity),
        None => builder,
    };
    builder.build().expect("a client")
}

/// A client certificate signed by `ca`, with `common_name` and `dns` names, as a reqwest identity.
fn client_identity(ca: &PemPair, common_name: &str, dns: &[&str]) -> reqwest::Identity {
    let ca_key = rcgen::KeyPair::from_pem(&ca.key_pem).expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).expect("an issuer");
    let key = rcgen::KeyPair::generate().expect("a key");
    let mut params = rcgen::CertificateParams::new(dns.iter().map(|name| name.to_string()).collect::<Vec<_>>())
        .expect("certificate parameters");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).expect("a signed certificate");
    reqwest::Identity::from_pem(format!("{}{}", cert.pem(), key.serialize_pem()).as_bytes()).expect("an identity")
}

/// A serving pair in a fresh directory, and a CA for clients written to `clients-ca.crt` beside it.
fn with_client_ca(names: &[&str]) -> (tempfile::TempDir, PemPair, ClientAuth) {
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), None);
    let clients_ca = generate_ca("stash-test-webhook-clients", Duration::from_secs(3600)).expect("a CA");
    let ca_file = dir.path().join("clients-ca.crt");
    std::fs::write(&ca_file, &clients_ca.cert_pem).expect("write the client CA");
    let names = names.iter().map(|name| name.to_string()).collect();
    (dir, clients_ca, ClientAuth { ca_file, names })
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
    let tls = tls_connect(addr, ca_pem).await;
    tls.get_ref().1.peer_certificates().expect("a chain")[0].clone().into_owned()
}

/// A TLS connection (no ALPN, so HTTP/1.1) to `addr`, trusting `ca_pem`.
async fn tls_connect(addr: SocketAddr, ca_pem: &[u8]) -> tokio_rustls::client::TlsStream<TcpStream> {
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
    connector.connect(ServerName::try_from("localhost").expect("name"), tcp).await.expect("handshake")
}

/// One HTTP/1.1 review on `tls`, kept alive: the response as text, empty if the connection was
/// closed instead.
async fn review_on(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, uid: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = review_body(uid);
    let head = format!(
        "POST /mutate-pods HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    if tls.write_all(&[head.as_bytes(), &body].concat()).await.is_err() || tls.flush().await.is_err() {
        return String::new();
    }
    let (mut response, mut chunk) = (Vec::new(), [0u8; 4096]);
    loop {
        let read = tls.read(&mut chunk).await.unwrap_or(0);
        if read == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..read]);
        let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
        let length = head.lines().find_map(|line| line.strip_prefix("content-length:")).map(str::trim);
        if response.len() >= end + 4 + length.and_then(|l| l.parse::<usize>().ok()).unwrap_or(0) {
            break;
        }
    }
    String::from_utf8_lossy(&response).into_owned()
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

/// The API server keeps an idle connection to a webhook for 90 s and may send a review on it at any
/// moment. A server that closes it sooner races that review, and a Pod whose review loses the race
/// is admitted without the sidecar (failurePolicy Ignore; seen in e2e as a StatefulSet's second Pod
/// without it). An idle HTTP/1.1 connection stays open well past the 10 s it used to get.
#[tokio::test]
async fn an_idle_kept_alive_connection_stays_open_for_the_api_servers_next_review() {
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), None);
    let (server, _, _) = start(dir.path().join("tls.crt"), dir.path().join("tls.key")).await;
    let ca = std::fs::read(dir.path().join("ca.crt")).expect("CA");
    let mut tls = tls_connect(server.addr, &ca).await;
    assert!(review_on(&mut tls, "uid-1").await.starts_with("HTTP/1.1 200"), "the first review is answered");
    tokio::time::sleep(Duration::from_secs(15)).await;
    let second = review_on(&mut tls, "uid-2").await;
    assert!(second.starts_with("HTTP/1.1 200"), "the idle connection was closed: {second:?}");
    assert!(second.contains("uid-2"), "the second review is answered on the same connection");
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
    support::volume::swap(volume.path(), 0, |version| generate(version, Some(ca_dir.path())));
    support::volume::link_files(volume.path(), &["tls.crt", "tls.key"]);

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
                support::volume::swap(dir, generation, |version| generate(version, Some(ca_dir.path())));
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

/// M7: with a client CA, a client without a certificate or with one another CA signed gets no
/// answer; one the CA signed does, over HTTP/1.1 and h2.
#[tokio::test]
async fn with_a_client_ca_only_clients_it_signed_are_answered() {
    let (dir, clients_ca, auth) = with_client_ca(&[]);
    let (server, _, _) = start_with(dir.path().join("tls.crt"), dir.path().join("tls.key"), Some(auth)).await;
    let ca = std::fs::read(dir.path().join("ca.crt")).expect("CA");
    let other_ca = generate_ca("someone-else", Duration::from_secs(3600)).expect("a CA");
    for http2 in [false, true] {
        let anonymous = post(&client(&ca, http2), server.addr, review_body("anonymous")).await;
        assert!(anonymous.is_err(), "a client without a certificate was answered: {anonymous:?}");
        let stranger = client_presenting(&ca, http2, Some(client_identity(&other_ca, "kube-apiserver", &[])));
        let stranger = post(&stranger, server.addr, review_body("stranger")).await;
        assert!(stranger.is_err(), "a certificate of another CA was answered: {stranger:?}");
        let signed = client_presenting(&ca, http2, Some(client_identity(&clients_ca, "kube-apiserver", &[])));
        let signed =
            post(&signed, server.addr, review_body("signed")).await.expect("a certificate the CA signed is answered");
        assert_eq!(signed.status(), 200);
    }
    server.cancel.cancel();
    server.task.await.expect("the server stops cleanly");
}

/// With client names, a certificate the CA signed is answered only when its common name or one of
/// its DNS names is listed.
#[tokio::test]
async fn client_names_narrow_the_certificates_the_client_ca_signed() {
    let (dir, clients_ca, auth) = with_client_ca(&["kube-apiserver"]);
    let (server, _, _) = start_with(dir.path().join("tls.crt"), dir.path().join("tls.key"), Some(auth)).await;
    let ca = std::fs::read(dir.path().join("ca.crt")).expect("CA");
    for (common_name, dns, answered) in [
        ("kube-apiserver", &[][..], true),
        ("apiserver-webhook-client", &["kube-apiserver"][..], true),
        ("system:node:worker-1", &["worker-1"][..], false),
    ] {
        let client = client_presenting(&ca, false, Some(client_identity(&clients_ca, common_name, dns)));
        let response = post(&client, server.addr, review_body(common_name)).await;
        assert_eq!(response.is_ok(), answered, "CN {common_name}, DNS {dns:?}: {response:?}");
    }
    server.cancel.cancel();
    server.task.await.expect("the server stops cleanly");
}
