//! Checking JSON values (twin property values as sent to the REST API) against DTDL schemas.

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;

use super::{Primitive, Schema};

/// Why a value does not fit its schema; the message names the offending path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(pub String);

impl Schema {
    /// Checks that `value` is a valid instance of this schema.
    pub fn check(&self, value: &Value) -> Result<(), ValueError> {
        check(self, value, &mut String::new())
    }
}

fn fail(path: &str, what: &str) -> ValueError {
    if path.is_empty() {
        ValueError(format!("expected {what}"))
    } else {
        ValueError(format!("field '{path}': expected {what}"))
    }
}

fn check(schema: &Schema, value: &Value, path: &mut String) -> Result<(), ValueError> {
    match schema {
        Schema::Primitive(p) => {
            if primitive_fits(*p, value) {
                Ok(())
            } else {
                Err(fail(path, primitive_name(*p)))
            }
        }
        Schema::Enum { values, .. } => {
            if values.iter().any(|v| &v.value == value) {
                Ok(())
            } else {
                let names: Vec<String> = values.iter().map(|v| v.value.to_string()).collect();
                Err(fail(path, &format!("one of {}", names.join(", "))))
            }
        }
        Schema::Array(element) => {
            let Value::Array(items) = value else {
                return Err(fail(path, "array"));
            };
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                check(element, item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Schema::Map {
            value: value_schema,
            ..
        } => {
            let Value::Object(entries) = value else {
                return Err(fail(path, "map (object)"));
            };
            for (key, item) in entries {
                with_key(path, key, |path| check(value_schema, item, path))?;
            }
            Ok(())
        }
        Schema::Object { fields } => {
            let Value::Object(entries) = value else {
                return Err(fail(path, "object"));
            };
            for (key, item) in entries {
                let Some(field) = fields.iter().find(|f| &f.name == key) else {
                    let mut full = path.clone();
                    push_key(&mut full, key);
                    return Err(ValueError(format!(
                        "field '{full}': not defined by the schema"
                    )));
                };
                with_key(path, key, |path| check(&field.schema, item, path))?;
            }
            Ok(())
        }
    }
}

fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

fn with_key(
    path: &mut String,
    key: &str,
    f: impl FnOnce(&mut String) -> Result<(), ValueError>,
) -> Result<(), ValueError> {
    let len = path.len();
    push_key(path, key);
    let result = f(path);
    path.truncate(len);
    result
}

fn primitive_name(p: Primitive) -> &'static str {
    match p {
        Primitive::Boolean => "boolean",
        Primitive::Date => "date (YYYY-MM-DD)",
        Primitive::DateTime => "dateTime (RFC 3339)",
        Primitive::Double => "double",
        Primitive::Duration => "duration (ISO 8601)",
        Primitive::Float => "float",
        Primitive::Integer => "integer",
        Primitive::Long => "long",
        Primitive::String => "string",
        Primitive::Time => "time (hh:mm:ss)",
        Primitive::Byte => "byte",
        Primitive::Bytes => "bytes (base64)",
        Primitive::Decimal => "decimal",
        Primitive::Short => "short",
        Primitive::Uuid => "uuid",
        Primitive::UnsignedByte => "unsignedByte",
        Primitive::UnsignedShort => "unsignedShort",
        Primitive::UnsignedInteger => "unsignedInteger",
        Primitive::UnsignedLong => "unsignedLong",
        Primitive::Point => "GeoJSON Point",
        Primitive::MultiPoint => "GeoJSON MultiPoint",
        Primitive::LineString => "GeoJSON LineString",
        Primitive::MultiLineString => "GeoJSON MultiLineString",
        Primitive::Polygon => "GeoJSON Polygon",
        Primitive::MultiPolygon => "GeoJSON MultiPolygon",
    }
}

fn int_in(value: &Value, min: i64, max: i64) -> bool {
    value.as_i64().is_some_and(|i| (min..=max).contains(&i))
}

fn primitive_fits(p: Primitive, value: &Value) -> bool {
    match p {
        Primitive::Boolean => value.is_boolean(),
        Primitive::Integer => int_in(value, i32::MIN.into(), i32::MAX.into()),
        Primitive::Long => value.is_i64(),
        Primitive::Byte => int_in(value, i8::MIN.into(), i8::MAX.into()),
        Primitive::Short => int_in(value, i16::MIN.into(), i16::MAX.into()),
        Primitive::UnsignedByte => int_in(value, 0, u8::MAX.into()),
        Primitive::UnsignedShort => int_in(value, 0, u16::MAX.into()),
        Primitive::UnsignedInteger => int_in(value, 0, u32::MAX.into()),
        Primitive::UnsignedLong => value.is_u64(),
        Primitive::Double | Primitive::Decimal => value.is_number(),
        Primitive::Float => value
            .as_f64()
            .is_some_and(|f| f.abs() <= f64::from(f32::MAX)),
        Primitive::String => value.is_string(),
        Primitive::Bytes => value.as_str().is_some_and(|s| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(s).is_ok()
        }),
        Primitive::Uuid => value
            .as_str()
            .is_some_and(|s| uuid::Uuid::parse_str(s).is_ok()),
        Primitive::Date => value.as_str().is_some_and(is_date),
        Primitive::DateTime => value
            .as_str()
            .is_some_and(|s| time::OffsetDateTime::parse(s, &Rfc3339).is_ok()),
        Primitive::Time => value.as_str().is_some_and(is_time),
        Primitive::Duration => value.as_str().is_some_and(is_duration),
        Primitive::Point
        | Primitive::MultiPoint
        | Primitive::LineString
        | Primitive::MultiLineString
        | Primitive::Polygon
        | Primitive::MultiPolygon => value.as_object().is_some_and(|o| is_geojson(p, o)),
    }
}

fn is_date(s: &str) -> bool {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    s.len() == 10 && time::Date::parse(s, &format).is_ok()
}

/// `hh:mm:ss` with optional fraction and optional `Z` or `±hh:mm` offset.
fn is_time(s: &str) -> bool {
    let body = s
        .strip_suffix('Z')
        .or_else(|| {
            let (head, tail) = s.split_at(s.len().saturating_sub(6));
            let b = tail.as_bytes();
            (b.len() == 6
                && (b[0] == b'+' || b[0] == b'-')
                && b[3] == b':'
                && two_digits(&tail[1..3], 23)
                && two_digits(&tail[4..6], 59))
            .then_some(head)
        })
        .unwrap_or(s);
    let (hms, fraction) = match body.split_once('.') {
        Some((hms, f)) => (hms, Some(f)),
        None => (body, None),
    };
    let parts: Vec<&str> = hms.split(':').collect();
    parts.len() == 3
        && two_digits(parts[0], 23)
        && two_digits(parts[1], 59)
        && two_digits(parts[2], 60)
        && fraction.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

fn two_digits(s: &str, max: u32) -> bool {
    s.len() == 2
        && s.bytes().all(|b| b.is_ascii_digit())
        && s.parse::<u32>().is_ok_and(|v| v <= max)
}

/// ISO 8601 duration: `P[nY][nM][nW][nD][T[nH][nM][n[.n]S]]` with at least one component.
fn is_duration(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('P') else {
        return false;
    };
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    if time.is_some_and(str::is_empty) {
        return false;
    }
    let date_ok = components(date, &['Y', 'M', 'W', 'D'], false);
    let time_ok = time.is_none_or(|t| components(t, &['H', 'M', 'S'], true));
    date_ok && time_ok && (!date.is_empty() || time.is_some())
}

/// Checks `n<unit>` groups in the order of `units`; only the last (seconds) may be fractional.
fn components(s: &str, units: &[char], last_fractional: bool) -> bool {
    let mut rest = s;
    let mut next_unit = 0;
    while !rest.is_empty() {
        let Some(end) = rest.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ',')) else {
            return false;
        };
        let (number, tail) = rest.split_at(end);
        let Some(unit) = tail.chars().next() else {
            return false;
        };
        let Some(pos) = units[next_unit..].iter().position(|u| *u == unit) else {
            return false;
        };
        let index = next_unit + pos;
        let fractional = number.contains(['.', ',']);
        let digits_ok = !number.is_empty()
            && number
                .split(['.', ','])
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            && number.matches(['.', ',']).count() <= 1;
        if !digits_ok || (fractional && !(last_fractional && index == units.len() - 1)) {
            return false;
        }
        next_unit = index + 1;
        rest = &tail[unit.len_utf8()..];
    }
    true
}

fn is_geojson(p: Primitive, obj: &Map<String, Value>) -> bool {
    let expected = match p {
        Primitive::Point => "Point",
        Primitive::MultiPoint => "MultiPoint",
        Primitive::LineString => "LineString",
        Primitive::MultiLineString => "MultiLineString",
        Primitive::Polygon => "Polygon",
        _ => "MultiPolygon",
    };
    if obj.get("type").and_then(Value::as_str) != Some(expected) {
        return false;
    }
    let Some(coordinates) = obj.get("coordinates") else {
        return false;
    };
    match p {
        Primitive::Point => is_position(coordinates),
        Primitive::MultiPoint => each(coordinates, is_position),
        Primitive::LineString => is_line(coordinates),
        Primitive::MultiLineString => each(coordinates, is_line),
        Primitive::Polygon => is_polygon(coordinates),
        _ => each(coordinates, is_polygon),
    }
}

fn each(v: &Value, f: fn(&Value) -> bool) -> bool {
    v.as_array().is_some_and(|items| items.iter().all(f))
}

fn is_position(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|c| (2..=3).contains(&c.len()) && c.iter().all(Value::is_number))
}

fn is_line(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|p| p.len() >= 2 && p.iter().all(is_position))
}

fn is_ring(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|p| p.len() >= 4 && p.iter().all(is_position) && p.first() == p.last())
}

fn is_polygon(v: &Value) -> bool {
    each(v, is_ring)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{EnumValue, Field};
    use super::*;

    fn prim(p: Primitive) -> Schema {
        Schema::Primitive(p)
    }

    #[test]
    fn integers_must_fit_their_width() {
        assert!(prim(Primitive::Integer).check(&json!(2147483647)).is_ok());
        assert!(
            prim(Primitive::Integer)
                .check(&json!(2147483648i64))
                .is_err()
        );
        assert!(prim(Primitive::Integer).check(&json!(1.5)).is_err());
        assert!(prim(Primitive::Long).check(&json!(2147483648i64)).is_ok());
        assert!(prim(Primitive::UnsignedByte).check(&json!(-1)).is_err());
        assert!(prim(Primitive::Short).check(&json!(40000)).is_err());
    }

    #[test]
    fn doubles_accept_any_number_and_floats_their_range() {
        assert!(prim(Primitive::Double).check(&json!(1e300)).is_ok());
        assert!(prim(Primitive::Float).check(&json!(1e300)).is_err());
        assert!(prim(Primitive::Float).check(&json!(3)).is_ok());
        assert!(prim(Primitive::Double).check(&json!("1")).is_err());
    }

    #[test]
    fn temporal_strings_follow_their_formats() {
        assert!(prim(Primitive::Date).check(&json!("2024-02-29")).is_ok());
        assert!(prim(Primitive::Date).check(&json!("2023-02-29")).is_err());
        assert!(
            prim(Primitive::DateTime)
                .check(&json!("2024-01-01T10:00:00Z"))
                .is_ok()
        );
        assert!(
            prim(Primitive::DateTime)
                .check(&json!("2024-01-01 10:00"))
                .is_err()
        );
        assert!(prim(Primitive::Time).check(&json!("10:20:30.5")).is_ok());
        assert!(
            prim(Primitive::Time)
                .check(&json!("10:20:30+01:00"))
                .is_ok()
        );
        assert!(prim(Primitive::Time).check(&json!("25:00:00")).is_err());
        assert!(
            prim(Primitive::Duration)
                .check(&json!("P1Y2M3DT4H5M6.5S"))
                .is_ok()
        );
        assert!(prim(Primitive::Duration).check(&json!("PT")).is_err());
        assert!(prim(Primitive::Duration).check(&json!("P1.5D")).is_err());
        assert!(prim(Primitive::Duration).check(&json!("1D")).is_err());
    }

    #[test]
    fn enum_values_must_be_listed() {
        let schema = Schema::Enum {
            value_schema: Primitive::Integer,
            values: vec![EnumValue {
                name: "on".into(),
                value: json!(1),
            }],
        };
        assert!(schema.check(&json!(1)).is_ok());
        assert!(schema.check(&json!(2)).is_err());
    }

    #[test]
    fn object_errors_name_the_field_path() {
        let inner = Schema::Object {
            fields: vec![Field {
                name: "b".into(),
                schema: std::sync::Arc::new(prim(Primitive::Integer)),
            }],
        };
        let outer = Schema::Object {
            fields: vec![Field {
                name: "a".into(),
                schema: std::sync::Arc::new(inner),
            }],
        };
        assert!(outer.check(&json!({"a": {"b": 3}})).is_ok());
        assert!(outer.check(&json!({})).is_ok(), "fields are optional");
        let err = outer.check(&json!({"a": {"b": "x"}})).err().map(|e| e.0);
        assert_eq!(err.as_deref(), Some("field 'a.b': expected integer"));
        let err = outer.check(&json!({"a": {"c": 1}})).err().map(|e| e.0);
        assert_eq!(
            err.as_deref(),
            Some("field 'a.c': not defined by the schema")
        );
    }

    #[test]
    fn maps_and_arrays_check_every_entry() {
        let map = Schema::Map {
            key: Primitive::String,
            value: std::sync::Arc::new(prim(Primitive::Boolean)),
        };
        assert!(map.check(&json!({"x": true, "y": false})).is_ok());
        assert_eq!(
            map.check(&json!({"x": 1})).err().map(|e| e.0).as_deref(),
            Some("field 'x': expected boolean")
        );
        let array = Schema::Array(std::sync::Arc::new(prim(Primitive::String)));
        assert!(array.check(&json!(["a", "b"])).is_ok());
        assert!(array.check(&json!(["a", 2])).is_err());
    }

    #[test]
    fn geospatial_values_are_geojson_shapes() {
        let point = prim(Primitive::Point);
        assert!(
            point
                .check(&json!({"type": "Point", "coordinates": [1.0, 2.0]}))
                .is_ok()
        );
        assert!(
            point
                .check(&json!({"type": "Point", "coordinates": [1.0]}))
                .is_err()
        );
        let polygon = prim(Primitive::Polygon);
        let ring = json!([[0, 0], [1, 0], [1, 1], [0, 0]]);
        assert!(
            polygon
                .check(&json!({"type": "Polygon", "coordinates": [ring]}))
                .is_ok()
        );
        assert!(
            polygon
                .check(&json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}))
                .is_err()
        );
    }
}
