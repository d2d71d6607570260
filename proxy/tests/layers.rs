//! The module layout holds: every top-level module of `proxy/src` imports only what
//! `docs/architecture.md` says it may, so there is no import cycle and the CLI never reaches
//! into the data path. Reads the sources; runs anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module → the modules it may import (`crate::<module>`), as documented in
/// `docs/architecture.md`. `node` is the composition root: it may import everything and
/// nothing may import it.
const ALLOWED: &[(&str, &[&str])] = &[
    ("config", &[]),
    ("admin", &["limits"]),
    ("memory", &[]),
    ("netns", &[]),
    ("registry", &["memory"]),
    ("relay", &[]),
    ("batch", &[]),
    ("drain", &[]),
    ("limits", &[]),
    ("l7", &["registry", "config"]),
    (
        "exchange",
        &[
            "admin",
            "batch",
            "drain",
            "l7",
            "relay",
            "telemetry",
            "upstream",
            "tunnel",
        ],
    ),
    ("identity", &["admin", "memory"]),
    ("ca", &["identity", "registry"]),
    ("policy", &["registry"]),
    ("l7", &["registry", "config"]),
    ("workload", &["registry", "identity"]),
    ("worker", &[]),
    (
        "upstream",
        &["batch", "registry", "identity", "worker", "netns", "relay"],
    ),
    (
        "telemetry",
        &["admin", "config", "registry", "identity", "limits", "relay"],
    ),
    ("capture", &["admin", "config", "workload"]),
    (
        "tunnel",
        &[
            "admin",
            "batch",
            "drain",
            "identity",
            "netns",
            "relay",
            "telemetry",
            "upstream",
            "worker",
        ],
    ),
    (
        "inputs",
        &[
            "drain",
            "registry",
            "policy",
            "l7",
            "workload",
            "upstream",
            "telemetry",
        ],
    ),
    (
        "inbound",
        &[
            "admin",
            "drain",
            "exchange",
            "identity",
            "inputs",
            "l7",
            "policy",
            "registry",
            "relay",
            "telemetry",
            "tunnel",
            "upstream",
            "workload",
        ],
    ),
    (
        "outbound",
        &[
            "admin",
            "capture",
            "drain",
            "exchange",
            "identity",
            "inbound",
            "inputs",
            "limits",
            "l7",
            "policy",
            "registry",
            "relay",
            "telemetry",
            "tunnel",
            "upstream",
            "workload",
        ],
    ),
    ("cli", &["admin", "config"]),
    ("node", &["*"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module → the top-level modules its files name as `crate::<module>`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let deps = out.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                deps.insert(name);
            }
        }
    }
    out
}

#[test]
fn every_module_imports_only_what_it_may() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut problems = Vec::new();
    for (module, deps) in imports() {
        let Some(may) = allowed.get(module.as_str()) else {
            problems.push(format!(
                "{module}: not in the layout table (docs/architecture.md, tests/layers.rs)"
            ));
            continue;
        };
        for dep in deps {
            if !may.contains(&"*") && !may.contains(&dep.as_str()) {
                problems.push(format!("{module} imports {dep}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn there_is_no_import_cycle() {
    let graph = imports();
    // Depth-first search for a back edge.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<String> {
        if let Some(i) = path.iter().position(|p| *p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m);
            return Some(cycle.join(" → "));
        }
        if done.contains(m) {
            return None;
        }
        path.push(m);
        for dep in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(dep, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m);
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(cycle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {cycle}");
        }
    }
}

#[test]
fn nothing_imports_the_composition_root_and_the_cli_stays_out_of_the_data_path() {
    for (module, deps) in imports() {
        assert!(!deps.contains("node"), "{module} imports node");
        assert!(!deps.contains("cli"), "{module} imports cli");
        if module == "cli" {
            for forbidden in [
                "capture", "tunnel", "identity", "node", "outbound", "inbound",
            ] {
                assert!(!deps.contains(forbidden), "cli imports {forbidden}");
            }
        }
    }
}
