//! Property tests: no input makes the admission handler panic, and every readable review is answered
//! with its own uid.

use super::mutate::Mutator;
use super::mutate_tests::catalog;
use proptest::prelude::*;
use serde_json::{Value, json};

fn mutator() -> Mutator {
    Mutator { catalog: catalog(true), sidecar_image: "stash:test".into() }
}

/// Arbitrary JSON, biased towards the keys a Pod and a review use.
fn arbitrary_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("metadata".to_string()),
        Just("spec".to_string()),
        Just("containers".to_string()),
        Just("volumes".to_string()),
        Just("ownerReferences".to_string()),
        Just("name".to_string()),
        Just("kind".to_string()),
        Just("controller".to_string()),
        Just("labels".to_string()),
        Just("annotations".to_string()),
        Just("apiVersion".to_string()),
        "[a-z]{1,6}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        prop_oneof![
            Just("ReplicaSet".to_string()),
            Just("app-7d9c5".to_string()),
            Just("stash".to_string()),
            ".{0,12}"
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = mutator().review(&body);
    }

    #[test]
    fn arbitrary_objects_are_answered_with_their_uid(object in arbitrary_json(), op in "CREATE|UPDATE|[A-Z]{0,6}") {
        let body = serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "fuzz-uid", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": op, "namespace": "demo", "object": object}
        })).expect("JSON");
        let reviewed = mutator().review(&body).expect("a well-formed envelope is always answered");
        let response = serde_json::from_slice::<Value>(&reviewed.review.to_json().expect("serializable")).expect("valid JSON");
        prop_assert_eq!(&response["response"]["uid"], "fuzz-uid");
        prop_assert_eq!(&response["response"]["allowed"], true);
    }
}
