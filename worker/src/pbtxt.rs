//! `config.pbtxt`: Triton's model configuration in protobuf text format.
//!
//! Parsed against the compiled `inference.ModelConfig` descriptor, so a field outside Triton's
//! schema is an error naming the field, and every Triton field is accepted. The fields set that
//! the worker does not act on are listed by [`Parsed::ignored_fields`], to be logged once.

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, Value};
use remotemedia_proto::inference::ModelConfig;

/// Fields of `ModelConfig` (and of its inputs and outputs) that the worker acts on; any other
/// field that is set is accepted and reported.
const ACTED_ON: &[&str] = &[
    "name",
    "platform",
    "max_batch_size",
    "dynamic_batching",
    "dynamic_batching.max_queue_delay_microseconds",
    "input",
    "output",
    "input.name",
    "input.data_type",
    "input.dims",
    "output.name",
    "output.data_type",
    "output.dims",
];

static MODEL_CONFIG: LazyLock<MessageDescriptor> = LazyLock::new(|| {
    DescriptorPool::decode(remotemedia_proto::FILE_DESCRIPTOR_SET)
        .ok()
        .and_then(|pool| pool.get_message_by_name("inference.ModelConfig"))
        .expect("the compiled descriptor set contains inference.ModelConfig")
});

/// Why a configuration text was refused: the parser's message names the field or value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(String);

/// A parsed configuration and the paths of the fields set in it that the worker ignores.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub config: ModelConfig,
    pub ignored_fields: Vec<String>,
}

/// Parses a `config.pbtxt` document.
pub fn parse(text: &str) -> Result<Parsed, ParseError> {
    let message =
        DynamicMessage::parse_text_format(MODEL_CONFIG.clone(), &insert_list_colons(text))
            .map_err(|error| ParseError(error.to_string()))?;
    let config = message
        .transcode_to::<ModelConfig>()
        .map_err(|error| ParseError(error.to_string()))?;
    let mut ignored_fields = Vec::new();
    collect_ignored(&message, "", &mut ignored_fields);
    ignored_fields.sort();
    ignored_fields.dedup();
    Ok(Parsed {
        config,
        ignored_fields,
    })
}

fn collect_ignored(message: &DynamicMessage, prefix: &str, out: &mut Vec<String>) {
    for (field, value) in message.fields() {
        let path = format!("{prefix}{}", field.name());
        if !ACTED_ON.contains(&path.as_str()) {
            out.push(path);
            continue;
        }
        let nested: Vec<&DynamicMessage> = match value {
            Value::Message(message) => vec![message],
            Value::List(items) => items.iter().filter_map(Value::as_message).collect(),
            _ => Vec::new(),
        };
        for message in nested {
            collect_ignored(message, &format!("{path}."), out);
        }
    }
}

/// Triton writes repeated message fields as `input [ {…} ]`, without the colon that the text
/// format makes optional there but our parser requires. Inserts it, outside strings and comments.
fn insert_list_colons(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 16);
    let mut i = 0;
    // Whether the last token (whitespace aside) was a field name, which a list may follow.
    let mut after_field_name = false;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'#' => {
                let end = text[i..].find('\n').map_or(bytes.len(), |n| i + n);
                out.push_str(&text[i..end]);
                i = end;
                continue;
            }
            b'"' | b'\'' => {
                let mut j = i + 1;
                while j < bytes.len() && bytes[j] != c {
                    j += if bytes[j] == b'\\' { 2 } else { 1 };
                }
                let end = (j + 1).min(bytes.len());
                out.push_str(&text[i..end]);
                i = end;
                after_field_name = false;
                continue;
            }
            b'[' if after_field_name => out.push(':'),
            _ => {}
        }
        if c.is_ascii_alphanumeric() || c == b'_' {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'.')
            {
                i += 1;
            }
            out.push_str(&text[start..i]);
            // Only an identifier that starts with a letter can be a field name.
            after_field_name = bytes[start].is_ascii_alphabetic() || bytes[start] == b'_';
            continue;
        }
        if !c.is_ascii_whitespace() {
            after_field_name = false;
        }
        // Multi-byte UTF-8 characters are copied whole.
        let ch = text[i..].chars().next().unwrap_or_default();
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use remotemedia_proto::inference::DataType;

    use super::*;

    /// A configuration as Triton's documentation writes them: lists without colons, comments,
    /// fields the worker does not act on.
    const TRITON_STYLE: &str = r#"
name: "mlp"  # the model's directory name
platform: "pytorch_libtorch"
max_batch_size: 8
input [
  {
    name: "input"
    data_type: TYPE_FP32
    dims: [ 16 ]
  }
]
output [
  {
    name: "output"
    data_type: TYPE_FP32
    dims: [ 4 ]
    label_filename: "labels [1].txt"
  }
]
instance_group [ { count: 2, kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 500 preferred_batch_size: [ 4 ] }
"#;

    #[test]
    fn triton_style_configuration_parses() {
        let parsed = parse(TRITON_STYLE).unwrap();
        let config = parsed.config;
        assert_eq!(config.name, "mlp");
        assert_eq!(config.max_batch_size, 8);
        assert_eq!(config.input[0].name, "input");
        assert_eq!(config.input[0].data_type, DataType::TypeFp32 as i32);
        assert_eq!(config.input[0].dims, [16]);
        assert_eq!(config.output[0].dims, [4]);
        assert_eq!(config.output[0].label_filename, "labels [1].txt");
        assert_eq!(config.instance_group[0].count, 2);
    }

    #[test]
    fn fields_not_acted_on_are_listed_once_each() {
        let parsed = parse(TRITON_STYLE).unwrap();
        assert_eq!(
            parsed.ignored_fields,
            [
                "dynamic_batching.preferred_batch_size",
                "instance_group",
                "output.label_filename"
            ]
        );
    }

    #[test]
    fn one_line_style_with_colons_parses_the_same() {
        let parsed = parse(
            "name: \"m\" max_batch_size: 0 input: [{ name: \"x\" data_type: TYPE_INT64 dims: [-1, 3] }]",
        )
        .unwrap();
        assert_eq!(parsed.config.input[0].dims, [-1, 3]);
        assert!(parsed.ignored_fields.is_empty());
    }

    #[test]
    fn repeated_blocks_without_a_list_parse() {
        let parsed = parse(
            "input { name: \"a\" data_type: TYPE_FP32 dims: [1] }\ninput { name: \"b\" data_type: TYPE_FP32 dims: 2 }",
        )
        .unwrap();
        let names: Vec<&str> = parsed
            .config
            .input
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(parsed.config.input[1].dims, [2]);
    }

    #[test]
    fn field_outside_tritons_schema_is_named() {
        let error = parse("name: \"m\"\nwarmup_iterations: 3\n").unwrap_err();
        assert!(error.to_string().contains("warmup_iterations"), "{error}");
        let error = parse("input [ { name: \"x\" shape: [1] } ]").unwrap_err();
        assert!(error.to_string().contains("shape"), "{error}");
    }

    #[test]
    fn bad_values_are_refused() {
        for text in [
            "max_batch_size: \"eight\"",
            "input [ { data_type: TYPE_FLOAT99 } ]",
            "input [ { dims: [ 1.5 ] } ]",
            "name: \"unterminated",
            "input [ { name: \"x\" ",
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn brackets_inside_strings_and_comments_are_left_alone() {
        assert_eq!(
            insert_list_colons("name: \"a [b]\" # c [d]\ninput [ ]"),
            "name: \"a [b]\" # c [d]\ninput :[ ]"
        );
        assert_eq!(insert_list_colons("dims: [ 1 ]"), "dims: [ 1 ]");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}") {
            let _ = parse(&text);
        }
    }
}
