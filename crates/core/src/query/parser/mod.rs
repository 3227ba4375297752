//! Recursive-descent parser. Collections are declared by `FROM`, `JOIN` and `MATCH` and resolved
//! as they are used; every limit on the query's shape is enforced here, before any work is done.

mod expr;

use super::ast::{Direction, Edge, Query, Select, SelectItem, Source, Var};
use super::ast::{VarId, VarKind};
use super::error::{QueryError, excerpt};
use super::lexer::{Tok, Token, tokenize};
use super::limits;

/// Words that end or structure a clause; they are names only when escaped as `[[word]]`.
const RESERVED: &[&str] = &[
    "SELECT", "FROM", "WHERE", "JOIN", "RELATED", "MATCH", "AND", "OR", "NOT", "IN", "NIN", "AS",
    "TOP", "COUNT", "TRUE", "FALSE", "NULL",
];

pub(crate) fn parse(text: &str) -> Result<Query, QueryError> {
    let length = text.chars().count();
    if length > limits::MAX_QUERY_CHARS {
        return Err(QueryError::syntax(
            format!(
                "the query has {length} characters; at most {} are allowed",
                limits::MAX_QUERY_CHARS
            ),
            limits::MAX_QUERY_CHARS,
        ));
    }
    let tokens = tokenize(text)?;
    Parser {
        tokens,
        i: 0,
        depth: 0,
        logical_ops: 0,
        vars: Vec::new(),
        default_var: None,
    }
    .query()
}

/// A property path in the SELECT list, resolved once FROM has declared the collections.
struct RawItem {
    segments: Vec<String>,
    alias: Option<String>,
    pos: usize,
}

enum RawSelect {
    Star,
    Count(String),
    Items(Vec<RawItem>),
}

struct Parser {
    tokens: Vec<Token>,
    i: usize,
    depth: usize,
    logical_ops: usize,
    vars: Vec<Var>,
    default_var: Option<VarId>,
}

impl Parser {
    // ---- token helpers ----

    fn peek(&self) -> &Token {
        self.peek_at(0)
    }

    fn peek_at(&self, ahead: usize) -> &Token {
        // The token list always ends with `Eof`, which is returned for any index past it.
        let last = self.tokens.len().saturating_sub(1);
        &self.tokens[(self.i + ahead).min(last)]
    }

    fn pos(&self) -> usize {
        self.peek().pos
    }

    fn bump(&mut self) -> Token {
        let token = self.peek().clone();
        if self.i < self.tokens.len() {
            self.i += 1;
        }
        token
    }

    fn is_kw(&self, kw: &str) -> bool {
        is_kw(&self.peek().tok, kw)
    }

    fn accept_kw(&mut self, kw: &str) -> bool {
        let found = self.is_kw(kw);
        if found {
            self.bump();
        }
        found
    }

    fn expect_kw(&mut self, kw: &str) -> Result<(), QueryError> {
        if self.accept_kw(kw) {
            Ok(())
        } else {
            Err(self.unexpected(&format!("'{kw}'")))
        }
    }

    fn accept(&mut self, tok: &Tok) -> bool {
        let found = &self.peek().tok == tok;
        if found {
            self.bump();
        }
        found
    }

    fn expect(&mut self, tok: &Tok) -> Result<(), QueryError> {
        if self.accept(tok) {
            Ok(())
        } else {
            Err(self.unexpected(&tok.describe()))
        }
    }

    fn unexpected(&self, wanted: &str) -> QueryError {
        let token = self.peek();
        QueryError::syntax(
            format!("expected {wanted} but found {}", token.tok.describe()),
            token.pos,
        )
    }

    /// A name usable for a collection or a property: any identifier but a reserved word.
    fn name(&mut self, what: &str) -> Result<String, QueryError> {
        match &self.peek().tok {
            Tok::Ident { name, escaped } if *escaped || !is_reserved(name) => {
                let name = name.clone();
                self.bump();
                Ok(name)
            }
            _ => Err(self.unexpected(what)),
        }
    }

    /// A name after `.` or in a MATCH relationship list: reserved words are fine there.
    fn any_name(&mut self, what: &str) -> Result<String, QueryError> {
        match &self.peek().tok {
            Tok::Ident { name, .. } => {
                let name = name.clone();
                self.bump();
                Ok(name)
            }
            _ => Err(self.unexpected(what)),
        }
    }

    fn at_name(&self) -> bool {
        matches!(&self.peek().tok, Tok::Ident { name, escaped } if *escaped || !is_reserved(name))
    }

    fn enter(&mut self) -> Result<(), QueryError> {
        self.depth += 1;
        if self.depth > limits::MAX_NESTING {
            return Err(QueryError::syntax(
                format!(
                    "expressions nest more than {} levels deep",
                    limits::MAX_NESTING
                ),
                self.pos(),
            ));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    // ---- clauses ----

    fn query(mut self) -> Result<Query, QueryError> {
        self.expect_kw("SELECT")?;
        let (top, raw_select, select_pos) = self.select()?;
        self.expect_kw("FROM")?;
        let (source, is_match) = self.from()?;
        if self.vars.len() == 1 {
            self.default_var = Some(0);
        }
        let filter = if self.accept_kw("WHERE") {
            Some(self.expr()?)
        } else {
            None
        };
        if self.peek().tok != Tok::Eof {
            return Err(self.unexpected("the end of the query"));
        }
        let joins = matches!(&source, Source::Twins { edges, .. } if !edges.is_empty());
        let select = match raw_select {
            RawSelect::Star if joins && !is_match => {
                return Err(QueryError::syntax(
                    "'SELECT *' cannot be used with JOIN; name the collections to return",
                    select_pos,
                ));
            }
            RawSelect::Star => Select::Star,
            RawSelect::Count(name) => Select::Count { name },
            RawSelect::Items(items) => Select::Items(self.resolve_items(items)?),
        };
        Ok(Query {
            select,
            top,
            source,
            filter,
            vars: self.vars,
            is_match,
        })
    }

    fn select(&mut self) -> Result<(Option<u64>, RawSelect, usize), QueryError> {
        let mut top = None;
        if self.is_kw("TOP") && self.peek_at(1).tok == Tok::LParen {
            self.bump();
            self.bump();
            let pos = self.pos();
            top = Some(match self.bump().tok {
                Tok::Num(n) => n.as_u64().ok_or_else(|| {
                    QueryError::syntax("TOP takes a whole number of at least 0", pos)
                })?,
                other => {
                    return Err(QueryError::syntax(
                        format!("expected a number but found {}", other.describe()),
                        pos,
                    ));
                }
            });
            self.expect(&Tok::RParen)?;
        }
        let pos = self.pos();
        if top.is_some() && self.is_kw("FROM") {
            return Ok((top, RawSelect::Star, pos));
        }
        if self.accept(&Tok::Star) {
            return Ok((top, RawSelect::Star, pos));
        }
        if self.is_kw("COUNT") && self.peek_at(1).tok == Tok::LParen {
            if top.is_some() {
                return Err(QueryError::syntax(
                    "TOP and COUNT() cannot be combined",
                    pos,
                ));
            }
            self.bump();
            self.bump();
            self.expect(&Tok::RParen)?;
            let name = if self.accept_kw("AS") {
                self.name("a name")?
            } else {
                "COUNT".into()
            };
            return Ok((top, RawSelect::Count(name), pos));
        }
        let mut items = Vec::new();
        loop {
            if items.len() == limits::MAX_SELECT_ITEMS {
                return Err(QueryError::syntax(
                    format!(
                        "at most {} columns can be selected",
                        limits::MAX_SELECT_ITEMS
                    ),
                    self.pos(),
                ));
            }
            let pos = self.pos();
            let segments = self.path_segments("a collection, a property, '*' or COUNT()")?;
            let alias = if self.accept_kw("AS") {
                Some(self.name("a name")?)
            } else {
                None
            };
            items.push(RawItem {
                segments,
                alias,
                pos,
            });
            if !self.accept(&Tok::Comma) {
                break;
            }
        }
        Ok((top, RawSelect::Items(items), pos))
    }

    fn path_segments(&mut self, what: &str) -> Result<Vec<String>, QueryError> {
        let mut segments = vec![self.name(what)?];
        while self.accept(&Tok::Dot) {
            if segments.len() == limits::MAX_PATH_SEGMENTS {
                return Err(QueryError::syntax(
                    "this property path is too long",
                    self.pos(),
                ));
            }
            segments.push(self.any_name("a property name")?);
        }
        Ok(segments)
    }

    fn resolve_items(&self, items: Vec<RawItem>) -> Result<Vec<SelectItem>, QueryError> {
        let mut out: Vec<SelectItem> = Vec::with_capacity(items.len());
        for item in items {
            let (var, path) = self.resolve(item.segments, item.pos)?;
            let key = match (item.alias, path.last()) {
                (Some(alias), _) => alias,
                (None, Some(last)) => last.clone(),
                (None, None) => self.vars[var].name.clone().unwrap_or_default(),
            };
            if out.iter().any(|o| o.key == key) {
                return Err(QueryError::syntax(
                    format!(
                        "the column '{}' is selected twice; rename one with AS",
                        excerpt(&key)
                    ),
                    item.pos,
                ));
            }
            out.push(SelectItem { key, var, path });
        }
        Ok(out)
    }

    fn resolve(
        &self,
        mut segments: Vec<String>,
        pos: usize,
    ) -> Result<(VarId, Vec<String>), QueryError> {
        let first = segments.first().map(String::as_str).unwrap_or_default();
        if let Some(var) = self.var_named(first) {
            segments.remove(0);
            return Ok((var, segments));
        }
        match self.default_var {
            Some(var) => Ok((var, segments)),
            None => Err(QueryError::syntax(
                format!(
                    "'{}' is not a collection of this query; use one of: {}",
                    excerpt(first),
                    self.var_names()
                ),
                pos,
            )),
        }
    }

    fn var_named(&self, name: &str) -> Option<VarId> {
        self.vars
            .iter()
            .position(|v| v.name.as_deref() == Some(name))
    }

    fn var_names(&self) -> String {
        let names: Vec<&str> = self.vars.iter().filter_map(|v| v.name.as_deref()).collect();
        if names.is_empty() {
            "(none)".into()
        } else {
            names.join(", ")
        }
    }

    fn declare(
        &mut self,
        name: Option<String>,
        kind: VarKind,
        pos: usize,
    ) -> Result<VarId, QueryError> {
        if let Some(n) = &name
            && self.var_named(n).is_some()
        {
            return Err(QueryError::syntax(
                format!("the collection '{}' is declared twice", excerpt(n)),
                pos,
            ));
        }
        if self.vars.len() == limits::MAX_COLLECTIONS {
            return Err(QueryError::syntax(
                format!(
                    "a query can name at most {} collections",
                    limits::MAX_COLLECTIONS
                ),
                pos,
            ));
        }
        self.vars.push(Var { name, kind });
        Ok(self.vars.len() - 1)
    }

    fn optional_alias(&mut self) -> Result<Option<String>, QueryError> {
        if self.accept_kw("AS") {
            return self.name("a collection name").map(Some);
        }
        if self.at_name() {
            self.name("a collection name").map(Some)
        } else {
            Ok(None)
        }
    }

    fn from(&mut self) -> Result<(Source, bool), QueryError> {
        if self.accept_kw("RELATIONSHIPS") {
            let pos = self.pos();
            let alias = self.optional_alias()?;
            let var = self.declare(alias, VarKind::Relationship, pos)?;
            if self.is_kw("JOIN") || self.is_kw("MATCH") {
                return Err(QueryError::syntax(
                    "FROM RELATIONSHIPS cannot be combined with JOIN or MATCH",
                    self.pos(),
                ));
            }
            return Ok((Source::Relationships { var }, false));
        }
        if !self.accept_kw("DIGITALTWINS") {
            return Err(self.unexpected("DIGITALTWINS or RELATIONSHIPS"));
        }
        let pos = self.pos();
        let alias = self.optional_alias()?;
        if self.is_kw("MATCH") {
            if alias.is_some() {
                return Err(QueryError::syntax(
                    "a MATCH query names its twins in the pattern, not after DIGITALTWINS",
                    pos,
                ));
            }
            self.bump();
            return Ok((self.pattern()?, true));
        }
        let root = self.declare(alias, VarKind::Twin, pos)?;
        let mut edges = Vec::new();
        while self.is_kw("JOIN") {
            let join_pos = self.pos();
            self.bump();
            if edges.len() == limits::MAX_JOINS {
                return Err(QueryError::syntax(
                    format!("a query can have at most {} JOINs", limits::MAX_JOINS),
                    join_pos,
                ));
            }
            edges.push(self.join()?);
        }
        if self.is_kw("MATCH") {
            return Err(QueryError::syntax(
                "JOIN and MATCH cannot be combined",
                self.pos(),
            ));
        }
        Ok((Source::Twins { root, edges }, false))
    }

    /// `JOIN target RELATED source.relationshipName [relationshipAlias]`
    fn join(&mut self) -> Result<Edge, QueryError> {
        let target_pos = self.pos();
        let target_name = self.name("a collection name")?;
        self.expect_kw("RELATED")?;
        let source_pos = self.pos();
        let source_name = self.name("a collection name")?;
        let from = match self.var_named(&source_name) {
            Some(v) if self.vars[v].kind == VarKind::Twin => v,
            Some(_) => {
                return Err(QueryError::syntax(
                    format!(
                        "'{}' is a relationship collection, not twins",
                        excerpt(&source_name)
                    ),
                    source_pos,
                ));
            }
            None => {
                return Err(QueryError::syntax(
                    format!(
                        "'{}' is not a collection of this query",
                        excerpt(&source_name)
                    ),
                    source_pos,
                ));
            }
        };
        self.expect(&Tok::Dot)?;
        let name = self.any_name("a relationship name")?;
        let to = self.declare(Some(target_name), VarKind::Twin, target_pos)?;
        let rel_pos = self.pos();
        let rel_var = match self.optional_alias()? {
            Some(alias) => Some(self.declare(Some(alias), VarKind::Relationship, rel_pos)?),
            None => None,
        };
        Ok(Edge {
            from,
            to,
            direction: Direction::Out,
            names: vec![name],
            hops: None,
            rel_var,
        })
    }

    /// `(a)-[r:name|other*1..3]->(b)<-[]-(c)...`
    fn pattern(&mut self) -> Result<Source, QueryError> {
        let root = self.node()?;
        let mut edges = Vec::new();
        let mut left = root;
        while matches!(self.peek().tok, Tok::Minus | Tok::Lt) {
            if edges.len() == limits::MAX_MATCH_EDGES {
                return Err(QueryError::syntax(
                    format!(
                        "a MATCH pattern can have at most {} relationship conditions",
                        limits::MAX_MATCH_EDGES
                    ),
                    self.pos(),
                ));
            }
            let arrow_pos = self.pos();
            let pointing_left = self.accept(&Tok::Lt);
            self.expect(&Tok::Minus)?;
            self.expect(&Tok::LBracket)?;
            let (rel_name, names, hops) = self.edge_body()?;
            self.expect(&Tok::RBracket)?;
            self.expect(&Tok::Minus)?;
            let pointing_right = self.accept(&Tok::Gt);
            let direction = match (pointing_left, pointing_right) {
                (false, true) => Direction::Out,
                (true, false) => Direction::In,
                (false, false) => Direction::Both,
                (true, true) => {
                    return Err(QueryError::syntax(
                        "a relationship condition points one way or neither; chain two for both",
                        arrow_pos,
                    ));
                }
            };
            let rel_var = match rel_name {
                Some((name, pos)) => Some(self.declare(Some(name), VarKind::Relationship, pos)?),
                None => None,
            };
            let right = self.node()?;
            edges.push(Edge {
                from: left,
                to: right,
                direction,
                names,
                hops,
                rel_var,
            });
            left = right;
        }
        Ok(Source::Twins { root, edges })
    }

    fn node(&mut self) -> Result<VarId, QueryError> {
        let pos = self.pos();
        if self.accept(&Tok::LParen) {
            let name = if self.at_name() {
                Some(self.name("a twin name")?)
            } else {
                None
            };
            self.expect(&Tok::RParen)?;
            return self.declare(name, VarKind::Twin, pos);
        }
        let name = self.name("a twin in parentheses, like (twin)")?;
        self.declare(Some(name), VarKind::Twin, pos)
    }

    /// What is inside `[...]`: `[var][:names][*hops]`. A lone name is the relationship variable
    /// (`[r]`); a name followed by `|` or `*` starts the list of relationship names.
    #[allow(clippy::type_complexity)] // one private call site; a struct would only rename it
    fn edge_body(
        &mut self,
    ) -> Result<(Option<(String, usize)>, Vec<String>, Option<(u32, u32)>), QueryError> {
        let mut var = None;
        let mut names = Vec::new();
        let next = &self.peek_at(1).tok;
        if matches!(self.peek().tok, Tok::Ident { .. }) {
            let pos = self.pos();
            if *next == Tok::Colon || *next == Tok::RBracket {
                var = Some((self.name("a relationship variable")?, pos));
                if self.accept(&Tok::Colon) {
                    names = self.rel_names()?;
                }
            } else {
                names = self.rel_names()?;
            }
        } else if self.accept(&Tok::Colon) {
            names = self.rel_names()?;
        }
        let mut hops = None;
        let star_pos = self.pos();
        if self.accept(&Tok::Star) {
            let (min, max) = self.hops(star_pos)?;
            if (min, max) != (1, 1) {
                hops = Some((min, max));
            }
        }
        if let (Some((_, pos)), Some(_)) = (&var, hops) {
            return Err(QueryError::syntax(
                "a relationship variable can only be used with a single hop",
                *pos,
            ));
        }
        Ok((var, names, hops))
    }

    fn rel_names(&mut self) -> Result<Vec<String>, QueryError> {
        let mut names = vec![self.any_name("a relationship name")?];
        while self.accept(&Tok::Pipe) {
            if names.len() == limits::MAX_IN_ITEMS {
                return Err(QueryError::syntax(
                    "too many relationship names",
                    self.pos(),
                ));
            }
            names.push(self.any_name("a relationship name")?);
        }
        Ok(names)
    }

    /// `*n` is exactly n hops; `*n..m` is more than n and at most m (ADT excludes the starting
    /// limit); `*..m` is 1 to m. Returns inclusive bounds.
    fn hops(&mut self, star_pos: usize) -> Result<(u32, u32), QueryError> {
        let (min, max) = if self.accept(&Tok::DotDot) {
            (1, self.hop_count()?)
        } else {
            let start = self.hop_count()?;
            if self.accept(&Tok::DotDot) {
                let end = self.hop_count()?;
                (start.saturating_add(1), end)
            } else {
                (start, start)
            }
        };
        if min == 0 || min > max {
            return Err(QueryError::syntax(
                "this hop range contains no number of hops",
                star_pos,
            ));
        }
        if max > limits::MAX_HOPS {
            return Err(QueryError::syntax(
                format!(
                    "a relationship condition can span at most {} hops",
                    limits::MAX_HOPS
                ),
                star_pos,
            ));
        }
        Ok((min, max))
    }

    fn hop_count(&mut self) -> Result<u32, QueryError> {
        let pos = self.pos();
        match self.bump().tok {
            Tok::Num(n) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| QueryError::syntax("a hop count is a whole number", pos)),
            other => Err(QueryError::syntax(
                format!("expected a number of hops but found {}", other.describe()),
                pos,
            )),
        }
    }
}

fn is_kw(tok: &Tok, kw: &str) -> bool {
    matches!(tok, Tok::Ident { name, escaped: false } if name.eq_ignore_ascii_case(kw))
}

fn is_reserved(name: &str) -> bool {
    RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name))
}

fn negate(n: &serde_json::Number) -> Option<serde_json::Number> {
    if let Some(u) = n.as_u64() {
        if let Ok(i) = i64::try_from(u) {
            return Some(serde_json::Number::from(-i));
        }
        if u == i64::MIN.unsigned_abs() {
            return Some(serde_json::Number::from(i64::MIN));
        }
    }
    n.as_f64().and_then(|f| serde_json::Number::from_f64(-f))
}
