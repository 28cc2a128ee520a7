//! Wire compatibility, proven: every message, enum and RPC we compile is diffed, field by field
//! (name, number, type, type name, label, oneof), against the descriptors shipped in the pinned
//! `tritonclient` and `kserve` Python packages (`tests/reference_descriptors.py` exports them).
//!
//! Needs the project's Python environment: `REMOTEMEDIA_PYTHON` names its interpreter (the
//! Makefile sets it; `make venv` builds the environment).

use std::{collections::BTreeMap, process::Command};

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet};

/// The RPCs of DESIGN §4, exactly: every other RPC of Triton's service must answer UNIMPLEMENTED,
/// which tonic does for methods the service does not declare.
const SERVED_RPCS: &[&str] = &[
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
];

const SERVICE: &str = "inference.GRPCInferenceService";

/// Everything about a field that decides its encoding and its generated name.
#[derive(Debug, PartialEq, Eq)]
struct FieldShape {
    name: String,
    r#type: i32,
    type_name: String,
    label: i32,
    oneof: Option<String>,
}

#[derive(Debug, Default)]
struct Catalogue {
    messages: BTreeMap<String, BTreeMap<i32, FieldShape>>,
    enums: BTreeMap<String, BTreeMap<i32, String>>,
    /// Method name → (input type, output type, client streaming, server streaming).
    methods: BTreeMap<String, (String, String, bool, bool)>,
}

impl Catalogue {
    fn of(files: &[&FileDescriptorProto]) -> Self {
        let mut catalogue = Self::default();
        for file in files {
            let prefix = file.package().to_string();
            for message in &file.message_type {
                catalogue.add_message(&prefix, message);
            }
            for enumeration in &file.enum_type {
                catalogue.add_enum(&prefix, enumeration);
            }
            for service in &file.service {
                if format!("{prefix}.{}", service.name()) != SERVICE {
                    continue;
                }
                for method in &service.method {
                    catalogue.methods.insert(
                        method.name().to_string(),
                        (
                            method.input_type().to_string(),
                            method.output_type().to_string(),
                            method.client_streaming(),
                            method.server_streaming(),
                        ),
                    );
                }
            }
        }
        catalogue
    }

    fn add_message(&mut self, prefix: &str, message: &DescriptorProto) {
        let full_name = format!("{prefix}.{}", message.name());
        let fields = message
            .field
            .iter()
            .map(|field| {
                let shape = FieldShape {
                    name: field.name().to_string(),
                    r#type: field.r#type() as i32,
                    type_name: field.type_name().to_string(),
                    label: field.label() as i32,
                    oneof: field
                        .oneof_index
                        .map(|i| message.oneof_decl[i as usize].name().to_string()),
                };
                (field.number(), shape)
            })
            .collect();
        self.messages.insert(full_name.clone(), fields);
        for nested in &message.nested_type {
            self.add_message(&full_name, nested);
        }
        for enumeration in &message.enum_type {
            self.add_enum(&full_name, enumeration);
        }
    }

    fn add_enum(&mut self, prefix: &str, enumeration: &EnumDescriptorProto) {
        let values = enumeration
            .value
            .iter()
            .map(|v| (v.number(), v.name().to_string()))
            .collect();
        self.enums
            .insert(format!("{prefix}.{}", enumeration.name()), values);
    }
}

fn ours() -> FileDescriptorSet {
    FileDescriptorSet::decode(remotemedia_proto::FILE_DESCRIPTOR_SET)
        .expect("our descriptor set decodes")
}

fn reference(source: &str) -> FileDescriptorSet {
    let python = std::env::var("REMOTEMEDIA_PYTHON").expect(
        "REMOTEMEDIA_PYTHON must name the project's Python interpreter \
         (run the tests with `make test`, or `make venv` and export it)",
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference_descriptors.py"
    );
    let output = Command::new(&python)
        .args([script, source])
        .output()
        .unwrap_or_else(|e| panic!("failed to run {python}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail = &stderr[stderr.floor_char_boundary(stderr.len().saturating_sub(2000))..];
    assert!(
        output.status.success(),
        "reference_descriptors.py {source} failed: {tail}"
    );
    FileDescriptorSet::decode(output.stdout.as_slice()).expect("reference descriptor set decodes")
}

fn files<'a>(set: &'a FileDescriptorSet, names: &[&str]) -> Vec<&'a FileDescriptorProto> {
    let found: Vec<_> = set
        .file
        .iter()
        .filter(|f| names.contains(&f.name()))
        .collect();
    assert_eq!(found.len(), names.len(), "expected files {names:?}");
    found
}

/// Our catalogue must equal `reference` on everything we declare. With `whole`, each of our
/// messages must carry every field of the reference's (we copy Triton's messages whole); without
/// it, only the reference's fields are required (KServe's protocol is a subset of Triton's).
fn diff(ours: &Catalogue, reference: &Catalogue, source: &str, whole: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, fields) in &ours.messages {
        let Some(theirs) = reference.messages.get(name) else {
            if whole {
                problems.push(format!("{source}: has no message {name}"));
            }
            continue;
        };
        for (number, field) in theirs {
            match fields.get(number) {
                None => problems.push(format!("{name}: field {number} {field:?} missing")),
                Some(mine) if mine != field => problems.push(format!(
                    "{name}: field {number} is {mine:?}, {source} has {field:?}"
                )),
                Some(_) => {}
            }
        }
        if whole {
            for (number, field) in fields {
                if !theirs.contains_key(number) {
                    problems.push(format!("{name}: field {number} {field:?} not in {source}"));
                }
            }
        }
    }
    for (name, values) in &ours.enums {
        match reference.enums.get(name) {
            Some(theirs) if theirs != values => problems.push(format!(
                "{name}: values {values:?}, {source} has {theirs:?}"
            )),
            None if whole => problems.push(format!("{source}: has no enum {name}")),
            _ => {}
        }
    }
    for (method, signature) in &ours.methods {
        match reference.methods.get(method) {
            Some(theirs) if theirs != signature => problems.push(format!(
                "rpc {method}: {signature:?}, {source} has {theirs:?}"
            )),
            None if whole => problems.push(format!("{source}: has no rpc {method}")),
            _ => {}
        }
    }
    problems
}

#[test]
fn every_message_and_rpc_matches_tritonclient_and_kserve() {
    let ours_set = ours();
    let triton_set = reference("triton");
    let kserve_set = reference("kserve");
    let ours = Catalogue::of(&files(
        &ours_set,
        &[
            "inference/grpc_service.proto",
            "inference/model_config.proto",
        ],
    ));
    let triton = Catalogue::of(&files(
        &triton_set,
        &["grpc_service.proto", "model_config.proto"],
    ));
    let kserve = Catalogue::of(&files(&kserve_set, &["grpc_predict_v2.proto"]));

    // Guard against a vacuous pass: the catalogues really hold the protocol.
    assert!(ours.messages.contains_key("inference.ModelInferRequest"));
    assert!(triton.messages.len() >= 60, "{}", triton.messages.len());
    assert!(kserve.messages.len() >= 15, "{}", kserve.messages.len());

    let mut problems = diff(&ours, &triton, "tritonclient", true);
    problems.extend(diff(&ours, &kserve, "kserve", false));
    // Every KServe RPC we serve, and every message those RPCs use, must be ours too.
    for (method, (input, output, ..)) in &kserve.methods {
        if SERVED_RPCS.contains(&method.as_str()) {
            for message in [input, output] {
                if !ours.messages.contains_key(message.trim_start_matches('.')) {
                    problems.push(format!("kserve rpc {method} uses {message}, which we lack"));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "wire incompatibilities:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_service_declares_exactly_the_rpcs_we_serve() {
    let set = ours();
    let ours = Catalogue::of(&files(&set, &["inference/grpc_service.proto"]));
    let declared: Vec<_> = ours.methods.keys().map(String::as_str).collect();
    let mut expected = SERVED_RPCS.to_vec();
    expected.sort_unstable();
    assert_eq!(declared, expected);
}
