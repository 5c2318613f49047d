//! Counts the operator's own API requests by verb and resource (`stash_api_requests`): what the
//! controllers cost the API server, seen from our side. The scale benchmark and the tests read it.

use crate::metrics::{ApiRequestLabels, ApiVerb};
use http::{Method, Request};
use kube::client::{Body, ClientBuilder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// A client for `config` whose every request is counted in `requests`.
pub(crate) fn counted_client(
    config: kube::Config,
    requests: Family<ApiRequestLabels, Counter>,
) -> Result<kube::Client, kube::Error> {
    let count = tower::util::MapRequestLayer::new(move |request: Request<Body>| {
        requests.get_or_create(&classify(request.method(), request.uri().path(), request.uri().query())).inc();
        request
    });
    Ok(ClientBuilder::try_from(config)?.with_layer(&count).build())
}

/// The verb and resource of a request, the way the API server's audit log names them
/// (`cronjobs`, `backupbatches/status`). Paths outside the resource API (`/version`) are `other`.
fn classify(method: &Method, path: &str, query: Option<&str>) -> ApiRequestLabels {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segments.first() {
        Some(&"api") => segments.get(2..),
        Some(&"apis") => segments.get(3..),
        _ => None,
    };
    let rest = match rest {
        // `namespaces/<ns>/<resource>…`; `namespaces` or `namespaces/<name>` is the Namespace itself.
        Some(["namespaces", _, resource, tail @ ..]) => Some((*resource, tail)),
        Some([resource, tail @ ..]) => Some((*resource, tail)),
        _ => None,
    };
    let Some((resource, tail)) = rest else {
        // Non-resource paths (`/version`, discovery) read one thing.
        return ApiRequestLabels { verb: ApiVerb::from_method(method, true, false), resource: "other".into() };
    };
    let resource = match tail.get(1) {
        Some(sub) => format!("{resource}/{sub}"),
        None => resource.to_string(),
    };
    let watch = query.is_some_and(|q| q.split('&').any(|pair| pair == "watch=true" || pair == "watch=1"));
    ApiRequestLabels { verb: ApiVerb::from_method(method, !tail.is_empty(), watch), resource }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(method: Method, path: &str, query: Option<&str>) -> (ApiVerb, String) {
        let labels = classify(&method, path, query);
        (labels.verb, labels.resource)
    }

    #[test]
    fn requests_are_named_by_verb_and_resource_like_the_audit_log() {
        let cases = [
            (Method::GET, "/api/v1/namespaces/a/secrets/s", None, ApiVerb::get, "secrets"),
            (Method::GET, "/api/v1/namespaces/a/persistentvolumeclaims", None, ApiVerb::list, "persistentvolumeclaims"),
            (
                Method::GET,
                "/api/v1/persistentvolumeclaims",
                Some("watch=true&resourceVersion=1"),
                ApiVerb::watch,
                "persistentvolumeclaims",
            ),
            (Method::GET, "/api/v1/namespaces/a", None, ApiVerb::get, "namespaces"),
            (Method::GET, "/api/v1/namespaces", None, ApiVerb::list, "namespaces"),
            (
                Method::PATCH,
                "/apis/batch/v1/namespaces/a/cronjobs/c",
                Some("fieldManager=x"),
                ApiVerb::patch,
                "cronjobs",
            ),
            (
                Method::PATCH,
                "/apis/stash.appscode.com/v1beta1/namespaces/a/backupbatches/b/status",
                None,
                ApiVerb::patch,
                "backupbatches/status",
            ),
            (
                Method::POST,
                "/apis/rbac.authorization.k8s.io/v1/namespaces/a/rolebindings",
                None,
                ApiVerb::create,
                "rolebindings",
            ),
            (Method::PUT, "/apis/coordination.k8s.io/v1/namespaces/s/leases/l", None, ApiVerb::update, "leases"),
            (Method::DELETE, "/apis/batch/v1/namespaces/a/jobs/j", None, ApiVerb::delete, "jobs"),
            (Method::DELETE, "/apis/batch/v1/namespaces/a/jobs", None, ApiVerb::deletecollection, "jobs"),
            (Method::GET, "/version", None, ApiVerb::get, "other"),
        ];
        for (method, path, query, verb, resource) in cases {
            assert_eq!(labels(method, path, query), (verb, resource.to_string()), "{path}");
        }
    }
}
