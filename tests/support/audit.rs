//! The test control plane's audit log: which requests an identity sent. `cluster.sh` logs the
//! requests service accounts send to `stash.appscode.com` resources (everything with
//! `STASH_CLUSTER_AUDIT=1`), one JSON event per line in `audit.log` beside the admin kubeconfig.

use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Event {
    stage: String,
    verb: String,
    user: User,
    #[serde(rename = "requestURI")]
    request_uri: String,
    request_received_timestamp: Timestamp,
}

#[derive(Deserialize, Debug)]
struct User {
    username: String,
}

/// `verb request-uri` of each request `username` sent since `since`, watches left out (a watch
/// is the one request an idle client keeps open).
pub fn requests_since(username: &str, since: Timestamp) -> Vec<String> {
    let path = super::cluster().kubeconfig.with_file_name("audit.log");
    let log = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("{}: {err}; a cluster from tests/cluster/cluster.sh writes it", path.display()));
    log.lines()
        .map(|line| serde_json::from_str::<Event>(line).unwrap_or_else(|err| panic!("audit event {line}: {err}")))
        .filter(|e| e.stage == "ResponseComplete" && e.verb != "watch")
        .filter(|e| e.user.username == username && e.request_received_timestamp >= since)
        .map(|e| format!("{} {}", e.verb, e.request_uri))
        .collect()
}
