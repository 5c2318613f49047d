//! Who may call the webhook: with `--webhook-client-ca-file`, only clients presenting a certificate
//! that CA signed (the API server, through its AdmissionConfiguration), optionally narrowed to
//! certificates naming one of `--webhook-client-names`.
//!
//! A review answer carries a member's settings, Secret name and volumes, so an unauthenticated
//! client must not get one; a NetworkPolicy cannot single out the API server portably, a
//! certificate can.

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use x509_parser::extensions::GeneralName;

#[derive(Debug, thiserror::Error)]
pub enum ClientAuthError {
    #[error("reading the webhook client CA {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing the PEM in the webhook client CA {path}: {source}")]
    Pem { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("the webhook client CA {path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("a certificate in the webhook client CA {path} is not a usable trust anchor: {source}")]
    Anchor { path: PathBuf, source: rustls::Error },
    #[error("building the client-certificate verifier from {path}: {source}")]
    Verifier { path: PathBuf, source: rustls::server::VerifierBuilderError },
}

/// The clients the webhook answers.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// PEM bundle of the CAs whose client certificates are accepted (several during a rotation).
    pub ca_file: PathBuf,
    /// When not empty, the certificate's common name or one of its DNS names must be among these.
    pub names: Vec<String>,
}

impl ClientAuth {
    /// Reads the CA bundle (once: replacing it takes a restart) and builds the verifier, which
    /// refuses a handshake without an acceptable certificate.
    pub fn verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, ClientAuthError> {
        let roots = Arc::new(read_roots(&self.ca_file)?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chains = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|source| ClientAuthError::Verifier { path: self.ca_file.clone(), source })?;
        if self.names.is_empty() {
            return Ok(chains);
        }
        Ok(Arc::new(NamedClients { chains, names: self.names.clone() }))
    }
}

fn read_roots(path: &Path) -> Result<RootCertStore, ClientAuthError> {
    let pem = std::fs::read(path).map_err(|source| ClientAuthError::Read { path: path.into(), source })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|source| ClientAuthError::Pem { path: path.into(), source })?;
        roots.add(cert).map_err(|source| ClientAuthError::Anchor { path: path.into(), source })?;
    }
    if roots.is_empty() {
        return Err(ClientAuthError::NoCertificate { path: path.into() });
    }
    Ok(roots)
}

/// Chain verification by `chains`, then a name check: a CA shared with other clients (the cluster
/// CA signs kubelets and users too) can still admit the API server alone.
#[derive(Debug)]
struct NamedClients {
    chains: Arc<dyn ClientCertVerifier>,
    names: Vec<String>,
}

impl NamedClients {
    fn accepts(&self, end_entity: &CertificateDer<'_>) -> Result<bool, rustls::Error> {
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let allowed = |name: &str| self.names.iter().any(|allowed| allowed == name);
        let common_names = cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok());
        let dns_names = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .into_iter()
            .flat_map(|san| san.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some(*dns),
                _ => None,
            });
        Ok(common_names.chain(dns_names).any(allowed))
    }
}

impl ClientCertVerifier for NamedClients {
    fn offer_client_auth(&self) -> bool {
        self.chains.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chains.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chains.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.chains.verify_client_cert(end_entity, intermediates, now)?;
        if self.accepts(end_entity)? {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chains.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chains.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chains.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(ca_file: PathBuf) -> ClientAuth {
        ClientAuth { ca_file, names: Vec::new() }
    }

    #[test]
    fn a_bundle_that_is_missing_or_holds_no_certificate_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.crt");
        let err = auth(missing.clone()).verifier().expect_err("a missing file");
        assert!(matches!(&err, ClientAuthError::Read { path, .. } if *path == missing), "{err}");
        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "no PEM here\n").expect("write");
        let err = auth(empty.clone()).verifier().expect_err("no certificate");
        assert!(matches!(&err, ClientAuthError::NoCertificate { path } if *path == empty), "{err}");
        assert!(err.to_string().contains("empty.crt"), "{err}");
    }

    #[test]
    fn a_bundle_of_two_cas_trusts_both() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (old, new) = (
            crate::certs::generate_ca("old", std::time::Duration::from_secs(60)).expect("CA"),
            crate::certs::generate_ca("new", std::time::Duration::from_secs(60)).expect("CA"),
        );
        let bundle = dir.path().join("bundle.crt");
        std::fs::write(&bundle, format!("{}{}", old.cert_pem, new.cert_pem)).expect("write");
        let verifier = auth(bundle).verifier().expect("a verifier");
        assert_eq!(verifier.root_hint_subjects().len(), 2);
        assert!(verifier.client_auth_mandatory());
    }
}
