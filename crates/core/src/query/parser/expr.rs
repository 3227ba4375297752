//! Conditions: `OR` over `AND` over `NOT` over comparisons, with functions and literals.

use serde_json::Value;

use super::{Parser, is_kw, negate};
use crate::dtmi::Dtmi;
use crate::query::ast::{CmpOp, Expr, Func, VarKind};
use crate::query::error::{QueryError, excerpt};
use crate::query::lexer::Tok;
use crate::query::limits;

impl Parser {
    pub(super) fn expr(&mut self) -> Result<Expr, QueryError> {
        self.enter()?;
        let mut terms = vec![self.and()?];
        while self.is_kw("OR") {
            self.count_logical()?;
            terms.push(self.and()?);
        }
        self.leave();
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::Or(terms)
        })
    }

    fn and(&mut self) -> Result<Expr, QueryError> {
        let mut terms = vec![self.not()?];
        while self.is_kw("AND") {
            self.count_logical()?;
            terms.push(self.not()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::And(terms)
        })
    }

    fn count_logical(&mut self) -> Result<(), QueryError> {
        self.logical_ops += 1;
        if self.logical_ops > limits::MAX_LOGICAL_OPS {
            return Err(QueryError::syntax(
                format!(
                    "a query can have at most {} AND/OR operators",
                    limits::MAX_LOGICAL_OPS
                ),
                self.pos(),
            ));
        }
        self.bump();
        Ok(())
    }

    fn not(&mut self) -> Result<Expr, QueryError> {
        let mut nots = 0;
        while self.is_kw("NOT") {
            self.enter()?;
            self.bump();
            nots += 1;
        }
        let mut e = self.comparison()?;
        for _ in 0..nots {
            e = Expr::Not(Box::new(e));
            self.leave();
        }
        Ok(e)
    }

    fn comparison(&mut self) -> Result<Expr, QueryError> {
        let left = self.operand()?;
        let op = match self.peek().tok {
            Tok::Eq => Some(CmpOp::Eq),
            Tok::Ne => Some(CmpOp::Ne),
            Tok::Lt => Some(CmpOp::Lt),
            Tok::Gt => Some(CmpOp::Gt),
            Tok::Le => Some(CmpOp::Le),
            Tok::Ge => Some(CmpOp::Ge),
            _ => None,
        };
        if let Some(op) = op {
            self.bump();
            let right = self.operand()?;
            return Ok(Expr::Compare(op, Box::new(left), Box::new(right)));
        }
        let negated = if self.accept_kw("IN") {
            false
        } else if self.accept_kw("NIN") {
            true
        } else if self.is_kw("NOT") && is_kw(&self.peek_at(1).tok, "IN") {
            self.bump();
            self.bump();
            true
        } else {
            return Ok(left);
        };
        let list = self.list()?;
        Ok(Expr::In {
            expr: Box::new(left),
            list,
            negated,
        })
    }

    fn list(&mut self) -> Result<Vec<Value>, QueryError> {
        let close = if self.accept(&Tok::LBracket) {
            Tok::RBracket
        } else if self.accept(&Tok::LParen) {
            Tok::RParen
        } else {
            return Err(self.unexpected("a list like ['a', 'b']"));
        };
        let mut items = Vec::new();
        if self.accept(&close) {
            return Ok(items);
        }
        loop {
            if items.len() == limits::MAX_IN_ITEMS {
                return Err(QueryError::syntax(
                    format!(
                        "an IN list can hold at most {} values",
                        limits::MAX_IN_ITEMS
                    ),
                    self.pos(),
                ));
            }
            match self.literal()? {
                Some(v) => items.push(v),
                None => return Err(self.unexpected("a string, number, true, false or null")),
            }
            if !self.accept(&Tok::Comma) {
                break;
            }
        }
        self.expect(&close)?;
        Ok(items)
    }

    fn literal(&mut self) -> Result<Option<Value>, QueryError> {
        let value = match &self.peek().tok {
            Tok::Str(s) => Value::String(s.clone()),
            Tok::Num(n) => Value::Number(n.clone()),
            Tok::Minus => {
                let pos = self.pos();
                let Tok::Num(n) = &self.peek_at(1).tok else {
                    return Err(QueryError::syntax("'-' must be followed by a number", pos));
                };
                let negated = negate(n)
                    .ok_or_else(|| QueryError::syntax("this number is out of range", pos))?;
                self.bump();
                Value::Number(negated)
            }
            t if is_kw(t, "TRUE") => Value::Bool(true),
            t if is_kw(t, "FALSE") => Value::Bool(false),
            t if is_kw(t, "NULL") => Value::Null,
            _ => return Ok(None),
        };
        self.bump();
        Ok(Some(value))
    }

    fn operand(&mut self) -> Result<Expr, QueryError> {
        if let Some(v) = self.literal()? {
            return Ok(Expr::Literal(v));
        }
        let pos = self.pos();
        if self.accept(&Tok::LParen) {
            let e = self.expr()?;
            self.expect(&Tok::RParen)?;
            return Ok(e);
        }
        if let Tok::Ident {
            name,
            escaped: false,
        } = &self.peek().tok
            && self.peek_at(1).tok == Tok::LParen
        {
            let upper = name.to_ascii_uppercase();
            self.bump();
            self.bump();
            return self.call(&upper, pos);
        }
        if !self.at_name() {
            return Err(self.unexpected("a value, a property or a function"));
        }
        let segments = self.path_segments("a property")?;
        let (var, path) = self.resolve(segments, pos)?;
        Ok(Expr::Path { var, path })
    }

    /// After `NAME(`.
    fn call(&mut self, upper: &str, pos: usize) -> Result<Expr, QueryError> {
        if upper == "IS_OF_MODEL" {
            return self.is_of_model(pos);
        }
        let Some(func) = Func::by_name(upper) else {
            return Err(QueryError::syntax(
                format!(
                    "'{}' is not a function of the query language",
                    excerpt(upper)
                ),
                pos,
            ));
        };
        self.enter()?;
        let mut args = Vec::new();
        if self.peek().tok != Tok::RParen {
            loop {
                if args.len() == func.arity() {
                    return Err(QueryError::syntax(
                        format!("{upper} takes {} argument(s)", func.arity()),
                        self.pos(),
                    ));
                }
                args.push(self.expr()?);
                if !self.accept(&Tok::Comma) {
                    break;
                }
            }
        }
        self.expect(&Tok::RParen)?;
        self.leave();
        if args.len() != func.arity() {
            return Err(QueryError::syntax(
                format!("{upper} takes {} argument(s)", func.arity()),
                pos,
            ));
        }
        Ok(Expr::Func(func, args))
    }

    /// `IS_OF_MODEL([collection,] 'dtmi' [, exact])`
    fn is_of_model(&mut self, pos: usize) -> Result<Expr, QueryError> {
        let var = if self.at_name() {
            let name_pos = self.pos();
            let name = self.name("a collection name")?;
            let var = match self.var_named(&name) {
                Some(v) if self.vars[v].kind == VarKind::Twin => v,
                Some(_) => {
                    return Err(QueryError::syntax(
                        "IS_OF_MODEL applies to twins, not relationships",
                        name_pos,
                    ));
                }
                None => {
                    return Err(QueryError::syntax(
                        format!("'{}' is not a collection of this query", excerpt(&name)),
                        name_pos,
                    ));
                }
            };
            self.expect(&Tok::Comma)?;
            var
        } else {
            match self.default_var {
                Some(v) if self.vars[v].kind == VarKind::Twin => v,
                Some(_) => {
                    return Err(QueryError::syntax(
                        "IS_OF_MODEL applies to twins, not relationships",
                        pos,
                    ));
                }
                None => {
                    return Err(QueryError::syntax(
                        "IS_OF_MODEL needs a collection name when the query has several",
                        pos,
                    ));
                }
            }
        };
        let model_pos = self.pos();
        let model = match self.bump().tok {
            Tok::Str(s) => Dtmi::parse(&s).map_err(|_| {
                QueryError::syntax(format!("'{}' is not a DTMI", excerpt(&s)), model_pos)
            })?,
            other => {
                return Err(QueryError::syntax(
                    format!("expected a model ID string but found {}", other.describe()),
                    model_pos,
                ));
            }
        };
        let exact = if self.accept(&Tok::Comma) {
            if !self.accept_kw("exact") {
                return Err(self.unexpected("'exact'"));
            }
            true
        } else {
            false
        };
        self.expect(&Tok::RParen)?;
        Ok(Expr::IsOfModel { var, model, exact })
    }
}
