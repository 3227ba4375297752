//! Reads DTDL JSON-LD documents into an arena of [`Node`]s, checking everything that can be
//! checked one element at a time: contexts, keywords, `@type`, `@id`, property terms and the
//! shape of every property value.

use serde_json::{Map, Value};

use super::literals::{
    context_ids, is_name, lang_string, literal_string, parse_dtmi, representational,
};
use super::props::{Kind, PropDef, class_props};
use super::vocab::{Class, Context, Iri, classify};
use super::{ParseOptions, Primitive};
use crate::dtmi::Dtmi;

/// A property value after reading.
#[derive(Debug, Clone)]
pub(super) enum Val {
    Str(String),
    Bool(bool),
    Int(i64),
    Node(usize),
    Ref(Dtmi),
    Prim(Primitive),
    Unit(&'static str),
    Literal(Value),
}

#[derive(Debug)]
pub(super) struct Node {
    pub class: Class,
    pub id: Option<Dtmi>,
    pub version: u8,
    pub semantic: Vec<&'static str>,
    pub props: Vec<(&'static str, Vec<Val>)>,
}

impl Node {
    pub(super) fn get(&self, prop: &str) -> &[Val] {
        self.props
            .iter()
            .find(|(p, _)| *p == prop)
            .map_or(&[], |(_, v)| v.as_slice())
    }

    pub(super) fn str(&self, prop: &str) -> Option<&str> {
        self.get(prop).iter().find_map(|v| match v {
            Val::Str(s) => Some(s.as_str()),
            _ => None,
        })
    }

    pub(super) fn bool(&self, prop: &str) -> Option<bool> {
        self.get(prop).iter().find_map(|v| match v {
            Val::Bool(b) => Some(*b),
            _ => None,
        })
    }

    pub(super) fn int(&self, prop: &str) -> Option<i64> {
        self.get(prop).iter().find_map(|v| match v {
            Val::Int(i) => Some(*i),
            _ => None,
        })
    }

    pub(super) fn nodes(&self, prop: &str) -> impl Iterator<Item = usize> + '_ {
        self.get(prop).iter().filter_map(|v| match v {
            Val::Node(n) => Some(*n),
            _ => None,
        })
    }
}

/// The JSON-LD contexts in force for an element.
#[derive(Debug, Clone)]
struct Scope {
    version: u8,
    contexts: Vec<Context>,
    undefined_extension: bool,
}

impl Scope {
    fn term(&self, term: &str) -> Option<&'static str> {
        self.contexts.iter().rev().find_map(|c| c.term(term))
    }

    fn quantitative(&self) -> bool {
        self.version == 2 || self.contexts.contains(&Context::QuantitativeTypes)
    }

    fn classify(&self, iri: &str) -> Iri {
        classify(iri, self.version, self.quantitative())
    }
}

type Res<T> = Result<T, String>;

pub(super) struct Reader<'o> {
    pub nodes: Vec<Node>,
    /// Top-level interfaces, in input order.
    pub roots: Vec<usize>,
    options: &'o ParseOptions,
}

impl<'o> Reader<'o> {
    pub(super) fn new(options: &'o ParseOptions) -> Self {
        Self {
            nodes: Vec::new(),
            roots: Vec::new(),
            options,
        }
    }

    /// Reads one document: an Interface object or an array of them.
    pub(super) fn document(&mut self, doc: &Value) -> Res<()> {
        match doc {
            Value::Object(obj) => self.top_level(obj),
            Value::Array(items) => {
                for item in items {
                    match item {
                        Value::Object(obj) => self.top_level(obj)?,
                        _ => return Err("a document array may hold only JSON objects".into()),
                    }
                }
                Ok(())
            }
            _ => Err("a DTDL document must be a JSON object or an array of objects".into()),
        }
    }

    fn top_level(&mut self, obj: &Map<String, Value>) -> Res<()> {
        let Some(context) = obj.get("@context") else {
            return Err("a top-level element must have an @context".into());
        };
        let scope = self.top_context(context)?;
        let node = self.element(obj, &[Class::Interface], None, &scope, "")?;
        self.roots.push(node);
        Ok(())
    }

    fn top_context(&self, context: &Value) -> Res<Scope> {
        let ids = context_ids(context)?;
        let scope = Scope {
            version: 0,
            contexts: Vec::new(),
            undefined_extension: false,
        };
        self.apply_context(&scope, &ids)
    }

    /// The scope `outer` becomes under an `@context` naming `ids`.
    fn apply_context(&self, outer: &Scope, ids: &[&str]) -> Res<Scope> {
        let mut version = outer.version;
        let mut saw_dtdl = false;
        for id in ids {
            if let Some(v) = id.strip_prefix("dtmi:dtdl:context;") {
                version = match v {
                    "2" => 2,
                    "3" => 3,
                    _ => return Err(format!("unsupported DTDL context '{id}'")),
                };
                saw_dtdl = true;
            }
        }
        if version == 0 {
            return Err("@context must name a DTDL context".into());
        }
        if outer.version != 0 && version > outer.version {
            return Err(format!(
                "a DTDL v{version} element cannot appear in a v{} element",
                outer.version
            ));
        }
        let mut scope = if saw_dtdl {
            let base = if version == 2 {
                Context::Dtdl2
            } else {
                Context::Dtdl3
            };
            Scope {
                version,
                contexts: vec![base],
                undefined_extension: false,
            }
        } else {
            outer.clone()
        };
        let mut dtdl_seen = !saw_dtdl;
        for id in ids {
            if id.starts_with("dtmi:dtdl:context;") {
                dtdl_seen = true;
                continue;
            }
            let Ok(dtmi) = Dtmi::parse(id) else {
                return Err(format!("@context value '{id}' is not a DTMI"));
            };
            if dtmi.major_version().is_none() {
                return Err(format!("@context value '{id}' needs a version"));
            }
            let context = Context::lookup(id, version);
            if !(dtdl_seen || version == 2 && context == Some(Context::IotCentral)) {
                return Err(format!("@context '{id}' comes before the DTDL context"));
            }
            match context {
                Some(c) => scope.contexts.push(c),
                None if self.options.disallow_undefined_extensions => {
                    return Err(format!("undefined extension context '{id}'"));
                }
                None => scope.undefined_extension = true,
            }
        }
        Ok(scope)
    }

    /// Reads an element that must be one of `allowed`; `implied` is the class when `@type` is
    /// optional and absent.
    fn element(
        &mut self,
        obj: &Map<String, Value>,
        allowed: &[Class],
        implied: Option<Class>,
        outer: &Scope,
        path: &str,
    ) -> Res<usize> {
        let local;
        let scope = match obj.get("@context") {
            Some(ctx) if !path.is_empty() => {
                local = self.apply_context(outer, &context_ids(ctx)?)?;
                let prop = path.rsplit('/').next().unwrap_or_default();
                let fixed_version = matches!(
                    prop,
                    "enumValues" | "fields" | "mapKey" | "mapValue" | "schemas"
                );
                if fixed_version && local.version != outer.version {
                    return Err(format!("{path}: may not change the DTDL version"));
                }
                &local
            }
            _ => outer,
        };
        let v3 = scope.version >= 3;
        for key in obj.keys().filter(|k| k.starts_with('@')) {
            match key.as_str() {
                "@context" | "@id" | "@type" => {}
                "@graph" => return Err(format!("{path}: @graph is not allowed")),
                other if v3 => return Err(format!("{path}: keyword '{other}' is not allowed")),
                _ => {}
            }
        }
        let types = self.types(obj.get("@type"), allowed, implied, scope, path)?;
        let class = types.class;
        let id = match obj.get("@id") {
            None if class == Class::Interface => {
                return Err(format!("{path}: an Interface needs an @id"));
            }
            None => None,
            Some(Value::String(s)) => {
                let max = if class == Class::Interface { 128 } else { 2048 };
                Some(parse_dtmi(s, scope.version, max).map_err(|e| format!("{path}: @id {e}"))?)
            }
            Some(_) => return Err(format!("{path}: @id must be a string")),
        };
        let defs = class_props(class, scope.version, !types.semantic.is_empty());
        let mut props: Vec<(&'static str, Vec<Val>)> = Vec::new();
        for (key, value) in obj.iter().filter(|(k, _)| !k.starts_with('@')) {
            let prop = match scope.term(key) {
                Some(iri) => match scope.classify(iri) {
                    Iri::Property(p) => Some(p),
                    _ => None,
                },
                None if key.starts_with("dtmi:") => {
                    if Dtmi::parse(key).is_err() {
                        if v3 || !types.open {
                            return Err(format!("{path}: property '{key}' is not a valid DTMI"));
                        }
                        continue;
                    }
                    match scope.classify(key) {
                        Iri::Property(p) => Some(p),
                        _ => None,
                    }
                }
                None if key.contains(':') && v3 => {
                    return Err(format!(
                        "{path}: property '{key}' is neither a term nor a DTMI"
                    ));
                }
                None => None,
            };
            let Some(def) = prop.and_then(|p| defs.iter().find(|d| d.name == p)) else {
                if types.open {
                    continue;
                }
                return Err(format!(
                    "{path}: '{key}' is not a property of {}",
                    class.name()
                ));
            };
            if props.iter().any(|(p, _)| *p == def.name) {
                return Err(format!("{path}: property '{}' is given twice", def.name));
            }
            let sub = format!("{path}/{}", def.name);
            let vals = self.value(def, value, scope, &sub)?;
            props.push((def.name, vals));
        }
        for d in defs.iter().filter(|d| d.required) {
            if props.iter().all(|(p, v)| *p != d.name || v.is_empty()) {
                return Err(format!("{path}: {} requires '{}'", class.name(), d.name));
            }
        }
        self.nodes.push(Node {
            class,
            id,
            version: scope.version,
            semantic: types.semantic,
            props,
        });
        Ok(self.nodes.len() - 1)
    }

    fn types(
        &self,
        ty: Option<&Value>,
        allowed: &[Class],
        implied: Option<Class>,
        scope: &Scope,
        path: &str,
    ) -> Res<Types> {
        let v3 = scope.version >= 3;
        let list: Vec<&Value> = match ty {
            None => {
                return match implied {
                    Some(c) if c.type_optional() => Ok(Types {
                        class: c,
                        semantic: Vec::new(),
                        open: false,
                    }),
                    _ => Err(format!("{path}: @type is required")),
                };
            }
            Some(Value::Array(items)) => items.iter().collect(),
            Some(v) => vec![v],
        };
        let mut class = None;
        let mut semantic: Vec<&'static str> = Vec::new();
        let mut open = false;
        for t in list {
            let Value::String(t) = t else {
                return Err(format!("{path}: @type values must be strings"));
            };
            let iri = match scope.term(t) {
                Some(iri) => Some(scope.classify(iri)),
                None if t.starts_with("dtmi:") => match Dtmi::parse(t) {
                    Ok(_) => Some(scope.classify(t)),
                    Err(_) => return Err(format!("{path}: @type '{t}' is not a valid DTMI")),
                },
                None if t.contains(':') => {
                    if v3 {
                        return Err(format!("{path}: @type '{t}' is neither a term nor a DTMI"));
                    }
                    open = true;
                    None
                }
                None => {
                    if v3 && !scope.undefined_extension {
                        return Err(format!("{path}: @type '{t}' is not defined"));
                    }
                    open = true;
                    None
                }
            };
            match iri {
                None => {}
                Some(Iri::Class(c)) => {
                    if class.is_some_and(|k| k != c) {
                        return Err(format!("{path}: @type names two classes"));
                    }
                    class = Some(c);
                }
                Some(Iri::SemanticType(s)) if !semantic.contains(&s) => semantic.push(s),
                Some(Iri::SemanticType(_) | Iri::Adjunct) => {}
                Some(_) if !scope.undefined_extension => {
                    return Err(format!("{path}: @type '{t}' is not meaningful here"));
                }
                Some(_) => {}
            }
        }
        let Some(class) = class else {
            return Err(format!("{path}: @type names no DTDL class"));
        };
        if !allowed.contains(&class) {
            return Err(format!("{path}: a {} is not allowed here", class.name()));
        }
        if !semantic.is_empty() && !class.takes_semantic_type(scope.version) {
            return Err(format!(
                "{path}: a {} cannot have a semantic type",
                class.name()
            ));
        }
        if semantic.len() > 1 {
            return Err(format!("{path}: more than one semantic type"));
        }
        Ok(Types {
            class,
            semantic,
            open,
        })
    }

    fn value(&mut self, def: &PropDef, value: &Value, scope: &Scope, path: &str) -> Res<Vec<Val>> {
        let items: Vec<&Value> = match value {
            Value::Array(items) => items.iter().collect(),
            v => vec![v],
        };
        let single = |items: &[&Value]| -> Res<()> {
            if items.len() > 1 {
                Err(format!("{path}: takes a single value"))
            } else {
                Ok(())
            }
        };
        let v3 = scope.version >= 3;
        match def.kind {
            Kind::Str { max, name } => {
                single(&items)?;
                let mut out = Vec::new();
                for item in items {
                    let s = literal_string(item, v3).map_err(|e| format!("{path}: {e}"))?;
                    if s.chars().count() > max {
                        return Err(format!("{path}: longer than {max} characters"));
                    }
                    if name && !is_name(&s) {
                        return Err(format!("{path}: '{s}' is not a valid name"));
                    }
                    out.push(Val::Str(s));
                }
                Ok(out)
            }
            Kind::Lang { max } => {
                lang_string(value, max, v3).map_err(|e| format!("{path}: {e}"))?;
                Ok(Vec::new())
            }
            Kind::Bool => {
                single(&items)?;
                let mut out = Vec::new();
                for item in items {
                    let v = representational(item, "xsd:boolean", v3)
                        .map_err(|e| format!("{path}: {e}"))?;
                    match v {
                        Value::Bool(b) => out.push(Val::Bool(*b)),
                        _ => return Err(format!("{path}: expected a boolean")),
                    }
                }
                Ok(out)
            }
            Kind::Int => {
                single(&items)?;
                let mut out = Vec::new();
                for item in items {
                    let v = representational(item, "xsd:integer", v3)
                        .map_err(|e| format!("{path}: {e}"))?;
                    match v.as_i64() {
                        Some(i) if i32::try_from(i).is_ok() => out.push(Val::Int(i)),
                        _ => return Err(format!("{path}: expected an integer")),
                    }
                }
                Ok(out)
            }
            Kind::Dtmi => {
                single(&items)?;
                let mut out = Vec::new();
                for item in items {
                    let Value::String(s) = item else {
                        return Err(format!("{path}: expected a DTMI"));
                    };
                    out.push(Val::Ref(
                        parse_dtmi(s, scope.version, 2048).map_err(|e| format!("{path}: {e}"))?,
                    ));
                }
                Ok(out)
            }
            Kind::Elements {
                classes,
                refs,
                min,
                max,
            } => {
                if items.len() < min {
                    return Err(format!("{path}: needs at least {min} element(s)"));
                }
                if max.is_some_and(|m| items.len() > m) {
                    return Err(format!("{path}: too many elements"));
                }
                let implied = (classes.len() == 1).then(|| classes[0]);
                let mut out = Vec::new();
                for item in items {
                    match item {
                        Value::Object(obj) => {
                            if def.name == "schemas" && !obj.contains_key("@id") {
                                return Err(format!("{path}: a reusable schema needs an @id"));
                            }
                            out.push(Val::Node(self.element(obj, classes, implied, scope, path)?))
                        }
                        Value::String(s) if refs => out.push(Val::Ref(
                            parse_dtmi(s, scope.version, 2048)
                                .map_err(|e| format!("{path}: {e}"))?,
                        )),
                        _ => return Err(format!("{path}: expected an element")),
                    }
                }
                Ok(out)
            }
            Kind::Schema => {
                single(&items)?;
                let mut out = Vec::new();
                for item in items {
                    out.push(match item {
                        Value::Object(obj) => {
                            let complex = [Class::Array, Class::Enum, Class::Map, Class::Object];
                            Val::Node(self.element(obj, &complex, None, scope, path)?)
                        }
                        Value::String(s) => self.schema_ref(s, scope, path)?,
                        _ => return Err(format!("{path}: expected a schema")),
                    });
                }
                if out.is_empty() {
                    return Err(format!("{path}: expected a schema"));
                }
                Ok(out)
            }
            Kind::PrimSchema(allowed) => {
                single(&items)?;
                let mut out = Vec::new();
                for item in items {
                    let prim = match item {
                        Value::String(s) => match self.schema_ref(s, scope, path)? {
                            Val::Prim(p) => Some(p),
                            _ => None,
                        },
                        _ => None,
                    };
                    match prim {
                        Some(p) if allowed.contains(&p) => out.push(Val::Prim(p)),
                        _ => return Err(format!("{path}: schema not allowed here")),
                    }
                }
                Ok(out)
            }
            Kind::Unit | Kind::CommandType => {
                single(&items)?;
                let mut out = Vec::new();
                for item in items {
                    let Value::String(s) = item else {
                        return Err(format!("{path}: expected a term"));
                    };
                    let iri = match scope.term(s) {
                        Some(iri) => iri,
                        None if Dtmi::parse(s).is_ok() => s.as_str(),
                        None => return Err(format!("{path}: '{s}' is not defined")),
                    };
                    match (def.kind, scope.classify(iri)) {
                        (Kind::Unit, Iri::Unit(u)) => out.push(Val::Unit(u)),
                        (Kind::CommandType, Iri::CommandType) => {}
                        _ => return Err(format!("{path}: '{s}' is not allowed here")),
                    }
                }
                if out.is_empty() && matches!(def.kind, Kind::Unit) {
                    return Err(format!("{path}: a unit is required"));
                }
                Ok(out)
            }
            Kind::Literal => {
                single(&items)?;
                let mut out = Vec::new();
                for item in items {
                    let item = match item {
                        Value::Object(o) if o.get("@value").is_some_and(Value::is_string) => {
                            representational(item, "xsd:string", v3)
                        }
                        Value::Object(_) => representational(item, "xsd:integer", v3),
                        other => Ok(other),
                    }
                    .map_err(|e| format!("{path}: {e}"))?;
                    match item {
                        Value::String(_) => out.push(Val::Literal(item.clone())),
                        Value::Number(n)
                            if n.as_i64().is_some_and(|i| i32::try_from(i).is_ok()) =>
                        {
                            out.push(Val::Literal(item.clone()))
                        }
                        _ => return Err(format!("{path}: expected an integer or a string")),
                    }
                }
                Ok(out)
            }
        }
    }

    fn schema_ref(&self, s: &str, scope: &Scope, path: &str) -> Res<Val> {
        if let Some(iri) = scope.term(s) {
            return match scope.classify(iri) {
                Iri::Primitive(p) => Ok(Val::Prim(p)),
                _ => Err(format!("{path}: '{s}' is not a schema")),
            };
        }
        if s.starts_with("dtmi:") {
            if let Iri::Primitive(p) = scope.classify(s) {
                return Ok(Val::Prim(p));
            }
            let dtmi = parse_dtmi(s, scope.version, 2048).map_err(|e| format!("{path}: {e}"))?;
            return Ok(Val::Ref(dtmi));
        }
        Err(format!("{path}: '{s}' is not a schema"))
    }
}

struct Types {
    class: Class,
    semantic: Vec<&'static str>,
    open: bool,
}
