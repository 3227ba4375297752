//! Splits query text into tokens. Positions are character offsets, so error messages point at the
//! same place a client's editor does.

use serde_json::Number;

use super::error::{QueryError, excerpt};

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    /// A name. `escaped` names were written `[[like this]]` and are never keywords.
    Ident {
        name: String,
        escaped: bool,
    },
    Str(String),
    Num(Number),
    Star,
    Comma,
    Dot,
    DotDot,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Minus,
    Colon,
    Pipe,
    Eof,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub tok: Tok,
    pub pos: usize,
}

impl Tok {
    /// How the token reads in an error message.
    pub fn describe(&self) -> String {
        match self {
            Tok::Ident { name, .. } => format!("'{}'", excerpt(name)),
            Tok::Str(s) => format!("string '{}'", excerpt(s)),
            Tok::Num(n) => format!("number {n}"),
            Tok::Star => "'*'".into(),
            Tok::Comma => "','".into(),
            Tok::Dot => "'.'".into(),
            Tok::DotDot => "'..'".into(),
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::LBracket => "'['".into(),
            Tok::RBracket => "']'".into(),
            Tok::Eq => "'='".into(),
            Tok::Ne => "'!='".into(),
            Tok::Lt => "'<'".into(),
            Tok::Gt => "'>'".into(),
            Tok::Le => "'<='".into(),
            Tok::Ge => "'>='".into(),
            Tok::Minus => "'-'".into(),
            Tok::Colon => "':'".into(),
            Tok::Pipe => "'|'".into(),
            Tok::Eof => "the end of the query".into(),
        }
    }
}

pub(crate) fn tokenize(text: &str) -> Result<Vec<Token>, QueryError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let next = chars.get(i + 1).copied();
        let (tok, len) = match c {
            '*' => (Tok::Star, 1),
            ',' => (Tok::Comma, 1),
            '.' if next == Some('.') => (Tok::DotDot, 2),
            '.' => (Tok::Dot, 1),
            '(' => (Tok::LParen, 1),
            ')' => (Tok::RParen, 1),
            '[' if next == Some('[') => {
                let (name, len) = escaped_ident(&chars, i)?;
                (
                    Tok::Ident {
                        name,
                        escaped: true,
                    },
                    len,
                )
            }
            '[' => (Tok::LBracket, 1),
            ']' => (Tok::RBracket, 1),
            '=' => (Tok::Eq, 1),
            '!' if next == Some('=') => (Tok::Ne, 2),
            '<' if next == Some('=') => (Tok::Le, 2),
            '<' if next == Some('>') => (Tok::Ne, 2),
            '<' => (Tok::Lt, 1),
            '>' if next == Some('=') => (Tok::Ge, 2),
            '>' => (Tok::Gt, 1),
            '-' => (Tok::Minus, 1),
            ':' => (Tok::Colon, 1),
            '|' => (Tok::Pipe, 1),
            '\'' | '"' => {
                let (s, len) = string(&chars, i)?;
                (Tok::Str(s), len)
            }
            c if c.is_ascii_digit() => number(&chars, i)?,
            c if is_ident_start(c) => {
                let len = chars[i..].iter().take_while(|c| is_ident_char(**c)).count();
                (
                    Tok::Ident {
                        name: chars[i..i + len].iter().collect(),
                        escaped: false,
                    },
                    len,
                )
            }
            other => {
                return Err(QueryError::syntax(
                    format!("unexpected character '{other}'"),
                    start,
                ));
            }
        };
        tokens.push(Token { tok, pos: start });
        i += len;
    }
    tokens.push(Token {
        tok: Tok::Eof,
        pos: chars.len(),
    });
    Ok(tokens)
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == '$'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '$'
}

/// `[[name]]`: any characters but `]]`.
fn escaped_ident(chars: &[char], start: usize) -> Result<(String, usize), QueryError> {
    let body = start + 2;
    let mut j = body;
    while j + 1 < chars.len() {
        if chars[j] == ']' && chars[j + 1] == ']' {
            if j == body {
                return Err(QueryError::syntax(
                    "an escaped name '[[...]]' is empty",
                    start,
                ));
            }
            return Ok((chars[body..j].iter().collect(), j + 2 - start));
        }
        j += 1;
    }
    Err(QueryError::syntax("'[[' is not closed by ']]'", start))
}

/// A string in single or double quotes, with JSON-style backslash escapes.
fn string(chars: &[char], start: usize) -> Result<(String, usize), QueryError> {
    let quote = chars[start];
    let mut out = String::new();
    let mut j = start + 1;
    while let Some(&c) = chars.get(j) {
        match c {
            c if c == quote => return Ok((out, j + 1 - start)),
            '\\' => {
                let Some(&e) = chars.get(j + 1) else { break };
                let decoded = match e {
                    '\\' | '\'' | '"' | '/' => e,
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    'u' => {
                        let hex: String =
                            chars.get(j + 2..j + 6).unwrap_or_default().iter().collect();
                        let code = u32::from_str_radix(&hex, 16)
                            .ok()
                            .filter(|_| hex.len() == 4);
                        match code.and_then(char::from_u32) {
                            Some(ch) => {
                                out.push(ch);
                                j += 6;
                                continue;
                            }
                            None => {
                                return Err(QueryError::syntax(
                                    "'\\u' must be followed by four hex digits of a character",
                                    j,
                                ));
                            }
                        }
                    }
                    other => {
                        return Err(QueryError::syntax(
                            format!("unknown escape '\\{other}' in a string"),
                            j,
                        ));
                    }
                };
                out.push(decoded);
                j += 2;
            }
            c => {
                out.push(c);
                j += 1;
            }
        }
    }
    Err(QueryError::syntax("this string is not closed", start))
}

/// Digits, an optional fraction (only if a digit follows the dot, so `1..3` stays a range) and
/// an optional exponent.
fn number(chars: &[char], start: usize) -> Result<(Tok, usize), QueryError> {
    let digits = |from: usize| {
        chars[from..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count()
    };
    let mut j = start + digits(start);
    let mut integer = true;
    if chars.get(j) == Some(&'.') && chars.get(j + 1).is_some_and(char::is_ascii_digit) {
        integer = false;
        j += 1 + digits(j + 1);
    }
    if matches!(chars.get(j), Some('e' | 'E')) {
        let mut k = j + 1;
        if matches!(chars.get(k), Some('+' | '-')) {
            k += 1;
        }
        let n = digits(k);
        if n > 0 {
            integer = false;
            j = k + n;
        }
    }
    if chars.get(j).is_some_and(|c| is_ident_char(*c)) {
        return Err(QueryError::syntax("a number runs into a name", start));
    }
    let text: String = chars[start..j].iter().collect();
    let parsed = if integer {
        text.parse::<u64>().ok().map(Number::from)
    } else {
        None
    };
    let number = match parsed {
        Some(n) => n,
        None => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .ok_or_else(|| {
                QueryError::syntax(format!("'{}' is not a number", excerpt(&text)), start)
            })?,
    };
    Ok((Tok::Num(number), j - start))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(text: &str) -> Vec<Tok> {
        tokenize(text).unwrap().into_iter().map(|t| t.tok).collect()
    }

    fn ident(name: &str) -> Tok {
        Tok::Ident {
            name: name.into(),
            escaped: false,
        }
    }

    #[test]
    fn punctuation_and_names_are_split_with_character_positions() {
        let tokens = tokenize("é T.$dtId").unwrap_err();
        assert_eq!(tokens.position, Some(0));
        let tokens = tokenize("T.$dtId >= 'x'").unwrap();
        let positions: Vec<usize> = tokens.iter().map(|t| t.pos).collect();
        assert_eq!(positions, vec![0, 1, 2, 8, 11, 14]);
    }

    #[test]
    fn match_arrows_lex_as_single_characters() {
        assert_eq!(
            toks("(a)<-[r]-(b)-[]->(c)"),
            vec![
                Tok::LParen,
                ident("a"),
                Tok::RParen,
                Tok::Lt,
                Tok::Minus,
                Tok::LBracket,
                ident("r"),
                Tok::RBracket,
                Tok::Minus,
                Tok::LParen,
                ident("b"),
                Tok::RParen,
                Tok::Minus,
                Tok::LBracket,
                Tok::RBracket,
                Tok::Minus,
                Tok::Gt,
                Tok::LParen,
                ident("c"),
                Tok::RParen,
                Tok::Eof
            ]
        );
    }

    #[test]
    fn hop_ranges_are_not_read_as_decimals() {
        assert_eq!(
            toks("*1..3"),
            vec![
                Tok::Star,
                Tok::Num(1.into()),
                Tok::DotDot,
                Tok::Num(3.into()),
                Tok::Eof
            ]
        );
        assert_eq!(toks("1.5")[0], Tok::Num(Number::from_f64(1.5).unwrap()));
        assert_eq!(toks("2e3")[0], Tok::Num(Number::from_f64(2000.0).unwrap()));
    }

    #[test]
    fn strings_take_either_quote_and_decode_escapes() {
        assert_eq!(
            toks(r#"'it\'s' "a\"b" '\u00e9\n'"#)[..3],
            [
                Tok::Str("it's".into()),
                Tok::Str("a\"b".into()),
                Tok::Str("é\n".into())
            ]
        );
    }

    #[test]
    fn unterminated_strings_and_bad_escapes_are_errors_with_positions() {
        assert_eq!(tokenize("x = 'abc").unwrap_err().position, Some(4));
        assert_eq!(tokenize("'a\\q'").unwrap_err().position, Some(2));
        assert_eq!(tokenize("'\\u12'").unwrap_err().position, Some(1));
        assert_eq!(tokenize("'\\").unwrap_err().position, Some(0));
    }

    #[test]
    fn double_brackets_escape_reserved_words() {
        assert_eq!(
            toks("[[Group]]")[0],
            Tok::Ident {
                name: "Group".into(),
                escaped: true
            }
        );
        assert!(tokenize("[[Group").is_err());
        assert!(tokenize("[[]]").is_err());
    }

    #[test]
    fn comparison_operators_include_the_sql_not_equal() {
        assert_eq!(
            toks("<> != <= >= < > ="),
            vec![
                Tok::Ne,
                Tok::Ne,
                Tok::Le,
                Tok::Ge,
                Tok::Lt,
                Tok::Gt,
                Tok::Eq,
                Tok::Eof
            ]
        );
    }

    #[test]
    fn huge_numbers_become_floats_and_malformed_ones_are_errors() {
        assert!(matches!(&toks("99999999999999999999999")[0], Tok::Num(n) if n.is_f64()));
        assert!(tokenize("12abc").is_err());
        assert!(tokenize("1e999").is_err());
    }
}
