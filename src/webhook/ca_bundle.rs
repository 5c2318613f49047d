//! The webhook configuration's `caBundle`: what the API server trusts the webhook's certificate with.
//!
//! Two writers go through [`publish`]: self-managed certificates (from their Secret) and a bundle a
//! platform team mounts as a file (`--ca-bundle-file`, [`CaBundlePublisher`]). With cert-manager the
//! file's CAs go instead into a Secret its CA injector copies into the configuration
//! (`--ca-bundle-secret`, [`publish_to_secret`]), and a new leaf waits until the configuration trusts
//! it ([`hold`]). Every replica may
//! publish: nothing is written when the configuration holds the bundle already, and a write carries the
//! resourceVersion it read, so a concurrent change is retried, never overwritten blind.
//!
//! A file is published exactly as written, since the platform team's order makes rotation safe (old
//! and new CA first, then a leaf from the new CA, then the new CA alone) — but never an empty or
//! unparsable bundle: the API server would then trust no certificate, and with `failurePolicy: Ignore`
//! every Pod would be admitted without its sidecar. Such a file is refused, counted and logged, and the
//! last good bundle stays.

use crate::certs::{signed_by, split_bundle, unix_now};
use crate::metrics::{Metrics, ReloadLabels, ReloadResult};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use rustls::pki_types::pem::{PemObject, SectionKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// cert-manager's CA injector fills the caBundle of configurations carrying this annotation (or
/// `-secret` after it).
const CERT_MANAGER_INJECTS: &str = "cert-manager.io/inject-ca-from";
/// The Secret annotation without which cert-manager's CA injector refuses to copy a Secret's `ca.crt`.
const ALLOW_DIRECT_INJECTION: &str = "cert-manager.io/allow-direct-injection";
/// The key the CA injector reads.
const INJECTED_KEY: &str = "ca.crt";
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
    if configuration.annotations().keys().any(|key| key.starts_with(CERT_MANAGER_INJECTS)) {
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

/// What the CA injector's Secret should hold: the file's CAs first, then every CA it held before that
/// has not expired. A CA that signed a leaf some replica may still serve stays trusted until it
/// expires, which no leaf it signed outlives; so one Secret update by cert-manager (new leaf, new CA)
/// never leaves a replica with a leaf the API server does not trust.
pub(crate) fn merged_bundle(held: &str, file: &str, now: i64) -> String {
    let mut merged = split_bundle(file);
    for ca in split_bundle(held) {
        if !merged.contains(&ca) && check_bundle(ca.as_bytes()).is_ok_and(|not_after| not_after > now) {
            merged.push(ca);
        }
    }
    merged.concat()
}

/// Keeps `bundle`'s CAs, merged with those it held ([`merged_bundle`]), in the Secret `name` of
/// `namespace`, for cert-manager's CA injector (`cert-manager.io/inject-ca-from-secret`).
pub(crate) async fn publish_to_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    bundle: &[u8],
    now: i64,
) -> Result<Published, PublishError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let file = String::from_utf8_lossy(bundle);
    let existing = api.get_opt(name).await?;
    let held = existing
        .as_ref()
        .and_then(|secret| secret.data.as_ref()?.get(INJECTED_KEY))
        .map(|bytes| String::from_utf8_lossy(&bytes.0).into_owned())
        .unwrap_or_default();
    let merged = merged_bundle(&held, &file, now);
    let allowed = existing.as_ref().is_some_and(|secret| {
        secret.annotations().get(ALLOW_DIRECT_INJECTION).is_some_and(|allowed| allowed == "true")
    });
    if existing.is_some() && merged == held && allowed {
        return Ok(Published::Earlier);
    }
    let mut secret = existing.unwrap_or_else(|| Secret {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..Default::default() },
        ..Default::default()
    });
    secret.annotations_mut().insert(ALLOW_DIRECT_INJECTION.into(), "true".into());
    secret.data.get_or_insert_with(Default::default).insert(INJECTED_KEY.into(), ByteString(merged.into_bytes()));
    let written = match secret.metadata.resource_version {
        Some(_) => api.replace(name, &PostParams::default(), &secret).await,
        None => api.create(&PostParams::default(), &secret).await,
    };
    match written {
        Ok(_) => {
            tracing::info!(%namespace, secret = %name, "CA bundle for the CA injector updated");
            Ok(Published::Now)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Err(PublishError::Conflict(name.into())),
        Err(err) => Err(err.into()),
    }
}

/// Whether a new serving leaf may replace the one served, given the CAs the webhook configuration's
/// caBundle holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// No CA of the bundle signed it: serving it would fail every call. Wait.
    Untrusted,
    /// A CA that signed the served leaf signed it too: API servers trust it already.
    SameCa,
    /// Trusted through a CA the served leaf is not signed by: API servers may not have read that
    /// caBundle yet. Serve it after the propagation delay.
    NewCa,
}

pub(crate) fn hold(bundle: &str, served: &str, new: &str) -> Hold {
    let signers: Vec<String> = split_bundle(bundle).into_iter().filter(|ca| signed_by(new, ca)).collect();
    if signers.is_empty() {
        Hold::Untrusted
    } else if signers.iter().any(|ca| signed_by(served, ca)) {
        Hold::SameCa
    } else {
        Hold::NewCa
    }
}

/// The caBundle of the first webhook of the configuration `name`, empty if none.
pub(crate) async fn published_bundle(client: &Client, name: &str) -> Result<String, kube::Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let configuration = api.get_opt(name).await?;
    let bundle = configuration
        .and_then(|c| c.webhooks?.into_iter().next()?.client_config.ca_bundle)
        .map(|bundle| String::from_utf8_lossy(&bundle.0).into_owned());
    Ok(bundle.unwrap_or_default())
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
    /// `--ca-bundle-secret`: publish into a Secret for cert-manager's CA injector instead of into the
    /// configuration.
    pub injector_secret: Option<InjectorSecret>,
}

/// The Secret cert-manager's CA injector copies into the webhook configuration, and how long a leaf
/// from a newly trusted CA waits once the configuration holds that CA.
#[derive(Debug, Clone)]
pub struct InjectorSecret {
    pub namespace: String,
    pub name: String,
    pub propagation_delay: std::time::Duration,
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

    pub(crate) fn file(&self) -> &CaBundleFile {
        &self.file
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
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
            let result = match &self.file.injector_secret {
                Some(secret) => {
                    publish_to_secret(&self.client, &secret.namespace, &secret.name, &pem, unix_now()).await
                }
                None => publish(&self.client, &self.file.webhook_configuration, &pem).await,
            };
            match result {
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

    fn leaf_of(ca: &certs::PemPair) -> String {
        certs::issue_serving(ca, &["stash-webhook.stash.svc".into()], &[], Duration::from_secs(600))
            .expect("a leaf")
            .cert_pem
    }

    #[test]
    fn the_injectors_bundle_gains_a_new_ca_and_keeps_the_old_until_it_expires() {
        let (old, new) = (ca("old", 600), ca("new", 7200));
        let now = not_after(&old.cert_pem) - 300;
        let merged = merged_bundle(&old.cert_pem, &new.cert_pem, now);
        assert_eq!(merged, format!("{}{}", new.cert_pem, old.cert_pem), "the file's CA first, the old one kept");
        assert_eq!(merged_bundle(&merged, &new.cert_pem, now), merged, "unchanged on the next sync");
        let later = not_after(&old.cert_pem) + 1;
        assert_eq!(merged_bundle(&merged, &new.cert_pem, later), new.cert_pem, "an expired CA leaves");
        assert_eq!(merged_bundle("", &new.cert_pem, now), new.cert_pem, "the first bundle is the file's");
    }

    #[test]
    fn a_new_leaf_waits_until_the_bundle_trusts_its_ca() {
        let (old, new) = (ca("old", 600), ca("new", 600));
        let (served, renewed, rotated) = (leaf_of(&old), leaf_of(&old), leaf_of(&new));
        assert_eq!(hold(&old.cert_pem, &served, &renewed), Hold::SameCa, "a renewal from the same CA");
        assert_eq!(hold(&old.cert_pem, &served, &rotated), Hold::Untrusted, "the injector has not copied the new CA");
        let both = format!("{}{}", new.cert_pem, old.cert_pem);
        assert_eq!(hold(&both, &served, &rotated), Hold::NewCa, "trusted, but only just");
        assert_eq!(hold(&new.cert_pem, &rotated, &leaf_of(&new)), Hold::SameCa);
        assert_eq!(hold("", &served, &renewed), Hold::Untrusted);
    }

    #[test]
    fn every_webhook_gets_the_bundle_and_an_equal_one_is_no_change() {
        let mut stale = configuration(&[Some(b"old"), None]);
        assert!(set_ca_bundle(&mut stale, b"new"));
        assert_eq!(stale, configuration(&[Some(b"new"), Some(b"new")]));
        assert!(!set_ca_bundle(&mut stale, b"new"), "an equal bundle is not written again");
    }
}
