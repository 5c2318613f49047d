//! Repository backend → restic repository URL, backend options and credential environment.

use super::secrets::{SecretError, SecretValues};
use crate::api::repository::Backend;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use std::path::PathBuf;

/// Where a restic repository lives and what restic needs to open it. The URL travels in
/// `RESTIC_REPOSITORY` (it may embed REST credentials), never in argv.
#[derive(Clone)]
pub struct Location {
    pub url: String,
    /// `-o key=value` backend options (no secrets).
    pub options: Vec<String>,
    /// Environment for the backend's credentials.
    pub env: Vec<(String, String)>,
    pub insecure_tls: bool,
    /// The repository directory of a `local` backend.
    pub local_dir: Option<PathBuf>,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Location").field("url", &self.display_url()).field("options", &self.options).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("spec.backend sets no backend (one of local, s3, gcs, azure, swift, b2, rest)")]
    NoBackend,
    #[error("spec.backend.rest.url {0:?} is not an http(s) URL")]
    BadRestUrl(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

impl Location {
    /// The URL without credentials, for messages.
    pub fn display_url(&self) -> String {
        match self.url.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest.split_once('@')?.1))) {
            Some((scheme, host)) => format!("{scheme}://{host}"),
            None => self.url.clone(),
        }
    }

    /// `host:port` of an HTTP(S) backend (REST, S3 with an endpoint URL), for a reachability probe.
    pub fn network_endpoint(&self) -> Option<String> {
        let url = self.url.strip_prefix("rest:").or_else(|| self.url.strip_prefix("s3:"))?;
        let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
        let authority = rest.split('/').next()?.rsplit('@').next()?;
        // `[::1]` has colons but no port; `[::1]:8000` and `host:8000` have one.
        let has_port = match authority.rsplit_once(']') {
            Some((_, after)) => after.starts_with(':'),
            None => authority.contains(':'),
        };
        if has_port {
            Some(authority.to_string())
        } else {
            Some(format!("{authority}:{}", if scheme == "http" { 80 } else { 443 }))
        }
    }

    pub fn from_backend(backend: &Backend, secrets: &SecretValues) -> Result<Location, BackendError> {
        let mut location =
            Location { url: String::new(), options: Vec::new(), env: Vec::new(), insecure_tls: false, local_dir: None };
        let mut pass = |keys: &[&str]| {
            for key in keys {
                if let Some(value) = secrets.get(key) {
                    location.env.push(((*key).to_string(), value.to_string()));
                }
            }
        };
        if let Some(local) = &backend.local {
            location.url = local.mount_path.clone();
            location.local_dir = Some(PathBuf::from(&local.mount_path));
        } else if let Some(s3) = &backend.s3 {
            pass(&["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]);
            location.url = format!("s3:{}/{}{}", s3.endpoint.trim_end_matches('/'), s3.bucket, prefix(&s3.prefix));
            if let Some(region) = s3.region.as_deref().filter(|r| !r.is_empty()) {
                location.options.push(format!("s3.region={region}"));
            }
            location.insecure_tls = s3.insecure_tls;
        } else if let Some(gcs) = &backend.gcs {
            pass(&["GOOGLE_PROJECT_ID"]);
            secrets.require("GOOGLE_SERVICE_ACCOUNT_JSON_KEY")?;
            // restic reads the key from a file: the mounted Secret's own file.
            let key_file = secrets.dir().join("GOOGLE_SERVICE_ACCOUNT_JSON_KEY");
            location.env.push(("GOOGLE_APPLICATION_CREDENTIALS".into(), key_file.to_string_lossy().into_owned()));
            location.url = format!("gs:{}:/{}", gcs.bucket, prefix(&gcs.prefix).trim_start_matches('/'));
            connections(&mut location.options, "gs", gcs.max_connections);
        } else if let Some(azure) = &backend.azure {
            pass(&["AZURE_ACCOUNT_NAME", "AZURE_ACCOUNT_KEY", "AZURE_ACCOUNT_SAS", "AZURE_ENDPOINT_SUFFIX"]);
            location.url = format!("azure:{}:/{}", azure.container, prefix(&azure.prefix).trim_start_matches('/'));
            connections(&mut location.options, "azure", azure.max_connections);
        } else if let Some(swift) = &backend.swift {
            location.env.extend(secrets.with_prefixes(&["OS_", "ST_"]).map(|(k, v)| (k.to_string(), v.to_string())));
            location.url = format!("swift:{}:/{}", swift.container, prefix(&swift.prefix).trim_start_matches('/'));
        } else if let Some(b2) = &backend.b2 {
            pass(&["B2_ACCOUNT_ID", "B2_ACCOUNT_KEY"]);
            location.url = format!("b2:{}:{}", b2.bucket, prefix(&b2.prefix).trim_start_matches('/'));
            connections(&mut location.options, "b2", b2.max_connections);
        } else if let Some(rest) = &backend.rest {
            location.url = format!("rest:{}", with_credentials(&rest.url, secrets)?);
        } else {
            return Err(BackendError::NoBackend);
        }
        Ok(location)
    }
}

fn prefix(prefix: &Option<String>) -> String {
    match prefix.as_deref().map(|p| p.trim_matches('/')) {
        Some(p) if !p.is_empty() => format!("/{p}"),
        _ => String::new(),
    }
}

fn connections(options: &mut Vec<String>, backend: &str, max: Option<i64>) {
    if let Some(max) = max {
        options.push(format!("{backend}.connections={max}"));
    }
}

/// REST credentials go into the URL's userinfo: every restic version understands that, and the URL
/// itself only travels in the environment.
fn with_credentials(url: &str, secrets: &SecretValues) -> Result<String, BackendError> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| BackendError::BadRestUrl(url.to_string()))?;
    if scheme != "http" && scheme != "https" {
        return Err(BackendError::BadRestUrl(url.to_string()));
    }
    match (secrets.get("REST_SERVER_USERNAME"), secrets.get("REST_SERVER_PASSWORD")) {
        (Some(user), Some(password)) => {
            Ok(format!("{scheme}://{}:{}@{rest}", percent_encode(user), percent_encode(password)))
        }
        _ => Ok(url.to_string()),
    }
}

/// RFC 3986 unreserved characters stay as they are; everything else is percent-encoded.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

pub fn percent_encode(text: &str) -> String {
    utf8_percent_encode(text, UNRESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::repository::{AzureSpec, B2Spec, GcsSpec, LocalSpec, RestServerSpec, S3Spec, SwiftSpec};
    use std::collections::BTreeMap;

    fn secrets(pairs: &[(&str, &str)]) -> SecretValues {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        SecretValues::from_map("/etc/stash/repository/secret", map)
    }

    fn url(backend: Backend, pairs: &[(&str, &str)]) -> Location {
        Location::from_backend(&backend, &secrets(pairs)).unwrap()
    }

    #[test]
    fn every_backend_has_its_url() {
        let local = Backend {
            local: Some(LocalSpec { mount_path: "/safe/data".into(), ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(url(local, &[]).url, "/safe/data");
        let s3 = Backend {
            s3: Some(S3Spec {
                endpoint: "http://127.0.0.1:9000/".into(),
                bucket: "stash".into(),
                prefix: Some("/demo/".into()),
                region: Some("eu-1".into()),
                insecure_tls: true,
            }),
            ..Default::default()
        };
        let s3 = url(s3, &[("AWS_ACCESS_KEY_ID", "id"), ("AWS_SECRET_ACCESS_KEY", "key")]);
        assert_eq!(s3.url, "s3:http://127.0.0.1:9000/stash/demo");
        assert_eq!(s3.network_endpoint().as_deref(), Some("127.0.0.1:9000"));
        // L3: an IPv6 address without a port gets the scheme's port.
        let v6 = Location { url: "rest:http://[::1]/repo".into(), ..s3.clone() };
        assert_eq!(v6.network_endpoint().as_deref(), Some("[::1]:80"));
        let v6 = Location { url: "rest:https://[::1]:8000/repo".into(), ..s3.clone() };
        assert_eq!(v6.network_endpoint().as_deref(), Some("[::1]:8000"));
        assert_eq!(s3.options, ["s3.region=eu-1"]);
        assert!(s3.insecure_tls);
        assert_eq!(s3.env.len(), 2);
        let gcs = Backend {
            gcs: Some(GcsSpec { bucket: "b".into(), prefix: Some("p".into()), max_connections: Some(4) }),
            ..Default::default()
        };
        let gcs = url(gcs, &[("GOOGLE_PROJECT_ID", "proj"), ("GOOGLE_SERVICE_ACCOUNT_JSON_KEY", "{}")]);
        assert_eq!(gcs.url, "gs:b:/p");
        assert_eq!(gcs.options, ["gs.connections=4"]);
        assert!(gcs.env.iter().any(|(k, v)| k == "GOOGLE_APPLICATION_CREDENTIALS" && v.ends_with("JSON_KEY")));
        let azure =
            Backend { azure: Some(AzureSpec { container: "c".into(), ..Default::default() }), ..Default::default() };
        assert_eq!(url(azure, &[]).url, "azure:c:/");
        let swift = Backend {
            swift: Some(SwiftSpec { container: "c".into(), prefix: Some("p".into()) }),
            ..Default::default()
        };
        let swift = url(swift, &[("OS_AUTH_URL", "http://keystone"), ("RESTIC_PASSWORD", "x")]);
        assert_eq!(swift.url, "swift:c:/p");
        assert_eq!(swift.env, [("OS_AUTH_URL".to_string(), "http://keystone".to_string())]);
        let b2 = Backend { b2: Some(B2Spec { bucket: "b".into(), ..Default::default() }), ..Default::default() };
        assert_eq!(url(b2, &[]).url, "b2:b:");
    }

    #[test]
    fn rest_credentials_stay_out_of_messages() {
        let rest =
            Backend { rest: Some(RestServerSpec { url: "http://127.0.0.1:8000/repo".into() }), ..Default::default() };
        let location = url(rest.clone(), &[("REST_SERVER_USERNAME", "stash"), ("REST_SERVER_PASSWORD", "p@ss:word")]);
        assert_eq!(location.url, "rest:http://stash:p%40ss%3Aword@127.0.0.1:8000/repo");
        assert_eq!(location.display_url(), "rest:http://127.0.0.1:8000/repo");
        assert_eq!(location.network_endpoint().as_deref(), Some("127.0.0.1:8000"));
        assert!(!format!("{location:?}").contains("p%40ss"));
        assert_eq!(url(rest, &[]).url, "rest:http://127.0.0.1:8000/repo");
        let bad = Backend { rest: Some(RestServerSpec { url: "ftp://x".into() }), ..Default::default() };
        assert!(Location::from_backend(&bad, &secrets(&[])).is_err());
    }
}
