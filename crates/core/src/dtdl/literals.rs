//! JSON-LD literal forms: `@context` lists, DTMIs as a model may use them, names, plain and
//! value-object strings, booleans and integers, and localizable strings.

use serde_json::Value;

use crate::dtmi::Dtmi;

type Res<T> = Result<T, String>;

/// The DTMIs an `@context` value names (a string or an array of strings).
pub(super) fn context_ids(context: &Value) -> Res<Vec<&str>> {
    match context {
        Value::String(s) => Ok(vec![s.as_str()]),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .ok_or_else(|| "@context entries must be strings".to_string())
            })
            .collect(),
        _ => Err("@context must be a string or an array of strings".into()),
    }
}

/// Parses a DTMI as DTDL `version` allows it in a model.
pub(super) fn parse_dtmi(s: &str, version: u8, max: usize) -> Res<Dtmi> {
    let dtmi = Dtmi::parse(s).map_err(|e| e.to_string())?;
    if s.len() > max {
        return Err(format!("'{s}' is longer than {max} characters"));
    }
    if version == 2 && (dtmi.major_version().is_none() || s.contains('.')) {
        return Err(format!("'{s}' needs a single-part version"));
    }
    if s.starts_with("dtmi:dtdl:") || s.starts_with("dtmi:standard:") {
        return Err(format!("'{s}' uses a reserved prefix"));
    }
    Ok(dtmi)
}

pub(super) fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(f), Some(l)) => {
            f.is_ascii_alphabetic()
                && l.is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
        }
        _ => false,
    }
}

/// A string literal, possibly in `{"@value": ..., "@type": "xsd:string"}` form.
pub(super) fn literal_string(item: &Value, v3: bool) -> Res<String> {
    match representational(item, "xsd:string", v3)? {
        Value::String(s) => Ok(s.clone()),
        _ => Err("expected a string".into()),
    }
}

/// Unwraps a JSON-LD value object; plain JSON values pass through.
pub(super) fn representational<'v>(item: &'v Value, xsd: &str, v3: bool) -> Res<&'v Value> {
    let Value::Object(obj) = item else {
        return if item.is_array() {
            Err("nested arrays are not allowed".into())
        } else {
            Ok(item)
        };
    };
    let Some(value) = obj.get("@value") else {
        return Err("a value object needs @value".into());
    };
    for key in obj.keys() {
        match key.as_str() {
            "@value" => {}
            "@type" => {
                let ty = match obj.get("@type") {
                    Some(Value::Array(items)) if items.len() == 1 => items[0].as_str(),
                    Some(v) => v.as_str(),
                    None => None,
                };
                let full = xsd.replace("xsd:", "http://www.w3.org/2001/XMLSchema#");
                if ty != Some(xsd) && ty != Some(full.as_str()) {
                    return Err(format!("@type of a value must be {xsd}"));
                }
            }
            "@id" | "@context" | "@graph" => {
                return Err(format!("{key} is not allowed in a value"));
            }
            k if !k.starts_with('@') => return Err(format!("'{k}' is not allowed in a value")),
            k if v3 => return Err(format!("'{k}' is not allowed in a value")),
            _ => {}
        }
    }
    Ok(value)
}

fn is_language_tag(s: &str) -> bool {
    let mut parts = s.split('-');
    let first_ok = parts
        .next()
        .is_some_and(|p| (2..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphabetic()));
    first_ok
        && parts.all(|p| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Checks a localizable string value.
pub(super) fn lang_string(value: &Value, max: usize, v3: bool) -> Res<()> {
    let check_len = |s: &str| {
        if s.chars().count() > max {
            Err(format!("longer than {max} characters"))
        } else {
            Ok(())
        }
    };
    match value {
        Value::String(s) => check_len(s),
        Value::Object(obj) => {
            for (lang, text) in obj {
                if !is_language_tag(lang) {
                    return Err(format!("'{lang}' is not a language code"));
                }
                match text {
                    Value::String(s) => check_len(s)?,
                    _ => return Err("localized strings must be strings".into()),
                }
            }
            Ok(())
        }
        Value::Array(items) => {
            let mut langs: Vec<Option<&str>> = Vec::new();
            for item in items {
                let (lang, text) = match item {
                    Value::String(s) => (None, s),
                    Value::Object(obj) => {
                        let Some(text) = obj.get("@value") else {
                            return Err("a localized value needs @value".into());
                        };
                        let Value::String(text) = text else {
                            return Err("@value must be a string".into());
                        };
                        for key in obj.keys() {
                            let tolerated = !v3
                                && key.starts_with('@')
                                && !matches!(key.as_str(), "@id" | "@context" | "@graph");
                            if key != "@value" && key != "@language" && !tolerated {
                                return Err(format!("'{key}' is not allowed in a localized value"));
                            }
                        }
                        let lang = match obj.get("@language") {
                            None => None,
                            Some(Value::String(l)) if is_language_tag(l) => Some(l.as_str()),
                            Some(_) => return Err("@language must be a language code".into()),
                        };
                        (lang, text)
                    }
                    _ => return Err("expected a string or a localized value".into()),
                };
                check_len(text)?;
                // A value without a language is in the default language, English.
                let lang = Some(lang.unwrap_or("en"));
                if langs.contains(&lang) {
                    return Err("two values for the same language".into());
                }
                langs.push(lang);
            }
            Ok(())
        }
        _ => Err("expected a localizable string".into()),
    }
}
