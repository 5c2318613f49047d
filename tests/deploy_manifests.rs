//! The install manifests are valid for a real API server: `kubectl apply -k deploy/` in server-side
//! dry-run, and the cert-manager overlay renders.

mod support;

use std::path::PathBuf;
use std::process::Command;

fn kubectl() -> PathBuf {
    let out = Command::new(support::repo_root().join("tests/cluster/build.sh")).output().expect("build.sh runs");
    assert!(out.status.success(), "build.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).expect("UTF-8").trim()).join("kubectl")
}

#[test]
fn the_default_install_passes_server_side_dry_run() {
    let cluster = support::cluster();
    // A dry run cannot place objects in a namespace it only pretends to create.
    let namespace = Command::new(kubectl())
        .args(["apply", "--server-side", "--field-manager=stash-tests", "-f"])
        .arg(support::repo_root().join("deploy/base/namespace.yaml"))
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()
        .expect("kubectl runs");
    assert!(namespace.status.success(), "{}", String::from_utf8_lossy(&namespace.stderr));
    let out = Command::new(kubectl())
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
    ] {
        assert!(stdout.contains(object), "{object} missing from:\n{stdout}");
    }
}

#[test]
fn the_cert_manager_overlay_renders_with_ca_injection() {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(support::repo_root().join("deploy/overlays/cert-manager"))
        .output()
        .expect("kubectl runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rendered = String::from_utf8_lossy(&out.stdout);
    assert!(rendered.contains("cert-manager.io/inject-ca-from: stash/stash-webhook"));
    assert!(rendered.contains("--tls-cert-file=/etc/stash/webhook/tls.crt"));
    assert!(!rendered.contains("--self-signed-certs"));
}
