//! Event route filters. A filter is `true`, `false`, or a boolean expression over the event's
//! CloudEvents attributes (`type`, `source`, `subject`, `id`, `specversion`, `dataschema`,
//! `datacontenttype`) with `=`, `!=`, `<`, `>`, `<=`, `>=`, `AND`, `OR`, `NOT`, parentheses and the
//! functions `STARTS_WITH`, `ENDS_WITH` and `CONTAINS`, as the ADT event route filter reference
//! describes. Routes are stored now; delivery comes with the event pipeline.

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
const FUNCTIONS: &[&str] = &["STARTS_WITH", "ENDS_WITH", "CONTAINS"];

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str,
    Number,
    Op,
    Open,
    Close,
    Comma,
}

/// Checks that `filter` is a well-formed event route filter.
pub fn check_filter(filter: &str) -> DomainResult<()> {
    if filter.trim().is_empty() || filter.len() > MAX_FILTER_LEN {
        return Err(invalid("the filter must be 1 to 2048 characters"));
    }
    let tokens = tokenize(filter)?;
    let mut parser = Parser {
        tokens: &tokens,
        pos: 0,
    };
    parser.expression(0)?;
    if parser.pos != tokens.len() {
        return Err(invalid("unexpected text after the end of the filter"));
    }
    Ok(())
}

fn invalid(message: &str) -> DomainError {
    DomainError::RouteFilterInvalid(message.to_owned())
}

fn tokenize(s: &str) -> DomainResult<Vec<Token>> {
    let chars: Vec<char> = s.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => (tokens.push(Token::Open), i += 1).1,
            ')' => (tokens.push(Token::Close), i += 1).1,
            ',' => (tokens.push(Token::Comma), i += 1).1,
            '\'' | '"' => {
                let end = chars[i + 1..]
                    .iter()
                    .position(|&d| d == c)
                    .ok_or_else(|| invalid("unterminated string"))?;
                tokens.push(Token::Str);
                i += end + 2;
            }
            '=' => (tokens.push(Token::Op), i += 1).1,
            '!' | '<' | '>' => {
                let two = chars.get(i + 1) == Some(&'=');
                if c == '!' && !two {
                    return Err(invalid("'!' must be followed by '='"));
                }
                tokens.push(Token::Op);
                i += if two { 2 } else { 1 };
            }
            c if c.is_ascii_digit() || c == '-' => {
                let len = chars[i..]
                    .iter()
                    .take_while(|d| d.is_ascii_digit() || matches!(d, '.' | '-'))
                    .count();
                tokens.push(Token::Number);
                i += len;
            }
            c if c.is_alphabetic() || c == '$' || c == '_' => {
                let len = chars[i..]
                    .iter()
                    .take_while(|d| d.is_alphanumeric() || matches!(d, '$' | '_' | '.'))
                    .count();
                tokens.push(Token::Word(chars[i..i + len].iter().collect()));
                i += len;
            }
            _ => return Err(invalid("unexpected character")),
        }
    }
    Ok(tokens)
}

struct Parser<'t> {
    tokens: &'t [Token],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<&Token> {
        let t = self.tokens.get(self.pos);
        self.pos += 1;
        t
    }

    fn keyword(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(word))
    }

    fn expression(&mut self, depth: usize) -> DomainResult<()> {
        if depth > MAX_DEPTH {
            return Err(invalid("the filter is nested too deeply"));
        }
        self.term(depth)?;
        while self.keyword("AND") || self.keyword("OR") {
            self.pos += 1;
            self.term(depth)?;
        }
        Ok(())
    }

    fn term(&mut self, depth: usize) -> DomainResult<()> {
        if self.keyword("NOT") {
            self.pos += 1;
            return self.term(depth + 1);
        }
        if self.keyword("true") || self.keyword("false") {
            self.pos += 1;
            return Ok(());
        }
        match self.next().cloned() {
            Some(Token::Open) => {
                self.expression(depth + 1)?;
                match self.next() {
                    Some(Token::Close) => Ok(()),
                    _ => Err(invalid("missing ')'")),
                }
            }
            Some(Token::Word(w)) if FUNCTIONS.iter().any(|f| f.eq_ignore_ascii_case(&w)) => {
                self.expect(Token::Open)?;
                self.operand()?;
                self.expect(Token::Comma)?;
                self.operand()?;
                self.expect(Token::Close)
            }
            Some(Token::Word(w)) if is_attribute(&w) => {
                if !matches!(self.next(), Some(Token::Op)) {
                    return Err(invalid("expected a comparison operator"));
                }
                self.operand()
            }
            _ => Err(invalid("expected a condition")),
        }
    }

    fn operand(&mut self) -> DomainResult<()> {
        match self.next() {
            Some(Token::Str | Token::Number) => Ok(()),
            Some(Token::Word(w)) if is_attribute(w) || w == "true" || w == "false" => Ok(()),
            _ => Err(invalid("expected a value")),
        }
    }

    fn expect(&mut self, token: Token) -> DomainResult<()> {
        if self.next() == Some(&token) {
            Ok(())
        } else {
            Err(invalid("malformed function call"))
        }
    }
}

fn is_attribute(word: &str) -> bool {
    ATTRIBUTES.contains(&word) || word.starts_with("$body.") || word.starts_with("data.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_filter_shapes_are_accepted() {
        for ok in [
            "true",
            "type = 'Microsoft.DigitalTwins.Twin.Create'",
            "type = 'Microsoft.DigitalTwins.Twin.Create' OR type = 'Microsoft.DigitalTwins.Twin.Delete'",
            "STARTS_WITH(source, 'factory') AND NOT (subject = 'x')",
            "$body.temperature > 20",
        ] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn malformed_filters_are_rejected() {
        for bad in [
            "",
            "type =",
            "type = 'x",
            "foo = 'x'",
            "(type = 'a'",
            "type = 'a' AND",
            "DROP TABLE",
            &"(".repeat(100),
        ] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
    }
}
