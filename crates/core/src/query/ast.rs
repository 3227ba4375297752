//! A parsed query. Names are resolved during parsing: every collection (twin or relationship
//! variable) gets a [`VarId`], and every property reference points at one.

use serde_json::Value;

use crate::dtmi::Dtmi;

/// Index into [`Query::vars`].
pub(crate) type VarId = usize;

/// A parsed, name-resolved query. Build one with [`super::parse`].
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub(crate) select: Select,
    pub(crate) top: Option<u64>,
    pub(crate) source: Source,
    pub(crate) filter: Option<Expr>,
    pub(crate) vars: Vec<Var>,
    /// The collections come from a MATCH pattern (so `SELECT *` returns an object of them).
    pub(crate) is_match: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VarKind {
    Twin,
    Relationship,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Var {
    /// `None` for the unnamed `FROM DIGITALTWINS` collection and anonymous MATCH nodes `()`.
    pub name: Option<String>,
    pub kind: VarKind,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Select {
    /// `SELECT *`: the document itself, or for MATCH an object of every named collection.
    Star,
    /// `SELECT COUNT()`, returned under `name` (`COUNT` unless renamed with `AS`).
    Count {
        name: String,
    },
    Items(Vec<SelectItem>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SelectItem {
    /// The key in each result object.
    pub key: String,
    pub var: VarId,
    /// Empty for a whole collection.
    pub path: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Source {
    /// `FROM DIGITALTWINS`, with the pattern that `JOIN`s or `MATCH` add. `root` is the `FROM`
    /// collection or the first MATCH node; edges are listed in text order and form a tree.
    Twins { root: VarId, edges: Vec<Edge> },
    /// `FROM RELATIONSHIPS`.
    Relationships { var: VarId },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// `from` is the relationship's source.
    Out,
    /// `from` is the relationship's target.
    In,
    /// Either.
    Both,
}

impl Direction {
    pub fn reversed(self) -> Self {
        match self {
            Direction::Out => Direction::In,
            Direction::In => Direction::Out,
            Direction::Both => Direction::Both,
        }
    }
}

/// One relationship condition between two twin variables.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Edge {
    pub from: VarId,
    pub to: VarId,
    pub direction: Direction,
    /// Relationship names allowed; empty allows any.
    pub names: Vec<String>,
    /// `None` for a single hop, one result per relationship. `Some` for a MATCH hop range
    /// (inclusive bounds), one result per distinct twin reached (see `exec::Run::reach`).
    pub hops: Option<(u32, u32)>,
    pub rel_var: Option<VarId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Func {
    IsDefined,
    IsNull,
    IsBool,
    IsNumber,
    IsString,
    IsPrimitive,
    IsObject,
    StartsWith,
    EndsWith,
    Contains,
    ArrayContains,
}

impl Func {
    pub fn by_name(upper: &str) -> Option<Self> {
        Some(match upper {
            "IS_DEFINED" => Func::IsDefined,
            "IS_NULL" => Func::IsNull,
            "IS_BOOL" => Func::IsBool,
            "IS_NUMBER" => Func::IsNumber,
            "IS_STRING" => Func::IsString,
            "IS_PRIMITIVE" => Func::IsPrimitive,
            "IS_OBJECT" => Func::IsObject,
            "STARTSWITH" | "STARTS_WITH" => Func::StartsWith,
            "ENDSWITH" | "ENDS_WITH" => Func::EndsWith,
            "CONTAINS" => Func::Contains,
            "ARRAY_CONTAINS" => Func::ArrayContains,
            _ => return None,
        })
    }

    pub fn arity(self) -> usize {
        match self {
            Func::StartsWith | Func::EndsWith | Func::Contains | Func::ArrayContains => 2,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    Literal(Value),
    /// A collection (`path` empty) or a property path inside its document.
    Path {
        var: VarId,
        path: Vec<String>,
    },
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Compare(CmpOp, Box<Expr>, Box<Expr>),
    In {
        expr: Box<Expr>,
        list: Vec<Value>,
        negated: bool,
    },
    Func(Func, Vec<Expr>),
    IsOfModel {
        var: VarId,
        model: Dtmi,
        exact: bool,
    },
}

impl Expr {
    /// Calls `f` with every variable the expression reads.
    pub fn for_each_var(&self, f: &mut dyn FnMut(VarId)) {
        match self {
            Expr::Literal(_) => {}
            Expr::Path { var, .. } | Expr::IsOfModel { var, .. } => f(*var),
            Expr::Not(e) => e.for_each_var(f),
            Expr::And(es) | Expr::Or(es) | Expr::Func(_, es) => {
                es.iter().for_each(|e| e.for_each_var(f));
            }
            Expr::Compare(_, a, b) => {
                a.for_each_var(f);
                b.for_each_var(f);
            }
            Expr::In { expr, .. } => expr.for_each_var(f),
        }
    }

    /// Rough cost of evaluating the expression once, for the work budget.
    pub fn weight(&self) -> u64 {
        match self {
            Expr::Literal(_) | Expr::Path { .. } | Expr::IsOfModel { .. } => 1,
            Expr::Not(e) => 1 + e.weight(),
            Expr::And(es) | Expr::Or(es) | Expr::Func(_, es) => {
                1 + es.iter().map(Expr::weight).sum::<u64>()
            }
            Expr::Compare(_, a, b) => 1 + a.weight() + b.weight(),
            Expr::In { expr, list, .. } => 1 + expr.weight() + list.len() as u64,
        }
    }
}
