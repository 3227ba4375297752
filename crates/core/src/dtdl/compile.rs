//! Batch-level validation and compilation: identifiers, references, inheritance, limits that
//! span elements, and the construction of the compiled [`Interface`]s.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use super::reader::{Node, Val};
use super::vocab::{Class, unit_fits};
use super::{
    Command, Component, EnumValue, Field, Interface, Primitive, Property, Relationship, Schema,
    Telemetry,
};
use crate::dtmi::Dtmi;

type Res<T> = Result<T, String>;

/// Deepest allowed chain of `extends`.
const MAX_EXTENDS_DEPTH: usize = 10;
/// Deepest allowed nesting of complex schemas.
const MAX_SCHEMA_DEPTH: usize = 5;
/// Most interfaces a DTDL v3 interface may extend, directly or not.
const MAX_ANCESTORS: usize = 1024;
/// Most contents a DTDL v3 interface may hold, own and inherited. The spec limits the elements
/// in the `contents` hierarchy, imported ones included, to 100,000; contents are some of them.
const MAX_V3_CONTENTS: usize = 100_000;

/// Replaces references to elements of the batch (`fields`, `enumValues`, `request`, ...) by the
/// elements themselves. `extends` and component schemas stay references: they may name
/// interfaces outside the batch.
pub(super) fn link(nodes: &mut [Node]) -> Res<()> {
    let ids: HashMap<Dtmi, (usize, Class)> = nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| n.id.clone().map(|id| (id, (i, n.class))))
        .collect();
    for node in nodes.iter_mut() {
        let class = node.class;
        for (prop, vals) in &mut node.props {
            let wanted: &[Class] = match (class, *prop) {
                (_, "request") => &[Class::CommandPayload, Class::CommandRequest],
                (_, "response") => &[Class::CommandPayload, Class::CommandResponse],
                (Class::Relationship, "properties") => &[Class::Property],
                (_, "enumValues") => &[Class::EnumValue],
                (_, "fields") => &[Class::Field],
                (_, "mapKey") => &[Class::MapKey],
                (_, "mapValue") => &[Class::MapValue],
                _ => continue,
            };
            for v in vals.iter_mut() {
                if let Val::Ref(id) = v {
                    match ids.get(id) {
                        Some((n, c)) if wanted.contains(c) => *v = Val::Node(*n),
                        _ => {
                            return Err(format!(
                                "'{id}' in {prop} does not name a suitable element"
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[derive(Clone)]
enum Parent {
    Node(usize),
    External(Arc<Interface>),
}

pub(super) struct Compiler<'a> {
    nodes: &'a [Node],
    ids: HashMap<Dtmi, usize>,
    resolve: &'a dyn Fn(&Dtmi) -> Option<Arc<Interface>>,
    parents: HashMap<usize, Vec<Parent>>,
    depth: HashMap<usize, usize>,
    built: HashMap<usize, Arc<Interface>>,
    /// Memoised per node, so that every interface, schema and content is worked on once
    /// however many paths lead to it.
    flat: HashMap<usize, Arc<Flat>>,
    external_flat: HashMap<Dtmi, Arc<Flat>>,
    components: HashMap<usize, bool>,
    shapes: HashMap<usize, Shape>,
    schemas: HashMap<usize, Arc<Schema>>,
    budget: Budget,
}

/// Work units charged per enum value: its name's uniqueness, its value's type and its value's
/// uniqueness.
pub const ENUM_VALUE_UNITS: usize = 3;

/// Own and inherited contents by name, each with its identity.
type Flat = BTreeMap<String, Content>;

/// What a complex schema holds below it, for the depth, Array and geospatial rules.
#[derive(Clone, Copy)]
enum Shape {
    /// Being walked: meeting it again is a reference cycle.
    Open,
    Done {
        height: usize,
        array: bool,
        geospatial: bool,
    },
}

/// Units of compilation work: content entries merged or copied, ancestors copied, schema nodes
/// walked or built. Every unit is charged before it is done, so a batch over the limit stops
/// before it allocates.
pub(super) struct Budget {
    pub(super) used: usize,
    pub(super) limit: usize,
}

impl Budget {
    fn charge(&mut self, units: usize) -> Res<()> {
        self.used = self.used.saturating_add(units);
        if self.used > self.limit {
            return Err(format!(
                "the models expand to more than {} entries, the limit of one compilation",
                self.limit
            ));
        }
        Ok(())
    }
}

impl<'a> Compiler<'a> {
    pub(super) fn new(
        nodes: &'a [Node],
        resolve: &'a dyn Fn(&Dtmi) -> Option<Arc<Interface>>,
        limit: usize,
    ) -> Res<Self> {
        let mut ids = HashMap::new();
        for (i, node) in nodes.iter().enumerate() {
            if let Some(id) = &node.id
                && ids.insert(id.clone(), i).is_some()
            {
                return Err(format!("@id '{id}' is defined more than once"));
            }
        }
        Ok(Self {
            nodes,
            ids,
            resolve,
            parents: HashMap::new(),
            depth: HashMap::new(),
            built: HashMap::new(),
            flat: HashMap::new(),
            external_flat: HashMap::new(),
            components: HashMap::new(),
            shapes: HashMap::new(),
            schemas: HashMap::new(),
            budget: Budget {
                used: nodes.len(),
                limit,
            },
        })
    }

    /// Work done so far.
    pub(super) fn work(&self) -> usize {
        self.budget.used
    }

    /// Validates every element and compiles the interfaces `roots`.
    pub(super) fn run(&mut self, roots: &[usize]) -> Res<Vec<Arc<Interface>>> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].class == Class::Interface {
                self.extends_depth(i, &mut Vec::new())?;
            }
        }
        for i in 0..self.nodes.len() {
            self.check_node(i)?;
        }
        let mut out = Vec::with_capacity(roots.len());
        for &root in roots {
            out.push(self.interface(root)?);
        }
        Ok(out)
    }

    fn node(&self, i: usize) -> &'a Node {
        &self.nodes[i]
    }

    fn parents_of(&mut self, i: usize) -> Res<Vec<Parent>> {
        if let Some(p) = self.parents.get(&i) {
            return Ok(p.clone());
        }
        let node = self.node(i);
        let mut out = Vec::new();
        for v in node.get("extends") {
            out.push(match v {
                Val::Node(n) => Parent::Node(*n),
                Val::Ref(id) => match self.ids.get(id) {
                    Some(&n) if self.node(n).class == Class::Interface => Parent::Node(n),
                    Some(_) => return Err(format!("'{id}' in extends is not an Interface")),
                    None => match (self.resolve)(id) {
                        Some(iface) => Parent::External(iface),
                        None => return Err(format!("extends '{id}', which is not defined")),
                    },
                },
                _ => return Err("extends must name Interfaces".into()),
            });
        }
        self.parents.insert(i, out.clone());
        Ok(out)
    }

    /// Depth of the `extends` hierarchy above interface `i`; rejects cycles and deep chains.
    fn extends_depth(&mut self, i: usize, stack: &mut Vec<usize>) -> Res<usize> {
        if let Some(&d) = self.depth.get(&i) {
            return Ok(d);
        }
        if stack.contains(&i) {
            return Err(format!("interface '{}' extends itself", self.display_id(i)));
        }
        stack.push(i);
        let mut depth = 0;
        for p in self.parents_of(i)? {
            let d = match p {
                Parent::Node(n) => self.extends_depth(n, stack)? + 1,
                Parent::External(iface) => iface.extends_depth.saturating_add(1),
            };
            depth = depth.max(d);
        }
        stack.pop();
        if depth > MAX_EXTENDS_DEPTH {
            return Err(format!(
                "'{}' has more than {MAX_EXTENDS_DEPTH} levels of extends",
                self.display_id(i)
            ));
        }
        self.depth.insert(i, depth);
        Ok(depth)
    }

    fn display_id(&self, i: usize) -> String {
        self.node(i)
            .id
            .as_ref()
            .map_or_else(|| "(anonymous)".to_string(), |d| d.to_string())
    }

    /// Checks one element against the rules that need the whole batch.
    fn check_node(&mut self, i: usize) -> Res<()> {
        let node = self.node(i);
        match node.class {
            Class::Interface => self.check_interface(i)?,
            Class::Telemetry
            | Class::Property
            | Class::CommandPayload
            | Class::CommandRequest
            | Class::CommandResponse
            | Class::Field
            | Class::MapValue => {
                let schema = node.get("schema");
                let excl_array = node.class == Class::Property && node.version == 2;
                for v in schema {
                    self.check_schema(v, excl_array)?;
                }
                if let Some(semantic) = node.semantic.first() {
                    let numeric = schema.iter().any(|v| {
                        matches!(
                            v,
                            Val::Prim(
                                Primitive::Double
                                    | Primitive::Float
                                    | Primitive::Integer
                                    | Primitive::Long
                            )
                        )
                    });
                    if !numeric {
                        return Err(format!("a {semantic} needs a numeric schema"));
                    }
                    for v in node.get("unit") {
                        if let Val::Unit(u) = v
                            && !unit_fits(semantic, u, node.version)
                        {
                            return Err(format!("'{u}' is not a unit of {semantic}"));
                        }
                    }
                }
            }
            Class::Relationship => {
                let min = node.int("minMultiplicity");
                let max = node.int("maxMultiplicity");
                if min.is_some_and(|m| m != 0) {
                    return Err("minMultiplicity must be 0".into());
                }
                if max.is_some_and(|m| m < 1 || (node.version == 2 && m > 500)) {
                    return Err("maxMultiplicity is out of range".into());
                }
                self.unique_names(node.nodes("properties"), "properties")?;
            }
            Class::Component => {
                for v in node.get("schema") {
                    let has_components = match v {
                        Val::Node(n) => self.has_components(*n)?,
                        Val::Ref(id) => match self.ids.get(id) {
                            Some(&n) if self.node(n).class == Class::Interface => {
                                self.has_components(n)?
                            }
                            Some(_) => {
                                return Err(format!("component schema '{id}' is not an Interface"));
                            }
                            None => match (self.resolve)(id) {
                                Some(iface) => !iface.components.is_empty(),
                                None => {
                                    return Err(format!("component schema '{id}' is not defined"));
                                }
                            },
                        },
                        _ => false,
                    };
                    if has_components {
                        return Err("a component's interface may not have components".into());
                    }
                }
            }
            Class::Enum => {
                let prim = node.get("valueSchema").iter().find_map(|v| match v {
                    Val::Prim(p) => Some(*p),
                    _ => None,
                });
                // Linear in the values (hash sets), and charged before it runs: a unit each for
                // the name's and the value's uniqueness and one for the value's type, so a
                // huge enum is refused at the work limit, not worked through.
                let values = node.nodes("enumValues").count();
                self.budget
                    .charge(ENUM_VALUE_UNITS.saturating_mul(values))?;
                self.unique_names(node.nodes("enumValues"), "enumValues")?;
                // Compared by their JSON text, which is canonical for integers and strings.
                let mut seen: HashSet<String> = HashSet::with_capacity(values);
                for n in node.nodes("enumValues") {
                    for v in self.node(n).get("enumValue") {
                        if let Val::Literal(lit) = v {
                            let fits = match prim {
                                Some(Primitive::Integer) => lit.is_i64(),
                                Some(Primitive::String) => lit.is_string(),
                                _ => true,
                            };
                            if !fits {
                                return Err("enumValue does not match the valueSchema".into());
                            }
                            if !seen.insert(lit.to_string()) {
                                return Err(format!("enumValue {lit} appears twice"));
                            }
                        }
                    }
                }
            }
            Class::Object => self.unique_names(node.nodes("fields"), "fields")?,
            Class::Array | Class::Map | Class::MapKey | Class::EnumValue | Class::Command => {}
        }
        Ok(())
    }

    fn unique_names(&self, items: impl Iterator<Item = usize>, what: &str) -> Res<()> {
        let mut seen = HashSet::new();
        for n in items {
            if let Some(name) = self.node(n).str("name")
                && !seen.insert(name)
            {
                return Err(format!("name '{name}' appears twice in {what}"));
            }
        }
        Ok(())
    }

    fn has_components(&mut self, i: usize) -> Res<bool> {
        if let Some(&has) = self.components.get(&i) {
            return Ok(has);
        }
        let has = self
            .flat_contents(i)?
            .values()
            .any(|c| matches!(c, Content::Node(n) if self.node(*n).class == Class::Component))
            || self
                .parents_of(i)?
                .iter()
                .any(|p| matches!(p, Parent::External(e) if !e.components.is_empty()));
        self.components.insert(i, has);
        Ok(has)
    }

    /// Checks a schema value: no reference cycle, at most [`MAX_SCHEMA_DEPTH`] levels, and (for
    /// DTDL v2 Properties) no Array and no geospatial schema anywhere in it.
    fn check_schema(&mut self, v: &Val, excl_array: bool) -> Res<()> {
        let (height, array, geospatial) = self.shape(v, 0)?;
        if excl_array && array {
            return Err("a Property schema may not contain an Array".into());
        }
        if excl_array && geospatial {
            return Err("a DTDL v2 Property schema may not be geospatial".into());
        }
        if height > MAX_SCHEMA_DEPTH {
            return Err(format!(
                "schemas nest more than {MAX_SCHEMA_DEPTH} levels deep"
            ));
        }
        Ok(())
    }

    /// Height, Array and geospatial content of a schema value; each complex schema is walked
    /// once (memoised), and the walk stops below [`MAX_SCHEMA_DEPTH`] levels.
    fn shape(&mut self, v: &Val, level: usize) -> Res<(usize, bool, bool)> {
        let n = match v {
            Val::Node(n) => *n,
            Val::Ref(id) => match self.ids.get(id) {
                Some(&n) if self.node(n).class.is_complex_schema() => n,
                Some(_) => return Err(format!("'{id}' is not a schema")),
                None => return Err(format!("schema '{id}' is not defined")),
            },
            Val::Prim(p) => {
                let geospatial = matches!(
                    p,
                    Primitive::Point
                        | Primitive::MultiPoint
                        | Primitive::LineString
                        | Primitive::MultiLineString
                        | Primitive::Polygon
                        | Primitive::MultiPolygon
                );
                return Ok((0, false, geospatial));
            }
            _ => return Ok((0, false, false)),
        };
        match self.shapes.get(&n) {
            Some(Shape::Open) => return Err("a schema refers to itself".into()),
            Some(&Shape::Done {
                height,
                array,
                geospatial,
            }) => return Ok((height, array, geospatial)),
            None => {}
        }
        if level >= MAX_SCHEMA_DEPTH {
            return Err(format!(
                "schemas nest more than {MAX_SCHEMA_DEPTH} levels deep"
            ));
        }
        self.budget.charge(1)?;
        self.shapes.insert(n, Shape::Open);
        let node = self.node(n);
        let children: Vec<&Val> = match node.class {
            Class::Array => node.get("elementSchema").iter().collect(),
            Class::Map => node
                .nodes("mapValue")
                .flat_map(|m| self.node(m).get("schema"))
                .collect(),
            Class::Object => node
                .nodes("fields")
                .flat_map(|f| self.node(f).get("schema"))
                .collect(),
            _ => Vec::new(),
        };
        let (mut height, mut array, mut geospatial) = (0, node.class == Class::Array, false);
        for c in children {
            let (h, a, g) = self.shape(c, level + 1)?;
            height = height.max(h);
            array |= a;
            geospatial |= g;
        }
        let height = height + 1;
        self.shapes.insert(
            n,
            Shape::Done {
                height,
                array,
                geospatial,
            },
        );
        Ok((height, array, geospatial))
    }

    fn check_interface(&mut self, i: usize) -> Res<()> {
        let node = self.node(i);
        self.unique_names(node.nodes("contents"), "contents")?;
        let flat = self.flat_contents(i)?;
        if node.version == 2 && flat.len() > 300 {
            return Err("an Interface may have at most 300 contents".into());
        }
        if flat.len() > MAX_V3_CONTENTS {
            return Err(format!(
                "'{}' has more than {MAX_V3_CONTENTS} contents, own and inherited",
                self.display_id(i)
            ));
        }
        for v in node.get("schemas") {
            self.check_schema(v, false)?;
        }
        Ok(())
    }

    /// Own and inherited contents by name; rejects conflicting names. Memoised: each
    /// interface's contents are merged once, whatever the number of paths to it.
    fn flat_contents(&mut self, i: usize) -> Res<Arc<Flat>> {
        if let Some(f) = self.flat.get(&i) {
            return Ok(f.clone());
        }
        let mut out = Flat::new();
        let node = self.node(i);
        for n in node.nodes("contents") {
            if let Some(name) = self.node(n).str("name") {
                out.insert(name.to_string(), Content::Node(n));
            }
        }
        self.budget.charge(out.len())?;
        for p in self.parents_of(i)? {
            let inherited = match p {
                Parent::Node(pn) => self.flat_contents(pn)?,
                Parent::External(e) => self.external_flat(&e, 0)?,
            };
            self.budget.charge(inherited.len())?;
            merge(&mut out, &inherited)?;
        }
        let out = Arc::new(out);
        self.flat.insert(i, out.clone());
        Ok(out)
    }

    /// The contents of an accepted interface by name, each identified by the interface that
    /// declares it: the one holding it whose direct parents do not. Content reached through
    /// two parents (a diamond) thus has one identity and is not a redefinition. Memoised per
    /// interface, like [`Self::flat_contents`].
    fn external_flat(&mut self, e: &Arc<Interface>, level: usize) -> Res<Arc<Flat>> {
        if let Some(f) = self.external_flat.get(&e.id) {
            return Ok(f.clone());
        }
        if level > MAX_EXTENDS_DEPTH {
            return Err(format!(
                "'{}' has more than {MAX_EXTENDS_DEPTH} levels of extends",
                e.id
            ));
        }
        let mut out = Flat::new();
        for id in &e.extends {
            if let Some(parent) = (self.resolve)(id) {
                let inherited = self.external_flat(&parent, level + 1)?;
                self.budget.charge(inherited.len())?;
                merge(&mut out, &inherited)?;
            }
        }
        let names = e
            .properties
            .keys()
            .chain(e.telemetry.keys())
            .chain(e.commands.keys())
            .chain(e.relationships.keys())
            .chain(e.components.keys());
        self.budget.charge(entries(e))?;
        for name in names {
            if !out.contains_key(name) {
                out.insert(name.clone(), Content::External(e.id.clone(), name.clone()));
            }
        }
        let out = Arc::new(out);
        self.external_flat.insert(e.id.clone(), out.clone());
        Ok(out)
    }

    fn interface(&mut self, i: usize) -> Res<Arc<Interface>> {
        if let Some(b) = self.built.get(&i) {
            return Ok(b.clone());
        }
        let node = self.node(i);
        let id = node.id.clone().ok_or("an Interface needs an @id")?;
        let mut iface = Interface {
            id,
            dtdl_version: node.version,
            extends: Vec::new(),
            extends_depth: self.depth.get(&i).copied().unwrap_or(0),
            expanded_size: 0,
            ancestors: BTreeSet::new(),
            properties: BTreeMap::new(),
            telemetry: BTreeMap::new(),
            commands: BTreeMap::new(),
            relationships: BTreeMap::new(),
            components: BTreeMap::new(),
        };
        for p in self.parents_of(i)? {
            let parent = match p {
                Parent::Node(n) => self.interface(n)?,
                Parent::External(e) => e,
            };
            // Charged before the copy: an interface over the budget is never built.
            let copied = entries(&parent);
            iface.expanded_size = iface.expanded_size.saturating_add(copied);
            self.budget.charge(copied)?;
            iface.extends.push(parent.id.clone());
            iface.ancestors.insert(parent.id.clone());
            iface.ancestors.extend(parent.ancestors.iter().cloned());
            iface.properties.extend(parent.properties.clone());
            iface.telemetry.extend(parent.telemetry.clone());
            iface.commands.extend(parent.commands.clone());
            iface.relationships.extend(parent.relationships.clone());
            iface.components.extend(parent.components.clone());
        }
        for n in node.nodes("contents") {
            let c = self.node(n);
            let name = c.str("name").unwrap_or_default().to_string();
            let own = 1 + c.nodes("properties").count();
            iface.expanded_size = iface.expanded_size.saturating_add(own);
            self.budget.charge(own)?;
            match c.class {
                Class::Property => {
                    iface.properties.insert(name, self.property(n)?);
                }
                Class::Telemetry => {
                    let schema = self.schema(c.get("schema"))?;
                    iface
                        .telemetry
                        .insert(name.clone(), Telemetry { name, schema });
                }
                Class::Command => {
                    let request = self.payload(c.nodes("request").next())?;
                    let response = self.payload(c.nodes("response").next())?;
                    iface.commands.insert(
                        name.clone(),
                        Command {
                            name,
                            request,
                            response,
                        },
                    );
                }
                Class::Relationship => {
                    let mut properties = BTreeMap::new();
                    for p in c.nodes("properties") {
                        let prop = self.property(p)?;
                        properties.insert(prop.name.clone(), prop);
                    }
                    let target = c.get("target").iter().find_map(|v| match v {
                        Val::Ref(d) => Some(d.clone()),
                        _ => None,
                    });
                    let rel = Relationship {
                        name: name.clone(),
                        target,
                        min_multiplicity: c
                            .int("minMultiplicity")
                            .and_then(|v| u32::try_from(v).ok()),
                        max_multiplicity: c
                            .int("maxMultiplicity")
                            .and_then(|v| u32::try_from(v).ok()),
                        writable: c.bool("writable").unwrap_or(false),
                        properties,
                    };
                    iface.relationships.insert(name, rel);
                }
                Class::Component => {
                    let schema = match c.get("schema").first() {
                        Some(Val::Node(s)) => self.interface(*s)?,
                        Some(Val::Ref(id)) => match self.ids.get(id) {
                            Some(&s) => self.interface(s)?,
                            None => (self.resolve)(id)
                                .ok_or_else(|| format!("'{id}' is not defined"))?,
                        },
                        _ => return Err("a Component needs an Interface schema".into()),
                    };
                    iface
                        .components
                        .insert(name.clone(), Component { name, schema });
                }
                _ => {}
            }
        }
        iface.expanded_size = iface.expanded_size.saturating_add(iface.extends.len());
        if iface.dtdl_version >= 3 && iface.ancestors.len() > MAX_ANCESTORS {
            return Err(format!(
                "'{}' has more than {MAX_ANCESTORS} ancestors",
                iface.id
            ));
        }
        let built = Arc::new(iface);
        self.built.insert(i, built.clone());
        Ok(built)
    }

    fn property(&mut self, n: usize) -> Res<Property> {
        let c = self.node(n);
        Ok(Property {
            name: c.str("name").unwrap_or_default().to_string(),
            schema: self.schema(c.get("schema"))?,
            writable: c.bool("writable").unwrap_or(false),
        })
    }

    fn payload(&mut self, n: Option<usize>) -> Res<Option<Arc<Schema>>> {
        n.map(|n| self.schema(self.node(n).get("schema")))
            .transpose()
    }

    /// The compiled schema of a schema value. Each complex schema node is compiled once and
    /// shared by every use.
    fn schema(&mut self, vals: &[Val]) -> Res<Arc<Schema>> {
        let Some(v) = vals.first() else {
            return Err("missing schema".into());
        };
        let n = match v {
            Val::Prim(p) => return Ok(Arc::new(Schema::Primitive(*p))),
            Val::Node(n) => *n,
            Val::Ref(id) => *self
                .ids
                .get(id)
                .ok_or_else(|| format!("schema '{id}' is not defined"))?,
            _ => return Err("not a schema".into()),
        };
        if let Some(s) = self.schemas.get(&n) {
            return Ok(s.clone());
        }
        self.budget.charge(1)?;
        let node = self.node(n);
        let schema = Arc::new(match node.class {
            Class::Array => Schema::Array(self.schema(node.get("elementSchema"))?),
            Class::Map => {
                let value = node
                    .nodes("mapValue")
                    .next()
                    .ok_or("a Map needs a mapValue")?;
                Schema::Map {
                    key: Primitive::String,
                    value: self.schema(self.node(value).get("schema"))?,
                }
            }
            Class::Object => {
                let mut fields = Vec::new();
                for f in node.nodes("fields") {
                    let field = self.node(f);
                    fields.push(Field {
                        name: field.str("name").unwrap_or_default().to_string(),
                        schema: self.schema(field.get("schema"))?,
                    });
                }
                Schema::Object { fields }
            }
            Class::Enum => {
                let value_schema = node
                    .get("valueSchema")
                    .iter()
                    .find_map(|v| match v {
                        Val::Prim(p) => Some(*p),
                        _ => None,
                    })
                    .unwrap_or(Primitive::String);
                let mut values = Vec::new();
                for e in node.nodes("enumValues") {
                    let ev = self.node(e);
                    let value = ev.get("enumValue").iter().find_map(|v| match v {
                        Val::Literal(l) => Some(l.clone()),
                        _ => None,
                    });
                    values.push(EnumValue {
                        name: ev.str("name").unwrap_or_default().to_string(),
                        value: value.unwrap_or(Value::Null),
                    });
                }
                Schema::Enum {
                    value_schema,
                    values,
                }
            }
            other => return Err(format!("a {} is not a schema", other.name())),
        });
        self.schemas.insert(n, schema.clone());
        Ok(schema)
    }
}

/// Identity of a content for conflict detection across diamond inheritance.
#[derive(Debug, Clone, PartialEq)]
enum Content {
    Node(usize),
    External(Dtmi, String),
}

/// The entries an interface's compiled form holds: contents, relationship properties and
/// ancestors. What a child copies from it.
fn entries(i: &Interface) -> usize {
    i.properties.len()
        + i.telemetry.len()
        + i.commands.len()
        + i.components.len()
        + i.relationships
            .values()
            .map(|r| 1 + r.properties.len())
            .sum::<usize>()
        + i.ancestors.len()
}

/// Adds `inherited` to `out`; a name that both hold for different contents is a conflict.
fn merge(out: &mut Flat, inherited: &Flat) -> Res<()> {
    for (name, c) in inherited {
        match out.get(name) {
            Some(existing) if existing != c => {
                return Err(format!("content name '{name}' is inherited and redefined"));
            }
            Some(_) => {}
            None => {
                out.insert(name.clone(), c.clone());
            }
        }
    }
    Ok(())
}
