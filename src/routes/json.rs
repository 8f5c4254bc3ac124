//! JSON helpers of the route table: dotted field paths (`items.0.id`) and the
//! `json-subset` comparison used to verify a `409`.

use std::borrow::Cow;
use std::fmt;

use serde_json::{Number, Value};

/// A dotted path into a JSON document, such as `result.TTL` or `items.0.id`.
///
/// Each segment names an object key; on an array, a segment made of digits is
/// an index. Keys that themselves contain a `.` cannot be addressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldPath {
    segments: Vec<PathSegment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PathSegment {
    key: Box<str>,
    /// The key read as an array index, when it is all digits.
    index: Option<usize>,
}

/// Why a field path did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{path:?} is not a field path: expected names separated by dots, such as result.id or items.0.id"
)]
pub struct FieldPathError {
    /// The text that was given.
    pub path: String,
}

impl FieldPath {
    /// Parses `a.b.0.c`. Empty paths, empty segments (`a..b`, `.a`, `a.`) and
    /// whitespace or control characters are refused.
    pub fn parse(text: &str) -> Result<Self, FieldPathError> {
        let error = || FieldPathError {
            path: text.to_owned(),
        };
        if text.is_empty() {
            return Err(error());
        }
        let segments = text
            .split('.')
            .map(|key| {
                if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(error());
                }
                let index = if key.bytes().all(|b| b.is_ascii_digit()) {
                    key.parse().ok()
                } else {
                    None
                };
                Ok(PathSegment {
                    key: key.into(),
                    index,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { segments })
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            f.write_str(&segment.key)?;
        }
        Ok(())
    }
}

/// Finds the value at `path` in `doc`, or `None` when a key is absent, an
/// index is out of range, or the path runs into a scalar.
///
/// ```
/// use idemproxy::routes::{FieldPath, lookup};
/// let doc = serde_json::json!({"items": [{"id": "a"}, {"id": "b"}]});
/// let path = FieldPath::parse("items.1.id").unwrap();
/// assert_eq!(lookup(&doc, &path), Some(&serde_json::json!("b")));
/// ```
pub fn lookup<'a>(doc: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    path.segments
        .iter()
        .try_fold(doc, |value, segment| match value {
            Value::Object(map) => map.get(&*segment.key),
            Value::Array(items) => segment.index.and_then(|i| items.get(i)),
            _ => None,
        })
}

/// The text a JSON scalar substitutes as: a string's own text, a number's or a
/// boolean's JSON text. Objects, arrays and `null` have none.
pub(crate) fn scalar_text(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(true) => Some(Cow::Borrowed("true")),
        Value::Bool(false) => Some(Cow::Borrowed("false")),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// Whether the `sent` document is contained in the `stored` one.
///
/// Every field of an object in `sent` must be present in `stored` with an
/// equal value, compared the same way recursively; `stored` may have more
/// fields. Arrays must have the same length, element by element. Numbers
/// compare by value (`1` equals `1.0`), integers exactly, so large ids keep
/// their precision. Key order and whitespace never matter, since both sides
/// are parsed documents.
///
/// ```
/// use idemproxy::routes::json_subset;
/// use serde_json::json;
/// let sent = json!({"id": 7, "tags": ["a"]});
/// let stored = json!({"tags": ["a"], "id": 7.0, "created": "2024-05-01"});
/// assert!(json_subset(&sent, &stored));
/// assert!(!json_subset(&json!({"id": 8}), &stored));
/// ```
pub fn json_subset(sent: &Value, stored: &Value) -> bool {
    match (sent, stored) {
        (Value::Object(sent), Value::Object(stored)) => sent.iter().all(|(key, value)| {
            stored
                .get(key)
                .is_some_and(|stored| json_subset(value, stored))
        }),
        (Value::Array(sent), Value::Array(stored)) => {
            sent.len() == stored.len()
                && sent
                    .iter()
                    .zip(stored)
                    .all(|(sent, stored)| json_subset(sent, stored))
        }
        (Value::Number(a), Value::Number(b)) => numbers_equal(a, b),
        (Value::String(a), Value::String(b)) => a == b,
        (Value::Bool(a), Value::Bool(b)) => a == b,
        (Value::Null, Value::Null) => true,
        _ => false,
    }
}

/// Compares two JSON numbers by value without losing integer precision.
fn numbers_equal(a: &Number, b: &Number) -> bool {
    match (integer(a), integer(b)) {
        (Some(a), Some(b)) => a == b,
        (Some(i), None) => b.as_f64().is_some_and(|f| float_equals_integer(f, i)),
        (None, Some(i)) => a.as_f64().is_some_and(|f| float_equals_integer(f, i)),
        (None, None) => match (a.as_f64(), b.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        },
    }
}

/// The number as an exact integer, when it was written as one.
fn integer(n: &Number) -> Option<i128> {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
}

/// Whether a float is exactly the integer `i` (so `9007199254740992.0` does
/// not equal `9007199254740993`).
fn float_equals_integer(f: f64, i: i128) -> bool {
    // Every integer of i64/u64 lies well inside ±2^127, so a finite float with
    // no fractional part in that range converts to i128 exactly.
    const LIMIT: f64 = 1.7e38;
    f.is_finite() && f.fract() == 0.0 && f.abs() < LIMIT && f as i128 == i
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path(text: &str) -> FieldPath {
        FieldPath::parse(text).unwrap()
    }

    #[test]
    fn field_paths_reject_empty_segments() {
        for bad in ["", ".", "a.", ".a", "a..b", "a b"] {
            assert!(FieldPath::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(path("result.TTL").to_string(), "result.TTL");
    }

    #[test]
    fn lookup_walks_objects_and_array_indexes() {
        let doc = json!({"a": {"b": [10, {"c": "x"}]}, "0": "zero"});
        assert_eq!(lookup(&doc, &path("a.b.0")), Some(&json!(10)));
        assert_eq!(lookup(&doc, &path("a.b.1.c")), Some(&json!("x")));
        assert_eq!(lookup(&doc, &path("0")), Some(&json!("zero")));
        assert_eq!(lookup(&doc, &path("a.b.2")), None);
        assert_eq!(lookup(&doc, &path("a.b.x")), None);
        assert_eq!(lookup(&doc, &path("a.b.1.c.d")), None);
    }

    #[test]
    fn scalars_substitute_as_text_and_containers_do_not() {
        assert_eq!(scalar_text(&json!("s")).as_deref(), Some("s"));
        assert_eq!(scalar_text(&json!(12)).as_deref(), Some("12"));
        assert_eq!(scalar_text(&json!(1.5)).as_deref(), Some("1.5"));
        assert_eq!(scalar_text(&json!(true)).as_deref(), Some("true"));
        assert_eq!(scalar_text(&json!(null)), None);
        assert_eq!(scalar_text(&json!([])), None);
        assert_eq!(scalar_text(&json!({})), None);
    }

    #[test]
    fn subset_ignores_key_order_and_whitespace() {
        let sent: Value = serde_json::from_str(r#"{"a":1,"b":"x"}"#).unwrap();
        let stored: Value = serde_json::from_str("{ \"b\" : \"x\",\n  \"a\" : 1 }").unwrap();
        assert!(json_subset(&sent, &stored));
    }

    #[test]
    fn subset_accepts_extra_stored_fields_and_rejects_missing_ones() {
        let stored = json!({"a": 1, "b": 2, "etag": "w/1"});
        assert!(json_subset(&json!({"a": 1}), &stored));
        assert!(!json_subset(&json!({"a": 1, "c": 3}), &stored));
    }

    #[test]
    fn subset_fails_on_a_differing_field() {
        assert!(!json_subset(&json!({"a": 1}), &json!({"a": 2})));
        assert!(!json_subset(&json!({"a": "1"}), &json!({"a": 1})));
        assert!(!json_subset(&json!({"a": null}), &json!({"a": false})));
    }

    #[test]
    fn subset_recurses_into_nested_objects() {
        let stored = json!({"meta": {"owner": "u1", "rev": 3}, "x": 1});
        assert!(json_subset(&json!({"meta": {"owner": "u1"}}), &stored));
        assert!(!json_subset(&json!({"meta": {"owner": "u2"}}), &stored));
        assert!(!json_subset(&json!({"meta": "u1"}), &stored));
    }

    #[test]
    fn subset_compares_arrays_by_length_and_element() {
        let stored = json!({"items": [{"id": 1, "extra": true}, {"id": 2}]});
        assert!(json_subset(
            &json!({"items": [{"id": 1}, {"id": 2}]}),
            &stored
        ));
        assert!(!json_subset(&json!({"items": [{"id": 1}]}), &stored));
        assert!(!json_subset(
            &json!({"items": [{"id": 2}, {"id": 1}]}),
            &stored
        ));
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(json_subset(&json!(1), &json!(1.0)));
        assert!(json_subset(&json!(1.0), &json!(1)));
        assert!(json_subset(&json!(-3), &json!(-3.0)));
        assert!(json_subset(&json!(2.5), &json!(2.5)));
        assert!(!json_subset(&json!(1), &json!(1.5)));
        let parsed: Value = serde_json::from_str("1e2").unwrap();
        assert!(json_subset(&json!(100), &parsed));
    }

    #[test]
    fn large_integer_ids_keep_their_precision() {
        let a: Value = serde_json::from_str("9007199254740993").unwrap();
        let b: Value = serde_json::from_str("9007199254740992").unwrap();
        let b_float: Value = serde_json::from_str("9007199254740992.0").unwrap();
        assert!(!json_subset(&a, &b));
        assert!(!json_subset(&a, &b_float));
        assert!(json_subset(&b, &b_float));
        assert!(json_subset(&json!(u64::MAX), &json!(u64::MAX)));
        assert!(!json_subset(&json!(u64::MAX), &json!(-1)));
    }
}
