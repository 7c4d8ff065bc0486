//! Jump-forward decoding under a JSON schema (Zheng et al. 2024, SGLang's
//! "compressed finite-state machine").
//!
//! A `response_format` json_schema whose schema is an object of scalar
//! properties fixes all of its answer but the values. The answer is the
//! compact JSON object with every property in the schema's order, as
//! OpenAI's structured outputs give it (and so as an understudy trained on
//! them learned it): `{"name":"` value `","phone":"` value `"}`.
//! [`SchemaAnswer`] follows the answer's bytes as they are generated and
//! says which text comes next whatever the model would choose
//! ([`SchemaAnswer::forced`]): the scheduler appends that text's tokens
//! without a decode step of their own (they enter the KV cache in the step
//! of the token before them, with no logits) and ends the answer at the
//! object's closing brace without asking the model for it.
//!
//! Where the model would have written the forced text itself, with the same
//! tokens, the answer is exactly the one plain greedy decoding gives; where
//! it would not, the answer still follows the schema. An answer whose
//! generated text leaves the schema (a key's value of a type the schema
//! does not allow, a value outside its enum) fails, and the gateway falls
//! back to the lead.

use serde_json::{Map, Value};

/// A schema the engine cannot hold an answer to; the message is the one the
/// client gets in a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnsupportedSchema(pub String);

/// An answer that left its schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the model's answer does not follow the response's JSON schema: {0}")]
pub struct OffSchema(pub String);

/// The JSON types one property's value may take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kinds {
    pub string: bool,
    pub number: bool,
    /// A number without fraction or exponent (also allowed by `number`).
    pub integer: bool,
    pub boolean: bool,
    pub null: bool,
}

impl Kinds {
    fn only_string(&self) -> bool {
        *self == Kinds { string: true, ..Kinds::default() }
    }

    fn only_null(&self) -> bool {
        *self == Kinds { null: true, ..Kinds::default() }
    }

    fn add(&mut self, name: &str) -> Result<(), UnsupportedSchema> {
        match name {
            "string" => self.string = true,
            "number" => self.number = true,
            "integer" => self.integer = true,
            "boolean" => self.boolean = true,
            "null" => self.null = true,
            other => {
                return Err(UnsupportedSchema(format!(
                    "local models support properties of type string, number, integer, boolean or null, not {other}"
                )))
            }
        }
        Ok(())
    }
}

/// One property of an [`ObjectSchema`].
#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    pub name: String,
    pub kinds: Kinds,
    /// `enum`: the value must be one of these.
    pub allowed: Option<Vec<Value>>,
}

/// An object schema of scalar properties, all required, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectSchema {
    pub properties: Vec<Property>,
    /// The answer's fixed texts and values in order.
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Fixed(Vec<u8>),
    /// The value of property `idx`; for a string-only property the opening
    /// quote belongs to the fixed text before it.
    Value(usize),
}

impl ObjectSchema {
    /// Reads `{"type": "object", "properties": {...}, "required": [...]}`.
    /// Every property must be required (OpenAI's strict mode asks the same),
    /// of scalar types; `additionalProperties` may only be false.
    pub fn from_json(schema: &Value) -> Result<ObjectSchema, UnsupportedSchema> {
        let unsupported = |message: &str| Err(UnsupportedSchema(message.to_string()));
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return unsupported("local models support response_format json_schema with an enum of strings or an object of scalar properties");
        }
        let Some(properties) = schema.get("properties").and_then(Value::as_object).filter(|p| !p.is_empty()) else {
            return unsupported("an object schema needs properties");
        };
        if schema.get("additionalProperties").is_some_and(|extra| extra != &Value::Bool(false)) {
            return unsupported(
                "local models hold an object schema's answer to its properties: additionalProperties must be false",
            );
        }
        let required: Vec<&str> =
            schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        let mut out = Vec::with_capacity(properties.len());
        for (name, property) in properties {
            if !required.contains(&name.as_str()) {
                return Err(UnsupportedSchema(format!(
                    "property {name:?} must be listed in required: local models answer every property, as strict mode does"
                )));
            }
            out.push(read_property(name, property)?);
        }
        Ok(ObjectSchema::new(out))
    }

    fn new(properties: Vec<Property>) -> ObjectSchema {
        let mut segments = Vec::new();
        let mut fixed = b"{".to_vec();
        for (idx, property) in properties.iter().enumerate() {
            if idx > 0 {
                fixed.push(b',');
            }
            fixed.extend_from_slice(Value::String(property.name.clone()).to_string().as_bytes());
            fixed.push(b':');
            if property.kinds.only_string() {
                fixed.push(b'"');
            }
            segments.push(Segment::Fixed(std::mem::take(&mut fixed)));
            segments.push(Segment::Value(idx));
        }
        segments.push(Segment::Fixed(b"}".to_vec()));
        ObjectSchema { properties, segments }
    }
}

fn read_property(name: &str, property: &Value) -> Result<Property, UnsupportedSchema> {
    let mut kinds = Kinds::default();
    match property.get("type") {
        Some(Value::String(kind)) => kinds.add(kind)?,
        Some(Value::Array(list)) => {
            for kind in list {
                kinds.add(kind.as_str().unwrap_or("(not a string)"))?;
            }
        }
        Some(other) => {
            return Err(UnsupportedSchema(format!("property {name:?} has a type that is not a string: {other}")))
        }
        None => {}
    }
    let allowed = match property.get("enum") {
        None => None,
        Some(Value::Array(values)) if !values.is_empty() => {
            for value in values {
                match value {
                    Value::String(_) => kinds.string = true,
                    Value::Number(_) => kinds.number = true,
                    Value::Bool(_) => kinds.boolean = true,
                    Value::Null => kinds.null = true,
                    other => {
                        return Err(UnsupportedSchema(format!(
                            "property {name:?} has an enum value local models cannot hold an answer to: {other}"
                        )))
                    }
                }
            }
            Some(values.clone())
        }
        Some(other) => {
            return Err(UnsupportedSchema(format!(
                "property {name:?} has an enum that is not a list of values: {other}"
            )))
        }
    };
    if kinds == Kinds::default() {
        return Err(UnsupportedSchema(format!("property {name:?} needs a type or an enum")));
    }
    Ok(Property { name: name.to_string(), kinds, allowed })
}

/// Where in its current segment an answer is.
#[derive(Debug, Clone, PartialEq)]
enum Scan {
    /// `at` bytes of the current fixed text are written.
    Fixed { at: usize },
    /// A value has not begun.
    ValueStart,
    /// Inside a string value (after its opening quote).
    Str { escaped: bool },
    /// Part of `true`, `false` or `null`.
    Literal { word: &'static [u8], at: usize },
    /// A number's characters so far.
    Number { text: Vec<u8> },
    /// The closing brace is written.
    Done,
}

/// An answer being generated under an [`ObjectSchema`].
#[derive(Debug, Clone)]
pub struct SchemaAnswer {
    schema: std::sync::Arc<ObjectSchema>,
    segment: usize,
    scan: Scan,
    text: Vec<u8>,
}

impl SchemaAnswer {
    pub fn new(schema: std::sync::Arc<ObjectSchema>) -> SchemaAnswer {
        SchemaAnswer { schema, segment: 0, scan: Scan::Fixed { at: 0 }, text: Vec::new() }
    }

    /// The text the schema fixes from here on, up to the next byte the
    /// model has to choose (empty when that is the next byte).
    pub fn forced(&self) -> Vec<u8> {
        let fixed_after = |segment: usize| match self.schema.segments.get(segment) {
            Some(Segment::Fixed(text)) => text.clone(),
            _ => Vec::new(),
        };
        match &self.scan {
            Scan::Fixed { at } => match &self.schema.segments[self.segment] {
                Segment::Fixed(text) => text[*at..].to_vec(),
                Segment::Value(_) => Vec::new(),
            },
            Scan::Literal { word, at } => [&word[*at..], &fixed_after(self.segment + 1)].concat(),
            Scan::ValueStart if self.value_kinds().is_some_and(|kinds| kinds.only_null()) => {
                [b"null".as_slice(), &fixed_after(self.segment + 1)].concat()
            }
            Scan::ValueStart | Scan::Str { .. } | Scan::Number { .. } | Scan::Done => Vec::new(),
        }
    }

    /// Writes all the text the schema fixes from here on (through every
    /// value it leaves no choice in) and returns it.
    pub fn take_forced(&mut self) -> Result<Vec<u8>, OffSchema> {
        let mut taken = Vec::new();
        loop {
            let forced = self.forced();
            if forced.is_empty() {
                return Ok(taken);
            }
            self.feed(&forced)?;
            taken.extend_from_slice(&forced);
        }
    }

    pub fn is_done(&self) -> bool {
        self.scan == Scan::Done
    }

    /// The answer so far.
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    fn value_kinds(&self) -> Option<Kinds> {
        match self.schema.segments.get(self.segment) {
            Some(Segment::Value(idx)) => Some(self.schema.properties[*idx].kinds),
            _ => None,
        }
    }

    /// Follows `piece`; `Some(used)` when the object's closing brace is its
    /// byte `used - 1` (the rest of the piece is not part of the answer).
    pub fn feed(&mut self, piece: &[u8]) -> Result<Option<usize>, OffSchema> {
        for (idx, &byte) in piece.iter().enumerate() {
            self.feed_byte(byte)?;
            if self.scan == Scan::Done {
                self.check()?;
                return Ok(Some(idx + 1));
            }
        }
        Ok(None)
    }

    fn feed_byte(&mut self, byte: u8) -> Result<(), OffSchema> {
        self.text.push(byte);
        match &mut self.scan {
            Scan::Done => return Err(OffSchema("text after the object's closing brace".to_string())),
            Scan::Fixed { at } => {
                let Segment::Fixed(text) = &self.schema.segments[self.segment] else { unreachable!() };
                if text[*at] != byte {
                    return Err(OffSchema(format!(
                        "expected {:?}, got {:?}",
                        String::from_utf8_lossy(&text[*at..]),
                        char::from(byte)
                    )));
                }
                *at += 1;
                if *at == text.len() {
                    self.next_segment();
                }
            }
            Scan::Str { escaped } => {
                if *escaped {
                    *escaped = false;
                } else if byte == b'\\' {
                    *escaped = true;
                } else if byte == b'"' {
                    self.next_segment();
                } else if byte < 0x20 {
                    return Err(OffSchema("a control character inside a string".to_string()));
                }
            }
            Scan::Literal { word, at } => {
                if word[*at] != byte {
                    return Err(OffSchema(format!("expected {:?}", String::from_utf8_lossy(word))));
                }
                *at += 1;
                if *at == word.len() {
                    self.next_segment();
                }
            }
            Scan::Number { text } => {
                if matches!(byte, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                    text.push(byte);
                } else {
                    self.end_number()?;
                    self.text.pop();
                    return self.feed_byte(byte);
                }
            }
            Scan::ValueStart => {
                let kinds = self.value_kinds().unwrap_or_default();
                self.scan = match byte {
                    b'"' if kinds.string => Scan::Str { escaped: false },
                    b't' if kinds.boolean => Scan::Literal { word: b"true", at: 1 },
                    b'f' if kinds.boolean => Scan::Literal { word: b"false", at: 1 },
                    b'n' if kinds.null => Scan::Literal { word: b"null", at: 1 },
                    b'-' | b'0'..=b'9' if kinds.number || kinds.integer => Scan::Number { text: vec![byte] },
                    _ => {
                        return Err(OffSchema(format!(
                            "property {:?} cannot start with {:?}",
                            self.property_name(),
                            char::from(byte)
                        )))
                    }
                };
            }
        }
        Ok(())
    }

    fn property_name(&self) -> &str {
        match self.schema.segments.get(self.segment) {
            Some(Segment::Value(idx)) => &self.schema.properties[*idx].name,
            _ => "",
        }
    }

    fn end_number(&mut self) -> Result<(), OffSchema> {
        let Scan::Number { text } = &self.scan else { return Ok(()) };
        let kinds = self.value_kinds().unwrap_or_default();
        let parsed =
            std::str::from_utf8(text).ok().and_then(|text| serde_json::from_str::<serde_json::Number>(text).ok());
        let Some(number) = parsed else {
            return Err(OffSchema(format!("{:?} is not a JSON number", String::from_utf8_lossy(text))));
        };
        if !(kinds.number || number.is_i64() || number.is_u64()) {
            return Err(OffSchema(format!("property {:?} must be an integer, got {number}", self.property_name())));
        }
        self.next_segment();
        Ok(())
    }

    fn next_segment(&mut self) {
        self.segment += 1;
        self.scan = match self.schema.segments.get(self.segment) {
            None => Scan::Done,
            Some(Segment::Fixed(_)) => Scan::Fixed { at: 0 },
            Some(Segment::Value(idx)) if self.schema.properties[*idx].kinds.only_string() => {
                Scan::Str { escaped: false }
            }
            Some(Segment::Value(_)) => Scan::ValueStart,
        };
    }

    /// The finished answer's values against their enums.
    fn check(&self) -> Result<(), OffSchema> {
        let object: Map<String, Value> =
            serde_json::from_slice(&self.text).map_err(|error| OffSchema(format!("not a JSON object: {error}")))?;
        for property in &self.schema.properties {
            let value = object.get(&property.name).unwrap_or(&Value::Null);
            if let Some(allowed) = &property.allowed {
                if !allowed.contains(value) {
                    return Err(OffSchema(format!("property {:?} is {value}, not one of its enum", property.name)));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn answer(schema: Value) -> SchemaAnswer {
        SchemaAnswer::new(Arc::new(ObjectSchema::from_json(&schema).unwrap()))
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    /// Writes `generated` piece by piece, taking every forced text the way
    /// the scheduler does; returns the answer and the forced texts.
    fn run(answer: &mut SchemaAnswer, generated: &[&str]) -> Result<(String, Vec<String>), OffSchema> {
        let mut forced_texts = Vec::new();
        let mut take_forced = |answer: &mut SchemaAnswer| -> Result<(), OffSchema> {
            let forced = answer.take_forced()?;
            if !forced.is_empty() {
                forced_texts.push(text(forced));
            }
            Ok(())
        };
        take_forced(answer)?;
        for piece in generated {
            answer.feed(piece.as_bytes())?;
            take_forced(answer)?;
        }
        Ok((text(answer.text().to_vec()), forced_texts))
    }

    #[test]
    fn string_properties_leave_only_the_values_to_the_model() {
        let schema = json!({"type": "object", "additionalProperties": false, "required": ["name", "phone"],
            "properties": {"name": {"type": "string"}, "phone": {"type": "string"}}});
        let mut answer = answer(schema);
        let (out, forced) = run(&mut answer, &["Maria", " Lopez", "\",\"", "555", "-01", "\"}"]).unwrap();
        assert_eq!(out, r#"{"name":"Maria Lopez","phone":"555-01"}"#);
        assert_eq!(forced, vec![r#"{"name":""#, r#"phone":""#]);
        assert!(answer.is_done());
        // A quote the model writes alone: the rest of the separator is forced.
        let mut answer = self::answer(json!({"type": "object", "required": ["a", "b"],
            "properties": {"a": {"type": "string"}, "b": {"type": "string"}}}));
        let (out, forced) = run(&mut answer, &["x\\\"y", "\"", "z", "\""]).unwrap();
        assert_eq!(out, r#"{"a":"x\"y","b":"z"}"#);
        assert_eq!(forced, vec![r#"{"a":""#, r#","b":""#, "}"]);
    }

    #[test]
    fn literals_numbers_and_nulls() {
        let schema = json!({"type": "object", "required": ["spam", "number", "n", "none"], "properties": {
            "spam": {"type": "boolean"}, "number": {"type": ["string", "null"]}, "n": {"type": "integer"},
            "none": {"type": "null"}}});
        let mut answer = answer(schema);
        // `f` fixes `alse` and the separator; the number ends at the comma.
        let (out, forced) = run(&mut answer, &["f", "null", "12", ","]).unwrap();
        assert_eq!(out, r#"{"spam":false,"number":null,"n":12,"none":null}"#);
        assert_eq!(forced, vec![r#"{"spam":"#, r#"alse,"number":"#, r#","n":"#, r#""none":null}"#]);
        assert!(answer.is_done());
    }

    #[test]
    fn answers_off_the_schema_fail() {
        let base = json!({"type": "object", "required": ["n", "kind"], "properties": {
            "n": {"type": "integer"}, "kind": {"enum": ["a", "b"]}}});
        for generated in [vec!["\"x\""], vec!["1.5,"], vec!["1 "], vec!["1", ",", "c\"}"]] {
            let mut answer = answer(base.clone());
            assert!(run(&mut answer, &generated).is_err(), "{generated:?}");
        }
        let mut answer = answer(base);
        let (out, _) = run(&mut answer, &["7,", "b\"}"]).unwrap();
        assert_eq!(out, r#"{"n":7,"kind":"b"}"#);
        // Text after the closing brace is not part of the answer.
        let mut answer =
            self::answer(json!({"type": "object", "required": ["a"], "properties": {"a": {"type": "boolean"}}}));
        answer.feed(br#"{"a":"#).unwrap();
        assert_eq!(answer.feed(b"true}\n").unwrap(), Some(5));
        assert!(answer.is_done());
    }

    #[test]
    fn unsupported_schemas_are_refused_with_their_reason() {
        for (schema, needle) in [
            (json!({"type": "array"}), "object of scalar properties"),
            (json!({"type": "object", "properties": {}}), "needs properties"),
            (json!({"type": "object", "properties": {"a": {"type": "string"}}}), "required"),
            (json!({"type": "object", "required": ["a"], "properties": {"a": {"type": "object"}}}), "not object"),
            (json!({"type": "object", "required": ["a"], "properties": {"a": {}}}), "needs a type"),
            (
                json!({"type": "object", "required": ["a"], "additionalProperties": true,
                    "properties": {"a": {"type": "string"}}}),
                "additionalProperties",
            ),
        ] {
            let error = ObjectSchema::from_json(&schema).unwrap_err();
            assert!(error.0.contains(needle), "{error}");
        }
    }
}
