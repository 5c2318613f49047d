//! The webhook configuration's `caBundle`: what the API server trusts the webhook's certificate with.
//!
//! Two writers go through [`publish`]: self-managed certificates (from their Secret) and a bundle a
//! platform team mounts as a file (`--ca-bundle-file`, [`CaBundlePublisher`]). Every replica may
//! publish: nothing is written when the configuration holds the bundle already, and a write carries the
//! resourceVersion it read, so a concurrent change is retried, never overwritten blind.
//!
//! A file is published exactly as written, since the platform team's order makes rotation safe (old
//! and new CA first, then a leaf from the new CA, then the new CA alone) — but never an empty or
//! unparsable bundle: the API server would then trust no certificate, and with `failurePolicy: Ignore`
//! every Pod would be admitted without its sidecar. Such a file is refused, counted and logged, and the
//! last good bundle stays.

use crate::metrics::{Metrics, ReloadLabels, ReloadResult};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use rustls::pki_types::pem::{PemObject, SectionKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// cert-manager's CA injector fills the caBundle of configurations carrying this annotation.
const CERT_MANAGER_INJECTS: &str = "cert-manager.io/inject-ca-from";
/// Writes lost to another writer in a row before giving up until the next change or poll.
const CONFLICT_RETRIES: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the webhook configuration {0} changed underneath; retrying")]
    Conflict(String),
    #[error(
        "the webhook configuration {0} carries {CERT_MANAGER_INJECTS}: cert-manager's CA injector owns its \
         caBundle; remove the annotation or stop publishing one"
    )]
    OwnedByCertManager(String),
}

/// Whether the webhook configuration holds the bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Published {
    /// There is no configuration to update (yet): nobody calls the webhook through it.
    NoConfiguration,
    /// Just written: API servers may not have seen it yet.
    Now,
    /// Already there before this call.
    Earlier,
}

/// Puts `bundle` into every webhook of `configuration`; whether anything changed.
fn set_ca_bundle(configuration: &mut MutatingWebhookConfiguration, bundle: &[u8]) -> bool {
    let wanted = ByteString(bundle.to_vec());
    let mut changed = false;
    for webhook in configuration.webhooks.iter_mut().flatten() {
        if webhook.client_config.ca_bundle.as_ref() != Some(&wanted) {
            webhook.client_config.ca_bundle = Some(wanted.clone());
            changed = true;
        }
    }
    changed
}

/// Writes `bundle` into every webhook of the configuration `name`, unless it is there already.
pub(crate) async fn publish(client: &Client, name: &str, bundle: &[u8]) -> Result<Published, PublishError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut configuration) = api.get_opt(name).await? else {
        return Ok(Published::NoConfiguration);
    };
    if configuration.annotations().contains_key(CERT_MANAGER_INJECTS) {
        return Err(PublishError::OwnedByCertManager(name.into()));
    }
    if !set_ca_bundle(&mut configuration, bundle) {
        return Ok(Published::Earlier);
    }
    match api.replace(name, &PostParams::default(), &configuration).await {
        Ok(_) => {
            tracing::info!(configuration = %name, "caBundle updated");
            Ok(Published::Now)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Err(PublishError::Conflict(name.into())),
        Err(err) => Err(err.into()),
    }
}

/// Why a bundle file is not published.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refusal {
    #[error("it holds no PEM certificate")]
    Empty,
    #[error("it is not PEM: {0}")]
    NotPem(String),
    #[error("block {0} is a {1:?}, not a certificate (a CA bundle holds certificates only)")]
    NotACertificate(usize, SectionKind),
    #[error("certificate {0} is not valid X.509")]
    NotX509(usize),
}

/// Whether `pem` may be published: one certificate or more, and nothing else. Returns the earliest
/// expiry among them (Unix seconds): when the API server stops trusting part of the bundle.
pub(crate) fn check_bundle(pem: &[u8]) -> Result<i64, Refusal> {
    let mut earliest: Option<i64> = None;
    for (index, section) in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem).enumerate() {
        let (kind, der) = section.map_err(|err| Refusal::NotPem(err.to_string()))?;
        if kind != SectionKind::Certificate {
            return Err(Refusal::NotACertificate(index + 1, kind));
        }
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|_| Refusal::NotX509(index + 1))?;
        let not_after = cert.validity().not_after.timestamp();
        earliest = Some(earliest.map_or(not_after, |earliest| earliest.min(not_after)));
    }
    earliest.ok_or(Refusal::Empty)
}

#[derive(Debug, thiserror::Error)]
pub enum CaBundleError {
    #[error("reading the CA bundle {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the CA bundle {path} is refused, the last good one stays published: {refusal}")]
    Refused { path: PathBuf, refusal: Refusal },
    #[error("publishing the CA bundle {path}: {source}")]
    Publish { path: PathBuf, source: PublishError },
}

/// `--ca-bundle-file`: the PEM bundle to publish, and the webhook configuration to publish it in.
#[derive(Debug, Clone)]
pub struct CaBundleFile {
    pub path: PathBuf,
    pub webhook_configuration: String,
}

/// Publishes the file's bundle whenever its content changes.
pub(crate) struct CaBundlePublisher {
    client: Client,
    file: CaBundleFile,
    metrics: Arc<Metrics>,
    /// The content last published: unchanged content costs no API call. Only a change is written, so a
    /// replica whose volume kubelet has not updated yet does not write back the bundle another replica
    /// just published.
    published: Option<Vec<u8>>,
}

impl CaBundlePublisher {
    pub(crate) fn new(client: Client, file: CaBundleFile, metrics: Arc<Metrics>) -> Self {
        Self { client, file, metrics, published: None }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.file.path
    }

    /// Publishes the file's bundle if it differs from the last one published. Returns `None` when it
    /// did not (unchanged), else where the bundle stands.
    pub(crate) async fn sync(&mut self) -> Result<Option<Published>, CaBundleError> {
        let path = &self.file.path;
        let pem = std::fs::read(path).map_err(|source| CaBundleError::Read { path: path.clone(), source });
        if let Ok(pem) = &pem
            && self.published.as_ref() == Some(pem)
        {
            return Ok(None);
        }
        let result = self.publish_new(pem).await;
        let outcome = match result {
            Ok(Published::NoConfiguration) => None,
            Ok(_) => Some(ReloadResult::Ok),
            Err(_) => Some(ReloadResult::Failed),
        };
        if let Some(result) = outcome {
            self.metrics.tls.ca_bundle_publishes.get_or_create(&ReloadLabels { result }).inc();
        }
        result.map(Some)
    }

    async fn publish_new(&mut self, pem: Result<Vec<u8>, CaBundleError>) -> Result<Published, CaBundleError> {
        let path = &self.file.path;
        let pem = pem?;
        let not_after = check_bundle(&pem).map_err(|refusal| CaBundleError::Refused { path: path.clone(), refusal })?;
        let mut attempt = 1;
        let published = loop {
            match publish(&self.client, &self.file.webhook_configuration, &pem).await {
                Ok(published) => break published,
                Err(PublishError::Conflict(_)) if attempt < CONFLICT_RETRIES => attempt += 1,
                Err(source) => return Err(CaBundleError::Publish { path: path.clone(), source }),
            }
        };
        // Without a configuration nothing holds the bundle yet: the next poll tries again.
        if published != Published::NoConfiguration {
            self.metrics.tls.ca_bundle_not_after.set(not_after);
            self.published = Some(pem);
        }
        Ok(published)
    }

    /// [`Self::sync`], logging the outcome: what the file watcher runs on every change and poll.
    pub(crate) async fn sync_logged(&mut self) {
        let (bundle, configuration) = (self.file.path.display().to_string(), self.file.webhook_configuration.clone());
        match self.sync().await {
            Ok(None) => {}
            Ok(Some(Published::NoConfiguration)) => {
                tracing::warn!(%bundle, %configuration, "no such webhook configuration (yet); publishing on the next poll");
            }
            Ok(Some(_)) => tracing::info!(%bundle, %configuration, "CA bundle published"),
            Err(err) => tracing::warn!(error = %err, "CA bundle not published"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs;
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};
    use std::time::Duration;

    fn ca(name: &str, lifetime: u64) -> certs::PemPair {
        certs::generate_ca(name, Duration::from_secs(lifetime)).expect("a CA")
    }

    fn not_after(pem: &str) -> i64 {
        check_bundle(pem.as_bytes()).expect("one certificate")
    }

    #[test]
    fn a_bundle_of_certificates_is_accepted_with_its_earliest_expiry() {
        let (long, short) = (ca("long", 7200), ca("short", 600));
        let bundle = format!("{}{}", long.cert_pem, short.cert_pem);
        assert_eq!(check_bundle(bundle.as_bytes()), Ok(not_after(&short.cert_pem)));
        assert!(not_after(&short.cert_pem) < not_after(&long.cert_pem));
        // Text around the blocks is allowed in PEM (openssl writes subject lines there).
        let commented = format!("# platform CA\n{}", long.cert_pem);
        assert_eq!(check_bundle(commented.as_bytes()), Ok(not_after(&long.cert_pem)));
    }

    #[test]
    fn empty_garbage_half_written_and_key_bearing_bundles_are_refused() {
        let ca = ca("ca", 600);
        assert_eq!(check_bundle(b""), Err(Refusal::Empty));
        assert_eq!(check_bundle(b"\x00\xffgarbage"), Err(Refusal::Empty));
        let half = &ca.cert_pem[..ca.cert_pem.len() / 2];
        assert!(
            matches!(check_bundle(half.as_bytes()), Err(Refusal::NotPem(_))),
            "{:?}",
            check_bundle(half.as_bytes())
        );
        let with_key = format!("{}{}", ca.cert_pem, ca.key_pem);
        assert_eq!(check_bundle(with_key.as_bytes()), Err(Refusal::NotACertificate(2, SectionKind::PrivateKey)));
        let not_x509 = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(check_bundle(not_x509.as_bytes()), Err(Refusal::NotX509(1)));
    }

    #[test]
    fn a_refusal_says_why_and_that_the_last_bundle_stays() {
        let err = CaBundleError::Refused { path: "/ca/ca.crt".into(), refusal: Refusal::Empty };
        assert_eq!(
            err.to_string(),
            "the CA bundle /ca/ca.crt is refused, the last good one stays published: it holds no PEM certificate"
        );
    }

    fn configuration(bundles: &[Option<&[u8]>]) -> MutatingWebhookConfiguration {
        let webhooks = bundles
            .iter()
            .map(|bundle| MutatingWebhook {
                client_config: WebhookClientConfig {
                    ca_bundle: bundle.map(|b| ByteString(b.to_vec())),
                    ..Default::default()
                },
                ..Default::default()
            })
            .collect();
        MutatingWebhookConfiguration { webhooks: Some(webhooks), ..Default::default() }
    }

    #[test]
    fn every_webhook_gets_the_bundle_and_an_equal_one_is_no_change() {
        let mut stale = configuration(&[Some(b"old"), None]);
        assert!(set_ca_bundle(&mut stale, b"new"));
        assert_eq!(stale, configuration(&[Some(b"new"), Some(b"new")]));
        assert!(!set_ca_bundle(&mut stale, b"new"), "an equal bundle is not written again");
    }
}
