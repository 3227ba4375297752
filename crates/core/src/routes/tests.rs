use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

fn matches(filter: &str, event: &Value) -> bool {
    match Filter::parse(filter) {
        Ok(f) => f.matches(event),
        Err(e) => panic!("{filter:?} should parse: {e}"),
    }
}

/// A twin lifecycle notification as ADT's event notification reference shows it, with a few
/// properties for the documented `$body` examples.
fn twin_create() -> Value {
    json!({
        "specversion": "1.0",
        "id": "d047e992-dddc-4a5a-b0af-fa79832235f8",
        "type": "Microsoft.DigitalTwins.Twin.Create",
        "source": "contoso-adt.api.wus2.digitaltwins.azure.net",
        "data": {
            "$dtId": "floor1",
            "$etag": "W/\"e398dbf4-8214-4483-9d52-880b61e491ec\"",
            "temperature": 5.5,
            "errorCode": 500,
            "poweredOn": true,
            "prop": "on",
            "$metadata": {
                "$model": "dtmi:example:com:floor;1",
                "room": { "desiredVersion": 3 }
            }
        },
        "subject": "floor1",
        "time": "2020-06-23T19:03:48.9700792Z",
        "datacontenttype": "application/json",
        "traceparent": "00-18f4e34b3e4a784aadf5913917537e7d-691a71e0a220d642-01"
    })
}

fn twin_update() -> Value {
    json!({
        "specversion": "1.0",
        "id": "5b3c7c36-5c6c-4b5c-9f4c-2f1f0a2b9c11",
        "type": "Microsoft.DigitalTwins.Twin.Update",
        "source": "contoso-adt.api.wus2.digitaltwins.azure.net",
        "data": {
            "modelId": "dtmi:example:com:floor4;2",
            "patch": [
                { "value": 40, "path": "/Temperature", "op": "replace" },
                { "value": 30, "path": "/comp1/prop1", "op": "add" }
            ]
        },
        "subject": "floor1",
        "time": "2020-06-23T19:05:00Z",
        "datacontenttype": "application/json",
        "traceparent": "00-7e3081c6d3edfb4eaf7d3244b2036baa-23d762f4d9f81741-01"
    })
}

/// Telemetry has a `dataschema` and, from a twin rather than a component, no `subject`.
fn telemetry() -> Value {
    json!({
        "specversion": "1.0",
        "id": "df5a5992-817b-4e8a-b12c-e0b18d4bf8fb",
        "type": "microsoft.iot.telemetry",
        "source": "contoso-adt.api.wus2.digitaltwins.azure.net/digitaltwins/room1",
        "data": { "temperature": 21.5 },
        "dataschema": "dtmi:example:com:floor4;2",
        "datacontenttype": "application/json",
        "traceparent": "00-7e3081c6d3edfb4eaf7d3244b2036baa-23d762f4d9f81741-01"
    })
}

#[test]
fn documented_filters_select_the_documented_events() {
    const T: bool = true;
    const F: bool = false;
    // Expected results for [Twin.Create, Twin.Update, telemetry].
    let cases: &[(&str, [bool; 3])] = &[
        ("true", [T, T, T]),
        ("false", [F, F, F]),
        ("type = 'Microsoft.DigitalTwins.Twin.Create'", [T, F, F]),
        ("type = 'Microsoft.DigitalTwins.Twin.Update'", [F, T, F]),
        ("type = 'microsoft.iot.telemetry'", [F, F, T]),
        (
            "type = 'Microsoft.DigitalTwins.Twin.Create' OR type = 'Microsoft.DigitalTwins.Twin.Update'",
            [T, T, F],
        ),
        (
            "source = 'contoso-adt.api.wus2.digitaltwins.azure.net'",
            [T, T, F],
        ),
        ("subject = 'floor1'", [T, T, F]),
        ("dataschema = 'dtmi:example:com:floor4;2'", [F, F, T]),
        ("datacontenttype = 'application/json'", [T, T, T]),
        ("specversion = '1.0'", [T, T, T]),
        (
            "STARTS_WITH($body.$metadata.$model, 'dtmi:example:com:floor')",
            [T, F, F],
        ),
        ("ENDS_WITH($body.$metadata.$model, 'floor;1')", [T, F, F]),
        ("CONTAINS(subject, 'floor')", [T, T, F]),
        ("STARTS_WITH($body.$dtId, 'floor')", [T, F, F]),
        ("$body.modelId = 'dtmi:example:com:floor4;2'", [F, T, F]),
        ("$body.errorCode > 200", [T, F, F]),
        ("$body.temperature <= 5.5", [T, F, F]),
        ("$body.temperature > 20", [F, F, T]),
        ("$body.poweredOn = true", [T, F, F]),
        ("$body.prop != null", [T, F, F]),
        ("$body.$metadata.room.desiredVersion > 1", [T, F, F]),
        (
            "type != 'microsoft.iot.telemetry' AND datacontenttype = 'application/json'",
            [T, T, F],
        ),
        (
            "type != 'microsoft.iot.telemetry' OR datacontenttype = 'application/json'",
            [T, T, T],
        ),
        (
            "(type != 'microsoft.iot.telemetry' OR datacontenttype = 'application/json') OR (specversion != '1.0')",
            [T, T, T],
        ),
        ("NOT type = 'microsoft.iot.telemetry'", [T, T, F]),
        // Filters are case-sensitive: they must match the payload's case.
        ("type = 'microsoft.digitaltwins.twin.create'", [F, F, F]),
        // ADT does not filter on fields inside arrays, such as an update's patch.
        ("$body.patch.value = 40", [F, F, F]),
        ("$body.patch != null", [F, T, F]),
        // A missing attribute makes even `!=` false (telemetry has no subject).
        ("subject != 'floor2'", [T, T, F]),
        ("NOT subject = 'floor2'", [T, T, T]),
    ];
    let events = [twin_create(), twin_update(), telemetry()];
    for (filter, expected) in cases {
        let got = events.each_ref().map(|e| matches(filter, e));
        assert_eq!(&got, expected, "{filter}");
    }
}

#[test]
fn documented_filter_shapes_are_accepted() {
    for ok in [
        "true",
        "type = 'Microsoft.DigitalTwins.Twin.Create'",
        "type = 'Microsoft.DigitalTwins.Twin.Create' OR type = 'Microsoft.DigitalTwins.Twin.Delete'",
        "STARTS_WITH(source, 'factory') AND NOT (subject = 'x')",
        "$body.temperature > 20",
        "$body.prop != null",
        "type = \"double quoted\"",
        "data.temperature > 20",
        "type = subject",
        "$body.x = -1.5e3",
    ] {
        assert!(check_filter(ok).is_ok(), "{ok}");
    }
}

#[test]
fn malformed_filters_are_rejected() {
    for bad in [
        "",
        "   ",
        "type =",
        "type = 'x",
        "type = \"x'",
        "foo = 'x'",
        "TYPE = 'x'",
        "(type = 'a'",
        "type = 'a')",
        "type = 'a' AND",
        "AND type = 'a'",
        "NOT",
        "type = 'a' type = 'b'",
        "DROP TABLE",
        "type == 'a'",
        "type <> 'a'",
        "type ! 'a'",
        "'a' = type",
        "true = $body.x",
        "$body = 1",
        "$body. = 1",
        "$body.a..b = 1",
        "$body.a. = 1",
        "$body.x = 1-2",
        "$body.x = 1.2.3",
        "$body.x = 1.",
        "$body.x = -",
        "$body.x = 12abc",
        "$body.x = 1e999",
        "$body.x",
        "type < 'a'",
        "$body.x >= true",
        "$body.x > null",
        "STARTS_WITH(type)",
        "STARTS_WITH(type, 'a', 'b')",
        "STARTS_WITH(type, 5)",
        "CONTAINS(null, 'a')",
        "STARTS_WITH type, 'a'",
        "LOWER(type) = 'a'",
        "type = 'a' # comment",
        &"(".repeat(100),
    ] {
        assert!(check_filter(bad).is_err(), "{bad}");
    }
}

#[test]
fn and_binds_tighter_than_or() {
    let p = |s: &str| Filter::parse(s).unwrap();
    let flat = "type = 'a' OR type = 'b' AND type = 'c'";
    assert_eq!(p(flat), p("type = 'a' OR (type = 'b' AND type = 'c')"));
    assert_ne!(p(flat), p("(type = 'a' OR type = 'b') AND type = 'c'"));
    // Read left to right without precedence, these would be false.
    let event = twin_create();
    assert!(p("true OR true AND false").matches(&event));
    assert!(p("true OR false AND false").matches(&event));
    assert!(!p("(true OR true) AND false").matches(&event));
    assert!(p("false AND false OR true").matches(&event));
}

#[test]
fn not_binds_tighter_than_and() {
    let p = |s: &str| Filter::parse(s).unwrap();
    let flat = "NOT type = 'a' AND type = 'b'";
    assert_eq!(p(flat), p("(NOT type = 'a') AND type = 'b'"));
    assert_ne!(p(flat), p("NOT (type = 'a' AND type = 'b')"));
    let event = twin_create();
    assert!(!p("NOT true AND false").matches(&event));
    assert!(p("NOT (true AND false)").matches(&event));
    assert!(p("NOT false OR false").matches(&event));
    assert!(!p("NOT (false OR true)").matches(&event));
    assert!(p("NOT NOT true").matches(&event));
    assert!(!p("NOT NOT NOT true").matches(&event));
}

#[test]
fn keywords_are_case_insensitive_and_names_are_not() {
    let event = twin_create();
    for filter in [
        "TRUE",
        "True and NOT False",
        "false Or true",
        "starts_with(subject, 'floor')",
        "Ends_With(subject, '1')",
        "contains(subject, 'oo')",
        "$body.prop != NULL",
    ] {
        assert!(matches(filter, &event), "{filter}");
    }
    assert!(check_filter("Type = 'x'").is_err());
    assert!(check_filter("$BODY.x = 1").is_err());
    // Property names are matched as written.
    assert!(!matches("$body.Temperature <= 5.5", &event));
}

#[test]
fn comparisons_follow_the_documented_type_rules() {
    let event = json!({
        "type": "t",
        "data": {
            "int": 3,
            "float": 3.0,
            "big": u64::MAX,
            "neg": -7,
            "text": "3",
            "yes": true,
            "nothing": null,
            "list": [1, 2],
            "object": { "inner": "x" }
        }
    });
    let check = |filter: &str, expected: bool| {
        assert_eq!(matches(filter, &event), expected, "{filter}");
    };
    check("$body.int = 3", true);
    check("$body.int = 3.0", true);
    check("$body.float = 3", true);
    check("$body.int < 3.5", true);
    check("$body.neg < -6.5", true);
    check("$body.big = 18446744073709551615", true);
    check("$body.big > 18446744073709551614", true);
    check("$body.int >= $body.float", true);
    check("$body.int = $body.neg", false);
    // A number compares with a number only: both `=` and `!=` are false across types.
    check("$body.text = 3", false);
    check("$body.text != 3", false);
    check("$body.int = '3'", false);
    check("$body.int != '3'", false);
    check("$body.yes = 'true'", false);
    check("$body.yes != 1", false);
    check("$body.yes != false", true);
    check("$body.text = \"3\"", true);
    // null: `=` only for a present null, `!=` for anything present but null.
    check("$body.nothing = null", true);
    check("$body.nothing != null", false);
    check("$body.missing = null", false);
    check("$body.missing != null", false);
    check("$body.list != null", true);
    check("$body.object != null", true);
    check("$body.nothing = $body.nothing", true);
    check("$body.nothing = $body.int", false);
    // Objects and arrays compare with nothing else; members inside arrays cannot be reached.
    check("$body.object = $body.object", false);
    check("$body.object.inner = 'x'", true);
    check("$body.list.0 = 1", false);
    check("$body.text.more = '3'", false);
    // A missing path makes a comparison false and its negation true.
    check("$body.missing = 1", false);
    check("$body.missing != 1", false);
    check("NOT $body.missing = 1", true);
    check("NOT $body.missing != 1", true);
    check("STARTS_WITH($body.missing, '')", false);
    check("STARTS_WITH($body.int, '3')", false);
    check("STARTS_WITH($body.text, '')", true);
    check("CONTAINS('abc', 'b')", true);
    check("CONTAINS($body.text, $body.text)", true);
    // `data.` is the older spelling of `$body.`.
    check("data.int = 3", true);
}

#[test]
fn events_that_are_not_objects_match_only_constant_filters() {
    for event in [
        json!(null),
        json!([1, 2]),
        json!("type"),
        json!({"data": [1]}),
    ] {
        assert!(matches("true", &event));
        assert!(!matches("type = 'x'", &event));
        assert!(!matches("$body.x = 1", &event));
        assert!(matches("NOT $body.x = 1", &event));
    }
}

#[test]
fn filter_length_and_nesting_are_bounded() {
    // A 2048-character filter is fine, one more is not.
    let chain = format!("true{}", " AND true".repeat(227));
    let long = format!("{chain}{}", " ".repeat(MAX_FILTER_LEN - chain.len()));
    assert_eq!(long.len(), MAX_FILTER_LEN);
    assert!(Filter::parse(&long).unwrap().matches(&json!({})));
    assert!(Filter::parse(&format!("{long} ")).is_err());
    // Counted in characters, not bytes.
    let wide = format!("type = '{}'", "é".repeat(MAX_FILTER_LEN - 9));
    assert_eq!(wide.chars().count(), MAX_FILTER_LEN);
    assert!(Filter::parse(&wide).is_ok());

    let nested = |n: usize| format!("{}true{}", "(".repeat(n), ")".repeat(n));
    assert!(Filter::parse(&nested(MAX_DEPTH)).is_ok());
    assert!(Filter::parse(&nested(MAX_DEPTH + 1)).is_err());
    assert!(Filter::parse(&"NOT (".repeat(MAX_DEPTH + 1)).is_err());

    // Long NOT chains and flat chains need no recursion.
    let nots = format!("{}true", "NOT ".repeat(500));
    assert!(Filter::parse(&nots).unwrap().matches(&json!({})));
    let ors = format!("false{}", " OR false".repeat(220));
    assert!(!Filter::parse(&ors).unwrap().matches(&json!({})));
    let alternating = format!("true{}", " OR false AND true".repeat(110));
    assert!(Filter::parse(&alternating).unwrap().matches(&json!({})));
}

#[test]
fn multibyte_text_is_tokenized_without_panicking() {
    let event = json!({"subject": "señor 😀", "data": {"température": 1, "é": {"ü": "ß"}}});
    assert!(matches("subject = 'señor 😀'", &event));
    assert!(matches("CONTAINS(subject, 'ñ')", &event));
    assert!(matches("ENDS_WITH(subject, '😀')", &event));
    assert!(matches("$body.température = 1", &event));
    assert!(matches("$body.é.ü = \"ß\"", &event));
    for bad in [
        "é",
        "😀",
        "'é",
        "\"😀",
        "type = 'é",
        "type = é",
        "$body.x = 1é",
        "$body.x = -é",
        "type ≠ 'a'",
        "type = 'a' ∧ true",
        "\u{301}",
        "type\u{301} = 'a'",
        "(é)",
        "!é",
        "<é",
        "1é",
        "-",
        "'",
    ] {
        assert!(Filter::parse(bad).is_err(), "{bad}");
    }
}

// ----- property tests -----

/// Fragments that reach deep into the tokenizer and parser when strung together at random.
const FRAGMENTS: &[&str] = &[
    "(",
    ")",
    ",",
    "NOT ",
    " and ",
    " OR ",
    "'",
    "\"",
    "'x'",
    "\"é\"",
    "$body.",
    "$body.a",
    "data.",
    "..",
    "type",
    "subject",
    "=",
    "!=",
    "!",
    "<",
    "<=",
    ">",
    ">=",
    "-",
    "1",
    "1.",
    "1.5",
    "1e",
    "1e-3",
    "STARTS_WITH",
    "contains",
    "true",
    "FALSE",
    "null",
    "é",
    "😀",
    "\u{301}",
    " ",
    "\t",
    "\u{a0}",
];

fn fragment_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 0..40).prop_map(|parts| parts.concat())
}

/// A filter as the tests build it, printed to text and evaluated by [`reference`]; written apart
/// from the module's own parser and evaluator so that the two can disagree.
#[derive(Debug, Clone)]
enum Ast {
    Const(bool),
    Not(Box<Ast>),
    And(Box<Ast>, Box<Ast>),
    Or(Box<Ast>, Box<Ast>),
    /// Parentheses that change nothing.
    Paren(Box<Ast>),
    Cmp(Path, &'static str, Rhs),
    Func(&'static str, Path, Rhs),
}

#[derive(Debug, Clone)]
enum Path {
    Attr(&'static str),
    Body(Vec<&'static str>),
}

#[derive(Debug, Clone)]
enum Rhs {
    Path(Path),
    Str(&'static str),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
}

const KEYS: &[&str] = &["a", "b", "$m", "température"];
const STRINGS: &[&str] = &[
    "",
    "a",
    "ab",
    "b",
    "Twin.Create",
    "floor1",
    "it's",
    "é",
    "😀a",
];
const ATTRS: &[&str] = &["type", "subject", "source", "dataschema"];

fn path() -> impl Strategy<Value = Path> {
    prop_oneof![
        prop::sample::select(ATTRS).prop_map(Path::Attr),
        prop::collection::vec(prop::sample::select(KEYS), 1..4).prop_map(Path::Body),
    ]
}

fn number() -> impl Strategy<Value = Rhs> {
    prop_oneof![
        (-3i64..4).prop_map(Rhs::Int),
        (-3i64..4).prop_map(|n| Rhs::Float(n as f64 + 0.5)),
        (-3i64..4).prop_map(|n| Rhs::Float(n as f64)),
    ]
}

fn rhs() -> impl Strategy<Value = Rhs> {
    prop_oneof![
        path().prop_map(Rhs::Path),
        prop::sample::select(STRINGS).prop_map(Rhs::Str),
        number(),
        any::<bool>().prop_map(Rhs::Bool),
        Just(Rhs::Null),
    ]
}

fn leaf() -> impl Strategy<Value = Ast> {
    let equality = (path(), prop::sample::select(&["=", "!="][..]), rhs());
    let ordering = (
        path(),
        prop::sample::select(&["<", "<=", ">", ">="][..]),
        prop_oneof![number(), path().prop_map(Rhs::Path)],
    );
    let function = (
        prop::sample::select(&["STARTS_WITH", "ENDS_WITH", "CONTAINS"][..]),
        path(),
        prop_oneof![
            prop::sample::select(STRINGS).prop_map(Rhs::Str),
            path().prop_map(Rhs::Path)
        ],
    );
    prop_oneof![
        any::<bool>().prop_map(Ast::Const),
        equality.prop_map(|(p, op, r)| Ast::Cmp(p, op, r)),
        ordering.prop_map(|(p, op, r)| Ast::Cmp(p, op, r)),
        function.prop_map(|(f, p, r)| Ast::Func(f, p, r)),
    ]
}

fn ast() -> impl Strategy<Value = Ast> {
    leaf().prop_recursive(5, 32, 2, |inner| {
        prop_oneof![
            inner.clone().prop_map(|a| Ast::Not(Box::new(a))),
            inner.clone().prop_map(|a| Ast::Paren(Box::new(a))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Ast::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner).prop_map(|(a, b)| Ast::Or(Box::new(a), Box::new(b))),
        ]
    })
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-3i64..4).prop_map(|n| json!(n)),
        (-3i64..4).prop_map(|n| json!(n as f64 + 0.5)),
        (-3i64..4).prop_map(|n| json!(n as f64)),
        prop::sample::select(STRINGS).prop_map(|s| json!(s)),
    ]
}

fn json_body() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(KEYS), inner, 0..4).prop_map(|m| {
                Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

fn event() -> impl Strategy<Value = Value> {
    let attribute = prop_oneof![
        3 => prop::sample::select(STRINGS).prop_map(|s| Some(json!(s))),
        1 => Just(None),
        1 => json_leaf().prop_map(Some),
    ];
    (
        prop::collection::vec(attribute, ATTRS.len()),
        prop::option::of(json_body()),
    )
        .prop_map(|(values, data)| {
            let mut event = serde_json::Map::new();
            for (name, value) in ATTRS.iter().zip(values) {
                if let Some(value) = value {
                    event.insert((*name).to_owned(), value);
                }
            }
            if let Some(data) = data {
                event.insert("data".to_owned(), data);
            }
            Value::Object(event)
        })
}

/// Prints `ast` with as few parentheses as the documented precedence needs (plus the explicit
/// `Paren` ones), so a parser with another precedence reads a different filter. `style` varies
/// keyword case and quotes.
fn print(ast: &Ast, style: u8, out: &mut String) {
    let keyword = |w: &str| match style % 3 {
        0 => w.to_owned(),
        1 => w.to_lowercase(),
        _ => {
            let mut chars = w.chars();
            chars.next().map_or_else(String::new, |c| {
                c.to_string() + &chars.as_str().to_lowercase()
            })
        }
    };
    // Binding strength: OR 1, AND 2, NOT 3, anything else 4.
    let strength = |a: &Ast| match a {
        Ast::Or(..) => 1,
        Ast::And(..) => 2,
        Ast::Not(_) => 3,
        _ => 4,
    };
    let child = |a: &Ast, need: u8, out: &mut String| {
        if strength(a) < need {
            out.push('(');
            print(a, style, out);
            out.push(')');
        } else {
            print(a, style, out);
        }
    };
    match ast {
        Ast::Const(b) => out.push_str(&keyword(if *b { "TRUE" } else { "FALSE" })),
        Ast::Not(a) => {
            out.push_str(&keyword("NOT"));
            out.push(' ');
            child(a, 3, out);
        }
        Ast::And(a, b) => {
            child(a, 2, out);
            out.push_str(&format!(" {} ", keyword("AND")));
            child(b, 2, out);
        }
        Ast::Or(a, b) => {
            child(a, 1, out);
            out.push_str(&format!(" {} ", keyword("OR")));
            child(b, 1, out);
        }
        Ast::Paren(a) => {
            out.push('(');
            print(a, style, out);
            out.push(')');
        }
        Ast::Cmp(p, op, r) => {
            print_path(p, out);
            out.push_str(if style.is_multiple_of(2) { " " } else { "" });
            out.push_str(op);
            out.push(' ');
            print_rhs(r, style, out);
        }
        Ast::Func(f, p, r) => {
            out.push_str(&keyword(f));
            out.push('(');
            print_path(p, out);
            out.push_str(", ");
            print_rhs(r, style, out);
            out.push(')');
        }
    }
}

fn print_path(p: &Path, out: &mut String) {
    match p {
        Path::Attr(name) => out.push_str(name),
        Path::Body(keys) => {
            out.push_str("$body");
            for key in keys {
                out.push('.');
                out.push_str(key);
            }
        }
    }
}

fn print_rhs(r: &Rhs, style: u8, out: &mut String) {
    match r {
        Rhs::Path(p) => print_path(p, out),
        Rhs::Str(s) if s.contains('\'') || !style.is_multiple_of(2) => {
            out.push_str(&format!("\"{s}\""))
        }
        Rhs::Str(s) => out.push_str(&format!("'{s}'")),
        Rhs::Int(n) => out.push_str(&n.to_string()),
        Rhs::Float(f) => out.push_str(&format!("{f:?}")),
        Rhs::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Rhs::Null => out.push_str(if style.is_multiple_of(2) {
            "null"
        } else {
            "NULL"
        }),
    }
}

fn lookup<'a>(event: &'a Value, p: &Path) -> Option<&'a Value> {
    match p {
        Path::Attr(name) => match event {
            Value::Object(members) => members.get(*name),
            _ => None,
        },
        Path::Body(keys) => {
            let mut at = match event {
                Value::Object(members) => members.get("data")?,
                _ => return None,
            };
            for key in keys {
                at = match at {
                    Value::Object(members) => members.get(*key)?,
                    _ => return None,
                };
            }
            Some(at)
        }
    }
}

fn rhs_value(event: &Value, r: &Rhs) -> Option<Value> {
    Some(match r {
        Rhs::Path(p) => lookup(event, p)?.clone(),
        Rhs::Str(s) => json!(s),
        Rhs::Int(n) => json!(n),
        Rhs::Float(f) => json!(f),
        Rhs::Bool(b) => json!(b),
        Rhs::Null => Value::Null,
    })
}

/// The semantics the module documents, written out once more by other means.
fn reference(ast: &Ast, event: &Value) -> bool {
    match ast {
        Ast::Const(b) => *b,
        Ast::Not(a) => !reference(a, event),
        Ast::And(a, b) => reference(a, event) && reference(b, event),
        Ast::Or(a, b) => reference(a, event) || reference(b, event),
        Ast::Paren(a) => reference(a, event),
        Ast::Cmp(p, op, r) => {
            let (Some(x), Some(y)) = (lookup(event, p), rhs_value(event, r)) else {
                return false;
            };
            if x.is_null() || y.is_null() {
                let both = x.is_null() && y.is_null();
                return match *op {
                    "=" => both,
                    "!=" => !both,
                    _ => false,
                };
            }
            match (x, &y) {
                (Value::String(a), Value::String(b)) => match *op {
                    "=" => a == b,
                    "!=" => a != b,
                    _ => false,
                },
                (Value::Bool(a), Value::Bool(b)) => match *op {
                    "=" => a == b,
                    "!=" => a != b,
                    _ => false,
                },
                (Value::Number(a), Value::Number(b)) => {
                    let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
                    match *op {
                        "=" => a == b,
                        "!=" => a != b,
                        "<" => a < b,
                        "<=" => a <= b,
                        ">" => a > b,
                        ">=" => a >= b,
                        other => unreachable!("{other}"),
                    }
                }
                _ => false,
            }
        }
        Ast::Func(f, p, r) => {
            let x = lookup(event, p).and_then(Value::as_str);
            let y = rhs_value(event, r);
            let (Some(x), Some(y)) = (x, y.as_ref().and_then(Value::as_str)) else {
                return false;
            };
            match *f {
                "STARTS_WITH" => x.get(..y.len()) == Some(y),
                "ENDS_WITH" => x.len() >= y.len() && x.get(x.len() - y.len()..) == Some(y),
                "CONTAINS" => x.match_indices(y).next().is_some(),
                other => unreachable!("{other}"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parse_survives_arbitrary_text(text in "\\PC{0,300}") {
        let _ = Filter::parse(&text);
    }

    #[test]
    fn parse_survives_arbitrary_strings_with_control_characters(text in any::<String>()) {
        let _ = Filter::parse(&text);
    }

    #[test]
    fn parse_and_match_survive_strings_of_filter_fragments(text in fragment_soup(), event in event()) {
        if let Ok(filter) = Filter::parse(&text) {
            let _ = filter.matches(&event);
        }
    }

    #[test]
    fn filters_agree_with_the_reference_evaluator(ast in ast(), style in any::<u8>(), event in event()) {
        let mut text = String::new();
        print(&ast, style, &mut text);
        prop_assume!(text.chars().count() <= MAX_FILTER_LEN);
        let filter = Filter::parse(&text);
        prop_assert!(filter.is_ok(), "{text:?} did not parse: {:?}", filter.err());
        if let Ok(filter) = filter {
            prop_assert_eq!(filter.matches(&event), reference(&ast, &event), "{} on {}", text, event);
        }
    }

    #[test]
    fn true_matches_every_event_and_false_none(event in event(), other in json_body()) {
        let yes = Filter::parse("true").unwrap();
        let no = Filter::parse("false").unwrap();
        prop_assert!(yes.matches(&event) && yes.matches(&other));
        prop_assert!(!no.matches(&event) && !no.matches(&other));
    }
}
