//! Parser tests: every construct, the errors and their positions, and hostile inputs.

use serde_json::json;

use super::ast::{CmpOp, Direction, Expr, Func, Select, Source, VarKind};
use super::{QueryErrorKind, limits, parse};

fn ok(text: &str) -> super::Query {
    match parse(text) {
        Ok(q) => q,
        Err(e) => panic!("{text:?} did not parse: {e}"),
    }
}

fn err_at(text: &str) -> Option<usize> {
    match parse(text) {
        Ok(_) => panic!("{text:?} parsed but should not"),
        Err(e) => {
            assert_eq!(e.kind, QueryErrorKind::Syntax, "{e}");
            e.position
        }
    }
}

fn edges(q: &super::Query) -> &[super::ast::Edge] {
    match &q.source {
        Source::Twins { edges, .. } => edges,
        Source::Relationships { .. } => &[],
    }
}

#[test]
fn select_star_from_digitaltwins_parses_with_any_keyword_case() {
    let q = ok("select * From DigitalTwins");
    assert_eq!(q.select, Select::Star);
    assert_eq!(q.vars.len(), 1);
    assert_eq!(q.vars[0].name, None);
    assert!(q.filter.is_none());
}

#[test]
fn unaliased_properties_refer_to_the_only_collection() {
    let q = ok("SELECT name, age FROM DIGITALTWINS WHERE $dtId = 'x'");
    let Select::Items(items) = &q.select else {
        panic!()
    };
    assert_eq!(items[0].key, "name");
    assert_eq!(items[1].path, vec!["age".to_string()]);
    assert_eq!(
        q.filter,
        Some(Expr::Compare(
            CmpOp::Eq,
            Box::new(Expr::Path {
                var: 0,
                path: vec!["$dtId".into()]
            }),
            Box::new(Expr::Literal(json!("x")))
        ))
    );
}

#[test]
fn projections_take_the_last_segment_or_the_alias_as_key() {
    let q = ok("SELECT T, T.$metadata.$model, T.name AS n FROM DIGITALTWINS AS T");
    let Select::Items(items) = &q.select else {
        panic!()
    };
    let keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, vec!["T", "$model", "n"]);
    assert!(items[0].path.is_empty());
}

#[test]
fn duplicate_column_names_are_rejected_at_the_second_column() {
    assert_eq!(
        err_at("SELECT A.name, B.name FROM DIGITALTWINS A JOIN B RELATED A.x"),
        Some(15)
    );
}

#[test]
fn top_and_count_parse_and_cannot_be_combined() {
    let q = ok("SELECT TOP(5) FROM DIGITALTWINS");
    assert_eq!((q.top, &q.select), (Some(5), &Select::Star));
    let q = ok("SELECT TOP (2) T.name FROM DIGITALTWINS T");
    assert_eq!(q.top, Some(2));
    assert_eq!(
        ok("SELECT COUNT() FROM RELATIONSHIPS").select,
        Select::Count {
            name: "COUNT".into()
        }
    );
    assert_eq!(
        ok("SELECT COUNT() AS n FROM DIGITALTWINS").select,
        Select::Count { name: "n".into() }
    );
    assert_eq!(err_at("SELECT TOP(1) COUNT() FROM DIGITALTWINS"), Some(14));
    assert_eq!(err_at("SELECT TOP(-1) FROM DIGITALTWINS"), Some(11));
    assert_eq!(err_at("SELECT TOP(1.5) FROM DIGITALTWINS"), Some(11));
}

#[test]
fn from_relationships_declares_a_relationship_collection() {
    let q = ok("SELECT R FROM RELATIONSHIPS R WHERE R.$sourceId IN ['a', 'b']");
    assert_eq!(q.vars[0].kind, VarKind::Relationship);
    assert!(matches!(q.source, Source::Relationships { var: 0 }));
    assert!(err_at("SELECT * FROM RELATIONSHIPS R JOIN X RELATED R.y").is_some());
}

#[test]
fn joins_declare_targets_and_optional_relationship_collections() {
    let q = ok(
        "SELECT T, CT, R FROM DIGITALTWINS T JOIN CT RELATED T.contains R \
                JOIN X RELATED CT.feeds WHERE T.$dtId = 'a'",
    );
    let e = edges(&q);
    assert_eq!(e.len(), 2);
    assert_eq!((e[0].from, e[0].to, e[0].rel_var), (0, 1, Some(2)));
    assert_eq!(e[0].names, vec!["contains".to_string()]);
    assert_eq!(e[0].direction, Direction::Out);
    assert_eq!((e[1].from, e[1].to, e[1].rel_var), (1, 3, None));
    assert_eq!(q.vars[2].kind, VarKind::Relationship);
}

#[test]
fn select_star_with_join_is_rejected_as_in_adt() {
    assert_eq!(
        err_at("SELECT * FROM DIGITALTWINS T JOIN C RELATED T.x"),
        Some(7)
    );
}

#[test]
fn join_sources_must_be_declared_twin_collections() {
    assert_eq!(
        err_at("SELECT C FROM DIGITALTWINS T JOIN C RELATED Q.x"),
        Some(44)
    );
    assert_eq!(
        err_at("SELECT C FROM DIGITALTWINS T JOIN C RELATED T.x R JOIN D RELATED R.y"),
        Some(65)
    );
    assert_eq!(
        err_at("SELECT T FROM DIGITALTWINS T JOIN T RELATED T.x"),
        Some(34)
    );
}

#[test]
fn join_count_is_limited_beyond_adts_five() {
    let mut text = String::from("SELECT T0 FROM DIGITALTWINS T0");
    for i in 1..=limits::MAX_JOINS {
        text.push_str(&format!(" JOIN T{i} RELATED T{}.r", i - 1));
    }
    ok(&text);
    text.push_str(" JOIN Z RELATED T0.r");
    assert!(err_at(&text).is_some());
}

#[test]
fn match_directions_parse_relative_to_the_left_node() {
    let q = ok(
        "SELECT a, b, c, d FROM DIGITALTWINS MATCH (a)-[]->(b)<-[]-(c)-[]-(d) WHERE a.$dtId='x'",
    );
    let dirs: Vec<Direction> = edges(&q).iter().map(|e| e.direction).collect();
    assert_eq!(dirs, vec![Direction::Out, Direction::In, Direction::Both]);
    assert!(q.is_match);
    assert!(
        edges(&q)
            .iter()
            .all(|e| e.hops.is_none() && e.names.is_empty())
    );
}

#[test]
fn match_relationship_conditions_name_variables_names_and_hops() {
    let q = ok(
        "SELECT a FROM DIGITALTWINS MATCH (a)-[r:contains|feeds]->(b)-[:has*3]-(c)\
                -[*1..3]->(d)-[*..2]->(e)-[has|includes*..3]-(f)-[rel]-(g)-[*1]-(h)",
    );
    let e = edges(&q);
    assert_eq!(
        e[0].names,
        vec!["contains".to_string(), "feeds".to_string()]
    );
    assert_eq!(q.vars[e[0].rel_var.unwrap()].name.as_deref(), Some("r"));
    assert_eq!(
        (e[1].names.clone(), e[1].hops),
        (vec!["has".to_string()], Some((3, 3)))
    );
    assert_eq!(e[2].hops, Some((2, 3)), "ADT excludes the starting limit");
    assert_eq!(e[3].hops, Some((1, 2)));
    assert_eq!((e[4].names.len(), e[4].hops), (2, Some((1, 3))));
    assert!(e[5].names.is_empty() && e[5].rel_var.is_some());
    assert_eq!(
        (e[6].hops, e[6].rel_var),
        (None, None),
        "*1 is the default single hop"
    );
}

#[test]
fn match_accepts_anonymous_and_bare_nodes() {
    let q = ok("SELECT B FROM DIGITALTWINS MATCH ()-[]->(B)");
    assert_eq!(q.vars[0].name, None);
    let q = ok("SELECT A, C FROM DIGITALTWINS MATCH A-[contains]->B-[is_part_of]->C");
    assert_eq!(q.vars.len(), 5);
    ok("SELECT a FROM DIGITALTWINS MATCH (a) WHERE a.$dtId = 'x'");
}

#[test]
fn match_errors_point_at_the_offending_part() {
    let base = "SELECT a FROM DIGITALTWINS MATCH ";
    let at = |rest: &str| err_at(&format!("{base}{rest}")).map(|p| p - base.len());
    assert_eq!(at("(a)<-[]->(b)"), Some(3), "both directions");
    assert_eq!(at("(a)-[r:x*2]->(b)"), Some(5), "a variable names one hop");
    assert_eq!(at("(a)-[*0]->(b)"), Some(5));
    assert_eq!(at("(a)-[*3..3]->(b)"), Some(5));
    assert_eq!(at("(a)-[*11]->(b)"), Some(5));
    assert_eq!(at("(a)-[*]->(b)"), Some(6));
    assert_eq!(at("(a)-[]->(a)"), Some(8), "a node is declared once");
    assert_eq!(at("(a)-[]->"), Some(8));
    assert!(err_at("SELECT T FROM DIGITALTWINS T MATCH (a)").is_some());
    assert!(err_at("SELECT T FROM DIGITALTWINS T JOIN C RELATED T.x MATCH (a)").is_some());
}

#[test]
fn match_select_star_is_allowed() {
    assert_eq!(
        ok("SELECT * FROM DIGITALTWINS MATCH (a)-[*3]-(b)").select,
        Select::Star
    );
}

#[test]
fn match_edges_are_limited() {
    let mut text = String::from("SELECT n0 FROM DIGITALTWINS MATCH (n0)");
    for i in 1..=limits::MAX_MATCH_EDGES {
        text.push_str(&format!("-[]->(n{i})"));
    }
    ok(&text);
    text.push_str("-[]->(z)");
    assert!(err_at(&text).is_some());
}

#[test]
fn where_operators_build_the_expected_tree() {
    let q = ok(
        "SELECT * FROM DIGITALTWINS T WHERE T.a = 1 AND (T.b != 'x' OR NOT T.c <= 2.5) \
                AND T.d IN ['p', 1, true, null] AND T.e NIN [] AND T.f NOT IN (-3)",
    );
    let Some(Expr::And(terms)) = &q.filter else {
        panic!("{:?}", q.filter)
    };
    assert_eq!(terms.len(), 5);
    assert!(matches!(&terms[1], Expr::Or(o) if matches!(&o[1], Expr::Not(_))));
    assert!(matches!(&terms[2], Expr::In { list, negated: false, .. } if list.len() == 4));
    assert!(matches!(&terms[3], Expr::In { list, negated: true, .. } if list.is_empty()));
    assert!(matches!(&terms[4], Expr::In { list, negated: true, .. } if list.len() == 1));
    // Scalar AND binds tighter than OR.
    let q = ok("SELECT * FROM DIGITALTWINS WHERE a = 1 OR b = 2 AND c = 3");
    assert!(matches!(&q.filter, Some(Expr::Or(t)) if matches!(&t[1], Expr::And(_))));
    let q = ok("SELECT * FROM DIGITALTWINS WHERE a < 1 AND b > 2 AND c >= 3 AND d <> 4");
    assert!(matches!(&q.filter, Some(Expr::And(t)) if t.len() == 4));
}

#[test]
fn functions_parse_with_their_arity_and_either_spelling() {
    let q = ok(
        "SELECT * FROM DIGITALTWINS WHERE IS_DEFINED(Location) AND is_null(x) \
                AND IS_BOOL(a) AND IS_NUMBER(b) AND IS_STRING(c) AND IS_PRIMITIVE(d) \
                AND IS_OBJECT(e) AND STARTSWITH($dtId, 'a') AND STARTS_WITH($dtId, 'a') \
                AND ENDSWITH(n, 'x') AND ENDS_WITH(n, 'x') AND CONTAINS(n, 'y') \
                AND ARRAY_CONTAINS(tags, 2)",
    );
    let Some(Expr::And(terms)) = &q.filter else {
        panic!()
    };
    let funcs: Vec<Func> = terms
        .iter()
        .map(|t| match t {
            Expr::Func(f, _) => *f,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(funcs[7], Func::StartsWith);
    assert_eq!(funcs[8], Func::StartsWith);
    assert_eq!(funcs.len(), 13);
    assert_eq!(
        err_at("SELECT * FROM DIGITALTWINS WHERE IS_BOOL(a, b)"),
        Some(44)
    );
    assert_eq!(
        err_at("SELECT * FROM DIGITALTWINS WHERE STARTSWITH(a)"),
        Some(33)
    );
    assert_eq!(
        err_at("SELECT * FROM DIGITALTWINS WHERE LOWER(a) = 'x'"),
        Some(33)
    );
}

#[test]
fn is_of_model_takes_an_optional_collection_and_exact() {
    let q = ok("SELECT * FROM DIGITALTWINS WHERE IS_OF_MODEL('dtmi:a:b;1')");
    assert!(matches!(
        &q.filter,
        Some(Expr::IsOfModel {
            var: 0,
            exact: false,
            ..
        })
    ));
    let q = ok("SELECT * FROM DIGITALTWINS WHERE IS_OF_MODEL('dtmi:a:b;1', exact)");
    assert!(matches!(
        &q.filter,
        Some(Expr::IsOfModel { exact: true, .. })
    ));
    let q = ok(
        "SELECT C FROM DIGITALTWINS T JOIN C RELATED T.x WHERE IS_OF_MODEL(C, 'dtmi:a:b;1', EXACT)",
    );
    assert!(matches!(
        &q.filter,
        Some(Expr::IsOfModel {
            var: 1,
            exact: true,
            ..
        })
    ));
    assert_eq!(
        err_at("SELECT * FROM DIGITALTWINS WHERE IS_OF_MODEL('not a dtmi')"),
        Some(45)
    );
    assert_eq!(
        err_at("SELECT C FROM DIGITALTWINS T JOIN C RELATED T.x WHERE IS_OF_MODEL('dtmi:a:b;1')"),
        Some(54)
    );
    assert!(err_at("SELECT * FROM RELATIONSHIPS WHERE IS_OF_MODEL('dtmi:a:b;1')").is_some());
    assert!(err_at("SELECT * FROM DIGITALTWINS WHERE IS_OF_MODEL('dtmi:a:b;1', fuzzy)").is_some());
}

#[test]
fn unknown_collections_are_errors_when_there_are_several() {
    assert_eq!(
        err_at("SELECT Q.name FROM DIGITALTWINS T JOIN C RELATED T.x"),
        Some(7)
    );
    assert_eq!(
        err_at("SELECT C FROM DIGITALTWINS T JOIN C RELATED T.x WHERE name = 'a'"),
        Some(54)
    );
}

#[test]
fn escaped_reserved_words_are_names() {
    let q = ok("SELECT * FROM DIGITALTWINS WHERE [[Group]] = 'BravoTeam' AND T.select = 1");
    let Some(Expr::And(terms)) = &q.filter else {
        panic!()
    };
    assert!(
        matches!(&terms[0], Expr::Compare(_, a, _) if **a == Expr::Path { var: 0, path: vec!["Group".into()] })
    );
    assert_eq!(
        err_at("SELECT * FROM DIGITALTWINS WHERE Group = 1 AND select = 2"),
        Some(47)
    );
}

#[test]
fn syntax_errors_report_character_positions() {
    assert_eq!(err_at(""), Some(0));
    assert_eq!(err_at("SELECT"), Some(6));
    assert_eq!(err_at("SELECT * FROM"), Some(13));
    assert_eq!(err_at("SELECT * FROM TWINS"), Some(14));
    assert_eq!(err_at("SELECT * FROM DIGITALTWINS WHERE"), Some(32));
    assert_eq!(err_at("SELECT * FROM DIGITALTWINS WHERE a = "), Some(37));
    assert_eq!(
        err_at("SELECT * FROM DIGITALTWINS WHERE a = 1 extra"),
        Some(39)
    );
    assert_eq!(err_at("SELECT * FROM DIGITALTWINS WHERE (a = 1"), Some(39));
    assert_eq!(
        err_at("SELECT * FROM DIGITALTWINS WHERE a IN ['x' 'y']"),
        Some(43)
    );
    assert_eq!(
        err_at("SELECT * FROM DIGITALTWINS WHERE a IN [b]"),
        Some(39)
    );
    assert_eq!(
        err_at("SELECT * FROM DIGITALTWINS WHERE a = - 'x'"),
        Some(37)
    );
    // Positions count characters, not bytes.
    assert_eq!(
        err_at("SELECT * FROM DIGITALTWINS WHERE a = 'é' b"),
        Some(41)
    );
    let e = parse("SELECT * FROM DIGITALTWINS WHERE").unwrap_err();
    assert!(e.to_string().ends_with("(at position 32)"), "{e}");
    assert_eq!(e.code(), twinguard_proto::ErrorCode::SqlQueryError);
}

#[test]
fn deeply_nested_parentheses_are_refused_without_exhausting_the_stack() {
    let depth = 100_000;
    let text = format!(
        "SELECT * FROM DIGITALTWINS WHERE {}a = 1{}",
        "(".repeat(depth.min(limits::MAX_QUERY_CHARS / 3)),
        ")".repeat(depth.min(limits::MAX_QUERY_CHARS / 3))
    );
    assert!(err_at(&text).is_some());
    let nots = format!(
        "SELECT * FROM DIGITALTWINS WHERE {} a = 1",
        "NOT ".repeat(5_000)
    );
    assert!(err_at(&nots).is_some());
    let calls = format!(
        "SELECT * FROM DIGITALTWINS WHERE {}a{}",
        "IS_BOOL(".repeat(2_000),
        ")".repeat(2_000)
    );
    assert!(err_at(&calls).is_some());
    let fine = format!(
        "SELECT * FROM DIGITALTWINS WHERE {}a = 1{}",
        "(".repeat(30),
        ")".repeat(30)
    );
    ok(&fine);
}

#[test]
fn oversized_queries_and_lists_are_refused() {
    let long = format!(
        "SELECT * FROM DIGITALTWINS WHERE a = '{}'",
        "x".repeat(limits::MAX_QUERY_CHARS)
    );
    assert_eq!(err_at(&long), Some(limits::MAX_QUERY_CHARS));
    let items = |n: usize| {
        (0..n)
            .map(|i| format!("'{i}'"))
            .collect::<Vec<_>>()
            .join(",")
    };
    ok(&format!(
        "SELECT * FROM DIGITALTWINS WHERE $dtId IN [{}]",
        items(limits::MAX_IN_ITEMS)
    ));
    assert!(
        err_at(&format!(
            "SELECT * FROM DIGITALTWINS WHERE $dtId IN [{}]",
            items(limits::MAX_IN_ITEMS + 1)
        ))
        .is_some()
    );
    let ands = vec!["a = 1"; limits::MAX_LOGICAL_OPS + 2].join(" AND ");
    assert!(err_at(&format!("SELECT * FROM DIGITALTWINS WHERE {ands}")).is_some());
    let ands = vec!["a = 1"; 51].join(" OR ");
    ok(&format!("SELECT * FROM DIGITALTWINS WHERE {ands}"));
}

#[test]
fn literals_cover_strings_numbers_booleans_and_null() {
    let q = ok(
        r#"SELECT * FROM DIGITALTWINS WHERE a IN ['s', "d", -2, 1.5e1, TRUE, false, Null, 18446744073709551615]"#,
    );
    let Some(Expr::In { list, .. }) = &q.filter else {
        panic!()
    };
    assert_eq!(
        list[..7],
        [
            json!("s"),
            json!("d"),
            json!(-2),
            json!(15.0),
            json!(true),
            json!(false),
            json!(null)
        ]
    );
    assert_eq!(list[7], json!(u64::MAX));
}

#[test]
fn arbitrary_garbage_never_panics() {
    let samples = [
        "SELECT",
        "SELECT *",
        "(((",
        ")))",
        "[[",
        "]]",
        "'",
        "\"",
        "-[",
        "]->",
        "*..",
        "..",
        "SELECT * FROM DIGITALTWINS MATCH",
        "SELECT * FROM DIGITALTWINS MATCH (",
        "SELECT a FROM DIGITALTWINS MATCH (a)-[",
        "SELECT a FROM DIGITALTWINS MATCH (a)-[*1..",
        "SELECT TOP(",
        "SELECT COUNT(",
        "\u{0}",
        "SELECT * FROM DIGITALTWINS WHERE IS_OF_MODEL(",
        "SELECT * FROM DIGITALTWINS WHERE a IN",
        "SELECT * FROM DIGITALTWINS WHERE a NOT",
        "SELECT T. FROM DIGITALTWINS T",
    ];
    for s in samples {
        assert!(parse(s).is_err(), "{s:?}");
    }
    // Every prefix of a rich query is either valid or a positioned error.
    let rich = "SELECT TOP(3) a, r.x AS y FROM DIGITALTWINS MATCH (a)-[r:c|d]->(b)<-[*..2]-(c) \
                WHERE a.$dtId IN ['x', 'y'] AND NOT (b.t >= -1.5 OR IS_OF_MODEL(c, 'dtmi:a:b;1', exact))";
    for end in 0..=rich.len() {
        if let Err(e) = parse(&rich[..end]) {
            assert!(
                e.position.is_some_and(|p| p <= end),
                "{:?}: {e}",
                &rich[..end]
            );
        }
    }
    ok(rich);
}
