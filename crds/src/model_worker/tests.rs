//! The CRD's CEL rules, run client-side by kube's CEL evaluator (kube-cel) on the generated
//! schema, after the schema's defaults, as the API server runs them. The end-to-end tests run the
//! same objects against a real API server, which is authoritative.

use kube::{CustomResourceExt, Resource, core::cel};
use serde_json::{Value, json};

use crate::{API_VERSION, CATEGORY, GROUP, KIND, ModelWorker, PLURAL, SHORT_NAME, VERSION};

/// The CRD's `openAPIV3Schema`.
fn schema() -> Value {
    let crd = ModelWorker::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref());
    serde_json::to_value(schema.expect("a derived CRD has a schema")).expect("a schema is JSON")
}

/// A valid CPU spec with only the required fields; each test changes one thing of it.
fn cpu_spec() -> Value {
    json!({ "modelId": "silero-vad", "model": { "uri": "pvc://models/silero-vad/model.pt" } })
}

/// `spec` with `patch`'s top-level keys replaced.
fn with(mut spec: Value, patch: Value) -> Value {
    for (key, value) in patch.as_object().expect("a patch is an object") {
        spec[key] = value.clone();
    }
    spec
}

/// The `(field path, message)` of every CEL rule that refuses a ModelWorker with `spec`.
fn refusals(spec: Value) -> Vec<(String, String)> {
    let object = json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": { "name": "x", "namespace": "default" },
        "spec": spec,
    });
    match cel::Validator::new().validate(&schema(), &object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .iter()
            .map(|e| (e.field_path.clone(), e.message.clone()))
            .collect(),
    }
}

/// One refusal at `path` with `message`.
fn refused(path: &str, message: &str) -> Vec<(String, String)> {
    vec![(path.to_owned(), message.to_owned())]
}

#[test]
fn cpu_spec_with_only_required_fields_is_accepted() {
    assert_eq!(refusals(cpu_spec()), []);
}

#[test]
fn cuda_with_one_gpu_is_accepted() {
    assert_eq!(
        refusals(with(cpu_spec(), json!({ "device": "cuda", "gpus": 1 }))),
        []
    );
}

#[test]
fn gpus_without_cuda_are_refused_at_gpus() {
    for spec in [json!({ "gpus": 1 }), json!({ "device": "cpu", "gpus": 1 })] {
        assert_eq!(
            refusals(with(cpu_spec(), spec)),
            refused("spec.gpus", "gpus needs device: cuda")
        );
    }
}

#[test]
fn cuda_without_a_gpu_is_refused_at_gpus() {
    // Without `gpus` the schema's default (0) applies before the rules run.
    for spec in [
        json!({ "device": "cuda" }),
        json!({ "device": "cuda", "gpus": 0 }),
    ] {
        assert_eq!(
            refusals(with(cpu_spec(), spec)),
            refused("spec.gpus", "device: cuda needs gpus: 1")
        );
    }
}

#[test]
fn model_id_must_be_a_dns_label() {
    for good in ["a", "0", "whisper-small-2"] {
        assert_eq!(
            refusals(with(cpu_spec(), json!({ "modelId": good }))),
            [],
            "{good}"
        );
    }
    let message = "must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit";
    for bad in [
        "Whisper",
        "-vad",
        "vad-",
        "silero_vad",
        "silero.vad",
        "ns/vad",
        "vad ",
    ] {
        assert_eq!(
            refusals(with(cpu_spec(), json!({ "modelId": bad }))),
            refused("spec.modelId", message),
            "{bad}"
        );
    }
}

#[test]
fn model_uri_accepts_claims_image_files_and_host_paths() {
    for uri in [
        "pvc://models/whisper/model.pt",
        "pvc://team.models/model.pt",
        "file:///models/model.pt",
        "hostpath:///var/lib/models/model.pt",
    ] {
        assert_eq!(
            refusals(with(cpu_spec(), json!({ "model": { "uri": uri } }))),
            [],
            "{uri}"
        );
    }
}

#[test]
fn model_uri_with_another_scheme_is_refused() {
    for uri in [
        "s3://bucket/model.pt",
        "https://example.com/model.pt",
        "/models/model.pt",
        "PVC://models/m.pt",
    ] {
        assert_eq!(
            refusals(with(cpu_spec(), json!({ "model": { "uri": uri } }))),
            refused(
                "spec.model.uri",
                "must start with pvc://, file:// or hostpath://"
            ),
            "{uri}"
        );
    }
}

#[test]
fn pvc_uri_needs_a_claim_name_and_a_path() {
    for uri in [
        "pvc://models",
        "pvc://models/",
        "pvc:///model.pt",
        "pvc://Models/model.pt",
        "pvc://-models/m.pt",
    ] {
        assert_eq!(
            refusals(with(cpu_spec(), json!({ "model": { "uri": uri } }))),
            refused(
                "spec.model.uri",
                "must be pvc://<claim>/<path>, the claim a DNS subdomain"
            ),
            "{uri}"
        );
    }
}

#[test]
fn file_and_hostpath_uris_need_an_absolute_path() {
    let message =
        "must be an absolute path with an empty host: file:///<path> or hostpath:///<path>";
    for uri in [
        "file://model.pt",
        "file://host/models/model.pt",
        "hostpath://",
        "hostpath:////",
    ] {
        assert_eq!(
            refusals(with(cpu_spec(), json!({ "model": { "uri": uri } }))),
            refused("spec.model.uri", message),
            "{uri}"
        );
    }
}

#[test]
fn model_uri_with_a_parent_segment_is_refused() {
    for uri in [
        "pvc://models/../etc/passwd",
        "file:///models/..",
        "hostpath:///a/../b",
    ] {
        assert_eq!(
            refusals(with(cpu_spec(), json!({ "model": { "uri": uri } }))),
            refused("spec.model.uri", "must not contain a '..' path segment"),
            "{uri}"
        );
    }
    // A name that merely contains dots is fine.
    let uri = "pvc://models/v1..2/model.pt";
    assert_eq!(
        refusals(with(cpu_spec(), json!({ "model": { "uri": uri } }))),
        []
    );
}

#[test]
fn gpus_in_resources_are_refused_in_favour_of_the_gpus_field() {
    let spec = with(
        cpu_spec(),
        json!({ "resources": { "limits": { "nvidia.com/gpu": "1" } } }),
    );
    assert_eq!(
        refusals(spec),
        refused(
            "spec.resources.limits",
            "set GPUs with spec.gpus, not in resources.limits"
        )
    );
    let spec = with(
        cpu_spec(),
        json!({ "resources": { "requests": { "nvidia.com/gpu": 1 } } }),
    );
    assert_eq!(
        refusals(spec),
        refused(
            "spec.resources.requests",
            "set GPUs with spec.gpus, not in resources.requests"
        )
    );
    let spec = with(
        cpu_spec(),
        json!({ "resources": { "requests": { "cpu": "2" }, "limits": { "memory": "4Gi" } } }),
    );
    assert_eq!(refusals(spec), []);
}

#[test]
fn rollout_takes_counts_and_percentages() {
    for rollout in [
        json!({ "maxSurge": 0, "maxUnavailable": 1 }),
        json!({ "maxSurge": "25%", "maxUnavailable": "0%" }),
        json!({ "maxSurge": 0 }),
        json!({}),
    ] {
        let spec = with(cpu_spec(), json!({ "rollout": rollout }));
        assert_eq!(refusals(spec), [], "{rollout}");
    }
}

#[test]
fn rollout_that_could_never_progress_is_refused() {
    let message =
        "maxSurge and maxUnavailable must not both be 0: the rollout could never progress";
    for rollout in [
        json!({ "maxSurge": 0, "maxUnavailable": 0 }),
        json!({ "maxSurge": "0%", "maxUnavailable": 0 }),
    ] {
        let spec = with(cpu_spec(), json!({ "rollout": rollout }));
        assert_eq!(
            refusals(spec),
            refused("spec.rollout.maxUnavailable", message),
            "{rollout}"
        );
    }
}

#[test]
fn rollout_values_that_are_neither_counts_nor_percentages_are_refused() {
    let message = "must be a count of at least 0 or a percentage such as 25%";
    for value in [json!(-1), json!("lots"), json!("25"), json!("%")] {
        let spec = with(cpu_spec(), json!({ "rollout": { "maxSurge": value } }));
        assert_eq!(
            refusals(spec),
            refused("spec.rollout.maxSurge", message),
            "{value}"
        );
    }
}

/// Every CEL rule of the schema, with the schema node it is written on.
fn rules(node: &Value, found: &mut Vec<(Value, String)>) {
    if let Some(validations) = node
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for rule in validations {
            found.push((
                node.clone(),
                rule["rule"]
                    .as_str()
                    .expect("a rule is a string")
                    .to_owned(),
            ));
        }
    }
    for key in ["properties", "additionalProperties", "items"] {
        match node.get(key) {
            Some(Value::Object(children)) if key == "properties" => {
                children.values().for_each(|child| rules(child, found))
            }
            Some(child @ Value::Object(_)) => rules(child, found),
            _ => {}
        }
    }
}

#[test]
fn every_cel_rule_fits_the_api_servers_cost_budget() {
    let mut found = Vec::new();
    rules(&schema(), &mut found);
    assert!(found.len() >= 10, "found only {} rules", found.len());
    for (node, rule) in found {
        let warnings = cel::estimate_rule_cost(&rule, &cel::compile_schema(&node));
        assert!(warnings.is_empty(), "{rule}: {warnings:?}");
    }
}

/// Paths of the properties under `node` that have no description.
fn undocumented(node: &Value, path: &str, found: &mut Vec<String>) {
    let Some(properties) = node.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (name, child) in properties {
        let path = format!("{path}.{name}");
        if child
            .get("description")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            found.push(path.clone());
        }
        undocumented(child, &path, found);
        if let Some(items) = child.get("items") {
            undocumented(items, &path, found);
        }
    }
}

#[test]
fn every_field_of_spec_and_status_is_documented_for_kubectl_explain() {
    let schema = schema();
    let mut found = Vec::new();
    undocumented(&schema["properties"]["spec"], "spec", &mut found);
    undocumented(&schema["properties"]["status"], "status", &mut found);
    assert_eq!(found, Vec::<String>::new());
}

#[test]
fn descriptions_keep_no_source_line_breaks_for_kubectl_explain_to_wrap() {
    let schema = schema();
    let spec = &schema["properties"]["spec"];
    let ours = [
        spec,
        &spec["properties"]["model"],
        &spec["properties"]["batching"],
        &spec["properties"]["rollout"],
        &schema["properties"]["status"],
    ];
    for node in ours {
        let properties = node["properties"].as_object().expect("an object type");
        for (name, property) in properties {
            let text = property["description"].as_str().expect("documented");
            assert!(!text.replace("\n\n", "").contains('\n'), "{name}: {text:?}");
        }
    }
}

#[test]
fn crd_names_match_the_api_constants() {
    let crd = ModelWorker::crd();
    assert_eq!(crd.spec.group, GROUP);
    assert_eq!(crd.spec.versions.len(), 1);
    assert_eq!(crd.spec.versions[0].name, VERSION);
    assert_eq!(crd.spec.names.kind, KIND);
    assert_eq!(crd.spec.names.plural, PLURAL);
    assert_eq!(
        crd.spec.names.short_names,
        Some(vec![SHORT_NAME.to_owned()])
    );
    assert_eq!(crd.spec.names.categories, Some(vec![CATEGORY.to_owned()]));
    assert_eq!(ModelWorker::api_version(&()), API_VERSION);
    assert_eq!(API_VERSION, format!("{GROUP}/{VERSION}"));
}

#[test]
fn scale_subresource_reads_spec_replicas_status_replicas_and_selector() {
    let crd = ModelWorker::crd();
    let subresources = crd.spec.versions[0]
        .subresources
        .as_ref()
        .expect("subresources");
    assert!(subresources.status.is_some());
    let scale = subresources.scale.as_ref().expect("a scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    // The scale subresource's selector is a string: a selector object would not be read.
    assert_eq!(
        schema()["properties"]["status"]["properties"]["selector"]["type"],
        "string"
    );
}

/// Fails unless every value in `given` appears at the same place in `typed`: a field the Rust
/// types do not know would be missing from `typed`.
fn assert_contained(given: &Value, typed: &Value, path: &str) {
    match (given, typed) {
        (Value::Object(given), Value::Object(typed)) => {
            for (key, value) in given {
                let child = typed
                    .get(key)
                    .unwrap_or_else(|| panic!("{path}.{key} is not a known field"));
                assert_contained(value, child, &format!("{path}.{key}"));
            }
        }
        (Value::Array(given), Value::Array(typed)) => {
            assert_eq!(given.len(), typed.len(), "{path}");
            for (i, (g, t)) in given.iter().zip(typed).enumerate() {
                assert_contained(g, t, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(given, typed, "{path}"),
    }
}

#[test]
fn examples_are_valid_model_workers_with_only_known_fields() {
    for (file, yaml) in [
        (
            "modelworker.yaml",
            include_str!("../../../examples/modelworker.yaml"),
        ),
        (
            "modelworker-gpu.yaml",
            include_str!("../../../examples/modelworker-gpu.yaml"),
        ),
    ] {
        let given: Value = serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("{file}: {e}"));
        let worker: ModelWorker =
            serde_json::from_value(given.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
        let typed = serde_json::to_value(&worker).expect("a ModelWorker is JSON");
        assert_contained(&given, &typed, file);
        assert_eq!(refusals(given["spec"].clone()), [], "{file}");
    }
}
