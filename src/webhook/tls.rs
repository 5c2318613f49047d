//! The serving certificate: loaded from PEM files and swapped atomically when they change.
//!
//! Kubernetes updates a mounted Secret by re-pointing a `..data` symlink, so the parent directory is
//! watched (not the files), and a periodic poll catches anything the watcher misses ([`FileChanges`],
//! which also keeps a `--ca-bundle-file` published). A new pair that
//! does not load (half-written, key not matching) is counted and logged, and the old pair stays in use.

use crate::metrics::{Metrics, ReloadLabels, ReloadResult};
use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("parsing the PEM in {path}: {source}")]
    Pem { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("the private key in {path} is not usable: {source}")]
    Key { path: PathBuf, source: rustls::Error },
    #[error("the certificate and the private key do not match: {0}")]
    Mismatch(rustls::Error),
    #[error("the certificate cannot be parsed as X.509")]
    X509,
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("watching the certificate directory: {0}")]
    Watch(#[from] notify::Error),
}

/// A loaded certificate/key pair and when it expires.
pub struct LoadedPair {
    pub certified: CertifiedKey,
    pub not_after: i64,
}

/// Parses and checks a PEM certificate chain and private key.
pub fn parse_pair(cert_pem: &[u8], key_pem: &[u8], cert_path: &Path, key_path: &Path) -> Result<LoadedPair, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem { path: cert_path.into(), source })?;
    let leaf = chain.first().ok_or_else(|| TlsError::NoCertificate { path: cert_path.into() })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|_| TlsError::X509)?;
    let not_after = parsed.validity().not_after.timestamp();
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::Pem { path: key_path.into(), source })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|source| TlsError::Key { path: key_path.into(), source })?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(TlsError::Mismatch)?;
    Ok(LoadedPair { certified, not_after })
}

/// The live serving certificate, readable lock-free on every handshake.
pub struct ServingCertificate {
    current: ArcSwap<CertifiedKey>,
    /// The PEM bytes behind `current`, so that offering the same pair again does no parsing.
    loaded: Mutex<(Vec<u8>, Vec<u8>)>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCertificate").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ServingCertificate {
    /// Starts serving the PEM pair; fails if it is not a usable pair.
    pub fn new(cert_pem: Vec<u8>, key_pem: Vec<u8>, metrics: Arc<Metrics>) -> Result<Arc<Self>, TlsError> {
        let pair = parse_pair(&cert_pem, &key_pem, Path::new("tls.crt"), Path::new("tls.key"))?;
        metrics.tls.certificate_not_after.set(pair.not_after);
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(pair.certified),
            loaded: Mutex::new((cert_pem, key_pem)),
            metrics,
        }))
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The PEM chain being served.
    pub(crate) fn cert_pem(&self) -> Vec<u8> {
        self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).0.clone()
    }

    /// Swaps in a new pair when it differs from the one in use and is valid; a bad pair is counted
    /// and the current one stays. Returns whether the certificate in use changed.
    pub fn install(&self, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<bool, TlsError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        let result = parse_pair(&cert_pem, &key_pem, Path::new("tls.crt"), Path::new("tls.key"));
        let outcome = if result.is_ok() { ReloadResult::Ok } else { ReloadResult::Failed };
        self.metrics.tls.reloads.get_or_create(&ReloadLabels { result: outcome }).inc();
        let pair = result?;
        self.current.store(Arc::new(pair.certified));
        self.metrics.tls.certificate_not_after.set(pair.not_after);
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }
}

/// A certificate and key on disk (`--tls-cert-file`, `--tls-key-file`).
#[derive(Debug, Clone)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source })
}

impl CertificateFiles {
    /// Loads the pair once; start-up fails if it cannot.
    pub fn load(&self, metrics: Arc<Metrics>) -> Result<Arc<ServingCertificate>, TlsError> {
        let (cert, key) = (read(&self.cert)?, read(&self.key)?);
        parse_pair(&cert, &key, &self.cert, &self.key)?;
        ServingCertificate::new(cert, key, metrics)
    }

    /// Re-reads the files into `serving`. Returns whether the certificate in use changed.
    pub fn reload(&self, serving: &ServingCertificate) -> Result<bool, TlsError> {
        let (cert, key) = match (read(&self.cert), read(&self.key)) {
            (Ok(cert), Ok(key)) => (cert, key),
            (Err(err), _) | (_, Err(err)) => {
                serving.metrics.tls.reloads.get_or_create(&ReloadLabels { result: ReloadResult::Failed }).inc();
                return Err(err);
            }
        };
        serving.install(cert, key)
    }

    /// [`Self::reload`], logging the outcome: what the file watcher runs on every change and poll.
    pub(crate) fn reload_logged(&self, serving: &ServingCertificate) {
        match self.reload(serving) {
            Ok(true) => tracing::info!(cert = %self.cert.display(), "serving certificate reloaded"),
            Ok(false) => {}
            Err(err) => tracing::warn!(error = %err, "serving certificate not reloaded; keeping the current one"),
        }
    }

    /// Reloads on every change in the files' directories and every `poll`, until cancelled.
    pub async fn watch(
        self,
        serving: Arc<ServingCertificate>,
        poll: Duration,
        cancel: CancellationToken,
    ) -> Result<(), TlsError> {
        let mut changes = FileChanges::watch(&[&self.cert, &self.key], poll, cancel)?;
        while changes.next().await {
            self.reload_logged(&serving);
        }
        Ok(())
    }
}

/// Wake-ups after every change in the directories of some files, and every `poll`.
pub(crate) struct FileChanges {
    _watcher: notify::RecommendedWatcher,
    events: tokio::sync::mpsc::Receiver<()>,
    ticker: tokio::time::Interval,
    cancel: CancellationToken,
}

impl FileChanges {
    pub(crate) fn watch(paths: &[&Path], poll: Duration, cancel: CancellationToken) -> Result<Self, TlsError> {
        let (events_tx, events) = tokio::sync::mpsc::channel::<()>(1);
        let mut watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
            // A full channel already holds a pending wake-up; dropping this one loses nothing.
            let _ = events_tx.try_send(());
        })?;
        let mut directories: Vec<&Path> = paths.iter().filter_map(|p| p.parent()).collect();
        directories.sort();
        directories.dedup();
        for directory in directories {
            watcher.watch(directory, RecursiveMode::NonRecursive)?;
        }
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Self { _watcher: watcher, events, ticker, cancel })
    }

    /// Waits for the next change or poll; `false` once cancelled.
    pub(crate) async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            Some(()) = self.events.recv() => {
                // Writers replace the files one after the other; let them finish.
                tokio::time::sleep(Duration::from_millis(50)).await;
                true
            }
            _ = self.ticker.tick() => true,
        }
    }
}

/// TLS 1.2 and 1.3 only, ALPN h2 then http/1.1, certificates from `resolver`; clients must pass
/// `client_verifier` when there is one (see `client_auth`).
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
