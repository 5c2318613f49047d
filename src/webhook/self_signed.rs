//! Self-managed webhook certificates: a CA and a serving leaf kept in a Secret, rotated before they
//! expire, with the MutatingWebhookConfiguration's `caBundle` kept in step.
//!
//! Every replica runs the same idempotent pass; writes carry the Secret's resourceVersion, so two
//! replicas never both rotate. Order matters for a drop-free CA rotation:
//! 1. a new CA is added to the bundle (old + new) while the leaf stays signed by the old CA;
//! 2. the bundle is written to the webhook configuration;
//! 3. only once the configuration has trusted the new CA for `propagation_delay` (API servers pick up
//!    webhook configurations asynchronously) is a leaf signed by it issued.
//!
//! The old CA leaves the bundle when it expires; leaves never outlive their CA, so by then no replica
//! can still serve a leaf it signed.

use crate::certs::{self, PemPair, signed_by, split_bundle, unix_now};
use crate::webhook::ca_bundle::{self, Published};
use crate::webhook::tls::ServingCertificate;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const CA_BUNDLE: &str = "ca-bundle.crt";
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
/// When the current bundle was written to the webhook configuration (Unix seconds).
pub const BUNDLE_PUBLISHED_ANNOTATION: &str = "stash.appscode.com/ca-bundle-published";

#[derive(Debug, thiserror::Error)]
pub enum SelfSignedError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    #[error("the certificate Secret lacks a valid {0}")]
    Corrupt(&'static str),
    #[error("the certificate Secret changed underneath; retrying")]
    Conflict,
    #[error("publishing the caBundle: {0}")]
    Publish(ca_bundle::PublishError),
}

impl From<ca_bundle::PublishError> for SelfSignedError {
    fn from(err: ca_bundle::PublishError) -> Self {
        match err {
            // Another replica wrote first: the next pass sees what it wrote.
            ca_bundle::PublishError::Conflict(_) => Self::Conflict,
            err => Self::Publish(err),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SelfSignedConfig {
    pub namespace: String,
    pub secret_name: String,
    pub webhook_configuration: String,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub leaf_lifetime: Duration,
    pub ca_lifetime: Duration,
    pub check_interval: Duration,
    /// How long a new caBundle must have been published before a leaf signed by a new CA is served.
    pub propagation_delay: Duration,
}

/// Validity of one certificate, in seconds since the epoch.
#[derive(Debug, Clone, Copy)]
struct Validity {
    not_before: i64,
    not_after: i64,
}

impl Validity {
    fn of(pem: &str) -> Option<Self> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
        let validity = cert.validity();
        Some(Self { not_before: validity.not_before.timestamp(), not_after: validity.not_after.timestamp() })
    }

    /// Renew once less than a third of the lifetime is left.
    fn needs_renewal(self, now: i64) -> bool {
        let lifetime = self.not_after - self.not_before;
        now >= self.not_after - lifetime / 3
    }
}

type SecretData = BTreeMap<String, String>;

fn decode(secret: &Secret) -> SecretData {
    secret
        .data
        .iter()
        .flatten()
        .filter_map(|(k, v)| String::from_utf8(v.0.clone()).ok().map(|v| (k.clone(), v)))
        .collect()
}

fn encode(data: &SecretData) -> BTreeMap<String, ByteString> {
    data.iter().map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes()))).collect()
}

pub struct SelfManagedCertificates {
    client: Client,
    config: SelfSignedConfig,
}

impl SelfManagedCertificates {
    pub fn new(client: Client, config: SelfSignedConfig) -> Self {
        Self { client, config }
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn issue_leaf(&self, ca: &PemPair) -> Result<PemPair, SelfSignedError> {
        let ca_validity = Validity::of(&ca.cert_pem).ok_or(SelfSignedError::Corrupt(CA_CERT))?;
        // A leaf never outlives its CA: that is what makes dropping an expired CA from the bundle safe.
        let until_ca_expiry = Duration::from_secs(u64::try_from(ca_validity.not_after - unix_now()).unwrap_or(0));
        let lifetime = self.config.leaf_lifetime.min(until_ca_expiry);
        Ok(certs::issue_serving(ca, &self.config.dns_names, &self.config.ips, lifetime)?)
    }

    fn fresh(&self) -> Result<SecretData, SelfSignedError> {
        let ca = certs::generate_ca("stash-webhook-ca", self.config.ca_lifetime)?;
        let leaf = self.issue_leaf(&ca)?;
        Ok(BTreeMap::from([
            (CA_CERT.to_string(), ca.cert_pem.clone()),
            (CA_KEY.to_string(), ca.key_pem),
            (CA_BUNDLE.to_string(), ca.cert_pem),
            (TLS_CERT.to_string(), leaf.cert_pem),
            (TLS_KEY.to_string(), leaf.key_pem),
        ]))
    }

    async fn load_or_create(&self) -> Result<Secret, SelfSignedError> {
        if let Some(secret) = self.secrets().get_opt(&self.config.secret_name).await? {
            return Ok(secret);
        }
        let secret = Secret {
            metadata: kube::core::ObjectMeta {
                name: Some(self.config.secret_name.clone()),
                labels: Some(BTreeMap::from([(crate::api::PART_OF.0.into(), crate::api::PART_OF.1.into())])),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(encode(&self.fresh()?)),
            ..Default::default()
        };
        match self.secrets().create(&PostParams::default(), &secret).await {
            Ok(created) => {
                tracing::info!(secret = %self.config.secret_name, "created the webhook certificate Secret");
                Ok(created)
            }
            // Another replica won the race: use what it wrote.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                Ok(self.secrets().get(&self.config.secret_name).await?)
            }
            Err(err) => Err(err.into()),
        }
    }

    async fn write(&self, mut secret: Secret, data: &SecretData) -> Result<Secret, SelfSignedError> {
        secret.data = Some(encode(data));
        self.replace(secret).await
    }

    async fn replace(&self, secret: Secret) -> Result<Secret, SelfSignedError> {
        let name = secret.name_any();
        match self.secrets().replace(&name, &PostParams::default(), &secret).await {
            Ok(written) => Ok(written),
            Err(kube::Error::Api(status)) if status.code == 409 => Err(SelfSignedError::Conflict),
            Err(err) => Err(err.into()),
        }
    }

    /// One pass: rotate what is due, keep the webhook configuration trusting the bundle, and return
    /// the serving pair to use.
    pub async fn reconcile(&self) -> Result<PemPair, SelfSignedError> {
        let mut secret = self.load_or_create().await?;
        let mut data = decode(&secret);
        let field = |data: &SecretData, key: &'static str| data.get(key).cloned().ok_or(SelfSignedError::Corrupt(key));
        let now = unix_now();

        let ca_cert = field(&data, CA_CERT)?;
        let ca_validity = Validity::of(&ca_cert).ok_or(SelfSignedError::Corrupt(CA_CERT))?;
        if ca_validity.needs_renewal(now) {
            let new_ca = certs::generate_ca("stash-webhook-ca", self.config.ca_lifetime)?;
            let mut bundle: Vec<String> = split_bundle(data.get(CA_BUNDLE).map_or("", String::as_str))
                .into_iter()
                .filter(|pem| Validity::of(pem).is_some_and(|v| v.not_after > now))
                .collect();
            bundle.push(new_ca.cert_pem.clone());
            data.insert(CA_CERT.into(), new_ca.cert_pem);
            data.insert(CA_KEY.into(), new_ca.key_pem);
            data.insert(CA_BUNDLE.into(), bundle.concat());
            secret = self.write(secret, &data).await?;
            tracing::info!("webhook CA rotated; old and new CA are both trusted until the old one expires");
        } else {
            // Drop CAs that expired since the last rotation.
            let bundle = field(&data, CA_BUNDLE)?;
            let live: Vec<String> = split_bundle(&bundle)
                .into_iter()
                .filter(|pem| Validity::of(pem).is_some_and(|v| v.not_after > now))
                .collect();
            if live.concat() != bundle && !live.is_empty() {
                data.insert(CA_BUNDLE.into(), live.concat());
                secret = self.write(secret, &data).await?;
            }
        }

        let bundle = field(&data, CA_BUNDLE)?;
        let published = ca_bundle::publish(&self.client, &self.config.webhook_configuration, bundle.as_bytes()).await?;
        if published == Published::Now {
            let annotations = secret.metadata.annotations.get_or_insert_with(Default::default);
            annotations.insert(BUNDLE_PUBLISHED_ANNOTATION.into(), now.to_string());
            secret = self.replace(secret).await?;
        }
        let published_at =
            secret.annotations().get(BUNDLE_PUBLISHED_ANNOTATION).and_then(|at| at.parse::<i64>().ok()).unwrap_or(0);
        let bundle_settled = match published {
            Published::NoConfiguration => true,
            Published::Now => false,
            Published::Earlier => now >= published_at + self.config.propagation_delay.as_secs() as i64,
        };

        let ca = PemPair { cert_pem: field(&data, CA_CERT)?, key_pem: field(&data, CA_KEY)? };
        let leaf = PemPair { cert_pem: field(&data, TLS_CERT)?, key_pem: field(&data, TLS_KEY)? };
        let signed_by_current = signed_by(&leaf.cert_pem, &ca.cert_pem);
        let leaf_due = !signed_by_current || Validity::of(&leaf.cert_pem).is_none_or(|v| v.needs_renewal(now));
        // A leaf from the current CA may be served once every API server has had time to trust it.
        if leaf_due && (signed_by_current || bundle_settled) {
            let new_leaf = self.issue_leaf(&ca)?;
            data.insert(TLS_CERT.into(), new_leaf.cert_pem.clone());
            data.insert(TLS_KEY.into(), new_leaf.key_pem.clone());
            self.write(secret, &data).await?;
            tracing::info!("webhook serving certificate renewed");
            return Ok(new_leaf);
        }
        Ok(leaf)
    }

    /// Keeps `serving` on the Secret's pair, checking every `check_interval`, until cancelled.
    pub async fn run(self, serving: Arc<ServingCertificate>, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(self.config.check_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.reconcile().await {
                Ok(pair) => {
                    if let Err(err) = serving.install(pair.cert_pem.into_bytes(), pair.key_pem.into_bytes()) {
                        tracing::warn!(error = %err, "the Secret's serving pair is unusable; keeping the current one");
                    }
                }
                Err(SelfSignedError::Conflict) => {}
                Err(err) => tracing::warn!(error = %err, "webhook certificate check failed; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_split_into_their_certificates() {
        let a = certs::generate_ca("a", Duration::from_secs(60)).expect("CA").cert_pem;
        let b = certs::generate_ca("b", Duration::from_secs(60)).expect("CA").cert_pem;
        let split = split_bundle(&format!("{a}{b}"));
        assert_eq!(split.len(), 2);
        assert!(split.contains(&a) && split.contains(&b));
    }

    #[test]
    fn renewal_starts_in_the_last_third() {
        let validity = Validity { not_before: 0, not_after: 90 };
        assert!(!validity.needs_renewal(59));
        assert!(validity.needs_renewal(60));
    }

    #[test]
    fn a_leaf_is_recognised_by_its_issuing_ca_only() {
        let ca = certs::generate_ca("ca", Duration::from_secs(600)).expect("CA");
        let other = certs::generate_ca("other", Duration::from_secs(600)).expect("CA");
        let leaf = certs::issue_serving(&ca, &["a.svc".into()], &[], Duration::from_secs(60)).expect("leaf");
        assert!(signed_by(&leaf.cert_pem, &ca.cert_pem));
        assert!(!signed_by(&leaf.cert_pem, &other.cert_pem));
    }
}
