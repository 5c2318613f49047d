//! The checked-in CRDs (deploy/'s and the Helm chart's) are exactly what `stash crds` prints, and they are
//! well-formed apiextensions/v1.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Deserialize;
use std::path::Path;
use std::process::Command;

const CHECKED_IN: &[&str] = &["deploy/crds/stash.yaml", "charts/stash/crds/stash.yaml"];

#[test]
fn checked_in_crds_match_generated() {
    let output = Command::new(env!("CARGO_BIN_EXE_stash")).arg("crds").output().expect("stash runs");
    assert!(output.status.success(), "stash crds failed: {}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).expect("UTF-8 output");
    for file in CHECKED_IN {
        let checked_in = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file))
            .unwrap_or_else(|e| panic!("reading {file}: {e}"));
        assert!(printed == checked_in, "{file} is stale: regenerate it with `cargo run -- crds > {file}`");
    }
}

#[test]
fn crds_are_structural_apiextensions_v1() {
    let yaml = stash::api::crds_yaml().expect("CRDs render");
    let mut names = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&yaml) {
        let crd = CustomResourceDefinition::deserialize(document).expect("a CustomResourceDefinition");
        let spec = &crd.spec;
        assert_eq!(spec.group, "stash.appscode.com");
        assert_eq!(spec.scope, "Namespaced");
        // Stash's categories: `kubectl get stash`, `get appscode`, and `get all` for all but Repositories.
        let categories: &[&str] =
            if spec.names.kind == "Repository" { &["stash", "appscode"] } else { &["stash", "appscode", "all"] };
        assert_eq!(spec.names.categories.clone().unwrap_or_default(), categories, "{}", spec.names.kind);
        assert_eq!(spec.versions.len(), 1);
        let version = &spec.versions[0];
        assert!(version.served && version.storage);
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
        let schema = version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("a schema");
        assert_eq!(schema.type_.as_deref(), Some("object"));
        names.push(crd.metadata.name.unwrap_or_default());
    }
    assert_eq!(
        names,
        [
            "backupbatches.stash.appscode.com",
            "backupsessions.stash.appscode.com",
            "repositories.stash.appscode.com",
            "restorebatches.stash.appscode.com"
        ]
    );
}
