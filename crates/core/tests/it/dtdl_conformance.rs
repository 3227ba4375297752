//! The official DTDL v2 and v3 conformance cases and the RealEstateCore ontology, run through
//! `twinguard_core::dtdl::parse`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use twinguard_core::dtdl::{DEFAULT_WORK_LIMIT, Interface, ParseOptions, compile, parse};
use twinguard_core::dtmi::Dtmi;

/// Agreement floors (ratchet): raise them when the parser improves, never lower them.
const V2_FLOOR: f64 = 1.0;
const V3_FLOOR: f64 = 1.0;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn no_resolver(_: &Dtmi) -> Option<Arc<Interface>> {
    None
}

#[derive(Default)]
struct Tally {
    agree: usize,
    total: usize,
}

struct Disagreement {
    file: String,
    index: usize,
    expected: bool,
    message: String,
}

struct VersionResult {
    by_prefix: BTreeMap<String, Tally>,
    overall: Tally,
    disagreements: Vec<Disagreement>,
}

fn run_version(version: &str) -> VersionResult {
    let dir = data_dir().join("dtdl").join(version).join("spec");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut result = VersionResult {
        by_prefix: BTreeMap::new(),
        overall: Tally::default(),
        disagreements: Vec::new(),
    };
    for path in files {
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let prefix = file.split('-').next().unwrap_or_default().to_string();
        let Value::Array(cases) = read_json(&path) else {
            panic!("{file}: not an array")
        };
        for (index, case) in cases.iter().enumerate() {
            let expected = case["valid"]
                .as_bool()
                .unwrap_or_else(|| panic!("{file}[{index}]"));
            let options = case["options"].as_array().cloned().unwrap_or_default();
            let mut parse_options = ParseOptions::default();
            for option in &options {
                match option.as_str() {
                    Some("DisallowUndefinedExtensions") => {
                        parse_options.disallow_undefined_extensions = true
                    }
                    Some("AllowUndefinedExtensions") => {
                        parse_options.disallow_undefined_extensions = false
                    }
                    other => panic!("{file}[{index}]: unknown option {other:?}"),
                }
            }
            let documents = case["input"].as_array().cloned().unwrap_or_default();
            let outcome = parse(&documents, &no_resolver, &parse_options);
            let agrees = outcome.is_ok() == expected;
            let tally = result.by_prefix.entry(prefix.clone()).or_default();
            for t in [tally, &mut result.overall] {
                t.total += 1;
                t.agree += usize::from(agrees);
            }
            if !agrees {
                result.disagreements.push(Disagreement {
                    file: file.clone(),
                    index,
                    expected,
                    message: outcome.err().map(|e| e.to_string()).unwrap_or_default(),
                });
            }
        }
    }
    result
}

fn rate(t: &Tally) -> f64 {
    if t.total == 0 {
        1.0
    } else {
        t.agree as f64 / t.total as f64
    }
}

#[test]
fn parser_agrees_with_the_official_conformance_cases() {
    let mut report = String::from("# DTDL conformance\n\n");
    let mut summary = Vec::new();
    let mut rates = Vec::new();
    for version in ["v2", "v3"] {
        let result = run_version(version);
        let r = rate(&result.overall);
        rates.push(r);
        summary.push(format!(
            "{version}: {}/{} ({:.2}%)",
            result.overall.agree,
            result.overall.total,
            100.0 * r
        ));
        let _ = writeln!(
            report,
            "## {version}: {}/{} agree\n",
            result.overall.agree, result.overall.total
        );
        for (prefix, t) in &result.by_prefix {
            let _ = writeln!(report, "- {prefix}: {}/{}", t.agree, t.total);
        }
        let _ = writeln!(report, "\n### Disagreements\n");
        for d in &result.disagreements {
            let _ = writeln!(
                report,
                "- {} [{}]: expected {}, got {}{}",
                d.file,
                d.index,
                if d.expected { "valid" } else { "invalid" },
                if d.expected { "invalid: " } else { "valid" },
                d.message
            );
        }
        report.push('\n');
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    let _ = std::fs::create_dir_all(&target);
    let _ = std::fs::write(target.join("dtdl-conformance.md"), &report);
    println!("DTDL conformance: {}", summary.join(", "));
    assert!(
        rates[0] >= V2_FLOOR,
        "v2 agreement fell below the floor: {}",
        summary[0]
    );
    assert!(
        rates[1] >= V3_FLOOR,
        "v3 agreement fell below the floor: {}",
        summary[1]
    );
}

fn collect_json(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_json(&path, out);
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
}

#[test]
fn realestatecore_ontology_is_accepted_as_one_strict_batch() {
    let mut files = Vec::new();
    collect_json(&data_dir().join("ontologies/realestatecore"), &mut files);
    files.sort();
    let mut documents = Vec::new();
    let mut count = 0;
    for path in &files {
        let doc = read_json(path);
        count += doc.as_array().map_or(1, Vec::len);
        documents.push(doc);
    }
    assert_eq!(count, 767, "expected the 767 RealEstateCore interfaces");
    let started = std::time::Instant::now();
    let compiled = match compile(
        &documents,
        &no_resolver,
        &ParseOptions::strict(),
        DEFAULT_WORK_LIMIT,
    ) {
        Ok(c) => c,
        Err(e) => panic!("RealEstateCore was rejected: {e}"),
    };
    let interfaces = compiled.interfaces;
    let expanded: usize = interfaces.iter().map(|i| i.expanded_size).sum();
    println!(
        "parsed {} RealEstateCore interfaces in {:?}: {} units of work, expanded size {expanded}",
        interfaces.len(),
        started.elapsed(),
        compiled.work,
    );
    assert_eq!(interfaces.len(), 767);
    let by_id = |id: &str| {
        interfaces
            .iter()
            .find(|i| i.id.as_str() == id)
            .unwrap_or_else(|| panic!("{id} missing"))
            .clone()
    };
    let room = by_id("dtmi:digitaltwins:rec_3_3:building:CookingRoom;1");
    for ancestor in [
        "dtmi:digitaltwins:rec_3_3:building:FoodHandlingRoom;1",
        "dtmi:digitaltwins:rec_3_3:core:Room;1",
        "dtmi:digitaltwins:rec_3_3:core:Space;1",
    ] {
        let ancestor = Dtmi::parse(ancestor).unwrap();
        assert!(room.ancestors.contains(&ancestor), "{:?}", room.ancestors);
    }
    assert!(!room.ancestors.contains(&room.id));
}
