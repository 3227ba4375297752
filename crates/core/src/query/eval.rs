//! Evaluating conditions on one row, with Cosmos SQL's three-valued logic: a missing property is
//! *undefined*, comparisons between different types are undefined, undefined propagates through
//! `NOT` and is neither true nor false in `AND`/`OR`. A row passes `WHERE` only when the
//! condition is `true`.

use std::cell::{Cell, OnceCell};
use std::cmp::Ordering;
use std::rc::Rc;
use std::sync::Arc;

use serde_json::{Map, Number, Value};

use super::ast::{CmpOp, Expr, Func};
use crate::graph::{Graph, Relationship, Twin};

/// What a collection variable is bound to in the current row.
#[derive(Debug, Clone)]
pub(crate) enum Bound<'a> {
    Unbound,
    Twin(&'a Arc<Twin>, Doc),
    Rel(&'a Arc<Relationship>, Doc),
}

/// A binding's document, parsed from the stored JSON on first use and shared by the binding's
/// clones. Rows that never look at a document (`COUNT()`, `$dtId` seeds filtered by visibility)
/// never parse it.
#[derive(Debug, Clone)]
pub(crate) struct Doc(Rc<DocCell>);

#[derive(Debug)]
struct DocCell {
    parsed: OnceCell<Map<String, Value>>,
    meter: Rc<Meter>,
}

/// Documents one execution parsed, and their JSON bytes: read back by the executor to charge
/// the work budget.
#[derive(Debug, Default)]
pub(crate) struct Meter {
    pub parses: Cell<u64>,
    pub parsed_bytes: Cell<u64>,
}

impl Doc {
    pub fn new(meter: &Rc<Meter>) -> Self {
        Doc(Rc::new(DocCell {
            parsed: OnceCell::new(),
            meter: Rc::clone(meter),
        }))
    }

    fn get(
        &self,
        raw: &serde_json::value::RawValue,
        parse: impl FnOnce() -> Map<String, Value>,
    ) -> &Map<String, Value> {
        self.0.parsed.get_or_init(|| {
            let meter = &self.0.meter;
            meter.parses.set(meter.parses.get().saturating_add(1));
            let bytes = u64::try_from(raw.get().len()).unwrap_or(u64::MAX);
            meter
                .parsed_bytes
                .set(meter.parsed_bytes.get().saturating_add(bytes));
            parse()
        })
    }
}

impl<'a> Bound<'a> {
    /// The bound twin's or relationship's stored JSON text: its document, serialized.
    pub fn raw(&self) -> Option<&'a serde_json::value::RawValue> {
        match self {
            Bound::Unbound => None,
            Bound::Twin(t, _) => Some(t.json()),
            Bound::Rel(r, _) => Some(r.json()),
        }
    }

    pub fn doc(&self) -> Option<&Map<String, Value>> {
        match self {
            Bound::Unbound => None,
            Bound::Twin(t, d) => Some(d.get(t.json(), || t.doc())),
            Bound::Rel(r, d) => Some(d.get(r.json(), || r.doc())),
        }
    }

    pub fn twin(&self) -> Option<&'a Arc<Twin>> {
        match self {
            Bound::Twin(t, _) => Some(t),
            _ => None,
        }
    }
}

/// The value of an expression.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Val<'a> {
    Undefined,
    Bool(bool),
    Json(&'a Value),
    Doc(&'a Map<String, Value>),
}

/// A value by JSON type.
#[derive(Debug, Clone, Copy)]
enum View<'a> {
    Undefined,
    Null,
    Bool(bool),
    Num(&'a Number),
    Str(&'a str),
    Arr(&'a [Value]),
    Obj(&'a Map<String, Value>),
}

impl<'a> Val<'a> {
    fn view(self) -> View<'a> {
        match self {
            Val::Undefined => View::Undefined,
            Val::Bool(b) => View::Bool(b),
            Val::Json(v) => view_of(v),
            Val::Doc(m) => View::Obj(m),
        }
    }

    pub fn is_true(self) -> bool {
        matches!(self.view(), View::Bool(true))
    }

    fn truth(self) -> Option<bool> {
        match self.view() {
            View::Bool(b) => Some(b),
            _ => None,
        }
    }
}

fn view_of(v: &Value) -> View<'_> {
    match v {
        Value::Null => View::Null,
        Value::Bool(b) => View::Bool(*b),
        Value::Number(n) => View::Num(n),
        Value::String(s) => View::Str(s),
        Value::Array(a) => View::Arr(a),
        Value::Object(o) => View::Obj(o),
    }
}

fn from_truth<'a>(t: Option<bool>) -> Val<'a> {
    t.map_or(Val::Undefined, Val::Bool)
}

/// Looks up `path` in a collection's document; an empty path is the document itself.
pub(crate) fn lookup<'r>(bound: &'r Bound<'_>, path: &[String]) -> Val<'r> {
    let Some(doc) = bound.doc() else {
        return Val::Undefined;
    };
    let Some((first, rest)) = path.split_first() else {
        return Val::Doc(doc);
    };
    let mut current = match doc.get(first) {
        Some(v) => v,
        None => return Val::Undefined,
    };
    for segment in rest {
        match current.get(segment.as_str()) {
            Some(v) => current = v,
            None => return Val::Undefined,
        }
    }
    Val::Json(current)
}

pub(crate) fn eval<'r>(expr: &'r Expr, row: &'r [Bound<'_>], graph: &Graph) -> Val<'r> {
    match expr {
        Expr::Literal(v) => Val::Json(v),
        Expr::Path { var, path } => match row.get(*var) {
            Some(bound) => lookup(bound, path),
            None => Val::Undefined,
        },
        Expr::Not(e) => from_truth(eval(e, row, graph).truth().map(|b| !b)),
        Expr::And(terms) => {
            let mut all_true = true;
            for term in terms {
                match eval(term, row, graph).truth() {
                    Some(false) => return Val::Bool(false),
                    Some(true) => {}
                    None => all_true = false,
                }
            }
            if all_true {
                Val::Bool(true)
            } else {
                Val::Undefined
            }
        }
        Expr::Or(terms) => {
            let mut all_false = true;
            for term in terms {
                match eval(term, row, graph).truth() {
                    Some(true) => return Val::Bool(true),
                    Some(false) => {}
                    None => all_false = false,
                }
            }
            if all_false {
                Val::Bool(false)
            } else {
                Val::Undefined
            }
        }
        Expr::Compare(op, a, b) => from_truth(compare(
            *op,
            eval(a, row, graph).view(),
            eval(b, row, graph).view(),
        )),
        Expr::In {
            expr,
            list,
            negated,
        } => {
            let x = eval(expr, row, graph).view();
            if matches!(x, View::Undefined) {
                return Val::Undefined;
            }
            let found = list.iter().any(|item| equal(x, view_of(item)));
            Val::Bool(found != *negated)
        }
        Expr::Func(func, args) => {
            let arg = |i: usize| {
                args.get(i)
                    .map_or(View::Undefined, |a| eval(a, row, graph).view())
            };
            call(*func, arg(0), arg(1))
        }
        Expr::IsOfModel { var, model, exact } => match row.get(*var).and_then(Bound::twin) {
            Some(twin) => Val::Bool(graph.is_of_model(twin, model, *exact)),
            None => Val::Undefined,
        },
    }
}

fn call<'a>(func: Func, a: View<'_>, b: View<'_>) -> Val<'a> {
    let is = |f: fn(View<'_>) -> bool| {
        if matches!(a, View::Undefined) {
            Val::Bool(false)
        } else {
            Val::Bool(f(a))
        }
    };
    let strings = |f: fn(&str, &str) -> bool| match (a, b) {
        (View::Str(x), View::Str(y)) => Val::Bool(f(x, y)),
        _ => Val::Undefined,
    };
    match func {
        Func::IsDefined => Val::Bool(!matches!(a, View::Undefined)),
        Func::IsNull => is(|v| matches!(v, View::Null)),
        Func::IsBool => is(|v| matches!(v, View::Bool(_))),
        Func::IsNumber => is(|v| matches!(v, View::Num(_))),
        Func::IsString => is(|v| matches!(v, View::Str(_))),
        Func::IsObject => is(|v| matches!(v, View::Obj(_))),
        Func::IsPrimitive => {
            is(|v| matches!(v, View::Null | View::Bool(_) | View::Num(_) | View::Str(_)))
        }
        Func::StartsWith => strings(|x, y| x.starts_with(y)),
        Func::EndsWith => strings(|x, y| x.ends_with(y)),
        Func::Contains => strings(|x, y| x.contains(y)),
        Func::ArrayContains => match (a, b) {
            (View::Arr(items), needle) if !matches!(needle, View::Undefined) => {
                Val::Bool(items.iter().any(|item| equal(view_of(item), needle)))
            }
            _ => Val::Undefined,
        },
    }
}

fn equal(a: View<'_>, b: View<'_>) -> bool {
    compare(CmpOp::Eq, a, b) == Some(true)
}

/// `None` is undefined: either side undefined, different types, or an order asked of values
/// that have none (null, arrays, objects).
fn compare(op: CmpOp, a: View<'_>, b: View<'_>) -> Option<bool> {
    let ordering = match (a, b) {
        (View::Null, View::Null) => {
            return match op {
                CmpOp::Eq => Some(true),
                CmpOp::Ne => Some(false),
                _ => None,
            };
        }
        (View::Arr(_), View::Arr(_)) | (View::Obj(_), View::Obj(_)) => {
            let eq = view_json_eq(a, b);
            return match op {
                CmpOp::Eq => Some(eq),
                CmpOp::Ne => Some(!eq),
                _ => None,
            };
        }
        (View::Bool(x), View::Bool(y)) => x.cmp(&y),
        (View::Num(x), View::Num(y)) => number_cmp(x, y)?,
        (View::Str(x), View::Str(y)) => x.cmp(y),
        _ => return None,
    };
    Some(match op {
        CmpOp::Eq => ordering == Ordering::Equal,
        CmpOp::Ne => ordering != Ordering::Equal,
        CmpOp::Lt => ordering == Ordering::Less,
        CmpOp::Gt => ordering == Ordering::Greater,
        CmpOp::Le => ordering != Ordering::Greater,
        CmpOp::Ge => ordering != Ordering::Less,
    })
}

/// Integers compare exactly; anything else as doubles (so `1 = 1.0`).
fn number_cmp(a: &Number, b: &Number) -> Option<Ordering> {
    let int = |n: &Number| {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    };
    if let (Some(x), Some(y)) = (int(a), int(b)) {
        return Some(x.cmp(&y));
    }
    a.as_f64()?.partial_cmp(&b.as_f64()?)
}

fn view_json_eq(a: View<'_>, b: View<'_>) -> bool {
    match (a, b) {
        (View::Arr(x), View::Arr(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (View::Obj(x), View::Obj(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => equal(a, b),
    }
}

/// Deep equality with numeric comparison of numbers. Documents come from serde_json, which
/// limits nesting, so the recursion is bounded.
fn json_eq(a: &Value, b: &Value) -> bool {
    view_json_eq(view_of(a), view_of(b))
}
