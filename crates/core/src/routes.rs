//! Event route filters: parsed once when a route is stored ([`Filter::parse`]), then evaluated
//! against each CloudEvents 1.0 event in structured JSON form ([`Filter::matches`]).
//!
//! # Grammar
//!
//! As the ADT event route filter reference describes it:
//!
//! ```text
//! filter     := or
//! or         := and ( OR and )*
//! and        := not ( AND not )*
//! not        := NOT* primary
//! primary    := '(' or ')' | true | false
//!             | reference op value
//!             | function '(' value ',' value ')'
//! op         := '=' | '!=' | '<' | '<=' | '>' | '>='
//! function   := STARTS_WITH | ENDS_WITH | CONTAINS
//! value      := reference | literal
//! literal    := 'text' | "text" | number | true | false | null
//! reference  := type | source | subject | id | specversion | dataschema | datacontenttype
//!             | time | traceparent | $body.<segment>(.<segment>)*
//! ```
//!
//! ADT's reference table names `type`, `source`, `subject`, `dataschema`, `datacontenttype`,
//! `specversion` and `$body`; `id`, `time` and `traceparent` are the other attributes ADT events
//! carry, kept because the validator before this module accepted them. ADT's operator table lists
//! `AND`, `OR` and parentheses; `NOT` is ours as well.
//!
//! `NOT` binds tighter than `AND`, which binds tighter than `OR`. Keywords (`AND`, `OR`, `NOT`,
//! `true`, `false`, `null` and the function names) are case-insensitive; attribute names and
//! `$body` are written in lower case, as ADT shows them. A `$body` path reads inside the event's
//! `data`, one object member per segment; a segment may begin with `$` (`$body.$metadata.$model`).
//! ADT documents no bracket or quoted form for paths, so there is none, and, as ADT says, fields
//! inside arrays cannot be reached (so no path goes through `patch` of an update notification).
//! `data.<path>` is accepted as another spelling of `$body.<path>`, because the validator that came
//! before this module accepted it. Strings have no escapes: a string ends at the next quote of the
//! kind that opened it, so `"it's"` and `'say "hi"'` are both fine.
//!
//! # Evaluation
//!
//! ADT documents which comparisons each data type supports; the rest is our choice, written here:
//!
//! - Filters are case-sensitive (ADT: "filters are case-sensitive and need to match the payload
//!   case"): strings compare exactly, code point by code point, and so do the three functions.
//! - Strings and booleans support `=` and `!=`; numbers support all six comparisons. A number
//!   compares with a number only (integers exactly, otherwise as `f64`, so `1 = 1.0`), a string
//!   with a string, a boolean with a boolean. `<`, `<=`, `>`, `>=` against a string, boolean or
//!   `null` literal, and a function given a non-string literal, are rejected when the filter is
//!   parsed, since ADT does not support them.
//! - `= null` is true when the value is present and JSON `null`; `!= null` is true when the value
//!   is present and anything but `null` (`$body.prop != null` is ADT's example).
//! - A comparison or function whose reference is missing (absent attribute, absent path, a path
//!   through a non-object), or whose two sides have different types, or whose value is an object
//!   or an array, is false, for `!=` too. `NOT` of it is true: the logic is two-valued.
//! - Extension attributes (anything not listed above) cannot be named, so a filter never depends
//!   on them; the event is read only where the filter points.
//!
//! # Bounds
//!
//! A filter has at most 2048 characters and at most 32 nested parentheses. Parsing is a single
//! pass without backtracking; evaluation visits each node once and reads each path one member
//! per segment, so its cost is linear in the filter and in the text it compares. Neither panics
//! on any input.

use std::cmp::Ordering;

use serde_json::Value;

use crate::error::{DomainError, DomainResult};

const MAX_FILTER_LEN: usize = 2_048;
const MAX_DEPTH: usize = 32;
const ATTRIBUTES: &[&str] = &[
    "type",
    "source",
    "subject",
    "id",
    "specversion",
    "dataschema",
    "datacontenttype",
    "time",
    "traceparent",
];
/// Where a body path starts; `data.` is the older spelling kept for filters stored before.
const BODY_PREFIXES: &[&str] = &["$body.", "data."];

/// A parsed event route filter, ready to be evaluated against events.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    expr: Expr,
}

impl Filter {
    /// Parses an event route filter, as a route's `filter` text is written.
    pub fn parse(text: &str) -> DomainResult<Filter> {
        // A char is at most 4 bytes: the first test spares counting the chars of huge inputs.
        if text.trim().is_empty()
            || text.len() > 4 * MAX_FILTER_LEN
            || text.chars().count() > MAX_FILTER_LEN
        {
            return Err(invalid("the filter must be 1 to 2048 characters"));
        }
        let tokens = tokenize(text)?;
        let mut parser = Parser {
            tokens: &tokens,
            pos: 0,
            depth: 0,
        };
        let expr = parser.or()?;
        if parser.pos != tokens.len() {
            return Err(invalid("unexpected text after the end of the filter"));
        }
        Ok(Filter { expr })
    }

    /// Whether `event`, a CloudEvents 1.0 event in structured JSON form (attributes at the top
    /// level, the body under `data`), passes this filter.
    pub fn matches(&self, event: &Value) -> bool {
        self.expr.eval(event)
    }

    /// The answer for every event, when the filter is the constant `true` or `false`: a
    /// caller may then skip building the event it would evaluate.
    pub fn constant(&self) -> Option<bool> {
        match self.expr {
            Expr::Const(answer) => Some(answer),
            _ => None,
        }
    }
}

/// Checks that `filter` is a well-formed event route filter.
pub fn check_filter(filter: &str) -> DomainResult<()> {
    Filter::parse(filter).map(|_| ())
}

fn invalid(message: &str) -> DomainError {
    DomainError::RouteFilterInvalid(message.to_owned())
}

// ----- the compiled form -----

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Const(bool),
    Not(Box<Expr>),
    /// Two or more operands: chains are kept flat, so evaluation depth follows the parentheses,
    /// not the length of the filter.
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Compare {
        left: Reference,
        op: CmpOp,
        right: Operand,
    },
    Call {
        function: Function,
        value: Operand,
        text: Operand,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Function {
    StartsWith,
    EndsWith,
    Contains,
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Reference(Reference),
    Literal(Literal),
}

#[derive(Debug, Clone, PartialEq)]
enum Reference {
    /// A CloudEvents attribute, one of [`ATTRIBUTES`].
    Attribute(&'static str),
    /// Object members to follow from the event's `data`, at least one.
    Body(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Str(String),
    Num(Num),
    Bool(bool),
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    /// Every JSON integer (i64 or u64) fits, so integers compare exactly.
    Int(i128),
    Float(f64),
}

impl Num {
    fn of(n: &serde_json::Number) -> Option<Num> {
        if let Some(i) = n.as_i64() {
            Some(Num::Int(i128::from(i)))
        } else if let Some(u) = n.as_u64() {
            Some(Num::Int(i128::from(u)))
        } else {
            n.as_f64().map(Num::Float)
        }
    }

    #[allow(clippy::cast_precision_loss)] // comparing with a float is approximate by nature
    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn compare(self, other: Num) -> Option<Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }
}

/// A value read from the event or written in the filter, borrowed for one comparison.
#[derive(Clone, Copy)]
enum Scalar<'a> {
    Str(&'a str),
    Num(Num),
    Bool(bool),
    Null,
    /// An object or an array: present, not null, comparable with nothing.
    Composite,
}

impl<'a> Scalar<'a> {
    fn of_json(value: &'a Value) -> Scalar<'a> {
        match value {
            Value::String(s) => Scalar::Str(s),
            Value::Number(n) => Num::of(n).map_or(Scalar::Composite, Scalar::Num),
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Null => Scalar::Null,
            Value::Array(_) | Value::Object(_) => Scalar::Composite,
        }
    }

    fn of_literal(literal: &'a Literal) -> Scalar<'a> {
        match literal {
            Literal::Str(s) => Scalar::Str(s),
            Literal::Num(n) => Scalar::Num(*n),
            Literal::Bool(b) => Scalar::Bool(*b),
            Literal::Null => Scalar::Null,
        }
    }
}

impl Expr {
    fn eval(&self, event: &Value) -> bool {
        match self {
            Expr::Const(b) => *b,
            Expr::Not(inner) => !inner.eval(event),
            Expr::And(items) => items.iter().all(|e| e.eval(event)),
            Expr::Or(items) => items.iter().any(|e| e.eval(event)),
            Expr::Compare { left, op, right } => match (left.read(event), right.read(event)) {
                (Some(a), Some(b)) => compare(*op, a, b),
                _ => false,
            },
            Expr::Call {
                function,
                value,
                text,
            } => match (value.read(event), text.read(event)) {
                (Some(Scalar::Str(v)), Some(Scalar::Str(t))) => match function {
                    Function::StartsWith => v.starts_with(t),
                    Function::EndsWith => v.ends_with(t),
                    Function::Contains => v.contains(t),
                },
                _ => false,
            },
        }
    }
}

fn compare(op: CmpOp, a: Scalar<'_>, b: Scalar<'_>) -> bool {
    let equal = match (a, b) {
        (Scalar::Null, other) | (other, Scalar::Null) => matches!(other, Scalar::Null),
        (Scalar::Str(x), Scalar::Str(y)) => x == y,
        (Scalar::Bool(x), Scalar::Bool(y)) => x == y,
        (Scalar::Num(x), Scalar::Num(y)) => {
            return match x.compare(y) {
                Some(ordering) => holds(op, ordering),
                None => false,
            };
        }
        _ => return false,
    };
    match op {
        CmpOp::Eq => equal,
        CmpOp::Ne => !equal,
        CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge => false,
    }
}

fn holds(op: CmpOp, ordering: Ordering) -> bool {
    match op {
        CmpOp::Eq => ordering == Ordering::Equal,
        CmpOp::Ne => ordering != Ordering::Equal,
        CmpOp::Lt => ordering == Ordering::Less,
        CmpOp::Le => ordering != Ordering::Greater,
        CmpOp::Gt => ordering == Ordering::Greater,
        CmpOp::Ge => ordering != Ordering::Less,
    }
}

impl Operand {
    fn read<'a>(&'a self, event: &'a Value) -> Option<Scalar<'a>> {
        match self {
            Operand::Reference(r) => r.read(event),
            Operand::Literal(l) => Some(Scalar::of_literal(l)),
        }
    }
}

impl Reference {
    fn read<'a>(&self, event: &'a Value) -> Option<Scalar<'a>> {
        let value = match self {
            Reference::Attribute(name) => event.as_object()?.get(*name)?,
            Reference::Body(path) => {
                let mut at = event.as_object()?.get("data")?;
                for segment in path {
                    // Objects only: ADT does not filter on fields inside arrays.
                    at = at.as_object()?.get(segment.as_str())?;
                }
                at
            }
        };
        Some(Scalar::of_json(value))
    }

    fn parse(word: &str) -> Option<Reference> {
        if let Some(name) = ATTRIBUTES.iter().find(|a| **a == word) {
            return Some(Reference::Attribute(name));
        }
        let path = BODY_PREFIXES.iter().find_map(|p| word.strip_prefix(p))?;
        let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return None;
        }
        Some(Reference::Body(segments))
    }
}

// ----- text to tokens -----

#[derive(Debug, Clone, PartialEq)]
enum Token<'s> {
    Word(&'s str),
    Str(&'s str),
    Num(Num),
    Op(CmpOp),
    Open,
    Close,
    Comma,
}

fn is_word_start(c: char) -> bool {
    c.is_alphabetic() || c == '$' || c == '_'
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '$' | '_' | '.')
}

/// Splits `text` into tokens. It only ever splits at the char boundaries that `find` and
/// `char_indices` report, through the checked `split_at_checked`, so no input can make it slice
/// inside a character.
fn tokenize(text: &str) -> DomainResult<Vec<Token<'_>>> {
    let mut tokens = Vec::new();
    let mut rest = text.trim_start();
    while let Some(c) = rest.chars().next() {
        let len = match c {
            '(' | ')' | ',' | '=' => {
                tokens.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    ',' => Token::Comma,
                    _ => Token::Op(CmpOp::Eq),
                });
                1
            }
            '!' | '<' | '>' => {
                let two = rest.as_bytes().get(1) == Some(&b'=');
                let op = match (c, two) {
                    ('!', true) => CmpOp::Ne,
                    ('<', false) => CmpOp::Lt,
                    ('<', true) => CmpOp::Le,
                    ('>', false) => CmpOp::Gt,
                    ('>', true) => CmpOp::Ge,
                    _ => return Err(invalid("'!' must be followed by '='")),
                };
                tokens.push(Token::Op(op));
                if two { 2 } else { 1 }
            }
            '\'' | '"' => {
                let body = rest.get(1..).unwrap_or_default();
                let end = body.find(c).ok_or_else(|| invalid("unterminated string"))?;
                tokens.push(Token::Str(body.get(..end).unwrap_or_default()));
                end + 2
            }
            c if c.is_ascii_digit() || c == '-' => {
                let len = number_len(rest)?;
                let (number, after) = rest
                    .split_at_checked(len)
                    .ok_or_else(|| invalid("malformed number"))?;
                if after.starts_with(is_word_char) {
                    return Err(invalid("a number must not run into a name"));
                }
                tokens.push(Token::Num(parse_number(number)?));
                len
            }
            c if is_word_start(c) => {
                let len = rest.find(|d| !is_word_char(d)).unwrap_or(rest.len());
                tokens.push(Token::Word(rest.get(..len).unwrap_or_default()));
                len
            }
            _ => return Err(invalid("unexpected character")),
        };
        rest = rest
            .get(len..)
            .ok_or_else(|| invalid("malformed filter"))?
            .trim_start();
    }
    Ok(tokens)
}

/// The length in bytes of the number at the start of `text`: `-? digits (. digits)?
/// ([eE] [+-]? digits)?`. Every byte it counts is ASCII, so the length is a char boundary.
fn number_len(text: &str) -> DomainResult<usize> {
    let bytes = text.as_bytes();
    let digits_from = |i: usize| {
        bytes
            .iter()
            .skip(i)
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    let mut i = usize::from(bytes.first() == Some(&b'-'));
    let whole = digits_from(i);
    if whole == 0 {
        return Err(invalid("malformed number"));
    }
    i += whole;
    if bytes.get(i) == Some(&b'.') {
        let fraction = digits_from(i + 1);
        if fraction == 0 {
            return Err(invalid("malformed number"));
        }
        i += 1 + fraction;
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(bytes.get(i + 1), Some(b'+' | b'-')));
        let exponent = digits_from(i + 1 + sign);
        if exponent == 0 {
            return Err(invalid("malformed number"));
        }
        i += 1 + sign + exponent;
    }
    Ok(i)
}

fn parse_number(text: &str) -> DomainResult<Num> {
    if !text.contains(['.', 'e', 'E'])
        && let Ok(i) = text.parse::<i128>()
    {
        return Ok(Num::Int(i));
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(Num::Float(f)),
        _ => Err(invalid("number out of range")),
    }
}

// ----- tokens to the compiled form -----

struct Parser<'t, 's> {
    tokens: &'t [Token<'s>],
    pos: usize,
    /// Open parentheses around the current position.
    depth: usize,
}

impl<'s> Parser<'_, 's> {
    fn peek(&self) -> Option<&Token<'s>> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token<'s>> {
        let token = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        token
    }

    /// Consumes the keyword `word` (any case) if it comes next.
    fn eat_keyword(&mut self, word: &str) -> bool {
        let found = matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(word));
        if found {
            self.pos += 1;
        }
        found
    }

    fn or(&mut self) -> DomainResult<Expr> {
        let mut items = vec![self.and()?];
        while self.eat_keyword("OR") {
            items.push(self.and()?);
        }
        Ok(flatten(items, false))
    }

    fn and(&mut self) -> DomainResult<Expr> {
        let mut items = vec![self.not()?];
        while self.eat_keyword("AND") {
            items.push(self.not()?);
        }
        Ok(flatten(items, true))
    }

    /// `NOT` chains are counted rather than recursed into: only their parity matters.
    fn not(&mut self) -> DomainResult<Expr> {
        let mut negate = false;
        while self.eat_keyword("NOT") {
            negate = !negate;
        }
        let expr = self.primary()?;
        Ok(if negate {
            Expr::Not(Box::new(expr))
        } else {
            expr
        })
    }

    fn primary(&mut self) -> DomainResult<Expr> {
        match self.next() {
            Some(Token::Open) => {
                if self.depth >= MAX_DEPTH {
                    return Err(invalid("the filter is nested too deeply"));
                }
                self.depth += 1;
                let expr = self.or()?;
                self.depth -= 1;
                match self.next() {
                    Some(Token::Close) => Ok(expr),
                    _ => Err(invalid("missing ')'")),
                }
            }
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("true") => Ok(Expr::Const(true)),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("false") => Ok(Expr::Const(false)),
            Some(Token::Word(w)) if let Some(function) = function(w) => {
                self.expect(&Token::Open)?;
                let value = self.function_argument()?;
                self.expect(&Token::Comma)?;
                let text = self.function_argument()?;
                self.expect(&Token::Close)?;
                Ok(Expr::Call {
                    function,
                    value,
                    text,
                })
            }
            Some(Token::Word(w)) => {
                let left = Reference::parse(w)
                    .ok_or_else(|| invalid("expected an event attribute or a $body reference"))?;
                let Some(Token::Op(op)) = self.next() else {
                    return Err(invalid("expected a comparison operator"));
                };
                let right = self.operand()?;
                if matches!(op, CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge)
                    && matches!(right, Operand::Literal(ref l) if !matches!(l, Literal::Num(_)))
                {
                    return Err(invalid("'<', '<=', '>' and '>=' compare numbers only"));
                }
                Ok(Expr::Compare { left, op, right })
            }
            _ => Err(invalid("expected a condition")),
        }
    }

    fn operand(&mut self) -> DomainResult<Operand> {
        let literal = match self.next() {
            Some(Token::Str(s)) => Literal::Str(s.to_owned()),
            Some(Token::Num(n)) => Literal::Num(n),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("true") => Literal::Bool(true),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("false") => Literal::Bool(false),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("null") => Literal::Null,
            Some(Token::Word(w)) => {
                return Reference::parse(w)
                    .map(Operand::Reference)
                    .ok_or_else(|| invalid("expected a value"));
            }
            _ => return Err(invalid("expected a value")),
        };
        Ok(Operand::Literal(literal))
    }

    fn function_argument(&mut self) -> DomainResult<Operand> {
        let operand = self.operand()?;
        if matches!(operand, Operand::Literal(ref l) if !matches!(l, Literal::Str(_))) {
            return Err(invalid("STARTS_WITH, ENDS_WITH and CONTAINS take strings"));
        }
        Ok(operand)
    }

    fn expect(&mut self, token: &Token<'_>) -> DomainResult<()> {
        if self.next().as_ref() == Some(token) {
            Ok(())
        } else {
            Err(invalid("malformed function call"))
        }
    }
}

fn function(word: &str) -> Option<Function> {
    [
        ("STARTS_WITH", Function::StartsWith),
        ("ENDS_WITH", Function::EndsWith),
        ("CONTAINS", Function::Contains),
    ]
    .into_iter()
    .find(|(name, _)| name.eq_ignore_ascii_case(word))
    .map(|(_, f)| f)
}

/// One operand stays itself; more become one flat `AND` (or `OR`), absorbing nested ones of the
/// same kind (from parentheses), so `a AND (b AND c)` and `a AND b AND c` compile alike.
fn flatten(items: Vec<Expr>, and: bool) -> Expr {
    let mut flat = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Expr::And(inner) if and => flat.extend(inner),
            Expr::Or(inner) if !and => flat.extend(inner),
            other => flat.push(other),
        }
    }
    if flat.len() == 1
        && let Some(only) = flat.pop()
    {
        return only;
    }
    if and { Expr::And(flat) } else { Expr::Or(flat) }
}

#[cfg(test)]
mod tests;
