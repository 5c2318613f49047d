//! Certificates for the admission webhook, made with rcgen: a CA and a serving leaf it signs.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0} is not a valid DNS name for a certificate")]
    DnsName(String),
    #[error("a serving certificate needs at least one --dns name or --ip address")]
    NoSubjectAltName,
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Backdating absorbs clock skew between the issuer and the API server; a tenth of the lifetime at
/// most, so that short-lived certificates keep most of their window ahead of them.
const MAX_BACKDATE: Duration = Duration::from_secs(5 * 60);

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - MAX_BACKDATE.min(lifetime / 10);
    params.not_after = now + lifetime;
}

/// A new self-signed CA that may only sign leaf certificates.
pub fn generate_ca(common_name: &str, lifetime: Duration) -> Result<PemPair, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, lifetime);
    let cert = params.self_signed(&key)?;
    Ok(PemPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A serving certificate for `dns` names and `ips`, signed by `ca`.
pub fn issue_serving(ca: &PemPair, dns: &[String], ips: &[IpAddr], lifetime: Duration) -> Result<PemPair, CertError> {
    if dns.is_empty() && ips.is_empty() {
        return Err(CertError::NoSubjectAltName);
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, dns.first().cloned().unwrap_or_else(|| ips[0].to_string()));
    params.distinguished_name = name;
    for name in dns {
        let ia5 = name.clone().try_into().map_err(|_| CertError::DnsName(name.clone()))?;
        params.subject_alt_names.push(SanType::DnsName(ia5));
    }
    params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, lifetime);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(PemPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Writes `contents` to `path` through a temporary file and a rename, so that a reader (the
/// certificate reloader) sees the old file or the new one, never half of one.
pub fn write_atomically(path: &Path, contents: &str) -> Result<(), CertError> {
    let write_err = |source| CertError::Write { path: path.display().to_string(), source };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)
}

pub fn read_pair(cert: &Path, key: &Path) -> Result<PemPair, CertError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| CertError::Read { path: path.display().to_string(), source })
    };
    Ok(PemPair { cert_pem: read(cert)?, key_pem: read(key)? })
}

/// What `stash certs generate` does: a CA (new, or the one in `ca_dir`) and a serving leaf, written
/// to `out_dir` as ca.crt (+ ca.key when new), tls.crt and tls.key.
pub fn generate_to_dir(
    out_dir: &Path,
    dns: &[String],
    ips: &[IpAddr],
    ca_dir: Option<&Path>,
    validity: Duration,
    ca_validity: Duration,
) -> Result<(), CertError> {
    std::fs::create_dir_all(out_dir)
        .map_err(|source| CertError::Write { path: out_dir.display().to_string(), source })?;
    let ca = match ca_dir {
        Some(dir) => read_pair(&dir.join("ca.crt"), &dir.join("ca.key"))?,
        None => {
            let ca = generate_ca("stash-webhook-ca", ca_validity)?;
            write_atomically(&out_dir.join("ca.key"), &ca.key_pem)?;
            ca
        }
    };
    let leaf = issue_serving(&ca, dns, ips, validity)?;
    write_atomically(&out_dir.join("ca.crt"), &ca.cert_pem)?;
    // Key first: a reloader that sees the new certificate before its key keeps the old pair and retries.
    write_atomically(&out_dir.join("tls.key"), &leaf.key_pem)?;
    write_atomically(&out_dir.join("tls.crt"), &leaf.cert_pem)
}

/// Now, in Unix seconds: what certificate validity is compared with.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// The PEM certificates of a bundle, each block kept verbatim.
pub(crate) fn split_bundle(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .map(str::trim)
        .filter(|block| block.ends_with(END))
        .map(|block| format!("{block}\n"))
        .collect()
}

/// Whether `leaf` carries a signature by `ca`.
pub(crate) fn signed_by(leaf: &str, ca: &str) -> bool {
    let (Ok(leaf_der), Ok(ca_der)) =
        (CertificateDer::from_pem_slice(leaf.as_bytes()), CertificateDer::from_pem_slice(ca.as_bytes()))
    else {
        return false;
    };
    let (Ok((_, leaf)), Ok((_, ca))) =
        (x509_parser::parse_x509_certificate(&leaf_der), x509_parser::parse_x509_certificate(&ca_der))
    else {
        return false;
    };
    leaf.verify_signature(Some(ca.public_key())).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leaf_is_signed_by_the_ca_and_names_its_subjects() {
        let ca = generate_ca("stash-webhook-ca", Duration::from_secs(3600)).expect("CA");
        let leaf = issue_serving(
            &ca,
            &["stash.stash.svc".into()],
            &["127.0.0.1".parse().expect("IP")],
            Duration::from_secs(600),
        )
        .expect("leaf");
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(leaf.cert_pem.as_bytes()).expect("PEM");
        let der: rustls::pki_types::CertificateDer = der;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("X.509");
        let ca_der: rustls::pki_types::CertificateDer =
            rustls::pki_types::pem::PemObject::from_pem_slice(ca.cert_pem.as_bytes()).expect("PEM");
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).expect("X.509");
        assert_eq!(cert.issuer(), ca_cert.subject());
        cert.verify_signature(Some(ca_cert.public_key())).expect("signed by the CA");
        let sans = cert.subject_alternative_name().expect("parses").expect("present").value;
        assert_eq!(sans.general_names.len(), 2);
        assert!(!cert.is_ca());
        assert!(ca_cert.is_ca());
    }

    #[test]
    fn a_leaf_needs_a_subject() {
        let ca = generate_ca("ca", Duration::from_secs(60)).expect("CA");
        assert!(matches!(issue_serving(&ca, &[], &[], Duration::from_secs(60)), Err(CertError::NoSubjectAltName)));
    }
}
