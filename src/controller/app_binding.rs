//! AppBinding database members (`appcatalog.appscode.com/v1alpha1`, as KubeDB and Stash's addons write
//! them): `spec.clientConfig` says where the database is, `spec.secret` names the Secret holding its
//! `username` and `password`, and the member's task name picks the engine. The operator reads
//! AppBindings only where their CRD is served, and only in the member's own namespace (cross-namespace
//! references are refused before, by `targets::inspect` and `restore_batch::plan_member`). The Job gets
//! the endpoint as Pod annotations and the Secret by reference (see `executor_job::DatabaseSource`), so
//! the executor reads the same files as for a Secret member.

use super::executor_job::DatabaseSource;
use crate::api::common::TargetRef;
use crate::executor_pod::Engine;
use crate::executor_pod::{APP_BINDING_KIND, DATABASE_KIND};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use serde::Deserialize;

const GROUP: &str = "appcatalog.appscode.com";
const VERSION: &str = "v1alpha1";
const PLURAL: &str = "appbindings";
/// The keys of the AppBinding's Secret the database clients use (KubeDB's auth Secret).
const CREDENTIAL_KEYS: [&str; 2] = ["username", "password"];

/// The part of an AppBinding's spec that is read; the rest (`parameters`, `appRef`, `version`, TLS
/// settings) is not acted on.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AppBindingSpec {
    #[serde(default)]
    pub(crate) client_config: ClientConfig,
    #[serde(default)]
    pub(crate) secret: Option<SecretName>,
    #[serde(default, rename = "type")]
    pub(crate) type_: Option<String>,
}

#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
pub(crate) struct ClientConfig {
    #[serde(default)]
    pub(crate) url: Option<String>,
    #[serde(default)]
    pub(crate) service: Option<ServiceReference>,
}

/// `scheme` and `query` are not needed to connect (the engine comes from the task) and are ignored.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
pub(crate) struct ServiceReference {
    #[serde(default)]
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) port: Option<i64>,
    #[serde(default)]
    pub(crate) path: Option<String>,
}

#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
pub(crate) struct SecretName {
    #[serde(default)]
    pub(crate) name: String,
}

/// Where the database listens; no port means the engine's default, no database every database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: Option<u16>,
    pub database: Option<String>,
}

/// Why `spec.clientConfig` gives no endpoint. Messages never quote the url: it might carry a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientConfigError {
    #[error("names neither url nor service")]
    Missing,
    #[error("url is not of the form scheme://host[:port][/database] or tcp(host[:port])[/database]")]
    UrlForm,
    #[error("url carries credentials; they belong in spec.secret")]
    UrlCredentials,
    #[error("{0}: no host")]
    NoHost(&'static str),
    #[error("{0}: the host is not a DNS name or IP address")]
    BadHost(&'static str),
    #[error("{0}: the port is not a number from 1 to 65535")]
    BadPort(&'static str),
    #[error("{0}: the path names more than a database")]
    BadPath(&'static str),
    #[error("service.name is not a Service name")]
    BadService,
}

/// Why an AppBinding member cannot be backed up or restored; `reason` is its condition reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("the AppBinding CRD (appbindings.{GROUP}/{VERSION}) is not installed in this cluster")]
    CrdMissing,
    #[error("AppBinding {name} does not exist")]
    NotFound { name: String },
    #[error("AppBinding {name} cannot be read: {error}")]
    Malformed { name: String, error: String },
    #[error(
        "AppBinding {name}: task {task:?} names no engine stash dumps (postgres-…, mysql-… or mariadb-…, as Stash's \
         addon tasks)"
    )]
    TaskNotSupported { name: String, task: String },
    #[error("AppBinding {name}: spec.type {type_:?} is not the engine of task {task:?}")]
    TypeMismatch { name: String, type_: String, task: String },
    #[error("AppBinding {name}: spec.clientConfig {error}")]
    ClientConfig { name: String, error: ClientConfigError },
    #[error("AppBinding {name} names no spec.secret.name")]
    SecretNotNamed { name: String },
    #[error("Secret {secret} (spec.secret of AppBinding {name}) does not exist")]
    SecretNotFound { name: String, secret: String },
    #[error("Secret {secret} (spec.secret of AppBinding {name}) has no {key} key")]
    KeyMissing { name: String, secret: String, key: &'static str },
}

impl Problem {
    /// The condition reason: a missing object reads as for every other member kind.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Problem::CrdMissing => "AppBindingCRDMissing",
            Problem::NotFound { .. } | Problem::SecretNotFound { .. } => "TargetNotFound",
            Problem::Malformed { .. } | Problem::ClientConfig { .. } => "AppBindingInvalid",
            Problem::TaskNotSupported { .. } => "TaskNotSupported",
            Problem::TypeMismatch { .. } => "AppBindingTypeMismatch",
            Problem::SecretNotNamed { .. } => "SecretNotNamed",
            Problem::KeyMissing { .. } => "SecretKeyMissing",
        }
    }
}

/// The endpoint `config` names, for an AppBinding of `namespace`: `url` first (as Stash read it), else
/// `service` as `<name>.<namespace>.svc`. Anything not clearly one of those is refused, never guessed.
pub(crate) fn endpoint(config: &ClientConfig, namespace: &str) -> Result<Endpoint, ClientConfigError> {
    if let Some(url) = config.url.as_deref().filter(|u| !u.trim().is_empty()) {
        return parse_url(url.trim());
    }
    let service = config.service.as_ref().ok_or(ClientConfigError::Missing)?;
    if !is_dns_label(&service.name) {
        return Err(ClientConfigError::BadService);
    }
    let port = match service.port {
        None => None,
        Some(port) => Some(u16::try_from(port).ok().filter(|p| *p > 0).ok_or(ClientConfigError::BadPort("service"))?),
    };
    let database = database_of(service.path.as_deref().unwrap_or_default(), "service")?;
    Ok(Endpoint { host: format!("{}.{namespace}.svc", service.name), port, database })
}

/// `scheme://host[:port][/database][?query]` or Go's MySQL form `tcp(host[:port])[/database][?query]`.
fn parse_url(url: &str) -> Result<Endpoint, ClientConfigError> {
    if url.contains('@') {
        return Err(ClientConfigError::UrlCredentials);
    }
    let (authority, rest) = if let Some(inner) = url.strip_prefix("tcp(") {
        inner.split_once(')').ok_or(ClientConfigError::UrlForm)?
    } else {
        let (scheme, after) = url.split_once("://").ok_or(ClientConfigError::UrlForm)?;
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if !scheme_ok {
            return Err(ClientConfigError::UrlForm);
        }
        after.split_at(after.find(['/', '?', '#']).unwrap_or(after.len()))
    };
    let path = rest.split(['?', '#']).next().unwrap_or_default();
    if !path.is_empty() && !path.starts_with('/') {
        return Err(ClientConfigError::UrlForm);
    }
    let (host, port) = host_and_port(authority)?;
    Ok(Endpoint { host, port, database: database_of(path, "url")? })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn host_and_port(authority: &str) -> Result<(String, Option<u16>), ClientConfigError> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed.split_once(']').ok_or(ClientConfigError::BadHost("url"))?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or(ClientConfigError::BadHost("url"))?),
            };
            let v6 = host.parse::<std::net::Ipv6Addr>().map_err(|_| ClientConfigError::BadHost("url"))?;
            (v6.to_string(), port)
        }
        None => {
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            if host.is_empty() {
                return Err(ClientConfigError::NoHost("url"));
            }
            // A name or an IPv4 address; an IPv6 address must be bracketed to tell it from the port.
            let name_ok =
                host.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c)) && !host.starts_with(['-', '.']);
            if !name_ok {
                return Err(ClientConfigError::BadHost("url"));
            }
            (host.to_string(), port)
        }
    };
    let port = match port {
        None => None,
        Some(port) => Some(port.parse::<u16>().ok().filter(|p| *p > 0).ok_or(ClientConfigError::BadPort("url"))?),
    };
    Ok((host, port))
}

/// The database a path names: `/`, empty → every database; `/name` → `name`. A name the dump tools
/// would read as an option, or percent-encoded (not decoded here), is refused.
fn database_of(path: &str, field: &'static str) -> Result<Option<String>, ClientConfigError> {
    let name = path.strip_prefix('/').unwrap_or(path);
    if name.is_empty() {
        return Ok(None);
    }
    if name.contains(['/', '%']) || name.starts_with('-') || name.chars().any(char::is_control) {
        return Err(ClientConfigError::BadPath(field));
    }
    Ok(Some(name.to_string()))
}

/// A Service name (RFC 1035 label).
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The engine: the task name decides, as Stash's addon task names did; `spec.type`, when set, must
/// name the same engine (`kubedb.com/postgres`, `kubedb.com/mysql`, `kubedb.com/mariadb`).
pub(crate) fn engine(name: &str, task: Option<&str>, type_: Option<&str>) -> Result<Engine, Problem> {
    let task = task.unwrap_or_default();
    let engine =
        Engine::named_by(task).ok_or_else(|| Problem::TaskNotSupported { name: name.into(), task: task.into() })?;
    match type_.filter(|t| !t.is_empty()) {
        Some(type_) if Engine::named_by(type_.rsplit('/').next().unwrap_or(type_)) != Some(engine) => {
            Err(Problem::TypeMismatch { name: name.into(), type_: type_.into(), task: task.into() })
        }
        _ => Ok(engine),
    }
}

/// The database source of AppBinding `name` of `namespace` once its Secret is known: the endpoint,
/// and the Secret, which must hold `username` and `password`.
pub(crate) fn source(
    name: &str,
    namespace: &str,
    spec: &AppBindingSpec,
    task: Option<&str>,
    secret: Option<&Secret>,
) -> Result<DatabaseSource, Problem> {
    engine(name, task, spec.type_.as_deref())?;
    let endpoint =
        endpoint(&spec.client_config, namespace).map_err(|error| Problem::ClientConfig { name: name.into(), error })?;
    let secret_name = secret_name(name, spec)?;
    let secret = secret.ok_or_else(|| Problem::SecretNotFound { name: name.into(), secret: secret_name.clone() })?;
    if let Some(key) = CREDENTIAL_KEYS.into_iter().find(|key| !super::backup_batch::has_key(secret, key)) {
        return Err(Problem::KeyMissing { name: name.into(), secret: secret_name, key });
    }
    Ok(DatabaseSource::AppBinding { secret: secret_name, endpoint })
}

fn secret_name(name: &str, spec: &AppBindingSpec) -> Result<String, Problem> {
    let secret = spec.secret.as_ref().map(|s| s.name.clone()).filter(|s| !s.is_empty());
    secret.ok_or_else(|| Problem::SecretNotNamed { name: name.into() })
}

/// Reads AppBinding `name` of `namespace` and its Secret, and resolves them (see `source`).
pub(crate) async fn resolve(
    client: &Client,
    namespace: &str,
    name: &str,
    task: Option<&str>,
) -> Result<Result<DatabaseSource, Problem>, kube::Error> {
    let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, APP_BINDING_KIND), PLURAL);
    let bindings: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    // Both a missing object and an unserved resource answer 404 (the latter with a plain-text body,
    // which `get_opt` does not count as "not found"): discovery tells them apart.
    let binding = match bindings.get(name).await {
        Ok(binding) => binding,
        Err(kube::Error::Api(status)) if status.code == 404 => {
            let served = served(client).await?;
            return Ok(Err(if served { Problem::NotFound { name: name.into() } } else { Problem::CrdMissing }));
        }
        Err(error) => return Err(error),
    };
    let spec = binding.data.get("spec").cloned().unwrap_or_default();
    let spec: AppBindingSpec = match serde_json::from_value(spec) {
        Ok(spec) => spec,
        Err(error) => return Ok(Err(Problem::Malformed { name: name.into(), error: error.to_string() })),
    };
    let secret = match secret_name(name, &spec) {
        Ok(secret) => Api::<Secret>::namespaced(client.clone(), namespace).get_opt(&secret).await?,
        Err(_) => None,
    };
    Ok(source(name, namespace, &spec, task, secret.as_ref()))
}

/// Whether the API server serves AppBindings.
async fn served(client: &Client) -> Result<bool, kube::Error> {
    match client.list_api_group_resources(&format!("{GROUP}/{VERSION}")).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == PLURAL)),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(error) => Err(error),
    }
}

/// How the Job of a member reaches its database: `None` for a member that is no database; a Secret
/// member's Secret as it is; an AppBinding resolved in `namespace`.
pub(crate) async fn database_source(
    client: &Client,
    namespace: &str,
    reference: &TargetRef,
    task: Option<&str>,
) -> Result<Result<Option<DatabaseSource>, Problem>, kube::Error> {
    Ok(match reference.kind.as_str() {
        DATABASE_KIND => Ok(Some(DatabaseSource::Secret(reference.name.clone()))),
        APP_BINDING_KIND => resolve(client, namespace, &reference.name, task).await?.map(Some),
        _ => Ok(None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn url(url: &str) -> Result<Endpoint, ClientConfigError> {
        endpoint(&ClientConfig { url: Some(url.into()), service: None }, "demo")
    }

    fn at(host: &str, port: Option<u16>, database: Option<&str>) -> Endpoint {
        Endpoint { host: host.into(), port, database: database.map(Into::into) }
    }

    #[test]
    fn urls_of_the_forms_kubedb_and_stash_write_give_host_port_and_database() {
        let cases = [
            ("tcp(wordpress-db.demo.svc:3306)/", at("wordpress-db.demo.svc", Some(3306), None)),
            ("tcp(mysql.demo.svc)/shop", at("mysql.demo.svc", None, Some("shop"))),
            ("postgres://127.0.0.1:5432/shop?sslmode=disable", at("127.0.0.1", Some(5432), Some("shop"))),
            ("postgresql://db.example.com", at("db.example.com", None, None)),
            ("mysql://db.example.com:3307/", at("db.example.com", Some(3307), None)),
            ("postgres://[::1]:5433/app", at("::1", Some(5433), Some("app"))),
            ("postgres://[::1]", at("::1", None, None)),
            ("  mysql://db:3306?tls=true  ", at("db", Some(3306), None)),
        ];
        for (given, expected) in cases {
            assert_eq!(url(given), Ok(expected), "{given}");
        }
    }

    #[test]
    fn unknown_or_unsafe_urls_are_refused_not_guessed() {
        let cases = [
            ("db.demo.svc:5432", ClientConfigError::UrlForm),
            ("tcp(db:3306", ClientConfigError::UrlForm),
            ("tcp(db:3306)shop", ClientConfigError::UrlForm),
            ("://db:5432", ClientConfigError::UrlForm),
            ("1x://db:5432", ClientConfigError::UrlForm),
            ("postgres://user:secret@db:5432/app", ClientConfigError::UrlCredentials),
            ("postgres://:5432/app", ClientConfigError::NoHost("url")),
            ("postgres://db:/app", ClientConfigError::BadPort("url")),
            ("postgres://db:0/app", ClientConfigError::BadPort("url")),
            ("postgres://db:70000/app", ClientConfigError::BadPort("url")),
            ("postgres://db:54x/app", ClientConfigError::BadPort("url")),
            ("postgres://::1:5432/app", ClientConfigError::BadHost("url")),
            ("postgres://[nothex]:5432", ClientConfigError::BadHost("url")),
            ("postgres://[::1]x", ClientConfigError::BadHost("url")),
            ("postgres://-oProxy=x/app", ClientConfigError::BadHost("url")),
            ("postgres://db host/app", ClientConfigError::BadHost("url")),
            ("postgres://db/app/extra", ClientConfigError::BadPath("url")),
            ("postgres://db/--all-databases", ClientConfigError::BadPath("url")),
            ("postgres://db/my%20db", ClientConfigError::BadPath("url")),
        ];
        for (given, expected) in cases {
            assert_eq!(url(given), Err(expected), "{given}");
        }
        let refused = url("postgres://admin:hunter2@db/app").expect_err("refused");
        assert!(!refused.to_string().contains("hunter2"), "{refused}");
    }

    #[test]
    fn a_service_is_its_cluster_dns_name_in_the_appbindings_namespace() {
        let service = |value: serde_json::Value| -> Result<Endpoint, ClientConfigError> {
            let config: ClientConfig = serde_json::from_value(json!({"service": value})).expect("a clientConfig");
            endpoint(&config, "demo")
        };
        assert_eq!(
            service(
                json!({"name": "sample-postgres", "port": 5432, "scheme": "postgresql", "path": "/", "query": "sslmode=disable"})
            ),
            Ok(at("sample-postgres.demo.svc", Some(5432), None))
        );
        assert_eq!(service(json!({"name": "shop", "path": "/orders"})), Ok(at("shop.demo.svc", None, Some("orders"))));
        assert_eq!(service(json!({"name": "Shop", "port": 5432})), Err(ClientConfigError::BadService));
        assert_eq!(service(json!({"name": "", "port": 5432})), Err(ClientConfigError::BadService));
        assert_eq!(service(json!({"name": "shop", "port": 0})), Err(ClientConfigError::BadPort("service")));
        assert_eq!(service(json!({"name": "shop", "port": 65536})), Err(ClientConfigError::BadPort("service")));
        assert_eq!(service(json!({"name": "shop", "path": "/-x"})), Err(ClientConfigError::BadPath("service")));
        assert_eq!(endpoint(&ClientConfig::default(), "demo"), Err(ClientConfigError::Missing));
        let both: ClientConfig =
            serde_json::from_value(json!({"url": "tcp(ext:3306)/", "service": {"name": "shop", "port": 3306}}))
                .expect("a clientConfig");
        assert_eq!(endpoint(&both, "demo"), Ok(at("ext", Some(3306), None)), "url first, as Stash read it");
    }

    #[test]
    fn the_task_picks_the_engine_and_the_type_must_agree() {
        assert_eq!(engine("db", Some("postgres-backup-15.1"), Some("kubedb.com/postgres")), Ok(Engine::Postgres));
        assert_eq!(engine("db", Some("mysql-backup-8.0.14"), None), Ok(Engine::Mysql));
        assert_eq!(engine("db", Some("mariadb-restore-10.5.8"), Some("kubedb.com/mariadb")), Ok(Engine::Mysql));
        assert_eq!(engine("db", Some("mysql-backup-8.0.14"), Some("kubedb.com/mariadb")), Ok(Engine::Mysql));
        let refused = |task: Option<&str>, type_: Option<&str>| engine("db", task, type_).map_err(|p| p.reason());
        assert_eq!(refused(Some("mongodb-backup-4.2.3"), None), Err("TaskNotSupported"));
        assert_eq!(refused(None, Some("kubedb.com/postgres")), Err("TaskNotSupported"));
        assert_eq!(refused(Some("postgres-backup-15.1"), Some("kubedb.com/mysql")), Err("AppBindingTypeMismatch"));
        assert_eq!(refused(Some("mysql-backup-8.0.14"), Some("kubedb.com/mongodb")), Err("AppBindingTypeMismatch"));
    }

    #[test]
    fn the_secret_must_exist_and_hold_username_and_password() {
        let spec: AppBindingSpec = serde_json::from_value(json!({
            "type": "kubedb.com/postgres", "secret": {"name": "db-auth"},
            "clientConfig": {"service": {"name": "db", "port": 5432}}, "parameters": {"anything": true}}))
        .expect("a spec");
        let secret = |data: serde_json::Value| -> Secret {
            serde_json::from_value(json!({"stringData": data})).expect("a Secret")
        };
        let task = Some("postgres-backup-15.1");
        let found = source("db", "demo", &spec, task, Some(&secret(json!({"username": "u", "password": "p"}))));
        assert_eq!(
            found,
            Ok(DatabaseSource::AppBinding { secret: "db-auth".into(), endpoint: at("db.demo.svc", Some(5432), None) })
        );
        let missing = source("db", "demo", &spec, task, None).expect_err("no Secret");
        assert_eq!((missing.reason(), missing.to_string().contains("db-auth")), ("TargetNotFound", true));
        let keyless = source("db", "demo", &spec, task, Some(&secret(json!({"username": "u"})))).expect_err("no key");
        assert_eq!(keyless, Problem::KeyMissing { name: "db".into(), secret: "db-auth".into(), key: "password" });
        let unnamed = AppBindingSpec { secret: None, ..spec };
        assert_eq!(source("db", "demo", &unnamed, task, None).map_err(|p| p.reason()), Err("SecretNotNamed"));
    }
}
