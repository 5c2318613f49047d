//! The Helm chart (`charts/stash`) installs what `deploy/` installs: its renderings are compared object by
//! object with kustomize's (Helm's own labels aside), for the defaults, cert-manager mode, existingSecret
//! mode, monitoring and the test node's values; `helm lint` checks the values against `values.schema.json`; and a real `helm install`,
//! `upgrade` and `uninstall` on the test cluster leave nothing behind.

mod support;

use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};
use support::node::CHART_VALUES;

const CHART: &str = "charts/stash";
/// The namespace deploy/ installs into.
const NAMESPACE: &str = "stash";
/// Labels Helm's conventions add (the chart's `stash.helmLabels`); deploy/ has no counterpart.
const HELM_LABELS: &[&str] =
    &["helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "app.kubernetes.io/version"];

fn helm(args: &[&str]) -> Output {
    Command::new(support::helm_path()).current_dir(support::repo_root()).args(args).output().expect("helm runs")
}

fn success(out: Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed: {stderr}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `helm template` of the chart as `helm install stash charts/stash -n stash` would install it.
fn chart(values: &[&str]) -> String {
    let args = [&["template", NAMESPACE, CHART, "--namespace", NAMESPACE, "--include-crds"][..], values].concat();
    success(helm(&args), &format!("helm template {values:?}"))
}

fn kustomize(dir: &str) -> String {
    let out = Command::new(support::kubectl_path()).arg("kustomize").arg(support::repo_root().join(dir)).output();
    success(out.expect("kubectl runs"), &format!("kubectl kustomize {dir}"))
}

/// The objects of a rendering by (apiVersion, kind, namespace, name), without Helm's own labels.
fn objects(rendered: &str) -> BTreeMap<String, Value> {
    serde_yaml::Deserializer::from_str(rendered)
        .map(|document| Value::deserialize(document).expect("YAML"))
        .filter(|object| !object.is_null())
        .map(|mut object| {
            if let Some(labels) = object["metadata"].get_mut("labels").and_then(Value::as_object_mut) {
                labels.retain(|key, _| !HELM_LABELS.contains(&key.as_str()));
                if labels.is_empty() {
                    object["metadata"].as_object_mut().expect("metadata").remove("labels");
                }
            }
            let field = |value: &Value| value.as_str().unwrap_or_default().to_string();
            let metadata = &object["metadata"];
            let key = format!(
                "{} {} {}/{}",
                field(&object["apiVersion"]),
                field(&object["kind"]),
                field(&metadata["namespace"]),
                field(&metadata["name"])
            );
            (key, object)
        })
        .collect()
}

/// The first path (in key order) where the two differ, with both sides' values there.
fn first_difference(kustomize: &Value, chart: &Value, path: &str) -> Option<String> {
    let at = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    match (kustomize, chart) {
        (Value::Object(k), Value::Object(c)) => {
            let keys: BTreeSet<&String> = k.keys().chain(c.keys()).collect();
            keys.into_iter().find_map(|key| match (k.get(key), c.get(key)) {
                (Some(k), Some(c)) => first_difference(k, c, &at(key)),
                (Some(k), None) => Some(format!("{}: kustomize has {k}, the chart nothing", at(key))),
                (None, Some(c)) => Some(format!("{}: the chart has {c}, kustomize nothing", at(key))),
                (None, None) => None,
            })
        }
        (Value::Array(k), Value::Array(c)) if k.len() == c.len() => {
            k.iter().zip(c).enumerate().find_map(|(i, (k, c))| first_difference(k, c, &format!("{path}[{i}]")))
        }
        // kustomize writes the CRDs' `0.0` as `0`: the same JSON number.
        (Value::Number(k), Value::Number(c)) if k.as_f64() == c.as_f64() => None,
        (k, c) if k == c => None,
        (k, c) => Some(format!("{path}: kustomize has {k}, the chart {c}")),
    }
}

/// Whether the chart rendered with `values` is the kustomize build of `dir`, and if not, the first
/// object that differs and where. The Namespace is not compared: Helm makes the release's namespace
/// before it installs anything (`--create-namespace`), so a chart cannot carry its own.
fn compare(dir: &str, values: &[&str]) -> Result<(), String> {
    let mut expected = objects(&kustomize(dir));
    expected.remove(&format!("v1 Namespace /{NAMESPACE}")).expect("deploy/ makes its namespace");
    let rendered = objects(&chart(values));
    let keys: BTreeSet<&String> = expected.keys().chain(rendered.keys()).collect();
    for key in keys {
        match (expected.get(key), rendered.get(key)) {
            (Some(_), None) => return Err(format!("{key}: in kustomize build {dir}, not in the chart")),
            (None, Some(_)) => return Err(format!("{key}: in the chart, not in kustomize build {dir}")),
            (Some(k), Some(c)) => {
                if let Some(difference) = first_difference(k, c, "") {
                    return Err(format!("{key}: {difference}"));
                }
            }
            (None, None) => {}
        }
    }
    Ok(())
}

fn the_one<'a>(objects: &'a BTreeMap<String, Value>, kind: &str) -> &'a Value {
    let mut found = objects.values().filter(|object| object["kind"] == kind);
    let object = found.next().unwrap_or_else(|| panic!("no {kind} rendered"));
    assert!(found.next().is_none(), "more than one {kind} rendered");
    object
}

#[test]
fn the_chart_lints_in_every_certificate_mode() {
    for values in [
        &[][..],
        &["--set", "webhook.certificate.mode=certManager"][..],
        &["--set", "webhook.certificate.mode=existingSecret,webhook.certificate.existingSecret.name=tls"][..],
        &[
            "--set",
            "webhook.certificate.mode=existingSecret,webhook.certificate.existingSecret.name=tls",
            "--set",
            "webhook.certificate.existingSecret.caConfigMap=corp-ca",
        ][..],
        &["--set", "podDisruptionBudget.enabled=true,webhook.clientAuth.enabled=true,controller.watchNamespace=apps"][..],
    ] {
        let out = success(helm(&[&["lint", "--strict", CHART][..], values].concat()), &format!("helm lint {values:?}"));
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
}

#[test]
fn the_values_schema_refuses_what_the_chart_cannot_install() {
    for (values, refusal) in [
        ("imag.tag=x", "additional properties 'imag' not allowed"),
        ("webhook.certificate.mode=vault", "/webhook/certificate/mode"),
        ("webhook.certificate.mode=existingSecret", "/webhook/certificate/existingSecret/name"),
        // The operator publishes the CA now; the chart takes none.
        ("webhook.certificate.existingSecret.caBundle=Q0EK", "additional properties 'caBundle' not allowed"),
        ("webhook.failurePolicy=Never", "/webhook/failurePolicy"),
        ("controller.lease.duration=soon", "/controller/lease/duration"),
    ] {
        let out = helm(&["lint", CHART, "--set", values]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success() && said.contains(refusal), "helm lint --set {values}: {said}");
    }
}

#[test]
fn default_values_install_what_kustomize_builds_from_deploy() {
    compare("deploy", &[]).unwrap_or_else(|difference| panic!("{difference}"));
}

#[test]
fn a_difference_names_the_object_and_the_field() {
    let replicas = compare("deploy", &["--set", "replicas=3"]).expect_err("three replicas are not deploy/'s two");
    assert_eq!(
        replicas, "apps/v1 Deployment stash/stash-operator: spec.replicas: kustomize has 2, the chart 3",
        "{replicas}"
    );
    let missing = compare("deploy", &["--set", "admissionPolicy.enabled=false"]).expect_err("no policies");
    assert_eq!(
        missing,
        "admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy /stash-restic-args: in kustomize build deploy, \
         not in the chart"
    );
    let extra = compare("deploy", &["--set", "podDisruptionBudget.enabled=true"]).expect_err("a PDB");
    assert_eq!(
        extra,
        "policy/v1 PodDisruptionBudget stash/stash-operator: in the chart, not in kustomize build deploy"
    );
}

#[test]
fn cert_manager_mode_installs_what_the_cert_manager_overlay_builds() {
    let values = ["--set", "webhook.certificate.mode=certManager"];
    compare("deploy/overlays/cert-manager", &values).unwrap_or_else(|difference| panic!("{difference}"));
    let rendered = objects(&chart(&values));
    let named = |kind: &str, name: &str| {
        rendered
            .values()
            .find(|object| object["kind"] == kind && object["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name} rendered"))
            .clone()
    };
    assert_eq!(named("Issuer", "stash-selfsigned")["spec"], json!({"selfSigned": {}}));
    assert_eq!(named("Issuer", "stash-ca")["spec"], json!({"ca": {"secretName": "stash-webhook-ca"}}));
    let ca = named("Certificate", "stash-webhook-ca");
    assert_eq!((&ca["spec"]["isCA"], &ca["spec"]["issuerRef"]["name"]), (&json!(true), &json!("stash-selfsigned")));
    let certificate = named("Certificate", "stash-webhook");
    assert_eq!(certificate["spec"]["secretName"], "stash-webhook-tls");
    assert_eq!(certificate["spec"]["issuerRef"]["name"], "stash-ca");
    let webhook = the_one(&rendered, "MutatingWebhookConfiguration");
    assert_eq!(
        webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from-secret"],
        "stash/stash-webhook-ca-bundle"
    );

    // An issuer of the platform team's instead of the chart's own.
    let issuer = [
        "--set",
        "webhook.certificate.mode=certManager",
        "--set-json",
        r#"webhook.certificate.certManager.issuerRef={"kind":"ClusterIssuer","name":"corp-ca"}"#,
    ];
    let rendered = objects(&chart(&issuer));
    assert!(!rendered.values().any(|object| object["kind"] == "Issuer"), "no Issuer of the chart's own");
    assert_eq!(
        the_one(&rendered, "Certificate")["spec"]["issuerRef"],
        json!({"kind": "ClusterIssuer", "name": "corp-ca"})
    );
}

#[test]
fn the_test_node_values_install_what_the_test_node_overlay_builds() {
    compare("deploy/overlays/test-node", &["--set", CHART_VALUES]).unwrap_or_else(|difference| panic!("{difference}"));
}

/// `monitoring.enabled` renders deploy/components/monitoring: the ServiceMonitor, the PrometheusRule
/// (its rules read from the component's file) and the dashboard ConfigMap; extra labels reach the
/// ServiceMonitor and PrometheusRule only, and the dashboard can be left out.
#[test]
fn monitoring_installs_what_the_monitoring_overlay_builds() {
    compare("deploy/overlays/monitoring", &["--set", "monitoring.enabled=true"])
        .unwrap_or_else(|difference| panic!("{difference}"));
    let labelled = objects(&chart(&[
        "--set",
        "monitoring.enabled=true,monitoring.grafanaDashboard=false,monitoring.additionalLabels.release=kps",
    ]));
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        assert_eq!(the_one(&labelled, kind)["metadata"]["labels"]["release"], "kps", "{kind}");
    }
    assert!(!labelled.values().any(|object| object["kind"] == "ConfigMap"), "no dashboard");
    let lint = helm(&["lint", "--strict", CHART, "--set", "monitoring.enabled=true"]);
    assert!(success(lint, "helm lint monitoring").contains("0 chart(s) failed"));
}

#[test]
fn existing_secret_mode_installs_what_the_existing_secret_overlay_builds() {
    let values =
        ["--set", "webhook.certificate.mode=existingSecret,webhook.certificate.existingSecret.name=stash-webhook-tls"];
    compare("deploy/overlays/existing-secret", &values).unwrap_or_else(|difference| panic!("{difference}"));
}

/// existingSecret mode: the operator reads the user's Secret from files and publishes the CA from the
/// Secret's key, or from a ConfigMap's, as caBundle itself, so the chart needs no cluster to render and
/// a rotated CA needs no `helm upgrade`.
#[test]
fn existing_secret_mode_mounts_the_users_secret_and_the_operator_publishes_its_ca() {
    let mode = "webhook.certificate.mode=existingSecret,webhook.certificate.existingSecret.name=corp-tls";
    let rendered = objects(&chart(&["--set", mode]));
    let pod = &the_one(&rendered, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"], json!([{"name": "webhook-tls", "secret": {"secretName": "corp-tls"}}]));
    let container = &pod["containers"][0];
    assert_eq!(
        container["volumeMounts"],
        json!([{"name": "webhook-tls", "mountPath": "/etc/stash/webhook", "readOnly": true}])
    );
    assert_eq!(
        container["args"],
        json!([
            "operator",
            "--tls-cert-file=/etc/stash/webhook/tls.crt",
            "--tls-key-file=/etc/stash/webhook/tls.key",
            "--ca-bundle-file=/etc/stash/webhook/ca.crt"
        ])
    );
    let webhook = the_one(&rendered, "MutatingWebhookConfiguration");
    assert_eq!(webhook["webhooks"][0]["clientConfig"].get("caBundle"), None, "the operator owns caBundle");
    assert!(!rendered.values().any(|object| object["kind"] == "Certificate"), "no cert-manager objects");

    // The CA from a key of a ConfigMap instead, mounted beside the Secret.
    let rendered = objects(&chart(&[
        "--set",
        mode,
        "--set",
        "webhook.certificate.existingSecret.caConfigMap=corp-ca,webhook.certificate.existingSecret.caKey=bundle.pem",
    ]));
    let pod = &the_one(&rendered, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"],
        json!([
            {"name": "webhook-tls", "secret": {"secretName": "corp-tls"}},
            {"name": "webhook-ca", "configMap": {"name": "corp-ca"}}
        ])
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["volumeMounts"][1],
        json!({"name": "webhook-ca", "mountPath": "/etc/stash/webhook-ca", "readOnly": true})
    );
    assert_eq!(container["args"][3], "--ca-bundle-file=/etc/stash/webhook-ca/bundle.pem");
}

/// A release on the test cluster, uninstalled (and its namespace deleted) when dropped, also when the
/// test fails half-way.
struct Release {
    namespace: String,
}

impl Release {
    fn helm(&self, args: &[&str]) -> String {
        let out = support::node::helm(&[args, &["--namespace", &self.namespace]].concat());
        success(out, &format!("helm {args:?}"))
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        for (what, out) in [
            (
                "helm uninstall",
                support::node::helm(&["uninstall", NAMESPACE, "--ignore-not-found", "-n", &self.namespace]),
            ),
            (
                "kubectl delete namespace",
                support::node::kubectl(&["delete", "namespace", &self.namespace, "--ignore-not-found", "--wait=false"]),
            ),
        ] {
            if !out.status.success() {
                eprintln!("{what}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
}

/// `kubectl get -f manifest -o name`: what of the manifest's objects exists.
fn existing(manifest: &std::path::Path) -> Vec<String> {
    let file = manifest.to_str().expect("a UTF-8 path");
    let out = support::node::kubectl(&["get", "-f", file, "--ignore-not-found", "-o", "name"]);
    success(out, "kubectl get -f").lines().map(str::to_string).collect()
}

/// A real install (no node: the operator's Pods stay Pending, which this does not wait for), an upgrade
/// to existingSecret mode with the user's Secret, and an uninstall that leaves none of
/// the release's objects. Every test binary applies deploy/base/rbac.yaml first (`support::cluster`), so
/// the cluster-wide roles exist already: `--take-ownership` adopts them as it would on a cluster that had
/// deploy/ installed with kubectl; the next test binary applies them again.
#[test]
fn helm_install_creates_every_object_and_uninstall_removes_them() {
    let release = Release { namespace: format!("stash-helm-{}", std::process::id()) };
    release.helm(&["install", NAMESPACE, CHART, "--create-namespace", "--take-ownership"]);
    let manifest = release.helm(&["get", "manifest", NAMESPACE]);
    let expected: Vec<String> = objects(&manifest)
        .values()
        .map(|object| {
            format!(
                "{}/{}",
                object["kind"].as_str().expect("a kind"),
                object["metadata"]["name"].as_str().expect("a name")
            )
        })
        .collect();
    assert_eq!(expected.len(), objects(&chart(&[])).len() - 4, "everything but the 4 CRDs: {expected:?}");
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest_file = dir.path().join("manifest.yaml");
    std::fs::write(&manifest_file, &manifest).expect("write the manifest");
    let found = existing(&manifest_file);
    assert_eq!(found.len(), expected.len(), "installed {found:?}, rendered {expected:?}");

    // existingSecret mode: the Deployment mounts the user's Secret and names its CA to the operator,
    // which publishes it (its Pods stay Pending without a node: caBundle stays unwritten here).
    let ca = stash::certs::generate_ca("corp-ca", std::time::Duration::from_secs(3600)).expect("a CA");
    let service = format!("stash-webhook.{}.svc", release.namespace);
    let leaf = stash::certs::issue_serving(&ca, &[service], &[], std::time::Duration::from_secs(3600)).expect("a leaf");
    for (name, pem) in [("tls.crt", &leaf.cert_pem), ("tls.key", &leaf.key_pem), ("ca.crt", &ca.cert_pem)] {
        std::fs::write(dir.path().join(name), pem).expect("write PEM");
    }
    let from_file = |key: &str| format!("--from-file={key}={}", dir.path().join(key).display());
    let created = support::node::kubectl(&[
        "create",
        "secret",
        "generic",
        "corp-tls",
        "-n",
        &release.namespace,
        &from_file("tls.crt"),
        &from_file("tls.key"),
        &from_file("ca.crt"),
    ]);
    success(created, "kubectl create secret");
    let mode = "webhook.certificate.mode=existingSecret,webhook.certificate.existingSecret.name=corp-tls";
    release.helm(&["upgrade", NAMESPACE, CHART, "--set", mode]);
    let ca_bundle = support::node::kubectl(&[
        "get",
        "mutatingwebhookconfiguration",
        "stash",
        "-o",
        "jsonpath={.webhooks[0].clientConfig.caBundle}",
    ]);
    assert_eq!(success(ca_bundle, "kubectl get caBundle"), "", "the chart writes no caBundle");
    let deployment = |jsonpath: &str| {
        let out = support::node::kubectl(&[
            "get",
            "deployment",
            "stash-operator",
            "-n",
            &release.namespace,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ]);
        success(out, "kubectl get deployment")
    };
    let args = deployment("{.spec.template.spec.containers[0].args}");
    assert!(args.contains("--ca-bundle-file=/etc/stash/webhook/ca.crt"), "{args}");
    assert_eq!(deployment("{.spec.template.spec.volumes[0].secret.secretName}"), "corp-tls");

    release.helm(&["uninstall", NAMESPACE, "--wait", "--timeout=60s"]);
    let left = existing(&manifest_file);
    assert!(left.is_empty(), "left after helm uninstall: {left:?}");
    let releases = release.helm(&["list", "--all", "--short"]);
    assert!(releases.trim().is_empty(), "release records left: {releases}");
}
