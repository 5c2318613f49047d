//! The install manifests are valid for a real API server: `kubectl apply -k deploy/` in server-side
//! dry-run, the cert-manager overlay renders, and the webhook client-auth component composes with both.

mod support;

use serde::Deserialize;
use std::process::Command;

#[test]
fn the_default_install_passes_server_side_dry_run() {
    let cluster = support::cluster();
    // A dry run cannot place objects in a namespace it only pretends to create.
    let namespace = Command::new(support::kubectl_path())
        .args(["apply", "--server-side", "--field-manager=stash-tests", "-f"])
        .arg(support::repo_root().join("deploy/base/namespace.yaml"))
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()
        .expect("kubectl runs");
    assert!(namespace.status.success(), "{}", String::from_utf8_lossy(&namespace.stderr));
    let out = Command::new(support::kubectl_path())
        .args(["apply", "--server-side", "--dry-run=server", "--field-manager=stash-tests", "-k"])
        .arg(support::repo_root().join("deploy"))
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()
        .expect("kubectl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "dry-run apply failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for object in [
        "deployment.apps/stash-operator",
        "service/stash-webhook",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/stash",
        "clusterrole.rbac.authorization.k8s.io/stash-operator",
        "clusterrole.rbac.authorization.k8s.io/stash-trigger",
        "clusterrole.rbac.authorization.k8s.io/stash-sidecar",
        "validatingadmissionpolicy.admissionregistration.k8s.io/stash-same-namespace-members",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/stash-same-namespace-members",
        "validatingadmissionpolicy.admissionregistration.k8s.io/stash-restic-args",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/stash-restic-args",
    ] {
        assert!(stdout.contains(object), "{object} missing from:\n{stdout}");
    }
}

#[test]
fn the_cert_manager_overlay_renders_with_ca_injection() {
    let out = Command::new(support::kubectl_path())
        .arg("kustomize")
        .arg(support::repo_root().join("deploy/overlays/cert-manager"))
        .output()
        .expect("kubectl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(rendered.contains("cert-manager.io/inject-ca-from-secret: stash/stash-webhook-ca-bundle"));
    assert!(rendered.contains("--ca-bundle-secret=stash-webhook-ca-bundle"));
    assert!(rendered.contains("--tls-cert-file=/etc/stash/webhook/tls.crt"));
    assert!(!rendered.contains("--self-signed-certs"));
}

/// M7: `deploy/components/webhook-client-auth` adds the client CA flag and its Secret volume to every
/// install, keeping what the install already mounts (the bring-your-own component's too).
#[test]
fn the_webhook_client_auth_component_composes_with_every_install() {
    let component = support::repo_root().join("deploy/components/webhook-client-auth");
    for (install, volumes) in [
        ("deploy", &["webhook-client-ca"][..]),
        ("deploy/overlays/cert-manager", &["webhook-client-ca", "webhook-tls"][..]),
        ("deploy/overlays/existing-secret", &["webhook-client-ca", "webhook-tls"][..]),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let kustomization = serde_json::json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [support::relative_to(dir.path(), &support::repo_root().join(install))],
            "components": [support::relative_to(dir.path(), &component)],
        });
        std::fs::write(dir.path().join("kustomization.yaml"), kustomization.to_string()).expect("write");
        let out =
            Command::new(support::kubectl_path()).arg("kustomize").arg(dir.path()).output().expect("kubectl runs");
        assert!(out.status.success(), "{install}: {}", String::from_utf8_lossy(&out.stderr));
        let rendered = String::from_utf8(out.stdout).expect("UTF-8");
        let deployment = serde_yaml::Deserializer::from_str(&rendered)
            .map(|document| serde_json::Value::deserialize(document).expect("YAML"))
            .find(|object| object["kind"] == "Deployment")
            .expect("the operator's Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let args = pod["containers"][0]["args"].as_array().expect("args");
        assert!(
            args.iter().any(|a| a == "--webhook-client-ca-file=/etc/stash/webhook-client/ca.crt"),
            "{install}: {args:?}"
        );
        let mut volumes_named: Vec<_> =
            pod["volumes"].as_array().expect("volumes").iter().filter_map(|v| v["name"].as_str()).collect();
        volumes_named.sort_unstable();
        assert_eq!(volumes_named, volumes, "{install}");
        let mounts = pod["containers"][0]["volumeMounts"].as_array().expect("volume mounts");
        assert!(
            mounts.iter().any(|m| m["name"] == "webhook-client-ca" && m["mountPath"] == "/etc/stash/webhook-client"),
            "{install}: {mounts:?}"
        );
    }
}

/// M5: the operator's cluster-wide role lets it take over or delete no one's Lease (a node's, a
/// controller's): of Leases it may only create them and read and renew the one name it invents for
/// namespaces' Repositories (`tenancy::NAMESPACE_LEASE`); its own leader Lease is granted by a Role in its
/// namespace.
#[test]
fn the_operator_may_touch_leases_only_in_its_own_namespace() {
    let text = std::fs::read_to_string(support::repo_root().join("deploy/base/rbac.yaml")).expect("rbac.yaml");
    let mut cluster_wide = Vec::new();
    let mut namespaced = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let object = serde_json::Value::deserialize(document).expect("YAML");
        let lease_rules: Vec<&serde_json::Value> = object["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|rule| rule["resources"].as_array().into_iter().flatten().any(|r| r == "leases" || r == "*"))
            .collect();
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        match object["kind"].as_str() {
            Some("ClusterRole") if name == "stash-operator" => cluster_wide.extend(lease_rules.into_iter().cloned()),
            Some("Role") if !lease_rules.is_empty() && object["metadata"]["namespace"] == "stash" => {
                namespaced.push(name)
            }
            _ => {}
        }
    }
    for rule in &cluster_wide {
        let verbs: Vec<&str> = rule["verbs"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
        let only_ours = rule["resourceNames"] == serde_json::json!(["stash-repositories"]);
        assert!(only_ours || verbs == ["create"], "the operator's ClusterRole reaches others' Leases: {rule}");
        assert!(!verbs.iter().any(|v| ["delete", "deletecollection", "patch", "*"].contains(v)), "{rule}");
    }
    assert_eq!(namespaced.len(), 1, "one Role in the operator's namespace grants its Lease");
}
