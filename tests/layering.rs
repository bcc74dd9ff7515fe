//! The crate's modules form no import cycle, and the layers read top to bottom:
//! main → server → api → auth / keystore → crypto, with `config` composing the settings the
//! modules below it own and imported only by the modules that start things (`server`,
//! `config_check`, `dev`) and by `main`.
//!
//! The graph is read from the source: every `crate::MODULE` path in `src/` (code and unit tests,
//! comments left out) is an edge from the top-level module the file belongs to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

fn module_of(file: &Path, src: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

fn code_without_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn import_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let Some(module) = module_of(&file, &src) else {
            continue;
        };
        let code = code_without_comments(&std::fs::read_to_string(&file).unwrap());
        let edges = graph.entry(module.clone()).or_default();
        for (at, _) in code.match_indices("crate::") {
            let name: String = code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                edges.insert(name);
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one: the modules in order, `start` first and last.
fn cycle_from(graph: &Graph, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((module, path)) = stack.pop() {
        for next in graph.get(&module).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(start.to_owned());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_module_imports_itself_through_others() {
    let graph = import_graph();
    assert!(graph.len() > 10, "the source was not read: {graph:?}");
    assert!(
        graph["server"].contains("api") && graph["api"].contains("keystore"),
        "the graph misses known edges: {graph:?}"
    );
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| cycle_from(&graph, m))
        .map(|cycle| cycle.join(" -> "))
        .collect();
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

#[test]
fn the_layers_read_top_to_bottom() {
    let graph = import_graph();
    let importers = |target: &str| -> BTreeSet<&str> {
        graph
            .iter()
            .filter(|(_, edges)| edges.contains(target))
            .map(|(module, _)| module.as_str())
            .collect()
    };
    assert_eq!(
        importers("config"),
        BTreeSet::from(["config_check", "dev", "server"]),
        "config composes the settings of the modules below it; only those that start things use it"
    );
    for lower in ["api", "auth", "keystore", "crypto", "limits", "field"] {
        assert!(
            !graph[lower].contains("server"),
            "{lower} must not reach up into server"
        );
    }
    for (lower, upper) in [
        ("auth", "api"),
        ("keystore", "api"),
        ("crypto", "api"),
        ("crypto", "keystore"),
        ("keystore", "auth"),
        ("auth", "keystore"),
    ] {
        assert!(
            !graph[lower].contains(upper),
            "{lower} imports {upper}: {:?}",
            graph[lower]
        );
    }
}
