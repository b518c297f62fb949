//! Type checks of tracked fields and the `data.changes` computation.
//!
//! Values compare as JSON values: numbers by their decimal value (`75` equals
//! `75.0`), objects regardless of key order, arrays element by element.

use serde_json::{Map, Number, Value};

use super::catalogue::{Entity, FieldType};

/// A tracked field of the wrong type in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldTypeError {
    /// The snapshot key, as the producer sent it.
    pub key: &'static str,
    pub expected: &'static str,
}

/// Checks the type of every tracked field present in `snapshot`.
///
/// Absent fields are not an error: a snapshot carries what the producer has.
pub fn check_tracked_types(entity: &Entity, snapshot: &Map<String, Value>) -> Vec<FieldTypeError> {
    entity
        .tracked_fields
        .iter()
        .filter(|field| {
            snapshot
                .get(field.snapshot_key)
                .is_some_and(|value| !has_type(value, field.field_type))
        })
        .map(|field| FieldTypeError {
            key: field.snapshot_key,
            expected: field.field_type.describe(),
        })
        .collect()
}

fn has_type(value: &Value, field_type: FieldType) -> bool {
    match field_type {
        FieldType::String => value.is_string(),
        FieldType::NullableString => value.is_string() || value.is_null(),
        FieldType::Number => is_finite_number(value),
        FieldType::Integer => is_integer_literal(value),
        FieldType::NullableInteger => value.is_null() || is_integer_literal(value),
        FieldType::Boolean => value.is_boolean(),
        FieldType::NullableArray => value.is_array() || value.is_null(),
        FieldType::NullableObject => value.is_object() || value.is_null(),
        FieldType::StringArray => value
            .as_array()
            .is_some_and(|items| items.iter().all(Value::is_string)),
    }
}

/// Accepts only numbers written as integers that fit in 64 bits, so a
/// receiver that decodes the field into an integer type never meets `60.0`,
/// `6e1` or a value it cannot hold.
fn is_integer_literal(value: &Value) -> bool {
    match value {
        Value::Number(number) => {
            let text = number.to_string();
            !text.contains(['.', 'e', 'E']) && text.parse::<i64>().is_ok()
        }
        _ => false,
    }
}

/// Accepts numbers that a double can hold, so no receiver reads infinity.
fn is_finite_number(value: &Value) -> bool {
    match value {
        Value::Number(number) => number.to_string().parse::<f64>().is_ok_and(f64::is_finite),
        _ => false,
    }
}

/// Computes `data.changes` from the previous and the new snapshot.
///
/// Only tracked fields present in `new` are compared; a field missing from
/// `previous` counts as `null` there. Keys follow the catalogue's order.
pub fn compute_changes(
    entity: &Entity,
    previous: &Map<String, Value>,
    new: &Map<String, Value>,
) -> Map<String, Value> {
    let mut changes = Map::new();
    for field in entity.tracked_fields {
        let Some(new_value) = new.get(field.snapshot_key) else {
            continue;
        };
        let old_value = previous.get(field.snapshot_key).unwrap_or(&Value::Null);
        if !json_equal(old_value, new_value) {
            let mut change = Map::new();
            change.insert("old".to_owned(), old_value.clone());
            change.insert("new".to_owned(), new_value.clone());
            changes.insert(field.name.to_owned(), Value::Object(change));
        }
    }
    changes
}

/// Compares two JSON values, numbers by value and objects without regard to key order.
pub fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => numbers_equal(x, y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_equal(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(key, a)| y.get(key).is_some_and(|b| json_equal(a, b)))
        }
        _ => a == b,
    }
}

fn numbers_equal(a: &Number, b: &Number) -> bool {
    let (a, b) = (a.to_string(), b.to_string());
    a == b || Decimal::parse(&a) == Decimal::parse(&b)
}

/// A JSON number reduced to `sign * digits * 10^exponent`, with no leading or
/// trailing zeros in `digits`, so equal values have equal representations.
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    digits: String,
    exponent: i128,
}

impl Decimal {
    fn parse(text: &str) -> Option<Decimal> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(at) => (&rest[..at], rest[at + 1..].parse::<i128>().ok()?),
            None => (rest, 0),
        };
        let (integer, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let mut digits: String = integer.chars().chain(fraction.chars()).collect();
        let mut exponent = exponent - fraction.len() as i128;

        let trailing = digits.len() - digits.trim_end_matches('0').len();
        digits.truncate(digits.len() - trailing);
        exponent += trailing as i128;
        let digits = digits.trim_start_matches('0').to_owned();

        if digits.is_empty() {
            return Some(Decimal {
                negative: false,
                digits,
                exponent: 0,
            });
        }
        Some(Decimal {
            negative,
            digits,
            exponent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::catalogue::{BOOKING, SERVICE};
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().expect("test value is an object").clone()
    }

    #[test]
    fn numbers_compare_by_value() {
        let equal = [
            ("75", "75.0"),
            ("75", "7.5e1"),
            ("0", "-0.0"),
            ("19.99", "19.990"),
            ("1E2", "100"),
        ];
        for (a, b) in equal {
            let (a, b): (Value, Value) = (a.parse().unwrap(), b.parse().unwrap());
            assert!(json_equal(&a, &b), "{a} should equal {b}");
        }
        let different = [("75", "75.01"), ("-1", "1"), ("10", "1"), ("0.1", "0.01")];
        for (a, b) in different {
            let (a, b): (Value, Value) = (a.parse().unwrap(), b.parse().unwrap());
            assert!(!json_equal(&a, &b), "{a} should differ from {b}");
        }
    }

    #[test]
    fn objects_compare_without_key_order() {
        let a = json!({"freq": "weekly", "count": 3});
        let b: Value = serde_json::from_str(r#"{"count": 3.0, "freq": "weekly"}"#).unwrap();
        assert!(json_equal(&a, &b));
    }

    #[test]
    fn changes_report_only_differing_tracked_fields() {
        let previous = object(json!({"status": "pending", "amount": 50.0, "notifyClient": true}));
        let new = object(json!({"status": "confirmed", "amount": 50, "notifyClient": false}));
        let changes = compute_changes(&BOOKING, &previous, &new);
        assert_eq!(
            Value::Object(changes),
            json!({"status": {"old": "pending", "new": "confirmed"}})
        );
    }

    #[test]
    fn payment_status_change_uses_camel_case_key() {
        let previous = object(json!({"payment_status": null}));
        let new = object(json!({"payment_status": "paid"}));
        let changes = compute_changes(&BOOKING, &previous, &new);
        assert_eq!(
            Value::Object(changes),
            json!({"paymentStatus": {"old": null, "new": "paid"}})
        );
    }

    #[test]
    fn integer_fields_reject_fractional_forms() {
        let snapshot = object(serde_json::from_str(r#"{"duration": 60.0}"#).unwrap());
        let errors = check_tracked_types(&SERVICE, &snapshot);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "duration");
    }

    #[test]
    fn numbers_out_of_range_are_rejected() {
        let snapshot = object(
            serde_json::from_str(
                r#"{"price": 1e999999, "duration": 123456789012345678901234567890}"#,
            )
            .unwrap(),
        );
        let errors = check_tracked_types(&SERVICE, &snapshot);
        let keys: Vec<&str> = errors.iter().map(|error| error.key).collect();
        assert_eq!(keys, ["duration", "price"]);
    }

    #[test]
    fn nullable_fields_accept_null() {
        let snapshot = object(json!({"sessions": null, "description": null, "price": 10.5}));
        assert!(check_tracked_types(&SERVICE, &snapshot).is_empty());
    }
}
